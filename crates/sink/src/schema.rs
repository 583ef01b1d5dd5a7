//! The per-shard ClickHouse schema (every `schemas/clickhouse/*.sql`, embedded at build time) and
//! `scoresync setup`'s ClickHouse part: create the database and any missing table on every
//! shard; leave existing ones alone. The test harness creates each test's tables with [`ensure`]
//! too; the local stack, which runs before any binary is built, applies the same files in the
//! same name order over HTTP (curl).

use crate::config::ClickHouseConfig;
use crate::shard::ShardIndex;

/// The DDL files, `schemas/clickhouse/*.sql` in name order, each with the table its
/// `CREATE TABLE IF NOT EXISTS <name>` statement creates: (table, statement). `build.rs` lists
/// the directory, so every file there is applied.
pub const TABLES: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/clickhouse_tables.rs"));

/// What setup found or made on one shard.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShardOutcome {
    /// The shard.
    pub shard: ShardIndex,
    /// Tables that existed.
    pub existed: Vec<String>,
    /// Tables created.
    pub created: Vec<String>,
}

/// A shard refused a schema statement.
#[derive(Debug, thiserror::Error)]
#[error("clickhouse shard {shard} ({url}): {action} failed")]
pub struct SchemaError {
    /// The shard.
    pub shard: ShardIndex,
    /// Its URL.
    pub url: String,
    /// What was attempted.
    pub action: String,
    /// The client error.
    #[source]
    pub source: clickhouse::error::Error,
}

/// Creates the database and the missing tables on every shard.
pub async fn ensure(cfg: &ClickHouseConfig) -> Result<Vec<ShardOutcome>, SchemaError> {
    let mut outcomes = Vec::new();
    for (shard, (url, client)) in cfg.shards.iter().zip(crate::shard::clients(cfg)).enumerate() {
        let fail = |action: String| {
            let url = url.clone();
            move |source| SchemaError { shard, url, action, source }
        };
        let server = client.clone().with_database("default");
        let db = &cfg.database;
        server
            .query(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
            .execute()
            .await
            .map_err(fail(format!("CREATE DATABASE {db}")))?;
        let mut outcome = ShardOutcome { shard, existed: Vec::new(), created: Vec::new() };
        for &(table, ddl) in TABLES {
            let exists: u8 = server
                .query(&format!("EXISTS TABLE {db}.{table}"))
                .fetch_one()
                .await
                .map_err(fail(format!("EXISTS TABLE {db}.{table}")))?;
            if exists == 1 {
                outcome.existed.push(table.into());
                continue;
            }
            client
                .query(ddl)
                .execute()
                .await
                .map_err(fail(format!("CREATE TABLE {db}.{table}")))?;
            outcome.created.push(table.into());
        }
        outcomes.push(outcome);
    }
    Ok(outcomes)
}

/// The greatest `_version` of any row, live or deleted, in any target table on any shard (0 when
/// all are empty). `setup` starts a new pipeline's versions above it; every shard must answer,
/// since a version missed here could outrank the new pipeline's rows for ever.
pub async fn max_version(cfg: &ClickHouseConfig) -> Result<u64, SchemaError> {
    let mut max = 0;
    for (shard, (url, client)) in cfg.shards.iter().zip(crate::shard::clients(cfg)).enumerate() {
        for table in scoresync_event::SourceTable::ALL {
            let stored: u64 = client
                .query("SELECT max(_version) FROM ?")
                .bind(clickhouse::sql::Identifier(table.name()))
                .fetch_one()
                .await
                .map_err(|source| SchemaError {
                    shard,
                    url: url.clone(),
                    action: format!("reading the highest _version of {}", table.name()),
                    source,
                })?;
            max = max.max(stored);
        }
    }
    Ok(max)
}

/// Reads the target tables' columns from every shard (`system.columns`); all shards must agree.
pub async fn load(
    cfg: &ClickHouseConfig,
) -> Result<Vec<crate::table::TableSchema>, crate::error::Error> {
    use crate::error::Error;
    use crate::table::TableSchema;
    use scoresync_event::SourceTable;

    let clients = crate::shard::clients(cfg);
    let mut schemas: Vec<TableSchema> = Vec::new();
    for table in SourceTable::ALL {
        let mut first: Option<Vec<(String, String)>> = None;
        for (shard, client) in clients.iter().enumerate() {
            let columns: Vec<(String, String)> = client
                .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
                .bind(&cfg.database)
                .bind(table.name())
                .fetch_all()
                .await
                .map_err(Error::shard(shard, format!("reading the columns of {}", table.name())))?;
            match &first {
                None => first = Some(columns),
                Some(reference) if *reference != columns => {
                    return Err(Error::SchemaMismatch { table: table.name().into(), shard });
                }
                Some(_) => {}
            }
        }
        let columns = first.unwrap_or_default();
        schemas.push(TableSchema::new(table, &columns).map_err(Error::Schema)?);
    }
    Ok(schemas)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_ddl_file_is_embedded_in_name_order_with_its_table() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../schemas/clickhouse");
        let mut files: Vec<std::path::PathBuf> = std::fs::read_dir(&dir)
            .expect("schemas/clickhouse is readable")
            .map(|entry| entry.expect("directory entry").path())
            .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
            .collect();
        files.sort();
        assert!(files.len() >= 4, "the schema directory holds the DDL: {files:?}");
        assert_eq!(TABLES.len(), files.len(), "one embedded statement per file");
        for (path, &(table, ddl)) in files.iter().zip(TABLES) {
            let text = std::fs::read_to_string(path).expect("readable");
            assert_eq!(ddl, text, "{} is embedded in name order", path.display());
            let rest = text
                .split_once(&format!("CREATE TABLE IF NOT EXISTS {table}"))
                .map(|(_, rest)| rest);
            assert!(
                rest.is_some_and(
                    |r| r.starts_with(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                ),
                "{} creates the table {table}",
                path.display()
            );
        }
        let names: Vec<&str> = TABLES.iter().map(|&(table, _)| table).collect();
        for table in scoresync_event::SourceTable::ALL {
            assert!(names.contains(&table.name()), "{} has its DDL", table.name());
        }
        assert!(names.contains(&"conversations"));
    }
}
