//! Real sockets: a TLS listener on 127.0.0.1:0 and a Unix socket in a temp
//! dir, driven by reqwest (through `client_config`) and raw bytes.

use std::net::SocketAddr;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use warp::Filter;

use super::*;
use crate::testutil::{Leaf, TestCa};
use crate::{BundleStore, ClientAuth, ClientIdentity, PeerPolicy, client_config, server_config};

const SERVER_ID: &str = "spiffe://example.org/broker";

struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), TlsError>>,
}

impl Server {
    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.await.unwrap().unwrap();
    }
}

fn whoami()
-> impl Filter<Extract = (String,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    warp::path("whoami")
        .and(warp::ext::get::<PeerIdentity>())
        .map(|peer: PeerIdentity| match peer.0 {
            Some(id) => id.to_string(),
            None => "anonymous".to_owned(),
        })
}

async fn start(config: Arc<ServerConfig>) -> Server {
    crate::install_crypto_provider();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel();
    let task = tokio::spawn(serve_https(listener, config, whoami(), async {
        let _ = rx.await;
    }));
    Server {
        addr,
        stop: Some(tx),
        task,
    }
}

/// A server for example.org whose certificate is `spiffe://example.org/broker`.
async fn start_for(ca: &TestCa, bundles: BundleStore, auth: ClientAuth) -> Server {
    let identity = ca.leaf("/broker").server_identity();
    let policy = PeerPolicy::AnyInTrustDomains(vec![ca.td.clone()]);
    start(server_config(identity, bundles, policy, auth).unwrap()).await
}

/// A fresh reqwest client (no pooled connection) trusting `server_ca`.
fn client(server_ca: &TestCa, identity: ClientIdentity) -> reqwest::Client {
    let policy = PeerPolicy::Exact(vec![SERVER_ID.parse().unwrap()]);
    let config = client_config(identity, server_ca.bundles(), policy).unwrap();
    reqwest::Client::builder()
        .tls_backend_preconfigured(config)
        .build()
        .unwrap()
}

async fn get(
    client: &reqwest::Client,
    addr: SocketAddr,
) -> Result<(reqwest::Version, String), reqwest::Error> {
    let resp = client
        .get(format!("https://127.0.0.1:{}/whoami", addr.port()))
        .send()
        .await?
        .error_for_status()?;
    let version = resp.version();
    Ok((version, resp.text().await?))
}

fn leaf_client(leaf: &Leaf, server_ca: &TestCa) -> reqwest::Client {
    client(server_ca, leaf.client_identity())
}

#[tokio::test]
async fn mtls_round_trip_echoes_peer_identity_over_h2() {
    let ca = TestCa::new("example.org");
    let server = start_for(&ca, ca.bundles(), ClientAuth::Required).await;
    let c = leaf_client(&ca.leaf("/agent/alice"), &ca);
    let (version, body) = get(&c, server.addr).await.unwrap();
    assert_eq!(body, "spiffe://example.org/agent/alice");
    assert_eq!(version, reqwest::Version::HTTP_2);
    server.stop().await;
}

#[tokio::test]
async fn client_from_another_trust_domain_is_refused() {
    let ca = TestCa::new("example.org");
    let other = TestCa::new("other.org");
    let server = start_for(&ca, ca.bundles(), ClientAuth::Required).await;
    let c = leaf_client(&other.leaf("/intruder"), &ca);
    assert!(get(&c, server.addr).await.is_err());
    // Also refused when the server trusts other.org's bundle but its policy
    // names only example.org.
    server.stop().await;
    let both = ca.bundles();
    both.set(other.td.clone(), vec![other.der()]);
    let server = start_for(&ca, both, ClientAuth::Required).await;
    assert!(get(&c, server.addr).await.is_err());
    server.stop().await;
}

