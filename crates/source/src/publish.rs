//! Publishing change events on the change topic with the idempotent producer.
//!
//! [`Publisher::send`] only enqueues; each returned [`Delivery`] resolves when Kafka acknowledged
//! (acks=all) or refused the event. Callers bound how many deliveries they keep open. Every
//! message carries its transaction's commit time as Kafka timestamp, so replays can seek by time.
//!
//! An event larger than `kafka.max_message_bytes` is refused by the producer as it is enqueued,
//! or by the broker (a topic created with a smaller `max.message.bytes`) in its delivery report.
//! Both become [`Error::EventTooLarge`] here, naming table, key, position, size and the setting;
//! the source does not retry it (DESIGN.md rule 12): a restart would meet the same event again.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use scoresync_bus::KafkaConfig;
use scoresync_event::{ChangeEvent, Lsn, TOMBSTONE_VERSION_HEADER, encode};

use crate::change::{Destination, Forget, Outgoing};
use crate::error::{Error, TooLarge};

/// Enqueues events on the change topic.
pub struct Publisher {
    producer: FutureProducer,
    topic: String,
    partitions: i32,
    refusal: Arc<Refusal>,
}

/// One enqueued message, resolving when Kafka acknowledged it.
pub struct Delivery {
    future: DeliveryFuture,
    refusal: Arc<Refusal>,
}

impl Future for Delivery {
    type Output = Result<(), Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let refused = match Pin::new(&mut self.future).poll(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Ok(Ok(_))) => return Poll::Ready(Ok(())),
            Poll::Ready(Ok(Err((err, message)))) => {
                // Decoded only when refused for its size, to name the row.
                let payload = message.payload().unwrap_or_default();
                let event = scoresync_event::decode(payload).unwrap_or_default();
                self.refusal.error(&event, payload.len(), err)
            }
            // The producer dropped the message without a report.
            Poll::Ready(Err(_)) => {
                Error::Delivery { topic: self.refusal.topic.clone(), source: KafkaError::Canceled }
            }
        };
        Poll::Ready(Err(refused))
    }
}

/// What a refusal of an event is reported with.
struct Refusal {
    slot: String,
    topic: String,
    limit: usize,
}

impl Refusal {
    /// The error for `event` (`size` bytes encoded) refused with `source`.
    fn error(&self, event: &ChangeEvent, size: usize, source: KafkaError) -> Error {
        if !scoresync_bus::error::is_too_large(&source) {
            return Error::Delivery { topic: self.topic.clone(), source };
        }
        Error::EventTooLarge(Box::new(TooLarge {
            slot: self.slot.clone(),
            op: event.op().describe(),
            table: format!("{}.{}", event.schema, event.table),
            key: event.key_text(),
            lsn: Lsn(event.commit_lsn),
            size,
            limit: self.limit,
            topic: self.topic.clone(),
            source,
        }))
    }
}

impl Publisher {
    /// A publisher on the configured change topic (which must exist: `scoresync setup`) for the
    /// changes of `slot`.
    pub fn new(kafka: &KafkaConfig, slot: &str) -> Result<Self, Error> {
        let producer = scoresync_bus::client::producer(kafka)?;
        let admin = scoresync_bus::client::admin(kafka)?;
        let partitions =
            scoresync_bus::topics::partition_count(admin.inner(), &kafka.change_topic)?
                .ok_or_else(|| scoresync_bus::Error::MissingTopic {
                    topic: kafka.change_topic.clone(),
                })?;
        let refusal = Refusal {
            slot: slot.into(),
            topic: kafka.change_topic.clone(),
            limit: kafka.max_message_bytes,
        };
        Ok(Publisher {
            producer,
            topic: kafka.change_topic.clone(),
            partitions,
            refusal: Arc::new(refusal),
        })
    }

    /// The change topic's partition count.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Enqueues one event (one message per partition for [`Destination::EveryPartition`]), and
    /// after it the tombstone it asks for, if any ([`Outgoing::tombstone`]).
    pub fn send(&self, out: &Outgoing) -> Result<Vec<Delivery>, Error> {
        let payload = encode(&out.event);
        let timestamp_ms = out.event.commit_time_us.div_euclid(1_000);
        let enqueue = |record: FutureRecord<'_, [u8], Vec<u8>>| {
            self.producer
                .send_result(record.timestamp(timestamp_ms))
                .map(|future| Delivery { future, refusal: Arc::clone(&self.refusal) })
                .map_err(|(source, _)| self.refusal.error(&out.event, payload.len(), source))
        };
        let mut deliveries = match &out.destination {
            Destination::Row(address) => vec![enqueue(
                FutureRecord::to(&self.topic)
                    .partition(address.partition(self.partitions))
                    .key(address.key.as_slice())
                    .payload(&payload),
            )?],
            Destination::EveryPartition(key) => (0..self.partitions)
                .map(|p| {
                    enqueue(
                        FutureRecord::to(&self.topic)
                            .partition(p)
                            .key(key.as_slice())
                            .payload(&payload),
                    )
                })
                .collect::<Result<_, _>>()?,
        };
        if let Some((partition, key)) = tombstone(out, self.partitions) {
            let version = out.event.version.to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: TOMBSTONE_VERSION_HEADER, value: Some(version.as_bytes()) });
            deliveries.push(enqueue(
                FutureRecord::to(&self.topic).partition(partition).key(key).headers(headers),
            )?);
        }
        crate::metrics::published(&out.event, payload.len());
        Ok(deliveries)
    }

    /// Waits up to `timeout` for every enqueued message to be acknowledged or to fail.
    pub fn flush(&self, timeout: std::time::Duration) {
        use rdkafka::producer::Producer;
        if let Err(error) = self.producer.flush(timeout) {
            tracing::warn!(%error, topic = %self.topic, "producer flush did not finish");
        }
    }
}

