//! The key of the HMAC digests the gateway records for calls' inputs and
//! outputs: 32 random bytes in a file only its owner reads, made at first
//! start. Whoever holds it can check a claimed input against the audit
//! log; whoever reads only the log cannot test guesses.

use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
use std::path::Path;

use crate::GatewayError;

const KEY_LEN: usize = 32;

/// Reads the key at `path`, or makes one there (mode 0600).
pub(crate) fn load_or_create(path: &Path) -> Result<Vec<u8>, GatewayError> {
    let io = |context: String| move |source| GatewayError::Io { context, source };
    match std::fs::read(path) {
        Ok(key) if key.len() == KEY_LEN => {
            let mode = std::fs::metadata(path)
                .map_err(io(format!("reading {}", path.display())))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                return Err(GatewayError::Refused(format!(
                    "{}: the digest key is readable by others (mode {:o}); chmod 600 it",
                    path.display(),
                    mode & 0o777
                )));
            }
            Ok(key)
        }
        Ok(key) => Err(GatewayError::Refused(format!(
            "{}: a digest key is {KEY_LEN} bytes, this file has {}",
            path.display(),
            key.len()
        ))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
            }
            let mut key = vec![0u8; KEY_LEN];
            aws_lc_rs::rand::fill(&mut key)
                .map_err(|_| GatewayError::Refused("no randomness for the digest key".into()))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(io(format!("creating {}", path.display())))?;
            f.write_all(&key)
                .and_then(|()| f.sync_all())
                .map_err(io(format!("writing {}", path.display())))?;
            Ok(key)
        }
        Err(e) => Err(GatewayError::Io {
            context: format!("reading {}", path.display()),
            source: e,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_made_once_kept_private_and_a_bad_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("spool/digest.key");
        let key = load_or_create(&path).unwrap();
        assert_eq!(key.len(), KEY_LEN);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(load_or_create(&path).unwrap(), key, "the key changed");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(
            load_or_create(&path)
                .unwrap_err()
                .to_string()
                .contains("readable by others")
        );
        let short = dir.path().join("short.key");
        std::fs::write(&short, b"abc").unwrap();
        assert!(
            load_or_create(&short)
                .unwrap_err()
                .to_string()
                .contains("32 bytes")
        );
    }
}
