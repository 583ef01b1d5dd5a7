//! The streaming stage: slot -> pgoutput -> change events -> Kafka, and confirmed LSNs back.
//!
//! One loop, in priority order: shutdown, Kafka acknowledgements, the status timer (record and
//! confirm what Kafka has), then new replication input while fewer than `max_in_flight` events
//! await acknowledgement. The replication worker keeps answering the server (standby status every
//! `status_interval_ms`, also while this loop waits on a full in-flight window or a Kafka outage),
//! so `wal_sender_timeout` never fires; it reports only what this loop confirmed.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use pgwire_replication::{Lsn as WireLsn, ReplicationClient, ReplicationEvent};
use tokio_util::sync::CancellationToken;

use scoresync_event::Lsn;

use crate::change::{Mapper, TxMeta};
use crate::config::PostgresConfig;
use crate::connect::ConnectParams;
use crate::decode::{decode, pg_time_to_unix};
use crate::error::Error;
use crate::metrics;
use crate::progress::{Progress, TxId};
use crate::publish::Publisher;
use crate::slot;
use crate::state::{PipelineRecord, StateStore};

/// How long shutdown waits for in-flight events to be acknowledged.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Streams from the slot until shutdown or an error.
pub struct Stream<'a> {
    /// PostgreSQL settings.
    pub cfg: &'a PostgresConfig,
    /// Connection parameters.
    pub params: &'a ConnectParams,
    /// The change-topic publisher.
    pub publisher: &'a Publisher,
    /// Where the confirmed LSN is recorded before it is confirmed.
    pub state: &'a StateStore,
    /// Most events awaiting Kafka acknowledgement before reading pauses.
    pub max_in_flight: usize,
}

type Acks =
    FuturesUnordered<std::pin::Pin<Box<dyn Future<Output = (TxId, Result<(), Error>)> + Send>>>;

