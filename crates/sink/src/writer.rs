//! One writer task per shard: inserts batches in order, retrying a failed insert with capped,
//! jittered backoff until it succeeds (a shard that is down holds its batches; nothing is
//! skipped), then releases the batch's Kafka messages. Shard-local tables only, never a
//! Distributed table.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use scoresync_bus::backoff::Backoff;

use crate::batch::Batch;
use crate::offsets::Offsets;
use crate::rowbinary::write_row_binary;
use crate::shard::ShardIndex;
use crate::stats::SinkStats;
use crate::table::TableSchema;

/// Longest one insert attempt may take before it is retried.
pub const INSERT_TIMEOUT: Duration = Duration::from_secs(60);

/// What a writer reports after a batch is in ClickHouse.
#[derive(Debug)]
pub struct Ack {
    /// The shard.
    pub shard: ShardIndex,
    /// Rows inserted.
    pub rows: usize,
}

/// Inserts batches for one shard.
pub struct ShardWriter {
    /// The shard.
    pub shard: ShardIndex,
    /// Its client.
    pub client: clickhouse::Client,
    /// Database on the shard.
    pub database: String,
    /// Target table schemas.
    pub schemas: Arc<Vec<TableSchema>>,
    /// Batches to insert.
    pub batches: mpsc::Receiver<Batch>,
    /// Where acknowledgements go.
    pub acks: mpsc::Sender<Ack>,
    /// Offsets to release after each insert.
    pub offsets: Arc<Mutex<Offsets>>,
    /// Counters.
    pub stats: Arc<SinkStats>,
    /// Rows handed to writers and not yet inserted (shared with the sink loop).
    pub in_flight_rows: Arc<AtomicUsize>,
}

impl ShardWriter {
    /// Runs until the batch channel closes or `shutdown` is cancelled (an unfinished batch is
    /// then left unacknowledged: its messages are not stored and will be read again).
    pub async fn run(mut self, shutdown: CancellationToken) {
        while let Some(batch) = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            batch = self.batches.recv() => batch,
        } {
            if !self.insert_until_done(&batch, &shutdown).await {
                return;
            }
            if let Ok(mut offsets) = self.offsets.lock() {
                for origin in &batch.origins {
                    offsets.release(*origin);
                }
            }
            self.in_flight_rows.fetch_sub(batch.rows.len(), Ordering::AcqRel);
            let _ = self.acks.send(Ack { shard: self.shard, rows: batch.rows.len() }).await;
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
        let sql = format!(
            "INSERT INTO {}.{} ({}) FORMAT RowBinary",
            self.database,
            batch.table.name(),
            schema.column_list()
        );
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
        loop {
            let started = Instant::now();
            let attempt = async {
                let mut insert = self.client.insert_formatted_with(sql.clone());
                insert.send(body.clone()).await?;
                insert.end().await
            };
            let result = match tokio::time::timeout(INSERT_TIMEOUT, attempt).await {
                Ok(result) => result.map_err(|e| e.to_string()),
                Err(_) => Err(format!("no answer within {INSERT_TIMEOUT:?}")),
            };
            match result {
                Ok(()) => {
                    self.stats.insert(
                        self.shard,
                        batch.table.name(),
                        batch.rows.len(),
                        Some(started.elapsed().as_secs_f64()),
                    );
                    self.record_lag(batch);
                    return true;
                }
                Err(error) => {
                    self.stats.insert(self.shard, batch.table.name(), batch.rows.len(), None);
                    let delay = backoff.next_delay();
                    tracing::warn!(shard = self.shard, table = %batch.table, rows = batch.rows.len(), attempt = backoff.attempts(), ?delay, %error, "insert failed; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    fn record_lag(&self, batch: &Batch) {
        let newest = batch.rows.iter().map(|r| r.commit_time_us).max().unwrap_or(0);
        if newest <= 0 {
            return;
        }
        let now_us =
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64);
        if let Ok(mut lag) = self.stats.commit_to_ack_seconds.lock() {
            lag.insert(batch.table.name().to_owned(), (now_us - newest).max(0) as f64 / 1e6);
        }
    }
}
