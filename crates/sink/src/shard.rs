//! One ClickHouse client per shard. The sink writes to shard-local tables directly, never through
//! a Distributed table (inserts through Distributed can be lost on restart).

use secrecy::ExposeSecret;

use crate::config::ClickHouseConfig;

/// The index of a shard: its position in `clickhouse.shards`.
pub type ShardIndex = usize;

/// A client for shard `index`. Validation is off: it needs column metadata queries that
/// ClickHouse 18.16 does not answer, and the row types are checked by the tests instead.
pub fn client(cfg: &ClickHouseConfig, index: ShardIndex) -> Option<clickhouse::Client> {
    cfg.shards.get(index).map(|url| client_at(cfg, url))
}

/// Clients for every shard, in shard order: one per entry of `clickhouse.shards`, so the `i`-th
/// is shard `i`'s.
pub fn clients(cfg: &ClickHouseConfig) -> Vec<clickhouse::Client> {
    cfg.shards.iter().map(|url| client_at(cfg, url)).collect()
}

fn client_at(cfg: &ClickHouseConfig, url: &str) -> clickhouse::Client {
    clickhouse::Client::default()
        .with_url(url)
        .with_database(&cfg.database)
        .with_user(&cfg.user)
        .with_password(cfg.password.expose_secret())
        .with_validation(false)
}
