//! Observability proven on a real Prometheus (issue 11): the daemon under load and `scoresync
//! monitor` beside it, scraped by a Prometheus of the test's own that evaluates
//! deploy/prometheus/alerts.yml. Every dashboard expression and every series an alert rule reads
//! must return data; stopping the daemon while writes go on must fire the daemon-down and slot
//! alerts, and starting it again must resolve them. promtool checks the rules and the config and
//! runs the rules' unit tests (deploy/prometheus/alerts.test.yml) with the shipped thresholds
//! and durations.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use serde_json::Value;

use scoresync_tests::prometheus::PrivatePrometheus;
use scoresync_tests::stack::{free_port, repo_root};
use scoresync_tests::{Daemon, TestEnv, oracle, wait};

use crate::sink::{http_get, loadgen, status};
use crate::source::setup;

const DEADLINE: Duration = Duration::from_secs(120);

/// Alerts the daemon's stop must fire (and its restart resolve).
const OUTAGE_ALERTS: [&str; 3] =
    ["ScoresyncDaemonDown", "ScoresyncSlotNotConfirming", "ScoresyncSlotInactive"];

#[tokio::test]
async fn dashboards_and_alerts_hold_on_a_real_prometheus() -> anyhow::Result<()> {
    let env = TestEnv::new("observe").await?;
    setup(&env).await?;
    let pg = env.pg_admin().await?;
    let monitor_listen = format!("127.0.0.1:{}", free_port()?);
    let daemon = Daemon::start(&env, &["run"])?;
    let _monitor = Daemon::start_with(
        &env,
        &["monitor"],
        &[("SCORESYNC__METRICS__LISTEN", monitor_listen.as_str())],
    )?;
    let rules = quick_rules(&env.dir())?;
    let prometheus = PrivatePrometheus::start(
        &env.dir().join("prometheus"),
        &env.metrics_listen,
        &monitor_listen,
        &rules,
    )
    .await?;

    loadgen(&env, &["--scorecards", "150", "--prefix", "observe"]).await?;
    oracle::wait_until_consistent(&env, &pg, DEADLINE).await?;

    // Every dashboard panel's expression returns a series.
    for (dashboard, expr) in dashboard_exprs()? {
        wait::until(&format!("{dashboard}: {expr} to return a series"), DEADLINE, || async {
            Ok((!prometheus.query(&expr).await?.is_empty()).then_some(()))
        })
        .await?;
    }
    // Every series every alert rule reads exists (an alert's whole expression is empty while it
    // does not fire).
    for (alert, selector) in alert_selectors()? {
        wait::until(&format!("{alert}: {selector} to return a series"), DEADLINE, || async {
            Ok((!prometheus.query(&selector).await?.is_empty()).then_some(()))
        })
        .await?;
    }
    let health = reqwest::get(format!("http://{}/healthz", env.metrics_listen)).await?;
    ensure!(health.status().is_success(), "/healthz: {}", health.text().await?);
    let quiet = prometheus.firing().await?;
    ensure!(
        OUTAGE_ALERTS.iter().all(|a| !quiet.iter().any(|f| f == a)),
        "alerts firing while the daemon runs: {quiet:?}"
    );

    // End-to-end lag: a histogram per table on /metrics, p50/p99 per table in `status`.
    let metrics = http_get(&format!("http://{}/metrics", env.metrics_listen)).await?;
    let doc = status(&env).await?;
    for table in ["scorecards", "scores", "historic_scorecard_scores"] {
        let bucket =
            format!("scoresync_sink_commit_to_ack_seconds_bucket{{table=\"{table}\",le=\"+Inf\"}}");
        ensure!(metrics.contains(&bucket), "no {bucket} on /metrics");
        let lag = &doc["sink"]["commit_to_ack_seconds"][table];
        let (p50, p99) = (lag["p50"].as_f64(), lag["p99"].as_f64());
        ensure!(
            matches!((p50, p99), (Some(a), Some(b)) if a > 0.0 && b >= a),
            "status shows no p50/p99 for {table}: {lag}"
        );
    }
    let text = Daemon::run_to_end(&env, &["status"], DEADLINE).await?;
    let text = String::from_utf8_lossy(&text.stdout);
    ensure!(text.contains("pipeline:    in sync"), "status: {text}");
    ensure!(text.contains("p99"), "status shows no lag quantiles: {text}");

    // The daemon stops; writes go on: the daemon-down and slot alerts fire.
    daemon.terminate(DEADLINE).await?;
    let mut written = 0;
    wait::until("the outage alerts to fire", DEADLINE, || {
        written += 1;
        let (pg, prometheus) = (&pg, &prometheus);
        async move {
            write_one(pg, written).await?;
            let firing = prometheus.firing().await?;
            Ok(OUTAGE_ALERTS.iter().all(|a| firing.iter().any(|f| f == a)).then_some(()))
        }
    })
    .await?;

    // Started again, it catches up and the alerts resolve.
    let _daemon = Daemon::start(&env, &["run"])?;
    wait::until("the outage alerts to resolve", DEADLINE, || async {
        let firing = prometheus.firing().await?;
        Ok(OUTAGE_ALERTS.iter().all(|a| !firing.iter().any(|f| f == a)).then_some(()))
    })
    .await?;
    oracle::wait_until_consistent(&env, &pg, DEADLINE).await?;
    Ok(())
}

