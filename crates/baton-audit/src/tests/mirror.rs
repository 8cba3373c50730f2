//! Several brokers' logs through one mirror: shipping before receipts,
//! backlogs, merged traces, and a mirror that lies.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use super::*;

/// A mirror in memory, as the datastore would hold it, with switches to
/// fail it and hooks to tamper with it.
#[derive(Default)]
struct MemMirror {
    state: Mutex<MemState>,
}

/// A stored log: its key, leaves and checkpoints.
type MemLog = (Vec<u8>, Vec<MirrorLeaf>, Vec<SignedCheckpoint>);

#[derive(Default)]
struct MemState {
    fail: bool,
    logs: BTreeMap<String, MemLog>,
}

impl MemMirror {
    fn with<T>(&self, f: impl FnOnce(&mut MemState) -> T) -> T {
        f(&mut self.state.lock().unwrap())
    }
}

impl Mirror for MemMirror {
    fn head(&self, log_id: &str) -> Result<Option<SignedCheckpoint>, MirrorError> {
        self.with(|s| {
            if s.fail {
                return Err(down());
            }
            Ok(s.logs.get(log_id).and_then(|l| l.2.last().cloned()))
        })
    }
    fn ship(
        &self,
        log: &SharedLog,
        leaves: &[MirrorLeaf],
        checkpoints: &[SignedCheckpoint],
    ) -> Result<(), MirrorError> {
        self.with(|s| {
            if s.fail {
                return Err(down());
            }
            let l = s
                .logs
                .entry(log.log_id.clone())
                .or_insert_with(|| (log.public_key.clone(), Vec::new(), Vec::new()));
            if l.0 != log.public_key {
                return Err(MirrorError::Unavailable("another key".into()));
            }
            let size = l.2.last().map_or(0, |c| c.size);
            if leaves.first().map_or(size, |f| f.index) != size {
                return Err(MirrorError::Unavailable(format!("stored size {size}")));
            }
            l.1.extend_from_slice(leaves);
            l.2.extend_from_slice(checkpoints);
            Ok(())
        })
    }
    fn logs(&self) -> Result<Vec<SharedLog>, MirrorError> {
        self.with(|s| {
            Ok(s.logs
                .iter()
                .map(|(id, l)| SharedLog {
                    log_id: id.clone(),
                    public_key: l.0.clone(),
                })
                .collect())
        })
    }
    fn leaves(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<MirrorLeaf>, MirrorError> {
        self.with(|s| {
            Ok(s.logs
                .get(log_id)
                .map(|l| {
                    l.1.iter()
                        .filter(|x| x.index >= from && x.index < to)
                        .cloned()
                        .collect()
                })
                .unwrap_or_default())
        })
    }
    fn checkpoints(&self, log_id: &str, from: u64) -> Result<Vec<SignedCheckpoint>, MirrorError> {
        self.with(|s| {
            Ok(s.logs
                .get(log_id)
                .map(|l| l.2.iter().filter(|c| c.size >= from).cloned().collect())
                .unwrap_or_default())
        })
    }
    fn events(&self, log_id: &str, indexes: &[u64]) -> Result<Vec<MirrorLeaf>, MirrorError> {
        self.with(|s| {
            Ok(s.logs
                .get(log_id)
                .map(|l| {
                    l.1.iter()
                        .filter(|x| indexes.contains(&x.index))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default())
        })
    }
    fn redact(&self, task: Option<&TaskId>) -> Result<u64, MirrorError> {
        self.with(|s| {
            let mut n = 0;
            for l in s.logs.values_mut() {
                for x in &mut l.1 {
                    if task.is_none_or(|t| t.as_str() == x.task_id) && x.clear_text.take().is_some()
                    {
                        n += 1;
                    }
                }
            }
            Ok(n)
        })
    }
}

fn down() -> MirrorError {
    MirrorError::Unavailable("datastore down".into())
}

fn broker(mirror: &Arc<MemMirror>) -> AuditLog {
    AuditLog::in_memory(AuditKeys::generate().unwrap())
        .unwrap()
        .with_mirror(mirror.clone())
}

/// Task `t`'s events split over two brokers: the start, hop and end at
/// `a`, the redeem and tool calls at `b` (as a task runs through brokers
/// behind one address).
fn run_across(a: &AuditLog, b: &AuditLog, t: &TaskId) {
    for e in task_events(t, 1_700_000_000) {
        let at_b = matches!(e.kind, EventKind::Redeemed | EventKind::ToolCall);
        if at_b { b.append(&e) } else { a.append(&e) }.unwrap();
    }
}

#[test]
fn every_broker_traces_a_task_from_every_log_in_causal_order() {
    let mirror = Arc::new(MemMirror::default());
    let (a, b) = (broker(&mirror), broker(&mirror));
    let t = task(1);
    run_across(&a, &b, &t);
    let one_log = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    for e in task_events(&t, 1_700_000_000) {
        one_log.append(&e).unwrap();
    }
    let expected = trace(&one_log.events_for_task(&t).unwrap());
    for (me, other) in [(&a, &b), (&b, &a)] {
        let records = me.events_for_task(&t).unwrap();
        assert_eq!(records.len(), 8, "every event of both logs");
        let own = records
            .iter()
            .filter(|r| r.log == Some(me.log_id()))
            .count();
        let theirs = records
            .iter()
            .filter(|r| r.log == Some(other.log_id()))
            .count();
        assert_eq!((own + theirs, theirs > 0), (8, true));
        let merged = trace(&records);
        // The same tree as one log would give, items named by their log.
        assert_eq!(
            merged.root.as_ref().map(|r| r.items.len()),
            expected.root.as_ref().map(|r| r.items.len())
        );
        let text = merged.render_text();
        assert!(text.contains(&format!("@{}", other.log_id())), "{text}");
        assert!(text.contains("tool crm.search"), "{text}");
        assert!(
            text.contains(INITIATOR),
            "clear text of the other log too: {text}"
        );
        assert!(merged.unattached.is_empty(), "{text}");
    }
    let report = a.verify_shared().unwrap();
    assert_eq!(report.len(), 2);
    assert_eq!(report.iter().map(|r| r.size).sum::<u64>(), 8);
    assert!(report.iter().any(|r| r.own && r.log_id == a.log_id()));
}

#[test]
fn no_receipt_before_the_mirror_holds_the_event_and_a_backlog_is_shipped_next() {
    let mirror = Arc::new(MemMirror::default());
    let a = broker(&mirror);
    let events = task_events(&task(2), 1_700_000_000);
    a.append(&events[0]).unwrap();
    mirror.with(|s| s.fail = true);
    let err = a.append(&events[1]).unwrap_err();
    assert!(matches!(err, AuditError::Mirror(_)), "{err}");
    // Committed here, not acknowledged: the next append ships both.
    mirror.with(|s| s.fail = false);
    let r = a.append(&events[2]).unwrap();
    assert_eq!(r.index, 2);
    let held = mirror.with(|s| s.logs[&a.log_id()].1.len());
    assert_eq!(held, 3);
    assert_eq!(a.verify_shared().unwrap()[0].size, 3);
}

#[test]
fn a_mirror_ahead_of_the_local_log_or_with_other_events_is_refused() {
    let mirror = Arc::new(MemMirror::default());
    let dir = tempfile::tempdir().unwrap();
    let keys = || AuditKeys::load_or_create(dir.path()).unwrap();
    let a = AuditLog::in_memory(keys())
        .unwrap()
        .with_mirror(mirror.clone());
    for e in task_events(&task(3), 1_700_000_000) {
        a.append(&e).unwrap();
    }
    // The same key, an empty local log: its file was lost or replaced.
    let again = AuditLog::in_memory(keys())
        .unwrap()
        .with_mirror(mirror.clone());
    let err = again.sync_mirror().unwrap_err();
    assert!(err.to_string().contains("the local file only 0"), "{err}");
    // The same key, as many events but other ones: a fork.
    let forked = AuditLog::in_memory(keys())
        .unwrap()
        .with_mirror(mirror.clone());
    for e in task_events(&task(4), 1_700_000_000) {
        // Each is refused (the mirror is ahead) but kept here.
        assert!(forked.append(&e).is_err());
    }
    let err = forked.sync_mirror().unwrap_err();
    assert!(
        err.to_string().contains("differs from the local file"),
        "{err}"
    );
    assert_eq!(
        a.sync_mirror().unwrap(),
        8,
        "control: the writer itself agrees"
    );
}

#[test]
fn an_altered_event_of_another_log_fails_the_trace_and_the_verify() {
    let mirror = Arc::new(MemMirror::default());
    let (a, b) = (broker(&mirror), broker(&mirror));
    let t = task(5);
    run_across(&a, &b, &t);
    assert!(a.events_for_task(&t).is_ok(), "control");
    // The redeem at b now names another token.
    mirror.with(|s| {
        let leaf = &mut s.logs.get_mut(&b.log_id()).unwrap().1[0];
        let text = String::from_utf8(leaf.event.clone()).unwrap();
        leaf.event = text.replace("jti-r1", "jti-XX").into_bytes();
    });
    let err = a.events_for_task(&t).unwrap_err();
    assert!(
        matches!(&err, AuditError::SharedLog { log, error } if *log == b.log_id() && error.first_bad_index == Some(0)),
        "{err}"
    );
    let err = a.verify_shared().unwrap_err();
    assert!(
        matches!(&err, AuditError::SharedLog { log, .. } if *log == b.log_id()),
        "{err}"
    );
}

#[test]
fn a_rewritten_tree_a_forged_checkpoint_or_a_truncated_log_is_refused() {
    // The leaf-hash column altered.
    let mirror = Arc::new(MemMirror::default());
    let (a, b) = (broker(&mirror), broker(&mirror));
    let t = task(6);
    run_across(&a, &b, &t);
    // The leaf-hash column is not believed: a reader hashes the bytes, so
    // the trace is the true one, and verify names the altered column.
    mirror.with(|s| s.logs.get_mut(&b.log_id()).unwrap().1[1].leaf_hash = [7; 32]);
    assert_eq!(a.events_for_task(&t).unwrap().len(), 8);
    let err = a.verify_shared().unwrap_err();
    assert!(err.to_string().contains("leaf hash"), "{err}");

    // A checkpoint signed by another key.
    let mirror = Arc::new(MemMirror::default());
    let (a, b) = (broker(&mirror), broker(&mirror));
    run_across(&a, &b, &t);
    let other = AuditLog::in_memory(AuditKeys::generate().unwrap()).unwrap();
    for e in task_events(&task(9), 1) {
        other.append(&e).unwrap();
    }
    let foreign = other.latest_checkpoint().unwrap().unwrap();
    mirror.with(|s| {
        let cps = &mut s.logs.get_mut(&b.log_id()).unwrap().2;
        let last = cps.last_mut().unwrap();
        last.signature = foreign.signature.clone();
    });
    let err = a.events_for_task(&t).unwrap_err();
    assert!(err.to_string().contains("invalid signature"), "{err}");

    // Followed once, then cut back: the followed head is gone.
    let mirror = Arc::new(MemMirror::default());
    let (a, b) = (broker(&mirror), broker(&mirror));
    run_across(&a, &b, &t);
    a.events_for_task(&t).unwrap();
    mirror.with(|s| {
        let l = s.logs.get_mut(&b.log_id()).unwrap();
        l.1.pop();
        l.2.pop();
    });
    let err = a.events_for_task(&t).unwrap_err();
    assert!(err.to_string().contains("truncated"), "{err}");

    // A log whose id is not its key's fingerprint.
    let mirror = Arc::new(MemMirror::default());
    let (a, b) = (broker(&mirror), broker(&mirror));
    run_across(&a, &b, &t);
    mirror.with(|s| {
        let l = s.logs.remove(&b.log_id()).unwrap();
        s.logs.insert("0000000000000000".into(), l);
    });
    let err = a.verify_shared().unwrap_err();
    assert!(err.to_string().contains("fingerprint"), "{err}");
}

#[test]
fn redaction_wipes_the_mirrors_copies_of_every_log() {
    let mirror = Arc::new(MemMirror::default());
    let (a, b) = (broker(&mirror), broker(&mirror));
    let t = task(7);
    run_across(&a, &b, &t);
    assert!(a.redact_clear_text(Some(&t)).unwrap() >= 2);
    let text = trace(&b.events_for_task(&t).unwrap()).render_text();
    assert!(!text.contains(INITIATOR), "{text}");
    assert!(!text.contains(JUSTIFICATION), "{text}");
    assert!(text.contains("redacted"), "{text}");
}

/// A broker with a log file, restarted by opening it again.
fn file_broker(dir: &std::path::Path, mirror: &Arc<MemMirror>) -> AuditLog {
    let keys = AuditKeys::load_or_create(&dir.join("keys")).unwrap();
    AuditLog::open(&dir.join("audit.db"), keys)
        .unwrap()
        .with_mirror(mirror.clone())
}

#[test]
fn a_log_removed_or_cut_short_is_caught_after_a_restart_too() {
    let dir = tempfile::tempdir().unwrap();
    let t = task(10);
    for cut in [false, true] {
        let mirror = Arc::new(MemMirror::default());
        let b = broker(&mirror);
        let a = file_broker(dir.path(), &mirror);
        a.sync_mirror().unwrap();
        run_across(&a, &b, &t);
        a.follow_shared().unwrap();
        drop(a);
        mirror.with(|s| {
            if cut {
                let l = s.logs.get_mut(&b.log_id()).unwrap();
                l.1.truncate(1);
                l.2.retain(|c| c.size <= 1);
            } else {
                s.logs.remove(&b.log_id());
            }
        });
        let a = file_broker(dir.path(), &mirror);
        let want = if cut { "truncated" } else { "removed" };
        let err = a.events_for_task(&t).unwrap_err();
        assert!(
            err.to_string().contains(want),
            "trace after a restart: {err}"
        );
        let err = a.verify_shared().unwrap_err();
        assert!(
            err.to_string().contains(want),
            "verify after a restart: {err}"
        );
        drop(a);
        std::fs::remove_dir_all(dir.path()).unwrap();
        std::fs::create_dir_all(dir.path()).unwrap();
    }
}

#[test]
fn a_trace_finds_events_by_their_bytes_not_by_the_task_column() {
    let mirror = Arc::new(MemMirror::default());
    let (a, b) = (broker(&mirror), broker(&mirror));
    let t = task(11);
    run_across(&a, &b, &t);
    // The redeem at b moved to another task by its lookup column only.
    mirror.with(|s| s.logs.get_mut(&b.log_id()).unwrap().1[0].task_id = task(12).to_string());
    let records = a.events_for_task(&t).unwrap();
    assert_eq!(records.len(), 8, "still in the trace");
    assert!(
        a.verify_shared()
            .unwrap_err()
            .to_string()
            .contains("task-id column")
    );
    // The row deleted: the trace says so.
    mirror.with(|s| {
        s.logs.get_mut(&b.log_id()).unwrap().1.remove(0);
    });
    let err = a.events_for_task(&t).unwrap_err();
    assert!(err.to_string().contains("disappeared"), "{err}");
}

#[test]
fn an_unsigned_head_in_the_mirror_is_tampering_not_a_lost_file() {
    let mirror = Arc::new(MemMirror::default());
    let a = broker(&mirror);
    let events = task_events(&task(13), 1_700_000_000);
    a.append(&events[0]).unwrap();
    mirror.with(|s| {
        let l = s.logs.get_mut(&a.log_id()).unwrap();
        let mut fake = l.2[0].clone();
        fake.size = 1 << 40;
        l.2.push(fake);
    });
    // A failed shipment makes the next append ask the store again.
    mirror.with(|s| s.fail = true);
    assert!(a.append(&events[1]).is_err());
    mirror.with(|s| s.fail = false);
    let err = a.append(&events[2]).unwrap_err();
    assert!(err.to_string().contains("invalid signature"), "{err}");
}

#[test]
fn events_stored_past_the_newest_checkpoint_fail_the_verify() {
    let mirror = Arc::new(MemMirror::default());
    let (a, b) = (broker(&mirror), broker(&mirror));
    run_across(&a, &b, &task(14));
    assert!(a.verify_shared().is_ok(), "control");
    mirror.with(|s| {
        let l = s.logs.get_mut(&b.log_id()).unwrap();
        let mut extra = l.1[0].clone();
        extra.index = 40;
        l.1.push(extra);
    });
    let err = a.verify_shared().unwrap_err();
    assert!(err.to_string().contains("unsigned"), "{err}");
}

/// Clear text edited in a broker's local file is not shipped to the
/// mirror (where it would be sealed as that log's and shown by every
/// broker as genuine): a backlog's clear text is checked against the
/// events' HMACs first. The control: the untouched file ships, and
/// another broker shows the real initiator.
#[test]
fn clear_text_edited_in_the_local_file_is_not_shipped_to_the_mirror() {
    for edit in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let t = task(20);
        {
            let keys = AuditKeys::load_or_create(&dir.path().join("keys")).unwrap();
            let alone = AuditLog::open(&dir.path().join("audit.db"), keys).unwrap();
            for ev in task_events(&t, 1_700_000_000) {
                alone.append(&ev).unwrap();
            }
        }
        if edit {
            let c = rusqlite::Connection::open(dir.path().join("audit.db")).unwrap();
            let n = c
                .execute(
                    "UPDATE leaves SET clear_text = json_set(clear_text, '$.initiator', 'mallory@example.com') WHERE idx = 0",
                    [],
                )
                .unwrap();
            assert_eq!(n, 1);
        }
        let mirror = Arc::new(MemMirror::default());
        let a = file_broker(dir.path(), &mirror);
        let shipped = a.sync_mirror();
        let b = broker(&mirror);
        if edit {
            let err = shipped.unwrap_err();
            assert!(err.to_string().contains("initiator"), "{err}");
            assert!(
                mirror.with(|s| s.logs.get(&a.log_id()).is_none_or(|l| l.1.is_empty())),
                "nothing of the edited page reached the mirror"
            );
        } else {
            shipped.unwrap();
            let text = trace(&b.events_for_task(&t).unwrap()).render_text();
            assert!(text.contains(INITIATOR), "{text}");
            assert!(!text.contains("mallory"), "{text}");
        }
    }
}
