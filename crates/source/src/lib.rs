//! The PostgreSQL side of scoresync: from a logical replication slot to the change topic.
//!
//! - [`config`]: the `[postgres]` section of the configuration.
//! - [`connect`]: SQL and replication connections built from one PostgreSQL URL.

pub mod config;
pub mod connect;

pub use config::PostgresConfig;
