//! Progress of a long command on stderr: a bar on a terminal, a line every 10 s otherwise
//! (`what: done/total unit (percent), rate, ETA, note`). indicatif draws the bar; the lines are
//! ours, for logs that are not terminals.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How often a line is printed when stderr is not a terminal.
const PRINT_EVERY: Duration = Duration::from_secs(10);

/// One command's progress.
pub struct Progress {
    what: &'static str,
    unit: &'static str,
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    started: Instant,
    printed_at: Instant,
}

impl Progress {
    /// Progress of `what` (the command) over `total` `unit`s (0: a total not known in
    /// advance: counts and rates, no bar and no ETA).
    pub fn new(what: &'static str, unit: &'static str, total: u64) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = indicatif::ProgressBar::new(total);
            let template = if total == 0 {
                format!("{what} {{spinner}} {{pos}} {unit}, {{per_sec}}{{msg}}")
            } else {
                format!("{what} {{bar:40}} {{pos}}/{{len}} {unit}, {{per_sec}}, ETA {{eta}}{{msg}}")
            };
            if let Ok(style) = indicatif::ProgressStyle::with_template(&template) {
                bar.set_style(style);
            }
            bar
        });
        let now = Instant::now();
        Progress { what, unit, bar, total, started: now, printed_at: now }
    }

    /// Time since it started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// `done` units so far; `note` (empty, or starting with `; `) says more.
    pub fn set(&mut self, done: u64, note: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            bar.set_message(note.to_owned());
            return;
        }
        if self.printed_at.elapsed() < PRINT_EVERY {
            return;
        }
        self.printed_at = Instant::now();
        let rate = done as f64 / self.started.elapsed().as_secs_f64().max(0.001);
        let eta = self.total.saturating_sub(done) as f64 / rate.max(0.001);
        let percent = done as f64 * 100.0 / self.total.max(1) as f64;
        let (what, unit, total) = (self.what, self.unit, self.total);
        if total == 0 {
            eprintln!("{what}: {done} {unit}, {rate:.0} {unit}/s{note}");
            return;
        }
        eprintln!(
            "{what}: {done}/{total} {unit} ({percent:.0}%), {rate:.0} {unit}/s, ETA {eta:.0} s{note}"
        );
    }

    /// Leaves the bar drawn at its last position.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
