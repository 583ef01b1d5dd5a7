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
                let outcome = job.await.map_err(|e| Error::Timeout {
                    shard: 0,
                    action: format!("TRUNCATE of {table}: the job stopped ({e})"),
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
