//! The ops listener of the broker, the node daemon and the revocation
//! service (`--ops-listen`): `/metrics` counts a scripted flow exactly and
//! passes `promtool check metrics`, no label carries a task id, a jti or a
//! SPIFFE ID, and `/readyz` (and `baton healthcheck`) follows Redis going
//! away and coming back, and the broker refusing the agent's node.

use std::io::{Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::delegation::{PLANNER, World, claims};
use crate::harness::{Cluster, Options, Proc, Redis, baton, wait_for};
use crate::revocation::{chain, works};

pub(crate) fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// One plain HTTP GET: (status, body); `None` when nothing answers.
fn get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(20))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

pub(crate) fn scrape(addr: &str) -> String {
    let (status, body) = get(addr, "/metrics").expect("the ops listener answers");
    assert_eq!(status, 200, "{body}");
    body
}

/// The value of one series (name with its labels, exactly as exposed);
/// 0 when absent (a counter not yet touched).
pub(crate) fn value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, v) = l.rsplit_once(' ')?;
            (name == series).then(|| v.parse::<f64>().unwrap())
        })
        .unwrap_or(0.0)
}

/// The sum of every series of a family whose labels contain `with`.
fn sum(text: &str, family: &str, with: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) && l.contains(with))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

pub(crate) fn readyz(addr: &str) -> Option<(u16, serde_json::Value)> {
    let (status, body) = get(addr, "/readyz")?;
    Some((status, serde_json::from_str(&body).unwrap()))
}

/// `/readyz` lists each of `names` among its checks.
pub(crate) fn assert_lists_checks(addr: &str, names: &[&str]) {
    let (_, body) = readyz(addr).unwrap();
    let listed: Vec<&str> = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    for n in names {
        assert!(listed.contains(n), "{n} missing from {body}");
    }
}

pub(crate) fn wait_ready(addr: &str, what: &str) {
    wait_for(what, Duration::from_secs(60), || {
        readyz(addr).and_then(|(s, _)| (s == 200).then_some(()))
    });
}

/// Waits until `/readyz` answers 503 with `check` failing; returns the body.
pub(crate) fn wait_not_ready(addr: &str, check: &str, what: &str) -> serde_json::Value {
    wait_for(what, Duration::from_secs(60), || {
        let (status, body) = readyz(addr)?;
        let failing = body["failing"].as_array()?;
        (status == 503 && failing.iter().any(|f| f == check)).then_some(body)
    })
}

fn healthcheck(addr: &str, check: &str) -> Output {
    baton()
        .args(["healthcheck", "--ops-addr", addr, &format!("--{check}")])
        .output()
        .unwrap()
}

