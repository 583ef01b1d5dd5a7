//! What the sink counts, for `/metrics` and `scoresync status`. Plain atomics and snapshots: the
//! binary turns them into Prometheus metrics in one place (`scoresync::metrics`).

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::park::ParkedSummary;

/// Every reason label of `scoresync_sink_parked_events`.
pub const PARK_REASONS: [&str; 7] = crate::park::ParkReason::LABELS;

/// Counters and gauges of one sink.
#[derive(Debug, Default)]
pub struct SinkStats {
    /// Events dead-lettered.
    pub dead_lettered: AtomicU64,
    /// Events applied (rows written or superseded).
    pub events_applied: AtomicU64,
    /// Kafka messages consumed.
    pub messages_consumed: AtomicU64,
    /// Per (shard, table): rows inserted, inserts, failed inserts, insert seconds (sum).
    pub inserts: Mutex<BTreeMap<(usize, String), InsertStats>>,
    /// Parked events per reason label, and the parked list (refreshed by the sink loop).
    pub parked: Mutex<ParkedSnapshot>,
    /// Seconds from PostgreSQL commit to ClickHouse acknowledgement of the newest row, per table.
    pub commit_to_ack_seconds: Mutex<BTreeMap<String, f64>>,
    /// Rows buffered or in flight to ClickHouse.
    pub buffered_rows: AtomicU64,
    /// Estimated bytes of the rows buffered or in flight to ClickHouse.
    pub buffered_bytes: AtomicU64,
    /// Encoded bytes of the parked events.
    pub parked_bytes: AtomicU64,
    /// 1 while consumption is paused (buffers or park full).
    pub paused: AtomicU64,
    /// Per (shard, table): inserts the server keeps refusing (it answered with an error, as
    /// opposed to not answering), retried for ever: the server's last error and since when.
    pub rejected: Mutex<BTreeMap<(usize, String), Rejected>>,
    /// Conversations found on more than one shard (the sink's `split` report): how many, and the
    /// latest.
    pub split_conversations: Mutex<SplitConversations>,
}

/// Most conversations [`SplitConversations::latest`] keeps.
pub const SPLIT_EXAMPLES: usize = 5;

/// Conversations that several shards' `conversations` tables hold.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SplitConversations {
    /// Distinct conversations found split since the sink started (one that the report forgot,
    /// past its bound, counts again when met again).
    pub total: u64,
    /// The latest of them, newest last, at most [`SPLIT_EXAMPLES`].
    pub latest: VecDeque<SplitConversation>,
}

/// One conversation that several shards hold.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SplitConversation {
    /// `customer_id`.
    pub customer_id: String,
    /// `profile_id`.
    pub profile_id: String,
    /// `conversation_id`.
    pub conversation_id: String,
    /// The shards holding it, ascending; its scorecards route to the first.
    pub shards: Vec<usize>,
}

/// Inserts of one (shard, table) that the server refuses.
#[derive(Clone, Debug)]
pub struct Rejected {
    /// The server's last error.
    pub error: String,
    /// When the first refusal of this run of refusals came.
    pub since: std::time::Instant,
    /// Refused attempts so far.
    pub attempts: u64,
}

/// Insert counters of one (shard, table).
#[derive(Clone, Copy, Debug, Default)]
pub struct InsertStats {
    /// Rows inserted.
    pub rows: u64,
    /// Successful inserts.
    pub inserts: u64,
    /// Failed insert attempts.
    pub failures: u64,
    /// Seconds spent in successful inserts.
    pub seconds: f64,
}

/// The parked events as last seen by the sink loop.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ParkedSnapshot {
    /// Count per reason label.
    pub by_reason: BTreeMap<String, usize>,
    /// Every parked event (key, reason, age).
    pub events: Vec<ParkedSummary>,
}

impl SinkStats {
    /// Adds one insert outcome.
    pub fn insert(&self, shard: usize, table: &str, rows: usize, seconds: Option<f64>) {
        if let Ok(mut map) = self.inserts.lock() {
            let entry = map.entry((shard, table.to_owned())).or_default();
            match seconds {
                Some(s) => {
                    entry.rows += rows as u64;
                    entry.inserts += 1;
                    entry.seconds += s;
                }
                None => entry.failures += 1,
            }
        }
    }

    /// The server refused an insert into `table` on `shard` with `error`.
    pub fn insert_rejected(&self, shard: usize, table: &str, error: &str) {
        if let Ok(mut map) = self.rejected.lock() {
            let entry = map.entry((shard, table.to_owned())).or_insert_with(|| Rejected {
                error: String::new(),
                since: std::time::Instant::now(),
                attempts: 0,
            });
            entry.error = error.to_owned();
            entry.attempts += 1;
        }
    }

    /// An insert into `table` on `shard` succeeded: it is not refused any more.
    pub fn insert_accepted(&self, shard: usize, table: &str) {
        if let Ok(mut map) = self.rejected.lock() {
            map.remove(&(shard, table.to_owned()));
        }
    }

    /// A conversation not met before was found on `split.shards`.
    pub fn conversation_split(&self, split: SplitConversation) {
        if let Ok(mut seen) = self.split_conversations.lock() {
            seen.total += 1;
            if seen.latest.len() == SPLIT_EXAMPLES {
                seen.latest.pop_front();
            }
            seen.latest.push_back(split);
        }
    }

    /// Bumps a counter.
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
