//! The PostgreSQL fallbacks, read-only: a scorecard's current fields, and a column's current
//! value (an unchanged TOAST value no shard has). Values are statement parameters; the column
//! and table names come from the schema and are quoted by `postgres-protocol`.
//!
//! The connection is the sink's own ([`PgFallback`]): made on first use and made again after it
//! broke (a PostgreSQL restart); after a failure, lookups fail fast for [`PAUSE_AFTER_FAILURE`]. Every statement is bounded
//! on the server (`statement_timeout`, `lock_timeout`: an ACCESS EXCLUSIVE lock on a director
//! table makes the lookup fail, not wait) and on the client ([`PG_TIMEOUT`]), so a lookup never
//! stalls the sink loop: a failure parks the event, which is retried. Errors are classified by
//! SQLSTATE: a permission or schema error is permanent (the sink stops and says so), a broken
//! connection, a timeout or a lock not granted is transient.

use std::time::{Duration, Instant};

use postgres_protocol::escape::escape_identifier;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;

use scoresync_event::{ScorecardKey, SourceTable};

use super::Lookups;
use crate::error::Error;
use crate::route::CardFields;

/// Longest a lookup statement may run on the server.
const STATEMENT_TIMEOUT_MS: u64 = 5_000;
/// Longest a lookup waits for a table lock.
const LOCK_TIMEOUT_MS: u64 = 1_000;
/// Longest a connect or a statement may take, seen from the sink.
pub(crate) const PG_TIMEOUT: Duration = Duration::from_secs(10);
/// How long after a failed connect or statement lookups fail fast instead of trying (a lock held
/// or PostgreSQL away costs one timeout per pause, not one per event).
const PAUSE_AFTER_FAILURE: Duration = Duration::from_secs(2);
/// `application_name` of the lookup connection (to find it in `pg_stat_activity`).
const APPLICATION_NAME: &str = "scoresync-sink-lookups";

/// The lookup connection to PostgreSQL, reconnected when it broke.
pub(crate) struct PgFallback {
    url: SecretString,
    state: Mutex<Connection>,
}

#[derive(Default)]
struct Connection {
    client: Option<tokio_postgres::Client>,
    /// When the last connect or statement failed transiently.
    failed_at: Option<Instant>,
}

impl PgFallback {
    /// A fallback that connects to `url` when first needed.
    pub(crate) fn new(url: SecretString) -> Self {
        PgFallback { url, state: Mutex::new(Connection::default()) }
    }

    /// Runs `statement` with `params`, connecting first when needed; `None` when no row matched.
    async fn query_opt(
        &self,
        context: &str,
        statement: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Option<tokio_postgres::Row>, Error> {
        let mut state = self.state.lock().await;
        if state.failed_at.is_some_and(|at| at.elapsed() < PAUSE_AFTER_FAILURE) {
            return Err(Error::PostgresTimeout {
                context: format!(
                    "{context} (not attempted: postgres failed a request moments ago)"
                ),
            });
        }
        let client = self.connected(&mut state, context).await?;
        let query = client.query_opt(statement, params);
        let result = match tokio::time::timeout(PG_TIMEOUT, query).await {
            Ok(result) => {
                result.map_err(|source| Error::Postgres { context: context.into(), source })
            }
            Err(_) => {
                // No answer: the connection may be half open (host gone without a reset); the
                // next lookup connects anew.
                state.client = None;
                Err(Error::PostgresTimeout { context: context.into() })
            }
        };
        if let Err(err) = &result
            && err.is_transient()
        {
            state.failed_at = Some(Instant::now());
        }
        if result.is_err() && state.client.as_ref().is_some_and(tokio_postgres::Client::is_closed) {
            state.client = None;
        }
        result
    }

    /// The open connection, made anew when there is none or it broke.
    async fn connected<'a>(
        &self,
        state: &'a mut Connection,
        context: &str,
    ) -> Result<&'a tokio_postgres::Client, Error> {
        if state.client.as_ref().is_some_and(tokio_postgres::Client::is_closed) {
            tracing::warn!("postgres lookup connection closed; reconnecting");
            state.client = None;
        }
        if state.client.is_none() {
            match self.connect().await {
                Ok(client) => {
                    state.failed_at = None;
                    state.client = Some(client);
                }
                Err(err) => {
                    state.failed_at = Some(Instant::now());
                    return Err(err);
                }
            }
        }
        state.client.as_ref().ok_or_else(|| Error::PostgresTimeout { context: context.into() })
    }

    async fn connect(&self) -> Result<tokio_postgres::Client, Error> {
        let context = "connecting for lookups";
        let mut config: tokio_postgres::Config =
            self.url.expose_secret().parse().map_err(|source| Error::Postgres {
                context: format!("{context}: postgres.url"),
                source,
            })?;
        config.keepalives_idle(Duration::from_secs(30));
        config.application_name(APPLICATION_NAME).connect_timeout(PG_TIMEOUT).options(format!(
            "-c statement_timeout={STATEMENT_TIMEOUT_MS} -c lock_timeout={LOCK_TIMEOUT_MS} \
                 -c default_transaction_read_only=on"
        ));
        let connect = config.connect(tokio_postgres::NoTls);
        let (client, connection) = match tokio::time::timeout(PG_TIMEOUT, connect).await {
            Ok(result) => {
                result.map_err(|source| Error::Postgres { context: context.into(), source })?
            }
            Err(_) => return Err(Error::PostgresTimeout { context: context.into() }),
        };
        tokio::spawn(async move {
            if let Err(error) = connection.await {
                tracing::warn!(%error, "postgres lookup connection ended");
            }
        });
        Ok(client)
    }
}

