//! `scoresync replay`: rebuilds ClickHouse from the change topic while the daemon keeps running.
//!
//! It takes each partition's end offset at its start (or at `--to-timestamp`), commits its start
//! offsets for a consumer group of its own (`<kafka.consumer_group>.replay.<unix ms>`, so the
//! daemon's offsets are never touched), and runs the sink's own code in that group (scoped to
//! `--shard` and `--table`: [`scoresync_sink::Scope`]). Progress is the group's committed
//! offsets: a committed offset passes a message only once its rows are acknowledged by every
//! shard in scope, so when every partition's commit reached its end, every row before it is in
//! ClickHouse, and the replay stops, deletes its group and exits 0. Messages after an end are
//! applied too while the others finish (harmless, the daemon writes the same rows): a change
//! there may be what supersedes a parked one before the end.
//!
//! Its progress goes to stderr and, for the daemon's `scoresync_replay_*` metrics, to the state
//! topic ([`record`]).
//!
//! Replaying is harmless to do twice or beside the daemon: every row carries its source version
//! and ClickHouse keeps the greatest, so an old change never replaces a newer one.

mod range;
pub mod record;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use error_reporter::Report;
use tokio_util::sync::CancellationToken;

use scoresync_bus::config::CleanupPolicy;
use scoresync_bus::offsets::OffsetReader;
use scoresync_event::SourceTable;
use scoresync_sink::{Scope, SinkStats};

use crate::commands::progress::Progress;
use crate::config::Config;
use range::{Ranges, Start, rfc3339, unix_ms};
use record::{Phase, Reporter};

/// How much earlier than `--from-timestamp` a replay starts (DESIGN.md rule 9): message times
/// are PostgreSQL commit times, which concurrent transactions may record slightly out of commit
/// order. Replaying a little more is harmless.
const SEEK_MARGIN_MS: i64 = 60_000;

/// How often progress is checked.
const CHECK_EVERY: Duration = Duration::from_secs(2);

/// `scoresync replay` arguments.
#[derive(clap::Args, Debug)]
pub struct ReplayArgs {
    /// Start at each partition's oldest retained message (the default).
    #[arg(long, value_parser = ["earliest"], group = "start")]
    from: Option<String>,
    /// Start at the first message committed at or after this time, less a minute's margin (RFC
    /// 3339, for example 2026-11-29T08:00:00Z).
    #[arg(long, value_name = "RFC3339", value_parser = humantime::parse_rfc3339_weak, group = "start")]
    from_timestamp: Option<SystemTime>,
    /// Start at these offsets: a file of `partition=offset` lines. Partitions not listed are
    /// not replayed.
    #[arg(long, value_name = "FILE", group = "start")]
    from_offsets: Option<PathBuf>,
    /// Stop before the first message committed at or after this time (default: each
    /// partition's end when the replay starts).
    #[arg(long, value_name = "RFC3339", value_parser = humantime::parse_rfc3339_weak)]
    to_timestamp: Option<SystemTime>,
    /// Write only the rows that belong on shard N (0-based, in the order of clickhouse.shards),
    /// delete markers included; rows of other shards are read and dropped.
    #[arg(long, value_name = "N")]
    shard: Option<usize>,
    /// Replay only this table (repeatable).
    #[arg(long, value_name = "TABLE", value_enum)]
    table: Vec<TableArg>,
    /// Print per partition the offsets, message counts and time range it would read, and what
    /// history the topic no longer holds; write nothing.
    #[arg(long)]
    dry_run: bool,
}

