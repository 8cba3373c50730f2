//! The verifier side: a local revoked set fed by the revocation stream, and
//! the publisher-side heartbeat that proves the feed is alive.
//!
//! The follower reads `{p}:revocations:v2` with `XREAD BLOCK` from the last id
//! it saw, so a reconnect resumes where it stopped (a Stream, unlike pub/sub,
//! keeps entries while the reader is away). It does a full resync — one
//! `MULTI` reading the epoch, the stream's newest id and the
//! `{p}:revoked-index` sorted set from `now` on — at start, when the epoch
//! changed (Redis lost its data and was re-seeded), when its last entry was
//! trimmed away and newer ones exist (it may have missed some), or when the
//! stream vanished. While the epoch is missing it trusts nothing:
//! the status is stale until the service re-seeds.

use std::collections::HashMap;
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{Duration, Instant};

use baton_core::TaskId;
use baton_verify::RevocationCheck;
use redis::Value;
use tokio::task::JoinHandle;

use crate::redis_config::{Conn, Connector};
use crate::redis_store::{is_connection_error, parse_scored, value_str};
use crate::{RedisConfig, RedisStore, RevocationError, system_now};

/// How a [`RevocationFeed`] behaves.
#[derive(Debug, Clone)]
pub struct FeedOptions {
    /// With no stream entry (revocation or heartbeat) for this long, the
    /// feed is stale. Keep it a few times the publisher's heartbeat period.
    pub stale_after: Duration,
    /// How long one `XREAD BLOCK` waits; also how often the follower checks
    /// the epoch and trimming while the stream is quiet, and prunes.
    pub heartbeat_every: Duration,
    /// Answer from the last known set when stale instead of refusing
    /// everything. Only for read-only tiers that accept serving a revoked
    /// credential for as long as the feed is down; off by default.
    pub allow_stale: bool,
    /// How long heartbeats of `baton revocation` alone ([`Heartbeat::spawn_service`])
    /// keep the feed fresh with no word from a publisher (a broker's relay:
    /// its revocations, seeds and heartbeats). They bridge a broker's
    /// restart; but a broker that records revocations and cannot publish
    /// them must not leave followers fresh for longer than this.
    pub publisher_grace: Duration,
    /// Unix seconds; the system clock by default (tests may pass another).
    pub clock: fn() -> u64,
}

impl Default for FeedOptions {
    fn default() -> Self {
        Self {
            stale_after: Duration::from_secs(30),
            heartbeat_every: Duration::from_secs(5),
            allow_stale: false,
            publisher_grace: DEFAULT_PUBLISHER_GRACE,
            clock: system_now,
        }
    }
}

/// [`FeedOptions::publisher_grace`] by default.
pub const DEFAULT_PUBLISHER_GRACE: Duration = Duration::from_secs(60);

/// Freshness of the local revoked set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedStatus {
    Fresh,
    /// No trustworthy news since `since` (unix seconds: the last entry or
    /// resync, or the start of the feed).
    Stale {
        since: u64,
    },
}

/// A moment the follower heard something, on the clock it was given (unix
/// seconds) and on the monotonic clock: it is old when either says so, so
/// a wall clock stepped back does not keep a silent feed fresh.
#[derive(Debug, Clone, Copy)]
struct Heard {
    unix: u64,
    at: Instant,
}

impl Heard {
    fn at(unix: u64) -> Self {
        Self {
            unix,
            at: Instant::now(),
        }
    }

    fn older_than(&self, now: u64, secs: u64) -> bool {
        now.saturating_sub(self.unix) > secs || self.at.elapsed() > Duration::from_secs(secs)
    }
}

#[derive(Debug)]
struct State {
    /// id -> expiry
    revoked: HashMap<String, u64>,
    /// A resync against a present epoch has happened and still holds.
    synced: bool,
    /// A resync has ever completed: `revoked` is a set Redis served, not
    /// the empty one the follower started with.
    ever_synced: bool,
    last_seen: Heard,
    /// The last entry a publisher wrote (anything but a heartbeat of the
    /// revocation service), or the start of the feed.
    last_publisher: Heard,
    epoch: Option<String>,
    resyncs: u64,
    /// Whether this follower's Redis user may write (probed once, at the
    /// first connection): see [`FeedHandle::can_write`].
    writable: Option<bool>,
}

