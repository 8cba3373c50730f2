//! `PostgresEngine` against a real, private PostgreSQL cluster per test.
//!
//! Each test runs `initdb` into a temporary directory and starts `postgres`
//! listening only on a Unix socket inside it (never the machine's own
//! server). Binaries come from `BATON_TEST_PG_BINDIR`, `pg_config --bindir`
//! or `/usr/lib/postgresql/<version>/bin`; without them the tests FAIL (CI
//! installs PostgreSQL). Run as root, the cluster runs as the `postgres`
//! system user through `setpriv`, since PostgreSQL refuses to run as root.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::time::{SystemTime, UNIX_EPOCH};

use baton_core::{Permission, Scope, SpiffeId, TaskId};
use baton_secrets::{
    Lease, LeaseRequest, PgTemplate, PostgresEngine, SecretEngine, SecretError, SecretMaterial,
};
use tokio_postgres::Client;

#[path = "../src/testing.rs"]
mod testing;
use testing::*;

fn wall() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn request(scope: &[&str], expires_at: u64) -> LeaseRequest {
    LeaseRequest {
        task: TaskId::from_random([9; 16]),
        agent: SpiffeId::parse("spiffe://example.org/agent/researcher").unwrap(),
        scope: Scope::parse(scope).unwrap(),
        expires_at,
    }
}

/// A `crm` database with a granted `customers` table and an ungranted `payroll`.
async fn setup(pg: &Pg) -> PostgresEngine {
    pg.admin("postgres")
        .await
        .batch_execute("CREATE DATABASE crm")
        .await
        .unwrap();
    pg.admin("crm")
        .await
        .batch_execute(
            "CREATE TABLE customers (id int PRIMARY KEY, name text);
             INSERT INTO customers VALUES (1, 'Ada'), (2, 'Grace');
             CREATE TABLE payroll (id int, salary int);
             INSERT INTO payroll VALUES (1, 100);",
        )
        .await
        .unwrap();
    PostgresEngine::new(
        &pg.admin_conn("postgres"),
        PgTemplate {
            database: "crm".into(),
            grants: vec!["GRANT SELECT ON public.customers TO {role}".into()],
            role_prefix: "baton_".into(),
        },
        Permission::parse("dataset:crm:read").unwrap(),
    )
    .await
    .unwrap()
}

fn lease_conn(lease: &Lease) -> String {
    let SecretMaterial::Postgres {
        host,
        port,
        dbname,
        username,
        password,
    } = &lease.secret
    else {
        panic!("not a postgres lease");
    };
    format!(
        "host={host} port={port} dbname={dbname} user={username} password={}",
        password.expose()
    )
}

fn password_of(lease: &Lease) -> String {
    match &lease.secret {
        SecretMaterial::Postgres { password, .. } => password.expose().to_owned(),
        SecretMaterial::ApiKey { .. } => panic!("not a postgres lease"),
    }
}

fn role_of(lease: &Lease) -> String {
    match &lease.secret {
        SecretMaterial::Postgres { username, .. } => username.clone(),
        SecretMaterial::ApiKey { .. } => panic!("not a postgres lease"),
    }
}

fn is_permission_denied(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
}

async fn role_exists(admin: &Client, role: &str) -> bool {
    admin
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .unwrap()
        .is_some()
}

