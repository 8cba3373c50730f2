//! Following the broker's own revocation feed (`GET /v1/revocations/feed`),
//! for verifiers of a broker without Redis (`baton dev`, a single broker).
//!
//! The follower long-polls the broker over mTLS with the verifier's SVID
//! and keeps the revoked ids in memory, so every check is a local lookup.
//! A different epoch (another broker database, or the same one restored
//! to an earlier state, which the broker names anew) starts over from the
//! beginning, keeping the ids it holds until they expire: what was revoked
//! once is never accepted again because a log forgot it. When the broker has not answered within `stale_after`, the
//! set is stale and [`RevocationCheck::is_revoked`] answers `true` for
//! everything: fail closed.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use baton_core::{SpiffeId, TaskId};
use baton_tls::{BundleStore, ClientIdentity, PeerPolicy};
use serde::Deserialize;
use tokio::task::JoinHandle;

use crate::error::ReportError;
use crate::gate::RevocationFreshness;
use crate::token::RevocationCheck;

/// The feed's path on the broker.
pub const FEED_PATH: &str = "/v1/revocations/feed";

#[derive(Debug, Deserialize)]
struct Page {
    epoch: String,
    seq: u64,
    entries: Vec<Entry>,
    more: bool,
}

#[derive(Debug, Deserialize)]
struct Entry {
    id: String,
    expires_at: u64,
}

#[derive(Debug, Default)]
struct State {
    revoked: HashMap<String, u64>,
    epoch: Option<String>,
    seq: u64,
    /// Unix seconds of the last answer from the broker.
    last_ok: Option<u64>,
    /// The same moment on the monotonic clock: freshness needs both, so
    /// a wall clock stepped back does not keep a silent feed fresh.
    last_ok_at: Option<Instant>,
    /// The follower has caught up with the broker's log at least once: its
    /// set is one the broker served, not the empty one it started with.
    ever_caught_up: bool,
}

impl State {
    fn is_fresh(&self, now: u64, stale_after: u64) -> bool {
        self.last_ok
            .is_some_and(|t| now.saturating_sub(t) <= stale_after)
            && self
                .last_ok_at
                .is_some_and(|at| at.elapsed() <= Duration::from_secs(stale_after))
    }
}

#[derive(Debug)]
struct Shared {
    state: RwLock<State>,
    stale_after: u64,
}

struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running follower of the broker's feed; clones share it, and the
/// background task stops with the last clone.
#[derive(Clone)]
pub struct BrokerFeed {
    shared: Arc<Shared>,
    _task: Arc<AbortOnDrop>,
}

