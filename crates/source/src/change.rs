//! pgoutput changes to change events: what the source publishes, and where.
//!
//! [`Mapper`] keeps the relation cache (Relation messages arrive before the first change of a
//! table in a session and again after `ALTER TABLE`, so a new column travels from its next change
//! on) and the current transaction (commit LSN, time, xid, and the position of each change in it).
//!
//! Every event goes to its scorecard's partition under its row's key ([`RowAddress`], see
//! [`scoresync_event::layout`]), so that the card, its scores and its historic scores stay in
//! commit order and a compacted topic keeps each row's newest change: an INSERT or UPDATE by its
//! new row, a DELETE by its old row. A DELETE, and a change that gives a row another address (a
//! score re-parented to a card in another partition), name a key for a tombstone
//! ([`Outgoing::tombstone`]). An event carries a row once: its
//! `old_row` holds only the identity columns ([`SourceTable::identity_columns`]), on a DELETE
//! always and on an UPDATE only when one of them changed (a move to another scorecard, primary key
//! or shard); the sink removes the old copy with a delete marker versioned by this change, which
//! outranks every earlier change of the old copy whatever partition those travel in. An unchanged
//! TOAST value is filled in from the whole old row PostgreSQL logs for a REPLICA IDENTITY FULL
//! table (director.scorecards); elsewhere it stays "unchanged" for the sink. A TRUNCATE is
//! published to every partition ([`Destination::EveryPartition`]), after every earlier change of
//! every scorecard, under its table's TRUNCATE key.

use std::collections::HashMap;

use scoresync_event::{
    CONTRACT_VERSION, ChangeEvent, Column, Lsn, Operation, Row, RowAddress, SourceTable,
    TruncateOptions, Value, VersionError, VersionScheme, truncate_key,
};

use crate::decode::{OldTuple, PgOutput, Relation, Tuple, TupleValue};
use crate::text::{ValueError, typed_value};

/// Where an event goes on the change topic ([`scoresync_event::layout`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Destination {
    /// The row's address: its scorecard's partition, under the row's key.
    Row(RowAddress),
    /// One copy to every partition (TRUNCATE), under this key ([`truncate_key`]).
    EveryPartition(Vec<u8>),
}

/// An event ready to publish.
#[derive(Clone, Debug, PartialEq)]
pub struct Outgoing {
    /// The event.
    pub event: ChangeEvent,
    /// Where it goes.
    pub destination: Destination,
    /// A key compaction may forget once the event is published (the publisher sends a
    /// tombstone for it).
    pub tombstone: Option<Forget>,
}

/// What a tombstone after an event is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Forget {
    /// The event's own key: after a DELETE, or after a copy under a side key (a backfill's).
    Own,
    /// The row's old address, after a change that gave it another one; never sent onto the
    /// event's own partition and key (a row that keeps its address must stay its key's newest
    /// message).
    Left(RowAddress),
}

/// The transaction the next changes belong to (from the Begin message).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TxMeta {
    /// LSN of the commit record: orders this transaction's rows after every earlier one's.
    pub commit_lsn: u64,
    /// Commit time, Unix microseconds.
    pub commit_time_us: i64,
    /// Transaction id.
    pub xid: u32,
}

/// A change that cannot be turned into an event. Permanent: the source halts and says why.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The change's position cannot be made a row version.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// A change names a relation no Relation message described.
    #[error("change for relation id {0} arrived before its Relation message")]
    UnknownRelation(u32),
    /// A change (its [`Operation::describe`] name) arrived outside Begin/Commit.
    #[error("{0} change arrived outside a transaction")]
    NoTransaction(&'static str),
    /// The publication holds a table scoresync does not replicate.
    #[error(
        "table {schema}.{table} is in the publication but scoresync replicates only \
         director.scorecards, director.scores and director.historic_scorecard_scores; \
         remove it from the publication"
    )]
    UnknownTable {
        /// Schema.
        schema: String,
        /// Table.
        table: String,
    },
    /// A tuple's column count differs from its relation's.
    #[error("{table}: tuple has {got} columns, the relation has {want}")]
    ColumnCount {
        /// Table.
        table: SourceTable,
        /// Columns in the tuple.
        got: usize,
        /// Columns in the relation.
        want: usize,
    },
    /// A column value does not parse as its type.
    #[error("{table}.{column}")]
    Value {
        /// Table.
        table: SourceTable,
        /// Column.
        column: String,
        /// The parse error.
        #[source]
        source: ValueError,
    },
    /// A column value came in binary form, which scoresync never requests.
    #[error("{table}.{column}: binary value, but the stream was opened in text mode")]
    Binary {
        /// Table.
        table: SourceTable,
        /// Column.
        column: String,
    },
    /// A transaction wrote more rows than the source tracks, then truncated the table.
    #[error(
        "a transaction wrote {rows} rows and then truncated {table}; scoresync tracks at most \
         {MAX_TRACKED_ROWS} rows per transaction to retract them"
    )]
    TooLargeForTruncate {
        /// Table.
        table: SourceTable,
        /// Rows written by the transaction.
        rows: usize,
    },
    /// The row does not carry its primary key or scorecard identity.
    #[error(
        "{table} {op} carries no {what}; the table's replica identity must include it \
         (see schemas/postgres/002_replica_identity.sql)"
    )]
    MissingIdentity {
        /// Table.
        table: SourceTable,
        /// Operation ([`Operation::describe`]).
        op: &'static str,
        /// What is missing.
        what: &'static str,
    },
}

