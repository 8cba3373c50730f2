//! The CA shared by the brokers of one trust domain, kept in their
//! PostgreSQL datastore (`--ca-encryption-key-file`).
//!
//! Every row (the journal, each key and certificate) is sealed with
//! AES-256-GCM under a key every broker reads from a file, with the row's
//! name as associated data: the database alone yields no CA key, and a
//! row altered or moved under another name fails to open (the broker
//! refuses to start, or the step fails) instead of being trusted.

use std::path::Path;
use std::sync::Arc;

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use baton_ca::{CaError, SharedCaStore, SharedState, SharedStep, SharedWrite};

use crate::pg::{PgStore, RawCa, RawCaWrite};
use crate::store::StoreError;

/// Associated data of the journal row.
const JOURNAL_NAME: &str = "journal.json";

/// The 32-byte key that seals the shared CA. Never printed.
pub struct CaSealKey(LessSafeKey);

impl std::fmt::Debug for CaSealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CaSealKey(<redacted>)")
    }
}

impl CaSealKey {
    /// Reads the key from `path`: 64 hex digits (e.g. from `openssl rand
    /// -hex 32`), surrounding white space ignored. A file that group or
    /// others can read is refused, as CA key files are.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        use std::os::unix::fs::PermissionsExt as _;
        let shown = path.display();
        let meta = std::fs::metadata(path)
            .map_err(|e| format!("--ca-encryption-key-file {shown}: {e}"))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(format!(
                "--ca-encryption-key-file {shown} is accessible by group or others (mode {mode:o}); run `chmod 600` on it"
            ));
        }
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--ca-encryption-key-file {shown}: {e}"))?;
        let bytes = hex::decode(text.trim()).map_err(|_| {
            format!("--ca-encryption-key-file {shown}: not hex (expected 64 hex digits, e.g. from `openssl rand -hex 32`)")
        })?;
        Self::from_bytes(&bytes).map_err(|e| format!("--ca-encryption-key-file {shown}: {e}"))
    }

    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, String> {
        if bytes.len() != 32 {
            return Err(format!(
                "the key is {} bytes; AES-256 needs 32 (64 hex digits)",
                bytes.len()
            ));
        }
        let key = UnboundKey::new(&AES_256_GCM, bytes).map_err(|_| "not an AES-256 key")?;
        Ok(Self(LessSafeKey::new(key)))
    }

    /// Seals `plain` bound to `aad` (what it is and where it is stored).
    pub(crate) fn seal_bound(&self, aad: &str, plain: &[u8]) -> Option<Vec<u8>> {
        let mut nonce = [0u8; NONCE_LEN];
        aws_lc_rs::rand::fill(&mut nonce).ok()?;
        let mut out = plain.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(aad.as_bytes()),
                &mut out,
            )
            .ok()?;
        let mut sealed = nonce.to_vec();
        sealed.extend_from_slice(&out);
        Some(sealed)
    }

    /// Opens what [`Self::seal_bound`] sealed under the same `aad`.
    pub(crate) fn open_bound(&self, aad: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).ok()?;
        let mut body = body.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(aad.as_bytes()), &mut body)
            .ok()?;
        Some(plain.to_vec())
    }

    fn seal(&self, name: &str, plain: &[u8]) -> Result<Vec<u8>, CaError> {
        self.seal_bound(&aad(name), plain)
            .ok_or(CaError::Crypto("seal a CA row"))
    }

    fn open(&self, location: &str, name: &str, sealed: &[u8]) -> Result<Vec<u8>, CaError> {
        self.open_bound(&aad(name), sealed)
            .ok_or_else(|| CaError::CorruptStore {
                path: format!("{location}/{name}").into(),
                reason: "does not open with the key of --ca-encryption-key-file: another trust domain's key, or the row was altered".into(),
            })
    }
}

fn aad(name: &str) -> String {
    format!("baton-ca-row:{name}")
}

/// The shared CA on the PostgreSQL datastore.
#[derive(Debug)]
pub struct PgCaStore {
    pg: Arc<PgStore>,
    key: CaSealKey,
    location: String,
}

impl PgCaStore {
    pub fn new(pg: Arc<PgStore>, key: CaSealKey) -> Self {
        let location = format!("{} (table ca_files)", pg.endpoint());
        Self { pg, key, location }
    }

