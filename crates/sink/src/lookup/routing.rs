//! Where things are: which shard holds each conversation, and each scorecard's newest row
//! across shards. Batched (one `IN` list per chunk of keys, one bound tuple per key) and decoded
//! into row structs.
//!
//! Conversations are read with `FINAL`: `conversations` is a `ReplacingMergeTree` without a
//! version column (schemas/clickhouse/001_conversations.sql), so until its parts merge a shard can
//! hold several rows of one conversation, and `FINAL` gives the one inserted last (the other
//! pipeline's correction). The table has no deleted flag, so there is none to filter on.
//!
//! A conversation that several shards hold (the other pipeline's mistake) routes to the
//! **lowest shard index** holding it, with that shard's start time and language; the lookup
//! also returns every such conversation with its shards ([`FoundConversations::split`]) for the
//! report ([`crate::split`]). Why the lowest: the answer is a function of what the
//! `conversations` tables hold now and nothing else (not of which shard answered first, of this
//! sink's history, or of a clock), so every sink, every restart, a replay that rebuilds
//! ClickHouse and the test oracle all route the conversation to the same shard; and shards are
//! added at the end of `clickhouse.shards`, so a copy written by mistake on a new shard never
//! takes the conversation away from the older shard where its scorecards already are.

use std::collections::{BTreeMap, HashMap};

use clickhouse::query::Query;
use clickhouse::sql::Identifier;
use scoresync_event::ScorecardKey;

use super::{Lookups, StoredCard, placeholders};
use crate::cache::ConversationKey;
use crate::error::Error;
use crate::route::{CardFields, Conversation};
use crate::shard::ShardIndex;

/// Most keys in one `IN (...)` list.
pub(crate) const CHUNK: usize = 500;

/// A conversation as [`Lookups::conversations`] selects it. RowBinary is positional: the fields
/// follow the SELECT list, with its wire types.
#[derive(clickhouse::Row, serde::Deserialize)]
struct ConversationRow {
    customer_id: String,
    profile_id: String,
    conversation_id: String,
    /// `conversation_start_time` as Unix seconds.
    start_time: i64,
    language_code: String,
}

/// A scorecard as [`Lookups::cards`] selects it (positional, as [`ConversationRow`]). Every
/// field is cast in the SELECT to the type read here, whatever its column's exact type.
#[derive(clickhouse::Row, serde::Deserialize)]
struct CardRow {
    customer_id: String,
    profile_id: String,
    scorecard_id: String,
    scorecard_type: Option<i64>,
    template_id: Option<String>,
    template_revision: Option<String>,
    agent_user_id: Option<String>,
    conversation_id: Option<String>,
    process_interaction_at: Option<i64>,
    version: u64,
    deleted: u8,
}

/// What [`Lookups::conversations`] found.
#[derive(Debug, Default)]
pub(crate) struct FoundConversations {
    /// Where each conversation found routes: the lowest shard holding it, with its fields there.
    pub(crate) routed: HashMap<ConversationKey, Conversation>,
    /// The conversations more than one shard holds, each with those shards (ascending).
    pub(crate) split: BTreeMap<ConversationKey, Vec<ShardIndex>>,
}

impl FoundConversations {
    /// Adds a conversation as `conversation.shard` holds it: the lowest shard wins, whatever
    /// order the shards answer in, and a second shard makes the conversation split.
    fn add(&mut self, key: ConversationKey, conversation: Conversation) {
        use std::collections::hash_map::Entry;
        match self.routed.entry(key) {
            Entry::Vacant(entry) => {
                entry.insert(conversation);
            }
            Entry::Occupied(mut entry) => {
                let (kept, other) = (entry.get().shard, conversation.shard);
                if kept == other {
                    return;
                }
                let shards = self.split.entry(entry.key().clone()).or_insert_with(|| vec![kept]);
                if !shards.contains(&other) {
                    shards.push(other);
                    shards.sort_unstable();
                }
                if other < kept {
                    entry.insert(conversation);
                }
            }
        }
    }
}

