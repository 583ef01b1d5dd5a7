//! The sink role: connects to the shards, PostgreSQL and the consumer group, starts the shard
//! writers and runs the loop ([`crate::stage`]) until shutdown, then drains.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use scoresync_bus::KafkaConfig;
use scoresync_bus::client::OffsetReset;
use scoresync_bus::group::{GroupMember, InFlight};

use crate::apply::Applier;
use crate::batch::{Batcher, Limits};
use crate::config::{ClickHouseConfig, SinkConfig};
use crate::dlq::Outbox;
use crate::error::Error;
use crate::handoff::Handoff;
use crate::locate::Locator;
use crate::lookup::Lookups;
use crate::park::Park;
use crate::scope::Scope;
use crate::stage::Loop;
use crate::stats::SinkStats;
use crate::writer::WriterPool;

/// The sink role.
pub struct Sink {
    /// Kafka settings (change topic, dead-letter topic, group).
    pub kafka: KafkaConfig,
    /// Shards.
    pub clickhouse: ClickHouseConfig,
    /// Batching and bounds.
    pub sink: SinkConfig,
    /// PostgreSQL URL for last-resort lookups (`None`: park instead).
    pub postgres_url: Option<secrecy::SecretString>,
    /// What it counts.
    pub stats: Arc<SinkStats>,
    /// What it applies and writes (the daemon: everything; `scoresync replay`: less).
    pub scope: Scope,
}

impl Sink {
    /// Runs until `shutdown` (drains, stores offsets, returns `Ok`) or a permanent error.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), Error> {
        let schemas = Arc::new(crate::schema::load(&self.clickhouse).await?);
        let clients = crate::shard::clients(&self.clickhouse);
        let warn_idle_after = Duration::from_millis(self.kafka.session_timeout_ms * 3);
        let with_writers = InFlight::default();
        let group = GroupMember::join(
            &self.kafka,
            &self.kafka.consumer_group,
            &self.kafka.change_topic,
            OffsetReset::Earliest,
            warn_idle_after,
            with_writers.clone(),
        )?;
        let database = &self.clickhouse.database;
        let lookups = Lookups::new(clients.clone(), database.clone(), self.postgres_url.clone());
        let locate = Locator::new(
            clients.len(),
            lookups,
            self.sink.cache_entries,
            Duration::from_millis(self.sink.conversation_cache_ttl_ms),
            Arc::clone(&self.stats),
        );
        let limits = Limits {
            max_rows: self.sink.max_batch_rows,
            max_bytes: self.sink.max_batch_bytes,
            max_wait: Duration::from_millis(self.sink.max_wait_ms),
        };
        let mut applier =
            Applier::new(clients.len(), Arc::clone(&schemas), locate, Batcher::new(limits));
        applier.only_shard = self.scope.shard;
        let mut sink_loop = Loop {
            group,
            applier,
            park: Park::default(),
            pool: WriterPool::start(
                &clients,
                database,
                &schemas,
                &self.stats,
                with_writers,
                &self.scope,
            ),
            outbox: Outbox::new(&self.kafka)?,
            handoff: Handoff::default(),
            stats: Arc::clone(&self.stats),
            config: self.sink.clone(),
            scope: self.scope.clone(),
            flush_timed_out_at: None,
            revoke_epoch: 0,
            revoked_at: Default::default(),
        };
        let result = sink_loop.run(&shutdown).await;
        sink_loop.drain().await;
        let Loop { group, pool, .. } = sink_loop;
        pool.stop().await;
        group.close().await;
        result
    }
}
