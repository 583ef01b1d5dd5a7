//! `scoresync replay`: rebuilding ClickHouse from the change topic beside the running daemon.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::ensure;
use std::time::{SystemTime, UNIX_EPOCH};

use rdkafka::producer::FutureRecord;

use scoresync_bus::config::CleanupPolicy;
use scoresync_bus::offsets::OffsetReader;
use scoresync_tests::oracle::{check, wait_until_consistent};
use scoresync_tests::{Daemon, TestEnv};

use crate::sink::loadgen;
use crate::source::setup;

const DEADLINE: Duration = Duration::from_secs(300);
const TABLES: [&str; 3] = ["scorecards", "scores", "historic_scorecard_scores"];

/// Runs `scoresync replay ARGS` to its end; returns (success, stdout and stderr).
async fn replay(env: &TestEnv, args: &[&str]) -> anyhow::Result<(bool, String)> {
    let mut all = vec!["replay"];
    all.extend_from_slice(args);
    let mut run = Daemon::start(env, &all)?;
    let status = run.wait(DEADLINE).await?;
    Ok((status.success(), run.output()))
}

/// Every row of the three tables on every shard, FINAL, with its version: what a reader sees.
async fn final_rows(env: &TestEnv) -> anyhow::Result<BTreeMap<(usize, String), Vec<String>>> {
    let mut out = BTreeMap::new();
    for shard in 0..env.clickhouse.shards.len() {
        for table in TABLES {
            let sql =
                format!("SELECT toString(tuple(*)) FROM {table} FINAL ORDER BY toString(tuple(*))");
            let rows: Vec<String> = env.shard(shard).query(&sql).fetch_all().await?;
            out.insert((shard, table.to_owned()), rows);
        }
    }
    Ok(out)
}

/// The sink group's committed offsets.
fn daemon_offsets(env: &TestEnv) -> anyhow::Result<BTreeMap<i32, Option<i64>>> {
    let reader =
        OffsetReader::open(&env.kafka, &env.kafka.consumer_group, &env.kafka.change_topic)?;
    Ok(reader.committed()?)
}

#[tokio::test]
async fn a_shard_emptied_behind_the_daemons_back_is_restored_by_replay_while_load_runs()
-> anyhow::Result<()> {
    let env = TestEnv::new("replay_shard").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let _daemon = Daemon::start(&env, &["run"])?;
    loadgen(&env, &["--scorecards", "150", "--conversations-per-shard", "10"]).await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;

    // Shard 1 loses its three tables' rows behind the daemon's back.
    let mut lost = std::collections::BTreeSet::new();
    for table in TABLES {
        let keys = crate::verify::live_keys(&env, 1, table).await?;
        lost.extend(keys.into_iter().map(|k| (table.to_owned(), k, "missing".to_owned(), Some(1))));
        env.shard(1).query(&format!("TRUNCATE TABLE {table}")).execute().await?;
    }
    let broken = check(&env, &pg).await?;
    ensure!(!broken.is_empty(), "emptying shard 1 broke the oracle");
    // verify finds exactly the rows shard 1 lost.
    let v = crate::verify::verify(&env, &[]).await?;
    ensure!(v.code == 1, "verify exits 1 on drift, not {}: {}", v.code, v.stderr);
    assert_eq!(v.drift, lost, "verify reports the rows shard 1 lost, no more, no less");

    // Replay shard 1 from the start while more load arrives.
    let load = crate::sink::spawn_loadgen(
        &env,
        &["--scorecards", "150", "--conversations-per-shard", "0", "--prefix", "during"],
    )?;
    let (ok, output) = replay(&env, &["--shard", "1", "--from", "earliest"]).await?;
    ensure!(ok, "replay failed: {output}");
    ensure!(output.contains("replay: done"), "{output}");
    load.await??;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    crate::verify::verify_clean(&env, &[], "verify after the replay").await?;

    // A second replay changes nothing a reader sees, and never touches the daemon's offsets.
    let before = final_rows(&env).await?;
    let offsets = daemon_offsets(&env)?;
    let (ok, output) = replay(&env, &["--from", "earliest"]).await?;
    ensure!(ok, "second replay failed: {output}");
    assert_eq!(final_rows(&env).await?, before, "a second replay changed rows");
    assert_eq!(daemon_offsets(&env)?, offsets, "the daemon's committed offsets moved");
    Ok(())
}

