//! ClickHouse's RowBinary format for rows whose columns are known only at run time: the encoder
//! the shard writers insert with, and its inverse, which reads whole stored rows back (lookups,
//! the test oracle).
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
        write_cells(out, &schema.columns, &row.cells);
    }
}

/// One row: each cell as its column's type. A NULL in a non-nullable column is written as the
/// type's default (0, empty string).
fn write_cells(out: &mut Vec<u8>, columns: &[ChColumn], cells: &[Cell]) {
    for (cell, column) in cells.iter().zip(columns) {
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

fn write_binary_cell(out: &mut Vec<u8>, cell: &Cell, column: &ChColumn) {
    let width = usize::from(column.width);
    match column.ty {
        ChType::Str => {
            let bytes: &[u8] = match cell {
                Cell::Str(s) => s.as_bytes(),
                _ => &[],
            };
            write_length(out, bytes.len());
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

/// A string's length: unsigned LEB128.
fn write_length(out: &mut Vec<u8>, len: usize) {
    let mut len = len as u64;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// Bytes that are not RowBinary rows of the expected columns.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("row {row}, column {column}: {problem}")]
pub(crate) struct DecodeError {
    /// The row being read (0-based).
    pub row: usize,
    /// The column being read.
    pub column: String,
    /// What is wrong.
    pub problem: &'static str,
}

/// Reads RowBinary rows of `columns` (in that order): the inverse of [`write_row_binary`].
/// Signed integers and `DateTime` (Unix seconds) come back as [`Cell::Int`], unsigned ones as
/// [`Cell::UInt`], NULL only from a nullable column. A string that is not UTF-8 is read lossily
/// (the sink stores only text that came from PostgreSQL).
pub(crate) fn read_row_binary(
    columns: &[ChColumn],
    mut bytes: &[u8],
) -> Result<Vec<Vec<Cell>>, DecodeError> {
    let mut rows = Vec::new();
    if columns.is_empty() && !bytes.is_empty() {
        return Err(DecodeError { row: 0, column: String::new(), problem: "data for no columns" });
    }
    while !bytes.is_empty() {
        let mut cells = Vec::with_capacity(columns.len());
        for column in columns {
            let cell = read_cell(&mut bytes, column).map_err(|problem| DecodeError {
                row: rows.len(),
                column: column.name.clone(),
                problem,
            })?;
            cells.push(cell);
        }
        rows.push(cells);
    }
    Ok(rows)
}

fn read_cell(bytes: &mut &[u8], column: &ChColumn) -> Result<Cell, &'static str> {
    if column.nullable {
        match take(bytes, 1)?[0] {
            0 => {}
            1 => return Ok(Cell::Null),
            _ => return Err("a NULL flag other than 0 or 1"),
        }
    }
    let width = usize::from(column.width);
    Ok(match column.ty {
        ChType::Str => {
            let len = read_length(bytes)?;
            Cell::Str(String::from_utf8_lossy(take(bytes, len)?).into_owned())
        }
        ChType::Int => Cell::Int(i64::from_le_bytes(read_integer(bytes, width, true)?)),
        ChType::DateTime => Cell::Int(i64::from_le_bytes(read_integer(bytes, width, false)?)),
        ChType::UInt => Cell::UInt(u64::from_le_bytes(read_integer(bytes, width, false)?)),
        ChType::Float => match width {
            4 => Cell::Float(f64::from(f32::from_le_bytes(take_array(bytes)?))),
            8 => Cell::Float(f64::from_le_bytes(take_array(bytes)?)),
            _ => return Err("a float width other than 4 or 8 bytes"),
        },
    })
}

/// A little-endian integer of `width` bytes (1, 2, 4 or 8) widened to 8, sign-extended when
/// `signed`.
fn read_integer(bytes: &mut &[u8], width: usize, signed: bool) -> Result<[u8; 8], &'static str> {
    if !matches!(width, 1 | 2 | 4 | 8) {
        return Err("an integer width other than 1, 2, 4 or 8 bytes");
    }
    let raw = take(bytes, width)?;
    let negative = signed && raw[width - 1] & 0x80 != 0;
    let mut wide = if negative { [0xff; 8] } else { [0; 8] };
    wide[..width].copy_from_slice(raw);
    Ok(wide)
}

fn read_length(bytes: &mut &[u8]) -> Result<usize, &'static str> {
    let mut len: u64 = 0;
    for shift in (0..64).step_by(7) {
        let byte = take(bytes, 1)?[0];
        len |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return usize::try_from(len).map_err(|_| "a string longer than memory");
        }
    }
    Err("a string length of more than 10 bytes")
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
    let (head, rest) = bytes.split_at_checked(n).ok_or("the data ends early")?;
    *bytes = rest;
    Ok(head)
}

fn take_array<const N: usize>(bytes: &mut &[u8]) -> Result<[u8; N], &'static str> {
    take(bytes, N)?.try_into().map_err(|_| "the data ends early")
}

#[cfg(test)]
mod tests {
    use super::*;
    use scoresync_event::SourceTable;

    /// A column of every shape and width the codec handles.
    fn every_type() -> Vec<ChColumn> {
        "s:String ns:Nullable(String) lc:LowCardinality(String) i8:Int8 i16:Int16 i32:Int32 \
         i64:Int64 ni64:Nullable(Int64) u8:UInt8 u16:UInt16 u32:UInt32 u64:UInt64 f32:Float32 \
         f64:Float64 nf64:Nullable(Float64) dt:DateTime ndt:Nullable(DateTime('UTC'))"
            .split_whitespace()
            .filter_map(|column| column.split_once(':'))
            .map(|(name, ty)| ChColumn::new(name, ty))
            .collect()
    }

    fn encode(columns: &[ChColumn], rows: &[Vec<Cell>]) -> Vec<u8> {
        let mut out = Vec::new();
        for cells in rows {
            write_cells(&mut out, columns, cells);
        }
        out
    }

    /// Equal cells, floats compared bit for bit (NaN equals NaN, -0.0 differs from 0.0).
    fn assert_same(decoded: &[Vec<Cell>], expected: &[Vec<Cell>]) {
        assert_eq!(decoded.len(), expected.len());
        for (got, want) in decoded.iter().zip(expected) {
            for (i, (a, b)) in got.iter().zip(want).enumerate() {
                match (a, b) {
                    (Cell::Float(a), Cell::Float(b)) if a.is_nan() => assert!(b.is_nan(), "{i}"),
                    (Cell::Float(a), Cell::Float(b)) => assert_eq!(a.to_bits(), b.to_bits(), "{i}"),
                    _ => assert_eq!(a, b, "column {i}"),
                }
            }
            assert_eq!(got.len(), want.len());
        }
    }

    #[test]
    fn every_type_round_trips() {
        let columns = every_type();
        let rows = vec![
            vec![
                Cell::Str(String::new()),
                Cell::Null,
                Cell::Str("lc".into()),
                Cell::Int(-128),
                Cell::Int(-32_768),
                Cell::Int(i64::from(i32::MIN)),
                Cell::Int(i64::MIN),
                Cell::Null,
                Cell::UInt(255),
                Cell::UInt(65_535),
                Cell::UInt(u64::from(u32::MAX)),
                Cell::UInt(u64::MAX),
                Cell::Float(1.5),
                Cell::Float(-0.0),
                Cell::Null,
                Cell::Int(0),
                Cell::Null,
            ],
            vec![
                Cell::Str("Grüße, 会話 🎉 \t\n\r\0 \\ ' \"".into()),
                Cell::Str("x".repeat(300)),
                Cell::Str(String::new()),
                Cell::Int(127),
                Cell::Int(32_767),
                Cell::Int(i64::from(i32::MAX)),
                Cell::Int(-1),
                Cell::Int(i64::MAX),
                Cell::UInt(0),
                Cell::UInt(1),
                Cell::UInt(0),
                Cell::UInt(1 << 63),
                Cell::Float(f64::from(f32::MIN_POSITIVE)),
                Cell::Float(3.47),
                Cell::Float(-1e300),
                Cell::Int(1_700_000_000),
                Cell::Int(i64::from(u32::MAX)),
            ],
        ];
        let decoded = read_row_binary(&columns, &encode(&columns, &rows)).expect("decodes");
        assert_same(&decoded, &rows);
    }

    #[test]
    fn special_floats_round_trip() {
        let columns = vec![ChColumn::new("f64", "Float64"), ChColumn::new("f32", "Float32")];
        let specials = [
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            -0.0,
            f64::MIN_POSITIVE,
            5e-324,
            f64::MAX,
            f64::MIN,
            0.1 + 0.2,
        ];
        let rows: Vec<Vec<Cell>> = specials
            .iter()
            .map(|f| vec![Cell::Float(*f), Cell::Float(f64::from(*f as f32))])
            .collect();
        let decoded = read_row_binary(&columns, &encode(&columns, &rows)).expect("decodes");
        assert_same(&decoded, &rows);
    }

    #[test]
    fn a_null_in_a_non_nullable_column_reads_back_as_the_default() {
        let columns = every_type();
        let nulls = vec![vec![Cell::Null; columns.len()]];
        let decoded = read_row_binary(&columns, &encode(&columns, &nulls)).expect("decodes");
        let defaults: Vec<Cell> = columns
            .iter()
            .map(|c| match (c.nullable, c.ty) {
                (true, _) => Cell::Null,
                (false, ChType::Str) => Cell::Str(String::new()),
                (false, ChType::Int | ChType::DateTime) => Cell::Int(0),
                (false, ChType::UInt) => Cell::UInt(0),
                (false, ChType::Float) => Cell::Float(0.0),
            })
            .collect();
        assert_same(&decoded, &[defaults]);
    }

    #[test]
    fn damaged_data_is_an_error_naming_row_and_column() {
        let columns = vec![ChColumn::new("id", "String"), ChColumn::new("n", "Nullable(Int32)")];
        let rows = vec![
            vec![Cell::Str("a".into()), Cell::Int(1)],
            vec![Cell::Str("b".into()), Cell::Int(2)],
        ];
        let bytes = encode(&columns, &rows);
        let cut = read_row_binary(&columns, &bytes[..bytes.len() - 1]).expect_err("cut short");
        assert_eq!((cut.row, cut.column.as_str()), (1, "n"));
        let mut bad_flag = bytes.clone();
        bad_flag[2] = 7;
        let err = read_row_binary(&columns, &bad_flag).expect_err("flag");
        assert_eq!((err.row, err.column.as_str()), (0, "n"), "{err}");
        let wide = vec![ChColumn::new("big", "Int128")];
        assert!(read_row_binary(&wide, &[0; 16]).is_err());
        assert_eq!(read_row_binary(&columns, &[]), Ok(Vec::new()));
    }

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
