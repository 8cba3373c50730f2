//! Whole requests driven in-process: a real CA, SQLite in memory, the
//! example hop and admission policies, the dev OIDC issuer, the in-memory
//! revocation store, and time passed in. No HTTP: what a front end calls.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_audit::{AuditKeys, AuditLog};
use baton_ca::{Ca, CaConfig, WorkloadKey};
use baton_core::api::{
    AttestRequest, DelegateRequest, HandoffGrant, JoinTokenRequest, RedeemRequest,
    RenewTaskRequest, SignedSvid, StartTaskRequest, TaskCredential, ToolCallReport,
};
use baton_core::{NewEntry, Secret, SpiffeId, TrustDomain};
use baton_verify::PeerCert;
use serde_json::json;

use super::*;
use crate::delegation::{Delegation, DelegationSettings};
use crate::oidc::{DevIssuer, OidcVerifier};
use crate::revocation::{DurableCheck, RevokeTarget, Revoker};
use crate::service::{AuthenticatedNode, Broker, BrokerError, IssuancePolicy, LogIssuance};
use crate::store::SqliteStore;

const HOP_POLICIES: &[(&str, &str)] = &[
    (
        "schema.cedarschema",
        include_str!("../../../deploy/policies/schema.cedarschema"),
    ),
    (
        "delegation.cedar",
        include_str!("../../../deploy/policies/delegation.cedar"),
    ),
    (
        "scope.cedar",
        include_str!("../../../deploy/policies/scope.cedar"),
    ),
    (
        "research.cedar",
        include_str!("../../../deploy/policies/research.cedar"),
    ),
];

const PURPOSE: &str = "support.case-research";
const PLANNER: &str = "spiffe://example.org/agents/planner";
const SEARCHER: &str = "spiffe://example.org/agents/searcher";
/// The tool server of audience `crm`.
const CRM: &str = "spiffe://example.org/tools/crm";

struct World {
    t0: SystemTime,
    dev: DevIssuer,
    d: Delegation,
    /// One attested node serving [`PLANNER`] and [`SEARCHER`], with its
    /// agent SVID.
    node: AuthenticatedNode,
    node_svid: SignedSvid,
}

fn id(s: &str) -> SpiffeId {
    SpiffeId::parse(s).unwrap()
}

fn secs(t: SystemTime, s: u64) -> SystemTime {
    t + Duration::from_secs(s)
}

fn unix_of(t: SystemTime) -> u64 {
    unix(t)
}

/// The planner's task start for `id_token`, to `audience`, with the
/// tests' purpose, scope and bounds.
fn start_request(id_token: String, audience: serde_json::Value) -> StartTaskRequest {
    serde_json::from_value(json!({
        "id_token": id_token,
        "root_agent": PLANNER,
        "purpose": PURPOSE,
        "scope": ["tool:crm.search:read"],
        "risk_ceiling": "read",
        "ttl_secs": 600,
        "max_depth": 3,
        "audience": audience,
    }))
    .unwrap()
}

/// A gateway's request for the approval of `crm.search` on `case/1` by
/// `agent` holding `token` in `task`, for input digest `digest` (one hex
/// byte, repeated).
fn approval_ask(
    task: &baton_core::TaskId,
    token: &TaskCredential,
    agent: &str,
    digest: &str,
    ttl_secs: u64,
) -> baton_core::api::ApprovalRequest {
    serde_json::from_value(json!({
        "task_id": task.as_str(),
        "token_jti": jti_of(&token.token),
        "agent": agent,
        "tool": "crm.search",
        "resource": "case/1",
        "risk": "read",
        "input_digest": digest.repeat(32),
        "ttl_secs": ttl_secs,
    }))
    .unwrap()
}

impl World {
    fn new() -> Self {
        Self::with_settings(|_| {})
    }

    /// A world whose delegation settings `tune` adjusts first.
    fn with_settings(tune: impl FnOnce(&mut DelegationSettings)) -> Self {
        Self::with_ledger(tune, |store| store)
    }

    /// As [`with_settings`](Self::with_settings), with the revocation
    /// ledger `ledger` makes of the datastore.
    fn with_ledger(
        tune: impl FnOnce(&mut DelegationSettings),
        ledger: impl FnOnce(Arc<SqliteStore>) -> Arc<dyn crate::ledger::Ledger>,
    ) -> Self {
        let t0 = SystemTime::now();
        let td: TrustDomain = "example.org".parse().unwrap();
        let ca = Arc::new(
            Ca::load_or_create(CaConfig::new(td), secs(t0, 0) - Duration::from_secs(60)).unwrap(),
        );
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let broker = Arc::new(Broker::new(
            ca.clone(),
            store.clone(),
            Arc::new(LogIssuance),
            IssuancePolicy::default(),
        ));
        let revoker = Arc::new(Revoker::new(
            Arc::new(baton_revocation::MemoryStore::new()),
            ledger(store.clone()),
        ));
        let dev = DevIssuer::generate().unwrap();
        let sources: Vec<(String, String)> = HOP_POLICIES
            .iter()
            .map(|(n, s)| ((*n).to_owned(), (*s).to_owned()))
            .collect();
        let (schema, policies) = baton_policy::split_schema(sources);
        let policy = baton_policy::Engine::from_sources(&schema, &policies).unwrap();
        let admission = crate::admission::load(&crate::AdmissionSource::Unset, &[]).unwrap();
        let settings = DelegationSettings {
            purposes: [PURPOSE.parse().unwrap()].into_iter().collect(),
            tool_servers: [("crm".to_owned(), vec![id(CRM)])].into_iter().collect(),
            ..DelegationSettings::default()
        };
        let mut settings = settings;
        tune(&mut settings);
        let d = Delegation::new(
            broker.clone(),
            store,
            OidcVerifier::new(vec![dev.issuer().unwrap()]),
            Some(dev.clone()),
            Arc::new(policy),
            Arc::new(admission),
            Arc::new(AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap()),
            baton_verify::TokenVerifier::for_broker(
                baton_verify::JwtBundles::new([ca.bundle()]),
                Arc::new(DurableCheck(revoker.clone())),
            ),
            settings,
            revoker,
        );
        // A node attests with a join token and serves both agents.
        let token = broker
            .generate_join_token(
                &JoinTokenRequest {
                    ttl_secs: 600,
                    node_id: Some("spiffe://example.org/baton/node/n1".into()),
                },
                t0,
            )
            .unwrap();
        let node_key = WorkloadKey::generate().unwrap();
        let attest_req = AttestRequest {
            join_token: token.token.clone(),
            csr_der: node_key.csr_der(&token.node_id).unwrap(),
        };
        let node_svid = attest(&broker, d.revoker(), &attest_req, t0).unwrap();
        // The token is spent: the same request again is refused.
        let again = attest(&broker, d.revoker(), &attest_req, t0).unwrap_err();
        assert_eq!(again.code(), "unauthenticated", "{again}");
        for agent in [PLANNER, SEARCHER] {
            broker
                .create_entry(&NewEntry {
                    spiffe_id: agent.into(),
                    parent_id: node_svid.spiffe_id.to_string(),
                    selectors: vec!["unix:uid:1000".into()],
                    x509_ttl_secs: 3600,
                    jwt_ttl_secs: 300,
                    dns_names: Vec::new(),
                })
                .unwrap();
        }
        let node = super::node(
            &broker,
            d.revoker(),
            Some(&node_svid.spiffe_id),
            node_svid.cert_chain_der.first().map(Vec::as_slice),
            t0,
        )
        .unwrap();
        World {
            t0,
            dev,
            d,
            node,
            node_svid,
        }
    }

    fn start(&self, audience: &[&str], scope: &[&str]) -> StartTaskResponse {
        let token = self
            .dev
            .mint_with_groups(
                "alice@example.com",
                &["engineering".to_owned()],
                600,
                unix_of(self.t0),
            )
            .unwrap();
        let req: StartTaskRequest = serde_json::from_value(json!({
            "id_token": token,
            "root_agent": PLANNER,
            "purpose": PURPOSE,
            "scope": scope,
            "risk_ceiling": "read",
            "ttl_secs": 600,
            "max_depth": 3,
            "audience": audience,
        }))
        .unwrap();
        start_task(&self.d, &req, self.t0).unwrap()
    }

    /// The initiator approves `pending` at `t + 1`; the gateway asks again
    /// for the same call (`ask`) at `t + 2`: approved, and used up.
    fn approve_and_use(
        &self,
        pending: &baton_core::api::ApprovalState,
        ask: &baton_core::api::ApprovalRequest,
        t: u64,
    ) -> baton_core::api::ApprovalState {
        let decision: baton_core::api::ApprovalDecision = serde_json::from_value(json!({
            "id_token": self.dev.mint_with_groups("alice@example.com", &[], 600, t).unwrap(),
            "approve": true,
        }))
        .unwrap();
        self.d
            .decide_approval(&pending.id, &decision, t + 1)
            .unwrap();
        let used = self.d.request_approval(&id(CRM), ask, t + 2).unwrap();
        assert_eq!(used.status, "approved", "{used:?}");
        used
    }

    fn redeem_as(
        &self,
        grant: &HandoffGrant,
        agent: &str,
        at: SystemTime,
    ) -> Result<TaskCredential, BrokerError> {
        self.redeem_with(grant, agent, &WorkloadKey::generate().unwrap(), at)
    }

    fn redeem_with(
        &self,
        grant: &HandoffGrant,
        agent: &str,
        key: &WorkloadKey,
        at: SystemTime,
    ) -> Result<TaskCredential, BrokerError> {
        let req = RedeemRequest {
            grant: grant.grant.clone(),
            spiffe_id: id(agent),
            csr_der: key.csr_der(&id(agent)).unwrap(),
        };
        redeem(&self.d, &self.node, &req, at)
    }

    fn hop(
        &self,
        holder: &TaskCredential,
        audience: &[&str],
        scope: &[&str],
        at: SystemTime,
    ) -> Result<HandoffGrant, BrokerError> {
        let peer = PeerCert::from_verified_leaf(holder.cert_chain_der[0].clone()).unwrap();
        let req: DelegateRequest = serde_json::from_value(json!({
            "token": holder.token.expose(),
            "target": SEARCHER,
            "scope": scope,
            "purpose": PURPOSE,
            "audience": audience,
            "justification": "look the case up",
        }))
        .unwrap();
        delegate(&self.d, &peer, &req, at)
    }

    /// A node request from `peer` presenting `leaf`.
    fn node_as(
        &self,
        peer: &SpiffeId,
        leaf: Option<&[u8]>,
    ) -> Result<AuthenticatedNode, BrokerError> {
        super::node(self.d.broker(), self.d.revoker(), Some(peer), leaf, self.t0)
    }

    /// The node's own agent SVID leaf.
    fn node_leaf(&self) -> Option<&[u8]> {
        self.node_svid.cert_chain_der.first().map(Vec::as_slice)
    }

    /// Whether the registry holds `id` under `task`.
    fn registered(&self, task: &baton_core::TaskId, id: &str) -> bool {
        self.d
            .revoker()
            .task_credentials(task)
            .unwrap()
            .iter()
            .any(|c| c.id == id)
    }
}

