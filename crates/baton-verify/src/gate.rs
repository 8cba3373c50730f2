//! Per-call authorization: the token's scope, the task's risk ceiling and
//! the policy engine, then an audit report. The only way to get the
//! [`VerifiedCall`] a tool handler needs is [`ToolGate::authorize`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::hmac;
use baton_core::api::ToolCallReport;
use baton_core::report_bounds;
use baton_core::{Permission, Purpose, RiskTier, Scope, SpiffeId, TaskId};

use crate::error::{CallDenied, ReportError};
use crate::report::{Durable, Reporter};
use crate::token::{RevocationCheck, VerifiedDelegation};

/// One tool as the gate sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolSpec {
    /// e.g. `crm.search`.
    pub name: String,
    pub tier: RiskTier,
    /// What the tool touches, e.g. `dataset:crm` (passed to the policy).
    pub resource: String,
    /// The permission the token's scope must grant, e.g. `tool:crm.search:read`.
    pub requires: Permission,
}

/// What the policy engine decides on. Mirrors `baton_policy::CallRequest`
/// so this crate does not depend on the engine.
#[derive(Debug, Clone, Copy)]
pub struct CallContext<'a> {
    pub agent: &'a SpiffeId,
    /// Current actor first, root agent last.
    pub chain: &'a [SpiffeId],
    /// The human who started the task.
    pub initiator: &'a str,
    pub tool: &'a str,
    pub resource: &'a str,
    pub purpose: &'a Purpose,
    pub scope: &'a Scope,
    pub risk: RiskTier,
    pub depth: u32,
}

/// What a server adds to a call's records beside the decision.
#[derive(Debug, Clone, Default)]
pub struct CallNotes {
    /// The approval the call used (the broker's id); with `None`, a call
    /// that needs approval is refused.
    pub approval: Option<String>,
    /// Fields of the input kept in clear text in every record of the call
    /// (the server chose and redacted them).
    pub recorded: BTreeMap<String, String>,
    /// The caller's trace context (the request's `traceparent`, parsed):
    /// the broker's record of the call continues that trace.
    pub traceparent: Option<baton_core::trace_context::TraceParent>,
}

/// The policy engine's answer. Mirrors `baton_policy::Decision`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyDecision {
    pub allowed: bool,
    /// The policies that determined the decision.
    pub policy_ids: Vec<String>,
    /// Evaluation errors; any error makes the gate deny (fail closed), even
    /// with `allowed == true`.
    pub errors: Vec<String>,
    /// An allowed call must wait for a human's approval (a Cedar permit
    /// with `@approval`): [`ToolGate::authorize`] refuses it
    /// (`approval_required`); only a server that can hold calls (the
    /// gateway) lets it through, with the approval it obtained.
    pub approval: bool,
}

