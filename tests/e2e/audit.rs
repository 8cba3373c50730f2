//! The audit log proves itself: tampering with one byte, deleting an event
//! or reordering two makes `baton audit verify` fail and name where; an
//! inclusion receipt from the API verifies offline with the public key; a
//! log cut short is caught by the broker's head file, by a witness file kept
//! outside it and by receipts.

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use base64::Engine;

use crate::delegation::{PLANNER, RESEARCHER, World};
use crate::harness::{Proc, TD, baton, wait_for};

fn offline_verify(w: &World, db: &Path) -> std::process::Output {
    w.run(&[
        "audit",
        "verify",
        "--db",
        db.to_str().unwrap(),
        "--keys-dir",
        w.c.path("broker/audit").to_str().unwrap(),
    ])
}

fn tampered(w: &World, name: &str, sql: &str) -> std::path::PathBuf {
    let copy = w.c.path(name);
    std::fs::copy(w.c.path("broker/audit.db"), &copy).unwrap();
    let conn = rusqlite::Connection::open(&copy).unwrap();
    conn.execute_batch(sql).unwrap();
    drop(conn);
    copy
}

#[test]
fn tampering_is_detected_and_receipts_verify_offline() {
    let mut w = World::start();
    let (task, grant) = w.start_task(
        &["tool:crm.search:read", "dataset:crm:read"],
        "2",
        "10m",
        "read",
    );
    let planner = w.redeem(&grant, PLANNER, "planner");
    let hop = w.delegate(&planner, RESEARCHER, &["tool:crm.search:read"], &[]);
    assert!(hop.status.success());
    w.ok(&["task", "end", &task]);

    // A receipt from the API verifies offline against the published key.
    let receipt = w.json(&["audit", "receipt", "2"]);
    let verified = w.json(&["audit", "verify", "-o", "json"]);
    assert_eq!(verified["ok"], true);
    let public_key = admin_get(&w, "/v1/admin/audit/public-key")["public_key"]
        .as_str()
        .map(|k| base64::engine::general_purpose::STANDARD.decode(k).unwrap())
        .unwrap();
    let receipt: baton_audit::Receipt = serde_json::from_value(receipt).unwrap();
    let leaf = hex_hash(&receipt.leaf_hash);
    baton_audit::verify_receipt(&receipt, baton_audit::ReceiptLeaf::Hash(&leaf), &public_key)
        .expect("receipt verifies offline");
    let mut forged = receipt.clone();
    forged.index += 1;
    assert!(
        baton_audit::verify_receipt(&forged, baton_audit::ReceiptLeaf::Hash(&leaf), &public_key)
            .is_err()
    );

    // Stop the broker so the file is quiet, then tamper with copies.
    w.c.broker.as_mut().unwrap().stop();
    let ok = offline_verify(&w, &w.c.path("broker/audit.db"));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );

    let cases = [
        (
            "flip",
            "UPDATE leaves SET event = CAST(substr(event, 1, 10) || char(unicode(substr(event, 11, 1)) + 1) || substr(event, 12) AS BLOB) WHERE idx = 2;",
            2,
        ),
        ("delete", "DELETE FROM leaves WHERE idx = 3;", 3),
        (
            "reorder",
            "UPDATE leaves SET idx = -1 WHERE idx = 1; UPDATE leaves SET idx = 1 WHERE idx = 2; UPDATE leaves SET idx = 2 WHERE idx = -1;",
            1,
        ),
    ];
    for (name, sql, want) in cases {
        let copy = tampered(&w, &format!("{name}.db"), sql);
        let out = offline_verify(&w, &copy);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(4), "{name}: {err}");
        assert!(
            err.contains(&format!("index {want}")),
            "{name}: expected index {want} in {err}"
        );
    }
}

fn hex_hash(s: &str) -> [u8; 32] {
    let v = hex::decode(s).unwrap();
    let mut out = [0u8; 32];
    out.copy_from_slice(&v);
    out
}

