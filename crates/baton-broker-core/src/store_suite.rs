//! One test suite for every datastore: the same behaviour is asserted of
//! SQLite (in memory and in a file) and of PostgreSQL (a private cluster
//! the test starts), including the atomic steps several brokers race on.

use std::sync::Arc;

use baton_core::api::ApprovalState;
use baton_core::{NewEntry, RiskTier, Scope, SpiffeId, TaskId};
use baton_revocation::{CredKind, CredentialRecord, Revoked, Target};

use crate::ledger::Ledger;
use crate::pg::{PgSettings, PgStore};
use crate::store::{AgentBlock, Datastore, JoinTokenRefusal, NodeRecord, SqliteStore, StoreError};
use crate::tasks::{
    GrantDelivery, GrantRecord, GrantRefusal, RedeemRefusal, TaskRecord, TaskStore, TokenRecord,
};

/// Everything a broker keeps, behind its three traits.
trait Store: Datastore + TaskStore + Ledger {}
impl<T: Datastore + TaskStore + Ledger> Store for T {}

fn sid(s: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://example.org/{s}")).unwrap()
}

fn task_id(n: u8) -> TaskId {
    TaskId::from_random([n; 16])
}

fn task(n: u8) -> TaskRecord {
    TaskRecord {
        id: task_id(n),
        initiator: "alice".into(),
        initiator_iss: "https://idp.example".into(),
        root_agent: sid("planner"),
        purpose: "support.case-research".parse().unwrap(),
        scope: Scope::parse(&["tool:crm.search:read"]).unwrap(),
        risk_ceiling: RiskTier::Write,
        max_depth: 3,
        created_at: 10,
        expires_at: 10_000,
        ended_at: None,
        purpose_epoch: 0,
        audiences: Some(vec!["crm".into()]),
    }
}

fn grant(t: &TaskRecord) -> GrantRecord {
    GrantRecord {
        task_id: t.id.clone(),
        target: sid("researcher"),
        scope: t.scope.clone(),
        purpose: t.purpose.clone(),
        purpose_epoch: t.purpose_epoch,
        audience: vec!["crm".into()],
        depth: 1,
        parent: None,
        parent_act: None,
        justification: Some("look up the account".into()),
        exp_cap: 9_000,
        expires_at: 500,
        created_by: None,
    }
}

/// A grant's own registry record (as the broker makes it when it stores one).
fn grant_cred(digest: &str, g: &GrantRecord) -> CredentialRecord {
    CredentialRecord {
        id: digest.into(),
        kind: CredKind::Grant,
        task: Some(g.task_id.clone()),
        agent: Some(g.target.clone()),
        node: None,
        parent: g.parent.as_ref().map(|p| p.jti.clone()),
        expires_at: g.expires_at,
    }
}

/// Stores `g` under `digest`, registered in the same step, at time 10.
fn put_grant(s: &dyn Store, digest: &str, g: &GrantRecord) {
    assert_eq!(
        s.insert_grant(digest, g, &grant_cred(digest, g), 10)
            .unwrap(),
        Ok(())
    );
}

fn token(t: &TaskRecord, jti: &str) -> TokenRecord {
    TokenRecord {
        jti: jti.into(),
        task_id: t.id.clone(),
        spiffe_id: sid("researcher"),
        depth: 1,
        parent_jti: None,
        exp: 9_000,
        cert_thumbprint: "th".into(),
        cert_serial: format!("{jti}-cert"),
        aud: vec!["crm".into()],
        scope: None,
        risk_ceiling: None,
    }
}

fn delivery(t: &TaskRecord, jti: &str) -> GrantDelivery {
    GrantDelivery {
        node: "spiffe://example.org/spire/agent/join_token/n1".into(),
        request: "ab".repeat(32),
        jti: jti.into(),
        cert_serial: format!("{jti}-cert"),
        authority_id: "a1".into(),
        credential: baton_core::api::TaskCredential {
            task_id: t.id.clone(),
            spiffe_id: sid("researcher"),
            cert_chain_der: vec![vec![1, 2, 3]],
            token: baton_core::Secret::new(format!("token-of-{jti}")),
            expires_at: 9_000,
        },
    }
}

fn creds(t: &TaskRecord, jti: &str, parent: Option<&str>) -> Vec<CredentialRecord> {
    vec![
        CredentialRecord {
            id: jti.into(),
            kind: CredKind::Token,
            task: Some(t.id.clone()),
            agent: Some(sid("researcher")),
            node: Some(sid("baton/node/n1")),
            parent: parent.map(str::to_owned),
            expires_at: 9_000,
        },
        CredentialRecord {
            id: format!("{jti}-cert"),
            kind: CredKind::X509Svid,
            task: Some(t.id.clone()),
            agent: Some(sid("researcher")),
            node: Some(sid("baton/node/n1")),
            parent: Some(jti.into()),
            expires_at: 9_000,
        },
    ]
}

