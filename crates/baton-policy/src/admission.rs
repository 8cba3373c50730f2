//! Admission: who may start a task, and which agent may lease a secret.
//!
//! # Place in the flow
//!
//! The broker loads an admission policy directory once at start-up with
//! [`AdmissionPolicy::load_dir`] (`baton broker --admission-policy DIR`) and
//! refuses to start on any [`PolicyError`], exactly as for the hop and call
//! policies: the schema must parse, every policy must validate against it in
//! strict mode, and the schema must describe the two requests below. Then,
//! for every `POST /v1/tasks` whose ID token verified, it asks
//! [`AdmissionPolicy::admit_task_start`], and for every secret lease whose
//! holder and scope checked out, [`AdmissionPolicy::admit_lease`]. Only a
//! permit returns an [`Admitted`] witness; the broker builds the task (or
//! the lease) from the request the witness carries, so what is created is
//! what Cedar saw. No permit, a forbid, or any evaluation error is a
//! [`Refused`] (fail closed).
//!
//! # The model
//!
//! - **Task start**: principal `Human::"<sub>"` (attributes `subject`,
//!   `issuer`, `email` when the token has one, `email_verified`, `groups`
//!   from the token's `groups` claim), action `Action::"start_task"`,
//!   resource `Agent::"<root agent>"` (the hop model's `Agent`, whose
//!   `chain` is just itself). Context: `purpose`, `scope`, `scope_roots`
//!   (the first segment of each permission's resource: `payments` for
//!   `tool:payments.refund:write`; a wildcard never spans roots),
//!   `scope_max_level`, `risk_ceiling`, `risk_ceiling_level`, `ttl_secs`,
//!   `max_depth`, `audiences`.
//! - **Secret lease**: principal `Agent::"<holder>"` (its chain and the
//!   task's initiator), action `Action::"lease_secret"`, resource
//!   `Secret::"<engine>"` (attributes `name`, `kind`: the part before the
//!   first `.`, `permission`: what the engine requires). Context: `purpose`,
//!   `task`, `scope`, `scope_roots`, `depth`, `ttl_secs`, and
//!   `permission_in_scope` (the scope grants the engine's permission;
//!   wildcards resolved by Baton).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use baton_core::{Permission, Purpose, RiskTier, Scope, SpiffeId, TaskId};
use cedar_policy::{
    Authorizer, Context, Entity, EntityId, EntityTypeName, EntityUid, PolicySet,
    RestrictedExpression, Schema,
};

use crate::{
    Decision, PolicyError, Prepared, SCHEMA_FILE, action_uid, agent_entity, check_shape, compile,
    evaluate, prepare_action, read_policy_dir, risk_level, scope_max_level, scope_set, string,
};

/// The action of a task start.
pub const START_TASK_ACTION: &str = "start_task";
/// The action of a secret lease.
pub const LEASE_SECRET_ACTION: &str = "lease_secret";

const HUMAN_TYPE: &str = "Human";
const AGENT_TYPE: &str = "Agent";
const SECRET_TYPE: &str = "Secret";

/// The human who starts a task, as their verified ID token describes them.
#[derive(Clone, PartialEq, Eq)]
pub struct Human {
    /// The token's `sub`.
    pub subject: String,
    /// The token's `iss`.
    pub issuer: String,
    pub email: Option<String>,
    pub email_verified: bool,
    /// The token's `groups` claim.
    pub groups: BTreeSet<String>,
}

impl fmt::Debug for Human {
    // The subject and email are the initiator's identity, which the audit
    // log keeps only as an HMAC: keep them out of logs too.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Human")
            .field("subject", &"...")
            .field("issuer", &self.issuer)
            .field("email", &self.email.as_ref().map(|_| "..."))
            .field("email_verified", &self.email_verified)
            .field("groups", &self.groups)
            .finish()
    }
}

/// A task start to decide: everything the task will be created with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskStart {
    pub human: Human,
    pub root_agent: SpiffeId,
    pub purpose: Purpose,
    pub scope: Scope,
    pub risk_ceiling: RiskTier,
    pub ttl_secs: u64,
    pub max_depth: u32,
    /// The audiences of the root agent's token.
    pub audiences: Vec<String>,
}

/// A secret lease to decide.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretLease {
    /// The holder asking for the lease.
    pub agent: SpiffeId,
    /// The holder's chain: the holder first, the root agent last.
    pub chain: Vec<SpiffeId>,
    /// The task's initiator (OIDC subject).
    pub initiator: String,
    pub task: TaskId,
    pub purpose: Purpose,
    /// The scope of the holder's token.
    pub scope: Scope,
    /// The holder's depth (0 for the root agent).
    pub depth: u32,
    /// The secret engine's name (`apikey`, `postgres.crm`).
    pub engine: String,
    /// The permission the engine requires.
    pub permission: Permission,
    /// How long the lease would live.
    pub ttl_secs: u64,
}

