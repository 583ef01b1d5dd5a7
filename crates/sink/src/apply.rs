//! Applying one change event: which rows it writes, on which shard, or why it must wait.
//!
//! - A scorecard goes to the shard its routing names. If it lived on another shard before, its
//!   row there gets a delete marker and its children move with it (read from the old shard,
//!   written on the new one with the card's new fields; delete markers on the old one), all at
//!   the card change's version. If only fields its children carry changed, the children are
//!   rewritten in place. An event older than what the shards already hold for the card never
//!   writes to another shard than the card's current one, so a replay cannot leave a stale live
//!   copy behind. A re-read change that the shards already hold as the card's newest (the tail
//!   read again after a crash) looks for live copies of the card and its children on the other
//!   shards and removes them: the move it made may have been cut short between two inserts.
//! - A score or historic score goes to its scorecard's current shard, carrying its fields.
//! - A TRUNCATE writes delete markers, at its version, for every live row older than it, on every
//!   shard: rows written after it (greater versions) are untouched, so replaying it is harmless.
//! - An unchanged TOAST column takes the stored value (buffer, then shard, then PostgreSQL).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use scoresync_event::{ChangeEvent, Operation, Row, RowVersion, ScorecardKey, SourceTable, Value};

use crate::batch::{Batcher, MsgId};
use crate::cache::{Caches, CardState, ConversationKey};
use crate::error::Error;
use crate::lookup::Lookups;
use crate::offsets::Offsets;
use crate::park::{Park, ParkReason};
use crate::route::{CardFields, Conversation, Route};
use crate::rows::{ChRow, Denormalized, RowError, RowKey, delete_row, upsert_row};
use crate::shard::ShardIndex;
use crate::table::{Cell, ChType, TableSchema};

/// What became of an event.
#[derive(Debug, PartialEq)]
pub enum Decision {
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

/// The sink's state for applying events.
pub struct Applier {
    /// Shard count.
    pub shards: usize,
    /// Target table schemas.
    pub schemas: Arc<Vec<TableSchema>>,
    /// Lookups.
    pub lookups: Lookups,
    /// Routing caches.
    pub caches: Caches,
    /// Row buffers.
    pub batcher: Batcher,
    /// Parked events.
    pub park: Park,
    /// Offset holds.
    pub offsets: Arc<Mutex<Offsets>>,
    /// Scorecards the last prefetch found on no shard (spares a lookup per event).
    pub absent: std::collections::HashSet<ScorecardKey>,
}

/// The identity of the row an event changes (from its key columns).
pub fn event_row_key(table: SourceTable, event: &ChangeEvent) -> RowKey {
    let text = |name: &str| {
        event
            .key
            .iter()
            .find(|c| c.name == name)
            .and_then(|c| c.value.as_ref())
            .map(value_text)
            .unwrap_or_default()
    };
    (table, table.primary_key().iter().map(|k| text(k)).collect())
}

fn value_text(value: &Value) -> String {
    use scoresync_event::v1::value::Kind;
    match &value.kind {
        Some(Kind::Text(s)) => s.clone(),
        Some(Kind::Int(i) | Kind::TimestampUs(i)) => i.to_string(),
        Some(Kind::Float(f)) => f.to_string(),
        Some(Kind::Boolean(b)) => b.to_string(),
        _ => String::new(),
    }
}

/// A card's state as the shards hold it.
fn stored_state(card: &crate::lookup::StoredCard, conversation: Option<Conversation>) -> CardState {
    CardState {
        version: card.version,
        seq: 0,
        fields: card.fields.clone(),
        shard: card.shard,
        conversation,
        deleted: card.deleted,
        from_shards: true,
    }
}

fn scorecard_of_row(row: &Row) -> Option<ScorecardKey> {
    ScorecardKey::of_event(&ChangeEvent { new_row: Some(row.clone()), ..Default::default() })
}

impl Applier {
    fn schema(&self, table: SourceTable) -> Result<&TableSchema, Error> {
        self.schemas
            .iter()
            .find(|s| s.table == table)
            .ok_or(Error::SchemaMismatch { table: table.name().into(), shard: 0 })
    }

