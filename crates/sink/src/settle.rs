//! Settling one event: apply it, park it, or dead-letter it, in one place for every path (a
//! message read just now, or a parked event retried).
//!
//! The order of the rules:
//! 0. An attempt whose partition was revoked since it was taken is dropped, before and after
//!    the flush that may absorb the revocation, its retired hold released; the new owner reads
//!    it again ([`Settled::PartitionRevoked`]). A live change of a row takes over the old
//!    identity of the parked change it supersedes (`Park::inherit`), so that change's delete
//!    marker still goes.
//! 1. A change of a scorecard with an earlier change parked, or of a partition with an earlier
//!    TRUNCATE parked, waits behind it (see [`crate::park`]).
//! 2. Apply. A change that reads back stored rows first has every buffered row acknowledged
//!    (bounded by [`FLUSH_PATIENCE`]: a shard that is slow or down parks the change instead of
//!    stalling every partition).
//! 3. Applied: an older parked change of the same row is superseded (its hold released), the
//!    scorecard's changes parked behind are woken, a TRUNCATE drops the parked changes it made
//!    moot (already when its job starts) and wakes its partition, and the message's own hold is
//!    released.
//! 4. Parked (a dependency not there yet, or unavailable): kept with its reason, hold kept.
//! 5. Poison: dead-lettered; the hold is released once the letter is acknowledged.
//!
//! A permanent error stops the sink.

use std::time::{Duration, Instant};

use error_reporter::Report;
use scoresync_bus::group::Message;
use scoresync_event::{ChangeEvent, Operation, RowVersion, SourceTable};
use tokio_util::sync::CancellationToken;

use crate::apply::{Decision, Ownership, event_row_key};
use crate::batch::MsgId;
use crate::error::Error;
use crate::park::{ParkReason, Parked};
use crate::rows::RowKey;
use crate::stage::Loop;

/// How long an event that reads back stored rows (a move, a TRUNCATE) waits for earlier rows to
/// be acknowledged before it is parked instead (a shard may be down). After a wait ran out, the
/// next ones within the same span give up at once: a shard that hangs costs one wait, not one
/// per event.
const FLUSH_PATIENCE: Duration = Duration::from_secs(10);

/// An event on its way to being settled.
pub(crate) enum Attempt {
    /// Read from the topic just now.
    Live(Message, ChangeEvent),
    /// Parked before, due for a retry (keeps its attempts and age when parked again).
    Retry(RowKey, Parked),
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Settled {
    Applied,
    Parked,
    DeadLettered,
    /// Shutdown came first (a live event keeps its hold and is read again).
    Interrupted,
    /// Its partition was revoked since it was taken: the new owner reads it again.
    PartitionRevoked,
}

impl Settled {
    /// False when shutdown interrupted it.
    pub(crate) fn finished(self) -> bool {
        self != Settled::Interrupted
    }

    pub(crate) fn applied(self) -> bool {
        self == Settled::Applied
    }
}

/// How a bounded flush ended.
enum Flushed {
    Done,
    Shutdown,
    TimedOut,
    Failed(Error),
}

impl Attempt {
    fn msg(&self) -> MsgId {
        match self {
            Attempt::Live(message, _) => message.id,
            Attempt::Retry(_, parked) => parked.msg,
        }
    }

    fn event(&self) -> &ChangeEvent {
        match self {
            Attempt::Live(_, event) => event,
            Attempt::Retry(_, parked) => &parked.event,
        }
    }