/// A policy engine, e.g. Cedar through `baton_policy::Engine` (the adapter
/// is a one-line `impl` mapping [`CallContext`] to its `CallRequest`).
pub trait CallPolicy: Send + Sync {
    fn decide(&self, req: &CallContext<'_>) -> PolicyDecision;

    /// Whether a decision on `tool` can ever ask for a human's approval
    /// (lets a gateway skip deciding twice when none can).
    fn may_require_approval(&self, _tool: &str) -> bool {
        false
    }
}

impl<F> CallPolicy for F
where
    F: Fn(&CallContext<'_>) -> PolicyDecision + Send + Sync,
{
    fn decide(&self, req: &CallContext<'_>) -> PolicyDecision {
        self(req)
    }
}

/// Cedar, through `baton-policy` (feature `cedar`, on by default). The
/// engine refuses a tool its schema does not declare, or declares with
/// another tier than the [`ToolSpec`]'s, with an error: the gate then
/// denies (`PolicyError`).
#[cfg(feature = "cedar")]
impl CallPolicy for baton_policy::Engine {
    fn decide(&self, req: &CallContext<'_>) -> PolicyDecision {
        let d = self.authorize_call(&baton_policy::CallRequest {
            agent: req.agent,
            chain: req.chain,
            initiator: req.initiator,
            tool: req.tool,
            resource: req.resource,
            purpose: req.purpose,
            scope: req.scope,
            risk: req.risk,
            depth: req.depth,
        });
        PolicyDecision {
            allowed: d.allowed,
            policy_ids: d.policy_ids,
            errors: d.errors,
            approval: d.approval,
        }
    }

    fn may_require_approval(&self, tool: &str) -> bool {
        baton_policy::Engine::may_require_approval(self, tool)
    }
}

/// Decides tool calls and reports them.
///
/// Every call, whatever its tier, is checked against the token's scope,
/// the task's risk ceiling and the policy (policies are cheap; nothing is
/// cached). Reporting depends on the tier:
///
/// - **sensitive tiers** (write, delete, purchase, export): an `allow`
///   record is appended durably to the spool *before* `authorize` returns,
///   with the input digest, scope used, policy ids and justification; if it
///   cannot be written the call is denied (`AuditUnavailable`: no record, no
///   call). [`VerifiedCall::finish`] appends a second record with the output
///   digest, whose `reason` is `completes <first report_id>`.
/// - **read tier**: one record only, written when the call finishes (or
///   when the `VerifiedCall` is dropped unfinished, then without an output
///   digest), without the justification; a spool failure is logged and
///   does not fail the call. So a read call that crashes the process
///   before finishing may go unreported.
/// - **approved calls**, any tier (a human's approval passed in
///   [`CallNotes::approval`]): recorded as a sensitive call is, so the
///   allow record that says `approved in ID` is durable before the call
///   goes on and is never replaced by the completion's reason.
/// - **denials**, any tier: a `deny` record with the reason code and
///   message (a spool failure is logged; the call is denied anyway).
///
/// The blocking methods ([`authorize`](Self::authorize),
/// [`VerifiedCall::finish`]) wait for the spool's group commit on the
/// calling thread; an async server uses
/// [`authorize_approved_async`](Self::authorize_approved_async) and
/// [`VerifiedCall::finish_async`], which wait without blocking it and,
/// for a read call's record, do not wait at all unless
/// [`with_durable_reads`](Self::with_durable_reads) (or while the spool is
/// failing).
pub struct ToolGate {
    policy: Arc<dyn CallPolicy>,
    reporter: Option<Reporter>,
    durable_reads: bool,
    freshness: Option<Freshness>,
    revocation: Option<Arc<dyn RevocationCheck>>,
    /// With a key, input and output digests are HMAC-SHA256 under it (a
    /// low-entropy input cannot be guessed from the log); without, SHA-256.
    digest_key: Option<hmac::Key>,
    in_flight: Arc<InFlight>,
}

/// Calls admitted whose last record is not queued yet.
#[derive(Debug, Default)]
struct InFlight {
    calls: std::sync::atomic::AtomicUsize,
    idle: tokio::sync::Notify,
}

/// Held by each [`VerifiedCall`]; dropped after its last record is queued.
#[derive(Debug)]
struct InFlightGuard(Arc<InFlight>);

impl InFlightGuard {
    fn new(f: &Arc<InFlight>) -> Self {
        f.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Self(f.clone())
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        if self
            .0
            .calls
            .fetch_sub(1, std::sync::atomic::Ordering::SeqCst)
            == 1
        {
            self.0.idle.notify_waiters();
        }
    }
}

/// A digest of a call's output computed as it streams by: SHA-256, or
/// HMAC-SHA256 under the gate's digest key.
pub struct OutputDigest(DigestState);

enum DigestState {
    Plain(aws_lc_rs::digest::Context),
    Keyed(Box<hmac::Context>),
}

impl OutputDigest {
    pub fn update(&mut self, bytes: &[u8]) {
        match &mut self.0 {
            DigestState::Plain(c) => c.update(bytes),
            DigestState::Keyed(c) => c.update(bytes),
        }
    }

    fn finish_hex(self) -> String {
        match self.0 {
            DigestState::Plain(c) => hex::encode(c.finish()),
            DigestState::Keyed(c) => hex::encode((*c).sign()),
        }
    }
}

impl fmt::Debug for OutputDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("OutputDigest")
    }
}

/// The digest of `bytes`: HMAC-SHA256 under `key`, else SHA-256 (hex).
fn digest_hex(key: Option<&hmac::Key>, bytes: &[u8]) -> String {
    match key {
        Some(k) => hex::encode(hmac::sign(k, bytes)),
        None => hex_sha256(bytes),
    }
}

/// Whether the local revocation set is current (e.g. a revocation feed that
/// heard from its source recently).
pub trait RevocationFreshness: Send + Sync {
    fn is_fresh(&self, now: u64) -> bool;
}

struct Freshness {
    source: Arc<dyn RevocationFreshness>,
    read_allows_stale: bool,
}

impl fmt::Debug for ToolGate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ToolGate")
            .field("reporter", &self.reporter)
            .finish_non_exhaustive()
    }
}

impl ToolGate {
    /// `reporter: None` reports nothing (tests, or a tool server whose
    /// calls are audited elsewhere).
    pub fn new(policy: Arc<dyn CallPolicy>, reporter: Option<Reporter>) -> Self {
        Self {
            policy,
            reporter,
            durable_reads: false,
            freshness: None,
            revocation: None,
            digest_key: None,
            in_flight: Arc::default(),
        }
    }

