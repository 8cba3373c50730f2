//! The example policy set in `deploy/policies` and the engine's error
//! reporting, through the public API only.

// Test helpers outside `#[test]` functions unwrap too; the benchmark prints.
#![allow(clippy::unwrap_used, clippy::print_stdout)]

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use baton_core::{Purpose, RiskTier, Scope, SpiffeId};
use baton_policy::{CallRequest, Decision, Engine, HopRequest, PolicyError};

const SCHEMA: &str = include_str!("../../../deploy/policies/schema.cedarschema");

fn policy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policies")
}

fn engine() -> Engine {
    Engine::load_dir(&policy_dir()).unwrap()
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn scope(items: &[&str]) -> Scope {
    Scope::parse(items).unwrap()
}

fn purpose(s: &str) -> Purpose {
    Purpose::from_str(s).unwrap()
}

fn ids(d: &Decision) -> Vec<&str> {
    d.policy_ids.iter().map(String::as_str).collect()
}

/// The reference flow: a human starts a support.case-research task with
/// the planner as root agent, which hands a read-only part to the researcher.
struct Flow {
    planner: SpiffeId,
    researcher: SpiffeId,
    purpose: Purpose,
    task_scope: Scope,
    research_scope: Scope,
}

impl Flow {
    fn new() -> Self {
        Self {
            planner: id("spiffe://example.org/agents/planner"),
            researcher: id("spiffe://example.org/agents/researcher"),
            purpose: purpose("support.case-research"),
            task_scope: scope(&[
                "tool:crm.search:read",
                "tool:crm.update:write",
                "dataset:crm:read",
            ]),
            research_scope: scope(&["tool:crm.search:read", "dataset:crm:read"]),
        }
    }

    fn research_chain(&self) -> Vec<SpiffeId> {
        vec![self.researcher.clone(), self.planner.clone()]
    }

    fn call<'a>(&'a self, chain: &'a [SpiffeId], tool: &'a str, risk: RiskTier) -> CallRequest<'a> {
        CallRequest {
            agent: &self.researcher,
            chain,
            initiator: "alice@example.com",
            tool,
            resource: "dataset:crm",
            purpose: &self.purpose,
            scope: &self.research_scope,
            risk,
            depth: 1,
        }
    }
}

#[test]
fn the_deployed_policies_load() {
    let engine = engine();
    assert_eq!(
        engine.tools(),
        [
            "crm.export",
            "crm.search",
            "crm.update",
            "docs.summarize",
            "files.delete",
            "shop.purchase"
        ]
    );
    assert_eq!(engine.tool_tier("crm.update"), Some(RiskTier::Write));
    assert!(
        engine
            .policy_ids()
            .contains(&"research.read-tools".to_owned())
    );
    // Shared between threads behind an Arc.
    fn shareable<T: Send + Sync + 'static>(_: &T) {}
    shareable(&Arc::new(engine));
}

#[test]
fn planner_may_hand_a_read_only_part_to_the_researcher() {
    let engine = engine();
    let f = Flow::new();
    let chain = [f.planner.clone()];
    let d = engine.authorize_hop(&HopRequest {
        from: &f.planner,
        to: &f.researcher,
        chain: &chain,
        initiator: "alice@example.com",
        purpose: &f.purpose,
        scope: &f.research_scope,
        depth: 1,
        risk_ceiling: RiskTier::Write,
    });
    assert!(d.allowed, "{d:?}");
    assert_eq!(ids(&d), ["delegation.within-trust-domain"]);
    assert!(d.errors.is_empty());
}

#[test]
fn researcher_may_search_the_crm() {
    let engine = engine();
    let f = Flow::new();
    let chain = f.research_chain();
    let d = engine.authorize_call(&f.call(&chain, "crm.search", RiskTier::Read));
    assert!(d.allowed, "{d:?}");
    assert_eq!(ids(&d), ["research.read-tools"]);
    assert!(d.errors.is_empty());
}

#[test]
fn researcher_may_not_update_the_crm() {
    let engine = engine();
    let f = Flow::new();
    let chain = f.research_chain();
    let d = engine.authorize_call(&f.call(&chain, "crm.update", RiskTier::Write));
    assert!(!d.allowed, "{d:?}");
    assert_eq!(
        ids(&d),
        [
            "research.read-only",
            "scope.tool-not-granted",
            "writes.require-case-update-purpose"
        ]
    );
    assert!(d.errors.is_empty());
}

