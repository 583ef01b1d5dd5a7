//! `scoresync loadgen`: writes a director-like workload into PostgreSQL, for the demo, the tests
//! and benchmarks. Conversations are seeded on the ClickHouse shards first (they belong to
//! another pipeline in production). Then scorecards are created the way CreateScorecard does (the
//! card, its scores and its historic scores in one transaction), some are updated (AutoQA
//! rescoring, edited comments), some deleted. Deterministic for a given `--seed`.

use std::process::ExitCode;

use anyhow::Context;

use scoresync_source::connect::ConnectParams;

use crate::config::Config;

/// Workload shape.
#[derive(clap::Args, Debug, Clone)]
pub struct LoadgenArgs {
    /// Scorecards to create.
    #[arg(long, default_value_t = 1000)]
    pub scorecards: usize,
    /// Share of process scorecards (routed by process_interaction_at); the rest are conversation
    /// scorecards.
    #[arg(long, default_value_t = 0.3)]
    pub process_share: f64,
    /// Scores (and historic scores) per scorecard.
    #[arg(long, default_value_t = 5)]
    pub scores_per_card: usize,
    /// Conversations to seed on each ClickHouse shard (0: use what the shards already have).
    #[arg(long, default_value_t = 20)]
    pub conversations_per_shard: usize,
    /// Share of scorecards updated after creation (card score, one score rescored).
    #[arg(long, default_value_t = 0.3)]
    pub update_share: f64,
    /// Share of scorecards deleted at the end (with their scores and historic scores).
    #[arg(long, default_value_t = 0.1)]
    pub delete_share: f64,
    /// Share of scorecards with a large (TOASTed) comment.
    #[arg(long, default_value_t = 0.05)]
    pub large_comment_share: f64,
    /// Random seed.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Prefix of every generated id (run twice with different prefixes for more data).
    #[arg(long, default_value = "lg")]
    pub prefix: String,
    /// PostgreSQL URL of a role that may write the director tables (default: postgres.url).
    #[arg(long, env = "SCORESYNC_LOADGEN_PG_URL")]
    pub pg_url: Option<String>,
}

/// A small deterministic generator (xorshift64*), so a seed reproduces a workload.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }
}

