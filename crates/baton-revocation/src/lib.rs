//! The revocation service's store: every issued credential is registered
//! with its expiry, and revoking a credential, a task, a subtree, an agent or
//! a node marks every credential it covers as revoked until it would have
//! expired anyway. Verifiers follow the revocations through
//! [`RevocationFeed`] and answer [`baton_verify::RevocationCheck`] from memory.
//!
//! Place in the flow: the broker keeps its own registry of issued
//! credentials and computes cascades in its datastore (the source of
//! truth); it hands this store only what verifiers must refuse, through
//! [`RevocationStore::publish`] (its outbox relay, which the store
//! acknowledges with a per-log mark) and [`RevocationStore::seed`] (a store
//! that lost its data). Tool servers hold a [`FeedHandle`].
//! [`RevocationStore::register`] and [`RevocationStore::revoke`] keep the
//! store-side registry and cascades for users without a datastore.
//!
//! Two backends behind one trait: [`MemoryStore`] (the embedded default of
//! `baton dev`, with a tokio broadcast for in-process followers) and
//! [`RedisStore`]. Both share the semantics below; the integration tests run
//! the same checks against both.
//!
//! # Semantics
//!
//! - `register` refuses an expired record, an id that is already revoked, a
//!   record whose `parent` is revoked and a record of a revoked task, so
//!   nothing can be minted under something already dead (atomic with
//!   `revoke`: no window in between).
//! - `revoke` resolves its target to credential ids, then closes the set
//!   over `parent` links (anything minted from a revoked credential is
//!   revoked too, whatever the target), marks them all in one atomic step
//!   and returns them. A target that resolves to no live credential is
//!   [`RevocationError::Unknown`] and changes nothing. Revoking again is
//!   idempotent and returns the ids again.
//! - A revoked id is remembered until its credential's own expiry; after that
//!   the credential is dead anyway and the entry disappears by itself.
//! - Both stores must be seeded ([`RevocationStore::seed`], even with an
//!   empty list) before `register`/`revoke` work on Redis: an unseeded Redis
//!   is one that lost its data, and issuing against it would forget
//!   revocations. [`MemoryStore`] is born seeded.
//!
//! # Redis key layout (prefix `p`)
//!
//! Every key starts with the hash tag `{p}` (braces included, e.g.
//! `{baton}:epoch`), so that on a Redis Cluster they all hash to one slot
//! and each script's keys live on one node. The scripts declare
//! `{p}:epoch` as their one key (that routes them) and compute the others
//! from `{p}`; the feed's stream reads and the heartbeat's `XADD` name
//! `{p}:revocations:v2`, in the same slot. (Format 1 of the stream,
//! one `exp id` line per id, was `{p}:revocations`: a follower of that
//! format finds no entry under the new name, not even heartbeats, and goes
//! stale, failing closed, instead of misreading format 2.) The layout is the same in every
//! mode. (Before Cluster support the keys were `p:…` without braces; a
//! store written that way is simply unseeded under the new names, and the
//! brokers re-seed it from their durable logs.)
//!
//! | key | type | content | expiry |
//! |---|---|---|---|
//! | `{p}:cred:<id>` | hash | `k` kind, `t` task, `a` agent, `n` node, `p` parent, `e` expiry (absent fields omitted) | `EXPIREAT` expiry |
//! | `{p}:task:<task>`, `{p}:agent:<spiffe>`, `{p}:node:<spiffe>`, `{p}:children:<id>` | set of ids | index | pushed out to the max expiry of its members |
//! | `{p}:revoked-index` | sorted set id -> expiry | the deny set: `is_revoked` and the scripts' checks are `ZSCORE` > now; what a follower loads on a full resync (`ZRANGE BYSCORE now +inf`) | members pruned on each revoke/seed/publish |
//! | `{p}:revoked-task:<task>` | string | task tombstone: refuses new registrations | max expiry of the task's credentials |
//! | `{p}:revocations:v2` | stream | `t=revoke`, `r="exp id id…\nexp id…"` (format 2: each expiry once, lower-case hex ids as `~` + base64url of their bytes; see `stream_format.rs`), `why`; `t=hb`; `t=seed`, `epoch` | trimmed with `MINID ~` to [`STREAM_RETENTION_SECS`] (1 h) on every `XADD` |
//! | `{p}:epoch` | string | random, set by the first `seed` | none: if it is gone, Redis lost its data |
//! | `{p}:outbox:<log>` | string | the highest outbox sequence of the datastore log `<log>` that [`RevocationStore::publish`] acknowledged | none |
//!
//! `register` is one `EVALSHA` round trip (the script does `HSET` +
//! `EXPIREAT` for the record and `SADD` + `EXPIRETIME`/`EXPIREAT` per index
//! set: 11 server-side commands for a record with task, agent, node and
//! parent). `revoke` is one `EVALSHA` that resolves, marks (`SET … EXAT`,
//! `ZADD`) and `XADD`s one stream entry, so it is atomic. Ids must be
//! non-empty, at most [`MAX_ID_LEN`] bytes, without whitespace or control
//! characters (the stream entry separates ids with spaces and newlines).
//!
//! Measured (Redis 7.0.15, jemalloc, 10,000 tokens in one task over 50
//! agents, one node, a fan-out-4 parent tree; `cargo test -p
//! baton-revocation --test bench -- --ignored --nocapture`): `MEMORY USAGE`
//! of one record hash 232 B, of one deny key 88 B; `used_memory` grows by
//! ~610 B per live credential (record plus its share of four index sets)
//! and by ~310 B more per revoked id (deny key, index member, its share of
//! the stream entry). Registration: 1 client round trip, ~15 commands
//! counted by Redis (inside the script), ~60 µs sequential on loopback in a
//! debug build. Cascade revocation of the 10,000-credential subtree: one
//! script call, ~86 ms.
//!
//! # Requirements and limits of the Redis backend
//!
//! - Redis 7.0 or newer (`EXPIRETIME`; `SET … EXAT` and `XADD … MINID`
//!   need 6.2).
//! - Connection ([`RedisConfig`], the `--redis*` flags of `baton`):
//!   - one server: `redis://[user:pass@]host:port/db`, `unix://path`, or
//!     `rediss://…` for TLS (rustls, the process's crypto provider). The
//!     server certificate must chain to the `--redis-ca` PEM file, or,
//!     without it, to the system trust store (read by
//!     `rustls-native-certs`: the OS store, or `SSL_CERT_FILE` /
//!     `SSL_CERT_DIR` when set). A client certificate and key make it
//!     mutual TLS. The host in the URL must match the certificate (IP
//!     addresses as IP SANs).
//!   - ACL users through the URL or `username`/`password` (which override
//!     the URL's; the CLI reads the password from a file). Passwords
//!     never appear in `Debug`, `Display`, logs or errors.
//!   - Redis Cluster ([`RedisMode::Cluster`]): a few seed nodes, the rest
//!     discovered; all keys in the `{p}` slot (above), so one node serves
//!     the whole store and its feed: Cluster buys availability
//!     (failover to a replica), not write scaling.
//!   - Sentinel ([`RedisMode::Sentinel`]): the sentinels are asked for the
//!     primary on every (re)connection; after a failover the store
//!     reconnects on the first connection error or `READONLY` reply and
//!     the feed on the first connection error. Credentials in the sentinel
//!     URLs are the sentinels'; the primary gets `username`/`password`, or
//!     the sentinels' when those are not given. `rediss://` sentinel URLs
//!     mean TLS to the sentinels and to the primary, with the same files.
//!   - Not covered by tests here: Cluster or Sentinel over TLS (the same
//!     `redis` crate code paths as standalone TLS), and an actual failover.
//! - Redis must be the fast path, not the record: a Redis without
//!   persistence forgets everything on restart. [`RevocationStore::health`]
//!   reports it (the epoch is gone), followers treat it as stale (fail
//!   closed) and the service must [`RevocationStore::seed`] again from its
//!   durable log.

