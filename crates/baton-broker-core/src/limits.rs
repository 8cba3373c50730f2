//! Rate limits per caller on the broker's expensive or abusable routes.
//!
//! Place in the flow: before any route of the HTTPS port runs (before its
//! body is read, a signature checked or a row written),
//! the HTTPS shell's rate-limit filter asks [`RateLimiters::check`] whether the caller
//! may spend one token of the route's bucket. The caller is the SPIFFE ID
//! of the verified mTLS peer, or, without a client certificate, its IP
//! address (an IPv6 address by its /64, which one host usually holds
//! whole). Refusals are 429 `rate_limited` with `Retry-After`.
//!
//! Each limit is a token bucket: `burst` tokens, refilled at `burst` per
//! `per`. Memory is bounded: at most [`MAX_KEYS`] callers are remembered
//! per limit; a caller whose bucket has refilled completely is
//! indistinguishable from one never seen and is forgotten first, then the
//! caller seen longest ago.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use baton_core::SpiffeId;

/// Callers remembered per limit.
pub const MAX_KEYS: usize = 10_000;

/// `burst` requests at once, refilled at `burst` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub burst: NonZeroU32,
    pub per: Duration,
}

/// Why a rate limit given as text was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateLimitError {
    #[error("rate limit {0:?}: expected COUNT/PERIOD, e.g. 30/1m")]
    Syntax(String),
    #[error("rate limit {0:?}: COUNT must be a whole number from 1 to 4294967295")]
    Count(String),
    #[error("rate limit {text:?}: PERIOD {reason}")]
    Period { text: String, reason: String },
    #[error("rate limit for {0:?}: no such limit (known: {known})", known = Limited::names())]
    UnknownLimit(String),
    #[error("--rate-limit {0:?}: expected NAME=COUNT/PERIOD, e.g. task-start=30/1m")]
    Assignment(String),
    #[error(
        "rate limit x509-svid {0}: COUNT must be at least {max} (the largest sign-x509 batch), or a node's full batch would never be signed",
        max = crate::service::MAX_SIGN_BATCH
    )]
    BurstBelowBatch(RateLimit),
}

impl RateLimit {
    pub fn new(burst: NonZeroU32, per: Duration) -> Result<Self, RateLimitError> {
        if per.is_zero() {
            return Err(RateLimitError::Period {
                text: format!("{burst}/0s"),
                reason: "must be more than zero".into(),
            });
        }
        Ok(Self { burst, per })
    }

    /// Tokens earned in `elapsed`.
    fn earned(&self, elapsed: Duration) -> f64 {
        elapsed.as_secs_f64() * f64::from(self.burst.get()) / self.per.as_secs_f64()
    }

    /// Time to earn `tokens`.
    fn time_for(&self, tokens: f64) -> Duration {
        let secs = self.per.as_secs_f64() * tokens / f64::from(self.burst.get());
        Duration::try_from_secs_f64(secs).unwrap_or(self.per)
    }
}

impl fmt::Display for RateLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.burst, humantime::format_duration(self.per))
    }
}

impl FromStr for RateLimit {
    type Err = RateLimitError;

    /// `COUNT/PERIOD`, the period as `1m`, `30s`, `1h`...
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (count, period) = s
            .split_once('/')
            .ok_or_else(|| RateLimitError::Syntax(s.to_owned()))?;
        let burst = count
            .trim()
            .parse::<NonZeroU32>()
            .map_err(|_| RateLimitError::Count(s.to_owned()))?;
        let per = humantime::parse_duration(period.trim()).map_err(|e| RateLimitError::Period {
            text: s.to_owned(),
            reason: e.to_string(),
        })?;
        Self::new(burst, per).map_err(|_| RateLimitError::Period {
            text: s.to_owned(),
            reason: "must be more than zero".into(),
        })
    }
}

