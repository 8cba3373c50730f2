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

/// New JWT-SVIDs one entry may have the broker mint: a burst of this
/// many, then one a second. The broker limits a node as a whole (600 a
/// minute by default); without a share per entry, one workload asking for
/// a new audience each time would spend it for every other workload of
/// its node. Tokens served from the cache cost nothing.
pub const MINTS_PER_ENTRY_BURST: u32 = 60;

/// What each entry may still have minted ([`MINTS_PER_ENTRY_BURST`]),
/// with time passed in (unix seconds).
#[derive(Debug, Default)]
pub struct MintBudget {
    entries: std::collections::HashMap<baton_core::EntryId, (u32, u64)>,
}

/// Entries remembered at most; beyond it, those whose budget is whole
/// again are forgotten (they would start whole anyway).
const MAX_BUDGETS: usize = 4096;

impl MintBudget {
    /// Takes one mint for `entry` at `now`, or says in how many seconds
    /// one is there.
    pub fn take(&mut self, entry: &baton_core::EntryId, now: u64) -> Result<(), u64> {
        let whole = |(left, at): (u32, u64)| {
            let earned = u32::try_from(now.saturating_sub(at)).unwrap_or(u32::MAX);
            left.saturating_add(earned).min(MINTS_PER_ENTRY_BURST)
        };
        if !self.entries.contains_key(entry) && self.entries.len() >= MAX_BUDGETS {
            self.entries
                .retain(|_, b| whole(*b) < MINTS_PER_ENTRY_BURST);
        }
        let budget = self
            .entries
            .entry(entry.clone())
            .or_insert((MINTS_PER_ENTRY_BURST, now));
        // A clock stepped back restarts the count from then: the entry
        // earns nothing for it, and is not locked out until it catches up.
        budget.1 = budget.1.min(now);
        let left = whole(*budget);
        if left == 0 {
            return Err(1);
        }
        *budget = (left - 1, now);
        Ok(())
    }
}

/// The node daemon's [`JwtAuthority`].
#[derive(Debug)]
pub struct BrokerJwt {
    client: Arc<BrokerClient>,
    cache: Mutex<JwtCache>,
    budget: Mutex<MintBudget>,
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
            budget: Mutex::new(MintBudget::default()),
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
        self.cache().insert(
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_entry_mints_a_burst_then_one_a_second_and_others_keep_theirs() {
        let mut b = MintBudget::default();
        let greedy = baton_core::EntryId::random();
        let other = baton_core::EntryId::random();
        for _ in 0..MINTS_PER_ENTRY_BURST {
            b.take(&greedy, 100).unwrap();
        }
        assert_eq!(b.take(&greedy, 100), Err(1));
        // Another entry of the node is not starved.
        b.take(&other, 100).unwrap();
        // One a second comes back, never more than the burst.
        b.take(&greedy, 101).unwrap();
        assert_eq!(b.take(&greedy, 101), Err(1));
        for _ in 0..MINTS_PER_ENTRY_BURST {
            b.take(&greedy, 10_000).unwrap();
        }
        assert_eq!(b.take(&greedy, 10_000), Err(1));
        // A clock stepped back earns nothing, and does not lock the entry
        // out until the clock is back where it was.
        assert_eq!(b.take(&greedy, 50), Err(1));
        b.take(&greedy, 51).unwrap();
    }
}
