//! The one error type of the CA and its helpers (JWT validation has its own,
//! [`crate::jwt::JwtError`], because each of its failures is a verdict a
//! caller may want to match on).

use std::path::PathBuf;
use std::time::SystemTime;

use baton_core::{SpiffeId, SpiffeIdError, TrustDomain};

use crate::time_util::unix_secs;

/// Why the CA could not load, issue, or parse something.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("CSR is not a valid PKCS#10 DER structure: {0}")]
    CsrParse(String),
    #[error(
        "CSR is signed with algorithm {0}; only ECDSA with SHA-256 over a P-256 key is accepted"
    )]
    CsrUnsupportedAlgorithm(String),
    #[error("CSR public key is not an uncompressed P-256 EC point; only P-256 keys are accepted")]
    CsrUnsupportedKey,
    #[error("CSR self-signature does not verify: the requester does not hold the private key")]
    CsrBadSignature,
    #[error("SPIFFE ID {id} is not in this CA's trust domain {trust_domain}")]
    ForeignTrustDomain {
        id: SpiffeId,
        trust_domain: TrustDomain,
    },
    #[error("no SVID may carry the trust domain's own ID {0}; it needs a path")]
    TrustDomainIdNotAllowed(SpiffeId),
    #[error("{name:?} is not a valid DNS name for a certificate")]
    InvalidDnsName { name: String },
    #[error("TTL must be at least one second")]
    ZeroTtl,
    #[error("a JWT-SVID needs at least one audience, and no audience may be empty")]
    EmptyAudience,
    #[error(
        "the X.509 authority expired at unix time {}; restart the broker so it makes a new one",
        unix_secs(*.not_after)
    )]
    AuthorityExpired { not_after: SystemTime },
    #[error("time {} is outside what certificates can encode", unix_secs(*.0))]
    TimeOutOfRange(SystemTime),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
    #[error("CA key storage {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "key file {} is accessible by group or others (mode {mode:o}); run `chmod 600` on it",
        .path.display()
    )]
    InsecureKeyFile { path: PathBuf, mode: u32 },
    #[error("persisted file {} is invalid: {reason}", .path.display())]
    CorruptStore { path: PathBuf, reason: String },
    #[error(
        "persisted authority {} belongs to trust domain {found:?}, but this broker is configured for {expected}",
        .path.display()
    )]
    TrustDomainMismatch {
        path: PathBuf,
        expected: TrustDomain,
        found: String,
    },
    #[error("trust bundle key #{index}, field {field:?}: {reason}")]
    BundleKey {
        index: usize,
        field: &'static str,
        reason: String,
    },
    #[error("trust bundle: {0}")]
    Bundle(String),
    #[error("certificate chain is empty")]
    EmptyChain,
    #[error("certificate is not valid X.509 DER: {0}")]
    Certificate(String),
    #[error("leaf certificate has {0} URI SANs; an X509-SVID has exactly one")]
    UriSanCount(usize),
    #[error("leaf URI SAN is not a valid SPIFFE ID: {0}")]
    BadSpiffeId(#[from] SpiffeIdError),
    #[error("PEM input: {0}")]
    Pem(String),
    #[error("no authority with id {id}; `baton ca show` lists them")]
    UnknownAuthority { id: String },
    #[error("refused: {0}")]
    RotationRefused(String),
    #[error(
        "refused: JWT key {id} signed {} JWT-SVID(s) and {} delegation token(s) that are still live (until unix time {}){}; validators must keep accepting them, so it stays in the bundle until then. Wait (`baton ca show` counts what remains), or revoke with --force to make them fail at once",
        .usage.jwt_svids,
        .usage.delegation_tokens,
        .usage.until(),
        if .usage.untracked_until > 0 { ", counting what it signed before the broker last started" } else { "" }
    )]
    KeyInUse {
        id: String,
        usage: crate::usage::KeyUsage,
    },
    #[error("upstream CA: {0}")]
    Upstream(String),
    #[error("shared CA store: {0}")]
    SharedStore(String),
}
