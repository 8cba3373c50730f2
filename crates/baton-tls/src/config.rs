use std::sync::Arc;

use rustls::client::Resumption;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, ServerConfig};

use crate::{
    BundleStore, ClientIdentity, PeerPolicy, ServerIdentity, SpiffeClientVerifier,
    SpiffeServerVerifier, TlsError,
};

/// ALPN offered by both sides: HTTP/2 first, HTTP/1.1 as fallback.
pub const ALPN_PROTOCOLS: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Whether a server demands a client certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    /// No certificate, no connection.
    Required,
    /// A client may connect anonymously (it then gets
    /// `PeerIdentity(None)`); a client that does present a certificate
    /// must still pass verification.
    Optional,
}

fn alpn() -> Vec<Vec<u8>> {
    ALPN_PROTOCOLS.iter().map(|p| p.to_vec()).collect()
}

/// A server config with SPIFFE client verification and no resumption.
///
/// Tickets and the session cache are off so that every connection runs the
/// client verifier (and with it any revocation check); rustls skips the
/// verifier on a resumed session.
pub fn server_config(
    identity: ServerIdentity,
    bundles: BundleStore,
    policy: PeerPolicy,
    client_auth: ClientAuth,
) -> Result<Arc<ServerConfig>, TlsError> {
    let verifier = SpiffeClientVerifier::new(bundles, policy, client_auth);
    let mut config = ServerConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(identity));
    config.alpn_protocols = alpn();
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    // The builder's default ticketer never issues tickets; keep it that way.
    Ok(Arc::new(config))
}

/// A client config that checks the server's SPIFFE ID, not its DNS name.
///
/// Resumption is off for the same reason as on the server. ALPN is set to
/// `h2`, `http/1.1`: reqwest's `tls_backend_preconfigured` uses the config
/// as given and picks HTTP/2 only if ALPN negotiates it. A caller that
/// forces reqwest to HTTP/1 (`http1_only`) must also set `alpn_protocols`
/// to `http/1.1` alone, or the server will pick `h2` and the two disagree.
pub fn client_config(
    identity: ClientIdentity,
    bundles: BundleStore,
    server_policy: PeerPolicy,
) -> Result<ClientConfig, TlsError> {
    let verifier = SpiffeServerVerifier::new(bundles, server_policy);
    let mut config = ClientConfig::builder_with_provider(crate::provider())
        .with_safe_default_protocol_versions()
        .map_err(TlsError::Config)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(identity));
    config.alpn_protocols = alpn();
    config.resumption = Resumption::disabled();
    Ok(config)
}
