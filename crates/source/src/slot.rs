//! The replication slot: inspecting, creating, and the start-up checks of DESIGN.md rule 4.
//!
//! Before streaming, the source compares the slot with its own record of the pipeline
//! ([`crate::state::PipelineRecord`]) and halts, naming the slot, when:
//!
//! - the slot is missing (scoresync never recreates one silently: changes since it vanished are
//!   gone, so only `setup --recreate-slot`, which also re-snapshots, may);
//! - its `wal_status` is `lost` (PostgreSQL removed WAL it still needed);
//! - it belongs to another database or output plugin;
//! - the server's system identifier differs from the recorded one (a restored or replaced
//!   cluster: LSNs no longer mean the same thing);
//! - its confirmed position is ahead of the recorded one (someone advanced it: the changes in
//!   between were never published).

use pgwire_replication::{ReplicationClient, ReplicationConfig};
use scoresync_event::Lsn;

use crate::error::Error;
use crate::state::PipelineRecord;

/// What `pg_replication_slots` says about a slot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// Slot name.
    pub name: String,
    /// Output plugin (`pgoutput` for ours).
    pub plugin: Option<String>,
    /// Database the slot decodes.
    pub database: Option<String>,
    /// Pid of the walsender holding it, if any.
    pub active_pid: Option<i32>,
    /// Oldest WAL the slot keeps.
    pub restart_lsn: Option<Lsn>,
    /// Position the consumer confirmed.
    pub confirmed_flush: Option<Lsn>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
}

fn lsn(text: Option<String>) -> Option<Lsn> {
    text.and_then(|t| t.parse().ok())
}

