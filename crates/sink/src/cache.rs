//! Bounded caches of what routing needs: where each scorecard lives with its fields, and which
//! shard holds each conversation. Past the bound the least recently used entry is evicted (the
//! `lru` crate); a miss only costs a lookup (ClickHouse, then PostgreSQL).
//!
//! Only the conversation answers expire ([`Expiring`], `sink.conversation_cache_ttl_ms`): the
//! `conversations` tables belong to another pipeline, which can add, correct or duplicate a
//! conversation at any time, so an answer is trusted for a while and then asked again. A
//! scorecard's entry says where its rows *are* (this sink wrote them there, or read them there);
//! it never expires by age, so a card moves only by a planned move ([`crate::plan`]), never
//! because an answer aged.
//!
//! Expiry is hand-written on top of `lru` (an entry carries the instant it was stored; a read past
//! its time-to-live drops it): a dozen lines with an injectable clock, where a TTL cache crate
//! (moka) would bring a concurrent cache, its own eviction policy and background maintenance to
//! a map that one task owns.

use std::hash::Hash;
use std::num::NonZeroUsize;
use std::time::{Duration, Instant};

use lru::LruCache;

use scoresync_event::ScorecardKey;

use crate::route::{CardFields, Conversation};
use crate::shard::ShardIndex;

/// A map that forgets its least recently used entries past `capacity`.
#[derive(Debug)]
pub struct Bounded<K: Hash + Eq, V> {
    map: LruCache<K, V>,
}

impl<K: Hash + Eq, V> Bounded<K, V> {
    /// An empty cache holding at most `capacity` entries (at least one); memory grows with use.
    pub fn new(capacity: usize) -> Self {
        Bounded { map: LruCache::sparse(NonZeroUsize::new(capacity).unwrap_or(NonZeroUsize::MIN)) }
    }

    /// The entry for `key`, marked as recently used.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    /// The entry for `key`, not marked as used.
    fn peek(&self, key: &K) -> Option<&V> {
        self.map.peek(key)
    }

    /// Inserts or replaces, evicting the least recently used entry when full.
    pub fn insert(&mut self, key: K, value: V) {
        self.map.put(key, value);
    }

    /// Forgets `key`.
    fn remove(&mut self, key: &K) {
        self.map.pop(key);
    }

    /// Forgets every entry (the bound stays).
    pub fn clear(&mut self) {
        self.map.clear();
    }

    /// The most entries held.
    #[cfg(test)]
    pub fn capacity(&self) -> usize {
        self.map.cap().get()
    }

    /// Entries held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// True when empty.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }
}

/// A [`Bounded`] map whose entries are forgotten `ttl` after they were stored (reading an entry
/// does not extend its life: an answer is asked again `ttl` after it was given).
#[derive(Debug)]
pub struct Expiring<K: Hash + Eq, V> {
    map: Bounded<K, (Instant, V)>,
    ttl: Duration,
}

impl<K: Hash + Eq, V> Expiring<K, V> {
    /// An empty cache of at most `capacity` entries, each kept at most `ttl`.
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Expiring { map: Bounded::new(capacity), ttl }
    }

    /// The entry for `key` unless it expired.
    pub fn get(&mut self, key: &K) -> Option<&V> {
        self.get_at(key, Instant::now())
    }

    /// Stores `value` for `key`, its life starting now.
    pub fn insert(&mut self, key: K, value: V) {
        self.insert_at(key, value, Instant::now());
    }

    /// The entry for `key` as of `now`: an expired one is dropped.
    fn get_at(&mut self, key: &K, now: Instant) -> Option<&V> {
        let stored = self.map.peek(key).map(|(at, _)| *at)?;
        if now.saturating_duration_since(stored) >= self.ttl {
            self.map.remove(key);
            return None;
        }
        self.map.get(key).map(|(_, value)| value)
    }

    fn insert_at(&mut self, key: K, value: V, now: Instant) {
        self.map.insert(key, (now, value));
    }
}

/// What the sink knows about a scorecard.
#[derive(Clone, Debug, PartialEq)]
pub struct CardState {
    /// Version of the change that set this state.
    pub version: u64,
    /// Position of that change in its transaction.
    pub seq: u32,
    /// Routing and denormalized fields.
    pub fields: CardFields,
    /// The shard its rows live on.
    pub shard: ShardIndex,
    /// Its conversation (conversation scorecards).
    pub conversation: Option<Conversation>,
    /// True after a delete (children still route to `shard`).
    pub deleted: bool,
    /// True when read back from the shards, false when set by a change this sink applied.
    pub from_shards: bool,
}

