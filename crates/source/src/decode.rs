//! pgoutput decoding: the bytes of one logical replication message to a [`PgOutput`] value.
//!
//! Protocol version 1 (what scoresync requests): Begin, Commit, Origin, Relation, Type, Insert,
//! Update, Delete, Truncate and logical Message. Tuple columns come as `n` (NULL), `u` (unchanged
//! TOAST value, not sent), `t` (text) or `b` (binary, only when binary mode is on).
//!
//! Decoding never panics and never reads past the message: a truncated message, an unknown tag or
//! a length that does not fit is a [`DecodeError`] naming the message and the byte offset.
//! Layouts follow "Logical Replication Message Formats" in the PostgreSQL manual.
//!
//! This module owns the message kinds and their fields; `decode/relation.rs` owns the Relation
//! message, `decode/tuple.rs` the row data of Insert, Update and Delete, and `decode/reader.rs`
//! the bounds-checked cursor every field is read through.

mod reader;
mod relation;
mod tuple;

use bytes::Bytes;

use reader::Reader;
pub use relation::{Relation, RelationColumn};
pub use tuple::{OldTuple, Tuple, TupleValue};

/// PostgreSQL's epoch (2000-01-01) in microseconds after the Unix epoch.
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// One decoded pgoutput message.
#[derive(Clone, Debug, PartialEq)]
pub enum PgOutput {
    /// Start of a transaction.
    Begin {
        /// LSN of the transaction's commit record.
        final_lsn: u64,
        /// Commit time, microseconds since the Unix epoch.
        commit_time_us: i64,
        /// Transaction id.
        xid: u32,
    },
    /// End of a transaction.
    Commit {
        /// LSN of the commit record.
        commit_lsn: u64,
        /// End of the commit record: where the next transaction can start.
        end_lsn: u64,
        /// Commit time, microseconds since the Unix epoch.
        commit_time_us: i64,
    },
    /// The transaction came from another node (replication origin).
    Origin {
        /// Commit LSN on the origin server.
        commit_lsn: u64,
        /// Origin name.
        name: String,
    },
    /// Describes a relation; sent before the first change of a relation in a session and again
    /// after its schema changed.
    Relation(Relation),
    /// Describes a non-built-in type used by a column.
    Type {
        /// Type OID.
        type_oid: u32,
        /// Schema of the type.
        namespace: String,
        /// Type name.
        name: String,
    },
    /// A new row.
    Insert {
        /// Relation id (see [`Relation`]).
        relation_id: u32,
        /// The new row.
        new: Tuple,
    },
    /// A changed row.
    Update {
        /// Relation id.
        relation_id: u32,
        /// The old row, when PostgreSQL sends it: key columns (`K`) or the whole row (`O`).
        old: Option<OldTuple>,
        /// The new row (unchanged TOAST columns as [`TupleValue::UnchangedToast`]).
        new: Tuple,
    },
    /// A removed row.
    Delete {
        /// Relation id.
        relation_id: u32,
        /// The removed row: key columns (`K`) or the whole row (`O`).
        old: OldTuple,
    },
    /// Tables emptied by TRUNCATE.
    Truncate {
        /// Relation ids.
        relation_ids: Vec<u32>,
        /// TRUNCATE ... CASCADE.
        cascade: bool,
        /// TRUNCATE ... RESTART IDENTITY.
        restart_identity: bool,
    },
    /// A message written with `pg_logical_emit_message`.
    Message {
        /// Written inside a transaction (delivered at its commit).
        transactional: bool,
        /// LSN of the message.
        lsn: u64,
        /// Application prefix.
        prefix: String,
        /// Payload.
        content: Bytes,
    },
}

/// A malformed pgoutput message.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The message is empty.
    #[error("empty pgoutput message")]
    Empty,
    /// The first byte is not a message type of protocol version 1.
    #[error("unknown pgoutput message tag {tag:?} (0x{byte:02x})")]
    UnknownTag {
        /// The tag as a character.
        tag: char,
        /// The tag byte.
        byte: u8,
    },
    /// The message ended before a field it must hold.
    #[error("pgoutput {message} message truncated at byte {offset}: expected {expected}")]
    Truncated {
        /// Message kind.
        message: &'static str,
        /// Where the field started.
        offset: usize,
        /// What was expected there.
        expected: &'static str,
    },
    /// A field holds a value the protocol does not allow.
    #[error("pgoutput {message} message invalid at byte {offset}: {problem}")]
    Invalid {
        /// Message kind.
        message: &'static str,
        /// Where the field started.
        offset: usize,
        /// What is wrong.
        problem: String,
    },
    /// Bytes left over after the message was complete.
    #[error("pgoutput {message} message has {extra} unexpected trailing byte(s)")]
    Trailing {
        /// Message kind.
        message: &'static str,
        /// How many bytes were left.
        extra: usize,
    },
}

