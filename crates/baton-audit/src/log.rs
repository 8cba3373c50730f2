//! The SQLite-backed log.
//!
//! Tables:
//! - `leaves(idx, task_id, event, leaf_hash, clear_text)`: `event` is the
//!   canonical encoding (the only thing the tree covers), `leaf_hash` its
//!   RFC 9162 leaf hash, `task_id` a lookup copy checked by `verify`,
//!   `clear_text` the wipeable display JSON of the sensitive fields;
//! - `checkpoints(size, root_hash, at, signature)`: one signed checkpoint per
//!   committed batch of appends (at the batch's final size), written in the
//!   same transaction as its events. Logs written before batches were signed
//!   as one hold a checkpoint per event; both read and verify the same way;
//! - `followed_logs(log_id, public_key, size, root)`: with a mirror, what
//!   this broker last checked of each other broker's log, so that a log
//!   removed or cut short in the shared store is caught after a restart
//!   too ([`mirror`]);
//! - `meta(key, value)`: schema version, the checkpoint public key and a
//!   fingerprint of the HMAC key, so a log cannot be reopened with other keys;
//!   `head_file = 1` once the log has a head file.
//!
//! A file-backed log also keeps its newest signed checkpoint in a head file
//! beside the database ([`crate::witness`]): written after every committed
//! transaction and before its receipts are returned, and checked at open
//! and by `verify`, so that deleting the newest events together with their
//! checkpoints is caught.
//!
//! Every complete subtree hash is kept in memory ([`Tree`]), rebuilt at open
//! from the stored events (each leaf hash is recomputed), so receipts and
//! proofs never read the database. So is the list of event indexes of each
//! task (from the `task_id` column): a SQLite index on that column would
//! dirty one more page per append, about a quarter of an append's cost.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use baton_core::TaskId;
use rusqlite::{Connection, OpenFlags, OptionalExtension as _, TransactionBehavior, params};

use crate::error::{AuditError, TamperError, TamperReason};
use crate::event::{AuditEvent, AuditRecord, ClearText, canonical_bytes, decode_canonical};
use crate::keys::AuditKeys;
use crate::merkle::{self, Hash, Tree};
use crate::proof::{Receipt, SignedCheckpoint, checkpoint_message, hex_all, to_hex};
use crate::witness::{HeadFile, HeadState, Kept, check_consistency, head_path, read_head};

pub(crate) mod mirror;
use mirror::{Followed, Mirror};

const SCHEMA_VERSION: i64 = 1;
/// How long an append waits for another connection's write lock.
const APPEND_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS leaves (
    idx        INTEGER PRIMARY KEY,
    task_id    TEXT NOT NULL,
    event      BLOB NOT NULL,
    leaf_hash  BLOB NOT NULL,
    clear_text TEXT
);
CREATE TABLE IF NOT EXISTS checkpoints (
    size      INTEGER PRIMARY KEY,
    root_hash TEXT NOT NULL,
    at        INTEGER NOT NULL,
    signature TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS followed_logs (
    log_id     TEXT PRIMARY KEY,
    public_key TEXT NOT NULL,
    size       INTEGER NOT NULL,
    root       TEXT NOT NULL
);
";

/// How hard each append is pushed to disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    /// WAL with `synchronous=NORMAL`: a committed append survives a crash of
    /// the process; a power loss or OS crash may drop the last few appends
    /// (the log stays consistent: an event and its checkpoint go together).
    Process,
    /// WAL with `synchronous=FULL`: every append is fsynced before its
    /// receipt is returned (survives power loss; slower). The default: an
    /// acknowledged event must not disappear.
    #[default]
    PowerLoss,
}

/// What to do at open when the log does not extend its head file (its
/// newest events were deleted, or it was rewritten, or the file is gone).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HeadPolicy {
    /// Refuse to open (`AuditError::Tampered`).
    #[default]
    Enforce,
    /// Open anyway: the old head file is kept beside as
    /// `<head>.rejected-<unix time>`, a new one names the log as it is, and
    /// [`AuditLog::accepted_loss`] says what was accepted. Only for a loss
    /// an operator has looked at (a database restored from a backup).
    DangerouslyAcceptLoss,
}

/// How to open a file-backed log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LogOptions {
    pub durability: Durability,
    pub head: HeadPolicy,
}

/// What `verify` checked.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VerifyReport {
    /// Number of events.
    pub size: u64,
    /// Lowercase hex root of all events.
    pub root: String,
    /// Number of stored checkpoints whose root was checked.
    pub checkpoints: u64,
    /// Number of checkpoint signatures checked.
    pub signatures: u64,
    /// The newest signed checkpoint (`None` for an empty log): what a
    /// witness keeps.
    pub head: Option<SignedCheckpoint>,
    /// The checkpoints kept outside the log that it was checked to extend.
    pub witnessed: Vec<String>,
}

/// Told about every batch of appends once it is durable (the transaction
/// committed and, for a file-backed log, the head file written), before any
/// of its receipts is returned: how the broker exports batch sizes and
/// durability lag as metrics without this crate depending on its exporter.
/// Called on the appending thread while the log is locked: keep it cheap
/// (an atomic add, a histogram observation).
pub trait AppendObserver: Send + Sync {
    /// One batch of `lags.len()` events became durable under one signed
    /// checkpoint; `lags[i]` is how long event `i` of the batch waited from
    /// its `append` (or `append_batch`) call to that moment.
    fn batch_durable(&self, lags: &[Duration]);
}

/// An event encoded and hashed, outside any lock.
struct Prepared {
    /// When its `append` call started (durability lag).
    called: Instant,
    task_id: String,
    at: u64,
    bytes: Vec<u8>,
    leaf: Hash,
    clear: Option<String>,
}

/// The group-commit queue: events waiting for a leader, results waiting for
/// their threads.
///
/// Each batch has a generation; its appenders wait on the condition
/// variable of its generation's parity ([`AuditLog::queue_cv`]), so a
/// finished batch wakes its own appenders and one of the next batch (to
/// lead it), not every thread waiting: with hundreds of appenders, waking
/// them all per batch cost more CPU than the appends.
#[derive(Default)]
struct Queue {
    next_ticket: u64,
    pending: Vec<(u64, Prepared)>,
    /// The generation of `pending`.
    generation: u64,
    leading: bool,
    done: HashMap<u64, Result<Receipt, AuditError>>,
}

/// Releases leadership if the leader unwinds, failing its batch, so that no
/// appender waits forever.
struct LeaderGuard<'a> {
    log: &'a AuditLog,
    tickets: Vec<u64>,
    armed: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut q = match self.log.queue.lock() {
            Ok(q) => q,
            Err(p) => p.into_inner(),
        };
        q.leading = false;
        for t in &self.tickets {
            q.done.insert(
                *t,
                Err(AuditError::Poisoned(
                    "the thread writing this append panicked".into(),
                )),
            );
        }
        for cv in &self.log.queue_cv {
            cv.notify_all();
        }
    }
}

struct Inner {
    conn: Connection,
    tree: Tree,
    /// Event indexes of each task, in log order.
    by_task: HashMap<String, Vec<u64>>,
    last_at: u64,
    /// Set when the stored state can no longer be trusted to match memory.
    poisoned: Option<String>,
    /// The head file of a file-backed log.
    head: Option<HeadFile>,
    /// How much of this log the mirror is known to hold (`None`: ask it).
    mirrored: Option<u64>,
}

