//! Every source metric, recorded through the `metrics` facade under the names in [`METRICS`] (the
//! binary installs the Prometheus exporter; METRICS.md says how to read each). Labels are bounded:
//! `table` (the three source tables), `op` (an operation's label), `reason` (an error kind).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_util::MetricKind;

use scoresync_event::clock::{unix_micros, unix_seconds};
use scoresync_event::{ChangeEvent, SourceTable};

// Every metric name, used at the call sites and in [`METRICS`].
/// `scoresync_source_events_published_total`.
pub const EVENTS_PUBLISHED_TOTAL: &str = "scoresync_source_events_published_total";
/// `scoresync_source_bytes_published_total`.
pub const BYTES_PUBLISHED_TOTAL: &str = "scoresync_source_bytes_published_total";
/// `scoresync_source_transactions_total`.
pub const TRANSACTIONS_TOTAL: &str = "scoresync_source_transactions_total";
/// `scoresync_source_commit_to_ack_seconds`.
pub const COMMIT_TO_ACK: &str = "scoresync_source_commit_to_ack_seconds";
/// `scoresync_source_in_flight_events`.
pub const IN_FLIGHT_EVENTS: &str = "scoresync_source_in_flight_events";
/// `scoresync_source_restarts_total`.
pub const RESTARTS_TOTAL: &str = "scoresync_source_restarts_total";
/// `scoresync_source_heartbeats_total`.
pub const HEARTBEATS_TOTAL: &str = "scoresync_source_heartbeats_total";
/// `scoresync_source_snapshot_done`.
pub const SNAPSHOT_DONE: &str = "scoresync_source_snapshot_done";
/// `scoresync_source_confirmed_lsn_bytes`.
pub const CONFIRMED_LSN_BYTES: &str = "scoresync_source_confirmed_lsn_bytes";
/// `scoresync_source_last_progress_timestamp_seconds`.
pub const LAST_PROGRESS_TIMESTAMP_SECONDS: &str =
    "scoresync_source_last_progress_timestamp_seconds";

/// Name, type and help of every source metric.
pub const METRICS: &[(&str, MetricKind, &str)] = &[
    (
        EVENTS_PUBLISHED_TOTAL,
        MetricKind::Counter,
        "Change events enqueued on the change topic, by table and op (snapshot and backfill copies are op=\"snapshot\").",
    ),
    (
        BYTES_PUBLISHED_TOTAL,
        MetricKind::Counter,
        "Encoded bytes of the change events enqueued, by table and op.",
    ),
    (TRANSACTIONS_TOTAL, MetricKind::Counter, "Committed transactions streamed."),
    (
        COMMIT_TO_ACK,
        MetricKind::Histogram,
        "Seconds from PostgreSQL commit to Kafka acknowledgement, per streamed event, by table.",
    ),
    (IN_FLIGHT_EVENTS, MetricKind::Gauge, "Events awaiting Kafka acknowledgement."),
    (
        RESTARTS_TOTAL,
        MetricKind::Counter,
        "Restarts of the source from its slot after a transient error, by reason.",
    ),
    (HEARTBEATS_TOTAL, MetricKind::Counter, "Heartbeat messages written to the WAL."),
    (
        SNAPSHOT_DONE,
        MetricKind::Gauge,
        "1 once the initial snapshot is published (0 while it runs).",
    ),
    (
        CONFIRMED_LSN_BYTES,
        MetricKind::Gauge,
        "The LSN the source last recorded and confirmed to PostgreSQL, as a byte position.",
    ),
    (
        LAST_PROGRESS_TIMESTAMP_SECONDS,
        MetricKind::Gauge,
        "When the source last confirmed a position or had nothing awaiting acknowledgement (Unix seconds).",
    ),
];

/// Registers the source's counters at zero, so that rates and alerts have a series at once.
/// Called by [`crate::Source::run`].
pub fn register() {
    for name in [TRANSACTIONS_TOTAL, HEARTBEATS_TOTAL] {
        counter!(name).absolute(0);
    }
    for reason in crate::Error::RESTART_REASONS {
        counter!(RESTARTS_TOTAL, "reason" => reason).absolute(0);
    }
}

/// An event enqueued, `bytes` long.
pub fn published(event: &ChangeEvent, bytes: usize) {
    let (table, op) = (table_label(event), event.op().label());
    counter!(EVENTS_PUBLISHED_TOTAL, "table" => table, "op" => op).increment(1);
    counter!(BYTES_PUBLISHED_TOTAL, "table" => table, "op" => op).increment(bytes as u64);
}

/// The `table` label of `event`: a static name, so that counting an event allocates nothing.
pub fn table_label(event: &ChangeEvent) -> &'static str {
    SourceTable::from_name(&event.schema, &event.table).map_or("unknown", SourceTable::name)
}

/// A streamed event of `table` (its [`table_label`]), committed at `commit_time_us`, was
/// acknowledged by Kafka.
pub fn acknowledged(table: &'static str, commit_time_us: i64) {
    if commit_time_us > 0 {
        let seconds = (unix_micros() - commit_time_us).max(0) as f64 / 1e6;
        histogram!(COMMIT_TO_ACK, "table" => table).record(seconds);
    }
}

/// A transaction's commit streamed.
pub fn transaction() {
    counter!(TRANSACTIONS_TOTAL).increment(1);
}

/// Events awaiting acknowledgement, and whether Kafka acknowledged any since the last call:
/// either, or none waiting, counts as progress (a long transaction is acknowledged event by
/// event before its commit can be confirmed).
pub fn in_flight(events: usize, acknowledged: bool) {
    gauge!(IN_FLIGHT_EVENTS).set(events as f64);
    if events == 0 || acknowledged {
        progressed();
    }
}

/// The position recorded and confirmed to PostgreSQL.
pub fn confirmed(lsn: u64) {
    gauge!(CONFIRMED_LSN_BYTES).set(lsn as f64);
    progressed();
}

/// The source restarts from its slot after an error of kind `reason`.
pub fn restarted(reason: &'static str) {
    counter!(RESTARTS_TOTAL, "reason" => reason).increment(1);
}

/// A heartbeat written.
pub fn heartbeat() {
    counter!(HEARTBEATS_TOTAL).increment(1);
}

/// Whether the initial snapshot is published.
pub fn snapshot_done(done: bool) {
    gauge!(SNAPSHOT_DONE).set(f64::from(u8::from(done)));
}

/// Unix seconds of the source's last progress in this process (one source per process).
static LAST_PROGRESS: AtomicU64 = AtomicU64::new(0);

/// Why the source is stalled, if it is: no progress for longer than `limit` (counted from
/// `started`, Unix seconds, at the latest).
pub fn stalled(limit: Duration, started: u64) -> Option<String> {
    let idle = unix_seconds().saturating_sub(LAST_PROGRESS.load(Ordering::Relaxed).max(started));
    (idle > limit.as_secs())
        .then(|| format!("source: no progress for {idle} s (nothing confirmed)"))
}

/// The source made progress: a position confirmed, a snapshot chunk recorded, or nothing
/// waiting for Kafka.
pub fn progressed() {
    let now = unix_seconds();
    LAST_PROGRESS.store(now, Ordering::Relaxed);
    gauge!(LAST_PROGRESS_TIMESTAMP_SECONDS).set(now as f64);
}
