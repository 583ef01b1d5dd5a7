//! The `[clickhouse]` section of the scoresync configuration.

use std::fmt;

use serde::Deserialize;

/// Default database holding the target tables on every shard.
pub const DEFAULT_DATABASE: &str = "director";
/// Default ClickHouse user.
pub const DEFAULT_USER: &str = "default";

/// ClickHouse shards and credentials.
#[derive(Clone, Deserialize)]
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
    #[serde(default)]
    pub password: String,
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
            password: String::new(),
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

impl fmt::Debug for ClickHouseConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClickHouseConfig")
            .field("shards", &self.shards)
            .field("database", &self.database)
            .field("user", &self.user)
            .field("password", &if self.password.is_empty() { "" } else { "<redacted>" })
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_names_the_shard() {
        let mut cfg = ClickHouseConfig::new(vec!["http://a:8123".into(), "b:8123".into()]);
        assert!(cfg.validate().expect_err("invalid").contains("clickhouse.shards[1]"));
        cfg.shards[1] = "http://a:8123".into();
        assert!(cfg.validate().expect_err("invalid").contains("repeats"));
        cfg.shards[1] = "http://b:8123".into();
        assert_eq!(cfg.validate(), Ok(()));
        cfg.password = "pw".into();
        assert!(!format!("{cfg:?}").contains("pw\""));
    }
}
