//! Whole requests: each function here is everything one broker route
//! decides, from an authenticated caller to the answer, with every durable
//! step in its order. A front end (the HTTPS shell, a test, a future gRPC
//! or OAuth front end) only turns its transport into these arguments and
//! the result into its answer; it decides nothing.
//!
//! They block (signatures, the datastore, the audit log): a caller on an
//! async runtime runs them on its blocking pool. The async ones (`revoke`,
//! `end_task`, `change_purpose`: they wait for the revocation store and
//! reap secret leases) reach the datastore through `block_in_place`, so
//! they need a multi-threaded runtime. Time is passed in (one instant per
//! request; a batch of reports takes a clock, each report stamped when it
//! is appended).
//!
//! The steps these compose (`Broker::attest`, `sign_x509`, `sign_jwt`,
//! `Delegation::start_task`, `delegate`, `redeem`, `renew`, `end_task`, ...)
//! are private to this crate: outside it, those decision steps are
//! reached only through a function here, with its registration and
//! re-checks. (The CA itself stays reachable through `Broker::ca`.)
//!
//! The ordering rules they keep:
//! - a credential is registered with the revocation registry before it
//!   leaves the broker (fail closed: a registry that refuses or is down
//!   refuses the request), so revoking its task or subtree covers it;
//! - what a new task credential replaces (a renewed certificate) is
//!   revoked durably before the new one is registered;
//! - a credential for a workload is handed out only if its node is still
//!   attested and not banned after the registration, so an eviction racing
//!   the request either covers what was registered or refuses it.

use std::time::{Duration, SystemTime};

use baton_core::api::{
    AttestRequest, DelegateRequest, HandoffGrant, RedeemRequest, RenewTaskRequest, SignJwtRequest,
    SignJwtResponse, SignX509Request, SignX509Response, SignedSvid, StartTaskRequest,
    StartTaskResponse, TaskCredential, ToolCallReport,
};
use baton_core::trace_context::TraceParent;
use baton_core::{Purpose, SpiffeId};
use baton_revocation::{Revoked, Target};
use baton_verify::PeerCert;
use serde::Serialize;

use crate::delegation::{Delegation, Minted};
use crate::revocation::{Propagation, RevokeTarget, Revoker};
use crate::service::{AuthenticatedNode, Broker, BrokerError, Issued, unix};
use crate::store::AgentBlock;
use crate::tasks::TaskRecord;
use crate::telemetry::{RequestTrace, request_span};

/// The node behind a request: attested, not banned, and presenting an agent
/// SVID (`leaf_der`, the verified mTLS leaf) that is its current one and
/// not revoked in the durable table (a read error refuses).
pub fn node(
    broker: &Broker,
    revoker: &Revoker,
    peer: Option<&SpiffeId>,
    leaf_der: Option<&[u8]>,
    now: SystemTime,
) -> Result<AuthenticatedNode, BrokerError> {
    let at = unix(now);
    broker.authenticate_node_svid(
        peer,
        leaf_der,
        now,
        |serial| revoker.durably_revoked(serial, at),
        |renewed_away| {
            revoker
                .supersede_blocking(renewed_away, "renewed", at)
                .map(|_| ())
        },
    )
}

/// Hands out what `issued` holds: registers its records (fail closed),
/// then lets `finish` re-check and hand it out.
fn hand_out<X, T>(
    broker: &Broker,
    revoker: &Revoker,
    node: &AuthenticatedNode,
    issued: Result<Issued<X>, BrokerError>,
    now: SystemTime,
    finish: impl FnOnce(&Broker, &AuthenticatedNode, X) -> Result<T, BrokerError>,
) -> Result<T, BrokerError> {
    let issued = issued?;
    revoker.register_blocking(&issued.records, unix(now))?;
    // Checked again once registered: an agent blocked (`revoke agent`)
    // after the first check had its credentials revoked without these,
    // which must then not leave either.
    let mut agents: Vec<&SpiffeId> = issued
        .records
        .iter()
        .filter_map(|r| r.agent.as_ref())
        .collect();
    agents.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
    agents.dedup();
    for agent in agents {
        broker.refuse_blocked(agent, unix(now))?;
    }
    finish(broker, node, issued.value)
}

