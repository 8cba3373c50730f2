//! One log per broker, each copied into a store every broker reads (the
//! PostgreSQL datastore): how several brokers keep one audit trail.
//!
//! Each broker appends to its own log (own keys, own sequence, its local
//! file and head file) and, before any receipt of a batch is returned,
//! ships the batch's events and its signed checkpoint to the [`Mirror`]. A
//! batch the mirror did not take fails its appends (the requests are
//! refused) and is shipped with the next batch: the mirror holds every
//! acknowledged event of every broker, so losing a broker's disk loses no
//! acknowledged record.
//!
//! Reading the other brokers' logs trusts nothing the store says on its
//! own: each log's key comes from the mirror's authenticated list
//! ([`Mirror::logs`]: the implementor seals it), each log is followed by
//! its leaf hashes up to its newest signed checkpoint (signature checked,
//! root rebuilt), and every event shown in a trace is checked against that
//! tree. [`AuditLog::verify_shared`] rebuilds every log from its event bytes
//! and checks every checkpoint signature.

use std::collections::{BTreeMap, HashMap};

use baton_core::TaskId;
use rusqlite::params;

use super::{AuditLog, Inner, Prepared, check_clear_text, to_i64};
use crate::error::{AuditError, TamperError, TamperReason};
use crate::event::{AuditRecord, decode_canonical};
use crate::merkle::{self, Hash, Tree};
use crate::proof::SignedCheckpoint;

/// How many events one shipment of a backlog holds at most (it always ends
/// at a checkpoint, so it may hold one batch more).
const SHIP_PAGE: u64 = 10_000;

/// The id of the log whose checkpoints `public_key` signs: 16 hex digits
/// of its SHA-256.
pub fn log_id(public_key: &[u8]) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, public_key);
    hex::encode(&digest.as_ref()[..8])
}

/// One event as the mirror stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorLeaf {
    pub index: u64,
    pub task_id: String,
    /// The canonical encoding (what the tree covers).
    pub event: Vec<u8>,
    pub leaf_hash: Hash,
    /// The display JSON of sensitive values, outside the tree (the mirror
    /// should seal it: it cannot be checked without the writer's HMAC key).
    pub clear_text: Option<String>,
}

/// A log the mirror holds, with the key it is known by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedLog {
    pub log_id: String,
    /// The checkpoint verification key (uncompressed P-256 point).
    pub public_key: Vec<u8>,
}

/// One event of a task, from any log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRow {
    pub log_id: String,
    pub index: u64,
    pub event: Vec<u8>,
    pub clear_text: Option<String>,
}

/// The shared store of every broker's log. Errors are the store's words.
pub trait Mirror: Send + Sync {
    /// The newest checkpoint stored of log `log_id` (its stored size).
    fn head(&self, log_id: &str) -> Result<Option<SignedCheckpoint>, String>;
    /// Stores `leaves` (contiguous, starting at the log's stored size) and
    /// `checkpoints` (the last one at the size after `leaves`) of the log
    /// `log`, all or nothing; refuses if the stored size is not where
    /// `leaves` start, or the log is registered with another key.
    fn ship(
        &self,
        log: &SharedLog,
        leaves: &[MirrorLeaf],
        checkpoints: &[SignedCheckpoint],
    ) -> Result<(), String>;
    /// Every log stored, each with its key as registered by its writer.
    /// Must fail if any registration cannot be authenticated.
    fn logs(&self) -> Result<Vec<SharedLog>, String>;
    /// The stored leaf hashes of events `from..to` of `log_id`.
    fn leaf_hashes(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<Hash>, String>;
    /// The stored events `from..to` of `log_id`.
    fn leaves(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<MirrorLeaf>, String>;
    /// The stored checkpoints of `log_id` with a size of at least `from`,
    /// smallest first.
    fn checkpoints(&self, log_id: &str, from: u64) -> Result<Vec<SignedCheckpoint>, String>;
    /// Every stored event of `task`, from every log.
    fn task_rows(&self, task: &TaskId) -> Result<Vec<TaskRow>, String>;
    /// Wipes the stored clear text of `task`'s events (every log), or of
    /// every event; returns how many events were wiped.
    fn redact(&self, task: Option<&TaskId>) -> Result<u64, String>;
}

/// Another broker's log as this one has checked it so far.
pub(crate) struct Followed {
    public_key: Vec<u8>,
    tree: Tree,
}

/// What [`AuditLog::verify_shared`] checked of one log in the mirror.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SharedLogReport {
    pub log_id: String,
    /// Whether it is this broker's own log.
    pub own: bool,
    pub size: u64,
    /// Lowercase hex root of all its events.
    pub root: String,
    pub checkpoints: u64,
    pub signatures: u64,
}

fn mirror_err(e: impl std::fmt::Display) -> AuditError {
    AuditError::Mirror(e.to_string())
}

fn shared_tamper(log: &str, error: TamperError) -> AuditError {
    AuditError::SharedLog {
        log: log.to_owned(),
        error,
    }
}

impl AuditLog {
    /// This log's id in the mirror ([`log_id`] of its checkpoint key).
    pub fn log_id(&self) -> String {
        log_id(self.keys.public_key())
    }