    /// Returns once no call this gate admitted is still running, i.e. every
    /// admitted call's last record is queued to the spool (a server that
    /// stops waits for this, then flushes the spool).
    pub async fn calls_finished(&self) {
        loop {
            let mut idle = std::pin::pin!(self.in_flight.idle.notified());
            // Registered before the count is read: no wake-up is missed.
            idle.as_mut().enable();
            if self
                .in_flight
                .calls
                .load(std::sync::atomic::Ordering::SeqCst)
                == 0
            {
                return;
            }
            idle.await;
        }
    }

    /// Records input and output digests as HMAC-SHA256 under `key`
    /// instead of plain SHA-256: whoever reads the audit log cannot test
    /// guesses of a call's arguments; whoever holds the key can check a
    /// claimed input or output against the record.
    pub fn with_digest_key(mut self, key: &[u8]) -> Self {
        self.digest_key = Some(hmac::Key::new(hmac::HMAC_SHA256, key));
        self
    }

    /// [`VerifiedCall::finish_async`] of a read call returns only once its
    /// record is durable, as for the sensitive tiers. Without it, a read
    /// call's record goes to the spool's next group commit (milliseconds)
    /// while the answer goes out, so a crash in between can lose it; a
    /// spool that is failing makes every call wait (and fail) again.
    pub fn with_durable_reads(mut self, durable: bool) -> Self {
        self.durable_reads = durable;
        self
    }

    /// The digest the gate records for `bytes` (keyed when it has a key).
    pub fn digest(&self, bytes: &[u8]) -> String {
        digest_hex(self.digest_key.as_ref(), bytes)
    }

    /// Denies calls whose mTLS peer certificate is revoked: `check` is
    /// asked for the certificate's serial (lowercase hex, the id the broker
    /// registers X509-SVIDs under) on every call. A workload or task SVID
    /// revoked on its own (its node evicted, `baton revoke credential
    /// <serial>`) is refused even while the token riding on it is not.
    pub fn with_revocation(mut self, check: Arc<dyn RevocationCheck>) -> Self {
        self.revocation = Some(check);
        self
    }

    /// Denies calls while the revocation set is stale: always for the
    /// sensitive tiers (write, delete, purchase, export), and for read-only
    /// tools unless `read_allows_stale`.
    pub fn with_revocation_freshness(
        mut self,
        source: Arc<dyn RevocationFreshness>,
        read_allows_stale: bool,
    ) -> Self {
        self.freshness = Some(Freshness {
            source,
            read_allows_stale,
        });
        self
    }

    /// Authorizes `tool` with `input` for the holder of `d` at unix time `now`.
    ///
    /// A call the policy allows only with a human's approval is refused
    /// (`approval_required`): holding it is a gateway's job
    /// ([`authorize_approved`](Self::authorize_approved)).
    pub fn authorize(
        &self,
        d: &VerifiedDelegation,
        tool: &ToolSpec,
        input: &[u8],
        now: u64,
    ) -> Result<VerifiedCall, CallDenied> {
        self.authorize_approved(d, tool, input, now, CallNotes::default())
    }

    /// As [`authorize`](Self::authorize), with what the server adds to the
    /// call's records ([`CallNotes`]): for a call a human approved, the
    /// approval it used, which the allow record carries.
    pub fn authorize_approved(
        &self,
        d: &VerifiedDelegation,
        tool: &ToolSpec,
        input: &[u8],
        now: u64,
        notes: CallNotes,
    ) -> Result<VerifiedCall, CallDenied> {
        self.admit(d, tool, input, now, notes).blocking_wait()
    }

    /// As [`authorize_approved`](Self::authorize_approved), waiting for
    /// the spool without blocking the thread.
    pub async fn authorize_approved_async(
        &self,
        d: &VerifiedDelegation,
        tool: &ToolSpec,
        input: &[u8],
        now: u64,
        notes: CallNotes,
    ) -> Result<VerifiedCall, CallDenied> {
        self.admit(d, tool, input, now, notes).wait().await
    }

