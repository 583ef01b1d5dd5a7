//! Observability proven on a real Prometheus (issue 11): the daemon under load and `scoresync
//! monitor` beside it, scraped by a Prometheus of the test's own that evaluates
//! deploy/prometheus/alerts.yml. Every dashboard expression and every series an alert rule reads
//! must return data; stopping the daemon while writes go on must fire the daemon-down and slot
//! alerts, and starting it again must resolve them. promtool checks the rules and the config and
//! runs the rules' unit tests (deploy/prometheus/alerts.test.yml) with the shipped thresholds
//! and durations.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, ensure};
use promql_parser::parser::{self, Expr};
use promql_parser::util::visitor::{ExprVisitorMut, walk_expr_mut};
use promql_parser::util::{ExprVisitor, walk_expr};
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
    // Sampled every 2 s (10 s by default), so that the slot alerts see the outage quickly.
    let sampled = ("SCORESYNC__METRICS__SAMPLE_INTERVAL_MS", "2000");
    let daemon = Daemon::start_with(&env, &["run"], &[sampled])?;
    let _monitor = Daemon::start_with(
        &env,
        &["monitor"],
        &[("SCORESYNC__METRICS__LISTEN", monitor_listen.as_str()), sampled],
    )?;
    let names: BTreeSet<String> = rules()?.into_iter().map(|r| r.alert).collect();
    let unknown: Vec<&&str> = OUTAGE_ALERTS.iter().filter(|a| !names.contains(**a)).collect();
    ensure!(unknown.is_empty(), "alerts.yml has no {unknown:?}");
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
    // A verify run leaves its counts for the drift panel and alert, a replay and a backfill
    // their progress.
    for command in
        [&["verify"][..], &["replay", "--from", "earliest"], &["backfill", "--kind", "process"]]
    {
        let run = Daemon::run_to_end(&env, command, DEADLINE).await?;
        ensure!(run.status.success(), "{command:?}: {}", String::from_utf8_lossy(&run.stderr));
    }
    wait::until("the replay's progress to show", DEADLINE, || async {
        let replayed = prometheus.query("scoresync_replay_messages_done > 0").await?;
        let backfilled = prometheus.query("scoresync_backfill_done == 1").await?;
        Ok((!replayed.is_empty() && !backfilled.is_empty()).then_some(()))
    })
    .await?;

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
    // Everything the daemon and the monitor export is documented in METRICS.md.
    let documented = include_str!("../../METRICS.md");
    for listen in [&env.metrics_listen, &monitor_listen] {
        let text = http_get(&format!("http://{listen}/metrics")).await?;
        for line in text.lines().filter(|l| l.starts_with("scoresync_")) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| documented.contains(&format!("| `{b}` | histogram |")))
                .unwrap_or(name);
            ensure!(
                documented.contains(&format!("| `{base}` |")),
                "{listen} exports {name}, which METRICS.md does not document"
            );
        }
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
    let _daemon = Daemon::start_with(&env, &["run"], &[sampled])?;
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
    // Every alert has a unit test case where it is quiet and one where it fires.
    let tests: Value =
        serde_norway::from_str(&std::fs::read_to_string(dir.join("alerts.test.yml"))?)?;
    let cases: BTreeSet<(&str, bool)> = tests["tests"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|t| t["alert_rule_test"].as_array().into_iter().flatten())
        .filter_map(|c| {
            let fires = c["exp_alerts"].as_array().is_some_and(|a| !a.is_empty());
            Some((c["alertname"].as_str()?, fires))
        })
        .collect();
    let untested: Vec<String> = rules()?
        .into_iter()
        .map(|r| r.alert)
        .filter(|a| !cases.contains(&(a.as_str(), false)) || !cases.contains(&(a.as_str(), true)))
        .collect();
    ensure!(
        untested.is_empty(),
        "alerts without a quiet and a firing case in alerts.test.yml: {untested:?}"
    );
    // promtool compares annotations exactly; the unit tests run against a copy without them.
    let copy = tempfile::tempdir()?;
    let stripped = rewrite_rules(|rule| {
        rule.remove("annotations");
        Ok(())
    })?;
    std::fs::write(copy.path().join("alerts.yml"), stripped)?;
    std::fs::copy(dir.join("alerts.test.yml"), copy.path().join("alerts.test.yml"))?;
    promtool(&["test", "rules"], &[&copy.path().join("alerts.test.yml")])
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

/// One alerting rule of deploy/prometheus/alerts.yml.
#[derive(Debug, serde::Deserialize)]
struct Rule {
    alert: String,
    expr: String,
}

fn alerts_yml() -> anyhow::Result<Value> {
    let path = repo_root().join("deploy/prometheus/alerts.yml");
    Ok(serde_norway::from_str(&std::fs::read_to_string(&path)?)?)
}