/// `attest`: a node presents a join token and a CSR. The agent SVID's
/// record is registered before the token is burned and the SVID leaves: a
/// registry that is down costs no token.
pub fn attest(
    broker: &Broker,
    revoker: &Revoker,
    req: &AttestRequest,
    now: SystemTime,
) -> Result<SignedSvid, BrokerError> {
    let pending = broker.attest(req, now, |serial| {
        revoker.durably_revoked(serial, unix(now))
    })?;
    revoker.register_blocking(&[pending.record()], unix(now))?;
    broker.finish_agent_svid(pending)
}

/// `renew`: an attested node renews its agent SVID.
pub fn renew_agent_svid(
    broker: &Broker,
    revoker: &Revoker,
    node: &AuthenticatedNode,
    csr_der: &[u8],
    now: SystemTime,
) -> Result<SignedSvid, BrokerError> {
    let issued = broker.renew(node, csr_der, now).map(|pending| Issued {
        records: vec![pending.record()],
        value: pending,
    });
    hand_out(broker, revoker, node, issued, now, |b, _node, pending| {
        b.finish_agent_svid(pending)
    })
}

/// Hands out a workload credential only if its node is still attested.
fn still_attested<T>(broker: &Broker, node: &AuthenticatedNode, v: T) -> Result<T, BrokerError> {
    broker.authenticate_node(Some(node.id()))?;
    Ok(v)
}

/// `sign-x509`: X509-SVIDs for the node's workloads.
pub fn sign_x509(
    broker: &Broker,
    revoker: &Revoker,
    node: &AuthenticatedNode,
    req: &SignX509Request,
    now: SystemTime,
) -> Result<SignX509Response, BrokerError> {
    let issued = broker.sign_x509(node, req, now);
    hand_out(broker, revoker, node, issued, now, still_attested)
}

/// `sign-jwt`: a JWT-SVID for one of the node's workloads.
pub fn sign_jwt(
    broker: &Broker,
    revoker: &Revoker,
    node: &AuthenticatedNode,
    req: &SignJwtRequest,
    now: SystemTime,
) -> Result<SignJwtResponse, BrokerError> {
    let issued = broker.sign_jwt(node, req, now);
    hand_out(broker, revoker, node, issued, now, still_attested)
}

/// A task credential minted for a node's workload (`redeem`, `renew`):
/// its records are registered, the node re-checked, then what it replaces
/// is revoked, last, so that it still leaves only once the old one is dead,
/// and a failure of either earlier step leaves the old one usable (a
/// renewal not handed out is undone by its caller: the holder retries with
/// the certificate it still has).
fn hand_out_minted(
    d: &Delegation,
    node: &AuthenticatedNode,
    minted: Minted,
    now: SystemTime,
) -> Result<TaskCredential, BrokerError> {
    let superseded = minted.superseded;
    // What this renewal makes, to revoke if the old one was revoked under it.
    let successors: Vec<Revoked> = if superseded.is_empty() {
        Vec::new()
    } else {
        minted
            .records
            .iter()
            .map(|r| Revoked {
                id: r.id.clone(),
                kind: r.kind,
                expires_at: r.expires_at,
            })
            .collect()
    };
    hand_out(
        d.broker(),
        d.revoker(),
        node,
        Ok(Issued {
            value: minted.credential,
            records: minted.records,
        }),
        now,
        |b, node, cred| {
            b.authenticate_node(Some(node.id()))?;
            let now = unix(now);
            let live = superseded.iter().filter(|r| r.expires_at > now).count();
            let revoked = d
                .revoker()
                .supersede_blocking(&superseded, "renewed", now)?;
            if revoked < live {
                // Revoked by someone else (an operator's `revoke
                // credential <serial>`) since this renewal checked it: its
                // successor dies with it, and the token stays bound to a
                // revoked certificate.
                d.revoker()
                    .supersede_blocking(&successors, "certificate_revoked", now)?;
                return Err(BrokerError::Forbidden {
                    code: "certificate_revoked",
                    message: "the certificate being renewed was revoked while it was renewed"
                        .into(),
                });
            }
            Ok(cred)
        },
    )
}

