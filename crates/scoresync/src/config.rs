//! The scoresync configuration: one TOML file (`--config FILE` or `SCORESYNC_CONFIG`) with
//! environment overrides, validated before anything connects.
//!
//! Each section belongs to the crate that uses it: `[postgres]` to the source, `[kafka]` to the
//! bus, `[clickhouse]` to the sink. An environment variable `SCORESYNC__SECTION__KEY=value`
//! overrides `key` in `[section]`; the value is read as a TOML value when it parses as one (a
//! number, a boolean, an array) and as a string otherwise. Secrets (the password in
//! `postgres.url`, `clickhouse.password`, secret-looking `kafka.librdkafka` keys) never print.
//!
//! [`Config`] also serializes, to TOML that [`Config::parse`] reads back: the test harness writes
//! the daemon's file that way. Serializing writes the secrets themselves (each section's
//! `serialize_with` helper says so); printing still goes through `Debug`, which redacts. The two
//! hand-written files, the local stack's (`deploy/local/stack`) and docker-compose's
//! (`deploy/docker/scoresync.toml`), are parsed by this module's tests.

use std::path::Path;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

use scoresync_bus::KafkaConfig;
use scoresync_sink::{ClickHouseConfig, SinkConfig};
use scoresync_source::PostgresConfig;

/// Prefix of environment overrides.
pub const ENV_PREFIX: &str = "SCORESYNC__";

/// The whole configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// PostgreSQL source.
    pub postgres: PostgresConfig,
    /// Kafka bus.
    pub kafka: KafkaConfig,
    /// ClickHouse shards.
    pub clickhouse: ClickHouseConfig,
    /// Limits of the source role.
    #[serde(default)]
    pub source: SourceLimits,
    /// Batching and bounds of the sink role.
    #[serde(default)]
    pub sink: SinkConfig,
    /// The HTTP endpoint for `/metrics` and `/status`.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// Default address of the metrics and status endpoint.
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

/// Default of `metrics.sample_interval_ms`.
pub const DEFAULT_SAMPLE_INTERVAL_MS: u64 = 10_000;
/// Default of `metrics.stall_seconds`.
pub const DEFAULT_STALL_SECONDS: u64 = 120;

/// The `[metrics]` section.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// `host:port` serving `/metrics` (Prometheus), `/status` (JSON) and `/healthz`; empty turns
    /// it off.
    pub listen: String,
    /// How often the out-of-band samplers look (slot, consumer group, state topic).
    pub sample_interval_ms: u64,
    /// `/healthz` fails when a role has had work waiting and made no progress for this long.
    pub stall_seconds: u64,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: DEFAULT_METRICS_LISTEN.into(),
            sample_interval_ms: DEFAULT_SAMPLE_INTERVAL_MS,
            stall_seconds: DEFAULT_STALL_SECONDS,
        }
    }
}

impl MetricsConfig {
    fn validate(&self) -> Result<(), String> {
        if !self.listen.is_empty() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(format!(
                "metrics.listen must be host:port with an IP host (got {:?})",
                self.listen
            ));
        }
        if self.sample_interval_ms == 0 {
            return Err("metrics.sample_interval_ms must be above 0".into());
        }
        if self.stall_seconds == 0 {
            return Err("metrics.stall_seconds must be above 0".into());
        }
        Ok(())
    }
}

/// The `[source]` section: limits of the source role.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceLimits {
    /// Most events awaiting Kafka acknowledgement before the source pauses reading.
    pub max_in_flight_events: usize,
    /// Rows per initial-snapshot chunk (each chunk is acknowledged and recorded before the next).
    pub snapshot_chunk_rows: usize,
}

impl Default for SourceLimits {
    fn default() -> Self {
        SourceLimits {
            max_in_flight_events: scoresync_source::DEFAULT_MAX_IN_FLIGHT,
            snapshot_chunk_rows: scoresync_source::snapshot::DEFAULT_CHUNK_ROWS,
        }
    }
}

impl SourceLimits {
    fn validate(&self) -> Result<(), String> {
        if self.max_in_flight_events == 0 || self.max_in_flight_events > 500_000 {
            return Err(format!(
                "source.max_in_flight_events must be between 1 and 500000 (got {})",
                self.max_in_flight_events
            ));
        }
        if self.snapshot_chunk_rows == 0 {
            return Err("source.snapshot_chunk_rows must be at least 1".into());
        }
        Ok(())
    }
}

