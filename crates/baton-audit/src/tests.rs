//! Tests of the log as the broker and the CLI use it: appends and receipts,
//! tampering with a real SQLite file, redaction, traces.

use std::path::Path;
use std::str::FromStr;

use baton_core::{Purpose, RiskTier, Scope, SpiffeId, TaskId};
use rusqlite::Connection;

use crate::*;

const INITIATOR: &str = "alice@example.com";
const JUSTIFICATION: &str = "customer 4411 asked about invoice 93";
const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

fn id(path: &str) -> SpiffeId {
    SpiffeId::parse(&format!("spiffe://example.org{path}")).unwrap()
}

fn task(n: u8) -> TaskId {
    TaskId::from_random([n; 16])
}

fn scope(items: &[&str]) -> Scope {
    Scope::parse(items).unwrap()
}

/// A small task: start, a granted hop, its redeem, two tool calls, a refused
/// hop, a purpose change and the end.
fn task_events(t: &TaskId, at: u64) -> Vec<AuditEvent> {
    let purpose = Purpose::from_str("support.case-research").unwrap();
    let mut start = AuditEvent::new(EventKind::TaskStarted, at, t.clone());
    start.actor = Some(id("/agents/planner"));
    start.initiator = Some(INITIATOR.into());
    start.purpose = Some(purpose.clone());
    start.scope = Some(scope(&["tool:crm.search:read", "dataset:crm:read"]));
    start.depth = Some(0);
    start.token_jti = Some("jti-root".into());

    let mut hop = AuditEvent::new(EventKind::HopGranted, at + 1, t.clone());
    hop.actor = Some(id("/agents/planner"));
    hop.target = Some(id("/agents/researcher"));
    hop.parent_jti = Some("jti-root".into());
    hop.purpose = Some(purpose.clone());
    hop.scope = Some(scope(&["tool:crm.search:read"]));
    hop.depth = Some(1);
    hop.decision = Some("granted".into());
    hop.justification = Some(JUSTIFICATION.into());
    hop.policy_ids = vec!["hop-default".into()];
    hop.trace_id = Some(TRACE.parse().unwrap());

    let mut redeem = AuditEvent::new(EventKind::Redeemed, at + 2, t.clone());
    redeem.actor = Some(id("/agents/researcher"));
    redeem.token_jti = Some("jti-r1".into());
    redeem.parent_jti = Some("jti-root".into());

    let mut call = AuditEvent::new(EventKind::ToolCall, at + 3, t.clone());
    call.actor = Some(id("/agents/researcher"));
    call.target = Some(id("/tools/crm"));
    call.token_jti = Some("jti-r1".into());
    call.tool = Some("crm.search".into());
    call.resource = Some("dataset:crm".into());
    call.risk = Some(RiskTier::Read);
    call.decision = Some("allow".into());
    call.policy_ids = vec!["crm-read".into(), "purpose-match".into()];
    call.input_digest = Some("ab".repeat(32));
    call.output_digest = Some("cd".repeat(32));

    let mut denied = call.clone();
    denied.at = at + 4;
    denied.tool = Some("crm.export".into());
    denied.risk = Some(RiskTier::Export);
    denied.decision = Some("deny".into());
    denied.reason = Some("export not in scope".into());
    denied.policy_ids = vec!["forbid-export".into()];
    denied.output_digest = None;

    let mut refused = AuditEvent::new(EventKind::HopRefused, at + 5, t.clone());
    refused.actor = Some(id("/agents/researcher"));
    refused.target = Some(id("/agents/mailer"));
    refused.parent_jti = Some("jti-r1".into());
    refused.scope = Some(scope(&["tool:mail.send:write"]));
    refused.depth = Some(2);
    refused.decision = Some("refused".into());
    refused.reason = Some("scope widens: tool:mail.send:write".into());

    let mut change = AuditEvent::new(EventKind::PurposeChanged, at + 6, t.clone());
    change.actor = Some(id("/agents/planner"));
    change.purpose = Some(Purpose::from_str("support.billing").unwrap());

    let mut end = AuditEvent::new(EventKind::TaskEnded, at + 7, t.clone());
    end.actor = Some(id("/agents/planner"));
    end.reason = Some("completed".into());

    vec![start, hop, redeem, call, denied, refused, change, end]
}

fn filled_file(dir: &Path, n_tasks: u8) -> (std::path::PathBuf, Vec<u8>, Vec<Receipt>) {
    let path = dir.join("audit.db");
    let keys = AuditKeys::load_or_create(&dir.join("keys")).unwrap();
    let pk = keys.public_key().to_vec();
    let log = AuditLog::open(&path, keys).unwrap();
    let mut receipts = Vec::new();
    for t in 0..n_tasks {
        for e in task_events(&task(t), 1_700_000_000 + u64::from(t) * 10) {
            receipts.push(log.append(&e).unwrap());
        }
    }
    drop(log);
    (path, pk, receipts)
}

fn fast_opts() -> VerifyOptions {
    VerifyOptions {
        signatures: SignatureCheck::Newest,
        kept: Vec::new(),
    }
}

fn reopen(dir: &Path, path: &Path) -> Result<AuditLog, AuditError> {
    AuditLog::open(path, AuditKeys::load_or_create(&dir.join("keys")).unwrap())
}

/// Asserts both `verify_file` and `open` reject the file, naming `index`.
fn assert_tampered(dir: &Path, path: &Path, pk: &[u8], index: Option<u64>) -> TamperReason {
    let e = AuditLog::verify_file(path, pk).unwrap_err();
    assert_eq!(e.first_bad_index, index, "{e}");
    let fast = AuditLog::verify_file_with(path, pk, &fast_opts()).unwrap_err();
    assert_eq!(fast, e, "fast verification disagrees");
    match reopen(dir, path) {
        Err(AuditError::Tampered(t)) => assert_eq!(t, e, "open and verify disagree"),
        other => panic!("open should refuse a tampered log, got {other:?}"),
    }
    e.reason
}

#[test]
fn receipts_verify_offline_with_only_the_public_key() {
    let keys = AuditKeys::generate().unwrap();
    let spki = keys.public_key_spki_der();
    let log = AuditLog::in_memory(keys).unwrap();
    let pk = log.public_key().to_vec();
    let mut receipts = Vec::new();
    for e in task_events(&task(1), 100) {
        let bytes = log.canonical_bytes(&e).unwrap();
        let r = log.append(&e).unwrap();
        // Round-trip through JSON as the broker's API would.
        let r: Receipt = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        verify_receipt(&r, ReceiptLeaf::Canonical(&bytes), &pk).unwrap();
        verify_receipt(&r, ReceiptLeaf::Canonical(&bytes), &spki).unwrap();
        assert_eq!(log.event_bytes(r.index).unwrap(), bytes);
        // Another event's bytes, another key, a changed index all fail.
        assert_eq!(
            verify_receipt(&r, ReceiptLeaf::Canonical(b"{}"), &pk),
            Err(ProofError::LeafMismatch)
        );
        let other = AuditKeys::generate().unwrap();
        assert_eq!(
            verify_receipt(&r, ReceiptLeaf::Canonical(&bytes), other.public_key()),
            Err(ProofError::BadSignature)
        );
        if r.index > 0 {
            let mut moved = r.clone();
            moved.index -= 1;
            assert!(verify_receipt(&moved, ReceiptLeaf::Canonical(&bytes), &pk).is_err());
        }
        receipts.push(r);
    }
    // Old receipts' checkpoints are consistent with every later one.
    for old in &receipts {
        for new in &receipts {
            if new.checkpoint.size < old.checkpoint.size {
                continue;
            }
            let proof = log
                .consistency_proof(old.checkpoint.size, new.checkpoint.size)
                .unwrap();
            verify_consistency(&old.checkpoint, &new.checkpoint, &proof, &pk).unwrap();
        }
    }
    // A fresh receipt against the newest checkpoint verifies too.
    let latest = log.latest_checkpoint().unwrap().unwrap();
    for i in 0..log.size().unwrap() {
        let r = log.receipt(i).unwrap();
        assert_eq!(r.checkpoint, latest);
        let h = proof::parse_hash(&r.leaf_hash, "leaf").unwrap();
        verify_receipt(&r, ReceiptLeaf::Hash(&h), &pk).unwrap();
    }
    let report = log.verify().unwrap();
    assert_eq!(report.size, 8);
    assert_eq!(report.root, latest.root_hash);
    assert_eq!(report.checkpoints, 8);
}

#[test]
fn checkpoint_signature_is_over_the_documented_message() {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, UnparsedPublicKey};
    use base64::Engine as _;
    let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    let r = log.append(&task_events(&task(2), 5)[0]).unwrap();
    let cp = &r.checkpoint;
    let msg = format!("baton-audit-checkpoint\n1\n{}\n5\n", cp.root_hash);
    let sig = base64::engine::general_purpose::STANDARD
        .decode(&cp.signature)
        .unwrap();
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, log.public_key())
        .verify(msg.as_bytes(), &sig)
        .unwrap();
    // A one-leaf tree's root is the leaf hash.
    assert_eq!(cp.root_hash, r.leaf_hash);
    assert!(r.inclusion_proof.is_empty());
}

#[test]
fn checkpoint_times_never_go_backwards() {
    let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    let t = task(3);
    let a = log
        .append(&AuditEvent::new(EventKind::ToolCall, 50, t.clone()))
        .unwrap();
    let b = log
        .append(&AuditEvent::new(EventKind::ToolCall, 40, t))
        .unwrap();
    assert_eq!(a.checkpoint.at, 50);
    assert_eq!(b.checkpoint.at, 50);
}

