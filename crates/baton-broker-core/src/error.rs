//! The one error type of the broker's decisions, and the small helpers
//! (clock to unix seconds, secret digests, randomness) every module of the
//! core uses. A leaf module: it imports no other decision module, so the
//! decision modules do not import each other just for their error type.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::store::StoreError;

/// Every way a broker request can fail; each maps to one HTTP status and a
/// stable code (the HTTP shell maps them in one place).
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("{message}")]
    BadRequest {
        field: Option<&'static str>,
        message: String,
    },
    #[error("{0}")]
    Unauthenticated(String),
    #[error("{message}")]
    Forbidden { code: &'static str, message: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("signing failed: {0}")]
    Ca(#[from] baton_ca::CaError),
    #[error("issuance refused because it could not be recorded: {0}")]
    Hook(String),
    /// A batch counted in items went over its caller's rate limit once its
    /// size was known (the guard before the body charged one).
    #[error("{0}")]
    RateLimited(crate::limits::RateLimited),
}

impl BrokerError {
    pub(crate) fn bad(field: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            field: Some(field),
            message: message.into(),
        }
    }

    /// The stable code callers see for this error.
    pub fn code(&self) -> &'static str {
        match self {
            BrokerError::BadRequest { .. } => "invalid_argument",
            BrokerError::Unauthenticated(_) => "unauthenticated",
            BrokerError::Forbidden { code, .. } => code,
            BrokerError::NotFound(_) => "not_found",
            BrokerError::Conflict(_) => "conflict",
            BrokerError::RateLimited(_) => "rate_limited",
            BrokerError::Store(_) | BrokerError::Ca(_) | BrokerError::Hook(_) => "unavailable",
        }
    }
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Hex SHA-256 of a secret (join tokens, grants): what is stored instead of it.
pub(crate) fn token_digest(token: &str) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ))
}

pub(crate) fn random_bytes<const N: usize>() -> Result<[u8; N], BrokerError> {
    let mut buf = [0u8; N];
    aws_lc_rs::rand::fill(&mut buf)
        .map_err(|_| BrokerError::Hook("system random generator failed".into()))?;
    Ok(buf)
}

pub(crate) fn random_hex<const N: usize>() -> Result<String, BrokerError> {
    Ok(hex::encode(random_bytes::<N>()?))
}
