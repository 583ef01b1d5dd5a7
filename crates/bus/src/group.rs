//! A consumer-group member that stores offsets only for messages its owner says are done.
//!
//! [`GroupMember`] owns the consumer, the hold book (`holds`), the assignment, pause and resume,
//! offset storing and the idle warning. Its owner (one loop) takes a hold for each piece of
//! work a message still has, releases it when that work is done, and calls [`GroupMember::tend`]
//! on a timer. Nothing else changes the holds.
//!
//! Rebalances: librdkafka runs the rebalance callbacks inside the owner's own
//! [`GroupMember::recv`], so the callbacks never wait for the owner. They only:
//! - on revoke: wait, bounded, for work other tasks still do on messages already taken
//!   ([`InFlight`]: for the sink, rows with the shard writers), commit the offsets stored so far (everything before them is done) and record
//!   which partitions went; the member then retires their holds (rows still in flight may release
//!   them; they never release holds of a later assignment) and tells the owner
//!   ([`GroupMember::take_revoked`]). The next owner re-reads from the commit, which is harmless:
//!   every row carries its source version;
//! - on assign: pause the new partitions and record them. The member resumes each one unless its
//!   owner holds consumption back or the partition still has retired holds (assigned back while
//!   rows of its revoked generation are in flight: it stays paused until they are released, so
//!   two generations never hold the same partition at once).
//!
//! A message fetched before its partition was revoked is dropped on arrival: the partition's
//! next owner reads it anew from the commit.
//!
//! Offsets are stored as "next to read" (`store_offsets` takes them as given; `store_offset`
//! would add one) and committed by librdkafka's auto-commit, on revoke and on close.

mod holds;
mod rebalance;

use std::collections::BTreeSet;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::client::OffsetReset;
use crate::config::KafkaConfig;
use crate::error::Error;
use holds::Holds;
use rebalance::{GroupContext, Mailbox, Rebalanced};

/// A Kafka message: (partition, offset).
pub type MsgId = (i32, i64);

/// Work that other tasks are doing on messages already taken (for the sink: rows handed to the
/// shard writers). It makes progress without the member's owner, so a revoke may wait for it
/// (blocking the callback's thread, bounded: the tasks doing the work must run on other threads,
/// as they do on tokio's multi-thread runtime).
#[derive(Clone, Debug, Default)]
pub struct InFlight(Arc<(Mutex<usize>, Condvar)>);

impl InFlight {
    /// `n` more units of work started.
    pub fn add(&self, n: usize) {
        if let Ok(mut count) = self.0.0.lock() {
            *count += n;
        }
    }

    /// `n` units of work finished.
    pub fn done(&self, n: usize) {
        if let Ok(mut count) = self.0.0.lock() {
            debug_assert!(*count >= n, "more work finished than started");
            *count = count.saturating_sub(n);
            if *count == 0 {
                self.0.1.notify_all();
            }
        }
    }

    /// Waits until nothing is in flight or `patience` ran out; true when nothing is.
    fn settle(&self, patience: Duration) -> bool {
        let Ok(count) = self.0.0.lock() else { return false };
        match self.0.1.wait_timeout_while(count, patience, |count| *count > 0) {
            Ok((count, _)) => *count == 0,
            Err(_) => false,
        }
    }
}

/// How long closing the consumer may take (librdkafka's close can block on the group).
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// One consumed message, owned.
#[derive(Clone, Debug)]
pub struct Message {
    /// Partition and offset.
    pub id: MsgId,
    /// The message key.
    pub key: Option<Vec<u8>>,
    /// The payload; `None` for a tombstone (which every consumer of the change topic skips).
    pub payload: Option<Vec<u8>>,
}

/// A member of a consumer group on one topic; see the module doc.
pub struct GroupMember {
    consumer: StreamConsumer<GroupContext>,
    mailbox: Arc<Mailbox>,
    group: String,
    topic: String,
    holds: Holds,
    assigned: BTreeSet<i32>,
    paused: BTreeSet<i32>,
    /// The owner asked to hold consumption back (its buffers are full).
    held_back: bool,
    /// Revoked since the owner last asked.
    revoked: Vec<i32>,
    unassigned_since: Option<Instant>,
    /// This idle stretch was reported at WARN already (later reports go to INFO).
    idle_reported: bool,
    warn_idle_after: Duration,
    /// Counts assignments absorbed; each partition remembers the count when it was last
    /// assigned ([`GroupMember::assigned_at`]).
    generation: u64,
    assigned_at: std::collections::HashMap<i32, u64>,
}