/// The claims of a token (read, not verified: the test's own token).
fn claims_of(token: &Secret) -> serde_json::Value {
    use base64::Engine as _;
    let payload = token.expose().split('.').nth(1).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

/// The `jti` claim of a token.
fn jti_of(token: &Secret) -> String {
    claims_of(token)["jti"].as_str().unwrap().to_owned()
}

#[test]
fn a_task_runs_from_start_to_a_hop_and_every_credential_is_registered_before_it_leaves() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    // The grant is in the registry under its task before it is answered.
    let grant_id = crate::service::token_digest(started.grant.grant.expose());
    assert!(
        w.registered(&started.task_id, &grant_id),
        "the start's grant is registered"
    );

    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    assert_eq!(planner.spiffe_id, id(PLANNER));
    assert!(
        w.registered(&started.task_id, &jti_of(&planner.token)),
        "the token is registered"
    );

    let hop = w
        .hop(&planner, &["crm"], &["tool:crm.search:read"], secs(w.t0, 1))
        .unwrap();
    assert_eq!(hop.target, id(SEARCHER));
    let searcher = w.redeem_as(&hop, SEARCHER, secs(w.t0, 2)).unwrap();
    assert!(w.registered(&started.task_id, &jti_of(&searcher.token)));
    // Nothing of another task.
    assert!(!w.registered(
        &w.start(&["crm"], &["tool:crm.search:read"]).task_id,
        &grant_id
    ));

    // The trace holds the initiator, both redeems (each with the jti the
    // holder received) and the granted hop between them.
    let trace = w.d.trace(started.task_id.as_str()).unwrap();
    let t = &trace["trace"];
    assert_eq!(t["initiator"], "alice@example.com", "{trace}");
    assert_eq!(t["root"]["agent"], PLANNER, "{trace}");
    let items = t["root"]["items"].as_array().unwrap();
    assert_eq!(items[0]["type"], "redeemed", "{trace}");
    assert_eq!(items[0]["token_jti"], jti_of(&planner.token).as_str());
    assert_eq!(items[1]["type"], "hop", "{trace}");
    assert_eq!(items[1]["granted"], true, "{trace}");
    let delegate = &items[1]["delegate"];
    assert_eq!(delegate["agent"], SEARCHER, "{trace}");
    assert_eq!(delegate["items"][0]["type"], "redeemed", "{trace}");
    assert_eq!(
        delegate["items"][0]["token_jti"],
        jti_of(&searcher.token).as_str()
    );
}

#[test]
fn a_hop_only_narrows_audience_scope_and_depth() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let t = secs(w.t0, 1);
    // Audience widening at a hop.
    let e = w
        .hop(&planner, &["crm", "billing"], &["tool:crm.search:read"], t)
        .unwrap_err();
    assert_eq!(e.code(), "audience_widened", "{e}");
    // Scope widening.
    let e = w
        .hop(&planner, &["crm"], &["tool:crm.search:write"], t)
        .unwrap_err();
    assert_eq!(e.code(), "scope_widened", "{e}");
    // An empty audience is not "everything".
    let e = w
        .hop(&planner, &[], &["tool:crm.search:read"], t)
        .unwrap_err();
    assert_eq!(e.code(), "invalid_argument", "{e}");
    // The untampered control.
    w.hop(&planner, &["crm"], &["tool:crm.search:read"], t)
        .unwrap();
}

#[test]
fn a_grant_gives_one_credential_to_its_target_before_it_expires() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    // Another workload of the same node cannot take the planner's grant.
    let e = w.redeem_as(&started.grant, SEARCHER, w.t0).unwrap_err();
    assert_eq!(e.code(), "wrong_target", "{e}");
    // After its time (grant_ttl, 300 s by default) nobody can.
    let late = secs(w.t0, 301);
    let e = w.redeem_as(&started.grant, PLANNER, late).unwrap_err();
    assert_eq!(e.code(), "grant_expired", "{e}");

    let second = w.start(&["crm"], &["tool:crm.search:read"]);
    w.redeem_as(&second.grant, PLANNER, w.t0).unwrap();
    // A second redeem with a fresh key is not the same request: refused.
    let e = w.redeem_as(&second.grant, PLANNER, w.t0).unwrap_err();
    assert_eq!(e.code(), "grant_used", "{e}");
}

/// A renewed agent SVID replaces the old one everywhere: once the node has
/// presented the new one, the old one is revoked (refused wherever
/// revocation is checked, not only at node routes). Until then both work,
/// so a renewal whose answer was lost is not a dead node.
#[test]
fn an_agent_svid_renewed_away_is_revoked_once_its_successor_is_used() {
    let w = World::new();
    let node_id = w.node_svid.spiffe_id.clone();
    let old_leaf = w.node_leaf().unwrap().to_vec();
    let old_serial = baton_ca::leaf_info(std::slice::from_ref(&old_leaf))
        .unwrap()
        .serial_hex;
    let node = w.node_as(&node_id, Some(&old_leaf)).unwrap();
    let key = WorkloadKey::generate().unwrap();
    let renewed = super::renew_agent_svid(
        w.d.broker(),
        w.d.revoker(),
        &node,
        &key.csr_der(&node_id).unwrap(),
        w.t0,
    )
    .unwrap();
    let new_leaf = renewed.cert_chain_der[0].clone();
    let revoked = |serial: &str| w.d.revoker().durably_revoked(serial, unix(w.t0)).unwrap();
    // The answer may not have arrived: the old SVID still authenticates
    // and is not revoked.
    w.node_as(&node_id, Some(&old_leaf)).unwrap();
    assert!(!revoked(&old_serial));
    // The node presents its new SVID: the old one is revoked and refused.
    w.node_as(&node_id, Some(&new_leaf)).unwrap();
    assert!(revoked(&old_serial), "the renewed-away SVID is revoked");
    let e = w.node_as(&node_id, Some(&old_leaf)).unwrap_err();
    assert_eq!(e.code(), "agent_svid_revoked", "{e}");
    // The control: the new one keeps working, and is not revoked.
    w.node_as(&node_id, Some(&new_leaf)).unwrap();
    let new_serial = baton_ca::leaf_info(&[new_leaf]).unwrap().serial_hex;
    assert!(!revoked(&new_serial));
}