#[tokio::test]
async fn replay_names_the_history_a_delete_policy_dropped_and_points_to_backfill()
-> anyhow::Result<()> {
    // A private broker: tansu applies retention when it starts. (Its sqlite storage does not
    // implement DeleteRecords: the call kills its storage task.)
    let (mut env, mut broker) = TestEnv::on_own_broker("replay_gone").await?;
    env.kafka.change_cleanup_policy = CleanupPolicy::Delete;
    env.kafka.change_retention_ms = 3_600_000;
    setup(&env).await?;
    // Two hours ago, partition 0 got two messages (tombstones will do: every consumer skips them).
    let producer = scoresync_bus::client::producer(&env.kafka)?;
    let two_hours_ago =
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64 - 7_200_000;
    for _ in 0..2 {
        let record = FutureRecord::<[u8], [u8]>::to(&env.kafka.change_topic)
            .partition(0)
            .key(b"director.scores\0old".as_slice())
            .timestamp(two_hours_ago);
        producer.send(record, Duration::from_secs(30)).await.map_err(|(e, _)| e)?;
    }
    let pg = env.pg_admin().await?;
    let daemon = Daemon::start(&env, &["run"])?;
    loadgen(&env, &["--scorecards", "40", "--conversations-per-shard", "4"]).await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    ensure!(daemon.terminate(DEADLINE).await?.success(), "the daemon stopped cleanly");
    drop(producer);

    // Restarted, tansu deletes what is older than retention.ms.
    broker.kill()?;
    broker.resume()?;
    let reader = OffsetReader::open(&env.kafka, "scoresync-test", &env.kafka.change_topic)?;
    scoresync_tests::wait::until("tansu to apply retention", DEADLINE, || async {
        Ok((reader.watermarks()?[&0].0 == 2).then_some(()))
    })
    .await?;

    let (ok, output) = replay(&env, &["--dry-run"]).await?;
    ensure!(ok, "dry run failed: {output}");
    let topic = &env.kafka.change_topic;
    let gone = format!("kafka topic {topic} partition 0: messages before offset 2 are gone");
    assert!(output.contains(&gone), "{output}");
    assert!(output.contains("`scoresync backfill`"), "{output}");
    assert!(output.contains("total: "), "the table: {output}");
    for partition in 1..env.kafka.partitions {
        let other = format!("partition {partition}: messages before");
        assert!(!output.contains(&other), "nothing is gone from partition {partition}: {output}");
    }
    // The replay itself says so before it starts, and replays what is left.
    let (ok, output) = replay(&env, &[]).await?;
    ensure!(ok && output.contains(&gone) && output.contains("replay: done"), "{output}");
    Ok(())
}

/// Messages the change topic holds now (compaction removes them from the middle, so the
/// watermarks do not tell).
fn stored_messages(env: &TestEnv) -> anyhow::Result<usize> {
    let mut count = 0;
    scoresync_tests::kafka::read_topic(&env.kafka, &env.kafka.change_topic, |_| {
        count += 1;
        Ok(())
    })?;
    Ok(count)
}

/// Shard `i`'s conversations, as SQL values.
async fn conversations(env: &TestEnv, shard: usize) -> anyhow::Result<Vec<String>> {
    let sql = "SELECT concat('(''', conversation_id, ''', ''', customer_id, ''', ''', profile_id, \
               ''', ', toString(toUInt32(conversation_start_time)), ', ''', language_code, ''')') \
               FROM conversations FINAL";
    Ok(env.shard(shard).query(sql).fetch_all().await?)
}

#[tokio::test]
async fn a_lost_shard_is_rebuilt_from_a_compacted_topic_alone() -> anyhow::Result<()> {
    let (mut env, mut broker) = TestEnv::on_own_broker("replay_compacted").await?;
    env.kafka.change_cleanup_policy = CleanupPolicy::Compact;
    let mut shards =
        scoresync_tests::clickhouse::PrivateShards::start(env.dir().join("shards"), 2)?;
    env.use_shards(shards.urls()).await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let daemon = Daemon::start(&env, &["run"])?;
    loadgen(&env, &["--scorecards", "150", "--conversations-per-shard", "10"]).await?;
    loadgen(&env, &["--scorecards", "60", "--conversations-per-shard", "0", "--prefix", "more"])
        .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    ensure!(daemon.terminate(DEADLINE).await?.success(), "the daemon stopped cleanly");

    // tansu compacts when it starts (and every 10 minutes): restart it and wait for it.
    let before = stored_messages(&env)?;
    broker.kill()?;
    broker.resume()?;
    scoresync_tests::wait::until("tansu to compact the change topic", DEADLINE, || async {
        Ok((stored_messages(&env)? < before).then_some(()))
    })
    .await?;
    let after = stored_messages(&env)?;
    eprintln!("compaction kept {after} of {before} messages");

    // Shard 1 is lost: data directory gone, started empty, conversations re-seeded, setup run.
    let seeded = conversations(&env, 1).await?;
    ensure!(!seeded.is_empty(), "shard 1 held conversations");
    shards.lose(1)?;
    setup(&env).await?;
    env.shard(1)
        .query(&format!("INSERT INTO conversations VALUES {}", seeded.join(", ")))
        .execute()
        .await?;
    ensure!(!check(&env, &pg).await?.is_empty(), "losing shard 1 broke the oracle");

    let _daemon = Daemon::start(&env, &["run"])?;
    let (ok, output) = replay(&env, &["--shard", "1"]).await?;
    ensure!(ok, "replay failed: {output}");
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    Ok(())
}