#[test]
fn writes_need_the_case_update_purpose() {
    let engine = engine();
    let planner = id("spiffe://example.org/agents/planner");
    let chain = [planner.clone()];
    let task_scope = Flow::new().task_scope;
    let mut call = CallRequest {
        agent: &planner,
        chain: &chain,
        initiator: "alice@example.com",
        tool: "crm.update",
        resource: "dataset:crm",
        purpose: &purpose("support.case-research"),
        scope: &task_scope,
        risk: RiskTier::Write,
        depth: 0,
    };
    let d = engine.authorize_call(&call);
    assert!(!d.allowed);
    assert_eq!(ids(&d), ["writes.require-case-update-purpose"]);

    let update = purpose("support.case-update");
    call.purpose = &update;
    let d = engine.authorize_call(&call);
    assert!(d.allowed, "{d:?}");
    assert_eq!(ids(&d), ["writes.case-update"]);
}

#[test]
fn a_call_outside_the_token_scope_is_denied_even_when_permitted() {
    let engine = engine();
    let f = Flow::new();
    let chain = f.research_chain();
    let docs_only = scope(&["tool:docs.summarize:read"]);
    let mut call = f.call(&chain, "crm.search", RiskTier::Read);
    call.scope = &docs_only;
    let d = engine.authorize_call(&call);
    assert!(!d.allowed);
    assert_eq!(ids(&d), ["scope.tool-not-granted"]);

    // A wildcard permission is resolved by Baton, not by Cedar.
    let wide = scope(&["tool:crm.*:read"]);
    call.scope = &wide;
    assert!(engine.authorize_call(&call).allowed);
}

#[test]
fn forbid_on_pii_export_beyond_depth_one_beats_the_audit_permit() {
    let engine = engine();
    let auditor = id("spiffe://example.org/agents/auditor");
    let planner = id("spiffe://example.org/agents/planner");
    let lead = id("spiffe://example.org/agents/lead");
    let export_scope = scope(&["tool:crm.export:export", "dataset:customer-pii:export"]);
    let audit = purpose("compliance.audit-export");
    let direct = [auditor.clone(), planner.clone()];
    let mut call = CallRequest {
        agent: &auditor,
        chain: &direct,
        initiator: "bob@example.com",
        tool: "crm.export",
        resource: "dataset:customer-pii",
        purpose: &audit,
        scope: &export_scope,
        risk: RiskTier::Export,
        depth: 1,
    };
    let d = engine.authorize_call(&call);
    assert!(d.allowed, "{d:?}");
    assert_eq!(ids(&d), ["exports.pii-audit"]);

    let deeper = [auditor.clone(), lead, planner];
    call.chain = &deeper;
    call.depth = 2;
    let d = engine.authorize_call(&call);
    assert!(!d.allowed, "{d:?}");
    assert_eq!(ids(&d), ["exports.pii-direct-only"]);

    // Another dataset has no export permit at all: a default deny.
    call.depth = 1;
    call.resource = "dataset:crm";
    let d = engine.authorize_call(&call);
    assert!(!d.allowed);
    assert!(d.policy_ids.is_empty() && d.errors.is_empty(), "{d:?}");
}

#[test]
fn hops_the_delegation_policies_forbid_are_denied() {
    let engine = engine();
    let f = Flow::new();
    let chain = f.research_chain();
    let helper = id("spiffe://example.org/agents/helper");
    let writes = scope(&["tool:crm.update:write"]);
    let base = HopRequest {
        from: &f.researcher,
        to: &helper,
        chain: &chain,
        initiator: "alice@example.com",
        purpose: &f.purpose,
        scope: &writes,
        depth: 2,
        risk_ceiling: RiskTier::Write,
    };

    // A research agent hands on no write permission.
    let d = engine.authorize_hop(&base);
    assert!(!d.allowed);
    assert_eq!(ids(&d), ["delegation.research-hands-on-reads-only"]);

    // Beyond the task's risk ceiling.
    let planner_chain = [f.planner.clone()];
    let hop = HopRequest {
        from: &f.planner,
        chain: &planner_chain,
        depth: 1,
        risk_ceiling: RiskTier::Read,
        ..base
    };
    let d = engine.authorize_hop(&hop);
    assert!(!d.allowed);
    assert_eq!(ids(&d), ["delegation.within-risk-ceiling"]);

    // Back to an agent already in the chain.
    let reads = scope(&["tool:crm.search:read"]);
    let hop = HopRequest {
        to: &f.planner,
        scope: &reads,
        ..base
    };
    let d = engine.authorize_hop(&hop);
    assert!(!d.allowed);
    assert_eq!(ids(&d), ["delegation.no-cycles"]);

    // To itself.
    let hop = HopRequest {
        to: &f.researcher,
        scope: &reads,
        ..base
    };
    let d = engine.authorize_hop(&hop);
    assert!(!d.allowed);
    assert_eq!(ids(&d), ["delegation.no-cycles"]);

    // Into another trust domain.
    let foreign = id("spiffe://other.org/agents/helper");
    let hop = HopRequest {
        to: &foreign,
        scope: &reads,
        ..base
    };
    let d = engine.authorize_hop(&hop);
    assert!(!d.allowed);
    assert_eq!(ids(&d), ["delegation.no-cross-domain"]);

    // Too deep for the organisation's cap: no permit applies.
    let hop = HopRequest {
        scope: &reads,
        depth: 4,
        ..base
    };
    let d = engine.authorize_hop(&hop);
    assert!(!d.allowed);
    assert!(d.policy_ids.is_empty(), "{d:?}");

    // The same hop within the cap is fine.
    let hop = HopRequest {
        scope: &reads,
        ..base
    };
    assert!(engine.authorize_hop(&hop).allowed);
}

