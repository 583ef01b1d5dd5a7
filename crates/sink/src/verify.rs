//! ClickHouse's side of `scoresync verify`: for a set of primary keys of one table, what every
//! shard holds live (`FINAL`, `_deleted = 0`), judged against the row PostgreSQL has: where the
//! sink would have written it and what it would have written. The verdict per key is a list of
//! [`Finding`]s; none means in sync.
//!
//! Invariants:
//! - The expectation is the sink's own: the row mapping ([`crate::rows::upsert_row`]), the
//!   routing ([`crate::route`]) and the conversation lookup (the lowest shard holding it, as
//!   the sink routes). A check never disagrees with the sink about what correct is.
//! - Every key is looked up on every shard: a row is `missing` when its shard lacks it, `stale`
//!   when that shard's copy differs, `misplaced` for each copy on another shard, `extra` for each
//!   live copy of a key PostgreSQL lacks, and `unroutable` when PostgreSQL's row cannot be
//!   placed (its conversation is on no shard, its scorecard is gone, or its routing field is
//!   NULL): the sink parks or dead-letters such rows, so they are reported apart from drift, and
//!   their live copies are not judged (there is no right shard to judge them by).
//! - Repair never deletes a row it did not judge: a delete marker is written over a copy only
//!   while that copy, with the version the check saw, is still the live one ([`Checker::retire`]),
//!   at that version + 1, below any later change of the key.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::hash::{Hash, Hasher};

use clickhouse::query::Query;
use clickhouse::sql::Identifier;

use scoresync_event::{Row, ScorecardKey, SourceTable};

use crate::config::ClickHouseConfig;
use crate::error::Error;
use crate::lookup::{KeyValue, Lookups, bind_value, typed_key};
use crate::route::{CardFields, Conversation, Route};
use crate::rows::{Denormalized, cell_text, upsert_row};
use crate::shard::ShardIndex;
use crate::table::{Cell, ChType, TableSchema};

/// A row PostgreSQL has, with its scorecard's row (`None`: PostgreSQL lacks the scorecard). The
/// same as `scoresync_source::verify::PgRow`: the sink does not depend on the source crate, so
/// the command maps one to the other.
#[derive(Clone, Debug)]
pub struct Expected {
    /// Primary-key values as text, in key order.
    pub key: Vec<String>,
    /// The row.
    pub row: Row,
    /// Its scorecard's row (the row itself for a scorecard).
    pub card: Option<Row>,
}

/// A kind of drift.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftKind {
    /// PostgreSQL has the row; its shard has no live copy.
    Missing,
    /// A live copy of a row PostgreSQL lacks.
    Extra,
    /// The copy on the right shard differs from PostgreSQL's row.
    Stale,
    /// A live copy on a shard the row does not belong on.
    Misplaced,
    /// PostgreSQL's row cannot be placed (its conversation is on no shard, or its scorecard is
    /// gone): the sink parks it. Not drift of ClickHouse, but reported.
    Unroutable,
}

impl DriftKind {
    /// Every kind, in report order.
    pub const ALL: [DriftKind; 5] = [
        DriftKind::Missing,
        DriftKind::Extra,
        DriftKind::Stale,
        DriftKind::Misplaced,
        DriftKind::Unroutable,
    ];

    /// The name in reports and JSON.
    pub fn name(self) -> &'static str {
        match self {
            DriftKind::Missing => "missing",
            DriftKind::Extra => "extra",
            DriftKind::Stale => "stale",
            DriftKind::Misplaced => "misplaced",
            DriftKind::Unroutable => "unroutable",
        }
    }

    /// True for drift (what `--repair` fixes and exit status 1 reports).
    pub fn is_drift(self) -> bool {
        self != DriftKind::Unroutable
    }

    /// True when repair writes a delete marker over the copy (a copy that must not be live).
    pub fn is_retired(self) -> bool {
        matches!(self, DriftKind::Extra | DriftKind::Misplaced)
    }

    /// True when repair re-publishes the row's scorecard from PostgreSQL (its right shard lacks
    /// the right row).
    pub fn is_republished(self) -> bool {
        matches!(self, DriftKind::Missing | DriftKind::Stale | DriftKind::Misplaced)
    }
}