fn admin_get(w: &World, path: &str) -> serde_json::Value {
    baton_tls::install_crypto_provider();
    get_from(&w.c.admin_socket(), path)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Asserts `baton audit ...` failed verification (exit 4) saying `want`.
fn assert_verify_fails(out: &Output, want: &str) -> String {
    let err = stderr(out);
    assert_eq!(out.status.code(), Some(4), "expected exit 4: {err}");
    assert!(err.contains(want), "expected {want:?} in: {err}");
    err
}

fn keys_args(w: &World, db: &Path) -> Vec<String> {
    vec![
        "--db".into(),
        db.to_str().unwrap().into(),
        "--keys-dir".into(),
        w.c.path("broker/audit").to_str().unwrap().into(),
    ]
}

fn run_with(w: &World, args: &[&str], extra: &[String]) -> Output {
    let mut all: Vec<&str> = args.to_vec();
    all.extend(extra.iter().map(String::as_str));
    w.run(&all)
}

/// Starts `baton broker` on the cluster's data dir and waits for it to exit
/// on its own; returns its log.
fn broker_refuses_to_start(w: &World) -> String {
    let ready = w.c.path("refused.addr");
    let mut cmd = baton();
    cmd.args([
        "broker",
        "--trust-domain",
        TD,
        "--listen",
        "127.0.0.1:0",
        "--dev-issuer",
    ])
    .arg("--data-dir")
    .arg(w.c.path("broker"))
    .arg("--admin-socket")
    .arg(w.c.admin_socket())
    .arg("--ready-file")
    .arg(&ready);
    let mut p = Proc::spawn("broker", cmd, w.c.path("refused.log"));
    let status = wait_for(
        "the broker to refuse to start",
        Duration::from_secs(60),
        || p.child.try_wait().ok().flatten(),
    );
    assert!(!status.success(), "broker started: {}", p.log_text());
    assert!(!ready.exists());
    p.log_text()
}

/// Serves `answer(path)` on a Unix socket at `path`, one HTTP/1.1
/// request per connection, as a broker's admin socket would, until the
/// process ends.
fn fake_admin_socket(path: &Path, answer: impl Fn(&str) -> serde_json::Value + Send + 'static) {
    use std::io::{BufRead as _, BufReader, Write as _};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut line = String::new();
            if reader.read_line(&mut line).is_err() {
                continue;
            }
            let target = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
            // The rest of the head.
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
                    break;
                }
            }
            let body = answer(&target).to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
}

