//! Running the real `scoresync` binary from a test: start with a test's config, stop it with
//! SIGTERM or kill -9 it, read what it logged. A daemon still running when its handle drops is
//! killed, and the tail of its log is printed (the runner shows it when the test fails).

use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use crate::test_env::TestEnv;

/// The `scoresync` binary of this build (`target/<profile>/scoresync`, next to `deps/`).
pub fn binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap_or_default();
    let dir = exe.parent().and_then(Path::parent).map(Path::to_path_buf).unwrap_or_default();
    let bin = dir.join("scoresync");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (cargo build -p scoresync; tests/run does)",
        bin.display()
    );
    bin
}

/// A running `scoresync` process.
pub struct Daemon {
    child: Child,
    label: String,
    log: PathBuf,
}

impl Daemon {
    /// Starts `scoresync <args>` with the test's configuration; output goes to a log file.
    pub fn start(env: &TestEnv, args: &[&str]) -> anyhow::Result<Daemon> {
        Self::start_with(env, args, &[])
    }

    /// Like [`Daemon::start`], with extra environment variables (e.g. `SCORESYNC__...` overrides).
    pub fn start_with(
        env: &TestEnv,
        args: &[&str],
        vars: &[(&str, &str)],
    ) -> anyhow::Result<Daemon> {
        // The command words only (never option values: they may hold a password).
        let label =
            args.iter().take_while(|a| !a.starts_with('-')).copied().collect::<Vec<_>>().join("-");
        let log = env.dir().join(format!("{label}-{}.log", unique_suffix()));
        let file =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        // `env.metrics_listen` belongs to the sink (`status` reads its /status there): a source
        // run on its own gets a port of its own, as each process of a deployment does.
        let own_port = (args.first() == Some(&"source")
            && !vars.iter().any(|(k, _)| *k == "SCORESYNC__METRICS__LISTEN"))
        .then(|| crate::stack::free_port().map(|p| format!("127.0.0.1:{p}")))
        .transpose()?;
        let child = Command::new(binary())
            .args(args)
            .env("SCORESYNC_CONFIG", env.config_path()?)
            .env("SCORESYNC_LOG", "info,scoresync=debug")
            .envs(own_port.iter().map(|l| ("SCORESYNC__METRICS__LISTEN", l.as_str())))
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .kill_on_drop(true)
            .spawn()
            .context("starting scoresync")?;
        Ok(Daemon { child, label, log })
    }

    /// Runs `scoresync <args>` to its end (at most `deadline`), stdout and stderr kept apart: for
    /// commands whose stdout is a result (`verify --json`).
    pub async fn run_to_end(
        env: &TestEnv,
        args: &[&str],
        deadline: Duration,
    ) -> anyhow::Result<std::process::Output> {
        let run = Command::new(binary())
            .args(args)
            .env("SCORESYNC_CONFIG", env.config_path()?)
            .env("SCORESYNC_LOG", "info,scoresync=debug")
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output();
        let label = args.iter().take_while(|a| !a.starts_with('-')).copied().collect::<Vec<_>>();
        tokio::time::timeout(deadline, run)
            .await
            .with_context(|| {
                format!("scoresync {} did not exit within {deadline:?}", label.join(" "))
            })?
            .context("running scoresync")
    }

    /// The process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM and waits (up to `deadline`) for the exit status.
    pub async fn terminate(mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        let pid = self.pid().context("process already reaped")?;
        let status =
            std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status()?;
        if !status.success() {
            bail!("kill -TERM {pid} failed");
        }
        self.wait(deadline).await
    }

    /// kill -9, and wait until the process is gone.
    pub async fn kill9(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.context("kill -9")?;
        Ok(())
    }

    /// Waits (up to `deadline`) for the process to exit on its own.
    pub async fn wait(&mut self, deadline: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(deadline, self.child.wait())
            .await
            .with_context(|| format!("scoresync {} did not exit within {deadline:?}", self.label))?
            .context("waiting for scoresync")
    }

    /// Everything the process wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // The test runner shows a test's output only when it fails, so print unconditionally.
        let output = self.output();
        let tail: Vec<&str> = output.lines().rev().take(60).collect();
        eprintln!("---- scoresync {} log (last lines, newest last) ----", self.label);
        for line in tail.into_iter().rev() {
            eprintln!("{line}");
        }
        // Kill and reap before the test's topics are deleted: a producer writing to a deleted
        // topic crashes tansu 0.6's storage (an idempotent-producer check panics).
        let _ = self.child.start_kill();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

fn unique_suffix() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}
