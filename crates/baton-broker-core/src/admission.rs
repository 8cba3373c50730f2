//! Who may start a task: the broker's side of the admission policy.
//!
//! Place in the flow: `start_task` verifies the ID token (and the request's
//! bounds), then asks [`admit_task_start`]; only the
//! [`baton_policy::Admitted`] witness it returns lets the task be built, and
//! the task is built from the request the witness carries. A refusal is
//! written to the audit log (a `task_refused` event under a fresh task id,
//! which `baton audit trace` shows) before the caller gets 403
//! `not_permitted`. Secret leases ask [`baton_policy::AdmissionPolicy::admit_lease`]
//! the same way (see [`crate::secrets`]).
//!
//! Where the policy comes from ([`AdmissionSource`]): a directory
//! (`--admission-policy DIR`), or sources in memory. A broker that trusts a
//! real OIDC issuer and was given neither refuses to start; one whose only
//! issuer is the dev issuer (`baton dev`, `--dev-issuer`) uses the example
//! set of `deploy/policies/admission`, which it embeds.

use std::collections::BTreeSet;
use std::path::PathBuf;

use baton_audit::EventKind;
use baton_core::TaskId;
use baton_core::api::StartTaskRequest;
use baton_policy::{AdmissionPolicy, Admitted, Human, PolicyError, TaskStart};

use crate::error::{BrokerError, random_bytes};
use crate::oidc::Initiator;

/// The example admission schema and policies of `deploy/policies/admission`,
/// built in for brokers whose only OIDC issuer is the dev issuer.
pub const EXAMPLE_ADMISSION_POLICIES: &[(&str, &str)] = &[
    (
        "deploy/policies/admission/schema.cedarschema",
        include_str!("../../../deploy/policies/admission/schema.cedarschema"),
    ),
    (
        "deploy/policies/admission/admission.cedar",
        include_str!("../../../deploy/policies/admission/admission.cedar"),
    ),
];

/// Where the admission policy comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdmissionSource {
    /// None given. A broker that trusts an OIDC issuer refuses to start;
    /// with the dev issuer alone (or no issuer, when no task can start),
    /// the embedded example set is used.
    Unset,
    /// `schema.cedarschema` and `*.cedar` in a directory.
    Dir(PathBuf),
    /// (file name, source) pairs, one of them a `.cedarschema`.
    Sources(Vec<(String, String)>),
}

/// Why the admission policy could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionLoadError {
    #[error(
        "this broker trusts the OIDC issuer(s) {issuers} but has no admission policy, so it \
         could not decide who may start a task: pass --admission-policy DIR (a Cedar schema and \
         policies; the example set is deploy/policies/admission)"
    )]
    Required { issuers: String },
    #[error("{0}")]
    Policy(#[from] PolicyError),
}

/// Loads the admission policy from `source`; `issuers` are the real OIDC
/// issuers the broker trusts (the dev issuer is not one).
pub fn load(
    source: &AdmissionSource,
    issuers: &[String],
) -> Result<AdmissionPolicy, AdmissionLoadError> {
    let sources: Vec<(String, String)> = match source {
        AdmissionSource::Dir(dir) => return Ok(AdmissionPolicy::load_dir(dir)?),
        AdmissionSource::Sources(s) => s.clone(),
        AdmissionSource::Unset if !issuers.is_empty() => {
            return Err(AdmissionLoadError::Required {
                issuers: issuers.join(", "),
            });
        }
        AdmissionSource::Unset => {
            tracing::warn!(
                "no --admission-policy: the example admission policies (deploy/policies/admission) decide task starts and secret leases; no OIDC issuer but the dev one is trusted"
            );
            EXAMPLE_ADMISSION_POLICIES
                .iter()
                .map(|(n, s)| ((*n).to_owned(), (*s).to_owned()))
                .collect()
        }
    };
    let (schema, policies) = baton_policy::split_schema(sources);
    Ok(AdmissionPolicy::from_sources(&schema, &policies)?)
}

/// Asks the admission `policy` whether the human `initiator` may start the
/// task `req` describes. A refusal is logged through `log` (an event of
/// kind `task_refused`, under a fresh task id that the message names) and
/// returned as 403 `not_permitted`; a refusal that cannot be logged is
/// returned as the logging error (still refused).
pub fn admit_task_start(
    policy: &AdmissionPolicy,
    log: impl FnOnce(&baton_audit::AuditEvent) -> Result<(), BrokerError>,
    initiator: &Initiator,
    req: &StartTaskRequest,
    now: u64,
) -> Result<Admitted<TaskStart>, BrokerError> {
    let start = TaskStart {
        human: Human {
            subject: initiator.sub.clone(),
            issuer: initiator.iss.clone(),
            email: initiator.email.clone(),
            email_verified: initiator.email_verified,
            groups: initiator.groups.iter().cloned().collect::<BTreeSet<_>>(),
        },
        root_agent: req.root_agent.clone(),
        purpose: req.purpose.clone(),
        scope: req.scope.clone(),
        risk_ceiling: req.risk_ceiling,
        ttl_secs: req.ttl_secs,
        max_depth: req.max_depth,
        audiences: req.audience.clone(),
    };
    let refused = match policy.admit_task_start(start) {
        Ok(admitted) => return Ok(admitted),
        Err(refused) => refused,
    };
    // The refused task never exists; its id names the refusal in the log.
    let id = TaskId::from_random(random_bytes::<16>()?);
    let mut ev = baton_audit::AuditEvent::new(EventKind::TaskRefused, now, id.clone());
    ev.initiator = Some(initiator.sub.clone());
    ev.target = Some(req.root_agent.clone());
    ev.purpose = Some(req.purpose.clone());
    ev.scope = Some(req.scope.clone());
    ev.risk = Some(req.risk_ceiling);
    ev.depth = Some(0);
    ev.decision = Some("refused".into());
    // The initiator is kept only as an HMAC: the reason must not name it.
    ev.reason = Some(format!("not_permitted: {}", refused.without_principal()));
    ev.policy_ids = refused.policy_ids.clone();
    log(&ev)?;
    if !refused.errors.is_empty() {
        tracing::warn!(task = %id, errors = %refused.errors.join("; "), "admission policy evaluation failed (refused)");
    }
    tracing::warn!(task = %id, root_agent = %req.root_agent, purpose = %req.purpose, policies = %refused.policy_ids.join(", "), "task start refused by the admission policy");
    Err(BrokerError::Forbidden {
        code: "not_permitted",
        message: format!("task start refused: {refused} (audit: baton audit trace {id})"),
    })
}
