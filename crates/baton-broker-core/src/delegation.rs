//! The delegation exchange: tasks, hops, grants and task credentials.
//!
//! Every hop is a new trust decision. The holder proves possession of its
//! task credential over mTLS (its task SVID) and presents its delegation
//! token; the broker verifies both, checks that the requested scope is a
//! subset of the holder's, that the purpose is the task's, that depth and
//! lifetime stay within bounds, asks Cedar, writes the decision to the audit
//! log (refusals too), and only then stores a single-use grant bound to the
//! target. The target redeems it through its own node daemon, which attested
//! it; the broker mints a fresh certificate and a token bound to it.
//! Nothing is forwarded: each hop has its own credential.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_audit::{AuditEvent, AuditLog, EventKind, Receipt};

use arc_swap::ArcSwap;
use baton_core::api::{
    ApprovalState, DelegateRequest, HandoffGrant, RedeemRequest, RenewTaskRequest,
    StartTaskRequest, StartTaskResponse, TaskCredential, ToolCallReport,
};
use baton_core::{
    Actor, Confirmation, DelegationClaims, ParentRef, Purpose, Secret, SpiffeId, TaskClaims, TaskId,
};
use baton_policy::{AdmissionPolicy, Engine, HopRequest};
use baton_verify::{PeerCert, TokenVerifier, VerifiedDelegation};

use baton_revocation::{CredKind, CredentialRecord};

use crate::oidc::{DevIssuer, OidcVerifier};
use crate::revocation::Revoker;
use crate::service::{
    AuthenticatedNode, Broker, BrokerError, CredentialKind, IssuedCredential, random_bytes,
    random_hex, token_digest, unix,
};
use crate::tasks::{
    GrantDelivery, GrantRecord, GrantRefusal, RedeemRefusal, TaskRecord, TaskStore, TokenRecord,
};

/// How far a renewal proof's `iat` may be from the broker's clock.
pub const RENEW_PROOF_WINDOW_SECS: u64 = 120;

/// A task credential on its way out: what to register with the revocation
/// store before it leaves, and what it replaces (revoked first).
#[derive(Debug)]
pub struct Minted {
    pub credential: TaskCredential,
    pub records: Vec<CredentialRecord>,
    pub superseded: Vec<baton_revocation::Revoked>,
    /// A renewal's rebinding of its token to the new certificate, undone
    /// ([`Delegation::undo_rebind`]) if the credential is not handed out,
    /// so the holder's retry with its old certificate is not refused as
    /// raced.
    pub rebound: Option<Rebound>,
}

/// A token record as it was before a renewal rebound it to `to_serial`.
#[derive(Debug)]
pub struct Rebound {
    before: TokenRecord,
    to_serial: String,
    /// The JWT key that signed the copy the holder keeps, and its expiry.
    signed_by: String,
    signed_exp: u64,
}

/// How long after a grant was used the very request that used it may get
/// its credential again: a node daemon's retries across its brokers.
const REDELIVER_FOR: Duration = Duration::from_secs(300);

/// What identifies a redeem request for its replay: the SHA-256 of its CSR
/// (a fresh key pair, signed once, per request).
fn request_digest(csr_der: &[u8]) -> String {
    hex::encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        csr_der,
    ))
}

/// How many times a task end re-reads a task that changed under it.
const TASK_WRITE_ATTEMPTS: usize = 8;

/// Bounds on what tasks and hops may ask for.
#[derive(Debug, Clone)]
pub struct DelegationSettings {
    pub max_task_ttl: Duration,
    pub max_depth: u32,
    /// How long a grant may wait to be redeemed (a queue may sit between).
    pub grant_ttl: Duration,
    /// Lifetime of a hop's token when the hop asks for none (never longer
    /// than its parent's or the task's): a sub-agent's credential is
    /// short-lived unless its delegator asks for more.
    pub token_ttl: Duration,
    /// The declared purpose catalogue.
    pub purposes: BTreeSet<Purpose>,
    /// Which SPIFFE IDs serve each audience: only they may report calls
    /// made with a token for that audience. An audience that is itself a
    /// SPIFFE ID is served by that ID.
    pub tool_servers: BTreeMap<String, Vec<SpiffeId>>,
    /// Members of these ID-token groups may approve or deny any held call;
    /// a task's initiator may always decide for their own task. A group
    /// counts only as asserted by its own issuer.
    pub approver_groups: Vec<ApproverGroup>,
}

/// A group whose members may decide held calls, and the one OIDC issuer
/// whose `groups` claim is believed for it: another trusted issuer (the
/// dev issuer beside a corporate one, say) naming the same group grants
/// nothing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApproverGroup {
    pub issuer: String,
    pub group: String,
}

impl std::fmt::Display for ApproverGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (of {})", self.group, self.issuer)
    }
}

impl Default for DelegationSettings {
    fn default() -> Self {
        Self {
            max_task_ttl: Duration::from_secs(24 * 3600),
            max_depth: 8,
            grant_ttl: Duration::from_secs(300),
            token_ttl: Duration::from_secs(900),
            purposes: BTreeSet::new(),
            tool_servers: BTreeMap::new(),
            approver_groups: Vec::new(),
        }
    }
}

/// The broker's delegation service.
#[derive(Debug)]
pub struct Delegation {
    broker: Arc<Broker>,
    tasks: Arc<dyn TaskStore>,
    /// The trusted OIDC issuers' keys; swapped whole when their JWKS files
    /// are read again (SIGHUP).
    oidc: ArcSwap<OidcVerifier>,
    dev_issuer: Option<DevIssuer>,
    /// Swapped whole on a reload (SIGHUP); a decision reads one snapshot.
    policy: ArcSwap<Engine>,
    /// Who may start a task, and lease a secret (swapped like `policy`).
    admission: ArcSwap<AdmissionPolicy>,
    audit: Arc<AuditLog>,
    tokens: TokenVerifier,
    settings: DelegationSettings,
    revoker: Arc<Revoker>,
    /// Held from a report's duplicate check until its id is recorded: two
    /// deliveries of one report at once (a retry racing a request still in
    /// flight) append one event, not two.
    reports: std::sync::Mutex<()>,
}

#[path = "approvals.rs"]
mod approvals;
pub(crate) use approvals::check_reason;

fn refuse(code: &'static str, message: impl Into<String>) -> BrokerError {
    BrokerError::Forbidden {
        code,
        message: message.into(),
    }
}

/// A report's clear-text fields stay small: a reporter cannot make the
/// audit log a copy of its traffic.
/// An `allow` report claims no more than its token grants: each scope it
/// says it used, and the call's risk within the task's ceiling. (A deny
/// report may name anything: it records a refusal.) Tokens recorded before
/// their grants were kept are not checked.
fn check_allowed_by(r: &ToolCallReport, token: &TokenRecord) -> Result<(), BrokerError> {
    let refused = |why: String| {
        refuse(
            "report_refused",
            format!("report {} of an allowed call: {why}", r.report_id),
        )
    };
    if let Some(ceiling) = token.risk_ceiling
        && r.risk > ceiling
    {
        return Err(refused(format!(
            "risk {} is over the task's ceiling {ceiling}",
            r.risk
        )));
    }
    if let Some(scope) = &token.scope {
        if r.scope_used.is_empty() {
            return Err(refused("it names no scope used".into()));
        }
        for used in &r.scope_used {
            let granted = baton_core::Permission::parse(used)
                .map(|p| scope.allows(&p))
                .unwrap_or(false);
            if !granted {
                return Err(refused(format!(
                    "scope {used:?} is not granted by token {}",
                    r.token_jti
                )));
            }
        }
    }
    Ok(())
}

fn check_recorded(
    field: &'static str,
    recorded: &std::collections::BTreeMap<String, String>,
) -> Result<(), BrokerError> {
    baton_core::report_bounds::check_recorded(field, recorded).map_err(out_of_bounds)
}

/// Bounds on every caller-chosen text of a tool-call report (shared with
/// the gateways, which refuse a call whose record would break them).
fn check_report_text(r: &ToolCallReport) -> Result<(), BrokerError> {
    r.check_bounds().map_err(out_of_bounds)
}

fn out_of_bounds(e: baton_core::report_bounds::OutOfBounds) -> BrokerError {
    bad(e.field, e.message)
}

fn bad(field: &'static str, message: impl Into<String>) -> BrokerError {
    BrokerError::BadRequest {
        field: Some(field),
        message: message.into(),
    }
}

/// A tool-call report [`Delegation::check_tool_call`] accepted, with its
/// audit event, not yet recorded.
#[derive(Debug)]
pub struct CheckedReport<'r> {
    report: &'r ToolCallReport,
    /// What the report is deduplicated by: its id within its reporter's
    /// ids ([`report_key`]).
    key: String,
    event: AuditEvent,
    approval: Option<ApprovalState>,
}

/// The datastore key of `reporter`'s report `report_id`. Report ids are
/// chosen by reporters, so each reporter has its own: a server that learns
/// another's report id cannot have that report taken for a duplicate of
/// its own (and dropped unlogged) by sending it first. A space never
/// occurs in a SPIFFE ID, so the key names one (reporter, id) pair.
fn report_key(reporter: &SpiffeId, report_id: &str) -> String {
    format!("{reporter} {report_id}")
}

fn audit_failed(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Hook(format!("audit log unavailable, refusing: {e}"))
}

