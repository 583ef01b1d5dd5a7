//! The PostgreSQL side of scoresync: from a logical replication slot to the change topic.
//!
//! ```text
//!  PostgreSQL slot (pgoutput v1)
//!     | pgwire-replication: Begin / XLogData / Commit / KeepAlive / Message
//!     v
//!  decode ──> change::Mapper ──> publish::Publisher ──> change topic (idempotent, acks=all)
//!     ^            (scorecard's partition, row's key;          |
//!     |             tombstones; TRUNCATE to every partition)   | acknowledgements
//!     |                                                        v
//!  standby status <── update_applied_lsn <── state topic <── progress::Progress
//!                      (after the record)     (record)        (confirmable LSN)
//! ```
//!
//! # Progress tracking
//!
//! An LSN is confirmed to PostgreSQL only when Kafka has acknowledged every event of every
//! transaction at or below it ([`progress`]): the end LSN of a transaction is confirmable once
//! its Commit arrived and all its events, and all earlier transactions' events, are acknowledged.
//! With nothing open or unacknowledged, keepalive and heartbeat positions are confirmable too, so
//! an idle slot advances ([`heartbeat`]). Before confirming, the source writes the position to its
//! pipeline record on the state topic and waits for that acknowledgement ([`state`]); the start-up
//! checks ([`slot::check`]) rely on the slot never being ahead of the record.
//!
//! A delivery timeout or a fatal producer error never advances the LSN: the stage fails with a
//! transient error and [`Source::run`] restarts it from the slot (events after the last confirmed
//! LSN are published again; duplicates are harmless, loss is not).
//!
//! # Modules
//!
//! - [`config`], [`connect`]: settings and connections.
//! - [`decode`], [`text`], [`change`]: pgoutput bytes to typed, keyed change events.
//! - [`publish`], [`progress`], [`stream`]: the streaming stage.
//! - [`slot`], [`state`], [`setup`]: slot checks, the pipeline record, `scoresync setup`.
//! - [`snapshot`]: the initial snapshot, resumable, versioned below every streamed change.
//! - [`backfill`]: re-publishing some scorecards' current rows beside the running source,
//!   resumable, each chunk versioned below every change it missed.
//! - [`heartbeat`]: keeps an idle slot moving.
//! - [`metrics`]: what the source counts.
//! - [`verify`]: PostgreSQL's side of `scoresync verify` (rows with their scorecards, by chunk or
//!   by key).

pub mod backfill;
pub mod change;
pub mod config;
pub mod connect;
pub mod decode;
pub mod error;
#[cfg(test)]
mod fixtures;
pub mod heartbeat;
pub mod metrics;
pub mod progress;
pub mod publish;
pub mod setup;
pub mod slot;
pub mod snapshot;
pub mod state;
pub mod stream;
pub mod text;
pub mod verify;

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use error_reporter::Report;
use secrecy::ExposeSecret;
use tokio_util::sync::CancellationToken;

use scoresync_bus::KafkaConfig;

pub use config::PostgresConfig;
pub use error::Error;

use connect::ConnectParams;
use heartbeat::Heartbeat;
use publish::Publisher;
use snapshot::Snapshot;
use state::{PipelineRecord, StateStore};
use stream::Stream;

/// Default bound on events awaiting Kafka acknowledgement.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 20_000;
/// A run that lasted this long before failing starts the retry schedule over.
const HEALTHY_RUN: Duration = Duration::from_secs(60);
/// Waits before restarting from the slot: 500 ms doubling to 30 s, each drawn from the upper half
/// of its step so that restarting sources do not wake in step. backon's jitter adds up to 100%,
/// so the steps it doubles are half that: 250 ms to 15 s. The schedule never ends.
const RESTART_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(250))
    .with_max_delay(Duration::from_secs(15))
    .with_jitter()
    .without_max_times();

/// The source role: snapshot (once), then stream, restarting from the slot on transient errors.
pub struct Source {
    /// PostgreSQL settings.
    pub postgres: PostgresConfig,
    /// Kafka settings.
    pub kafka: KafkaConfig,
    /// Most events awaiting acknowledgement before reading pauses.
    pub max_in_flight: usize,
    /// Rows per snapshot chunk.
    pub snapshot_chunk_rows: usize,
}