#[test]
fn undeclared_tools_and_wrong_tiers_are_refused() {
    let engine = engine();
    let f = Flow::new();
    let chain = f.research_chain();
    let d = engine.authorize_call(&f.call(&chain, "crm.drop", RiskTier::Read));
    assert!(!d.allowed);
    assert!(d.errors[0].contains("`crm.drop` is not declared"), "{d:?}");

    // crm.update claims to be a read: the schema says write.
    let d = engine.authorize_call(&f.call(&chain, "crm.update", RiskTier::Read));
    assert!(!d.allowed);
    assert!(d.errors[0].contains("write-tier"), "{d:?}");
}

#[test]
fn an_evaluation_error_denies() {
    let policies = vec![(
        "overflow.cedar".to_owned(),
        r#"
@id("allow-all")
permit (principal, action, resource);

@id("overflows")
permit (principal, action, resource is Resource)
when { context.depth + 9223372036854775807 > 0 };
"#
        .to_owned(),
    )];
    let engine = Engine::from_sources(SCHEMA, &policies).unwrap();
    let f = Flow::new();
    let chain = f.research_chain();
    let d = engine.authorize_call(&f.call(&chain, "crm.search", RiskTier::Read));
    assert!(!d.allowed, "{d:?}");
    assert_eq!(ids(&d), ["overflows"]);
    assert_eq!(d.errors.len(), 1);
    assert!(d.errors[0].contains("overflows"), "{d:?}");
}

#[test]
fn a_broken_policy_file_is_named_with_its_line() {
    let policies = vec![
        (
            "fine.cedar".to_owned(),
            "permit (principal, action, resource);\n".to_owned(),
        ),
        (
            "deploy/policies/broken.cedar".to_owned(),
            "// a comment\n\npermit (principal, action, resource)\nwhen { context.depth > };\n"
                .to_owned(),
        ),
    ];
    let err = Engine::from_sources(SCHEMA, &policies).unwrap_err();
    assert!(matches!(err, PolicyError::Parse(_)), "{err:?}");
    let shown = err.to_string();
    assert!(
        shown.starts_with("deploy/policies/broken.cedar:4:"),
        "{shown}"
    );
}

#[test]
fn an_unknown_attribute_fails_validation_with_its_line() {
    let policies = vec![(
        "deploy/policies/research.cedar".to_owned(),
        "@id(\"typo\")\npermit (principal, action, resource)\nwhen {\n    context.purpos == \"x\"\n};\n"
            .to_owned(),
    )];
    let err = Engine::from_sources(SCHEMA, &policies).unwrap_err();
    assert!(matches!(err, PolicyError::Validation(_)), "{err:?}");
    let shown = err.to_string();
    assert!(
        shown.starts_with("deploy/policies/research.cedar:4:5: "),
        "{shown}"
    );
    assert!(shown.contains("purpos"), "{shown}");
}

#[test]
fn a_broken_schema_is_named_with_its_line() {
    let schema = "entity Agent;\nentity Resource = { kind: Strng };\n";
    let policies = vec![(
        "a.cedar".to_owned(),
        "permit (principal, action, resource);".to_owned(),
    )];
    let err = Engine::from_sources(schema, &policies).unwrap_err();
    let shown = err.to_string();
    assert!(shown.starts_with("schema.cedarschema:2:"), "{shown}");
}

