//! Tool-call audit reports: spooled durably on the tool server, delivered
//! to the broker over mTLS, never lost while the broker is unreachable.
//!
//! Wire format: `POST {broker_url}/v1/audit/tool-calls` with the JSON body
//! [`ReportBatch`] `{"reports": [ToolCallReport, ...]}` (one to
//! [`MAX_BATCH`] records). Any 2xx means every record of the batch is
//! stored. The broker must treat `report_id` as an idempotency key: a batch
//! can be sent again after a timeout that hid a success, and the spool then
//! resends records the broker already holds.
//!
//! Durability: [`Reporter::submit`] appends the record as one JSON line to
//! `<spool_dir>/tool-calls.jsonl` and fsyncs before returning. A delivered
//! batch is removed by rewriting the spool (temporary file, fsync, rename,
//! fsync of the directory). On open, records left by an earlier process are
//! loaded (a torn last line from a crash mid-append is dropped with a
//! warning; it was never acknowledged) and deduplicated by `report_id`.

use std::collections::HashSet;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::future::Future;
use std::io::Write as _;
use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

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
const SPOOL_FILE: &str = "tool-calls.jsonl";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The request body of `POST /v1/audit/tool-calls`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportBatch {
    pub reports: Vec<ToolCallReport>,
}

/// A boxed future, so [`ReportSender`] stays object-safe.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<(), SendError>> + Send + 'a>>;

/// Delivers one batch. [`HttpSender`] is the real one; tests inject their
/// own to simulate an unreachable broker.
pub trait ReportSender: Send + Sync {
    fn send<'a>(&'a self, batch: &'a ReportBatch) -> SendFuture<'a>;
}

/// Sends batches to the broker over mTLS with the tool server's SVID.
pub struct HttpSender {
    client: reqwest::Client,
    url: String,
}

impl fmt::Debug for HttpSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpSender")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl HttpSender {
    /// `broker_url` like `https://broker:8443`; the server must present the
    /// SVID `broker_id`; we authenticate with `identity` (the tool server's
    /// own SVID, rotated in place by whoever holds the `ClientIdentity`).
    pub fn new(
        broker_url: &str,
        identity: ClientIdentity,
        bundles: BundleStore,
        broker_id: SpiffeId,
    ) -> Result<Self, ReportError> {
        let base = broker_url.trim_end_matches('/');
        if !base.starts_with("https://") {
            return Err(ReportError::BrokerUrl(broker_url.to_owned()));
        }
        let tls = baton_tls::client_config(identity, bundles, PeerPolicy::Exact(vec![broker_id]))?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(REQUEST_TIMEOUT)
            .no_proxy()
            .build()
            .map_err(|e| ReportError::Client(e.to_string()))?;
        Ok(Self {
            client,
            url: format!("{base}{TOOL_CALLS_PATH}"),
        })
    }
}

impl ReportSender for HttpSender {
    fn send<'a>(&'a self, batch: &'a ReportBatch) -> SendFuture<'a> {
        Box::pin(async move {
            let resp = self
                .client
                .post(&self.url)
                .json(batch)
                .send()
                .await
                .map_err(|e| SendError::Unreachable(e.to_string()))?;
            let status = resp.status();
            if status.is_success() {
                return Ok(());
            }
            let body = resp.text().await.unwrap_or_default();
            Err(SendError::Status {
                status: status.as_u16(),
                body: body.chars().take(200).collect(),
            })
        })
    }
}

/// The spool file and the records in it, in order.
struct Spool {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// `(dev, ino)` of the file `file` writes to, to notice when the spool
    /// was deleted or replaced under us (appends to an unlinked file would
    /// be lost).
    identity: (u64, u64),
    pending: Vec<ToolCallReport>,
}

impl Spool {
    fn io(&self, source: std::io::Error) -> ReportError {
        ReportError::Spool {
            path: self.path.clone(),
            source,
        }
    }

