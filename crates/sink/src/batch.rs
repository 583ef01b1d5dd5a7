//! Batching rows per (shard, table), bounded by rows, bytes and age.
//!
//! Within a buffer, rows of the same primary key collapse to the latest change (greater
//! `(version, seq)`), so one INSERT never holds two versions of a row, and earlier changes of a
//! transaction lose to later ones even though they share a version. Every batch remembers the
//! Kafka messages whose rows it holds ([`Batch::origins`]), so offsets are stored only after
//! ClickHouse acknowledged them, and the partition of the message each row came from, so the rows
//! of a partition this sink no longer owns can be dropped before they are sent
//! ([`Batcher::purge`], [`Batch::purge`]): the partition's next owner writes them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use scoresync_event::SourceTable;

use crate::rows::{ChRow, RowKey};
use crate::shard::ShardIndex;
use crate::table::{Cell, TableSchema};

pub(crate) use scoresync_bus::group::MsgId;

/// Flush thresholds.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Rows per batch.
    pub max_rows: usize,
    /// Bytes per batch (estimated).
    pub max_bytes: usize,
    /// Age of the oldest row.
    pub max_wait: Duration,
}

/// Rows ready to insert into one table of one shard.
#[derive(Debug)]
pub struct Batch {
    /// Target shard.
    pub shard: ShardIndex,
    /// Target table.
    pub table: SourceTable,
    /// The rows, at most one per primary key.
    pub rows: Vec<ChRow>,
    /// Messages whose rows are in this batch.
    pub origins: BTreeSet<MsgId>,
    /// The partition of the message that wrote each row (aligned with `rows`).
    pub row_partitions: Vec<i32>,
    /// Its place in the order batches were handed to the writers (set by the writer pool).
    pub seq: u64,
    /// Estimated size of its rows in memory ([`row_bytes`]).
    pub bytes: usize,
}

impl Batch {
    /// Drops the rows written by messages of `partitions`; returns the messages of those
    /// partitions it no longer carries (each releases one hold).
    pub fn purge(&mut self, partitions: &[i32]) -> Vec<MsgId> {
        let rows = std::mem::take(&mut self.rows);
        let (rows, row_partitions) = rows
            .into_iter()
            .zip(std::mem::take(&mut self.row_partitions))
            .filter(|(_, p)| !partitions.contains(p))
            .unzip();
        (self.rows, self.row_partitions) = (rows, row_partitions);
        self.bytes = self.rows.iter().map(row_bytes).sum();
        take_origins(&mut self.origins, partitions)
    }
}

/// Removes and returns the messages of `partitions` from `origins`.
fn take_origins(origins: &mut BTreeSet<MsgId>, partitions: &[i32]) -> Vec<MsgId> {
    let gone: Vec<MsgId> = origins.iter().copied().filter(|m| partitions.contains(&m.0)).collect();
    for msg in &gone {
        origins.remove(msg);
    }
    gone
}

#[derive(Debug)]
struct Entry {
    row: ChRow,
    key: Vec<String>,
    /// The message that wrote the row as it is now.
    origin: MsgId,
}

#[derive(Debug)]
struct Buffer {
    entries: Vec<Entry>,
    index: HashMap<Vec<String>, usize>,
    origins: BTreeSet<MsgId>,
    bytes: usize,
    since: Instant,
}

/// Per-(shard, table) buffers.
#[derive(Debug)]
pub struct Batcher {
    limits: Limits,
    buffers: BTreeMap<(ShardIndex, SourceTable), Buffer>,
    rows: usize,
    bytes: usize,
}

/// A row's estimated size in memory: its strings' lengths, 9 bytes for any other cell. What the
/// sink's byte bounds (`sink.max_batch_bytes`, `sink.max_buffered_bytes`) count.
pub(crate) fn row_bytes(row: &ChRow) -> usize {
    row.cells
        .iter()
        .map(|c| match c {
            Cell::Str(s) => s.len() + 1,
            _ => 9,
        })
        .sum()
}

impl Batcher {
    /// Empty buffers with these limits.
    pub fn new(limits: Limits) -> Self {
        Batcher { limits, buffers: BTreeMap::new(), rows: 0, bytes: 0 }
    }

