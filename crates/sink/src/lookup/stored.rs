//! Whole stored rows: every column of a target table as `system.columns` lists it, so the
//! column set is known only at run time. The SELECT lists the schema's columns in order (names
//! bound as identifiers, key values bound typed by their column) and the answer is RowBinary,
//! decoded for those columns by [`crate::rowbinary`]. Also what `verify` reads: the live rows
//! with given keys, and a shard's live keys in key order (keyset-paginated).

use clickhouse::query::Query;
use clickhouse::sql::Identifier;
use scoresync_event::ScorecardKey;

use super::{Lookups, decode, placeholders};
use crate::error::Error;
use crate::shard::ShardIndex;
use crate::table::{Cell, ChColumn, ChType, TableSchema};

impl Lookups {
    /// The stored (live) row with primary key `key` on `shard`.
    pub(crate) async fn stored_row(
        &self,
        shard: ShardIndex,
        schema: &TableSchema,
        key: &[String],
    ) -> Result<Option<Vec<Cell>>, Error> {
        let conditions: Vec<(&str, KeyValue)> = schema
            .key
            .iter()
            .zip(key)
            .map(|(i, text)| {
                let column = &schema.columns[*i];
                (column.name.as_str(), KeyValue::typed(column, text))
            })
            .collect();
        let query = live_query(&self.shards[shard], &self.database, schema, &conditions);
        Ok(self.select_cells(shard, query, &schema.columns).await?.into_iter().next())
    }

    /// The live rows of `schema`'s table that belong to scorecard `card` on `shard`: its
    /// children (scores, historic scores), or its own row (scorecards).
    pub(crate) async fn live_rows_of_card(
        &self,
        shard: ShardIndex,
        schema: &TableSchema,
        card: &ScorecardKey,
    ) -> Result<Vec<Vec<Cell>>, Error> {
        let conditions = [
            ("customer_id", KeyValue::Text(&card.customer_id)),
            ("profile_id", KeyValue::Text(&card.profile_id)),
            ("scorecard_id", KeyValue::Text(&card.scorecard_id)),
        ];
        let query = live_query(&self.shards[shard], &self.database, schema, &conditions);
        self.select_cells(shard, query, &schema.columns).await
    }
}

/// What `verify` reads (see [`crate::verify`]).
impl Lookups {
    /// The live rows on `shard` of `schema`'s table whose primary keys (text, in key order) are
    /// among `keys`: one bound tuple per key, [`super::CHUNK`] keys per request. A key whose
    /// numeric part is no number cannot be stored and is not asked for.
    pub(crate) async fn live_rows_with_keys(
        &self,
        shard: ShardIndex,
        schema: &TableSchema,
        keys: &[Vec<String>],
    ) -> Result<Vec<Vec<Cell>>, Error> {
        let key_columns: Vec<&ChColumn> = schema.key.iter().map(|i| &schema.columns[*i]).collect();
        let typed: Vec<Vec<KeyValue>> =
            keys.iter().filter_map(|key| typed_key(schema, key)).collect();
        let mut rows = Vec::new();
        for chunk in typed.chunks(super::CHUNK) {
            let tuple = format!("({})", placeholders(key_columns.len()));
            let sql = format!(
                "SELECT {} FROM ?.? FINAL WHERE _deleted = 0 AND ({}) IN ({})",
                placeholders(schema.columns.len()),
                placeholders(key_columns.len()),
                vec![tuple.as_str(); chunk.len()].join(", ")
            );
            let mut query = self.shards[shard].query(&sql);
            for column in &schema.columns {
                query = query.bind(Identifier(&column.name));
            }
            query = query.bind(Identifier(&self.database)).bind(Identifier(schema.table.name()));
            for column in &key_columns {
                query = query.bind(Identifier(&column.name));
            }
            for key in chunk {
                for value in key {
                    query = bind_value(query, *value);
                }
            }
            rows.extend(self.select_cells(shard, query, &schema.columns).await?);
        }
        Ok(rows)
    }