/// The audit log. Appends are serialized by an internal lock; the value is
/// `Send + Sync` and meant to be shared (`Arc<AuditLog>`).
pub struct AuditLog {
    inner: Mutex<Inner>,
    queue: Mutex<Queue>,
    /// Indexed by a batch generation's parity (see [`Queue`]).
    queue_cv: [Condvar; 2],
    transactions: AtomicU64,
    keys: AuditKeys,
    path: Option<PathBuf>,
    accepted_loss: Option<TamperError>,
    observer: Option<Arc<dyn AppendObserver>>,
    /// The shared store every batch is shipped to before its receipts.
    mirror: Option<Arc<dyn Mirror>>,
    /// Other brokers' logs in the mirror, as checked so far.
    followed: Mutex<HashMap<String, Followed>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

impl AuditLog {
    /// Opens (or creates) the log at `path` with [`Durability::PowerLoss`].
    /// Refuses a log written with other keys, and one whose stored events do
    /// not match its last signed checkpoint (`AuditError::Tampered`).
    pub fn open(path: &Path, keys: AuditKeys) -> Result<Self, AuditError> {
        Self::open_with(path, keys, Durability::default())
    }

    /// [`Self::open`] with an explicit durability.
    pub fn open_with(
        path: &Path,
        keys: AuditKeys,
        durability: Durability,
    ) -> Result<Self, AuditError> {
        Self::open_with_options(
            path,
            keys,
            LogOptions {
                durability,
                ..LogOptions::default()
            },
        )
    }

    /// [`Self::open`] with explicit options. The log must extend its head
    /// file ([`crate::witness::head_path`]) unless `options.head` says to
    /// accept a loss.
    pub fn open_with_options(
        path: &Path,
        keys: AuditKeys,
        options: LogOptions,
    ) -> Result<Self, AuditError> {
        let durability = options.durability;
        let conn = Connection::open(path)?;
        conn.busy_timeout(APPEND_BUSY_TIMEOUT)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // Fewer, larger WAL checkpoints (each one fsyncs): ~40 MB of WAL.
        conn.pragma_update(None, "wal_autocheckpoint", 10_000)?;
        conn.pragma_update(
            None,
            "synchronous",
            match durability {
                Durability::Process => "NORMAL",
                Durability::PowerLoss => "FULL",
            },
        )?;
        Self::init(conn, keys, Some((path.to_path_buf(), options)))
    }

    /// A log in memory (tests, `baton dev` without a data dir).
    pub fn in_memory(keys: AuditKeys) -> Result<Self, AuditError> {
        Self::init(Connection::open_in_memory()?, keys, None)
    }

    fn init(
        conn: Connection,
        keys: AuditKeys,
        file: Option<(PathBuf, LogOptions)>,
    ) -> Result<Self, AuditError> {
        {
            refuse_foreign_schema(&conn)?;
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(SCHEMA)?;
            let public = hex::encode(keys.public_key());
            let key_id = keys.hmac_key_id();
            let mut put = tx.prepare("INSERT OR IGNORE INTO meta (key, value) VALUES (?1, ?2)")?;
            put.execute(params!["schema_version", SCHEMA_VERSION.to_string()])?;
            put.execute(params!["checkpoint_public_key", public])?;
            put.execute(params!["hmac_key_id", key_id])?;
            drop(put);
            check_schema(&tx)?;
            if meta(&tx, "checkpoint_public_key")?.as_deref() != Some(public.as_str()) {
                return Err(AuditError::KeyMismatch {
                    which: "checkpoint signing",
                });
            }
            if meta(&tx, "hmac_key_id")?.as_deref() != Some(key_id.as_str()) {
                return Err(AuditError::KeyMismatch { which: "HMAC" });
            }
            tx.commit()?;
        }
        // Read before the scan: a head is never newer than the rows it names.
        let head_state = file
            .as_ref()
            .map(|(p, _)| read_head(&head_path(p), keys.public_key()));
        let scan = {
            let tx = conn.unchecked_transaction()?;
            let quick = scan(&tx, keys.public_key(), None, ScanMode::LastCheckpoint);
            let scan = match quick {
                Ok(s) => s,
                // Name the first bad index precisely before refusing.
                Err(e) => {
                    return Err(scan(
                        &tx,
                        keys.public_key(),
                        None,
                        ScanMode::Full(SignatureCheck::Every),
                    )
                    .err()
                    .unwrap_or(e)
                    .into());
                }
            };
            tx.commit()?;
            scan
        };
        let (head, accepted_loss) = match (&file, head_state) {
            (Some((path, options)), Some(state)) => {
                let (head, loss) = attach_head(&conn, &keys, &scan, path, *options, state)?;
                (Some(head), loss)
            }
            _ => (None, None),
        };
        Ok(Self {
            inner: Mutex::new(Inner {
                conn,
                tree: scan.tree,
                by_task: scan.by_task,
                last_at: scan.last_at,
                poisoned: None,
                head,
                mirrored: None,
            }),
            queue: Mutex::new(Queue::default()),
            queue_cv: [Condvar::new(), Condvar::new()],
            transactions: AtomicU64::new(0),
            keys,
            path: file.map(|(p, _)| p),
            accepted_loss,
            observer: None,
            mirror: None,
            followed: Mutex::new(HashMap::new()),
        })
    }

    /// Reports every durable batch to `observer` (see [`AppendObserver`]).
    #[must_use]
    pub fn with_observer(mut self, observer: Arc<dyn AppendObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Ships every batch to `mirror` before its receipts are returned, and
    /// reads tasks' events from every log it holds (see [`Mirror`]). Call
    /// [`Self::sync_mirror`] next, to ship what an earlier run left behind.
    #[must_use]
    pub fn with_mirror(mut self, mirror: Arc<dyn Mirror>) -> Self {
        self.mirror = Some(mirror);
        self
    }

    /// With [`HeadPolicy::DangerouslyAcceptLoss`]: what was wrong with the
    /// log against its head file when it was opened anyway.
    pub fn accepted_loss(&self) -> Option<&TamperError> {
        self.accepted_loss.as_ref()
    }

    /// The head file of a file-backed log.
    pub fn head_file(&self) -> Option<PathBuf> {
        self.path.as_deref().map(head_path)
    }

    fn lock(&self) -> Result<MutexGuard<'_, Inner>, AuditError> {
        self.inner
            .lock()
            .map_err(|_| AuditError::Poisoned("a thread panicked while appending".into()))
    }

    /// The checkpoint verification key (uncompressed P-256 point).
    pub fn public_key(&self) -> &[u8] {
        self.keys.public_key()
    }

    /// Hex HMAC of `value` under the log's key: how to look up events by a
    /// sensitive value (an initiator) without storing it.
    pub fn hmac(&self, value: &str) -> String {
        self.keys.hmac_hex(value)
    }

    /// The canonical bytes `append` would store for `event`.
    pub fn canonical_bytes(&self, event: &AuditEvent) -> Result<Vec<u8>, AuditError> {
        canonical_bytes(event, &self.keys)
    }

    /// SQLite write transactions attempted since open: fewer than the
    /// appends when concurrent appends were group-committed.
    pub fn transactions(&self) -> u64 {
        self.transactions.load(Ordering::Relaxed)
    }