impl Delegation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        broker: Arc<Broker>,
        tasks: Arc<dyn TaskStore>,
        oidc: OidcVerifier,
        dev_issuer: Option<DevIssuer>,
        policy: Arc<Engine>,
        admission: Arc<AdmissionPolicy>,
        audit: Arc<AuditLog>,
        tokens: TokenVerifier,
        settings: DelegationSettings,
        revoker: Arc<Revoker>,
    ) -> Self {
        Self {
            broker,
            tasks,
            oidc: ArcSwap::from_pointee(oidc),
            dev_issuer,
            policy: ArcSwap::new(policy),
            admission: ArcSwap::new(admission),
            audit,
            tokens,
            settings,
            revoker,
            reports: std::sync::Mutex::new(()),
        }
    }

    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    pub fn dev_issuer(&self) -> Option<&DevIssuer> {
        self.dev_issuer.as_ref()
    }

    /// The admission policy: who may start a task, and lease a secret.
    pub fn admission(&self) -> Arc<AdmissionPolicy> {
        self.admission.load_full()
    }

    /// Replaces the hop policy; decisions already running finish under the
    /// old one.
    pub fn replace_policy(&self, policy: Engine) {
        self.policy.store(Arc::new(policy));
    }

    /// Replaces the admission policy, as [`Delegation::replace_policy`].
    pub fn replace_admission(&self, admission: AdmissionPolicy) {
        self.admission.store(Arc::new(admission));
    }

    /// The trusted OIDC issuers and their keys, as in force now.
    pub fn oidc(&self) -> Arc<OidcVerifier> {
        self.oidc.load_full()
    }

    /// Replaces the trusted issuers' keys (their JWKS files read again):
    /// an ID token is checked against the new keys from the next request
    /// on, so a key the IdP withdrew starts nothing more.
    pub fn replace_oidc(&self, oidc: OidcVerifier) {
        self.oidc.store(Arc::new(oidc));
    }

    fn event(&self, kind: EventKind, task: &TaskId, now: u64) -> AuditEvent {
        AuditEvent::new(kind, now, task.clone())
    }

    /// Appends `event`, naming the trace of the request being served (its
    /// `traceparent`) unless the event names one already.
    fn append(&self, event: &AuditEvent) -> Result<Receipt, BrokerError> {
        crate::telemetry::record_event(event);
        crate::telemetry::timed_append(|| match crate::telemetry::current_trace_id() {
            Some(trace) if event.trace_id.is_none() => {
                let mut traced = event.clone();
                traced.trace_id = Some(trace);
                self.audit.append(&traced)
            }
            _ => self.audit.append(event),
        })
        .map_err(audit_failed)
    }

    fn task(&self, id: &TaskId) -> Result<TaskRecord, BrokerError> {
        self.tasks
            .get_task(id)?
            .ok_or_else(|| BrokerError::NotFound(format!("no task with id {id}")))
    }

    pub fn get_task(&self, raw: &str) -> Result<TaskRecord, BrokerError> {
        let id: TaskId = raw.parse().map_err(|e| bad("task_id", format!("{e}")))?;
        self.task(&id)
    }

    /// The credentials registered under a task (`baton task show`).
    pub fn task_credentials(
        &self,
        raw: &str,
    ) -> Result<Vec<crate::revocation::TaskCredential>, BrokerError> {
        let id: TaskId = raw.parse().map_err(|e| bad("task_id", format!("{e}")))?;
        self.task(&id)?;
        Ok(self.revoker.task_credentials(&id)?)
    }

    pub fn list_tasks(&self) -> Result<Vec<TaskRecord>, BrokerError> {
        Ok(self.tasks.list_tasks()?)
    }

    /// Stores a fresh grant and registers it in the credential registry in
    /// one transaction (under its task, minted from the holder's token, so
    /// that revoking the holder's subtree kills it), before it is handed
    /// out. Refused, with nothing written, when its parent or its task is
    /// revoked meanwhile.
    fn new_grant(&self, g: GrantRecord, now: u64) -> Result<HandoffGrant, BrokerError> {
        let secret = format!("bg_{}", random_hex::<32>()?);
        let digest = token_digest(&secret);
        let registration = CredentialRecord {
            id: digest.clone(),
            kind: CredKind::Grant,
            task: Some(g.task_id.clone()),
            agent: Some(g.target.clone()),
            node: None,
            parent: g.parent.as_ref().map(|p| p.jti.clone()),
            expires_at: g.expires_at,
        };
        self.tasks
            .insert_grant(&digest, &g, &registration, now)?
            .map_err(|message| BrokerError::Forbidden {
                code: "revoked",
                message,
            })?;
        Ok(HandoffGrant {
            grant: Secret::new(secret),
            task_id: g.task_id,
            target: g.target,
            expires_at: g.expires_at,
        })
    }
}

/// What [`Delegation::beside`] gives back: the audit append's result and
/// the datastore step's, each for the caller to act on.
type Both<T> = (Result<Receipt, BrokerError>, Result<T, BrokerError>);

impl Delegation {
    /// Runs `store` (a datastore commit) on a scoped thread while this
    /// thread appends `ev` to the audit log: the two durable writes, each
    /// ending in a sync, overlap instead of adding up. The append stays on
    /// the request's thread, which carries its trace context. Nothing is
    /// decided here: the caller acts on both results. Refused, with neither
    /// done, if no thread can be started.
    fn beside<T: Send>(
        &self,
        ev: &AuditEvent,
        store: impl FnOnce() -> Result<T, BrokerError> + Send,
    ) -> Result<Both<T>, BrokerError> {
        std::thread::scope(|s| {
            let handle = std::thread::Builder::new()
                .name("baton-store".into())
                .spawn_scoped(s, store)
                .map_err(|e| BrokerError::Hook(format!("cannot start a datastore thread: {e}")))?;
            let logged = self.append(ev);
            let stored = handle
                .join()
                .unwrap_or_else(|_| Err(BrokerError::Hook("the datastore thread panicked".into())));
            Ok((logged, stored))
        })
    }