#[test]
fn a_schema_that_does_not_fit_baton_is_refused() {
    let policies = vec![(
        "a.cedar".to_owned(),
        "permit (principal, action, resource);".to_owned(),
    )];

    let no_delegate = SCHEMA.replace("action \"delegate\"", "action \"hand-over\"");
    let err = Engine::from_sources(&no_delegate, &policies).unwrap_err();
    assert!(matches!(err, PolicyError::Model { .. }), "{err:?}");
    assert!(err.to_string().contains("`delegate`"), "{err}");

    let untiered = SCHEMA.replace(
        "action \"crm.update\" in [\"write-tier\"]",
        "action \"crm.update\"",
    );
    let err = Engine::from_sources(&untiered, &policies).unwrap_err();
    assert!(err.to_string().contains("`crm.update`"), "{err}");

    let missing_attr = SCHEMA.replace("  initiator: String,\n", "");
    let err = Engine::from_sources(&missing_attr, &policies).unwrap_err();
    assert!(matches!(err, PolicyError::Model { .. }), "{err:?}");
}

#[test]
fn policy_ids_are_unique_and_fall_back_to_file_and_number() {
    let twice = vec![
        (
            "a.cedar".to_owned(),
            "@id(\"x\") permit (principal, action, resource);".to_owned(),
        ),
        (
            "b.cedar".to_owned(),
            "@id(\"x\") forbid (principal, action, resource);".to_owned(),
        ),
    ];
    let err = Engine::from_sources(SCHEMA, &twice).unwrap_err();
    assert_eq!(
        err.to_string(),
        "policy id `x` is used twice: in a.cedar and in b.cedar"
    );

    let anonymous = vec![(
        "anon.cedar".to_owned(),
        "permit (principal, action, resource);\npermit (principal, action == Action::\"crm.search\", resource);".to_owned(),
    )];
    let engine = Engine::from_sources(SCHEMA, &anonymous).unwrap();
    assert_eq!(
        engine.policy_ids(),
        ["anon.cedar#policy0", "anon.cedar#policy1"]
    );
}

#[test]
fn a_missing_directory_or_an_empty_one_is_refused() {
    let err = Engine::load_dir(&policy_dir().join("nope")).unwrap_err();
    assert!(matches!(err, PolicyError::Read { .. }), "{err:?}");
    assert!(err.to_string().contains("schema.cedarschema"), "{err}");

    let err = Engine::from_sources(SCHEMA, &[]).unwrap_err();
    assert!(matches!(err, PolicyError::NoPolicies { .. }), "{err:?}");
}

/// Whoever can write a policy file, or add one to the directory, decides
/// every call: a directory or file every user may write is refused, at
/// start and at each reload. The control: the same files with `o-w` load.
#[test]
fn a_policy_directory_or_file_every_user_may_write_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("writable-policies-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    for entry in std::fs::read_dir(policy_dir()).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file() {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    let chmod = |p: &std::path::Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    chmod(&dir, 0o755);
    let control = Engine::load_dir(&dir).unwrap();
    assert!(!control.policy_ids().is_empty());

    chmod(&dir, 0o777);
    let err = Engine::load_dir(&dir).unwrap_err();
    assert!(matches!(err, PolicyError::WritableByAll { .. }), "{err:?}");
    assert!(err.to_string().contains("mode 777"), "{err}");
    chmod(&dir, 0o1777);
    assert!(
        Engine::load_dir(&dir).is_err(),
        "sticky still lets anyone add a file"
    );
    chmod(&dir, 0o755);

    let one = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "cedar"))
        .unwrap();
    chmod(&one, 0o666);
    let err = Engine::load_dir(&dir).unwrap_err();
    assert!(
        err.to_string().contains(&one.display().to_string()),
        "{err}"
    );
    chmod(&one, 0o644);
    chmod(&dir.join("schema.cedarschema"), 0o646);
    let err = Engine::load_dir(&dir).unwrap_err();
    assert!(err.to_string().contains("schema.cedarschema"), "{err}");
    chmod(&dir.join("schema.cedarschema"), 0o644);
    Engine::load_dir(&dir).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn decisions_serialize_for_the_audit_log() {
    let d = Decision {
        allowed: true,
        policy_ids: vec!["research.read-tools".to_owned()],
        errors: vec![],
        approval: false,
    };
    assert_eq!(
        serde_json::to_string(&d).unwrap(),
        r#"{"allowed":true,"policy_ids":["research.read-tools"],"errors":[]}"#
    );
    let held = Decision {
        approval: true,
        ..d
    };
    assert!(
        serde_json::to_string(&held)
            .unwrap()
            .ends_with(r#""approval":true}"#)
    );
}

/// CPU time of this thread so far, in nanoseconds (Linux; clock-tick
/// resolution, so measure many iterations). On a shared machine wall time
/// also counts other processes' turns; CPU time does not.
fn thread_cpu_ns() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    let fields: Vec<&str> = stat.get(stat.rfind(')')? + 2..)?.split(' ').collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // USER_HZ is 100 on every Linux ABI.
    Some(ticks * 10_000_000.0)
}