    /// Whether an append could be committed now: the log is not poisoned
    /// and its database takes a write transaction within `wait` (opened and
    /// rolled back at once, nothing written). For readiness checks: it
    /// holds the append lock for at most `wait`.
    pub fn probe_writable(&self, wait: Duration) -> Result<(), AuditError> {
        let guard = self.lock()?;
        if let Some(why) = &guard.poisoned {
            return Err(AuditError::Poisoned(why.clone()));
        }
        guard.conn.busy_timeout(wait)?;
        let probed = guard.conn.execute_batch("BEGIN IMMEDIATE; ROLLBACK;");
        if probed.is_err() && !guard.conn.is_autocommit() {
            let _ = guard.conn.execute_batch("ROLLBACK;");
        }
        guard.conn.busy_timeout(APPEND_BUSY_TIMEOUT)?;
        probed.map_err(AuditError::from)
    }

    /// Number of events.
    pub fn size(&self) -> Result<u64, AuditError> {
        Ok(self.lock()?.tree.size())
    }

    /// Appends one event and returns its receipt, after the event and a
    /// signed checkpoint covering it are durable (committed, and the head
    /// file of a file-backed log names that checkpoint). Any failure is an
    /// error and nothing of the event is stored: the caller must refuse what
    /// it was recording.
    ///
    /// Concurrent appends are group-committed: while one thread writes a
    /// transaction, the events arriving meanwhile queue up and the next of
    /// their threads writes them all in one transaction with ONE signed
    /// checkpoint at the batch's final size. Each event's receipt carries
    /// that checkpoint and its own inclusion proof against it, so a batch
    /// costs one signature however many events it holds. A failed
    /// transaction fails all of them.
    ///
    /// The checkpoint's `at` is the newest `event.at` of its batch, raised
    /// to the previous checkpoint's if earlier, so checkpoint times never go
    /// backwards.
    pub fn append(&self, event: &AuditEvent) -> Result<Receipt, AuditError> {
        let called = Instant::now();
        let prepared = self.prepare(event, called)?;
        let lost = || AuditError::Poisoned("a thread panicked while appending".into());
        let mut q = self.queue.lock().map_err(|_| lost())?;
        let ticket = q.next_ticket;
        q.next_ticket += 1;
        q.pending.push((ticket, prepared));
        // INVARIANT: while this ticket is not done it is in `pending` of
        // this generation, or in the batch a leader took (`leading`).
        let generation = q.generation;
        let cv = |g: u64| &self.queue_cv[(g % 2) as usize];
        loop {
            if let Some(result) = q.done.remove(&ticket) {
                return result;
            }
            if !q.leading {
                q.leading = true;
                let batch = std::mem::take(&mut q.pending);
                let taken = q.generation;
                q.generation += 1;
                drop(q);
                let tickets: Vec<u64> = batch.iter().map(|(t, _)| *t).collect();
                let mut guard = LeaderGuard {
                    log: self,
                    tickets,
                    armed: true,
                };
                let jobs: Vec<Prepared> = batch.into_iter().map(|(_, p)| p).collect();
                let result = self.commit_batch(&jobs);
                guard.armed = false;
                q = self.queue.lock().map_err(|_| lost())?;
                q.leading = false;
                match result {
                    Ok(receipts) => {
                        for (t, r) in guard.tickets.iter().zip(receipts) {
                            q.done.insert(*t, Ok(r));
                        }
                    }
                    Err(e) => {
                        for t in &guard.tickets {
                            q.done.insert(*t, Err(e.clone()));
                        }
                    }
                }
                let next_waiting = !q.pending.is_empty();
                // This batch's appenders, then one of the next batch to
                // lead it (any of them will do; the others wait on).
                cv(taken).notify_all();
                if next_waiting {
                    cv(taken + 1).notify_one();
                }
                continue;
            }
            q = cv(generation).wait(q).map_err(|_| lost())?;
        }
    }

    /// Appends several events in one transaction, all or nothing, under one
    /// signed checkpoint at the new size; a receipt per event, each proving
    /// its inclusion in that checkpoint.
    pub fn append_batch(&self, events: &[AuditEvent]) -> Result<Vec<Receipt>, AuditError> {
        let called = Instant::now();
        let jobs = events
            .iter()
            .map(|e| self.prepare(e, called))
            .collect::<Result<Vec<_>, _>>()?;
        self.commit_batch(&jobs)
    }

    fn prepare(&self, event: &AuditEvent, called: Instant) -> Result<Prepared, AuditError> {
        // The database stores times as signed 64-bit integers: a later time
        // is refused here, naming it, rather than failing the batch's write.
        if i64::try_from(event.at).is_err() {
            return Err(AuditError::Encode(format!(
                "event time {} is beyond what the log stores (at most {})",
                event.at,
                i64::MAX
            )));
        }
        let bytes = canonical_bytes(event, &self.keys)?;
        let clear = match ClearText::of(event) {
            Some(c) => {
                Some(serde_json::to_string(&c).map_err(|e| AuditError::Encode(e.to_string()))?)
            }
            None => None,
        };
        let leaf = merkle::leaf_hash(&bytes);
        Ok(Prepared {
            called,
            task_id: event.task_id.as_str().to_owned(),
            at: event.at,
            bytes,
            leaf,
            clear,
        })
    }

    /// Signs one checkpoint at the size after `jobs` and writes them with it
    /// in one transaction. On any failure the tree is rolled back to where it
    /// was and nothing is stored.
    fn commit_batch(&self, jobs: &[Prepared]) -> Result<Vec<Receipt>, AuditError> {
        let mut guard = self.lock()?;
        let inner = &mut *guard;
        if let Some(why) = &inner.poisoned {
            return Err(AuditError::Poisoned(why.clone()));
        }
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        let start = inner.tree.size();
        let last_at = jobs.iter().fold(inner.last_at, |a, j| a.max(j.at));
        for job in jobs {
            inner.tree.push(job.leaf);
        }
        let receipts = match self.receipts_for_new(&inner.tree, start, last_at) {
            Ok(r) => r,
            Err(e) => {
                inner.tree.truncate(start);
                return Err(e);
            }
        };
        self.transactions.fetch_add(1, Ordering::Relaxed);
        let Some(checkpoint) = receipts.first().map(|r| &r.checkpoint) else {
            inner.tree.truncate(start);
            return Err(AuditError::Range("a batch without receipts".into()));
        };
        match write_batch(&mut inner.conn, start, jobs, checkpoint) {
            Ok(()) => {
                inner.last_at = last_at;
                for (job, r) in jobs.iter().zip(&receipts) {
                    match inner.by_task.get_mut(&job.task_id) {
                        Some(v) => v.push(r.index),
                        None => {
                            inner.by_task.insert(job.task_id.clone(), vec![r.index]);
                        }
                    }
                }
                // INVARIANT: no receipt leaves before the head file names
                // its checkpoint, so deleting an acknowledged event is
                // caught. The events are committed already: if the head
                // cannot be written they stay, but their requests are
                // refused and so is every later append.
                if let Some(head) = inner.head.as_mut()
                    && let Err(e) = head.write(checkpoint)
                {
                    inner.poisoned = Some(e.to_string());
                    return Err(e);
                }
                // INVARIANT: with a mirror, no receipt leaves before the
                // mirror holds its batch: a broker's lost disk loses no
                // acknowledged event. The events stay committed here and
                // are shipped with the next batch.
                self.mirror_batch(inner, start, jobs, checkpoint)?;
                if let Some(observer) = &self.observer {
                    let durable = Instant::now();
                    let lags: Vec<Duration> = jobs
                        .iter()
                        .map(|j| durable.saturating_duration_since(j.called))
                        .collect();
                    observer.batch_durable(&lags);
                }
                Ok(receipts)
            }
            Err(e) => {
                inner.tree.truncate(start);
                if matches!(e, WriteError::Commit(_) | WriteError::StateChanged(_)) {
                    inner.poisoned = Some(e.to_string());
                }
                Err(e.into())
            }
        }
    }

