//! The broker's certificate authority: X.509 authorities that sign
//! X509-SVIDs and ES256 keys that sign JWT-SVIDs and delegation tokens,
//! each kind rotating through the [journal](crate::journal) (prepared →
//! active → old, taint, revoke).
//!
//! Issuance reads one immutable snapshot of the journal (no lock); a
//! rotation step builds the next snapshot under a mutex, persists it, then
//! swaps it in.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use baton_core::{Secret, SpiffeId, TrustDomain};
use rcgen::string::Ia5String;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose,
    PublicKeyData, SanType,
};
use serde_json::json;

use crate::CaError;
use crate::authority::{
    UpstreamAuthority, X509Key, authority_key_id, new_p256_key, p256_key_from_pkcs8,
};
use crate::bundle::TrustBundle;
use crate::journal::{
    self, AuthorityKind, AuthorityState, AuthorityStatus, FileKind, Journal, Slot, jwt_key_name,
    jwt_key_path, x509_cert_name, x509_cert_path, x509_key_name, x509_key_path,
};
use crate::jwt::JwtSigningKey;
use crate::keystore;
use crate::shared::{SharedCaStore, SharedState, SharedWrite};
use crate::time_util::{floor_secs, unix_secs};
use crate::usage::{KeyUsage, UsageLedger};
use crate::workload::WorkloadKey;
use crate::x509::{parse_cert, random_serial, valid_dns_name, verify_csr};

/// Default lifetime of an X.509 authority or JWT key.
pub const DEFAULT_CA_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// Default cap on any SVID's lifetime.
pub const DEFAULT_MAX_SVID_TTL: Duration = Duration::from_secs(24 * 3600);
/// How far NotBefore is back-dated, to absorb clock skew between the
/// broker and relying parties (SPIRE uses the same 10 s).
pub const BACKDATE: Duration = Duration::from_secs(10);
/// Path of the broker's own SPIFFE ID inside its trust domain.
pub const BROKER_ID_PATH: &str = "/baton/broker";

const LEGACY_X509_KEY_FILE: &str = "x509-authority.key";
const LEGACY_X509_CERT_FILE: &str = "x509-authority.der";
const LEGACY_JWT_KEY_FILE: &str = "jwt-authority.key";

/// How to build the CA.
#[derive(Debug, Clone)]
pub struct CaConfig {
    pub trust_domain: TrustDomain,
    /// Lifetime of a newly created X.509 authority or JWT key.
    pub ca_ttl: Duration,
    /// Where keys persist; `None` keeps them in memory only (dev: every
    /// restart makes a new trust bundle).
    pub key_dir: Option<PathBuf>,
    /// Upper bound on any SVID lifetime, whatever a caller asks for.
    pub max_svid_ttl: Duration,
    /// Run as an intermediate under this PKI instead of a self-signed root.
    pub upstream: Option<Arc<UpstreamAuthority>>,
    /// Keep the journal and keys in this store, shared with other brokers,
    /// instead of `key_dir` (which is then only read once, to move a CA
    /// that lived there into an empty store).
    pub shared: Option<Arc<dyn SharedCaStore>>,
}

impl CaConfig {
    /// In-memory CA with the default lifetimes.
    pub fn new(trust_domain: TrustDomain) -> Self {
        Self {
            trust_domain,
            ca_ttl: DEFAULT_CA_TTL,
            key_dir: None,
            max_svid_ttl: DEFAULT_MAX_SVID_TTL,
            upstream: None,
            shared: None,
        }
    }
}

/// When the automatic schedule prepares and activates the next authority,
/// as fractions of the active one's lifetime (SPIRE's defaults: 1/2, 5/6).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RotationSchedule {
    pub prepare_at: f64,
    pub activate_at: f64,
}

impl Default for RotationSchedule {
    fn default() -> Self {
        Self {
            prepare_at: 0.5,
            activate_at: 5.0 / 6.0,
        }
    }
}

impl RotationSchedule {
    /// Checks `0 < prepare_at < activate_at < 1`.
    pub fn validate(&self) -> Result<(), String> {
        let ok =
            self.prepare_at > 0.0 && self.prepare_at < self.activate_at && self.activate_at < 1.0;
        if ok {
            Ok(())
        } else {
            Err(format!(
                "rotation schedule needs 0 < prepare ({}) < activate ({}) < 1",
                self.prepare_at, self.activate_at
            ))
        }
    }
}

/// What a rotation step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationAction {
    Prepared,
    Activated,
    /// The previous active authority became old.
    Deactivated,
    Tainted,
    Revoked,
    /// An old authority whose signatures all expired left the bundle.
    Pruned,
}

/// One change of the journal, for logs and the admin API.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RotationEvent {
    pub action: RotationAction,
    pub authority: AuthorityStatus,
}

/// A private key in PKCS#8 DER that must not reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct PrivateKeyBytes(Vec<u8>);

impl PrivateKeyBytes {
    pub fn new(pkcs8_der: Vec<u8>) -> Self {
        Self(pkcs8_der)
    }
    /// The PKCS#8 DER. Never log it.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
    pub fn into_inner(self) -> Vec<u8> {
        self.0
    }
}

impl fmt::Debug for PrivateKeyBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("PrivateKeyBytes(\"...\")")
    }
}

/// What a signature by the active JWT key is for, as the usage ledger
/// records it.
#[derive(Debug, Clone, Copy)]
pub(crate) enum JwtSigned<'a> {
    JwtSvid,
    DelegationToken { jti: &'a str },
}

/// An X509-SVID as issued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuedSvid {
    pub spiffe_id: SpiffeId,
    /// Leaf first, then any intermediates up to (not including) the root.
    pub cert_chain_der: Vec<Vec<u8>>,
    /// Lowercase hex without leading zero bytes, as [`crate::leaf_info`] reports it.
    pub serial_hex: String,
    pub not_after: SystemTime,
    /// The id of the X.509 authority that signed it.
    pub authority_id: String,
}

/// The certificate authority. `Send + Sync`; issuance takes `&self`.
pub struct Ca {
    trust_domain: TrustDomain,
    max_svid_ttl: Duration,
    ca_ttl: Duration,
    persist: Persist,
    upstream: Option<Arc<UpstreamAuthority>>,
    // INVARIANT: every snapshot has exactly one active authority of each
    // kind; only `load_or_create` and `mutate` store snapshots.
    journal: ArcSwap<Journal>,
    write: Mutex<()>,
    refresh_hint_secs: u64,
    /// What each JWT key signed that is still live (see `usage.rs`).
    usage: Mutex<UsageLedger>,
    /// The highest shared journal sequence this broker has seen (and
    /// written to its mark file): an older stored journal is a rollback.
    mark_seen: std::sync::atomic::AtomicU64,
}

/// Where the journal and keys persist.
enum Persist {
    /// Nowhere (dev: every restart makes a new trust bundle).
    Memory,
    /// A key directory of this broker.
    Dir(PathBuf),
    /// A store shared by every broker of the trust domain; `mark` is this
    /// broker's file of the highest journal sequence it has seen there.
    Shared {
        store: Arc<dyn SharedCaStore>,
        mark: Option<PathBuf>,
    },
}

/// The high-water mark file of a shared CA, in the broker's key directory.
const SHARED_MARK_FILE: &str = "shared-sequence";

