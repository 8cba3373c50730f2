//! JIT secrets per task through the broker: a PostgreSQL login leased to a
//! task's agent reads only what its template grants, dies (sessions
//! included) when the task ends, and is reaped at expiry by the sweep with
//! no notification; a task without the permission gets nothing; API keys
//! are introspected live, then inactive after task end.
//!
//! The PostgreSQL cluster is private to the test: `initdb` into a temporary
//! directory, listening only on a Unix socket inside it (never the machine's
//! own server). Binaries come from `BATON_TEST_PG_BINDIR`, `pg_config
//! --bindir` or `/usr/lib/postgresql/<version>/bin`; without them the test
//! FAILS. Run as root, the cluster runs as the `postgres` system user
//! through `setpriv`, since PostgreSQL refuses to run as root.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio_postgres::Client;

use crate::delegation::{PLANNER, World};
use crate::harness::time_for_people;

use baton_secrets::testing::{Pg, connect};

/// The World of the delegation tests, with extra `baton broker` arguments.
fn world_with_broker_args(args: Vec<String>) -> World {
    World::start_with_args(None, args)
}

/// The broker's flags for the `postgres.crm` engine on `pg`: leases that
/// read `public.customers` of database `crm`.
fn crm_engine_args(pg: &Pg) -> Vec<String> {
    vec![
        "--pg-admin-url".into(),
        pg.admin_conn("postgres"),
        "--pg-database".into(),
        "crm".into(),
        "--pg-grant".into(),
        "GRANT SELECT ON public.customers TO {role}".into(),
        "--pg-host".into(),
        pg.sock(),
        "--pg-port".into(),
        pg.port.to_string(),
    ]
}

/// A task with `scope` whose root agent (the planner) redeemed its grant.
pub(crate) fn task_with(w: &World, scope: &[&str], ttl: &str, tag: &str) -> (String, PathBuf) {
    let (task, grant) = w.start_task(scope, "1", ttl, "read");
    let cred = w.redeem(&grant, PLANNER, tag);
    (task, cred)
}

pub(crate) fn lease(w: &World, cred: &Path, engine: &str) -> serde_json::Value {
    w.json(&[
        "secret",
        "lease",
        "--credential",
        cred.to_str().unwrap(),
        "--engine",
        engine,
        "-o",
        "json",
    ])
}

fn login_conn(lease: &serde_json::Value) -> String {
    let m = &lease["material"];
    format!(
        "host={} port={} dbname={} user={} password={}",
        m["host"].as_str().unwrap(),
        m["port"].as_u64().unwrap(),
        m["dbname"].as_str().unwrap(),
        m["username"].as_str().unwrap(),
        m["password"].as_str().unwrap()
    )
}

async fn role_exists(admin: &Client, role: &str) -> bool {
    admin
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await
        .unwrap()
        .is_some()
}

