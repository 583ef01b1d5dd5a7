//! What is sampled out of band: the replication slot's lag (from `pg_replication_slots`, on an
//! ordinary SQL connection), the sink group's lag per partition (committed offsets against the
//! end, and the age of the oldest message not committed), and the latest `scoresync verify`
//! result and `scoresync replay` and `scoresync backfill` progress (from the state topic, where
//! those commands leave them). None of them goes through the source's
//! stream or the sink's consumer, so a stuck stream or a stopped sink still shows its lag;
//! `scoresync monitor` runs only this, beside the daemon, so the lag alerts fire while the daemon
//! is down.
//!
//! To export another figure a command leaves on the state topic: a key function and a
//! serializable record beside the command (as `commands::verify::report::record_key` and
//! `Recorded`), a [`Watch`] for it in [`sample_state`], a `record_*` function here that sets its
//! gauges, declared in [`METRICS`] (and called in the unit test of `crate::metrics`).

use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, gauge};
use metrics_util::MetricKind;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use scoresync_bus::offsets::{OffsetReader, PartitionLag};
use scoresync_event::clock::{unix_millis, unix_seconds};
use scoresync_sink::verify::DriftKind;
use scoresync_source::backfill::BackfillProgress;
use scoresync_source::connect::ConnectParams;
use scoresync_source::slot::{self, SlotLag};
use scoresync_source::state::{Follower, Seen, Watch};

use crate::commands::{replay, verify};

use crate::commands::Role;
use crate::config::Config;

/// Every `wal_status` PostgreSQL reports; `scoresync_slot_wal_status` has one series each.
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

// Every metric name, used at the call sites and in [`METRICS`].
/// `scoresync_slot_exists`.
pub const SLOT_EXISTS: &str = "scoresync_slot_exists";
/// `scoresync_slot_active`.
pub const SLOT_ACTIVE: &str = "scoresync_slot_active";
/// `scoresync_slot_wal_retained_bytes`.
pub const SLOT_WAL_RETAINED_BYTES: &str = "scoresync_slot_wal_retained_bytes";
/// `scoresync_slot_unconfirmed_bytes`.
pub const SLOT_UNCONFIRMED_BYTES: &str = "scoresync_slot_unconfirmed_bytes";
/// `scoresync_slot_safe_wal_size_bytes`.
pub const SLOT_SAFE_WAL_SIZE_BYTES: &str = "scoresync_slot_safe_wal_size_bytes";
/// `scoresync_slot_wal_status`.
pub const SLOT_WAL_STATUS: &str = "scoresync_slot_wal_status";
/// `scoresync_slot_confirmed_lsn_bytes`.
pub const SLOT_CONFIRMED_LSN_BYTES: &str = "scoresync_slot_confirmed_lsn_bytes";
/// `scoresync_postgres_wal_lsn_bytes`.
pub const POSTGRES_WAL_LSN_BYTES: &str = "scoresync_postgres_wal_lsn_bytes";
/// `scoresync_kafka_consumer_lag_messages`.
pub const KAFKA_CONSUMER_LAG_MESSAGES: &str = "scoresync_kafka_consumer_lag_messages";
/// `scoresync_kafka_consumer_lag_seconds`.
pub const KAFKA_CONSUMER_LAG_SECONDS: &str = "scoresync_kafka_consumer_lag_seconds";
/// `scoresync_verify_drift_rows`.
pub const VERIFY_DRIFT_ROWS: &str = "scoresync_verify_drift_rows";
/// `scoresync_verify_last_run_timestamp_seconds`.
pub const VERIFY_LAST_RUN_TIMESTAMP_SECONDS: &str = "scoresync_verify_last_run_timestamp_seconds";
/// `scoresync_verify_unverified`.
pub const VERIFY_UNVERIFIED: &str = "scoresync_verify_unverified";
/// `scoresync_replay_messages_total`.
pub const REPLAY_MESSAGES_TOTAL: &str = "scoresync_replay_messages_total";
/// `scoresync_replay_messages_done`.
pub const REPLAY_MESSAGES_DONE: &str = "scoresync_replay_messages_done";
/// `scoresync_replay_running`.
pub const REPLAY_RUNNING: &str = "scoresync_replay_running";
/// `scoresync_backfill_cards_published`.
pub const BACKFILL_CARDS_PUBLISHED: &str = "scoresync_backfill_cards_published";
/// `scoresync_backfill_rows_published`.
pub const BACKFILL_ROWS_PUBLISHED: &str = "scoresync_backfill_rows_published";
/// `scoresync_backfill_done`.
pub const BACKFILL_DONE: &str = "scoresync_backfill_done";
/// `scoresync_backfill_last_update_timestamp_seconds`.
pub const BACKFILL_LAST_UPDATE_TIMESTAMP_SECONDS: &str =
    "scoresync_backfill_last_update_timestamp_seconds";