/// `audit verify --since W --update` moves the witness only to a tree head
/// it proved extends W, never to the head the broker's verify report
/// names: a broker (or whoever holds its log and key) answering the proof
/// honestly but naming another head in its report (a fork's) cannot have
/// the witness follow the fork from then on. The same command against the
/// honest broker, which moves the witness, is the control.
#[test]
fn a_witness_moves_only_to_a_head_proven_to_extend_it() {
    let w = World::start();
    let (_task, grant) = w.start_task(&["tool:crm.search:read"], "2", "10m", "read");
    let witness = w.c.path("witness.json");
    let witness_s = witness.to_str().unwrap();
    w.ok(&["audit", "checkpoint", "--out", witness_s]);
    let kept = std::fs::read_to_string(&witness).unwrap();
    let witnessed: serde_json::Value = serde_json::from_str(&kept).unwrap();
    w.redeem(&grant, PLANNER, "planner");
    let honest = admin_get(&w, "/v1/admin/audit/verify");
    let size = honest["report"]["head"]["size"].as_u64().unwrap();
    assert!(size > witnessed["checkpoint"]["size"].as_u64().unwrap());

    // The broker's report names a larger head, and then one of the same
    // size over another root; the consistency proof and the key are the
    // broker's own, honest answers.
    for (name, forge) in [
        ("larger", serde_json::json!({ "size": size + 1000 })),
        (
            "another root",
            serde_json::json!({ "root_hash": "00".repeat(32) }),
        ),
    ] {
        let mut forged = honest.clone();
        for (k, v) in forge.as_object().unwrap() {
            forged["report"]["head"][k] = v.clone();
        }
        let real = w.c.admin_socket();
        let socket =
            w.c.path(&format!("forking-{}.sock", name.replace(' ', "-")));
        let answers = forged.clone();
        let real_socket = real.clone();
        fake_admin_socket(&socket, move |path| {
            if path == "/v1/admin/audit/verify" {
                answers.clone()
            } else {
                get_from(&real_socket, path)
            }
        });
        std::fs::write(&witness, &kept).unwrap();
        let out = w.run(&[
            "audit",
            "verify",
            "--since",
            witness_s,
            "--update",
            "--admin-socket",
            socket.to_str().unwrap(),
        ]);
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        let moved: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&witness).unwrap()).unwrap();
        assert_eq!(
            moved["checkpoint"], honest["report"]["head"],
            "{name}: the witness moved to a head it did not prove"
        );
        assert_ne!(moved["checkpoint"], forged["report"]["head"], "{name}");
    }

    // Control: against the broker itself the witness moves to its head,
    // and checks out from there.
    std::fs::write(&witness, &kept).unwrap();
    w.ok(&["audit", "verify", "--since", witness_s, "--update"]);
    let moved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&witness).unwrap()).unwrap();
    assert_eq!(moved["checkpoint"]["size"].as_u64(), Some(size));
    w.ok(&["audit", "verify", "--since", witness_s]);
}

/// `GET path` on the admin socket at `socket`.
fn get_from(socket: &Path, path: &str) -> serde_json::Value {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        reqwest::Client::builder()
            .unix_socket(socket)
            .build()
            .unwrap()
            .get(format!("http://admin{path}"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    })
}