fn entries_and_nodes(s: &dyn Store) {
    let e = NewEntry {
        spiffe_id: "spiffe://example.org/web".into(),
        parent_id: "spiffe://example.org/baton/node/n1".into(),
        selectors: vec!["unix:uid:1000".into(), "unix:gid:5".into()],
        x509_ttl_secs: 60,
        jwt_ttl_secs: 30,
        dns_names: vec!["web.local".into()],
    }
    .validate()
    .unwrap();
    s.create_entry(&e).unwrap();
    let mut twin = e.clone();
    twin.id = baton_core::EntryId::parse("0123456789abcdef0123456789abcdef").unwrap_or(twin.id);
    assert!(matches!(s.create_entry(&twin), Err(StoreError::DuplicateEntry(id)) if id == e.id));
    assert_eq!(s.get_entry(&e.id).unwrap(), Some(e.clone()));
    assert_eq!(
        s.list_entries_by_parent(&e.parent_id).unwrap(),
        vec![e.clone()]
    );
    assert!(
        s.list_entries_by_parent(&sid("baton/node/n2"))
            .unwrap()
            .is_empty()
    );
    assert_eq!(s.list_entries().unwrap(), vec![e.clone()]);
    assert!(s.delete_entry(&e.id).unwrap());
    assert!(!s.delete_entry(&e.id).unwrap());

    // Join tokens: single use, expiring.
    let node = sid("baton/node/n1");
    s.insert_join_token("aa", &node, 100).unwrap();
    s.insert_join_token("bb", &node, 100).unwrap();
    assert_eq!(
        s.consume_join_token("zz", 10).unwrap(),
        Err(JoinTokenRefusal::Unknown)
    );
    assert_eq!(
        s.consume_join_token("bb", 100).unwrap(),
        Err(JoinTokenRefusal::Expired)
    );
    assert_eq!(s.check_join_token("aa", 10).unwrap(), Ok(node.clone()));
    assert_eq!(s.consume_join_token("aa", 10).unwrap(), Ok(node.clone()));
    assert_eq!(
        s.consume_join_token("aa", 11).unwrap(),
        Err(JoinTokenRefusal::AlreadyUsed)
    );
    assert_eq!(
        s.check_join_token("aa", 11).unwrap(),
        Err(JoinTokenRefusal::AlreadyUsed)
    );

    // Nodes: a ban survives an upsert; renewal only from the current or
    // the unseen-current's previous SVID.
    let mut n = NodeRecord {
        spiffe_id: node.clone(),
        serial_hex: "01".into(),
        prev_serial_hex: None,
        svid_not_after: 5,
        attested_at: 1,
        banned: false,
    };
    s.upsert_node(&n).unwrap();
    assert!(s.update_node_svid(&node, "01", "02", 9).unwrap());
    let got = s.get_node(&node).unwrap().unwrap();
    assert_eq!(
        (got.serial_hex.as_str(), got.prev_serial_hex.as_deref()),
        ("02", Some("01"))
    );
    // Renewed again from 01 before 02 was ever presented: 02 is dropped,
    // 01 stays the previous one.
    assert!(s.update_node_svid(&node, "01", "03", 9).unwrap());
    let got = s.get_node(&node).unwrap().unwrap();
    assert_eq!(
        (got.serial_hex.as_str(), got.prev_serial_hex.as_deref()),
        ("03", Some("01"))
    );
    assert!(!s.update_node_svid(&node, "02", "04", 9).unwrap());
    // 03 presented: 01 is refused from now on.
    s.settle_node_svid(&node, "03").unwrap();
    assert_eq!(s.get_node(&node).unwrap().unwrap().prev_serial_hex, None);
    assert!(!s.update_node_svid(&node, "01", "05", 9).unwrap());
    assert!(s.set_node_banned(&node, true).unwrap());
    assert!(!s.update_node_svid(&node, "03", "06", 9).unwrap());
    n.serial_hex = "07".into();
    s.upsert_node(&n).unwrap();
    assert!(s.get_node(&node).unwrap().unwrap().banned);
    assert_eq!(s.list_nodes().unwrap().len(), 1);
    assert!(s.delete_node(&node).unwrap());
    assert!(!s.delete_node(&node).unwrap());
    assert_eq!(s.get_node(&node).unwrap(), None);
    assert!(!s.update_node_svid(&node, "03", "08", 9).unwrap());
    assert!(!s.set_node_banned(&node, false).unwrap());

    // Agent blocks lapse.
    let b = AgentBlock {
        spiffe_id: sid("researcher"),
        until: Some(50),
        reason: "incident".into(),
        at: 1,
    };
    s.block_agent(&b).unwrap();
    assert_eq!(s.agent_block(&b.spiffe_id, 10).unwrap(), Some(b.clone()));
    assert_eq!(s.agent_blocks(10).unwrap(), vec![b.clone()]);
    assert_eq!(s.agent_block(&b.spiffe_id, 50).unwrap(), None);
    assert!(s.unblock_agent(&b.spiffe_id).unwrap());
    assert!(!s.unblock_agent(&b.spiffe_id).unwrap());
}

