//! Crash-safe moves: the delete markers a move writes on the old shard wait until the new shard
//! has acknowledged the copies.
//!
//! A card whose routing changed moves with its children: copies on the new shard, delete markers
//! (which blank the rows) on the old one. Each shard is a separate insert; if the markers landed
//! and the copies did not (a crash, a kill, the new shard down), a re-read of the move would find
//! nothing live left to copy, and the card's children would be gone from both shards. So the
//! executor hands the old shard's markers here ([`crate::apply::Applier::take_handoff`]) instead
//! of to the batcher, the loop sends every row buffered so far to the writers, and the markers
//! wait behind a barrier: the sequence number of the last batch sent then. Once every batch up to
//! the barrier is acknowledged, the markers go to the batcher like any other row. Until then the
//! old shard still holds everything live, and a re-read finishes the move from there.
//!
//! Each waiting row keeps one hold on its message, so no offset is stored past a move whose
//! markers are not written yet.

use std::collections::VecDeque;

use crate::batch::MsgId;
use crate::rows::ChRow;
use crate::shard::ShardIndex;

/// A row that waits for a barrier: the shard it goes to, the row, and the message it is for.
pub(crate) type Waiting = (ShardIndex, ChRow, MsgId);

/// Rows waiting for earlier batches to be acknowledged, in barrier order.
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    queue: VecDeque<(u64, Vec<Waiting>)>,
    rows: usize,
}

impl Handoff {
    /// `rows` wait until every batch up to sequence number `barrier` is acknowledged.
    pub(crate) fn wait(&mut self, barrier: u64, rows: Vec<Waiting>) {
        self.rows += rows.len();
        self.queue.push_back((barrier, rows));
    }

    /// The rows whose barrier is passed: every batch up to `acknowledged_through` is in.
    pub(crate) fn ready(&mut self, acknowledged_through: u64) -> Vec<Waiting> {
        let mut out = Vec::new();
        while self.queue.front().is_some_and(|(barrier, _)| *barrier <= acknowledged_through) {
            if let Some((_, rows)) = self.queue.pop_front() {
                out.extend(rows);
            }
        }
        self.rows -= out.len();
        out
    }

    /// Drops the rows of messages of `partitions` (revoked: the next owner re-reads the move and
    /// finishes it); returns their messages, one per row (each releases one hold).
    pub(crate) fn purge(&mut self, partitions: &[i32]) -> Vec<MsgId> {
        let mut released = Vec::new();
        for (_, rows) in &mut self.queue {
            rows.retain(|(_, _, msg)| {
                let gone = partitions.contains(&msg.0);
                if gone {
                    released.push(*msg);
                }
                !gone
            });
        }
        self.queue.retain(|(_, rows)| !rows.is_empty());
        self.rows -= released.len();
        released
    }

    /// Rows waiting.
    pub(crate) fn rows(&self) -> usize {
        self.rows
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scoresync_event::SourceTable;

    fn row() -> ChRow {
        ChRow {
            table: SourceTable::Scores,
            cells: Vec::new(),
            version: 1,
            seq: 0,
            unknown: Vec::new(),
            commit_time_us: 0,
        }
    }

    #[test]
    fn rows_wait_for_their_barrier_in_order() {
        let mut h = Handoff::default();
        h.wait(3, vec![(0, row(), (0, 10)), (0, row(), (0, 10))]);
        h.wait(5, vec![(1, row(), (1, 11))]);
        assert_eq!(h.rows(), 3);
        assert!(h.ready(2).is_empty(), "batch 3 not acknowledged yet");
        assert_eq!(h.ready(4).len(), 2);
        assert_eq!(h.purge(&[1]), vec![(1, 11)]);
        assert_eq!(h.rows(), 0);
        assert!(h.ready(10).is_empty());
    }
}
