//! Errors of the source, each one transient (retry from the slot after a backoff) or permanent
//! (halt with a message that names the slot, table or position).
//!
//! Logs and the CLI show an error with its causes on one line, `a: b: c`:
//! `error_reporter::Report`, a stable copy of the standard library's unstable
//! `std::error::Report` (moving to std will change only the import).

use pgwire_replication::PgWireError;
use rdkafka::error::KafkaError;
use scoresync_event::Lsn;

use crate::change::MapError;
use crate::decode::DecodeError;

/// A source failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A SQL statement failed.
    #[error("postgres: {context}")]
    Sql {
        /// What was being done.
        context: String,
        /// The driver error (SQLSTATE inside).
        #[source]
        source: tokio_postgres::Error,
    },
    /// The replication connection failed.
    #[error("replication stream of slot {slot}: {source}")]
    Replication {
        /// The slot.
        slot: String,
        /// The transport error.
        #[source]
        source: PgWireError,
    },
    /// The server ended the replication stream.
    #[error("replication stream of slot {slot} ended unexpectedly")]
    StreamEnded {
        /// The slot.
        slot: String,
    },
    /// The slot does not exist.
    #[error(
        "replication slot {slot} does not exist in database {database}; scoresync never recreates \
         a slot on its own (changes since it was dropped are gone): run `scoresync setup \
         --recreate-slot` to create it and publish a fresh snapshot"
    )]
    SlotMissing {
        /// The slot.
        slot: String,
        /// The database it should be in.
        database: String,
    },
    /// The slot exists but cannot be used as it is.
    #[error("replication slot {slot}: {problem}")]
    SlotUnusable {
        /// The slot.
        slot: String,
        /// What is wrong, and what to do.
        problem: String,
    },
    /// The source has no record of the pipeline this slot belongs to.
    #[error(
        "no pipeline record for replication slot {slot} on the state topic {topic}; \
         run `scoresync setup` first"
    )]
    NoRecord {
        /// The slot.
        slot: String,
        /// The state topic.
        topic: String,
    },
    /// The pipeline record does not match the server.
    #[error("replication slot {slot}: {problem}")]
    RecordMismatch {
        /// The slot.
        slot: String,
        /// What differs, and what to do.
        problem: String,
    },
    /// A pgoutput message could not be decoded.
    #[error("slot {slot}: undecodable pgoutput message at {lsn}")]
    Decode {
        /// The slot.
        slot: String,
        /// WAL position of the message.
        lsn: Lsn,
        /// What was wrong.
        #[source]
        source: DecodeError,
    },
    /// The pipeline record predates row version schemes.
    #[error(
        "the pipeline record of slot {slot} has no row version scheme (written before format 2); \
         run `scoresync setup` once: it adds one above the highest version ClickHouse holds"
    )]
    NoVersionScheme {
        /// The slot.
        slot: String,
    },
    /// A change could not be mapped to an event.
    #[error("slot {slot}: change at {lsn} cannot be published")]
    Map {
        /// The slot.
        slot: String,
        /// WAL position of the change.
        lsn: Lsn,
        /// Why.
        #[source]
        source: MapError,
    },
    /// A Kafka client or topic operation failed.
    #[error(transparent)]
    Bus(Box<scoresync_bus::Error>),
    /// An event is larger than the message size limit: permanent until the limit is raised.
    #[error(transparent)]
    EventTooLarge(Box<TooLarge>),
    /// Kafka did not acknowledge an event (delivery timeout or fatal producer error).
    #[error("kafka did not acknowledge an event on {topic}; restarting from the slot")]
    Delivery {
        /// The topic.
        topic: String,
        /// What librdkafka said.
        #[source]
        source: KafkaError,
    },
    /// The pipeline record on the state topic is unreadable.
    #[error("pipeline record for slot {slot} on {topic} is unreadable: {problem}")]
    BadRecord {
        /// The slot.
        slot: String,
        /// The state topic.
        topic: String,
        /// What is wrong.
        problem: String,
    },
    /// A backfill met something it cannot work with.
    #[error("backfill: {problem}")]
    Backfill {
        /// What.
        problem: String,
    },
    /// Verify read something it cannot compare.
    #[error("verify: {problem}")]
    Verify {
        /// What.
        problem: String,
    },
    /// The publication is missing or incomplete.
    #[error("publication {publication}: {problem}")]
    Publication {
        /// The publication.
        publication: String,
        /// What is wrong, and what to do.
        problem: String,
    },
}

impl From<scoresync_bus::Error> for Error {
    fn from(err: scoresync_bus::Error) -> Self {
        Error::Bus(Box::new(err))
    }
}

