//! `baton node list|show|evict|ban|unban` against real processes: an
//! evicted node loses every identity and re-attests with a new token, a
//! banned node cannot, a tool server following the Redis feed refuses what
//! was issued through an evicted node, and bad operator input changes
//! nothing.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;
use std::time::Duration;

use baton_agent::client::{BrokerClient, ClientError};
use baton_agent::node::{NodeError, NodeStore, NodeSvid, unix_now};

use crate::delegation::{PLANNER, RESEARCHER, World};
use crate::harness::{Cluster, Options, Proc, Redis, TD, wait_for, wait_for_async};
use crate::refusals::raw_channel;

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs a `baton` command expected to be refused (exit 2); returns stderr.
fn refused(c: &Cluster, args: &[&str]) -> String {
    let out = c.cli(args);
    assert_eq!(
        out.status.code(),
        Some(2),
        "baton {args:?} should be refused: {}",
        stderr(&out)
    );
    stderr(&out)
}

fn serial_of(leaf_der: &[u8]) -> String {
    let (_, leaf) = x509_parser::parse_x509_certificate(leaf_der).unwrap();
    let raw = leaf.raw_serial();
    let trimmed: Vec<u8> = raw.iter().copied().skip_while(|b| *b == 0).collect();
    hex::encode(trimmed)
}

/// The workload's current X509-SVID serial, once it has one.
async fn wait_for_serial(c: &Cluster, not: Option<&str>) -> String {
    let client = spiffe::WorkloadApiClient::connect_to(c.endpoint())
        .await
        .unwrap();
    wait_for_async("an X509-SVID", Duration::from_secs(30), || async {
        let svid = client.fetch_x509_svid().await.ok()?;
        let serial = serial_of(svid.leaf().as_bytes());
        (Some(serial.as_str()) != not).then_some(serial)
    })
    .await
}

/// Polls until the Workload API refuses this process with PermissionDenied.
async fn wait_for_denied(c: &Cluster) {
    use baton_proto::workload::X509svidRequest;
    use baton_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    wait_for_async(
        "PermissionDenied from the Workload API",
        Duration::from_secs(20),
        || async {
            let mut client = SpiffeWorkloadApiClient::new(raw_channel(c).await);
            let mut req = tonic::Request::new(X509svidRequest {});
            req.metadata_mut()
                .insert("workload.spiffe.io", "true".parse().unwrap());
            let status = match client.fetch_x509svid(req).await {
                Ok(mut stream) => stream.get_mut().message().await.err(),
                Err(s) => Some(s),
            }?;
            (status.code() == tonic::Code::PermissionDenied
                && status.message().contains("no identity issued"))
            .then_some(())
        },
    )
    .await;
}

/// A copy of the node's current agent SVID and key, taken from its data dir.
fn copy_agent_identity(c: &Cluster, to: &str) -> std::path::PathBuf {
    let dst = c.path(to);
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["agent-svid.pem", "agent-key.pk8"] {
        std::fs::copy(c.path("agent").join(f), dst.join(f)).unwrap();
    }
    dst
}

/// A broker client presenting the agent SVID stored in `dir`, with the
/// store and the SVID.
fn client_of(c: &Cluster, dir: &Path) -> (Arc<BrokerClient>, NodeStore, NodeSvid) {
    baton_tls::install_crypto_provider();
    let td = baton_core::TrustDomain::new(TD).unwrap();
    let store = NodeStore::open(dir).unwrap();
    let svid = store
        .load_svid(unix_now())
        .unwrap()
        .expect("a stored agent SVID");
    let pem = std::fs::read_to_string(c.path("broker/bundle.pem")).unwrap();
    let bundle = baton_ca::TrustBundle::from_pem(&td, &pem).unwrap();
    let bundles = baton_tls::BundleStore::new();
    bundles.set(td.clone(), bundle.x509_authorities);
    let identity =
        baton_tls::ClientIdentity::new(svid.chain_der.clone(), svid.key.expose()).unwrap();
    let client = Arc::new(
        BrokerClient::new(
            &format!("https://{}", c.broker_addr),
            identity,
            bundles,
            td.id("/baton/broker").unwrap(),
        )
        .unwrap(),
    );
    (client, store, svid)
}

