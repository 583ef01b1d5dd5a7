//! A private tansu broker for tests that stop and restart Kafka (the shared one must stay up for
//! every other test). Started by the stack's own script (`deploy/local/tansu-broker`: same binary,
//! same `sqlite://` storage, durable across kill -9), on its own port and database file; killed
//! when dropped.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::stack::{free_port, repo_root};

/// A tansu process the test controls.
pub struct PrivateBroker {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PrivateBroker {
    /// Starts a broker on a free port with storage in `dir`, and waits until it answers.
    pub fn start(dir: PathBuf) -> anyhow::Result<PrivateBroker> {
        std::fs::create_dir_all(&dir)?;
        // A free port can be taken by another test's server before tansu binds it: tansu then
        // exits at once, and is started again on another port.
        let mut attempt = 0;
        loop {
            let mut broker = PrivateBroker { dir: dir.clone(), port: free_port()?, child: None };
            match broker.resume() {
                Ok(()) => return Ok(broker),
                Err(err) if attempt < 3 && broker.child.is_none() => {
                    eprintln!("harness: {err:#}; starting it on another port");
                    attempt += 1;
                }
                Err(err) => return Err(err),
            }
        }
    }

    /// `127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// kill -9 (what a crash or a lost host looks like to clients).
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Starts the broker again on the same port and storage; waits until it answers.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("the private broker is already running");
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("tansu.log"))?;
        // The stack's command line (deploy/local/tansu-broker), run in this broker's directory.
        let child = Command::new(repo_root().join("deploy/local/tansu-broker"))
            .arg(self.port.to_string())
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting deploy/local/tansu-broker")?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let answered = Command::new("python3")
                .arg(repo_root().join("deploy/local/kafka_metadata.py"))
                .arg(self.address())
                .output()
                .is_ok_and(|o| o.status.success());
            if answered {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                let log = self.dir.join("tansu.log");
                bail!("private tansu exited ({status}) before answering; see {}", log.display());
            }
            if std::time::Instant::now() > deadline {
                bail!("private tansu on {} did not answer within 30s", self.address());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