#[tokio::test]
async fn anonymous_client_needs_optional_auth() {
    let ca = TestCa::new("example.org");
    let required = start_for(&ca, ca.bundles(), ClientAuth::Required).await;
    let anon = client(&ca, ClientIdentity::none());
    assert!(get(&anon, required.addr).await.is_err());
    required.stop().await;

    let optional = start_for(&ca, ca.bundles(), ClientAuth::Optional).await;
    let (_, body) = get(&anon, optional.addr).await.unwrap();
    assert_eq!(body, "anonymous");
    // A certificate, when sent, is still verified.
    let c = leaf_client(&ca.leaf("/agent/bob"), &ca);
    assert_eq!(
        get(&c, optional.addr).await.unwrap().1,
        "spiffe://example.org/agent/bob"
    );
    let intruder = leaf_client(&TestCa::new("other.org").leaf("/x"), &ca);
    assert!(get(&intruder, optional.addr).await.is_err());
    optional.stop().await;
}

#[tokio::test]
async fn swapping_the_bundle_needs_no_restart() {
    let old = TestCa::new("example.org");
    let new = TestCa::new("example.org");
    let bundles = old.bundles();
    let server = start_for(&old, bundles.clone(), ClientAuth::Required).await;
    let old_client = leaf_client(&old.leaf("/agent"), &old);
    let new_client = leaf_client(&new.leaf("/agent"), &old);
    assert!(get(&old_client, server.addr).await.is_ok());
    assert!(get(&new_client, server.addr).await.is_err());

    bundles.set(old.td.clone(), vec![new.der()]);
    let old_client = leaf_client(&old.leaf("/agent"), &old);
    assert!(get(&old_client, server.addr).await.is_err());
    assert!(get(&new_client, server.addr).await.is_ok());
    server.stop().await;
}

#[tokio::test]
async fn client_refuses_a_server_with_an_unexpected_id() {
    let ca = TestCa::new("example.org");
    let identity = ca.leaf("/not-the-broker").server_identity();
    let policy = PeerPolicy::AnyInTrustDomains(vec![ca.td.clone()]);
    let server =
        start(server_config(identity, ca.bundles(), policy, ClientAuth::Required).unwrap()).await;
    let c = leaf_client(&ca.leaf("/agent"), &ca);
    let err = get(&c, server.addr).await.unwrap_err();
    assert!(format!("{err:?}").contains("NotAllowed"), "{err:?}");
    server.stop().await;
}

#[tokio::test]
async fn garbage_does_not_stop_the_server() {
    let ca = TestCa::new("example.org");
    let server = start_for(&ca, ca.bundles(), ClientAuth::Required).await;

    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET /whoami HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let _ = plain.read_to_end(&mut sink).await;

    let mut noise = TcpStream::connect(server.addr).await.unwrap();
    let bytes: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = noise.write_all(&bytes).await;
    let _ = noise.read_to_end(&mut sink).await;

    // Connect and hang up at once, and connect and stay silent.
    drop(TcpStream::connect(server.addr).await.unwrap());
    let _silent = TcpStream::connect(server.addr).await.unwrap();

    let c = leaf_client(&ca.leaf("/agent"), &ca);
    assert_eq!(
        get(&c, server.addr).await.unwrap().1,
        "spiffe://example.org/agent"
    );
    server.stop().await;
}

#[tokio::test]
async fn rotated_server_certificate_is_served_next_handshake() {
    let ca = TestCa::new("example.org");
    let first = ca.leaf("/broker");
    let identity = first.server_identity();
    let policy = PeerPolicy::AnyInTrustDomains(vec![ca.td.clone()]);
    let config =
        server_config(identity.clone(), ca.bundles(), policy, ClientAuth::Optional).unwrap();
    let server = start(config).await;

    let served = |addr: SocketAddr| {
        let ca_bundles = ca.bundles();
        async move {
            let policy = PeerPolicy::Exact(vec![SERVER_ID.parse().unwrap()]);
            let config = client_config(ClientIdentity::none(), ca_bundles, policy).unwrap();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from("ignored.invalid").unwrap();
            let tls = connector.connect(name, tcp).await.unwrap();
            tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
        }
    };
    assert_eq!(served(server.addr).await, first.chain[0]);
    let second = ca.leaf("/broker");
    identity.replace(second.chain.clone(), &second.key).unwrap();
    assert_eq!(served(server.addr).await, second.chain[0]);
    // A key that does not match the chain is refused and the old pair stays.
    let third = ca.leaf("/broker");
    assert!(identity.replace(third.chain.clone(), &first.key).is_err());
    assert_eq!(served(server.addr).await, second.chain[0]);
    server.stop().await;
}

