//! The exporter behind every metric scoresync exports, and the HTTP endpoint serving them.
//!
//! The crates record through the `metrics` facade under the names their own lists declare
//! ([`scoresync_sink::stats::METRICS`], [`scoresync_source::metrics::METRICS`],
//! [`crate::sampler::METRICS`]; call sites use the same name constants); [`install`] puts
//! `metrics-exporter-prometheus` behind the facade and describes them all, and [`serve`] answers
//! on `[metrics] listen` (axum). To add a metric: a constant and a line in its crate's list, a
//! row in METRICS.md (the unit test below holds the three equal), and, when it has no labels or
//! a fixed set, a zero registration in its role's `register` (the sampler's: `sampler::spawn`).
//!
//! - `GET /metrics`: Prometheus text format. Histograms (`*_seconds`, `scoresync_sink_batch_rows`)
//!   have fixed buckets, so PromQL's `histogram_quantile` works across processes.
//! - `GET /status`: the sink's parked events, refused inserts, split conversations, buffers and
//!   end-to-end lag quantiles per table, with the health verdict (what `scoresync status` shows).
//! - `GET /healthz`: 200 `ok` while every role this process runs has made progress within
//!   `[metrics] stall_seconds` or has nothing waiting; 503 naming the stalled role otherwise.
//!
//! Names follow `scoresync_<area>_<name>_<unit>`; labels are bounded (shard, table, op, reason,
//! partition, slot, status, what, kind). METRICS.md documents each metric; the unit test below
//! holds it equal to the lists, and the end-to-end test `observability` checks that everything a
//! running daemon and monitor export is documented.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use metrics_util::MetricKind;
use tokio_util::sync::CancellationToken;

use scoresync_event::clock::unix_seconds;
use scoresync_sink::SinkStats;

/// Bucket bounds of every `*_seconds` histogram: 5 ms to an hour, for lags that are milliseconds
/// when in sync and minutes through an outage.
const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
    1800.0, 3600.0,
];
/// Bucket bounds of `scoresync_sink_batch_rows`.
const ROWS_BUCKETS: &[f64] =
    &[1.0, 10.0, 100.0, 500.0, 1_000.0, 5_000.0, 10_000.0, 50_000.0, 100_000.0];
/// How often histogram samples are folded into their buckets.
const UPKEEP: Duration = Duration::from_secs(5);

/// Name, type and help of every metric.
pub fn all() -> impl Iterator<Item = &'static (&'static str, MetricKind, &'static str)> {
    scoresync_source::metrics::METRICS
        .iter()
        .chain(crate::sampler::METRICS)
        .chain(scoresync_sink::stats::METRICS)
}

fn builder() -> PrometheusBuilder {
    PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(scoresync_sink::stats::BATCH_ROWS.into()),
                ROWS_BUCKETS,
            )
        })
        .expect("bucket lists are not empty")
}

/// Installs the Prometheus recorder behind the `metrics` facade (once per process) and describes
/// every metric. Each role registers its own series at zero when it starts (so `scoresync
/// monitor` exports only what it samples).
pub fn install() -> anyhow::Result<PrometheusHandle> {
    let handle = builder().install_recorder()?;
    describe();
    Ok(handle)
}

fn describe() {
    for (name, kind, help) in all() {
        match kind {
            MetricKind::Counter => metrics::describe_counter!(*name, *help),
            MetricKind::Gauge => metrics::describe_gauge!(*name, *help),
            MetricKind::Histogram => metrics::describe_histogram!(*name, *help),
        }
    }
}

/// What one process runs, for `/status` and `/healthz`.
#[derive(Clone)]
pub struct Roles {
    /// The sink's state, when this process runs the sink.
    pub sink: Option<Arc<SinkStats>>,
    /// Whether this process runs the source.
    pub source: bool,
    /// How long a role may go without progress while work waits.
    pub stall: Duration,
}

#[derive(Clone)]
struct Endpoint {
    handle: PrometheusHandle,
    roles: Roles,
    started: u64,
}

/// Folds histogram samples into their buckets every few seconds until `shutdown`, whether or not
/// anyone scrapes (the exporter keeps every sample until then: without this, memory grows).
pub fn upkeep(handle: PrometheusHandle, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut ticks = crate::sampler::Ticks::new(UPKEEP, shutdown);
        while ticks.next().await {
            handle.run_upkeep();
        }
    });
}

