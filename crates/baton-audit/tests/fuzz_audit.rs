//! Fuzz-style property tests for baton-audit's decoders of stored and
//! received bytes: canonical event encodings (`decode_canonical`), receipts
//! and checkpoints as JSON (`verify_receipt`, `verify_consistency`,
//! `SignedCheckpoint::verify`), Merkle proofs (`merkle::verify_*`), events
//! built from tool servers' reports (`AuditEvent::from_tool_call`, then
//! `append`), and a stored log whose rows were tampered with at the SQL
//! level (`AuditLog::verify_file`).
//!
//! Never a panic; what verifies is consistent. Bounded for CI;
//! `PROPTEST_CASES` runs longer (see `fuzz/README.md`).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

#[path = "../../../tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::path::PathBuf;
use std::sync::OnceLock;

use baton_audit::merkle::{self, Hash};
use baton_audit::{
    AuditEvent, AuditKeys, AuditLog, EventKind, Receipt, ReceiptLeaf, SignedCheckpoint,
    decode_canonical, verify_consistency, verify_receipt,
};
use baton_core::TaskId;
use baton_core::api::ToolCallReport;
use fuzz_support::*;
use proptest::prelude::*;
use serde_json::{Value, json};

const TASK: &str = "task-0123456789abcdef0123456789abcdef";

struct Fixture {
    _dir: tempfile::TempDir,
    path: PathBuf,
    public_key: Vec<u8>,
    /// Canonical bytes of every stored event.
    events: Vec<Vec<u8>>,
    receipts: Vec<Receipt>,
    /// A consistency proof from size 3 to size 7.
    proof: Vec<String>,
    old: SignedCheckpoint,
    new: SignedCheckpoint,
}

fn sample_events() -> Vec<AuditEvent> {
    let task: TaskId = TASK.parse().unwrap();
    let mut out = Vec::new();
    let mut e = AuditEvent::new(EventKind::TaskStarted, 1, task.clone());
    e.initiator = Some("alice".into());
    e.purpose = Some("support".parse().unwrap());
    out.push(e);
    let mut e = AuditEvent::new(EventKind::HopGranted, 2, task.clone());
    e.actor = Some("spiffe://example.org/a".parse().unwrap());
    e.target = Some("spiffe://example.org/b".parse().unwrap());
    e.justification = Some("why".into());
    e.depth = Some(1);
    out.push(e);
    out.push(AuditEvent::from_tool_call(&report(), None));
    for i in 0..4 {
        out.push(AuditEvent::new(EventKind::TaskEnded, 10 + i, task.clone()));
    }
    out
}

fn report() -> ToolCallReport {
    serde_json::from_value(report_json()).unwrap()
}

fn report_json() -> Value {
    json!({
        "report_id": "r1", "task_id": TASK, "token_jti": "j", "agent": "spiffe://example.org/a",
        "tool": "crm.search", "resource": "case/1", "risk": "read",
        "scope_used": ["tool:crm.search:read"], "input_digest": "00", "decision": "allow",
        "policy_ids": ["p1"], "at": 1
    })
}

fn fx() -> &'static Fixture {
    static FX: OnceLock<Fixture> = OnceLock::new();
    FX.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.db");
        let log = AuditLog::open(&path, AuditKeys::generate().unwrap()).unwrap();
        let mut receipts = Vec::new();
        let mut events = Vec::new();
        for (i, e) in sample_events().iter().enumerate() {
            receipts.push(log.append(e).unwrap());
            events.push(log.event_bytes(i as u64).unwrap());
        }
        let proof = log.consistency_proof(3, 7).unwrap();
        Fixture {
            public_key: log.public_key().to_vec(),
            old: log.checkpoint(3).unwrap().unwrap(),
            new: log.checkpoint(7).unwrap().unwrap(),
            proof,
            events,
            receipts,
            path,
            _dir: dir,
        }
    })
}

fn check_canonical(bytes: &[u8]) {
    if let Ok(ev) = decode_canonical(bytes) {
        // Canonical means one encoding: re-encoding gives the same bytes.
        assert_eq!(serde_json::to_vec(&ev).unwrap(), bytes);
    }
}

