//! Change events to ClickHouse rows: the row a change writes (an upsert or a delete marker), the
//! fields a child copies from its scorecard, and a row's identity.
//!
//! Column sets come from the shard (`system.columns`, see [`crate::table`]), not from code: a
//! column added to a target table is written as soon as events carry it; an event column the
//! table lacks is left out (it still travels on the bus). So a row is cells aligned with its
//! table's schema, mapped here by hand, not a Rust struct a serde derive could fill. Timestamps
//! go to `Int64` microsecond columns as they are, booleans to `UInt8`, `DateTime` columns take
//! Unix seconds.

use scoresync_event::v1::value::Kind;
use scoresync_event::{Row, SourceTable, Value};

use crate::route::{CardFields, Conversation};
use crate::table::{Cell, ChColumn, ChType, TableSchema};

/// A row that cannot be mapped to its table (dead-lettered).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RowError {
    /// The table lacks a column every row needs.
    #[error("clickhouse table {0} lacks column {1}")]
    MissingColumn(String, String),
    /// A value does not fit its column.
    #[error("{table}.{column}: value {value} does not fit a {ty:?} column")]
    Type {
        /// Table.
        table: String,
        /// Column.
        column: String,
        /// The value (shortened).
        value: String,
        /// The column's shape.
        ty: ChType,
    },
    /// A primary-key column is missing or NULL.
    #[error("{0}: primary-key column {1} is missing or NULL")]
    NoKey(String, String),
}

/// The identity of a row: table and primary-key values in text form.
pub type RowKey = (SourceTable, Vec<String>);

/// A row for one target table, aligned with its [`TableSchema`].
#[derive(Clone, Debug, PartialEq)]
pub struct ChRow {
    /// Table.
    pub table: SourceTable,
    /// Cells in column order.
    pub cells: Vec<Cell>,
    /// Version (`_version`).
    pub version: u64,
    /// Position in the transaction: orders rows of equal version.
    pub seq: u32,
    /// Columns whose value is unknown (unchanged TOAST) and must be taken from the stored row.
    pub unknown: Vec<usize>,
    /// Commit time of the change (Unix microseconds), for lag metrics.
    pub commit_time_us: i64,
}

impl ChRow {
    /// The row's identity.
    pub fn key(&self, schema: &TableSchema) -> RowKey {
        (self.table, schema.key.iter().map(|i| cell_text(&self.cells[*i])).collect())
    }

    /// True for a delete marker.
    pub fn is_delete(&self, schema: &TableSchema) -> bool {
        schema.position("_deleted").is_some_and(|i| self.cells[i] == Cell::UInt(1))
    }
}

/// The text of a cell, as used in row keys.
pub(crate) fn cell_text(cell: &Cell) -> String {
    match cell {
        Cell::Null => String::new(),
        Cell::Str(s) => s.clone(),
        Cell::Int(i) => i.to_string(),
        Cell::UInt(u) => u.to_string(),
        Cell::Float(f) => f.to_string(),
    }
}

fn shorten(value: &Value) -> String {
    let text = format!("{:?}", value.kind);
    text.chars().take(60).collect()
}

/// Converts a contract value for a column.
fn cell(schema: &TableSchema, column: &ChColumn, value: &Value) -> Result<Cell, RowError> {
    let mismatch = || RowError::Type {
        table: schema.table.name().into(),
        column: column.name.clone(),
        value: shorten(value),
        ty: column.ty,
    };
    let Some(kind) = &value.kind else { return Ok(Cell::Null) };
    Ok(match (column.ty, kind) {
        (_, Kind::Null(_)) => Cell::Null,
        (_, Kind::UnchangedToast(_)) => Cell::Null,
        (ChType::Str, Kind::Text(s)) => Cell::Str(s.clone()),
        (ChType::Str, Kind::Int(i)) => Cell::Str(i.to_string()),
        (ChType::Str, Kind::Float(f)) => Cell::Str(f.to_string()),
        (ChType::Str, Kind::Boolean(b)) => Cell::Str(b.to_string()),
        (ChType::Str, Kind::TimestampUs(t)) => Cell::Str(t.to_string()),
        (ChType::Int, Kind::Int(i) | Kind::TimestampUs(i)) => Cell::Int(*i),
        (ChType::Int, Kind::Boolean(b)) => Cell::Int(i64::from(*b)),
        (ChType::Int, Kind::Text(s)) => Cell::Int(s.parse().map_err(|_| mismatch())?),
        (ChType::UInt, Kind::Boolean(b)) => Cell::UInt(u64::from(*b)),
        (ChType::UInt, Kind::Int(i)) => Cell::UInt(u64::try_from(*i).map_err(|_| mismatch())?),
        (ChType::UInt, Kind::Text(s)) => Cell::UInt(s.parse().map_err(|_| mismatch())?),
        (ChType::Float, Kind::Float(f)) => Cell::Float(*f),
        (ChType::Float, Kind::Int(i)) => Cell::Float(*i as f64),
        (ChType::Float, Kind::Text(s)) => Cell::Float(s.parse().map_err(|_| mismatch())?),
        (ChType::DateTime, Kind::TimestampUs(t)) => Cell::Int(t.div_euclid(1_000_000).max(0)),
        (ChType::DateTime, Kind::Int(i)) => Cell::Int((*i).max(0)),
        _ => return Err(mismatch()),
    })
}