/// `scoresync_lag_sample_failures_total`.
pub const LAG_SAMPLE_FAILURES_TOTAL: &str = "scoresync_lag_sample_failures_total";

/// Name, type and help of every sampled metric.
pub const METRICS: &[(&str, MetricKind, &str)] = &[
    (SLOT_EXISTS, MetricKind::Gauge, "1 while the replication slot exists, by slot."),
    (SLOT_ACTIVE, MetricKind::Gauge, "1 while a walsender streams from the slot, by slot."),
    (
        SLOT_WAL_RETAINED_BYTES,
        MetricKind::Gauge,
        "WAL the slot holds back on the server (current position minus restart_lsn), by slot.",
    ),
    (
        SLOT_UNCONFIRMED_BYTES,
        MetricKind::Gauge,
        "WAL written since the position the source last confirmed, by slot.",
    ),
    (
        SLOT_SAFE_WAL_SIZE_BYTES,
        MetricKind::Gauge,
        "WAL that can still be written before the slot risks being lost (only with max_slot_wal_keep_size set), by slot.",
    ),
    (SLOT_WAL_STATUS, MetricKind::Gauge, "1 on the slot's current wal_status, by slot and status."),
    (
        SLOT_CONFIRMED_LSN_BYTES,
        MetricKind::Gauge,
        "The slot's confirmed_flush_lsn as a byte position, by slot.",
    ),
    (POSTGRES_WAL_LSN_BYTES, MetricKind::Gauge, "The server's current WAL position in bytes."),
    (
        KAFKA_CONSUMER_LAG_MESSAGES,
        MetricKind::Gauge,
        "Messages of the change topic the sink group has not committed, by partition.",
    ),
    (
        KAFKA_CONSUMER_LAG_SECONDS,
        MetricKind::Gauge,
        "Age of the oldest change the sink group has not committed (0 when caught up), by partition.",
    ),
    (
        VERIFY_DRIFT_ROWS,
        MetricKind::Gauge,
        "Rows the latest scoresync verify found drifted (after its repair), by table, shard and kind.",
    ),
    (
        VERIFY_LAST_RUN_TIMESTAMP_SECONDS,
        MetricKind::Gauge,
        "When the latest scoresync verify ended (Unix seconds).",
    ),
    (
        VERIFY_UNVERIFIED,
        MetricKind::Gauge,
        "1 when the latest scoresync verify could not judge every row (it exited 2).",
    ),
    (REPLAY_MESSAGES_TOTAL, MetricKind::Gauge, "Messages the latest scoresync replay reads."),
    (REPLAY_MESSAGES_DONE, MetricKind::Gauge, "Messages the latest scoresync replay has applied."),
    (
        REPLAY_RUNNING,
        MetricKind::Gauge,
        "1 while a scoresync replay runs (it reported within the last minute and has not ended).",
    ),
    (
        BACKFILL_CARDS_PUBLISHED,
        MetricKind::Gauge,
        "Scorecards the latest scoresync backfill has re-published.",
    ),
    (
        BACKFILL_ROWS_PUBLISHED,
        MetricKind::Gauge,
        "Rows the latest scoresync backfill has re-published.",
    ),
    (BACKFILL_DONE, MetricKind::Gauge, "1 once the latest scoresync backfill has finished."),
    (
        BACKFILL_LAST_UPDATE_TIMESTAMP_SECONDS,
        MetricKind::Gauge,
        "When the latest scoresync backfill last recorded its progress (Unix seconds).",
    ),
    (
        LAG_SAMPLE_FAILURES_TOTAL,
        MetricKind::Counter,
        "Samples that failed, by what was sampled (slot, kafka, state).",
    ),
];

