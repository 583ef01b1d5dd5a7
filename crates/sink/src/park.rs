//! Parked events: changes that cannot be written yet, kept (never dropped) and retried.
//!
//! A conversation scorecard whose conversation is on no shard yet, a score whose scorecard is not
//! known anywhere yet, an update whose unchanged TOAST value cannot be found: each waits here,
//! keyed by the row it changes, and is retried with backoff until it can be written. A newer
//! change of the same row supersedes the parked one (the newer one carries the row's latest
//! state). Parked messages keep their offset hold, so a restart re-reads and re-parks them.
//!
//! Two clocks decide when a parked event is tried again: its own backoff ([`retry_delay`], 1 s
//! doubling to 8 s; a woken event is due at once), and the loop's retry round, every
//! `sink.park_retry_ms`, which takes what is due. How the outcome of a retry is settled (applied,
//! parked again, or dead-lettered once a scorecard stayed unknown too long) is in
//! [`crate::settle`].
//!
//! The changes of one scorecard (the card, its scores, its historic scores) are applied in
//! commit order: while one of them is parked, later ones of the same scorecard park behind it
//! ([`ParkReason::BehindEarlierChange`]). Otherwise a card move or a field refresh, which stamps
//! the children it copies with the card's version, could overtake a parked child change and
//! make it lose, or a parked card's delete markers could lose to children written after it.
//!
//! A TRUNCATE (one copy in every partition) parks while its delete markers are written, which
//! takes as long as it takes ([`crate::apply`]); every later change of its partition parks
//! behind it ([`ParkReason::BehindTruncate`]), so nothing written after a TRUNCATE (a card moving
//! with its children, say) can meet the rows it removes. Each partition's copy is its own parked
//! entry (keyed by partition), so one copy never supersedes another's hold.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use prost::Message as _;
use scoresync_event::{ChangeEvent, Operation, RowVersion, ScorecardKey};

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
    /// An earlier change of the same scorecard (the card or one of its children) is parked; the
    /// scorecard's changes are applied in commit order, so this one waits behind it.
    BehindEarlierChange(String),
    /// This TRUNCATE's delete markers are being written (however long that takes).
    TruncateRunning(String),
    /// An earlier TRUNCATE in the same partition is not applied yet: every later change of the
    /// partition waits for it (a change after it must never meet rows it removes).
    BehindTruncate(String),
}

impl ParkReason {
    /// Every label [`ParkReason::label`] gives, for metrics that export each one (also at zero).
    pub const LABELS: [&'static str; 7] = [
        "conversation_not_found",
        "scorecard_unknown",
        "toast_value_unknown",
        "dependency_unavailable",
        "behind_parked_change",
        "truncate_running",
        "behind_truncate",
    ];

