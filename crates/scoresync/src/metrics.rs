//! Every metric scoresync exports, defined in this one place, and the HTTP endpoint serving them.
//!
//! `GET /metrics`: Prometheus text format. `GET /status`: the sink's parked events and buffers as
//! JSON (what `scoresync status` shows). `GET /healthz`: `ok`. Names follow
//! `scoresync_<area>_<name>_<unit>`; labels are bounded (shard, table, reason). METRICS.md
//! documents each metric and how to read it; a test checks the two agree.

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use scoresync_sink::SinkStats;

/// Name, type and help of every metric, in exposition order.
pub const METRICS: &[(&str, &str, &str)] = &[
    ("scoresync_sink_messages_consumed_total", "counter", "Kafka messages the sink consumed."),
    (
        "scoresync_sink_events_applied_total",
        "counter",
        "Change events applied (rows batched, or superseded).",
    ),
    (
        "scoresync_sink_dead_lettered_total",
        "counter",
        "Poison events written to the dead-letter topic.",
    ),
    ("scoresync_sink_parked_events", "gauge", "Events waiting to be applied, by reason."),
    (
        "scoresync_sink_buffered_rows",
        "gauge",
        "Rows not yet in ClickHouse: buffered, with the writers, move markers waiting, dead letters unacknowledged.",
    ),
    (
        "scoresync_sink_buffered_bytes",
        "gauge",
        "Estimated bytes of the rows buffered or with the writers, not yet in ClickHouse.",
    ),
    ("scoresync_sink_parked_bytes", "gauge", "Encoded bytes of the parked events."),
    (
        "scoresync_sink_paused",
        "gauge",
        "1 while consumption is paused because buffers or the park are full.",
    ),
    ("scoresync_sink_rows_written_total", "counter", "Rows inserted, by shard and table."),
    ("scoresync_sink_inserts_total", "counter", "Successful inserts, by shard and table."),
    (
        "scoresync_sink_insert_failures_total",
        "counter",
        "Failed insert attempts (retried), by shard and table.",
    ),
    (
        "scoresync_sink_insert_seconds_total",
        "counter",
        "Seconds spent in successful inserts, by shard and table.",
    ),
    (
        "scoresync_sink_insert_rejected",
        "gauge",
        "1 while the shard refuses inserts into the table (the server answers with an error), by shard and table.",
    ),
    (
        "scoresync_sink_conversations_on_several_shards_total",
        "counter",
        "Distinct conversations found in more than one shard's conversations table (their scorecards route to the lowest shard).",
    ),
    (
        "scoresync_sink_commit_to_ack_seconds",
        "gauge",
        "Seconds from PostgreSQL commit to ClickHouse acknowledgement of the newest row written, by table.",
    ),
];

/// Renders the Prometheus text exposition of the sink's stats.
pub fn render(stats: &SinkStats) -> String {
    let mut out = String::new();
    let header = |out: &mut String, name: &str| {
        if let Some((_, kind, help)) = METRICS.iter().find(|(n, _, _)| *n == name) {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        }
    };
    for (name, value) in [
        ("scoresync_sink_messages_consumed_total", stats.messages_consumed.load(Ordering::Relaxed)),
        ("scoresync_sink_events_applied_total", stats.events_applied.load(Ordering::Relaxed)),
        ("scoresync_sink_dead_lettered_total", stats.dead_lettered.load(Ordering::Relaxed)),
    ] {
        header(&mut out, name);
        let _ = writeln!(out, "{name} {value}");
    }
    header(&mut out, "scoresync_sink_parked_events");
    let by_reason = stats.parked.lock().map(|p| p.by_reason.clone()).unwrap_or_default();
    for reason in scoresync_sink::stats::PARK_REASONS {
        let n = by_reason.get(reason).copied().unwrap_or(0);
        let _ = writeln!(out, "scoresync_sink_parked_events{{reason=\"{reason}\"}} {n}");
    }
    header(&mut out, "scoresync_sink_buffered_rows");
    let _ = writeln!(
        out,
        "scoresync_sink_buffered_rows {}",
        stats.buffered_rows.load(Ordering::Relaxed)
    );
    header(&mut out, "scoresync_sink_buffered_bytes");
    let _ = writeln!(
        out,
        "scoresync_sink_buffered_bytes {}",
        stats.buffered_bytes.load(Ordering::Relaxed)
    );
    header(&mut out, "scoresync_sink_parked_bytes");
    let _ =
        writeln!(out, "scoresync_sink_parked_bytes {}", stats.parked_bytes.load(Ordering::Relaxed));
    header(&mut out, "scoresync_sink_paused");
    let _ = writeln!(out, "scoresync_sink_paused {}", stats.paused.load(Ordering::Relaxed));
    let inserts = stats.inserts.lock().map(|m| m.clone()).unwrap_or_default();
    type Field = fn(&scoresync_sink::stats::InsertStats) -> String;
    let per_shard: [(&str, Field); 4] = [
        ("scoresync_sink_rows_written_total", |s| s.rows.to_string()),
        ("scoresync_sink_inserts_total", |s| s.inserts.to_string()),
        ("scoresync_sink_insert_failures_total", |s| s.failures.to_string()),
        ("scoresync_sink_insert_seconds_total", |s| format!("{:.6}", s.seconds)),
    ];
    for (name, value) in per_shard {
        header(&mut out, name);
        for ((shard, table), s) in &inserts {
            let _ = writeln!(out, "{name}{{shard=\"{shard}\",table=\"{table}\"}} {}", value(s));
        }
    }
    header(&mut out, "scoresync_sink_insert_rejected");
    let rejected = stats.rejected.lock().map(|m| m.clone()).unwrap_or_default();
    for (shard, table) in inserts.keys() {
        let refused = u8::from(rejected.contains_key(&(*shard, table.clone())));
        let _ = writeln!(
            out,
            "scoresync_sink_insert_rejected{{shard=\"{shard}\",table=\"{table}\"}} {refused}"
        );
    }
    header(&mut out, "scoresync_sink_conversations_on_several_shards_total");
    let split = stats.split_conversations.lock().map(|s| s.total).unwrap_or_default();
    let _ = writeln!(out, "scoresync_sink_conversations_on_several_shards_total {split}");
    header(&mut out, "scoresync_sink_commit_to_ack_seconds");
    let lag = stats.commit_to_ack_seconds.lock().map(|m| m.clone()).unwrap_or_default();
    for (table, seconds) in lag {
        let _ =
            writeln!(out, "scoresync_sink_commit_to_ack_seconds{{table=\"{table}\"}} {seconds:.3}");
    }
    out
}