/// The rate-limited operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Limited {
    /// `POST /v1/node/attest`, per remote IP (the caller has no identity yet).
    Attest,
    /// `POST /v1/tasks`, per mTLS peer or remote IP.
    TaskStart,
    /// `POST /v1/audit/tool-calls`, per reporting tool server.
    ToolCallReports,
    /// `POST /v1/node/sign-jwt`, per node.
    JwtSvid,
    /// `POST /v1/node/sign-x509` and `POST /v1/node/renew`, per node,
    /// counted in certificates signed: a batch of N CSRs takes N tokens
    /// (one at the guard, the rest once the batch is read), so a stolen
    /// agent SVID cannot spend the broker's signing CPU or grow the
    /// credential registry at line rate.
    X509Svid,
    /// `POST /v1/secrets/lease`, per agent.
    SecretLease,
    /// `POST /v1/delegate`, per agent (its task SVID's SPIFFE ID): each
    /// hop signs a token and writes audit events and rows.
    Delegate,
    /// `POST /v1/node/redeem` and `POST /v1/node/renew-task`, per node:
    /// each answer, a refusal too, is an audit event, so a compromised
    /// workload replaying a spent grant through its node daemon cannot
    /// fill the audit log at line rate.
    NodeMint,
    /// `POST /v1/approvals`, per tool server: each new call held for
    /// approval is an approval row and an audit event.
    Approvals,
    /// `GET /v1/revocations/feed`, per follower: a page answered at once
    /// reads up to 10,000 log rows. A follower asks again at each
    /// revocation it is woken for, so the default is far above one busy
    /// follower's rate.
    Feed,
    /// `POST /v1/secrets/introspect`, per tool server: any live SVID may
    /// ask, and each answer reads the datastore and takes the API-key
    /// engine's lock that leases and revocations need too.
    Introspect,
}

impl Limited {
    pub const ALL: [Limited; 11] = [
        Limited::Attest,
        Limited::TaskStart,
        Limited::ToolCallReports,
        Limited::JwtSvid,
        Limited::X509Svid,
        Limited::SecretLease,
        Limited::Delegate,
        Limited::NodeMint,
        Limited::Approvals,
        Limited::Feed,
        Limited::Introspect,
    ];

    /// The name in flags (`--rate-limit NAME=...`) and refusals.
    pub fn name(self) -> &'static str {
        match self {
            Limited::Attest => "attest",
            Limited::TaskStart => "task-start",
            Limited::ToolCallReports => "tool-call-reports",
            Limited::JwtSvid => "jwt-svid",
            Limited::X509Svid => "x509-svid",
            Limited::SecretLease => "secret-lease",
            Limited::Delegate => "delegate",
            Limited::NodeMint => "node-mint",
            Limited::Approvals => "approvals",
            Limited::Feed => "feed",
            Limited::Introspect => "introspect",
        }
    }

    fn names() -> String {
        Self::ALL.map(Limited::name).join(", ")
    }

    /// The limited operation a request is, by method (as sent, e.g.
    /// `POST`) and path.
    pub fn of_route(method: &str, path: &str) -> Option<Self> {
        let path = path.trim_end_matches('/');
        if method == "GET" && path == "/v1/revocations/feed" {
            return Some(Limited::Feed);
        }
        if method != "POST" {
            return None;
        }
        Some(match path {
            "/v1/node/attest" => Limited::Attest,
            "/v1/tasks" => Limited::TaskStart,
            "/v1/audit/tool-calls" => Limited::ToolCallReports,
            "/v1/node/sign-jwt" => Limited::JwtSvid,
            "/v1/node/sign-x509" | "/v1/node/renew" => Limited::X509Svid,
            "/v1/secrets/lease" => Limited::SecretLease,
            "/v1/delegate" => Limited::Delegate,
            "/v1/node/redeem" | "/v1/node/renew-task" => Limited::NodeMint,
            "/v1/approvals" => Limited::Approvals,
            "/v1/secrets/introspect" => Limited::Introspect,
            _ => return None,
        })
    }
}

impl FromStr for Limited {
    type Err = RateLimitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|l| l.name() == s)
            .ok_or_else(|| RateLimitError::UnknownLimit(s.to_owned()))
    }
}

/// The limit of every [`Limited`] operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimits {
    pub attest: RateLimit,
    pub task_start: RateLimit,
    pub tool_call_reports: RateLimit,
    pub jwt_svid: RateLimit,
    pub x509_svid: RateLimit,
    pub secret_lease: RateLimit,
    pub delegate: RateLimit,
    pub node_mint: RateLimit,
    pub approvals: RateLimit,
    pub feed: RateLimit,
    pub introspect: RateLimit,
}

const fn limit(burst: u32, per_secs: u64) -> RateLimit {
    RateLimit {
        burst: match NonZeroU32::new(burst) {
            Some(b) => b,
            None => NonZeroU32::MIN,
        },
        per: Duration::from_secs(per_secs),
    }
}

