//! Lag sampled out of band: the replication slot (from `pg_replication_slots`, on an ordinary SQL
//! connection) and the sink group's lag per partition (committed offsets against the end, and the
//! age of the oldest message not committed). Neither reading goes through the source's stream or
//! the sink's consumer, so a stuck stream or a stopped sink still shows its lag; `scoresync
//! monitor` runs only this, beside the daemon, so the lag alerts fire while the daemon is down.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{counter, gauge};
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use scoresync_bus::offsets::{OffsetReader, PartitionLag};
use scoresync_source::connect::ConnectParams;
use scoresync_source::slot::{self, SlotLag};

use crate::config::Config;

/// Every `wal_status` PostgreSQL reports; `scoresync_slot_wal_status` has one series each.
pub const WAL_STATUSES: [&str; 4] = ["reserved", "extended", "unreserved", "lost"];

/// Name, type and help of every lag metric.
pub const METRICS: &[(&str, &str, &str)] = &[
    ("scoresync_slot_exists", "gauge", "1 while the replication slot exists, by slot."),
    ("scoresync_slot_active", "gauge", "1 while a walsender streams from the slot, by slot."),
    (
        "scoresync_slot_wal_retained_bytes",
        "gauge",
        "WAL the slot holds back on the server (current position minus restart_lsn), by slot.",
    ),
    (
        "scoresync_slot_unconfirmed_bytes",
        "gauge",
        "WAL written since the position the source last confirmed, by slot.",
    ),
    (
        "scoresync_slot_safe_wal_size_bytes",
        "gauge",
        "WAL that can still be written before the slot risks being lost (only with max_slot_wal_keep_size set), by slot.",
    ),
    (
        "scoresync_slot_wal_status",
        "gauge",
        "1 on the slot's current wal_status, by slot and status.",
    ),
    (
        "scoresync_slot_confirmed_lsn_bytes",
        "gauge",
        "The slot's confirmed_flush_lsn as a byte position, by slot.",
    ),
    ("scoresync_postgres_wal_lsn_bytes", "gauge", "The server's current WAL position in bytes."),
    (
        "scoresync_kafka_consumer_lag_messages",
        "gauge",
        "Messages of the change topic the sink group has not committed, by partition.",
    ),
    (
        "scoresync_kafka_consumer_lag_seconds",
        "gauge",
        "Age of the oldest change the sink group has not committed (0 when caught up), by partition.",
    ),
    (
        "scoresync_lag_sample_failures_total",
        "counter",
        "Lag samples that failed, by what was sampled (slot, kafka).",
    ),
];

/// Samples both lags every `[metrics] sample_interval_ms` until `shutdown`.
pub fn spawn(config: &Config, shutdown: CancellationToken) {
    for what in ["slot", "kafka"] {
        counter!("scoresync_lag_sample_failures_total", "what" => what).absolute(0);
    }
    let every = Duration::from_millis(config.metrics.sample_interval_ms);
    tokio::spawn(sample_slot(config.clone(), every, shutdown.clone()));
    tokio::spawn(sample_group(config.clone(), every, shutdown));
}

async fn sample_slot(config: Config, every: Duration, shutdown: CancellationToken) {
    let name = config.postgres.slot.clone();
    let mut sql = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while tokio::select! { _ = shutdown.cancelled() => false, _ = tick.tick() => true } {
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
                failed("slot", &format!("slot {name}: {error:#}"));
            }
            Err(_) => {
                sql = None;
                failed("slot", &format!("slot {name}: PostgreSQL did not answer"));
            }
        }
    }
}

/// Sets the slot gauges from one sample (`None`: the slot does not exist).
pub fn record_slot(name: &str, lag: Option<&SlotLag>) {
    let slot = || [("slot", name.to_owned())];
    gauge!("scoresync_slot_exists", &slot()).set(f64::from(u8::from(lag.is_some())));
    let Some(lag) = lag else {
        gauge!("scoresync_slot_active", &slot()).set(0.0);
        return;
    };
    gauge!("scoresync_slot_active", &slot()).set(f64::from(u8::from(lag.active)));
    gauge!("scoresync_postgres_wal_lsn_bytes").set(lag.current_lsn as f64);
    let optional = [
        ("scoresync_slot_wal_retained_bytes", lag.retained_bytes.map(|b| b as f64)),
        ("scoresync_slot_unconfirmed_bytes", lag.unconfirmed_bytes.map(|b| b as f64)),
        ("scoresync_slot_safe_wal_size_bytes", lag.safe_wal_size.map(|b| b as f64)),
        ("scoresync_slot_confirmed_lsn_bytes", lag.confirmed_flush_lsn.map(|l| l as f64)),
    ];
    for (metric, value) in optional {
        if let Some(value) = value {
            gauge!(metric, &slot()).set(value);
        }
    }
    for status in WAL_STATUSES {
        let on = lag.wal_status.as_deref() == Some(status);
        let labels = [("slot", name.to_owned()), ("status", status.to_owned())];
        gauge!("scoresync_slot_wal_status", &labels).set(f64::from(u8::from(on)));
    }
}

async fn sample_group(config: Config, every: Duration, shutdown: CancellationToken) {
    let (kafka, topic) = (config.kafka.clone(), config.kafka.change_topic.clone());
    let mut reader: Option<Arc<OffsetReader>> = None;
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while tokio::select! { _ = shutdown.cancelled() => false, _ = tick.tick() => true } {
        let (kafka, topic, open) = (kafka.clone(), topic.clone(), reader.clone());
        let sampled = tokio::task::spawn_blocking(move || {
            let reader = match open {
                Some(reader) => reader,
                None => Arc::new(OffsetReader::open(&kafka, &kafka.consumer_group, &topic)?),
            };
            let lag = reader.lag(unix_ms())?;
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
                failed("kafka", &format!("group {group}: {error:#}"));
            }
            Err(join) => failed("kafka", &join.to_string()),
        }
    }
}

/// Sets the consumer-lag gauges from one sample.
pub fn record_group(lag: &[PartitionLag]) {
    for p in lag {
        let partition = [("partition", p.partition.to_string())];
        gauge!("scoresync_kafka_consumer_lag_messages", &partition).set(p.lag as f64);
        gauge!("scoresync_kafka_consumer_lag_seconds", &partition).set(p.lag_seconds);
    }
}

fn failed(what: &'static str, error: &str) {
    counter!("scoresync_lag_sample_failures_total", "what" => what).increment(1);
    tracing::warn!(what, %error, "lag sample failed");
}

fn unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}
