//! Moves cut short: a scorecard whose routing changed moves with its children from one shard to
//! another in separate inserts. Whatever point a crash cuts the move at, nothing may be lost.

use std::time::Duration;

use anyhow::Context;

use scoresync_tests::clickhouse::PrivateShards;
use scoresync_tests::oracle::wait_until_consistent;
use scoresync_tests::{Daemon, wait};

use crate::source::setup;

const DEADLINE: Duration = Duration::from_secs(180);
const CARDS: i64 = 20;

/// Delete markers (`_deleted = 1`) of `table` on one shard.
async fn markers(shard: &clickhouse::Client, table: &str) -> anyhow::Result<u64> {
    let sql = format!("SELECT count() FROM {table} WHERE _deleted = 1");
    Ok(shard.query(&sql).fetch_one().await?)
}

#[tokio::test]
async fn a_move_whose_new_shard_hangs_survives_a_kill_9() -> anyhow::Result<()> {
    let mut env = scoresync_tests::TestEnv::new("sink_move_hang").await?;
    setup(&env).await?;
    let mut shards = PrivateShards::start(env.dir().join("shards"), 2)?;
    env.use_shards(shards.urls()).await?;
    let pg = env.pg_admin().await?;
    let mut daemon = Daemon::start(&env, &["run"])?;
    // Process scorecards on shard 0 (even seconds), each with three scores and three historic
    // scores.
    pg.batch_execute(&format!(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type, process_interaction_at)
         SELECT 'c', 'p', 'card-' || g, 't', 2, to_timestamp(1700000000 + 2 * g)
         FROM generate_series(1, {CARDS}) g;
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id,
             numeric_value)
         SELECT 'c', 'p', 'score-' || g || '-' || k, 'card-' || g, 'k' || k, k
         FROM generate_series(1, {CARDS}) g, generate_series(1, 3) k;
         INSERT INTO director.historic_scorecard_scores (customer_id, profile_id, scorecard_id,
             revision, criterion_id, numeric_value)
         SELECT 'c', 'p', 'card-' || g, 1, 'k' || k, k
         FROM generate_series(1, {CARDS}) g, generate_series(1, 3) k;"
    ))
    .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;

    // Shard 1 hangs (SIGSTOP); every card moves to it (odd seconds).
    shards.freeze(1)?;
    pg.batch_execute(
        "UPDATE director.scorecards SET process_interaction_at = process_interaction_at + interval '1 second'",
    )
    .await?;
    // Give shard 0 time to take whatever the sink sends it: before the fix, the move's markers
    // for the old shard landed there while the new shard's copies waited.
    let shard0 = env.shard(0);
    let landed = wait::until("move markers on the old shard", Duration::from_secs(20), || async {
        Ok((markers(&shard0, "scores").await? > 0).then_some(()))
    })
    .await
    .is_ok();
    eprintln!("move markers reached the old shard while the new one hung: {landed}");
    daemon.kill9().await?;
    shards.thaw(1)?;
    let _daemon = Daemon::start(&env, &["run"])?;
    wait_until_consistent(&env, &pg, DEADLINE).await.context("after the restart")?;
    drop(shards);
    Ok(())
}
