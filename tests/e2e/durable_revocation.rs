//! The datastore is the source of truth for revocation; Redis is a
//! rebuildable deny set and feed. Each test breaks Redis the way an
//! operator meets it (FLUSHALL, killed, read-only) and checks, at a tool
//! server following the Redis feed, that nothing revoked is accepted
//! afterwards and nothing unrevoked stays refused once Redis is back.

use std::path::Path;
use std::time::Duration;

use crate::delegation::{RESEARCHER, World, claims};
use crate::harness::{Redis, wait_for};
use crate::revocation::{READ, chain, works};

fn refused_revoked(w: &World, cred: &Path) -> bool {
    let out = w.call(cred, "crm.search");
    !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("revoked")
}

/// N of "revoked N credential(s)".
fn count(out: &str) -> usize {
    out.split("revoked ")
        .nth(1)
        .and_then(|r| r.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count in {out}"))
}

/// The call got past the revocation check (refused later by the example
/// policy, which lets only researchers search, or allowed).
fn passes_revocation(w: &World, cred: &Path) -> bool {
    let out = w.call(cred, "crm.search");
    let err = String::from_utf8_lossy(&out.stderr);
    out.status.success() || (err.contains("policy_denied") && !err.contains("revoked"))
}

fn jti(cred: &Path) -> String {
    claims(cred)["jti"].as_str().unwrap().to_owned()
}

/// Waits until `cred` works at the tool server (its feed is fresh).
fn until_works(w: &World, cred: &Path, what: &str) {
    wait_for(what, Duration::from_secs(30), || {
        works(w, cred).then_some(())
    });
}

/// Waits until `cred` is refused as revoked at the tool server.
fn until_revoked(w: &World, cred: &Path, what: &str) {
    wait_for(what, Duration::from_secs(30), || {
        refused_revoked(w, cred).then_some(())
    });
}

/// Whether Redis's deny set holds `id` (a credential or a task).
fn in_deny_set(redis: &Redis, id: &str) -> bool {
    redis
        .cli(&["ZSCORE", "{baton}:revoked-index", id])
        .trim()
        .parse::<u64>()
        .is_ok()
}

/// Makes Redis a replica of a server that does not exist: every write is
/// refused with READONLY, reads still answer.
fn make_read_only(redis: &Redis) {
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port().to_string();
    drop(dead);
    assert!(
        redis
            .cli(&["REPLICAOF", "127.0.0.1", &dead_port])
            .contains("OK")
    );
}

#[test]
fn after_flushall_revocations_reach_credentials_issued_before_it() {
    let redis = Redis::start();
    let w = World::start_with(Some(&redis.url));
    let (_ta, pa, ra) = chain(&w, "a");
    let (_tb, pb, rb) = chain(&w, "b");
    let (_tc, pc, rc) = chain(&w, "c");
    until_works(&w, &rc, "the tool server's feed is fresh");

    assert!(redis.cli(&["FLUSHALL"]).contains("OK"));
    // The relay re-seeds Redis from the datastore; live credentials work
    // again without anyone touching them.
    until_works(&w, &ra, "re-seed after FLUSHALL");
    // Redis holds no live credential at all: only the epoch, the feed and
    // the relay's mark.
    let keys = redis.cli(&["KEYS", "*cred*"]);
    assert!(keys.trim().is_empty(), "live credentials in Redis: {keys}");

    // A credential issued before the flush: revoked by its jti.
    let out = w.ok(&["revoke", "credential", &jti(&ra), "--reason", "leaked"]);
    // The researcher's token and its certificate.
    assert_eq!(count(&out), 2, "{out}");
    until_revoked(&w, &ra, "credential revocation after FLUSHALL");
    assert!(
        works(&w, &rb) && works(&w, &rc),
        "revoking one researcher hit another"
    );
    assert!(
        passes_revocation(&w, &pa),
        "revoking the researcher hit its planner"
    );

    // A subtree issued before the flush: the planner and its researcher.
    let out = w.ok(&["revoke", "subtree", &jti(&pb), "--reason", "compromised"]);
    // Both tokens, both certificates and the grant between them.
    assert_eq!(count(&out), 5, "{out}");
    until_revoked(&w, &pb, "subtree root");
    until_revoked(&w, &rb, "subtree child");

    // An agent: every credential of the researcher, across tasks.
    let v = w.json(&["revoke", "agent", RESEARCHER, "-o", "json"]);
    assert_eq!(v["propagation"]["complete"], true, "{v}");
    until_revoked(&w, &rc, "agent revocation after FLUSHALL");
    // The untampered control: the third planner was never revoked (the
    // example policy lets only researchers search, so its call passes the
    // revocation check and stops at the policy).
    assert!(
        passes_revocation(&w, &pc),
        "an unrevoked credential is refused"
    );

    // Revoking again is idempotent: the same ids, no error.
    let again = w.ok(&["revoke", "credential", &jti(&ra)]);
    assert_eq!(count(&again), 2, "{again}");
}

#[test]
fn task_end_while_redis_is_down_reaches_verifiers_when_it_returns() {
    let mut redis = Redis::start();
    let w = World::start_with(Some(&redis.url));
    let (t1, _p1, r1) = chain(&w, "t1");
    let (_t2, p2, r2) = chain(&w, "t2");
    until_works(&w, &r2, "the tool server's feed is fresh");

    redis.stop();
    // The datastore has it: the command succeeds and says propagation is
    // behind; a retry is idempotent.
    let out = w.ok(&["task", "end", &t1]);
    assert!(out.contains("recorded; propagating"), "{out}");
    let again = w.ok(&["task", "end", &t1]);
    assert!(again.contains("recorded; propagating"), "{again}");
    // A hop and its redeem during the outage: recorded in the datastore,
    // delivered, audited as granted (the grant is not burnt for nothing).
    let hop = w.delegate(&p2, RESEARCHER, READ, &[]);
    assert!(
        hop.status.success(),
        "{}",
        String::from_utf8_lossy(&hop.stderr)
    );
    let g: serde_json::Value = serde_json::from_slice(&hop.stdout).unwrap();
    let r3 = w.redeem(
        g["grant"].as_str().unwrap(),
        RESEARCHER,
        "outage-researcher",
    );
    // Verifiers following a dead Redis fail closed.
    wait_for(
        "the verifier fails closed while Redis is down",
        Duration::from_secs(60),
        || (!works(&w, &r2)).then_some(()),
    );

    // Redis back, empty: the relay re-seeds it with everything the
    // datastore revoked, including the task ended during the outage.
    redis.restart();
    until_works(&w, &r2, "an unrevoked credential after Redis returns");
    until_works(&w, &r3, "the credential redeemed during the outage");
    assert!(
        refused_revoked(&w, &r1),
        "a task ended while Redis was down is still accepted"
    );
    let task2 = claims(&r3)["task"]["id"].as_str().unwrap().to_owned();
    let text = w.json(&["audit", "trace", &task2, "--json"]).to_string();
    assert!(
        text.contains(&jti(&r3)),
        "the outage redeem is not audited: {text}"
    );
    let status = w.json(&["task", "end", &t1, "-o", "json"]);
    assert_eq!(status["propagation"]["complete"], true, "{status}");
}

#[test]
fn task_end_while_redis_is_read_only_reaches_verifiers_when_it_is_writable() {
    let redis = Redis::start();
    let w = World::start_with(Some(&redis.url));
    let (t1, _p1, r1) = chain(&w, "t1");
    let (_t2, _p2, r2) = chain(&w, "t2");
    until_works(&w, &r2, "the tool server's feed is fresh");

    make_read_only(&redis);
    let out = w.ok(&["task", "end", &t1]);
    assert!(out.contains("recorded; propagating"), "{out}");
    assert!(
        !out.contains("issuance refused"),
        "a misleading message: {out}"
    );

    assert!(redis.cli(&["REPLICAOF", "NO", "ONE"]).contains("OK"));
    until_revoked(&w, &r1, "the task ended while Redis was read-only");
    until_works(&w, &r2, "an unrevoked credential once Redis is writable");
    let status = w.json(&["task", "end", &t1, "-o", "json"]);
    assert_eq!(status["propagation"]["complete"], true, "{status}");
}

#[test]
fn a_failed_over_redis_that_missed_writes_is_caught_up_from_its_own_mark() {
    let redis = Redis::start();
    let w = World::start_with(Some(&redis.url));
    let (t1, _p1, r1) = chain(&w, "t1");
    let (_t2, _p2, r2) = chain(&w, "t2");
    until_works(&w, &r2, "the tool server's feed is fresh");
    w.ok(&["task", "end", &t1]);
    until_revoked(&w, &r1, "task end");
    let log = redis.cli(&["KEYS", "{baton}:outbox:*"]).trim().to_owned();
    assert!(log.starts_with("{baton}:outbox:"), "no relay mark: {log}");
    assert!(redis.cli(&["GET", &log]).trim().parse::<u64>().unwrap() >= 1);
    // The task's end is one deny entry, keyed by the task.
    let denied = |id: &str| in_deny_set(&redis, id);
    assert!(denied(&t1));
    // What a replica that missed the last writes looks like: the deny
    // set and the mark of the last publication are gone, the epoch is
    // still there.
    redis.cli(&["DEL", "{baton}:revoked-index"]);
    redis.cli(&["SET", &log, "0"]);
    // The relay sees the store's mark behind the datastore and publishes
    // again; the next revocation is not needed to heal it.
    wait_for("the relay republishes", Duration::from_secs(20), || {
        denied(&t1).then_some(())
    });
    assert!(refused_revoked(&w, &r1));
    assert!(works(&w, &r2));
}

/// SIGTERM while Redis refuses writes: the task ended just before it is in
/// the datastore's outbox only; the broker's last relay pass keeps trying
/// within its shutdown grace, publishes it once Redis takes writes again,
/// and exits 0. The other task's entry is not written (the control).
#[test]
fn sigterm_publishes_a_revocation_the_relay_had_not_yet_within_the_grace() {
    let redis = Redis::start();
    let mut w = World::start_with(Some(&redis.url));
    let (t1, _p1, r1) = chain(&w, "t1");
    let (t2, _p2, _r2) = chain(&w, "t2");
    until_works(&w, &r1, "the tool server's feed is fresh");
    let denied = |id: &str| in_deny_set(&redis, id);

    make_read_only(&redis);
    let out = w.ok(&["task", "end", &t1]);
    assert!(out.contains("recorded; propagating"), "{out}");
    assert!(!denied(&t1), "published although Redis is read-only");

    let mut broker = w.c.broker.take().unwrap();
    let pid = broker.child.id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    wait_for(
        "the broker's relay retrying its last pass",
        Duration::from_secs(30),
        || {
            broker
                .log_text()
                .contains("last pass failed; retrying")
                .then_some(())
        },
    );
    assert!(
        broker.is_running(),
        "the broker exited with its outbox unpublished"
    );
    assert!(redis.cli(&["REPLICAOF", "NO", "ONE"]).contains("OK"));
    let status = wait_for("the broker's exit", Duration::from_secs(40), || {
        broker.child.try_wait().ok().flatten()
    });
    assert!(status.success(), "exit {status}: {}", broker.log_text());
    assert!(denied(&t1), "the task's end was not published before exit");
    assert!(!denied(&t2), "a live task was published as revoked");
    let log = broker.log_text();
    assert!(
        log.contains("revocation relay stopped") && !log.contains("relay stopped behind"),
        "{log}"
    );
}

/// The credential registry survives a broker restart: a credential issued
/// before it is revoked by its jti afterwards (the broker's memory store
/// and the tool server following the broker's own feed, as in `baton dev`).
#[test]
fn after_a_broker_restart_revocations_reach_credentials_issued_before_it() {
    let mut w = World::start();
    let (_t1, _p1, r1) = chain(&w, "pre1");
    let (_t2, _p2, r2) = chain(&w, "pre2");
    until_works(&w, &r1, "the tool server's feed is fresh");

    let addr = w.c.broker_addr.clone();
    w.c.broker.as_mut().unwrap().stop();
    w.c.start_broker(&addr, "1h");
    until_works(&w, &r2, "the tool server follows the restarted broker");

    let out = w.ok(&["revoke", "credential", &jti(&r1), "--reason", "leaked"]);
    assert_eq!(count(&out), 2, "{out}");
    until_revoked(
        &w,
        &r1,
        "a pre-restart credential revoked after the restart",
    );
    // The untampered control.
    assert!(works(&w, &r2), "an unrevoked credential is refused");
}