mod feed;
mod memory;
mod redis_config;
mod redis_store;
mod stream_format;

/// The revocation stream's key after the prefix: `{p}:revocations:v2`,
/// entries in format 2 (see the key layout). Format 1 was
/// `{p}:revocations`; seeds and publications remove that key.
pub(crate) const STREAM: &str = "revocations:v2";

use std::fmt;

use async_trait::async_trait;
use baton_core::{SpiffeId, TaskId};

pub use feed::{
    DEFAULT_PUBLISHER_GRACE, FeedHandle, FeedOptions, FeedStatus, Heartbeat, RevocationFeed,
};
pub use memory::MemoryStore;
pub use redis_config::{
    MAX_PREFIX_LEN, RedisConfig, RedisMode, RedisPassword, RedisTls, validate_prefix,
};
pub use redis_store::{RedisStore, redact_url};

/// Most records one Redis script call of
/// [`RevocationStore::register_many`] carries.
pub const REGISTER_CHUNK: usize = 500;
/// Longest credential id accepted.
pub const MAX_ID_LEN: usize = 512;
/// How long revocation and heartbeat entries stay in the stream. A follower
/// that was away longer than this does a full resync.
pub const STREAM_RETENTION_SECS: u64 = 3600;

/// What kind of credential an id names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CredKind {
    /// An X509-SVID, by serial number (hex).
    X509Svid,
    /// A delegation token, by `jti`.
    Token,
    /// A handoff grant, by digest.
    Grant,
    /// A JIT secret lease, by lease id.
    SecretLease,
    /// A workload JWT-SVID, by the SHA-256 (hex) of the token.
    JwtSvid,
    /// Every credential of a task, by the task id (`task-<hex>`): one deny
    /// entry that a verifier matches against the task a credential names
    /// (see [`is_denied`]), instead of one entry per credential. It lives
    /// until the last of the task's credentials expires.
    Task,
}

