use std::fmt;
use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::SignatureScheme;
use rustls::client::ResolvesClientCert;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::TlsError;

/// Loads a chain and its PKCS#8 key, refusing a key that does not match
/// the leaf (a rotation that pairs the wrong files must fail loudly, not at
/// the next handshake).
fn certified_key(chain_der: Vec<Vec<u8>>, pkcs8_der: &[u8]) -> Result<Arc<CertifiedKey>, TlsError> {
    if chain_der.is_empty() {
        return Err(TlsError::EmptyChain);
    }
    let chain: Vec<CertificateDer<'static>> =
        chain_der.into_iter().map(CertificateDer::from).collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(pkcs8_der.to_vec()));
    CertifiedKey::from_der(chain, key, &crate::provider())
        .map(Arc::new)
        .map_err(TlsError::Key)
}

/// Our server certificate and key, replaceable at run time.
///
/// Clones share the same slot: [`replace`](Self::replace) on one applies to
/// the next handshake of every config built from any clone.
#[derive(Clone)]
pub struct ServerIdentity {
    current: Arc<ArcSwap<CertifiedKey>>,
}

impl ServerIdentity {
    /// `chain_der` is leaf first; `pkcs8_der` is the leaf's key.
    pub fn new(chain_der: Vec<Vec<u8>>, pkcs8_der: &[u8]) -> Result<Self, TlsError> {
        Ok(Self {
            current: Arc::new(ArcSwap::new(certified_key(chain_der, pkcs8_der)?)),
        })
    }

    /// Swaps in a new chain and key (rotation). On error the old pair stays.
    pub fn replace(&self, chain_der: Vec<Vec<u8>>, pkcs8_der: &[u8]) -> Result<(), TlsError> {
        self.current.store(certified_key(chain_der, pkcs8_der)?);
        Ok(())
    }
}

impl ResolvesServerCert for ServerIdentity {
    fn resolve(&self, _client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

impl fmt::Debug for ServerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerIdentity")
            .field("chain_len", &self.current.load().cert.len())
            .field("key", &"<redacted>")
            .finish()
    }
}

/// Our client certificate and key for mTLS, replaceable at run time;
/// [`none`](Self::none) for a client that connects without one.
#[derive(Clone)]
pub struct ClientIdentity {
    current: Arc<ArcSwapOption<CertifiedKey>>,
}

impl ClientIdentity {
    /// `chain_der` is leaf first; `pkcs8_der` is the leaf's key.
    pub fn new(chain_der: Vec<Vec<u8>>, pkcs8_der: &[u8]) -> Result<Self, TlsError> {
        Ok(Self {
            current: Arc::new(ArcSwapOption::new(Some(certified_key(
                chain_der, pkcs8_der,
            )?))),
        })
    }

    /// An anonymous client (e.g. join-token attestation, before the node
    /// has an SVID). [`replace`](Self::replace) can give it one later.
    pub fn none() -> Self {
        Self {
            current: Arc::new(ArcSwapOption::empty()),
        }
    }

    /// Swaps in a new chain and key (rotation). On error the old pair stays.
    pub fn replace(&self, chain_der: Vec<Vec<u8>>, pkcs8_der: &[u8]) -> Result<(), TlsError> {
        self.current
            .store(Some(certified_key(chain_der, pkcs8_der)?));
        Ok(())
    }

    /// Drops the certificate: later handshakes are anonymous.
    pub fn clear(&self) {
        self.current.store(None);
    }
}

impl ResolvesClientCert for ClientIdentity {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.current.load_full()
    }

    fn has_certs(&self) -> bool {
        self.current.load().is_some()
    }
}

impl fmt::Debug for ClientIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let current = self.current.load();
        let mut d = f.debug_struct("ClientIdentity");
        match current.as_ref() {
            Some(ck) => d
                .field("chain_len", &ck.cert.len())
                .field("key", &"<redacted>"),
            None => d.field("anonymous", &true),
        };
        d.finish()
    }
}