    /// A short label for metrics (bounded set).
    pub fn label(&self) -> &'static str {
        match self {
            ParkReason::ConversationNotFound(_) => "conversation_not_found",
            ParkReason::ScorecardUnknown(_) => "scorecard_unknown",
            ParkReason::ToastValueUnknown(_) => "toast_value_unknown",
            ParkReason::Unavailable(_) => "dependency_unavailable",
            ParkReason::BehindEarlierChange(_) => "behind_parked_change",
            ParkReason::TruncateRunning(_) => "truncate_running",
            ParkReason::BehindTruncate(_) => "behind_truncate",
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
            ParkReason::BehindEarlierChange(id) => {
                write!(f, "behind an earlier parked change of scorecard {id}")
            }
            ParkReason::TruncateRunning(table) => {
                write!(f, "TRUNCATE of {table}: writing its delete markers on every shard")
            }
            ParkReason::BehindTruncate(table) => {
                write!(f, "behind the TRUNCATE of {table} earlier in this partition")
            }
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
    /// Since when it has been parked for its current reason.
    pub reason_since: Instant,
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
    /// The parked messages of each scorecard (card and children), for the ordering rule.
    by_card: HashMap<ScorecardKey, BTreeMap<MsgId, RowKey>>,
    /// Parked TRUNCATEs (message to table): every later message of their partition waits.
    truncates: BTreeMap<MsgId, String>,
    /// Encoded size of the parked events, for `sink.max_parked_bytes`.
    bytes: usize,
}

/// Retry delay after `attempts` failures: 1 s doubling to 8 s (retries are cheap: one batched
/// lookup per shard for every due event).
fn retry_delay(attempts: u32) -> Duration {
    Duration::from_secs(1_u64 << attempts.min(3))
}

/// True when `parked` is strictly older than `newer`.
fn older(parked: &ChangeEvent, newer: &ChangeEvent) -> bool {
    (RowVersion::of_event(parked), parked.seq_in_tx)
        < (RowVersion::of_event(newer), newer.seq_in_tx)
}

/// True when `parked` is older than (or the same change as) `newer`.
fn not_newer(parked: &ChangeEvent, newer: &ChangeEvent) -> bool {
    (RowVersion::of_event(parked), parked.seq_in_tx)
        <= (RowVersion::of_event(newer), newer.seq_in_tx)
}

impl Park {
    fn insert(&mut self, row: RowKey, parked: Parked) {
        if let Some(card) = ScorecardKey::of_event(&parked.event) {
            self.by_card.entry(card).or_default().insert(parked.msg, row.clone());
        }
        if parked.event.op() == Operation::Truncate {
            self.truncates.insert(parked.msg, parked.event.table.clone());
        }
        self.bytes += parked.event.encoded_len();
        if let Some(replaced) = self.rows.insert(row, parked) {
            self.bytes -= replaced.event.encoded_len();
            self.forget_card(&replaced);
        }
    }

    fn remove(&mut self, row: &RowKey) -> Option<Parked> {
        let parked = self.rows.remove(row)?;
        self.bytes -= parked.event.encoded_len();
        self.forget_card(&parked);
        Some(parked)
    }

    fn forget_card(&mut self, parked: &Parked) {
        self.truncates.remove(&parked.msg);
        let Some(card) = ScorecardKey::of_event(&parked.event) else { return };
        if let Some(msgs) = self.by_card.get_mut(&card) {
            msgs.remove(&parked.msg);
            if msgs.is_empty() {
                self.by_card.remove(&card);
            }
        }
    }

    /// Parks `event` for `row`. Returns the message that is no longer needed (its holds must be
    /// released): an older parked change of the same row that this one supersedes, or this one
    /// itself when the change already parked for the row is newer (a replayed duplicate).
    pub fn park(
        &mut self,
        row: RowKey,
        msg: MsgId,
        event: ChangeEvent,
        reason: ParkReason,
    ) -> Option<MsgId> {
        let superseded = match self.rows.get(&row) {
            // The parked change is newer, or the same change (a duplicate): it keeps its place.
            Some(parked) if !older(&parked.event, &event) => return Some(msg),
            Some(_) => self.remove(&row).map(|p| p.msg),
            None => None,
        };
        if superseded.is_some() {
            // What waited behind the superseded change is looked at again.
            self.wake_scorecard(&event);
        }
        let now = Instant::now();
        let parked = Parked {
            msg,
            event,
            reason,
            since: now,
            reason_since: now,
            attempts: 0,
            next_try: now + retry_delay(0),
        };
        self.insert(row, parked);
        superseded
    }

    /// A newer change of `row` is about to be applied or parked, superseding a parked older one:
    /// it takes over the older one's side effect. When the older change moved the row (its
    /// `old_row` names the key or scorecard the row had before), the copy there still has to go,
    /// and the newer change (whose own `old_row`, if any, names a state that was never written)
    /// carries that identity instead.
    pub fn inherit(&self, row: &RowKey, newer: &mut ChangeEvent) {
        let Some(parked) = self.rows.get(row) else { return };
        if let Some(old) = &parked.event.old_row
            && older(&parked.event, newer)
        {
            newer.old_row = Some(old.clone());
            newer.old_row_is_key_only = parked.event.old_row_is_key_only;
        }
    }

