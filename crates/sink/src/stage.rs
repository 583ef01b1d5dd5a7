//! The sink stage: the consumer loop that decodes, applies, batches, hands batches to the shard
//! writers and stores offsets.
//!
//! Loop priorities: shutdown, then writer and dead-letter acknowledgements, then the timer
//! (flush aged batches, store offsets, retry parked events, pause or resume), then new messages.
//! Memory stays bounded: when buffered plus in-flight rows reach `max_buffered_rows`, or parked
//! events reach `max_parked_events`, the assigned partitions are paused (the loop keeps polling,
//! so the consumer stays in its group) until the backlog halves.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use error_reporter::Report;
use futures::FutureExt;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use scoresync_bus::KafkaConfig;
use scoresync_bus::client::OffsetReset;
use scoresync_event::{ChangeEvent, decode};

use crate::apply::{Applier, Decision, event_row_key};
use crate::batch::{Batch, Batcher, Limits, MsgId};
use crate::cache::Caches;
use crate::config::{ClickHouseConfig, SinkConfig};
use crate::dlq::{DeadLetters, Origin};
use crate::error::Error;
use crate::lookup::Lookups;
use crate::offsets::Offsets;
use crate::park::{Park, ParkReason};
use crate::stats::{ParkedSnapshot, SinkStats};
use crate::writer::{Ack, ShardWriter};

/// Most messages taken from the consumer in one go (then lookups are batched for them).
const POLL_BATCH: usize = 500;
/// How long a revoke waits for batches already with the writers.
const REVOKE_DRAIN: Duration = Duration::from_secs(15);
/// How long shutdown waits for buffered rows to reach ClickHouse.
const SHUTDOWN_DRAIN: Duration = Duration::from_secs(30);
/// How long an event that reads back stored rows (a move, a TRUNCATE) waits for earlier rows to
/// be acknowledged before it is parked instead (a shard may be down).
const FLUSH_PATIENCE: Duration = Duration::from_secs(10);

/// How a bounded flush ended.
enum Flushed {
    /// Every buffered row is acknowledged.
    Done,
    /// Shutdown came first.
    Shutdown,
    /// Patience ran out (a shard is slow or down).
    TimedOut,
}

/// The sink role.
pub struct Sink {
    /// Kafka settings (change topic, dead-letter topic, group).
    pub kafka: KafkaConfig,
    /// Shards.
    pub clickhouse: ClickHouseConfig,
    /// Batching and bounds.
    pub sink: SinkConfig,
    /// PostgreSQL URL for last-resort lookups (`None`: park instead).
    pub postgres_url: Option<String>,
    /// What it counts.
    pub stats: Arc<SinkStats>,
}

/// Consumer callbacks: on revoke, wait for in-flight batches and commit what is done.
pub struct SinkContext {
    offsets: Arc<Mutex<Offsets>>,
    in_flight_rows: Arc<AtomicUsize>,
    /// Partitions revoked, each with the revocation count after its revoke.
    revoked: Arc<Mutex<Vec<(u64, i32)>>>,
    /// Revocations so far: messages are stamped with it as they arrive, so a message fetched
    /// before its partition was revoked is told apart from one read after it came back.
    revocations: Arc<AtomicU64>,
    /// Partitions currently assigned (for the rejoin watchdog).
    assigned: Arc<AtomicUsize>,
    /// True while the loop keeps consumption paused (buffers or park full).
    paused: Arc<AtomicBool>,
    /// Partitions assigned back while their revoked generation still had holds: paused until
    /// those are released.
    draining: Arc<Mutex<HashSet<i32>>>,
    topic: String,
}

impl ClientContext for SinkContext {}

