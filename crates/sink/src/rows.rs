//! Change events to ClickHouse rows: the row a change writes (an upsert or a delete marker), the
//! fields a child copies from its scorecard, and a row's identity.
//!
//! Column sets come from the shard (`system.columns`, see [`crate::table`]), not from code: a
//! column added to a target table is written as soon as events carry it; an event column the
//! table lacks is left out (it still travels on the bus). Timestamps go to `Int64` microsecond
//! columns as they are, booleans to `UInt8`, `DateTime` columns take Unix seconds.

use std::fmt::Write as _;

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
pub fn cell_text(cell: &Cell) -> String {
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

/// Appends rows as TabSeparated lines (columns in schema order).
pub fn write_tsv(schema: &TableSchema, rows: &[ChRow], out: &mut Vec<u8>) {
    let mut line = String::new();
    for row in rows {
        line.clear();
        for (i, (cell, column)) in row.cells.iter().zip(&schema.columns).enumerate() {
            if i > 0 {
                line.push('\t');
            }
            write_cell(&mut line, cell, column);
        }
        line.push('\n');
        out.extend_from_slice(line.as_bytes());
    }
}

fn write_cell(out: &mut String, cell: &Cell, column: &ChColumn) {
    match cell {
        Cell::Null if column.nullable => out.push_str("\\N"),
        Cell::Null => match column.ty {
            ChType::Str => {}
            ChType::Int | ChType::UInt | ChType::DateTime => out.push('0'),
            ChType::Float => out.push('0'),
        },
        Cell::Str(s) => {
            for c in s.chars() {
                match c {
                    '\\' => out.push_str("\\\\"),
                    '\t' => out.push_str("\\t"),
                    '\n' => out.push_str("\\n"),
                    '\r' => out.push_str("\\r"),
                    '\0' => out.push_str("\\0"),
                    c => out.push(c),
                }
            }
        }
        Cell::Int(i) => {
            let _ = write!(out, "{i}");
        }
        Cell::UInt(u) => {
            let _ = write!(out, "{u}");
        }
        Cell::Float(f) if f.is_nan() => out.push_str("nan"),
        Cell::Float(f) if f.is_infinite() => out.push_str(if *f > 0.0 { "inf" } else { "-inf" }),
        Cell::Float(f) => {
            let _ = write!(out, "{f:?}");
        }
    }
}

/// Parses one TabSeparated line (as ClickHouse writes it) into cells for `columns`.
pub fn parse_tsv_line(columns: &[ChColumn], line: &str) -> Option<Vec<Cell>> {
    let fields: Vec<&str> = line.split('\t').collect();
    if fields.len() != columns.len() {
        return None;
    }
    fields
        .iter()
        .zip(columns)
        .map(|(field, column)| {
            if *field == "\\N" {
                return Some(Cell::Null);
            }
            Some(match column.ty {
                ChType::Str => Cell::Str(unescape(field)),
                ChType::Int => Cell::Int(field.parse().ok()?),
                ChType::UInt => Cell::UInt(field.parse().ok()?),
                ChType::Float => Cell::Float(match *field {
                    "nan" | "-nan" => f64::NAN,
                    "inf" => f64::INFINITY,
                    "-inf" => f64::NEG_INFINITY,
                    other => other.parse().ok()?,
                }),
                ChType::DateTime => Cell::Int(field.parse().ok()?),
            })
        })
        .collect()
}

fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut chars = field.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('t') => out.push('\t'),
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('b') => out.push('\u{8}'),
            Some('f') => out.push('\u{c}'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
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
    fn tsv_round_trips_escapes_nulls_and_special_floats() {
        let s = schema();
        let row = upsert_row(&s, &source(), 7, 0, None).expect("row");
        let mut out = Vec::new();
        write_tsv(&s, std::slice::from_ref(&row), &mut out);
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("s\\t1") && text.contains("nan") && text.contains("\\N"), "{text}");
        let parsed = parse_tsv_line(&s.columns, text.trim_end_matches('\n')).expect("parses");
        // NaN != NaN: compare everything else.
        for (i, (a, b)) in parsed.iter().zip(&row.cells).enumerate() {
            if i != s.position("numeric_value").expect("nv") {
                assert_eq!(a, b, "column {}", s.columns[i].name);
            }
        }
        // A NULL in a non-nullable column is written as the type's default.
        let mut without = source();
        without.columns.retain(|c| c.name != "not_applicable");
        let row = upsert_row(&s, &without, 7, 0, None).expect("row");
        let mut out = Vec::new();
        write_tsv(&s, &[row], &mut out);
        let text = String::from_utf8(out).expect("utf8");
        let fields: Vec<&str> = text.trim_end().split('\t').collect();
        assert_eq!(fields[s.position("not_applicable").expect("na")], "0", "{text}");
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
