//! The source role against real PostgreSQL and the broker, driving the `scoresync` binary:
//! `setup`, then `source`, then read the change topic back.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, ensure};
use secrecy::ExposeSecret;

use scoresync_event::v1::value::Kind;
use scoresync_event::{Operation, ScorecardKey};
use scoresync_source::config::PostgresUrl;
use scoresync_tests::kafka::{Published, diff, fold, pg_state, read_events, value_text};
use scoresync_tests::{Daemon, TestEnv, wait};

const DEADLINE: Duration = Duration::from_secs(60);

/// Runs `scoresync setup` and checks it succeeded.
pub async fn setup(env: &TestEnv) -> anyhow::Result<String> {
    let mut daemon = Daemon::start(env, &["setup"])?;
    let status = daemon.wait(DEADLINE).await?;
    let output = daemon.output();
    ensure!(status.success(), "setup failed: {output}");
    Ok(output)
}

/// Reads the change topic until `done` holds for what was read.
pub async fn wait_for_events(
    env: &TestEnv,
    what: &str,
    deadline: Duration,
    done: impl Fn(&[Published]) -> bool,
) -> anyhow::Result<Vec<Published>> {
    wait::until(what, deadline, || async {
        let kafka = env.kafka.clone();
        let events =
            tokio::task::spawn_blocking(move || read_events(&kafka, &kafka.change_topic)).await??;
        Ok(done(&events).then_some(events))
    })
    .await
}

/// Waits until the change topic holds at least `n` messages; returns how many it holds.
async fn wait_for_count(env: &TestEnv, what: &str, n: i64) -> anyhow::Result<i64> {
    wait::until(what, DEADLINE, || async {
        let kafka = env.kafka.clone();
        let count = tokio::task::spawn_blocking(move || {
            scoresync_tests::kafka::message_count(&kafka, &kafka.change_topic)
        })
        .await??;
        Ok((count >= n).then_some(count))
    })
    .await
}

/// Folds `events` and asserts they equal PostgreSQL now.
async fn assert_bus_matches(
    events: &[Published],
    pg: &tokio_postgres::Client,
) -> anyhow::Result<()> {
    let problems = diff(&fold(events), &pg_state(pg).await?);
    assert!(problems.is_empty(), "bus and PostgreSQL differ: {problems:#?}");
    Ok(())
}

/// A test database with `setup` done and `scoresync source` running. Fields drop in order: the
/// source stops before the test's database goes.
struct Streaming {
    source: Daemon,
    pg: tokio_postgres::Client,
    env: TestEnv,
}

async fn streaming(label: &str) -> anyhow::Result<Streaming> {
    let env = TestEnv::new(label).await?;
    setup(&env).await?;
    let source = Daemon::start(&env, &["source"])?;
    let pg = env.pg_admin().await?;
    Ok(Streaming { source, pg, env })
}

/// Events that are row changes of `table` (no snapshot rows).
fn changes<'a>(events: &'a [Published], table: &str) -> Vec<&'a Published> {
    events
        .iter()
        .filter(|p| p.event.table == table && p.event.op() != Operation::Snapshot)
        .collect()
}

fn text_of(p: &Published, column: &str) -> Option<String> {
    let row = p.event.new_row.as_ref().or(p.event.old_row.as_ref())?;
    value_text(row.column(column).and_then(|c| c.value.as_ref()))
}

/// The WAL position of `sql`'s cluster now (`pg_current_wal_lsn()`).
pub async fn lsn_now(sql: &tokio_postgres::Client) -> anyhow::Result<u64> {
    let text: String = sql.query_one("SELECT pg_current_wal_lsn()::text", &[]).await?.get(0);
    Ok(text.parse::<scoresync_event::Lsn>()?.0)
}

