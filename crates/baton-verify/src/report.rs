//! Tool-call audit reports: spooled durably on the tool server, delivered
//! to the broker over mTLS, never lost while the broker is unreachable.
//!
//! Wire format: `POST {broker_url}/v1/audit/tool-calls` with the JSON body
//! [`ReportBatch`] `{"reports": [ToolCallReport, ...]}` (one to
//! [`MAX_BATCH`] records, about [`MAX_BATCH_BYTES`]). A 2xx means every
//! record of the batch is stored but those its receipts say `refused`,
//! which are kept in [`REFUSED_FILE`]. The broker must treat `report_id` as an idempotency key: a batch
//! can be sent again after a timeout that hid a success, and the spool then
//! resends records the broker already holds.
//!
//! Durability: records go to one writer thread (never a Tokio worker),
//! which appends every record queued since its last write as JSON lines to
//! the current segment `<spool_dir>/tool-calls.<n>.jsonl` and fdatasyncs
//! once for all of them (group commit). [`Reporter::submit`] returns once
//! the record is durable; [`Reporter::enqueue`] returns at once with a
//! [`Durable`] ticket to wait on (blocking or async), so a caller that must
//! not answer before its record is kept waits, and one that need not
//! (a read-tier call's record) does not. A segment holds at most
//! [`SEGMENT_RECORDS`] records; it is deleted once every record in it was
//! delivered, so delivery never rewrites a file and never holds up the
//! writer. On open, records left by an earlier process (in segments or in
//! the single `tool-calls.jsonl` of earlier versions) are loaded (a torn
//! last line from a crash mid-append is dropped with a warning; it was
//! never acknowledged), deduplicated by `report_id`, and written into one
//! fresh segment before the old files are removed.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use baton_core::SpiffeId;
use baton_core::api::ToolCallReport;
use baton_tls::{BundleStore, ClientIdentity, PeerPolicy};
use serde::{Deserialize, Serialize};

use crate::error::{ReportError, SendError};

/// Path of the broker route that receives reports.
pub const TOOL_CALLS_PATH: &str = "/v1/audit/tool-calls";
/// Most records sent in one request.
pub const MAX_BATCH: usize = 256;
/// First retry delay after a failed delivery; doubles up to [`MAX_BACKOFF`].
pub const MIN_BACKOFF: Duration = Duration::from_millis(200);
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Most records in one spool segment before the writer starts the next.
pub const SEGMENT_RECORDS: usize = 4096;
/// The one spool file of earlier versions, read (and removed) on open.
const LEGACY_FILE: &str = "tool-calls.jsonl";
const SEGMENT_PREFIX: &str = "tool-calls.";
const SEGMENT_SUFFIX: &str = ".jsonl";
/// Most records written (and fsynced) together.
const MAX_GROUP: usize = 1024;
/// Records nobody waits for that a failed write left unwritten, retried
/// with the next write; beyond this many the oldest are dropped (and
/// logged), so a broken disk cannot grow memory without bound.
const MAX_CARRY: usize = 65_536;
/// How soon the writer retries such records when nothing new arrives.
const CARRY_RETRY: Duration = Duration::from_secs(1);
/// After this long without a record, a segment whose records were all
/// delivered is removed (not sooner: under load that would make a segment
/// per group commit).
const IDLE_ROLL: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long delivery waits, once woken by a first record, for more to
/// join its batch.
const DELIVERY_LINGER: Duration = Duration::from_millis(20);
/// How long the writer, woken by a record nobody waits for yet, waits for
/// more before writing them with one fdatasync: one wake-up and one sync
/// per group, not per call. A waiter cuts it short
/// ([`Durable::wait`]), so a record someone waits for is not delayed.
pub const WRITE_LINGER: Duration = Duration::from_millis(2);

/// The request body of `POST /v1/audit/tool-calls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportBatch {
    pub reports: Vec<ToolCallReport>,
}

/// A record of a delivered batch that the broker answered it will never
/// accept (its receipt says `refused`): kept in the spool's
/// [`REFUSED_FILE`] rather than retried forever or dropped.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Refusal {
    pub report_id: String,
    pub code: String,
    pub message: String,
}

/// What the broker said of a delivered batch: every record is stored but
/// the `refused` ones.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Delivered {
    pub refused: Vec<Refusal>,
}

/// A boxed future, so [`ReportSender`] stays object-safe.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<Delivered, SendError>> + Send + 'a>>;

/// Records the broker refused, as JSON lines `{"refusal": .., "report": ..}`
/// in the spool directory, for an operator to look into.
pub const REFUSED_FILE: &str = "refused.jsonl";
/// Most bytes of records sent in one request (the broker takes 4 MiB; a
/// record within [`baton_core::report_bounds`] is well under 1 MiB).
pub const MAX_BATCH_BYTES: usize = 1 << 20;

/// Delivers one batch. [`HttpSender`] is the real one; tests inject their
/// own to simulate an unreachable broker.
pub trait ReportSender: Send + Sync {
    fn send<'a>(&'a self, batch: &'a ReportBatch) -> SendFuture<'a>;
}

/// Sends batches to the broker over mTLS with the tool server's SVID.
pub struct HttpSender {
    client: reqwest::Client,
    /// The tool-call endpoint of each broker, in the order given.
    urls: Vec<String>,
    /// The broker that answered last: tried first.
    current: std::sync::atomic::AtomicUsize,
}

impl fmt::Debug for HttpSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSender")
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

/// The brokers of `raw`: one `https://` URL, or several separated by
/// commas (brokers of one service on one datastore), each without a
/// trailing `/`.
pub fn broker_urls(raw: &str) -> Result<Vec<String>, ReportError> {
    let bad = || ReportError::BrokerUrl(raw.to_owned());
    let mut urls: Vec<String> = Vec::new();
    for part in raw.split(',') {
        let u = part.trim().trim_end_matches('/');
        // A base URL only: no credentials, query or fragment (they would
        // end up in headers, logs, or in front of the API paths).
        let parsed = reqwest::Url::parse(u).map_err(|_| bad())?;
        if parsed.scheme() != "https"
            || parsed.host_str().is_none_or(str::is_empty)
            || !parsed.username().is_empty()
            || parsed.password().is_some()
            || parsed.query().is_some()
            || parsed.fragment().is_some()
            || u.contains(char::is_whitespace)
        {
            return Err(bad());
        }
        if !urls.iter().any(|x| x == u) {
            urls.push(u.to_owned());
        }
    }
    Ok(urls)
}

