//! The reporter: durable spool, delivery, no loss while the broker is down.

use std::time::Duration;

use baton_core::api::ToolCallReport;
use baton_core::{RiskTier, TaskId};
use baton_verify::{Backoff, MAX_BATCH, Reporter, SEGMENT_RECORDS};

use crate::common::*;

fn report(n: u32) -> ToolCallReport {
    ToolCallReport {
        report_id: uuid::Uuid::new_v4().to_string(),
        task_id: TaskId::from_random([1; 16]),
        token_jti: format!("jti-{n}"),
        agent: id("spiffe://example.org/agents/summarizer"),
        tool: "crm.search".into(),
        resource: "dataset:crm".into(),
        risk: RiskTier::Read,
        scope_used: vec!["tool:crm.search:read".into()],
        input_digest: "00".repeat(32),
        output_digest: None,
        justification: None,
        decision: "allow".into(),
        policy_ids: vec![],
        reason: None,
        at: NOW + u64::from(n),
        latency_ms: None,
        upstream_status: None,
        recorded: Default::default(),
        traceparent: None,
    }
}

/// Records in the spool are delivered under this process's identity: a
/// spool directory or segment other users can write is refused at open,
/// before anything in it is read. The control: the same spool made
/// private again opens and delivers what it holds.
#[tokio::test]
async fn a_spool_other_users_can_write_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let sender = TestSender::new(true);
    let reporter = Reporter::open(dir.path(), sender.clone()).unwrap();
    reporter.submit(report(1)).unwrap();
    drop(reporter);
    let mode = |p: &std::path::Path, m: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
    };
    mode(dir.path(), 0o777);
    let e = Reporter::open(dir.path(), sender.clone()).err().unwrap();
    assert!(e.to_string().contains("writable by other users"), "{e}");
    mode(dir.path(), 0o700);
    let segment = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "jsonl"))
        .unwrap();
    mode(&segment, 0o666);
    let e = Reporter::open(dir.path(), sender.clone()).err().unwrap();
    assert!(e.to_string().contains("writable by other users"), "{e}");
    // A segment planted as a symlink is not followed.
    mode(&segment, 0o600);
    let planted = dir.path().join("tool-calls.00000000000003e7.jsonl");
    std::os::unix::fs::symlink(&segment, &planted).unwrap();
    let e = Reporter::open(dir.path(), sender.clone()).err().unwrap();
    assert!(e.to_string().contains("symlink"), "{e}");
    std::fs::remove_file(&planted).unwrap();
    // Control: private again, it opens and delivers its record.
    let reporter = Reporter::open(dir.path(), sender.clone()).unwrap();
    assert_eq!(reporter.pending(), 1);
    assert_eq!(reporter.flush().await.unwrap(), 1);
}

#[tokio::test]
async fn keeps_records_while_the_broker_is_down_and_delivers_them_later() {
    let dir = tempfile::tempdir().unwrap();
    let sender = TestSender::new(false);
    let reporter = Reporter::open(dir.path(), sender.clone()).unwrap();
    let sent: Vec<_> = (0..3).map(report).collect();
    for r in &sent {
        reporter.submit(r.clone()).unwrap();
    }
    // Down: every attempt fails and nothing leaves the spool.
    for _ in 0..3 {
        assert!(reporter.flush().await.is_err());
    }
    assert_eq!(sender.attempts(), 3);
    assert_eq!(reporter.pending(), 3);
    assert_eq!(spool_lines(dir.path()), 3);

    // The process restarts while the broker is still down: nothing lost.
    drop(reporter);
    let reporter = Reporter::open(dir.path(), sender.clone()).unwrap();
    assert_eq!(reporter.pending_reports(), sent);

    // The broker comes back.
    sender.set_up(true);
    assert_eq!(reporter.flush().await.unwrap(), 3);
    assert_eq!(reporter.pending(), 0);
    assert_eq!(sender.received(), sent);
    // Nothing is sent twice once acknowledged.
    assert_eq!(reporter.flush().await.unwrap(), 0);
    assert_eq!(sender.received().len(), 3);
    // The delivered segment is gone (the writer removes it; dropping the
    // reporter waits for the writer).
    drop(reporter);
    assert_eq!(spool_lines(dir.path()), 0);
    let reporter = Reporter::open(dir.path(), sender.clone()).unwrap();
    assert_eq!(reporter.pending(), 0);
}

