//! One row read from a table (by the snapshot or a backfill) as a change event.
//!
//! Invariant: every such event is an `Operation::Snapshot` versioned just below the LSN it was
//! read at (`at`: for the initial snapshot the slot's consistent point; for a backfill chunk a
//! position every change its read missed commits after) by the pipeline's version scheme, so it
//! sorts below every change committed after that position (see the `snapshot` and `backfill`
//! module docs), and it is addressed (partition and key) like a streamed change of the same row. A value that does not parse or a row without its key is an error, never a
//! skipped row.

use scoresync_event::{
    CONTRACT_VERSION, ChangeEvent, Column, Lsn, Operation, Row, RowAddress, SourceTable,
};

use super::query::TableColumn;
use crate::change::{Destination, MapError, Outgoing, primary_key};
use crate::error::Error;
use crate::state::PipelineRecord;
use crate::text::{ValueError, typed_value};

/// The event for the `seq`-th row of a chunk read at `at`, `pg_row` holding `columns` as text.
pub(crate) fn outgoing(
    record: &PipelineRecord,
    at: Lsn,
    table: SourceTable,
    columns: &[TableColumn],
    pg_row: &tokio_postgres::Row,
    seq: usize,
    now_us: i64,
) -> Result<Outgoing, Error> {
    let row = typed_row(record, at, table, columns, pg_row)?;
    let missing = |what| Error::Map {
        slot: record.slot.clone(),
        lsn: at,
        source: MapError::MissingIdentity { table, op: Operation::Snapshot.describe(), what },
    };
    let key = primary_key(table, &row).ok_or_else(|| missing("primary key"))?;
    let version = record.versions()?.snapshot(at).map_err(|e| Error::Map {
        slot: record.slot.clone(),
        lsn: at,
        source: e.into(),
    })?;
    let event = ChangeEvent {
        contract_version: CONTRACT_VERSION,
        system_id: record.system_id,
        schema: scoresync_event::table::SOURCE_SCHEMA.into(),
        table: table.name().into(),
        op: Operation::Snapshot as i32,
        key,
        new_row: Some(row),
        commit_lsn: at.0,
        seq_in_tx: u32::try_from(seq).unwrap_or(u32::MAX),
        commit_time_us: now_us,
        version: version.0,
        ..Default::default()
    };
    let address = event
        .new_row
        .as_ref()
        .and_then(|row| RowAddress::of_row(table, row))
        .ok_or_else(|| missing("scorecard identity"))?;
    Ok(Outgoing { event, destination: Destination::Row(address), tombstone: None })
}

/// The row's text values typed by their column's type.
fn typed_row(
    record: &PipelineRecord,
    at: Lsn,
    table: SourceTable,
    columns: &[TableColumn],
    pg_row: &tokio_postgres::Row,
) -> Result<Row, Error> {
    typed_columns(columns, pg_row, 0).map_err(|(column, source)| Error::Map {
        slot: record.slot.clone(),
        lsn: at,
        source: MapError::Value { table, column, source },
    })
}

/// `columns` as read (as text) into `pg_row` from position `first` on, typed; a value that does
/// not parse is an error naming its column.
pub(crate) fn typed_columns(
    columns: &[TableColumn],
    pg_row: &tokio_postgres::Row,
    first: usize,
) -> Result<Row, (String, ValueError)> {
    let mut row = Row { columns: Vec::with_capacity(columns.len()) };
    for (index, col) in columns.iter().enumerate() {
        let text: Option<String> = pg_row.get(first + index);
        let value = match text {
            None => scoresync_event::Value::null(),
            Some(text) => {
                typed_value(col.type_oid, &text).map_err(|source| (col.name.clone(), source))?
            }
        };
        row.columns.push(Column {
            name: col.name.clone(),
            type_oid: col.type_oid,
            value: Some(value),
        });
    }
    Ok(row)
}