fn read_mark(path: &Path) -> Result<u64, CaError> {
    match keystore::read_public(path)? {
        None => Ok(0),
        Some(b) => String::from_utf8_lossy(&b)
            .trim()
            .parse()
            .map_err(|_| CaError::CorruptStore {
                path: path.to_owned(),
                reason: "not a sequence number".into(),
            }),
    }
}

/// Where a stored journal's files are read from.
enum Files<'a> {
    Dir(&'a Path),
    Shared {
        location: &'a str,
        files: &'a std::collections::BTreeMap<String, Vec<u8>>,
        unreadable: &'a std::collections::BTreeMap<String, String>,
    },
}

impl Files<'_> {
    fn path(&self, name: &str) -> PathBuf {
        match self {
            Files::Dir(d) => d.join(name),
            Files::Shared { location, .. } => PathBuf::from(format!("{location}/{name}")),
        }
    }

    fn read(&self, name: &str, kind: FileKind) -> Result<Option<Vec<u8>>, CaError> {
        match (self, kind) {
            (Files::Dir(d), FileKind::Secret) => keystore::read_key(&d.join(name)),
            (Files::Dir(d), FileKind::Public) => keystore::read_public(&d.join(name)),
            (
                Files::Shared {
                    files,
                    unreadable,
                    location,
                },
                _,
            ) => match (files.get(name), unreadable.get(name)) {
                (Some(b), _) => Ok(Some(b.clone())),
                (None, Some(reason)) => Err(CaError::CorruptStore {
                    path: PathBuf::from(format!("{location}/{name}")),
                    reason: reason.clone(),
                }),
                (None, None) => Ok(None),
            },
        }
    }
}

impl fmt::Debug for Ca {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ca")
            .field("trust_domain", &self.trust_domain)
            .field("max_svid_ttl", &self.max_svid_ttl)
            .field("authorities", &self.journal.load().statuses())
            .field("upstream", &self.upstream.is_some())
            .finish_non_exhaustive()
    }
}

fn status_for(
    id: String,
    kind: AuthorityKind,
    state: AuthorityState,
    created_at: u64,
    not_after: u64,
    upstream: bool,
    now: u64,
) -> AuthorityStatus {
    AuthorityStatus {
        id,
        kind,
        state,
        tainted: false,
        created_at,
        not_after,
        activated_at: (state == AuthorityState::Active).then_some(now),
        deactivated_at: None,
        signed_until: 0,
        upstream,
    }
}

impl Ca {
    /// Loads the CA from `cfg.key_dir` (its journal and keys), or creates
    /// and persists it.
    ///
    /// Key files are PKCS#8 DER with mode 0600 (one that group or others
    /// can access is refused). A journal that names a missing or
    /// mismatched key, or an authority of another trust domain, is an
    /// error. An active authority or key that expired while the broker was
    /// down is replaced at once. A key directory written by an earlier
    /// version (one authority, no journal) is imported as the active one.
    pub fn load_or_create(cfg: CaConfig, now: SystemTime) -> Result<Ca, CaError> {
        if cfg.ca_ttl < Duration::from_secs(1) || cfg.max_svid_ttl < Duration::from_secs(1) {
            return Err(CaError::ZeroTtl);
        }
        let mut mark_seen = 0;
        let persist = match (&cfg.shared, &cfg.key_dir) {
            (Some(store), dir) => {
                let mark = dir.as_ref().map(|d| d.join(SHARED_MARK_FILE));
                if let (Some(d), Some(m)) = (dir, &mark) {
                    keystore::ensure_dir(d)?;
                    mark_seen = read_mark(m)?;
                }
                // A broker that has served a shared CA never imports its
                // old key directory again (that would resurrect a CA).
                if let Some(dir) = dir
                    && mark_seen == 0
                {
                    move_into_shared(store.as_ref(), dir)?;
                }
                Persist::Shared {
                    store: store.clone(),
                    mark,
                }
            }
            (None, Some(dir)) => Persist::Dir(dir.clone()),
            (None, None) => Persist::Memory,
        };
        let ca = Ca {
            trust_domain: cfg.trust_domain,
            max_svid_ttl: cfg.max_svid_ttl,
            ca_ttl: cfg.ca_ttl,
            persist,
            upstream: cfg.upstream,
            journal: ArcSwap::from_pointee(Journal::empty(unix_secs(now))),
            write: Mutex::new(()),
            refresh_hint_secs: (cfg.ca_ttl.as_secs() / 10).clamp(1, 300),
            usage: Mutex::new(UsageLedger::default()),
            mark_seen: std::sync::atomic::AtomicU64::new(mark_seen),
        };
        let loaded = match &ca.persist {
            Persist::Memory => None,
            Persist::Dir(dir) => {
                keystore::ensure_dir(dir)?;
                match journal::read(dir)? {
                    Some(j) => Some(ca.load_journal(&Files::Dir(dir), j, None)?),
                    None => ca.import_legacy(dir, now)?,
                }
            }
            Persist::Shared { store, .. } => {
                let state = store.load()?;
                ca.journal_from_shared(store.as_ref(), &state, None)?
            }
        };
        if let Some(mut j) = loaded {
            // What was signed after the journal was last written is not in
            // it: assume the active authorities signed until the longest
            // SVID lifetime from now.
            let t = unix_secs(now);
            let horizon = t.saturating_add(ca.max_svid_ttl.as_secs());
            for s in &mut j.x509 {
                if s.status.state == AuthorityState::Active {
                    s.signed(horizon.min(s.status.not_after));
                }
            }
            for s in &mut j.jwt {
                if s.status.state == AuthorityState::Active {
                    s.signed(horizon.min(s.status.not_after));
                }
                // Tokens signed before this start are not in the usage
                // ledger: the watermark stands for them.
                let until = s.current().retained_until();
                if until > t {
                    ca.usage_ledger().untracked(&s.status.id, until);
                }
            }
            ca.journal.store(Arc::new(j));
        }
        // A fresh CA, or one whose active authority expired meanwhile.
        ca.mutate(|j| {
            let t = unix_secs(now);
            if j.active_x509().is_none_or(|a| a.status.not_after <= t) {
                ca.replace_active(j, AuthorityKind::X509, now)?;
            }
            if j.active_jwt().is_none_or(|a| a.status.not_after <= t) {
                ca.replace_active(j, AuthorityKind::Jwt, now)?;
            }
            Ok(())
        })?;
        ca.prune(now)?;
        Ok(ca)
    }

