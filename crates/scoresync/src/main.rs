//! `scoresync`: change-data-capture from the director PostgreSQL tables to sharded ClickHouse,
//! through Kafka. See the README for the crate map and `scoresync --help` for the commands.

mod commands;
mod metrics;
mod sampler;

// The configuration is the package's library (see lib.rs); `crate::config` names it here.
use scoresync::config;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

/// Keeps a sharded ClickHouse cluster exactly in step with the director scorecard tables.
#[derive(Parser, Debug)]
#[command(name = "scoresync", version, about, long_about = None)]
struct Cli {
    /// Configuration file (TOML). Environment variables SCORESYNC__SECTION__KEY override its keys.
    #[arg(long, short, env = "SCORESYNC_CONFIG", global = true)]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create what the pipeline needs, idempotently: Kafka topics, the publication, the
    /// replication slot with its pipeline record (and a pending initial snapshot), and the
    /// ClickHouse tables on every shard. Reports what existed and what it created.
    Setup {
        /// Drop the replication slot if it exists and create it again, with a new pipeline record
        /// and a fresh initial snapshot. Needed after the slot was lost or dropped; the source
        /// never does this on its own.
        #[arg(long)]
        recreate_slot: bool,
    },
    /// Run the source role: publish the initial snapshot (once), then stream committed changes
    /// from the slot to the change topic, confirming to PostgreSQL only what Kafka acknowledged.
    /// SIGTERM or SIGINT stops it cleanly (exit 0); a permanent problem (slot missing or lost,
    /// another cluster) exits 1 with a message naming it.
    Source,
    /// Run the sink role: consume the change topic and write every change to the ClickHouse
    /// shard it belongs to. Offsets are stored only after every shard acknowledged the rows.
    /// Poison messages go to the dead-letter topic; events that cannot be written yet (a
    /// conversation on no shard) are parked and retried. SIGTERM drains and exits 0.
    Sink,
    /// Run source and sink in one process (the default way to run scoresync). SIGTERM drains
    /// both; a permanent error in either stops both and exits 1.
    Run,
    /// Serve only the metrics sampled out of band (the replication slot's WAL, the sink group's
    /// lag per partition, the latest verify's drift, replay and backfill progress) on [metrics]
    /// listen, with /healthz. Run it beside the daemon so that lag stays visible, and its alerts
    /// fire, while the daemon is down.
    Monitor,
    /// Show where the pipeline stands, hop by hop with a verdict each (in sync, behind, stalled,
    /// halted, and why): the replication slot and its WAL, the source's record, the sink group's
    /// lag per partition (messages and seconds), dead letters, and from the running daemon's
    /// /status the end-to-end lag p50/p99 per table and what it has parked.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Print it again every SECONDS (2 when no value is given) until Ctrl-C.
        #[arg(long, value_name = "SECONDS", num_args = 0..=1, default_missing_value = "2")]
        watch: Option<u64>,
    },
    /// Write a director-like workload into PostgreSQL (and seed conversations on the shards):
    /// scorecards created with their scores and historic scores in one transaction, some
    /// updated, some deleted. For the demo, the tests and benchmarks.
    Loadgen(commands::loadgen::LoadgenArgs),
    /// Rebuild ClickHouse from the change topic, beside the running daemon.
    ///
    /// For a shard that lost data, or to re-apply a time range. Reads every partition from its
    /// start (`--from earliest`, the default; `--from-timestamp`; `--from-offsets`) up to its end
    /// when the replay starts (or `--to-timestamp`), in a consumer group of its own (the
    /// daemon's offsets are never touched), writes through the sink's own code, and exits 0 once
    /// every partition is applied to its end; 1 if interrupted or the sink fails (running it
    /// again is harmless). Rows carry versions: a replay never replaces a newer row, and running
    /// it twice changes nothing. Before it starts, it says which history the topic no longer
    /// holds. To rebuild a lost shard: start it empty, restore its `conversations` table, run
    /// `scoresync setup`, then `scoresync replay --shard N`. Times without a zone are UTC.
    /// Progress on stderr.
    Replay(commands::replay::ReplayArgs),
    /// Re-publish the current PostgreSQL rows of some scorecards, beside the running daemon.
    ///
    /// Selects scorecards (`--customer`, `--profile`, `--kind`, `--since`/`--until` on
    /// `--time-column`, `--keys FILE`; none: all) and publishes each one's rows (the card, its
    /// scores, its historic scores; `--table` to choose) to the change topic, in chunks. Each
    /// chunk waits (at most 10 minutes) for the transactions running when it starts, is read in
    /// one snapshot and is versioned below every change it missed, so a concurrent update wins
    /// (README "The bad day" lists the known limits). Resumable: the same command started again
    /// goes on after the last chunk Kafka acknowledged. Exits 0 when done, 1 if interrupted or
    /// on an error. It cannot see deletes: rows ClickHouse holds that PostgreSQL lacks stay.
    /// Times are RFC 3339 in UTC (a time without a zone is UTC). Progress on stderr.
    Backfill(commands::backfill::BackfillArgs),
    /// Compare PostgreSQL with every ClickHouse shard, beside the running daemon.
    ///
    /// For the same filters as `backfill` (none: everything), finds rows that are missing on
    /// their shard, extra (PostgreSQL lacks them), stale (values differ) or misplaced (on a
    /// wrong shard, or on two), and rows the sink cannot place (unroutable: reported, not
    /// drift). Differences are judged again once the pipeline has applied past them, so
    /// replication lag is not reported as drift; a row that keeps changing is reported as
    /// unstable. `--repair` re-publishes the scorecards of missing, stale and misplaced rows
    /// from PostgreSQL (the backfill path), then writes delete markers over the extra and
    /// misplaced copies still found, then checks again; replication never pauses. Exit 0: no drift; 1: drift;
    /// 2: could not verify (the pipeline did not catch up within `--settle-timeout`, or a
    /// server failed). Progress on stderr.
    Verify(commands::verify::VerifyArgs),
    /// Dead-letter topic operations.
    Dlq {
        #[command(subcommand)]
        command: DlqCommand,
    },
    /// Check the configuration and that PostgreSQL, Kafka and every ClickHouse shard answer.
    ///
    /// Prints the effective configuration (secrets redacted), then one line per check. Exits
    /// non-zero when the configuration is invalid or any check fails.
    Validate,
}

