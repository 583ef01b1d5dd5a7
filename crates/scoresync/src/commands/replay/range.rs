//! What a replay reads: per partition, the first offset and the end (exclusive), and what history
//! the change topic no longer holds. Pure, given the offsets the broker reported, except
//! [`Ranges::read`] which asks it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::SystemTime;

use anyhow::Context;

use scoresync_bus::offsets::OffsetReader;

/// Where a replay starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Start {
    /// Each partition's oldest retained message.
    Earliest,
    /// The first message committed at or after this time (Unix ms).
    Timestamp(i64),
    /// These offsets; partitions not listed are not replayed.
    Offsets(BTreeMap<i32, i64>),
}

/// One partition's replay range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Range {
    /// The partition.
    pub partition: i32,
    /// The offset the replay should start at; below `low` when history it needs is gone.
    pub asked: i64,
    /// First offset to read: `asked`, or the first retained one.
    pub start: i64,
    /// First offset not to read.
    pub end: i64,
    /// First retained offset when the replay started.
    pub low: i64,
}

impl Range {
    /// Messages it reads (at most: compaction may have removed some).
    pub fn messages(&self) -> i64 {
        (self.end - self.start).max(0)
    }
}

/// Every partition's range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ranges(pub Vec<Range>);

impl Ranges {
    /// Asks the broker for watermarks and, for timestamps, offsets.
    pub fn read(reader: &OffsetReader, start: &Start, to_ms: Option<i64>) -> anyhow::Result<Self> {
        let marks = reader.watermarks()?;
        let starts = match start {
            // From the very first message, whether or not it is still there.
            Start::Earliest => marks.keys().map(|p| (*p, 0)).collect(),
            Start::Timestamp(ms) => {
                let mut starts = reader.offsets_at(*ms)?;
                // The first retained message is younger than the time asked for: what came
                // before it is wanted and gone.
                for (p, (low, high)) in &marks {
                    let first = if *low > 0 { reader.timestamp_at(*p, *low, *high)? } else { None };
                    if first.is_some_and(|t| t > *ms) {
                        starts.insert(*p, 0);
                    }
                }
                starts
            }
            Start::Offsets(offsets) => offsets.clone(),
        };
        let ends = match to_ms {
            Some(ms) => reader.offsets_at(ms)?,
            None => marks.iter().map(|(p, (_, high))| (*p, *high)).collect(),
        };
        Ok(Self::plan(&marks, &starts, &ends))
    }

    /// The ranges for `marks` (low, high per partition), `starts` and `ends`: a partition with
    /// no start has an empty range; no range reaches past the high watermark or below its start.
    pub fn plan(
        marks: &BTreeMap<i32, (i64, i64)>,
        starts: &BTreeMap<i32, i64>,
        ends: &BTreeMap<i32, i64>,
    ) -> Self {
        Ranges(
            marks
                .iter()
                .map(|(&partition, &(low, high))| {
                    let asked = starts.get(&partition).copied().unwrap_or(high).clamp(0, high);
                    let start = asked.max(low);
                    let end = ends.get(&partition).copied().unwrap_or(high).clamp(start, high);
                    Range { partition, asked, start, end, low }
                })
                .collect(),
        )
    }

    /// Messages in every range.
    pub fn messages(&self) -> i64 {
        self.0.iter().map(Range::messages).sum()
    }

    /// Partitions whose range should start before the first message the topic still holds.
    /// Under a compacting policy nothing needed is missing (a row's newest change stays), so
    /// `compacted` topics report none.
    pub fn missing(&self, compacted: bool) -> Vec<&Range> {
        if compacted {
            return Vec::new();
        }
        self.0.iter().filter(|r| r.asked < r.low).collect()
    }

    /// The start offsets, to commit for the replay's group.
    pub fn starts(&self) -> BTreeMap<i32, i64> {
        self.0.iter().map(|r| (r.partition, r.start)).collect()
    }
}