#[test]
fn a_node_whose_svid_is_not_its_current_one_is_refused() {
    let w = World::new();
    // The control: the node's own SVID authenticates it.
    w.node_as(&w.node_svid.spiffe_id, w.node_leaf()).unwrap();
    // No certificate at all.
    let e = w.node_as(&w.node_svid.spiffe_id, None).unwrap_err();
    assert_eq!(e.code(), "unauthenticated", "{e}");
    // A certificate issued for the node's name but never recorded as its
    // SVID (another key, signed by the same CA).
    let other = WorkloadKey::generate().unwrap();
    let issued =
        w.d.broker()
            .ca()
            .sign_x509_svid(
                &other.csr_der(&w.node_svid.spiffe_id).unwrap(),
                &w.node_svid.spiffe_id,
                Duration::from_secs(600),
                &[],
                w.t0,
            )
            .unwrap();
    let e = w
        .node_as(
            &w.node_svid.spiffe_id,
            issued.cert_chain_der.first().map(Vec::as_slice),
        )
        .unwrap_err();
    assert_eq!(e.code(), "agent_svid_superseded", "{e}");
    // A name that never attested.
    let stranger = id("spiffe://example.org/baton/node/stranger");
    let e = w.node_as(&stranger, w.node_leaf()).unwrap_err();
    assert_eq!(e.code(), "not_a_node", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_token_refuses_its_hops_and_ending_the_task_refuses_everything() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let jti = jti_of(&planner.token);
    let target: RevokeTarget = serde_json::from_value(json!({ "credential": jti })).unwrap();
    let done = revoke(&w.d, &target, "test", None, secs(w.t0, 1))
        .await
        .unwrap();
    assert!(done.revoked.iter().any(|r| r.id == jti), "{done:?}");
    let e = w
        .hop(&planner, &["crm"], &["tool:crm.search:read"], secs(w.t0, 2))
        .unwrap_err();
    assert_eq!(e.code(), "token_refused", "{e}");
    assert!(e.to_string().contains("revoked"), "{e}");

    // An operator's re-issued start grant may not reach a tool server
    // admission never admitted for the task (nor add one beside it).
    for audience in [
        vec!["payments".to_owned()],
        vec!["crm".into(), "payments".into()],
    ] {
        let e = regrant(&w.d, started.task_id.as_str(), audience, secs(w.t0, 3)).unwrap_err();
        assert_eq!(e.code(), "audience_not_admitted", "{e}");
        assert!(e.to_string().contains("payments"), "{e}");
    }
    // Another holder in the same task (the admitted audience: the
    // control), then the task ends.
    let regranted = regrant(
        &w.d,
        started.task_id.as_str(),
        vec!["crm".into()],
        secs(w.t0, 3),
    )
    .unwrap();
    let again = w.redeem_as(&regranted, PLANNER, secs(w.t0, 3)).unwrap();
    w.hop(&again, &["crm"], &["tool:crm.search:read"], secs(w.t0, 4))
        .unwrap();
    let ended = end_task(&w.d, started.task_id.as_str(), secs(w.t0, 5))
        .await
        .unwrap();
    assert!(ended.revoked >= 2, "{ended:?}");
    let e = w
        .hop(&again, &["crm"], &["tool:crm.search:read"], secs(w.t0, 6))
        .unwrap_err();
    assert!(matches!(e.code(), "token_refused" | "task_ended"), "{e}");
}

#[test]
fn a_token_presented_over_another_certificate_gets_no_hop() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let hop = w
        .hop(&planner, &["crm"], &["tool:crm.search:read"], secs(w.t0, 1))
        .unwrap();
    let searcher = w.redeem_as(&hop, SEARCHER, secs(w.t0, 2)).unwrap();
    // The planner's token over the searcher's certificate: a stolen token
    // is useless without the key it is bound to.
    let stolen = TaskCredential {
        cert_chain_der: searcher.cert_chain_der.clone(),
        ..planner.clone()
    };
    let e = w
        .hop(&stolen, &["crm"], &["tool:crm.search:read"], secs(w.t0, 3))
        .unwrap_err();
    assert_eq!(e.code(), "token_refused", "{e}");
    // The control: the holder's own pair.
    w.hop(&planner, &["crm"], &["tool:crm.search:read"], secs(w.t0, 3))
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_evicted_after_it_authenticated_gets_nothing_handed_out() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    // `w.node` authenticated before the eviction (a request in flight).
    w.d.broker()
        .nodes()
        .remove(
            w.d.revoker(),
            w.d.task_store(),
            w.node_svid.spiffe_id.as_str(),
            crate::nodes::Removal::Evict,
            "test",
            unix_of(w.t0),
        )
        .await
        .unwrap();
    let e = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap_err();
    assert!(matches!(e.code(), "not_a_node" | "not_entitled"), "{e}");
    // And a new request from it does not authenticate.
    let e = w
        .node_as(&w.node_svid.spiffe_id, w.node_leaf())
        .unwrap_err();
    assert_eq!(e.code(), "not_a_node", "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_revocation_with_until_on_a_task_is_refused_and_changes_nothing() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let task: RevokeTarget =
        serde_json::from_value(json!({ "task": started.task_id.as_str() })).unwrap();
    let e = revoke(&w.d, &task, "test", Some(unix_of(w.t0) + 60), secs(w.t0, 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_argument", "{e}");
    // Nothing was revoked: the holder still hops.
    w.hop(&planner, &["crm"], &["tool:crm.search:read"], secs(w.t0, 2))
        .unwrap();
    // An unknown task is a clear not-found, with nothing written.
    let unknown: RevokeTarget =
        serde_json::from_value(json!({ "task": "0123456789abcdef0123456789abcdef" })).unwrap();
    let e = revoke(&w.d, &unknown, "test", None, secs(w.t0, 3))
        .await
        .unwrap_err();
    assert!(matches!(e.code(), "not_found" | "invalid_argument"), "{e}");
}

fn report(task: &baton_core::TaskId, jti: &str, agent: &str, id: &str) -> ToolCallReport {
    serde_json::from_value(json!({
        "report_id": id,
        "task_id": task.as_str(),
        "token_jti": jti,
        "agent": agent,
        "tool": "crm.search",
        "resource": "case/1",
        "risk": "read",
        "scope_used": ["tool:crm.search:read"],
        "input_digest": "00".repeat(32),
        "decision": "allow",
        "policy_ids": [],
        "at": 0,
    }))
    .unwrap()
}

#[test]
fn a_report_batch_answers_a_forged_report_on_its_own_and_a_single_one_fails() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let jti = jti_of(&planner.token);
    let honest = report(&started.task_id, &jti, PLANNER, "r-1");
    // Claims the searcher made the call with the planner's token.
    let forged = report(&started.task_id, &jti, SEARCHER, "r-2");
    let clock = || secs(w.t0, 1);
    let answer = record_reports(
        &w.d,
        &id(CRM),
        &[honest.clone(), forged.clone()],
        false,
        None,
        &clock,
    )
    .unwrap();
    let receipts = answer["receipts"].as_array().unwrap();
    assert_eq!(receipts.len(), 2, "{answer}");
    assert!(receipts[0].get("refused").is_none(), "{answer}");
    assert_eq!(receipts[1]["report_id"], "r-2", "{answer}");
    assert!(receipts[1]["refused"]["code"].is_string(), "{answer}");
    // Alone, the forged report is refused outright.
    let e = record_reports(&w.d, &id(CRM), &[forged], true, None, &clock).unwrap_err();
    assert!(matches!(e, BrokerError::Forbidden { .. }), "{e}");
    // A server that does not serve the token's audience reports nothing.
    let other = report(&started.task_id, &jti, PLANNER, "r-3");
    let e = record_reports(
        &w.d,
        &id("spiffe://example.org/tools/other"),
        &[other],
        true,
        None,
        &clock,
    )
    .unwrap_err();
    assert!(matches!(e, BrokerError::Forbidden { .. }), "{e}");
    // Only the honest report is in the trace.
    let trace = w.d.trace(started.task_id.as_str()).unwrap().to_string();
    assert_eq!(trace.matches("\"tool_call\"").count(), 1, "{trace}");
}

#[test]
fn a_report_batch_is_one_append_under_one_checkpoint_and_each_report_counts_once() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let jti = jti_of(&planner.token);
    let clock = || secs(w.t0, 1);
    let r = |rid: &str| report(&started.task_id, &jti, PLANNER, rid);
    let forged = report(&started.task_id, &jti, SEARCHER, "b-forged");
    // b-1 twice in one batch, and a forged report between honest ones.
    let batch = [r("b-1"), r("b-2"), forged, r("b-1"), r("b-3")];
    let answer = record_reports(&w.d, &id(CRM), &batch, false, None, &clock).unwrap();
    let receipts = answer["receipts"].as_array().unwrap();
    assert_eq!(receipts.len(), 5, "{answer}");
    let ids: Vec<&str> = receipts
        .iter()
        .map(|r| r["report_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["b-1", "b-2", "b-forged", "b-1", "b-3"], "{answer}");
    assert!(receipts[2]["refused"]["code"].is_string(), "{answer}");
    assert_eq!(receipts[3]["duplicate"], true, "{answer}");
    assert_eq!(receipts[3]["index"], receipts[0]["index"], "{answer}");
    // The three new reports: consecutive indexes, one signed checkpoint.
    let new = [&receipts[0], &receipts[1], &receipts[4]];
    let first = new[0]["index"].as_u64().unwrap();
    for (k, v) in new.iter().enumerate() {
        assert_eq!(v["index"].as_u64(), Some(first + k as u64), "{answer}");
        assert_eq!(
            v["receipt"]["checkpoint"], new[0]["receipt"]["checkpoint"],
            "{answer}"
        );
        let receipt: baton_audit::Receipt = serde_json::from_value(v["receipt"].clone()).unwrap();
        assert_eq!(receipt.index, first + k as u64);
    }
    // Retried whole, the batch is acknowledged and logged nothing again.
    let again = record_reports(&w.d, &id(CRM), &batch, false, None, &clock).unwrap();
    for k in [0, 1, 3, 4] {
        assert_eq!(again["receipts"][k]["duplicate"], true, "{again}");
        assert_eq!(
            again["receipts"][k]["index"], receipts[k]["index"],
            "{again}"
        );
    }
    let trace = w.d.trace(started.task_id.as_str()).unwrap().to_string();
    assert_eq!(trace.matches("\"tool_call\"").count(), 3, "{trace}");
}

/// Report ids are each reporter's own: a server of the token's audience
/// that learned another server's report id and sends it first does not
/// make that server's report a "duplicate" dropped unlogged. The control:
/// each server's own retry is still a duplicate.
#[test]
fn a_report_id_sent_first_by_another_reporter_does_not_pre_empt_a_report() {
    const BILLING: &str = "spiffe://example.org/tools/billing";
    let w = World::with_settings(|s| {
        s.tool_servers
            .insert("billing".to_owned(), vec![id(BILLING)]);
    });
    let started = w.start(&["crm", "billing"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let jti = jti_of(&planner.token);
    let clock = || secs(w.t0, 1);
    let billing = id(BILLING);
    let r = report(&started.task_id, &jti, PLANNER, "r-shared");
    let send = |reporter: &SpiffeId| {
        let answer =
            record_reports(&w.d, reporter, std::slice::from_ref(&r), true, None, &clock).unwrap();
        answer["receipts"][0].clone()
    };
    let first = send(&billing);
    assert!(first["receipt"].is_object(), "{first}");
    let crm = send(&id(CRM));
    assert!(crm.get("duplicate").is_none(), "{crm}");
    assert!(crm["receipt"].is_object(), "{crm}");
    assert_ne!(crm["index"], first["index"], "{crm}");
    // Each server's retry is its own duplicate.
    for (reporter, answer) in [(&billing, &first), (&id(CRM), &crm)] {
        let again = send(reporter);
        assert_eq!(again["duplicate"], true, "{again}");
        assert_eq!(again["index"], answer["index"], "{again}");
    }
    let trace = w.d.trace(started.task_id.as_str()).unwrap().to_string();
    assert_eq!(trace.matches("\"tool_call\"").count(), 2, "{trace}");
}

#[test]
fn an_approval_vouches_for_one_reported_call_only() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let jti = jti_of(&planner.token);
    let t = unix_of(w.t0);
    let ask = approval_ask(&started.task_id, &planner, PLANNER, "ab", 60);
    let pending = w.d.request_approval(&id(CRM), &ask, t).unwrap();
    assert_eq!(pending.status, "pending");
    let used = w.approve_and_use(&pending, &ask, t);
    assert_eq!(used.id, pending.id);

    let approved_report = |report_id: &str| {
        let mut r = report(&started.task_id, &jti, PLANNER, report_id);
        r.reason = Some(format!("approved in {}", pending.id));
        r
    };
    let clock = || secs(w.t0, 3);
    let send = |report_id: &str| {
        record_reports(
            &w.d,
            &id(CRM),
            &[approved_report(report_id)],
            true,
            None,
            &clock,
        )
    };
    // Two reports citing it in one batch: the first is recorded, the
    // second refused on its own.
    let both = record_reports(
        &w.d,
        &id(CRM),
        &[approved_report("r-1"), approved_report("r-2")],
        false,
        None,
        &clock,
    )
    .unwrap();
    assert!(both["receipts"][0]["receipt"].is_object(), "{both}");
    assert_eq!(both["receipts"][1]["report_id"], "r-2", "{both}");
    assert_eq!(
        both["receipts"][1]["refused"]["code"], "report_refused",
        "{both}"
    );
    let first = send("r-1").unwrap();
    assert!(first["receipts"][0]["index"].is_u64(), "{first}");
    // The same report retried is acknowledged, not refused.
    let again = send("r-1").unwrap();
    assert_eq!(again["receipts"][0]["duplicate"], true, "{again}");
    // A second call dressed up with the same approval is refused.
    let e = send("r-2").unwrap_err();
    assert_eq!(e.code(), "report_refused", "{e}");
    assert!(
        e.to_string().contains("one approval vouches for one call"),
        "{e}"
    );
    let state = w.d.get_approval(&pending.id, t + 4).unwrap();
    assert_eq!(
        (state.status.as_str(), state.reported_in.as_deref()),
        ("reported", Some("r-1"))
    );
    let trace = w.d.trace(started.task_id.as_str()).unwrap().to_string();
    assert_eq!(trace.matches("\"tool_call\"").count(), 1, "{trace}");
}

/// An approval vouches only for a report of the call it was asked for:
/// one citing it at another risk tier (a riskier call dressed up as the
/// approved one) is refused, and the approval stays unused for its own
/// call; the control, the report at the approved tier, is recorded.
#[test]
fn a_report_citing_an_approval_must_be_of_the_approved_risk() {
    let w = World::new();
    let t = unix_of(w.t0);
    let token = w
        .dev
        .mint_with_groups("alice@example.com", &["engineering".to_owned()], 600, t)
        .unwrap();
    let mut req = start_request(token, json!(["crm"]));
    req.risk_ceiling = baton_core::RiskTier::Write;
    let started = start_task(&w.d, &req, w.t0).unwrap();
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let jti = jti_of(&planner.token);
    let ask = approval_ask(&started.task_id, &planner, PLANNER, "ab", 60);
    let pending = w.d.request_approval(&id(CRM), &ask, t).unwrap();
    let used = w.approve_and_use(&pending, &ask, t);
    assert_eq!(used.token_jti.as_deref(), Some(jti.as_str()));
    let clock = || secs(w.t0, 3);
    let citing = |report_id: &str, risk: baton_core::RiskTier| {
        let mut r = report(&started.task_id, &jti, PLANNER, report_id);
        r.risk = risk;
        r.reason = Some(format!("approved in {}", pending.id));
        record_reports(&w.d, &id(CRM), &[r], true, None, &clock)
    };
    let e = citing("r-write", baton_core::RiskTier::Write).unwrap_err();
    assert_eq!(e.code(), "report_refused", "{e}");
    assert!(e.to_string().contains("no approval used by"), "{e}");
    assert_eq!(w.d.get_approval(&pending.id, t + 4).unwrap().status, "used");
    let ok = citing("r-read", baton_core::RiskTier::Read).unwrap();
    assert!(
        ok["receipts"][0]["index"].is_u64() || ok["index"].is_u64(),
        "{ok}"
    );
    assert_eq!(
        w.d.get_approval(&pending.id, t + 4)
            .unwrap()
            .reported_in
            .as_deref(),
        Some("r-read")
    );
}

/// Brokers on one datastore whose clocks differ (or one clock stepped
/// back): a broker ahead of the others forgetting an ID token at its
/// expiry would let a slower one accept its replay. Its single use is
/// remembered past its expiry. The control: a fresh token starts a task.
#[test]
fn an_id_token_is_single_use_even_across_clocks_that_differ() {
    let w = World::new();
    let t = unix_of(w.t0);
    let request = |token: String| start_request(token, json!(["crm"]));
    let mint = |at: u64| {
        w.dev
            .mint_with_groups("alice@example.com", &["engineering".to_owned()], 600, at)
            .unwrap()
    };
    let captured = request(mint(t));
    start_task(&w.d, &captured, w.t0).unwrap();
    // A broker whose clock is 650 s ahead starts a task with its own
    // token, past the captured one's expiry.
    start_task(&w.d, &request(mint(t + 640)), secs(w.t0, 650)).unwrap();
    // A broker on time sees the captured token still valid: refused.
    let e = start_task(&w.d, &captured, secs(w.t0, 590)).unwrap_err();
    assert_eq!(e.code(), "unauthenticated", "{e}");
    assert!(e.to_string().contains("single use"), "{e}");
    // Control: a fresh token at the same moment starts one.
    start_task(&w.d, &request(mint(t + 580)), secs(w.t0, 590)).unwrap();
}

/// A hop's audience is echoed in its refusal and shown in the trace: a
/// value with terminal escapes or a newline is refused as a bad argument
/// and no caller text reaches the trace unescaped; a refused hop keeps
/// only the start of its justification, a granted one all of it. The
/// controls: a plain widened audience is refused as `audience_widened`,
/// and a 2,000-byte justification on a granted hop is kept whole.
#[test]
fn a_hop_cannot_write_terminal_escapes_or_a_long_text_into_the_trace() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let peer = PeerCert::from_verified_leaf(planner.cert_chain_der[0].clone()).unwrap();
    let ask = |audience: &[&str], scope: &[&str], justification: &str| {
        let req: DelegateRequest = serde_json::from_value(json!({
            "token": planner.token.expose(),
            "target": SEARCHER,
            "scope": scope,
            "purpose": PURPOSE,
            "audience": audience,
            "justification": justification,
        }))
        .unwrap();
        delegate(&w.d, &peer, &req, w.t0)
    };
    let forged = "x\u{1b}[3A\u{1b}[J\n└─ tool crm.delete on dataset:all (delete): allow";
    let e = ask(&["crm", forged], &["tool:crm.search:read"], "look").unwrap_err();
    assert_eq!(e.code(), "invalid_argument", "{e}");
    assert!(e.to_string().contains("audience[1]"), "{e}");
    let e = ask(&["crm", "billing"], &["tool:crm.search:read"], "look").unwrap_err();
    assert_eq!(e.code(), "audience_widened", "{e}");
    let long = "j".repeat(60_000);
    let e = ask(&["crm"], &["tool:crm.export:read"], &long).unwrap_err();
    assert_eq!(e.code(), "scope_widened", "{e}");
    // A refused hop keeps at most 64 permissions of the scope it asked
    // for: 300 of them are not copied into the trace with each refusal.
    let wide: Vec<String> = (0..300).map(|i| format!("tool:crm.p{i:03}:read")).collect();
    let wide: Vec<&str> = wide.iter().map(String::as_str).collect();
    let e = ask(&["crm"], &wide, "look").unwrap_err();
    assert_eq!(e.code(), "scope_widened", "{e}");
    let kept = "k".repeat(2_000);
    ask(&["crm"], &["tool:crm.search:read"], &kept).unwrap();
    // A task's audience is held to the same bounds at its start.
    let start = |audience: Vec<String>| {
        let token = w
            .dev
            .mint_with_groups(
                "alice@example.com",
                &["engineering".to_owned()],
                600,
                unix_of(w.t0) + audience.len() as u64,
            )
            .unwrap();
        start_task(&w.d, &start_request(token, json!(audience)), w.t0)
    };
    let many: Vec<String> = (0..65).map(|i| format!("aud{i}")).collect();
    let e = start(many).unwrap_err();
    assert!(e.to_string().contains("1 to 64 values"), "{e}");
    let e = start(vec!["a".repeat(257)]).unwrap_err();
    assert!(e.to_string().contains("audience[0]"), "{e}");
    start(vec!["crm".into(), "a".repeat(256)]).unwrap();

    let trace = w.d.trace(started.task_id.as_str()).unwrap();
    let text = trace["text"].as_str().unwrap();
    assert!(
        !text.contains('\u{1b}') && !text.contains("\n└─ tool crm.delete"),
        "{text}"
    );
    assert!(
        !text
            .lines()
            .any(|l| l.contains("└─ tool crm.delete") && !l.contains("\\n")),
        "{text}"
    );
    assert!(text.contains("REFUSED (audience_widened"), "{text}");
    let json = trace.to_string();
    assert!(
        !json.contains(&long[..1_000]),
        "a refused hop kept its whole justification"
    );
    assert!(json.contains(&"j".repeat(500)), "{json}");
    assert!(json.contains(&kept), "a granted hop lost its justification");
    assert!(json.contains("tool:crm.p063:read"), "{json}");
    assert!(
        !json.contains("tool:crm.p064:read"),
        "a refused hop kept its whole scope"
    );
}

/// An approval is bound to the credential it was asked with and to the
/// task's purpose: the same call asked with another token of the same
/// agent, after the token's chain is revoked, or after the purpose has
/// changed, does not use it up. The control: the same token asking again
/// under the same purpose gets it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_dies_with_its_token_and_with_a_purpose_change() {
    let w = World::with_settings(|s| {
        s.purposes.insert("support.case-update".parse().unwrap());
    });
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let scope = ["tool:crm.search:read"];
    let s1 = w.hop(&planner, &["crm"], &scope, w.t0).unwrap();
    let s1 = w.redeem_as(&s1, SEARCHER, w.t0).unwrap();
    let s2 = w.hop(&planner, &["crm"], &scope, w.t0).unwrap();
    let s2 = w.redeem_as(&s2, SEARCHER, w.t0).unwrap();
    let t = unix_of(w.t0);
    let ask = |token: &TaskCredential, digest: &str| {
        approval_ask(&started.task_id, token, SEARCHER, digest, 600)
    };
    let approve = |id: &str, at: u64| {
        let decision: baton_core::api::ApprovalDecision = serde_json::from_value(json!({
            "id_token": w.dev.mint_with_groups("alice@example.com", &[], 600, at).unwrap(),
            "approve": true,
        }))
        .unwrap();
        w.d.decide_approval(id, &decision, at).unwrap();
    };

    // Another credential of the same agent asks for the same call: a new
    // approval, pending; the approved one is left for its own token.
    let first = w.d.request_approval(&id(CRM), &ask(&s1, "ab"), t).unwrap();
    approve(&first.id, t + 1);
    let other =
        w.d.request_approval(&id(CRM), &ask(&s2, "ab"), t + 2)
            .unwrap();
    assert_eq!(other.status, "pending", "{other:?}");
    assert_ne!(other.id, first.id);
    let own =
        w.d.request_approval(&id(CRM), &ask(&s1, "ab"), t + 3)
            .unwrap();
    assert_eq!(
        (own.id.as_str(), own.status.as_str()),
        (first.id.as_str(), "approved")
    );

    // Approved, then the token it was asked with is revoked through its
    // parent: it neither uses the approval up nor asks again.
    let second =
        w.d.request_approval(&id(CRM), &ask(&s1, "cd"), t + 4)
            .unwrap();
    approve(&second.id, t + 5);
    let parent: RevokeTarget =
        serde_json::from_value(json!({ "credential": jti_of(&planner.token) })).unwrap();
    revoke(&w.d, &parent, "test", None, secs(w.t0, 6))
        .await
        .unwrap();
    let e =
        w.d.request_approval(&id(CRM), &ask(&s1, "cd"), t + 7)
            .unwrap_err();
    assert_eq!(e.code(), "revoked", "{e}");
    assert_eq!(
        w.d.get_approval(&second.id, t + 8).unwrap().status,
        "approved"
    );

    // Approved under one purpose, asked again under another: a new one.
    let fresh = w.start(&["crm"], &["tool:crm.search:read"]);
    let root = w.redeem_as(&fresh.grant, PLANNER, w.t0).unwrap();
    let ask_root = approval_ask(&fresh.task_id, &root, PLANNER, "ef", 600);
    let third = w.d.request_approval(&id(CRM), &ask_root, t + 9).unwrap();
    approve(&third.id, t + 10);
    w.d.set_purpose(
        fresh.task_id.as_str(),
        &"support.case-update".parse().unwrap(),
        secs(w.t0, 11),
    )
    .unwrap();
    let after = w.d.request_approval(&id(CRM), &ask_root, t + 12).unwrap();
    assert_eq!(after.status, "pending", "{after:?}");
    assert_ne!(after.id, third.id);
}

/// An allowed call's report that words an approval otherwise than the
/// checked `approved in ID` (another case, a leading space, another
/// phrase) spends no approval and is not shown as approved: the trace
/// keeps the reporter's text, marked unverified. The control: a reason
/// that mentions no approval is kept as it is.
#[test]
fn a_report_cannot_word_a_call_as_approved_without_an_approval() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let jti = jti_of(&planner.token);
    let clock = || secs(w.t0, 3);
    let reasons = [
        "Approved in ap_0123456789abcdef0123456789abcdef",
        " approved in ap_0123456789abcdef0123456789abcdef",
        "approved: ap_0123456789abcdef0123456789abcdef",
        "APPR0VED by alice",
    ];
    for (i, reason) in reasons.iter().enumerate() {
        let mut r = report(&started.task_id, &jti, PLANNER, &format!("loose-{i}"));
        r.reason = Some((*reason).to_owned());
        record_reports(&w.d, &id(CRM), &[r], true, None, &clock).unwrap();
    }
    let mut control = report(&started.task_id, &jti, PLANNER, "plain");
    control.reason = Some("cached answer".to_owned());
    record_reports(&w.d, &id(CRM), &[control], true, None, &clock).unwrap();
    let trace = w.d.trace(started.task_id.as_str()).unwrap();
    let text = trace["text"].as_str().unwrap();
    assert_eq!(
        text.matches("unverified note from the reporter").count(),
        reasons.len(),
        "{text}"
    );
    assert!(text.contains("allow (cached answer)"), "{text}");
}

#[test]
fn an_approver_group_counts_only_as_asserted_by_its_own_issuer() {
    let ask_in = |w: &World| {
        let started = w.start(&["crm"], &["tool:crm.search:read"]);
        let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
        let ask = approval_ask(&started.task_id, &planner, PLANNER, "cd", 60);
        w.d.request_approval(&id(CRM), &ask, unix_of(w.t0)).unwrap()
    };
    // bob (not the initiator) holds a token naming group "approvers".
    let bob = |w: &World, groups: &[&str]| -> baton_core::api::ApprovalDecision {
        let groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        serde_json::from_value(json!({
            "id_token": w.dev.mint_with_groups("bob@example.com", &groups, 600, unix_of(w.t0)).unwrap(),
            "approve": true,
        }))
        .unwrap()
    };
    let group_of = |issuer: &str| crate::delegation::ApproverGroup {
        issuer: issuer.to_owned(),
        group: "approvers".to_owned(),
    };

    // The group is configured for a corporate issuer: the dev issuer's
    // token naming it grants nothing, and nothing is decided.
    let w = World::with_settings(|s| {
        s.approver_groups = vec![group_of("https://login.corp.example")];
    });
    let pending = ask_in(&w);
    let e =
        w.d.decide_approval(&pending.id, &bob(&w, &["approvers"]), unix_of(w.t0) + 1)
            .unwrap_err();
    assert_eq!(e.code(), "not_entitled", "{e}");
    assert!(
        e.to_string()
            .contains("approvers (of https://login.corp.example)"),
        "{e}"
    );
    let state = w.d.get_approval(&pending.id, unix_of(w.t0) + 1).unwrap();
    assert_eq!(state.status, "pending");

    // Control: the same group configured for the issuer that asserts it.
    let w = World::with_settings(|s| {
        s.approver_groups = vec![group_of(crate::oidc::DEV_ISSUER)];
    });
    let pending = ask_in(&w);
    // Another group of the right issuer is not enough.
    let e =
        w.d.decide_approval(&pending.id, &bob(&w, &["readers"]), unix_of(w.t0) + 1)
            .unwrap_err();
    assert_eq!(e.code(), "not_entitled", "{e}");
    let decided =
        w.d.decide_approval(&pending.id, &bob(&w, &["approvers"]), unix_of(w.t0) + 1)
            .unwrap();
    assert_eq!(decided.status, "approved");
    assert_eq!(decided.decided_by.as_deref(), Some("bob@example.com"));
}

/// A decision refused for any reason (not entitled, an unknown id, a bad
/// reason, a closed approval) spends its ID token all the same: a token
/// the broker did not act on cannot be taken from the deciding human's
/// command line and used to start a task as them. A fresh token of the
/// same human starting the task is the control.
#[test]
fn a_refused_decision_spends_its_id_token() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let ask = approval_ask(&started.task_id, &planner, PLANNER, "cd", 60);
    let pending = w.d.request_approval(&id(CRM), &ask, unix_of(w.t0)).unwrap();
    let t = unix_of(w.t0) + 1;
    let token_of = |user: &str| w.dev.mint_with_groups(user, &[], 600, t).unwrap();
    let decision = |token: &str, reason: Option<String>| -> baton_core::api::ApprovalDecision {
        serde_json::from_value(json!({"id_token": token, "approve": true, "reason": reason}))
            .unwrap()
    };
    let start_with = |token: &str| {
        let req: StartTaskRequest = serde_json::from_value(json!({
            "id_token": token,
            "root_agent": PLANNER,
            "purpose": PURPOSE,
            "scope": ["tool:crm.search:read"],
            "risk_ceiling": "read",
            "ttl_secs": 600,
            "max_depth": 3,
            "audience": ["crm"],
        }))
        .unwrap();
        start_task(&w.d, &req, w.t0)
    };
    let spent = |token: &str| {
        let e = start_with(token).unwrap_err();
        assert!(e.to_string().contains("single use"), "{e}");
    };

    let bob = token_of("bob@example.com");
    let e =
        w.d.decide_approval(&pending.id, &decision(&bob, None), t)
            .unwrap_err();
    assert_eq!(e.code(), "not_entitled", "{e}");
    spent(&bob);

    let alice = token_of("alice@example.com");
    let e =
        w.d.decide_approval("ap_unknown", &decision(&alice, None), t)
            .unwrap_err();
    assert_eq!(e.code(), "not_found", "{e}");
    spent(&alice);

    for reason in [
        "x".repeat(1025),
        "ok\u{1b}[2J".to_owned(),
        "paid\u{202e}dias".to_owned(),
    ] {
        let alice = token_of("alice@example.com");
        let e =
            w.d.decide_approval(&pending.id, &decision(&alice, Some(reason.clone())), t)
                .unwrap_err();
        assert_eq!(e.code(), "invalid_argument", "{reason:?}: {e}");
        assert!(e.to_string().contains("reason"), "{e}");
        spent(&alice);
    }
    assert_eq!(w.d.get_approval(&pending.id, t).unwrap().status, "pending");

    // The initiator decides, with a plain reason; a second decision is
    // refused as closed, and its token is spent too.
    let decided =
        w.d.decide_approval(
            &pending.id,
            &decision(
                &token_of("alice@example.com"),
                Some("checked with finance".into()),
            ),
            t,
        )
        .unwrap();
    assert_eq!(decided.status, "approved");
    assert_eq!(decided.reason.as_deref(), Some("checked with finance"));
    let late = token_of("alice@example.com");
    let e =
        w.d.decide_approval(&pending.id, &decision(&late, None), t)
            .unwrap_err();
    assert_eq!(e.code(), "approval_closed", "{e}");
    spent(&late);

    // Control: a fresh token of the same human (in the group the
    // admission policy asks for) starts a task.
    let fresh = w
        .dev
        .mint_with_groups("alice@example.com", &["engineering".to_owned()], 600, t)
        .unwrap();
    start_with(&fresh).unwrap();
}

