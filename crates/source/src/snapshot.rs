//! The initial snapshot: the rows already in the three tables when `setup` created the slot.
//!
//! Why rows read at any time after the slot's consistent point are safe (DESIGN.md rule 10):
//! every snapshot row is versioned `consistent_point - 1`, and every transaction the slot
//! streams commits at or after the consistent point, so it carries a greater version. A snapshot
//! row can therefore never overwrite a streamed change, however late it is read; and a row read
//! after a change (it already shows the change) is overwritten by that change's event with the
//! same values. What the snapshot must not miss is a row committed before the consistent point,
//! and any read after the slot exists sees those.
//!
//! That is also what makes the snapshot resumable: tables are read in primary-key order in
//! chunks, each chunk published and acknowledged before the pipeline record notes the last key,
//! so a killed snapshot restarts after the last acknowledged chunk (a row published twice is
//! harmless: same version, same values or newer ones). The slot is not confirmed past the
//! consistent point until the snapshot is done, so no streamed change is skipped meanwhile.

use std::time::{SystemTime, UNIX_EPOCH};

use futures::future::try_join_all;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use scoresync_event::{
    CONTRACT_VERSION, ChangeEvent, Column, Operation, Row, ScorecardKey, SourceTable,
};

use crate::change::{Destination, MapError, Outgoing, primary_key};
use crate::error::Error;
use crate::publish::Publisher;
use crate::state::{PipelineRecord, StateStore};
use crate::text::typed_value;

/// Default rows per snapshot chunk.
pub const DEFAULT_CHUNK_ROWS: usize = 5_000;

/// A column of a source table as the catalog describes it.
struct TableColumn {
    name: String,
    type_oid: u32,
    is_key: bool,
}

/// Publishes every row of the tables the record says are not done yet.
pub struct Snapshot<'a> {
    /// SQL session (DateStyle ISO, TimeZone UTC).
    pub sql: &'a tokio_postgres::Client,
    /// The change-topic publisher.
    pub publisher: &'a Publisher,
    /// Where progress is recorded.
    pub state: &'a StateStore,
    /// Rows per chunk.
    pub chunk_rows: usize,
}