    fn row(&self) -> Option<RowKey> {
        match self {
            Attempt::Live(message, event) => SourceTable::from_name(&event.schema, &event.table)
                .map(|table| match event.op() {
                    // Each partition's copy of a TRUNCATE parks on its own (see `park`).
                    Operation::Truncate => {
                        (table, vec![format!("TRUNCATE in partition {}", message.id.0)])
                    }
                    _ => event_row_key(table, event),
                }),
            Attempt::Retry(row, _) => Some(row.clone()),
        }
    }
}

impl Loop {
    /// True when `msg`'s partition was revoked after `epoch`.
    fn revoked_since(&self, (partition, _): MsgId, epoch: u64) -> bool {
        self.revoked_at.get(&partition).is_some_and(|at| *at > epoch)
    }
}

fn unacknowledged() -> ParkReason {
    ParkReason::Unavailable("earlier rows to be acknowledged by every shard".into())
}

impl Loop {
    /// Settles one event; see the module doc.
    /// `epoch` is the revoke epoch when the attempt was taken (read, or taken out of the park).
    pub(crate) async fn settle(
        &mut self,
        mut attempt: Attempt,
        epoch: u64,
        shutdown: &CancellationToken,
    ) -> Result<Settled, Error> {
        let (msg, row) = (attempt.msg(), attempt.row());
        if self.revoked_since(msg, epoch) {
            // The revocation retired its hold; releasing it lets the partition come back.
            self.group.release(msg);
            return Ok(Settled::PartitionRevoked);
        }
        if let (Some(key), Attempt::Live(_, event)) = (&row, &mut attempt) {
            self.park.inherit(key, event);
        }
        if let Some(key) = &row
            && let Some(reason) = self.park.behind(key, attempt.event(), msg)
        {
            return self.park_attempt(attempt, row, reason);
        }
        let decision = match self.apply_flushing(msg, attempt.event(), epoch, shutdown).await {
            Some(decision) => decision,
            None => {
                if let Attempt::Retry(row, parked) = attempt {
                    let reason = parked.reason.clone();
                    self.park.repark(row, parked, reason);
                }
                return Ok(Settled::Interrupted);
            }
        };
        // A flush absorbs revocations: an attempt whose partition went meanwhile is stale
        // (`apply_flushing` did not apply it again; rows it added before were purged).
        if self.revoked_since(msg, epoch) {
            // The revocation retired its hold; releasing it lets the partition come back.
            self.group.release(msg);
            return Ok(Settled::PartitionRevoked);
        }
        match decision {
            Ok(Decision::Applied) => {
                self.applied(attempt.event(), row.as_ref(), msg);
                Ok(Settled::Applied)
            }
            Ok(Decision::Park(reason)) => {
                if matches!(reason, ParkReason::TruncateRunning(_)) {
                    // Its job started: older parked changes of the table are dead already.
                    self.drop_truncated(attempt.event());
                }
                self.park_attempt(attempt, row, reason)
            }
            Ok(Decision::NeedsFlush) => self.park_attempt(attempt, row, unacknowledged()),
            Ok(Decision::Poison(error)) => {
                self.park.wake_scorecard(attempt.event());
                self.dead_letter(attempt, &error)?;
                Ok(Settled::DeadLettered)
            }
            Err(err) if err.is_transient() => {
                let error = Report::new(&err).to_string();
                let (partition, offset) = msg;
                match attempt {
                    Attempt::Live(..) => {
                        tracing::warn!(partition, offset, %error, "cannot apply now; parking")
                    }
                    Attempt::Retry(..) => {
                        tracing::debug!(partition, offset, %error, "retrying a parked event failed")
                    }
                }
                self.park_attempt(attempt, row, ParkReason::Unavailable(dependency(&err)))
            }
            Err(err) => Err(err),
        }
    }

    /// Applies, and when the event asks for it, flushes (bounded) and applies once more.
    /// `None` when shutdown came first.
    async fn apply_flushing(
        &mut self,
        msg: MsgId,
        event: &ChangeEvent,
        epoch: u64,
        shutdown: &CancellationToken,
    ) -> Option<Result<Decision, Error>> {
        let first = self.apply_holding(msg, event).await;
        if !matches!(first, Ok(Decision::NeedsFlush)) {
            return Some(first);
        }
        match self.flush_within(shutdown).await {
            // Revoked during the flush: not applied again (the caller drops it).
            Flushed::Done if self.revoked_since(msg, epoch) => Some(Ok(Decision::NeedsFlush)),
            Flushed::Done => {
                // What the last prefetch found on no shard may be there now.
                self.applier.locate.forget_absent();
                Some(self.apply_holding(msg, event).await)
            }
            Flushed::Shutdown => None,
            Flushed::TimedOut => Some(Ok(Decision::Park(unacknowledged()))),
            Flushed::Failed(error) => Some(Err(error)),
        }
    }

    /// Applies once; every message that put rows into a buffer is held until its batch is
    /// acknowledged.
    async fn apply_holding(&mut self, msg: MsgId, event: &ChangeEvent) -> Result<Decision, Error> {
        let flushed = self.flushed();
        let ownership = Ownership {
            owned_since: self.group.assigned_at(msg.0),
            generation: self.group.generation(),
        };
        let decision = self.applier.apply(msg, event, flushed, ownership).await;
        for held in self.applier.take_fresh_holds() {
            self.group.hold(held);
        }
        self.hand_off();
        decision
    }

    /// Parked changes of a TRUNCATE's table older than it are moot once its job started.
    fn drop_truncated(&mut self, truncate: &ChangeEvent) {
        if let Some(table) = SourceTable::from_name(&truncate.schema, &truncate.table) {
            for moot in self.park.drop_older(table, RowVersion::of_event(truncate).0) {
                self.group.release(moot);
            }
        }
    }

    fn applied(&mut self, event: &ChangeEvent, row: Option<&RowKey>, msg: MsgId) {
        if event.op() == Operation::Truncate {
            self.drop_truncated(event);
            self.park.wake_partition(msg.0);
        }
        if let Some(row) = row
            && let Some(older) = self.park.supersede(row, event)
        {
            self.group.release(older);
        }
        self.park.wake_scorecard(event);
        self.stats.applied();
        self.group.release(msg);
    }