/// A renewal of `held`'s certificate with a CSR for `new_key`, its proof
/// of possession signed with `proof_key` at `at`.
fn renewal_of(
    held: &TaskCredential,
    proof_key: &WorkloadKey,
    new_key: &WorkloadKey,
    at: SystemTime,
) -> RenewTaskRequest {
    RenewTaskRequest {
        token: held.token.clone(),
        spiffe_id: id(PLANNER),
        leaf_der: held.cert_chain_der[0].clone(),
        csr_der: new_key.csr_der(&id(PLANNER)).unwrap(),
        proof: baton_ca::possession::sign_renew_proof(
            proof_key.pkcs8_der(),
            held.token.expose(),
            unix_of(at),
        )
        .unwrap(),
        proof_iat: unix_of(at),
    }
}

#[test]
fn a_renewal_needs_the_current_key_revokes_the_old_certificate_and_happens_once() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let old_key = WorkloadKey::generate().unwrap();
    let planner = w
        .redeem_with(&started.grant, PLANNER, &old_key, w.t0)
        .unwrap();
    let at = secs(w.t0, 10);
    let renewal = |proof_key: &WorkloadKey, new_key: &WorkloadKey| {
        renewal_of(&planner, proof_key, new_key, at)
    };
    // Two renewals of the same certificate at once (both past every check
    // before either is handed out, as at two brokers): one rebinds the
    // token, the other is refused, so one certificate replaces the old
    // one. Driven at the decision, before the old serial is revoked.
    {
        let w = World::new();
        let started = w.start(&["crm"], &["tool:crm.search:read"]);
        let old_key = WorkloadKey::generate().unwrap();
        let planner = w
            .redeem_with(&started.grant, PLANNER, &old_key, w.t0)
            .unwrap();
        let at = secs(w.t0, 10);
        let race = |new_key: &WorkloadKey| renewal_of(&planner, &old_key, new_key, at);
        let (a, b) = (
            WorkloadKey::generate().unwrap(),
            WorkloadKey::generate().unwrap(),
        );
        let first = w.d.renew(&w.node, &race(&a), at).unwrap();
        let e = w.d.renew(&w.node, &race(&b), at).unwrap_err();
        assert_eq!(e.code(), "renewal_raced", "{e}");
        // The winner's pair hops once handed out; the loser got nothing.
        let won = hand_out_minted(&w.d, &w.node, first, at).unwrap();
        w.hop(&won, &["crm"], &["tool:crm.search:read"], secs(w.t0, 11))
            .unwrap();
    }
    // A proof made with another key (a thief holding only the token and
    // the public certificate) renews nothing.
    let thief = WorkloadKey::generate().unwrap();
    let e = renew(&w.d, &w.node, &renewal(&thief, &thief), at).unwrap_err();
    assert_eq!(e.code(), "proof_invalid", "{e}");
    // The holder's renewal: same claims, a new certificate.
    let new_key = WorkloadKey::generate().unwrap();
    let renewed = renew(&w.d, &w.node, &renewal(&old_key, &new_key), at).unwrap();
    assert_ne!(renewed.cert_chain_der[0], planner.cert_chain_der[0]);
    assert_eq!(jti_of(&renewed.token), jti_of(&planner.token));
    assert!(renewed.expires_at <= planner.expires_at);
    // The old certificate is revoked: no hop with it, and no second
    // renewal from it.
    let e = w
        .hop(
            &planner,
            &["crm"],
            &["tool:crm.search:read"],
            secs(w.t0, 11),
        )
        .unwrap_err();
    assert_eq!(e.code(), "certificate_revoked", "{e}");
    let e = renew(&w.d, &w.node, &renewal(&old_key, &new_key), at).unwrap_err();
    assert!(
        matches!(
            e.code(),
            "token_refused" | "certificate_revoked" | "revoked"
        ),
        "{e}"
    );
    // The control: the renewed pair hops.
    w.hop(
        &renewed,
        &["crm"],
        &["tool:crm.search:read"],
        secs(w.t0, 11),
    )
    .unwrap();
}