/// One thing wrong with one key.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Finding {
    /// The table.
    #[serde(serialize_with = "table_name")]
    pub table: SourceTable,
    /// Primary-key values as text, in key order.
    pub key: Vec<String>,
    /// What is wrong.
    pub kind: DriftKind,
    /// The shard concerned: where the row belongs (missing, stale) or where the copy is (extra,
    /// misplaced); none for unroutable.
    pub shard: Option<ShardIndex>,
    /// The live copy's `_version` (extra, misplaced, stale).
    pub version: Option<u64>,
    /// The row's scorecard, when known (what a repair re-publishes).
    #[serde(skip)]
    pub card: Option<ScorecardKey>,
    /// A short human description (the first differing column, the right shard, why unroutable).
    pub detail: String,
    /// A digest of what PostgreSQL had when judged (0: it lacked the row): a finding whose
    /// digest changes between checks is a row still changing.
    #[serde(skip)]
    pub pg_state: u64,
}

fn table_name<S: serde::Serializer>(table: &SourceTable, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(table.name())
}

/// Which live keys a walk of ClickHouse covers: the filter's conditions on columns every target
/// table carries. Times are Unix microseconds.
#[derive(Clone, Debug, Default)]
pub struct LiveScope {
    /// `customer_id =`.
    pub customer: Option<String>,
    /// `profile_id =`.
    pub profile: Option<String>,
    /// `Some(true)`: process scorecards (`scorecard_type = 2`); `Some(false)`: the others.
    pub process: Option<bool>,
    /// `process_interaction_at >=`.
    pub process_since_us: Option<i64>,
    /// `process_interaction_at <`.
    pub process_until_us: Option<i64>,
    /// `created_at >=` (scorecards only: a child's `created_at` is its own, not its card's).
    pub created_since_us: Option<i64>,
    /// `created_at <` (scorecards only).
    pub created_until_us: Option<i64>,
    /// Only these scorecards.
    pub cards: Option<Vec<ScorecardKey>>,
}

/// A bound value of a [`LiveScope`] condition.
enum Bound {
    Text(String),
    Int(i64),
}

impl LiveScope {
    /// The condition (`?` placeholders) and its values, for `table`.
    fn condition(&self, table: SourceTable) -> (String, Vec<Bound>) {
        let mut sql = vec!["1".to_owned()];
        let mut values = Vec::new();
        if let Some(customer) = &self.customer {
            sql.push("customer_id = ?".into());
            values.push(Bound::Text(customer.clone()));
        }
        if let Some(profile) = &self.profile {
            sql.push("profile_id = ?".into());
            values.push(Bound::Text(profile.clone()));
        }
        match self.process {
            Some(true) => sql.push("scorecard_type = 2".into()),
            Some(false) => sql.push("(scorecard_type IS NULL OR scorecard_type != 2)".into()),
            None => {}
        }
        let mut compare = |column: &str, op: &str, value: Option<i64>| {
            if let Some(value) = value {
                sql.push(format!("{column} {op} ?"));
                values.push(Bound::Int(value));
            }
        };
        compare("process_interaction_at", ">=", self.process_since_us);
        compare("process_interaction_at", "<", self.process_until_us);
        if table == SourceTable::Scorecards {
            compare("created_at", ">=", self.created_since_us);
            compare("created_at", "<", self.created_until_us);
        }
        match &self.cards {
            None => {}
            Some(cards) if cards.is_empty() => sql.push("0".into()),
            Some(cards) => {
                let tuples = vec!["(?, ?, ?)"; cards.len()].join(", ");
                sql.push(format!("(customer_id, profile_id, scorecard_id) IN ({tuples})"));
            }
        }
        if let Some(cards) = &self.cards {
            for card in cards {
                values.push(Bound::Text(card.customer_id.clone()));
                values.push(Bound::Text(card.profile_id.clone()));
                values.push(Bound::Text(card.scorecard_id.clone()));
            }
        }
        (sql.join(" AND "), values)
    }
}

