//! Calls held for a human's approval. A route or MCP tool marked
//! `approval` (or whose tier is in `[approval] tiers`), or a call allowed
//! by a Cedar permit annotated `@approval`, is first decided as any call (scope, ceiling, revocation, Cedar: a call that would be
//! refused is refused, not held); then the broker is asked for the
//! approval of exactly this call (task, actor, tool, resource, input
//! digest, this gateway). Pending or denied: the call is answered so and
//! never forwarded. Approved: the approval is used up by this call, whose
//! record names it.
//!
//! The input digest covers the request headers the upstream gets too (all
//! but [`UNBOUND_HEADERS`]): an approved JSON body is not the same bytes
//! sent as a form, an approved call is not the same call with another
//! `If-Match`, `Accept`, `Cookie` or `X-Amount`, and an MCP call approved
//! in one session (`Mcp-Session-Id`) does not serve another.

use std::collections::BTreeMap;

use baton_core::api::{ApprovalRequest, ApprovalState};
use baton_core::budget::Budget;
use baton_core::{SpiffeId, TaskId};
use baton_verify::{CallDenied, ToolSpec, VerifiedDelegation};
use http::HeaderMap;

use crate::gateway::{Gateway, error_chain, upstream_headers};

/// Request headers an approval does not bind: what a client sets anew on
/// each attempt (its name, trace context, request ids, `Expect`) and which
/// does not change what the upstream is asked to do. Every other header
/// the upstream gets is bound, `Accept` and `Accept-Language` included
/// (content negotiation and locale-aware parsing change what a server
/// does with the same bytes); a header unknown here is bound (fail
/// closed: at worst the call asks for approval again).
pub(crate) const UNBOUND_HEADERS: [&str; 7] = [
    "user-agent",
    "traceparent",
    "tracestate",
    "baggage",
    "x-request-id",
    "x-correlation-id",
    "expect",
];

/// What a call's approval binds besides the target: the headers the
/// upstream would get (less [`UNBOUND_HEADERS`]; the identity headers the
/// gateway sets included, so the chain is bound too), sorted by name, each
/// value in the order sent, then the input; every part length-prefixed so
/// that no two calls encode alike. The approval's input digest is of this,
/// not of the input alone as the call's record is; the record names its
/// approval.
pub(crate) fn bound_input(
    headers: &HeaderMap,
    d: &VerifiedDelegation,
    body: &[u8],
) -> Result<Vec<u8>, String> {
    let forwarded = upstream_headers(headers, d)?;
    let mut names: Vec<&http::HeaderName> = forwarded
        .keys()
        .filter(|n| !UNBOUND_HEADERS.contains(&n.as_str()))
        .collect();
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    let mut out = b"baton approval input v1\n".to_vec();
    let mut part = |bytes: &[u8]| {
        out.extend_from_slice(&(bytes.len() as u64).to_be_bytes());
        out.extend_from_slice(bytes);
    };
    part(&(names.len() as u64).to_be_bytes());
    for name in names {
        for value in forwarded.get_all(name) {
            part(name.as_str().as_bytes());
            part(value.as_bytes());
        }
    }
    part(b"body");
    part(body);
    Ok(out)
}

/// What a call that may need approval is asked about.
pub(crate) struct Ask<'a> {
    pub(crate) spec: &'a ToolSpec,
    /// The call's input as its record digests it (the request body, or
    /// the MCP arguments).
    pub(crate) input: &'a [u8],
    /// What the approval binds instead of `input`, when it is more (an MCP
    /// call's whole `params`); `None`: `input`. Computed only for a call
    /// that needs approval, off the path of every other call.
    pub(crate) bound: Option<&'a (dyn Fn() -> Vec<u8> + Send + Sync)>,
    /// The request headers, bound with the input (`None`: the input
    /// alone).
    pub(crate) headers: Option<&'a HeaderMap>,
    /// The HTTP request line (`METHOD /path?query`) of a route's call.
    pub(crate) target: Option<String>,
    /// How long the approval may wait.
    pub(crate) ttl: std::time::Duration,
    /// The route or tool always needs approval.
    pub(crate) configured: bool,
    /// What the human is shown of the call: its recorded clear-text fields
    /// (computed only for a call that needs approval).
    pub(crate) shown: &'a (dyn Fn() -> BTreeMap<String, String> + Send + Sync),
}