#[tokio::test]
async fn changes_of_all_three_tables_arrive_in_commit_order_with_keys_values_and_lsns()
-> anyhow::Result<()> {
    // Bindings drop in reverse order: the source stops before the test environment goes.
    let Streaming { env, pg, source: _source } = streaming("src_order").await?;

    // One CreateScorecard-like transaction: a process card, 5 scores, 5 historic scores.
    let before = lsn_now(&pg).await?;
    let mut statements = vec![
        "BEGIN".to_owned(),
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id, scorecard_type, \
         process_interaction_at, score, agent_user_id, created_at) VALUES ('c', 'p', 'card-1', 'tmpl', 2, \
         '2024-05-01 10:00:00.123456+00', 87.5, 'agent-7', '2024-05-01 10:00:01+00')"
            .to_owned(),
    ];
    for i in 0..5 {
        statements.push(format!(
            "INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id, \
             numeric_value, ai_scored) VALUES ('c', 'p', 'score-{i}', 'card-1', 'crit-{i}', {i}.5, {})",
            i % 2 == 0
        ));
        statements.push(format!(
            "INSERT INTO director.historic_scorecard_scores (customer_id, profile_id, scorecard_id, revision, \
             criterion_id, score_id, numeric_value, not_applicable, scored_at) VALUES ('c', 'p', 'card-1', 1, \
             'crit-{i}', 'score-{i}', {i}.5, false, '2024-05-01 10:00:02+00')"
        ));
    }
    statements.push("COMMIT".into());
    pg.batch_execute(&statements.join(";\n")).await?;
    let after_create = lsn_now(&pg).await?;
    // Then updates and deletes on each table, in separate transactions.
    pg.batch_execute("UPDATE director.scores SET numeric_value = 9.75 WHERE score_id = 'score-1'")
        .await?;
    pg.batch_execute("UPDATE director.scorecards SET score = 90 WHERE scorecard_id = 'card-1'")
        .await?;
    pg.batch_execute("UPDATE director.historic_scorecard_scores SET not_applicable = true WHERE criterion_id = 'crit-2'").await?;
    pg.batch_execute("DELETE FROM director.scores WHERE score_id = 'score-4'").await?;
    pg.batch_execute(
        "DELETE FROM director.historic_scorecard_scores WHERE criterion_id = 'crit-3'",
    )
    .await?;
    pg.batch_execute("DELETE FROM director.scorecards WHERE scorecard_id = 'card-1'").await?;

    let events = wait_for_events(&env, "16 inserts and 6 later changes", DEADLINE, |events| {
        events.iter().filter(|p| p.event.op() != Operation::Snapshot).count() >= 17
            && events
                .iter()
                .any(|p| p.event.op() == Operation::Delete && p.event.table == "scorecards")
    })
    .await?;
    let events: Vec<&Published> =
        events.iter().filter(|p| p.event.op() != Operation::Snapshot).collect();

    // All of card-1's changes share its partition, each under its row's key, in commit order.
    let key = ScorecardKey {
        customer_id: "c".into(),
        profile_id: "p".into(),
        scorecard_id: "card-1".into(),
    };
    let partition = key.partition(env.kafka.partitions);
    for p in &events {
        assert_eq!(p.partition, partition, "every change of card-1 in its partition");
        let address = scoresync_event::RowAddress::of_event(&p.event).context("row address")?;
        assert_eq!(p.key.as_deref(), Some(address.key.as_slice()), "keyed by its row");
    }
    let order: Vec<(u64, u32)> =
        events.iter().map(|p| (p.event.commit_lsn, p.event.seq_in_tx)).collect();
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(order, sorted, "offset order is commit order");

    // The CreateScorecard transaction: 11 inserts, one commit LSN within the window, seq 0..11.
    let create: Vec<&&Published> =
        events.iter().filter(|p| p.event.op() == Operation::Insert).collect();
    assert_eq!(create.len(), 11);
    let commit_lsn = create[0].event.commit_lsn;
    assert!(
        before < commit_lsn && commit_lsn < after_create,
        "commit LSN inside the transaction window"
    );
    for (i, p) in create.iter().enumerate() {
        assert_eq!(p.event.commit_lsn, commit_lsn);
        assert_eq!(p.event.seq_in_tx, i as u32);
        assert_eq!(p.event.xid, create[0].event.xid);
        assert!(
            p.event.change_lsn >= before && p.event.change_lsn < commit_lsn,
            "change {i} at {:X} outside ({before:X}, {commit_lsn:X})",
            p.event.change_lsn
        );
        assert!(p.event.commit_time_us > 1_700_000_000_000_000, "commit time is a Unix time");
        assert_eq!(
            p.timestamp_ms,
            Some(p.event.commit_time_us / 1_000),
            "Kafka timestamp = commit time"
        );
    }
    let card = create[0];
    assert_eq!(card.event.table, "scorecards");
    let row = card.event.new_row.as_ref().context("new row")?;
    let kind =
        |name: &str| row.column(name).and_then(|c| c.value.as_ref()).and_then(|v| v.kind.clone());
    assert_eq!(kind("scorecard_type"), Some(Kind::Int(2)));
    assert_eq!(kind("score"), Some(Kind::Float(87.5)));
    assert_eq!(kind("process_interaction_at"), Some(Kind::TimestampUs(1_714_557_600_123_456)));
    assert!(matches!(kind("comment"), Some(Kind::Null(_))));
    let names: Vec<&str> = card.event.key.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["customer_id", "profile_id", "scorecard_id"]);
    assert_eq!(
        changes(&events.iter().map(|p| (*p).clone()).collect::<Vec<_>>(), "scores").len(),
        5 + 2
    );
    let score1 = create
        .iter()
        .find(|p| text_of(p, "score_id").as_deref() == Some("score-1"))
        .context("score-1")?;
    assert_eq!(text_of(score1, "ai_scored").as_deref(), Some("false"));

    // The later transactions, each its own commit LSN, increasing.
    let later: Vec<(&str, Operation)> =
        events[11..].iter().map(|p| (p.event.table.as_str(), p.event.op())).collect();
    assert_eq!(
        later,
        [
            ("scores", Operation::Update),
            ("scorecards", Operation::Update),
            ("historic_scorecard_scores", Operation::Update),
            ("scores", Operation::Delete),
            ("historic_scorecard_scores", Operation::Delete),
            ("scorecards", Operation::Delete),
        ]
    );
    assert_eq!(text_of(events[11], "numeric_value").as_deref(), Some("9.75"));
    let delete_score = events[14];
    assert!(delete_score.event.old_row_is_key_only, "scores deletes carry the identity index");
    assert_eq!(text_of(delete_score, "scorecard_id").as_deref(), Some("card-1"));
    let delete_card = events[16];
    assert!(delete_card.event.old_row_is_key_only, "deletes carry the identity, not the row");
    assert_eq!(text_of(delete_card, "process_interaction_at").as_deref(), Some("1714557600123456"));
    let old = delete_card.event.old_row.as_ref().context("old row")?;
    assert!(old.column("comment").is_none(), "no payload columns in a delete: {old:?}");
    let lsns: Vec<u64> = events[10..].iter().map(|p| p.event.commit_lsn).collect();
    assert!(lsns.windows(2).all(|w| w[0] < w[1]), "each later change commits later: {lsns:?}");

    // And the bus, folded, is PostgreSQL.
    assert_bus_matches(&read_events(&env.kafka, &env.kafka.change_topic)?, &pg).await
}

