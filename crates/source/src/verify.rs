//! PostgreSQL's side of `scoresync verify`: a table's rows as the sink would receive them
//! (typed change-event values), each with its scorecard's row, walked in primary-key order in
//! chunks for a [`Filter`], or read for a list of keys.
//!
//! A child (score, historic score) is read joined to its scorecard, so ClickHouse's side can
//! tell where it belongs and what it carries without a lookup per row; a child whose scorecard
//! PostgreSQL lacks comes with none. A scorecard's own row is its scorecard row.
//!
//! Invariants:
//! - Chunks are keyset-paginated on the table's primary key in PostgreSQL's order: one chunk
//!   starts strictly after the last key of the one before, so a walk neither repeats nor skips a
//!   row that existed throughout. ClickHouse's side never compares key ranges across the two
//!   systems (their string orders differ); it looks keys up.
//! - Filters bind every value ([`Filter`]); keys are bound as text and cast to their column type.

use scoresync_event::table::CARD_FIELDS;
use scoresync_event::{Row, SourceTable};

use crate::backfill::Filter;
use crate::backfill::filter::Query;
use crate::error::Error;
use crate::snapshot::event::typed_columns;
use crate::snapshot::query::{TableColumn, cast_name, ident, table_columns};

/// A PostgreSQL row with its scorecard.
#[derive(Clone, Debug, PartialEq)]
pub struct PgRow {
    /// Primary-key values as text, in key order.
    pub key: Vec<String>,
    /// The row.
    pub row: Row,
    /// Its scorecard's row (the row itself for a scorecard; `None`: PostgreSQL has no such card).
    pub card: Option<Row>,
}

/// Reads one table's rows for verify.
pub struct TableReader {
    table: SourceTable,
    columns: Vec<TableColumn>,
    /// The scorecard columns read beside a child (empty for the scorecards table).
    card_columns: Vec<TableColumn>,
}

impl TableReader {
    /// A reader for `table`, its columns read from the catalog.
    pub async fn new(sql: &tokio_postgres::Client, table: SourceTable) -> Result<Self, Error> {
        let columns = table_columns(sql, table).await?;
        // A child's scorecard: its key and the fields it routes by and children carry.
        let card_columns = if table.is_child() {
            let key = SourceTable::Scorecards.primary_key();
            table_columns(sql, SourceTable::Scorecards)
                .await?
                .into_iter()
                .filter(|c| {
                    key.contains(&c.name.as_str()) || CARD_FIELDS.contains(&c.name.as_str())
                })
                .collect()
        } else {
            Vec::new()
        };
        Ok(TableReader { table, columns, card_columns })
    }

    /// The table.
    pub fn table(&self) -> SourceTable {
        self.table
    }

    /// `SELECT <row's columns>, <card's columns>, <card found> FROM <table and its card>`: the
    /// row as `t`, its scorecard as `c` (the same row for scorecards, so [`Filter`] conditions,
    /// written on `c`, apply to both).
    fn select(&self) -> String {
        let row_alias = self.alias();
        let mut select: Vec<String> =
            self.columns.iter().map(|c| format!("{row_alias}.{}::text", ident(&c.name))).collect();
        select.extend(self.card_columns.iter().map(|c| format!("c.{}::text", ident(&c.name))));
        select.push("c.scorecard_id IS NOT NULL".into());
        let from = if self.table.is_child() {
            format!(
                "{} t LEFT JOIN director.scorecards c ON c.customer_id = t.customer_id \
                 AND c.profile_id = t.profile_id AND c.scorecard_id = t.scorecard_id",
                self.table
            )
        } else {
            "director.scorecards c".to_owned()
        };
        format!("SELECT {} FROM {from}", select.join(", "))
    }

