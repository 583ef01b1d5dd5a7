//! Row versions: the `_version` column of every ClickHouse row scoresync writes.
//!
//! ClickHouse's `ReplacingMergeTree(_version)` keeps, per primary key, the row with the greatest
//! version (and among equal versions the one inserted last). For replays to be harmless the version
//! must come from the source position, never from a clock:
//!
//! - A streamed change is versioned by the **commit LSN** of its transaction. Commit LSNs order
//!   transactions the way PostgreSQL committed them. A change's own WAL position would not: a
//!   transaction can write a row before another transaction's commit and commit after it.
//! - All changes of one transaction share a version. Inside a transaction only the last change of a
//!   row matters; the sink collapses earlier ones (by `seq_in_tx`) and, across batches, inserts them
//!   in order so the last one wins the tie.
//! - A snapshot row is versioned `snapshot_lsn - 1`, where `snapshot_lsn` is the slot's consistent
//!   point. Every transaction the slot streams commits at or after that point, so any streamed
//!   change of the row outranks the snapshot copy, however late the snapshot read it.

use crate::lsn::Lsn;
use crate::v1::{ChangeEvent, Operation};

/// The version ClickHouse uses to pick the surviving copy of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowVersion(pub u64);

impl RowVersion {
    /// Version of a change streamed from the slot, committed at `commit_lsn`.
    pub fn of_commit(commit_lsn: Lsn) -> Self {
        RowVersion(commit_lsn.0)
    }

    /// Version of a row copied by a snapshot taken at or after `snapshot_lsn`.
    pub fn of_snapshot(snapshot_lsn: Lsn) -> Self {
        RowVersion(snapshot_lsn.0.saturating_sub(1))
    }

    /// Version of the row an event writes (`commit_lsn` carries the snapshot LSN for snapshots).
    pub fn of_event(event: &ChangeEvent) -> Self {
        let lsn = Lsn(event.commit_lsn);
        if event.op() == Operation::Snapshot {
            Self::of_snapshot(lsn)
        } else {
            Self::of_commit(lsn)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(op: Operation, commit_lsn: u64) -> ChangeEvent {
        ChangeEvent { op: op as i32, commit_lsn, ..Default::default() }
    }

    #[test]
    fn streamed_change_outranks_snapshot_at_the_same_lsn() {
        let point = Lsn(0x1_0000_0100);
        let snapshot = RowVersion::of_event(&event(Operation::Snapshot, point.0));
        let streamed = RowVersion::of_event(&event(Operation::Update, point.0));
        assert!(streamed > snapshot);
    }

    #[test]
    fn later_commit_has_greater_version_and_replay_is_stable() {
        let a = RowVersion::of_event(&event(Operation::Insert, 100));
        let b = RowVersion::of_event(&event(Operation::Delete, 101));
        assert!(b > a);
        assert_eq!(a, RowVersion::of_event(&event(Operation::Insert, 100)));
    }

    #[test]
    fn snapshot_at_zero_does_not_underflow() {
        assert_eq!(RowVersion::of_snapshot(Lsn::ZERO), RowVersion(0));
    }
}