/// What is sampled: the `what` label of `scoresync_lag_sample_failures_total`.
const SLOT: &str = "slot";
const KAFKA: &str = "kafka";
const STATE: &str = "state";

/// Starts, every `[metrics] sample_interval_ms` until `shutdown`, what `role` samples, and
/// registers their failure counters at zero:
/// - `run` and `monitor`: the slot, the consumer group and the state topic;
/// - `source`: the slot and the state topic (its hop, and the commands beside it);
/// - `sink`: nothing. Several sink processes would each ask the group coordinator for the same
///   figures (and tansu's answers slow down its rebalances); run `scoresync monitor` beside
///   them.
pub fn spawn(config: &Config, role: Role, shutdown: CancellationToken) {
    let every = Duration::from_millis(config.metrics.sample_interval_ms);
    let (slot_and_state, group) = match role {
        Role::Run | Role::Monitor => (true, true),
        Role::Source => (true, false),
        Role::Sink => (false, false),
    };
    if slot_and_state {
        for what in [SLOT, STATE] {
            counter!(LAG_SAMPLE_FAILURES_TOTAL, "what" => what).absolute(0);
        }
        tokio::spawn(sample_slot(config.clone(), every, shutdown.clone()));
        tokio::spawn(sample_state(config.clone(), every, shutdown.clone()));
    }
    if group {
        counter!(LAG_SAMPLE_FAILURES_TOTAL, "what" => KAFKA).absolute(0);
        tokio::spawn(sample_group(config.clone(), every, shutdown));
    }
}

async fn sample_slot(config: Config, every: Duration, shutdown: CancellationToken) {
    let name = config.postgres.slot.clone();
    let mut sql = None;
    let mut ticks = Ticks::new(every, shutdown);
    while ticks.next().await {
        let sampled = async {
            if sql.as_ref().is_none_or(|c: &tokio_postgres::Client| c.is_closed()) {
                let params = ConnectParams::parse(config.postgres.url.expose_secret())?;
                sql = Some(params.connect_sql().await?);
            }
            let client = sql.as_ref().ok_or_else(|| anyhow::anyhow!("no connection"))?;
            anyhow::Ok(slot::lag(client, &name).await?)
        };
        match tokio::time::timeout(every.max(Duration::from_secs(5)), sampled).await {
            Ok(Ok(lag)) => record_slot(&name, lag.as_ref()),
            Ok(Err(error)) => {
                sql = None;
                failed(SLOT, &format!("slot {name}: {error:#}"));
            }
            Err(_) => {
                sql = None;
                failed(SLOT, &format!("slot {name}: PostgreSQL did not answer"));
            }
        }
    }
}

/// Sets the slot gauges from one sample (`None`: the slot does not exist). A slot that is gone
/// or lost holds no WAL: its sizes go to 0 rather than keep their last values.
pub fn record_slot(name: &str, lag: Option<&SlotLag>) {
    let slot = || [("slot", name.to_owned())];
    let flag = |on: bool| f64::from(u8::from(on));
    gauge!(SLOT_EXISTS, &slot()).set(flag(lag.is_some()));
    gauge!(SLOT_ACTIVE, &slot()).set(flag(lag.is_some_and(|l| l.active)));
    let bytes = |value: Option<i64>| value.unwrap_or(0) as f64;
    gauge!(SLOT_WAL_RETAINED_BYTES, &slot()).set(bytes(lag.and_then(|l| l.retained_bytes)));
    gauge!(SLOT_UNCONFIRMED_BYTES, &slot()).set(bytes(lag.and_then(|l| l.unconfirmed_bytes)));
    for status in WAL_STATUSES {
        let on = lag.and_then(|l| l.wal_status.as_deref()) == Some(status);
        let labels = [("slot", name.to_owned()), ("status", status.to_owned())];
        gauge!(SLOT_WAL_STATUS, &labels).set(flag(on));
    }
    let Some(lag) = lag else { return };
    gauge!(POSTGRES_WAL_LSN_BYTES).set(lag.current_lsn as f64);
    if let Some(lsn) = lag.confirmed_flush_lsn {
        gauge!(SLOT_CONFIRMED_LSN_BYTES, &slot()).set(lsn as f64);
    }
    // NULL while max_slot_wal_keep_size is unlimited (no series then), and for a lost slot.
    let lost = lag.wal_status.as_deref() == Some("lost");
    if let Some(safe) = lag.safe_wal_size.or(lost.then_some(0)) {
        gauge!(SLOT_SAFE_WAL_SIZE_BYTES, &slot()).set(safe as f64);
    }
}