#[test]
fn canonical_encoding_is_sorted_compact_and_hmacs_sensitive_values() {
    let keys = AuditKeys::generate().unwrap();
    for e in task_events(&task(4), 7) {
        let bytes = event::canonical_bytes(&e, &keys).unwrap();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            !text.contains(INITIATOR) && !text.contains(JUSTIFICATION),
            "{text}"
        );
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        // Compact: re-serializing the parsed value gives the same bytes.
        assert_eq!(serde_json::to_vec(&v).unwrap(), bytes);
        let obj = v.as_object().unwrap();
        let keys_in_order: Vec<&str> = {
            // Key order as written, from the raw text.
            let mut found: Vec<(usize, &str)> = obj
                .keys()
                .map(|k| (text.find(&format!("\"{k}\":")).unwrap(), k.as_str()))
                .collect();
            found.sort();
            found.into_iter().map(|(_, k)| k).collect()
        };
        let mut sorted = keys_in_order.clone();
        sorted.sort();
        assert_eq!(keys_in_order, sorted);
        assert!(obj.values().all(|v| !v.is_null()));
        if let Some(mac) = obj.get("initiator_hmac") {
            assert_eq!(mac.as_str().unwrap(), keys.hmac_hex(INITIATOR));
        }
        let decoded = decode_canonical(&bytes).unwrap();
        assert_eq!(decoded.kind, e.kind);
        assert_eq!(decoded.scope, e.scope);
        // Non-canonical spellings of the same event are refused.
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        assert!(decode_canonical(&pretty).is_err());
    }
}

#[test]
fn an_event_without_a_trace_id_encodes_exactly_as_before_the_field_existed() {
    // Logs written before `trace_id` existed must verify unchanged: their
    // events re-encode to the same bytes; one with a trace id places it
    // between `tool` and `v`.
    let keys = AuditKeys::generate().unwrap();
    let t = task(9);
    let mut e = AuditEvent::new(EventKind::Redeemed, 9, t.clone());
    e.actor = Some(id("/agents/a"));
    e.token_jti = Some("j".into());
    e.tool = Some("crm.search".into());
    let old = format!(
        r#"{{"actor":"spiffe://example.org/agents/a","at":9,"kind":"redeemed","task_id":"{t}","token_jti":"j","tool":"crm.search","v":1}}"#
    );
    assert_eq!(event::canonical_bytes(&e, &keys).unwrap(), old.as_bytes());
    assert_eq!(decode_canonical(old.as_bytes()).unwrap().trace_id, None);
    e.trace_id = Some(TRACE.parse().unwrap());
    let new = old.replace(
        r#""tool":"crm.search","v":1"#,
        &format!(r#""tool":"crm.search","trace_id":"{TRACE}","v":1"#),
    );
    assert_eq!(event::canonical_bytes(&e, &keys).unwrap(), new.as_bytes());
    let decoded = decode_canonical(new.as_bytes()).unwrap();
    assert_eq!(
        decoded.trace_id.map(|t| t.to_string()).as_deref(),
        Some(TRACE)
    );
    // Not a trace id: refused as a canonical event.
    let zero = old.replace(
        r#""v":1"#,
        r#""trace_id":"00000000000000000000000000000000","v":1"#,
    );
    assert!(decode_canonical(zero.as_bytes()).is_err());
}

#[test]
fn hmac_columns_never_hold_clear_text_and_redaction_keeps_the_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 2);
    let raw = Connection::open(&path).unwrap();
    let mut stmt = raw.prepare("SELECT event, clear_text FROM leaves").unwrap();
    let rows: Vec<(Vec<u8>, Option<String>)> = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut clear_seen = false;
    for (event, clear) in &rows {
        let text = String::from_utf8(event.clone()).unwrap();
        assert!(!text.contains(INITIATOR) && !text.contains(JUSTIFICATION));
        clear_seen |= clear.as_deref().is_some_and(|c| c.contains(INITIATOR));
    }
    assert!(clear_seen, "clear text is kept for display until redacted");
    drop(stmt);
    drop(raw);

    let log = reopen(dir.path(), &path).unwrap();
    let recs = log.events_for_task(&task(0)).unwrap();
    assert_eq!(recs[0].event.initiator.as_deref(), Some(INITIATOR));
    assert_eq!(recs[1].event.justification.as_deref(), Some(JUSTIFICATION));
    assert_eq!(recs[0].initiator_hmac, Some(log.hmac(INITIATOR)));

    assert_eq!(log.redact_clear_text(Some(&task(0))).unwrap(), 2);
    let recs = log.events_for_task(&task(0)).unwrap();
    assert_eq!(recs[0].event.initiator, None);
    assert_eq!(recs[1].event.justification, None);
    assert_eq!(recs[0].initiator_hmac, Some(log.hmac(INITIATOR)));
    // The other task keeps its clear text; then wipe everything.
    assert!(
        log.events_for_task(&task(1)).unwrap()[0]
            .event
            .initiator
            .is_some()
    );
    assert_eq!(log.redact_clear_text(None).unwrap(), 2);
    log.verify().unwrap();
    drop(log);
    AuditLog::verify_file(&path, &pk).unwrap();
    let raw = Connection::open(&path).unwrap();
    let n: i64 = raw
        .query_row(
            "SELECT count(*) FROM leaves WHERE clear_text IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 0);
}

#[test]
fn altered_clear_text_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = filled_file(dir.path(), 1);
    Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE leaves SET clear_text = '{\"initiator\":\"mallory\"}' WHERE idx = 0",
            [],
        )
        .unwrap();
    let log = reopen(dir.path(), &path).unwrap();
    let e = log.verify().unwrap_err();
    assert_eq!(e.first_bad_index, Some(0));
    assert_eq!(
        e.reason,
        TamperReason::ClearTextMismatch { field: "initiator" }
    );
    assert!(matches!(
        log.events_for_task(&task(0)),
        Err(AuditError::Tampered(_))
    ));
}

#[test]
fn untouched_file_verifies_and_reopens() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, receipts) = filled_file(dir.path(), 3);
    let report = AuditLog::verify_file(&path, &pk).unwrap();
    assert_eq!(report.size, 24);
    assert_eq!(report.root, receipts[23].checkpoint.root_hash);
    let log = reopen(dir.path(), &path).unwrap();
    assert_eq!(log.size().unwrap(), 24);
    let r = log.append(&task_events(&task(9), 1)[0]).unwrap();
    assert_eq!(r.index, 24);
    let proof = log.consistency_proof(24, 25).unwrap();
    verify_consistency(&receipts[23].checkpoint, &r.checkpoint, &proof, &pk).unwrap();
}

#[test]
fn flipped_byte_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 2);
    let raw = Connection::open(&path).unwrap();
    let mut ev: Vec<u8> = raw
        .query_row("SELECT event FROM leaves WHERE idx = 11", [], |r| r.get(0))
        .unwrap();
    // Flip one byte inside the `at` value: still valid JSON, different event.
    let pos = ev.windows(5).position(|w| w == b"\"at\":").unwrap() + 6;
    ev[pos] ^= 0x01;
    raw.execute("UPDATE leaves SET event = ?1 WHERE idx = 11", [&ev])
        .unwrap();
    drop(raw);
    assert_eq!(
        assert_tampered(dir.path(), &path, &pk, Some(11)),
        TamperReason::LeafHashMismatch
    );

    // Also rewriting the stored leaf hash does not help: the signed
    // checkpoint of size 12 no longer matches.
    let raw = Connection::open(&path).unwrap();
    let h = merkle::leaf_hash(&ev);
    raw.execute("UPDATE leaves SET leaf_hash = ?1 WHERE idx = 11", [&h[..]])
        .unwrap();
    drop(raw);
    assert_eq!(
        assert_tampered(dir.path(), &path, &pk, Some(11)),
        TamperReason::RootMismatch {
            checkpoint_size: 12
        }
    );
}

#[test]
fn deleted_event_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 2);
    let raw = Connection::open(&path).unwrap();
    raw.execute("DELETE FROM leaves WHERE idx = 5", []).unwrap();
    drop(raw);
    assert_eq!(
        assert_tampered(dir.path(), &path, &pk, Some(5)),
        TamperReason::IndexGap {
            expected: 5,
            found: 6
        }
    );
    // Renumbering the rest to close the gap shifts every later event.
    let raw = Connection::open(&path).unwrap();
    for i in 6..16 {
        raw.execute("UPDATE leaves SET idx = ?1 WHERE idx = ?2", [i - 1, i])
            .unwrap();
    }
    drop(raw);
    assert_eq!(
        assert_tampered(dir.path(), &path, &pk, Some(5)),
        TamperReason::RootMismatch { checkpoint_size: 6 }
    );
}

#[test]
fn deleted_newest_event_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 1);
    let raw = Connection::open(&path).unwrap();
    raw.execute("DELETE FROM leaves WHERE idx = 7", []).unwrap();
    drop(raw);
    assert_eq!(
        assert_tampered(dir.path(), &path, &pk, Some(7)),
        TamperReason::CheckpointBeyondLog {
            checkpoint_size: 8,
            log_size: 7
        }
    );
}

/// Deletes the events from `from` on, with their checkpoints: what is left
/// is a shorter log that is consistent in itself.
fn cut(path: &Path, from: u64) {
    Connection::open(path)
        .unwrap()
        .execute_batch(&format!(
            "DELETE FROM leaves WHERE idx >= {from}; DELETE FROM checkpoints WHERE size > {from};"
        ))
        .unwrap();
}

/// Also deletes the head file and the log's note that it has one: the
/// attacker who knows about the head file.
fn cut_with_head(path: &Path, from: u64) {
    cut(path, from);
    std::fs::remove_file(head_path(path)).unwrap();
    Connection::open(path)
        .unwrap()
        .execute("DELETE FROM meta WHERE key = 'head_file'", [])
        .unwrap();
}

fn witness_opts(source: &str, cp: &SignedCheckpoint) -> VerifyOptions {
    VerifyOptions {
        signatures: SignatureCheck::Every,
        kept: vec![Kept::new(source, cp.clone())],
    }
}

