//! What the snapshot reads from PostgreSQL: a table's columns from the catalog, and the chunk
//! query that walks the table in primary-key order.
//!
//! Invariant: chunks are keyset-paginated on the primary key. The first chunk starts at the
//! smallest key; each later one starts strictly after the last key of the chunk before
//! ([`resume_key`], in primary-key order), so consecutive chunks neither overlap nor skip a row
//! that existed when both were read. Every column is read as text and typed by the caller.

use scoresync_event::SourceTable;

use crate::error::Error;

/// A column of a source table as the catalog describes it.
pub(crate) struct TableColumn {
    pub(crate) name: String,
    pub(crate) type_oid: u32,
    pub(crate) is_key: bool,
}

/// The live columns of `table` in attribute order.
pub(crate) async fn table_columns(
    sql: &tokio_postgres::Client,
    table: SourceTable,
) -> Result<Vec<TableColumn>, Error> {
    let rows = sql
        .query(
            "SELECT a.attname::text, a.atttypid::oid \
             FROM pg_attribute a \
             WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
             ORDER BY a.attnum",
            &[&table.to_string()],
        )
        .await
        .map_err(Error::sql(format!("reading the columns of {table}")))?;
    Ok(rows
        .iter()
        .map(|r| {
            let name: String = r.get(0);
            let is_key = table.primary_key().contains(&name.as_str());
            TableColumn { name, type_oid: r.get(1), is_key }
        })
        .collect())
}

/// The query for one chunk of at most `limit` rows: every column as text, in primary-key order,
/// after the key bound as parameters `$1..` (one per key column) when `resuming`.
pub(crate) fn chunk_sql(
    table: SourceTable,
    columns: &[TableColumn],
    resuming: bool,
    limit: usize,
) -> String {
    let key_names = table.primary_key();
    let select: Vec<String> = columns.iter().map(|c| format!("{}::text", ident(&c.name))).collect();
    let order: Vec<String> = key_names.iter().map(|k| ident(k)).collect();
    let key_types: Vec<u32> = key_names
        .iter()
        .map(|k| columns.iter().find(|c| c.name == *k).map_or(25, |c| c.type_oid))
        .collect();
    let mut sql = format!("SELECT {} FROM {table}", select.join(", "));
    if resuming {
        let params: Vec<String> = key_types
            .iter()
            .enumerate()
            .map(|(i, oid)| format!("${}::text::{}", i + 1, cast_name(*oid)))
            .collect();
        sql.push_str(&format!(" WHERE ({}) > ({})", order.join(", "), params.join(", ")));
    }
    sql.push_str(&format!(" ORDER BY {} LIMIT {limit}", order.join(", ")));
    sql
}

/// The key of a chunk's last row in primary-key order (the catalog order can differ), as the
/// text the next chunk's query binds; `value(i)` is the text of column `i` of that row.
pub(crate) fn resume_key(
    key_names: &[&str],
    columns: &[TableColumn],
    value: impl Fn(usize) -> Option<String>,
) -> Vec<String> {
    // Key columns in catalog order, then reordered by the primary key.
    let by_name: Vec<(&str, String)> = columns
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_key)
        .map(|(index, c)| (c.name.as_str(), value(index).unwrap_or_default()))
        .collect();
    key_names
        .iter()
        .map(|k| by_name.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()).unwrap_or_default())
        .collect()
}

/// Quotes an identifier.
pub(crate) fn ident(name: &str) -> String {
    postgres_protocol::escape::escape_identifier(name)
}

/// The SQL type name to cast a key parameter to.
pub(crate) fn cast_name(type_oid: u32) -> &'static str {
    match type_oid {
        crate::text::oid::INT2 => "smallint",
        crate::text::oid::INT4 => "integer",
        crate::text::oid::INT8 => "bigint",
        _ => "text",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn columns(names: &[(&str, u32)], table: SourceTable) -> Vec<TableColumn> {
        names
            .iter()
            .map(|(name, type_oid)| TableColumn {
                name: (*name).into(),
                type_oid: *type_oid,
                is_key: table.primary_key().contains(name),
            })
            .collect()
    }

    #[test]
    fn first_chunk_starts_at_the_smallest_key_and_later_ones_after_the_last() {
        let table = SourceTable::Scores;
        let cols = columns(
            &[("customer_id", 25), ("profile_id", 25), ("score_id", 25), ("value", 701)],
            table,
        );
        assert_eq!(
            chunk_sql(table, &cols, false, 10),
            "SELECT \"customer_id\"::text, \"profile_id\"::text, \"score_id\"::text, \
             \"value\"::text FROM director.scores \
             ORDER BY \"customer_id\", \"profile_id\", \"score_id\" LIMIT 10"
        );
        assert!(chunk_sql(table, &cols, true, 10).contains(
            " WHERE (\"customer_id\", \"profile_id\", \"score_id\") > \
             ($1::text::text, $2::text::text, $3::text::text) ORDER BY"
        ));
    }

    #[test]
    fn resume_key_is_in_primary_key_order_with_integer_keys_cast() {
        let table = SourceTable::HistoricScorecardScores;
        // Catalog order differs from the primary key's order.
        let cols = columns(
            &[
                ("criterion_id", 25),
                ("revision", crate::text::oid::INT4),
                ("customer_id", 25),
                ("profile_id", 25),
                ("scorecard_id", 25),
                ("value", 701),
            ],
            table,
        );
        let row = ["crit", "2", "cust", "prof", "card", "1.5"];
        let key = resume_key(table.primary_key(), &cols, |i| Some(row[i].to_owned()));
        assert_eq!(key, ["cust", "prof", "card", "2", "crit"]);
        assert!(chunk_sql(table, &cols, true, 5).contains("$4::text::integer"));
        assert_eq!(ident("we\"ird"), "\"we\"\"ird\"");
    }
}
