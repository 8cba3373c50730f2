//! A revoked peer cannot slip through a resumed TLS session: the tool
//! server issues no tickets and keeps no session cache, so a client that
//! asks to resume always gets a full handshake (and its revoked token is
//! refused on that connection).

use std::sync::Arc;
use std::time::Duration;

use baton_tls::{BundleStore, PeerPolicy};
use rustls::HandshakeKind;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::delegation::{PLANNER, World};
use crate::harness::{Redis, wait_for};

/// A client that WANTS to resume (rustls keeps sessions in memory by default),
/// presenting the credential in `dir` and trusting the bundle in `dir`.
fn resuming_client(dir: &std::path::Path) -> Arc<rustls::ClientConfig> {
    mtls_client(dir, &dir.join("bundle.pem"))
}

/// An mTLS client presenting `dir`'s svid.pem/key.pem (as written by
/// `baton svid fetch --write` or `baton grant redeem`), trusting `trust`.
pub fn mtls_client(dir: &std::path::Path, trust: &std::path::Path) -> Arc<rustls::ClientConfig> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(dir.join("svid.pem"))
        .unwrap()
        .map(|c| c.unwrap())
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from_pem_file(dir.join("key.pem")).unwrap());
    let bundle: Vec<Vec<u8>> = CertificateDer::pem_file_iter(trust)
        .unwrap()
        .map(|c| c.unwrap().to_vec())
        .collect();
    let store = BundleStore::new();
    let td = baton_core::TrustDomain::new("example.org").unwrap();
    store.set(td.clone(), bundle);
    let verifier = Arc::new(baton_tls::SpiffeServerVerifier::new(
        store,
        PeerPolicy::AnyInTrustDomains(vec![td]),
    ));
    let cfg = rustls::ClientConfig::builder_with_provider(baton_tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(chain, key)
        .unwrap();
    Arc::new(cfg)
}

/// One HTTP/1.1 call on a fresh TLS connection; returns (handshake kind, status line).
async fn call(
    cfg: &Arc<rustls::ClientConfig>,
    addr: &str,
    token: &str,
) -> (Option<HandshakeKind>, String) {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(cfg.clone());
    let mut tls = connector
        .connect(ServerName::try_from("tool.example.org").unwrap(), tcp)
        .await
        .unwrap();
    let kind = tls.get_ref().1.handshake_kind();
    let req = format!(
        "POST /tools/crm.search HTTP/1.1\r\nHost: tool\r\nAuthorization: Bearer {token}\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{{}}"
    );
    tls.write_all(req.as_bytes()).await.unwrap();
    let mut resp = Vec::new();
    let _ = tls.read_to_end(&mut resp).await;
    let text = String::from_utf8_lossy(&resp).into_owned();
    (kind, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_peer_cannot_resume_a_tls_session() {
    baton_tls::install_crypto_provider();
    let redis = Redis::start();
    let w = tokio::task::spawn_blocking({
        let url = redis.url.clone();
        move || World::start_with(Some(&url))
    })
    .await
    .unwrap();
    let (task, grant) = w.start_task(
        &["tool:crm.search:read", "dataset:crm:read"],
        "2",
        "10m",
        "read",
    );
    let planner = w.redeem(&grant, PLANNER, "planner");
    let hop = w.delegate(
        &planner,
        crate::delegation::RESEARCHER,
        &["tool:crm.search:read"],
        &[],
    );
    let g: serde_json::Value = serde_json::from_slice(&hop.stdout).unwrap();
    let researcher = w.redeem(
        g["grant"].as_str().unwrap(),
        crate::delegation::RESEARCHER,
        "researcher",
    );
    let token = std::fs::read_to_string(researcher.join("token")).unwrap();
    let cfg = resuming_client(&researcher);
    let addr = w.tool_url.trim_start_matches("https://").to_owned();

    // Works before revocation (once the tool server's feed is fresh).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (kind, resp) = call(&cfg, &addr, token.trim()).await;
        assert_eq!(kind, Some(HandshakeKind::Full));
        if resp.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never allowed: {resp}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    w.ok(&["task", "end", &task]);
    // The client asks to resume; the server never lets it: every handshake
    // is full, so the certificate is verified again and the token refused.
    let refused = wait_for(
        "revocation at the tool server",
        Duration::from_secs(30),
        || {
            let (kind, resp) = tokio::task::block_in_place(|| {
                tokio::runtime::Handle::current().block_on(call(&cfg, &addr, token.trim()))
            });
            assert_eq!(kind, Some(HandshakeKind::Full), "a TLS session was resumed");
            resp.contains("revoked").then_some(resp)
        },
    );
    assert!(refused.contains("revoked"), "{refused}");
    drop(redis);
}