    /// The decision and its record, queued to the spool.
    fn admit(
        &self,
        d: &VerifiedDelegation,
        tool: &ToolSpec,
        input: &[u8],
        now: u64,
        notes: CallNotes,
    ) -> Admitted {
        let CallNotes {
            approval,
            recorded,
            traceparent,
        } = notes;
        let mut report = ToolCallReport {
            report_id: new_report_id(),
            task_id: d.task_id().clone(),
            token_jti: d.jti().to_owned(),
            agent: d.agent().clone(),
            tool: tool.name.clone(),
            resource: tool.resource.clone(),
            risk: tool.tier,
            scope_used: vec![tool.requires.to_string()],
            input_digest: self.digest(input),
            output_digest: None,
            justification: d.justification().map(str::to_owned),
            decision: "allow".to_owned(),
            policy_ids: Vec::new(),
            reason: None,
            at: now,
            latency_ms: None,
            upstream_status: None,
            recorded,
            traceparent: traceparent.map(|tp| tp.to_string()),
        };
        // A call whose record the broker would refuse (a resource taken
        // from an argument of 5 MB, or with a newline) is not run: it
        // would run unrecorded. Its refusal (this one, or the policy's if
        // it refuses first) is recorded without the text at fault.
        let unrecordable = report.check_bounds().err();
        if unrecordable.is_some() {
            report.resource = report_bounds::recordable_resource(&report.resource);
            if report_bounds::check_recorded("recorded", &report.recorded).is_err() {
                report.recorded.clear();
            }
        }
        let decision = self.decide(d, tool, now).and_then(|c| {
            if let Some(e) = unrecordable {
                Err(CallDenied::Unrecordable {
                    field: e.field,
                    message: e.message,
                })
            } else if c.needs_approval && approval.is_none() {
                Err(CallDenied::ApprovalRequired {
                    policy_ids: c.policy_ids,
                })
            } else {
                Ok(c)
            }
        });
        if let Ok(c) = &decision {
            report.policy_ids.clone_from(&c.policy_ids);
            report_bounds::recordable_policy_ids(&mut report.policy_ids);
        }
        if let Err(denied) = decision {
            if let CallDenied::PolicyDenied { policy_ids }
            | CallDenied::ApprovalRequired { policy_ids } = &denied
            {
                report.policy_ids.clone_from(policy_ids);
                report_bounds::recordable_policy_ids(&mut report.policy_ids);
            }
            report.decision = "deny".to_owned();
            report.reason = Some(format!("{}: {denied}", denied.code()));
            let record = self.reporter.as_ref().and_then(|r| {
                r.enqueue(report)
                    .inspect_err(|e| {
                        tracing::warn!(error = %e, "could not spool the report of a denied call");
                    })
                    .ok()
            });
            return Admitted {
                outcome: Err(denied),
                record,
                allow_record: false,
            };
        }
        let approved = approval.is_some();
        report.reason = approval.map(|id| format!("approved in {id}"));
        // A call a human approved is recorded as a sensitive call is,
        // whatever its tier: its allow record, durable before the call
        // goes on, says `approved in ID` (the record on which the broker
        // marks the approval reported), and its completion is a second
        // record. A read call's one record, written at its end, carries
        // the outcome in its reason (`finished without output`,
        // `failed: ...`) or none: it would lose the approval.
        let recorded_first = tool.tier.is_sensitive() || approved;
        let mut record = None;
        if recorded_first {
            if let Some(r) = &self.reporter {
                // Not retried if it fails: the call is refused instead.
                match r.enqueue_once(report.clone()) {
                    Ok(t) => record = Some(t),
                    Err(e) => {
                        return Admitted {
                            outcome: Err(CallDenied::AuditUnavailable(e.to_string())),
                            record: None,
                            allow_record: false,
                        };
                    }
                }
            }
        } else {
            // Read tier: reported once, at finish; no justification.
            report.justification = None;
        }
        Admitted {
            outcome: Ok(VerifiedCall {
                report,
                digest_key: self.digest_key.clone(),
                reporter: self.reporter.clone(),
                recorded_first,
                durable_reads: self.durable_reads,
                done: false,
                _in_flight: InFlightGuard::new(&self.in_flight),
            }),
            record,
            allow_record: recorded_first,
        }
    }

    /// Records the refusal of a call that no tool or route of the server
    /// matches (`code`: `unknown_tool`, `no_route`), so that a holder
    /// probing for tools outside what it was given shows in the audit log
    /// and not only in the server's own. `tool` is what the caller named
    /// (kept only by its size when it is out of a record's bounds), the
    /// reason is cut at [`report_bounds::MAX_REFUSAL_REASON`]. Best
    /// effort, as every denial's record: the call is refused either way.
    pub fn record_unserved(
        &self,
        d: &VerifiedDelegation,
        tool: &str,
        input: &[u8],
        now: u64,
        code: &str,
        message: &str,
    ) {
        let Some(reporter) = &self.reporter else {
            return;
        };
        let mut reason = format!("{code}: {message}");
        if reason.len() > report_bounds::MAX_REFUSAL_REASON {
            let mut cut = report_bounds::MAX_REFUSAL_REASON;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
            reason.push_str("...");
        }
        let report = ToolCallReport {
            report_id: new_report_id(),
            task_id: d.task_id().clone(),
            token_jti: d.jti().to_owned(),
            agent: d.agent().clone(),
            tool: report_bounds::recordable_tool(tool),
            resource: String::new(),
            risk: RiskTier::Read,
            scope_used: Vec::new(),
            input_digest: self.digest(input),
            output_digest: None,
            justification: d.justification().map(str::to_owned),
            decision: "deny".to_owned(),
            policy_ids: Vec::new(),
            reason: Some(reason),
            at: now,
            latency_ms: None,
            upstream_status: None,
            recorded: BTreeMap::new(),
            traceparent: None,
        };
        if let Err(e) = reporter.enqueue(report) {
            tracing::warn!(error = %e, code, "could not spool the report of a refused call");
        }
    }

