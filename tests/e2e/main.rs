//! Cross-process end-to-end tests: real `baton broker` and `baton agent`
//! processes, real sockets, and the third-party `spiffe` crate as the
//! workload. One test binary, so the suite shares one build.

// Test-only crate: failing loudly is the point.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admission;
mod approval;
mod audit;
mod broker;
mod brokers;
mod ca_wait;
mod chaos;
mod chaos_brokers;
mod config;
mod delegation;
mod deploy;
mod durable_revocation;
mod examples;
mod fanout;
mod gateway;
mod grpc_core;
mod hardening;
mod harness;
mod identity;
mod jwt_rotation;
mod limits;
mod logs;
mod mcp;
mod nodes;
mod operator;
mod ops;
mod pg_datastore;
mod records;
mod refusals;
mod restart;
mod revocation;
mod rotation;
mod secret_files;
mod secrets;
mod shutdown;
mod task_show;
mod tls_resumption;
mod traces;
