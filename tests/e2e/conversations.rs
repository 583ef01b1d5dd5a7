//! Conversation lookups (issue 8.5): read with FINAL; a conversation several shards hold routes
//! to the lowest of them and is reported (status, metric); the cached answer expires, and expiry
//! alone moves nothing: a card moves at its own next change, with its children.

use std::time::Duration;

use anyhow::{Context, ensure};

use scoresync_tests::oracle::wait_until_consistent;
use scoresync_tests::{Daemon, TestEnv};

use crate::sink::{add_conversation, status};
use crate::source::setup;

const DEADLINE: Duration = Duration::from_secs(180);

/// Shards holding a live copy of score `id`.
async fn score_shards(env: &TestEnv, id: &str) -> anyhow::Result<Vec<usize>> {
    let mut out = Vec::new();
    for shard in 0..env.clickhouse.shards.len() {
        let live: u64 = env
            .shard(shard)
            .query("SELECT count() FROM scores FINAL WHERE score_id = ? AND _deleted = 0")
            .bind(id)
            .fetch_one()
            .await?;
        if live > 0 {
            out.push(shard);
        }
    }
    Ok(out)
}

#[tokio::test]
async fn a_conversation_found_on_a_second_shard_is_reported_and_cards_follow_it_at_their_next_change()
-> anyhow::Result<()> {
    let env = TestEnv::new("conv_split").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let ttl = ("SCORESYNC__SINK__CONVERSATION_CACHE_TTL_MS", "300");
    let daemon = Daemon::start_with(&env, &["run"], &[ttl])?;
    add_conversation(&env, 1, "c", "p", "conv-x", 1_700_000_000, "en").await?;
    pg.batch_execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type, conversation_id)
         VALUES ('c', 'p', 'card-x', 't', 1, 'conv-x');
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id)
         VALUES ('c', 'p', 'x-s1', 'card-x', 'k1'), ('c', 'p', 'x-s2', 'card-x', 'k2');",
    )
    .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    ensure!(score_shards(&env, "x-s1").await? == vec![1], "on the conversation's shard");

    // The other pipeline writes the conversation on shard 0 too. Once the cached answer is older
    // than the TTL (300 ms), the next lookup sees both shards.
    add_conversation(&env, 0, "c", "p", "conv-x", 1_700_000_000, "fr").await?;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // A score's change follows its card, which has not changed: nothing moves.
    pg.batch_execute("UPDATE director.scores SET comment = 'rescored' WHERE score_id = 'x-s1'")
        .await?;
    scoresync_tests::wait::until("the score update to land", DEADLINE, || async {
        let comment: Option<String> = env
            .shard(1)
            .query("SELECT comment FROM scores FINAL WHERE score_id = 'x-s1' AND _deleted = 0")
            .fetch_optional()
            .await?
            .flatten();
        Ok((comment.as_deref() == Some("rescored")).then_some(()))
    })
    .await?;
    ensure!(score_shards(&env, "x-s1").await? == vec![1], "expiry alone moves nothing");

    // The card's own change looks the conversation up again: the lowest shard holding it wins,
    // and the card moves there with its scores, carrying that shard's language.
    pg.batch_execute("UPDATE director.scorecards SET score = 7 WHERE scorecard_id = 'card-x'")
        .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    ensure!(score_shards(&env, "x-s1").await? == vec![0], "moved to the lowest shard");
    let language: Option<String> = env
        .shard(0)
        .query("SELECT language_code FROM scores FINAL WHERE score_id = 'x-s2' AND _deleted = 0")
        .fetch_one()
        .await
        .context("the moved score's language")?;
    ensure!(
        language.as_deref() == Some("fr"),
        "the score carries shard 0's conversation: {language:?}"
    );

    let s = status(&env).await?;
    let split = &s["sink"]["conversations_on_several_shards"];
    ensure!(split["total"] == 1, "one conversation reported: {split}");
    ensure!(split["latest"][0]["conversation_id"] == "conv-x", "{split}");
    ensure!(split["latest"][0]["shards"] == serde_json::json!([0, 1]), "{split}");
    daemon.terminate(DEADLINE).await?;
    Ok(())
}
