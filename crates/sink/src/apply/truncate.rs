//! A TRUNCATE: delete markers, at its version, for every live row of the table older than it, on
//! every shard. Rows written after it carry greater versions and are untouched, so a replayed
//! TRUNCATE cannot delete them (DESIGN.md rule 7).
//!
//! The markers are one `INSERT ... SELECT ... FINAL` per shard, which on a big table takes as long
//! as it takes: it runs as a job of its own, without the lookup timeout (bounded only by
//! [`TRUNCATE_TIMEOUT`], 6 hours a shard, after which it counts as failed), while the TRUNCATE event
//! parks ([`ParkReason::TruncateRunning`]) and every later change of its partition parks behind it
//! (`park`), and the loop goes on polling Kafka. The source publishes one copy per partition:
//! the first copy starts the job, the others find it running or done (by table and version) and
//! never start it again (the last [`REMEMBERED`] TRUNCATEs are remembered). Only a failed job is
//! started again; the statement is idempotent (rows already marked are not live under FINAL), so
//! is a job re-run after a restart or after a copy older than what is remembered.
//!
//! Why once is enough: the first copy starts the job only after every row written so far is in
//! ClickHouse (it needs a flush), and from that moment the table is *truncated through* the
//! TRUNCATE's version: any later row of it older than that version (a partition that had not
//! reached its copy yet, a parked change retried, a move's child copies) is dead and is not
//! written at all ([`Applier::add`] asks [`Truncations::is_truncated`]). After a restart that memory is
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

/// A TRUNCATE: its table and version.
type Id = (SourceTable, u64);

/// A job running, with the assignment generation when it started.
struct Job {
    handle: JoinHandle<Result<(), Error>>,
    generation: u64,
}

/// TRUNCATE jobs, by table and version.
#[derive(Default)]
pub(crate) struct Truncations {
    running: HashMap<Id, Job>,
    /// Applied TRUNCATEs, each with the assignment generation when its job started.
    applied: VecDeque<(Id, u64)>,
    /// Per table, the version of the newest TRUNCATE whose job started: live rows older than it
    /// are dead.
    through: HashMap<SourceTable, u64>,
}

/// Where a copy of a TRUNCATE stands in this process.
enum Known {
    /// A job covering the copy's partition finished.
    Applied,
    /// A job covering the copy's partition runs.
    Running,
    /// No job covers it: a flush and a job of its own are needed.
    Unknown,
}

impl Truncations {
    /// True when a TRUNCATE started (or done) in this process removes a live row of `table` at
    /// `version`: such a row must not be written.
    pub(crate) fn is_truncated(&self, table: SourceTable, version: u64) -> bool {
        self.through.get(&table).is_some_and(|through| version < *through)
    }

    /// Notes a TRUNCATE as applied, forgetting the oldest past [`REMEMBERED`].
    fn remember_applied(&mut self, id: Id, generation: u64) {
        if self.applied.len() == REMEMBERED {
            self.applied.pop_front();
        }
        self.applied.push_back((id, generation));
    }

    /// Where the copy of TRUNCATE `id` from a partition this process owns since assignment
    /// generation `owned_since` stands. A job covers the partition only when the partition was
    /// already this process's when the job started: rows another sink wrote for it before the
    /// handover may be newer than the job's pass over a shard, so a copy read after a handover
    /// runs the job again (it is idempotent).
    fn known(&self, id: Id, owned_since: u64) -> Known {
        let covers = |started_at: u64| owned_since <= started_at;
        if self.applied.iter().any(|(done, at)| *done == id && covers(*at)) {
            return Known::Applied;
        }
        match self.running.get(&id) {
            Some(job) if covers(job.generation) => Known::Running,
            _ => Known::Unknown,
        }
    }

    /// True when a job covering the copy runs or ran (retrying it needs no flush: only starting
    /// one does).
    pub(crate) fn started(&self, id: Id, owned_since: u64) -> bool {
        !matches!(self.known(id, owned_since), Known::Unknown)
    }
}

