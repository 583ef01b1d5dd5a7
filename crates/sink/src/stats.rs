//! What the sink counts. Two audiences, one place: the `metrics` facade (every sink metric is
//! recorded here, under the names in [`METRICS`]; the binary installs the Prometheus exporter)
//! and [`SinkStats`], the structured state behind `/status` and `scoresync status` (parked keys,
//! refused inserts, split conversations), which no metric can carry.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::{counter, gauge, histogram};
use metrics_util::MetricKind;
use scoresync_event::clock::{unix_micros, unix_seconds};

use crate::park::ParkedSummary;

/// Every reason label of `scoresync_sink_parked_events`.
pub const PARK_REASONS: [&str; 7] = crate::park::ParkReason::LABELS;

// Every metric name, used at the call sites and in [`METRICS`].
/// `scoresync_sink_messages_consumed_total`.
pub const MESSAGES_CONSUMED_TOTAL: &str = "scoresync_sink_messages_consumed_total";
/// `scoresync_sink_events_applied_total`.
pub const EVENTS_APPLIED_TOTAL: &str = "scoresync_sink_events_applied_total";
/// `scoresync_sink_dead_lettered_total`.
pub const DEAD_LETTERED_TOTAL: &str = "scoresync_sink_dead_lettered_total";
/// `scoresync_sink_parked_events`.
pub const PARKED_EVENTS: &str = "scoresync_sink_parked_events";
/// `scoresync_sink_buffered_rows`.
pub const BUFFERED_ROWS: &str = "scoresync_sink_buffered_rows";
/// `scoresync_sink_buffered_bytes`.
pub const BUFFERED_BYTES: &str = "scoresync_sink_buffered_bytes";
/// `scoresync_sink_parked_bytes`.
pub const PARKED_BYTES: &str = "scoresync_sink_parked_bytes";
/// `scoresync_sink_paused`.
pub const PAUSED: &str = "scoresync_sink_paused";
/// `scoresync_sink_rows_written_total`.
pub const ROWS_WRITTEN_TOTAL: &str = "scoresync_sink_rows_written_total";
/// `scoresync_sink_inserts_total`.
pub const INSERTS_TOTAL: &str = "scoresync_sink_inserts_total";
/// `scoresync_sink_insert_failures_total`.
pub const INSERT_FAILURES_TOTAL: &str = "scoresync_sink_insert_failures_total";
/// `scoresync_sink_insert_duration_seconds`.
pub const INSERT_DURATION: &str = "scoresync_sink_insert_duration_seconds";
/// `scoresync_sink_batch_rows`.
pub const BATCH_ROWS: &str = "scoresync_sink_batch_rows";
/// `scoresync_sink_insert_rejected`.
pub const INSERT_REJECTED: &str = "scoresync_sink_insert_rejected";
/// `scoresync_sink_conversations_on_several_shards_total`.
pub const CONVERSATIONS_ON_SEVERAL_SHARDS_TOTAL: &str =
    "scoresync_sink_conversations_on_several_shards_total";
/// `scoresync_sink_commit_to_ack_seconds`.
pub const COMMIT_TO_ACK: &str = "scoresync_sink_commit_to_ack_seconds";
/// `scoresync_sink_applied_commit_timestamp_seconds`.
pub const APPLIED_COMMIT_TIMESTAMP_SECONDS: &str =
    "scoresync_sink_applied_commit_timestamp_seconds";
/// `scoresync_sink_last_progress_timestamp_seconds`.
pub const LAST_PROGRESS_TIMESTAMP_SECONDS: &str = "scoresync_sink_last_progress_timestamp_seconds";

