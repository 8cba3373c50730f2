//! Revocation through a real redis-server: ending a task, changing its
//! purpose and the agent kill switch reach the tool server's feed and stop
//! the credentials; FLUSHALL and a Redis restart bring nothing back; with
//! Redis down issuance goes on from the datastore and the verifier fails
//! closed, then recovers by itself.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::delegation::{PLANNER, RESEARCHER, World};
use crate::harness::{Redis, wait_for};

pub(crate) const READ: &[&str] = &["tool:crm.search:read", "dataset:crm:read"];

/// A task whose planner handed search to the researcher; returns (task, planner, researcher).
pub(crate) fn chain(w: &World, tag: &str) -> (String, PathBuf, PathBuf) {
    let (task, grant) = w.start_task(READ, "2", "10m", "read");
    let planner = w.redeem(&grant, PLANNER, &format!("{tag}-planner"));
    let hop = w.delegate(&planner, RESEARCHER, READ, &[]);
    assert!(
        hop.status.success(),
        "{}",
        String::from_utf8_lossy(&hop.stderr)
    );
    let g: serde_json::Value = serde_json::from_slice(&hop.stdout).unwrap();
    let researcher = w.redeem(
        g["grant"].as_str().unwrap(),
        RESEARCHER,
        &format!("{tag}-researcher"),
    );
    (task, planner, researcher)
}

