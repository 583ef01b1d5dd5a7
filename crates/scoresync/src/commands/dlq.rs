//! `scoresync dlq list` shows the dead letters; `scoresync dlq redrive` puts them back on the
//! change topic after the cause is fixed.

use std::process::ExitCode;

use error_reporter::Report;

use crate::config::Config;

/// Redrives every dead letter not redriven before; prints how many.
pub async fn redrive(config: &Config) -> anyhow::Result<ExitCode> {
    let count = scoresync_sink::dlq::redrive(&config.kafka)
        .await
        .map_err(|e| anyhow::anyhow!(Report::new(&e).to_string()))?;
    println!(
        "redrove {count} dead letter(s) from {} to {}",
        config.kafka.dlq_topic, config.kafka.change_topic
    );
    Ok(ExitCode::SUCCESS)
}

/// Prints every retained dead letter, one per line.
pub async fn list(config: &Config, json: bool) -> anyhow::Result<ExitCode> {
    let letters = scoresync_sink::dlq::list(&config.kafka)
        .await
        .map_err(|e| anyhow::anyhow!(Report::new(&e).to_string()))?;
    for letter in &letters {
        if json {
            println!("{}", serde_json::to_string(letter)?);
            continue;
        }
        let or_unknown = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        println!(
            "{}/{}@{}  from {}/{}@{}  {}  {}  {}",
            config.kafka.dlq_topic,
            letter.partition,
            letter.offset,
            or_unknown(letter.origin_topic.clone()),
            or_unknown(letter.origin_partition.map(|p| p.to_string())),
            or_unknown(letter.origin_offset.map(|o| o.to_string())),
            letter.dead_lettered_at_ms.map_or_else(|| "age unknown".into(), age),
            match (letter.cut_from, letter.redriven) {
                (Some(_), _) => "payload cut to fit: never redriven",
                (None, true) => "redriven",
                (None, false) => "pending",
            },
            letter.error.as_deref().unwrap_or("(no error recorded)"),
        );
    }
    eprintln!("{} dead letter(s) in {}", letters.len(), config.kafka.dlq_topic);
    Ok(ExitCode::SUCCESS)
}

/// How long ago a Unix-milliseconds time was, e.g. `dead-lettered 95s ago`.
fn age(at_ms: i64) -> String {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64);
    format!("dead-lettered {}s ago", (now_ms - at_ms).max(0) / 1000)
}
