//! The `[postgres]` section of the scoresync configuration.

use std::fmt;

use serde::Deserialize;

/// Default replication slot name.
pub const DEFAULT_SLOT: &str = "scoresync";
/// Default publication name.
pub const DEFAULT_PUBLICATION: &str = "scoresync";
/// Default interval between heartbeat messages (`pg_logical_emit_message`) that keep an idle
/// slot's confirmed position moving, so an idle publication retains no WAL.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 10_000;
/// Default interval between standby status updates to PostgreSQL.
pub const DEFAULT_STATUS_INTERVAL_MS: u64 = 1_000;

/// PostgreSQL connection and replication settings.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, `postgres://user:password@host:port/database`. The password is never
    /// printed.
    pub url: String,
    /// Logical replication slot (pgoutput) the source streams from.
    #[serde(default = "default_slot")]
    pub slot: String,
    /// Publication holding the three director tables.
    #[serde(default = "default_publication")]
    pub publication: String,
    /// Heartbeat interval in milliseconds; 0 turns heartbeats off.
    #[serde(default = "default_heartbeat_interval_ms")]
    pub heartbeat_interval_ms: u64,
    /// Standby status update interval in milliseconds (must stay well below the server's
    /// `wal_sender_timeout`).
    #[serde(default = "default_status_interval_ms")]
    pub status_interval_ms: u64,
}

fn default_slot() -> String {
    DEFAULT_SLOT.into()
}
fn default_publication() -> String {
    DEFAULT_PUBLICATION.into()
}
fn default_heartbeat_interval_ms() -> u64 {
    DEFAULT_HEARTBEAT_INTERVAL_MS
}
fn default_status_interval_ms() -> u64 {
    DEFAULT_STATUS_INTERVAL_MS
}

impl PostgresConfig {
    /// Settings for `url` with every other field at its default.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresConfig {
            url: url.into(),
            slot: default_slot(),
            publication: default_publication(),
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            status_interval_ms: DEFAULT_STATUS_INTERVAL_MS,
        }
    }

    /// Checks every field; the message names the field and the constraint it breaks.
    pub fn validate(&self) -> Result<(), String> {
        crate::connect::ConnectParams::parse(&self.url)
            .map_err(|e| format!("postgres.url is not a usable PostgreSQL URL: {e}"))?;
        for (field, name) in
            [("postgres.slot", &self.slot), ("postgres.publication", &self.publication)]
        {
            let legal = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_';
            if name.is_empty() || name.len() > 63 || !name.chars().all(legal) {
                return Err(format!("{field} must be 1-63 characters of [a-z0-9_] (got {name:?})"));
            }
        }
        if self.status_interval_ms == 0 || self.status_interval_ms > 30_000 {
            return Err(format!(
                "postgres.status_interval_ms must be between 1 and 30000 (got {})",
                self.status_interval_ms
            ));
        }
        Ok(())
    }

    /// The URL with its password replaced, for logs and `validate` output.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// Replaces the password of a `scheme://user:password@host/...` URL with `<redacted>`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some(at) = rest.rfind('@') else { return url.to_owned() };
    let (userinfo, host) = rest.split_at(at);
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>{host}"),
        None => url.to_owned(),
    }
}

impl fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.redacted_url())
            .field("slot", &self.slot)
            .field("publication", &self.publication)
            .field("heartbeat_interval_ms", &self.heartbeat_interval_ms)
            .field("status_interval_ms", &self.status_interval_ms)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_password_only() {
        assert_eq!(
            redact_url("postgres://scoresync:s3cret@db:5432/director"),
            "postgres://scoresync:<redacted>@db:5432/director"
        );
        assert_eq!(redact_url("postgres://db/director"), "postgres://db/director");
        let cfg = PostgresConfig::new("postgres://u:pw@h/d");
        assert!(!format!("{cfg:?}").contains("pw@"));
    }

    #[test]
    fn validate_names_the_field() {
        let mut cfg = PostgresConfig::new("postgres://u:pw@127.0.0.1:5432/d");
        assert_eq!(cfg.validate(), Ok(()));
        cfg.slot = "Bad-Slot".into();
        assert!(cfg.validate().expect_err("invalid").contains("postgres.slot"));
        let cfg = PostgresConfig::new("not a url");
        assert!(cfg.validate().expect_err("invalid").contains("postgres.url"));
    }
}
