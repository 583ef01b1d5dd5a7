//! The correctness oracle (DESIGN.md section 7), the same after every scenario: for every
//! PostgreSQL primary key there is exactly one live ClickHouse row (FINAL, `_deleted = 0`) across
//! all shards, on the shard routing predicts, equal to the PostgreSQL row (children also carry
//! their scorecard's fields and conversation); and no live row for a key PostgreSQL lacks.
//!
//! Routing is computed here independently of the sink: process scorecards by
//! `process_interaction_at` seconds (floored) modulo the shard count, others by the shard whose
//! `conversations` table holds their conversation.

use std::collections::{BTreeMap, HashMap};

use scoresync_event::v1::value::Kind;
use scoresync_event::{Row, SourceTable, Value};
use scoresync_sink::table::{Cell, TableSchema};

use crate::kafka::{RowId, pg_state, value_text};
use crate::test_env::TestEnv;

/// A conversation as a shard holds it.
#[derive(Clone, Debug)]
pub struct Conv {
    /// The shard.
    pub shard: usize,
    /// Start time, Unix seconds.
    pub start: i64,
    /// Language.
    pub language: String,
}

/// Every conversation on every shard, keyed (customer, profile, conversation).
pub async fn conversations(
    env: &TestEnv,
) -> anyhow::Result<HashMap<(String, String, String), Conv>> {
    let mut out = HashMap::new();
    for shard in 0..env.clickhouse.shards.len() {
        let rows: Vec<(String, String, String, u32, String)> = env
            .shard(shard)
            .query("SELECT customer_id, profile_id, conversation_id, toUInt32(conversation_start_time), language_code FROM conversations FINAL")
            .fetch_all()
            .await?;
        for (c, p, id, start, language) in rows {
            out.entry((c, p, id)).or_insert(Conv { shard, start: i64::from(start), language });
        }
    }
    Ok(out)
}

/// A ClickHouse row: cells by column name.
type ChRowByName = BTreeMap<String, Cell>;

/// Live rows of one table on one shard, each as cells by column name.
async fn live_rows(
    env: &TestEnv,
    shard: usize,
    schema: &TableSchema,
) -> anyhow::Result<Vec<ChRowByName>> {
    let rows =
        scoresync_sink::live_rows(&env.shard(shard), shard, &env.clickhouse.database, schema)
            .await?;
    Ok(rows
        .into_iter()
        .map(|cells| schema.columns.iter().map(|c| c.name.clone()).zip(cells).collect())
        .collect())
}

fn cell_key(table: SourceTable, row: &ChRowByName) -> Vec<String> {
    table
        .primary_key()
        .iter()
        .map(|k| match row.get(*k) {
            Some(Cell::Str(s)) => s.clone(),
            Some(Cell::Int(i)) => i.to_string(),
            Some(Cell::UInt(u)) => u.to_string(),
            Some(Cell::Float(f)) => f.to_string(),
            _ => String::new(),
        })
        .collect()
}

/// True when a PostgreSQL value and a ClickHouse cell hold the same thing.
fn same(value: Option<&Value>, cell: Option<&Cell>) -> bool {
    let kind = value.and_then(|v| v.kind.as_ref());
    match (kind, cell) {
        (None | Some(Kind::Null(_)), None | Some(Cell::Null)) => true,
        (Some(Kind::Text(a)), Some(Cell::Str(b))) => a == b,
        (Some(Kind::Int(a) | Kind::TimestampUs(a)), Some(Cell::Int(b))) => a == b,
        (Some(Kind::Int(a)), Some(Cell::UInt(b))) => u64::try_from(*a).ok() == Some(*b),
        (Some(Kind::Float(a)), Some(Cell::Float(b))) => a == b || (a.is_nan() && b.is_nan()),
        (Some(Kind::Boolean(a)), Some(Cell::UInt(b))) => u64::from(*a) == *b,
        _ => false,
    }
}

fn text(row: &Row, name: &str) -> Option<String> {
    value_text(row.column(name).and_then(|c| c.value.as_ref()))
}

/// The shard a scorecard row belongs on, or `None` when its conversation is on no shard.
pub fn expected_shard(
    card: &Row,
    shards: usize,
    convs: &HashMap<(String, String, String), Conv>,
) -> Option<usize> {
    let value = |name: &str| card.column(name).and_then(|c| c.value.as_ref());
    let kind = value("scorecard_type").and_then(Value::as_int);
    if kind == Some(2) {
        let at = value("process_interaction_at").and_then(Value::as_timestamp_us)?;
        return Some(at.div_euclid(1_000_000).rem_euclid(shards as i64) as usize);
    }
    let key =
        (text(card, "customer_id")?, text(card, "profile_id")?, text(card, "conversation_id")?);
    convs.get(&key).map(|c| c.shard)
}

