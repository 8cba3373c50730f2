//! The authority journal: every X.509 authority and JWT key the CA holds,
//! with its place in the rotation (prepared → active → old, tainted,
//! revoked), persisted as `journal.json` beside the keys.
//!
//! Files in the key directory: `journal.json` (no secrets, 0644),
//! `x509-<id>.key` (PKCS#8, 0600) and `x509-<id>.der` for each X.509
//! authority, `jwt-<kid>.key` for each JWT key. The journal is written
//! after the key files it names, so a crash leaves at worst an unused key
//! file, never a journal naming a missing key.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use crate::CaError;
use crate::authority::X509Key;
use crate::jwt::JwtSigningKey;
use crate::keystore;

pub(crate) const JOURNAL_FILE: &str = "journal.json";
const JOURNAL_VERSION: u32 = 1;

/// Which kind of signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorityKind {
    /// Signs X509-SVIDs.
    X509,
    /// Signs JWT-SVIDs and delegation tokens.
    Jwt,
}

impl std::fmt::Display for AuthorityKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::X509 => "x509",
            Self::Jwt => "jwt",
        })
    }
}

/// Where an authority is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuthorityState {
    /// Published in the bundle, signs nothing yet.
    Prepared,
    /// Signs everything new. Exactly one per kind.
    Active,
    /// Signs nothing; stays in the bundle until what it signed expired.
    Old,
    /// Removed from the bundle: what it signed is rejected everywhere.
    Revoked,
}

impl std::fmt::Display for AuthorityState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Prepared => "prepared",
            Self::Active => "active",
            Self::Old => "old",
            Self::Revoked => "revoked",
        })
    }
}

/// What an operator sees of one authority (and what the journal stores).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthorityStatus {
    /// X.509: hex subjectKeyIdentifier (leaves name it in their
    /// authorityKeyIdentifier). JWT: the `kid`.
    pub id: String,
    pub kind: AuthorityKind,
    pub state: AuthorityState,
    /// Everything it signed must be re-issued promptly.
    pub tainted: bool,
    /// Unix seconds.
    pub created_at: u64,
    /// Unix seconds; nothing it signs outlives it.
    pub not_after: u64,
    #[serde(default)]
    pub activated_at: Option<u64>,
    #[serde(default)]
    pub deactivated_at: Option<u64>,
    /// The latest expiry of anything it signed (0: nothing yet).
    #[serde(default)]
    pub signed_until: u64,
    /// Signed by the configured upstream CA (an intermediate).
    #[serde(default)]
    pub upstream: bool,
}

impl AuthorityStatus {
    /// When an old authority may leave the bundle: once everything it
    /// signed has expired, and never later than its own expiry.
    pub fn retained_until(&self) -> u64 {
        self.signed_until.min(self.not_after)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct JournalFile {
    version: u32,
    sequence: u64,
    authorities: Vec<AuthorityStatus>,
}

/// A key with its journal record. Cloning shares the key and the
/// `signed_until` watermark, which issuance raises without a lock.
#[derive(Debug)]
pub(crate) struct Slot<K> {
    pub(crate) key: Arc<K>,
    pub(crate) status: AuthorityStatus,
    pub(crate) signed_until: Arc<AtomicU64>,
}

impl<K> Clone for Slot<K> {
    fn clone(&self) -> Self {
        Self {
            key: Arc::clone(&self.key),
            status: self.status.clone(),
            signed_until: Arc::clone(&self.signed_until),
        }
    }
}

impl<K> Slot<K> {
    pub(crate) fn new(key: K, status: AuthorityStatus) -> Self {
        let w = status.signed_until;
        Self {
            key: Arc::new(key),
            status,
            signed_until: Arc::new(AtomicU64::new(w)),
        }
    }

    /// Records that something this key signed lives until `exp`.
    pub(crate) fn signed(&self, exp: u64) {
        self.signed_until.fetch_max(exp, Ordering::AcqRel);
    }

    /// The record with the current watermark.
    pub(crate) fn current(&self) -> AuthorityStatus {
        let mut s = self.status.clone();
        s.signed_until = s
            .signed_until
            .max(self.signed_until.load(Ordering::Acquire));
        s
    }
}

/// One immutable state of the CA's keys; replaced whole on every change.
#[derive(Debug, Clone)]
pub(crate) struct Journal {
    pub(crate) x509: Vec<Slot<X509Key>>,
    pub(crate) jwt: Vec<Slot<JwtSigningKey>>,
    /// Revoked authorities, kept for `ca show` until they would have expired.
    pub(crate) revoked: Vec<AuthorityStatus>,
    pub(crate) sequence: u64,
    /// Key and certificate files a rotation step created, by name, written
    /// before the journal that names them (emptied by `Ca::mutate`).
    pub(crate) staged: Vec<(String, Vec<u8>, FileKind)>,
}

/// Whether a stored file is a private key or public.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FileKind {
    Secret,
    Public,
}

impl Journal {
    pub(crate) fn empty(sequence: u64) -> Self {
        Self {
            x509: Vec::new(),
            jwt: Vec::new(),
            revoked: Vec::new(),
            sequence,
            staged: Vec::new(),
        }
    }

