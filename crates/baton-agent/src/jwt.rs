//! JWT-SVIDs for the Workload API: minted by the broker on request, cached
//! per (entry, audience set) until half their life, and validated locally
//! against the node's copy of the trust bundle.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use baton_core::{Entry, Secret};
use tonic::Status;

use crate::cache::{BundleView, CachedJwt, JwtCache};
use crate::client::{BrokerClient, ClientError};
use crate::workload::{JwtAuthority, JwtClaims};

/// The node daemon's [`JwtAuthority`].
#[derive(Debug)]
pub struct BrokerJwt {
    client: Arc<BrokerClient>,
    cache: Mutex<JwtCache>,
    tainted: tokio::sync::watch::Receiver<crate::cache::Tainted>,
}

impl BrokerJwt {
    /// Mints through `client`; cached tokens signed by a key in `tainted`
    /// are not served again.
    pub fn new(
        client: Arc<BrokerClient>,
        tainted: tokio::sync::watch::Receiver<crate::cache::Tainted>,
    ) -> Self {
        Self {
            client,
            cache: Mutex::new(JwtCache::default()),
            tainted,
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, JwtCache> {
        // The cache holds no invariant a panic could break half-way.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The `kid` of a compact JWS's header.
fn header_kid(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next()?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    v.get("kid")?.as_str().map(str::to_owned)
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
        let tainted = Arc::clone(&self.tainted.borrow());
        if let Some(token) = self.cache().get(&entry.id, audience, now, &tainted) {
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
                kid: header_kid(resp.token.expose()),
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
