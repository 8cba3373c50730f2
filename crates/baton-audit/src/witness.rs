//! Tree heads kept outside the log, so that a log cut short or rewritten is
//! caught.
//!
//! The log alone cannot see its newest events deleted *together with* their
//! checkpoints: what is left is a shorter log that is consistent. A signed
//! tree head kept somewhere else remembers the bigger size and the root it
//! had. Two keepers use the same record, a [`Witness`]:
//!
//! - the broker's **head file** ([`head_path`], `audit.db.head` beside the
//!   database), rewritten in place after every committed transaction, before
//!   any receipt of it is returned. It holds two fixed 512-byte slots written
//!   in turn, each one JSON [`Witness`] padded with spaces: a torn write can
//!   only damage the slot being written, and the other one still holds the
//!   previous head. One `pwrite` per transaction (no rename, no fsync except
//!   with [`crate::Durability::PowerLoss`]), so an append costs microseconds
//!   more, not a disk flush. The log records in its `meta` table that it has
//!   a head file, so deleting the file alone is caught too;
//! - an operator's **witness file** (`baton audit checkpoint --out FILE`,
//!   then `baton audit verify --since FILE --update` from cron), one JSON
//!   [`Witness`], written to a temporary file and renamed. Kept on another
//!   machine, it is what catches an attacker who also edits the head file.
//!
//! Either is checked with [`check_extends`] (or as a [`Kept`] checkpoint of
//! [`crate::VerifyOptions`]): the witnessed head's signature under the log's
//! key, the log's size at least the witnessed size ("log truncated"), and
//! the RFC 9162 consistency proof from the witnessed size to the log's
//! ("log forked/rewritten").

use std::fs;
use std::io::{ErrorKind, Write as _};
use std::os::unix::fs::{FileExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};

use crate::error::{AuditError, ProofError, TamperError, TamperReason};
use crate::merkle::{self, Hash};
use crate::proof::{SignedCheckpoint, parse_hash, public_point};

/// The `format` of a [`Witness`].
pub const WITNESS_FORMAT: &str = "baton-audit-witness/1";

/// Size of one slot of the head file.
const SLOT: usize = 512;
/// Largest witness file read (one record is under a kilobyte).
const MAX_WITNESS_FILE: usize = 64 << 10;

/// The whole file if it is at most `max` bytes; None if longer (only
/// `max + 1` bytes are read to tell).
fn read_at_most(path: &Path, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    use std::io::Read as _;
    let mut out = Vec::new();
    fs::File::open(path)?
        .take(max as u64 + 1)
        .read_to_end(&mut out)?;
    Ok((out.len() <= max).then_some(out))
}

/// A signed tree head as a witness keeps it: the checkpoint and the key of
/// the log that signed it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Witness {
    /// Always [`WITNESS_FORMAT`].
    pub format: String,
    /// The log's checkpoint verification key, base64 of the 65-byte
    /// uncompressed P-256 point.
    pub public_key: String,
    pub checkpoint: SignedCheckpoint,
}

impl Witness {
    /// The record of `checkpoint`, signed by the key `public_key` (either
    /// accepted form; stored as the uncompressed point).
    pub fn new(public_key: &[u8], checkpoint: SignedCheckpoint) -> Result<Self, ProofError> {
        Ok(Self {
            format: WITNESS_FORMAT.to_owned(),
            public_key: B64.encode(public_point(public_key)?),
            checkpoint,
        })
    }

    /// The key this witness names (the uncompressed point).
    pub fn public_key(&self) -> Result<Vec<u8>, String> {
        let key = B64
            .decode(self.public_key.as_bytes())
            .map_err(|_| "its public key is not valid base64".to_owned())?;
        public_point(&key).map_err(|e| format!("its public key: {e}"))?;
        Ok(key)
    }

    /// Checks the format, that the witness names `log_key` (the key of the
    /// log it is checked against) and that its checkpoint is signed by it.
    /// Returns the witnessed root.
    pub fn verify(&self, log_key: &[u8]) -> Result<Hash, String> {
        if self.format != WITNESS_FORMAT {
            return Err(format!(
                "unknown format {:?} (expected {WITNESS_FORMAT:?})",
                self.format
            ));
        }
        let own = self.public_key()?;
        let log = public_point(log_key).map_err(|e| format!("the log's key: {e}"))?;
        if own != log {
            return Err(
                "it was made for a log with another checkpoint key (another broker, or the key was replaced)"
                    .to_owned(),
            );
        }
        self.checkpoint
            .verify(log_key)
            .map_err(|e| format!("its checkpoint of size {}: {e}", self.checkpoint.size))
    }
}

/// A checkpoint kept outside the log, with a name for messages (the witness
/// file, the head file, a receipt).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    /// How error messages name where this checkpoint came from.
    pub source: String,
    pub checkpoint: SignedCheckpoint,
}

impl Kept {
    pub fn new(source: impl Into<String>, checkpoint: SignedCheckpoint) -> Self {
        Self {
            source: source.into(),
            checkpoint,
        }
    }
}