#[tokio::test]
async fn a_record_the_broker_refuses_is_set_aside_and_blocks_nothing_behind_it() {
    let dir = tempfile::tempdir().unwrap();
    let sender = TestSender::new(true);
    let reporter = Reporter::open(dir.path(), sender.clone()).unwrap();
    let sent: Vec<_> = (0..5).map(report).collect();
    // The second is refused by its receipt, the fourth makes any batch
    // holding it too large.
    sender
        .refuse
        .lock()
        .unwrap()
        .push(sent[1].report_id.clone());
    sender
        .too_large
        .lock()
        .unwrap()
        .push(sent[3].report_id.clone());
    for r in &sent {
        reporter.submit(r.clone()).unwrap();
    }
    assert_eq!(reporter.flush().await.unwrap(), 5);
    assert_eq!(reporter.pending(), 0);
    let ids = |v: &[ToolCallReport]| v.iter().map(|r| r.report_id.clone()).collect::<Vec<_>>();
    assert_eq!(
        ids(&sender.received()),
        ids(&[sent[0].clone(), sent[2].clone(), sent[4].clone()])
    );
    assert_eq!(reporter.refused(), 2);
    // Both are kept, with why, beside the spool: not in the log, not lost.
    let kept = std::fs::read_to_string(dir.path().join(baton_verify::REFUSED_FILE)).unwrap();
    let kept: Vec<serde_json::Value> = kept
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(kept.len(), 2);
    assert_eq!(kept[0]["report"]["report_id"], sent[1].report_id.as_str());
    assert_eq!(kept[0]["refusal"]["code"], "invalid_request");
    assert_eq!(kept[1]["report"]["report_id"], sent[3].report_id.as_str());
    assert_eq!(kept[1]["refusal"]["code"], "payload_too_large");
    // New records go on being delivered.
    let later = report(9);
    reporter.submit(later.clone()).unwrap();
    assert_eq!(reporter.flush().await.unwrap(), 1);
    assert_eq!(
        sender.received().last().map(|r| r.report_id.clone()),
        Some(later.report_id)
    );
}

#[tokio::test]
async fn batches_shrink_to_what_the_broker_takes_and_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sender = TestSender::new(true);
    sender.most.store(3, std::sync::atomic::Ordering::SeqCst);
    let reporter = Reporter::open(dir.path(), sender.clone()).unwrap();
    let sent: Vec<_> = (0..20).map(report).collect();
    for r in &sent {
        reporter.submit(r.clone()).unwrap();
    }
    assert_eq!(reporter.flush().await.unwrap(), 20);
    assert_eq!(sender.received(), sent);
    assert_eq!(reporter.refused(), 0);
    assert!(!dir.path().join(baton_verify::REFUSED_FILE).exists());
}

#[tokio::test]
async fn a_record_outside_the_logs_bounds_is_refused_at_the_spool() {
    let dir = tempfile::tempdir().unwrap();
    let reporter = Reporter::open(dir.path(), TestSender::new(true)).unwrap();
    let mut r = report(1);
    r.resource = "a".repeat(baton_core::report_bounds::MAX_RESOURCE + 1);
    let e = reporter.submit(r).unwrap_err();
    assert!(e.to_string().contains("resource"), "{e}");
    assert_eq!(reporter.pending(), 0);
    // Control: at the bound.
    let mut r = report(2);
    r.resource = "a".repeat(baton_core::report_bounds::MAX_RESOURCE);
    reporter.submit(r).unwrap();
    assert_eq!(reporter.pending(), 1);
}

#[tokio::test]
async fn large_backlogs_go_in_batches() {
    let dir = tempfile::tempdir().unwrap();
    let sender = TestSender::new(true);
    let reporter = Reporter::open(dir.path(), sender.clone()).unwrap();
    let n = u32::try_from(MAX_BATCH).unwrap() + 10;
    for i in 0..n {
        reporter.submit(report(i)).unwrap();
    }
    assert_eq!(reporter.flush().await.unwrap(), MAX_BATCH + 10);
    assert_eq!(sender.attempts(), 2);
    assert_eq!(sender.received().len(), MAX_BATCH + 10);
}

#[tokio::test]
async fn torn_and_duplicate_lines_are_dropped_on_open() {
    let dir = tempfile::tempdir().unwrap();
    let a = report(1);
    let b = report(2);
    let mut text = String::new();
    text.push_str(&serde_json::to_string(&a).unwrap());
    text.push('\n');
    text.push_str(&serde_json::to_string(&a).unwrap());
    text.push('\n');
    text.push_str(&serde_json::to_string(&b).unwrap());
    text.push('\n');
    text.push_str("{\"report_id\":\"trunc");
    std::fs::write(dir.path().join("tool-calls.jsonl"), text).unwrap();
    let reporter = Reporter::open(dir.path(), TestSender::new(true)).unwrap();
    assert_eq!(reporter.pending_reports(), vec![a.clone(), b.clone()]);
    // The file was compacted, so the next append starts on a fresh line.
    let c = report(3);
    reporter.submit(c.clone()).unwrap();
    drop(reporter);
    let reporter = Reporter::open(dir.path(), TestSender::new(true)).unwrap();
    assert_eq!(reporter.pending_reports(), vec![a, b, c]);
}