impl Default for RateLimits {
    /// Far above what one honest caller needs, far below what it takes to
    /// exhaust the broker's signing or the audit log's disk.
    fn default() -> Self {
        Self {
            attest: limit(30, 60),
            task_start: limit(60, 60),
            tool_call_reports: limit(600, 60),
            jwt_svid: limit(600, 60),
            // Ten full batches at once (a node re-signing every entry
            // after a taint), then 10,000 a minute: about a sixth of one
            // core's signing, per node.
            x509_svid: limit(10_000, 60),
            secret_lease: limit(120, 60),
            // A planner fanning a task out to hundreds of sub-agents stays
            // far below it; a compromised agent cannot turn the broker's
            // signing and audit log into a disk filler at line rate.
            delegate: limit(3000, 60),
            // A node's redeems are its agents' hops: twice what one agent
            // may delegate, far below a disk filler's rate.
            node_mint: limit(6000, 60),
            // A gateway asks again each time an agent re-sends a held
            // call (every few seconds while a human decides): room for
            // hundreds of calls waiting at once.
            approvals: limit(6000, 60),
            // 100 pages a second per follower: a follower is woken once
            // per revocation (or batch of them), never more.
            feed: limit(6000, 60),
            // A tool server that introspects every API-key call it serves:
            // 500 a second, sustained.
            introspect: limit(30_000, 60),
        }
    }
}

impl RateLimits {
    pub fn get(&self, what: Limited) -> RateLimit {
        match what {
            Limited::Attest => self.attest,
            Limited::TaskStart => self.task_start,
            Limited::ToolCallReports => self.tool_call_reports,
            Limited::JwtSvid => self.jwt_svid,
            Limited::X509Svid => self.x509_svid,
            Limited::SecretLease => self.secret_lease,
            Limited::Delegate => self.delegate,
            Limited::NodeMint => self.node_mint,
            Limited::Approvals => self.approvals,
            Limited::Feed => self.feed,
            Limited::Introspect => self.introspect,
        }
    }

    pub fn set(&mut self, what: Limited, limit: RateLimit) {
        match what {
            Limited::Attest => self.attest = limit,
            Limited::TaskStart => self.task_start = limit,
            Limited::ToolCallReports => self.tool_call_reports = limit,
            Limited::JwtSvid => self.jwt_svid = limit,
            Limited::X509Svid => self.x509_svid = limit,
            Limited::SecretLease => self.secret_lease = limit,
            Limited::Delegate => self.delegate = limit,
            Limited::NodeMint => self.node_mint = limit,
            Limited::Approvals => self.approvals = limit,
            Limited::Feed => self.feed = limit,
            Limited::Introspect => self.introspect = limit,
        }
    }

    /// Applies `NAME=COUNT/PERIOD` (the `--rate-limit` flag).
    pub fn apply(&mut self, assignment: &str) -> Result<(), RateLimitError> {
        let (name, value) = assignment
            .split_once('=')
            .ok_or_else(|| RateLimitError::Assignment(assignment.to_owned()))?;
        let what: Limited = name.trim().parse()?;
        let limit: RateLimit = value.trim().parse()?;
        if what == Limited::X509Svid
            && usize::try_from(limit.burst.get()).unwrap_or(usize::MAX)
                < crate::service::MAX_SIGN_BATCH
        {
            return Err(RateLimitError::BurstBelowBatch(limit));
        }
        self.set(what, limit);
        Ok(())
    }
}

/// Who is charged for a request.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Caller {
    Spiffe(SpiffeId),
    /// An IPv4 address, or the /64 of an IPv6 one.
    Ip(IpAddr),
}

impl Caller {
    /// The verified mTLS peer, else the remote address.
    pub fn of(peer: Option<&SpiffeId>, addr: Option<IpAddr>) -> Option<Self> {
        match (peer, addr) {
            (Some(id), _) => Some(Caller::Spiffe(id.clone())),
            (None, Some(ip)) => Some(Caller::ip(ip)),
            (None, None) => None,
        }
    }

    /// The address, IPv6 cut to its /64.
    pub fn ip(ip: IpAddr) -> Self {
        match ip.to_canonical() {
            IpAddr::V6(v6) => {
                let s = v6.segments();
                Caller::Ip(IpAddr::V6(std::net::Ipv6Addr::new(
                    s[0], s[1], s[2], s[3], 0, 0, 0, 0,
                )))
            }
            v4 => Caller::Ip(v4),
        }
    }
}

