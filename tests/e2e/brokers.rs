//! Several brokers, one service: brokers on one PostgreSQL datastore with
//! the CA kept there (`--ca-encryption-key-file`) serve one trust domain,
//! follow each other's rotation steps, and an agent given every broker's
//! URL goes on when the one it talks to is killed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::delegation::{PLANNER, RESEARCHER, TOOL, World, claims, task_start_args};
use crate::harness::{Cluster, Options, TD, baton, own_uid, wait_for};
use crate::pg_datastore::{cluster, create_db, refused_start_status};
use crate::revocation::works;

/// A fresh 32-byte key in hex, mode 0600.
pub(crate) fn seal_key(dir: &Path, name: &str) -> PathBuf {
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

pub(crate) fn broker(args: &[String]) -> Cluster {
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

    // A sealed journal replayed: the row as it was before a rotation step
    // written back (it opens: it is genuine, only old). The running
    // brokers do not follow it back.
    let journal = |data: Option<&Vec<u8>>| {
        rt.block_on(async {
            let c = pg.admin("baton").await;
            match data {
                None => c
                    .query_one("SELECT data FROM ca_journal", &[])
                    .await
                    .unwrap()
                    .get::<_, Vec<u8>>(0),
                Some(d) => {
                    c.execute("UPDATE ca_journal SET data = $1", &[d])
                        .await
                        .unwrap();
                    d.clone()
                }
            }
        })
    };
    let old = journal(None);
    a.cli_ok(&["ca", "prepare"]);
    let newer = journal(None);
    let before = authorities(&b);
    journal(Some(&old));
    for c in [&a, &b] {
        let out = c.cli(&["ca", "show"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("older than"), "{err}");
    }
    journal(Some(&newer));
    assert_eq!(authorities(&b), before, "control: the current journal");
}

const READ: [&str; 2] = ["tool:crm.search:read", "dataset:crm:read"];

/// `baton <args>` against broker `at` (its admin socket and URL), with the
/// world's node daemon as the Workload API.
fn run_at(w: &World, at: &Cluster, args: &[&str]) -> std::process::Output {
    baton()
        .args(args)
        .env("BATON_ADMIN_SOCKET", at.admin_socket())
        .env("SPIFFE_ENDPOINT_SOCKET", w.c.endpoint())
        .env("BATON_BROKER_URL", format!("https://{}", at.broker_addr))
        .output()
        .unwrap()
}

fn ok_at(w: &World, at: &Cluster, args: &[&str]) -> String {
    let out = run_at(w, at, args);
    assert!(
        out.status.success(),
        "baton {args:?} at {} failed: {}",
        at.broker_addr,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// One task whose steps each go to another broker: started at B, the
/// planner's grant redeemed through the node daemon (at A), the hop made at
/// C, the tool server (following A's feed, reporting to A) serving the
/// researcher; the revocation made at C is enforced through A's feed, and
/// every broker shows the same task. The control is a second task, left
/// alone, that keeps working. Then the node daemon's broker is killed and
/// the next redeem goes through another.
#[test]
fn one_task_runs_across_three_brokers() {
    let (rt, pg) = cluster();
    create_db(&rt, &pg);
    let keys = tempfile::tempdir().unwrap();
    let key = seal_key(keys.path(), "ca.key");
    let args = vec![
        "--datastore".to_owned(),
        pg.admin_conn("baton"),
        "--ca-encryption-key-file".to_owned(),
        key.display().to_string(),
        "--tool-server".to_owned(),
        format!("crm={TOOL}"),
    ];
    let b = broker(&args);
    let c = broker(&args);
    let mut w = World::start_with_options(
        None,
        Options {
            // World adds --tool-server itself.
            broker_args: args[..4].to_vec(),
            agent_args: vec![
                "--broker-url".into(),
                format!("https://{},https://{}", b.broker_addr, c.broker_addr),
            ],
            // The tool server follows B's feed and reports to B, or to C
            // when B does not answer.
            tool_args: vec![
                "--broker-url".into(),
                format!("https://{},https://{}", b.broker_addr, c.broker_addr),
            ],
            ..Options::default()
        },
    );
    let read = READ;
    fn start_at(w: &World, at: &Cluster) -> (String, String) {
        let a = task_start_args(&READ, "2", "10m", "read");
        let v: serde_json::Value = serde_json::from_str(&ok_at(w, at, &a)).unwrap();
        (
            v["task_id"].as_str().unwrap().to_owned(),
            v["grant"].as_str().unwrap().to_owned(),
        )
    }
    fn hop_at(w: &World, at: &Cluster, cred: &Path, tag: &str) -> PathBuf {
        let mut a = vec![
            "delegate",
            "--credential",
            cred.to_str().unwrap(),
            "--target",
            RESEARCHER,
            "--audience",
            "crm",
            "--justification",
            "look up the customer's open cases",
            "-o",
            "json",
        ];
        for s in READ {
            a.extend(["--scope", s]);
        }
        let v: serde_json::Value = serde_json::from_str(&ok_at(w, at, &a)).unwrap();
        w.redeem(v["grant"].as_str().unwrap(), RESEARCHER, tag)
    }

    let (task, grant) = start_at(&w, &b);
    let planner = w.redeem(&grant, PLANNER, "x-planner");
    let researcher = hop_at(&w, &c, &planner, "x-researcher");
    // The control: a task started at A with its hop at B.
    let (task2, grant2) = start_at(&w, &w.c);
    let planner2 = w.redeem(&grant2, PLANNER, "y-planner");
    let researcher2 = hop_at(&w, &b, &planner2, "y-researcher");
    for cred in [&researcher, &researcher2] {
        wait_for(
            "the tool server takes a call",
            Duration::from_secs(60),
            || works(&w, cred).then_some(()),
        );
    }

    // Every broker shows the task, with the hop made at C.
    let jti = claims(&researcher)["jti"].as_str().unwrap().to_owned();
    for at in [&w.c, &b, &c] {
        let shown = ok_at(&w, at, &["task", "show", &task, "-o", "json"]);
        assert!(
            shown.contains(&jti),
            "{} does not show the hop: {shown}",
            at.broker_addr
        );
    }
    // One trail: each broker logs the steps it took (the start at B, the
    // hop at C, the tool call reported to A) and ships them to the
    // database; every broker traces the whole task from every log.
    let logs_of = |w: &World, at: &Cluster| -> BTreeMap<String, bool> {
        let v: serde_json::Value =
            serde_json::from_str(&ok_at(w, at, &["audit", "verify", "-o", "json"])).unwrap();
        v["shared_logs"]
            .as_array()
            .unwrap_or_else(|| panic!("no shared logs in {v}"))
            .iter()
            .map(|l| {
                (
                    l["log_id"].as_str().unwrap().to_owned(),
                    l["own"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let mut own_log = BTreeMap::new();
    for at in [&w.c, &b, &c] {
        let logs = logs_of(&w, at);
        assert_eq!(logs.len(), 3, "one log per broker: {logs:?}");
        let own: Vec<&String> = logs.iter().filter(|(_, o)| **o).map(|(l, _)| l).collect();
        assert_eq!(own.len(), 1, "{logs:?}");
        own_log.insert(at.broker_addr.to_string(), own[0].clone());
    }
    let whole_trace = |w: &World, at: &Cluster| {
        wait_for(
            "the tool call's record in the merged trace",
            Duration::from_secs(60),
            || {
                let text = ok_at(w, at, &["audit", "trace", &task]);
                text.contains("tool crm.search").then_some(text)
            },
        )
    };
    for at in [&w.c, &b, &c] {
        let text = whole_trace(&w, at);
        assert!(text.contains("alice@example.com"), "the start at B: {text}");
        assert!(
            text.contains(&format!("hop → {RESEARCHER}: granted")),
            "the hop at C: {text}"
        );
        let log_of = |broker: &Cluster| own_log[&broker.broker_addr.to_string()].clone();
        assert!(
            text.contains(&format!("recorded in log {}", log_of(&b))),
            "the start at B: {text}"
        );
        for line in text.lines() {
            if line.contains("hop →") {
                assert!(
                    line.contains(&format!("@{}", log_of(&c))),
                    "the hop at C: {line}"
                );
            }
            if line.contains("tool crm.search") {
                assert!(
                    line.contains(&format!("@{}", log_of(&b))),
                    "the call reported to B: {line}"
                );
            }
        }
    }

    // Revoked at C (the planner's credential and what hangs under it),
    // refused by the tool server that follows A's feed.
    let planner_jti = claims(&planner)["jti"].as_str().unwrap().to_owned();
    ok_at(
        &w,
        &c,
        &["revoke", "credential", &planner_jti, "--reason", "leaked"],
    );
    wait_for(
        "the revocation made at C reaches the verifier through A",
        Duration::from_secs(60),
        || {
            let out = w.call(&researcher, "crm.search");
            (!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("revoked"))
                .then_some(())
        },
    );
    assert!(works(&w, &researcher2), "the untouched task was refused");
    // A hop from the revoked planner is refused at every broker.
    for at in [&w.c, &b, &c] {
        let out = run_at(
            &w,
            at,
            &[
                "delegate",
                "--credential",
                planner.to_str().unwrap(),
                "--target",
                RESEARCHER,
                "--audience",
                "crm",
                "--justification",
                "again",
                "--scope",
                read[0],
            ],
        );
        assert!(
            !out.status.success(),
            "a revoked planner hopped at {}",
            at.broker_addr
        );
    }

    // The node daemon's broker (A) dies: the next task's redeem goes
    // through B or C.
    {
        let p = w.c.broker.as_mut().unwrap();
        p.child.kill().unwrap();
        p.child.wait().unwrap();
    }
    let (_task3, grant3) = start_at(&w, &c);
    let planner3 = w.redeem(&grant3, PLANNER, "z-planner");
    let hop3 = hop_at(&w, &b, &planner3, "z-researcher");
    assert!(hop3.join("token").exists());

    // A is gone, its log is not: C traces the whole task. Then the
    // database is edited behind the brokers' backs: the tool call B
    // recorded now says it was denied.
    assert!(whole_trace(&w, &c).contains("tool crm.search"));
    let a_log = own_log[&w.c.broker_addr.to_string()].clone();
    let b_log = own_log[&b.broker_addr.to_string()].clone();
    let sql = |q: &str, p: &[&(dyn tokio_postgres::types::ToSql + Sync)]| {
        rt.block_on(async { pg.admin("baton").await.execute(q, p).await.unwrap() })
    };
    let original: Vec<(i64, Vec<u8>)> = rt.block_on(async {
        pg.admin("baton")
            .await
            .query(
                "SELECT idx, event FROM audit_leaves WHERE log_id = $1 AND task_id = $2",
                &[&b_log, &task],
            )
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
    });
    let n = sql(
        "UPDATE audit_leaves SET event = convert_to(replace(convert_from(event, 'UTF8'), '\"allow\"', '\"deny\"'), 'UTF8')
         WHERE log_id = $1 AND task_id = $2 AND convert_from(event, 'UTF8') LIKE '%\"allow\"%'",
        &[&b_log, &task],
    );
    assert!(n >= 1, "no allowed tool call of the task in B's log");
    // C reads B's log from the database: the trace is refused.
    let out = run_at(&w, &c, &["audit", "trace", &task]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "an altered record was traced at C");
    assert!(err.contains(&b_log), "the error names B's log: {err}");
    // Verify fails at both (B checks its own copy in the database too).
    for at in [&b, &c] {
        let out = run_at(&w, at, &["audit", "verify"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(4),
            "verify at {}: {err}",
            at.broker_addr
        );
        assert!(err.contains(&b_log), "{err}");
    }
    for (idx, event) in &original {
        sql(
            "UPDATE audit_leaves SET event = $3 WHERE log_id = $1 AND idx = $2",
            &[&b_log, idx, event],
        );
    }
    ok_at(&w, &c, &["audit", "verify"]);
    // A's log removed altogether (A is gone; its rows are all that is
    // left of what it recorded): B and C checked it before, and say so.
    for table in ["audit_leaves", "audit_checkpoints", "audit_logs"] {
        sql(&format!("DELETE FROM {table} WHERE log_id = $1"), &[&a_log]);
    }
    for at in [&b, &c] {
        let out = run_at(&w, at, &["audit", "verify"]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            out.status.code(),
            Some(4),
            "verify at {}: {err}",
            at.broker_addr
        );
        assert!(err.contains(&a_log) && err.contains("removed"), "{err}");
    }
    // A registration written by whoever can write to the database (a
    // well-formed sealed row, under a key it does not have) is refused.
    sql(
        "INSERT INTO audit_logs (log_id, sealed_key, broker, registered_at)
         VALUES ('00000000000000aa', decode(repeat('ab', 60), 'hex'), 'intruder', 0)",
        &[],
    );
    let out = run_at(&w, &c, &["audit", "trace", &task]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("00000000000000aa") && err.contains("forged"),
        "{err}"
    );
    sql(
        "DELETE FROM audit_logs WHERE log_id = '00000000000000aa'",
        &[],
    );

    // B dies too: the tool server's feed and reports move to C, and the
    // call made now is in C's log.
    let mut b = b;
    {
        let p = b.broker.as_mut().unwrap();
        p.child.kill().unwrap();
        p.child.wait().unwrap();
    }
    assert!(works(&w, &researcher2), "the tool server failed over to C");
    let c_log = own_log[&c.broker_addr.to_string()].clone();
    wait_for(
        "the call made after B died, recorded at C",
        Duration::from_secs(60),
        || {
            let n: i64 = rt.block_on(async {
                pg.admin("baton")
                    .await
                    .query_one(
                        "SELECT count(*) FROM audit_leaves WHERE log_id = $1 AND task_id = $2
                         AND convert_from(event, 'UTF8') LIKE '%crm.search%'",
                        &[&c_log, &task2],
                    )
                    .await
                    .unwrap()
                    .get(0)
            });
            (n >= 1).then_some(())
        },
    );
}

/// An API key is stored by the broker that leased it, but its task may end
/// at any broker: the leasing broker's introspection answers from the
/// shared revocation ledger, so the key is inactive there as soon as its
/// task is ended at another broker. The control is a second key whose
/// task goes on, still active at the same broker.
#[test]
fn an_api_key_dies_with_its_task_ended_at_another_broker() {
    use crate::secrets::{lease, task_with};
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
    let b = broker(&args);
    let w = World::start_with_options(
        None,
        Options {
            broker_args: args.clone(),
            ..Options::default()
        },
    );
    // The tool server's identity for introspection.
    let (_t, tool) = task_with(&w, &["tool:crm.search:read"], "10m", "tool-id");
    let (ended, cred) = task_with(&w, &["secret:apikey:issue"], "10m", "keyholder");
    let (_kept, cred2) = task_with(&w, &["secret:apikey:issue"], "10m", "keyholder2");
    // Both leased at A (the world's broker).
    let key_of = |cred: &Path| {
        lease(&w, cred, "apikey")["material"]["key"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let (doomed, control) = (key_of(&cred), key_of(&cred2));
    let active_at_a = |key: &str| {
        let out = ok_at(
            &w,
            &w.c,
            &[
                "secret",
                "introspect",
                "--credential",
                tool.to_str().unwrap(),
                "--key",
                key,
                "-o",
                "json",
            ],
        );
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["active"]
            .as_bool()
            .unwrap()
    };
    assert!(active_at_a(&doomed) && active_at_a(&control));
    ok_at(&w, &b, &["task", "end", &ended]);
    assert!(
        !active_at_a(&doomed),
        "a key of a task ended at another broker is still active where it was leased"
    );
    assert!(active_at_a(&control), "the control's key died too");
}
