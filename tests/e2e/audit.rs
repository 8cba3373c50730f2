//! The audit log proves itself: tampering with one byte, deleting an event
//! or reordering two makes `baton audit verify` fail and name where; an
//! inclusion receipt from the API verifies offline with the public key.

use std::path::Path;

use base64::Engine;

use crate::delegation::{PLANNER, RESEARCHER, World};

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
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        reqwest::Client::builder()
            .unix_socket(w.c.admin_socket())
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