/// Proof that the admission policy permitted `R`. Only this module builds
/// one, and only on an explicit permit; the broker creates the task or the
/// lease from [`Admitted::request`], so it cannot create something else
/// than what was decided.
#[derive(Debug)]
pub struct Admitted<R> {
    request: R,
    policy_ids: Vec<String>,
}

impl<R> Admitted<R> {
    /// What was permitted.
    pub fn request(&self) -> &R {
        &self.request
    }

    /// The permits that allowed it, sorted.
    pub fn policy_ids(&self) -> &[String] {
        &self.policy_ids
    }
}

/// Why a request was not admitted: no permit matched, a forbid did, or a
/// policy could not be evaluated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    /// The action, `start_task` or `lease_secret`.
    pub action: &'static str,
    /// The principal in Cedar syntax, e.g. `Human::"alice"`.
    pub principal: String,
    /// The resource in Cedar syntax, e.g. `Agent::"spiffe://..."`.
    pub resource: String,
    /// The forbids that matched and the policies that failed, sorted
    /// (empty for a default deny).
    pub policy_ids: Vec<String>,
    /// Evaluation errors (for the broker's log; not for the caller).
    pub errors: Vec<String>,
}

impl Refused {
    fn new(action: &'static str, principal: &EntityUid, resource: &EntityUid, d: Decision) -> Self {
        Self {
            action,
            principal: principal.to_string(),
            resource: resource.to_string(),
            policy_ids: d.policy_ids,
            errors: d.errors,
        }
    }

    /// The refusal without naming the principal, e.g. for the audit log,
    /// which keeps a human initiator only as an HMAC.
    pub fn without_principal(&self) -> String {
        if self.policy_ids.is_empty() {
            format!("no policy permits {} on {}", self.action, self.resource)
        } else {
            format!(
                "{} on {} denied by policy {}",
                self.action,
                self.resource,
                self.policy_ids.join(", ")
            )
        }
    }
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.policy_ids.is_empty() {
            write!(
                f,
                "no policy permits {} to {} on {}",
                self.principal, self.action, self.resource
            )
        } else {
            write!(
                f,
                "{} may not {} on {}: denied by policy {}",
                self.principal,
                self.action,
                self.resource,
                self.policy_ids.join(", ")
            )
        }
    }
}

/// A validated admission schema and policy set.
pub struct AdmissionPolicy {
    policies: PolicySet,
    authorizer: Authorizer,
    start: Prepared,
    lease: Prepared,
    human_type: EntityTypeName,
    agent_type: EntityTypeName,
    secret_type: EntityTypeName,
}

impl fmt::Debug for AdmissionPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AdmissionPolicy")
            .field("policies", &self.policy_ids())
            .finish_non_exhaustive()
    }
}

impl AdmissionPolicy {
    /// Loads `<dir>/schema.cedarschema` and every `<dir>/*.cedar` and
    /// validates them as [`crate::Engine::load_dir`] does; errors name
    /// `<dir>/<file>:<line>:<column>`.
    pub fn load_dir(dir: &Path) -> Result<Self, PolicyError> {
        let (schema_file, schema, policies) = read_policy_dir(dir)?;
        Self::build(&schema_file, &schema, &policies)
    }

    /// Builds from sources in memory: `policies` are (file name, source).
    pub fn from_sources(schema: &str, policies: &[(String, String)]) -> Result<Self, PolicyError> {
        Self::build(SCHEMA_FILE, schema, policies)
    }

    fn build(
        schema_file: &str,
        schema_src: &str,
        files: &[(String, String)],
    ) -> Result<Self, PolicyError> {
        let (schema, policies) = compile(schema_file, schema_src, files)?;
        let model = |message: String| PolicyError::Model {
            file: schema_file.to_owned(),
            message,
        };
        let type_name = |name: &str| {
            EntityTypeName::from_str(name).map_err(|e| model(format!("entity type {name}: {e}")))
        };
        let action_type = type_name("Action")?;
        let actions = schema
            .action_entities()
            .map_err(|e| model(format!("its actions do not form a hierarchy: {e}")))?;
        let prepare = |name: &str| -> Result<Prepared, PolicyError> {
            if !schema.actions().any(|uid| uid.id().unescaped() == name) {
                return Err(model(format!(
                    "the schema declares no `{name}` action, so no such request could be \
                     admitted (is this the admission policy directory?)"
                )));
            }
            prepare_action(&actions, &policies, &action_uid(&action_type, name)).map_err(model)
        };
        let admission = Self {
            start: prepare(START_TASK_ACTION)?,
            lease: prepare(LEASE_SECRET_ACTION)?,
            policies: policies.clone(),
            authorizer: Authorizer::new(),
            human_type: type_name(HUMAN_TYPE)?,
            agent_type: type_name(AGENT_TYPE)?,
            secret_type: type_name(SECRET_TYPE)?,
        };
        admission.check_model(&schema).map_err(model)?;
        Ok(admission)
    }

