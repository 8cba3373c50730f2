//! The log's two keys: an HMAC-SHA256 key for sensitive values and an ECDSA
//! P-256 key that signs checkpoints.
//!
//! On disk (`AuditKeys::load_or_create`), in one directory:
//! - `audit-hmac.key`: the 32-byte HMAC key, hex, mode 0600;
//! - `audit-signing.p8`: the signing key, PKCS#8 DER, mode 0600;
//! - `audit-checkpoint.pub`: the checkpoint verification key as
//!   SubjectPublicKeyInfo DER (public; what `baton audit verify` needs).
//!
//! Each file is written to a temporary name in the same directory and then
//! renamed, so a crash leaves either no file or a whole one.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use aws_lc_rs::hmac;
use aws_lc_rs::rand::{SecureRandom as _, SystemRandom};
use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair as _};

use crate::error::AuditError;

const HMAC_FILE: &str = "audit-hmac.key";
const SIGNING_FILE: &str = "audit-signing.p8";
const PUBLIC_FILE: &str = "audit-checkpoint.pub";
const SECRET_MODE: u32 = 0o600;
const PUBLIC_MODE: u32 = 0o644;

/// The DER prefix of a P-256 SubjectPublicKeyInfo (id-ecPublicKey, prime256v1),
/// followed by the 65-byte uncompressed point.
pub(crate) const P256_SPKI_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// The audit log's keys. `Debug` shows only the public key.
pub struct AuditKeys {
    hmac_key: [u8; 32],
    hmac: hmac::Key,
    signing: EcdsaKeyPair,
    pkcs8: Vec<u8>,
}

impl fmt::Debug for AuditKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditKeys")
            .field("hmac_key", &"...")
            .field("signing_key", &"...")
            .field("public_key", &hex::encode(self.public_key()))
            .finish()
    }
}

impl AuditKeys {
    /// Fresh keys in memory (tests, `in_memory` logs).
    pub fn generate() -> Result<Self, AuditError> {
        let rng = SystemRandom::new();
        let mut hmac_key = [0u8; 32];
        rng.fill(&mut hmac_key).map_err(|_| AuditError::Signing)?;
        let doc = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng)
            .map_err(|_| AuditError::Signing)?;
        Self::from_parts(hmac_key, doc.as_ref())
    }

    /// Builds keys from an HMAC key and a P-256 PKCS#8 document.
    pub fn from_parts(hmac_key: [u8; 32], pkcs8: &[u8]) -> Result<Self, AuditError> {
        let signing = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8)
            .map_err(|e| AuditError::KeyMaterial(format!("not a P-256 PKCS#8 key: {e}")))?;
        Ok(Self {
            hmac_key,
            hmac: hmac::Key::new(hmac::HMAC_SHA256, &hmac_key),
            signing,
            pkcs8: pkcs8.to_vec(),
        })
    }

    /// Loads the keys from `dir`, or creates both when neither exists.
    /// Refuses a directory holding only one of them, and key files readable
    /// by group or others.
    pub fn load_or_create(dir: &Path) -> Result<Self, AuditError> {
        let hmac_path = dir.join(HMAC_FILE);
        let signing_path = dir.join(SIGNING_FILE);
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| AuditError::KeyIo {
                path,
                source: Arc::new(source),
            }
        };
        match (hmac_path.exists(), signing_path.exists()) {
            (false, false) => {
                fs::create_dir_all(dir).map_err(io(dir))?;
                let keys = Self::generate()?;
                write_atomic(&signing_path, &keys.pkcs8, SECRET_MODE)?;
                write_atomic(
                    &hmac_path,
                    hex::encode(keys.hmac_key).as_bytes(),
                    SECRET_MODE,
                )?;
                write_atomic(
                    &dir.join(PUBLIC_FILE),
                    &keys.public_key_spki_der(),
                    PUBLIC_MODE,
                )?;
                Ok(keys)
            }
            (true, true) => {
                let hmac_hex = read_secret(&hmac_path)?;
                let pkcs8 = read_secret(&signing_path)?;
                let text = std::str::from_utf8(&hmac_hex).map_err(|_| AuditError::KeyInvalid {
                    path: hmac_path.clone(),
                    reason: "not hex text".into(),
                })?;
                let mut hmac_key = [0u8; 32];
                hex::decode_to_slice(text.trim(), &mut hmac_key).map_err(|_| {
                    AuditError::KeyInvalid {
                        path: hmac_path.clone(),
                        reason: "expected 64 hex digits (a 32-byte key)".into(),
                    }
                })?;
                let keys =
                    Self::from_parts(hmac_key, &pkcs8).map_err(|e| AuditError::KeyInvalid {
                        path: signing_path.clone(),
                        reason: e.to_string(),
                    })?;
                let public_path = dir.join(PUBLIC_FILE);
                if !public_path.exists() {
                    write_atomic(&public_path, &keys.public_key_spki_der(), PUBLIC_MODE)?;
                }
                Ok(keys)
            }
            (h, _) => Err(AuditError::KeyPartial {
                dir: dir.to_path_buf(),
                present: if h { HMAC_FILE } else { SIGNING_FILE }.into(),
            }),
        }
    }

    /// The checkpoint verification key: the 65-byte uncompressed P-256 point
    /// (`0x04 || X || Y`). The verifiers also accept [`Self::public_key_spki_der`].
    pub fn public_key(&self) -> &[u8] {
        self.signing.public_key().as_ref()
    }

    /// The checkpoint verification key as SubjectPublicKeyInfo DER (what
    /// `openssl pkey -pubin -inform DER` reads).
    pub fn public_key_spki_der(&self) -> Vec<u8> {
        let mut out = P256_SPKI_PREFIX.to_vec();
        out.extend_from_slice(self.public_key());
        out
    }

    /// Hex HMAC-SHA256 of `value` under the log's key.
    pub fn hmac_hex(&self, value: &str) -> String {
        crate::proof::to_hex(hmac::sign(&self.hmac, value.as_bytes()).as_ref())
    }

    /// A fingerprint of the HMAC key (HMAC of a fixed label), stored in the
    /// log so that opening it with another key is refused.
    pub(crate) fn hmac_key_id(&self) -> String {
        self.hmac_hex("baton-audit-hmac-key-id")
    }

    /// ASN.1 DER ECDSA P-256 SHA-256 signature of `msg`.
    pub(crate) fn sign(&self, msg: &[u8]) -> Result<Vec<u8>, AuditError> {
        let rng = SystemRandom::new();
        let sig = self
            .signing
            .sign(&rng, msg)
            .map_err(|_| AuditError::Signing)?;
        Ok(sig.as_ref().to_vec())
    }
}

