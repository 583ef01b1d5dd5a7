//! librdkafka settings for each role, keeping DESIGN.md section 5.
//!
//! - Producer (rule 3): `enable.idempotence=true`, `acks=all`, a bounded `delivery.timeout.ms`.
//!   Idempotence keeps per-partition order with up to five requests in flight, so events of one
//!   scorecard stay in commit order even when the producer retries.
//! - Consumer (rule 5): offsets are stored by the application only (`enable.auto.offset.store=false`)
//!   after ClickHouse acknowledged the rows; the background auto-commit only commits what was
//!   stored. `auto.offset.reset` is chosen by the caller and never `latest` by default.
//! - Message size (`kafka.max_message_bytes`, the limit): the producer's `message.max.bytes` is
//!   the limit. librdkafka checks each message against it when it is produced, before
//!   compression (key, value, headers and the record's framing), and refuses a larger one at once
//!   with `MSG_SIZE_TOO_LARGE` (see [`crate::error::is_too_large`]); a batch of several messages
//!   stays within it too (only a batch's first message may take a request past it). The producer
//!   compresses with lz4 (built into every librdkafka, unlike zstd, snappy and gzip) and, whatever
//!   the codec, sends a batch uncompressed when compressing would make it larger; so a record
//!   batch never exceeds the limit plus its header, which is what the topics accept
//!   ([`crate::topics`]: Kafka checks the batch as stored, compressed). So a message that would
//!   compress below the limit is still refused when it is larger uncompressed. Consumers fetch at
//!   least the limit per partition and per request, and accept responses that large
//!   ([`consumer_config`]). `[kafka.librdkafka]` may not change these sizes
//!   ([`crate::config::RESERVED_PROPERTIES`]); it may change the codec.
//! - The `[kafka.librdkafka]` extras are applied last, so security settings reach every client.

use rdkafka::ClientConfig;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, ConsumerContext, StreamConsumer};
use rdkafka::producer::FutureProducer;

use crate::config::KafkaConfig;
use crate::error::Error;

/// librdkafka partitioner for keyed messages without a partition: murmur2 like the Java client.
/// The source sets each change event's partition itself (`scoresync_event::layout`, the same
/// function on the scorecard key), so this only decides where other keyed messages go.
pub const PARTITIONER: &str = "murmur2_random";

/// librdkafka's default `fetch.max.bytes` (50 MiB), kept while the message limit is below it.
const DEFAULT_FETCH_MAX_BYTES: usize = 52_428_800;
/// librdkafka's default `receive.message.max.bytes` (100 MB), kept while a fetch fits in it.
const DEFAULT_RECEIVE_MESSAGE_MAX_BYTES: usize = 100_000_000;
/// Room in a fetch response beyond `fetch.max.bytes`. librdkafka wants at least 512 bytes for the
/// protocol framing; a broker also returns a first record batch larger than `fetch.max.bytes`
/// rather than none (a batch may exceed the message limit by its header).
const FETCH_RESPONSE_FRAMING_BYTES: usize = 64 * 1024;

/// What a consumer does when its group has no usable committed offset for a partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OffsetReset {
    /// Start at the oldest retained message (a new sink group; replays are harmless).
    Earliest,
    /// Report an error instead of choosing (the caller decides and says so in the log).
    Error,
}

impl OffsetReset {
    fn as_str(self) -> &'static str {
        match self {
            OffsetReset::Earliest => "earliest",
            OffsetReset::Error => "error",
        }
    }
}

fn base(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers);
    c.set("client.id", "scoresync");
    c
}

fn with_extras(mut c: ClientConfig, cfg: &KafkaConfig) -> ClientConfig {
    for (k, v) in cfg.librdkafka.exposed() {
        c.set(k, v);
    }
    c
}

/// Settings of the idempotent, `acks=all`, lz4-compressing producer of messages up to
/// `kafka.max_message_bytes`.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = base(cfg);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("delivery.timeout.ms", cfg.delivery_timeout_ms.to_string())
        .set("linger.ms", "5")
        // Callers bound their own in-flight events far below this, so enqueueing never fails.
        .set("queue.buffering.max.messages", "1000000")
        .set("partitioner", PARTITIONER)
        .set("message.max.bytes", cfg.max_message_bytes.to_string())
        .set("compression.codec", "lz4");
    with_extras(c, cfg)
}

/// Settings of a consumer in `group` that stores offsets only when told to. It fetches a message
/// of `kafka.max_message_bytes` in one go: `max.partition.fetch.bytes` is the limit,
/// `fetch.max.bytes` the limit or librdkafka's default when larger, and
/// `receive.message.max.bytes` leaves room for the response's framing (librdkafka refuses to
/// start with less than `fetch.max.bytes` + 512).
pub fn consumer_config(cfg: &KafkaConfig, group: &str, reset: OffsetReset) -> ClientConfig {
    let fetch_max_bytes = cfg.max_message_bytes.max(DEFAULT_FETCH_MAX_BYTES);
    let receive_max_bytes =
        (fetch_max_bytes + FETCH_RESPONSE_FRAMING_BYTES).max(DEFAULT_RECEIVE_MESSAGE_MAX_BYTES);
    let mut c = base(cfg);
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", reset.as_str())
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (cfg.session_timeout_ms / 4).max(500).to_string())
        .set("isolation.level", "read_committed")
        .set("max.partition.fetch.bytes", cfg.max_message_bytes.to_string())
        .set("fetch.max.bytes", fetch_max_bytes.to_string())
        .set("receive.message.max.bytes", receive_max_bytes.to_string());
    with_extras(c, cfg)
}

