//! Publishing change events on the change topic with the idempotent producer.
//!
//! [`Publisher::send`] only enqueues; each returned [`Delivery`] resolves when Kafka acknowledged
//! (acks=all) or refused the event. Callers bound how many deliveries they keep open. Every
//! message carries its transaction's commit time as Kafka timestamp, so replays can seek by time.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use scoresync_bus::KafkaConfig;
use scoresync_event::encode;

use crate::change::{Destination, Outgoing};
use crate::error::Error;

/// Enqueues events on the change topic.
pub struct Publisher {
    producer: FutureProducer,
    topic: String,
    partitions: i32,
}

/// One enqueued message, resolving when Kafka acknowledged it.
pub struct Delivery(DeliveryFuture);

impl Future for Delivery {
    type Output = Result<(), KafkaError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.0).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(Ok(_))) => Poll::Ready(Ok(())),
            Poll::Ready(Ok(Err((err, _)))) => Poll::Ready(Err(err)),
            // The producer dropped the message without a report.
            Poll::Ready(Err(_)) => Poll::Ready(Err(KafkaError::Canceled)),
        }
    }
}

impl Publisher {
    /// A publisher on the configured change topic (which must exist: `scoresync setup`).
    pub fn new(kafka: &KafkaConfig) -> Result<Self, Error> {
        let producer = scoresync_bus::client::producer(kafka)?;
        let admin = scoresync_bus::client::admin(kafka)?;
        let partitions =
            scoresync_bus::topics::partition_count(admin.inner(), &kafka.change_topic)?
                .ok_or_else(|| scoresync_bus::Error::Topic {
                    topic: kafka.change_topic.clone(),
                    action: "find (run `scoresync setup`)",
                    source: KafkaError::AdminOp(rdkafka::types::RDKafkaErrorCode::UnknownTopic),
                })?;
        Ok(Publisher { producer, topic: kafka.change_topic.clone(), partitions })
    }

    /// The change topic's partition count.
    pub fn partitions(&self) -> i32 {
        self.partitions
    }

    /// Enqueues one event (one message per partition for [`Destination::EveryPartition`]).
    pub fn send(&self, out: &Outgoing) -> Result<Vec<Delivery>, Error> {
        let payload = encode(&out.event);
        let timestamp_ms = out.event.commit_time_us.div_euclid(1_000);
        let enqueue = |record: FutureRecord<'_, [u8], Vec<u8>>| {
            self.producer
                .send_result(record.timestamp(timestamp_ms))
                .map(Delivery)
                .map_err(|(source, _)| Error::Delivery { topic: self.topic.clone(), source })
        };
        match &out.destination {
            Destination::Key(key) => Ok(vec![enqueue(
                FutureRecord::to(&self.topic).key(key.as_slice()).payload(&payload),
            )?]),
            Destination::EveryPartition => (0..self.partitions)
                .map(|p| enqueue(FutureRecord::to(&self.topic).partition(p).payload(&payload)))
                .collect(),
        }
    }

    /// Waits up to `timeout` for every enqueued message to be acknowledged or to fail.
    pub fn flush(&self, timeout: std::time::Duration) {
        use rdkafka::producer::Producer;
        if let Err(error) = self.producer.flush(timeout) {
            tracing::warn!(%error, topic = %self.topic, "producer flush did not finish");
        }
    }
}
