-- Owned by another pipeline; scoresync only reads it to route conversation scorecards and to copy
-- conversation_start_time and language_code onto their rows. The tests seed it.
CREATE TABLE IF NOT EXISTS conversations
(
    conversation_id         String,
    customer_id             String,
    profile_id              String,
    conversation_start_time DateTime,
    language_code           String
)
ENGINE = ReplacingMergeTree
ORDER BY (customer_id, profile_id, conversation_id);
