//! Names of contract operations for messages people read, so every error and log line calls an
//! operation the same thing.

use crate::v1::Operation;

impl Operation {
    /// The operation as a lowercase noun for messages: "insert", "update", "delete", "truncate",
    /// "snapshot copy" (a row copied by the initial snapshot or a backfill), "change" for
    /// [`Operation::Unspecified`]. It reads well both as "the {op} of {table} row" and as
    /// "{table} {op} carries no ...". Not the wire name ([`Operation::as_str_name`] is).
    pub fn describe(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Truncate => "truncate",
            Operation::Snapshot => "snapshot copy",
            Operation::Unspecified => "change",
        }
    }

    /// A metric label: one lowercase word.
    pub fn label(self) -> &'static str {
        match self {
            Operation::Snapshot => "snapshot",
            Operation::Unspecified => "unspecified",
            other => other.describe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_has_a_distinct_lowercase_name() {
        let all = [
            Operation::Unspecified,
            Operation::Insert,
            Operation::Update,
            Operation::Delete,
            Operation::Truncate,
            Operation::Snapshot,
        ];
        let names: std::collections::BTreeSet<&str> = all.iter().map(|op| op.describe()).collect();
        assert_eq!(names.len(), all.len(), "{names:?}");
        assert!(names.iter().all(|n| *n == n.to_lowercase()), "{names:?}");
        assert_eq!(Operation::Snapshot.describe(), "snapshot copy");
    }
}