/// Turns decoded pgoutput messages into events.
pub struct Mapper {
    system_id: u64,
    versions: VersionScheme,
    relations: HashMap<u32, Relation>,
    tx: Option<TxMeta>,
    seq: u32,
    /// Identities of rows the current transaction wrote, per table, for a TRUNCATE later in it.
    written: HashMap<SourceTable, Vec<Row>>,
    /// Identities recorded in the current transaction (bounded by [`MAX_TRACKED_ROWS`]).
    tracked: usize,
}

/// Most row identities a transaction's TRUNCATE can retract (see [`Mapper`]).
pub const MAX_TRACKED_ROWS: usize = 2_000_000;

impl Mapper {
    /// A mapper for the cluster `system_id`, versioning rows by `versions`.
    pub fn new(system_id: u64, versions: VersionScheme) -> Self {
        Mapper {
            system_id,
            versions,
            relations: HashMap::new(),
            tx: None,
            seq: 0,
            written: HashMap::new(),
            tracked: 0,
        }
    }

    /// A transaction begins.
    pub fn begin(&mut self, tx: TxMeta) {
        self.tx = Some(tx);
        self.seq = 0;
        self.written.clear();
        self.tracked = 0;
    }

    /// The transaction ended.
    pub fn commit(&mut self) {
        self.tx = None;
        self.written.clear();
        self.tracked = 0;
    }

    /// The relation with id `id`, if a Relation message described it.
    pub fn relation(&self, id: u32) -> Option<&Relation> {
        self.relations.get(&id)
    }

    /// Maps one message. Relation messages update the cache and yield nothing; messages that are
    /// not row changes (Begin, Commit, Origin, Type, Message) yield nothing.
    pub fn map(&mut self, message: PgOutput, change_lsn: u64) -> Result<Vec<Outgoing>, MapError> {
        match message {
            PgOutput::Relation(relation) => {
                self.relations.insert(relation.id, relation);
                Ok(Vec::new())
            }
            PgOutput::Insert { relation_id, new } => {
                let (table, rel) = self.table(relation_id)?;
                let new_row = row(table, rel, &new)?;
                self.remember(table, &new_row);
                let event =
                    self.event(table, Operation::Insert, change_lsn, Some(new_row), None)?;
                Ok(vec![keyed(table, event, Operation::Insert)?])
            }
            PgOutput::Update { relation_id, old, new } => {
                let (table, rel) = self.table(relation_id)?;
                let mut new_row = row(table, rel, &new)?;
                let old_row = old.as_ref().map(|o| row(table, rel, &o.values)).transpose()?;
                if let Some(full) =
                    old_row.as_ref().filter(|_| old.as_ref().is_some_and(|o| !o.key_only))
                {
                    fill_unchanged_toast(&mut new_row, full);
                }
                // The old row travels only when the row changed identity or routing.
                let old_row = old_row
                    .map(|old| identity(table, &old))
                    .filter(|old| identity(table, &new_row) != *old);
                self.remember(table, &new_row);
                let mut event =
                    self.event(table, Operation::Update, change_lsn, Some(new_row), old_row)?;
                event.old_row_is_key_only = event.old_row.is_some();
                Ok(vec![keyed(table, event, Operation::Update)?])
            }
            PgOutput::Delete { relation_id, old: OldTuple { values, .. } } => {
                let (table, rel) = self.table(relation_id)?;
                let old_row = identity(table, &row(table, rel, &values)?);
                let mut event =
                    self.event(table, Operation::Delete, change_lsn, None, Some(old_row))?;
                event.old_row_is_key_only = true;
                Ok(vec![keyed(table, event, Operation::Delete)?])
            }
            PgOutput::Truncate { relation_ids, cascade, restart_identity } => {
                let mut out = Vec::new();
                for id in relation_ids {
                    let (table, _) = self.table(id)?;
                    out.extend(self.retract_written(table, change_lsn)?);
                    let mut event =
                        self.event(table, Operation::Truncate, change_lsn, None, None)?;
                    event.truncate = Some(TruncateOptions { cascade, restart_identity });
                    out.push(Outgoing {
                        event,
                        destination: Destination::EveryPartition(truncate_key(table)),
                        tombstone: None,
                    });
                }
                Ok(out)
            }
            PgOutput::Begin { .. }
            | PgOutput::Commit { .. }
            | PgOutput::Origin { .. }
            | PgOutput::Type { .. }
            | PgOutput::Message { .. } => Ok(Vec::new()),
        }
    }