#[derive(Subcommand, Debug)]
enum DlqCommand {
    /// Put dead letters back on the change topic (in their origin partition) once their cause
    /// is fixed. Progress is kept in the consumer group
    /// `<kafka.consumer_group>.redrive`, so each dead letter is redriven once.
    Redrive,
    /// List the dead letters the topic still holds: where each came from (topic, partition,
    /// offset), when, why, and whether it was already redriven.
    List {
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("SCORESYNC_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(err) => {
            eprintln!("scoresync: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // For verify, exit 1 means drift: a verify that failed (any error, the configuration's
    // included) could not verify, which is 2.
    let failure = if matches!(cli.command, Command::Verify(_)) {
        ExitCode::from(2)
    } else {
        ExitCode::FAILURE
    };
    let result = runtime.block_on(run(cli));
    // Blocking work left behind (a metrics sample waiting on a broker that is down) must not
    // hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match result {
        Ok(code) => code,
        Err(err) => {
            eprintln!("scoresync: error: {err:#}");
            failure
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = load_config(cli.config.as_deref())?;
    match cli.command {
        Command::Setup { recreate_slot } => commands::setup::run(&config, recreate_slot).await,
        Command::Source => commands::source::run(&config, shutdown_on_signals()?).await,
        Command::Sink => commands::sink::run(&config, shutdown_on_signals()?).await,
        Command::Run => commands::run::run(&config, shutdown_on_signals()?).await,
        Command::Monitor => commands::monitor::run(&config, shutdown_on_signals()?).await,
        Command::Loadgen(args) => commands::loadgen::run(&config, &args).await,
        Command::Backfill(args) => {
            commands::backfill::run(&config, &args, shutdown_on_signals()?).await
        }
        Command::Verify(args) => {
            commands::verify::run(&config, &args, shutdown_on_signals()?).await
        }
        Command::Replay(args) => {
            commands::replay::run(&config, &args, shutdown_on_signals()?).await
        }
        Command::Status { json, watch } => {
            let every = watch.map(|s| std::time::Duration::from_secs(s.max(1)));
            commands::status::run(&config, json, every).await
        }
        Command::Dlq { command: DlqCommand::Redrive } => commands::dlq::redrive(&config).await,
        Command::Dlq { command: DlqCommand::List { json } } => {
            commands::dlq::list(&config, json).await
        }
        Command::Validate => commands::validate::run(&config).await,
    }
}

/// A token cancelled on the first SIGTERM or SIGINT.
fn shutdown_on_signals() -> anyhow::Result<CancellationToken> {
    use tokio::signal::unix::{SignalKind, signal};
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    Ok(token)
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<config::Config> {
    let Some(path) = path else {
        anyhow::bail!("no configuration: pass --config FILE or set SCORESYNC_CONFIG");
    };
    config::Config::load(path, std::env::vars())
}
