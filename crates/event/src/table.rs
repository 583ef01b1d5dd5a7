//! The three source tables and the scorecard identity.
//!
//! Every change of one scorecard (the card, its scores, its historic scores) must land in one Kafka
//! partition so the sink sees them in commit order. [`ScorecardKey`] is that identity:
//! `(customer_id, profile_id, scorecard_id)`, which all three tables carry.

use crate::v1::{ChangeEvent, Column, Row, value::Kind};

/// The PostgreSQL schema of the source tables.
pub const SOURCE_SCHEMA: &str = "director";

/// One of the three replicated tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SourceTable {
    /// `director.scorecards`.
    Scorecards,
    /// `director.scores`.
    Scores,
    /// `director.historic_scorecard_scores`.
    HistoricScorecardScores,
}

impl SourceTable {
    /// All source tables, parents first.
    pub const ALL: [SourceTable; 3] =
        [SourceTable::Scorecards, SourceTable::Scores, SourceTable::HistoricScorecardScores];

    /// The table name (also the name of its ClickHouse target table).
    pub fn name(self) -> &'static str {
        match self {
            SourceTable::Scorecards => "scorecards",
            SourceTable::Scores => "scores",
            SourceTable::HistoricScorecardScores => "historic_scorecard_scores",
        }
    }

    /// The primary-key columns, in key order.
    pub fn primary_key(self) -> &'static [&'static str] {
        match self {
            SourceTable::Scorecards => &["customer_id", "profile_id", "scorecard_id"],
            SourceTable::Scores => &["customer_id", "profile_id", "score_id"],
            SourceTable::HistoricScorecardScores => {
                &["customer_id", "profile_id", "scorecard_id", "revision", "criterion_id"]
            }
        }
    }

    /// The columns that say which row a change is about and where it lives: the primary key, the
    /// scorecard it belongs to, and for scorecards the routing fields. An event's `old_row` holds
    /// only these (see `old_row` in the contract).
    pub fn identity_columns(self) -> &'static [&'static str] {
        match self {
            SourceTable::Scorecards => &[
                "customer_id",
                "profile_id",
                "scorecard_id",
                "scorecard_type",
                "conversation_id",
                "process_interaction_at",
            ],
            SourceTable::Scores => &["customer_id", "profile_id", "score_id", "scorecard_id"],
            SourceTable::HistoricScorecardScores => self.primary_key(),
        }
    }

    /// True for the tables whose rows belong to a scorecard by `scorecard_id` and live on its
    /// shard (scores, historic scores); false for the scorecards themselves.
    pub fn is_child(self) -> bool {
        self != SourceTable::Scorecards
    }

    /// The table named `schema.table`, if it is one of ours.
    pub fn from_name(schema: &str, table: &str) -> Option<SourceTable> {
        if schema != SOURCE_SCHEMA {
            return None;
        }
        SourceTable::ALL.into_iter().find(|t| t.name() == table)
    }
}

impl std::fmt::Display for SourceTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SOURCE_SCHEMA}.{}", self.name())
    }
}

/// The scorecard columns that route a scorecard and that its children carry in ClickHouse (the
/// sink's `CardFields`): a child's expected row needs exactly these of its scorecard.
pub const CARD_FIELDS: [&str; 6] = [
    "scorecard_type",
    "template_id",
    "template_revision",
    "agent_user_id",
    "conversation_id",
    "process_interaction_at",
];

/// The identity of a scorecard: the partition key of every change that belongs to it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ScorecardKey {
    /// `customer_id`.
    pub customer_id: String,
    /// `profile_id`.
    pub profile_id: String,
    /// `scorecard_id`.
    pub scorecard_id: String,
}

impl ScorecardKey {
    /// The scorecard an event belongs to, read from its new row, old row or key (in that order).
    /// `None` when none of them holds all three columns as text (for example a TRUNCATE).
    pub fn of_event(event: &ChangeEvent) -> Option<ScorecardKey> {
        let rows = [event.new_row.as_ref(), event.old_row.as_ref()];
        rows.into_iter()
            .flatten()
            .map(|row| row.columns.as_slice())
            .chain(std::iter::once(event.key.as_slice()))
            .find_map(Self::of_columns)
    }