    /// The primary keys (text, in key order) of at most `limit` live rows on `shard` of
    /// `schema`'s table after `after`, in ClickHouse's key order, where `condition` holds
    /// (`?` placeholders, filled by `bind` after the key bound).
    pub(crate) async fn live_keys_after(
        &self,
        shard: ShardIndex,
        schema: &TableSchema,
        after: Option<&[String]>,
        limit: usize,
        condition: &str,
        bind: impl Fn(Query) -> Query,
    ) -> Result<Vec<Vec<String>>, Error> {
        let key_columns: Vec<ChColumn> =
            schema.key.iter().map(|i| schema.columns[*i].clone()).collect();
        let names = placeholders(key_columns.len());
        let mut sql = format!("SELECT {names} FROM ?.? FINAL WHERE _deleted = 0");
        // `(a, b, c) > (x, y, z)` spelled out, so the primary index can prune on every prefix.
        let after_sql = after.map(|_| after_condition(key_columns.len()));
        if let Some(after_sql) = &after_sql {
            sql.push_str(&format!(" AND {after_sql}"));
        }
        sql.push_str(&format!(" AND ({condition}) ORDER BY {names} LIMIT {limit}"));
        let mut query = self.shards[shard].query(&sql);
        for column in &key_columns {
            query = query.bind(Identifier(&column.name));
        }
        query = query.bind(Identifier(&self.database)).bind(Identifier(schema.table.name()));
        if let Some(after) = after {
            for i in 0..key_columns.len() {
                for (column, text) in key_columns.iter().zip(after).take(i + 1) {
                    query = query.bind(Identifier(&column.name));
                    query = bind_value(query, KeyValue::typed(column, text));
                }
            }
        }
        query = bind(query);
        for column in &key_columns {
            query = query.bind(Identifier(&column.name));
        }
        let rows = self.select_cells(shard, query, &key_columns).await?;
        Ok(rows.iter().map(|cells| cells.iter().map(crate::rows::cell_text).collect()).collect())
    }
}

/// `(k1 > ?) OR (k1 = ? AND k2 > ?) OR ...` over `n` key columns, each `?` pair a column
/// (identifier) and a value.
fn after_condition(n: usize) -> String {
    let terms: Vec<String> = (0..n)
        .map(|i| {
            let mut parts: Vec<&str> = vec!["? = ?"; i];
            parts.push("? > ?");
            format!("({})", parts.join(" AND "))
        })
        .collect();
    format!("({})", terms.join(" OR "))
}

/// A row key (text, in key order) typed by `schema`'s key columns; `None` when a numeric part
/// is no number (no stored row has such a key, so there is nothing to ask for).
pub(crate) fn typed_key<'a>(schema: &TableSchema, key: &'a [String]) -> Option<Vec<KeyValue<'a>>> {
    let typed: Vec<KeyValue> = schema
        .key
        .iter()
        .zip(key)
        .map(|(i, text)| KeyValue::typed(&schema.columns[*i], text))
        .collect();
    (!typed.iter().any(|v| matches!(v, KeyValue::TextOfNumber(_)))).then_some(typed)
}

/// Binds a typed key value.
pub(crate) fn bind_value(query: Query, value: KeyValue) -> Query {
    match value {
        KeyValue::Int(i) => query.bind(i),
        KeyValue::UInt(u) => query.bind(u),
        KeyValue::Text(s) | KeyValue::TextOfNumber(s) => query.bind(s),
    }
}

/// Every live row (`FINAL`, `_deleted = 0`) of `schema`'s table in `database` on one shard, as
/// cells in the schema's column order. Without the lookups' timeout and cool-down: for checks
/// and tools (the end-to-end oracle reads whole tables with it); the sink reads through
/// `Lookups`.
pub async fn live_rows(
    client: &clickhouse::Client,
    shard: ShardIndex,
    database: &str,
    schema: &TableSchema,
) -> Result<Vec<Vec<Cell>>, Error> {
    let action = format!("reading the live rows of {}", schema.table);
    let bytes = live_query(client, database, schema, &[])
        .fetch_bytes("RowBinary")
        .map_err(Error::shard(shard, action.clone()))?
        .collect()
        .await
        .map_err(Error::shard(shard, action))?;
    decode(shard, &schema.columns, &bytes)
}

