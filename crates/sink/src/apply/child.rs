//! A score or historic score: written on its scorecard's current shard, carrying the card's
//! fields. A child re-parented to another card, or with a changed primary key, leaves a delete
//! marker for its old copy. A child of a card that can never be routed is poison, like its card;
//! a child delete of a card known nowhere is a no-op; any other child of a card known nowhere
//! waits (parked, bounded by `sink.unknown_scorecard_timeout_ms`).

use scoresync_event::{ChangeEvent, Operation, RowVersion, ScorecardKey, SourceTable};

use super::{Applier, Decision, scorecard_of_row};
use crate::batch::MsgId;
use crate::error::Error;
use crate::park::ParkReason;
use crate::plan::Wait;
use crate::rows::{Denormalized, upsert_row};

impl Applier {
    /// Writes one child change, or says why it must wait.
    pub(super) async fn apply_child(
        &mut self,
        msg: MsgId,
        event: &ChangeEvent,
        table: SourceTable,
        flushed: bool,
    ) -> Result<Decision, Error> {
        let Some(card_key) = ScorecardKey::of_event(event) else {
            return Ok(Decision::Poison(format!("{table} event without its scorecard's key")));
        };
        let card = match self.locate.card_for_child(&card_key).await? {
            Ok(card) => card,
            // The card may be among this sink's own rows not yet in ClickHouse: decide that it
            // is stored nowhere, or can never be routed, only once they are.
            Err(Wait::Park(ParkReason::ScorecardUnknown(_)) | Wait::Poison(_)) if !flushed => {
                return Ok(Decision::NeedsFlush);
            }
            // A card stored nowhere has no children stored anywhere: nothing to delete.
            Err(Wait::Park(ParkReason::ScorecardUnknown(_))) if event.op() == Operation::Delete => {
                return Ok(Decision::Applied);
            }
            Err(wait) => return Ok(wait.into()),
        };
        if event.op() == Operation::Delete {
            let Some(old) = &event.old_row else {
                return Ok(Decision::Poison(format!("{table} delete without old row")));
            };
            let marker = self.marker(table, old, event)?;
            self.add(card.shard, marker, msg)?;
            return Ok(Decision::Applied);
        }
        let Some(new) = &event.new_row else {
            return Ok(Decision::Poison(format!("{table} change without new row")));
        };
        let denormalized =
            Denormalized { card: card.fields.clone(), conversation: card.conversation.clone() };
        let schema = self.schema(table)?.clone();
        let version = RowVersion::of_event(event).0;
        let mut row = upsert_row(&schema, new, version, event.seq_in_tx, Some(&denormalized))
            .map_err(Error::Schema)?;
        row.commit_time_us = event.commit_time_us;
        let (batcher, lookups, shards) = (&self.batcher, &self.locate.lookups, [card.shard]);
        let resolved = crate::toast::resolve(&mut row, &schema, &shards, flushed, batcher, lookups);
        if let Some(wait) = resolved.await? {
            return Ok(wait.into());
        }
        let new_key = row.key(&schema);
        self.add(card.shard, row, msg)?;
        // Moved to another primary key or another scorecard: the old copy goes.
        let Some(old) = &event.old_row else { return Ok(Decision::Applied) };
        let old_marker = self.marker(table, old, event)?;
        let old_key = old_marker.key(&schema);
        let old_shard = match scorecard_of_row(old) {
            Some(old_card) if old_card != card_key => {
                self.locate.card_for_child(&old_card).await?.ok().map(|state| state.shard)
            }
            _ => Some(card.shard),
        };
        if let Some(old_shard) = old_shard
            && (old_key != new_key || old_shard != card.shard)
        {
            self.add(old_shard, old_marker, msg)?;
        }
        Ok(Decision::Applied)
    }
}
