//! What `scoresync verify` prints: per table, the rows checked and, per shard and kind, the
//! count and a few sample keys; JSON with every finding for `--json`; and the exit status.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use scoresync_event::SourceTable;
use scoresync_sink::verify::{DriftKind, Finding};

/// The state-topic key of the latest verify result of the pipeline on `slot`.
pub fn record_key(slot: &str) -> String {
    format!("verify\0{slot}")
}

/// What a verify run leaves on the state topic (under [`record_key`]), so that the daemon can
/// export it as metrics (`crate::sampler`) long after the run: the latest run wins, whatever its
/// filter.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Recorded {
    /// When the run ended (Unix seconds).
    pub finished_unix: u64,
    /// The filter it ran with (`Filter::describe`).
    pub filter: String,
    /// Its exit status: 0 in sync, 1 drift, 2 could not verify.
    pub exit: u8,
    /// Confirmed drift left after the run (and its repair), per table, shard and kind.
    pub drift: Vec<DriftCount>,
}

impl Recorded {
    /// A run that failed before it could judge every row: no drift counted, exit 2.
    pub fn unverified(filter: String, finished_unix: u64) -> Recorded {
        Recorded { finished_unix, filter, exit: 2, drift: Vec::new() }
    }
}

/// Rows of one kind of drift in one table on one shard.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct DriftCount {
    /// The table's name.
    pub table: String,
    /// The shard.
    pub shard: usize,
    /// `missing`, `extra`, `stale` or `misplaced`.
    pub kind: String,
    /// How many rows.
    pub rows: u64,
}

/// What `--repair` did.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct Repaired {
    /// Delete markers asked for (extra and misplaced copies still live as judged).
    pub markers: usize,
    /// Scorecards re-published from PostgreSQL.
    pub cards: usize,
}

/// One verify run's result.
pub struct Report {
    /// Rows PostgreSQL holds within the filter, per table.
    checked: BTreeMap<SourceTable, u64>,
    /// Confirmed drift.
    drift: Vec<Finding>,
    /// Rows the sink cannot place (parked): reported, not drift.
    unroutable: Vec<Finding>,
    /// Rows still changing after every re-check.
    unstable: Vec<Finding>,
    /// Why some rows could not be judged again, and which.
    unconfirmed: Option<(String, Vec<Finding>)>,
}

impl Report {
    /// A report.
    pub(super) fn new(
        checked: BTreeMap<SourceTable, u64>,
        drift: Vec<Finding>,
        unstable: Vec<Finding>,
        unconfirmed: Option<(String, Vec<Finding>)>,
    ) -> Report {
        let (drift, unroutable) = drift.into_iter().partition(|f| f.kind.is_drift());
        Report { checked, drift, unroutable, unstable, unconfirmed }
    }

    /// 0: no drift; 1: drift; 2: could not verify.
    pub fn exit_status(&self) -> u8 {
        if self.unconfirmed.is_some() {
            2
        } else if !self.drift.is_empty() {
            1
        } else {
            0
        }
    }

    /// Count per (table, shard, kind), with sample keys.
    fn groups(
        findings: &[Finding],
    ) -> BTreeMap<(SourceTable, Option<usize>, DriftKind), Vec<&Finding>> {
        let mut groups: BTreeMap<_, Vec<&Finding>> = BTreeMap::new();
        for f in findings {
            groups.entry((f.table, f.shard, f.kind)).or_default().push(f);
        }
        groups
    }

    /// The run as the state topic keeps it.
    pub fn recorded(&self, filter: String, finished_unix: u64) -> Recorded {
        let drift = Self::groups(&self.drift)
            .into_iter()
            .filter_map(|((table, shard, kind), found)| {
                Some(DriftCount {
                    table: table.name().to_owned(),
                    shard: shard?,
                    kind: kind.name().to_owned(),
                    rows: found.len() as u64,
                })
            })
            .collect();
        Recorded { finished_unix, filter, exit: self.exit_status(), drift }
    }

