//! End-to-end scenarios against the real local stack. One test binary, one module per area;
//! each test takes its own [`scoresync_tests::TestEnv`].

mod backfill;
mod conversations;
mod large;
mod layout;
mod moves;
mod observability;
mod rebalance;
mod replay;
mod sink;
mod smoke;
mod source;
mod stack;
mod truncate;
mod verify;
mod versions;
mod waits;
