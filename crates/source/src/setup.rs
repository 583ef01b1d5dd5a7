//! `scoresync setup`, PostgreSQL part: the publication, the slot and the pipeline record.
//!
//! Idempotent: what exists is checked, not changed. A missing slot whose pipeline has a record is
//! an error, never silently recreated (its changes are gone); `recreate_slot` drops and creates
//! it and starts a new pipeline record with a pending snapshot.
//!
//! Every new record gets a row version scheme above `max_stored_version`, the greatest
//! `_version` ClickHouse holds (the caller reads it), and above every version published on the
//! change topic ([`max_published_version`]; some may not be applied yet), so a slot re-created on
//! a rebuilt or restored cluster, whose LSNs start lower, still writes versions that outrank
//! every row, stored or on its way. A record written before version schemes existed gets one here
//! the same way (its legacy versions are commit LSNs, on the topic too).

use secrecy::ExposeSecret;

use scoresync_bus::KafkaConfig;
use scoresync_event::{SourceTable, VersionScheme};

use crate::config::PostgresConfig;
use crate::connect::ConnectParams;
use crate::error::Error;

const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
use crate::slot;
use crate::state::{PipelineRecord, RECORD_FORMAT, StateStore};

/// What setup found or did for one object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It was there and as expected.
    Existed(String),
    /// Setup made it.
    Created(String),
}

/// Ensures the publication, the slot and the pipeline record (the state topic must exist).
pub async fn ensure(
    cfg: &PostgresConfig,
    kafka: &KafkaConfig,
    recreate_slot: bool,
    max_stored_version: u64,
) -> Result<Vec<Outcome>, Error> {
    let params = ConnectParams::parse(cfg.url.expose_secret())
        .map_err(Error::sql("parsing postgres.url"))?;
    let sql = params.connect_sql().await.map_err(Error::sql("connecting"))?;
    let mut report = vec![ensure_publication(&sql, &cfg.publication).await?];
    let max_stored_version = max_stored_version.max(max_published_version(kafka).await?);

    let state = StateStore::new(kafka)?;
    let record = state.load(&cfg.slot).await?;
    let info = slot::inspect(&sql, &cfg.slot).await?;
    let system_id =
        slot::system_id(params.replication(&cfg.slot, &cfg.publication, 0.into())).await?;
    let slot_name = &cfg.slot;

    if recreate_slot {
        if let Some(info) = &info {
            if let Some(pid) = info.active_pid {
                return Err(Error::SlotUnusable {
                    slot: slot_name.clone(),
                    problem: format!("is in use by walsender pid {pid}; stop the source first"),
                });
            }
            slot::drop(&sql, slot_name).await?;
        }
        let record = create_slot(&sql, &state, cfg, &params, system_id, max_stored_version).await?;
        report.push(Outcome::Created(format!(
            "replication slot {slot_name} (recreated at {}; snapshot pending; {})",
            record.snapshot.lsn,
            describe(&record)
        )));
        return Ok(report);
    }
    match (info, record) {
        (None, None) => {
            let record =
                create_slot(&sql, &state, cfg, &params, system_id, max_stored_version).await?;
            report.push(Outcome::Created(format!(
                "replication slot {slot_name} (consistent point {}; snapshot pending; {})",
                record.snapshot.lsn,
                describe(&record)
            )));
        }
        (None, Some(_)) => {
            return Err(Error::SlotMissing {
                slot: slot_name.clone(),
                database: params.database.clone(),
            });
        }
        (Some(_), None) => {
            return Err(Error::RecordMismatch {
                slot: slot_name.clone(),
                problem: format!(
                    "exists but the state topic {} holds no pipeline record for it (made outside \
                     scoresync?); run `scoresync setup --recreate-slot` to take it over with a \
                     fresh snapshot",
                    kafka.state_topic
                ),
            });
        }
        (Some(info), Some(mut record)) => {
            slot::check(slot_name, &params.database, Some(&info), &record, system_id)?;
            if record.versions.is_none() {
                // Format 1: events so far were versioned by commit LSN, all below this base.
                record.versions =
                    Some(VersionScheme::above(max_stored_version, record.snapshot.lsn));
                record.format = RECORD_FORMAT;
                state.save(&record).await?;
                report.push(Outcome::Created(format!(
                    "row version scheme of slot {slot_name} ({})",
                    describe(&record)
                )));
            }
            let snapshot = if record.snapshot.done { "snapshot done" } else { "snapshot pending" };
            report.push(Outcome::Existed(format!(
                "replication slot {slot_name} (confirmed {}; {snapshot})",
                record.confirmed_lsn
            )));
        }
    }
    Ok(report)
}

async fn create_slot(
    sql: &tokio_postgres::Client,
    state: &StateStore,
    cfg: &PostgresConfig,
    params: &ConnectParams,
    system_id: u64,
    max_stored_version: u64,
) -> Result<PipelineRecord, Error> {
    let consistent_point = slot::create(sql, &cfg.slot).await?;
    let record = PipelineRecord::new(
        &cfg.slot,
        &params.database,
        system_id,
        consistent_point,
        max_stored_version,
    );
    state.save(&record).await?;
    Ok(record)
}