impl ConsumerContext for SinkContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(partitions) = rebalance else { return };
        let deadline = Instant::now() + REVOKE_DRAIN;
        while self.in_flight_rows.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let mut commit = TopicPartitionList::new();
        let mut gone = Vec::new();
        if let Ok(mut offsets) = self.offsets.lock() {
            for element in partitions.elements() {
                gone.push(element.partition());
                if let Some(offset) = offsets.committable(element.partition()) {
                    let _ = commit.add_partition_offset(
                        &self.topic,
                        element.partition(),
                        Offset::Offset(offset),
                    );
                }
                offsets.revoke(element.partition());
            }
        }
        if commit.count() > 0
            && let Err(error) = consumer.commit(&commit, rdkafka::consumer::CommitMode::Sync)
        {
            tracing::warn!(%error, "commit on revoke failed; the new owner re-reads from the last commit");
        }
        tracing::info!(partitions = ?gone, "partitions revoked");
        self.assigned
            .fetch_sub(gone.len().min(self.assigned.load(Ordering::Acquire)), Ordering::AcqRel);
        let count = self.revocations.fetch_add(1, Ordering::AcqRel) + 1;
        if let Ok(mut revoked) = self.revoked.lock() {
            revoked.extend(gone.into_iter().map(|p| (count, p)));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Assign(partitions) = rebalance else { return };
        self.assigned.fetch_add(partitions.count(), Ordering::AcqRel);
        // Paused before the first fetch: while the loop holds consumption, and while rows of
        // the partition's revoked generation are still in flight.
        let retired: Vec<i32> = match self.offsets.lock() {
            Ok(offsets) => partitions
                .elements()
                .iter()
                .map(|e| e.partition())
                .filter(|p| offsets.has_retired(*p))
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut pause = TopicPartitionList::new();
        for element in partitions.elements() {
            if self.paused.load(Ordering::Acquire) || retired.contains(&element.partition()) {
                pause.add_partition(&self.topic, element.partition());
            }
        }
        if !retired.is_empty() {
            tracing::info!(partitions = ?retired, "assigned back while rows of the revoked assignment are in flight: paused until they are acknowledged");
            if let Ok(mut draining) = self.draining.lock() {
                draining.extend(retired);
            }
        }
        if pause.count() > 0
            && let Err(error) = consumer.pause(&pause)
        {
            tracing::error!(%error, "pausing newly assigned partitions failed");
        }
        let committed =
            consumer.committed_offsets((*partitions).clone(), Duration::from_secs(10)).ok();
        for element in partitions.elements() {
            let partition = element.partition();
            let committed = committed
                .as_ref()
                .and_then(|c| c.find_partition(&self.topic, partition))
                .map(|e| e.offset());
            let low = consumer
                .fetch_watermarks(&self.topic, partition, Duration::from_secs(10))
                .ok()
                .map(|w| w.0);
            match (committed, low) {
                (Some(Offset::Offset(at)), Some(low)) if at < low => tracing::error!(
                    partition,
                    committed = at,
                    earliest_retained = low,
                    "committed offset is older than the earliest retained message: events were deleted by \
                     retention before the sink applied them; ClickHouse may miss changes (run verify --repair)"
                ),
                (Some(Offset::Offset(at)), _) => {
                    tracing::info!(partition, from = at, "partition assigned")
                }
                _ => tracing::warn!(
                    partition,
                    "partition assigned with no committed offset: starting at the earliest retained message"
                ),
            }
        }
    }
}

/// One consumed message, owned.
struct Incoming {
    id: MsgId,
    /// The revocation count when it arrived.
    stamp: u64,
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
}

/// The loop's state.
struct Loop {
    applier: Applier,
    dead_letters: DeadLetters,
    dlq_acks: FuturesUnordered<
        futures::future::BoxFuture<'static, (MsgId, Result<(), rdkafka::error::KafkaError>)>,
    >,
    writers: Vec<mpsc::Sender<Batch>>,
    queues: Vec<VecDeque<Batch>>,
    acks: mpsc::Receiver<Ack>,
    in_flight_rows: Arc<AtomicUsize>,
    offsets: Arc<Mutex<Offsets>>,
    stats: Arc<SinkStats>,
    topic: String,
    config: SinkConfig,
    paused: bool,
    /// `paused`, shared with the rebalance callbacks.
    paused_flag: Arc<AtomicBool>,
    /// When a bounded wait for acknowledgements last ran out.
    flush_timed_out_at: Option<Instant>,
    /// Shared with the rebalance callbacks: see [`SinkContext`].
    revocations: Arc<AtomicU64>,
    /// Shared with the rebalance callbacks: see [`SinkContext`].
    draining: Arc<Mutex<HashSet<i32>>>,
}

