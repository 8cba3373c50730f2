//! Human approval of the riskiest calls. A gateway (a tool server of the
//! token's audience) asks for the approval of one exact call; a human who
//! may decide for the task (its initiator, or a member of an approver
//! group) approves or denies it with their ID token; the gateway's next
//! identical call uses the approval up. Every step is in the audit log.
//!
//! An approval binds the task and its purpose (the purpose's epoch), the
//! acting agent and the token it acts with, the tool, the resource, the
//! digest of the call's input and the server that asked: any other call,
//! by anyone, with another credential, under another purpose or through
//! any other server, is another approval. It serves one call, expires
//! unused, and dies with its token (a revoked or expired token asks for
//! nothing and uses nothing up).

use aws_lc_rs::digest::{SHA256, digest};
use baton_audit::EventKind;
use baton_core::SpiffeId;
use baton_core::api::{ApprovalDecision, ApprovalRequest, ApprovalState};

use super::{Delegation, bad, refuse};
use crate::error::{BrokerError, random_hex};
use crate::records::TokenRecord;

/// The longest an approval may wait.
pub const MAX_APPROVAL_TTL_SECS: u64 = 24 * 3600;

fn binding(req: &ApprovalRequest, server: &SpiffeId, purpose_epoch: u32) -> String {
    let parts = serde_json::json!([
        req.task_id,
        purpose_epoch,
        req.token_jti,
        req.agent,
        req.tool,
        req.resource,
        req.risk,
        req.input_digest,
        server,
        req.target,
    ]);
    hex::encode(digest(&SHA256, parts.to_string().as_bytes()))
}

