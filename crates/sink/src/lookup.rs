//! Lookups the sink makes when its caches and buffers do not know something: which shard holds a
//! conversation, where a scorecard lives and with what fields, the stored value of an unchanged
//! TOAST column, the children of a scorecard that moves. ClickHouse first (every shard, batched),
//! PostgreSQL read-only as the last resort for scorecards and TOAST values.
//!
//! Why PostgreSQL at all: a sink that starts mid-stream (replay from an offset, a restart) can
//! meet a score whose scorecard event it never saw and that no shard holds yet (for example, the
//! card's insert is parked). PostgreSQL has the card's current fields; the scorecard's own event,
//! when it is applied, has the final say. Rows read from PostgreSQL are never written as such.

use std::collections::HashMap;

use scoresync_event::{ScorecardKey, SourceTable};

use crate::cache::ConversationKey;
use crate::error::Error;
use crate::route::{CardFields, Conversation};
use crate::rows::parse_tsv_line;
use crate::shard::ShardIndex;
use crate::table::{Cell, ChColumn, ChType, TableSchema};

/// Most keys in one `IN (...)` list.
const CHUNK: usize = 500;
/// Longest a lookup or statement may take before the shard counts as unavailable.
pub const LOOKUP_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// A SQL string literal (ClickHouse and PostgreSQL both accept backslash and quote escapes in
/// this form; PostgreSQL via `E'...'`).
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A scorecard as the shards have it.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredCard {
    /// The shard holding its newest row.
    pub shard: ShardIndex,
    /// That row's version.
    pub version: u64,
    /// True when the newest row is a delete marker.
    pub deleted: bool,
    /// Its fields (empty for a bare delete marker).
    pub fields: CardFields,
}

/// ClickHouse (and optionally PostgreSQL) lookups.
pub struct Lookups {
    shards: Vec<clickhouse::Client>,
    database: String,
    pg: Option<tokio_postgres::Client>,
    /// Per shard: after a failed request, lookups fail fast until this instant, so a shard that
    /// hangs costs one timeout per cool-down rather than one per event (the events park).
    cooling: std::sync::Mutex<Vec<Option<std::time::Instant>>>,
}

/// How long a shard that failed a lookup is not asked again.
const COOL_DOWN: std::time::Duration = std::time::Duration::from_secs(5);

impl Lookups {
    /// Lookups over `shards`, with PostgreSQL when `pg` is given.
    pub fn new(
        shards: Vec<clickhouse::Client>,
        database: String,
        pg: Option<tokio_postgres::Client>,
    ) -> Self {
        let cooling = std::sync::Mutex::new(vec![None; shards.len()]);
        Lookups { shards, database, pg, cooling }
    }

    /// Fails fast while `shard` is cooling down after a failure.
    fn ready(&self, shard: ShardIndex, action: &str) -> Result<(), Error> {
        let cooling = self.cooling.lock().ok().and_then(|c| c.get(shard).copied().flatten());
        match cooling {
            Some(until) if std::time::Instant::now() < until => Err(Error::Timeout {
                shard,
                action: format!("{action} (not attempted: the shard failed a request moments ago)"),
            }),
            _ => Ok(()),
        }
    }

    /// Records the outcome of a request to `shard`: a failure starts a cool-down.
    fn outcome<T>(&self, shard: ShardIndex, result: Result<T, Error>) -> Result<T, Error> {
        if let Ok(mut cooling) = self.cooling.lock()
            && let Some(slot) = cooling.get_mut(shard)
        {
            *slot = match &result {
                Err(err) if err.is_transient() => Some(std::time::Instant::now() + COOL_DOWN),
                _ => None,
            };
        }
        result
    }

    /// The database holding the tables on every shard.
    pub fn database(&self) -> &str {
        &self.database
    }

    /// Runs a statement that returns nothing (INSERT ... SELECT) on one shard.
    pub async fn execute(&self, shard: ShardIndex, sql: &str) -> Result<(), Error> {
        self.ready(shard, "statement")?;
        let result =
            tokio::time::timeout(LOOKUP_TIMEOUT, self.shards[shard].query_raw(sql).execute())
                .await
                .map_err(|_| Error::Timeout { shard, action: "statement".into() })
                .and_then(|r| r.map_err(Error::shard(shard, "statement")));
        self.outcome(shard, result)
    }