#[tokio::test]
async fn update_leaving_a_toasted_comment_unchanged_carries_it_once_filled_from_the_old_row()
-> anyhow::Result<()> {
    // Bindings drop in reverse order: the source stops before the test environment goes.
    let Streaming { env, pg, source: _source } = streaming("src_toast").await?;
    // 12.8 kB of md5 hex: too little repetition for pglz, so it is stored out of line.
    pg.batch_execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id, comment) \
         VALUES ('c', 'p', 'toasty', 't', (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i))",
    )
    .await?;
    let stored: i32 = pg
        .query_one(
            "SELECT pg_column_size(comment) FROM director.scorecards WHERE scorecard_id = 'toasty'",
            &[],
        )
        .await?
        .get(0);
    assert!(stored > 8_000, "comment is large ({stored} bytes)");
    pg.batch_execute("UPDATE director.scorecards SET score = 1 WHERE scorecard_id = 'toasty'")
        .await?;

    let events = wait_for_events(&env, "the update", DEADLINE, |e| {
        e.iter().any(|p| p.event.op() == Operation::Update)
    })
    .await?;
    let insert = events.iter().find(|p| p.event.op() == Operation::Insert).context("insert")?;
    assert_eq!(text_of(insert, "comment").map(|c| c.len()), Some(12_800));
    let update = events.iter().find(|p| p.event.op() == Operation::Update).context("update")?;
    let row = update.event.new_row.as_ref().context("row")?;
    // director.scorecards is REPLICA IDENTITY FULL: PostgreSQL resends the comment only in the
    // old tuple; the source moves it into the new row and sends no old row (nothing moved).
    assert_eq!(text_of(update, "comment").map(|c| c.len()), Some(12_800));
    assert!(row.column("comment").is_some_and(|c| c.value.as_ref().is_some_and(|v| !v.is_null())));
    assert_eq!(update.event.old_row, None, "same key and routing: no old row");
    // Folded, the comment keeps its value.
    assert_bus_matches(&events, &pg).await
}