impl CardState {
    /// The state a change this sink applied leaves the card in.
    pub fn applied(
        (version, seq): (u64, u32),
        fields: CardFields,
        shard: ShardIndex,
        conversation: Option<Conversation>,
        deleted: bool,
    ) -> CardState {
        CardState { version, seq, fields, shard, conversation, deleted, from_shards: false }
    }
}

/// A conversation's identity.
pub type ConversationKey = (String, String, String);

/// The routing caches.
#[derive(Debug)]
pub struct Caches {
    /// Scorecards: where their rows are (never expire by age).
    pub cards: Bounded<ScorecardKey, CardState>,
    /// Conversations: which shard holds them (expire `conversation_ttl` after the lookup).
    pub conversations: Expiring<ConversationKey, Conversation>,
}

impl Caches {
    /// Caches of `capacity` entries each; conversation answers live `conversation_ttl`.
    pub fn new(capacity: usize, conversation_ttl: Duration) -> Self {
        Caches {
            cards: Bounded::new(capacity),
            conversations: Expiring::new(capacity, conversation_ttl),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used_beyond_capacity() {
        let mut c = Bounded::new(2);
        c.insert("a", 1);
        c.insert("b", 2);
        assert_eq!(c.get(&"a"), Some(&1), "a is now the most recently used");
        c.insert("c", 3);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&"b"), None, "least recently used goes first");
        assert_eq!(c.get(&"a"), Some(&1));
        assert_eq!(c.get(&"c"), Some(&3));
        for i in 0..100 {
            c.insert("c", i);
        }
        assert_eq!(c.get(&"c"), Some(&99));
        assert_eq!(c.len(), 2);
        assert_eq!(c.capacity(), 2);
        c.clear();
        assert!(c.is_empty());
        assert_eq!(c.capacity(), 2, "clearing keeps the bound");
        assert_eq!(Bounded::<u8, u8>::new(0).capacity(), 1);
    }

    #[test]
    fn conversation_answers_expire_a_ttl_after_they_were_stored() {
        let ttl = Duration::from_secs(600);
        let start = Instant::now();
        let at = |secs| start + Duration::from_secs(secs);
        let mut c = Expiring::new(10, ttl);
        c.insert_at("conv", 0_usize, start);
        assert_eq!(c.get_at(&"conv", at(0)), Some(&0));
        assert_eq!(c.get_at(&"conv", at(599)), Some(&0), "reads do not extend its life");
        assert_eq!(c.get_at(&"conv", at(600)), None, "expired at the TTL");
        assert_eq!(c.map.len(), 0, "an expired entry is dropped when read");
        assert_eq!(c.get_at(&"conv", at(1)), None, "and stays gone");
        c.insert_at("conv", 1, at(600));
        assert_eq!(c.get_at(&"conv", at(1199)), Some(&1), "a new answer starts a new life");
        assert_eq!(c.get_at(&"conv", at(1200)), None);
        c.insert_at("a", 2, at(10));
        assert_eq!(c.get_at(&"a", at(5)), Some(&2), "read before it was stored: kept");
        let mut bounded = Expiring::new(1, ttl);
        bounded.insert_at("a", 1, start);
        bounded.insert_at("b", 2, start);
        assert_eq!(bounded.get_at(&"a", start), None, "the bound still holds");
        assert_eq!(bounded.get_at(&"b", start), Some(&2));
    }

    #[test]
    fn only_conversations_expire() {
        let mut caches = Caches::new(10, Duration::ZERO);
        let card = ScorecardKey {
            customer_id: "c".into(),
            profile_id: "p".into(),
            scorecard_id: "s".into(),
        };
        let conversation = Conversation { shard: 1, start_time: 0, language_code: "en".into() };
        let state =
            CardState::applied((7, 0), CardFields::default(), 1, Some(conversation.clone()), false);
        caches.cards.insert(card.clone(), state.clone());
        let key: ConversationKey = ("c".into(), "p".into(), "conv".into());
        caches.conversations.insert(key.clone(), conversation);
        assert_eq!(caches.conversations.get(&key), None, "a zero TTL keeps nothing");
        assert_eq!(caches.cards.get(&card), Some(&state), "where the card is stays known");
    }
}