    /// Notes the identity (primary key and scorecard columns) of a row this transaction wrote.
    fn remember(&mut self, table: SourceTable, row: &Row) {
        if self.tracked >= MAX_TRACKED_ROWS {
            self.tracked += 1;
            return;
        }
        let identity: Vec<Column> = row
            .columns
            .iter()
            .filter(|c| {
                table.primary_key().contains(&c.name.as_str())
                    || ["customer_id", "profile_id", "scorecard_id"].contains(&c.name.as_str())
            })
            .cloned()
            .collect();
        self.written.entry(table).or_default().push(Row { columns: identity });
        self.tracked += 1;
    }

    /// A TRUNCATE inside a transaction also removes the rows the transaction wrote to the table
    /// before it. Those share the TRUNCATE's version, so the sink's "older than the TRUNCATE"
    /// rule cannot reach them: they get explicit DELETE events, ordered after their writes.
    fn retract_written(
        &mut self,
        table: SourceTable,
        change_lsn: u64,
    ) -> Result<Vec<Outgoing>, MapError> {
        if self.tracked > MAX_TRACKED_ROWS {
            return Err(MapError::TooLargeForTruncate { table, rows: self.tracked });
        }
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for identity in self.written.remove(&table).unwrap_or_default() {
            // Values are compared by their encoding (Value holds floats, which are not Eq).
            let key = primary_key(table, &identity)
                .map(|cols| cols.iter().map(|c| format!("{:?}", c.value)).collect::<Vec<_>>());
            if !seen.insert(key) {
                continue;
            }
            let event = self.event(table, Operation::Delete, change_lsn, None, Some(identity))?;
            out.push(keyed(table, event, Operation::Truncate)?);
        }
        Ok(out)
    }

    fn table(&self, relation_id: u32) -> Result<(SourceTable, &Relation), MapError> {
        let rel = self.relations.get(&relation_id).ok_or(MapError::UnknownRelation(relation_id))?;
        let table = SourceTable::from_name(&rel.namespace, &rel.name).ok_or_else(|| {
            MapError::UnknownTable { schema: rel.namespace.clone(), table: rel.name.clone() }
        })?;
        Ok((table, rel))
    }

    fn event(
        &mut self,
        table: SourceTable,
        op: Operation,
        change_lsn: u64,
        new_row: Option<Row>,
        old_row: Option<Row>,
    ) -> Result<ChangeEvent, MapError> {
        let tx = self.tx.ok_or(MapError::NoTransaction(op.describe()))?;
        let seq = self.seq;
        self.seq += 1;
        let key_source = new_row.as_ref().or(old_row.as_ref());
        let key = match (op, key_source) {
            (Operation::Truncate, _) => Vec::new(),
            (_, Some(row)) => primary_key(table, row).ok_or(MapError::MissingIdentity {
                table,
                op: op.describe(),
                what: "primary key",
            })?,
            (_, None) => Vec::new(),
        };
        let version = self.versions.change(Lsn(tx.commit_lsn), seq)?;
        Ok(ChangeEvent {
            contract_version: CONTRACT_VERSION,
            system_id: self.system_id,
            schema: scoresync_event::table::SOURCE_SCHEMA.into(),
            table: table.name().into(),
            op: op as i32,
            key,
            new_row,
            old_row,
            old_row_is_key_only: false,
            commit_lsn: tx.commit_lsn,
            change_lsn,
            seq_in_tx: seq,
            commit_time_us: tx.commit_time_us,
            xid: tx.xid,
            truncate: None,
            version: version.0,
        })
    }
}