    /// Whether `tool` would be allowed for the holder of `d` now, without
    /// reporting anything: for listing what a caller may call (MCP
    /// `tools/list`), never for letting a call through.
    pub fn permits(&self, d: &VerifiedDelegation, tool: &ToolSpec, now: u64) -> bool {
        self.check(d, tool, now).is_ok()
    }

    /// The decision on `tool` for the holder of `d` now, without
    /// reporting. For a call held before it is decided for good (a
    /// human's approval), never for letting one through: that takes
    /// [`authorize`](Self::authorize).
    pub fn check(
        &self,
        d: &VerifiedDelegation,
        tool: &ToolSpec,
        now: u64,
    ) -> Result<Checked, CallDenied> {
        self.decide(d, tool, now)
    }

    /// Whether the policy can ever make a call of `tool` wait for a
    /// human's approval (a gateway decides such calls before it forwards
    /// them; others it need not decide twice).
    pub fn may_require_approval(&self, tool: &str) -> bool {
        self.policy.may_require_approval(tool)
    }

    /// Refuses, as a call of `tier` is refused, while the revocation set is
    /// stale (see [`ToolGate::with_revocation_freshness`]). For what a
    /// holder reaches without naming a tool (an MCP session's ping, its
    /// stream, a resource read), which a server checks as a read: a
    /// credential revoked while the feed was silent is not noticed then.
    pub fn check_fresh(&self, tier: RiskTier, now: u64) -> Result<(), CallDenied> {
        match &self.freshness {
            Some(f) if (tier.is_sensitive() || !f.read_allows_stale) && !f.source.is_fresh(now) => {
                Err(CallDenied::RevocationStale { tier })
            }
            _ => Ok(()),
        }
    }

    /// The decision without reporting.
    fn decide(
        &self,
        d: &VerifiedDelegation,
        tool: &ToolSpec,
        now: u64,
    ) -> Result<Checked, CallDenied> {
        if now >= d.expires_at() {
            return Err(CallDenied::Expired {
                exp: d.expires_at(),
                now,
            });
        }
        self.check_fresh(tool.tier, now)?;
        if let Some(r) = &self.revocation {
            let serial = d.peer_serial();
            // Fail closed: a peer without a readable serial is refused.
            if serial.is_empty() || r.is_revoked(serial, d.task_id()) {
                return Err(CallDenied::PeerRevoked {
                    serial: serial.to_owned(),
                });
            }
        }
        if !d.scope().allows(&tool.requires) {
            return Err(CallDenied::OutOfScope {
                required: tool.requires.clone(),
            });
        }
        if tool.tier > d.risk_ceiling() {
            return Err(CallDenied::OverCeiling {
                tier: tool.tier,
                ceiling: d.risk_ceiling(),
            });
        }
        let ctx = CallContext {
            agent: d.agent(),
            chain: d.chain(),
            initiator: d.initiator(),
            tool: &tool.name,
            resource: &tool.resource,
            purpose: d.purpose(),
            scope: d.scope(),
            risk: tool.tier,
            depth: d.depth(),
        };
        let decision = self.policy.decide(&ctx);
        if !decision.errors.is_empty() {
            return Err(CallDenied::PolicyError {
                errors: decision.errors,
            });
        }
        if !decision.allowed {
            return Err(CallDenied::PolicyDenied {
                policy_ids: decision.policy_ids,
            });
        }
        Ok(Checked {
            policy_ids: decision.policy_ids,
            needs_approval: decision.approval,
        })
    }
}

/// A decision whose record may still be on its way to the spool.
struct Admitted {
    outcome: Result<VerifiedCall, CallDenied>,
    record: Option<Durable>,
    /// `record` is the allow record of a sensitive or approved call: no
    /// record, no call.
    allow_record: bool,
}

impl Admitted {
    fn settle(
        outcome: Result<VerifiedCall, CallDenied>,
        allow_record: bool,
        written: Option<Result<(), ReportError>>,
    ) -> Result<VerifiedCall, CallDenied> {
        match written {
            Some(Err(e)) if allow_record => {
                // Dropped unfinished: a call recorded first leaves no record.
                drop(outcome);
                Err(CallDenied::AuditUnavailable(e.to_string()))
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "could not spool the report of a denied call");
                outcome
            }
            _ => outcome,
        }
    }

    fn blocking_wait(self) -> Result<VerifiedCall, CallDenied> {
        let written = self.record.map(Durable::blocking_wait);
        Self::settle(self.outcome, self.allow_record, written)
    }

    async fn wait(self) -> Result<VerifiedCall, CallDenied> {
        let written = match self.record {
            Some(t) => Some(t.wait().await),
            None => None,
        };
        Self::settle(self.outcome, self.allow_record, written)
    }
}

