//! The node's own identity: its agent X509-SVID, how it is obtained (join
//! token on first start, the stored SVID afterwards), persisted and renewed.
//!
//! Files in the data directory:
//! - `agent-svid.pem`: the node SVID chain, leaf first;
//! - `agent-key.pk8`: its PKCS#8 key (mode 0600, written to a temporary
//!   file and renamed so a crash never leaves half a key);
//! - `bundle.json`: the last SPIFFE bundle received, so that a restarted
//!   agent still trusts a broker whose CA has rotated since bootstrap, and
//!   only it: once this file exists the bootstrap PEM is ignored (see
//!   [`initial_authorities`]).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use baton_ca::{TrustBundle, WorkloadKey};
use baton_core::{Secret, SpiffeId, TrustDomain};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::cache::KeyDer;
use crate::client::{BrokerClient, ClientError};

const SVID_FILE: &str = "agent-svid.pem";
const KEY_FILE: &str = "agent-key.pk8";
const BUNDLE_FILE: &str = "bundle.json";

/// Why the node identity could not be loaded, obtained or stored.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("this node has no stored identity; pass --join-token")]
    NoIdentity,
    #[error(
        "no trust anchor for the broker: pass --trust-bundle (the broker CA's PEM) on first start"
    )]
    NoBootstrapBundle,
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is damaged: {reason}")]
    Damaged { path: PathBuf, reason: String },
    #[error("the bootstrap bundle is not a PEM list of CA certificates: {0}")]
    BadBootstrap(#[source] baton_ca::CaError),
    #[error("cannot make the node's key or CSR: {0}")]
    Key(#[source] baton_ca::CaError),
    #[error("the broker's SVID for this node is unusable: {0}")]
    BadSvid(String),
    #[error("node attestation failed: {0}")]
    Attest(#[source] ClientError),
    #[error("node SVID renewal failed: {0}")]
    Renew(#[source] ClientError),
    #[error("cannot use the node SVID for TLS: {0}")]
    Tls(#[from] baton_tls::TlsError),
}

/// The node's SVID and key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeSvid {
    pub spiffe_id: SpiffeId,
    /// Leaf first.
    pub chain_der: Vec<Vec<u8>>,
    pub key: KeyDer,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
}

impl NodeSvid {
    /// Reads the SPIFFE ID and validity from the chain.
    pub fn new(chain_der: Vec<Vec<u8>>, key: KeyDer) -> Result<Self, NodeError> {
        let info =
            baton_ca::leaf_info(&chain_der).map_err(|e| NodeError::BadSvid(e.to_string()))?;
        Ok(Self {
            spiffe_id: info.spiffe_id,
            chain_der,
            key,
            not_before: unix_secs(info.not_before),
            not_after: unix_secs(info.not_after),
        })
    }

    /// When to renew: after `fraction` of the lifetime.
    pub fn renew_at(&self, fraction: f64) -> u64 {
        crate::cache::rotation_point(self.not_before, self.not_after, fraction)
    }
}

/// Seconds since the Unix epoch (0 for times before it).
pub fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The current time in Unix seconds. Only loop edges call this; decisions
/// take `now` as an argument.
pub fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}

/// How long from `now` until Unix second `at` (zero if past).
pub fn until(at: u64, now: SystemTime) -> Duration {
    (UNIX_EPOCH + Duration::from_secs(at))
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
}

/// The node's files in its data directory.
#[derive(Debug, Clone)]
pub struct NodeStore {
    dir: PathBuf,
}

impl NodeStore {
    /// Creates the directory (mode 0700) if needed.
    pub fn open(dir: &Path) -> Result<Self, NodeError> {
        std::fs::create_dir_all(dir).map_err(|source| NodeError::Io {
            action: "create",
            path: dir.to_owned(),
            source,
        })?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| NodeError::Io {
                action: "restrict permissions of",
                path: dir.to_owned(),
                source,
            },
        )?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The stored SVID if there is one that is still valid at `now`.
    pub fn load_svid(&self, now: u64) -> Result<Option<NodeSvid>, NodeError> {
        let (svid_path, key_path) = (self.path(SVID_FILE), self.path(KEY_FILE));
        let Some(pem) = read_optional(&svid_path)? else {
            return Ok(None);
        };
        let Some(key) = read_optional(&key_path)? else {
            return Ok(None);
        };
        let chain = CertificateDer::pem_slice_iter(&pem)
            .map(|c| c.map(|c| c.as_ref().to_vec()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| NodeError::Damaged {
                path: svid_path.clone(),
                reason: e.to_string(),
            })?;
        let parsed = WorkloadKey::from_pkcs8(&key).map_err(|e| NodeError::Damaged {
            path: key_path,
            reason: e.to_string(),
        })?;
        // A crash between writing the key and the chain leaves a pair that
        // does not belong together. The leaf embeds its public point
        // verbatim, so a mismatch is cheap to see.
        let matches = chain.first().is_some_and(|leaf| {
            let point = parsed.public_key_raw();
            !point.is_empty() && leaf.windows(point.len()).any(|w| w == point)
        });
        if !matches {
            tracing::warn!(path = %svid_path.display(), "the stored node SVID does not match the stored key; ignoring both");
            return Ok(None);
        }
        let svid = NodeSvid::new(chain, KeyDer::new(key)).map_err(|e| NodeError::Damaged {
            path: svid_path,
            reason: e.to_string(),
        })?;
        if now >= svid.not_after {
            tracing::warn!(
                node = %svid.spiffe_id,
                "the stored node SVID has expired; a join token is needed"
            );
            return Ok(None);
        }
        Ok(Some(svid))
    }

    /// Stores the key, then the chain. A crash in between leaves a pair that
    /// `load_svid` recognises as mismatched and ignores.
    pub fn save_svid(&self, svid: &NodeSvid) -> Result<(), NodeError> {
        write_atomic(&self.path(KEY_FILE), svid.key.expose(), 0o600)?;
        write_atomic(
            &self.path(SVID_FILE),
            chain_pem(&svid.chain_der).as_bytes(),
            0o644,
        )
    }

    /// The last stored SPIFFE bundle of `td`, if any.
    pub fn load_bundle(&self, td: &TrustDomain) -> Result<Option<TrustBundle>, NodeError> {
        let path = self.path(BUNDLE_FILE);
        let Some(bytes) = read_optional(&path)? else {
            return Ok(None);
        };
        let damaged = |reason: String| NodeError::Damaged {
            path: path.clone(),
            reason,
        };
        let json: serde_json::Value =
            serde_json::from_slice(&bytes).map_err(|e| damaged(e.to_string()))?;
        TrustBundle::from_spiffe_json(td, &json)
            .map(Some)
            .map_err(|e| damaged(e.to_string()))
    }

    pub fn save_bundle(&self, spiffe_json: &serde_json::Value) -> Result<(), NodeError> {
        let bytes = serde_json::to_vec_pretty(spiffe_json).unwrap_or_default();
        write_atomic(&self.path(BUNDLE_FILE), &bytes, 0o644)
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, NodeError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(NodeError::Io {
            action: "read",
            path: path.to_owned(),
            source,
        }),
    }
}

/// Writes `bytes` to a temporary file created with `mode`, syncs it, and
/// renames it over `path`, so readers see the old or the new file, never
/// a partial one, and a key file is never briefly world-readable.
fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), NodeError> {
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let io = |action, source| NodeError::Io {
        action,
        path: path.to_owned(),
        source,
    };
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| io("create", e))?;
    f.write_all(bytes).map_err(|e| io("write", e))?;
    f.sync_all().map_err(|e| io("sync", e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| io("replace", e))
}

fn chain_pem(chain: &[Vec<u8>]) -> String {
    let mut out = String::new();
    for der in chain {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = STANDARD.encode(der);
        for line in b64.as_bytes().chunks(64) {
            out.push_str(&String::from_utf8_lossy(line));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// The trust anchors to start with: the stored bundle when there is one,
/// else the operator's bootstrap PEM.
///
/// The stored bundle alone, never merged with the bootstrap PEM: it
/// follows the broker's CA rotations, while the bootstrap PEM stays in the
/// daemon's configuration for good and may still hold an authority the
/// operator has since rotated out and revoked. Merged, a restarted node
/// would trust that authority again until its first sync, and a broker
/// impersonated with it could answer that sync with a higher sequence and
/// have its bundle installed and stored. To bootstrap again from the PEM
/// (after restoring the CA on purpose, say), remove the stored bundle file
/// and restart.
pub fn initial_authorities(
    store: &NodeStore,
    td: &TrustDomain,
    bootstrap_pem: Option<&str>,
) -> Result<Vec<Vec<u8>>, NodeError> {
    if let Some(stored) = store.load_bundle(td)? {
        let path = store.path(BUNDLE_FILE);
        if stored.x509_authorities.is_empty() {
            // Falling back to the bootstrap PEM here would reopen the
            // hole above; an operator decides.
            return Err(NodeError::Damaged {
                path,
                reason: "it holds no X.509 authority; remove it and restart with --trust-bundle to bootstrap again".into(),
            });
        }
        if bootstrap_pem.is_some() {
            tracing::warn!(
                stored = %path.display(),
                "ignoring --trust-bundle: this node trusts only its stored bundle, which follows the broker's CA rotations; to bootstrap again from --trust-bundle, remove the stored bundle file and restart"
            );
        }
        return Ok(stored.x509_authorities);
    }
    let Some(pem) = bootstrap_pem else {
        return Err(NodeError::NoBootstrapBundle);
    };
    let b = TrustBundle::from_pem(td, pem).map_err(NodeError::BadBootstrap)?;
    if b.x509_authorities.is_empty() {
        return Err(NodeError::NoBootstrapBundle);
    }
    Ok(b.x509_authorities)
}

/// Loads the stored node SVID or attests with the join token, installs the
/// result as the client's TLS identity and returns it.
pub async fn establish(
    store: &NodeStore,
    client: &BrokerClient,
    td: &TrustDomain,
    join_token: Option<&Secret>,
    now: u64,
) -> Result<NodeSvid, NodeError> {
    let stored = match store.load_svid(now)? {
        Some(svid) if svid.spiffe_id.is_member_of(td) => {
            stored_still_valid(client, svid, join_token.is_some()).await?
        }
        Some(s) => {
            tracing::warn!(node = %s.spiffe_id, trust_domain = %td, "the stored node identity is for another trust domain");
            None
        }
        None => None,
    };
    let svid = match stored {
        Some(svid) => svid,
        None => {
            let token = join_token.ok_or(NodeError::NoIdentity)?;
            let key = WorkloadKey::generate().map_err(NodeError::Key)?;
            // The broker picks the node's ID and ignores the CSR's SAN; the
            // trust domain ID is the honest thing to put there.
            let placeholder =
                SpiffeId::parse(&td.id_string()).map_err(|e| NodeError::BadSvid(e.to_string()))?;
            let csr = key.csr_der(&placeholder).map_err(NodeError::Key)?;
            let signed = client.attest(token, csr).await.map_err(NodeError::Attest)?;
            let svid = NodeSvid::new(signed.cert_chain_der, KeyDer::new(key.pkcs8_der().to_vec()))?;
            store.save_svid(&svid)?;
            tracing::info!(node = %svid.spiffe_id, "node attested with a join token");
            svid
        }
    };
    install(client, &svid)?;
    Ok(svid)
}

/// Decides whether to keep the stored SVID. Without a join token it is
/// kept (a broker that is down or refuses it is reported by the sync loop).
/// With one, the broker is asked first: if it refuses the node (evicted,
/// agent SVID revoked), the token wins and the node attests again; a token
/// left in a service's command line is not spent while the stored SVID
/// still works.
async fn stored_still_valid(
    client: &BrokerClient,
    svid: NodeSvid,
    have_token: bool,
) -> Result<Option<NodeSvid>, NodeError> {
    if !have_token {
        tracing::info!(node = %svid.spiffe_id, "reusing the stored node identity");
        return Ok(Some(svid));
    }
    install(client, &svid)?;
    match client.sync(None).await {
        Err(e) if e.node_refusal().is_some() => {
            tracing::warn!(node = %svid.spiffe_id, error = %e, "the broker refuses the stored node identity; attesting with the join token");
            client.identity().clear();
            client.reconnect().map_err(NodeError::Attest)?;
            Ok(None)
        }
        Ok(_) | Err(_) => {
            tracing::info!(node = %svid.spiffe_id, "reusing the stored node identity; the join token is not used");
            Ok(Some(svid))
        }
    }
}

fn install(client: &BrokerClient, svid: &NodeSvid) -> Result<(), NodeError> {
    client
        .identity()
        .replace(svid.chain_der.clone(), svid.key.expose())?;
    client.reconnect().map_err(NodeError::Renew)
}

/// Renews the node SVID over mTLS with a fresh key, stores and installs it.
pub async fn renew(
    store: &NodeStore,
    client: &BrokerClient,
    current: &NodeSvid,
) -> Result<NodeSvid, NodeError> {
    let key = WorkloadKey::generate().map_err(NodeError::Key)?;
    let csr = key.csr_der(&current.spiffe_id).map_err(NodeError::Key)?;
    let signed = client.renew(csr).await.map_err(NodeError::Renew)?;
    let svid = NodeSvid::new(signed.cert_chain_der, KeyDer::new(key.pkcs8_der().to_vec()))?;
    if svid.spiffe_id != current.spiffe_id {
        return Err(NodeError::BadSvid(format!(
            "renewal returned {} for node {}",
            svid.spiffe_id, current.spiffe_id
        )));
    }
    store.save_svid(&svid)?;
    install(client, &svid)?;
    Ok(svid)
}

/// Delay before the `attempt`-th retry (0-based): 1 s doubling, capped.
pub fn backoff(attempt: u32, cap: Duration) -> Duration {
    Duration::from_secs(1u64 << attempt.min(16)).min(cap)
}

/// Longest pause between renewal retries while the broker is unreachable.
const RENEW_RETRY_CAP: Duration = Duration::from_secs(60);

/// Renews the node SVID after `fraction` of its life, retrying with a
/// capped backoff, until `stop` changes or its sender is dropped.
///
/// Renews at once when the SVID's authority is tainted, or when it no
/// longer verifies against the anchors in force (its authority left the
/// bundle: a broker holding that bundle would refuse it). `snapshot`
/// changes whenever a sync installs a bundle, so each new bundle is
/// checked. A renewed SVID that still does not verify is kept and not
/// renewed at once again until the anchors change, so a broker signing
/// under an authority the bundle lacks cannot make this loop spin.
pub async fn renew_loop(
    store: NodeStore,
    client: std::sync::Arc<BrokerClient>,
    mut svid: NodeSvid,
    fraction: f64,
    mut tainted: tokio::sync::watch::Receiver<crate::cache::Tainted>,
    mut snapshot: tokio::sync::watch::Receiver<std::sync::Arc<crate::cache::Snapshot>>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut failures: u32 = 0;
    let mut follow_taints = true;
    let mut follow_bundles = true;
    // The anchors (or their absence) a renewed SVID already failed to
    // verify against.
    let mut gave_up_on: Option<Option<Anchors>> = None;
    loop {
        let signer = svid
            .chain_der
            .first()
            .and_then(|leaf| baton_ca::Ca::signer_of(leaf));
        let is_tainted = signer
            .as_ref()
            .is_some_and(|s| tainted.borrow().contains(s));
        let anchors = client.bundles().get(svid.spiffe_id.trust_domain());
        let gave_up = gave_up_on
            .as_ref()
            .is_some_and(|g| same_anchors(g.as_ref(), anchors.as_ref()));
        let orphaned = !gave_up && orphan_reason(&client, &svid, unix_now()).is_some();
        let wait = if failures > 0 {
            backoff(failures - 1, RENEW_RETRY_CAP)
        } else if is_tainted {
            tracing::warn!(node = %svid.spiffe_id, "the node SVID's authority is tainted: renewing now");
            Duration::ZERO
        } else if orphaned {
            tracing::warn!(node = %svid.spiffe_id, "the node SVID no longer verifies against the trust bundle (its authority left it): renewing now");
            Duration::ZERO
        } else {
            until(svid.renew_at(fraction), SystemTime::now())
        };
        tokio::select! {
            biased;
            _ = stop.changed() => return,
            r = tainted.changed(), if follow_taints => {
                // Re-evaluate with the new taint list (a closed channel
                // only means nobody will report taints any more).
                follow_taints = r.is_ok();
                continue;
            }
            r = snapshot.changed(), if follow_bundles => {
                // The same, with the anchors a sync may have installed.
                follow_bundles = r.is_ok();
                continue;
            }
            () = tokio::time::sleep(wait) => {}
        }
        match renew(&store, &client, &svid).await {
            Ok(new) => {
                tracing::info!(node = %new.spiffe_id, not_after = new.not_after, "node SVID renewed");
                baton_ops::metrics().agent_node_svid(new.not_after);
                svid = new;
                failures = 0;
                gave_up_on = None;
                if let Some(reason) = orphan_reason(&client, &svid, unix_now()) {
                    tracing::warn!(node = %svid.spiffe_id, %reason, "the renewed node SVID does not verify against this node's trust bundle either; renewing again once the bundle changes");
                    gave_up_on = Some(anchors);
                }
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                if let NodeError::Renew(c) = &e
                    && let Some(refusal) = c.node_refusal()
                {
                    tracing::error!(node = %svid.spiffe_id, error = %e, "{}", refusal.advice());
                } else if unix_now() >= svid.not_after {
                    tracing::error!(node = %svid.spiffe_id, error = %e, "the node SVID has expired and cannot be renewed; restart the agent with a new --join-token");
                } else {
                    tracing::warn!(node = %svid.spiffe_id, error = %e, "node SVID renewal failed; will retry");
                }
            }
        }
    }
}

/// The anchors of one trust domain as the client's bundle store holds
/// them; each installed bundle is a new allocation.
type Anchors = std::sync::Arc<Vec<CertificateDer<'static>>>;

fn same_anchors(a: Option<&Anchors>, b: Option<&Anchors>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => std::sync::Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

/// Why the node SVID does not verify against the client's anchors at
/// `now`, if it does not.
fn orphan_reason(client: &BrokerClient, svid: &NodeSvid, now: u64) -> Option<String> {
    crate::cache::verify_chain(&svid.chain_der, &svid.spiffe_id, client.bundles(), now).err()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_are_written_atomically_with_mode() {
        let dir = tempfile::tempdir().unwrap();
        let store = NodeStore::open(&dir.path().join("data")).unwrap();
        let path = store.path(KEY_FILE);
        write_atomic(&path, b"one", 0o600).unwrap();
        write_atomic(&path, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let dir_mode = std::fs::metadata(&store.dir).unwrap().permissions().mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        // No temporary file left behind.
        assert_eq!(std::fs::read_dir(&store.dir).unwrap().count(), 1);
    }

    #[test]
    fn empty_store_has_no_identity_and_needs_bootstrap() {
        let dir = tempfile::tempdir().unwrap();
        let store = NodeStore::open(dir.path()).unwrap();
        assert_eq!(store.load_svid(0).unwrap(), None);
        let td = TrustDomain::new("example.org").unwrap();
        assert!(matches!(
            initial_authorities(&store, &td, None),
            Err(NodeError::NoBootstrapBundle)
        ));
        assert!(matches!(
            initial_authorities(&store, &td, Some("not pem")),
            Err(NodeError::BadBootstrap(_)) | Err(NodeError::NoBootstrapBundle)
        ));
    }

    fn ca_bundle(td: &TrustDomain) -> TrustBundle {
        baton_ca::Ca::load_or_create(baton_ca::CaConfig::new(td.clone()), SystemTime::now())
            .unwrap()
            .bundle()
    }

    /// The operator rotated CA1 out (and revoked it) for CA2; the node
    /// stored {CA2}, but its configuration still names the bootstrap PEM
    /// of CA1. A restart trusts CA2 only: a broker impersonated with CA1
    /// is not trusted for the first sync. Control: with no stored bundle,
    /// the bootstrap PEM is what the node trusts.
    #[test]
    fn a_stored_bundle_replaces_the_bootstrap_pem() {
        let td = TrustDomain::new("example.org").unwrap();
        let (ca1, ca2) = (ca_bundle(&td), ca_bundle(&td));
        let bootstrap = ca1.to_pem();

        let fresh = tempfile::tempdir().unwrap();
        let store = NodeStore::open(fresh.path()).unwrap();
        assert_eq!(
            initial_authorities(&store, &td, Some(&bootstrap)).unwrap(),
            ca1.x509_authorities
        );

        let rotated = tempfile::tempdir().unwrap();
        let store = NodeStore::open(rotated.path()).unwrap();
        store.save_bundle(&ca2.to_spiffe_json()).unwrap();
        let trusted = initial_authorities(&store, &td, Some(&bootstrap)).unwrap();
        assert_eq!(trusted, ca2.x509_authorities);
        assert!(ca1.x509_authorities.iter().all(|a| !trusted.contains(a)));
        // Without the flag, the same.
        assert_eq!(
            initial_authorities(&store, &td, None).unwrap(),
            ca2.x509_authorities
        );
    }

    #[test]
    fn renew_at_fraction_and_backoff_cap() {
        let s = NodeSvid {
            spiffe_id: SpiffeId::parse("spiffe://example.org/baton/node/n").unwrap(),
            chain_der: vec![],
            key: KeyDer::new(vec![]),
            not_before: 100,
            not_after: 200,
        };
        // NotBefore is back-dated 10 s: renewal is half of the real 90 s.
        assert_eq!(s.renew_at(0.5), 155);
        assert_eq!(backoff(0, Duration::from_secs(60)), Duration::from_secs(1));
        assert_eq!(backoff(3, Duration::from_secs(60)), Duration::from_secs(8));
        assert_eq!(
            backoff(40, Duration::from_secs(60)),
            Duration::from_secs(60)
        );
        let now = UNIX_EPOCH + Duration::from_secs(140);
        assert_eq!(until(150, now), Duration::from_secs(10));
        assert_eq!(until(100, now), Duration::ZERO);
    }
}
