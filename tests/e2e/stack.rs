//! The local stack script itself: a second, private stack on other ports comes up, answers,
//! stays put on a second `up`, and `down` leaves none of its processes running.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use scoresync_tests::stack::repo_root;

fn stack(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(repo_root().join("deploy/local/stack"))
        .args(args)
        .env("SCORESYNC_STACK_DIR", dir)
        .env("SCORESYNC_STACK_PG_PORT", "25432")
        .env("SCORESYNC_STACK_KAFKA_PORT", "29092")
        .env("SCORESYNC_STACK_CH_HTTP_PORT", "28123")
        .env("SCORESYNC_STACK_CH_TCP_PORT", "29100")
        .output()
        .with_context(|| format!("running stack {args:?}"))?;
    if !out.status.success() {
        bail!("stack {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn pids(dir: &Path) -> anyhow::Result<Vec<u32>> {
    let mut pids = Vec::new();
    for file in ["kafka/pid", "clickhouse0/pid", "clickhouse1/pid"] {
        pids.push(std::fs::read_to_string(dir.join(file))?.trim().parse()?);
    }
    let postmaster = std::fs::read_to_string(dir.join("postgres/data/postmaster.pid"))?;
    pids.push(postmaster.lines().next().context("empty postmaster.pid")?.trim().parse()?);
    Ok(pids)
}

/// True while `pid` runs. A zombie (exited, not yet reaped by whichever process adopted it)
/// counts as stopped.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => {
            stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        }
        Err(_) => false,
    }
}

fn env_var<'a>(env: &'a str, name: &str) -> anyhow::Result<&'a str> {
    env.lines()
        .find_map(|l| l.strip_prefix(&format!("export {name}=")))
        .map(|v| v.trim_matches('\''))
        .with_context(|| format!("{name} missing from stack env"))
}

/// Stops and removes the private stack however the test ends (a failed assertion unwinds).
struct PrivateStack(std::path::PathBuf);

impl Drop for PrivateStack {
    fn drop(&mut self) {
        if let Err(err) = stack(&self.0, &["down", "--purge"]) {
            eprintln!("cleaning up the private stack in {}: {err:#}", self.0.display());
        }
    }
}

#[test]
fn stack_comes_up_answers_is_idempotent_and_goes_down_cleanly() -> anyhow::Result<()> {
    let private = PrivateStack(
        std::env::temp_dir().join(format!("scoresync-stack-test-{}", std::process::id())),
    );
    let dir = &private.0;
    stack(dir, &["up"])?;
    let first = pids(dir)?;
    let env = stack(dir, &["env"])?;

    let pg_url = env_var(&env, "SCORESYNC_PG_URL")?;
    let out = Command::new("psql").args([pg_url, "-Atc", "show wal_level"]).output()?;
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "logical");

    let brokers = env_var(&env, "SCORESYNC_KAFKA_BROKERS")?;
    assert_eq!(brokers, "127.0.0.1:29092");
    let out = Command::new("python3")
        .arg(repo_root().join("deploy/local/kafka_metadata.py"))
        .arg(brokers)
        .output()?;
    let listed = String::from_utf8_lossy(&out.stdout);
    assert_eq!(listed.lines().count(), 1, "one broker: {listed}");

    let shards = env_var(&env, "SCORESYNC_CLICKHOUSE_SHARDS")?;
    assert_eq!(shards, "http://127.0.0.1:28123,http://127.0.0.1:28124");
    for url in shards.split(',') {
        let out = Command::new("curl")
            .args(["-sS", url, "--data-binary", "SELECT count() FROM director.conversations"])
            .output()?;
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "0", "{url}");
    }
    assert!(env_var(&env, "SCORESYNC_CONFIG")?.ends_with("scoresync.toml"));

    let status = stack(dir, &["status"])?;
    assert_eq!(status.lines().filter(|l| l.contains(" up ")).count(), 4, "{status}");

    // A second `up` changes nothing: same processes, same config file.
    let config_before = std::fs::read_to_string(dir.join("scoresync.toml"))?;
    stack(dir, &["up"])?;
    assert_eq!(pids(dir)?, first, "second up restarted a server");
    assert_eq!(std::fs::read_to_string(dir.join("scoresync.toml"))?, config_before);

    stack(dir, &["down"])?;
    let left: Vec<u32> = first.into_iter().filter(|p| alive(*p)).collect();
    assert!(left.is_empty(), "processes left after down: {left:?}");
    Ok(())
}
