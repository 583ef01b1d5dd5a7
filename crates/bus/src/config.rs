//! The `[kafka]` section of the scoresync configuration.

use std::collections::BTreeMap;

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// Default change topic.
pub const DEFAULT_CHANGE_TOPIC: &str = "scoresync.changes";
/// Default dead-letter topic.
pub const DEFAULT_DLQ_TOPIC: &str = "scoresync.dlq";
/// Default state topic (the source's record of its pipeline: system id, confirmed LSN, snapshot).
pub const DEFAULT_STATE_TOPIC: &str = "scoresync.state";
/// Default partition count of the change topic.
pub const DEFAULT_PARTITIONS: i32 = 12;
/// Default replication factor of created topics (production clusters have three brokers or more).
pub const DEFAULT_REPLICATION_FACTOR: i32 = 3;
/// Default consumer group of the sink.
pub const DEFAULT_CONSUMER_GROUP: &str = "scoresync-sink";
/// Default upper bound for one message's delivery, retries included (librdkafka
/// `delivery.timeout.ms`). A message not acknowledged by then fails, and the source restarts from
/// the slot.
pub const DEFAULT_DELIVERY_TIMEOUT_MS: u64 = 120_000;

/// Default consumer session timeout: how long the group waits for a sink that stopped
/// heartbeating (crashed) before handing its partitions to another member.
pub const DEFAULT_SESSION_TIMEOUT_MS: u64 = 10_000;

/// Default largest message scoresync produces and consumes: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Smallest `kafka.max_message_bytes`: 256 KiB (Kafka's own default is about 1 MiB; a smaller limit
/// only makes sense to test what happens past it).
pub const MIN_MAX_MESSAGE_BYTES: usize = 256 * 1024;
/// Largest `kafka.max_message_bytes`: librdkafka's ceiling for `message.max.bytes` and
/// `max.partition.fetch.bytes` (1,000,000,000).
pub const MAX_MAX_MESSAGE_BYTES: usize = 1_000_000_000;

/// Default time the change topic keeps a message under the `delete` policy, and keeps a message
/// from compaction under `compact`: 7 days.
pub const DEFAULT_CHANGE_RETENTION_MS: u64 = 7 * 24 * 3_600_000;

/// Smallest `kafka.change_retention_ms`: an hour.
pub const MIN_CHANGE_RETENTION_MS: u64 = 3_600_000;

/// How the change topic keeps messages (its Kafka `cleanup.policy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CleanupPolicy {
    /// The newest message of every key (every row) is kept for ever, older ones are compacted
    /// away: `replay --from earliest` can always rebuild ClickHouse from the topic alone.
    #[default]
    Compact,
    /// Messages older than `kafka.change_retention_ms` are deleted: a replay rebuilds only that
    /// far back (it says so; `scoresync backfill` restores the rest from PostgreSQL).
    Delete,
}

impl CleanupPolicy {
    /// The Kafka `cleanup.policy` value.
    pub fn as_str(self) -> &'static str {
        match self {
            CleanupPolicy::Compact => "compact",
            CleanupPolicy::Delete => "delete",
        }
    }
}

/// Kafka connection and topic settings.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port...]`.
    pub brokers: String,
    /// Topic the source publishes change events to.
    #[serde(default = "default_change_topic")]
    pub change_topic: String,
    /// Topic poison events go to, with their origin and error.
    #[serde(default = "default_dlq_topic")]
    pub dlq_topic: String,
    /// Single-partition topic where the source records its pipeline state.
    #[serde(default = "default_state_topic")]
    pub state_topic: String,
    /// Partitions of the change topic (fixed once created: scorecards map to partitions by key).
    #[serde(default = "default_partitions")]
    pub partitions: i32,
    /// Replication factor for topics `setup` creates.
    #[serde(default = "default_replication_factor")]
    pub replication_factor: i32,
    /// Consumer group of the sink.
    #[serde(default = "default_consumer_group")]
    pub consumer_group: String,
    /// librdkafka `delivery.timeout.ms` of the producer.
    #[serde(default = "default_delivery_timeout_ms")]
    pub delivery_timeout_ms: u64,
    /// librdkafka `session.timeout.ms` of the sink's consumer.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// Largest message, in bytes, scoresync produces and consumes: a change event or a dead
    /// letter, key, value and headers counted before compression. The producer, the consumers and
    /// the change and dead-letter topics `setup` creates all follow it (see [`crate::client`] and
    /// [`crate::topics`]). A broker also caps a whole produce request at its
    /// `socket.request.max.bytes` (Kafka's default: 100 MiB).
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// How the change topic `setup` creates keeps messages: `compact` (the default) or `delete`.
    #[serde(default)]
    pub change_cleanup_policy: CleanupPolicy,
    /// Under `compact`: how long a message is safe from compaction, and how long a tombstone
    /// stays (Kafka `min.compaction.lag.ms` and `delete.retention.ms`, counted from the
    /// message's time, its PostgreSQL commit time). A consumer that falls further behind than
    /// this (the sink, a replay) may find a DELETE already compacted away behind its tombstone
    /// and keep the row. Under `delete`: how long the topic keeps a message (`retention.ms`).
    #[serde(default = "default_change_retention_ms")]
    pub change_retention_ms: u64,
    /// Extra librdkafka properties (security.protocol, sasl.*, ...), applied to every client.
    /// Values of keys that look secret are never printed.
    #[serde(default, serialize_with = "expose_properties_for_config_file")]
    pub librdkafka: LibrdkafkaProperties,
}

