//! Events that could wait for ever: each wait must be bounded and visible, and end applied or in
//! the dead-letter topic, with the group's committed offsets at the end of the topic.

use std::time::Duration;

use anyhow::Context;

use scoresync_tests::oracle::wait_until_consistent;
use scoresync_tests::{Daemon, TestEnv, wait};

use crate::sink::{dead_letters, loadgen, status};
use crate::source::setup;

const DEADLINE: Duration = Duration::from_secs(120);

/// Waits until nothing is parked and the sink group has committed every message.
async fn settled(env: &TestEnv) -> anyhow::Result<()> {
    wait::until("nothing parked and every offset committed", DEADLINE, || async {
        let s = status(env).await?;
        let parked = s["sink"]["parked"]["events"].as_array().map_or(usize::MAX, Vec::len);
        Ok((parked == 0 && s["kafka"]["lag"] == 0).then_some(()))
    })
    .await
}

/// The rows the dead letters are about (`table:key` with key columns joined by `/`), each with
/// its error.
fn dead_rows(env: &TestEnv) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    let mut out = std::collections::BTreeMap::new();
    for letter in dead_letters(env)? {
        let event = scoresync_event::decode(&letter.payload)?;
        let row = event.new_row.as_ref().or(event.old_row.as_ref()).context("row")?;
        let (table, key) =
            scoresync_tests::kafka::row_id(&event.table, row).context("row identity")?;
        out.insert(format!("{table}:{}", key.join("/")), letter.error);
    }
    Ok(out)
}

#[tokio::test]
async fn children_of_an_unroutable_scorecard_follow_it_and_unknown_cards_wait_bounded()
-> anyhow::Result<()> {
    let env = TestEnv::new("sink_waits").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let timeout = ("SCORESYNC__SINK__UNKNOWN_SCORECARD_TIMEOUT_MS", "5000");
    let daemon = Daemon::start_with(&env, &["run"], &[timeout])?;
    pg.batch_execute(
        "BEGIN;
         -- A conversation scorecard without a conversation: it can never be routed.
         INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type) VALUES ('c', 'p', 'orphan', 't', 1);
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id)
         VALUES ('c', 'p', 'orphan-s1', 'orphan', 'k1'), ('c', 'p', 'orphan-s2', 'orphan', 'k2');
         INSERT INTO director.historic_scorecard_scores (customer_id, profile_id, scorecard_id,
             revision, criterion_id) VALUES ('c', 'p', 'orphan', 1, 'k1'), ('c', 'p', 'orphan', 1, 'k2');
         -- A score of a scorecard that exists nowhere, inserted then deleted: the delete is a no-op.
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id)
         VALUES ('c', 'p', 'ghost-s1', 'ghost', 'k1');
         COMMIT;
         DELETE FROM director.scores WHERE score_id = 'ghost-s1';
         -- A score of a scorecard that exists nowhere, never deleted: it waits, bounded.
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id)
         VALUES ('c', 'p', 'lost-s1', 'lost', 'k1');",
    )
    .await?;
    loadgen(&env, &["--scorecards", "20", "--conversations-per-shard", "5"]).await?;
    // The orphan card, its four children, and (after 5 s parked) the lost score, each at
    // least once (the source may publish a transaction twice after a restart: duplicates are
    // dead-lettered twice).
    let expected: std::collections::BTreeSet<String> = [
        "scorecards:c/p/orphan",
        "scores:c/p/orphan-s1",
        "scores:c/p/orphan-s2",
        "historic_scorecard_scores:c/p/orphan/1/k1",
        "historic_scorecard_scores:c/p/orphan/1/k2",
        "scores:c/p/lost-s1",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    wait::until("the six rows to be dead-lettered", DEADLINE, || async {
        Ok((dead_rows(&env)?.keys().cloned().collect::<std::collections::BTreeSet<_>>()
            == expected)
            .then_some(()))
    })
    .await?;
    settled(&env).await?;
    for (row, error) in dead_rows(&env)? {
        let lost = row == "scores:c/p/lost-s1";
        let why = if lost { "scorecard lost not known" } else { "no conversation_id" };
        assert!(error.contains(why), "{row}: {error}");
        if lost {
            assert!(error.contains("within 5 s"), "{error}");
        }
    }
    // The rows of the orphan and the lost score route nowhere, so the oracle expects them
    // nowhere; the lost score's delete is a no-op (its scorecard is known nowhere).
    pg.batch_execute("DELETE FROM director.scores WHERE score_id = 'lost-s1'").await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    settled(&env).await?;
    assert_eq!(dead_rows(&env)?.len(), 6, "nothing else was dead-lettered");
    drop(daemon);
    Ok(())
}

