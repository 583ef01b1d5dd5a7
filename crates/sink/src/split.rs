//! Conversations that several shards hold: the report. Which shard such a conversation routes to
//! is the lookup's rule (the lowest, [`crate::lookup`]); this module makes the other pipeline's
//! mistake visible, once per conversation: a warning naming the conversation and its shards,
//! `scoresync_sink_conversations_on_several_shards_total`, and the latest few in
//! `scoresync status` ([`crate::stats::SplitConversations`]).
//!
//! Memory stays bounded: the conversations already reported are remembered in an LRU of
//! [`REMEMBERED`] keys (one forgotten past that is reported and counted again when met again),
//! and at most [`LINES_PER_MINUTE`] warnings are written a minute (a pipeline that duplicates
//! thousands of conversations does not flood the log); the next line written says how many
//! went unlogged. The counter and `status` count every one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cache::{Bounded, ConversationKey};
use crate::shard::ShardIndex;
use crate::stats::{SinkStats, SplitConversation};

/// Conversations remembered as reported.
pub(crate) const REMEMBERED: usize = 10_000;
/// Most warning lines a minute.
pub(crate) const LINES_PER_MINUTE: u32 = 10;
const MINUTE: Duration = Duration::from_secs(60);

/// What became of one split conversation met by a lookup.
#[derive(Debug, PartialEq, Eq)]
enum Noted {
    /// Reported already.
    Known,
    /// New: counted, and logged with the count of new ones not logged since the last line.
    Log { unlogged: u64 },
    /// New: counted, not logged (the minute's lines are used up).
    Quiet,
}

/// The report of conversations found on several shards.
pub(crate) struct SplitReport {
    reported: Bounded<ConversationKey, ()>,
    /// When the current minute of log lines began, and the lines written in it.
    window: Option<(Instant, u32)>,
    /// New split conversations not logged since the last line.
    unlogged: u64,
    stats: Arc<SinkStats>,
}

impl SplitReport {
    /// A report that counts into `stats`.
    pub(crate) fn new(stats: Arc<SinkStats>) -> Self {
        SplitReport { reported: Bounded::new(REMEMBERED), window: None, unlogged: 0, stats }
    }

    /// A lookup found the conversation `key` on `shards` (ascending, at least two).
    pub(crate) fn found(&mut self, key: &ConversationKey, shards: &[ShardIndex]) {
        let Noted::Log { unlogged } = self.note(key, shards, Instant::now()) else { return };
        let (customer_id, profile_id, conversation_id) = key;
        tracing::warn!(
            %customer_id,
            %profile_id,
            %conversation_id,
            ?shards,
            routed_to = shards.first().copied().unwrap_or_default(),
            unlogged_since_last_line = unlogged,
            "a conversation is on several shards' conversations tables; its scorecards route to \
             the lowest shard (scoresync_sink_conversations_on_several_shards_total, \
             scoresync status)"
        );
    }

    fn note(&mut self, key: &ConversationKey, shards: &[ShardIndex], now: Instant) -> Noted {
        if self.reported.get(key).is_some() {
            return Noted::Known;
        }
        self.reported.insert(key.clone(), ());
        self.stats.conversation_split(SplitConversation {
            customer_id: key.0.clone(),
            profile_id: key.1.clone(),
            conversation_id: key.2.clone(),
            shards: shards.to_vec(),
        });
        let lines = match self.window {
            Some((began, lines)) if now.saturating_duration_since(began) < MINUTE => lines,
            _ => {
                self.window = Some((now, 0));
                0
            }
        };
        if lines >= LINES_PER_MINUTE {
            self.unlogged += 1;
            return Noted::Quiet;
        }
        if let Some((_, written)) = &mut self.window {
            *written += 1;
        }
        Noted::Log { unlogged: std::mem::take(&mut self.unlogged) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(id: usize) -> ConversationKey {
        ("c".into(), "p".into(), format!("conv-{id}"))
    }

    #[test]
    fn each_conversation_is_reported_once_and_lines_are_rate_limited() {
        let stats = Arc::new(SinkStats::default());
        let mut report = SplitReport::new(Arc::clone(&stats));
        let start = Instant::now();
        assert_eq!(report.note(&key(0), &[0, 1], start), Noted::Log { unlogged: 0 });
        assert_eq!(report.note(&key(0), &[0, 1], start), Noted::Known, "once per conversation");
        for id in 1..LINES_PER_MINUTE as usize {
            assert_eq!(report.note(&key(id), &[0, 2], start), Noted::Log { unlogged: 0 });
        }
        assert_eq!(report.note(&key(100), &[1, 2], start), Noted::Quiet, "the minute's lines used");
        assert_eq!(report.note(&key(101), &[1, 2], start + MINUTE / 2), Noted::Quiet);
        assert_eq!(
            report.note(&key(102), &[0, 1, 2], start + MINUTE),
            Noted::Log { unlogged: 2 },
            "a new minute: logged, with those left unlogged"
        );
        let seen = stats.split_conversations.lock().expect("stats").clone();
        assert_eq!(seen.total, u64::from(LINES_PER_MINUTE) + 3, "every new one is counted");
        assert_eq!(seen.latest.len(), crate::stats::SPLIT_EXAMPLES);
        let newest = seen.latest.back().expect("an example");
        assert_eq!((newest.conversation_id.as_str(), &newest.shards), ("conv-102", &vec![0, 1, 2]));
    }

    #[test]
    fn memory_is_bounded_and_a_forgotten_conversation_counts_again() {
        let stats = Arc::new(SinkStats::default());
        let mut report = SplitReport::new(Arc::clone(&stats));
        let start = Instant::now();
        for id in 0..=REMEMBERED {
            report.note(&key(id), &[0, 1], start);
        }
        assert_eq!(report.reported.len(), REMEMBERED);
        assert_ne!(report.note(&key(0), &[0, 1], start), Noted::Known, "forgotten: new again");
        assert_eq!(report.note(&key(REMEMBERED), &[0, 1], start), Noted::Known);
        let total = stats.split_conversations.lock().expect("stats").total;
        assert_eq!(total, REMEMBERED as u64 + 2);
    }
}