/// Checks the oracle; returns the differences (empty: it holds). `parked` lists scorecard ids
/// whose conversation is known to be missing: their rows are expected nowhere.
pub async fn check(env: &TestEnv, pg: &tokio_postgres::Client) -> anyhow::Result<Vec<String>> {
    let shards = env.clickhouse.shards.len();
    let pg_rows = pg_state(pg).await?;
    let convs = conversations(env).await?;
    let mut problems = Vec::new();

    // Where each PostgreSQL scorecard lives, and what its children carry.
    let mut cards: HashMap<(String, String, String), (Option<usize>, &Row)> = HashMap::new();
    for ((table, _), row) in &pg_rows {
        if table == "scorecards" {
            let key = (
                text(row, "customer_id").unwrap_or_default(),
                text(row, "profile_id").unwrap_or_default(),
                text(row, "scorecard_id").unwrap_or_default(),
            );
            cards.insert(key, (expected_shard(row, shards, &convs), row));
        }
    }

    let live = live_copies(env).await?;

    for (id, pg_row) in &pg_rows {
        let card_key = (
            text(pg_row, "customer_id").unwrap_or_default(),
            text(pg_row, "profile_id").unwrap_or_default(),
            text(pg_row, "scorecard_id").unwrap_or_default(),
        );
        let Some((expected, card)) = cards.get(&card_key).map(|(s, r)| (*s, *r)) else {
            problems.push(format!("{id:?}: its scorecard is not in PostgreSQL (orphan rows are not generated by the tests)"));
            continue;
        };
        let copies = live.get(id).cloned().unwrap_or_default();
        let Some(expected) = expected else {
            if !copies.is_empty() {
                problems.push(format!(
                    "{id:?}: conversation on no shard, yet live on shards {:?}",
                    copies.iter().map(|c| c.0).collect::<Vec<_>>()
                ));
            }
            continue;
        };
        match copies.as_slice() {
            [] => problems.push(format!("{id:?}: missing (expected on shard {expected})")),
            [(shard, row)] => {
                if *shard != expected {
                    problems.push(format!("{id:?}: on shard {shard}, expected {expected}"));
                }
                for col in &pg_row.columns {
                    if !same(col.value.as_ref(), row.get(&col.name)) && row.contains_key(&col.name)
                    {
                        problems.push(format!(
                            "{id:?}.{}: clickhouse {:?}, postgres {:?}",
                            col.name,
                            row.get(&col.name),
                            col.value
                        ));
                    }
                }
                if id.0 != "scorecards" {
                    check_carried(id, card, row, &convs, &mut problems);
                }
            }
            many => problems.push(format!(
                "{id:?}: {} live copies on shards {:?}",
                many.len(),
                many.iter().map(|c| c.0).collect::<Vec<_>>()
            )),
        }
    }
    for (id, copies) in &live {
        if !pg_rows.contains_key(id) {
            problems.push(format!(
                "{id:?}: live on shards {:?}, absent in PostgreSQL",
                copies.iter().map(|c| c.0).collect::<Vec<_>>()
            ));
        }
    }
    problems.sort();
    Ok(problems)
}

/// Every live ClickHouse row on every shard, by key: (shard, cells by column name). Columns as
/// the shards list them (`system.columns`; every shard must agree).
async fn live_copies(env: &TestEnv) -> anyhow::Result<HashMap<RowId, Vec<(usize, ChRowByName)>>> {
    let schemas = scoresync_sink::schema::load(&env.clickhouse).await?;
    let mut live: HashMap<RowId, Vec<(usize, ChRowByName)>> = HashMap::new();
    for schema in &schemas {
        let table = schema.table;
        for shard in 0..env.clickhouse.shards.len() {
            for row in live_rows(env, shard, schema).await? {
                live.entry((table.name().to_owned(), cell_key(table, &row)))
                    .or_default()
                    .push((shard, row));
            }
        }
    }
    Ok(live)
}