    /// Starts a task for the human whose ID token is presented.
    pub(crate) fn start_task(
        &self,
        req: &StartTaskRequest,
        now: SystemTime,
    ) -> Result<StartTaskResponse, BrokerError> {
        let now = unix(now);
        let initiator = self
            .oidc
            .load()
            .verify(req.id_token.expose(), now)
            .map_err(|e| {
                BrokerError::Unauthenticated(format!("initiating identity refused: {e}"))
            })?;
        let td = self.broker.trust_domain();
        if !req.root_agent.is_member_of(td) || crate::service::is_infrastructure_id(&req.root_agent)
        {
            return Err(bad(
                "root_agent",
                format!(
                    "root_agent {} is not a workload of trust domain {td} (the trust domain's ID and /baton/... are reserved)",
                    req.root_agent
                ),
            ));
        }
        if !self.settings.purposes.contains(&req.purpose) {
            return Err(bad(
                "purpose",
                format!(
                    "purpose {} is not in the declared catalogue ({})",
                    req.purpose,
                    self.settings
                        .purposes
                        .iter()
                        .map(Purpose::as_str)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        let max_ttl = self.settings.max_task_ttl.as_secs();
        if req.ttl_secs == 0 || req.ttl_secs > max_ttl {
            return Err(bad("ttl_secs", format!("ttl_secs must be 1..={max_ttl}")));
        }
        if req.max_depth > self.settings.max_depth {
            return Err(bad(
                "max_depth",
                format!("max_depth must be at most {}", self.settings.max_depth),
            ));
        }
        if let Some(why) = audience_problem(&req.audience) {
            return Err(bad("audience", why));
        }
        self.broker.refuse_blocked(&req.root_agent, now)?;
        // An ID token starts one task, or is refused once: a captured token
        // cannot start another, and a refused one cannot be replayed to
        // probe the admission policy or fill the log with refusals.
        if !self
            .tasks
            .use_id_token(&initiator.replay_key, initiator.replay_until(), now)?
        {
            return Err(BrokerError::Unauthenticated(
                "initiating identity refused: this ID token was already presented for a task start (ID tokens are single use)".into(),
            ));
        }
        // Cedar decides who may start what; the task is built from what it
        // admitted, nothing else.
        let admitted = crate::admission::admit_task_start(
            &self.admission(),
            |ev| self.append_event(ev).map(drop),
            &initiator,
            req,
            now,
        )?;
        let req = admitted.request();
        let id = TaskId::from_random(random_bytes::<16>()?);
        let task = TaskRecord {
            id: id.clone(),
            initiator: req.human.subject.clone(),
            initiator_iss: req.human.issuer.clone(),
            root_agent: req.root_agent.clone(),
            purpose: req.purpose.clone(),
            scope: req.scope.clone(),
            risk_ceiling: req.risk_ceiling,
            max_depth: req.max_depth,
            created_at: now,
            expires_at: now.saturating_add(req.ttl_secs),
            ended_at: None,
            purpose_epoch: 0,
            audiences: Some(req.audiences.clone()),
        };
        let mut ev = self.event(EventKind::TaskStarted, &id, now);
        ev.initiator = Some(req.human.subject.clone());
        // The root agent is the first actor of the task's tree.
        ev.actor = Some(req.root_agent.clone());
        ev.target = Some(req.root_agent.clone());
        ev.purpose = Some(req.purpose.clone());
        ev.scope = Some(req.scope.clone());
        ev.risk = Some(req.risk_ceiling);
        ev.depth = Some(0);
        ev.policy_ids = admitted.policy_ids().to_vec();
        // Fail closed: nothing is stored or granted unless the start is logged.
        self.append(&ev)?;
        self.tasks.insert_task(&task)?;
        let grant = self.new_grant(self.root_grant(&task, req.audiences.clone(), now), now)?;
        tracing::info!(task = %id, root_agent = %req.root_agent, purpose = %req.purpose, "task started");
        Ok(StartTaskResponse {
            task_id: id,
            expires_at: task.expires_at,
            grant,
        })
    }

    /// A hop: the holder of `token`, connected with `peer`, hands part of
    /// its task to `req.target`.
    pub(crate) fn delegate(
        &self,
        peer: &PeerCert,
        req: &DelegateRequest,
        now: SystemTime,
    ) -> Result<HandoffGrant, BrokerError> {
        let now = unix(now);
        let held = match self.verify_holder(peer, &req.token, now) {
            Ok(h) => h,
            Err(e) => {
                baton_ops::metrics().hop_refused(e.code());
                self.log_refused_holder(peer, req, &e, now);
                return Err(e);
            }
        };
        let claims = held.claims();
        let task = self.task(&claims.task.id)?;
        let new_depth = claims.depth + 1;
        let mut ev = self.event(EventKind::HopRefused, &task.id, now);
        ev.actor = Some(peer.spiffe_id().clone());
        ev.target = Some(req.target.clone());
        ev.purpose = Some(req.purpose.clone());
        ev.scope = Some(req.scope.first(MAX_REFUSED_PERMISSIONS));
        ev.depth = Some(new_depth);
        ev.parent_jti = Some(claims.jti.clone());
        // A refusal records at most the start of what the caller wrote
        // (the length check is one of the refusals); a granted hop all of it.
        ev.justification = Some(truncated(&req.justification, MAX_REFUSED_TEXT));

        let refusal = self.hop_refusal(&task, &held, req, new_depth, now);
        let refusal = match refusal {
            Some(r) => Some(r),
            None => {
                let chain = held.chain();
                let decision = self.policy.load().authorize_hop(&HopRequest {
                    from: peer.spiffe_id(),
                    to: &req.target,
                    chain,
                    initiator: &task.initiator,
                    purpose: &req.purpose,
                    scope: &req.scope,
                    depth: new_depth,
                    risk_ceiling: task.risk_ceiling,
                });
                ev.policy_ids = decision.policy_ids.clone();
                if decision.allowed {
                    None
                } else {
                    Some((
                        "policy_denied",
                        format!(
                            "policy denied the hop (policies: {}){}",
                            if decision.policy_ids.is_empty() {
                                "none permit it".to_owned()
                            } else {
                                decision.policy_ids.join(", ")
                            },
                            if decision.errors.is_empty() {
                                String::new()
                            } else {
                                format!("; errors: {}", decision.errors.join("; "))
                            }
                        ),
                    ))
                }
            }
        };
        if let Some((code, reason)) = refusal {
            ev.decision = Some("refused".into());
            ev.reason = Some(format!("{code}: {reason}"));
            self.append(&ev)?;
            baton_ops::metrics().hop_refused(code);
            tracing::warn!(task = %task.id, from = %peer.spiffe_id(), to = %req.target, %code, %reason, "hop refused");
            return Err(refuse(code, reason));
        }
        ev.kind = EventKind::HopGranted;
        ev.decision = Some("granted".into());
        ev.justification = Some(req.justification.clone());
        // Granted: within the holder's scope, recorded whole.
        ev.scope = Some(req.scope.clone());
        let exp_cap = claims.exp.min(task.expires_at);
        let record = GrantRecord {
            task_id: task.id.clone(),
            target: req.target.clone(),
            scope: req.scope.clone(),
            purpose: req.purpose.clone(),
            purpose_epoch: task.purpose_epoch,
            audience: req.audience.clone(),
            depth: new_depth,
            parent: Some(ParentRef {
                jti: claims.jti.clone(),
                hash: baton_ca::delegation::token_hash(req.token.expose()),
            }),
            parent_act: Some(claims.act.clone()),
            justification: Some(req.justification.clone()),
            exp_cap: exp_cap
                .min(now.saturating_add(req.ttl_secs.unwrap_or(self.settings.token_ttl.as_secs()))),
            expires_at: (now + self.settings.grant_ttl.as_secs()).min(exp_cap),
            created_by: Some(peer.spiffe_id().clone()),
        };
        // The granted record and the grant are written at once (each is
        // a commit and a sync); the grant leaves only once both are.
        let (logged, grant) = self.beside(&ev, || self.new_grant(record, now))?;
        if let Err(e) = logged {
            // Stored but never delivered: nobody holds its secret, and it
            // expires with the grant TTL.
            if grant.is_ok() {
                tracing::warn!(task = %task.id, "a hop's grant was stored but not delivered: its audit record failed");
            }
            return Err(e);
        }
        let grant = match grant {
            Ok(g) => g,
            Err(e) => {
                // Granted by every check, then refused where the grant is
                // stored (its parent or task revoked meanwhile): the trace
                // says so after the granted record, so it shows no grant.
                if let BrokerError::Forbidden { code, message } = &e {
                    ev.kind = EventKind::HopRefused;
                    ev.decision = Some("refused".into());
                    ev.reason = Some(format!("{code}: {message}"));
                    if let Err(a) = self.append(&ev) {
                        tracing::error!(error = %a, "could not record a hop refused where its grant is stored");
                    }
                    baton_ops::metrics().hop_refused(code);
                }
                return Err(e);
            }
        };
        baton_ops::metrics().hop_granted();
        tracing::info!(task = %task.id, from = %peer.spiffe_id(), to = %req.target, depth = new_depth, "hop granted");
        Ok(grant)
    }

    /// Verifies the token a holder presents over mTLS with `peer`: signature,
    /// binding to the peer's certificate, the broker's durable revocation
    /// check, and the broker's own record of having minted it for this task
    /// and this holder. Shared by hops and secret leases.
    pub fn verify_holder(
        &self,
        peer: &PeerCert,
        token: &Secret,
        now: u64,
    ) -> Result<VerifiedDelegation, BrokerError> {
        let held = self
            .tokens
            .verify(token.expose(), peer, now)
            .map_err(|e| match e {
                // The certificate, not the token: as the durable check
                // below names it.
                baton_verify::TokenError::CertificateRevoked { .. } => refuse(
                    "certificate_revoked",
                    format!("delegation token refused: {e}"),
                ),
                e => refuse("token_refused", format!("delegation token refused: {e}")),
            })?;
        let claims = held.claims();
        // The broker minted every valid token and recorded it: a token it
        // has no record of, or recorded under another task, is refused
        // (chain splicing across tasks cannot pass this).
        match self.tasks.get_token(&claims.jti)? {
            Some(t) if t.task_id == claims.task.id && t.spiffe_id == *peer.spiffe_id() => {}
            _ => {
                return Err(refuse(
                    "token_unknown",
                    format!(
                        "token {} is not one this broker minted for task {}",
                        claims.jti, claims.task.id
                    ),
                ));
            }
        }
        // The certificate itself may have been revoked (`baton revoke
        // credential <serial>`), apart from its token. Fail closed.
        if self
            .revoker
            .durably_revoked(peer.serial_hex(), now)
            .unwrap_or(true)
        {
            return Err(refuse(
                "certificate_revoked",
                format!(
                    "the task certificate (serial {}) presented with token {} is revoked",
                    peer.serial_hex(),
                    claims.jti
                ),
            ));
        }
        self.check_chain_records(claims)?;
        self.broker.refuse_blocked(peer.spiffe_id(), now)?;
        Ok(held)
    }

    /// Every link of the token's `act` chain must be a token this broker
    /// minted in this task, for that actor, at that depth, from the next
    /// link: a chain spliced from another task's (or invented) links is
    /// refused even when the outermost link is genuine.
    fn check_chain_records(&self, claims: &DelegationClaims) -> Result<(), BrokerError> {
        let chain = claims.act.chain();
        for (i, actor) in chain.iter().enumerate() {
            let delegator = chain.get(i + 1).map(|a| a.jti.as_str());
            let depth = usize::try_from(claims.depth)
                .ok()
                .and_then(|d| d.checked_sub(i));
            let ok = match self.tasks.get_token(&actor.jti)? {
                Some(t) => {
                    t.task_id == claims.task.id
                        && t.spiffe_id == actor.sub
                        && t.parent_jti.as_deref() == delegator
                        && usize::try_from(t.depth).ok() == depth
                }
                None => false,
            };
            if !ok {
                return Err(refuse(
                    "chain_unknown",
                    format!(
                        "link {i} of the token's actor chain ({} holding {}) is not a token this broker minted in task {} from {}",
                        actor.sub,
                        actor.jti,
                        claims.task.id,
                        delegator.unwrap_or("the task's start")
                    ),
                ));
            }
        }
        Ok(())
    }

    /// A hop refused because the holder's token or certificate was: logged
    /// under the task the token names when the broker signed that token
    /// (someone presented a real token of the task: a stolen or revoked
    /// one, or with another certificate). A forged token is only logged by
    /// the process: its claims name whatever task the forger likes.
    fn log_refused_holder(
        &self,
        peer: &PeerCert,
        req: &DelegateRequest,
        e: &BrokerError,
        now: u64,
    ) {
        let signed = self.tokens.signed_task_unbound(req.token.expose(), now);
        let Some(task) = signed.and_then(|t| self.tasks.get_task(&t).ok().flatten()) else {
            tracing::warn!(from = %peer.spiffe_id(), to = %req.target, error = %e, "hop refused: holder's token refused (not one this broker signed)");
            return;
        };
        let mut ev = self.event(EventKind::HopRefused, &task.id, now);
        ev.actor = Some(peer.spiffe_id().clone());
        ev.target = Some(req.target.clone());
        ev.purpose = Some(req.purpose.clone());
        ev.scope = Some(req.scope.first(MAX_REFUSED_PERMISSIONS));
        ev.justification = Some(truncated(&req.justification, MAX_REFUSED_TEXT));
        ev.decision = Some("refused".into());
        ev.reason = Some(format!(
            "{}: {} (a token this broker signed, refused for its holder)",
            e.code(),
            e
        ));
        if let Err(err) = self.append(&ev) {
            tracing::error!(task = %task.id, error = %err, "cannot log a refused hop");
        }
        tracing::warn!(task = %task.id, from = %peer.spiffe_id(), to = %req.target, error = %e, "hop refused: holder's token refused");
    }

    /// Whether credential `id` is revoked in the shared ledger, itself or
    /// with its task (any broker's revocation counts).
    pub fn credential_revoked(&self, id: &str, now: u64) -> Result<bool, BrokerError> {
        Ok(self.revoker.durably_revoked(id, now)?)
    }

    /// Appends an event to the audit log; an error means it was not logged
    /// (callers refuse what they were about to do).
    pub fn append_event(&self, event: &AuditEvent) -> Result<Receipt, BrokerError> {
        self.append(event)
    }

    fn hop_refusal(
        &self,
        task: &TaskRecord,
        held: &VerifiedDelegation,
        req: &DelegateRequest,
        new_depth: u32,
        now: u64,
    ) -> Option<(&'static str, String)> {
        let claims = held.claims();
        if let Some(why) = task.unusable(now) {
            return Some(("task_ended", why.to_owned()));
        }
        if req.purpose != claims.task.purpose || req.purpose != task.purpose {
            return Some((
                "purpose_changed",
                format!(
                    "a hop must keep the task's purpose {} (token: {}); asked for {}",
                    task.purpose, claims.task.purpose, req.purpose
                ),
            ));
        }
        if let Some(why) = audience_problem(&req.audience) {
            return Some(("invalid_argument", why));
        }
        let widened: Vec<&str> = req
            .audience
            .iter()
            .filter(|a| !claims.aud.contains(a))
            .map(String::as_str)
            .collect();
        if !widened.is_empty() {
            return Some((
                "audience_widened",
                format!(
                    "requested audience is not a subset of the holder's ({}): {} not held",
                    claims.aud.join(", "),
                    truncated(&widened.join(", "), MAX_REFUSED_TEXT)
                ),
            ));
        }
        if !req.scope.is_subset_of(&claims.scope) {
            let extra: Vec<String> = req
                .scope
                .not_covered_by(&claims.scope)
                .iter()
                .map(ToString::to_string)
                .collect();
            return Some((
                "scope_widened",
                format!(
                    "requested scope is not a subset of the holder's: {} not held",
                    truncated(&extra.join(", "), MAX_REFUSED_TEXT)
                ),
            ));
        }
        if new_depth > task.max_depth {
            return Some((
                "depth_exceeded",
                format!(
                    "hop would reach depth {new_depth}; the task allows {}",
                    task.max_depth
                ),
            ));
        }
        if let Some(ttl) = req.ttl_secs {
            match now.checked_add(ttl) {
                _ if ttl == 0 => {
                    return Some(("invalid_argument", "ttl_secs must be at least 1".into()));
                }
                None => {
                    return Some((
                        "invalid_argument",
                        format!("ttl_secs {ttl} is out of range"),
                    ));
                }
                Some(end) if end > claims.exp => {
                    return Some((
                        "outlives_parent",
                        format!(
                            "requested lifetime ends at {end}, after the holder's token ({})",
                            claims.exp
                        ),
                    ));
                }
                Some(_) => {}
            }
        }
        if req.justification.trim().is_empty() {
            return Some(("invalid_argument", "justification is required".into()));
        }
        if req.justification.len() > MAX_JUSTIFICATION {
            return Some((
                "invalid_argument",
                format!(
                    "justification is {} bytes; at most {MAX_JUSTIFICATION} are recorded",
                    req.justification.len()
                ),
            ));
        }
        if !req.target.is_member_of(self.broker.trust_domain()) {
            return Some((
                "wrong_trust_domain",
                format!(
                    "target {} is outside trust domain {}",
                    req.target,
                    self.broker.trust_domain()
                ),
            ));
        }
        if crate::service::is_infrastructure_id(&req.target) {
            return Some((
                "reserved_id",
                format!(
                    "target {} is reserved for the trust domain, the broker and the nodes; hops go to workloads",
                    req.target
                ),
            ));
        }
        if let Err(e) = self.broker.refuse_blocked(&req.target, now) {
            return Some(("agent_blocked", e.to_string()));
        }
        None
    }

    /// Redeems a grant for a workload that `node` attested as `req.spiffe_id`.
    ///
    /// Returns the credential and what must be registered with the
    /// revocation store before it is handed out.
    pub(crate) fn redeem(
        &self,
        node: &AuthenticatedNode,
        req: &RedeemRequest,
        now: SystemTime,
    ) -> Result<Minted, BrokerError> {
        let now_s = unix(now);
        // The node may speak only for workloads it serves.
        let entitled = self
            .broker
            .store()
            .list_entries_by_parent(node.id())?
            .iter()
            .any(|e| e.spiffe_id == req.spiffe_id);
        if !entitled {
            return Err(refuse(
                "not_entitled",
                format!("node {} does not serve {}", node.id(), req.spiffe_id),
            ));
        }
        let d = token_digest(req.grant.expose());
        // Look before burning: a redeem by the wrong workload must not
        // destroy the grant for the right one.
        let Some((grant, used)) = self.tasks.get_grant(&d)? else {
            return Err(refuse("grant_unknown", "grant is unknown"));
        };
        // Fail closed: an unreadable revocation table counts as revoked.
        if self.revoker.durably_revoked(&d, now_s).unwrap_or(true) {
            let mut ev = self.event(EventKind::Redeemed, &grant.task_id, now_s);
            ev.actor = Some(req.spiffe_id.clone());
            ev.target = Some(grant.target.clone());
            ev.decision = Some("refused".into());
            ev.reason = Some("grant_revoked: the grant was revoked".into());
            self.append(&ev)?;
            return Err(refuse("grant_revoked", "the grant was revoked"));
        }
        let mut ev = self.event(EventKind::Redeemed, &grant.task_id, now_s);
        ev.actor = Some(req.spiffe_id.clone());
        ev.target = Some(grant.target.clone());
        ev.depth = Some(grant.depth);
        ev.scope = Some(grant.scope.clone());
        ev.purpose = Some(grant.purpose.clone());
        let task = self.task(&grant.task_id)?;
        let refusal = if grant.target != req.spiffe_id {
            Some((
                "wrong_target",
                format!(
                    "grant is bound to {}, not to {}",
                    grant.target, req.spiffe_id
                ),
            ))
        } else if let Err(e) = self.broker.refuse_blocked(&req.spiffe_id, now_s) {
            Some(("agent_blocked", e.to_string()))
        } else if let Some(why) = task.unusable(now_s) {
            Some(("task_ended", why.to_owned()))
        } else if grant.purpose_epoch != task.purpose_epoch {
            Some((
                "purpose_changed",
                "the task's purpose changed after this grant was issued".to_owned(),
            ))
        } else if used.is_some() {
            Some(("grant_used", "grant was already redeemed".into()))
        } else if now_s >= grant.expires_at {
            Some(("grant_expired", "grant has expired".into()))
        } else {
            None
        };
        if let Some((code, reason)) = refusal {
            if code == "grant_used"
                && let Some(again) =
                    self.redeliver(node, req, (&d, used), &grant, ev.clone(), now_s)?
            {
                return Ok(again);
            }
            ev.decision = Some("refused".into());
            ev.reason = Some(format!("{code}: {reason}"));
            self.append(&ev)?;
            tracing::warn!(task = %task.id, spiffe_id = %req.spiffe_id, %code, %reason, "redeem refused");
            return Err(refuse(code, reason));
        }

        let exp = grant.exp_cap.min(task.expires_at);
        if exp <= now_s {
            return Err(refuse(
                "grant_expired",
                "the task credential would already be expired",
            ));
        }
        let issued = self
            .broker
            .ca()
            .sign_x509_svid(
                &req.csr_der,
                &req.spiffe_id,
                Duration::from_secs(exp - now_s),
                &[],
                now,
            )
            .map_err(|e| bad("csr_der", format!("cannot sign this CSR: {e}")))?;
        let leaf = issued
            .cert_chain_der
            .first()
            .ok_or_else(|| BrokerError::Hook("CA returned an empty chain".into()))?;
        let exp = exp.min(unix(issued.not_after));
        let jti = random_hex::<16>()?;
        let act = Actor {
            sub: req.spiffe_id.clone(),
            jti: jti.clone(),
            scope: grant.scope.clone(),
            exp,
            aud: grant.audience.clone(),
            act: grant.parent_act.clone().map(Box::new),
        };
        let claims = DelegationClaims {
            iss: self.broker.broker_id()?.to_string(),
            sub: task.initiator.clone(),
            aud: grant.audience.clone(),
            exp,
            iat: now_s,
            jti: jti.clone(),
            act,
            task: TaskClaims {
                id: task.id.clone(),
                purpose: task.purpose.clone(),
                risk_ceiling: task.risk_ceiling,
                max_depth: task.max_depth,
                initiator_iss: task.initiator_iss.clone(),
            },
            scope: grant.scope.clone(),
            depth: grant.depth,
            parent: grant.parent.clone(),
            justification: grant.justification.clone(),
            cnf: Confirmation {
                x5t_s256: baton_ca::delegation::cert_thumbprint(leaf),
            },
        };
        let token = self.broker.ca().sign_delegation_token(&claims)?;
        let parent_jti = grant.parent.as_ref().map(|p| p.jti.clone());
        let records = vec![
            CredentialRecord {
                id: jti.clone(),
                kind: CredKind::Token,
                task: Some(task.id.clone()),
                agent: Some(req.spiffe_id.clone()),
                node: Some(node.id().clone()),
                parent: parent_jti.clone(),
                expires_at: exp,
            },
            // The certificate hangs under its token: revoking the token's
            // subtree revokes the certificate too.
            CredentialRecord {
                id: issued.serial_hex.clone(),
                kind: CredKind::X509Svid,
                task: Some(task.id.clone()),
                agent: Some(req.spiffe_id.clone()),
                node: Some(node.id().clone()),
                parent: Some(jti.clone()),
                expires_at: exp,
            },
        ];
        let token_record = TokenRecord {
            jti: jti.clone(),
            task_id: task.id.clone(),
            spiffe_id: req.spiffe_id.clone(),
            depth: grant.depth,
            parent_jti: parent_jti.clone(),
            exp,
            cert_thumbprint: claims.cnf.x5t_s256.clone(),
            cert_serial: issued.serial_hex.clone(),
            aud: grant.audience.clone(),
            scope: Some(claims.scope.clone()),
            risk_ceiling: Some(claims.task.risk_ceiling),
        };
        let credential = TaskCredential {
            task_id: task.id.clone(),
            spiffe_id: req.spiffe_id.clone(),
            cert_chain_der: issued.cert_chain_der,
            token,
            expires_at: exp,
        };
        let delivery = GrantDelivery {
            node: node.id().to_string(),
            request: request_digest(&req.csr_der),
            jti: jti.clone(),
            cert_serial: issued.serial_hex.clone(),
            authority_id: issued.authority_id.clone(),
            credential,
        };
        // One transaction: the grant is consumed (what it delivered kept
        // with it), the token recorded and the credentials registered
        // together, or none of it (a store failure leaves the grant
        // redeemable).
        let refusal = match self
            .tasks
            .redeem_grant(&d, now_s, &token_record, &records, &delivery)
        {
            Ok(Ok(())) => None,
            Ok(Err(RedeemRefusal::Grant(GrantRefusal::Used))) => {
                // A racing copy of this very request won at another
                // broker: its credential, not a second one.
                if let Some(again) =
                    self.redeliver(node, req, (&d, None), &grant, ev.clone(), now_s)?
                {
                    return Ok(again);
                }
                Some(("grant_used", "grant was already redeemed".to_owned()))
            }
            Ok(Err(RedeemRefusal::Grant(GrantRefusal::Expired))) => {
                Some(("grant_expired", "grant has expired".to_owned()))
            }
            Ok(Err(RedeemRefusal::Grant(GrantRefusal::Unknown))) => {
                Some(("grant_unknown", "grant is unknown".to_owned()))
            }
            Ok(Err(RedeemRefusal::Revoked(why))) => Some(("revoked", why)),
            Ok(Err(RedeemRefusal::Task(code, why))) => Some((code, why)),
            Err(e) => {
                ev.decision = Some("refused".into());
                ev.reason = Some(
                    "store_unavailable: the credential could not be recorded; the grant stays redeemable"
                        .into(),
                );
                if let Err(a) = self.append(&ev) {
                    tracing::error!(error = %a, "audit append failed after a store failure");
                }
                return Err(BrokerError::Store(e));
            }
        };
        if let Some((code, reason)) = refusal {
            ev.decision = Some("refused".into());
            ev.reason = Some(format!("{code}: {reason}"));
            self.append(&ev)?;
            baton_ops::metrics().redeem("refused");
            return Err(refuse(code, reason));
        }
        ev.decision = Some("granted".into());
        ev.token_jti = Some(jti.clone());
        ev.parent_jti = parent_jti;
        if let Err(e) = self.append(&ev) {
            // Not delivered without its audit record: undo the redeem.
            if let Err(undo) = self.tasks.release_grant(&d, &records, now_s) {
                tracing::error!(error = %undo, "could not release a grant after an audit failure");
            }
            return Err(e);
        }
        // Tracked for re-issue only once delivered (a copy that lost a race
        // signed a certificate nobody holds).
        self.broker.rotation().issued(
            crate::rotation::SlotKind::Task,
            &issued.serial_hex,
            &delivery.authority_id,
            exp,
        );
        self.record_task_svid(node, &req.spiffe_id, &issued.serial_hex, exp)?;
        baton_ops::metrics().redeem("granted");
        baton_ops::metrics().issued("token", "task");
        tracing::info!(task = %task.id, spiffe_id = %req.spiffe_id, depth = grant.depth, "grant redeemed");
        // Registered in the transaction above.
        let records = Vec::new();
        Ok(Minted {
            credential: delivery.credential,
            records,
            superseded: Vec::new(),
            rebound: None,
        })
    }

    /// The redeem of a used grant that is the very request that used it
    /// (same node, same workload, same CSR), replayed because its answer
    /// was lost (the broker that committed it died before answering, or a
    /// copy raced it at another broker): the credential delivered then,
    /// again, with an audit record of its own, so that no delivery goes
    /// unrecorded even when the first one's record was never written.
    ///
    /// `None` (the caller refuses `grant_used`) for anything else: another
    /// node, workload or key; a replay more than [`REDELIVER_FOR`] after the
    /// grant was used; a stored credential that would not pass as its
    /// holder's now (token signature and binding, records, revocation of
    /// token or certificate, agent blocked) or whose authority is tainted
    /// or gone; a delivery released meanwhile; or any error reading it.
    /// `used` is the grant's digest and when it was used (None: just now,
    /// by a copy that won the race).
    fn redeliver(
        &self,
        node: &AuthenticatedNode,
        req: &RedeemRequest,
        (digest, used_at): (&str, Option<u64>),
        grant: &GrantRecord,
        mut ev: AuditEvent,
        now_s: u64,
    ) -> Result<Option<Minted>, BrokerError> {
        let kept = match self.tasks.grant_delivery(digest) {
            Ok(Some(kept)) => kept,
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "the delivery of a used grant could not be read; refused as used");
                return Ok(None);
            }
        };
        let same_request = kept.node == node.id().to_string()
            && kept.credential.spiffe_id == req.spiffe_id
            && kept.request == request_digest(&req.csr_der);
        let in_time = used_at.is_none_or(|u| now_s < u.saturating_add(REDELIVER_FOR.as_secs()));
        if !same_request || !in_time || now_s >= kept.credential.expires_at {
            return Ok(None);
        }
        if let Err(why) = self.still_deliverable(&kept, now_s) {
            tracing::warn!(task = %grant.task_id, jti = %kept.jti, %why, "a replayed redeem was not answered with its earlier credential");
            return Ok(None);
        }
        // Claimed before the record: a broker whose first delivery's
        // record failed no longer releases the grant (and revokes what is
        // delivered here).
        match self.tasks.mark_redelivered(digest, &kept.jti, now_s) {
            Ok(true) => {}
            Ok(false) => return Ok(None),
            Err(e) => {
                tracing::warn!(error = %e, "a redelivery could not be marked; refused as used");
                return Ok(None);
            }
        }
        ev.decision = Some("granted".into());
        ev.reason = Some("redelivered: the same request again, its first answer lost".into());
        ev.token_jti = Some(kept.jti.clone());
        ev.parent_jti = grant.parent.as_ref().map(|p| p.jti.clone());
        self.append(&ev)?;
        self.broker.rotation().issued(
            crate::rotation::SlotKind::Task,
            &kept.cert_serial,
            &kept.authority_id,
            kept.credential.expires_at,
        );
        baton_ops::metrics().redeem("redelivered");
        tracing::info!(task = %grant.task_id, spiffe_id = %req.spiffe_id, jti = %kept.jti, "grant redelivered to the same request");
        Ok(Some(Minted {
            credential: kept.credential,
            records: Vec::new(),
            superseded: Vec::new(),
            rebound: None,
        }))
    }

    /// Whether a stored delivery would still pass as its holder's now: its
    /// leaf is the recorded one, under an authority still trusted and not
    /// tainted, and its token verifies bound to that leaf (signature by a
    /// key in force, the broker's records, token and certificate not
    /// revoked, agent not blocked).
    fn still_deliverable(&self, kept: &GrantDelivery, now_s: u64) -> Result<(), String> {
        let chain = &kept.credential.cert_chain_der;
        let info = baton_ca::leaf_info(chain).map_err(|e| format!("stored leaf: {e}"))?;
        if info.serial_hex != kept.cert_serial
            || info.authority_id.as_deref() != Some(kept.authority_id.as_str())
            || info.spiffe_id != kept.credential.spiffe_id
        {
            return Err("the stored certificate is not the one recorded".into());
        }
        let authority = self
            .broker
            .ca()
            .authorities()
            .into_iter()
            .find(|a| a.id == kept.authority_id);
        match authority {
            Some(a)
                if !a.tainted
                    && matches!(
                        a.state,
                        baton_ca::AuthorityState::Active | baton_ca::AuthorityState::Old
                    ) => {}
            _ => {
                return Err(format!(
                    "authority {} is tainted or gone",
                    kept.authority_id
                ));
            }
        }
        // Fail closed: an unreadable revocation table counts as revoked.
        for id in [&kept.jti, &kept.cert_serial] {
            if self.revoker.durably_revoked(id, now_s).unwrap_or(true) {
                return Err(format!("{id} is revoked"));
            }
        }
        let leaf = chain.first().cloned().unwrap_or_default();
        let peer = PeerCert::from_verified_leaf(leaf).map_err(|e| e.to_string())?;
        let held = self
            .verify_holder(&peer, &kept.credential.token, now_s)
            .map_err(|e| e.to_string())?;
        if held.claims().jti != kept.jti {
            return Err("the stored token is not the one recorded".into());
        }
        Ok(())
    }

    /// Re-issues a task credential under the CA's active keys (after a
    /// taint). The holder must prove it has the current credential:
    /// the presented leaf chains to an authority the broker still trusts,
    /// is not revoked, is the one the token is bound to, and `proof` is a
    /// fresh signature by the leaf's private key over the token's digest
    /// (`baton_ca::possession`). The token's claims are re-checked against
    /// the broker's records (chain, task alive, same purpose), the node
    /// must serve the holder's SPIFFE ID, and the renewal is audited,
    /// refusals included. The new token keeps the claims, `jti` and expiry
    /// (never longer); the old certificate is returned to be revoked before
    /// the new one leaves.
    pub(crate) fn renew(
        &self,
        node: &AuthenticatedNode,
        req: &RenewTaskRequest,
        now: SystemTime,
    ) -> Result<Minted, BrokerError> {
        let now_s = unix(now);
        let peer = PeerCert::from_verified_leaf(req.leaf_der.clone())
            .map_err(|e| bad("leaf_der", format!("leaf_der: {e}")))?;
        if peer.spiffe_id() != &req.spiffe_id {
            return Err(refuse(
                "wrong_holder",
                format!(
                    "the certificate names {}, the caller is {}",
                    peer.spiffe_id(),
                    req.spiffe_id
                ),
            ));
        }
        let served = self
            .broker
            .store()
            .list_entries_by_parent(node.id())?
            .iter()
            .any(|e| e.spiffe_id == req.spiffe_id);
        if !served {
            return Err(BrokerError::Forbidden {
                code: "not_entitled",
                message: format!(
                    "node {} serves no entry for {}; renew through the holder's own node",
                    node.id(),
                    req.spiffe_id
                ),
            });
        }
        let held = self.verify_holder(&peer, &req.token, now_s)?;
        let task = self.task(held.task_id())?;
        let mut ev = self.event(EventKind::Redeemed, &task.id, now_s);
        ev.actor = Some(req.spiffe_id.clone());
        ev.target = Some(req.spiffe_id.clone());
        ev.token_jti = Some(held.jti().to_owned());
        let refusal = self.renew_refusal(&task, &held, &peer, req, now, now_s);
        if let Some((code, reason)) = refusal {
            ev.decision = Some("refused".into());
            ev.reason = Some(format!("renewal {code}: {reason}"));
            self.append(&ev)?;
            tracing::warn!(task = %task.id, spiffe_id = %req.spiffe_id, %code, %reason, "renewal refused");
            return Err(refuse(code, reason));
        }
        let mut claims = held.claims().clone();
        let issued = self
            .broker
            .ca()
            .sign_x509_svid(
                &req.csr_der,
                &req.spiffe_id,
                Duration::from_secs(claims.exp - now_s),
                &[],
                now,
            )
            .map_err(|e| bad("csr_der", format!("cannot sign this CSR: {e}")))?;
        let leaf = issued
            .cert_chain_der
            .first()
            .ok_or_else(|| BrokerError::Hook("CA returned an empty chain".into()))?;
        // Never longer than before; shorter only if the authority ends first.
        let exp = claims.exp.min(unix(issued.not_after));
        claims.exp = exp;
        claims.act.exp = exp;
        claims.iat = now_s;
        claims.cnf = Confirmation {
            x5t_s256: baton_ca::delegation::cert_thumbprint(leaf),
        };
        let token = self.broker.ca().sign_delegation_token(&claims)?;
        ev.depth = Some(claims.depth);
        ev.scope = Some(claims.scope.clone());
        ev.purpose = Some(claims.task.purpose.clone());
        ev.decision = Some("granted".into());
        ev.reason = Some(format!(
            "renewed: the same token re-issued under the active CA authority {}; certificate {} revoked",
            issued.authority_id,
            peer.serial_hex()
        ));
        ev.parent_jti = claims.parent.as_ref().map(|p| p.jti.clone());
        let Some(before) = self.tasks.get_token(&claims.jti)? else {
            return Err(refuse(
                "token_unknown",
                format!("token {} is not one this broker minted", claims.jti),
            ));
        };
        let mut record = before.clone();
        record.cert_serial = issued.serial_hex.clone();
        record.cert_thumbprint = claims.cnf.x5t_s256.clone();
        record.exp = exp;
        // Claimed before anything is logged or handed out: of two renewals
        // of one certificate sent at once (to one broker or two), one
        // rebinds the token and the other is refused, so one certificate
        // replaces the old one, not two.
        if !self.tasks.rebind_token(&record, peer.serial_hex())? {
            let why = format!(
                "certificate {} was renewed by another request already",
                peer.serial_hex()
            );
            ev.decision = Some("refused".into());
            ev.reason = Some(format!("renewal renewal_raced: {why}"));
            self.append(&ev)?;
            tracing::warn!(task = %task.id, spiffe_id = %req.spiffe_id, "renewal refused: {why}");
            return Err(refuse("renewal_raced", why));
        }
        let rebound = Rebound {
            before,
            to_serial: issued.serial_hex.clone(),
            signed_by: held.kid().to_owned(),
            signed_exp: held.claims().exp,
        };
        // Not handed out: the token goes back to the certificate its
        // holder still has.
        let logged = self
            .append(&ev)
            .and_then(|_| self.record_task_svid(node, &req.spiffe_id, &issued.serial_hex, exp));
        if let Err(e) = logged {
            self.undo_rebind(&rebound, now);
            return Err(e);
        }
        self.broker
            .rotation()
            .forget(crate::rotation::SlotKind::Task, peer.serial_hex());
        self.broker.rotation().issued(
            crate::rotation::SlotKind::Task,
            &issued.serial_hex,
            &issued.authority_id,
            exp,
        );
        tracing::info!(task = %task.id, spiffe_id = %req.spiffe_id, jti = %claims.jti, "task credential renewed");
        let records = vec![CredentialRecord {
            id: issued.serial_hex.clone(),
            kind: CredKind::X509Svid,
            task: Some(task.id.clone()),
            agent: Some(req.spiffe_id.clone()),
            node: Some(node.id().clone()),
            parent: Some(claims.jti.clone()),
            expires_at: exp,
        }];
        Ok(Minted {
            credential: TaskCredential {
                task_id: task.id,
                spiffe_id: req.spiffe_id.clone(),
                cert_chain_der: issued.cert_chain_der,
                token,
                expires_at: exp,
            },
            records,
            superseded: vec![baton_revocation::Revoked {
                id: peer.serial_hex().to_owned(),
                kind: CredKind::X509Svid,
                expires_at: held.expires_at(),
            }],
            rebound: Some(rebound),
        })
    }

    /// Tells the issuance hook of a task certificate minted for `holder`
    /// through `node` (a redeem's or a renewal's).
    fn record_task_svid(
        &self,
        node: &AuthenticatedNode,
        holder: &SpiffeId,
        serial: &str,
        expires_at: u64,
    ) -> Result<(), BrokerError> {
        self.broker.record(IssuedCredential {
            kind: CredentialKind::TaskX509Svid,
            spiffe_id: holder.clone(),
            via_node: Some(node.id().clone()),
            id: serial.to_owned(),
            expires_at,
        })
    }

    /// Puts a renewed token back on the certificate it held, when the new
    /// one was not handed out (best effort: logged if it fails).
    pub fn undo_rebind(&self, r: &Rebound, now: SystemTime) {
        match self.tasks.rebind_token(&r.before, &r.to_serial) {
            // The JWT key ledger counts the copy the holder keeps again,
            // so its key is not revoked (without `--force`) under it.
            Ok(true) => self.broker.ca().restore_delegation_token(
                &r.signed_by,
                &r.before.jti,
                r.signed_exp,
                now,
            ),
            Ok(false) => {
                tracing::warn!(jti = %r.before.jti, "a renewed token was rebound again meanwhile; left as it is");
            }
            Err(e) => {
                tracing::error!(error = %e, jti = %r.before.jti, "could not rebind a token after a renewal that was not handed out");
            }
        }
    }

    /// Why a renewal is refused, once the token verified.
    fn renew_refusal(
        &self,
        task: &TaskRecord,
        held: &VerifiedDelegation,
        peer: &PeerCert,
        req: &RenewTaskRequest,
        now: SystemTime,
        now_s: u64,
    ) -> Option<(&'static str, String)> {
        if let Some(why) = task.unusable(now_s) {
            return Some(("task_ended", why.to_owned()));
        }
        if held.purpose() != &task.purpose {
            return Some((
                "purpose_changed",
                format!(
                    "the token's purpose {} is no longer the task's ({})",
                    held.purpose(),
                    task.purpose
                ),
            ));
        }
        if held.expires_at() <= now_s {
            return Some(("token_expired", "the task credential has expired".into()));
        }
        if req.proof_iat.abs_diff(now_s) > RENEW_PROOF_WINDOW_SECS {
            return Some((
                "proof_stale",
                format!(
                    "proof_iat {} is more than {RENEW_PROOF_WINDOW_SECS} s from the broker's clock ({now_s})",
                    req.proof_iat
                ),
            ));
        }
        if let Err(e) = baton_ca::possession::verify_renew_proof(
            peer.leaf_der(),
            req.token.expose(),
            req.proof_iat,
            &req.proof,
        ) {
            return Some((
                "proof_invalid",
                format!("no proof of possession of the certificate's key: {e}"),
            ));
        }
        // The leaf must still chain to an authority this broker trusts: a
        // certificate under a revoked authority is not renewed.
        if let Err(e) = self.verify_leaf_chain(peer.leaf_der(), now) {
            return Some((
                "certificate_untrusted",
                format!("the presented certificate does not verify: {e}"),
            ));
        }
        None
    }

    /// The leaf's bytes are pinned by the token's `cnf` (the broker signed
    /// both), so it is genuine; what remains is whether the authority that
    /// signed it is still trusted.
    fn verify_leaf_chain(&self, leaf: &[u8], now: SystemTime) -> Result<(), String> {
        self.broker.leaf_authority_problem(leaf, now)
    }

    /// A fresh grant for the task's root agent, e.g. after a purpose change
    /// revoked every credential of the task.
    pub(crate) fn regrant(
        &self,
        raw: &str,
        audience: Vec<String>,
        now: SystemTime,
    ) -> Result<HandoffGrant, BrokerError> {
        let now = unix(now);
        let task = self.get_task(raw)?;
        if let Some(why) = task.unusable(now) {
            return Err(BrokerError::Conflict(format!("task {}: {why}", task.id)));
        }
        if let Some(why) = audience_problem(&audience) {
            return Err(bad("audience", why));
        }
        // Admission decided which tool servers the task may reach: an
        // operator re-issues access to those, never more.
        let Some(admitted) = &task.audiences else {
            return Err(BrokerError::Conflict(format!(
                "task {}: it was started before the broker kept the audiences admission admitted, so a new start grant cannot be checked against them; start a new task",
                task.id
            )));
        };
        if let Some(extra) = audience.iter().find(|a| !admitted.contains(a)) {
            return Err(BrokerError::Forbidden {
                code: "audience_not_admitted",
                message: format!(
                    "audience {extra:?} was not admitted for task {} (admitted: {}); a re-issued start grant may only name those",
                    task.id,
                    admitted.join(", ")
                ),
            });
        }
        self.broker.refuse_blocked(&task.root_agent, now)?;
        // Recorded before the grant exists, as a hop is: an operator's new
        // start grant is in the task's trace with the audience it names.
        let mut ev = self.event(EventKind::HopGranted, &task.id, now);
        ev.target = Some(task.root_agent.clone());
        ev.scope = Some(task.scope.clone());
        ev.purpose = Some(task.purpose.clone());
        ev.depth = Some(0);
        ev.decision = Some("granted".into());
        ev.reason = Some(format!(
            "start grant re-issued by an operator on the admin socket, audience {}",
            audience.join(", ")
        ));
        self.append(&ev)?;
        self.new_grant(self.root_grant(&task, audience, now), now)
    }

    /// A grant for the task's root agent (its start, or an operator's
    /// re-issue): the task's scope and purpose, no parent, for `audience`.
    fn root_grant(&self, task: &TaskRecord, audience: Vec<String>, now: u64) -> GrantRecord {
        GrantRecord {
            task_id: task.id.clone(),
            target: task.root_agent.clone(),
            scope: task.scope.clone(),
            purpose: task.purpose.clone(),
            purpose_epoch: task.purpose_epoch,
            audience,
            depth: 0,
            parent: None,
            parent_act: None,
            justification: None,
            exp_cap: task.expires_at,
            expires_at: (now + self.settings.grant_ttl.as_secs()).min(task.expires_at),
            created_by: None,
        }
    }

    pub fn trust_domain(&self) -> &baton_core::TrustDomain {
        self.broker.trust_domain()
    }

    /// Blocks an agent from new credentials (`baton revoke agent`), until
    /// `until` or until lifted; audited under no task, so logged only.
    pub fn block_agent(
        &self,
        id: &SpiffeId,
        until: Option<u64>,
        reason: &str,
        now: u64,
    ) -> Result<crate::store::AgentBlock, BrokerError> {
        if let Some(u) = until
            && u <= now
        {
            return Err(bad(
                "until",
                format!("until ({u}) must be in the future (now {now})"),
            ));
        }
        let block = crate::store::AgentBlock {
            spiffe_id: id.clone(),
            until,
            reason: reason.to_owned(),
            at: now,
        };
        self.broker.store().block_agent(&block)?;
        tracing::warn!(agent = %id, ?until, reason, "agent blocked from new credentials");
        Ok(block)
    }

    /// Every block in force.
    pub fn agent_blocks(&self, now: u64) -> Result<Vec<crate::store::AgentBlock>, BrokerError> {
        Ok(self.broker.store().agent_blocks(now)?)
    }

    /// Lifts a block; not found when there was none.
    pub fn unblock_agent(&self, id: &SpiffeId) -> Result<(), BrokerError> {
        if self.broker.store().unblock_agent(id)? {
            tracing::info!(agent = %id, "agent unblocked");
            Ok(())
        } else {
            Err(BrokerError::NotFound(format!("agent {id} is not blocked")))
        }
    }

    pub fn broker(&self) -> &Broker {
        &self.broker
    }

    pub fn revoker(&self) -> &Arc<Revoker> {
        &self.revoker
    }

    pub fn task_store(&self) -> &dyn TaskStore {
        self.tasks.as_ref()
    }

    /// Appends an operator's revocation of `what` (of `task`'s
    /// credentials) to the audit log; an error if it cannot be kept.
    pub(crate) fn record_revocation(
        &self,
        task: &TaskId,
        what: &str,
        reason: &str,
        now: u64,
    ) -> Result<(), BrokerError> {
        let mut ev = self.event(EventKind::Revoked, task, now);
        ev.reason = Some(format!("{what} ({reason})"));
        self.append(&ev).map(drop)
    }

    /// Ends a task. Idempotent: ending an ended task returns it again
    /// (`true`), so the caller re-drives the revocation of its credentials
    /// (a first attempt may have failed half-way).
    pub(crate) fn end_task(
        &self,
        raw: &str,
        now: SystemTime,
    ) -> Result<(TaskRecord, bool), BrokerError> {
        let now = unix(now);
        let mut task = self.get_task(raw)?;
        if task.ended_at.is_some() {
            return Ok((task, true));
        }
        let ev = self.event(EventKind::TaskEnded, &task.id, now);
        self.append(&ev)?;
        // Written only over the record read: a purpose change another
        // broker made meanwhile is kept (read again, ended on top of it),
        // and one made after this end finds the task ended.
        for _ in 0..TASK_WRITE_ATTEMPTS {
            let was = task.purpose_epoch;
            task.ended_at = Some(now);
            if self.tasks.replace_task(&task, was)? {
                tracing::info!(task = %task.id, "task ended");
                return Ok((task, false));
            }
            task = self.get_task(raw)?;
            if task.ended_at.is_some() {
                return Ok((task, true));
            }
        }
        Err(BrokerError::Conflict(format!(
            "task {} changed {TASK_WRITE_ATTEMPTS} times while it was being ended; end it again",
            task.id
        )))
    }

    /// Whether `task` may change to `purpose` now: it is usable and the
    /// purpose is in the catalogue.
    pub(crate) fn check_purpose_change(
        &self,
        task: &TaskRecord,
        purpose: &Purpose,
        now: u64,
    ) -> Result<(), BrokerError> {
        if let Some(why) = task.unusable(now) {
            return Err(BrokerError::Conflict(format!("task {}: {why}", task.id)));
        }
        if !self.settings.purposes.contains(purpose) {
            return Err(bad(
                "purpose",
                format!("purpose {purpose} is not in the declared catalogue"),
            ));
        }
        Ok(())
    }

    pub(crate) fn set_purpose(
        &self,
        raw: &str,
        purpose: &Purpose,
        now: SystemTime,
    ) -> Result<TaskRecord, BrokerError> {
        let now = unix(now);
        let mut task = self.get_task(raw)?;
        self.check_purpose_change(&task, purpose, now)?;
        let mut ev = self.event(EventKind::PurposeChanged, &task.id, now);
        ev.purpose = Some(purpose.clone());
        ev.reason = Some(format!("was {}", task.purpose));
        self.append(&ev)?;
        let was = task.purpose_epoch;
        task.purpose = purpose.clone();
        task.purpose_epoch += 1;
        // Written only over the record read: of two purpose changes (or a
        // change and an end) racing at two brokers, one is refused.
        if !self.tasks.replace_task(&task, was)? {
            return Err(BrokerError::Conflict(format!(
                "task {} was ended or its purpose changed meanwhile (at another broker); read it again",
                task.id
            )));
        }
        tracing::info!(task = %task.id, purpose = %purpose, "task purpose changed");
        Ok(task)
    }

    /// Checks a tool server's report of a call and builds its audit event
    /// (stamped `now`, the broker's clock); [`Self::record_tool_calls`]
    /// appends it. Reports are idempotent by `report_id`: a retried report
    /// is acknowledged, not logged twice.
    ///
    /// Only a tool server of the token's audience may report a call made
    /// with it (`DelegationSettings::tool_servers`, or an audience that is
    /// the reporter's SPIFFE ID); the token must be one this broker minted,
    /// in the report's task, held by the reported agent (a `deny` report
    /// may name another peer: a token presented by the wrong holder).
    pub fn check_tool_call<'r>(
        &self,
        reporter: &SpiffeId,
        r: &'r ToolCallReport,
        now: SystemTime,
    ) -> Result<CheckedReport<'r>, BrokerError> {
        let now = unix(now);
        if !reporter.is_member_of(self.broker.trust_domain()) {
            return Err(refuse(
                "not_entitled",
                "reporter is outside the trust domain",
            ));
        }
        if r.decision != "allow" && r.decision != "deny" {
            return Err(bad(
                "decision",
                format!(
                    "decision must be \"allow\" or \"deny\", got \"{}\"",
                    r.decision.escape_default()
                ),
            ));
        }
        check_report_text(r)?;
        let Some(token) = self.tasks.get_token(&r.token_jti)? else {
            return Err(refuse(
                "report_refused",
                format!(
                    "report {} names token {}, which this broker never minted",
                    r.report_id, r.token_jti
                ),
            ));
        };
        // Entitlement first: a reporter that does not serve the token's
        // audience learns nothing of it (its task, audiences or holder)
        // from the refusals below.
        if !self.serves_audience(reporter, &token.aud) {
            return Err(refuse(
                "not_entitled",
                format!(
                    "{reporter} is not a tool server of token {}'s audience; only those may report its calls",
                    r.token_jti
                ),
            ));
        }
        if token.task_id != r.task_id {
            return Err(refuse(
                "report_refused",
                format!(
                    "report {} names task {}, but token {} belongs to task {}",
                    r.report_id, r.task_id, r.token_jti, token.task_id
                ),
            ));
        }
        // The task only once the reporter is entitled to the token.
        let _ = self.task(&r.task_id)?;
        let approval = if r.decision == "allow" {
            check_allowed_by(r, &token)?;
            self.check_named_approval(reporter, r)?
        } else {
            None
        };
        let mut ev = AuditEvent::from_tool_call(r, Some(reporter.clone()));
        // Only `approved in ID`, checked above, says an allowed call was
        // approved: any other wording of an approval (`Approved in`, a
        // leading space, `approval: ...`) is the reporter's unverified
        // text, kept, and marked so in the trace.
        if r.decision == "allow"
            && let Some(text) = r.reason.as_deref()
            && !text.starts_with("approved in ")
            && mentions_approval(text)
        {
            ev.reason = Some(format!(
                "unverified note from the reporter (no approval was checked): {text:?}"
            ));
        }
        if token.spiffe_id != r.agent {
            if r.decision == "allow" {
                return Err(refuse(
                    "report_refused",
                    format!(
                        "report {} names agent {}, but token {} is held by {}",
                        r.report_id, r.agent, r.token_jti, token.spiffe_id
                    ),
                ));
            }
            ev.reason = Some(format!(
                "{}; presented by {}, not the token's holder {}",
                r.reason.as_deref().unwrap_or("denied"),
                r.agent,
                token.spiffe_id
            ));
        }
        ev.at = now;
        crate::telemetry::record_event(&ev);
        if ev.trace_id.is_none() {
            ev.trace_id = crate::telemetry::current_trace_id();
        }
        Ok(CheckedReport {
            report: r,
            key: report_key(reporter, &r.report_id),
            event: ev,
            approval,
        })
    }

