//! The reporter: durable spool, delivery, no loss while the broker is down.

use std::time::Duration;

use baton_core::api::ToolCallReport;
use baton_core::{RiskTier, TaskId};
use baton_verify::{Backoff, MAX_BATCH, Reporter};

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
    }
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
    let on_disk = std::fs::read_to_string(dir.path().join("tool-calls.jsonl")).unwrap();
    assert_eq!(on_disk.lines().count(), 3);

    // The process restarts while the broker is still down: nothing lost.
    drop(reporter);
    let reporter = Reporter::open(dir.path(), sender.clone()).unwrap();
    assert_eq!(reporter.pending_reports(), sent);

    // The broker comes back.
    sender.set_up(true);
    assert_eq!(reporter.flush().await.unwrap(), 3);
    assert_eq!(reporter.pending(), 0);
    assert_eq!(sender.received(), sent);
    let on_disk = std::fs::read_to_string(dir.path().join("tool-calls.jsonl")).unwrap();
    assert!(on_disk.is_empty());
    // Nothing is sent twice once acknowledged.
    assert_eq!(reporter.flush().await.unwrap(), 0);
    assert_eq!(sender.received().len(), 3);
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
    // New submissions are delivered without waiting for a retry timer.
    reporter.submit(report(2)).unwrap();
    for _ in 0..10 {
        if reporter.pending() == 0 {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert_eq!(sender.received().len(), 2);
    task.abort();
}
