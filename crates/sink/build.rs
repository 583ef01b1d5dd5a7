//! Embeds the per-shard ClickHouse schema: every `schemas/clickhouse/*.sql`, in name order, with
//! the table its `CREATE TABLE IF NOT EXISTS <name>` statement creates. `setup` thus applies
//! exactly what the local stack and the tests apply; a new file needs no code change, and a file
//! without that statement fails the build.

use std::path::{Path, PathBuf};
use std::{env, fs};

const CREATE: &str = "CREATE TABLE IF NOT EXISTS";

fn main() {
    let manifest = env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
    let dir = Path::new(&manifest).join("../../schemas/clickhouse");
    // A directory: cargo reruns this script when any file in it is added, changed or removed.
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("reading {}: {e}", dir.display()))
        .map(|entry| entry.unwrap_or_else(|e| panic!("reading {}: {e}", dir.display())).path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "sql"))
        .collect();
    files.sort();
    let mut tables = String::from("&[\n");
    for path in &files {
        let ddl =
            fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
        let table = created_table(&ddl).unwrap_or_else(|| {
            panic!("{} must hold one `{CREATE} <name>` statement", path.display())
        });
        let path = path.to_str().unwrap_or_else(|| panic!("{} is not UTF-8", path.display()));
        tables.push_str(&format!("    ({table:?}, include_str!({path:?})),\n"));
    }
    tables.push_str("]\n");
    let out = env::var_os("OUT_DIR").expect("cargo sets OUT_DIR");
    let target = Path::new(&out).join("clickhouse_tables.rs");
    fs::write(&target, tables).unwrap_or_else(|e| panic!("writing {}: {e}", target.display()));
}

/// The table of the one `CREATE TABLE IF NOT EXISTS <name>` statement outside `--` comments.
fn created_table(ddl: &str) -> Option<String> {
    let code: Vec<&str> =
        ddl.lines().map(|line| line.split_once("--").map_or(line, |(code, _)| code)).collect();
    let code = code.join("\n");
    let mut statements = code.match_indices(CREATE);
    let (at, _) = statements.next()?;
    if statements.next().is_some() {
        return None;
    }
    let name: String = code[at + CREATE.len()..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
        .collect();
    (!name.is_empty()).then_some(name)
}
