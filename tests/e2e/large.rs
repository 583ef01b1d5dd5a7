//! Large rows (issue 8.1, DESIGN.md rule 12): a row of hundreds of KB replicates, and one past
//! `kafka.max_message_bytes` halts the source at once with a message that says what to raise,
//! never a restart loop; raised, it resumes with nothing lost.

use std::time::Duration;

use anyhow::ensure;

use scoresync_tests::oracle::wait_until_consistent;
use scoresync_tests::{Daemon, TestEnv};

use crate::sink::{loadgen, status};
use crate::source::setup;

const DEADLINE: Duration = Duration::from_secs(180);

/// A comment of about 600 KB of random hex: neither PostgreSQL's TOAST compression nor lz4 makes
/// much of it, and it is stored out of line.
const BIG_COMMENT: &str =
    "(SELECT string_agg(md5(random()::text), '') FROM generate_series(1, 19000))";

#[tokio::test]
async fn a_600_kb_row_replicates_and_one_past_the_limit_halts_the_source_until_raised()
-> anyhow::Result<()> {
    let env = TestEnv::new("large_rows").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let daemon = Daemon::start(&env, &["run"])?;
    // Inserted; updated in another column (the comment travels as an unchanged TOAST value in the
    // new tuple and whole in the old one); updated in the comment itself (whole in both tuples:
    // 1.2 MB when an event carried both); then more changes behind it.
    pg.batch_execute(&format!(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id,
             scorecard_type, process_interaction_at, comment)
         VALUES ('c', 'p', 'big', 't', 2, '2026-01-01 00:00:00+00', {BIG_COMMENT});
         UPDATE director.scorecards SET score = 51 WHERE scorecard_id = 'big';
         UPDATE director.scorecards SET comment = comment || '!' WHERE scorecard_id = 'big';
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id)
         VALUES ('c', 'p', 'big-s1', 'big', 'k1');"
    ))
    .await?;
    let size: i32 = pg
        .query_one(
            "SELECT length(comment) FROM director.scorecards WHERE scorecard_id = 'big'",
            &[],
        )
        .await?
        .get(0);
    ensure!(size > 600_000, "the comment is {size} bytes");
    loadgen(&env, &["--scorecards", "30", "--conversations-per-shard", "5"]).await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    daemon.terminate(DEADLINE).await?;

    // With the limit below the event's size, the source halts at once, naming what to raise.
    let limit = ("SCORESYNC__KAFKA__MAX_MESSAGE_BYTES", "262144");
    let mut low = Daemon::start_with(&env, &["run"], &[limit])?;
    pg.batch_execute("UPDATE director.scorecards SET score = 52 WHERE scorecard_id = 'big'")
        .await?;
    let exit = low.wait(Duration::from_secs(60)).await?;
    let output = low.output();
    ensure!(!exit.success(), "the source must exit non-zero: {output}");
    for needed in [
        "director.scorecards",
        "scorecard_id=big",
        "larger than kafka.max_message_bytes = 262144",
        "Raise kafka.max_message_bytes",
    ] {
        ensure!(output.contains(needed), "the error names {needed:?}: {output}");
    }
    ensure!(
        output.matches("restarting").count() == 0,
        "a too-large event is not retried: {output}"
    );
    let halted = status(&env).await?["source"]["halted"].as_str().unwrap_or_default().to_owned();
    ensure!(
        halted.contains("larger than kafka.max_message_bytes = 262144"),
        "status shows why the source halted: {halted:?}"
    );

    // Raised (the default again), it resumes where it stopped: the update arrives.
    let daemon = Daemon::start(&env, &["run"])?;
    pg.batch_execute(
        "INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id)
         VALUES ('c', 'p', 'big-s2', 'big', 'k2');",
    )
    .await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    let score: Option<f64> = env
        .shard(0)
        .query("SELECT score FROM scorecards FINAL WHERE scorecard_id = 'big' AND _deleted = 0")
        .fetch_one()
        .await?;
    assert_eq!(
        score,
        Some(52.0),
        "the update refused at the low limit arrived after it was raised"
    );
    assert_eq!(status(&env).await?["source"]["halted"], serde_json::Value::Null, "cleared");
    daemon.terminate(DEADLINE).await?;
    Ok(())
}

/// A poison message larger than the dead-letter topic takes (issue 8.1): its letter is written
/// with the payload cut to fit and the origin kept, the sink stays up, and redrive passes over it.
#[tokio::test]
async fn a_dead_letter_too_large_for_its_topic_is_cut_to_fit_with_its_origin() -> anyhow::Result<()>
{
    use rdkafka::message::Message;
    use rdkafka::producer::FutureRecord;

    let env = TestEnv::new("large_dead_letter").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    // 300 KB of garbage, produced with a larger limit than the sink's 256 KiB.
    let mut roomy = env.kafka.clone();
    roomy.max_message_bytes = 1 << 20;
    let producer = scoresync_bus::client::producer(&roomy)?;
    let garbage = vec![0xff_u8; 300_000];
    let delivery = producer
        .send(
            FutureRecord::to(&env.kafka.change_topic).key("big").payload(&garbage),
            Duration::from_secs(10),
        )
        .await
        .map_err(|(e, _)| e)?;
    let (partition, offset) = (delivery.partition, delivery.offset);
    let limit = ("SCORESYNC__KAFKA__MAX_MESSAGE_BYTES", "262144");
    let mut daemon = Daemon::start_with(&env, &["run"], &[limit])?;
    loadgen(&env, &["--scorecards", "20", "--conversations-per-shard", "5"]).await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;
    ensure!(daemon.is_running(), "the sink stays up: {}", daemon.output());

    let mut letters = Vec::new();
    scoresync_tests::kafka::read_topic(&env.kafka, &env.kafka.dlq_topic, |m| {
        let h = |name| scoresync_sink::dlq::header(m, name).map(str::to_owned);
        letters.push((
            h(scoresync_sink::dlq::ORIGIN_PARTITION),
            h(scoresync_sink::dlq::ORIGIN_OFFSET),
            h(scoresync_sink::dlq::PAYLOAD_CUT_FROM),
            m.payload().map_or(0, <[u8]>::len),
        ));
        Ok(())
    })?;
    ensure!(letters.len() == 1, "one dead letter: {letters:?}");
    let (p, o, cut_from, size) = letters.remove(0);
    ensure!(p == Some(partition.to_string()) && o == Some(offset.to_string()), "origin kept");
    ensure!(cut_from.as_deref() == Some("300000"), "the original size is recorded: {cut_from:?}");
    ensure!(size < 262_144, "the payload was cut to fit: {size} bytes");

    let mut redrive = Daemon::start_with(&env, &["dlq", "redrive"], &[limit])?;
    ensure!(redrive.wait(DEADLINE).await?.success(), "redrive: {}", redrive.output());
    ensure!(redrive.output().contains("redrove 0 dead letter"), "{}", redrive.output());
    daemon.terminate(DEADLINE).await?;
    Ok(())
}