    /// Appends checked reports ([`Self::check_tool_call`]) to the audit
    /// log: those not recorded before, in one append (one signed
    /// checkpoint, one transaction), then their ids in one datastore
    /// transaction. Answers each report in order: its receipt, its earlier
    /// index when it was recorded already (also within this batch), or why
    /// it was refused (an approval another report cited first). An audit
    /// log or datastore that fails fails them all.
    pub fn record_tool_calls(
        &self,
        checked: Vec<CheckedReport<'_>>,
    ) -> Result<Vec<Result<serde_json::Value, BrokerError>>, BrokerError> {
        enum Step {
            Seen(u64),
            InBatch(usize),
            New(usize),
            Refused(BrokerError),
        }
        // Only now, for a reporter entitled to report this token's calls,
        // is a report id looked up: a duplicate's answer (its index) is
        // not given to anyone else.
        let _one_batch_at_a_time = self
            .reports
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut steps = Vec::with_capacity(checked.len());
        let mut fresh: Vec<(&ToolCallReport, String, AuditEvent)> = Vec::new();
        let mut in_batch: BTreeMap<String, usize> = BTreeMap::new();
        let keys: Vec<&str> = checked.iter().map(|c| c.key.as_str()).collect();
        let seen = self.tasks.reports_seen(&keys)?;
        for c in checked {
            let r = c.report;
            if let Some(&k) = in_batch.get(&c.key) {
                steps.push((r.report_id.as_str(), Step::InBatch(k)));
                continue;
            }
            if let Some(&index) = seen.get(&c.key) {
                steps.push((r.report_id.as_str(), Step::Seen(index)));
                continue;
            }
            if let Some(a) = c.approval
                && let Err(e) = self.consume_approval(a, r)
            {
                steps.push((r.report_id.as_str(), Step::Refused(e)));
                continue;
            }
            in_batch.insert(c.key.clone(), fresh.len());
            steps.push((r.report_id.as_str(), Step::New(fresh.len())));
            fresh.push((r, c.key, c.event));
        }
        let mut keys = Vec::with_capacity(fresh.len());
        let mut events = Vec::with_capacity(fresh.len());
        let fresh: Vec<&ToolCallReport> = fresh
            .into_iter()
            .map(|(r, key, event)| {
                keys.push(key);
                events.push(event);
                r
            })
            .collect();
        let receipts = match events.as_slice() {
            [] => Vec::new(),
            // One report goes through the log's group commit with the
            // other appends of the moment.
            [one] => vec![self.append(one)?],
            many => crate::telemetry::timed_append(|| self.audit.append_batch(many))
                .map_err(audit_failed)?,
        };
        if receipts.len() != fresh.len() {
            return Err(audit_failed(format!(
                "the audit log answered {} receipts for {} reports",
                receipts.len(),
                fresh.len()
            )));
        }
        for r in &fresh {
            baton_ops::metrics().tool_call(
                r.risk.as_str(),
                if r.decision == "allow" {
                    "allow"
                } else {
                    "deny"
                },
            );
        }
        let recorded: Vec<(&str, u64)> = keys
            .iter()
            .zip(&receipts)
            .map(|(key, receipt)| (key.as_str(), receipt.index))
            .collect();
        if !recorded.is_empty() {
            self.tasks.record_reports(&recorded)?;
        }
        let duplicate = |id: &str, index: u64| serde_json::json!({ "report_id": id, "index": index, "duplicate": true });
        Ok(steps
            .into_iter()
            .map(|(id, step)| match step {
                Step::Seen(index) => Ok(duplicate(id, index)),
                Step::InBatch(k) => receipts
                    .get(k)
                    .map(|r| duplicate(id, r.index))
                    .ok_or_else(|| audit_failed("a report's receipt is missing")),
                Step::New(k) => receipts
                    .get(k)
                    .map(|receipt| {
                        serde_json::json!({
                            "report_id": id,
                            "index": receipt.index,
                            "receipt": receipt,
                        })
                    })
                    .ok_or_else(|| audit_failed("a report's receipt is missing")),
                Step::Refused(e) => Err(e),
            })
            .collect())
    }

