//! The tool server's mTLS config and reading the peer off the connection.

use std::io::Cursor;
use std::sync::Arc;

use baton_tls::rustls::pki_types::ServerName;
use baton_tls::rustls::{ClientConnection, ServerConnection};
use baton_tls::{
    BundleStore, ClientIdentity, PeerCertificate, PeerIdentity, PeerPolicy, ServerIdentity,
};
use baton_verify::{PeerCert, PeerError, TokenVerifier, tool_server_config};

use crate::common::*;

fn real_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn handshake(
    client: &mut ClientConnection,
    server: &mut ServerConnection,
) -> Result<(), baton_tls::rustls::Error> {
    for _ in 0..10 {
        let mut buf = Vec::new();
        while client.wants_write() {
            client.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            server.read_tls(&mut Cursor::new(&buf)).unwrap();
            server.process_new_packets()?;
        }
        let mut buf = Vec::new();
        while server.wants_write() {
            server.write_tls(&mut buf).unwrap();
        }
        if !buf.is_empty() {
            client.read_tls(&mut Cursor::new(&buf)).unwrap();
            client.process_new_packets()?;
        }
        if !client.is_handshaking() && !server.is_handshaking() {
            return Ok(());
        }
    }
    panic!("handshake did not complete");
}

#[test]
fn tool_server_reads_the_verified_peer_and_its_token_verifies() {
    let f = Fixture::new_at(real_now());
    let tool_id = id("spiffe://example.org/tools/crm");
    let tool_svid = issue(&f.ca, &tool_id, f.now);
    let store = BundleStore::new();
    store.set(f.td.clone(), f.ca.bundle().x509_authorities);

    let server_config = tool_server_config(
        ServerIdentity::new(tool_svid.chain.clone(), &tool_svid.key).unwrap(),
        store.clone(),
        vec![f.td.clone()],
    )
    .unwrap();
    let client_config = baton_tls::client_config(
        ClientIdentity::new(f.summarizer_svid.chain.clone(), &f.summarizer_svid.key).unwrap(),
        store,
        PeerPolicy::Exact(vec![tool_id]),
    )
    .unwrap();
    let mut server = ServerConnection::new(server_config).unwrap();
    let mut client = ClientConnection::new(
        Arc::new(client_config),
        ServerName::try_from("crm-tool.invalid").unwrap(),
    )
    .unwrap();
    handshake(&mut client, &mut server).unwrap();

    let peer = PeerCert::from_connection(&server).unwrap();
    assert_eq!(peer.spiffe_id(), &f.summarizer);
    assert_eq!(peer.leaf_der(), f.summarizer_svid.leaf());
    assert_eq!(
        peer.thumbprint(),
        baton_ca::cert_thumbprint(f.summarizer_svid.leaf())
    );
    TokenVerifier::dangerous_without_revocation(f.bundles.clone(), AUDIENCE.into())
        .verify(&f.token(), &peer, f.now)
        .unwrap();

    // The warp path: the two extensions baton-tls's accept loop sets.
    let from_ext = PeerCert::from_extensions(
        &PeerIdentity(Some(f.summarizer.clone())),
        &PeerCertificate(f.summarizer_svid.leaf().to_vec()),
    )
    .unwrap();
    assert_eq!(from_ext, peer);
    assert_eq!(
        PeerCert::from_extensions(&PeerIdentity(None), &PeerCertificate(vec![])).unwrap_err(),
        PeerError::NoCertificate
    );
    assert!(matches!(
        PeerCert::from_verified_leaf(b"not a certificate".to_vec()),
        Err(PeerError::NotAnSvid(_))
    ));
}

#[test]
fn tool_server_refuses_clients_without_a_certificate() {
    let f = Fixture::new_at(real_now());
    let tool_id = id("spiffe://example.org/tools/crm");
    let tool_svid = issue(&f.ca, &tool_id, f.now);
    let store = BundleStore::new();
    store.set(f.td.clone(), f.ca.bundle().x509_authorities);
    let server_config = tool_server_config(
        ServerIdentity::new(tool_svid.chain.clone(), &tool_svid.key).unwrap(),
        store.clone(),
        vec![f.td.clone()],
    )
    .unwrap();
    // A client that presents no certificate.
    let verifier = Arc::new(baton_tls::SpiffeServerVerifier::new(
        store,
        PeerPolicy::Exact(vec![tool_id]),
    ));
    let client_config =
        baton_tls::rustls::ClientConfig::builder_with_provider(baton_tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
    let mut server = ServerConnection::new(server_config).unwrap();
    let mut client = ClientConnection::new(
        Arc::new(client_config),
        ServerName::try_from("crm-tool.invalid").unwrap(),
    )
    .unwrap();
    let err = handshake(&mut client, &mut server).unwrap_err();
    assert!(
        matches!(err, baton_tls::rustls::Error::NoCertificatesPresented),
        "{err:?}"
    );
}
