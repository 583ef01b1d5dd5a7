//! Where change events live on the change topic: each message's partition and key.
//!
//! This layout is part of the contract, so that any Kafka client can find a row's messages and
//! compaction keeps what a rebuild needs:
//!
//! - **Partition**: the scorecard's, for every change of the card, its scores and its historic
//!   scores, so they stay in commit order. It is Kafka's default partitioner applied to the
//!   scorecard key ([`ScorecardKey::partition_key`]: `customer_id`, `profile_id` and
//!   `scorecard_id` joined by NUL bytes): `(murmur2(key) & 0x7fffffff) % partitions`, with
//!   murmur2 seeded `0x9747b28c` as the Java client does (librdkafka's `murmur2_random` gives the
//!   same partition). See [`ScorecardKey::partition`].
//! - **Key**: the row's identity ([`RowAddress::key`]): `schema.table`, then each primary-key
//!   value in its text form ([`Value::to_text`](crate::Value::to_text)), in the order of
//!   [`SourceTable::primary_key`], all joined by NUL bytes. On a compacted topic the newest message
//!   of a key is its row's current state.
//! - **Tombstones** (a message with this key and no payload) let compaction forget a row: one
//!   follows each DELETE, and one follows a change that gave a row another address (a score
//!   re-parented to a scorecard in another partition, or a changed primary key), for its old key
//!   in its old partition. A tombstone carries the version of the change that made it in the
//!   header [`TOMBSTONE_VERSION_HEADER`] (decimal text). Every consumer skips tombstones.
//! - **TRUNCATE** goes to every partition under [`truncate_key`], so compaction keeps the newest
//!   TRUNCATE of each table in each partition. The rows it removed get no tombstones: their
//!   messages stay before it in their partitions, and a replay applies them and then the
//!   TRUNCATE, which outranks them.
//! - **A redriven dead letter** (`scoresync dlq redrive`) goes back to its origin partition under
//!   [`redrive_key`], and **a backfilled row** (`scoresync backfill`) to its partition under
//!   [`backfill_key`]: each is its row's key with a suffix, followed by a tombstone for it. Both
//!   may be older than their row's changes published before them, and under the row's own key
//!   compaction would keep them instead.
//!
//! Invariant: the newest message of every row key carries its row's newest state (or is its
//! tombstone), so a compacted topic replays to the current rows; older messages a compaction left
//! behind are harmless, since every row carries its version and the greatest wins.

use crate::table::{ScorecardKey, SourceTable};
use crate::v1::{ChangeEvent, Operation, Row};

/// The seed of Kafka's murmur2 partitioner (`org.apache.kafka.common.utils.Utils.murmur2`).
pub const KAFKA_MURMUR2_SEED: u32 = murmur2::KAFKA_SEED;

/// The header of a tombstone holding the version of the change that made it.
pub const TOMBSTONE_VERSION_HEADER: &str = "scoresync-version";

impl ScorecardKey {
    /// The change-topic partition of this scorecard among `partitions` (at least 1): Kafka's
    /// default partitioner on [`partition_key`](Self::partition_key).
    pub fn partition(&self, partitions: i32) -> i32 {
        let hash = murmur2::murmur2(&self.partition_key(), KAFKA_MURMUR2_SEED);
        ((hash & 0x7fff_ffff) % partitions.max(1) as u32) as i32
    }
}

/// Where a row's messages go: its scorecard's partition, under the row's key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RowAddress {
    /// The scorecard the row belongs to (chooses the partition).
    pub scorecard: ScorecardKey,
    /// The message key: table and primary key.
    pub key: Vec<u8>,
}

impl RowAddress {
    /// The address of `row` of `table`; `None` when a primary-key or scorecard column is missing,
    /// NULL or has no text form.
    pub fn of_row(table: SourceTable, row: &Row) -> Option<RowAddress> {
        let mut parts = vec![table.to_string()];
        for name in table.primary_key() {
            parts.push(row.column(name)?.value.as_ref()?.to_text()?);
        }
        Some(RowAddress {
            scorecard: ScorecardKey::of_row(row)?,
            key: parts.join("\0").into_bytes(),
        })
    }

