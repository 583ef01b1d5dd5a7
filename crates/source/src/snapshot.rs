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
//!
//! This module runs the tables and publishes each chunk before it records progress;
//! `snapshot/query.rs` owns what is read from PostgreSQL (the catalog columns, the chunk query,
//! the resume key) and `snapshot/event.rs` turns one row into its change event.

pub(crate) mod event;
pub(crate) mod query;

use futures::future::try_join_all;
use tokio_postgres::types::ToSql;
use tokio_util::sync::CancellationToken;

use scoresync_event::SourceTable;

use crate::error::Error;
use crate::publish::Publisher;
use crate::state::{PipelineRecord, StateStore};

use query::TableColumn;

/// Default rows per snapshot chunk.
pub const DEFAULT_CHUNK_ROWS: usize = 5_000;

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
            let columns = query::table_columns(self.sql, table).await?;
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

    /// Publishes the next chunk of `table`, waits for Kafka, records progress. Returns the row
    /// count.
    async fn chunk(
        &self,
        table: SourceTable,
        columns: &[TableColumn],
        record: &mut PipelineRecord,
    ) -> Result<usize, Error> {
        let resume = record.snapshot.resume_after.clone();
        let sql = query::chunk_sql(table, columns, resume.is_some(), self.chunk_rows);
        let resume = resume.unwrap_or_default();
        let params: Vec<&(dyn ToSql + Sync)> =
            resume.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        let rows = self
            .sql
            .query(sql.as_str(), &params)
            .await
            .map_err(Error::sql(format!("reading a snapshot chunk of {table}")))?;

        let now_us = scoresync_event::clock::unix_micros();
        let mut deliveries = Vec::new();
        for (i, pg_row) in rows.iter().enumerate() {
            let out =
                event::outgoing(record, record.snapshot.lsn, table, columns, pg_row, i, now_us)?;
            deliveries.extend(self.publisher.send(&out)?);
        }
        try_join_all(deliveries).await?;
        if let Some(last) = rows.last() {
            let key = query::resume_key(table.primary_key(), columns, |index| last.get(index));
            record.snapshot.resume_after = Some(key);
            record.snapshot.rows_published += rows.len() as u64;
            self.state.save(record).await?;
            crate::metrics::progressed();
        }
        Ok(rows.len())
    }
}
