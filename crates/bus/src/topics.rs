//! The topics scoresync uses, created idempotently by `scoresync setup`.
//!
//! | topic            | partitions              | holds                                         |
//! |------------------|-------------------------|-----------------------------------------------|
//! | change topic     | `kafka.partitions`      | change events, keyed by scorecard             |
//! | dead-letter topic| `kafka.partitions`      | poison events with their origin and error     |
//! | state topic      | 1                       | the source's pipeline record (latest wins)    |
//!
//! The change and dead-letter topics take record batches of up to `kafka.max_message_bytes` plus
//! a batch header (`max.message.bytes`, which Kafka checks against the batch as stored, after
//! compression) and keep the producer's compression (`compression.type=producer`, so the broker
//! never recompresses into a different size): whatever the producer accepts, they accept
//! ([`crate::client`]).
//!
//! An existing topic is never altered: a different partition count is an error, because changing
//! it would move scorecards between partitions and break per-scorecard ordering. Its configs stay
//! as they are too: a topic created before `kafka.max_message_bytes` existed, or with a smaller
//! one, keeps the broker's limit until an operator raises its `max.message.bytes`.

use std::time::Duration;

use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::KafkaConfig;
use crate::error::Error;

const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

/// Size of a record batch's header (Kafka's `RECORD_BATCH_OVERHEAD`, librdkafka's
/// `RD_KAFKAP_MSGSET_V2_SIZE`). librdkafka checks a single message, not its batch, against
/// `message.max.bytes`, so a batch holding one message of the limit is this much larger.
pub const RECORD_BATCH_HEADER_BYTES: usize = 61;

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

/// A topic `setup` creates: its name, partition count and topic configs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedTopic {
    /// The topic.
    pub name: String,
    /// Its partition count.
    pub partitions: i32,
    /// Topic configs set at creation.
    pub configs: Vec<(&'static str, String)>,
}

/// The topics of a configuration. Every topic with replication factor RF > 1 gets
/// `min.insync.replicas` = RF - 1, so an acknowledged write (acks=all) survives the loss of a
/// broker and one broker may be down without stopping writes. The change and dead-letter topics
/// take batches of `kafka.max_message_bytes` plus a batch header, compressed as the producer
/// compressed them. The state topic (the pipeline record, keyed by slot; small) is compacted and
/// kept for ever: only the newest record per slot matters, and it must never expire.
pub fn planned_topics(cfg: &KafkaConfig) -> [PlannedTopic; 3] {
    let durability: Vec<(&'static str, String)> = match cfg.replication_factor {
        rf if rf > 1 => vec![("min.insync.replicas", (rf - 1).to_string())],
        _ => Vec::new(),
    };
    let events: Vec<(&'static str, String)> = [
        ("max.message.bytes", (cfg.max_message_bytes + RECORD_BATCH_HEADER_BYTES).to_string()),
        ("compression.type", "producer".to_owned()),
    ]
    .into_iter()
    .chain(durability.iter().cloned())
    .collect();
    let state: Vec<(&'static str, String)> =
        [("cleanup.policy", "compact".to_owned()), ("retention.ms", "-1".to_owned())]
            .into_iter()
            .chain(durability.iter().cloned())
            .collect();
    let topic = |name: &str, partitions, configs| PlannedTopic {
        name: name.to_owned(),
        partitions,
        configs,
    };
    [
        topic(&cfg.change_topic, cfg.partitions, events.clone()),
        topic(&cfg.dlq_topic, cfg.partitions, events),
        topic(&cfg.state_topic, 1, state),
    ]
}

/// Creates each missing topic; checks the partition count of the ones that exist.
pub async fn ensure_topics(cfg: &KafkaConfig) -> Result<Vec<TopicOutcome>, Error> {
    let admin = crate::client::admin(cfg)?;
    let mut outcomes = Vec::new();
    for PlannedTopic { name: topic, partitions, configs } in planned_topics(cfg) {
        if let Some(actual) = partition_count(admin.inner(), &topic)? {
            if actual != partitions {
                return Err(Error::PartitionMismatch { topic, expected: partitions, actual });
            }
            outcomes.push(TopicOutcome::Existed { topic, partitions });
            continue;
        }
        let new = configs.iter().fold(
            NewTopic::new(&topic, partitions, TopicReplication::Fixed(cfg.replication_factor)),
            |new, (key, value)| new.set(key, value),
        );
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

#[cfg(test)]
mod tests {
    use super::*;

    fn configs(topic: &PlannedTopic) -> Vec<(&str, &str)> {
        topic.configs.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }

    const EVENTS: [(&str, &str); 2] =
        [("max.message.bytes", "16777277"), ("compression.type", "producer")];

    #[test]
    fn the_state_topic_is_compacted_and_kept_and_replicated_topics_need_all_but_one_replica() {
        let mut cfg = KafkaConfig::new("b:1");
        cfg.replication_factor = 1;
        let [change, dlq, state] = planned_topics(&cfg);
        assert_eq!(configs(&change), EVENTS, "a single broker: no min.insync.replicas");
        assert_eq!(configs(&dlq), EVENTS);
        assert_eq!(configs(&state), [("cleanup.policy", "compact"), ("retention.ms", "-1")]);
        assert_eq!((change.partitions, state.partitions), (cfg.partitions, 1));

        cfg.replication_factor = 3;
        let [change, dlq, state] = planned_topics(&cfg);
        assert_eq!(configs(&change)[2..], [("min.insync.replicas", "2")]);
        assert_eq!(configs(&dlq)[2..], [("min.insync.replicas", "2")]);
        assert!(configs(&state).contains(&("min.insync.replicas", "2")));
        cfg.replication_factor = 2;
        assert_eq!(configs(&planned_topics(&cfg)[0])[2..], [("min.insync.replicas", "1")]);
    }

    #[test]
    fn event_topics_take_a_batch_of_one_message_of_the_limit() {
        let mut cfg = KafkaConfig::new("b:1");
        cfg.max_message_bytes = 2_000_000;
        let [change, dlq, state] = planned_topics(&cfg);
        for topic in [&change, &dlq] {
            assert_eq!(
                configs(topic)[..2],
                [("max.message.bytes", "2000061"), ("compression.type", "producer")]
            );
        }
        assert!(
            configs(&state).iter().all(|(key, _)| *key != "max.message.bytes"),
            "the pipeline record is small: the broker's limit"
        );
    }
}
