//! Connections to PostgreSQL, all built from the one configured URL.
//!
//! scoresync needs two kinds: plain SQL sessions (tokio-postgres) for slot checks, heartbeats and
//! snapshots, and a replication session (pgwire-replication) for the stream. [`ConnectParams`]
//! parses the URL once so both reach the same server as the same role.

use pgwire_replication::{Lsn as WireLsn, ReplicationConfig};
use tokio_postgres::config::Host;

use crate::text::SESSION_OPTIONS;

/// The parts of a PostgreSQL URL that both connection kinds need. Every session gets
/// [`SESSION_OPTIONS`] (ISO dates, UTC) on top of the URL's own `options`, so values render the
/// way [`crate::text`] parses them.
#[derive(Clone)]
pub struct ConnectParams {
    /// Host name or socket directory.
    pub host: String,
    /// Port.
    pub port: u16,
    /// Role.
    pub user: String,
    /// Password (empty when the URL has none).
    pub password: String,
    /// Database.
    pub database: String,
    /// The full configuration for tokio-postgres.
    pub sql: tokio_postgres::Config,
}

impl ConnectParams {
    /// Parses `postgres://user:password@host:port/database[?options]`.
    pub fn parse(url: &str) -> Result<ConnectParams, tokio_postgres::Error> {
        let mut sql: tokio_postgres::Config = url.parse()?;
        let options = match sql.get_options() {
            Some(own) => format!("{own} {SESSION_OPTIONS}"),
            None => SESSION_OPTIONS.to_owned(),
        };
        sql.options(&options);
        let host = match sql.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            #[cfg(unix)]
            Some(Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = sql.get_ports().first().copied().unwrap_or(5432);
        let user = sql.get_user().unwrap_or("postgres").to_owned();
        let password =
            sql.get_password().map(|p| String::from_utf8_lossy(p).into_owned()).unwrap_or_default();
        let database = sql.get_dbname().unwrap_or(&user).to_owned();
        Ok(ConnectParams { host, port, user, password, database, sql })
    }

    /// A replication-session configuration for `slot` and `publication`, starting at `start`.
    pub fn replication(&self, slot: &str, publication: &str, start: WireLsn) -> ReplicationConfig {
        ReplicationConfig::new(
            self.host.clone(),
            self.user.clone(),
            self.password.clone(),
            self.database.clone(),
            slot.to_owned(),
            publication.to_owned(),
        )
        .with_port(self.port)
        .with_start_lsn(start)
        .with_options(self.sql.get_options().unwrap_or(SESSION_OPTIONS))
        .with_application_name("scoresync")
    }

    /// Opens a plain SQL session; the connection task runs on the current runtime.
    pub async fn connect_sql(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self.sql.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "postgres connection ended");
            }
        });
        Ok(client)
    }
}
