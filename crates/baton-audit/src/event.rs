//! Audit events and their canonical encoding.
//!
//! # Canonical encoding (version 1)
//!
//! A JSON object, UTF-8, no whitespace, keys in byte order, as `serde_json`
//! writes it (RFC 8259 string escaping: `"` `\` and control characters
//! escaped, `\u00XX` for controls without a short form, everything else
//! literal). Absent values are omitted, never `null`; `policy_ids` is omitted
//! when empty. Keys:
//!
//! `actor`, `at`, `decision`, `depth`, `initiator_hmac`, `input_digest`,
//! `justification_hmac`, `kind`, `latency_ms`, `output_digest`, `parent_jti`,
//! `policy_ids`, `purpose`, `reason`, `recorded`, `resource`, `risk`, `scope`, `target`,
//! `task_id`, `token_jti`, `tool`, `trace_id`, `upstream_status`, `v`
//!
//! `v` is `1`; `kind` is snake_case (`task_started`, `hop_granted`, ...);
//! `scope` is the sorted list of permission strings; `risk` is the lowercase
//! tier; `trace_id` is the W3C trace id (32 lowercase hex digits) of the
//! request that caused the event, when it carried a `traceparent` or the
//! broker traced it. It was added without a version change: an event without
//! it encodes exactly as before, so older logs verify unchanged. The same
//! holds for `latency_ms` and `upstream_status`, which a gateway's
//! completion record of a call carries, and for `recorded` (an object,
//! keys in byte order, omitted when empty): the call's fields the
//! gateway's configuration keeps in clear text, redacted. The
//! sensitive values (initiator, justification) appear only as
//! `*_hmac`: lowercase hex HMAC-SHA256 under the log's key. The clear text
//! lives in a separate display column outside the tree.

use std::collections::BTreeMap;

use baton_core::api::ToolCallReport;
use baton_core::{Purpose, RiskTier, Scope, SpiffeId, TaskId, TraceId};
use serde::{Deserialize, Serialize};

use crate::error::AuditError;
use crate::keys::AuditKeys;

/// The canonical encoding's version.
pub const CANONICAL_VERSION: u32 = 1;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    TaskStarted,
    /// A task start the admission policy refused: the task never existed,
    /// its id only names the refusal.
    TaskRefused,
    HopGranted,
    HopRefused,
    Redeemed,
    ToolCall,
    PurposeChanged,
    TaskEnded,
    /// A call waits for a human's approval (a gateway asked).
    ApprovalRequested,
    /// A human approved or denied it (`decision`; the approver in
    /// `initiator`, an HMAC in the tree).
    ApprovalDecided,
    /// An operator revoked credentials of the task (`reason`: what was
    /// revoked, and why). Recorded before the revocation is carried out.
    Revoked,
}

impl EventKind {
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::TaskStarted => "task_started",
            EventKind::TaskRefused => "task_refused",
            EventKind::HopGranted => "hop_granted",
            EventKind::HopRefused => "hop_refused",
            EventKind::Redeemed => "redeemed",
            EventKind::ToolCall => "tool_call",
            EventKind::PurposeChanged => "purpose_changed",
            EventKind::TaskEnded => "task_ended",
            EventKind::ApprovalRequested => "approval_requested",
            EventKind::ApprovalDecided => "approval_decided",
            EventKind::Revoked => "revoked",
        }
    }
}

/// One audit event. Fields not relevant to a kind are `None`/empty.
///
/// `initiator` and `justification` are sensitive: `append` stores them only
/// as HMACs in the tree, plus a clear-text display copy that
/// `redact_clear_text` can wipe. `Debug` hides both.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    pub kind: EventKind,
    /// Unix seconds.
    pub at: u64,
    pub task_id: TaskId,
    /// Who acted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<SpiffeId>,
    /// The hop's target, or the tool server.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<SpiffeId>,
    /// Sensitive: the initiating identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<Purpose>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<RiskTier>,
    /// `allow`, `deny`, `granted` or `refused`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_ids: Vec<String>,
    /// Sensitive: why the actor asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_digest: Option<String>,
    /// The W3C trace of the request that caused the event.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<TraceId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    /// Fields recorded in clear text (redacted) by the server's choice.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub recorded: BTreeMap<String, String>,
}

