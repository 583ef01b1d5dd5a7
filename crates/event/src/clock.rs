//! The wall clock, in the units the contract's times use (`commit_time_us`: Unix microseconds).
//! One place, so that lag figures computed in the source, the sink and the binary read the clock
//! the same way; before 1970 (a clock set wrong) reads as 0.

use std::time::{SystemTime, UNIX_EPOCH};

/// Now, in Unix microseconds.
pub fn unix_micros() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_micros() as i64)
}

/// Now, in Unix milliseconds.
pub fn unix_millis() -> i64 {
    unix_micros() / 1_000
}

/// Now, in whole Unix seconds.
pub fn unix_seconds() -> u64 {
    (unix_micros() / 1_000_000).max(0) as u64
}