/// Serves `/metrics`, `/status` and `/healthz` on `listen` until `shutdown`.
pub async fn serve(
    listen: &str,
    handle: PrometheusHandle,
    roles: Roles,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another scoresync process on this host? give each process its own [metrics] \
             listen, e.g. SCORESYNC__METRICS__LISTEN=127.0.0.1:9465)"
        } else {
            ""
        };
        anyhow::anyhow!("metrics.listen {listen}: {e}{hint}")
    })?;
    tracing::info!(%listen, "serving /metrics, /status and /healthz");
    let endpoint = Endpoint { handle, roles, started: unix_seconds() };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/status", get(status))
        .route("/healthz", get(healthz))
        .with_state(endpoint);
    tokio::spawn(async move {
        let served =
            axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned()).await;
        if let Err(error) = served {
            tracing::warn!(%error, "metrics endpoint stopped");
        }
    });
    Ok(())
}

async fn metrics_text(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], endpoint.handle.render())
}

async fn status(State(endpoint): State<Endpoint>) -> axum::Json<serde_json::Value> {
    let mut doc = match &endpoint.roles.sink {
        Some(stats) => sink_status(stats),
        None => serde_json::json!({}),
    };
    doc["health"] = serde_json::json!(endpoint.stalled());
    axum::Json(doc)
}

async fn healthz(State(endpoint): State<Endpoint>) -> impl IntoResponse {
    let stalled = endpoint.stalled();
    if stalled.is_empty() {
        (StatusCode::OK, "ok\n".to_owned())
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, format!("{}\n", stalled.join("\n")))
    }
}

impl Endpoint {
    /// One line per role that has had work waiting without progress for longer than allowed.
    fn stalled(&self) -> Vec<String> {
        let limit = self.roles.stall;
        let mut stalled = Vec::new();
        if self.roles.source {
            stalled.extend(scoresync_source::metrics::stalled(limit, self.started));
        }
        if let Some(sink) = &self.roles.sink {
            stalled.extend(sink.stalled(limit, self.started));
        }
        stalled
    }
}

