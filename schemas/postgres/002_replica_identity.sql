-- What the change stream must carry for scoresync to key and route every change.
--
-- * director.scores: a delete must name its scorecard, so that it is published to the scorecard's
--   Kafka partition and applied on the scorecard's shard. The primary key (customer_id, profile_id,
--   score_id) does not hold scorecard_id, so the replica identity is a unique index that adds it.
--   (Cheaper than FULL: only these four columns are logged for the old row.)
-- * director.scorecards: REPLICA IDENTITY FULL, so an UPDATE that moves a card (type flips,
--   process_interaction_at or conversation_id changes) carries the old routing fields and a DELETE
--   carries the routing fields of the deleted card. The sink can then find the old shard without a
--   lookup. Cost: PostgreSQL logs the whole old row on each update and delete of a scorecard.
-- * director.historic_scorecard_scores: the primary key already holds scorecard_id; DEFAULT works.
--
-- `scoresync validate` checks these settings on the live database. Idempotent.

CREATE UNIQUE INDEX IF NOT EXISTS scores_scoresync_identity
    ON director.scores (customer_id, profile_id, score_id, scorecard_id);
ALTER TABLE director.scores REPLICA IDENTITY USING INDEX scores_scoresync_identity;

ALTER TABLE director.scorecards REPLICA IDENTITY FULL;
