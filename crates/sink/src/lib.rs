//! The ClickHouse side of scoresync: from the change topic to shard-local tables.
//!
//! - [`config`]: the `[clickhouse]` section of the configuration.
//! - [`shard`]: one client per shard, shard index = position in the configured list.
//! - [`schema`]: the per-shard DDL and `setup`'s ClickHouse part.

pub mod config;
pub mod schema;
pub mod shard;

pub use config::ClickHouseConfig;