    /// A change of `row` is being applied: an older parked change of it is dropped. Returns its
    /// message.
    pub fn supersede(&mut self, row: &RowKey, newer: &ChangeEvent) -> Option<MsgId> {
        let parked = self.rows.get(row)?;
        let superseded =
            not_newer(&parked.event, newer).then(|| self.remove(row).map(|p| p.msg)).flatten();
        if superseded.is_some() {
            self.wake_scorecard(newer);
        }
        superseded
    }

    /// The reason `event` (message `msg`, changing `row`) must wait: a TRUNCATE parked earlier in
    /// its partition, or an earlier parked change of its scorecard. Not counted for the latter: a parked change of the same row (this one supersedes
    /// it, or is a duplicate of it), and children parked because their scorecard is unknown (they
    /// wait for the card's own changes, which must not wait for them).
    pub fn behind(&self, row: &RowKey, event: &ChangeEvent, msg: MsgId) -> Option<ParkReason> {
        let (partition, _) = msg;
        if let Some((_, table)) = self.truncates.range((partition, i64::MIN)..msg).next() {
            return Some(ParkReason::BehindTruncate(table.clone()));
        }
        let card = ScorecardKey::of_event(event)?;
        let blocking =
            self.by_card.get(&card)?.iter().take_while(|(m, _)| **m < msg).any(|(_, r)| {
                r != row
                    && self
                        .rows
                        .get(r)
                        .is_some_and(|p| !matches!(p.reason, ParkReason::ScorecardUnknown(_)))
            });
        blocking.then(|| ParkReason::BehindEarlierChange(card.scorecard_id.clone()))
    }

    /// A TRUNCATE of `partition` was applied: the changes parked behind it are due now.
    pub fn wake_partition(&mut self, partition: i32) {
        let now = Instant::now();
        for parked in self.rows.values_mut() {
            if parked.msg.0 == partition && matches!(parked.reason, ParkReason::BehindTruncate(_)) {
                parked.next_try = now;
            }
        }
    }

    /// An event of `event`'s scorecard was applied: the changes of that scorecard parked behind
    /// it are due now rather than after their backoff.
    pub fn wake_scorecard(&mut self, event: &ChangeEvent) {
        let Some(card) = ScorecardKey::of_event(event) else { return };
        let Some(rows) = self.by_card.get(&card) else { return };
        let now = Instant::now();
        for row in rows.values() {
            if let Some(parked) = self.rows.get_mut(row)
                && matches!(parked.reason, ParkReason::BehindEarlierChange(_))
            {
                parked.next_try = now;
            }
        }
    }

    /// True when another change of `event`'s scorecard than message `msg` is parked (a child
    /// waiting for its card must not give up while the card itself waits).
    pub fn card_has_other(&self, event: &ChangeEvent, msg: MsgId) -> bool {
        let Some(card) = ScorecardKey::of_event(event) else { return false };
        self.by_card.get(&card).is_some_and(|msgs| msgs.keys().any(|m| *m != msg))
    }

    /// Takes out the events due for a retry (in Kafka order); callers re-park what still fails.
    pub fn due(&mut self, now: Instant) -> Vec<(RowKey, Parked)> {
        let keys: Vec<RowKey> =
            self.rows.iter().filter(|(_, p)| p.next_try <= now).map(|(k, _)| k.clone()).collect();
        let mut due: Vec<(RowKey, Parked)> =
            keys.into_iter().filter_map(|k| self.remove(&k).map(|p| (k, p))).collect();
        due.sort_by_key(|(_, p)| p.msg);
        due
    }

    /// Puts back an event whose retry failed, with a longer delay.
    pub fn repark(&mut self, row: RowKey, mut parked: Parked, reason: ParkReason) {
        parked.attempts += 1;
        if reason.label() != parked.reason.label() {
            parked.reason_since = Instant::now();
        }
        parked.reason = reason;
        parked.next_try = Instant::now() + retry_delay(parked.attempts);
        self.insert(row, parked);
    }