    /// Adds a row to the batch of `shard`, holding `msg` until that batch is acknowledged.
    fn add(&mut self, shard: ShardIndex, row: ChRow, msg: MsgId) -> Result<(), Error> {
        let schemas = Arc::clone(&self.schemas);
        let schema = schemas
            .iter()
            .find(|s| s.table == row.table)
            .ok_or(Error::SchemaMismatch { table: row.table.name().into(), shard })?;
        if self.batcher.add(shard, schema, row, msg)
            && let Ok(mut offsets) = self.offsets.lock()
        {
            offsets.hold(msg);
        }
        Ok(())
    }

    /// Applies one event. `flushed` says whether every earlier row is already in ClickHouse.
    /// A value that does not fit its column, or a missing key value, makes the event poison
    /// (dead-lettered); a table that lacks a column every row needs stops the sink.
    pub async fn apply(
        &mut self,
        msg: MsgId,
        event: &ChangeEvent,
        flushed: bool,
    ) -> Result<Decision, Error> {
        match self.apply_event(msg, event, flushed).await {
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
    ) -> Result<Decision, Error> {
        let Some(table) = SourceTable::from_name(&event.schema, &event.table) else {
            return Ok(Decision::Poison(format!("unknown table {}.{}", event.schema, event.table)));
        };
        let version = RowVersion::of_event(event).0;
        match (event.op(), table) {
            (Operation::Truncate, _) => {
                if !flushed {
                    return Ok(Decision::NeedsFlush);
                }
                self.truncate(table, version).await?;
                Ok(Decision::Applied)
            }
            (Operation::Unspecified, _) => Ok(Decision::Poison("unspecified operation".into())),
            (_, SourceTable::Scorecards) => self.apply_card(msg, event, version, flushed).await,
            (_, child) => self.apply_child(msg, event, child, version, flushed).await,
        }
    }

    async fn apply_card(
        &mut self,
        msg: MsgId,
        event: &ChangeEvent,
        version: u64,
        flushed: bool,
    ) -> Result<Decision, Error> {
        let Some(key) = ScorecardKey::of_event(event) else {
            return Ok(Decision::Poison(
                "scorecard event without customer_id, profile_id, scorecard_id".into(),
            ));
        };
        let seq = event.seq_in_tx;
        let prev = self.card_state(&key).await?;
        let stale = prev.as_ref().is_some_and(|p| (p.version, p.seq) > (version, seq));

        if event.op() == Operation::Delete {
            let Some(old) = &event.old_row else {
                return Ok(Decision::Poison("scorecard delete without old row".into()));
            };
            if stale {
                return Ok(Decision::Applied);
            }
            let shard = match &prev {
                Some(p) => p.shard,
                None => match self.route(&key, &CardFields::from_row(old)).await? {
                    Ok((shard, _)) => shard,
                    // Not in ClickHouse and not routable: nothing stored to delete.
                    Err(_) => return Ok(Decision::Applied),
                },
            };
            let mut marker = self.delete(SourceTable::Scorecards, old, version, seq)?;
            marker.commit_time_us = event.commit_time_us;
            self.add(shard, marker, msg)?;
            let fields =
                prev.as_ref().map_or_else(|| CardFields::from_row(old), |p| p.fields.clone());
            let conversation = prev.and_then(|p| p.conversation);
            let state = CardState::applied((version, seq), fields, shard, conversation, true);
            self.caches.cards.insert(key, state);
            return Ok(Decision::Applied);
        }

        let Some(new) = &event.new_row else {
            return Ok(Decision::Poison("scorecard change without new row".into()));
        };
        let fields = CardFields::from_row(new);
        let (shard, conversation) = match self.route(&key, &fields).await? {
            Ok(found) => found,
            Err(decision) => return Ok(decision),
        };
        if let Some(p) = &prev
            && stale
        {
            // Older than what is stored: harmless on the card's shard, never written elsewhere.
            if p.shard == shard {
                let row = self.card_row(new, version, event)?;
                if row.unknown.is_empty() {
                    self.add(shard, row, msg)?;
                }
            }
            return Ok(Decision::Applied);
        }
        let moving = prev.as_ref().is_some_and(|p| !p.deleted && p.shard != shard);
        let refreshing = prev
            .as_ref()
            .is_some_and(|p| !p.deleted && (p.fields != fields || p.conversation != conversation));
        // The very change the shards already hold as the card's newest (a re-read after a crash or
        // a rebalance): a move it made may be half done (the card and each child table of each
        // shard are separate inserts), so its leftovers on other shards are looked for again.
        // (The newest stored row may be the move's delete marker on the old shard, when the new
        // shard's insert was the one lost.)
        let replay = prev.as_ref().is_some_and(|p| p.from_shards && p.version == version);
        if (moving || refreshing || replay) && !flushed {
            return Ok(Decision::NeedsFlush);
        }
        // A changed primary key: the old row goes.
        if let Some(old) = &event.old_row
            && let Some(old_key) = scorecard_of_row(old)
            && old_key != key
            && let Some(old_state) = self.card_state(&old_key).await?
        {
            let marker = self.delete(SourceTable::Scorecards, old, version, seq)?;
            self.add(old_state.shard, marker, msg)?;
            self.caches.cards.insert(
                old_key,
                CardState { deleted: true, version, seq, from_shards: false, ..old_state },
            );
        }
        let mut row = self.card_row(new, version, event)?;
        let look_in: Vec<ShardIndex> = prev.iter().map(|p| p.shard).chain([shard]).collect();
        if let Some(decision) = self.resolve_unknown(&mut row, &look_in, flushed).await? {
            return Ok(decision);
        }
        self.add(shard, row, msg)?;
        let denormalized =
            Denormalized { card: fields.clone(), conversation: conversation.clone() };
        if let Some(p) = &prev
            && moving
        {
            let mut marker = self.delete(SourceTable::Scorecards, new, version, seq)?;
            marker.commit_time_us = event.commit_time_us;
            self.add(p.shard, marker, msg)?;
            self.move_children(&key, p.shard, shard, &denormalized, version, seq, msg).await?;
        } else if refreshing {
            self.move_children(&key, shard, shard, &denormalized, version, seq, msg).await?;
        }
        if replay {
            let moved_from = prev.as_ref().filter(|_| moving).map(|p| p.shard);
            for other in (0..self.shards).filter(|s| *s != shard && Some(*s) != moved_from) {
                self.finish_move(&key, new, other, shard, &denormalized, event, msg).await?;
            }
        }
        let state = CardState::applied((version, seq), fields, shard, conversation, false);
        self.caches.cards.insert(key, state);
        Ok(Decision::Applied)
    }

    fn card_row(&self, new: &Row, version: u64, event: &ChangeEvent) -> Result<ChRow, Error> {
        let schema = self.schema(SourceTable::Scorecards)?;
        let mut row =
            upsert_row(schema, new, version, event.seq_in_tx, None).map_err(Error::Schema)?;
        row.commit_time_us = event.commit_time_us;
        Ok(row)
    }

    fn delete(
        &self,
        table: SourceTable,
        old: &Row,
        version: u64,
        seq: u32,
    ) -> Result<ChRow, Error> {
        delete_row(self.schema(table)?, old, version, seq).map_err(Error::Schema)
    }

    async fn apply_child(
        &mut self,
        msg: MsgId,
        event: &ChangeEvent,
        table: SourceTable,
        version: u64,
        flushed: bool,
    ) -> Result<Decision, Error> {
        let Some(card_key) = ScorecardKey::of_event(event) else {
            return Ok(Decision::Poison(format!("{table} event without its scorecard's key")));
        };
        let seq = event.seq_in_tx;
        let card = match self.card_for_child(&card_key).await? {
            Ok(card) => card,
            Err(reason) => return Ok(Decision::Park(reason)),
        };
        if event.op() == Operation::Delete {
            let Some(old) = &event.old_row else {
                return Ok(Decision::Poison(format!("{table} delete without old row")));
            };
            let mut marker = self.delete(table, old, version, seq)?;
            marker.commit_time_us = event.commit_time_us;
            self.add(card.shard, marker, msg)?;
            return Ok(Decision::Applied);
        }
        let Some(new) = &event.new_row else {
            return Ok(Decision::Poison(format!("{table} change without new row")));
        };
        let denormalized =
            Denormalized { card: card.fields.clone(), conversation: card.conversation.clone() };
        let schema = self.schema(table)?.clone();
        let mut row =
            upsert_row(&schema, new, version, seq, Some(&denormalized)).map_err(Error::Schema)?;
        row.commit_time_us = event.commit_time_us;
        if let Some(decision) = self.resolve_unknown(&mut row, &[card.shard], flushed).await? {
            return Ok(decision);
        }
        let new_key = row.key(&schema);
        self.add(card.shard, row, msg)?;
        // Moved to another primary key or another scorecard: the old copy goes.
        if let Some(old) = &event.old_row {
            let old_marker = self.delete(table, old, version, seq)?;
            let old_key = old_marker.key(&schema);
            let old_shard = match scorecard_of_row(old) {
                Some(old_card) if old_card != card_key => {
                    match self.card_for_child(&old_card).await? {
                        Ok(state) => Some(state.shard),
                        Err(_) => None,
                    }
                }
                _ => Some(card.shard),
            };
            if let Some(old_shard) = old_shard
                && (old_key != new_key || old_shard != card.shard)
            {
                self.add(old_shard, old_marker, msg)?;
            }
        }
        Ok(Decision::Applied)
    }

    /// Completes, on shard `from`, a move of the card to `to` at this event's version that a
    /// crash may have cut short: a live copy of the card there gets a delete marker, and its live
    /// children move. Nothing is written when `from` holds nothing live of the card.
    #[allow(clippy::too_many_arguments)]
    async fn finish_move(
        &mut self,
        key: &ScorecardKey,
        new: &Row,
        from: ShardIndex,
        to: ShardIndex,
        denormalized: &Denormalized,
        event: &ChangeEvent,
        msg: MsgId,
    ) -> Result<(), Error> {
        let (version, seq) = (RowVersion::of_event(event).0, event.seq_in_tx);
        let card_schema = self.schema(SourceTable::Scorecards)?.clone();
        if !self.lookups.children(from, &card_schema, key).await?.is_empty() {
            tracing::info!(shard = from, scorecard = %key.scorecard_id, "removing a live copy left by an interrupted move");
            let mut marker = self.delete(SourceTable::Scorecards, new, version, seq)?;
            marker.commit_time_us = event.commit_time_us;
            self.add(from, marker, msg)?;
        }
        self.move_children(key, from, to, denormalized, version, seq, msg).await
    }

    /// Moves (or, with `from == to`, rewrites) a scorecard's children with its new fields.
    #[allow(clippy::too_many_arguments)]
    async fn move_children(
        &mut self,
        card: &ScorecardKey,
        from: ShardIndex,
        to: ShardIndex,
        denormalized: &Denormalized,
        version: u64,
        seq: u32,
        msg: MsgId,
    ) -> Result<(), Error> {
        for table in [SourceTable::Scores, SourceTable::HistoricScorecardScores] {
            let schema = self.schema(table)?.clone();
            let stored = self.lookups.children(from, &schema, card).await?;
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
                    self.add(from, marker, msg)?;
                }
                denormalized.apply(&schema, &mut row);
                self.add(to, row, msg)?;
            }
        }
        Ok(())
    }