    /// The receipts of the new leaves `start..tree.size()`, all against one
    /// fresh signed checkpoint of the tree's size.
    fn receipts_for_new(
        &self,
        tree: &Tree,
        start: u64,
        at: u64,
    ) -> Result<Vec<Receipt>, AuditError> {
        let size = tree.size();
        let root = tree
            .root(size)
            .ok_or_else(|| AuditError::Range("root of the new size".into()))?;
        let root_hash = to_hex(&root);
        let signature = B64.encode(self.keys.sign(&checkpoint_message(size, &root_hash, at))?);
        let checkpoint = SignedCheckpoint {
            size,
            root_hash,
            at,
            signature,
        };
        (start..size)
            .map(|index| {
                let proof = tree
                    .inclusion_proof(index, size)
                    .ok_or_else(|| AuditError::Range("inclusion proof of a new leaf".into()))?;
                let leaf = tree
                    .leaf(index)
                    .ok_or_else(|| AuditError::Range("a new leaf".into()))?;
                Ok(Receipt {
                    index,
                    leaf_hash: to_hex(&leaf),
                    checkpoint: checkpoint.clone(),
                    inclusion_proof: hex_all(&proof),
                })
            })
            .collect()
    }

    /// The stored signed checkpoint of `size`, if any.
    pub fn checkpoint(&self, size: u64) -> Result<Option<SignedCheckpoint>, AuditError> {
        let inner = self.lock()?;
        let size = to_i64(size)?;
        Ok(inner
            .conn
            .prepare_cached(
                "SELECT size, root_hash, at, signature FROM checkpoints WHERE size = ?1",
            )?
            .query_row([size], checkpoint_row)
            .optional()?)
    }

    /// The newest signed checkpoint (`None` for an empty log): the one of
    /// the tree this log holds, read back from the file and checked
    /// against it. Newer rows deleted from the file under the running log
    /// (to have an older head witnessed, and the log later cut back to it)
    /// are an error, never an older head.
    pub fn latest_checkpoint(&self) -> Result<Option<SignedCheckpoint>, AuditError> {
        let inner = self.lock()?;
        let row = inner
            .conn
            .prepare_cached(
                "SELECT size, root_hash, at, signature FROM checkpoints ORDER BY size DESC LIMIT 1",
            )?
            .query_row([], checkpoint_row)
            .optional()?;
        let size = inner.tree.size();
        let root = inner.tree.root(size).map(hex::encode);
        match &row {
            None if size == 0 => Ok(None),
            Some(cp) if cp.size == size && Some(&cp.root_hash) == root.as_ref() => Ok(row),
            _ => Err(AuditError::ConcurrentWriter(format!(
                "the newest checkpoint in the file ({}) is not the head of the {size} events this log holds: the file was changed under the running log",
                row.as_ref()
                    .map_or_else(|| "none".to_owned(), |cp| format!("size {}", cp.size))
            ))),
        }
    }

    /// A fresh receipt for event `index` against the newest checkpoint.
    pub fn receipt(&self, index: u64) -> Result<Receipt, AuditError> {
        let checkpoint = self
            .latest_checkpoint()?
            .ok_or_else(|| AuditError::Range("the log is empty".into()))?;
        let inner = self.lock()?;
        let leaf = inner
            .tree
            .leaf(index)
            .ok_or_else(|| AuditError::Range(format!("no event #{index}")))?;
        let proof = inner
            .tree
            .inclusion_proof(index, checkpoint.size)
            .ok_or_else(|| {
                AuditError::Range(format!(
                    "event #{index} is not covered by checkpoint {}",
                    checkpoint.size
                ))
            })?;
        Ok(Receipt {
            index,
            leaf_hash: to_hex(&leaf),
            checkpoint,
            inclusion_proof: hex_all(&proof),
        })
    }

    /// Inclusion path of event `index` in the tree of the first `size` events.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<String>, AuditError> {
        let inner = self.lock()?;
        inner
            .tree
            .inclusion_proof(index, size)
            .map(|p| hex_all(&p))
            .ok_or_else(|| {
                AuditError::Range(format!(
                    "no inclusion proof for #{index} in size {size} (log size {})",
                    inner.tree.size()
                ))
            })
    }

    /// RFC 9162 §2.1.4.1 consistency proof from `old_size` to `new_size`
    /// (lowercase hex hashes); empty when `old_size` is 0 or equals `new_size`.
    pub fn consistency_proof(
        &self,
        old_size: u64,
        new_size: u64,
    ) -> Result<Vec<String>, AuditError> {
        let inner = self.lock()?;
        inner
            .tree
            .consistency_proof(old_size, new_size)
            .map(|p| hex_all(&p))
            .ok_or_else(|| {
                AuditError::Range(format!(
                    "no consistency proof from size {old_size} to {new_size} (log size {})",
                    inner.tree.size()
                ))
            })
    }

    /// The stored canonical bytes of event `index`, checked against the tree.
    pub fn event_bytes(&self, index: u64) -> Result<Vec<u8>, AuditError> {
        let inner = self.lock()?;
        let bytes: Vec<u8> = inner
            .conn
            .prepare_cached("SELECT event FROM leaves WHERE idx = ?1")?
            .query_row([to_i64(index)?], |r| {
                r.get_ref(0)?
                    .as_bytes()
                    .map(<[u8]>::to_vec)
                    .map_err(Into::into)
            })
            .optional()?
            .ok_or_else(|| AuditError::Range(format!("no event #{index}")))?;
        if inner.tree.leaf(index) != Some(merkle::leaf_hash(&bytes)) {
            return Err(TamperError::at(index, TamperReason::LeafHashMismatch).into());
        }
        Ok(bytes)
    }

    /// Every event of `task`, in log order, with the clear text still held.
    /// Each event is checked against the in-memory tree (and its clear text
    /// against its HMAC) before it is returned. With a mirror, also every
    /// other broker's events of the task, each checked against its log's
    /// signed tree, and every record names its log.
    pub fn events_for_task(&self, task: &TaskId) -> Result<Vec<AuditRecord>, AuditError> {
        match self.mirror_for_reads() {
            Some(m) => self.shared_events_for_task(m, task),
            None => self.local_events_for_task(task),
        }
    }

    fn local_events_for_task(&self, task: &TaskId) -> Result<Vec<AuditRecord>, AuditError> {
        let inner = self.lock()?;
        let Some(indexes) = inner.by_task.get(task.as_str()) else {
            return Ok(Vec::new());
        };
        let mut stmt = inner
            .conn
            .prepare_cached("SELECT event, clear_text FROM leaves WHERE idx = ?1")?;
        let mut out = Vec::with_capacity(indexes.len());
        for &idx in indexes {
            let mut rows = stmt.query([to_i64(idx)?])?;
            let Some(row) = rows.next()? else {
                return Err(TamperError::at(
                    idx,
                    TamperReason::Malformed("the event row has disappeared".into()),
                )
                .into());
            };
            let bytes = row.get_ref(0)?.as_bytes().map_err(rusqlite::Error::from)?;
            let clear: Option<String> = row.get(1)?;
            if inner.tree.leaf(idx) != Some(merkle::leaf_hash(bytes)) {
                return Err(TamperError::at(idx, TamperReason::LeafHashMismatch).into());
            }
            let ev = decode_canonical(bytes).map_err(|e| AuditError::Decode {
                index: idx,
                reason: e.0,
            })?;
            if &ev.task_id != task {
                return Err(TamperError::at(idx, TamperReason::TaskColumnMismatch).into());
            }
            let clear = check_clear_text(idx, &ev, clear.as_deref(), Some(&self.keys))?;
            out.push(AuditRecord::from_parts(idx, ev, clear));
        }
        Ok(out)
    }

