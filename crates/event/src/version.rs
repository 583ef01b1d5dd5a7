//! Row versions: the `_version` column of every ClickHouse row scoresync writes.
//!
//! ClickHouse's `ReplacingMergeTree(_version)` keeps, per primary key, the row with the greatest
//! version (and among equal versions whichever it merged last: an accident, never relied on).
//! Rules (DESIGN.md rule 11): a later change of a row always has a greater version, two different
//! changes of one row never share one, re-applying a change gives the same version, and versions
//! never go backwards for the life of the ClickHouse data. Versions come from source positions,
//! never from a clock.
//!
//! # How a version is made
//!
//! The source stamps every event with its version ([`ChangeEvent::version`]); sinks only read it.
//! A [`VersionScheme`] is fixed when a slot is created (kept in the pipeline record) and has two
//! parts: `origin`, the slot's consistent point, and `base`, a number above every version already
//! stored in ClickHouse when the slot was created. For a change committed at `commit_lsn`, the
//! `seq`-th change of its transaction:
//!
//! ```text
//!   version = base + ((commit_lsn - origin) << 16 | min(seq, 0xFFFF))
//!                     `---- 48 bits: WAL ----'     `--- 16 bits ---'
//! ```
//!
//! - Commit LSNs order transactions the way PostgreSQL committed them (a change's own WAL position
//!   would not: a transaction can write a row before another's commit and commit after it), so
//!   the high bits order transactions and the low bits order the changes inside one.
//! - A snapshot row copied at `snapshot_lsn` is `version(snapshot_lsn, 0) - 1`: every change the
//!   slot streams commits at or after its consistent point, so it outranks the snapshot copy.
//! - `base` makes versions survive a new slot. `setup --recreate-slot` on a rebuilt cluster, or
//!   after a point-in-time restore, starts LSNs lower than before; the new scheme's base is the
//!   greatest version any shard holds plus two, so the new pipeline's first snapshot row (`base -
//!   1`) already outranks everything stored.
//!
//! # Headroom
//!
//! 48 bits of WAL: 256 TiB written since the first slot of the ClickHouse data (each new slot
//! continues above the last). At a sustained 10 MB/s of WAL that is about 325 days; at 1 MB/s,
//! about 9 years. Past it [`VersionScheme::change`] fails and the source halts naming this limit
//! (rebuild ClickHouse from a fresh snapshot with a new scheme); it never wraps silently.
//!
//! 16 bits of order inside a transaction: the first 65,535 changes of a transaction get distinct
//! versions; later ones share the last value. Two changes of one row that both come after the
//! 65,535th change of one transaction can tie. A sink still collapses them in order when they
//! arrive together (its batches compare `(version, seq_in_tx)`); a late re-insert of the earlier
//! one (a redrive, a retried insert) could then win. We accept that narrow case rather than halve
//! the WAL headroom.
//!
//! Events written under contract version 1 carry no version; [`RowVersion::of_legacy_event`]
//! gives them the old one (the commit LSN), which is below every version of a scheme made after
//! them.

use serde::{Deserialize, Serialize};

use crate::lsn::Lsn;
use crate::v1::{ChangeEvent, Operation};

/// Bits of a version that order the changes inside one transaction.
pub const SEQ_BITS: u32 = 16;
/// Bits of a version that count WAL bytes since the scheme's origin.
pub const WAL_BITS: u32 = 64 - SEQ_BITS;
const SEQ_MAX: u64 = (1 << SEQ_BITS) - 1;

/// The version ClickHouse uses to pick the surviving copy of a row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RowVersion(pub u64);

impl RowVersion {
    /// The version the event's writer stamped on it.
    pub fn of_event(event: &ChangeEvent) -> Self {
        RowVersion(event.version)
    }

    /// The version a contract-1 event (which has none) was written with: its commit LSN, or the
    /// snapshot LSN minus one for snapshot rows.
    pub fn of_legacy_event(event: &ChangeEvent) -> Self {
        if event.op() == Operation::Snapshot {
            RowVersion(event.commit_lsn.saturating_sub(1))
        } else {
            RowVersion(event.commit_lsn)
        }
    }
}

/// How one pipeline turns source positions into versions (see the module doc).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionScheme {
    /// Added to every version; above every version stored when the scheme was made.
    #[serde(with = "crate::u64_as_string")]
    pub base: u64,
    /// The slot's consistent point: WAL positions count from here.
    pub origin: Lsn,
}

/// A position the scheme cannot version.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VersionError {
    /// The position is below the scheme's origin (not from this slot).
    #[error("position {lsn} is below the version origin {origin} of this pipeline")]
    BeforeOrigin {
        /// The position.
        lsn: Lsn,
        /// The scheme's origin.
        origin: Lsn,
    },
    /// The version space is used up (see "Headroom" in `event/version.rs`).
    #[error(
        "row versions are exhausted at {lsn}: the pipeline has versioned 2^{WAL_BITS} bytes of \
         WAL since {origin} (base {base}); rebuild the ClickHouse tables and run `scoresync setup \
         --recreate-slot` for a fresh snapshot"
    )]
    Exhausted {
        /// The position.
        lsn: Lsn,
        /// The scheme's origin.
        origin: Lsn,
        /// The scheme's base.
        base: u64,
    },
}