impl Sink {
    /// Runs until `shutdown` (drains, stores offsets, returns `Ok`) or a permanent error.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let schemas = Arc::new(crate::schema::load(&self.clickhouse).await?);
        let clients = crate::shard::clients(&self.clickhouse);
        let offsets = Arc::new(Mutex::new(Offsets::default()));
        let in_flight_rows = Arc::new(AtomicUsize::new(0));
        let revoked = Arc::new(Mutex::new(Vec::new()));
        let assigned = Arc::new(AtomicUsize::new(0));
        let paused_flag = Arc::new(AtomicBool::new(false));
        let revocations = Arc::new(AtomicU64::new(0));
        let draining = Arc::new(Mutex::new(HashSet::new()));
        let context = SinkContext {
            offsets: Arc::clone(&offsets),
            in_flight_rows: Arc::clone(&in_flight_rows),
            revoked: Arc::clone(&revoked),
            revocations: Arc::clone(&revocations),
            assigned: Arc::clone(&assigned),
            paused: Arc::clone(&paused_flag),
            draining: Arc::clone(&draining),
            topic: self.kafka.change_topic.clone(),
        };
        let consumer: StreamConsumer<SinkContext> = scoresync_bus::client::consumer(
            &self.kafka,
            &self.kafka.consumer_group,
            OffsetReset::Earliest,
            context,
        )?;
        consumer.subscribe(&[&self.kafka.change_topic]).map_err(|source| Error::Kafka {
            context: format!("subscribing to {}", self.kafka.change_topic),
            source,
        })?;

        let pg = match &self.postgres_url {
            Some(url) => Some(connect_postgres(url).await?),
            None => None,
        };
        let writer_stop = CancellationToken::new();
        let (ack_tx, ack_rx) = mpsc::channel(1024);
        let mut writers = Vec::new();
        let mut tasks = Vec::new();
        for (shard, client) in clients.iter().enumerate() {
            let (tx, rx) = mpsc::channel(2);
            writers.push(tx);
            let writer = ShardWriter {
                shard,
                client: client.clone(),
                database: self.clickhouse.database.clone(),
                schemas: Arc::clone(&schemas),
                batches: rx,
                acks: ack_tx.clone(),
                offsets: Arc::clone(&offsets),
                stats: Arc::clone(&self.stats),
                in_flight_rows: Arc::clone(&in_flight_rows),
            };
            tasks.push(tokio::spawn(writer.run(writer_stop.clone())));
        }
        let limits = Limits {
            max_rows: self.sink.max_batch_rows,
            max_bytes: self.sink.max_batch_bytes,
            max_wait: Duration::from_millis(self.sink.max_wait_ms),
        };
        let mut state = Loop {
            applier: Applier {
                shards: clients.len(),
                schemas,
                lookups: Lookups::new(clients.clone(), self.clickhouse.database.clone(), pg),
                caches: Caches::new(self.sink.cache_entries),
                batcher: Batcher::new(limits),
                park: Park::default(),
                offsets: Arc::clone(&offsets),
                absent: Default::default(),
            },
            dead_letters: DeadLetters::new(&self.kafka)?,
            dlq_acks: FuturesUnordered::new(),
            queues: (0..writers.len()).map(|_| VecDeque::new()).collect(),
            writers,
            acks: ack_rx,
            in_flight_rows,
            offsets,
            stats: Arc::clone(&self.stats),
            topic: self.kafka.change_topic.clone(),
            config: self.sink.clone(),
            paused: false,
            paused_flag,
            flush_timed_out_at: None,
            revocations,
            draining,
        };
        let rejoin_after = Duration::from_millis(self.kafka.session_timeout_ms * 3);
        let result = state.run(&consumer, &revoked, &assigned, rejoin_after, &shutdown).await;
        let drained = state.drain(&shutdown, &consumer).await;
        writer_stop.cancel();
        for task in tasks {
            let _ = task.await;
        }
        // librdkafka's consumer close can block (it waits for the group to settle): do it off the
        // async threads and do not wait for ever.
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            drop(consumer);
            let _ = done_tx.send(());
        });
        if tokio::time::timeout(Duration::from_secs(10), done_rx).await.is_err() {
            tracing::warn!("kafka consumer close did not finish within 10s");
        }
        result.and(drained)
    }
}