/// The sink's part of `/status`.
pub fn sink_status(stats: &SinkStats) -> serde_json::Value {
    use std::sync::atomic::Ordering;
    let parked = stats.parked.lock().map(|p| p.clone()).unwrap_or_default();
    let rejected: Vec<serde_json::Value> = stats
        .rejected
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|((shard, table), r)| {
            serde_json::json!({
                "shard": shard,
                "table": table,
                "error": r.error,
                "attempts": r.attempts,
                "seconds": r.since.elapsed().as_secs(),
            })
        })
        .collect();
    let split = stats.split_conversations.lock().map(|s| s.clone()).unwrap_or_default();
    serde_json::json!({
        "rejected_inserts": rejected,
        "conversations_on_several_shards": split,
        "parked": parked,
        "buffered_rows": stats.buffered_rows.load(Ordering::Relaxed),
        "buffered_bytes": stats.buffered_bytes.load(Ordering::Relaxed),
        "parked_bytes": stats.parked_bytes.load(Ordering::Relaxed),
        "paused": stats.paused.load(Ordering::Relaxed) == 1,
        "dead_lettered_total": stats.dead_lettered.load(Ordering::Relaxed),
        "commit_to_ack_seconds": stats.lag_quantiles(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Renders with a recorder of the test's own (the global one belongs to the binary).
    fn rendered(record: impl FnOnce()) -> String {
        let recorder = builder().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe();
            record();
        });
        handle.run_upkeep();
        handle.render()
    }

    #[test]
    fn every_exported_metric_is_declared_and_documented() {
        let stats = SinkStats::default();
        let text = rendered(|| {
            SinkStats::register(2);
            scoresync_source::metrics::register();
            stats.inserted(1, "scores", 0.5, [1_i64, 2].into_iter());
            stats.insert_failed(0, "scores", Some("refused"));
            stats.levels(3, 300, 0, false);
            scoresync_source::metrics::acknowledged("scores", 1);
            crate::sampler::record_slot("slot", None);
            let recorded = crate::commands::verify::report::Recorded {
                finished_unix: 1,
                filter: String::new(),
                exit: 1,
                drift: vec![crate::commands::verify::report::DriftCount {
                    table: "scores".into(),
                    shard: 1,
                    kind: "missing".into(),
                    rows: 3,
                }],
            };
            crate::sampler::record_verify(&recorded, 2);
            crate::sampler::record_replay(&crate::commands::replay::record::Recorded {
                group: "g".into(),
                started_unix: 1,
                updated_unix: 2,
                messages_total: 10,
                messages_done: 4,
                phase: crate::commands::replay::record::Phase::Stopped,
            });
            let backfilled = scoresync_source::backfill::BackfillProgress {
                cards: 2,
                rows: 20,
                done: true,
                ..Default::default()
            };
            crate::sampler::record_backfill(&backfilled, Some(1_000));
        });
        // METRICS.md's tables: first column the name, second the type; the same set as declared.
        let documented: std::collections::BTreeMap<&str, &str> =
            include_str!("../../../METRICS.md")
                .lines()
                .filter(|l| l.starts_with("| `scoresync_"))
                .map(|row| {
                    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
                    (cells[1].trim_matches('`'), cells[2])
                })
                .collect();
        let kind_name = |kind: &MetricKind| match kind {
            MetricKind::Counter => "counter",
            MetricKind::Gauge => "gauge",
            MetricKind::Histogram => "histogram",
        };
        for (name, kind, _) in all() {
            assert_eq!(documented.get(name), Some(&kind_name(kind)), "{name} in METRICS.md");
        }
        assert_eq!(documented.len(), all().count(), "METRICS.md documents undeclared metrics");
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.is_empty()) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| all().any(|(n, k, _)| n == b && *k == MetricKind::Histogram))
                .unwrap_or(name);
            assert!(all().any(|(n, _, _)| *n == base), "{name} exported but not declared");
        }
        assert!(
            text.contains("scoresync_sink_rows_written_total{shard=\"1\",table=\"scores\"} 2"),
            "{text}"
        );
        assert!(
            text.contains(
                "scoresync_sink_commit_to_ack_seconds_bucket{table=\"scores\",le=\"+Inf\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("scoresync_sink_insert_rejected{shard=\"0\",table=\"scores\"} 1"));
        assert!(text.contains("\nscoresync_replay_messages_done 4\n"), "{text}");
        assert!(text.contains("\nscoresync_replay_running 0\n"), "{text}");
        assert!(
            text.contains(
                "scoresync_verify_drift_rows{table=\"scores\",shard=\"1\",kind=\"missing\"} 3"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "scoresync_verify_drift_rows{table=\"scores\",shard=\"0\",kind=\"missing\"} 0"
            ),
            "{text}"
        );
    }

    #[test]
    fn split_conversations_are_counted_and_listed() {
        let stats = SinkStats::default();
        let text = rendered(|| {
            stats.conversation_split(scoresync_sink::stats::SplitConversation {
                customer_id: "c".into(),
                profile_id: "p".into(),
                conversation_id: "conv".into(),
                shards: vec![0, 1],
            })
        });
        assert!(
            text.contains("\nscoresync_sink_conversations_on_several_shards_total 1\n"),
            "{text}"
        );
        let doc = sink_status(&stats);
        let split = &doc["conversations_on_several_shards"];
        assert_eq!(split["total"], 1);
        assert_eq!(split["latest"][0]["conversation_id"], "conv");
        assert_eq!(split["latest"][0]["shards"], serde_json::json!([0, 1]));
    }

    #[test]
    fn lag_quantiles_reach_status() {
        let stats = SinkStats::default();
        let now_us = (unix_seconds() * 1_000_000) as i64;
        rendered(|| {
            let commits = (0..100).map(|i| now_us - if i < 99 { 1_000_000 } else { 30_000_000 });
            stats.inserted(0, "scorecards", 0.1, commits);
        });
        let lag = &sink_status(&stats)["commit_to_ack_seconds"]["scorecards"];
        assert_eq!(lag["rows"], 100);
        let (p50, p99) = (lag["p50"].as_f64().unwrap_or(0.0), lag["p99"].as_f64().unwrap_or(0.0));
        assert!((0.9..3.0).contains(&p50), "{lag}");
        assert!(p99 >= 0.9, "{lag}");
    }
}
