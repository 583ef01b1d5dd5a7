//! `scoresync backfill`: re-publishing current PostgreSQL rows beside the running daemon.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::ensure;

use scoresync_bus::offsets::OffsetReader;
use scoresync_event::Operation;
use scoresync_tests::oracle::{check, wait_until_consistent};
use scoresync_tests::{Daemon, TestEnv, wait};

use crate::sink::loadgen;
use crate::source::setup;

const DEADLINE: Duration = Duration::from_secs(300);
const TABLES: [&str; 3] = ["scorecards", "scores", "historic_scorecard_scores"];

/// Deletes the rows `condition` selects from the three tables on every shard, behind the
/// daemon's back, and waits until the mutations are done. (Mind NULLs: ClickHouse 18.16's
/// mutations delete a row whose condition is NULL.)
async fn lose_rows(env: &TestEnv, condition: &str) -> anyhow::Result<()> {
    for shard in 0..env.clickhouse.shards.len() {
        for table in TABLES {
            let sql = format!("ALTER TABLE {table} DELETE WHERE {condition}");
            env.shard(shard).query(&sql).execute().await?;
        }
    }
    wait::until("the deletes to be done on every shard", DEADLINE, || async {
        let mut left = 0;
        for shard in 0..env.clickhouse.shards.len() {
            for table in TABLES {
                let sql = format!("SELECT count() FROM {table} WHERE {condition}");
                left += env.shard(shard).query(&sql).fetch_one::<u64>().await?;
            }
        }
        Ok((left == 0).then_some(()))
    })
    .await
}

/// Runs `scoresync backfill ARGS` to its end; returns (success, output).
async fn backfill(env: &TestEnv, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let mut all = vec!["backfill"];
    all.extend_from_slice(args);
    let mut run = Daemon::start(env, &all)?;
    let status = run.wait(DEADLINE).await?;
    Ok((status.success(), run.output()))
}

/// The change topic's end offsets now: what a backfill publishes lies after them.
fn topic_end(env: &TestEnv) -> anyhow::Result<BTreeMap<i32, i64>> {
    let reader = OffsetReader::open(&env.kafka, "scoresync-test", &env.kafka.change_topic)?;
    Ok(reader.watermarks()?.into_iter().map(|(p, (_, high))| (p, high)).collect())
}

/// The `Snapshot` events after `since` (the backfill's; the initial snapshot's came before).
fn backfilled(
    env: &TestEnv,
    since: &BTreeMap<i32, i64>,
) -> anyhow::Result<Vec<scoresync_event::ChangeEvent>> {
    Ok(scoresync_tests::kafka::read_events(&env.kafka, &env.kafka.change_topic)?
        .into_iter()
        .filter(|p| p.event.op() == Operation::Snapshot)
        .filter(|p| p.offset >= since.get(&p.partition).copied().unwrap_or(0))
        .map(|p| p.event)
        .collect())
}

fn customer(event: &scoresync_event::ChangeEvent) -> Option<String> {
    scoresync_event::ScorecardKey::of_event(event).map(|k| k.customer_id)
}

