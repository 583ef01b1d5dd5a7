//! One test's private slice of the stack, dropped when the test ends.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;

use scoresync::config::{Config, MetricsConfig};
use scoresync_bus::KafkaConfig;
use scoresync_sink::ClickHouseConfig;
use scoresync_source::PostgresConfig;
use scoresync_source::connect::ConnectParams;

use crate::broker::PrivateBroker;
use crate::stack::{SCORESYNC_PASSWORD, Stack, free_port, with_database};

/// The schema file that creates the cluster-wide role; `stack up` ran it once, and running it per
/// test would race (ALTER ROLE from parallel tests conflicts).
const CLUSTER_WIDE_SCHEMA_FILE: &str = "004_replication_role.sql";

/// Partitions of each test's change topic.
pub const TEST_PARTITIONS: i32 = 3;

/// A test's own database, slot, publication, topics, consumer group and ClickHouse databases.
pub struct TestEnv {
    /// Unique name; also the PostgreSQL database, slot and ClickHouse database name.
    pub name: String,
    /// The stack it lives on.
    pub stack: Stack,
    /// `[postgres]` settings for the daemon (least-privilege role, own database and slot).
    pub postgres: PostgresConfig,
    /// `[kafka]` settings (own topics and consumer group).
    pub kafka: KafkaConfig,
    /// `[clickhouse]` settings (own database on every shard).
    pub clickhouse: ClickHouseConfig,
    /// TOML laid over the generated config, key by key (e.g. `[source]` with one setting: the
    /// section's other keys keep their values).
    pub extra_toml: String,
    /// Address of the daemon's `/metrics` and `/status` endpoint (a free port).
    pub metrics_listen: String,
}

impl TestEnv {
    /// Creates the PostgreSQL database (director schema, publication, grants) and the ClickHouse
    /// database and tables on every shard (with `setup`'s own code). Topics are left to the test
    /// or to `setup`.
    pub async fn new(label: &str) -> anyhow::Result<TestEnv> {
        let stack = Stack::get().clone();
        sweep_dead_tests(&stack).await;
        let name = unique_name(label);
        let env = TestEnv {
            postgres: {
                let mut pg = PostgresConfig::new(with_database(&stack.pg_url, &name));
                pg.slot = name.clone();
                pg
            },
            kafka: {
                let mut kafka = KafkaConfig::new(stack.kafka_brokers.clone());
                kafka.change_topic = format!("{name}.changes");
                kafka.dlq_topic = format!("{name}.dlq");
                kafka.state_topic = format!("{name}.state");
                kafka.consumer_group = format!("{name}.sink");
                kafka.partitions = TEST_PARTITIONS;
                kafka.replication_factor = 1;
                // Crashed sinks (kill -9 scenarios) are noticed sooner than with the production
                // default (10 s).
                kafka.session_timeout_ms = 6_000;
                // tansu compacts every topic every 10 minutes and ignores
                // min.compaction.lag.ms: a compacted change topic would lose DELETEs behind their
                // tombstones while a test's sink is paused. The compaction tests ask for it.
                kafka.change_cleanup_policy = scoresync_bus::config::CleanupPolicy::Delete;
                kafka
            },
            clickhouse: {
                let mut ch = ClickHouseConfig::new(stack.clickhouse_shards.clone());
                ch.database = name.clone();
                ch
            },
            name,
            stack,
            extra_toml: String::new(),
            metrics_listen: format!("127.0.0.1:{}", free_port()?),
        };
        std::fs::create_dir_all(env.dir())?;
        env.create_postgres().await?;
        env.create_clickhouse().await?;
        Ok(env)
    }

    /// [`TestEnv::new`] on a broker of the test's own, returned beside it (keep it alive for the
    /// whole test). For scenarios about consumer groups with the short test session timeout: late
    /// in a run the stack's tansu (sqlite storage, one request at a time) holds every earlier
    /// test's messages and can answer a heartbeat more than a session late, and a member then
    /// loses its partitions for a reason the test is not about.
    pub async fn on_own_broker(label: &str) -> anyhow::Result<(TestEnv, PrivateBroker)> {
        let mut env = TestEnv::new(label).await?;
        let broker = PrivateBroker::start(env.dir().join("broker"))?;
        env.kafka.brokers = broker.address();
        Ok((env, broker))
    }

    /// Superuser URL of this test's database.
    pub fn pg_admin_url(&self) -> String {
        with_database(&self.stack.pg_admin_url, &self.name)
    }

    /// A superuser SQL session on this test's database.
    pub async fn pg_admin(&self) -> anyhow::Result<tokio_postgres::Client> {
        Ok(ConnectParams::parse(&self.pg_admin_url())?.connect_sql().await?)
    }

