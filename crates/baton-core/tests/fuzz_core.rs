//! Fuzz-style property tests for every baton-core parser that takes outside
//! bytes: SPIFFE IDs and trust domains, selectors, permissions and scopes,
//! entry ids, DNS names, task ids, purposes, risk tiers, and the JSON bodies
//! of the broker's HTTP and admin-socket routes (`baton_core::api`).
//!
//! Each parser gets (a) arbitrary input and (b) mutations of a valid value;
//! it must return `Ok` or `Err`, never panic, and what it accepts must
//! round-trip. Bounded for CI; `PROPTEST_CASES=100000` runs longer (see
//! `fuzz/README.md`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use baton_core::api::{
    AttestRequest, DelegateRequest, JoinTokenRequest, RedeemRequest, RenewRequest,
    RenewTaskRequest, SignJwtRequest, SignX509Request, StartTaskRequest, ToolCallReport,
};
use baton_core::entry::validate_dns_name;
use baton_core::{
    DelegationClaims, Entry, EntryId, NewEntry, Permission, Purpose, RiskTier, Scope, Selector,
    SpiffeId, TaskId, TrustDomain,
};
use fuzz_support::*;
use proptest::prelude::*;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

const VALID_IDS: &[&str] = &[
    "spiffe://example.org",
    "spiffe://example.org/ns/web",
    "spiffe://a-b_c.9/x/Y.z/w-_",
    "spiffe://example.org/baton/node/n1",
    "spiffe://td/.../a",
];

fn valid_id() -> impl Strategy<Value = String> {
    proptest::sample::select(VALID_IDS).prop_map(str::to_owned)
}

fn check_spiffe_id(s: &str) {
    match SpiffeId::parse(s) {
        Ok(id) => {
            assert_eq!(id.as_str(), s);
            let again = SpiffeId::parse(&id.to_string()).unwrap();
            assert_eq!(again, id);
            assert!(s.len() <= baton_core::spiffe_id::MAX_SPIFFE_ID_LEN);
            assert_eq!(
                format!("spiffe://{}{}", id.trust_domain(), id.path()),
                s,
                "trust domain and path rebuild the ID"
            );
            let json = serde_json::to_string(&id).unwrap();
            assert_eq!(serde_json::from_str::<SpiffeId>(&json).unwrap(), id);
        }
        Err(e) => {
            assert!(!e.to_string().is_empty());
            assert!(serde_json::from_value::<SpiffeId>(json!(s)).is_err());
        }
    }
    if let Ok(td) = TrustDomain::new(s) {
        assert_eq!(td.as_str(), s);
        assert_eq!(TrustDomain::new(&td.to_string()).unwrap(), td);
        assert_eq!(
            SpiffeId::parse(&td.id_string()).unwrap().trust_domain(),
            &td
        );
    }
}

const VALID_SELECTORS: &[&str] = &[
    "unix:uid:1000",
    "unix:gid:0",
    "unix:path:/usr/bin/agent",
    "unix:sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
];