    /// The address of the row an event is about: its new row's, else (a DELETE) its old row's.
    /// `None` for an event of another table or without a row identity (a TRUNCATE).
    pub fn of_event(event: &ChangeEvent) -> Option<RowAddress> {
        let table = SourceTable::from_name(&event.schema, &event.table)?;
        Self::of_row(table, event.new_row.as_ref().or(event.old_row.as_ref())?)
    }

    /// Its partition among `partitions`.
    pub fn partition(&self, partitions: i32) -> i32 {
        self.scorecard.partition(partitions)
    }
}

/// The key a message carrying `event` has on the change topic: its row's ([`RowAddress::key`]),
/// or for a TRUNCATE its table's ([`truncate_key`]). `None` for an event of another table or
/// without a row identity.
pub fn message_key(event: &ChangeEvent) -> Option<Vec<u8>> {
    match event.op() {
        Operation::Truncate => {
            Some(truncate_key(SourceTable::from_name(&event.schema, &event.table)?))
        }
        _ => RowAddress::of_event(event).map(|address| address.key),
    }
}

/// The key of a redriven dead letter whose original key was `key`.
pub fn redrive_key(key: &[u8]) -> Vec<u8> {
    [key, b"\0redriven"].concat()
}

/// The key of a backfilled copy of the row keyed `key`.
pub fn backfill_key(key: &[u8]) -> Vec<u8> {
    [key, b"\0backfilled"].concat()
}

/// The key of a TRUNCATE of `table` (in every partition).
pub fn truncate_key(table: SourceTable) -> Vec<u8> {
    format!("TRUNCATE\0{table}").into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Column, Value};

    /// librdkafka's own test vectors for its Java-compatible murmur2 (`rdmurmur2.c`).
    #[test]
    fn murmur2_matches_the_java_client() {
        let cases: [(&[u8], u32); 4] = [
            (b"kafka", 0xd067_cf64),
            (b"giberish123456789", 0x8f55_2b0c),
            (b"1234", 0x9fc9_7b14),
            (b"", 0x106e_08d9),
        ];
        for (key, expected) in cases {
            assert_eq!(murmur2::murmur2(key, KAFKA_MURMUR2_SEED), expected, "{key:?}");
        }
    }

    fn text(name: &str, v: &str) -> Column {
        Column { name: name.into(), type_oid: 25, value: Some(Value::text(v)) }
    }

    #[test]
    fn a_score_is_keyed_by_table_and_primary_key_and_goes_to_its_scorecards_partition() {
        let row = Row {
            columns: vec![
                text("customer_id", "c"),
                text("profile_id", "p"),
                text("score_id", "s1"),
                text("scorecard_id", "card"),
            ],
        };
        let address = RowAddress::of_row(SourceTable::Scores, &row).expect("address");
        assert_eq!(address.key, b"director.scores\0c\0p\0s1".to_vec());
        let card = ScorecardKey {
            customer_id: "c".into(),
            profile_id: "p".into(),
            scorecard_id: "card".into(),
        };
        assert_eq!(address.scorecard, card);
        for partitions in [1, 3, 12] {
            let p = address.partition(partitions);
            assert!((0..partitions).contains(&p));
            assert_eq!(p, card.partition(partitions));
        }
        let without_card = Row { columns: row.columns[..3].to_vec() };
        assert_eq!(RowAddress::of_row(SourceTable::Scores, &without_card), None);
    }

    #[test]
    fn truncate_keys_name_the_table_and_redriven_keys_never_equal_a_row_key() {
        assert_eq!(
            truncate_key(SourceTable::Scorecards),
            b"TRUNCATE\0director.scorecards".to_vec()
        );
        let truncate = ChangeEvent {
            op: Operation::Truncate as i32,
            schema: "director".into(),
            table: "scores".into(),
            ..Default::default()
        };
        assert_eq!(message_key(&truncate), Some(truncate_key(SourceTable::Scores)));
        // A row key has one part per primary-key column; a redriven one has one more.
        let key = b"director.scores\0c\0p\0s1";
        assert_eq!(redrive_key(key), b"director.scores\0c\0p\0s1\0redriven".to_vec());
    }
}