/// Every alerting rule of alerts.yml.
fn rules() -> anyhow::Result<Vec<Rule>> {
    let doc = alerts_yml()?;
    let mut rules = Vec::new();
    for group in doc["groups"].as_array().into_iter().flatten() {
        for rule in group["rules"].as_array().into_iter().flatten() {
            rules.push(serde_json::from_value(rule.clone())?);
        }
    }
    ensure!(rules.len() >= 15, "alerts.yml holds only {} rules", rules.len());
    Ok(rules)
}

/// alerts.yml as YAML again after `change` ran over every rule.
fn rewrite_rules(
    mut change: impl FnMut(&mut serde_json::Map<String, Value>) -> anyhow::Result<()>,
) -> anyhow::Result<String> {
    let mut doc = alerts_yml()?;
    for group in doc["groups"].as_array_mut().into_iter().flatten() {
        for rule in group["rules"].as_array_mut().into_iter().flatten() {
            change(rule.as_object_mut().context("a rule that is not a mapping")?)?;
        }
    }
    Ok(serde_norway::to_string(&doc)?)
}

/// A copy of alerts.yml for the live run, with every `for:` at 5 s and every range at 20 s, so
/// the outage alerts fire within a minute. Only durations change: expressions, metric names and
/// thresholds are the shipped ones (the unit tests prove the shipped durations).
fn quick_rules(dir: &Path) -> anyhow::Result<PathBuf> {
    let quick = rewrite_rules(|rule| {
        if rule.contains_key("for") {
            rule.insert("for".into(), "5s".into());
        }
        let expr = rule["expr"].as_str().context("a rule without expr")?;
        rule.insert("expr".into(), shorten_ranges(expr)?.into());
        Ok(())
    })?;
    let path = dir.join("alerts.quick.yml");
    std::fs::write(&path, quick)?;
    Ok(path)
}

/// `expr` with every range (`[10m]`, a subquery's `[1h:1m]`) at 20 s.
fn shorten_ranges(expr: &str) -> anyhow::Result<String> {
    struct Shorten;
    impl ExprVisitorMut for Shorten {
        type Error = std::convert::Infallible;
        fn pre_visit(&mut self, expr: &mut Expr) -> Result<bool, Self::Error> {
            match expr {
                Expr::MatrixSelector(m) => m.range = Duration::from_secs(20),
                Expr::Subquery(q) => q.range = Duration::from_secs(20),
                _ => {}
            }
            Ok(true)
        }
    }
    let mut parsed = parser::parse(expr).map_err(|e| anyhow::anyhow!("{expr}: {e}"))?;
    let _ = walk_expr_mut(&mut Shorten, &mut parsed);
    Ok(parsed.to_string())
}

/// The vector selectors (name and matchers) `expr` reads.
fn selectors(expr: &str) -> anyhow::Result<Vec<String>> {
    struct Collect(Vec<String>);
    impl ExprVisitor for Collect {
        type Error = std::convert::Infallible;
        fn pre_visit(&mut self, expr: &Expr) -> Result<bool, Self::Error> {
            match expr {
                Expr::VectorSelector(v) => self.0.push(v.to_string()),
                Expr::MatrixSelector(m) => self.0.push(m.vs.to_string()),
                _ => {}
            }
            Ok(true)
        }
    }
    let parsed = parser::parse(expr).map_err(|e| anyhow::anyhow!("{expr}: {e}"))?;
    let mut found = Collect(Vec::new());
    let _ = walk_expr(&mut found, &parsed);
    Ok(found.0)
}

/// (alert, vector selector) of every metric every rule of alerts.yml reads.
fn alert_selectors() -> anyhow::Result<Vec<(String, String)>> {
    let mut found = Vec::new();
    for rule in rules()? {
        let read = selectors(&rule.expr)?;
        ensure!(!read.is_empty(), "{} reads no metric", rule.alert);
        found.extend(read.into_iter().map(|s| (rule.alert.clone(), s)));
    }
    Ok(found)
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
fn selectors_are_found_with_their_labels_and_ranges_shortened() -> anyhow::Result<()> {
    assert_eq!(
        selectors("max by (slot) (scoresync_slot_wal_status{status=\"reserved\"}) == 0")?,
        vec!["scoresync_slot_wal_status{status=\"reserved\"}"]
    );
    assert_eq!(selectors("up{job=\"scoresync\"} == 0")?, vec!["up{job=\"scoresync\"}"]);
    assert_eq!(selectors("sum by (le) (rate(x_bucket[5m]))")?, vec!["x_bucket"]);
    let short = shorten_ranges("changes(a[10m]) and on () max_over_time(b[1h:1m])")?;
    assert!(short.contains("a[20s]") && short.contains("[20s:1m]"), "{short}");
    assert!(parser::parse(&short).is_ok(), "{short}");
    Ok(())
}
