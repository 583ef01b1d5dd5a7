//! One module per CLI command, and what several share (`progress`, `filter`, [`serve_metrics`]).

pub mod backfill;
pub mod dlq;
pub mod filter;
pub mod loadgen;
pub mod monitor;
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
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use scoresync_sink::SinkStats;

use crate::config::Config;

/// Which long-running command a process runs: what its `/healthz` checks and what it samples
/// out of band ([`crate::sampler::spawn`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `scoresync run`: source and sink.
    Run,
    /// `scoresync source`.
    Source,
    /// `scoresync sink` (one of several, perhaps).
    Sink,
    /// `scoresync monitor`: samples only.
    Monitor,
}

/// For a long-running command: installs the metrics recorder, starts the out-of-band samplers
/// its role runs and, when `[metrics] listen` is set, the `/metrics`, `/status` and `/healthz`
/// endpoint. `sink` is the sink's state when this process runs the sink.
pub async fn serve_metrics(
    config: &Config,
    role: Role,
    sink: Option<&Arc<SinkStats>>,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let handle = crate::metrics::install()?;
    crate::metrics::upkeep(handle.clone(), shutdown.child_token());
    crate::sampler::spawn(config, role, shutdown.child_token());
    if config.metrics.listen.is_empty() {
        return Ok(());
    }
    let roles = crate::metrics::Roles {
        sink: sink.cloned(),
        source: matches!(role, Role::Run | Role::Source),
        stall: Duration::from_secs(config.metrics.stall_seconds),
    };
    crate::metrics::serve(&config.metrics.listen, handle, roles, shutdown.clone()).await
}
