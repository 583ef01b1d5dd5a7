//! `scoresync status [--json] [--watch SECONDS]`: where the pipeline stands, hop by hop, each
//! with its lag and a verdict (in sync, behind, stalled, halted, and why). The replication slot
//! (active, WAL retained and unconfirmed, `wal_status`), the source's pipeline record (snapshot
//! done, and why the source last halted, if it did), the sink group's lag per partition in
//! messages and seconds, the dead-letter count, and, from the running daemon's `/status`, the
//! end-to-end lag (p50/p99 per table over the last minute or two), what is parked and why,
//! inserts a shard refuses, and conversations found on several shards.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use scoresync_bus::offsets::OffsetReader;
use scoresync_source::connect::ConnectParams;

use crate::config::Config;

const TIMEOUT: Duration = Duration::from_secs(10);
/// Unconfirmed WAL below this is "in sync" (a busy primary writes this much between two
/// confirmations).
const IN_SYNC_BYTES: i64 = 16 << 20;
/// The oldest change the sink group has not committed is "in sync" up to this age.
const IN_SYNC_SECONDS: f64 = 10.0;

/// Prints the status once, or every `watch` until interrupted; exits 0 when every part could be
/// read.
pub async fn run(
    config: &Config,
    as_json: bool,
    watch: Option<Duration>,
) -> anyhow::Result<ExitCode> {
    let Some(every) = watch else { return once(config, as_json).await };
    loop {
        if !as_json {
            print!("\x1b[2J\x1b[H");
        }
        once(config, as_json).await?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

async fn once(config: &Config, as_json: bool) -> anyhow::Result<ExitCode> {
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
    let mut doc = json!({ "slot": slot, "source": source, "kafka": kafka, "sink": sink });
    doc["verdict"] = json!(verdict(&doc));
    if as_json {
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        print_human(&doc);
    }
    let failed = ["slot", "source", "kafka", "sink"].iter().any(|k| doc[k].get("error").is_some());
    Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

async fn slot_status(config: &Config) -> anyhow::Result<Value> {
    let name = &config.postgres.slot;
    let params = ConnectParams::parse(config.postgres.url.expose_secret())?;
    let sql = tokio::time::timeout(TIMEOUT, params.connect_sql()).await.context("timed out")??;
    let lag = scoresync_source::slot::lag(&sql, name).await?;
    let lsn = |l: Option<u64>| l.map(|l| scoresync_event::Lsn(l).to_string());
    Ok(match lag {
        None => json!({ "slot": name, "exists": false }),
        Some(l) => json!({
            "slot": name,
            "exists": true,
            "active": l.active,
            "confirmed_flush_lsn": lsn(l.confirmed_flush_lsn),
            "restart_lsn": lsn(l.restart_lsn),
            "wal_status": l.wal_status,
            "unconfirmed_bytes": l.unconfirmed_bytes,
            "retained_bytes": l.retained_bytes,
            "safe_wal_size": l.safe_wal_size,
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
    let partitions = reader.lag(scoresync_event::clock::unix_millis())?;
    let total_lag: i64 = partitions.iter().map(|p| p.lag).sum();
    let oldest = partitions.iter().map(|p| p.lag_seconds).fold(0.0, f64::max);
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
        "lag_seconds": oldest,
        "partitions": partitions,
        "dead_letter_topic": dlq,
        "dead_letters": dead_letters,
    }))
}

/// GET /status from the running daemon.
async fn sink_status(listen: &str) -> anyhow::Result<Value> {
    anyhow::ensure!(!listen.is_empty(), "metrics.listen is empty");
    let client = reqwest::Client::builder().timeout(TIMEOUT).build()?;
    let response = client.get(format!("http://{listen}/status")).send().await?;
    Ok(response.error_for_status()?.json().await?)
}

/// One verdict per hop, in pipeline order: `in sync`, or what is wrong.
fn verdicts(doc: &Value) -> Vec<(&'static str, String)> {
    let unknown = |e: &Value| format!("unknown: {}", e.as_str().unwrap_or_default());
    let slot = &doc["slot"];
    let slot_verdict = if let Some(e) = slot.get("error") {
        unknown(e)
    } else if slot["exists"] == false {
        "HALTED: the slot is missing (`scoresync setup --recreate-slot`, then backfill)".into()
    } else if slot["wal_status"] == "lost" {
        "HALTED: the slot lost WAL it needed (`scoresync setup --recreate-slot`)".into()
    } else if slot["wal_status"] != "reserved" {
        format!(
            "AT RISK: wal_status {} (the slot holds more WAL than the server keeps; it may be lost)",
            slot["wal_status"]
        )
    } else if slot["active"] == false {
        format!(
            "STALLED: no source streams from it; {} bytes unconfirmed",
            slot["unconfirmed_bytes"]
        )
    } else if slot["unconfirmed_bytes"].as_i64().unwrap_or(0) > IN_SYNC_BYTES {
        format!("behind by {} bytes of WAL", slot["unconfirmed_bytes"])
    } else {
        "in sync".into()
    };
    let source = &doc["source"];
    let source_verdict = match (source.get("error"), source["halted"].as_str()) {
        (Some(e), _) => unknown(e),
        (None, Some(why)) => format!("HALTED: {why}"),
        (None, None) if source["record"] == false => {
            "no pipeline record (`scoresync setup`)".into()
        }
        (None, None) if source["snapshot_done"] == false => "snapshot running".into(),
        _ => "in sync".into(),
    };
    let kafka = &doc["kafka"];
    let kafka_verdict = match kafka.get("error") {
        Some(e) => unknown(e),
        // Offsets are committed every second or so: a few seconds behind is in step.
        None if kafka["lag_seconds"].as_f64().unwrap_or(0.0) <= IN_SYNC_SECONDS => "in sync".into(),
        None => format!(
            "behind by {} message(s), the oldest {:.0} s old",
            kafka["lag"],
            kafka["lag_seconds"].as_f64().unwrap_or(0.0)
        ),
    };
    let sink = &doc["sink"];
    let stalled: Vec<&str> =
        sink["health"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let parked = sink["parked"]["events"].as_array().map_or(0, Vec::len);
    let refused = sink["rejected_inserts"].as_array().map_or(0, Vec::len);
    let sink_verdict = if let Some(e) = sink.get("error") {
        unknown(e)
    } else if sink.get("buffered_rows").is_none() {
        "unknown: the process answering at [metrics] listen runs no sink".into()
    } else if !stalled.is_empty() {
        format!("STALLED: {}", stalled.join("; "))
    } else if refused > 0 {
        format!("HALTED: {refused} table(s) refuse inserts (REFUSED below)")
    } else if parked > 0 {
        format!("{parked} event(s) parked (listed below)")
    } else if sink["buffered_rows"].as_u64().unwrap_or(0) > 0 {
        format!("writing {} buffered row(s)", sink["buffered_rows"])
    } else {
        "in sync".into()
    };
    vec![
        ("slot", slot_verdict),
        ("source", source_verdict),
        ("kafka", kafka_verdict),
        ("sink", sink_verdict),
    ]
}

/// The whole pipeline's verdict: `in sync`, or the first hop that is not.
fn verdict(doc: &Value) -> String {
    verdicts(doc)
        .into_iter()
        .find(|(_, v)| v != "in sync")
        .map_or_else(|| "in sync".to_owned(), |(hop, v)| format!("{hop}: {v}"))
}

fn print_human(doc: &Value) {
    println!("pipeline:    {}", doc["verdict"].as_str().unwrap_or_default());
    let verdicts = verdicts(doc);
    let said = |hop: &str| verdicts.iter().find(|(h, _)| *h == hop).map_or("", |(_, v)| v.as_str());
    let slot = &doc["slot"];
    println!("slot:        {}", said("slot"));
    if slot.get("error").is_none() && slot["exists"] == true {
        println!(
            "             {} active={} confirmed={} wal_status={} unconfirmed={} retained={} bytes",
            slot["slot"].as_str().unwrap_or_default(),
            slot["active"],
            slot["confirmed_flush_lsn"].as_str().unwrap_or("-"),
            slot["wal_status"].as_str().unwrap_or("-"),
            slot["unconfirmed_bytes"],
            slot["retained_bytes"]
        );
    }
    let source = &doc["source"];
    println!("source:      {}", said("source"));
    if source.get("error").is_none() && source["record"] == true {
        println!(
            "             recorded up to {}; snapshot {}",
            source["confirmed_lsn"].as_str().unwrap_or("-"),
            if source["snapshot_done"] == true { "done" } else { "pending" }
        );
    }
    let kafka = &doc["kafka"];
    println!("kafka:       {}", said("kafka"));
    if kafka.get("error").is_none() {
        println!(
            "             group {} on {}: lag {} message(s); dead letters: {}",
            kafka["group"].as_str().unwrap_or_default(),
            kafka["topic"].as_str().unwrap_or_default(),
            kafka["lag"],
            kafka["dead_letters"]
        );
        for p in kafka["partitions"].as_array().into_iter().flatten() {
            println!(
                "             partition {} committed {} of {} (lag {}, {:.0} s)",
                p["partition"],
                p["committed"],
                p["high_watermark"],
                p["lag"],
                p["lag_seconds"].as_f64().unwrap_or(0.0)
            );
        }
    }
    let sink = &doc["sink"];
    println!("sink:        {}", said("sink"));
    if sink.get("error").is_some() {
        return;
    }
    let parked = sink["parked"]["events"].as_array().cloned().unwrap_or_default();
    println!(
        "             buffered {} row(s), paused={}, parked {} event(s), dead-lettered {}",
        sink["buffered_rows"],
        sink["paused"],
        parked.len(),
        sink["dead_lettered_total"]
    );
    for line in lag_lines(&sink["commit_to_ack_seconds"]) {
        println!("{line}");
    }
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

/// End-to-end lag per table: PostgreSQL commit to ClickHouse acknowledgement.
fn lag_lines(lag: &Value) -> Vec<String> {
    let Some(tables) = lag.as_object() else { return Vec::new() };
    let mut lines = vec!["  end to end (commit to ClickHouse, last 1-2 min):".to_owned()];
    for (table, q) in tables {
        lines.push(format!(
            "             {table:<28} p50 {:>8.3} s   p99 {:>8.3} s   ({} rows)",
            q["p50"].as_f64().unwrap_or(0.0),
            q["p99"].as_f64().unwrap_or(0.0),
            q["rows"]
        ));
    }
    if lines.len() == 1 {
        lines.push("             no rows written in the last minutes".into());
    }
    lines
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

    /// A status document where every hop is in sync; `change` spoils one part.
    fn doc(change: fn(&mut Value)) -> Value {
        let mut doc = json!({
            "slot": { "exists": true, "active": true, "wal_status": "reserved", "unconfirmed_bytes": 0 },
            "source": { "record": true, "snapshot_done": true },
            "kafka": { "lag": 0, "lag_seconds": 0.0 },
            "sink": { "health": [], "parked": { "events": [] }, "rejected_inserts": [], "buffered_rows": 0 },
        });
        change(&mut doc);
        doc
    }

    #[test]
    fn the_verdict_names_the_first_hop_that_is_not_in_sync() {
        type Case = (&'static str, fn(&mut Value), &'static str);
        let cases: [Case; 14] = [
            ("all in sync", |_| {}, "in sync"),
            (
                "slot missing",
                |d| d["slot"] = json!({ "exists": false }),
                "slot: HALTED: the slot is missing",
            ),
            (
                "slot lost",
                |d| d["slot"]["wal_status"] = json!("lost"),
                "slot: HALTED: the slot lost WAL",
            ),
            (
                "slot inactive",
                |d| d["slot"]["active"] = json!(false),
                "slot: STALLED: no source streams",
            ),
            (
                "slot behind",
                |d| d["slot"]["unconfirmed_bytes"] = json!(1_i64 << 30),
                "slot: behind by 1073741824 bytes",
            ),
            (
                "source halted",
                |d| d["source"]["halted"] = json!("event too large"),
                "source: HALTED: event too large",
            ),
            (
                "snapshot",
                |d| d["source"]["snapshot_done"] = json!(false),
                "source: snapshot running",
            ),
            (
                "kafka behind",
                |d| d["kafka"] = json!({ "lag": 7, "lag_seconds": 42.0 }),
                "kafka: behind by 7 message(s), the oldest 42 s old",
            ),
            (
                "sink stalled",
                |d| {
                    d["sink"]["health"] =
                        json!(["sink: every insert into shard 1 failed for 200 s"])
                },
                "sink: STALLED: sink: every insert into shard 1",
            ),
            (
                "sink parked",
                |d| d["sink"]["parked"]["events"] = json!([{}, {}]),
                "sink: 2 event(s) parked",
            ),
            (
                "no daemon",
                |d| d["sink"] = json!({ "error": "no sink answering" }),
                "sink: unknown: no sink answering",
            ),
            (
                "slot at risk",
                |d| d["slot"]["wal_status"] = json!("unreserved"),
                "slot: AT RISK: wal_status \"unreserved\"",
            ),
            ("kafka in step", |d| d["kafka"] = json!({ "lag": 40, "lag_seconds": 1.5 }), "in sync"),
            (
                "no sink there",
                |d| d["sink"] = json!({ "health": [] }),
                "sink: unknown: the process answering",
            ),
        ];
        for (case, change, expected) in cases {
            let said = verdict(&doc(change));
            assert!(said.starts_with(expected), "{case}: {said}");
        }
    }

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