/// Reads the checkpoint verification key written by `load_or_create`
/// (`audit-checkpoint.pub` in the key directory), for verifiers that have no
/// access to the secret keys.
pub fn read_public_key(dir: &Path) -> Result<Vec<u8>, AuditError> {
    let path = dir.join(PUBLIC_FILE);
    fs::read(&path).map_err(|source| AuditError::KeyIo {
        path,
        source: Arc::new(source),
    })
}

fn read_secret(path: &Path) -> Result<Vec<u8>, AuditError> {
    let meta = fs::metadata(path).map_err(|source| AuditError::KeyIo {
        path: path.to_path_buf(),
        source: Arc::new(source),
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuditError::KeyPermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read(path).map_err(|source| AuditError::KeyIo {
        path: path.to_path_buf(),
        source: Arc::new(source),
    })
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), AuditError> {
    let err = |p: &Path| {
        let p: PathBuf = p.to_path_buf();
        move |source| AuditError::KeyIo {
            path: p,
            source: Arc::new(source),
        }
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp"));
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err(&tmp))?;
    // The umask may have narrowed the mode; set it exactly.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(err(&tmp))?;
    f.write_all(bytes).map_err(err(&tmp))?;
    f.sync_all().map_err(err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(err(path))?;
    if let Some(parent) = path.parent()
        && let Ok(d) = fs::File::open(parent)
    {
        // Persist the rename; a failure here does not lose the key.
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_files_are_0600_and_reload_to_the_same_keys() {
        let dir = tempfile::tempdir().unwrap();
        let keys = AuditKeys::load_or_create(dir.path()).unwrap();
        for f in [HMAC_FILE, SIGNING_FILE] {
            let mode = fs::metadata(dir.path().join(f))
                .unwrap()
                .permissions()
                .mode()
                & 0o777;
            assert_eq!(mode, 0o600, "{f}");
        }
        let again = AuditKeys::load_or_create(dir.path()).unwrap();
        assert_eq!(keys.public_key(), again.public_key());
        assert_eq!(keys.hmac_hex("x"), again.hmac_hex("x"));
        assert_eq!(
            read_public_key(dir.path()).unwrap(),
            keys.public_key_spki_der()
        );
        // No temporary files are left behind.
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
    }

    #[test]
    fn refuses_partial_dirs_and_loose_modes() {
        let dir = tempfile::tempdir().unwrap();
        AuditKeys::load_or_create(dir.path()).unwrap();
        let hmac = dir.path().join(HMAC_FILE);
        fs::set_permissions(&hmac, fs::Permissions::from_mode(0o644)).unwrap();
        let e = AuditKeys::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(e, AuditError::KeyPermissions { .. }), "{e}");
        fs::remove_file(&hmac).unwrap();
        let e = AuditKeys::load_or_create(dir.path()).unwrap_err();
        assert!(matches!(e, AuditError::KeyPartial { .. }), "{e}");
    }

    #[test]
    fn debug_redacts_secrets() {
        let keys = AuditKeys::generate().unwrap();
        let dbg = format!("{keys:?}");
        assert!(!dbg.contains(&hex::encode(keys.hmac_key)));
        assert!(dbg.contains("..."));
    }
}