/// The `[kafka.librdkafka]` table: property name to value. Values of names that look secret
/// (password, secret, token, key) are held as secrets: they never print, and are exposed only
/// to configure a client.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(from = "BTreeMap<String, String>")]
pub struct LibrdkafkaProperties {
    plain: BTreeMap<String, String>,
    secret: BTreeMap<String, SecretString>,
}

/// librdkafka properties scoresync sets itself because a delivery rule (DESIGN.md section 5) or
/// the message size limit (`kafka.max_message_bytes`) depends on them, with the reason:
/// `[kafka.librdkafka]` may not override them. `compression.codec` stays open: whatever the
/// codec, librdkafka checks a message's size before compressing it and sends a batch uncompressed
/// when compressing would make it larger, so no codec takes a batch over the limit.
pub const RESERVED_PROPERTIES: [(&str, &str); 19] = [
    ("enable.idempotence", "the producer is idempotent (rule 3)"),
    ("acks", "the producer waits for acks=all (rule 3)"),
    ("request.required.acks", "the producer waits for acks=all (rule 3)"),
    ("max.in.flight.requests.per.connection", "idempotence keeps order with at most 5 (rule 3)"),
    ("max.in.flight", "idempotence keeps order with at most 5 (rule 3)"),
    ("partitioner", "keyed messages go where Kafka's Java client would put them (murmur2)"),
    ("enable.auto.commit", "offsets are committed only once stored (rule 5)"),
    ("enable.auto.offset.store", "offsets are stored only after ClickHouse acknowledged (rule 5)"),
    ("auto.offset.reset", "a group never jumps to the latest offset on its own (rule 5)"),
    ("isolation.level", "consumers read committed messages only"),
    ("group.id", "the sink's group is kafka.consumer_group"),
    ("enable.partition.eof", "the sink does not expect end-of-partition events"),
    ("delivery.timeout.ms", "it is kafka.delivery_timeout_ms"),
    (
        "group.instance.id",
        "sinks join the group dynamically (a dead static member's partitions wait out the \
         session timeout), and [kafka.librdkafka] would give every sink the same id",
    ),
    ("message.max.bytes", SIZE_RULE),
    ("fetch.max.bytes", SIZE_RULE),
    ("max.partition.fetch.bytes", SIZE_RULE),
    ("fetch.message.max.bytes", SIZE_RULE),
    ("receive.message.max.bytes", SIZE_RULE),
];

/// Why the size properties are reserved: another `message.max.bytes` would refuse messages the
/// topics accept (or produce ones they refuse); smaller consumer sizes would not fetch or receive
/// one message of the limit at once.
const SIZE_RULE: &str =
    "producer, consumers and topics all follow kafka.max_message_bytes, set that instead";

impl LibrdkafkaProperties {
    /// The property names set.
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.plain.keys().chain(self.secret.keys()).map(String::as_str)
    }

    /// Sets `key` to `value` (a secret when the name looks secret).
    pub fn insert(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let (key, value) = (key.into(), value.into());
        if is_secret_property(&key) {
            self.secret.insert(key, value.into());
        } else {
            self.plain.insert(key, value);
        }
    }

    /// Every property with its value, secrets exposed: only for configuring a client.
    pub(crate) fn exposed(&self) -> impl Iterator<Item = (&str, &str)> {
        let plain = self.plain.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        plain.chain(self.secret.iter().map(|(k, v)| (k.as_str(), v.expose_secret())))
    }
}

impl From<BTreeMap<String, String>> for LibrdkafkaProperties {
    fn from(properties: BTreeMap<String, String>) -> Self {
        let mut all = LibrdkafkaProperties::default();
        for (key, value) in properties {
            all.insert(key, value);
        }
        all
    }
}

/// Serializes every property with its value, secrets included: `Serialize` exists only to write
/// a configuration file (the test harness writes the daemon's), and that file needs the real
/// values. Anything else that prints a config goes through `Debug`, which redacts.
fn expose_properties_for_config_file<S: Serializer>(
    properties: &LibrdkafkaProperties,
    to: S,
) -> Result<S::Ok, S::Error> {
    to.collect_map(properties.exposed())
}