    /// The journal stored in a shared store with its keys (those this
    /// process already holds in `known` are reused, their watermarks raised
    /// to the stored ones), or `None` if the store is empty.
    fn journal_from_shared(
        &self,
        store: &dyn SharedCaStore,
        state: &SharedState,
        known: Option<&Journal>,
    ) -> Result<Option<Journal>, CaError> {
        let location = store.location();
        let journal_path = PathBuf::from(format!("{location}/{}", journal::JOURNAL_FILE));
        // The newest sequence this broker knows: its current journal (if it
        // holds a CA) and its mark file.
        let floor = known
            .filter(|k| !k.x509.is_empty() || !k.jwt.is_empty())
            .map_or(0, |k| k.sequence)
            .max(self.mark_seen.load(std::sync::atomic::Ordering::Acquire));
        let Some(bytes) = &state.journal else {
            if floor > 0 || !state.files.is_empty() || !state.unreadable.is_empty() {
                return Err(CaError::CorruptStore {
                    path: journal_path,
                    reason: format!(
                        "the shared CA's journal is gone (this broker has seen sequence {floor}{}); a new CA is not made over it. Restore the database from a backup; to start a new CA on purpose, empty the tables ca_journal and ca_files and remove {SHARED_MARK_FILE} from each broker's key directory",
                        if state.files.is_empty() {
                            ""
                        } else {
                            ", and key files remain"
                        }
                    ),
                });
            }
            return Ok(None);
        };
        let l = journal::parse(bytes, &journal_path)?;
        if l.sequence < floor {
            return Err(CaError::CorruptStore {
                path: journal_path,
                reason: format!(
                    "its sequence {} is older than {floor}, which this broker has already seen: the journal was rolled back (a replayed row or a restored backup) and is not trusted. After restoring a backup on purpose, remove {SHARED_MARK_FILE} from each broker's key directory and restart them",
                    l.sequence
                ),
            });
        }
        // What this process's own issuance raised, before the merge: the
        // stored watermarks above it are other brokers' signatures.
        let local: std::collections::HashMap<String, u64> = known
            .map(|k| {
                k.jwt
                    .iter()
                    .map(|s| (s.status.id.clone(), s.current().signed_until))
                    .collect()
            })
            .unwrap_or_default();
        let files = Files::Shared {
            location: &location,
            files: &state.files,
            unreadable: &state.unreadable,
        };
        let j = self.load_journal(&files, l, known)?;
        // Tokens the other brokers signed are not in this process's usage
        // ledger: their watermarks stand for them.
        for s in &j.jwt {
            let stored = s.status.signed_until;
            if stored > local.get(&s.status.id).copied().unwrap_or(0) {
                self.usage_ledger()
                    .untracked(&s.status.id, stored.min(s.status.not_after));
            }
        }
        Ok(Some(j))
    }

    fn load_journal(
        &self,
        files: &Files<'_>,
        l: journal::LoadedJournal,
        known: Option<&Journal>,
    ) -> Result<Journal, CaError> {
        let mut j = Journal::empty(l.sequence);
        for status in l.authorities {
            if let Some(k) = known {
                let reused = match (status.state, status.kind) {
                    (AuthorityState::Revoked, _) => false,
                    (_, AuthorityKind::X509) => reuse(&k.x509, &status)
                        .map(|slot| j.x509.push(slot))
                        .is_some(),
                    (_, AuthorityKind::Jwt) => reuse(&k.jwt, &status)
                        .map(|slot| j.jwt.push(slot))
                        .is_some(),
                };
                if reused {
                    continue;
                }
            }
            match (status.state, status.kind) {
                (AuthorityState::Revoked, _) => j.revoked.push(status),
                (_, AuthorityKind::X509) => {
                    let key_path = files.path(&x509_key_name(&status.id));
                    let cert_path = files.path(&x509_cert_name(&status.id));
                    let missing = |path: &Path| CaError::CorruptStore {
                        path: path.to_owned(),
                        reason: format!(
                            "the journal lists X.509 authority {} but this file is missing",
                            status.id
                        ),
                    };
                    let key_der = files
                        .read(&x509_key_name(&status.id), FileKind::Secret)?
                        .ok_or_else(|| missing(&key_path))?;
                    let cert_der = files
                        .read(&x509_cert_name(&status.id), FileKind::Public)?
                        .ok_or_else(|| missing(&cert_path))?;
                    let key = p256_key_from_pkcs8(&key_der, &key_path)?;
                    let x = X509Key::from_parts(cert_der, key, self.upstream.as_deref()).map_err(
                        |e| CaError::CorruptStore {
                            path: cert_path.clone(),
                            reason: e.to_string(),
                        },
                    )?;
                    x.check_trust_domain(&self.trust_domain, &cert_path)?;
                    if x.id != status.id {
                        return Err(CaError::CorruptStore {
                            path: cert_path,
                            reason: format!("holds authority {}, not {}", x.id, status.id),
                        });
                    }
                    j.x509.push(Slot::new(x, status));
                }
                (_, AuthorityKind::Jwt) => {
                    let path = files.path(&jwt_key_name(&status.id));
                    let der = files
                        .read(&jwt_key_name(&status.id), FileKind::Secret)?
                        .ok_or_else(|| CaError::CorruptStore {
                            path: path.clone(),
                            reason: format!(
                                "the journal lists JWT key {} but this file is missing",
                                status.id
                            ),
                        })?;
                    let k = JwtSigningKey::from_pkcs8(&der).map_err(|e| CaError::CorruptStore {
                        path: path.clone(),
                        reason: e.to_string(),
                    })?;
                    if k.kid() != status.id {
                        return Err(CaError::CorruptStore {
                            path,
                            reason: format!("holds key {}, not {}", k.kid(), status.id),
                        });
                    }
                    j.jwt.push(Slot::new(k, status));
                }
            }
        }
        Ok(j)
    }

    /// Imports the single authority and JWT key an earlier version kept
    /// (`x509-authority.{key,der}`, `jwt-authority.key`) as the active ones.
    fn import_legacy(&self, dir: &Path, now: SystemTime) -> Result<Option<Journal>, CaError> {
        let t = unix_secs(now);
        let mut j = Journal::empty(t);
        let key_path = dir.join(LEGACY_X509_KEY_FILE);
        let cert_path = dir.join(LEGACY_X509_CERT_FILE);
        if let (Some(key_der), Some(cert_der)) = (
            keystore::read_key(&key_path)?,
            keystore::read_public(&cert_path)?,
        ) {
            let key = p256_key_from_pkcs8(&key_der, &key_path)?;
            let x = X509Key::from_parts(cert_der, key, None)?;
            x.check_trust_domain(&self.trust_domain, &cert_path)?;
            if unix_secs(x.not_after) > t {
                let status = status_for(
                    x.id.clone(),
                    AuthorityKind::X509,
                    AuthorityState::Active,
                    unix_secs(x.not_before),
                    unix_secs(x.not_after),
                    false,
                    t,
                );
                keystore::write_key(&x509_key_path(dir, &x.id), &key_der)?;
                keystore::write_public(&x509_cert_path(dir, &x.id), &x.cert_der)?;
                j.x509.push(Slot::new(x, status));
            }
        }
        let jwt_path = dir.join(LEGACY_JWT_KEY_FILE);
        if let Some(der) = keystore::read_key(&jwt_path)? {
            let k = JwtSigningKey::from_pkcs8(&der)?;
            let status = status_for(
                k.kid().to_owned(),
                AuthorityKind::Jwt,
                AuthorityState::Active,
                t,
                unix_secs(
                    now.checked_add(self.ca_ttl)
                        .ok_or(CaError::TimeOutOfRange(now))?,
                ),
                false,
                t,
            );
            keystore::write_key(&jwt_key_path(dir, k.kid()), &der)?;
            j.jwt.push(Slot::new(k, status));
        }
        if j.x509.is_empty() && j.jwt.is_empty() {
            return Ok(None);
        }
        j.save(dir)?;
        for f in [
            LEGACY_X509_KEY_FILE,
            LEGACY_X509_CERT_FILE,
            LEGACY_JWT_KEY_FILE,
        ] {
            keystore::remove(&dir.join(f))?;
        }
        Ok(Some(j))
    }