    /// An allowed call whose record says it was approved (`approved in
    /// ID`, as the gate writes it) names an approval this reporter asked
    /// for and used, of this task, agent, tool and resource, and that no
    /// other report cited: a reporter cannot dress a call up as approved,
    /// nor one approval up as many calls. Returns the approval the report
    /// is to consume ([`Self::consume_approval`]), or `None` when it cites
    /// none or already consumed it (a retried report).
    fn check_named_approval(
        &self,
        reporter: &SpiffeId,
        r: &ToolCallReport,
    ) -> Result<Option<ApprovalState>, BrokerError> {
        let Some(id) = r
            .reason
            .as_deref()
            .and_then(|x| x.strip_prefix("approved in "))
        else {
            return Ok(None);
        };
        let id = id.trim();
        let refused = |why: &str| {
            refuse(
                "report_refused",
                format!(
                    "report {} says the call was approved in {id:?}, but {why}",
                    r.report_id
                ),
            )
        };
        // The report must describe the call the human approved: its task,
        // agent, tool, resource, risk, the token it was asked with, and
        // the server that asked. (Its input digest is of the call as bound
        // for the approval, headers and target with the body, which the
        // report's digest of the body alone cannot be compared with.)
        let Some(a) = self.tasks.get_approval(id)?.filter(|a| {
            a.task_id == r.task_id
                && a.agent == r.agent
                && a.tool == r.tool
                && a.resource == r.resource
                && a.risk == r.risk
                && a.token_jti.as_deref().is_none_or(|j| j == r.token_jti)
                && a.requested_by == *reporter
        }) else {
            return Err(refused(&format!(
                "no approval used by {reporter} for this call has that id"
            )));
        };
        match a.status.as_str() {
            "used" => Ok(Some(a)),
            "reported" if a.reported_in.as_deref() == Some(r.report_id.as_str()) => Ok(None),
            "reported" => Err(refused(&format!(
                "that approval was cited by report {} already: one approval vouches for one call",
                a.reported_in.as_deref().unwrap_or("?")
            ))),
            other => Err(refused(&format!(
                "that approval is {other}, not used by a call"
            ))),
        }
    }

