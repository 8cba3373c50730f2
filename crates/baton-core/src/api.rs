//! The broker's HTTP wire types, shared by the broker, the node daemon and
//! the CLI. Binary values (DER) travel as standard base64 strings.
//!
//! Routes (see ARCHITECTURE.md):
//! - public HTTPS:  `GET /v1/bundle`, `GET /v1/bundle.pem`,
//!   `POST /v1/node/attest` (join token, no client certificate)
//! - node mTLS:     `POST /v1/node/renew`, `GET /v1/node/sync`,
//!   `POST /v1/node/sign-x509`, `POST /v1/node/sign-jwt`
//! - admin (Unix socket, peer uid checked): `POST /v1/admin/join-tokens`,
//!   `GET|POST /v1/admin/entries`, `GET|DELETE /v1/admin/entries/{id}`

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::entry::{Entry, EntryId};
use crate::secret::Secret;
use crate::spiffe_id::SpiffeId;

/// Base64 (standard alphabet) serde helpers for DER blobs.
pub mod b64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        STANDARD
            .decode(s.as_bytes())
            .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
    }

    /// The same for a list of blobs.
    pub mod list {
        use super::*;
        pub fn serialize<S: Serializer>(v: &[Vec<u8>], s: S) -> Result<S::Ok, S::Error> {
            s.collect_seq(v.iter().map(|b| STANDARD.encode(b)))
        }
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Vec<u8>>, D::Error> {
            let v = Vec::<String>::deserialize(d)?;
            v.iter()
                .map(|s| {
                    STANDARD
                        .decode(s.as_bytes())
                        .map_err(|e| serde::de::Error::custom(format!("invalid base64: {e}")))
                })
                .collect()
        }
    }
}

/// Every error answer of the broker: a stable code, a readable message and,
/// when one field of the request was at fault, its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.code)
    }
}

/// `POST /v1/admin/join-tokens`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JoinTokenRequest {
    pub ttl_secs: u64,
    /// Pin the SPIFFE ID the attesting node will get; else the broker picks
    /// `spiffe://<td>/baton/node/<random>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JoinTokenResponse {
    pub token: Secret,
    pub expires_at: u64,
    pub node_id: SpiffeId,
}

/// `POST /v1/node/attest`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttestRequest {
    pub join_token: Secret,
    #[serde(with = "b64")]
    pub csr_der: Vec<u8>,
}

/// `POST /v1/node/renew`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewRequest {
    #[serde(with = "b64")]
    pub csr_der: Vec<u8>,
}

/// A signed X509-SVID: the leaf first, then any intermediates (never the root).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignedSvid {
    pub spiffe_id: SpiffeId,
    #[serde(with = "b64::list")]
    pub cert_chain_der: Vec<Vec<u8>>,
    pub expires_at: u64,
}

/// Request header of `GET /v1/node/sync`: the bundle sequence (the
/// `spiffe_sequence` of the bundle in the previous answer) whose bundle
/// and taints the node has applied. A JWT key's taint waits for it.
pub const SYNC_APPLIED_HEADER: &str = "baton-sync-applied";

/// `GET /v1/node/sync`: what a node needs to serve its workloads.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncResponse {
    pub entries: Vec<Entry>,
    /// The SPIFFE bundle JSON of the broker's trust domain.
    pub bundle: serde_json::Value,
    /// Tainted authorities (X.509 subject key ids, JWT kids): whatever
    /// they signed must be re-issued now.
    #[serde(default)]
    pub tainted: Vec<String>,
}

/// One CSR to sign for one entry the node is entitled to.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignX509Item {
    pub entry_id: EntryId,
    #[serde(with = "b64")]
    pub csr_der: Vec<u8>,
}

/// `POST /v1/node/sign-x509`: signs a batch in one round trip.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignX509Request {
    pub items: Vec<SignX509Item>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignX509Response {
    pub svids: Vec<SignedSvid>,
}

