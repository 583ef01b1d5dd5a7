//! Rebalances of the sink group under a backlog: a partition revoke must not wait for the work
//! its sink still has queued (the revoke callback runs inside the sink's own poll, so a wait for
//! rows only that poll's loop can hand to the writers waits for nothing), and nothing may be lost
//! when the partitions change owner.

use std::time::Duration;

use anyhow::Context;

use scoresync_tests::oracle::wait_until_consistent;
use scoresync_tests::stack::free_port;
use scoresync_tests::{Daemon, TestEnv, wait};

use crate::source::setup;

const DEADLINE: Duration = Duration::from_secs(120);
/// Process scorecards per transaction, and transactions: with 50 scores and 50 historic scores a
/// card, 10 x 100 x 101 = 101,000 changes.
const CARDS_PER_TX: i64 = 100;
const TRANSACTIONS: i64 = 10;
const CHILDREN: i64 = 50;

/// Writes the backlog in PostgreSQL: process scorecards (routed by time, no conversation
/// needed), each with its scores and historic scores.
async fn write_backlog(pg: &tokio_postgres::Client) -> anyhow::Result<i64> {
    for tx in 0..TRANSACTIONS {
        let (lo, hi) = (tx * CARDS_PER_TX, (tx + 1) * CARDS_PER_TX - 1);
        let sql = format!(
            "BEGIN;
             INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
                 scorecard_type, process_interaction_at, score, comment, created_at, updated_at)
             SELECT 'cust', 'prof', 'card-' || g, 'tmpl', 2, to_timestamp(1700000000 + g), 50,
                 'backlog', now(), now()
             FROM generate_series({lo}, {hi}) g;
             INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id,
                 criterion_id, numeric_value, created_at, updated_at)
             SELECT 'cust', 'prof', 'score-' || g || '-' || k, 'card-' || g, 'crit-' || k, k,
                 now(), now()
             FROM generate_series({lo}, {hi}) g, generate_series(1, {CHILDREN}) k;
             INSERT INTO director.historic_scorecard_scores (customer_id, profile_id,
                 scorecard_id, revision, criterion_id, score_id, numeric_value, not_applicable,
                 scored_at)
             SELECT 'cust', 'prof', 'card-' || g, 1, 'crit-' || k, 'score-' || g || '-' || k, k,
                 false, now()
             FROM generate_series({lo}, {hi}) g, generate_series(1, {CHILDREN}) k;
             COMMIT;"
        );
        pg.batch_execute(&sql).await?;
    }
    Ok(TRANSACTIONS * CARDS_PER_TX * (1 + 2 * CHILDREN))
}

/// The revoke durations a sink logged, in milliseconds.
fn revoke_ms(sink: &Daemon) -> Vec<u64> {
    sink.output()
        .lines()
        .filter(|l| l.contains("partitions revoked"))
        .filter_map(|l| l.split("revoke_ms=").nth(1))
        .filter_map(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .collect()
}

/// `scoresync_sink_buffered_rows` of the sink serving metrics on `listen`.
async fn buffered_rows(listen: &str) -> anyhow::Result<u64> {
    let metrics = crate::sink::http_get(&format!("http://{listen}/metrics")).await?;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("scoresync_sink_buffered_rows "))
        .context("no scoresync_sink_buffered_rows")?
        .trim()
        .parse()
        .context("buffered rows")
}