#[test]
fn an_entry_stored_without_a_uid_or_gid_gets_no_svid() {
    let w = World::new();
    let broker = w.d.broker();
    // As an entry stored before the rule: only the executable, which any
    // process on the node could exec after connecting.
    let exe_only = baton_core::Entry {
        id: baton_core::EntryId::random(),
        spiffe_id: id("spiffe://example.org/agents/exe-only"),
        parent_id: w.node.id().clone(),
        selectors: vec![baton_core::Selector::parse("unix:path:/usr/bin/agent").unwrap()],
        x509_ttl_secs: 3600,
        jwt_ttl_secs: 300,
        dns_names: Vec::new(),
    };
    broker.store().create_entry(&exe_only).unwrap();
    let pinned = broker
        .store()
        .list_entries_by_parent(w.node.id())
        .unwrap()
        .into_iter()
        .find(|e| e.spiffe_id.to_string() == PLANNER)
        .unwrap();
    let sign = |entry: &baton_core::Entry| {
        let key = WorkloadKey::generate().unwrap();
        sign_x509(
            broker,
            w.d.revoker(),
            &w.node,
            &baton_core::api::SignX509Request {
                items: vec![baton_core::api::SignX509Item {
                    entry_id: entry.id.clone(),
                    csr_der: key.csr_der(&entry.spiffe_id).unwrap(),
                }],
            },
            w.t0,
        )
    };
    // Control: the uid-pinned entry of the same node is signed.
    assert_eq!(sign(&pinned).unwrap().svids.len(), 1);
    let e = sign(&exe_only).unwrap_err();
    assert_eq!(e.code(), "entry_unbound", "{e}");
    assert!(e.to_string().contains("unix:uid"), "{e}");
    // Nor is it synced to the node: in a node daemon's batch it would get
    // every entry of the node refused.
    let synced = broker.sync(&w.node, None, w.t0).unwrap().entries;
    assert!(synced.iter().any(|e| e.id == pinned.id));
    assert!(!synced.iter().any(|e| e.id == exe_only.id));
}

/// An entry stored under `/baton/` before those ids were reserved (here
/// the broker's own name, pinned to a uid like any entry) gets no SVID: a
/// workload holding the broker's SPIFFE ID could pose as the broker to
/// node daemons. The control: the uid-pinned planner entry of the same
/// node is signed.
#[test]
fn an_entry_stored_under_a_reserved_id_gets_no_svid() {
    let w = World::new();
    let broker = w.d.broker();
    let planner = broker
        .store()
        .list_entries_by_parent(w.node.id())
        .unwrap()
        .into_iter()
        .find(|e| e.spiffe_id.to_string() == PLANNER)
        .unwrap();
    let legacy = baton_core::Entry {
        id: baton_core::EntryId::random(),
        spiffe_id: id("spiffe://example.org/baton/broker"),
        parent_id: w.node.id().clone(),
        selectors: planner.selectors.clone(),
        x509_ttl_secs: 3600,
        jwt_ttl_secs: 300,
        dns_names: Vec::new(),
    };
    broker.store().create_entry(&legacy).unwrap();
    let sign = |entry: &baton_core::Entry| {
        let key = WorkloadKey::generate().unwrap();
        sign_x509(
            broker,
            w.d.revoker(),
            &w.node,
            &baton_core::api::SignX509Request {
                items: vec![baton_core::api::SignX509Item {
                    entry_id: entry.id.clone(),
                    csr_der: key.csr_der(&entry.spiffe_id).unwrap(),
                }],
            },
            w.t0,
        )
    };
    assert_eq!(sign(&planner).unwrap().svids.len(), 1);
    let e = sign(&legacy).unwrap_err();
    assert_eq!(e.code(), "reserved_id", "{e}");
    let synced = broker.sync(&w.node, None, w.t0).unwrap().entries;
    assert!(synced.iter().any(|e| e.id == planner.id));
    assert!(!synced.iter().any(|e| e.id == legacy.id));
    let e = sign_jwt(
        broker,
        w.d.revoker(),
        &w.node,
        &baton_core::api::SignJwtRequest {
            entry_id: legacy.id.clone(),
            audience: vec!["svc".into()],
        },
        w.t0,
    )
    .unwrap_err();
    assert_eq!(e.code(), "reserved_id", "{e}");
}

/// `revoke agent` racing a workload SVID's signing: the SVID was signed
/// past the block check, the block and the agent's revocation landed
/// before its registration. It must not leave: the block is checked again
/// once it is registered. The control: the same signing after the block
/// is lifted is handed out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workload_svid_signed_while_its_agent_is_revoked_does_not_leave() {
    let w = World::new();
    let broker = w.d.broker();
    let planner = broker
        .store()
        .list_entries_by_parent(w.node.id())
        .unwrap()
        .into_iter()
        .find(|e| e.spiffe_id.to_string() == PLANNER)
        .unwrap();
    let request = || baton_core::api::SignX509Request {
        items: vec![baton_core::api::SignX509Item {
            entry_id: planner.id.clone(),
            csr_der: WorkloadKey::generate()
                .unwrap()
                .csr_der(&planner.spiffe_id)
                .unwrap(),
        }],
    };
    // Signed past the first check...
    let issued = broker.sign_x509(&w.node, &request(), w.t0);
    // ...then the operator revokes the agent...
    let agent: RevokeTarget = serde_json::from_value(json!({ "agent": PLANNER })).unwrap();
    revoke(&w.d, &agent, "test", None, w.t0).await.unwrap();
    // ...then the registration and the hand-out.
    let e = hand_out(broker, w.d.revoker(), &w.node, issued, w.t0, still_attested).unwrap_err();
    assert_eq!(e.code(), "agent_blocked", "{e}");

    // Control: lifted, the agent's SVID is handed out again.
    w.d.unblock_agent(&id(PLANNER)).unwrap();
    let issued = broker.sign_x509(&w.node, &request(), secs(w.t0, 1));
    let signed = hand_out(
        broker,
        w.d.revoker(),
        &w.node,
        issued,
        secs(w.t0, 1),
        still_attested,
    )
    .unwrap();
    assert_eq!(signed.svids.len(), 1);
}

