//! Row versions (issue 8.4, DESIGN.md rule 11): two different changes of one row never share a
//! version, and versions never go backwards for the life of the ClickHouse data.

use std::time::Duration;

use anyhow::{Context, ensure};
use rdkafka::message::Message;

use scoresync_sink::dlq::{DeadLetters, Origin};
use scoresync_tests::kafka::{read_topic, value_text};
use scoresync_tests::oracle::wait_until_consistent;
use scoresync_tests::postgres::PrivatePostgres;
use scoresync_tests::{Daemon, TestEnv, wait};

use crate::sink::{loadgen, status};
use crate::source::{lsn_now, setup};

const DEADLINE: Duration = Duration::from_secs(180);

/// Waits until the sink group has committed every message of the change topic.
async fn drained(env: &TestEnv) -> anyhow::Result<()> {
    wait::until("the sink to commit every message", DEADLINE, || async {
        Ok((status(env).await?["kafka"]["lag"] == 0).then_some(()))
    })
    .await
}

/// The comment of every live copy of score `id`, on every shard, read with FINAL.
async fn stored_score_comment(env: &TestEnv, id: &str) -> anyhow::Result<Vec<Option<String>>> {
    let mut out = Vec::new();
    for shard in 0..env.clickhouse.shards.len() {
        let comments: Vec<Option<String>> = env
            .shard(shard)
            .query("SELECT comment FROM scores FINAL WHERE score_id = ? AND _deleted = 0")
            .bind(id)
            .fetch_all()
            .await?;
        out.extend(comments);
    }
    Ok(out)
}

/// An earlier change of a row, dead-lettered and redriven after a later change of the same row
/// in the same transaction was applied, must not replace it. With one version per transaction
/// the two tie, and ClickHouse keeps whichever it was given last: the redriven, older one.
#[tokio::test]
async fn a_redriven_earlier_change_of_one_transaction_never_wins() -> anyhow::Result<()> {
    let env = TestEnv::new("versions_redrive").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let daemon = Daemon::start(&env, &["run"])?;
    pg.batch_execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type, process_interaction_at)
         VALUES ('c', 'p', 'card', 't', 2, '2026-01-01 00:00:01+00');
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id)
         VALUES ('c', 'p', 'twice', 'card', 'k1');
         BEGIN;
         UPDATE director.scores SET comment = 'first' WHERE score_id = 'twice';
         UPDATE director.scores SET comment = 'second' WHERE score_id = 'twice';
         COMMIT;",
    )
    .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;

    // The first of the two changes, dead-lettered as the sink does it, then redriven.
    let mut first = None;
    read_topic(&env.kafka, &env.kafka.change_topic, |m| {
        let payload = m.payload().unwrap_or_default();
        let event = scoresync_event::decode(payload)?;
        let comment = event.new_row.as_ref().and_then(|row| {
            row.columns
                .iter()
                .find(|c| c.name == "comment")
                .and_then(|c| value_text(c.value.as_ref()))
        });
        if event.table == "scores" && comment.as_deref() == Some("first") {
            first =
                Some((m.partition(), m.offset(), m.key().map(<[u8]>::to_vec), payload.to_vec()));
        }
        Ok(())
    })?;
    let (partition, offset, key, payload) = first.context("the 'first' change on the topic")?;
    let origin = Origin {
        topic: &env.kafka.change_topic,
        partition,
        offset,
        key: key.as_deref(),
        payload: &payload,
    };
    DeadLetters::new(&env.kafka)?
        .send(&origin, "test: an earlier change of the transaction, dead-lettered")?
        .await?
        .map_err(|(e, _)| e)?;
    let mut redrive = Daemon::start(&env, &["dlq", "redrive"])?;
    ensure!(redrive.wait(DEADLINE).await?.success(), "redrive: {}", redrive.output());
    ensure!(redrive.output().contains("redrove 1 dead letter"), "{}", redrive.output());
    drained(&env).await?;

    assert_eq!(stored_score_comment(&env, "twice").await?, vec![Some("second".to_owned())]);
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    daemon.terminate(DEADLINE).await?;
    Ok(())
}

