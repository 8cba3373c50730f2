//! The records of minted credentials that the task store and the
//! revocation ledger both keep: a delegation token as it was minted, and a
//! task's credential as the registry holds it.
//!
//! A leaf module (nothing else of the crate is imported), so that
//! [`crate::tasks`], [`crate::ledger`] and [`crate::revocation`] share these
//! types without importing each other.

use baton_core::{RiskTier, Scope, SpiffeId, TaskId};
use serde::{Deserialize, Serialize};

/// A minted delegation token, kept for tracing and (later) revocation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub jti: String,
    pub task_id: TaskId,
    pub spiffe_id: SpiffeId,
    pub depth: u32,
    pub parent_jti: Option<String>,
    pub exp: u64,
    pub cert_thumbprint: String,
    pub cert_serial: String,
    /// The audiences the token was minted for (who may report its calls).
    #[serde(default)]
    pub aud: Vec<String>,
    /// What the token grants, so that a report of an allowed call cannot
    /// claim more: its scope, and its task's risk ceiling. `None` in
    /// records written before they were kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk_ceiling: Option<RiskTier>,
}

/// One credential of a task, as the registry holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskCredential {
    /// What `baton revoke credential` takes: a certificate serial (hex), a
    /// token `jti`, a grant or JWT-SVID digest, a lease id.
    pub id: String,
    /// `x509`, `token`, `grant`, `lease` or `jwtsvid`.
    pub kind: String,
    /// The agent (SPIFFE ID) holding it.
    pub agent: Option<String>,
    /// The node it was issued through.
    pub node: Option<String>,
    /// The credential it was minted from.
    pub parent: Option<String>,
    /// Unix seconds.
    pub expires_at: u64,
    pub revoked: bool,
}