/// The row's identity columns ([`SourceTable::identity_columns`]), in table order.
fn identity(table: SourceTable, row: &Row) -> Row {
    let wanted = table.identity_columns();
    Row {
        columns: row
            .columns
            .iter()
            .filter(|c| wanted.contains(&c.name.as_str()))
            .cloned()
            .collect(),
    }
}

/// Fills the new row's unchanged TOAST values from the full old row (REPLICA IDENTITY FULL logs
/// the old tuple with every value flattened), so no sink has to look them up.
fn fill_unchanged_toast(new_row: &mut Row, old_row: &Row) {
    for column in &mut new_row.columns {
        if !column.value.as_ref().is_some_and(Value::is_unchanged_toast) {
            continue;
        }
        let old =
            old_row.columns.iter().find(|c| c.name == column.name).and_then(|c| c.value.as_ref());
        if let Some(old) = old.filter(|v| !v.is_unchanged_toast()) {
            column.value = Some(old.clone());
        }
    }
}

/// Builds a row from a tuple, typing each value by its column's type.
pub fn row(table: SourceTable, rel: &Relation, tuple: &Tuple) -> Result<Row, MapError> {
    if tuple.len() != rel.columns.len() {
        return Err(MapError::ColumnCount { table, got: tuple.len(), want: rel.columns.len() });
    }
    let columns = rel
        .columns
        .iter()
        .zip(tuple)
        .map(|(col, value)| {
            let value = match value {
                TupleValue::Null => Value::null(),
                TupleValue::UnchangedToast => Value::unchanged_toast(),
                TupleValue::Text(bytes) => {
                    let text = String::from_utf8_lossy(bytes);
                    typed_value(col.type_oid, &text).map_err(|source| MapError::Value {
                        table,
                        column: col.name.clone(),
                        source,
                    })?
                }
                TupleValue::Binary(_) => {
                    return Err(MapError::Binary { table, column: col.name.clone() });
                }
            };
            Ok(Column { name: col.name.clone(), type_oid: col.type_oid, value: Some(value) })
        })
        .collect::<Result<_, _>>()?;
    Ok(Row { columns })
}

/// The primary-key columns of `row`, or `None` when one is missing, NULL or unknown.
pub fn primary_key(table: SourceTable, row: &Row) -> Option<Vec<Column>> {
    table
        .primary_key()
        .iter()
        .map(|name| {
            let col = row.column(name)?;
            let value = col.value.as_ref()?;
            (!value.is_null() && !value.is_unchanged_toast()).then(|| col.clone())
        })
        .collect()
}