fn check_receipt_json(v: &Value) {
    let f = fx();
    if let Ok(r) = serde_json::from_value::<Receipt>(v.clone()) {
        for leaf in &f.events {
            if verify_receipt(&r, ReceiptLeaf::Canonical(leaf), &f.public_key).is_ok() {
                // Only a receipt for that very event verifies.
                assert!(f.receipts.iter().any(|g| g.leaf_hash == r.leaf_hash));
            }
        }
        let _ = verify_receipt(&r, ReceiptLeaf::Hash(&[0u8; 32]), &f.public_key);
        let _ = verify_receipt(&r, ReceiptLeaf::Canonical(&f.events[0]), &[]);
        let _ = r.checkpoint.verify(&f.public_key);
    }
}

#[test]
fn fuzz_seeds_are_valid() {
    let f = fx();
    for (r, e) in f.receipts.iter().zip(&f.events) {
        decode_canonical(e).unwrap();
        verify_receipt(r, ReceiptLeaf::Canonical(e), &f.public_key).unwrap();
    }
    verify_consistency(&f.old, &f.new, &f.proof, &f.public_key).unwrap();
    AuditLog::verify_file(&f.path, &f.public_key).unwrap();
}

#[test]
fn fuzz_merkle_extreme_sizes() {
    let h = [7u8; 32];
    for (index, size) in [
        (0, 0),
        (0, 1),
        (u64::MAX - 1, u64::MAX),
        (0, u64::MAX),
        (u64::MAX, u64::MAX),
    ] {
        for n in [0, 1, 64, 65] {
            let proof = vec![h; n];
            let _ = merkle::verify_inclusion(&h, index, size, &proof, &h);
            let _ = merkle::verify_consistency(index, &h, size, &h, &proof);
        }
    }
}

/// Runs `sql` against a copy of the fixture's log, then verifies the copy.
fn tamper(sql: &str, params: &[&dyn rusqlite::ToSql]) {
    let f = fx();
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("audit.db");
    // The WAL holds recent writes: copy through SQLite, not the file.
    {
        let src = rusqlite::Connection::open(&f.path).unwrap();
        src.execute("VACUUM INTO ?1", [copy.to_str().unwrap()])
            .unwrap();
    }
    {
        let conn = rusqlite::Connection::open(&copy).unwrap();
        let _ = conn.execute(sql, params);
    }
    let _ = AuditLog::verify_file(&copy, &f.public_key);
    let _ = AuditLog::open(&copy, AuditKeys::generate().unwrap());
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn fuzz_canonical_arbitrary(b in proptest::collection::vec(any::<u8>(), 0..300)) {
        check_canonical(&b);
    }

    #[test]
    fn fuzz_canonical_mutated_text(
        s in proptest::sample::select(fx().events.clone())
            .prop_flat_map(|e| mutated(String::from_utf8(e).unwrap(), 3))
    ) {
        check_canonical(s.as_bytes());
    }

    #[test]
    fn fuzz_canonical_mutated_json(
        v in proptest::sample::select(fx().events.clone())
            .prop_map(|e| serde_json::from_slice::<Value>(&e).unwrap())
            .prop_flat_map(|v| mutated_json(v, 3))
    ) {
        check_canonical(&serde_json::to_vec(&v).unwrap());
    }

    #[test]
    fn fuzz_receipt_json(
        v in prop_oneof![
            hostile_json(),
            proptest::sample::select(fx().receipts.clone())
                .prop_map(|r| serde_json::to_value(r).unwrap())
                .prop_flat_map(|v| mutated_json(v, 3)),
        ]
    ) {
        check_receipt_json(&v);
    }

    #[test]
    fn fuzz_receipt_text(
        s in proptest::sample::select(fx().receipts.clone())
            .prop_map(|r| serde_json::to_string(&r).unwrap())
            .prop_flat_map(|s| mutated(s, 3))
    ) {
        if let Ok(v) = serde_json::from_str::<Value>(&s) {
            check_receipt_json(&v);
        }
    }

    #[test]
    fn fuzz_consistency(
        old in Just(serde_json::to_value(&fx().old).unwrap()).prop_flat_map(|v| mutated_json(v, 2)),
        proof in proptest::collection::vec(
            prop_oneof!["[0-9a-fA-F]{0,70}", "\\PC{0,10}", Just("00".repeat(32))],
            0..6,
        ),
        key in prop_oneof![
            Just(fx().public_key.clone()),
            proptest::collection::vec(any::<u8>(), 0..100),
            Just(fx().public_key.clone()).prop_flat_map(|k| mutated_bytes(k, 2)),
        ],
    ) {
        let f = fx();
        if let Ok(old) = serde_json::from_value::<SignedCheckpoint>(old) {
            let _ = verify_consistency(&old, &f.new, &f.proof, &key);
            let _ = verify_consistency(&old, &f.new, &proof, &key);
            let _ = verify_consistency(&f.new, &old, &proof, &f.public_key);
        }
        let _ = verify_consistency(&f.old, &f.new, &proof, &f.public_key);
    }

    #[test]
    fn fuzz_merkle(
        index in any::<u64>(),
        size in prop_oneof![any::<u64>(), 0u64..20],
        proof in proptest::collection::vec(any::<[u8; 32]>(), 0..70),
        leaf in any::<[u8; 32]>(),
    ) {
        let root: Hash = leaf;
        let _ = merkle::verify_inclusion(&leaf, index % size.max(1), size, &proof, &root);
        let _ = merkle::verify_inclusion(&leaf, index, size, &proof, &root);
        let _ = merkle::verify_consistency(index, &leaf, size, &root, &proof);
        let _ = merkle::verify_consistency(index % (size.max(1)), &leaf, size, &root, &proof);
    }

    #[test]
    fn fuzz_tool_call_reports(v in Just(report_json()).prop_flat_map(|v| mutated_json(v, 3))) {
        if let Ok(r) = serde_json::from_value::<ToolCallReport>(v) {
            let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
            let event = AuditEvent::from_tool_call(&r, None);
            if i64::try_from(event.at).is_err() {
                // Refused with its reason, and the log stays usable.
                let err = log.append(&event).unwrap_err().to_string();
                prop_assert!(err.contains("beyond what the log stores"), "{}", err);
                log.verify().unwrap();
                return Ok(());
            }
            let receipt = log.append(&event).unwrap();
            let bytes = log.event_bytes(0).unwrap();
            decode_canonical(&bytes).unwrap();
            verify_receipt(&receipt, ReceiptLeaf::Canonical(&bytes), log.public_key()).unwrap();
        }
    }

    #[test]
    fn fuzz_audit_event_json(
        v in Just(serde_json::to_value(&sample_events()[1]).unwrap()).prop_flat_map(|v| mutated_json(v, 3))
    ) {
        if let Ok(e) = serde_json::from_value::<AuditEvent>(v) {
            let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
            if log.append(&e).is_ok() {
                decode_canonical(&log.event_bytes(0).unwrap()).unwrap();
                log.verify().unwrap();
            }
        }
    }
}

