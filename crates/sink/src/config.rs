//! The `[clickhouse]` section of the scoresync configuration.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

/// Default database holding the target tables on every shard.
pub const DEFAULT_DATABASE: &str = "director";
/// Default ClickHouse user.
pub const DEFAULT_USER: &str = "default";

/// ClickHouse shards and credentials.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP URL of each shard; shard index = position in this list. Changing the order or the
    /// count re-routes process scorecards (`process_interaction_at % shard count`).
    pub shards: Vec<String>,
    /// Database holding `conversations` and the three target tables on every shard.
    #[serde(default = "default_database")]
    pub database: String,
    /// User for every shard.
    #[serde(default = "default_user")]
    pub user: String,
    /// Password for every shard; never printed.
    #[serde(default, serialize_with = "expose_password_for_config_file")]
    pub password: SecretString,
}

/// Serializes the password itself: `Serialize` exists only to write a configuration file (the
/// test harness writes the daemon's), and that file needs the real password. Anything else that
/// prints a config goes through `Debug`, which redacts.
fn expose_password_for_config_file<S: Serializer>(
    password: &SecretString,
    to: S,
) -> Result<S::Ok, S::Error> {
    to.serialize_str(password.expose_secret())
}

fn default_database() -> String {
    DEFAULT_DATABASE.into()
}
fn default_user() -> String {
    DEFAULT_USER.into()
}

impl ClickHouseConfig {
    /// Settings for `shards` with every other field at its default.
    pub fn new(shards: Vec<String>) -> Self {
        ClickHouseConfig {
            shards,
            database: default_database(),
            user: default_user(),
            password: SecretString::default(),
        }
    }

