//! `scoresync status [--json]`: where the pipeline stands. The replication slot (active,
//! confirmed position, bytes of WAL behind), the source's pipeline record (snapshot done, and why
//! the source last halted, if it did), the sink group's lag per partition, the dead-letter
//! count, and, from the running daemon's `/status`, what is parked and why, inserts a shard
//! refuses, and conversations found on several shards.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use scoresync_bus::offsets::OffsetReader;
use scoresync_source::connect::ConnectParams;

use crate::config::Config;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Prints the status; exits 0 when every part could be read.
pub async fn run(config: &Config, as_json: bool) -> anyhow::Result<ExitCode> {
    let slot = slot_status(config).await.unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    let source =
        source_status(config).await.unwrap_or_else(|e| json!({ "error": format!("{e:#}") }));
    let kafka = {
        let cfg = config.clone();
        tokio::task::spawn_blocking(move || kafka_status(&cfg))
            .await?
            .unwrap_or_else(|e| json!({ "error": format!("{e:#}") }))
    };
    let sink = sink_status(&config.metrics.listen).await.unwrap_or_else(
        |e| json!({ "error": format!("no sink answering at {}: {e:#}", config.metrics.listen) }),
    );
    let doc = json!({ "slot": slot, "source": source, "kafka": kafka, "sink": sink });
    if as_json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_human(&doc);
    }
    let failed = ["slot", "source", "kafka", "sink"].iter().any(|k| doc[k].get("error").is_some());
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

async fn slot_status(config: &Config) -> anyhow::Result<Value> {
    let params = ConnectParams::parse(config.postgres.url.expose_secret())?;
    let sql = tokio::time::timeout(TIMEOUT, params.connect_sql()).await.context("timed out")??;
    let row = sql
        .query_opt(
            "SELECT active, confirmed_flush_lsn::text, restart_lsn::text, wal_status, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&config.postgres.slot],
        )
        .await?;
    Ok(match row {
        None => json!({ "slot": config.postgres.slot, "exists": false }),
        Some(r) => json!({
            "slot": config.postgres.slot,
            "exists": true,
            "active": r.get::<_, bool>(0),
            "confirmed_flush_lsn": r.get::<_, Option<String>>(1),
            "restart_lsn": r.get::<_, Option<String>>(2),
            "wal_status": r.get::<_, Option<String>>(3),
            "lag_bytes": r.get::<_, Option<i64>>(4),
        }),
    })
}

/// The source's pipeline record on the state topic (it outlives the process: a halted source
/// says why here).
async fn source_status(config: &Config) -> anyhow::Result<Value> {
    let state = scoresync_source::state::StateStore::new(&config.kafka)?;
    let record = tokio::time::timeout(TIMEOUT, state.load(&config.postgres.slot))
        .await
        .context("timed out reading the state topic")??;
    Ok(match record {
        None => json!({ "record": false }),
        Some(r) => json!({
            "record": true,
            "confirmed_lsn": r.confirmed_lsn.to_string(),
            "snapshot_done": r.snapshot.done,
            "halted": r.halted,
        }),
    })
}

fn kafka_status(config: &Config) -> anyhow::Result<Value> {
    let kafka = &config.kafka;
    let topic = kafka.change_topic.as_str();
    let reader = OffsetReader::open(kafka, &kafka.consumer_group, topic)?;
    let committed = reader.committed()?;
    let mut rows = Vec::new();
    let mut total_lag = 0;
    for (p, (low, high)) in reader.watermarks()? {
        let at = committed.get(&p).copied().flatten();
        let lag = high - at.unwrap_or(low).max(low);
        total_lag += lag;
        rows.push(json!({ "partition": p, "committed": at, "high_watermark": high, "lag": lag }));
    }
    let dlq = kafka.dlq_topic.as_str();
    let dead_letters = match OffsetReader::open(kafka, &kafka.consumer_group, dlq) {
        Ok(reader) => reader.messages()?,
        Err(scoresync_bus::Error::MissingTopic { .. }) => 0,
        Err(error) => return Err(error.into()),
    };
    Ok(json!({
        "group": kafka.consumer_group,
        "topic": topic,
        "lag": total_lag,
        "partitions": rows,
        "dead_letter_topic": dlq,
        "dead_letters": dead_letters,
    }))
}

/// GET /status from the running daemon.
async fn sink_status(listen: &str) -> anyhow::Result<Value> {
    anyhow::ensure!(!listen.is_empty(), "metrics.listen is empty");
    let mut stream = tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(listen))
        .await
        .context("timed out")??;
    stream
        .write_all(
            format!("GET /status HTTP/1.1\r\nHost: {listen}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await?;
    let mut response = Vec::new();
    tokio::time::timeout(TIMEOUT, stream.read_to_end(&mut response))
        .await
        .context("timed out")??;
    let text = String::from_utf8_lossy(&response);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b).context("no HTTP body")?;
    Ok(serde_json::from_str(body)?)
}