#[tokio::test]
async fn shutdown_returns_with_idle_connections_open() {
    let ca = TestCa::new("example.org");
    let server = start_for(&ca, ca.bundles(), ClientAuth::Required).await;
    let c = leaf_client(&ca.leaf("/agent"), &ca);
    assert!(get(&c, server.addr).await.is_ok());
    // `c` keeps its h2 connection pooled; shutdown must still return.
    tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(5), server.stop())
        .await
        .unwrap();
}

fn uid_from_proc() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("Uid:")).unwrap();
    // Real, effective, saved, fs: SO_PEERCRED reports the effective uid.
    line.split_whitespace().nth(2).unwrap().parse().unwrap()
}

#[tokio::test]
async fn serve_unix_reports_the_peer_uid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("admin.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let route = warp::path("uid")
        .and(warp::ext::get::<UnixPeer>())
        .map(|peer: UnixPeer| format!("{} {}", peer.uid, peer.pid.unwrap_or(-1)));
    let (tx, rx) = oneshot::channel::<()>();
    let task = tokio::spawn(serve_unix(listener, route, async {
        let _ = rx.await;
    }));

    let mut stream = UnixStream::connect(&path).await.unwrap();
    stream
        .write_all(b"GET /uid HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let body = response.split("\r\n\r\n").nth(1).unwrap();
    let expected = format!("{} {}", uid_from_proc(), std::process::id());
    assert_eq!(body, expected);

    tx.send(()).unwrap();
    task.await.unwrap().unwrap();
}

#[test]
fn identities_redact_their_keys() {
    let ca = TestCa::new("example.org");
    let leaf = ca.leaf("/agent");
    let shown = format!("{:?} {:?}", leaf.server_identity(), leaf.client_identity());
    assert!(shown.contains("<redacted>"), "{shown}");
    assert!(format!("{:?}", ClientIdentity::none()).contains("anonymous"));
}

#[test]
fn empty_chain_is_refused() {
    let ca = TestCa::new("example.org");
    let leaf = ca.leaf("/agent");
    assert!(matches!(
        crate::ServerIdentity::new(vec![], &leaf.key),
        Err(TlsError::EmptyChain)
    ));
}

#[tokio::test]
async fn server_never_resumes_a_session() {
    // A client that would resume if the server let it: every handshake must
    // still be full, so the client verifier (and revocation) always runs.
    let ca = TestCa::new("example.org");
    let server = start_for(&ca, ca.bundles(), ClientAuth::Required).await;
    let leaf = ca.leaf("/agent");
    let policy = PeerPolicy::Exact(vec![SERVER_ID.parse().unwrap()]);
    let mut config = client_config(leaf.client_identity(), ca.bundles(), policy).unwrap();
    config.resumption = rustls::client::Resumption::in_memory_sessions(16);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    for _ in 0..3 {
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("ignored.invalid").unwrap();
        let mut tls = connector.connect(name, tcp).await.unwrap();
        tls.write_all(b"GET /whoami HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut response = String::new();
        tls.read_to_string(&mut response).await.unwrap();
        assert!(
            response.ends_with("spiffe://example.org/agent"),
            "{response}"
        );
        assert_eq!(
            tls.get_ref().1.handshake_kind(),
            Some(rustls::HandshakeKind::Full)
        );
    }
    server.stop().await;
}
