//! The sync loop: keeps the cache in step with the broker.
//!
//! Every `sync_interval`, and also exactly when the next workload SVID is
//! due for rotation, it fetches `/v1/node/sync`, signs every missing,
//! changed or ageing SVID, and every one that no longer verifies against a
//! newly installed bundle, in one batched `sign-x509` call (with keys it
//! generates here, so private keys never leave the node), drops SVIDs of
//! deleted entries and unverifiable ones, and publishes a new snapshot if
//! anything changed. When
//! the broker is unreachable the last snapshot keeps being served and the
//! loop retries with a capped backoff. When the broker refuses the node
//! itself (evicted, banned, its agent SVID revoked), nothing is served any
//! more: the snapshot is emptied and the loop keeps retrying, logging what
//! the operator must do.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_ca::{TrustBundle, WorkloadKey};
use baton_core::api::SignX509Item;
use baton_core::{Entry, TrustDomain};
use tokio::sync::watch;

use crate::cache::{
    self, BundleView, CachedSvid, KeyDer, Snapshot, Tainted, entries_to_sign, next_snapshot,
};
use crate::client::{BrokerClient, ClientError};
use crate::node::{NodeStore, backoff, unix_now, unix_secs, until};

/// Largest batch the broker signs in one call.
const SIGN_BATCH: usize = 1000;
/// Longest pause between retries while the broker is unreachable.
const RETRY_CAP: Duration = Duration::from_secs(30);
/// Shortest pause between two syncs, so that an SVID whose rotation point
/// is already behind us (very short TTLs) cannot make the loop spin.
const MIN_WAIT: Duration = Duration::from_secs(1);

/// Why one sync round failed. The loop logs it and retries.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Broker(#[from] ClientError),
    #[error("the broker's trust bundle is unusable: {0}")]
    Bundle(#[source] baton_ca::CaError),
    #[error("cannot make a workload key or CSR: {0}")]
    Key(#[source] baton_ca::CaError),
    #[error(
        "the broker's trust bundle has sequence {got}, older than {have}, which this node has already installed: a broker serving a rolled-back CA journal (a replayed or restored one) is not followed. After restoring the CA on purpose, remove the node's stored bundle.json and restart it with --trust-bundle"
    )]
    RolledBack { got: u64, have: u64 },
    #[error("the broker's SVID for entry {entry} is unusable: {reason}")]
    BadSvid { entry: String, reason: String },
}

/// Settings of the sync loop.
#[derive(Debug, Clone)]
pub struct SyncSettings {
    pub trust_domain: TrustDomain,
    pub sync_interval: Duration,
    pub rotate_fraction: f64,
}

/// Owns the sending side of the cache.
#[derive(Debug)]
pub struct Syncer {
    client: Arc<BrokerClient>,
    store: NodeStore,
    settings: SyncSettings,
    tx: watch::Sender<Arc<Snapshot>>,
    last_bundle: Option<serde_json::Value>,
    tainted: watch::Sender<Tainted>,
    /// The sequence of the last bundle whose taints this node applied and
    /// whose snapshot it published; sent with the next sync.
    applied: Option<u64>,
    /// The highest bundle sequence this node has installed (also from its
    /// stored bundle, across restarts): an older bundle is refused.
    installed: Option<u64>,
}

