//! The `[postgres]` section of the scoresync configuration.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize, Serializer};

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
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, `postgres://user:password@host:port/database`. The password is never
    /// printed.
    #[serde(serialize_with = "expose_url_for_config_file")]
    pub url: PostgresUrl,
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

/// Serializes the URL with its password: `Serialize` exists only to write a configuration file
/// (the test harness writes the daemon's), and that file needs the real URL. Anything else that
/// prints a config goes through `Debug`, which redacts.
fn expose_url_for_config_file<S: Serializer>(url: &PostgresUrl, to: S) -> Result<S::Ok, S::Error> {
    to.serialize_str(url.expose_secret())
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
            url: PostgresUrl::new(url),
            slot: default_slot(),
            publication: default_publication(),
            heartbeat_interval_ms: DEFAULT_HEARTBEAT_INTERVAL_MS,
            status_interval_ms: DEFAULT_STATUS_INTERVAL_MS,
        }
    }

    /// Checks every field; the message names the field and the constraint it breaks.
    pub fn validate(&self) -> Result<(), String> {
        crate::connect::ConnectParams::parse(self.url.expose_secret())
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
}

/// A PostgreSQL connection URL, kept as a secret because it carries the password: `Debug` prints
/// nothing of it (`secrecy`), [`PostgresUrl::redacted`] shows it without the password (for
/// `validate`), and only [`ExposeSecret::expose_secret`] gives the URL itself, to connect with.
#[derive(Clone, Debug, Deserialize)]
#[serde(transparent)]
pub struct PostgresUrl(SecretString);

impl PostgresUrl {
    /// Wraps `url`.
    pub fn new(url: impl Into<String>) -> Self {
        PostgresUrl(SecretString::from(url.into()))
    }

    /// The URL with its password replaced by `<redacted>`, for logs and `validate` output.
    pub fn redacted(&self) -> String {
        redact_url(self.0.expose_secret())
    }
}

impl ExposeSecret<str> for PostgresUrl {
    fn expose_secret(&self) -> &str {
        self.0.expose_secret()
    }
}

/// Replaces the password of a `scheme://user:password@host/...` URL with `<redacted>`. A
/// password given any other way (`password=` as a query parameter or in the `key=value` form)
/// hides the whole URL.
fn redact_url(url: &str) -> String {
    if url.to_ascii_lowercase().contains("password") {
        return "<redacted>".into();
    }
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_owned() };
    let Some(at) = rest.rfind('@') else { return url.to_owned() };
    let (userinfo, host) = rest.split_at(at);
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:<redacted>{host}"),
        None => url.to_owned(),
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
        assert_eq!(redact_url("postgres://u@db/d?password=s3cret"), "<redacted>");
        assert_eq!(redact_url("host=db user=u password=s3cret"), "<redacted>");
        let cfg = PostgresConfig::new("postgres://u:s3cret@h/d");
        let printed = format!("{cfg:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert_eq!(cfg.url.redacted(), "postgres://u:<redacted>@h/d");
        assert_eq!(cfg.url.expose_secret(), "postgres://u:s3cret@h/d");
        let read: PostgresConfig =
            serde_json::from_str(r#"{"url": "postgres://u:s3cret@h/d"}"#).expect("valid");
        assert_eq!(read.url.expose_secret(), "postgres://u:s3cret@h/d");
        assert!(!format!("{read:?}").contains("s3cret"));
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