    /// How many events are parked.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Encoded bytes of the parked events.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// True when nothing is parked.
    #[cfg(test)]
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
    /// the new owner re-reads them); returns their messages, whose holds must be released.
    pub fn revoke(&mut self, partition: i32) -> Vec<MsgId> {
        self.take(|p| p.msg.0 == partition)
    }

    /// Drops parked changes of `table` older than `version` (a TRUNCATE at `version` made them
    /// moot); returns their messages.
    pub fn drop_older(&mut self, table: scoresync_event::SourceTable, version: u64) -> Vec<MsgId> {
        self.take(|p| {
            scoresync_event::SourceTable::from_name(&p.event.schema, &p.event.table) == Some(table)
                && RowVersion::of_event(&p.event).0 < version
        })
    }

    fn take(&mut self, which: impl Fn(&Parked) -> bool) -> Vec<MsgId> {
        let keys: Vec<RowKey> =
            self.rows.iter().filter(|(_, p)| which(p)).map(|(k, _)| k.clone()).collect();
        keys.into_iter().filter_map(|k| self.remove(&k).map(|p| p.msg)).collect()
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
            version: lsn << 16 | u64::from(seq),
            ..Default::default()
        }
    }

    fn key(id: &str) -> RowKey {
        (SourceTable::Scorecards, vec![id.into()])
    }

    #[test]
    fn every_reason_has_a_listed_label() {
        let reasons = [
            ParkReason::ConversationNotFound("c".into()),
            ParkReason::ScorecardUnknown("s".into()),
            ParkReason::ToastValueUnknown("comment".into()),
            ParkReason::Unavailable("shard 0".into()),
            ParkReason::BehindEarlierChange("s".into()),
            ParkReason::TruncateRunning("director.scores".into()),
            ParkReason::BehindTruncate("director.scores".into()),
        ];
        let labels: Vec<&str> = reasons.iter().map(ParkReason::label).collect();
        assert_eq!(labels, ParkReason::LABELS);
    }

    #[test]
    fn a_newer_change_takes_over_the_old_identity_of_the_parked_change_it_supersedes() {
        let mut park = Park::default();
        let old_home = scoresync_event::Row { columns: vec![] };
        let moved = ChangeEvent { old_row: Some(old_home.clone()), ..event(10, 0) };
        park.park(key("s"), (0, 1), moved, ParkReason::Unavailable("shard 1".into()));
        let mut newer = event(20, 0);
        park.inherit(&key("s"), &mut newer);
        assert_eq!(newer.old_row, Some(old_home), "the old copy still has to go");
        let mut older_still = event(5, 0);
        park.inherit(&key("s"), &mut older_still);
        assert_eq!(older_still.old_row, None, "an older change takes nothing over");
    }

