//! Backfill: re-publishes the current PostgreSQL rows of some scorecards (a [`Filter`]) through
//! the change topic, while the daemon runs.
//!
//! Why a backfilled row never overwrites a newer change (the watermark technique of DBLog and
//! Debezium's incremental snapshots, reduced to what versions allow): each chunk first reads a
//! WAL position `L` (`pg_current_wal_insert_lsn()`), then takes a transaction id `N` (a later
//! statement), then waits until no transaction id up to `N` is running any more (the xmin of a
//! fresh snapshot is above `N`), then reads its rows in one REPEATABLE READ snapshot. A
//! transaction that wrote its commit record before `L` got its id before `N`, so it has ended
//! and that snapshot sees it; a transaction the snapshot does not see therefore commits after
//! `L`. Chunk rows are versioned just below `L` (as the initial snapshot's rows are below the
//! consistent point), so every change a chunk missed carries a greater version and wins in
//! ClickHouse; a change the chunk did see is already in its rows.
//!
//! Rows go to their scorecards' partitions under a side key (`scoresync_event::backfill_key`),
//! each followed by a tombstone for it: a backfilled row may be older than changes of it
//! published before it, and under its row's own key compaction would keep it instead of them.
//!
//! Known limit: the sink applies a score or historic score by its scorecard's state when it
//! reads it, and backfilled rows reach it after changes committed while the chunk was read. A
//! child deleted after `L` whose card then moved to another shard can be written live on the new
//! shard (no marker there outranks it); and a TRUNCATE after `L` seen by another sink process
//! does not hold older backfilled rows back. Publishing chunks at their position in the
//! replication stream (DBLog's high watermark, with the keys changed between the watermarks
//! dropped) removes both; it is not built yet.
//!
//! Resumable: chunks walk the selected scorecards in key order; after a chunk is acknowledged by
//! Kafka its last scorecard key is recorded on the state topic under a key naming the slot and
//! the filter ([`Backfill::progress_key`]). The same backfill started again resumes after it;
//! once one finished, the same command starts over.
//!
//! Not done here: keys that ClickHouse holds and PostgreSQL lacks (a backfill reads only what
//! PostgreSQL has, so it cannot delete).

pub mod filter;

use std::time::{Duration, Instant};

use futures::future::try_join_all;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use scoresync_event::{Lsn, ScorecardKey, SourceTable};

use crate::change::{Destination, Forget};
use crate::error::Error;
use crate::publish::Publisher;
use crate::snapshot::query::{TableColumn, table_columns};
use crate::state::{PipelineRecord, StateStore};
pub use filter::{CardKind, Filter, TimeColumn};

/// Default scorecards per chunk.
pub const DEFAULT_CHUNK_CARDS: usize = 200;
/// How often a chunk checks whether the transactions it waits for have ended.
const POLL: Duration = Duration::from_millis(50);
/// How often a long wait for a transaction is logged.
const SAY_EVERY: Duration = Duration::from_secs(10);
/// Longest wait for the transactions running when a chunk starts.
const MAX_WAIT: Duration = Duration::from_secs(600);

/// A backfill's progress, kept on the state topic.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackfillProgress {
    /// The filter, as [`Filter::describe`] gives it.
    pub filter: String,
    /// The last scorecard key published (`customer_id`, `profile_id`, `scorecard_id`).
    pub after: Option<[String; 3]>,
    /// Scorecards done.
    pub cards: u64,
    /// Rows published.
    pub rows: u64,
    /// True once every selected scorecard was published.
    pub done: bool,
}

/// The start of every backfill progress key of the pipeline on `slot` (each filter has its own).
pub fn progress_prefix(slot: &str) -> String {
    format!("backfill\0{slot}\0")
}

impl BackfillProgress {
    fn after_key(&self) -> Option<ScorecardKey> {
        self.after.as_ref().map(|[customer_id, profile_id, scorecard_id]| ScorecardKey {
            customer_id: customer_id.clone(),
            profile_id: profile_id.clone(),
            scorecard_id: scorecard_id.clone(),
        })
    }
}

