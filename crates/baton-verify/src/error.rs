//! The crate's error enums. Authorization outcomes are exhaustive on
//! purpose: a new refusal reason should break callers' matches.

use std::path::PathBuf;

use baton_core::{Permission, RiskTier, SpiffeId, TaskId, TrustDomain};

/// Why a delegation token is refused. Each check has its own variant.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is longer than {max} bytes")]
    TooLarge { max: usize },
    #[error("token is not a well-formed compact JWS: {0}")]
    Malformed(&'static str),
    #[error("token uses alg \"none\" (unsigned); delegation tokens must be signed with ES256")]
    AlgNone,
    #[error("token uses symmetric alg {0:?}; delegation tokens are signed with ES256 only")]
    SymmetricAlgorithm(String),
    #[error("token uses alg {0:?}; only ES256 is accepted")]
    UnsupportedAlgorithm(String),
    #[error("token header typ is {found:?}; a delegation token has typ \"baton-delegation+jwt\"")]
    WrongType { found: Option<String> },
    #[error("token header has no \"kid\"")]
    MissingKid,
    #[error("token header carries {0:?}, which delegation tokens never use")]
    UnexpectedHeader(String),
    #[error(
        "token \"iss\" {0:?} is not a Baton broker SPIFFE ID (spiffe://<trust-domain>/baton/broker)"
    )]
    BadIssuer(String),
    #[error("no JWT authorities are configured for trust domain {0}")]
    NoBundle(TrustDomain),
    #[error("key id {kid:?} is not in the bundle of trust domain {trust_domain}")]
    UnknownKid {
        kid: String,
        trust_domain: TrustDomain,
    },
    #[error("token signature does not verify")]
    BadSignature,
    #[error("token claims are not a delegation token: {0}")]
    InvalidClaims(String),
    #[error("token carries claim {0:?}, which delegation tokens do not have")]
    UnknownClaim(String),
    #[error("token expired at unix time {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error(
        "token was issued at unix time {iat}, later than now ({now}) plus the allowed clock skew"
    )]
    IssuedInFuture { iat: u64, now: u64 },
    #[error("token audience {found:?} does not include {expected:?}")]
    AudienceMismatch {
        expected: String,
        found: Vec<String>,
    },
    #[error(
        "token is bound to another certificate: its cnf x5t#S256 is not the thumbprint of the peer's certificate"
    )]
    CertificateMismatch,
    #[error("token's current actor is {actor}, but the mTLS peer is {peer}")]
    ActorMismatch { actor: SpiffeId, peer: SpiffeId },
    #[error("token depth {depth} does not match its actor chain of {chain_len} actor(s)")]
    DepthMismatch { depth: u32, chain_len: usize },
    #[error("token depth {depth} exceeds the task's max_depth {max_depth}")]
    DepthExceeded { depth: u32, max_depth: u32 },
    #[error("the current actor's {field} differs from the token's own {field}")]
    ActorClaimMismatch { field: &'static str },
    #[error(
        "actor {actor} holds a token expiring at {exp}, after its delegator's expiry {delegator_exp}"
    )]
    ExpiryWidened {
        actor: SpiffeId,
        exp: u64,
        delegator_exp: u64,
    },
    #[error("actor {actor} holds {widened:?}, which its delegator did not hold")]
    ScopeWidened {
        actor: SpiffeId,
        widened: Vec<String>,
    },
    #[error(
        "actor {actor} may present its token to {}, which its delegator's token did not name",
        widened.join(", ")
    )]
    AudienceWidened {
        actor: SpiffeId,
        widened: Vec<String>,
    },
    #[error(
        "token signature is not in canonical low-S form (a re-encoded copy of another signature)"
    )]
    NonCanonicalSignature,
    #[error("token at depth {depth} names no parent token")]
    ParentMissing { depth: u32 },
    #[error("root token (depth 0) names a parent token")]
    UnexpectedParent,
    #[error("parent jti {parent:?} is not the delegating actor's jti {actor:?}")]
    ParentMismatch { parent: String, actor: String },
    #[error("token {jti:?} of task {task} is revoked")]
    Revoked { jti: String, task: TaskId },
    /// The token is live but the certificate it was presented with is
    /// revoked (superseded by a renewal, or revoked on its own): a renewal
    /// keeps the token's jti, so only the serial tells the old certificate
    /// from the new one.
    #[error("the mTLS peer's certificate (serial {serial:?}) of task {task} is revoked")]
    CertificateRevoked { serial: String, task: TaskId },
}