/// Where the tombstone `out` asks for goes among `partitions`, if anywhere: never onto the
/// partition and key of the event for [`Forget::Left`], which would make compaction forget the
/// row's newest state.
fn tombstone(out: &Outgoing, partitions: i32) -> Option<(i32, &[u8])> {
    let Destination::Row(own) = &out.destination else { return None };
    let own_place = (own.partition(partitions), own.key.as_slice());
    match out.tombstone.as_ref()? {
        Forget::Own => Some(own_place),
        Forget::Left(old) => {
            let place = (old.partition(partitions), old.key.as_slice());
            (place != own_place).then_some(place)
        }
    }
}

#[cfg(test)]
mod tests {
    use rdkafka::types::RDKafkaErrorCode;
    use scoresync_event::{Column, Operation, RowAddress, ScorecardKey, Value};

    use super::*;

    #[test]
    fn a_refusal_for_size_names_the_operation_table_and_key() {
        let refusal = Refusal { slot: "s".into(), topic: "t".into(), limit: 100 };
        let event = ChangeEvent {
            schema: "director".into(),
            table: "scores".into(),
            op: Operation::Snapshot as i32,
            key: vec![
                Column { name: "customer_id".into(), type_oid: 25, value: Some(Value::text("c")) },
                Column { name: "score_id".into(), type_oid: 20, value: Some(Value::int(7)) },
            ],
            commit_lsn: 0x10,
            ..Default::default()
        };
        let too_large = KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge);
        let message = refusal.error(&event, 200, too_large).to_string();
        assert!(
            message
                .contains("the snapshot copy of director.scores row (customer_id=c, score_id=7)"),
            "{message}"
        );
        let other = KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull);
        assert!(matches!(refusal.error(&event, 200, other), Error::Delivery { .. }));
    }

    fn address(card: &str, key: &str) -> RowAddress {
        let scorecard = ScorecardKey {
            customer_id: "c".into(),
            profile_id: "p".into(),
            scorecard_id: card.into(),
        };
        RowAddress { scorecard, key: key.as_bytes().to_vec() }
    }

    fn outgoing(op: Operation, to: &RowAddress, tombstone: Forget) -> Outgoing {
        Outgoing {
            event: ChangeEvent { op: op as i32, ..Default::default() },
            destination: Destination::Row(to.clone()),
            tombstone: Some(tombstone),
        }
    }

    #[test]
    fn a_tombstone_never_lands_on_the_key_of_a_row_that_still_lives_there() {
        let here = address("card-1", "director.scores\0c\0p\0s1");
        // A card in the same partition as card-1 among 3, and one in another.
        let partition = here.partition(3);
        let other_card = |same: bool| {
            (2..100)
                .map(|i| address(&format!("card-{i}"), "director.scores\0c\0p\0s1"))
                .find(|a| (a.partition(3) == partition) == same)
                .expect("a card")
        };
        let (same_partition, elsewhere) = (other_card(true), other_card(false));
        let key = here.key.as_slice();

        let delete = outgoing(Operation::Delete, &here, Forget::Own);
        assert_eq!(tombstone(&delete, 3), Some((partition, key)), "a DELETE's own key");
        let moved_away = outgoing(Operation::Update, &elsewhere, Forget::Left(here.clone()));
        assert_eq!(tombstone(&moved_away, 3), Some((partition, key)), "the old partition");
        let moved_next_door =
            outgoing(Operation::Update, &same_partition, Forget::Left(here.clone()));
        assert_eq!(tombstone(&moved_next_door, 3), None, "same partition, same key: the update");
        let renamed = address("card-1", "director.scores\0c\0p\0s2");
        let rekeyed = outgoing(Operation::Update, &renamed, Forget::Left(here.clone()));
        assert_eq!(tombstone(&rekeyed, 3), Some((partition, key)), "the old key");
        let plain = Outgoing { tombstone: None, ..moved_away };
        assert_eq!(tombstone(&plain, 3), None);
    }
}