#[derive(Debug)]
struct Shared {
    state: RwLock<State>,
    stale_after: u64,
    allow_stale: bool,
    publisher_grace: u64,
    clock: fn() -> u64,
}

impl Shared {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }
}

#[derive(Debug)]
struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A running follower. Clones share it; the task stops with the last clone.
#[derive(Debug, Clone)]
pub struct FeedHandle {
    shared: Arc<Shared>,
    _task: Arc<AbortOnDrop>,
}

/// Starts followers.
#[derive(Debug)]
pub struct RevocationFeed;

impl RevocationFeed {
    /// Spawns a follower of the standalone Redis at `url` (see
    /// [`RevocationFeed::spawn_with`]).
    pub fn spawn(
        url: &str,
        prefix: &str,
        options: FeedOptions,
    ) -> Result<FeedHandle, RevocationError> {
        Self::spawn_with(&RedisConfig::standalone(url, prefix), options)
    }

    /// Spawns the follower on the current tokio runtime, in any mode of
    /// `config`. Settings and TLS files are checked here; the connection
    /// is made in the background, and until its first resync the status
    /// is stale.
    pub fn spawn_with(
        config: &RedisConfig,
        options: FeedOptions,
    ) -> Result<FeedHandle, RevocationError> {
        let connector = config.connector()?;
        let now = (options.clock)();
        let shared = Arc::new(Shared {
            state: RwLock::new(State {
                revoked: HashMap::new(),
                synced: false,
                ever_synced: false,
                last_seen: Heard::at(now),
                last_publisher: Heard::at(now),
                epoch: None,
                resyncs: 0,
                writable: None,
            }),
            stale_after: options.stale_after.as_secs(),
            allow_stale: options.allow_stale,
            publisher_grace: options.publisher_grace.as_secs(),
            clock: options.clock,
        });
        let follower = Follower {
            connector,
            base: config.key_base(),
            block: options.heartbeat_every.max(Duration::from_millis(100)),
            shared: shared.clone(),
            last_id: None,
        };
        let task = tokio::spawn(follower.run());
        Ok(FeedHandle {
            shared,
            _task: Arc::new(AbortOnDrop(task)),
        })
    }
}

impl FeedHandle {
    pub fn status(&self, now: u64) -> FeedStatus {
        let s = self.shared.read();
        if !s.synced || s.last_seen.older_than(now, self.shared.stale_after) {
            FeedStatus::Stale {
                since: s.last_seen.unix,
            }
        } else if s
            .last_publisher
            .older_than(now, self.shared.publisher_grace)
        {
            // Only the revocation service's heartbeats: no publisher has
            // been heard, so revocations may be recorded and not published.
            FeedStatus::Stale {
                since: s.last_publisher.unix,
            }
        } else {
            FeedStatus::Fresh
        }
    }

    /// Whether `id` is in the local revoked set at `now` (ignores freshness).
    pub fn contains(&self, id: &str, now: u64) -> bool {
        self.shared.read().revoked.get(id).is_some_and(|e| *e > now)
    }

    /// Size of the local set (expired entries are pruned lazily).
    pub fn len(&self) -> usize {
        self.shared.read().revoked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// How many full resyncs the follower has done.
    pub fn resyncs(&self) -> u64 {
        self.shared.read().resyncs
    }

    /// Whether the follower's Redis user may write (`None` until its first
    /// connection has been probed). A verifier should follow with a
    /// read-only user; a follower that may write is warned about once.
    pub fn can_write(&self) -> Option<bool> {
        self.shared.read().writable
    }

    /// The epoch the follower trusts, if any.
    pub fn epoch(&self) -> Option<String> {
        self.shared.read().epoch.clone()
    }
}

/// Fresh when the follower heard from Redis within `stale_after`.
impl baton_verify::RevocationFreshness for FeedHandle {
    fn is_fresh(&self, now: u64) -> bool {
        self.status(now) == FeedStatus::Fresh
    }
}

/// Revoked, or unknown because the feed is stale: fail closed. With
/// `allow_stale`, a stale feed answers from the last set Redis served, but
/// only once there is one: a follower that never synced (started while
/// Redis was unreachable) knows of no revocation at all, and refuses.
impl RevocationCheck for FeedHandle {
    fn is_revoked(&self, jti: &str, task: &TaskId) -> bool {
        let now = (self.shared.clock)();
        if crate::is_denied(|id| self.contains(id, now), jti, task) {
            return true;
        }
        let answers_stale = self.shared.allow_stale && self.shared.read().ever_synced;
        !answers_stale && self.status(now) != FeedStatus::Fresh
    }
}

struct Follower {
    connector: Connector,
    /// `{prefix}`
    base: String,
    block: Duration,
    shared: Arc<Shared>,
    /// `None`: resync before reading.
    last_id: Option<String>,
}

fn parse_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

impl Follower {
    fn key(&self, rest: &str) -> String {
        format!("{}:{rest}", self.base)
    }