impl Lookups {
    /// Which shard holds each conversation (`FINAL`, every shard; the lowest shard when
    /// several do), and which conversations several shards hold.
    pub(crate) async fn conversations(
        &self,
        keys: &[ConversationKey],
    ) -> Result<FoundConversations, Error> {
        let mut found = FoundConversations::default();
        for chunk in keys.chunks(CHUNK) {
            for (shard, client) in self.shards.iter().enumerate() {
                let query = conversations_query(client, &self.database, chunk);
                for row in self.fetch::<ConversationRow>(shard, query).await? {
                    let key = (row.customer_id, row.profile_id, row.conversation_id);
                    let conversation = Conversation {
                        shard,
                        start_time: row.start_time,
                        language_code: row.language_code,
                    };
                    found.add(key, conversation);
                }
            }
        }
        Ok(found)
    }

    /// Where each scorecard's newest row is, across shards (a live row wins a tie with a delete
    /// marker of the same version: that is a card that moved).
    pub(crate) async fn cards(
        &self,
        keys: &[ScorecardKey],
    ) -> Result<HashMap<ScorecardKey, StoredCard>, Error> {
        let mut found = HashMap::new();
        for chunk in keys.chunks(CHUNK) {
            for (shard, client) in self.shards.iter().enumerate() {
                let query = cards_query(client, &self.database, chunk);
                for row in self.fetch::<CardRow>(shard, query).await? {
                    let key = ScorecardKey {
                        customer_id: row.customer_id,
                        profile_id: row.profile_id,
                        scorecard_id: row.scorecard_id,
                    };
                    let card = StoredCard {
                        shard,
                        version: row.version,
                        deleted: row.deleted == 1,
                        fields: CardFields {
                            scorecard_type: row.scorecard_type,
                            template_id: row.template_id,
                            template_revision: row.template_revision,
                            agent_user_id: row.agent_user_id,
                            conversation_id: row.conversation_id,
                            process_interaction_at: row.process_interaction_at,
                        },
                    };
                    keep_newest(&mut found, key, card);
                }
            }
        }
        Ok(found)
    }
}

/// The newest rows (`FINAL`) of the conversations with the keys of `chunk`, one bound tuple per
/// key.
fn conversations_query(
    client: &clickhouse::Client,
    database: &str,
    chunk: &[ConversationKey],
) -> Query {
    let sql = format!(
        "SELECT toString(customer_id), toString(profile_id), toString(conversation_id), \
         toInt64(toUnixTimestamp(conversation_start_time)), toString(language_code) \
         FROM ?.conversations FINAL \
         WHERE (customer_id, profile_id, conversation_id) IN ({})",
        placeholders(chunk.len())
    );
    chunk.iter().fold(client.query(&sql).bind(Identifier(database)), |query, key| query.bind(key))
}

/// The newest rows (`FINAL`, live or not) of the scorecards of `chunk`, one bound tuple per key.
fn cards_query(client: &clickhouse::Client, database: &str, chunk: &[ScorecardKey]) -> Query {
    let sql = format!(
        "SELECT customer_id, profile_id, scorecard_id, toNullable(toInt64(scorecard_type)), \
         toNullable(template_id), toNullable(template_revision), toNullable(agent_user_id), \
         toNullable(conversation_id), toNullable(toInt64(process_interaction_at)), \
         toUInt64(_version), toUInt8(_deleted) \
         FROM ?.scorecards FINAL WHERE (customer_id, profile_id, scorecard_id) IN ({})",
        placeholders(chunk.len())
    );
    chunk.iter().fold(client.query(&sql).bind(Identifier(database)), |query, key| {
        query.bind((&key.customer_id, &key.profile_id, &key.scorecard_id))
    })
}

