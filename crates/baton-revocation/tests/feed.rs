//! The verifier-side follower against a real redis-server: delivery,
//! resume after a killed connection, resync after trimming, staleness.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use baton_revocation::{
    FeedHandle, FeedOptions, FeedStatus, Heartbeat, RedisStore, RevocationFeed, RevocationStore,
    Target, system_now,
};
use baton_verify::RevocationCheck;
use common::{RedisServer, eventually, rec, task};

fn opts() -> FeedOptions {
    FeedOptions {
        stale_after: Duration::from_secs(2),
        heartbeat_every: Duration::from_millis(200),
        ..FeedOptions::default()
    }
}

async fn setup() -> (RedisServer, RedisStore, FeedHandle) {
    let srv = RedisServer::start();
    let store = RedisStore::connect(&srv.url(), "bt").await.unwrap();
    store.seed(&[], system_now()).await.unwrap();
    let feed = RevocationFeed::spawn(&srv.url(), "bt", opts()).unwrap();
    eventually("first resync", 10, || {
        feed.status(system_now()) == FeedStatus::Fresh
    })
    .await;
    (srv, store, feed)
}

async fn kill_feed_connection(store: &RedisStore) {
    let list = store.raw(redis::cmd("CLIENT").arg("LIST")).await.unwrap();
    let text = match list {
        redis::Value::BulkString(b) => String::from_utf8(b).unwrap(),
        redis::Value::VerbatimString { text, .. } => text,
        other => panic!("{other:?}"),
    };
    let line = text
        .lines()
        .find(|l| l.contains("name=baton-revocation-feed"))
        .expect("feed connection listed");
    let id = line
        .split(' ')
        .find_map(|f| f.strip_prefix("id="))
        .unwrap()
        .to_owned();
    store
        .raw(redis::cmd("CLIENT").arg("KILL").arg("ID").arg(id))
        .await
        .unwrap();
}

#[tokio::test]
async fn follower_sees_revocations_and_resumes_after_kill() {
    let (_srv, store, feed) = setup().await;
    let now = system_now();
    let t = task(1);
    for (id, parent) in [("a", None), ("b", Some("a")), ("c", Some("b")), ("x", None)] {
        store
            .register(&rec(id, Some(t.clone()), "agent/a", parent, now + 600), now)
            .await
            .unwrap();
    }
    assert!(!RevocationCheck::is_revoked(&feed, "a", &t));
    store
        .revoke(&Target::Subtree("a".into()), "test", now)
        .await
        .unwrap();
    eventually("a, b, c revoked locally", 10, || {
        ["a", "b", "c"]
            .iter()
            .all(|id| feed.contains(id, system_now()))
    })
    .await;
    assert!(RevocationCheck::is_revoked(&feed, "c", &t));
    assert!(!RevocationCheck::is_revoked(&feed, "x", &t));
    let resyncs = feed.resyncs();

    kill_feed_connection(&store).await;
    // Revoked while the follower is (probably) reconnecting: the stream keeps it.
    store
        .revoke(&Target::Credential("x".into()), "test", now)
        .await
        .unwrap();
    eventually("x after reconnect", 10, || feed.contains("x", system_now())).await;
    assert_eq!(
        feed.resyncs(),
        resyncs,
        "resumed from its last id, no full resync"
    );
}

async fn acl(store: &RedisStore, args: &[&str]) {
    store.raw(redis::cmd("ACL").arg(args)).await.unwrap();
}

/// A Redis, its store and a follower logged in as its own ACL user, so
/// that a test can keep it out ([`keep_away`]) while the store goes on.
async fn away_able_follower() -> (RedisServer, RedisStore, FeedHandle) {
    let srv = RedisServer::start();
    let store = RedisStore::connect(&srv.url(), "bt").await.unwrap();
    store.seed(&[], system_now()).await.unwrap();
    acl(
        &store,
        &["SETUSER", "feeder", "on", ">s3cret", "~*", "+@all"],
    )
    .await;
    let url = format!("redis://feeder:s3cret@127.0.0.1:{}/", srv.port);
    let feed = RevocationFeed::spawn(&url, "bt", opts()).unwrap();
    (srv, store, feed)
}

/// Keeps the follower of [`away_able_follower`] out (its user off and its
/// connection killed), or lets it back in.
async fn keep_away(store: &RedisStore, away: bool) {
    if !away {
        acl(store, &["SETUSER", "feeder", "on"]).await;
        return;
    }
    acl(store, &["SETUSER", "feeder", "off"]).await;
    store
        .raw(redis::cmd("CLIENT").arg("KILL").arg("USER").arg("feeder"))
        .await
        .unwrap();
}