impl std::fmt::Debug for AuditEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |o: &Option<String>| o.as_ref().map(|_| "...");
        f.debug_struct("AuditEvent")
            .field("kind", &self.kind)
            .field("at", &self.at)
            .field("task_id", &self.task_id)
            .field("actor", &self.actor)
            .field("target", &self.target)
            .field("initiator", &hidden(&self.initiator))
            .field("purpose", &self.purpose)
            .field("scope", &self.scope)
            .field("depth", &self.depth)
            .field("token_jti", &self.token_jti)
            .field("parent_jti", &self.parent_jti)
            .field("tool", &self.tool)
            .field("resource", &self.resource)
            .field("risk", &self.risk)
            .field("decision", &self.decision)
            .field("reason", &self.reason)
            .field("policy_ids", &self.policy_ids)
            .field("justification", &hidden(&self.justification))
            .field("input_digest", &self.input_digest)
            .field("output_digest", &self.output_digest)
            .field("trace_id", &self.trace_id)
            .field("latency_ms", &self.latency_ms)
            .field("upstream_status", &self.upstream_status)
            .field("recorded", &self.recorded)
            .finish()
    }
}

impl AuditEvent {
    /// An event of `kind` with every optional field empty.
    pub fn new(kind: EventKind, at: u64, task_id: TaskId) -> Self {
        Self {
            kind,
            at,
            task_id,
            actor: None,
            target: None,
            initiator: None,
            purpose: None,
            scope: None,
            depth: None,
            token_jti: None,
            parent_jti: None,
            tool: None,
            resource: None,
            risk: None,
            decision: None,
            reason: None,
            policy_ids: Vec::new(),
            justification: None,
            input_digest: None,
            output_digest: None,
            trace_id: None,
            latency_ms: None,
            upstream_status: None,
            recorded: BTreeMap::new(),
        }
    }

    /// The `ToolCall` event for a tool server's report. `tool_server` is the
    /// reporting server's SPIFFE ID (from its mTLS peer certificate).
    /// `scope` is `scope_used` when that parses as a scope; an empty or
    /// malformed list leaves it `None` (validate reports at the edge).
    pub fn from_tool_call(report: &ToolCallReport, tool_server: Option<SpiffeId>) -> Self {
        let mut e = Self::new(EventKind::ToolCall, report.at, report.task_id.clone());
        e.actor = Some(report.agent.clone());
        e.target = tool_server;
        e.token_jti = Some(report.token_jti.clone());
        e.tool = Some(report.tool.clone());
        e.resource = Some(report.resource.clone());
        e.risk = Some(report.risk);
        e.decision = Some(report.decision.clone());
        e.reason = report.reason.clone();
        e.policy_ids = report.policy_ids.clone();
        e.justification = report.justification.clone();
        e.input_digest = Some(report.input_digest.clone());
        e.output_digest = report.output_digest.clone();
        e.latency_ms = report.latency_ms;
        e.upstream_status = report.upstream_status;
        e.recorded.clone_from(&report.recorded);
        if let Ok(scope) = Scope::parse(&report.scope_used) {
            e.scope = Some(scope);
        }
        e
    }
}

/// The canonical form, fields in key order (serde_json keeps declaration order).
#[derive(Serialize)]
struct CanonicalRef<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    actor: Option<&'a SpiffeId>,
    at: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    decision: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    depth: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    initiator_hmac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    input_digest: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    justification_hmac: Option<String>,
    kind: EventKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    latency_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    output_digest: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_jti: Option<&'a str>,
    #[serde(skip_serializing_if = "<[String]>::is_empty")]
    policy_ids: &'a [String],
    #[serde(skip_serializing_if = "Option::is_none")]
    purpose: Option<&'a Purpose>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    recorded: &'a BTreeMap<String, String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    risk: Option<RiskTier>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a Scope>,
    #[serde(skip_serializing_if = "Option::is_none")]
    target: Option<&'a SpiffeId>,
    task_id: &'a TaskId,
    #[serde(skip_serializing_if = "Option::is_none")]
    token_jti: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<TraceId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_status: Option<u16>,
    v: u32,
}

/// The canonical form as decoded (no HMAC key needed).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanonicalEvent {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<SpiffeId>,
    pub at: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub depth: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator_hmac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification_hmac: Option<String>,
    pub kind: EventKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_jti: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policy_ids: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<Purpose>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub recorded: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub risk: Option<RiskTier>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<SpiffeId>,
    pub task_id: TaskId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_jti: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trace_id: Option<TraceId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_status: Option<u16>,
    pub v: u32,
}

