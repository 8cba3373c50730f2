//! baton-verify's integration tests, in one binary: fixtures in `common`,
//! then token verification, the tool gate, the reporter, mTLS, and an
//! ignored micro-benchmark.

// Test helpers outside #[test] functions panic on broken fixtures, and the
// benchmark prints its figures.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::print_stdout
)]

mod bench;
mod common;
mod gate;
mod report;
mod tls;
mod token;