/// A call the gate would allow now ([`ToolGate::check`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    /// The policies that allowed it.
    pub policy_ids: Vec<String>,
    /// The policy allows it only with a human's approval.
    pub needs_approval: bool,
}

/// An authorized tool call. Only [`ToolGate::authorize`] builds one; a tool
/// handler takes it as a parameter so that an unchecked call cannot compile.
#[must_use = "run the tool, then call finish(output) to report its output"]
pub struct VerifiedCall {
    report: ToolCallReport,
    digest_key: Option<hmac::Key>,
    reporter: Option<Reporter>,
    /// Its allow record was written before it went on (a sensitive call,
    /// or an approved one of any tier): its end is a second record.
    recorded_first: bool,
    durable_reads: bool,
    done: bool,
    /// Dropped after the call's last record is queued (fields drop after
    /// `Drop::drop`, which queues an unfinished read call's record).
    _in_flight: InFlightGuard,
}

impl VerifiedCall {
    pub fn task_id(&self) -> &TaskId {
        &self.report.task_id
    }
    /// The agent (mTLS peer) making the call.
    pub fn agent(&self) -> &SpiffeId {
        &self.report.agent
    }
    pub fn tool(&self) -> &str {
        &self.report.tool
    }
    pub fn risk(&self) -> RiskTier {
        self.report.risk
    }
    /// The policies that allowed the call.
    pub fn policy_ids(&self) -> &[String] {
        &self.report.policy_ids
    }
    /// The id of this call's (first) audit record.
    pub fn report_id(&self) -> &str {
        &self.report.report_id
    }

    /// Adds fields of the output, kept in clear text in the completion
    /// record (the server chose and redacted them).
    pub fn record_output(&mut self, fields: BTreeMap<String, String>) {
        self.report.recorded.extend(fields);
    }

    /// Notes the upstream's answer for the completion record (a gateway):
    /// its HTTP status and the milliseconds until it ended.
    pub fn set_upstream(&mut self, status: u16, latency_ms: u64) {
        self.report.upstream_status = Some(status);
        self.report.latency_ms = Some(latency_ms);
    }

    /// Reports the digest of the tool's output. For a sensitive or
    /// approved call this is a second record; for a read call, the only
    /// one.
    pub fn finish(self, output: &[u8]) -> Result<(), ReportError> {
        let d = digest_hex(self.digest_key.as_ref(), output);
        self.complete(Some(d), None)
    }

    /// A digest to feed the output as it streams by, for
    /// [`finish_digest`](Self::finish_digest).
    pub fn output_digest(&self) -> OutputDigest {
        OutputDigest(match &self.digest_key {
            Some(k) => DigestState::Keyed(Box::new(hmac::Context::with_key(k))),
            None => DigestState::Plain(aws_lc_rs::digest::Context::new(&SHA256)),
        })
    }

    /// As [`finish`](Self::finish), for an output that was streamed on and
    /// digested as it went.
    pub fn finish_digest(self, output: OutputDigest) -> Result<(), ReportError> {
        self.complete(Some(output.finish_hex()), None)
    }

    /// Reports that the call was allowed but did not complete (the
    /// upstream failed or the caller went away): the record carries the
    /// reason and no output digest.
    pub fn failed(self, reason: &str) -> Result<(), ReportError> {
        self.complete(None, Some(format!("failed: {reason}")))
    }

    /// As [`finish`](Self::finish), waiting for the spool without blocking
    /// the thread, and only when the answer must wait for the record: a
    /// sensitive or approved call, durable reads
    /// ([`ToolGate::with_durable_reads`]), or a spool whose last write
    /// failed.
    pub async fn finish_async(self, output: &[u8]) -> Result<(), ReportError> {
        let d = digest_hex(self.digest_key.as_ref(), output);
        self.complete_async(Some(d), None).await
    }

    /// As [`finish_digest`](Self::finish_digest), like
    /// [`finish_async`](Self::finish_async).
    pub async fn finish_digest_async(self, output: OutputDigest) -> Result<(), ReportError> {
        self.complete_async(Some(output.finish_hex()), None).await
    }

    /// As [`failed`](Self::failed), like [`finish_async`](Self::finish_async).
    pub async fn failed_async(self, reason: &str) -> Result<(), ReportError> {
        self.complete_async(None, Some(format!("failed: {reason}")))
            .await
    }

    async fn complete_async(
        mut self,
        output_digest: Option<String>,
        reason: Option<String>,
    ) -> Result<(), ReportError> {
        let Some((reporter, report)) = self.completion(output_digest, reason) else {
            return Ok(());
        };
        let must_wait = self.recorded_first || self.durable_reads || !reporter.is_healthy();
        let ticket = reporter.enqueue(report)?;
        if must_wait {
            ticket.wait().await
        } else {
            drop(ticket);
            Ok(())
        }
    }