fn tasks_grants_and_tokens(s: &dyn Store) {
    let t = task(1);
    s.insert_task(&t).unwrap();
    assert_eq!(s.get_task(&t.id).unwrap(), Some(t.clone()));
    assert_eq!(s.list_tasks().unwrap(), vec![t.clone()]);

    // A grant is consumed once.
    let g = grant(&t);
    put_grant(s, "g1", &g);
    assert_eq!(s.get_grant("g1").unwrap(), Some((g.clone(), None)));
    assert_eq!(s.consume_grant("g1", 20).unwrap(), Ok(g.clone()));
    assert_eq!(s.consume_grant("g1", 21).unwrap(), Err(GrantRefusal::Used));
    assert_eq!(
        s.consume_grant("nope", 21).unwrap(),
        Err(GrantRefusal::Unknown)
    );
    put_grant(s, "g-old", &g);
    assert_eq!(
        s.consume_grant("g-old", 500).unwrap(),
        Err(GrantRefusal::Expired)
    );
    // A grant minted from a revoked token is refused with nothing stored
    // (not the grant, not its registration).
    s.mark(
        &[Revoked {
            id: "jti-dead".into(),
            kind: CredKind::Token,
            expires_at: 9_000,
        }],
        "operator",
        10,
    )
    .unwrap();
    let mut orphan = grant(&t);
    orphan.parent = Some(baton_core::delegation::ParentRef {
        jti: "jti-dead".into(),
        hash: "h".into(),
    });
    let refused = s
        .insert_grant("g-orphan", &orphan, &grant_cred("g-orphan", &orphan), 10)
        .unwrap();
    assert!(
        matches!(&refused, Err(why) if why.contains("jti-dead")),
        "{refused:?}"
    );
    assert_eq!(s.get_grant("g-orphan").unwrap(), None);

    // A redeem: grant, token and registry in one step, refused whole.
    put_grant(s, "g2", &g);
    let tk = token(&t, "jti-1");
    assert_eq!(
        s.redeem_grant(
            "g2",
            20,
            &tk,
            &creds(&t, "jti-1", None),
            &delivery(&t, "jti-1")
        )
        .unwrap(),
        Ok(())
    );
    assert_eq!(
        s.redeem_grant(
            "g2",
            21,
            &token(&t, "jti-x"),
            &creds(&t, "jti-x", None),
            &delivery(&t, "jti-x")
        )
        .unwrap(),
        Err(RedeemRefusal::Grant(GrantRefusal::Used))
    );
    assert_eq!(s.get_token("jti-x").unwrap(), None);
    // What the redeem delivered is kept with the used grant, not what a
    // refused one would have.
    let kept = s.grant_delivery("g2").unwrap().unwrap();
    assert_eq!(kept.jti, "jti-1");
    assert_eq!(kept.credential.token.expose(), "token-of-jti-1");
    assert!(
        s.grant_delivery("g1").unwrap().is_none(),
        "consumed without one"
    );
    assert!(s.grant_delivery("nope").unwrap().is_none());
    assert_eq!(s.get_token("jti-1").unwrap(), Some(tk.clone()));
    assert_eq!(s.tokens_for_task(&t.id).unwrap(), vec![tk.clone()]);
    let ids: Vec<String> = s
        .task_credentials(&t.id)
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    // The grants were registered in the step that stored them.
    assert_eq!(ids, ["g1", "g-old", "g2", "jti-1", "jti-1-cert"]);

    // A revoked grant, a purpose change and an ended task are refused in
    // the redeem's own transaction.
    put_grant(s, "g3", &g);
    s.mark(
        &[Revoked {
            id: "g3".into(),
            kind: CredKind::Grant,
            expires_at: 500,
        }],
        "operator",
        20,
    )
    .unwrap();
    assert!(matches!(
        s.redeem_grant(
            "g3",
            21,
            &token(&t, "jti-3"),
            &creds(&t, "jti-3", None),
            &delivery(&t, "jti-3")
        )
        .unwrap(),
        Err(RedeemRefusal::Revoked(_))
    ));
    put_grant(s, "g4", &g);
    let mut moved = t.clone();
    moved.purpose_epoch = 1;
    // Compare-and-set: written only over a live record at the epoch read.
    assert!(!s.replace_task(&moved, 7).unwrap());
    assert!(s.replace_task(&moved, 0).unwrap());
    assert!(!s.replace_task(&moved, 0).unwrap(), "the epoch moved on");
    // An ended task is not written over (a purpose change racing its end).
    let other = task(7);
    s.insert_task(&other).unwrap();
    let mut ended = other.clone();
    ended.ended_at = Some(30);
    let mut repurposed = other.clone();
    repurposed.purpose_epoch = 1;
    assert!(s.replace_task(&ended, 0).unwrap());
    assert!(!s.replace_task(&repurposed, 0).unwrap());
    assert_eq!(s.get_task(&other.id).unwrap().unwrap().ended_at, Some(30));
    assert_eq!(
        s.redeem_grant(
            "g4",
            21,
            &token(&t, "jti-4"),
            &creds(&t, "jti-4", None),
            &delivery(&t, "jti-4")
        )
        .unwrap()
        .map_err(|e| matches!(e, RedeemRefusal::Task("purpose_changed", _))),
        Err(true)
    );
    // Released: redeemable again, its credentials dead.
    s.release_grant("g2", &creds(&t, "jti-1", None), 22)
        .unwrap();
    assert_eq!(s.get_grant("g2").unwrap().unwrap().1, None);
    assert!(
        s.grant_delivery("g2").unwrap().is_none(),
        "forgotten on release"
    );
    assert!(
        !s.mark_redelivered("g2", "jti-1", 23).unwrap(),
        "a released delivery is not made again"
    );
    // Delivered again elsewhere: a late release leaves the grant used and
    // its credentials live (that delivery has its audit record).
    let mut g5 = grant(&t);
    g5.purpose_epoch = 1; // the task's purpose moved above
    put_grant(s, "g5", &g5);
    assert_eq!(
        s.redeem_grant(
            "g5",
            20,
            &token(&t, "jti-5"),
            &creds(&t, "jti-5", None),
            &delivery(&t, "jti-5")
        )
        .unwrap(),
        Ok(())
    );
    assert!(!s.mark_redelivered("g5", "jti-other", 21).unwrap());
    assert!(s.mark_redelivered("g5", "jti-5", 21).unwrap());
    s.release_grant("g5", &creds(&t, "jti-5", None), 22)
        .unwrap();
    assert!(
        s.get_grant("g5").unwrap().unwrap().1.is_some(),
        "still used"
    );
    assert_eq!(s.grant_delivery("g5").unwrap().unwrap().jti, "jti-5");
    assert!(!s.durably_revoked("jti-5", 22).unwrap());
    assert!(s.durably_revoked("jti-1", 22).unwrap());

    // ID tokens start one task each; reports are recorded once.
    assert!(s.use_id_token("id1", 100, 10).unwrap());
    assert!(!s.use_id_token("id1", 100, 11).unwrap());
    assert!(
        s.use_id_token("id1", 300, 100).unwrap(),
        "forgotten once expired"
    );
    assert_eq!(s.report_seen("r1").unwrap(), None);
    s.record_report("r1", 7).unwrap();
    s.record_report("r1", 8).unwrap();
    assert_eq!(s.report_seen("r1").unwrap(), Some(7));
    // A batch's reports in one step; one recorded before keeps its index.
    s.record_reports(&[("r2", 9), ("r1", 10), ("r3", 11)])
        .unwrap();
    assert_eq!(s.report_seen("r1").unwrap(), Some(7));
    assert_eq!(s.report_seen("r2").unwrap(), Some(9));
    assert_eq!(s.report_seen("r3").unwrap(), Some(11));
    let seen = s.reports_seen(&["r3", "r9", "r1"]).unwrap();
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [("r1".to_owned(), 7), ("r3".to_owned(), 11)]
    );
    s.record_reports(&[]).unwrap();

    // Approvals move state by compare-and-set.
    let a = ApprovalState {
        id: "ap1".into(),
        task_id: t.id.clone(),
        status: "pending".into(),
        expires_at: 100,
        ..approval_template()
    };
    assert!(s.insert_approval("bind-1", &a, None).unwrap());
    let mut later = a.clone();
    later.id = "ap2".into();
    // Inserted only while the latest is still the one read: a request that
    // read none (or an older one) lost to the one that inserted first.
    assert!(!s.insert_approval("bind-1", &later, None).unwrap());
    assert!(!s.insert_approval("bind-1", &later, Some("ap0")).unwrap());
    assert!(s.insert_approval("bind-1", &later, Some("ap1")).unwrap());
    assert!(!s.insert_approval("bind-1", &a, Some("ap1")).unwrap());
    assert_eq!(
        s.latest_approval("bind-1").unwrap().map(|a| a.id),
        Some("ap2".into())
    );
    let mut approved = a.clone();
    approved.status = "approved".into();
    assert!(s.transition_approval("ap1", "pending", &approved).unwrap());
    assert!(!s.transition_approval("ap1", "pending", &approved).unwrap());
    assert_eq!(
        s.get_approval("ap1").unwrap().map(|a| a.status),
        Some("approved".into())
    );
    // What the human is shown is kept with it.
    assert_eq!(s.get_approval("ap1").unwrap().unwrap().shown, a.shown);
}

