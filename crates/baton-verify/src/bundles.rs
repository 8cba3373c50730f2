//! The JWT authorities that may sign delegation tokens, per trust domain,
//! swappable at run time.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ParsedPublicKey};
use baton_ca::TrustBundle;
use baton_core::TrustDomain;

/// One broker signing key, parsed once when the bundle is set.
pub(crate) struct JwtKey {
    pub(crate) kid: String,
    pub(crate) key: ParsedPublicKey,
}

type Map = HashMap<TrustDomain, Arc<[Arc<JwtKey>]>>;

/// The JWT authorities of each trusted trust domain.
///
/// [`set`](Self::set) and [`remove`](Self::remove) apply to the next
/// verification of every [`crate::TokenVerifier`] sharing this value (clones
/// share the store), including tokens already in a verifier's cache: a hit
/// re-checks that the key that signed the token is still published, so
/// dropping a key from the bundle refuses its tokens at once.
#[derive(Clone, Default)]
pub struct JwtBundles {
    inner: Arc<ArcSwap<Map>>,
}

impl JwtBundles {
    /// A store holding `bundles`' JWT authorities.
    pub fn new(bundles: impl IntoIterator<Item = TrustBundle>) -> Self {
        let store = Self::default();
        for b in bundles {
            store.set(&b);
        }
        store
    }

    /// Replaces the JWT authorities of `bundle.trust_domain`.
    ///
    /// Keys that are not 65-byte uncompressed P-256 points are dropped with
    /// a warning (tokens they signed then fail as an unknown kid), so one bad
    /// key in a federated bundle does not cut the others off.
    pub fn set(&self, bundle: &TrustBundle) {
        let mut keys = Vec::with_capacity(bundle.jwt_authorities.len());
        for a in &bundle.jwt_authorities {
            match ParsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &a.public_key) {
                Ok(key) if a.public_key.len() == 65 && !a.kid.is_empty() => {
                    keys.push(Arc::new(JwtKey {
                        kid: a.kid.clone(),
                        key,
                    }));
                }
                _ => tracing::warn!(
                    trust_domain = %bundle.trust_domain,
                    kid = %a.kid,
                    "dropping JWT authority that is not a P-256 public key"
                ),
            }
        }
        let td = bundle.trust_domain.clone();
        let keys: Arc<[Arc<JwtKey>]> = keys.into();
        self.inner.rcu(|map| {
            let mut map = Map::clone(map);
            map.insert(td.clone(), keys.clone());
            map
        });
    }

    /// Forgets `td`: its tokens are refused from the next verification on.
    pub fn remove(&self, td: &TrustDomain) {
        self.inner.rcu(|map| {
            let mut map = Map::clone(map);
            map.remove(td);
            map
        });
    }

    /// The trust domains that currently have JWT authorities.
    pub fn trust_domains(&self) -> Vec<TrustDomain> {
        let mut tds: Vec<_> = self.inner.load().keys().cloned().collect();
        tds.sort();
        tds
    }

    /// `None` when the trust domain has no bundle; `Some(None)` when the
    /// bundle does not hold `kid`.
    pub(crate) fn key(&self, td: &TrustDomain, kid: &str) -> Option<Option<Arc<JwtKey>>> {
        let map = self.inner.load();
        let keys = map.get(td)?;
        Some(keys.iter().find(|k| k.kid == kid).cloned())
    }
}

impl fmt::Debug for JwtBundles {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self.inner.load();
        let mut tds: Vec<_> = map.iter().collect();
        tds.sort_by(|a, b| a.0.cmp(b.0));
        let mut d = f.debug_map();
        for (td, keys) in tds {
            let kids: Vec<&str> = keys.iter().map(|k| k.kid.as_str()).collect();
            d.entry(&td.as_str(), &kids);
        }
        d.finish()
    }
}