#[test]
fn untampered_log_extends_its_head_file_and_witnesses() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, receipts) = filled_file(dir.path(), 2);
    assert!(head_path(&path).exists());
    let report = AuditLog::verify_file_with(
        &path,
        &pk,
        &witness_opts("witness", &receipts[9].checkpoint),
    )
    .unwrap();
    assert_eq!(report.size, 16);
    assert_eq!(report.head.as_ref(), Some(&receipts[15].checkpoint));
    assert_eq!(report.witnessed.len(), 2, "{:?}", report.witnessed);
    assert!(report.witnessed[1].contains("head file"));
    // Reopened, appended to, still extends both.
    let log = reopen(dir.path(), &path).unwrap();
    assert!(log.accepted_loss().is_none());
    log.append(&task_events(&task(7), 5)[0]).unwrap();
    log.verify_with(&witness_opts("witness", &receipts[15].checkpoint))
        .unwrap();
    drop(log);
    // A witness of the whole log passes too, and so does the remote form
    // of the check: a consistency proof between two signed heads.
    let log = reopen(dir.path(), &path).unwrap();
    let current = log.latest_checkpoint().unwrap().unwrap();
    for old in [&receipts[0].checkpoint, &receipts[15].checkpoint, &current] {
        let proof = log.consistency_proof(old.size, current.size).unwrap();
        check_extends(&Kept::new("w", old.clone()), &current, &proof, &pk).unwrap();
    }
}

#[test]
fn truncation_is_caught_by_the_head_file() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 2);
    cut(&path, 13);
    let e = AuditLog::verify_file(&path, &pk).unwrap_err();
    assert_eq!(e.first_bad_index, Some(13));
    let TamperReason::Truncated {
        witness,
        witnessed_size: 16,
        log_size: 13,
    } = &e.reason
    else {
        panic!("expected a truncation, got {e}");
    };
    assert!(witness.contains("head file"), "{witness}");
    assert!(
        e.to_string()
            .contains("log truncated: witnessed 16 events, log has 13"),
        "{e}"
    );
    // The broker refuses to append onto it...
    match reopen(dir.path(), &path) {
        Err(AuditError::Tampered(t)) => assert_eq!(t, e),
        other => panic!("open should refuse a truncated log, got {other:?}"),
    }
    // ...unless told, loudly, to accept the loss: the old head is set aside.
    let keys = AuditKeys::load_or_create(&dir.path().join("keys")).unwrap();
    let log = AuditLog::open_with_options(
        &path,
        keys,
        LogOptions {
            head: HeadPolicy::DangerouslyAcceptLoss,
            ..LogOptions::default()
        },
    )
    .unwrap();
    assert_eq!(log.accepted_loss(), Some(&e));
    let r = log.append(&task_events(&task(9), 5)[0]).unwrap();
    assert_eq!(r.index, 13);
    drop(log);
    AuditLog::verify_file(&path, &pk).unwrap();
    reopen(dir.path(), &path).unwrap();
    let rejected: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.starts_with("audit.db.head.rejected-"))
        .collect();
    assert_eq!(rejected.len(), 1, "{rejected:?}");
}

#[test]
fn a_deleted_head_file_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 1);
    std::fs::remove_file(head_path(&path)).unwrap();
    let e = AuditLog::verify_file(&path, &pk).unwrap_err();
    assert!(
        matches!(e.reason, TamperReason::HeadFileMissing { .. }),
        "{e}"
    );
    match reopen(dir.path(), &path) {
        Err(AuditError::Tampered(t)) => assert_eq!(t, e),
        other => panic!("open should refuse, got {other:?}"),
    }
    // A head file of another log (another key) is refused as such.
    let other = tempfile::tempdir().unwrap();
    let (other_path, _, _) = filled_file(other.path(), 1);
    std::fs::copy(head_path(&other_path), head_path(&path)).unwrap();
    let e = AuditLog::verify_file(&path, &pk).unwrap_err();
    assert!(
        matches!(e.reason, TamperReason::WitnessInvalid { .. }),
        "{e}"
    );
}

#[test]
fn a_torn_head_slot_falls_back_to_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, receipts) = filled_file(dir.path(), 1);
    let head = head_path(&path);
    let bytes = std::fs::read(&head).unwrap();
    assert_eq!(bytes.len(), 1024);
    // Garble the slot holding size 8: the other one (size 7) still counts.
    let newest = read_witness(&head).unwrap();
    assert_eq!(newest.checkpoint, receipts[7].checkpoint);
    let slot = (0..2)
        .find(|i| {
            let s = std::str::from_utf8(&bytes[i * 512..(i + 1) * 512]).unwrap();
            serde_json::from_str::<Witness>(s.trim())
                .unwrap()
                .checkpoint
                .size
                == 8
        })
        .unwrap();
    let mut torn = bytes.clone();
    torn[slot * 512 + 40] ^= 0x20;
    std::fs::write(&head, &torn).unwrap();
    AuditLog::verify_file(&path, &pk).unwrap();
    cut(&path, 6);
    let e = AuditLog::verify_file(&path, &pk).unwrap_err();
    assert!(
        matches!(
            e.reason,
            TamperReason::Truncated {
                witnessed_size: 7,
                log_size: 6,
                ..
            }
        ),
        "{e}"
    );
    // Both slots garbled: not a head file any more.
    std::fs::write(&head, vec![b'x'; 1024]).unwrap();
    let e = AuditLog::verify_file(&path, &pk).unwrap_err();
    assert!(
        matches!(e.reason, TamperReason::WitnessInvalid { .. }),
        "{e}"
    );
}

#[test]
fn truncation_is_caught_by_a_witness_file_when_the_head_file_goes_too() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, receipts) = filled_file(dir.path(), 2);
    let witness_file = dir.path().join("witness.json");
    write_witness(
        &witness_file,
        &Witness::new(&pk, receipts[15].checkpoint.clone()).unwrap(),
    )
    .unwrap();
    let witness = read_witness(&witness_file).unwrap();
    assert_eq!(witness.verify(&pk).unwrap().len(), 32);
    cut_with_head(&path, 13);
    // The log alone, head file and all, still verifies: this is the gap.
    AuditLog::verify_file(&path, &pk).unwrap();
    // An older witness still passes; the newest does not.
    AuditLog::verify_file_with(&path, &pk, &witness_opts("old", &receipts[12].checkpoint)).unwrap();
    let e = AuditLog::verify_file_with(
        &path,
        &pk,
        &witness_opts("witness.json", &witness.checkpoint),
    )
    .unwrap_err();
    assert_eq!(e.first_bad_index, Some(13));
    assert_eq!(
        e.reason,
        TamperReason::Truncated {
            witness: "witness.json".into(),
            witnessed_size: 16,
            log_size: 13
        }
    );
    // The same verdict from signed heads alone (a witness that cannot read
    // the log): the log's newest head is smaller than the witnessed one.
    let log = reopen(dir.path(), &path).unwrap();
    let current = log.latest_checkpoint().unwrap().unwrap();
    let e = check_extends(
        &Kept::new("witness.json", witness.checkpoint.clone()),
        &current,
        &[],
        &pk,
    )
    .unwrap_err();
    assert!(matches!(e.reason, TamperReason::Truncated { .. }), "{e}");
    // A witness of another log (another key) is refused as such.
    let other = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    let foreign = other.append(&task_events(&task(1), 1)[0]).unwrap();
    let w = Witness::new(other.public_key(), foreign.checkpoint.clone()).unwrap();
    assert!(
        w.verify(&pk)
            .unwrap_err()
            .contains("another checkpoint key")
    );
    let e = AuditLog::verify_file_with(&path, &pk, &witness_opts("foreign", &foreign.checkpoint))
        .unwrap_err();
    assert!(
        matches!(e.reason, TamperReason::WitnessInvalid { .. }),
        "{e}"
    );
}

#[test]
fn a_receipt_shows_whether_its_event_is_still_there() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, receipts) = filled_file(dir.path(), 2);
    // A receipt fetched later proves event #4 against a later head.
    let log = reopen(dir.path(), &path).unwrap();
    let later = log.receipt(4).unwrap();
    drop(log);
    let kept =
        |r: &Receipt| witness_opts(&format!("the receipt of event #{}", r.index), &r.checkpoint);
    AuditLog::verify_file_with(&path, &pk, &kept(&receipts[4])).unwrap();
    AuditLog::verify_file_with(&path, &pk, &kept(&later)).unwrap();
    cut_with_head(&path, 4);
    let e = AuditLog::verify_file_with(&path, &pk, &kept(&receipts[4])).unwrap_err();
    assert_eq!(
        e.reason,
        TamperReason::Truncated {
            witness: "the receipt of event #4".into(),
            witnessed_size: 5,
            log_size: 4
        }
    );
    let e = AuditLog::verify_file_with(&path, &pk, &kept(&later)).unwrap_err();
    assert!(
        matches!(
            e.reason,
            TamperReason::Truncated {
                witnessed_size: 16,
                ..
            }
        ),
        "{e}"
    );
}

