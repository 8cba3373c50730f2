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

use std::collections::HashMap;
use std::sync::MutexGuard;

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

/// Why a mirror call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MirrorError {
    /// The store could not be reached or answered with an error.
    #[error("{0}")]
    Unavailable(String),
    /// What the store holds of `log` cannot be what a broker wrote (a
    /// registration or clear text that does not open, a malformed row).
    #[error("audit log {log}: {detail}")]
    Tampered { log: String, detail: String },
}

/// The shared store of every broker's log.
pub trait Mirror: Send + Sync {
    /// The newest checkpoint stored of log `log_id` (its stored size).
    fn head(&self, log_id: &str) -> Result<Option<SignedCheckpoint>, MirrorError>;
    /// Stores `leaves` (contiguous, starting at the log's stored size) and
    /// `checkpoints` (the last one at the size after `leaves`) of the log
    /// `log`, all or nothing; refuses if the stored size is not where
    /// `leaves` start, or the log is registered with another key.
    fn ship(
        &self,
        log: &SharedLog,
        leaves: &[MirrorLeaf],
        checkpoints: &[SignedCheckpoint],
    ) -> Result<(), MirrorError>;
    /// Every log stored, each with its key as registered by its writer.
    /// Must fail if any registration cannot be authenticated.
    fn logs(&self) -> Result<Vec<SharedLog>, MirrorError>;
    /// The stored events `from..to` of `log_id`, by index.
    fn leaves(&self, log_id: &str, from: u64, to: u64) -> Result<Vec<MirrorLeaf>, MirrorError>;
    /// The stored events of `log_id` at `indexes`.
    fn events(&self, log_id: &str, indexes: &[u64]) -> Result<Vec<MirrorLeaf>, MirrorError>;
    /// The stored checkpoints of `log_id` with a size of at least `from`,
    /// smallest first.
    fn checkpoints(&self, log_id: &str, from: u64) -> Result<Vec<SignedCheckpoint>, MirrorError>;
    /// Wipes the stored clear text of `task`'s events (every log), or of
    /// every event; returns how many events were wiped.
    fn redact(&self, task: Option<&TaskId>) -> Result<u64, MirrorError>;
}

/// Another broker's log as this one has checked it so far: the tree of
/// its events and, from their checked bytes, each task's event indexes.
pub(crate) struct Followed {
    public_key: Vec<u8>,
    tree: Tree,
    by_task: HashMap<String, Vec<u64>>,
}