/// `redeem`: a node asks for the task credential of a grant on behalf of
/// one of its workloads.
pub fn redeem(
    d: &Delegation,
    node: &AuthenticatedNode,
    req: &RedeemRequest,
    now: SystemTime,
) -> Result<TaskCredential, BrokerError> {
    let minted = d.redeem(node, req, now)?;
    hand_out_minted(d, node, minted, now)
}

/// `renew`: a node renews a workload's task certificate (proof of the old
/// key); the old certificate is revoked before the new one leaves.
pub fn renew(
    d: &Delegation,
    node: &AuthenticatedNode,
    req: &RenewTaskRequest,
    now: SystemTime,
) -> Result<TaskCredential, BrokerError> {
    let mut minted = d.renew(node, req, now)?;
    let rebound = minted.rebound.take();
    hand_out_minted(d, node, minted, now).inspect_err(|_| {
        // Not handed out (the old certificate's revocation, the new one's
        // registration or the node's re-check failed): the holder's retry
        // with its old certificate must not be refused as raced.
        if let Some(r) = &rebound {
            d.undo_rebind(r, now);
        }
    })
}

/// `start`: a human (by ID token) starts a task; its first grant is
/// registered before it is answered.
pub fn start_task(
    d: &Delegation,
    req: &StartTaskRequest,
    now: SystemTime,
) -> Result<StartTaskResponse, BrokerError> {
    d.start_task(req, now)
}

/// `delegate`: the holder of a task credential, connected with `peer`,
/// hands part of its task on; the grant is registered in the transaction
/// that stores it.
pub fn delegate(
    d: &Delegation,
    peer: &PeerCert,
    req: &DelegateRequest,
    now: SystemTime,
) -> Result<HandoffGrant, BrokerError> {
    d.delegate(peer, req, now)
}

/// A tool server acting in the audit log (reports, approval requests): its
/// SVID must not be revoked (the durable table; a read error refuses) and
/// its SPIFFE ID not blocked.
pub fn live_tool_server(
    d: &Delegation,
    peer: &PeerCert,
    now: SystemTime,
) -> Result<SpiffeId, BrokerError> {
    let now = unix(now);
    if d.revoker()
        .durably_revoked(peer.serial_hex(), now)
        .unwrap_or(true)
    {
        return Err(BrokerError::Forbidden {
            code: "certificate_revoked",
            message: format!(
                "the SVID (serial {}) of {} is revoked: it can no longer report calls, ask for approvals, introspect keys or follow the revocation feed",
                peer.serial_hex(),
                peer.spiffe_id()
            ),
        });
    }
    d.broker().refuse_blocked(peer.spiffe_id(), now)?;
    Ok(peer.spiffe_id().clone())
}

