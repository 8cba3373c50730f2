//! Files under the CA's key directory. Keys are PKCS#8 DER with mode 0600,
//! certificates DER. Every write goes to a fresh temporary name, is synced,
//! then renamed over the target, so a crash leaves either the old file or
//! the new one, never half a key.

use std::fs::{self, DirBuilder, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};

use crate::CaError;

const KEY_MODE: u32 = 0o600;
const CERT_MODE: u32 = 0o644;
const DIR_MODE: u32 = 0o700;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Creates the key directory (0700) if it does not exist yet.
pub(crate) fn ensure_dir(dir: &Path) -> Result<(), CaError> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(io_err(dir))
}

/// Reads a private key file, refusing one that group or others can access:
/// a key that leaked once must be replaced, not silently reused.
pub(crate) fn read_key(path: &Path) -> Result<Option<Vec<u8>>, CaError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CaError::InsecureKeyFile {
            path: path.to_path_buf(),
            mode,
        });
    }
    fs::read(path).map(Some).map_err(io_err(path))
}

/// Reads a PEM `PRIVATE KEY` (PKCS#8) file with the same permission rule
/// as [`read_key`]; returns the DER.
pub(crate) fn read_key_pem(path: &Path) -> Result<Vec<u8>, CaError> {
    let bytes = read_key(path)?.ok_or_else(|| CaError::Io {
        path: path.to_path_buf(),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    for block in x509_parser::pem::Pem::iter_from_buffer(&bytes) {
        let block = block.map_err(|e| CaError::CorruptStore {
            path: path.to_path_buf(),
            reason: format!("not PEM: {e}"),
        })?;
        if block.label == "PRIVATE KEY" {
            return Ok(block.contents);
        }
    }
    Err(CaError::CorruptStore {
        path: path.to_path_buf(),
        reason: "no PKCS#8 `PRIVATE KEY` block (convert with `openssl pkcs8 -topk8 -nocrypt`)"
            .into(),
    })
}

/// Removes a file; a missing file is not an error.
pub(crate) fn remove(path: &Path) -> Result<(), CaError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

pub(crate) fn read_public(path: &Path) -> Result<Option<Vec<u8>>, CaError> {
    match fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

pub(crate) fn write_key(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    write_atomic(path, bytes, KEY_MODE)
}

/// Writes a public file (mode 0644) through a fresh temporary file, synced
/// and renamed over `path`: a reader sees the old contents or the new, never
/// a file cut off half-way.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), CaError> {
    write_atomic(path, bytes, CERT_MODE)
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), CaError> {
    let tmp = temp_name(path)?;
    let result = (|| {
        // create_new: never follow or reuse something already at the temp name.
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        if let Some(dir) = path.parent() {
            // Persist the rename itself; failure here is not worth losing the key over.
            let _ = fs::File::open(dir).and_then(|d| d.sync_all());
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.map_err(io_err(path))
}

fn temp_name(path: &Path) -> Result<PathBuf, CaError> {
    let mut rnd = [0u8; 8];
    aws_lc_rs::rand::fill(&mut rnd).map_err(|_| CaError::Crypto("random temp name"))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(path.with_file_name(format!(".{name}.{}.tmp", hex::encode(rnd))))
}