    /// A client for ClickHouse shard `index`, on this test's database.
    pub fn shard(&self, index: usize) -> clickhouse::Client {
        match scoresync_sink::shard::client(&self.clickhouse, index) {
            Some(client) => client,
            None => panic!("the stack has no ClickHouse shard {index}"),
        }
    }

    /// A scratch directory of this test (config, daemon logs), kept after the test.
    pub fn dir(&self) -> std::path::PathBuf {
        std::env::temp_dir().join("scoresync-tests").join(&self.name)
    }

    /// Writes the configuration ([`TestEnv::config_toml`]) to the scratch directory; returns its
    /// path. Call again after changing settings.
    pub fn config_path(&self) -> anyhow::Result<std::path::PathBuf> {
        let path = self.dir().join("scoresync.toml");
        let toml = self.config_toml()?;
        if std::fs::read_to_string(&path).ok().as_deref() == Some(toml.as_str()) {
            return Ok(path);
        }
        // Written aside and renamed: a daemon starting meanwhile reads the old file or the new
        // one, never half of one.
        let aside = self.dir().join(format!("scoresync.toml.{}", unique_name("tmp")));
        std::fs::write(&aside, toml)?;
        std::fs::rename(&aside, &path)?;
        Ok(path)
    }

    /// The scoresync configuration file for this test, as TOML: the daemon's own [`Config`]
    /// serialized (so a renamed field breaks the build of the harness), with
    /// [`TestEnv::extra_toml`] laid over it, and checked by the daemon's parser.
    pub fn config_toml(&self) -> anyhow::Result<String> {
        let config = Config {
            postgres: self.postgres.clone(),
            kafka: self.kafka.clone(),
            clickhouse: self.clickhouse.clone(),
            source: Default::default(),
            sink: Default::default(),
            metrics: MetricsConfig {
                listen: self.metrics_listen.clone(),
                ..MetricsConfig::default()
            },
        };
        let mut doc = toml::Table::try_from(&config).context("serializing the config")?;
        let extra: toml::Table = self.extra_toml.parse().context("extra_toml is not TOML")?;
        overlay(&mut doc, extra);
        let text = toml::to_string(&doc).context("writing the config as TOML")?;
        Config::parse(&text, []).context("the generated config")?;
        Ok(text)
    }

    async fn create_postgres(&self) -> anyhow::Result<()> {
        let admin = ConnectParams::parse(&with_database(&self.stack.pg_admin_url, "postgres"))?
            .connect_sql()
            .await
            .context("connecting to PostgreSQL as the stack superuser")?;
        admin.batch_execute(&format!("CREATE DATABASE \"{}\"", self.name)).await?;
        crate::postgres::apply_schema(&self.pg_admin_url(), SCORESYNC_PASSWORD, |file| {
            !file.ends_with(CLUSTER_WIDE_SCHEMA_FILE)
        })
    }

    /// Moves this test to other ClickHouse shards (e.g. [`crate::clickhouse::PrivateShards`]):
    /// creates the test database and schema there.
    pub async fn use_shards(&mut self, urls: Vec<String>) -> anyhow::Result<()> {
        self.clickhouse.shards = urls;
        self.create_clickhouse().await
    }

    /// Creates the test's database and tables on every shard the way `scoresync setup` does
    /// ([`scoresync_sink::schema::ensure`]: the DDL embedded from `schemas/clickhouse`).
    async fn create_clickhouse(&self) -> anyhow::Result<()> {
        scoresync_sink::schema::ensure(&self.clickhouse)
            .await
            .with_context(|| format!("creating the ClickHouse schema of {}", self.name))?;
        Ok(())
    }
}

/// What a test made, handed to a cleanup thread when the test's [`TestEnv`] is dropped.
struct Leftovers {
    name: String,
    stack: Stack,
    clickhouse: ClickHouseConfig,
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        let leftovers = Leftovers {
            name: self.name.clone(),
            stack: self.stack.clone(),
            clickhouse: self.clickhouse.clone(),
        };
        // Drop runs inside the test's runtime, which cannot block on async work: clean up on a
        // thread with a runtime of its own, and wait for it.
        let cleanup =
            std::thread::spawn(move || {
                match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt.block_on(leftovers.remove()),
                    Err(err) => eprintln!("harness: no runtime for cleanup: {err}"),
                }
            });
        if cleanup.join().is_err() {
            eprintln!("harness: cleanup of {} panicked", self.name);
        }
        // Kept (config, daemon logs) for a look after a failure; a test cannot tell here whether
        // it failed by returning an error. The directory is under the system temp dir.
        eprintln!("harness: test files in {}", self.dir().display());
    }
}