async fn connect_postgres(url: &str) -> Result<tokio_postgres::Client, Error> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .map_err(|source| Error::Postgres { context: "connecting for lookups".into(), source })?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::warn!(%error, "postgres lookup connection ended");
        }
    });
    Ok(client)
}

impl Loop {
    async fn run(
        &mut self,
        consumer: &StreamConsumer<SinkContext>,
        revoked: &Mutex<Vec<(u64, i32)>>,
        assigned: &AtomicUsize,
        rejoin_after: Duration,
        shutdown: &CancellationToken,
    ) -> Result<(), Error> {
        let mut unassigned_since = Some(Instant::now());
        let mut tick = tokio::time::interval(Duration::from_millis(
            (self.config.max_wait_ms / 2).clamp(20, 500),
        ));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_park_retry = Instant::now();
        loop {
            tokio::select! {
                biased;
                // 1. Shutdown.
                _ = shutdown.cancelled() => return Ok(()),
                // 2. Acknowledgements: writers (offsets already released by the writer) and
                //    dead letters.
                Some(ack) = self.acks.recv() => self.on_ack(ack),
                Some((msg, result)) = self.dlq_acks.next(), if !self.dlq_acks.is_empty() => {
                    result.map_err(|source| Error::Kafka { context: "dead-letter write".into(), source })?;
                    self.release(msg);
                }
                // 3. Timer: flush aged batches, store offsets, retry parked events, pause/resume.
                _ = tick.tick() => {
                    let _ = self.forget_revoked(revoked);
                    self.flush_ready();
                    self.store_offsets(consumer)?;
                    if last_park_retry.elapsed() >= Duration::from_millis(self.config.park_retry_ms) {
                        last_park_retry = Instant::now();
                        if !self.retry_parked(shutdown).await? {
                            return Ok(());
                        }
                    }
                    self.pause_or_resume(consumer)?;
                    self.publish_stats();
                    self.rejoin_if_stuck(consumer, assigned, &mut unassigned_since, rejoin_after)?;
                }
                // 4. New messages.
                message = consumer.recv() => {
                    let first = message.map_err(|source| Error::Kafka { context: "consuming".into(), source })?;
                    let mut batch = vec![owned(&first, self.revocations.load(Ordering::Acquire))];
                    drop(first);
                    while batch.len() < POLL_BATCH {
                        match consumer.recv().now_or_never() {
                            Some(Ok(m)) => {
                                batch.push(owned(&m, self.revocations.load(Ordering::Acquire)));
                            }
                            _ => break,
                        }
                    }
                    let gone = self.forget_revoked(revoked);
                    // Fetched before their partition was revoked: the next owner (maybe this
                    // sink again) reads them anew from the committed offset.
                    batch.retain(|m| !gone.iter().any(|(at, p)| *p == m.id.0 && m.stamp < *at));
                    if !self.process(batch, shutdown).await? {
                        return Ok(());
                    }
                    self.flush_ready();
                }
            }
        }
    }

    /// Watchdog: a group that assigns this sink nothing for `rejoin_after` (a member that died
    /// mid-rebalance can wedge some brokers' coordinators, tansu 0.6 among them) is left and
    /// joined again.
    fn rejoin_if_stuck(
        &mut self,
        consumer: &StreamConsumer<SinkContext>,
        assigned: &AtomicUsize,
        unassigned_since: &mut Option<Instant>,
        rejoin_after: Duration,
    ) -> Result<(), Error> {
        if assigned.load(Ordering::Acquire) > 0 {
            *unassigned_since = None;
            return Ok(());
        }
        let since = *unassigned_since.get_or_insert_with(Instant::now);
        if since.elapsed() < rejoin_after {
            return Ok(());
        }
        tracing::warn!(waited = ?since.elapsed(), topic = %self.topic, "no partitions assigned; leaving and rejoining the consumer group");
        consumer.unsubscribe();
        consumer.subscribe(&[&self.topic]).map_err(|source| Error::Kafka {
            context: format!("re-subscribing to {}", self.topic),
            source,
        })?;
        *unassigned_since = Some(Instant::now());
        Ok(())
    }