    /// The scorecard `row` belongs to; `None` when it lacks one of the three columns as text.
    pub fn of_row(row: &Row) -> Option<ScorecardKey> {
        Self::of_columns(&row.columns)
    }

    fn of_columns(columns: &[Column]) -> Option<ScorecardKey> {
        let text = |name: &str| {
            columns.iter().find(|c| c.name == name).and_then(|c| match &c.value.as_ref()?.kind {
                Some(Kind::Text(s)) => Some(s.clone()),
                _ => None,
            })
        };
        Some(ScorecardKey {
            customer_id: text("customer_id")?,
            profile_id: text("profile_id")?,
            scorecard_id: text("scorecard_id")?,
        })
    }

    /// The bytes the change-topic partition is chosen from ([`ScorecardKey::partition`]): the
    /// three parts joined by NUL (which PostgreSQL text cannot contain), so distinct scorecards
    /// never collide.
    pub fn partition_key(&self) -> Vec<u8> {
        [self.customer_id.as_str(), self.profile_id.as_str(), self.scorecard_id.as_str()]
            .join("\0")
            .into_bytes()
    }
}

impl ChangeEvent {
    /// The event's key columns as `name=value, ...`, for error messages (never for logs: key
    /// values are row contents). Values as [`Value::to_text`](crate::Value::to_text) gives them;
    /// a value without text form (NULL, which a primary key cannot hold) in its debug form, an
    /// absent value as nothing.
    pub fn key_text(&self) -> String {
        self.key
            .iter()
            .map(|c| {
                let value = c
                    .value
                    .as_ref()
                    .map_or_else(String::new, |v| v.to_text().unwrap_or_else(|| format!("{v:?}")));
                format!("{}={value}", c.name)
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

impl Row {
    /// The column named `name`, if the row has it.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1::{Operation, Value};

    fn text(name: &str, v: &str) -> Column {
        Column { name: name.into(), type_oid: 25, value: Some(Value::text(v)) }
    }

    #[test]
    fn score_key_comes_from_its_row_not_its_primary_key() {
        let event = ChangeEvent {
            table: "scores".into(),
            op: Operation::Insert as i32,
            key: vec![text("customer_id", "c"), text("profile_id", "p"), text("score_id", "s1")],
            new_row: Some(Row {
                columns: vec![
                    text("customer_id", "c"),
                    text("profile_id", "p"),
                    text("score_id", "s1"),
                    text("scorecard_id", "card"),
                ],
            }),
            ..Default::default()
        };
        let key = ScorecardKey::of_event(&event).expect("key");
        assert_eq!(key.scorecard_id, "card");
        assert_eq!(key.partition_key(), b"c\0p\0card".to_vec());
    }

    #[test]
    fn delete_key_falls_back_to_old_row() {
        let event = ChangeEvent {
            op: Operation::Delete as i32,
            old_row: Some(Row {
                columns: vec![
                    text("customer_id", "c"),
                    text("profile_id", "p"),
                    text("score_id", "s"),
                    text("scorecard_id", "card"),
                ],
            }),
            ..Default::default()
        };
        assert_eq!(ScorecardKey::of_event(&event).map(|k| k.scorecard_id), Some("card".into()));
    }

    #[test]
    fn truncate_has_no_scorecard() {
        let event = ChangeEvent { op: Operation::Truncate as i32, ..Default::default() };
        assert_eq!(ScorecardKey::of_event(&event), None);
    }

    #[test]
    fn key_text_names_each_key_column_in_order() {
        let event = ChangeEvent {
            key: vec![
                text("customer_id", "c"),
                Column { name: "revision".into(), type_oid: 20, value: Some(Value::int(3)) },
                Column { name: "criterion_id".into(), type_oid: 25, value: None },
            ],
            ..Default::default()
        };
        assert_eq!(event.key_text(), "customer_id=c, revision=3, criterion_id=");
        assert_eq!(ChangeEvent::default().key_text(), "");
    }

    #[test]
    fn only_director_tables_are_known() {
        assert_eq!(SourceTable::from_name("director", "scores"), Some(SourceTable::Scores));
        assert_eq!(SourceTable::from_name("public", "scores"), None);
        assert_eq!(SourceTable::from_name("director", "other"), None);
    }
}