/// How an unreachable broker's error starts when no connection was made
/// (nothing was sent: another broker may take the batch).
const NOT_CONNECTED: &str = "no connection";
/// How long a connection to a broker may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

impl HttpSender {
    /// `broker_url` like `https://broker:8443`, or several brokers of one
    /// service separated by commas (see [`broker_urls`]); each must present
    /// the SVID `broker_id`; we authenticate with `identity` (the tool
    /// server's own SVID, rotated in place by whoever holds the
    /// `ClientIdentity`). A batch goes to the next broker only when no
    /// connection could be made to one; otherwise it is retried where it
    /// may have arrived.
    pub fn new(
        broker_url: &str,
        identity: ClientIdentity,
        bundles: BundleStore,
        broker_id: SpiffeId,
    ) -> Result<Self, ReportError> {
        let urls = broker_urls(broker_url)?;
        let tls = baton_tls::client_config(identity, bundles, PeerPolicy::Exact(vec![broker_id]))?;
        let client = reqwest::Client::builder()
            // A broker never redirects: an answer that does is final, never
            // followed (with this client's certificate) elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .tls_backend_preconfigured(tls)
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| ReportError::Client(e.to_string()))?;
        Ok(Self {
            client,
            urls: urls
                .into_iter()
                .map(|u| format!("{u}{TOOL_CALLS_PATH}"))
                .collect(),
            current: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    async fn send_to(&self, url: &str, batch: &ReportBatch) -> Result<Delivered, SendError> {
        let resp = self
            .client
            .post(url)
            .json(batch)
            .send()
            .await
            .map_err(|e| {
                if e.is_connect() {
                    SendError::Unreachable(format!("{NOT_CONNECTED}: {e}"))
                } else {
                    SendError::Unreachable(e.to_string())
                }
            })?;
        let status = resp.status();
        if status.is_success() {
            // An answer that broke off, or is not JSON, may have held
            // refusals: the batch is sent again (the broker answers what it
            // already has as duplicates, and repeats its refusals).
            let body = resp.text().await.map_err(|e| {
                SendError::Unreachable(format!("the broker's answer broke off: {e}"))
            })?;
            return refusals(&body)
                .ok_or_else(|| SendError::Unreachable("the broker's answer is not JSON".into()));
        }
        let body = resp.text().await.unwrap_or_default();
        Err(SendError::Status {
            status: status.as_u16(),
            body: body.chars().take(200).collect(),
        })
    }
}

impl ReportSender for HttpSender {
    fn send<'a>(&'a self, batch: &'a ReportBatch) -> SendFuture<'a> {
        Box::pin(async move {
            send_in_turn(&self.current, self.urls.len(), |at| async move {
                match self.urls.get(at) {
                    Some(url) => self.send_to(url, batch).await,
                    None => Err(SendError::Unreachable("no broker URL".into())),
                }
            })
            .await
        })
    }
}

/// Sends to the brokers in turn from `current`, moving on only from one
/// that was never reached. The broker a batch may have reached (it timed
/// out, broke off or answered an error) becomes `current`, so the retry
/// goes there too and no record is written by two brokers; so does the
/// broker that took it.
async fn send_in_turn<F, Fut>(
    current: &std::sync::atomic::AtomicUsize,
    n: usize,
    mut send_at: F,
) -> Result<Delivered, SendError>
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = Result<Delivered, SendError>>,
{
    use std::sync::atomic::Ordering;
    let first = current.load(Ordering::Relaxed) % n.max(1);
    let mut last = SendError::Unreachable("no broker URL".into());
    for i in 0..n {
        let at = (first + i) % n;
        match send_at(at).await {
            Err(SendError::Unreachable(e)) if e.starts_with(NOT_CONNECTED) => {
                if n > 1 {
                    tracing::warn!(broker = at, error = %e, "tool-call reports: trying the next broker");
                }
                last = SendError::Unreachable(e);
            }
            other => {
                current.store(at, Ordering::Relaxed);
                return other;
            }
        }
    }
    Err(last)
}

/// The receipts of a batch the broker answered 2xx that say `refused`.
/// (An answer without receipts, an older broker's, refuses nothing; one
/// that is not JSON is `None`.)
fn refusals(body: &str) -> Option<Delivered> {
    // Only the refusals are built: the receipts' checkpoints and proofs
    // (most of a large answer) are skipped.
    #[derive(Deserialize)]
    struct Answered {
        #[serde(default)]
        report_id: Option<serde_json::Value>,
        #[serde(default)]
        refused: Option<serde_json::Value>,
    }
    #[derive(Deserialize)]
    struct Answer {
        #[serde(default)]
        receipts: Vec<Answered>,
    }
    let text = |v: Option<&serde_json::Value>| {
        v.and_then(serde_json::Value::as_str)
            .unwrap_or_default()
            .to_owned()
    };
    let refusal = |report_id: Option<&serde_json::Value>, why: &serde_json::Value| Refusal {
        report_id: text(report_id),
        code: text(why.get("code")),
        message: text(why.get("message")),
    };
    let refused = match serde_json::from_str::<Answer>(body) {
        Ok(a) => a
            .receipts
            .into_iter()
            .filter_map(|a| Some(refusal(a.report_id.as_ref(), &a.refused?)))
            .collect(),
        // An answer of another shape (an element that is not an object, a
        // key twice) is read whole, so no refusal in it is missed.
        Err(_) => serde_json::from_str::<serde_json::Value>(body)
            .ok()?
            .get("receipts")
            .and_then(|r| r.as_array())
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|r| Some(refusal(r.get("report_id"), r.get("refused")?)))
            .collect(),
    };
    Some(Delivered { refused })
}

/// One record, durable in segment `segment`, not yet delivered; `bytes`
/// long as sent.
struct Spooled {
    segment: u64,
    report: ToolCallReport,
    bytes: usize,
}

/// What the reporter's handles and its writer thread share.
struct State {
    /// Durable records waiting for delivery, oldest first.
    pending: VecDeque<Spooled>,
    /// Undelivered records per segment number.
    outstanding: BTreeMap<u64, usize>,
    /// The segment the writer appends to, if one is open.
    current: Option<u64>,
}

struct Shared {
    dir: PathBuf,
    state: Mutex<State>,
    /// False from a failed write until the next successful one.
    healthy: AtomicBool,
    /// Wakes background delivery when records become durable.
    wake: tokio::sync::Notify,
    /// Wakes the writer thread.
    bell: Doorbell,
}

/// How the writer thread is woken: by the first record after it went
/// idle, by a waiter, or by the queue closing; records that arrive while
/// it writes or lingers cost no wake-up.
#[derive(Default)]
struct Doorbell {
    writer: std::sync::OnceLock<std::thread::Thread>,
    /// The writer is parked with nothing to write: the next record wakes it.
    idle: AtomicBool,
    /// Someone waits for a record: the writer writes without lingering.
    urgent: AtomicBool,
}

impl Doorbell {
    /// After a record was queued.
    fn ring_if_idle(&self) {
        // Pairs with the writer's fence after it sets `idle`: either it
        // sees this record in the queue or this sees it idle (the queue's
        // own orderings alone do not promise that).
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.idle.swap(false, Ordering::SeqCst) {
            self.wake_writer();
        }
    }

