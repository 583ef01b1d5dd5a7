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
//!     | acknowledged (with the messages the batch covered)
//!     v
//!  group member: release their holds ──> store_offsets ──> (auto) commit
//! ```
//!
//! # Progress tracking
//!
//! The loop (`stage`) owns every piece of mutable state; the consumer-group member
//! ([`scoresync_bus::group`]) owns the hold book. Every message is held from the moment it
//! arrives until it is applied, superseded, or its dead-letter copy is acknowledged (a parked
//! message keeps that hold; a tombstone, or an event of a table outside the run's `scope`, is done
//! on arrival); another hold is taken for each batch that carries its rows. Writers acknowledge a
//! batch with the messages it covered and the loop releases their holds. A Kafka offset is stored
//! only when every message before it in its partition is done: its rows acknowledged by every
//! shard they went to (a shard outside the run's scope acknowledges without writing), or its
//! dead-letter copy acknowledged, or it was superseded. A parked message stays held, so the stored offset
//! never passes it; after a restart it is read and parked again.
//!
//! On a partition revoke the member waits (at most 1 s) for the rows already with the shard
//! writers, commits what is stored and retires the partition's holds; the loop drops the
//! partition's parked events and its rows not yet handed to a writer. The new owner re-reads the
//! rest, which is harmless: every row carries its source version, and ClickHouse keeps the
//! greatest. If the partition comes back to this sink while rows of its old
//! assignment are still in flight, it stays paused until they are acknowledged, so an old
//! batch's acknowledgement never releases a message read anew.
//!
//! # TRUNCATE
//!
//! The source puts a copy of a TRUNCATE in every partition, after that partition's earlier
//! changes. The first copy flushes and starts the delete markers as a job of its own (however
//! long it takes); from then on, rows of the table older than the TRUNCATE are not written, and
//! every later change of a copy's partition waits behind that copy until the job is done. A copy
//! from a partition this sink took over after the job started runs the job again (another sink
//! may have written rows the job did not see), see `apply/truncate.rs`.
//!
//! # Order within a scorecard
//!
//! The changes of one scorecard (card, scores, historic scores) share a partition and are applied
//! in that order: while one is parked, the later ones park behind it (`park`). A re-read card
//! change that the shards already hold as the card's newest completes any move it made that a
//! crash may have cut short (each shard and table is a separate insert), see `plan`.
//!
//! # Where a child's scorecard comes from
//!
//! Scores and historic scores need their scorecard's shard and fields. The sink looks in its
//! cache (every scorecard event it applies updates it), then on the shards (the newest row of
//! the card across shards), then in PostgreSQL, read-only, as the last resort (`locate`). A
//! card known nowhere parks the child until it is.
//!
//! # Modules
//!
//! - `role`: wiring (clients, group, writers) and shutdown; `stage`: the loop; `bounds`: when
//!   it holds consumption back (rows and bytes buffered, events and bytes parked);
//!   `settle`: what becomes of one event (applied, parked, dead-lettered), for every path.
//! - `plan`: what a scorecard change writes, decided with no I/O; `apply`: carrying it out,
//!   and children and TRUNCATEs; `route`: routing; `toast`: unchanged-TOAST values.
//! - [`table`], `rows`, `rowbinary`: a target table's columns, row mapping, RowBinary.
//! - `locate`, `lookup`, `cache`: where a scorecard lives; what the sink asks ClickHouse
//!   and PostgreSQL, and remembers (conversation answers expire, card locations do not);
//!   `split`: the report of conversations that several shards hold.
//! - `batch`, `writer`: batching and shard writers; `handoff`: a move's old-shard markers wait
//!   until the new shard acknowledged the copies (one hold per waiting row).
//! - `park`, [`dlq`]: waiting events and dead letters.
//! - [`verify`]: ClickHouse's side of `scoresync verify` (what each shard should hold for
//!   PostgreSQL's rows, and the verdict).
//! - [`scope`]: what one run applies and writes (the daemon: everything; a replay: the messages
//!   before its end offsets, optionally one shard and some tables).
//! - [`config`], [`shard`], [`schema`], [`error`], [`stats`]: settings, shard clients, per-shard
//!   DDL, errors, counters.

mod apply;
mod batch;
mod bounds;
mod cache;
pub mod config;
pub mod dlq;
pub mod error;
mod handoff;
mod locate;
mod lookup;
mod park;
mod plan;
mod role;
mod route;
mod rowbinary;
mod rows;
pub mod schema;
pub mod scope;
mod settle;
pub mod shard;
mod split;
mod stage;
pub mod stats;
pub mod table;
mod toast;
pub mod verify;
mod writer;

pub use config::{ClickHouseConfig, SinkConfig};
pub use error::Error;
pub use lookup::live_rows;
pub use role::Sink;
pub use scope::Scope;
pub use stats::SinkStats;