/// `tool-calls`: a tool server's reports (`reporter`, already checked by
/// [`live_tool_server`]), each checked in its own span, continuing the
/// trace the call arrived with at the tool server (its report's
/// `traceparent`), else the request's (`traceparent`), then appended to
/// the audit log together (one signed checkpoint for the batch). In a
/// batch (`single` false), a report that can never be accepted is answered
/// on its own, without a receipt, so it cannot block the others; an
/// unavailable log fails the batch (the tool server retries it).
pub fn record_reports(
    d: &Delegation,
    reporter: &SpiffeId,
    batch: &[ToolCallReport],
    single: bool,
    traceparent: Option<&str>,
    clock: &dyn Fn() -> SystemTime,
) -> Result<serde_json::Value, BrokerError> {
    let refusal = |r: &ToolCallReport, e: &BrokerError| {
        tracing::warn!(reporter = %reporter, report = %r.report_id, error = %e, "tool-call report refused");
        serde_json::json!({
            "report_id": r.report_id,
            "refused": { "code": e.code(), "message": e.to_string() },
        })
    };
    let refusable = |e: &BrokerError| {
        !single
            && matches!(
                e,
                BrokerError::Forbidden { .. }
                    | BrokerError::NotFound(_)
                    | BrokerError::BadRequest { .. }
            )
    };
    let mut answers: Vec<Option<serde_json::Value>> = vec![None; batch.len()];
    let mut checked = Vec::with_capacity(batch.len());
    let mut at = Vec::with_capacity(batch.len());
    let mut spans = Vec::with_capacity(batch.len());
    for (i, r) in batch.iter().enumerate() {
        let parent = [r.traceparent.as_deref(), traceparent]
            .into_iter()
            .flatten()
            .find(|t| t.parse::<TraceParent>().is_ok());
        let rt = RequestTrace::start(request_span!("baton.tool_call"), parent);
        // Each report is stamped when it is checked.
        let c = rt.scoped(|| d.check_tool_call(reporter, r, clock()));
        rt.outcome(&c);
        match c {
            Ok(c) => {
                checked.push(c);
                at.push(i);
                spans.push(rt);
            }
            Err(e) if refusable(&e) => answers[i] = Some(refusal(r, &e)),
            Err(e) => return Err(e),
        }
    }
    let recorded = match d.record_tool_calls(checked) {
        Ok(v) => v,
        Err(e) => {
            let failed: Result<(), BrokerError> = Err(e);
            for rt in &spans {
                rt.outcome(&failed);
            }
            return failed.map(|()| serde_json::Value::Null);
        }
    };
    for ((i, answer), rt) in at.into_iter().zip(recorded).zip(&spans) {
        // The span's outcome is the report's, once it was recorded.
        rt.outcome(&answer);
        answers[i] = Some(match answer {
            Ok(v) => v,
            Err(e) if refusable(&e) => refusal(&batch[i], &e),
            Err(e) => return Err(e),
        });
    }
    Ok(serde_json::json!({ "receipts": answers.into_iter().flatten().collect::<Vec<_>>() }))
}

/// `grant`: a fresh grant for a task's root agent (e.g. after a purpose
/// change revoked every credential of the task), registered before it is
/// answered.
pub fn regrant(
    d: &Delegation,
    task: &str,
    audience: Vec<String>,
    now: SystemTime,
) -> Result<HandoffGrant, BrokerError> {
    d.regrant(task, audience, now)
}

/// How long an operator's revocation waits for the revocation store
/// before it answers "recorded; propagating".
pub const PROPAGATION_WAIT: Duration = Duration::from_secs(2);

/// A task ended: its record, how many credentials its end revoked, and
/// where their propagation stands.
#[derive(Debug, Serialize)]
pub struct TaskEnded {
    pub task: TaskRecord,
    pub revoked: usize,
    pub already_ended: bool,
    pub propagation: Propagation,
}

/// `end`: revokes every credential of a task, then marks it ended.
/// Revoked first: the task's deny entry also refuses everything minted
/// after it, so a broker that dies in between leaves a task that is dead
/// but not yet shown ended (the operator's command failed; running it
/// again completes it), never one shown ended whose credentials still
/// work. Re-driven on every call.
pub async fn end_task(
    d: &Delegation,
    task: &str,
    now: SystemTime,
) -> Result<TaskEnded, BrokerError> {
    let current = d.get_task(task)?;
    let revoked = revoke_task(d, &current, "task ended", unix(now)).await?;
    let (task, already_ended) = d.end_task(task, now)?;
    let propagation = d.revoker().propagation(PROPAGATION_WAIT).await?;
    Ok(TaskEnded {
        task,
        revoked,
        already_ended,
        propagation,
    })
}

/// Revokes every credential of a task; a task with nothing issued yet
/// revokes nothing.
async fn revoke_task(
    d: &Delegation,
    task: &TaskRecord,
    reason: &str,
    now: u64,
) -> Result<usize, BrokerError> {
    let target = Target::Task(task.id.clone());
    match d
        .revoker()
        .revoke(&target, d.task_store(), reason, now)
        .await
    {
        Ok(v) => Ok(v.len()),
        Err(BrokerError::NotFound(_)) => Ok(0),
        Err(e) => Err(e),
    }
}

