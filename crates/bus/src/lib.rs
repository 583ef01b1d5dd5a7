//! Kafka for scoresync: how the source produces, how sinks consume, and the topics they share.
//!
//! - [`config`]: the `[kafka]` section of the configuration.
//! - [`client`]: librdkafka settings that keep the delivery rules of DESIGN.md section 5: the
//!   producer is idempotent with `acks=all`; consumers never commit on their own and never jump to
//!   the latest offset when a committed one is missing. Producer, consumers and topics share one
//!   message size limit, `kafka.max_message_bytes`.
//! - [`group`]: a consumer-group member that owns the consumer, the hold book of offsets still
//!   in use, rebalances (a revoke waits, bounded, for the work other tasks still do on messages
//!   already taken: [`group::InFlight`]), pause and resume, offset storing and a warning
//!   while it is assigned nothing.
//! - [`offsets`]: a topic's watermarks and a group's committed offsets, read without joining the
//!   group; offsets for a time; start offsets set for a new group.
//! - [`topics`]: creating the change (compacted, keyed by row), dead-letter and state topics,
//!   idempotently, and reporting an existing topic's configs that differ.
//!
//! Errors are [`Error`]; each one knows whether retrying can help ([`Error::is_transient`]). A
//! message Kafka refused for its size is recognised by [`error::is_too_large`].

pub mod client;
pub mod config;
pub mod error;
pub mod group;
pub mod offsets;
pub mod topics;

pub use config::KafkaConfig;
pub use error::Error;
