//! Shard writers: one task per shard inserts that shard's batches in order, retrying a failed
//! insert with capped, jittered backoff until it succeeds (a shard that is down holds its
//! batches; nothing is skipped), then acknowledges the batch with the messages it covered.
//! Shard-local tables only, never a Distributed table.
//!
//! [`WriterPool`] is the loop's side: it queues batches per shard (a writer takes two at a time),
//! counts the rows in flight, and hands each acknowledgement back to the loop, which alone
//! releases the offset holds.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use scoresync_bus::group::InFlight;

use crate::batch::{Batch, MsgId};
use crate::rowbinary::write_row_binary;
use crate::scope::Scope;
use crate::shard::ShardIndex;
use crate::stats::SinkStats;
use crate::table::TableSchema;

/// Longest one insert attempt may take before it is retried.
pub(crate) const INSERT_TIMEOUT: Duration = Duration::from_secs(60);
/// Waits between insert attempts: 200 ms doubling to 15 s, each drawn from the upper half of its
/// step so that writers retrying one shard do not wake in step. backon's jitter adds up to 100%,
/// so the steps it doubles are half that: 100 ms to 7.5 s. The schedule never ends.
const INSERT_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_millis(7_500))
    .with_jitter()
    .without_max_times();

/// How often a refused insert is logged at error level (every attempt is counted).
const LOUD_EVERY: Duration = Duration::from_secs(60);

/// Why an insert attempt failed.
enum Refusal {
    /// The server answered with an error (a column type changed, a table gone, access denied):
    /// shown as its own state, because waiting alone will not cure it.
    Rejected(String),
    /// No answer, a broken connection or a timeout: the shard is away.
    Unavailable(String),
}

/// What a writer reports after a batch is in ClickHouse.
#[derive(Debug)]
pub(crate) struct Ack {
    /// Rows inserted.
    pub rows: usize,
    /// Their estimated bytes.
    pub bytes: usize,
    /// The messages whose rows the batch carried (each releases one hold).
    pub origins: BTreeSet<MsgId>,
    /// The batch's sequence number.
    pub seq: u64,
}

/// Inserts batches for one shard.
struct ShardWriter {
    shard: ShardIndex,
    client: clickhouse::Client,
    database: String,
    schemas: Arc<Vec<TableSchema>>,
    batches: mpsc::Receiver<Batch>,
    acks: mpsc::Sender<Ack>,
    stats: Arc<SinkStats>,
    /// Rows handed to the writers and not yet inserted (a revoke waits for them, bounded).
    with_writers: InFlight,
    /// False for a shard outside the run's scope: its batches are acknowledged unwritten.
    writes: bool,
}

/// The loop's handle on the shard writers.
pub(crate) struct WriterPool {
    senders: Vec<mpsc::Sender<Batch>>,
    queues: Vec<VecDeque<Batch>>,
    acks: mpsc::Receiver<Ack>,
    in_flight_rows: usize,
    in_flight_bytes: usize,
    tasks: Vec<JoinHandle<()>>,
    stop: CancellationToken,
    with_writers: InFlight,
    /// Sequence number of the last batch sent.
    last_seq: u64,
    /// Sequence numbers of the batches sent and not yet acknowledged.
    outstanding: BTreeSet<u64>,
}

impl WriterPool {
    /// Starts one writer per client (shard order). `with_writers` counts the rows the writers
    /// hold (a partition revoke waits for them, bounded). Writers of shards outside `scope`
    /// acknowledge their batches without writing them.
    pub(crate) fn start(
        clients: &[clickhouse::Client],
        database: &str,
        schemas: &Arc<Vec<TableSchema>>,
        stats: &Arc<SinkStats>,
        with_writers: InFlight,
        scope: &Scope,
    ) -> Self {
        let stop = CancellationToken::new();
        let (ack_tx, acks) = mpsc::channel(1024);
        let mut senders = Vec::new();
        let mut tasks = Vec::new();
        for (shard, client) in clients.iter().enumerate() {
            let (tx, batches) = mpsc::channel(2);
            senders.push(tx);
            let writer = ShardWriter {
                shard,
                client: client.clone(),
                database: database.to_owned(),
                schemas: Arc::clone(schemas),
                batches,
                acks: ack_tx.clone(),
                stats: Arc::clone(stats),
                with_writers: with_writers.clone(),
                writes: scope.writes(shard),
            };
            tasks.push(tokio::spawn(writer.run(stop.clone())));
        }
        let queues = senders.iter().map(|_| VecDeque::new()).collect();
        WriterPool {
            senders,
            queues,
            acks,
            in_flight_rows: 0,
            in_flight_bytes: 0,
            tasks,
            stop,
            with_writers,
            last_seq: 0,
            outstanding: BTreeSet::new(),
        }
    }