proptest! {
    // Each case copies and re-verifies a whole log file: fewer cases.
    #![proptest_config(config(48))]

    #[test]
    fn fuzz_stored_log_tampered(
        which in 0usize..8,
        idx in prop_oneof![0i64..8, any::<i64>()],
        blob in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..120),
            proptest::sample::select(fx().events.clone()).prop_flat_map(|e| mutated_bytes(e, 3)),
        ],
        text in prop_oneof!["\\PC{0,70}", "[0-9a-f]{64}", Just("NaN".to_owned())],
        n in any::<i64>(),
    ) {
        let sqls: [(&str, Vec<&dyn rusqlite::ToSql>); 8] = [
            ("UPDATE leaves SET event = ?1 WHERE idx = ?2", vec![&blob, &idx]),
            ("UPDATE leaves SET leaf_hash = ?1 WHERE idx = ?2", vec![&blob, &idx]),
            ("UPDATE leaves SET idx = ?1 WHERE idx = ?2", vec![&n, &idx]),
            ("UPDATE leaves SET clear_text = ?1 WHERE idx = ?2", vec![&text, &idx]),
            ("UPDATE checkpoints SET root_hash = ?1 WHERE size = ?2", vec![&text, &idx]),
            ("UPDATE checkpoints SET size = ?1, at = ?1 WHERE size = ?2", vec![&n, &idx]),
            ("UPDATE checkpoints SET signature = ?1 WHERE size = ?2", vec![&text, &idx]),
            ("UPDATE meta SET value = ?1", vec![&text]),
        ];
        let (sql, params) = &sqls[which];
        tamper(sql, params);
    }
}
