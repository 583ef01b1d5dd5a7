//! Parked events: changes that cannot be written yet, kept (never dropped) and retried.
//!
//! A conversation scorecard whose conversation is on no shard yet, a score whose scorecard is not
//! known anywhere yet, an update whose unchanged TOAST value cannot be found: each waits here,
//! keyed by the row it changes, and is retried with backoff until it can be written. A newer
//! change of the same row supersedes the parked one (the newer one carries the row's latest
//! state). Parked messages keep their offset hold, so a restart re-reads and re-parks them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use scoresync_event::{ChangeEvent, RowVersion};

use crate::batch::MsgId;
use crate::rows::RowKey;

/// Why an event is parked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParkReason {
    /// No shard's `conversations` table holds the conversation.
    ConversationNotFound(String),
    /// The scorecard is not known on any shard nor in PostgreSQL.
    ScorecardUnknown(String),
    /// An unchanged TOAST column's stored value was not found.
    ToastValueUnknown(String),
    /// Applying needs an answer (a lookup, or earlier writes acknowledged) from a ClickHouse
    /// shard or PostgreSQL that is unavailable now.
    Unavailable(String),
}

impl ParkReason {
    /// A short label for metrics (bounded set).
    pub fn label(&self) -> &'static str {
        match self {
            ParkReason::ConversationNotFound(_) => "conversation_not_found",
            ParkReason::ScorecardUnknown(_) => "scorecard_unknown",
            ParkReason::ToastValueUnknown(_) => "toast_value_unknown",
            ParkReason::Unavailable(_) => "dependency_unavailable",
        }
    }
}

impl std::fmt::Display for ParkReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ParkReason::ConversationNotFound(id) => {
                write!(f, "conversation {id} not found on any shard")
            }
            ParkReason::ScorecardUnknown(id) => {
                write!(f, "scorecard {id} not known on any shard or in PostgreSQL")
            }
            ParkReason::ToastValueUnknown(column) => {
                write!(f, "stored value of unchanged column {column} not found")
            }
            ParkReason::Unavailable(what) => write!(f, "waiting for {what}"),
        }
    }
}

/// One parked event.
#[derive(Clone, Debug)]
pub struct Parked {
    /// The Kafka message.
    pub msg: MsgId,
    /// The event.
    pub event: ChangeEvent,
    /// Why.
    pub reason: ParkReason,
    /// When it was first parked.
    pub since: Instant,
    /// Retries so far.
    pub attempts: u32,
    /// Not retried before this instant.
    pub next_try: Instant,
}

/// A line of `scoresync status`: what is parked and why (no row values beyond the key).
#[derive(Clone, Debug, serde::Serialize)]
pub struct ParkedSummary {
    /// Table.
    pub table: String,
    /// Primary key values.
    pub key: Vec<String>,
    /// Why.
    pub reason: String,
    /// Seconds parked.
    pub parked_seconds: u64,
    /// Retries so far.
    pub attempts: u32,
    /// Kafka partition and offset.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// The parked events, one per row.
#[derive(Debug, Default)]
pub struct Park {
    rows: HashMap<RowKey, Parked>,
}

/// Retry delay after `attempts` failures: 1 s doubling to 8 s (retries are cheap: one batched
/// lookup per shard for every due event).
fn retry_delay(attempts: u32) -> Duration {
    Duration::from_secs(1_u64 << attempts.min(3))
}

impl Park {
    /// Parks `event` for `row`. Returns the message of an older parked change of the same row
    /// that this one supersedes (its holds must be released).
    pub fn park(
        &mut self,
        row: RowKey,
        msg: MsgId,
        event: ChangeEvent,
        reason: ParkReason,
    ) -> Option<MsgId> {
        let now = Instant::now();
        let superseded = self.supersede(&row, &event);
        self.rows.insert(
            row,
            Parked { msg, event, reason, since: now, attempts: 0, next_try: now + retry_delay(0) },
        );
        superseded
    }

    /// A change of `row` is being applied: an older parked change of it is dropped. Returns its
    /// message.
    pub fn supersede(&mut self, row: &RowKey, newer: &ChangeEvent) -> Option<MsgId> {
        let parked = self.rows.get(row)?;
        let older = (RowVersion::of_event(&parked.event), parked.event.seq_in_tx)
            <= (RowVersion::of_event(newer), newer.seq_in_tx);
        older.then(|| self.rows.remove(row).map(|p| p.msg)).flatten()
    }

