//! Cedar policy for Baton: one decision for every delegation hop (asked by
//! the broker) and for every tool call (asked by the tool server, through
//! `baton-verify`); and, in a policy set of its own ([`AdmissionPolicy`]),
//! for every task start and secret lease (asked by the broker), whose permit
//! is the [`Admitted`] witness.
//!
//! # Place in the flow
//!
//! The broker loads a policy directory once at start-up with
//! [`Engine::load_dir`] and refuses to start on any [`PolicyError`]: the
//! schema must parse, every policy must parse and validate against it in
//! strict mode, and the schema must still describe the requests Baton sends.
//! After that an [`Engine`] is immutable, `Send + Sync`, and shared in an
//! `Arc`. Everything that does not depend on the request is prepared once:
//! the schema checks, the [`cedar_policy::Authorizer`], and for each action
//! its entity (with its tier group) and the subset of policies whose action
//! scope can match it, so a call to `crm.search` never evaluates the
//! delegation or export policies. What remains per request is building the
//! principal and resource entities and the context (Cedar has no cheaper
//! public constructor) and evaluating: about 12 µs of CPU per call on a
//! 2-core development VM, of which Cedar's evaluation is about 3.5 µs (the
//! `#[ignore]`d `bench_authorize_call` test measures it).
//!
//! # The model
//!
//! - **Principal** `Agent::"<spiffe id>"` with attributes `spiffe_id`,
//!   `trust_domain` (`"example.org"`), `path` (`"/agents/researcher"`),
//!   `chain: Set<String>` (every SPIFFE ID in the delegation chain, the agent
//!   itself included: Cedar has no loops, so the chain is flattened here) and
//!   `initiator` (the human's OIDC subject).
//! - **Tool call** ([`Engine::authorize_call`]): action `Action::"<tool>"`
//!   (`crm.search`), each tool declared in the schema as a member of exactly
//!   one tier group (`Action::"read-tier"`, `"write-tier"`, `"delete-tier"`,
//!   `"purchase-tier"`, `"export-tier"`), so policies say
//!   `action in Action::"read-tier"`. Resource `Resource::"<resource>"`
//!   (`"dataset:crm"`) with attribute `kind` (`"dataset"`, the part before
//!   the first `:`). Context: `purpose`, `scope: Set<String>`, `risk`
//!   (`"read"`), `risk_level` (read=0, write=1, delete=2, purchase=3,
//!   export=4), `depth` (0 for the root agent, +1 per hop), and two answers
//!   Cedar cannot compute because scopes have wildcards: `tool_in_scope`
//!   (the scope grants `tool:<tool>:<risk>`) and `resource_in_scope` (it
//!   grants `<resource>:<risk>`, e.g. `dataset:crm:read`).
//! - **Hop** ([`Engine::authorize_hop`]): action `Action::"delegate"`,
//!   principal the delegating agent, resource `Agent::"<target>"` (whose
//!   `chain` is the chain it would hold: itself, then the delegator's).
//!   Context: `purpose`, `scope` (requested), `depth` (of the new hop),
//!   `risk_ceiling`, `risk_ceiling_level`, and `scope_max_level`: the highest
//!   level named by a requested permission's action (`*` and words that are
//!   not tiers count as 4).
//!
//! Default deny; a `forbid` beats any `permit`. A call whose risk tier is not
//! the tool's tier in the schema, a tool the schema does not declare, and any
//! evaluation error all deny (fail closed). Policies carry `@id("...")`
//! annotations, which is what [`Decision::policy_ids`] reports; a policy
//! without one is named `<file>#policy<N>`. `deploy/policies/README.md`
//! documents the example policy set and which policies decide the reference
//! flow.

mod admission;
mod error;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use baton_core::{Permission, Purpose, RiskTier, Scope, SpiffeId};
use cedar_policy::{
    ActionConstraint, Authorizer, Context, Effect, Entities, Entity, EntityId, EntityTypeName,
    EntityUid, PolicyId, PolicySet, Request, Response, RestrictedExpression, Schema,
    ValidationMode, Validator,
};
use serde::Serialize;

pub use admission::{
    AdmissionPolicy, Admitted, Human, LEASE_SECRET_ACTION, Refused, START_TASK_ACTION, SecretLease,
    TaskStart,
};
pub use error::{Location, PolicyError, SourceError};

/// The schema's file name in a policy directory.
pub const SCHEMA_FILE: &str = "schema.cedarschema";
/// The extension of policy files in a policy directory.
pub const POLICY_EXTENSION: &str = "cedar";
/// The action of a delegation hop.
pub const DELEGATE_ACTION: &str = "delegate";