impl Stream<'_> {
    /// Streams from `record.confirmed_lsn`; returns `Ok` after a clean shutdown.
    pub async fn run(
        &self,
        record: &mut PipelineRecord,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        let slot = self.cfg.slot.as_str();
        let wire = |source| Error::Replication { slot: slot.into(), source };
        let start = WireLsn::from(record.confirmed_lsn.0);
        let config = self
            .params
            .replication(slot, &self.cfg.publication, start)
            .with_ack_lsn(start)
            .with_status_interval(Duration::from_millis(self.cfg.status_interval_ms));
        let mut client = ReplicationClient::connect(config).await.map_err(wire)?;
        client.wait_started().await.map_err(wire)?;
        tracing::info!(slot, from = %record.confirmed_lsn, "streaming");

        let mut mapper = Mapper::new(record.system_id, record.versions()?);
        let mut progress = Progress::new(record.confirmed_lsn);
        let mut acks: Acks = FuturesUnordered::new();
        let mut tx: Option<TxId> = None;
        let mut acked_since_tick = false;
        let mut tick = tokio::time::interval(Duration::from_millis(self.cfg.status_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

        loop {
            tokio::select! {
                biased;
                // 1. Shutdown: stop reading, then drain below.
                _ = shutdown.cancelled() => break,
                // 2. Kafka acknowledgements move the confirmable position.
                Some((id, result)) = acks.next(), if !acks.is_empty() => {
                    result?;
                    progress.acked(id);
                    acked_since_tick = true;
                }
                // 3. Status timer: record, then confirm, what Kafka has.
                _ = tick.tick() => {
                    metrics::in_flight(acks.len(), std::mem::take(&mut acked_since_tick));
                    self.confirm(&client, &progress, record).await?;
                }
                // 4. New input, while the in-flight window has room.
                event = client.recv(), if acks.len() < self.max_in_flight => {
                    let event = event.map_err(wire)?.ok_or(Error::StreamEnded { slot: slot.into() })?;
                    self.handle(event, &mut mapper, &mut progress, &mut tx, &mut acks)?;
                }
            }
        }
        self.drain(client, acks, progress, record).await
    }

    fn handle(
        &self,
        event: ReplicationEvent,
        mapper: &mut Mapper,
        progress: &mut Progress,
        tx: &mut Option<TxId>,
        acks: &mut Acks,
    ) -> Result<(), Error> {
        let slot = &self.cfg.slot;
        match event {
            ReplicationEvent::Begin { final_lsn, xid, commit_time_micros } => {
                mapper.begin(TxMeta {
                    commit_lsn: final_lsn.as_u64(),
                    commit_time_us: pg_time_to_unix(commit_time_micros),
                    xid,
                });
                *tx = Some(progress.begin());
            }
            ReplicationEvent::XLogData { wal_start, data, .. } => {
                let lsn = Lsn(wal_start.as_u64());
                let message = decode(&data).map_err(|source| Error::Decode {
                    slot: slot.clone(),
                    lsn,
                    source,
                })?;
                let outgoing = mapper.map(message, lsn.0).map_err(|source| Error::Map {
                    slot: slot.clone(),
                    lsn,
                    source,
                })?;
                for out in &outgoing {
                    let Some(id) = *tx else {
                        return Err(Error::Map {
                            slot: slot.clone(),
                            lsn,
                            source: crate::change::MapError::NoTransaction("row"),
                        });
                    };
                    let table = metrics::table_label(&out.event);
                    let commit_us = out.event.commit_time_us;
                    for (i, delivery) in self.publisher.send(out)?.into_iter().enumerate() {
                        progress.sent(id);
                        // The event's lag, once: not again for its tombstone or its copies on
                        // other partitions.
                        let table = (i == 0).then_some(table);
                        acks.push(Box::pin(async move {
                            let result = delivery.await;
                            if let (Ok(()), Some(table)) = (&result, table) {
                                metrics::acknowledged(table, commit_us);
                            }
                            (id, result)
                        }));
                    }
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                mapper.commit();
                metrics::transaction();
                if let Some(id) = tx.take() {
                    progress.commit(id, Lsn(end_lsn.as_u64()));
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => progress.idle_at(Lsn(wal_end.as_u64())),
            ReplicationEvent::Message { transactional: false, lsn, .. } => {
                progress.idle_at(Lsn(lsn.as_u64()));
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// Records the confirmable position on the state topic, then lets the replication worker
    /// report it to PostgreSQL.
    async fn confirm(
        &self,
        client: &ReplicationClient,
        progress: &Progress,
        record: &mut PipelineRecord,
    ) -> Result<(), Error> {
        let confirmable = progress.confirmable();
        if confirmable <= record.confirmed_lsn {
            return Ok(());
        }
        let mut next = record.clone();
        next.confirmed_lsn = confirmable;
        self.state.save(&next).await?;
        *record = next;
        client.update_applied_lsn(WireLsn::from(confirmable.0));
        metrics::confirmed(confirmable.0);
        Ok(())
    }

    /// After shutdown: wait (bounded) for in-flight events, record and confirm what Kafka has,
    /// close the stream, and move the slot to the recorded position.
    async fn drain(
        &self,
        mut client: ReplicationClient,
        mut acks: Acks,
        mut progress: Progress,
        record: &mut PipelineRecord,
    ) -> Result<(), Error> {
        let waiting = acks.len();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while let Some((id, result)) = acks.next().await {
                match result {
                    Ok(()) => progress.acked(id),
                    Err(error) => tracing::warn!(%error, "event not acknowledged during shutdown"),
                }
            }
        })
        .await;
        if drained.is_err() {
            tracing::warn!(waiting, left = acks.len(), "shutdown: gave up waiting for Kafka");
        }
        self.confirm(&client, &progress, record).await?;
        if let Err(error) = client.shutdown().await {
            tracing::debug!(%error, "replication stream closed with an error");
        }
        // The worker may not have reported the last position before the stream closed; move the
        // slot there directly once the walsender has let go of it.
        let sql = self.params.connect_sql().await.map_err(Error::sql("connecting to confirm"))?;
        for _ in 0..50 {
            match slot::inspect(&sql, &self.cfg.slot).await? {
                Some(info) if info.active_pid.is_some() => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                _ => break,
            }
        }
        slot::advance(&sql, &self.cfg.slot, record.confirmed_lsn).await?;
        tracing::info!(slot = %self.cfg.slot, confirmed = %record.confirmed_lsn, "source stopped");
        Ok(())
    }
}
