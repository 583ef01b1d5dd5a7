//! librdkafka settings for each role, keeping DESIGN.md section 5.
//!
//! - Producer (rule 3): `enable.idempotence=true`, `acks=all`, a bounded `delivery.timeout.ms`.
//!   Idempotence keeps per-partition order with up to five requests in flight, so events of one
//!   scorecard stay in commit order even when the producer retries.
//! - Consumer (rule 5): offsets are stored by the application only (`enable.auto.offset.store=false`)
//!   after ClickHouse acknowledged the rows; the background auto-commit only commits what was
//!   stored. `auto.offset.reset` is chosen by the caller and never `latest` by default.
//! - The `[kafka.librdkafka]` extras are applied last, so security settings reach every client.

use rdkafka::ClientConfig;
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{ConsumerContext, StreamConsumer};
use rdkafka::producer::FutureProducer;

use crate::config::KafkaConfig;
use crate::error::Error;

/// librdkafka partitioner for keyed messages: murmur2 like the Java client, so any Kafka client
/// maps a scorecard key to the same partition.
pub const PARTITIONER: &str = "murmur2_random";

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

/// Settings of the idempotent, `acks=all` producer.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = base(cfg);
    c.set("enable.idempotence", "true")
        .set("acks", "all")
        .set("max.in.flight.requests.per.connection", "5")
        .set("delivery.timeout.ms", cfg.delivery_timeout_ms.to_string())
        .set("linger.ms", "5")
        // Callers bound their own in-flight events far below this, so enqueueing never fails.
        .set("queue.buffering.max.messages", "1000000")
        .set("partitioner", PARTITIONER);
    with_extras(c, cfg)
}

/// Settings of a consumer in `group` that stores offsets only when told to.
pub fn consumer_config(cfg: &KafkaConfig, group: &str, reset: OffsetReset) -> ClientConfig {
    let mut c = base(cfg);
    c.set("group.id", group)
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", reset.as_str())
        .set("enable.partition.eof", "false")
        .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
        .set("heartbeat.interval.ms", (cfg.session_timeout_ms / 4).max(500).to_string())
        .set("isolation.level", "read_committed");
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

/// Creates an admin client.
pub fn admin(cfg: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>, Error> {
    with_extras(base(cfg), cfg).create().map_err(|source| Error::Client {
        role: "admin",
        brokers: cfg.brokers.clone(),
        source,
    })
}