/// One backfill.
pub struct Backfill<'a> {
    /// SQL session (DateStyle ISO, TimeZone UTC), used for nothing else meanwhile.
    pub sql: &'a tokio_postgres::Client,
    /// The change-topic publisher.
    pub publisher: &'a Publisher,
    /// Where progress is recorded.
    pub state: &'a StateStore,
    /// The pipeline's record (slot, version scheme).
    pub record: &'a PipelineRecord,
    /// What to publish.
    pub filter: &'a Filter,
    /// Scorecards per chunk.
    pub chunk_cards: usize,
}

impl Backfill<'_> {
    /// The state-topic key of this backfill's progress.
    pub fn progress_key(&self) -> String {
        format!("{}{}", progress_prefix(&self.record.slot), self.filter.describe())
    }

    /// Where to start: after the recorded progress of an unfinished run of the same backfill,
    /// or from the first scorecard.
    pub async fn resume(&self) -> Result<BackfillProgress, Error> {
        let saved: Option<BackfillProgress> =
            self.state.load_keyed(&self.record.slot, &self.progress_key()).await?;
        Ok(match saved {
            Some(progress) if !progress.done => progress,
            _ => BackfillProgress { filter: self.filter.describe(), ..Default::default() },
        })
    }

    /// How many scorecards the filter selects now.
    pub async fn total_cards(&self) -> Result<u64, Error> {
        let query = self.filter.count_query();
        let row = self
            .sql
            .query_one(query.sql.as_str(), &query.params())
            .await
            .map_err(Error::sql("counting the scorecards to backfill"))?;
        Ok(row.get::<_, i64>(0).max(0) as u64)
    }

    /// Publishes chunks until every selected scorecard is done (`Ok(true)`) or `shutdown`
    /// (`Ok(false)`, progress saved). `on_chunk` sees the progress after each chunk.
    pub async fn run(
        &self,
        progress: &mut BackfillProgress,
        shutdown: &CancellationToken,
        mut on_chunk: impl FnMut(&BackfillProgress),
    ) -> Result<bool, Error> {
        let mut columns = Vec::new();
        for table in &self.filter.tables {
            columns.push((*table, table_columns(self.sql, *table).await?));
        }
        while !progress.done {
            if shutdown.is_cancelled() {
                return Ok(false);
            }
            self.chunk(&columns, progress, shutdown).await?;
            self.state.save_keyed(&self.record.slot, &self.progress_key(), progress).await?;
            on_chunk(progress);
        }
        Ok(true)
    }

    /// Reads and publishes the next chunk (see the module doc), and advances `progress`;
    /// nothing when `shutdown` came while it waited.
    async fn chunk(
        &self,
        columns: &[(SourceTable, Vec<TableColumn>)],
        progress: &mut BackfillProgress,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        let Some(at) = self.watermark(shutdown).await? else { return Ok(()) };
        self.sql
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .await
            .map_err(Error::sql("starting a backfill chunk's snapshot"))?;
        let read = self.read(columns, progress.after_key().as_ref()).await;
        let ended = self.sql.batch_execute(if read.is_ok() { "COMMIT" } else { "ROLLBACK" }).await;
        let (cards, rows) = read?;
        ended.map_err(Error::sql("ending a backfill chunk's snapshot"))?;
        let now_us = scoresync_event::clock::unix_micros();
        let mut deliveries = Vec::new();
        for (seq, (table, table_columns, row)) in rows.iter().enumerate() {
            let mut out = crate::snapshot::event::outgoing(
                self.record,
                at,
                *table,
                table_columns,
                row,
                seq,
                now_us,
            )?;
            if let Destination::Row(address) = &mut out.destination {
                address.key = scoresync_event::backfill_key(&address.key);
            }
            out.tombstone = Some(Forget::Own);
            deliveries.extend(self.publisher.send(&out)?);
        }
        try_join_all(deliveries).await?;
        progress.rows += rows.len() as u64;
        progress.cards += cards.len() as u64;
        match cards.last() {
            Some(last) if cards.len() == self.chunk_cards => {
                progress.after = Some([
                    last.customer_id.clone(),
                    last.profile_id.clone(),
                    last.scorecard_id.clone(),
                ]);
            }
            _ => progress.done = true,
        }
        Ok(())
    }

    /// A WAL position every transaction the next snapshot misses commits after (see the module
    /// doc); `None` when `shutdown` came first. Waits at most [`MAX_WAIT`] for older
    /// transactions.
    async fn watermark(&self, shutdown: &CancellationToken) -> Result<Option<Lsn>, Error> {
        let one = |sql: &'static str| async move {
            let row = self.sql.query_one(sql, &[]).await;
            row.map(|r| r.get::<_, String>(0))
                .map_err(Error::sql("reading a backfill chunk's watermark"))
        };
        let at = one("SELECT pg_current_wal_insert_lsn()::text").await?;
        let at: Lsn = at.parse().map_err(|_| Error::Backfill {
            problem: format!("pg_current_wal_insert_lsn() gave {at:?}, not an LSN"),
        })?;
        let after = one("SELECT pg_current_xact_id()::text").await?;
        let started = Instant::now();
        let mut said = Instant::now();
        loop {
            let row = self
                .sql
                .query_one(
                    "SELECT pg_snapshot_xmin(pg_current_snapshot()) > $1::text::xid8, \
                     pg_snapshot_xmin(pg_current_snapshot())::text",
                    &[&after],
                )
                .await
                .map_err(Error::sql("waiting for transactions older than a backfill chunk"))?;
            if row.get::<_, bool>(0) {
                return Ok(Some(at));
            }
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            let oldest: String = row.get(1);
            if started.elapsed() >= MAX_WAIT {
                return Err(Error::Backfill {
                    problem: format!(
                        "transaction {oldest} has been running for more than {MAX_WAIT:?} since \
                         the chunk started (a backfilled row must not be older than its \
                         changes); end it (pg_stat_activity, pg_prepared_xacts) and run the same \
                         command again"
                    ),
                });
            }
            if said.elapsed() >= SAY_EVERY {
                said = Instant::now();
                tracing::warn!(oldest, waited = ?started.elapsed(), "backfill: waiting for a transaction that was running when the chunk started");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// The next chunk's scorecards and the rows of every chosen table that belong to them.
    async fn read<'c>(
        &self,
        columns: &'c [(SourceTable, Vec<TableColumn>)],
        after: Option<&ScorecardKey>,
    ) -> Result<
        (Vec<ScorecardKey>, Vec<(SourceTable, &'c [TableColumn], tokio_postgres::Row)>),
        Error,
    > {
        let query = self.filter.cards_query(after, self.chunk_cards);
        let cards: Vec<ScorecardKey> = self
            .sql
            .query(query.sql.as_str(), &query.params())
            .await
            .map_err(Error::sql("reading a backfill chunk's scorecards"))?
            .iter()
            .map(|r| ScorecardKey {
                customer_id: r.get(0),
                profile_id: r.get(1),
                scorecard_id: r.get(2),
            })
            .collect();
        let mut rows = Vec::new();
        if cards.is_empty() {
            return Ok((cards, rows));
        }
        for (table, table_columns) in columns {
            let select: Vec<String> = table_columns
                .iter()
                .map(|c| format!("{}::text", crate::snapshot::query::ident(&c.name)))
                .collect();
            let query = filter::rows_query(*table, &select.join(", "), &cards);
            let found = self
                .sql
                .query(query.sql.as_str(), &query.params())
                .await
                .map_err(Error::sql(format!("reading a backfill chunk of {table}")))?;
            rows.extend(found.into_iter().map(|row| (*table, table_columns.as_slice(), row)));
        }
        Ok((cards, rows))
    }
}