fn approval_template() -> ApprovalState {
    ApprovalState {
        id: "x".into(),
        status: "pending".into(),
        task_id: task_id(1),
        agent: sid("researcher"),
        tool: "crm.export".into(),
        resource: "dataset:crm".into(),
        risk: RiskTier::Write,
        input_digest: "d".into(),
        token_jti: Some("j".into()),
        target: None,
        shown: [("input:/amount".to_owned(), "10000".to_owned())].into(),
        requested_by: sid("tools/gateway"),
        created_at: 1,
        expires_at: 1,
        decided_by: None,
        reason: None,
        reported_in: None,
    }
}

fn revocation(s: &dyn Store) {
    let now = 100;
    let t = task(2);
    let other = task(3);
    s.insert_task(&t).unwrap();
    s.insert_task(&other).unwrap();
    assert_eq!(s.register(&creds(&t, "a1", None), now).unwrap(), Ok(()));
    assert_eq!(
        s.register(&creds(&t, "a2", Some("a1")), now).unwrap(),
        Ok(())
    );
    // Minted elsewhere from the task's credential.
    assert_eq!(
        s.register(&creds(&other, "b1", Some("a2")), now).unwrap(),
        Ok(())
    );
    assert_eq!(s.register(&creds(&other, "b2", None), now).unwrap(), Ok(()));
    let expired = CredentialRecord {
        expires_at: now,
        ..creds(&t, "dead", None).remove(0)
    };
    assert!(s.register(&[expired], now).unwrap().is_err());

    let epoch = s.epoch().unwrap();
    assert!(!epoch.is_empty());
    let before = s.last_seq().unwrap();

    // A subtree: a2, its certificate and what was minted from it.
    let covered = s
        .revoke(&Target::Subtree("a2".into()), &[], "subtree", now)
        .unwrap();
    let mut ids: Vec<String> = covered.iter().map(|r| r.id.clone()).collect();
    ids.sort();
    assert_eq!(ids, vec!["a2", "a2-cert", "b1", "b1-cert"]);
    assert!(s.durably_revoked("b1-cert", now).unwrap());
    assert!(!s.durably_revoked("a1", now).unwrap());
    // Nothing is minted under a revoked credential.
    assert!(
        s.register(&creds(&other, "c1", Some("b1")), now)
            .unwrap()
            .is_err()
    );
    // Idempotent: the same ids again, nothing new in the log.
    let seq = s.last_seq().unwrap();
    let again = s
        .revoke(&Target::Credential("a2".into()), &[], "again", now)
        .unwrap();
    assert_eq!(again.len(), 4);
    assert_eq!(s.last_seq().unwrap(), seq);

    // The task: one deny entry; every credential of it revoked; later
    // registrations in it refused.
    let before_task = s.last_seq().unwrap();
    s.revoke(&Target::Task(t.id.clone()), &[], "task ended", now)
        .unwrap();
    assert!(s.durably_revoked("a1", now).unwrap());
    assert!(!s.durably_revoked("b2", now).unwrap());
    assert!(s.register(&creds(&t, "a3", None), now).unwrap().is_err());
    let live = s.live_task_credentials(&t.id, now).unwrap();
    assert_eq!(live.len(), 4);
    let (log, last) = s.log_after(before_task, None, 100).unwrap();
    assert_eq!(
        log.iter()
            .filter(|r| r.entry.kind == CredKind::Task)
            .count(),
        1
    );
    assert!(log.iter().all(|r| r.reason == "task ended"));
    assert_eq!(last, s.last_seq().unwrap());

    // The log: in order, paged, only what is in force when asked so.
    let (all, _) = s.log_after(before, None, 1000).unwrap();
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    let (page, _) = s.log_after(before, None, 2).unwrap();
    assert_eq!(page.len(), 2);
    assert_eq!(page[0], all[0]);
    let (future, _) = s.log_after(before, Some(9_000), 1000).unwrap();
    assert!(future.is_empty());
    assert!(!s.live_revocations(now).unwrap().is_empty());

    // A purpose change revokes the listed tokens with their subtrees.
    let tk = token(&other, "b2");
    let gone = s.revoke_tokens(&[tk], "purpose changed", now).unwrap();
    assert!(gone.iter().any(|r| r.id == "b2-cert"));
    assert!(s.durably_revoked("b2", now).unwrap());

    // Pruned once expired.
    s.prune(9_000).unwrap();
    assert!(s.live_revocations(9_000).unwrap().is_empty());
    assert!(s.task_credentials(&t.id).unwrap().is_empty());
    s.ping().unwrap();
}

