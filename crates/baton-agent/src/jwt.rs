//! JWT-SVIDs for the Workload API: minted by the broker on request, cached
//! per (entry, audience set) until half their life (at most
//! [`MAX_JWTS_PER_ENTRY`] sets per entry), and validated locally against
//! the node's copy of the trust bundle.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, UNIX_EPOCH};

use baton_core::{Entry, Secret};
use tonic::Status;

use crate::cache::{BundleView, CachedJwt, JwtCache, MAX_JWTS_PER_ENTRY, Snapshot, UsableKeys};
use crate::client::{BrokerClient, ClientError};
use crate::workload::{JwtAuthority, JwtClaims};

/// New JWT-SVIDs one entry may have the broker mint: a burst of this
/// many, then one a second. The broker limits a node as a whole (600 a
/// minute by default); without a share per entry, one workload asking for
/// a new audience each time would spend it for every other workload of
/// its node. Tokens served from the cache cost nothing.
pub const MINTS_PER_ENTRY_BURST: u32 = 60;

/// The node daemon's [`JwtAuthority`].
#[derive(Debug)]
pub struct BrokerJwt {
    client: Arc<BrokerClient>,
    cache: Mutex<JwtCache>,
    /// New JWT-SVIDs per entry ([`MINTS_PER_ENTRY_BURST`], then one a
    /// second).
    budget: Mutex<baton_core::budget::Budget<baton_core::EntryId>>,
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
            budget: Mutex::new(baton_core::budget::Budget::new(MINTS_PER_ENTRY_BURST, 1)),
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
        // The Workload API checks this already; checked again here because
        // the cache is keyed on the audience set and must stay bounded
        // whoever asks.
        crate::workload::check_jwt_audience(audience)?;
        let keys = self.keys();
        if let Some(token) = self.cache().get(&entry.id, audience, now, &keys) {
            return Ok(token);
        }
        let taken = self
            .budget
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(&entry.id, now);
        if let Err(wait) = taken {
            tracing::warn!(entry = %entry.id, "JWT-SVID refused: the entry asked for too many new ones");
            return Err(Status::resource_exhausted(format!(
                "{} asked for more than {MINTS_PER_ENTRY_BURST} new JWT-SVIDs (then one a second); cached ones are still served; retry in {wait} s",
                entry.spiffe_id
            )));
        }
        let resp = self
            .client
            .sign_jwt(&entry.id, audience)
            .await
            .map_err(|e| {
                tracing::warn!(entry = %entry.id, error = %e, "JWT-SVID request failed");
                to_status(&e)
            })?;
        // Served only when signed by a key this node trusts now: not a
        // key a newer bundle tainted or withdrew (a broker serving a
        // rolled-back journal, whose sync this node refused, still signs).
        let kid = baton_ca::jwt::header_kid(resp.token.expose());
        if !keys.allow(kid.as_deref()) {
            tracing::warn!(entry = %entry.id, kid = ?kid, "the broker signed a JWT-SVID with a key this node does not trust; not served");
            return Err(Status::unavailable(
                "the broker signed the JWT-SVID with a key that is tainted or not in this node's trust bundle; retry once the node has synced",
            ));
        }
        let cached = self.cache().insert(
            &entry.id,
            audience,
            CachedJwt {
                token: resp.token.clone(),
                issued_at: now,
                expires_at: resp.expires_at,
                kid,
            },
            now,
        );
        if !cached {
            // Logged at most once per mint, and mints are budgeted per
            // entry: this cannot flood the log.
            tracing::warn!(entry = %entry.id, max = MAX_JWTS_PER_ENTRY, "JWT-SVID served but not cached: the entry already has the most audience sets cached");
        }
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
