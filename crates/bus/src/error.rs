//! Errors of the Kafka layer.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// A Kafka operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Creating a producer, consumer or admin client failed (bad settings).
    #[error("creating the kafka {role} client for {brokers} failed")]
    Client {
        /// Which client: producer, consumer, admin.
        role: &'static str,
        /// The bootstrap brokers.
        brokers: String,
        /// What librdkafka said.
        #[source]
        source: KafkaError,
    },
    /// Creating or inspecting a topic failed.
    #[error("kafka topic {topic}: {action} failed")]
    Topic {
        /// The topic.
        topic: String,
        /// What was attempted.
        action: &'static str,
        /// What the broker or librdkafka said.
        #[source]
        source: KafkaError,
    },
    /// A consumer-group operation failed (subscribing, consuming, pausing, resuming).
    #[error("kafka: {context}")]
    Consume {
        /// What was being done.
        context: String,
        /// What librdkafka said.
        #[source]
        source: KafkaError,
    },
    /// A topic scoresync needs does not exist.
    #[error("kafka topic {topic} does not exist: run `scoresync setup`")]
    MissingTopic {
        /// The topic.
        topic: String,
    },
    /// A topic exists with a different partition count than configured.
    #[error(
        "kafka topic {topic} has {actual} partitions but the configuration says {expected}; \
         scoresync never changes partition counts (that would move scorecards between partitions)"
    )]
    PartitionMismatch {
        /// The topic.
        topic: String,
        /// Partitions configured.
        expected: i32,
        /// Partitions found.
        actual: i32,
    },
}

impl Error {
    /// True when retrying the same operation later can succeed (broker unreachable, timeouts).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Client { .. } | Error::PartitionMismatch { .. } | Error::MissingTopic { .. } => {
                false
            }
            Error::Topic { source, .. } => kafka_error_is_transient(source),
            // As before the group member existed: the caller restarts from the last commit.
            Error::Consume { .. } => true,
        }
    }
}

/// True for librdkafka errors that a later retry can cure.
pub fn kafka_error_is_transient(err: &KafkaError) -> bool {
    use RDKafkaErrorCode as C;
    match err.rdkafka_error_code() {
        Some(
            C::BrokerTransportFailure
            | C::AllBrokersDown
            | C::OperationTimedOut
            | C::MessageTimedOut
            | C::RequestTimedOut
            | C::NetworkException
            | C::LeaderNotAvailable
            | C::NotLeaderForPartition
            | C::NotEnoughReplicas
            | C::NotEnoughReplicasAfterAppend
            | C::NotCoordinator
            | C::CoordinatorNotAvailable
            | C::CoordinatorLoadInProgress
            | C::QueueFull
            | C::Resolve,
        ) => true,
        Some(_) => false,
        None => matches!(err, KafkaError::Canceled),
    }
}

/// True when Kafka refused a message for its size; retrying the same message cannot help.
/// librdkafka's own check, when the message is produced (key, value and headers larger than
/// `kafka.max_message_bytes`, counted before compression), and the broker's (a record batch larger
/// than the topic's `max.message.bytes`, counted as stored) both report `MSG_SIZE_TOO_LARGE`; a
/// broker reports `RECORD_LIST_TOO_LARGE` for a batch larger than its log segments.
pub fn is_too_large(err: &KafkaError) -> bool {
    matches!(
        err.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::MessageBatchTooLarge)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_refused_for_its_size_is_too_large_and_not_transient() {
        use RDKafkaErrorCode as C;
        for code in [C::MessageSizeTooLarge, C::MessageBatchTooLarge] {
            let err = KafkaError::MessageProduction(code);
            assert!(is_too_large(&err), "{err}");
            assert!(!kafka_error_is_transient(&err), "{err}");
        }
        for err in [
            KafkaError::MessageProduction(C::QueueFull),
            KafkaError::MessageProduction(C::MessageTimedOut),
            KafkaError::MessageProduction(C::OffsetMetadataTooLarge),
            KafkaError::Canceled,
        ] {
            assert!(!is_too_large(&err), "{err}");
        }
    }
}