const AGENT_TYPE: &str = "Agent";
const RESOURCE_TYPE: &str = "Resource";

/// Every tier, in increasing order, with its level and its action group.
const TIERS: [(RiskTier, i64, &str); 5] = [
    (RiskTier::Read, 0, "read-tier"),
    (RiskTier::Write, 1, "write-tier"),
    (RiskTier::Delete, 2, "delete-tier"),
    (RiskTier::Purchase, 3, "purchase-tier"),
    (RiskTier::Export, 4, "export-tier"),
];
/// The level of a permission whose action is `*` or not a tier.
const MAX_LEVEL: i64 = 4;

/// The numeric level of a tier, as policies see it in `risk_level`.
pub fn risk_level(tier: RiskTier) -> i64 {
    TIERS
        .iter()
        .find(|(t, _, _)| *t == tier)
        .map_or(MAX_LEVEL, |(_, level, _)| *level)
}

/// The action group a tier's tools belong to (`"read-tier"`).
pub fn tier_group(tier: RiskTier) -> &'static str {
    TIERS
        .iter()
        .find(|(t, _, _)| *t == tier)
        .map_or("export-tier", |(_, _, group)| group)
}

/// A delegation hop the broker asks about: `from` hands `scope` to `to`.
#[derive(Debug, Clone, Copy)]
pub struct HopRequest<'a> {
    pub from: &'a SpiffeId,
    pub to: &'a SpiffeId,
    /// The delegator's chain: current holder (`from`) first, root agent last.
    pub chain: &'a [SpiffeId],
    pub initiator: &'a str,
    pub purpose: &'a Purpose,
    /// The scope requested for `to`.
    pub scope: &'a Scope,
    /// The depth of the new hop (the root agent is 0, its first hop 1).
    pub depth: u32,
    pub risk_ceiling: RiskTier,
}

/// A tool call a tool server asks about.
#[derive(Debug, Clone, Copy)]
pub struct CallRequest<'a> {
    pub agent: &'a SpiffeId,
    /// Current holder (`agent`) first, root agent last.
    pub chain: &'a [SpiffeId],
    pub initiator: &'a str,
    /// The tool, an action declared in the schema, e.g. `crm.search`.
    pub tool: &'a str,
    /// What it acts on, e.g. `dataset:crm`.
    pub resource: &'a str,
    pub purpose: &'a Purpose,
    /// The scope of the agent's delegation token.
    pub scope: &'a Scope,
    /// The tool's risk tier; must be the tier the schema puts it in.
    pub risk: RiskTier,
    pub depth: u32,
}

/// The answer to one question.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// The policies that determined it, sorted: the permits that allowed it;
    /// or the forbids that denied it and the policies whose evaluation
    /// failed (empty for a default deny).
    pub policy_ids: Vec<String>,
    /// Evaluation errors; any error denies (fail closed).
    pub errors: Vec<String>,
    /// An allowed tool call waits for a human's approval: a permit that
    /// allowed it carries the [`APPROVAL_ANNOTATION`] annotation.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub approval: bool,
}

/// The annotation on a `permit` that makes the tool calls it allows wait
/// for a human's approval (`@approval("why")`; the value is a comment
/// for the policy's readers). Only permits of tool actions may carry it:
/// on a `forbid` it would mean nothing, and a hop cannot be held.
pub const APPROVAL_ANNOTATION: &str = "approval";

impl Decision {
    fn refused(error: String) -> Self {
        Self {
            allowed: false,
            policy_ids: Vec::new(),
            errors: vec![error],
            approval: false,
        }
    }
}

/// An action the schema declares (a tool, or `delegate`) with what its
/// evaluation needs, prepared at load time.
#[derive(Debug, Clone)]
struct Prepared {
    uid: EntityUid,
    /// The action's entity, with its groups as ancestors, so that
    /// `action in Action::"read-tier"` holds.
    entities: Vec<Entity>,
    /// The policies whose action scope can match this action.
    ///
    /// INVARIANT: a policy whose action scope excludes the action is false
    /// before its conditions are evaluated (Cedar checks the scope first and
    /// `&&` short-circuits), so it can neither be satisfied nor fail:
    /// leaving it out changes no decision, and saves evaluating it.
    policies: PolicySet,
    /// The ids of those policies that carry [`APPROVAL_ANNOTATION`], found
    /// once here: Cedar parses the key each time an annotation is looked up,
    /// which would cost a lexer run per policy per call.
    approval: HashSet<cedar_policy::PolicyId>,
}

/// A tool the schema declares.
#[derive(Debug, Clone)]
struct Tool {
    action: Prepared,
    tier: RiskTier,
    /// `tool:<name>:<tier>`, the permission a call needs (`None` when the
    /// name cannot be a permission's resource: no scope grants it).
    permission: Option<Permission>,
}

