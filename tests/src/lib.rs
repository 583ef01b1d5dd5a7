//! The end-to-end test harness of scoresync.
//!
//! Every scenario runs against the real local stack (PostgreSQL, the tansu broker, two ClickHouse
//! shards): [`stack::Stack`] finds it from the environment that `deploy/local/stack env` prints, or
//! starts it. Each test then takes a [`test_env::TestEnv`]: its own PostgreSQL database (with the
//! director schema and publication), slot name, Kafka topics and consumer group, and ClickHouse
//! database on every shard, all dropped when the value is dropped. [`daemon::Daemon`] runs the
//! real `scoresync` binary; [`kafka`] reads and folds what it published; [`broker::PrivateBroker`]
//! is a tansu of the test's own, for stopping Kafka without disturbing other tests; [`oracle`]
//! checks ClickHouse against PostgreSQL, row by row, shard by shard; [`clickhouse::PrivateShards`]
//! are ClickHouse servers of the test's own, for stopping a shard; [`postgres::PrivatePostgres`] is
//! a newly `initdb`-ed cluster of the test's own (a rebuilt primary); [`prometheus::PrivatePrometheus`]
//! is a Prometheus server scraping a test's daemon. Tests wait with [`wait::until`], a polling
//! helper with a deadline, never a bare sleep.

pub mod broker;
pub mod clickhouse;
pub mod daemon;
pub mod kafka;
pub mod oracle;
pub mod postgres;
pub mod prometheus;
pub mod stack;
pub mod test_env;
pub mod wait;

pub use daemon::Daemon;
pub use stack::Stack;
pub use test_env::TestEnv;