fn measure(what: &str, n: u32, mut f: impl FnMut()) {
    let cpu = thread_cpu_ns();
    let start = std::time::Instant::now();
    for _ in 0..n {
        f();
    }
    let wall = start.elapsed().as_nanos() / u128::from(n);
    match (cpu, thread_cpu_ns()) {
        (Some(a), Some(b)) => println!(
            "{what}: {wall} ns per call (wall), {:.0} ns (thread CPU), {n} iterations",
            (b - a) / f64::from(n)
        ),
        _ => println!("{what}: {wall} ns per call (wall), {n} iterations"),
    }
}

/// `cargo test -p baton-policy --release --test policies -- --ignored --nocapture bench`
#[test]
#[ignore = "micro-benchmark; run by hand in release mode"]
fn bench_authorize_call() {
    let engine = engine();
    let f = Flow::new();
    let chain = f.research_chain();
    let call = f.call(&chain, "crm.search", RiskTier::Read);
    for _ in 0..1_000 {
        assert!(engine.authorize_call(&call).allowed);
    }
    let n = 100_000;
    measure("authorize_call (allowed crm.search)", n, || {
        std::hint::black_box(engine.authorize_call(std::hint::black_box(&call)));
    });
    let update = f.call(&chain, "crm.update", RiskTier::Write);
    measure("authorize_call (denied crm.update)", n, || {
        std::hint::black_box(engine.authorize_call(std::hint::black_box(&update)));
    });
    let planner_chain = [f.planner.clone()];
    let hop = HopRequest {
        from: &f.planner,
        to: &f.researcher,
        chain: &planner_chain,
        initiator: "alice@example.com",
        purpose: &f.purpose,
        scope: &f.research_scope,
        depth: 1,
        risk_ceiling: RiskTier::Write,
    };
    measure("authorize_hop (allowed)", n, || {
        std::hint::black_box(engine.authorize_hop(std::hint::black_box(&hop)));
    });
}

/// The shipped policies as (file, source) pairs, plus `extra`.
fn shipped_with(extra: &str) -> Vec<(String, String)> {
    let mut files: Vec<(String, String)> = std::fs::read_dir(policy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cedar"))
        .map(|p| {
            (
                p.file_name().unwrap().to_string_lossy().into_owned(),
                std::fs::read_to_string(&p).unwrap(),
            )
        })
        .collect();
    files.push(("approvals.cedar".into(), extra.into()));
    files
}

#[test]
fn a_permit_with_approval_holds_what_it_allows_and_nothing_else() {
    let e = Engine::from_sources(
        SCHEMA,
        &shipped_with(
            r#"@id("research.vip-needs-a-human")
@approval("VIP accounts")
permit (principal, action == Action::"crm.search", resource == Resource::"dataset:vip");"#,
        ),
    )
    .unwrap();
    let f = Flow::new();
    let chain = f.research_chain();
    let plain = e.authorize_call(&f.call(&chain, "crm.search", RiskTier::Read));
    assert!(plain.allowed && !plain.approval, "{plain:?}");
    let vip = e.authorize_call(&CallRequest {
        resource: "dataset:vip",
        ..f.call(&chain, "crm.search", RiskTier::Read)
    });
    assert!(vip.allowed && vip.approval, "{vip:?}");
    assert!(ids(&vip).contains(&"research.vip-needs-a-human"), "{vip:?}");
    assert!(e.may_require_approval("crm.search"));
    assert!(!e.may_require_approval("crm.update"));
    assert!(!engine().may_require_approval("crm.search"));
}

#[test]
fn approval_on_a_forbid_or_a_permit_that_matches_delegate_is_refused() {
    for (source, says) in [
        (
            r#"@id("f") @approval("x") forbid (principal, action == Action::"crm.search", resource);"#,
            "is for permits",
        ),
        (
            r#"@id("any") @approval("x") permit (principal, action, resource) when { false };"#,
            "also matches `delegate`",
        ),
    ] {
        let err = Engine::from_sources(SCHEMA, &shipped_with(source))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains(says), "{source}: {err}");
    }
}
