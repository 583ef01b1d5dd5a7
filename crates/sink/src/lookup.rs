//! Lookups the sink makes when its caches and buffers do not know something: which shard holds a
//! conversation, where a scorecard lives and with what fields, the stored value of an unchanged
//! TOAST column, the children of a scorecard that moves. ClickHouse first (every shard, batched),
//! PostgreSQL read-only as the last resort for scorecards and TOAST values.
//!
//! Why PostgreSQL at all: a sink that starts mid-stream (replay from an offset, a restart) can
//! meet a score whose scorecard event it never saw and that no shard holds yet (for example, the
//! card's insert is parked). PostgreSQL has the card's current fields; the scorecard's own event,
//! when it is applied, has the final say. Rows read from PostgreSQL are never written as such.
//!
//! No value from data is ever spliced into SQL text: ClickHouse values, database, table and
//! column names are bound here (`Query::bind`, names as `Identifier`), PostgreSQL values are
//! statement parameters. (Elsewhere the writer's INSERT and the TRUNCATE's `INSERT ... SELECT`
//! name the configured database and the columns `system.columns` lists, backquoted, and the
//! TRUNCATE's version is a number.)
//! Reads of a fixed shape decode into row structs; reads of whole rows, whose columns come from
//! `system.columns`, decode RowBinary with [`crate::rowbinary`].
//!
//! Here: the shard clients, their timeout and cool-down.
//! `routing`: where conversations (read with `FINAL`; one that several shards hold routes to the
//! lowest of them) and scorecards are. `stored`: whole stored rows.
//! `postgres`: the PostgreSQL fallbacks.

use std::time::{Duration, Instant};

use clickhouse::query::Query;
use clickhouse::{RowOwned, RowRead};

use crate::error::Error;
use crate::route::CardFields;
use crate::rowbinary::read_row_binary;
use crate::shard::ShardIndex;
use crate::table::{Cell, ChColumn};

mod postgres;
mod routing;
mod stored;

pub(crate) use postgres::postgres_error_is_transient;
pub(crate) use routing::CHUNK;
pub(crate) use routing::FoundConversations;
pub use stored::live_rows;
pub(crate) use stored::{KeyValue, bind_value, typed_key};

/// Longest a lookup or statement may take before the shard counts as unavailable.
pub(crate) const LOOKUP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a shard that failed a lookup is not asked again.
const COOL_DOWN: Duration = Duration::from_secs(5);

/// A scorecard as the shards have it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct StoredCard {
    /// The shard holding its newest row.
    pub shard: ShardIndex,
    /// That row's version.
    pub version: u64,
    /// True when the newest row is a delete marker.
    pub deleted: bool,
    /// Its fields (empty for a bare delete marker).
    pub fields: CardFields,
}

/// ClickHouse (and optionally PostgreSQL) lookups.
pub(crate) struct Lookups {
    shards: Vec<clickhouse::Client>,
    database: String,
    pg: Option<postgres::PgFallback>,
    /// Per shard: after a failed request, lookups fail fast until this instant, so a shard that
    /// hangs costs one timeout per cool-down rather than one per event (the events park).
    cooling: std::sync::Mutex<Vec<Option<Instant>>>,
}

impl Lookups {
    /// Lookups over `shards`, with PostgreSQL at `postgres_url` when given (connected when first
    /// needed).
    pub(crate) fn new(
        shards: Vec<clickhouse::Client>,
        database: String,
        postgres_url: Option<secrecy::SecretString>,
    ) -> Self {
        let cooling = std::sync::Mutex::new(vec![None; shards.len()]);
        let pg = postgres_url.map(postgres::PgFallback::new);
        Lookups { shards, database, pg, cooling }
    }

    /// Fails fast while `shard` is cooling down after a failure.
    fn ready(&self, shard: ShardIndex, action: &str) -> Result<(), Error> {
        let cooling = self.cooling.lock().ok().and_then(|c| c.get(shard).copied().flatten());
        match cooling {
            Some(until) if Instant::now() < until => Err(Error::Timeout {
                shard,
                action: format!("{action} (not attempted: the shard failed a request moments ago)"),
            }),
            _ => Ok(()),
        }
    }

    /// Records the outcome of a request to `shard`: a failure starts a cool-down.
    fn outcome<T>(&self, shard: ShardIndex, result: Result<T, Error>) -> Result<T, Error> {
        if let Ok(mut cooling) = self.cooling.lock()
            && let Some(slot) = cooling.get_mut(shard)
        {
            *slot = match &result {
                Err(err) if err.is_transient() => Some(Instant::now() + COOL_DOWN),
                _ => None,
            };
        }
        result
    }

    /// The shard clients, for a job of its own with its own timeout (a TRUNCATE's markers).
    pub(crate) fn clients(&self) -> Vec<clickhouse::Client> {
        self.shards.clone()
    }

    /// The database holding the tables on every shard.
    pub(crate) fn database(&self) -> &str {
        &self.database
    }

    /// Runs `query` on `shard` within the timeout and cool-down; decodes rows of `columns`.
    async fn select_cells(
        &self,
        shard: ShardIndex,
        query: Query,
        columns: &[ChColumn],
    ) -> Result<Vec<Vec<Cell>>, Error> {
        self.ready(shard, "lookup")?;
        let fetched = async {
            let mut cursor =
                query.fetch_bytes("RowBinary").map_err(Error::shard(shard, "lookup"))?;
            tokio::time::timeout(LOOKUP_TIMEOUT, cursor.collect())
                .await
                .map_err(|_| Error::Timeout { shard, action: "lookup".into() })?
                .map_err(Error::shard(shard, "lookup"))
        };
        let bytes = self.outcome(shard, fetched.await)?;
        decode(shard, columns, &bytes)
    }

    /// Runs a fixed-shape `query` on `shard` within the timeout and cool-down.
    async fn fetch<T: RowOwned + RowRead>(
        &self,
        shard: ShardIndex,
        query: Query,
    ) -> Result<Vec<T>, Error> {
        self.ready(shard, "lookup")?;
        let fetched = tokio::time::timeout(LOOKUP_TIMEOUT, query.fetch_all::<T>())
            .await
            .map_err(|_| Error::Timeout { shard, action: "lookup".into() })
            .and_then(|r| r.map_err(|err| typed_read_error(shard, err)));
        self.outcome(shard, fetched)
    }
}

/// A typed read's failure: an answer that does not decode into the row struct is a column type
/// the sink does not expect (permanent: it says which shard), anything else a shard trouble.
fn typed_read_error(shard: ShardIndex, err: clickhouse::error::Error) -> Error {
    use clickhouse::error::Error as Ch;
    match err {
        Ch::NotEnoughData
        | Ch::InvalidUtf8Encoding(_)
        | Ch::InvalidTagEncoding(_)
        | Ch::DeserializeAnyNotSupported
        | Ch::Custom(_) => Error::Unreadable {
            shard,
            what: format!(
                "a lookup row that does not decode ({err}): a column has an unexpected type"
            ),
        },
        other => Error::shard(shard, "lookup")(other),
    }
}

/// Decodes a RowBinary answer from `shard`.
fn decode(shard: ShardIndex, columns: &[ChColumn], bytes: &[u8]) -> Result<Vec<Vec<Cell>>, Error> {
    read_row_binary(columns, bytes).map_err(|err| Error::Unreadable {
        shard,
        what: format!("RowBinary rows of {} columns: {err}", columns.len()),
    })
}

/// `?, ?, ...`: one placeholder per bound value.
fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}
