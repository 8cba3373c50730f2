//! Generated gRPC code.
//!
//! [`workload`] is the SPIFFE Workload API. Its proto has no package, so the
//! generated module is `_` and the service path is `/SpiffeWorkloadAPI/...`.
//!
//! [`delegation`] is Baton's own service on the same socket (package
//! `baton.delegation.v1`): redeeming handoff grants for task credentials.

#![allow(missing_debug_implementations)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// The SPIFFE Workload API (no proto package).
pub mod workload {
    tonic::include_proto!("_");
}

/// Baton's delegation service (`/baton.delegation.v1.Delegation/...`).
pub mod delegation {
    tonic::include_proto!("baton.delegation.v1");
}
