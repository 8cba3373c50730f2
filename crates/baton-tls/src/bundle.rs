use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use baton_core::TrustDomain;
use rustls_pki_types::{CertificateDer, TrustAnchor};

use crate::TlsError;

/// One trust domain's authorities, kept both as DER (for callers that
/// re-publish the bundle) and parsed (so a handshake does not re-parse).
#[derive(Debug)]
pub(crate) struct Authorities {
    pub(crate) der: Arc<Vec<CertificateDer<'static>>>,
    pub(crate) anchors: Vec<TrustAnchor<'static>>,
}

type Map = HashMap<TrustDomain, Arc<Authorities>>;

/// Trust anchors per trust domain, swappable at run time.
///
/// Verifiers look the peer's trust domain up here at handshake time, so a
/// [`set`](Self::set) or [`remove`](Self::remove) applies to the next
/// handshake of every listener and client sharing this store. Cloning gives
/// another handle on the same store.
#[derive(Clone, Default)]
pub struct BundleStore {
    inner: Arc<ArcSwap<Map>>,
}

impl BundleStore {
    /// An empty store: every peer is refused until a bundle is set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the authorities of `td`.
    ///
    /// Certificates that cannot serve as trust anchors are dropped with a
    /// warning rather than failing the whole update, so one bad entry in a
    /// federated bundle does not cut off the others; use
    /// [`try_set`](Self::try_set) to refuse such a bundle instead.
    pub fn set(&self, td: TrustDomain, authorities_der: Vec<Vec<u8>>) {
        let der: Vec<CertificateDer<'static>> = authorities_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let mut anchors = Vec::with_capacity(der.len());
        for cert in &der {
            match webpki::anchor_from_trusted_cert(cert) {
                Ok(anchor) => anchors.push(anchor.to_owned()),
                Err(err) => {
                    tracing::warn!(trust_domain = %td, error = %err, "dropping unusable trust anchor");
                }
            }
        }
        self.insert(td, der, anchors);
    }

    /// Like [`set`](Self::set), but refuses the whole bundle if any
    /// certificate cannot serve as a trust anchor.
    pub fn try_set(&self, td: TrustDomain, authorities_der: Vec<Vec<u8>>) -> Result<(), TlsError> {
        let der: Vec<CertificateDer<'static>> = authorities_der
            .into_iter()
            .map(CertificateDer::from)
            .collect();
        let mut anchors = Vec::with_capacity(der.len());
        for cert in &der {
            let anchor =
                webpki::anchor_from_trusted_cert(cert).map_err(|err| TlsError::BadTrustAnchor {
                    td: td.clone(),
                    reason: err.to_string(),
                })?;
            anchors.push(anchor.to_owned());
        }
        self.insert(td, der, anchors);
        Ok(())
    }

    fn insert(
        &self,
        td: TrustDomain,
        der: Vec<CertificateDer<'static>>,
        anchors: Vec<TrustAnchor<'static>>,
    ) {
        let entry = Arc::new(Authorities {
            der: Arc::new(der),
            anchors,
        });
        self.inner.rcu(|map| {
            let mut map = Map::clone(map);
            map.insert(td.clone(), entry.clone());
            map
        });
    }

    /// The authorities of `td` as DER, if any are set.
    pub fn get(&self, td: &TrustDomain) -> Option<Arc<Vec<CertificateDer<'static>>>> {
        self.inner.load().get(td).map(|a| a.der.clone())
    }

    /// Forgets `td`: its peers are refused from the next handshake on.
    pub fn remove(&self, td: &TrustDomain) {
        self.inner.rcu(|map| {
            let mut map = Map::clone(map);
            map.remove(td);
            map
        });
    }

    /// The trust domains that currently have a bundle.
    pub fn trust_domains(&self) -> Vec<TrustDomain> {
        let mut tds: Vec<_> = self.inner.load().keys().cloned().collect();
        tds.sort();
        tds
    }

    pub(crate) fn authorities(&self, td: &TrustDomain) -> Option<Arc<Authorities>> {
        self.inner.load().get(td).cloned()
    }
}

impl fmt::Debug for BundleStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self.inner.load();
        let mut d = f.debug_map();
        let mut tds: Vec<_> = map.iter().collect();
        tds.sort_by(|a, b| a.0.cmp(b.0));
        for (td, a) in tds {
            d.entry(&td.as_str(), &a.der.len());
        }
        d.finish()
    }
}