/// A join token for a node attests it only while no daemon holds a live
/// agent SVID for it, and a token generated before an eviction or a ban
/// never attests afterwards (also once the ban is lifted): a leaked or
/// left-over token cannot take a running node's identity, nor bring back
/// a node the operator cut off. The control: a token generated after the
/// eviction (or the lifted ban) attests.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_neither_takes_over_a_live_node_nor_outlives_its_eviction_or_ban() {
    let w = World::new();
    let broker = w.d.broker();
    let node_id = w.node.id().clone();
    let token = |at: SystemTime| {
        broker
            .generate_join_token(
                &JoinTokenRequest {
                    ttl_secs: 600,
                    node_id: Some(node_id.to_string()),
                },
                at,
            )
            .unwrap()
    };
    let attest_with = |t: &baton_core::api::JoinTokenResponse, at: SystemTime| {
        let key = WorkloadKey::generate().unwrap();
        attest(
            broker,
            w.d.revoker(),
            &AttestRequest {
                join_token: t.token.clone(),
                csr_der: key.csr_der(&t.node_id).unwrap(),
            },
            at,
        )
    };
    let at = secs(w.t0, 1);
    let leaked = token(at);
    let e = attest_with(&leaked, at).unwrap_err();
    assert_eq!(e.code(), "node_attested", "{e}");
    // The running daemon's SVID is untouched.
    super::node(
        broker,
        w.d.revoker(),
        Some(&node_id),
        w.node_svid.cert_chain_der.first().map(Vec::as_slice),
        at,
    )
    .unwrap();

    let nodes = broker.nodes();
    nodes
        .remove(
            w.d.revoker(),
            w.d.task_store(),
            node_id.as_str(),
            crate::nodes::Removal::Evict,
            "test",
            unix(at),
        )
        .await
        .unwrap();
    let e = attest_with(&leaked, secs(w.t0, 2)).unwrap_err();
    assert_eq!(e.code(), "unauthenticated", "{e}");
    // Control: a token generated after the eviction attests.
    attest_with(&token(secs(w.t0, 2)), secs(w.t0, 2)).unwrap();

    // Ban, then lift it: a token from before the ban stays dead.
    let before_ban = token(secs(w.t0, 3));
    nodes
        .remove(
            w.d.revoker(),
            w.d.task_store(),
            node_id.as_str(),
            crate::nodes::Removal::Ban,
            "test",
            unix(secs(w.t0, 3)),
        )
        .await
        .unwrap();
    nodes.unban_node(node_id.as_str()).unwrap();
    let e = attest_with(&before_ban, secs(w.t0, 4)).unwrap_err();
    assert_eq!(e.code(), "unauthenticated", "{e}");
    attest_with(&token(secs(w.t0, 4)), secs(w.t0, 4)).unwrap();

    // An agent's ID (or the node prefix alone) is no node: banning or
    // evicting it is refused, naming the field, and stores no node row
    // (the agent would be reported cut off while it goes on working).
    for not_a_node in [
        "spiffe://example.org/agents/planner",
        "spiffe://example.org/baton/node/",
    ] {
        for how in [crate::nodes::Removal::Ban, crate::nodes::Removal::Evict] {
            let e = nodes
                .remove(
                    w.d.revoker(),
                    w.d.task_store(),
                    not_a_node,
                    how,
                    "test",
                    unix(secs(w.t0, 5)),
                )
                .await
                .unwrap_err();
            assert_eq!(e.code(), "invalid_argument", "{not_a_node}: {e}");
            assert!(e.to_string().contains("node_id"), "{e}");
        }
    }
    assert!(
        broker.store().list_nodes().unwrap().iter().all(|n| n
            .spiffe_id
            .as_str()
            .starts_with("spiffe://example.org/baton/node/")
            && n.spiffe_id.as_str().len() > "spiffe://example.org/baton/node/".len()),
        "no node row for an id that names no node"
    );
}

/// A world on a [`FlakyLedger`], and the switches that make it fail.
fn flaky_world(tune: impl FnOnce(&mut DelegationSettings)) -> (World, Faults) {
    let faults = Faults::default();
    let shared = faults.clone();
    let w = World::with_ledger(tune, move |store| {
        Arc::new(FlakyLedger {
            inner: store,
            faults: shared,
        })
    });
    (w, faults)
}

/// Which of a [`FlakyLedger`]'s writes fail (a database that went away
/// mid-request).
#[derive(Debug, Clone, Default)]
struct Faults(
    Arc<std::sync::atomic::AtomicU8>,
    /// A credential an operator revokes just before the next registration
    /// (a revocation landing in the middle of a request).
    Arc<std::sync::Mutex<Option<String>>>,
);

impl Faults {
    const REVOCATIONS: u8 = 1;
    const REGISTRATIONS: u8 = 2;

    fn revocations_fail(&self) {
        self.0
            .store(Self::REVOCATIONS, std::sync::atomic::Ordering::SeqCst);
    }
    fn registrations_fail(&self) {
        self.0
            .store(Self::REGISTRATIONS, std::sync::atomic::Ordering::SeqCst);
    }
    fn revoke_before_next_registration(&self, id: &str) {
        *self.1.lock().unwrap() = Some(id.to_owned());
    }
    fn heal(&self) {
        self.0.store(0, std::sync::atomic::Ordering::SeqCst);
    }
    fn check(&self, what: u8) -> Result<(), crate::store::StoreError> {
        if self.0.load(std::sync::atomic::Ordering::SeqCst) == what {
            return Err(crate::store::StoreError::Postgres("connection lost".into()));
        }
        Ok(())
    }
}

/// A ledger whose revocations or registrations fail as its [`Faults`]
/// say; everything else is the datastore's.
#[derive(Debug)]
struct FlakyLedger {
    inner: Arc<SqliteStore>,
    faults: Faults,
}

impl FlakyLedger {
    fn check(&self) -> Result<(), crate::store::StoreError> {
        self.faults.check(Faults::REVOCATIONS)
    }
}

impl crate::ledger::Ledger for FlakyLedger {
    fn identity(&self) -> usize {
        self.inner.identity()
    }
    fn ping(&self) -> Result<(), crate::store::StoreError> {
        self.inner.ping()
    }
    fn epoch(&self) -> Result<String, crate::store::StoreError> {
        self.inner.epoch()
    }
    fn restart_log(&self, from: &str, to: &str) -> Result<String, crate::store::StoreError> {
        self.inner.restart_log(from, to)
    }
    fn last_seq(&self) -> Result<u64, crate::store::StoreError> {
        self.inner.last_seq()
    }
    fn log_after(
        &self,
        after: u64,
        live_at: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<crate::ledger::LogRow>, u64), crate::store::StoreError> {
        self.inner.log_after(after, live_at, limit)
    }
    fn register(
        &self,
        records: &[baton_revocation::CredentialRecord],
        now: u64,
    ) -> Result<Result<(), String>, crate::store::StoreError> {
        self.faults.check(Faults::REGISTRATIONS)?;
        if let Some(id) = self.faults.1.lock().unwrap().take() {
            self.inner.revoke(
                &baton_revocation::Target::Credential(id),
                &[],
                "operator",
                now,
            )?;
        }
        self.inner.register(records, now)
    }
    fn revoke(
        &self,
        target: &baton_revocation::Target,
        known: &[baton_revocation::Revoked],
        reason: &str,
        now: u64,
    ) -> Result<Vec<baton_revocation::Revoked>, crate::store::StoreError> {
        self.check()?;
        self.inner.revoke(target, known, reason, now)
    }
    fn live_task_credentials(
        &self,
        task: &baton_core::TaskId,
        now: u64,
    ) -> Result<Vec<baton_revocation::Revoked>, crate::store::StoreError> {
        self.inner.live_task_credentials(task, now)
    }
    fn certificate_leases(
        &self,
        serial: &str,
        now: u64,
    ) -> Result<Option<(String, Vec<baton_revocation::Revoked>)>, crate::store::StoreError> {
        self.inner.certificate_leases(serial, now)
    }
    fn revoke_tokens(
        &self,
        tokens: &[crate::records::TokenRecord],
        reason: &str,
        now: u64,
    ) -> Result<Vec<baton_revocation::Revoked>, crate::store::StoreError> {
        self.check()?;
        self.inner.revoke_tokens(tokens, reason, now)
    }
    fn mark(
        &self,
        revoked: &[baton_revocation::Revoked],
        reason: &str,
        now: u64,
    ) -> Result<usize, crate::store::StoreError> {
        self.check()?;
        self.inner.mark(revoked, reason, now)
    }
    fn prune(&self, cutoff: u64) -> Result<(), crate::store::StoreError> {
        self.inner.prune(cutoff)
    }
    fn durably_revoked(&self, id: &str, now: u64) -> Result<bool, crate::store::StoreError> {
        self.inner.durably_revoked(id, now)
    }
    fn task_credentials(
        &self,
        task: &baton_core::TaskId,
    ) -> Result<Vec<crate::revocation::TaskCredential>, crate::store::StoreError> {
        self.inner.task_credentials(task)
    }
    fn live_revocations(
        &self,
        now: u64,
    ) -> Result<Vec<baton_revocation::Revoked>, crate::store::StoreError> {
        self.inner.live_revocations(now)
    }
}

/// A task is never shown ended, nor its purpose changed, while its
/// credentials still work: when the revocation fails (the broker's
/// database went away, or the broker died, between the two steps), the
/// operator's command fails and the task stays as it was, its credentials
/// refused nowhere yet; the same command run again does both. The
/// control is each command with a working ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_is_not_shown_ended_or_repurposed_before_its_credentials_are_revoked() {
    let (w, failing) = flaky_world(|s| {
        s.purposes.insert("support.case-update".parse().unwrap());
    });
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let task = started.task_id.as_str();
    let update: Purpose = "support.case-update".parse().unwrap();

    failing.revocations_fail();
    assert!(
        change_purpose(&w.d, task, &update, secs(w.t0, 1))
            .await
            .is_err()
    );
    let shown = w.d.get_task(task).unwrap();
    assert_eq!(
        shown.purpose.as_str(),
        PURPOSE,
        "repurposed before revoking"
    );
    assert!(end_task(&w.d, task, secs(w.t0, 1)).await.is_err());
    let shown = w.d.get_task(task).unwrap();
    assert!(shown.ended_at.is_none(), "shown ended before revoking");
    // Nothing was revoked, and nothing claims it was: the planner still
    // hops (the task is plainly alive).
    w.hop(&planner, &["crm"], &["tool:crm.search:read"], secs(w.t0, 2))
        .unwrap();
    let token_dead = |w: &World| {
        w.d.task_credentials(task)
            .unwrap()
            .iter()
            .filter(|c| c.kind == "token")
            .all(|c| c.revoked)
    };
    assert!(!token_dead(&w));

    // Run again with the ledger back: done, and the credentials die.
    failing.heal();
    let changed = change_purpose(&w.d, task, &update, secs(w.t0, 3))
        .await
        .unwrap();
    assert_eq!(changed.task.purpose, update);
    assert!(changed.revoked >= 2, "{changed:?}");
    assert!(token_dead(&w));
    assert!(
        w.hop(&planner, &["crm"], &["tool:crm.search:read"], secs(w.t0, 4))
            .is_err()
    );
    let ended = end_task(&w.d, task, secs(w.t0, 5)).await.unwrap();
    assert!(
        ended.task.ended_at.is_some() && !ended.already_ended,
        "{ended:?}"
    );
}

/// A renewal whose new certificate is not handed out (here the old
/// certificate's revocation fails) leaves the token on the certificate its
/// holder still has: the same renewal retried succeeds, not refused as
/// raced. The control is the retry itself, with the ledger back.
#[test]
fn a_renewal_that_was_not_handed_out_can_be_retried() {
    let (w, failing) = flaky_world(|_| {});
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let old_key = WorkloadKey::generate().unwrap();
    let planner = w
        .redeem_with(&started.grant, PLANNER, &old_key, w.t0)
        .unwrap();
    let at = secs(w.t0, 10);
    let renewal = |new_key: &WorkloadKey| renewal_of(&planner, &old_key, new_key, at);
    failing.revocations_fail();
    let e = renew(
        &w.d,
        &w.node,
        &renewal(&WorkloadKey::generate().unwrap()),
        at,
    )
    .unwrap_err();
    assert_ne!(e.code(), "renewal_raced", "{e}");
    failing.heal();
    let renewed = renew(
        &w.d,
        &w.node,
        &renewal(&WorkloadKey::generate().unwrap()),
        at,
    )
    .unwrap();
    assert_eq!(jti_of(&renewed.token), jti_of(&planner.token));
    w.hop(
        &renewed,
        &["crm"],
        &["tool:crm.search:read"],
        secs(w.t0, 11),
    )
    .unwrap();
}

