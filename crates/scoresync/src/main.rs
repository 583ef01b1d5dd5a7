//! `scoresync`: change-data-capture from the director PostgreSQL tables to sharded ClickHouse,
//! through Kafka. See the README for the crate map and `scoresync --help` for the commands.

mod commands;
mod config;

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
    /// Check the configuration and that PostgreSQL, Kafka and every ClickHouse shard answer.
    ///
    /// Prints the effective configuration (secrets redacted), then one line per check. Exits
    /// non-zero when the configuration is invalid or any check fails.
    Validate,
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
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("scoresync: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let config = load_config(cli.config.as_deref())?;
    match cli.command {
        Command::Setup { recreate_slot } => commands::setup::run(&config, recreate_slot).await,
        Command::Source => commands::source::run(&config, shutdown_on_signals()?).await,
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
