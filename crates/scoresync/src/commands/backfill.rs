//! `scoresync backfill`: re-publishes the current PostgreSQL rows of some scorecards through the
//! change topic, beside the running daemon ([`scoresync_source::backfill`] says why a backfilled
//! row never overwrites a newer change). Resumable: the same command started again after a kill
//! goes on after the last chunk Kafka acknowledged.

use std::process::ExitCode;

use anyhow::Context;
use error_reporter::Report;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use scoresync_source::backfill::{Backfill, Filter};
use scoresync_source::connect::ConnectParams;
use scoresync_source::publish::Publisher;
use scoresync_source::state::StateStore;

use crate::commands::filter::FilterArgs;
use crate::commands::progress::Progress;
use crate::config::Config;

/// `scoresync backfill` arguments.
#[derive(clap::Args, Debug)]
pub struct BackfillArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Scorecards per chunk (each chunk is one snapshot, published and recorded as one step).
    #[arg(long, default_value_t = scoresync_source::backfill::DEFAULT_CHUNK_CARDS)]
    chunk_cards: usize,
}

/// Runs the backfill to its end (exit 0), or until SIGTERM/SIGINT (exit 1, progress saved:
/// the same command resumes).
pub async fn run(
    config: &Config,
    args: &BackfillArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.chunk_cards > 0, "--chunk-cards must be at least 1");
    let filter = args.filter.filter()?;
    publish(config, &filter, args.chunk_cards, shutdown).await
}

/// Publishes the rows of `filter`'s scorecards, with progress on stderr (also how `verify
/// --repair` restores rows): exit 0 when done, 1 if interrupted (progress saved) or failed.
pub async fn publish(
    config: &Config,
    filter: &Filter,
    chunk_cards: usize,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
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
        filter,
        chunk_cards,
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