/// `POST /v1/node/sign-jwt`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignJwtRequest {
    pub entry_id: EntryId,
    pub audience: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SignJwtResponse {
    pub token: Secret,
    pub expires_at: u64,
}

/// `GET /v1/admin/entries`
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EntryList {
    pub entries: Vec<Entry>,
}

// ---- delegation (tasks, hops, redeeming) ----

use crate::delegation::{Purpose, RiskTier, TaskId};
use crate::scope::Scope;

/// `POST /v1/tasks` (HTTPS) or `POST /v1/admin/tasks` (admin socket):
/// start a task for the human identified by `id_token`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StartTaskRequest {
    /// An OIDC ID token of the initiating user from a configured issuer.
    pub id_token: Secret,
    pub root_agent: SpiffeId,
    pub purpose: Purpose,
    pub scope: Scope,
    pub risk_ceiling: RiskTier,
    pub ttl_secs: u64,
    pub max_depth: u32,
    /// Audience of the root agent's first token.
    pub audience: Vec<String>,
}

/// A single-use, short-lived grant bound to one target SPIFFE ID.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HandoffGrant {
    /// Opaque; whoever holds it and is attested as `target` may redeem it once.
    pub grant: Secret,
    pub task_id: TaskId,
    pub target: SpiffeId,
    pub expires_at: u64,
}

/// Answer to a task start: the task and the root agent's grant.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StartTaskResponse {
    pub task_id: TaskId,
    pub expires_at: u64,
    pub grant: HandoffGrant,
}

/// `POST /v1/delegate` over mTLS with the holder's task SVID: hand part of
/// the task to `target`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DelegateRequest {
    /// The holder's own delegation token (bound to its mTLS certificate).
    pub token: Secret,
    pub target: SpiffeId,
    pub scope: Scope,
    pub purpose: Purpose,
    pub audience: Vec<String>,
    pub justification: String,
    /// Optional lifetime; never beyond the holder's own expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_secs: Option<u64>,
}

/// `POST /v1/node/redeem` (node mTLS): the node daemon redeems a grant for
/// an attested workload with a fresh key's CSR.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedeemRequest {
    pub grant: Secret,
    /// The SPIFFE ID the node attested the caller as (one of its entries).
    pub spiffe_id: SpiffeId,
    #[serde(with = "b64")]
    pub csr_der: Vec<u8>,
}

/// `POST /v1/node/renew-task`: a node asks, for an attested workload, that
/// the task credential it holds be re-issued under the CA's active keys
/// (after a taint): same claims and expiry, a new certificate for a fresh
/// key, the token re-signed and bound to it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenewTaskRequest {
    pub token: Secret,
    /// The SPIFFE ID the node attested the caller as (the token's actor).
    pub spiffe_id: SpiffeId,
    /// The leaf of the certificate the token is bound to.
    #[serde(with = "b64")]
    pub leaf_der: Vec<u8>,
    #[serde(with = "b64")]
    pub csr_der: Vec<u8>,
    /// The holder's signature, with the leaf's private key, over the
    /// renewal statement (`baton_ca::possession`).
    #[serde(with = "b64")]
    pub proof: Vec<u8>,
    /// When the proof was made (unix seconds).
    pub proof_iat: u64,
}

/// A task credential: a task X509-SVID and the delegation token bound to it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskCredential {
    pub task_id: TaskId,
    pub spiffe_id: SpiffeId,
    #[serde(with = "b64::list")]
    pub cert_chain_der: Vec<Vec<u8>>,
    pub token: Secret,
    pub expires_at: u64,
}