async fn sample_group(config: Config, every: Duration, shutdown: CancellationToken) {
    let (kafka, topic) = (config.kafka.clone(), config.kafka.change_topic.clone());
    let mut reader: Option<Arc<OffsetReader>> = None;
    let mut ticks = Ticks::new(every, shutdown);
    while ticks.next().await {
        let (kafka, topic, open) = (kafka.clone(), topic.clone(), reader.clone());
        let sampled = tokio::task::spawn_blocking(move || {
            let reader = match open {
                Some(reader) => reader,
                None => Arc::new(OffsetReader::open(&kafka, &kafka.consumer_group, &topic)?),
            };
            let lag = reader.lag(unix_millis())?;
            anyhow::Ok((reader, lag))
        })
        .await;
        match sampled {
            Ok(Ok((open, lag))) => {
                reader = Some(open);
                record_group(&lag);
            }
            Ok(Err(error)) => {
                reader = None;
                let group = &config.kafka.consumer_group;
                failed(KAFKA, &format!("group {group}: {error:#}"));
            }
            Err(join) => failed(KAFKA, &join.to_string()),
        }
    }
}

/// Sets the consumer-lag gauges from one sample.
pub fn record_group(lag: &[PartitionLag]) {
    for p in lag {
        let partition = [("partition", p.partition.to_string())];
        gauge!(KAFKA_CONSUMER_LAG_MESSAGES, &partition).set(p.lag as f64);
        gauge!(KAFKA_CONSUMER_LAG_SECONDS, &partition).set(p.lag_seconds);
    }
}

/// How long one look at the state topic may read (a first read of a long topic takes several).
const STATE_READ_BUDGET: Duration = Duration::from_secs(5);

/// Follows the state topic for the latest verify result, replay progress and backfill progress;
/// exports them only once it has read the topic to its end (older records would show old
/// values).
async fn sample_state(config: Config, every: Duration, shutdown: CancellationToken) {
    let slot = &config.postgres.slot;
    let verify = Watch::Key(verify::report::record_key(slot));
    let replay = Watch::Key(replay::record::record_key(slot));
    let backfill = Watch::Prefix(scoresync_source::backfill::progress_prefix(slot));
    let shards = config.clickhouse.shards.len();
    let mut follower: Option<Follower> = None;
    let mut ticks = Ticks::new(every, shutdown);
    while ticks.next().await {
        let kafka = config.kafka.clone();
        let watches = vec![verify.clone(), replay.clone(), backfill.clone()];
        let open = follower.take();
        let sampled = tokio::task::spawn_blocking(move || {
            let mut follower = match open {
                Some(follower) => follower,
                None => Follower::new(&kafka, watches)?,
            };
            let current = follower.poll(STATE_READ_BUDGET)?;
            anyhow::Ok((follower, current))
        })
        .await;
        let open = match sampled {
            // Until it has read the whole topic once, what it holds may be old: export nothing.
            Ok(Ok((open, false))) => {
                follower = Some(open);
                continue;
            }
            Ok(Ok((open, true))) => open,
            Ok(Err(error)) => {
                failed(STATE, &format!("state topic: {error:#}"));
                continue;
            }
            Err(join) => {
                failed(STATE, &join.to_string());
                continue;
            }
        };
        if let Some((recorded, _)) = parsed(&open, &verify, "verify result") {
            record_verify(&recorded, shards);
        }
        if let Some((recorded, _)) = parsed(&open, &replay, "replay progress") {
            record_replay(&recorded);
        }
        if let Some((progress, seen)) = parsed(&open, &backfill, "backfill progress") {
            record_backfill(&progress, seen.timestamp_ms);
        }
        follower = Some(open);
    }
}

