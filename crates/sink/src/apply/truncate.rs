//! A TRUNCATE: delete markers, at its version, for every live row of the table older than it, on
//! every shard. Rows written after it carry greater versions and are untouched, so a replayed
//! TRUNCATE cannot delete them (DESIGN.md rule 7).

use scoresync_event::SourceTable;

use super::Applier;
use crate::error::Error;

impl Applier {
    /// Writes the markers on every shard (one `INSERT ... SELECT` each).
    pub(super) async fn truncate(&mut self, table: SourceTable, version: u64) -> Result<(), Error> {
        let schema = self.schema(table)?.clone();
        let sql = schema.truncate_sql(self.locate.lookups.database(), version);
        for shard in 0..self.shards {
            self.locate.lookups.execute(shard, &sql).await?;
        }
        if table == SourceTable::Scorecards {
            self.locate.forget_cards();
        }
        tracing::info!(%table, version, "truncate applied on every shard");
        Ok(())
    }
}