impl Source {
    /// A source with default limits.
    pub fn new(postgres: PostgresConfig, kafka: KafkaConfig) -> Self {
        Source {
            postgres,
            kafka,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            snapshot_chunk_rows: snapshot::DEFAULT_CHUNK_ROWS,
        }
    }

    /// Runs until `shutdown` (returns `Ok`) or a permanent error.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        metrics::register();
        let params = ConnectParams::parse(self.postgres.url.expose_secret())
            .map_err(Error::sql("parsing postgres.url"))?;
        let heartbeat = (self.postgres.heartbeat_interval_ms > 0).then(|| {
            let beat = Heartbeat {
                params: params.clone(),
                interval: Duration::from_millis(self.postgres.heartbeat_interval_ms),
            };
            tokio::spawn(beat.run(shutdown.child_token()))
        });
        let mut backoff = RESTART_BACKOFF.build();
        let result = loop {
            let started = Instant::now();
            match self.run_once(&params, &shutdown).await {
                Ok(()) => break Ok(()),
                Err(err) if err.is_transient() && !shutdown.is_cancelled() => {
                    if started.elapsed() > HEALTHY_RUN {
                        backoff = RESTART_BACKOFF.build();
                    }
                    let delay = backoff.next().unwrap_or(Duration::from_secs(30));
                    metrics::restarted(err.label());
                    tracing::warn!(error = %Report::new(&err), ?delay, slot = %self.postgres.slot, "source failed; restarting from the slot");
                    tokio::select! {
                        _ = shutdown.cancelled() => break Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(err) => break Err(err),
            }
        };
        shutdown.cancel();
        if let Some(task) = heartbeat {
            let _ = task.await;
        }
        result
    }

    async fn run_once(
        &self,
        params: &ConnectParams,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        let slot_name = &self.postgres.slot;
        let sql = params.connect_sql().await.map_err(Error::sql("connecting"))?;
        let state = StateStore::new(&self.kafka)?;
        let mut record = state.load(slot_name).await?.ok_or_else(|| Error::NoRecord {
            slot: slot_name.clone(),
            topic: self.kafka.state_topic.clone(),
        })?;
        let info = slot::inspect(&sql, slot_name).await?;
        let system_id =
            slot::system_id(params.replication(slot_name, &self.postgres.publication, 0.into()))
                .await?;
        slot::check(slot_name, &params.database, info.as_ref(), &record, system_id)?;
        if record.halted.take().is_some() {
            state.save(&record).await?;
        }
        let result = self.publish(params, &sql, &state, &mut record, shutdown).await;
        if let Err(err) = &result
            && !err.is_transient()
        {
            // For `scoresync status`, which outlives this process. Best effort: the error itself
            // is what the caller acts on.
            record.halted = Some(Report::new(err).to_string());
            if let Err(save) = state.save(&record).await {
                tracing::warn!(error = %Report::new(&save), "could not record why the source halted");
            }
        }
        result
    }

    /// The snapshot (if pending), then the stream.
    async fn publish(
        &self,
        params: &ConnectParams,
        sql: &tokio_postgres::Client,
        state: &StateStore,
        record: &mut PipelineRecord,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        let slot_name = &self.postgres.slot;
        let publisher = Publisher::new(&self.kafka, slot_name)?;
        metrics::snapshot_done(record.snapshot.done);
        if !record.snapshot.done {
            let snapshot = Snapshot {
                sql,
                publisher: &publisher,
                state,
                chunk_rows: self.snapshot_chunk_rows,
            };
            snapshot.run(record, shutdown).await?;
            metrics::snapshot_done(record.snapshot.done);
            if shutdown.is_cancelled() {
                return Ok(());
            }
        }
        let stream = Stream {
            cfg: &self.postgres,
            params,
            publisher: &publisher,
            state,
            max_in_flight: self.max_in_flight,
        };
        stream.run(record, shutdown).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restarts_wait_500ms_doubling_to_30s_from_the_upper_half_of_each_step() {
        let delays: Vec<Duration> = RESTART_BACKOFF.build().take(20).collect();
        assert_eq!(delays.len(), 20, "the schedule never ends");
        let ms = Duration::from_millis;
        assert!(delays[0] >= ms(250) && delays[0] <= ms(500), "{delays:?}");
        assert!(delays[3] >= ms(2_000) && delays[3] <= ms(4_000), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= ms(30_000)), "{delays:?}");
        assert!(delays[19] >= ms(15_000), "capped delays stay near the cap: {delays:?}");
    }
}
