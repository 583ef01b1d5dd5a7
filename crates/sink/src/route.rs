//! Shard routing, as the director app routes (seed analysis, DESIGN.md section 4).
//!
//! - A process scorecard (`scorecard_type = 2`) lives on shard `process_interaction_at` (Unix
//!   seconds, floored like Go's `time.Unix()`) modulo the shard count. The remainder is taken
//!   Euclidean-style, so times before 1970 map to a shard instead of a negative index.
//! - Any other scorecard (type NULL, 0 or 1) lives on the shard whose `conversations` table holds
//!   its conversation.
//! - Scores and historic scores live on their scorecard's shard and carry its fields
//!   ([`CardFields`], plus the conversation's start time and language).

use scoresync_event::{Row, Value};

use crate::shard::ShardIndex;

/// `scorecard_type` of a process scorecard.
pub const PROCESS_SCORECARD: i64 = 2;

/// The scorecard fields that decide routing and that children carry.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CardFields {
    /// `scorecard_type` (NULL/0 unspecified, 1 conversation, 2 process).
    pub scorecard_type: Option<i64>,
    /// `template_id`.
    pub template_id: Option<String>,
    /// `template_revision`.
    pub template_revision: Option<String>,
    /// `agent_user_id`.
    pub agent_user_id: Option<String>,
    /// `conversation_id`.
    pub conversation_id: Option<String>,
    /// `process_interaction_at`, Unix microseconds.
    pub process_interaction_at: Option<i64>,
}

/// The conversation a conversation scorecard belongs to, as the shard holding it has it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conversation {
    /// The shard whose `conversations` table holds it.
    pub shard: ShardIndex,
    /// `conversation_start_time`, Unix seconds.
    pub start_time: i64,
    /// `language_code`.
    pub language_code: String,
}

/// Where a scorecard goes, before any lookup.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    /// A process scorecard: the shard is known.
    Process(ShardIndex),
    /// A conversation scorecard: the shard holding this conversation.
    Conversation(String),
}

/// A scorecard that cannot be routed at all (dead-lettered: retrying cannot help).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// Process scorecard without `process_interaction_at`.
    #[error("process scorecard (scorecard_type 2) has no process_interaction_at")]
    ProcessWithoutTime,
    /// Conversation scorecard without `conversation_id`.
    #[error("conversation scorecard (scorecard_type {0:?}) has no conversation_id")]
    ConversationWithoutId(Option<i64>),
}

fn text(row: &Row, name: &str) -> Option<String> {
    row.column(name).and_then(|c| c.value.as_ref()).and_then(Value::as_text).map(str::to_owned)
}

fn int(row: &Row, name: &str) -> Option<i64> {
    let value = row.column(name).and_then(|c| c.value.as_ref())?;
    value.as_int().or_else(|| value.as_timestamp_us())
}

impl CardFields {
    /// The fields of a `director.scorecards` row.
    pub fn from_row(row: &Row) -> CardFields {
        CardFields {
            scorecard_type: int(row, "scorecard_type"),
            template_id: text(row, "template_id"),
            template_revision: text(row, "template_revision"),
            agent_user_id: text(row, "agent_user_id"),
            conversation_id: text(row, "conversation_id"),
            process_interaction_at: int(row, "process_interaction_at"),
        }
    }

    /// True for a process scorecard.
    pub fn is_process(&self) -> bool {
        self.scorecard_type == Some(PROCESS_SCORECARD)
    }

    /// Where this scorecard goes, given `shards` shards.
    pub fn route(&self, shards: usize) -> Result<Route, RouteError> {
        if self.is_process() {
            let at = self.process_interaction_at.ok_or(RouteError::ProcessWithoutTime)?;
            return Ok(Route::Process(process_shard(at, shards)));
        }
        match &self.conversation_id {
            Some(id) => Ok(Route::Conversation(id.clone())),
            None => Err(RouteError::ConversationWithoutId(self.scorecard_type)),
        }
    }
}

