//! Errors: [`AuditError`] for the log's operations, [`ProofError`] for offline
//! proof checks, [`TamperError`] for what `verify` finds.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// Why an audit operation failed. Every append failure is one of these: the
/// broker refuses the issuance it was recording (fail closed). `Clone`, so
/// that every append of a failed group commit gets the same error.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error("audit database error: {0}")]
    Sqlite(#[source] Arc<rusqlite::Error>),
    #[error("audit key file {path}: {source}")]
    KeyIo {
        path: PathBuf,
        #[source]
        source: Arc<std::io::Error>,
    },
    #[error("audit key file {path} is invalid: {reason}")]
    KeyInvalid { path: PathBuf, reason: String },
    #[error(
        "audit key file {path} has mode {mode:o}; it must not be readable by group or others (chmod 600)"
    )]
    KeyPermissions { path: PathBuf, mode: u32 },
    #[error(
        "audit key directory {dir} has only one of the two key files ({present}); refusing to create the other"
    )]
    KeyPartial { dir: PathBuf, present: String },
    #[error("audit key material is invalid: {0}")]
    KeyMaterial(String),
    #[error("audit signing failed")]
    Signing,
    #[error("this audit log was written with a different {which} key")]
    KeyMismatch { which: &'static str },
    #[error("audit log is tampered: {0}")]
    Tampered(#[from] TamperError),
    #[error("audit log state changed under us: {0}")]
    ConcurrentWriter(String),
    #[error("audit log refuses appends after an earlier failure: {0}")]
    Poisoned(String),
    #[error("audit log schema version {found} is not supported (expected {expected})")]
    Schema { found: i64, expected: i64 },
    #[error("event #{index} cannot be decoded: {reason}")]
    Decode { index: u64, reason: String },
    #[error("event encoding failed: {0}")]
    Encode(String),
    #[error("{0}")]
    Range(String),
    #[error("tree head file {path}: {reason}")]
    HeadFile { path: PathBuf, reason: String },
    #[error("shared audit store: {0}")]
    Mirror(String),
    #[error("audit log {log} in the shared store is tampered: {error}")]
    SharedLog { log: String, error: TamperError },
}

impl From<rusqlite::Error> for AuditError {
    fn from(e: rusqlite::Error) -> Self {
        AuditError::Sqlite(Arc::new(e))
    }
}

/// Why an offline proof or checkpoint check failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProofError {
    #[error("leaf index {index} is outside a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("inclusion proof has the wrong number of hashes for this index and tree size")]
    InclusionPathLength,
    #[error("inclusion proof does not lead to the checkpoint's root")]
    InclusionRootMismatch,
    #[error("consistency proof has the wrong number of hashes for these tree sizes")]
    ConsistencyPathLength,
    #[error("consistency proof does not lead to both checkpoints' roots")]
    ConsistencyRootMismatch,
    #[error("old tree size {old_size} is larger than new tree size {new_size}")]
    SizesOutOfOrder { old_size: u64, new_size: u64 },
    #[error("the receipt's leaf hash does not match the event")]
    LeafMismatch,
    #[error("{what} is not valid hex of a SHA-256 hash")]
    BadHash { what: String },
    #[error("checkpoint signature is not valid base64")]
    BadSignatureEncoding,
    #[error("checkpoint signature does not verify under the given public key")]
    BadSignature,
    #[error("public key is neither an uncompressed P-256 point nor a P-256 SubjectPublicKeyInfo")]
    BadPublicKey,
}

/// What `verify` found wrong, with the first event index it implicates.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", self.describe())]
pub struct TamperError {
    /// The first event index that is missing, altered or out of place; `None`
    /// when the fault is in a checkpoint alone (forged signature) or in storage.
    pub first_bad_index: Option<u64>,
    pub reason: TamperReason,
}

impl TamperError {
    pub(crate) fn at(index: u64, reason: TamperReason) -> Self {
        Self {
            first_bad_index: Some(index),
            reason,
        }
    }
    pub(crate) fn general(reason: TamperReason) -> Self {
        Self {
            first_bad_index: None,
            reason,
        }
    }
    fn describe(&self) -> String {
        match self.first_bad_index {
            // The reason names the events itself.
            Some(_) if matches!(self.reason, TamperReason::Truncated { .. }) => {
                self.reason.to_string()
            }
            Some(i) => format!("event #{i}: {}", self.reason),
            None => self.reason.to_string(),
        }
    }
}