    /// Probes both request shapes against the schema once, so evaluation
    /// can skip schema checks.
    fn check_model(&self, schema: &Schema) -> Result<(), String> {
        let agent = SpiffeId::parse("spiffe://example.org/agents/probe")
            .map_err(|e| format!("probe identity: {e}"))?;
        let scope = Scope::parse(&["tool:probe:read"]).map_err(|e| format!("probe scope: {e}"))?;
        let purpose = Purpose::from_str("probe").map_err(|e| format!("probe purpose: {e}"))?;
        let permission =
            Permission::parse("secret:probe:issue").map_err(|e| format!("probe: {e}"))?;
        for email in [None, Some("probe@example.org".to_owned())] {
            let start = TaskStart {
                human: Human {
                    subject: "probe".into(),
                    issuer: "https://probe.invalid".into(),
                    email,
                    email_verified: false,
                    groups: BTreeSet::from(["probe".to_owned()]),
                },
                root_agent: agent.clone(),
                purpose: purpose.clone(),
                scope: scope.clone(),
                risk_ceiling: RiskTier::Read,
                ttl_secs: 60,
                max_depth: 1,
                audiences: vec!["probe".into()],
            };
            let (_, resource, entities, context) = self.start_parts(&start)?;
            check_shape(schema, &self.start.uid, &entities, &resource, context)
                .map_err(|e| format!("action `{START_TASK_ACTION}`: {e}"))?;
        }
        let lease = SecretLease {
            agent: agent.clone(),
            chain: vec![agent],
            initiator: "probe".into(),
            task: TaskId::from_random([0; 16]),
            purpose,
            scope,
            depth: 0,
            engine: "probe".into(),
            permission,
            ttl_secs: 60,
        };
        let (_, resource, entities, context) = self.lease_parts(&lease)?;
        check_shape(schema, &self.lease.uid, &entities, &resource, context)
            .map_err(|e| format!("action `{LEASE_SECRET_ACTION}`: {e}"))
    }

