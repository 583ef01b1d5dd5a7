//! The hold book: which Kafka offsets a group member may store (DESIGN.md rule 5).
//!
//! Owned by [`super::GroupMember`], and changed only through it. Every consumed message is held
//! from the moment it arrives until its owner releases that hold (for the sink: once the message
//! is applied, superseded, or its dead-letter copy acknowledged; a parked message simply keeps
//! it). The owner takes one more hold for each further piece of work the message has (for the
//! sink: each batch that carries its rows). A message is done when its last hold is released.
//! The storable offset of a partition is the lowest message still held (or, when none is, one
//! past the highest message seen): everything before it is done. Stored offsets are "next to
//! read" (what `store_offsets` takes as given; `store_offset` would add one).
//!
//! A revoked partition's holds are kept apart ("retired"): work already under way (batches
//! with the writers) may still carry its messages, and their acknowledgements must not release holds of the messages the next owner (this
//! member again, after an eager rebalance) reads anew. A partition assigned back while it has
//! retired holds stays paused until they are all released (see [`super`]), so the two generations
//! never hold the same partition at once.

use std::collections::{BTreeMap, HashMap};

use super::MsgId;

#[derive(Debug, Default)]
struct PartitionState {
    /// Offset -> outstanding holds.
    held: BTreeMap<i64, u32>,
    /// One past the highest offset seen.
    next: Option<i64>,
    /// Last offset handed out by [`Holds::storable`].
    stored: Option<i64>,
}

/// Holds per message, per partition.
#[derive(Debug, Default)]
pub(crate) struct Holds {
    partitions: HashMap<i32, PartitionState>,
    /// Holds of revoked partitions still outstanding (rows in flight, dead letters unacknowledged).
    retired: HashMap<i32, BTreeMap<i64, u32>>,
}

impl Holds {
    /// A message arrived: hold it until processing finishes.
    pub(crate) fn received(&mut self, (partition, offset): MsgId) {
        let state = self.partitions.entry(partition).or_default();
        *state.held.entry(offset).or_insert(0) += 1;
        state.next = Some(state.next.map_or(offset + 1, |n| n.max(offset + 1)));
    }

    /// Takes another hold on a message already received.
    pub(crate) fn hold(&mut self, (partition, offset): MsgId) {
        if let Some(state) = self.partitions.get_mut(&partition) {
            *state.held.entry(offset).or_insert(0) += 1;
        }
    }

    /// Releases one hold (of the current generation of the partition, else of its retired one).
    pub(crate) fn release(&mut self, (partition, offset): MsgId) {
        if let Some(state) = self.partitions.get_mut(&partition)
            && release_in(&mut state.held, offset)
        {
            return;
        }
        if let Some(retired) = self.retired.get_mut(&partition)
            && release_in(retired, offset)
            && retired.is_empty()
        {
            self.retired.remove(&partition);
        }
    }

    /// The offset to store for `partition`: everything before it is done.
    #[cfg(test)]
    pub(crate) fn committable(&self, partition: i32) -> Option<i64> {
        let state = self.partitions.get(&partition)?;
        state.held.keys().next().copied().or(state.next)
    }

    /// Partitions whose storable offset moved since the last call, with that offset.
    pub(crate) fn storable(&mut self) -> Vec<(i32, i64)> {
        let mut out = Vec::new();
        for (partition, state) in &mut self.partitions {
            let Some(offset) = state.held.keys().next().copied().or(state.next) else { continue };
            if state.stored != Some(offset) {
                state.stored = Some(offset);
                out.push((*partition, offset));
            }
        }
        out.sort_unstable();
        out
    }

    /// Forgets a partition this consumer no longer owns; its outstanding holds are retired.
    pub(crate) fn revoke(&mut self, partition: i32) {
        let Some(state) = self.partitions.remove(&partition) else { return };
        if state.held.is_empty() {
            return;
        }
        let retired = self.retired.entry(partition).or_default();
        for (offset, count) in state.held {
            *retired.entry(offset).or_insert(0) += count;
        }
    }

