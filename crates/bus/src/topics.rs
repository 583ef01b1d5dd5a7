//! The topics scoresync uses, created idempotently by `scoresync setup`.
//!
//! | topic            | partitions              | holds                                         |
//! |------------------|-------------------------|-----------------------------------------------|
//! | change topic     | `kafka.partitions`      | change events, keyed by scorecard             |
//! | dead-letter topic| `kafka.partitions`      | poison events with their origin and error     |
//! | state topic      | 1                       | the source's pipeline record (latest wins)    |
//!
//! An existing topic is never altered: a different partition count is an error, because changing
//! it would move scorecards between partitions and break per-scorecard ordering.

use std::time::Duration;

use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::KafkaConfig;
use crate::error::Error;

const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `ensure_topics` found a topic or made it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TopicOutcome {
    /// The topic was there already, with the expected partition count.
    Existed {
        /// Topic name.
        topic: String,
        /// Its partitions.
        partitions: i32,
    },
    /// The topic was created.
    Created {
        /// Topic name.
        topic: String,
        /// Its partitions.
        partitions: i32,
    },
}

/// The topics of a configuration, with the partition count each must have.
pub fn planned_topics(cfg: &KafkaConfig) -> [(String, i32); 3] {
    [
        (cfg.change_topic.clone(), cfg.partitions),
        (cfg.dlq_topic.clone(), cfg.partitions),
        (cfg.state_topic.clone(), 1),
    ]
}

/// Creates each missing topic; checks the partition count of the ones that exist.
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<Vec<TopicOutcome>, Error> {
    let admin = crate::client::admin(cfg)?;
    let mut outcomes = Vec::new();
    for (topic, partitions) in planned_topics(cfg) {
        if let Some(actual) = partition_count(admin.inner(), &topic)? {
            if actual != partitions {
                return Err(Error::PartitionMismatch { topic, expected: partitions, actual });
            }
            outcomes.push(TopicOutcome::Existed { topic, partitions });
            continue;
        }
        let new =
            NewTopic::new(&topic, partitions, TopicReplication::Fixed(cfg.replication_factor));
        let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
        let results = admin.create_topics([&new], &opts).await.map_err(|source| Error::Topic {
            topic: topic.clone(),
            action: "create",
            source,
        })?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((_, code)) => {
                    let source = KafkaError::AdminOp(code);
                    return Err(Error::Topic { topic, action: "create", source });
                }
            }
        }
        outcomes.push(TopicOutcome::Created { topic, partitions });
    }
    Ok(outcomes)
}

/// The partition count of `topic`, or `None` when the broker does not know it. Any client will
/// do (`AdminClient::inner()`, `Consumer::client()`).
pub fn partition_count<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> Result<Option<i32>, Error> {
    let metadata = client
        .fetch_metadata(Some(topic), ADMIN_TIMEOUT)
        .map_err(|source| Error::Topic { topic: topic.into(), action: "read metadata", source })?;
    Ok(metadata.topics().iter().find(|t| t.name() == topic).and_then(|t| match t.error() {
        None => Some(t.partitions().len() as i32),
        Some(_) => None,
    }))
}

/// How many messages `topic` retains: the sum over its partitions of high minus low watermark
/// (0 for a topic the broker does not know).
pub fn message_count<C: rdkafka::client::ClientContext>(
    client: &rdkafka::client::Client<C>,
    topic: &str,
) -> Result<i64, Error> {
    let mut total = 0;
    for partition in 0..partition_count(client, topic)?.unwrap_or(0) {
        let (low, high) =
            client.fetch_watermarks(topic, partition, ADMIN_TIMEOUT).map_err(|source| {
                Error::Topic { topic: topic.into(), action: "read watermarks", source }
            })?;
        total += high - low;
    }
    Ok(total)
}
