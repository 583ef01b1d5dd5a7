//! `scoresync verify [--repair]`: compares PostgreSQL with every ClickHouse shard for a filter,
//! while replication runs, and reports rows missing, extra, stale or misplaced.
//!
//! How, per table:
//! 1. **PostgreSQL's rows** in primary-key order, in chunks ([`TableReader::chunk`]); each chunk's
//!    keys are looked up on every shard and judged ([`Checker::judge`]): missing, stale,
//!    misplaced.
//! 2. **ClickHouse's live keys**, shard by shard in ClickHouse's key order, within the filter
//!    ([`Checker::live_keys`]); those PostgreSQL lacks are judged: extra. The two walks never
//!    compare key ranges across the systems (their string orders differ), only keys.
//! 3. **Re-checks.** A difference can be a change the pipeline has not applied yet. Verify writes a
//!    heartbeat message to the WAL, waits until the slot has confirmed past it (the source has
//!    published everything before it) and the sink group has committed up to the change
//!    topic's end as it was then, on the partitions of the differing rows
//!    (`Verify::wait_applied`), and judges the differing keys again (unroutable rows are
//!    reported as first found: they depend on PostgreSQL and the conversations only). A key
//!    that differs again with PostgreSQL's row unchanged is drift; one whose row changed in
//!    between is checked once more, and after [`ROUNDS`] rounds reported as unstable, not as
//!    drift. When the pipeline does not catch up within `--settle-timeout`, verify cannot tell
//!    lag from drift and exits 2.
//!
//! Memory holds one chunk of rows and the differing keys, never a table.
//!
//! `--repair`: the scorecards of missing, stale and misplaced rows re-published from PostgreSQL
//! through the change topic (the backfill path, so a concurrent change still wins) and applied;
//! then delete markers over the extra and misplaced copies a re-check still finds
//! ([`Checker::retire`], only over the copy judged); then the same re-check. Nothing is
//! repaired unless the first check was confirmed.
//!
//! Each run leaves its counts on the state topic ([`report::Recorded`]), where the daemon reads
//! them for `scoresync_verify_drift_rows` (`crate::sampler`).
//!
//! Exit status: 0 no drift, 1 drift, 2 could not verify (the pipeline did not catch up, or a
//! server failed: `main` maps every error of verify to 2).

pub mod report;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use scoresync_bus::offsets::OffsetReader;
use scoresync_event::clock::unix_seconds;
use scoresync_event::{ScorecardKey, SourceTable};
use scoresync_sink::verify::{Checker, DriftKind, Expected, Finding, LiveScope};
use scoresync_source::backfill::Filter;
use scoresync_source::connect::ConnectParams;
use scoresync_source::state::{RECORD_PATIENCE, StateStore};
use scoresync_source::verify::{PgRow, TableReader};

use crate::commands::filter::FilterArgs;
use crate::commands::progress::Progress;
use crate::config::Config;

pub use report::Report;

/// Most rounds of re-checks before a row that keeps changing is called unstable.
pub const ROUNDS: usize = 3;
/// Scorecards re-published per backfill by `--repair`.
const REPUBLISH_BATCH: usize = 1000;

/// `scoresync verify` arguments.
#[derive(clap::Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Repair what drifted: the scorecards of missing, stale and misplaced rows re-published
    /// from PostgreSQL, then delete markers over the extra and misplaced copies still found;
    /// then check them again. Replication keeps running. Nothing is repaired when the pipeline
    /// did not catch up.
    #[arg(long)]
    repair: bool,
    /// Print the result as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
    /// Rows per chunk (one PostgreSQL read and one lookup per shard).
    #[arg(long, default_value_t = 1000)]
    chunk_rows: usize,
    /// How long to wait for the pipeline to apply past a check before judging again what
    /// differed (e.g. `2m`).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    settle_timeout: Duration,
    /// Sample keys shown per table, shard and kind.
    #[arg(long, default_value_t = 5)]
    samples: usize,
}

/// Runs verify (and repair); see the module doc for the exit status. Every run that ends,
/// well or with an error, leaves its result for the daemon's drift metrics (an error as
/// "unverified"); an interrupted one leaves nothing.
pub async fn run(
    config: &Config,
    args: &VerifyArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.chunk_rows > 0, "--chunk-rows must be at least 1");
    let filter = args.filter.filter()?;
    match check(config, args, &filter, &shutdown).await {
        Ok(Some(report)) => {
            record(config, &report.recorded(filter.describe(), unix_seconds())).await;
            Ok(ExitCode::from(report.exit_status()))
        }
        Ok(None) => {
            eprintln!("verify: interrupted");
            Ok(ExitCode::from(2))
        }
        Err(error) => {
            record(config, &report::Recorded::unverified(filter.describe(), unix_seconds())).await;
            Err(error)
        }
    }
}

