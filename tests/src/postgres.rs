//! A private PostgreSQL cluster for tests that need a second, newly `initdb`-ed cluster (a rebuilt
//! or restored primary). Same binaries and settings as `deploy/local/stack`; own port and data
//! directory; stopped (`pg_ctl stop -m immediate`) when dropped.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

use crate::stack::{SCORESYNC_PASSWORD, free_port, repo_root};

/// A running private cluster.
pub struct PrivatePostgres {
    dir: PathBuf,
    port: u16,
}

fn pg_bin(tool: &str) -> PathBuf {
    let dir =
        std::env::var("SCORESYNC_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    Path::new(&dir).join(tool)
}

/// Runs a PostgreSQL server tool as the `postgres` OS user when we are root (the server refuses
/// to run as root), as ourselves otherwise.
fn as_postgres(tool: &str) -> Command {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(pg_bin(tool));
        c
    } else {
        Command::new(pg_bin(tool))
    }
}

fn run(mut command: Command, what: &str) -> anyhow::Result<()> {
    let out = command.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

impl PrivatePostgres {
    /// `initdb`s a cluster under `dir` and starts it with logical decoding on.
    pub fn start(dir: PathBuf) -> anyhow::Result<PrivatePostgres> {
        let data = dir.join("data");
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let pwfile = dir.join("pwfile");
        std::fs::write(&pwfile, format!("{SCORESYNC_PASSWORD}\n"))?;
        let _ = Command::new("chown").args(["-R", "postgres:"]).arg(&dir).status();
        let mut initdb = as_postgres("initdb");
        initdb
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth-local=trust", "--auth-host=scram-sha-256"])
            .args(["-E", "UTF8", "--locale=C.UTF-8"])
            .arg(format!("--pwfile={}", pwfile.display()));
        run(initdb, "initdb")?;
        let settings = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             wal_level = logical\nmax_replication_slots = 10\nmax_wal_senders = 10\n\
             timezone = 'UTC'\n",
            dir.display()
        );
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)?;
        text.push_str(&settings);
        std::fs::write(&conf, text)?;
        let hba = data.join("pg_hba.conf");
        let mut text = std::fs::read_to_string(&hba)?;
        text.push_str(
            "host all all 127.0.0.1/32 scram-sha-256\nhost replication all 127.0.0.1/32 scram-sha-256\n",
        );
        std::fs::write(&hba, text)?;
        let cluster = PrivatePostgres { dir, port };
        let mut start = as_postgres("pg_ctl");
        start
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(cluster.dir.join("postgres.log"))
            .args(["-w", "-t", "60", "start"]);
        run(start, "pg_ctl start")?;
        Ok(cluster)
    }

    /// URL of database `db` as `user` (`postgres` or `scoresync`; both have the password
    /// [`SCORESYNC_PASSWORD`]).
    pub fn url(&self, user: &str, db: &str) -> String {
        format!("postgres://{user}:{SCORESYNC_PASSWORD}@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db` with every `schemas/postgres/*.sql` applied, as a new cluster gets it.
    pub fn create_database(&self, db: &str) -> anyhow::Result<()> {
        let mut create = Command::new("psql");
        create
            .arg(self.url("postgres", "postgres"))
            .args(["-q", "-c"])
            .arg(format!("CREATE DATABASE \"{db}\""));
        run(create, "CREATE DATABASE")?;
        apply_schema(&self.url("postgres", db), SCORESYNC_PASSWORD, |_| true)
    }
}

/// Applies `schemas/postgres/*.sql` (those `include` accepts) in name order to `admin_url`.
pub fn apply_schema(
    admin_url: &str,
    scoresync_password: &str,
    include: impl Fn(&Path) -> bool,
) -> anyhow::Result<()> {
    let mut files: Vec<_> = std::fs::read_dir(repo_root().join("schemas/postgres"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .filter(|p| include(p))
        .collect();
    files.sort();
    for file in files {
        let mut psql = Command::new("psql");
        psql.arg(admin_url)
            .args(["-q", "-v", "ON_ERROR_STOP=1", "-v"])
            .arg(format!("scoresync_password={scoresync_password}"))
            .arg("-f")
            .arg(&file);
        run(psql, &format!("psql -f {}", file.display()))?;
    }
    Ok(())
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        let mut stop = as_postgres("pg_ctl");
        stop.arg("-D").arg(self.dir.join("data")).args(["-m", "immediate", "-w", "stop"]);
        if let Err(err) = run(stop, "pg_ctl stop") {
            eprintln!(
                "harness: stopping the private PostgreSQL in {}: {err:#}",
                self.dir.display()
            );
        }
    }
}