    /// The human report.
    pub fn text(&self, samples: usize, repaired: Option<Repaired>, took: Duration) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{:<28} {:>10}", "table", "rows (pg)");
        for (table, rows) in &self.checked {
            let _ = writeln!(out, "{:<28} {rows:>10}", table.name());
        }
        let section = |out: &mut String, title: &str, findings: &[Finding]| {
            if findings.is_empty() {
                return;
            }
            let _ = writeln!(out, "\n{title}:");
            let _ = writeln!(
                out,
                "{:<28} {:>5} {:<10} {:>8}  sample keys",
                "table", "shard", "kind", "rows"
            );
            for ((table, shard, kind), found) in Self::groups(findings) {
                let shard = shard.map_or("-".to_owned(), |s| s.to_string());
                let keys: Vec<String> = found
                    .iter()
                    .take(samples)
                    .map(|f| format!("({}) {}", f.key.join(", "), f.detail))
                    .collect();
                let _ = writeln!(
                    out,
                    "{:<28} {shard:>5} {:<10} {:>8}  {}",
                    table.name(),
                    kind.name(),
                    found.len(),
                    keys.join("; ")
                );
            }
        };
        section(&mut out, "drift", &self.drift);
        section(
            &mut out,
            "unroutable (the sink parks them: `scoresync status` says why)",
            &self.unroutable,
        );
        section(
            &mut out,
            "unstable (still changing after every re-check; run verify again later)",
            &self.unstable,
        );
        if let Some((why, findings)) = &self.unconfirmed {
            section(&mut out, "differences not confirmed", findings);
            let _ = writeln!(out, "\ncould not verify: {why}");
        }
        if let Some(r) = repaired {
            let _ = writeln!(
                out,
                "\nrepair: {} scorecards re-published, delete markers asked over {} copies (each written only while the copy is live as judged); the drift above is what is left",
                r.cards, r.markers
            );
        }
        let verdict = match self.exit_status() {
            0 => "no drift",
            1 => "DRIFT",
            _ => "could not verify",
        };
        let drift = self.drift.len();
        let _ = writeln!(
            out,
            "\nverify: {verdict} ({drift} drifted rows) in {:.1} s",
            took.as_secs_f64()
        );
        out
    }

    /// The JSON report.
    pub fn json(&self, repaired: Option<Repaired>) -> serde_json::Value {
        let counts = |findings: &[Finding]| -> Vec<serde_json::Value> {
            Self::groups(findings)
                .into_iter()
                .map(|((table, shard, kind), found)| {
                    serde_json::json!({
                        "table": table.name(), "shard": shard, "kind": kind, "rows": found.len()
                    })
                })
                .collect()
        };
        let checked: BTreeMap<&str, u64> =
            self.checked.iter().map(|(t, n)| (t.name(), *n)).collect();
        serde_json::json!({
            "status": match self.exit_status() { 0 => "in_sync", 1 => "drift", _ => "unverified" },
            "checked": checked,
            "counts": counts(&self.drift),
            "drift": self.drift,
            "unroutable": self.unroutable,
            "unstable": self.unstable,
            "unverified": self.unconfirmed.as_ref().map(|(why, found)| serde_json::json!({
                "why": why, "rows": found
            })),
            "repaired": repaired,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finding(kind: DriftKind, shard: Option<usize>) -> Finding {
        Finding {
            table: SourceTable::Scores,
            key: vec!["c".into(), "p".into(), "s-1".into()],
            kind,
            shard,
            version: None,
            card: None,
            detail: "no live copy".into(),
            pg_state: 1,
        }
    }

    #[test]
    fn the_status_says_drift_only_for_drift() {
        let checked = BTreeMap::from([(SourceTable::Scores, 3)]);
        let clean = Report::new(checked.clone(), Vec::new(), Vec::new(), None);
        assert_eq!(clean.exit_status(), 0);
        let parked = Report::new(
            checked.clone(),
            vec![finding(DriftKind::Unroutable, None)],
            Vec::new(),
            None,
        );
        assert_eq!(parked.exit_status(), 0, "an unroutable row is reported, not drift");
        let missing = Report::new(
            checked.clone(),
            vec![finding(DriftKind::Missing, Some(1))],
            Vec::new(),
            None,
        );
        assert_eq!(missing.exit_status(), 1);
        let text = missing.text(5, None, Duration::from_secs(1));
        assert!(text.contains("scores"), "{text}");
        assert!(text.contains("missing"), "{text}");
        assert!(text.contains("(c, p, s-1) no live copy"), "{text}");
        let lagging =
            Report::new(checked, Vec::new(), Vec::new(), Some(("slot behind".into(), Vec::new())));
        assert_eq!(lagging.exit_status(), 2);
        assert_eq!(lagging.json(None)["status"], "unverified");
    }
}
