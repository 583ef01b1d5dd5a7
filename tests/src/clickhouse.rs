//! Private ClickHouse shards for tests that stop a shard (the stack's shards serve every other
//! test). Same binary and config template (`deploy/local/clickhouse-server.xml`) as
//! `deploy/local/stack`; own ports and data directories; killed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::stack::free_port;

/// The stack's server config template; its placeholders are filled by [`server_config`].
const CONFIG_TEMPLATE: &str = include_str!("../../deploy/local/clickhouse-server.xml");

/// The config of a private server with state in `dir`: the stack's template, with smaller limits
/// than the stack's shards (`ch_config` in deploy/local/stack fills in 512, 200 and 256 MiB).
fn server_config(dir: &Path, http: u16, tcp: u16, interserver: u16) -> String {
    let values = [
        ("@DIR@", dir.display().to_string()),
        ("@HTTP_PORT@", http.to_string()),
        ("@TCP_PORT@", tcp.to_string()),
        ("@INTERSERVER_PORT@", interserver.to_string()),
        ("@MAX_CONNECTIONS@", "256".into()),
        ("@MAX_CONCURRENT_QUERIES@", "100".into()),
        ("@CACHE_BYTES@", "134217728".into()),
    ];
    values.iter().fold(CONFIG_TEMPLATE.to_owned(), |config, (placeholder, value)| {
        config.replace(placeholder, value)
    })
}

/// One private server.
struct Server {
    dir: PathBuf,
    http_port: u16,
    child: Option<Child>,
}

/// A set of private shards.
pub struct PrivateShards {
    servers: Vec<Server>,
}

impl PrivateShards {
    /// Starts `count` servers with data under `dir`, and waits until each answers.
    pub fn start(dir: PathBuf, count: usize) -> anyhow::Result<PrivateShards> {
        let mut servers = Vec::new();
        for i in 0..count {
            let dir = dir.join(format!("clickhouse{i}"));
            std::fs::create_dir_all(dir.join("data"))?;
            std::fs::copy("/etc/clickhouse-server/users.xml", dir.join("users.xml")).context(
                "copying /etc/clickhouse-server/users.xml (is clickhouse-server installed?)",
            )?;
            // A free port can be taken by another test's server before this one binds it: the
            // server then exits at once, and is started again on other ports.
            let mut attempt = 0;
            let server = loop {
                let (http, tcp, interserver) = (free_port()?, free_port()?, free_port()?);
                std::fs::write(
                    dir.join("config.xml"),
                    server_config(&dir, http, tcp, interserver),
                )?;
                let mut server = Server { dir: dir.clone(), http_port: http, child: None };
                match server.start() {
                    Ok(()) => break server,
                    Err(err) if attempt < 3 && server.lost_its_port() => {
                        eprintln!("harness: {err:#}; starting it on other ports");
                        attempt += 1;
                    }
                    Err(err) => return Err(err),
                }
            };
            servers.push(server);
        }
        Ok(PrivateShards { servers })
    }

    /// HTTP URLs in shard order.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(|s| format!("http://127.0.0.1:{}", s.http_port)).collect()
    }

    /// Stops shard `i` (SIGTERM, then waits for it to exit). Its data stays.
    pub fn stop(&mut self, i: usize) -> anyhow::Result<()> {
        self.servers[i].stop()
    }

    /// Starts shard `i` again and waits until it answers.
    pub fn resume(&mut self, i: usize) -> anyhow::Result<()> {
        self.servers[i].start()
    }

    /// Loses shard `i` for good: stops it, deletes its data directory (every database and table)
    /// and starts it empty.
    pub fn lose(&mut self, i: usize) -> anyhow::Result<()> {
        let server = &mut self.servers[i];
        server.stop()?;
        let data = server.dir.join("data");
        std::fs::remove_dir_all(&data)?;
        std::fs::create_dir_all(&data)?;
        server.start()
    }

    /// Freezes shard `i` (SIGSTOP): it keeps its connections and answers nothing, as a hung
    /// server does.
    pub fn freeze(&mut self, i: usize) -> anyhow::Result<()> {
        self.servers[i].signal("-STOP")
    }

    /// Lets a frozen shard `i` go on (SIGCONT).
    pub fn thaw(&mut self, i: usize) -> anyhow::Result<()> {
        self.servers[i].signal("-CONT")
    }
}

impl Server {
    fn start(&mut self) -> anyhow::Result<()> {
        if self.child.is_some() {
            bail!("private clickhouse in {} is already running", self.dir.display());
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))?;
        let child = Command::new("/usr/sbin/clickhouse-server")
            .arg(format!("--config-file={}", self.dir.join("config.xml").display()))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting clickhouse-server")?;
        self.child = Some(child);
        let url = format!("http://127.0.0.1:{}/?query=SELECT%201", self.http_port);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let answered =
                Command::new("curl").args(["-sf", &url]).output().is_ok_and(|o| o.status.success());
            if answered {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Some(status) = child.try_wait()?
            {
                self.child = None;
                let log = self.dir.join("server.err.log");
                bail!(
                    "private clickhouse exited ({status}) before answering; see {}",
                    log.display()
                );
            }
            if std::time::Instant::now() > deadline {
                bail!("private clickhouse on port {} did not answer within 60s", self.http_port);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// True when the server's error log says a port it was given was taken.
    fn lost_its_port(&self) -> bool {
        std::fs::read_to_string(self.dir.join("server.err.log"))
            .is_ok_and(|log| log.contains("Address already in use"))
    }

    fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("private clickhouse is not running")?;
        let status = Command::new("kill").args([signal, &child.id().to_string()]).status()?;
        anyhow::ensure!(status.success(), "kill {signal} {} failed", child.id());
        Ok(())
    }

    fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").args(["-TERM", &child.id().to_string()]).status();
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while child.try_wait()?.is_none() {
                if std::time::Instant::now() > deadline {
                    child.kill()?;
                    child.wait()?;
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }
}

impl Drop for PrivateShards {
    fn drop(&mut self) {
        for server in &mut self.servers {
            // A frozen server cannot die of SIGKILL until it runs again.
            let _ = server.signal("-CONT");
            if let Some(mut child) = server.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
            // The data can be gigabytes (an outage under large rows): kept, the test directories
            // of a few runs fill the disk. The config and the server's logs stay for a look.
            let _ = std::fs::remove_dir_all(server.dir.join("data"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_is_filled_completely() {
        let config = server_config(Path::new("/tmp/t/clickhouse0"), 1, 2, 3);
        let placeholder = config.split('@').skip(1).step_by(2).find(|name| {
            !name.is_empty() && name.chars().all(|c| c.is_ascii_uppercase() || c == '_')
        });
        assert_eq!(placeholder, None, "a placeholder server_config does not fill:\n{config}");
        assert!(config.contains("<http_port>1</http_port>"), "{config}");
        assert!(config.contains("<path>/tmp/t/clickhouse0/data/</path>"), "{config}");
    }
}