    /// Marks a used approval as cited by report `r` (compare-and-set: of
    /// two reports citing it at once, one wins; the other is refused, or
    /// accepted if it is the same report retried).
    fn consume_approval(&self, a: ApprovalState, r: &ToolCallReport) -> Result<(), BrokerError> {
        let mut reported = a.clone();
        reported.status = "reported".into();
        reported.reported_in = Some(r.report_id.clone());
        if self.tasks.transition_approval(&a.id, "used", &reported)? {
            return Ok(());
        }
        match self.tasks.get_approval(&a.id)? {
            Some(now) if now.reported_in.as_deref() == Some(r.report_id.as_str()) => Ok(()),
            _ => Err(refuse(
                "report_refused",
                format!(
                    "report {} says the call was approved in {}, but another report cited that approval first: one approval vouches for one call",
                    r.report_id, a.id
                ),
            )),
        }
    }

    fn serves_audience(&self, reporter: &SpiffeId, aud: &[String]) -> bool {
        aud.iter().any(|a| {
            a == reporter.as_str()
                || self
                    .settings
                    .tool_servers
                    .get(a)
                    .is_some_and(|ids| ids.contains(reporter))
        })
    }

    /// The task's chain as a tree (text and JSON).
    pub fn trace(&self, raw: &str) -> Result<serde_json::Value, BrokerError> {
        let id: TaskId = raw.parse().map_err(|e| bad("task_id", format!("{e}")))?;
        let events = self.audit.events_for_task(&id).map_err(|e| match e {
            // Tampering is an answer for the operator, not an outage.
            baton_audit::AuditError::SharedLog { .. } | baton_audit::AuditError::Tampered(_) => {
                BrokerError::Conflict(format!(
                    "the audit trail of this task cannot be trusted: {e}"
                ))
            }
            other => audit_failed(other),
        })?;
        // A refused task start has events but no task.
        if events.is_empty() {
            let _ = self.task(&id)?;
        }
        let trace = baton_audit::trace(&events);
        Ok(serde_json::json!({ "text": trace.render_text(), "trace": trace }))
    }

