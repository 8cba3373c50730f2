//! The example admission policies in `deploy/policies/admission` and the
//! admission engine's load-time checks, through the public API only.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::str::FromStr;

use baton_core::{Permission, Purpose, RiskTier, Scope, SpiffeId, TaskId};
use baton_policy::{AdmissionPolicy, Human, PolicyError, SecretLease, TaskStart};

const SCHEMA: &str = include_str!("../../../deploy/policies/admission/schema.cedarschema");
const POLICIES: &str = include_str!("../../../deploy/policies/admission/admission.cedar");

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policies/admission")
}

fn policy() -> AdmissionPolicy {
    AdmissionPolicy::load_dir(&dir()).unwrap()
}

fn human(groups: &[&str]) -> Human {
    Human {
        subject: "alice@example.com".into(),
        issuer: "https://idp.example.org".into(),
        email: None,
        email_verified: false,
        groups: groups
            .iter()
            .map(|g| (*g).to_owned())
            .collect::<BTreeSet<_>>(),
    }
}

fn start(groups: &[&str], scope: &[&str], risk: RiskTier, ttl_secs: u64) -> TaskStart {
    TaskStart {
        human: human(groups),
        root_agent: SpiffeId::parse("spiffe://example.org/agents/planner").unwrap(),
        purpose: Purpose::from_str("support.case-research").unwrap(),
        scope: Scope::parse(scope).unwrap(),
        risk_ceiling: risk,
        ttl_secs,
        max_depth: 2,
        audiences: vec!["crm".into()],
    }
}

const CRM: &[&str] = &["tool:crm.search:read", "dataset:crm:read"];
const PAYMENTS: &[&str] = &["tool:payments.refund:write"];

#[test]
fn engineers_start_tasks_within_bounds() {
    let p = policy();
    let ok = p
        .admit_task_start(start(&["engineering"], CRM, RiskTier::Write, 3600))
        .unwrap();
    assert_eq!(ok.policy_ids(), ["admission.engineering"]);
    // The witness carries exactly what was decided.
    assert_eq!(ok.request().ttl_secs, 3600);

    // Not in the group: nothing permits it.
    let no = p
        .admit_task_start(start(&["sales"], CRM, RiskTier::Read, 600))
        .unwrap_err();
    assert!(no.policy_ids.is_empty());
    assert_eq!(
        no.to_string(),
        "no policy permits Human::\"alice@example.com\" to start_task on \
         Agent::\"spiffe://example.org/agents/planner\""
    );
    assert!(!no.without_principal().contains("alice"), "{no}");

    // Over the risk ceiling, over the lifetime.
    for (risk, ttl) in [(RiskTier::Delete, 600), (RiskTier::Write, 3601)] {
        let no = p
            .admit_task_start(start(&["engineering"], CRM, risk, ttl))
            .unwrap_err();
        assert!(no.policy_ids.is_empty(), "{no}");
    }
    // A root agent outside /agents/.
    let mut other = start(&["engineering"], CRM, RiskTier::Read, 600);
    other.root_agent = SpiffeId::parse("spiffe://example.org/batch/job").unwrap();
    assert!(p.admit_task_start(other).is_err());
}

#[test]
fn payments_are_for_finance_only() {
    let p = policy();
    let no = p
        .admit_task_start(start(&["engineering"], PAYMENTS, RiskTier::Write, 600))
        .unwrap_err();
    assert_eq!(no.policy_ids, ["admission.payments-finance-only"]);
    assert!(
        no.to_string()
            .ends_with("denied by policy admission.payments-finance-only"),
        "{no}"
    );
    // A wildcard under payments is payments too; a mixed scope is as well.
    let mixed = [CRM, &["tool:payments.*:read"]].concat();
    let no = p
        .admit_task_start(start(&["engineering"], &mixed, RiskTier::Read, 600))
        .unwrap_err();
    assert_eq!(no.policy_ids, ["admission.payments-finance-only"]);

    let ok = p
        .admit_task_start(start(&["finance"], PAYMENTS, RiskTier::Purchase, 600))
        .unwrap();
    assert_eq!(ok.policy_ids(), ["admission.finance-payments"]);
    // Finance alone does not reach beyond payments.
    assert!(
        p.admit_task_start(start(&["finance"], &mixed, RiskTier::Read, 600))
            .is_err()
    );
    let both = p
        .admit_task_start(start(
            &["engineering", "finance"],
            &mixed,
            RiskTier::Write,
            600,
        ))
        .unwrap();
    assert_eq!(both.policy_ids(), ["admission.engineering"]);
}