    /// Wipes the clear-text display copies of sensitive values, for one task
    /// or (with `None`) for the whole log. The tree is unaffected: it covers
    /// only the HMACs. Returns how many events were wiped.
    pub fn redact_clear_text(&self, task: Option<&TaskId>) -> Result<u64, AuditError> {
        let local = self.redact_local(task)?;
        // The mirror's copies of every broker's events: what traces show.
        Ok(self.redact_mirror(task)?.unwrap_or(local))
    }

    fn redact_local(&self, task: Option<&TaskId>) -> Result<u64, AuditError> {
        let inner = self.lock()?;
        let Some(t) = task else {
            let n = inner.conn.execute(
                "UPDATE leaves SET clear_text = NULL WHERE clear_text IS NOT NULL",
                [],
            )?;
            return Ok(n as u64);
        };
        let Some(indexes) = inner.by_task.get(t.as_str()) else {
            return Ok(0);
        };
        let tx = inner.conn.unchecked_transaction()?;
        let mut n = 0;
        {
            let mut stmt = tx.prepare_cached(
                "UPDATE leaves SET clear_text = NULL WHERE idx = ?1 AND clear_text IS NOT NULL",
            )?;
            for &idx in indexes {
                n += stmt.execute([to_i64(idx)?])? as u64;
            }
        }
        tx.commit()?;
        Ok(n)
    }

    /// Recomputes every leaf hash from the stored event bytes, checks the
    /// indexes are contiguous from 0, and checks the rebuilt tree against
    /// every stored checkpoint (root and signature), that every event is
    /// covered by a checkpoint (the newest is at the log's size: an event
    /// whose batch checkpoint is missing is an `UnsignedTail`), and each
    /// clear-text copy against its HMAC. Reads a consistent snapshot; for a file-backed log
    /// it uses its own connection, so appends are not blocked.
    pub fn verify(&self) -> Result<VerifyReport, TamperError> {
        self.verify_with(&VerifyOptions::default())
    }

    /// [`Self::verify`] with options: how many signatures to check, and
    /// checkpoints kept outside the log that it must extend. A file-backed
    /// log must also extend its head file.
    pub fn verify_with(&self, opts: &VerifyOptions) -> Result<VerifyReport, TamperError> {
        let pk = self.keys.public_key();
        match &self.path {
            Some(p) => {
                // The head first: it never names more than the snapshot holds.
                let head = HeadCheck::read(p, pk);
                let conn = open_read_only(p)?;
                verify_conn(&conn, pk, Some(&self.keys), opts, Some(head))
            }
            None => {
                let inner = self.inner.lock().map_err(|_| {
                    TamperError::general(TamperReason::Storage("lock poisoned".into()))
                })?;
                verify_conn(&inner.conn, pk, Some(&self.keys), opts, None)
            }
        }
    }

    /// [`Self::verify`] for a log file, with only the checkpoint public key
    /// (no HMAC key: clear-text copies are not checked). Opens read-only.
    pub fn verify_file(path: &Path, public_key: &[u8]) -> Result<VerifyReport, TamperError> {
        Self::verify_file_with(path, public_key, &VerifyOptions::default())
    }

    /// [`Self::verify_file`] with options (see [`VerifyOptions`]). The log
    /// must also extend its head file, if it has one (and must have one if
    /// it says so).
    pub fn verify_file_with(
        path: &Path,
        public_key: &[u8],
        opts: &VerifyOptions,
    ) -> Result<VerifyReport, TamperError> {
        let head = HeadCheck::read(path, public_key);
        let conn = open_read_only(path)?;
        verify_conn(&conn, public_key, None, opts, Some(head))
    }
}

/// The head file of a log as `verify` found it.
struct HeadCheck {
    path: PathBuf,
    state: Result<HeadState, TamperError>,
}

impl HeadCheck {
    fn read(db: &Path, public_key: &[u8]) -> Self {
        let path = head_path(db);
        let state = read_head(&path, public_key);
        Self { path, state }
    }

    fn name(path: &Path) -> String {
        format!("the head file {}", path.display())
    }
}

/// Checks that the log in `tree` extends `kept`: its signature, the size,
/// and the consistency proof from its size to the tree's.
fn check_kept(tree: &Tree, kept: &Kept, public_key: &[u8]) -> Result<(), TamperError> {
    let kept_root = kept.checkpoint.verify(public_key).map_err(|e| {
        TamperError::general(TamperReason::WitnessInvalid {
            witness: kept.source.clone(),
            detail: format!("its checkpoint of size {}: {e}", kept.checkpoint.size),
        })
    })?;
    let size = tree.size();
    let root = tree.root(size).unwrap_or_else(merkle::empty_root);
    let proof = tree
        .consistency_proof(kept.checkpoint.size, size)
        .unwrap_or_default();
    check_consistency(kept, &kept_root, size, &root, &proof)
}

/// At open: checks the log against its head file, then (re)writes the head
/// file with the log's newest checkpoint.
fn attach_head(
    conn: &Connection,
    keys: &AuditKeys,
    scan: &Scan,
    db: &Path,
    options: LogOptions,
    state: Result<HeadState, TamperError>,
) -> Result<(HeadFile, Option<TamperError>), AuditError> {
    let path = head_path(db);
    let has_head = meta(conn, "head_file")?.as_deref() == Some("1");
    let mut newest_slot = None;
    let problem = match state {
        Err(e) => Some(e),
        Ok(HeadState::Missing) if has_head => {
            Some(TamperError::general(TamperReason::HeadFileMissing {
                path: path.display().to_string(),
            }))
        }
        Ok(HeadState::Missing | HeadState::Present { newest: None }) => None,
        Ok(HeadState::Present {
            newest: Some((slot, cp)),
        }) => {
            newest_slot = Some(slot);
            check_kept(
                &scan.tree,
                &Kept::new(HeadCheck::name(&path), cp),
                keys.public_key(),
            )
            .err()
        }
    };
    if let Some(problem) = &problem {
        if options.head == HeadPolicy::Enforce {
            return Err(problem.clone().into());
        }
        if path.exists() {
            let secs = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            let mut name = path.file_name().map(|n| n.to_owned()).unwrap_or_default();
            name.push(format!(".rejected-{secs}"));
            std::fs::rename(&path, path.with_file_name(name)).map_err(|e| {
                AuditError::HeadFile {
                    path: path.clone(),
                    reason: format!("cannot set the rejected head file aside: {e}"),
                }
            })?;
        }
        newest_slot = None;
    }
    let mut head = HeadFile::open(
        &path,
        keys.public_key(),
        newest_slot,
        options.durability == Durability::PowerLoss,
    )?;
    if let Some(cp) = &scan.last_cp {
        head.write(cp)?;
    }
    // INVARIANT: the flag is set only once the file exists, so a crash in
    // between never makes a good log look like it lost its head file.
    if !has_head {
        conn.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('head_file', '1')",
            [],
        )?;
    }
    Ok((head, problem))
}

fn open_read_only(path: &Path) -> Result<Connection, TamperError> {
    let storage = |e: rusqlite::Error| TamperError::general(TamperReason::Storage(e.to_string()));
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(storage)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(storage)?;
    refuse_foreign_schema(&conn)?;
    Ok(conn)
}