/// Checks (and repairs) `filter`'s rows and prints the report; `None` when interrupted.
async fn check(
    config: &Config,
    args: &VerifyArgs,
    filter: &Filter,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<Report>> {
    let scope = args.filter.live_scope(filter);
    let params = ConnectParams::parse(config.postgres.url.expose_secret())?;
    let sql = params.connect_sql().await.context("connecting to PostgreSQL")?;
    let checker = Checker::new(&config.clickhouse).await.context("reading the shards' tables")?;
    let started = Instant::now();
    let verify = Verify { config, args, sql: &sql, checker: &checker, shutdown };

    let mut found = Vec::new();
    let mut checked = BTreeMap::new();
    for table in &filter.tables {
        let reader = TableReader::new(&sql, *table).await?;
        let (rows, findings) = verify.walk(&reader, filter, &scope).await?;
        checked.insert(*table, rows);
        found.extend(findings);
        if shutdown.is_cancelled() {
            return Ok(None);
        }
    }
    let mut outcome = verify.settle(found).await?;
    let mut repaired = None;
    // Repair only what was confirmed: with the pipeline behind, lag is not told from drift.
    if args.repair
        && outcome.unconfirmed.is_none()
        && outcome.drift.iter().any(|f| f.kind.is_drift())
    {
        let (done, after) = verify.repair(outcome.drift).await?;
        repaired = Some(done);
        // Rows still changing before the repair stay reported.
        let unstable = [outcome.unstable, after.unstable].concat();
        outcome = Settled { unstable, ..after };
    }
    let report = Report::new(checked, outcome.drift, outcome.unstable, outcome.unconfirmed);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report.json(repaired))?);
    } else {
        print!("{}", report.text(args.samples, repaired, started.elapsed()));
    }
    Ok(Some(report))
}

/// Leaves `recorded` on the state topic for the daemon's drift metrics; a failure is a warning
/// (the report printed is the result).
async fn record(config: &Config, recorded: &report::Recorded) {
    let slot = &config.postgres.slot;
    let key = report::record_key(slot);
    let saved = async {
        let state = StateStore::new(&config.kafka)?;
        state.save_keyed_within(slot, &key, recorded, RECORD_PATIENCE).await
    };
    if let Err(error) = saved.await {
        eprintln!(
            "verify: could not record the result on {} for the drift metrics: {}",
            config.kafka.state_topic,
            error_reporter::Report::new(error)
        );
    }
}

/// What the re-checks left.
struct Settled {
    /// Confirmed drift (and unroutable rows, which the report lists apart).
    drift: Vec<Finding>,
    /// Rows still changing after [`ROUNDS`] checks.
    unstable: Vec<Finding>,
    /// Rows that could not be judged again: why (the pipeline did not catch up).
    unconfirmed: Option<(String, Vec<Finding>)>,
}

/// One verify run's context.
struct Verify<'a> {
    config: &'a Config,
    args: &'a VerifyArgs,
    sql: &'a tokio_postgres::Client,
    checker: &'a Checker,
    shutdown: &'a CancellationToken,
}

