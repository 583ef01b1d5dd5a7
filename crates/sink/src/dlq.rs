//! The dead-letter topic: poison events with their origin and error (DESIGN.md rule 8).
//!
//! A message that cannot be decoded or mapped is copied (bytes unchanged, unless cut to fit: see
//! below) to the dead-letter
//! topic with headers naming its origin (topic, partition, offset) and the error; its offset is
//! stored only after that copy is acknowledged. `scoresync dlq redrive` puts dead letters back
//! on the change topic (its origin partition, under its key with a redrive suffix, see
//! `scoresync_event::layout`) once the cause is fixed; versions make a late re-application
//! harmless.
//!
//! A letter never exceeds `kafka.max_message_bytes` (DESIGN.md rule 12): a payload that would not
//! fit with its headers is cut to fit, with a header saying its original size, and the error
//! header is cut at [`MAX_ERROR_BYTES`]. The origin headers always stay, so the whole message can
//! be read again at its origin while the change topic retains it. A cut letter is listed, never
//! redriven (its payload is no longer the event).

use std::time::Duration;

use futures::stream::FuturesUnordered;
use futures::{FutureExt, StreamExt};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use scoresync_bus::KafkaConfig;
use scoresync_bus::client::{OffsetReset, consumer_config};

use crate::batch::MsgId;
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
/// Header, only on letters whose payload was cut to fit: the original payload size in bytes.
pub const PAYLOAD_CUT_FROM: &str = "scoresync-payload-cut-from";

/// Longest error header; longer errors are cut (on a character boundary).
pub const MAX_ERROR_BYTES: usize = 8 * 1024;
/// Room kept in a letter for its key, headers and record framing.
const LETTER_OVERHEAD: usize = 64 * 1024;

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
    /// Largest payload a letter carries whole.
    payload_room: usize,
}

impl DeadLetters {
    /// A writer for the configured dead-letter topic.
    pub fn new(kafka: &KafkaConfig) -> Result<Self, Error> {
        Ok(DeadLetters {
            producer: scoresync_bus::client::producer(kafka)?,
            topic: kafka.dlq_topic.clone(),
            payload_room: kafka.max_message_bytes.saturating_sub(LETTER_OVERHEAD),
        })
    }

    /// Enqueues a copy of `origin` with its error; the future resolves on acknowledgement.
    pub fn send(&self, origin: &Origin<'_>, error: &str) -> Result<DeliveryFuture, Error> {
        let now_ms = scoresync_event::clock::unix_millis().to_string();
        let partition = origin.partition.to_string();
        let offset = origin.offset.to_string();
        let error = cut_at_char(error, MAX_ERROR_BYTES);
        let mut headers = OwnedHeaders::new()
            .insert(Header { key: ORIGIN_TOPIC, value: Some(origin.topic) })
            .insert(Header { key: ORIGIN_PARTITION, value: Some(partition.as_str()) })
            .insert(Header { key: ORIGIN_OFFSET, value: Some(offset.as_str()) })
            .insert(Header { key: ERROR, value: Some(error) })
            .insert(Header { key: DEAD_LETTERED_AT, value: Some(now_ms.as_str()) });
        let mut payload = origin.payload;
        let original = origin.payload.len().to_string();
        if payload.len() > self.payload_room {
            payload = &payload[..self.payload_room];
            headers =
                headers.insert(Header { key: PAYLOAD_CUT_FROM, value: Some(original.as_str()) });
        }
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&self.topic).payload(payload).headers(headers);
        // The dead-letter topic has the change topic's partitions: a letter stays in its
        // origin's partition number, under its origin's key.
        record = record.partition(origin.partition);
        if let Some(key) = origin.key {
            record = record.key(key);
        }
        self.producer.send_result(record).map_err(|(source, _)| Error::Kafka {
            context: format!(
                "dead-lettering {}/{}@{} to {}",
                origin.topic, origin.partition, origin.offset, self.topic
            ),
            source,
        })
    }
}