/// A validated schema and policy set, ready to answer hops and calls.
pub struct Engine {
    /// Every policy (each action evaluates its own subset).
    policies: PolicySet,
    authorizer: Authorizer,
    tools: BTreeMap<String, Tool>,
    delegate: Prepared,
    agent_type: EntityTypeName,
    resource_type: EntityTypeName,
}

impl fmt::Debug for Engine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Engine")
            .field("policies", &self.policy_ids())
            .field("tools", &self.tools())
            .finish_non_exhaustive()
    }
}

/// Splits named sources (as a policy directory holds them) into the schema
/// (the first `*.cedarschema`, empty without one) and the policies.
pub fn split_schema(
    sources: impl IntoIterator<Item = (String, String)>,
) -> (String, Vec<(String, String)>) {
    let (schema, policies): (Vec<_>, Vec<_>) = sources
        .into_iter()
        .partition(|(name, _)| name.ends_with(".cedarschema"));
    let schema = schema
        .into_iter()
        .next()
        .map(|(_, s)| s)
        .unwrap_or_default();
    (schema, policies)
}

impl Engine {
    /// Loads `<dir>/schema.cedarschema` (Cedar schema syntax) and every
    /// `<dir>/*.cedar`, and validates the policies against the schema in
    /// strict mode. Errors name `<dir>/<file>:<line>:<column>`.
    pub fn load_dir(dir: &Path) -> Result<Engine, PolicyError> {
        let (schema_file, schema, policies) = read_policy_dir(dir)?;
        Self::build(&schema_file, &schema, &policies)
    }

    /// Builds an engine from sources in memory: `policies` are (file name,
    /// source) pairs, the names used in errors and in fallback policy ids.
    /// The schema is reported as `schema.cedarschema`.
    pub fn from_sources(
        schema: &str,
        policies: &[(String, String)],
    ) -> Result<Engine, PolicyError> {
        Self::build(SCHEMA_FILE, schema, policies)
    }

    fn build(
        schema_file: &str,
        schema_src: &str,
        files: &[(String, String)],
    ) -> Result<Engine, PolicyError> {
        let (schema, policies) = compile(schema_file, schema_src, files)?;
        Self::fit_model(schema_file, &schema, policies)
    }