/// Reads the body of one message kind, after its tag.
type Body = fn(&mut Reader<'_>) -> Result<PgOutput, DecodeError>;

/// Decodes one pgoutput message.
pub fn decode(data: &Bytes) -> Result<PgOutput, DecodeError> {
    let tag = *data.first().ok_or(DecodeError::Empty)?;
    let (message, body): (&'static str, Body) = match tag {
        b'B' => ("Begin", begin),
        b'C' => ("Commit", commit),
        b'O' => ("Origin", origin),
        b'R' => ("Relation", |r| relation::relation(r).map(PgOutput::Relation)),
        b'Y' => ("Type", type_),
        b'I' => ("Insert", insert),
        b'U' => ("Update", update),
        b'D' => ("Delete", delete),
        b'T' => ("Truncate", truncate),
        b'M' => ("Message", logical_message),
        byte => return Err(DecodeError::UnknownTag { tag: byte as char, byte }),
    };
    let mut r = Reader::after_tag(data, message);
    let decoded = body(&mut r)?;
    r.finish()?;
    Ok(decoded)
}

fn begin(r: &mut Reader<'_>) -> Result<PgOutput, DecodeError> {
    Ok(PgOutput::Begin {
        final_lsn: r.u64("final LSN")?,
        commit_time_us: pg_time_to_unix(r.i64("commit timestamp")?),
        xid: r.u32("xid")?,
    })
}

fn commit(r: &mut Reader<'_>) -> Result<PgOutput, DecodeError> {
    r.u8("flags")?;
    Ok(PgOutput::Commit {
        commit_lsn: r.u64("commit LSN")?,
        end_lsn: r.u64("end LSN")?,
        commit_time_us: pg_time_to_unix(r.i64("commit timestamp")?),
    })
}

fn origin(r: &mut Reader<'_>) -> Result<PgOutput, DecodeError> {
    Ok(PgOutput::Origin { commit_lsn: r.u64("commit LSN")?, name: r.cstr("origin name")? })
}

fn type_(r: &mut Reader<'_>) -> Result<PgOutput, DecodeError> {
    Ok(PgOutput::Type {
        type_oid: r.u32("type OID")?,
        namespace: r.cstr("namespace")?,
        name: r.cstr("type name")?,
    })
}

fn insert(r: &mut Reader<'_>) -> Result<PgOutput, DecodeError> {
    let relation_id = r.u32("relation id")?;
    r.expect_byte(b'N', "'N' before the new tuple")?;
    Ok(PgOutput::Insert { relation_id, new: tuple::tuple(r)? })
}

fn update(r: &mut Reader<'_>) -> Result<PgOutput, DecodeError> {
    let relation_id = r.u32("relation id")?;
    let old = tuple::update_old(r)?;
    Ok(PgOutput::Update { relation_id, old, new: tuple::tuple(r)? })
}

fn delete(r: &mut Reader<'_>) -> Result<PgOutput, DecodeError> {
    let relation_id = r.u32("relation id")?;
    Ok(PgOutput::Delete { relation_id, old: tuple::delete_old(r)? })
}

fn truncate(r: &mut Reader<'_>) -> Result<PgOutput, DecodeError> {
    let count = r.u32("relation count")?;
    let options = r.u8("options")?;
    if count as usize > r.remaining() / 4 {
        return Err(r.invalid(format!("{count} relations do not fit in the message")));
    }
    let relation_ids = (0..count).map(|_| r.u32("relation id")).collect::<Result<_, _>>()?;
    Ok(PgOutput::Truncate {
        relation_ids,
        cascade: options & 1 != 0,
        restart_identity: options & 2 != 0,
    })
}

fn logical_message(r: &mut Reader<'_>) -> Result<PgOutput, DecodeError> {
    let flags = r.u8("flags")?;
    let lsn = r.u64("message LSN")?;
    let prefix = r.cstr("prefix")?;
    let len = r.len_u32("content length")?;
    let content = r.take(len, "content")?;
    Ok(PgOutput::Message { transactional: flags & 1 != 0, lsn, prefix, content })
}

/// Converts a PostgreSQL timestamp (microseconds since 2000-01-01) to Unix microseconds.
pub fn pg_time_to_unix(pg_micros: i64) -> i64 {
    pg_micros.saturating_add(PG_EPOCH_UNIX_MICROS)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::fixtures::{FIXTURES, fixtures, unhex};

    fn text(v: &TupleValue) -> &str {
        match v {
            TupleValue::Text(b) => std::str::from_utf8(b).expect("utf8"),
            other => panic!("expected text, got {other:?}"),
        }
    }

    fn decoded(label: &str, index: usize) -> PgOutput {
        decode(&fixtures(label)[index]).expect("fixture decodes")
    }

    #[test]
    fn relation_message_describes_columns_keys_and_identity() {
        let PgOutput::Relation(rel) = decoded("insert_scorecard", 0) else {
            panic!("not a relation")
        };
        assert_eq!((rel.namespace.as_str(), rel.name.as_str()), ("director", "scorecards"));
        assert_eq!(rel.replica_identity, b'f');
        assert_eq!(rel.columns.len(), 15);
        let keys: Vec<&str> =
            rel.columns.iter().filter(|c| c.is_key).map(|c| c.name.as_str()).collect();
        // FULL identity: every column is part of the identity.
        assert_eq!(keys.len(), 15);
        assert_eq!(rel.columns[7].name, "process_interaction_at");
        assert_eq!(rel.columns[7].type_oid, 1184);

        let PgOutput::Relation(scores) = decoded("insert_score", 0) else {
            panic!("not a relation")
        };
        assert_eq!(scores.replica_identity, b'i');
        let keys: Vec<&str> =
            scores.columns.iter().filter(|c| c.is_key).map(|c| c.name.as_str()).collect();
        assert_eq!(keys, ["customer_id", "profile_id", "score_id", "scorecard_id"]);
    }

    #[test]
    fn insert_carries_text_and_nulls() {
        let PgOutput::Insert { new, .. } = decoded("insert_scorecard", 1) else {
            panic!("not an insert")
        };
        assert_eq!(new.len(), 15);
        assert_eq!(text(&new[2]), "card-1");
        assert_eq!(new[4], TupleValue::Null, "template_revision");
        assert_eq!(text(&new[5]), "2");
        assert_eq!(text(&new[7]), "2024-03-05 12:34:56.789012+00");
    }

    #[test]
    fn update_of_other_column_marks_toasted_comment_unchanged() {
        let PgOutput::Update { old, new, .. } = decoded("update_keeps_toast", 0) else {
            panic!("not an update")
        };
        let old = old.expect("FULL identity sends the old row");
        assert!(!old.key_only);
        assert_eq!(new[11], TupleValue::UnchangedToast, "comment");
        assert_eq!(text(&new[10]), "3.25", "score");
        // The old row of a FULL identity holds the whole comment.
        assert_eq!(text(&old.values[11]).len(), 12_800);
    }

    #[test]
    fn update_without_and_with_old_key() {
        let PgOutput::Update { old, .. } = decoded("update_score_no_old", 0) else {
            panic!("not an update")
        };
        assert_eq!(old, None, "identity unchanged: no old tuple");
        let PgOutput::Update { old, new, .. } = decoded("update_score_moves", 0) else {
            panic!("not an update")
        };
        let old = old.expect("identity changed: old key sent");
        assert!(old.key_only);
        assert_eq!(text(&old.values[3]), "card-1");
        assert_eq!(old.values[4], TupleValue::Null, "non-key columns are null in a K tuple");
        assert_eq!(text(&new[3]), "card-2");
    }

    #[test]
    fn deletes_key_only_and_full() {
        let PgOutput::Delete { old, .. } = decoded("delete_score_key_only", 0) else {
            panic!("not a delete")
        };
        assert!(old.key_only);
        assert_eq!(text(&old.values[3]), "card-2");
        let PgOutput::Delete { old, .. } = decoded("delete_scorecard_full", 0) else {
            panic!("not a delete")
        };
        assert!(!old.key_only);
        assert_eq!(text(&old.values[7]), "2024-03-05 12:34:56.789012+00");
    }

    #[test]
    fn truncate_lists_relations_and_options() {
        let PgOutput::Truncate { relation_ids, cascade, restart_identity } = decoded("truncate", 2)
        else {
            panic!("not a truncate")
        };
        assert_eq!(relation_ids.len(), 2);
        assert!(restart_identity);
        assert!(!cascade);
    }

    #[test]
    fn relation_after_add_column_has_the_new_column() {
        let PgOutput::Relation(rel) = decoded("insert_after_add_column", 0) else {
            panic!("not a relation")
        };
        assert_eq!(rel.columns.last().map(|c| c.name.as_str()), Some("reviewer"));
        let PgOutput::Insert { new, .. } = decoded("insert_after_add_column", 1) else {
            panic!("not an insert")
        };
        assert_eq!(new.len(), rel.columns.len());
        assert_eq!(text(&new[11]), "rev");
    }

    fn built(parts: &[&[u8]]) -> Bytes {
        Bytes::from(parts.concat())
    }

    #[test]
    fn begin_commit_message_origin_type_from_the_protocol_layout() {
        let begin = built(&[
            b"B",
            &0x16_0000_0010_u64.to_be_bytes(),
            &1_000_000_i64.to_be_bytes(),
            &77_u32.to_be_bytes(),
        ]);
        assert_eq!(
            decode(&begin),
            Ok(PgOutput::Begin {
                final_lsn: 0x16_0000_0010,
                commit_time_us: PG_EPOCH_UNIX_MICROS + 1_000_000,
                xid: 77
            })
        );
        let commit =
            built(&[b"C", &[0], &5_u64.to_be_bytes(), &9_u64.to_be_bytes(), &0_i64.to_be_bytes()]);
        assert_eq!(
            decode(&commit),
            Ok(PgOutput::Commit {
                commit_lsn: 5,
                end_lsn: 9,
                commit_time_us: PG_EPOCH_UNIX_MICROS
            })
        );
        let message = built(&[
            b"M",
            &[1],
            &42_u64.to_be_bytes(),
            b"scoresync.heartbeat\0",
            &2_i32.to_be_bytes(),
            b"hi",
        ]);
        assert_eq!(
            decode(&message),
            Ok(PgOutput::Message {
                transactional: true,
                lsn: 42,
                prefix: "scoresync.heartbeat".into(),
                content: Bytes::from_static(b"hi"),
            })
        );
        let origin = built(&[b"O", &3_u64.to_be_bytes(), b"node_a\0"]);
        assert_eq!(decode(&origin), Ok(PgOutput::Origin { commit_lsn: 3, name: "node_a".into() }));
        let ty = built(&[b"Y", &16_400_u32.to_be_bytes(), b"public\0", b"mood\0"]);
        assert_eq!(
            decode(&ty),
            Ok(PgOutput::Type {
                type_oid: 16_400,
                namespace: "public".into(),
                name: "mood".into()
            })
        );
    }

    #[test]
    fn every_truncation_of_every_real_message_is_an_error_not_a_panic() {
        for line in FIXTURES.lines() {
            let Some((label, hex)) = line.split_once(' ') else { continue };
            let full = Bytes::from(unhex(hex));
            assert!(decode(&full).is_ok(), "{label} decodes whole");
            for cut in 0..full.len() {
                assert!(decode(&full.slice(..cut)).is_err(), "{label} cut at {cut} decoded");
            }
        }
    }

    #[test]
    fn corrupted_messages_are_errors_not_panics() {
        // Flip every byte of every fixture through a few values: any result is fine, no panic.
        for line in FIXTURES.lines().take(6) {
            let Some((_, hex)) = line.split_once(' ') else { continue };
            let original = unhex(hex);
            for i in 0..original.len().min(400) {
                for value in [0x00, 0x7f, 0x80, 0xff] {
                    let mut bytes = original.clone();
                    bytes[i] = value;
                    let _ = decode(&Bytes::from(bytes));
                }
            }
        }
    }

    #[test]
    fn malformed_input_names_the_problem() {
        assert_eq!(decode(&Bytes::new()), Err(DecodeError::Empty));
        assert!(matches!(
            decode(&Bytes::from_static(b"Z")),
            Err(DecodeError::UnknownTag { byte: b'Z', .. })
        ));
        // Insert with a text length larger than the message.
        let long = built(&[
            b"I",
            &1_u32.to_be_bytes(),
            b"N",
            &1_i16.to_be_bytes(),
            b"t",
            &1000_i32.to_be_bytes(),
            b"ab",
        ]);
        assert!(matches!(decode(&long), Err(DecodeError::Invalid { message: "Insert", .. })));
        // Negative text length.
        let negative = built(&[
            b"I",
            &1_u32.to_be_bytes(),
            b"N",
            &1_i16.to_be_bytes(),
            b"t",
            &(-5_i32).to_be_bytes(),
        ]);
        assert!(matches!(decode(&negative), Err(DecodeError::Invalid { .. })));
        // Unknown column kind.
        let kind = built(&[b"I", &1_u32.to_be_bytes(), b"N", &1_i16.to_be_bytes(), b"q"]);
        let err = decode(&kind).expect_err("bad kind");
        assert!(err.to_string().contains("column kind"), "{err}");
        // Update with an unknown tuple kind.
        let update = built(&[b"U", &1_u32.to_be_bytes(), b"X"]);
        assert!(matches!(decode(&update), Err(DecodeError::Invalid { message: "Update", .. })));
        // Trailing bytes after a complete message.
        let trailing = built(&[b"O", &3_u64.to_be_bytes(), b"n\0", b"junk"]);
        assert_eq!(decode(&trailing), Err(DecodeError::Trailing { message: "Origin", extra: 4 }));
        // Truncate announcing more relations than it holds.
        let truncate = built(&[b"T", &1_000_000_u32.to_be_bytes(), &[0], &1_u32.to_be_bytes()]);
        assert!(matches!(decode(&truncate), Err(DecodeError::Invalid { message: "Truncate", .. })));
    }
}