fn default_change_topic() -> String {
    DEFAULT_CHANGE_TOPIC.into()
}
fn default_dlq_topic() -> String {
    DEFAULT_DLQ_TOPIC.into()
}
fn default_state_topic() -> String {
    DEFAULT_STATE_TOPIC.into()
}
fn default_partitions() -> i32 {
    DEFAULT_PARTITIONS
}
fn default_replication_factor() -> i32 {
    DEFAULT_REPLICATION_FACTOR
}
fn default_consumer_group() -> String {
    DEFAULT_CONSUMER_GROUP.into()
}
fn default_delivery_timeout_ms() -> u64 {
    DEFAULT_DELIVERY_TIMEOUT_MS
}
fn default_session_timeout_ms() -> u64 {
    DEFAULT_SESSION_TIMEOUT_MS
}
fn default_max_message_bytes() -> usize {
    DEFAULT_MAX_MESSAGE_BYTES
}
fn default_change_retention_ms() -> u64 {
    DEFAULT_CHANGE_RETENTION_MS
}

impl KafkaConfig {
    /// Settings for `brokers` with every other field at its default.
    pub fn new(brokers: impl Into<String>) -> Self {
        KafkaConfig {
            brokers: brokers.into(),
            change_topic: default_change_topic(),
            dlq_topic: default_dlq_topic(),
            state_topic: default_state_topic(),
            partitions: DEFAULT_PARTITIONS,
            replication_factor: DEFAULT_REPLICATION_FACTOR,
            consumer_group: default_consumer_group(),
            delivery_timeout_ms: DEFAULT_DELIVERY_TIMEOUT_MS,
            session_timeout_ms: DEFAULT_SESSION_TIMEOUT_MS,
            max_message_bytes: DEFAULT_MAX_MESSAGE_BYTES,
            change_cleanup_policy: CleanupPolicy::default(),
            change_retention_ms: DEFAULT_CHANGE_RETENTION_MS,
            librdkafka: LibrdkafkaProperties::default(),
        }
    }

    /// Checks every field; the message names the field and the constraint it breaks.
    pub fn validate(&self) -> Result<(), String> {
        if self.brokers.trim().is_empty() {
            return Err("kafka.brokers must name at least one host:port".into());
        }
        for key in self.librdkafka.keys() {
            if let Some((_, why)) = RESERVED_PROPERTIES.iter().find(|(name, _)| *name == key) {
                return Err(format!(
                    "kafka.librdkafka.{key} is set by scoresync and may not be overridden: {why}; \
                     remove it from [kafka.librdkafka]"
                ));
            }
        }
        for (field, topic) in [
            ("kafka.change_topic", &self.change_topic),
            ("kafka.dlq_topic", &self.dlq_topic),
            ("kafka.state_topic", &self.state_topic),
        ] {
            let legal = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
            if topic.is_empty() || topic.len() > 249 || !topic.chars().all(legal) {
                return Err(format!(
                    "{field} must be 1-249 characters of [a-zA-Z0-9._-] (got {topic:?})"
                ));
            }
        }
        if self.change_topic == self.dlq_topic
            || self.change_topic == self.state_topic
            || self.dlq_topic == self.state_topic
        {
            return Err(
                "kafka.change_topic, kafka.dlq_topic and kafka.state_topic must differ".into()
            );
        }
        if self.partitions < 1 {
            return Err(format!("kafka.partitions must be at least 1 (got {})", self.partitions));
        }
        if self.replication_factor < 1 {
            return Err(format!(
                "kafka.replication_factor must be at least 1 (got {})",
                self.replication_factor
            ));
        }
        if self.consumer_group.is_empty() {
            return Err("kafka.consumer_group must not be empty".into());
        }
        if self.delivery_timeout_ms < 1_000 {
            return Err(format!(
                "kafka.delivery_timeout_ms must be at least 1000 (got {})",
                self.delivery_timeout_ms
            ));
        }
        if !(3_000..=300_000).contains(&self.session_timeout_ms) {
            return Err(format!(
                "kafka.session_timeout_ms must be between 3000 and 300000 (got {})",
                self.session_timeout_ms
            ));
        }
        if !(MIN_MAX_MESSAGE_BYTES..=MAX_MAX_MESSAGE_BYTES).contains(&self.max_message_bytes) {
            return Err(format!(
                "kafka.max_message_bytes must be between {MIN_MAX_MESSAGE_BYTES} (256 KiB) and \
                 {MAX_MAX_MESSAGE_BYTES} (librdkafka's ceiling) (got {})",
                self.max_message_bytes
            ));
        }
        if self.change_retention_ms < MIN_CHANGE_RETENTION_MS {
            return Err(format!(
                "kafka.change_retention_ms must be at least {MIN_CHANGE_RETENTION_MS} (an hour): \
                 a sink or replay behind by more may miss deletes (got {})",
                self.change_retention_ms
            ));
        }
        Ok(())
    }
}

