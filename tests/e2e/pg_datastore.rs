//! The broker's state in PostgreSQL (`baton broker --datastore`), on a
//! private cluster the test starts (`initdb` into a temporary directory).

use std::path::Path;
use std::time::Duration;

use baton_secrets::testing::Pg;

use crate::delegation::{World, claims};
use crate::harness::{baton, wait_for};
use crate::revocation::{chain, works};

pub(crate) fn cluster() -> (tokio::runtime::Runtime, Pg) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let pg = rt.block_on(Pg::start());
    (rt, pg)
}

/// Creates the database `baton` in `pg`.
pub(crate) fn create_db(rt: &tokio::runtime::Runtime, pg: &Pg) {
    rt.block_on(async {
        pg.admin("postgres")
            .await
            .batch_execute("CREATE DATABASE baton")
            .await
            .unwrap();
    });
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
    create_db(&rt, &pg);
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
    let err = refused_start("postgres://baton:hunter2@127.0.0.1:1/baton", &[]);
    assert!(err.contains("cannot connect to PostgreSQL at"), "{err}");
    assert!(!err.contains("hunter2"), "the password was printed: {err}");
    let err = refused_start("host=/nowhere port=notaport", &[]);
    assert!(err.contains("is not valid"), "{err}");
    // A password file that is not one line is refused before any connection.
    let dir = tempfile::tempdir().unwrap();
    let pw = dir.path().join("pw");
    let with_password = |content: &str, mode: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::write(&pw, content).unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(mode)).unwrap();
        refused_start_status(
            "postgres://baton@127.0.0.1:1/baton",
            &["--datastore-password-file".into(), pw.display().to_string()],
        )
    };
    let (status, err) = with_password("a\nb\n", 0o600);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("--datastore-password-file") && err.contains("one non-empty line"),
        "{err}"
    );
    // A password file others can read is refused too, before any connection.
    let (status, err) = with_password("hunter2\n", 0o644);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    assert!(!err.contains("hunter2"), "the password was printed: {err}");
}

/// A CA and a server certificate of it for `names` (DNS names or IPs).
struct TestCa {
    cert: rcgen::Certificate,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new(cn: &str) -> Self {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            cert,
            issuer: rcgen::Issuer::new(params, key),
        }
    }

    /// (certificate PEM, key PEM) of a leaf for `names` with CN `cn`.
    fn leaf(&self, cn: &str, names: &[&str]) -> (String, String) {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn tls_cluster(
    rt: &tokio::runtime::Runtime,
    server: (String, String),
    client_ca: Option<&TestCa>,
) -> Pg {
    let pg = rt.block_on(Pg::start_tcp(baton_secrets::testing::Tcp {
        tls: Some(baton_secrets::testing::ServerTls {
            cert_pem: server.0,
            key_pem: server.1,
            client_ca_pem: client_ca.map(|c| c.cert.pem()),
        }),
    }));
    create_db(rt, &pg);
    pg
}

/// `baton broker` on `datastore` with `extra` arguments, expected to stop
/// at its start: its stderr.
fn refused_start(datastore: &str, extra: &[&Path]) -> String {
    refused_start_status(datastore, &extra_args(extra)).1
}

fn extra_args(files: &[&Path]) -> Vec<String> {
    let names = [
        "--datastore-ca",
        "--datastore-client-cert",
        "--datastore-client-key",
    ];
    files
        .iter()
        .zip(names)
        .filter(|(p, _)| !p.as_os_str().is_empty())
        .flat_map(|(p, n)| [n.to_owned(), p.display().to_string()])
        .collect()
}

/// [`refused_start`] with any extra arguments: the exit status and stderr.
pub(crate) fn refused_start_status(
    datastore: &str,
    extra: &[String],
) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().unwrap();
    let mut child = baton()
        .args([
            "broker",
            "--trust-domain",
            "example.org",
            "--listen",
            "127.0.0.1:0",
        ])
        .args(["--datastore", datastore])
        .args(extra)
        .arg("--data-dir")
        .arg(dir.path().join("broker"))
        .arg("--admin-socket")
        .arg(dir.path().join("admin.sock"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Read while it runs: a full pipe would stall it.
    let mut stderr = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut err = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut err).unwrap();
        err
    });
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the broker did not stop at its start on {datastore} {extra:?}");
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let err = reader.join().unwrap();
    assert!(
        !status.success(),
        "the broker started on {datastore} {extra:?}: {err}"
    );
    (status, err)
}

