//! What one sink run covers. The daemon's sink covers everything; `scoresync replay` may narrow
//! it to one shard and some tables. (A replay's end is not part of the scope: it applies what
//! comes after its end offsets too, harmlessly, so that a change past the end can still
//! supersede a parked one; it stops once every partition's commit passed its end.)
//!
//! Invariant: an event of a table outside the scope is done as soon as it arrives (its hold
//! released, so offsets move past it), and a row or delete marker for a shard outside the scope
//! is acknowledged without being written (TRUNCATE jobs included). Everything inside the scope
//! goes through the same path as the daemon's.

use std::collections::BTreeSet;

use scoresync_event::{ChangeEvent, SourceTable};

use crate::shard::ShardIndex;

/// What a sink run applies and writes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    /// Write only this shard's rows (`None`: every shard).
    pub shard: Option<ShardIndex>,
    /// Apply only these tables' events (`None`: every table). A card's move still moves its
    /// children.
    pub tables: Option<BTreeSet<SourceTable>>,
}

impl Scope {
    /// True when `event` is of a table outside the scope.
    pub(crate) fn skips_table(&self, event: &ChangeEvent) -> bool {
        let Some(tables) = &self.tables else { return false };
        SourceTable::from_name(&event.schema, &event.table).is_none_or(|t| !tables.contains(&t))
    }

    /// True when rows for `shard` are written.
    pub(crate) fn writes(&self, shard: ShardIndex) -> bool {
        self.shard.is_none_or(|only| only == shard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_is_in_the_default_scope() {
        let all = Scope::default();
        assert!(all.writes(7));
        assert!(!all.skips_table(&ChangeEvent::default()));
    }

    #[test]
    fn a_replay_scope_keeps_to_its_shard_and_tables() {
        let scope = Scope { shard: Some(1), tables: Some([SourceTable::Scores].into()) };
        assert!(scope.writes(1) && !scope.writes(0));
        let event = |table: &str| ChangeEvent {
            schema: "director".into(),
            table: table.into(),
            ..Default::default()
        };
        assert!(!scope.skips_table(&event("scores")));
        assert!(scope.skips_table(&event("scorecards")));
    }
}