    fn own(&self) -> SharedLog {
        SharedLog {
            log_id: self.log_id(),
            public_key: self.keys.public_key().to_vec(),
        }
    }

    /// Ships every event the mirror lacks (after a failed shipment, or at
    /// start: a broker killed between its commit and its shipment). Refuses
    /// a mirror that holds more of this log than the local file, or other
    /// events. Returns the mirrored size. Without a mirror, the log's size.
    pub fn sync_mirror(&self) -> Result<u64, AuditError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        if self.mirror.is_none() {
            return Ok(inner.tree.size());
        }
        let size = inner.tree.size();
        self.ship_from(inner, None, size)?;
        Ok(size)
    }

    /// After a batch `start..` was committed (and its head written): ships
    /// it, or everything the mirror lacks up to the new size.
    pub(super) fn mirror_batch(
        &self,
        inner: &mut Inner,
        start: u64,
        jobs: &[Prepared],
        checkpoint: &SignedCheckpoint,
    ) -> Result<(), AuditError> {
        if self.mirror.is_none() {
            return Ok(());
        }
        self.ship_from(inner, Some((start, jobs, checkpoint)), checkpoint.size)
    }

    fn ship_from(
        &self,
        inner: &mut Inner,
        batch: Option<(u64, &[Prepared], &SignedCheckpoint)>,
        size: u64,
    ) -> Result<(), AuditError> {
        let Some(mirror) = &self.mirror else {
            return Ok(());
        };
        let own = self.own();
        let result = (|| {
            let known = match inner.mirrored {
                Some(n) => n,
                None => mirrored_size(mirror.as_ref(), &own.log_id, &inner.tree)?,
            };
            if known == size {
                return Ok(());
            }
            if let Some((start, jobs, cp)) = batch
                && start == known
            {
                let leaves: Vec<MirrorLeaf> = jobs
                    .iter()
                    .zip(start..)
                    .map(|(j, index)| MirrorLeaf {
                        index,
                        task_id: j.task_id.clone(),
                        event: j.bytes.clone(),
                        leaf_hash: j.leaf,
                        clear_text: j.clear.clone(),
                    })
                    .collect();
                mirror
                    .ship(&own, &leaves, std::slice::from_ref(cp))
                    .map_err(mirror_err)?;
                inner.mirrored = Some(size);
                return Ok(());
            }
            // A backlog: read it back from the local file, a page at a
            // time, each page ending at a checkpoint.
            let mut from = known;
            while from < size {
                let cps = stored_checkpoints(inner, from, size, SHIP_PAGE)?;
                let Some(end) = cps.last().map(|c| c.size) else {
                    return Err(AuditError::Range(format!(
                        "no checkpoint between {from} and {size} to ship"
                    )));
                };
                let leaves = stored_leaves(inner, from, end)?;
                mirror.ship(&own, &leaves, &cps).map_err(mirror_err)?;
                inner.mirrored = Some(end);
                from = end;
            }
            Ok(())
        })();
        if result.is_err() {
            inner.mirrored = None;
        }
        result
    }