/// Refuses a database file holding what no log writes: a view or a
/// trigger, or a log table that is not a table. A view named `leaves`
/// (a recursive one never ends) would otherwise be read as the log, and
/// `CREATE TABLE IF NOT EXISTS` leaves it in place. Schema code also runs
/// untrusted from here on (`trusted_schema = OFF`).
fn refuse_foreign_schema(conn: &Connection) -> Result<(), TamperError> {
    let storage = |e: rusqlite::Error| TamperError::general(TamperReason::Storage(e.to_string()));
    conn.pragma_update(None, "trusted_schema", false)
        .map_err(storage)?;
    let mut stmt = conn
        .prepare(
            "SELECT type, name FROM sqlite_schema
             WHERE type IN ('view', 'trigger')
                OR (name IN ('meta', 'leaves', 'checkpoints', 'followed_logs') AND type <> 'table')
             LIMIT 1",
        )
        .map_err(storage)?;
    let found: Option<(String, String)> = stmt
        .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()
        .map_err(storage)?;
    match found {
        Some((kind, name)) => Err(TamperError::general(TamperReason::Storage(format!(
            "the file holds a {kind} named {name:?}, which no audit log writes: it is not a log to read"
        )))),
        None => Ok(()),
    }
}

fn verify_conn(
    conn: &Connection,
    public_key: &[u8],
    keys: Option<&AuditKeys>,
    opts: &VerifyOptions,
    head: Option<HeadCheck>,
) -> Result<VerifyReport, TamperError> {
    let sigs = opts.signatures;
    let storage = |e: rusqlite::Error| TamperError::general(TamperReason::Storage(e.to_string()));
    let tx = conn.unchecked_transaction().map_err(storage)?;
    let found = tx
        .query_row(
            "SELECT value FROM meta WHERE key = 'schema_version'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional();
    let version = match &found {
        Ok(Some(v)) => v.parse::<i64>().ok(),
        _ => None,
    };
    if version != Some(SCHEMA_VERSION) {
        let detail = match found {
            Ok(Some(v)) => format!("schema version {v}"),
            Ok(None) => "no schema version".to_owned(),
            Err(e) => e.to_string(),
        };
        return Err(TamperError::general(TamperReason::Storage(format!(
            "not an audit log of schema version {SCHEMA_VERSION} ({detail})"
        ))));
    }
    let s = scan(&tx, public_key, keys, ScanMode::Full(sigs))?;
    let size = s.tree.size();
    let mut kept: Vec<Kept> = opts.kept.clone();
    if let Some(HeadCheck { path, state }) = head {
        match state? {
            HeadState::Missing => {
                if meta(&tx, "head_file").map_err(storage)?.as_deref() == Some("1") {
                    return Err(TamperError::general(TamperReason::HeadFileMissing {
                        path: path.display().to_string(),
                    }));
                }
            }
            HeadState::Present { newest: None } => {}
            HeadState::Present {
                newest: Some((_, cp)),
            } => kept.push(Kept::new(HeadCheck::name(&path), cp)),
        }
    }
    for k in &kept {
        check_kept(&s.tree, k, public_key)?;
    }
    let root = s.tree.root(size).map(hex::encode).unwrap_or_default();
    Ok(VerifyReport {
        size,
        root,
        checkpoints: s.checkpoints,
        signatures: match sigs {
            SignatureCheck::Every => s.checkpoints,
            SignatureCheck::Newest => s.checkpoints.min(1),
        },
        head: s.last_cp,
        witnessed: kept.into_iter().map(|k| k.source).collect(),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanMode {
    /// Leaves, then only the newest checkpoint (open).
    LastCheckpoint,
    /// Leaves and every checkpoint's root; signatures as asked (verify).
    Full(SignatureCheck),
}

/// What `verify_with` and `verify_file_with` check beyond the log itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VerifyOptions {
    pub signatures: SignatureCheck,
    /// Checkpoints held outside the log (witness files, receipts). The log
    /// must extend each: this is what catches the newest events being
    /// deleted together with their checkpoints, and the log rebuilt and
    /// re-signed. (A file-backed log's own head file is always checked.)
    pub kept: Vec<Kept>,
}

/// How many checkpoint signatures `verify` checks. Either way every stored
/// checkpoint's root is compared with the tree rebuilt from the events.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SignatureCheck {
    /// Every checkpoint's signature: also catches an old checkpoint whose
    /// time or signature alone was altered. Costs one ECDSA verification
    /// per checkpoint (spread over the cores): one per committed batch, so
    /// one per event only where appends never overlapped (and in logs
    /// written before a batch was signed once).
    #[default]
    Every,
    /// Only the newest checkpoint's signature. It authenticates the root of
    /// the whole log, so any change to any event is still caught, and so is
    /// an older checkpoint whose root was changed; several times faster.
    Newest,
}

/// A checkpoint row: its size column and the row, or why it is unreadable.
type CpRow = (i64, Result<SignedCheckpoint, String>);

struct Scan {
    tree: Tree,
    /// Filled only when opening (`LastCheckpoint` mode).
    by_task: HashMap<String, Vec<u64>>,
    last_at: u64,
    checkpoints: u64,
    /// The newest checkpoint, checked against the tree and signature.
    last_cp: Option<SignedCheckpoint>,
}

/// A checkpoint signature to check off the scanning thread.
struct SigJob {
    size: u64,
    msg: Vec<u8>,
    sig: Vec<u8>,
}

/// Where a fault sits in scan order: leaf `i` is checked at `(i, 0)`, the
/// checkpoint of size `s` at `(s - 1, 1)`, end-of-log checks at the end.
fn fault_position(e: &TamperError) -> (u64, u8) {
    match &e.reason {
        TamperReason::RootMismatch { checkpoint_size }
        | TamperReason::CheckpointSignature { checkpoint_size }
        | TamperReason::CheckpointMalformed {
            checkpoint_size, ..
        } => (checkpoint_size.saturating_sub(1), 1),
        TamperReason::CheckpointBeyondLog { .. }
        | TamperReason::UnsignedTail { .. }
        | TamperReason::NoCheckpoint => (u64::MAX, 2),
        TamperReason::Storage(_) => (0, 0),
        _ => (e.first_bad_index.unwrap_or(0), 0),
    }
}

/// Checks the leaves and checkpoints (see [`scan_with`]); in `Full` mode the
/// checkpoint signatures are verified by worker threads while the scan goes
/// on, and the earliest fault in scan order is reported.
fn scan(
    conn: &Connection,
    public_key: &[u8],
    keys: Option<&AuditKeys>,
    mode: ScanMode,
) -> Result<Scan, TamperError> {
    if mode != ScanMode::Full(SignatureCheck::Every) {
        return scan_with(conn, public_key, keys, mode, None);
    }
    let point = crate::proof::public_point(public_key).map_err(|e| {
        TamperError::general(TamperReason::Storage(format!("verification key: {e}")))
    })?;
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get().clamp(1, 4));
    std::thread::scope(|s| {
        let (tx, rx) = mpsc::sync_channel::<Vec<SigJob>>(workers * 4);
        let rx = Arc::new(Mutex::new(rx));
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                let rx = Arc::clone(&rx);
                s.spawn(move || {
                    let mut first_bad: Option<u64> = None;
                    loop {
                        let batch = match rx.lock() {
                            Ok(r) => r.recv(),
                            Err(_) => break,
                        };
                        let Ok(batch) = batch else { break };
                        for job in batch {
                            if crate::proof::verify_signature(point, &job.msg, &job.sig).is_err() {
                                first_bad = Some(first_bad.map_or(job.size, |b| b.min(job.size)));
                            }
                        }
                    }
                    first_bad
                })
            })
            .collect();
        let mut batch = Vec::new();
        let result = scan_with(conn, public_key, keys, mode, Some((&tx, &mut batch)));
        // Signatures queued before an early return are still checked, so
        // the earliest fault wins.
        if !batch.is_empty() {
            let _ = tx.send(batch);
        }
        drop(tx);
        let mut bad_sig: Option<u64> = None;
        for h in handles {
            match h.join() {
                Ok(Some(size)) => bad_sig = Some(bad_sig.map_or(size, |b| b.min(size))),
                Ok(None) => {}
                Err(_) => {
                    return Err(TamperError::general(TamperReason::Storage(
                        "a signature-checking thread failed".into(),
                    )));
                }
            }
        }
        let Some(size) = bad_sig else {
            return result;
        };
        let sig_fault = TamperError::general(TamperReason::CheckpointSignature {
            checkpoint_size: size,
        });
        match result {
            Err(e) if fault_position(&e) <= fault_position(&sig_fault) => Err(e),
            _ => Err(sig_fault),
        }
    })
}