/// Parses an `--from-offsets` file: one `partition=offset` per line; blank lines and lines
/// starting with `#` are skipped.
pub fn parse_offsets(text: &str) -> anyhow::Result<BTreeMap<i32, i64>> {
    let mut offsets = BTreeMap::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parse = || -> Option<(i32, i64)> {
            let (p, o) = line.split_once('=')?;
            Some((p.trim().parse().ok()?, o.trim().parse().ok()?))
        };
        let (partition, offset) = parse()
            .filter(|(p, o)| *p >= 0 && *o >= 0)
            .with_context(|| format!("line {}: expected partition=offset, got {line:?}", n + 1))?;
        anyhow::ensure!(
            offsets.insert(partition, offset).is_none(),
            "line {}: partition {partition} listed twice",
            n + 1
        );
    }
    Ok(offsets)
}

/// An RFC 3339 time as Unix milliseconds.
pub fn unix_ms(time: SystemTime) -> i64 {
    time.duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64)
}

/// A Unix-ms timestamp as RFC 3339 (seconds).
pub fn rfc3339(ms: i64) -> String {
    let time = SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_seconds(time).to_string()
}

/// Per partition, the times (Unix ms) of the first and last message in range, where known.
pub type Times = BTreeMap<i32, (Option<i64>, Option<i64>)>;

/// The dry-run table: per partition the offsets, messages and the times of the first and last
/// message in range (`-` when unknown).
pub fn dry_run_table(ranges: &Ranges, times: &Times) -> String {
    let mut out = format!(
        "{:>9}  {:>12}  {:>12}  {:>10}  {:<20}  {:<20}\n",
        "partition", "from offset", "to offset", "messages", "first message", "last message"
    );
    let time = |t: Option<i64>| t.map_or_else(|| "-".to_owned(), rfc3339);
    for r in &ranges.0 {
        let (first, last) = times.get(&r.partition).copied().unwrap_or((None, None));
        let _ = writeln!(
            out,
            "{:>9}  {:>12}  {:>12}  {:>10}  {:<20}  {:<20}",
            r.partition,
            r.start,
            r.end,
            r.messages(),
            time(first),
            time(last)
        );
    }
    let _ = writeln!(out, "total: {} messages in {} partitions", ranges.messages(), ranges.0.len());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_stay_inside_the_partition_and_start_where_asked() {
        let marks = BTreeMap::from([(0, (0, 100)), (1, (40, 50)), (2, (0, 0))]);
        let starts = BTreeMap::from([(0, 10), (1, 0)]);
        let ends = BTreeMap::from([(0, 200), (1, 45)]);
        let ranges = Ranges::plan(&marks, &starts, &ends);
        let got: Vec<(i32, i64, i64)> =
            ranges.0.iter().map(|r| (r.partition, r.start, r.end)).collect();
        assert_eq!(got, [(0, 10, 100), (1, 40, 45), (2, 0, 0)], "from the first retained offset");
        assert_eq!(ranges.messages(), 90 + 5);
        let missing: Vec<i32> = ranges.missing(false).iter().map(|r| r.partition).collect();
        assert_eq!(missing, [1], "partition 1 starts below its first retained offset");
        assert!(ranges.missing(true).is_empty(), "a compacted topic keeps every row");
        assert_eq!(ranges.starts(), BTreeMap::from([(0, 10), (1, 40), (2, 0)]));
    }

    #[test]
    fn a_partition_left_out_of_the_offsets_file_is_not_replayed() {
        let marks = BTreeMap::from([(0, (0, 100)), (1, (0, 50))]);
        let ranges = Ranges::plan(&marks, &BTreeMap::from([(0, 90)]), &BTreeMap::new());
        let got: Vec<i64> = ranges.0.iter().map(Range::messages).collect();
        assert_eq!(got, [10, 0]);
    }

    #[test]
    fn offsets_files_are_partition_equals_offset_lines() {
        let offsets = parse_offsets("# saved by hand\n0=10\n\n 2 = 7 \n").expect("parses");
        assert_eq!(offsets, BTreeMap::from([(0, 10), (2, 7)]));
        let err = parse_offsets("0=10\n1:5\n").expect_err("bad line");
        assert!(err.to_string().contains("line 2"), "{err}");
        assert!(parse_offsets("0=1\n0=2").is_err(), "twice");
        assert!(parse_offsets("-1=2").is_err(), "negative");
    }

    #[test]
    fn times_print_as_rfc3339() {
        assert_eq!(rfc3339(1_700_000_000_123), "2023-11-14T22:13:20Z");
    }
}