/// A rebuilt primary (a new `initdb`, its LSNs starting low again) takes over with `setup
/// --recreate-slot` against the same ClickHouse: its snapshot and every later update must show.
/// With versions taken straight from LSNs, ClickHouse keeps the old rows for ever.
#[tokio::test]
async fn a_slot_recreated_on_a_new_cluster_keeps_versions_rising() -> anyhow::Result<()> {
    let mut env = TestEnv::new("versions_new_cluster").await?;
    setup(&env).await?;
    let old = env.pg_admin().await?;
    let rebuilt = PrivatePostgres::start(env.dir().join("rebuilt-postgres"))?;
    rebuilt.create_database(&env.name)?;
    let fresh_lsn = {
        let sql =
            scoresync_source::connect::ConnectParams::parse(&rebuilt.url("postgres", &env.name))?
                .connect_sql()
                .await?;
        lsn_now(&sql).await?
    };
    // The old cluster's WAL must be well ahead of the new one's for this to mean anything: move
    // it on by whole segments if the stack is young.
    old.batch_execute("CREATE TABLE IF NOT EXISTS public.wal_filler (x int)").await?;
    while lsn_now(&old).await? < fresh_lsn + (256 << 20) {
        old.batch_execute("INSERT INTO public.wal_filler VALUES (1); SELECT pg_switch_wal();")
            .await?;
    }

    let daemon = Daemon::start(&env, &["run"])?;
    loadgen(&env, &["--scorecards", "200", "--conversations-per-shard", "5"]).await?;
    wait_until_consistent(&env, &old, DEADLINE).await?;
    daemon.terminate(DEADLINE).await?;

    // The rebuilt cluster gets the same rows (as a restore would bring them).
    let dump = std::process::Command::new("pg_dump")
        .arg(env.pg_admin_url())
        .args(["--data-only", "--schema=director"])
        .output()?;
    ensure!(dump.status.success(), "pg_dump: {}", String::from_utf8_lossy(&dump.stderr));
    let mut restore = std::process::Command::new("psql")
        .arg(rebuilt.url("postgres", &env.name))
        .args(["-q", "-v", "ON_ERROR_STOP=1"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()?;
    std::io::Write::write_all(restore.stdin.as_mut().context("psql stdin")?, &dump.stdout)?;
    drop(restore.stdin.take());
    ensure!(restore.wait()?.success(), "restoring the rows into the rebuilt cluster");

    env.postgres.url =
        scoresync_source::config::PostgresUrl::new(rebuilt.url("scoresync", &env.name));
    let mut recreate = Daemon::start(&env, &["setup", "--recreate-slot"])?;
    ensure!(recreate.wait(DEADLINE).await?.success(), "setup: {}", recreate.output());
    let new = scoresync_source::connect::ConnectParams::parse(&rebuilt.url("postgres", &env.name))?
        .connect_sql()
        .await?;
    ensure!(
        lsn_now(&new).await? < lsn_now(&old).await?,
        "the rebuilt cluster's LSNs must start below the old one's"
    );

    let daemon = Daemon::start(&env, &["run"])?;
    // Updates of rows ClickHouse already holds, a delete, and new rows.
    new.batch_execute(
        "UPDATE director.scorecards SET score = coalesce(score, 0) + 1, comment = 'rebuilt'
         WHERE scorecard_id IN (SELECT scorecard_id FROM director.scorecards ORDER BY scorecard_id LIMIT 50);
         UPDATE director.scores SET comment = 'rebuilt'
         WHERE score_id IN (SELECT score_id FROM director.scores ORDER BY score_id LIMIT 100);
         DELETE FROM director.historic_scorecard_scores
         WHERE (customer_id, profile_id, scorecard_id) IN
             (SELECT customer_id, profile_id, scorecard_id FROM director.historic_scorecard_scores LIMIT 5);",
    )
    .await?;
    let rebuilt_admin = rebuilt.url("postgres", &env.name);
    let mut more = Daemon::start(
        &env,
        &[
            "loadgen",
            "--pg-url",
            &rebuilt_admin,
            "--prefix",
            "rebuilt",
            "--scorecards",
            "50",
            "--conversations-per-shard",
            "0",
        ],
    )?;
    ensure!(more.wait(DEADLINE).await?.success(), "loadgen: {}", more.output());
    wait_until_consistent(&env, &new, DEADLINE).await?;
    daemon.terminate(DEADLINE).await?;
    Ok(())
}