    /// The alias of the table's own row: `c` for a scorecard (its own card), `t` for a child.
    fn alias(&self) -> &'static str {
        if self.table.is_child() { "t" } else { "c" }
    }

    /// The primary key as `alias.column` list, in key order.
    fn key_list(&self) -> String {
        let alias = self.alias();
        let key: Vec<String> =
            self.table.primary_key().iter().map(|k| format!("{alias}.{}", ident(k))).collect();
        key.join(", ")
    }

    /// The SQL type of each primary-key column, in key order: keys travel as text and are cast
    /// to it.
    fn key_casts(&self) -> Vec<&'static str> {
        self.table
            .primary_key()
            .iter()
            .map(|k| {
                cast_name(self.columns.iter().find(|c| c.name == *k).map_or(25, |c| c.type_oid))
            })
            .collect()
    }

    /// The next at most `limit` rows the filter selects after `after` (from the first when
    /// `None`), in primary-key order. Fewer than `limit`: the walk is done.
    pub async fn chunk(
        &self,
        sql: &tokio_postgres::Client,
        filter: &Filter,
        after: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<PgRow>, Error> {
        let mut query = Query::new();
        let mut conditions = filter.conditions(&mut query);
        if let Some(after) = after {
            let params: Vec<String> = after
                .iter()
                .zip(self.key_casts())
                .map(|(value, cast)| query.bind(value.clone(), &format!("text::{cast}")))
                .collect();
            conditions.push_str(&format!(" AND ({}) > ({})", self.key_list(), params.join(", ")));
        }
        query.sql = format!(
            "{} WHERE true{conditions} ORDER BY {} LIMIT {limit}",
            self.select(),
            self.key_list()
        );
        self.read(sql, query).await
    }

    /// The rows with these primary keys (text, in key order) that PostgreSQL has, whatever the
    /// filter.
    pub async fn by_keys(
        &self,
        sql: &tokio_postgres::Client,
        keys: &[Vec<String>],
    ) -> Result<Vec<PgRow>, Error> {
        let mut query = Query::new();
        let casts = self.key_casts();
        let arrays: Vec<String> = casts
            .iter()
            .enumerate()
            .map(|(i, cast)| {
                let column: Vec<String> =
                    keys.iter().map(|k| k.get(i).cloned().unwrap_or_default()).collect();
                query.bind(column, &format!("text[]::{cast}[]"))
            })
            .collect();
        query.sql = format!(
            "{} WHERE ({}) IN (SELECT * FROM unnest({}))",
            self.select(),
            self.key_list(),
            arrays.join(", ")
        );
        self.read(sql, query).await
    }

    async fn read(&self, sql: &tokio_postgres::Client, query: Query) -> Result<Vec<PgRow>, Error> {
        let found = sql
            .query(query.sql.as_str(), &query.params())
            .await
            .map_err(Error::sql(format!("reading {} for verify", self.table)))?;
        found.iter().map(|row| self.pg_row(row)).collect()
    }

    fn pg_row(&self, pg_row: &tokio_postgres::Row) -> Result<PgRow, Error> {
        let table = self.table;
        let fail = |table: SourceTable| {
            move |(column, source): (String, crate::text::ValueError)| Error::Verify {
                problem: format!("{table}.{column}: {source}"),
            }
        };
        let row = typed_columns(&self.columns, pg_row, 0).map_err(fail(table))?;
        let found_card: bool = pg_row.get(self.columns.len() + self.card_columns.len());
        let card = if !table.is_child() {
            Some(row.clone())
        } else if found_card {
            let card = typed_columns(&self.card_columns, pg_row, self.columns.len());
            Some(card.map_err(fail(SourceTable::Scorecards))?)
        } else {
            None
        };
        let key = table
            .primary_key()
            .iter()
            .map(|k| row.column(k).and_then(|c| c.value.as_ref()).map(key_text).unwrap_or_default())
            .collect();
        Ok(PgRow { key, row, card })
    }
}

/// A key value as text, as ClickHouse's side spells keys.
fn key_text(value: &scoresync_event::Value) -> String {
    use scoresync_event::v1::value::Kind;
    match &value.kind {
        Some(Kind::Text(s)) => s.clone(),
        Some(Kind::Int(i) | Kind::TimestampUs(i)) => i.to_string(),
        Some(Kind::Float(f)) => f.to_string(),
        Some(Kind::Boolean(b)) => u8::from(*b).to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(table: SourceTable) -> TableReader {
        let column = |name: &str, type_oid: u32| TableColumn {
            name: name.into(),
            type_oid,
            is_key: table.primary_key().contains(&name),
        };
        let columns = match table {
            SourceTable::Scorecards => vec![
                column("customer_id", 25),
                column("profile_id", 25),
                column("scorecard_id", 25),
            ],
            _ => vec![
                column("customer_id", 25),
                column("profile_id", 25),
                column("scorecard_id", 25),
                column("revision", crate::text::oid::INT4),
                column("criterion_id", 25),
            ],
        };
        let card_columns = if table.is_child() {
            vec![column("scorecard_type", crate::text::oid::INT2)]
        } else {
            Vec::new()
        };
        TableReader { table, columns, card_columns }
    }

    #[test]
    fn a_child_is_read_with_its_card_and_keys_are_cast_to_their_type() {
        let r = reader(SourceTable::HistoricScorecardScores);
        assert_eq!(
            r.select(),
            "SELECT t.\"customer_id\"::text, t.\"profile_id\"::text, t.\"scorecard_id\"::text, \
             t.\"revision\"::text, t.\"criterion_id\"::text, c.\"scorecard_type\"::text, \
             c.scorecard_id IS NOT NULL FROM director.historic_scorecard_scores t LEFT JOIN \
             director.scorecards c ON c.customer_id = t.customer_id AND c.profile_id = \
             t.profile_id AND c.scorecard_id = t.scorecard_id"
        );
        assert_eq!(r.key_casts(), ["text", "text", "text", "integer", "text"]);
    }

    #[test]
    fn a_scorecard_is_its_own_card() {
        let r = reader(SourceTable::Scorecards);
        assert_eq!(
            r.select(),
            "SELECT c.\"customer_id\"::text, c.\"profile_id\"::text, c.\"scorecard_id\"::text, \
             c.scorecard_id IS NOT NULL FROM director.scorecards c"
        );
        assert_eq!(r.key_list(), "c.\"customer_id\", c.\"profile_id\", c.\"scorecard_id\"");
    }
}