/// The `/status` document.
pub fn status_json(stats: &SinkStats) -> String {
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
    let doc = serde_json::json!({
        "rejected_inserts": rejected,
        "conversations_on_several_shards": split,
        "parked": parked,
        "buffered_rows": stats.buffered_rows.load(Ordering::Relaxed),
        "buffered_bytes": stats.buffered_bytes.load(Ordering::Relaxed),
        "parked_bytes": stats.parked_bytes.load(Ordering::Relaxed),
        "paused": stats.paused.load(Ordering::Relaxed) == 1,
        "dead_lettered_total": stats.dead_lettered.load(Ordering::Relaxed),
    });
    doc.to_string()
}

/// Serves `/metrics`, `/status` and `/healthz` on `listen` until `shutdown`.
pub async fn serve(
    listen: String,
    stats: Arc<SinkStats>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let listener = TcpListener::bind(&listen)
        .await
        .map_err(|e| anyhow::anyhow!("metrics.listen {listen}: {e}"))?;
    tracing::info!(%listen, "serving /metrics and /status");
    tokio::spawn(async move {
        loop {
            let (mut socket, _) = tokio::select! {
                _ = shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(error) => {
                        tracing::warn!(%error, "metrics endpoint accept failed");
                        continue;
                    }
                },
            };
            let stats = Arc::clone(&stats);
            tokio::spawn(async move {
                let mut request = vec![0_u8; 4096];
                let n = match tokio::time::timeout(
                    std::time::Duration::from_secs(5),
                    socket.read(&mut request),
                )
                .await
                {
                    Ok(Ok(n)) => n,
                    _ => return,
                };
                let line = String::from_utf8_lossy(&request[..n]);
                let path = line.split_whitespace().nth(1).unwrap_or("/");
                let (status, content_type, body) = match path {
                    "/metrics" => ("200 OK", "text/plain; version=0.0.4", render(&stats)),
                    "/status" => ("200 OK", "application/json", status_json(&stats)),
                    "/healthz" => ("200 OK", "text/plain", "ok\n".to_owned()),
                    _ => ("404 Not Found", "text/plain", "not found\n".to_owned()),
                };
                let response = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = socket.write_all(response.as_bytes()).await;
                let _ = socket.shutdown().await;
            });
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rendered_metric_is_declared_and_documented() {
        let stats = SinkStats::default();
        stats.insert(1, "scores", 10, Some(0.5));
        let text = render(&stats);
        let documented = include_str!("../../../METRICS.md");
        for (name, _, _) in METRICS {
            assert!(text.contains(&format!("# TYPE {name} ")), "{name} not rendered");
            assert!(documented.contains(name), "{name} missing from METRICS.md");
        }
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            assert!(METRICS.iter().any(|(n, _, _)| *n == name), "{name} rendered but not declared");
        }
        assert!(
            text.contains("scoresync_sink_rows_written_total{shard=\"1\",table=\"scores\"} 10"),
            "{text}"
        );
    }

    #[test]
    fn split_conversations_are_counted_and_listed() {
        let stats = SinkStats::default();
        assert!(
            render(&stats).contains("\nscoresync_sink_conversations_on_several_shards_total 0\n")
        );
        stats.conversation_split(scoresync_sink::stats::SplitConversation {
            customer_id: "c".into(),
            profile_id: "p".into(),
            conversation_id: "conv".into(),
            shards: vec![0, 1],
        });
        let text = render(&stats);
        assert!(
            text.contains("\nscoresync_sink_conversations_on_several_shards_total 1\n"),
            "{text}"
        );
        let doc: serde_json::Value = serde_json::from_str(&status_json(&stats)).expect("json");
        let split = &doc["conversations_on_several_shards"];
        assert_eq!(split["total"], 1);
        assert_eq!(split["latest"][0]["conversation_id"], "conv");
        assert_eq!(split["latest"][0]["shards"], serde_json::json!([0, 1]));
    }
}