/// Runs the replay; exit 0 once every partition is applied up to its end.
pub async fn run(
    config: &Config,
    args: &ReplayArgs,
    shutdown: CancellationToken,
) -> anyhow::Result<ExitCode> {
    if let Some(n) = args.shard {
        let shards = config.clickhouse.shards.len();
        anyhow::ensure!(
            n < shards,
            "--shard {n}: clickhouse.shards lists {shards} shards (0 to {})",
            shards - 1
        );
    }
    let group = format!("{}.replay.{}", config.kafka.consumer_group, unix_ms(SystemTime::now()));
    let Plan { reader, ranges, times, missing } = plan(config, args, &group).await?;
    for line in missing {
        eprintln!("{line}");
    }
    if args.dry_run {
        print!("{}", range::dry_run_table(&ranges, &times));
        return Ok(ExitCode::SUCCESS);
    }
    if ranges.messages() == 0 {
        eprintln!("replay: nothing to replay (every range is empty)");
        return Ok(ExitCode::SUCCESS);
    }
    let finished = execute(config, args, &group, reader, &ranges, shutdown).await;
    delete_group(config, &group).await;
    Ok(if finished? { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

/// What a replay will read, and what history is gone.
struct Plan {
    reader: OffsetReader,
    ranges: Ranges,
    times: range::Times,
    missing: Vec<String>,
}

/// Reads the topic's policy and offsets and plans the ranges (the dry run's table too).
async fn plan(config: &Config, args: &ReplayArgs, group: &str) -> anyhow::Result<Plan> {
    let start = match (&args.from_timestamp, &args.from_offsets) {
        (Some(time), _) => Start::Timestamp(unix_ms(*time) - SEEK_MARGIN_MS),
        (_, Some(file)) => {
            let text = std::fs::read_to_string(file)
                .with_context(|| format!("reading --from-offsets {}", file.display()))?;
            Start::Offsets(range::parse_offsets(&text).with_context(|| file.display().to_string())?)
        }
        _ => Start::Earliest,
    };
    let kafka = config.kafka.clone();
    let topic = kafka.change_topic.clone();
    let compacted = scoresync_bus::topics::describe(&kafka, &topic)
        .await?
        .get("cleanup.policy")
        .is_some_and(|p| p == CleanupPolicy::Compact.as_str());
    let (to_ms, dry_run, group) = (args.to_timestamp.map(unix_ms), args.dry_run, group.to_owned());
    tokio::task::spawn_blocking(move || {
        let reader = OffsetReader::open(&kafka, &group, &topic)?;
        let ranges = Ranges::read(&reader, &start, to_ms)?;
        let times =
            if dry_run { first_and_last_times(&reader, &ranges)? } else { Default::default() };
        let missing = missing_history(&reader, &ranges, compacted, &topic)?;
        Ok(Plan { reader, ranges, times, missing })
    })
    .await?
}

/// Commits the start offsets for `group`, runs the scoped sink in it and follows it to the
/// end. True when every partition reached its end.
async fn execute(
    config: &Config,
    args: &ReplayArgs,
    group: &str,
    reader: OffsetReader,
    ranges: &Ranges,
    shutdown: CancellationToken,
) -> anyhow::Result<bool> {
    let starts = ranges.starts();
    let reader = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
        reader.commit(&starts)?;
        Ok(reader)
    })
    .await??;
    let total = ranges.messages();
    eprintln!(
        "replay: {total} messages in {} partitions of {}, in consumer group {group}",
        ranges.0.len(),
        config.kafka.change_topic
    );
    let stats = Arc::new(SinkStats::default());
    let mut sink = crate::commands::sink::sink(config, Arc::clone(&stats));
    sink.kafka.consumer_group = group.to_owned();
    let tables = (!args.table.is_empty()).then(|| args.table.iter().map(|t| t.0).collect());
    sink.scope = Scope { shard: args.shard, tables };
    let stop = shutdown.child_token();
    let mut sink_task = tokio::spawn(sink.run(stop.clone()));
    let mut reporter = Reporter::new(config, group, total as u64);
    reporter.report(0, Phase::Running).await;
    let outcome = watch(reader, ranges, &stats, &mut sink_task, &mut reporter, &shutdown).await;
    stop.cancel();
    let finished = matches!(outcome, Watch::Done { .. });
    let result = match outcome {
        Watch::Done { elapsed } => match sink_task.await {
            Ok(Ok(())) => {
                eprintln!("replay: done: {total} messages in {:.1} s", elapsed.as_secs_f64());
                true
            }
            Ok(Err(err)) => {
                eprintln!(
                    "replay: every message is applied, but the sink stopped with: {}",
                    Report::new(&err)
                );
                false
            }
            Err(err) => {
                eprintln!("replay: the sink task failed: {err}");
                false
            }
        },
        Watch::SinkStopped(result) => {
            match result {
                Ok(Ok(())) => eprintln!("replay: the sink stopped before the end"),
                Ok(Err(err)) => eprintln!("replay: {}", Report::new(&err)),
                Err(err) => eprintln!("replay: the sink task failed: {err}"),
            }
            false
        }
        Watch::Interrupted => {
            let _ = sink_task.await;
            eprintln!("replay: interrupted; running it again is harmless (rows carry versions)");
            false
        }
    };
    let done = if finished { total as u64 } else { reporter.done() };
    reporter.report(done, if result { Phase::Done } else { Phase::Stopped }).await;
    Ok(result)
}

/// A table `--table` names.
#[derive(Clone, Copy, Debug)]
pub struct TableArg(SourceTable);

impl TableArg {
    /// The table.
    pub fn table(self) -> SourceTable {
        self.0
    }
}

impl clap::ValueEnum for TableArg {
    fn value_variants<'a>() -> &'a [Self] {
        &[
            TableArg(SourceTable::Scorecards),
            TableArg(SourceTable::Scores),
            TableArg(SourceTable::HistoricScorecardScores),
        ]
    }

    fn to_possible_value(&self) -> Option<clap::builder::PossibleValue> {
        Some(clap::builder::PossibleValue::new(self.0.name()))
    }
}

/// The times of each range's first and last message (for `--dry-run`).
fn first_and_last_times(reader: &OffsetReader, ranges: &Ranges) -> anyhow::Result<range::Times> {
    ranges
        .0
        .iter()
        .filter(|r| r.messages() > 0)
        .map(|r| {
            let first = reader.timestamp_at(r.partition, r.start, r.end)?;
            let last = reader.timestamp_at(r.partition, r.end - 1, r.end)?;
            Ok((r.partition, (first, last)))
        })
        .collect()
}

/// What history the topic no longer holds, one line per partition, said before anything is
/// written.
fn missing_history(
    reader: &OffsetReader,
    ranges: &Ranges,
    compacted: bool,
    topic: &str,
) -> anyhow::Result<Vec<String>> {
    ranges
        .missing(compacted)
        .into_iter()
        .map(|r| {
            let since = reader.timestamp_at(r.partition, r.low, r.end)?;
            let since = since.map_or_else(|| "its first retained message".to_owned(), rfc3339);
            Ok(format!(
                "replay: kafka topic {topic} partition {p}: messages before offset {low} are gone \
                 (the topic's cleanup.policy deletes old messages): the changes committed before \
                 {since} cannot be replayed. To restore the rows they wrote, re-publish the \
                 current rows from PostgreSQL with `scoresync backfill` (beside the running \
                 daemon; with a filter for the rows those changes touched, or none for all).",
                p = r.partition,
                low = r.low,
            ))
        })
        .collect()
}

enum Watch {
    Done { elapsed: Duration },
    SinkStopped(Result<Result<(), scoresync_sink::Error>, tokio::task::JoinError>),
    Interrupted,
}

/// Follows the replay group's committed offsets until every partition reached its end, the sink
/// stopped, or `shutdown`.
async fn watch(
    reader: OffsetReader,
    ranges: &Ranges,
    stats: &SinkStats,
    sink: &mut tokio::task::JoinHandle<Result<(), scoresync_sink::Error>>,
    reporter: &mut Reporter,
    shutdown: &CancellationToken,
) -> Watch {
    let reader = Arc::new(reader);
    let total = ranges.messages() as u64;
    let mut progress = Progress::new("replay", "messages", total);
    let started = Instant::now();
    loop {
        tokio::select! {
            biased;
            // 1. Interrupted (SIGTERM, SIGINT).
            _ = shutdown.cancelled() => return Watch::Interrupted,
            // 2. The sink stopped on its own (a permanent error).
            result = &mut *sink => return Watch::SinkStopped(result),
            // 3. Time to look at the group's progress.
            _ = tokio::time::sleep(CHECK_EVERY) => {}
        }
        let committed = {
            let reader = Arc::clone(&reader);
            tokio::task::spawn_blocking(move || anyhow::Ok(reader.committed()?)).await
        };
        let committed = match committed {
            Ok(Ok(committed)) => committed,
            Ok(Err(error)) => {
                tracing::warn!(
                    error = format!("{error:#}"),
                    "reading the replay's progress failed; trying again"
                );
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "reading the replay's progress failed; trying again");
                continue;
            }
        };
        let done: i64 = ranges
            .0
            .iter()
            .map(|r| {
                committed.get(&r.partition).copied().flatten().map_or(0, |c| c.min(r.end) - r.start)
            })
            .map(|d| d.max(0))
            .sum();
        let finished = ranges.0.iter().all(|r| {
            r.messages() == 0
                || committed.get(&r.partition).copied().flatten().is_some_and(|c| c >= r.end)
        });
        let parked = stats.parked.lock().map(|p| p.by_reason.clone()).unwrap_or_default();
        let note = if parked.is_empty() {
            String::new()
        } else {
            let reasons: Vec<String> = parked.iter().map(|(r, n)| format!("{n} {r}")).collect();
            format!("; parked: {} (see the sink's log)", reasons.join(", "))
        };
        progress.set(done.max(0) as u64, &note);
        if !finished {
            reporter.report(done.max(0) as u64, Phase::Running).await;
        }
        if finished {
            progress.finish();
            return Watch::Done { elapsed: started.elapsed() };
        }
    }
}

/// Deletes the replay's consumer group (best effort: it holds nothing once the replay ended).
async fn delete_group(config: &Config, group: &str) {
    let deleted = async {
        let admin = scoresync_bus::client::admin(&config.kafka)?;
        let opts =
            rdkafka::admin::AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
        for result in admin.delete_groups(&[group], &opts).await? {
            result.map_err(|(group, code)| anyhow::anyhow!("deleting group {group}: {code}"))?;
        }
        anyhow::Ok(())
    };
    if let Err(error) = deleted.await {
        tracing::warn!(
            error = format!("{error:#}"),
            group,
            "could not delete the replay's consumer group; it holds nothing and may be deleted by hand"
        );
    }
}
