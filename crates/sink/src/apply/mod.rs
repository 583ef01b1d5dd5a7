//! Applying one change event: which rows it writes, on which shard, or why it must wait.
//!
//! - A scorecard change is planned by [`crate::plan`] (no I/O) and carried out here
//!   ([`card`]): the card row, delete markers, and the children a move or refresh copies.
//! - A score or historic score goes to its scorecard's current shard, carrying its fields
//!   ([`child`]).
//! - A TRUNCATE writes delete markers, at its version, for every live row older than it, on every
//!   shard: rows written after it (greater versions) are untouched, so replaying it is harmless
//!   ([`truncate`]).
//! - An unchanged TOAST column takes the stored value ([`crate::toast`]).
//!
//! Rows go to the [`Batcher`]; each message that put rows into a buffer is listed for the loop,
//! which holds its offset until the batch is acknowledged ([`Applier::take_fresh_holds`]).

mod card;
mod child;
mod truncate;

use std::sync::Arc;

use scoresync_event::{ChangeEvent, Operation, Row, RowVersion, ScorecardKey, SourceTable, Value};

use crate::batch::{Batcher, MsgId};
use crate::error::Error;
use crate::handoff::Waiting;
use crate::locate::Locator;
use crate::park::ParkReason;
use crate::plan::Wait;
use crate::rows::{ChRow, RowError, RowKey, delete_row};
use crate::shard::ShardIndex;
use crate::table::TableSchema;

/// What became of an event.
#[derive(Debug, PartialEq)]
pub(crate) enum Decision {
    /// Its rows are in the batches (or it had nothing left to write).
    Applied,
    /// It waits, for this reason.
    Park(ParkReason),
    /// It can never be applied: dead-letter it with this error.
    Poison(String),
    /// It needs every buffered row in ClickHouse first (it reads back what is stored); flush,
    /// wait for the acknowledgements, and apply it again.
    NeedsFlush,
}

impl From<Wait> for Decision {
    fn from(wait: Wait) -> Self {
        match wait {
            Wait::Flush => Decision::NeedsFlush,
            Wait::Park(reason) => Decision::Park(reason),
            Wait::Poison(error) => Decision::Poison(error),
        }
    }
}

/// Since when this process owns the partition of the message applied (assignment generations,
/// `scoresync_bus::group::GroupMember::assigned_at`), and the generation now: a TRUNCATE's job
/// covers only partitions owned when it started (`truncate`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Ownership {
    /// The generation the partition was assigned at (`u64::MAX`: not assigned).
    pub owned_since: u64,
    /// The generation now.
    pub generation: u64,
}

/// The sink's state for applying events.
pub(crate) struct Applier {
    shards: usize,
    schemas: Arc<Vec<TableSchema>>,
    /// Where scorecards live (caches and lookups).
    pub(crate) locate: Locator,
    /// Row buffers.
    pub(crate) batcher: Batcher,
    /// Messages whose rows entered a buffer that held none of theirs, or that have a row in
    /// `handoff`, not yet taken by the loop (one hold each).
    fresh_holds: Vec<MsgId>,
    /// Old-shard markers of moves, to be written once the new shard acknowledged the copies
    /// ([`crate::handoff`]), not yet taken by the loop.
    handoff: Vec<Waiting>,
    /// TRUNCATE jobs running and applied.
    truncations: truncate::Truncations,
    /// The only shard TRUNCATE jobs write (a replay's `--shard`); `None`: every shard.
    pub(crate) only_shard: Option<crate::shard::ShardIndex>,
}

/// The identity of the row an event changes (from its key columns).
pub(crate) fn event_row_key(table: SourceTable, event: &ChangeEvent) -> RowKey {
    let text = |name: &str| {
        event
            .key
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.value.as_ref())
            .and_then(Value::to_text)
            .unwrap_or_default()
    };
    (table, table.primary_key().iter().map(|k| text(k)).collect())
}

fn scorecard_of_row(row: &Row) -> Option<ScorecardKey> {
    ScorecardKey::of_event(&ChangeEvent { new_row: Some(row.clone()), ..Default::default() })
}

impl Applier {
    /// An applier for `schemas` over the shards `locate` knows.
    pub(crate) fn new(
        shards: usize,
        schemas: Arc<Vec<TableSchema>>,
        locate: Locator,
        batcher: Batcher,
    ) -> Self {
        Applier {
            shards,
            schemas,
            locate,
            batcher,
            fresh_holds: Vec::new(),
            handoff: Vec::new(),
            truncations: truncate::Truncations::default(),
            only_shard: None,
        }
    }