/// SQLSTATE classes a retry can cure: connection exceptions (08), transaction rollbacks (40),
/// insufficient resources (53), operator intervention such as a restart or a statement timeout
/// (57), and a lock not granted within `lock_timeout` (55P03).
fn sqlstate_is_transient(code: &str) -> bool {
    code == "55P03" || matches!(code.get(..2), Some("08" | "40" | "53" | "57"))
}

/// True when retrying a failed PostgreSQL request later can succeed.
pub(crate) fn postgres_error_is_transient(err: &tokio_postgres::Error) -> bool {
    match err.code() {
        Some(state) => sqlstate_is_transient(state.code()),
        // No SQLSTATE: the connection broke or could not be made.
        None => {
            err.is_closed()
                || std::error::Error::source(err).is_some_and(|s| s.is::<std::io::Error>())
        }
    }
}

impl Lookups {
    /// A scorecard's current fields in PostgreSQL, if it exists there (and PostgreSQL is configured).
    pub(crate) async fn card_in_postgres(
        &self,
        key: &ScorecardKey,
    ) -> Result<Option<CardFields>, Error> {
        let Some(pg) = &self.pg else { return Ok(None) };
        let row = pg
            .query_opt(
                "looking up a scorecard",
                "SELECT scorecard_type::bigint, template_id, template_revision, agent_user_id, conversation_id, \
                 (extract(epoch FROM process_interaction_at) * 1000000)::bigint \
                 FROM director.scorecards WHERE customer_id = $1 AND profile_id = $2 AND scorecard_id = $3",
                &[&key.customer_id, &key.profile_id, &key.scorecard_id],
            )
            .await?;
        let Some(r) = row else { return Ok(None) };
        let read = || -> Result<CardFields, tokio_postgres::Error> {
            Ok(CardFields {
                scorecard_type: r.try_get(0)?,
                template_id: r.try_get(1)?,
                template_revision: r.try_get(2)?,
                agent_user_id: r.try_get(3)?,
                conversation_id: r.try_get(4)?,
                process_interaction_at: r.try_get(5)?,
            })
        };
        read()
            .map(Some)
            .map_err(|source| Error::Postgres { context: "reading a scorecard".into(), source })
    }

    /// A column's current text value in PostgreSQL (for an unchanged TOAST value no shard has).
    /// `Ok(None)`: no PostgreSQL configured, or the row is gone.
    pub(crate) async fn column_in_postgres(
        &self,
        table: SourceTable,
        key: &[String],
        column: &str,
    ) -> Result<Option<Option<String>>, Error> {
        let Some(pg) = &self.pg else { return Ok(None) };
        let conditions: Vec<String> = table
            .primary_key()
            .iter()
            .enumerate()
            .map(|(i, k)| format!("{}::text = ${}", escape_identifier(k), i + 1))
            .collect();
        let sql = format!(
            "SELECT {}::text FROM director.{} WHERE {}",
            escape_identifier(column),
            escape_identifier(table.name()),
            conditions.join(" AND ")
        );
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            key.iter().map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let context = format!("reading {table}.{column}");
        let row = pg.query_opt(&context, &sql, &params).await?;
        row.map(|r| r.try_get(0)).transpose().map_err(|source| Error::Postgres { context, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_a_retry_can_cure() {
        for transient in ["08006", "57P01", "57014", "55P03", "40001", "53300"] {
            assert!(sqlstate_is_transient(transient), "{transient}");
        }
        for permanent in ["42501", "42P01", "28P01", "3D000", "22P02"] {
            assert!(!sqlstate_is_transient(permanent), "{permanent}");
        }
    }
}