#[test]
fn a_rewritten_and_resigned_log_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, receipts) = filled_file(dir.path(), 1);
    let head_before = std::fs::read(head_path(&path)).unwrap();
    // Whoever holds the signing key rebuilds the log elsewhere with one old
    // event changed (every checkpoint recomputed and signed with the same
    // key) and puts it in place of the real one.
    let forged_dir = tempfile::tempdir().unwrap();
    let forged = forged_dir.path().join("audit.db");
    let log = AuditLog::open(
        &forged,
        AuditKeys::load_or_create(&dir.path().join("keys")).unwrap(),
    )
    .unwrap();
    let mut events = task_events(&task(0), 1_700_000_000);
    events[3].decision = Some("deny".into());
    log.append_batch(&events).unwrap();
    drop(log);
    std::fs::copy(&forged, &path).unwrap();
    // Its own checkpoints all verify, but not against the head file left
    // in place...
    let e = AuditLog::verify_file(&path, &pk).unwrap_err();
    let TamperReason::Forked {
        witness,
        witnessed_size: 8,
        ..
    } = &e.reason
    else {
        panic!("expected a fork, got {e}");
    };
    assert!(witness.contains("head file"), "{witness}");
    assert!(e.to_string().contains("log forked/rewritten"), "{e}");
    assert!(matches!(reopen(dir.path(), &path), Err(AuditError::Tampered(t)) if t == e));
    // ...and with the forged head file too, not against a witness kept
    // elsewhere. Events before the change are still consistent.
    std::fs::copy(head_path(&forged), head_path(&path)).unwrap();
    assert_ne!(std::fs::read(head_path(&path)).unwrap(), head_before);
    AuditLog::verify_file(&path, &pk).unwrap();
    AuditLog::verify_file_with(&path, &pk, &witness_opts("w", &receipts[2].checkpoint)).unwrap();
    let e = AuditLog::verify_file_with(&path, &pk, &witness_opts("w", &receipts[5].checkpoint))
        .unwrap_err();
    assert_eq!(e.first_bad_index, None);
    assert!(
        matches!(
            e.reason,
            TamperReason::Forked {
                witnessed_size: 6,
                ..
            }
        ),
        "{e}"
    );
    let log = reopen(dir.path(), &path).unwrap();
    let current = log.latest_checkpoint().unwrap().unwrap();
    let proof = log.consistency_proof(6, current.size).unwrap();
    let e = check_extends(
        &Kept::new("w", receipts[5].checkpoint.clone()),
        &current,
        &proof,
        &pk,
    )
    .unwrap_err();
    assert!(matches!(e.reason, TamperReason::Forked { .. }), "{e}");
}

#[test]
fn witness_files_are_replaced_atomically_and_symlinks_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, pk, receipts) = filled_file(dir.path(), 1);
    let file = dir.path().join("w.json");
    for r in &receipts[..3] {
        write_witness(&file, &Witness::new(&pk, r.checkpoint.clone()).unwrap()).unwrap();
    }
    assert_eq!(
        read_witness(&file).unwrap().checkpoint,
        receipts[2].checkpoint
    );
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    let link = dir.path().join("link.json");
    std::os::unix::fs::symlink(&file, &link).unwrap();
    let e = write_witness(
        &link,
        &Witness::new(&pk, receipts[3].checkpoint.clone()).unwrap(),
    )
    .unwrap_err();
    assert!(e.to_string().contains("symbolic link"), "{e}");
    assert_eq!(
        read_witness(&file).unwrap().checkpoint,
        receipts[2].checkpoint
    );
    std::fs::write(&file, "{}").unwrap();
    assert!(read_witness(&file).is_err());
}

#[test]
fn reordered_events_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 2);
    let raw = Connection::open(&path).unwrap();
    // Swap whole rows 9 and 10 (events with their own leaf hashes).
    raw.execute_batch(
        "UPDATE leaves SET idx = -1 WHERE idx = 9;
         UPDATE leaves SET idx = 9 WHERE idx = 10;
         UPDATE leaves SET idx = 10 WHERE idx = -1;",
    )
    .unwrap();
    drop(raw);
    assert_eq!(
        assert_tampered(dir.path(), &path, &pk, Some(9)),
        TamperReason::RootMismatch {
            checkpoint_size: 10
        }
    );
}

#[test]
fn forged_or_altered_checkpoints_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 1);
    let raw = Connection::open(&path).unwrap();
    // Altered `at` of a middle checkpoint: the signature no longer covers it.
    raw.execute("UPDATE checkpoints SET at = at + 1 WHERE size = 3", [])
        .unwrap();
    drop(raw);
    let e = AuditLog::verify_file(&path, &pk).unwrap_err();
    assert_eq!(e.first_bad_index, None);
    assert_eq!(
        e.reason,
        TamperReason::CheckpointSignature { checkpoint_size: 3 }
    );
    // `open` checks only the newest checkpoint, which is intact; so does
    // the fast verification, which still checks every root.
    reopen(dir.path(), &path).unwrap();
    let r = AuditLog::verify_file_with(&path, &pk, &fast_opts()).unwrap();
    assert_eq!((r.checkpoints, r.signatures), (8, 1));

    // A checkpoint re-signed with another key, over the true root.
    let raw = Connection::open(&path).unwrap();
    raw.execute("UPDATE checkpoints SET at = at - 1 WHERE size = 3", [])
        .unwrap();
    let (root, at): (String, i64) = raw
        .query_row(
            "SELECT root_hash, at FROM checkpoints WHERE size = 8",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let mallory = AuditKeys::generate().unwrap();
    let sig = {
        use base64::Engine as _;
        base64::engine::general_purpose::STANDARD.encode(
            mallory
                .sign(&checkpoint_message(8, &root, at as u64))
                .unwrap(),
        )
    };
    raw.execute(
        "UPDATE checkpoints SET signature = ?1 WHERE size = 8",
        [&sig],
    )
    .unwrap();
    drop(raw);
    assert_eq!(
        assert_tampered(dir.path(), &path, &pk, None),
        TamperReason::CheckpointSignature { checkpoint_size: 8 }
    );
    // Verified with the forger's key, the events still betray nothing, but
    // every other checkpoint fails: the first is named.
    let e = AuditLog::verify_file(&path, mallory.public_key()).unwrap_err();
    assert_eq!(
        e.reason,
        TamperReason::CheckpointSignature { checkpoint_size: 1 }
    );
}

#[test]
fn the_earliest_of_several_faults_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 2);
    let raw = Connection::open(&path).unwrap();
    raw.execute("UPDATE checkpoints SET at = at + 1 WHERE size = 3", [])
        .unwrap();
    raw.execute("UPDATE leaves SET leaf_hash = x'00' WHERE idx = 11", [])
        .unwrap();
    let e = AuditLog::verify_file(&path, &pk).unwrap_err();
    assert_eq!(
        e.reason,
        TamperReason::CheckpointSignature { checkpoint_size: 3 }
    );
    raw.execute("UPDATE leaves SET leaf_hash = x'00' WHERE idx = 1", [])
        .unwrap();
    let e = AuditLog::verify_file(&path, &pk).unwrap_err();
    assert_eq!(e.first_bad_index, Some(1));
    assert_eq!(e.reason, TamperReason::LeafHashMismatch);
}

#[test]
fn inserted_unsigned_event_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 1);
    let keys = AuditKeys::load_or_create(&dir.path().join("keys")).unwrap();
    let e = &task_events(&task(0), 9)[3];
    let bytes = event::canonical_bytes(e, &keys).unwrap();
    let h = merkle::leaf_hash(&bytes);
    Connection::open(&path)
        .unwrap()
        .execute(
            "INSERT INTO leaves (idx, task_id, event, leaf_hash) VALUES (8, ?1, ?2, ?3)",
            rusqlite::params![task(0).as_str(), bytes, &h[..]],
        )
        .unwrap();
    assert_eq!(
        assert_tampered(dir.path(), &path, &pk, Some(8)),
        TamperReason::UnsignedTail {
            last_checkpoint_size: 8,
            log_size: 9
        }
    );
}

#[test]
fn moved_task_column_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 2);
    Connection::open(&path)
        .unwrap()
        .execute(
            "UPDATE leaves SET task_id = ?1 WHERE idx = 3",
            [task(1).as_str()],
        )
        .unwrap();
    assert_eq!(
        assert_tampered(dir.path(), &path, &pk, Some(3)),
        TamperReason::TaskColumnMismatch
    );
}

#[test]
fn reopening_with_other_keys_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = filled_file(dir.path(), 1);
    let e = AuditLog::open(&path, AuditKeys::generate().unwrap()).unwrap_err();
    assert!(matches!(e, AuditError::KeyMismatch { .. }), "{e}");
}

#[test]
fn a_concurrent_writer_poisons_appends() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = filled_file(dir.path(), 1);
    let log = reopen(dir.path(), &path).unwrap();
    log.append(&task_events(&task(5), 1)[0]).unwrap();
    Connection::open(&path)
        .unwrap()
        .execute("DELETE FROM checkpoints WHERE size = 9", [])
        .unwrap();
    let e = log.append(&task_events(&task(5), 1)[1]).unwrap_err();
    assert!(matches!(e, AuditError::ConcurrentWriter(_)), "{e}");
    let e = log.append(&task_events(&task(5), 1)[1]).unwrap_err();
    assert!(matches!(e, AuditError::Poisoned(_)), "{e}");
    // The in-memory tree was rolled back: proofs still match the 9 events.
    assert_eq!(log.size().unwrap(), 9);
}

#[test]
fn sqlite_failure_is_an_error_not_a_silent_loss() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = filled_file(dir.path(), 1);
    let log = reopen(dir.path(), &path).unwrap();
    // Another connection holds the write lock past the busy timeout.
    let blocker = Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = std::time::Instant::now();
    let e = log.append(&task_events(&task(6), 1)[0]).unwrap_err();
    assert!(matches!(e, AuditError::Sqlite(_)), "{e}");
    assert!(started.elapsed().as_secs() >= 4);
    blocker.execute_batch("ROLLBACK").unwrap();
    // Not poisoned: the next append goes through at the same index.
    let r = log.append(&task_events(&task(6), 1)[0]).unwrap();
    assert_eq!(r.index, 8);
    log.verify().unwrap();
}

