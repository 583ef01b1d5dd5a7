//! `scoresync loadgen`: writes a director-like workload into PostgreSQL, for the demo, the tests
//! and benchmarks. Conversations are seeded on the ClickHouse shards first (they belong to
//! another pipeline in production). Then scorecards are created the way CreateScorecard does (the
//! card, its scores and its historic scores in one transaction), some are updated (AutoQA
//! rescoring, edited comments), some deleted. Deterministic for a given `--seed`. Every value is
//! a statement parameter (PostgreSQL) or bound (ClickHouse), never spliced into SQL text.

use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use secrecy::ExposeSecret;
use tokio_postgres::Client;

mod statements;
use statements::Statements;

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
    /// Share of scorecards whose routing changes after creation, so they move to another shard
    /// with their children (process scorecards: `process_interaction_at` one second later;
    /// conversation scorecards: another conversation of the same customer and profile).
    #[arg(long, default_value_t = 0.05)]
    pub move_share: f64,
    /// Share of scorecards deleted at the end (with their scores and historic scores).
    #[arg(long, default_value_t = 0.1)]
    pub delete_share: f64,
    /// Share of scorecards with a large (TOASTed) comment.
    #[arg(long, default_value_t = 0.05)]
    pub large_comment_share: f64,
    /// Size of a large comment in bytes (random-looking hex, so neither TOAST nor Kafka
    /// compression makes much of it), rounded down to a multiple of 32.
    #[arg(long, default_value_t = 11_200)]
    pub large_comment_bytes: u32,
    /// Random seed: the same seed gives the same workload (with the same `rand` release).
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Prefix of every generated id (run twice with different prefixes for more data).
    #[arg(long, default_value = "lg")]
    pub prefix: String,
    /// PostgreSQL URL of a role that may write the director tables (default: postgres.url).
    #[arg(long, env = "SCORESYNC_LOADGEN_PG_URL")]
    pub pg_url: Option<String>,
}

/// True with probability `p`: never for `p <= 0`, always for `p >= 1` (the shares are not
/// validated, and `random_bool` would panic outside 0..=1).
fn chance(rng: &mut StdRng, p: f64) -> bool {
    rng.random::<f64>() < p
}

/// A seeded conversation.
#[derive(Clone)]
struct Conv {
    id: String,
    customer: String,
    profile: String,
}

/// A generated scorecard's identity and routing fields.
struct Card {
    customer: String,
    profile: String,
    id: String,
    /// `scorecard_type`: 2 (process), 1 or NULL (conversation).
    kind: Option<i16>,
    conversation: Option<String>,
    process_interaction_at: Option<SystemTime>,
}

/// Writes the workload; prints what it did.
pub async fn run(config: &Config, args: &LoadgenArgs) -> anyhow::Result<ExitCode> {
    let url = args.pg_url.clone().unwrap_or_else(|| config.postgres.url.expose_secret().to_owned());
    let mut pg =
        ConnectParams::parse(&url)?.connect_sql().await.context("connecting to PostgreSQL")?;
    let mut rng = StdRng::seed_from_u64(args.seed);
    let convs = seed_conversations(config, args, &mut rng).await?;
    anyhow::ensure!(
        !convs.is_empty() || args.process_share >= 1.0,
        "no conversations on the shards: pass --conversations-per-shard N to seed some"
    );
    let statements = Statements::prepare(&pg).await.context("preparing the workload")?;

    let mut cards = Vec::with_capacity(args.scorecards);
    for i in 0..args.scorecards {
        let card = new_card(args, &convs, &mut rng, i);
        create(&mut pg, &statements, args, &mut rng, &card, i)
            .await
            .with_context(|| format!("creating {}", card.id))?;
        cards.push(card);
    }

    let mut updated = 0;
    for (i, card) in cards.iter().enumerate() {
        if !chance(&mut rng, args.update_share) {
            continue;
        }
        updated += 1;
        rescore(&mut pg, &statements, args, &mut rng, card, i)
            .await
            .with_context(|| format!("updating {}", card.id))?;
    }

    let mut moved = 0;
    for card in &cards {
        if !chance(&mut rng, args.move_share) {
            continue;
        }
        if move_card(&pg, &statements, &convs, &mut rng, card)
            .await
            .with_context(|| format!("moving {}", card.id))?
        {
            moved += 1;
        }
    }

    let mut deleted = 0;
    for card in &cards {
        if !chance(&mut rng, args.delete_share) {
            continue;
        }
        deleted += 1;
        delete(&mut pg, &statements, card)
            .await
            .with_context(|| format!("deleting {}", card.id))?;
    }
    println!(
        "loadgen: {} conversation(s) seeded, {} scorecard(s) created ({} score rows each way), {updated} updated, {moved} moved, {deleted} deleted",
        convs.len(),
        cards.len(),
        args.scores_per_card
    );
    Ok(ExitCode::SUCCESS)
}

/// The `i`-th scorecard: a process scorecard (routed by time) or a conversation scorecard.
fn new_card(args: &LoadgenArgs, convs: &[Conv], rng: &mut StdRng, i: usize) -> Card {
    let id = format!("{}-card-{i}", args.prefix);
    let process = convs.is_empty() || chance(rng, args.process_share);
    if process {
        // Mostly 2023-2025, a few before 1970 (negative Unix times route too).
        let seconds: i64 = if chance(rng, 0.02) {
            -rng.random_range(0..300_000_000_i64)
        } else {
            1_672_531_200 + rng.random_range(0..94_608_000_i64)
        };
        let micros = rng.random_range(0..1_000_000_u64);
        return Card {
            customer: format!("cust-{}", i % 3),
            profile: format!("prof-{}", i % 2),
            id,
            kind: Some(2),
            conversation: None,
            process_interaction_at: Some(unix_time(seconds, micros)),
        };
    }
    // Conversation scorecards: type 1 or unspecified (NULL), both routed by conversation.
    let conv = convs[rng.random_range(0..convs.len())].clone();
    let kind = if chance(rng, 0.5) { Some(1) } else { None };
    Card {
        customer: conv.customer,
        profile: conv.profile,
        id,
        kind,
        conversation: Some(conv.id),
        process_interaction_at: None,
    }
}

