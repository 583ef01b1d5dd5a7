//! The Relation message: how pgoutput describes a table before its first change in a session and
//! again after its schema changed.
//!
//! Invariant: [`Relation::columns`] holds exactly the announced column count, in attribute order,
//! the order every later tuple of that relation uses; a negative count is an error, not an empty
//! relation.

use super::DecodeError;
use super::reader::Reader;

/// A relation (table) as pgoutput describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// Relation id (the table's OID), used by later change messages.
    pub id: u32,
    /// Schema.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Replica identity setting: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in attribute order.
    pub columns: Vec<RelationColumn>,
}

/// One column of a [`Relation`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationColumn {
    /// True when the column is part of the replica identity key.
    pub is_key: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
}

/// The body of a Relation message (after the tag).
pub(super) fn relation(r: &mut Reader<'_>) -> Result<Relation, DecodeError> {
    let id = r.u32("relation id")?;
    let namespace = r.cstr("namespace")?;
    let name = r.cstr("relation name")?;
    let replica_identity = r.u8("replica identity")?;
    let count = r.i16("column count")?;
    if count < 0 {
        return Err(r.invalid(format!("negative column count {count}")));
    }
    let columns = (0..count)
        .map(|_| {
            Ok(RelationColumn {
                is_key: r.u8("column flags")? & 1 != 0,
                name: r.cstr("column name")?,
                type_oid: r.u32("column type OID")?,
                type_modifier: r.i32("column type modifier")?,
            })
        })
        .collect::<Result<_, DecodeError>>()?;
    Ok(Relation { id, namespace, name, replica_identity, columns })
}