    /// Queues a batch for its shard's writer.
    pub(crate) fn send(&mut self, mut batch: Batch) {
        self.last_seq += 1;
        batch.seq = self.last_seq;
        self.outstanding.insert(batch.seq);
        self.in_flight_rows += batch.rows.len();
        self.in_flight_bytes += batch.bytes;
        let shard = batch.shard;
        self.queues[shard].push_back(batch);
        self.push();
    }

    /// Hands queued batches to writers with room.
    fn push(&mut self) {
        for (shard, queue) in self.queues.iter_mut().enumerate() {
            while let Some(batch) = queue.pop_front() {
                // Counted before the writer can see it (it may finish before `try_send` returns).
                let rows = batch.rows.len();
                self.with_writers.add(rows);
                match self.senders[shard].try_send(batch) {
                    Ok(()) => {}
                    Err(
                        mpsc::error::TrySendError::Full(batch)
                        | mpsc::error::TrySendError::Closed(batch),
                    ) => {
                        self.with_writers.done(rows);
                        queue.push_front(batch);
                        break;
                    }
                }
            }
        }
    }

    /// Drops the queued rows (not yet with a writer) written by messages of `partitions`;
    /// returns the messages whose holds those batches no longer need.
    pub(crate) fn purge(&mut self, partitions: &[i32]) -> Vec<MsgId> {
        let mut released = Vec::new();
        for queue in &mut self.queues {
            for batch in queue.iter_mut() {
                let (before, before_bytes) = (batch.rows.len(), batch.bytes);
                released.extend(batch.purge(partitions));
                self.in_flight_rows -= before - batch.rows.len();
                self.in_flight_bytes -= before_bytes - batch.bytes;
            }
            // A batch left without rows is done: its other messages need no insert.
            for batch in queue.iter_mut().filter(|b| b.rows.is_empty()) {
                released.extend(std::mem::take(&mut batch.origins));
                self.outstanding.remove(&batch.seq);
            }
            queue.retain(|b| !b.rows.is_empty());
        }
        released
    }

    /// The next acknowledgement (`None` once every writer stopped).
    pub(crate) async fn ack(&mut self) -> Option<Ack> {
        let ack = self.acks.recv().await?;
        self.in_flight_rows -= ack.rows;
        self.in_flight_bytes -= ack.bytes;
        self.outstanding.remove(&ack.seq);
        self.push();
        Some(ack)
    }

    /// The sequence number of the last batch sent.
    pub(crate) fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Every batch up to this sequence number is acknowledged.
    pub(crate) fn acknowledged_through(&self) -> u64 {
        self.outstanding.first().map_or(self.last_seq, |oldest| oldest - 1)
    }

    /// An error when a shard writer stopped (they stop only at shutdown; a writer that panicked
    /// would otherwise leave its batches unacknowledged for ever, silently).
    pub(crate) fn check(&self) -> Result<(), crate::error::Error> {
        match self.tasks.iter().any(JoinHandle::is_finished) {
            true => Err(crate::error::Error::WritersStopped),
            false => Ok(()),
        }
    }

    /// Rows handed to the writers and not yet acknowledged.
    pub(crate) fn in_flight_rows(&self) -> usize {
        self.in_flight_rows
    }

    /// Estimated bytes of the rows handed to the writers and not yet acknowledged.
    pub(crate) fn in_flight_bytes(&self) -> usize {
        self.in_flight_bytes
    }

    /// Stops the writers (a batch not yet inserted stays unacknowledged: its messages are read
    /// again) and waits for them.
    pub(crate) async fn stop(self) {
        self.stop.cancel();
        for task in self.tasks {
            let _ = task.await;
        }
    }
}