impl Config {
    /// Reads `path`, applies environment overrides from `env`, parses and validates.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading config file {}", path.display()))?;
        Self::parse(&text, env).with_context(|| format!("in config file {}", path.display()))
    }

    /// Parses TOML text with environment overrides and validates the result.
    pub fn parse(
        text: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> anyhow::Result<Config> {
        let mut doc: toml::Table = text.parse().context("config is not valid TOML")?;
        apply_env_overrides(&mut doc, env)?;
        let config: Config =
            doc.try_into().context("config does not match the expected sections")?;
        config.validate()?;
        Ok(config)
    }

    /// Checks every section.
    pub fn validate(&self) -> anyhow::Result<()> {
        for result in [
            self.postgres.validate(),
            self.kafka.validate(),
            self.clickhouse.validate(),
            self.source.validate(),
            self.sink.validate(),
            self.metrics.validate(),
        ] {
            if let Err(problem) = result {
                bail!("invalid config: {problem}");
            }
        }
        // A few of the largest events must fit under the sink's byte bounds, or the hold-back
        // they trigger could never be released (it waits for the levels to halve).
        let event = self.kafka.max_message_bytes;
        for (field, value, times) in [
            ("sink.max_parked_bytes", self.sink.max_parked_bytes, 4),
            ("sink.max_buffered_bytes", self.sink.max_buffered_bytes, 4),
        ] {
            if value < times * event {
                bail!(
                    "invalid config: {field} ({value}) must be at least {times} x \
                     kafka.max_message_bytes ({event})"
                );
            }
        }
        Ok(())
    }
}

/// Applies `SCORESYNC__SECTION__KEY=value` variables to the TOML document.
fn apply_env_overrides(
    doc: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<()> {
    for (name, raw) in env {
        let Some(path) = name.strip_prefix(ENV_PREFIX) else { continue };
        let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        let [section, key] = parts.as_slice() else {
            bail!("environment override {name} must look like {ENV_PREFIX}SECTION__KEY");
        };
        let value = parse_env_value(&raw);
        let table = doc
            .entry(section.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()))
            .as_table_mut()
            .with_context(|| format!("environment override {name}: [{section}] is not a table"))?;
        table.insert(key.clone(), value);
    }
    Ok(())
}