/// `text` cut to at most `max` bytes, on a character boundary.
fn cut_at_char(text: &str, max: usize) -> &str {
    let mut end = text.len().min(max);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
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

/// One dead letter as `scoresync dlq list` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Letter {
    /// Partition of the dead-letter topic.
    pub partition: i32,
    /// Offset in that partition.
    pub offset: i64,
    /// Where it was consumed from: topic.
    pub origin_topic: Option<String>,
    /// Origin partition.
    pub origin_partition: Option<i32>,
    /// Origin offset.
    pub origin_offset: Option<i64>,
    /// Why it was dead-lettered.
    pub error: Option<String>,
    /// When, in Unix milliseconds.
    pub dead_lettered_at_ms: Option<i64>,
    /// Whether `dlq redrive` already put it back on the change topic.
    pub redriven: bool,
    /// Payload size in bytes.
    pub bytes: usize,
    /// The original payload size, when the payload was cut to fit the topic (never redriven).
    pub cut_from: Option<usize>,
}

/// Every dead letter still retained by the dead-letter topic, oldest first per partition.
pub async fn list(kafka: &KafkaConfig) -> Result<Vec<Letter>, Error> {
    let kafka = kafka.clone();
    blocking(move || {
        let reader = Reader::open(&kafka)?;
        let ranges = reader.ranges()?;
        let mut letters = Vec::new();
        let all = ranges.iter().map(|r| (r.partition, r.low, r.high)).collect();
        reader.read(all, |message| {
            let number = |name| header(message, name).and_then(|v| v.parse().ok());
            let redriven = ranges
                .iter()
                .any(|r| r.partition == message.partition() && message.offset() < r.redriven);
            letters.push(Letter {
                partition: message.partition(),
                offset: message.offset(),
                origin_topic: header(message, ORIGIN_TOPIC).map(str::to_owned),
                origin_partition: number(ORIGIN_PARTITION).map(|p: i64| p as i32),
                origin_offset: number(ORIGIN_OFFSET),
                error: header(message, ERROR).map(str::to_owned),
                dead_lettered_at_ms: number(DEAD_LETTERED_AT),
                redriven,
                bytes: message.payload().map_or(0, <[u8]>::len),
                cut_from: number(PAYLOAD_CUT_FROM).map(|n: i64| n as usize),
            });
            Ok(())
        })?;
        Ok(letters)
    })
    .await
}

/// Puts every dead letter not yet redriven back on the change topic. Progress is the committed
/// offset of the group `<consumer_group>.redrive`, so a second redrive does not repeat the first.
/// Returns how many messages were redriven (letters whose payload was cut are passed over).
pub async fn redrive(kafka: &KafkaConfig) -> Result<u64, Error> {
    let kafka = kafka.clone();
    blocking(move || redrive_blocking(&kafka)).await
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, Error> + Send + 'static,
) -> Result<T, Error> {
    tokio::task::spawn_blocking(work).await.map_err(|e| Error::Kafka {
        context: format!("dead-letter task: {e}"),
        source: rdkafka::error::KafkaError::Canceled,
    })?
}

fn kafka_err(context: &str) -> impl FnOnce(rdkafka::error::KafkaError) -> Error {
    let context = context.to_owned();
    move |source| Error::Kafka { context, source }
}

/// What one partition of the dead-letter topic holds, and how far redrive got.
struct Range {
    partition: i32,
    low: i64,
    high: i64,
    /// First offset not yet redriven (at least `low`).
    redriven: i64,
}

/// Reads the dead-letter topic with the redrive group's consumer (commits are explicit).
struct Reader {
    consumer: BaseConsumer,
    topic: String,
}

impl Reader {
    fn open(kafka: &KafkaConfig) -> Result<Self, Error> {
        let group = format!("{}.redrive", kafka.consumer_group);
        let consumer: BaseConsumer = consumer_config(kafka, &group, OffsetReset::Earliest)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(kafka_err("creating the dead-letter consumer"))?;
        Ok(Reader { consumer, topic: kafka.dlq_topic.clone() })
    }

