//! Which scorecards a backfill re-publishes, as SQL over `director.scorecards` (alias `c`).
//!
//! A filter selects scorecards; a backfill publishes each selected card's rows of the chosen
//! tables (the card itself, its scores, its historic scores). Every value is a bound parameter,
//! never spliced into the SQL.

use std::fmt::Write as _;

use tokio_postgres::types::ToSql;

use scoresync_event::{ScorecardKey, SourceTable};

/// A kind of scorecard (`scorecard_type`: 2 is a process scorecard, anything else, NULL
/// included, a conversation scorecard).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CardKind {
    /// `scorecard_type = 2`.
    Process,
    /// `scorecard_type` other than 2, or NULL.
    Conversation,
}

/// The scorecard column `--since` and `--until` compare.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimeColumn {
    /// `process_interaction_at`.
    ProcessInteractionAt,
    /// `created_at`.
    CreatedAt,
}

impl TimeColumn {
    fn name(self) -> &'static str {
        match self {
            TimeColumn::ProcessInteractionAt => "process_interaction_at",
            TimeColumn::CreatedAt => "created_at",
        }
    }
}

/// What a backfill covers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Filter {
    /// Only this customer's scorecards.
    pub customer: Option<String>,
    /// Only this profile's.
    pub profile: Option<String>,
    /// Only this kind.
    pub kind: Option<CardKind>,
    /// The column `since` and `until` compare.
    pub time_column: TimeColumn,
    /// At or after this time (RFC 3339, read by PostgreSQL as `timestamptz`).
    pub since: Option<String>,
    /// Before this time.
    pub until: Option<String>,
    /// Only these scorecards.
    pub keys: Option<Vec<ScorecardKey>>,
    /// The tables whose rows are published (never empty).
    pub tables: Vec<SourceTable>,
}

/// SQL with its parameters.
pub(crate) struct Query {
    pub(crate) sql: String,
    pub(crate) params: Vec<Box<dyn ToSql + Sync + Send>>,
}

impl Query {
    /// An empty query.
    pub(crate) fn new() -> Query {
        Query { sql: String::new(), params: Vec::new() }
    }

    pub(crate) fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        self.params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync)).collect()
    }

    /// Binds `value` and returns its placeholder, cast to `cast`.
    pub(crate) fn bind(&mut self, value: impl ToSql + Sync + Send + 'static, cast: &str) -> String {
        self.params.push(Box::new(value));
        format!("${}::{cast}", self.params.len())
    }
}

impl Filter {
    /// Everything: every scorecard, every table.
    pub fn everything() -> Filter {
        Filter {
            customer: None,
            profile: None,
            kind: None,
            time_column: TimeColumn::CreatedAt,
            since: None,
            until: None,
            keys: None,
            tables: SourceTable::ALL.to_vec(),
        }
    }

    /// A stable one-line description: the key of the backfill's progress record, so the same
    /// command run again resumes (a different filter is a different backfill).
    pub fn describe(&self) -> String {
        // Every field, so that a new one cannot be left out of the key.
        let Filter { customer, profile, kind, time_column, since, until, keys, tables } = self;
        let mut tables: Vec<&str> = tables.iter().map(|t| t.name()).collect();
        tables.sort_unstable();
        let mut out = String::new();
        let mut part = |name: &str, value: &dyn std::fmt::Debug| {
            let _ = write!(out, "{name}={value:?};");
        };
        part("customer", customer);
        part("profile", profile);
        part("kind", kind);
        part("time_column", time_column);
        part("since", since);
        part("until", until);
        // The keys by their count and a digest of them all, so another list is another backfill.
        part("keys", &keys.as_ref().map(|keys| (keys.len(), digest(keys))));
        part("tables", &tables);
        out
    }

    /// The conditions on `c` (a `director.scorecards` row), appended to `query` as `AND ...`.
    pub(crate) fn conditions(&self, query: &mut Query) -> String {
        let mut sql = String::new();
        if let Some(customer) = &self.customer {
            let p = query.bind(customer.clone(), "text");
            let _ = write!(sql, " AND c.customer_id = {p}");
        }
        if let Some(profile) = &self.profile {
            let p = query.bind(profile.clone(), "text");
            let _ = write!(sql, " AND c.profile_id = {p}");
        }
        match self.kind {
            Some(CardKind::Process) => sql.push_str(" AND c.scorecard_type = 2"),
            Some(CardKind::Conversation) => {
                sql.push_str(" AND c.scorecard_type IS DISTINCT FROM 2")
            }
            None => {}
        }
        let column = self.time_column.name();
        if let Some(since) = &self.since {
            let p = query.bind(since.clone(), "text::timestamptz");
            let _ = write!(sql, " AND c.{column} >= {p}");
        }
        if let Some(until) = &self.until {
            let p = query.bind(until.clone(), "text::timestamptz");
            let _ = write!(sql, " AND c.{column} < {p}");
        }
        if let Some(keys) = &self.keys {
            let unnest = key_arrays(query, keys);
            let _ = write!(sql, " AND (c.customer_id, c.profile_id, c.scorecard_id) IN ({unnest})");
        }
        sql
    }