    /// Delete markers, at `version`, for every live row of `table` older than it, on every shard.
    async fn truncate(&mut self, table: SourceTable, version: u64) -> Result<(), Error> {
        let schema = self.schema(table)?.clone();
        let select: Vec<String> = schema
            .columns
            .iter()
            .map(|c| match c.name.as_str() {
                "_version" => format!("toUInt64({version})"),
                "_deleted" => "toUInt8(1)".to_owned(),
                name => format!("`{name}`"),
            })
            .collect();
        let sql = format!(
            "INSERT INTO {db}.{t} ({cols}) SELECT {select} FROM {db}.{t} FINAL WHERE _version < {version} AND _deleted = 0",
            db = self.lookups.database(),
            t = table.name(),
            cols = schema.column_list(),
            select = select.join(", "),
        );
        for shard in 0..self.shards {
            self.lookups.execute(shard, &sql).await?;
        }
        if table == SourceTable::Scorecards {
            self.caches.cards = crate::cache::Bounded::new(self.caches.cards_capacity());
        }
        // Parked changes of the table older than the TRUNCATE are moot now.
        let moot = self.park.drop_older(table, version);
        if let Ok(mut offsets) = self.offsets.lock() {
            for msg in moot {
                offsets.release(msg);
            }
        }
        tracing::info!(%table, version, "truncate applied on every shard");
        Ok(())
    }