    /// Adds a row written by message `origin`. Returns true when `origin` is new to this buffer
    /// (the caller then holds the message until the buffer's batch is acknowledged).
    pub fn add(
        &mut self,
        shard: ShardIndex,
        schema: &TableSchema,
        row: ChRow,
        origin: MsgId,
    ) -> bool {
        let buffer = self.buffers.entry((shard, row.table)).or_insert_with(|| Buffer {
            entries: Vec::new(),
            index: HashMap::new(),
            origins: BTreeSet::new(),
            bytes: 0,
            since: Instant::now(),
        });
        let (_, key) = row.key(schema);
        let size = row_bytes(&row);
        match buffer.index.get(&key) {
            Some(&i) => {
                let current = &buffer.entries[i];
                if (row.version, row.seq) >= (current.row.version, current.row.seq) {
                    let replaced = row_bytes(&current.row);
                    buffer.bytes = buffer.bytes - replaced + size;
                    self.bytes = self.bytes - replaced + size;
                    buffer.entries[i] = Entry { row, key, origin };
                }
            }
            None => {
                buffer.index.insert(key.clone(), buffer.entries.len());
                buffer.entries.push(Entry { row, key, origin });
                buffer.bytes += size;
                self.bytes += size;
                self.rows += 1;
            }
        }
        buffer.origins.insert(origin)
    }

    /// The buffered row with this key for `shard`, if any.
    pub fn find(&self, shard: ShardIndex, key: &RowKey) -> Option<&ChRow> {
        let buffer = self.buffers.get(&(shard, key.0))?;
        buffer.index.get(&key.1).map(|&i| &buffer.entries[i].row)
    }

    /// Drops the buffered rows written by messages of `partitions` (revoked: their next owner
    /// writes them); returns the messages of those partitions the buffers no longer carry (each
    /// releases one hold).
    pub fn purge(&mut self, partitions: &[i32]) -> Vec<MsgId> {
        let mut released = Vec::new();
        for buffer in self.buffers.values_mut() {
            let before = buffer.entries.len();
            buffer.entries.retain(|e| !partitions.contains(&e.origin.0));
            self.rows -= before - buffer.entries.len();
            let kept = buffer.entries.iter().map(|e| row_bytes(&e.row)).sum();
            self.bytes = self.bytes - buffer.bytes + kept;
            buffer.bytes = kept;
            buffer.index =
                buffer.entries.iter().enumerate().map(|(i, e)| (e.key.clone(), i)).collect();
            released.extend(take_origins(&mut buffer.origins, partitions));
        }
        self.buffers.retain(|_, b| !b.entries.is_empty() || !b.origins.is_empty());
        released
    }

    /// Rows buffered (not yet handed out).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Estimated bytes of the rows buffered.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Batches that are full or old enough.
    pub fn ready(&mut self, now: Instant) -> Vec<Batch> {
        let limits = self.limits;
        let due: Vec<(ShardIndex, SourceTable)> = self
            .buffers
            .iter()
            .filter(|(_, b)| {
                b.entries.len() >= limits.max_rows
                    || b.bytes >= limits.max_bytes
                    || now.duration_since(b.since) >= limits.max_wait
            })
            .map(|(k, _)| *k)
            .collect();
        due.into_iter().filter_map(|k| self.take(k)).collect()
    }

    /// Every buffered row, as batches.
    pub fn drain(&mut self) -> Vec<Batch> {
        let keys: Vec<_> = self.buffers.keys().copied().collect();
        keys.into_iter().filter_map(|k| self.take(k)).collect()
    }