    /// Runs `f` on a copy of the journal, persists the result and makes it
    /// current. Rotation steps are serialized (across every broker sharing
    /// the store, and on what it holds); issuance is not blocked.
    fn mutate<T>(&self, f: impl FnOnce(&mut Journal) -> Result<T, CaError>) -> Result<T, CaError> {
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let store = match &self.persist {
            Persist::Shared { store, .. } => store.clone(),
            Persist::Memory | Persist::Dir(_) => {
                let mut j = Journal::clone(&self.journal.load());
                let out = f(&mut j)?;
                let staged = std::mem::take(&mut j.staged);
                if let Persist::Dir(dir) = &self.persist {
                    for (name, bytes, kind) in staged {
                        match kind {
                            FileKind::Secret => keystore::write_key(&dir.join(name), &bytes)?,
                            FileKind::Public => keystore::write_public(&dir.join(name), &bytes)?,
                        }
                    }
                    j.save(dir)?;
                }
                self.journal.store(Arc::new(j));
                return Ok(out);
            }
        };
        let mut f = Some(f);
        let mut result = None;
        store.transact(&mut |state| {
            let current = self.journal.load();
            let mut j = match self.journal_from_shared(store.as_ref(), &state, Some(&current))? {
                Some(stored) => stored,
                None => Journal::clone(&current),
            };
            let f = f
                .take()
                .ok_or(CaError::Crypto("a rotation step ran twice"))?;
            let out = f(&mut j)?;
            let files = std::mem::take(&mut j.staged)
                .into_iter()
                .map(|(name, bytes, _)| (name, bytes))
                .collect();
            let write = SharedWrite {
                files,
                journal: j.encode()?,
                keep: j.file_names(),
            };
            result = Some((j, out));
            Ok(Some(write))
        })?;
        let (j, out) = result.ok_or(CaError::Crypto("a rotation step did not run"))?;
        let seq = j.sequence;
        self.journal.store(Arc::new(j));
        self.raise_mark(seq)?;
        Ok(out)
    }

    /// Follows rotation steps other brokers took on the shared store: if
    /// the stored journal differs from this one (beyond watermarks), it
    /// is loaded and made current, and `true` is returned (the bundle may
    /// have changed). Watermarks are merged either way. Without a shared
    /// store, does nothing.
    pub fn refresh(&self) -> Result<bool, CaError> {
        let Persist::Shared { store, .. } = &self.persist else {
            return Ok(false);
        };
        let Some(bytes) = store.journal()? else {
            return Err(CaError::CorruptStore {
                path: PathBuf::from(format!("{}/{}", store.location(), journal::JOURNAL_FILE)),
                reason:
                    "the shared CA's journal is gone; this broker keeps serving the CA it holds"
                        .into(),
            });
        };
        let location = store.location();
        let stored = journal::parse(
            &bytes,
            &PathBuf::from(format!("{location}/{}", journal::JOURNAL_FILE)),
        )?;
        let current = self.journal.load();
        if stored.sequence < current.sequence {
            return Err(CaError::CorruptStore {
                path: PathBuf::from(format!("{location}/{}", journal::JOURNAL_FILE)),
                reason: format!(
                    "its sequence {} is older than this broker's {}: the journal was rolled back and is not followed",
                    stored.sequence, current.sequence
                ),
            });
        }
        if journal::shape_of(stored.sequence, &stored.authorities) == current.shape() {
            for s in &stored.authorities {
                if let Some(slot) = current.x509.iter().find(|x| x.status.id == s.id) {
                    slot.signed(s.signed_until);
                }
                if let Some(slot) = current.jwt.iter().find(|x| x.status.id == s.id) {
                    // Tokens another broker signed are not in this
                    // process's usage ledger: the stored watermark above
                    // this broker's own stands for them, so that a key's
                    // revocation still sees them in use.
                    if s.signed_until > slot.current().signed_until {
                        self.usage_ledger()
                            .untracked(&s.id, s.signed_until.min(s.not_after));
                    }
                    slot.signed(s.signed_until);
                }
            }
            return Ok(false);
        }
        drop(current);
        let _guard = self.write.lock().unwrap_or_else(|p| p.into_inner());
        let state = store.load()?;
        let current = self.journal.load();
        let Some(j) = self.journal_from_shared(store.as_ref(), &state, Some(&current))? else {
            return Ok(false);
        };
        let changed = j.shape() != current.shape();
        drop(current);
        let seq = j.sequence;
        self.journal.store(Arc::new(j));
        self.raise_mark(seq)?;
        Ok(changed)
    }

    /// Makes a new key of `kind` in state `state` and adds it to `j`.
    fn create_key(
        &self,
        j: &mut Journal,
        kind: AuthorityKind,
        state: AuthorityState,
        now: SystemTime,
    ) -> Result<AuthorityStatus, CaError> {
        let t = unix_secs(now);
        let status = match kind {
            AuthorityKind::X509 => {
                let key = new_p256_key()?;
                let key_der = key.serialized_der().to_vec();
                let x = X509Key::create(
                    &self.trust_domain,
                    self.ca_ttl,
                    key,
                    self.upstream.as_deref(),
                    now,
                )?;
                j.staged
                    .push((x509_key_name(&x.id), key_der, FileKind::Secret));
                j.staged
                    .push((x509_cert_name(&x.id), x.cert_der.clone(), FileKind::Public));
                let status = status_for(
                    x.id.clone(),
                    kind,
                    state,
                    t,
                    unix_secs(x.not_after),
                    x.upstream_root.is_some(),
                    t,
                );
                j.x509.push(Slot::new(x, status.clone()));
                status
            }
            AuthorityKind::Jwt => {
                let der = JwtSigningKey::generate_pkcs8()?;
                let k = JwtSigningKey::from_pkcs8(&der)?;
                j.staged
                    .push((jwt_key_name(k.kid()), der.clone(), FileKind::Secret));
                let status = status_for(
                    k.kid().to_owned(),
                    kind,
                    state,
                    t,
                    unix_secs(
                        now.checked_add(self.ca_ttl)
                            .ok_or(CaError::TimeOutOfRange(now))?,
                    ),
                    false,
                    t,
                );
                j.jwt.push(Slot::new(k, status.clone()));
                status
            }
        };
        j.sequence += 1;
        Ok(status)
    }