#[tokio::test]
async fn truncate_is_published_to_every_partition() -> anyhow::Result<()> {
    // Bindings drop in reverse order: the source stops before the test environment goes.
    let Streaming { env, pg, source: _source } = streaming("src_truncate").await?;
    pg.batch_execute(
        "INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id) \
         VALUES ('c', 'p', 's1', 'card', 'k'); TRUNCATE director.scores",
    )
    .await?;
    let events = wait_for_events(&env, "truncate on every partition", DEADLINE, |e| {
        e.iter().filter(|p| p.event.op() == Operation::Truncate).count()
            >= env.kafka.partitions as usize
    })
    .await?;
    let truncates: Vec<&Published> =
        events.iter().filter(|p| p.event.op() == Operation::Truncate).collect();
    let mut partitions: Vec<i32> = truncates.iter().map(|p| p.partition).collect();
    partitions.sort();
    assert_eq!(partitions, (0..env.kafka.partitions).collect::<Vec<_>>());
    for p in &truncates {
        assert_eq!(p.event.table, "scores");
        assert!(p.event.key.is_empty() && p.event.new_row.is_none());
    }
    let insert = events.iter().find(|p| p.event.op() == Operation::Insert).context("insert")?;
    let truncate_there =
        truncates.iter().find(|p| p.partition == insert.partition).context("same partition")?;
    assert!(
        truncate_there.offset > insert.offset,
        "truncate follows the earlier insert in its partition"
    );
    assert!(fold(&events).is_empty(), "nothing left after the truncate");
    Ok(())
}

#[tokio::test]
async fn added_column_mid_stream_travels_and_the_stream_goes_on() -> anyhow::Result<()> {
    // Bindings drop in reverse order: the source stops before the test environment goes.
    let Streaming { env, pg, source: _source } = streaming("src_ddl").await?;
    let insert = |id: &str| {
        format!(
            "INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id) \
             VALUES ('c', 'p', '{id}', 'card', 'k')"
        )
    };
    pg.batch_execute(&insert("before")).await?;
    wait_for_events(&env, "the first insert", DEADLINE, |e| !e.is_empty()).await?;
    pg.batch_execute(
        "ALTER TABLE director.scores ADD COLUMN reviewer_note text, ADD COLUMN weight integer",
    )
    .await?;
    pg.batch_execute(
        "INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id, reviewer_note, weight) \
         VALUES ('c', 'p', 'after', 'card', 'k', 'looks fine', 3)",
    )
    .await?;
    pg.batch_execute(&insert("later")).await?;
    let events =
        wait_for_events(&env, "inserts after the ALTER", DEADLINE, |e| e.len() >= 3).await?;
    let after = events
        .iter()
        .find(|p| text_of(p, "score_id").as_deref() == Some("after"))
        .context("after")?;
    assert_eq!(text_of(after, "reviewer_note").as_deref(), Some("looks fine"));
    let row = after.event.new_row.as_ref().context("row")?;
    let weight = row.column("weight").context("weight column")?;
    assert_eq!(weight.type_oid, 23);
    assert_eq!(weight.value.as_ref().and_then(|v| v.as_int()), Some(3));
    let later = events
        .iter()
        .find(|p| text_of(p, "score_id").as_deref() == Some("later"))
        .context("later")?;
    assert!(text_of(later, "reviewer_note").is_none(), "NULL for rows without it");
    assert_bus_matches(&events, &pg).await
}

#[tokio::test]
async fn dropped_slot_halts_the_source_naming_the_slot_and_creates_nothing() -> anyhow::Result<()> {
    let env = TestEnv::new("src_noslot").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    pg.execute("SELECT pg_drop_replication_slot($1)", &[&env.postgres.slot]).await?;

    let mut source = Daemon::start(&env, &["source"])?;
    let status = source.wait(DEADLINE).await?;
    let output = source.output();
    assert!(!status.success(), "source must exit non-zero: {output}");
    assert!(
        output.contains(&format!("replication slot {} does not exist", env.postgres.slot)),
        "message names the slot: {output}"
    );
    let slots: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
            &[&env.postgres.slot],
        )
        .await?
        .get(0);
    assert_eq!(slots, 0, "no slot was created");

    // setup refuses too: the pipeline record says the slot existed.
    let mut again = Daemon::start(&env, &["setup"])?;
    assert!(!again.wait(DEADLINE).await?.success());
    assert!(again.output().contains("does not exist"), "{}", again.output());
    Ok(())
}

