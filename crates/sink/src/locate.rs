//! Where a scorecard lives: its shard, fields and conversation, from the caches, then the shards,
//! then (for a child whose card no shard holds) PostgreSQL.
//!
//! Every card change the sink applies updates the cache; a miss reads the card's newest row
//! across shards (a live row wins a tie with a delete marker of the same version: that is a card
//! that moved). PostgreSQL is the last resort, read-only: a sink started mid-stream can meet a
//! child whose card event it has not seen and no shard holds (e.g. the card's insert is parked);
//! the card's own event, when it is applied, has the final say. [`Locator::prefetch`] warms the
//! caches for a whole poll batch with one batched lookup per shard.
//!
//! Two caches, two kinds of answer ([`crate::cache`]):
//! - which shard holds a conversation: the other pipeline's data, asked of every shard and
//!   trusted for `sink.conversation_cache_ttl_ms` (10 minutes by default), then asked again. A
//!   conversation several shards hold routes to the lowest of them ([`crate::lookup`]) and is
//!   reported ([`crate::split`]).
//! - where a scorecard is: what this sink wrote or read on the shards; it does not expire.
//!
//! The conversation's shard is only ever used to *place* a card change ([`Locator::place`]).
//! A card's children, and a delete, go where the card's state says it is, never where its
//! conversation is now. So when an expired answer comes back different (the conversation was
//! moved, or a copy appeared on a lower shard), nothing already stored changes shard until the
//! card's next change, which the plan then carries out as a move of the card with its children
//! ([`crate::plan::CardPlan::Move`]).

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use scoresync_event::{ChangeEvent, ScorecardKey, SourceTable};

use crate::cache::{Caches, CardState, ConversationKey};
use crate::error::Error;
use crate::lookup::{FoundConversations, Lookups, StoredCard};
use crate::park::ParkReason;
use crate::plan::{Placement, Wait};
use crate::route::{CardFields, Conversation, Route};
use crate::split::SplitReport;
use crate::stats::SinkStats;

/// The caches and lookups that say where scorecards live.
pub(crate) struct Locator {
    shards: usize,
    /// ClickHouse and PostgreSQL lookups (also used for the rows a move copies).
    pub(crate) lookups: Lookups,
    caches: Caches,
    /// Scorecards the last prefetch found on no shard (spares a lookup per event).
    absent: HashSet<ScorecardKey>,
    /// Conversations found on several shards.
    split: SplitReport,
}