/// One pass over the leaves in index order, checking checkpoints as the
/// tree reaches their sizes, so the first fault found is the earliest. With
/// `sigs`, signatures of checkpoints whose root matches are sent there
/// instead of being checked here.
fn scan_with(
    conn: &Connection,
    public_key: &[u8],
    keys: Option<&AuditKeys>,
    mode: ScanMode,
    mut sigs: Option<(&mpsc::SyncSender<Vec<SigJob>>, &mut Vec<SigJob>)>,
) -> Result<Scan, TamperError> {
    const SIG_BATCH: usize = 512;
    let storage = |e: rusqlite::Error| TamperError::general(TamperReason::Storage(e.to_string()));
    let point = crate::proof::public_point(public_key).map_err(|e| {
        TamperError::general(TamperReason::Storage(format!("verification key: {e}")))
    })?;
    let mut leaves = conn
        .prepare("SELECT idx, task_id, event, leaf_hash, clear_text FROM leaves ORDER BY idx")
        .map_err(storage)?;
    let mut cps = conn
        .prepare(match mode {
            ScanMode::Full(_) => {
                "SELECT size, root_hash, at, signature FROM checkpoints ORDER BY size"
            }
            ScanMode::LastCheckpoint => {
                "SELECT size, root_hash, at, signature FROM checkpoints ORDER BY size DESC LIMIT 1"
            }
        })
        .map_err(storage)?;
    let mut cp_rows = cps.query([]).map_err(storage)?;
    let mut next_cp = || -> Result<Option<CpRow>, TamperError> {
        let Some(row) = cp_rows.next().map_err(storage)? else {
            return Ok(None);
        };
        let size: i64 = row.get(0).map_err(storage)?;
        Ok(Some((size, checkpoint_row(row).map_err(|e| e.to_string()))))
    };

    let mut tree = Tree::new();
    let mut pending = next_cp()?;
    let mut last_good: u64 = 0;
    let mut last_cp: Option<SignedCheckpoint> = None;
    let mut checked = 0u64;
    let lost_workers = || {
        TamperError::general(TamperReason::Storage(
            "the signature-checking threads stopped".into(),
        ))
    };

    let mut check_cp = |tree: &Tree,
                        size: i64,
                        cp: Result<SignedCheckpoint, String>,
                        last_good: &mut u64,
                        sigs: &mut Option<(&mpsc::SyncSender<Vec<SigJob>>, &mut Vec<SigJob>)>|
     -> Result<SignedCheckpoint, TamperError> {
        let size_u = u64::try_from(size).unwrap_or(0);
        let malformed = |detail: String| {
            TamperError::general(TamperReason::CheckpointMalformed {
                checkpoint_size: size_u,
                detail,
            })
        };
        let cp = cp.map_err(malformed)?;
        if size < 1 {
            return Err(malformed("size below 1".into()));
        }
        let (root, msg, sig) = cp.parts().map_err(|e| malformed(e.to_string()))?;
        let bad_sig = TamperError::general(TamperReason::CheckpointSignature {
            checkpoint_size: cp.size,
        });
        if tree.root(cp.size) != Some(root) {
            // A root that differs from the events: a forged checkpoint if its
            // signature fails, else altered events.
            if crate::proof::verify_signature(point, &msg, &sig).is_err() {
                return Err(bad_sig);
            }
            return Err(TamperError::at(
                *last_good,
                TamperReason::RootMismatch {
                    checkpoint_size: cp.size,
                },
            ));
        }
        match sigs {
            _ if mode == ScanMode::Full(SignatureCheck::Newest) => {
                // Checked once, for the newest checkpoint, after the scan.
            }
            Some((tx, batch)) => {
                batch.push(SigJob {
                    size: cp.size,
                    msg,
                    sig,
                });
                if batch.len() >= SIG_BATCH {
                    tx.send(std::mem::take(*batch))
                        .map_err(|_| lost_workers())?;
                }
            }
            None => {
                if crate::proof::verify_signature(point, &msg, &sig).is_err() {
                    return Err(bad_sig);
                }
            }
        }
        *last_good = cp.size;
        checked += 1;
        Ok(cp)
    };

    let mut by_task: HashMap<String, Vec<u64>> = HashMap::new();
    let mut rows = leaves.query([]).map_err(storage)?;
    let mut expected: u64 = 0;
    while let Some(row) = rows.next().map_err(storage)? {
        let idx: i64 = row.get(0).map_err(storage)?;
        if u64::try_from(idx).ok() != Some(expected) {
            return Err(TamperError::at(
                expected,
                TamperReason::IndexGap {
                    expected,
                    found: u64::try_from(idx).unwrap_or(u64::MAX),
                },
            ));
        }
        let malformed = |d: String| TamperError::at(expected, TamperReason::Malformed(d));
        let task: String = row.get(1).map_err(|e| malformed(e.to_string()))?;
        let bytes = row
            .get_ref(2)
            .and_then(|v| v.as_bytes().map_err(Into::into))
            .map_err(|e| malformed(e.to_string()))?;
        let stored = row
            .get_ref(3)
            .and_then(|v| v.as_bytes().map_err(Into::into))
            .map_err(|e| malformed(e.to_string()))?;
        let h = merkle::leaf_hash(bytes);
        if stored != h.as_slice() {
            return Err(TamperError::at(expected, TamperReason::LeafHashMismatch));
        }
        let ev = decode_canonical(bytes).map_err(|e| malformed(e.0))?;
        if ev.task_id.as_str() != task {
            return Err(TamperError::at(expected, TamperReason::TaskColumnMismatch));
        }
        if let Some(keys) = keys {
            let clear: Option<String> = row.get(4).map_err(|e| malformed(e.to_string()))?;
            check_clear_text(expected, &ev, clear.as_deref(), Some(keys)).map_err(|e| match e {
                AuditError::Tampered(t) => t,
                other => malformed(other.to_string()),
            })?;
        }
        tree.push(h);
        if mode == ScanMode::LastCheckpoint {
            by_task.entry(task).or_default().push(expected);
        }
        expected += 1;
        if mode != ScanMode::LastCheckpoint {
            while let Some((size, _)) = &pending {
                if u64::try_from(*size).unwrap_or(0) > tree.size() {
                    break;
                }
                if let Some((size, cp)) = pending.take() {
                    last_cp = Some(check_cp(&tree, size, cp, &mut last_good, &mut sigs)?);
                }
                pending = next_cp()?;
            }
        }
    }
    let log_size = tree.size();
    // Checkpoints not yet reached: in Full mode those beyond the log; in
    // LastCheckpoint mode the single newest one.
    while let Some((size, cp)) = pending.take() {
        let cp_size = u64::try_from(size).unwrap_or(0);
        if cp_size > log_size {
            return Err(TamperError::at(
                log_size,
                TamperReason::CheckpointBeyondLog {
                    checkpoint_size: cp_size,
                    log_size,
                },
            ));
        }
        last_cp = Some(check_cp(&tree, size, cp, &mut last_good, &mut sigs)?);
        pending = next_cp()?;
    }
    if mode == ScanMode::Full(SignatureCheck::Newest)
        && let Some(cp) = &last_cp
    {
        let bad = || {
            TamperError::general(TamperReason::CheckpointSignature {
                checkpoint_size: cp.size,
            })
        };
        let (_, msg, sig) = cp.parts().map_err(|_| bad())?;
        crate::proof::verify_signature(point, &msg, &sig).map_err(|_| bad())?;
    }
    match &last_cp {
        None if log_size > 0 => {
            return Err(TamperError::at(0, TamperReason::NoCheckpoint));
        }
        Some(cp) if cp.size < log_size => {
            return Err(TamperError::at(
                cp.size,
                TamperReason::UnsignedTail {
                    last_checkpoint_size: cp.size,
                    log_size,
                },
            ));
        }
        _ => {}
    }
    Ok(Scan {
        tree,
        by_task,
        last_at: last_cp.as_ref().map_or(0, |c| c.at),
        checkpoints: checked,
        last_cp,
    })
}