#[tokio::test]
async fn lease_reads_granted_table_only() {
    let pg = Pg::start().await;
    let engine = setup(&pg).await;
    let now = wall();
    let lease = engine
        .issue(&request(&["dataset:crm:read"], now + 600), now)
        .await
        .unwrap();
    assert!(lease.id.starts_with("lease-"));
    assert_eq!(lease.engine, "postgres.crm");
    let password = password_of(&lease);
    assert!(password.len() >= 32);
    assert!(role_of(&lease).starts_with("baton_"));
    let debug = format!("{lease:?}");
    assert!(!debug.contains(&password), "{debug}");

    let c = connect(&lease_conn(&lease)).await.unwrap();
    let n: i64 = c
        .query_one("SELECT count(*) FROM customers", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 2);
    for sql in [
        "INSERT INTO customers VALUES (3, 'Eve')",
        "DELETE FROM customers",
        "UPDATE customers SET name = 'x'",
        "SELECT * FROM payroll",
        "SELECT * FROM baton_admin.baton_leases",
        "CREATE TABLE mine (x int)",
    ] {
        let err = c.batch_execute(sql).await.unwrap_err();
        assert!(is_permission_denied(&err), "{sql}: {err}");
    }

    // The password is checked, and only a SCRAM verifier reaches the server.
    let wrong = lease_conn(&lease).replace(&password, "not-the-password");
    assert!(connect(&wrong).await.is_err());
    let admin = pg.admin("crm").await;
    let stored: String = admin
        .query_one(
            "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
            &[&role_of(&lease)],
        )
        .await
        .unwrap()
        .get(0);
    assert!(stored.starts_with("SCRAM-SHA-256$"), "{stored}");
    assert!(!pg.log().contains(&password));
    let valid_until: i64 = admin
        .query_one(
            "SELECT extract(epoch FROM rolvaliduntil)::bigint FROM pg_roles WHERE rolname = $1",
            &[&role_of(&lease)],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(valid_until, i64::try_from(now + 600).unwrap());
}

#[tokio::test]
async fn revoke_refuses_logins_and_ends_open_sessions() {
    let pg = Pg::start().await;
    let engine = setup(&pg).await;
    let now = wall();
    let lease = engine
        .issue(&request(&["dataset:crm:*"], now + 600), now)
        .await
        .unwrap();
    let session = connect(&lease_conn(&lease)).await.unwrap();
    session
        .batch_execute("SELECT 1 FROM customers")
        .await
        .unwrap();

    engine.revoke(&lease.id).await.unwrap();

    assert!(
        session
            .batch_execute("SELECT 1 FROM customers")
            .await
            .is_err(),
        "open session survived the revoke"
    );
    assert!(connect(&lease_conn(&lease)).await.is_err());
    let admin = pg.admin("crm").await;
    assert!(!role_exists(&admin, &role_of(&lease)).await);
    let revoked: Option<i64> = admin
        .query_one(
            "SELECT revoked_at FROM baton_admin.baton_leases WHERE lease_id = $1",
            &[&lease.id],
        )
        .await
        .unwrap()
        .get(0);
    assert!(revoked.is_some());

    // Idempotent; unknown ids are named as such.
    engine.revoke(&lease.id).await.unwrap();
    assert!(matches!(
        engine.revoke("lease-unknown").await,
        Err(SecretError::UnknownLease(_))
    ));
    assert!(engine.sweep(now + 10_000).await.unwrap().is_empty());
}

/// One lease's session keeps a transaction open that granted another
/// lease's role default privileges (any role may): the other's drop needs
/// a lock that transaction holds. The revocation still ends in bounded
/// time (the blocking session is ended), the engine serves the next call,
/// and the blocking lease is revoked in its turn. The control: the same
/// grant committed at once does not stand in the way.
#[tokio::test]
async fn a_session_holding_a_lock_on_another_leases_role_does_not_wedge_revocation() {
    use std::time::Duration;
    let pg = Pg::start().await;
    let engine = setup(&pg).await;
    async fn lease(engine: &PostgresEngine) -> Lease {
        let now = wall();
        let req = request(&["dataset:crm:*"], now + 600);
        engine.issue(&req, now).await.unwrap()
    }
    let admin = pg.admin("crm").await;
    // Two leases; the second's session grants the first's role default
    // privileges, in a transaction left `open` or committed at once; then
    // the first is revoked (bounded by `limit`).
    async fn grant_then_revoke(
        engine: &PostgresEngine,
        open: bool,
        limit: Duration,
    ) -> (Lease, Lease, tokio_postgres::Client) {
        let (first, second) = (lease(engine).await, lease(engine).await);
        let session = connect(&lease_conn(&second)).await.unwrap();
        session
            .batch_execute(&format!(
                "{}ALTER DEFAULT PRIVILEGES GRANT SELECT ON TABLES TO \"{}\"",
                if open { "BEGIN; " } else { "" },
                role_of(&first)
            ))
            .await
            .unwrap();
        tokio::time::timeout(limit, engine.revoke(&first.id))
            .await
            .expect("the revocation ends")
            .unwrap();
        (first, second, session)
    }
    // Control: committed at once, nothing is held.
    let (c1, c2, _) = grant_then_revoke(&engine, false, Duration::from_secs(60)).await;
    assert!(!role_exists(&admin, &role_of(&c1)).await);
    // The attack: the same grant in a transaction left open.
    let (l1, l2, s2) = grant_then_revoke(&engine, true, Duration::from_secs(120)).await;
    assert!(!role_exists(&admin, &role_of(&l1)).await);
    assert!(
        s2.batch_execute("SELECT 1").await.is_err(),
        "the blocking session was ended"
    );
    // The engine is free: a new lease, and the blocking lease's own
    // revocation.
    let l3 = tokio::time::timeout(Duration::from_secs(60), lease(&engine))
        .await
        .expect("the engine serves the next call");
    engine.revoke(&l2.id).await.unwrap();
    engine.revoke(&l3.id).await.unwrap();
    engine.revoke(&c2.id).await.unwrap();
    assert!(!role_exists(&admin, &role_of(&l2)).await);
}

#[tokio::test]
async fn sweep_reaps_expired_leases_after_a_restart() {
    let pg = Pg::start().await;
    let engine = setup(&pg).await;
    let now = wall();
    // Its end already passed (issued "at" now - 100 for 90 s): the server
    // refuses its logins on its own (VALID UNTIL), and nobody revokes it.
    let expired = engine
        .issue(&request(&["dataset:crm:read"], now - 10), now - 100)
        .await
        .unwrap();
    assert!(connect(&lease_conn(&expired)).await.is_err());
    let live = engine
        .issue(&request(&["dataset:crm:read"], now + 600), now)
        .await
        .unwrap();
    let session = connect(&lease_conn(&live)).await.unwrap();

    // A new engine (Baton restarted) finds the leases in the database.
    drop(engine);
    let engine = setup_again(&pg).await;
    assert_eq!(engine.sweep(now).await.unwrap(), vec![expired.id.clone()]);
    let admin = pg.admin("crm").await;
    assert!(!role_exists(&admin, &role_of(&expired)).await);
    assert!(role_exists(&admin, &role_of(&live)).await);
    session
        .batch_execute("SELECT 1 FROM customers")
        .await
        .unwrap();
    assert!(engine.sweep(now).await.unwrap().is_empty());

    // Past the live lease's end its open session is ended too.
    assert_eq!(
        engine.sweep(now + 600).await.unwrap(),
        vec![live.id.clone()]
    );
    assert!(session.batch_execute("SELECT 1").await.is_err());
    assert!(!role_exists(&admin, &role_of(&live)).await);
}

async fn setup_again(pg: &Pg) -> PostgresEngine {
    PostgresEngine::new(
        &pg.admin_conn("postgres"),
        PgTemplate {
            database: "crm".into(),
            grants: vec!["GRANT SELECT ON public.customers TO {role}".into()],
            role_prefix: "baton_".into(),
        },
        Permission::parse("dataset:crm:read").unwrap(),
    )
    .await
    .unwrap()
}

#[tokio::test]
async fn refused_without_permission_creates_nothing() {
    let pg = Pg::start().await;
    let engine = setup(&pg).await;
    let now = wall();
    let err = engine
        .issue(
            &request(&["dataset:hr:read", "tool:crm.search:read"], now + 600),
            now,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, SecretError::MissingPermission { .. }));
    assert!(
        err.to_string()
            .contains("lacks permission dataset:crm:read"),
        "{err}"
    );
    let err = engine
        .issue(&request(&["dataset:crm:read"], now), now)
        .await
        .unwrap_err();
    assert!(matches!(err, SecretError::AlreadyExpired { .. }), "{err}");

    let admin = pg.admin("crm").await;
    let roles: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'baton\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    let leases: i64 = admin
        .query_one("SELECT count(*) FROM baton_admin.baton_leases", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!((roles, leases), (0, 0));
}

#[tokio::test]
async fn a_failing_grant_leaves_no_role_behind() {
    let pg = Pg::start().await;
    setup(&pg).await;
    let engine = PostgresEngine::new(
        &pg.admin_conn("crm"),
        PgTemplate {
            database: "crm".into(),
            grants: vec!["GRANT SELECT ON public.no_such_table TO {role}".into()],
            role_prefix: "baton_".into(),
        },
        Permission::parse("dataset:crm:read").unwrap(),
    )
    .await
    .unwrap();
    let now = wall();
    let err = engine
        .issue(&request(&["dataset:crm:read"], now + 60), now)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("no_such_table"), "{err}");
    let admin = pg.admin("crm").await;
    let roles: i64 = admin
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'baton\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(roles, 0);
    // The engine recovers: its connection is still usable.
    assert!(engine.sweep(now).await.unwrap().is_empty());
}