    #[test]
    fn a_parked_truncate_holds_back_its_partition_and_only_its_partition() {
        let mut park = Park::default();
        let truncate = ChangeEvent {
            op: Operation::Truncate as i32,
            table: "scores".into(),
            version: 10,
            ..Default::default()
        };
        let row = (SourceTable::Scores, vec!["TRUNCATE in partition 1".into()]);
        park.park(row, (1, 5), truncate, ParkReason::TruncateRunning("scores".into()));
        let later = event(20, 0);
        let other = key("x");
        assert!(matches!(park.behind(&other, &later, (1, 6)), Some(ParkReason::BehindTruncate(_))));
        assert_eq!(park.behind(&other, &later, (1, 4)), None, "earlier in the partition");
        assert_eq!(park.behind(&other, &later, (2, 6)), None, "another partition");
        let (_, parked) = park.due(Instant::now() + Duration::from_secs(60)).remove(0);
        assert_eq!(parked.msg, (1, 5));
        assert_eq!(park.behind(&other, &later, (1, 6)), None, "released with the TRUNCATE");
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
    fn a_replayed_older_change_does_not_replace_the_newer_parked_one() {
        let mut park = Park::default();
        let reason = ParkReason::ConversationNotFound("conv".into());
        assert_eq!(park.park(key("a"), (0, 5), event(20, 0), reason.clone()), None);
        assert_eq!(park.park(key("a"), (0, 9), event(10, 0), reason.clone()), Some((0, 9)));
        assert_eq!(park.summary()[0].offset, 5, "the newer change stays parked");
        assert_eq!(park.park(key("a"), (0, 12), event(20, 0), reason), Some((0, 12)));
        assert_eq!(park.summary()[0].offset, 5, "a duplicate does not take the parked one's place");
    }

    fn card_event(id: &str, table: &str, lsn: u64) -> ChangeEvent {
        let text = |name: &str, v: &str| scoresync_event::Column {
            name: name.into(),
            type_oid: 25,
            value: Some(scoresync_event::Value::text(v)),
        };
        ChangeEvent {
            table: table.into(),
            schema: "director".into(),
            new_row: Some(scoresync_event::Row {
                columns: vec![
                    text("customer_id", "c"),
                    text("profile_id", "p"),
                    text("scorecard_id", id),
                ],
            }),
            ..event(lsn, 0)
        }
    }

    #[test]
    fn later_changes_of_a_scorecard_wait_behind_a_parked_one_and_wake_with_it() {
        let mut park = Park::default();
        let card = card_event("s1", "scorecards", 10);
        park.park(key("s1"), (0, 4), card.clone(), ParkReason::ConversationNotFound("x".into()));
        let score = card_event("s1", "scores", 11);
        let behind = ParkReason::BehindEarlierChange("s1".into());
        let score_row: RowKey = (SourceTable::Scores, vec!["sc1".into()]);
        assert_eq!(park.behind(&score_row, &score, (0, 6)), Some(behind.clone()));
        let other = card_event("s2", "scores", 11);
        assert_eq!(park.behind(&score_row, &other, (0, 6)), None, "other cards go on");
        assert_eq!(
            park.behind(&score_row, &score, (0, 3)),
            None,
            "an earlier message is not behind"
        );
        park.park(score_row, (0, 6), score, behind.clone());

        // A retry round: the card comes first and still fails, so the score stays behind it.
        let round = park.due(Instant::now() + Duration::from_millis(1500));
        assert_eq!(round.iter().map(|(_, p)| p.msg).collect::<Vec<_>>(), vec![(0, 4), (0, 6)]);
        for (row, parked) in round {
            let reason =
                park.behind(&row, &parked.event, parked.msg).unwrap_or(parked.reason.clone());
            park.repark(row, parked, reason);
        }
        assert_eq!(park.summary()[1].reason, behind.to_string());
        assert!(park.due(Instant::now() + Duration::from_millis(1500)).is_empty(), "backed off");

        // The card is applied (a newer change of it superseded the parked one): the score is due
        // at once, and nothing holds it back any more.
        let newer_card = card_event("s1", "scorecards", 12);
        assert_eq!(park.supersede(&key("s1"), &newer_card), Some((0, 4)));
        park.wake_scorecard(&newer_card);
        let due = park.due(Instant::now());
        assert_eq!(due.len(), 1, "woken by the card's application");
        assert_eq!(park.behind(&due[0].0, &due[0].1.event, due[0].1.msg), None);
    }

    #[test]
    fn children_waiting_for_an_unknown_scorecard_do_not_hold_its_card_back() {
        let mut park = Park::default();
        let score = card_event("s1", "scores", 5);
        let score_row: RowKey = (SourceTable::Scores, vec!["sc1".into()]);
        park.park(score_row, (0, 1), score, ParkReason::ScorecardUnknown("s1".into()));
        let card = card_event("s1", "scorecards", 10);
        assert_eq!(park.behind(&key("s1"), &card, (0, 2)), None);
        // A duplicate of a parked change is not behind its own earlier copy.
        park.park(key("s1"), (0, 2), card.clone(), ParkReason::ConversationNotFound("x".into()));
        assert_eq!(park.behind(&key("s1"), &card, (0, 3)), None);
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