    /// Runs a SELECT on one shard and returns its TabSeparated lines parsed for `columns`.
    pub async fn select(
        &self,
        shard: ShardIndex,
        sql: &str,
        columns: &[ChColumn],
    ) -> Result<Vec<Vec<Cell>>, Error> {
        self.ready(shard, "lookup")?;
        let fetched = async {
            let mut cursor = self.shards[shard]
                .query_raw(sql)
                .fetch_bytes("TabSeparated")
                .map_err(Error::shard(shard, "lookup"))?;
            tokio::time::timeout(LOOKUP_TIMEOUT, cursor.collect())
                .await
                .map_err(|_| Error::Timeout { shard, action: "lookup".into() })?
                .map_err(Error::shard(shard, "lookup"))
        };
        let bytes = self.outcome(shard, fetched.await)?;
        let text = String::from_utf8_lossy(&bytes);
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|line| {
                parse_tsv_line(columns, line).ok_or_else(|| Error::Unreadable {
                    shard,
                    what: format!("a lookup row with {} columns", columns.len()),
                })
            })
            .collect()
    }

    /// Which shard holds each conversation (first shard wins if several do).
    pub async fn conversations(
        &self,
        keys: &[ConversationKey],
    ) -> Result<HashMap<ConversationKey, Conversation>, Error> {
        let columns = [
            ChColumn::new("customer_id", "String"),
            ChColumn::new("profile_id", "String"),
            ChColumn::new("conversation_id", "String"),
            ChColumn::new("start", "Int64"),
            ChColumn::new("language_code", "String"),
        ];
        let mut found = HashMap::new();
        for chunk in keys.chunks(CHUNK) {
            let list: Vec<String> = chunk
                .iter()
                .map(|(c, p, id)| format!("({}, {}, {})", quote(c), quote(p), quote(id)))
                .collect();
            let sql = format!(
                "SELECT customer_id, profile_id, conversation_id, toInt64(toUnixTimestamp(conversation_start_time)), \
                 language_code FROM {}.conversations WHERE (customer_id, profile_id, conversation_id) IN ({})",
                self.database,
                list.join(", ")
            );
            for shard in 0..self.shards.len() {
                for row in self.select(shard, &sql, &columns).await? {
                    let [
                        Cell::Str(c),
                        Cell::Str(p),
                        Cell::Str(id),
                        Cell::Int(start),
                        Cell::Str(lang),
                    ] = &row[..]
                    else {
                        continue;
                    };
                    found.entry((c.clone(), p.clone(), id.clone())).or_insert(Conversation {
                        shard,
                        start_time: *start,
                        language_code: lang.clone(),
                    });
                }
            }
        }
        Ok(found)
    }

    /// Where each scorecard's newest row is, across shards (a live row wins a tie with a delete
    /// marker of the same version: that is a card that moved).
    pub async fn cards(
        &self,
        keys: &[ScorecardKey],
    ) -> Result<HashMap<ScorecardKey, StoredCard>, Error> {
        let columns = [
            ChColumn::new("customer_id", "String"),
            ChColumn::new("profile_id", "String"),
            ChColumn::new("scorecard_id", "String"),
            ChColumn::new("scorecard_type", "Nullable(Int64)"),
            ChColumn::new("template_id", "Nullable(String)"),
            ChColumn::new("template_revision", "Nullable(String)"),
            ChColumn::new("agent_user_id", "Nullable(String)"),
            ChColumn::new("conversation_id", "Nullable(String)"),
            ChColumn::new("process_interaction_at", "Nullable(Int64)"),
            ChColumn::new("_version", "UInt64"),
            ChColumn::new("_deleted", "UInt8"),
        ];
        let mut found: HashMap<ScorecardKey, StoredCard> = HashMap::new();
        for chunk in keys.chunks(CHUNK) {
            let list: Vec<String> = chunk
                .iter()
                .map(|k| {
                    format!(
                        "({}, {}, {})",
                        quote(&k.customer_id),
                        quote(&k.profile_id),
                        quote(&k.scorecard_id)
                    )
                })
                .collect();
            let sql = format!(
                "SELECT customer_id, profile_id, scorecard_id, scorecard_type, \
                 template_id, template_revision, agent_user_id, conversation_id, process_interaction_at, \
                 _version, _deleted FROM {}.scorecards FINAL \
                 WHERE (customer_id, profile_id, scorecard_id) IN ({})",
                self.database,
                list.join(", ")
            );
            for shard in 0..self.shards.len() {
                for row in self.select(shard, &sql, &columns).await? {
                    let text = |i: usize| match &row[i] {
                        Cell::Str(s) => Some(s.clone()),
                        _ => None,
                    };
                    let int = |i: usize| match row[i] {
                        Cell::Int(v) => Some(v),
                        _ => None,
                    };
                    let (Cell::UInt(version), Cell::UInt(deleted)) = (&row[9], &row[10]) else {
                        continue;
                    };
                    let key = ScorecardKey {
                        customer_id: text(0).unwrap_or_default(),
                        profile_id: text(1).unwrap_or_default(),
                        scorecard_id: text(2).unwrap_or_default(),
                    };
                    let candidate = StoredCard {
                        shard,
                        version: *version,
                        deleted: *deleted == 1,
                        fields: CardFields {
                            scorecard_type: int(3),
                            template_id: text(4),
                            template_revision: text(5),
                            agent_user_id: text(6),
                            conversation_id: text(7),
                            process_interaction_at: int(8),
                        },
                    };
                    let better = match found.get(&key) {
                        None => true,
                        Some(old) => {
                            (candidate.version, !candidate.deleted) > (old.version, !old.deleted)
                        }
                    };
                    if better {
                        found.insert(key, candidate);
                    }
                }
            }
        }
        Ok(found)
    }

    /// A scorecard's current fields in PostgreSQL, if it exists there (and PostgreSQL is configured).
    pub async fn card_in_postgres(&self, key: &ScorecardKey) -> Result<Option<CardFields>, Error> {
        let Some(pg) = &self.pg else { return Ok(None) };
        let row = pg
            .query_opt(
                "SELECT scorecard_type::bigint, template_id, template_revision, agent_user_id, conversation_id, \
                 (extract(epoch FROM process_interaction_at) * 1000000)::bigint \
                 FROM director.scorecards WHERE customer_id = $1 AND profile_id = $2 AND scorecard_id = $3",
                &[&key.customer_id, &key.profile_id, &key.scorecard_id],
            )
            .await
            .map_err(|source| Error::Postgres { context: "looking up a scorecard".into(), source })?;
        Ok(row.map(|r| CardFields {
            scorecard_type: r.get(0),
            template_id: r.get(1),
            template_revision: r.get(2),
            agent_user_id: r.get(3),
            conversation_id: r.get(4),
            process_interaction_at: r.get(5),
        }))
    }

    /// The stored (live) row with primary key `key` on `shard`.
    pub async fn stored_row(
        &self,
        shard: ShardIndex,
        schema: &TableSchema,
        key: &[String],
    ) -> Result<Option<Vec<Cell>>, Error> {
        let conditions: Vec<String> = schema
            .key
            .iter()
            .zip(key)
            .map(|(i, v)| key_condition(&schema.columns[*i], v))
            .collect();
        let sql = format!(
            "SELECT {} FROM {}.{} FINAL WHERE {} AND _deleted = 0",
            schema.select_list(),
            self.database,
            schema.table.name(),
            conditions.join(" AND ")
        );
        Ok(self.select(shard, &sql, &schema.columns).await?.into_iter().next())
    }

    /// A column's current text value in PostgreSQL (for an unchanged TOAST value no shard has).
    /// `Ok(None)`: no PostgreSQL configured, or the row is gone.
    pub async fn column_in_postgres(
        &self,
        table: SourceTable,
        key: &[String],
        column: &str,
    ) -> Result<Option<Option<String>>, Error> {
        let Some(pg) = &self.pg else { return Ok(None) };
        let conditions: Vec<String> = table
            .primary_key()
            .iter()
            .enumerate()
            .map(|(i, k)| format!("\"{k}\"::text = ${}", i + 1))
            .collect();
        let sql = format!(
            "SELECT \"{}\"::text FROM director.{} WHERE {}",
            column.replace('"', "\"\""),
            table.name(),
            conditions.join(" AND ")
        );
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            key.iter().map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let row = pg.query_opt(sql.as_str(), &params).await.map_err(|source| Error::Postgres {
            context: format!("reading {table}.{column}"),
            source,
        })?;
        Ok(row.map(|r| r.get(0)))
    }

    /// The live children (`table` is scores or historic scores) of a scorecard on `shard`.
    pub async fn children(
        &self,
        shard: ShardIndex,
        schema: &TableSchema,
        card: &ScorecardKey,
    ) -> Result<Vec<Vec<Cell>>, Error> {
        let sql = format!(
            "SELECT {} FROM {}.{} FINAL WHERE customer_id = {} AND profile_id = {} AND scorecard_id = {} \
             AND _deleted = 0",
            schema.select_list(),
            self.database,
            schema.table.name(),
            quote(&card.customer_id),
            quote(&card.profile_id),
            quote(&card.scorecard_id)
        );
        self.select(shard, &sql, &schema.columns).await
    }
}

/// `column = literal`, typed by the column.
fn key_condition(column: &ChColumn, value: &str) -> String {
    match column.ty {
        ChType::Int | ChType::UInt => match value.parse::<i64>() {
            Ok(n) => format!("`{}` = {n}", column.name),
            Err(_) => format!("toString(`{}`) = {}", column.name, quote(value)),
        },
        _ => format!("`{}` = {}", column.name, quote(value)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_escape_quotes_and_backslashes() {
        assert_eq!(quote("it's"), "'it\\'s'");
        assert_eq!(quote("a\\b"), "'a\\\\b'");
        assert_eq!(quote("plain?"), "'plain?'");
    }

    #[test]
    fn key_conditions_are_typed() {
        assert_eq!(key_condition(&ChColumn::new("revision", "Int32"), "3"), "`revision` = 3");
        assert_eq!(key_condition(&ChColumn::new("id", "String"), "x'"), "`id` = 'x\\''");
    }
}