impl Leftovers {
    /// Drops everything the test made. Errors are printed, not raised: cleanup must not mask the
    /// test's own result.
    async fn remove(self) {
        if let Err(err) = self.drop_postgres().await {
            eprintln!("harness: cleaning up PostgreSQL database {}: {err:#}", self.name);
        }
        // Topics stay: their names are unique to the test, and tansu 0.6.0's DeleteTopics removes
        // every topic of the cluster (its topic_delete_by.sql matches on the cluster, not the
        // topic), which would pull the topics from under every other running test.
        // Only the stack's shards: private shards a test started (`use_shards`) are gone with
        // their directories by now.
        let stack_shards = scoresync_sink::ClickHouseConfig {
            shards: self.stack.clickhouse_shards.clone(),
            ..self.clickhouse.clone()
        };
        for server in scoresync_sink::shard::clients(&stack_shards) {
            let sql = format!("DROP DATABASE IF EXISTS {}", self.name);
            if let Err(err) = server.with_database("default").query(&sql).execute().await {
                eprintln!("harness: dropping ClickHouse database {}: {err:#}", self.name);
            }
        }
    }

    async fn drop_postgres(&self) -> anyhow::Result<()> {
        let admin = ConnectParams::parse(&with_database(&self.stack.pg_admin_url, "postgres"))?
            .connect_sql()
            .await?;
        // A slot pins its database; an active one must lose its walsender before it can go.
        let deadline = std::time::Duration::from_secs(10);
        crate::wait::until("the test's replication slots to be dropped", deadline, || async {
            admin
                .execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots \
                     WHERE database = $1 AND active_pid IS NOT NULL",
                    &[&self.name],
                )
                .await?;
            admin
                .execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                     WHERE database = $1 AND NOT active",
                    &[&self.name],
                )
                .await?;
            let left: i64 = admin
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE database = $1",
                    &[&self.name],
                )
                .await?
                .get(0);
            Ok((left == 0).then_some(()))
        })
        .await?;
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS \"{}\" WITH (FORCE)", self.name))
            .await?;
        Ok(())
    }
}

/// Drops what tests whose process is gone left behind (a run interrupted by Ctrl-C or a crash
/// never reaches `Drop`): their slots would otherwise pin WAL on the stack for good. Once per test
/// process; a name whose process id is alive, or does not parse, is left alone.
async fn sweep_dead_tests(stack: &Stack) {
    static SWEPT: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if SWEPT.swap(true, Ordering::AcqRel) {
        return;
    }
    let found = async {
        let admin = ConnectParams::parse(&with_database(&stack.pg_admin_url, "postgres"))?
            .connect_sql()
            .await?;
        let mut names: std::collections::BTreeSet<String> = admin
            .query("SELECT datname FROM pg_database WHERE datname LIKE 't\\_%'", &[])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let stack_shards = ClickHouseConfig::new(stack.clickhouse_shards.clone());
        for server in scoresync_sink::shard::clients(&stack_shards) {
            let databases: Vec<String> = server
                .with_database("system")
                .query("SELECT name FROM databases WHERE startsWith(name, 't_')")
                .fetch_all()
                .await?;
            names.extend(databases);
        }
        anyhow::Ok(names)
    };
    let names = match found.await {
        Ok(names) => names,
        Err(err) => return eprintln!("harness: looking for leftovers of dead tests: {err:#}"),
    };
    for name in names {
        let Some(pid) = name.rsplit('_').nth(2).and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if std::path::Path::new(&format!("/proc/{pid}")).exists() {
            continue;
        }
        eprintln!("harness: removing {name}, left by test process {pid} which is gone");
        let leftovers = Leftovers {
            clickhouse: ClickHouseConfig::new(stack.clickhouse_shards.clone()),
            name,
            stack: stack.clone(),
        };
        leftovers.remove().await;
    }
}

/// Sets every key of `top` in `base`; a table in both is overlaid key by key, recursively.
fn overlay(base: &mut toml::Table, top: toml::Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(below)), toml::Value::Table(above)) => overlay(below, above),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// A name unique to this test run: the label, the process id, a counter and the clock, lowercase
/// and within PostgreSQL's 63-character identifier limit.
fn unique_name(label: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let label: String = label
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '_' })
        .take(30)
        .collect();
    format!("t_{label}_{}_{n}_{:x}", std::process::id(), nanos & 0xfffff)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extra_toml_overlays_key_by_key() {
        let mut base: toml::Table =
            "[source]\nmax_in_flight_events = 5\nsnapshot_chunk_rows = 9\n[sink]\nmax_wait_ms = 1\n"
                .parse()
                .expect("toml");
        let extra: toml::Table = "[source]\nsnapshot_chunk_rows = 50\n".parse().expect("toml");
        overlay(&mut base, extra);
        let expected: toml::Table =
            "[source]\nmax_in_flight_events = 5\nsnapshot_chunk_rows = 50\n[sink]\nmax_wait_ms = 1\n"
                .parse()
                .expect("toml");
        assert_eq!(base, expected);
    }
}
