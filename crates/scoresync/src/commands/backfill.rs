//! `scoresync backfill`: re-publishes the current PostgreSQL rows of some scorecards through the
//! change topic, beside the running daemon ([`scoresync_source::backfill`] says why a backfilled
//! row never overwrites a newer change). Resumable: the same command started again after a kill
//! goes on after the last chunk Kafka acknowledged.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::SystemTime;

use anyhow::Context;
use error_reporter::Report;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use scoresync_event::{ScorecardKey, SourceTable};
use scoresync_source::backfill::{Backfill, CardKind, Filter, TimeColumn};
use scoresync_source::connect::ConnectParams;
use scoresync_source::publish::Publisher;
use scoresync_source::state::StateStore;

use crate::commands::progress::Progress;
use crate::commands::replay::TableArg;
use crate::config::Config;

/// `scoresync backfill` arguments.
#[derive(clap::Args, Debug)]
pub struct BackfillArgs {
    /// Only this customer's scorecards.
    #[arg(long)]
    customer: Option<String>,
    /// Only this profile's scorecards.
    #[arg(long)]
    profile: Option<String>,
    /// Only process scorecards (`scorecard_type` 2) or only conversation scorecards.
    #[arg(long, value_enum)]
    kind: Option<KindArg>,
    /// Only scorecards whose `--time-column` is at or after this time (RFC 3339, UTC).
    #[arg(long, value_name = "RFC3339", value_parser = humantime::parse_rfc3339_weak)]
    since: Option<SystemTime>,
    /// Only scorecards whose `--time-column` is before this time (RFC 3339, UTC).
    #[arg(long, value_name = "RFC3339", value_parser = humantime::parse_rfc3339_weak)]
    until: Option<SystemTime>,
    /// The column `--since` and `--until` compare.
    #[arg(long, value_enum, default_value = "created-at")]
    time_column: TimeColumnArg,
    /// Only the scorecards listed in this file: one `customer_id<TAB>profile_id<TAB>scorecard_id`
    /// per line (blank lines and lines starting with `#` are skipped).
    #[arg(long, value_name = "FILE")]
    keys: Option<PathBuf>,
    /// Publish only this table's rows (repeatable; default: the scorecard, its scores and its
    /// historic scores).
    #[arg(long, value_name = "TABLE", value_enum)]
    table: Vec<TableArg>,
    /// Scorecards per chunk (each chunk is one snapshot, published and recorded as one step).
    #[arg(long, default_value_t = scoresync_source::backfill::DEFAULT_CHUNK_CARDS)]
    chunk_cards: usize,
}

/// `--kind`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum KindArg {
    /// `scorecard_type` 2.
    Process,
    /// Any other `scorecard_type`, NULL included.
    Conversation,
}

/// `--time-column`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
pub enum TimeColumnArg {
    /// `process_interaction_at`.
    ProcessInteractionAt,
    /// `created_at`.
    CreatedAt,
}

impl BackfillArgs {
    /// The filter these arguments describe.
    fn filter(&self) -> anyhow::Result<Filter> {
        let time =
            |t: &Option<SystemTime>| t.map(|t| humantime::format_rfc3339_micros(t).to_string());
        let keys = self.keys.as_ref().map(read_keys).transpose()?;
        Ok(Filter {
            customer: self.customer.clone(),
            profile: self.profile.clone(),
            kind: self.kind.map(|k| match k {
                KindArg::Process => CardKind::Process,
                KindArg::Conversation => CardKind::Conversation,
            }),
            time_column: match self.time_column {
                TimeColumnArg::ProcessInteractionAt => TimeColumn::ProcessInteractionAt,
                TimeColumnArg::CreatedAt => TimeColumn::CreatedAt,
            },
            since: time(&self.since),
            until: time(&self.until),
            keys,
            tables: if self.table.is_empty() {
                SourceTable::ALL.to_vec()
            } else {
                self.table.iter().map(|t| t.table()).collect()
            },
        })
    }
}

/// Reads a `--keys` file.
fn read_keys(file: &PathBuf) -> anyhow::Result<Vec<ScorecardKey>> {
    let text = std::fs::read_to_string(file)
        .with_context(|| format!("reading --keys {}", file.display()))?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|(n, line)| {
            let parts: Vec<&str> = line.split('\t').collect();
            let [customer_id, profile_id, scorecard_id] = parts[..] else {
                anyhow::bail!(
                    "{} line {}: expected customer_id<TAB>profile_id<TAB>scorecard_id",
                    file.display(),
                    n + 1
                );
            };
            Ok(ScorecardKey {
                customer_id: customer_id.into(),
                profile_id: profile_id.into(),
                scorecard_id: scorecard_id.into(),
            })
        })
        .collect()
}

/// Runs the backfill to its end (exit 0), or until SIGTERM/SIGINT (exit 1, progress saved:
/// the same command resumes).
pub async fn run(
    config: &Config,
    args: &BackfillArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.chunk_cards > 0, "--chunk-cards must be at least 1");
    let filter = args.filter()?;
    let slot = &config.postgres.slot;
    let state = StateStore::new(&config.kafka)?;
    let record = state.load(slot).await?.with_context(|| {
        format!(
            "no pipeline record for slot {slot} on {}: run `scoresync setup`",
            config.kafka.state_topic
        )
    })?;
    let params = ConnectParams::parse(config.postgres.url.expose_secret())?;
    // Sessions get ISO dates in UTC, as the snapshot's readers expect.
    let sql = params.connect_sql().await.context("connecting to PostgreSQL")?;
    let publisher = Publisher::new(&config.kafka, slot)?;
    let backfill = Backfill {
        sql: &sql,
        publisher: &publisher,
        state: &state,
        record: &record,
        filter: &filter,
        chunk_cards: args.chunk_cards,
    };
    let mut progress = backfill.resume().await?;
    let total = backfill.total_cards().await?;
    if progress.after.is_some() {
        eprintln!(
            "backfill: resuming after {} scorecards ({} rows) published",
            progress.cards, progress.rows
        );
    }
    eprintln!("backfill: {total} scorecards selected ({})", filter.describe());
    let mut shown = Progress::new("backfill", "scorecards", total);
    let result = backfill
        .run(&mut progress, &shutdown, |p| shown.set(p.cards, &format!("; {} rows", p.rows)))
        .await;
    publisher.flush(std::time::Duration::from_secs(10));
    shown.finish();
    match result {
        Ok(true) => {
            eprintln!(
                "backfill: done: {} scorecards, {} rows published in {:.1} s",
                progress.cards,
                progress.rows,
                shown.elapsed().as_secs_f64()
            );
            Ok(ExitCode::SUCCESS)
        }
        Ok(false) => {
            eprintln!(
                "backfill: interrupted after {} scorecards; run the same command again to go on",
                progress.cards
            );
            Ok(ExitCode::FAILURE)
        }
        Err(err) => {
            let again =
                if err.is_transient() { "; run the same command again to go on" } else { "" };
            eprintln!("backfill: {}{again}", Report::new(&err));
            Ok(ExitCode::FAILURE)
        }
    }
}
