//! `scoresync monitor`: only the out-of-band samplers ([`crate::sampler`]: slot and consumer-group
//! lag, the latest verify, replay and backfill figures) and the endpoint (`/metrics`, `/healthz`
//! always ok, `/status` with no sink), no replication. Run it beside the daemon (its own process
//! or container) so that the lag stays visible, and its alerts fire, while the daemon is down.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::commands::Role;
use crate::config::Config;

/// Samples and serves until SIGTERM/SIGINT.
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !config.metrics.listen.is_empty(),
        "scoresync monitor serves /metrics on [metrics] listen, which is empty"
    );
    crate::commands::serve_metrics(config, Role::Monitor, None, &shutdown).await?;
    shutdown.cancelled().await;
    Ok(ExitCode::SUCCESS)
}