#[test]
fn trace_of_a_small_task_renders_the_expected_tree() {
    let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    // Interleave another task to check only this one is drawn.
    let mut other = task_events(&task(8), 1);
    for (e, o) in task_events(&task(7), 1_700_000_000)
        .into_iter()
        .zip(other.drain(..))
    {
        log.append(&e).unwrap();
        log.append(&o).unwrap();
    }
    let recs = log.events_for_task(&task(7)).unwrap();
    assert_eq!(recs.len(), 8);
    let text = trace(&recs).render_text();
    let t = task(7);
    let expected = format!(
        "task {t}, purpose support.case-research, scope [dataset:crm:read, tool:crm.search:read], started at 1700000000
├─ initiator alice@example.com
├─ spiffe://example.org/agents/planner (root agent)
│  └─ hop → spiffe://example.org/agents/researcher: granted, depth 1, scope [tool:crm.search:read], purpose support.case-research, justification \"customer 4411 asked about invoice 93\", policies [hop-default], trace 4bf92f3577b34da6a3ce929d0e0e4736 #2
│     ├─ redeemed token jti-r1 #4
│     ├─ tool crm.search on dataset:crm (read): allow, policies [crm-read, purpose-match], reported by spiffe://example.org/tools/crm #6
│     ├─ tool crm.export on dataset:crm (export): deny (export not in scope), policies [forbid-export], reported by spiffe://example.org/tools/crm #8
│     └─ hop → spiffe://example.org/agents/mailer: REFUSED (scope widens: tool:mail.send:write), depth 2, scope [tool:mail.send:write] #10
├─ purpose changed → support.billing, by spiffe://example.org/agents/planner #12
└─ task ended, by spiffe://example.org/agents/planner, reason completed #14
"
    );
    assert_eq!(text, expected, "\n{text}");

    // JSON for `--json`.
    let json = serde_json::to_value(trace(&recs)).unwrap();
    assert_eq!(json["initiator"], INITIATOR);
    let hop = &json["root"]["items"][0];
    assert_eq!(hop["type"], "hop");
    assert_eq!(
        hop["delegate"]["agent"],
        "spiffe://example.org/agents/researcher"
    );
    assert_eq!(hop["delegate"]["items"][1]["tool"], "crm.search");
    assert_eq!(hop["trace_id"], TRACE);
    assert_eq!(json["trace_ids"], serde_json::json!([TRACE]));

    // After redaction the tree shows HMAC prefixes instead.
    log.redact_clear_text(None).unwrap();
    let text = trace(&log.events_for_task(&task(7)).unwrap()).render_text();
    assert!(!text.contains(INITIATOR) && !text.contains(JUSTIFICATION));
    assert!(text.contains("initiator [redacted, hmac "), "{text}");
    assert!(text.contains("justification [redacted, hmac "), "{text}");
}

#[test]
fn debug_output_hides_sensitive_values() {
    let e = &task_events(&task(1), 1)[1];
    let dbg = format!("{e:?}");
    assert!(!dbg.contains(JUSTIFICATION));
    let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    assert!(!format!("{log:?}").is_empty());
}

#[test]
fn tool_call_report_becomes_an_event() {
    let report = baton_core::api::ToolCallReport {
        report_id: "r1".into(),
        task_id: task(1),
        token_jti: "jti-r1".into(),
        agent: id("/agents/researcher"),
        tool: "crm.search".into(),
        resource: "dataset:crm".into(),
        risk: RiskTier::Read,
        scope_used: vec!["tool:crm.search:read".into()],
        input_digest: "00".repeat(32),
        output_digest: None,
        justification: Some(JUSTIFICATION.into()),
        decision: "allow".into(),
        policy_ids: vec!["p".into()],
        reason: None,
        at: 77,
        latency_ms: Some(12),
        upstream_status: Some(200),
        recorded: Default::default(),
        traceparent: None,
    };
    let e = AuditEvent::from_tool_call(&report, Some(id("/tools/crm")));
    assert_eq!(e.kind, EventKind::ToolCall);
    assert_eq!(e.actor, Some(id("/agents/researcher")));
    assert_eq!(e.scope, Some(scope(&["tool:crm.search:read"])));
    assert_eq!((e.latency_ms, e.upstream_status), (Some(12), Some(200)));
    let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    log.append(&e).unwrap();
    // The gateway's fields are covered by the tree and come back as stored.
    let back = log.events_for_task(&task(1)).unwrap();
    assert_eq!(
        (back[0].event.latency_ms, back[0].event.upstream_status),
        (Some(12), Some(200))
    );
    let bytes = log.canonical_bytes(&e).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert!(
        text.contains("\"kind\":\"tool_call\",\"latency_ms\":12,"),
        "{text}"
    );
    assert!(text.ends_with("\"upstream_status\":200,\"v\":1}"), "{text}");
    decode_canonical(&bytes).unwrap();
}

#[test]
fn recorded_fields_are_in_the_tree_and_cannot_forge_a_trace_line() {
    let mut e = AuditEvent::new(EventKind::ToolCall, 5, task(3));
    e.actor = Some(id("/agents/researcher"));
    e.tool = Some("crm.update".into());
    e.decision = Some("allow".into());
    e.recorded = std::collections::BTreeMap::from([
        ("input:/status".to_owned(), "closed".to_owned()),
        (
            "input:/note".to_owned(),
            "x\n└─ tool crm.delete on dataset:all (delete): allow".to_owned(),
        ),
    ]);
    let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    log.append(&e).unwrap();
    let bytes = log.canonical_bytes(&e).unwrap();
    let text = String::from_utf8(bytes.clone()).unwrap();
    // In the canonical form, keys in byte order, between reason and resource.
    assert!(
        text.contains("\"recorded\":{\"input:/note\":\"x\\n"),
        "{text}"
    );
    decode_canonical(&bytes).unwrap();
    // Control: without the field, the encoding is the one older logs hold.
    let mut bare = e.clone();
    bare.recorded.clear();
    let old = String::from_utf8(log.canonical_bytes(&bare).unwrap()).unwrap();
    assert!(!old.contains("recorded"), "{old}");
    let back = log.events_for_task(&task(3)).unwrap();
    assert_eq!(back[0].event.recorded, e.recorded);
    let rendered = trace(&back).render_text();
    assert!(
        rendered.contains("input:/note=x\\n\\u{2514}\\u{2500} tool crm.delete"),
        "{rendered}"
    );
    assert!(
        !rendered
            .lines()
            .any(|l| l.trim_start().starts_with("└─ tool crm.delete")),
        "a recorded value forged a line: {rendered}"
    );
}

/// Whatever field a caller's text lands in (a refused hop's reason built
/// from its audience, a task end's reason, a resource), the text tree
/// shows it on its own line, escaped: no forged line, no terminal escape,
/// no bidi override. The control: the same events with plain text render
/// as they are.
#[test]
fn no_field_of_any_event_can_forge_a_trace_line_or_reach_the_terminal() {
    let t = task(4);
    let mut events = task_events(&t, 1_700_000_000);
    let forged = "x\u{1b}[3A\u{1b}[J\n├─ tool crm.search on case/1 (read): allow #7";
    events[5].reason = Some(format!("audience_widened: {forged} not held"));
    events[7].reason = Some("done\u{2028}└─ task ended by alice".into());
    events[3].resource = Some("inv\u{202e}fdp.exe".into());
    let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    for e in &events {
        log.append(e).unwrap();
    }
    let text = trace(&log.events_for_task(&t).unwrap()).render_text();
    assert_eq!(text.lines().count(), 10, "{text}");
    assert!(
        !text
            .lines()
            .any(|l| l.chars().any(baton_core::text::is_unsafe_to_show)),
        "{text:?}"
    );
    assert!(text.contains("\\u{1b}[3A"), "{text}");
    // No tree glyph inside a line's own text (a soft-wrapped row would
    // show it as a line of the tree): only in the prefix the tree draws.
    for line in text.lines().skip(1) {
        let own = line.trim_start_matches(['│', ' ']);
        let own = own
            .strip_prefix("├─ ")
            .or_else(|| own.strip_prefix("└─ "))
            .unwrap_or(own);
        assert!(
            !own.chars().any(|c| ('\u{2500}'..='\u{257f}').contains(&c)),
            "{line}"
        );
    }
    assert!(text.contains("inv\\u{202e}fdp.exe"), "{text}");
    assert!(
        !text.lines().any(|l| l
            .trim_start_matches(['│', ' '])
            .starts_with("├─ tool crm.search on case/1")),
        "a reason forged a line: {text}"
    );
    // Control: plain text is shown as it is.
    let clean = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    for e in task_events(&t, 1_700_000_000) {
        clean.append(&e).unwrap();
    }
    let plain = trace(&clean.events_for_task(&t).unwrap()).render_text();
    assert!(
        plain.contains("REFUSED (scope widens: tool:mail.send:write)"),
        "{plain}"
    );
}

/// A resource a caller chose cannot read as more of its tool-call line (a
/// tier, a decision, an approval): one with spaces, brackets or letters
/// of other scripts is shown quoted. The control: a plain resource is
/// shown as it is.
#[test]
fn a_wordy_resource_is_quoted_in_the_trace() {
    let t = task(5);
    let render = |resource: &str| {
        let mut events = task_events(&t, 1_700_000_000);
        for e in &mut events {
            if e.kind == EventKind::ToolCall {
                e.resource = Some(resource.into());
            }
        }
        let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
        for e in &events {
            log.append(e).unwrap();
        }
        trace(&log.events_for_task(&t).unwrap()).render_text()
    };
    let forged = "acme (write): allow (approved in ap_1)";
    let text = render(forged);
    assert!(text.contains(&format!(" on \"{forged}\" (")), "{text}");
    assert!(!text.contains(&format!(" on {forged}")), "{text}");
    let text = render("acme\u{2024}corp");
    assert!(text.contains(" on \"acme"), "{text}");
    let text = render("dataset:crm/acme-1");
    assert!(text.contains(" on dataset:crm/acme-1 ("), "{text}");
}