#[test]
fn a_log_cut_short_is_caught_by_the_head_file_witnesses_and_receipts() {
    let mut w = World::start();
    let (task, grant) = w.start_task(
        &["tool:crm.search:read", "dataset:crm:read"],
        "2",
        "10m",
        "read",
    );
    let planner = w.redeem(&grant, PLANNER, "planner");

    // An operator witnesses the log, outside it.
    let witness = w.c.path("witness.json");
    let witness_s = witness.to_str().unwrap();
    w.ok(&["audit", "checkpoint", "--out", witness_s]);
    let witnessed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&witness).unwrap()).unwrap();
    let witnessed_size = witnessed["checkpoint"]["size"].as_u64().unwrap();
    assert!(witnessed_size >= 2, "{witnessed}");
    // It is not overwritten by another `checkpoint`.
    let again = w.run(&["audit", "checkpoint", "--out", witness_s]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(stderr(&again).contains("--update"), "{}", stderr(&again));

    // More activity; a receipt for the newest event.
    let hop = w.delegate(&planner, RESEARCHER, &["tool:crm.search:read"], &[]);
    assert!(hop.status.success(), "{}", stderr(&hop));
    w.ok(&["task", "end", &task]);
    let size = w.json(&["audit", "verify", "-o", "json"])["report"]["size"]
        .as_u64()
        .unwrap();
    assert!(size > witnessed_size);
    let receipt_file = w.c.path("receipt.json");
    let receipt = w.ok(&["audit", "receipt", &(size - 1).to_string()]);
    std::fs::write(&receipt_file, receipt).unwrap();
    let receipt_s = receipt_file.to_str().unwrap();

    // Untampered: the witness and the receipt check out through the broker,
    // and a copy of the witness moves forward with --update.
    let ok = w.ok(&["audit", "verify", "--since", witness_s]);
    assert!(ok.contains("extends the witness file"), "{ok}");
    assert!(ok.contains("extends the head file"), "{ok}");
    w.ok(&["audit", "verify-receipt", receipt_s]);
    let moving = w.c.path("moving.json");
    std::fs::copy(&witness, &moving).unwrap();
    w.ok(&[
        "audit",
        "verify",
        "--since",
        moving.to_str().unwrap(),
        "--update",
    ]);
    let moved: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&moving).unwrap()).unwrap();
    assert_eq!(moved["checkpoint"]["size"].as_u64(), Some(size));

    // The broker's head file is a witness too, but only it writes there.
    let head = w.c.path("broker/audit.db.head");
    w.ok(&["audit", "verify", "--since", head.to_str().unwrap()]);
    let out = w.run(&[
        "audit",
        "verify",
        "--since",
        head.to_str().unwrap(),
        "--update",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    // Offline, with the broker stopped: still good.
    w.c.broker.as_mut().unwrap().stop();
    let db = w.c.path("broker/audit.db");
    let offline = keys_args(&w, &db);
    let out = run_with(&w, &["audit", "verify", "--since", witness_s], &offline);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run_with(&w, &["audit", "verify-receipt", receipt_s], &offline);
    assert!(out.status.success(), "{}", stderr(&out));

    // Delete the newest events, below the witnessed size, together with
    // their checkpoints: a shorter log that is consistent in itself.
    let cut = witnessed_size - 1;
    let conn = rusqlite::Connection::open(&db).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    assert_eq!(tables, ["checkpoints", "followed_logs", "leaves", "meta"]);
    conn.execute_batch(&format!(
        "DELETE FROM leaves WHERE idx >= {cut}; DELETE FROM checkpoints WHERE size > {cut};"
    ))
    .unwrap();
    drop(conn);

    // The broker's head file names the bigger size...
    let out = run_with(&w, &["audit", "verify"], &offline);
    let err = assert_verify_fails(&out, "log truncated: witnessed ");
    assert!(err.contains(&format!("events, log has {cut}")), "{err}");
    assert!(err.contains("audit.db.head"), "{err}");
    // ...so does the witness file, and the receipt's event is gone.
    let out = run_with(&w, &["audit", "verify", "--since", witness_s], &offline);
    let err = assert_verify_fails(
        &out,
        &format!("log truncated: witnessed {witnessed_size} events, log has {cut}"),
    );
    assert!(err.contains("witness.json"), "{err}");
    let out = run_with(&w, &["audit", "verify-receipt", receipt_s], &offline);
    let err = assert_verify_fails(&out, "log truncated");
    assert!(
        err.contains(&format!("receipt of event #{}", size - 1)),
        "{err}"
    );
    // The broker will not append onto it.
    let log = broker_refuses_to_start(&w);
    assert!(log.contains("does not extend its head file"), "{log}");
    assert!(log.contains("--dangerously-accept-audit-log-loss"), "{log}");

    // An attacker who also deletes the head file and the log's note of it
    // gets a broker that starts and a log that verifies alone, but not
    // against the witness or the receipt, checked through the broker.
    std::fs::remove_file(w.c.path("broker/audit.db.head")).unwrap();
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute("DELETE FROM meta WHERE key = 'head_file'", [])
        .unwrap();
    let out = run_with(&w, &["audit", "verify"], &offline);
    assert!(out.status.success(), "{}", stderr(&out));
    w.c.start_broker("127.0.0.1:0", "1h");
    w.ok(&["audit", "verify"]);
    let out = w.run(&["audit", "verify", "--since", witness_s]);
    assert_verify_fails(
        &out,
        &format!("log truncated: witnessed {witnessed_size} events, log has {cut}"),
    );
    let out = w.run(&["audit", "verify", "--since", witness_s, "--update"]);
    assert_verify_fails(&out, "log truncated");
    let kept: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&witness).unwrap()).unwrap();
    assert_eq!(kept, witnessed, "a failed check must not move the witness");
    let out = w.run(&["audit", "verify-receipt", receipt_s]);
    assert_verify_fails(&out, "log truncated");
}