    async fn run(mut self) {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self
                .connector
                .connect(Duration::from_secs(2), self.block + Duration::from_secs(5))
                .await
            {
                Ok(mut conn) => {
                    backoff = Duration::from_millis(100);
                    let _: Result<Value, _> = redis::cmd("CLIENT")
                        .arg("SETNAME")
                        .arg("baton-revocation-feed")
                        .query_async(&mut conn)
                        .await;
                    if self.shared.read().writable.is_none() {
                        self.probe_write(&mut conn).await;
                    }
                    if let Err(e) = self.follow(&mut conn).await {
                        tracing::warn!(error = %e, "revocation feed: connection lost, reconnecting");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "revocation feed: cannot connect");
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(2));
        }
    }

    /// Whether this follower's Redis user may write. A verifier needs to
    /// read only; one that may write (the brokers' own user, as the shared
    /// `--redis*` flags make easy) can remove revoked ids from the index
    /// and forge the stream's entries for every follower, so a
    /// compromised tool server could un-revoke credentials at the others.
    /// Said loudly, once. The probe is a `DEL` of a key nobody writes: a
    /// write command that changes nothing.
    async fn probe_write(&self, conn: &mut Conn) {
        let probe: Result<Value, redis::RedisError> = redis::cmd("DEL")
            .arg(self.key("follower-write-probe"))
            .query_async(conn)
            .await;
        let writable = match probe {
            Ok(_) => true,
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoPerm) => false,
            Err(e) if e.to_string().contains("NOPERM") => false,
            Err(e) => {
                tracing::debug!(error = %e, "revocation feed: write probe failed");
                return;
            }
        };
        if writable {
            tracing::warn!(
                "revocation feed: this verifier's Redis user may write; whoever controls this \
                 process can then remove revocations for every verifier. Give verifiers a \
                 read-only ACL user (see the deployment guide, \"ACL user\")"
            );
        }
        self.shared.write().writable = Some(writable);
    }

