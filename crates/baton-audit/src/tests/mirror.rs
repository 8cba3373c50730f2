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
    fn head(&self, log_id: &str) -> Result<Option<SignedCheckpoint>, String> {
        self.with(|s| {
            if s.fail {
                return Err("datastore down".into());
            }
            Ok(s.logs.get(log_id).and_then(|l| l.2.last().cloned()))
        })
    }
    fn ship(
        &self,
        log: &SharedLog,
        leaves: &[MirrorLeaf],
        checkpoints: &[SignedCheckpoint],
    ) -> Result<(), String> {
        self.with(|s| {
            if s.fail {
                return Err("datastore down".into());
            }
            let l = s
                .logs
                .entry(log.log_id.clone())
                .or_insert_with(|| (log.public_key.clone(), Vec::new(), Vec::new()));
            if l.0 != log.public_key {
                return Err("another key".into());
            }
            let size = l.2.last().map_or(0, |c| c.size);
            if leaves.first().map_or(size, |f| f.index) != size {
                return Err(format!("stored size {size}"));
            }
            l.1.extend_from_slice(leaves);
            l.2.extend_from_slice(checkpoints);
            Ok(())
        })
    }
    fn logs(&self) -> Result<Vec<SharedLog>, String> {
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
    fn leaf_hashes(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<[u8; 32]>, String> {
        Ok(self
            .leaves(log_id, from, to)?
            .into_iter()
            .map(|l| l.leaf_hash)
            .collect())
    }
    fn leaves(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<MirrorLeaf>, String> {
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
    fn checkpoints(&self, log_id: &str, from: u64) -> Result<Vec<SignedCheckpoint>, String> {
        self.with(|s| {
            Ok(s.logs
                .get(log_id)
                .map(|l| l.2.iter().filter(|c| c.size >= from).cloned().collect())
                .unwrap_or_default())
        })
    }
    fn task_rows(&self, task: &TaskId) -> Result<Vec<TaskRow>, String> {
        self.with(|s| {
            Ok(s.logs
                .iter()
                .flat_map(|(id, l)| {
                    l.1.iter()
                        .filter(|x| x.task_id == task.as_str())
                        .map(|x| TaskRow {
                            log_id: id.clone(),
                            index: x.index,
                            event: x.event.clone(),
                            clear_text: x.clear_text.clone(),
                        })
                        .collect::<Vec<_>>()
                })
                .collect())
        })
    }
    fn redact(&self, task: Option<&TaskId>) -> Result<u64, String> {
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
    // A consistent rewrite of the leaf hashes: the signed root differs.
    let mirror = Arc::new(MemMirror::default());
    let (a, b) = (broker(&mirror), broker(&mirror));
    let t = task(6);
    run_across(&a, &b, &t);
    mirror.with(|s| s.logs.get_mut(&b.log_id()).unwrap().1[1].leaf_hash = [7; 32]);
    let err = a.events_for_task(&t).unwrap_err();
    assert!(err.to_string().contains("rebuilt tree differs"), "{err}");

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
