//! Several brokers, one service: brokers on one PostgreSQL datastore with
//! the CA kept there (`--ca-encryption-key-file`) serve one trust domain,
//! follow each other's rotation steps, and an agent given every broker's
//! URL goes on when the one it talks to is killed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::harness::{Cluster, Options, TD, baton, own_uid, wait_for};
use crate::pg_datastore::{cluster, create_db, refused_start_status};

/// A fresh 32-byte key in hex, mode 0600.
fn seal_key(dir: &Path, name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt as _;
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(
        &mut std::fs::File::open("/dev/urandom").unwrap(),
        &mut bytes,
    )
    .unwrap();
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", hex::encode(bytes))).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    path
}

fn broker(args: &[String]) -> Cluster {
    Cluster::start(Options {
        start_agent: false,
        broker_args: args.to_vec(),
        ..Options::default()
    })
}

/// `ca show` as (id → state, tainted): what every broker must agree on
/// (watermarks are each broker's own knowledge).
fn authorities(c: &Cluster) -> BTreeMap<String, (String, bool)> {
    let v = c.cli_json(&["ca", "show"]);
    v["authorities"]
        .as_array()
        .unwrap_or_else(|| panic!("no authorities in {v}"))
        .iter()
        .map(|a| {
            let a = a.get("status").unwrap_or(a);
            (
                a["id"].as_str().unwrap().to_owned(),
                (
                    a["state"].as_str().unwrap().to_owned(),
                    a["tainted"].as_bool().unwrap(),
                ),
            )
        })
        .collect()
}

fn fetch_svid(c: &Cluster, id: &str) -> bool {
    baton()
        .args(["svid", "fetch", "--spiffe-id", id])
        .env("SPIFFE_ENDPOINT_SOCKET", c.endpoint())
        .output()
        .unwrap()
        .status
        .success()
}

fn register(c: &Cluster, node: &str, path: &str) {
    let id = format!("spiffe://{TD}{path}");
    let sel = format!("unix:uid:{}", own_uid());
    c.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &id,
        "--parent-id",
        node,
        "--selector",
        &sel,
    ]);
}