/// What this broker last checked of another log, kept in its own file: a
/// later check (after a restart too) must find the log still there, at
/// least as long, with the same root at that size.
struct Remembered {
    public_key: Vec<u8>,
    size: u64,
    root: String,
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

fn mirror_err(e: MirrorError) -> AuditError {
    match e {
        MirrorError::Unavailable(m) => AuditError::Mirror(m),
        MirrorError::Tampered { log, detail } => AuditError::SharedLog {
            log,
            error: TamperError::general(TamperReason::SharedStore(detail)),
        },
    }
}

fn shared_tamper(log: &str, error: TamperError) -> AuditError {
    AuditError::SharedLog {
        log: log.to_owned(),
        error,
    }
}

fn malformed(log: &str, detail: impl Into<String>) -> AuditError {
    shared_tamper(
        log,
        TamperError::general(TamperReason::SharedStore(detail.into())),
    )
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
        let size = inner.tree.size();
        if self.mirror.is_none() {
            return Ok(size);
        }
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
                None => mirrored_size(mirror.as_ref(), &own, &inner.tree)?,
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
                let leaves = stored_leaves(inner, &self.keys, from, end)?;
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
    /// found through its log's checked events and checked against its
    /// log's signed tree; this log's own from the local file. Records carry
    /// their log's id.
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
        self.follow(mirror)?;
        let followed = self.lock_followed()?;
        for (log, f) in followed.iter() {
            let Some(indexes) = f.by_task.get(task.as_str()) else {
                continue;
            };
            let rows = mirror.events(log, indexes).map_err(mirror_err)?;
            let mut rows: HashMap<u64, MirrorLeaf> =
                rows.into_iter().map(|r| (r.index, r)).collect();
            for &index in indexes {
                let Some(row) = rows.remove(&index) else {
                    return Err(shared_tamper(
                        log,
                        TamperError::at(
                            index,
                            TamperReason::Malformed("the event row has disappeared".into()),
                        ),
                    ));
                };
                if f.tree.leaf(index) != Some(merkle::leaf_hash(&row.event)) {
                    return Err(shared_tamper(
                        log,
                        TamperError::at(index, TamperReason::LeafHashMismatch),
                    ));
                }
                let ev = decode_canonical(&row.event).map_err(|e| {
                    shared_tamper(log, TamperError::at(index, TamperReason::Malformed(e.0)))
                })?;
                if &ev.task_id != task {
                    return Err(shared_tamper(
                        log,
                        TamperError::at(index, TamperReason::TaskColumnMismatch),
                    ));
                }
                let clear = check_clear_text(index, &ev, row.clear_text.as_deref(), None)?;
                let mut rec = AuditRecord::from_parts(index, ev, clear);
                rec.log = Some(log.clone());
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Brings every other log up to its newest signed checkpoint in the
    /// mirror (see [`follow_one`]), and checks it against what this broker
    /// checked before (in memory, and remembered in its own file across
    /// restarts): a log that disappeared, changed its key, was cut short or
    /// rewritten is refused. Also run in the background by the broker, so
    /// that every broker remembers every log.
    pub fn follow_shared(&self) -> Result<(), AuditError> {
        match &self.mirror {
            Some(m) => self.follow(m.as_ref()),
            None => Ok(()),
        }
    }

    fn follow(&self, mirror: &dyn Mirror) -> Result<(), AuditError> {
        let own_id = self.log_id();
        // One follow at a time, and what was remembered read before the
        // list: a log registered (and followed) meanwhile is never taken
        // for a removed one.
        let mut followed = self.lock_followed()?;
        let (logs, remembered) = self.listed(mirror, &own_id)?;
        for id in followed.keys() {
            if !logs.iter().any(|l| &l.log_id == id) {
                return Err(malformed(id, "the log was removed from the datastore"));
            }
        }
        for log in &logs {
            if log.log_id == own_id {
                continue;
            }
            check_fingerprint(log)?;
            let f = followed
                .entry(log.log_id.clone())
                .or_insert_with(|| Followed {
                    public_key: log.public_key.clone(),
                    tree: Tree::new(),
                    by_task: HashMap::new(),
                });
            if f.public_key != log.public_key {
                return Err(malformed(
                    &log.log_id,
                    "the log's key changed in the datastore",
                ));
            }
            follow_one(mirror, &log.log_id, f)?;
            let root = extends(&log.log_id, &f.tree, remembered.get(&log.log_id))?;
            self.remember(&log.log_id, &log.public_key, f.tree.size(), &root)?;
        }
        Ok(())
    }

    /// Rebuilds every log in the mirror from its stored event bytes and
    /// checks every checkpoint (root and signature), and that it extends
    /// what this broker checked before; this broker's own is also checked
    /// to be a prefix of the local file and to be there at all.
    pub fn verify_shared(&self) -> Result<Vec<SharedLogReport>, AuditError> {
        let Some(mirror) = &self.mirror else {
            return Ok(Vec::new());
        };
        let own_id = self.log_id();
        // Not concurrently with a follow, and what was remembered read
        // before the list (see `follow`).
        let _following = self.lock_followed()?;
        let (logs, remembered) = self.listed(mirror.as_ref(), &own_id)?;
        let local = self.size()?;
        if local > 0 && !logs.iter().any(|l| l.log_id == own_id) {
            return Err(malformed(
                &own_id,
                format!("this broker's log ({local} events here) is missing from the datastore"),
            ));
        }
        let mut out = Vec::with_capacity(logs.len());
        for log in &logs {
            check_fingerprint(log)?;
            let own = log.log_id == own_id;
            if own && log.public_key != self.keys.public_key() {
                return Err(malformed(
                    &log.log_id,
                    "registered with another key than this broker's",
                ));
            }
            let (report, tree) =
                verify_one(mirror.as_ref(), log).map_err(|e| shared_tamper(&log.log_id, e))?;
            if own {
                let inner = self.lock()?;
                if report.size > inner.tree.size() {
                    return Err(malformed(
                        &log.log_id,
                        format!(
                            "the datastore holds {} events of this broker's log, its file only {}",
                            report.size,
                            inner.tree.size()
                        ),
                    ));
                }
                let root = inner.tree.root(report.size).map(hex::encode);
                if report.size > 0 && root.as_deref() != Some(report.root.as_str()) {
                    return Err(shared_tamper(
                        &log.log_id,
                        TamperError::general(TamperReason::Forked {
                            witness: "this broker's own log file".into(),
                            witnessed_size: report.size,
                            detail: "the datastore's copy has other events".into(),
                        }),
                    ));
                }
            } else {
                let root = extends(&log.log_id, &tree, remembered.get(&log.log_id))?;
                self.remember(&log.log_id, &log.public_key, tree.size(), &root)?;
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

    fn lock_followed(&self) -> Result<MutexGuard<'_, HashMap<String, Followed>>, AuditError> {
        self.followed
            .lock()
            .map_err(|_| AuditError::Poisoned("the followed logs' lock".into()))
    }

    /// The logs in the mirror and what this broker remembers of others,
    /// read in that order's reverse (a log registered and followed in
    /// between is never taken for a removed one), every remembered log
    /// checked to be still listed with its key. Called under the follow
    /// lock.
    fn listed(
        &self,
        mirror: &dyn Mirror,
        own_id: &str,
    ) -> Result<(Vec<SharedLog>, HashMap<String, Remembered>), AuditError> {
        let remembered = self.remembered()?;
        let logs = mirror.logs().map_err(mirror_err)?;
        check_listed(&logs, &remembered, own_id)?;
        Ok((logs, remembered))
    }

    /// The other logs this broker checked before, from its own file.
    fn remembered(&self) -> Result<HashMap<String, Remembered>, AuditError> {
        let inner = self.lock()?;
        let mut stmt = inner
            .conn
            .prepare_cached("SELECT log_id, public_key, size, root FROM followed_logs")?;
        let rows = stmt.query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
            ))
        })?;
        let mut out = HashMap::new();
        for row in rows {
            let (id, key, size, root) = row?;
            let public_key = hex::decode(&key).map_err(|_| {
                AuditError::Range(format!("followed_logs: the key of {id} is not hex"))
            })?;
            out.insert(
                id,
                Remembered {
                    public_key,
                    size: u64::try_from(size).unwrap_or(0),
                    root,
                },
            );
        }
        Ok(out)
    }

    fn remember(&self, log: &str, key: &[u8], size: u64, root: &str) -> Result<(), AuditError> {
        let inner = self.lock()?;
        inner
            .conn
            .prepare_cached(
                "INSERT INTO followed_logs (log_id, public_key, size, root) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (log_id) DO UPDATE SET size = excluded.size, root = excluded.root
                 WHERE excluded.size >= followed_logs.size",
            )?
            .execute(params![log, hex::encode(key), to_i64(size)?, root])?;
        Ok(())
    }
}

/// Every log this broker checked before must still be listed, with the
/// same key.
fn check_listed(
    logs: &[SharedLog],
    remembered: &HashMap<String, Remembered>,
    own_id: &str,
) -> Result<(), AuditError> {
    for (id, r) in remembered {
        if id == own_id {
            continue;
        }
        match logs.iter().find(|l| &l.log_id == id) {
            None => {
                return Err(malformed(
                    id,
                    format!(
                        "the log was removed from the datastore (this broker checked {} of its events before)",
                        r.size
                    ),
                ));
            }
            Some(l) if l.public_key != r.public_key => {
                return Err(malformed(id, "the log's key changed in the datastore"));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

fn check_fingerprint(log: &SharedLog) -> Result<(), AuditError> {
    if log_id(&log.public_key) != log.log_id {
        return Err(malformed(
            &log.log_id,
            "its id is not the fingerprint of its key",
        ));
    }
    Ok(())
}

/// `tree` must extend what was remembered of `log`: at least as long, the
/// same root at the remembered size. Returns its root.
fn extends(log: &str, tree: &Tree, before: Option<&Remembered>) -> Result<String, AuditError> {
    let size = tree.size();
    if let Some(r) = before {
        if size < r.size {
            return Err(shared_tamper(
                log,
                TamperError::general(TamperReason::Truncated {
                    witness: "what this broker checked before".into(),
                    witnessed_size: r.size,
                    log_size: size,
                }),
            ));
        }
        if r.size > 0 && tree.root(r.size).map(hex::encode).as_deref() != Some(r.root.as_str()) {
            return Err(shared_tamper(
                log,
                TamperError::general(TamperReason::Forked {
                    witness: "what this broker checked before".into(),
                    witnessed_size: r.size,
                    detail: "other events at that size now".into(),
                }),
            ));
        }
    }
    Ok(hex::encode(
        tree.root(size).unwrap_or_else(merkle::empty_root),
    ))
}

/// The mirrored size of this log, checked: its newest checkpoint signed by
/// this log's key (an unsigned row is tampering, not a lost file), not
/// beyond the local tree, and the same root at that size.
fn mirrored_size(mirror: &dyn Mirror, own: &SharedLog, tree: &Tree) -> Result<u64, AuditError> {
    let log = own.log_id.as_str();
    let Some(head) = mirror.head(log).map_err(mirror_err)? else {
        return Ok(0);
    };
    if head.verify(&own.public_key).is_err() {
        return Err(shared_tamper(
            log,
            TamperError::general(TamperReason::CheckpointSignature {
                checkpoint_size: head.size,
            }),
        ));
    }
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
        if end.saturating_sub(from) >= page {
            break;
        }
    }
    Ok(out)
}

/// Events `from..to` of the local file as the mirror gets them: each
/// event's bytes must still hash to the tree checked at open, and its
/// clear text (which the mirror seals as this log's) must match the
/// event's HMACs, so an edit of the local file is refused here, not
/// sealed and shown by every broker as genuine.
fn stored_leaves(
    inner: &Inner,
    keys: &crate::AuditKeys,
    from: u64,
    to: u64,
) -> Result<Vec<MirrorLeaf>, AuditError> {
    let mut stmt = inner.conn.prepare_cached(
        "SELECT idx, task_id, event, clear_text FROM leaves WHERE idx >= ?1 AND idx < ?2 ORDER BY idx",
    )?;
    let mut rows = stmt.query(params![to_i64(from)?, to_i64(to)?])?;
    let mut out = Vec::new();
    while let Some(r) = rows.next()? {
        let index: u64 = r.get::<_, i64>(0)?.try_into().unwrap_or_default();
        let event: Vec<u8> = r.get(2)?;
        // The tree in memory is what was checked at open: ship only the
        // bytes that still match it.
        let leaf = merkle::leaf_hash(&event);
        if inner.tree.leaf(index) != Some(leaf) {
            return Err(TamperError::at(index, TamperReason::LeafHashMismatch).into());
        }
        let clear_text: Option<String> = r.get(3)?;
        if clear_text.is_some() {
            let ev =
                decode_canonical(&event).map_err(|e| AuditError::Decode { index, reason: e.0 })?;
            check_clear_text(index, &ev, clear_text.as_deref(), Some(keys))?;
        }
        out.push(MirrorLeaf {
            index,
            task_id: r.get(1)?,
            event,
            leaf_hash: leaf,
            clear_text,
        });
    }
    if out.len() as u64 != to.saturating_sub(from) {
        return Err(AuditError::Range(format!(
            "events {from}..{to} are not all in the local file"
        )));
    }
    Ok(out)
}

/// Reads events `from..to` of `log` from the mirror, a page at a time,
/// checking that they are contiguous and decode; calls `each` with the
/// index, the leaf hash of the stored bytes and the decoded task.
fn read_events(
    mirror: &dyn Mirror,
    log: &str,
    from: u64,
    to: u64,
    mut each: impl FnMut(
        u64,
        Hash,
        &MirrorLeaf,
        &crate::event::CanonicalEvent,
    ) -> Result<(), TamperError>,
) -> Result<(), AuditError> {
    let mut at = from;
    while at < to {
        let end = to.min(at.saturating_add(SHIP_PAGE));
        let page = mirror.leaves(log, at, end).map_err(mirror_err)?;
        for leaf in &page {
            if leaf.index != at {
                return Err(shared_tamper(
                    log,
                    TamperError::at(
                        at,
                        TamperReason::IndexGap {
                            expected: at,
                            found: leaf.index,
                        },
                    ),
                ));
            }
            let ev = decode_canonical(&leaf.event).map_err(|e| {
                shared_tamper(log, TamperError::at(at, TamperReason::Malformed(e.0)))
            })?;
            each(at, merkle::leaf_hash(&leaf.event), leaf, &ev)
                .map_err(|e| shared_tamper(log, e))?;
            at += 1;
        }
        if at < end {
            return Err(shared_tamper(
                log,
                TamperError::general(TamperReason::CheckpointBeyondLog {
                    checkpoint_size: to,
                    log_size: at,
                }),
            ));
        }
    }
    Ok(())
}

/// Extends `f` to the newest checkpoint of `log` in the mirror: the events
/// after what was checked are read and hashed (their task taken from the
/// bytes, not from a column), the rebuilt root compared with every new
/// checkpoint and the newest one's signature checked; the checkpoint `f`
/// was followed to must still be there.
fn follow_one(mirror: &dyn Mirror, log: &str, f: &mut Followed) -> Result<(), AuditError> {
    let checked = f.tree.size();
    let cps = mirror.checkpoints(log, checked).map_err(mirror_err)?;
    let tamper = |e: TamperError| shared_tamper(log, e);
    if checked > 0 {
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
    if newest.size <= checked {
        return Ok(());
    }
    newest.verify(&f.public_key).map_err(|_| {
        tamper(TamperError::general(TamperReason::CheckpointSignature {
            checkpoint_size: newest.size,
        }))
    })?;
    let mut tasks: Vec<(String, u64)> = Vec::new();
    let tree = &mut f.tree;
    let read = read_events(mirror, log, checked, newest.size, |index, hash, _, ev| {
        tree.push(hash);
        tasks.push((ev.task_id.as_str().to_owned(), index));
        Ok(())
    });
    let roots_ok = read.is_ok()
        && cps.iter().all(|cp| {
            f.tree.root(cp.size).map(hex::encode).as_deref() == Some(cp.root_hash.as_str())
        });
    if !roots_ok {
        f.tree.truncate(checked);
        read?;
        return Err(tamper(TamperError::at(
            checked,
            TamperReason::RootMismatch {
                checkpoint_size: newest.size,
            },
        )));
    }
    for (task, index) in tasks {
        f.by_task.entry(task).or_default().push(index);
    }
    Ok(())
}

/// Rebuilds `log` from the mirror's event bytes, a page at a time, and
/// checks every checkpoint and that nothing is stored past the newest.
fn verify_one(
    mirror: &dyn Mirror,
    log: &SharedLog,
) -> Result<(SharedLogReport, Tree), TamperError> {
    let storage = |e: MirrorError| TamperError::general(TamperReason::Storage(e.to_string()));
    let as_tamper = |e: AuditError| match e {
        AuditError::SharedLog { error, .. } => error,
        other => TamperError::general(TamperReason::Storage(other.to_string())),
    };
    let cps = mirror.checkpoints(&log.log_id, 0).map_err(storage)?;
    let size = cps.last().map_or(0, |c| c.size);
    let mut tree = Tree::new();
    read_events(mirror, &log.log_id, 0, size, |index, hash, leaf, ev| {
        if hash != leaf.leaf_hash {
            return Err(TamperError::at(index, TamperReason::LeafHashMismatch));
        }
        if ev.task_id.as_str() != leaf.task_id {
            return Err(TamperError::at(index, TamperReason::TaskColumnMismatch));
        }
        tree.push(hash);
        Ok(())
    })
    .map_err(as_tamper)?;
    // Events stored past the newest checkpoint were never signed.
    let extra = mirror
        .leaves(&log.log_id, size, i64::MAX as u64)
        .map_err(storage)?;
    if let Some(first) = extra.first() {
        return Err(TamperError::at(
            first.index,
            TamperReason::UnsignedTail {
                last_checkpoint_size: size,
                log_size: size + extra.len() as u64,
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
    let report = SharedLogReport {
        log_id: log.log_id.clone(),
        own: false,
        size,
        root: hex::encode(tree.root(size).unwrap_or_else(merkle::empty_root)),
        checkpoints: cps.len() as u64,
        signatures: cps.len() as u64,
    };
    Ok((report, tree))
}
