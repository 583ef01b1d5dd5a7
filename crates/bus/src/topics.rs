//! The topics scoresync uses, created idempotently by `scoresync setup`.
//!
//! | topic            | partitions              | holds                                         |
//! |------------------|-------------------------|-----------------------------------------------|
//! | change topic     | `kafka.partitions`      | change events (`scoresync_event::layout`)     |
//! | dead-letter topic| `kafka.partitions`      | poison events with their origin and error     |
//! | state topic      | 1                       | the source's pipeline record (latest wins)    |
//!
//! The change topic is compacted by default (`kafka.change_cleanup_policy`): every message is
//! keyed by its row, so the topic always holds each row's newest change and a replay from the
//! earliest offset rebuilds every row, however old. Compaction waits `kafka.change_retention_ms`
//! before it touches a message and keeps tombstones as long (`min.compaction.lag.ms`,
//! `delete.retention.ms`). Under the `delete` policy the topic keeps messages that long instead.
//!
//! The change and dead-letter topics take record batches of up to `kafka.max_message_bytes` plus
//! a batch header (`max.message.bytes`, which Kafka checks against the batch as stored, after
//! compression) and keep the producer's compression (`compression.type=producer`, so the broker
//! never recompresses into a different size): whatever the producer accepts, they accept
//! ([`crate::client`]).
//!
//! An existing topic is never altered: a different partition count is an error, because changing
//! it would move scorecards between partitions and break per-scorecard ordering. A config that
//! differs from what `setup` would create (a topic made by hand, or before a setting changed) is
//! reported ([`ConfigDifference`]) with the command that changes it; the operator decides.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

use crate::config::{CleanupPolicy, KafkaConfig};
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
        /// Its configs that differ from what `setup` would create it with (left as they are).
        differences: Vec<ConfigDifference>,
    },
    /// The topic was created.
    Created {
        /// Topic name.
        topic: String,
        /// Its partitions.
        partitions: i32,
    },
}

/// A config of an existing topic that differs from what `setup` would set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigDifference {
    /// The topic.
    pub topic: String,
    /// The config name.
    pub key: &'static str,
    /// What `setup` would set.
    pub wanted: String,
    /// What the broker reports (`None`: not reported).
    pub actual: Option<String>,
}

impl std::fmt::Display for ConfigDifference {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ConfigDifference { topic, key, wanted, actual } = self;
        let actual = actual.as_deref().unwrap_or("not reported");
        write!(
            f,
            "kafka topic {topic}: {key} is {actual}, scoresync would set {wanted} (left as it is)"
        )
    }
}