    /// Before waiting for a record to be written.
    fn hurry(&self) {
        self.urgent.store(true, Ordering::SeqCst);
        self.idle.store(false, Ordering::SeqCst);
        self.wake_writer();
    }

    fn wake_writer(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn io(&self, source: std::io::Error) -> ReportError {
        ReportError::Spool {
            path: self.dir.clone(),
            source,
        }
    }
}

fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("{SEGMENT_PREFIX}{n:016x}{SEGMENT_SUFFIX}"))
}

/// The segment number a file name encodes, if it is a segment.
fn segment_number(name: &str) -> Option<u64> {
    let hex = name
        .strip_prefix(SEGMENT_PREFIX)?
        .strip_suffix(SEGMENT_SUFFIX)?;
    if hex.len() != 16 {
        return None;
    }
    u64::from_str_radix(hex, 16).ok()
}

/// How a queued record's write ended, for whoever waits on it.
struct Completion {
    result: Mutex<Option<Result<(), std::io::ErrorKind>>>,
    done: Condvar,
    notify: tokio::sync::Notify,
}

impl Completion {
    fn set(&self, result: Result<(), std::io::ErrorKind>) {
        *self.result.lock().unwrap_or_else(PoisonError::into_inner) = Some(result);
        self.done.notify_all();
        self.notify.notify_one();
    }

    fn get(&self) -> Option<Result<(), std::io::ErrorKind>> {
        *self.result.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The writer's end of a [`Completion`]: dropped without an outcome (the
/// writer stopped or panicked), it tells the waiter the write failed, so
/// no waiter hangs.
struct Completer(Arc<Completion>);

impl Completer {
    fn new() -> (Self, Arc<Completion>) {
        let c = Arc::new(Completion {
            result: Mutex::new(None),
            done: Condvar::new(),
            notify: tokio::sync::Notify::new(),
        });
        (Self(c.clone()), c)
    }
}

impl Drop for Completer {
    fn drop(&mut self) {
        if self.0.get().is_none() {
            self.0.set(Err(std::io::ErrorKind::BrokenPipe));
        }
    }
}

/// A queued record: [`wait`](Self::wait) (async) or
/// [`blocking_wait`](Self::blocking_wait) returns once it is durable in
/// the spool, or with the error that kept it out. Dropping the ticket does
/// not cancel the write.
#[must_use = "a queued record is durable only once its ticket says so"]
pub struct Durable {
    completion: Arc<Completion>,
    shared: Arc<Shared>,
}

impl fmt::Debug for Durable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Durable")
            .field("done", &self.completion.get().is_some())
            .finish()
    }
}

impl Durable {
    fn into_result(self, r: Result<(), std::io::ErrorKind>) -> Result<(), ReportError> {
        r.map_err(|kind| ReportError::Spool {
            path: self.shared.dir.clone(),
            source: std::io::Error::new(kind, "the record could not be written to the spool"),
        })
    }

    /// Waits, without blocking the thread, until the record is durable.
    pub async fn wait(self) -> Result<(), ReportError> {
        if self.completion.get().is_none() {
            self.shared.bell.hurry();
        }
        loop {
            if let Some(r) = self.completion.get() {
                return self.into_result(r);
            }
            // One waiter per ticket: a `notify_one` before this line left
            // a permit, so no wake-up is missed.
            self.completion.notify.notified().await;
        }
    }