fn print_human(doc: &Value) {
    let slot = &doc["slot"];
    match slot.get("error") {
        Some(e) => println!("slot:        error: {}", e.as_str().unwrap_or_default()),
        None if slot["exists"] == false => {
            println!("slot:        {} MISSING", slot["slot"].as_str().unwrap_or_default())
        }
        None => println!(
            "slot:        {} active={} confirmed={} wal_status={} lag={} bytes",
            slot["slot"].as_str().unwrap_or_default(),
            slot["active"],
            slot["confirmed_flush_lsn"].as_str().unwrap_or("-"),
            slot["wal_status"].as_str().unwrap_or("-"),
            slot["lag_bytes"]
        ),
    }
    let source = &doc["source"];
    match (source.get("error"), source["halted"].as_str()) {
        (Some(e), _) => println!("source:      error: {}", e.as_str().unwrap_or_default()),
        (None, Some(why)) => println!("source:      HALTED: {why}"),
        (None, None) if source["record"] == false => {
            println!("source:      no pipeline record (run `scoresync setup`)")
        }
        (None, None) => println!(
            "source:      recorded up to {}; snapshot {}",
            source["confirmed_lsn"].as_str().unwrap_or("-"),
            if source["snapshot_done"] == true { "done" } else { "pending" }
        ),
    }
    let kafka = &doc["kafka"];
    match kafka.get("error") {
        Some(e) => println!("kafka:       error: {}", e.as_str().unwrap_or_default()),
        None => {
            println!(
                "kafka:       group {} on {}: lag {} message(s); dead letters: {}",
                kafka["group"].as_str().unwrap_or_default(),
                kafka["topic"].as_str().unwrap_or_default(),
                kafka["lag"],
                kafka["dead_letters"]
            );
            for p in kafka["partitions"].as_array().into_iter().flatten() {
                println!(
                    "             partition {} committed {} of {} (lag {})",
                    p["partition"], p["committed"], p["high_watermark"], p["lag"]
                );
            }
        }
    }
    let sink = &doc["sink"];
    match sink.get("error") {
        Some(e) => println!("sink:        {}", e.as_str().unwrap_or_default()),
        None => {
            let parked = sink["parked"]["events"].as_array().cloned().unwrap_or_default();
            println!(
                "sink:        buffered {} row(s), paused={}, parked {} event(s), dead-lettered {}",
                sink["buffered_rows"],
                sink["paused"],
                parked.len(),
                sink["dead_lettered_total"]
            );
            for r in sink["rejected_inserts"].as_array().into_iter().flatten() {
                println!(
                    "  REFUSED    shard {} table {} for {}s ({} attempts): {}",
                    r["shard"],
                    r["table"].as_str().unwrap_or_default(),
                    r["seconds"],
                    r["attempts"],
                    r["error"].as_str().unwrap_or_default()
                );
            }
            for line in split_lines(&sink["conversations_on_several_shards"]) {
                println!("{line}");
            }
            for p in parked {
                println!(
                    "  parked     {} {} ({}s, {} retries): {} [partition {} offset {}]",
                    p["table"].as_str().unwrap_or_default(),
                    p["key"],
                    p["parked_seconds"],
                    p["attempts"],
                    p["reason"].as_str().unwrap_or_default(),
                    p["partition"],
                    p["offset"]
                );
            }
        }
    }
}

/// The `SPLIT` lines: how many conversations the sink found on several shards, and the latest.
fn split_lines(split: &Value) -> Vec<String> {
    let total = split["total"].as_u64().unwrap_or(0);
    if total == 0 {
        return Vec::new();
    }
    let mut lines = vec![format!(
        "  SPLIT      {total} conversation(s) found on several shards' conversations tables \
         (scorecards route to the lowest shard); latest:"
    )];
    for c in split["latest"].as_array().into_iter().flatten() {
        let shards: Vec<String> =
            c["shards"].as_array().into_iter().flatten().map(Value::to_string).collect();
        lines.push(format!(
            "             conversation {} (customer {}, profile {}) on shards {}",
            c["conversation_id"].as_str().unwrap_or_default(),
            c["customer_id"].as_str().unwrap_or_default(),
            c["profile_id"].as_str().unwrap_or_default(),
            shards.join(", ")
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_conversations_are_listed_only_when_there_are_some() {
        assert!(split_lines(&json!({ "total": 0, "latest": [] })).is_empty());
        assert!(split_lines(&Value::Null).is_empty(), "an older daemon without the field");
        let lines = split_lines(&json!({
            "total": 7,
            "latest": [{
                "customer_id": "c", "profile_id": "p", "conversation_id": "conv-1", "shards": [0, 2]
            }],
        }));
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].starts_with("  SPLIT      7 conversation(s)"), "{lines:?}");
        assert_eq!(
            lines[1],
            "             conversation conv-1 (customer c, profile p) on shards 0, 2"
        );
    }
}
