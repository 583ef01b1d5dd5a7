//! `scoresync source`: the source role alone (one per slot).

use std::process::ExitCode;

use error_reporter::Report;
use tokio_util::sync::CancellationToken;

use scoresync_source::Source;

use crate::commands::Role;
use crate::config::Config;

/// Streams until SIGTERM/SIGINT (exit 0) or a permanent error (exit 1, message on stderr).
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    crate::commands::serve_metrics(config, Role::Source, None, &shutdown).await?;
    let mut source = Source::new(config.postgres.clone(), config.kafka.clone());
    source.max_in_flight = config.source.max_in_flight_events;
    source.snapshot_chunk_rows = config.source.snapshot_chunk_rows;
    match source.run(shutdown).await {
        Ok(()) => Ok(ExitCode::SUCCESS),
        Err(err) => {
            eprintln!("scoresync source: {}", Report::new(&err));
            Ok(ExitCode::FAILURE)
        }
    }
}