/// A key value bound in a condition, typed by its column.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum KeyValue<'a> {
    Int(i64),
    UInt(u64),
    Text(&'a str),
    /// Key text that is no number, for a numeric column: compared with the column's text form
    /// (it matches nothing, without a type error).
    TextOfNumber(&'a str),
}

impl<'a> KeyValue<'a> {
    /// `text` (a row key's text form) as `column`'s type.
    fn typed(column: &ChColumn, text: &'a str) -> KeyValue<'a> {
        let number = match column.ty {
            ChType::Int => text.parse().ok().map(KeyValue::Int),
            ChType::UInt => text.parse().ok().map(KeyValue::UInt),
            ChType::Str | ChType::Float | ChType::DateTime => return KeyValue::Text(text),
        };
        number.unwrap_or(KeyValue::TextOfNumber(text))
    }
}

/// Every column of `schema`'s table, live rows (`FINAL`, `_deleted = 0`) where each of
/// `conditions` (column, value) holds. Column, database and table names are bound as
/// identifiers, values as values; the SELECT list is the schema's columns in order.
fn live_query(
    client: &clickhouse::Client,
    database: &str,
    schema: &TableSchema,
    conditions: &[(&str, KeyValue)],
) -> Query {
    let mut sql =
        format!("SELECT {} FROM ?.? FINAL WHERE _deleted = 0", placeholders(schema.columns.len()));
    for (_, value) in conditions {
        sql.push_str(match value {
            KeyValue::TextOfNumber(_) => " AND toString(?) = ?",
            _ => " AND ? = ?",
        });
    }
    let mut query = client.query(&sql);
    for column in &schema.columns {
        query = query.bind(Identifier(&column.name));
    }
    query = query.bind(Identifier(database)).bind(Identifier(schema.table.name()));
    for (column, value) in conditions {
        query = query.bind(Identifier(column));
        query = match *value {
            KeyValue::Int(i) => query.bind(i),
            KeyValue::UInt(u) => query.bind(u),
            KeyValue::Text(s) | KeyValue::TextOfNumber(s) => query.bind(s),
        };
    }
    query
}

#[cfg(test)]
mod tests {
    use super::*;
    use scoresync_event::SourceTable;

    fn client() -> clickhouse::Client {
        clickhouse::Client::default()
    }

    fn sql(query: &Query) -> String {
        query.sql_display().to_string()
    }

    fn schema() -> TableSchema {
        let cols: Vec<(String, String)> = [
            ("customer_id", "String"),
            ("profile_id", "String"),
            ("scorecard_id", "String"),
            ("revision", "Int32"),
            ("criterion_id", "String"),
            ("started", "Nullable(DateTime)"),
            ("_version", "UInt64"),
            ("_deleted", "UInt8"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        TableSchema::new(SourceTable::HistoricScorecardScores, &cols).expect("schema")
    }

    #[test]
    fn live_reads_bind_names_and_typed_key_values() {
        let s = schema();
        let key: Vec<String> = ["c", "p'", "card", "3", "k"].map(String::from).to_vec();
        let conditions: Vec<(&str, KeyValue)> = s
            .key
            .iter()
            .zip(&key)
            .map(|(i, text)| (s.columns[*i].name.as_str(), KeyValue::typed(&s.columns[*i], text)))
            .collect();
        assert_eq!(
            sql(&live_query(&client(), "db", &s, &conditions)),
            "SELECT `customer_id`, `profile_id`, `scorecard_id`, `revision`, `criterion_id`, \
             `started`, `_version`, `_deleted` FROM `db`.`historic_scorecard_scores` FINAL \
             WHERE _deleted = 0 AND `customer_id` = 'c' AND `profile_id` = 'p\\'' \
             AND `scorecard_id` = 'card' AND `revision` = 3 AND `criterion_id` = 'k'"
        );
        let everything = sql(&live_query(&client(), "db", &s, &[]));
        assert!(everything.ends_with("FINAL WHERE _deleted = 0"), "{everything}");
    }

    #[test]
    fn a_key_walk_resumes_strictly_after_the_last_key_on_every_prefix() {
        assert_eq!(after_condition(1), "((? > ?))");
        assert_eq!(
            after_condition(3),
            "((? > ?) OR (? = ? AND ? > ?) OR (? = ? AND ? = ? AND ? > ?))"
        );
    }

    #[test]
    fn key_values_take_their_column_type() {
        let int = ChColumn::new("revision", "Int32");
        let uint = ChColumn::new("n", "UInt64");
        let text = ChColumn::new("id", "String");
        assert_eq!(KeyValue::typed(&int, "-3"), KeyValue::Int(-3));
        assert_eq!(KeyValue::typed(&uint, "18446744073709551615"), KeyValue::UInt(u64::MAX));
        assert_eq!(KeyValue::typed(&int, "3x"), KeyValue::TextOfNumber("3x"));
        assert_eq!(KeyValue::typed(&text, "3"), KeyValue::Text("3"));
        let s = schema();
        let conditions = [("revision", KeyValue::typed(&int, "3'x"))];
        let text = sql(&live_query(&client(), "db", &s, &conditions));
        assert!(text.ends_with("AND toString(`revision`) = '3\\'x'"), "{text}");
    }
}