/// Name, type and help of every sink metric (METRICS.md says how to read each).
pub const METRICS: &[(&str, MetricKind, &str)] = &[
    (MESSAGES_CONSUMED_TOTAL, MetricKind::Counter, "Kafka messages the sink consumed."),
    (
        EVENTS_APPLIED_TOTAL,
        MetricKind::Counter,
        "Change events applied (rows batched, or superseded).",
    ),
    (DEAD_LETTERED_TOTAL, MetricKind::Counter, "Poison events written to the dead-letter topic."),
    (PARKED_EVENTS, MetricKind::Gauge, "Events waiting to be applied, by reason."),
    (
        BUFFERED_ROWS,
        MetricKind::Gauge,
        "Rows not yet in ClickHouse: buffered, with the writers, move markers waiting, dead letters unacknowledged.",
    ),
    (
        BUFFERED_BYTES,
        MetricKind::Gauge,
        "Estimated bytes of the rows buffered or with the writers, not yet in ClickHouse.",
    ),
    (PARKED_BYTES, MetricKind::Gauge, "Encoded bytes of the parked events."),
    (
        PAUSED,
        MetricKind::Gauge,
        "1 while consumption is paused because buffers or the park are full.",
    ),
    (ROWS_WRITTEN_TOTAL, MetricKind::Counter, "Rows inserted, by shard and table."),
    (INSERTS_TOTAL, MetricKind::Counter, "Successful inserts, by shard and table."),
    (
        INSERT_FAILURES_TOTAL,
        MetricKind::Counter,
        "Failed insert attempts (retried), by shard and table.",
    ),
    (INSERT_DURATION, MetricKind::Histogram, "Seconds per successful insert, by shard and table."),
    (BATCH_ROWS, MetricKind::Histogram, "Rows per successful insert, by table."),
    (
        INSERT_REJECTED,
        MetricKind::Gauge,
        "1 while the shard refuses inserts into the table (the server answers with an error), by shard and table.",
    ),
    (
        CONVERSATIONS_ON_SEVERAL_SHARDS_TOTAL,
        MetricKind::Counter,
        "Distinct conversations found in more than one shard's conversations table (their scorecards route to the lowest shard).",
    ),
    (
        COMMIT_TO_ACK,
        MetricKind::Histogram,
        "Seconds from PostgreSQL commit to ClickHouse acknowledgement, per row written, by table.",
    ),
    (
        APPLIED_COMMIT_TIMESTAMP_SECONDS,
        MetricKind::Gauge,
        "PostgreSQL commit time (Unix seconds) of the newest change a shard acknowledged, by shard.",
    ),
    (
        LAST_PROGRESS_TIMESTAMP_SECONDS,
        MetricKind::Gauge,
        "When the sink last wrote a row or found nothing left to write (Unix seconds).",
    ),
];

/// Structured state of one sink for `/status`, and the recording of its metrics.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Events dead-lettered since start.
    pub dead_lettered: AtomicU64,
    /// Parked events per reason label, and the parked list (refreshed by the sink loop).
    pub parked: Mutex<ParkedSnapshot>,
    /// Rows buffered or in flight to ClickHouse.
    pub buffered_rows: AtomicU64,
    /// Estimated bytes of the rows buffered or in flight to ClickHouse.
    pub buffered_bytes: AtomicU64,
    /// Encoded bytes of the parked events.
    pub parked_bytes: AtomicU64,
    /// 1 while consumption is paused (buffers or park full).
    pub paused: AtomicU64,
    /// Unix seconds of the sink's last progress: a row written, or nothing left to write.
    pub last_progress: AtomicU64,
    /// Per (shard, table): inserts the server keeps refusing (it answered with an error, as
    /// opposed to not answering), retried for ever: the server's last error and since when.
    pub rejected: Mutex<BTreeMap<(usize, String), Rejected>>,
    /// Conversations found on more than one shard (the sink's `split` report): how many, and the
    /// latest.
    pub split_conversations: Mutex<SplitConversations>,
    /// The end-to-end lag of the last minute or two, per table, for `/status`.
    pub lag: Mutex<BTreeMap<&'static str, LagWindow>>,
    /// Per shard: since when its inserts fail, with no success since.
    pub failing_since: Mutex<BTreeMap<usize, std::time::Instant>>,
}

/// Seconds each half of a [`LagWindow`] covers.
const LAG_WINDOW: std::time::Duration = std::time::Duration::from_secs(60);

/// Commit-to-acknowledgement seconds of one table over the current and the previous minute: the
/// quantiles `scoresync status` shows without a Prometheus server. The sketch is metrics-util's
/// (DDSketch, bounded size); only the two-bucket rotation is ours, because the exporter keeps
/// its own windows private.
#[derive(Debug)]
pub struct LagWindow {
    current: metrics_util::storage::Summary,
    previous: metrics_util::storage::Summary,
    since: std::time::Instant,
}

impl Default for LagWindow {
    fn default() -> Self {
        LagWindow {
            current: metrics_util::storage::Summary::with_defaults(),
            previous: metrics_util::storage::Summary::with_defaults(),
            since: std::time::Instant::now(),
        }
    }
}

impl LagWindow {
    fn rotate(&mut self) {
        let age = self.since.elapsed();
        if age < LAG_WINDOW {
            return;
        }
        let empty = metrics_util::storage::Summary::with_defaults;
        let current = std::mem::replace(&mut self.current, empty());
        self.previous = if age < 2 * LAG_WINDOW { current } else { empty() };
        self.since = std::time::Instant::now();
    }

    /// p50, p99 and how many rows, over the last one to two minutes (`None`: no row).
    pub fn quantiles(&mut self) -> Option<LagQuantiles> {
        self.rotate();
        let mut both = self.previous.clone();
        both.merge(&self.current).ok()?;
        Some(LagQuantiles {
            p50: both.quantile(0.5)?,
            p99: both.quantile(0.99)?,
            rows: both.count(),
        })
    }
}