impl Applier {
    /// Applies a copy of the TRUNCATE of `table` at `version`, from a partition this process
    /// owns since assignment generation `owned_since` (`generation` is the one now): applied
    /// once a job covering it finished, parked while one runs.
    pub(super) async fn truncate(
        &mut self,
        table: SourceTable,
        version: u64,
        owned_since: u64,
        generation: u64,
    ) -> Result<Decision, Error> {
        let id = (table, version);
        let running = ParkReason::TruncateRunning(table.to_string());
        match self.truncations.known(id, owned_since) {
            Known::Applied => return Ok(Decision::Applied),
            Known::Running if !self.truncations.running[&id].handle.is_finished() => {
                return Ok(Decision::Park(running));
            }
            Known::Running => {
                let Some(job) = self.truncations.running.remove(&id) else {
                    return Ok(Decision::Park(running));
                };
                let outcome = job.handle.await.map_err(|e| Error::TruncateJob {
                    table: table.to_string(),
                    problem: e.to_string(),
                })?;
                outcome?;
                self.truncate_done(id, job.generation);
                return Ok(Decision::Applied);
            }
            // A job that does not cover this copy may still run: let it finish first.
            Known::Unknown if self.truncations.running.contains_key(&id) => {
                return Ok(Decision::Park(running));
            }
            Known::Unknown => {}
        }
        let schema = self.schema(table)?.clone();
        let sql = schema.truncate_sql(self.locate.lookups.database(), version);
        let shards = self.locate.lookups.clients();
        let only = self.only_shard;
        tracing::info!(%table, version, ?only, "truncate: writing delete markers on every shard (in scope)");
        let handle = tokio::spawn(async move {
            let in_scope = |(shard, _): &(usize, _)| only.is_none_or(|o| o == *shard);
            for (shard, client) in shards.iter().enumerate().filter(in_scope) {
                let action = format!("TRUNCATE of {table} (delete markers)");
                tokio::time::timeout(TRUNCATE_TIMEOUT, client.query_raw(&sql).execute())
                    .await
                    .map_err(|_| Error::Timeout { shard, action: action.clone() })?
                    .map_err(Error::shard(shard, action))?;
            }
            Ok(())
        });
        self.truncations.running.insert(id, Job { handle, generation });
        let through = self.truncations.through.entry(table).or_insert(version);
        *through = (*through).max(version);
        Ok(Decision::Park(running))
    }

    fn truncate_done(&mut self, (table, version): Id, generation: u64) {
        if table == SourceTable::Scorecards {
            self.locate.forget_cards();
        }
        self.truncations.remember_applied((table, version), generation);
        tracing::info!(%table, version, "truncate applied on every shard");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_started_truncate_makes_older_rows_of_its_table_dead_and_only_those() {
        let mut t = Truncations::default();
        assert!(!t.is_truncated(SourceTable::Scores, 5));
        t.through.insert(SourceTable::Scores, 10);
        assert!(t.is_truncated(SourceTable::Scores, 9));
        assert!(!t.is_truncated(SourceTable::Scores, 10), "the TRUNCATE's own version lives");
        assert!(!t.is_truncated(SourceTable::Scores, 11));
        assert!(!t.is_truncated(SourceTable::Scorecards, 9), "other tables untouched");
    }

    #[test]
    fn applied_truncates_are_remembered_up_to_the_bound() {
        let mut t = Truncations::default();
        for version in 0..(REMEMBERED as u64 + 1) {
            t.remember_applied((SourceTable::Scores, version), 3);
        }
        assert!(!t.started((SourceTable::Scores, 0), 1), "the oldest is forgotten");
        assert!(t.started((SourceTable::Scores, REMEMBERED as u64), 1));
    }

    #[test]
    fn a_job_covers_only_partitions_owned_when_it_started() {
        let mut t = Truncations::default();
        let id = (SourceTable::Scores, 10);
        t.remember_applied(id, 3);
        assert!(t.started(id, 3), "owned since the job's generation");
        assert!(t.started(id, 1), "owned since before it");
        assert!(!t.started(id, 4), "handed over after it started: runs again");
        assert!(!t.started(id, u64::MAX), "not owned");
    }
}