/// A lease whose role cannot be dropped (it owns an object in another
/// database, which any login may make: a large object needs no privilege)
/// is retried with a growing wait, not at every sweep: each retry is a
/// handful of round trips under the engine's one lock, so thousands of
/// them would hold up every lease and every revocation. The control: an
/// expired lease beside it is reaped at the first sweep, and the stuck one
/// is tried again once its wait is over.
#[tokio::test]
async fn a_lease_that_cannot_be_dropped_is_retried_with_a_growing_wait() {
    let pg = Pg::start().await;
    let engine = setup(&pg).await;
    let now = wall();
    let stuck = engine
        .issue(&request(&["dataset:crm:read"], now + 60), now)
        .await
        .unwrap();
    let plain = engine
        .issue(&request(&["dataset:crm:read"], now + 60), now)
        .await
        .unwrap();
    let elsewhere = connect(&lease_conn(&stuck).replace("dbname=crm", "dbname=postgres"))
        .await
        .unwrap();
    elsewhere
        .batch_execute("SELECT lo_create(0)")
        .await
        .unwrap();
    drop(elsewhere);

    let after = now + 61;
    let Err(SecretError::Sweep { reaped, failed }) = engine.sweep(after).await else {
        panic!("the stuck lease was dropped");
    };
    assert_eq!(reaped, vec![plain.id.clone()], "control");
    assert_eq!(
        failed.iter().map(|(id, _)| id.as_str()).collect::<Vec<_>>(),
        [stuck.id.as_str()]
    );
    // Not retried by the next sweeps within its wait.
    assert_eq!(engine.sweep(after).await.unwrap(), Vec::<String>::new());
    assert_eq!(
        engine
            .sweep(after + baton_secrets::SWEEP_RETRY_FIRST - 1)
            .await
            .unwrap(),
        Vec::<String>::new()
    );
    // Once the wait is over it is tried again (and still cannot be dropped:
    // it waits twice as long next time).
    let Err(SecretError::Sweep { failed, .. }) =
        engine.sweep(after + baton_secrets::SWEEP_RETRY_FIRST).await
    else {
        panic!("not retried after its wait");
    };
    assert_eq!(failed.len(), 1);
    assert_eq!(
        engine
            .sweep(after + 2 * baton_secrets::SWEEP_RETRY_FIRST)
            .await
            .unwrap(),
        Vec::<String>::new()
    );
    let admin = pg.admin("crm").await;
    assert!(!role_exists(&admin, &role_of(&plain)).await);
}