    /// Replaces a missing or expired active authority at once (start-up
    /// after a long outage): the old one, if any, becomes old.
    fn replace_active(
        &self,
        j: &mut Journal,
        kind: AuthorityKind,
        now: SystemTime,
    ) -> Result<(), CaError> {
        let t = unix_secs(now);
        for s in statuses_mut(j, kind) {
            if s.state == AuthorityState::Active {
                s.state = AuthorityState::Old;
                s.deactivated_at = Some(t);
            }
        }
        let status = self.create_key(j, kind, AuthorityState::Active, now)?;
        tracing::info!(kind = %kind, id = %status.id, "new active authority");
        Ok(())
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// Upper bound on any SVID lifetime.
    pub fn max_svid_ttl(&self) -> Duration {
        self.max_svid_ttl
    }

    /// When the active X.509 authority expires; no SVID outlives it.
    pub fn authority_not_after(&self) -> SystemTime {
        self.journal
            .load()
            .active_x509()
            .map_or(UNIX_EPOCH, |a| a.key.not_after)
    }

    /// The key id that new JWT-SVIDs carry.
    pub fn jwt_key_id(&self) -> String {
        self.journal
            .load()
            .active_jwt()
            .map_or_else(String::new, |k| k.status.id.clone())
    }

    /// The id of the X.509 authority that signs new SVIDs.
    pub fn active_x509_id(&self) -> String {
        self.journal
            .load()
            .active_x509()
            .map_or_else(String::new, |k| k.status.id.clone())
    }

    /// Whether this CA runs under an upstream PKI.
    pub fn has_upstream(&self) -> bool {
        self.upstream.is_some()
    }

    /// Every authority and its state: X.509 first, then JWT, then revoked.
    pub fn authorities(&self) -> Vec<AuthorityStatus> {
        self.journal.load().statuses()
    }

    /// Ids of the tainted authorities (X.509 ids and JWT kids) still in
    /// the bundle: agents re-issue what they signed.
    pub fn tainted_ids(&self) -> Vec<String> {
        Self::tainted_of(&self.journal.load())
    }

    /// The bundle's sequence number: it changes whenever the bundle does.
    pub fn sequence(&self) -> u64 {
        self.journal.load().sequence
    }

    /// Signs with the active JWT key, raising its watermark to `exp` and
    /// recording what was signed in the usage ledger.
    pub(crate) fn with_active_jwt<T>(
        &self,
        signed: JwtSigned<'_>,
        exp: u64,
        now: u64,
        f: impl FnOnce(&JwtSigningKey) -> Result<T, CaError>,
    ) -> Result<T, CaError> {
        let j = self.journal.load();
        let slot = j.active_jwt().ok_or(CaError::Crypto("no active JWT key"))?;
        // A key past its end signs nothing: verifiers cannot tell from the
        // bundle, and pruning removes an ended key without a usage check.
        if now >= slot.status.not_after {
            return Err(CaError::AuthorityExpired {
                not_after: UNIX_EPOCH + Duration::from_secs(slot.status.not_after),
            });
        }
        slot.signed(exp);
        let out = f(&slot.key)?;
        let mut usage = self.usage_ledger();
        match signed {
            JwtSigned::JwtSvid => usage.jwt_svid(slot.key.kid(), exp, now),
            JwtSigned::DelegationToken { jti } => {
                usage.delegation_token(slot.key.kid(), jti, exp, now);
            }
        }
        Ok(out)
    }

    /// A renewal that re-signed delegation token `jti` was not handed
    /// out: the copy its holder still presents, signed by `kid` until
    /// `exp`, counts against `kid` again (see [`Ca::jwt_key_usage`]).
    pub fn restore_delegation_token(&self, kid: &str, jti: &str, exp: u64, now: SystemTime) {
        self.usage_ledger()
            .restore_delegation_token(kid, jti, exp, unix_secs(now));
    }

    fn usage_ledger(&self) -> std::sync::MutexGuard<'_, UsageLedger> {
        // The ledger holds no invariant a panic could break half-way.
        self.usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// What JWT key `kid` signed that may still be presented at `now`:
    /// unexpired JWT-SVIDs and delegation tokens, and the watermark of
    /// what it signed before this process started.
    pub fn jwt_key_usage(&self, kid: &str, now: SystemTime) -> KeyUsage {
        self.usage_ledger().usage(kid, unix_secs(now))
    }

    fn check_subject(&self, id: &SpiffeId) -> Result<(), CaError> {
        if !id.is_member_of(&self.trust_domain) {
            return Err(CaError::ForeignTrustDomain {
                id: id.clone(),
                trust_domain: self.trust_domain.clone(),
            });
        }
        if id.is_trust_domain_id() {
            return Err(CaError::TrustDomainIdNotAllowed(id.clone()));
        }
        Ok(())
    }

    /// Issues an X509-SVID for the key in `csr_der`.
    ///
    /// The CSR must be a P-256 key signed with ECDSA-SHA256, and its
    /// self-signature must verify; everything it requests is ignored. The
    /// leaf has exactly one URI SAN (`spiffe_id`, which must be in this trust
    /// domain and not the trust domain's own ID), `dns_names` as DNS SANs,
    /// critical basicConstraints cA=false, critical keyUsage
    /// digitalSignature, EKU serverAuth+clientAuth, SKI and AKI, a random
    /// positive 127-bit serial, NotBefore `now - 10 s`, and NotAfter
    /// `min(now + ttl, now + max_svid_ttl, authority NotAfter)`.
    pub fn sign_x509_svid(
        &self,
        csr_der: &[u8],
        spiffe_id: &SpiffeId,
        ttl: Duration,
        dns_names: &[String],
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        self.check_subject(spiffe_id)?;
        let key = verify_csr(csr_der)?;
        self.issue(&key, spiffe_id, dns_names, &[], ttl, now)
    }

    fn issue(
        &self,
        subject_key: &impl PublicKeyData,
        spiffe_id: &SpiffeId,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<IssuedSvid, CaError> {
        if ttl < Duration::from_secs(1) {
            return Err(CaError::ZeroTtl);
        }
        let journal = self.journal.load();
        let slot = journal
            .active_x509()
            .ok_or(CaError::Crypto("no active X.509 authority"))?;
        let authority = &slot.key;
        let mut not_after = authority.not_after;
        for cap in [ttl, self.max_svid_ttl] {
            if let Some(t) = now.checked_add(cap) {
                not_after = not_after.min(t);
            }
        }
        let not_after = floor_secs(not_after);
        if not_after <= now {
            return Err(CaError::AuthorityExpired {
                not_after: authority.not_after,
            });
        }
        let mut sans = Vec::with_capacity(1 + dns_names.len() + ips.len());
        sans.push(SanType::URI(Ia5String::try_from(spiffe_id.as_str())?));
        for name in dns_names {
            if !valid_dns_name(name) {
                return Err(CaError::InvalidDnsName { name: name.clone() });
            }
            sans.push(SanType::DnsName(Ia5String::try_from(name.as_str())?));
        }
        sans.extend(ips.iter().copied().map(SanType::IpAddress));

        let (serial, serial_hex) = random_serial()?;
        let mut params = CertificateParams::default();
        params.not_before =
            crate::time_util::to_offset(now.checked_sub(BACKDATE).unwrap_or(UNIX_EPOCH))?;
        params.not_after = crate::time_util::to_offset(not_after)?;
        params.serial_number = Some(serial);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "SPIFFE");
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        // ExplicitNoCa writes a critical basicConstraints with cA=false and the SKI.
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        slot.signed(unix_secs(not_after));
        let cert = params.signed_by(subject_key, &authority.issuer)?;
        let mut chain = Vec::with_capacity(2 + authority.chain_tail.len());
        chain.push(cert.der().to_vec());
        if authority.upstream_root.is_some() {
            chain.push(authority.cert_der.clone());
            chain.extend(authority.chain_tail.iter().cloned());
        }
        Ok(IssuedSvid {
            spiffe_id: spiffe_id.clone(),
            cert_chain_der: chain,
            serial_hex,
            not_after,
            authority_id: slot.status.id.clone(),
        })
    }

    /// Signs an ES256 JWT-SVID: header `alg`, `kid` (the active key's id),
    /// `typ: JWT`; claims `sub`, `aud` (array, at least one non-empty
    /// entry), `exp = now + min(ttl, max_svid_ttl)` in whole seconds (and
    /// never past the key's own expiry), `iat`, and `jti` (128 random
    /// bits, hex). Returns the token and `exp`.
    pub fn sign_jwt_svid(
        &self,
        spiffe_id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Secret, SystemTime), CaError> {
        self.check_subject(spiffe_id)?;
        if audience.is_empty() || audience.iter().any(String::is_empty) {
            return Err(CaError::EmptyAudience);
        }
        let ttl = ttl.min(self.max_svid_ttl);
        if ttl < Duration::from_secs(1) {
            return Err(CaError::ZeroTtl);
        }
        let iat = unix_secs(now);
        let key_not_after = self
            .journal
            .load()
            .active_jwt()
            .map_or(0, |k| k.status.not_after);
        let exp = iat.saturating_add(ttl.as_secs()).min(key_not_after);
        if exp <= iat {
            return Err(CaError::AuthorityExpired {
                not_after: UNIX_EPOCH + Duration::from_secs(key_not_after),
            });
        }
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti).map_err(|_| CaError::Crypto("random jti"))?;
        let claims = json!({
            "sub": spiffe_id.as_str(),
            "aud": audience,
            "exp": exp,
            "iat": iat,
            "jti": hex::encode(jti),
        });
        let token = self.with_active_jwt(JwtSigned::JwtSvid, exp, iat, |k| k.sign(&claims))?;
        Ok((Secret::new(token), UNIX_EPOCH + Duration::from_secs(exp)))
    }