impl VersionScheme {
    /// A scheme for a slot created at `origin` whose versions must all exceed `max_stored` (the
    /// greatest version on any shard, 0 when ClickHouse is empty). The snapshot's rows get `base
    /// - 1`, so the base is `max_stored + 2`.
    pub fn above(max_stored: u64, origin: Lsn) -> Self {
        VersionScheme { base: max_stored.saturating_add(2), origin }
    }

    /// The version of the `seq`-th change of the transaction committed at `commit_lsn`.
    pub fn change(&self, commit_lsn: Lsn, seq: u32) -> Result<RowVersion, VersionError> {
        let wal = commit_lsn
            .0
            .checked_sub(self.origin.0)
            .ok_or(VersionError::BeforeOrigin { lsn: commit_lsn, origin: self.origin })?;
        let exhausted =
            || VersionError::Exhausted { lsn: commit_lsn, origin: self.origin, base: self.base };
        if wal >> WAL_BITS != 0 {
            return Err(exhausted());
        }
        let folded = wal << SEQ_BITS | u64::from(seq).min(SEQ_MAX);
        self.base.checked_add(folded).map(RowVersion).ok_or_else(exhausted)
    }

    /// The version of a row copied by a snapshot whose consistent point is `snapshot_lsn`: just
    /// below every change committed at or after it.
    pub fn snapshot(&self, snapshot_lsn: Lsn) -> Result<RowVersion, VersionError> {
        // `base` is at least 2 above anything stored, so this never underflows.
        Ok(RowVersion(self.change(snapshot_lsn, 0)?.0 - 1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGIN: Lsn = Lsn(0x1_0000_0100);

    fn scheme() -> VersionScheme {
        VersionScheme::above(0, ORIGIN)
    }

    #[test]
    fn streamed_change_outranks_snapshot_at_the_same_lsn() {
        let s = scheme();
        assert!(
            s.change(ORIGIN, 0).expect("versionable") > s.snapshot(ORIGIN).expect("versionable")
        );
        assert_eq!(
            s.snapshot(ORIGIN).expect("versionable"),
            RowVersion(1),
            "base 2 above an empty store"
        );
    }

    #[test]
    fn later_commit_outranks_every_change_of_an_earlier_one_and_replay_is_stable() {
        let s = scheme();
        let last_of_big_tx = s.change(Lsn(ORIGIN.0 + 100), u32::MAX).expect("versionable");
        let first_of_next = s.change(Lsn(ORIGIN.0 + 108), 0).expect("versionable");
        assert!(first_of_next > last_of_big_tx);
        assert_eq!(s.change(Lsn(ORIGIN.0 + 100), 3), s.change(Lsn(ORIGIN.0 + 100), 3));
    }

    #[test]
    fn changes_inside_a_transaction_are_ordered_up_to_the_seq_limit() {
        let s = scheme();
        let commit = Lsn(ORIGIN.0 + 5000);
        let v = |seq| s.change(commit, seq).expect("versionable");
        assert!(v(0) < v(1));
        assert!(v(65_534) < v(65_535));
        assert_eq!(v(65_535), v(1_000_000), "past 16 bits the order saturates (module doc)");
    }

    #[test]
    fn a_new_scheme_outranks_what_is_stored_even_when_lsns_restart_lower() {
        let old = scheme();
        let stored = old.change(Lsn(0x9_0000_0000), 7).expect("versionable");
        let rebuilt = VersionScheme::above(stored.0, Lsn(0x0100_0000));
        assert!(rebuilt.snapshot(Lsn(0x0100_0000)).expect("versionable") > stored);
        assert!(rebuilt.change(Lsn(0x0100_0028), 0).expect("versionable") > stored);
    }

    #[test]
    fn positions_it_cannot_version_are_errors_not_wraps() {
        let s = scheme();
        assert_eq!(
            s.change(Lsn(ORIGIN.0 - 1), 0),
            Err(VersionError::BeforeOrigin { lsn: Lsn(ORIGIN.0 - 1), origin: ORIGIN })
        );
        let far = Lsn(ORIGIN.0 + (1 << WAL_BITS));
        assert!(matches!(s.change(far, 0), Err(VersionError::Exhausted { .. })));
        let high_base = VersionScheme::above(u64::MAX - 10, ORIGIN);
        assert!(matches!(
            high_base.change(Lsn(ORIGIN.0 + 1), 0),
            Err(VersionError::Exhausted { .. })
        ));
    }

    #[test]
    fn legacy_events_keep_their_commit_lsn_version() {
        let snap =
            ChangeEvent { op: Operation::Snapshot as i32, commit_lsn: 10, ..Default::default() };
        let upd =
            ChangeEvent { op: Operation::Update as i32, commit_lsn: 10, ..Default::default() };
        assert_eq!(RowVersion::of_legacy_event(&snap), RowVersion(9));
        assert_eq!(RowVersion::of_legacy_event(&upd), RowVersion(10));
    }

    #[test]
    fn scheme_round_trips_as_json_with_a_large_base() {
        let s = VersionScheme::above(u64::MAX - 5, ORIGIN);
        let json = serde_json::to_string(&s).expect("versionable");
        assert!(json.contains("\"18446744073709551612\""), "{json}");
        assert_eq!(serde_json::from_str::<VersionScheme>(&json).expect("versionable"), s);
    }
}