    /// Checks every field; the message names the field and the constraint it breaks.
    pub fn validate(&self) -> Result<(), String> {
        if self.shards.is_empty() {
            return Err("clickhouse.shards must list at least one shard URL".into());
        }
        for (i, url) in self.shards.iter().enumerate() {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("clickhouse.shards[{i}] must be an http(s) URL (got {url:?})"));
            }
            if self.shards[..i].contains(url) {
                return Err(format!(
                    "clickhouse.shards[{i}] repeats {url:?}; each shard is listed once"
                ));
            }
        }
        let legal = |c: char| c.is_ascii_alphanumeric() || c == '_';
        if self.database.is_empty() || !self.database.chars().all(legal) {
            return Err(format!(
                "clickhouse.database must be non-empty [a-zA-Z0-9_] (got {:?})",
                self.database
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use secrecy::ExposeSecret;

    use super::*;

    #[test]
    fn validate_names_the_shard() {
        let mut cfg = ClickHouseConfig::new(vec!["http://a:8123".into(), "b:8123".into()]);
        assert!(cfg.validate().expect_err("invalid").contains("clickhouse.shards[1]"));
        cfg.shards[1] = "http://a:8123".into();
        assert!(cfg.validate().expect_err("invalid").contains("repeats"));
        cfg.shards[1] = "http://b:8123".into();
        assert_eq!(cfg.validate(), Ok(()));
        cfg.password = "s3cret".into();
        assert!(!format!("{cfg:?}").contains("s3cret"));
        let read: ClickHouseConfig =
            serde_json::from_str(r#"{"shards": ["http://a:8123"], "password": "s3cret"}"#)
                .expect("valid");
        assert_eq!(read.password.expose_secret(), "s3cret");
        assert!(!format!("{read:?}").contains("s3cret"));
        let read: ClickHouseConfig =
            serde_json::from_str(r#"{"shards": ["http://a:8123"]}"#).expect("valid");
        assert_eq!(read.password.expose_secret(), "", "no password by default");
    }
}

/// Default rows per insert batch (per shard and table).
pub const DEFAULT_MAX_BATCH_ROWS: usize = 10_000;
/// Default bytes per insert batch.
pub const DEFAULT_MAX_BATCH_BYTES: usize = 8 * 1024 * 1024;
/// Default longest a row waits in a batch before the batch is flushed.
pub const DEFAULT_MAX_WAIT_MS: u64 = 500;
/// Default bound on rows buffered or in flight across all shards before consumption pauses.
pub const DEFAULT_MAX_BUFFERED_ROWS: usize = 200_000;
/// Default bound on the estimated bytes of rows buffered or in flight before consumption pauses.
pub const DEFAULT_MAX_BUFFERED_BYTES: usize = 128 * 1024 * 1024;
/// Default bound on parked events before consumption pauses.
pub const DEFAULT_MAX_PARKED_EVENTS: usize = 100_000;
/// Default bound on the encoded bytes of parked events before consumption pauses.
pub const DEFAULT_MAX_PARKED_BYTES: usize = 64 * 1024 * 1024;
/// Default interval between retries of parked events.
pub const DEFAULT_PARK_RETRY_MS: u64 = 2_000;
/// Default bound on cached scorecards and conversations.
pub const DEFAULT_CACHE_ENTRIES: usize = 200_000;
/// Default time a conversation's shard is trusted before it is looked up again (10 minutes).
pub const DEFAULT_CONVERSATION_CACHE_TTL_MS: u64 = 600_000;
/// Default longest a score or historic score waits for a scorecard known nowhere (no shard, not
/// in PostgreSQL) before it is dead-lettered.
pub const DEFAULT_UNKNOWN_SCORECARD_TIMEOUT_MS: u64 = 3_600_000;

/// The `[sink]` section: batching, memory bounds, parking.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SinkConfig {
    /// Rows per insert (per shard and table).
    pub max_batch_rows: usize,
    /// Bytes per insert.
    pub max_batch_bytes: usize,
    /// Longest a row waits before its batch is flushed.
    pub max_wait_ms: u64,
    /// Rows buffered or in flight, plus dead letters awaiting acknowledgement, before consumption
    /// pauses (memory bound while a shard or the broker is slow).
    pub max_buffered_rows: usize,
    /// Estimated bytes of the rows buffered or in flight before consumption pauses (rows of 100 KB
    /// comments reach a row bound only at gigabytes).
    pub max_buffered_bytes: usize,
    /// Parked events before consumption pauses.
    pub max_parked_events: usize,
    /// Encoded bytes of the parked events before consumption pauses.
    pub max_parked_bytes: usize,
    /// How often parked events are retried.
    pub park_retry_ms: u64,
    /// Scorecards and conversations kept in the routing caches.
    pub cache_entries: usize,
    /// How long the shard found for a conversation is trusted before it is looked up again (the
    /// other pipeline may add, correct or duplicate conversations). Where a scorecard already
    /// is never expires: a card moves only when one of its own changes routes elsewhere.
    pub conversation_cache_ttl_ms: u64,
    /// Longest a score or historic score waits, parked, for a scorecard that no shard holds and
    /// PostgreSQL lacks, before it goes to the dead-letter topic (`scoresync dlq redrive` puts it
    /// back once the scorecard exists).
    pub unknown_scorecard_timeout_ms: u64,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            max_batch_rows: DEFAULT_MAX_BATCH_ROWS,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            max_wait_ms: DEFAULT_MAX_WAIT_MS,
            max_buffered_rows: DEFAULT_MAX_BUFFERED_ROWS,
            max_buffered_bytes: DEFAULT_MAX_BUFFERED_BYTES,
            max_parked_events: DEFAULT_MAX_PARKED_EVENTS,
            max_parked_bytes: DEFAULT_MAX_PARKED_BYTES,
            park_retry_ms: DEFAULT_PARK_RETRY_MS,
            cache_entries: DEFAULT_CACHE_ENTRIES,
            conversation_cache_ttl_ms: DEFAULT_CONVERSATION_CACHE_TTL_MS,
            unknown_scorecard_timeout_ms: DEFAULT_UNKNOWN_SCORECARD_TIMEOUT_MS,
        }
    }
}

impl SinkConfig {
    /// Checks every field; the message names the field and the constraint it breaks.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("sink.max_batch_rows", self.max_batch_rows),
            ("sink.max_batch_bytes", self.max_batch_bytes),
            ("sink.max_buffered_rows", self.max_buffered_rows),
            ("sink.max_parked_events", self.max_parked_events),
            ("sink.max_buffered_bytes", self.max_buffered_bytes),
            ("sink.max_parked_bytes", self.max_parked_bytes),
            ("sink.cache_entries", self.cache_entries),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(format!("{field} must be at least 1"));
            }
        }
        if self.max_buffered_rows < self.max_batch_rows {
            return Err(format!(
                "sink.max_buffered_rows ({}) must be at least sink.max_batch_rows ({})",
                self.max_buffered_rows, self.max_batch_rows
            ));
        }
        if self.max_wait_ms == 0 || self.park_retry_ms == 0 {
            return Err("sink.max_wait_ms and sink.park_retry_ms must be at least 1".into());
        }
        if self.conversation_cache_ttl_ms == 0 {
            return Err("sink.conversation_cache_ttl_ms must be at least 1".into());
        }
        Ok(())
    }
}