/// Checks that a log whose newest signed head is `current` extends the kept
/// checkpoint `kept`: both signed by `public_key`, `current` at least as big,
/// and `proof` (RFC 9162 §2.1.4, lowercase hex, from `kept`'s size to
/// `current`'s) verifying between the two roots. What a witness holding only
/// tree heads runs against a log it cannot read.
pub fn check_extends(
    kept: &Kept,
    current: &SignedCheckpoint,
    proof: &[String],
    public_key: &[u8],
) -> Result<(), TamperError> {
    let kept_root = kept.checkpoint.verify(public_key).map_err(|e| {
        TamperError::general(TamperReason::WitnessInvalid {
            witness: kept.source.clone(),
            detail: format!("its checkpoint of size {}: {e}", kept.checkpoint.size),
        })
    })?;
    let current_root = current.verify(public_key).map_err(|_| {
        TamperError::general(TamperReason::CheckpointSignature {
            checkpoint_size: current.size,
        })
    })?;
    let path = proof
        .iter()
        .map(|h| parse_hash(h, "consistency proof hash"))
        .collect::<Result<Vec<Hash>, _>>()
        .map_err(|e| forked(kept, &e.to_string()))?;
    check_consistency(kept, &kept_root, current.size, &current_root, &path)
}

/// The size and consistency checks of [`check_extends`], on verified roots.
pub(crate) fn check_consistency(
    kept: &Kept,
    kept_root: &Hash,
    size: u64,
    root: &Hash,
    proof: &[Hash],
) -> Result<(), TamperError> {
    if kept.checkpoint.size > size {
        return Err(TamperError::at(
            size,
            TamperReason::Truncated {
                witness: kept.source.clone(),
                witnessed_size: kept.checkpoint.size,
                log_size: size,
            },
        ));
    }
    merkle::verify_consistency(kept.checkpoint.size, kept_root, size, root, proof)
        .map_err(|e| forked(kept, &e.to_string()))
}

fn forked(kept: &Kept, detail: &str) -> TamperError {
    TamperError::general(TamperReason::Forked {
        witness: kept.source.clone(),
        witnessed_size: kept.checkpoint.size,
        detail: detail.to_owned(),
    })
}

fn witness_error(path: &Path, reason: impl Into<String>) -> AuditError {
    AuditError::HeadFile {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

/// Reads a witness file: one JSON [`Witness`], or a broker head file (the
/// newest of its slots that is signed by the key it names).
pub fn read_witness(path: &Path) -> Result<Witness, AuditError> {
    let bytes = read_at_most(path, MAX_WITNESS_FILE)
        .map_err(|e| witness_error(path, e.to_string()))?
        .ok_or_else(|| {
            witness_error(
                path,
                format!("it is longer than {MAX_WITNESS_FILE} bytes, which no witness is"),
            )
        })?;
    let text = String::from_utf8(bytes).map_err(|e| witness_error(path, e.to_string()))?;
    if let Ok(w) = serde_json::from_str::<Witness>(&text) {
        return Ok(w);
    }
    let mut best: Option<Witness> = None;
    let mut first_error = None;
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let parsed = serde_json::from_str::<Witness>(line)
            .map_err(|e| e.to_string())
            .and_then(|w| w.public_key().and_then(|k| w.verify(&k)).map(|_| w));
        match parsed {
            Ok(w)
                if best
                    .as_ref()
                    .is_none_or(|b| b.checkpoint.size < w.checkpoint.size) =>
            {
                best = Some(w);
            }
            Ok(_) => {}
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    best.ok_or_else(|| {
        witness_error(
            path,
            format!(
                "not a witness file: {}",
                first_error.unwrap_or_else(|| "it is empty".into())
            ),
        )
    })
}

/// Writes `witness` to `path` as one JSON document: to a temporary file in
/// the same directory, fsynced, then renamed over `path` (and the directory
/// fsynced), so a crash leaves the old witness or the new one. Refuses a
/// `path` that is a symbolic link rather than replace the link.
pub fn write_witness(path: &Path, witness: &Witness) -> Result<(), AuditError> {
    refuse_symlink(path)?;
    let err = |p: &Path| {
        let p = p.to_path_buf();
        move |e: std::io::Error| witness_error(&p, e.to_string())
    };
    let mut body =
        serde_json::to_vec_pretty(witness).map_err(|e| AuditError::Encode(e.to_string()))?;
    body.push(b'\n');
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| witness_error(path, "not a file path"))?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    // `remove_file` removes a link, never its target; `create_new` refuses
    // to follow one that appears in between.
    match fs::remove_file(&tmp) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(err(&tmp)(e)),
        _ => {}
    }
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(err(&tmp))?;
    f.write_all(&body).map_err(err(&tmp))?;
    f.sync_all().map_err(err(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(err(path))?;
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty())
        && let Ok(d) = fs::File::open(parent)
    {
        let _ = d.sync_all();
    }
    Ok(())
}

fn refuse_symlink(path: &Path) -> Result<(), AuditError> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => Err(witness_error(
            path,
            "is a symbolic link; refusing to replace it (pass the path it points to)",
        )),
        Ok(m) if !m.file_type().is_file() => Err(witness_error(path, "is not a regular file")),
        _ => Ok(()),
    }
}

