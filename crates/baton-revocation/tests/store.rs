//! The same semantics against both backends, plus Redis-only checks (TTLs,
//! data loss and re-seeding).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::collections::BTreeSet;

use baton_revocation::{
    CredKind, MemoryStore, RedisStore, RevocationError, RevocationStore, Revoked, Target,
    system_now,
};
use common::{RedisServer, rec, spiffe, task};

fn ids(v: &[Revoked]) -> BTreeSet<String> {
    v.iter().map(|r| r.id.clone()).collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

async fn revoked_ids<S: RevocationStore>(s: &S, all: &[&str], now: u64) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for id in all {
        if s.is_revoked(id, now).await.unwrap() {
            out.insert(id.to_string());
        }
    }
    out
}

async fn subtree_and_task<S: RevocationStore>(s: &S) {
    let now = system_now();
    let (t1, t2) = (task(1), task(2));
    s.register(&rec("a", Some(t1.clone()), "agent/x", None, now + 600), now)
        .await
        .unwrap();
    s.register(
        &rec("b", Some(t1.clone()), "agent/y", Some("a"), now + 500),
        now,
    )
    .await
    .unwrap();
    s.register(
        &rec("c", Some(t1.clone()), "agent/z", Some("b"), now + 400),
        now,
    )
    .await
    .unwrap();
    s.register(
        &rec("s1", Some(t1.clone()), "agent/w", None, now + 300),
        now,
    )
    .await
    .unwrap();
    s.register(
        &rec("o1", Some(t2.clone()), "agent/x2", None, now + 600),
        now,
    )
    .await
    .unwrap();
    let all = ["a", "b", "c", "s1", "o1"];

    let r = s
        .revoke(&Target::Subtree("a".into()), "test", now)
        .await
        .unwrap();
    assert_eq!(ids(&r), set(&["a", "b", "c"]));
    let c = r.iter().find(|r| r.id == "c").unwrap();
    assert_eq!((c.kind, c.expires_at), (CredKind::Token, now + 400));
    assert_eq!(revoked_ids(s, &all, now).await, set(&["a", "b", "c"]));

    // Nothing can be minted under a revoked credential.
    let e = s
        .register(
            &rec("d", Some(t1.clone()), "agent/z", Some("c"), now + 100),
            now,
        )
        .await;
    assert!(
        matches!(e, Err(RevocationError::ParentRevoked { .. })),
        "{e:?}"
    );
    let e = s
        .register(&rec("a", Some(t1.clone()), "agent/x", None, now + 100), now)
        .await;
    assert!(
        matches!(e, Err(RevocationError::AlreadyRevoked { .. })),
        "{e:?}"
    );

    let r = s
        .revoke(&Target::Task(t1.clone()), "task ended", now)
        .await
        .unwrap();
    assert_eq!(ids(&r), set(&["a", "b", "c", "s1"]));
    assert_eq!(revoked_ids(s, &all, now).await, set(&["a", "b", "c", "s1"]));
    let e = s
        .register(
            &rec("late", Some(t1.clone()), "agent/q", None, now + 100),
            now,
        )
        .await;
    assert!(
        matches!(e, Err(RevocationError::TaskRevoked { .. })),
        "{e:?}"
    );
    // The other task is untouched.
    assert!(!s.is_revoked("o1", now).await.unwrap());
}

async fn agent_and_node<S: RevocationStore>(s: &S) {
    let now = system_now();
    for (i, n) in [10u8, 11, 12].iter().enumerate() {
        let mut r = rec(
            &format!("ag{i}"),
            Some(task(*n)),
            "agent/multi",
            None,
            now + 100 + i as u64,
        );
        r.node = Some(spiffe("node/n2"));
        s.register(&r, now).await.unwrap();
    }
    let mut other = rec("other", Some(task(10)), "agent/solo", None, now + 100);
    other.node = Some(spiffe("node/n3"));
    s.register(&other, now).await.unwrap();
    let mut svid = rec("serial01", Some(task(13)), "agent/solo", None, now + 100);
    svid.kind = CredKind::X509Svid;
    svid.node = Some(spiffe("node/n3"));
    s.register(&svid, now).await.unwrap();

    let r = s
        .revoke(&Target::Agent(spiffe("agent/multi")), "compromised", now)
        .await
        .unwrap();
    assert_eq!(ids(&r), set(&["ag0", "ag1", "ag2"]));
    assert!(!s.is_revoked("other", now).await.unwrap());

    let r = s
        .revoke(&Target::Node(spiffe("node/n3")), "node lost", now)
        .await
        .unwrap();
    assert_eq!(ids(&r), set(&["other", "serial01"]));
    assert_eq!(
        r.iter().find(|r| r.id == "serial01").unwrap().kind,
        CredKind::X509Svid
    );
}

