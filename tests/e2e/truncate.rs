//! A TRUNCATE of a big table (issue 8.3): applied once however long it takes, and every later
//! change waits for it, so a scorecard re-inserted right after it brings back none of the old
//! children.

use std::time::Duration;

use anyhow::ensure;

use scoresync_tests::oracle::{live_counts, wait_until_consistent};
use scoresync_tests::{Daemon, TestEnv};

use crate::source::setup;

const DEADLINE: Duration = Duration::from_secs(600);

#[tokio::test]
async fn a_truncate_of_500k_scores_is_applied_once_and_a_card_reinserted_after_it_brings_no_old_children()
-> anyhow::Result<()> {
    // 500k changes on a private broker: the stack's tansu (sqlite storage, one request at a time)
    // holds every earlier test's messages by the time this runs last, and answered this test's
    // requests tens of seconds late (its storage task once panicked under it). For the same
    // reason a production-like session timeout: nothing is killed here, and the test is about
    // TRUNCATE, not about rebalances.
    let (mut env, _broker) = TestEnv::on_own_broker("truncate_big").await?;
    env.kafka.session_timeout_ms = 30_000;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let daemon = Daemon::start(&env, &["run"])?;
    // 100 process scorecards (one second apart: both shards) with 5,000 scores each.
    pg.batch_execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type, process_interaction_at)
         SELECT 'c', 'p', 'card-' || i, 't', 2, to_timestamp(1767225600 + i)
         FROM generate_series(1, 100) i;
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id)
         SELECT 'c', 'p', 's-' || i || '-' || j, 'card-' || i, 'k' || j
         FROM generate_series(1, 100) i, generate_series(1, 5000) j;",
    )
    .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    let live: u64 = live_counts(&env)
        .await?
        .iter()
        .filter(|((_, table), _)| table == "scores")
        .map(|(_, n)| n)
        .sum();
    ensure!(live == 500_000, "500,000 live scores before the TRUNCATE, found {live}");

    // The TRUNCATE, then in the next transaction card-1 deleted and re-inserted on the other
    // shard (one second later) with one new score: a move that must find no old children.
    pg.batch_execute(
        "TRUNCATE director.scores;
         BEGIN;
         DELETE FROM director.scorecards WHERE scorecard_id = 'card-1';
         INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type, process_interaction_at)
         VALUES ('c', 'p', 'card-1', 't', 2, to_timestamp(1767225600 + 2));
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id)
         VALUES ('c', 'p', 'new-1', 'card-1', 'k1');
         COMMIT;",
    )
    .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    let output = daemon.output();
    let applied = output.matches("truncate applied on every shard").count();
    ensure!(applied == 1, "the TRUNCATE (one copy per partition) ran {applied} times: {output}");
    daemon.terminate(Duration::from_secs(60)).await?;
    Ok(())
}