#[tokio::test]
async fn a_revoke_under_a_backlog_of_100k_messages_completes_within_2_s() -> anyhow::Result<()> {
    let (env, _broker) = TestEnv::on_own_broker("sink_revoke_backlog").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let _source = Daemon::start(&env, &["source"])?;
    let changes = write_backlog(&pg).await?;
    wait::until("the backlog to reach the change topic", DEADLINE, || async {
        let kafka = env.kafka.clone();
        let count = tokio::task::spawn_blocking(move || {
            scoresync_tests::kafka::message_count(&kafka, &kafka.change_topic)
        })
        .await??;
        Ok((count >= changes).then_some(()))
    })
    .await?;

    let member = |listen: &str| -> anyhow::Result<Daemon> {
        Daemon::start_with(&env, &["sink"], &[("SCORESYNC__METRICS__LISTEN", listen)])
    };
    let a_listen = format!("127.0.0.1:{}", free_port()?);
    let a = member(&a_listen)?;
    crate::sink::wait_until_assigned(&a, env.kafka.partitions).await?;
    // More batches queue than the writers hold (three each). A revoke that waited for every
    // queued row, which only the sink's own loop (blocked in the revoke) can hand to the writers,
    // would wait out its whole patience.
    wait::until("batches to queue behind the writers", DEADLINE, || async {
        Ok((buffered_rows(&a_listen).await? >= 2_000).then_some(()))
    })
    .await?;
    let b = member(&format!("127.0.0.1:{}", free_port()?))?;
    let (to_go, _) = {
        let kafka = env.kafka.clone();
        tokio::task::spawn_blocking(move || scoresync_tests::kafka::group_position(&kafka))
            .await??
    };
    assert!(
        to_go >= 50_000,
        "the first sink still had a backlog when the second joined ({to_go} messages to go)"
    );
    wait::until("sink A to give partitions up", DEADLINE, || async {
        Ok((!revoke_ms(&a).is_empty()).then_some(()))
    })
    .await?;
    let took = revoke_ms(&a)[0];
    eprintln!("revoke with {to_go} messages to go took {took} ms");
    assert!(took < 2_000, "the revoke took {took} ms with {to_go} messages to go");
    crate::sink::wait_until_assigned(&b, 1).await.context("sink B got partitions")?;
    wait_until_consistent(&env, &pg, Duration::from_secs(300)).await?;
    drop((a, b));
    Ok(())
}

/// A rebalance in the middle of a transaction that changes every row twice (issue 8.4): the
/// partitions change owner while the first sink still buffers the transaction's changes. Rows of
/// a revoked partition it had not sent are dropped, and the two changes of a row never share a
/// version, so whatever order the two sinks' inserts land in, the second change of every row
/// wins.
#[tokio::test]
async fn a_rebalance_in_the_middle_of_a_transaction_changing_each_row_twice_keeps_the_last_change()
-> anyhow::Result<()> {
    let (env, _broker) = TestEnv::on_own_broker("sink_rebalance_mid_tx").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let _source = Daemon::start(&env, &["source"])?;
    pg.batch_execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type, process_interaction_at)
         SELECT 'cust', 'prof', 'card-' || g, 'tmpl', 2, to_timestamp(1700000000 + g)
         FROM generate_series(1, 200) g;
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id,
             criterion_id)
         SELECT 'cust', 'prof', 'score-' || g || '-' || k, 'card-' || g, 'crit-' || k
         FROM generate_series(1, 200) g, generate_series(1, 100) k;
         BEGIN;
         UPDATE director.scores SET comment = 'first';
         UPDATE director.scores SET comment = 'second';
         COMMIT;",
    )
    .await?;
    let changes = 200 + 20_000 * 3;
    wait::until("the transaction to reach the change topic", DEADLINE, || async {
        let kafka = env.kafka.clone();
        let count = tokio::task::spawn_blocking(move || {
            scoresync_tests::kafka::message_count(&kafka, &kafka.change_topic)
        })
        .await??;
        Ok((count >= changes).then_some(()))
    })
    .await?;
    let member = |listen: &str| -> anyhow::Result<Daemon> {
        Daemon::start_with(&env, &["sink"], &[("SCORESYNC__METRICS__LISTEN", listen)])
    };
    let a_listen = format!("127.0.0.1:{}", free_port()?);
    let a = member(&a_listen)?;
    crate::sink::wait_until_assigned(&a, env.kafka.partitions).await?;
    wait::until("sink A to buffer part of the transaction", DEADLINE, || async {
        Ok((buffered_rows(&a_listen).await? >= 2_000).then_some(()))
    })
    .await?;
    let b = member(&format!("127.0.0.1:{}", free_port()?))?;
    wait::until("sink A to give partitions up", DEADLINE, || async {
        Ok((!revoke_ms(&a).is_empty()).then_some(()))
    })
    .await?;
    wait_until_consistent(&env, &pg, Duration::from_secs(300)).await?;
    drop((a, b));
    Ok(())
}
