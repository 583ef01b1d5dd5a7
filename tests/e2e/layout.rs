//! The change topic's layout (`scoresync_event::layout`): `setup` makes it compacted, every
//! message sits in its scorecard's partition under its row's key, and tombstones follow deletes
//! and rows that left a partition, so compaction keeps each row's newest state and nothing else.

use std::time::Duration;

use anyhow::Context;
use rdkafka::message::{Headers, Message};

use scoresync_bus::config::CleanupPolicy;
use scoresync_event::{Operation, RowAddress, ScorecardKey, SourceTable, truncate_key};
use scoresync_tests::oracle::wait_until_consistent;
use scoresync_tests::{Daemon, TestEnv};

use crate::sink::loadgen;
use crate::source::setup;

const DEADLINE: Duration = Duration::from_secs(180);

/// A message of the change topic as stored: an event or a tombstone.
struct Stored {
    partition: i32,
    offset: i64,
    key: Vec<u8>,
    /// `None` for a tombstone.
    event: Option<scoresync_event::ChangeEvent>,
    /// A tombstone's version header.
    tombstone_version: Option<u64>,
}

fn read_stored(env: &TestEnv) -> anyhow::Result<Vec<Stored>> {
    let mut out = Vec::new();
    scoresync_tests::kafka::read_topic(&env.kafka, &env.kafka.change_topic, |message| {
        let header = message.headers().and_then(|headers| {
            headers
                .iter()
                .find(|h| h.key == scoresync_event::TOMBSTONE_VERSION_HEADER)
                .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok())
        });
        out.push(Stored {
            partition: message.partition(),
            offset: message.offset(),
            key: message.key().context("every message has a key")?.to_vec(),
            event: message.payload().map(scoresync_event::decode).transpose()?,
            tombstone_version: header,
        });
        Ok(())
    })?;
    Ok(out)
}

/// The change topic's configs as the broker describes them.
async fn topic_configs(
    env: &TestEnv,
) -> anyhow::Result<std::collections::BTreeMap<String, String>> {
    Ok(scoresync_bus::topics::describe(&env.kafka, &env.kafka.change_topic).await?)
}

#[tokio::test]
async fn the_change_topic_is_compacted_and_every_message_sits_at_its_rows_address()
-> anyhow::Result<()> {
    let mut env = TestEnv::new("layout").await?;
    env.kafka.change_cleanup_policy = CleanupPolicy::Compact;
    setup(&env).await?;
    let configs = topic_configs(&env).await?;
    for (key, value) in [
        ("cleanup.policy", "compact"),
        ("min.compaction.lag.ms", "604800000"),
        ("delete.retention.ms", "604800000"),
    ] {
        assert_eq!(configs.get(key).map(String::as_str), Some(value), "{key}: {configs:?}");
    }

    let pg = env.pg_admin().await?;
    let _daemon = Daemon::start(&env, &["run"])?;
    loadgen(&env, &["--scorecards", "80", "--conversations-per-shard", "5"]).await?;
    // A score re-parented to a card of the same customer and profile in another partition.
    let partitions = env.kafka.partitions;
    let cards = pg
        .query(
            "SELECT s.customer_id, s.profile_id, s.score_id, s.scorecard_id, c.scorecard_id
             FROM director.scores s JOIN director.scorecards c
               ON c.customer_id = s.customer_id AND c.profile_id = s.profile_id
                  AND c.scorecard_id <> s.scorecard_id",
            &[],
        )
        .await?;
    let (customer, profile, score_id, from, to) = cards
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .find(|(customer, profile, _, from, to): &(String, String, String, String, String)| {
            let card = |id: &str| ScorecardKey {
                customer_id: customer.clone(),
                profile_id: profile.clone(),
                scorecard_id: id.to_owned(),
            };
            card(from).partition(partitions) != card(to).partition(partitions)
        })
        .context("a score and a card in another partition")?;
    pg.execute(
        "UPDATE director.scores SET scorecard_id = $1
         WHERE customer_id = $2 AND profile_id = $3 AND score_id = $4",
        &[&to, &customer, &profile, &score_id],
    )
    .await?;
    pg.batch_execute("TRUNCATE director.historic_scorecard_scores").await?;
    wait_until_consistent(&env, &pg, DEADLINE).await?;

    let stored = read_stored(&env)?;
    let mut deletes = 0;
    for (i, message) in stored.iter().enumerate() {
        let Some(event) = &message.event else { continue };
        let at = format!("partition {} offset {}", message.partition, message.offset);
        if event.op() == Operation::Truncate {
            let table = SourceTable::from_name(&event.schema, &event.table).context("table")?;
            assert_eq!(message.key, truncate_key(table), "TRUNCATE key at {at}");
            continue;
        }
        let address = RowAddress::of_event(event).with_context(|| format!("address at {at}"))?;
        assert_eq!(message.key, address.key, "row key at {at}");
        assert_eq!(message.partition, address.partition(partitions), "partition at {at}");
        if event.op() == Operation::Delete {
            deletes += 1;
            let tombstone = stored[i + 1..].iter().find(|t| {
                t.partition == message.partition && t.key == message.key && t.event.is_none()
            });
            let tombstone =
                tombstone.with_context(|| format!("a tombstone after the DELETE {at}"))?;
            assert_eq!(tombstone.tombstone_version, Some(event.version), "its version, {at}");
        }
    }
    assert!(deletes > 0, "loadgen deleted rows");

    // The re-parented score left a tombstone for its key in its old card's partition.
    let old = ScorecardKey {
        customer_id: customer.clone(),
        profile_id: profile.clone(),
        scorecard_id: from,
    };
    let key = format!("director.scores\0{customer}\0{profile}\0{score_id}").into_bytes();
    assert!(
        stored
            .iter()
            .any(|m| m.event.is_none() && m.partition == old.partition(partitions) && m.key == key),
        "a tombstone for score {score_id} in partition {}",
        old.partition(partitions)
    );

    // `setup` with another policy reports the difference and leaves the topic as it is.
    env.kafka.change_cleanup_policy = CleanupPolicy::Delete;
    let output = setup(&env).await?;
    let topic = &env.kafka.change_topic;
    assert!(
        output.contains(&format!(
            "differs  kafka topic {topic}: cleanup.policy is compact, scoresync would set delete"
        )),
        "{output}"
    );
    assert!(
        output.contains("--add-config cleanup.policy=delete,retention.ms=604800000"),
        "{output}"
    );
    assert_eq!(
        topic_configs(&env).await?.get("cleanup.policy").map(String::as_str),
        Some("compact")
    );
    Ok(())
}