async fn leased_roles(admin: &Client) -> i64 {
    admin
        .query_one(
            "SELECT count(*) FROM pg_roles WHERE rolname LIKE 'baton\\_%'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

fn is_permission_denied(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::INSUFFICIENT_PRIVILEGE)
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_lease_is_scoped_and_dies_with_the_task_or_at_expiry() {
    let pg = Pg::start().await;
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
    let admin = pg.admin("crm").await;
    let mut args = crm_engine_args(&pg);
    args.extend(["--secret-sweep-interval".into(), "1s".into()]);
    let w = world_with_broker_args(args);

    // Without the permission: refused, naming it, and no role is created.
    let before = leased_roles(&admin).await;
    let (_t0, nope) = task_with(&w, &["tool:crm.search:read"], "10m", "nope");
    let err = w.refused(&[
        "secret",
        "lease",
        "--credential",
        nope.to_str().unwrap(),
        "--engine",
        "postgres.crm",
    ]);
    assert!(err.contains("missing_permission"), "{err}");
    assert!(err.contains("dataset:crm:read"), "{err}");
    assert_eq!(leased_roles(&admin).await, before, "no role for a refusal");
    // An unknown engine is refused, naming the field.
    let err = w.refused(&[
        "secret",
        "lease",
        "--credential",
        nope.to_str().unwrap(),
        "--engine",
        "postgres.nope",
    ]);
    assert!(err.contains("engine"), "{err}");

    // With it: a login that reads the granted table only.
    let (task, cred) = task_with(&w, &["dataset:crm:read"], "10m", "reader");
    let l = lease(&w, &cred, "postgres.crm");
    assert_eq!(l["engine"], "postgres.crm");
    assert!(l["lease_id"].as_str().unwrap().starts_with("lease-"));
    let token_exp = crate::delegation::claims(&cred)["exp"].as_u64().unwrap();
    assert_eq!(l["expires_at"].as_u64().unwrap(), token_exp, "{l}");
    let role = l["material"]["username"].as_str().unwrap().to_owned();
    let session = connect(&login_conn(&l)).await.expect("leased login works");
    let rows = session
        .query("SELECT name FROM customers ORDER BY id", &[])
        .await
        .unwrap();
    assert_eq!(rows.len(), 2);
    let e = session
        .query("SELECT * FROM payroll", &[])
        .await
        .unwrap_err();
    assert!(is_permission_denied(&e), "{e:?}");
    let e = session
        .execute("INSERT INTO customers VALUES (3, 'Eve')", &[])
        .await
        .unwrap_err();
    assert!(is_permission_denied(&e), "{e:?}");

    // The lease is in the audit trace, under the planner.
    let trace = w.json(&["audit", "trace", &task, "--json"]).to_string();
    assert!(
        trace.contains("secret.lease") && trace.contains("postgres.crm"),
        "{trace}"
    );

    // Task end: no new login, and the open session is terminated.
    w.ok(&["task", "end", &task]);
    let conn = login_conn(&l);
    wait_until("new logins refused", Duration::from_secs(60), || {
        let conn = conn.clone();
        async move { connect(&conn).await.is_err() }
    })
    .await;
    wait_until(
        "the open session terminated",
        Duration::from_secs(60),
        || {
            let s = &session;
            async move { s.simple_query("SELECT 1").await.is_err() }
        },
    )
    .await;
    wait_until("the role dropped", Duration::from_secs(60), || {
        let (a, r) = (&admin, role.clone());
        async move { !role_exists(a, &r).await }
    })
    .await;

    // Expiry with no revocation: the sweep reaps it.
    let (_t2, short) = task_with(&w, &["dataset:crm:read"], "20s", "short");
    let l2 = lease(&w, &short, "postgres.crm");
    let role2 = l2["material"]["username"].as_str().unwrap().to_owned();
    assert!(role_exists(&admin, &role2).await);
    connect(&login_conn(&l2))
        .await
        .expect("short lease logs in");
    wait_until(
        "the expired lease reaped by the sweep",
        Duration::from_secs(60),
        || {
            let (a, r) = (&admin, role2.clone());
            async move { !role_exists(a, &r).await }
        },
    )
    .await;
    assert!(connect(&login_conn(&l2)).await.is_err());
    // The sweep logs once it has dropped the role: poll for the line.
    let broker = w.c.broker.as_ref().unwrap();
    wait_until("the sweep logged", Duration::from_secs(60), || {
        let log = broker.log_text();
        async move { log.contains("expired secret leases reaped") }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_is_introspected_live_then_inactive_after_task_end() {
    let w = world_with_broker_args(vec!["--secret-sweep-interval".into(), "1s".into()]);
    // A tool server's identity for introspection: another task's credential.
    let (_t, tool) = task_with(&w, &["tool:crm.search:read"], "10m", "tool-id");
    let (task, cred) = task_with(&w, &["secret:apikey:issue"], "10m", "keyholder");
    let l = lease(&w, &cred, "apikey");
    let key = l["material"]["key"].as_str().unwrap().to_owned();
    assert!(key.starts_with("bk_"), "{l}");
    let introspect = |key: &str| {
        w.json(&[
            "secret",
            "introspect",
            "--credential",
            tool.to_str().unwrap(),
            "--key",
            key,
            "-o",
            "json",
        ])
    };
    let live = introspect(&key);
    assert_eq!(live["active"], true, "{live}");
    // For people: the lease's and the key's expiry as RFC 3339, the same
    // instant as the JSON's unix seconds.
    let expires = l["expires_at"].as_u64().unwrap();
    let human = w.ok(&[
        "secret",
        "lease",
        "--credential",
        cred.to_str().unwrap(),
        "--engine",
        "apikey",
    ]);
    assert_eq!(time_for_people(&human, "Expires:"), expires, "{human}");
    let introspect_args = [
        "secret",
        "introspect",
        "--credential",
        tool.to_str().unwrap(),
        "--key",
        &key,
    ];
    let human = w.ok(&introspect_args);
    assert_eq!(time_for_people(&human, "Expires:"), expires, "{human}");
    assert!(!human.contains(&expires.to_string()), "{human}");
    assert_eq!(live["task_id"], task.as_str());
    assert_eq!(live["agent"], PLANNER);
    assert_eq!(introspect("bk_not-a-key")["active"], false);

    // Without the permission: refused.
    let err = w.refused(&[
        "secret",
        "lease",
        "--credential",
        tool.to_str().unwrap(),
        "--engine",
        "apikey",
    ]);
    assert!(
        err.contains("missing_permission") && err.contains("secret:apikey:issue"),
        "{err}"
    );

    // A holder's task certificate revoked by serial: its token can no
    // longer be used (bound to it; a renewal needs it live), so the key
    // leased with that token dies with it. The first task's key, leased
    // by another token, is the control.
    let (_t2, cred2) = task_with(&w, &["secret:apikey:issue"], "10m", "keyholder-2");
    let key2 = lease(&w, &cred2, "apikey")["material"]["key"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(introspect(&key2)["active"], true);
    let serial2 = crate::hardening::serial_of(&cred2);
    let revoked = w.json(&[
        "revoke",
        "credential",
        &serial2,
        "--reason",
        "holder's key leaked",
        "-o",
        "json",
    ]);
    let kinds: Vec<&str> = revoked["revoked"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["kind"].as_str().unwrap())
        .collect();
    assert!(kinds.contains(&"lease"), "{revoked}");
    let gone = introspect(&key2);
    assert_eq!(gone["active"], false, "{gone}");
    assert_eq!(introspect(&key)["active"], true, "the other token's key");

    w.ok(&["task", "end", &task]);
    let dead = introspect(&key);
    assert_eq!(dead["active"], false, "{dead}");
    assert!(dead.get("task_id").is_none(), "{dead}");

    // The introspecting server's SVID revoked: it learns nothing more of
    // any key (whether it is live, its task and scope).
    let serial = crate::hardening::serial_of(&tool);
    w.ok(&[
        "revoke",
        "credential",
        &serial,
        "--reason",
        "tool server retired",
    ]);
    let err = w.refused(&introspect_args);
    assert!(
        err.contains("certificate_revoked") && err.contains(&serial),
        "{err}"
    );
}

/// A PostgreSQL failure under the secret engine is counted in
/// `baton_store_errors_total{store="postgres"}` at the broker's ops
/// listener, the lease is refused with the engine named, nothing is left
/// half-made (no role), and leasing works again once PostgreSQL does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_failures_of_the_secret_engine_are_counted_and_leave_nothing_behind() {
    use crate::ops::{free_addr, scrape, value};
    const SERIES: &str = r#"baton_store_errors_total{store="postgres"}"#;

    let pg = Pg::start().await;
    pg.admin("postgres")
        .await
        .batch_execute("CREATE DATABASE crm")
        .await
        .unwrap();
    let admin = pg.admin("crm").await;
    admin
        .batch_execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let ops = free_addr();
    let mut args = crm_engine_args(&pg);
    args.extend(["--ops-listen".into(), ops.clone()]);
    let w = world_with_broker_args(args);
    let (_task, cred) = task_with(&w, &["dataset:crm:read"], "10m", "reader");

    // Control: a lease works and no PostgreSQL error is counted.
    let l = lease(&w, &cred, "postgres.crm");
    connect(&login_conn(&l)).await.expect("leased login works");
    assert_eq!(value(&scrape(&ops), SERIES), 0.0, "no error yet");
    let roles = leased_roles(&admin).await;

    // PostgreSQL refuses the engine's grant: the lease is refused, naming
    // the engine, the failure is counted, and no role is left behind.
    admin.batch_execute("DROP TABLE customers").await.unwrap();
    let out = w.run(&[
        "secret",
        "lease",
        "--credential",
        cred.to_str().unwrap(),
        "--engine",
        "postgres.crm",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "a lease without its table: {err}");
    assert!(err.contains("unavailable"), "{err}");
    // The client gets a correlation id, the operator's log the engine and
    // PostgreSQL's reason under it.
    let id = err
        .split("correlation id ")
        .nth(1)
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no correlation id: {err}"));
    let log = w.c.broker.as_ref().unwrap().log_text();
    let line = log
        .lines()
        .find(|l| l.contains(id))
        .unwrap_or_else(|| panic!("{id} not in the broker's log: {log}"));
    assert!(
        line.contains("postgres.crm") && line.contains("customers"),
        "{line}"
    );
    assert!(
        value(&scrape(&ops), SERIES) >= 1.0,
        "the failure is counted"
    );
    assert_eq!(leased_roles(&admin).await, roles, "no half-made role");

    // PostgreSQL back in order: leasing works again, the count stays.
    admin
        .batch_execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    let again = lease(&w, &cred, "postgres.crm");
    connect(&login_conn(&again))
        .await
        .expect("a lease after recovery logs in");
    let after = value(&scrape(&ops), SERIES);
    assert!(after >= 1.0, "{after}");
}

/// The secret engine's admin password can be kept in a file
/// (`--pg-admin-password-file`), out of the process list and the
/// configuration: the broker logs in with it (the cluster wants SCRAM from
/// every role but `postgres`), leases work, and the password is in neither
/// the broker's command line nor its log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_password_of_the_secret_engine_is_read_from_a_file() {
    const PASSWORD: &str = "adm1n-pw-from-a-file";
    let pg = Pg::start().await;
    let postgres = pg.admin("postgres").await;
    // One statement each: CREATE DATABASE cannot run in the implicit
    // transaction of a multi-statement batch.
    postgres.batch_execute("CREATE DATABASE crm").await.unwrap();
    postgres
        .batch_execute(&format!(
            "CREATE ROLE secadmin LOGIN SUPERUSER PASSWORD '{PASSWORD}'"
        ))
        .await
        .unwrap();
    pg.admin("crm")
        .await
        .batch_execute("CREATE TABLE customers (id int PRIMARY KEY, name text)")
        .await
        .unwrap();
    // Control: the role cannot log in without its password.
    let secadmin = format!(
        "host={} port={} user=secadmin dbname=crm",
        pg.sock(),
        pg.port
    );
    assert!(connect(&secadmin).await.is_err(), "SCRAM is required");

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pg-admin-password");
    std::fs::write(&file, format!("{PASSWORD}\n")).unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let mut args = crm_engine_args(&pg);
    args[1] = secadmin;
    args.extend([
        "--pg-admin-password-file".into(),
        file.to_str().unwrap().into(),
    ]);
    let w = world_with_broker_args(args);
    let (_task, cred) = task_with(&w, &["dataset:crm:read"], "10m", "reader");
    let l = lease(&w, &cred, "postgres.crm");
    let session = connect(&login_conn(&l)).await.expect("leased login works");
    session
        .query("SELECT name FROM customers", &[])
        .await
        .unwrap();

    let broker = w.c.broker.as_ref().unwrap();
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", broker.child.id())).unwrap();
    let cmdline = String::from_utf8_lossy(&cmdline);
    assert!(cmdline.contains("--pg-admin-password-file"), "{cmdline}");
    assert!(!cmdline.contains(PASSWORD), "{cmdline}");
    assert!(!broker.log_text().contains(PASSWORD));
}
