//! The broker's side of revocation. The datastore is the source of truth:
//! every credential the broker hands out (agent and workload SVIDs, task
//! credentials, grants, secret leases) is registered in its `credentials`
//! table first (fail closed: no record, no credential), and a revocation,
//! a task end or a purpose change computes its cascade there (task,
//! subtree over parent links, agent, node) and commits the revoked ids in
//! one transaction together with their entries in `revocation_log`, which
//! is both the feed verifiers follow without Redis and the **outbox** the
//! relay publishes to the revocation store (Redis deny set and stream).
//!
//! The relay retries until the store acknowledges; the store remembers
//! how far it got (`published`), so a store that lost writes (failover to
//! a replica that missed them) is caught up from its own mark, and a store
//! that lost everything (no epoch: FLUSHALL, restart without persistence)
//! is re-seeded whole before its epoch returns and verifiers trust it
//! again. Redis thus holds only what verifiers must refuse, never the live
//! credentials, and nothing revoked is lost because Redis was down,
//! read-only, flushed or replaced.

use std::sync::Arc;
use std::time::Duration;

use crate::error::BrokerError;
use crate::ledger::{Ledger, token_pair};
pub use crate::records::TaskCredential;
use crate::store::StoreError;
use crate::tasks::TaskStore;
use baton_core::{SpiffeId, TaskId};
use baton_revocation::{CredentialRecord, RevocationStore, Revoked, Target};

/// What an operator asks to revoke (the admin API's body).
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, rename_all = "snake_case")]
pub enum RevokeTarget {
    Credential(String),
    Subtree(String),
    Task(String),
    Agent(String),
    Node(String),
}

/// The revocation front of the broker.
#[derive(Debug)]
pub struct Revoker {
    store: Arc<dyn RevocationStore>,
    durable: Arc<dyn Ledger>,
    /// The secret engines whose leases die with the credentials revoked here.
    leases: std::sync::OnceLock<Arc<dyn LeaseReaper>>,
    /// Woken on every new durable revocation (feed long-polls and the
    /// relay wait on it).
    changed: tokio::sync::Notify,
    /// The highest `revocation_log` sequence the store acknowledged.
    published: tokio::sync::watch::Sender<u64>,
    /// Why the relay is behind, while it is.
    relay_error: std::sync::Mutex<Option<String>>,
    /// Set when the broker shuts down: feed long-polls answer at once.
    stopping: tokio::sync::watch::Sender<bool>,
    /// The log's end at the relay's last look (see `wake_feed_if_moved`).
    seen_seq: std::sync::atomic::AtomicU64,
    /// One more than the log's end when a follower past it was last
    /// warned about (0: never): any SVID can ask for the feed past the
    /// end, so the warning is logged once per end, not per request.
    warned_past_end: std::sync::atomic::AtomicU64,
}

/// Kills the secret leases among revoked credentials in the engines that
/// issued them ([`crate::secrets::Secrets`] is the one implementation).
/// Failures are the reaper's to retry: revocation itself has already
/// happened when it is called.
pub trait LeaseReaper: Send + Sync + std::fmt::Debug {
    fn revoke_leases<'a>(
        &'a self,
        revoked: &'a [Revoked],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>>;
}

/// Whether a revocation has reached the revocation store yet.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Propagation {
    /// True once the store acknowledged every revocation recorded so far.
    pub complete: bool,
    /// What the operator is told.
    pub message: String,
}

/// One step of the broker's own revocation feed.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeedPage {
    /// Names this log; a follower that saw another epoch starts over.
    pub epoch: String,
    /// The newest sequence number in this page (or the follower's `after`).
    pub seq: u64,
    /// Revoked ids with their expiry (unix seconds).
    pub entries: Vec<FeedEntry>,
    /// True when more entries wait beyond this page.
    pub more: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FeedEntry {
    pub id: String,
    pub expires_at: u64,
}

/// Most entries one feed page carries.
pub const FEED_PAGE: usize = 10_000;
/// Most outbox entries one relay step publishes.
const RELAY_PAGE: usize = 20_000;
/// How often the relay checks the store even when nothing new was
/// revoked (this bounds how long a flushed Redis stays empty).
/// Between two relay passes, at most; also how often the log's end is
/// read to wake the feed's long-polls when another broker on the same
/// datastore revoked something (so that reaches this broker's followers
/// within it).
pub const RELAY_TICK: Duration = Duration::from_millis(500);
/// Registry rows are kept this long past their expiry: as long as an ID
/// token's use is remembered ([`crate::oidc::REPLAY_MARGIN_SECS`]), the
/// clock difference brokers sharing a datastore are allowed. A broker whose
/// clock runs ahead by less than that prunes nothing another still takes
/// for live.
const PRUNE_GRACE_SECS: u64 = crate::oidc::REPLAY_MARGIN_SECS;

/// Why the relay could not publish (it retries).
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("revocation store: {0}")]
    Store(#[from] baton_revocation::RevocationError),
    #[error(transparent)]
    Datastore(#[from] StoreError),
    #[error("no randomness for a new log name: {0}")]
    Random(String),
}

/// A credential id as the registry holds it, from the forms operators
/// copy: ours (lower-case hex, a jti, `lease-...`), a serial as other tools
/// print it (`serial=7A3F...` from `openssl x509 -serial`, `7a:3f:...` from
/// `openssl x509 -text`, upper-case hex, a `0x` prefix). `None` for
/// anything else.
pub fn normalize_credential_id(raw: &str) -> Option<String> {
    let t = raw.trim();
    let (t, serial) = match t.get(..7) {
        Some(p) if p.eq_ignore_ascii_case("serial=") => (&t[7..], true),
        _ => match t.get(..2) {
            Some("0x" | "0X") => (&t[2..], true),
            _ => (t, false),
        },
    };
    if t.is_empty() || t.len() > 256 {
        return None;
    }
    if serial || t.contains(':') {
        // Hex bytes, optionally colon-separated (each group one byte).
        let mut hex = String::with_capacity(t.len());
        for group in t.split(':') {
            if group.is_empty()
                || (t.contains(':') && group.len() > 2)
                || !group.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return None;
            }
            if t.contains(':') && group.len() == 1 {
                hex.push('0');
            }
            hex.push_str(group);
        }
        let mut hex = hex.to_ascii_lowercase();
        if hex.len() % 2 == 1 {
            hex.insert(0, '0');
        }
        return Some(hex);
    }
    if !t
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return None;
    }
    // Every id Baton mints is lower-case; upper-case hex is a serial as
    // openssl prints it.
    if t.bytes().all(|b| b.is_ascii_hexdigit()) {
        let mut hex = t.to_ascii_lowercase();
        if hex.len() % 2 == 1 {
            hex.insert(0, '0');
        }
        return Some(hex);
    }
    Some(t.to_owned())
}

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Hook(format!(
        "revocation service unavailable ({e}); credentials are not issued while it is down"
    ))
}