    /// Blocks the calling thread until the record is durable.
    pub fn blocking_wait(self) -> Result<(), ReportError> {
        if self.completion.get().is_none() {
            self.shared.bell.hurry();
        }
        let mut slot = self
            .completion
            .result
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(r) = *slot {
                drop(slot);
                return self.into_result(r);
            }
            slot = self
                .completion
                .done
                .wait(slot)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

/// One record for the writer.
struct Job {
    line: Vec<u8>,
    report: ToolCallReport,
    completer: Completer,
    /// Written later if this write fails. False only for a record the
    /// caller acts on only once it is written (a sensitive call's allow
    /// record: the call is refused instead, so the record would be false).
    retry: bool,
}

/// What the writer is sent.
enum Msg {
    Record(Box<Job>),
    /// Remove the current segment now if all of it was delivered (what
    /// idleness does by itself), then complete.
    Roll(Completer),
}

/// The writer thread's own state: the open segment and what it holds.
struct Writer {
    shared: Arc<Shared>,
    segment: Option<OpenSegment>,
    next_segment: u64,
    /// Records a failed write left unwritten, retried first.
    carry: Vec<Job>,
    /// The open segment was removed or replaced under us: every
    /// undelivered record must be written again before the next ones.
    lost: bool,
}

struct OpenSegment {
    number: u64,
    path: PathBuf,
    file: File,
    /// `(dev, ino)` of the file, to notice when the segment was deleted
    /// or replaced under us (appends to an unlinked file would be lost).
    identity: (u64, u64),
    records: usize,
    len: u64,
}

impl Writer {
    fn run(mut self, jobs: &mpsc::Receiver<Msg>) {
        let shared = self.shared.clone();
        let bell = &shared.bell;
        loop {
            let mut group = std::mem::take(&mut self.carry);
            let carried = group.len();
            let mut rolls = Vec::new();
            let mut closed = take_queued(jobs, &mut group, &mut rolls);
            if !closed && group.len() == carried && rolls.is_empty() {
                // Nothing new: sleep until a record rings, or the idle or
                // retry timeout. A record queued before `idle` was set
                // did not ring: look once more before sleeping.
                bell.idle.store(true, Ordering::SeqCst);
                std::sync::atomic::fence(Ordering::SeqCst);
                closed = take_queued(jobs, &mut group, &mut rolls);
                if !closed && group.len() == carried && rolls.is_empty() {
                    let wait = if carried == 0 { IDLE_ROLL } else { CARRY_RETRY };
                    std::thread::park_timeout(wait);
                    closed = take_queued(jobs, &mut group, &mut rolls);
                }
                bell.idle.store(false, Ordering::SeqCst);
            }
            if !closed && group.len() > carried && rolls.is_empty() {
                closed = linger(bell, jobs, &mut group, &mut rolls);
            }
            if closed {
                // Last chance for what is queued and what a failed write
                // left.
                if !group.is_empty() {
                    self.write_group(group);
                }
                let carry = std::mem::take(&mut self.carry);
                if !carry.is_empty() {
                    self.write_group(carry);
                }
                self.roll_if_delivered();
                for c in rolls {
                    c.0.set(Ok(()));
                }
                return;
            }
            if group.is_empty() {
                // Idle: a segment whose records were all delivered goes.
                self.roll_if_delivered();
            } else {
                self.write_group(group);
                if !rolls.is_empty() {
                    self.roll_if_delivered();
                }
            }
            for c in rolls {
                c.0.set(Ok(()));
            }
        }
    }

    /// Closes the current segment if nothing in it waits for delivery (it
    /// is then removed); the next record opens a new one.
    fn roll_if_delivered(&mut self) {
        let Some(number) = self.segment.as_ref().map(|s| s.number) else {
            return;
        };
        let mut state = self.shared.lock();
        if state.outstanding.get(&number).copied().unwrap_or(0) != 0 {
            return;
        }
        state.outstanding.remove(&number);
        state.current = None;
        drop(state);
        if let Some(seg) = self.segment.take() {
            remove_segment(&seg.path);
        }
    }

    fn open_segment(&mut self) -> std::io::Result<OpenSegment> {
        let (number, path, file) = loop {
            let number = self.next_segment;
            let path = segment_path(&self.shared.dir, number);
            let opened = OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            self.next_segment = number
                .checked_add(1)
                .ok_or_else(|| std::io::Error::other("spool segment numbers are exhausted"))?;
            match opened {
                Ok(file) => break (number, path, file),
                // Left by a failed attempt (or put there): skip the name.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        };
        // The new name must survive a crash for its records to.
        File::open(&self.shared.dir)?.sync_all()?;
        let identity = file_identity(&file)?;
        Ok(OpenSegment {
            number,
            path,
            file,
            identity,
            records: 0,
            len: 0,
        })
    }

    /// The segment to append to: the open one while it is still ours and
    /// has room, else a new one (a full one left behind is removed if all
    /// its records were delivered). When the open one was removed or
    /// replaced under us, every undelivered record is written again into
    /// the new one (returned).
    fn segment_for_write(&mut self) -> std::io::Result<Vec<ToolCallReport>> {
        if let Some(seg) = &self.segment {
            let still_ours = fs::symlink_metadata(&seg.path)
                .is_ok_and(|m| m.is_file() && (m.dev(), m.ino()) == seg.identity);
            if !still_ours {
                tracing::warn!(path = %seg.path.display(),
                    "audit spool segment was removed or replaced; writing its records again");
                self.segment = None;
                self.lost = true;
            } else if seg.records >= SEGMENT_RECORDS {
                self.segment = None;
            }
        }
        if self.segment.is_none() {
            let seg = self.open_segment()?;
            let mut state = self.shared.lock();
            let old = state.current.replace(seg.number);
            let delivered =
                old.filter(|n| !self.lost && state.outstanding.get(n).copied().unwrap_or(0) == 0);
            if let Some(n) = delivered {
                state.outstanding.remove(&n);
            }
            let rewrite = if self.lost {
                state.pending.iter().map(|s| s.report.clone()).collect()
            } else {
                Vec::new()
            };
            drop(state);
            if let Some(n) = delivered {
                remove_segment(&segment_path(&self.shared.dir, n));
            }
            self.segment = Some(seg);
            return Ok(rewrite);
        }
        Ok(if self.lost {
            self.shared
                .lock()
                .pending
                .iter()
                .map(|s| s.report.clone())
                .collect()
        } else {
            Vec::new()
        })
    }

    fn write_group(&mut self, group: Vec<Job>) {
        match self.append_group(&group) {
            Ok(number) => {
                self.shared.healthy.store(true, Ordering::Relaxed);
                let mut completers = Vec::with_capacity(group.len());
                let spooled: Vec<Spooled> = group
                    .into_iter()
                    .map(|j| {
                        completers.push(j.completer);
                        Spooled {
                            segment: number,
                            report: j.report,
                            bytes: j.line.len(),
                        }
                    })
                    .collect();
                {
                    let mut state = self.shared.lock();
                    *state.outstanding.entry(number).or_insert(0) += spooled.len();
                    state.pending.extend(spooled);
                }
                // Delivery first: whoever waits may count on it being woken.
                self.shared.wake.notify_one();
                for c in completers {
                    c.0.set(Ok(()));
                }
            }
            Err(e) => {
                tracing::error!(dir = %self.shared.dir.display(), error = %e,
                    records = group.len(), "cannot write tool-call reports to the audit spool");
                self.shared.healthy.store(false, Ordering::Relaxed);
                for job in group {
                    // Whoever waits learns of the failure either way.
                    job.completer.0.set(Err(e.kind()));
                    if !job.retry {
                        continue;
                    }
                    if self.carry.len() < MAX_CARRY {
                        self.carry.push(job);
                    } else {
                        tracing::error!(
                            "dropping a tool-call report: the spool has been failing too long"
                        );
                    }
                }
            }
        }
    }

    /// Writes the group's lines (and, after a lost segment, every
    /// undelivered record first) with one fdatasync; the segment number.
    fn append_group(&mut self, group: &[Job]) -> std::io::Result<u64> {
        let rewrite = self.segment_for_write()?;
        let mut buf = Vec::new();
        for r in &rewrite {
            serde_json::to_writer(&mut buf, r).map_err(std::io::Error::other)?;
            buf.push(b'\n');
        }
        for job in group {
            buf.extend_from_slice(&job.line);
        }
        let lines = rewrite.len() + group.len();
        let Some(seg) = self.segment.as_mut() else {
            return Err(std::io::Error::other("no spool segment open"));
        };
        let written = seg.file.write_all(&buf).and_then(|()| seg.file.sync_data());
        if let Err(e) = written {
            // Cut a partial line off so the next write starts clean; if
            // even that fails, start a new segment next time.
            if seg.file.set_len(seg.len).is_err() {
                self.segment = None;
            }
            return Err(e);
        }
        seg.len += buf.len() as u64;
        seg.records += lines;
        let number = seg.number;
        if std::mem::take(&mut self.lost) {
            let mut state = self.shared.lock();
            let mut old = Vec::new();
            for s in state.pending.iter_mut() {
                if s.segment != number {
                    old.push(s.segment);
                    s.segment = number;
                }
            }
            let moved = state.pending.len();
            old.extend(state.outstanding.keys().copied().filter(|n| *n != number));
            state.outstanding.clear();
            state.outstanding.insert(number, moved);
            drop(state);
            old.sort_unstable();
            old.dedup();
            for n in old {
                remove_segment(&segment_path(&self.shared.dir, n));
            }
        }
        Ok(number)
    }
}

/// Moves what is queued into `group` (up to [`MAX_GROUP`]), stopping after
/// a roll so that later records go into the next group. True once the
/// queue is closed and empty.
fn take_queued(
    jobs: &mpsc::Receiver<Msg>,
    group: &mut Vec<Job>,
    rolls: &mut Vec<Completer>,
) -> bool {
    while rolls.is_empty() && group.len() < MAX_GROUP {
        match jobs.try_recv() {
            Ok(Msg::Record(j)) => group.push(*j),
            Ok(Msg::Roll(c)) => rolls.push(c),
            Err(mpsc::TryRecvError::Empty) => return false,
            Err(mpsc::TryRecvError::Disconnected) => return true,
        }
    }
    false
}

/// Waits up to [`WRITE_LINGER`] for more records to join `group`, less if
/// someone waits for a record, a roll arrives or the group is full. True
/// once the queue is closed.
fn linger(
    bell: &Doorbell,
    jobs: &mpsc::Receiver<Msg>,
    group: &mut Vec<Job>,
    rolls: &mut Vec<Completer>,
) -> bool {
    let until = Instant::now() + WRITE_LINGER;
    loop {
        if bell.urgent.swap(false, Ordering::SeqCst)
            || !rolls.is_empty()
            || group.len() >= MAX_GROUP
        {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        std::thread::park_timeout(left);
        if take_queued(jobs, group, rolls) {
            return true;
        }
    }
}

fn remove_segment(path: &Path) {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        // Left behind, its records are sent again after a restart; the
        // broker ignores report ids it holds.
        Err(e) => tracing::warn!(path = %path.display(), error = %e,
            "could not remove a delivered spool segment"),
    }
}

fn file_identity(file: &File) -> std::io::Result<(u64, u64)> {
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

/// Refuses a spool directory or file another user could have written: not
/// owned by this process's user, or writable by every user (a symlink is
/// refused too, for a file). Records in it are delivered
/// under this process's identity, so whoever can write them could report
/// calls in its name, or drop undelivered ones.
fn owned_and_private(path: &Path, dir: bool, me: u32) -> std::io::Result<()> {
    let m = if dir {
        fs::metadata(path)?
    } else {
        fs::symlink_metadata(path)?
    };
    if (dir && !m.is_dir()) || (!dir && !m.is_file()) {
        return Err(std::io::Error::other(if dir {
            "not a directory"
        } else {
            "not a regular file (a symlink is not followed here)"
        }));
    }
    // Group-writable is allowed: Kubernetes makes a volume's files
    // writable by the pod's `fsGroup`, which only the pod's own
    // containers hold.
    if m.mode() & 0o002 != 0 {
        return Err(std::io::Error::other(format!(
            "writable by other users (mode {:o}); chmod o-w it",
            m.mode() & 0o777
        )));
    }
    if m.uid() != me {
        return Err(std::io::Error::other(format!(
            "owned by uid {}, not by this process's uid {me}",
            m.uid()
        )));
    }
    Ok(())
}

/// This process's effective uid, as the owner of a file it creates in
/// `dir` (removed at once): no `/proc` needed, nothing unsafe.
fn own_uid(dir: &Path) -> std::io::Result<u32> {
    let probe = dir.join(format!(".owner-probe.{}", std::process::id()));
    let _ = fs::remove_file(&probe);
    let f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&probe)?;
    let uid = f.metadata().map(|m| m.uid());
    drop(f);
    fs::remove_file(&probe)?;
    uid
}

/// Reads every spool file in `dir` (the legacy file first, then segments
/// in order): the records, deduplicated, and the files read.
fn load(dir: &Path) -> Result<(Vec<ToolCallReport>, Vec<PathBuf>, u64), ReportError> {
    let err = |path: &Path, source| ReportError::Spool {
        path: path.to_owned(),
        source,
    };
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| err(dir, e))?;
    let me = own_uid(dir).map_err(|e| err(dir, e))?;
    owned_and_private(dir, true, me).map_err(|e| err(dir, e))?;
    let mut files: Vec<(u64, PathBuf)> = Vec::new();
    let mut next = 0u64;
    for entry in fs::read_dir(dir).map_err(|e| err(dir, e))? {
        let entry = entry.map_err(|e| err(dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name == LEGACY_FILE {
            files.push((0, entry.path()));
        } else if let Some(n) = segment_number(name) {
            let Some(after) = n.checked_add(1) else {
                return Err(err(
                    &entry.path(),
                    std::io::Error::other("segment number too large; move the file away"),
                ));
            };
            files.push((after, entry.path()));
            next = next.max(after);
        }
    }
    files.sort();
    // Every record read here is sent under this process's identity: none
    // may come from a file another user could have written.
    for (_, path) in &files {
        owned_and_private(path, false, me).map_err(|e| err(path, e))?;
    }
    let mut records = Vec::new();
    let mut seen = HashSet::new();
    for (_, path) in &files {
        // Bytes, not text: a crash can cut a line inside a UTF-8 sequence.
        let bytes = match fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err(path, e)),
        };
        for (n, line) in bytes.split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            match serde_json::from_slice::<ToolCallReport>(line) {
                Ok(r) => {
                    if seen.insert(r.report_id.clone()) {
                        records.push(r);
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), line = n + 1, error = %e,
                        "dropping an unreadable spool line (torn write?)");
                }
            }
        }
    }
    Ok((records, files.into_iter().map(|(_, p)| p).collect(), next))
}

/// Capped exponential backoff for delivery retries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            min,
            max,
            next: min,
        }
    }
    /// The delay before the next attempt after a failure; doubles each time,
    /// up to the cap.
    pub fn on_failure(&mut self) -> Duration {
        let d = self.next;
        self.next = self.next.saturating_mul(2).min(self.max);
        d
    }
    pub fn on_success(&mut self) {
        self.next = self.min;
    }
}