    /// Takes out the events due for a retry (in Kafka order); callers re-park what still fails.
    pub fn due(&mut self, now: Instant) -> Vec<(RowKey, Parked)> {
        let keys: Vec<RowKey> =
            self.rows.iter().filter(|(_, p)| p.next_try <= now).map(|(k, _)| k.clone()).collect();
        let mut due: Vec<(RowKey, Parked)> =
            keys.into_iter().filter_map(|k| self.rows.remove(&k).map(|p| (k, p))).collect();
        due.sort_by_key(|(_, p)| p.msg);
        due
    }

    /// Puts back an event whose retry failed, with a longer delay.
    pub fn repark(&mut self, row: RowKey, mut parked: Parked, reason: ParkReason) {
        parked.attempts += 1;
        parked.reason = reason;
        parked.next_try = Instant::now() + retry_delay(parked.attempts);
        self.rows.insert(row, parked);
    }

    /// How many events are parked.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// True when nothing is parked.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Parked events per reason label.
    pub fn by_reason(&self) -> HashMap<&'static str, usize> {
        let mut out = HashMap::new();
        for p in self.rows.values() {
            *out.entry(p.reason.label()).or_insert(0) += 1;
        }
        out
    }

    /// Drops events of a partition this consumer no longer owns (their offsets were not stored;
    /// the new owner re-reads them).
    pub fn revoke(&mut self, partition: i32) {
        self.rows.retain(|_, p| p.msg.0 != partition);
    }

    /// Drops parked changes of `table` older than `version` (a TRUNCATE at `version` made them
    /// moot); returns their messages.
    pub fn drop_older(&mut self, table: scoresync_event::SourceTable, version: u64) -> Vec<MsgId> {
        let moot: Vec<RowKey> = self
            .rows
            .iter()
            .filter(|((t, _), p)| *t == table && RowVersion::of_event(&p.event).0 < version)
            .map(|(k, _)| k.clone())
            .collect();
        moot.into_iter().filter_map(|k| self.rows.remove(&k).map(|p| p.msg)).collect()
    }

    /// What `scoresync status` shows.
    pub fn summary(&self) -> Vec<ParkedSummary> {
        let now = Instant::now();
        let mut out: Vec<ParkedSummary> = self
            .rows
            .iter()
            .map(|((table, key), p)| ParkedSummary {
                table: table.to_string(),
                key: key.clone(),
                reason: p.reason.to_string(),
                parked_seconds: now.duration_since(p.since).as_secs(),
                attempts: p.attempts,
                partition: p.msg.0,
                offset: p.msg.1,
            })
            .collect();
        out.sort_by_key(|s| (s.partition, s.offset));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use scoresync_event::{Operation, SourceTable};

    fn event(lsn: u64, seq: u32) -> ChangeEvent {
        ChangeEvent {
            op: Operation::Insert as i32,
            commit_lsn: lsn,
            seq_in_tx: seq,
            ..Default::default()
        }
    }

    fn key(id: &str) -> RowKey {
        (SourceTable::Scorecards, vec![id.into()])
    }

    #[test]
    fn newer_change_of_the_same_row_supersedes_the_parked_one() {
        let mut park = Park::default();
        let reason = ParkReason::ConversationNotFound("conv".into());
        assert_eq!(park.park(key("a"), (0, 1), event(10, 0), reason.clone()), None);
        assert_eq!(park.supersede(&key("a"), &event(9, 0)), None, "older event does not supersede");
        assert_eq!(park.park(key("a"), (0, 2), event(11, 0), reason.clone()), Some((0, 1)));
        assert_eq!(park.len(), 1);
        assert_eq!(park.supersede(&key("a"), &event(12, 0)), Some((0, 2)));
        assert!(park.is_empty());
    }

    #[test]
    fn due_events_come_back_in_kafka_order_and_reparking_backs_off() {
        let mut park = Park::default();
        let reason = ParkReason::ScorecardUnknown("card".into());
        park.park(key("b"), (0, 7), event(1, 0), reason.clone());
        park.park(key("a"), (0, 3), event(1, 0), reason.clone());
        assert!(park.due(Instant::now()).is_empty(), "not before the first delay");
        let later = Instant::now() + Duration::from_secs(2);
        let due = park.due(later);
        assert_eq!(due.iter().map(|(_, p)| p.msg).collect::<Vec<_>>(), vec![(0, 3), (0, 7)]);
        for (k, p) in due {
            park.repark(k, p, reason.clone());
        }
        assert_eq!(park.len(), 2);
        assert!(park.due(later).is_empty(), "the second delay is longer");
        assert_eq!(park.summary()[0].attempts, 1);
        assert_eq!(park.by_reason().get("scorecard_unknown"), Some(&2));
        park.revoke(0);
        assert!(park.is_empty());
    }
}
