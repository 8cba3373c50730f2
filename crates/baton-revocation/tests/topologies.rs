//! The store and the feed in every connection mode, against real servers:
//! TLS (server-verified and mutual) with certificates made here, ACL
//! users, a three-primary Redis Cluster and a primary found through
//! Sentinel.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::time::Duration;

use baton_revocation::{
    FeedHandle, FeedOptions, FeedStatus, RedisConfig, RedisMode, RedisPassword, RedisStore,
    RedisTls, RevocationError, RevocationFeed, RevocationStore, Target, system_now,
};
use common::topology::{RedisCluster, Sentinel, TlsFiles, TlsRedis};
use common::{RedisServer, eventually, rec, task};

fn opts() -> FeedOptions {
    FeedOptions {
        stale_after: Duration::from_secs(2),
        heartbeat_every: Duration::from_millis(200),
        ..FeedOptions::default()
    }
}

fn with_mode(mode: RedisMode) -> RedisConfig {
    RedisConfig {
        mode,
        ..RedisConfig::standalone("", "bt")
    }
}

fn tls_config(url: String, tls: RedisTls) -> RedisConfig {
    RedisConfig {
        tls,
        ..RedisConfig::standalone(url, "bt")
    }
}

fn ca_only(files: &TlsFiles) -> RedisTls {
    RedisTls {
        ca_file: Some(files.ca.clone()),
        ..RedisTls::default()
    }
}

fn mutual(files: &TlsFiles) -> RedisTls {
    RedisTls {
        ca_file: Some(files.ca.clone()),
        client_cert: Some(files.client_cert.clone()),
        client_key: Some(files.client_key.clone()),
    }
}

/// Seeds, starts a follower, registers a small tree in one task (a root,
/// a child minted from it, a grandchild, and an unrelated credential),
/// revokes the task and checks the store and the follower agree.
async fn exercise(config: &RedisConfig) -> (RedisStore, FeedHandle) {
    let store = RedisStore::open(config).await.unwrap();
    let now = system_now();
    store.seed(&[], now).await.unwrap();
    let feed = RevocationFeed::spawn_with(config, opts()).unwrap();
    eventually("first resync", 10, || {
        feed.status(system_now()) == FeedStatus::Fresh
    })
    .await;
    store
        .register(&rec("root", Some(task(1)), "agent/a", None, now + 600), now)
        .await
        .unwrap();
    store
        .register(
            &rec("child", Some(task(2)), "agent/b", Some("root"), now + 600),
            now,
        )
        .await
        .unwrap();
    store
        .register(
            &rec("grandchild", None, "agent/c", Some("child"), now + 300),
            now,
        )
        .await
        .unwrap();
    store
        .register(
            &rec("other", Some(task(3)), "agent/d", None, now + 600),
            now,
        )
        .await
        .unwrap();
    // Task 1 holds only the root; the cascade follows parent links.
    let revoked = store
        .revoke(&Target::Task(task(1)), "ended", now)
        .await
        .unwrap();
    let mut ids: Vec<_> = revoked.iter().map(|r| r.id.as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["child", "grandchild", "root"]);
    for id in ["root", "child", "grandchild"] {
        assert!(store.is_revoked(id, now).await.unwrap(), "{id}");
    }
    assert!(!store.is_revoked("other", now).await.unwrap());
    // The task tombstone refuses late registrations in the task.
    let e = store
        .register(&rec("late", Some(task(1)), "agent/a", None, now + 60), now)
        .await
        .unwrap_err();
    assert!(matches!(e, RevocationError::TaskRevoked { .. }), "{e:?}");
    eventually("follower sees the cascade", 10, || {
        let now = system_now();
        feed.contains("root", now)
            && feed.contains("child", now)
            && feed.contains("grandchild", now)
    })
    .await;
    assert!(!feed.contains("other", system_now()));
    // A later single revocation arrives too.
    store
        .revoke(&Target::Credential("other".into()), "leak", now)
        .await
        .unwrap();
    eventually("follower sees the second revocation", 10, || {
        feed.contains("other", system_now())
    })
    .await;
    assert_eq!(store.revoked(now).await.unwrap().len(), 4);
    (store, feed)
}

#[tokio::test]
async fn tls_with_private_ca() {
    let files = TlsFiles::new();
    let srv = TlsRedis::start(&files, "optional", &[]);
    exercise(&tls_config(srv.url(""), ca_only(&files))).await;
}

#[tokio::test]
async fn tls_refuses_a_server_the_ca_did_not_sign() {
    let files = TlsFiles::new();
    let srv = TlsRedis::start(&files, "optional", &[]);
    let wrong = RedisTls {
        ca_file: Some(files.other_ca.clone()),
        ..RedisTls::default()
    };
    let e = RedisStore::open(&tls_config(srv.url("u:pw-not-shown@"), wrong))
        .await
        .unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, RevocationError::Connect { .. }), "{e:?}");
    assert!(
        msg.contains("certificate") && !msg.contains("pw-not-shown"),
        "{msg}"
    );
    // Without --redis-ca the system roots apply, which do not hold the
    // private CA either.
    let e = RedisStore::open(&tls_config(srv.url(""), RedisTls::default()))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");
}

