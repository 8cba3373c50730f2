//! The broker restarts: entries and the CA survive, and the agent carries on
//! without a new join token.

use std::time::Duration;

use crate::harness::{Cluster, Options, TD, wait_for_async};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restart_keeps_entries_ca_and_agents() {
    let mut c = Cluster::start(Options::default());
    c.register("/before-restart", &[]);
    let bundle_before = std::fs::read(c.path("broker/bundle.pem")).unwrap();
    let entries_before = c.cli_json(&["entry", "list"]);

    let addr = c.broker_addr.clone();
    c.broker.as_mut().unwrap().stop();
    c.broker = None;
    c.start_broker(&addr, "1h");

    assert_eq!(
        std::fs::read(c.path("broker/bundle.pem")).unwrap(),
        bundle_before,
        "same CA"
    );
    assert_eq!(
        c.cli_json(&["entry", "list"]),
        entries_before,
        "entries survived"
    );

    // A new entry registered after the restart reaches the workload: the
    // agent reconnected with its own SVID (its join token is long spent).
    let id = format!("spiffe://{TD}/after-restart");
    c.register("/after-restart", &[]);
    let client = spiffe::WorkloadApiClient::connect_to(c.endpoint())
        .await
        .unwrap();
    wait_for_async(
        "SVID for the post-restart entry",
        Duration::from_secs(30),
        || async {
            let svids = client.fetch_all_x509_svids().await.ok()?;
            svids
                .iter()
                .any(|s| s.spiffe_id().to_string() == id)
                .then_some(())
        },
    )
    .await;
    assert!(c.agent.as_mut().unwrap().is_running());
}

#[test]
fn agent_renews_its_own_svid_before_expiry() {
    let c = Cluster::start(Options {
        agent_svid_ttl: "6s",
        ..Options::default()
    });
    let path = c.path("agent/agent-svid.pem");
    let first = std::fs::read(&path).unwrap();
    // Renewed over mTLS with the current SVID, well before it expires,
    // without a join token (the one it had is spent).
    let renewed = crate::harness::wait_for("agent SVID renewal", Duration::from_secs(30), || {
        std::fs::read(&path).ok().filter(|now| *now != first)
    });
    assert_ne!(renewed, first);
    // Attestation + at least one renewal (polled: the broker's log line may
    // trail the file the agent wrote; a busy machine may renew more often).
    let broker = c.broker.as_ref().unwrap();
    let issued = crate::harness::wait_for("a renewal in the log", Duration::from_secs(30), || {
        let n = broker.log_text().matches("AgentX509Svid").count();
        (n >= 2).then_some(n)
    });
    assert!(issued >= 2, "{issued} agent SVIDs issued");
}