/// End-to-end lag quantiles of one table.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct LagQuantiles {
    /// Median seconds from commit to acknowledgement.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Rows measured.
    pub rows: usize,
}

/// Most conversations [`SplitConversations::latest`] keeps.
pub const SPLIT_EXAMPLES: usize = 5;

/// Conversations that several shards' `conversations` tables hold.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SplitConversations {
    /// Distinct conversations found split since the sink started (one that the report forgot,
    /// past its bound, counts again when met again).
    pub total: u64,
    /// The latest of them, newest last, at most [`SPLIT_EXAMPLES`].
    pub latest: VecDeque<SplitConversation>,
}

/// One conversation that several shards hold.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SplitConversation {
    /// `customer_id`.
    pub customer_id: String,
    /// `profile_id`.
    pub profile_id: String,
    /// `conversation_id`.
    pub conversation_id: String,
    /// The shards holding it, ascending; its scorecards route to the first.
    pub shards: Vec<usize>,
}

/// Inserts of one (shard, table) that the server refuses.
#[derive(Clone, Debug)]
pub struct Rejected {
    /// The server's last error.
    pub error: String,
    /// When the first refusal of this run of refusals came.
    pub since: std::time::Instant,
    /// Refused attempts so far.
    pub attempts: u64,
}

/// The parked events as last seen by the sink loop.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ParkedSnapshot {
    /// Count per reason label.
    pub by_reason: BTreeMap<String, usize>,
    /// Every parked event (key, reason, age).
    pub events: Vec<ParkedSummary>,
}

impl SinkStats {
    /// Registers the sink's series at zero for `shards` shards (unlabelled ones, each park
    /// reason, each shard and table), so that rates, failure panels and alerts have a series
    /// before the first event. Called by the process that runs the sink.
    pub fn register(shards: usize) {
        for name in [
            MESSAGES_CONSUMED_TOTAL,
            EVENTS_APPLIED_TOTAL,
            DEAD_LETTERED_TOTAL,
            CONVERSATIONS_ON_SEVERAL_SHARDS_TOTAL,
        ] {
            counter!(name).absolute(0);
        }
        for reason in PARK_REASONS {
            gauge!(PARKED_EVENTS, "reason" => reason).set(0.0);
        }
        for shard in 0..shards {
            for table in scoresync_event::SourceTable::ALL {
                let labels = [("shard", shard.to_string()), ("table", table.name().to_owned())];
                for name in [ROWS_WRITTEN_TOTAL, INSERTS_TOTAL, INSERT_FAILURES_TOTAL] {
                    counter!(name, &labels).absolute(0);
                }
                gauge!(INSERT_REJECTED, &labels).set(0.0);
            }
        }
    }

    /// `n` Kafka messages consumed.
    pub fn consumed(&self, n: usize) {
        counter!(MESSAGES_CONSUMED_TOTAL).increment(n as u64);
    }

    /// One change event applied.
    pub fn applied(&self) {
        counter!(EVENTS_APPLIED_TOTAL).increment(1);
    }

    /// One event dead-lettered.
    pub fn dead_lettered(&self) {
        self.dead_lettered.fetch_add(1, Ordering::Relaxed);
        counter!(DEAD_LETTERED_TOTAL).increment(1);
    }

    /// The sink loop's levels: rows and bytes not yet in ClickHouse, parked bytes, paused, and
    /// the parked events.
    pub fn levels(&self, rows: usize, bytes: usize, parked_bytes: usize, paused: bool) {
        self.buffered_rows.store(rows as u64, Ordering::Relaxed);
        self.buffered_bytes.store(bytes as u64, Ordering::Relaxed);
        self.parked_bytes.store(parked_bytes as u64, Ordering::Relaxed);
        self.paused.store(u64::from(paused), Ordering::Relaxed);
        gauge!(BUFFERED_ROWS).set(rows as f64);
        gauge!(BUFFERED_BYTES).set(bytes as f64);
        gauge!(PARKED_BYTES).set(parked_bytes as f64);
        gauge!(PAUSED).set(f64::from(u8::from(paused)));
        if rows == 0 {
            self.progressed();
        }
    }

    /// The parked events as the sink loop last saw them.
    pub fn parked(&self, snapshot: ParkedSnapshot) {
        for reason in PARK_REASONS {
            let n = snapshot.by_reason.get(reason).copied().unwrap_or(0);
            gauge!(PARKED_EVENTS, "reason" => reason).set(n as f64);
        }
        if let Ok(mut parked) = self.parked.lock() {
            *parked = snapshot;
        }
    }

