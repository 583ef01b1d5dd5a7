//! Reading what the source published, and folding it into table contents.
//!
//! [`read_events`] reads a whole topic (every partition, from the start to the high watermark at
//! call time). [`fold`] applies events the way ClickHouse's `ReplacingMergeTree(_version)` will:
//! per primary key, the greatest version wins (ties: the later change in the transaction), a
//! TRUNCATE removes rows versioned below it. Comparing the fold with PostgreSQL checks what the
//! source put on the bus, before any sink.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use scoresync_bus::KafkaConfig;
use scoresync_bus::client::{OffsetReset, consumer_config};
use scoresync_bus::topics::partition_count;
use scoresync_event::{ChangeEvent, Operation, Row, RowVersion, SourceTable, decode};

const TIMEOUT: Duration = Duration::from_secs(30);

/// One message of the change topic.
#[derive(Clone, Debug)]
pub struct Published {
    /// Partition.
    pub partition: i32,
    /// Offset in the partition.
    pub offset: i64,
    /// Message key.
    pub key: Option<Vec<u8>>,
    /// Kafka timestamp (ms).
    pub timestamp_ms: Option<i64>,
    /// The decoded event.
    pub event: ChangeEvent,
}

/// Reads every event of `topic` present now (tombstones left out), partition by partition, in
/// offset order.
pub fn read_events(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<Vec<Published>> {
    let mut out = Vec::new();
    read_topic(kafka, topic, |message| {
        let (partition, offset) = (message.partition(), message.offset());
        // Tombstones are for compaction (`scoresync_event::layout`); every consumer skips them.
        let Some(payload) = message.payload() else { return Ok(()) };
        let event =
            decode(payload).with_context(|| format!("partition {partition} offset {offset}"))?;
        out.push(Published {
            partition,
            offset,
            key: message.key().map(<[u8]>::to_vec),
            timestamp_ms: message.timestamp().to_millis(),
            event,
        });
        Ok(())
    })?;
    Ok(out)
}

/// Calls `visit` on every message of `topic` present now, partition by partition, in offset
/// order (a reader of its own, no group offsets used).
pub fn read_topic(
    kafka: &KafkaConfig,
    topic: &str,
    mut visit: impl FnMut(&BorrowedMessage<'_>) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let consumer: BaseConsumer =
        consumer_config(kafka, "scoresync-test-reader", OffsetReset::Earliest)
            .set("enable.auto.commit", "false")
            .create()?;
    let partitions = partition_count(consumer.client(), topic)?.context("topic not found")?;
    for partition in 0..partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, TIMEOUT)?;
        if high <= low {
            continue;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(low))?;
        consumer.assign(&tpl)?;
        let mut next = low;
        while next < high {
            let message = consumer.poll(TIMEOUT).with_context(|| {
                format!("partition {partition} stalled at offset {next} of {high}")
            })??;
            next = message.offset() + 1;
            visit(&message)?;
        }
    }
    Ok(())
}

/// A row identity: table name and primary-key values in text form.
pub type RowId = (String, Vec<String>);

/// The text form of a contract value, for keys and comparisons with PostgreSQL: its
/// [`Value::to_text`](scoresync_event::Value::to_text), `None` for NULL, and `<unchanged toast>`
/// for an unchanged TOAST marker (so it never compares equal to a NULL).
pub fn value_text(value: Option<&scoresync_event::Value>) -> Option<String> {
    let value = value?;
    if value.is_unchanged_toast() {
        return Some("<unchanged toast>".into());
    }
    value.to_text()
}

/// The identity of the row an event's `row` describes.
pub fn row_id(table: &str, row: &Row) -> Option<RowId> {
    let source = SourceTable::from_name("director", table)?;
    let key = source
        .primary_key()
        .iter()
        .map(|k| value_text(row.column(k).and_then(|c| c.value.as_ref())))
        .collect::<Option<Vec<_>>>()?;
    Some((table.to_owned(), key))
}

/// Folds events into the rows they leave behind: `Some(row)` live, absent when deleted.
/// Unchanged-TOAST columns keep the value of the previous version of the row.
pub fn fold(events: &[Published]) -> BTreeMap<RowId, Row> {
    // (version, seq) of the change that decided each row, and the row (None = deleted).
    let mut state: BTreeMap<RowId, ((RowVersion, u32), Option<Row>)> = BTreeMap::new();
    let mut ordered: Vec<&Published> = events.iter().collect();
    ordered.sort_by_key(|p| {
        (RowVersion::of_event(&p.event), p.event.seq_in_tx, p.partition, p.offset)
    });
    for p in ordered {
        let e = &p.event;
        let rank = (RowVersion::of_event(e), e.seq_in_tx);
        match e.op() {
            Operation::Insert | Operation::Update | Operation::Snapshot => {
                let Some(new) = &e.new_row else { continue };
                let Some(id) = row_id(&e.table, new) else { continue };
                if let Some(old_id) = e.old_row.as_ref().and_then(|old| row_id(&e.table, old))
                    && old_id != id
                {
                    upsert(&mut state, old_id, rank, None);
                }
                let merged = merge_toast(new, state.get(&id).and_then(|(_, r)| r.as_ref()));
                upsert(&mut state, id, rank, Some(merged));
            }
            Operation::Delete => {
                let Some(old) = &e.old_row else { continue };
                if let Some(id) = row_id(&e.table, old) {
                    upsert(&mut state, id, rank, None);
                }
            }
            Operation::Truncate => {
                for (id, (r, row)) in state.iter_mut() {
                    if id.0 == e.table && r.0 < rank.0 {
                        *row = None;
                        *r = rank;
                    }
                }
            }
            Operation::Unspecified => {}
        }
    }
    state.into_iter().filter_map(|(id, (_, row))| row.map(|r| (id, r))).collect()
}

