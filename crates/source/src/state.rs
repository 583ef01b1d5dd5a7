//! The source's record of its pipeline, kept on the state topic.
//!
//! One JSON record per update, keyed by slot name, on the single-partition state topic; the latest
//! record for a slot wins. Other records live beside it under keys of their own
//! ([`StateStore::save_keyed`]): a backfill's progress, and the latest verify result and replay
//! progress (written by the binary's commands). [`Follower`] reads the topic forward for those,
//! for the daemon's metrics. It holds what the start-up checks compare the slot with (system
//! identifier, confirmed LSN), the progress of the initial snapshot, so a killed snapshot
//! resumes where it stopped, the pipeline's row [`VersionScheme`] (fixed when the slot is
//! created; see `scoresync_event::version`), and why the source last halted, if it did (for
//! `scoresync status`, which outlives the process).
//!
//! Ordering keeps rule 4 checkable: the source writes a new `confirmed_lsn` here and waits for
//! Kafka's acknowledgement *before* it confirms that LSN to PostgreSQL, so the slot's confirmed
//! position can never be ahead of the record unless someone else moved it.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use scoresync_bus::KafkaConfig;
use scoresync_event::{Lsn, SourceTable, VersionScheme};

use crate::error::Error;

/// Format version of the record (2 added `versions`; a format-1 record gets them from `setup`).
pub const RECORD_FORMAT: u32 = 2;
const TIMEOUT: Duration = Duration::from_secs(30);
/// How long a command waits for a record it leaves for the daemon's metrics (a verify result,
/// a replay's progress): their output on the terminal is the real one.
pub const RECORD_PATIENCE: Duration = Duration::from_secs(5);
/// Messages read per step when scanning the state topic backwards for a slot's latest record.
const SCAN_WINDOW: i64 = 500;

/// The pipeline as the source last recorded it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineRecord {
    /// Record format.
    pub format: u32,
    /// The slot (also the record's key).
    pub slot: String,
    /// The database the slot decodes.
    pub database: String,
    /// System identifier of the cluster (a string: JSON numbers cannot hold every u64).
    #[serde(with = "scoresync_event::u64_as_string")]
    pub system_id: u64,
    /// Everything up to here is in Kafka; the slot may be confirmed up to here.
    pub confirmed_lsn: Lsn,
    /// Initial snapshot progress.
    pub snapshot: SnapshotProgress,
    /// How this pipeline versions rows. `None` only in records written before format 2.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub versions: Option<VersionScheme>,
    /// Why the source last stopped on a permanent error (e.g. an event larger than the message
    /// limit), for `scoresync status`; cleared when it starts streaming again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub halted: Option<String>,
}

/// How far the initial snapshot got.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotProgress {
    /// The slot's consistent point; snapshot rows are versioned just below it.
    pub lsn: Lsn,
    /// True once every table was published.
    pub done: bool,
    /// Tables fully published.
    pub tables_done: Vec<String>,
    /// Primary key (text form) of the last row published from the table in progress.
    pub resume_after: Option<Vec<String>>,
    /// Rows published so far.
    pub rows_published: u64,
}

impl PipelineRecord {
    /// A new pipeline whose slot was created at `consistent_point`, snapshot not yet taken, whose
    /// versions all exceed `max_stored_version` (the greatest `_version` ClickHouse holds).
    pub fn new(
        slot: &str,
        database: &str,
        system_id: u64,
        consistent_point: Lsn,
        max_stored_version: u64,
    ) -> Self {
        PipelineRecord {
            format: RECORD_FORMAT,
            slot: slot.into(),
            database: database.into(),
            system_id,
            confirmed_lsn: consistent_point,
            snapshot: SnapshotProgress {
                lsn: consistent_point,
                done: false,
                tables_done: Vec::new(),
                resume_after: None,
                rows_published: 0,
            },
            versions: Some(VersionScheme::above(max_stored_version, consistent_point)),
            halted: None,
        }
    }

    /// The pipeline's version scheme; a record from before format 2 has none until `setup` adds
    /// it.
    pub fn versions(&self) -> Result<VersionScheme, Error> {
        self.versions.ok_or_else(|| Error::NoVersionScheme { slot: self.slot.clone() })
    }

    /// The table the snapshot works on next, if any.
    pub fn snapshot_table(&self) -> Option<SourceTable> {
        if self.snapshot.done {
            return None;
        }
        SourceTable::ALL
            .into_iter()
            .find(|t| !self.snapshot.tables_done.iter().any(|d| d == t.name()))
    }
}

/// Reads and writes pipeline records.
pub struct StateStore {
    kafka: KafkaConfig,
    producer: FutureProducer,
}