    fn on_ack(&mut self, _ack: Ack) {
        self.push_queues();
    }

    fn release(&self, msg: MsgId) {
        if let Ok(mut offsets) = self.offsets.lock() {
            offsets.release(msg);
        }
    }

    /// Drops what the sink kept for partitions revoked since the last call; returns them, each
    /// with the revocation count after its revoke.
    fn forget_revoked(&mut self, revoked: &Mutex<Vec<(u64, i32)>>) -> Vec<(u64, i32)> {
        let gone: Vec<(u64, i32)> =
            revoked.lock().map(|mut r| std::mem::take(&mut *r)).unwrap_or_default();
        // Their offset holds were retired when they were revoked; parked events are dropped (the
        // next owner re-reads them) and release their holds there. Where the cards of those
        // partitions live is another owner's business meanwhile: the cache is read anew.
        if !gone.is_empty() {
            self.applier.caches.cards.clear();
        }
        for &(_, partition) in &gone {
            for msg in self.applier.park.revoke(partition) {
                self.release(msg);
            }
        }
        gone
    }

    /// Decodes and applies a poll batch. Returns false when shutdown interrupted it.
    async fn process(
        &mut self,
        batch: Vec<Incoming>,
        shutdown: &CancellationToken,
    ) -> Result<bool, Error> {
        SinkStats::add(&self.stats.messages_consumed, batch.len() as u64);
        let mut events = Vec::with_capacity(batch.len());
        for incoming in batch {
            if let Ok(mut offsets) = self.offsets.lock() {
                offsets.received(incoming.id);
            }
            match decode(&incoming.payload) {
                Ok(event) => events.push((incoming, event)),
                Err(err) => self.dead_letter(&incoming, &Report::new(&err).to_string())?,
            }
        }
        self.applier.prefetch(events.iter().map(|(_, e)| e)).await;
        for (incoming, event) in events {
            if !self.apply_one(&incoming, event, shutdown).await? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Applies one event, or parks or dead-letters it. A shard or PostgreSQL that does not
    /// answer parks the event (retried later) instead of stalling every partition. Returns false
    /// when shutdown interrupted it.
    async fn apply_one(
        &mut self,
        incoming: &Incoming,
        event: ChangeEvent,
        shutdown: &CancellationToken,
    ) -> Result<bool, Error> {
        let table = scoresync_event::SourceTable::from_name(&event.schema, &event.table);
        loop {
            if let Some(table) = table
                && let Some(reason) =
                    self.applier.park.behind(&event_row_key(table, &event), &event, incoming.id)
            {
                self.park(table, incoming.id, event, reason);
                return Ok(true);
            }
            let reason = match self.applier.apply(incoming.id, &event, self.flushed()).await {
                Ok(Decision::Applied) => {
                    if let Some(table) = table {
                        let row = event_row_key(table, &event);
                        if let Some(older) = self.applier.park.supersede(&row, &event) {
                            self.release(older);
                        }
                    }
                    SinkStats::add(&self.stats.events_applied, 1);
                    self.release(incoming.id);
                    return Ok(true);
                }
                Ok(Decision::Park(reason)) => reason,
                Ok(Decision::Poison(error)) => {
                    self.dead_letter(incoming, &error)?;
                    return Ok(true);
                }
                Ok(Decision::NeedsFlush) => match self.flush_within(shutdown, FLUSH_PATIENCE).await
                {
                    Flushed::Done => continue,
                    Flushed::Shutdown => return Ok(false),
                    Flushed::TimedOut => ParkReason::Unavailable(
                        "earlier rows to be acknowledged by every shard".into(),
                    ),
                },
                Err(err) if err.is_transient() => {
                    tracing::warn!(partition = incoming.id.0, offset = incoming.id.1, error = %Report::new(&err), "cannot apply now; parking");
                    ParkReason::Unavailable(dependency(&err))
                }
                Err(err) => return Err(err),
            };
            let Some(table) = table else { return Ok(true) };
            self.park(table, incoming.id, event, reason);
            return Ok(true);
        }
    }

    fn park(
        &mut self,
        table: scoresync_event::SourceTable,
        msg: MsgId,
        event: ChangeEvent,
        reason: ParkReason,
    ) {
        tracing::debug!(partition = msg.0, offset = msg.1, %reason, "parked");
        let row = event_row_key(table, &event);
        if let Some(unneeded) = self.applier.park.park(row, msg, event, reason) {
            self.release(unneeded);
        }
    }

    /// [`Loop::flush_and_wait`], bounded by `patience`.
    /// After a wait timed out, the next ones within [`FLUSH_PATIENCE`] give up at once (the
    /// events park): a shard that hangs costs one wait, not one per event.
    async fn flush_within(&mut self, shutdown: &CancellationToken, patience: Duration) -> Flushed {
        if self.flush_timed_out_at.is_some_and(|at| at.elapsed() < FLUSH_PATIENCE) {
            self.flush_ready();
            return Flushed::TimedOut;
        }
        match tokio::time::timeout(patience, self.flush_and_wait(shutdown)).await {
            Ok(true) => {
                self.flush_timed_out_at = None;
                Flushed::Done
            }
            Ok(false) => Flushed::Shutdown,
            Err(_) => {
                self.flush_timed_out_at = Some(Instant::now());
                Flushed::TimedOut
            }
        }
    }

    fn dead_letter(&mut self, incoming: &Incoming, error: &str) -> Result<(), Error> {
        tracing::warn!(
            partition = incoming.id.0,
            offset = incoming.id.1,
            error,
            "dead-lettering a poison message"
        );
        let origin = Origin {
            topic: &self.topic,
            partition: incoming.id.0,
            offset: incoming.id.1,
            key: incoming.key.as_deref(),
            payload: &incoming.payload,
        };
        let delivery = self.dead_letters.send(&origin, error)?;
        let id = incoming.id;
        self.dlq_acks.push(
            async move {
                let result = match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((err, _))) => Err(err),
                    Err(_) => Err(rdkafka::error::KafkaError::Canceled),
                };
                (id, result)
            }
            .boxed(),
        );
        SinkStats::add(&self.stats.dead_lettered, 1);
        Ok(())
    }