/// Addresses an event by its row ([`RowAddress`]): the new row's, a DELETE's old row's. `op` is
/// what an error calls the change: the event's own operation, but `Truncate` for the deletes
/// that retract a truncated transaction's rows.
fn keyed(table: SourceTable, event: ChangeEvent, op: Operation) -> Result<Outgoing, MapError> {
    let missing = || MapError::MissingIdentity {
        table,
        op: op.describe(),
        what: "row identity (primary key, customer_id, profile_id, scorecard_id)",
    };
    let address = RowAddress::of_event(&event).ok_or_else(missing)?;
    let tombstone = match event.op() {
        Operation::Delete => Some(Forget::Own),
        _ => event
            .old_row
            .as_ref()
            .and_then(|old| RowAddress::of_row(table, old))
            .filter(|old| *old != address)
            .map(Forget::Left),
    };
    Ok(Outgoing { event, destination: Destination::Row(address), tombstone })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::decode;
    use crate::fixtures::fixtures;
    use scoresync_event::ScorecardKey;
    use scoresync_event::v1::value::Kind;

    const TX: TxMeta = TxMeta { commit_lsn: 0x100, commit_time_us: 1_700_000_000_000_000, xid: 9 };

    /// Feeds every captured message of `labels` through one mapper inside one transaction.
    fn run(labels: &[&str]) -> Vec<Outgoing> {
        let mut mapper = Mapper::new(42, VersionScheme::above(0, Lsn::ZERO));
        mapper.begin(TX);
        let mut out = Vec::new();
        for label in labels {
            for (i, bytes) in fixtures(label).into_iter().enumerate() {
                let message = decode(&bytes).expect("fixture decodes");
                out.extend(mapper.map(message, 0x50 + i as u64).expect("maps"));
            }
        }
        out
    }

    fn value<'a>(row: &'a Row, name: &str) -> &'a Kind {
        row.column(name).and_then(|c| c.value.as_ref()).and_then(|v| v.kind.as_ref()).expect(name)
    }

    fn card(id: &str) -> ScorecardKey {
        ScorecardKey { customer_id: "c1".into(), profile_id: "p1".into(), scorecard_id: id.into() }
    }

    fn address(table: &str, key: &[&str], card_id: &str) -> RowAddress {
        let key = [table].iter().chain(key).copied().collect::<Vec<_>>().join("\0");
        RowAddress { scorecard: card(card_id), key: key.into_bytes() }
    }

    #[test]
    fn insert_becomes_a_typed_event_keyed_by_its_row_in_its_scorecards_partition() {
        let out = run(&["insert_scorecard"]);
        assert_eq!(out.len(), 1);
        let Outgoing { event, destination, tombstone } = &out[0];
        let own = address("director.scorecards", &["c1", "p1", "card-1"], "card-1");
        assert_eq!(destination, &Destination::Row(own));
        assert_eq!(tombstone, &None);
        assert_eq!(event.op(), Operation::Insert);
        assert_eq!((event.schema.as_str(), event.table.as_str()), ("director", "scorecards"));
        assert_eq!(
            (event.commit_lsn, event.xid, event.seq_in_tx, event.system_id),
            (0x100, 9, 0, 42)
        );
        assert_eq!(event.contract_version, CONTRACT_VERSION);
        let names: Vec<&str> = event.key.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["customer_id", "profile_id", "scorecard_id"]);
        let row = event.new_row.as_ref().expect("new row");
        assert_eq!(value(row, "scorecard_type"), &Kind::Int(2));
        assert_eq!(value(row, "score"), &Kind::Float(4.5));
        assert_eq!(value(row, "process_interaction_at"), &Kind::TimestampUs(1_709_642_096_789_012));
        assert_eq!(value(row, "created_at"), &Kind::TimestampUs(-301_248_000_000_000));
        assert!(matches!(value(row, "template_revision"), Kind::Null(_)));
    }

    #[test]
    fn score_events_share_the_scorecard_partition_under_their_own_keys() {
        let out = run(&["insert_scorecard", "insert_score"]);
        assert_eq!(out.len(), 2);
        let (Destination::Row(card), Destination::Row(score)) =
            (&out[0].destination, &out[1].destination)
        else {
            panic!("row destinations: {:?}", (&out[0].destination, &out[1].destination));
        };
        assert_eq!(card.scorecard, score.scorecard, "one partition");
        assert_ne!(card.key, score.key, "two rows");
        assert_eq!(out[1].event.seq_in_tx, 1, "position in the transaction");
        assert_eq!(out[0].event.commit_lsn, out[1].event.commit_lsn, "one transaction");
        assert!(out[1].event.version > out[0].event.version, "and yet distinct versions");
        let row = out[1].event.new_row.as_ref().expect("row");
        assert_eq!(value(row, "not_applicable"), &Kind::Boolean(true));
    }

    #[test]
    fn unchanged_toast_is_filled_from_the_full_old_row_which_then_stays_home() {
        // REPLICA IDENTITY FULL: PostgreSQL marks the TOASTed comment unchanged in the new tuple
        // (decode::tests::update_of_other_column_marks_toasted_comment_unchanged) and logs it
        // flattened in the old one. The event carries it once, in the new row.
        let out = run(&["insert_scorecard", "update_keeps_toast"]);
        let update = &out[1].event;
        assert_eq!(update.op(), Operation::Update);
        let row = update.new_row.as_ref().expect("row");
        assert!(
            matches!(value(row, "comment"), Kind::Text(t) if t.len() > 2000),
            "{:?}",
            value(row, "comment")
        );
        assert_eq!(update.old_row, None, "same key, same routing: no old row");
    }

    #[test]
    fn a_delete_carries_only_the_identity_of_the_old_row() {
        let old = Row {
            columns: ["customer_id", "profile_id", "scorecard_id", "comment", "conversation_id"]
                .iter()
                .map(|name| Column {
                    name: (*name).into(),
                    type_oid: 25,
                    value: Some(Value::text(format!("{name}-value"))),
                })
                .collect(),
        };
        let kept = identity(SourceTable::Scorecards, &old);
        let kept: Vec<&str> = kept.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(kept, ["customer_id", "profile_id", "scorecard_id", "conversation_id"]);
    }

    #[test]
    fn update_moving_a_score_to_another_scorecard_carries_the_old_row_and_forgets_its_old_address()
    {
        let out = run(&["insert_score", "update_score_moves"]);
        assert_eq!(out.len(), 2);
        let update = &out[1];
        assert_eq!(update.event.op(), Operation::Update);
        let Destination::Row(new) = &update.destination else {
            panic!("{:?}", update.destination);
        };
        assert_eq!(new.scorecard, card("card-2"), "in the new card's partition");
        assert!(update.event.old_row_is_key_only);
        let old = update.event.old_row.as_ref().expect("old row");
        assert_eq!(value(old, "scorecard_id"), &Kind::Text("card-1".into()));
        let Destination::Row(before) = &out[0].destination else {
            panic!("{:?}", out[0].destination);
        };
        assert_eq!(
            update.tombstone,
            Some(Forget::Left(before.clone())),
            "a tombstone where it was"
        );
    }

    #[test]
    fn key_only_delete_of_a_score_is_addressed_by_its_scorecard_and_followed_by_a_tombstone() {
        let out = run(&["insert_score", "delete_score_key_only"]);
        let delete = &out[1];
        assert_eq!(delete.event.op(), Operation::Delete);
        assert!(delete.event.old_row_is_key_only);
        let Destination::Row(own) = &delete.destination else {
            panic!("{:?}", delete.destination);
        };
        assert_eq!(own.scorecard, card("card-2"));
        assert_eq!(delete.tombstone, Some(Forget::Own), "its own key");
        let names: Vec<&str> = delete.event.key.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["customer_id", "profile_id", "score_id"]);
    }

    #[test]
    fn truncate_goes_to_every_partition_once_per_table() {
        let out = run(&["truncate"]);
        let tables: Vec<&str> = out.iter().map(|o| o.event.table.as_str()).collect();
        assert_eq!(tables, ["scores", "historic_scorecard_scores"]);
        for o in &out {
            let table = SourceTable::from_name("director", &o.event.table).expect("table");
            assert_eq!(o.destination, Destination::EveryPartition(truncate_key(table)));
            assert_eq!(o.event.op(), Operation::Truncate);
            assert!(o.event.truncate.is_some_and(|t| t.restart_identity));
        }
    }

    #[test]
    fn truncate_after_writes_in_the_same_transaction_retracts_them_first() {
        let out = run(&["insert_score", "truncate"]);
        let ops: Vec<(Operation, &str)> =
            out.iter().map(|o| (o.event.op(), o.event.table.as_str())).collect();
        assert_eq!(
            ops,
            [
                (Operation::Insert, "scores"),
                (Operation::Delete, "scores"),
                (Operation::Truncate, "scores"),
                (Operation::Truncate, "historic_scorecard_scores"),
            ]
        );
        // The retraction goes where the insert went, after it, with every key column.
        assert_eq!(out[1].destination, out[0].destination);
        assert!(out[1].event.seq_in_tx > out[0].event.seq_in_tx);
        assert!(out[1].event.version > out[0].event.version, "the retraction outranks the insert");
        assert_eq!(out[1].event.key, out[0].event.key);
    }

    #[test]
    fn added_column_travels_with_its_type() {
        let out = run(&["insert_after_add_column"]);
        let row = out[0].event.new_row.as_ref().expect("row");
        assert_eq!(value(row, "reviewer"), &Kind::Text("rev".into()));
    }

    #[test]
    fn change_outside_a_transaction_or_for_an_unknown_relation_is_an_error() {
        let mut mapper = Mapper::new(1, VersionScheme::above(0, Lsn::ZERO));
        let messages = fixtures("insert_scorecard");
        let insert = decode(&messages[1]).expect("decodes");
        assert!(matches!(mapper.map(insert.clone(), 1), Err(MapError::UnknownRelation(_))));
        mapper.map(decode(&messages[0]).expect("decodes"), 0).expect("relation");
        assert!(matches!(mapper.map(insert, 1), Err(MapError::NoTransaction(_))));
    }
}
