//! ClickHouse's RowBinary format for rows whose columns are known only at run time.
//!
//! Hand-written because no crate does this for our case: the `clickhouse` crate encodes and
//! decodes RowBinary through serde for Rust types fixed at compile time, while a target table's
//! columns come from the shard (`system.columns`) and may grow while the sink runs. The format is
//! small: per row, each column in order; `Nullable` is a flag byte (1 = NULL) before the value;
//! integers, `DateTime` (UInt32 seconds) and floats are little-endian of the column's width;
//! a string is its LEB128 length and bytes.
//!
//! Binary, not text, on purpose: floats travel exactly (ClickHouse 18.16's text float parser can
//! be an ulp off), and no escaping is involved.

use crate::rows::ChRow;
use crate::table::{Cell, ChColumn, ChType, TableSchema};

/// Appends rows in ClickHouse's RowBinary format (columns in schema order). Binary floats
/// arrive exactly as they left PostgreSQL; ClickHouse 18.16's text float parser can be off by an
/// ulp (3.47 became 3.4699999999999998), which TabSeparated inserts would store.
pub(crate) fn write_row_binary(schema: &TableSchema, rows: &[ChRow], out: &mut Vec<u8>) {
    for row in rows {
        for (cell, column) in row.cells.iter().zip(&schema.columns) {
            if column.nullable {
                if *cell == Cell::Null {
                    out.push(1);
                    continue;
                }
                out.push(0);
            }
            write_binary_cell(out, cell, column);
        }
    }
}

fn write_binary_cell(out: &mut Vec<u8>, cell: &Cell, column: &ChColumn) {
    let width = usize::from(column.width);
    match column.ty {
        ChType::Str => {
            let bytes: &[u8] = match cell {
                Cell::Str(s) => s.as_bytes(),
                _ => &[],
            };
            let mut len = bytes.len() as u64;
            loop {
                let byte = (len & 0x7f) as u8;
                len >>= 7;
                if len == 0 {
                    out.push(byte);
                    break;
                }
                out.push(byte | 0x80);
            }
            out.extend_from_slice(bytes);
        }
        ChType::Int | ChType::UInt | ChType::DateTime => {
            let value: i64 = match cell {
                Cell::Int(i) => *i,
                Cell::UInt(u) => *u as i64,
                Cell::Float(f) => *f as i64,
                Cell::Str(_) | Cell::Null => 0,
            };
            out.extend_from_slice(&value.to_le_bytes()[..width.clamp(1, 8)]);
        }
        ChType::Float => {
            let value = match cell {
                Cell::Float(f) => *f,
                Cell::Int(i) => *i as f64,
                Cell::UInt(u) => *u as f64,
                Cell::Str(_) | Cell::Null => 0.0,
            };
            if width == 4 {
                out.extend_from_slice(&(value as f32).to_le_bytes());
            } else {
                out.extend_from_slice(&value.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scoresync_event::SourceTable;

    #[test]
    fn row_binary_layout() {
        let cols: Vec<(String, String)> = [
            ("customer_id", "String"),
            ("profile_id", "String"),
            ("score_id", "String"),
            ("numeric_value", "Nullable(Float64)"),
            ("scorecard_type", "Nullable(Int16)"),
            ("_version", "UInt64"),
            ("_deleted", "UInt8"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let s = TableSchema::new(SourceTable::Scores, &cols).expect("schema");
        let row = ChRow {
            table: SourceTable::Scores,
            cells: vec![
                Cell::Str("c".into()),
                Cell::Str("p".repeat(200)),
                Cell::Str(String::new()),
                Cell::Float(3.47),
                Cell::Null,
                Cell::UInt(258),
                Cell::UInt(1),
            ],
            version: 258,
            seq: 0,
            unknown: Vec::new(),
            commit_time_us: 0,
        };
        let mut out = Vec::new();
        write_row_binary(&s, &[row], &mut out);
        let mut expected = vec![1, b'c', 0xC8, 0x01];
        expected.extend(std::iter::repeat_n(b'p', 200));
        expected.push(0);
        expected.push(0);
        expected.extend(3.47_f64.to_le_bytes());
        expected.push(1);
        expected.extend(258_u64.to_le_bytes());
        expected.push(1);
        assert_eq!(out, expected);
    }
}
