//! A topic's offsets and a consumer group's committed offsets, read without joining the group,
//! and set for a group no member has joined yet (how `scoresync replay` starts where it was
//! asked to). Blocking calls, each bounded by [`TIMEOUT`]: call them off the async workers.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message as _;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use crate::config::KafkaConfig;
use crate::error::Error;

/// Most bytes a timestamp read fetches from a partition.
const TIMESTAMP_FETCH_BYTES: usize = 64 * 1024;

/// How long one broker request may take.
pub const TIMEOUT: Duration = Duration::from_secs(30);

/// How far a group is behind on one partition.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct PartitionLag {
    /// The partition.
    pub partition: i32,
    /// The group's committed offset (`None`: nothing committed).
    pub committed: Option<i64>,
    /// The next offset to be written.
    pub high_watermark: i64,
    /// Messages between the committed offset (or the first retained one) and the end.
    pub lag: i64,
    /// Age of the oldest message not yet committed (from its timestamp, the change's commit
    /// time); 0 when nothing is behind.
    pub lag_seconds: f64,
}

/// Reads `topic`'s offsets and `group`'s committed offsets on it.
pub struct OffsetReader {
    consumer: BaseConsumer,
    topic: String,
    group: String,
    partitions: i32,
}

impl OffsetReader {
    /// A reader for `group` on `topic`, which must exist.
    pub fn open(kafka: &KafkaConfig, group: &str, topic: &str) -> Result<Self, Error> {
        // It fetches only to read one message's timestamp (a lag sample, every few seconds, on
        // every partition behind): a small fetch, not a batch of up to the message limit. The
        // broker still returns a whole first message however large.
        let consumer: BaseConsumer = crate::client::reader_config(kafka, group)
            .set("max.partition.fetch.bytes", TIMESTAMP_FETCH_BYTES.to_string())
            .create()
            .map_err(|source| Error::Client {
                role: "offset reader",
                brokers: kafka.brokers.clone(),
                source,
            })?;
        let partitions = crate::topics::partition_count(consumer.client(), topic)?
            .ok_or_else(|| Error::MissingTopic { topic: topic.into() })?;
        Ok(OffsetReader { consumer, topic: topic.into(), group: group.into(), partitions })
    }

    /// The topic's partition count.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    fn fail(&self, action: &'static str) -> impl Fn(KafkaError) -> Error + '_ {
        move |source| Error::Topic { topic: self.topic.clone(), action, source }
    }

    fn list(
        &self,
        offsets: impl IntoIterator<Item = (i32, Offset)>,
    ) -> Result<TopicPartitionList, Error> {
        let mut list = TopicPartitionList::new();
        for (partition, offset) in offsets {
            list.add_partition_offset(&self.topic, partition, offset)
                .map_err(self.fail("list a partition's offset"))?;
        }
        Ok(list)
    }

    /// Low and high watermark of each partition (the first retained offset and the next one to
    /// be written).
    pub fn watermarks(&self) -> Result<BTreeMap<i32, (i64, i64)>, Error> {
        (0..self.partitions)
            .map(|p| {
                let marks = self.consumer.fetch_watermarks(&self.topic, p, TIMEOUT);
                let marks = marks.map_err(|source| Error::Consume {
                    context: format!("reading the watermarks of {} partition {p}", self.topic),
                    source,
                })?;
                Ok((p, marks))
            })
            .collect()
    }

    /// Messages the topic retains (high minus low watermark, summed; compaction may have
    /// removed some in between).
    pub fn messages(&self) -> Result<i64, Error> {
        Ok(self.watermarks()?.values().map(|(low, high)| high - low).sum())
    }

    /// The group's committed offset of each partition (`None`: nothing committed).
    pub fn committed(&self) -> Result<BTreeMap<i32, Option<i64>>, Error> {
        let query = self.list((0..self.partitions).map(|p| (p, Offset::Invalid)))?;
        let answer =
            self.consumer.committed_offsets(query, TIMEOUT).map_err(|source| Error::Consume {
                context: format!(
                    "reading group {}'s committed offsets on {}",
                    self.group, self.topic
                ),
                source,
            })?;
        Ok((0..self.partitions)
            .map(|p| {
                let at = answer.find_partition(&self.topic, p).and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
                (p, at)
            })
            .collect())
    }

    /// The group's lag on every partition, at `now_ms` (Unix milliseconds). Reads the first
    /// uncommitted message of each partition that is behind, for its timestamp.
    pub fn lag(&self, now_ms: i64) -> Result<Vec<PartitionLag>, Error> {
        let committed = self.committed()?;
        let mut lags = Vec::new();
        for (partition, (low, high)) in self.watermarks()? {
            let at = committed.get(&partition).copied().flatten();
            let next = at.unwrap_or(low).max(low);
            let lag = (high - next).max(0);
            let oldest = if lag > 0 { self.timestamp_at(partition, next, high)? } else { None };
            let lag_seconds = oldest.map_or(0.0, |ms| (now_ms - ms).max(0) as f64 / 1e3);
            lags.push(PartitionLag {
                partition,
                committed: at,
                high_watermark: high,
                lag,
                lag_seconds,
            });
        }
        Ok(lags)
    }

    /// Commits `offsets` (partition to next offset to read) for the group. For a group with no
    /// member: a member's own commits would race this one.
    pub fn commit(&self, offsets: &BTreeMap<i32, i64>) -> Result<(), Error> {
        let list = self.list(offsets.iter().map(|(p, o)| (*p, Offset::Offset(*o))))?;
        self.consumer.commit(&list, CommitMode::Sync).map_err(|source| Error::Consume {
            context: format!("committing group {}'s start offsets on {}", self.group, self.topic),
            source,
        })
    }

    /// Per partition, the first offset whose message has a timestamp at or after `ms` (Unix
    /// milliseconds), or the high watermark when none has.
    pub fn offsets_at(&self, ms: i64) -> Result<BTreeMap<i32, i64>, Error> {
        let query = self.list((0..self.partitions).map(|p| (p, Offset::Offset(ms))))?;
        let answer = self
            .consumer
            .offsets_for_times(query, TIMEOUT)
            .map_err(self.fail("find offsets for a time"))?;
        let watermarks = self.watermarks()?;
        Ok((0..self.partitions)
            .map(|p| {
                let high = watermarks.get(&p).map_or(0, |(_, high)| *high);
                let found = answer.find_partition(&self.topic, p).and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
                (p, found.unwrap_or(high))
            })
            .collect())
    }

    /// The timestamp (Unix milliseconds) of the first retained message at or after `offset` in
    /// `partition`, if there is one before `before`.
    pub fn timestamp_at(
        &self,
        partition: i32,
        offset: i64,
        before: i64,
    ) -> Result<Option<i64>, Error> {
        if offset >= before {
            return Ok(None);
        }
        let list = self.list([(partition, Offset::Offset(offset))])?;
        self.consumer.assign(&list).map_err(self.fail("assign"))?;
        let read = self
            .consumer
            .poll(TIMEOUT)
            .ok_or(KafkaError::NoMessageReceived)
            .and_then(|m| m)
            .map(|m| (m.offset() < before).then(|| m.timestamp().to_millis()).flatten());
        // Unassigned at once: librdkafka would otherwise keep prefetching the partition between
        // two reads (a reader that samples lag runs for the life of the process).
        let _ = self.consumer.unassign();
        read.map_err(self.fail("read a message's timestamp"))
    }
}