fn parse_env_value(raw: &str) -> toml::Value {
    let probe = format!("v = {raw}");
    match probe.parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(raw.to_owned())),
        Err(_) => toml::Value::String(raw.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [postgres]
        url = "postgres://scoresync:s3cret@127.0.0.1:5432/director"
        [kafka]
        brokers = "127.0.0.1:9092"
        [clickhouse]
        shards = ["http://127.0.0.1:8123"]
        password = "chpass"
    "#;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn defaults_fill_the_rest_and_secrets_never_print() {
        let cfg = Config::parse(MINIMAL, env(&[])).expect("valid");
        assert_eq!(cfg.kafka.change_topic, "scoresync.changes");
        assert_eq!(cfg.postgres.slot, "scoresync");
        let printed = format!("{cfg:?}");
        assert!(!printed.contains("s3cret") && !printed.contains("chpass"), "{printed}");
    }

    #[test]
    fn env_overrides_typed_values() {
        let cfg = Config::parse(
            MINIMAL,
            env(&[
                ("SCORESYNC__KAFKA__PARTITIONS", "6"),
                ("SCORESYNC__KAFKA__BROKERS", "10.0.0.1:9092"),
                ("SCORESYNC__CLICKHOUSE__SHARDS", r#"["http://a:1", "http://b:2"]"#),
                ("UNRELATED", "x"),
            ]),
        )
        .expect("valid");
        assert_eq!(cfg.kafka.partitions, 6);
        assert_eq!(cfg.kafka.brokers, "10.0.0.1:9092");
        assert_eq!(cfg.clickhouse.shards.len(), 2);
    }

    #[test]
    fn byte_bounds_must_hold_a_few_of_the_largest_events() {
        let big = ("SCORESYNC__KAFKA__MAX_MESSAGE_BYTES", "33554432");
        let err = Config::parse(MINIMAL, env(&[big])).expect_err("64 MiB < 4 x 32 MiB");
        assert!(err.to_string().contains("sink.max_parked_bytes"), "{err}");
        let raised = [
            big,
            ("SCORESYNC__SINK__MAX_PARKED_BYTES", "134217728"),
            ("SCORESYNC__SINK__MAX_BUFFERED_BYTES", "134217728"),
        ];
        Config::parse(MINIMAL, env(&raised)).expect("raised with it");
    }

    #[test]
    fn serializes_to_what_it_parses_secrets_included() {
        let text = format!(
            "{MINIMAL}\n[kafka.librdkafka]\n\"sasl.password\" = \"hunter2\"\n\
             \"security.protocol\" = \"SASL_SSL\"\n[sink]\nmax_wait_ms = 7\n"
        );
        let cfg = Config::parse(&text, env(&[])).expect("valid");
        let written = toml::to_string(&cfg).expect("serializes");
        for secret in ["s3cret", "chpass", "hunter2"] {
            assert!(written.contains(secret), "a config file needs {secret}: {written}");
        }
        let read = Config::parse(&written, env(&[])).expect("reads back");
        assert_eq!(toml::to_string(&read).expect("serializes"), written);
        assert_eq!(read.sink.max_wait_ms, 7);
    }

    /// The `write_config` heredoc of `deploy/local/stack`, with its shell expansions replaced by
    /// what the stack puts there at its default ports.
    fn local_stack_config() -> String {
        const SCRIPT: &str = include_str!("../../../deploy/local/stack");
        const EXPANSIONS: [(&str, &str); 3] = [
            (
                r#"$(pg_url scoresync "$SCORESYNC_PASSWORD")"#,
                "postgres://scoresync:scoresync@127.0.0.1:15432/director",
            ),
            ("$KAFKA_PORT", "19092"),
            (
                r#"$(shard_urls | sed 's/\([^,]*\)/"\1"/g; s/,/, /g')"#,
                r#""http://127.0.0.1:18123", "http://127.0.0.1:18124""#,
            ),
        ];
        let (_, function) = SCRIPT.split_once("\nwrite_config() {\n").expect("write_config()");
        let (_, heredoc) = function.split_once("<<EOF\n").expect("a heredoc in write_config");
        let (template, _) = heredoc.split_once("\nEOF\n").expect("the heredoc ends");
        let mut text = template.to_owned();
        for (expansion, value) in EXPANSIONS {
            text = text.replace(expansion, value);
        }
        assert!(
            !text.contains('$'),
            "the heredoc has an expansion this test does not know; add it to EXPANSIONS:\n{text}"
        );
        text
    }

    #[test]
    fn the_local_stack_config_parses() {
        let cfg = Config::parse(&local_stack_config(), env(&[])).expect("deploy/local/stack");
        assert_eq!(cfg.clickhouse.shards, ["http://127.0.0.1:18123", "http://127.0.0.1:18124"]);
        assert_eq!(cfg.kafka.brokers, "127.0.0.1:19092");
    }

    #[test]
    fn the_docker_config_parses() {
        let text = include_str!("../../../deploy/docker/scoresync.toml");
        let cfg = Config::parse(text, env(&[])).expect("deploy/docker/scoresync.toml");
        assert_eq!(cfg.clickhouse.shards.len(), 2);
    }

    #[test]
    fn conversation_answers_expire_after_ten_minutes_unless_configured() {
        let cfg = Config::parse(MINIMAL, env(&[])).expect("valid");
        assert_eq!(cfg.sink.conversation_cache_ttl_ms, 600_000);
        let over = env(&[("SCORESYNC__SINK__CONVERSATION_CACHE_TTL_MS", "1500")]);
        let cfg = Config::parse(MINIMAL, over).expect("valid");
        assert_eq!(cfg.sink.conversation_cache_ttl_ms, 1_500);
        let text = format!("{MINIMAL}\n[sink]\nconversation_cache_ttl_ms = 0\n");
        let err = Config::parse(&text, env(&[])).expect_err("zero");
        assert!(format!("{err:#}").contains("sink.conversation_cache_ttl_ms"), "{err:#}");
    }

    #[test]
    fn unknown_keys_and_invalid_values_are_named() {
        let err = Config::parse(&format!("{MINIMAL}\n[metric]\nlisten = 1"), env(&[]))
            .expect_err("unknown section");
        assert!(format!("{err:#}").contains("metric"), "{err:#}");
        let err = Config::parse(&format!("{MINIMAL}\n[metrics]\nlisten = \"nowhere\""), env(&[]))
            .expect_err("bad address");
        assert!(format!("{err:#}").contains("metrics.listen"), "{err:#}");
        let err = Config::parse(MINIMAL, env(&[("SCORESYNC__KAFKA__PARTITIONS", "0")]))
            .expect_err("invalid");
        assert!(format!("{err:#}").contains("kafka.partitions"), "{err:#}");
        let err = Config::parse(MINIMAL, env(&[("SCORESYNC__KAFKA", "x")])).expect_err("bad name");
        assert!(format!("{err:#}").contains("SCORESYNC__KAFKA"), "{err:#}");
    }
}