/// A seeded conversation.
#[derive(Clone)]
struct Conv {
    id: String,
    customer: String,
    profile: String,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// Writes the workload; prints what it did.
pub async fn run(config: &Config, args: &LoadgenArgs) -> anyhow::Result<ExitCode> {
    let url = args.pg_url.clone().unwrap_or_else(|| config.postgres.url.clone());
    let pg = ConnectParams::parse(&url)?.connect_sql().await.context("connecting to PostgreSQL")?;
    let mut rng = Rng(args.seed.max(1));
    let convs = seed_conversations(config, args, &mut rng).await?;
    anyhow::ensure!(
        !convs.is_empty() || args.process_share >= 1.0,
        "no conversations on the shards: pass --conversations-per-shard N to seed some"
    );

    let mut cards = Vec::with_capacity(args.scorecards);
    for i in 0..args.scorecards {
        let process = convs.is_empty() || rng.chance(args.process_share);
        let (customer, profile, kind, conversation, pia) = if process {
            // Mostly 2023-2025, a few before 1970 (negative Unix times route too).
            let seconds: i64 = if rng.chance(0.02) {
                -(rng.below(300_000_000) as i64)
            } else {
                1_672_531_200 + rng.below(94_608_000) as i64
            };
            let micros = rng.below(1_000_000) as i64;
            let at = format!("to_timestamp({seconds}) + interval '{micros} microseconds'");
            (format!("cust-{}", i % 3), format!("prof-{}", i % 2), "2", "NULL".to_owned(), at)
        } else {
            // Conversation scorecards: type 1 or unspecified (NULL), both routed by conversation.
            let conv = convs[rng.below(convs.len())].clone();
            let kind = if rng.chance(0.5) { "1" } else { "NULL" };
            (conv.customer, conv.profile, kind, quote(&conv.id), "NULL".to_owned())
        };
        let card = format!("{}-card-{i}", args.prefix);
        let comment = if rng.chance(args.large_comment_share) {
            format!(
                "(SELECT string_agg(md5(g::text || {}), '') FROM generate_series(1, 350) g)",
                quote(&card)
            )
        } else {
            quote(&format!("comment on {card}"))
        };
        let mut tx = vec![format!(
            "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id, template_revision, \
             scorecard_type, conversation_id, process_interaction_at, agent_user_id, creator_user_id, score, comment, \
             submitted_at, created_at, updated_at) VALUES ({c}, {p}, {card}, 'tmpl-{t}', 'rev-1', {kind}, {conversation}, \
             {pia}, 'agent-{a}', 'creator-1', {score}, {comment}, now(), now(), now())",
            c = quote(&customer),
            p = quote(&profile),
            card = quote(&card),
            t = rng.below(5),
            a = rng.below(20),
            score = rng.below(10_000) as f64 / 100.0,
        )];
        for j in 0..args.scores_per_card {
            let score_id = format!("{}-score-{i}-{j}", args.prefix);
            tx.push(format!(
                "INSERT INTO director.scores (customer_id, profile_id, score_id, scorecard_id, criterion_id, numeric_value, \
                 not_applicable, ai_scored, comment, created_at, updated_at) VALUES ({c}, {p}, {s}, {card}, 'crit-{j}', {v}, \
                 {na}, false, NULL, now(), now())",
                c = quote(&customer),
                p = quote(&profile),
                s = quote(&score_id),
                card = quote(&card),
                v = rng.below(100),
                na = rng.chance(0.1),
            ));
            tx.push(format!(
                "INSERT INTO director.historic_scorecard_scores (customer_id, profile_id, scorecard_id, revision, criterion_id, \
                 score_id, numeric_value, not_applicable, scored_at) VALUES ({c}, {p}, {card}, 1, 'crit-{j}', {s}, {v}, false, now())",
                c = quote(&customer),
                p = quote(&profile),
                s = quote(&score_id),
                card = quote(&card),
                v = rng.below(100),
            ));
        }
        pg.batch_execute(&format!("BEGIN; {}; COMMIT", tx.join("; ")))
            .await
            .with_context(|| format!("creating {card}"))?;
        cards.push((customer, profile, card));
    }

    let mut updated = 0;
    for (i, (c, p, card)) in cards.iter().enumerate() {
        if !rng.chance(args.update_share) {
            continue;
        }
        updated += 1;
        let j = rng.below(args.scores_per_card.max(1));
        pg.batch_execute(&format!(
            "BEGIN; UPDATE director.scorecards SET score = {v}, updated_at = now() WHERE customer_id = {c} AND profile_id = {p} AND scorecard_id = {card}; \
             UPDATE director.scores SET numeric_value = {v2}, ai_scored = true, updated_at = now() WHERE customer_id = {c} AND profile_id = {p} \
             AND score_id = {s}; INSERT INTO director.historic_scorecard_scores (customer_id, profile_id, scorecard_id, revision, criterion_id, \
             score_id, numeric_value, not_applicable, scored_at) VALUES ({c}, {p}, {card}, 2, 'crit-{j}', {s}, {v2}, false, now()); COMMIT",
            v = rng.below(10_000) as f64 / 100.0,
            v2 = rng.below(100),
            c = quote(c),
            p = quote(p),
            card = quote(card),
            s = quote(&format!("{}-score-{i}-{j}", args.prefix)),
        ))
        .await
        .with_context(|| format!("updating {card}"))?;
    }

    let mut deleted = 0;
    for (c, p, card) in &cards {
        if !rng.chance(args.delete_share) {
            continue;
        }
        deleted += 1;
        let filter = format!(
            "customer_id = {} AND profile_id = {} AND scorecard_id = {}",
            quote(c),
            quote(p),
            quote(card)
        );
        pg.batch_execute(&format!(
            "BEGIN; DELETE FROM director.historic_scorecard_scores WHERE {filter}; DELETE FROM director.scores WHERE {filter}; \
             DELETE FROM director.scorecards WHERE {filter}; COMMIT"
        ))
        .await
        .with_context(|| format!("deleting {card}"))?;
    }
    println!(
        "loadgen: {} conversation(s) seeded, {} scorecard(s) created ({} score rows each way), {updated} updated, {deleted} deleted",
        convs.len(),
        cards.len(),
        args.scores_per_card
    );
    Ok(ExitCode::SUCCESS)
}

/// Seeds conversations on every shard (or reads the ones there when the count is 0).
async fn seed_conversations(
    config: &Config,
    args: &LoadgenArgs,
    rng: &mut Rng,
) -> anyhow::Result<Vec<Conv>> {
    let mut convs = Vec::new();
    for shard in 0..config.clickhouse.shards.len() {
        let client = scoresync_sink::shard::client(&config.clickhouse, shard).context("shard")?;
        if args.conversations_per_shard == 0 {
            // Use what the shards hold; a shard that does not answer simply contributes none.
            let rows: Result<Vec<(String, String, String)>, _> = client
                .query_raw(
                    "SELECT conversation_id, customer_id, profile_id FROM conversations LIMIT 1000",
                )
                .fetch_all()
                .await;
            match rows {
                Ok(rows) => convs.extend(rows.into_iter().map(|(id, customer, profile)| Conv {
                    id,
                    customer,
                    profile,
                })),
                Err(error) => eprintln!(
                    "loadgen: shard {shard} did not answer ({error}); using the other shards' conversations"
                ),
            }
            continue;
        }
        let mut seeded = Vec::new();
        for k in 0..args.conversations_per_shard {
            let conv = Conv {
                id: format!("{}-conv-{shard}-{k}", args.prefix),
                customer: format!("cust-{}", rng.below(3)),
                profile: format!("prof-{}", rng.below(2)),
            };
            let start = 1_700_000_000 + rng.below(10_000_000) as i64;
            let language = ["en", "de", "fr"][rng.below(3)];
            seeded.push((conv.clone(), start, language));
            convs.push(conv);
        }
        // One bound `(?, ?, ?, toDateTime(?), ?)` per conversation.
        let values = vec!["(?, ?, ?, toDateTime(?), ?)"; seeded.len()].join(", ");
        let insert = client.query(&format!(
            "INSERT INTO conversations (conversation_id, customer_id, profile_id, conversation_start_time, language_code) VALUES {values}"
        ));
        seeded
            .iter()
            .fold(insert, |insert, (conv, start, language)| {
                insert
                    .bind(&conv.id)
                    .bind(&conv.customer)
                    .bind(&conv.profile)
                    .bind(start)
                    .bind(language)
            })
            .execute()
            .await
            .with_context(|| format!("seeding conversations on shard {shard}"))?;
    }
    Ok(convs)
}