impl Syncer {
    pub fn new(
        client: Arc<BrokerClient>,
        store: NodeStore,
        settings: SyncSettings,
        tx: watch::Sender<Arc<Snapshot>>,
        tainted: watch::Sender<Tainted>,
    ) -> Self {
        let installed = match store.load_bundle(&settings.trust_domain) {
            Ok(stored) => stored.map(|b| b.sequence),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the stored trust bundle's sequence");
                None
            }
        };
        Self {
            client,
            store,
            settings,
            tx,
            last_bundle: None,
            tainted,
            applied: None,
            installed,
        }
    }

    /// One round: sync, sign what needs signing, publish. When the broker
    /// refuses the node itself (evicted, banned, agent SVID revoked), every
    /// identity is dropped at once: an empty snapshot, so every workload
    /// gets `PermissionDenied`.
    pub async fn sync_once(&mut self, now: u64) -> Result<(), SyncError> {
        let result = self.sync_round(now).await;
        let refused = matches!(&result, Err(SyncError::Broker(e)) if e.node_refusal().is_some());
        baton_ops::metrics().agent_sync(now, result.is_ok(), refused);
        let serving = !self.tx.borrow().entries().is_empty();
        if refused && serving {
            tracing::error!("the broker refused this node; dropping every workload identity");
            self.tx.send_replace(Arc::new(Snapshot::default()));
        }
        result
    }

    async fn sync_round(&mut self, now: u64) -> Result<(), SyncError> {
        let td = self.settings.trust_domain.clone();
        let resp = self.client.sync(self.applied).await?;
        let bundle = TrustBundle::from_spiffe_json(&td, &resp.bundle).map_err(SyncError::Bundle)?;
        // Sequences only grow: an older bundle (and the entries and taints
        // that came with it) is a rolled-back broker's, never installed.
        if let Some(have) = self.installed
            && bundle.sequence < have
        {
            return Err(SyncError::RolledBack {
                got: bundle.sequence,
                have,
            });
        }
        if self.last_bundle.as_ref() != Some(&resp.bundle) {
            // The broker's CA may have rotated: trust the new anchors for
            // our own TLS too, and remember them across restarts.
            if !bundle.x509_authorities.is_empty() {
                self.client
                    .bundles()
                    .set(td.clone(), bundle.x509_authorities.clone());
            }
            if let Err(e) = self.store.save_bundle(&resp.bundle) {
                tracing::warn!(error = %e, "cannot store the trust bundle");
            }
            tracing::info!(sequence = bundle.sequence, "trust bundle updated");
            self.last_bundle = Some(resp.bundle.clone());
            self.installed = Some(bundle.sequence);
        }
        // SVIDs that no longer chain to the anchors in force (their
        // authority left the bundle) are re-signed and, failing that, not
        // served. Checked when the bundle's X.509 authorities differ from
        // those of the snapshot being replaced: every SVID of that
        // snapshot was checked against those (when they came in, or when
        // signed), so an unchanged set needs no new check.
        let current = Arc::clone(&self.tx.borrow());
        let anchors_changed = current
            .bundle()
            .is_none_or(|have| have.trust.x509_authorities != bundle.x509_authorities);
        let unverified = if anchors_changed {
            // The client's anchors: the bundle's, just installed above
            // (unless it had none), which `sign` checks new SVIDs against.
            cache::unverified(&current, self.client.bundles(), now)
        } else {
            BTreeSet::new()
        };
        let view = BundleView {
            trust_domain: td,
            x509_der: bundle.x509_authorities_concat_der(),
            jwks_json: bundle.jwks_json(),
            trust: std::sync::Arc::new(bundle),
        };

        if **self.tainted.borrow() != resp.tainted {
            if !resp.tainted.is_empty() {
                tracing::warn!(authorities = ?resp.tainted, "the broker tainted authorities: re-issuing what they signed");
            }
            self.tainted.send_replace(Arc::new(resp.tainted.clone()));
        }
        let to_sign: Vec<Entry> = entries_to_sign(
            &resp.entries,
            &current,
            now,
            self.settings.rotate_fraction,
            &resp.tainted,
            &unverified,
        )
        .into_iter()
        .cloned()
        .collect();
        let (fresh, failure) = if to_sign.is_empty() {
            (Vec::new(), None)
        } else {
            // Entries, bundle and the batches signed before a failure
            // (a rate limit met part way) are still worth publishing.
            let mut fresh = Vec::new();
            let failure = self.sign(&to_sign, now, &mut fresh).await.err();
            (fresh, failure)
        };
        let signed = fresh.len();
        let sequence = view.trust.sequence;
        let next = next_snapshot(&current, resp.entries, Some(view), fresh, now, &unverified);
        if next != *current {
            tracing::debug!(
                entries = next.entries().len(),
                signed,
                "publishing a new cache snapshot"
            );
            self.tx.send_replace(Arc::new(next));
        }
        // The taints and the bundle of this answer are in force: no JWT-SVID
        // of a tainted or removed key is served from here on.
        self.applied = Some(sequence);
        failure.map_or(Ok(()), Err)
    }

    /// New X509-SVIDs for `entries`, each checked before it is served: it
    /// names its entry's SPIFFE ID, chains to the trust bundle in force and
    /// certifies the key generated for it (a broker's answer is not served
    /// to workloads on its word alone).
    /// Each batch's SVIDs are pushed onto `fresh` once checked, so those
    /// signed before a failure are kept.
    async fn sign(
        &self,
        entries: &[Entry],
        now: u64,
        fresh: &mut Vec<CachedSvid>,
    ) -> Result<(), SyncError> {
        fresh.reserve(entries.len());
        for chunk in entries.chunks(SIGN_BATCH) {
            let mut keys = Vec::with_capacity(chunk.len());
            let mut items = Vec::with_capacity(chunk.len());
            for e in chunk {
                let key = WorkloadKey::generate().map_err(SyncError::Key)?;
                let csr_der = key.csr_der(&e.spiffe_id).map_err(SyncError::Key)?;
                items.push(SignX509Item {
                    entry_id: e.id.clone(),
                    csr_der,
                });
                keys.push(key);
            }
            let signed = self.client.sign_x509(items).await?;
            for ((entry, key), svid) in chunk.iter().zip(keys).zip(signed) {
                let bad = |reason: String| SyncError::BadSvid {
                    entry: entry.id.to_string(),
                    reason,
                };
                let info =
                    baton_ca::leaf_info(&svid.cert_chain_der).map_err(|e| bad(e.to_string()))?;
                if info.spiffe_id != entry.spiffe_id || svid.spiffe_id != entry.spiffe_id {
                    return Err(bad(format!(
                        "it names {} instead of {}",
                        info.spiffe_id, entry.spiffe_id
                    )));
                }
                cache::verify_chain(
                    &svid.cert_chain_der,
                    &entry.spiffe_id,
                    self.client.bundles(),
                    now,
                )
                .map_err(bad)?;
                baton_tls::ClientIdentity::new(svid.cert_chain_der.clone(), key.pkcs8_der())
                    .map_err(|e| bad(format!("it does not certify the key sent: {e}")))?;
                tracing::info!(entry = %entry.id, spiffe_id = %entry.spiffe_id, serial = %info.serial_hex, "workload SVID issued");
                fresh.push(CachedSvid {
                    entry: entry.clone(),
                    chain_der: svid.cert_chain_der,
                    key: KeyDer::new(key.pkcs8_der().to_vec()),
                    not_before: unix_secs(info.not_before),
                    not_after: unix_secs(info.not_after),
                    authority_id: info.authority_id,
                });
            }
        }
        Ok(())
    }

    /// Runs until `stop` changes or its sender is dropped. Dropping the
    /// syncer then closes the cache channel, which ends open streams.
    /// Returns early with the broker's refusal when it banned this node:
    /// that is final (only an operator lifts it), so the agent stops
    /// rather than retrying forever.
    pub async fn run(mut self, mut stop: watch::Receiver<bool>) -> Result<(), SyncError> {
        let mut failures: u32 = 0;
        loop {
            let wait = match self.sync_once(unix_now()).await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!("sync with the broker recovered");
                    }
                    failures = 0;
                    let mut wait = self.settings.sync_interval;
                    if let Some(at) = self
                        .tx
                        .borrow()
                        .next_rotation(self.settings.rotate_fraction)
                    {
                        wait = wait.min(until(at, SystemTime::now()));
                    }
                    wait.max(MIN_WAIT)
                }
                Err(e) => {
                    let wait = backoff(failures, RETRY_CAP);
                    failures = failures.saturating_add(1);
                    let refusal = match &e {
                        SyncError::Broker(c) => c.node_refusal(),
                        _ => None,
                    };
                    match refusal {
                        Some(crate::client::NodeRefusal::Banned) => return Err(e),
                        Some(r) => {
                            tracing::error!(error = %e, retry_in = ?wait, "{}", r.advice());
                        }
                        None => {
                            tracing::warn!(error = %e, retry_in = ?wait, "sync with the broker failed; serving from cache");
                        }
                    }
                    wait
                }
            };
            tokio::select! {
                biased;
                _ = stop.changed() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }
}
