//! One module per CLI command.

pub mod setup;
pub mod source;
pub mod validate;