#[tokio::test]
async fn idle_slot_advances_with_heartbeats() -> anyhow::Result<()> {
    let mut env = TestEnv::new("src_idle").await?;
    env.postgres.heartbeat_interval_ms = 1_000;
    env.postgres.status_interval_ms = 200;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let confirmed = || async {
        let text: String = pg
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&env.postgres.slot],
            )
            .await?
            .get(0);
        anyhow::Ok(text.parse::<scoresync_event::Lsn>()?)
    };
    let _source = Daemon::start(&env, &["source"])?;
    // Let the (empty) snapshot finish and the stream settle, then watch an idle slot.
    wait::until("the source to stream", DEADLINE, || async {
        let active: i64 = pg
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1 AND active",
                &[&env.postgres.slot],
            )
            .await?
            .get(0);
        Ok((active == 1).then_some(()))
    })
    .await?;
    // Nothing is written to the database from here on but scoresync's own heartbeats.
    let start = confirmed().await?;
    let two_intervals = Duration::from_millis(2 * env.postgres.heartbeat_interval_ms);
    let later = wait::until("confirmed_flush_lsn to advance while idle", two_intervals, || async {
        let now = confirmed().await?;
        Ok((now > start).then_some(now))
    })
    .await?;
    assert!(later > start);
    Ok(())
}

/// Keys of `events` per table, as sets, for "everything arrived" checks.
pub fn keys(events: &[Published]) -> BTreeMap<String, std::collections::BTreeSet<Vec<String>>> {
    let mut out: BTreeMap<String, std::collections::BTreeSet<Vec<String>>> = BTreeMap::new();
    for p in events {
        let row = p.event.new_row.as_ref().or(p.event.old_row.as_ref());
        if let Some((table, key)) =
            row.and_then(|r| scoresync_tests::kafka::row_id(&p.event.table, r))
        {
            out.entry(table).or_default().insert(key);
        }
    }
    out
}

/// Reads the change topic until its fold equals PostgreSQL; returns the events.
pub async fn wait_until_bus_matches_postgres(
    env: &TestEnv,
    pg: &tokio_postgres::Client,
    deadline: Duration,
) -> anyhow::Result<Vec<Published>> {
    let last = std::sync::Mutex::new(Vec::new());
    let result = wait::until("the bus to match PostgreSQL", deadline, || async {
        let kafka = env.kafka.clone();
        let events =
            tokio::task::spawn_blocking(move || read_events(&kafka, &kafka.change_topic)).await??;
        let problems = diff(&fold(&events), &pg_state(pg).await?);
        let done = problems.is_empty();
        *last.lock().map_err(|_| anyhow::anyhow!("poisoned"))? = problems;
        Ok(done.then_some(events))
    })
    .await;
    result.map_err(|err| {
        let problems =
            last.lock().map(|p| p.iter().take(10).cloned().collect::<Vec<_>>()).unwrap_or_default();
        err.context(format!("first differences: {problems:#?}"))
    })
}