async fn unknown_changes_nothing<S: RevocationStore>(s: &S) {
    let now = system_now();
    s.register(&rec("u1", Some(task(20)), "agent/u", None, now + 100), now)
        .await
        .unwrap();
    for t in [
        Target::Credential("nope".into()),
        Target::Subtree("nope".into()),
        Target::Task(task(21)),
        Target::Agent(spiffe("agent/nobody")),
        Target::Node(spiffe("node/none")),
    ] {
        let e = s.revoke(&t, "test", now).await.unwrap_err();
        assert!(matches!(e, RevocationError::Unknown { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("matches no live registered credential"),
            "{e}"
        );
    }
    assert!(!s.is_revoked("u1", now).await.unwrap());
    assert!(!s.is_revoked("nope", now).await.unwrap());
    // Expired records are refused; bad ids too.
    let e = s
        .register(&rec("old", None, "agent/u", None, now), now)
        .await
        .unwrap_err();
    assert!(matches!(e, RevocationError::Expired { .. }), "{e:?}");
    let e = s
        .register(&rec("has space", None, "agent/u", None, now + 5), now)
        .await
        .unwrap_err();
    assert!(matches!(e, RevocationError::InvalidId { .. }), "{e:?}");
    // Revoking one credential is idempotent.
    let r1 = s
        .revoke(&Target::Credential("u1".into()), "x", now)
        .await
        .unwrap();
    let r2 = s
        .revoke(&Target::Credential("u1".into()), "x", now)
        .await
        .unwrap();
    assert_eq!(r1, r2);
}

/// A node's batch of workload SVIDs: registered in one call, all reached by
/// revoking the node or the agent, and a batch with one refused record
/// registers nothing of its chunk.
async fn batch_register<S: RevocationStore>(s: &S) {
    let now = system_now();
    let batch: Vec<_> = (0..1200)
        .map(|i| {
            let mut r = rec(
                &format!("wl{i:04}"),
                None,
                &format!("wl/{}", i % 3),
                None,
                now + 100 + (i % 7),
            );
            r.kind = CredKind::X509Svid;
            r.node = Some(spiffe("node/batch"));
            r
        })
        .collect();
    s.register_many(&batch, now).await.unwrap();
    let r = s
        .revoke(&Target::Agent(spiffe("wl/1")), "one workload", now)
        .await
        .unwrap();
    assert_eq!(r.len(), 400);
    let r = s
        .revoke(&Target::Node(spiffe("node/batch")), "evicted", now)
        .await
        .unwrap();
    assert_eq!(r.len(), 1200);
    assert!(s.is_revoked("wl0000", now).await.unwrap());
    assert!(s.is_revoked("wl1199", now).await.unwrap());
    let w = r.iter().find(|r| r.id == "wl0006").unwrap();
    assert_eq!((w.kind, w.expires_at), (CredKind::X509Svid, now + 106));

    // One revoked id refuses its chunk: nothing of it is registered.
    let mut fresh: Vec<_> = (0..3)
        .map(|i| {
            let mut r = rec(&format!("nb{i}"), None, "wl/x", None, now + 50);
            r.node = Some(spiffe("node/batch2"));
            r
        })
        .collect();
    fresh.push(batch[0].clone());
    let e = s.register_many(&fresh, now).await.unwrap_err();
    assert!(
        matches!(&e, RevocationError::AlreadyRevoked { id } if id == "wl0000"),
        "{e:?}"
    );
    let e = s
        .revoke(&Target::Node(spiffe("node/batch2")), "x", now)
        .await
        .unwrap_err();
    assert!(matches!(e, RevocationError::Unknown { .. }), "{e:?}");
    // A JWT-SVID digest round-trips its kind.
    let mut jwt = rec("jwtdigest01", None, "wl/j", None, now + 30);
    jwt.kind = CredKind::JwtSvid;
    s.register_many(&[jwt], now).await.unwrap();
    let r = s
        .revoke(&Target::Agent(spiffe("wl/j")), "x", now)
        .await
        .unwrap();
    assert_eq!(r[0].kind, CredKind::JwtSvid);
}

async fn all_semantics<S: RevocationStore>(s: &S) {
    assert!(!s.health().await.unwrap().empty_since_seed);
    subtree_and_task(s).await;
    agent_and_node(s).await;
    unknown_changes_nothing(s).await;
    batch_register(s).await;
}

#[tokio::test]
async fn memory_semantics() {
    let s = MemoryStore::new();
    let mut rx = s.subscribe();
    all_semantics(&s).await;
    let first = rx.recv().await.unwrap();
    assert_eq!(ids(&first), set(&["a", "b", "c"]));
}

async fn redis_store() -> (RedisServer, RedisStore) {
    let srv = RedisServer::start();
    let s = RedisStore::connect(&srv.url(), "bt").await.unwrap();
    s.seed(&[], system_now()).await.unwrap();
    (srv, s)
}

#[tokio::test]
async fn redis_semantics() {
    let (_srv, s) = redis_store().await;
    all_semantics(&s).await;
}

#[tokio::test]
async fn redis_refuses_until_seeded() {
    let srv = RedisServer::start();
    let s = RedisStore::connect(&srv.url(), "bt").await.unwrap();
    let h = s.health().await.unwrap();
    assert!(h.empty_since_seed && h.epoch.is_empty());
    let now = system_now();
    let e = s
        .register(&rec("x", None, "agent/a", None, now + 10), now)
        .await
        .unwrap_err();
    assert!(matches!(e, RevocationError::NotSeeded), "{e:?}");
    s.seed(&[], now).await.unwrap();
    s.register(&rec("x", None, "agent/a", None, now + 10), now)
        .await
        .unwrap();
}

/// TLS works (see tests/topologies.rs); a TLS server that is not there is
/// a connection error naming the target without its password.
#[tokio::test]
async fn redis_tls_connect_error_is_clear_and_hides_the_password() {
    let e = RedisStore::connect("rediss://u:secret@127.0.0.1:1/", "bt")
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, RevocationError::Connect { .. }), "{e:?}");
    assert!(
        msg.contains("cannot connect to Redis (rediss://...@127.0.0.1:1/)")
            && !msg.contains("secret"),
        "{msg}"
    );
}