#[test]
fn backoff_doubles_up_to_the_cap_and_resets() {
    let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(500));
    let delays: Vec<_> = (0..5).map(|_| b.on_failure().as_millis()).collect();
    assert_eq!(delays, vec![100, 200, 400, 500, 500]);
    b.on_success();
    assert_eq!(b.on_failure().as_millis(), 100);
}

#[tokio::test(start_paused = true)]
async fn background_task_retries_until_delivered() {
    let dir = tempfile::tempdir().unwrap();
    let sender = TestSender::new(false);
    let reporter = Reporter::open(dir.path(), sender.clone()).unwrap();
    let task = reporter.spawn();
    reporter.submit(report(1)).unwrap();
    // Time is paused: sleeps below only advance the virtual clock.
    for _ in 0..50 {
        if sender.attempts() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(sender.attempts() >= 3, "retried with backoff");
    assert_eq!(reporter.pending(), 1);
    sender.set_up(true);
    for _ in 0..600 {
        if reporter.pending() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(reporter.pending(), 0);
    assert_eq!(sender.received().len(), 1);
    // New submissions are delivered without waiting for a retry timer:
    // within delivery's short linger (20 ms), well under the first
    // backoff (200 ms).
    reporter.submit(report(2)).unwrap();
    for _ in 0..10 {
        if reporter.pending() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sender.received().len(), 2);
    task.abort();
}

#[test]
fn concurrent_submits_are_all_durable_and_kept_in_order_per_caller() {
    let dir = tempfile::tempdir().unwrap();
    let reporter = Reporter::open(dir.path(), TestSender::new(false)).unwrap();
    let per_thread: Vec<Vec<ToolCallReport>> = (0..8)
        .map(|t| (0..50).map(|i| report(t * 100 + i)).collect())
        .collect();
    std::thread::scope(|scope| {
        for records in &per_thread {
            let reporter = reporter.clone();
            scope.spawn(move || {
                for r in records {
                    reporter.submit(r.clone()).unwrap();
                }
            });
        }
    });
    assert_eq!(reporter.pending(), 400);
    assert_eq!(spool_lines(dir.path()), 400);
    drop(reporter);
    let reporter = Reporter::open(dir.path(), TestSender::new(false)).unwrap();
    let back = reporter.pending_reports();
    assert_eq!(back.len(), 400);
    // Each caller's records in the order it submitted them.
    for records in &per_thread {
        let ids: Vec<&str> = records.iter().map(|r| r.report_id.as_str()).collect();
        let seen: Vec<&str> = back
            .iter()
            .map(|r| r.report_id.as_str())
            .filter(|id| ids.contains(id))
            .collect();
        assert_eq!(seen, ids);
    }
}

#[tokio::test]
async fn delivered_segments_are_removed_and_a_restart_resends_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let sender = TestSender::new(true);
    let reporter = Reporter::open(dir.path(), sender.clone()).unwrap();
    // A segment closes once it holds SEGMENT_RECORDS at the start of a
    // group commit, so twice that is sure to need a second one.
    let n = 2 * SEGMENT_RECORDS;
    let tickets: Vec<_> = (0..n)
        .map(|i| reporter.enqueue(report(u32::try_from(i).unwrap())).unwrap())
        .collect();
    for t in tickets {
        t.wait().await.unwrap();
    }
    let segments: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        segments.len() >= 2,
        "{n} records fill more than one segment: {segments:?}"
    );
    assert_eq!(spool_lines(dir.path()), n);
    assert_eq!(reporter.flush().await.unwrap(), n);
    drop(reporter);
    assert_eq!(spool_lines(dir.path()), 0);
    let reporter = Reporter::open(dir.path(), sender.clone()).unwrap();
    assert_eq!(reporter.flush().await.unwrap(), 0);
    assert_eq!(sender.received().len(), n);
}

#[tokio::test]
async fn a_segment_removed_under_the_writer_is_written_again() {
    let dir = tempfile::tempdir().unwrap();
    let reporter = Reporter::open(dir.path(), TestSender::new(false)).unwrap();
    let a = report(1);
    reporter.submit_async(a.clone()).await.unwrap();
    for e in std::fs::read_dir(dir.path()).unwrap() {
        std::fs::remove_file(e.unwrap().path()).unwrap();
    }
    let b = report(2);
    reporter.submit_async(b.clone()).await.unwrap();
    assert_eq!(spool_lines(dir.path()), 2);
    drop(reporter);
    let reporter = Reporter::open(dir.path(), TestSender::new(false)).unwrap();
    assert_eq!(reporter.pending_reports(), vec![a, b]);
}