impl ShardWriter {
    /// Runs until the batch channel closes or `shutdown` is cancelled (an unfinished batch is
    /// then left unacknowledged: its messages are not stored and will be read again).
    async fn run(mut self, shutdown: CancellationToken) {
        while let Some(batch) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            batch = self.batches.recv() => batch,
        } {
            if self.writes && !self.insert_until_done(&batch, &shutdown).await {
                return;
            }
            self.with_writers.done(batch.rows.len());
            let ack = Ack {
                rows: batch.rows.len(),
                bytes: batch.bytes,
                origins: batch.origins,
                seq: batch.seq,
            };
            if self.acks.send(ack).await.is_err() {
                return;
            }
        }
    }

    async fn insert_until_done(&self, batch: &Batch, shutdown: &CancellationToken) -> bool {
        let Some(schema) = self.schemas.iter().find(|s| s.table == batch.table) else {
            tracing::error!(table = %batch.table, "no schema for table; batch dropped unacknowledged");
            return false;
        };
        let mut body = Vec::with_capacity(batch.rows.len() * 128);
        write_row_binary(schema, &batch.rows, &mut body);
        let body = Bytes::from(body);
        let sql = schema.insert_sql(&self.database);
        let mut backoff = INSERT_BACKOFF.build();
        let mut failures = 0_u32;
        let mut said_at: Option<Instant> = None;
        loop {
            let started = Instant::now();
            let attempt = async {
                let mut insert = self.client.insert_formatted_with(sql.clone());
                insert.send(body.clone()).await?;
                insert.end().await
            };
            let failure = match tokio::time::timeout(INSERT_TIMEOUT, attempt).await {
                Ok(Ok(())) => None,
                Ok(Err(clickhouse::error::Error::BadResponse(error))) => {
                    Some(Refusal::Rejected(error))
                }
                Ok(Err(other)) => Some(Refusal::Unavailable(other.to_string())),
                Err(_) => {
                    Some(Refusal::Unavailable(format!("no answer within {INSERT_TIMEOUT:?}")))
                }
            };
            let (rows, table) = (batch.rows.len(), batch.table.name());
            let Some(failure) = failure else {
                let commit_times = batch.rows.iter().map(|r| r.commit_time_us);
                self.stats.inserted(
                    self.shard,
                    table,
                    started.elapsed().as_secs_f64(),
                    commit_times,
                );
                if said_at.is_some() {
                    tracing::info!(shard = self.shard, table, "inserts accepted again");
                }
                return true;
            };
            let refused = match &failure {
                Refusal::Rejected(error) => Some(error.as_str()),
                Refusal::Unavailable(_) => None,
            };
            self.stats.insert_failed(self.shard, table, refused);
            failures = failures.saturating_add(1);
            let delay = backoff.next().unwrap_or(Duration::from_secs(15));
            match failure {
                Refusal::Rejected(error) => {
                    // One clear line a minute: the server refuses the rows, retrying cannot help
                    // until an operator changes the table (or the sink) back.
                    if said_at.is_none_or(|at| at.elapsed() >= LOUD_EVERY) {
                        said_at = Some(Instant::now());
                        tracing::error!(shard = self.shard, table, rows, attempts = failures, %error, "clickhouse refuses the insert; retrying until the table takes it (see scoresync status)");
                    }
                }
                Refusal::Unavailable(error) => {
                    tracing::warn!(shard = self.shard, table, rows, attempt = failures, ?delay, %error, "insert failed; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_retries_wait_200ms_doubling_to_15s_from_the_upper_half_of_each_step() {
        let delays: Vec<Duration> = INSERT_BACKOFF.build().take(20).collect();
        assert_eq!(delays.len(), 20, "the schedule never ends");
        let ms = Duration::from_millis;
        assert!(delays[0] >= ms(100) && delays[0] <= ms(200), "{delays:?}");
        assert!(delays[3] >= ms(800) && delays[3] <= ms(1_600), "{delays:?}");
        assert!(delays.iter().all(|d| *d <= ms(15_000)), "{delays:?}");
        assert!(delays[19] >= ms(7_500), "capped delays stay near the cap: {delays:?}");
    }
}