    /// The current trust bundle: the trust anchor of every prepared,
    /// active and old X.509 authority (an upstream root once for all its
    /// intermediates) and every such JWT key.
    pub fn bundle(&self) -> TrustBundle {
        self.bundle_of(&self.journal.load())
    }

    /// The bundle and the ids of its tainted authorities (see
    /// [`Ca::tainted_ids`]) of one state of the journal: a rotation step
    /// between two reads would pair a bundle with the taint of another.
    pub fn bundle_with_taint(&self) -> (TrustBundle, Vec<String>) {
        let j = self.journal.load();
        (self.bundle_of(&j), Self::tainted_of(&j))
    }

    fn tainted_of(j: &Journal) -> Vec<String> {
        j.statuses()
            .into_iter()
            .filter(|s| s.tainted && s.state != AuthorityState::Revoked)
            .map(|s| s.id)
            .collect()
    }

    fn bundle_of(&self, j: &Journal) -> TrustBundle {
        let mut x509_authorities: Vec<Vec<u8>> = Vec::new();
        for s in &j.x509 {
            let anchor = s.key.trust_anchor();
            if !x509_authorities.iter().any(|a| a == anchor) {
                x509_authorities.push(anchor.to_vec());
            }
        }
        TrustBundle {
            trust_domain: self.trust_domain.clone(),
            x509_authorities,
            jwt_authorities: j.jwt.iter().map(|k| k.key.authority()).collect(),
            sequence: j.sequence,
            refresh_hint_secs: self.refresh_hint_secs,
        }
    }

    /// A certificate and fresh key for the broker's own HTTPS listener: an
    /// X509-SVID for `spiffe://<td>/baton/broker` with `dns_names` as DNS
    /// SANs and the IP SAN 127.0.0.1, issued like any other SVID.
    pub fn broker_serving_identity(
        &self,
        dns_names: &[String],
        ttl: Duration,
        now: SystemTime,
    ) -> Result<(Vec<Vec<u8>>, PrivateKeyBytes), CaError> {
        let id = self.trust_domain.id(BROKER_ID_PATH)?;
        let key = WorkloadKey::generate()?;
        let svid = self.issue(
            key.key_pair(),
            &id,
            dns_names,
            &[IpAddr::V4(Ipv4Addr::LOCALHOST)],
            ttl,
            now,
        )?;
        Ok((
            svid.cert_chain_der,
            PrivateKeyBytes::new(key.pkcs8_der().to_vec()),
        ))
    }

    // ---- rotation ----

    fn find(&self, j: &Journal, id: &str) -> Result<AuthorityStatus, CaError> {
        j.statuses()
            .into_iter()
            .find(|s| s.id == id)
            .ok_or_else(|| CaError::UnknownAuthority { id: id.to_owned() })
    }

    /// Prepares a new authority of each of `kinds`: published in the
    /// bundle at once, signing nothing until activated. Refused while one
    /// of that kind is already prepared.
    pub fn prepare(
        &self,
        kinds: &[AuthorityKind],
        now: SystemTime,
    ) -> Result<Vec<RotationEvent>, CaError> {
        // One of each kind at most: `[x509, x509]` prepares one.
        let kinds = kinds.iter().fold(Vec::new(), |mut once, k| {
            if !once.contains(k) {
                once.push(*k);
            }
            once
        });
        self.mutate(|j| {
            for &kind in &kinds {
                if let Some(p) = statuses(j, kind).find(|s| s.state == AuthorityState::Prepared) {
                    return Err(CaError::RotationRefused(format!(
                        "{kind} authority {} is already prepared; activate it (`baton ca activate {}`) or revoke it before preparing another",
                        p.id, p.id
                    )));
                }
            }
            let mut events = Vec::new();
            for &kind in &kinds {
                let authority = self.create_key(j, kind, AuthorityState::Prepared, now)?;
                events.push(RotationEvent {
                    action: RotationAction::Prepared,
                    authority,
                });
            }
            Ok(events)
        })
    }

    /// Activates the prepared authority `id` (or, with `None`, every
    /// prepared one): it signs from now on and the previous active one
    /// becomes old.
    pub fn activate(
        &self,
        id: Option<&str>,
        now: SystemTime,
    ) -> Result<Vec<RotationEvent>, CaError> {
        self.mutate(|j| {
            let targets: Vec<AuthorityStatus> = match id {
                Some(id) => {
                    let s = self.find(j, id)?;
                    if s.state != AuthorityState::Prepared {
                        return Err(CaError::RotationRefused(format!(
                            "{} authority {id} is {}; only a prepared authority can be activated (prepare one with `baton ca prepare`)",
                            s.kind, s.state
                        )));
                    }
                    vec![s]
                }
                None => {
                    let all: Vec<_> = j
                        .statuses()
                        .into_iter()
                        .filter(|s| s.state == AuthorityState::Prepared)
                        .collect();
                    if all.is_empty() {
                        return Err(CaError::RotationRefused(
                            "nothing is prepared: run `baton ca prepare` first and let the bundle reach every agent".into(),
                        ));
                    }
                    all
                }
            };
            let t = unix_secs(now);
            let mut events = Vec::new();
            for target in targets {
                if target.not_after <= t {
                    return Err(CaError::RotationRefused(format!(
                        "{} authority {} has expired; revoke it and prepare a new one",
                        target.kind, target.id
                    )));
                }
                for s in statuses_mut(j, target.kind) {
                    if s.state == AuthorityState::Active {
                        s.state = AuthorityState::Old;
                        s.deactivated_at = Some(t);
                        events.push(RotationEvent {
                            action: RotationAction::Deactivated,
                            authority: s.clone(),
                        });
                    } else if s.id == target.id {
                        s.state = AuthorityState::Active;
                        s.activated_at = Some(t);
                        events.push(RotationEvent {
                            action: RotationAction::Activated,
                            authority: s.clone(),
                        });
                    }
                }
            }
            j.sequence += 1;
            Ok(events)
        })
    }

