//! Every broker's audit log in the PostgreSQL datastore
//! ([`baton_audit::Mirror`]): one log per broker, shipped before its
//! receipts are returned, read by every broker's `audit trace` and
//! `audit verify`.
//!
//! What the database alone cannot forge (it holds no key): a log's
//! registration (its checkpoint key, sealed with the key of
//! `--ca-encryption-key-file` and bound to the log's id) and the clear text
//! of sensitive values (sealed, bound to the log and the event's index).
//! Events and checkpoints are stored as they are: each log's checkpoint
//! signatures and Merkle tree make any change to them visible to the
//! readers in `baton_audit`.

use std::sync::Arc;

use baton_audit::{Mirror, MirrorError, MirrorLeaf, SharedLog, SignedCheckpoint};
use baton_core::TaskId;

use crate::pg::{PgStore, RawAuditLeaf, RawCheckpoint};
use crate::pg_ca::CaSealKey;

/// The audit mirror on the PostgreSQL datastore.
#[derive(Debug)]
pub struct PgAuditMirror {
    pg: Arc<PgStore>,
    key: CaSealKey,
    /// This broker's instance id, recorded with its log's registration.
    broker: String,
    /// This broker's log registration, sealed once (each seal spends a
    /// random nonce of the long-lived key).
    registration: std::sync::OnceLock<Vec<u8>>,
}

impl PgAuditMirror {
    pub fn new(pg: Arc<PgStore>, key: CaSealKey, broker: String) -> Self {
        Self {
            pg,
            key,
            broker,
            registration: std::sync::OnceLock::new(),
        }
    }

    fn clear_aad(log: &str, idx: u64) -> String {
        format!("baton-audit-clear:{log}:{idx}")
    }

    fn key_aad(log: &str) -> String {
        format!("baton-audit-log:{log}")
    }

    fn open_clear(
        &self,
        log: &str,
        idx: u64,
        sealed: Option<&[u8]>,
    ) -> Result<Option<String>, MirrorError> {
        let Some(sealed) = sealed else {
            return Ok(None);
        };
        let plain = self
            .key
            .open_bound(&Self::clear_aad(log, idx), sealed)
            .ok_or_else(|| tampered(log, format!("the clear text of event #{idx} does not open with the key of --ca-encryption-key-file (altered or moved)")))?;
        String::from_utf8(plain)
            .map(Some)
            .map_err(|_| tampered(log, format!("the clear text of event #{idx} is not UTF-8")))
    }

    fn leaf(&self, log: &str, raw: RawAuditLeaf) -> Result<MirrorLeaf, MirrorError> {
        let index = u64::try_from(raw.idx).map_err(|_| tampered(log, "a negative event index"))?;
        let leaf_hash: [u8; 32] = raw.leaf_hash.as_slice().try_into().map_err(|_| {
            tampered(
                log,
                format!("event #{index} has a leaf hash of the wrong length"),
            )
        })?;
        let clear_text = self.open_clear(log, index, raw.clear_text.as_deref())?;
        Ok(MirrorLeaf {
            index,
            task_id: raw.task_id,
            event: raw.event,
            leaf_hash,
            clear_text,
        })
    }

    fn leaves_of(&self, log: &str, raw: Vec<RawAuditLeaf>) -> Result<Vec<MirrorLeaf>, MirrorError> {
        raw.into_iter().map(|r| self.leaf(log, r)).collect()
    }
}

fn tampered(log: &str, detail: impl Into<String>) -> MirrorError {
    MirrorError::Tampered {
        log: log.to_owned(),
        detail: detail.into(),
    }
}

fn unavailable(e: impl std::fmt::Display) -> MirrorError {
    MirrorError::Unavailable(e.to_string())
}

fn i64_of(v: u64) -> Result<i64, MirrorError> {
    i64::try_from(v).map_err(|_| MirrorError::Unavailable(format!("{v} is out of range")))
}