    fn ranges(&self) -> Result<Vec<Range>, Error> {
        let topic = self.topic.as_str();
        let partitions =
            scoresync_bus::topics::partition_count(self.consumer.client(), topic)?.unwrap_or(0);
        let mut wanted = TopicPartitionList::new();
        for partition in 0..partitions {
            wanted.add_partition(topic, partition);
        }
        let committed = self.consumer.committed_offsets(wanted, TIMEOUT).ok();
        let mut ranges = Vec::new();
        for partition in 0..partitions {
            let (low, high) = self
                .consumer
                .fetch_watermarks(topic, partition, TIMEOUT)
                .map_err(kafka_err("reading dead-letter topic watermarks"))?;
            let redriven = committed
                .as_ref()
                .and_then(|c| c.find_partition(topic, partition))
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                })
                .unwrap_or(low)
                .max(low);
            ranges.push(Range { partition, low, high, redriven });
        }
        Ok(ranges)
    }

    /// Calls `visit` on every message of each `(partition, from, to)` range, in offset order per
    /// partition. Returns how many it visited.
    fn read(
        &self,
        ranges: Vec<(i32, i64, i64)>,
        mut visit: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<(), Error>,
    ) -> Result<u64, Error> {
        let topic = self.topic.as_str();
        let mut assignment = TopicPartitionList::new();
        let mut remaining = std::collections::HashMap::new();
        for (partition, from, to) in ranges {
            if from < to {
                assignment
                    .add_partition_offset(topic, partition, Offset::Offset(from))
                    .map_err(kafka_err("assign"))?;
                remaining.insert(partition, to);
            }
        }
        if remaining.is_empty() {
            return Ok(0);
        }
        self.consumer.assign(&assignment).map_err(kafka_err("assign"))?;
        let mut count = 0;
        while !remaining.is_empty() {
            let message = self
                .consumer
                .poll(TIMEOUT)
                .ok_or(Error::Kafka {
                    context: format!("reading {topic} (timed out)"),
                    source: rdkafka::error::KafkaError::NoMessageReceived,
                })?
                .map_err(kafka_err("reading the dead-letter topic"))?;
            let partition = message.partition();
            let Some(end) = remaining.get(&partition).copied() else { continue };
            if message.offset() >= end {
                remaining.remove(&partition);
                continue;
            }
            visit(&message)?;
            count += 1;
            if message.offset() + 1 >= end {
                remaining.remove(&partition);
            }
        }
        Ok(count)
    }
}

fn redrive_blocking(kafka: &KafkaConfig) -> Result<u64, Error> {
    let reader = Reader::open(kafka)?;
    let producer = scoresync_bus::client::producer(kafka)?;
    let pending = reader.ranges()?.into_iter().map(|r| (r.partition, r.redriven, r.high)).collect();
    let topic = kafka.dlq_topic.as_str();
    let mut skipped = 0;
    let visited = reader.read(pending, |message| {
        let payload = message.payload().unwrap_or_default();
        if let Some(size) = header(message, PAYLOAD_CUT_FROM) {
            tracing::warn!(
                partition = message.partition(),
                offset = message.offset(),
                origin_topic = header(message, ORIGIN_TOPIC).unwrap_or("?"),
                origin_partition = header(message, ORIGIN_PARTITION).unwrap_or("?"),
                origin_offset = header(message, ORIGIN_OFFSET).unwrap_or("?"),
                original_bytes = size,
                "not redriving a dead letter whose payload was cut to fit the topic; re-read it at \
                 its origin"
            );
            skipped += 1;
            return commit_progress(&reader, topic, message);
        }
        // Back to its origin partition (its scorecard's; every letter carries the header), under
        // its redrive key, then a tombstone for that key: on a compacted topic the copy must
        // neither replace its row's later changes nor outlive the row (the original stays at
        // its origin offset under the row's own key until a later change replaces it).
        let key = scoresync_event::redrive_key(message.key().unwrap_or_default());
        let partition = header(message, ORIGIN_PARTITION).and_then(|p| p.parse().ok());
        let copy: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&kafka.change_topic).payload(payload).key(&key);
        let tombstone: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&kafka.change_topic).key(&key);
        let (copy, tombstone) = match partition {
            Some(p) => (copy.partition(p), tombstone.partition(p)),
            None => (copy, tombstone),
        };
        // This thread is not an async worker: waiting here for the acknowledgements is fine.
        for record in [copy, tombstone] {
            futures::executor::block_on(producer.send(record, TIMEOUT)).map_err(
                |(source, _)| Error::Kafka { context: "redriving a dead letter".into(), source },
            )?;
        }
        commit_progress(&reader, topic, message)
    })?;
    Ok(visited - skipped)
}