    fn park_attempt(
        &mut self,
        attempt: Attempt,
        row: Option<RowKey>,
        reason: ParkReason,
    ) -> Result<Settled, Error> {
        let Some(row) = row else {
            // Only events of a known table reach a park decision; anything else is poison.
            self.dead_letter(attempt, &format!("cannot park ({reason}): unknown table"))?;
            return Ok(Settled::DeadLettered);
        };
        match attempt {
            Attempt::Retry(_, parked) if self.waited_too_long(&parked, &reason) => {
                let limit = self.config.unknown_scorecard_timeout_ms as f64 / 1000.0;
                let error = format!(
                    "{reason} within {limit} s (sink.unknown_scorecard_timeout_ms); \
                     redrive it once the scorecard exists"
                );
                self.dead_letter(Attempt::Retry(row, parked), &error)?;
                return Ok(Settled::DeadLettered);
            }
            Attempt::Retry(_, parked) => self.park.repark(row, parked, reason),
            Attempt::Live(message, event) => {
                tracing::debug!(partition = message.id.0, offset = message.id.1, %reason, "parked");
                if let Some(unneeded) = self.park.park(row, message.id, event, reason) {
                    self.group.release(unneeded);
                }
            }
        }
        Ok(Settled::Parked)
    }

    /// True when a parked change has waited for its scorecard longer than
    /// `sink.unknown_scorecard_timeout_ms` (the only wait that ends in the dead-letter topic:
    /// conversations and dependencies are waited for until they appear or an operator acts).
    /// The clock runs from when the change began waiting for its scorecard, and stops while
    /// another change of the scorecard (the card itself, say) is parked too.
    fn waited_too_long(&self, parked: &Parked, reason: &ParkReason) -> bool {
        let limit = Duration::from_millis(self.config.unknown_scorecard_timeout_ms);
        let unknown_since = match parked.reason {
            ParkReason::ScorecardUnknown(_) => parked.reason_since,
            _ => Instant::now(),
        };
        matches!(reason, ParkReason::ScorecardUnknown(_))
            && unknown_since.elapsed() >= limit
            && !self.park.card_has_other(&parked.event, parked.msg)
    }

    fn dead_letter(&mut self, attempt: Attempt, error: &str) -> Result<(), Error> {
        match attempt {
            Attempt::Live(message, _) => {
                let payload = message.payload.as_deref().unwrap_or_default();
                self.dead_letter_bytes(message.id, message.key.as_deref(), payload, error)
            }
            Attempt::Retry(_, parked) => {
                // The key the source gave it; a redrive goes back to its origin partition.
                let key = scoresync_event::message_key(&parked.event);
                let payload = scoresync_event::encode(&parked.event);
                self.dead_letter_bytes(parked.msg, key.as_deref(), &payload, error)
            }
        }
    }

    /// Sends a copy of message `msg` to the dead-letter topic (every path that dead-letters ends
    /// here); its hold is released once the copy is acknowledged.
    pub(crate) fn dead_letter_bytes(
        &mut self,
        msg: MsgId,
        key: Option<&[u8]>,
        payload: &[u8],
        error: &str,
    ) -> Result<(), Error> {
        self.outbox.send(msg, key, payload, error)?;
        self.stats.dead_lettered();
        Ok(())
    }

    /// Sends every buffered row and waits, at most [`FLUSH_PATIENCE`], until ClickHouse
    /// acknowledged all of it.
    async fn flush_within(&mut self, shutdown: &CancellationToken) -> Flushed {
        if self.flush_timed_out_at.is_some_and(|at| at.elapsed() < FLUSH_PATIENCE) {
            self.flush_ready();
            return Flushed::TimedOut;
        }
        match tokio::time::timeout(FLUSH_PATIENCE, self.flush_and_wait(shutdown)).await {
            Ok(Ok(true)) => {
                self.flush_timed_out_at = None;
                Flushed::Done
            }
            Ok(Ok(false)) => Flushed::Shutdown,
            Ok(Err(error)) => Flushed::Failed(error),
            Err(_) => {
                self.flush_timed_out_at = Some(Instant::now());
                Flushed::TimedOut
            }
        }
    }

    /// Sends every buffered row and waits until ClickHouse acknowledged all of it (move markers
    /// that an acknowledgement let go included). `Ok(false)` when shutdown came first.
    pub(crate) async fn flush_and_wait(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<bool, Error> {
        loop {
            for batch in self.applier.batcher.drain() {
                self.send(batch);
            }
            if self.pool.in_flight_rows() == 0 {
                return Ok(true);
            }
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                ack = self.pool.ack() => match ack {
                    Some(ack) => self.on_ack(ack)?,
                    None => return Err(Error::WritersStopped),
                },
            }
        }
    }
}

/// What an applying error waits for, for the park reason.
fn dependency(err: &Error) -> String {
    match (err.shard_index(), err) {
        (Some(shard), _) => format!("clickhouse shard {shard}"),
        (None, Error::Postgres { .. } | Error::PostgresTimeout { .. }) => "postgres".into(),
        (None, other) => Report::new(other).to_string(),
    }
}