/// Reads the shards and judges keys.
pub struct Checker {
    lookups: Lookups,
    schemas: BTreeMap<SourceTable, TableSchema>,
    shard_count: usize,
}

impl Checker {
    /// A checker over the configured shards (their tables' columns read from the shards).
    pub async fn new(cfg: &ClickHouseConfig) -> Result<Checker, Error> {
        let schemas = crate::schema::load(cfg).await?.into_iter().map(|s| (s.table, s)).collect();
        let lookups = Lookups::new(crate::shard::clients(cfg), cfg.database.clone(), None);
        Ok(Checker { lookups, schemas, shard_count: cfg.shards.len() })
    }

    /// How many shards.
    pub fn shard_count(&self) -> usize {
        self.shard_count
    }

    fn schema(&self, table: SourceTable) -> Result<&TableSchema, Error> {
        self.schemas.get(&table).ok_or(Error::NoSchema { table: table.name().into() })
    }

    /// Judges `keys` of `table` on every shard; `pg` holds PostgreSQL's rows among them (a key
    /// without one is a row PostgreSQL lacks).
    pub async fn judge(
        &self,
        table: SourceTable,
        keys: &[Vec<String>],
        pg: &[Expected],
    ) -> Result<Vec<Finding>, Error> {
        let schema = self.schema(table)?;
        let mut copies: HashMap<Vec<String>, Vec<(ShardIndex, Vec<Cell>)>> = HashMap::new();
        for shard in 0..self.shard_count {
            for cells in self.lookups.live_rows_with_keys(shard, schema, keys).await? {
                let key = schema.key.iter().map(|i| cell_text(&cells[*i])).collect();
                copies.entry(key).or_default().push((shard, cells));
            }
        }
        let placed = self.place(pg).await?;
        let by_key: HashMap<&Vec<String>, (&Expected, &Placement)> =
            pg.iter().zip(&placed).map(|(e, p)| (&e.key, (e, p))).collect();
        let mut findings = Vec::new();
        let mut seen = HashSet::new();
        for key in keys.iter().chain(pg.iter().map(|e| &e.key)) {
            if !seen.insert(key) {
                continue;
            }
            let held = copies.get(key).map(Vec::as_slice).unwrap_or_default();
            let expected = match by_key.get(key) {
                None => None,
                Some((row, placement)) => Some(self.expect(schema, row, placement)?),
            };
            findings.extend(judge_key(schema, key, expected, held));
        }
        Ok(findings)
    }

    /// Where each of `pg`'s rows belongs, and what a child carries from its card.
    async fn place(&self, pg: &[Expected]) -> Result<Vec<Placement>, Error> {
        // Each row's card fields and route, and the conversations the routes need.
        let routes: Vec<Option<(CardFields, Result<Route, String>)>> = pg
            .iter()
            .map(|e| {
                let fields = CardFields::from_row(e.card.as_ref()?);
                let route = fields.route(self.shard_count).map_err(|err| err.to_string());
                Some((fields, route))
            })
            .collect();
        let conversation_of = |e: &Expected, id: &str| {
            let card = ScorecardKey::of_row(&e.row)?;
            Some((card.customer_id, card.profile_id, id.to_owned()))
        };
        let wanted: Vec<(String, String, String)> = pg
            .iter()
            .zip(&routes)
            .filter_map(|(e, r)| match r {
                Some((_, Ok(Route::Conversation(id)))) => conversation_of(e, id),
                _ => None,
            })
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let found = self.lookups.conversations(&wanted).await?;
        Ok(pg
            .iter()
            .zip(routes)
            .map(|(e, route)| match route {
                None => Placement::Nowhere("its scorecard is not in PostgreSQL".into()),
                Some((_, Err(why))) => Placement::Nowhere(why),
                Some((fields, Ok(Route::Process(shard)))) => Placement::On(shard, fields, None),
                Some((fields, Ok(Route::Conversation(id)))) => {
                    match conversation_of(e, &id).and_then(|key| found.routed.get(&key)) {
                        Some(c) => Placement::On(c.shard, fields, Some(c.clone())),
                        None => Placement::Nowhere(format!("its conversation {id} is on no shard")),
                    }
                }
            })
            .collect())
    }

