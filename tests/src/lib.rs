//! The end-to-end test harness of scoresync.
//!
//! Every scenario runs against the real local stack (PostgreSQL, the tansu broker, two ClickHouse
//! shards): [`stack::Stack`] finds it from the environment that `deploy/local/stack env` prints, or
//! starts it. Each test then takes a [`test_env::TestEnv`]: its own PostgreSQL database (with the
//! director schema and publication), slot name, Kafka topics and consumer group, and ClickHouse
//! database on every shard, all dropped when the value is dropped. Tests wait with
//! [`wait::until`], a polling helper with a deadline, never a bare sleep.

pub mod stack;
pub mod test_env;
pub mod wait;

pub use stack::Stack;
pub use test_env::TestEnv;
