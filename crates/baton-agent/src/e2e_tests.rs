//! The daemon against a real in-process broker: join-token attestation,
//! sync, batched signing, the Workload API over its socket, JWT-SVIDs, and
//! a restart that reuses the stored node identity.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use baton_core::api::JoinTokenResponse;
use baton_core::{Entry, TrustDomain};
use baton_proto::delegation::RedeemGrantRequest;
use baton_proto::delegation::delegation_client::DelegationClient;
use baton_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use baton_proto::workload::{
    JwtsvidRequest, ValidateJwtsvidRequest, X509BundlesRequest, X509svidRequest,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;
use tonic::Request;
use tonic::transport::{Channel, Endpoint};

use crate::workload::SECURITY_HEADER;
use crate::{AgentConfig, AgentReady, run};

const DEADLINE: Duration = Duration::from_secs(30);

/// A one-shot HTTP/1.1 request over the broker's admin Unix socket.
async fn admin(socket: &Path, method: &str, route: &str, body: &serde_json::Value) -> Vec<u8> {
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    let body = serde_json::to_vec(body).unwrap();
    let head = format!(
        "{method} {route} HTTP/1.1\r\nHost: admin\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body).await.unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
    let mut body = raw[split + 4..].to_vec();
    assert!(
        head.starts_with("http/1.1 2"),
        "{head}\n{}",
        String::from_utf8_lossy(&body)
    );
    if head.contains("transfer-encoding: chunked") {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n").unwrap();
            let len = usize::from_str_radix(std::str::from_utf8(&rest[..eol]).unwrap().trim(), 16)
                .unwrap();
            if len == 0 {
                break;
            }
            out.extend_from_slice(&rest[eol + 2..eol + 2 + len]);
            rest = &rest[eol + 2 + len + 2..];
        }
        body = out;
    }
    body
}

fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

async fn workload_client(socket: &Path) -> SpiffeWorkloadApiClient<Channel> {
    let channel = Endpoint::from_shared(format!("unix:{}", socket.display()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    SpiffeWorkloadApiClient::new(channel)
}

fn with_header<T>(msg: T) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(SECURITY_HEADER, "true".parse().unwrap());
    r
}

struct RunningAgent {
    ready: AgentReady,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), crate::AgentError>>,
}

async fn start_agent(config: AgentConfig) -> RunningAgent {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let task = tokio::spawn(run(config, Some(ready_tx), async move {
        let _ = stop_rx.await;
    }));
    let ready = match tokio::time::timeout(DEADLINE, ready_rx).await {
        Ok(Ok(r)) => r,
        _ => panic!("agent not ready: {:?}", task.await),
    };
    RunningAgent { ready, stop, task }
}

impl RunningAgent {
    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .expect("agent did not stop")
            .unwrap()
            .unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_serves_svids_from_a_real_broker_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let admin_sock = dir.path().join("admin.sock");
    let mut bcfg = baton_broker::BrokerConfig::new(td.clone(), None, admin_sock.clone());
    bcfg.listen = "127.0.0.1:0".parse().unwrap();
    let (btx, brx) = oneshot::channel();
    let (bstop, bstop_rx) = oneshot::channel::<()>();
    let broker = tokio::spawn(baton_broker::run(
        bcfg,
        Arc::new(baton_broker::LogIssuance),
        Some(btx),
        async move {
            let _ = bstop_rx.await;
        },
    ));
    let bready = match tokio::time::timeout(DEADLINE, brx).await {
        Ok(Ok(r)) => r,
        _ => panic!("broker not ready: {:?}", broker.await),
    };

    let token: JoinTokenResponse = serde_json::from_slice(
        &admin(
            &admin_sock,
            "POST",
            "/v1/admin/join-tokens",
            &serde_json::json!({"ttl_secs": 600, "node_id": "spiffe://example.org/baton/node/n1"}),
        )
        .await,
    )
    .unwrap();
    let entry: Entry = serde_json::from_slice(
        &admin(
            &admin_sock,
            "POST",
            "/v1/admin/entries",
            &serde_json::json!({
                "spiffe_id": "spiffe://example.org/workload/me",
                "parent_id": token.node_id.as_str(),
                "selectors": [format!("unix:uid:{}", my_uid())],
                "x509_ttl_secs": 600,
            }),
        )
        .await,
    )
    .unwrap();

    let mut config = AgentConfig::new(
        dir.path().join("agent-data"),
        dir.path().join("agent.sock"),
        format!("https://{}", bready.addr),
        td.clone(),
    )
    .unwrap();
    config.bootstrap_bundle_pem = Some(bready.bundle_pem.clone());
    config.join_token = Some(token.token.clone());
    config.sync_interval = Duration::from_secs(1);

    let agent = start_agent(config.clone()).await;
    assert_eq!(agent.ready.node_id, token.node_id);
    let mut client = workload_client(&agent.ready.socket_path).await;

    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let msg = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg.svids.len(), 1);
    let svid = &msg.svids[0];
    assert_eq!(svid.spiffe_id, entry.spiffe_id.as_str());
    baton_ca::WorkloadKey::from_pkcs8(&svid.x509_svid_key).unwrap();
    let bundle = baton_ca::TrustBundle::from_pem(&td, &bready.bundle_pem).unwrap();
    assert_eq!(svid.bundle, bundle.x509_authorities_concat_der());
    // The key is in the leaf: the SVID was issued for the key we hold.
    let key = baton_ca::WorkloadKey::from_pkcs8(&svid.x509_svid_key).unwrap();
    let point = key.public_key_raw();
    assert!(svid.x509_svid.windows(point.len()).any(|w| w == point));

    let bundles = client
        .fetch_x509_bundles(with_header(X509BundlesRequest {}))
        .await
        .unwrap()
        .into_inner()
        .message()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        bundles.bundles["spiffe://example.org"],
        bundle.x509_authorities_concat_der()
    );

    let for_audience = |aud: &str| {
        with_header(JwtsvidRequest {
            audience: vec![aud.to_owned()],
            spiffe_id: String::new(),
        })
    };
    let jwt = client
        .fetch_jwtsvid(for_audience("svc"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(jwt.svids.len(), 1);
    let validated = client
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "svc".into(),
            svid: jwt.svids[0].svid.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(validated.spiffe_id, entry.spiffe_id.as_str());
    let err = client
        .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
            audience: "other".into(),
            svid: jwt.svids[0].svid.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // A workload asking for a new audience each time spends its own share
    // of the broker's JWT-SVID limit, not its node's: after a burst it is
    // refused, and what it has cached is still served.
    let mut minted = 1; // "svc" above
    let since = std::time::Instant::now();
    let refused = loop {
        let asked = client
            .fetch_jwtsvid(for_audience(&format!("aud-{minted}")))
            .await;
        match asked {
            Ok(_) => minted += 1,
            Err(status) => break status,
        }
        // One a second comes back while it asks (a slow machine asks slowly).
        let earned = u32::try_from(since.elapsed().as_secs()).unwrap() + 2;
        assert!(
            minted <= crate::jwt::MINTS_PER_ENTRY_BURST + earned,
            "no limit per entry: {minted} minted"
        );
    };
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    assert!(
        minted >= crate::jwt::MINTS_PER_ENTRY_BURST,
        "{minted}: {refused:?}"
    );
    let cached = client
        .fetch_jwtsvid(for_audience("svc"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cached.svids[0].svid, jwt.svids[0].svid);

    // The Delegation service shares the socket, the header rule and the
    // attestation; a bogus grant reaches the broker over the node's mTLS
    // and comes back as a refusal, not as an outage.
    let mut delegation = DelegationClient::new(
        Endpoint::from_shared(format!("unix:{}", agent.ready.socket_path.display()))
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    let err = delegation
        .redeem(Request::new(RedeemGrantRequest {
            grant: "bogus".into(),
            spiffe_id: String::new(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "security header missing from request");
    let err = delegation
        .redeem(with_header(RedeemGrantRequest {
            grant: "bogus".into(),
            spiffe_id: entry.spiffe_id.to_string(),
        }))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err.code(),
            tonic::Code::InvalidArgument
                | tonic::Code::PermissionDenied
                | tonic::Code::FailedPrecondition
        ),
        "{err:?}"
    );

    // The unmodified `spiffe` crate speaks to the agent.
    let endpoint = format!("unix:{}", agent.ready.socket_path.display());
    let spiffe_client = spiffe::WorkloadApiClient::connect_to(&endpoint)
        .await
        .unwrap();
    let x509 = spiffe_client.fetch_x509_svid().await.unwrap();
    assert_eq!(x509.spiffe_id().to_string(), entry.spiffe_id.as_str());
    let spiffe_td = spiffe::TrustDomain::new("example.org").unwrap();
    let x509_bundles = spiffe_client.fetch_x509_bundles().await.unwrap();
    assert!(x509_bundles.get(&spiffe_td).is_some());
    let jwt_bundles = spiffe_client.fetch_jwt_bundles().await.unwrap();
    assert!(jwt_bundles.get(&spiffe_td).is_some());
    let jwt_svid = spiffe_client.fetch_jwt_svid(["svc"], None).await.unwrap();
    let checked = spiffe_client
        .validate_jwt_token("svc", jwt_svid.token())
        .await
        .unwrap();
    assert_eq!(checked.spiffe_id().to_string(), entry.spiffe_id.as_str());
    let source = tokio::time::timeout(
        DEADLINE,
        spiffe::X509Source::builder().endpoint(&endpoint).build(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        source.svid().unwrap().spiffe_id().to_string(),
        entry.spiffe_id.as_str()
    );

    // Graceful stop ends the open streams (ours and the source's), then a
    // restart needs no token.
    agent.stop().await;
    let end = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap();
    assert!(matches!(end, Ok(None) | Err(_)), "{end:?}");
    assert!(!config.socket_path.exists());
    drop(source);
    config.join_token = None;
    config.bootstrap_bundle_pem = None;
    let agent = start_agent(config.clone()).await;
    assert_eq!(agent.ready.node_id, token.node_id);
    let mut client = workload_client(&agent.ready.socket_path).await;
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let msg = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(msg.svids[0].spiffe_id, entry.spiffe_id.as_str());
    agent.stop().await;

    // A broker whose bundle is older than one this node installed (a
    // rolled-back CA journal) is not followed: its bundle, entries and
    // SVIDs are refused. Here the node has "seen" a sequence 1,000 past
    // the broker's (its stored bundle, authorities kept).
    let stored = config.data_dir.join("bundle.json");
    let mut ahead: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&stored).unwrap()).unwrap();
    let broker_seq = ahead["spiffe_sequence"].as_u64().unwrap();
    ahead["spiffe_sequence"] = serde_json::json!(broker_seq + 1000);
    std::fs::write(&stored, serde_json::to_vec(&ahead).unwrap()).unwrap();
    let agent = start_agent(config.clone()).await;
    // The first sync ran before the socket opened: nothing was installed.
    let kept: serde_json::Value = serde_json::from_slice(&std::fs::read(&stored).unwrap()).unwrap();
    assert_eq!(kept["spiffe_sequence"], broker_seq + 1000, "{kept}");
    let mut client = workload_client(&agent.ready.socket_path).await;
    let refused = match client.fetch_x509svid(with_header(X509svidRequest {})).await {
        Err(status) => status,
        Ok(stream) => tokio::time::timeout(DEADLINE, stream.into_inner().message())
            .await
            .unwrap()
            .unwrap_err(),
    };
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused:?}");
    agent.stop().await;

    let _ = bstop.send(());
    tokio::time::timeout(DEADLINE, broker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_wakes_the_loop_before_the_sync_interval() {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let admin_sock = dir.path().join("admin.sock");
    let mut bcfg = baton_broker::BrokerConfig::new(td.clone(), None, admin_sock.clone());
    bcfg.listen = "127.0.0.1:0".parse().unwrap();
    let (btx, brx) = oneshot::channel();
    let (bstop, bstop_rx) = oneshot::channel::<()>();
    let broker = tokio::spawn(baton_broker::run(
        bcfg,
        Arc::new(baton_broker::LogIssuance),
        Some(btx),
        async move {
            let _ = bstop_rx.await;
        },
    ));
    let bready = match tokio::time::timeout(DEADLINE, brx).await {
        Ok(Ok(r)) => r,
        _ => panic!("broker not ready: {:?}", broker.await),
    };
    let token: JoinTokenResponse = serde_json::from_slice(
        &admin(
            &admin_sock,
            "POST",
            "/v1/admin/join-tokens",
            &serde_json::json!({"ttl_secs": 600}),
        )
        .await,
    )
    .unwrap();
    // The CA back-dates by 10 s: a 30 s TTL is a 40 s lifetime, and with a
    // rotate fraction of 0.3 the SVID is due about 2 s after issuance.
    admin(
        &admin_sock,
        "POST",
        "/v1/admin/entries",
        &serde_json::json!({
            "spiffe_id": "spiffe://example.org/workload/short",
            "parent_id": token.node_id.as_str(),
            "selectors": [format!("unix:uid:{}", my_uid())],
            "x509_ttl_secs": 30,
        }),
    )
    .await;

    let mut config = AgentConfig::new(
        dir.path().join("agent-data"),
        dir.path().join("agent.sock"),
        format!("https://{}", bready.addr),
        td,
    )
    .unwrap();
    config.bootstrap_bundle_pem = Some(bready.bundle_pem);
    config.join_token = Some(token.token);
    // Far longer than the test: only the rotation wake-up can explain a
    // second SVID.
    config.sync_interval = Duration::from_secs(600);
    config.rotate_fraction = 0.3;
    let agent = start_agent(config).await;

    let mut client = workload_client(&agent.ready.socket_path).await;
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let first = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let second = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .expect("no rotation within the deadline")
        .unwrap()
        .unwrap();
    assert_eq!(second.svids[0].spiffe_id, first.svids[0].spiffe_id);
    assert_ne!(second.svids[0].x509_svid, first.svids[0].x509_svid);
    assert_ne!(second.svids[0].x509_svid_key, first.svids[0].x509_svid_key);

    agent.stop().await;
    let _ = bstop.send(());
    tokio::time::timeout(DEADLINE, broker)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

// ---- several broker URLs: failover ----

/// A real broker on 127.0.0.1, in-memory, with its admin socket in `dir`.
struct TestBroker {
    ready: baton_broker::BrokerReady,
    admin: std::path::PathBuf,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), baton_broker::StartError>>,
}

impl TestBroker {
    async fn start(dir: &Path, td: &TrustDomain) -> Self {
        Self::start_with(dir, td, |_| {}).await
    }

    /// `start`, with `adjust` applied to the broker's configuration.
    async fn start_with(
        dir: &Path,
        td: &TrustDomain,
        adjust: impl FnOnce(&mut baton_broker::BrokerConfig),
    ) -> Self {
        let admin = dir.join("admin.sock");
        let mut bcfg = baton_broker::BrokerConfig::new(td.clone(), None, admin.clone());
        bcfg.listen = "127.0.0.1:0".parse().unwrap();
        adjust(&mut bcfg);
        let (btx, brx) = oneshot::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(baton_broker::run(
            bcfg,
            Arc::new(baton_broker::LogIssuance),
            Some(btx),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let ready = match tokio::time::timeout(DEADLINE, brx).await {
            Ok(Ok(r)) => r,
            _ => panic!("broker not ready: {:?}", task.await),
        };
        Self {
            ready,
            admin,
            stop,
            task,
        }
    }

    fn url(&self) -> String {
        format!("https://{}", self.ready.addr)
    }

    /// The broker's X.509 authorities.
    fn authorities(&self) -> Vec<Vec<u8>> {
        baton_ca::TrustBundle::from_pem(&self.ready.trust_domain, &self.ready.bundle_pem)
            .unwrap()
            .x509_authorities
    }

    async fn join_token(&self) -> JoinTokenResponse {
        serde_json::from_slice(
            &admin(
                &self.admin,
                "POST",
                "/v1/admin/join-tokens",
                &serde_json::json!({"ttl_secs": 600}),
            )
            .await,
        )
        .unwrap()
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(DEADLINE, self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// An `https://` URL on a loopback port where nothing listens: bound, then
/// released.
fn closed_port_url() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    drop(l);
    format!("https://127.0.0.1:{port}")
}

/// Whether a connection to `l` is waiting to be accepted: the kernel
/// queues a connection as soon as its TCP handshake is done, so after a
/// call has returned, its connections (if any) are already there.
fn was_connected_to(l: &std::net::TcpListener) -> bool {
    l.set_nonblocking(true).unwrap();
    match l.accept() {
        Ok(_) => true,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
        Err(e) => panic!("accept: {e}"),
    }
}

/// A TLS server presenting `spiffe://<td>/baton/broker` (from a CA of its
/// own, whose authorities are returned for the clients' bundle) that reads
/// the first bytes of each request, then hangs up without an answer: a
/// transport failure after the connection was made. `client_authorities`
/// verify the agent SVIDs clients present. The count is of connections
/// that got that far.
fn start_hang_up_broker(
    td: &TrustDomain,
    client_authorities: Vec<Vec<u8>>,
) -> (String, Vec<Vec<u8>>, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::Read;
    let now = std::time::SystemTime::now();
    let ca = baton_ca::Ca::load_or_create(baton_ca::CaConfig::new(td.clone()), now).unwrap();
    let (chain, key) = ca
        .broker_serving_identity(&[], Duration::from_secs(3600), now)
        .unwrap();
    let bundles = baton_tls::BundleStore::new();
    bundles.set(td.clone(), client_authorities);
    let config = baton_tls::server_config(
        baton_tls::ServerIdentity::new(chain, key.expose()).unwrap(),
        bundles,
        baton_tls::PeerPolicy::AnyInTrustDomains(vec![td.clone()]),
        baton_tls::ClientAuth::Optional,
    )
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://{}", listener.local_addr().unwrap());
    let hung_up = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = Arc::clone(&hung_up);
    std::thread::spawn(move || {
        for sock in listener.incoming() {
            let Ok(sock) = sock else { continue };
            let _ = sock.set_read_timeout(Some(DEADLINE));
            let Ok(conn) = baton_tls::rustls::ServerConnection::new(Arc::clone(&config)) else {
                continue;
            };
            let mut tls = baton_tls::rustls::StreamOwned::new(conn, sock);
            let mut buf = [0u8; 4096];
            if matches!(tls.read(&mut buf), Ok(n) if n > 0) {
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            // Dropped: the connection closes with no answer.
        }
    });
    (url, ca.bundle().x509_authorities, hung_up)
}

fn bundles_of(td: &TrustDomain, authorities: Vec<Vec<u8>>) -> baton_tls::BundleStore {
    let b = baton_tls::BundleStore::new();
    b.set(td.clone(), authorities);
    b
}

fn client_of(
    urls: &[String],
    identity: baton_tls::ClientIdentity,
    bundles: baton_tls::BundleStore,
    td: &TrustDomain,
) -> crate::client::BrokerClient {
    crate::client::BrokerClient::with_urls(
        urls,
        identity,
        bundles,
        AgentConfig::default_broker_id(td).unwrap(),
    )
    .unwrap()
}

/// Attests a node through `client` and returns its identity.
async fn attest_node(
    dir: &Path,
    client: &crate::client::BrokerClient,
    td: &TrustDomain,
    token: &JoinTokenResponse,
) -> crate::node::NodeSvid {
    let store = crate::node::NodeStore::open(dir).unwrap();
    tokio::time::timeout(
        DEADLINE,
        crate::node::establish(
            &store,
            client,
            td,
            Some(&token.token),
            crate::node::unix_now(),
        ),
    )
    .await
    .unwrap()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_port_fails_over_to_the_next_broker_which_is_then_used_directly() {
    use crate::client::ClientError;
    baton_tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let broker = TestBroker::start(dir.path(), &td).await;
    let live = broker.url();

    // Control: the closed port alone is unreachable, and named.
    let dead = closed_port_url();
    let alone = client_of(
        std::slice::from_ref(&dead),
        baton_tls::ClientIdentity::none(),
        bundles_of(&td, broker.authorities()),
        &td,
    );
    let err = tokio::time::timeout(DEADLINE, alone.sync(None))
        .await
        .unwrap()
        .unwrap_err();
    match &err {
        ClientError::Unreachable { urls, source } => {
            assert_eq!(urls, &[format!("{dead}/v1/node/sync")]);
            assert!(source.is_connect(), "{source:?}");
        }
        other => panic!("{other:?}"),
    }
    assert!(err.to_string().contains(&dead), "{err}");
    // Two dead URLs: the error names both.
    let dead2 = closed_port_url();
    let both = client_of(
        &[dead.clone(), dead2.clone()],
        baton_tls::ClientIdentity::none(),
        bundles_of(&td, broker.authorities()),
        &td,
    );
    let err = tokio::time::timeout(DEADLINE, both.sync(None))
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&dead) && err.to_string().contains(&dead2),
        "{err}"
    );

    // Attestation (single-use token) fails over on a connect error.
    let client = client_of(
        &[dead.clone(), live.clone()],
        baton_tls::ClientIdentity::none(),
        bundles_of(&td, broker.authorities()),
        &td,
    );
    assert_eq!(client.current_url(), dead);
    let token = broker.join_token().await;
    let svid = attest_node(&dir.path().join("node"), &client, &td, &token).await;
    assert_eq!(svid.spiffe_id, token.node_id);
    assert_eq!(client.current_url(), live);

    // A sync of a fresh client over the same node identity: the closed
    // port first, then the broker.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead3 = format!("https://{}", closed.local_addr().unwrap());
    drop(closed);
    let client = client_of(
        &[dead3.clone(), live.clone()],
        baton_tls::ClientIdentity::new(svid.chain_der.clone(), svid.key.expose()).unwrap(),
        bundles_of(&td, broker.authorities()),
        &td,
    );
    let synced = tokio::time::timeout(DEADLINE, client.sync(None))
        .await
        .unwrap()
        .unwrap();
    assert!(synced.bundle.is_object(), "{:?}", synced.bundle);
    assert_eq!(client.current_url(), live);

    // From now on it goes to the broker that answered first: a listener
    // put back on the first URL's port sees no connection, even on fresh
    // connections.
    let port = dead3.rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let back = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    client.reconnect().unwrap();
    tokio::time::timeout(DEADLINE, client.sync(None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(client.current_url(), live);
    assert!(!was_connected_to(&back));

    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_answer_is_never_retried_on_the_next_broker() {
    use crate::client::ClientError;
    baton_tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let broker = TestBroker::start(dir.path(), &td).await;
    // The next URL: a listener that would queue any connection made to it.
    let next = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let next_url = format!("https://{}", next.local_addr().unwrap());
    let client = client_of(
        &[broker.url(), next_url],
        baton_tls::ClientIdentity::none(),
        bundles_of(&td, broker.authorities()),
        &td,
    );

    // No client certificate: the broker refuses the sync (HTTP 401).
    let err = tokio::time::timeout(DEADLINE, client.sync(None))
        .await
        .unwrap()
        .unwrap_err();
    assert!(
        matches!(err, ClientError::Refused { status: 401, .. }),
        "{err:?}"
    );
    // An unknown join token: refused, and not tried elsewhere either.
    let key = baton_ca::WorkloadKey::generate().unwrap();
    let csr = key
        .csr_der(&baton_core::SpiffeId::parse("spiffe://example.org").unwrap())
        .unwrap();
    let err = tokio::time::timeout(
        DEADLINE,
        client.attest(&baton_core::Secret::new("bogus"), csr),
    )
    .await
    .unwrap()
    .unwrap_err();
    assert!(
        matches!(err, ClientError::Refused { status, .. } if (400..500).contains(&status)),
        "{err:?}"
    );
    assert_eq!(client.current_url(), broker.url());
    assert!(!was_connected_to(&next));

    broker.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_connection_fails_over_only_for_calls_that_may_be_repeated() {
    use crate::client::ClientError;
    baton_tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let broker = TestBroker::start(dir.path(), &td).await;
    let (hang_up, hang_up_authorities, hung_up) = start_hang_up_broker(&td, broker.authorities());
    let trusted = || {
        bundles_of(
            &td,
            [broker.authorities(), hang_up_authorities.clone()].concat(),
        )
    };
    let token = broker.join_token().await;

    // Attestation spends its token: a connection lost after the request
    // went out is not retried on the next broker.
    let client = client_of(
        &[hang_up.clone(), broker.url()],
        baton_tls::ClientIdentity::none(),
        trusted(),
        &td,
    );
    let key = baton_ca::WorkloadKey::generate().unwrap();
    let csr = key
        .csr_der(&baton_core::SpiffeId::parse("spiffe://example.org").unwrap())
        .unwrap();
    let err = tokio::time::timeout(DEADLINE, client.attest(&token.token, csr))
        .await
        .unwrap()
        .unwrap_err();
    match &err {
        ClientError::Unreachable { urls, source } => {
            assert_eq!(urls, &[format!("{hang_up}/v1/node/attest")]);
            assert!(!source.is_connect(), "{source:?}");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(hung_up.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(client.current_url(), hang_up);
    // The broker never saw it: the token still attests.
    let direct = client_of(
        &[broker.url()],
        baton_tls::ClientIdentity::none(),
        trusted(),
        &td,
    );
    let svid = attest_node(&dir.path().join("node"), &direct, &td, &token).await;

    // A sync may be repeated: the same failure moves it to the broker.
    let client = client_of(
        &[hang_up.clone(), broker.url()],
        baton_tls::ClientIdentity::new(svid.chain_der.clone(), svid.key.expose()).unwrap(),
        trusted(),
        &td,
    );
    tokio::time::timeout(DEADLINE, client.sync(None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hung_up.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert_eq!(client.current_url(), broker.url());

    broker.stop().await;
}

/// The daemon itself, given a dead URL first: it attests, syncs and serves
/// through the second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_serves_through_its_second_broker_url() {
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let broker = TestBroker::start(dir.path(), &td).await;
    let token = broker.join_token().await;
    admin(
        &broker.admin,
        "POST",
        "/v1/admin/entries",
        &serde_json::json!({
            "spiffe_id": "spiffe://example.org/workload/failover",
            "parent_id": token.node_id.as_str(),
            "selectors": [format!("unix:uid:{}", my_uid())],
            "x509_ttl_secs": 600,
        }),
    )
    .await;
    let mut config = AgentConfig::new(
        dir.path().join("agent-data"),
        dir.path().join("agent.sock"),
        closed_port_url(),
        td,
    )
    .unwrap();
    config.broker_urls.push(broker.url());
    config.bootstrap_bundle_pem = Some(broker.ready.bundle_pem.clone());
    config.join_token = Some(token.token.clone());
    config.sync_interval = Duration::from_secs(1);
    let agent = start_agent(config).await;
    assert_eq!(agent.ready.node_id, token.node_id);
    let mut client = workload_client(&agent.ready.socket_path).await;
    let mut stream = client
        .fetch_x509svid(with_header(X509svidRequest {}))
        .await
        .unwrap()
        .into_inner();
    let msg = tokio::time::timeout(DEADLINE, stream.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        msg.svids[0].spiffe_id,
        "spiffe://example.org/workload/failover"
    );
    agent.stop().await;
    broker.stop().await;
}

/// A redeem whose answer was lost (the broker died after its commit, or
/// the connection broke) is sent again, as [`BrokerClient`] does on any
/// transport error: the very same request (this node, this workload, this
/// CSR) gets the credential the first try delivered, recorded again in
/// the audit log; anything else that presents the used grant is refused
/// `grant_used` and gets nothing new.
///
/// [`BrokerClient`]: crate::client::BrokerClient
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_redeem_sent_again_gets_the_same_credential_and_nothing_else_does() {
    baton_tls::install_crypto_provider();
    let dir = tempfile::tempdir().unwrap();
    let td = TrustDomain::new("example.org").unwrap();
    let data_dir = dir.path().join("broker");
    let broker = TestBroker::start_with(dir.path(), &td, |cfg| {
        cfg.dev_issuer = true;
        cfg.data_dir = Some(data_dir);
    })
    .await;
    let trusted = || bundles_of(&td, broker.authorities());
    let workload = "spiffe://example.org/agents/researcher";
    // Two nodes, both serving the workload.
    let mut nodes = Vec::new();
    for name in ["node-a", "node-b"] {
        let token = broker.join_token().await;
        let direct = client_of(
            &[broker.url()],
            baton_tls::ClientIdentity::none(),
            trusted(),
            &td,
        );
        let svid = attest_node(&dir.path().join(name), &direct, &td, &token).await;
        admin(
            &broker.admin,
            "POST",
            "/v1/admin/entries",
            &serde_json::json!({
                "spiffe_id": workload,
                "parent_id": svid.spiffe_id.to_string(),
                "selectors": ["unix:uid:1000"],
            }),
        )
        .await;
        nodes.push(client_of(
            &[broker.url()],
            baton_tls::ClientIdentity::new(svid.chain_der.clone(), svid.key.expose()).unwrap(),
            trusted(),
            &td,
        ));
    }
    let start_task = || async {
        let id_token: serde_json::Value = serde_json::from_slice(
            &admin(
                &broker.admin,
                "POST",
                "/v1/admin/dev/id-token",
                &serde_json::json!({"user": "alice@example.com", "groups": ["engineering"]}),
            )
            .await,
        )
        .unwrap();
        let started: serde_json::Value = serde_json::from_slice(
            &admin(
                &broker.admin,
                "POST",
                "/v1/admin/tasks",
                &serde_json::json!({
                    "id_token": id_token["id_token"],
                    "root_agent": workload,
                    "purpose": "support.case-research",
                    "scope": ["tool:crm.search:read"],
                    "risk_ceiling": "read",
                    "ttl_secs": 600,
                    "max_depth": 2,
                    "audience": ["crm"],
                }),
            )
            .await,
        )
        .unwrap();
        (
            started["task_id"].as_str().unwrap().to_owned(),
            baton_core::Secret::new(started["grant"]["grant"].as_str().unwrap()),
        )
    };
    let (task_id, grant) = start_task().await;
    let spiffe_id = baton_core::SpiffeId::parse(workload).unwrap();
    let key = baton_ca::WorkloadKey::generate().unwrap();
    let req = baton_core::api::RedeemRequest {
        grant: grant.clone(),
        spiffe_id: spiffe_id.clone(),
        csr_der: key.csr_der(&spiffe_id).unwrap(),
    };
    let redeem = |node: usize, req: baton_core::api::RedeemRequest| {
        let client = &nodes[node];
        async move {
            tokio::time::timeout(DEADLINE, client.redeem(&req, None))
                .await
                .unwrap()
        }
    };
    let code = |r: Result<baton_core::api::TaskCredential, crate::client::ClientError>| match r {
        Err(crate::client::ClientError::Refused { error, .. }) => error.code,
        other => panic!("expected a refusal, got {other:?}"),
    };

    let first = redeem(0, req.clone()).await.unwrap();
    // The same request again: the same credential, not a second one.
    let again = redeem(0, req.clone()).await.unwrap();
    assert_eq!(again.token.expose(), first.token.expose());
    assert_eq!(again.cert_chain_der, first.cert_chain_der);
    // The same grant with another key (a thief's, or a new try that is
    // not a replay) gets nothing.
    let other_key = baton_ca::WorkloadKey::generate().unwrap();
    let mut other = req.clone();
    other.csr_der = other_key.csr_der(&spiffe_id).unwrap();
    assert_eq!(code(redeem(0, other).await), "grant_used");
    // The same bytes from another node that serves the workload: nothing.
    assert_eq!(code(redeem(1, req.clone()).await), "grant_used");

    // Two deliveries, each with its audit record; the second says why.
    let trace: serde_json::Value = serde_json::from_slice(
        &admin(
            &broker.admin,
            "GET",
            &format!("/v1/admin/audit/trace/{task_id}"),
            &serde_json::json!({}),
        )
        .await,
    )
    .unwrap();
    let jti = {
        use base64::Engine as _;
        let payload = first.token.expose().split('.').nth(1).unwrap().to_owned();
        let claims: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        claims["jti"].as_str().unwrap().to_owned()
    };
    let mut redeems = Vec::new();
    granted_redeems(&trace, &jti, &mut redeems);
    assert_eq!(redeems.len(), 2, "{trace}");
    assert_eq!(
        redeems
            .iter()
            .filter(|r| r.starts_with("redelivered"))
            .count(),
        1,
        "{redeems:?}"
    );

    // A connection lost after the redeem went out moves it to the next
    // broker (here the request never reached the real one, which redeems
    // it the first time).
    let (hang_up, hang_up_authorities, hung_up) = start_hang_up_broker(&td, broker.authorities());
    let (_, grant2) = start_task().await;
    let node_a = attest_node(
        &dir.path().join("node-c"),
        &client_of(
            &[broker.url()],
            baton_tls::ClientIdentity::none(),
            trusted(),
            &td,
        ),
        &td,
        &broker.join_token().await,
    )
    .await;
    admin(
        &broker.admin,
        "POST",
        "/v1/admin/entries",
        &serde_json::json!({
            "spiffe_id": workload,
            "parent_id": node_a.spiffe_id.to_string(),
            "selectors": ["unix:uid:1000"],
        }),
    )
    .await;
    let via_hang_up = client_of(
        &[hang_up, broker.url()],
        baton_tls::ClientIdentity::new(node_a.chain_der.clone(), node_a.key.expose()).unwrap(),
        bundles_of(&td, [broker.authorities(), hang_up_authorities].concat()),
        &td,
    );
    let key2 = baton_ca::WorkloadKey::generate().unwrap();
    let req2 = baton_core::api::RedeemRequest {
        grant: grant2,
        spiffe_id: spiffe_id.clone(),
        csr_der: key2.csr_der(&spiffe_id).unwrap(),
    };
    tokio::time::timeout(DEADLINE, via_hang_up.redeem(&req2, None))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(hung_up.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(via_hang_up.current_url(), broker.url());

    // Once the credential is revoked, its replay is refused too.
    admin(
        &broker.admin,
        "POST",
        "/v1/admin/revoke",
        &serde_json::json!({"target": {"credential": jti}, "reason": "leaked"}),
    )
    .await;
    assert_eq!(code(redeem(0, req).await), "grant_used");

    broker.stop().await;
}

/// The `reason` (or "" when none) of every granted `redeemed` event of
/// `jti` anywhere in a trace's JSON.
fn granted_redeems(v: &serde_json::Value, jti: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("type").and_then(|k| k.as_str()) == Some("redeemed")
                && m.get("decision").and_then(|d| d.as_str()) == Some("granted")
                && m.get("token_jti").and_then(|j| j.as_str()) == Some(jti)
            {
                out.push(
                    m.get("reason")
                        .and_then(|r| r.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                );
            }
            for x in m.values() {
                granted_redeems(x, jti, out);
            }
        }
        serde_json::Value::Array(a) => {
            for x in a {
                granted_redeems(x, jti, out);
            }
        }
        _ => {}
    }
}
