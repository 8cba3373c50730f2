//! The waits of a CA rotation, on real processes: `ca prepare --wait` ends
//! when no agent lags (and gives up at its deadline naming the agent that
//! does), `ca taint --wait` ends once an evicted or banned node's SVIDs no longer
//! count, and for a JWT key it does not call re-issuance complete while an
//! agent that has not applied the taint may still serve cached tokens.

use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::harness::{Cluster, Options, baton, time_for_people, wait_for};

fn ca_show(c: &Cluster) -> Value {
    c.cli_json(&["ca", "show"])
}

fn authority<'a>(show: &'a Value, kind: &str, state: &str) -> &'a Value {
    let found: Vec<&Value> = show["authorities"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["kind"] == kind && a["state"] == state)
        .collect();
    assert_eq!(found.len(), 1, "one {state} {kind} authority: {show}");
    found[0]
}

fn id_of(show: &Value, kind: &str, state: &str) -> String {
    authority(show, kind, state)["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// SIGSTOP/SIGCONT: an agent that is there but does not sync (a partition).
fn signal(c: &Cluster, sig: &str) {
    let pid = c.agent.as_ref().unwrap().child.id().to_string();
    assert!(
        Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success()
    );
}

fn manual_cluster(extra: &[&str]) -> Cluster {
    let mut args = vec!["--rotation".to_owned(), "manual".to_owned()];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    Cluster::start_with_broker_args(Options::default(), args)
}

fn wait_svid(c: &Cluster) {
    wait_for("a workload X509-SVID", Duration::from_secs(60), || {
        let out = baton()
            .args(["svid", "fetch", "--socket"])
            .arg(c.agent_socket())
            .output()
            .unwrap();
        out.status.success().then_some(())
    });
}

/// `ca show` for people never prints an expiry of "-".
fn show_has_no_dash_expiry(c: &Cluster) {
    let human = c.cli_ok(&["ca", "show"]);
    assert!(!human.contains("expire by -"), "{human}");
    assert!(!human.contains("(unix"), "{human}");
}

/// The node of `c` goes away without a word: the taint of `old` waits for
/// its SVIDs and gives up (the control), until `baton node <verb>` (evict
/// or ban) revokes what was issued to it, after which the wait completes
/// and `ca show` counts nothing pending.
fn silent_node_holds_the_taint_wait_until(c: &mut Cluster, old: &str, verb: &str) {
    c.agent.as_mut().unwrap().stop();
    c.cli_ok(&["ca", "taint", old]);
    let out = c.cli(&["ca", "taint", old, "--wait", "--timeout", "2s"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("already tainted"), "{err}");
    assert!(err.contains("still to be re-issued"), "{err}");
    assert!(!err.contains("re-issuance complete"), "{err}");
    let show = ca_show(c);
    let pending = &authority(&show, "x509", "old")["pending"];
    assert!(pending["agents"].as_u64().unwrap() >= 1, "{pending}");
    assert!(pending["workloads"].as_u64().unwrap() >= 1, "{pending}");
    show_has_no_dash_expiry(c);

    // Evicted or banned: what was issued through it is revoked and no
    // longer waits.
    let node = c.node_id.clone();
    c.cli_ok(&["node", verb, &node]);
    let out = c.cli(&["ca", "taint", old, "--wait", "--timeout", "60s"]);
    let err = stderr(&out);
    assert!(out.status.success(), "{verb}: {err}");
    assert!(err.contains("re-issuance complete"), "{verb}: {err}");
    let show = ca_show(c);
    let pending = &authority(&show, "x509", "old")["pending"];
    assert_eq!(pending["agents"], 0, "{verb}: {pending}");
    assert_eq!(pending["workloads"], 0, "{verb}: {pending}");
    show_has_no_dash_expiry(c);
}

#[test]
fn taint_wait_ends_when_the_silent_node_is_banned() {
    let mut c = manual_cluster(&[]);
    c.register("/svc/w", &[]);
    wait_svid(&c);
    let old = id_of(&ca_show(&c), "x509", "active");
    // The workload's SVID for people: its expiry as RFC 3339, in the future.
    let human = c.cli_ok(&[
        "svid",
        "fetch",
        "--socket",
        c.agent_socket().to_str().unwrap(),
    ]);
    let expires = time_for_people(&human, "Expires:");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(expires > now && expires < now + 2 * 86_400, "{human}");
    c.cli_ok(&[
        "ca",
        "prepare",
        "--kind",
        "x509",
        "--wait",
        "--timeout",
        "60s",
    ]);
    c.cli_ok(&["ca", "activate"]);
    silent_node_holds_the_taint_wait_until(&mut c, &old, "ban");
    c.cli_ok(&["ca", "revoke", &old]);
}

#[test]
fn prepare_wait_and_taint_wait_end_when_the_silent_node_is_evicted() {
    let mut c = manual_cluster(&[]);
    c.register("/svc/w", &[]);
    wait_svid(&c);
    let old = id_of(&ca_show(&c), "x509", "active");

    // An agent that does not sync: `prepare --wait` gives up at its
    // deadline, naming it.
    signal(&c, "-STOP");
    let out = c.cli(&[
        "ca",
        "prepare",
        "--kind",
        "x509",
        "--wait",
        "--timeout",
        "2s",
    ]);
    signal(&c, "-CONT");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("gave up after 2s"), "{err}");
    assert!(err.contains(&c.node_id), "{err}");
    assert!(!err.contains("no lagging agents"), "{err}");
    // Control: once it syncs again, waiting again (nothing prepared twice)
    // ends with no lagging agents.
    let out = c.cli(&[
        "ca",
        "prepare",
        "--kind",
        "x509",
        "--wait",
        "--timeout",
        "60s",
    ]);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("already prepared"), "{err}");
    assert!(err.contains("no lagging agents"), "{err}");
    let show = ca_show(&c);
    assert!(
        show["nodes_lagging"].as_array().unwrap().is_empty(),
        "{show}"
    );
    id_of(&show, "x509", "prepared");
    c.cli_ok(&["ca", "activate"]);

    silent_node_holds_the_taint_wait_until(&mut c, &old, "evict");
    c.cli_ok(&["ca", "revoke", &old]);
}

#[test]
fn jwt_taint_wait_is_not_complete_while_an_agent_may_serve_cached_tokens() {
    // No pruning pass: the key must not leave by itself during the test.
    let c = manual_cluster(&["--rotation-check", "1h"]);
    c.register("/svc/jwt", &["--jwt-ttl", "5m"]);
    let k1 = id_of(&ca_show(&c), "jwt", "active");
    // The agent caches a JWT-SVID of K1.
    wait_for("a JWT-SVID", Duration::from_secs(60), || {
        let out = baton()
            .args(["svid", "fetch-jwt", "--audience", "crm", "--socket"])
            .arg(c.agent_socket())
            .output()
            .unwrap();
        out.status.success().then_some(())
    });
    c.cli_ok(&[
        "ca",
        "prepare",
        "--kind",
        "jwt",
        "--wait",
        "--timeout",
        "60s",
    ]);
    c.cli_ok(&["ca", "activate"]);

    // The agent cannot sync (frozen): it has not applied the taint, and
    // may still serve its cached K1 token once it runs again.
    signal(&c, "-STOP");
    c.cli_ok(&["ca", "taint", &k1]);
    let out = c.cli(&["ca", "taint", &k1, "--wait", "--timeout", "2s"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(!err.contains("re-issuance complete"), "{err}");
    assert!(err.contains("cached at 1 agent"), "{err}");
    let show = ca_show(&c);
    let pending = &authority(&show, "jwt", "old")["pending"];
    assert_eq!(pending["jwt_agents_unsynced"], 1, "{pending}");
    show_has_no_dash_expiry(&c);

    // Control: once the agent has applied the taint (it drops the cached
    // tokens), re-issuance is complete; the wait goes on for the tokens'
    // expiry (5 min), so it gives up at its deadline saying that.
    signal(&c, "-CONT");
    let out = c.cli(&["ca", "taint", &k1, "--wait", "--timeout", "20s"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("re-issuance complete"), "{err}");
    assert!(
        err.contains("waiting for the tokens it signed to expire"),
        "{err}"
    );
    let show = ca_show(&c);
    let pending = &authority(&show, "jwt", "old")["pending"];
    assert_eq!(pending["jwt_agents_unsynced"], 0, "{pending}");
    show_has_no_dash_expiry(&c);
}
