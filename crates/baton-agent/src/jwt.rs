//! JWT-SVIDs for the Workload API: minted by the broker on request, cached
//! per (entry, audience set) until half their life, and validated locally
//! against the node's copy of the trust bundle.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use baton_core::{Entry, Secret};
use tonic::Status;

use crate::cache::{BundleView, CachedJwt, JwtCache, Snapshot, UsableKeys};
use crate::client::{BrokerClient, ClientError};
use crate::workload::{JwtAuthority, JwtClaims};

/// The node daemon's [`JwtAuthority`].
#[derive(Debug)]
pub struct BrokerJwt {
    client: Arc<BrokerClient>,
    cache: Mutex<JwtCache>,
    tainted: tokio::sync::watch::Receiver<crate::cache::Tainted>,
    snapshot: tokio::sync::watch::Receiver<Arc<Snapshot>>,
}

impl BrokerJwt {
    /// Mints through `client`. A cached token is served only while its key
    /// is in the bundle of `snapshot` and not in `tainted`.
    pub fn new(
        client: Arc<BrokerClient>,
        tainted: tokio::sync::watch::Receiver<crate::cache::Tainted>,
        snapshot: tokio::sync::watch::Receiver<Arc<Snapshot>>,
    ) -> Self {
        Self {
            client,
            cache: Mutex::new(JwtCache::default()),
            tainted,
            snapshot,
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, JwtCache> {
        // The cache holds no invariant a panic could break half-way.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Which keys may sign a served token right now: the current taints
    /// and the bundle's JWT keys, as the last sync applied them.
    fn keys(&self) -> UsableKeys {
        UsableKeys {
            tainted: Arc::clone(&self.tainted.borrow()),
            bundle: self.snapshot.borrow().bundle().cloned(),
        }
    }
}

fn to_status(e: &ClientError) -> Status {
    match e.status() {
        Some(401 | 403 | 404) => {
            Status::permission_denied(format!("the broker refused a JWT-SVID: {e}"))
        }
        Some(400) => Status::invalid_argument(format!("the broker refused a JWT-SVID: {e}")),
        _ => Status::unavailable(format!("cannot get a JWT-SVID from the broker: {e}")),
    }
}

impl JwtAuthority for BrokerJwt {
    async fn fetch_jwt(
        &self,
        entry: &Entry,
        audience: &[String],
        now: u64,
    ) -> Result<Secret, Status> {
        let keys = self.keys();
        if let Some(token) = self.cache().get(&entry.id, audience, now, &keys) {
            return Ok(token);
        }
        let resp = self
            .client
            .sign_jwt(&entry.id, audience)
            .await
            .map_err(|e| {
                tracing::warn!(entry = %entry.id, error = %e, "JWT-SVID request failed");
                to_status(&e)
            })?;
        self.cache().insert(
            &entry.id,
            audience,
            CachedJwt {
                token: resp.token.clone(),
                issued_at: now,
                expires_at: resp.expires_at,
                kid: baton_ca::jwt::header_kid(resp.token.expose()),
            },
            now,
        );
        Ok(resp.token)
    }

    fn validate_jwt(
        &self,
        token: &str,
        audience: &str,
        bundle: &BundleView,
        now: u64,
    ) -> Result<JwtClaims, String> {
        let v = baton_ca::jwt::validate_jwt_svid(
            token,
            audience,
            std::slice::from_ref(bundle.trust.as_ref()),
            UNIX_EPOCH + Duration::from_secs(now),
        )
        .map_err(|e| e.to_string())?;
        Ok(JwtClaims {
            spiffe_id: v.spiffe_id,
            claims: v.claims,
        })
    }
}