async fn ttl(s: &RedisStore, key: &str) -> i64 {
    let v = s.raw(redis::cmd("TTL").arg(key)).await.unwrap();
    match v {
        redis::Value::Int(n) => n,
        other => panic!("{other:?}"),
    }
}

async fn zscore(s: &RedisStore, id: &str) -> Option<u64> {
    let v = s
        .raw(redis::cmd("ZSCORE").arg("{bt}:revoked-index").arg(id))
        .await
        .unwrap();
    match v {
        redis::Value::Nil => None,
        redis::Value::BulkString(b) => Some(String::from_utf8(b).unwrap().parse().unwrap()),
        redis::Value::Double(d) => Some(d as u64),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn redis_revoked_entry_lives_exactly_as_long_as_the_credential() {
    let (_srv, s) = redis_store().await;
    let now = system_now();
    s.register(&rec("t1", Some(task(1)), "agent/a", None, now + 1000), now)
        .await
        .unwrap();
    s.register(
        &rec("t2", Some(task(1)), "agent/b", Some("t1"), now + 300),
        now,
    )
    .await
    .unwrap();
    assert!((998..=1000).contains(&ttl(&s, "{bt}:cred:t1").await));
    // Index sets live as long as their longest member.
    assert!((998..=1000).contains(&ttl(&s, &format!("{{bt}}:task:{}", task(1).as_str())).await));
    assert!((298..=300).contains(&ttl(&s, "{bt}:agent:spiffe://example.org/agent/b").await));
    s.revoke(&Target::Subtree("t1".into()), "x", now)
        .await
        .unwrap();
    // The deny set is the index alone; each id is scored with its expiry.
    assert_eq!(zscore(&s, "t1").await, Some(now + 1000));
    assert_eq!(zscore(&s, "t2").await, Some(now + 300));
    assert_eq!(
        s.raw(redis::cmd("EXISTS").arg("{bt}:revoked:t1"))
            .await
            .unwrap(),
        redis::Value::Int(0),
        "no per-id deny key"
    );
    // Refused while the credential lives, forgotten once it has expired.
    assert!(s.is_revoked("t2", now + 299).await.unwrap());
    assert!(!s.is_revoked("t2", now + 300).await.unwrap());
    assert!(s.is_revoked("t1", now + 300).await.unwrap());
}

#[tokio::test]
async fn redis_flushall_loses_epoch_and_seed_restores() {
    let (_srv, s) = redis_store().await;
    let now = system_now();
    let before = s.health().await.unwrap();
    s.register(&rec("a", Some(task(1)), "agent/a", None, now + 600), now)
        .await
        .unwrap();
    s.register(
        &rec("b", Some(task(1)), "agent/b", Some("a"), now + 600),
        now,
    )
    .await
    .unwrap();
    s.register(&rec("k", Some(task(2)), "agent/k", None, now + 600), now)
        .await
        .unwrap();
    let revoked = s
        .revoke(&Target::Task(task(1)), "ended", now)
        .await
        .unwrap();
    // The durable log keeps `revoked`; Redis forgets.
    s.raw(&redis::cmd("FLUSHALL")).await.unwrap();
    let h = s.health().await.unwrap();
    assert!(h.empty_since_seed && h.epoch.is_empty());
    assert!(!s.is_revoked("a", now).await.unwrap());
    let e = s
        .register(&rec("z", None, "agent/z", None, now + 60), now)
        .await
        .unwrap_err();
    assert!(matches!(e, RevocationError::NotSeeded));

    s.seed(&revoked, now).await.unwrap();
    let h = s.health().await.unwrap();
    assert!(!h.empty_since_seed && h.epoch != before.epoch);
    for r in &revoked {
        assert!(s.is_revoked(&r.id, now).await.unwrap(), "{} restored", r.id);
    }
    assert_eq!(s.revoked(now).await.unwrap().len(), revoked.len());
    assert!(!s.is_revoked("k", now).await.unwrap());
}