/// The value of score `id` in ClickHouse (live, on any shard).
async fn score_value(env: &TestEnv, id: &str) -> anyhow::Result<Option<f64>> {
    for shard in 0..env.clickhouse.shards.len() {
        let values: Vec<Option<f64>> = env
            .shard(shard)
            .query("SELECT numeric_value FROM scores FINAL WHERE score_id = ? AND _deleted = 0")
            .bind(id)
            .fetch_all()
            .await?;
        if let Some(value) = values.into_iter().next() {
            return Ok(value);
        }
    }
    Ok(None)
}

/// Updates score `id` to `value` and waits until ClickHouse has it.
async fn score_arrives(
    env: &TestEnv,
    pg: &tokio_postgres::Client,
    id: &str,
    value: f64,
    within: Duration,
) -> anyhow::Result<()> {
    pg.execute("UPDATE director.scores SET numeric_value = $1 WHERE score_id = $2", &[&value, &id])
        .await?;
    wait::until(&format!("score {id} = {value} in ClickHouse"), within, || async {
        Ok((score_value(env, id).await? == Some(value)).then_some(()))
    })
    .await
}

#[tokio::test]
async fn postgres_lookups_reconnect_and_never_wait_on_a_lock() -> anyhow::Result<()> {
    let env = TestEnv::new("sink_pg_lookups").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let _source = Daemon::start(&env, &["source"])?;
    let mut sink = Daemon::start(&env, &["sink"])?;
    pg.batch_execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type, process_interaction_at)
         VALUES ('c', 'p', 'a', 't', 2, to_timestamp(1700000000)),
                ('c', 'p', 'b', 't', 2, to_timestamp(1700000001));
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id,
             numeric_value) VALUES ('c', 'p', 'a1', 'a', 'k', 0), ('c', 'p', 'b1', 'b', 'k', 0);",
    )
    .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    // Card `a` disappears from ClickHouse behind the sink's back, and a new sink knows nothing:
    // its children now need PostgreSQL to learn where `a` lives.
    for shard in 0..env.clickhouse.shards.len() {
        env.shard(shard)
            .query("ALTER TABLE scorecards DELETE WHERE scorecard_id = 'a'")
            .execute()
            .await?;
    }
    wait::until("card a to be gone from ClickHouse", DEADLINE, || async {
        let mut left = 0;
        for shard in 0..env.clickhouse.shards.len() {
            let n: u64 = env
                .shard(shard)
                .query("SELECT count() FROM scorecards WHERE scorecard_id = 'a'")
                .fetch_one()
                .await?;
            left += n;
        }
        Ok((left == 0).then_some(()))
    })
    .await?;
    sink.kill9().await?;
    let _sink = Daemon::start(&env, &["sink"])?;
    score_arrives(&env, &pg, "a1", 1.0, DEADLINE).await.context("first lookup")?;

    // PostgreSQL drops every client connection of the database (as a restart does).
    pg.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
         WHERE datname = current_database() AND pid <> pg_backend_pid()
           AND backend_type = 'client backend'",
    )
    .await?;
    score_arrives(&env, &pg, "a1", 2.0, DEADLINE)
        .await
        .context("lookup after the connection broke")?;

    // A lock on the scorecards table: the lookup for `a` fails after lock_timeout and parks;
    // everything else goes on meanwhile.
    let locker = env.pg_admin().await?;
    locker.batch_execute("BEGIN; LOCK TABLE director.scorecards IN ACCESS EXCLUSIVE MODE").await?;
    pg.execute("UPDATE director.scores SET numeric_value = 3 WHERE score_id = 'a1'", &[]).await?;
    score_arrives(&env, &pg, "b1", 3.0, Duration::from_secs(30))
        .await
        .context("other changes must not wait behind a lookup that waits for a lock")?;
    assert_eq!(score_value(&env, "a1").await?, Some(2.0), "a1 waits for the lock");
    locker.batch_execute("COMMIT").await?;
    wait::until("a1 once the lock is gone", DEADLINE, || async {
        Ok((score_value(&env, "a1").await? == Some(3.0)).then_some(()))
    })
    .await?;

    // Card `a` written again, so the oracle can hold.
    pg.execute("UPDATE director.scorecards SET score = 1 WHERE scorecard_id = 'a'", &[]).await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    settled(&env).await?;
    Ok(())
}

