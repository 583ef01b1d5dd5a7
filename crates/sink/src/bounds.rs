//! The memory bounds of the sink loop: when any level reaches its bound, consumption is held back
//! (the loop keeps polling, so the member stays in its group) until every level is back under
//! half of its bound. The levels, each with its `[sink]` setting:
//! - rows not yet in ClickHouse (buffered, with the writers, move markers waiting, dead letters
//!   unacknowledged): `max_buffered_rows`;
//! - their estimated bytes (buffered and with the writers, [`crate::batch::row_bytes`]):
//!   `max_buffered_bytes`;
//! - parked events: `max_parked_events`, and their encoded bytes: `max_parked_bytes`.
//!
//! `scoresync` refuses byte bounds below four of the largest events (`kafka.max_message_bytes`),
//! so a few parked large events alone cannot keep consumption held back for ever.

use crate::config::SinkConfig;
use crate::stage::Loop;

/// One level and its bound.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Level {
    /// What is counted.
    pub what: &'static str,
    /// How much there is.
    pub level: usize,
    /// Its bound.
    pub max: usize,
}

/// What to do with consumption, given the levels and whether it is held back now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Consumption {
    /// Hold it back: this level reached its bound.
    HoldBack(Level),
    /// Resume it: every level is back under half.
    Resume,
    /// Leave it as it is.
    Keep,
}

/// The rule, with no I/O.
pub(crate) fn decide(levels: &[Level], held_back: bool) -> Consumption {
    if !held_back {
        return match levels.iter().find(|l| l.level >= l.max) {
            Some(full) => Consumption::HoldBack(*full),
            None => Consumption::Keep,
        };
    }
    match levels.iter().all(|l| l.level <= l.max / 2) {
        true => Consumption::Resume,
        false => Consumption::Keep,
    }
}

impl Loop {
    /// Rows not yet in ClickHouse: buffered, with the writers, move markers waiting, and dead
    /// letters awaiting their acknowledgement (each holds a copy of its message).
    pub(crate) fn backlog(&self) -> usize {
        self.applier.batcher.rows()
            + self.pool.in_flight_rows()
            + self.handoff.rows()
            + self.outbox.len()
    }

    /// Estimated bytes not yet in ClickHouse: rows buffered and with the writers.
    pub(crate) fn backlog_bytes(&self) -> usize {
        self.applier.batcher.bytes() + self.pool.in_flight_bytes()
    }

    fn levels(&self, c: &SinkConfig) -> [Level; 4] {
        let level = |what, level, max| Level { what, level, max };
        [
            level("buffered rows", self.backlog(), c.max_buffered_rows),
            level("buffered bytes", self.backlog_bytes(), c.max_buffered_bytes),
            level("parked events", self.park.len(), c.max_parked_events),
            level("parked bytes", self.park.bytes(), c.max_parked_bytes),
        ]
    }

    /// Holds consumption back or resumes it (see the module doc).
    pub(crate) fn hold_back_or_resume(&mut self) {
        let levels = self.levels(&self.config);
        match decide(&levels, self.group.is_held_back()) {
            Consumption::HoldBack(Level { what, level, max }) => {
                tracing::warn!(what, level, max, "buffers full: pausing consumption");
                self.group.hold_back(true);
            }
            Consumption::Resume => {
                tracing::info!(?levels, "buffers drained: resuming consumption");
                self.group.hold_back(false);
            }
            Consumption::Keep => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn levels(rows: usize, parked_bytes: usize) -> [Level; 2] {
        [
            Level { what: "buffered rows", level: rows, max: 100 },
            Level { what: "parked bytes", level: parked_bytes, max: 1_000 },
        ]
    }

    #[test]
    fn any_full_level_holds_back_and_every_level_under_half_resumes() {
        assert_eq!(decide(&levels(10, 10), false), Consumption::Keep);
        let full = decide(&levels(10, 1_000), false);
        assert!(matches!(full, Consumption::HoldBack(Level { what: "parked bytes", .. })));
        assert_eq!(decide(&levels(10, 600), true), Consumption::Keep, "bytes not under half yet");
        assert_eq!(decide(&levels(60, 400), true), Consumption::Keep, "rows not under half yet");
        assert_eq!(decide(&levels(50, 500), true), Consumption::Resume);
        assert_eq!(decide(&levels(100, 0), true), Consumption::Keep, "held back stays held");
    }
}
