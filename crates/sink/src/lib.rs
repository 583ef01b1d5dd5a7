//! The ClickHouse side of scoresync: from the change topic to shard-local tables.
//!
//! ```text
//!  change topic (consumer group, offsets stored by hand)
//!     | decode ── poison ──> dead-letter topic (origin + error headers)
//!     v
//!  apply: route (process: seconds % shards; conversation: its shard) ── not yet ──> park
//!     |   (scores and historic scores follow their scorecard, carrying its fields)
//!     v
//!  batch per (shard, table): rows, bytes, max wait; one row per key (latest change wins)
//!     v
//!  shard writers (one task per shard, retry with backoff) ──> shard-local ReplacingMergeTree
//!     | acknowledged
//!     v
//!  offsets: release the batch's messages ──> store_offsets ──> (auto) commit
//! ```
//!
//! # Progress tracking
//!
//! A Kafka offset is stored only when every message before it in its partition is done: its rows
//! acknowledged by every shard they went to, or its dead-letter copy acknowledged, or it was
//! superseded ([`offsets`]). A parked message stays held, so the stored offset never passes it;
//! after a restart it is read and parked again. On a partition revoke the sink waits (bounded)
//! for batches already with the writers and commits what is done; the new owner re-reads the
//! rest, which is harmless: every row carries its source version, and ClickHouse keeps the
//! greatest. Holds of a revoked partition are kept apart; if the partition comes back to this
//! sink while rows of its old assignment are still in flight, it stays paused until they are
//! acknowledged, so an old batch's acknowledgement never releases a message read anew.
//!
//! # Order within a scorecard
//!
//! The changes of one scorecard (card, scores, historic scores) share a partition and are applied
//! in that order: while one is parked, the later ones park behind it ([`park`]). A re-read card
//! change that the shards already hold as the card's newest completes any move it made that a
//! crash may have cut short (each shard and table is a separate insert), see [`apply`].
//!
//! # Where a child's scorecard comes from
//!
//! Scores and historic scores need their scorecard's shard and fields. The sink looks in its
//! cache (every scorecard event it applies updates it), then on the shards (the newest row of
//! the card across shards), then in PostgreSQL, read-only, as the last resort (a sink started
//! mid-stream can meet a child whose card event it has not seen and no shard holds, e.g. because
//! the card is parked). A card known nowhere parks the child until it is.
//!
//! # Modules
//!
//! - [`config`], [`shard`], [`schema`]: settings, shard clients, per-shard DDL.
//! - [`table`], [`rows`], [`rowbinary`]: a target table's columns, row mapping, RowBinary.
//! - [`route`], [`apply`]: routing, applying one event.
//! - [`batch`], [`writer`], [`offsets`]: batching, shard writers, offset holds.
//! - [`park`], [`dlq`]: waiting events and dead letters.
//! - [`lookup`], [`cache`]: what the sink asks ClickHouse and PostgreSQL, and remembers.
//! - [`stage`]: the consumer loop that ties them together; [`stats`]: what it counts.

pub mod apply;
pub mod batch;
pub mod cache;
pub mod config;
pub mod dlq;
pub mod error;
pub mod lookup;
pub mod offsets;
pub mod park;
pub mod route;
pub mod rowbinary;
pub mod rows;
pub mod schema;
pub mod shard;
pub mod stage;
pub mod stats;
pub mod table;
pub mod writer;

pub use config::{ClickHouseConfig, SinkConfig};
pub use error::Error;
pub use stage::Sink;
pub use stats::SinkStats;
