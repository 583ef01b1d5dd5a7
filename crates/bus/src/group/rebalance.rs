//! The rebalance callbacks. librdkafka runs them inside the owner's own poll, so they never wait
//! for the owner: they record what happened in a [`Mailbox`] the member reads, pause newly
//! assigned partitions, and commit the offsets stored so far. A revoke first waits, at most
//! [`REVOKE_PATIENCE`], for work other tasks are doing on messages already taken ([`InFlight`]:
//! rows with the shard writers), which progresses without the owner: so the next owner of a
//! partition usually starts after our last writes to it have landed.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::InFlight;

/// Longest a revoke waits for in-flight work (the group waits for the revoke meanwhile).
const REVOKE_PATIENCE: Duration = Duration::from_millis(1_000);

/// What the rebalance callbacks saw, for the member to act on.
#[derive(Debug)]
pub(super) enum Rebalanced {
    /// These partitions were revoked; `at` is the revocation count after it.
    Revoked { at: u64, partitions: Vec<i32> },
    /// These partitions were assigned (and paused).
    Assigned(Vec<i32>),
}

/// Shared between the callbacks and the member: the callbacks only append.
#[derive(Debug, Default)]
pub(super) struct Mailbox {
    events: Mutex<Vec<Rebalanced>>,
    /// Revocations so far: messages are stamped with it as they arrive.
    revocations: AtomicU64,
}

impl Mailbox {
    /// Revocations so far.
    pub(super) fn revocations(&self) -> u64 {
        self.revocations.load(Ordering::Acquire)
    }

    fn post(&self, event: Rebalanced) {
        if let Ok(mut events) = self.events.lock() {
            events.push(event);
        }
    }

    pub(super) fn take(&self) -> Vec<Rebalanced> {
        self.events.lock().map(|mut e| std::mem::take(&mut *e)).unwrap_or_default()
    }
}

/// The consumer's callbacks: record, pause, commit what is stored; never wait for the owner.
pub(crate) struct GroupContext {
    mailbox: Arc<Mailbox>,
    topic: String,
    in_flight: InFlight,
}

impl GroupContext {
    pub(super) fn new(mailbox: Arc<Mailbox>, topic: &str, in_flight: InFlight) -> Self {
        GroupContext { mailbox, topic: topic.to_owned(), in_flight }
    }
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let partitions: Vec<i32> = match rebalance {
            Rebalance::Revoke(partitions) => {
                partitions.elements().iter().map(|e| e.partition()).collect()
            }
            // librdkafka unassigns everything after a rebalance error: treat it as a revoke of
            // the whole assignment, so no hold of it is mistaken for a later one's.
            Rebalance::Error(error) => {
                tracing::warn!(topic = %self.topic, %error, "rebalance error: dropping the assignment");
                consumer
                    .assignment()
                    .map(|a| a.elements().iter().map(|e| e.partition()).collect())
                    .unwrap_or_default()
            }
            Rebalance::Assign(_) => return,
        };
        let started = Instant::now();
        let waited = self.in_flight.settle(REVOKE_PATIENCE);
        if let Err(error) = consumer.commit_consumer_state(CommitMode::Sync) {
            tracing::debug!(%error, "commit on revoke (nothing stored yet?)");
        }
        let at = self.mailbox.revocations.fetch_add(1, Ordering::AcqRel) + 1;
        tracing::info!(
            topic = %self.topic,
            partitions = ?partitions,
            revoke_ms = started.elapsed().as_millis() as u64,
            in_flight_settled = waited,
            "partitions revoked"
        );
        self.mailbox.post(Rebalanced::Revoked { at, partitions });
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(partitions) = rebalance else { return };
        // Paused before the first fetch; the member resumes what may be consumed.
        if let Err(error) = consumer.pause(partitions) {
            tracing::error!(%error, "pausing newly assigned partitions failed");
        }
        let list: Vec<i32> = partitions.elements().iter().map(|e| e.partition()).collect();
        report_start(consumer, &self.topic, partitions);
        self.mailbox.post(Rebalanced::Assigned(list));
    }
}

/// Logs where each assigned partition starts, and says so loudly when retention deleted
/// messages the group never committed past.
fn report_start(
    consumer: &BaseConsumer<GroupContext>,
    topic: &str,
    partitions: &TopicPartitionList,
) {
    let committed = consumer.committed_offsets(partitions.clone(), Duration::from_secs(10)).ok();
    for element in partitions.elements() {
        let partition = element.partition();
        let committed =
            committed.as_ref().and_then(|c| c.find_partition(topic, partition)).map(|e| e.offset());
        let low =
            consumer.fetch_watermarks(topic, partition, Duration::from_secs(10)).ok().map(|w| w.0);
        match (committed, low) {
            (Some(Offset::Offset(at)), Some(low)) if at < low => tracing::error!(
                topic,
                partition,
                committed = at,
                earliest_retained = low,
                "committed offset is older than the earliest retained message: events were deleted by \
                 retention before they were applied; ClickHouse may miss changes (run verify --repair)"
            ),
            (Some(Offset::Offset(at)), _) => {
                tracing::info!(topic, partition, from = at, "partition assigned")
            }
            _ => tracing::warn!(
                topic,
                partition,
                "partition assigned with no committed offset: starting at the earliest retained message"
            ),
        }
    }
}