fn checkpoint(log: &str, raw: RawCheckpoint) -> Result<SignedCheckpoint, MirrorError> {
    let neg = |what: &str| tampered(log, format!("a negative checkpoint {what}"));
    Ok(SignedCheckpoint {
        size: u64::try_from(raw.size).map_err(|_| neg("size"))?,
        root_hash: raw.root_hash,
        at: u64::try_from(raw.at).map_err(|_| neg("time"))?,
        signature: raw.signature,
    })
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

impl Mirror for PgAuditMirror {
    fn head(&self, log_id: &str) -> Result<Option<SignedCheckpoint>, MirrorError> {
        self.pg
            .audit_head(log_id)
            .map_err(unavailable)?
            .map(|c| checkpoint(log_id, c))
            .transpose()
    }

    fn ship(
        &self,
        log: &SharedLog,
        leaves: &[MirrorLeaf],
        checkpoints: &[SignedCheckpoint],
    ) -> Result<(), MirrorError> {
        let id = log.log_id.as_str();
        let aad = Self::key_aad(id);
        let sealed_key = match self.registration.get() {
            Some(k) => k.clone(),
            None => {
                let k = self
                    .key
                    .seal_bound(&aad, &log.public_key)
                    .ok_or_else(|| unavailable("sealing the audit log's key failed"))?;
                let _ = self.registration.set(k.clone());
                k
            }
        };
        let key_ok = |stored: &[u8]| {
            self.key.open_bound(&aad, stored).as_deref() == Some(log.public_key.as_slice())
        };
        let raw_leaves = leaves
            .iter()
            .map(|l| {
                let clear_text = match &l.clear_text {
                    Some(c) => Some(
                        self.key
                            .seal_bound(&Self::clear_aad(id, l.index), c.as_bytes())
                            .ok_or_else(|| unavailable("sealing an event's clear text failed"))?,
                    ),
                    None => None,
                };
                Ok(RawAuditLeaf {
                    idx: i64_of(l.index)?,
                    task_id: l.task_id.clone(),
                    event: l.event.clone(),
                    leaf_hash: l.leaf_hash.to_vec(),
                    clear_text,
                })
            })
            .collect::<Result<Vec<_>, MirrorError>>()?;
        let raw_cps = checkpoints
            .iter()
            .map(|c| {
                Ok(RawCheckpoint {
                    size: i64_of(c.size)?,
                    root_hash: c.root_hash.clone(),
                    at: i64_of(c.at)?,
                    signature: c.signature.clone(),
                })
            })
            .collect::<Result<Vec<_>, MirrorError>>()?;
        self.pg
            .audit_ship(
                id,
                &sealed_key,
                &self.broker,
                now(),
                &key_ok,
                &raw_leaves,
                &raw_cps,
            )
            .map_err(unavailable)?
            .map_err(MirrorError::Unavailable)
    }

    fn logs(&self) -> Result<Vec<SharedLog>, MirrorError> {
        self.pg
            .audit_logs()
            .map_err(unavailable)?
            .into_iter()
            .map(|(log_id, sealed, broker)| {
                let public_key = self
                    .key
                    .open_bound(&Self::key_aad(&log_id), &sealed)
                    .ok_or_else(|| {
                        tampered(&log_id, format!("its registration (by {broker}) does not open with the key of --ca-encryption-key-file: another trust domain's log, or a forged registration"))
                    })?;
                Ok(SharedLog { log_id, public_key })
            })
            .collect()
    }

    fn leaves(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<MirrorLeaf>, MirrorError> {
        let to = to.min(i64::MAX as u64);
        let raw = self
            .pg
            .audit_leaves(log_id, i64_of(from)?, i64_of(to)?)
            .map_err(unavailable)?;
        self.leaves_of(log_id, raw)
    }

    fn events(&self, log_id: &str, indexes: &[u64]) -> Result<Vec<MirrorLeaf>, MirrorError> {
        let idx = indexes
            .iter()
            .map(|i| i64_of(*i))
            .collect::<Result<Vec<_>, _>>()?;
        let raw = self.pg.audit_events(log_id, &idx).map_err(unavailable)?;
        self.leaves_of(log_id, raw)
    }

    fn checkpoints(&self, log_id: &str, from: u64) -> Result<Vec<SignedCheckpoint>, MirrorError> {
        self.pg
            .audit_checkpoints(log_id, i64_of(from)?)
            .map_err(unavailable)?
            .into_iter()
            .map(|c| checkpoint(log_id, c))
            .collect()
    }

    fn redact(&self, task: Option<&TaskId>) -> Result<u64, MirrorError> {
        self.pg
            .audit_redact(task.map(TaskId::as_str))
            .map_err(unavailable)
    }
}