/// The newest record `watch` matched, parsed (a record that does not parse counts as a failed
/// sample).
fn parsed<'a, T: serde::de::DeserializeOwned>(
    follower: &'a Follower,
    watch: &Watch,
    what: &str,
) -> Option<(T, &'a Seen)> {
    let seen = follower.latest(watch)?;
    let value = serde_json::from_slice(seen.payload.as_deref()?);
    value.map_err(|e| failed(STATE, &format!("{what}: {e}"))).ok().map(|v| (v, seen))
}

/// Sets the backfill gauges from the latest progress record of any backfill (written at
/// `written_ms`).
pub fn record_backfill(progress: &BackfillProgress, written_ms: Option<i64>) {
    gauge!(BACKFILL_CARDS_PUBLISHED).set(progress.cards as f64);
    gauge!(BACKFILL_ROWS_PUBLISHED).set(progress.rows as f64);
    gauge!(BACKFILL_DONE).set(f64::from(u8::from(progress.done)));
    if let Some(ms) = written_ms {
        gauge!(BACKFILL_LAST_UPDATE_TIMESTAMP_SECONDS).set(ms as f64 / 1e3);
    }
}

/// Sets the replay gauges from its latest progress record.
pub fn record_replay(recorded: &replay::record::Recorded) {
    gauge!(REPLAY_MESSAGES_TOTAL).set(recorded.messages_total as f64);
    gauge!(REPLAY_MESSAGES_DONE).set(recorded.messages_done as f64);
    let fresh = unix_seconds().saturating_sub(recorded.updated_unix) <= 60;
    let running = recorded.phase == replay::record::Phase::Running && fresh;
    gauge!(REPLAY_RUNNING).set(f64::from(u8::from(running)));
}

/// Sets the verify gauges from the latest result: every (table, shard, kind) gets a series, 0
/// where the run found nothing.
pub fn record_verify(recorded: &verify::report::Recorded, shards: usize) {
    for table in scoresync_event::SourceTable::ALL {
        for shard in 0..shards {
            for kind in DriftKind::ALL.into_iter().filter(|k| k.is_drift()).map(DriftKind::name) {
                let rows = recorded
                    .drift
                    .iter()
                    .filter(|d| d.table == table.name() && d.shard == shard && d.kind == kind)
                    .map(|d| d.rows)
                    .sum::<u64>();
                let labels = [
                    ("table", table.name().to_owned()),
                    ("shard", shard.to_string()),
                    ("kind", kind.to_owned()),
                ];
                gauge!(VERIFY_DRIFT_ROWS, &labels).set(rows as f64);
            }
        }
    }
    gauge!(VERIFY_LAST_RUN_TIMESTAMP_SECONDS).set(recorded.finished_unix as f64);
    gauge!(VERIFY_UNVERIFIED).set(f64::from(u8::from(recorded.exit == 2)));
}

/// The clock of a periodic task: a tick every `every` (the first at once; a late one is
/// delayed, not bunched) until `shutdown`.
pub struct Ticks {
    interval: tokio::time::Interval,
    shutdown: CancellationToken,
}

impl Ticks {
    /// Ticks every `every` until `shutdown`.
    pub fn new(every: Duration, shutdown: CancellationToken) -> Ticks {
        let mut interval = tokio::time::interval(every);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        Ticks { interval, shutdown }
    }

    /// Waits for the next tick: true, or false once shut down.
    pub async fn next(&mut self) -> bool {
        tokio::select! {
            biased;
            _ = self.shutdown.cancelled() => false,
            _ = self.interval.tick() => true,
        }
    }
}

fn failed(what: &'static str, error: &str) {
    counter!(LAG_SAMPLE_FAILURES_TOTAL, "what" => what).increment(1);
    tracing::warn!(what, %error, "lag sample failed");
}