#[test]
fn promtool_accepts_the_rules_and_the_config_and_the_rules_pass_their_unit_tests()
-> anyhow::Result<()> {
    let dir = repo_root().join("deploy/prometheus");
    promtool(&["check", "rules"], &[&dir.join("alerts.yml")])?;
    promtool(&["check", "config"], &[&dir.join("prometheus.docker.yml")])?;
    // promtool compares annotations exactly; the unit tests run against a copy without them.
    let copy = tempdir("promtool-unit")?;
    let rules = std::fs::read_to_string(dir.join("alerts.yml"))?;
    std::fs::write(copy.join("alerts.yml"), without_annotations(&rules))?;
    std::fs::copy(dir.join("alerts.test.yml"), copy.join("alerts.test.yml"))?;
    promtool(&["test", "rules"], &[&copy.join("alerts.test.yml")])
}

fn promtool(args: &[&str], files: &[&Path]) -> anyhow::Result<()> {
    let output = Command::new("promtool")
        .args(args)
        .args(files)
        .output()
        .context("running promtool (deploy/local/stack up installs it)")?;
    ensure!(
        output.status.success(),
        "promtool {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

fn tempdir(label: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("scoresync-{label}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// alerts.yml without its `annotations:` blocks (each ends where the next rule begins).
fn without_annotations(rules: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in rules.lines() {
        if line.trim_start().starts_with("annotations:") {
            skipping = true;
            continue;
        }
        if skipping && line.trim_start().starts_with("- alert:") {
            skipping = false;
        }
        if !skipping {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A copy of alerts.yml for the live run, with every `for:` at 5 s and every range at 20 s, so
/// the outage alerts fire within a minute. Only durations change: expressions, metric names and
/// thresholds are the shipped ones (the unit tests prove the shipped durations).
fn quick_rules(dir: &Path) -> anyhow::Result<PathBuf> {
    let rules = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml"))?;
    let mut quick = String::new();
    for line in rules.lines() {
        let line = match line.split_once("for: ") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}for: 5s"),
            _ => shorten_ranges(line),
        };
        quick.push_str(&line);
        quick.push('\n');
    }
    let path = dir.join("alerts.quick.yml");
    std::fs::write(&path, quick)?;
    Ok(path)
}

/// `[10m]` and the like become `[20s]`.
fn shorten_ranges(line: &str) -> String {
    let mut out = String::new();
    let mut rest = line;
    while let Some(open) = rest.find('[') {
        let Some(close) = rest[open..].find(']') else { break };
        let inside = &rest[open + 1..open + close];
        out.push_str(&rest[..open]);
        if inside.ends_with('m') && inside[..inside.len() - 1].chars().all(|c| c.is_ascii_digit()) {
            out.push_str("[20s]");
        } else {
            out.push_str(&rest[open..=open + close]);
        }
        rest = &rest[open + close + 1..];
    }
    out.push_str(rest);
    out
}

/// (dashboard title, expression) of every panel target in deploy/grafana/dashboards.
fn dashboard_exprs() -> anyhow::Result<Vec<(String, String)>> {
    let mut exprs = Vec::new();
    let dir = repo_root().join("deploy/grafana/dashboards");
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        let doc: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("parsing {}", path.display()))?;
        let title = doc["title"].as_str().unwrap_or_default().to_owned();
        for panel in doc["panels"].as_array().into_iter().flatten() {
            ensure!(
                panel["description"].as_str().is_some_and(|d| !d.is_empty()),
                "{title}: panel {} has no description",
                panel["title"]
            );
            for target in panel["targets"].as_array().into_iter().flatten() {
                let expr = target["expr"].as_str().context("a target without expr")?;
                exprs.push((title.clone(), expr.to_owned()));
            }
        }
    }
    ensure!(exprs.len() >= 20, "found only {} dashboard expressions", exprs.len());
    Ok(exprs)
}

/// (alert, vector selector) of every metric every rule of alerts.yml reads.
fn alert_selectors() -> anyhow::Result<Vec<(String, String)>> {
    let rules = std::fs::read_to_string(repo_root().join("deploy/prometheus/alerts.yml"))?;
    let mut found = Vec::new();
    let mut alert = String::new();
    let mut in_expr = false;
    for line in rules.lines() {
        let trimmed = line.trim_start();
        if let Some(name) = trimmed.strip_prefix("- alert: ") {
            alert = name.to_owned();
            continue;
        }
        if trimmed.starts_with("expr:") {
            in_expr = true;
        } else if trimmed.ends_with(':') || trimmed.contains(": ") && !trimmed.contains('(') {
            in_expr = false;
        }
        if in_expr {
            found.extend(selectors(trimmed).into_iter().map(|s| (alert.clone(), s)));
        }
    }
    ensure!(found.len() >= 14, "found only {} selectors in alerts.yml", found.len());
    Ok(found)
}

/// The vector selectors in a line of PromQL: `scoresync_*` and `up` names with their braces.
fn selectors(line: &str) -> Vec<String> {
    let bytes = line.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if word(bytes[i]) && (i == 0 || !word(bytes[i - 1])) {
            let start = i;
            while i < bytes.len() && word(bytes[i]) {
                i += 1;
            }
            let name = &line[start..i];
            if name.starts_with("scoresync_") || (name == "up" && line[i..].starts_with('{')) {
                let mut selector = name.to_owned();
                if line[i..].starts_with('{')
                    && let Some(close) = line[i..].find('}')
                {
                    selector.push_str(&line[i..=i + close]);
                    i += close + 1;
                }
                out.push(selector);
            }
        } else {
            i += 1;
        }
    }
    out
}

/// One more scorecard, so that WAL keeps advancing while the daemon is down.
async fn write_one(pg: &tokio_postgres::Client, n: u32) -> anyhow::Result<()> {
    pg.execute(
        "INSERT INTO director.scorecards (customer_id, profile_id, scorecard_id, template_id) \
         VALUES ('observe', 'outage', $1, 'tmpl')",
        &[&format!("outage-{n}")],
    )
    .await?;
    Ok(())
}

#[test]
fn selectors_are_found_with_their_labels_and_ranges_shortened() {
    assert_eq!(
        selectors("max by (slot) (scoresync_slot_wal_status{status=\"reserved\"}) == 0"),
        vec!["scoresync_slot_wal_status{status=\"reserved\"}"]
    );
    assert_eq!(selectors("up{job=\"scoresync\"} == 0"), vec!["up{job=\"scoresync\"}"]);
    assert!(selectors("sum by (le, table) (rate(x[5m]))").is_empty());
    assert_eq!(
        shorten_ranges("changes(a[10m]) and rate(b_bucket{le=\"1\"}[5m])[1h:1m]"),
        "changes(a[20s]) and rate(b_bucket{le=\"1\"}[20s])[1h:1m]"
    );
    let stripped = without_annotations(
        "      - alert: A\n        expr: x\n        annotations:\n          summary: s\n      - alert: B\n",
    );
    assert_eq!(stripped, "      - alert: A\n        expr: x\n      - alert: B\n");
}
