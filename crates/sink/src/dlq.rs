//! The dead-letter topic: poison events with their origin and error (DESIGN.md rule 8).
//!
//! A message that cannot be decoded or mapped is copied, bytes unchanged, to the dead-letter
//! topic with headers naming its origin (topic, partition, offset) and the error; its offset is
//! stored only after that copy is acknowledged. `scoresync dlq redrive` puts dead letters back
//! on the change topic (same key, or the same partition for keyless messages) once the cause is
//! fixed; versions make a late re-application harmless.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use scoresync_bus::KafkaConfig;
use scoresync_bus::client::{OffsetReset, consumer_config};

use crate::error::Error;

/// Header: the topic the message was consumed from.
pub const ORIGIN_TOPIC: &str = "scoresync-origin-topic";
/// Header: its partition.
pub const ORIGIN_PARTITION: &str = "scoresync-origin-partition";
/// Header: its offset.
pub const ORIGIN_OFFSET: &str = "scoresync-origin-offset";
/// Header: why it was dead-lettered.
pub const ERROR: &str = "scoresync-error";
/// Header: when (Unix milliseconds).
pub const DEAD_LETTERED_AT: &str = "scoresync-dead-lettered-at";

const TIMEOUT: Duration = Duration::from_secs(30);

/// Where a poison message came from.
#[derive(Clone, Debug)]
pub struct Origin<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Message key.
    pub key: Option<&'a [u8]>,
    /// Message payload.
    pub payload: &'a [u8],
}

/// Writes dead letters.
pub struct DeadLetters {
    producer: FutureProducer,
    topic: String,
}

impl DeadLetters {
    /// A writer for the configured dead-letter topic.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, Error> {
        Ok(DeadLetters {
            producer: scoresync_bus::client::producer(kafka)?,
            topic: kafka.dlq_topic.clone(),
        })
    }

    /// Enqueues a copy of `origin` with its error; the future resolves on acknowledgement.
    pub fn send(&self, origin: &Origin<'_>, error: &str) -> Result<DeliveryFuture, Error> {
        let now_ms =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis()).to_string();
        let partition = origin.partition.to_string();
        let offset = origin.offset.to_string();
        let headers = OwnedHeaders::new()
            .insert(Header { key: ORIGIN_TOPIC, value: Some(origin.topic) })
            .insert(Header { key: ORIGIN_PARTITION, value: Some(partition.as_str()) })
            .insert(Header { key: ORIGIN_OFFSET, value: Some(offset.as_str()) })
            .insert(Header { key: ERROR, value: Some(error) })
            .insert(Header { key: DEAD_LETTERED_AT, value: Some(now_ms.as_str()) });
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).payload(origin.payload).headers(headers);
        record = match origin.key {
            Some(key) => record.key(key),
            None => record.partition(origin.partition),
        };
        self.producer.send_result(record).map_err(|(source, _)| Error::Kafka {
            context: format!(
                "dead-lettering {}/{}@{} to {}",
                origin.topic, origin.partition, origin.offset, self.topic
            ),
            source,
        })
    }
}

/// A header's value as text.
pub fn header<'a>(message: &'a impl Message, name: &str) -> Option<&'a str> {
    let headers = message.headers()?;
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Puts every dead letter not yet redriven back on the change topic. Progress is the committed
/// offset of the group `<consumer_group>.redrive`, so a second redrive does not repeat the first.
/// Returns how many messages were redriven.
pub async fn redrive(kafka: &KafkaConfig) -> Result<u64, Error> {
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || redrive_blocking(&kafka)).await.map_err(|e| {
        Error::Kafka {
            context: format!("redrive task: {e}"),
            source: rdkafka::error::KafkaError::Canceled,
        }
    })?
}

fn redrive_blocking(kafka: &KafkaConfig) -> Result<u64, Error> {
    let kafka_err = |context: &str| {
        let context = context.to_owned();
        move |source| Error::Kafka { context, source }
    };
    let group = format!("{}.redrive", kafka.consumer_group);
    let consumer: BaseConsumer = consumer_config(kafka, &group, OffsetReset::Earliest)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(kafka_err("creating the redrive consumer"))?;
    let producer = scoresync_bus::client::producer(kafka)?;
    let topic = kafka.dlq_topic.as_str();
    let metadata =
        consumer.fetch_metadata(Some(topic), TIMEOUT).map_err(kafka_err("reading dlq metadata"))?;
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len() as i32);
    let mut assignment = TopicPartitionList::new();
    let mut ends = Vec::new();
    let mut wanted = TopicPartitionList::new();
    for partition in 0..partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(wanted, TIMEOUT).ok();
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, TIMEOUT)
            .map_err(kafka_err("reading dlq watermarks"))?;
        let start = committed
            .as_ref()
            .and_then(|c| c.find_partition(topic, partition))
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(low)
            .max(low);
        if start < high {
            assignment
                .add_partition_offset(topic, partition, Offset::Offset(start))
                .map_err(kafka_err("assign"))?;
            ends.push((partition, high));
        }
    }
    if ends.is_empty() {
        return Ok(0);
    }
    consumer.assign(&assignment).map_err(kafka_err("assign"))?;
    let mut remaining: std::collections::HashMap<i32, i64> = ends.into_iter().collect();
    let mut done = TopicPartitionList::new();
    let mut count = 0;
    while !remaining.is_empty() {
        let message = consumer
            .poll(TIMEOUT)
            .ok_or(Error::Kafka {
                context: "reading the dlq (timed out)".into(),
                source: rdkafka::error::KafkaError::NoMessageReceived,
            })?
            .map_err(kafka_err("reading the dlq"))?;
        let partition = message.partition();
        let Some(end) = remaining.get(&partition).copied() else { continue };
        if message.offset() >= end {
            remaining.remove(&partition);
            continue;
        }
        let payload = message.payload().unwrap_or_default();
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&kafka.change_topic).payload(payload);
        record = match message.key() {
            Some(key) => record.key(key),
            None => match header(&message, ORIGIN_PARTITION).and_then(|p| p.parse().ok()) {
                Some(p) => record.partition(p),
                None => record,
            },
        };
        // This thread is not an async worker: waiting here for the acknowledgement is fine.
        futures::executor::block_on(producer.send(record, TIMEOUT)).map_err(|(source, _)| {
            Error::Kafka { context: "redriving a dead letter".into(), source }
        })?;
        count += 1;
        done.add_partition_offset(topic, partition, Offset::Offset(message.offset() + 1))
            .map_err(kafka_err("commit"))?;
        consumer
            .commit(&done, rdkafka::consumer::CommitMode::Sync)
            .map_err(kafka_err("committing redrive progress"))?;
        if message.offset() + 1 >= end {
            remaining.remove(&partition);
        }
    }
    Ok(count)
}