    fn open(dir: &Path) -> Result<Self, ReportError> {
        let path = dir.join(SPOOL_FILE);
        let err = |source| ReportError::Spool {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(dir).map_err(err)?;
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(err(e)),
        };
        let mut pending = Vec::new();
        let mut seen = HashSet::new();
        let mut dirty = !text.is_empty() && !text.ends_with('\n');
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                dirty = true;
                continue;
            }
            match serde_json::from_str::<ToolCallReport>(line) {
                Ok(r) => {
                    if seen.insert(r.report_id.clone()) {
                        pending.push(r);
                    } else {
                        dirty = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), line = n + 1, error = %e,
                        "dropping an unreadable spool line (torn write?)");
                    dirty = true;
                }
            }
        }
        let file = open_append(&path).map_err(err)?;
        let identity = file_identity(&file).map_err(err)?;
        let mut spool = Spool {
            dir: dir.to_owned(),
            path,
            file,
            identity,
            pending,
        };
        if dirty {
            spool.rewrite()?;
        }
        Ok(spool)
    }

    fn append(&mut self, report: ToolCallReport) -> Result<(), ReportError> {
        let mut line =
            serde_json::to_vec(&report).map_err(|e| ReportError::Encode(e.to_string()))?;
        line.push(b'\n');
        let still_ours = fs::symlink_metadata(&self.path)
            .is_ok_and(|m| m.is_file() && (m.dev(), m.ino()) == self.identity);
        if !still_ours {
            tracing::warn!(path = %self.path.display(), "audit spool was removed or replaced; recreating it");
            self.rewrite()?;
        }
        let written = self
            .file
            .write_all(&line)
            .and_then(|()| self.file.sync_data());
        if let Err(e) = written {
            // The file may now end with a partial line; rewrite it from
            // memory so the next append does not extend a torn record.
            if let Err(re) = self.rewrite() {
                tracing::warn!(error = %re, "could not repair the spool after a failed append");
            }
            return Err(self.io(e));
        }
        self.pending.push(report);
        Ok(())
    }

    fn remove(&mut self, delivered: &HashSet<String>) -> Result<(), ReportError> {
        self.pending.retain(|r| !delivered.contains(&r.report_id));
        self.rewrite()
    }

    /// Replaces the file with exactly `pending`, atomically.
    fn rewrite(&mut self) -> Result<(), ReportError> {
        let tmp = self.dir.join(format!("{SPOOL_FILE}.tmp"));
        let mut body = Vec::new();
        for r in &self.pending {
            serde_json::to_writer(&mut body, r).map_err(|e| ReportError::Encode(e.to_string()))?;
            body.push(b'\n');
        }
        let result = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            f.write_all(&body)?;
            f.sync_all()?;
            fs::rename(&tmp, &self.path)?;
            File::open(&self.dir)?.sync_all()?;
            let file = open_append(&self.path)?;
            let identity = file_identity(&file)?;
            Ok((file, identity))
        })();
        (self.file, self.identity) = result.map_err(|e| self.io(e))?;
        Ok(())
    }
}

fn file_identity(file: &File) -> std::io::Result<(u64, u64)> {
    let m = file.metadata()?;
    Ok((m.dev(), m.ino()))
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .append(true)
        .create(true)
        .mode(0o600)
        .open(path)
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
    spool: Mutex<Spool>,
    sender: Arc<dyn ReportSender>,
    wake: tokio::sync::Notify,
    flushing: tokio::sync::Mutex<()>,
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
        let spool = self
            .inner
            .spool
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("Reporter")
            .field("spool", &spool.path)
            .field("pending", &spool.pending.len())
            .finish_non_exhaustive()
    }
}

impl Reporter {
    /// Opens (or creates) the spool in `spool_dir`, keeping any records an
    /// earlier process left undelivered.
    pub fn open(spool_dir: &Path, sender: Arc<dyn ReportSender>) -> Result<Self, ReportError> {
        let spool = Spool::open(spool_dir)?;
        Ok(Self {
            inner: Arc::new(Inner {
                spool: Mutex::new(spool),
                sender,
                wake: tokio::sync::Notify::new(),
                flushing: tokio::sync::Mutex::new(()),
            }),
        })
    }

    /// Appends `report` to the spool and fsyncs; returns once it is
    /// durable. Blocking file I/O: a few hundred microseconds to a few
    /// milliseconds depending on the disk.
    pub fn submit(&self, report: ToolCallReport) -> Result<(), ReportError> {
        self.inner
            .spool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(report)?;
        self.inner.wake.notify_one();
        Ok(())
    }

    /// How many records wait for delivery.
    pub fn pending(&self) -> usize {
        self.lock_spool().pending.len()
    }

    /// The records waiting for delivery, oldest first.
    pub fn pending_reports(&self) -> Vec<ToolCallReport> {
        self.lock_spool().pending.clone()
    }

    fn lock_spool(&self) -> std::sync::MutexGuard<'_, Spool> {
        self.inner
            .spool
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Sends everything pending, in batches of at most [`MAX_BATCH`], until
    /// the spool is empty or a send fails (the failed batch and everything
    /// after it stay spooled). Returns how many records were delivered.
    pub async fn flush(&self) -> Result<usize, ReportError> {
        let _one_at_a_time = self.inner.flushing.lock().await;
        let mut delivered = 0;
        loop {
            let batch = ReportBatch {
                reports: self
                    .lock_spool()
                    .pending
                    .iter()
                    .take(MAX_BATCH)
                    .cloned()
                    .collect(),
            };
            if batch.reports.is_empty() {
                return Ok(delivered);
            }
            self.inner.sender.send(&batch).await?;
            let ids: HashSet<String> = batch.reports.into_iter().map(|r| r.report_id).collect();
            delivered += ids.len();
            self.lock_spool().remove(&ids)?;
        }
    }

    /// Delivers in the background: flushes whenever a record is submitted;
    /// after a failure, retries with [`Backoff`] from [`MIN_BACKOFF`] up to
    /// [`MAX_BACKOFF`] (submissions do not cut a backoff short). Aborting
    /// the returned task loses nothing: the spool is on disk. Call it once,
    /// from within a Tokio runtime.
    pub fn spawn(&self) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Backoff::new(MIN_BACKOFF, MAX_BACKOFF);
            loop {
                match this.flush().await {
                    Ok(_) => {
                        backoff.on_success();
                        if this.pending() == 0 {
                            this.inner.wake.notified().await;
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
