//! Bounded caches of what routing needs: where each scorecard lives with its fields, and which
//! shard holds each conversation. Entries are evicted oldest-first past the bound; a miss only
//! costs a lookup (ClickHouse, then PostgreSQL).

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;

use scoresync_event::ScorecardKey;

use crate::route::{CardFields, Conversation};
use crate::shard::ShardIndex;

/// A map that forgets its oldest entries past `capacity`.
#[derive(Debug)]
pub struct Bounded<K, V> {
    capacity: usize,
    map: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K: Clone + Eq + Hash, V> Bounded<K, V> {
    /// An empty cache holding at most `capacity` entries.
    pub fn new(capacity: usize) -> Self {
        Bounded { capacity: capacity.max(1), map: HashMap::new(), order: VecDeque::new() }
    }

    /// The entry for `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    /// Inserts or replaces.
    pub fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_none() {
            self.order.push_back(key);
        }
        while self.map.len() > self.capacity {
            match self.order.pop_front() {
                Some(old) => {
                    self.map.remove(&old);
                }
                None => break,
            }
        }
        // Keys replaced in place leave stale order entries; trim them when they pile up.
        if self.order.len() > self.capacity * 2 {
            let map = &self.map;
            self.order.retain(|k| map.contains_key(k));
        }
    }

    /// The most entries held.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Entries held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.map.len()
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

    /// The bound of the scorecard cache.
    pub fn cards_capacity(&self) -> usize {
        self.cards.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_oldest_beyond_capacity() {
        let mut c = Bounded::new(2);
        c.insert("a", 1);
        c.insert("b", 2);
        c.insert("a", 3);
        c.insert("c", 4);
        assert_eq!(c.len(), 2);
        assert_eq!(c.get(&"a"), None, "oldest inserted goes first");
        assert_eq!(c.get(&"c"), Some(&4));
        for i in 0..100 {
            c.insert("b", i);
        }
        assert_eq!(c.get(&"b"), Some(&99));
        assert!(c.len() <= 2);
    }
}
