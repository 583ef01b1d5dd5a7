-- Shard-local copy of director.scorecards. Column names are PostgreSQL's.
-- timestamptz columns are Int64 microseconds since the Unix epoch (UTC): exact, and able to hold
-- times before 1970, which DateTime cannot. Booleans are UInt8.
-- One copy of each row, on the shard routing chooses. Readers use FINAL and filter _deleted = 0.
-- _version comes from the source position (commit LSN and order in the transaction, above a
-- per-pipeline base; crates/event/src/version.rs), so replays never regress a row.
CREATE TABLE IF NOT EXISTS scorecards
(
    customer_id            String,
    profile_id             String,
    scorecard_id           String,
    template_id            String,
    template_revision      Nullable(String),
    scorecard_type         Nullable(Int16),
    conversation_id        Nullable(String),
    process_interaction_at Nullable(Int64),
    agent_user_id          Nullable(String),
    creator_user_id        Nullable(String),
    score                  Nullable(Float64),
    comment                Nullable(String),
    submitted_at           Nullable(Int64),
    created_at             Nullable(Int64),
    updated_at             Nullable(Int64),
    _version               UInt64,
    _deleted               UInt8
)
ENGINE = ReplacingMergeTree(_version)
ORDER BY (customer_id, profile_id, scorecard_id);