/// The kinds of damage `verify` recognises.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TamperReason {
    /// The stored event bytes do not hash to the stored leaf hash.
    LeafHashMismatch,
    /// The stored event bytes are not a canonical event encoding.
    Malformed(String),
    /// The leaf indexes are not contiguous from 0: `expected` is missing.
    IndexGap { expected: u64, found: u64 },
    /// The task-id column (used for lookups) disagrees with the event.
    TaskColumnMismatch,
    /// The display clear text does not match the event's HMAC.
    ClearTextMismatch { field: &'static str },
    /// A correctly signed checkpoint's root differs from the rebuilt tree:
    /// an event in `[first_bad_index, size)` was altered, removed or moved.
    RootMismatch { checkpoint_size: u64 },
    /// A checkpoint's signature does not verify: it was forged or altered.
    CheckpointSignature { checkpoint_size: u64 },
    /// A checkpoint is malformed (bad hex, bad base64).
    CheckpointMalformed {
        checkpoint_size: u64,
        detail: String,
    },
    /// A checkpoint covers more events than the log holds: events were deleted.
    CheckpointBeyondLog { checkpoint_size: u64, log_size: u64 },
    /// Events after the last checkpoint were never signed: they were inserted.
    UnsignedTail {
        last_checkpoint_size: u64,
        log_size: u64,
    },
    /// The log holds events but no checkpoint.
    NoCheckpoint,
    /// The database could not be read.
    Storage(String),
    /// A checkpoint kept outside the log (a witness file, the head file, a
    /// receipt) covers more events than the log holds: its newest events
    /// were deleted together with their checkpoints.
    Truncated {
        witness: String,
        witnessed_size: u64,
        log_size: u64,
    },
    /// The log's first `witnessed_size` events do not have the root a kept
    /// checkpoint signed: the log was rewritten (and re-signed) since.
    Forked {
        witness: String,
        witnessed_size: u64,
        detail: String,
    },
    /// A checkpoint given to check the log against does not verify itself
    /// (another log's key, bad signature, bad format).
    WitnessInvalid { witness: String, detail: String },
    /// The log says it has a head file, and there is none.
    HeadFileMissing { path: String },
    /// A log in the shared store is not what its broker wrote (removed,
    /// re-keyed, its registration or clear text does not open).
    SharedStore(String),
}

impl fmt::Display for TamperReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TamperReason::LeafHashMismatch => {
                f.write_str("stored event bytes do not match the stored leaf hash")
            }
            TamperReason::Malformed(d) => write!(f, "stored event is not canonical: {d}"),
            TamperReason::IndexGap { expected, found } => {
                write!(f, "index gap: expected #{expected}, found #{found}")
            }
            TamperReason::TaskColumnMismatch => {
                f.write_str("the task-id column disagrees with the event")
            }
            TamperReason::ClearTextMismatch { field } => {
                write!(f, "the clear-text {field} does not match its HMAC")
            }
            TamperReason::RootMismatch { checkpoint_size } => write!(
                f,
                "rebuilt tree differs from the signed checkpoint of size {checkpoint_size} (events altered, removed or reordered)"
            ),
            TamperReason::CheckpointSignature { checkpoint_size } => write!(
                f,
                "checkpoint of size {checkpoint_size} has an invalid signature (forged or altered)"
            ),
            TamperReason::CheckpointMalformed {
                checkpoint_size,
                detail,
            } => write!(
                f,
                "checkpoint of size {checkpoint_size} is malformed: {detail}"
            ),
            TamperReason::CheckpointBeyondLog {
                checkpoint_size,
                log_size,
            } => write!(
                f,
                "checkpoint of size {checkpoint_size} covers more than the {log_size} stored events (events deleted)"
            ),
            TamperReason::UnsignedTail {
                last_checkpoint_size,
                log_size,
            } => write!(
                f,
                "{log_size} events stored but the last checkpoint covers {last_checkpoint_size} (unsigned events inserted)"
            ),
            TamperReason::NoCheckpoint => f.write_str("events stored but no checkpoint"),
            TamperReason::Storage(d) => write!(f, "cannot read the log: {d}"),
            TamperReason::Truncated {
                witness,
                witnessed_size,
                log_size,
            } => {
                let last = witnessed_size.saturating_sub(1);
                let gone = if last == *log_size {
                    format!("event #{last}, covered by {witness}, was")
                } else {
                    format!("events #{log_size}..#{last}, covered by {witness}, were")
                };
                write!(
                    f,
                    "log truncated: witnessed {witnessed_size} events, log has {log_size} ({gone} deleted together with their checkpoints)"
                )
            }
            TamperReason::Forked {
                witness,
                witnessed_size,
                detail,
            } => write!(
                f,
                "log forked/rewritten at or before event #{}: the log's first {witnessed_size} events are not the ones {witness} signed ({detail})",
                witnessed_size.saturating_sub(1)
            ),
            TamperReason::WitnessInvalid { witness, detail } => {
                write!(
                    f,
                    "{witness} is not a valid tree head of this log: {detail}"
                )
            }
            TamperReason::SharedStore(d) => f.write_str(d),
            TamperReason::HeadFileMissing { path } => write!(
                f,
                "the head file {path} is missing, but this log has written one (deleted along with the newest events?)"
            ),
        }
    }
}