    /// Warms the caches for a batch of events with one batched lookup per shard: the
    /// scorecards of every event and the conversations of conversation scorecards. Failures are
    /// left to the per-event lookups (which park when a shard is away).
    pub async fn prefetch<'a>(&mut self, events: impl IntoIterator<Item = &'a ChangeEvent>) {
        self.absent.clear();
        let mut cards = std::collections::BTreeSet::new();
        let mut conversations = std::collections::BTreeSet::new();
        for event in events {
            let Some(key) = ScorecardKey::of_event(event) else { continue };
            if event.table == SourceTable::Scorecards.name()
                && let Some(new) = &event.new_row
            {
                let fields = CardFields::from_row(new);
                if let (false, Some(id)) = (fields.is_process(), fields.conversation_id) {
                    conversations.insert((key.customer_id.clone(), key.profile_id.clone(), id));
                }
            }
            if self.caches.cards.get(&key).is_none() {
                cards.insert(key);
            }
        }
        let keys: Vec<ScorecardKey> = cards.into_iter().collect();
        let stored = match self.lookups.cards(&keys).await {
            Ok(found) => found,
            Err(error) => {
                tracing::debug!(%error, "prefetch of scorecards failed");
                return;
            }
        };
        for (key, card) in &stored {
            if let (false, false, Some(id)) =
                (card.fields.is_process(), card.deleted, &card.fields.conversation_id)
            {
                conversations.insert((key.customer_id.clone(), key.profile_id.clone(), id.clone()));
            }
        }
        let wanted: Vec<ConversationKey> = conversations
            .into_iter()
            .filter(|k| self.caches.conversations.get(k).is_none())
            .collect();
        if !wanted.is_empty() {
            match self.lookups.conversations(&wanted).await {
                Ok(found) => {
                    for (k, c) in found {
                        self.caches.conversations.insert(k, c);
                    }
                }
                Err(error) => tracing::debug!(%error, "prefetch of conversations failed"),
            }
        }
        for key in keys {
            match stored.get(&key) {
                Some(card) => {
                    let conversation = card.fields.conversation_id.as_ref().and_then(|id| {
                        let ck = (key.customer_id.clone(), key.profile_id.clone(), id.clone());
                        self.caches.conversations.get(&ck).cloned()
                    });
                    let conversation =
                        if card.fields.is_process() || card.deleted { None } else { conversation };
                    self.caches.cards.insert(key, stored_state(card, conversation));
                }
                None => {
                    self.absent.insert(key);
                }
            }
        }
    }

    /// Where a scorecard lives now, from the cache or the shards.
    async fn card_state(&mut self, key: &ScorecardKey) -> Result<Option<CardState>, Error> {
        if let Some(state) = self.caches.cards.get(key) {
            return Ok(Some(state.clone()));
        }
        if self.absent.contains(key) {
            return Ok(None);
        }
        let found = self.lookups.cards(std::slice::from_ref(key)).await?;
        let Some(stored) = found.get(key) else { return Ok(None) };
        let conversation =
            match (&stored.fields.conversation_id, stored.fields.is_process(), stored.deleted) {
                (Some(id), false, false) => self.conversation(key, id).await?,
                _ => None,
            };
        let state = stored_state(stored, conversation);
        self.caches.cards.insert(key.clone(), state.clone());
        Ok(Some(state))
    }

    /// The scorecard a child belongs to: cache, shards, then PostgreSQL (routed like its card).
    async fn card_for_child(
        &mut self,
        key: &ScorecardKey,
    ) -> Result<Result<CardState, ParkReason>, Error> {
        if let Some(state) = self.card_state(key).await? {
            return Ok(Ok(state));
        }
        let Some(fields) = self.lookups.card_in_postgres(key).await? else {
            return Ok(Err(ParkReason::ScorecardUnknown(key.scorecard_id.clone())));
        };
        match self.route(key, &fields).await? {
            Ok((shard, conversation)) => {
                // Not cached: the card's own event, when applied, decides its version and state.
                Ok(Ok(CardState {
                    version: 0,
                    seq: 0,
                    fields,
                    shard,
                    conversation,
                    deleted: false,
                    from_shards: false,
                }))
            }
            Err(Decision::Park(reason)) => Ok(Err(reason)),
            Err(_) => Ok(Err(ParkReason::ScorecardUnknown(key.scorecard_id.clone()))),
        }
    }

    /// The shard (and conversation) of scorecard `key` with these fields, or the decision when it
    /// cannot be routed yet (park: conversation on no shard) or ever (poison).
    async fn route(
        &mut self,
        key: &ScorecardKey,
        fields: &CardFields,
    ) -> Result<Result<(ShardIndex, Option<Conversation>), Decision>, Error> {
        match fields.route(self.shards) {
            Err(err) => Ok(Err(Decision::Poison(err.to_string()))),
            Ok(Route::Process(shard)) => Ok(Ok((shard, None))),
            Ok(Route::Conversation(id)) => match self.conversation(key, &id).await? {
                Some(c) => Ok(Ok((c.shard, Some(c)))),
                None => Ok(Err(Decision::Park(ParkReason::ConversationNotFound(id)))),
            },
        }
    }

    /// The conversation `id` of the scorecard `key` (cache, then every shard).
    async fn conversation(
        &mut self,
        key: &ScorecardKey,
        id: &str,
    ) -> Result<Option<Conversation>, Error> {
        let ckey: ConversationKey =
            (key.customer_id.clone(), key.profile_id.clone(), id.to_owned());
        if let Some(c) = self.caches.conversations.get(&ckey) {
            return Ok(Some(c.clone()));
        }
        let found = self.lookups.conversations(std::slice::from_ref(&ckey)).await?;
        let conversation = found.get(&ckey).cloned();
        if let Some(c) = &conversation {
            self.caches.conversations.insert(ckey, c.clone());
        }
        Ok(conversation)
    }

    /// Fills unchanged-TOAST cells from the stored row (buffer, then shard once every earlier row is
    /// acknowledged, then PostgreSQL). `Some` when the event must wait: flush first, or park.
    async fn resolve_unknown(
        &mut self,
        row: &mut ChRow,
        shards: &[ShardIndex],
        flushed: bool,
    ) -> Result<Option<Decision>, Error> {
        if row.unknown.is_empty() {
            return Ok(None);
        }
        let schema = self.schema(row.table)?.clone();
        let key = row.key(&schema);
        let unknown = std::mem::take(&mut row.unknown);
        for &shard in shards {
            if let Some(buffered) = self.batcher.find(shard, &key)
                && buffered.unknown.is_empty()
                && !buffered.is_delete(&schema)
            {
                for &i in &unknown {
                    row.cells[i] = buffered.cells[i].clone();
                }
                return Ok(None);
            }
        }
        if !flushed {
            // A newer value may be on its way to the shard (cut from the buffer, not yet
            // acknowledged): read what is stored only once it is there.
            row.unknown = unknown;
            return Ok(Some(Decision::NeedsFlush));
        }
        for &shard in shards {
            if let Some(cells) = self.lookups.stored_row(shard, &schema, &key.1).await? {
                for &i in &unknown {
                    row.cells[i] = cells[i].clone();
                }
                return Ok(None);
            }
        }
        let mut from_postgres = HashMap::new();
        for &i in &unknown {
            let column = &schema.columns[i];
            match self.lookups.column_in_postgres(row.table, &key.1, &column.name).await? {
                Some(value) => {
                    from_postgres.insert(i, value);
                }
                None => {
                    return Ok(Some(Decision::Park(ParkReason::ToastValueUnknown(
                        column.name.clone(),
                    ))));
                }
            }
        }
        for (i, value) in from_postgres {
            row.cells[i] = match (value, schema.columns[i].ty) {
                (None, _) => Cell::Null,
                (Some(text), ChType::Str) => Cell::Str(text),
                (Some(text), ChType::Float) => text.parse().map_or(Cell::Null, Cell::Float),
                (Some(text), ChType::Int | ChType::DateTime) => {
                    text.parse().map_or(Cell::Null, Cell::Int)
                }
                (Some(text), ChType::UInt) => text.parse().map_or(Cell::Null, Cell::UInt),
            };
        }
        Ok(None)
    }
}