/// An event larger than the message size limit (see [`Error::EventTooLarge`]).
#[derive(Debug, thiserror::Error)]
#[error(
    "slot {slot}: the {op} of {table} row ({key}) at {lsn} is a change event of {size} bytes, \
     larger than kafka.max_message_bytes = {limit}. Raise kafka.max_message_bytes (and the \
     max.message.bytes of topic {topic}, if it was created with a smaller one) and start \
     again: nothing from this transaction on was confirmed, so nothing is lost"
)]
pub struct TooLarge {
    /// The slot.
    pub slot: String,
    /// The operation, as [`Operation::describe`](scoresync_event::Operation::describe) names it.
    pub op: &'static str,
    /// The source table.
    pub table: String,
    /// The row's primary key, `column=value` pairs
    /// ([`ChangeEvent::key_text`](scoresync_event::ChangeEvent::key_text)).
    pub key: String,
    /// Commit LSN of its transaction (the snapshot's LSN for snapshot rows).
    pub lsn: Lsn,
    /// Encoded size in bytes.
    pub size: usize,
    /// The configured limit.
    pub limit: usize,
    /// The change topic.
    pub topic: String,
    /// What librdkafka said.
    #[source]
    pub source: KafkaError,
}

impl Error {
    /// True when the source should retry from the slot after a backoff.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Sql { source, .. } => sql_error_is_transient(source),
            Error::Replication { source, .. } => replication_error_is_transient(source),
            Error::StreamEnded { .. } => true,
            // A broker that refuses an event for its size refuses it again after a restart.
            Error::Delivery { source, .. } => !scoresync_bus::error::is_too_large(source),
            Error::Bus(err) => err.is_transient(),
            Error::SlotMissing { .. }
            | Error::SlotUnusable { .. }
            | Error::NoRecord { .. }
            | Error::RecordMismatch { .. }
            | Error::Decode { .. }
            | Error::Map { .. }
            | Error::NoVersionScheme { .. }
            | Error::EventTooLarge(_)
            | Error::BadRecord { .. }
            | Error::Publication { .. }
            | Error::Backfill { .. }
            | Error::Verify { .. } => false,
        }
    }

    /// The [`Error::label`]s of the transient errors: the reasons the source restarts for.
    pub const RESTART_REASONS: [&str; 5] =
        ["postgres", "replication", "stream_ended", "kafka_delivery", "kafka"];

    /// The error's kind, as a metric label (`scoresync_source_restarts_total{reason}`).
    pub fn label(&self) -> &'static str {
        match self {
            Error::Sql { .. } => "postgres",
            Error::Replication { .. } => "replication",
            Error::StreamEnded { .. } => "stream_ended",
            Error::Delivery { .. } => "kafka_delivery",
            Error::Bus(_) => "kafka",
            Error::SlotMissing { .. } | Error::SlotUnusable { .. } => "slot",
            Error::NoRecord { .. } | Error::RecordMismatch { .. } | Error::BadRecord { .. } => {
                "pipeline_record"
            }
            Error::Decode { .. } | Error::Map { .. } | Error::NoVersionScheme { .. } => "decode",
            Error::EventTooLarge(_) => "event_too_large",
            Error::Publication { .. } => "publication",
            Error::Backfill { .. } => "backfill",
            Error::Verify { .. } => "verify",
        }
    }

    /// Wraps a SQL error with what was being done.
    pub fn sql(context: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> Error {
        let context = context.into();
        move |source| Error::Sql { context, source }
    }
}

/// SQLSTATE classes a retry can cure: connection exceptions (08), transaction rollbacks (40),
/// insufficient resources (53), operator intervention such as a restart (57), plus
/// `object_in_use` (55006: the slot is still held by a walsender that has not exited yet).
pub fn sqlstate_is_transient(code: &str) -> bool {
    code == "55006" || matches!(code.get(..2), Some("08" | "40" | "53" | "57"))
}

fn sql_error_is_transient(err: &tokio_postgres::Error) -> bool {
    match err.code() {
        Some(state) => sqlstate_is_transient(state.code()),
        // No SQLSTATE: transient when the connection broke or could not be made.
        None => {
            err.is_closed()
                || std::error::Error::source(err).is_some_and(|s| s.is::<std::io::Error>())
        }
    }
}

fn replication_error_is_transient(err: &PgWireError) -> bool {
    match err {
        PgWireError::Server(message) => match sqlstate_in(message) {
            Some(code) => sqlstate_is_transient(code),
            None => false,
        },
        other => other.is_transient(),
    }
}

/// The SQLSTATE that pgwire-replication appends to server errors: `... (SQLSTATE 57P01)`.
fn sqlstate_in(message: &str) -> Option<&str> {
    let at = message.rfind("SQLSTATE ")? + "SQLSTATE ".len();
    message.get(at..at + 5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstate_classes() {
        assert!(sqlstate_is_transient("57P01"), "admin shutdown");
        assert!(sqlstate_is_transient("08006"), "connection failure");
        assert!(sqlstate_is_transient("55006"), "slot in use");
        assert!(!sqlstate_is_transient("42704"), "undefined object");
        assert!(!sqlstate_is_transient("42501"), "insufficient privilege");
    }

    #[test]
    fn replication_server_errors_are_classified_by_their_sqlstate() {
        let gone =
            PgWireError::Server("replication slot \"s\" does not exist (SQLSTATE 42704)".into());
        assert!(!replication_error_is_transient(&gone));
        let restart = PgWireError::Server("terminating connection (SQLSTATE 57P01)".into());
        assert!(replication_error_is_transient(&restart));
        let io = PgWireError::Io(std::sync::Arc::new(std::io::Error::other("reset")));
        assert!(replication_error_is_transient(&io));
        assert!(!replication_error_is_transient(&PgWireError::Auth("bad password".into())));
    }
}