    /// The names of every file this journal needs (keys and certificates
    /// of the authorities that are not revoked).
    pub(crate) fn file_names(&self) -> Vec<String> {
        let mut names = Vec::new();
        for s in &self.x509 {
            names.push(x509_key_name(&s.status.id));
            names.push(x509_cert_name(&s.status.id));
        }
        for s in &self.jwt {
            names.push(jwt_key_name(&s.status.id));
        }
        names
    }

    /// What identifies this state apart from watermarks: a follower
    /// reloads when it differs from the stored one.
    pub(crate) fn shape(&self) -> (u64, Vec<(String, AuthorityState, bool)>) {
        shape_of(self.sequence, &self.statuses())
    }
    pub(crate) fn active_x509(&self) -> Option<&Slot<X509Key>> {
        self.x509
            .iter()
            .find(|s| s.status.state == AuthorityState::Active)
    }

    pub(crate) fn active_jwt(&self) -> Option<&Slot<JwtSigningKey>> {
        self.jwt
            .iter()
            .find(|s| s.status.state == AuthorityState::Active)
    }

    /// Every authority, X.509 first, then JWT, then the revoked ones.
    pub(crate) fn statuses(&self) -> Vec<AuthorityStatus> {
        self.x509
            .iter()
            .map(Slot::current)
            .chain(self.jwt.iter().map(Slot::current))
            .chain(self.revoked.iter().cloned())
            .collect()
    }

    /// The journal as stored (JSON).
    pub(crate) fn encode(&self) -> Result<Vec<u8>, CaError> {
        let file = JournalFile {
            version: JOURNAL_VERSION,
            sequence: self.sequence,
            authorities: self.statuses(),
        };
        serde_json::to_vec_pretty(&file)
            .map_err(|_| CaError::Crypto("encode the authority journal"))
    }

    /// Writes `journal.json` atomically.
    pub(crate) fn save(&self, dir: &Path) -> Result<(), CaError> {
        keystore::write_public(&dir.join(JOURNAL_FILE), &self.encode()?)
    }
}

pub(crate) fn shape_of(
    sequence: u64,
    statuses: &[AuthorityStatus],
) -> (u64, Vec<(String, AuthorityState, bool)>) {
    (
        sequence,
        statuses
            .iter()
            .map(|s| (s.id.clone(), s.state, s.tainted))
            .collect(),
    )
}

/// The journal as read from disk, before its keys are loaded.
pub(crate) struct LoadedJournal {
    pub(crate) sequence: u64,
    pub(crate) authorities: Vec<AuthorityStatus>,
}

pub(crate) fn read(dir: &Path) -> Result<Option<LoadedJournal>, CaError> {
    let path = dir.join(JOURNAL_FILE);
    let Some(bytes) = keystore::read_public(&path)? else {
        return Ok(None);
    };
    parse(&bytes, &path).map(Some)
}

/// Parses a stored journal; `path` names where it came from in errors.
pub(crate) fn parse(bytes: &[u8], path: &Path) -> Result<LoadedJournal, CaError> {
    let corrupt = |reason: String| CaError::CorruptStore {
        path: path.to_owned(),
        reason,
    };
    let file: JournalFile =
        serde_json::from_slice(bytes).map_err(|e| corrupt(format!("not a journal: {e}")))?;
    if file.version != JOURNAL_VERSION {
        return Err(corrupt(format!(
            "journal version {} is not supported (expected {JOURNAL_VERSION})",
            file.version
        )));
    }
    for kind in [AuthorityKind::X509, AuthorityKind::Jwt] {
        let active = file
            .authorities
            .iter()
            .filter(|a| a.kind == kind && a.state == AuthorityState::Active)
            .count();
        if active > 1 {
            return Err(corrupt(format!("{active} active {kind} authorities")));
        }
    }
    Ok(LoadedJournal {
        sequence: file.sequence,
        authorities: file.authorities,
    })
}

/// The names of an authority's files (in the key directory or a shared store).
pub(crate) fn x509_key_name(id: &str) -> String {
    format!("x509-{id}.key")
}

pub(crate) fn x509_cert_name(id: &str) -> String {
    format!("x509-{id}.der")
}

pub(crate) fn jwt_key_name(kid: &str) -> String {
    format!("jwt-{kid}.key")
}

/// Where an authority's files live.
pub(crate) fn x509_key_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(x509_key_name(id))
}

pub(crate) fn x509_cert_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(x509_cert_name(id))
}

pub(crate) fn jwt_key_path(dir: &Path, kid: &str) -> PathBuf {
    dir.join(jwt_key_name(kid))
}