fn check_clear_text(
    index: u64,
    ev: &crate::event::CanonicalEvent,
    clear: Option<&str>,
    keys: Option<&AuditKeys>,
) -> Result<ClearText, AuditError> {
    let Some(text) = clear else {
        return Ok(ClearText::default());
    };
    let clear: ClearText = serde_json::from_str(text).map_err(|e| AuditError::Decode {
        index,
        reason: format!("clear-text column: {e}"),
    })?;
    if let Some(keys) = keys {
        let pairs = [
            ("initiator", &clear.initiator, &ev.initiator_hmac),
            (
                "justification",
                &clear.justification,
                &ev.justification_hmac,
            ),
        ];
        for (field, value, mac) in pairs {
            let ok = match (value, mac) {
                (None, _) => true,
                (Some(v), Some(m)) => &keys.hmac_hex(v) == m,
                (Some(_), None) => false,
            };
            if !ok {
                return Err(
                    TamperError::at(index, TamperReason::ClearTextMismatch { field }).into(),
                );
            }
        }
    }
    Ok(clear)
}

#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error(transparent)]
    Sqlite(#[from] rusqlite::Error),
    #[error("commit failed: {0}")]
    Commit(rusqlite::Error),
    #[error("{0}")]
    StateChanged(String),
}

impl From<WriteError> for AuditError {
    fn from(e: WriteError) -> Self {
        match e {
            WriteError::Sqlite(e) | WriteError::Commit(e) => AuditError::from(e),
            WriteError::StateChanged(s) => AuditError::ConcurrentWriter(s),
        }
    }
}

/// Writes `jobs` from index `start` and the one `checkpoint` that covers
/// them, in one transaction.
fn write_batch(
    conn: &mut Connection,
    start: u64,
    jobs: &[Prepared],
    checkpoint: &SignedCheckpoint,
) -> Result<(), WriteError> {
    let overflow = || WriteError::StateChanged("index overflow".into());
    let start = i64::try_from(start).map_err(|_| overflow())?;
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    {
        // INVARIANT: the database ends exactly where memory does; otherwise
        // another writer (or an editor) changed it since we opened it.
        let last_idx: Option<i64> = tx
            .prepare_cached("SELECT max(idx) FROM leaves")?
            .query_row([], |r| r.get(0))?;
        let last_cp: Option<i64> = tx
            .prepare_cached("SELECT max(size) FROM checkpoints")?
            .query_row([], |r| r.get(0))?;
        let want_idx = if start == 0 { None } else { Some(start - 1) };
        let want_cp = if start == 0 { None } else { Some(start) };
        if last_idx != want_idx || last_cp != want_cp {
            return Err(WriteError::StateChanged(format!(
                "expected {start} events and checkpoints on disk, found last index {last_idx:?} and last checkpoint {last_cp:?}"
            )));
        }
        let mut leaves = tx.prepare_cached(
            "INSERT INTO leaves (idx, task_id, event, leaf_hash, clear_text) VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        let mut cps = tx.prepare_cached(
            "INSERT INTO checkpoints (size, root_hash, at, signature) VALUES (?1, ?2, ?3, ?4)",
        )?;
        let mut idx = start;
        for job in jobs {
            leaves.execute(params![
                idx,
                job.task_id,
                job.bytes,
                &job.leaf[..],
                job.clear
            ])?;
            idx = idx.checked_add(1).ok_or_else(overflow)?;
        }
        // INVARIANT: the checkpoint is at the size this batch ends at.
        if u64::try_from(idx).ok() != Some(checkpoint.size) {
            return Err(WriteError::StateChanged(format!(
                "the batch ends at {idx} events but its checkpoint is of size {}",
                checkpoint.size
            )));
        }
        cps.execute(params![
            idx,
            checkpoint.root_hash,
            i64::try_from(checkpoint.at).map_err(|_| overflow())?,
            checkpoint.signature
        ])?;
    }
    tx.commit().map_err(WriteError::Commit)
}

fn checkpoint_row(row: &rusqlite::Row<'_>) -> Result<SignedCheckpoint, rusqlite::Error> {
    let size: i64 = row.get(0)?;
    let at: i64 = row.get(2)?;
    let conv = |v: i64, col: usize| {
        u64::try_from(v).map_err(|_| rusqlite::Error::IntegralValueOutOfRange(col, v))
    };
    Ok(SignedCheckpoint {
        size: conv(size, 0)?,
        root_hash: row.get(1)?,
        at: conv(at, 2)?,
        signature: row.get(3)?,
    })
}

fn meta(conn: &Connection, key: &str) -> Result<Option<String>, rusqlite::Error> {
    conn.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()
}

fn check_schema(conn: &Connection) -> Result<(), AuditError> {
    let found = meta(conn, "schema_version")?
        .and_then(|v| v.parse::<i64>().ok())
        .unwrap_or(-1);
    if found != SCHEMA_VERSION {
        return Err(AuditError::Schema {
            found,
            expected: SCHEMA_VERSION,
        });
    }
    Ok(())
}

fn to_i64(v: u64) -> Result<i64, AuditError> {
    i64::try_from(v).map_err(|_| AuditError::Range(format!("{v} is out of range")))
}

#[allow(dead_code)]
fn _assert_send_sync() {
    fn is<T: Send + Sync>() {}
    is::<AuditLog>();
}

#[cfg(test)]
impl AuditLog {
    /// Holds the lock a batch is written under until the value is dropped:
    /// appends meanwhile queue up behind a waiting leader.
    pub(crate) fn hold_writes(&self) -> impl Sized + '_ {
        self.inner.lock()
    }

    /// Whether a leader is writing (or waiting to write) a batch, and how
    /// many appends wait for the next one.
    pub(crate) fn queue_state(&self) -> (bool, usize) {
        match self.queue.lock() {
            Ok(q) => (q.leading, q.pending.len()),
            Err(p) => {
                let q = p.into_inner();
                (q.leading, q.pending.len())
            }
        }
    }
}
