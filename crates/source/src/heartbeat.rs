//! Heartbeats: a non-transactional logical message written at a fixed interval.
//!
//! An idle publication gives the walsender nothing to send, and a slot that is never confirmed
//! past its position keeps WAL. Each heartbeat is a WAL record in the slot's database; it reaches
//! the stream as a logical message, and when nothing is in flight the source confirms its position
//! ([`crate::progress::Progress::idle_at`]). Failures are logged and retried at the next tick: a
//! missed heartbeat only delays that advance.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::connect::ConnectParams;

/// The prefix of scoresync's heartbeat messages.
pub const HEARTBEAT_PREFIX: &str = "scoresync.heartbeat";

/// Writes heartbeats until cancelled.
pub struct Heartbeat {
    /// Where to write them.
    pub params: ConnectParams,
    /// How often.
    pub interval: Duration,
}

impl Heartbeat {
    /// Runs until `shutdown` is cancelled.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut client: Option<tokio_postgres::Client> = None;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                // Shutdown first.
                _ = shutdown.cancelled() => return,
                // Then the interval.
                _ = tick.tick() => {}
            }
            if client.as_ref().is_none_or(|c| c.is_closed()) {
                match self.params.connect_sql().await {
                    Ok(c) => client = Some(c),
                    Err(error) => {
                        tracing::warn!(%error, "heartbeat: cannot connect to PostgreSQL");
                        continue;
                    }
                }
            }
            let Some(c) = &client else { continue };
            let written = c
                .execute(
                    "SELECT pg_logical_emit_message(false, $1, now()::text)",
                    &[&HEARTBEAT_PREFIX],
                )
                .await;
            match written {
                Ok(_) => crate::metrics::heartbeat(),
                Err(error) => {
                    tracing::warn!(%error, "heartbeat: pg_logical_emit_message failed");
                    client = None;
                }
            }
        }
    }
}
