//! Row data in change messages: pgoutput's TupleData and the old-row marker of Update and Delete.
//!
//! Invariant: a decoded [`Tuple`] holds exactly the column count the message announced, one
//! [`TupleValue`] per column in the relation's attribute order; an unchanged TOAST value stays
//! [`TupleValue::UnchangedToast`] (never a NULL or an empty text), so later stages can tell
//! "unknown, keep the stored value" from a real value.

use bytes::Bytes;

use super::DecodeError;
use super::reader::Reader;

/// The values of one row, in the relation's column order.
pub type Tuple = Vec<TupleValue>;

/// The old row of an Update or Delete.
#[derive(Clone, Debug, PartialEq)]
pub struct OldTuple {
    /// True for `K` (replica-identity columns only, others NULL); false for `O` (whole row).
    pub key_only: bool,
    /// The values.
    pub values: Tuple,
}

/// One column value in a tuple.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TupleValue {
    /// SQL NULL.
    Null,
    /// A TOASTed value that did not change and was not sent: unknown, keep the stored one.
    UnchangedToast,
    /// Text-format value.
    Text(Bytes),
    /// Binary-format value (binary mode only).
    Binary(Bytes),
}

/// TupleData: a column count, then per column a kind byte (`n`, `u`, `t`, `b`) and, for `t` and
/// `b`, a length and the value.
pub(super) fn tuple(r: &mut Reader<'_>) -> Result<Tuple, DecodeError> {
    let count = r.i16("tuple column count")?;
    if count < 0 {
        return Err(r.invalid(format!("negative tuple column count {count}")));
    }
    (0..count)
        .map(|_| match r.u8("column kind")? {
            b'n' => Ok(TupleValue::Null),
            b'u' => Ok(TupleValue::UnchangedToast),
            b't' => {
                let len = r.len_u32("text length")?;
                Ok(TupleValue::Text(r.take(len, "text value")?))
            }
            b'b' => {
                let len = r.len_u32("binary length")?;
                Ok(TupleValue::Binary(r.take(len, "binary value")?))
            }
            other => {
                Err(r.invalid(format!("column kind {:?}, expected n, u, t or b", other as char)))
            }
        })
        .collect()
}

/// The optional old row of an Update: `N` (none, the new tuple follows), or `K` / `O`, the old
/// tuple and then `N` before the new one.
pub(super) fn update_old(r: &mut Reader<'_>) -> Result<Option<OldTuple>, DecodeError> {
    match r.u8("tuple kind")? {
        b'N' => Ok(None),
        kind @ (b'K' | b'O') => {
            let values = tuple(r)?;
            r.expect_byte(b'N', "'N' before the new tuple")?;
            Ok(Some(OldTuple { key_only: kind == b'K', values }))
        }
        other => Err(r.invalid(format!("tuple kind {:?}, expected K, O or N", other as char))),
    }
}

/// The old row of a Delete: `K` or `O`, then the tuple.
pub(super) fn delete_old(r: &mut Reader<'_>) -> Result<OldTuple, DecodeError> {
    let key_only = match r.u8("tuple kind")? {
        b'K' => true,
        b'O' => false,
        other => {
            return Err(r.invalid(format!("tuple kind {:?}, expected K or O", other as char)));
        }
    };
    Ok(OldTuple { key_only, values: tuple(r)? })
}