    /// Every event of `task` from every broker's log in the mirror, each
    /// checked against its log's signed tree; this log's own from the local
    /// file. Records carry their log's id.
    pub(super) fn shared_events_for_task(
        &self,
        mirror: &dyn Mirror,
        task: &TaskId,
    ) -> Result<Vec<AuditRecord>, AuditError> {
        let own_id = self.log_id();
        let mut out = self.local_events_for_task(task)?;
        for r in &mut out {
            r.log = Some(own_id.clone());
        }
        let rows = mirror.task_rows(task).map_err(mirror_err)?;
        let mut by_log: BTreeMap<String, Vec<TaskRow>> = BTreeMap::new();
        for row in rows {
            if row.log_id != own_id {
                by_log.entry(row.log_id.clone()).or_default().push(row);
            }
        }
        if by_log.is_empty() {
            return Ok(out);
        }
        self.follow(mirror)?;
        let followed = self
            .followed
            .lock()
            .map_err(|_| AuditError::Poisoned("the followed logs' lock".into()))?;
        for (log, rows) in by_log {
            let Some(f) = followed.get(&log) else {
                return Err(shared_tamper(
                    &log,
                    TamperError::general(TamperReason::Malformed(
                        "events stored under a log no broker registered".into(),
                    )),
                ));
            };
            for row in rows {
                if row.index >= f.tree.size() {
                    // Stored after the newest checkpoint this broker read:
                    // a shipment in flight. Shown at the next trace.
                    continue;
                }
                if f.tree.leaf(row.index) != Some(merkle::leaf_hash(&row.event)) {
                    return Err(shared_tamper(
                        &log,
                        TamperError::at(row.index, TamperReason::LeafHashMismatch),
                    ));
                }
                let ev = decode_canonical(&row.event).map_err(|e| {
                    shared_tamper(
                        &log,
                        TamperError::at(row.index, TamperReason::Malformed(e.0)),
                    )
                })?;
                if &ev.task_id != task {
                    return Err(shared_tamper(
                        &log,
                        TamperError::at(row.index, TamperReason::TaskColumnMismatch),
                    ));
                }
                let clear = check_clear_text(row.index, &ev, row.clear_text.as_deref(), None)?;
                let mut rec = AuditRecord::from_parts(row.index, ev, clear);
                rec.log = Some(log.clone());
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Brings every other log this broker follows up to its newest signed
    /// checkpoint in the mirror: the leaf hashes after what was checked,
    /// the rebuilt root against each new checkpoint, the newest one's
    /// signature. A log that disappeared, changed its key, or no longer
    /// extends what was checked is refused.
    fn follow(&self, mirror: &dyn Mirror) -> Result<(), AuditError> {
        let own_id = self.log_id();
        let logs = mirror.logs().map_err(mirror_err)?;
        let mut followed = self
            .followed
            .lock()
            .map_err(|_| AuditError::Poisoned("the followed logs' lock".into()))?;
        let listed: HashMap<&str, &SharedLog> =
            logs.iter().map(|l| (l.log_id.as_str(), l)).collect();
        for id in followed.keys() {
            if !listed.contains_key(id.as_str()) {
                return Err(shared_tamper(
                    id,
                    TamperError::general(TamperReason::Malformed(
                        "the log was removed from the datastore".into(),
                    )),
                ));
            }
        }
        for log in &logs {
            if log.log_id == own_id {
                continue;
            }
            if log_id(&log.public_key) != log.log_id {
                return Err(shared_tamper(
                    &log.log_id,
                    TamperError::general(TamperReason::Malformed(
                        "its id is not the fingerprint of its key".into(),
                    )),
                ));
            }
            let f = followed
                .entry(log.log_id.clone())
                .or_insert_with(|| Followed {
                    public_key: log.public_key.clone(),
                    tree: Tree::new(),
                });
            if f.public_key != log.public_key {
                return Err(shared_tamper(
                    &log.log_id,
                    TamperError::general(TamperReason::Malformed(
                        "the log's key changed in the datastore".into(),
                    )),
                ));
            }
            follow_one(mirror, &log.log_id, f)?;
        }
        Ok(())
    }

    /// Rebuilds every log in the mirror from its stored event bytes and
    /// checks every checkpoint (root and signature); this broker's own is
    /// also checked to be a prefix of the local file.
    pub fn verify_shared(&self) -> Result<Vec<SharedLogReport>, AuditError> {
        let Some(mirror) = &self.mirror else {
            return Ok(Vec::new());
        };
        let own_id = self.log_id();
        let logs = mirror.logs().map_err(mirror_err)?;
        let mut out = Vec::with_capacity(logs.len());
        for log in &logs {
            if log_id(&log.public_key) != log.log_id {
                return Err(shared_tamper(
                    &log.log_id,
                    TamperError::general(TamperReason::Malformed(
                        "its id is not the fingerprint of its key".into(),
                    )),
                ));
            }
            let own = log.log_id == own_id;
            if own && log.public_key != self.keys.public_key() {
                return Err(shared_tamper(
                    &log.log_id,
                    TamperError::general(TamperReason::Malformed(
                        "registered with another key than this broker's".into(),
                    )),
                ));
            }
            let report =
                verify_one(mirror.as_ref(), log).map_err(|e| shared_tamper(&log.log_id, e))?;
            if own {
                let inner = self.lock()?;
                let local = inner.tree.size();
                if report.size > local {
                    return Err(shared_tamper(
                        &log.log_id,
                        TamperError::general(TamperReason::Malformed(format!(
                            "the datastore holds {} events of this broker's log, its file only {local}",
                            report.size
                        ))),
                    ));
                }
                let root = inner.tree.root(report.size).map(hex::encode);
                if root.as_deref() != Some(report.root.as_str()) && report.size > 0 {
                    return Err(shared_tamper(
                        &log.log_id,
                        TamperError::general(TamperReason::Forked {
                            witness: "this broker's own log file".into(),
                            witnessed_size: report.size,
                            detail: "the datastore's copy has other events".into(),
                        }),
                    ));
                }
            }
            out.push(SharedLogReport { own, ..report });
        }
        Ok(out)
    }

    /// Wipes clear text in the mirror too (every log's copy of `task`).
    pub(super) fn redact_mirror(&self, task: Option<&TaskId>) -> Result<Option<u64>, AuditError> {
        match &self.mirror {
            Some(m) => m.redact(task).map(Some).map_err(mirror_err),
            None => Ok(None),
        }
    }

    /// The mirror, when events are read from it.
    pub(super) fn mirror_for_reads(&self) -> Option<&dyn Mirror> {
        self.mirror.as_deref()
    }
}

/// The mirrored size of this log, checked: not beyond the local tree, and
/// the same root at that size.
fn mirrored_size(mirror: &dyn Mirror, log: &str, tree: &Tree) -> Result<u64, AuditError> {
    let Some(head) = mirror.head(log).map_err(mirror_err)? else {
        return Ok(0);
    };
    let local = tree.size();
    if head.size > local {
        return Err(AuditError::Mirror(format!(
            "the datastore holds {} events of this broker's audit log {log}, the local file only {local}: the local log was cut short or replaced (restore it, or start this broker with a new audit key)",
            head.size
        )));
    }
    let root = tree.root(head.size).map(hex::encode);
    if root.as_deref() != Some(head.root_hash.as_str()) {
        return Err(AuditError::Mirror(format!(
            "the datastore's copy of audit log {log} differs from the local file at size {}",
            head.size
        )));
    }
    Ok(head.size)
}

fn stored_checkpoints(
    inner: &Inner,
    from: u64,
    to: u64,
    page: u64,
) -> Result<Vec<SignedCheckpoint>, AuditError> {
    let mut stmt = inner.conn.prepare_cached(
        "SELECT size, root_hash, at, signature FROM checkpoints
         WHERE size > ?1 AND size <= ?2 ORDER BY size",
    )?;
    let rows = stmt.query_map(params![to_i64(from)?, to_i64(to)?], |r| {
        Ok(SignedCheckpoint {
            size: r.get::<_, i64>(0)?.try_into().unwrap_or_default(),
            root_hash: r.get(1)?,
            at: r.get::<_, i64>(2)?.try_into().unwrap_or_default(),
            signature: r.get(3)?,
        })
    })?;
    let mut out = Vec::new();
    for cp in rows {
        let cp = cp?;
        let end = cp.size;
        out.push(cp);
        if end - from >= page {
            break;
        }
    }
    Ok(out)
}

fn stored_leaves(inner: &Inner, from: u64, to: u64) -> Result<Vec<MirrorLeaf>, AuditError> {
    let mut stmt = inner.conn.prepare_cached(
        "SELECT idx, task_id, event, clear_text FROM leaves WHERE idx >= ?1 AND idx < ?2 ORDER BY idx",
    )?;
    let mut rows = stmt.query(params![to_i64(from)?, to_i64(to)?])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let index: u64 = r.get::<_, i64>(0)?.try_into().unwrap_or_default();
        let event: Vec<u8> = r.get(2)?;
        // The tree in memory is what was checked at open: ship its hash
        // only for the bytes that still match it.
        let leaf = merkle::leaf_hash(&event);
        if inner.tree.leaf(index) != Some(leaf) {
            return Err(TamperError::at(index, TamperReason::LeafHashMismatch).into());
        }
        out.push(MirrorLeaf {
            index,
            task_id: r.get(1)?,
            event,
            leaf_hash: leaf,
            clear_text: r.get(3)?,
        });
    }
    if out.len() as u64 != to - from {
        return Err(AuditError::Range(format!(
            "events {from}..{to} are not all in the local file"
        )));
    }
    Ok(out)
}

/// Extends `f` to the newest checkpoint of `log` in the mirror.
fn follow_one(mirror: &dyn Mirror, log: &str, f: &mut Followed) -> Result<(), AuditError> {
    let checked = f.tree.size();
    let cps = mirror.checkpoints(log, checked).map_err(mirror_err)?;
    let tamper = |e: TamperError| shared_tamper(log, e);
    if checked > 0 {
        // The checkpoint this broker followed to must still be there.
        let root = f.tree.root(checked).map(hex::encode);
        let still = cps
            .first()
            .is_some_and(|c| c.size == checked && Some(c.root_hash.as_str()) == root.as_deref());
        if !still {
            return Err(tamper(TamperError::general(TamperReason::Truncated {
                witness: "what this broker checked before".into(),
                witnessed_size: checked,
                log_size: cps.first().map_or(0, |c| c.size.min(checked)),
            })));
        }
    }
    let Some(newest) = cps.last() else {
        return Ok(());
    };
    if newest.size == checked {
        return Ok(());
    }
    newest.verify(&f.public_key).map_err(|_| {
        tamper(TamperError::general(TamperReason::CheckpointSignature {
            checkpoint_size: newest.size,
        }))
    })?;
    let hashes = mirror
        .leaf_hashes(log, checked, newest.size)
        .map_err(mirror_err)?;
    if hashes.len() as u64 != newest.size - checked {
        return Err(tamper(TamperError::general(
            TamperReason::CheckpointBeyondLog {
                checkpoint_size: newest.size,
                log_size: checked + hashes.len() as u64,
            },
        )));
    }
    for h in hashes {
        f.tree.push(h);
    }
    for cp in &cps {
        let root = f.tree.root(cp.size).map(hex::encode);
        if root.as_deref() != Some(cp.root_hash.as_str()) {
            f.tree.truncate(checked);
            return Err(tamper(TamperError::at(
                checked,
                TamperReason::RootMismatch {
                    checkpoint_size: cp.size,
                },
            )));
        }
    }
    Ok(())
}

/// Rebuilds `log` from the mirror's event bytes, a page at a time, and
/// checks every checkpoint.
fn verify_one(mirror: &dyn Mirror, log: &SharedLog) -> Result<SharedLogReport, TamperError> {
    let storage = |e: String| TamperError::general(TamperReason::Storage(e));
    let cps = mirror.checkpoints(&log.log_id, 0).map_err(storage)?;
    let size = cps.last().map_or(0, |c| c.size);
    let mut tree = Tree::new();
    let mut from = 0;
    while from < size {
        let to = (from + SHIP_PAGE).min(size);
        let leaves = mirror.leaves(&log.log_id, from, to).map_err(storage)?;
        for (expected, leaf) in (from..).zip(&leaves) {
            if leaf.index != expected {
                return Err(TamperError::at(
                    expected,
                    TamperReason::IndexGap {
                        expected,
                        found: leaf.index,
                    },
                ));
            }
            let h = merkle::leaf_hash(&leaf.event);
            if h != leaf.leaf_hash {
                return Err(TamperError::at(expected, TamperReason::LeafHashMismatch));
            }
            let ev = decode_canonical(&leaf.event)
                .map_err(|e| TamperError::at(expected, TamperReason::Malformed(e.0)))?;
            if ev.task_id.as_str() != leaf.task_id {
                return Err(TamperError::at(expected, TamperReason::TaskColumnMismatch));
            }
            tree.push(h);
        }
        if (leaves.len() as u64) < to - from {
            return Err(TamperError::general(TamperReason::CheckpointBeyondLog {
                checkpoint_size: size,
                log_size: from + leaves.len() as u64,
            }));
        }
        from = to;
    }
    // Events stored past the newest checkpoint were never signed.
    let extra = mirror
        .leaves(&log.log_id, size, size + 1)
        .map_err(storage)?;
    if !extra.is_empty() {
        return Err(TamperError::at(
            size,
            TamperReason::UnsignedTail {
                last_checkpoint_size: size,
                log_size: size + 1,
            },
        ));
    }
    for cp in &cps {
        let root = cp.verify(&log.public_key).map_err(|_| {
            TamperError::general(TamperReason::CheckpointSignature {
                checkpoint_size: cp.size,
            })
        })?;
        if tree.root(cp.size) != Some(root) {
            return Err(TamperError::general(TamperReason::RootMismatch {
                checkpoint_size: cp.size,
            }));
        }
    }
    Ok(SharedLogReport {
        log_id: log.log_id.clone(),
        own: false,
        size,
        root: hex::encode(tree.root(size).unwrap_or_else(merkle::empty_root)),
        checkpoints: cps.len() as u64,
        signatures: cps.len() as u64,
    })
}
