//! `scoresync verify [--repair]` (issue 10.4): it reports exactly what was broken behind the
//! daemon's back, not the changes still in flight, and `--repair` brings the drift to 0.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, ensure};

use scoresync_sink::table::{Cell, TableSchema};
use scoresync_tests::oracle::{check, wait_until_consistent};
use scoresync_tests::{Daemon, TestEnv};

use crate::sink::loadgen;
use crate::source::setup;

const DEADLINE: Duration = Duration::from_secs(300);

/// One finding as `verify --json` reports it: (table, key, kind, shard).
pub type Found = (String, Vec<String>, String, Option<u64>);

/// What `scoresync verify --json` said.
pub struct Verified {
    /// Exit code.
    pub code: i32,
    /// Its drift findings.
    pub drift: BTreeSet<Found>,
    /// The whole JSON report.
    pub json: serde_json::Value,
    /// Its stderr (progress and re-check lines).
    pub stderr: String,
}

/// Runs `scoresync verify --json ARGS`.
pub async fn verify(env: &TestEnv, args: &[&str]) -> anyhow::Result<Verified> {
    let mut all = vec!["verify", "--json"];
    all.extend_from_slice(args);
    let out = Daemon::run_to_end(env, &all, DEADLINE).await?;
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or(-1);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("verify printed no JSON (exit {code}): {stderr}"))?;
    let drift = json["drift"]
        .as_array()
        .context("a drift list")?
        .iter()
        .map(|f| {
            let key = f["key"].as_array().into_iter().flatten();
            (
                f["table"].as_str().unwrap_or_default().to_owned(),
                key.map(|k| k.as_str().unwrap_or_default().to_owned()).collect(),
                f["kind"].as_str().unwrap_or_default().to_owned(),
                f["shard"].as_u64(),
            )
        })
        .collect();
    Ok(Verified { code, drift, json, stderr })
}

/// Runs `scoresync verify --json ARGS` and requires exit 0 and no drift.
pub async fn verify_clean(env: &TestEnv, args: &[&str], when: &str) -> anyhow::Result<()> {
    let v = verify(env, args).await?;
    ensure!(
        v.code == 0 && v.drift.is_empty(),
        "{when}: exit {}, {:?}: {}",
        v.code,
        v.drift,
        v.stderr
    );
    Ok(())
}

/// The live rows of `table` on `shard`, as cells of its schema.
async fn live(
    env: &TestEnv,
    shard: usize,
    table: &str,
) -> anyhow::Result<(TableSchema, Vec<Vec<Cell>>)> {
    let schemas = scoresync_sink::schema::load(&env.clickhouse).await?;
    let schema =
        schemas.into_iter().find(|s| s.table.name() == table).context("the table's schema")?;
    let rows =
        scoresync_sink::live_rows(&env.shard(shard), shard, &env.clickhouse.database, &schema)
            .await?;
    Ok((schema, rows))
}

/// Writes `rows` (cells of `schema`) to `shard` with an `INSERT ... VALUES`, every value bound.
async fn insert(
    env: &TestEnv,
    shard: usize,
    schema: &TableSchema,
    rows: &[Vec<Cell>],
) -> anyhow::Result<()> {
    let columns: Vec<&str> = schema.columns.iter().map(|c| c.name.as_str()).collect();
    let mut values = Vec::new();
    for row in rows {
        let cells: Vec<&str> =
            row.iter().map(|c| if *c == Cell::Null { "NULL" } else { "?" }).collect();
        values.push(format!("({})", cells.join(", ")));
    }
    let sql = format!(
        "INSERT INTO {} ({}) VALUES {}",
        schema.table.name(),
        columns.join(", "),
        values.join(", ")
    );
    let mut query = env.shard(shard).query(&sql);
    for cell in rows.iter().flatten() {
        query = match cell {
            Cell::Null => query,
            Cell::Str(s) => query.bind(s.as_str()),
            Cell::Int(i) => query.bind(*i),
            Cell::UInt(u) => query.bind(*u),
            Cell::Float(f) => query.bind(*f),
        };
    }
    query.execute().await?;
    Ok(())
}

/// The primary keys (text, in key order) of the live rows of `table` on `shard`.
pub async fn live_keys(
    env: &TestEnv,
    shard: usize,
    table: &str,
) -> anyhow::Result<Vec<Vec<String>>> {
    let (schema, rows) = live(env, shard, table).await?;
    Ok(rows.iter().map(|r| key_of(&schema, r)).collect())
}

fn key_of(schema: &TableSchema, cells: &[Cell]) -> Vec<String> {
    schema
        .key
        .iter()
        .map(|i| match &cells[*i] {
            Cell::Str(s) => s.clone(),
            Cell::Int(v) => v.to_string(),
            Cell::UInt(v) => v.to_string(),
            other => format!("{other:?}"),
        })
        .collect()
}

/// Breaks the first `n` rows (in key order) of `table` on `shard` with `edit`, writing the
/// result to `to`; returns their keys (after `edit`). Rows whose key is in `broken` (already
/// broken by an earlier step) are left alone.
async fn tamper(
    env: &TestEnv,
    table: &str,
    (shard, to): (usize, usize),
    n: usize,
    broken: &BTreeSet<Found>,
    edit: impl Fn(&TableSchema, &mut Vec<Cell>),
) -> anyhow::Result<Vec<Vec<String>>> {
    let (schema, mut rows) = live(env, shard, table).await?;
    // Rows of the first load only: the concurrent load writes cards prefixed "during".
    rows.retain(|r| !key_of(&schema, r).iter().any(|k| k.starts_with("during")));
    rows.retain(|r| !broken.iter().any(|(t, key, _, _)| t == table && *key == key_of(&schema, r)));
    rows.sort_by_key(|r| key_of(&schema, r));
    rows.truncate(n);
    ensure!(rows.len() == n, "{table} on shard {shard}: only {} live rows to break", rows.len());
    for row in &mut rows {
        edit(&schema, row);
    }
    insert(env, to, &schema, &rows).await?;
    Ok(rows.iter().map(|r| key_of(&schema, r)).collect())
}

