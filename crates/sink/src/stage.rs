//! The sink loop: takes messages from the group member, applies them, hands batches to the
//! shard writers and releases offset holds as acknowledgements come back.
//!
//! Priorities: shutdown, then acknowledgements (writers, then dead letters), then the timer
//! (flush aged batches, retry parked events, hold back or resume, the member's housekeeping),
//! then new messages. Memory stays bounded, in rows and in bytes: when buffered plus in-flight
//! rows reach `max_buffered_rows` or their estimated bytes `max_buffered_bytes`, or parked events
//! reach `max_parked_events` or `max_parked_bytes`, consumption is held back (the loop keeps
//! polling, so the member stays in its group) until every one of them is back under half.
//! How one event's outcome is settled (applied, parked, dead-lettered) is in [`crate::settle`].
//! Revocations reach the loop only through [`GroupMember::take_revoked`], at the start of each
//! turn ([`Loop::forget_revoked`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use error_reporter::Report;
use scoresync_bus::group::{GroupMember, Message};
use scoresync_event::decode;

use crate::apply::Applier;
use crate::config::SinkConfig;
use crate::dlq::Outbox;
use crate::error::Error;
use crate::handoff::Handoff;
use crate::park::Park;
use crate::scope::Scope;
use crate::settle::Attempt;
use crate::stats::{ParkedSnapshot, SinkStats};
use crate::writer::{Ack, WriterPool};

/// Most messages taken from the consumer in one go (then lookups are batched for them).
const POLL_BATCH: usize = 500;
/// How long shutdown waits for buffered rows to reach ClickHouse.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(30);

/// The loop's state: every piece has one owner, this loop.
pub(crate) struct Loop {
    pub(crate) group: GroupMember,
    pub(crate) applier: Applier,
    pub(crate) park: Park,
    pub(crate) pool: WriterPool,
    pub(crate) outbox: Outbox,
    /// Old-shard markers of moves waiting for the new shard's acknowledgement.
    pub(crate) handoff: Handoff,
    pub(crate) stats: Arc<SinkStats>,
    pub(crate) config: SinkConfig,
    /// What this run applies (everything, for the daemon).
    pub(crate) scope: Scope,
    /// When a bounded wait for acknowledgements last ran out (see [`crate::settle`]).
    pub(crate) flush_timed_out_at: Option<Instant>,
    /// Counts the revocations this loop has absorbed ([`Loop::forget_revoked`]).
    pub(crate) revoke_epoch: u64,
    /// The epoch each partition was last revoked at: an attempt taken before that (read in a
    /// batch, or taken out of the park) is stale, its holds retired, and is dropped, not applied
    /// or parked again (the partition's owner reads it again).
    pub(crate) revoked_at: std::collections::HashMap<i32, u64>,
}

impl Loop {
    /// Runs until shutdown (`Ok`) or a permanent error.
    pub(crate) async fn run(&mut self, shutdown: &CancellationToken) -> Result<(), Error> {
        let period = Duration::from_millis((self.config.max_wait_ms / 2).clamp(20, 500));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_park_retry = Instant::now();
        loop {
            tokio::select! {
                biased;
                // 1. Shutdown.
                _ = shutdown.cancelled() => return Ok(()),
                // 2. Acknowledgements: writers, then dead letters.
                Some(ack) = self.pool.ack() => self.on_ack(ack)?,
                letter = self.outbox.ack() => self.group.release(letter?),
                // 3. Timer: flush aged batches, retry parked events, hold back or resume.
                _ = tick.tick() => {
                    self.pool.check()?;
                    self.forget_revoked();
                    self.release_handoff()?;
                    self.flush_ready();
                    let retry_every = Duration::from_millis(self.config.park_retry_ms);
                    if last_park_retry.elapsed() >= retry_every {
                        last_park_retry = Instant::now();
                        if !self.retry_parked(shutdown).await? {
                            return Ok(());
                        }
                    }
                    self.hold_back_or_resume();
                    self.group.tend()?;
                    self.publish_stats();
                }
                // 4. New messages.
                polled = self.group.recv(POLL_BATCH) => {
                    let batch = polled?;
                    self.forget_revoked();
                    if !self.process(batch, shutdown).await? {
                        return Ok(());
                    }
                    self.flush_ready();
                }
            }
        }
    }

    /// A batch is in ClickHouse: its messages' holds go, and the move markers that waited for
    /// it go to the batcher.
    pub(crate) fn on_ack(&mut self, ack: Ack) -> Result<(), Error> {
        // A revoke recorded since the last turn goes first: its partitions' queued rows and
        // waiting markers must not be sent.
        self.forget_revoked();
        for origin in ack.origins {
            self.group.release(origin);
        }
        self.release_handoff()
    }

    /// Sends every buffered row to the writers and makes the move markers the applier handed
    /// over wait until those rows are acknowledged ([`crate::handoff`]).
    pub(crate) fn hand_off(&mut self) {
        let waiting = self.applier.take_handoff();
        if waiting.is_empty() {
            return;
        }
        for batch in self.applier.batcher.drain() {
            self.send(batch);
        }
        self.handoff.wait(self.pool.last_seq(), waiting);
    }

