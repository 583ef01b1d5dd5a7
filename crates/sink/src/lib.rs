//! The ClickHouse side of scoresync: from the change topic to shard-local tables.
//!
//! - [`config`]: the `[clickhouse]` section of the configuration.
//! - [`shard`]: one client per shard, shard index = position in the configured list.

pub mod config;
pub mod shard;

pub use config::ClickHouseConfig;