    /// What the sink would write for `row`, and where.
    fn expect(
        &self,
        schema: &TableSchema,
        row: &Expected,
        placement: &Placement,
    ) -> Result<ExpectedCopy, Error> {
        let card = ScorecardKey::of_row(&row.row);
        let pg_state = digest(&row.row, row.card.as_ref(), placement);
        Ok(match placement {
            Placement::Nowhere(why) => {
                ExpectedCopy { shard: Err(why.clone()), cells: Vec::new(), card, pg_state }
            }
            Placement::On(shard, fields, conversation) => {
                let denormalized = (schema.table != SourceTable::Scorecards).then(|| {
                    Denormalized { card: fields.clone(), conversation: conversation.clone() }
                });
                let mapped = upsert_row(schema, &row.row, 0, 0, denormalized.as_ref())
                    .map_err(Error::Schema)?;
                ExpectedCopy { shard: Ok(*shard), cells: mapped.cells, card, pg_state }
            }
        })
    }

    /// Live keys of `table` on `shard` after `after` (ClickHouse's key order), at most `limit`,
    /// within `scope`.
    pub async fn live_keys(
        &self,
        shard: ShardIndex,
        table: SourceTable,
        scope: &LiveScope,
        after: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<Vec<String>>, Error> {
        let schema = self.schema(table)?;
        let (condition, values) = scope.condition(table);
        let bind = |query: Query| {
            values.iter().fold(query, |q, v| match v {
                Bound::Text(s) => q.bind(s.as_str()),
                Bound::Int(i) => q.bind(*i),
            })
        };
        self.lookups.live_keys_after(shard, schema, after, limit, &condition, bind).await
    }

    /// Writes a delete marker over each extra or misplaced copy in `findings` that is still
    /// live with the version judged, at that version + 1; returns how many copies it asked for.
    pub async fn retire(&self, findings: &[Finding]) -> Result<usize, Error> {
        let mut groups: BTreeMap<(SourceTable, ShardIndex), Vec<(&Finding, u64)>> = BTreeMap::new();
        for f in findings {
            if let (true, Some(shard), Some(version)) = (f.kind.is_retired(), f.shard, f.version) {
                groups.entry((f.table, shard)).or_default().push((f, version));
            }
        }
        let clients = self.lookups.clients();
        let database = self.lookups.database();
        let mut asked = 0;
        for ((table, shard), judged) in groups {
            let schema = self.schema(table)?;
            let copies: Vec<JudgedCopy> = judged
                .into_iter()
                .filter_map(|(f, version)| Some((typed_key(schema, &f.key)?, version)))
                .collect();
            for chunk in copies.chunks(crate::lookup::CHUNK) {
                let query = retire_query(&clients[shard], database, schema, chunk);
                query.execute().await.map_err(Error::shard(
                    shard,
                    format!("writing delete markers over {} copies in {table}", chunk.len()),
                ))?;
                asked += chunk.len();
            }
        }
        Ok(asked)
    }
}

/// A copy judged extra or misplaced: its key, typed by its columns, and the version seen.
type JudgedCopy<'a> = (Vec<KeyValue<'a>>, u64);

/// Where a PostgreSQL row belongs.
enum Placement {
    /// On this shard, with its card's fields and conversation.
    On(ShardIndex, CardFields, Option<Conversation>),
    /// Nowhere: why.
    Nowhere(String),
}

/// What the sink would write for a row PostgreSQL has.
struct ExpectedCopy {
    /// Its shard, or why it has none.
    shard: Result<ShardIndex, String>,
    /// Its cells (`_version` 0).
    cells: Vec<Cell>,
    /// Its scorecard.
    card: Option<ScorecardKey>,
    /// Digest of what PostgreSQL had.
    pg_state: u64,
}