impl Verify<'_> {
    /// Both walks of one table (module doc, steps 1 and 2): PostgreSQL's rows checked, and
    /// the findings.
    async fn walk(
        &self,
        reader: &TableReader,
        filter: &Filter,
        scope: &LiveScope,
    ) -> anyhow::Result<(u64, Vec<Finding>)> {
        let table = reader.table();
        let limit = self.args.chunk_rows;
        let mut findings = Vec::new();
        let mut progress = Progress::new("verify", "rows", 0);
        let mut rows_checked = 0u64;
        let mut after: Option<Vec<String>> = None;
        loop {
            let rows = reader.chunk(self.sql, filter, after.as_deref(), limit).await?;
            let (read, last) = (rows.len(), rows.last().map(|r| r.key.clone()));
            let keys: Vec<Vec<String>> = rows.iter().map(|r| r.key.clone()).collect();
            findings.extend(self.checker.judge(table, &keys, &expected(rows)).await?);
            rows_checked += read as u64;
            progress.set(rows_checked, &format!("; {table} in PostgreSQL"));
            if read < limit || self.shutdown.is_cancelled() {
                break;
            }
            after = last;
        }
        let mut live = 0u64;
        for shard in 0..self.checker.shard_count() {
            let mut after: Option<Vec<String>> = None;
            loop {
                let keys =
                    self.checker.live_keys(shard, table, scope, after.as_deref(), limit).await?;
                if keys.is_empty() {
                    break;
                }
                let pg = reader.by_keys(self.sql, &keys).await?;
                let known: BTreeSet<&Vec<String>> = pg.iter().map(|r| &r.key).collect();
                let lacking: Vec<Vec<String>> =
                    keys.iter().filter(|k| !known.contains(k)).cloned().collect();
                if !lacking.is_empty() {
                    findings.extend(self.checker.judge(table, &lacking, &[]).await?);
                }
                live += keys.len() as u64;
                progress.set(rows_checked, &format!("; {table}: {live} live rows on the shards"));
                if keys.len() < limit || self.shutdown.is_cancelled() {
                    break;
                }
                after = keys.last().cloned();
            }
        }
        progress.finish();
        dedup(&mut findings);
        Ok((rows_checked, findings))
    }

    /// Re-checks `found` until what is left is drift, unstable, or cannot be judged (module
    /// doc, step 3).
    async fn settle(&self, found: Vec<Finding>) -> anyhow::Result<Settled> {
        // An unroutable row depends on PostgreSQL and the conversations alone, not on the
        // pipeline's progress: reported as first found, not checked again.
        let (mut pending, mut drift): (Vec<Finding>, Vec<Finding>) =
            found.into_iter().partition(|f| f.kind.is_drift());
        for round in 0..ROUNDS {
            if pending.is_empty() {
                break;
            }
            eprintln!(
                "verify: {} rows differ; waiting for the pipeline to apply past them (round {} of {ROUNDS})",
                keys_of(&pending).values().map(Vec::len).sum::<usize>(),
                round + 1
            );
            if let Err(why) = self.wait_applied(&pending).await {
                return Ok(Settled {
                    drift,
                    unstable: Vec::new(),
                    unconfirmed: Some((why, pending)),
                });
            }
            let again = self.rejudge(&pending).await?;
            let (confirmed, changing) = sort_rechecked(&pending, again);
            drift.extend(confirmed);
            pending = changing;
        }
        dedup(&mut drift);
        Ok(Settled { drift, unstable: pending, unconfirmed: None })
    }

    /// Judges again the keys of `findings`, table by table, as they are now.
    async fn rejudge(&self, findings: &[Finding]) -> anyhow::Result<Vec<Finding>> {
        let mut again = Vec::new();
        for (table, keys) in keys_of(findings) {
            let reader = TableReader::new(self.sql, table).await?;
            for chunk in keys.chunks(self.args.chunk_rows) {
                let pg = reader.by_keys(self.sql, chunk).await?;
                again.extend(self.checker.judge(table, chunk, &expected(pg)).await?);
            }
        }
        dedup(&mut again);
        Ok(again)
    }

    /// Waits until the pipeline has applied every change of `findings`' rows committed before
    /// now: the slot confirmed past a heartbeat written now, then the sink group committed up to
    /// the change topic's end as it was then, on the partitions of those rows' scorecards (all
    /// of them when one is not known). `Err`: why not, within `--settle-timeout`. A partition
    /// whose committed offset is held by a parked event cannot be waited past: that is an `Err`
    /// naming it.
    async fn wait_applied(&self, findings: &[Finding]) -> Result<(), String> {
        let cards: Option<Vec<ScorecardKey>> = findings.iter().map(|f| f.card.clone()).collect();
        let deadline = Instant::now() + self.args.settle_timeout;
        let slot = &self.config.postgres.slot;
        let marker: String = self
            .sql
            .query_one(
                "SELECT pg_logical_emit_message(false, $1::text, 'verify'::text)::text",
                &[&scoresync_source::heartbeat::HEARTBEAT_PREFIX],
            )
            .await
            .map_err(|e| format!("writing a heartbeat to the WAL: {e}"))?
            .get(0);
        loop {
            let row = self
                .sql
                .query_opt(
                    "SELECT confirmed_flush_lsn >= $1::text::pg_lsn, confirmed_flush_lsn::text, active \
                     FROM pg_replication_slots WHERE slot_name = $2",
                    &[&marker, slot],
                )
                .await
                .map_err(|e| format!("reading slot {slot}: {e}"))?
                .ok_or_else(|| format!("slot {slot} does not exist (run `scoresync setup`)"))?;
            if row.get::<_, Option<bool>>(0) == Some(true) {
                break;
            }
            if Instant::now() > deadline || self.shutdown.is_cancelled() {
                let (confirmed, active): (Option<String>, bool) = (row.get(1), row.get(2));
                return Err(format!(
                    "slot {slot} has not confirmed past {marker} within {:?} (confirmed {}, \
                     active: {active}): is the source running? `scoresync status` shows the lag",
                    self.args.settle_timeout,
                    confirmed.unwrap_or_default()
                ));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let kafka = self.config.kafka.clone();
        let timeout = deadline.saturating_duration_since(Instant::now());
        let shutdown = self.shutdown.clone();
        tokio::task::spawn_blocking(move || group_caught_up(&kafka, cards, timeout, &shutdown))
            .await
            .map_err(|e| format!("waiting for the sink group: {e}"))?
    }

    /// `--repair` (module doc): first the scorecards of missing, stale and misplaced rows
    /// re-published and applied, then a re-check, then delete markers over the extra and
    /// misplaced copies that re-check still finds, then the last re-check. Markers come last,
    /// so a row whose only copy is misplaced is never without a live copy, even when the
    /// re-publishing fails half-way.
    async fn repair(&self, drift: Vec<Finding>) -> anyhow::Result<(report::Repaired, Settled)> {
        let cards: BTreeSet<ScorecardKey> = drift
            .iter()
            .filter(|f| f.kind.is_republished())
            .filter_map(|f| f.card.clone())
            .collect();
        let cards: Vec<ScorecardKey> = cards.into_iter().collect();
        if !cards.is_empty() {
            eprintln!("verify: re-publishing {} scorecards from PostgreSQL", cards.len());
        }
        // In batches: a backfill binds its key list in every chunk's query.
        for batch in cards.chunks(REPUBLISH_BATCH) {
            let filter = Filter { keys: Some(batch.to_vec()), ..Filter::everything() };
            let code = crate::commands::backfill::publish(
                self.config,
                &filter,
                scoresync_source::backfill::DEFAULT_CHUNK_CARDS,
                self.shutdown.clone(),
            )
            .await?;
            anyhow::ensure!(
                code == ExitCode::SUCCESS,
                "re-publishing the drifted scorecards did not finish (see above); nothing was \
                 deleted; run `scoresync verify --repair` again"
            );
        }
        let settled = self.settle(drift).await?;
        let republished = cards.len();
        if settled.unconfirmed.is_some() {
            // Nothing deleted: the report says why the pipeline was not seen to catch up.
            return Ok((report::Repaired { markers: 0, cards: republished }, settled));
        }
        let markers = self
            .checker
            .retire(&retirable(&settled.drift))
            .await
            .context("writing delete markers")?;
        let after = self.settle(settled.drift).await?;
        let unstable = [settled.unstable, after.unstable].concat();
        Ok((report::Repaired { markers, cards: republished }, Settled { unstable, ..after }))
    }
}

/// The copies repair may delete: every extra copy, and a misplaced copy only while its row's
/// right shard is not missing it (a misplaced copy may be the row's only one: the re-published
/// row did not land, for example it was dead-lettered; it stays, reported, until it has).
fn retirable(drift: &[Finding]) -> Vec<Finding> {
    let missing: BTreeSet<(SourceTable, &Vec<String>)> =
        drift.iter().filter(|f| f.kind == DriftKind::Missing).map(|f| (f.table, &f.key)).collect();
    drift
        .iter()
        .filter(|f| f.kind.is_retired())
        .filter(|f| f.kind == DriftKind::Extra || !missing.contains(&(f.table, &f.key)))
        .cloned()
        .collect()
}

/// Sorts what a re-check found (`again`) by what the check before it found (`before`): a
/// finding about a row whose PostgreSQL state is the same as before is confirmed drift; one
/// whose row changed in between is still changing (checked again). A row found before and not
/// again was lag, and is gone from both.
fn sort_rechecked(before: &[Finding], again: Vec<Finding>) -> (Vec<Finding>, Vec<Finding>) {
    let states: HashMap<(SourceTable, &Vec<String>), u64> =
        before.iter().map(|f| ((f.table, &f.key), f.pg_state)).collect();
    again.into_iter().partition(|f| states.get(&(f.table, &f.key)).copied() == Some(f.pg_state))
}

/// Polls the sink group's committed offsets until every partition of `cards` (all, when
/// `None`) has reached the change topic's end as it was on the first read.
fn group_caught_up(
    kafka: &scoresync_bus::KafkaConfig,
    cards: Option<Vec<ScorecardKey>>,
    timeout: Duration,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    let (group, topic) = (&kafka.consumer_group, &kafka.change_topic);
    let reader = OffsetReader::open(kafka, group, topic).map_err(|e| e.to_string())?;
    let mut ends = reader.watermarks().map_err(|e| e.to_string())?;
    if let Some(cards) = cards {
        let partitions: BTreeSet<i32> =
            cards.iter().map(|c| c.partition(reader.partitions())).collect();
        ends.retain(|p, _| partitions.contains(p));
    }
    loop {
        let committed = reader.committed().map_err(|e| e.to_string())?;
        let behind: Vec<String> = ends
            .iter()
            .filter_map(|(partition, (low, high))| {
                // Never committed, or committed before what retention kept: from the start.
                let at = committed.get(partition).copied().flatten().unwrap_or(*low).max(*low);
                (at < *high).then(|| format!("partition {partition} at {at} of {high}"))
            })
            .collect();
        if behind.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline || shutdown.is_cancelled() {
            return Err(format!(
                "sink group {group} has not committed up to the end of {topic} within {timeout:?} \
                 ({}): is the sink running, or does a parked event hold the partition? `scoresync \
                 status` shows it",
                behind.join(", ")
            ));
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn expected(rows: Vec<PgRow>) -> Vec<Expected> {
    rows.into_iter().map(|r| Expected { key: r.key, row: r.row, card: r.card }).collect()
}

/// The keys of `findings` by table, each once.
fn keys_of(findings: &[Finding]) -> BTreeMap<SourceTable, Vec<Vec<String>>> {
    let mut keys: BTreeMap<SourceTable, BTreeSet<Vec<String>>> = BTreeMap::new();
    for f in findings {
        keys.entry(f.table).or_default().insert(f.key.clone());
    }
    keys.into_iter().map(|(t, k)| (t, k.into_iter().collect())).collect()
}

/// Sorts findings and drops repeats (a key live on two shards is met on both walks).
fn dedup(findings: &mut Vec<Finding>) {
    findings.sort_by(|a, b| {
        (a.table, &a.key, a.kind, a.shard).cmp(&(b.table, &b.key, b.kind, b.shard))
    });
    findings
        .dedup_by(|a, b| (a.table, &a.key, a.kind, a.shard) == (b.table, &b.key, b.kind, b.shard));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(key: &str, kind: DriftKind, pg_state: u64) -> Finding {
        Finding {
            table: SourceTable::Scores,
            key: vec!["c".into(), "p".into(), key.into()],
            kind,
            shard: Some(0),
            version: None,
            card: None,
            detail: String::new(),
            pg_state,
        }
    }

    #[test]
    fn a_recheck_confirms_rows_unchanged_and_checks_changed_rows_again() {
        let before = [
            finding("same", DriftKind::Missing, 7),
            finding("changed", DriftKind::Stale, 7),
            finding("lag", DriftKind::Missing, 7),
            finding("now-stale", DriftKind::Missing, 7),
        ];
        let again = vec![
            finding("same", DriftKind::Missing, 7),
            finding("changed", DriftKind::Stale, 8),
            // "lag" is not found again: the pipeline applied it.
            finding("now-stale", DriftKind::Stale, 7),
            // Not found before (a re-check judges only keys found before, so this is defensive):
            // checked again, never confirmed on a first sighting.
            finding("new", DriftKind::Extra, 0),
        ];
        let (drift, changing) = sort_rechecked(&before, again);
        let keys = |f: &[Finding]| f.iter().map(|f| f.key[2].clone()).collect::<Vec<_>>();
        assert_eq!(keys(&drift), ["same", "now-stale"]);
        assert_eq!(keys(&changing), ["changed", "new"]);
    }

    #[test]
    fn a_misplaced_copy_is_deleted_only_once_its_row_is_not_missing() {
        let mut only_copy = finding("only", DriftKind::Misplaced, 7);
        only_copy.shard = Some(1);
        let mut second_copy = finding("second", DriftKind::Misplaced, 7);
        second_copy.shard = Some(1);
        let drift = [
            only_copy,
            finding("only", DriftKind::Missing, 7),
            second_copy,
            finding("ghost", DriftKind::Extra, 0),
            finding("old", DriftKind::Stale, 7),
        ];
        let keys: Vec<String> = retirable(&drift).iter().map(|f| f.key[2].clone()).collect();
        assert_eq!(keys, ["second", "ghost"]);
    }

    #[test]
    fn repeats_of_a_finding_are_dropped() {
        let mut found = vec![
            finding("b", DriftKind::Extra, 0),
            finding("a", DriftKind::Extra, 0),
            finding("b", DriftKind::Extra, 0),
        ];
        dedup(&mut found);
        assert_eq!(found.len(), 2);
        assert_eq!(found[0].key[2], "a");
    }
}