/// A tool server's report of one call, `POST /v1/audit/tool-calls` (mTLS
/// with the tool server's SVID). `report_id` makes retries idempotent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToolCallReport {
    pub report_id: String,
    pub task_id: TaskId,
    /// `jti` of the delegation token presented.
    pub token_jti: String,
    pub agent: SpiffeId,
    pub tool: String,
    pub resource: String,
    pub risk: RiskTier,
    #[serde(deserialize_with = "crate::report_bounds::bounded::scope_used")]
    pub scope_used: Vec<String>,
    /// Hex SHA-256 of the call's input and output.
    pub input_digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    /// `allow` or `deny`.
    pub decision: String,
    #[serde(deserialize_with = "crate::report_bounds::bounded::policy_ids")]
    pub policy_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub at: u64,
    /// Milliseconds from forwarding the call until its answer ended (a
    /// gateway's completion record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    /// The upstream's HTTP status (a gateway's completion record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// Fields of the call kept in clear text because the server's
    /// configuration names them (a gateway's `record-*`), already
    /// redacted: `header:x-request-id`, `input:/account`,
    /// `output:/status` -> the value (compact JSON, or the header's text).
    #[serde(
        default,
        skip_serializing_if = "std::collections::BTreeMap::is_empty",
        deserialize_with = "crate::report_bounds::bounded::recorded"
    )]
    pub recorded: std::collections::BTreeMap<String, String>,
    /// The W3C `traceparent` the call arrived with: the broker's record of
    /// it continues the caller's trace (an invalid one is ignored there).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// `POST /v1/approvals` (a tool server or gateway, mTLS): a call that
/// needs a human's approval. The broker answers with the approval that
/// binds exactly this call (tool, resource, arguments digest, task, actor,
/// requesting server), opening one if there is none; an approved one is
/// used up by this answer (one call per approval).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalRequest {
    pub task_id: TaskId,
    /// `jti` of the delegation token presented.
    pub token_jti: String,
    pub agent: SpiffeId,
    pub tool: String,
    pub resource: String,
    pub risk: RiskTier,
    /// Hex SHA-256 of the call's input.
    pub input_digest: String,
    /// How long the approval may wait for a decision, and then to be used.
    pub ttl_secs: u64,
    /// The request the call came as: `METHOD /path?query` (the path as
    /// the gateway read it) for an HTTP route, `POST /endpoint tools/call
    /// TOOL` for an MCP call. Part of what the approval binds, and what the
    /// human is shown.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// What the human is shown of the call's input beside `target`: the
    /// fields its route or tool records in clear text (`record-headers`,
    /// `record-input`), redacted and cut as in its record. The input
    /// itself is bound by `input_digest`, which no human can read: without
    /// these, two held calls that differ only in their bodies (an amount,
    /// a recipient) look alike.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "crate::report_bounds::bounded::shown"
    )]
    pub shown: BTreeMap<String, String>,
}

/// The longest [`ApprovalRequest::target`] a broker takes, in bytes.
pub const MAX_APPROVAL_TARGET: usize = 2048;

/// An approval as the broker holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalState {
    pub id: String,
    /// `pending`, `approved` (this answer used it: the call may go on),
    /// `denied`, `expired`, `used`, or `reported` (the used call's report
    /// cited it).
    pub status: String,
    pub task_id: TaskId,
    pub agent: SpiffeId,
    pub tool: String,
    pub resource: String,
    pub risk: RiskTier,
    pub input_digest: String,
    /// The delegation token the call was asked with (`None` for an
    /// approval stored before it was kept): a report citing the approval
    /// must carry the same one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_jti: Option<String>,
    /// The HTTP request the call came as ([`ApprovalRequest::target`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// The call's fields shown to the human ([`ApprovalRequest::shown`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub shown: BTreeMap<String, String>,
    /// The server that asked (the gateway's SPIFFE ID).
    pub requested_by: SpiffeId,
    pub created_at: u64,
    pub expires_at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decided_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The one tool-call report that cited this approval (status
    /// `reported`): an approval vouches for one call's record, not many.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported_in: Option<String>,
}

/// `POST /v1/admin/approvals/{id}/decision` (admin socket): a human's
/// decision, authenticated by their ID token as a task start is.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApprovalDecision {
    pub id_token: Secret,
    pub approve: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}