/// The greatest row version among the last message of every partition of the change topic (0 when
/// it is empty). The source publishes each partition in commit order, so a partition's last
/// message holds its greatest version (a redriven dead letter, appended later, holds a smaller
/// one): this bounds every version published, applied yet or not. A new slot's versions must start
/// above it as well as above what ClickHouse holds.
pub async fn max_published_version(kafka: &KafkaConfig) -> Result<u64, Error> {
    let kafka = kafka.clone();
    tokio::task::spawn_blocking(move || last_versions(&kafka)).await.map_err(|e| {
        Error::BadRecord {
            slot: String::new(),
            topic: String::new(),
            problem: format!("reader task failed: {e}"),
        }
    })?
}

fn last_versions(kafka: &KafkaConfig) -> Result<u64, Error> {
    use rdkafka::consumer::Consumer;
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

    let topic = kafka.change_topic.as_str();
    let fail = |action: &'static str| {
        move |source| scoresync_bus::Error::Topic { topic: topic.into(), action, source }
    };
    let consumer = scoresync_bus::client::reader(kafka, "scoresync-setup-reader", "setup reader")?;
    let partitions = scoresync_bus::topics::partition_count(consumer.client(), topic)?.unwrap_or(0);
    let mut assignment = TopicPartitionList::new();
    for partition in 0..partitions {
        let (low, high) = consumer
            .fetch_watermarks(topic, partition, TIMEOUT)
            .map_err(fail("read watermarks"))?;
        if high > low {
            assignment
                .add_partition_offset(topic, partition, Offset::Offset(high - 1))
                .map_err(fail("assign"))?;
        }
    }
    let mut waiting = assignment.count();
    if waiting == 0 {
        return Ok(0);
    }
    consumer.assign(&assignment).map_err(fail("assign"))?;
    let mut max = 0;
    while waiting > 0 {
        let message = consumer
            .poll(TIMEOUT)
            .ok_or(rdkafka::error::KafkaError::NoMessageReceived)
            .map_err(fail("read the last message (timed out)"))?
            .map_err(fail("read the last message"))?;
        max = max.max(published_version(&message).unwrap_or(0));
        waiting -= 1;
    }
    Ok(max)
}

/// The version a change-topic message carries: its event's, or for a tombstone the one in its
/// header ([`scoresync_event::layout`]). `None` for an undecodable message, which was never a
/// version (the sink dead-letters it).
fn published_version(message: &impl rdkafka::message::Message) -> Option<u64> {
    use rdkafka::message::Headers as _;
    match message.payload() {
        Some(payload) => scoresync_event::decode(payload).ok().map(|event| event.version),
        None => message
            .headers()?
            .iter()
            .find(|h| h.key == scoresync_event::TOMBSTONE_VERSION_HEADER)
            .and_then(|h| std::str::from_utf8(h.value?).ok()?.parse().ok()),
    }
}

fn describe(record: &PipelineRecord) -> String {
    match record.versions {
        Some(v) => format!("row versions from {} counted from {}", v.base, v.origin),
        None => "no row version scheme".into(),
    }
}

/// The publication must exist and publish every operation of the three tables.
async fn ensure_publication(sql: &tokio_postgres::Client, name: &str) -> Result<Outcome, Error> {
    let problem = |problem: String| Error::Publication { publication: name.into(), problem };
    let tables: Vec<String> = SourceTable::ALL.iter().map(|t| t.to_string()).collect();
    let row = sql
        .query_opt(
            "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication \
             WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(Error::sql(format!("reading publication {name}")))?;
    let outcome = match row {
        Some(r) => {
            if !r.get::<_, bool>(0) {
                return Err(problem(
                    "does not publish every operation; it needs publish = 'insert, update, \
                     delete, truncate'"
                        .into(),
                ));
            }
            Outcome::Existed(format!("publication {name}"))
        }
        None => {
            let create = format!(
                "CREATE PUBLICATION {name} FOR TABLE {} WITH (publish = 'insert, update, delete, truncate')",
                tables.join(", ")
            );
            sql.batch_execute(&create).await.map_err(|e| {
                problem(format!(
                    "does not exist and cannot be created as this role ({e}); have the table \
                     owner run: {create}"
                ))
            })?;
            Outcome::Created(format!("publication {name}"))
        }
    };
    let published: Vec<String> = sql
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1",
            &[&name],
        )
        .await
        .map_err(Error::sql(format!("reading the tables of publication {name}")))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<&String> = tables.iter().filter(|t| !published.contains(t)).collect();
    if !missing.is_empty() {
        return Err(problem(format!(
            "lacks {}; add with ALTER PUBLICATION {name} ADD TABLE ...",
            missing.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", ")
        )));
    }
    Ok(outcome)
}