impl Snapshot<'_> {
    /// Runs until every table is published (the record is updated and saved as it goes) or
    /// `shutdown` is cancelled (progress so far is saved).
    pub async fn run(
        &self,
        record: &mut PipelineRecord,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        while let Some(table) = record.snapshot_table() {
            let columns = self.columns(table).await?;
            loop {
                if shutdown.is_cancelled() {
                    return Ok(());
                }
                let published = self.chunk(table, &columns, record).await?;
                if published < self.chunk_rows {
                    break;
                }
            }
            record.snapshot.tables_done.push(table.name().into());
            record.snapshot.resume_after = None;
            self.state.save(record).await?;
            tracing::info!(%table, rows = record.snapshot.rows_published, "snapshot: table done");
        }
        if !record.snapshot.done {
            record.snapshot.done = true;
            self.state.save(record).await?;
            tracing::info!(rows = record.snapshot.rows_published, lsn = %record.snapshot.lsn, "snapshot done");
        }
        Ok(())
    }

    async fn columns(&self, table: SourceTable) -> Result<Vec<TableColumn>, Error> {
        let rows = self
            .sql
            .query(
                "SELECT a.attname::text, a.atttypid::oid \
                 FROM pg_attribute a \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&table.to_string()],
            )
            .await
            .map_err(Error::sql(format!("reading the columns of {table}")))?;
        Ok(rows
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                let is_key = table.primary_key().contains(&name.as_str());
                TableColumn { name, type_oid: r.get(1), is_key }
            })
            .collect())
    }

    /// Publishes the next chunk of `table`, waits for Kafka, records progress. Returns the row
    /// count.
    async fn chunk(
        &self,
        table: SourceTable,
        columns: &[TableColumn],
        record: &mut PipelineRecord,
    ) -> Result<usize, Error> {
        let key_names = table.primary_key();
        let select: Vec<String> =
            columns.iter().map(|c| format!("{}::text", ident(&c.name))).collect();
        let order: Vec<String> = key_names.iter().map(|k| ident(k)).collect();
        let key_types: Vec<u32> = key_names
            .iter()
            .map(|k| columns.iter().find(|c| c.name == *k).map_or(25, |c| c.type_oid))
            .collect();
        let resume = record.snapshot.resume_after.clone();
        let mut sql = format!("SELECT {} FROM {table}", select.join(", "));
        if resume.is_some() {
            let params: Vec<String> = key_types
                .iter()
                .enumerate()
                .map(|(i, oid)| format!("${}::text::{}", i + 1, cast_name(*oid)))
                .collect();
            sql.push_str(&format!(" WHERE ({}) > ({})", order.join(", "), params.join(", ")));
        }
        sql.push_str(&format!(" ORDER BY {} LIMIT {}", order.join(", "), self.chunk_rows));
        let resume = resume.unwrap_or_default();
        let params: Vec<&(dyn ToSql + Sync)> =
            resume.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let rows = self
            .sql
            .query(sql.as_str(), &params)
            .await
            .map_err(Error::sql(format!("reading a snapshot chunk of {table}")))?;

        let now_us =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        let mut deliveries = Vec::new();
        let mut last_key = None;
        for (i, pg_row) in rows.iter().enumerate() {
            let mut row = Row { columns: Vec::with_capacity(columns.len()) };
            for (index, col) in columns.iter().enumerate() {
                let text: Option<String> = pg_row.get(index);
                let value = match text {
                    None => scoresync_event::Value::null(),
                    Some(text) => {
                        typed_value(col.type_oid, &text).map_err(|source| Error::Map {
                            slot: record.slot.clone(),
                            lsn: record.snapshot.lsn,
                            source: MapError::Value { table, column: col.name.clone(), source },
                        })?
                    }
                };
                row.columns.push(Column {
                    name: col.name.clone(),
                    type_oid: col.type_oid,
                    value: Some(value),
                });
            }
            let missing = |what| Error::Map {
                slot: record.slot.clone(),
                lsn: record.snapshot.lsn,
                source: MapError::MissingIdentity { table, op: "snapshot", what },
            };
            let key = primary_key(table, &row).ok_or_else(|| missing("primary key"))?;
            let event = ChangeEvent {
                contract_version: CONTRACT_VERSION,
                system_id: record.system_id,
                schema: scoresync_event::table::SOURCE_SCHEMA.into(),
                table: table.name().into(),
                op: Operation::Snapshot as i32,
                key,
                new_row: Some(row),
                commit_lsn: record.snapshot.lsn.0,
                seq_in_tx: u32::try_from(i).unwrap_or(u32::MAX),
                commit_time_us: now_us,
                ..Default::default()
            };
            let scorecard =
                ScorecardKey::of_event(&event).ok_or_else(|| missing("scorecard identity"))?;
            last_key = Some(
                columns
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.is_key)
                    .map(|(index, _)| pg_row.get::<_, Option<String>>(index).unwrap_or_default())
                    .collect::<Vec<_>>(),
            );
            let out = Outgoing { event, destination: Destination::Key(scorecard.to_message_key()) };
            deliveries.extend(self.publisher.send(&out)?);
        }
        try_join_all(deliveries)
            .await
            .map_err(|source| Error::Delivery { topic: "change topic".into(), source })?;
        if let Some(last_key) = last_key {
            // Key columns in primary-key order (the catalog order can differ).
            let by_name: Vec<(&str, String)> = columns
                .iter()
                .filter(|c| c.is_key)
                .map(|c| c.name.as_str())
                .zip(last_key)
                .collect();
            let ordered = key_names
                .iter()
                .map(|k| {
                    by_name.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default()
                })
                .collect();
            record.snapshot.resume_after = Some(ordered);
            record.snapshot.rows_published += rows.len() as u64;
            self.state.save(record).await?;
        }
        Ok(rows.len())
    }
}

/// Quotes an identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The SQL type name to cast a key parameter to.
fn cast_name(type_oid: u32) -> &'static str {
    match type_oid {
        crate::text::oid::INT2 => "smallint",
        crate::text::oid::INT4 => "integer",
        crate::text::oid::INT8 => "bigint",
        _ => "text",
    }
}