#[tokio::test]
async fn kill_9_while_a_100k_row_transaction_is_published_loses_nothing() -> anyhow::Result<()> {
    // Its own broker: 100k events read back from the stack's (every test's messages in one
    // sqlite file) take minutes late in a run.
    let (env, _broker) = TestEnv::on_own_broker("src_kill9").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let mut source = Daemon::start(&env, &["source"])?;
    // Streaming (past the empty snapshot) before the big transaction commits.
    pg.batch_execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id) VALUES ('c', 'p', 'first', 't')",
    )
    .await?;
    wait_for_events(&env, "the first insert", DEADLINE, |e| !e.is_empty()).await?;
    pg.batch_execute(
        "INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id, numeric_value) \
         SELECT 'c', 'p', 'big-' || i, 'card-' || (i % 500), 'k', i FROM generate_series(1, 100000) i",
    )
    .await?;
    let partial = wait_for_count(&env, "part of the transaction in Kafka", 5_000).await?;
    source.kill9().await?;
    assert!(
        partial < 100_000,
        "killed after {partial} of 100000 events: too late to prove anything"
    );

    // Nothing was confirmed past the unfinished transaction.
    let (confirmed, restart): (String, String) = {
        let r = pg
            .query_one(
                "SELECT confirmed_flush_lsn::text, restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&env.postgres.slot],
            )
            .await?;
        (r.get(0), r.get(1))
    };
    let events = read_events(&env.kafka, &env.kafka.change_topic)?;
    let commit = events
        .iter()
        .find(|p| p.event.table == "scores")
        .context("an insert of the big transaction")?
        .event
        .commit_lsn;
    assert!(
        confirmed.parse::<scoresync_event::Lsn>()?.0 <= commit,
        "confirmed {confirmed} passed commit {commit:X} (restart {restart})"
    );

    let _again = Daemon::start(&env, &["source"])?;
    let events = wait_until_bus_matches_postgres(&env, &pg, Duration::from_secs(300)).await?;
    let scores = keys(&events).remove("scores").unwrap_or_default();
    assert_eq!(scores.len(), 100_000, "every committed row is in Kafka at least once");
    Ok(())
}

#[tokio::test]
async fn broker_down_longer_than_wal_sender_timeout_holds_the_slot_and_loses_nothing()
-> anyhow::Result<()> {
    let (mut env, mut broker) = TestEnv::on_own_broker("src_broker").await?;
    // A walsender that gives up on a silent client after 3 s.
    env.postgres.url = PostgresUrl::new(format!(
        "{}?options=-c%20wal_sender_timeout%3D3s",
        env.postgres.url.expose_secret()
    ));
    env.postgres.status_interval_ms = 500;
    env.postgres.heartbeat_interval_ms = 1_000;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let mut source = Daemon::start(&env, &["source"])?;
    let insert = |from: i32, to: i32| {
        format!(
            "INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id) \
             SELECT 'c', 'p', 's-' || i, 'card-' || (i % 7), 'k' FROM generate_series({from}, {to}) i"
        )
    };
    pg.batch_execute(&insert(1, 100)).await?;
    wait_until_bus_matches_postgres(&env, &pg, DEADLINE).await?;
    let walsender = || async {
        let pid: Option<i32> = pg
            .query_one(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&env.postgres.slot],
            )
            .await?
            .get(0);
        anyhow::Ok(pid)
    };
    let confirmed = || async {
        let text: String = pg
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&env.postgres.slot],
            )
            .await?
            .get(0);
        anyhow::Ok(text.parse::<scoresync_event::Lsn>()?.0)
    };
    let sender_before = walsender().await?.context("no walsender")?;

    broker.kill()?;
    let outage_start = lsn_now(&pg).await?;
    pg.batch_execute(&insert(101, 300)).await?;
    // Four wal_sender_timeouts without Kafka: check the invariants all along.
    let until = tokio::time::Instant::now() + Duration::from_secs(12);
    while tokio::time::Instant::now() < until {
        let now_confirmed = confirmed().await?;
        assert!(
            now_confirmed <= outage_start,
            "confirmed_flush_lsn {now_confirmed:X} passed unacknowledged events (from {outage_start:X})"
        );
        assert_eq!(
            walsender().await?,
            Some(sender_before),
            "the walsender was replaced (timeout or restart)"
        );
        assert!(source.is_running(), "the source exited while Kafka was down: {}", source.output());
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    broker.resume()?;
    let events = wait_until_bus_matches_postgres(&env, &pg, Duration::from_secs(120)).await?;
    assert_eq!(keys(&events).remove("scores").map(|k| k.len()), Some(300));
    wait::until("the slot to move past the outage", DEADLINE, || async {
        Ok((confirmed().await? > outage_start).then_some(()))
    })
    .await?;
    assert!(source.is_running());
    Ok(())
}