fn card_of_cells(schema: &TableSchema, cells: &[Cell]) -> Option<ScorecardKey> {
    let text = |name: &str| match cells.get(schema.position(name)?)? {
        Cell::Str(s) => Some(s.clone()),
        _ => None,
    };
    Some(ScorecardKey {
        customer_id: text("customer_id")?,
        profile_id: text("profile_id")?,
        scorecard_id: text("scorecard_id")?,
    })
}

fn digest(row: &Row, card: Option<&Row>, placement: &Placement) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    format!("{row:?}{card:?}").hash(&mut hasher);
    match placement {
        Placement::On(shard, _, conversation) => format!("{shard}{conversation:?}"),
        Placement::Nowhere(why) => why.clone(),
    }
    .hash(&mut hasher);
    hasher.finish().max(1)
}

/// The verdict on one key: PostgreSQL's expectation (if it has the row) against the live
/// copies the shards hold.
fn judge_key(
    schema: &TableSchema,
    key: &[String],
    expected: Option<ExpectedCopy>,
    copies: &[(ShardIndex, Vec<Cell>)],
) -> Vec<Finding> {
    let version = |cells: &[Cell]| match schema.position("_version").map(|i| &cells[i]) {
        Some(Cell::UInt(v)) => Some(*v),
        _ => None,
    };
    let finding =
        |kind, shard, version, card: &Option<ScorecardKey>, detail: String, pg_state| Finding {
            table: schema.table,
            key: key.to_vec(),
            kind,
            shard,
            version,
            card: card.clone(),
            detail,
            pg_state,
        };
    let Some(expected) = expected else {
        return copies
            .iter()
            .map(|(shard, cells)| {
                let card = card_of_cells(schema, cells);
                let detail = "PostgreSQL has no such row".to_owned();
                finding(DriftKind::Extra, Some(*shard), version(cells), &card, detail, 0)
            })
            .collect();
    };
    let card = &expected.card;
    let state = expected.pg_state;
    let home = match &expected.shard {
        Err(why) => {
            return vec![finding(DriftKind::Unroutable, None, None, card, why.clone(), state)];
        }
        Ok(home) => *home,
    };
    let mut findings = Vec::new();
    for (shard, cells) in copies.iter().filter(|(shard, _)| *shard != home) {
        let detail = format!("belongs on shard {home}");
        findings.push(finding(
            DriftKind::Misplaced,
            Some(*shard),
            version(cells),
            card,
            detail,
            state,
        ));
    }
    match copies.iter().find(|(shard, _)| *shard == home) {
        None => {
            let detail = "no live copy".to_owned();
            findings.push(finding(DriftKind::Missing, Some(home), None, card, detail, state));
        }
        Some((_, cells)) => {
            if let Some(detail) = difference(schema, &expected.cells, cells) {
                findings.push(finding(
                    DriftKind::Stale,
                    Some(home),
                    version(cells),
                    card,
                    detail,
                    state,
                ));
            }
        }
    }
    findings
}

/// The first column whose stored value differs from the expected one (`_version` and
/// `_deleted` aside), described; `None` when they agree.
fn difference(schema: &TableSchema, want: &[Cell], have: &[Cell]) -> Option<String> {
    for (i, column) in schema.columns.iter().enumerate() {
        if matches!(column.name.as_str(), "_version" | "_deleted") {
            continue;
        }
        let default = || match column.ty {
            ChType::Str => Cell::Str(String::new()),
            ChType::Int | ChType::DateTime => Cell::Int(0),
            ChType::UInt => Cell::UInt(0),
            ChType::Float => Cell::Float(0.0),
        };
        // What a NULL becomes in a column that cannot hold one.
        let stored = |cell: &Cell| match cell {
            Cell::Null if !column.nullable => default(),
            other => other.clone(),
        };
        let (want, have) = (stored(&want[i]), stored(&have[i]));
        let same = match (&want, &have) {
            (Cell::Float(a), Cell::Float(b)) => a == b || (a.is_nan() && b.is_nan()),
            (a, b) => a == b,
        };
        if !same {
            let show = |cell: &Cell| {
                let text = format!("{cell:?}");
                if text.chars().count() > 40 {
                    format!("{}...", text.chars().take(40).collect::<String>())
                } else {
                    text
                }
            };
            return Some(format!(
                "{}: clickhouse {}, postgres {}",
                column.name,
                show(&have),
                show(&want)
            ));
        }
    }
    None
}