    /// Retries parked events that are due. Returns false when shutdown interrupted it.
    async fn retry_parked(&mut self, shutdown: &CancellationToken) -> Result<bool, Error> {
        let due = self.applier.park.due(Instant::now());
        if due.is_empty() {
            return Ok(true);
        }
        self.applier.prefetch(due.iter().map(|(_, p)| &p.event)).await;
        let mut applied = 0usize;
        for (row, parked) in due {
            if let Some(reason) = self.applier.park.behind(&row, &parked.event, parked.msg) {
                self.applier.park.repark(row, parked, reason);
                continue;
            }
            let mut decision = self.applier.apply(parked.msg, &parked.event, self.flushed()).await;
            if let Ok(Decision::NeedsFlush) = decision {
                // Flush, then try again at once (as a live event does): under steady traffic a
                // later round would find new rows buffered again.
                decision = match self.flush_within(shutdown, FLUSH_PATIENCE).await {
                    Flushed::Shutdown => {
                        let reason = parked.reason.clone();
                        self.applier.park.repark(row, parked, reason);
                        return Ok(false);
                    }
                    Flushed::TimedOut => Ok(Decision::Park(ParkReason::Unavailable(
                        "earlier rows to be acknowledged by every shard".into(),
                    ))),
                    Flushed::Done => {
                        self.applier.apply(parked.msg, &parked.event, self.flushed()).await
                    }
                };
            }
            match decision {
                Ok(Decision::Applied) => {
                    tracing::debug!(
                        partition = parked.msg.0,
                        offset = parked.msg.1,
                        "parked event applied"
                    );
                    applied += 1;
                    self.applier.park.wake_scorecard(&parked.event);
                    self.release(parked.msg);
                }
                Ok(Decision::Park(reason)) => self.applier.park.repark(row, parked, reason),
                Ok(Decision::Poison(error)) => {
                    self.applier.park.wake_scorecard(&parked.event);
                    // The key the source gave it (so a redrive lands in the same partition).
                    let key = scoresync_event::ScorecardKey::of_event(&parked.event)
                        .map(|k| k.to_message_key());
                    let incoming = Incoming {
                        id: parked.msg,
                        stamp: 0,
                        key,
                        payload: scoresync_event::encode(&parked.event),
                    };
                    self.dead_letter(&incoming, &error)?;
                }
                Ok(Decision::NeedsFlush) => {
                    // New rows arrived during the flush (a wake in this round): next round.
                    let reason = ParkReason::Unavailable(
                        "earlier rows to be acknowledged by every shard".into(),
                    );
                    self.applier.park.repark(row, parked, reason);
                }
                Err(err) if err.is_transient() => {
                    tracing::debug!(error = %Report::new(&err), "retrying a parked event failed");
                    self.applier.park.repark(
                        row,
                        parked,
                        ParkReason::Unavailable(dependency(&err)),
                    );
                }
                Err(err) => return Err(err),
            }
        }
        if applied > 0 {
            tracing::info!(
                applied,
                still_parked = self.applier.park.len(),
                "parked events applied"
            );
        }
        Ok(true)
    }