/// Checks what a child row (score, historic score) carries from its scorecard `card`: the
/// card's fields, and for a conversation scorecard the conversation's start time and language.
fn check_carried(
    id: &RowId,
    card: &Row,
    row: &ChRowByName,
    convs: &HashMap<(String, String, String), Conv>,
    problems: &mut Vec<String>,
) {
    let is_process =
        card.column("scorecard_type").and_then(|c| c.value.as_ref()).and_then(Value::as_int)
            == Some(2);
    for name in [
        "scorecard_type",
        "template_id",
        "template_revision",
        "agent_user_id",
        "conversation_id",
        "process_interaction_at",
    ] {
        let want = card.column(name).and_then(|c| c.value.as_ref());
        if !same(want, row.get(name)) {
            problems.push(format!(
                "{id:?}.{name} (from its scorecard): clickhouse {:?}, postgres {:?}",
                row.get(name),
                want
            ));
        }
    }
    if is_process {
        return;
    }
    let conv = convs.get(&(
        text(card, "customer_id").unwrap_or_default(),
        text(card, "profile_id").unwrap_or_default(),
        text(card, "conversation_id").unwrap_or_default(),
    ));
    let want_start = conv.map(|c| Cell::Int(c.start)).unwrap_or(Cell::Null);
    let want_language = conv.map(|c| Cell::Str(c.language.clone())).unwrap_or(Cell::Null);
    if row.get("conversation_start_time") != Some(&want_start)
        || row.get("language_code") != Some(&want_language)
    {
        problems.push(format!(
            "{id:?}: conversation fields {:?}/{:?}, expected {want_start:?}/{want_language:?}",
            row.get("conversation_start_time"),
            row.get("language_code")
        ));
    }
}

/// Waits until the pipeline has caught up and the oracle holds; on timeout the error lists the
/// first differences. Caught up: the source (when running) confirmed everything this database
/// had written when the wait began, the sink group committed every message, and nothing new arrived
/// while the oracle compared (else a pair of changes still in flight, such as an insert and the
/// delete after it, could let a passing state be a passing moment).
pub async fn wait_until_consistent(
    env: &TestEnv,
    pg: &tokio_postgres::Client,
    deadline: std::time::Duration,
) -> anyhow::Result<()> {
    // A mark in this database's WAL that the source confirms once it has read everything before
    // it (a non-transactional logical message, as its heartbeats are).
    let target: String = pg
        .query_one("SELECT pg_logical_emit_message(false, 'scoresync-test-mark', '')::text", &[])
        .await?
        .get(0);
    let last = std::sync::Mutex::new(Vec::new());
    let result =
        crate::wait::until("ClickHouse to match PostgreSQL (oracle)", deadline, || async {
            let Some(before) = settled(env, pg, &target).await? else {
                if let Ok(mut l) = last.lock() {
                    *l = vec!["the pipeline has not caught up yet".to_owned()];
                }
                return Ok(None);
            };
            let problems = check(env, pg).await?;
            let ok = problems.is_empty() && settled(env, pg, &target).await? == Some(before);
            if let Ok(mut l) = last.lock() {
                *l = problems;
            }
            Ok(ok.then_some(()))
        })
        .await;
    result.map_err(|err| {
        let shown: Vec<String> =
            last.lock().map(|l| l.iter().take(15).cloned().collect()).unwrap_or_default();
        let total = last.lock().map(|l| l.len()).unwrap_or(0);
        err.context(format!("{total} difference(s), first: {shown:#?}"))
    })
}

/// The change topic's high watermarks (summed) when the pipeline has nothing in flight; `None`
/// while the active source has not confirmed `target` or the sink group has messages to commit.
async fn settled(
    env: &TestEnv,
    pg: &tokio_postgres::Client,
    target: &str,
) -> anyhow::Result<Option<i64>> {
    let slot = pg
        .query_opt(
            "SELECT active, confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots \
             WHERE slot_name = $2",
            &[&target, &env.postgres.slot],
        )
        .await?;
    let source_done = slot
        .is_none_or(|row| !row.get::<_, bool>(0) || row.get::<_, Option<bool>>(1).unwrap_or(false));
    if !source_done {
        return Ok(None);
    }
    let kafka = env.kafka.clone();
    let (lag, highs) =
        tokio::task::spawn_blocking(move || crate::kafka::group_position(&kafka)).await??;
    Ok((lag == 0).then_some(highs))
}

/// Live rows per (shard, table).
pub async fn live_counts(env: &TestEnv) -> anyhow::Result<BTreeMap<(usize, String), u64>> {
    let mut out = BTreeMap::new();
    for shard in 0..env.clickhouse.shards.len() {
        for table in SourceTable::ALL {
            let n: u64 = env
                .shard(shard)
                .query(&format!("SELECT count() FROM {} FINAL WHERE _deleted = 0", table.name()))
                .fetch_one()
                .await?;
            out.insert((shard, table.name().to_owned()), n);
        }
    }
    Ok(out)
}