fn bump_version(schema: &TableSchema, row: &mut [Cell]) {
    if let Some(i) = schema.position("_version")
        && let Cell::UInt(v) = row[i]
    {
        row[i] = Cell::UInt(v + 1);
    }
}

#[tokio::test]
async fn verify_reports_exactly_the_rows_broken_behind_the_daemons_back_and_repair_fixes_them()
-> anyhow::Result<()> {
    let env = TestEnv::new("verify_repair").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let daemon = Daemon::start(&env, &["run"])?;
    loadgen(&env, &["--scorecards", "150", "--conversations-per-shard", "10"]).await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;

    // A healthy pipeline verifies clean.
    verify_clean(&env, &[], "a healthy pipeline").await?;

    // Behind the daemon's back: 3 scores altered, 3 historic scores deleted (a newer delete
    // marker), 2 scorecards of shard 0 copied to shard 1, one of shard 1 moved to shard 0, and a
    // score PostgreSQL never had.
    let mut broken = BTreeSet::new();
    let altered = tamper(&env, "scores", (1, 1), 3, &broken, |schema, row| {
        bump_version(schema, row);
        if let Some(i) = schema.position("comment") {
            row[i] = Cell::Str("tampered".into());
        }
    })
    .await?;
    broken
        .extend(altered.into_iter().map(|k| ("scores".to_owned(), k, "stale".to_owned(), Some(1))));
    let deleted = tamper(&env, "historic_scorecard_scores", (0, 0), 3, &broken, |schema, row| {
        bump_version(schema, row);
        if let Some(i) = schema.position("_deleted") {
            row[i] = Cell::UInt(1);
        }
    })
    .await?;
    broken.extend(
        deleted
            .into_iter()
            .map(|k| ("historic_scorecard_scores".to_owned(), k, "missing".to_owned(), Some(0))),
    );
    let copied = tamper(&env, "scorecards", (0, 1), 2, &broken, |_, _| {}).await?;
    broken.extend(
        copied.into_iter().map(|k| ("scorecards".to_owned(), k, "misplaced".to_owned(), Some(1))),
    );
    // A scorecard of shard 1 moved to shard 0: its only live copy is on the wrong shard.
    let moved =
        tamper(&env, "scorecards", (1, 0), 1, &broken, |schema, row| bump_version(schema, row))
            .await?;
    let marked = tamper(&env, "scorecards", (1, 1), 1, &broken, |schema, row| {
        bump_version(schema, row);
        if let Some(i) = schema.position("_deleted") {
            row[i] = Cell::UInt(1);
        }
    })
    .await?;
    ensure!(moved == marked, "the same scorecard: {moved:?}, {marked:?}");
    for key in moved {
        broken.insert(("scorecards".to_owned(), key.clone(), "misplaced".to_owned(), Some(0)));
        broken.insert(("scorecards".to_owned(), key, "missing".to_owned(), Some(1)));
    }
    let ghost = tamper(&env, "scores", (0, 0), 1, &broken, |schema, row| {
        if let Some(i) = schema.position("score_id") {
            row[i] = Cell::Str("ghost-score".into());
        }
    })
    .await?;
    broken.extend(ghost.into_iter().map(|k| ("scores".to_owned(), k, "extra".to_owned(), Some(0))));
    ensure!(!check(&env, &pg).await?.is_empty(), "the tampering broke the oracle");

    // While more load arrives, verify reports exactly what was broken: the load's changes are
    // in flight, not drift.
    let load = crate::sink::spawn_loadgen(
        &env,
        &["--scorecards", "100", "--conversations-per-shard", "0", "--prefix", "during"],
    )?;
    // Chunks of 7 rows: both walks page many times.
    let v = verify(&env, &["--chunk-rows", "7"]).await?;
    ensure!(v.code == 1, "drift exits 1, not {}: {}", v.code, v.stderr);
    assert_eq!(v.drift, broken, "verify reports what was broken, no more, no less");

    // --repair brings the drift to 0, replication running: the drifted rows' scorecards
    // re-published, then a marker over each misplaced and extra copy still there (at least the
    // two copied scorecards and the ghost score).
    let v = verify(&env, &["--repair"]).await?;
    ensure!(
        v.code == 0 && v.drift.is_empty(),
        "after repair: exit {}, {:?}: {}",
        v.code,
        v.drift,
        v.stderr
    );
    let markers = v.json["repaired"]["markers"].as_u64().unwrap_or_default();
    ensure!(markers >= 3, "markers over the copies: {}", v.json);
    load.await??;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    verify_clean(&env, &[], "verified again").await?;

    // With the daemon stopped, a difference cannot be told from lag: exit 2, naming the slot.
    daemon.terminate(DEADLINE).await?;
    tamper(&env, "scorecards", (0, 1), 1, &broken, |_, _| {}).await?;
    let out = Daemon::run_to_end(&env, &["verify", "--settle-timeout", "3s"], DEADLINE).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(2),
        "a stopped pipeline: exit 2, not {:?}: {stdout}",
        out.status
    );
    let why = format!("could not verify: slot {} has not confirmed past", env.postgres.slot);
    ensure!(stdout.contains(&why), "{stdout}");
    Ok(())
}
