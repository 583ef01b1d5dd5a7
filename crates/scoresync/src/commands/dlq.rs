//! `scoresync dlq redrive`: put dead letters back on the change topic after the cause is fixed.

use std::process::ExitCode;

use crate::config::Config;

/// Redrives every dead letter not redriven before; prints how many.
pub async fn redrive(config: &Config) -> anyhow::Result<ExitCode> {
    let count = scoresync_sink::dlq::redrive(&config.kafka)
        .await
        .map_err(|e| anyhow::anyhow!(scoresync_sink::stage::error_chain(&e)))?;
    println!(
        "redrove {count} dead letter(s) from {} to {}",
        config.kafka.dlq_topic, config.kafka.change_topic
    );
    Ok(ExitCode::SUCCESS)
}
