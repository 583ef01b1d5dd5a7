-- The three director tables scoresync replicates, as the director app has them (DESIGN.md section 3).
-- Applied by `deploy/local/stack up` and by the tests to each fresh database. Idempotent.

CREATE SCHEMA IF NOT EXISTS director;

CREATE TABLE IF NOT EXISTS director.scorecards (
    customer_id            text NOT NULL,
    profile_id             text NOT NULL,
    scorecard_id           text NOT NULL,
    template_id            text NOT NULL,
    template_revision      text,
    -- NULL or 0 = unspecified, 1 = conversation, 2 = process.
    scorecard_type         smallint,
    -- Set on conversation scorecards.
    conversation_id        text,
    -- Set on process scorecards; routes them to shard (unix seconds % shard count).
    process_interaction_at timestamptz,
    agent_user_id          text,
    creator_user_id        text,
    score                  double precision,
    -- Free text; can be large and TOASTed.
    comment                text,
    submitted_at           timestamptz,
    created_at             timestamptz,
    updated_at             timestamptz,
    PRIMARY KEY (customer_id, profile_id, scorecard_id)
);

CREATE TABLE IF NOT EXISTS director.scores (
    customer_id    text NOT NULL,
    profile_id     text NOT NULL,
    score_id       text NOT NULL,
    scorecard_id   text NOT NULL,
    criterion_id   text NOT NULL,
    numeric_value  double precision,
    not_applicable boolean NOT NULL DEFAULT false,
    ai_scored      boolean NOT NULL DEFAULT false,
    comment        text,
    created_at     timestamptz,
    updated_at     timestamptz,
    PRIMARY KEY (customer_id, profile_id, score_id)
);

CREATE TABLE IF NOT EXISTS director.historic_scorecard_scores (
    customer_id    text NOT NULL,
    profile_id     text NOT NULL,
    scorecard_id   text NOT NULL,
    revision       integer NOT NULL,
    criterion_id   text NOT NULL,
    score_id       text,
    numeric_value  double precision,
    not_applicable boolean,
    scored_at      timestamptz,
    PRIMARY KEY (customer_id, profile_id, scorecard_id, revision, criterion_id)
);