    /// Taints the old authority `id`: everything it signed must be
    /// re-issued promptly (agents see the taint on their next sync).
    pub fn taint(&self, id: &str, _now: SystemTime) -> Result<RotationEvent, CaError> {
        self.mutate(|j| {
            let s = self.find(j, id)?;
            let refuse = |why: String| Err(CaError::RotationRefused(why));
            match s.state {
                AuthorityState::Old if s.tainted => {
                    return refuse(format!("{} authority {id} is already tainted", s.kind));
                }
                AuthorityState::Old => {}
                AuthorityState::Active => {
                    return refuse(format!(
                        "{} authority {id} is the active one: prepare and activate a new authority first (`baton ca prepare`, `baton ca activate`), then taint {id}",
                        s.kind
                    ));
                }
                AuthorityState::Prepared => {
                    return refuse(format!(
                        "{} authority {id} is only prepared and has signed nothing; revoke it instead",
                        s.kind
                    ));
                }
                AuthorityState::Revoked => {
                    return refuse(format!("{} authority {id} is already revoked", s.kind));
                }
            }
            let mut out = None;
            for st in statuses_mut(j, s.kind) {
                if st.id == id {
                    st.tainted = true;
                    out = Some(st.clone());
                }
            }
            let authority = out.ok_or_else(|| CaError::UnknownAuthority { id: id.to_owned() })?;
            // Agents report the sequence they applied; a taint gets its own,
            // so the broker can tell who has seen it.
            j.sequence += 1;
            Ok(RotationEvent {
                action: RotationAction::Tainted,
                authority,
            })
        })
    }

    /// Revokes authority `id`: it leaves the bundle, so whatever it signed
    /// is rejected everywhere, and its key is deleted. Only a tainted old
    /// authority (whose SVIDs were re-issued) or a prepared one may be
    /// revoked; an authority under an upstream CA cannot be (its SVIDs
    /// chain to the upstream root, which stays trusted); a JWT key cannot
    /// be while a token it signed may still be presented
    /// ([`CaError::KeyInUse`], see [`Ca::jwt_key_usage`]): it stays in the
    /// bundle until they expired, so validators keep accepting them.
    pub fn revoke(&self, id: &str, now: SystemTime) -> Result<RotationEvent, CaError> {
        self.revoke_checked(id, true, now)
    }

    /// [`Ca::revoke`] without the check that no token signed by a JWT key
    /// is still live: those tokens fail everywhere at once. For an
    /// operator's explicit `--force`.
    pub fn force_revoke(&self, id: &str, now: SystemTime) -> Result<RotationEvent, CaError> {
        self.revoke_checked(id, false, now)
    }

    fn revoke_checked(
        &self,
        id: &str,
        check_usage: bool,
        now: SystemTime,
    ) -> Result<RotationEvent, CaError> {
        let event = self.mutate(|j| {
            let s = self.find(j, id)?;
            let refuse = |why: String| Err(CaError::RotationRefused(why));
            match s.state {
                AuthorityState::Active => {
                    return refuse(format!(
                        "{} authority {id} is the active one; revoking it would stop all issuance. Prepare and activate a new one, taint {id}, then revoke it",
                        s.kind
                    ));
                }
                AuthorityState::Old if !s.tainted => {
                    return refuse(format!(
                        "{} authority {id} is not tainted: what it signed would fail at once. Taint it first (`baton ca taint {id}`) and let agents re-issue",
                        s.kind
                    ));
                }
                AuthorityState::Revoked => {
                    return refuse(format!("{} authority {id} is already revoked", s.kind));
                }
                AuthorityState::Old | AuthorityState::Prepared => {}
            }
            if s.upstream {
                return refuse(format!(
                    "X.509 authority {id} is an intermediate of the upstream CA: its SVIDs chain to the upstream root, which stays in the bundle, so removing it here would not reject them. Revoke it in the upstream PKI"
                ));
            }
            if check_usage && s.kind == AuthorityKind::Jwt && s.state == AuthorityState::Old {
                let usage = self.usage_ledger().usage(id, unix_secs(now));
                if usage.in_use(unix_secs(now)) {
                    return Err(CaError::KeyInUse {
                        id: id.to_owned(),
                        usage,
                    });
                }
            }
            let mut status = s;
            status.state = AuthorityState::Revoked;
            status.deactivated_at.get_or_insert(unix_secs(now));
            match status.kind {
                AuthorityKind::X509 => j.x509.retain(|x| x.status.id != id),
                AuthorityKind::Jwt => j.jwt.retain(|x| x.status.id != id),
            }
            j.revoked.push(status.clone());
            j.sequence += 1;
            Ok(RotationEvent {
                action: RotationAction::Revoked,
                authority: status,
            })
        })?;
        self.usage_ledger().forget(id);
        self.remove_key_files(&event.authority)?;
        Ok(event)
    }

    /// Raises the shared CA's high-water mark to `seq` (in memory and in
    /// the mark file).
    fn raise_mark(&self, seq: u64) -> Result<(), CaError> {
        let Persist::Shared { mark, .. } = &self.persist else {
            return Ok(());
        };
        let prev = self
            .mark_seen
            .fetch_max(seq, std::sync::atomic::Ordering::AcqRel);
        if seq > prev
            && let Some(path) = mark
        {
            keystore::write_public(path, seq.to_string().as_bytes())?;
        }
        Ok(())
    }

    fn remove_key_files(&self, s: &AuthorityStatus) -> Result<(), CaError> {
        // A shared store drops what the journal no longer names in the
        // step itself.
        let Persist::Dir(dir) = &self.persist else {
            return Ok(());
        };
        match s.kind {
            AuthorityKind::X509 => {
                keystore::remove(&x509_key_path(dir, &s.id))?;
                keystore::remove(&x509_cert_path(dir, &s.id))
            }
            AuthorityKind::Jwt => keystore::remove(&jwt_key_path(dir, &s.id)),
        }
    }

    /// Persists the journal if issuance has raised a watermark since it was
    /// last written (call it periodically; a restart otherwise only knows
    /// the watermarks of the last rotation step).
    pub fn checkpoint(&self) -> Result<(), CaError> {
        let j = self.journal.load();
        let stale = j.x509.iter().any(|s| s.current() != s.status)
            || j.jwt.iter().any(|s| s.current() != s.status);
        drop(j);
        if !stale || matches!(self.persist, Persist::Memory) {
            return Ok(());
        }
        self.mutate(|j| {
            for s in &mut j.x509 {
                s.status = s.current();
            }
            for s in &mut j.jwt {
                s.status = s.current();
            }
            Ok(())
        })
    }

