//! The one place where Baton speaks TLS.
//!
//! Place in the flow: the CA (`baton-ca`) mints X509-SVIDs and trust
//! bundles; the broker and the agents hand them to this crate as DER bytes.
//! Here they become rustls configs whose verifiers check SPIFFE identities
//! ([`verify_svid`]), and [`serve_https`] / [`serve_unix`] run the warp
//! routes of every Baton listener, putting the verified caller into each
//! request's extensions ([`PeerIdentity`], [`UnixPeer`]). Routes never see a
//! certificate, only an already-verified SPIFFE ID.
//!
//! Trust bundles ([`BundleStore`]) and our own certificates
//! ([`ServerIdentity`], [`ClientIdentity`]) are swappable at run time: a
//! rotation or a bundle update applies to the next handshake without
//! restarting a listener. TLS session resumption is off on both sides, so
//! every connection goes through the verifier (a resumed session would skip
//! it, and with it any revocation check).
//!
//! Every rustls object is built with the aws-lc-rs provider from
//! [`provider()`], never the process default, so a second provider in the
//! dependency tree cannot make a builder panic.
//!
//! # Calling convention
//!
//! ```no_run
//! use baton_core::TrustDomain;
//! use baton_tls::{BundleStore, ClientAuth, PeerIdentity, PeerPolicy, ServerIdentity};
//! use warp::Filter;
//!
//! # async fn run(chain: Vec<Vec<u8>>, key: Vec<u8>, ca: Vec<u8>) -> Result<(), Box<dyn std::error::Error>> {
//! let td: TrustDomain = "example.org".parse()?;
//! let bundles = BundleStore::new();
//! bundles.set(td.clone(), vec![ca]);
//! let identity = ServerIdentity::new(chain, &key)?;
//! let config = baton_tls::server_config(
//!     identity,
//!     bundles,
//!     PeerPolicy::AnyInTrustDomains(vec![td]),
//!     ClientAuth::Required,
//! )?;
//! // Routes read the caller with `warp::ext::get::<PeerIdentity>()`.
//! let route = warp::path("whoami")
//!     .and(warp::ext::get::<PeerIdentity>())
//!     .map(|peer: PeerIdentity| match peer.0 {
//!         Some(id) => id.to_string(),
//!         None => "anonymous".to_owned(),
//!     });
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8443").await?;
//! baton_tls::serve_https(listener, config, route, async {
//!     let _ = tokio::signal::ctrl_c().await;
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! On the client side, [`client_config`] returns a `rustls::ClientConfig`
//! ready for `reqwest::ClientBuilder::tls_backend_preconfigured` (ALPN
//! `h2`, `http/1.1` already set; reqwest does not touch a preconfigured
//! config).

mod bundle;
mod config;
mod error;
mod identity;
mod serve;
mod socket_file;
mod svid;
#[cfg(test)]
mod testutil;
mod verifier;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

pub use bundle::BundleStore;
pub use config::{ALPN_PROTOCOLS, ClientAuth, client_config, server_config};
pub use error::{SocketFileError, SvidError, TlsError};
pub use identity::{ClientIdentity, ServerIdentity};
pub use serve::{
    HANDSHAKE_TIMEOUT, PeerCertificate, PeerIdentity, RemoteAddr, SHUTDOWN_GRACE, ServeLimits,
    UnixPeer, serve_https, serve_https_with, serve_unix, serve_unix_with,
};
pub use socket_file::{BoundSocket, bind_unix_socket};
pub use svid::{PeerPolicy, VerifiedSvid, verify_svid};
pub use verifier::{SpiffeClientVerifier, SpiffeServerVerifier};

// Re-exported so callers name the same versions this crate was built with.
pub use rustls;
pub use rustls_pki_types::{CertificateDer, UnixTime};

/// Installs aws-lc-rs as the process-wide rustls `CryptoProvider`.
///
/// Idempotent and never panics: if a provider is already installed (ours
/// or another), that one stays. Nothing in this crate depends on the global
/// provider; this is for third-party code (reqwest with
/// `rustls-no-provider`, the `spiffe` client) that builds its own configs.
pub fn install_crypto_provider() {
    // An Err only means a provider was already installed, which is fine.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

/// The aws-lc-rs provider every config of this crate is built with.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::aws_lc_rs::default_provider()))
        .clone()
}