/// What a child row (score, historic score) copies from its scorecard.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Denormalized {
    /// The scorecard's fields.
    pub card: CardFields,
    /// Its conversation (conversation scorecards).
    pub conversation: Option<Conversation>,
}

impl Denormalized {
    fn cells(&self) -> [(&'static str, Cell); 8] {
        let text = |v: &Option<String>| v.clone().map_or(Cell::Null, Cell::Str);
        let int = |v: Option<i64>| v.map_or(Cell::Null, Cell::Int);
        [
            ("scorecard_type", int(self.card.scorecard_type)),
            ("template_id", text(&self.card.template_id)),
            ("template_revision", text(&self.card.template_revision)),
            ("agent_user_id", text(&self.card.agent_user_id)),
            ("conversation_id", text(&self.card.conversation_id)),
            ("process_interaction_at", int(self.card.process_interaction_at)),
            (
                "conversation_start_time",
                self.conversation.as_ref().map_or(Cell::Null, |c| Cell::Int(c.start_time)),
            ),
            (
                "language_code",
                self.conversation
                    .as_ref()
                    .map_or(Cell::Null, |c| Cell::Str(c.language_code.clone())),
            ),
        ]
    }

    /// Writes the denormalized cells into `row` (columns the table lacks are skipped).
    pub fn apply(&self, schema: &TableSchema, row: &mut ChRow) {
        for (name, value) in self.cells() {
            if let Some(i) = schema.position(name) {
                row.cells[i] = value;
            }
        }
    }
}

/// Builds the row a change writes: the event's columns that the table has, `_version`,
/// `_deleted = 0`, and (for children) the scorecard's fields. Unchanged-TOAST columns are
/// listed in [`ChRow::unknown`].
pub fn upsert_row(
    schema: &TableSchema,
    source: &Row,
    version: u64,
    seq: u32,
    denormalized: Option<&Denormalized>,
) -> Result<ChRow, RowError> {
    let mut row = empty_row(schema, version, seq, false);
    for column in &source.columns {
        let (Some(i), Some(value)) = (schema.position(&column.name), &column.value) else {
            continue;
        };
        if value.is_unchanged_toast() {
            row.unknown.push(i);
            continue;
        }
        row.cells[i] = cell(schema, &schema.columns[i], value)?;
    }
    if let Some(d) = denormalized {
        d.apply(schema, &mut row);
    }
    check_key(schema, &row)?;
    Ok(row)
}

/// A delete marker: every primary-key column (the sort key) from `source`, `_deleted = 1`.
pub fn delete_row(
    schema: &TableSchema,
    source: &Row,
    version: u64,
    seq: u32,
) -> Result<ChRow, RowError> {
    let mut row = empty_row(schema, version, seq, true);
    for &i in &schema.key {
        let column = &schema.columns[i];
        if let Some(value) = source.column(&column.name).and_then(|c| c.value.as_ref()) {
            row.cells[i] = cell(schema, column, value)?;
        }
    }
    check_key(schema, &row)?;
    Ok(row)
}

fn empty_row(schema: &TableSchema, version: u64, seq: u32, deleted: bool) -> ChRow {
    let mut cells = vec![Cell::Null; schema.columns.len()];
    if let Some(i) = schema.position("_version") {
        cells[i] = Cell::UInt(version);
    }
    if let Some(i) = schema.position("_deleted") {
        cells[i] = Cell::UInt(u64::from(deleted));
    }
    ChRow { table: schema.table, cells, version, seq, unknown: Vec::new(), commit_time_us: 0 }
}

fn check_key(schema: &TableSchema, row: &ChRow) -> Result<(), RowError> {
    for &i in &schema.key {
        if row.cells[i] == Cell::Null {
            return Err(RowError::NoKey(
                schema.table.name().into(),
                schema.columns[i].name.clone(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rowbinary::{read_row_binary, write_row_binary};
    use scoresync_event::Column;

    fn schema() -> TableSchema {
        let cols = [
            ("customer_id", "String"),
            ("profile_id", "String"),
            ("score_id", "String"),
            ("scorecard_id", "String"),
            ("criterion_id", "String"),
            ("numeric_value", "Nullable(Float64)"),
            ("not_applicable", "UInt8"),
            ("comment", "Nullable(String)"),
            ("created_at", "Nullable(Int64)"),
            ("scorecard_type", "Nullable(Int16)"),
            ("conversation_start_time", "Nullable(DateTime)"),
            ("language_code", "Nullable(String)"),
            ("_version", "UInt64"),
            ("_deleted", "UInt8"),
        ];
        let cols: Vec<(String, String)> =
            cols.iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        TableSchema::new(SourceTable::Scores, &cols).expect("schema")
    }

    fn col(name: &str, value: Value) -> Column {
        Column { name: name.into(), type_oid: 0, value: Some(value) }
    }

    fn source() -> Row {
        Row {
            columns: vec![
                col("customer_id", Value::text("c")),
                col("profile_id", Value::text("p")),
                col("score_id", Value::text("s\t1")),
                col("scorecard_id", Value::text("card")),
                col("criterion_id", Value::text("k")),
                col("numeric_value", Value::float(f64::NAN)),
                col("not_applicable", Value::boolean(true)),
                col("comment", Value::unchanged_toast()),
                col("created_at", Value::timestamp_us(-5)),
                col("new_pg_column", Value::text("travels, not stored")),
            ],
        }
    }

    #[test]
    fn upsert_maps_types_marks_unknown_toast_and_denormalizes() {
        let s = schema();
        let denorm = Denormalized {
            card: CardFields { scorecard_type: Some(1), ..Default::default() },
            conversation: Some(Conversation {
                shard: 1,
                start_time: 1_700_000_000,
                language_code: "de".into(),
            }),
        };
        let row = upsert_row(&s, &source(), 42, 3, Some(&denorm)).expect("row");
        assert_eq!(row.unknown, vec![s.position("comment").expect("comment")]);
        assert_eq!(row.cells[s.position("not_applicable").expect("na")], Cell::UInt(1));
        assert_eq!(row.cells[s.position("created_at").expect("c")], Cell::Int(-5));
        assert_eq!(row.cells[s.position("scorecard_type").expect("t")], Cell::Int(1));
        assert_eq!(
            row.cells[s.position("conversation_start_time").expect("st")],
            Cell::Int(1_700_000_000)
        );
        assert_eq!(row.cells[s.position("_version").expect("v")], Cell::UInt(42));
        assert_eq!(row.key(&s), (SourceTable::Scores, vec!["c".into(), "p".into(), "s\t1".into()]));
        assert!(!row.is_delete(&s));
    }

    #[test]
    fn mapped_rows_round_trip_through_row_binary() {
        let s = schema();
        let row = upsert_row(&s, &source(), 7, 0, None).expect("row");
        let mut out = Vec::new();
        write_row_binary(&s, std::slice::from_ref(&row), &mut out);
        let decoded = read_row_binary(&s.columns, &out).expect("decodes");
        // NaN != NaN: compare everything else.
        let nv = s.position("numeric_value").expect("nv");
        assert!(matches!(decoded[0][nv], Cell::Float(f) if f.is_nan()));
        for (i, (a, b)) in decoded[0].iter().zip(&row.cells).enumerate() {
            if i != nv {
                assert_eq!(a, b, "column {}", s.columns[i].name);
            }
        }
        // A NULL in a non-nullable column is written as the type's default.
        let mut without = source();
        without.columns.retain(|c| c.name != "not_applicable");
        let row = upsert_row(&s, &without, 7, 0, None).expect("row");
        let mut out = Vec::new();
        write_row_binary(&s, &[row], &mut out);
        let decoded = read_row_binary(&s.columns, &out).expect("decodes");
        assert_eq!(decoded[0][s.position("not_applicable").expect("na")], Cell::UInt(0));
    }

    #[test]
    fn delete_marker_carries_every_key_column() {
        let s = schema();
        let row = delete_row(&s, &source(), 9, 1).expect("row");
        assert!(row.is_delete(&s));
        for &i in &s.key {
            assert_ne!(row.cells[i], Cell::Null);
        }
        assert_eq!(row.cells[s.position("numeric_value").expect("nv")], Cell::Null);
        let keyless = Row { columns: vec![col("customer_id", Value::text("c"))] };
        assert!(matches!(delete_row(&s, &keyless, 9, 1), Err(RowError::NoKey(..))));
    }

    #[test]
    fn type_mismatch_is_an_error_naming_the_column() {
        let s = schema();
        let mut bad = source();
        bad.columns[8] = col("created_at", Value::text("yesterday"));
        let err = upsert_row(&s, &bad, 1, 0, None).expect_err("mismatch");
        assert!(err.to_string().contains("scores.created_at"), "{err}");
    }
}