/// `promtool check metrics` on a real scrape. `.ci/run` installs it (the
/// Debian package `prometheus`), so it is required.
pub(crate) fn promtool_check(text: &str, whose: &str) {
    let child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => panic!(
            "promtool not found ({e}): install the Debian package `prometheus` (.ci/run does) to lint the {whose}'s scrape"
        ),
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed on the {whose}'s scrape: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// No label value (and nothing else in a scrape) names a task, a token or
/// a workload.
fn assert_no_secret(text: &str, whose: &str, secrets: &[&str]) {
    for s in secrets {
        assert!(!text.contains(s), "the {whose}'s scrape contains {s:?}");
    }
    assert!(
        !text.contains("spiffe://"),
        "the {whose}'s scrape names a SPIFFE ID"
    );
}

/// The audit log's size and its number of signed checkpoints (one per
/// committed batch), from `baton audit verify`.
fn audit_size(w: &World) -> (f64, f64) {
    let v = w.json(&["audit", "verify", "-o", "json"]);
    let field = |name: &str| {
        v["report"][name]
            .as_f64()
            .unwrap_or_else(|| panic!("no {name} in {v}"))
    };
    (field("size"), field("checkpoints"))
}

#[test]
fn metrics_count_a_scripted_flow_at_the_broker_the_agent_and_the_revocation_service() {
    let redis = Redis::start();
    let (bops, aops, rops) = (free_addr(), free_addr(), free_addr());
    let w = World::start_with_options(
        Some(&redis.url),
        Options {
            broker_args: vec!["--ops-listen".into(), bops.clone()],
            agent_args: vec!["--ops-listen".into(), aops.clone()],
            ..Options::default()
        },
    );
    let mut cmd = baton();
    cmd.args([
        "revocation",
        "--redis",
        &redis.url,
        "--check-every",
        "200ms",
    ])
    .args(["--ops-listen", &rops]);
    let _rev = Proc::spawn("revocation", cmd, w.c.path("revocation.log"));
    wait_ready(&bops, "the broker ready");
    wait_ready(&aops, "the agent ready");
    wait_ready(&rops, "the revocation service ready");

    let before = scrape(&bops);
    let agent_before = scrape(&aops);
    let (audit_before, checkpoints_before) = audit_size(&w);
    // Task start, the planner's redeem, a hop, the researcher's redeem.
    let (task, _planner, researcher) = chain(&w, "m");
    // A refused hop: the researcher hands on a scope it does not hold.
    let out = w.delegate(&researcher, PLANNER, &["tool:crm.update:write"], &[]);
    assert!(!out.status.success(), "a widening hop was granted");
    // An allowed tool call, reported by the tool server.
    assert!(works(&w, &researcher));
    let jti = claims(&researcher)["jti"].as_str().unwrap().to_owned();
    w.ok(&["revoke", "credential", &jti, "--reason", "ops test"]);

    let tool_allow = r#"baton_tool_calls_total{tier="read",decision="allow"}"#;
    let after = wait_for(
        "the tool call's report at the broker",
        Duration::from_secs(60),
        || {
            let t = scrape(&bops);
            (value(&t, tool_allow) > value(&before, tool_allow)).then_some(t)
        },
    );
    let (audit_after, checkpoints_after) = audit_size(&w);
    let d = |series: &str| value(&after, series) - value(&before, series);
    assert_eq!(d(tool_allow), 1.0);
    assert_eq!(d("baton_hops_granted_total"), 1.0);
    assert_eq!(
        d(r#"baton_hops_refused_total{reason="scope_widened"}"#),
        1.0
    );
    assert_eq!(d(r#"baton_redeems_total{decision="granted"}"#), 2.0);
    assert_eq!(
        d(r#"baton_credentials_issued_total{kind="token",holder="task"}"#),
        2.0
    );
    assert_eq!(
        d(r#"baton_credentials_issued_total{kind="x509",holder="task"}"#),
        2.0
    );
    assert_eq!(d(r#"baton_revocations_total{target="credential"}"#), 1.0);
    // The researcher's token and its certificate.
    assert_eq!(
        d(r#"baton_revoked_credentials_total{target="credential"}"#),
        2.0
    );
    assert_eq!(
        d(r#"baton_revocation_cascade_credentials_count{target="credential"}"#),
        1.0
    );
    // Every event the log grew by was counted, and nothing else.
    assert_eq!(
        d("baton_audit_appends_total"),
        audit_after - audit_before,
        "audit appends vs the log's growth"
    );
    assert!(audit_after - audit_before >= 6.0);
    assert_eq!(d("baton_audit_append_failures_total"), 0.0);
    // One observation per committed batch, which is one signed checkpoint;
    // the batch sizes add up to the events appended, and each of those
    // events has a durability lag.
    assert_eq!(
        d("baton_audit_batch_events_count"),
        checkpoints_after - checkpoints_before,
        "audit batches vs the log's new checkpoints"
    );
    assert!(d("baton_audit_batch_events_count") >= 1.0);
    assert_eq!(
        d("baton_audit_batch_events_sum"),
        audit_after - audit_before
    );
    assert_eq!(
        d(r#"baton_audit_batch_events_bucket{le="+Inf"}"#),
        d("baton_audit_batch_events_count")
    );
    assert_eq!(
        d("baton_audit_durability_seconds_count"),
        audit_after - audit_before
    );
    assert_eq!(
        d(r#"baton_audit_durability_seconds_bucket{le="+Inf"}"#),
        audit_after - audit_before
    );
    let lag = d("baton_audit_durability_seconds_sum");
    assert!(
        lag > 0.0 && lag < 60.0 * (audit_after - audit_before),
        "durability lag sum {lag} s"
    );
    // The HTTPS port: two redeems through the node daemon, two hops (one
    // refused), one tool-call report.
    assert_eq!(
        d(r#"baton_http_requests_total{route="/v1/node/redeem",code="200"}"#),
        2.0
    );
    assert_eq!(
        d(r#"baton_http_requests_total{route="/v1/delegate",code="200"}"#),
        1.0
    );
    assert_eq!(
        sum(
            &after,
            "baton_http_requests_total",
            r#"route="/v1/delegate""#
        ) - sum(
            &before,
            "baton_http_requests_total",
            r#"route="/v1/delegate""#
        ),
        2.0
    );
    assert_eq!(
        d(r#"baton_http_request_duration_seconds_count{route="/v1/delegate",code="200"}"#),
        1.0
    );
    // The authorities: one active of each kind, well before expiry.
    for kind in ["x509", "jwt"] {
        let left = value(
            &after,
            &format!(r#"baton_ca_active_authority_expiry_seconds{{kind="{kind}"}}"#),
        );
        assert!(left > 3600.0, "{kind} authority expires in {left} s");
        assert_eq!(
            value(
                &after,
                &format!(r#"baton_ca_authorities{{kind="{kind}",state="active"}}"#)
            ),
            1.0
        );
    }

    // The node daemon: three entries' SVIDs cached, a fresh sync, the tool
    // server's X509-SVID stream open, its own SVID valid.
    let agent = scrape(&aops);
    assert_eq!(value(&agent, "baton_agent_cached_svids"), 3.0, "{agent}");
    assert!(value(&agent, "baton_agent_syncs_total") >= 1.0);
    assert!(value(&agent, "baton_agent_last_sync_age_seconds") < 30.0);
    let svid_left = value(&agent, "baton_agent_node_svid_expiry_seconds");
    assert!(svid_left > 0.0 && svid_left <= 3600.0, "{svid_left}");
    assert!(
        value(
            &agent,
            r#"baton_agent_workload_streams_open{stream="x509_svid"}"#
        ) >= 1.0,
        "{agent}"
    );
    assert_eq!(value(&agent, "baton_agent_node_refused"), 0.0);
    // The two redeems went through the node daemon's socket.
    let redeem_ok = r#"baton_agent_rpcs_total{rpc="Redeem",code="OK"}"#;
    assert_eq!(
        value(&agent, redeem_ok) - value(&agent_before, redeem_ok),
        2.0,
        "{agent}"
    );
    assert_eq!(
        value(
            &agent,
            r#"baton_agent_rpc_duration_seconds_count{rpc="Redeem",code="OK"}"#
        ) - value(
            &agent_before,
            r#"baton_agent_rpc_duration_seconds_count{rpc="Redeem",code="OK"}"#
        ),
        2.0
    );
    // The broker's families are not on the agent's listener.
    assert!(!agent.contains("baton_hops_granted"));

    // The revocation service: Redis up and seeded.
    let rev = scrape(&rops);
    assert_eq!(value(&rev, "baton_revocation_store_up"), 1.0, "{rev}");
    assert_eq!(value(&rev, "baton_revocation_store_seeded"), 1.0);
    assert!(
        value(
            &rev,
            r#"baton_revocation_store_checks_total{decision="ok"}"#
        ) >= 1.0
    );

    let secrets = [task.as_str(), jti.as_str()];
    for (text, whose) in [
        (&after, "broker"),
        (&agent, "agent"),
        (&rev, "revocation service"),
    ] {
        assert_no_secret(text, whose, &secrets);
        promtool_check(text, whose);
    }
}

/// A tool server (a verifier) is ready only while its revocation feed is
/// fresh, since a stale feed refuses sensitive calls; its scrape says how
/// fresh the feed is and how many revoked ids it holds.
#[test]
fn the_tool_servers_readyz_and_metrics_follow_its_revocation_feed() {
    let mut redis = Redis::start();
    let tops = free_addr();
    let w = World::start_with_options(
        Some(&redis.url),
        Options {
            tool_args: vec!["--ops-listen".into(), tops.clone()],
            ..Options::default()
        },
    );
    wait_ready(&tops, "tool server ready with a fresh feed");
    let (task, _planner, researcher) = chain(&w, "m");
    let jti = claims(&researcher)["jti"].as_str().unwrap().to_owned();
    w.ok(&["task", "end", &task]);
    // The task's end (one deny entry, keyed by the task) reaches the tool
    // server's feed.
    wait_for(
        "revoked ids at the tool server",
        Duration::from_secs(60),
        || {
            let text = scrape(&tops);
            (value(&text, "baton_verifier_feed_revoked_ids") >= 1.0).then_some(())
        },
    );
    let text = scrape(&tops);
    assert_eq!(value(&text, "baton_verifier_feed_fresh"), 1.0, "{text}");
    assert_eq!(value(&text, "baton_verifier_feed_stale_seconds"), 0.0);
    assert!(!text.contains(&jti), "a jti in the scrape");
    assert!(!text.contains(&task), "a task id in the scrape");
    assert!(!text.contains("spiffe://"), "a SPIFFE ID in the scrape");
    promtool_check(&text, "tool server");

    // Redis stops: the feed goes stale (--stale-after 10s) and the tool
    // server says so, naming the check; it still lives.
    redis.stop();
    let body = wait_not_ready(
        &tops,
        "revocation_feed",
        "tool server not ready with a stale feed",
    );
    assert_eq!(body["failing"].as_array().unwrap().len(), 1, "{body}");
    assert_eq!(healthcheck(&tops, "live").status.code(), Some(0));
    assert_eq!(healthcheck(&tops, "ready").status.code(), Some(1));
    let text = scrape(&tops);
    assert_eq!(value(&text, "baton_verifier_feed_fresh"), 0.0, "{text}");
    assert!(
        value(&text, "baton_verifier_feed_stale_seconds") >= 2.0,
        "{text}"
    );

    // Redis returns (empty): the broker re-seeds it, the feed resyncs and
    // the tool server is ready again, still holding the revoked ids.
    redis.restart();
    wait_ready(&tops, "tool server ready again after the re-seed");
    let text = scrape(&tops);
    assert_eq!(value(&text, "baton_verifier_feed_fresh"), 1.0, "{text}");
    assert!(
        value(&text, "baton_verifier_feed_revoked_ids") >= 1.0,
        "{text}"
    );
}

/// A datastore another process holds locked cannot take an issuance or a
/// revocation: the broker says so on /readyz (naming `datastore`) and is
/// ready again once the lock goes; it stays live throughout.
#[test]
fn readyz_names_the_datastore_while_another_process_holds_it_locked() {
    let bops = free_addr();
    let c = Cluster::start(Options {
        broker_args: vec!["--ops-listen".into(), bops.clone()],
        ..Options::default()
    });
    wait_ready(&bops, "broker ready");
    // Control: the datastore check passes with the file unlocked.
    let (_, body) = readyz(&bops).unwrap();
    assert!(
        body["failing"].as_array().unwrap().is_empty(),
        "ready broker reports failing checks: {body}"
    );

    let db = rusqlite::Connection::open(c.path("broker/broker.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let body = wait_not_ready(
        &bops,
        "datastore",
        "broker not ready while its datastore is locked",
    );
    let check = body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "datastore")
        .unwrap()
        .clone();
    assert!(
        check.to_string().contains("no answer") || check.to_string().contains("locked"),
        "{check}"
    );
    assert_eq!(healthcheck(&bops, "ready").status.code(), Some(1));
    assert_eq!(healthcheck(&bops, "live").status.code(), Some(0));

    db.execute_batch("ROLLBACK;").unwrap();
    drop(db);
    wait_ready(&bops, "broker ready again once the datastore is unlocked");
    assert_eq!(healthcheck(&bops, "ready").status.code(), Some(0));
}

/// The failing check's own report in a `/readyz` body.
fn check_of(body: &serde_json::Value, name: &str) -> serde_json::Value {
    body["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no check {name} in {body}"))
        .clone()
}

/// A task start, as a command that may fail.
fn try_task_start(w: &World) -> Output {
    w.try_start_task_as("support.case-research", &["tool:crm.search:read"], &["crm"])
}

/// Another process holds the audit log's database locked: no event can be
/// recorded, so /readyz names `audit_log` at once (before any request
/// fails), a task start is refused rather than granted unrecorded, and the
/// broker is ready again by itself once the lock goes (a not-ready broker
/// gets no requests, so readiness must not wait for one), when a task
/// starts again and its event is in the log.
#[test]
fn readyz_names_the_audit_log_while_it_takes_no_writes_and_recovers_by_itself() {
    let bops = free_addr();
    let w = World::start_with_options(
        None,
        Options {
            broker_args: vec!["--ops-listen".into(), bops.clone()],
            ..Options::default()
        },
    );
    wait_ready(&bops, "broker ready");
    // Control: a task starts, and the audit check passes.
    let out = try_task_start(&w);
    assert!(out.status.success(), "{out:?}");
    let (_, body) = readyz(&bops).unwrap();
    assert_eq!(check_of(&body, "audit_log")["ok"], true, "{body}");
    let (size_before, _) = audit_size(&w);

    let db = rusqlite::Connection::open(w.c.path("broker/audit.db")).unwrap();
    db.execute_batch("BEGIN IMMEDIATE;").unwrap();
    let body = wait_not_ready(
        &bops,
        "audit_log",
        "broker not ready while its audit log is locked",
    );
    let check = check_of(&body, "audit_log").to_string();
    assert!(check.contains("does not take writes"), "{check}");
    assert_eq!(healthcheck(&bops, "ready").status.code(), Some(1));
    assert_eq!(healthcheck(&bops, "live").status.code(), Some(0));
    // What cannot be recorded is not granted.
    let out = try_task_start(&w);
    assert!(!out.status.success(), "a task started unrecorded: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("must record") && err.contains("nothing was issued"),
        "the refusal does not say the request could not be recorded: {err}"
    );

    db.execute_batch("ROLLBACK;").unwrap();
    drop(db);
    wait_ready(
        &bops,
        "broker ready again once the audit log takes writes, with no request",
    );
    let out = try_task_start(&w);
    assert!(out.status.success(), "{out:?}");
    let (size_after, _) = audit_size(&w);
    assert_eq!(
        size_after,
        size_before + 1.0,
        "the refused start left an event, or the new one is missing"
    );
    w.ok(&["audit", "verify"]);
}

/// With manual rotation, an active authority that expires leaves the
/// broker unable to sign: /readyz names `authority` with the expiry, and
/// `ca prepare` + `ca activate` make it ready again.
#[test]
fn readyz_names_an_expired_active_authority_until_a_new_one_is_activated() {
    let bops = free_addr();
    let c = Cluster::start(Options {
        start_agent: false,
        agent_svid_ttl: "2s",
        broker_args: vec![
            "--ops-listen".into(),
            bops.clone(),
            "--rotation".into(),
            "manual".into(),
            "--ca-ttl".into(),
            "15s".into(),
            "--max-svid-ttl".into(),
            "2s".into(),
        ],
        ..Options::default()
    });
    // Control: the fresh authorities pass.
    let first = wait_for("a first /readyz", Duration::from_secs(30), || readyz(&bops));
    assert_eq!(check_of(&first.1, "authority")["ok"], true, "{}", first.1);

    let body = wait_not_ready(
        &bops,
        "authority",
        "broker not ready once its active authority expired",
    );
    let check = check_of(&body, "authority").to_string();
    assert!(check.contains("expired"), "{check}");
    assert_eq!(healthcheck(&bops, "live").status.code(), Some(0));

    c.cli_ok(&["ca", "prepare"]);
    c.cli_ok(&["ca", "activate"]);
    wait_ready(&bops, "broker ready with a new active authority");
}

/// The node daemon's `sync` check: the broker goes away, the daemon keeps
/// serving its cache but is not ready once its last sync is too old; the
/// broker returns and the daemon is ready again.
#[test]
fn the_agent_is_not_ready_while_it_cannot_sync_and_ready_once_it_can() {
    let aops = free_addr();
    let mut c = Cluster::start(Options {
        agent_args: vec!["--ops-listen".into(), aops.clone()],
        ..Options::default()
    });
    wait_ready(&aops, "agent ready");
    let (_, body) = readyz(&aops).unwrap();
    assert_eq!(check_of(&body, "sync")["ok"], true, "{body}");

    let listen = c.broker_addr.clone();
    c.broker.take().unwrap().stop();
    let body = wait_not_ready(&aops, "sync", "agent not ready without syncs");
    let check = check_of(&body, "sync").to_string();
    assert!(check.contains("last successful sync"), "{check}");
    assert_eq!(check_of(&body, "node_svid")["ok"], true, "{body}");
    assert_eq!(healthcheck(&aops, "live").status.code(), Some(0));

    c.start_broker(&listen, "1h");
    wait_ready(&aops, "agent ready again once it syncs");
}

#[test]
fn readyz_follows_redis_and_the_brokers_refusal_of_the_node() {
    let mut redis = Redis::start();
    let (bops, aops, rops) = (free_addr(), free_addr(), free_addr());
    let c = Cluster::start(Options {
        broker_args: vec![
            "--redis".into(),
            redis.url.clone(),
            "--ops-listen".into(),
            bops.clone(),
        ],
        agent_args: vec!["--ops-listen".into(), aops.clone()],
        ..Options::default()
    });
    // The revocation service binds all interfaces, as an explicit choice
    // (--ops-listen-non-loopback); it is probed over loopback.
    let rport = rops.rsplit_once(':').unwrap().1.to_owned();
    let mut cmd = baton();
    cmd.args([
        "revocation",
        "--redis",
        &redis.url,
        "--check-every",
        "200ms",
    ])
    .args(["--ops-listen", &format!("0.0.0.0:{rport}")])
    .arg("--ops-listen-non-loopback");
    let _rev = Proc::spawn("revocation", cmd, c.path("revocation.log"));
    for (addr, what) in [(&bops, "broker"), (&aops, "agent"), (&rops, "revocation")] {
        wait_ready(addr, what);
        let out = healthcheck(addr, "ready");
        assert_eq!(out.status.code(), Some(0), "{what}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ready");
    }
    // Every check is listed with its status.
    assert_lists_checks(
        &bops,
        &[
            "started",
            "datastore",
            "audit_log",
            "authority",
            "revocation_store",
        ],
    );

    // Redis stops: the broker and the revocation service are not ready,
    // naming the check; they still live. The agent does not need Redis.
    redis.stop();
    let body = wait_not_ready(&bops, "revocation_store", "broker not ready without Redis");
    assert_eq!(body["failing"].as_array().unwrap().len(), 1, "{body}");
    wait_not_ready(
        &rops,
        "revocation_store",
        "revocation service not ready without Redis",
    );
    let out = healthcheck(&bops, "ready");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("revocation_store"),
        "{out:?}"
    );
    assert_eq!(healthcheck(&bops, "live").status.code(), Some(0));
    assert_eq!(healthcheck(&aops, "ready").status.code(), Some(0));

    // Redis returns (empty): the relay re-seeds it and both are ready again.
    redis.restart();
    wait_ready(&bops, "the broker ready after Redis returned");
    wait_ready(&rops, "the revocation service ready after the re-seed");
    assert_eq!(healthcheck(&rops, "ready").status.code(), Some(0));

    // The broker evicts the node: its agent is not ready (node_svid), the
    // broker still is.
    c.cli_ok(&["node", "evict", &c.node_id, "--reason", "ops test"]);
    wait_not_ready(
        &aops,
        "node_svid",
        "agent not ready once its node is evicted",
    );
    let out = healthcheck(&aops, "ready");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("node_svid"),
        "{out:?}"
    );
    assert_eq!(healthcheck(&bops, "ready").status.code(), Some(0));
    // The agent drops its cached SVIDs just after it marks the refusal.
    let agent = wait_for("the agent's cache emptied", Duration::from_secs(60), || {
        let t = scrape(&aops);
        (value(&t, "baton_agent_cached_svids") == 0.0).then_some(t)
    });
    assert_eq!(value(&agent, "baton_agent_node_refused"), 1.0);
    assert_eq!(value(&agent, "baton_agent_cached_svids"), 0.0);

    // Nothing listening: unhealthy, exit 1.
    let out = healthcheck(&free_addr(), "live");
    assert_eq!(out.status.code(), Some(1), "{out:?}");
}

#[test]
fn the_ops_listener_binds_off_loopback_only_when_asked_to() {
    let dir = tempfile::tempdir().unwrap();
    let agent = |listen: &str| {
        baton()
            .args(["agent", "--trust-domain", "example.org"])
            .args(["--broker-url", "https://127.0.0.1:1"])
            .arg("--data-dir")
            .arg(dir.path().join("agent"))
            .arg("--socket")
            .arg(dir.path().join("agent.sock"))
            .args(["--ops-listen", listen])
            .output()
            .unwrap()
    };
    for addr in ["0.0.0.0:0", "[::]:0"] {
        let out = agent(addr);
        assert_eq!(out.status.code(), Some(2), "{addr}: {out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--ops-listen-non-loopback"), "{addr}: {err}");
    }
    // Control: on loopback the listener is accepted and the agent goes on
    // to fail where it should, with no identity and no join token.
    let out = agent("127.0.0.1:0");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(!err.contains("--ops-listen-non-loopback"), "{err}");
}

#[test]
fn baton_dev_serves_the_broker_and_the_agent_on_one_ops_listener() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let ops = free_addr();
    let mut cmd = baton();
    cmd.args(["dev", "--ops-listen", &ops, "--data-dir"])
        .arg(&data);
    let mut dev = Proc::spawn("dev", cmd, dir.path().join("dev.log"));
    wait_for(
        "baton dev ready on its ops listener",
        Duration::from_secs(60),
        || {
            assert!(dev.is_running(), "{}", dev.log_text());
            readyz(&ops).and_then(|(s, _)| (s == 200).then_some(()))
        },
    );
    assert_lists_checks(
        &ops,
        &[
            "started",
            "datastore",
            "audit_log",
            "authority",
            "node_svid",
            "sync",
        ],
    );
    let text = scrape(&ops);
    assert!(
        text.contains("# TYPE baton_hops_granted_total counter"),
        "{text}"
    );
    assert!(
        text.contains("# TYPE baton_agent_syncs_total counter"),
        "{text}"
    );
    assert_no_secret(&text, "dev", &[]);
    promtool_check(&text, "dev");
    assert_eq!(healthcheck(&ops, "live").status.code(), Some(0));
    assert_eq!(healthcheck(&ops, "ready").status.code(), Some(0));
    dev.stop();
    // Gone with its process.
    assert_eq!(healthcheck(&ops, "live").status.code(), Some(1));
}