/// `INSERT INTO db.t (every column) SELECT every column, _version + 1, 1 FROM db.t FINAL WHERE
/// (key, _version) IN (...) AND _deleted = 0`: a marker over each listed copy that is still
/// the live one of that version. Names bound as identifiers, values as values.
fn retire_query(
    client: &clickhouse::Client,
    database: &str,
    schema: &TableSchema,
    copies: &[JudgedCopy],
) -> Query {
    let columns = vec!["?"; schema.columns.len()].join(", ");
    let select: Vec<&str> = schema
        .columns
        .iter()
        .map(|c| match c.name.as_str() {
            "_version" => "_version + 1",
            "_deleted" => "toUInt8(1)",
            _ => "?",
        })
        .collect();
    let key: Vec<&str> = vec!["?"; schema.key.len()];
    let tuple = format!("({}, ?)", key.join(", "));
    let sql = format!(
        "INSERT INTO ?.? ({columns}) SELECT {} FROM ?.? FINAL WHERE _deleted = 0 AND ({}, _version) IN ({})",
        select.join(", "),
        key.join(", "),
        vec![tuple.as_str(); copies.len()].join(", ")
    );
    let table = Identifier(schema.table.name());
    let mut query = client.query(&sql).bind(Identifier(database)).bind(table);
    for column in &schema.columns {
        query = query.bind(Identifier(&column.name));
    }
    for column in &schema.columns {
        if !matches!(column.name.as_str(), "_version" | "_deleted") {
            query = query.bind(Identifier(&column.name));
        }
    }
    query = query.bind(Identifier(database)).bind(table);
    for i in &schema.key {
        query = query.bind(Identifier(&schema.columns[*i].name));
    }
    for (key, version) in copies {
        for value in key {
            query = bind_value(query, *value);
        }
        query = query.bind(*version);
    }
    query
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> TableSchema {
        let cols: Vec<(String, String)> = [
            ("customer_id", "String"),
            ("profile_id", "String"),
            ("scorecard_id", "String"),
            ("comment", "Nullable(String)"),
            ("not_applicable", "UInt8"),
            ("_version", "UInt64"),
            ("_deleted", "UInt8"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        TableSchema::new(SourceTable::Scorecards, &cols).expect("schema")
    }

    fn cells(comment: Option<&str>, version: u64) -> Vec<Cell> {
        vec![
            Cell::Str("c".into()),
            Cell::Str("p".into()),
            Cell::Str("k".into()),
            comment.map_or(Cell::Null, |c| Cell::Str(c.into())),
            Cell::UInt(0),
            Cell::UInt(version),
            Cell::UInt(0),
        ]
    }

    fn expected(shard: Result<ShardIndex, String>, comment: Option<&str>) -> ExpectedCopy {
        ExpectedCopy { shard, cells: cells(comment, 0), card: None, pg_state: 7 }
    }

    fn kinds(findings: &[Finding]) -> Vec<(DriftKind, Option<ShardIndex>, Option<u64>)> {
        findings.iter().map(|f| (f.kind, f.shard, f.version)).collect()
    }

    fn key() -> Vec<String> {
        vec!["c".into(), "p".into(), "k".into()]
    }

    #[test]
    fn a_row_on_its_shard_with_its_values_is_in_sync() {
        let s = schema();
        let found =
            judge_key(&s, &key(), Some(expected(Ok(1), Some("x"))), &[(1, cells(Some("x"), 9))]);
        assert!(found.is_empty(), "{found:?}");
    }

    #[test]
    fn a_null_in_a_column_that_cannot_hold_one_matches_the_default_stored() {
        let s = schema();
        let mut want = expected(Ok(0), None);
        want.cells[4] = Cell::Null; // not_applicable: UInt8, stored as 0
        assert!(judge_key(&s, &key(), Some(want), &[(0, cells(None, 3))]).is_empty());
        let mut want = expected(Ok(0), None);
        want.cells[4] = Cell::UInt(1);
        let found = judge_key(&s, &key(), Some(want), &[(0, cells(None, 3))]);
        assert_eq!(kinds(&found), [(DriftKind::Stale, Some(0), Some(3))]);
    }

    #[test]
    fn each_kind_of_drift_is_told_apart() {
        let s = schema();
        let stale =
            judge_key(&s, &key(), Some(expected(Ok(0), Some("x"))), &[(0, cells(Some("y"), 5))]);
        assert_eq!(kinds(&stale), [(DriftKind::Stale, Some(0), Some(5))]);
        assert!(stale[0].detail.starts_with("comment: clickhouse"), "{}", stale[0].detail);

        let missing = judge_key(&s, &key(), Some(expected(Ok(1), None)), &[]);
        assert_eq!(kinds(&missing), [(DriftKind::Missing, Some(1), None)]);

        let twice = judge_key(
            &s,
            &key(),
            Some(expected(Ok(1), None)),
            &[(0, cells(None, 3)), (1, cells(None, 4))],
        );
        assert_eq!(kinds(&twice), [(DriftKind::Misplaced, Some(0), Some(3))]);

        let moved = judge_key(&s, &key(), Some(expected(Ok(1), None)), &[(0, cells(None, 3))]);
        assert_eq!(
            kinds(&moved),
            [(DriftKind::Misplaced, Some(0), Some(3)), (DriftKind::Missing, Some(1), None)]
        );

        let extra = judge_key(&s, &key(), None, &[(0, cells(None, 3)), (1, cells(None, 4))]);
        assert_eq!(
            kinds(&extra),
            [(DriftKind::Extra, Some(0), Some(3)), (DriftKind::Extra, Some(1), Some(4))]
        );
        assert_eq!(extra[0].card.as_ref().map(|c| c.scorecard_id.as_str()), Some("k"));

        let parked = judge_key(&s, &key(), Some(expected(Err("why".into()), None)), &[]);
        assert_eq!(kinds(&parked), [(DriftKind::Unroutable, None, None)]);
        assert!(!DriftKind::Unroutable.is_drift());
    }

    #[test]
    fn a_marker_goes_only_over_the_copy_judged() {
        let s = schema();
        let key = key();
        let typed = typed_key(&s, &key).expect("a key of text columns");
        let sql = retire_query(&clickhouse::Client::default(), "db", &s, &[(typed, 41)])
            .sql_display()
            .to_string();
        assert_eq!(
            sql,
            "INSERT INTO `db`.`scorecards` (`customer_id`, `profile_id`, `scorecard_id`, \
             `comment`, `not_applicable`, `_version`, `_deleted`) SELECT `customer_id`, \
             `profile_id`, `scorecard_id`, `comment`, `not_applicable`, _version + 1, \
             toUInt8(1) FROM `db`.`scorecards` FINAL WHERE _deleted = 0 AND (`customer_id`, \
             `profile_id`, `scorecard_id`, _version) IN (('c', 'p', 'k', 41))"
        );
    }

    #[test]
    fn a_scope_binds_its_values_and_narrows_children_only_by_what_they_carry() {
        let scope = LiveScope {
            customer: Some("x'".into()),
            process: Some(false),
            created_since_us: Some(5),
            ..LiveScope::default()
        };
        let (card_sql, card_values) = scope.condition(SourceTable::Scorecards);
        assert_eq!(
            card_sql,
            "1 AND customer_id = ? AND (scorecard_type IS NULL OR scorecard_type != 2) \
             AND created_at >= ?"
        );
        assert_eq!(card_values.len(), 2);
        let (child_sql, _) = scope.condition(SourceTable::Scores);
        assert!(!child_sql.contains("created_at"), "{child_sql}");
    }
}
