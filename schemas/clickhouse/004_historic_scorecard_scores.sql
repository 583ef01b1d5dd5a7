-- Shard-local copy of director.historic_scorecard_scores, on its scorecard's shard, carrying its
-- scorecard's fields. Same conventions as scorecards.
CREATE TABLE IF NOT EXISTS historic_scorecard_scores
(
    customer_id             String,
    profile_id              String,
    scorecard_id            String,
    revision                Int32,
    criterion_id            String,
    score_id                Nullable(String),
    numeric_value           Nullable(Float64),
    not_applicable          Nullable(UInt8),
    scored_at               Nullable(Int64),
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
ORDER BY (customer_id, profile_id, scorecard_id, revision, criterion_id);