#[test]
fn brokers_on_one_database_serve_one_trust_domain_and_an_agent_fails_over() {
    let (rt, pg) = cluster();
    create_db(&rt, &pg);
    let keys = tempfile::tempdir().unwrap();
    let key = seal_key(keys.path(), "ca.key");
    let args = vec![
        "--datastore".to_owned(),
        pg.admin_conn("baton"),
        "--ca-encryption-key-file".to_owned(),
        key.display().to_string(),
    ];
    let mut a = broker(&args);
    let b = broker(&args);

    // One CA: the second broker found the first's instead of making one.
    let bundle = |c: &Cluster| std::fs::read_to_string(c.path("broker/bundle.pem")).unwrap();
    assert_eq!(bundle(&a), bundle(&b));
    assert_eq!(authorities(&a), authorities(&b));
    assert_eq!(authorities(&a).len(), 2, "{:?}", authorities(&a));
    // Kept in the database, not in either data dir, and not in clear text
    // there: no authority certificate of the bundle appears in a row.
    for c in [&a, &b] {
        assert!(!c.path("broker/ca/journal.json").exists());
    }
    let rows: Vec<(String, Vec<u8>)> = rt.block_on(async {
        let c = pg.admin("baton").await;
        c.query("SELECT name, data FROM ca_files", &[])
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    });
    assert_eq!(rows.len(), 3, "an X.509 key and certificate and a JWT key");
    let pem = bundle(&a);
    let der = pem_der(&pem);
    for (name, data) in &rows {
        assert!(
            !data
                .windows(der.len().min(64))
                .any(|w| w == &der[..der.len().min(64)]),
            "row {name} holds the authority's certificate in clear"
        );
    }

    // An agent given both brokers attests at the first; its entries are
    // registered at the second (one database).
    let token = a.join_token(None);
    let ready = a.path("agent.ready");
    let mut cmd = baton();
    cmd.args(["agent", "--trust-domain", TD, "--sync-interval", "200ms"])
        .arg("--broker-url")
        .arg(format!(
            "https://{},https://{}",
            a.broker_addr, b.broker_addr
        ))
        .arg("--data-dir")
        .arg(a.path("agent"))
        .arg("--socket")
        .arg(a.agent_socket())
        .arg("--trust-bundle")
        .arg(a.path("broker/bundle.pem"))
        .arg("--join-token")
        .arg(&token)
        .arg("--ready-file")
        .arg(&ready);
    a.run_agent(cmd, &ready);
    let node = a.node_id.clone();
    register(&b, &node, "/w1");
    wait_for("the first workload's SVID", Duration::from_secs(60), || {
        fetch_svid(&a, &format!("spiffe://{TD}/w1")).then_some(())
    });

    // The broker the agent talks to dies without a goodbye; what is
    // registered from now on reaches the agent through the other one.
    let a_addr = a.broker_addr.clone();
    {
        let p = a.broker.as_mut().unwrap();
        p.child.kill().unwrap();
        p.child.wait().unwrap();
    }
    register(&b, &node, "/w2");
    wait_for(
        "the second workload's SVID, through the broker still up",
        Duration::from_secs(60),
        || fetch_svid(&a, &format!("spiffe://{TD}/w2")).then_some(()),
    );
    let log = a.agent.as_ref().unwrap().log_text();
    assert!(
        log.contains(&b.broker_addr),
        "the agent never named B: {log}"
    );

    // A rotation step at the surviving broker; the killed one comes back
    // and serves the same authorities and bundle.
    b.cli_ok(&["ca", "prepare"]);
    assert_eq!(authorities(&b).len(), 4);
    a.start_broker(&a_addr, "1h");
    assert_eq!(authorities(&a), authorities(&b));
    assert_eq!(bundle(&a), bundle(&b));
    // A step at A is seen at B at once by `ca show`, and reaches B's
    // bundle file without it being asked.
    // The agent syncs at B only, yet A's propagation check sees it
    // (syncs are shared through the database): A activates once the
    // agent has the bundle, without --force.
    wait_for(
        "A sees that the agent synced the prepared bundle at B",
        Duration::from_secs(60),
        || a.cli(&["ca", "activate"]).status.success().then_some(()),
    );
    let shown = authorities(&b);
    assert_eq!(authorities(&a), shown);
    let active = shown.values().filter(|(s, _)| s == "active").count();
    assert_eq!(active, 2, "{shown:?}");
    // B still serves the agent, with the authority A activated.
    register(&b, &node, "/w3");
    wait_for("the third workload's SVID", Duration::from_secs(60), || {
        fetch_svid(&a, &format!("spiffe://{TD}/w3")).then_some(())
    });
    // Two prepares racing at two brokers: one of them is refused.
    let pa = a.cli(&["ca", "prepare"]);
    let pb = b.cli(&["ca", "prepare"]);
    assert!(
        pa.status.success() != pb.status.success(),
        "two authorities were prepared at once: {} / {}",
        String::from_utf8_lossy(&pa.stderr),
        String::from_utf8_lossy(&pb.stderr)
    );
    let refused = if pa.status.success() { &pb } else { &pa };
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("already prepared"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    assert_eq!(authorities(&a), authorities(&b));
    wait_for(
        "B's bundle file follows A's steps",
        Duration::from_secs(60),
        || (bundle(&a) == bundle(&b)).then_some(()),
    );
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem
        .lines()
        .skip_while(|l| !l.starts_with("-----BEGIN CERTIFICATE"))
        .skip(1)
        .take_while(|l| !l.starts_with("-----END"))
        .collect();
    base64::Engine::decode(&base64::engine::general_purpose::STANDARD, body).unwrap()
}

/// The shared CA opens only with its key: a broker given another key, or
/// finding a row altered, stops at its start saying which row; a key file
/// others can read is refused; and the flag needs the PostgreSQL
/// datastore. The control is a broker with the right key on the untouched
/// rows.
#[test]
fn the_shared_ca_opens_only_with_its_key_and_untouched_rows() {
    let (rt, pg) = cluster();
    create_db(&rt, &pg);
    let keys = tempfile::tempdir().unwrap();
    let key = seal_key(keys.path(), "ca.key");
    let conn = pg.admin_conn("baton");
    let with_key = |k: &Path| {
        vec![
            "--ca-encryption-key-file".to_owned(),
            k.display().to_string(),
        ]
    };
    let a = broker(&[vec!["--datastore".to_owned(), conn.clone()], with_key(&key)].concat());

    let other = seal_key(keys.path(), "other.key");
    let (_, err) = refused_start_status(&conn, &with_key(&other));
    assert!(
        err.contains("does not open with the key of --ca-encryption-key-file"),
        "{err}"
    );

    // One byte of the X.509 key's row changed.
    let (name, original): (String, Vec<u8>) = rt.block_on(async {
        let c = pg.admin("baton").await;
        let r = c
            .query_one(
                "SELECT name, data FROM ca_files WHERE name LIKE 'x509-%.key'",
                &[],
            )
            .await
            .unwrap();
        (r.get(0), r.get(1))
    });
    let mut altered = original.clone();
    let i = altered.len() / 2;
    altered[i] ^= 0x01;
    let set = |data: &Vec<u8>| {
        rt.block_on(async {
            let c = pg.admin("baton").await;
            c.execute(
                "UPDATE ca_files SET data = $2 WHERE name = $1",
                &[&name, data],
            )
            .await
            .unwrap();
        })
    };
    set(&altered);
    let (_, err) = refused_start_status(&conn, &with_key(&key));
    assert!(
        err.contains(&name),
        "the error does not name the row: {err}"
    );
    assert!(err.contains("does not open"), "{err}");
    set(&original);

    // A key file others can read.
    let loose = keys.path().join("loose.key");
    std::fs::copy(&key, &loose).unwrap();
    std::fs::set_permissions(&loose, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let (_, err) = refused_start_status(&conn, &with_key(&loose));
    assert!(err.contains("chmod 600"), "{err}");

    // Without the PostgreSQL datastore.
    let out = baton()
        .args(["broker", "--trust-domain", TD, "--ca-encryption-key-file"])
        .arg(&key)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--datastore"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // The control: the right key on the untouched rows.
    let b = broker(&[vec!["--datastore".to_owned(), conn], with_key(&key)].concat());
    assert_eq!(authorities(&a), authorities(&b));
}