/// True for librdkafka property names whose values must never be printed.
fn is_secret_property(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    ["password", "secret", "token", "key"].iter().any(|s| key.contains(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bad_fields_are_named() {
        let mut cfg = KafkaConfig::new("127.0.0.1:9092");
        assert_eq!(cfg.validate(), Ok(()));
        cfg.partitions = 0;
        assert!(cfg.validate().expect_err("invalid").contains("kafka.partitions"));
        let mut cfg = KafkaConfig::new("b:1");
        cfg.dlq_topic = "bad topic".into();
        assert!(cfg.validate().expect_err("invalid").contains("kafka.dlq_topic"));
    }

    #[test]
    fn static_membership_is_gone_and_an_old_instance_id_is_named() {
        let error = toml::from_str::<KafkaConfig>("brokers = \"b:1\"\ninstance_id = \"sink-a\"")
            .expect_err("unknown field");
        assert!(error.to_string().contains("instance_id"), "{error}");
        let mut cfg = KafkaConfig::new("b:1");
        cfg.librdkafka.insert("group.instance.id", "sink-a");
        let error = cfg.validate().expect_err("refused");
        assert!(error.contains("kafka.librdkafka.group.instance.id"), "{error}");
    }

    #[test]
    fn the_message_size_limit_defaults_to_16_mib_and_is_bounded() {
        let cfg: KafkaConfig = toml::from_str("brokers = \"b:1\"").expect("valid");
        assert_eq!(cfg.max_message_bytes, 16_777_216);
        for (limit, valid) in [
            (262_143, false),
            (262_144, true),
            (1_000_000_000, true),
            (1_000_000_001, false),
            (0, false),
        ] {
            let mut cfg = KafkaConfig::new("b:1");
            cfg.max_message_bytes = limit;
            match cfg.validate() {
                Ok(()) => assert!(valid, "{limit} accepted"),
                Err(error) => {
                    assert!(!valid, "{limit} refused: {error}");
                    assert!(error.contains("kafka.max_message_bytes"), "{error}");
                }
            }
        }
    }

    #[test]
    fn properties_that_keep_a_delivery_rule_cannot_be_overridden() {
        for (key, value) in
            [("acks", "1"), ("enable.auto.commit", "false"), ("auto.offset.reset", "latest")]
        {
            let mut cfg = KafkaConfig::new("b:1");
            cfg.librdkafka.insert(key, value);
            let error = cfg.validate().expect_err("refused");
            assert!(error.contains(&format!("kafka.librdkafka.{key}")), "{error}");
            assert!(error.contains("rule") || error.contains("latest"), "{error}");
        }
        for key in [
            "message.max.bytes",
            "fetch.max.bytes",
            "max.partition.fetch.bytes",
            "fetch.message.max.bytes",
            "receive.message.max.bytes",
        ] {
            let mut cfg = KafkaConfig::new("b:1");
            cfg.librdkafka.insert(key, "1000000");
            let error = cfg.validate().expect_err("refused");
            assert!(error.contains(&format!("kafka.librdkafka.{key}")), "{error}");
            assert!(error.contains("kafka.max_message_bytes"), "{error}");
        }
        let mut cfg = KafkaConfig::new("b:1");
        cfg.librdkafka.insert("compression.codec", "zstd");
        assert_eq!(cfg.validate(), Ok(()), "any codec keeps the size limit");
        let mut cfg = KafkaConfig::new("b:1");
        cfg.librdkafka.insert("security.protocol", "SASL_SSL");
        cfg.librdkafka.insert("sasl.password", "hunter2");
        assert_eq!(cfg.validate(), Ok(()), "security settings stay open");
    }

    #[test]
    fn debug_redacts_secret_properties() {
        let cfg: KafkaConfig = toml::from_str(
            "brokers = \"b:1\"\n[librdkafka]\n\"sasl.password\" = \"hunter2\"\n\
             \"ssl.key.password\" = \"swordfish\"\n\"security.protocol\" = \"SASL_SSL\"\n",
        )
        .expect("valid");
        let printed = format!("{cfg:?}");
        assert!(!printed.contains("hunter2") && !printed.contains("swordfish"), "{printed}");
        assert!(printed.contains("SASL_SSL") && printed.contains("sasl.password"), "{printed}");
        let mut exposed: Vec<(&str, &str)> = cfg.librdkafka.exposed().collect();
        exposed.sort();
        assert_eq!(
            exposed,
            [
                ("sasl.password", "hunter2"),
                ("security.protocol", "SASL_SSL"),
                ("ssl.key.password", "swordfish")
            ]
        );
    }
}