/// Why a call that needs approval does not go on now.
pub(crate) enum Held {
    /// The call would be refused anyway (recorded as such).
    Denied(CallDenied),
    /// Waiting for a human.
    Waiting(ApprovalState),
    /// A human said no (or the approval is closed).
    Refused(ApprovalState),
    /// The broker could not be asked: the call is refused (fail closed).
    Unavailable(String),
    /// The broker refused the caller's credential itself (revoked since
    /// the gate's check, expired, or its task ended): the call is refused
    /// as with an invalid token, not as a passing outage to retry.
    TokenRefused { code: String, message: String },
    /// The caller asked for approvals faster than its share (or the
    /// broker's limit for this gateway is spent): 429, retry after
    /// `retry_after` seconds.
    Busy { retry_after: u64, why: String },
}

/// Approval requests one agent of one task may send through the gateway at
/// once, then [`APPROVAL_ASKS_PER_SEC`] a second. The broker limits the
/// gateway as a whole (`approvals`); without a share per agent, one agent
/// repeating a held call (the same, or with other arguments each time)
/// would spend it for every other agent's approvals, the approved ones
/// too. An agent retrying its held call once a second, as the waiting
/// message asks, stays within its share.
pub(crate) const APPROVAL_ASKS_BURST: u32 = 30;
/// See [`APPROVAL_ASKS_BURST`].
pub(crate) const APPROVAL_ASKS_PER_SEC: u32 = 1;

/// Each (task, agent)'s share of approval requests.
pub(crate) struct AskBudget(std::sync::Mutex<Budget<(TaskId, SpiffeId)>>);

impl Default for AskBudget {
    fn default() -> Self {
        Self(std::sync::Mutex::new(Budget::new(
            APPROVAL_ASKS_BURST,
            APPROVAL_ASKS_PER_SEC,
        )))
    }
}

impl AskBudget {
    /// Takes one request of `d`'s agent in its task at `now`, or says in
    /// how many seconds there is one.
    fn take(&self, d: &VerifiedDelegation, now: u64) -> Result<(), u64> {
        let mut b = self.0.lock().unwrap_or_else(|e| e.into_inner());
        b.take(&(d.task_id().clone(), d.agent().clone()), now)
    }
}

/// The refusal of an agent past its share of approval requests.
fn over_share(d: &VerifiedDelegation, retry_after: u64) -> Held {
    Held::Busy {
        retry_after,
        why: format!(
            "agent {} asked for approvals in task {} faster than its share \
             ({APPROVAL_ASKS_BURST} at once, then {APPROVAL_ASKS_PER_SEC} a second); \
             send the call again later",
            d.agent(),
            d.task_id(),
        ),
    }
}