/// A redeem lands on the hop whose grant it used (the hop made with the
/// token the redeem names), not on the newest hop to the same agent: Q's
/// delegation to W, redeemed and used after P also delegated to W, keeps
/// W's call under Q. The control: without P's hop, the same place.
#[test]
fn a_redeem_and_its_calls_stay_under_the_hop_whose_grant_was_used() {
    // W's node under the hop from `from`, if any.
    fn under<'a>(node: &'a AgentNode, from: &SpiffeId, to: &SpiffeId) -> Option<&'a AgentNode> {
        node.items.iter().find_map(|item| match item {
            TraceItem::Hop {
                delegate: Some(d), ..
            } => {
                if node.agent.as_ref() == Some(from) && d.agent.as_ref() == Some(to) {
                    Some(d)
                } else {
                    under(d, from, to)
                }
            }
            _ => None,
        })
    }
    let t = task(7);
    let (p, q, w) = (id("/agents/planner"), id("/agents/q"), id("/agents/w"));
    let ev = |kind, at: u64, actor: &SpiffeId| {
        let mut e = AuditEvent::new(kind, 1_700_000_000 + at, t.clone());
        e.actor = Some(actor.clone());
        e
    };
    let hop = |at, from: &SpiffeId, to: &SpiffeId, parent: &str| {
        let mut e = ev(EventKind::HopGranted, at, from);
        e.target = Some(to.clone());
        e.parent_jti = Some(parent.into());
        e.decision = Some("granted".into());
        e
    };
    let redeem = |at, by: &SpiffeId, jti: &str, parent: &str| {
        let mut e = ev(EventKind::Redeemed, at, by);
        e.token_jti = Some(jti.into());
        e.parent_jti = Some(parent.into());
        e
    };
    let mut start = ev(EventKind::TaskStarted, 0, &p);
    start.token_jti = Some("jP".into());
    let mut call = ev(EventKind::ToolCall, 60, &w);
    call.token_jti = Some("jW".into());
    call.tool = Some("payments.transfer".into());
    call.decision = Some("allow".into());
    let events = |with_p_to_w: bool| {
        let mut all = vec![
            start.clone(),
            hop(10, &p, &q, "jP"),
            redeem(20, &q, "jQ", "jP"),
            hop(30, &q, &w, "jQ"),
        ];
        if with_p_to_w {
            all.push(hop(40, &p, &w, "jP"));
        }
        all.push(redeem(50, &w, "jW", "jQ"));
        all.push(call.clone());
        let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
        for e in &all {
            log.append(e).unwrap();
        }
        trace(&log.events_for_task(&t).unwrap())
    };
    let has_call = |n: &AgentNode| {
        n.items
            .iter()
            .any(|i| matches!(i, TraceItem::ToolCall { .. }))
    };
    for with_p_to_w in [false, true] {
        let tr = events(with_p_to_w);
        let root = tr.root.as_ref().unwrap();
        let by_q = under(root, &q, &w).expect("W under Q");
        assert!(has_call(by_q), "with P's hop too: {with_p_to_w}: {tr:#?}");
        if with_p_to_w {
            let by_p = under(root, &p, &w).expect("W under P");
            assert!(!has_call(by_p), "{tr:#?}");
            assert!(by_p.token_jtis.is_empty(), "{tr:#?}");
        }
    }
}

/// An approval's line quotes a resource that is not plain, as a tool
/// call's does: `acme, tier read, by alice@corp` cannot read as the
/// approval of a read by alice.
#[test]
fn a_wordy_resource_is_quoted_on_an_approval_line() {
    let t = task(6);
    let render = |resource: &str| {
        let mut e = AuditEvent::new(EventKind::ApprovalRequested, 1_700_000_100, t.clone());
        e.actor = Some(id("/agents/researcher"));
        e.tool = Some("payments.transfer".into());
        e.resource = Some(resource.into());
        e.risk = Some(RiskTier::Purchase);
        let mut events = task_events(&t, 1_700_000_000);
        events.push(e);
        let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
        for e in &events {
            log.append(e).unwrap();
        }
        trace(&log.events_for_task(&t).unwrap()).render_text()
    };
    let forged = "acme, tier read, by alice@corp";
    let text = render(forged);
    assert!(
        text.contains(&format!(", on \"{forged}\", tier purchase")),
        "{text}"
    );
    // Control: a plain resource is shown as it is.
    let text = render("dataset:crm/acme-1");
    assert!(
        text.contains(", on dataset:crm/acme-1, tier purchase"),
        "{text}"
    );
}

/// Records what an [`AppendObserver`] is told.
#[derive(Default)]
struct Seen(std::sync::Mutex<Vec<Vec<std::time::Duration>>>);

impl AppendObserver for Seen {
    fn batch_durable(&self, lags: &[std::time::Duration]) {
        self.0.lock().unwrap().push(lags.to_vec());
    }
}

impl Seen {
    fn batch_sizes(&self) -> Vec<usize> {
        self.0.lock().unwrap().iter().map(Vec::len).collect()
    }
}

