//! Unchanged TOAST values (DESIGN.md rule 6): a column PostgreSQL did not log because its value
//! did not change is "unknown", never NULL. Its value is taken from the stored row: the row still
//! in this sink's buffer, else the row on the shard (read only once every earlier row is
//! acknowledged, so a newer value on its way is never missed), else PostgreSQL. Found nowhere,
//! the change parks.

use std::collections::HashMap;

use crate::batch::Batcher;
use crate::error::Error;
use crate::lookup::Lookups;
use crate::park::ParkReason;
use crate::plan::Wait;
use crate::rows::ChRow;
use crate::shard::ShardIndex;
use crate::table::{Cell, ChType, TableSchema};

/// Fills the unknown cells of `row` from the stored row on one of `shards` (searched in order).
/// `Some` when the change must wait: for a flush, or parked.
pub(crate) async fn resolve(
    row: &mut ChRow,
    schema: &TableSchema,
    shards: &[ShardIndex],
    flushed: bool,
    batcher: &Batcher,
    lookups: &Lookups,
) -> Result<Option<Wait>, Error> {
    if row.unknown.is_empty() {
        return Ok(None);
    }
    let key = row.key(schema);
    let unknown = std::mem::take(&mut row.unknown);
    for &shard in shards {
        if let Some(buffered) = batcher.find(shard, &key)
            && buffered.unknown.is_empty()
            && !buffered.is_delete(schema)
        {
            copy_cells(row, &unknown, &buffered.cells);
            return Ok(None);
        }
    }
    if !flushed {
        // A newer value may be on its way to the shard (cut from the buffer, not yet
        // acknowledged): read what is stored only once it is there.
        row.unknown = unknown;
        return Ok(Some(Wait::Flush));
    }
    for &shard in shards {
        if let Some(cells) = lookups.stored_row(shard, schema, &key.1).await? {
            copy_cells(row, &unknown, &cells);
            return Ok(None);
        }
    }
    let mut from_postgres = HashMap::new();
    for &i in &unknown {
        let column = &schema.columns[i];
        match lookups.column_in_postgres(row.table, &key.1, &column.name).await? {
            Some(value) => {
                from_postgres.insert(i, value);
            }
            None => {
                return Ok(Some(Wait::Park(ParkReason::ToastValueUnknown(column.name.clone()))));
            }
        }
    }
    for (i, value) in from_postgres {
        row.cells[i] = parse_text(value, schema.columns[i].ty);
    }
    Ok(None)
}

fn copy_cells(row: &mut ChRow, which: &[usize], from: &[Cell]) {
    for &i in which {
        row.cells[i] = from[i].clone();
    }
}

/// A value PostgreSQL gave as text, for a column of type `ty`.
fn parse_text(value: Option<String>, ty: ChType) -> Cell {
    match (value, ty) {
        (None, _) => Cell::Null,
        (Some(text), ChType::Str) => Cell::Str(text),
        (Some(text), ChType::Float) => text.parse().map_or(Cell::Null, Cell::Float),
        (Some(text), ChType::Int | ChType::DateTime) => text.parse().map_or(Cell::Null, Cell::Int),
        (Some(text), ChType::UInt) => text.parse().map_or(Cell::Null, Cell::UInt),
    }
}