    /// Moves the markers whose barrier is passed to the batcher; each gives back the hold it kept.
    fn release_handoff(&mut self) -> Result<(), Error> {
        for waiting in self.handoff.ready(self.pool.acknowledged_through()) {
            let msg = waiting.2;
            self.applier.add_handed_off(waiting)?;
            for held in self.applier.take_fresh_holds() {
                self.group.hold(held);
            }
            self.group.release(msg);
        }
        Ok(())
    }

    /// Drops what the sink kept for partitions revoked since the last call: their offset holds
    /// were retired by the group member; their parked events, and their rows not yet handed to a
    /// writer, are dropped (the next owner re-reads and writes them, so our late writes never land
    /// after its own). Where the cards of those partitions live is another owner's business
    /// meanwhile: the cache is read anew.
    fn forget_revoked(&mut self) {
        let gone = self.group.take_revoked();
        if gone.is_empty() {
            return;
        }
        self.revoke_epoch += 1;
        for &partition in &gone {
            self.revoked_at.insert(partition, self.revoke_epoch);
        }
        self.applier.locate.forget_cards();
        let mut released = self.applier.batcher.purge(&gone);
        released.extend(self.pool.purge(&gone));
        released.extend(self.handoff.purge(&gone));
        for &partition in &gone {
            released.extend(self.park.revoke(partition));
        }
        for msg in released {
            self.group.release(msg);
        }
    }

    /// Decodes and applies a poll batch. Returns false when shutdown interrupted it.
    async fn process(
        &mut self,
        batch: Vec<Message>,
        shutdown: &CancellationToken,
    ) -> Result<bool, Error> {
        self.stats.consumed(batch.len());
        let mut events = Vec::with_capacity(batch.len());
        for message in batch {
            let Some(payload) = &message.payload else {
                // A tombstone, for compaction only (`scoresync_event::layout`).
                self.group.release(message.id);
                continue;
            };
            match decode(payload) {
                Ok(event) if self.scope.skips_table(&event) => self.group.release(message.id),
                Ok(event) => events.push((message, event)),
                Err(err) => {
                    let key = message.key.as_deref();
                    self.dead_letter_bytes(
                        message.id,
                        key,
                        payload,
                        &Report::new(&err).to_string(),
                    )?;
                }
            }
        }
        let epoch = self.revoke_epoch;
        self.applier.locate.prefetch(events.iter().map(|(_, e)| e)).await;
        for (message, event) in events {
            if !self.settle(Attempt::Live(message, event), epoch, shutdown).await?.finished() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Retries parked events that are due. Returns false when shutdown interrupted it.
    async fn retry_parked(&mut self, shutdown: &CancellationToken) -> Result<bool, Error> {
        let epoch = self.revoke_epoch;
        let due = self.park.due(Instant::now());
        if due.is_empty() {
            return Ok(true);
        }
        self.applier.locate.prefetch(due.iter().map(|(_, p)| &p.event)).await;
        let mut applied = 0usize;
        for (row, parked) in due {
            let settled = self.settle(Attempt::Retry(row, parked), epoch, shutdown).await?;
            if !settled.finished() {
                return Ok(false);
            }
            applied += usize::from(settled.applied());
        }
        if applied > 0 {
            tracing::info!(applied, still_parked = self.park.len(), "parked events applied");
        }
        Ok(true)
    }

    /// Cuts the batches that are full or old enough and hands them to the writers.
    pub(crate) fn flush_ready(&mut self) {
        for batch in self.applier.batcher.ready(Instant::now()) {
            self.send(batch);
        }
    }

    /// Hands a batch to its shard's writer; a batch left empty by a purge is done at once.
    pub(crate) fn send(&mut self, batch: crate::batch::Batch) {
        if batch.rows.is_empty() {
            for origin in batch.origins {
                self.group.release(origin);
            }
            return;
        }
        self.pool.send(batch);
    }

    /// True when every row is in ClickHouse (nothing buffered, in flight or waiting in the
    /// handoff).
    pub(crate) fn flushed(&self) -> bool {
        self.applier.batcher.rows() == 0
            && self.pool.in_flight_rows() == 0
            && self.handoff.rows() == 0
    }

    fn publish_stats(&self) {
        let paused = self.group.is_held_back();
        self.stats.levels(self.backlog(), self.backlog_bytes(), self.park.bytes(), paused);
        let by_reason = self.park.by_reason().into_iter().map(|(k, v)| (k.to_owned(), v));
        self.stats
            .parked(ParkedSnapshot { by_reason: by_reason.collect(), events: self.park.summary() });
    }

    /// Shutdown: send what is buffered (move markers included, once their copies are in), wait
    /// (bounded) for it, release what is done.
    pub(crate) async fn drain(&mut self) {
        let never = CancellationToken::new();
        match tokio::time::timeout(SHUTDOWN_DRAIN, self.flush_and_wait(&never)).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => {
                tracing::warn!(%error, "shutdown: flushing failed; unacknowledged rows will be read again")
            }
            Err(_) => tracing::warn!(
                "shutdown: rows still unacknowledged after {SHUTDOWN_DRAIN:?}; they will be read again"
            ),
        }
        for msg in self.outbox.acknowledged_now() {
            self.group.release(msg);
        }
        self.publish_stats();
    }
}