impl StateStore {
    /// A store on the configured state topic.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, Error> {
        Ok(StateStore { kafka: kafka.clone(), producer: scoresync_bus::client::producer(kafka)? })
    }

    /// Writes `record` and waits for Kafka's acknowledgement.
    pub async fn save(&self, record: &PipelineRecord) -> Result<(), Error> {
        self.save_keyed(&record.slot, &record.slot, record).await
    }

    /// The latest record for `slot`, or `None` when the topic holds none.
    pub async fn load(&self, slot: &str) -> Result<Option<PipelineRecord>, Error> {
        self.load_keyed(slot, slot).await
    }

    /// Writes `value` as JSON under `key` (for slot `slot`'s pipeline, which errors name) and
    /// waits for Kafka's acknowledgement. Other records than the pipeline record (a backfill's
    /// progress) use keys of their own.
    pub async fn save_keyed(
        &self,
        slot: &str,
        key: &str,
        value: &impl Serialize,
    ) -> Result<(), Error> {
        let payload = serde_json::to_vec(value).map_err(|e| self.bad(slot, e.to_string()))?;
        let topic = &self.kafka.state_topic;
        self.producer
            .send(FutureRecord::to(topic).partition(0).key(key).payload(&payload), TIMEOUT)
            .await
            .map_err(|(source, _)| Error::Delivery { topic: topic.clone(), source })?;
        Ok(())
    }

    /// Like [`StateStore::save_keyed`], but gives up after `patience` (an [`Error::Delivery`]
    /// saying the message timed out): for a record a command leaves for the daemon's metrics,
    /// which must not hold the command up ([`RECORD_PATIENCE`]).
    pub async fn save_keyed_within(
        &self,
        slot: &str,
        key: &str,
        value: &impl Serialize,
        patience: Duration,
    ) -> Result<(), Error> {
        match tokio::time::timeout(patience, self.save_keyed(slot, key, value)).await {
            Ok(saved) => saved,
            Err(_) => Err(Error::Delivery {
                topic: self.kafka.state_topic.clone(),
                source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut),
            }),
        }
    }

    /// The latest value under `key`, or `None` when the topic holds none.
    pub async fn load_keyed<T: serde::de::DeserializeOwned>(
        &self,
        slot: &str,
        key: &str,
    ) -> Result<Option<T>, Error> {
        let kafka = self.kafka.clone();
        let key_owned = key.to_owned();
        let found = tokio::task::spawn_blocking(move || latest_payload(&kafka, &key_owned))
            .await
            .map_err(|e| self.bad(slot, format!("reader task failed: {e}")))??;
        found
            .map(|bytes| serde_json::from_slice(&bytes).map_err(|e| self.bad(slot, e.to_string())))
            .transpose()
    }

    fn bad(&self, slot: &str, problem: String) -> Error {
        Error::BadRecord { slot: slot.into(), topic: self.kafka.state_topic.clone(), problem }
    }
}

/// A consumer of the state topic that joins no group and commits nothing.
fn reader(kafka: &KafkaConfig) -> Result<BaseConsumer, Error> {
    Ok(scoresync_bus::client::reader(kafka, "scoresync-state-reader", "state reader")?)
}

/// What a [`Follower`] keeps the newest message of.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Watch {
    /// Messages under exactly this key.
    Key(String),
    /// Messages under any key that starts with this.
    Prefix(String),
}

impl Watch {
    fn matches(&self, key: &[u8]) -> bool {
        match self {
            Watch::Key(k) => key == k.as_bytes(),
            Watch::Prefix(p) => key.starts_with(p.as_bytes()),
        }
    }
}

/// The newest message a [`Watch`] matched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Seen {
    /// Its key.
    pub key: Vec<u8>,
    /// Its value (`None`: a tombstone).
    pub payload: Option<Vec<u8>>,
    /// When it was written (Unix milliseconds), if the broker says.
    pub timestamp_ms: Option<i64>,
}

/// Reads the state topic forward, once from its start and then only what arrives, keeping the
/// newest message of each of some [`Watch`]es: for a long-lived reader (the daemon's verify,
/// replay and backfill metrics) that must not scan the topic again at every look. Blocking:
/// call it off the async workers.
pub struct Follower {
    consumer: BaseConsumer,
    topic: String,
    watches: Vec<(Watch, Option<Seen>)>,
    /// The next offset to read.
    next: i64,
}