impl fmt::Display for Caller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Caller::Spiffe(id) => write!(f, "{id}"),
            Caller::Ip(IpAddr::V6(v6)) => write!(f, "{v6}/64"),
            Caller::Ip(ip) => write!(f, "{ip}"),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// One token bucket per caller for one [`RateLimit`], with time passed in.
#[derive(Debug)]
pub struct KeyedBuckets {
    limit: RateLimit,
    max_keys: usize,
    buckets: Mutex<HashMap<Caller, Bucket>>,
}

impl KeyedBuckets {
    pub fn new(limit: RateLimit, max_keys: usize) -> Self {
        Self {
            limit,
            max_keys: max_keys.max(1),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Callers remembered now.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Caller, Bucket>> {
        // A poisoned map is still a map of buckets.
        self.buckets.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes one token for `caller` at `now`, or says how long until one
    /// is there.
    pub fn check(&self, caller: &Caller, now: Instant) -> Result<(), Duration> {
        self.take(caller, 1, now)
    }

    /// Takes `n` tokens for `caller` at `now`, all or none, or says how
    /// long until `n` are there (never, past the burst: then the time to
    /// refill the whole burst, and the caller must send less at once).
    pub fn take(&self, caller: &Caller, n: u32, now: Instant) -> Result<(), Duration> {
        if n == 0 {
            return Ok(());
        }
        let wanted = f64::from(n);
        let limit = self.limit;
        let burst = f64::from(limit.burst.get());
        let refill =
            |b: &Bucket| (b.tokens + limit.earned(now.saturating_duration_since(b.at))).min(burst);
        let mut buckets = self.lock();
        if !buckets.contains_key(caller) && buckets.len() >= self.max_keys {
            // Forget the callers whose buckets are full again: nothing is
            // lost, they would start full anyway.
            buckets.retain(|_, b| refill(b) < burst);
            if buckets.len() >= self.max_keys
                && let Some(oldest) = buckets
                    .iter()
                    .min_by_key(|(_, b)| b.at)
                    .map(|(k, _)| k.clone())
            {
                buckets.remove(&oldest);
            }
        }
        let bucket = buckets.entry(caller.clone()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        let tokens = refill(bucket);
        bucket.at = now.max(bucket.at);
        if tokens >= wanted {
            bucket.tokens = tokens - wanted;
            Ok(())
        } else {
            bucket.tokens = tokens;
            Err(if wanted > burst {
                limit.per
            } else {
                limit.time_for(wanted - tokens)
            })
        }
    }
}

/// A refusal: which limit, for whom, and when to come back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimited {
    pub what: Limited,
    pub limit: RateLimit,
    pub caller: Caller,
    pub retry_after: Duration,
}

impl RateLimited {
    /// Whole seconds for `Retry-After`, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        // Milliseconds first, so float noise does not add a second.
        let ms = u64::try_from(self.retry_after.as_millis()).unwrap_or(u64::MAX);
        ms.div_ceil(1000).max(1)
    }
}

impl fmt::Display for RateLimited {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "rate limit {} ({} per caller) exceeded for {}; retry after {} s",
            self.what.name(),
            self.limit,
            self.caller,
            self.retry_after_secs()
        )
    }
}

/// The buckets of every limited operation.
#[derive(Debug)]
pub struct RateLimiters {
    buckets: HashMap<Limited, KeyedBuckets>,
}

impl RateLimiters {
    pub fn new(limits: &RateLimits) -> Self {
        Self::with_max_keys(limits, MAX_KEYS)
    }

    pub fn with_max_keys(limits: &RateLimits, max_keys: usize) -> Self {
        Self {
            buckets: Limited::ALL
                .into_iter()
                .map(|l| (l, KeyedBuckets::new(limits.get(l), max_keys)))
                .collect(),
        }
    }

    /// Charges `caller` one `what` at `now`.
    pub fn check(&self, what: Limited, caller: &Caller, now: Instant) -> Result<(), RateLimited> {
        self.charge(what, caller, 1, now)
    }