fn check_selector(s: &str) {
    match Selector::parse(s) {
        Ok(sel) => {
            assert_eq!(sel.to_string(), s);
            assert_eq!(Selector::parse(&sel.to_string()).unwrap(), sel);
            assert_eq!(Selector::new(sel.kind(), sel.value()).unwrap(), sel);
            let json = serde_json::to_string(&sel).unwrap();
            assert_eq!(serde_json::from_str::<Selector>(&json).unwrap(), sel);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

const VALID_PERMISSIONS: &[&str] = &[
    "tool:crm.search:read",
    "dataset:crm:read",
    "tool:crm.*:*",
    "secret:db.prod-1:lease",
];

fn check_permission(s: &str) {
    match Permission::parse(s) {
        Ok(p) => {
            assert_eq!(p.to_string(), s);
            assert_eq!(Permission::parse(&p.to_string()).unwrap(), p);
            assert!(p.covers(&p), "a permission covers itself");
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fn check_scope(items: &[String]) {
    match Scope::parse(items) {
        Ok(scope) => {
            let strings = scope.to_strings();
            let again = Scope::parse(&strings).unwrap();
            assert_eq!(again, scope);
            assert!(scope.is_subset_of(&scope));
            let json = serde_json::to_string(&scope).unwrap();
            assert_eq!(serde_json::from_str::<Scope>(&json).unwrap(), scope);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

fn check_small_types(s: &str) {
    if let Ok(t) = s.parse::<TaskId>() {
        assert_eq!(t.as_str(), s);
        assert_eq!(t.to_string().parse::<TaskId>().unwrap(), t);
    }
    if let Ok(p) = s.parse::<Purpose>() {
        assert_eq!(p.as_str(), s);
        assert_eq!(p.to_string().parse::<Purpose>().unwrap(), p);
    }
    if let Ok(r) = s.parse::<RiskTier>() {
        assert_eq!(r.as_str(), s);
    }
    if let Ok(id) = EntryId::parse(s) {
        assert_eq!(EntryId::parse(id.as_str()).unwrap(), id);
    }
    let _ = validate_dns_name(s);
}

/// Parses `bytes` as `T` and, when accepted, checks serialize → parse
/// gives the same JSON (no value the broker accepts fails to re-encode).
fn check_body<T: DeserializeOwned + serde::Serialize>(bytes: &[u8]) {
    if let Ok(v) = serde_json::from_slice::<T>(bytes) {
        let out = serde_json::to_vec(&v).unwrap();
        let back: T = serde_json::from_slice(&out).unwrap();
        assert_eq!(serde_json::to_vec(&back).unwrap(), out);
    }
}

fn check_all_bodies(bytes: &[u8]) {
    check_body::<JoinTokenRequest>(bytes);
    check_body::<AttestRequest>(bytes);
    check_body::<RenewRequest>(bytes);
    check_body::<SignX509Request>(bytes);
    check_body::<SignJwtRequest>(bytes);
    check_body::<StartTaskRequest>(bytes);
    check_body::<DelegateRequest>(bytes);
    check_body::<RedeemRequest>(bytes);
    check_body::<RenewTaskRequest>(bytes);
    check_body::<ToolCallReport>(bytes);
    check_body::<DelegationClaims>(bytes);
    check_body::<Entry>(bytes);
    if let Ok(new) = serde_json::from_slice::<NewEntry>(bytes) {
        // Validation is the second parser of an admin `POST /v1/admin/entries`.
        if let Ok(entry) = new.validate() {
            assert!(!entry.selectors.is_empty());
            assert!(!entry.spiffe_id.is_trust_domain_id());
        }
    }
}

const TASK: &str = "task-0123456789abcdef0123456789abcdef";
const B64: &str = "MIIBAQ==";

/// One valid body per request type.
fn valid_bodies() -> Vec<Value> {
    let scope = json!(["tool:crm.search:read", "tool:crm.*:read"]);
    vec![
        json!({"ttl_secs": 600, "node_id": "spiffe://example.org/baton/node/n1"}),
        json!({"join_token": "abc", "csr_der": B64}),
        json!({"csr_der": B64}),
        json!({"items": [{"entry_id": "6f1c9a1e-2b1d-4b7e-9d7e-2f8a3c4d5e6f", "csr_der": B64}]}),
        json!({"entry_id": "6f1c9a1e-2b1d-4b7e-9d7e-2f8a3c4d5e6f", "audience": ["a"]}),
        json!({
            "id_token": "x.y.z", "root_agent": "spiffe://example.org/agents/planner",
            "purpose": "support.case-research", "scope": scope, "risk_ceiling": "write",
            "ttl_secs": 900, "max_depth": 3, "audience": ["crm-tool"]
        }),
        json!({
            "token": "x.y.z", "target": "spiffe://example.org/agents/researcher",
            "scope": scope, "purpose": "support.case-research", "audience": ["crm-tool"],
            "justification": "needs the CRM", "ttl_secs": 60
        }),
        json!({"grant": "g", "spiffe_id": "spiffe://example.org/agents/a", "csr_der": B64}),
        json!({
            "token": "x.y.z", "spiffe_id": "spiffe://example.org/agents/a", "leaf_der": B64,
            "csr_der": B64, "proof": B64, "proof_iat": 1_700_000_000u64
        }),
        json!({
            "report_id": "r1", "task_id": TASK, "token_jti": "j", "agent": "spiffe://example.org/a",
            "tool": "crm.search", "resource": "case/1", "risk": "read",
            "scope_used": ["tool:crm.search:read"], "input_digest": "00", "decision": "allow",
            "policy_ids": ["p1"], "at": 1
        }),
        json!({
            "spiffe_id": "spiffe://example.org/web", "parent_id": "spiffe://example.org/baton/node/n1",
            "selectors": ["unix:uid:1000"], "x509_ttl_secs": 60, "dns_names": ["web.internal"]
        }),
        delegation_claims(3),
    ]
}

/// A delegation-claims document whose `act` chain is `depth` deep.
fn delegation_claims(depth: usize) -> Value {
    let mut act = json!({
        "sub": "spiffe://example.org/agents/root", "jti": "j0",
        "scope": ["tool:crm.*:*"], "exp": 10, "aud": ["a"]
    });
    for i in 1..=depth {
        act = json!({
            "sub": "spiffe://example.org/agents/hop", "jti": format!("j{i}"),
            "scope": ["tool:crm.*:*"], "exp": 10, "aud": ["a"], "act": act
        });
    }
    json!({
        "iss": "spiffe://example.org/baton/broker", "sub": "alice", "aud": ["a"],
        "exp": 10, "iat": 1, "jti": format!("j{depth}"), "act": act,
        "task": {"id": TASK, "purpose": "p", "risk_ceiling": "read", "max_depth": 9,
                 "initiator_iss": "https://idp"},
        "scope": ["tool:crm.*:*"], "depth": depth, "cnf": {"x5t#S256": "t"}
    })
}

#[test]
fn fuzz_valid_bodies_parse() {
    // The seeds the mutation tests start from are themselves accepted.
    let b = valid_bodies();
    serde_json::from_value::<JoinTokenRequest>(b[0].clone()).unwrap();
    serde_json::from_value::<AttestRequest>(b[1].clone()).unwrap();
    serde_json::from_value::<RenewRequest>(b[2].clone()).unwrap();
    serde_json::from_value::<SignX509Request>(b[3].clone()).unwrap();
    serde_json::from_value::<SignJwtRequest>(b[4].clone()).unwrap();
    serde_json::from_value::<StartTaskRequest>(b[5].clone()).unwrap();
    serde_json::from_value::<DelegateRequest>(b[6].clone()).unwrap();
    serde_json::from_value::<RedeemRequest>(b[7].clone()).unwrap();
    serde_json::from_value::<RenewTaskRequest>(b[8].clone()).unwrap();
    serde_json::from_value::<ToolCallReport>(b[9].clone()).unwrap();
    serde_json::from_value::<NewEntry>(b[10].clone())
        .unwrap()
        .validate()
        .unwrap();
    serde_json::from_value::<DelegationClaims>(b[11].clone()).unwrap();
}

#[test]
fn fuzz_deep_nesting_is_an_error_not_a_crash() {
    // Far past serde_json's recursion limit: an error, no stack overflow.
    for depth in [127, 128, 129, 1_000, 100_000] {
        let arrays = nested(depth, "[", "]", "");
        let objects = nested(depth, "{\"a\":", "}", "1");
        for doc in [&arrays, &objects] {
            check_all_bodies(doc.as_bytes());
        }
        // A chain of `act` objects nested this deep.
        let mut s =
            String::from(r#"{"sub":"spiffe://td/a","jti":"j","scope":["a:b:c"],"exp":1,"aud":[]}"#);
        for _ in 0..depth.min(300) {
            s = format!(
                r#"{{"sub":"spiffe://td/a","jti":"j","scope":["a:b:c"],"exp":1,"aud":[],"act":{s}}}"#
            );
        }
        let _ = serde_json::from_str::<baton_core::Actor>(&s);
    }
    // Within the limit, a long (but legal) chain decodes and walks.
    let claims: DelegationClaims = serde_json::from_value(delegation_claims(60)).unwrap();
    assert_eq!(claims.act.chain().len(), 61);
}

#[test]
fn fuzz_huge_numbers_are_errors() {
    for n in [
        "18446744073709551616",
        "-1",
        "1e20",
        "1.5",
        "99999999999999999999999999999999",
    ] {
        let doc = format!(r#"{{"ttl_secs": {n}}}"#);
        assert!(
            serde_json::from_str::<JoinTokenRequest>(&doc).is_err(),
            "{n}"
        );
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn fuzz_spiffe_id_arbitrary(s in "\\PC{0,120}") {
        check_spiffe_id(&s);
    }

    #[test]
    fn fuzz_spiffe_id_bytes(b in proptest::collection::vec(any::<u8>(), 0..200)) {
        check_spiffe_id(&String::from_utf8_lossy(&b));
    }

    #[test]
    fn fuzz_spiffe_id_mutated(s in valid_id().prop_flat_map(|v| mutated(v, 4))) {
        check_spiffe_id(&s);
    }

    #[test]
    fn fuzz_spiffe_id_near_limits(
        td_len in 250usize..260,
        path_len in 2030usize..2050,
        c in proptest::sample::select(vec!['a', 'Z', '.', '-', '_', '%', 'é', '/']),
    ) {
        check_spiffe_id(&format!("spiffe://{}", "a".repeat(td_len)));
        check_spiffe_id(&format!("spiffe://td/{}{c}", "a".repeat(path_len)));
        check_spiffe_id(&format!("spiffe://td/{}", "a/".repeat(path_len / 2)));
    }

    #[test]
    fn fuzz_selector(
        s in prop_oneof![
            "\\PC{0,80}",
            "unix:(uid|gid|path|sha256):\\PC{0,70}",
            proptest::sample::select(VALID_SELECTORS)
                .prop_flat_map(|v| mutated(v.to_owned(), 3)),
        ]
    ) {
        check_selector(&s);
    }

    #[test]
    fn fuzz_permission_and_scope(
        items in proptest::collection::vec(
            prop_oneof![
                "\\PC{0,40}",
                "[a-z*:._-]{0,30}",
                proptest::sample::select(VALID_PERMISSIONS)
                    .prop_flat_map(|v| mutated(v.to_owned(), 3)),
            ],
            0..5,
        )
    ) {
        for p in &items {
            check_permission(p);
        }
        check_scope(&items);
    }

    #[test]
    fn fuzz_small_types(
        s in prop_oneof![
            "\\PC{0,80}",
            Just(TASK.to_owned()).prop_flat_map(|v| mutated(v, 3)),
            Just("support.case-research".to_owned()).prop_flat_map(|v| mutated(v, 3)),
            Just("6f1c9a1e-2b1d-4b7e-9d7e-2f8a3c4d5e6f".to_owned()).prop_flat_map(|v| mutated(v, 3)),
            Just("*.web.internal".to_owned()).prop_flat_map(|v| mutated(v, 3)),
        ]
    ) {
        check_small_types(&s);
    }

    #[test]
    fn fuzz_api_bodies_arbitrary_bytes(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_all_bodies(&b);
    }

    #[test]
    fn fuzz_api_bodies_arbitrary_json(v in hostile_json()) {
        check_all_bodies(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn fuzz_api_bodies_mutated_json(
        v in proptest::sample::select(valid_bodies()).prop_flat_map(|v| mutated_json(v, 3))
    ) {
        check_all_bodies(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn fuzz_api_bodies_mutated_text(
        s in proptest::sample::select(valid_bodies())
            .prop_flat_map(|v| mutated(v.to_string(), 3))
    ) {
        check_all_bodies(s.as_bytes());
    }
}