impl CredKind {
    /// The short code stored in Redis.
    pub fn code(self) -> &'static str {
        match self {
            Self::X509Svid => "x509",
            Self::Token => "token",
            Self::Grant => "grant",
            Self::SecretLease => "lease",
            Self::JwtSvid => "jwtsvid",
            Self::Task => "task",
        }
    }

    /// Parses [`CredKind::code`].
    pub fn from_code(code: &str) -> Option<Self> {
        match code {
            "x509" => Some(Self::X509Svid),
            "token" => Some(Self::Token),
            "grant" => Some(Self::Grant),
            "lease" => Some(Self::SecretLease),
            "jwtsvid" => Some(Self::JwtSvid),
            "task" => Some(Self::Task),
            _ => None,
        }
    }
}

impl fmt::Display for CredKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// Whether a deny set answers "revoked" for credential `id` of `task`:
/// the id itself, or its whole task (a [`CredKind::Task`] entry, keyed by
/// the task id, which cannot be mistaken for a credential id: those are
/// hex or never start with `task-`). `contains` answers for one entry.
pub fn is_denied(contains: impl Fn(&str) -> bool, id: &str, task: &TaskId) -> bool {
    contains(id) || contains(task.as_str())
}

/// One issued credential, as the broker registers it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CredentialRecord {
    /// Serial hex, token `jti`, grant digest or lease id.
    pub id: String,
    pub kind: CredKind,
    pub task: Option<TaskId>,
    pub agent: Option<SpiffeId>,
    /// The node daemon it was issued through.
    pub node: Option<SpiffeId>,
    /// The credential it was minted from (a child token's parent `jti`).
    pub parent: Option<String>,
    /// Unix seconds; the credential is dead at `now >= expires_at`.
    pub expires_at: u64,
}

/// A credential a revocation covered.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Revoked {
    pub id: String,
    pub kind: CredKind,
    pub expires_at: u64,
}

/// What to revoke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// One credential (and what was minted from it).
    Credential(String),
    /// Every credential of the task.
    Task(TaskId),
    /// A credential and everything minted from it, transitively.
    Subtree(String),
    /// Every credential of that agent across all tasks.
    Agent(SpiffeId),
    /// Every credential issued through that node.
    Node(SpiffeId),
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Credential(id) => write!(f, "credential {id}"),
            Self::Task(t) => write!(f, "task {}", t.as_str()),
            Self::Subtree(id) => write!(f, "subtree of {id}"),
            Self::Agent(a) => write!(f, "agent {a}"),
            Self::Node(n) => write!(f, "node {n}"),
        }
    }
}

/// What [`RevocationStore::health`] reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Health {
    /// The store's epoch; empty when there is none.
    pub epoch: String,
    /// The store has no epoch: it lost its data (or was never seeded) and
    /// must be [`RevocationStore::seed`]ed before it is trusted.
    pub empty_since_seed: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("nothing to revoke: {target} matches no live registered credential")]
    Unknown { target: String },
    #[error("credential {id} expired at {expires_at} (now {now}): not registered")]
    Expired {
        id: String,
        expires_at: u64,
        now: u64,
    },
    #[error("credential {id} is already revoked")]
    AlreadyRevoked { id: String },
    #[error("credential {id} was minted from {parent}, which is revoked")]
    ParentRevoked { id: String, parent: String },
    #[error("credential {id} belongs to task {task}, which is revoked")]
    TaskRevoked { id: String, task: String },
    #[error("invalid credential id {id:?}: {why}")]
    InvalidId { id: String, why: &'static str },
    #[error(
        "the store has no epoch: it lost its data or was never seeded; seed it from the durable log first"
    )]
    NotSeeded,
    /// A Redis connection setting is wrong; `option` is the `baton` flag
    /// it comes from.
    #[error("{option}: {why}")]
    Config { option: &'static str, why: String },
    /// The first connection failed (wrong address, TLS or credentials).
    #[error("cannot connect to Redis ({target}): {source}")]
    Connect {
        /// The topology, without passwords.
        target: String,
        #[source]
        source: redis::RedisError,
    },
    #[error("Redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("unexpected Redis reply: {0}")]
    Protocol(String),
}