#[test]
fn records_of_what_happened_are_written_once_the_spool_works_again() {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let reporter = Reporter::open(&spool, TestSender::new(false)).unwrap();
    // No segment can be made while the spool directory is a file.
    std::fs::remove_dir_all(&spool).unwrap();
    std::fs::write(&spool, b"").unwrap();
    // A record the caller would act on only once written: dropped.
    let once = report(1);
    assert!(
        reporter
            .enqueue_once(once)
            .unwrap()
            .blocking_wait()
            .is_err()
    );
    assert!(!reporter.is_healthy());
    // Records of what happened anyway, waited for or not: kept.
    let unwaited = report(2);
    drop(reporter.enqueue(unwaited.clone()).unwrap());
    let waited = report(3);
    assert!(reporter.submit(waited.clone()).is_err());
    assert_eq!(reporter.pending(), 0);
    std::fs::remove_file(&spool).unwrap();
    std::fs::create_dir(&spool).unwrap();
    let next = report(4);
    reporter.submit(next.clone()).unwrap();
    assert!(reporter.is_healthy());
    assert_eq!(reporter.pending_reports(), vec![unwaited, waited, next]);
}

#[test]
fn a_torn_multibyte_tail_does_not_stop_the_spool_opening() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = report(1);
    a.justification = Some("café ☕".into());
    let mut bytes = serde_json::to_vec(&a).unwrap();
    bytes.push(b'\n');
    let line = serde_json::to_vec(&a).unwrap();
    // Cut inside the 3-byte '☕'.
    let cut = line.windows(3).position(|w| w == "☕".as_bytes()).unwrap() + 1;
    bytes.extend_from_slice(&line[..cut]);
    std::fs::write(dir.path().join("tool-calls.0000000000000007.jsonl"), bytes).unwrap();
    let reporter = Reporter::open(dir.path(), TestSender::new(false)).unwrap();
    assert_eq!(reporter.pending_reports(), vec![a.clone()]);
    // New segments come after the highest number found.
    let b = report(2);
    reporter.submit(b.clone()).unwrap();
    drop(reporter);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, vec!["tool-calls.0000000000000008.jsonl"]);
    let reporter = Reporter::open(dir.path(), TestSender::new(false)).unwrap();
    assert_eq!(reporter.pending_reports(), vec![a, b]);
}

#[test]
fn a_segment_numbered_at_the_limit_is_refused_by_name_and_left_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let name = "tool-calls.ffffffffffffffff.jsonl";
    let line = format!("{}\n", serde_json::to_string(&report(1)).unwrap());
    std::fs::write(dir.path().join(name), &line).unwrap();
    let err = Reporter::open(dir.path(), TestSender::new(false)).unwrap_err();
    assert!(err.to_string().contains(name), "{err}");
    assert!(err.to_string().contains("too large"), "{err}");
    // Nothing stored was touched.
    assert_eq!(
        std::fs::read_to_string(dir.path().join(name)).unwrap(),
        line
    );
    // Control: the same record under an ordinary number opens.
    std::fs::rename(
        dir.path().join(name),
        dir.path().join("tool-calls.0000000000000001.jsonl"),
    )
    .unwrap();
    let reporter = Reporter::open(dir.path(), TestSender::new(false)).unwrap();
    assert_eq!(reporter.pending(), 1);
}

/// `settle` after a flush leaves no segment behind while the reporter is
/// still alive (a process stopping with other handles still held); with a
/// record still undelivered it keeps the segment (control).
#[tokio::test]
async fn settle_removes_a_delivered_current_segment_and_keeps_an_undelivered_one() {
    let dir = tempfile::tempdir().unwrap();
    let up = TestSender::new(true);
    let reporter = Reporter::open(dir.path(), up.clone()).unwrap();
    let _other_handle = reporter.clone();
    reporter.submit_async(report(1)).await.unwrap();
    assert_eq!(spool_lines(dir.path()), 1);
    assert_eq!(reporter.flush().await.unwrap(), 1);
    reporter.settle().await;
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
    // More records go into a new segment afterwards.
    reporter.submit_async(report(2)).await.unwrap();
    assert_eq!(spool_lines(dir.path()), 1);

    let dir = tempfile::tempdir().unwrap();
    let reporter = Reporter::open(dir.path(), TestSender::new(false)).unwrap();
    reporter.submit_async(report(3)).await.unwrap();
    assert!(reporter.flush().await.is_err());
    reporter.settle().await;
    assert_eq!(spool_lines(dir.path()), 1);
    assert_eq!(reporter.pending(), 1);
}