impl fmt::Debug for BrokerFeed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.read();
        f.debug_struct("BrokerFeed")
            .field("epoch", &s.epoch)
            .field("seq", &s.seq)
            .field("revoked", &s.revoked.len())
            .finish()
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl BrokerFeed {
    /// Follows the feed of the broker at `broker_url`, or of the first of
    /// several separated by commas that answers (each must present
    /// `broker_id`), authenticating with `identity`. Must be called inside
    /// a tokio runtime. Stale (refusing everything) until the first answer.
    pub fn spawn(
        broker_url: &str,
        identity: ClientIdentity,
        bundles: BundleStore,
        broker_id: SpiffeId,
        stale_after: Duration,
    ) -> Result<Self, ReportError> {
        let urls = crate::report::broker_urls(broker_url)?;
        let tls = baton_tls::client_config(identity, bundles, PeerPolicy::Exact(vec![broker_id]))?;
        // Poll at least twice per staleness window.
        let wait = (stale_after / 2).clamp(Duration::from_millis(200), Duration::from_secs(10));
        let client = reqwest::Client::builder()
            // A broker never redirects: an answer that does is final, never
            // followed (with this client's certificate) elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .tls_backend_preconfigured(tls)
            .connect_timeout(Duration::from_secs(3))
            .timeout(wait + Duration::from_secs(10))
            .no_proxy()
            .build()
            .map_err(|e| ReportError::Client(e.to_string()))?;
        let shared = Arc::new(Shared {
            state: RwLock::new(State::default()),
            stale_after: stale_after.as_secs().max(1),
        });
        let task = tokio::spawn(follow(
            client,
            urls.into_iter()
                .map(|u| format!("{u}{FEED_PATH}"))
                .collect(),
            wait,
            shared.clone(),
        ));
        Ok(Self {
            shared,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.shared.state.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `id` is revoked (and not yet expired) in the local set.
    pub fn contains(&self, id: &str, now: u64) -> bool {
        self.read().revoked.get(id).is_some_and(|exp| *exp > now)
    }

    /// Whether the broker answered within the staleness window, both by
    /// `now` (unix seconds) and by the monotonic clock.
    pub fn is_fresh_at(&self, now: u64) -> bool {
        self.read().is_fresh(now, self.shared.stale_after)
    }

    /// Waits (up to `timeout`) for the first complete answer of the
    /// broker; true when the feed is fresh.
    pub async fn wait_fresh(&self, timeout: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.is_fresh_at(now()) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the follower has ever caught up with the broker's log: until
    /// then its set is the empty one it started with, which a reader that
    /// tolerates staleness must not answer from.
    pub fn ever_caught_up(&self) -> bool {
        self.read().ever_caught_up
    }

    /// Unix seconds of the broker's last answer, if it ever answered.
    pub fn last_answer(&self) -> Option<u64> {
        self.read().last_ok
    }

    /// Number of revoked ids held.
    pub fn len(&self) -> usize {
        self.read().revoked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Follows the feed at `urls[0]`, moving to the next broker when one does
/// not answer (brokers on one datastore serve one feed: the same epoch and
/// sequence numbers), and backing off once every broker failed in a row.
async fn follow(client: reqwest::Client, urls: Vec<String>, wait: Duration, shared: Arc<Shared>) {
    let mut backoff = Duration::from_millis(100);
    let mut at = 0usize;
    let mut failed_in_a_row = 0usize;
    loop {
        let Some(url) = urls.get(at % urls.len().max(1)) else {
            return;
        };
        let (after, synced) = {
            let s = shared.state.read().unwrap_or_else(|e| e.into_inner());
            (s.seq, s.last_ok.is_some())
        };
        // The first page (and any resync) is answered at once; after that
        // the broker holds the request until something is revoked.
        let wait_ms = if synced { wait.as_millis() } else { 0 };
        let result = client
            .get(format!("{url}?after={after}&wait_ms={wait_ms}"))
            .send()
            .await
            .and_then(reqwest::Response::error_for_status);
        let page = match result {
            Ok(resp) => resp.json::<Page>().await,
            Err(e) => Err(e),
        };
        match page {
            Ok(page) => {
                backoff = Duration::from_millis(100);
                failed_in_a_row = 0;
                let more = apply(&shared, page);
                if more {
                    continue;
                }
            }
            Err(e) => {
                at = at.wrapping_add(1);
                failed_in_a_row += 1;
                if failed_in_a_row < urls.len() {
                    tracing::warn!(error = %e, broker = %url, "revocation feed: broker unreachable, trying the next");
                    continue;
                }
                failed_in_a_row = 0;
                tracing::warn!(error = %e, retry_in = ?backoff, "revocation feed: broker unreachable");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Applies one page; true when the follower should ask again at once.
fn apply(shared: &Shared, page: Page) -> bool {
    let mut s = shared.state.write().unwrap_or_else(|e| e.into_inner());
    let t = now();
    if s.epoch.as_deref() != Some(page.epoch.as_str()) {
        if s.epoch.is_some() {
            tracing::warn!(epoch = %page.epoch, "revocation feed: new epoch, starting over");
        }
        let fresh_start = s.epoch.is_none() && s.seq == 0;
        // Kept: revoked ids are only ever refused more (they leave at
        // their expiry), so a log that lost entries cannot bring one back.
        s.epoch = Some(page.epoch);
        s.seq = 0;
        if !fresh_start {
            // Entries of another log: re-read this one from the start
            // before trusting it.
            s.last_ok = None;
            s.last_ok_at = None;
            return true;
        }
    }
    for e in page.entries {
        if e.expires_at > t {
            s.revoked.insert(e.id, e.expires_at);
        }
    }
    s.revoked.retain(|_, exp| *exp > t);
    s.seq = page.seq;
    if page.more {
        // Not caught up yet: not fresh until the last page is in.
        return true;
    }
    s.last_ok = Some(t);
    s.last_ok_at = Some(Instant::now());
    s.ever_caught_up = true;
    false
}

impl RevocationCheck for BrokerFeed {
    /// Revoked, or unknown because the feed is stale: fail closed.
    fn is_revoked(&self, id: &str, task: &TaskId) -> bool {
        let t = now();
        // The id itself, or its whole task (a task's revocation is one
        // entry keyed by the task id).
        self.contains(id, t) || self.contains(task.as_str(), t) || !self.is_fresh_at(t)
    }
}

impl RevocationFreshness for BrokerFeed {
    fn is_fresh(&self, now: u64) -> bool {
        self.is_fresh_at(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(epoch: &str, seq: u64, ids: &[&str]) -> Page {
        Page {
            epoch: epoch.into(),
            seq,
            entries: ids
                .iter()
                .map(|id| Entry {
                    id: (*id).into(),
                    expires_at: now() + 600,
                })
                .collect(),
            more: false,
        }
    }

    /// A log named anew (the broker's datastore restored, or another one)
    /// is read again from its start, and what the follower refused under
    /// the old name stays refused: a log that lost an entry cannot bring
    /// its credential back. The control: the old log's entries as they
    /// came, and the new log's own.
    #[test]
    fn a_log_named_anew_is_read_from_the_start_and_nothing_refused_comes_back() {
        let shared = Shared {
            state: RwLock::new(State::default()),
            stale_after: 60,
        };
        let held = |id: &str| shared.state.read().unwrap().revoked.contains_key(id);
        assert!(!apply(&shared, page("e1", 2, &["a", "b"])));
        assert!(held("a") && held("b"));
        // Restored: the log is named e2 and holds only "a" and then "c".
        assert!(apply(&shared, page("e2", 2, &["a", "c"])), "not re-read");
        assert_eq!(shared.state.read().unwrap().seq, 0);
        assert!(!apply(&shared, page("e2", 2, &["a", "c"])));
        assert!(held("a") && held("b") && held("c"));
        assert_eq!(shared.state.read().unwrap().seq, 2);
    }

    /// Freshness is judged on the monotonic clock too: a wall clock
    /// stepped back (or a `now` that says the answer was recent) does not
    /// keep a feed fresh that has not heard from the broker for longer
    /// than its window. The control: a recent answer on both clocks.
    #[test]
    fn a_wall_clock_stepped_back_does_not_keep_a_silent_feed_fresh() {
        let shared = Shared {
            state: RwLock::new(State::default()),
            stale_after: 60,
        };
        assert!(
            !shared.state.read().unwrap().is_fresh(now(), 60),
            "fresh before any answer"
        );
        assert!(!apply(&shared, page("e1", 1, &["a"])));
        assert!(shared.state.read().unwrap().is_fresh(now(), 60), "control");
        assert!(
            !shared.state.read().unwrap().is_fresh(now() + 61, 60),
            "wall clock past the window"
        );
        // The answer came 61 s ago by the monotonic clock, while the wall
        // clock was stepped back so that it still reads as just now.
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(61))
            .expect("a machine up for more than a minute");
        shared.state.write().unwrap().last_ok_at = Some(long_ago);
        assert!(
            !shared.state.read().unwrap().is_fresh(now(), 60),
            "monotonic clock past the window"
        );
    }
}