    /// Checks that the schema describes the requests Baton sends, and
    /// indexes its tools by name and tier.
    fn fit_model(
        schema_file: &str,
        schema: &Schema,
        policies: PolicySet,
    ) -> Result<Engine, PolicyError> {
        let model = |message: String| PolicyError::Model {
            file: schema_file.to_owned(),
            message,
        };
        let agent_type = EntityTypeName::from_str(AGENT_TYPE)
            .map_err(|e| model(format!("entity type {AGENT_TYPE}: {e}")))?;
        let resource_type = EntityTypeName::from_str(RESOURCE_TYPE)
            .map_err(|e| model(format!("entity type {RESOURCE_TYPE}: {e}")))?;
        let action_type = EntityTypeName::from_str("Action")
            .map_err(|e| model(format!("entity type Action: {e}")))?;
        let actions = schema
            .action_entities()
            .map_err(|e| model(format!("its actions do not form a hierarchy: {e}")))?;
        // The tier groups are groups even when no tool is in them yet.
        let groups: HashSet<String> = schema
            .action_groups()
            .map(|uid| uid.id().unescaped().to_owned())
            .chain(TIERS.iter().map(|(_, _, group)| (*group).to_owned()))
            .collect();

        if !schema
            .actions()
            .any(|uid| uid.id().unescaped() == DELEGATE_ACTION)
        {
            return Err(model(format!(
                "the schema declares no `{DELEGATE_ACTION}` action, so no hop could be allowed"
            )));
        }
        let prepare = |uid: &EntityUid| -> Result<Prepared, PolicyError> {
            prepare_action(&actions, &policies, uid).map_err(model)
        };
        let delegate = prepare(&action_uid(&action_type, DELEGATE_ACTION))?;
        for p in policies.policies() {
            if p.annotation(APPROVAL_ANNOTATION).is_none() {
                continue;
            }
            if p.effect() == Effect::Forbid {
                return Err(model(format!(
                    "policy `{}`: @{APPROVAL_ANNOTATION} is for permits (a forbid denies; there is nothing to approve)",
                    p.id()
                )));
            }
            if delegate.policies.policy(p.id()).is_some() {
                return Err(model(format!(
                    "policy `{}`: @{APPROVAL_ANNOTATION} holds tool calls, but this permit also matches `{DELEGATE_ACTION}` (a hop cannot wait for a human); constrain its action to tools",
                    p.id()
                )));
            }
        }
        let mut engine = Engine {
            policies: PolicySet::new(),
            authorizer: Authorizer::new(),
            tools: BTreeMap::new(),
            delegate,
            agent_type,
            resource_type,
        };

        // A probe of each request shape, validated against the schema once
        // here so that evaluation can skip schema checks.
        let probe_agent = SpiffeId::parse("spiffe://example.org/agents/probe")
            .map_err(|e| model(format!("probe identity: {e}")))?;
        let probe_scope =
            Scope::parse(&["tool:probe:read"]).map_err(|e| model(format!("probe scope: {e}")))?;
        let probe_purpose =
            Purpose::from_str("probe").map_err(|e| model(format!("probe purpose: {e}")))?;
        let chain = [probe_agent.clone()];

        let mut tools = BTreeMap::new();
        for uid in schema.actions() {
            let name = uid.id().unescaped();
            if groups.contains(name) {
                continue;
            }
            if name == DELEGATE_ACTION {
                let hop = HopRequest {
                    from: &probe_agent,
                    to: &probe_agent,
                    chain: &chain,
                    initiator: "probe",
                    purpose: &probe_purpose,
                    scope: &probe_scope,
                    depth: 1,
                    risk_ceiling: RiskTier::Read,
                };
                let (entities, context) = engine.hop_parts(&hop).map_err(model)?;
                check_shape(schema, uid, &entities, &engine.agent(&probe_agent), context)
                    .map_err(|e| model(format!("action `{name}`: {e}")))?;
                continue;
            }
            let tiers: Vec<RiskTier> = TIERS
                .iter()
                .filter(|(_, _, group)| {
                    actions.is_ancestor_of(&action_uid(&action_type, group), uid)
                })
                .map(|(tier, _, _)| *tier)
                .collect();
            let [tier] = tiers.as_slice() else {
                return Err(model(format!(
                    "tool `{name}` must be in exactly one tier group (read-tier, write-tier, \
                     delete-tier, purchase-tier, export-tier); it is in {}",
                    tiers.len()
                )));
            };
            let tool = Tool {
                action: prepare(uid)?,
                tier: *tier,
                permission: Permission::parse(&format!("tool:{name}:{tier}")).ok(),
            };
            let call = CallRequest {
                agent: &probe_agent,
                chain: &chain,
                initiator: "probe",
                tool: name,
                resource: "dataset:probe",
                purpose: &probe_purpose,
                scope: &probe_scope,
                risk: *tier,
                depth: 0,
            };
            let (entities, context) = engine.call_parts(&call, &tool).map_err(model)?;
            check_shape(
                schema,
                uid,
                &entities,
                &engine.resource("dataset:probe"),
                context,
            )
            .map_err(|e| model(format!("tool `{name}`: {e}")))?;
            tools.insert(name.to_owned(), tool);
        }
        engine.tools = tools;
        engine.policies = policies;
        Ok(engine)
    }

    /// Decides a delegation hop: may `from` hand `scope` to `to`?
    pub fn authorize_hop(&self, req: &HopRequest<'_>) -> Decision {
        let (entities, context) = match self.hop_parts(req) {
            Ok(parts) => parts,
            Err(e) => return Decision::refused(e),
        };
        self.decide(
            &self.delegate,
            self.agent(req.from),
            self.agent(req.to),
            context,
            entities,
        )
    }

    /// Decides a tool call: may `agent` run `tool` on `resource` now?
    pub fn authorize_call(&self, req: &CallRequest<'_>) -> Decision {
        let Some(tool) = self.tools.get(req.tool) else {
            return Decision::refused(format!(
                "tool `{}` is not declared in the policy schema",
                req.tool
            ));
        };
        if tool.tier != req.risk {
            return Decision::refused(format!(
                "tool `{}` is {} in the policy schema, but the call says {}",
                req.tool,
                tier_group(tool.tier),
                req.risk
            ));
        }
        let (entities, context) = match self.call_parts(req, tool) {
            Ok(parts) => parts,
            Err(e) => return Decision::refused(e),
        };
        self.decide(
            &tool.action,
            self.agent(req.agent),
            self.resource(req.resource),
            context,
            entities,
        )
    }

    /// Names of the tools (actions other than `delegate` and the tier groups)
    /// the schema declares, sorted.
    pub fn tools(&self) -> Vec<String> {
        self.tools.keys().cloned().collect()
    }

