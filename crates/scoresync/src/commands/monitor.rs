//! `scoresync monitor`: only the out-of-band lag samplers and `/metrics`, no replication. Run it
//! beside the daemon (its own process or container) so that the slot's and the sink group's lag
//! stay visible, and their alerts fire, while the daemon itself is down.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::Config;

/// Samples and serves until SIGTERM/SIGINT.
pub async fn run(config: &Config, shutdown: CancellationToken) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        !config.metrics.listen.is_empty(),
        "scoresync monitor serves /metrics on [metrics] listen, which is empty"
    );
    crate::commands::serve_metrics(config, false, None, &shutdown).await?;
    shutdown.cancelled().await;
    Ok(ExitCode::SUCCESS)
}