    /// How many scorecards the filter selects.
    pub(crate) fn count_query(&self) -> Query {
        let mut query = Query { sql: String::new(), params: Vec::new() };
        let conditions = self.conditions(&mut query);
        query.sql = format!("SELECT count(*) FROM director.scorecards c WHERE true{conditions}");
        query
    }

    /// The next `limit` selected scorecard keys after `after` (all from the first when `None`),
    /// in key order.
    pub(crate) fn cards_query(&self, after: Option<&ScorecardKey>, limit: usize) -> Query {
        let mut query = Query { sql: String::new(), params: Vec::new() };
        let mut conditions = self.conditions(&mut query);
        if let Some(after) = after {
            let a = query.bind(after.customer_id.clone(), "text");
            let b = query.bind(after.profile_id.clone(), "text");
            let k = query.bind(after.scorecard_id.clone(), "text");
            let _ = write!(
                conditions,
                " AND (c.customer_id, c.profile_id, c.scorecard_id) > ({a}, {b}, {k})"
            );
        }
        query.sql = format!(
            "SELECT c.customer_id::text, c.profile_id::text, c.scorecard_id::text \
             FROM director.scorecards c WHERE true{conditions} \
             ORDER BY c.customer_id, c.profile_id, c.scorecard_id LIMIT {limit}"
        );
        query
    }
}

/// A digest of a key list (murmur64a, which the layout's crate already carries).
fn digest(keys: &[ScorecardKey]) -> u64 {
    let bytes: Vec<u8> =
        keys.iter().flat_map(|k| [k.partition_key(), vec![b'\n']].concat()).collect();
    murmur2::murmur64a(&bytes, 0)
}

/// `SELECT * FROM unnest(customers, profiles, scorecards)` over `keys`, bound to `query`.
pub(crate) fn key_arrays(query: &mut Query, keys: &[ScorecardKey]) -> String {
    let column =
        |f: fn(&ScorecardKey) -> &String| keys.iter().map(|k| f(k).clone()).collect::<Vec<_>>();
    let a = query.bind(column(|k| &k.customer_id), "text[]");
    let b = query.bind(column(|k| &k.profile_id), "text[]");
    let c = query.bind(column(|k| &k.scorecard_id), "text[]");
    format!("SELECT * FROM unnest({a}, {b}, {c})")
}

/// The rows of `table` (every column as text, `select`) that belong to `cards`.
pub(crate) fn rows_query(table: SourceTable, select: &str, cards: &[ScorecardKey]) -> Query {
    let mut query = Query { sql: String::new(), params: Vec::new() };
    let unnest = key_arrays(&mut query, cards);
    query.sql = format!(
        "SELECT {select} FROM {table} WHERE (customer_id, profile_id, scorecard_id) IN ({unnest})"
    );
    query
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: &str) -> ScorecardKey {
        ScorecardKey { customer_id: "c".into(), profile_id: "p".into(), scorecard_id: id.into() }
    }

    #[test]
    fn a_filter_binds_every_value_and_walks_cards_in_key_order() {
        let filter = Filter {
            customer: Some("acme'; DROP TABLE x".into()),
            kind: Some(CardKind::Process),
            since: Some("2026-01-01T00:00:00Z".into()),
            time_column: TimeColumn::ProcessInteractionAt,
            ..Filter::everything()
        };
        let query = filter.cards_query(Some(&key("k9")), 100);
        assert_eq!(
            query.sql,
            "SELECT c.customer_id::text, c.profile_id::text, c.scorecard_id::text \
             FROM director.scorecards c WHERE true AND c.customer_id = $1::text \
             AND c.scorecard_type = 2 AND c.process_interaction_at >= $2::text::timestamptz \
             AND (c.customer_id, c.profile_id, c.scorecard_id) > ($3::text, $4::text, $5::text) \
             ORDER BY c.customer_id, c.profile_id, c.scorecard_id LIMIT 100"
        );
        assert_eq!(query.params.len(), 5);
        assert!(!query.sql.contains("acme"), "values are bound, never spliced");
    }

    #[test]
    fn rows_of_a_chunk_are_read_by_their_scorecard_keys() {
        let query = rows_query(SourceTable::Scores, "a::text", &[key("k1"), key("k2")]);
        assert_eq!(
            query.sql,
            "SELECT a::text FROM director.scores WHERE (customer_id, profile_id, scorecard_id) \
             IN (SELECT * FROM unnest($1::text[], $2::text[], $3::text[]))"
        );
    }

    #[test]
    fn the_description_tells_filters_apart() {
        let everything = Filter::everything();
        let one = Filter { customer: Some("x".into()), ..Filter::everything() };
        assert_ne!(everything.describe(), one.describe());
        assert_eq!(one.describe(), one.clone().describe());
        let keys = |ids: &[&str]| Filter {
            keys: Some(ids.iter().map(|id| key(id)).collect()),
            ..Filter::everything()
        };
        assert_ne!(keys(&["a", "b"]).describe(), keys(&["a", "c"]).describe(), "same length");
    }
}