    fn complete(
        mut self,
        output_digest: Option<String>,
        reason: Option<String>,
    ) -> Result<(), ReportError> {
        match self.completion(output_digest, reason) {
            Some((reporter, report)) => reporter.submit(report),
            None => Ok(()),
        }
    }

    /// The completion record, once (marks the call done).
    fn completion(
        &mut self,
        output_digest: Option<String>,
        reason: Option<String>,
    ) -> Option<(Reporter, ToolCallReport)> {
        self.done = true;
        let reporter = self.reporter.take()?;
        let mut report = self.report.clone();
        report.output_digest = output_digest;
        // An upstream's error text can be long (it may quote the URL): the
        // record keeps its start.
        let reason = reason.map(|r| cut_text(r, MAX_COMPLETION_REASON));
        report.reason = reason.clone();
        if report_bounds::check_recorded("recorded", &report.recorded).is_err() {
            // Output fields the configuration let through but the log would
            // refuse: the record is kept without its clear-text fields.
            report.recorded.clear();
            tracing::warn!(report = %report.report_id, "clear-text fields over the audit log's bounds dropped from a call's record");
        }
        if self.recorded_first {
            report.reason = Some(match reason {
                Some(r) => format!("{r}; completes {}", self.report.report_id),
                None => format!("completes {}", self.report.report_id),
            });
            report.report_id = new_report_id();
        }
        Some((reporter, report))
    }
}

/// Longest reason a completion record carries (the record takes 4 KiB;
/// the rest is for the `completes ...` note).
const MAX_COMPLETION_REASON: usize = 2048;

/// `text` cut to at most `max` bytes on a character boundary, the cut
/// marked.
fn cut_text(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut at = max.saturating_sub(3);
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    text.truncate(at);
    text.push_str("...");
    text
}

impl Drop for VerifiedCall {
    fn drop(&mut self) {
        // A read call dropped without finish still leaves its one record
        // (a call recorded first has its allow record already).
        if self.done || self.recorded_first {
            return;
        }
        if let Some(r) = self.reporter.take() {
            let mut report = self.report.clone();
            report.reason = Some("finished without output".to_owned());
            // Not waited for (a drop may run on an async worker); the
            // spool retries it if its write fails.
            if let Err(e) = r.enqueue(report) {
                tracing::warn!(error = %e, "could not spool the report of a read call");
            }
        }
    }
}

impl fmt::Debug for VerifiedCall {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifiedCall")
            .field("task", &self.report.task_id)
            .field("agent", &self.report.agent)
            .field("tool", &self.report.tool)
            .field("report_id", &self.report.report_id)
            .finish_non_exhaustive()
    }
}