    /// Whether some policy may make a call of `tool` wait for a human's
    /// approval (a permit of it carries [`APPROVAL_ANNOTATION`]): only
    /// then need a gateway decide a call before it forwards it.
    pub fn may_require_approval(&self, tool: &str) -> bool {
        self.tools
            .get(tool)
            .is_some_and(|t| !t.action.approval.is_empty())
    }

    /// The tier the schema puts `tool` in, if it declares it.
    pub fn tool_tier(&self, tool: &str) -> Option<RiskTier> {
        self.tools.get(tool).map(|t| t.tier)
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

    fn decide(
        &self,
        action: &Prepared,
        principal: EntityUid,
        resource: EntityUid,
        context: Context,
        entities: Vec<Entity>,
    ) -> Decision {
        // INVARIANT: the request shapes were validated against the schema at
        // load time (`fit_model`), so no schema is needed here.
        evaluate(
            &self.authorizer,
            action,
            principal,
            resource,
            context,
            entities,
        )
    }
}

/// An action's entity (with its groups as ancestors) and the subset of
/// `policies` whose action scope can match it.
fn prepare_action(
    actions: &Entities,
    policies: &PolicySet,
    uid: &EntityUid,
) -> Result<Prepared, String> {
    // The action's own entity carries its (transitively closed) groups,
    // which is all `action in Action::"read-tier"` reads; the group
    // entities themselves need not be in the store.
    let entities: Vec<Entity> = actions.get(uid).into_iter().cloned().collect();
    let mut subset = PolicySet::new();
    let mut approval = HashSet::new();
    for policy in policies.policies() {
        let applies = match policy.action_constraint() {
            ActionConstraint::Any => true,
            ActionConstraint::Eq(a) => &a == uid,
            ActionConstraint::In(groups) => groups
                .iter()
                .any(|g| g == uid || actions.is_ancestor_of(g, uid)),
        };
        if applies {
            if policy.annotation(APPROVAL_ANNOTATION).is_some() {
                approval.insert(policy.id().clone());
            }
            subset
                .add(policy.clone())
                .map_err(|e| format!("policies for action `{}`: {e}", uid.id().unescaped()))?;
        }
    }
    Ok(Prepared {
        uid: uid.clone(),
        entities,
        policies: subset,
        approval,
    })
}

/// Evaluates one request against an action's policies. The caller
/// guarantees the request's shape was validated against the schema at load
/// time (a probe through [`check_shape`]).
fn evaluate(
    authorizer: &Authorizer,
    action: &Prepared,
    principal: EntityUid,
    resource: EntityUid,
    context: Context,
    mut entities: Vec<Entity>,
) -> Decision {
    let request = match Request::new(principal, action.uid.clone(), resource, context, None) {
        Ok(r) => r,
        Err(e) => return Decision::refused(format!("request: {e}")),
    };
    entities.extend(action.entities.iter().cloned());
    let entities = match Entities::from_entities(entities, None) {
        Ok(e) => e,
        Err(e) => return Decision::refused(format!("entities: {e}")),
    };
    let response = authorizer.is_authorized(&request, &action.policies, &entities);
    decision(action, &response)
}

/// A policy directory read into memory: (schema file name, schema source,
/// [(policy file name, source)]).
type PolicySources = (String, String, Vec<(String, String)>);

/// Refuses `path` (followed if a symbolic link) when every user may write
/// to it: whoever can write a policy file or add one to the directory
/// decides every call.
fn not_writable_by_all(path: &Path) -> Result<(), PolicyError> {
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(path)
        .map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })?
        .permissions()
        .mode();
    if mode & 0o002 != 0 {
        return Err(PolicyError::WritableByAll {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    Ok(())
}

/// Reads `<dir>/schema.cedarschema` and every `<dir>/*.cedar` (sorted),
/// refusing a directory or file every user may write.
fn read_policy_dir(dir: &Path) -> Result<PolicySources, PolicyError> {
    let read = |path: &Path| {
        not_writable_by_all(path)?;
        std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let schema_path = dir.join(SCHEMA_FILE);
    let schema = read(&schema_path)?;
    not_writable_by_all(dir)?;
    let listing = std::fs::read_dir(dir).map_err(|source| PolicyError::Read {
        path: dir.to_owned(),
        source,
    })?;
    let mut paths = Vec::new();
    for entry in listing {
        let entry = entry.map_err(|source| PolicyError::Read {
            path: dir.to_owned(),
            source,
        })?;
        let path = entry.path();
        if path.extension().is_some_and(|e| e == POLICY_EXTENSION) && path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    if paths.is_empty() {
        return Err(PolicyError::NoPolicies {
            what: format!("{} (no *.{POLICY_EXTENSION} file)", dir.display()),
        });
    }
    let mut policies = Vec::with_capacity(paths.len());
    for path in paths {
        let src = read(&path)?;
        policies.push((path.display().to_string(), src));
    }
    Ok((schema_path.display().to_string(), schema, policies))
}

/// Parses the schema and every policy file, names each policy by its
/// `@id` (else `<file>#policy<N>`), and validates them all against the
/// schema in strict mode. Errors name `<file>:<line>:<column>`.
fn compile(
    schema_file: &str,
    schema_src: &str,
    files: &[(String, String)],
) -> Result<(Schema, PolicySet), PolicyError> {
    let (schema, _warnings) = Schema::from_cedarschema_str(schema_src)
        .map_err(|e| PolicyError::Schema(error::source_errors(&e, schema_file, schema_src)))?;

    // Parse every file before reporting, so one run shows every typo.
    let mut policies = PolicySet::new();
    let mut origin: HashMap<String, usize> = HashMap::new();
    let mut parse_errors = Vec::new();
    for (index, (file, src)) in files.iter().enumerate() {
        let set = match PolicySet::from_str(src) {
            Ok(set) => set,
            Err(e) => {
                parse_errors.extend(error::source_errors(&e, file, src));
                continue;
            }
        };
        if let Some(template) = set.templates().next() {
            return Err(PolicyError::Template {
                file: file.clone(),
                id: template.id().to_string(),
            });
        }
        let mut in_file: Vec<_> = set.policies().collect();
        // Cedar numbers a file's policies policy0, policy1, ... in order.
        in_file.sort_by_key(|p| {
            AsRef::<str>::as_ref(p.id())
                .trim_start_matches("policy")
                .parse::<usize>()
                .unwrap_or(usize::MAX)
        });
        for policy in in_file {
            let id = match policy.annotation("id") {
                Some(id) => id.to_owned(),
                None => format!("{file}#{}", policy.id()),
            };
            if let Some(&first) = origin.get(&id) {
                return Err(PolicyError::DuplicateId {
                    id,
                    first: files.get(first).map(|f| f.0.clone()).unwrap_or_default(),
                    second: file.clone(),
                });
            }
            policies
                .add(policy.new_id(PolicyId::new(&id)))
                .map_err(|_| PolicyError::DuplicateId {
                    id: id.clone(),
                    first: file.clone(),
                    second: file.clone(),
                })?;
            origin.insert(id, index);
        }
    }
    if !parse_errors.is_empty() {
        return Err(PolicyError::Parse(parse_errors));
    }
    if policies.is_empty() {
        return Err(PolicyError::NoPolicies {
            what: "the policy files".to_owned(),
        });
    }

    let validation = Validator::new(schema.clone()).validate(&policies, ValidationMode::Strict);
    let mut invalid: Vec<SourceError> = validation
        .validation_errors()
        .flat_map(|e| {
            let (file, src) = origin
                .get(AsRef::<str>::as_ref(e.policy_id()))
                .and_then(|&i| files.get(i))
                .map_or(("<policies>", ""), |(f, s)| (f.as_str(), s.as_str()));
            let mut errors = error::source_errors(e, file, src);
            errors.truncate(1);
            errors
        })
        .collect();
    if !invalid.is_empty() {
        // Cedar reports one error per action a policy may apply to; keep
        // one per position, chosen deterministically.
        invalid.sort_by(|a, b| {
            (&a.file, a.location, &a.message).cmp(&(&b.file, b.location, &b.message))
        });
        invalid.dedup_by(|a, b| a.file == b.file && a.location == b.location);
        return Err(PolicyError::Validation(invalid));
    }

    Ok((schema, policies))
}

/// Reads Cedar's answer, failing closed on any error.
fn decision(action: &Prepared, response: &Response) -> Decision {
    let policies = &action.policies;
    let diagnostics = response.diagnostics();
    let errors: Vec<String> = diagnostics.errors().map(ToString::to_string).collect();
    let allowed = response.decision() == cedar_policy::Decision::Allow && errors.is_empty();
    let mut policy_ids: Vec<String> = diagnostics
        .reason()
        .filter(|id| {
            // A denial is determined by forbids (and errors), never by a
            // permit that was outweighed.
            allowed
                || policies
                    .policy(id)
                    .is_some_and(|p| p.effect() == Effect::Forbid)
        })
        .map(ToString::to_string)
        .collect();
    if !allowed {
        policy_ids.extend(diagnostics.errors().map(|e| match e {
            cedar_policy::AuthorizationError::PolicyEvaluationError(e) => e.policy_id().to_string(),
        }));
    }
    policy_ids.sort();
    policy_ids.dedup();
    let approval = allowed && diagnostics.reason().any(|id| action.approval.contains(id));
    Decision {
        allowed,
        policy_ids,
        errors,
        approval,
    }
}

impl Engine {
    fn agent(&self, id: &SpiffeId) -> EntityUid {
        EntityUid::from_type_name_and_id(self.agent_type.clone(), EntityId::new(id.as_str()))
    }

    fn resource(&self, resource: &str) -> EntityUid {
        EntityUid::from_type_name_and_id(self.resource_type.clone(), EntityId::new(resource))
    }

    /// The `Agent` entity for `id` holding `chain` (which should include `id`).
    fn agent_entity<'c>(
        &self,
        id: &SpiffeId,
        chain: impl IntoIterator<Item = &'c SpiffeId>,
        initiator: &str,
    ) -> Result<Entity, String> {
        agent_entity(self.agent(id), id, chain, initiator)
    }

    fn hop_parts(&self, req: &HopRequest<'_>) -> Result<(Vec<Entity>, Context), String> {
        let from = self.agent_entity(
            req.from,
            std::iter::once(req.from).chain(req.chain),
            req.initiator,
        )?;
        let mut entities = vec![from];
        if req.to != req.from {
            entities.push(self.agent_entity(
                req.to,
                [req.to, req.from].into_iter().chain(req.chain),
                req.initiator,
            )?);
        }
        let scope_max_level = scope_max_level(req.scope);
        let context = Context::from_pairs([
            ("purpose".to_owned(), string(req.purpose.as_str())),
            ("scope".to_owned(), scope_set(req.scope)),
            (
                "depth".to_owned(),
                RestrictedExpression::new_long(req.depth.into()),
            ),
            ("risk_ceiling".to_owned(), string(req.risk_ceiling.as_str())),
            (
                "risk_ceiling_level".to_owned(),
                RestrictedExpression::new_long(risk_level(req.risk_ceiling)),
            ),
            (
                "scope_max_level".to_owned(),
                RestrictedExpression::new_long(scope_max_level),
            ),
        ])
        .map_err(|e| format!("context: {e}"))?;
        Ok((entities, context))
    }

    fn call_parts(
        &self,
        req: &CallRequest<'_>,
        tool: &Tool,
    ) -> Result<(Vec<Entity>, Context), String> {
        let agent = self.agent_entity(
            req.agent,
            std::iter::once(req.agent).chain(req.chain),
            req.initiator,
        )?;
        let kind = req
            .resource
            .split_once(':')
            .map_or(req.resource, |(kind, _)| kind);
        let resource = Entity::new(
            self.resource(req.resource),
            HashMap::from([("kind".to_owned(), string(kind))]),
            HashSet::new(),
        )
        .map_err(|e| format!("resource {:?}: {e}", req.resource))?;
        let risk = req.risk.as_str();
        let tool_in_scope = tool
            .permission
            .as_ref()
            .is_some_and(|p| req.scope.allows(p));
        let resource_in_scope = Permission::parse(&format!("{}:{risk}", req.resource))
            .is_ok_and(|p| req.scope.allows(&p));
        let context = Context::from_pairs([
            ("purpose".to_owned(), string(req.purpose.as_str())),
            ("scope".to_owned(), scope_set(req.scope)),
            ("risk".to_owned(), string(risk)),
            (
                "risk_level".to_owned(),
                RestrictedExpression::new_long(risk_level(req.risk)),
            ),
            (
                "depth".to_owned(),
                RestrictedExpression::new_long(req.depth.into()),
            ),
            (
                "tool_in_scope".to_owned(),
                RestrictedExpression::new_bool(tool_in_scope),
            ),
            (
                "resource_in_scope".to_owned(),
                RestrictedExpression::new_bool(resource_in_scope),
            ),
        ])
        .map_err(|e| format!("context: {e}"))?;
        Ok((vec![agent, resource], context))
    }
}

/// The `Agent` entity `uid` for `id` holding `chain` (which should
/// include `id`): Cedar has no loops, so the chain is a flat set.
fn agent_entity<'c>(
    uid: EntityUid,
    id: &SpiffeId,
    chain: impl IntoIterator<Item = &'c SpiffeId>,
    initiator: &str,
) -> Result<Entity, String> {
    let chain = RestrictedExpression::new_set(
        chain
            .into_iter()
            .map(|c| RestrictedExpression::new_string(c.as_str().to_owned())),
    );
    let attrs = HashMap::from([
        ("spiffe_id".to_owned(), string(id.as_str())),
        (
            "trust_domain".to_owned(),
            string(id.trust_domain().as_str()),
        ),
        ("path".to_owned(), string(id.path())),
        ("chain".to_owned(), chain),
        ("initiator".to_owned(), string(initiator)),
    ]);
    Entity::new(uid, attrs, HashSet::new()).map_err(|e| format!("agent {id}: {e}"))
}

/// The highest tier level a permission of `scope` names in its action
/// (`*` and words that are not tiers count as the highest, 4).
fn scope_max_level(scope: &Scope) -> i64 {
    scope
        .permissions()
        .map(|p| RiskTier::from_str(p.action()).map_or(MAX_LEVEL, risk_level))
        .max()
        .unwrap_or(MAX_LEVEL)
}

fn action_uid(action_type: &EntityTypeName, name: &str) -> EntityUid {
    EntityUid::from_type_name_and_id(action_type.clone(), EntityId::new(name))
}

fn string(s: &str) -> RestrictedExpression {
    RestrictedExpression::new_string(s.to_owned())
}

fn scope_set(scope: &Scope) -> RestrictedExpression {
    RestrictedExpression::new_set(scope.permissions().map(|p| string(&p.to_string())))
}

/// Validates one request shape (entities and context) against the schema.
fn check_shape(
    schema: &Schema,
    action: &EntityUid,
    entities: &[Entity],
    resource: &EntityUid,
    context: Context,
) -> Result<(), String> {
    let principal = entities
        .first()
        .map(Entity::uid)
        .ok_or_else(|| "no principal".to_owned())?;
    Request::new(
        principal,
        action.clone(),
        resource.clone(),
        context,
        Some(schema),
    )
    .map_err(|e| format!("Baton's request does not fit the schema: {e}"))?;
    Entities::from_entities(entities.iter().cloned(), Some(schema))
        .map_err(|e| format!("Baton's entities do not fit the schema: {e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    /// The per-action policy subsets decide exactly as the whole set does
    /// (the INVARIANT on [`Prepared::policies`]).
    #[test]
    fn per_action_policy_subsets_decide_like_the_whole_set() {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policies");
        let fast = Engine::load_dir(&dir).unwrap();
        let mut whole = Engine::load_dir(&dir).unwrap();
        for tool in whole.tools.values_mut() {
            tool.action.policies = whole.policies.clone();
        }
        whole.delegate.policies = whole.policies.clone();
        assert!(fast.tools["crm.search"].action.policies.policies().count() < 12);

        let agents = [
            id("spiffe://example.org/agents/researcher"),
            id("spiffe://example.org/agents/planner"),
            id("spiffe://example.org/agents/auditor"),
            id("spiffe://other.org/agents/planner"),
        ];
        let purposes = [
            "support.case-research",
            "support.case-update",
            "compliance.audit-export",
        ]
        .map(|p| Purpose::from_str(p).unwrap());
        let scopes = [
            Scope::parse(&["tool:crm.search:read", "dataset:crm:read"]).unwrap(),
            Scope::parse(&[
                "tool:crm.*:*",
                "tool:files.*:*",
                "tool:shop.*:*",
                "tool:docs.*:*",
            ])
            .unwrap(),
            Scope::parse(&["tool:crm.update:write", "dataset:customer-pii:export"]).unwrap(),
        ];
        let mut compared = 0;
        for agent in &agents {
            let chain = [agent.clone(), agents[1].clone()];
            for purpose in &purposes {
                for scope in &scopes {
                    for depth in 0..3 {
                        for (name, tool) in &fast.tools {
                            for resource in ["dataset:crm", "dataset:customer-pii"] {
                                let call = CallRequest {
                                    agent,
                                    chain: &chain,
                                    initiator: "alice",
                                    tool: name,
                                    resource,
                                    purpose,
                                    scope,
                                    risk: tool.tier,
                                    depth,
                                };
                                assert_eq!(
                                    fast.authorize_call(&call),
                                    whole.authorize_call(&call),
                                    "{call:?}"
                                );
                                compared += 1;
                            }
                        }
                        for to in &agents {
                            for risk_ceiling in [RiskTier::Read, RiskTier::Export] {
                                let hop = HopRequest {
                                    from: agent,
                                    to,
                                    chain: &chain,
                                    initiator: "alice",
                                    purpose,
                                    scope,
                                    depth: depth + 1,
                                    risk_ceiling,
                                };
                                assert_eq!(
                                    fast.authorize_hop(&hop),
                                    whole.authorize_hop(&hop),
                                    "{hop:?}"
                                );
                                compared += 1;
                            }
                        }
                    }
                }
            }
        }
        assert!(compared > 1000);
    }

    #[test]
    fn permission_actions_map_to_levels() {
        assert_eq!(risk_level(RiskTier::Read), 0);
        assert_eq!(risk_level(RiskTier::Export), 4);
        assert_eq!(tier_group(RiskTier::Purchase), "purchase-tier");
    }
}
