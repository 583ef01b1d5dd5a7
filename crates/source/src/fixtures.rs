//! pgoutput messages captured from PostgreSQL 15 by `examples/capture_pgoutput.rs`, for unit
//! tests. One line per message: a label naming the workload statement, then the bytes in hex.

use bytes::Bytes;

/// The captured messages.
pub const FIXTURES: &str = include_str!("../tests/fixtures/pgoutput_v1.txt");

/// The messages captured for the statement `label`, in stream order.
pub fn fixtures(label: &str) -> Vec<Bytes> {
    FIXTURES
        .lines()
        .filter_map(|line| line.split_once(' '))
        .filter(|(l, _)| *l == label)
        .map(|(_, hex)| Bytes::from(unhex(hex)))
        .collect()
}

/// Hex text to bytes.
pub fn unhex(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("fixture is hex"))
        .collect()
}
