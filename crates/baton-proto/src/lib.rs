//! Generated gRPC code.
//!
//! [`workload`] is the SPIFFE Workload API. Its proto has no package, so the
//! generated module is `_` and the service path is `/SpiffeWorkloadAPI/...`.

#![allow(missing_debug_implementations)]
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

/// The SPIFFE Workload API (no proto package).
pub mod workload {
    tonic::include_proto!("_");
}
