//! The Baton broker's domain core.
//!
//! Every decision the broker makes lives here, behind plain Rust calls with
//! the time and the stores passed in: node attestation, entitlement and
//! issuance ([`service`], [`nodes`]), task start, hops, redeem and renewal
//! ([`delegation`], [`admission`], [`tasks`]), tool-call reports, CA
//! rotation state ([`rotation`]), revocation ([`revocation`], [`ledger`]),
//! just-in-time secrets ([`secrets`]), rate limits ([`limits`]) and the
//! durable state behind them ([`store`] for SQLite, [`pg`] for
//! PostgreSQL).
//!
//! [`requests`] holds each route's whole request (the decision plus its
//! durable steps in order: register before hand-out, revoke what a renewal
//! replaces first, re-check the node last); the minting steps it composes
//! are private to this crate, so a front end cannot skip or reorder one.
//!
//! This crate never imports the web layer (warp and `http` are not among its
//! dependencies). The HTTPS shell
//! (`baton-broker`) parses requests, calls these decisions and maps their
//! [`BrokerError`] to a status; several brokers on one datastore, the
//! gateway and future front ends call the same functions.

pub mod admission;
pub mod delegation;
pub mod error;
pub mod ledger;
pub mod limits;
pub mod nodes;
pub mod oidc;
pub mod ops;
pub mod pg;
pub mod pg_audit;
pub mod pg_ca;
pub mod pg_tls;
pub mod records;
pub mod requests;
pub mod revocation;
pub mod rotation;
pub mod secrets;
pub mod service;
pub mod store;
#[cfg(test)]
mod store_suite;
pub mod tasks;
pub mod telemetry;

pub use admission::{AdmissionSource, EXAMPLE_ADMISSION_POLICIES};
pub use error::BrokerError;
pub use service::{Broker, IssuanceHook, IssuancePolicy, LogIssuance};