/// The datastore over TLS: the server's certificate is checked against the
/// named CA and the host name, a client certificate is presented when the
/// server asks for one, and a server that offers no TLS is refused, not
/// talked to in plain text. The control is the whole flow on the verified
/// TLS connection, and PostgreSQL's own view that the broker's sessions are
/// encrypted.
#[test]
fn the_broker_reaches_postgresql_only_over_verified_tls() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        if name.ends_with(".key") {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        p
    };
    let ca = TestCa::new("baton test db CA");
    let other_ca = TestCa::new("someone else's CA");
    let ca_file = write("ca.pem", &ca.cert.pem());
    let other_ca_file = write("other-ca.pem", &other_ca.cert.pem());
    // The client certificate of the `postgres` role (cert auth maps the CN).
    let (ccert, ckey) = ca.leaf("postgres", &[]);
    let (ccert, ckey) = (write("client.pem", &ccert), write("client.key", &ckey));
    let (xcert, xkey) = other_ca.leaf("postgres", &[]);
    let (xcert, xkey) = (write("x-client.pem", &xcert), write("x-client.key", &xkey));
    let none = Path::new("");

    // A server with a certificate of `ca` for 127.0.0.1 that asks for no
    // client certificate (its logins need a password no role has: what is
    // checked here is refused before any login).
    let open_pg = tls_cluster(&rt, ca.leaf("db", &["127.0.0.1"]), None);
    let open_conn = open_pg.tcp_conn("postgres", "baton");
    // Attack: the system's roots do not vouch for this server.
    // (A machine without system roots refuses it for that, before
    // connecting.)
    let err = refused_start(&format!("{open_conn} sslmode=require"), &[]);
    assert!(
        err.contains("UnknownIssuer") || err.contains("has no CA certificates"),
        "{err}"
    );
    // Attack: another CA than the server's.
    let err = refused_start(&open_conn, &[&other_ca_file]);
    assert!(err.contains("UnknownIssuer"), "{err}");
    // Control for both: the server's CA gets past the handshake to the
    // login (which this server refuses for want of a password).
    let err = refused_start(&open_conn, &[&ca_file]);
    assert!(!err.contains("TLS handshake"), "{err}");
    assert!(err.contains("password"), "{err}");

    // Bad files are named before any connection.
    let err = refused_start(&open_conn, &[&write("junk.pem", "junk\n"), none, none]);
    assert!(err.contains("--datastore-ca"), "{err}");
    assert!(err.contains("no PEM CERTIFICATE"), "{err}");
    let err = refused_start(&format!("{open_conn} sslmode=disable"), &[&ca_file]);
    assert!(err.contains("sslmode=disable"), "{err}");

    // A server that logs in only with a client certificate of `ca`, and
    // rejects plain TCP.
    let pg = tls_cluster(&rt, ca.leaf("db", &["127.0.0.1"]), Some(&ca));
    let conn = pg.tcp_conn("postgres", "baton");
    // Attack: the right CA, but no client certificate, or another CA's.
    let err = refused_start(&conn, &[&ca_file]);
    assert!(err.contains("certificate"), "{err}");
    let err = refused_start(&conn, &[&ca_file, &xcert, &xkey]);
    assert!(err.contains("cannot connect to PostgreSQL at"), "{err}");

    // Attack: a client key every user can read is no secret; refused
    // before any connection, naming the flag.
    let loose = write("loose-client.pem", &std::fs::read_to_string(&ckey).unwrap());
    let err = refused_start(&conn, &[&ca_file, &ccert, &loose]);
    assert!(err.contains("--datastore-client-key"), "{err}");
    assert!(err.contains("every user can read"), "{err}");

    // Control: the named CA and the client certificate. The whole flow
    // runs on it, and PostgreSQL sees the broker's sessions encrypted.
    let w = World::start_with_args(
        None,
        [
            "--datastore".to_owned(),
            conn.clone(),
            "--datastore-pool".to_owned(),
            "2".to_owned(),
        ]
        .into_iter()
        .chain(extra_args(&[&ca_file, &ccert, &ckey]))
        .collect(),
    );
    let (_task, _planner, r1) = chain(&w, "tls1");
    wait_for(
        "the tool server takes a call",
        Duration::from_secs(60),
        || works(&w, &r1).then_some(()),
    );
    let encrypted = rt.block_on(async {
        let c = pg.admin("postgres").await;
        let row = c
            .query_one(
                "SELECT COUNT(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                 WHERE a.application_name = 'baton-broker' AND s.ssl",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, i64>(0)
    });
    assert!(encrypted >= 1, "no encrypted broker session");
    drop(w);

    // Attack: a certificate of the right CA, for another host name.
    let wrong_name = tls_cluster(&rt, ca.leaf("db", &["db.example"]), None);
    let err = refused_start(&wrong_name.tcp_conn("postgres", "baton"), &[&ca_file]);
    assert!(err.contains("not valid for name"), "{err}");

    // Attack (downgrade): a server that offers no TLS is not talked to in
    // plain text once TLS is asked for.
    let plain_pg = rt.block_on(Pg::start_tcp(baton_secrets::testing::Tcp { tls: None }));
    create_db(&rt, &plain_pg);
    let plain_conn = plain_pg.tcp_conn("postgres", "baton");
    let err = refused_start(&plain_conn, &[&ca_file]);
    assert!(err.contains("cannot connect to PostgreSQL at"), "{err}");
    assert!(err.contains("server does not support TLS"), "{err}");
    let err = refused_start(&format!("{plain_conn} sslmode=require"), &[]);
    assert!(
        err.contains("server does not support TLS") || err.contains("has no CA certificates"),
        "{err}"
    );
    // Control: without a TLS option the same server is reached in plain
    // text (and refuses the login: no role has a password).
    let err = refused_start(&plain_conn, &[]);
    assert!(!err.contains("TLS"), "{err}");
    assert!(err.contains("password"), "{err}");
}