    /// The ids of every loaded policy, sorted.
    pub fn policy_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self
            .policies
            .policies()
            .map(|p| p.id().to_string())
            .collect();
        ids.sort();
        ids
    }

    /// May this human start this task? Only an explicit permit (and no
    /// forbid, and no evaluation error) admits it.
    pub fn admit_task_start(&self, req: TaskStart) -> Result<Admitted<TaskStart>, Refused> {
        let principal = self.uid(&self.human_type, &req.human.subject);
        let resource = self.uid(&self.agent_type, req.root_agent.as_str());
        let decision = match self.start_parts(&req) {
            Ok((p, r, entities, context)) => {
                evaluate(&self.authorizer, &self.start, p, r, context, entities)
            }
            Err(e) => Decision::refused(e),
        };
        admit(req, START_TASK_ACTION, &principal, &resource, decision)
    }

    /// May this holder lease a secret from this engine?
    pub fn admit_lease(&self, req: SecretLease) -> Result<Admitted<SecretLease>, Refused> {
        let principal = self.uid(&self.agent_type, req.agent.as_str());
        let resource = self.uid(&self.secret_type, &req.engine);
        let decision = match self.lease_parts(&req) {
            Ok((p, r, entities, context)) => {
                evaluate(&self.authorizer, &self.lease, p, r, context, entities)
            }
            Err(e) => Decision::refused(e),
        };
        admit(req, LEASE_SECRET_ACTION, &principal, &resource, decision)
    }

    fn uid(&self, ty: &EntityTypeName, id: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(ty.clone(), EntityId::new(id))
    }

    fn start_parts(&self, req: &TaskStart) -> Result<Parts, String> {
        let h = &req.human;
        let principal = self.uid(&self.human_type, &h.subject);
        let mut attrs = HashMap::from([
            ("subject".to_owned(), string(&h.subject)),
            ("issuer".to_owned(), string(&h.issuer)),
            (
                "email_verified".to_owned(),
                RestrictedExpression::new_bool(h.email_verified),
            ),
            (
                "groups".to_owned(),
                RestrictedExpression::new_set(h.groups.iter().map(|g| string(g))),
            ),
        ]);
        if let Some(email) = &h.email {
            attrs.insert("email".to_owned(), string(email));
        }
        let human = Entity::new(principal.clone(), attrs, HashSet::new())
            .map_err(|e| format!("human: {e}"))?;
        let resource = self.uid(&self.agent_type, req.root_agent.as_str());
        let agent = agent_entity(
            resource.clone(),
            &req.root_agent,
            [&req.root_agent],
            &h.subject,
        )?;
        let context = Context::from_pairs([
            ("purpose".to_owned(), string(req.purpose.as_str())),
            ("scope".to_owned(), scope_set(&req.scope)),
            ("scope_roots".to_owned(), scope_roots(&req.scope)),
            (
                "scope_max_level".to_owned(),
                RestrictedExpression::new_long(scope_max_level(&req.scope)),
            ),
            ("risk_ceiling".to_owned(), string(req.risk_ceiling.as_str())),
            (
                "risk_ceiling_level".to_owned(),
                RestrictedExpression::new_long(risk_level(req.risk_ceiling)),
            ),
            ("ttl_secs".to_owned(), long("ttl_secs", req.ttl_secs)?),
            (
                "max_depth".to_owned(),
                RestrictedExpression::new_long(req.max_depth.into()),
            ),
            (
                "audiences".to_owned(),
                RestrictedExpression::new_set(req.audiences.iter().map(|a| string(a))),
            ),
        ])
        .map_err(|e| format!("context: {e}"))?;
        Ok((principal, resource, vec![human, agent], context))
    }

    fn lease_parts(&self, req: &SecretLease) -> Result<Parts, String> {
        let principal = self.uid(&self.agent_type, req.agent.as_str());
        let agent = agent_entity(
            principal.clone(),
            &req.agent,
            std::iter::once(&req.agent).chain(&req.chain),
            &req.initiator,
        )?;
        let resource = self.uid(&self.secret_type, &req.engine);
        let kind = req
            .engine
            .split_once('.')
            .map_or(req.engine.as_str(), |(kind, _)| kind);
        let secret = Entity::new(
            resource.clone(),
            HashMap::from([
                ("name".to_owned(), string(&req.engine)),
                ("kind".to_owned(), string(kind)),
                ("permission".to_owned(), string(&req.permission.to_string())),
            ]),
            HashSet::new(),
        )
        .map_err(|e| format!("secret {}: {e}", req.engine))?;
        let context = Context::from_pairs([
            ("purpose".to_owned(), string(req.purpose.as_str())),
            ("task".to_owned(), string(req.task.as_str())),
            ("scope".to_owned(), scope_set(&req.scope)),
            ("scope_roots".to_owned(), scope_roots(&req.scope)),
            (
                "depth".to_owned(),
                RestrictedExpression::new_long(req.depth.into()),
            ),
            ("ttl_secs".to_owned(), long("ttl_secs", req.ttl_secs)?),
            (
                "permission_in_scope".to_owned(),
                RestrictedExpression::new_bool(req.scope.allows(&req.permission)),
            ),
        ])
        .map_err(|e| format!("context: {e}"))?;
        Ok((principal, resource, vec![agent, secret], context))
    }
}

/// (principal, resource, entities with the principal first, context).
type Parts = (EntityUid, EntityUid, Vec<Entity>, Context);

fn admit<R>(
    request: R,
    action: &'static str,
    principal: &EntityUid,
    resource: &EntityUid,
    decision: Decision,
) -> Result<Admitted<R>, Refused> {
    if decision.allowed {
        Ok(Admitted {
            request,
            policy_ids: decision.policy_ids,
        })
    } else {
        Err(Refused::new(action, principal, resource, decision))
    }
}

fn long(field: &str, v: u64) -> Result<RestrictedExpression, String> {
    i64::try_from(v)
        .map(RestrictedExpression::new_long)
        .map_err(|_| format!("{field} {v} is out of range"))
}

/// The first segment of each permission's resource (`payments` for
/// `tool:payments.refund:write` and `dataset:payments:read`). A resource's
/// first segment is never a wildcard, so no permission reaches outside
/// its root.
fn scope_roots(scope: &Scope) -> RestrictedExpression {
    let roots: BTreeSet<&str> = scope
        .permissions()
        .map(|p| p.resource().split('.').next().unwrap_or_default())
        .collect();
    RestrictedExpression::new_set(roots.into_iter().map(string))
}