fn lease(purpose: &str, scope: &[&str], depth: u32) -> SecretLease {
    let planner = SpiffeId::parse("spiffe://example.org/agents/planner").unwrap();
    SecretLease {
        agent: planner.clone(),
        chain: vec![planner],
        initiator: "alice@example.com".into(),
        task: TaskId::from_random([7; 16]),
        purpose: Purpose::from_str(purpose).unwrap(),
        scope: Scope::parse(scope).unwrap(),
        depth,
        engine: "apikey".into(),
        permission: Permission::parse("secret:apikey:issue").unwrap(),
        ttl_secs: 600,
    }
}

#[test]
fn leases_need_a_listed_purpose_the_permission_and_stay_near_the_root() {
    let p = policy();
    let ok = p
        .admit_lease(lease("support.case-research", &["secret:apikey:*"], 0))
        .unwrap();
    assert_eq!(ok.policy_ids(), ["leases.support-and-audit"]);
    let no = p
        .admit_lease(lease("sales.account-research", &["secret:apikey:issue"], 0))
        .unwrap_err();
    assert_eq!(
        no.to_string(),
        "no policy permits Agent::\"spiffe://example.org/agents/planner\" to lease_secret on \
         Secret::\"apikey\""
    );
    assert!(
        p.admit_lease(lease("support.case-research", &["dataset:crm:read"], 0))
            .is_err()
    );
    let deep = p
        .admit_lease(lease("support.case-research", &["secret:apikey:issue"], 2))
        .unwrap_err();
    assert_eq!(deep.policy_ids, ["leases.near-the-root"]);
}

#[test]
fn email_is_optional_and_checkable() {
    let policies = vec![(
        "email.cedar".to_owned(),
        r#"@id("verified-example-staff")
permit (principal is Human, action == Action::"start_task", resource)
when { principal has email && principal.email like "*@example.com" && principal.email_verified };"#
            .to_owned(),
    )];
    let p = AdmissionPolicy::from_sources(SCHEMA, &policies).unwrap();
    let mut req = start(&[], CRM, RiskTier::Read, 600);
    assert!(p.admit_task_start(req.clone()).is_err());
    req.human.email = Some("alice@example.com".into());
    assert!(p.admit_task_start(req.clone()).is_err());
    req.human.email_verified = true;
    assert!(p.admit_task_start(req).is_ok());
}

#[test]
fn policies_that_do_not_fit_the_schema_are_refused_with_file_and_line() {
    let bad = vec![(
        "bad.cedar".to_owned(),
        "// a typo on line 3\n@id(\"typo\")\npermit (principal, action == Action::\"start_task\", resource) when { principal.grups.contains(\"x\") };\n"
            .to_owned(),
    )];
    let err = AdmissionPolicy::from_sources(SCHEMA, &bad).unwrap_err();
    assert!(matches!(err, PolicyError::Validation(_)), "{err}");
    assert!(err.to_string().starts_with("bad.cedar:3:"), "{err}");

    // The hop and call policies are not an admission policy.
    let hops = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policies");
    let err = AdmissionPolicy::load_dir(&hops).unwrap_err();
    assert!(
        matches!(err, PolicyError::Validation(_) | PolicyError::Model { .. }),
        "{err}"
    );

    // A schema that no longer describes Baton's requests.
    let schema = SCHEMA.replace("  email_verified: Bool,\n", "");
    let ok = vec![("a.cedar".to_owned(), POLICIES.to_owned())];
    let err = AdmissionPolicy::from_sources(&schema, &ok).unwrap_err();
    assert!(matches!(err, PolicyError::Model { .. }), "{err}");
    assert!(err.to_string().contains("start_task"), "{err}");
}
