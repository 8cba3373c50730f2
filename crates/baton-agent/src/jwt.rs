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
}

impl BrokerJwt {
    pub fn new(client: Arc<BrokerClient>) -> Self {
        Self {
            client,
            cache: Mutex::new(JwtCache::default()),
        }
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, JwtCache> {
        // The cache holds no invariant a panic could break half-way.
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
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
        if let Some(token) = self.cache().get(&entry.id, audience, now) {
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