/// Changes a card's routing fields so that it routes elsewhere: a process scorecard one second
/// later (the next shard), a conversation scorecard to another conversation of its customer and
/// profile (usually on another shard). False when there is no other conversation to move to.
async fn move_card(
    pg: &Client,
    statements: &Statements,
    convs: &[Conv],
    rng: &mut StdRng,
    card: &Card,
) -> Result<bool, tokio_postgres::Error> {
    let key: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&card.customer, &card.profile, &card.id];
    if card.kind == Some(2) {
        pg.execute(&statements.move_in_time, &key).await?;
        return Ok(true);
    }
    let others: Vec<&Conv> = convs
        .iter()
        .filter(|c| c.customer == card.customer && c.profile == card.profile)
        .filter(|c| Some(&c.id) != card.conversation.as_ref())
        .collect();
    if others.is_empty() {
        return Ok(false);
    }
    let to = &others[rng.random_range(0..others.len())].id;
    pg.execute(&statements.move_to_conversation, &[key[0], key[1], key[2], to]).await?;
    Ok(true)
}

/// `seconds` (negative before 1970) and `micros` after the Unix epoch.
fn unix_time(seconds: i64, micros: u64) -> SystemTime {
    let whole = Duration::from_secs(seconds.unsigned_abs());
    let at = if seconds < 0 { UNIX_EPOCH - whole } else { UNIX_EPOCH + whole };
    at + Duration::from_micros(micros)
}

/// Creates a scorecard the way CreateScorecard does: the card, its scores and its historic
/// scores in one transaction.
async fn create(
    pg: &mut Client,
    statements: &Statements,
    args: &LoadgenArgs,
    rng: &mut StdRng,
    card: &Card,
    i: usize,
) -> Result<(), tokio_postgres::Error> {
    let comment =
        (!chance(rng, args.large_comment_share)).then(|| format!("comment on {}", card.id));
    let template = format!("tmpl-{}", rng.random_range(0..5));
    let agent = format!("agent-{}", rng.random_range(0..20));
    let score = f64::from(rng.random_range(0..10_000_u32)) / 100.0;
    let tx = pg.transaction().await?;
    let (c, p) = (&card.customer, &card.profile);
    tx.execute(
        &statements.insert_card,
        &[
            c,
            p,
            &card.id,
            &template,
            &card.kind,
            &card.conversation,
            &card.process_interaction_at,
            &agent,
            &score,
            &comment,
            &i32::try_from(args.large_comment_bytes / 32).unwrap_or(i32::MAX),
        ],
    )
    .await?;
    for j in 0..args.scores_per_card {
        let score_id = format!("{}-score-{i}-{j}", args.prefix);
        let criterion = format!("crit-{j}");
        let (value, not_applicable) = (f64::from(rng.random_range(0..100_u32)), chance(rng, 0.1));
        tx.execute(
            &statements.insert_score,
            &[c, p, &score_id, &card.id, &criterion, &value, &not_applicable],
        )
        .await?;
        let value = f64::from(rng.random_range(0..100_u32));
        tx.execute(
            &statements.insert_historic,
            &[c, p, &card.id, &1_i32, &criterion, &score_id, &value],
        )
        .await?;
    }
    tx.commit().await
}

/// AutoQA rescoring: the card's score, one score's value, and a second historic revision.
async fn rescore(
    pg: &mut Client,
    statements: &Statements,
    args: &LoadgenArgs,
    rng: &mut StdRng,
    card: &Card,
    i: usize,
) -> Result<(), tokio_postgres::Error> {
    let j = rng.random_range(0..args.scores_per_card.max(1));
    let card_score = f64::from(rng.random_range(0..10_000_u32)) / 100.0;
    let value = f64::from(rng.random_range(0..100_u32));
    let score_id = format!("{}-score-{i}-{j}", args.prefix);
    let criterion = format!("crit-{j}");
    let (c, p) = (&card.customer, &card.profile);
    let tx = pg.transaction().await?;
    tx.execute(&statements.rescore_card, &[c, p, &card.id, &card_score]).await?;
    tx.execute(&statements.rescore_score, &[c, p, &score_id, &value]).await?;
    tx.execute(
        &statements.insert_historic,
        &[c, p, &card.id, &2_i32, &criterion, &score_id, &value],
    )
    .await?;
    tx.commit().await
}

/// Deletes a scorecard with its historic scores and scores, in one transaction.
async fn delete(
    pg: &mut Client,
    statements: &Statements,
    card: &Card,
) -> Result<(), tokio_postgres::Error> {
    let tx = pg.transaction().await?;
    for statement in &statements.delete {
        tx.execute(statement, &[&card.customer, &card.profile, &card.id]).await?;
    }
    tx.commit().await
}

/// Seeds conversations on every shard (or reads the ones there when the count is 0).
async fn seed_conversations(
    config: &Config,
    args: &LoadgenArgs,
    rng: &mut StdRng,
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
                customer: format!("cust-{}", rng.random_range(0..3)),
                profile: format!("prof-{}", rng.random_range(0..2)),
            };
            let start = 1_700_000_000 + rng.random_range(0..10_000_000_i64);
            let language = ["en", "de", "fr"][rng.random_range(0..3)];
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