/// Trims the feed's stream to nothing (an outage longer than its
/// retention).
async fn trim_stream(store: &RedisStore) {
    store
        .raw(
            redis::cmd("XTRIM")
                .arg("{bt}:revocations:v2")
                .arg("MAXLEN")
                .arg(0),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn follower_resyncs_after_the_stream_was_trimmed() {
    let (_srv, store, feed) = away_able_follower().await;
    eventually("first resync", 10, || {
        feed.status(system_now()) == FeedStatus::Fresh
    })
    .await;
    let now = system_now();
    store
        .register(&rec("p1", Some(task(1)), "agent/a", None, now + 600), now)
        .await
        .unwrap();
    store
        .register(&rec("p2", Some(task(2)), "agent/a", None, now + 600), now)
        .await
        .unwrap();
    store.heartbeat(now, "relay").await.unwrap();
    eventually("follower at the heartbeat", 10, || {
        feed.status(system_now()) == FeedStatus::Fresh
    })
    .await;
    let resyncs = feed.resyncs();

    keep_away(&store, true).await;
    // While it is away a revocation happens and the stream is trimmed past
    // it (an outage longer than the retention window).
    store
        .revoke(&Target::Credential("p1".into()), "test", now)
        .await
        .unwrap();
    trim_stream(&store).await;
    store.heartbeat(now, "relay").await.unwrap();
    assert!(!feed.contains("p1", system_now()));
    keep_away(&store, false).await;

    eventually("p1 known after a resync", 10, || {
        feed.contains("p1", system_now())
    })
    .await;
    assert_eq!(feed.resyncs(), resyncs + 1);
    assert!(!feed.contains("p2", system_now()));
}

#[tokio::test]
async fn stale_when_redis_dies_fresh_after_it_returns_and_is_reseeded() {
    let (mut srv, store, feed) = setup().await;
    let _hb = Heartbeat::spawn(store.clone(), Duration::from_millis(200));
    let now = system_now();
    store
        .register(&rec("r1", Some(task(1)), "agent/a", None, now + 600), now)
        .await
        .unwrap();
    let revoked = store
        .revoke(&Target::Credential("r1".into()), "test", now)
        .await
        .unwrap();
    eventually("r1 revoked", 10, || feed.contains("r1", system_now())).await;
    let t = task(1);
    assert!(!RevocationCheck::is_revoked(&feed, "innocent", &t));
    // A lenient follower (`allow_stale`, for reads) that synced before
    // Redis died.
    let lenient = FeedOptions {
        allow_stale: true,
        ..opts()
    };
    let read_only = RevocationFeed::spawn(&srv.url(), "bt", lenient.clone()).unwrap();
    eventually("the lenient follower synced", 10, || {
        read_only.contains("r1", system_now())
    })
    .await;

    srv.stop();
    eventually("stale without heartbeats", 10, || {
        matches!(feed.status(system_now()), FeedStatus::Stale { .. })
    })
    .await;
    // Fail closed: everything is revoked while stale.
    assert!(RevocationCheck::is_revoked(&feed, "innocent", &t));
    // The lenient follower answers from the set it holds: what it knows
    // revoked stays refused, the rest passes.
    assert!(!RevocationCheck::is_revoked(&read_only, "innocent", &t));
    assert!(RevocationCheck::is_revoked(&read_only, "r1", &t));
    // One started while Redis is down holds no set at all: it knows of no
    // revocation, so it refuses everything until it has synced once.
    let never_synced = RevocationFeed::spawn(&srv.url(), "bt", lenient).unwrap();
    assert!(RevocationCheck::is_revoked(&never_synced, "innocent", &t));

    // Back, but empty (no persistence): still stale until re-seeded, even
    // though heartbeats flow again.
    srv.restart();
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(store.health().await.unwrap().empty_since_seed);
    assert!(matches!(
        feed.status(system_now()),
        FeedStatus::Stale { .. }
    ));
    assert!(RevocationCheck::is_revoked(&feed, "innocent", &t));

    store.seed(&revoked, system_now()).await.unwrap();
    eventually("fresh after re-seed", 10, || {
        feed.status(system_now()) == FeedStatus::Fresh
    })
    .await;
    assert!(feed.contains("r1", system_now()));
    assert!(!RevocationCheck::is_revoked(&feed, "innocent", &t));
}

/// Format 2 of the stream: published hex ids (written compactly) and other
/// ids arrive as they were; an entry the follower cannot read makes it
/// reload the deny set instead of skipping ids; the format-1 stream, which
/// older followers read, is removed rather than left looking alive.
#[tokio::test]
async fn compact_entries_arrive_whole_and_an_unreadable_one_forces_a_resync() {
    let (_srv, store, feed) = setup().await;
    let now = system_now();
    store
        .raw(
            redis::cmd("XADD")
                .arg("{bt}:revocations")
                .arg("*")
                .arg("t")
                .arg("hb"),
        )
        .await
        .unwrap();
    let serial = "7a3f0b9c00112233445566778899aabb";
    let batch = [
        baton_revocation::Revoked {
            id: serial.into(),
            kind: baton_revocation::CredKind::X509Svid,
            expires_at: now + 600,
        },
        baton_revocation::Revoked {
            id: "~odd-one".into(),
            kind: baton_revocation::CredKind::Token,
            expires_at: now + 600,
        },
        baton_revocation::Revoked {
            id: "lease-1".into(),
            kind: baton_revocation::CredKind::SecretLease,
            expires_at: now + 900,
        },
    ];
    store.publish(&batch, "test", "log1", 3, now).await.unwrap();
    eventually("every id at the follower", 10, || {
        [serial, "~odd-one", "lease-1"]
            .iter()
            .all(|id| feed.contains(id, system_now()))
    })
    .await;
    let legacy = store
        .raw(redis::cmd("EXISTS").arg("{bt}:revocations"))
        .await
        .unwrap();
    assert_eq!(legacy, redis::Value::Int(0));
    let resyncs = feed.resyncs();

    // An id only in the deny set, then an entry no follower can read.
    store
        .raw(
            redis::cmd("ZADD")
                .arg("{bt}:revoked-index")
                .arg(now + 600)
                .arg("only-in-index"),
        )
        .await
        .unwrap();
    store
        .raw(
            redis::cmd("XADD")
                .arg(store.stream_key())
                .arg("*")
                .arg("t")
                .arg("revoke")
                .arg("r")
                .arg("not-a-number only-in-index"),
        )
        .await
        .unwrap();
    eventually("resynced from the deny set", 10, || {
        feed.contains("only-in-index", system_now())
    })
    .await;
    assert_eq!(feed.resyncs(), resyncs + 1);
    assert!(feed.contains(serial, system_now()));
}

/// Heartbeats of the revocation service alone keep a follower fresh only
/// for the publisher grace: a broker that records revocations but cannot
/// publish them (its Redis user disabled, cut off from Redis) does not
/// leave followers fresh for ever while the service beats on. A
/// publisher's heartbeat (the control) keeps it fresh past the grace.
#[tokio::test]
async fn service_heartbeats_alone_keep_a_feed_fresh_only_for_the_grace() {
    let srv = RedisServer::start();
    let store = RedisStore::connect(&srv.url(), "bt").await.unwrap();
    store.seed(&[], system_now()).await.unwrap();
    let grace = 3;
    let feed = RevocationFeed::spawn(
        &srv.url(),
        "bt",
        FeedOptions {
            stale_after: Duration::from_secs(5),
            publisher_grace: Duration::from_secs(grace),
            ..opts()
        },
    )
    .unwrap();
    let _service = Heartbeat::spawn_service(store.clone(), Duration::from_millis(200));
    let relay = Heartbeat::spawn(store.clone(), Duration::from_millis(200));
    let started = system_now();
    eventually("first resync", 10, || {
        feed.status(system_now()) == FeedStatus::Fresh
    })
    .await;
    // Control: with a publisher beating, fresh well past the grace.
    eventually("past the grace", 30, || system_now() > started + grace + 1).await;
    eventually("fresh with a publisher", 10, || {
        feed.status(system_now()) == FeedStatus::Fresh
    })
    .await;
    // The publisher falls silent; the service beats on: stale.
    drop(relay);
    eventually("stale with only the service beating", 30, || {
        matches!(feed.status(system_now()), FeedStatus::Stale { .. })
    })
    .await;
    assert!(RevocationCheck::is_revoked(&feed, "innocent", &task(1)));
    // A publisher again: fresh.
    let _relay = Heartbeat::spawn(store.clone(), Duration::from_millis(200));
    eventually("fresh once a publisher beats again", 30, || {
        feed.status(system_now()) == FeedStatus::Fresh
    })
    .await;
}

/// A resync merges what the index holds into what the follower already
/// refuses; it never replaces it. A Redis that lost a revocation (a
/// failover to a replica that missed the last writes, a restart that lost
/// its last second, an id removed by someone with write access) keeps the
/// epoch, so the follower resyncs from an index without the id: before,
/// the id was accepted again while the feed said fresh. The control: an id
/// revoked while the follower was away arrives with the resync, and one
/// never revoked is still accepted.
#[tokio::test]
async fn a_resync_from_an_index_that_lost_an_id_keeps_it_refused() {
    let (_srv, store, feed) = away_able_follower().await;
    let now = system_now();
    for (id, t) in [("lost", 1), ("away", 2), ("live", 3)] {
        store
            .register(&rec(id, Some(task(t)), "agent/a", None, now + 600), now)
            .await
            .unwrap();
    }
    store
        .revoke(&Target::Credential("lost".into()), "test", now)
        .await
        .unwrap();
    eventually("the revocation followed", 10, || {
        feed.status(system_now()) == FeedStatus::Fresh && feed.contains("lost", system_now())
    })
    .await;
    let resyncs = feed.resyncs();

    keep_away(&store, true).await;
    // Redis loses "lost" (index and stream) but keeps its epoch, while
    // "away" is revoked and kept.
    store
        .raw(redis::cmd("ZREM").arg("{bt}:revoked-index").arg("lost"))
        .await
        .unwrap();
    store
        .revoke(&Target::Credential("away".into()), "test", now)
        .await
        .unwrap();
    trim_stream(&store).await;
    store.heartbeat(now, "relay").await.unwrap();
    keep_away(&store, false).await;

    eventually("resynced", 10, || feed.resyncs() > resyncs).await;
    eventually("fresh after the resync", 10, || {
        feed.status(system_now()) == FeedStatus::Fresh
    })
    .await;
    assert!(
        feed.contains("away", system_now()),
        "control: the index's ids arrive"
    );
    assert!(
        !RevocationCheck::is_revoked(&feed, "live", &task(3)),
        "control: never revoked"
    );
    assert!(
        RevocationCheck::is_revoked(&feed, "lost", &task(1)),
        "an id the index lost came back"
    );
}

/// A verifier follows Redis with the read-only ACL user the deployment
/// guide documents: it resyncs, follows revocations and the gap check, and
/// cannot remove an id from the index nor forge a stream entry. A
/// follower whose user may write (the brokers' `+@all` user) says so
/// (`can_write`), warned about once at its start: whoever controls such a
/// verifier could un-revoke credentials for the others.
#[tokio::test]
async fn a_verifier_follows_with_a_read_only_user_that_cannot_un_revoke() {
    let srv = RedisServer::start();
    let store = RedisStore::connect(&srv.url(), "bt").await.unwrap();
    store.seed(&[], system_now()).await.unwrap();
    // As deploy/README.md's "ACL user" documents it for verifiers.
    acl(
        &store,
        &[
            "SETUSER",
            "verifier",
            "on",
            ">r3ad",
            "~{bt}:*",
            "resetchannels",
            "-@all",
            "+get",
            "+exists",
            "+xread",
            "+xrange",
            "+xrevrange",
            "+xinfo|stream",
            "+zrangebyscore",
            "+multi",
            "+exec",
            "+client|setname",
            "+ping",
            "+hello",
        ],
    )
    .await;
    acl(
        &store,
        &["SETUSER", "writer", "on", ">wr1te", "~{bt}:*", "+@all"],
    )
    .await;
    let url = |user: &str, pw: &str| format!("redis://{user}:{pw}@127.0.0.1:{}/", srv.port);
    let feed = RevocationFeed::spawn(&url("verifier", "r3ad"), "bt", opts()).unwrap();
    let loose = RevocationFeed::spawn(&url("writer", "wr1te"), "bt", opts()).unwrap();
    let now = system_now();
    store
        .register(&rec("gone", Some(task(1)), "agent/a", None, now + 600), now)
        .await
        .unwrap();
    store
        .revoke(&Target::Credential("gone".into()), "test", now)
        .await
        .unwrap();
    eventually("both follow the revocation", 10, || {
        [&feed, &loose].iter().all(|f| {
            f.status(system_now()) == FeedStatus::Fresh && f.contains("gone", system_now())
        })
    })
    .await;
    assert_eq!(feed.can_write(), Some(false));
    assert_eq!(loose.can_write(), Some(true), "a writable user is seen");
    // The read-only user cannot take the id out nor forge an entry.
    let ro = RedisStore::connect(&url("verifier", "r3ad"), "bt")
        .await
        .unwrap();
    for cmd in [
        redis::cmd("ZREM")
            .arg("{bt}:revoked-index")
            .arg("gone")
            .clone(),
        redis::cmd("XADD")
            .arg("{bt}:revocations:v2")
            .arg("*")
            .arg("t")
            .arg("hb")
            .clone(),
    ] {
        let e = ro.raw(&cmd).await.unwrap_err();
        assert!(e.to_string().to_lowercase().contains("noperm"), "{e}");
    }
    assert!(RevocationCheck::is_revoked(&feed, "gone", &task(1)));
}