    /// Charges `caller` `n` of `what` at `now`, all or none: a batch
    /// counted in items, once its size is known.
    pub fn charge(
        &self,
        what: Limited,
        caller: &Caller,
        n: u32,
        now: Instant,
    ) -> Result<(), RateLimited> {
        let Some(buckets) = self.buckets.get(&what) else {
            return Ok(());
        };
        buckets
            .take(caller, n, now)
            .map_err(|retry_after| RateLimited {
                what,
                limit: buckets.limit(),
                caller: caller.clone(),
                retry_after,
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Caller {
        Caller::ip(s.parse().unwrap())
    }

    fn every(burst: u32, per_secs: u64) -> RateLimit {
        RateLimit::new(
            NonZeroU32::new(burst).unwrap(),
            Duration::from_secs(per_secs),
        )
        .unwrap()
    }

    #[test]
    fn a_burst_then_refusals_then_refill() {
        let b = KeyedBuckets::new(every(3, 60), 10);
        let t0 = Instant::now();
        let a = ip("10.0.0.1");
        for _ in 0..3 {
            assert!(b.check(&a, t0).is_ok());
        }
        // One token comes back every 20 s.
        let wait = b.check(&a, t0).unwrap_err();
        assert_eq!(wait.as_millis(), 20_000);
        let wait = b.check(&a, t0 + Duration::from_secs(5)).unwrap_err();
        assert_eq!(wait.as_millis(), 15_000);
        assert!(b.check(&a, t0 + Duration::from_millis(20_010)).is_ok());
        assert!(b.check(&a, t0 + Duration::from_secs(21)).is_err());
        // Never more than the burst, however long the pause.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            assert!(b.check(&a, later).is_ok());
        }
        assert!(b.check(&a, later).is_err());
    }

    #[test]
    fn a_batch_takes_a_token_per_item_all_or_none() {
        let b = KeyedBuckets::new(every(1000, 60), 10);
        let t0 = Instant::now();
        let node = ip("10.0.0.1");
        assert!(b.take(&node, 600, t0).is_ok());
        // 400 left: a batch of 500 takes nothing and waits for 100 more.
        let wait = b.take(&node, 500, t0).unwrap_err();
        assert_eq!(wait.as_millis(), 6_000);
        assert!(b.take(&node, 400, t0).is_ok());
        assert!(b.check(&node, t0).is_err());
        // More than the burst never fits: the wait is a whole refill.
        let later = t0 + Duration::from_secs(3600);
        let wait = b.take(&node, 1001, later).unwrap_err();
        assert_eq!(wait, Duration::from_secs(60));
        assert!(b.take(&node, 1000, later).is_ok());
        assert!(b.take(&node, 0, later).is_ok());
    }

    #[test]
    fn callers_have_their_own_buckets() {
        let b = KeyedBuckets::new(every(1, 60), 10);
        let t0 = Instant::now();
        let alice = Caller::Spiffe(SpiffeId::parse("spiffe://example.org/a").unwrap());
        let bob = Caller::Spiffe(SpiffeId::parse("spiffe://example.org/b").unwrap());
        assert!(b.check(&alice, t0).is_ok());
        assert!(b.check(&alice, t0).is_err());
        // Control: another caller is not affected.
        assert!(b.check(&bob, t0).is_ok());
    }

    #[test]
    fn ipv6_callers_are_charged_by_their_64() {
        assert_eq!(ip("2001:db8:1:2:aaaa::1"), ip("2001:db8:1:2:bbbb::2"));
        assert_ne!(ip("2001:db8:1:2::1"), ip("2001:db8:1:3::1"));
        // An IPv4-mapped address is the IPv4 caller.
        assert_eq!(ip("::ffff:10.0.0.1"), ip("10.0.0.1"));
        assert_eq!(ip("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
    }

    #[test]
    fn memory_is_bounded_and_idle_callers_go_first() {
        let b = KeyedBuckets::new(every(2, 10), 3);
        let t0 = Instant::now();
        let hot = ip("10.0.0.1");
        assert!(b.check(&hot, t0).is_ok());
        assert!(b.check(&hot, t0).is_ok());
        assert!(b.check(&hot, t0).is_err());
        for n in 2..200 {
            let _ = b.check(&ip(&format!("10.0.{}.{}", n / 256, n % 256)), t0);
            assert!(b.len() <= 3);
        }
        // Many new callers at once evict the oldest, so the cap holds even
        // then; after a pause, full buckets are dropped before anyone
        // active.
        let b = KeyedBuckets::new(every(2, 10), 3);
        assert!(b.check(&ip("10.0.0.2"), t0).is_ok());
        assert!(b.check(&ip("10.0.0.3"), t0).is_ok());
        let t1 = t0 + Duration::from_secs(20);
        assert!(b.check(&hot, t1).is_ok());
        assert!(b.check(&hot, t1).is_ok());
        assert!(b.check(&ip("10.0.0.4"), t1).is_ok());
        assert!(b.check(&ip("10.0.0.5"), t1).is_ok());
        assert!(b.len() <= 3);
        // The hot caller is still remembered as empty.
        assert!(b.check(&hot, t1).is_err());
    }

    #[test]
    fn limits_parse_and_refuse_nonsense() {
        let l: RateLimit = "30/1m".parse().unwrap();
        assert_eq!(l.burst.get(), 30);
        assert_eq!(l.per, Duration::from_secs(60));
        assert_eq!(l.to_string(), "30/1m");
        for bad in ["30", "0/1m", "x/1m", "30/0s", "30/soon", "-1/1m"] {
            assert!(bad.parse::<RateLimit>().is_err(), "{bad}");
        }
        let mut limits = RateLimits::default();
        limits.apply("task-start=2/1h").unwrap();
        assert_eq!(limits.task_start.burst.get(), 2);
        let err = limits.apply("tasks=2/1h").unwrap_err().to_string();
        assert!(err.contains("task-start"), "{err}");
        assert!(limits.apply("task-start").is_err());
        // A node's largest batch must fit in the X509-SVID burst.
        let err = limits.apply("x509-svid=999/1m").unwrap_err().to_string();
        assert!(err.contains("at least 1000"), "{err}");
        assert_eq!(limits.x509_svid, RateLimits::default().x509_svid);
        limits.apply("x509-svid=1000/1h").unwrap();
        assert_eq!(limits.x509_svid.burst.get(), 1000);
    }

    #[test]
    fn routes_map_to_their_limits() {
        assert_eq!(
            Limited::of_route("POST", "/v1/node/attest"),
            Some(Limited::Attest)
        );
        assert_eq!(
            Limited::of_route("POST", "/v1/tasks"),
            Some(Limited::TaskStart)
        );
        assert_eq!(
            Limited::of_route("POST", "/v1/audit/tool-calls"),
            Some(Limited::ToolCallReports)
        );
        assert_eq!(
            Limited::of_route("POST", "/v1/node/sign-jwt"),
            Some(Limited::JwtSvid)
        );
        assert_eq!(
            Limited::of_route("POST", "/v1/secrets/lease"),
            Some(Limited::SecretLease)
        );
        for signing in ["/v1/node/sign-x509", "/v1/node/renew"] {
            assert_eq!(Limited::of_route("POST", signing), Some(Limited::X509Svid));
        }
        // The HTTP shell routes a trailing slash to the same handler.
        assert_eq!(
            Limited::of_route("POST", "/v1/tasks/"),
            Some(Limited::TaskStart)
        );
        assert_eq!(
            Limited::of_route("GET", "/v1/revocations/feed"),
            Some(Limited::Feed)
        );
        assert_eq!(Limited::of_route("POST", "/v1/revocations/feed"), None);
        assert_eq!(
            Limited::of_route("POST", "/v1/secrets/introspect"),
            Some(Limited::Introspect)
        );
        assert_eq!(Limited::of_route("GET", "/v1/node/attest"), None);
        assert_eq!(Limited::of_route("POST", "/v1/node/sync"), None);
    }

    #[test]
    fn refusal_names_the_limit_and_a_whole_retry_after() {
        let limiters = RateLimiters::new(&RateLimits {
            task_start: every(1, 60),
            ..RateLimits::default()
        });
        let t0 = Instant::now();
        let who = ip("10.1.2.3");
        limiters.check(Limited::TaskStart, &who, t0).unwrap();
        let refused = limiters.check(Limited::TaskStart, &who, t0).unwrap_err();
        assert_eq!(refused.retry_after_secs(), 60);
        let text = refused.to_string();
        assert!(text.contains("task-start"), "{text}");
        assert!(text.contains("1/1m"), "{text}");
        assert!(text.contains("10.1.2.3"), "{text}");
        // Control: another limit of the same caller is untouched.
        limiters.check(Limited::Attest, &who, t0).unwrap();
    }
}
