//! The broker's node port refuses what it must: CSRs for entries the node is
//! not entitled to, garbage bytes, certificates from another trust domain,
//! anonymous callers and workloads posing as nodes.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, SystemTime};

use baton_core::api::{SignX509Item, SignX509Request, SignX509Response};
use baton_core::{EntryId, SpiffeId, TrustDomain};
use baton_tls::{BundleStore, ClientIdentity, PeerPolicy};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::harness::{Cluster, Options, TD, wait_for_async};

fn td() -> TrustDomain {
    TrustDomain::new(TD).unwrap()
}

fn client(c: &Cluster, identity: ClientIdentity) -> reqwest::Client {
    baton_tls::install_crypto_provider();
    let bundles = BundleStore::new();
    let pem = std::fs::read_to_string(c.path("broker/bundle.pem")).unwrap();
    let anchors = CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.unwrap().to_vec())
        .collect();
    bundles.set(td(), anchors);
    let broker = td().id("/baton/broker").unwrap();
    let tls = baton_tls::client_config(identity, bundles, PeerPolicy::Exact(vec![broker])).unwrap();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap()
}

fn node_identity(c: &Cluster) -> ClientIdentity {
    let pem = std::fs::read(c.path("agent/agent-svid.pem")).unwrap();
    let chain = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.unwrap().to_vec())
        .collect();
    let key = std::fs::read(c.path("agent/agent-key.pk8")).unwrap();
    ClientIdentity::new(chain, &key).unwrap()
}

fn csr_for(id: &str) -> Vec<u8> {
    baton_ca::WorkloadKey::generate()
        .unwrap()
        .csr_der(&SpiffeId::parse(id).unwrap())
        .unwrap()
}

async fn sign(
    c: &Cluster,
    http: &reqwest::Client,
    entry_id: &str,
    csr: Vec<u8>,
) -> Result<reqwest::Response, reqwest::Error> {
    let req = SignX509Request {
        items: vec![SignX509Item {
            entry_id: EntryId::parse(entry_id).unwrap(),
            csr_der: csr,
        }],
    };
    http.post(format!("https://{}/v1/node/sign-x509", c.broker_addr))
        .json(&req)
        .send()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_port_refusals() {
    let c = Cluster::start(Options::default());
    let node = client(&c, node_identity(&c));

    // Entitled: the SVID carries the entry's ID, whatever the CSR asked for.
    let mine = c.register("/mine", &[]);
    let resp = sign(
        &c,
        &node,
        mine["id"].as_str().unwrap(),
        csr_for("spiffe://example.org/evil"),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 200);
    let signed: SignX509Response = resp.json().await.unwrap();
    assert_eq!(
        signed.svids[0].spiffe_id.as_str(),
        "spiffe://example.org/mine"
    );

    // Not entitled: the entry belongs to another node.
    let sel = format!("unix:uid:{}", crate::harness::own_uid());
    let theirs = c.cli_json(&[
        "entry",
        "create",
        "--spiffe-id",
        "spiffe://example.org/theirs",
        "--parent-id",
        "spiffe://example.org/baton/node/other",
        "--selector",
        &sel,
    ])["entries"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let resp = sign(&c, &node, &theirs, csr_for("spiffe://example.org/theirs"))
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["code"], "not_entitled", "{err}");
    assert!(
        err["message"]
            .as_str()
            .unwrap()
            .contains("spiffe://example.org/baton/node/other")
    );

    // A bad CSR is a clear error naming the field.
    let resp = sign(
        &c,
        &node,
        mine["id"].as_str().unwrap(),
        b"not a csr".to_vec(),
    )
    .await
    .unwrap();
    assert_eq!(resp.status(), 400);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["field"], "csr_der", "{err}");

    // Anonymous callers reach only the public routes.
    let anon = client(&c, ClientIdentity::none());
    let resp = anon
        .get(format!("https://{}/v1/node/sync", c.broker_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let bundle = anon
        .get(format!("https://{}/v1/bundle", c.broker_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(bundle.status(), 200);

    // A workload SVID of the right trust domain is not a node.
    let wl = spiffe::WorkloadApiClient::connect_to(c.endpoint())
        .await
        .unwrap();
    let svid = wait_for_async("workload SVID", Duration::from_secs(30), || async {
        wl.fetch_x509_svid().await.ok()
    })
    .await;
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let workload = client(
        &c,
        ClientIdentity::new(chain, svid.private_key().as_bytes()).unwrap(),
    );
    let resp = workload
        .get(format!("https://{}/v1/node/sync", c.broker_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(err["code"], "not_a_node", "{err}");

    // A certificate from another trust domain is refused at the handshake.
    let other = baton_ca::Ca::load_or_create(
        baton_ca::CaConfig::new(TrustDomain::new("other.org").unwrap()),
        SystemTime::now(),
    )
    .unwrap();
    let key = baton_ca::WorkloadKey::generate().unwrap();
    let foreign_id = SpiffeId::parse("spiffe://other.org/baton/node/x").unwrap();
    let issued = other
        .sign_x509_svid(
            &key.csr_der(&foreign_id).unwrap(),
            &foreign_id,
            Duration::from_secs(600),
            &[],
            SystemTime::now(),
        )
        .unwrap();
    let foreign = client(
        &c,
        ClientIdentity::new(issued.cert_chain_der, key.pkcs8_der()).unwrap(),
    );
    let refused = foreign
        .get(format!("https://{}/v1/node/sync", c.broker_addr))
        .send()
        .await;
    assert!(
        refused.is_err(),
        "foreign certificate was accepted: {refused:?}"
    );
    // The broker logs why (the log line may land just after the client gave up).
    crate::harness::wait_for(
        "the refusal in the broker log",
        Duration::from_secs(10),
        || {
            c.broker
                .as_ref()
                .unwrap()
                .log_text()
                .contains("other.org")
                .then_some(())
        },
    );

    // Garbage on the TLS port: the connection dies, the broker does not.
    for garbage in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5],
        &[0xff; 2048],
    ] {
        let mut s = TcpStream::connect(&c.broker_addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = s.write_all(garbage);
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    let resp = node
        .get(format!("https://{}/v1/node/sync", c.broker_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "broker still serves after garbage");
}