impl Follower {
    /// A follower of `watches` on the configured state topic, from its first message.
    pub fn new(kafka: &KafkaConfig, watches: Vec<Watch>) -> Result<Self, Error> {
        let consumer = reader(kafka)?;
        let topic = kafka.state_topic.clone();
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&topic, 0, Offset::Beginning)
            .and_then(|()| consumer.assign(&assignment))
            .map_err(|source| scoresync_bus::Error::Topic {
                topic: topic.clone(),
                action: "assign",
                source,
            })?;
        let watches = watches.into_iter().map(|w| (w, None)).collect();
        Ok(Follower { consumer, topic, watches, next: 0 })
    }

    /// Reads what arrived since the last call, up to the topic's end as it is when the call
    /// starts, for at most `budget`. True when it got there: what it holds is current (false: a
    /// first read of a long topic that needs more calls, or a slow broker; what it holds may be
    /// old). The message before the end is always there to read (compaction keeps a key's
    /// newest message, and the last one is its key's newest).
    pub fn poll(&mut self, budget: Duration) -> Result<bool, Error> {
        let fail = |action| {
            let topic = self.topic.clone();
            move |source| scoresync_bus::Error::Topic { topic, action, source }
        };
        let (_, end) = self
            .consumer
            .fetch_watermarks(&self.topic, 0, TIMEOUT)
            .map_err(fail("read watermarks"))?;
        let started = std::time::Instant::now();
        while self.next < end && started.elapsed() < budget {
            let Some(message) = self.consumer.poll(Duration::from_millis(500)) else { break };
            let message = message.map_err(fail("read"))?;
            self.next = message.offset() + 1;
            let Some(key) = message.key() else { continue };
            for (watch, seen) in &mut self.watches {
                if watch.matches(key) {
                    *seen = Some(Seen {
                        key: key.to_vec(),
                        payload: message.payload().map(<[u8]>::to_vec),
                        timestamp_ms: message.timestamp().to_millis(),
                    });
                }
            }
        }
        Ok(self.next >= end)
    }

    /// The newest message `watch` (one of those followed) matched, if any.
    pub fn latest(&self, watch: &Watch) -> Option<&Seen> {
        self.watches.iter().find(|(w, _)| w == watch).and_then(|(_, seen)| seen.as_ref())
    }
}

/// Scans the state topic backwards from its end for the newest message keyed `key`.
fn latest_payload(kafka: &KafkaConfig, key: &str) -> Result<Option<Vec<u8>>, Error> {
    let topic = kafka.state_topic.as_str();
    let consumer = reader(kafka)?;
    let kafka_err = |action: &'static str| {
        move |source| scoresync_bus::Error::Topic { topic: topic.into(), action, source }
    };
    let (low, high) =
        consumer.fetch_watermarks(topic, 0, TIMEOUT).map_err(kafka_err("read watermarks"))?;
    let mut end = high;
    while end > low {
        let start = (end - SCAN_WINDOW).max(low);
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(topic, 0, Offset::Offset(start))
            .map_err(kafka_err("assign"))?;
        consumer.assign(&assignment).map_err(kafka_err("assign"))?;
        let mut latest = None;
        let mut next = start;
        while next < end {
            let message = match consumer.poll(TIMEOUT) {
                Some(result) => result.map_err(kafka_err("read"))?,
                None => {
                    return Err(scoresync_bus::Error::Topic {
                        topic: topic.into(),
                        action: "read (timed out)",
                        source: rdkafka::error::KafkaError::NoMessageReceived,
                    }
                    .into());
                }
            };
            next = message.offset() + 1;
            if message.offset() < end && message.key() == Some(key.as_bytes()) {
                latest = message.payload().map(<[u8]>::to_vec);
            }
        }
        if latest.is_some() {
            return Ok(latest);
        }
        end = start;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_with_a_large_system_id() {
        let mut record =
            PipelineRecord::new("slot", "director", u64::MAX - 1, Lsn(0x1_0000_0010), 5);
        record.snapshot.tables_done.push("scorecards".into());
        record.snapshot.resume_after = Some(vec!["c".into(), "p".into(), "s1".into()]);
        let json = serde_json::to_string(&record).expect("serialises");
        assert!(json.contains("\"18446744073709551614\""), "{json}");
        assert!(json.contains("\"1/10\""), "{json}");
        let back: PipelineRecord = serde_json::from_str(&json).expect("parses");
        assert_eq!(back, record);
        assert_eq!(back.versions().expect("has a scheme").base, 7);
    }

    #[test]
    fn a_format_1_record_reads_and_asks_for_setup() {
        let json = r#"{"format":1,"slot":"s","database":"d","system_id":"1","confirmed_lsn":"0/10",
            "snapshot":{"lsn":"0/10","done":true,"tables_done":[],"resume_after":null,
            "rows_published":0}}"#;
        let record: PipelineRecord = serde_json::from_str(json).expect("parses");
        let err = record.versions().expect_err("no scheme").to_string();
        assert!(err.contains("scoresync setup"), "{err}");
    }

    #[test]
    fn snapshot_walks_the_tables_in_order() {
        let mut record = PipelineRecord::new("s", "d", 1, Lsn(1), 0);
        assert_eq!(record.snapshot_table(), Some(SourceTable::Scorecards));
        record.snapshot.tables_done.push("scorecards".into());
        assert_eq!(record.snapshot_table(), Some(SourceTable::Scores));
        record.snapshot.done = true;
        assert_eq!(record.snapshot_table(), None);
    }
}
