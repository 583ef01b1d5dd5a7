//! One module per CLI command, and what several share (`progress`, `filter`).

pub mod backfill;
pub mod dlq;
pub mod filter;
pub mod loadgen;
pub mod progress;
pub mod replay;
pub mod run;
pub mod setup;
pub mod sink;
pub mod source;
pub mod status;
pub mod validate;
pub mod verify;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use scoresync_sink::SinkStats;

use crate::config::Config;

/// Starts the `/metrics` and `/status` endpoint when `[metrics] listen` is set.
pub async fn serve_metrics(
    config: &Config,
    stats: &Arc<SinkStats>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    if config.metrics.listen.is_empty() {
        return Ok(());
    }
    crate::metrics::serve(config.metrics.listen.clone(), Arc::clone(stats), shutdown.clone()).await
}
