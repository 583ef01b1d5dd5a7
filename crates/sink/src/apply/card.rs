//! Carrying out a scorecard change: gather what [`crate::plan::plan_card`] needs, then write the
//! rows its [`Steps`](crate::plan::Steps) name, and remember the card's new state.

use scoresync_event::{ChangeEvent, Operation, Row, RowVersion, ScorecardKey, SourceTable};

use super::{Applier, Decision, scorecard_of_row};
use crate::batch::MsgId;
use crate::cache::CardState;
use crate::error::Error;
use crate::plan::{self, CardChange, CardPlan, Placement};
use crate::route::Conversation;
use crate::rows::{ChRow, Denormalized, upsert_row};
use crate::shard::ShardIndex;
use crate::table::Cell;

/// One card change being written, with what its steps need.
struct CardWrite<'a> {
    key: &'a ScorecardKey,
    /// The new row (the old one for a delete).
    row: &'a Row,
    event: &'a ChangeEvent,
    conversation: &'a Option<Conversation>,
    msg: MsgId,
    /// The shard the card lived on before (where an unchanged TOAST value is looked for first).
    prev_shard: Option<ShardIndex>,
    flushed: bool,
}

impl Applier {
    /// Plans and writes one scorecard change.
    pub(super) async fn apply_card(
        &mut self,
        msg: MsgId,
        event: &ChangeEvent,
        flushed: bool,
    ) -> Result<Decision, Error> {
        let Some(key) = ScorecardKey::of_event(event) else {
            return Ok(Decision::Poison(
                "scorecard event without customer_id, profile_id, scorecard_id".into(),
            ));
        };
        let delete = event.op() == Operation::Delete;
        let row = if delete { &event.old_row } else { &event.new_row };
        let Some(row) = row else {
            let which = if delete { "delete without old row" } else { "change without new row" };
            return Ok(Decision::Poison(format!("scorecard {which}")));
        };
        let change = CardChange {
            stamp: (RowVersion::of_event(event).0, event.seq_in_tx),
            delete,
            fields: crate::route::CardFields::from_row(row),
        };
        let prev = self.locate.card_state(&key).await?;
        let placement = match plan::needs_placement(delete, prev.as_ref()) {
            true => Some(self.locate.place(&key, &change.fields).await?),
            false => None,
        };
        let planned =
            plan::plan_card(&change, prev.as_ref(), placement.as_ref(), self.shards, flushed);
        let card_plan = match planned {
            Ok(card_plan) => card_plan,
            Err(wait) => return Ok(wait.into()),
        };
        let conversation = match placement {
            Some(Placement::Routed { conversation, .. }) if !delete => conversation,
            _ => prev.as_ref().and_then(|p| p.conversation.clone()),
        };
        let write = CardWrite {
            key: &key,
            row,
            event,
            conversation: &conversation,
            msg,
            prev_shard: prev.as_ref().map(|p| p.shard),
            flushed,
        };
        if let Some(wait) = self.write_plan(&card_plan, &write).await? {
            return Ok(wait);
        }
        if let Some(shard) = card_plan.lands_on() {
            let fields = match (&prev, delete) {
                (Some(p), true) => p.fields.clone(),
                _ => change.fields.clone(),
            };
            let state =
                CardState::applied(change.stamp, fields, shard, conversation, card_plan.deletes());
            self.locate.remember(key, state);
        }
        Ok(Decision::Applied)
    }

    /// Adds the rows of `card_plan`. `Some` when the change must wait after all (an unchanged
    /// TOAST value not at hand).
    async fn write_plan(
        &mut self,
        card_plan: &CardPlan,
        w: &CardWrite<'_>,
    ) -> Result<Option<Decision>, Error> {
        let steps = card_plan.steps();
        if let Some(shard) = steps.card_on {
            let mut card = self.card_row(w.row, w.event)?;
            if let CardPlan::Stale { .. } = card_plan {
                // Harmless where the card lives; its unchanged values are not worth a lookup.
                if card.unknown.is_empty() {
                    self.add(shard, card, w.msg)?;
                }
                return Ok(None);
            }
            let schema = self.schema(SourceTable::Scorecards)?.clone();
            let look_in: Vec<ShardIndex> = w.prev_shard.into_iter().chain([shard]).collect();
            let (batcher, lookups) = (&self.batcher, &self.locate.lookups);
            let resolved =
                crate::toast::resolve(&mut card, &schema, &look_in, w.flushed, batcher, lookups);
            if let Some(wait) = resolved.await? {
                return Ok(Some(wait.into()));
            }
            self.retire_old_key(w.key, w.event, w.msg).await?;
            self.add(shard, card, w.msg)?;
        }
        if let Some(shard) = steps.card_marker_on {
            let marker = self.marker(SourceTable::Scorecards, w.row, w.event)?;
            match steps.card_on {
                // A move: the old shard's marker waits for the new shard's copy.
                Some(_) => self.add_after_copies(shard, marker, w.msg),
                None => self.add(shard, marker, w.msg)?,
            }
        }
        let Some(to) = steps.card_on else { return Ok(None) };
        let fields = crate::route::CardFields::from_row(w.row);
        let denormalized = Denormalized { card: fields, conversation: w.conversation.clone() };
        if let Some((from, to)) = steps.children {
            self.move_children(w.key, from, to, &denormalized, w.event, w.msg).await?;
        }
        for from in steps.sweep {
            self.finish_move(w, from, to, &denormalized).await?;
        }
        Ok(None)
    }