pub(crate) fn works(w: &World, cred: &Path) -> bool {
    let out = w.call(cred, "crm.search");
    if !out.status.success() {
        eprintln!(
            "call refused: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    out.status.success()
}

fn refused_with(w: &World, cred: &Path, what: &str) -> bool {
    let out = w.call(cred, "crm.search");
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains(what)
}

#[test]
fn task_end_purpose_change_and_kill_switch() {
    let redis = Redis::start();
    let w = World::start_with(Some(&redis.url));

    // Task end: the researcher's credential (and the planner's) die at the
    // verifier; another task's credentials keep working.
    let (t1, p1, r1) = chain(&w, "t1");
    let (_t2, _p2, r2) = chain(&w, "t2");
    // The tool server trusts its feed once it has synced.
    wait_for(
        "a fresh feed at the tool server",
        Duration::from_secs(20),
        || works(&w, &r1).then_some(()),
    );
    assert!(works(&w, &r2));
    let ended = w.json(&["task", "end", &t1, "-o", "json"]);
    assert!(ended["revoked"].as_u64().unwrap() >= 4, "{ended}");
    wait_for(
        "task end reaches the verifier",
        Duration::from_secs(30),
        || refused_with(&w, &r1, "revoked").then_some(()),
    );
    assert!(
        works(&w, &r2),
        "another task's credential must keep working"
    );
    let out = w.delegate(&p1, RESEARCHER, READ, &[]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "the ended task's planner cannot hop"
    );

    // Revoking a holder's subtree kills the grants it handed out but that
    // were not redeemed yet.
    let (_t4, p4, _r4) = chain(&w, "t4");
    let hop = w.delegate(&p4, RESEARCHER, READ, &[]);
    let pending: serde_json::Value = serde_json::from_slice(&hop.stdout).unwrap();
    let jti = crate::delegation::claims(&p4)["jti"]
        .as_str()
        .unwrap()
        .to_owned();
    w.ok(&["revoke", "subtree", &jti]);
    let err = w.refused(&[
        "grant",
        "redeem",
        "--grant",
        pending["grant"].as_str().unwrap(),
        "--spiffe-id",
        RESEARCHER,
        "--out",
        w.c.path("t4-late").to_str().unwrap(),
    ]);
    assert!(err.contains("revoked"), "{err}");

    // Purpose change: old credentials rejected; new grants work again.
    let (t3, p3, r3) = chain(&w, "t3");
    w.ok(&["task", "set-purpose", &t3, "support.case-update"]);
    wait_for(
        "purpose change reaches the verifier",
        Duration::from_secs(30),
        || refused_with(&w, &r3, "revoked").then_some(()),
    );
    let hop = w.delegate(&p3, RESEARCHER, READ, &[]);
    assert_eq!(hop.status.code(), Some(2), "old credentials cannot hop");
    // A re-issued start grant for a tool server admission never admitted
    // for the task is refused (the `crm` grant below is the control).
    let widened = w.run(&["task", "grant", &t3, "--audience", "payments"]);
    assert_eq!(
        widened.status.code(),
        Some(2),
        "audience widened by a regrant"
    );
    assert!(
        String::from_utf8_lossy(&widened.stderr).contains("audience \"payments\" was not admitted"),
        "{}",
        String::from_utf8_lossy(&widened.stderr)
    );
    let g = w.json(&["task", "grant", &t3, "--audience", "crm", "-o", "json"]);
    let p3b = w.redeem(g["grant"].as_str().unwrap(), PLANNER, "t3-planner-again");
    let hop = w.delegate(
        &p3b,
        RESEARCHER,
        READ,
        &["--purpose", "support.case-update"],
    );
    assert!(
        hop.status.success(),
        "{}",
        String::from_utf8_lossy(&hop.stderr)
    );
    let g: serde_json::Value = serde_json::from_slice(&hop.stdout).unwrap();
    let r3b = w.redeem(
        g["grant"].as_str().unwrap(),
        RESEARCHER,
        "t3-researcher-again",
    );
    assert!(
        works(&w, &r3b),
        "the same agents work again after new grants"
    );

    // Kill switch: the researcher, across three tasks.
    let rs: Vec<PathBuf> = (0..3).map(|i| chain(&w, &format!("k{i}")).2).collect();
    for r in &rs {
        assert!(works(&w, r));
    }
    let v = w.json(&[
        "revoke",
        "agent",
        RESEARCHER,
        "--reason",
        "rogue agent",
        "-o",
        "json",
    ]);
    assert!(v["revoked"].as_array().unwrap().len() >= 6, "{v}");
    for r in &rs {
        wait_for(
            "kill switch reaches the verifier",
            Duration::from_secs(30),
            || refused_with(&w, r, "revoked").then_some(()),
        );
    }

    // Bad input: clear errors, nothing changed.
    for (args, want) in [
        (
            vec!["revoke", "credential", "no-such-id"],
            "nothing to revoke",
        ),
        (
            vec!["revoke", "credential", "bad id!"],
            "not a credential id",
        ),
        (vec!["revoke", "task", "task-xyz"], "task"),
        // A well-formed task id this broker never issued (another tenant's).
        (
            vec!["revoke", "task", "task-0123456789abcdef0123456789abcdef"],
            "no task with id",
        ),
        (
            vec!["revoke", "agent", "spiffe://other.org/agents/x"],
            "another trust domain",
        ),
    ] {
        let err = w.refused(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

#[test]
fn flushall_and_restart_bring_nothing_back_and_redis_down_fails_closed() {
    let mut redis = Redis::start();
    let w = World::start_with(Some(&redis.url));
    let (t1, _p1, r1) = chain(&w, "a");
    let (_t2, _p2, r2) = chain(&w, "b");
    w.ok(&["task", "end", &t1]);
    wait_for(
        "revocation at the verifier",
        Duration::from_secs(30),
        || refused_with(&w, &r1, "revoked").then_some(()),
    );

    // FLUSHALL: the broker re-seeds from its durable log; the revoked
    // credential never works again, the live one recovers.
    assert!(redis.cli(&["FLUSHALL"]).contains("OK"));
    wait_for("the broker re-seeds Redis", Duration::from_secs(20), || {
        redis
            .cli(&["EXISTS", "{baton}:epoch"])
            .trim()
            .eq("1")
            .then_some(())
    });
    wait_for(
        "live credential works after re-seed",
        Duration::from_secs(20),
        || works(&w, &r2).then_some(()),
    );
    assert!(
        !works(&w, &r1),
        "a revoked credential came back after FLUSHALL"
    );

    // Redis down: the datastore is the registry, so issuance goes on (a
    // task starts, a grant made before the outage is redeemed); verifiers
    // following Redis deny once their feed is stale.
    let (_t3, grant) = w.start_task(READ, "2", "10m", "read");
    redis.stop();
    let _ = w.start_task(READ, "2", "10m", "read");
    let _during = w.redeem(&grant, PLANNER, "while-down");
    wait_for(
        "verifier fails closed on a stale feed",
        Duration::from_secs(60),
        || (!works(&w, &r2)).then_some(()),
    );

    // Redis back, empty: everything recovers by itself; nothing revoked returns.
    redis.restart();
    wait_for(
        "recovery after Redis returns",
        Duration::from_secs(30),
        || works(&w, &r2).then_some(()),
    );
    assert!(
        !works(&w, &r1),
        "a revoked credential came back after a Redis restart"
    );
}

#[test]
fn the_revocation_service_keeps_the_feed_alive_on_its_own() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = crate::harness::baton();
    cmd.args([
        "revocation",
        "--redis",
        &redis.url,
        "--heartbeat",
        "200ms",
        "--check-every",
        "200ms",
    ]);
    let _svc = crate::harness::Proc::spawn("revocation", cmd, dir.path().join("revocation.log"));
    // Heartbeats appear on the stream with no broker running.
    wait_for(
        "heartbeats from `baton revocation`",
        Duration::from_secs(20),
        || {
            let n: u64 = redis
                .cli(&["XLEN", "{baton}:revocations:v2"])
                .trim()
                .parse()
                .unwrap_or(0);
            (n >= 3).then_some(())
        },
    );
    let last = redis.cli(&[
        "XREVRANGE",
        "{baton}:revocations:v2",
        "+",
        "-",
        "COUNT",
        "1",
    ]);
    assert!(last.contains("hb"), "{last}");
}