struct Inner {
    shared: Arc<Shared>,
    /// `None` only while dropping.
    jobs: Option<mpsc::Sender<Msg>>,
    writer: Option<std::thread::JoinHandle<()>>,
    sender: Arc<dyn ReportSender>,
    flushing: tokio::sync::Mutex<()>,
    /// Records the broker refused (kept in [`REFUSED_FILE`]).
    refused: std::sync::atomic::AtomicUsize,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Closing the queue ends the writer once it wrote what it holds.
        drop(self.jobs.take());
        self.shared.bell.wake_writer();
        if let Some(h) = self.writer.take()
            && h.join().is_err()
        {
            tracing::error!("the audit spool writer thread panicked");
        }
    }
}

/// Spools reports durably and delivers them to the broker.
///
/// Cloning gives another handle on the same spool. Deliver with
/// [`flush`](Self::flush) (one pass, for tests and shutdown) or run
/// [`spawn`](Self::spawn) once for background delivery with retries.
#[derive(Clone)]
pub struct Reporter {
    inner: Arc<Inner>,
}

impl fmt::Debug for Reporter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Reporter")
            .field("spool", &self.inner.shared.dir)
            .field("pending", &self.pending())
            .finish_non_exhaustive()
    }
}

impl Reporter {
    /// Opens (or creates) the spool in `spool_dir`, keeping any records an
    /// earlier process left undelivered, and starts its writer thread.
    pub fn open(spool_dir: &Path, sender: Arc<dyn ReportSender>) -> Result<Self, ReportError> {
        let (records, old_files, next_segment) = load(spool_dir)?;
        let shared = Arc::new(Shared {
            dir: spool_dir.to_owned(),
            state: Mutex::new(State {
                pending: VecDeque::new(),
                outstanding: BTreeMap::new(),
                current: None,
            }),
            healthy: AtomicBool::new(true),
            wake: tokio::sync::Notify::new(),
            bell: Doorbell::default(),
        });
        let mut writer = Writer {
            shared: shared.clone(),
            segment: None,
            next_segment,
            carry: Vec::new(),
            lost: false,
        };
        if !records.is_empty() {
            // Compact what was left into one fresh segment, then drop the
            // old files: a torn tail or a duplicate never survives a
            // restart, and the next append starts on a fresh line.
            let seg = writer.open_segment().map_err(|e| shared.io(e))?;
            let mut buf = Vec::new();
            let mut sizes = Vec::with_capacity(records.len());
            for r in &records {
                let before = buf.len();
                serde_json::to_writer(&mut buf, r)
                    .map_err(|e| ReportError::Encode(e.to_string()))?;
                buf.push(b'\n');
                sizes.push(buf.len() - before);
            }
            let mut seg = seg;
            seg.file
                .write_all(&buf)
                .and_then(|()| seg.file.sync_data())
                .map_err(|e| shared.io(e))?;
            seg.records = records.len();
            seg.len = buf.len() as u64;
            let mut state = shared.lock();
            state.current = Some(seg.number);
            state.outstanding.insert(seg.number, records.len());
            state.pending = records
                .into_iter()
                .zip(sizes)
                .map(|(report, bytes)| Spooled {
                    segment: seg.number,
                    report,
                    bytes,
                })
                .collect();
            drop(state);
            writer.segment = Some(seg);
        }
        for f in &old_files {
            fs::remove_file(f).map_err(|e| shared.io(e))?;
        }
        if !old_files.is_empty() {
            File::open(spool_dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| shared.io(e))?;
        }
        let (tx, rx) = mpsc::channel();
        let handle = std::thread::Builder::new()
            .name("baton-spool".into())
            .spawn(move || writer.run(&rx))
            .map_err(|e| shared.io(e))?;
        // Set before any record can be queued (the reporter is not
        // returned yet), so no ring is lost.
        let _ = shared.bell.writer.set(handle.thread().clone());
        Ok(Self {
            inner: Arc::new(Inner {
                shared,
                jobs: Some(tx),
                writer: Some(handle),
                sender,
                flushing: tokio::sync::Mutex::new(()),
                refused: std::sync::atomic::AtomicUsize::new(0),
            }),
        })
    }