    /// True while a revoked generation of `partition` still has holds outstanding.
    pub(crate) fn has_retired(&self, partition: i32) -> bool {
        self.retired.contains_key(&partition)
    }

    /// Messages still held, across partitions.
    #[cfg(test)]
    pub(crate) fn held(&self) -> usize {
        self.partitions.values().map(|s| s.held.len()).sum()
    }
}

/// Releases one hold of `offset` in `held`; false when it held none.
fn release_in(held: &mut BTreeMap<i64, u32>, offset: i64) -> bool {
    let Some(count) = held.get_mut(&offset) else { return false };
    *count -= 1;
    if *count == 0 {
        held.remove(&offset);
    }
    true
}

#[cfg(test)]
mod tests {
    use rand::rngs::StdRng;
    use rand::{RngExt, SeedableRng};

    use super::*;

    #[test]
    fn stores_only_past_fully_released_messages() {
        let mut o = Holds::default();
        for offset in 10..13 {
            o.received((0, offset));
        }
        // 10 and 12 have rows in batches; 11 is parked (keeps its processing hold).
        o.hold((0, 10));
        o.release((0, 10));
        o.hold((0, 12));
        o.release((0, 12));
        assert_eq!(o.committable(0), Some(10));
        o.release((0, 10)); // batch of 10 acknowledged
        assert_eq!(o.committable(0), Some(11), "parked 11 holds the line");
        o.release((0, 12));
        assert_eq!(o.committable(0), Some(11));
        o.release((0, 11)); // unparked and written
        assert_eq!(o.committable(0), Some(13), "one past the last message");
        assert_eq!(o.storable(), vec![(0, 13)]);
        assert_eq!(o.storable(), vec![], "unchanged since the last call");
    }

    #[test]
    fn partitions_are_independent_and_revocable() {
        let mut o = Holds::default();
        o.received((0, 5));
        o.received((1, 7));
        o.release((1, 7));
        assert_eq!(o.committable(0), Some(5));
        assert_eq!(o.committable(1), Some(8));
        o.revoke(0);
        assert_eq!(o.committable(0), None);
        assert_eq!(o.held(), 0);
    }

    #[test]
    fn holds_of_a_revoked_generation_never_release_the_next_one() {
        let mut o = Holds::default();
        // Generation one: message 100 has rows in a batch still in flight when revoked.
        o.received((0, 100));
        o.hold((0, 100));
        o.release((0, 100));
        o.revoke(0);
        assert!(o.has_retired(0));
        // (The partition is assigned back but stays paused until the retired holds are gone.)
        o.release((0, 100)); // the old batch is acknowledged
        assert!(!o.has_retired(0));
        // Generation two reads 100 again; its hold is its own.
        o.received((0, 100));
        assert_eq!(o.committable(0), Some(100));
        o.release((0, 100));
        assert_eq!(o.committable(0), Some(101));
    }

    #[test]
    fn random_release_orders_never_store_past_a_held_message() {
        // The same release orders on every run (seeded).
        let mut rng = StdRng::seed_from_u64(0x2545_F491_4F6C_DD1D);
        for _ in 0..200 {
            let mut o = Holds::default();
            let mut holds = Vec::new();
            for offset in 0..40 {
                o.received((3, offset));
                holds.push(offset);
                for _ in 0..rng.random_range(0..3) {
                    o.hold((3, offset));
                    holds.push(offset);
                }
            }
            while !holds.is_empty() {
                let i = rng.random_range(0..holds.len());
                let offset = holds.swap_remove(i);
                o.release((3, offset));
                let lowest_held = holds.iter().min().copied();
                let committable = o.committable(3).expect("partition known");
                if let Some(low) = lowest_held {
                    assert!(committable <= low, "stored {committable} past held {low}");
                }
            }
            assert_eq!(o.committable(3), Some(40));
        }
    }
}