fn whole_suite(s: &dyn Store) {
    entries_and_nodes(s);
    tasks_grants_and_tokens(s);
    revocation(s);
}

#[test]
fn sqlite_in_memory_passes_the_datastore_suite() {
    whole_suite(&SqliteStore::in_memory().unwrap());
}

#[test]
fn sqlite_file_passes_the_datastore_suite() {
    let dir = tempfile::tempdir().unwrap();
    whole_suite(&SqliteStore::open(&dir.path().join("broker.db")).unwrap());
}

/// A private PostgreSQL cluster and a database in it per test.
struct Cluster {
    rt: tokio::runtime::Runtime,
    pg: baton_secrets::testing::Pg,
}

impl Cluster {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let pg = rt.block_on(baton_secrets::testing::Pg::start());
        Self { rt, pg }
    }

    fn database(&self, name: &str) -> PgSettings {
        self.rt.block_on(async {
            self.pg
                .admin("postgres")
                .await
                .batch_execute(&format!("CREATE DATABASE {name}"))
                .await
                .unwrap();
        });
        PgSettings {
            conn: self.pg.admin_conn(name),
            password: None,
            pool: 4,
            tls: Default::default(),
        }
    }
}

#[test]
fn postgres_passes_the_datastore_suite_and_its_steps_are_atomic_across_brokers() {
    let cluster = Cluster::start();
    let settings = cluster.database("suite");
    // Several brokers start at once on a new database: the schema is
    // created once.
    let opened: Vec<Arc<PgStore>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..3)
            .map(|_| sc.spawn(|| PgStore::open(&settings).map(Arc::new)))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect()
    });
    whole_suite(opened[0].as_ref());

    // Two brokers race on one join token, one grant, one redeem: one wins.
    let (a, b) = (opened[1].clone(), opened[2].clone());
    let node = sid("baton/node/race");
    let t = task(9);
    a.insert_task(&t).unwrap();
    for round in 0..20 {
        let digest = format!("race-jt{round}");
        a.insert_join_token(&digest, &node, 1_000).unwrap();
        let g = format!("race-g{round}");
        put_grant(a.as_ref(), &g, &grant(&t));
        let r = format!("race-r{round}");
        put_grant(a.as_ref(), &r, &grant(&t));
        let wins: Vec<(bool, bool, bool)> = std::thread::scope(|sc| {
            [a.clone(), b.clone()]
                .into_iter()
                .enumerate()
                .map(|(i, s)| {
                    let (digest, g, r, t) = (&digest, &g, &r, &t);
                    sc.spawn(move || {
                        let jti = format!("race-{round}-{i}");
                        (
                            s.consume_join_token(digest, 10).unwrap().is_ok(),
                            s.consume_grant(g, 10).unwrap().is_ok(),
                            s.redeem_grant(
                                r,
                                10,
                                &token(t, &jti),
                                &creds(t, &jti, None),
                                &delivery(t, &jti),
                            )
                            .unwrap()
                            .is_ok(),
                        )
                    })
                })
                .collect::<Vec<_>>()
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect()
        });
        assert_eq!(
            wins.iter().filter(|w| w.0).count(),
            1,
            "join token, round {round}"
        );
        assert_eq!(
            wins.iter().filter(|w| w.1).count(),
            1,
            "grant, round {round}"
        );
        assert_eq!(
            wins.iter().filter(|w| w.2).count(),
            1,
            "redeem, round {round}"
        );
    }

    // A revocation at one broker racing registrations at another: every
    // credential of the task that was registered is covered, and none is
    // registered after it.
    let t = task(10);
    a.insert_task(&t).unwrap();
    let registered: Vec<String> = std::thread::scope(|sc| {
        let reg = sc.spawn(|| {
            let mut ok = Vec::new();
            for i in 0..200 {
                let jti = format!("live-{i}");
                if a.register(&creds(&t, &jti, None), 100).unwrap().is_ok() {
                    ok.push(jti);
                }
            }
            ok
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        b.revoke(&Target::Task(t.id.clone()), &[], "ended", 100)
            .unwrap();
        reg.join().unwrap()
    });
    assert!(!registered.is_empty());
    for jti in &registered {
        assert!(
            b.durably_revoked(jti, 100).unwrap(),
            "{jti} escaped the task's revocation"
        );
    }
    // The log's order is its commit order: a follower that read up to a
    // sequence number never misses one that commits later.
    let (log, last) = a.log_after(0, None, 100_000).unwrap();
    assert_eq!(log.last().map(|r| r.seq), Some(last));

    // A log row numbered far ahead of the sequence (written by hand, or
    // restored without the sequence): later revocations are numbered
    // past it, so a relay or follower that read up to it still sees them.
    // Control first: the next revocation follows the newest row.
    let t = task(11);
    a.insert_task(&t).unwrap();
    for jti in ["seq-1", "seq-2", "seq-3"] {
        assert_eq!(a.register(&creds(&t, jti, None), 100).unwrap(), Ok(()));
    }
    b.revoke(&Target::Credential("seq-1".into()), &[], "control", 100)
        .unwrap();
    let (_, newest) = a.log_after(0, None, 100_000).unwrap();
    let planted = newest + 1_000_000;
    let sql = |q: String| {
        cluster.rt.block_on(async {
            cluster
                .pg
                .admin("suite")
                .await
                .batch_execute(&q)
                .await
                .unwrap();
        })
    };
    sql(format!(
        "INSERT INTO revocation_log (seq, id, expires_at, kind, reason) VALUES ({planted}, 'planted', 9000000000, 'token', 'by hand')"
    ));
    b.revoke(&Target::Credential("seq-2".into()), &[], "after", 100)
        .unwrap();
    let (after, last) = a.log_after(planted, None, 100).unwrap();
    assert!(after.iter().any(|r| r.entry.id == "seq-2"), "{after:?}");
    assert_eq!(last, a.last_seq().unwrap());
    // A log emptied (every row pruned) goes on from the highest number.
    sql("DELETE FROM revocation_log".into());
    a.revoke(&Target::Credential("seq-3".into()), &[], "after prune", 100)
        .unwrap();
    let (again, _) = a.log_after(last, None, 100).unwrap();
    assert!(again.iter().any(|r| r.entry.id == "seq-3"), "{again:?}");

    // The schema of a newer broker is refused, not guessed at.
    cluster.rt.block_on(async {
        let c = cluster.pg.admin("suite").await;
        c.batch_execute("INSERT INTO baton_schema_version (version) VALUES (999)")
            .await
            .unwrap();
    });
    assert!(matches!(
        PgStore::open(&settings),
        Err(StoreError::SchemaTooNew { found: 999, .. })
    ));
}

/// A broker frozen inside a transaction (SIGSTOP, a paused container or
/// VM, a partition: its socket stays open) stalls no other broker: every
/// issuance holds the revocation lock shared, and a revocation waiting for
/// it exclusively would queue every later issuance behind it, at every
/// broker, for as long as the frozen one holds it. Now a lock is waited
/// for 10 s at most (the waiter fails, and nothing of it is stored), and
/// the server ends a broker's session left idle in a transaction after
/// 30 s, which frees its locks. The control: the same revocation once the
/// frozen session is gone goes through.
#[test]
fn postgres_a_broker_frozen_in_a_transaction_stalls_no_other() {
    use std::time::{Duration, Instant};

    let cluster = Cluster::start();
    let settings = cluster.database("frozen");
    let store = PgStore::open(&settings).unwrap();
    let t = task(4);
    store.insert_task(&t).unwrap();
    assert_eq!(store.register(&creds(&t, "f1", None), 100).unwrap(), Ok(()));
    let frozen = cluster.rt.block_on(async {
        let c = cluster.pg.admin("frozen").await;
        // As a broker's session is set up, then frozen mid-issuance.
        c.batch_execute(crate::pg::SESSION_LIMITS).await.unwrap();
        c.batch_execute(&format!(
            "BEGIN; SELECT pg_advisory_xact_lock_shared({})",
            crate::pg::REVOCATION_LOCK
        ))
        .await
        .unwrap();
        c
    });
    let started = Instant::now();
    let stuck = store.revoke(&Target::Credential("f1".into()), &[], "frozen", 100);
    assert!(stuck.is_err(), "waited past the frozen session: {stuck:?}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "a lock waited for {:?}",
        started.elapsed()
    );
    assert!(
        !store.durably_revoked("f1", 100).unwrap(),
        "a failed revocation stored"
    );
    // The server ends the frozen session (30 s idle in its transaction),
    // and the same revocation then goes through.
    let deadline = Instant::now() + Duration::from_secs(150);
    let done = loop {
        match store.revoke(&Target::Credential("f1".into()), &[], "after", 100) {
            Ok(done) => break done,
            Err(e) => assert!(
                Instant::now() < deadline,
                "the frozen session was never ended: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert!(
        frozen.is_closed() || {
            std::thread::sleep(Duration::from_secs(1));
            frozen.is_closed()
        }
    );
    assert!(done.iter().any(|r| r.id == "f1"), "{done:?}");
    assert!(store.durably_revoked("f1", 100).unwrap());
}

#[test]
fn postgres_errors_say_what_was_wrong_and_keep_no_password() {
    let bad = PgSettings {
        conn: "postgres://baton:hunter2@127.0.0.1:1/baton".into(),
        password: None,
        pool: 1,
        tls: Default::default(),
    };
    let e = PgStore::open(&bad).unwrap_err().to_string();
    assert!(e.contains("cannot connect to PostgreSQL at"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
    assert!(!format!("{bad:?}").contains("hunter2"));
    let e = PgStore::open(&PgSettings {
        conn: "host=/nowhere port=notaport".into(),
        password: None,
        pool: 1,
        tls: Default::default(),
    })
    .unwrap_err()
    .to_string();
    assert!(e.contains("is not valid"), "{e}");
    // Misspelt URLs the driver does not read as URLs: the error never
    // echoes their user info.
    for conn in [
        "postgresql:/baton:hunter2@db/baton",
        "postgres//baton:hunter2@db/baton",
        "Postgres://baton:hunter2@db/baton",
    ] {
        let e = PgStore::open(&PgSettings {
            conn: conn.into(),
            password: None,
            pool: 1,
            tls: Default::default(),
        })
        .unwrap_err()
        .to_string();
        assert!(!e.contains("hunter2"), "{conn}: {e}");
    }
    // A percent-encoded password key is decoded by the driver.
    let shown = crate::pg::redact("postgres://baton@db/baton?pass%77ord=hunter2");
    assert!(!shown.contains("hunter2"), "{shown}");
}

/// The CA shared on PostgreSQL: brokers starting at once on an empty
/// database make one CA; racing rotation steps run once; every row is
/// sealed; the schedule lease has one holder at a time and passes on once
/// it expired; node syncs only move forward.
#[test]
fn postgres_shares_one_ca_one_schedule_lease_and_the_node_syncs() {
    use baton_ca::{AuthorityKind, Ca, CaConfig, SharedCaStore as _};

    use crate::pg_ca::{CaSealKey, PgCaStore};

    baton_ca::init();
    let cluster = Cluster::start();
    let settings = cluster.database("shared_ca");
    let stores: Vec<Arc<PgStore>> = (0..3)
        .map(|_| Arc::new(PgStore::open(&settings).unwrap()))
        .collect();
    let cfg = |pg: &Arc<PgStore>| {
        let mut c = CaConfig::new(baton_core::TrustDomain::new("example.org").unwrap());
        c.shared = Some(Arc::new(PgCaStore::new(
            pg.clone(),
            CaSealKey::from_bytes(&[9u8; 32]).unwrap(),
        )));
        c
    };
    let now = std::time::SystemTime::now();
    let cas: Vec<Ca> = std::thread::scope(|sc| {
        let handles: Vec<_> = stores
            .iter()
            .map(|pg| {
                let c = cfg(pg);
                sc.spawn(move || Ca::load_or_create(c, now).unwrap())
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let pem = cas[0].bundle().to_pem();
    for ca in &cas {
        assert_eq!(ca.bundle().to_pem(), pem, "one CA for every broker");
    }
    // Three brokers prepare at once: exactly one succeeds.
    let results: Vec<bool> = std::thread::scope(|sc| {
        let handles: Vec<_> = cas
            .iter()
            .map(|ca| sc.spawn(move || ca.prepare(&[AuthorityKind::X509], now).is_ok()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(results.iter().filter(|ok| **ok).count(), 1, "{results:?}");
    for ca in &cas {
        ca.refresh().unwrap();
        assert_eq!(ca.authorities().len(), 3);
    }
    // Sealed: the rows are not the DER the CA serves, and another key
    // cannot open them.
    let other = PgCaStore::new(
        stores[0].clone(),
        CaSealKey::from_bytes(&[1u8; 32]).unwrap(),
    );
    let e = other.load().unwrap_err().to_string();
    assert!(e.contains("does not open"), "{e}");
    let mine = PgCaStore::new(
        stores[0].clone(),
        CaSealKey::from_bytes(&[9u8; 32]).unwrap(),
    );
    assert_eq!(mine.load().unwrap().files.len(), 5);

    // The lease: one holder; renewable by it; taken over once expired.
    let ttl = std::time::Duration::from_millis(800);
    assert!(stores[0].lease("ca-schedule", "a", ttl).unwrap());
    assert!(!stores[1].lease("ca-schedule", "b", ttl).unwrap());
    assert!(stores[0].lease("ca-schedule", "a", ttl).unwrap());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !stores[1].lease("ca-schedule", "b", ttl).unwrap() {
        assert!(
            std::time::Instant::now() < deadline,
            "the lease never expired"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(!stores[0].lease("ca-schedule", "a", ttl).unwrap());

    // Node syncs: kept per node, only forward.
    let n = sid("baton/node/n1");
    stores[0].record_node_sync(&n, 100, Some(5)).unwrap();
    stores[1].record_node_sync(&n, 90, Some(3)).unwrap();
    stores[1]
        .record_node_sync(&sid("baton/node/n2"), 50, None)
        .unwrap();
    let mut syncs = stores[2].node_syncs().unwrap();
    syncs.sort_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    assert_eq!(
        syncs,
        vec![(n.clone(), 100, Some(5)), (sid("baton/node/n2"), 50, None)]
    );
    stores[2].record_node_sync(&n, 120, Some(6)).unwrap();
    assert!(stores[0].node_syncs().unwrap().contains(&(n, 120, Some(6))));
}