/// Creates the idempotent producer.
pub fn producer(cfg: &KafkaConfig) -> Result<FutureProducer, Error> {
    producer_config(cfg).create().map_err(|source| Error::Client {
        role: "producer",
        brokers: cfg.brokers.clone(),
        source,
    })
}

/// Creates a stream consumer in `group` with the given context.
pub fn consumer<C: ConsumerContext + 'static>(
    cfg: &KafkaConfig,
    group: &str,
    reset: OffsetReset,
    context: C,
) -> Result<StreamConsumer<C>, Error> {
    consumer_config(cfg, group, reset)
        .create_with_context(context)
        .map_err(|source| Error::Client { role: "consumer", brokers: cfg.brokers.clone(), source })
}

/// Creates a consumer that reads by assignment: it never joins `group` (no subscription) and
/// commits nothing on its own; `group` only names whose committed offsets it may read or write.
/// `role` names it in errors.
pub fn reader(cfg: &KafkaConfig, group: &str, role: &'static str) -> Result<BaseConsumer, Error> {
    reader_config(cfg, group).create().map_err(|source| Error::Client {
        role,
        brokers: cfg.brokers.clone(),
        source,
    })
}

/// The settings of a [`reader`], for a caller that changes some.
pub fn reader_config(cfg: &KafkaConfig, group: &str) -> ClientConfig {
    let mut config = consumer_config(cfg, group, OffsetReset::Error);
    config.set("enable.auto.commit", "false");
    config
}

/// Creates an admin client.
pub fn admin(cfg: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>, Error> {
    with_extras(base(cfg), cfg).create().map_err(|source| Error::Client {
        role: "admin",
        brokers: cfg.brokers.clone(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_producer_sends_messages_up_to_the_limit_compressed() {
        let mut cfg = KafkaConfig::new("b:1");
        let c = producer_config(&cfg);
        assert_eq!(c.get("message.max.bytes"), Some("16777216"));
        assert_eq!(c.get("compression.codec"), Some("lz4"));
        cfg.max_message_bytes = 3_000_000;
        assert_eq!(producer_config(&cfg).get("message.max.bytes"), Some("3000000"));
    }

    #[test]
    fn consumers_fetch_a_whole_message_of_the_limit_in_one_response() {
        let mut cfg = KafkaConfig::new("b:1");
        let c = consumer_config(&cfg, "g", OffsetReset::Earliest);
        assert_eq!(c.get("max.partition.fetch.bytes"), Some("16777216"));
        assert_eq!(c.get("fetch.max.bytes"), Some("52428800"), "librdkafka's default is larger");
        assert_eq!(c.get("receive.message.max.bytes"), Some("100000000"));

        cfg.max_message_bytes = 200_000_000;
        let c = consumer_config(&cfg, "g", OffsetReset::Earliest);
        assert_eq!(c.get("max.partition.fetch.bytes"), Some("200000000"));
        assert_eq!(c.get("fetch.max.bytes"), Some("200000000"));
        assert_eq!(c.get("receive.message.max.bytes"), Some("200065536"));

        for limit in [262_144, 1_048_576, 16_777_216, 99_999_999, 1_000_000_000] {
            cfg.max_message_bytes = limit;
            let c = consumer_config(&cfg, "g", OffsetReset::Error);
            let value = |key| c.get(key).and_then(|v| v.parse::<usize>().ok()).expect(key);
            assert!(value("max.partition.fetch.bytes") >= limit);
            assert!(value("fetch.max.bytes") >= limit);
            assert!(
                value("receive.message.max.bytes") >= value("fetch.max.bytes") + 512,
                "librdkafka refuses less"
            );
        }
    }

    #[test]
    fn the_size_settings_are_accepted_by_librdkafka() {
        // Creating a client checks every value and the rules between them. (Its background
        // attempts to reach port 1 fail quietly.)
        let mut cfg = KafkaConfig::new("127.0.0.1:1");
        for limit in [262_144, 1_000_000_000] {
            cfg.max_message_bytes = limit;
            let producer: Result<rdkafka::producer::BaseProducer, _> =
                producer_config(&cfg).create();
            producer.expect("producer settings");
            let consumer: Result<rdkafka::consumer::BaseConsumer, _> =
                consumer_config(&cfg, "g", OffsetReset::Earliest).create();
            consumer.expect("consumer settings");
        }
    }
}
