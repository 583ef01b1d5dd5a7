//! A TRUNCATE: delete markers, at its version, for every live row of the table older than it, on
//! every shard. Rows written after it carry greater versions and are untouched, so a replayed
//! TRUNCATE cannot delete them (DESIGN.md rule 7).
//!
//! The markers are one `INSERT ... SELECT ... FINAL` per shard, which on a big table takes as long
//! as it takes: it runs as a job of its own, without the lookup timeout, while the TRUNCATE event
//! parks ([`ParkReason::TruncateRunning`]) and every later change of its partition parks behind it
//! (`park`), and the loop goes on polling Kafka. The source publishes one copy per partition:
//! the first copy starts the job, the others find it running or done (by table and version) and
//! never start it again. Only a failed job is started again; the statement is idempotent (rows
//! already marked are not live under FINAL), so is a job re-run after a restart.
//!
//! Why once is enough: the first copy starts the job only after every row written so far is in
//! ClickHouse (it needs a flush), and from that moment the table is *truncated through* the
//! TRUNCATE's version: any later row of it older than that version (a partition that had not
//! reached its copy yet, a parked change retried, a move's child copies) is dead and is not
//! written at all ([`Applier::add`] asks [`Truncations::removes`]). After a restart that memory is
//! gone, but every copy not yet committed is read again and runs the job again.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use scoresync_event::SourceTable;
use tokio::task::JoinHandle;

use super::{Applier, Decision};
use crate::error::Error;
use crate::park::ParkReason;

/// Longest one shard's markers may take before the job counts as failed (and is run again).
const TRUNCATE_TIMEOUT: Duration = Duration::from_secs(6 * 3600);
/// TRUNCATEs remembered as applied, so late copies from other partitions are not run again.
const REMEMBERED: usize = 64;

/// TRUNCATE jobs, by table and version.
#[derive(Default)]
pub(crate) struct Truncations {
    running: HashMap<(SourceTable, u64), JoinHandle<Result<(), Error>>>,
    applied: VecDeque<(SourceTable, u64)>,
    /// Per table, the version of the newest TRUNCATE whose job started: live rows older than it
    /// are dead.
    through: HashMap<SourceTable, u64>,
}

impl Truncations {
    /// True when a TRUNCATE started (or done) in this process removes a live row of `table` at
    /// `version`: such a row must not be written.
    pub(crate) fn removes(&self, table: SourceTable, version: u64) -> bool {
        self.through.get(&table).is_some_and(|through| version < *through)
    }

    /// True when the TRUNCATE of `table` at `version` is running or applied (retrying it needs no
    /// flush: only starting it does).
    pub(crate) fn knows(&self, table: SourceTable, version: u64) -> bool {
        let id = (table, version);
        self.running.contains_key(&id) || self.applied.contains(&id)
    }
}

impl Applier {
    /// Applies the TRUNCATE of `table` at `version`: applied once its job finished, parked while
    /// it runs.
    pub(super) async fn truncate(
        &mut self,
        table: SourceTable,
        version: u64,
    ) -> Result<Decision, Error> {
        let id = (table, version);
        if self.truncations.applied.contains(&id) {
            return Ok(Decision::Applied);
        }
        let running = ParkReason::TruncateRunning(table.to_string());
        match self.truncations.running.get(&id) {
            Some(job) if !job.is_finished() => return Ok(Decision::Park(running)),
            Some(_) => {
                let Some(job) = self.truncations.running.remove(&id) else {
                    return Ok(Decision::Park(running));
                };
                let outcome = job.await.map_err(|e| Error::TruncateJob {
                    table: table.to_string(),
                    problem: e.to_string(),
                })?;
                outcome?;
                self.truncate_done(table, version);
                return Ok(Decision::Applied);
            }
            None => {}
        }
        let schema = self.schema(table)?.clone();
        let sql = schema.truncate_sql(self.locate.lookups.database(), version);
        let shards = self.locate.lookups.clients();
        tracing::info!(%table, version, "truncate: writing delete markers on every shard");
        let job = tokio::spawn(async move {
            for (shard, client) in shards.iter().enumerate() {
                let action = format!("TRUNCATE of {table} (delete markers)");
                tokio::time::timeout(TRUNCATE_TIMEOUT, client.query_raw(&sql).execute())
                    .await
                    .map_err(|_| Error::Timeout { shard, action: action.clone() })?
                    .map_err(Error::shard(shard, action))?;
            }
            Ok(())
        });
        self.truncations.running.insert(id, job);
        let through = self.truncations.through.entry(table).or_insert(version);
        *through = (*through).max(version);
        Ok(Decision::Park(running))
    }

    fn truncate_done(&mut self, table: SourceTable, version: u64) {
        if table == SourceTable::Scorecards {
            self.locate.forget_cards();
        }
        if self.truncations.applied.len() == REMEMBERED {
            self.truncations.applied.pop_front();
        }
        self.truncations.applied.push_back((table, version));
        tracing::info!(%table, version, "truncate applied on every shard");
    }
}