/// The sink's `rejected_inserts` in `scoresync status --json`.
async fn refused(env: &TestEnv) -> anyhow::Result<Vec<serde_json::Value>> {
    let s = status(env).await?;
    Ok(s["sink"]["rejected_inserts"].as_array().cloned().unwrap_or_default())
}

#[tokio::test]
async fn an_insert_clickhouse_refuses_is_retried_and_shown_until_the_table_takes_it()
-> anyhow::Result<()> {
    let env = TestEnv::new("sink_refused").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    // /healthz fails after 3 s of failing inserts (120 s by default).
    let daemon = Daemon::start_with(&env, &["run"], &[("SCORESYNC__METRICS__STALL_SECONDS", "3")])?;
    pg.batch_execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type, process_interaction_at)
         VALUES ('c', 'p', 'card', 't', 2, to_timestamp(1700000000));
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id,
             numeric_value) VALUES ('c', 'p', 's1', 'card', 'k', 1);",
    )
    .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    // The column's type changes under the sink: the rows it sends no longer parse.
    let shard0 = env.shard(0);
    shard0
        .query("ALTER TABLE scores MODIFY COLUMN numeric_value Nullable(String)")
        .execute()
        .await?;
    pg.execute("UPDATE director.scores SET numeric_value = 2 WHERE score_id = 's1'", &[]).await?;
    wait::until("the refusal to show in status", DEADLINE, || async {
        let shown = refused(&env).await?.iter().any(|r| {
            r["shard"] == 0
                && r["table"] == "scores"
                && !r["error"].as_str().unwrap_or("").is_empty()
        });
        Ok(shown.then_some(()))
    })
    .await?;
    let metrics = crate::sink::http_get(&format!("http://{}/metrics", env.metrics_listen)).await?;
    assert!(
        metrics.contains("scoresync_sink_insert_rejected{shard=\"0\",table=\"scores\"} 1"),
        "{metrics}"
    );
    assert!(
        daemon.output().contains("clickhouse refuses the insert")
            && daemon.output().contains("shard=0")
            && daemon.output().contains("table=\"scores\""),
        "one clear error line naming shard and table"
    );
    let healthz = format!("http://{}/healthz", env.metrics_listen);
    wait::until("/healthz to name the failing shard", DEADLINE, || async {
        let answer = reqwest::get(&healthz).await?;
        let (code, body) = (answer.status(), answer.text().await?);
        Ok((code == 503 && body.contains("shard 0")).then_some(()))
    })
    .await?;
    // The table takes the rows again: the retried insert lands, the state clears.
    shard0
        .query("ALTER TABLE scores MODIFY COLUMN numeric_value Nullable(Float64)")
        .execute()
        .await?;
    wait::until("the refusal to clear", DEADLINE, || async {
        Ok(refused(&env).await?.is_empty().then_some(()))
    })
    .await?;
    wait::until("/healthz to answer ok again", DEADLINE, || async {
        Ok(reqwest::get(&healthz).await?.status().is_success().then_some(()))
    })
    .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    settled(&env).await?;
    Ok(())
}
