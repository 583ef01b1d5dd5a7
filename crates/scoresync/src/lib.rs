//! The library half of the `scoresync` package: the configuration file ([`config`]), and nothing
//! else.
//!
//! It is a library so that whatever writes a scoresync configuration (the end-to-end harness in
//! `tests/`) writes it by serializing [`config::Config`] itself: a renamed or removed field then
//! breaks the build of the harness, not a test run. The struct stays in this package, next to the
//! binary that reads it, rather than in a crate of its own: only its sections live elsewhere (in
//! the source, bus and sink crates that use them), and this file is where a reader of `main.rs`
//! looks for it. The CLI, the commands and `/metrics` stay in the binary (`main.rs`).

pub mod config;
