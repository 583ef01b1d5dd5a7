//! Private ClickHouse shards for tests that stop a shard (the stack's shards serve every other
//! test). Same binary and config shape as `deploy/local/stack`; own ports and data directories;
//! killed when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};

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

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl PrivateShards {
    /// Starts `count` servers with data under `dir`, and waits until each answers.
    pub fn start(dir: PathBuf, count: usize) -> anyhow::Result<PrivateShards> {
        let mut servers = Vec::new();
        for i in 0..count {
            let dir = dir.join(format!("clickhouse{i}"));
            std::fs::create_dir_all(dir.join("data"))?;
            let (http, tcp, interserver) = (free_port()?, free_port()?, free_port()?);
            let config = format!(
                r#"<?xml version="1.0"?>
<yandex>
    <logger><level>warning</level><log>{d}/server.log</log><errorlog>{d}/server.err.log</errorlog><size>100M</size><count>2</count></logger>
    <http_port>{http}</http_port>
    <tcp_port>{tcp}</tcp_port>
    <interserver_http_port>{interserver}</interserver_http_port>
    <listen_host>127.0.0.1</listen_host>
    <max_connections>256</max_connections>
    <keep_alive_timeout>10</keep_alive_timeout>
    <max_concurrent_queries>100</max_concurrent_queries>
    <uncompressed_cache_size>134217728</uncompressed_cache_size>
    <mark_cache_size>134217728</mark_cache_size>
    <path>{d}/data/</path>
    <tmp_path>{d}/data/tmp/</tmp_path>
    <user_files_path>{d}/data/user_files/</user_files_path>
    <format_schema_path>{d}/data/format_schemas/</format_schema_path>
    <users_config>users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mlock_executable>false</mlock_executable>
</yandex>
"#,
                d = dir.display()
            );
            std::fs::write(dir.join("config.xml"), config)?;
            std::fs::copy("/etc/clickhouse-server/users.xml", dir.join("users.xml")).context(
                "copying /etc/clickhouse-server/users.xml (is clickhouse-server installed?)",
            )?;
            let mut server = Server { dir, http_port: http, child: None };
            server.start()?;
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
            if std::time::Instant::now() > deadline {
                bail!("private clickhouse on port {} did not answer within 60s", self.http_port);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
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
            if let Some(mut child) = server.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}
