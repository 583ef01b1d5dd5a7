-- Shard-local copy of director.scores, on its scorecard's shard, carrying its scorecard's fields
-- (scorecard_type .. language_code) as the director app's WriteScores does.
-- Same conventions as scorecards: Int64 microsecond timestamps, UInt8 booleans, FINAL + _deleted.
CREATE TABLE IF NOT EXISTS scores
(
    customer_id             String,
    profile_id              String,
    score_id                String,
    scorecard_id            String,
    criterion_id            String,
    numeric_value           Nullable(Float64),
    not_applicable          UInt8,
    ai_scored               UInt8,
    comment                 Nullable(String),
    created_at              Nullable(Int64),
    updated_at              Nullable(Int64),
    scorecard_type          Nullable(Int16),
    template_id             String,
    template_revision       Nullable(String),
    agent_user_id           Nullable(String),
    conversation_id         Nullable(String),
    process_interaction_at  Nullable(Int64),
    conversation_start_time Nullable(DateTime),
    language_code           Nullable(String),
    _version                UInt64,
    _deleted                UInt8
)
ENGINE = ReplacingMergeTree(_version)
ORDER BY (customer_id, profile_id, score_id);
