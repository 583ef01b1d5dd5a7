//! The scorecard filter `backfill` and `verify` share: `--customer`, `--profile`, `--kind`,
//! `--since`/`--until` on `--time-column`, `--keys FILE`, `--table`
//! ([`scoresync_source::backfill::Filter`] is what it selects, as SQL).

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use scoresync_event::{ScorecardKey, SourceTable};
use scoresync_sink::verify::LiveScope;
use scoresync_source::backfill::{CardKind, Filter, TimeColumn};

use crate::commands::replay::TableArg;

/// The scorecard filter's arguments.
#[derive(clap::Args, Debug)]
pub struct FilterArgs {
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
    /// Only this table's rows (repeatable; default: the scorecard, its scores and its historic
    /// scores).
    #[arg(long, value_name = "TABLE", value_enum)]
    table: Vec<TableArg>,
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

impl FilterArgs {
    /// The filter these arguments describe.
    pub fn filter(&self) -> anyhow::Result<Filter> {
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

impl FilterArgs {
    /// The same filter on ClickHouse's rows, where the target tables carry its columns (a
    /// child's own `created_at` is not its scorecard's: see [`LiveScope`]).
    pub fn live_scope(&self, filter: &Filter) -> LiveScope {
        let us = |t: &Option<SystemTime>| {
            t.map(|t| match t.duration_since(UNIX_EPOCH) {
                Ok(d) => d.as_micros() as i64,
                Err(before) => -(before.duration().as_micros() as i64),
            })
        };
        let (since, until) = (us(&self.since), us(&self.until));
        let process = matches!(self.time_column, TimeColumnArg::ProcessInteractionAt);
        LiveScope {
            customer: filter.customer.clone(),
            profile: filter.profile.clone(),
            process: filter.kind.map(|k| k == CardKind::Process),
            process_since_us: since.filter(|_| process),
            process_until_us: until.filter(|_| process),
            created_since_us: since.filter(|_| !process),
            created_until_us: until.filter(|_| !process),
            cards: filter.keys.clone(),
        }
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
