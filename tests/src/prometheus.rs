//! A private Prometheus server (Debian's `prometheus`) scraping a test's daemon and its
//! `scoresync monitor`, started with the stack's own script (`deploy/local/prometheus`) on a free
//! loopback port; killed when dropped. Queries go through its HTTP API.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::stack::{free_port, repo_root};

/// A Prometheus process the test owns.
pub struct PrivatePrometheus {
    port: u16,
    child: Child,
}

impl PrivatePrometheus {
    /// Starts Prometheus in `dir` scraping `daemon` (job `scoresync`) and `monitor` (job
    /// `scoresync-monitor`) every second, evaluating `rules` every second; waits until it is
    /// ready.
    pub async fn start(
        dir: &Path,
        daemon: &str,
        monitor: &str,
        rules: &Path,
    ) -> anyhow::Result<PrivatePrometheus> {
        std::fs::create_dir_all(dir)?;
        // A free port can be taken by another test's server before Prometheus binds it:
        // Prometheus then exits at once, and is started again on another port.
        for attempt in 0.. {
            let port = free_port()?;
            let log = std::fs::File::create(dir.join("prometheus.log"))?;
            let child = Command::new(repo_root().join("deploy/local/prometheus"))
                .arg(dir)
                .arg(port.to_string())
                .args([daemon, monitor])
                .arg(rules)
                .arg("1s")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("starting deploy/local/prometheus")?;
            let mut server = PrivatePrometheus { port, child };
            match server.wait_ready(dir).await {
                Ok(()) => return Ok(server),
                Err(err) if attempt < 3 && server.child.try_wait()?.is_some() => {
                    eprintln!("harness: {err:#}; starting it on another port");
                }
                Err(err) => return Err(err),
            }
        }
        unreachable!("the loop returns")
    }

    async fn wait_ready(&mut self, dir: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        let url = format!("{}/-/ready", self.url());
        loop {
            if reqwest::get(&url).await.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            if let Some(status) = self.child.try_wait()? {
                let log = PathBuf::from(dir).join("prometheus.log");
                bail!("prometheus exited ({status}) before it was ready; see {}", log.display());
            }
            if Instant::now() > deadline {
                bail!("prometheus on port {} not ready within 30 s", self.port);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The series an instant query returns (an error when Prometheus refuses the expression).
    pub async fn query(&self, expr: &str) -> anyhow::Result<Vec<Value>> {
        let body: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.url()))
            .query(&[("query", expr)])
            .send()
            .await?
            .json()
            .await?;
        if body["status"] != "success" {
            bail!("prometheus refused {expr:?}: {body}");
        }
        Ok(body["data"]["result"].as_array().cloned().unwrap_or_default())
    }

    /// Names of the alerts firing now.
    pub async fn firing(&self) -> anyhow::Result<Vec<String>> {
        let body: Value =
            reqwest::get(format!("{}/api/v1/alerts", self.url())).await?.json().await?;
        Ok(body["data"]["alerts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|a| a["state"] == "firing")
            .filter_map(|a| a["labels"]["alertname"].as_str().map(str::to_owned))
            .collect())
    }
}

impl Drop for PrivatePrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
