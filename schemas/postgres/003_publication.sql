-- The publication scoresync streams from: the three tables, every operation (including TRUNCATE).
-- Named `scoresync` here; `scoresync setup` creates it under the configured name when it is missing.
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_publication WHERE pubname = 'scoresync') THEN
        CREATE PUBLICATION scoresync
            FOR TABLE director.scorecards, director.scores, director.historic_scorecard_scores
            WITH (publish = 'insert, update, delete, truncate');
    END IF;
END
$$;
