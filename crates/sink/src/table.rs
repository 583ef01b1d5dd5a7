//! The type model of a target table as a shard has it: its columns (from `system.columns`, not
//! from code), the shape of each column's values, its primary key, and the value of one cell.
//!
//! Hand-written, and coarse on purpose: a column is a string, a signed or unsigned integer of
//! some width, a float, or a `DateTime`; `Nullable` and `LowCardinality` wrappers are seen
//! through. That is all the row mapping (`rows`) and the RowBinary codec
//! (`rowbinary`) dispatch on, and all the target tables use (`schemas/clickhouse`);
//! the `clickhouse` crate's own type model serves its compile-time row types, not a column set
//! read at run time. A column of another type (Date, Decimal, UUID, Enum) would be taken for a
//! string, which RowBinary does not forgive: such a column needs a shape here first.

use clickhouse::sql::Identifier;
use std::collections::HashMap;

use scoresync_event::SourceTable;

use crate::rows::RowError;

/// The shape of a ClickHouse column's values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChType {
    /// String (and anything without a closer mapping).
    Str,
    /// Signed integers.
    Int,
    /// Unsigned integers.
    UInt,
    /// Floats.
    Float,
    /// DateTime (Unix seconds).
    DateTime,
}

/// One column of a target table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChColumn {
    /// Name.
    pub name: String,
    /// Value shape.
    pub ty: ChType,
    /// `Nullable(...)`.
    pub nullable: bool,
    /// Bytes of a fixed-width value in RowBinary (8 for Int64, 2 for Int16, 4 for DateTime).
    pub width: u8,
}

impl ChColumn {
    /// Parses a ClickHouse type name (`Nullable(Int64)`, `LowCardinality(String)`, ...).
    pub fn new(name: &str, type_name: &str) -> ChColumn {
        let mut inner = type_name.trim();
        let mut nullable = false;
        loop {
            if let Some(rest) = inner.strip_prefix("Nullable(").and_then(|r| r.strip_suffix(')')) {
                nullable = true;
                inner = rest;
            } else if let Some(rest) =
                inner.strip_prefix("LowCardinality(").and_then(|r| r.strip_suffix(')'))
            {
                inner = rest;
            } else {
                break;
            }
        }
        let bits = |prefix: &str| {
            inner.strip_prefix(prefix).and_then(|b| b.parse::<u8>().ok()).map(|b| b / 8)
        };
        let (ty, width) = if inner.starts_with("DateTime") && !inner.starts_with("DateTime64") {
            (ChType::DateTime, 4)
        } else if let Some(width) = bits("UInt") {
            (ChType::UInt, width)
        } else if let Some(width) = bits("Int") {
            (ChType::Int, width)
        } else if let Some(width) = bits("Float") {
            (ChType::Float, width)
        } else {
            (ChType::Str, 0)
        };
        ChColumn { name: name.to_owned(), ty, nullable, width }
    }
}

/// A target table as a shard has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableSchema {
    /// The table.
    pub table: SourceTable,
    /// Its columns, in table order.
    pub columns: Vec<ChColumn>,
    index: HashMap<String, usize>,
    /// Positions of the primary-key columns, in key order.
    pub key: Vec<usize>,
}

impl TableSchema {
    /// A schema from `(name, ClickHouse type)` pairs; fails when a primary-key column, `_version`
    /// or `_deleted` is missing.
    pub fn new(table: SourceTable, columns: &[(String, String)]) -> Result<TableSchema, RowError> {
        let columns: Vec<ChColumn> = columns.iter().map(|(n, t)| ChColumn::new(n, t)).collect();
        let index: HashMap<String, usize> =
            columns.iter().enumerate().map(|(i, c)| (c.name.clone(), i)).collect();
        let missing = |name: &str| RowError::MissingColumn(table.name().into(), name.into());
        let key = table
            .primary_key()
            .iter()
            .map(|k| index.get(*k).copied().ok_or_else(|| missing(k)))
            .collect::<Result<_, _>>()?;
        for required in ["_version", "_deleted"] {
            index.get(required).ok_or_else(|| missing(required))?;
        }
        Ok(TableSchema { table, columns, index, key })
    }

    /// The position of column `name`.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// `INSERT INTO <database>.<table> (<every column>) FORMAT RowBinary`, names quoted by the
    /// `clickhouse` crate (bound as identifiers).
    pub(crate) fn insert_sql(&self, database: &str) -> String {
        let columns = vec!["?"; self.columns.len()].join(", ");
        let sql = format!("INSERT INTO ?.? ({columns}) FORMAT RowBinary");
        let query = clickhouse::Client::default()
            .query(&sql)
            .bind(Identifier(database))
            .bind(Identifier(self.table.name()));
        let query = self.columns.iter().fold(query, |q, c| q.bind(Identifier(&c.name)));
        query.sql_display().to_string()
    }

    /// The delete markers a TRUNCATE at `version` writes: `INSERT ... SELECT` of every live row
    /// older than it, with `_version = version` and `_deleted = 1`; names bound as identifiers.
    pub(crate) fn truncate_sql(&self, database: &str, version: u64) -> String {
        let columns = vec!["?"; self.columns.len()].join(", ");
        let select: Vec<&str> = self
            .columns
            .iter()
            .map(|c| match c.name.as_str() {
                "_version" => "toUInt64(?)",
                "_deleted" => "toUInt8(1)",
                _ => "?",
            })
            .collect();
        let sql = format!(
            "INSERT INTO ?.? ({columns}) SELECT {} FROM ?.? FINAL WHERE _version < ? AND _deleted = 0",
            select.join(", ")
        );
        let table = Identifier(self.table.name());
        let query =
            clickhouse::Client::default().query(&sql).bind(Identifier(database)).bind(table);
        let query = self.columns.iter().fold(query, |q, c| q.bind(Identifier(&c.name)));
        let query = self.columns.iter().fold(query, |q, c| match c.name.as_str() {
            "_version" => q.bind(version),
            "_deleted" => q,
            name => q.bind(Identifier(name)),
        });
        let query = query.bind(Identifier(database)).bind(table).bind(version);
        query.sql_display().to_string()
    }
}

/// A value in a ClickHouse row.
#[derive(Clone, Debug, PartialEq)]
pub enum Cell {
    /// NULL (or the type's default in a non-nullable column).
    Null,
    /// A string.
    Str(String),
    /// A signed integer.
    Int(i64),
    /// An unsigned integer.
    UInt(u64),
    /// A float.
    Float(f64),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clickhouse_type_names() {
        assert_eq!(
            ChColumn::new("a", "Nullable(Int64)"),
            ChColumn { name: "a".into(), ty: ChType::Int, nullable: true, width: 8 }
        );
        assert_eq!(ChColumn::new("a", "Int16").width, 2);
        assert_eq!(ChColumn::new("a", "UInt8").ty, ChType::UInt);
        assert_eq!(ChColumn::new("a", "LowCardinality(Nullable(String))").ty, ChType::Str);
        assert_eq!(ChColumn::new("a", "DateTime('UTC')").ty, ChType::DateTime);
        assert_eq!(ChColumn::new("a", "Float64").ty, ChType::Float);
    }
}