#[tokio::test]
async fn backfill_of_one_customer_restores_its_rows_and_every_concurrent_update_wins()
-> anyhow::Result<()> {
    let env = TestEnv::new("backfill_customer").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let _daemon = Daemon::start(&env, &["run"])?;
    loadgen(&env, &["--scorecards", "150", "--conversations-per-shard", "10"]).await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;

    lose_rows(&env, "customer_id = 'cust-1'").await?;
    let since = topic_end(&env)?;
    ensure!(!check(&env, &pg).await?.is_empty(), "losing cust-1's rows broke the oracle");

    // A writer keeps changing cust-1's scores and scorecards while the backfill reads them.
    let stop = tokio_util::sync::CancellationToken::new();
    let writer = {
        let (pg, stop) = (env.pg_admin().await?, stop.clone());
        tokio::spawn(async move {
            let mut round = 0_i64;
            while !stop.is_cancelled() {
                pg.batch_execute(&format!(
                    "UPDATE director.scores SET numeric_value = {round}
                     WHERE customer_id = 'cust-1' AND score_id IN
                       (SELECT score_id FROM director.scores WHERE customer_id = 'cust-1'
                        ORDER BY random() LIMIT 5);
                     UPDATE director.scorecards SET score = {round}
                     WHERE customer_id = 'cust-1' AND scorecard_id IN
                       (SELECT scorecard_id FROM director.scorecards WHERE customer_id = 'cust-1'
                        ORDER BY random() LIMIT 2);"
                ))
                .await?;
                round += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            anyhow::Ok(round)
        })
    };
    let (ok, output) = backfill(&env, &["--customer", "cust-1", "--chunk-cards", "4"]).await?;
    stop.cancel();
    let rounds = writer.await??;
    ensure!(ok, "backfill failed: {output}");
    ensure!(output.contains("backfill: done"), "{output}");
    ensure!(rounds > 5, "the writer ran during the backfill ({rounds} rounds)");
    wait_until_consistent(&env, &pg, DEADLINE).await?;

    // Exactly cust-1's rows were published, each of its scorecards among them.
    let events = backfilled(&env, &since)?;
    ensure!(!events.is_empty(), "the backfill published rows");
    ensure!(events.iter().all(|e| customer(e).as_deref() == Some("cust-1")), "only cust-1's rows");
    let cards: i64 = pg
        .query_one("SELECT count(*) FROM director.scorecards WHERE customer_id = 'cust-1'", &[])
        .await?
        .get(0);
    let published = events.iter().filter(|e| e.table == "scorecards").count() as i64;
    assert_eq!(published, cards, "every scorecard of cust-1, once");
    Ok(())
}

#[tokio::test]
async fn backfill_of_process_scorecards_killed_half_way_finishes_when_started_again()
-> anyhow::Result<()> {
    let env = TestEnv::new("backfill_resume").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let _daemon = Daemon::start(&env, &["run"])?;
    loadgen(
        &env,
        &["--scorecards", "240", "--process-share", "0.6", "--conversations-per-shard", "10"],
    )
    .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    let process_cards: i64 = pg
        .query_one("SELECT count(*) FROM director.scorecards WHERE scorecard_type = 2", &[])
        .await?
        .get(0);
    ensure!(process_cards > 40, "loadgen made process scorecards ({process_cards})");

    // ifNull: ClickHouse 18.16's ALTER ... DELETE takes a NULL comparison as true.
    lose_rows(&env, "ifNull(scorecard_type, 0) = 2").await?;
    let since = topic_end(&env)?;
    ensure!(!check(&env, &pg).await?.is_empty(), "losing the process rows broke the oracle");

    // kill -9 once some chunks are out, well before the end. The whole backfill takes a few
    // seconds, so it is held half-way first: a chunk waits for every transaction that has an
    // id when it starts (see scoresync_source::backfill), and this one stays open until the
    // kill. The topic's end offsets are cheap to poll; decoding it is not.
    let published = |env: &TestEnv| -> anyhow::Result<i64> {
        Ok(topic_end(env)?.iter().map(|(p, end)| end - since.get(p).copied().unwrap_or(0)).sum())
    };
    let mut first = Daemon::start(&env, &["backfill", "--kind", "process", "--chunk-cards", "1"])?;
    wait::until("some backfilled rows on the topic", DEADLINE, || async {
        Ok((published(&env)? >= 30).then_some(()))
    })
    .await?;
    let holder = env.pg_admin().await?;
    holder.batch_execute("BEGIN; SELECT pg_current_xact_id();").await?;
    wait::until("some backfilled scorecards on the topic", DEADLINE, || async {
        let cards = backfilled(&env, &since)?.iter().filter(|e| e.table == "scorecards").count();
        Ok((cards >= 3).then_some(()))
    })
    .await?;
    first.kill9().await?;
    holder.batch_execute("ROLLBACK").await?;
    let before =
        backfilled(&env, &since)?.iter().filter(|e| e.table == "scorecards").count() as i64;
    ensure!(before < process_cards, "killed half-way ({before} of {process_cards})");

    let (ok, output) = backfill(&env, &["--kind", "process", "--chunk-cards", "1"]).await?;
    ensure!(ok, "second backfill failed: {output}");
    ensure!(output.contains("backfill: resuming after"), "it resumed: {output}");
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    let events = backfilled(&env, &since)?;
    ensure!(
        events.iter().all(|e| e.table != "scorecards"
            || e.new_row
                .as_ref()
                .and_then(|r| r.column("scorecard_type"))
                .and_then(|c| c.value.as_ref())
                .and_then(|v| v.to_text())
                .as_deref()
                == Some("2")),
        "only process scorecards were published"
    );
    Ok(())
}
