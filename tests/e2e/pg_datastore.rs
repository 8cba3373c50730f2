//! The broker's state in PostgreSQL (`baton broker --datastore`), on a
//! private cluster the test starts (`initdb` into a temporary directory).

use std::path::Path;
use std::time::Duration;

use baton_secrets::testing::Pg;

use crate::delegation::{World, claims};
use crate::harness::{baton, wait_for};
use crate::revocation::{chain, works};

fn cluster() -> (tokio::runtime::Runtime, Pg) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let pg = rt.block_on(Pg::start());
    (rt, pg)
}

fn count(rt: &tokio::runtime::Runtime, pg: &Pg, sql: &str, task: &str) -> i64 {
    rt.block_on(async {
        let c = pg.admin("baton").await;
        let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = if sql.contains("$1") {
            vec![&task]
        } else {
            vec![]
        };
        c.query_one(sql, &params).await.unwrap().get::<_, i64>(0)
    })
}

fn refused_revoked(w: &World, cred: &Path) -> bool {
    let out = w.call(cred, "crm.search");
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("revoked")
}

#[test]
fn the_broker_keeps_its_state_in_postgresql_across_a_restart() {
    let (rt, pg) = cluster();
    rt.block_on(async {
        pg.admin("postgres")
            .await
            .batch_execute("CREATE DATABASE baton")
            .await
            .unwrap();
    });
    let mut w = World::start_with_args(None, vec!["--datastore".into(), pg.admin_conn("baton")]);
    let (task, _planner, r1) = chain(&w, "pg1");
    let (_task2, _planner2, r2) = chain(&w, "pg2");
    wait_for(
        "the tool server takes a call",
        Duration::from_secs(60),
        || works(&w, &r1).then_some(()),
    );

    // Everything is in PostgreSQL; no SQLite datastore was written.
    assert!(!w.c.path("broker/broker.db").exists());
    assert_eq!(count(&rt, &pg, "SELECT COUNT(*) FROM nodes", ""), 1);
    assert_eq!(count(&rt, &pg, "SELECT COUNT(*) FROM entries", ""), 3);
    assert_eq!(count(&rt, &pg, "SELECT COUNT(*) FROM tasks", ""), 2);
    // The task's two grants (the start and the hop), and the planner's and
    // the researcher's token and certificate.
    assert_eq!(
        count(
            &rt,
            &pg,
            "SELECT COUNT(*) FROM credentials WHERE task = $1",
            &task
        ),
        6
    );
    assert_eq!(
        count(
            &rt,
            &pg,
            "SELECT COUNT(*) FROM join_tokens WHERE used_at IS NOT NULL",
            ""
        ),
        1
    );

    // A restart: the broker comes back with the same state.
    let addr = w.c.broker_addr.clone();
    w.c.broker.as_mut().unwrap().stop();
    w.c.start_broker(&addr, "1h");
    wait_for(
        "the restarted broker serves the tool server",
        Duration::from_secs(60),
        || works(&w, &r2).then_some(()),
    );
    let shown = w.json(&["task", "show", &task, "-o", "json"]).to_string();
    assert!(
        shown.contains(claims(&r1)["jti"].as_str().unwrap()),
        "{shown}"
    );

    // A credential issued before the restart is revoked after it, by the
    // registry in PostgreSQL, with its certificate.
    let jti = claims(&r1)["jti"].as_str().unwrap().to_owned();
    let out = w.ok(&["revoke", "credential", &jti, "--reason", "leaked"]);
    assert!(out.contains("revoked 2 "), "{out}");
    wait_for(
        "the revocation reaches the tool server",
        Duration::from_secs(60),
        || refused_revoked(&w, &r1).then_some(()),
    );
    assert!(
        count(
            &rt,
            &pg,
            "SELECT COUNT(*) FROM revocations WHERE id = $1",
            &jti
        ) == 1
    );
    assert!(count(&rt, &pg, "SELECT COUNT(*) FROM revocation_log", "") >= 2);
    // The untampered control.
    assert!(works(&w, &r2), "an unrevoked credential is refused");

    // Readiness follows the database: stopped, the broker is not ready and
    // refuses to issue; the revocation already made stays in force.
    drop(pg);
    let out = w.run(&["task", "show", &task, "-o", "json"]);
    assert!(
        !out.status.success(),
        "the task was shown with the database gone"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("datastore is unavailable"), "{err}");
}

#[test]
fn a_datastore_the_broker_cannot_use_stops_its_start_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let run = |datastore: &str| {
        let out = baton()
            .args([
                "broker",
                "--trust-domain",
                "example.org",
                "--listen",
                "127.0.0.1:0",
            ])
            .args(["--datastore", datastore])
            .arg("--data-dir")
            .arg(dir.path().join("broker"))
            .arg("--admin-socket")
            .arg(dir.path().join("admin.sock"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "the broker started on {datastore}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run("postgres://baton:hunter2@127.0.0.1:1/baton");
    assert!(err.contains("cannot connect to PostgreSQL at"), "{err}");
    assert!(!err.contains("hunter2"), "the password was printed: {err}");
    let err = run("host=/nowhere port=notaport");
    assert!(err.contains("is not valid"), "{err}");
    // A password file that is not one line is refused before any connection.
    let pw = dir.path().join("pw");
    std::fs::write(&pw, "a\nb\n").unwrap();
    let out = baton()
        .args([
            "broker",
            "--trust-domain",
            "example.org",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--datastore", "postgres://baton@127.0.0.1:1/baton"])
        .arg("--datastore-password-file")
        .arg(&pw)
        .arg("--data-dir")
        .arg(dir.path().join("broker"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("--datastore-password-file"), "{err}");
}