    /// Drops old authorities whose signatures have all expired (they leave
    /// the bundle) and forgets revoked ones past their own expiry.
    pub fn prune(&self, now: SystemTime) -> Result<Vec<RotationEvent>, CaError> {
        let t = unix_secs(now);
        let due = |s: &AuthorityStatus| s.state == AuthorityState::Old && s.retained_until() <= t;
        let current = self.journal.load();
        let any =
            current.statuses().iter().any(due) || current.revoked.iter().any(|r| r.not_after <= t);
        if !any {
            return Ok(Vec::new());
        }
        let events = self.mutate(|j| {
            let mut events = Vec::new();
            for s in j.statuses() {
                if due(&s) {
                    events.push(RotationEvent {
                        action: RotationAction::Pruned,
                        authority: s,
                    });
                }
            }
            j.x509.retain(|x| !due(&x.current()));
            j.jwt.retain(|x| !due(&x.current()));
            j.revoked.retain(|r| r.not_after > t);
            if !events.is_empty() {
                j.sequence += 1;
            }
            Ok(events)
        })?;
        for e in &events {
            self.usage_ledger().forget(&e.authority.id);
            self.remove_key_files(&e.authority)?;
        }
        Ok(events)
    }

    /// One step of the automatic schedule at `now`: prunes, prepares the
    /// next authority of each kind once the active one is `prepare_at`
    /// through its life, and activates it at `activate_at` if
    /// `propagated(prepared_at)` says every agent has the bundle that
    /// carries it (or, regardless, once the active one is halfway from
    /// `activate_at` to its expiry).
    pub fn scheduled_step(
        &self,
        schedule: &RotationSchedule,
        propagated: &dyn Fn(u64) -> bool,
        now: SystemTime,
    ) -> Result<Vec<RotationEvent>, CaError> {
        let t = unix_secs(now);
        let mut events = self.prune(now)?;
        for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
            let j = self.journal.load();
            let Some(active) = statuses(&j, kind).find(|s| s.state == AuthorityState::Active)
            else {
                continue;
            };
            let life = active.not_after.saturating_sub(active.created_at).max(1);
            #[allow(clippy::cast_precision_loss)]
            let frac = t.saturating_sub(active.created_at) as f64 / life as f64;
            let prepared = statuses(&j, kind)
                .find(|s| s.state == AuthorityState::Prepared)
                .cloned();
            drop(j);
            match prepared {
                None if frac >= schedule.prepare_at => {
                    events.extend(self.prepare(&[kind], now)?);
                }
                Some(p) if frac >= schedule.activate_at => {
                    let overdue = frac >= (schedule.activate_at + 1.0) / 2.0;
                    if propagated(p.created_at) || overdue {
                        if overdue {
                            tracing::warn!(kind = %kind, id = %p.id, "activating although not every agent has synced the bundle that carries it: the active authority is close to expiry");
                        }
                        events.extend(self.activate(Some(&p.id), now)?);
                    }
                }
                _ => {}
            }
        }
        Ok(events)
    }

    /// The id of the X.509 authority that signed `leaf_der` (its
    /// authorityKeyIdentifier), if it has one.
    pub fn signer_of(leaf_der: &[u8]) -> Option<String> {
        let cert = parse_cert(leaf_der).ok()?;
        authority_key_id(&cert)
    }
}

fn statuses(j: &Journal, kind: AuthorityKind) -> Box<dyn Iterator<Item = &AuthorityStatus> + '_> {
    match kind {
        AuthorityKind::X509 => Box::new(j.x509.iter().map(|s| &s.status)),
        AuthorityKind::Jwt => Box::new(j.jwt.iter().map(|s| &s.status)),
    }
}

fn statuses_mut(
    j: &mut Journal,
    kind: AuthorityKind,
) -> Box<dyn Iterator<Item = &mut AuthorityStatus> + '_> {
    match kind {
        AuthorityKind::X509 => Box::new(j.x509.iter_mut().map(|s| &mut s.status)),
        AuthorityKind::Jwt => Box::new(j.jwt.iter_mut().map(|s| &mut s.status)),
    }
}

/// The slot of `known` for the stored `status`, if this process holds its
/// key: the key and watermark are shared, the watermark raised to the
/// stored one, the status taken from the store.
fn reuse<K>(known: &[Slot<K>], status: &AuthorityStatus) -> Option<Slot<K>> {
    known.iter().find(|s| s.status.id == status.id).map(|s| {
        let slot = Slot {
            key: s.key.clone(),
            status: status.clone(),
            signed_until: s.signed_until.clone(),
        };
        slot.signed(status.signed_until);
        slot
    })
}

/// Moves a CA kept in the key directory `dir` into an empty shared store
/// (a broker switching to a shared CA keeps its trust bundle). Nothing is
/// moved if the store already holds a journal, or `dir` none.
fn move_into_shared(store: &dyn SharedCaStore, dir: &Path) -> Result<(), CaError> {
    let Some(l) = journal::read(dir)? else {
        return Ok(());
    };
    let journal_bytes =
        keystore::read_public(&dir.join(journal::JOURNAL_FILE))?.ok_or_else(|| {
            CaError::CorruptStore {
                path: dir.join(journal::JOURNAL_FILE),
                reason: "vanished while being read".into(),
            }
        })?;
    let mut files = Vec::new();
    for s in l
        .authorities
        .iter()
        .filter(|s| s.state != AuthorityState::Revoked)
    {
        let names = match s.kind {
            AuthorityKind::X509 => vec![
                (x509_key_name(&s.id), FileKind::Secret),
                (x509_cert_name(&s.id), FileKind::Public),
            ],
            AuthorityKind::Jwt => vec![(jwt_key_name(&s.id), FileKind::Secret)],
        };
        for (name, kind) in names {
            let bytes =
                Files::Dir(dir)
                    .read(&name, kind)?
                    .ok_or_else(|| CaError::CorruptStore {
                        path: dir.join(&name),
                        reason: format!(
                            "the journal lists authority {} but this file is missing",
                            s.id
                        ),
                    })?;
            files.push((name, bytes));
        }
    }
    let keep: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    let mut moved = false;
    store.transact(&mut |state| {
        if state.journal.is_some() {
            return Ok(None);
        }
        // Only into an empty store: key rows without their journal are a
        // shared CA that lost its journal (a partial restore, a writer of
        // the database), which this broker's own CA must not replace.
        if !state.files.is_empty() || !state.unreadable.is_empty() {
            return Err(CaError::CorruptStore {
                path: PathBuf::from(format!("{}/{}", store.location(), journal::JOURNAL_FILE)),
                reason: format!(
                    "the shared CA's journal is gone and {} key row(s) remain; this broker's own CA in {} is not moved over them. Restore the database from a backup; to start from this broker's CA on purpose, empty the tables ca_journal and ca_files first",
                    state.files.len() + state.unreadable.len(),
                    dir.display()
                ),
            });
        }
        moved = true;
        Ok(Some(SharedWrite {
            files: files.clone(),
            journal: journal_bytes.clone(),
            keep: keep.clone(),
        }))
    })?;
    if moved {
        // The keys now live sealed in the store: no clear copy stays
        // behind to be imported or stolen later.
        for name in &keep {
            keystore::remove(&dir.join(name))?;
        }
        keystore::remove(&dir.join(journal::JOURNAL_FILE))?;
        tracing::info!(
            from = %dir.display(),
            to = %store.location(),
            "the CA's journal and keys were moved into the shared store and removed from the key directory"
        );
    }
    Ok(())
}