    /// True when every row is in ClickHouse (nothing buffered, nothing in flight).
    fn flushed(&self) -> bool {
        self.applier.batcher.rows() == 0 && self.in_flight_rows.load(Ordering::Acquire) == 0
    }

    fn flush_ready(&mut self) {
        for batch in self.applier.batcher.ready(Instant::now()) {
            self.enqueue(batch);
        }
        self.push_queues();
    }

    fn enqueue(&mut self, batch: Batch) {
        self.in_flight_rows.fetch_add(batch.rows.len(), Ordering::AcqRel);
        let shard = batch.shard;
        self.queues[shard].push_back(batch);
    }

    /// Hands queued batches to writers with room.
    fn push_queues(&mut self) {
        for (shard, queue) in self.queues.iter_mut().enumerate() {
            while let Some(batch) = queue.pop_front() {
                match self.writers[shard].try_send(batch) {
                    Ok(()) => {}
                    Err(
                        mpsc::error::TrySendError::Full(batch)
                        | mpsc::error::TrySendError::Closed(batch),
                    ) => {
                        queue.push_front(batch);
                        break;
                    }
                }
            }
        }
    }

    /// Sends every buffered row and waits until ClickHouse acknowledged all of it. Returns false
    /// when shutdown came first.
    async fn flush_and_wait(&mut self, shutdown: &CancellationToken) -> bool {
        for batch in self.applier.batcher.drain() {
            self.enqueue(batch);
        }
        loop {
            self.push_queues();
            if self.in_flight_rows.load(Ordering::Acquire) == 0 {
                return true;
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                ack = self.acks.recv() => match ack {
                    Some(ack) => self.on_ack(ack),
                    None => return false,
                },
            }
        }
    }

    fn store_offsets(&mut self, consumer: &StreamConsumer<SinkContext>) -> Result<(), Error> {
        let storable = match self.offsets.lock() {
            Ok(mut offsets) => offsets.storable(),
            Err(_) => return Ok(()),
        };
        if storable.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in storable {
            tpl.add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                .map_err(|source| Error::Kafka { context: "building offsets".into(), source })?;
        }
        // Offsets are "next to read" here, which store_offsets takes as given.
        if let Err(error) = consumer.store_offsets(&tpl) {
            tracing::debug!(%error, "storing offsets failed (partition revoked?)");
        }
        Ok(())
    }