fn new_report_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn hex_sha256(bytes: &[u8]) -> String {
    hex::encode(digest(&SHA256, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JwtBundles, PeerCert, ReportBatch, SendError, SendFuture, TokenVerifier};
    use baton_core::{Actor, Confirmation, DelegationClaims, TaskClaims, TrustDomain};
    use std::time::{Duration, UNIX_EPOCH};

    const NOW: u64 = 1_700_000_000;
    const AUDIENCE: &str = "crm-tool";

    /// A broker that is down: records stay in the spool, where the test
    /// reads them.
    struct Down;

    impl crate::ReportSender for Down {
        fn send<'a>(&'a self, _: &'a ReportBatch) -> SendFuture<'a> {
            Box::pin(async { Err(SendError::Unreachable("down (test)".into())) })
        }
    }

    /// A root token for the planner, bound to its certificate.
    fn delegation() -> VerifiedDelegation {
        let td: TrustDomain = "example.org".parse().unwrap();
        let ca = baton_ca::Ca::load_or_create(
            baton_ca::CaConfig::new(td.clone()),
            UNIX_EPOCH + Duration::from_secs(NOW - 60),
        )
        .unwrap();
        let planner = SpiffeId::parse("spiffe://example.org/agents/planner").unwrap();
        let key = baton_ca::WorkloadKey::generate().unwrap();
        let svid = ca
            .sign_x509_svid(
                &key.csr_der(&planner).unwrap(),
                &planner,
                Duration::from_secs(3600),
                &[],
                UNIX_EPOCH + Duration::from_secs(NOW),
            )
            .unwrap();
        let leaf = svid.cert_chain_der[0].clone();
        let scope = Scope::parse(&["tool:crm.search:read", "tool:crm.update:write"]).unwrap();
        let claims = DelegationClaims {
            iss: "spiffe://example.org/baton/broker".into(),
            sub: "alice@example.com".into(),
            aud: vec![AUDIENCE.into()],
            exp: NOW + 300,
            iat: NOW - 5,
            jti: "jti-root".into(),
            act: Actor {
                sub: planner,
                jti: "jti-root".into(),
                scope: scope.clone(),
                exp: NOW + 300,
                aud: vec![AUDIENCE.into()],
                act: None,
            },
            task: TaskClaims {
                id: TaskId::from_random([0x5a; 16]),
                purpose: "support.case-update".parse::<Purpose>().unwrap(),
                risk_ceiling: RiskTier::Write,
                max_depth: 3,
                initiator_iss: "https://idp.example.com".into(),
            },
            scope,
            depth: 0,
            parent: None,
            justification: None,
            cnf: Confirmation {
                x5t_s256: baton_ca::cert_thumbprint(&leaf),
            },
        };
        let token = ca.sign_delegation_token(&claims).unwrap();
        TokenVerifier::dangerous_without_revocation(JwtBundles::new([ca.bundle()]), AUDIENCE.into())
            .verify(
                token.expose(),
                &PeerCert::from_verified_leaf(leaf).unwrap(),
                NOW,
            )
            .unwrap()
    }

    fn allow_all(_: &CallContext<'_>) -> PolicyDecision {
        PolicyDecision {
            allowed: true,
            policy_ids: vec!["permit-all".into()],
            errors: vec![],
            approval: false,
        }
    }

    fn spec(tier: RiskTier) -> ToolSpec {
        let (name, requires) = match tier {
            RiskTier::Read => ("crm.search", "tool:crm.search:read"),
            _ => ("crm.update", "tool:crm.update:write"),
        };
        ToolSpec {
            name: name.into(),
            tier,
            resource: "dataset:crm".into(),
            requires: Permission::parse(requires).unwrap(),
        }
    }

    /// How a call ends.
    #[derive(Debug, Clone, Copy)]
    enum End {
        Finish,
        Fail,
        Drop,
    }

    /// The records of one call of `tier`, with `approval`, ended by `end`.
    fn records(tier: RiskTier, approval: Option<&str>, end: End) -> Vec<ToolCallReport> {
        let dir = tempfile::tempdir().unwrap();
        let reporter = Reporter::open(dir.path(), Arc::new(Down)).unwrap();
        let gate = ToolGate::new(Arc::new(allow_all), Some(reporter.clone()));
        let notes = CallNotes {
            approval: approval.map(str::to_owned),
            ..CallNotes::default()
        };
        let call = gate
            .authorize_approved(&delegation(), &spec(tier), b"in", NOW, notes)
            .unwrap();
        match end {
            End::Finish => call.finish(b"out").unwrap(),
            End::Fail => call.failed("the upstream did not answer").unwrap(),
            End::Drop => {
                drop(call);
                // A drop does not wait for the spool: a read call's one
                // record comes a little later.
                let deadline = std::time::Instant::now() + Duration::from_secs(60);
                while reporter.pending() == 0 && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
        reporter.pending_reports()
    }

    /// An approved call's records say `approved in ID` exactly once, in
    /// the allow record written before it went on, whatever its tier and
    /// however it ended; the completion completes that record and cites
    /// no approval (the broker would refuse a second citation). A read
    /// call's one record used to carry its outcome instead, so its
    /// approval was never reported. The sensitive tier is the control.
    #[test]
    fn an_approved_call_keeps_its_approval_in_its_record_whatever_its_tier() {
        for tier in [RiskTier::Write, RiskTier::Read] {
            for end in [End::Finish, End::Fail, End::Drop] {
                let r = records(tier, Some("ap_1"), end);
                let what = format!("{tier:?} {end:?}: {r:#?}");
                let citing: Vec<_> = r
                    .iter()
                    .filter(|x| x.reason.as_deref() == Some("approved in ap_1"))
                    .collect();
                assert_eq!(citing.len(), 1, "{what}");
                assert_eq!(r[0].reason.as_deref(), Some("approved in ap_1"), "{what}");
                assert_eq!(r[0].decision, "allow", "{what}");
                assert!(r[0].output_digest.is_none(), "{what}");
                match end {
                    // Dropped unfinished: the allow record alone.
                    End::Drop => assert_eq!(r.len(), 1, "{what}"),
                    _ => {
                        assert_eq!(r.len(), 2, "{what}");
                        let completes = r[1].reason.as_deref().unwrap();
                        assert!(
                            completes.ends_with(&format!("completes {}", r[0].report_id)),
                            "{what}"
                        );
                        assert!(!completes.contains("approved"), "{what}");
                    }
                }
            }
        }
        // Control: a read call without an approval keeps its one record,
        // written at its end, with its outcome.
        let r = records(RiskTier::Read, None, End::Finish);
        assert_eq!(r.len(), 1, "{r:#?}");
        assert_eq!(r[0].reason, None);
        assert!(r[0].output_digest.is_some());
        let r = records(RiskTier::Read, None, End::Drop);
        assert_eq!(r.len(), 1, "{r:#?}");
        assert_eq!(r[0].reason.as_deref(), Some("finished without output"));
    }
}