    /// Reads until the connection fails.
    async fn follow(&mut self, conn: &mut Conn) -> Result<(), redis::RedisError> {
        // While the epoch is missing, poll fast at first (a broker re-seeds
        // within moments) and back off up to the block time: no fixed
        // sleep keeps live credentials refused longer than the re-seed.
        let mut missing = Duration::from_millis(25);
        loop {
            let now = (self.shared.clock)();
            self.prune(now);
            let epoch: Option<String> = redis::cmd("GET")
                .arg(self.key("epoch"))
                .query_async(conn)
                .await?;
            let Some(epoch) = epoch else {
                // Redis lost its data and nobody re-seeded yet: trust nothing.
                {
                    let mut s = self.shared.write();
                    if s.synced {
                        tracing::warn!(
                            "revocation feed: epoch gone (Redis lost its data); stale until re-seeded"
                        );
                    }
                    s.synced = false;
                    s.epoch = None;
                }
                self.last_id = None;
                tokio::time::sleep(missing).await;
                missing = (missing * 2).min(self.block.min(Duration::from_secs(1)));
                continue;
            };
            missing = Duration::from_millis(25);
            let same_epoch = self.shared.read().epoch.as_deref() == Some(epoch.as_str());
            if !same_epoch || self.last_id.is_none() || self.gap(conn).await? {
                self.resync(conn).await?;
                continue;
            }
            let last = self.last_id.clone().unwrap_or_else(|| "0-0".into());
            let reply: Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1000)
                .arg("BLOCK")
                .arg(self.block.as_millis() as u64)
                .arg("STREAMS")
                .arg(self.key(crate::STREAM))
                .arg(&last)
                .query_async(conn)
                .await?;
            self.apply(&reply, &epoch);
        }
    }

    /// Whether entries after our last id may have been trimmed, or the
    /// stream is gone. Trimming removes from the front, so while our last
    /// entry is still there nothing after it is missing; once it is gone we
    /// resync unless nothing was added after it. (`max-deleted-entry-id`
    /// does not help: Redis 7.0 updates it on `XDEL`, not on trimming.)
    async fn gap(&self, conn: &mut Conn) -> Result<bool, redis::RedisError> {
        let Some(last) = self.last_id.as_deref() else {
            return Ok(true);
        };
        let stream = self.key(crate::STREAM);
        if last != "0-0" {
            let own: Value = redis::cmd("XRANGE")
                .arg(&stream)
                .arg(last)
                .arg(last)
                .query_async(conn)
                .await?;
            if matches!(&own, Value::Array(a) if !a.is_empty()) {
                return Ok(false);
            }
        }
        let exists: i64 = redis::cmd("EXISTS").arg(&stream).query_async(conn).await?;
        if exists == 0 {
            return Ok(last != "0-0");
        }
        let info: Value = redis::cmd("XINFO")
            .arg("STREAM")
            .arg(&stream)
            .query_async(conn)
            .await?;
        if last == "0-0" {
            let num = |k| {
                field(&info, k)
                    .and_then(|v| v.parse::<u64>().ok())
                    .unwrap_or(0)
            };
            return Ok(num("entries-added") > num("length"));
        }
        let newest = field(&info, "last-generated-id").unwrap_or_default();
        Ok(parse_id(&newest) > parse_id(last))
    }

    async fn resync(&mut self, conn: &mut Conn) -> Result<(), redis::RedisError> {
        let now = (self.shared.clock)();
        let (epoch, top, index): (Option<String>, Value, Value) = redis::pipe()
            .atomic()
            .cmd("GET")
            .arg(self.key("epoch"))
            .cmd("XREVRANGE")
            .arg(self.key(crate::STREAM))
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .cmd("ZRANGEBYSCORE")
            .arg(self.key("revoked-index"))
            .arg(format!("({now}"))
            .arg("+inf")
            .arg("WITHSCORES")
            .query_async(conn)
            .await?;
        let Some(epoch) = epoch else {
            // Gone between the check and the read; the loop handles it.
            return Ok(());
        };
        let last_id = match &top {
            Value::Array(entries) => entries
                .first()
                .and_then(|e| match e {
                    Value::Array(parts) => parts.first().and_then(value_str),
                    _ => None,
                })
                .unwrap_or_else(|| "0-0".into()),
            _ => "0-0".into(),
        };
        let entries = match parse_scored(&index) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "revocation feed: bad index reply");
                return Ok(());
            }
        };
        let mut s = self.shared.write();
        // Merged, never replaced: what was refused once stays refused until
        // it expires, also when the index read now lost it (a failover to a
        // replica that missed writes, a restart that lost its last second,
        // an id removed by someone with write access).
        for (id, exp) in entries {
            let held = s.revoked.entry(id).or_insert(exp);
            *held = (*held).max(exp);
        }
        s.revoked.retain(|_, e| *e > now);
        s.synced = true;
        s.ever_synced = true;
        s.last_seen = Heard::at(now);
        s.epoch = Some(epoch);
        s.resyncs += 1;
        tracing::info!(revoked = s.revoked.len(), from = %last_id, "revocation feed: resynced");
        drop(s);
        self.last_id = Some(last_id);
        Ok(())
    }

    fn apply(&mut self, reply: &Value, epoch: &str) {
        let entries = stream_entries(reply);
        if entries.is_empty() {
            return;
        }
        let now = (self.shared.clock)();
        let mut s = self.shared.write();
        for (id, fields) in entries {
            let get = |k: &str| fields.iter().find(|(f, _)| f == k).map(|(_, v)| v.as_str());
            match get("t") {
                Some("revoke") => {
                    match crate::stream_format::decode(get("r").unwrap_or_default()) {
                        Ok(pairs) => {
                            for (rid, exp) in pairs {
                                if exp > now {
                                    s.revoked.insert(rid, exp);
                                }
                            }
                        }
                        Err(e) => {
                            // Never skip ids: reload the whole deny set.
                            tracing::warn!(error = %e, entry = %id, "revocation feed: unreadable entry; resyncing");
                            self.last_id = None;
                            return;
                        }
                    }
                }
                Some("seed") if get("epoch") != Some(epoch) => {
                    // A different epoch was seeded: reload everything.
                    self.last_id = None;
                    s.last_seen = Heard::at(now);
                    return;
                }
                _ => {}
            }
            s.last_seen = Heard::at(now);
            if !(get("t") == Some("hb") && get("src") == Some(SERVICE_SOURCE)) {
                s.last_publisher = Heard::at(now);
            }
            self.last_id = Some(id);
        }
    }

    fn prune(&self, now: u64) {
        let mut s = self.shared.write();
        s.revoked.retain(|_, e| *e > now);
    }
}

