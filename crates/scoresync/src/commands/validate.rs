//! `scoresync validate`: the configuration is valid and every server answers.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use secrecy::ExposeSecret;

use crate::config::Config;
use scoresync_bus::client::{OffsetReset, consumer_config};
use scoresync_source::connect::ConnectParams;

const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// Prints the effective configuration and one line per check; fails when any check fails.
pub async fn run(config: &Config) -> anyhow::Result<ExitCode> {
    println!("configuration (secrets redacted):\n{config:#?}");
    let mut failed = 0;
    let mut report = |name: String, result: anyhow::Result<String>| match result {
        Ok(detail) => println!("ok    {name}: {detail}"),
        Err(err) => {
            failed += 1;
            println!("FAIL  {name}: {err:#}");
        }
    };
    report(format!("postgres {}", config.postgres.url.redacted()), check_postgres(config).await);
    report(format!("kafka {}", config.kafka.brokers), check_kafka(config).await);
    for (i, url) in config.clickhouse.shards.iter().enumerate() {
        report(format!("clickhouse shard {i} {url}"), check_shard(config, i).await);
    }
    Ok(if failed == 0 { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}

async fn check_postgres(config: &Config) -> anyhow::Result<String> {
    let params = ConnectParams::parse(config.postgres.url.expose_secret())?;
    let client = tokio::time::timeout(CHECK_TIMEOUT, params.connect_sql())
        .await
        .context("timed out connecting")??;
    let row = client.query_one("SELECT current_setting('wal_level'), version()", &[]).await?;
    let wal_level: String = row.get(0);
    let version: String = row.get(1);
    anyhow::ensure!(wal_level == "logical", "wal_level is {wal_level}, scoresync needs logical");
    Ok(format!("wal_level=logical, {}", version.split(" on ").next().unwrap_or(&version)))
}

async fn check_kafka(config: &Config) -> anyhow::Result<String> {
    let kafka = config.kafka.clone();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer =
            consumer_config(&kafka, "scoresync-validate", OffsetReset::Error).create()?;
        let metadata = consumer.fetch_metadata(None, CHECK_TIMEOUT)?;
        Ok(format!("{} broker(s), {} topic(s)", metadata.brokers().len(), metadata.topics().len()))
    })
    .await?
}

async fn check_shard(config: &Config, index: usize) -> anyhow::Result<String> {
    let client =
        scoresync_sink::shard::client(&config.clickhouse, index).context("no such shard")?;
    let version: String =
        tokio::time::timeout(CHECK_TIMEOUT, client.query("SELECT version()").fetch_one::<String>())
            .await
            .context("timed out")??;
    Ok(format!("ClickHouse {version}"))
}