/// Polls `f` until it holds, for at most a minute (a busy machine).
fn poll_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !f() {
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        std::thread::yield_now();
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

#[test]
fn concurrent_appends_are_group_committed_with_one_checkpoint_per_batch() {
    let dir = tempfile::tempdir().unwrap();
    let keys = AuditKeys::load_or_create(&dir.path().join("keys")).unwrap();
    let pk = keys.public_key().to_vec();
    let path = dir.path().join("audit.db");
    let seen = std::sync::Arc::new(Seen::default());
    let log = AuditLog::open(&path, keys)
        .unwrap()
        .with_observer(seen.clone());
    let receipts: Vec<(Vec<u8>, Receipt)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..6u8)
            .map(|t| {
                let log = &log;
                s.spawn(move || {
                    let mut out = Vec::new();
                    for round in 0..5 {
                        for e in task_events(&task(t), 1000 * round) {
                            let bytes = log.canonical_bytes(&e).unwrap();
                            out.push((bytes, log.append(&e).unwrap()));
                        }
                    }
                    out
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(receipts.len(), 240);
    let mut indexes: Vec<u64> = receipts.iter().map(|(_, r)| r.index).collect();
    indexes.sort();
    assert_eq!(indexes, (0..240).collect::<Vec<_>>());
    let mut sizes = std::collections::BTreeSet::new();
    for (bytes, r) in &receipts {
        assert!(r.checkpoint.size > r.index);
        verify_receipt(r, ReceiptLeaf::Canonical(bytes), &pk).unwrap();
        // The receipt's checkpoint is the one stored for its batch.
        assert_eq!(
            log.checkpoint(r.checkpoint.size).unwrap().as_ref(),
            Some(&r.checkpoint)
        );
        sizes.insert(r.checkpoint.size);
    }
    // One checkpoint per transaction, and the observer saw each batch.
    let report = log.verify().unwrap();
    assert_eq!(report.size, 240);
    assert_eq!(report.checkpoints, log.transactions());
    assert_eq!(report.checkpoints, sizes.len() as u64);
    let batches = seen.batch_sizes();
    assert_eq!(batches.len() as u64, log.transactions());
    assert_eq!(batches.iter().sum::<usize>(), 240);
    drop(log);
    let file = AuditLog::verify_file(&path, &pk).unwrap();
    assert_eq!(
        (file.checkpoints, file.signatures),
        (sizes.len() as u64, sizes.len() as u64)
    );
}

/// Many more appenders than cores: each batch wakes its own appenders
/// and one of the next batch to lead it (not every waiting thread); every
/// append still gets its receipt, each index once, and nothing hangs.
#[test]
fn hundreds_of_appenders_each_get_their_receipt() {
    let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    let (threads, each) = (200u64, 15u64);
    let mut indexes: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let log = &log;
                s.spawn(move || {
                    (0..each)
                        .map(|i| {
                            let e = &task_events(&task((t % 200) as u8), t * 100 + i)[0];
                            log.append(e).unwrap().index
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    indexes.sort();
    assert_eq!(indexes, (0..threads * each).collect::<Vec<_>>());
    assert_eq!(log.verify().unwrap().size, threads * each);
}

#[test]
fn a_batch_of_concurrent_appends_gets_one_checkpoint_and_a_receipt_each() {
    const N: usize = 12;
    let dir = tempfile::tempdir().unwrap();
    let keys = AuditKeys::load_or_create(&dir.path().join("keys")).unwrap();
    let pk = keys.public_key().to_vec();
    let path = dir.path().join("audit.db");
    let seen = std::sync::Arc::new(Seen::default());
    let log = AuditLog::open(&path, keys)
        .unwrap()
        .with_observer(seen.clone());
    let events: Vec<AuditEvent> = (0..2u8).flat_map(|t| task_events(&task(t), 10)).collect();
    let first = AuditEvent::new(EventKind::TaskStarted, 9, task(9));
    let (first_receipt, batch) = std::thread::scope(|s| {
        // A leader takes the first append and waits for the write lock...
        let held = log.hold_writes();
        let leader = s.spawn(|| log.append(&first).unwrap());
        poll_until("the first append leads", || log.queue_state() == (true, 0));
        // ...while N more queue up behind it.
        let followers: Vec<_> = events[..N]
            .iter()
            .map(|e| {
                let log = &log;
                s.spawn(move || (log.canonical_bytes(e).unwrap(), log.append(e).unwrap()))
            })
            .collect();
        poll_until("N appends queued", || log.queue_state() == (true, N));
        drop(held);
        let first_receipt = leader.join().unwrap();
        let batch: Vec<(Vec<u8>, Receipt)> =
            followers.into_iter().map(|h| h.join().unwrap()).collect();
        (first_receipt, batch)
    });
    let n = N as u64;
    assert_eq!(first_receipt.checkpoint.size, 1);
    assert_eq!(log.transactions(), 2);
    assert_eq!(seen.batch_sizes(), vec![1, N]);
    // Every lag is a real wait: the batch waited at least as long as the
    // leader's own wait for the lock.
    assert!(seen.0.lock().unwrap()[1].iter().all(|l| !l.is_zero()));

    // One checkpoint, at the batch's final size, and N receipts against it.
    let cp = batch[0].1.checkpoint.clone();
    assert_eq!(cp.size, 1 + n);
    let mut indexes: Vec<u64> = batch.iter().map(|(_, r)| r.index).collect();
    indexes.sort();
    assert_eq!(indexes, (1..=n).collect::<Vec<_>>());
    for (bytes, r) in &batch {
        assert_eq!(r.checkpoint, cp);
        verify_receipt(r, ReceiptLeaf::Canonical(bytes), &pk).unwrap();
    }
    assert_eq!(log.checkpoint(1 + n).unwrap(), Some(cp.clone()));
    for size in 2..=n {
        assert_eq!(log.checkpoint(size).unwrap(), None, "checkpoint {size}");
    }
    let report = log.verify().unwrap();
    assert_eq!(
        (report.size, report.checkpoints, report.signatures),
        (1 + n, 2, 2)
    );
    assert_eq!(report.head, Some(cp.clone()));

    // Forged or altered receipts are refused (each next to its control).
    let (bytes_a, a) = &batch[0];
    let (bytes_b, b) = &batch[1];
    verify_receipt(a, ReceiptLeaf::Canonical(bytes_a), &pk).unwrap();
    // Another event of the same batch under this receipt.
    assert_eq!(
        verify_receipt(a, ReceiptLeaf::Canonical(bytes_b), &pk),
        Err(ProofError::LeafMismatch)
    );
    // Another receipt's path, or another index, for this event.
    let mut swapped = a.clone();
    swapped.inclusion_proof = b.inclusion_proof.clone();
    assert!(verify_receipt(&swapped, ReceiptLeaf::Canonical(bytes_a), &pk).is_err());
    let mut moved = a.clone();
    moved.index = b.index;
    assert!(verify_receipt(&moved, ReceiptLeaf::Canonical(bytes_a), &pk).is_err());
    // A claim that the event sits in a smaller (never signed) tree.
    let mut shrunk = a.clone();
    shrunk.checkpoint.size -= 1;
    assert_eq!(
        verify_receipt(&shrunk, ReceiptLeaf::Canonical(bytes_a), &pk),
        Err(ProofError::BadSignature)
    );
    let mut later = a.clone();
    later.checkpoint.at += 1;
    assert_eq!(
        verify_receipt(&later, ReceiptLeaf::Canonical(bytes_a), &pk),
        Err(ProofError::BadSignature)
    );
    drop(log);

    // An event of the batch altered in the file: the batch's checkpoint no
    // longer matches, and the altered index is named.
    AuditLog::verify_file(&path, &pk).unwrap();
    let victim = b.index;
    let raw = Connection::open(&path).unwrap();
    let stored = String::from_utf8(log_event(&raw, victim)).unwrap();
    // Still a canonical event, only its time changed (10..17 -> 90..97).
    let altered = stored.replacen("\"at\":1", "\"at\":9", 1).into_bytes();
    assert_ne!(altered, stored.as_bytes());
    decode_canonical(&altered).unwrap();
    raw.execute(
        "UPDATE leaves SET event = ?1, leaf_hash = ?2 WHERE idx = ?3",
        rusqlite::params![altered, &merkle::leaf_hash(&altered)[..], victim as i64],
    )
    .unwrap();
    drop(raw);
    assert_eq!(
        assert_tampered(dir.path(), &path, &pk, Some(1)),
        TamperReason::RootMismatch {
            checkpoint_size: 1 + n
        }
    );
}

/// The stored canonical bytes of event `idx`.
fn log_event(raw: &Connection, idx: u64) -> Vec<u8> {
    raw.query_row(
        "SELECT event FROM leaves WHERE idx = ?1",
        [idx as i64],
        |r| r.get(0),
    )
    .unwrap()
}

#[test]
fn an_event_whose_batch_checkpoint_was_deleted_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 1);
    let log = reopen(dir.path(), &path).unwrap();
    let receipts = log.append_batch(&task_events(&task(4), 50)).unwrap();
    assert!(receipts.iter().all(|r| r.checkpoint.size == 16));
    drop(log);
    // Control: the untouched log verifies, with 8 + 1 checkpoints.
    let report = AuditLog::verify_file(&path, &pk).unwrap();
    assert_eq!((report.size, report.checkpoints), (16, 9));
    // The batch's events stay, its one checkpoint goes.
    Connection::open(&path)
        .unwrap()
        .execute("DELETE FROM checkpoints WHERE size = 16", [])
        .unwrap();
    assert_eq!(
        assert_tampered(dir.path(), &path, &pk, Some(8)),
        TamperReason::UnsignedTail {
            last_checkpoint_size: 8,
            log_size: 16
        }
    );
}

/// The head a running log gives out (to be witnessed: `baton audit
/// checkpoint`) is its own tree's, checked against the file: newer
/// checkpoint rows deleted under it do not make it give out an older,
/// genuinely signed head that a log cut back to it would then match.
#[test]
fn a_running_log_never_gives_out_a_head_older_than_its_tree() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _pk, _) = filled_file(dir.path(), 1);
    let log = reopen(dir.path(), &path).unwrap();
    log.append_batch(&task_events(&task(4), 50)).unwrap();
    // Control: the head is the tree's.
    let head = log.latest_checkpoint().unwrap().unwrap();
    assert_eq!(head.size, 16);
    Connection::open(&path)
        .unwrap()
        .execute("DELETE FROM checkpoints WHERE size = 16", [])
        .unwrap();
    let err = log.latest_checkpoint().unwrap_err();
    assert!(
        err.to_string().contains("not the head of the 16 events"),
        "{err}"
    );
    assert!(log.receipt(0).is_err());
}

#[test]
fn a_log_with_a_checkpoint_per_event_still_verifies() {
    // The layout written before a batch was signed once: every size has its
    // own signed checkpoint, also inside one transaction's batch.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let keys = AuditKeys::load_or_create(&dir.path().join("keys")).unwrap();
    let pk = keys.public_key().to_vec();
    let log = AuditLog::open(&path, keys).unwrap();
    let events = task_events(&task(1), 70);
    log.append_batch(&events).unwrap();
    drop(log);
    let keys = AuditKeys::load_or_create(&dir.path().join("keys")).unwrap();
    let raw = Connection::open(&path).unwrap();
    let mut tree = merkle::Tree::new();
    for (i, e) in events.iter().enumerate() {
        tree.push(merkle::leaf_hash(
            &event::canonical_bytes(e, &keys).unwrap(),
        ));
        let size = i as u64 + 1;
        if size == 8 {
            break;
        }
        let root = hex::encode(tree.root(size).unwrap());
        let at = events[..=i].iter().map(|e| e.at).max().unwrap();
        let sig = {
            use base64::Engine as _;
            base64::engine::general_purpose::STANDARD
                .encode(keys.sign(&checkpoint_message(size, &root, at)).unwrap())
        };
        raw.execute(
            "INSERT INTO checkpoints (size, root_hash, at, signature) VALUES (?1, ?2, ?3, ?4)",
            rusqlite::params![size as i64, root, at as i64, sig],
        )
        .unwrap();
    }
    drop(raw);
    let report = AuditLog::verify_file(&path, &pk).unwrap();
    assert_eq!(
        (report.size, report.checkpoints, report.signatures),
        (8, 8, 8)
    );
    // It opens and takes batches on top.
    let log = reopen(dir.path(), &path).unwrap();
    let more = log.append_batch(&task_events(&task(2), 80)).unwrap();
    assert!(more.iter().all(|r| r.checkpoint.size == 16));
    drop(log);
    let report = AuditLog::verify_file(&path, &pk).unwrap();
    assert_eq!((report.size, report.checkpoints), (16, 9));
    // And a per-event checkpoint is still checked: an altered one is named.
    Connection::open(&path)
        .unwrap()
        .execute("UPDATE checkpoints SET at = at + 1 WHERE size = 5", [])
        .unwrap();
    let e = AuditLog::verify_file(&path, &pk).unwrap_err();
    assert_eq!(
        e.reason,
        TamperReason::CheckpointSignature { checkpoint_size: 5 }
    );
}

#[test]
fn append_batch_is_all_or_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (path, pk, _) = filled_file(dir.path(), 1);
    let log = reopen(dir.path(), &path).unwrap();
    let events = task_events(&task(3), 10);
    let receipts = log.append_batch(&events).unwrap();
    assert_eq!(receipts.len(), 8);
    for (e, r) in events.iter().zip(&receipts) {
        let bytes = log.canonical_bytes(e).unwrap();
        verify_receipt(r, ReceiptLeaf::Canonical(&bytes), &pk).unwrap();
    }
    // One checkpoint for the whole batch.
    assert!(
        receipts
            .iter()
            .all(|r| r.checkpoint == receipts[7].checkpoint)
    );
    assert_eq!(receipts[7].checkpoint.size, 16);
    assert_eq!(log.verify().unwrap().checkpoints, 9);
    // A failing batch stores nothing and leaves memory as it was.
    let blocker = Connection::open(&path).unwrap();
    blocker.execute_batch("BEGIN IMMEDIATE").unwrap();
    assert!(log.append_batch(&events).is_err());
    blocker.execute_batch("ROLLBACK").unwrap();
    assert_eq!(log.size().unwrap(), 16);
    assert_eq!(log.verify().unwrap().size, 16);
}

/// This process's user + system CPU time, from /proc (Linux), in seconds.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are 14 and 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f.get(11).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0)
        + f.get(12).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    ticks / 100.0
}

/// Append throughput with receipts, and verify time, each next to limits
/// measured in the same run (one P-256 signature; one minimal SQLite
/// transaction). The machine is shared: CPU seconds per event are the
/// steadier figure. Run with
/// `BATON_AUDIT_BENCH_N=100000 BATON_AUDIT_BENCH_THREADS=4 cargo test -p baton-audit --release -- --ignored --nocapture bench_`.
#[test]
#[ignore]
fn bench_append_and_verify() {
    let n: u64 = std::env::var("BATON_AUDIT_BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let threads: u64 = std::env::var("BATON_AUDIT_BENCH_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let dir = tempfile::tempdir().unwrap();

    // Limit 1: ECDSA P-256 signatures per second on one core.
    let keys = AuditKeys::generate().unwrap();
    let k = 20_000;
    let start = std::time::Instant::now();
    for i in 0..k {
        keys.sign(&checkpoint_message(i, "00", i)).unwrap();
    }
    let sign_rate = k as f64 / start.elapsed().as_secs_f64();
    // Limit 2: minimal SQLite WAL transactions (one small insert) per second.
    let raw = Connection::open(dir.path().join("raw.db")).unwrap();
    raw.pragma_update(None, "journal_mode", "WAL").unwrap();
    raw.pragma_update(None, "synchronous", "NORMAL").unwrap();
    raw.execute_batch("CREATE TABLE t (i INTEGER PRIMARY KEY, v BLOB)")
        .unwrap();
    let start = std::time::Instant::now();
    for i in 0..k {
        raw.execute_batch("BEGIN IMMEDIATE").unwrap();
        raw.execute("INSERT INTO t VALUES (?1, x'00')", [i as i64])
            .unwrap();
        raw.execute_batch("COMMIT").unwrap();
    }
    let txn_rate = k as f64 / start.elapsed().as_secs_f64();
    drop(raw);

    let keys = AuditKeys::load_or_create(&dir.path().join("keys")).unwrap();
    let pk = keys.public_key().to_vec();
    let path = dir.path().join("audit.db");
    let log = AuditLog::open(&path, keys).unwrap();
    let events: Vec<AuditEvent> = (0..64u8).flat_map(|t| task_events(&task(t), 1)).collect();
    let cpu0 = cpu_seconds();
    let start = std::time::Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (log, events) = (&log, &events);
            s.spawn(move || {
                for i in (t..n).step_by(threads as usize) {
                    log.append(&events[(i % events.len() as u64) as usize])
                        .unwrap();
                }
            });
        }
    });
    let append = start.elapsed().as_secs_f64();
    let append_cpu = cpu_seconds() - cpu0;
    let txns = log.transactions();
    drop(log);
    let cpu0 = cpu_seconds();
    let start = std::time::Instant::now();
    let report = AuditLog::verify_file(&path, &pk).unwrap();
    let verify = start.elapsed().as_secs_f64();
    let verify_cpu = cpu_seconds() - cpu0;
    assert_eq!(report.size, n);
    let cpu0 = cpu_seconds();
    let start = std::time::Instant::now();
    AuditLog::verify_file_with(&path, &pk, &fast_opts()).unwrap();
    let verify_fast = start.elapsed().as_secs_f64();
    let verify_fast_cpu = cpu_seconds() - cpu0;
    let start = std::time::Instant::now();
    let log = reopen(dir.path(), &path).unwrap();
    let open = start.elapsed().as_secs_f64();
    let m = n.min(10_000);
    let start = std::time::Instant::now();
    for i in 0..m {
        log.receipt(i).unwrap();
    }
    let receipts = start.elapsed().as_secs_f64();
    let rate = n as f64 / append;
    eprintln!(
        "baton-audit bench (nproc {}): n={n} threads={threads}\n\
         limits: P-256 sign {sign_rate:.0}/s, minimal SQLite txn {txn_rate:.0}/s\n\
         append+receipt {rate:.0}/s wall ({:.2}x sign limit, {:.2}x txn limit), {:.1} CPU-µs each ({:.0}/CPU-s), {:.1} events per transaction\n\
         verify_file {verify:.2} s wall, {:.1} CPU-µs per event; newest signature only {verify_fast:.2} s wall, {:.1} CPU-µs per event\n\
         open {open:.2} s; receipt() {:.1} µs",
        std::thread::available_parallelism().map_or(0, |p| p.get()),
        rate / sign_rate,
        rate / txn_rate,
        append_cpu * 1e6 / n as f64,
        n as f64 / append_cpu,
        n as f64 / txns as f64,
        verify_cpu * 1e6 / n as f64,
        verify_fast_cpu * 1e6 / n as f64,
        receipts * 1e6 / m as f64,
    );
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]

    /// Any strings (quotes, backslashes, controls, non-ASCII) encode to
    /// canonical bytes that decode back to the same fields, and the stored
    /// event's receipt verifies.
    #[test]
    fn canonical_encoding_round_trips_any_text(
        tool in ".{0,40}",
        reason in proptest::option::of(".{0,40}"),
        policy in proptest::collection::vec(".{0,12}", 0..4),
        initiator in ".{0,30}",
        at in proptest::prelude::any::<u64>(),
    ) {
        let keys = AuditKeys::generate().unwrap();
        let mut e = AuditEvent::new(EventKind::ToolCall, at, task(1));
        e.tool = Some(tool.clone());
        e.reason = reason.clone();
        e.policy_ids = policy.clone();
        e.initiator = Some(initiator.clone());
        let bytes = event::canonical_bytes(&e, &keys).unwrap();
        let d = decode_canonical(&bytes).unwrap();
        proptest::prop_assert_eq!(d.tool, Some(tool));
        proptest::prop_assert_eq!(d.reason, reason);
        proptest::prop_assert_eq!(d.policy_ids, policy);
        proptest::prop_assert_eq!(d.at, at);
        proptest::prop_assert_eq!(d.initiator_hmac, Some(keys.hmac_hex(&initiator)));
    }
}