/// A field of a flat (RESP2) or map (RESP3) reply.
fn field(v: &Value, name: &str) -> Option<String> {
    match v {
        Value::Array(items) => items
            .chunks(2)
            .find(|c| c.first().and_then(value_str).as_deref() == Some(name))
            .and_then(|c| c.get(1))
            .and_then(value_str),
        Value::Map(m) => m
            .iter()
            .find(|(k, _)| value_str(k).as_deref() == Some(name))
            .and_then(|(_, v)| value_str(v)),
        _ => None,
    }
}

/// Entries of an `XREAD` reply for one stream: (id, field/value pairs).
fn stream_entries(v: &Value) -> Vec<(String, Vec<(String, String)>)> {
    let streams: Vec<Value> = match v {
        Value::Array(a) => a.clone(),
        Value::Map(m) => m
            .iter()
            .map(|(k, v)| Value::Array(vec![k.clone(), v.clone()]))
            .collect(),
        _ => return Vec::new(),
    };
    let mut out = Vec::new();
    for s in &streams {
        let Value::Array(parts) = s else { continue };
        let Some(Value::Array(entries)) = parts.get(1) else {
            continue;
        };
        for e in entries {
            let Value::Array(e) = e else { continue };
            let (Some(id), Some(Value::Array(kv))) = (e.first().and_then(value_str), e.get(1))
            else {
                continue;
            };
            let pairs = kv
                .chunks(2)
                .filter_map(|c| Some((value_str(c.first()?)?, value_str(c.get(1)?)?)))
                .collect();
            out.push((id, pairs));
        }
    }
    out
}

/// Publisher side: appends a heartbeat to the stream every period so
/// followers can tell a quiet feed from a dead one. Stops when dropped.
#[derive(Debug)]
pub struct Heartbeat {
    _task: AbortOnDrop,
}

/// The `src` of a heartbeat of the revocation service (not a publisher).
pub(crate) const SERVICE_SOURCE: &str = "service";

impl Heartbeat {
    /// A publisher's heartbeat (a broker, beside its relay): it keeps
    /// followers fresh.
    pub fn spawn(store: RedisStore, every: Duration) -> Self {
        Self::spawn_from(store, every, "relay")
    }

    /// The revocation service's heartbeat (`baton revocation`): it keeps
    /// followers fresh only for their [`FeedOptions::publisher_grace`]
    /// after a publisher was last heard.
    pub fn spawn_service(store: RedisStore, every: Duration) -> Self {
        Self::spawn_from(store, every, SERVICE_SOURCE)
    }

    fn spawn_from(store: RedisStore, every: Duration, source: &'static str) -> Self {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Err(e) = store.heartbeat(system_now(), source).await {
                    let conn = matches!(&e, RevocationError::Redis(r) if is_connection_error(r));
                    tracing::warn!(error = %e, connection = conn, "revocation heartbeat failed");
                }
            }
        });
        Self {
            _task: AbortOnDrop(task),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the follower heard is old when either clock says so: a wall
    /// clock stepped back (so that the last entry still reads as recent)
    /// does not keep a feed that has heard nothing fresh. The control: a
    /// moment recent on both clocks.
    #[test]
    fn a_wall_clock_stepped_back_does_not_keep_a_silent_feed_fresh() {
        let now = system_now();
        let heard = Heard::at(now);
        assert!(!heard.older_than(now, 30), "control");
        assert!(heard.older_than(now + 31, 30), "wall clock past the window");
        let long_ago = Heard {
            unix: now,
            at: Instant::now()
                .checked_sub(Duration::from_secs(31))
                .expect("a machine up for more than 31 s"),
        };
        assert!(
            long_ago.older_than(now, 30),
            "monotonic clock past the window"
        );
        assert!(
            long_ago.older_than(now.saturating_sub(3600), 30),
            "wall clock stepped back an hour"
        );
    }
}
