//! The node daemon (`baton agent`).
pub mod attest;
pub mod cache;
pub mod workload;
