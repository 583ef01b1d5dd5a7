//! Captures real pgoutput messages from PostgreSQL as byte fixtures for the decoder's unit tests.
//!
//! ```text
//! eval "$(deploy/local/stack env)"
//! cargo run -p scoresync-source --example capture_pgoutput > crates/source/tests/fixtures/pgoutput_v1.txt
//! ```
//!
//! Creates a scratch database with the director schema, runs a scripted workload (every change
//! kind the decoder handles) and prints one line per message: a label, then the message bytes in
//! hex. Begin, Commit and logical messages are parsed by pgwire-replication itself, so the unit
//! tests build those from the protocol documentation instead. Drops the scratch database at the end.

use std::time::Duration;

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use scoresync_source::connect::ConnectParams;

const WORKLOAD: &[(&str, &str)] = &[
    (
        "insert_scorecard",
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id, scorecard_type, process_interaction_at, score, comment, created_at) VALUES ('c1', 'p1', 'card-1', 'tmpl-1', 2, '2024-03-05 12:34:56.789012+00', 4.5, 'short', '1960-06-15 08:00:00+00')",
    ),
    (
        "insert_score",
        "INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id, numeric_value, not_applicable) VALUES ('c1', 'p1', 's-1', 'card-1', 'crit-1', NULL, true)",
    ),
    (
        "update_comment_toast",
        "UPDATE director.scorecards SET comment = (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 400) i) WHERE scorecard_id = 'card-1'",
    ),
    (
        "update_keeps_toast",
        "UPDATE director.scorecards SET score = 3.25 WHERE scorecard_id = 'card-1'",
    ),
    (
        "update_score_no_old",
        "UPDATE director.scores SET numeric_value = 1.5 WHERE score_id = 's-1'",
    ),
    (
        "update_score_moves",
        "UPDATE director.scores SET scorecard_id = 'card-2' WHERE score_id = 's-1'",
    ),
    ("delete_score_key_only", "DELETE FROM director.scores WHERE score_id = 's-1'"),
    ("delete_scorecard_full", "DELETE FROM director.scorecards WHERE scorecard_id = 'card-1'"),
    ("truncate", "TRUNCATE director.scores, director.historic_scorecard_scores RESTART IDENTITY"),
    ("add_column", "ALTER TABLE director.scores ADD COLUMN reviewer text"),
    (
        "insert_after_add_column",
        "INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id, reviewer) VALUES ('c1', 'p1', 's-2', 'card-1', 'crit-2', 'rev')",
    ),
];

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let admin_url = std::env::var("SCORESYNC_PG_ADMIN_URL")?;
    let base = admin_url.rsplit_once('/').map(|(b, _)| b.to_owned()).ok_or("bad url")?;
    let server = ConnectParams::parse(&format!("{base}/postgres"))?.connect_sql().await?;
    server.batch_execute("DROP DATABASE IF EXISTS pgoutput_capture WITH (FORCE)").await?;
    server.batch_execute("CREATE DATABASE pgoutput_capture").await?;
    let db = ConnectParams::parse(&format!("{base}/pgoutput_capture"))?;
    let sql = db.connect_sql().await?;
    for file in ["001_director_tables.sql", "002_replica_identity.sql", "003_publication.sql"] {
        let path = format!("{}/../../schemas/postgres/{file}", env!("CARGO_MANIFEST_DIR"));
        sql.batch_execute(&std::fs::read_to_string(path)?).await?;
    }
    let row = sql
        .query_one("SELECT lsn::text FROM pg_create_logical_replication_slot('pgoutput_capture', 'pgoutput')", &[])
        .await?;
    let start: Lsn = row.get::<_, String>(0).parse()?;
    for (_, statement) in WORKLOAD {
        sql.batch_execute(statement).await?;
    }
    let cfg = db
        .replication("pgoutput_capture", "scoresync", start)
        .with_options(scoresync_source::text::SESSION_OPTIONS);
    let mut client = ReplicationClient::connect(cfg).await?;
    let mut commits = 0;
    let mut labels = WORKLOAD.iter().map(|(label, _)| *label).filter(|l| *l != "add_column");
    let mut label = labels.next();
    loop {
        let event = match tokio::time::timeout(Duration::from_secs(10), client.recv()).await {
            Ok(Ok(Some(event))) => event,
            Ok(Ok(None)) | Err(_) => break,
            Ok(Err(err)) => return Err(err.into()),
        };
        match event {
            ReplicationEvent::XLogData { data, .. } => {
                println!("{} {}", label.unwrap_or("extra"), hex(&data));
            }
            ReplicationEvent::Commit { .. } => {
                commits += 1;
                label = labels.next();
                if label.is_none() {
                    break;
                }
            }
            _ => {}
        }
    }
    eprintln!("captured {commits} transactions");
    client.shutdown().await?;
    drop(sql);
    server.batch_execute("SELECT pg_drop_replication_slot('pgoutput_capture')").await?;
    server.batch_execute("DROP DATABASE pgoutput_capture WITH (FORCE)").await?;
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