/// The store that kills credentials.
#[async_trait]
pub trait RevocationStore: Send + Sync + fmt::Debug {
    /// Remembers `rec` until it expires. Refuses an expired record and
    /// anything under a revoked parent or task.
    async fn register(&self, rec: &CredentialRecord, now: u64) -> Result<(), RevocationError>;
    /// Registers a batch (a node's up to 1000 workload SVIDs of one sync)
    /// with the same checks as [`register`](Self::register). Both backends
    /// check the whole batch before writing any of it, so a refusal
    /// registers nothing (Redis: per chunk of [`REGISTER_CHUNK`]; records
    /// of an earlier chunk name credentials that are then never handed out
    /// and simply expire). The default registers one by one.
    async fn register_many(
        &self,
        recs: &[CredentialRecord],
        now: u64,
    ) -> Result<(), RevocationError> {
        for r in recs {
            self.register(r, now).await?;
        }
        Ok(())
    }
    /// Revokes what `target` covers, atomically; returns it.
    async fn revoke(
        &self,
        target: &Target,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Revoked>, RevocationError>;
    /// Whether `id` is revoked and not yet expired.
    async fn is_revoked(&self, id: &str, now: u64) -> Result<bool, RevocationError>;
    /// Restores revoked ids (from the durable log) after the store lost its
    /// data; sets the epoch if there is none. Expired entries are skipped.
    async fn seed(&self, revoked: &[Revoked], now: u64) -> Result<(), RevocationError>;
    async fn health(&self) -> Result<Health, RevocationError>;
    /// Publishes revocations a broker committed to its durable log (the
    /// outbox): marks them revoked, streams them to followers in one entry
    /// and records that the store holds log `log` up to sequence `upto`,
    /// all in one atomic step. Idempotent; expired entries are skipped.
    /// Refused with [`RevocationError::NotSeeded`] by a store that lost its
    /// data (it must be seeded whole first).
    async fn publish(
        &self,
        batch: &[Revoked],
        reason: &str,
        log: &str,
        upto: u64,
        now: u64,
    ) -> Result<(), RevocationError>;
    /// The highest sequence of log `log` this store acknowledged; 0 when
    /// it holds none (a new, flushed or failed-over store).
    async fn published(&self, log: &str) -> Result<u64, RevocationError>;
}

/// Longest name of a durable log [`RevocationStore::publish`] accepts.
pub const MAX_LOG_NAME: usize = 64;

pub(crate) fn validate_log(log: &str) -> Result<(), RevocationError> {
    if log.is_empty() || log.len() > MAX_LOG_NAME || !log.bytes().all(|b| b.is_ascii_alphanumeric())
    {
        return Err(RevocationError::InvalidId {
            id: log.chars().take(64).collect(),
            why: "a log name is 1 to 64 ASCII letters and digits",
        });
    }
    Ok(())
}

pub(crate) fn validate_id(id: &str) -> Result<(), RevocationError> {
    let why = if id.is_empty() {
        "empty"
    } else if id.len() > MAX_ID_LEN {
        "too long"
    } else if id.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "contains whitespace or control characters"
    } else {
        return Ok(());
    };
    Err(RevocationError::InvalidId {
        id: id.chars().take(64).collect(),
        why,
    })
}

pub(crate) fn validate_record(rec: &CredentialRecord, now: u64) -> Result<(), RevocationError> {
    validate_id(&rec.id)?;
    if let Some(p) = &rec.parent {
        validate_id(p)?;
    }
    if rec.expires_at <= now {
        return Err(RevocationError::Expired {
            id: rec.id.clone(),
            expires_at: rec.expires_at,
            now,
        });
    }
    Ok(())
}

/// Unix seconds from the system clock, for the background tasks that have
/// no caller to pass time in.
pub fn system_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