    fn pause_or_resume(&mut self, consumer: &StreamConsumer<SinkContext>) -> Result<(), Error> {
        // Dead letters awaiting their acknowledgement hold a copy of their message too.
        let buffered = self.applier.batcher.rows()
            + self.in_flight_rows.load(Ordering::Acquire)
            + self.dlq_acks.len();
        let parked = self.applier.park.len();
        let full =
            buffered >= self.config.max_buffered_rows || parked >= self.config.max_parked_events;
        let relaxed = buffered <= self.config.max_buffered_rows / 2
            && parked <= self.config.max_parked_events / 2;
        let assignment = consumer
            .assignment()
            .map_err(|source| Error::Kafka { context: "reading the assignment".into(), source })?;
        // Partitions whose revoked generation's rows are all acknowledged now may be consumed.
        let (drained, draining): (Vec<i32>, HashSet<i32>) = match self.draining.lock() {
            Ok(mut draining) => {
                let offsets = self.offsets.lock().map_err(|_| Error::Kafka {
                    context: "offset bookkeeping poisoned".into(),
                    source: rdkafka::error::KafkaError::Canceled,
                })?;
                let drained =
                    draining.iter().copied().filter(|p| !offsets.has_retired(*p)).collect();
                draining.retain(|p| offsets.has_retired(*p));
                (drained, draining.clone())
            }
            Err(_) => (Vec::new(), HashSet::new()),
        };
        let pick = |keep: &dyn Fn(i32) -> bool| {
            let mut list = TopicPartitionList::new();
            for element in assignment.elements() {
                if keep(element.partition()) {
                    list.add_partition(&self.topic, element.partition());
                }
            }
            list
        };
        if full && !self.paused {
            tracing::warn!(buffered, parked, "buffers full: pausing consumption");
            consumer
                .pause(&assignment)
                .map_err(|source| Error::Kafka { context: "pausing".into(), source })?;
            self.paused = true;
        } else if self.paused && relaxed {
            tracing::info!(buffered, parked, "buffers drained: resuming consumption");
            consumer
                .resume(&pick(&|p| !draining.contains(&p)))
                .map_err(|source| Error::Kafka { context: "resuming".into(), source })?;
            self.paused = false;
        } else if !self.paused && !drained.is_empty() {
            tracing::info!(partitions = ?drained, "rows of the revoked assignment acknowledged: resuming");
            consumer
                .resume(&pick(&|p| drained.contains(&p)))
                .map_err(|source| Error::Kafka { context: "resuming".into(), source })?;
        }
        self.paused_flag.store(self.paused, Ordering::Release);
        Ok(())
    }

    fn publish_stats(&self) {
        let buffered = self.applier.batcher.rows() + self.in_flight_rows.load(Ordering::Acquire);
        self.stats.buffered_rows.store(buffered as u64, Ordering::Relaxed);
        self.stats.paused.store(u64::from(self.paused), Ordering::Relaxed);
        if let Ok(mut parked) = self.stats.parked.lock() {
            *parked = ParkedSnapshot {
                by_reason: self
                    .applier
                    .park
                    .by_reason()
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
                events: self.applier.park.summary(),
            };
        }
    }

    /// Shutdown: send what is buffered, wait (bounded) for it, store and commit offsets.
    async fn drain(
        &mut self,
        _shutdown: &CancellationToken,
        consumer: &StreamConsumer<SinkContext>,
    ) -> Result<(), Error> {
        let patience = CancellationToken::new();
        let timer = {
            let patience = patience.clone();
            tokio::spawn(async move {
                tokio::time::sleep(SHUTDOWN_DRAIN).await;
                patience.cancel();
            })
        };
        if !self.flush_and_wait(&patience).await {
            tracing::warn!(
                "shutdown: rows still unacknowledged after {SHUTDOWN_DRAIN:?}; they will be read again"
            );
        }
        timer.abort();
        while let Some(Some((msg, result))) = self.dlq_acks.next().now_or_never() {
            if result.is_ok() {
                self.release(msg);
            }
        }
        self.store_offsets(consumer)?;
        if let Err(error) = consumer.commit_consumer_state(rdkafka::consumer::CommitMode::Sync) {
            tracing::debug!(%error, "final commit");
        }
        self.publish_stats();
        Ok(())
    }
}

/// What an applying error waits for, for the park reason.
fn dependency(err: &Error) -> String {
    match (err.shard_index(), err) {
        (Some(shard), _) => format!("clickhouse shard {shard}"),
        (None, Error::Postgres { .. }) => "postgres".into(),
        (None, other) => Report::new(other).to_string(),
    }
}

fn owned(message: &rdkafka::message::BorrowedMessage<'_>, stamp: u64) -> Incoming {
    Incoming {
        id: (message.partition(), message.offset()),
        stamp,
        key: message.key().map(<[u8]>::to_vec),
        payload: message.payload().map(<[u8]>::to_vec).unwrap_or_default(),
    }
}