    /// The checkpoint verification key, for verifying receipts offline.
    pub fn audit_public_key(&self) -> serde_json::Value {
        use base64::Engine;
        serde_json::json!({
            "public_key": base64::engine::general_purpose::STANDARD.encode(self.audit.public_key()),
        })
    }
}

/// Longest justification a hop may carry (it goes into the audit log).
pub const MAX_JUSTIFICATION: usize = baton_core::report_bounds::MAX_JUSTIFICATION;

/// Most audiences a task or a hop may name, and the longest one.
pub const MAX_AUDIENCES: usize = 64;
pub const MAX_AUDIENCE: usize = 256;

/// What is wrong with an audience list (a task's, a hop's, a re-issued
/// start grant's), if anything: it is signed into tokens, echoed in
/// refusals and shown in traces, so it is bounded and printable.
fn audience_problem(audience: &[String]) -> Option<String> {
    if audience.is_empty() || audience.len() > MAX_AUDIENCES {
        return Some(format!(
            "audience must list 1 to {MAX_AUDIENCES} values, not {}",
            audience.len()
        ));
    }
    audience.iter().enumerate().find_map(|(i, a)| {
        if a.trim().is_empty() || a.len() > MAX_AUDIENCE {
            Some(format!(
                "audience[{i}] must be 1 to {MAX_AUDIENCE} bytes, not blank"
            ))
        } else if a.chars().any(baton_core::text::is_unsafe_to_show) {
            Some(format!(
                "audience[{i}] holds a control or invisible character ({})",
                baton_core::text::controls_escaped(&truncated(a, 64))
            ))
        } else {
            None
        }
    })
}

/// Longest caller-chosen text a refusal records.
const MAX_REFUSED_TEXT: usize = 512;

/// Most permissions of a refused hop's requested scope its record keeps
/// (a granted one is within the holder's scope, and kept whole): a caller
/// cannot copy a 64 KiB scope into a task's trace with each refusal.
const MAX_REFUSED_PERMISSIONS: usize = 64;

/// `text` cut to at most `max` bytes (on a character boundary), marked
/// when cut.
fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_owned();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len())
}

/// Whether `text` speaks of an approval in any spelling: letters and
/// digits only, lower-cased, contain `approv` (a `0` for the `o` too).
fn mentions_approval(text: &str) -> bool {
    let folded: String = text
        .chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .map(|c| if c == '0' { 'o' } else { c })
        .collect();
    folded.contains("approv") || folded.contains("aprov")
}
