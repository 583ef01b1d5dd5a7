//! Finding (or starting) the local stack the tests run against.
//!
//! The stack is named by the variables `deploy/local/stack env` prints. When they are not set, the
//! harness runs `deploy/local/stack up` (idempotent; serialised between test processes by `flock`)
//! and reads `stack env`. A stack the harness starts keeps running after the tests so the next test
//! process reuses it; `deploy/local/stack down` stops it (`tests/run` does).
//!
//! Also what the servers a test starts beside the stack share with it: the `scoresync` role's
//! password ([`SCORESYNC_PASSWORD`]) and how a server gets its port ([`free_port`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// Addresses of the servers of the local stack.
#[derive(Clone, Debug)]
pub struct Stack {
    /// Superuser URL of the `director` database (creates test databases and slots).
    pub pg_admin_url: String,
    /// URL of the least-privilege `scoresync` role on the `director` database.
    pub pg_url: String,
    /// Kafka bootstrap brokers.
    pub kafka_brokers: String,
    /// HTTP URL of each ClickHouse shard, in shard order.
    pub clickhouse_shards: Vec<String>,
    /// The stack's state directory.
    pub dir: PathBuf,
}

const VARS: [&str; 5] = [
    "SCORESYNC_PG_URL",
    "SCORESYNC_PG_ADMIN_URL",
    "SCORESYNC_KAFKA_BROKERS",
    "SCORESYNC_CLICKHOUSE_SHARDS",
    "SCORESYNC_STACK_DIR",
];

/// Password of the least-privilege `scoresync` role (`SCORESYNC_PASSWORD` in
/// deploy/local/stack); a private cluster ([`crate::postgres::PrivatePostgres`]) gives it to every
/// role, its superuser included.
pub const SCORESYNC_PASSWORD: &str = "scoresync";

/// A port on 127.0.0.1 that was free when the OS picked it, for a server or listener a test
/// starts (another process may take it before the server binds it, which the test then reports).
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The repository root (where `deploy/local/stack` lives).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

impl Stack {
    /// The stack for this test process: from the environment, or started on first use.
    pub fn get() -> &'static Stack {
        static STACK: OnceLock<Stack> = OnceLock::new();
        STACK.get_or_init(|| match Stack::locate() {
            Ok(stack) => stack,
            Err(err) => panic!("cannot reach the local stack: {err:#}"),
        })
    }

    fn locate() -> anyhow::Result<Stack> {
        let env: HashMap<String, String> = std::env::vars().collect();
        if VARS.iter().all(|v| env.contains_key(*v)) {
            return Stack::from_vars(&env);
        }
        let script = repo_root().join("deploy/local/stack");
        let lock = repo_root().join(".stack.lock");
        eprintln!("harness: stack variables not set; running deploy/local/stack up");
        let status = Command::new("flock")
            .arg(&lock)
            .arg(&script)
            .arg("up")
            .status()
            .context("running deploy/local/stack up")?;
        if !status.success() {
            bail!("deploy/local/stack up failed ({status})");
        }
        let out = Command::new(&script).arg("env").output().context("running stack env")?;
        if !out.status.success() {
            bail!("deploy/local/stack env failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Stack::from_vars(&parse_exports(&String::from_utf8_lossy(&out.stdout)))
    }

    fn from_vars(env: &HashMap<String, String>) -> anyhow::Result<Stack> {
        let get = |name: &str| env.get(name).cloned().with_context(|| format!("{name} is not set"));
        Ok(Stack {
            pg_admin_url: get("SCORESYNC_PG_ADMIN_URL")?,
            pg_url: get("SCORESYNC_PG_URL")?,
            kafka_brokers: get("SCORESYNC_KAFKA_BROKERS")?,
            clickhouse_shards: get("SCORESYNC_CLICKHOUSE_SHARDS")?
                .split(',')
                .map(str::to_owned)
                .collect(),
            dir: PathBuf::from(get("SCORESYNC_STACK_DIR")?),
        })
    }
}

/// Parses the `export NAME=value` lines of `stack env` (values are shell-quoted only when they
/// hold special characters, which the stack's values do not, apart from single quotes).
fn parse_exports(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("export "))
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.trim_matches('\'').to_owned()))
        .collect()
}

/// Replaces the database of a `postgres://...` URL.
pub fn with_database(url: &str, database: &str) -> String {
    let (base, _) = url.rsplit_once('/').unwrap_or((url, ""));
    format!("{base}/{database}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stack_env_output() {
        let vars =
            parse_exports("export SCORESYNC_PG_URL=postgres://a:b@h:1/director\nexport X='a b'\n");
        assert_eq!(vars["SCORESYNC_PG_URL"], "postgres://a:b@h:1/director");
        assert_eq!(vars["X"], "a b");
        assert_eq!(with_database("postgres://a:b@h:1/director", "t1"), "postgres://a:b@h:1/t1");
    }
}
