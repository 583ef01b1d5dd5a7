//! `scoresync`: change-data-capture from the director PostgreSQL tables to sharded ClickHouse,
//! through Kafka. See the README for the crate map and `scoresync --help` for the commands.

mod commands;
mod config;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
        Command::Validate => commands::validate::run(&config).await,
    }
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<config::Config> {
    let Some(path) = path else {
        anyhow::bail!("no configuration: pass --config FILE or set SCORESYNC_CONFIG");
    };
    config::Config::load(path, std::env::vars())
}