    fn open_state(&self, raw: RawCa) -> Result<SharedState, CaError> {
        let journal = raw
            .journal
            .map(|j| self.key.open(&self.location, JOURNAL_NAME, &j))
            .transpose()?;
        let mut files = std::collections::BTreeMap::new();
        let mut unreadable = std::collections::BTreeMap::new();
        for (name, data) in raw.files {
            match self.key.open(&self.location, &name, &data) {
                Ok(plain) => {
                    files.insert(name, plain);
                }
                Err(e) => {
                    let reason = match e {
                        CaError::CorruptStore { reason, .. } => reason,
                        other => other.to_string(),
                    };
                    unreadable.insert(name, reason);
                }
            }
        }
        Ok(SharedState {
            journal,
            files,
            unreadable,
        })
    }
}

fn store_err(e: StoreError) -> CaError {
    CaError::SharedStore(e.to_string())
}

impl SharedCaStore for PgCaStore {
    fn location(&self) -> String {
        self.location.clone()
    }

    fn journal(&self) -> Result<Option<Vec<u8>>, CaError> {
        let raw = self.pg.ca_raw(false).map_err(store_err)?;
        raw.journal
            .map(|j| self.key.open(&self.location, JOURNAL_NAME, &j))
            .transpose()
    }

    fn load(&self) -> Result<SharedState, CaError> {
        let raw = self.pg.ca_raw(true).map_err(store_err)?;
        self.open_state(raw)
    }

    fn transact(&self, step: &mut SharedStep<'_>) -> Result<(), CaError> {
        let r = self.pg.ca_transact::<CaStep>(&mut |raw| {
            let state = self.open_state(raw).map_err(CaStep::Ca)?;
            let Some(write) = step(state).map_err(CaStep::Ca)? else {
                return Ok(None);
            };
            let SharedWrite {
                files,
                journal,
                keep,
            } = write;
            let mut sealed = Vec::with_capacity(files.len());
            for (name, data) in files {
                let s = self.key.seal(&name, &data).map_err(CaStep::Ca)?;
                sealed.push((name, s));
            }
            Ok(Some(RawCaWrite {
                files: sealed,
                journal: self.key.seal(JOURNAL_NAME, &journal).map_err(CaStep::Ca)?,
                keep,
            }))
        });
        match r {
            Ok(()) => Ok(()),
            Err(CaStep::Ca(e)) => Err(e),
            Err(CaStep::Store(e)) => Err(store_err(e)),
        }
    }
}

/// A CA step's failure: the step's own, or the database's.
enum CaStep {
    Ca(CaError),
    Store(StoreError),
}

impl From<StoreError> for CaStep {
    fn from(e: StoreError) -> Self {
        Self::Store(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_row_opens_only_under_its_own_name_and_key() {
        let k = CaSealKey::from_bytes(&[7u8; 32]).unwrap();
        let sealed = k.seal("x509-ab.key", b"secret").unwrap();
        assert_eq!(k.open("db", "x509-ab.key", &sealed).unwrap(), b"secret");
        // Moved under another name.
        assert!(k.open("db", "jwt-ab.key", &sealed).is_err());
        // Another key.
        let other = CaSealKey::from_bytes(&[8u8; 32]).unwrap();
        assert!(other.open("db", "x509-ab.key", &sealed).is_err());
        // One bit flipped.
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert!(k.open("db", "x509-ab.key", &bad).is_err());
        assert!(k.open("db", "x509-ab.key", &sealed[..4]).is_err());
    }

    #[test]
    fn a_key_file_must_be_32_hex_bytes_and_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.key");
        std::fs::write(&path, format!("{}\n", "ab".repeat(32))).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        CaSealKey::from_file(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = CaSealKey::from_file(&path).unwrap_err();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&path, "ab".repeat(16)).unwrap();
        let e = CaSealKey::from_file(&path).unwrap_err();
        assert!(e.contains("16 bytes"), "{e}");
        std::fs::write(&path, "zz".repeat(32)).unwrap();
        let e = CaSealKey::from_file(&path).unwrap_err();
        assert!(e.contains("not hex"), "{e}");
    }
}