/// A renewal under a newer JWT key that is not handed out leaves its
/// holder with the copy of the token the older key signed: the key usage
/// ledger counts it against the older key again, so `ca revoke` of that
/// key without `--force` is refused rather than ending a token in use.
/// Before, the ledger moved the token to the new key at signing and
/// never back. The control: once a renewal is handed out, the old key
/// counts nothing.
#[test]
fn a_renewal_not_handed_out_keeps_its_token_counted_against_the_old_key() {
    let (w, failing) = flaky_world(|_| {});
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let old_key = WorkloadKey::generate().unwrap();
    let planner = w
        .redeem_with(&started.grant, PLANNER, &old_key, w.t0)
        .unwrap();
    let ca = w.d.broker().ca();
    let old_kid = ca
        .authorities()
        .into_iter()
        .find(|a| {
            a.kind == baton_ca::AuthorityKind::Jwt && a.state == baton_ca::AuthorityState::Active
        })
        .unwrap()
        .id;
    ca.prepare(&[baton_ca::AuthorityKind::Jwt], secs(w.t0, 1))
        .unwrap();
    ca.activate(None, secs(w.t0, 2)).unwrap();
    let tokens_of = |kid: &str| ca.jwt_key_usage(kid, secs(w.t0, 12)).delegation_tokens;
    assert_eq!(tokens_of(&old_kid), 1, "control: the redeemed token");

    let at = secs(w.t0, 10);
    let renewal = |new_key: &WorkloadKey| renewal_of(&planner, &old_key, new_key, at);
    failing.revocations_fail();
    renew(
        &w.d,
        &w.node,
        &renewal(&WorkloadKey::generate().unwrap()),
        at,
    )
    .unwrap_err();
    assert_eq!(tokens_of(&old_kid), 1, "the copy the holder keeps");
    failing.heal();
    renew(
        &w.d,
        &w.node,
        &renewal(&WorkloadKey::generate().unwrap()),
        at,
    )
    .unwrap();
    assert_eq!(tokens_of(&old_kid), 0, "control: renewed and handed out");
}

/// A renewal whose new certificate cannot be registered (or whose node
/// fails its re-check) never revoked the old one: the old certificate is
/// revoked last, just before the new one leaves. So the holder keeps
/// working with what it has, and its retry succeeds. The control is the
/// retry, after which the old certificate is dead.
#[test]
fn a_renewal_that_cannot_register_its_certificate_leaves_the_old_one_working() {
    let (w, faults) = flaky_world(|_| {});
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let old_key = WorkloadKey::generate().unwrap();
    let planner = w
        .redeem_with(&started.grant, PLANNER, &old_key, w.t0)
        .unwrap();
    let old_serial = PeerCert::from_verified_leaf(planner.cert_chain_der[0].clone())
        .unwrap()
        .serial_hex()
        .to_owned();
    let at = secs(w.t0, 10);
    let renewal = |new_key: &WorkloadKey| renewal_of(&planner, &old_key, new_key, at);
    let revoked = |w: &World| {
        w.d.revoker()
            .durably_revoked(&old_serial, unix(secs(w.t0, 11)))
            .unwrap()
    };

    faults.registrations_fail();
    let e = renew(
        &w.d,
        &w.node,
        &renewal(&WorkloadKey::generate().unwrap()),
        at,
    )
    .unwrap_err();
    assert_ne!(e.code(), "renewal_raced", "{e}");
    faults.heal();
    assert!(!revoked(&w), "the old certificate was revoked for nothing");
    w.hop(
        &planner,
        &["crm"],
        &["tool:crm.search:read"],
        secs(w.t0, 11),
    )
    .unwrap();

    let renewed = renew(
        &w.d,
        &w.node,
        &renewal(&WorkloadKey::generate().unwrap()),
        at,
    )
    .unwrap();
    assert!(revoked(&w), "renewed without revoking the old certificate");
    assert!(
        w.hop(
            &planner,
            &["crm"],
            &["tool:crm.search:read"],
            secs(w.t0, 12)
        )
        .is_err()
    );
    w.hop(
        &renewed,
        &["crm"],
        &["tool:crm.search:read"],
        secs(w.t0, 12),
    )
    .unwrap();
}

/// A join-token row no broker wrote (a database writer's) naming the
/// broker's own identity, a workload's or another trust domain's: attest
/// refuses it and signs nothing; a node id attests (the control).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_join_token_row_naming_no_node_makes_no_certificate() {
    let w = World::new();
    let broker = w.d.broker();
    let at = secs(w.t0, 1);
    let attest_as = |raw: &str, token: &str| {
        let node_id = SpiffeId::parse(raw).unwrap();
        broker
            .store()
            .insert_join_token(
                &crate::error::token_digest(token),
                &node_id,
                unix_of(at) + 600,
            )
            .unwrap();
        let key = WorkloadKey::generate().unwrap();
        attest(
            broker,
            w.d.revoker(),
            &AttestRequest {
                join_token: Secret::new(token.to_owned()),
                csr_der: key.csr_der(&node_id).unwrap(),
            },
            at,
        )
    };
    for (raw, token) in [
        ("spiffe://example.org/baton/broker", "jt-broker"),
        ("spiffe://example.org/agents/planner", "jt-agent"),
        ("spiffe://other.org/baton/node/n9", "jt-foreign"),
    ] {
        let e = attest_as(raw, token).unwrap_err();
        assert_eq!(e.code(), "unauthenticated", "{raw}: {e}");
        assert!(e.to_string().contains("not a node's"), "{raw}: {e}");
    }
    // Control: the same kind of row for a node id attests.
    let svid = attest_as("spiffe://example.org/baton/node/n9", "jt-node").unwrap();
    assert_eq!(
        svid.spiffe_id.as_str(),
        "spiffe://example.org/baton/node/n9"
    );
}

/// A server that does not serve a token's audience learns nothing of the
/// task it names from an approval request or a report: not whether the
/// task exists, nor whether it ended (before, the task was looked up
/// first: 404 for a task nobody started, `task_ended` for an ended one,
/// `not_entitled` for a live one). The control: the entitled server is
/// told the task ended.
#[tokio::test]
async fn a_server_not_entitled_to_a_token_learns_nothing_of_its_task() {
    let w = World::new();
    let live = w.start(&["crm"], &["tool:crm.search:read"]);
    let live_root = w.redeem_as(&live.grant, PLANNER, w.t0).unwrap();
    let ended = w.start(&["crm"], &["tool:crm.search:read"]);
    let ended_root = w.redeem_as(&ended.grant, PLANNER, w.t0).unwrap();
    end_task(&w.d, ended.task_id.as_str(), secs(w.t0, 1))
        .await
        .unwrap();
    let t = unix_of(w.t0) + 2;
    let clock = || secs(w.t0, 2);
    let outsider = id("spiffe://example.org/tools/elsewhere");
    let nobody = baton_core::TaskId::from_random([9; 16]);
    for (task, token) in [
        (&live.task_id, &live_root),
        (&ended.task_id, &ended_root),
        (&nobody, &live_root),
    ] {
        let ask = approval_ask(task, token, PLANNER, "ab", 600);
        let e = w.d.request_approval(&outsider, &ask, t).unwrap_err();
        assert_eq!(e.code(), "not_entitled", "{task}: {e}");
        let r = report(task, &jti_of(&token.token), PLANNER, "probe");
        let e = record_reports(&w.d, &outsider, &[r], true, None, &clock).unwrap_err();
        assert_eq!(e.code(), "not_entitled", "{task}: {e}");
    }
    let ask = approval_ask(&ended.task_id, &ended_root, PLANNER, "ab", 600);
    let e = w.d.request_approval(&id(CRM), &ask, t).unwrap_err();
    assert_eq!(e.code(), "task_ended", "control: {e}");
}

/// A lease issued while its holder's certificate is revoked by serial (the
/// revocation reads the certificate's leases once, before the engine's
/// lease is registered) is caught once it is registered: revoked too, and
/// refused `certificate_revoked`, never handed out. Before, it stayed live
/// until its token expired. The control: a certificate nobody revoked.
#[tokio::test]
async fn a_lease_registered_after_its_certificate_was_revoked_is_revoked_and_never_leaves() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let peer = PeerCert::from_verified_leaf(planner.cert_chain_der[0].clone()).unwrap();
    let now = unix_of(w.t0) + 1;
    let lease = |n: u8| baton_secrets::Lease {
        id: format!("lease-{}", hex::encode([n; 16])),
        engine: "apikey".into(),
        task: started.task_id.clone(),
        agent: id(PLANNER),
        expires_at: now + 60,
        secret: baton_secrets::SecretMaterial::ApiKey {
            key: baton_core::Secret::new("k"),
        },
    };
    let record = |l: &baton_secrets::Lease| baton_revocation::CredentialRecord {
        id: l.id.clone(),
        kind: baton_revocation::CredKind::SecretLease,
        task: Some(started.task_id.clone()),
        agent: Some(id(PLANNER)),
        node: None,
        parent: Some(jti_of(&planner.token)),
        expires_at: l.expires_at,
    };
    let kept = lease(1);
    w.d.revoker().register(&[record(&kept)], now).await.unwrap();
    crate::secrets::certificate_revoked_since(&w.d, &peer, &kept, now)
        .await
        .unwrap();
    assert!(
        !w.d.revoker().durably_revoked(&kept.id, now).unwrap(),
        "control"
    );

    let serial: RevokeTarget =
        serde_json::from_value(json!({ "credential": peer.serial_hex() })).unwrap();
    revoke(&w.d, &serial, "stolen", None, secs(w.t0, 1))
        .await
        .unwrap();
    let late = lease(2);
    // Registered after the revocation: the certificate's revocation took
    // its token (and all it handed on) with it, so the registry refuses a
    // lease minted from that token; the check after registration is the
    // second net, and refuses too.
    let e =
        w.d.revoker()
            .register(&[record(&late)], now)
            .await
            .unwrap_err();
    assert_eq!(e.code(), "revoked", "{e}");
    let e = crate::secrets::certificate_revoked_since(&w.d, &peer, &late, now)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "certificate_revoked", "{e}");
}