#[tokio::test]
async fn mutual_tls() {
    let files = TlsFiles::new();
    let srv = TlsRedis::start(&files, "yes", &[]);
    let e = RedisStore::open(&tls_config(srv.url(""), ca_only(&files)))
        .await
        .unwrap_err();
    assert!(matches!(e, RevocationError::Connect { .. }), "{e:?}");
    exercise(&tls_config(srv.url(""), mutual(&files))).await;
}

#[tokio::test]
async fn tls_files_are_checked_before_connecting() {
    let files = TlsFiles::new();
    // A key where a certificate belongs.
    let bad = RedisTls {
        ca_file: Some(files.server_key.clone()),
        ..RedisTls::default()
    };
    let e = RedisStore::open(&tls_config("rediss://127.0.0.1:1".into(), bad))
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            RevocationError::Config {
                option: "--redis-ca",
                ..
            }
        ),
        "{e:?}"
    );
    let missing = RedisTls {
        client_key: Some(files.dir.path().join("absent.key")),
        ..mutual(&files)
    };
    let e = RevocationFeed::spawn_with(&tls_config("rediss://127.0.0.1:1".into(), missing), opts())
        .unwrap_err();
    assert!(
        matches!(
            e,
            RevocationError::Config {
                option: "--redis-client-key",
                ..
            }
        ),
        "{e:?}"
    );
}

/// An ACL user limited to the prefix's keys: every key the scripts and the
/// feed touch is `{bt}:…`.
const ACL_USER: [&str; 7] = [
    "--user",
    "baton",
    "on",
    ">s3cret-acl",
    "~{bt}:*",
    "+@all",
    "-@dangerous",
];

#[tokio::test]
async fn acl_user_over_tls() {
    let files = TlsFiles::new();
    let srv = TlsRedis::start(&files, "optional", &ACL_USER);
    // Credentials in the URL.
    exercise(&tls_config(srv.url("baton:s3cret-acl@"), ca_only(&files))).await;
    // Or given apart (--redis-username, --redis-password-file), overriding the URL's.
    let cfg = RedisConfig {
        username: Some("baton".into()),
        password: Some(RedisPassword::new("s3cret-acl")),
        ..tls_config(srv.url("someone:else@"), ca_only(&files))
    };
    RedisStore::open(&cfg).await.unwrap();
    let wrong = RedisConfig {
        password: Some(RedisPassword::new("wrong-guess")),
        ..cfg
    };
    let e = RedisStore::open(&wrong).await.unwrap_err();
    let msg = e.to_string();
    assert!(matches!(e, RevocationError::Connect { .. }), "{e:?}");
    assert!(
        msg.contains("authentication failed")
            && !msg.contains("wrong-guess")
            && !msg.contains("s3cret"),
        "{msg}"
    );
    assert!(!format!("{wrong:?} {wrong}").contains("wrong-guess"));
}

#[tokio::test]
async fn acl_user_plain() {
    let srv = RedisServer::start_with(&ACL_USER);
    let url = format!("redis://baton:s3cret-acl@127.0.0.1:{}/", srv.port);
    exercise(&RedisConfig::standalone(url, "bt")).await;
    // Keys outside the prefix are refused to this user.
    let other = format!("redis://baton:s3cret-acl@127.0.0.1:{}/", srv.port);
    let e = RedisStore::connect(&other, "elsewhere")
        .await
        .unwrap()
        .health()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("no permissions"), "{e}");
}

#[tokio::test]
async fn cluster() {
    let c = RedisCluster::start();
    // One seed node is enough: the client discovers the rest.
    let config = with_mode(RedisMode::Cluster {
        urls: vec![c.urls()[1].clone()],
    });
    let (store, _feed) = exercise(&config).await;
    // Every key sits on the node of the `{bt}` slot.
    let owner = c.owner_of("{bt}:epoch");
    let keys: u64 = c.ports.iter().map(|&p| c.dbsize(p)).sum();
    assert!(keys > 5, "{keys}");
    assert_eq!(c.dbsize(owner), keys);
    assert_eq!(store.stream_key(), "{bt}:revocations:v2");
    // All nodes as seeds work the same.
    let all = with_mode(RedisMode::Cluster { urls: c.urls() });
    let again = RedisStore::open(&all).await.unwrap();
    assert!(again.is_revoked("grandchild", system_now()).await.unwrap());
}

#[tokio::test]
async fn sentinel() {
    let s = Sentinel::start();
    let config = with_mode(RedisMode::Sentinel {
        urls: vec![s.url()],
        master: s.master.to_owned(),
    });
    exercise(&config).await;
    // The data is on the primary the sentinel named.
    let direct = RedisStore::connect(&s.primary.url(), "bt").await.unwrap();
    assert!(direct.is_revoked("root", system_now()).await.unwrap());
    let unknown = with_mode(RedisMode::Sentinel {
        urls: vec![s.url()],
        master: "nosuchmaster".into(),
    });
    let e = RedisStore::open(&unknown).await.unwrap_err();
    assert!(matches!(e, RevocationError::Connect { .. }), "{e:?}");
}
