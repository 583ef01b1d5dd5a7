//! `scoresync sink`: the sink role alone (as many as the change topic has partitions).

use std::process::ExitCode;
use std::sync::Arc;

use error_reporter::Report;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use scoresync_sink::{Sink, SinkStats};

use crate::commands::Role;
use crate::config::Config;

/// The sink of this configuration, counting into `stats`.
pub fn sink(config: &Config, stats: Arc<SinkStats>) -> Sink {
    SinkStats::register(config.clickhouse.shards.len());
    Sink {
        kafka: config.kafka.clone(),
        clickhouse: config.clickhouse.clone(),
        sink: config.sink.clone(),
        postgres_url: Some(config.postgres.url.expose_secret().to_owned().into()),
        stats,
        scope: scoresync_sink::Scope::default(),
    }
}

/// Consumes until SIGTERM/SIGINT (exit 0) or a permanent error (exit 1).
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    let stats = Arc::new(SinkStats::default());
    crate::commands::serve_metrics(config, Role::Sink, Some(&stats), &shutdown).await?;
    match sink(config, stats).run(shutdown.clone()).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err) => {
            eprintln!("scoresync sink: {}", Report::new(&err));
            shutdown.cancel();
            Ok(ExitCode::FAILURE)
        }
    }
}
