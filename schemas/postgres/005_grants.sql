-- What the scoresync role (004_replication_role.sql) may do in this database: read the three
-- tables (initial snapshot, backfill, verify, last-resort scorecard lookups) and emit heartbeat
-- messages into the WAL so an idle slot keeps advancing.
GRANT USAGE ON SCHEMA director TO scoresync;
GRANT SELECT ON director.scorecards, director.scores, director.historic_scorecard_scores TO scoresync;
GRANT EXECUTE ON FUNCTION pg_logical_emit_message(boolean, text, text) TO scoresync;