impl Gateway {
    /// The approval a call needs before it goes on: none (`Ok(None)`),
    /// or the approval a human gave for exactly this call (`Ok(Some(id))`,
    /// used up by it). A call needs one when its route or tool says so
    /// (`configured`), or when the permit that allows it carries Cedar's
    /// `@approval`; until a human approved it, it is held.
    pub(crate) async fn approval_for(
        &self,
        d: &VerifiedDelegation,
        now: u64,
        ask: Ask<'_>,
    ) -> Result<Option<String>, Held> {
        let Ask {
            spec,
            input,
            bound: binds,
            headers,
            target,
            ttl,
            configured,
            shown,
        } = ask;
        let gate = &self.enforcer.gate;
        if !configured && !gate.may_require_approval(&spec.name) {
            return Ok(None);
        }
        // A resource the log cannot keep is refused by the gate (below)
        // before any approval is asked for it.
        let fits = baton_core::report_bounds::check_resource(&spec.resource).is_ok();
        let checked = gate.check(d, spec, now).ok().filter(|_| fits);
        let Some(checked) = checked else {
            // Decided (and recorded) as any refused call.
            return match gate
                .authorize_approved_async(d, spec, input, now, Default::default())
                .await
            {
                Err(denied) => Err(Held::Denied(denied)),
                Ok(call) => {
                    // Allowed between the two looks: still not forwarded.
                    if let Err(e) = call.failed_async("held for approval, not forwarded").await {
                        tracing::warn!(error = %e, "could not spool the report of a held call");
                    }
                    Err(Held::Unavailable(
                        "the decision changed; send the call again".into(),
                    ))
                }
            };
        };
        if !configured && !checked.needs_approval {
            return Ok(None);
        }
        let bound;
        let whole = binds.map(|f| f());
        let input = whole.as_deref().unwrap_or(input);
        let input = match headers {
            Some(h) => {
                bound = bound_input(h, d, input).map_err(|e| {
                    Held::Unavailable(format!("the call's headers cannot be bound: {e}"))
                })?;
                bound.as_slice()
            }
            None => input,
        };
        let req = ApprovalRequest {
            task_id: d.task_id().clone(),
            token_jti: d.jti().to_owned(),
            agent: d.agent().clone(),
            tool: spec.name.clone(),
            resource: spec.resource.clone(),
            risk: spec.tier,
            input_digest: self.enforcer.gate.digest(input),
            ttl_secs: ttl.as_secs().max(1),
            target,
            shown: shown(),
        };
        self.approval_asks
            .take(d, now)
            .map_err(|wait| over_share(d, wait))?;
        let resp = self
            .enforcer
            .post_once("/v1/approvals", &req)
            .await
            .map_err(|e| {
                Held::Unavailable(format!("the broker did not answer: {}", error_chain(&e)))
            })?;
        let status = resp.status();
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS {
            let retry_after = resp
                .headers()
                .get(http::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(1)
                .clamp(1, 3600);
            return Err(Held::Busy {
                retry_after,
                why: "the broker's limit on this gateway's approval requests is spent; \
                      send the call again later"
                    .into(),
            });
        }
        let body = resp
            .text()
            .await
            .map_err(|e| Held::Unavailable(format!("the broker's answer broke off: {e}")))?;
        if !status.is_success() {
            let code = serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("code").and_then(|c| c.as_str()).map(str::to_owned));
            if let Some(code) = code
                && matches!(code.as_str(), "revoked" | "token_expired" | "task_ended")
            {
                return Err(Held::TokenRefused {
                    message: format!("the broker refused this credential for an approval ({code})"),
                    code,
                });
            }
            return Err(Held::Unavailable(format!(
                "the broker refused the approval request ({status}): {body}"
            )));
        }
        let state: ApprovalState = serde_json::from_str(&body).map_err(|e| {
            Held::Unavailable(format!("the broker's answer is not an approval: {e}"))
        })?;
        // The broker's answer must be about this call.
        if state.task_id != req.task_id
            || state.agent != req.agent
            || state.tool != req.tool
            || state.resource != req.resource
            || state.input_digest != req.input_digest
            || state.target != req.target
        {
            return Err(Held::Unavailable(
                "the broker answered about another call".into(),
            ));
        }
        tracing::info!(
            task = %d.task_id(),
            agent = %d.agent(),
            tool = %spec.name,
            approval = %state.id,
            status = %state.status,
            "call held for approval"
        );
        match state.status.as_str() {
            "approved" => Ok(Some(state.id)),
            "pending" => Err(Held::Waiting(state)),
            _ => Err(Held::Refused(state)),
        }
    }
}

/// What the agent is told while its call waits.
pub(crate) fn waiting_message(a: &ApprovalState) -> String {
    format!(
        "this call waits for a human's approval {id}: the task's initiator (or an approver) runs `baton approve {id}` (or `baton deny {id}`); then send the same call again, before it expires at {exp}",
        id = a.id,
        exp = a.expires_at
    )
}

pub(crate) fn refused_message(a: &ApprovalState) -> String {
    format!(
        "approval {} of this call is {}{}",
        a.id,
        a.status,
        a.reason
            .as_deref()
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    )
}