/// The canonical bytes of `event`, sensitive fields replaced by their HMACs.
pub fn canonical_bytes(event: &AuditEvent, keys: &AuditKeys) -> Result<Vec<u8>, AuditError> {
    let c = CanonicalRef {
        actor: event.actor.as_ref(),
        at: event.at,
        decision: event.decision.as_deref(),
        depth: event.depth,
        initiator_hmac: event.initiator.as_deref().map(|s| keys.hmac_hex(s)),
        input_digest: event.input_digest.as_deref(),
        justification_hmac: event.justification.as_deref().map(|s| keys.hmac_hex(s)),
        kind: event.kind,
        latency_ms: event.latency_ms,
        output_digest: event.output_digest.as_deref(),
        parent_jti: event.parent_jti.as_deref(),
        policy_ids: &event.policy_ids,
        purpose: event.purpose.as_ref(),
        reason: event.reason.as_deref(),
        recorded: &event.recorded,
        resource: event.resource.as_deref(),
        risk: event.risk,
        scope: event.scope.as_ref(),
        target: event.target.as_ref(),
        task_id: &event.task_id,
        token_jti: event.token_jti.as_deref(),
        tool: event.tool.as_deref(),
        trace_id: event.trace_id,
        upstream_status: event.upstream_status,
        v: CANONICAL_VERSION,
    };
    serde_json::to_vec(&c).map_err(|e| AuditError::Encode(e.to_string()))
}

/// Decodes canonical bytes and checks they are exactly canonical (re-encoding
/// gives the same bytes), so one event has one encoding.
pub fn decode_canonical(bytes: &[u8]) -> Result<CanonicalEvent, CanonicalError> {
    let err = |e: serde_json::Error| CanonicalError(e.to_string());
    let ev: CanonicalEvent = serde_json::from_slice(bytes).map_err(err)?;
    if ev.v != CANONICAL_VERSION {
        return Err(CanonicalError(format!("unknown encoding version {}", ev.v)));
    }
    let again = serde_json::to_vec(&ev).map_err(err)?;
    if again != bytes {
        return Err(CanonicalError("bytes are not in canonical form".into()));
    }
    Ok(ev)
}

/// Why bytes are not a canonical event encoding.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a canonical audit event: {0}")]
pub struct CanonicalError(pub String);

/// The clear-text display copy of the sensitive fields (outside the tree).
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ClearText {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initiator: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub justification: Option<String>,
}

impl ClearText {
    pub fn of(event: &AuditEvent) -> Option<Self> {
        if event.initiator.is_none() && event.justification.is_none() {
            return None;
        }
        Some(Self {
            initiator: event.initiator.clone(),
            justification: event.justification.clone(),
        })
    }
}

/// A stored event for display: its index, the event with whatever clear text
/// is still held (`None` once redacted), and the HMACs that the tree covers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    pub index: u64,
    /// The log it is in, when events of several brokers' logs are read
    /// together (see [`crate::Mirror`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,
    pub event: AuditEvent,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initiator_hmac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub justification_hmac: Option<String>,
}

impl AuditRecord {
    pub(crate) fn from_parts(index: u64, c: CanonicalEvent, clear: ClearText) -> Self {
        let event = AuditEvent {
            kind: c.kind,
            at: c.at,
            task_id: c.task_id,
            actor: c.actor,
            target: c.target,
            initiator: clear.initiator,
            purpose: c.purpose,
            scope: c.scope,
            depth: c.depth,
            token_jti: c.token_jti,
            parent_jti: c.parent_jti,
            tool: c.tool,
            resource: c.resource,
            risk: c.risk,
            decision: c.decision,
            reason: c.reason,
            policy_ids: c.policy_ids,
            justification: clear.justification,
            input_digest: c.input_digest,
            output_digest: c.output_digest,
            trace_id: c.trace_id,
            latency_ms: c.latency_ms,
            upstream_status: c.upstream_status,
            recorded: c.recorded,
        };
        Self {
            index,
            log: None,
            event,
            initiator_hmac: c.initiator_hmac,
            justification_hmac: c.justification_hmac,
        }
    }
}
