//! The PostgreSQL fallbacks, read-only: a scorecard's current fields, and a column's current
//! value (an unchanged TOAST value no shard has). Values are statement parameters; the column
//! and table names come from the schema and are quoted as identifiers.

use scoresync_event::{ScorecardKey, SourceTable};

use super::Lookups;
use crate::error::Error;
use crate::route::CardFields;

impl Lookups {
    /// A scorecard's current fields in PostgreSQL, if it exists there (and PostgreSQL is configured).
    pub async fn card_in_postgres(&self, key: &ScorecardKey) -> Result<Option<CardFields>, Error> {
        let Some(pg) = &self.pg else { return Ok(None) };
        let row = pg
            .query_opt(
                "SELECT scorecard_type::bigint, template_id, template_revision, agent_user_id, conversation_id, \
                 (extract(epoch FROM process_interaction_at) * 1000000)::bigint \
                 FROM director.scorecards WHERE customer_id = $1 AND profile_id = $2 AND scorecard_id = $3",
                &[&key.customer_id, &key.profile_id, &key.scorecard_id],
            )
            .await
            .map_err(|source| Error::Postgres { context: "looking up a scorecard".into(), source })?;
        Ok(row.map(|r| CardFields {
            scorecard_type: r.get(0),
            template_id: r.get(1),
            template_revision: r.get(2),
            agent_user_id: r.get(3),
            conversation_id: r.get(4),
            process_interaction_at: r.get(5),
        }))
    }

    /// A column's current text value in PostgreSQL (for an unchanged TOAST value no shard has).
    /// `Ok(None)`: no PostgreSQL configured, or the row is gone.
    pub async fn column_in_postgres(
        &self,
        table: SourceTable,
        key: &[String],
        column: &str,
    ) -> Result<Option<Option<String>>, Error> {
        let Some(pg) = &self.pg else { return Ok(None) };
        let conditions: Vec<String> = table
            .primary_key()
            .iter()
            .enumerate()
            .map(|(i, k)| format!("\"{k}\"::text = ${}", i + 1))
            .collect();
        let sql = format!(
            "SELECT \"{}\"::text FROM director.{} WHERE {}",
            column.replace('"', "\"\""),
            table.name(),
            conditions.join(" AND ")
        );
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            key.iter().map(|k| k as &(dyn tokio_postgres::types::ToSql + Sync)).collect();
        let row = pg.query_opt(sql.as_str(), &params).await.map_err(|source| Error::Postgres {
            context: format!("reading {table}.{column}"),
            source,
        })?;
        Ok(row.map(|r| r.get(0)))
    }
}