/// Reads the slot's row from `pg_replication_slots`.
pub async fn inspect(sql: &tokio_postgres::Client, slot: &str) -> Result<Option<SlotInfo>, Error> {
    let row = sql
        .query_opt(
            "SELECT slot_name::text, plugin::text, database::text, active_pid, \
                    restart_lsn::text, confirmed_flush_lsn::text, wal_status \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(Error::sql(format!("reading replication slot {slot}")))?;
    Ok(row.map(|r| SlotInfo {
        name: r.get(0),
        plugin: r.get(1),
        database: r.get(2),
        active_pid: r.get(3),
        restart_lsn: lsn(r.get(4)),
        confirmed_flush: lsn(r.get(5)),
        wal_status: r.get(6),
    }))
}

/// How far a slot is behind, sampled from `pg_replication_slots` on an ordinary SQL connection
/// (so it answers while the replication stream is stuck or the source is down).
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SlotLag {
    /// Whether a walsender streams from the slot now.
    pub active: bool,
    /// The server's current WAL position (byte position).
    pub current_lsn: u64,
    /// The last position the source confirmed.
    pub confirmed_flush_lsn: Option<u64>,
    /// The oldest WAL the slot holds back.
    pub restart_lsn: Option<u64>,
    /// WAL the slot holds back: current minus `restart_lsn`.
    pub retained_bytes: Option<i64>,
    /// WAL not yet confirmed: current minus `confirmed_flush_lsn`.
    pub unconfirmed_bytes: Option<i64>,
    /// `reserved`, `extended`, `unreserved` or `lost`.
    pub wal_status: Option<String>,
    /// Bytes of WAL that can still be written before the slot is in danger of being lost (NULL
    /// when `max_slot_wal_keep_size` is unlimited).
    pub safe_wal_size: Option<i64>,
}

/// The lag of `slot`, or `None` when it does not exist.
pub async fn lag(sql: &tokio_postgres::Client, slot: &str) -> Result<Option<SlotLag>, Error> {
    let lsn = |v: Option<String>| v.and_then(|t| t.parse::<Lsn>().ok()).map(|l| l.0);
    let row = sql
        .query_opt(
            "SELECT active, pg_current_wal_lsn()::text, confirmed_flush_lsn::text, \
                    restart_lsn::text, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint, \
                    pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint, \
                    wal_status, safe_wal_size \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(Error::sql(format!("reading the lag of replication slot {slot}")))?;
    Ok(row.map(|r| SlotLag {
        active: r.get(0),
        current_lsn: lsn(r.get(1)).unwrap_or(0),
        confirmed_flush_lsn: lsn(r.get(2)),
        restart_lsn: lsn(r.get(3)),
        retained_bytes: r.get(4),
        unconfirmed_bytes: r.get(5),
        wal_status: r.get(6),
        safe_wal_size: r.get(7),
    }))
}

/// Creates a logical slot with pgoutput; returns its consistent point (the LSN from which it
/// streams every committed transaction).
pub async fn create(sql: &tokio_postgres::Client, slot: &str) -> Result<Lsn, Error> {
    let row = sql
        .query_one(
            "SELECT lsn::text FROM pg_create_logical_replication_slot($1, 'pgoutput')",
            &[&slot],
        )
        .await
        .map_err(Error::sql(format!("creating replication slot {slot}")))?;
    let text: String = row.get(0);
    text.parse().map_err(|_| Error::SlotUnusable {
        slot: slot.into(),
        problem: format!("PostgreSQL returned an unreadable consistent point {text:?}"),
    })
}

/// Drops the slot (it must not be in use).
pub async fn drop(sql: &tokio_postgres::Client, slot: &str) -> Result<(), Error> {
    sql.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
        .map_err(Error::sql(format!("dropping replication slot {slot}")))?;
    Ok(())
}

/// Moves the slot's confirmed position to `to` if it is behind (used at shutdown, after the
/// stream closed, so the last acknowledged position reaches the server).
pub async fn advance(sql: &tokio_postgres::Client, slot: &str, to: Lsn) -> Result<(), Error> {
    sql.execute(
        "SELECT pg_replication_slot_advance(slot_name, $2::text::pg_lsn) FROM pg_replication_slots \
         WHERE slot_name = $1 AND active_pid IS NULL AND confirmed_flush_lsn < $2::text::pg_lsn",
        &[&slot, &to.to_string()],
    )
    .await
    .map_err(Error::sql(format!("advancing replication slot {slot} to {to}")))?;
    Ok(())
}

/// The server's system identifier, from IDENTIFY_SYSTEM on a replication connection.
pub async fn system_id(config: ReplicationConfig) -> Result<u64, Error> {
    let slot = config.slot.clone();
    let wire = |source| Error::Replication { slot: slot.clone(), source };
    let mut client = ReplicationClient::connect_gated(config).await.map_err(wire)?;
    let system = client.identify_system().await.map_err(wire)?;
    system.system_id.parse().map_err(|_| Error::SlotUnusable {
        slot: slot.clone(),
        problem: format!("IDENTIFY_SYSTEM returned an unreadable system id {:?}", system.system_id),
    })
}

/// The start-up checks. Returns the position to confirm from (the recorded one).
pub fn check(
    slot: &str,
    database: &str,
    info: Option<&SlotInfo>,
    record: &PipelineRecord,
    system_id: u64,
) -> Result<Lsn, Error> {
    let unusable = |problem: String| Error::SlotUnusable { slot: slot.into(), problem };
    let info =
        info.ok_or_else(|| Error::SlotMissing { slot: slot.into(), database: database.into() })?;
    if info.wal_status.as_deref() == Some("lost") {
        return Err(unusable(
            "wal_status is lost: PostgreSQL removed WAL the slot still needed, so changes were \
             lost; run `scoresync setup --recreate-slot` (new snapshot) and rebuild ClickHouse"
                .into(),
        ));
    }
    if info.plugin.as_deref() != Some("pgoutput") {
        return Err(unusable(format!("uses plugin {:?}, scoresync needs pgoutput", info.plugin)));
    }
    if info.database.as_deref() != Some(database) {
        return Err(unusable(format!(
            "belongs to database {:?}, the configuration names {database}",
            info.database
        )));
    }
    if record.system_id != system_id {
        return Err(Error::RecordMismatch {
            slot: slot.into(),
            problem: format!(
                "the server's system identifier is {system_id} but the pipeline was recorded on \
                 {}; this is a different cluster (restored or replaced), its LSNs do not match \
                 the record; run `scoresync setup --recreate-slot` to start a new pipeline",
                record.system_id
            ),
        });
    }
    let confirmed = info.confirmed_flush.unwrap_or(Lsn::ZERO);
    if confirmed > record.confirmed_lsn {
        return Err(Error::RecordMismatch {
            slot: slot.into(),
            problem: format!(
                "confirmed position {confirmed} is ahead of scoresync's record {}: the slot was \
                 advanced outside scoresync and the changes in between were never published; run \
                 `scoresync setup --recreate-slot` (new snapshot)",
                record.confirmed_lsn
            ),
        });
    }
    Ok(record.confirmed_lsn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::PipelineRecord;

    fn info() -> SlotInfo {
        SlotInfo {
            name: "s".into(),
            plugin: Some("pgoutput".into()),
            database: Some("director".into()),
            active_pid: None,
            restart_lsn: Some(Lsn(10)),
            confirmed_flush: Some(Lsn(20)),
            wal_status: Some("reserved".into()),
        }
    }

    fn record() -> PipelineRecord {
        let mut r = PipelineRecord::new("s", "director", 7, Lsn(5), 0);
        r.confirmed_lsn = Lsn(20);
        r
    }

    #[test]
    fn healthy_slot_starts_from_the_record() {
        assert_eq!(check("s", "director", Some(&info()), &record(), 7).expect("ok"), Lsn(20));
    }

    #[test]
    fn each_broken_invariant_halts_naming_the_slot() {
        let missing = check("s", "director", None, &record(), 7).expect_err("missing");
        assert!(matches!(missing, Error::SlotMissing { .. }));
        assert!(missing.to_string().contains("replication slot s does not exist"));

        let lost = SlotInfo { wal_status: Some("lost".into()), ..info() };
        let err = check("s", "director", Some(&lost), &record(), 7).expect_err("lost");
        assert!(err.to_string().contains("replication slot s: wal_status is lost"), "{err}");

        let err = check("s", "director", Some(&info()), &record(), 8).expect_err("system id");
        assert!(err.to_string().contains("system identifier is 8"), "{err}");

        let ahead = SlotInfo { confirmed_flush: Some(Lsn(30)), ..info() };
        let err = check("s", "director", Some(&ahead), &record(), 7).expect_err("ahead");
        assert!(err.to_string().contains("ahead of scoresync's record"), "{err}");

        let other_db = SlotInfo { database: Some("other".into()), ..info() };
        assert!(check("s", "director", Some(&other_db), &record(), 7).is_err());
        for err in [missing, err] {
            assert!(!err.is_transient(), "{err} must halt");
        }
    }
}
