//! What a replay leaves on the state topic while it runs and when it ends (under
//! [`record_key`]), so that the daemon exports its progress (`crate::sampler`): the latest replay
//! of the pipeline wins. Best effort: a replay whose record cannot be written still replays, and
//! says so once.

use error_reporter::Report;

use scoresync_event::clock::unix_seconds;
use scoresync_source::state::{RECORD_PATIENCE, StateStore};

use crate::config::Config;

/// The state-topic key of the latest replay of the pipeline on `slot`.
pub fn record_key(slot: &str) -> String {
    format!("replay\0{slot}")
}

/// Where a replay stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Reading and applying.
    Running,
    /// Every partition applied up to its end.
    Done,
    /// Stopped before the end (the sink failed, or SIGTERM).
    Stopped,
}

/// One replay's progress.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Recorded {
    /// Its consumer group.
    pub group: String,
    /// When it started (Unix seconds).
    pub started_unix: u64,
    /// When this record was written (Unix seconds).
    pub updated_unix: u64,
    /// Messages it reads.
    pub messages_total: u64,
    /// Messages applied so far.
    pub messages_done: u64,
    /// Where it stands.
    pub phase: Phase,
}

/// Writes a replay's [`Recorded`] progress.
pub struct Reporter {
    state: Option<StateStore>,
    slot: String,
    record: Recorded,
}

impl Reporter {
    /// A reporter for the replay in `group` over `total` messages.
    pub fn new(config: &Config, group: &str, total: u64) -> Reporter {
        let now = unix_seconds();
        let state = StateStore::new(&config.kafka)
            .map_err(|e| eprintln!("replay: its progress will not be recorded: {}", Report::new(e)))
            .ok();
        let record = Recorded {
            group: group.to_owned(),
            started_unix: now,
            updated_unix: now,
            messages_total: total,
            messages_done: 0,
            phase: Phase::Running,
        };
        Reporter { state, slot: config.postgres.slot.clone(), record }
    }

    /// Messages applied as last recorded.
    pub fn done(&self) -> u64 {
        self.record.messages_done
    }

    /// Records `done` messages applied, in `phase`; after a failure, stops trying.
    pub async fn report(&mut self, done: u64, phase: Phase) {
        let Some(state) = &self.state else { return };
        self.record.messages_done = done;
        self.record.phase = phase;
        self.record.updated_unix = unix_seconds();
        let key = record_key(&self.slot);
        let saved = state.save_keyed_within(&self.slot, &key, &self.record, RECORD_PATIENCE);
        if let Err(error) = saved.await {
            eprintln!("replay: its progress will not be recorded any more: {}", Report::new(error));
            self.state = None;
        }
    }
}