impl GroupMember {
    /// Joins `group` on `topic`. A member assigned nothing for `warn_idle_after` says so in the
    /// log (WARN, then INFO each further `warn_idle_after`) and stays in the group (see
    /// [`GroupMember::tend`]).
    pub fn join(
        cfg: &KafkaConfig,
        group: &str,
        topic: &str,
        reset: OffsetReset,
        warn_idle_after: Duration,
        in_flight: InFlight,
    ) -> Result<Self, Error> {
        let mailbox = Arc::new(Mailbox::default());
        let context = GroupContext::new(Arc::clone(&mailbox), topic, in_flight);
        let consumer: StreamConsumer<GroupContext> =
            crate::client::consumer(cfg, group, reset, context)?;
        consumer.subscribe(&[topic]).map_err(|source| Error::Consume {
            context: format!("subscribing to {topic}"),
            source,
        })?;
        Ok(GroupMember {
            consumer,
            mailbox,
            group: group.to_owned(),
            topic: topic.to_owned(),
            holds: Holds::default(),
            assigned: BTreeSet::new(),
            paused: BTreeSet::new(),
            held_back: false,
            revoked: Vec::new(),
            unassigned_since: Some(Instant::now()),
            idle_reported: false,
            warn_idle_after,
            generation: 0,
            assigned_at: Default::default(),
        })
    }

    /// Waits for the next message, then takes up to `max` that are ready. Each returned message
    /// is held until its owner releases it.
    pub async fn recv(&mut self, max: usize) -> Result<Vec<Message>, Error> {
        let first = self.consumer.recv().await.map_err(|source| Error::Consume {
            context: format!("consuming {}", self.topic),
            source,
        })?;
        let stamp = |mailbox: &Mailbox| mailbox.revocations();
        let mut batch = vec![(stamp(&self.mailbox), owned(&first))];
        drop(first);
        while batch.len() < max {
            match self.consumer.recv().now_or_never() {
                Some(Ok(m)) => batch.push((stamp(&self.mailbox), owned(&m))),
                _ => break,
            }
        }
        let gone = self.absorb();
        // Fetched before their partition was revoked: the next owner (maybe this member again)
        // reads them anew from the commit.
        batch.retain(|(stamp, m)| !gone.iter().any(|(at, p)| *p == m.id.0 && stamp < at));
        for (_, message) in &batch {
            self.holds.received(message.id);
        }
        Ok(batch.into_iter().map(|(_, m)| m).collect())
    }

    /// Takes another hold on a message received.
    pub fn hold(&mut self, msg: MsgId) {
        self.holds.hold(msg);
    }

    /// Releases one hold of a message.
    pub fn release(&mut self, msg: MsgId) {
        self.holds.release(msg);
    }

    /// Partitions revoked since the last call (their holds are already retired).
    pub fn take_revoked(&mut self) -> Vec<i32> {
        self.absorb();
        std::mem::take(&mut self.revoked)
    }

    /// The assignment generation now: a count of the assignments absorbed so far.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The generation at which `partition` was last assigned to this member (`u64::MAX` when it
    /// is not known to be assigned). Work this member did while owning a partition since an
    /// earlier generation covered every message of it this member read.
    pub fn assigned_at(&self, partition: i32) -> u64 {
        match self.assigned.contains(&partition) {
            true => self.assigned_at.get(&partition).copied().unwrap_or(u64::MAX),
            false => u64::MAX,
        }
    }

    /// Asks to hold all consumption back (true) or to resume it (false); applied by
    /// [`GroupMember::tend`].
    pub fn hold_back(&mut self, on: bool) {
        self.held_back = on;
    }

    /// True while consumption is held back.
    pub fn is_held_back(&self) -> bool {
        self.held_back
    }

    /// Housekeeping, on the owner's timer: act on rebalances, pause or resume, store the offsets
    /// that moved, and warn when assigned nothing for too long.
    ///
    /// An idle member never leaves to rejoin: with more members than partitions idleness is
    /// normal (leaving would churn the whole group), and a LeaveGroup from the leader of a group
    /// that is still forming wedged stock tansu 0.6.0's coordinator for good (fix 1 in
    /// deploy/local/tansu-0.6.0-coordinator.patch).
    pub fn tend(&mut self) -> Result<(), Error> {
        self.absorb();
        self.reconcile_pauses()?;
        self.store_offsets();
        self.warn_if_idle();
        Ok(())
    }

