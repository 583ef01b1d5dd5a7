//! `scoresync setup`: topics, ClickHouse tables, publication, slot and pipeline record. Every
//! step is idempotent and reports whether it found or made each object. The tables come before
//! the slot: a new slot's row versions must start above the highest one they hold.

use std::process::ExitCode;

use anyhow::Context;
use error_reporter::Report;

use scoresync_bus::topics::{TopicOutcome, ensure_topics};
use scoresync_source::setup::Outcome;

use crate::config::Config;

/// Runs every step in order; stops at the first failure.
pub async fn run(config: &Config, recreate_slot: bool) -> anyhow::Result<ExitCode> {
    for outcome in ensure_topics(&config.kafka).await.context("kafka topics")? {
        match outcome {
            TopicOutcome::Existed { topic, partitions, differences } => {
                println!("existed  kafka topic {topic} ({partitions} partitions)");
                for difference in &differences {
                    println!("differs  {difference}");
                }
                if !differences.is_empty() {
                    let brokers = &config.kafka.brokers;
                    let command =
                        scoresync_bus::topics::alter_command(brokers, &topic, &differences);
                    println!(
                        "         to change them (review first: compacting a topic drops older messages of each key): {command}"
                    );
                }
            }
            TopicOutcome::Created { topic, partitions } => {
                println!("created  kafka topic {topic} ({partitions} partitions)")
            }
        }
    }
    for shard in
        scoresync_sink::schema::ensure(&config.clickhouse).await.context("clickhouse schema")?
    {
        let db = &config.clickhouse.database;
        for table in shard.existed {
            println!("existed  clickhouse shard {} table {db}.{table}", shard.shard);
        }
        for table in shard.created {
            println!("created  clickhouse shard {} table {db}.{table}", shard.shard);
        }
    }
    // A new slot's row versions start above everything stored (see scoresync_event::version).
    let max_stored_version = scoresync_sink::schema::max_version(&config.clickhouse)
        .await
        .context("reading the highest row version in clickhouse")?;
    let postgres = scoresync_source::setup::ensure(
        &config.postgres,
        &config.kafka,
        recreate_slot,
        max_stored_version,
    )
    .await
    .map_err(|e| anyhow::anyhow!(Report::new(&e).to_string()))?;
    for outcome in postgres {
        match outcome {
            Outcome::Existed(what) => println!("existed  {what}"),
            Outcome::Created(what) => println!("created  {what}"),
        }
    }
    Ok(ExitCode::SUCCESS)
}