    /// A changed primary key: the card's row under its old key goes.
    async fn retire_old_key(
        &mut self,
        key: &ScorecardKey,
        event: &ChangeEvent,
        msg: MsgId,
    ) -> Result<(), Error> {
        let Some(old) = &event.old_row else { return Ok(()) };
        let Some(old_key) = scorecard_of_row(old).filter(|k| k != key) else { return Ok(()) };
        let Some(old_state) = self.locate.card_state(&old_key).await? else { return Ok(()) };
        let marker = self.marker(SourceTable::Scorecards, old, event)?;
        self.add(old_state.shard, marker, msg)?;
        let stamp = (RowVersion::of_event(event).0, event.seq_in_tx);
        let retired = CardState {
            deleted: true,
            version: stamp.0,
            seq: stamp.1,
            from_shards: false,
            ..old_state
        };
        self.locate.remember(old_key, retired);
        Ok(())
    }

    fn card_row(&self, new: &Row, event: &ChangeEvent) -> Result<ChRow, Error> {
        let schema = self.schema(SourceTable::Scorecards)?;
        let version = RowVersion::of_event(event).0;
        let mut row =
            upsert_row(schema, new, version, event.seq_in_tx, None).map_err(Error::Schema)?;
        row.commit_time_us = event.commit_time_us;
        Ok(row)
    }

    /// Completes, on shard `from`, a move of the card to `to` at this event's version that a
    /// crash may have cut short: a live copy of the card there gets a delete marker, and its live
    /// children move. Nothing is written when `from` holds nothing live of the card.
    async fn finish_move(
        &mut self,
        w: &CardWrite<'_>,
        from: ShardIndex,
        to: ShardIndex,
        denormalized: &Denormalized,
    ) -> Result<(), Error> {
        let card_schema = self.schema(SourceTable::Scorecards)?.clone();
        if !self.locate.lookups.live_rows_of_card(from, &card_schema, w.key).await?.is_empty() {
            tracing::info!(shard = from, scorecard = %w.key.scorecard_id, "removing a live copy left by an interrupted move");
            let marker = self.marker(SourceTable::Scorecards, w.row, w.event)?;
            self.add_after_copies(from, marker, w.msg);
        }
        self.move_children(w.key, from, to, denormalized, w.event, w.msg).await
    }

    /// Moves (or, with `from == to`, rewrites) a scorecard's children with its new fields, at the
    /// card change's version.
    async fn move_children(
        &mut self,
        card: &ScorecardKey,
        from: ShardIndex,
        to: ShardIndex,
        denormalized: &Denormalized,
        event: &ChangeEvent,
        msg: MsgId,
    ) -> Result<(), Error> {
        let (version, seq) = (RowVersion::of_event(event).0, event.seq_in_tx);
        for table in [SourceTable::Scores, SourceTable::HistoricScorecardScores] {
            let schema = self.schema(table)?.clone();
            let stored = self.locate.lookups.live_rows_of_card(from, &schema, card).await?;
            for cells in stored {
                let mut row =
                    ChRow { table, cells, version, seq, unknown: Vec::new(), commit_time_us: 0 };
                if let Some(i) = schema.position("_version") {
                    row.cells[i] = Cell::UInt(version);
                }
                if from != to {
                    let mut marker = row.clone();
                    for (i, cell) in marker.cells.iter_mut().enumerate() {
                        if !schema.key.contains(&i) {
                            *cell = Cell::Null;
                        }
                    }
                    if let Some(i) = schema.position("_version") {
                        marker.cells[i] = Cell::UInt(version);
                    }
                    if let Some(i) = schema.position("_deleted") {
                        marker.cells[i] = Cell::UInt(1);
                    }
                    self.add_after_copies(from, marker, msg);
                }
                denormalized.apply(&schema, &mut row);
                self.add(to, row, msg)?;
            }
        }
        Ok(())
    }
}