    /// Queues `report` for the writer thread's next group commit and
    /// returns at once; the ticket says when it is durable. If that write
    /// fails, the record is written with a later one (the ticket reports
    /// the failure all the same): for records of what happened anyway.
    pub fn enqueue(&self, report: ToolCallReport) -> Result<Durable, ReportError> {
        self.queue(report, true)
    }

    /// As [`enqueue`](Self::enqueue), for a record the caller acts on only
    /// once it is written (a sensitive call's allow record): if the write
    /// fails, the record is dropped, since the caller will not act.
    pub fn enqueue_once(&self, report: ToolCallReport) -> Result<Durable, ReportError> {
        self.queue(report, false)
    }

    fn queue(&self, report: ToolCallReport, retry: bool) -> Result<Durable, ReportError> {
        // A record the broker would refuse is refused here, where its
        // caller can still act (a gate refuses the call), not after it
        // was spooled.
        report.check_bounds()?;
        let mut line =
            serde_json::to_vec(&report).map_err(|e| ReportError::Encode(e.to_string()))?;
        line.push(b'\n');
        let (completer, completion) = Completer::new();
        let job = Job {
            line,
            report,
            completer,
            retry,
        };
        let sent = self
            .inner
            .jobs
            .as_ref()
            .is_some_and(|tx| tx.send(Msg::Record(Box::new(job))).is_ok());
        self.inner.shared.bell.ring_if_idle();
        if !sent {
            return Err(self.inner.shared.io(std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the spool writer has stopped",
            )));
        }
        Ok(Durable {
            completion,
            shared: self.inner.shared.clone(),
        })
    }

    /// Removes the spool's current segment if every record in it was
    /// delivered, which the writer otherwise does after a second of
    /// idleness: after a [`flush`](Self::flush) that left nothing pending,
    /// a process that stops leaves an empty spool behind. Every record
    /// queued before this call is written before it returns (the writer
    /// takes its messages in order), so it is also the barrier to call
    /// before a last `flush`. Returns once the writer did it (at once if
    /// the writer has stopped).
    pub async fn settle(&self) {
        let (completer, completion) = Completer::new();
        let sent = self
            .inner
            .jobs
            .as_ref()
            .is_some_and(|tx| tx.send(Msg::Roll(completer)).is_ok());
        if !sent {
            return;
        }
        self.inner.shared.bell.hurry();
        let ticket = Durable {
            completion,
            shared: self.inner.shared.clone(),
        };
        // Only the writer's answer matters, not its outcome.
        let _ = ticket.wait().await;
    }

    /// Appends `report` to the spool; returns once it is durable (blocks
    /// the calling thread for the writer's next group commit).
    pub fn submit(&self, report: ToolCallReport) -> Result<(), ReportError> {
        self.enqueue(report)?.blocking_wait()
    }

    /// Like [`submit`](Self::submit), without blocking the thread.
    pub async fn submit_async(&self, report: ToolCallReport) -> Result<(), ReportError> {
        self.enqueue(report)?.wait().await
    }

    /// False from a failed spool write until the next one succeeds: a
    /// caller that would not wait for its record's ticket should wait
    /// while this is false.
    pub fn is_healthy(&self) -> bool {
        self.inner.shared.healthy.load(Ordering::Relaxed)
    }

    /// How many durable records wait for delivery.
    pub fn pending(&self) -> usize {
        self.inner.shared.lock().pending.len()
    }

    /// The durable records waiting for delivery, oldest first.
    pub fn pending_reports(&self) -> Vec<ToolCallReport> {
        self.inner
            .shared
            .lock()
            .pending
            .iter()
            .map(|s| s.report.clone())
            .collect()
    }

    /// Sends everything pending, in batches of at most [`MAX_BATCH`]
    /// records and about [`MAX_BATCH_BYTES`], until the spool is empty or a
    /// send fails (the failed batch and everything after it stay spooled).
    /// A record the broker refuses (its receipt says why, or a batch of it
    /// alone is too large) moves to [`REFUSED_FILE`], logged: it never
    /// blocks the records behind it. Returns how many records were
    /// delivered (refused ones included).
    pub async fn flush(&self) -> Result<usize, ReportError> {
        let _one_at_a_time = self.inner.flushing.lock().await;
        let shared = &self.inner.shared;
        let mut delivered = 0;
        // Halved after a batch was too large (for the broker, or a proxy
        // in front of it), down to one record, which is then set aside.
        let (mut most, mut budget) = (MAX_BATCH, MAX_BATCH_BYTES);
        loop {
            let (batch, bytes) = {
                let state = shared.lock();
                let mut bytes = 0;
                let mut reports = Vec::new();
                for s in state.pending.iter().take(most) {
                    if !reports.is_empty() && bytes + s.bytes > budget {
                        break;
                    }
                    bytes += s.bytes;
                    reports.push(s.report.clone());
                }
                (ReportBatch { reports }, bytes)
            };
            if batch.reports.is_empty() {
                return Ok(delivered);
            }
            let refused = match self.inner.sender.send(&batch).await {
                Ok(d) => d.refused,
                Err(SendError::Status { status: 413, body }) => {
                    if batch.reports.len() > 1 {
                        most = (batch.reports.len() / 2).max(1);
                        budget = (bytes / 2).max(1);
                        continue;
                    }
                    // The record at fault: set aside; the next batches
                    // are full size again.
                    (most, budget) = (MAX_BATCH, MAX_BATCH_BYTES);
                    vec![Refusal {
                        report_id: batch
                            .reports
                            .first()
                            .map(|r| r.report_id.clone())
                            .unwrap_or_default(),
                        code: "payload_too_large".into(),
                        message: body,
                    }]
                }
                Err(e) => return Err(e.into()),
            };
            if !refused.is_empty() {
                self.set_aside(&batch, &refused)?;
            }
            let ids: HashSet<&str> = batch.reports.iter().map(|r| r.report_id.as_str()).collect();
            delivered += ids.len();
            let done = {
                let mut state = shared.lock();
                let mut touched = Vec::new();
                // Only delivery removes records and the writer only adds
                // at the back, so the batch is still at the front (a lost
                // segment's rewrite renumbers records, never reorders).
                while state
                    .pending
                    .front()
                    .is_some_and(|s| ids.contains(s.report.report_id.as_str()))
                {
                    if let Some(s) = state.pending.pop_front() {
                        touched.push(s.segment);
                    }
                }
                let mut done = Vec::new();
                for n in touched {
                    if let Some(c) = state.outstanding.get_mut(&n) {
                        *c = c.saturating_sub(1);
                        if *c == 0 && state.current != Some(n) {
                            state.outstanding.remove(&n);
                            done.push(n);
                        }
                    }
                }
                done
            };
            // The current segment goes when the writer is idle (or moves
            // on); a closed one as soon as all of it was delivered.
            for n in done {
                remove_segment(&segment_path(&shared.dir, n));
            }
        }
    }

    /// Appends the refused records of `batch` to [`REFUSED_FILE`]
    /// (fsynced before they leave the spool) and logs each.
    fn set_aside(&self, batch: &ReportBatch, refused: &[Refusal]) -> Result<(), ReportError> {
        let shared = &self.inner.shared;
        let mut buf = Vec::new();
        let mut kept = 0;
        for why in refused {
            let Some(report) = batch.reports.iter().find(|r| r.report_id == why.report_id) else {
                tracing::warn!(report = %why.report_id.escape_debug(), "the broker refused a record this batch does not hold; ignored");
                continue;
            };
            kept += 1;
            tracing::error!(
                report = %why.report_id.escape_debug(),
                code = %why.code.escape_debug(),
                message = %why.message.escape_debug(),
                file = REFUSED_FILE,
                "the broker refused a tool-call record; it is kept in the spool directory, not in the audit log"
            );
            serde_json::to_writer(
                &mut buf,
                &serde_json::json!({ "refusal": why, "report": report }),
            )
            .map_err(|e| ReportError::Encode(e.to_string()))?;
            buf.push(b'\n');
        }
        let path = shared.dir.join(REFUSED_FILE);
        OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(&buf)?;
                f.sync_data()
            })
            .map_err(|e| shared.io(e))?;
        self.inner.refused.fetch_add(kept, Ordering::Relaxed);
        Ok(())
    }

    /// How many delivered records the broker refused since this reporter
    /// was opened (each kept in [`REFUSED_FILE`]).
    pub fn refused(&self) -> usize {
        self.inner.refused.load(Ordering::Relaxed)
    }

    /// Delivers in the background: flushes whenever records become
    /// durable; after a failure, retries with [`Backoff`] from
    /// [`MIN_BACKOFF`] up to [`MAX_BACKOFF`] (new records do not cut a
    /// backoff short). Aborting the returned task loses nothing: the spool
    /// is on disk. Call it once, from within a Tokio runtime.
    pub fn spawn(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
            loop {
                match this.flush().await {
                    Ok(_) => {
                        backoff.on_success();
                        if this.pending() == 0 {
                            this.inner.shared.wake.notified().await;
                            // The records of the calls still in flight join
                            // this batch: one delivery for many calls, not
                            // one per call. They are durable meanwhile.
                            if this.pending() < MAX_BATCH {
                                tokio::time::sleep(DELIVERY_LINGER).await;
                            }
                        }
                    }
                    Err(e) => {
                        let delay = backoff.on_failure();
                        tracing::warn!(error = %e, pending = this.pending(), retry_in = ?delay,
                            "tool-call reports not delivered; retrying");
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod answer_tests {
    #[test]
    fn every_refusal_of_an_answer_is_read_whatever_else_it_holds() {
        let ids = |body: &str| {
            super::refusals(body)
                .unwrap()
                .refused
                .into_iter()
                .map(|r| format!("{}:{}", r.report_id, r.code))
                .collect::<Vec<_>>()
        };
        let refused = r#"{"report_id":"r-2","refused":{"code":"report_refused","message":"no"}}"#;
        // The broker's answer: receipts skipped, the refusal read.
        let answer = format!(
            r#"{{"receipts":[{{"report_id":"r-1","index":4,"receipt":{{"index":4,"inclusion_proof":["ab"]}}}},{refused}]}}"#
        );
        assert_eq!(ids(&answer), ["r-2:report_refused"]);
        // Another shape (an element that is not an object, a key twice)
        // loses no refusal.
        let odd = format!(r#"{{"receipts":[null,"x",{refused}]}}"#);
        assert_eq!(ids(&odd), ["r-2:report_refused"]);
        let twice =
            r#"{"receipts":[{"report_id":"r-0","report_id":"r-3","refused":{"code":"c"}}]}"#;
        assert_eq!(ids(twice), ["r-3:c"]);
        assert!(ids(r#"{"receipts":[]}"#).is_empty());
        // An answer that is not JSON (cut off) is not taken for one that
        // refuses nothing: the batch is sent again.
        assert!(super::refusals(r#"{"receipts":[{"report_id":"r-2","refu"#).is_none());
        assert!(
            ids("{}").is_empty(),
            "an older broker's answer refuses nothing"
        );
    }

    /// A batch that may have reached a broker (it timed out or answered
    /// an error) is retried at that broker, not at the one that refused
    /// the connection before it, so that no record is written by two
    /// brokers; a broker never reached is skipped. The control: a batch
    /// taken stays with the broker that took it.
    #[tokio::test]
    async fn a_batch_that_may_have_arrived_is_retried_where_it_went() {
        use std::sync::Mutex;
        use std::sync::atomic::AtomicUsize;

        use super::{Delivered, NOT_CONNECTED, SendError, send_in_turn};
        let current = AtomicUsize::new(0);
        let tried = Mutex::new(Vec::new());
        // Broker 0 refuses the connection, broker 1 answers 500.
        let first = send_in_turn(&current, 2, |at| {
            tried.lock().unwrap().push(at);
            async move {
                if at == 0 {
                    Err(SendError::Unreachable(format!("{NOT_CONNECTED}: refused")))
                } else {
                    Err(SendError::Status {
                        status: 500,
                        body: String::new(),
                    })
                }
            }
        })
        .await;
        assert!(matches!(first, Err(SendError::Status { .. })), "{first:?}");
        // Broker 0 is back: the retry still goes to broker 1 first.
        let again = send_in_turn(&current, 2, |at| {
            tried.lock().unwrap().push(at);
            async move { Ok(Delivered::default()) }
        })
        .await;
        assert!(again.is_ok());
        assert_eq!(*tried.lock().unwrap(), [0, 1, 1]);
        assert_eq!(current.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}

#[cfg(test)]
mod url_tests {
    use super::broker_urls;

    #[test]
    fn broker_urls_take_a_comma_list_of_https_base_urls_only() {
        assert_eq!(
            broker_urls(" https://a:8443/ , https://b:8443,https://a:8443").unwrap(),
            ["https://a:8443", "https://b:8443"]
        );
        for bad in [
            "",
            "https://a:8443,",
            "https://",
            "http://a:8443",
            "https://user:pw@a:8443",
            "https://a:8443?x=1",
            "https://a:8443#f",
            "https://a b:8443",
            "a:8443",
        ] {
            assert!(broker_urls(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