    fn take(&mut self, key: (ShardIndex, SourceTable)) -> Option<Batch> {
        let buffer = self.buffers.remove(&key)?;
        self.rows -= buffer.entries.len();
        self.bytes -= buffer.bytes;
        let row_partitions = buffer.entries.iter().map(|e| e.origin.0).collect();
        Some(Batch {
            shard: key.0,
            table: key.1,
            rows: buffer.entries.into_iter().map(|e| e.row).collect(),
            origins: buffer.origins,
            row_partitions,
            seq: 0,
            bytes: buffer.bytes,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::table::TableSchema;

    fn schema() -> TableSchema {
        let cols: Vec<(String, String)> = [
            ("customer_id", "String"),
            ("profile_id", "String"),
            ("scorecard_id", "String"),
            ("comment", "Nullable(String)"),
            ("_version", "UInt64"),
            ("_deleted", "UInt8"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        TableSchema::new(SourceTable::Scorecards, &cols).expect("schema")
    }

    fn row(id: &str, comment: &str, version: u64, seq: u32) -> ChRow {
        ChRow {
            table: SourceTable::Scorecards,
            cells: vec![
                Cell::Str("c".into()),
                Cell::Str("p".into()),
                Cell::Str(id.into()),
                Cell::Str(comment.into()),
                Cell::UInt(version),
                Cell::UInt(0),
            ],
            version,
            seq,
            unknown: Vec::new(),
            commit_time_us: 0,
        }
    }

    fn limits(rows: usize) -> Limits {
        Limits { max_rows: rows, max_bytes: 1 << 20, max_wait: Duration::from_secs(60) }
    }

    #[test]
    fn same_key_collapses_to_the_latest_change_and_keeps_every_origin() {
        let s = schema();
        let mut b = Batcher::new(limits(100));
        assert!(b.add(0, &s, row("a", "first", 10, 0), (0, 1)));
        assert!(b.add(0, &s, row("a", "second", 10, 1), (0, 2)));
        assert!(
            b.add(0, &s, row("a", "stale", 9, 5), (0, 3)),
            "older version: row dropped, origin kept"
        );
        assert!(!b.add(0, &s, row("a", "again", 10, 1), (0, 2)), "same origin twice");
        assert_eq!(b.rows(), 1);
        let key = (SourceTable::Scorecards, vec!["c".into(), "p".into(), "a".into()]);
        assert_eq!(b.find(0, &key).map(|r| r.cells[3].clone()), Some(Cell::Str("again".into())));
        assert!(b.find(1, &key).is_none(), "other shard");
        let batches = b.drain();
        assert_eq!(batches.len(), 1);
        assert_eq!(
            batches[0].origins.iter().copied().collect::<Vec<_>>(),
            vec![(0, 1), (0, 2), (0, 3)]
        );
        assert_eq!(b.rows(), 0);
    }

    #[test]
    fn bytes_follow_the_rows_through_replace_purge_and_take() {
        let s = schema();
        let mut b = Batcher::new(limits(100));
        let big = "x".repeat(100_000);
        b.add(0, &s, row("a", &big, 1, 0), (0, 1));
        b.add(1, &s, row("b", "small", 1, 0), (1, 1));
        let both = b.bytes();
        assert!(both > 100_000, "{both}");
        b.add(0, &s, row("a", "now small", 2, 0), (0, 2));
        assert!(b.bytes() < 1_000, "the replaced 100 KB row no longer counts: {}", b.bytes());
        b.purge(&[1]);
        let left = b.bytes();
        let batches = b.drain();
        assert_eq!(batches.iter().map(|batch| batch.bytes).sum::<usize>(), left);
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn rows_of_revoked_partitions_are_purged_with_their_messages() {
        let s = schema();
        let mut b = Batcher::new(limits(100));
        b.add(0, &s, row("a", "x", 1, 0), (0, 1));
        b.add(0, &s, row("b", "x", 1, 0), (1, 1));
        b.add(1, &s, row("c", "x", 1, 0), (1, 2));
        // A newer change of "a" from partition 1 (a re-parented row): the row is partition 1's now.
        b.add(0, &s, row("a", "y", 2, 0), (1, 3));
        let mut released = b.purge(&[1]);
        released.sort_unstable();
        assert_eq!(released, vec![(1, 1), (1, 2), (1, 3)]);
        assert_eq!(b.rows(), 0, "a, b and c were last written by partition 1");
        let key = (SourceTable::Scorecards, vec!["c".into(), "p".into(), "a".into()]);
        assert!(b.find(0, &key).is_none());
        let batches = b.drain();
        assert_eq!(batches.len(), 1, "partition 0's message still waits for its (empty) batch");
        assert_eq!(batches[0].origins.iter().copied().collect::<Vec<_>>(), vec![(0, 1)]);

        let mut b = Batcher::new(limits(100));
        b.add(0, &s, row("a", "x", 1, 0), (0, 1));
        b.add(0, &s, row("b", "x", 1, 0), (1, 1));
        let mut batch = b.drain().pop().expect("one batch");
        assert_eq!(batch.purge(&[1]), vec![(1, 1)]);
        assert_eq!((batch.rows.len(), batch.row_partitions.clone()), (1, vec![0]));
    }

    #[test]
    fn buffers_are_per_shard_and_flush_when_full_or_old() {
        let s = schema();
        let mut b = Batcher::new(limits(2));
        b.add(0, &s, row("a", "x", 1, 0), (0, 1));
        b.add(1, &s, row("b", "x", 1, 0), (0, 2));
        assert!(b.ready(Instant::now()).is_empty());
        b.add(0, &s, row("c", "x", 1, 0), (0, 3));
        let full = b.ready(Instant::now());
        assert_eq!(full.len(), 1);
        assert_eq!((full[0].shard, full[0].rows.len()), (0, 2));
        let later = Instant::now() + Duration::from_secs(61);
        let old = b.ready(later);
        assert_eq!((old.len(), old[0].shard), (1, 1));
    }
}
