//! Errors of the sink. Shard and broker trouble is transient (retried with backoff, nothing
//! stored past it); a schema that cannot take the rows is permanent.
//!
//! Logs, park reasons and dead letters show an error with its causes on one line, `a: b: c`:
//! `error_reporter::Report`, a stable copy of the standard library's unstable
//! `std::error::Report` (moving to std will change only the import).

use rdkafka::error::KafkaError;

use crate::rows::RowError;
use crate::shard::ShardIndex;

/// A sink failure.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A ClickHouse request failed.
    #[error("clickhouse shard {shard}: {action} failed")]
    Shard {
        /// The shard.
        shard: ShardIndex,
        /// What was attempted.
        action: String,
        /// The client error.
        #[source]
        source: clickhouse::error::Error,
    },
    /// A shard did not answer in time.
    #[error("clickhouse shard {shard}: {action} timed out")]
    Timeout {
        /// The shard.
        shard: ShardIndex,
        /// What was attempted.
        action: String,
    },
    /// A shard answered something the sink cannot read.
    #[error("clickhouse shard {shard}: unreadable answer ({what})")]
    Unreadable {
        /// The shard.
        shard: ShardIndex,
        /// What was expected.
        what: String,
    },
    /// A PostgreSQL lookup failed.
    #[error("postgres: {context}")]
    Postgres {
        /// What was being done.
        context: String,
        /// The driver error.
        #[source]
        source: tokio_postgres::Error,
    },
    /// A PostgreSQL lookup or connect did not answer in time.
    #[error("postgres: {context} timed out")]
    PostgresTimeout {
        /// What was being done.
        context: String,
    },
    /// A target table cannot take the rows (its schema lacks key columns).
    #[error(
        "clickhouse schema: a target table cannot take the rows (compare it with schemas/clickhouse and run `scoresync setup` on a new shard)"
    )]
    Schema(#[source] RowError),
    /// A target table was not found on the shards when the sink started (run `scoresync setup`).
    #[error("clickhouse table {table} is missing on the shards (run `scoresync setup`)")]
    NoSchema {
        /// The table.
        table: String,
    },
    /// The shards disagree about a table's columns.
    #[error("clickhouse table {table}: shard {shard} has other columns than shard 0")]
    SchemaMismatch {
        /// The table.
        table: String,
        /// The shard that differs.
        shard: ShardIndex,
    },
    /// Every shard writer stopped (only shutdown stops them; anything else is a bug).
    #[error(
        "a shard writer stopped unexpectedly (see the log above); restart the sink: rows not acknowledged are read again"
    )]
    WritersStopped,
    /// A TRUNCATE's job ended without an answer (it panicked or was cancelled); it runs again.
    #[error("the TRUNCATE job of {table} stopped: {problem}; it runs again")]
    TruncateJob {
        /// The table.
        table: String,
        /// What the runtime said.
        problem: String,
    },
    /// A Kafka client operation failed.
    #[error("kafka: {context}")]
    Kafka {
        /// What was being done.
        context: String,
        /// What librdkafka said.
        #[source]
        source: KafkaError,
    },
    /// A Kafka client could not be created or a topic operation failed.
    #[error(transparent)]
    Bus(Box<scoresync_bus::Error>),
}

impl From<scoresync_bus::Error> for Error {
    fn from(err: scoresync_bus::Error) -> Self {
        Error::Bus(Box::new(err))
    }
}

impl Error {
    /// Wraps a ClickHouse error with the shard and action.
    pub fn shard(
        shard: ShardIndex,
        action: impl Into<String>,
    ) -> impl FnOnce(clickhouse::error::Error) -> Error {
        let action = action.into();
        move |source| Error::Shard { shard, action, source }
    }

    /// The shard this error is about, if it is about one.
    pub fn shard_index(&self) -> Option<ShardIndex> {
        match self {
            Error::Shard { shard, .. }
            | Error::Timeout { shard, .. }
            | Error::Unreadable { shard, .. } => Some(*shard),
            _ => None,
        }
    }

    /// True when retrying later can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Shard { .. }
            | Error::Timeout { .. }
            | Error::PostgresTimeout { .. }
            | Error::TruncateJob { .. }
            | Error::Kafka { .. } => true,
            Error::Postgres { source, .. } => crate::lookup::postgres_error_is_transient(source),
            Error::Bus(err) => err.is_transient(),
            Error::Unreadable { .. }
            | Error::Schema(_)
            | Error::NoSchema { .. }
            | Error::WritersStopped
            | Error::SchemaMismatch { .. } => false,
        }
    }
}