/// Two identical held calls asked at the same moment get one approval,
/// never two that two approvers could decide apart (one denied, the other
/// approved, and the call let through past a live denial). The control:
/// asked one after the other, the same approval too; and a denial holds
/// for the call asked again.
#[test]
fn one_call_asked_twice_at_once_gets_one_approval() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let t = unix_of(w.t0);
    for round in 0..20u8 {
        let digest = format!("{round:02x}");
        let ask = approval_ask(&started.task_id, &planner, PLANNER, &digest, 600);
        let barrier = std::sync::Barrier::new(2);
        let ids: Vec<String> = std::thread::scope(|sc| {
            let hs: Vec<_> = (0..2)
                .map(|_| {
                    sc.spawn(|| {
                        barrier.wait();
                        w.d.request_approval(&id(CRM), &ask, t).unwrap().id
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(ids[0], ids[1], "round {round}: two approvals for one call");
        let again = w.d.request_approval(&id(CRM), &ask, t + 1).unwrap();
        assert_eq!(again.id, ids[0], "control, round {round}");
    }
    // Denied: the same call asked again is still denied.
    let ask = approval_ask(&started.task_id, &planner, PLANNER, "ee", 600);
    let held = w.d.request_approval(&id(CRM), &ask, t).unwrap();
    let decision: baton_core::api::ApprovalDecision = serde_json::from_value(json!({
        "id_token": w.dev.mint_with_groups("alice@example.com", &[], 600, t).unwrap(),
        "approve": false,
    }))
    .unwrap();
    w.d.decide_approval(&held.id, &decision, t + 1).unwrap();
    let after = w.d.request_approval(&id(CRM), &ask, t + 2).unwrap();
    assert_eq!(
        (after.id.as_str(), after.status.as_str()),
        (held.id.as_str(), "denied")
    );
}

/// An operator's revocation of a task certificate by serial that lands
/// while its holder's renewal runs (after the renewal checked the old
/// certificate, before it revoked it as renewed) is not lost: the renewal
/// finds the old certificate revoked by someone else, revokes the new one
/// and is refused `certificate_revoked`, so the token is left bound to a
/// revoked certificate. Before, the renewal's own revocation of the old
/// serial found it already revoked, and the new certificate left with the
/// token alive. The control: another holder's renewal goes through.
#[test]
fn a_certificate_revoked_while_it_is_renewed_does_not_live_on_in_its_successor() {
    let (w, faults) = flaky_world(|_| {});
    let at = secs(w.t0, 10);
    let holder = |w: &World| {
        let started = w.start(&["crm"], &["tool:crm.search:read"]);
        let key = WorkloadKey::generate().unwrap();
        let cred = w.redeem_with(&started.grant, PLANNER, &key, w.t0).unwrap();
        (started, key, cred)
    };
    let (started, key, planner) = holder(&w);
    let serial = PeerCert::from_verified_leaf(planner.cert_chain_der[0].clone())
        .unwrap()
        .serial_hex()
        .to_owned();
    faults.revoke_before_next_registration(&serial);
    let e = renew(
        &w.d,
        &w.node,
        &renewal_of(&planner, &key, &WorkloadKey::generate().unwrap(), at),
        at,
    )
    .unwrap_err();
    assert_eq!(e.code(), "certificate_revoked", "{e}");
    let creds = w.d.task_credentials(started.task_id.as_str()).unwrap();
    let live: Vec<_> = creds
        .iter()
        .filter(|c| !matches!(c.kind.as_str(), "token" | "grant") && !c.revoked)
        .collect();
    assert!(
        live.is_empty(),
        "a certificate of the task lives on: {live:?}"
    );
    assert!(
        w.hop(
            &planner,
            &["crm"],
            &["tool:crm.search:read"],
            secs(w.t0, 11)
        )
        .is_err()
    );

    let (_other, key, planner) = holder(&w);
    let renewed = renew(
        &w.d,
        &w.node,
        &renewal_of(&planner, &key, &WorkloadKey::generate().unwrap(), at),
        at,
    )
    .unwrap();
    w.hop(
        &renewed,
        &["crm"],
        &["tool:crm.search:read"],
        secs(w.t0, 11),
    )
    .unwrap();
}

/// The API-key engine alone, leasing to holders of `tool:crm.search:read`.
async fn apikey_secrets() -> crate::secrets::Secrets {
    crate::secrets::Secrets::build(
        &crate::secrets::SecretEngineSettings {
            apikey_permission: "tool:crm.search:read".into(),
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap()
}

/// A verified holder refused a secret because its task ended (the task's
/// end recorded, its revocation not yet seen: a broker that died between
/// the two, or a feed behind) is in the audit log as a denied lease, with
/// who asked and why: before, only the log file said so. The control: the
/// same holder's lease while the task is live is recorded as allowed.
#[tokio::test]
async fn a_lease_refused_for_an_ended_task_is_audited() {
    let w = World::new();
    let secrets = apikey_secrets().await;
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let peer = PeerCert::from_verified_leaf(planner.cert_chain_der[0].clone()).unwrap();
    let body = crate::secrets::LeaseBody {
        token: planner.token.clone(),
        engine: crate::secrets::APIKEY_ENGINE.into(),
    };
    let leases = |decision: &str| {
        w.d.audit()
            .events_for_task(&started.task_id)
            .unwrap()
            .into_iter()
            .filter(|r| {
                r.event.tool.as_deref() == Some(crate::secrets::LEASE_TOOL)
                    && r.event.decision.as_deref() == Some(decision)
            })
            .map(|r| r.event)
            .collect::<Vec<_>>()
    };
    let now = unix_of(w.t0) + 1;
    secrets.lease(&w.d, &peer, &body, now).await.unwrap();
    assert_eq!(leases("allow").len(), 1, "control");
    assert!(leases("deny").is_empty(), "control");

    // The task's end is recorded; its credentials are not revoked yet.
    w.d.end_task(started.task_id.as_str(), secs(w.t0, 2))
        .unwrap();
    let e = secrets
        .lease(&w.d, &peer, &body, now + 2)
        .await
        .unwrap_err();
    assert_eq!(e.code(), "task_ended", "{e}");
    let denied = leases("deny");
    assert_eq!(denied.len(), 1, "{denied:?}");
    assert_eq!(denied[0].actor.as_ref(), Some(&id(PLANNER)));
    assert_eq!(
        denied[0].token_jti.as_deref(),
        Some(jti_of(&planner.token).as_str())
    );
    assert!(
        denied[0]
            .reason
            .as_deref()
            .unwrap()
            .starts_with("task_ended"),
        "{denied:?}"
    );
    assert_eq!(leases("allow").len(), 1, "nothing issued");
}

/// A hop that asks for no lifetime gets the broker's hop token lifetime
/// (`--hop-token-ttl`), not its parent's: a sub-agent's credential is
/// short-lived unless its delegator asks for more. Before, the setting
/// was never read, and a hop's token and certificate lived as long as the
/// task. The controls: a hop asking for less gets less, one asking for
/// more than its parent has gets its parent's expiry.
#[test]
fn a_hop_that_asks_for_no_lifetime_gets_the_short_default() {
    let w = World::with_settings(|s| s.token_ttl = Duration::from_secs(60));
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let t = unix_of(w.t0);
    assert_eq!(
        planner.expires_at,
        t + 600,
        "control: the root lives as the task"
    );
    let hop_with = |ttl: Option<u64>| {
        let peer = PeerCert::from_verified_leaf(planner.cert_chain_der[0].clone()).unwrap();
        let mut req = json!({
            "token": planner.token.expose(),
            "target": SEARCHER,
            "scope": ["tool:crm.search:read"],
            "purpose": PURPOSE,
            "audience": ["crm"],
            "justification": "look the case up",
        });
        if let Some(ttl) = ttl {
            req["ttl_secs"] = json!(ttl);
        }
        let req: DelegateRequest = serde_json::from_value(req).unwrap();
        let grant = delegate(&w.d, &peer, &req, secs(w.t0, 1))?;
        w.redeem_as(&grant, SEARCHER, secs(w.t0, 2))
    };
    let searcher = hop_with(None).unwrap();
    assert_eq!(searcher.expires_at, t + 1 + 60);
    assert_eq!(claims_of(&searcher.token)["exp"], json!(t + 1 + 60));
    assert_eq!(hop_with(Some(30)).unwrap().expires_at, t + 1 + 30);
    // Longer than the default, up to the parent's end: asked, given.
    assert_eq!(hop_with(Some(599)).unwrap().expires_at, t + 600);
    let e = hop_with(Some(600)).unwrap_err();
    assert_eq!(e.code(), "outlives_parent", "{e}");
}

/// Revoking a task certificate by serial ends what its token handed on:
/// a grant not yet redeemed is refused, and a sub-agent that redeemed
/// one can hop no further. Before, only the token's secret leases went
/// with the certificate, and the delegator's line of delegation lived on
/// until the task ended. The control: the same grants without the
/// revocation are redeemed and used.
#[tokio::test]
async fn revoking_a_holders_certificate_ends_what_its_token_handed_on() {
    let w = World::new();
    let run = |revoked: bool| {
        let w = &w;
        async move {
            let started = w.start(&["crm"], &["tool:crm.search:read"]);
            let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
            let redeemed = w
                .hop(&planner, &["crm"], &["tool:crm.search:read"], secs(w.t0, 1))
                .unwrap();
            let searcher = w.redeem_as(&redeemed, SEARCHER, secs(w.t0, 1)).unwrap();
            let pending = w
                .hop(&planner, &["crm"], &["tool:crm.search:read"], secs(w.t0, 1))
                .unwrap();
            if revoked {
                let peer = PeerCert::from_verified_leaf(planner.cert_chain_der[0].clone()).unwrap();
                let serial: RevokeTarget =
                    serde_json::from_value(json!({ "credential": peer.serial_hex() })).unwrap();
                revoke(&w.d, &serial, "stolen", None, secs(w.t0, 2))
                    .await
                    .unwrap();
            }
            let redeem = w.redeem_as(&pending, SEARCHER, secs(w.t0, 3));
            // The sub-agent's token, minted from the revoked one's grant.
            let dead =
                w.d.revoker()
                    .durably_revoked(&jti_of(&searcher.token), unix_of(w.t0) + 3)
                    .unwrap();
            (redeem.map(|_| ()), dead)
        }
    };
    let (redeem, dead) = run(false).await;
    assert!(redeem.is_ok() && !dead, "control: {redeem:?} {dead}");
    let (redeem, dead) = run(true).await;
    let e = redeem.unwrap_err();
    assert!(e.code().contains("revoked"), "{e}");
    assert!(dead, "the sub-agent's token lives on");
}

/// An operator's revocation of a task's credentials is in the task's audit
/// trace, recorded before it takes effect, whether it names a certificate
/// by serial or the whole task; a reason that would draw on an auditor's
/// terminal is refused with nothing revoked or recorded. The hops recorded
/// before, and the task's trace without any revocation, are the controls.
#[tokio::test]
async fn an_operators_revocation_is_in_the_tasks_audit_trace() {
    let w = World::new();
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let records = || w.d.audit().events_for_task(&started.task_id).unwrap();
    let revocations = || {
        records()
            .into_iter()
            .filter(|r| r.event.kind == baton_audit::EventKind::Revoked)
            .map(|r| r.event.reason.unwrap_or_default())
            .collect::<Vec<_>>()
    };
    assert!(revocations().is_empty(), "control: nothing revoked yet");
    let recorded_before = records().len();
    assert!(recorded_before >= 2, "control: the start and the redeem");

    let peer = PeerCert::from_verified_leaf(planner.cert_chain_der[0].clone()).unwrap();
    let serial: RevokeTarget =
        serde_json::from_value(json!({ "credential": peer.serial_hex() })).unwrap();
    let task: RevokeTarget =
        serde_json::from_value(json!({ "task": started.task_id.as_str() })).unwrap();

    let e = revoke(&w.d, &serial, "stolen\u{1b}[2J", None, secs(w.t0, 1))
        .await
        .unwrap_err();
    assert_eq!(e.code(), "invalid_argument", "{e}");
    assert!(e.to_string().contains("reason"), "{e}");
    assert_eq!(
        records().len(),
        recorded_before,
        "a refused revocation was recorded"
    );
    assert!(
        !w.d.revoker()
            .durably_revoked(&jti_of(&planner.token), unix_of(w.t0) + 1)
            .unwrap(),
        "a refused revocation revoked"
    );

    revoke(&w.d, &serial, "stolen laptop", None, secs(w.t0, 2))
        .await
        .unwrap();
    revoke(&w.d, &task, "incident 42", None, secs(w.t0, 3))
        .await
        .unwrap();
    let got = revocations();
    assert_eq!(got.len(), 2, "{got:?}");
    assert!(
        got[0].contains(peer.serial_hex()) && got[0].contains("stolen laptop"),
        "{got:?}"
    );
    assert!(
        got[1].contains(started.task_id.as_str()) && got[1].contains("incident 42"),
        "{got:?}"
    );
    let text = baton_audit::trace::trace(&records()).render_text();
    assert!(
        text.contains("revoked by an operator: credential"),
        "{text}"
    );
}

/// One token holds at most `MAX_LEASES_PER_TOKEN` unexpired secret leases:
/// a holder looping on `lease` (within its rate limit) no longer fills an
/// engine with live logins until its token expires. The refusal is
/// audited. The control: another token of the same task still leases.
#[tokio::test]
async fn a_token_holds_a_bounded_number_of_secret_leases() {
    use crate::secrets::{APIKEY_ENGINE, LeaseBody, MAX_LEASES_PER_TOKEN};
    let w = World::new();
    let secrets = apikey_secrets().await;
    let started = w.start(&["crm"], &["tool:crm.search:read"]);
    let planner = w.redeem_as(&started.grant, PLANNER, w.t0).unwrap();
    let lease_as = |holder: &TaskCredential| {
        let peer = PeerCert::from_verified_leaf(holder.cert_chain_der[0].clone()).unwrap();
        let body = LeaseBody {
            token: holder.token.clone(),
            engine: APIKEY_ENGINE.into(),
        };
        (peer, body)
    };
    let now = unix_of(w.t0) + 1;
    let (peer, body) = lease_as(&planner);
    for n in 0..MAX_LEASES_PER_TOKEN {
        secrets
            .lease(&w.d, &peer, &body, now)
            .await
            .unwrap_or_else(|e| panic!("lease {n}: {e}"));
    }
    let e = secrets.lease(&w.d, &peer, &body, now).await.unwrap_err();
    assert_eq!(e.code(), "lease_limit", "{e}");
    let refused =
        w.d.audit()
            .events_for_task(&started.task_id)
            .unwrap()
            .into_iter()
            .filter(|r| {
                r.event
                    .reason
                    .as_deref()
                    .is_some_and(|m| m.starts_with("lease_limit"))
            })
            .count();
    assert_eq!(refused, 1);

    let grant = w
        .hop(&planner, &["crm"], &["tool:crm.search:read"], secs(w.t0, 1))
        .unwrap();
    let searcher = w.redeem_as(&grant, SEARCHER, secs(w.t0, 1)).unwrap();
    let (peer, body) = lease_as(&searcher);
    secrets.lease(&w.d, &peer, &body, now).await.unwrap();
}