/// The metric label of a revocation's target (never the id itself).
fn target_kind(t: &Target) -> &'static str {
    match t {
        Target::Credential(_) => "credential",
        Target::Task(_) => "task",
        Target::Subtree(_) => "subtree",
        Target::Agent(_) => "agent",
        Target::Node(_) => "node",
    }
}

impl Revoker {
    pub fn new(store: Arc<dyn RevocationStore>, durable: Arc<dyn Ledger>) -> Self {
        Self {
            store,
            durable,
            leases: std::sync::OnceLock::new(),
            changed: tokio::sync::Notify::new(),
            published: tokio::sync::watch::channel(0).0,
            relay_error: std::sync::Mutex::new(None),
            stopping: tokio::sync::watch::channel(false).0,
            seen_seq: std::sync::atomic::AtomicU64::new(0),
            warned_past_end: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The broker is shutting down: feed long-polls in flight answer now
    /// (with what they have) instead of holding the drain for their wait.
    pub fn begin_shutdown(&self) {
        self.stopping.send_replace(true);
        self.changed.notify_waiters();
    }

    fn is_stopping(&self) -> bool {
        *self.stopping.borrow()
    }

    /// The feed after `after` (0: from the start): revocations still in
    /// force, in order, at most [`FEED_PAGE`]. Waits up to `wait` for a new
    /// one when there is none yet.
    pub async fn feed(
        &self,
        after: u64,
        wait: Duration,
        now: u64,
    ) -> Result<FeedPage, BrokerError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            // Register interest before reading, so a revocation between the
            // read and the wait is not missed.
            let notified = self.changed.notified();
            let page = self.feed_page(after, now)?;
            if !page.entries.is_empty()
                || tokio::time::Instant::now() >= deadline
                || self.is_stopping()
            {
                return Ok(page);
            }
            // Woken by this broker's own revocations at once, and by
            // another broker's (on a shared datastore) when the relay's
            // next pass sees the log move.
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.feed_page(after, now);
            }
        }
    }

    /// Wakes the feed's long-polls when the datastore's log moved since
    /// the last look: another broker on the same datastore revoked
    /// something. One read per relay pass, whatever the number of waiters.
    fn wake_feed_if_moved(&self) {
        if let Ok(end) = self.last_seq()
            && self
                .seen_seq
                .swap(end, std::sync::atomic::Ordering::Relaxed)
                != end
        {
            self.changed.notify_waiters();
        }
    }

    fn feed_page(&self, after: u64, now: u64) -> Result<FeedPage, BrokerError> {
        let epoch = self.durable.epoch()?;
        let (mut rows, last) = self.durable.log_after(after, Some(now), FEED_PAGE + 1)?;
        let mut after = after;
        if after > last {
            // The follower saw entries this log no longer has: the
            // datastore was restored or failed over to a copy that lost
            // them, and what is revoked from now on takes their numbers
            // again. It is sent the whole log in force from the start
            // (it keeps what it holds, so nothing it refused comes back).
            let mark = last.saturating_add(1);
            if self
                .warned_past_end
                .swap(mark, std::sync::atomic::Ordering::Relaxed)
                != mark
            {
                tracing::warn!(
                    after,
                    last,
                    "a revocation feed follower is past the end of the log: the datastore was restored or lost writes; sending it the log from the start"
                );
            } else {
                tracing::debug!(
                    after,
                    last,
                    "a revocation feed follower is past the end of the log (warned already)"
                );
            }
            after = 0;
            rows = self.durable.log_after(0, Some(now), FEED_PAGE + 1)?.0;
        }
        let more = rows.len() > FEED_PAGE;
        let entries: Vec<FeedEntry> = rows
            .iter()
            .take(FEED_PAGE)
            .map(|r| FeedEntry {
                id: r.entry.id.clone(),
                expires_at: r.entry.expires_at,
            })
            .collect();
        let seq = match rows.get(..rows.len().min(FEED_PAGE)).and_then(<[_]>::last) {
            Some(r) => r.seq,
            // Nothing newer in force: the follower may skip to the end.
            None => after.max(last),
        };
        Ok(FeedPage {
            epoch,
            seq,
            entries,
            more,
        })
    }

    /// From now on, every revocation also kills the secret leases it covers
    /// in their engines. Set once; a second call is ignored.
    pub fn set_lease_reaper(&self, leases: Arc<dyn LeaseReaper>) {
        let _ = self.leases.set(leases);
    }

    /// Kills the secret leases among `revoked` in their engines (those that
    /// fail are retried by the sweeper).
    async fn reap_leases(&self, revoked: &[Revoked]) {
        if let Some(leases) = self.leases.get() {
            leases.revoke_leases(revoked).await;
        }
    }

    /// Registers credentials in the registry before they leave the broker.
    pub async fn register(
        &self,
        records: &[CredentialRecord],
        now: u64,
    ) -> Result<(), BrokerError> {
        self.register_blocking(records, now)
    }

    /// [`Revoker::register`] for a caller already off the async workers
    /// (it waits on the datastore).
    pub fn register_blocking(
        &self,
        records: &[CredentialRecord],
        now: u64,
    ) -> Result<(), BrokerError> {
        if records.is_empty() {
            return Ok(());
        }
        let refused = self.durable.register(records, now).map_err(unavailable)?;
        refused.map_err(|message| BrokerError::Forbidden {
            code: "revoked",
            message,
        })
    }

    /// Parses an operator's target, refusing malformed ids with the field at fault.
    pub fn parse_target(
        &self,
        t: &RevokeTarget,
        td: &baton_core::TrustDomain,
    ) -> Result<Target, BrokerError> {
        let bad = |field: &'static str, message: String| BrokerError::BadRequest {
            field: Some(field),
            message,
        };
        let spiffe = |field: &'static str, raw: &str| -> Result<SpiffeId, BrokerError> {
            let id = SpiffeId::parse(raw).map_err(|e| bad(field, format!("{field}: {e}")))?;
            if !id.is_member_of(td) {
                return Err(BrokerError::Forbidden {
                    code: "other_tenant",
                    message: format!(
                        "{id} belongs to another trust domain than {td}; this broker cannot revoke it"
                    ),
                });
            }
            Ok(id)
        };
        let cred = |field: &'static str, raw: &str| -> Result<String, BrokerError> {
            normalize_credential_id(raw).ok_or_else(|| {
                bad(
                    field,
                    format!(
                        "{field}: \"{}\" is not a credential id (a certificate serial in hex, \
                         plain or colon-separated as openssl prints it; a token jti; a lease id; \
                         see `baton task show TASK`)",
                        raw.escape_default()
                    ),
                )
            })
        };
        Ok(match t {
            RevokeTarget::Credential(id) => Target::Credential(cred("credential", id)?),
            RevokeTarget::Subtree(id) => Target::Subtree(cred("subtree", id)?),
            RevokeTarget::Task(id) => Target::Task(
                id.parse::<TaskId>()
                    .map_err(|e| bad("task", format!("task: {e}")))?,
            ),
            RevokeTarget::Agent(id) => Target::Agent(spiffe("agent", id)?),
            RevokeTarget::Node(id) => Target::Node(spiffe("node", id)?),
        })
    }

    /// Revokes `target`: computes what it covers from the registry (and,
    /// for a task, from the task store's tokens), commits it with its
    /// outbox entries in one transaction, and wakes the relay. A task's
    /// revocation also refuses every later registration in that task.
    /// Succeeds once the datastore has it, whether or not the store has it
    /// yet (see [`Revoker::propagation`]). Idempotent: revoking again
    /// returns the same ids. A target with no live credential is
    /// `NotFound`.
    pub async fn revoke(
        &self,
        target: &Target,
        tasks: &dyn TaskStore,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Revoked>, BrokerError> {
        // A task store in this database has every token and certificate
        // in the registry (schema 8 on), so the registry's task index
        // covers them; another store's tokens are added as it lists them.
        let same_db = tasks.registry_identity() == Some(self.durable.identity());
        let mut known: Vec<Revoked> = Vec::new();
        if let Target::Task(task) = target
            && !same_db
        {
            for t in tasks.tokens_for_task(task)? {
                if t.exp > now {
                    known.extend(token_pair(&t));
                }
            }
        }
        let mut all = self.durable.revoke(target, &known, reason, now)?;
        if let Target::Credential(id) | Target::Subtree(id) = target {
            let seen: std::collections::HashSet<String> =
                all.iter().map(|r| r.id.clone()).collect();
            all.extend(
                self.subtree_of_certificate(id, tasks, reason, now)?
                    .into_iter()
                    .filter(|r| !seen.contains(&r.id)),
            );
        }
        self.changed.notify_waiters();
        if let Target::Task(task) = target {
            // What the task's entry covers, for the answer and the leases
            // to reap: read after the commit, off the relay's path.
            let mut own = self.durable.live_task_credentials(task, now)?;
            let seen: std::collections::HashSet<String> =
                own.iter().map(|r| r.id.clone()).collect();
            own.extend(all.into_iter().filter(|r| !seen.contains(&r.id)));
            all = own;
        }
        if all.is_empty() && !matches!(target, Target::Task(_)) {
            return Err(BrokerError::NotFound(format!(
                "nothing to revoke: {target} matches no live credential"
            )));
        }
        if all.is_empty() {
            return Err(BrokerError::NotFound(format!(
                "nothing to revoke: {target} has no live credential"
            )));
        }
        tracing::info!(%target, count = all.len(), reason, "revoked");
        baton_ops::metrics().revoked(target_kind(target), all.len());
        self.reap_leases(&all).await;
        Ok(all)
    }

    /// A task certificate revoked by serial leaves its token unusable (the
    /// token is bound to it, and a renewal needs it live), so what was
    /// minted from that token goes with it: the token, the grants it
    /// handed on (redeemed or not), the tokens minted from them, and the
    /// secret leases. Revoking a holder's certificate ends its line of
    /// delegation, as the operator means. Only for the token's current
    /// certificate: the token of one renewed away lives on under its new
    /// certificate.
    fn subtree_of_certificate(
        &self,
        serial: &str,
        tasks: &dyn TaskStore,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Revoked>, BrokerError> {
        let Some((jti, _leases)) = self.durable.certificate_leases(serial, now)? else {
            return Ok(Vec::new());
        };
        // The token's current certificate, or nothing to do.
        let current = tasks
            .get_token(&jti)?
            .is_some_and(|t| t.cert_serial == serial);
        if !current {
            return Ok(Vec::new());
        }
        let below = self
            .durable
            .revoke(&Target::Subtree(jti.clone()), &[], reason, now)?;
        tracing::info!(serial, jti = %jti, count = below.len(), "revoked what a revoked task certificate's token handed on");
        Ok(below)
    }

    /// Revokes every credential issued so far in a task but not the task
    /// itself: after a purpose change the same task goes on with new grants.
    pub async fn revoke_issued(
        &self,
        task: &TaskId,
        tasks: &dyn TaskStore,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Revoked>, BrokerError> {
        let tokens: Vec<_> = tasks
            .tokens_for_task(task)?
            .into_iter()
            .filter(|t| t.exp > now)
            .collect();
        let all = self.durable.revoke_tokens(&tokens, reason, now)?;
        self.changed.notify_waiters();
        tracing::info!(task = %task, count = all.len(), reason, "revoked the task's credentials");
        baton_ops::metrics().revoked("purpose", all.len());
        self.reap_leases(&all).await;
        Ok(all)
    }

    /// Revokes credentials a new one replaces (a renewed task
    /// certificate's predecessor), durably, before the new one is handed
    /// out.
    pub async fn supersede(
        &self,
        old: &[Revoked],
        reason: &str,
        now: u64,
    ) -> Result<usize, BrokerError> {
        self.supersede_blocking(old, reason, now)
    }

    /// [`Revoker::supersede`] for a caller already off the async workers:
    /// how many of `old` this call revoked (the others were revoked
    /// already, or have expired).
    pub fn supersede_blocking(
        &self,
        old: &[Revoked],
        reason: &str,
        now: u64,
    ) -> Result<usize, BrokerError> {
        if old.is_empty() {
            return Ok(0);
        }
        let n = self.durable.mark(old, reason, now)?;
        self.changed.notify_waiters();
        Ok(n)
    }

    /// Waits up to `wait` for the relay to publish everything recorded so
    /// far, and says where propagation stands.
    pub async fn propagation(&self, wait: Duration) -> Result<Propagation, BrokerError> {
        let target = self.last_seq()?;
        let mut rx = self.published.subscribe();
        let reached = tokio::time::timeout(wait, rx.wait_for(|p| *p >= target))
            .await
            .is_ok_and(|r| r.is_ok());
        if reached {
            return Ok(Propagation {
                complete: true,
                message: "recorded and propagated to the revocation store".into(),
            });
        }
        let why = self
            .relay_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_else(|| "the relay is catching up".into());
        Ok(Propagation {
            complete: false,
            message: format!(
                "recorded; propagating to the revocation store ({why}); verifiers following the broker's own feed already have it, the relay retries until the store acknowledges"
            ),
        })
    }

    /// Why the relay is behind the datastore, if it is (readiness).
    pub fn relay_behind(&self) -> Option<String> {
        self.relay_error.lock().ok().and_then(|e| e.clone())
    }

    fn last_seq(&self) -> Result<u64, StoreError> {
        self.durable.last_seq()
    }

    fn log_name(&self) -> Result<String, StoreError> {
        self.durable.epoch()
    }

    /// One pass of the relay: re-seeds a store that lost its data, then
    /// publishes the outbox from the store's own mark up to the end.
    /// Returns the sequence the store now holds.
    pub async fn relay_once(&self, now: u64) -> Result<u64, RelayError> {
        let mut log = self.log_name()?;
        let health = self.store.health().await?;
        if health.empty_since_seed {
            // Everything in force first, the epoch last (the store's seed
            // does that), then the mark: followers trust the store only
            // once it holds the whole deny set.
            let upto = self.last_seq()?;
            let live = self.live_revocations(now)?;
            self.store.seed(&live, now).await?;
            self.store
                .publish(&[], "re-seeded", &log, upto, now)
                .await?;
            tracing::warn!(
                count = live.len(),
                "revocation store had lost its data; re-seeded from the datastore"
            );
        }
        let mut acked = self.store.published(&log).await?;
        let end = self.last_seq()?;
        if acked > end {
            // The store holds this log further than the datastore's log
            // goes (read after the mark, and the log's end never moves
            // back otherwise): the datastore was restored, or failed over
            // to a copy that lost writes, and new revocations would take
            // numbers followers already passed. The log is named anew, so
            // every follower and store starts it over (keeping what they
            // refused), and it is published whole under its new name.
            let fresh =
                crate::error::random_hex::<16>().map_err(|e| RelayError::Random(e.to_string()))?;
            log = self.durable.restart_log(&log, &fresh)?;
            self.published.send_replace(0);
            tracing::error!(
                store = acked,
                datastore = end,
                log = %log,
                "the revocation store is ahead of the datastore's log: the datastore was restored or lost writes; the log is started over under a new name"
            );
            acked = self.store.published(&log).await?;
        }
        loop {
            let (page, end) = self.durable.log_after(acked, None, RELAY_PAGE)?;
            let Some(last) = page.last().map(|r| r.seq) else {
                if end > acked {
                    // What lay between was pruned (expired): move the mark.
                    self.store.publish(&[], "", &log, end, now).await?;
                    acked = end;
                }
                break;
            };
            // One store call per run of entries with the same reason.
            let mut i = 0;
            while i < page.len() {
                let reason = page[i].reason.clone();
                let mut j = i;
                let mut batch = Vec::new();
                while j < page.len() && page[j].reason == reason {
                    batch.push(page[j].entry.clone());
                    j += 1;
                }
                let upto = page[j - 1].seq;
                self.store.publish(&batch, &reason, &log, upto, now).await?;
                i = j;
            }
            acked = last;
            self.published.send_replace(acked);
        }
        self.published.send_replace(acked);
        Ok(acked)
    }

    /// Runs the relay until `stopping` turns true (or until aborted): after
    /// every new revocation and every [`RELAY_TICK`], with a bounded
    /// backoff while the store fails. Prunes expired registry rows now and
    /// then. Stopping never cuts a publish: it is noticed between passes,
    /// and one last pass (bounded by `last_pass`) publishes what the
    /// requests drained during shutdown revoked; what it cannot publish
    /// stays in the outbox for the next start.
    pub fn spawn_relay(
        self: &Arc<Self>,
        mut stopping: tokio::sync::watch::Receiver<bool>,
        last_pass: Duration,
    ) -> tokio::task::JoinHandle<()> {
        // The feed's long-polls are woken by a watch of their own, so that
        // a relay held up by Redis (a connect timeout, a backoff) does not
        // hold up another broker's revocations on their way to them.
        let watcher = self.clone();
        let mut watch_stop = stopping.clone();
        tokio::spawn(async move {
            loop {
                watcher.wake_feed_if_moved();
                tokio::select! {
                    () = tokio::time::sleep(RELAY_TICK) => {}
                    _ = watch_stop.wait_for(|s| *s) => break,
                }
            }
        });
        let this = self.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(50);
            let mut last_prune = 0u64;
            loop {
                if *stopping.borrow() {
                    break;
                }
                let notified = this.changed.notified();
                let now = baton_revocation::system_now();
                match this.relay_once(now).await {
                    Ok(_) => {
                        backoff = Duration::from_millis(50);
                        if let Ok(mut e) = this.relay_error.lock()
                            && let Some(was) = e.take()
                        {
                            tracing::info!(was = %was, "revocation relay caught up");
                        }
                        if now >= last_prune + 60 {
                            last_prune = now;
                            if let Err(e) = this.prune(now) {
                                tracing::warn!(error = %e, "pruning expired credentials failed");
                            }
                        }
                        tokio::select! {
                            _ = tokio::time::timeout(RELAY_TICK, notified) => {}
                            _ = stopping.wait_for(|s| *s) => {}
                        }
                    }
                    Err(e) => {
                        baton_ops::metrics().store_error("redis");
                        let msg = e.to_string();
                        if let Ok(mut slot) = this.relay_error.lock() {
                            if slot.as_deref() != Some(msg.as_str()) {
                                tracing::warn!(error = %msg, "revocation relay behind; retrying");
                            }
                            *slot = Some(msg);
                        }
                        tokio::select! {
                            () = tokio::time::sleep(backoff) => {}
                            _ = stopping.wait_for(|s| *s) => {}
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                }
            }
            // The last pass: what the requests drained at shutdown revoked
            // is published before the process exits, retried within the
            // grace while the store refuses it (down, read-only, failing
            // over); past the grace the outbox keeps it for the next start.
            let last = async {
                let mut backoff = Duration::from_millis(50);
                let mut said: Option<String> = None;
                loop {
                    match this.relay_once(baton_revocation::system_now()).await {
                        Ok(upto) => return upto,
                        Err(e) => {
                            let msg = e.to_string();
                            if said.as_deref() != Some(msg.as_str()) {
                                tracing::warn!(error = %msg, "revocation relay's last pass failed; retrying within the shutdown grace");
                                said = Some(msg);
                            }
                            tokio::time::sleep(backoff).await;
                            backoff = (backoff * 2).min(Duration::from_millis(500));
                        }
                    }
                }
            };
            match tokio::time::timeout(last_pass, last).await {
                Ok(upto) => tracing::info!(published_upto = upto, "revocation relay stopped"),
                Err(_) => tracing::warn!(
                    ?last_pass,
                    "revocation relay stopped behind: its last pass did not succeed within the shutdown grace; the next start publishes the rest"
                ),
            }
        })
    }

    /// Forgets registry rows, revocations and outbox entries past their
    /// expiry (plus a grace). Task tombstones are kept (one short row per
    /// ended task).
    pub fn prune(&self, now: u64) -> Result<(), StoreError> {
        self.durable.prune(now.saturating_sub(PRUNE_GRACE_SECS))
    }

    /// The token task certificate `serial` is bound to, and the unexpired
    /// secret leases taken with that token (revoked or not); `None` for a
    /// serial that is no task certificate.
    pub fn certificate_leases(
        &self,
        serial: &str,
        now: u64,
    ) -> Result<Option<(String, Vec<Revoked>)>, StoreError> {
        self.durable.certificate_leases(serial, now)
    }

    /// The task whose credentials `target` names, where one task holds
    /// them all: the task itself, or the task of the token a credential
    /// or subtree id names (a token's jti, or its certificate's serial).
    /// `None` for an agent or a node, and for an id no token of this
    /// store is known by.
    pub fn task_of(
        &self,
        target: &Target,
        tasks: &dyn TaskStore,
        now: u64,
    ) -> Result<Option<TaskId>, StoreError> {
        let id = match target {
            Target::Task(t) => return Ok(Some(t.clone())),
            Target::Credential(id) | Target::Subtree(id) => id,
            _ => return Ok(None),
        };
        if let Some(t) = tasks.get_token(id)? {
            return Ok(Some(t.task_id));
        }
        match self.durable.certificate_leases(id, now)? {
            Some((jti, _)) => Ok(tasks.get_token(&jti)?.map(|t| t.task_id)),
            None => Ok(None),
        }
    }

    /// Whether the durable table holds `id` as revoked (the broker's own
    /// check, independent of the store).
    pub fn durably_revoked(&self, id: &str, now: u64) -> Result<bool, StoreError> {
        self.durable.durably_revoked(id, now)
    }

    /// Every credential registered under `task` (oldest first), with
    /// whether it is revoked: what `baton task show` lists and `baton
    /// revoke credential` takes.
    pub fn task_credentials(&self, task: &TaskId) -> Result<Vec<TaskCredential>, StoreError> {
        self.durable.task_credentials(task)
    }

    /// Every durable revocation still in force.
    pub fn live_revocations(&self, now: u64) -> Result<Vec<Revoked>, StoreError> {
        self.durable.live_revocations(now)
    }

    /// Every revocation in force, and every live credential of each
    /// revoked task (a task's revocation is one entry keyed by the task,
    /// which names none of them): what a starting broker must have killed,
    /// such as the secret leases a previous run could not.
    pub fn revoked_credentials(&self, now: u64) -> Result<Vec<Revoked>, StoreError> {
        let mut all = self.durable.live_revocations(now)?;
        let tasks: Vec<TaskId> = all
            .iter()
            .filter(|r| r.kind == baton_revocation::CredKind::Task)
            .filter_map(|r| r.id.parse().ok())
            .collect();
        for task in &tasks {
            all.extend(self.durable.live_task_credentials(task, now)?);
        }
        Ok(all)
    }

    /// Whether the datastore serves reads and writes now (readiness).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.durable.ping()
    }
}

/// The broker's own revocation check for tokens presented at a hop: its
/// durable table, no network.
#[derive(Debug)]
pub struct DurableCheck(pub Arc<Revoker>);

impl baton_verify::RevocationCheck for DurableCheck {
    fn is_revoked(&self, jti: &str, task: &TaskId) -> bool {
        // Fail closed: a datastore error counts as revoked. The task's own
        // deny entry covers a token the registry does not hold.
        let now = baton_revocation::system_now();
        baton_revocation::is_denied(
            |id| self.0.durably_revoked(id, now).unwrap_or(true),
            jti,
            task,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{cover_list, cover_reset, cover_resolve, register_tx};
    use crate::store::{SqliteStore, to_i64};
    use baton_revocation::CredKind;
    use rusqlite::params;

    fn task(n: u8) -> TaskId {
        TaskId::from_random([n; 16])
    }

    fn rec(id: &str, task: Option<TaskId>, parent: Option<&str>, exp: u64) -> CredentialRecord {
        CredentialRecord {
            id: id.to_owned(),
            kind: CredKind::Token,
            task,
            agent: None,
            node: None,
            parent: parent.map(str::to_owned),
            expires_at: exp,
        }
    }

    fn covered(store: &SqliteStore, target: &Target, now: u64) -> Vec<String> {
        store
            .with(|c| {
                let tx = c.transaction()?;
                cover_reset(&tx)?;
                cover_resolve(&tx, target, now)?;
                let mut ids: Vec<String> = cover_list(&tx)?.into_iter().map(|r| r.id).collect();
                ids.sort();
                Ok(ids)
            })
            .unwrap()
    }

    #[test]
    fn a_task_covers_its_own_credentials_and_what_was_minted_from_them_elsewhere() {
        let store = SqliteStore::in_memory().unwrap();
        let (now, exp) = (1_000, 2_000);
        let records = [
            rec("g1", Some(task(0xa)), None, exp),
            rec("t1", Some(task(0xa)), Some("g1"), exp),
            rec("c1", Some(task(0xa)), Some("t1"), exp),
            // Minted from task A's token outside the task, and a child of it.
            rec("x1", Some(task(0xb)), Some("t1"), exp),
            rec("x2", None, Some("x1"), exp),
            // Task A's, but expired: nothing to refuse.
            rec("old", Some(task(0xa)), None, now),
            // Unrelated.
            rec("b1", Some(task(0xb)), None, exp),
            rec("b2", Some(task(0xb)), Some("b1"), exp),
        ];
        store
            .with(|c| {
                let tx = c.transaction()?;
                register_tx(&tx, &records[..5], now)?.unwrap();
                register_tx(&tx, &records[6..], now)?.unwrap();
                tx.execute(
                    "INSERT INTO credentials (id, kind, task, expires_at) VALUES ('old', 'token', ?1, ?2)",
                    params![task(0xa).as_str(), to_i64(now)],
                )?;
                tx.commit()?;
                Ok(())
            })
            .unwrap();
        assert_eq!(
            covered(&store, &Target::Task(task(0xa)), now),
            ["c1", "g1", "t1", "x1", "x2"]
        );
        // The generic walk over parent links gives the same answer for the
        // same roots (control for the task shortcut).
        assert_eq!(
            covered(&store, &Target::Subtree("g1".to_owned()), now),
            ["c1", "g1", "t1", "x1", "x2"]
        );
        assert_eq!(
            covered(&store, &Target::Task(task(0xb)), now),
            ["b1", "b2", "x1", "x2"]
        );
        assert!(covered(&store, &Target::Task(task(0xc)), now).is_empty());
    }

    /// A starting broker kills the secret leases a previous run could not
    /// (their engine was down when the task ended): a task's revocation is
    /// one entry keyed by the task, so the credentials under it, the
    /// leases among them, are looked up from it. The control: a lease of a
    /// task still running is not among them.
    #[tokio::test]
    async fn what_a_starting_broker_must_kill_includes_the_leases_of_ended_tasks() {
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let revoker = Revoker::new(
            Arc::new(baton_revocation::MemoryStore::new()),
            store.clone(),
        );
        let now = baton_revocation::system_now();
        let lease = |id: &str, t: u8| CredentialRecord {
            kind: CredKind::SecretLease,
            ..rec(id, Some(task(t)), Some("tok"), now + 600)
        };
        store
            .with(|c| {
                let tx = c.transaction()?;
                register_tx(&tx, &[lease("lease-a", 0xa), lease("lease-b", 0xb)], now)?.unwrap();
                tx.commit()?;
                Ok(())
            })
            .unwrap();
        revoker
            .revoke(&Target::Task(task(0xa)), store.as_ref(), "ended", now)
            .await
            .unwrap();
        let must_kill = revoker.revoked_credentials(now).unwrap();
        let leases: Vec<&str> = must_kill
            .iter()
            .filter(|r| r.kind == CredKind::SecretLease)
            .map(|r| r.id.as_str())
            .collect();
        assert_eq!(leases, ["lease-a"], "{must_kill:?}");
        // The revocations table alone names the task, not the lease.
        assert!(
            !revoker
                .live_revocations(now)
                .unwrap()
                .iter()
                .any(|r| r.kind == CredKind::SecretLease)
        );
    }

    /// A task's revocation is one deny entry keyed by the task (plus what
    /// was minted from it in other tasks, one by one), and still refuses
    /// every credential of the task: at the broker, for new registrations
    /// under it, and at a verifier that follows what the relay published.
    #[tokio::test]
    async fn a_task_is_revoked_by_one_entry_that_covers_each_of_its_credentials() {
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let memory = Arc::new(baton_revocation::MemoryStore::new());
        let revoker = Revoker::new(memory.clone(), store.clone());
        let now = baton_revocation::system_now();
        let exp = now + 1_000;
        let records = [
            rec("g1", Some(task(0xa)), None, exp),
            rec("t1", Some(task(0xa)), Some("g1"), exp + 5),
            rec("c1", Some(task(0xa)), Some("t1"), exp),
            rec("x1", Some(task(0xb)), Some("t1"), exp),
            rec("x2", None, Some("x1"), exp),
            rec("b1", Some(task(0xb)), None, exp),
            rec("b2", Some(task(0xb)), Some("b1"), exp),
        ];
        store
            .with(|c| {
                let tx = c.transaction()?;
                register_tx(&tx, &records, now)?.unwrap();
                tx.commit()?;
                Ok(())
            })
            .unwrap();
        let mut got: Vec<String> = revoker
            .revoke(&Target::Task(task(0xa)), store.as_ref(), "ended", now)
            .await
            .unwrap()
            .into_iter()
            .map(|r| r.id)
            .collect();
        got.sort();
        assert_eq!(got, ["c1", "g1", "t1", "x1", "x2"]);
        // Written: the task's entry (until its last credential expires)
        // and the two minted outside it; not one row per credential.
        let rows: Vec<(String, String, i64)> = store
            .with(|c| {
                let mut s =
                    c.prepare("SELECT id, kind, expires_at FROM revocation_log ORDER BY id")?;
                let v = s
                    .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(v)
            })
            .unwrap();
        let a = task(0xa).as_str().to_owned();
        assert_eq!(
            rows,
            [
                (a.clone(), "task".to_owned(), to_i64(exp + 5)),
                ("x1".to_owned(), "token".to_owned(), to_i64(exp)),
                ("x2".to_owned(), "token".to_owned(), to_i64(exp)),
            ]
        );
        for id in ["g1", "t1", "c1", "x1", "x2"] {
            assert!(revoker.durably_revoked(id, now).unwrap(), "{id}");
        }
        for id in ["b1", "b2"] {
            assert!(!revoker.durably_revoked(id, now).unwrap(), "{id}");
        }
        // Nothing new under the task or its credentials; the other task
        // goes on (control).
        let register = |r: CredentialRecord| {
            store
                .with(|c| {
                    let tx = c.transaction()?;
                    let out = register_tx(&tx, &[r], now)?;
                    tx.commit()?;
                    Ok(out)
                })
                .unwrap()
        };
        let refused = register(rec("y1", Some(task(0xb)), Some("c1"), exp)).unwrap_err();
        assert!(refused.contains("c1, which is revoked"), "{refused}");
        assert!(register(rec("a9", Some(task(0xa)), None, exp)).is_err());
        register(rec("b3", Some(task(0xb)), Some("b1"), exp)).unwrap();
        // `task show` marks each of the task's credentials revoked.
        let listed = revoker.task_credentials(&task(0xa)).unwrap();
        assert_eq!(listed.len(), 3);
        assert!(listed.iter().all(|c| c.revoked));
        assert!(
            revoker
                .task_credentials(&task(0xb))
                .unwrap()
                .iter()
                .any(|c| !c.revoked)
        );
        // Idempotent: the same ids again, and no new outbox row.
        assert_eq!(
            revoker
                .revoke(&Target::Task(task(0xa)), store.as_ref(), "again", now)
                .await
                .unwrap()
                .len(),
            5
        );
        // A verifier holding what the relay published refuses every
        // credential of the task by its task, and nothing of the other.
        revoker.relay_once(now).await.unwrap();
        use baton_verify::RevocationCheck;
        let denied = |id: &str, t: u8| RevocationCheck::is_revoked(memory.as_ref(), id, &task(t));
        for id in ["g1", "t1", "c1"] {
            assert!(denied(id, 0xa), "{id}");
        }
        assert!(denied("x1", 0xb));
        assert!(!denied("b1", 0xb));
        assert!(!denied("b3", 0xb));
        // The broker's own check at a hop refuses by task too.
        let check = DurableCheck(Arc::new(revoker));
        assert!(check.is_revoked("not-registered", &task(0xa)));
        assert!(!check.is_revoked("b1", &task(0xb)));
    }
}

#[cfg(test)]
mod shared_feed_tests {
    use super::*;
    use crate::ledger::register_tx;
    use crate::store::SqliteStore;

    /// Two brokers on one datastore: a follower long-polling broker B's
    /// feed hears of a revocation made at broker A at B's next relay pass,
    /// not at the end of its wait. The control: a poll with nothing new
    /// waits its whole wait.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_revocation_at_another_broker_wakes_this_brokers_feed() {
        let store = Arc::new(SqliteStore::in_memory().unwrap());
        let a = Arc::new(Revoker::new(
            Arc::new(baton_revocation::MemoryStore::new()),
            store.clone(),
        ));
        let b = Arc::new(Revoker::new(
            Arc::new(baton_revocation::MemoryStore::new()),
            store.clone(),
        ));
        let now = baton_revocation::system_now();
        let task: TaskId = TaskId::from_random([7; 16]);
        let record = CredentialRecord {
            id: "t-shared".into(),
            kind: baton_revocation::CredKind::Token,
            task: Some(task.clone()),
            agent: None,
            node: None,
            parent: None,
            expires_at: now + 600,
        };
        store
            .with(|c| {
                let tx = c.transaction()?;
                register_tx(&tx, &[record], now)?.unwrap();
                tx.commit()?;
                Ok(())
            })
            .unwrap();
        let after = b.feed(0, Duration::ZERO, now).await.unwrap().seq;
        // Control: nothing new, the whole (short) wait.
        let t = std::time::Instant::now();
        let idle = b
            .feed(after, Duration::from_millis(600), now)
            .await
            .unwrap();
        assert!(idle.entries.is_empty());
        assert!(t.elapsed() >= Duration::from_millis(600));

        let (_stop, stop_rx) = tokio::sync::watch::channel(false);
        let relay = b.spawn_relay(stop_rx, Duration::ZERO);
        let follower = {
            let b = b.clone();
            tokio::spawn(async move {
                let t = std::time::Instant::now();
                let page = b.feed(after, Duration::from_secs(60), now).await.unwrap();
                (page, t.elapsed())
            })
        };
        tokio::time::sleep(Duration::from_millis(300)).await;
        a.revoke(
            &Target::Credential("t-shared".into()),
            store.as_ref(),
            "test",
            now,
        )
        .await
        .unwrap();
        let (page, waited) = tokio::time::timeout(Duration::from_secs(30), follower)
            .await
            .expect("the follower was never woken")
            .unwrap();
        assert!(
            page.entries.iter().any(|e| e.id == "t-shared"),
            "{:?}",
            page.entries
        );
        // Within a few relay passes, not at the end of the minute's wait.
        assert!(waited < Duration::from_secs(10), "{waited:?}");
        relay.abort();
    }
}

#[cfg(test)]
mod restore_tests {
    use super::*;
    use crate::ledger::register_tx;
    use crate::store::SqliteStore;
    use baton_revocation::CredKind;
    use baton_verify::RevocationCheck;

    fn registered(store: &SqliteStore, id: &str, exp: u64, now: u64) {
        store
            .with(|c| {
                let tx = c.transaction()?;
                register_tx(
                    &tx,
                    &[CredentialRecord {
                        id: id.to_owned(),
                        kind: CredKind::Token,
                        task: None,
                        agent: None,
                        node: None,
                        parent: None,
                        expires_at: exp,
                    }],
                    now,
                )?
                .unwrap();
                tx.commit()?;
                Ok(())
            })
            .unwrap();
    }

    /// The datastore is restored from a backup taken before the last
    /// revocation (or fails over to a copy that lost it): the revocation
    /// store and the feed's followers hold the log further than it now
    /// goes, and the next revocation would take a number they already
    /// passed. The relay (which runs at start, before anything is served)
    /// finds the store ahead of the log and names the log anew, so the
    /// store and every follower start it over and the next revocation
    /// reaches them; what the restore lost stays refused where it was
    /// seen. A follower past the end is sent the log from its start. The
    /// control: before the restore, each revocation carried as it comes
    /// under one name.
    #[tokio::test]
    async fn revocations_after_the_datastore_is_restored_still_reach_every_verifier() {
        let dir = tempfile::tempdir().unwrap();
        let now = baton_revocation::system_now();
        let exp = now + 1_000;
        let memory = Arc::new(baton_revocation::MemoryStore::new());
        let other_task = TaskId::from_random([7; 16]);
        let denied = |id: &str| RevocationCheck::is_revoked(memory.as_ref(), id, &other_task);
        let feed_ids = |page: &FeedPage| {
            page.entries
                .iter()
                .map(|e| e.id.clone())
                .collect::<Vec<_>>()
        };
        let backup = dir.path().join("backup.db");
        let before = {
            let store = Arc::new(SqliteStore::open(&dir.path().join("broker.db")).unwrap());
            let revoker = Revoker::new(memory.clone(), store.clone());
            for id in ["a", "b", "c"] {
                registered(&store, id, exp, now);
            }
            revoker
                .revoke(&Target::Credential("a".into()), store.as_ref(), "test", now)
                .await
                .unwrap();
            store
                .with(|c| {
                    c.execute("VACUUM INTO ?1", [backup.to_str().unwrap()])?;
                    Ok(())
                })
                .unwrap();
            revoker
                .revoke(&Target::Credential("b".into()), store.as_ref(), "test", now)
                .await
                .unwrap();
            // Control: carried as they come, under one name.
            assert_eq!(revoker.relay_once(now).await.unwrap(), 2);
            assert!(denied("a") && denied("b") && !denied("c"));
            let page = revoker.feed(1, Duration::ZERO, now).await.unwrap();
            assert_eq!((page.seq, feed_ids(&page)), (2, vec!["b".to_owned()]));
            assert_eq!(revoker.relay_once(now).await.unwrap(), 2);
            page.epoch
        };

        // Restored: the log ends at 1 again.
        let store = Arc::new(SqliteStore::open(&backup).unwrap());
        let revoker = Revoker::new(memory.clone(), store.clone());
        assert_eq!(revoker.log_name().unwrap(), before);
        // A follower past the end is sent the log from its start.
        let page = revoker.feed(2, Duration::ZERO, now).await.unwrap();
        assert_eq!((page.seq, feed_ids(&page)), (1, vec!["a".to_owned()]));
        // The relay at start finds its store ahead and names the log anew.
        revoker.relay_once(now).await.unwrap();
        let after = revoker.log_name().unwrap();
        assert_ne!(after, before, "the restored log kept its name");
        // "c" is revoked as number 2, a number the store had passed.
        revoker
            .revoke(&Target::Credential("c".into()), store.as_ref(), "test", now)
            .await
            .unwrap();
        assert_eq!(revoker.last_seq().unwrap(), 2);
        revoker.relay_once(now).await.unwrap();
        assert!(
            denied("c"),
            "a revocation after the restore never reached the store"
        );
        assert!(denied("b"), "what the restore lost came back");
        // A follower of the old name at 2 sees the new name and reads the
        // log from the start, "c" in it.
        let page = revoker.feed(2, Duration::ZERO, now).await.unwrap();
        assert_eq!(page.epoch, after);
        let page = revoker.feed(0, Duration::ZERO, now).await.unwrap();
        assert_eq!(feed_ids(&page), ["a", "c"]);
        // Named anew once: a second broker's relay finds the store level.
        assert_eq!(revoker.relay_once(now).await.unwrap(), 2);
        assert_eq!(revoker.log_name().unwrap(), after);
    }
}

#[cfg(test)]
mod migration_tests {
    use super::*;
    use crate::ledger::{cover_list, cover_reset, cover_resolve};
    use crate::store::SqliteStore;
    use crate::tasks::TokenRecord;
    use rusqlite::params;

    /// A token stored before the registry existed (schema < 7) is in the
    /// registry after schema 8, under its task, with its certificate under
    /// it: a task's cascade covers both without reading `tokens`.
    #[test]
    fn tokens_from_before_the_registry_are_backfilled_into_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("broker.sqlite");
        let t = TaskId::from_random([0xa; 16]);
        let (now, exp) = (1_000, 2_000);
        let record = TokenRecord {
            jti: "0a0b".into(),
            task_id: t.clone(),
            spiffe_id: SpiffeId::parse("spiffe://example.org/agents/researcher").unwrap(),
            depth: 1,
            parent_jti: None,
            exp,
            cert_thumbprint: "th".into(),
            cert_serial: "7a3f".into(),
            aud: vec![],
            scope: None,
            risk_ceiling: None,
        };
        let covered = |store: &SqliteStore| -> Vec<(String, String, u64)> {
            store
                .with(|c| {
                    let tx = c.transaction()?;
                    cover_reset(&tx)?;
                    cover_resolve(&tx, &Target::Task(t.clone()), now)?;
                    let mut v: Vec<_> = cover_list(&tx)?
                        .into_iter()
                        .map(|r| (r.id, r.kind.code().to_owned(), r.expires_at))
                        .collect();
                    v.sort();
                    Ok(v)
                })
                .unwrap()
        };
        {
            let store = SqliteStore::open(&path).unwrap();
            store
                .with(|c| {
                    c.execute(
                        "INSERT INTO tokens (jti, task_id, record) VALUES (?1, ?2, ?3)",
                        params![
                            record.jti,
                            t.as_str(),
                            serde_json::to_string(&record).unwrap()
                        ],
                    )?;
                    // As if the database predated schema 8 (and what came
                    // after it).
                    c.execute("DELETE FROM schema_version WHERE version >= 8", [])?;
                    c.execute("DROP TABLE approvals", [])?;
                    c.execute("ALTER TABLE grants DROP COLUMN delivery", [])?;
                    c.execute("ALTER TABLE grants DROP COLUMN redelivered_at", [])?;
                    Ok(())
                })
                .unwrap();
            // Control: the token is not in the registry yet.
            assert!(covered(&store).is_empty());
        }
        let store = SqliteStore::open(&path).unwrap();
        assert_eq!(
            covered(&store),
            [
                ("0a0b".to_owned(), "token".to_owned(), exp),
                ("7a3f".to_owned(), "x509".to_owned(), exp),
            ]
        );
        let parent: Option<String> = store
            .with(|c| {
                Ok(c.query_row(
                    "SELECT parent FROM credentials WHERE id = '7a3f'",
                    [],
                    |r| r.get(0),
                )?)
            })
            .unwrap();
        assert_eq!(parent.as_deref(), Some("0a0b"));
    }
}

#[cfg(test)]
mod id_tests {
    use super::normalize_credential_id as n;

    #[test]
    fn serials_as_other_tools_print_them_name_the_same_credential() {
        let ours = "7a3f0b";
        for form in [
            "7a3f0b",
            "7A3F0B",
            "serial=7A3F0B",
            "SERIAL=7a3f0b",
            "0x7a3f0b",
            "7a:3f:0b",
            "7A:3F:0B",
            "  7a:3f:0b\n",
            "7a:3f:b",
        ] {
            assert_eq!(n(form).as_deref(), Some(ours), "{form:?}");
        }
        // Ids that are not hex are left alone.
        assert_eq!(n("lease-0123abcd").as_deref(), Some("lease-0123abcd"));
    }

    #[test]
    fn garbage_is_not_an_id() {
        for bad in [
            "",
            "zz:11",
            "7a::3f",
            "7a3:f0",
            "serial=",
            "serial=xyz",
            "a b",
            "x;y",
            "0x",
        ] {
            assert_eq!(n(bad), None, "{bad:?}");
        }
        assert_eq!(n(&"a".repeat(257)), None);
    }
}
