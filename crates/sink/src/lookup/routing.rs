//! Where things are: which shard holds each conversation, and each scorecard's newest row
//! across shards. Batched (one `IN` list per chunk of keys, one bound tuple per key) and decoded
//! into row structs.

use std::collections::HashMap;

use clickhouse::query::Query;
use clickhouse::sql::Identifier;
use scoresync_event::ScorecardKey;

use super::{Lookups, StoredCard, placeholders};
use crate::cache::ConversationKey;
use crate::error::Error;
use crate::route::{CardFields, Conversation};

/// Most keys in one `IN (...)` list.
const CHUNK: usize = 500;

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

impl Lookups {
    /// Which shard holds each conversation. A conversation that several shards hold (the other
    /// pipeline's mistake) resolves to the lowest shard index, so every sink and every run
    /// routes it to the same shard.
    pub(crate) async fn conversations(
        &self,
        keys: &[ConversationKey],
    ) -> Result<HashMap<ConversationKey, Conversation>, Error> {
        let mut found = HashMap::new();
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
                    keep_lowest_shard(&mut found, key, conversation);
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

/// Conversations with the keys of `chunk`, one bound tuple per key.
fn conversations_query(
    client: &clickhouse::Client,
    database: &str,
    chunk: &[ConversationKey],
) -> Query {
    let sql = format!(
        "SELECT toString(customer_id), toString(profile_id), toString(conversation_id), \
         toInt64(toUnixTimestamp(conversation_start_time)), toString(language_code) \
         FROM ?.conversations WHERE (customer_id, profile_id, conversation_id) IN ({})",
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

/// Keeps, for a conversation several shards hold, the one on the lowest shard.
fn keep_lowest_shard(
    found: &mut HashMap<ConversationKey, Conversation>,
    key: ConversationKey,
    conversation: Conversation,
) {
    if let Some(kept) = found.get(&key) {
        if kept.shard != conversation.shard {
            tracing::warn!(
                shards = ?(kept.shard, conversation.shard),
                "a conversation is on several shards; routing uses the lowest"
            );
        }
        if kept.shard <= conversation.shard {
            return;
        }
    }
    found.insert(key, conversation);
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
             FROM `db`.conversations WHERE (customer_id, profile_id, conversation_id) \
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
    fn a_conversation_on_several_shards_resolves_to_the_lowest() {
        let key: ConversationKey = ("c".into(), "p".into(), "conv".into());
        let at = |shard| Conversation { shard, start_time: 0, language_code: "en".into() };
        for order in [[2, 0, 1], [0, 1, 2], [1, 2, 0]] {
            let mut found = HashMap::new();
            for shard in order {
                keep_lowest_shard(&mut found, key.clone(), at(shard));
            }
            assert_eq!(found[&key].shard, 0, "{order:?}");
        }
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