/// A task's purpose changed: every credential issued so far is revoked
/// (the task goes on with new grants).
#[derive(Debug, Serialize)]
pub struct PurposeChanged {
    pub task: TaskRecord,
    pub revoked: usize,
    pub propagation: Propagation,
}

/// `purpose`: changes a task's declared purpose and revokes what was
/// issued under the old one: revoked before the change is committed (a
/// broker that dies in between leaves the old purpose in force with its
/// credentials dead, and the operator's command failed), and again after
/// it, for what a hop minted under the old purpose meanwhile.
pub async fn change_purpose(
    d: &Delegation,
    task: &str,
    purpose: &Purpose,
    now: SystemTime,
) -> Result<PurposeChanged, BrokerError> {
    let current = d.get_task(task)?;
    d.check_purpose_change(&current, purpose, unix(now))?;
    let mut revoked = d
        .revoker()
        .revoke_issued(
            &current.id,
            d.task_store(),
            "task purpose changed",
            unix(now),
        )
        .await?;
    let task = d.set_purpose(task, purpose, now)?;
    let late = d
        .revoker()
        .revoke_issued(&task.id, d.task_store(), "task purpose changed", unix(now))
        .await?;
    let mut seen: std::collections::BTreeSet<String> =
        revoked.iter().map(|r| r.id.clone()).collect();
    revoked.extend(late.into_iter().filter(|r| seen.insert(r.id.clone())));
    let propagation = d.revoker().propagation(PROPAGATION_WAIT).await?;
    Ok(PurposeChanged {
        task,
        revoked: revoked.len(),
        propagation,
    })
}

/// One credential an operator's revocation covered.
#[derive(Debug, Serialize)]
pub struct RevokedCredential {
    pub id: String,
    pub kind: &'static str,
    pub expires_at: u64,
}

/// What an operator's revocation did.
#[derive(Debug, Serialize)]
pub struct Revocation {
    pub target: String,
    pub revoked: Vec<RevokedCredential>,
    /// For an agent: its block (new credentials refused).
    pub blocked: Option<AgentBlock>,
    pub propagation: Propagation,
}

/// `revoke`: an operator revokes a task, an agent, a credential or a
/// subtree. An agent is blocked first: nothing new reaches it while its
/// existing credentials are being revoked, and an agent with nothing live
/// is still blocked. `until` applies to an agent only.
pub async fn revoke(
    d: &Delegation,
    target: &RevokeTarget,
    reason: &str,
    until: Option<u64>,
    now: SystemTime,
) -> Result<Revocation, BrokerError> {
    let now = unix(now);
    let target = d.revoker().parse_target(target, d.trust_domain())?;
    crate::delegation::check_reason(reason)?;
    if let Target::Task(t) = &target {
        // A task of this broker, or a clear not-found.
        let _ = d.get_task(t.as_str())?;
    }
    // The record first, under the task the revocation reaches: no
    // operator's revocation of a task's credentials takes effect unlogged.
    if let Some(task) = d.revoker().task_of(&target, d.task_store(), now)? {
        d.record_revocation(&task, &target.to_string(), reason, now)?;
    }
    let blocked = match &target {
        Target::Agent(id) => Some(d.block_agent(id, until, reason, now)?),
        _ if until.is_some() => {
            return Err(BrokerError::BadRequest {
                field: Some("until"),
                message: "until applies to an agent only".into(),
            });
        }
        _ => None,
    };
    let revoked = match d
        .revoker()
        .revoke(&target, d.task_store(), reason, now)
        .await
    {
        Ok(v) => v,
        Err(BrokerError::NotFound(_)) if blocked.is_some() => Vec::new(),
        Err(e) => return Err(e),
    };
    let propagation = d.revoker().propagation(PROPAGATION_WAIT).await?;
    Ok(Revocation {
        target: target.to_string(),
        revoked: revoked
            .iter()
            .map(|r| RevokedCredential {
                id: r.id.clone(),
                kind: r.kind.code(),
                expires_at: r.expires_at,
            })
            .collect(),
        blocked,
        propagation,
    })
}

#[cfg(test)]
#[path = "requests_tests.rs"]
mod tests;
