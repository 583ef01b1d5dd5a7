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
/// broker and one broker may be down without stopping writes. The state topic (the pipeline
/// record, keyed by slot) is compacted and kept for ever: only the newest record per slot matters,
/// and it must never expire.
pub fn planned_topics(cfg: &KafkaConfig) -> [PlannedTopic; 3] {
    let durability: Vec<(&'static str, String)> = match cfg.replication_factor {
        rf if rf > 1 => vec![("min.insync.replicas", (rf - 1).to_string())],
        _ => Vec::new(),
    };
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
        topic(&cfg.change_topic, cfg.partitions, durability.clone()),
        topic(&cfg.dlq_topic, cfg.partitions, durability),
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

    #[test]
    fn the_state_topic_is_compacted_and_kept_and_replicated_topics_need_all_but_one_replica() {
        let mut cfg = KafkaConfig::new("b:1");
        cfg.replication_factor = 1;
        let [change, dlq, state] = planned_topics(&cfg);
        assert!(change.configs.is_empty() && dlq.configs.is_empty(), "a single broker: defaults");
        assert_eq!(configs(&state), [("cleanup.policy", "compact"), ("retention.ms", "-1")]);
        assert_eq!((change.partitions, state.partitions), (cfg.partitions, 1));

        cfg.replication_factor = 3;
        let [change, dlq, state] = planned_topics(&cfg);
        assert_eq!(configs(&change), [("min.insync.replicas", "2")]);
        assert_eq!(configs(&dlq), [("min.insync.replicas", "2")]);
        assert!(configs(&state).contains(&("min.insync.replicas", "2")));
        cfg.replication_factor = 2;
        assert_eq!(configs(&planned_topics(&cfg)[0]), [("min.insync.replicas", "1")]);
    }
}
