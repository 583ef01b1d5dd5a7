//! Bounded caches of what routing needs: where each scorecard lives with its fields, and which
//! shard holds each conversation. Past the bound the least recently used entry is evicted (the
//! `lru` crate); a miss only costs a lookup (ClickHouse, then PostgreSQL).

use std::hash::Hash;
use std::num::NonZeroUsize;

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

    /// Inserts or replaces, evicting the least recently used entry when full.
    pub fn insert(&mut self, key: K, value: V) {
        self.map.put(key, value);
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
    /// Scorecards.
    pub cards: Bounded<ScorecardKey, CardState>,
    /// Conversations.
    pub conversations: Bounded<ConversationKey, Conversation>,
}

impl Caches {
    /// Caches of `capacity` entries each.
    pub fn new(capacity: usize) -> Self {
        Caches { cards: Bounded::new(capacity), conversations: Bounded::new(capacity) }
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
}