/// Keeps a scorecard's newest row: greater version, then a live row over a delete marker.
fn keep_newest(found: &mut HashMap<ScorecardKey, StoredCard>, key: ScorecardKey, card: StoredCard) {
    let newer = found
        .get(&key)
        .is_none_or(|kept| (card.version, !card.deleted) > (kept.version, !kept.deleted));
    if newer {
        found.insert(key, card);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sql(query: &Query) -> String {
        query.sql_display().to_string()
    }

    #[test]
    fn in_lists_bind_one_escaped_tuple_per_key() {
        let keys = [
            ("c".to_owned(), "p".to_owned(), "it's".to_owned()),
            ("a?".to_owned(), "b\\".to_owned(), "x`".to_owned()),
        ];
        assert_eq!(
            sql(&conversations_query(&clickhouse::Client::default(), "db", &keys)),
            "SELECT toString(customer_id), toString(profile_id), toString(conversation_id), \
             toInt64(toUnixTimestamp(conversation_start_time)), toString(language_code) \
             FROM `db`.conversations FINAL WHERE (customer_id, profile_id, conversation_id) \
             IN (('c','p','it\\'s'), ('a?','b\\\\','x\\`'))"
        );
        let card = ScorecardKey {
            customer_id: "c".into(),
            profile_id: "p".into(),
            scorecard_id: "card'); DROP TABLE x; --".into(),
        };
        let text = sql(&cards_query(&clickhouse::Client::default(), "my db", &[card]));
        assert!(text.contains("FROM `my db`.scorecards FINAL"), "{text}");
        assert!(text.ends_with("IN (('c','p','card\\'); DROP TABLE x; --'))"), "{text}");
    }

    #[test]
    fn a_conversation_on_several_shards_routes_to_the_lowest_and_is_reported_split() {
        let key = |id: &str| -> ConversationKey { ("c".into(), "p".into(), id.into()) };
        let at = |shard| Conversation {
            shard,
            start_time: 100 + shard as i64,
            language_code: "en".into(),
        };
        for order in [[2, 0, 1], [0, 1, 2], [1, 2, 0], [2, 1, 0]] {
            let mut found = FoundConversations::default();
            for shard in order {
                found.add(key("split"), at(shard));
            }
            found.add(key("single"), at(1));
            found.add(key("single"), at(1));
            assert_eq!(
                found.routed[&key("split")],
                at(0),
                "{order:?}: the lowest, with its fields"
            );
            assert_eq!(found.split[&key("split")], vec![0, 1, 2], "{order:?}");
            assert_eq!(found.routed[&key("single")].shard, 1);
            assert!(!found.split.contains_key(&key("single")), "one shard, two rows: not split");
        }
        let mut two = FoundConversations::default();
        two.add(key("x"), at(3));
        two.add(key("x"), at(1));
        assert_eq!((two.routed[&key("x")].shard, &two.split[&key("x")]), (1, &vec![1, 3]));
    }

    #[test]
    fn the_newest_card_row_wins_and_a_live_row_wins_a_tie() {
        let key = ScorecardKey {
            customer_id: "c".into(),
            profile_id: "p".into(),
            scorecard_id: "card".into(),
        };
        let card = |shard, version, deleted| StoredCard {
            shard,
            version,
            deleted,
            fields: CardFields::default(),
        };
        let cases = [
            (vec![card(0, 5, false), card(1, 7, false)], 1),
            (vec![card(0, 7, false), card(1, 5, false)], 0),
            (vec![card(0, 7, true), card(1, 7, false)], 1),
            (vec![card(0, 7, false), card(1, 7, true)], 0),
            (vec![card(0, 8, true), card(1, 7, false)], 0),
        ];
        for (rows, winner) in cases {
            let mut found = HashMap::new();
            for row in rows.clone() {
                keep_newest(&mut found, key.clone(), row);
            }
            assert_eq!(found[&key].shard, winner, "{rows:?}");
        }
    }
}
