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

/// A scorecard deleted and inserted again with other routing (issue 8.4), in one transaction and
/// in two: the scores PostgreSQL kept must follow it to its new shard with its new fields, and
/// leave no live copy behind.
#[tokio::test]
async fn a_card_deleted_and_reinserted_elsewhere_takes_its_children_along() -> anyhow::Result<()> {
    let env = scoresync_tests::TestEnv::new("sink_reinsert").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let daemon = Daemon::start(&env, &["run"])?;
    // Two process cards on shard 0 (even seconds), three scores and a historic score each.
    pg.batch_execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type, process_interaction_at)
         VALUES ('c', 'p', 'one-tx', 't', 2, to_timestamp(1767225600)),
                ('c', 'p', 'two-tx', 't', 2, to_timestamp(1767225600));
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id)
         SELECT 'c', 'p', card || '-s' || i, card, 'k' || i
         FROM unnest(ARRAY['one-tx', 'two-tx']) card, generate_series(1, 3) i;
         INSERT INTO director.historic_scorecard_scores (customer_id, profile_id, scorecard_id,
             revision, criterion_id)
         VALUES ('c', 'p', 'one-tx', 1, 'k1'), ('c', 'p', 'two-tx', 1, 'k1');",
    )
    .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    // Deleted and inserted again one second later (shard 1), with another template.
    let reinsert = |card: &str| {
        format!(
            "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
                 scorecard_type, process_interaction_at)
             VALUES ('c', 'p', '{card}', 't2', 2, to_timestamp(1767225601));"
        )
    };
    pg.batch_execute(&format!(
        "BEGIN;
         DELETE FROM director.scorecards WHERE scorecard_id = 'one-tx';
         {}
         COMMIT;
         DELETE FROM director.scorecards WHERE scorecard_id = 'two-tx';",
        reinsert("one-tx")
    ))
    .await?;
    pg.batch_execute(&reinsert("two-tx")).await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    let on_new_shard: u64 = env
        .shard(1)
        .query("SELECT count() FROM scores FINAL WHERE _deleted = 0 AND template_id = 't2'")
        .fetch_one()
        .await
        .context("counting moved scores")?;
    assert_eq!(on_new_shard, 6, "every score moved with its card and carries its new template");
    daemon.terminate(DEADLINE).await?;
    Ok(())
}

/// A score re-parented to a scorecard that has to wait (its conversation is on no shard yet),
/// then updated while that change still waits (issue 8.4): the update supersedes the parked
/// re-parenting but must keep its side effect, the old copy's delete marker. Otherwise the score
/// stays live on two shards.
#[tokio::test]
async fn a_parked_reparenting_superseded_by_a_later_update_still_retires_the_old_copy()
-> anyhow::Result<()> {
    let env = scoresync_tests::TestEnv::new("sink_superseded_move").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let daemon = Daemon::start(&env, &["run"])?;
    pg.batch_execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type, process_interaction_at)
         VALUES ('c', 'p', 'home', 't', 2, to_timestamp(1767225600));
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id)
         VALUES ('c', 'p', 'wanderer', 'home', 'k1');",
    )
    .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    pg.batch_execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type, conversation_id)
         VALUES ('c', 'p', 'away', 't', 1, 'conv-late');
         UPDATE director.scores SET scorecard_id = 'away' WHERE score_id = 'wanderer';
         UPDATE director.scores SET comment = 'later' WHERE score_id = 'wanderer';",
    )
    .await?;
    // Both score changes wait behind the card, which waits for its conversation: the score's
    // parked entry is the second change (the first was superseded while parked).
    let later = wait::until("the update to reach the topic", DEADLINE, || async {
        let events = scoresync_tests::kafka::read_events(&env.kafka, &env.kafka.change_topic)?;
        Ok(events
            .iter()
            .find(|p| {
                p.event.new_row.as_ref().and_then(|r| r.column("comment")).is_some_and(|c| {
                    scoresync_tests::kafka::value_text(c.value.as_ref()).as_deref() == Some("later")
                })
            })
            .map(|p| (p.partition, p.offset)))
    })
    .await?;
    wait::until(
        "the later score change to park, superseding the re-parenting",
        DEADLINE,
        || async {
            let s = crate::sink::status(&env).await?;
            let events = s["sink"]["parked"]["events"].as_array().cloned().unwrap_or_default();
            let parked = |(partition, offset): (i32, i64)| {
                events.iter().any(|e| e["partition"] == partition && e["offset"] == offset)
            };
            let scores = events.iter().filter(|e| e["table"] == "director.scores").count();
            Ok((parked(later) && scores == 1).then_some(()))
        },
    )
    .await?;
    crate::sink::add_conversation(&env, 1, "c", "p", "conv-late", 1_700_000_000, "en").await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    daemon.terminate(DEADLINE).await?;
    Ok(())
}