#[test]
fn power_loss_durability_opens_and_appends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let log =
        AuditLog::open_with(&path, AuditKeys::generate().unwrap(), Durability::PowerLoss).unwrap();
    log.append(&task_events(&task(1), 1)[0]).unwrap();
    assert_eq!(log.verify().unwrap().size, 1);
}

#[test]
fn odd_inputs_give_readable_errors() {
    let dir = tempfile::tempdir().unwrap();
    let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    assert!(log.events_for_task(&task(1)).unwrap().is_empty());
    assert_eq!(log.redact_clear_text(Some(&task(1))).unwrap(), 0);
    assert!(matches!(log.receipt(0), Err(AuditError::Range(_))));
    assert!(log.consistency_proof(2, 1).is_err());
    assert_eq!(log.consistency_proof(0, 0).unwrap(), Vec::<String>::new());
    let e = AuditLog::verify_file(&dir.path().join("missing.db"), log.public_key()).unwrap_err();
    assert!(matches!(e.reason, TamperReason::Storage(_)), "{e}");
    let other = dir.path().join("other.db");
    Connection::open(&other)
        .unwrap()
        .execute_batch("CREATE TABLE x (y)")
        .unwrap();
    let e = AuditLog::verify_file(&other, log.public_key()).unwrap_err();
    assert!(e.to_string().contains("not an audit log"), "{e}");
    let e = AuditLog::verify_file(&other, b"not a key").unwrap_err();
    assert!(matches!(e.reason, TamperReason::Storage(_)), "{e}");
    // An empty log verifies, with the root of the empty tree.
    let r = log.verify().unwrap();
    assert_eq!(r.size, 0);
    assert_eq!(r.root, hex::encode(merkle::empty_root()));
}

#[test]
fn an_event_time_beyond_what_the_log_stores_is_refused_and_the_log_goes_on() {
    let log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    let late = AuditEvent::new(EventKind::TaskEnded, u64::MAX, task(9));
    let err = log.append(&late).unwrap_err().to_string();
    assert!(err.contains("beyond what the log stores"), "{err}");
    // Control: the next event is appended and the log verifies.
    log.append(&AuditEvent::new(EventKind::TaskEnded, 10, task(9)))
        .unwrap();
    log.verify().unwrap();
}

#[path = "tests/mirror.rs"]
mod mirror;

/// A file whose `leaves` is a view (here a recursive one, which never
/// ends) or which holds a trigger is refused at verify and at open,
/// before anything is read from it; the control is a genuine log.
#[test]
fn a_file_with_a_view_or_trigger_is_not_read_as_a_log() {
    let dir = tempfile::tempdir().unwrap();
    let keys = AuditKeys::generate().unwrap();
    let pk = keys.public_key().to_vec();
    // Control: a genuine log verifies.
    let genuine = dir.path().join("genuine.db");
    {
        let log = AuditLog::open(&genuine, keys).unwrap();
        for ev in task_events(&task(0), 1_700_000_000) {
            log.append(&ev).unwrap();
        }
    }
    AuditLog::verify_file(&genuine, &pk).unwrap();
    for (name, sql) in [
        (
            "view.db",
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             INSERT INTO meta VALUES ('schema_version', '1');
             CREATE TABLE checkpoints (size INTEGER PRIMARY KEY, root_hash TEXT, at INTEGER, signature TEXT);
             CREATE VIEW leaves AS WITH RECURSIVE c(i) AS (SELECT 0 UNION ALL SELECT i + 1 FROM c)
               SELECT i AS idx, 't' AS task_id, X'00' AS event, X'00' AS leaf_hash, NULL AS clear_text FROM c;",
        ),
        (
            "trigger.db",
            "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
             CREATE TRIGGER wipe AFTER INSERT ON meta BEGIN DELETE FROM meta; END;",
        ),
    ] {
        let path = dir.path().join(name);
        Connection::open(&path).unwrap().execute_batch(sql).unwrap();
        let e = AuditLog::verify_file(&path, &pk).unwrap_err();
        assert!(e.to_string().contains("no audit log writes"), "{name}: {e}");
        let e = AuditLog::open(&path, AuditKeys::generate().unwrap())
            .err()
            .unwrap();
        assert!(e.to_string().contains("no audit log writes"), "{name}: {e}");
    }
}

/// A head file or witness file far larger than any the log writes (a
/// sparse 8 GiB file) is refused without being read whole; the control
/// is the same log with its own head file.
#[test]
fn an_oversized_head_or_witness_file_is_refused_unread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("audit.db");
    let keys = AuditKeys::generate().unwrap();
    let pk = keys.public_key().to_vec();
    {
        let log = AuditLog::open(&path, keys).unwrap();
        for ev in task_events(&task(0), 1_700_000_000) {
            log.append(&ev).unwrap();
        }
    }
    AuditLog::verify_file(&path, &pk).unwrap();
    let head = crate::witness::head_path(&path);
    crate::witness::read_witness(&head).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&head)
        .unwrap()
        .set_len(8 << 30)
        .unwrap();
    let e = AuditLog::verify_file(&path, &pk).unwrap_err();
    assert!(e.to_string().contains("longer than"), "{e}");
    let e = crate::witness::read_witness(&head).unwrap_err();
    assert!(e.to_string().contains("longer than"), "{e}");
}