/// The one command that gives `topic` every config of `differences` (Apache Kafka's
/// `kafka-configs.sh`), for an operator to review and run.
pub fn alter_command(brokers: &str, topic: &str, differences: &[ConfigDifference]) -> String {
    let configs: Vec<String> =
        differences.iter().map(|d| format!("{}={}", d.key, d.wanted)).collect();
    format!(
        "kafka-configs.sh --bootstrap-server {brokers} --alter --entity-type topics --entity-name \
         {topic} --add-config {}",
        configs.join(",")
    )
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

/// The topics of a configuration. The change topic is compacted or time-limited as
/// `kafka.change_cleanup_policy` says (see the module doc). Every topic with replication factor RF > 1 gets
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
    let retention = cfg.change_retention_ms.to_string();
    let policy: Vec<(&'static str, String)> = match cfg.change_cleanup_policy {
        CleanupPolicy::Compact => vec![
            ("cleanup.policy", "compact".to_owned()),
            ("min.compaction.lag.ms", retention.clone()),
            ("delete.retention.ms", retention),
        ],
        CleanupPolicy::Delete => {
            vec![("cleanup.policy", "delete".to_owned()), ("retention.ms", retention)]
        }
    };
    let changes: Vec<(&'static str, String)> = events.iter().cloned().chain(policy).collect();
    let topic = |name: &str, partitions, configs| PlannedTopic {
        name: name.to_owned(),
        partitions,
        configs,
    };
    [
        topic(&cfg.change_topic, cfg.partitions, changes),
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
            let differences = differences(&admin, &topic, &configs).await?;
            outcomes.push(TopicOutcome::Existed { topic, partitions, differences });
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

/// The configs of `topic` that differ from `wanted`, as the broker describes them.
async fn differences(
    admin: &rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    topic: &str,
    wanted: &[(&'static str, String)],
) -> Result<Vec<ConfigDifference>, Error> {
    let described = describe_with(admin, topic).await?;
    Ok(wanted
        .iter()
        .filter_map(|(key, value)| {
            let actual = described.get(*key).cloned();
            (actual.as_deref() != Some(value.as_str())).then(|| ConfigDifference {
                topic: topic.into(),
                key,
                wanted: value.clone(),
                actual,
            })
        })
        .collect())
}

/// The configs of `topic` as the broker describes them (name to value; configs without a value
/// left out).
pub async fn describe(cfg: &KafkaConfig, topic: &str) -> Result<BTreeMap<String, String>, Error> {
    describe_with(&crate::client::admin(cfg)?, topic).await
}

async fn describe_with(
    admin: &rdkafka::admin::AdminClient<rdkafka::client::DefaultClientContext>,
    topic: &str,
) -> Result<BTreeMap<String, String>, Error> {
    let opts = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
    let fail = |source| Error::Topic { topic: topic.into(), action: "describe configs", source };
    let described = admin.describe_configs([&ResourceSpecifier::Topic(topic)], &opts).await;
    let resource = described
        .map_err(fail)?
        .into_iter()
        .next()
        .ok_or(KafkaError::AdminOp(RDKafkaErrorCode::UnknownTopic))
        .map_err(fail)?
        .map_err(|code| fail(KafkaError::AdminOp(code)))?;
    Ok(resource.entries.into_iter().filter_map(|e| Some((e.name, e.value?))).collect())
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
        assert_eq!(configs(&change)[..2], EVENTS, "a single broker: no min.insync.replicas");
        assert_eq!(configs(&dlq), EVENTS);
        assert_eq!(configs(&state), [("cleanup.policy", "compact"), ("retention.ms", "-1")]);
        assert_eq!((change.partitions, state.partitions), (cfg.partitions, 1));

        cfg.replication_factor = 3;
        let [change, dlq, state] = planned_topics(&cfg);
        assert!(configs(&change).contains(&("min.insync.replicas", "2")));
        assert_eq!(configs(&dlq)[2..], [("min.insync.replicas", "2")]);
        assert!(configs(&state).contains(&("min.insync.replicas", "2")));
        cfg.replication_factor = 2;
        assert!(configs(&planned_topics(&cfg)[0]).contains(&("min.insync.replicas", "1")));
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

    #[test]
    fn the_change_topic_is_compacted_unless_configured_to_expire() {
        let mut cfg = KafkaConfig::new("b:1");
        cfg.replication_factor = 1;
        let [change, ..] = planned_topics(&cfg);
        assert_eq!(
            configs(&change)[2..],
            [
                ("cleanup.policy", "compact"),
                ("min.compaction.lag.ms", "604800000"),
                ("delete.retention.ms", "604800000")
            ]
        );
        cfg.change_cleanup_policy = CleanupPolicy::Delete;
        cfg.change_retention_ms = 86_400_000;
        let [change, ..] = planned_topics(&cfg);
        assert_eq!(
            configs(&change)[2..],
            [("cleanup.policy", "delete"), ("retention.ms", "86400000")]
        );
    }

    #[test]
    fn differences_say_what_is_set_and_what_would_be_and_one_command_changes_them_all() {
        let difference = |key, wanted: &str, actual: &str| ConfigDifference {
            topic: "t".into(),
            key,
            wanted: wanted.into(),
            actual: Some(actual.into()),
        };
        let policy = difference("cleanup.policy", "compact", "delete");
        let lag = difference("min.compaction.lag.ms", "604800000", "0");
        assert_eq!(
            policy.to_string(),
            "kafka topic t: cleanup.policy is delete, scoresync would set compact (left as it is)"
        );
        assert_eq!(
            alter_command("b:9092", "t", &[policy, lag]),
            "kafka-configs.sh --bootstrap-server b:9092 --alter --entity-type topics \
             --entity-name t --add-config cleanup.policy=compact,min.compaction.lag.ms=604800000"
        );
    }
}