    /// The messages whose offsets must now be held until their batch is acknowledged.
    pub(crate) fn take_fresh_holds(&mut self) -> Vec<MsgId> {
        std::mem::take(&mut self.fresh_holds)
    }

    /// The old-shard markers of moves applied since the last call (each with a hold taken).
    pub(crate) fn take_handoff(&mut self) -> Vec<Waiting> {
        std::mem::take(&mut self.handoff)
    }

    /// Adds a row that waited in the handoff (its message's new holds go to `take_fresh_holds`).
    pub(crate) fn add_handed_off(&mut self, (shard, row, msg): Waiting) -> Result<(), Error> {
        self.add(shard, row, msg)
    }

    /// Keeps an old-shard marker of a move until the new shard acknowledged the copies.
    fn add_after_copies(&mut self, shard: ShardIndex, row: ChRow, msg: MsgId) {
        self.fresh_holds.push(msg);
        self.handoff.push((shard, row, msg));
    }

    fn schema(&self, table: SourceTable) -> Result<&TableSchema, Error> {
        self.schemas
            .iter()
            .find(|s| s.table == table)
            .ok_or_else(|| Error::NoSchema { table: table.name().into() })
    }

    /// Adds a row to the batch of `shard` on behalf of `msg`.
    fn add(&mut self, shard: ShardIndex, row: ChRow, msg: MsgId) -> Result<(), Error> {
        let schemas = Arc::clone(&self.schemas);
        let schema = schemas
            .iter()
            .find(|s| s.table == row.table)
            .ok_or_else(|| Error::NoSchema { table: row.table.name().into() })?;
        // A row a TRUNCATE started here removes is dead (see `truncate`); markers may go on.
        if self.truncations.is_truncated(row.table, row.version) && !row.is_delete(schema) {
            return Ok(());
        }
        if self.batcher.add(shard, schema, row, msg) {
            self.fresh_holds.push(msg);
        }
        Ok(())
    }

    /// A delete marker for `old` at this stamp, stamped with the event's commit time.
    fn marker(&self, table: SourceTable, old: &Row, event: &ChangeEvent) -> Result<ChRow, Error> {
        let version = RowVersion::of_event(event).0;
        let mut marker = delete_row(self.schema(table)?, old, version, event.seq_in_tx)
            .map_err(Error::Schema)?;
        marker.commit_time_us = event.commit_time_us;
        Ok(marker)
    }

    /// Applies one event. `flushed` says whether every earlier row is already in ClickHouse.
    /// A value that does not fit its column, or a missing key value, makes the event poison
    /// (dead-lettered); a table that lacks a column every row needs stops the sink.
    pub(crate) async fn apply(
        &mut self,
        msg: MsgId,
        event: &ChangeEvent,
        flushed: bool,
        ownership: Ownership,
    ) -> Result<Decision, Error> {
        match self.apply_event(msg, event, flushed, ownership).await {
            Err(Error::Schema(err @ (RowError::Type { .. } | RowError::NoKey(..)))) => {
                Ok(Decision::Poison(err.to_string()))
            }
            other => other,
        }
    }

    async fn apply_event(
        &mut self,
        msg: MsgId,
        event: &ChangeEvent,
        flushed: bool,
        ownership: Ownership,
    ) -> Result<Decision, Error> {
        let Some(table) = SourceTable::from_name(&event.schema, &event.table) else {
            return Ok(Decision::Poison(format!("unknown table {}.{}", event.schema, event.table)));
        };
        match (event.op(), table) {
            (Operation::Truncate, _)
                if !flushed
                    && !self
                        .truncations
                        .started((table, RowVersion::of_event(event).0), ownership.owned_since) =>
            {
                Ok(Decision::NeedsFlush)
            }
            (Operation::Truncate, _) => {
                let version = RowVersion::of_event(event).0;
                self.truncate(table, version, ownership.owned_since, ownership.generation).await
            }
            (Operation::Unspecified, _) => Ok(Decision::Poison("unspecified operation".into())),
            (_, SourceTable::Scorecards) => self.apply_card(msg, event, flushed).await,
            (_, child) => self.apply_child(msg, event, child, flushed).await,
        }
    }
}
