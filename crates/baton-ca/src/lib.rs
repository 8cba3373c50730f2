//! Baton's certificate authority, and the workload-side helpers that talk
//! to it.
//!
//! Place in the flow: the broker builds one [`Ca`] at start-up
//! ([`Ca::load_or_create`]), holds it in an `Arc`, and, once a workload has
//! been attested, calls [`Ca::sign_x509_svid`] with the CSR the node daemon
//! sent, or [`Ca::sign_jwt_svid`]. [`Ca::bundle`] is what the Workload API
//! and the federation endpoint publish. On the node, the daemon generates
//! workload keys and CSRs with [`WorkloadKey`], reads what it received with
//! [`leaf_info`], and answers `ValidateJWTSVID` with
//! [`jwt::validate_jwt_svid`].
//!
//! Call [`init`] once at process start-up, before any JWT work.

mod authority;
mod bundle;
mod ca;
pub mod delegation;
mod ecdsa;
mod error;
mod journal;
pub mod jwt;
mod keystore;
pub use keystore::write_public as write_public_file;
pub mod possession;
mod shared;
mod time_util;
mod usage;
mod workload;
mod x509;

pub use authority::UpstreamAuthority;
pub use bundle::{JwtAuthority, TrustBundle};
pub use ca::{
    BACKDATE, BROKER_ID_PATH, Ca, CaConfig, DEFAULT_CA_TTL, DEFAULT_MAX_SVID_TTL, IssuedSvid,
    PrivateKeyBytes, RotationAction, RotationEvent, RotationSchedule,
};
pub use delegation::{DELEGATION_TOKEN_TYP, cert_thumbprint, token_hash};
pub use ecdsa::is_low_s;
pub use error::CaError;
pub use journal::{AuthorityKind, AuthorityState, AuthorityStatus};
pub use shared::{SharedCaStore, SharedState, SharedStep, SharedWrite};
pub use usage::KeyUsage;
pub use workload::WorkloadKey;
pub use x509::{LeafInfo, leaf_info};

/// Installs jsonwebtoken's aws-lc-rs crypto provider for the process.
///
/// jsonwebtoken 11 picks its provider from its cargo features; if feature
/// unification ever enables both of its backends, its first use panics
/// unless a provider was installed. Call this at start-up. It is idempotent
/// and never panics: if a provider is already installed (by an earlier
/// call, or by other code), that one stays.
pub fn init() {
    let _already_installed = jsonwebtoken::crypto::aws_lc::DEFAULT_PROVIDER.install_default();
}

#[cfg(test)]
mod rotation_tests;
#[cfg(test)]
mod shared_tests;
#[cfg(test)]
mod tests;