/// The shard of a process scorecard: Unix seconds (floored) modulo the shard count, never
/// negative.
pub fn process_shard(process_interaction_at_us: i64, shards: usize) -> ShardIndex {
    let seconds = process_interaction_at_us.div_euclid(1_000_000);
    let shards = i64::try_from(shards.max(1)).unwrap_or(i64::MAX);
    usize::try_from(seconds.rem_euclid(shards)).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use scoresync_event::Column;

    fn card(kind: Option<i64>, pia: Option<i64>, conversation: Option<&str>) -> CardFields {
        CardFields {
            scorecard_type: kind,
            process_interaction_at: pia,
            conversation_id: conversation.map(str::to_owned),
            ..Default::default()
        }
    }

    #[test]
    fn process_scorecards_route_by_unix_seconds_modulo_shards() {
        // 2024-05-01T10:00:00Z = 1714557600 s, even.
        assert_eq!(process_shard(1_714_557_600_000_000, 2), 0);
        assert_eq!(process_shard(1_714_557_601_999_999, 2), 1, "sub-second part is dropped");
        assert_eq!(process_shard(1_714_557_601_000_000, 3), 1_714_557_601 % 3);
        let routed = card(Some(2), Some(1_714_557_601_000_000), Some("conv")).route(2);
        assert_eq!(routed, Ok(Route::Process(1)), "type 2 ignores the conversation");
    }

    #[test]
    fn times_before_1970_do_not_panic_and_floor_like_go() {
        // -0.5 s is second -1 (floor), which is odd.
        assert_eq!(process_shard(-500_000, 2), 1);
        assert_eq!(process_shard(-2_000_000, 2), 0);
        assert_eq!(
            process_shard(i64::MIN, 3),
            (i64::MIN.div_euclid(1_000_000)).rem_euclid(3) as usize
        );
        for us in [i64::MIN, -1, 0, 1, i64::MAX] {
            for shards in 1..5 {
                assert!(process_shard(us, shards) < shards);
            }
        }
    }

    #[test]
    fn other_types_route_by_conversation() {
        for kind in [None, Some(0), Some(1)] {
            assert_eq!(
                card(kind, None, Some("c-1")).route(2),
                Ok(Route::Conversation("c-1".into()))
            );
        }
        assert_eq!(card(Some(2), None, None).route(2), Err(RouteError::ProcessWithoutTime));
        assert_eq!(
            card(Some(1), None, None).route(2),
            Err(RouteError::ConversationWithoutId(Some(1)))
        );
    }

    #[test]
    fn the_card_fields_children_carry_are_the_events_list() {
        // Verify reads exactly scoresync_event::table::CARD_FIELDS of a child's scorecard.
        let row = Row {
            columns: scoresync_event::table::CARD_FIELDS
                .iter()
                .map(|name| Column {
                    name: (*name).into(),
                    type_oid: 25,
                    value: Some(if name.ends_with("_type") || name.ends_with("_at") {
                        Value::int(2)
                    } else {
                        Value::text("x")
                    }),
                })
                .collect(),
        };
        let fields = CardFields::from_row(&row);
        assert_eq!(
            fields,
            CardFields {
                scorecard_type: Some(2),
                template_id: Some("x".into()),
                template_revision: Some("x".into()),
                agent_user_id: Some("x".into()),
                conversation_id: Some("x".into()),
                process_interaction_at: Some(2),
            },
            "every field is read from one of CARD_FIELDS"
        );
    }

    #[test]
    fn fields_come_from_typed_row_values() {
        let row = Row {
            columns: vec![
                Column { name: "scorecard_type".into(), type_oid: 21, value: Some(Value::int(2)) },
                Column {
                    name: "process_interaction_at".into(),
                    type_oid: 1184,
                    value: Some(Value::timestamp_us(5)),
                },
                Column { name: "template_id".into(), type_oid: 25, value: Some(Value::text("t")) },
                Column { name: "agent_user_id".into(), type_oid: 25, value: Some(Value::null()) },
            ],
        };
        let fields = CardFields::from_row(&row);
        assert!(fields.is_process());
        assert_eq!(fields.process_interaction_at, Some(5));
        assert_eq!(fields.template_id.as_deref(), Some("t"));
        assert_eq!(fields.agent_user_id, None);
    }
}