/// Records that redrive is done with `message`.
fn commit_progress(
    reader: &Reader,
    topic: &str,
    message: &rdkafka::message::BorrowedMessage<'_>,
) -> Result<(), Error> {
    let mut done = TopicPartitionList::new();
    done.add_partition_offset(topic, message.partition(), Offset::Offset(message.offset() + 1))
        .map_err(kafka_err("commit"))?;
    reader
        .consumer
        .commit(&done, rdkafka::consumer::CommitMode::Sync)
        .map_err(kafka_err("committing redrive progress"))
}

/// The delivery of one dead letter: its origin message and the topic's answer.
type Delivery = futures::future::BoxFuture<'static, (MsgId, Result<(), KafkaError>)>;

/// Dead letters on their way to the topic. The loop keeps each origin message held until its
/// letter is acknowledged ([`Outbox::ack`]).
pub(crate) struct Outbox {
    letters: DeadLetters,
    /// The change topic the letters come from.
    origin_topic: String,
    pending: FuturesUnordered<Delivery>,
}

impl Outbox {
    /// An outbox for `kafka`'s dead-letter topic, for messages of its change topic.
    pub(crate) fn new(kafka: &KafkaConfig) -> Result<Self, Error> {
        Ok(Outbox {
            letters: DeadLetters::new(kafka)?,
            origin_topic: kafka.change_topic.clone(),
            pending: FuturesUnordered::new(),
        })
    }

    /// Sends a copy of message `msg` (its key and payload) with `error`.
    pub(crate) fn send(
        &mut self,
        msg: MsgId,
        key: Option<&[u8]>,
        payload: &[u8],
        error: &str,
    ) -> Result<(), Error> {
        tracing::warn!(partition = msg.0, offset = msg.1, error, "dead-lettering a poison message");
        let origin =
            Origin { topic: &self.origin_topic, partition: msg.0, offset: msg.1, key, payload };
        let delivery = self.letters.send(&origin, error)?;
        self.pending.push(Box::pin(async move {
            let result = match delivery.await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err((err, _))) => Err(err),
                Err(_) => Err(KafkaError::Canceled),
            };
            (msg, result)
        }));
        Ok(())
    }

    /// The next acknowledged letter's origin (pending for ever while none is on its way).
    pub(crate) async fn ack(&mut self) -> Result<MsgId, Error> {
        if self.pending.is_empty() {
            return std::future::pending().await;
        }
        let Some((msg, result)) = self.pending.next().await else {
            return std::future::pending().await;
        };
        result.map_err(|source| Error::Kafka {
            context: format!("dead-letter write of {}/{}@{}", self.origin_topic, msg.0, msg.1),
            source,
        })?;
        Ok(msg)
    }

    /// Origins of the letters acknowledged already (at shutdown: no waiting).
    pub(crate) fn acknowledged_now(&mut self) -> Vec<MsgId> {
        let mut done = Vec::new();
        while let Some(Some((msg, result))) = self.pending.next().now_or_never() {
            if result.is_ok() {
                done.push(msg);
            }
        }
        done
    }

    /// Letters not yet acknowledged.
    pub(crate) fn len(&self) -> usize {
        self.pending.len()
    }
}