/// Where the broker keeps the head file of the log at `db`: `<db>.head`.
pub fn head_path(db: &Path) -> PathBuf {
    let mut name = db.file_name().map(|n| n.to_owned()).unwrap_or_default();
    name.push(".head");
    db.with_file_name(name)
}

/// The heads found in a head file.
#[derive(Debug)]
pub(crate) enum HeadState {
    /// No head file.
    Missing,
    /// The newest slot signed by the log's key (`None`: the file is empty).
    Present {
        newest: Option<(usize, SignedCheckpoint)>,
    },
}

/// Reads the head file at `path`, keeping the newest slot that names
/// `log_key` and is signed by it. A slot that does not parse is skipped (a
/// write torn by a crash); a file where no slot verifies is an error.
pub(crate) fn read_head(path: &Path, log_key: &[u8]) -> Result<HeadState, TamperError> {
    let invalid = |detail: String| {
        TamperError::general(TamperReason::WitnessInvalid {
            witness: format!("the head file {}", path.display()),
            detail,
        })
    };
    match fs::symlink_metadata(path) {
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(HeadState::Missing),
        Err(e) => return Err(invalid(e.to_string())),
        Ok(m) if !m.file_type().is_file() => {
            return Err(invalid("it is not a regular file".into()));
        }
        Ok(_) => {}
    }
    // Two slots; anything longer is not a head file this log wrote (and a
    // file sized like the machine's memory must not be read whole).
    let bytes = read_at_most(path, 2 * SLOT)
        .map_err(|e| invalid(e.to_string()))?
        .ok_or_else(|| invalid(format!("it is longer than its {} bytes", 2 * SLOT)))?;
    if bytes.is_empty() {
        return Ok(HeadState::Present { newest: None });
    }
    let mut newest: Option<(usize, SignedCheckpoint)> = None;
    let mut first_error = None;
    for (slot, chunk) in bytes.chunks(SLOT).enumerate() {
        let parsed = std::str::from_utf8(chunk)
            .map_err(|e| e.to_string())
            .and_then(|s| serde_json::from_str::<Witness>(s.trim()).map_err(|e| e.to_string()))
            .and_then(|w| w.verify(log_key).map(|_| w.checkpoint));
        match parsed {
            Ok(cp) if newest.as_ref().is_none_or(|(_, n)| n.size < cp.size) => {
                newest = Some((slot, cp));
            }
            Ok(_) => {}
            Err(e) => {
                first_error.get_or_insert(format!("slot {slot}: {e}"));
            }
        }
    }
    match (newest, first_error) {
        (None, Some(e)) => Err(invalid(e)),
        (newest, _) => Ok(HeadState::Present { newest }),
    }
}

/// The open head file of a log, rewritten after every transaction.
#[derive(Debug)]
pub(crate) struct HeadFile {
    path: PathBuf,
    file: fs::File,
    /// The slot the next head goes to (never the one holding the newest).
    next_slot: usize,
    /// fdatasync after each write.
    sync: bool,
    public_key: String,
}

impl HeadFile {
    /// Opens (creating) the head file; `newest_slot` is where the newest
    /// valid head sits, so that the next write goes to the other slot.
    pub(crate) fn open(
        path: &Path,
        public_key: &[u8],
        newest_slot: Option<usize>,
        sync: bool,
    ) -> Result<Self, AuditError> {
        refuse_symlink(path)?;
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(|e| witness_error(path, e.to_string()))?;
        let public_key =
            B64.encode(public_point(public_key).map_err(|e| witness_error(path, e.to_string()))?);
        Ok(Self {
            path: path.to_path_buf(),
            file,
            next_slot: newest_slot.map_or(0, |s| (s + 1) % 2),
            sync,
            public_key,
        })
    }

    /// Writes `checkpoint` to the next slot in place.
    pub(crate) fn write(&mut self, checkpoint: &SignedCheckpoint) -> Result<(), AuditError> {
        let record = Witness {
            format: WITNESS_FORMAT.to_owned(),
            public_key: self.public_key.clone(),
            checkpoint: checkpoint.clone(),
        };
        let mut slot =
            serde_json::to_vec(&record).map_err(|e| AuditError::Encode(e.to_string()))?;
        if slot.len() >= SLOT {
            return Err(AuditError::Encode(format!(
                "a head record of {} bytes does not fit a {SLOT}-byte slot",
                slot.len()
            )));
        }
        slot.resize(SLOT - 1, b' ');
        slot.push(b'\n');
        let offset = (self.next_slot * SLOT) as u64;
        let err = |e: std::io::Error| witness_error(&self.path, e.to_string());
        self.file.write_all_at(&slot, offset).map_err(err)?;
        if self.sync {
            self.file.sync_data().map_err(err)?;
        }
        self.next_slot = (self.next_slot + 1) % 2;
        Ok(())
    }
}

impl Drop for HeadFile {
    fn drop(&mut self) {
        // A clean shutdown leaves the head on disk even without PowerLoss.
        let _ = self.file.sync_data();
    }
}