/// What the broker says to a node presenting the agent SVID stored in `dir`.
async fn sync_with(c: &Cluster, dir: &Path) -> Result<(), ClientError> {
    client_of(c, dir).0.sync(None).await.map(|_| ())
}

/// Renews the agent SVID stored in `dir` (stored there on success).
async fn renew_from(c: &Cluster, dir: &Path) -> Result<(), ClientError> {
    let (client, store, svid) = client_of(c, dir);
    match baton_agent::node::renew(&store, &client, &svid).await {
        Ok(_) => Ok(()),
        Err(NodeError::Renew(e)) => Err(e),
        Err(e) => panic!("renewal failed outside the broker: {e}"),
    }
}

fn copy_identity(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["agent-svid.pem", "agent-key.pk8"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

/// A stolen agent SVID cannot be kept alive by renewing it: the previous
/// SVID is accepted only until its successor is presented once (then it
/// is revoked), and a renewal from the previous one drops the unseen
/// successor, so two
/// holders of one node's SVID cannot both go on renewing (the loser is
/// refused, which shows the theft).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_svid_renewed_away_is_dead_once_its_successor_is_used() {
    let mut c = Cluster::start(Options::default());
    // Two copies of the node's identity stand in for the node and a thief.
    c.agent.as_mut().unwrap().stop();
    let node = copy_agent_identity(&c, "node");
    let thief = copy_agent_identity(&c, "thief");

    // The node renews (A to B). Until B is used, A still works: the
    // node may have lost the answer and retry with A.
    renew_from(&c, &node).await.unwrap();
    sync_with(&c, &thief)
        .await
        .expect("A refused before its successor was ever presented");
    // B presented: A is revoked, and refused for a sync and for a
    // renewal (and wherever else revocation is checked).
    sync_with(&c, &node).await.unwrap();
    assert_eq!(
        refusal_code(sync_with(&c, &thief).await),
        "agent_svid_revoked"
    );
    assert_eq!(
        refusal_code(renew_from(&c, &thief).await),
        "agent_svid_revoked"
    );
    // The untampered control: the node goes on renewing.
    let before = c.path("node-b");
    copy_identity(&node, &before);
    renew_from(&c, &node).await.unwrap();
    sync_with(&c, &node).await.unwrap();

    // A thief of C who renews from it (C to E) after the node renewed
    // (C to D) but before the node used D drops D: the node is refused
    // (the theft shows) rather than both going on. B stays dead.
    let stolen = c.path("thief-c");
    copy_identity(&node, &stolen);
    renew_from(&c, &node).await.unwrap();
    renew_from(&c, &stolen).await.unwrap();
    assert_eq!(
        refusal_code(sync_with(&c, &node).await),
        "agent_svid_superseded"
    );
    assert_eq!(
        refusal_code(renew_from(&c, &node).await),
        "agent_svid_superseded"
    );
    sync_with(&c, &stolen).await.unwrap();
    assert_eq!(
        refusal_code(sync_with(&c, &before).await),
        "agent_svid_revoked"
    );
}

fn refusal_code(r: Result<(), ClientError>) -> String {
    match r {
        Err(ClientError::Refused { status, error, .. }) => {
            assert_eq!(status, 403, "{error:?}");
            error.code
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_node_loses_its_identities_and_reattests_with_a_new_token() {
    let mut c = Cluster::start(Options::default());
    let node = c.node_id.clone();
    c.register("/agents/evictee", &[]);
    let first = wait_for_serial(&c, None).await;
    let old_identity = copy_agent_identity(&c, "old-agent");
    sync_with(&c, &old_identity).await.unwrap();

    let shown = c.cli_json(&["node", "show", &node]);
    assert_eq!(shown["spiffe_id"], node.as_str(), "{shown}");
    assert_eq!(shown["banned"], false);
    assert_eq!(shown["entries"], 1);
    assert!(shown["agent_svid_serial"].as_str().unwrap().len() > 4);
    assert!(shown["attested_at"].as_u64().unwrap() > 0);
    let table = c.cli_ok(&["node", "list"]);
    assert!(
        table.contains(&node) && table.contains("Banned:") && table.contains("no"),
        "{table}"
    );
    // Times for people: RFC 3339 with how far from now, not unix seconds.
    assert!(!table.contains("(unix"), "{table}");
    assert!(
        table.contains("Z (") && table.contains(" ago)") && table.contains("(in "),
        "{table}"
    );

    let evicted = c.cli_json(&["node", "evict", &node, "--reason", "disk wiped"]);
    assert_eq!(evicted["action"], "evicted", "{evicted}");
    // The agent SVID and the workload SVID at least.
    assert!(evicted["revoked"].as_u64().unwrap() >= 2, "{evicted}");

    // The workload loses its identity; the old agent SVID is refused.
    wait_for_denied(&c).await;
    assert_eq!(
        refusal_code(sync_with(&c, &old_identity).await),
        "not_a_node"
    );
    let err = refused(&c, &["node", "show", &node]);
    assert!(err.contains("no attested node"), "{err}");
    // The agent says what to do (polled: it logs once it has seen the
    // refusal, which may trail the Workload API's answer).
    let agent = c.agent.as_ref().unwrap();
    wait_for_async(
        "the agent's log to name --join-token",
        Duration::from_secs(30),
        || {
            let log = agent.log_text();
            async move { log.contains("--join-token").then_some(()) }
        },
    )
    .await;

    // Evicting again: a clear not-found, nothing changed.
    let err = refused(&c, &["node", "evict", &node]);
    assert!(err.contains("no attested node"), "{err}");

    // A new join token for the same node ID and an agent restart: the
    // given token wins over the refused SVID on disk.
    c.agent.as_mut().unwrap().stop();
    let token = c.join_token(Some(&node));
    c.start_agent(&token);
    assert_eq!(c.node_id, node);
    let second = wait_for_serial(&c, Some(&first)).await;
    assert_ne!(first, second);
    let shown = c.cli_json(&["node", "show", &node]);
    assert_eq!(shown["banned"], false);
    // The pre-eviction agent SVID stays refused after re-attestation.
    assert_eq!(
        refusal_code(sync_with(&c, &old_identity).await),
        "agent_svid_revoked"
    );
    // The new one works, and a restart without a token reuses it.
    let fresh = copy_agent_identity(&c, "new-agent");
    sync_with(&c, &fresh).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn banned_node_cannot_attest_again_until_unbanned() {
    let mut c = Cluster::start(Options::default());
    let node = c.node_id.clone();
    c.register("/agents/banned", &[]);
    let _ = wait_for_serial(&c, None).await;
    // A token minted before the ban must not get the node back in.
    let pre_ban_token = c.join_token(Some(&node));

    let banned = c.cli_json(&["node", "ban", &node]);
    assert_eq!(banned["action"], "banned", "{banned}");
    assert!(banned["revoked"].as_u64().unwrap() >= 2, "{banned}");
    let shown = c.cli_json(&["node", "show", &node]);
    assert_eq!(shown["banned"], true);

    // Wrong transitions: clear conflicts, nothing changed.
    let err = refused(&c, &["node", "ban", &node]);
    assert!(err.contains("already banned"), "{err}");
    let err = refused(&c, &["node", "evict", &node]);
    assert!(err.contains("banned") && err.contains("unban"), "{err}");
    // No new token for a banned node.
    let err = refused(&c, &["token", "generate", "--node-id", &node]);
    assert!(err.contains("banned"), "{err}");

    // The running agent stops by itself: non-zero, the ban told once (an
    // evicted node's agent keeps running, waiting for a new token: see
    // the eviction test, which stops it cleanly).
    let agent = c.agent.as_mut().unwrap();
    let status = wait_for(
        "the agent of the banned node to exit",
        Duration::from_secs(60),
        || agent.child.try_wait().ok().flatten(),
    );
    let log = agent.log_text();
    assert_eq!(status.code(), Some(2), "{log}");
    assert_eq!(log.matches("is banned").count(), 1, "{log}");
    assert!(log.contains(&format!("baton node unban {node}")), "{log}");
    assert!(!log.contains("retry_in"), "{log}");

    // The agent, restarted with the token minted before the ban, is refused.
    let data = c.path("agent");
    let sock = c.agent_socket();
    let cmd = c.agent_command(&data, &sock, Some(&pre_ban_token));
    let mut p = Proc::spawn("agent-banned", cmd, c.path("agent-banned.log"));
    let status = wait_for(
        "the banned agent to give up",
        Duration::from_secs(30),
        || p.child.try_wait().ok().flatten(),
    );
    assert!(!status.success());
    let log = p.log_text();
    assert!(log.contains("banned"), "{log}");
    assert_eq!(c.cli_json(&["node", "show", &node])["banned"], true);

    // Lifting the ban: the node must attest again, with a new token.
    let err = refused(
        &c,
        &["node", "unban", "spiffe://example.org/baton/node/nope"],
    );
    assert!(err.contains("no attested node"), "{err}");
    let lifted = c.cli_json(&["node", "unban", &node]);
    assert_eq!(lifted["action"], "unbanned", "{lifted}");
    let err = refused(&c, &["node", "unban", &node]);
    assert!(err.contains("no attested node"), "{err}");
    // The token minted before the ban stays dead once it is lifted: the
    // ban voided it.
    let cmd = c.agent_command(&data, &sock, Some(&pre_ban_token));
    let mut p = Proc::spawn("agent-unbanned", cmd, c.path("agent-unbanned.log"));
    let status = wait_for(
        "the agent with the pre-ban token to give up",
        Duration::from_secs(30),
        || p.child.try_wait().ok().flatten(),
    );
    let log = p.log_text();
    assert!(!status.success(), "{log}");
    assert!(log.contains("node attestation refused"), "{log}");
    let err = refused(&c, &["node", "show", &node]);
    assert!(err.contains("no attested node"), "{err}");
    // Control: a token minted after the ban was lifted attests.
    let token = c.join_token(Some(&node));
    c.start_agent(&token);
    let _ = wait_for_serial(&c, None).await;
}

#[test]
fn eviction_reaches_a_tool_server_following_the_redis_feed() {
    let redis = Redis::start();
    let w = World::start_with(Some(&redis.url));
    let node = w.c.node_id.clone();
    let (_task, grant) = w.start_task(
        &["tool:crm.search:read", "dataset:crm:read"],
        "2",
        "10m",
        "read",
    );
    let planner = w.redeem(&grant, PLANNER, "evict-planner");
    let hop = w.delegate(
        &planner,
        RESEARCHER,
        &["tool:crm.search:read", "dataset:crm:read"],
        &[],
    );
    assert!(hop.status.success(), "{}", stderr(&hop));
    let g: serde_json::Value = serde_json::from_slice(&hop.stdout).unwrap();
    let researcher = w.redeem(g["grant"].as_str().unwrap(), RESEARCHER, "evict-researcher");
    wait_for(
        "a fresh feed at the tool server",
        Duration::from_secs(20),
        || {
            let out = w.call(&researcher, "crm.search");
            if !out.status.success() {
                eprintln!("call refused: {}", stderr(&out).trim());
            }
            out.status.success().then_some(())
        },
    );
    let task_serial = {
        let pem = std::fs::read_to_string(researcher.join("svid.pem")).unwrap();
        let b64: String = pem
            .lines()
            .skip_while(|l| !l.starts_with("-----BEGIN"))
            .skip(1)
            .take_while(|l| !l.starts_with("-----END"))
            .collect();
        use base64::Engine as _;
        serial_of(
            &base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap(),
        )
    };
    // Redis holds no live credential (the datastore is the registry).
    let live = redis.cli(&["KEYS", "{baton}:node:*"]);
    assert!(live.trim().is_empty(), "{live}");

    let v = w.json(&["node", "evict", &node, "-o", "json"]);
    // The agent SVID, the workload SVIDs and the task credentials.
    let revoked = v["revoked"].as_u64().unwrap();
    assert!(revoked >= 5, "{v}");
    assert_eq!(v["propagation"]["complete"], true, "{v}");
    // The task credential redeemed through the node dies at the verifier.
    wait_for(
        "the eviction reaches the tool server",
        Duration::from_secs(30),
        || {
            let out = w.call(&researcher, "crm.search");
            (!out.status.success() && stderr(&out).contains("revoked")).then_some(())
        },
    );
    // Everything the eviction covered is in the deny set the feed serves
    // (the task certificate's serial included).
    let hit = redis.cli(&["ZSCORE", "{baton}:revoked-index", &task_serial]);
    assert!(
        hit.trim().parse::<u64>().is_ok(),
        "{task_serial} not revoked: {hit}"
    );
    let denied: u64 = redis
        .cli(&["ZCARD", "{baton}:revoked-index"])
        .trim()
        .parse()
        .unwrap();
    assert!(denied >= revoked, "{denied} < {revoked}");
    // The planner cannot hop either.
    let hop = w.delegate(&planner, RESEARCHER, &["dataset:crm:read"], &[]);
    assert_eq!(hop.status.code(), Some(2), "{}", stderr(&hop));
}

#[test]
fn bad_operator_input_is_refused_clearly_and_changes_nothing() {
    let c = Cluster::start(Options::default());
    let node = c.node_id.clone();
    let before = c.cli_json(&["node", "list"]);
    assert_eq!(before["nodes"].as_array().unwrap().len(), 1, "{before}");

    let err = refused(
        &c,
        &["node", "evict", "spiffe://example.org/baton/node/nope"],
    );
    assert!(err.contains("no attested node"), "{err}");
    // An agent's ID names no node: refused before anything is looked up.
    let err = refused(&c, &["node", "evict", "spiffe://example.org/nope"]);
    assert!(err.contains("names no node"), "{err}");
    let err = refused(&c, &["node", "ban", "not a spiffe id"]);
    assert!(err.contains("<NODE_ID>"), "{err}");
    let err = refused(&c, &["node", "show", "spiffe://other.org/baton/node/x"]);
    assert!(err.contains("trust domain"), "{err}");
    let out = c.cli(&["node", "evict"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("<NODE_ID>"), "{}", stderr(&out));
    let help = c.cli_ok(&["node", "--help"]);
    for verb in ["list", "show", "evict", "ban", "unban"] {
        assert!(help.contains(verb), "{help}");
    }
    let help = c.cli_ok(&["node", "evict", "--help"]);
    assert!(
        help.contains("--output") && help.contains("join token"),
        "{help}"
    );

    // A caller whose uid the broker does not allow (the socket opened up
    // so that the uid check, not the file mode, decides). Needs root to
    // switch uid; skipped otherwise.
    if crate::harness::own_uid() == 0 {
        use std::os::unix::fs::PermissionsExt;
        let open = |p: &Path, mode| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        };
        open(c.dir.path(), 0o711);
        open(&c.admin_socket(), 0o666);
        let out = std::process::Command::new("setpriv")
            .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_baton"))
            .args(["node", "evict", &node])
            .env("BATON_ADMIN_SOCKET", c.admin_socket())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        assert!(
            stderr(&out).contains("may not use the admin API"),
            "{}",
            stderr(&out)
        );
        open(&c.admin_socket(), 0o600);
    }
    assert_eq!(c.cli_json(&["node", "list"]), before);
}

/// The agent SVIDs a node held before a broker restart are in the
/// datastore's credential registry: evicting the node after the restart
/// revokes them, and the pre-restart SVID stays refused after the node
/// attests again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_after_a_broker_restart_revokes_the_agent_svids_issued_before_it() {
    let mut c = Cluster::start(Options::default());
    let node = c.node_id.clone();
    c.register("/agents/restarted", &[]);
    let first = wait_for_serial(&c, None).await;
    let old_identity = copy_agent_identity(&c, "pre-restart-agent");
    sync_with(&c, &old_identity).await.unwrap();

    let addr = c.broker_addr.clone();
    c.broker.as_mut().unwrap().stop();
    c.start_broker(&addr, "1h");
    // The untampered control: the node's current SVID still syncs.
    wait_for_async(
        "sync after the restart",
        Duration::from_secs(30),
        || async { sync_with(&c, &old_identity).await.ok() },
    )
    .await;

    let evicted = c.cli_json(&["node", "evict", &node, "--reason", "stolen disk"]);
    // The agent SVID and the workload SVID issued before the restart.
    assert!(evicted["revoked"].as_u64().unwrap() >= 2, "{evicted}");
    wait_for_denied(&c).await;

    c.agent.as_mut().unwrap().stop();
    let token = c.join_token(Some(&node));
    c.start_agent(&token);
    let second = wait_for_serial(&c, Some(&first)).await;
    assert_ne!(first, second);
    assert_eq!(
        refusal_code(sync_with(&c, &old_identity).await),
        "agent_svid_revoked"
    );
    let fresh = copy_agent_identity(&c, "post-restart-agent");
    sync_with(&c, &fresh).await.unwrap();
}