    /// An insert of `rows` rows into `table` on `shard` succeeded after `seconds`, the rows
    /// committed in PostgreSQL at `commit_times_us` (Unix microseconds, 0 when unknown).
    pub fn inserted(
        &self,
        shard: usize,
        table: &'static str,
        seconds: f64,
        commit_times_us: impl Iterator<Item = i64>,
    ) {
        let labels = [("shard", shard.to_string()), ("table", table.to_owned())];
        let lag = histogram!(COMMIT_TO_ACK, "table" => table);
        let now_us = unix_micros();
        let (mut rows, mut newest) = (0_u64, 0);
        let mut windows = self.lag.lock().ok();
        let mut window = windows.as_mut().map(|w| w.entry(table).or_default());
        if let Some(w) = window.as_mut() {
            w.rotate();
        }
        for commit_us in commit_times_us {
            rows += 1;
            if commit_us > 0 {
                let seconds = (now_us - commit_us).max(0) as f64 / 1e6;
                lag.record(seconds);
                if let Some(w) = window.as_mut() {
                    w.current.add(seconds);
                }
                newest = newest.max(commit_us);
            }
        }
        drop(windows);
        counter!(ROWS_WRITTEN_TOTAL, &labels).increment(rows);
        counter!(INSERTS_TOTAL, &labels).increment(1);
        histogram!(INSERT_DURATION, &labels).record(seconds);
        histogram!(BATCH_ROWS, "table" => table).record(rows as f64);
        gauge!(INSERT_REJECTED, &labels).set(0.0);
        if newest > 0 {
            let applied = gauge!(APPLIED_COMMIT_TIMESTAMP_SECONDS, "shard" => shard.to_string());
            applied.set(newest as f64 / 1e6);
        }
        if let Ok(mut map) = self.rejected.lock() {
            map.remove(&(shard, table.to_owned()));
        }
        if let Ok(mut failing) = self.failing_since.lock() {
            failing.remove(&shard);
        }
        self.progressed();
    }

    /// An insert into `table` on `shard` failed; `refused` carries the server's error when it
    /// answered with one (as opposed to not answering).
    pub fn insert_failed(&self, shard: usize, table: &str, refused: Option<&str>) {
        let labels = [("shard", shard.to_string()), ("table", table.to_owned())];
        counter!(INSERT_FAILURES_TOTAL, &labels).increment(1);
        if let Ok(mut failing) = self.failing_since.lock() {
            failing.entry(shard).or_insert_with(std::time::Instant::now);
        }
        let Some(error) = refused else { return };
        gauge!(INSERT_REJECTED, &labels).set(1.0);
        if let Ok(mut map) = self.rejected.lock() {
            let entry = map.entry((shard, table.to_owned())).or_insert_with(|| Rejected {
                error: String::new(),
                since: std::time::Instant::now(),
                attempts: 0,
            });
            entry.error = error.to_owned();
            entry.attempts += 1;
        }
    }

    /// A conversation not met before was found on `split.shards`.
    pub fn conversation_split(&self, split: SplitConversation) {
        counter!(CONVERSATIONS_ON_SEVERAL_SHARDS_TOTAL).increment(1);
        if let Ok(mut seen) = self.split_conversations.lock() {
            seen.total += 1;
            if seen.latest.len() == SPLIT_EXAMPLES {
                seen.latest.pop_front();
            }
            seen.latest.push_back(split);
        }
    }

    /// End-to-end lag quantiles per table over the last minute or two.
    pub fn lag_quantiles(&self) -> BTreeMap<&'static str, LagQuantiles> {
        let Ok(mut windows) = self.lag.lock() else { return BTreeMap::new() };
        windows.iter_mut().filter_map(|(t, w)| Some((*t, w.quantiles()?))).collect()
    }

    /// Why the sink is stalled, if it is: the whole sink made no progress for longer than
    /// `limit` (nothing written while rows wait), or one shard's inserts have failed for longer.
    pub fn stalled(&self, limit: std::time::Duration, started: u64) -> Vec<String> {
        let mut why = Vec::new();
        let idle =
            unix_seconds().saturating_sub(self.last_progress.load(Ordering::Relaxed).max(started));
        if idle > limit.as_secs() {
            why.push(format!("sink: nothing written for {idle} s while rows wait"));
        }
        if let Ok(failing) = self.failing_since.lock() {
            for (shard, since) in failing.iter().filter(|(_, since)| since.elapsed() > limit) {
                let secs = since.elapsed().as_secs();
                why.push(format!("sink: every insert into shard {shard} failed for {secs} s"));
            }
        }
        why
    }

    /// The sink made progress (wrote rows, or has nothing left to write).
    fn progressed(&self) {
        let now = unix_seconds();
        self.last_progress.store(now, Ordering::Relaxed);
        gauge!(LAST_PROGRESS_TIMESTAMP_SECONDS).set(now as f64);
    }
}