fn upsert(
    state: &mut BTreeMap<RowId, ((RowVersion, u32), Option<Row>)>,
    id: RowId,
    rank: (RowVersion, u32),
    row: Option<Row>,
) {
    match state.get(&id) {
        Some((current, _)) if *current > rank => {}
        _ => {
            state.insert(id, (rank, row));
        }
    }
}

fn merge_toast(new: &Row, previous: Option<&Row>) -> Row {
    let mut merged = new.clone();
    for col in &mut merged.columns {
        if col.value.as_ref().is_some_and(|v| v.is_unchanged_toast())
            && let Some(prev) = previous.and_then(|p| p.column(&col.name))
        {
            col.value = prev.value.clone();
        }
    }
    merged
}

/// The three tables as PostgreSQL holds them now, as contract rows (values typed the way the
/// source types them).
pub async fn pg_state(sql: &tokio_postgres::Client) -> anyhow::Result<BTreeMap<RowId, Row>> {
    use scoresync_event::Column;
    sql.batch_execute("SET datestyle = ISO; SET timezone = UTC").await?;
    let mut out = BTreeMap::new();
    for table in SourceTable::ALL {
        let columns = sql
            .query(
                "SELECT attname::text, atttypid::oid FROM pg_attribute \
                 WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
                &[&table.to_string()],
            )
            .await?;
        let names: Vec<(String, u32)> = columns.iter().map(|r| (r.get(0), r.get(1))).collect();
        let select: Vec<String> = names.iter().map(|(n, _)| format!("\"{n}\"::text")).collect();
        for r in sql.query(&format!("SELECT {} FROM {table}", select.join(", ")), &[]).await? {
            let mut row = Row::default();
            for (i, (name, oid)) in names.iter().enumerate() {
                let text: Option<String> = r.get(i);
                let value = match text {
                    None => scoresync_event::Value::null(),
                    Some(t) => scoresync_source::text::typed_value(*oid, &t)?,
                };
                row.columns.push(Column { name: name.clone(), type_oid: *oid, value: Some(value) });
            }
            let id = row_id(table.name(), &row).context("row without key")?;
            out.insert(id, row);
        }
    }
    Ok(out)
}

/// Differences between the folded bus and PostgreSQL, as readable lines (empty: they agree).
/// Columns are compared by name, so a row may carry more columns than the other side knows.
pub fn diff(bus: &BTreeMap<RowId, Row>, pg: &BTreeMap<RowId, Row>) -> Vec<String> {
    let mut out = Vec::new();
    for (id, pg_row) in pg {
        match bus.get(id) {
            None => out.push(format!("missing on the bus: {id:?}")),
            Some(bus_row) => {
                for col in &pg_row.columns {
                    let want = value_text(col.value.as_ref());
                    let got = value_text(bus_row.column(&col.name).and_then(|c| c.value.as_ref()));
                    if want != got {
                        out.push(format!("{id:?}.{}: bus {got:?}, postgres {want:?}", col.name));
                    }
                }
            }
        }
    }
    for id in bus.keys().filter(|id| !pg.contains_key(*id)) {
        out.push(format!("live on the bus, absent in postgres: {id:?}"));
    }
    out
}

/// How many messages `topic` holds now (sum over partitions of high minus low watermark).
pub fn message_count(kafka: &KafkaConfig, topic: &str) -> anyhow::Result<i64> {
    let consumer: BaseConsumer =
        consumer_config(kafka, "scoresync-test-counter", OffsetReset::Earliest).create()?;
    Ok(scoresync_bus::topics::message_count(consumer.client(), topic)?)
}

/// The sink group's position on the change topic: (messages not yet committed, sum of high
/// watermarks). A partition the group never committed counts from its low watermark.
pub fn group_position(kafka: &KafkaConfig) -> anyhow::Result<(i64, i64)> {
    let consumer: BaseConsumer =
        consumer_config(kafka, &kafka.consumer_group, OffsetReset::Earliest).create()?;
    let topic = kafka.change_topic.as_str();
    let mut wanted = rdkafka::TopicPartitionList::new();
    for partition in 0..kafka.partitions {
        wanted.add_partition(topic, partition);
    }
    let committed = consumer.committed_offsets(wanted, TIMEOUT)?;
    let (mut lag, mut highs) = (0, 0);
    for partition in 0..kafka.partitions {
        let (low, high) = consumer.fetch_watermarks(topic, partition, TIMEOUT)?;
        let at = committed
            .find_partition(topic, partition)
            .and_then(|e| match e.offset() {
                rdkafka::Offset::Offset(o) => Some(o),
                _ => None,
            })
            .unwrap_or(low);
        lag += (high - at).max(0);
        highs += high;
    }
    Ok((lag, highs))
}