impl TokenError {
    /// A stable, machine-readable name for the refusal (logs, metrics, the
    /// `reason` of an audit report).
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::TooLarge { .. } => "too_large",
            TokenError::Malformed(_) => "malformed",
            TokenError::AlgNone => "alg_none",
            TokenError::SymmetricAlgorithm(_) => "symmetric_alg",
            TokenError::UnsupportedAlgorithm(_) => "unsupported_alg",
            TokenError::WrongType { .. } => "wrong_typ",
            TokenError::MissingKid => "missing_kid",
            TokenError::UnexpectedHeader(_) => "unexpected_header",
            TokenError::BadIssuer(_) => "bad_issuer",
            TokenError::NoBundle(_) => "no_bundle",
            TokenError::UnknownKid { .. } => "unknown_kid",
            TokenError::BadSignature => "bad_signature",
            TokenError::InvalidClaims(_) => "invalid_claims",
            TokenError::UnknownClaim(_) => "unknown_claim",
            TokenError::Expired { .. } => "expired",
            TokenError::IssuedInFuture { .. } => "issued_in_future",
            TokenError::AudienceMismatch { .. } => "audience_mismatch",
            TokenError::CertificateMismatch => "certificate_mismatch",
            TokenError::ActorMismatch { .. } => "actor_mismatch",
            TokenError::DepthMismatch { .. } => "depth_mismatch",
            TokenError::DepthExceeded { .. } => "depth_exceeded",
            TokenError::ActorClaimMismatch { .. } => "actor_claim_mismatch",
            TokenError::ExpiryWidened { .. } => "expiry_widened",
            TokenError::ScopeWidened { .. } => "scope_widened",
            TokenError::AudienceWidened { .. } => "audience_widened",
            TokenError::NonCanonicalSignature => "non_canonical_signature",
            TokenError::ParentMissing { .. } => "parent_missing",
            TokenError::UnexpectedParent => "unexpected_parent",
            TokenError::ParentMismatch { .. } => "parent_mismatch",
            TokenError::Revoked { .. } => "revoked",
            TokenError::CertificateRevoked { .. } => "certificate_revoked",
        }
    }
}

/// Why a [`crate::PeerCert`] could not be built from a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("the connection has no client certificate (mTLS is required)")]
    NoCertificate,
    #[error("the peer certificate is not an X509-SVID: {0}")]
    NotAnSvid(String),
}

/// Why a tool call is refused after its token verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallDenied {
    #[error("the delegation token expired at unix time {exp} (now {now})")]
    Expired { exp: u64, now: u64 },
    #[error("the token's scope does not grant {required}")]
    OutOfScope { required: Permission },
    #[error("tool tier {tier} is above the task's risk ceiling {ceiling}")]
    OverCeiling { tier: RiskTier, ceiling: RiskTier },
    #[error("policy denied the call (policies: {policy_ids:?})")]
    PolicyDenied { policy_ids: Vec<String> },
    #[error("policy evaluation failed, so the call is denied: {errors:?}")]
    PolicyError { errors: Vec<String> },
    #[error("the call could not be recorded in the audit spool, so it is denied: {0}")]
    AuditUnavailable(String),
    #[error("the revocation feed is stale, so {tier}-tier calls are denied until it recovers")]
    RevocationStale { tier: RiskTier },
    #[error("the caller's certificate (serial {serial:?}) is revoked")]
    PeerRevoked { serial: String },
    #[error(
        "policy allows the call only with a human's approval (policies: {policy_ids:?}), and this server cannot hold calls for approval; call it through a Baton gateway"
    )]
    ApprovalRequired { policy_ids: Vec<String> },
    #[error(
        "the call's record would be refused by the audit log ({field}: {message}), so the call is refused"
    )]
    Unrecordable {
        field: &'static str,
        message: String,
    },
}

impl CallDenied {
    /// A stable, machine-readable name for the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            CallDenied::Expired { .. } => "expired",
            CallDenied::OutOfScope { .. } => "out_of_scope",
            CallDenied::RevocationStale { .. } => "revocation_stale",
            CallDenied::OverCeiling { .. } => "over_ceiling",
            CallDenied::PolicyDenied { .. } => "policy_denied",
            CallDenied::PolicyError { .. } => "policy_error",
            CallDenied::AuditUnavailable(_) => "audit_unavailable",
            CallDenied::PeerRevoked { .. } => "peer_revoked",
            CallDenied::ApprovalRequired { .. } => "approval_required",
            CallDenied::Unrecordable { .. } => "invalid_request",
        }
    }
}

/// Why the audit reporter failed.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("audit spool {}: {source}", .path.display())]
    Spool {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("could not encode a tool-call report: {0}")]
    Encode(String),
    #[error("the record is outside the audit log's bounds, so it is not spooled: {0}")]
    OutOfBounds(#[from] baton_core::report_bounds::OutOfBounds),
    #[error("could not build the broker client: {0}")]
    Client(String),
    #[error("broker URL {0:?} is not an https:// URL")]
    BrokerUrl(String),
    #[error("mTLS configuration for the broker: {0}")]
    Tls(#[from] baton_tls::TlsError),
    #[error("delivery to the broker failed (records stay spooled): {0}")]
    Send(#[from] SendError),
}

/// Why one delivery attempt failed (the reports stay in the spool).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    #[error("broker unreachable: {0}")]
    Unreachable(String),
    #[error("broker answered HTTP {status}: {body}")]
    Status { status: u16, body: String },
}
