//! The SQL loadgen runs against PostgreSQL, prepared once per run; every value is a statement
//! parameter.

use tokio_postgres::{Client, Statement};

/// The workload's statements, prepared once; every value is a statement parameter.
pub(super) struct Statements {
    pub(super) insert_card: Statement,
    pub(super) insert_score: Statement,
    pub(super) insert_historic: Statement,
    pub(super) rescore_card: Statement,
    pub(super) rescore_score: Statement,
    pub(super) move_in_time: Statement,
    pub(super) move_to_conversation: Statement,
    pub(super) delete: [Statement; 3],
}

impl Statements {
    pub(super) async fn prepare(pg: &Client) -> Result<Statements, tokio_postgres::Error> {
        // A large comment (TOASTed) is built by PostgreSQL from the card id when `$10` is NULL:
        // `$11` md5 hex digests of 32 characters.
        let insert_card = "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, \
             template_id, template_revision, scorecard_type, conversation_id, process_interaction_at, \
             agent_user_id, creator_user_id, score, comment, submitted_at, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, 'rev-1', $5, $6, $7, $8, 'creator-1', $9, \
             COALESCE($10, (SELECT string_agg(md5(g::text || $3), '') FROM generate_series(1, $11::int) g)), \
             now(), now(), now())";
        let insert_score = "INSERT INTO director.scores (customer_id, profile_id, score_id, \
             scorecard_id, criterion_id, numeric_value, not_applicable, ai_scored, comment, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, false, NULL, now(), now())";
        let insert_historic = "INSERT INTO director.historic_scorecard_scores (customer_id, \
             profile_id, scorecard_id, revision, criterion_id, score_id, numeric_value, not_applicable, \
             scored_at) VALUES ($1, $2, $3, $4, $5, $6, $7, false, now())";
        let rescore_card = "UPDATE director.scorecards SET score = $4, updated_at = now() \
             WHERE customer_id = $1 AND profile_id = $2 AND scorecard_id = $3";
        let rescore_score = "UPDATE director.scores SET numeric_value = $4, ai_scored = true, \
             updated_at = now() WHERE customer_id = $1 AND profile_id = $2 AND score_id = $3";
        let filter = "WHERE customer_id = $1 AND profile_id = $2 AND scorecard_id = $3";
        let move_in_time = format!(
            "UPDATE director.scorecards SET process_interaction_at = process_interaction_at \
             + interval '1 second', updated_at = now() {filter}"
        );
        let move_to_conversation = format!(
            "UPDATE director.scorecards SET conversation_id = $4, updated_at = now() {filter}"
        );
        Ok(Statements {
            insert_card: pg.prepare(insert_card).await?,
            insert_score: pg.prepare(insert_score).await?,
            insert_historic: pg.prepare(insert_historic).await?,
            rescore_card: pg.prepare(rescore_card).await?,
            rescore_score: pg.prepare(rescore_score).await?,
            move_in_time: pg.prepare(&move_in_time).await?,
            move_to_conversation: pg.prepare(&move_to_conversation).await?,
            delete: [
                pg.prepare(&format!("DELETE FROM director.historic_scorecard_scores {filter}"))
                    .await?,
                pg.prepare(&format!("DELETE FROM director.scores {filter}")).await?,
                pg.prepare(&format!("DELETE FROM director.scorecards {filter}")).await?,
            ],
        })
    }
}