    /// Stores what is done, commits it and closes the consumer (bounded: librdkafka's close can
    /// hang on some brokers).
    pub async fn close(mut self) {
        self.absorb();
        self.store_offsets();
        if let Err(error) = self.consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(%error, "final commit");
        }
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        let consumer = self.consumer;
        std::thread::spawn(move || {
            drop(consumer);
            let _ = done_tx.send(());
        });
        if tokio::time::timeout(CLOSE_TIMEOUT, done_rx).await.is_err() {
            tracing::warn!("kafka consumer close did not finish within {CLOSE_TIMEOUT:?}");
        }
    }

    /// Acts on what the callbacks recorded; returns the revocations, each with its count.
    fn absorb(&mut self) -> Vec<(u64, i32)> {
        let mut gone = Vec::new();
        for event in self.mailbox.take() {
            match event {
                Rebalanced::Revoked { at, partitions } => {
                    for p in partitions {
                        self.holds.revoke(p);
                        self.assigned.remove(&p);
                        self.paused.remove(&p);
                        self.revoked.push(p);
                        gone.push((at, p));
                    }
                }
                Rebalanced::Assigned(partitions) => {
                    let back: Vec<i32> =
                        partitions.iter().copied().filter(|p| self.holds.has_retired(*p)).collect();
                    if !back.is_empty() {
                        tracing::info!(topic = %self.topic, partitions = ?back, "assigned back while rows of the revoked assignment are in flight: paused until they are acknowledged");
                    }
                    self.generation += 1;
                    for &p in &partitions {
                        self.assigned_at.insert(p, self.generation);
                    }
                    self.assigned.extend(partitions.iter().copied());
                    self.paused.extend(partitions);
                }
            }
        }
        gone
    }

    /// Pauses what must wait, resumes what may go on.
    fn reconcile_pauses(&mut self) -> Result<(), Error> {
        let wait = |p: i32| self.held_back || self.holds.has_retired(p);
        let pause: Vec<i32> = self
            .assigned
            .iter()
            .copied()
            .filter(|p| wait(*p) && !self.paused.contains(p))
            .collect();
        let resume: Vec<i32> = self
            .paused
            .iter()
            .copied()
            .filter(|p| !wait(*p) && self.assigned.contains(p))
            .collect();
        if !pause.is_empty() {
            self.consumer.pause(&self.list(&pause)).map_err(|source| Error::Consume {
                context: format!("pausing {} partitions {pause:?}", self.topic),
                source,
            })?;
            self.paused.extend(pause);
        }
        if !resume.is_empty() {
            self.consumer.resume(&self.list(&resume)).map_err(|source| Error::Consume {
                context: format!("resuming {} partitions {resume:?}", self.topic),
                source,
            })?;
            for p in resume {
                self.paused.remove(&p);
            }
        }
        Ok(())
    }

    fn list(&self, partitions: &[i32]) -> TopicPartitionList {
        let mut list = TopicPartitionList::new();
        for p in partitions {
            list.add_partition(&self.topic, *p);
        }
        list
    }

    fn store_offsets(&mut self) {
        let storable = self.holds.storable();
        if storable.is_empty() {
            return;
        }
        let mut list = TopicPartitionList::new();
        for (partition, offset) in storable {
            if let Err(error) =
                list.add_partition_offset(&self.topic, partition, Offset::Offset(offset))
            {
                tracing::warn!(%error, partition, offset, "cannot list an offset to store");
            }
        }
        if let Err(error) = self.consumer.store_offsets(&list) {
            tracing::debug!(%error, "storing offsets failed (partition revoked?)");
        }
    }

    fn warn_if_idle(&mut self) {
        if !self.assigned.is_empty() {
            self.unassigned_since = None;
            self.idle_reported = false;
            return;
        }
        let since = *self.unassigned_since.get_or_insert_with(Instant::now);
        if since.elapsed() < self.warn_idle_after {
            return;
        }
        const IDLE: &str = "no partitions assigned: this member is idle (more members than \
            partitions?) or the broker's group coordinator is stuck (the group's lag in \
            `scoresync status` shows whether its partitions are consumed at all; restarting the \
            sinks makes the group form again)";
        let (waited, topic, group) = (since.elapsed(), &self.topic, &self.group);
        if self.idle_reported {
            tracing::info!(?waited, %topic, %group, "{IDLE}");
        } else {
            tracing::warn!(?waited, %topic, %group, "{IDLE}");
        }
        self.idle_reported = true;
        self.unassigned_since = Some(Instant::now());
    }
}

fn owned(message: &rdkafka::message::BorrowedMessage<'_>) -> Message {
    Message {
        id: (message.partition(), message.offset()),
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec),
    }
}
