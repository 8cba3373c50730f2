//! What a tool server needs from `baton-tls`: a server config that demands
//! a client SVID, and the verified peer as a [`PeerCert`].

use std::sync::Arc;

use baton_core::TrustDomain;
use baton_tls::rustls::{CommonState, ServerConfig};
use baton_tls::{
    BundleStore, ClientAuth, PeerCertificate, PeerIdentity, PeerPolicy, ServerIdentity, TlsError,
};

use crate::error::PeerError;
use crate::token::PeerCert;

/// A rustls server config for a tool server: client certificate required,
/// any SPIFFE ID of `allowed` trust domains (with a bundle in `bundles`)
/// may connect, no session resumption (every connection runs the verifier).
/// Which agent may call which tool is decided per call by the token and the
/// policy, not here.
pub fn tool_server_config(
    identity: ServerIdentity,
    bundles: BundleStore,
    allowed: Vec<TrustDomain>,
) -> Result<Arc<ServerConfig>, TlsError> {
    baton_tls::server_config(
        identity,
        bundles,
        PeerPolicy::AnyInTrustDomains(allowed),
        ClientAuth::Required,
    )
}

impl PeerCert {
    /// The peer of a rustls connection whose handshake completed with a
    /// config from [`tool_server_config`] (so its verifier accepted the
    /// client certificate). Pass `&conn` for a `ServerConnection`, or
    /// `tls_stream.get_ref().1` for a tokio-rustls stream.
    pub fn from_connection(conn: &CommonState) -> Result<Self, PeerError> {
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or(PeerError::NoCertificate)?;
        Self::from_verified_leaf(leaf.as_ref().to_vec())
    }

    /// For warp routes behind `baton_tls::serve_https`: the verified
    /// [`PeerIdentity`] and [`PeerCertificate`] that the accept loop put in
    /// the request's extensions from the same handshake. Costs one SHA-256
    /// of the leaf and one parse for its serial.
    pub fn from_extensions(
        identity: &PeerIdentity,
        cert: &PeerCertificate,
    ) -> Result<Self, PeerError> {
        let spiffe_id = identity.0.clone().ok_or(PeerError::NoCertificate)?;
        Self::from_parts(spiffe_id, cert.0.clone())
    }
}