#[tokio::test]
async fn snapshot_publishes_existing_rows_and_concurrent_changes_win() -> anyhow::Result<()> {
    let mut env = TestEnv::new("src_snapshot").await?;
    // Small chunks: the snapshot takes long enough for changes to land in the middle of it.
    env.extra_toml = "[source]\nsnapshot_chunk_rows = 50\n".into();
    let pg = env.pg_admin().await?;
    pg.batch_execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id, score) \
         SELECT 'c', 'p', 'card-' || i, 't', i FROM generate_series(1, 1500) i; \
         INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id, numeric_value) \
         SELECT 'c', 'p', 's-' || i, 'card-' || (i % 1500 + 1), 'k', i FROM generate_series(1, 3000) i; \
         INSERT INTO director.historic_scorecard_scores (customer_id, profile_id, scorecard_id, revision, criterion_id) \
         SELECT 'c', 'p', 'card-' || (i % 1500 + 1), i, 'k' FROM generate_series(1, 1500) i",
    )
    .await?;
    setup(&env).await?;
    let _source = Daemon::start(&env, &["source"])?;

    // Change rows while the snapshot reads: updates of rows not yet read and already read,
    // deletes, inserts.
    wait_for_count(&env, "the snapshot to start publishing", 1).await?;
    for round in 0..20 {
        pg.batch_execute(&format!(
            "UPDATE director.scorecards SET score = -{round} WHERE scorecard_id IN ('card-{a}', 'card-{b}'); \
             UPDATE director.scores SET numeric_value = -{round} WHERE score_id = 's-{c}'; \
             DELETE FROM director.scores WHERE score_id = 's-{d}'; \
             INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id) \
             VALUES ('c', 'p', 'new-{round}', 'card-1', 'k')",
            a = 1 + round * 70,
            b = 1500 - round * 11,
            c = 2999 - round * 97,
            d = 5 + round * 131,
        ))
        .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_until_bus_matches_postgres(&env, &pg, Duration::from_secs(180)).await?;
    // The bus can match PostgreSQL before the stream has published every change (a chunk read
    // after a change already carries its result): wait for the 100 changes, then compare again.
    let is_streamed = |p: &Published| p.event.op() != Operation::Snapshot;
    wait::until("the 100 concurrent changes to be streamed", DEADLINE, || async {
        let kafka = env.kafka.clone();
        let events =
            tokio::task::spawn_blocking(move || read_events(&kafka, &kafka.change_topic)).await??;
        Ok((events.iter().filter(|p| is_streamed(p)).count() >= 20 * 5).then_some(()))
    })
    .await?;
    let events = wait_until_bus_matches_postgres(&env, &pg, DEADLINE).await?;
    let snapshot_rows = events.iter().filter(|p| p.event.op() == Operation::Snapshot).count();
    assert!(snapshot_rows >= 6_000 - 20, "snapshot published {snapshot_rows} rows");
    let streamed = events.iter().filter(|p| is_streamed(p)).count();
    assert!(streamed >= 20 * 5, "the concurrent changes were streamed ({streamed})");
    // Snapshot rows rank below every streamed change.
    let version = |p: &Published| scoresync_event::RowVersion::of_event(&p.event);
    let newest_snapshot =
        events.iter().filter(|p| p.event.op() == Operation::Snapshot).map(version).max();
    let oldest_change = events.iter().filter(|p| is_streamed(p)).map(version).min();
    assert!(newest_snapshot < oldest_change, "{newest_snapshot:?} vs {oldest_change:?}");
    Ok(())
}

#[tokio::test]
async fn snapshot_killed_midway_resumes_without_losing_rows() -> anyhow::Result<()> {
    let mut env = TestEnv::new("src_snapkill").await?;
    env.extra_toml = "[source]\nsnapshot_chunk_rows = 100\n".into();
    let pg = env.pg_admin().await?;
    pg.batch_execute(
        "INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id) \
         SELECT 'c', 'p', 's-' || i, 'card-' || (i % 97), 'k' FROM generate_series(1, 20000) i",
    )
    .await?;
    setup(&env).await?;
    let mut source = Daemon::start(&env, &["source"])?;
    let partial = wait_for_count(&env, "part of the snapshot in Kafka", 2_000).await?;
    source.kill9().await?;
    assert!(partial < 20_000, "killed after {partial} rows: too late to prove a resume");
    let _again = Daemon::start(&env, &["source"])?;
    let events = wait_until_bus_matches_postgres(&env, &pg, Duration::from_secs(180)).await?;
    assert_eq!(keys(&events).remove("scores").map(|k| k.len()), Some(20_000));
    // It resumed rather than starting over: far fewer than two full passes.
    assert!(
        events.len() < 20_000 + partial as usize + 2_000,
        "{} events for 20000 rows",
        events.len()
    );
    Ok(())
}