impl Delegation {
    /// A gateway's request for the approval of one call: the approval
    /// that binds it (used up if approved), or a new pending one.
    pub fn request_approval(
        &self,
        server: &SpiffeId,
        req: &ApprovalRequest,
        now: u64,
    ) -> Result<ApprovalState, BrokerError> {
        if !server.is_member_of(self.broker.trust_domain()) {
            return Err(refuse(
                "not_entitled",
                "the server is outside the trust domain",
            ));
        }
        if req.ttl_secs == 0 || req.ttl_secs > MAX_APPROVAL_TTL_SECS {
            return Err(bad(
                "ttl_secs",
                format!("ttl_secs must be 1..={MAX_APPROVAL_TTL_SECS}"),
            ));
        }
        if req.input_digest.len() != 64 || !req.input_digest.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err(bad("input_digest", "a hex SHA-256 (64 digits)"));
        }
        if let Some(t) = &req.target
            && (t.is_empty()
                || t.len() > baton_core::api::MAX_APPROVAL_TARGET
                || t.chars().any(char::is_control))
        {
            return Err(bad(
                "target",
                format!(
                    "the request line (METHOD /path?query): 1 to {} bytes, no control characters",
                    baton_core::api::MAX_APPROVAL_TARGET
                ),
            ));
        }
        // Bounded as a report's recorded fields are (the same fields), and
        // the resource and tool as a report's.
        super::check_recorded("shown", &req.shown)?;
        baton_core::report_bounds::check_resource(&req.resource).map_err(super::out_of_bounds)?;
        if req.tool.is_empty()
            || req.tool.len() > baton_core::report_bounds::MAX_TOOL
            || req.tool.chars().any(char::is_control)
        {
            return Err(bad(
                "tool",
                format!(
                    "1 to {} bytes, no control characters",
                    baton_core::report_bounds::MAX_TOOL
                ),
            ));
        }
        let Some(token) = self.tasks.get_token(&req.token_jti)? else {
            return Err(refuse(
                "not_entitled",
                format!("token {} was never minted by this broker", req.token_jti),
            ));
        };
        // Entitlement first: a server that does not serve the token's
        // audience learns nothing of it (its task, holder, audiences,
        // expiry or revocation) from the refusals below.
        if !self.serves_audience(server, &token.aud) {
            return Err(refuse(
                "not_entitled",
                format!(
                    "{server} is not a tool server of token {}'s audience",
                    req.token_jti
                ),
            ));
        }
        if token.task_id != req.task_id || token.spiffe_id != req.agent {
            return Err(refuse(
                "not_entitled",
                format!(
                    "token {} is not held by {} in task {}",
                    req.token_jti, req.agent, req.task_id
                ),
            ));
        }
        // The task only now: a server that is not entitled to the token
        // learns nothing of its task either (whether it exists, or ended).
        let task = self.task(&req.task_id)?;
        if task.ended_at.is_some() || now >= task.expires_at {
            return Err(refuse(
                "task_ended",
                format!("task {} has ended", req.task_id),
            ));
        }
        // An approval is asked for, and used up, only by a live credential:
        // one revoked since (itself, its chain or its task) or expired
        // neither asks nor spends what a human approved for it.
        if now >= token.exp {
            return Err(refuse(
                "token_expired",
                format!("token {} has expired", req.token_jti),
            ));
        }
        if self.chain_revoked(&token, now)? {
            return Err(refuse(
                "revoked",
                format!("token {} is revoked", req.token_jti),
            ));
        }
        let bind = binding(req, server, task.purpose_epoch);
        // One approval per binding at a time: two identical calls asked at
        // once (at one broker or two) get the same one, never two that two
        // approvers could decide apart (one denying, the other approving).
        for _ in 0..4 {
            let latest = self.tasks.latest_approval(&bind)?;
            if let Some(mut a) = latest.clone() {
                let live = now < a.expires_at;
                match a.status.as_str() {
                    "pending" if live => return Ok(a),
                    "denied" if live => return Ok(a),
                    "approved" if live => {
                        // Used up by this answer: one call per approval.
                        let mut used = a.clone();
                        used.status = "used".into();
                        if self.tasks.transition_approval(&a.id, "approved", &used)? {
                            a.status = "approved".into();
                            return Ok(a);
                        }
                    }
                    _ => {}
                }
            }
            let a = self.new_approval(req, server, &token, now)?;
            if !self
                .tasks
                .insert_approval(&bind, &a, latest.as_ref().map(|l| l.id.as_str()))?
            {
                // Another request inserted one first: answer with it.
                continue;
            }
            let mut ev = self.event(EventKind::ApprovalRequested, &a.task_id, now);
            ev.actor = Some(a.agent.clone());
            ev.target = Some(server.clone());
            ev.token_jti = Some(req.token_jti.clone());
            ev.tool = Some(a.tool.clone());
            ev.resource = Some(a.resource.clone());
            ev.risk = Some(a.risk);
            ev.input_digest = Some(a.input_digest.clone());
            ev.reason = Some(match &a.target {
                Some(t) => format!("approval {} of {t} pending until {}", a.id, a.expires_at),
                None => format!("approval {} pending until {}", a.id, a.expires_at),
            });
            // Its record before its id leaves this request: one whose
            // record could not be kept is voided (nobody can decide it).
            if let Err(e) = self.append(&ev) {
                let mut void = a.clone();
                void.status = "void".into();
                if let Err(undo) = self.tasks.transition_approval(&a.id, "pending", &void) {
                    tracing::error!(approval = %a.id, error = %undo, "cannot void an approval whose record failed");
                }
                return Err(e);
            }
            return Ok(a);
        }
        Err(BrokerError::Conflict(
            "the approval of this call changed under every attempt; ask again".into(),
        ))
    }

    /// A new pending approval of `req`, asked by `server` with `token`.
    fn new_approval(
        &self,
        req: &ApprovalRequest,
        server: &SpiffeId,
        token: &TokenRecord,
        now: u64,
    ) -> Result<ApprovalState, BrokerError> {
        Ok(ApprovalState {
            id: format!("ap_{}", random_hex::<12>()?),
            status: "pending".into(),
            task_id: req.task_id.clone(),
            agent: req.agent.clone(),
            tool: req.tool.clone(),
            resource: req.resource.clone(),
            risk: req.risk,
            input_digest: req.input_digest.clone(),
            token_jti: Some(req.token_jti.clone()),
            target: req.target.clone(),
            shown: req.shown.clone(),
            requested_by: server.clone(),
            created_at: now,
            // Never past the token it was asked with.
            expires_at: now.saturating_add(req.ttl_secs).min(token.exp),
            decided_by: None,
            reason: None,
            reported_in: None,
        })
    }

    /// Whether `token`, or a token it was delegated from, is revoked
    /// (itself, its subtree or its task), as a verifier checks every link
    /// of a presented chain. A link whose record is missing counts as
    /// revoked: fail closed.
    fn chain_revoked(
        &self,
        token: &crate::records::TokenRecord,
        now: u64,
    ) -> Result<bool, BrokerError> {
        // The token itself, and the certificate it is bound to (a
        // certificate revoked alone leaves the token's id live).
        if self.credential_revoked(&token.jti, now)?
            || (!token.cert_serial.is_empty()
                && self.credential_revoked(&token.cert_serial, now)?)
        {
            return Ok(true);
        }
        let mut parent = token.parent_jti.clone();
        // A chain is at most a task's depth long; the bound only stops a
        // corrupt store's cycle.
        for _ in 0..=u8::MAX {
            let Some(jti) = parent else {
                return Ok(false);
            };
            if self.credential_revoked(&jti, now)? {
                return Ok(true);
            }
            match self.tasks.get_token(&jti)? {
                Some(t) => parent = t.parent_jti,
                None => return Ok(true),
            }
        }
        Ok(true)
    }

    /// An approval as it stands (for the human deciding).
    pub fn get_approval(&self, id: &str, now: u64) -> Result<ApprovalState, BrokerError> {
        let mut a = self
            .tasks
            .get_approval(id)?
            .ok_or_else(|| BrokerError::NotFound(format!("no approval with id {id}")))?;
        if (a.status == "pending" || a.status == "approved") && now >= a.expires_at {
            a.status = "expired".into();
        }
        Ok(a)
    }

    /// A human's decision on a pending approval, authenticated by their ID
    /// token (single use, as for a task start).
    pub fn decide_approval(
        &self,
        id: &str,
        d: &ApprovalDecision,
        now: u64,
    ) -> Result<ApprovalState, BrokerError> {
        let human = self
            .oidc
            .load()
            .verify(d.id_token.expose(), now)
            .map_err(|e| BrokerError::Unauthenticated(format!("deciding identity refused: {e}")))?;
        // The token is spent before anything else is checked: a decision
        // refused (an unknown id, a closed approval, a human not entitled,
        // a bad reason) must not leave a valid, unspent ID token with
        // whoever saw it on its way, who could start a task with it.
        if !self
            .tasks
            .use_id_token(&human.replay_key, human.replay_until(), now)?
        {
            return Err(BrokerError::Unauthenticated(
                "deciding identity refused: this ID token was used already (ID tokens are single use)".into(),
            ));
        }
        if let Some(reason) = &d.reason {
            check_reason(reason)?;
        }
        let a = self.get_approval(id, now)?;
        let task = self.task(&a.task_id)?;
        let initiator = human.sub == task.initiator && human.iss == task.initiator_iss;
        let approver = self
            .settings
            .approver_groups
            .iter()
            .any(|a| a.issuer == human.iss && human.groups.contains(&a.group));
        if !initiator && !approver {
            return Err(refuse(
                "not_entitled",
                format!(
                    "{} may not decide for task {}: only its initiator or a member of an approver group ({})",
                    human.sub,
                    a.task_id,
                    if self.settings.approver_groups.is_empty() {
                        "none configured".to_owned()
                    } else {
                        self.settings
                            .approver_groups
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(", ")
                    }
                ),
            ));
        }
        if a.status != "pending" {
            return Err(refuse(
                "approval_closed",
                format!("approval {id} is {}, not pending", a.status),
            ));
        }
        let mut decided = a.clone();
        decided.status = if d.approve { "approved" } else { "denied" }.into();
        decided.decided_by = Some(human.sub.clone());
        decided.reason = d.reason.clone();
        let mut ev = self.event(EventKind::ApprovalDecided, &a.task_id, now);
        ev.actor = Some(a.agent.clone());
        ev.target = Some(a.requested_by.clone());
        ev.tool = Some(a.tool.clone());
        ev.resource = Some(a.resource.clone());
        ev.risk = Some(a.risk);
        ev.input_digest = Some(a.input_digest.clone());
        ev.initiator = Some(human.sub.clone());
        ev.decision = Some(if d.approve { "allow" } else { "deny" }.into());
        ev.reason = Some(match &d.reason {
            Some(r) => format!("approval {id}: {r}"),
            None => format!("approval {id}"),
        });
        // The record first: no decision takes effect unlogged.
        self.append(&ev)?;
        if !self.tasks.transition_approval(id, "pending", &decided)? {
            return Err(refuse(
                "approval_closed",
                format!("approval {id} was decided or used meanwhile"),
            ));
        }
        Ok(decided)
    }
}

/// The longest reason a human may give with a decision (or an operator
/// with a revocation).
const MAX_DECISION_REASON: usize = 1024;

/// A decision's reason goes into the audit log and before other
/// operators: bounded, and plain text (no control characters, which a
/// terminal would act on, nor bidi overrides or zero-width characters).
pub(crate) fn check_reason(reason: &str) -> Result<(), BrokerError> {
    if reason.len() > MAX_DECISION_REASON {
        return Err(BrokerError::bad(
            "reason",
            format!(
                "reason is {} bytes, over the limit of {MAX_DECISION_REASON}",
                reason.len()
            ),
        ));
    }
    if let Some(c) = reason
        .chars()
        .find(|c| baton_core::text::is_unsafe_to_show(*c))
    {
        return Err(BrokerError::bad(
            "reason",
            format!(
                "reason holds the character U+{:04X}: only printable text is kept",
                u32::from(c)
            ),
        ));
    }
    Ok(())
}