/// A card's state as the shards hold it.
fn stored_state(card: &StoredCard, conversation: Option<Conversation>) -> CardState {
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

/// The conversation key of a routable conversation scorecard.
fn conversation_key(key: &ScorecardKey, id: &str) -> ConversationKey {
    (key.customer_id.clone(), key.profile_id.clone(), id.to_owned())
}

impl Locator {
    /// A locator over `shards` shards with caches of `cache_entries` each, conversation answers
    /// kept `conversation_ttl`; it reports split conversations into `stats`.
    pub(crate) fn new(
        shards: usize,
        lookups: Lookups,
        cache_entries: usize,
        conversation_ttl: Duration,
        stats: Arc<SinkStats>,
    ) -> Self {
        Locator {
            shards,
            lookups,
            caches: Caches::new(cache_entries, conversation_ttl),
            absent: HashSet::new(),
            split: SplitReport::new(stats),
        }
    }

    /// Records the state a change this sink applied left the card in.
    pub(crate) fn remember(&mut self, key: ScorecardKey, state: CardState) {
        self.caches.cards.insert(key, state);
    }

    /// Forgets which scorecards the last prefetch found on no shard (after a flush they may be).
    pub(crate) fn forget_absent(&mut self) {
        self.absent.clear();
    }

    /// Forgets every cached scorecard (after a TRUNCATE, or when partitions changed owner).
    pub(crate) fn forget_cards(&mut self) {
        self.absent.clear();
        self.caches.cards.clear();
    }

    /// Where a scorecard lives now, from the cache or the shards.
    pub(crate) async fn card_state(
        &mut self,
        key: &ScorecardKey,
    ) -> Result<Option<CardState>, Error> {
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

    /// The scorecard a child belongs to: cache, shards, then PostgreSQL (routed like its card;
    /// also when the shards hold the card only as deleted and no event of this run said so).
    /// A card PostgreSQL has but that can never be routed makes the child poison (it follows its
    /// card to the dead-letter topic); a card known nowhere, or whose conversation is on no shard
    /// yet, makes it wait.
    pub(crate) async fn card_for_child(
        &mut self,
        key: &ScorecardKey,
    ) -> Result<Result<CardState, Wait>, Error> {
        let known = self.card_state(key).await?;
        // A card the shards hold only as deleted may have moved to a shard that lost it (a
        // replay after a shard loss): PostgreSQL says where it lives now, if it lives.
        if let Some(state) = &known
            && !(state.deleted && state.from_shards)
        {
            return Ok(Ok(state.clone()));
        }
        let Some(fields) = self.lookups.card_in_postgres(key).await? else {
            return Ok(known.ok_or_else(|| {
                Wait::Park(ParkReason::ScorecardUnknown(key.scorecard_id.clone()))
            }));
        };
        Ok(match self.place(key, &fields).await? {
            // Not cached: the card's own event, when applied, decides its version and state.
            Placement::Routed { shard, conversation } => Ok(CardState {
                version: 0,
                seq: 0,
                fields,
                shard,
                conversation,
                deleted: false,
                from_shards: false,
            }),
            Placement::NotYet(reason) => Err(Wait::Park(reason)),
            Placement::Never(error) => Err(Wait::Poison(format!(
                "its scorecard {} cannot be routed: {error}",
                key.scorecard_id
            ))),
        })
    }

    /// Where a scorecard `key` with these fields routes now.
    pub(crate) async fn place(
        &mut self,
        key: &ScorecardKey,
        fields: &CardFields,
    ) -> Result<Placement, Error> {
        Ok(match fields.route(self.shards) {
            Err(err) => Placement::Never(err.to_string()),
            Ok(Route::Process(shard)) => Placement::Routed { shard, conversation: None },
            Ok(Route::Conversation(id)) => match self.conversation(key, &id).await? {
                Some(c) => Placement::Routed { shard: c.shard, conversation: Some(c) },
                None => Placement::NotYet(ParkReason::ConversationNotFound(id)),
            },
        })
    }

    /// The conversation `id` of the scorecard `key` (cache, then every shard).
    async fn conversation(
        &mut self,
        key: &ScorecardKey,
        id: &str,
    ) -> Result<Option<Conversation>, Error> {
        let ckey = conversation_key(key, id);
        if let Some(c) = self.caches.conversations.get(&ckey) {
            return Ok(Some(c.clone()));
        }
        let found = self.lookups.conversations(std::slice::from_ref(&ckey)).await?;
        let conversation = found.routed.get(&ckey).cloned();
        self.remember_conversations(found);
        Ok(conversation)
    }

    /// Caches the conversations a lookup found and reports those several shards hold.
    fn remember_conversations(&mut self, found: FoundConversations) {
        for (key, shards) in &found.split {
            self.split.found(key, shards);
        }
        for (key, conversation) in found.routed {
            self.caches.conversations.insert(key, conversation);
        }
    }

    /// Warms the caches for a batch of events with one batched lookup per shard: the
    /// scorecards of every event and the conversations of conversation scorecards. Failures are
    /// left to the per-event lookups (which park when a shard is away).
    pub(crate) async fn prefetch<'a>(&mut self, events: impl IntoIterator<Item = &'a ChangeEvent>) {
        self.absent.clear();
        let mut cards = BTreeSet::new();
        let mut conversations = BTreeSet::new();
        for event in events {
            let Some(key) = ScorecardKey::of_event(event) else { continue };
            if event.table == SourceTable::Scorecards.name()
                && let Some(new) = &event.new_row
            {
                let fields = CardFields::from_row(new);
                if let (false, Some(id)) = (fields.is_process(), &fields.conversation_id) {
                    conversations.insert(conversation_key(&key, id));
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
                conversations.insert(conversation_key(key, id));
            }
        }
        self.prefetch_conversations(conversations).await;
        for key in keys {
            let Some(card) = stored.get(&key) else {
                self.absent.insert(key);
                continue;
            };
            let conversation = match (&card.fields.conversation_id, card.fields.is_process()) {
                (Some(id), false) if !card.deleted => {
                    self.caches.conversations.get(&conversation_key(&key, id)).cloned()
                }
                _ => None,
            };
            self.caches.cards.insert(key, stored_state(card, conversation));
        }
    }

    async fn prefetch_conversations(&mut self, keys: BTreeSet<ConversationKey>) {
        let wanted: Vec<ConversationKey> =
            keys.into_iter().filter(|k| self.caches.conversations.get(k).is_none()).collect();
        if wanted.is_empty() {
            return;
        }
        match self.lookups.conversations(&wanted).await {
            Ok(found) => self.remember_conversations(found),
            Err(error) => tracing::debug!(%error, "prefetch of conversations failed"),
        }
    }
}
