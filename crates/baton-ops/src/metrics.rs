//! The metric families of every role, process-wide.
//!
//! Names follow the Prometheus conventions: a `baton_` prefix, base units
//! (seconds), `_total` on counters (added by the encoder). Every label
//! value is a `&'static str` from a closed set (a route template, a
//! refusal code, a tier) or a number (an HTTP status): nothing a caller
//! sends, no token, no task id, no SPIFFE ID can become a label, so the
//! series count stays bounded and a scrape leaks no secret.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::health::Role;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    /// The route's template (`/v1/node/sync`), or `unmatched`.
    pub route: &'static str,
    /// The HTTP status code answered.
    pub code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssueLabels {
    /// `x509`, `jwt` or `token`.
    pub kind: &'static str,
    /// Who holds it: `agent` (a node's own SVID), `workload` or `task`.
    pub holder: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    /// The refusal code the caller is told (`scope_widened`, ...).
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ToolCallLabels {
    /// The call's risk tier (`read`, `write`, `sensitive`, ...).
    pub tier: &'static str,
    /// `allow` or `deny`.
    pub decision: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabels {
    /// What was revoked: `credential`, `subtree`, `task`, `agent`, `node`
    /// or `purpose` (every credential of a task after a purpose change).
    pub target: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// `sqlite` (the datastore) or `redis` (the revocation store).
    pub store: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorityLabels {
    /// `x509` or `jwt`.
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthorityStateLabels {
    pub kind: &'static str,
    /// `prepared`, `active`, `old`, `tainted` or `revoked`.
    pub state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    /// The RPC's method name (`FetchX509SVID`, `Redeem`, ...), or `unmatched`.
    pub rpc: &'static str,
    /// The gRPC status name the call opened with (`OK`, `PERMISSION_DENIED`, ...).
    pub code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// `x509_svid`, `x509_bundles` or `jwt_bundles`.
    pub stream: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency() -> Histogram {
    Histogram::new([
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    ])
}

/// Audit durability lag: a batch waits for a commit (an fsync with
/// power-loss durability) and the head file, from ~0.1 ms up.
fn durability() -> Histogram {
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ])
}

/// Events per committed audit batch (one signed checkpoint each).
fn batch_events() -> Histogram {
    Histogram::new([
        1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0,
    ])
}

fn cascade() -> Histogram {
    Histogram::new([
        1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 1000.0, 10_000.0, 100_000.0,
    ])
}

/// Every family Baton exports; see [`metrics()`].
#[derive(Debug)]
pub struct Metrics {
    // ---- broker ----
    pub http_requests: Family<RouteLabels, Counter>,
    pub http_request_duration: HistogramFamily<RouteLabels>,
    pub issued: Family<IssueLabels, Counter>,
    pub hops_granted: Counter,
    pub hops_refused: Family<ReasonLabels, Counter>,
    pub redeems: Family<DecisionLabels, Counter>,
    pub tool_calls: Family<ToolCallLabels, Counter>,
    pub revocations: Family<TargetLabels, Counter>,
    pub revoked_credentials: Family<TargetLabels, Counter>,
    pub cascade_size: HistogramFamily<TargetLabels>,
    pub store_errors: Family<StoreLabels, Counter>,
    pub audit_appends: Counter,
    pub audit_append_failures: Counter,
    pub audit_append_duration: Histogram,
    pub audit_batch_events: Histogram,
    pub audit_durability: Histogram,
    pub authority_expiry: Family<AuthorityLabels, Gauge>,
    pub authorities: Family<AuthorityStateLabels, Gauge>,
    audit_last_failed: AtomicBool,
    agent_node_svid_not_after: AtomicU64,
    revocation_last_ok: AtomicU64,
    // ---- node daemon ----
    pub agent_rpcs: Family<RpcLabels, Counter>,
    pub agent_rpc_duration: HistogramFamily<RpcLabels>,
    pub agent_cached_svids: Gauge,
    pub agent_node_svid_expiry: Gauge,
    pub agent_syncs: Counter,
    pub agent_sync_failures: Counter,
    pub agent_last_sync: Gauge,
    pub agent_last_sync_age: Gauge,
    pub agent_node_refused: Gauge,
    pub agent_streams_open: Family<StreamLabels, Gauge>,
    // ---- revocation service ----
    pub revocation_store_up: Gauge,
    pub revocation_store_seeded: Gauge,
    pub revocation_store_checks: Family<DecisionLabels, Counter>,
    pub revocation_last_check_age: Gauge,
    // ---- verifier (tool server) ----
    pub verifier_feed_fresh: Gauge,
    pub verifier_feed_stale_seconds: Gauge,
    pub verifier_feed_revoked_ids: Gauge,
    pub verifier_spool_pending: Gauge,
    pub verifier_spool_up: Gauge,
}

static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// The process-wide metrics. Counting is always on (an atomic add); only
/// `--ops-listen` exposes them.
pub fn metrics() -> &'static Metrics {
    &METRICS
}

impl Metrics {
    fn new() -> Self {
        Self {
            http_requests: Family::default(),
            http_request_duration: Family::new_with_constructor(latency as fn() -> Histogram),
            issued: Family::default(),
            hops_granted: Counter::default(),
            hops_refused: Family::default(),
            redeems: Family::default(),
            tool_calls: Family::default(),
            revocations: Family::default(),
            revoked_credentials: Family::default(),
            cascade_size: Family::new_with_constructor(cascade as fn() -> Histogram),
            store_errors: Family::default(),
            audit_appends: Counter::default(),
            audit_append_failures: Counter::default(),
            audit_append_duration: latency(),
            audit_batch_events: batch_events(),
            audit_durability: durability(),
            authority_expiry: Family::default(),
            authorities: Family::default(),
            audit_last_failed: AtomicBool::new(false),
            agent_node_svid_not_after: AtomicU64::new(0),
            revocation_last_ok: AtomicU64::new(0),
            agent_rpcs: Family::default(),
            agent_rpc_duration: Family::new_with_constructor(latency as fn() -> Histogram),
            agent_cached_svids: Gauge::default(),
            agent_node_svid_expiry: Gauge::default(),
            agent_syncs: Counter::default(),
            agent_sync_failures: Counter::default(),
            agent_last_sync: Gauge::default(),
            agent_last_sync_age: Gauge::default(),
            agent_node_refused: Gauge::default(),
            agent_streams_open: Family::default(),
            revocation_store_up: Gauge::default(),
            revocation_store_seeded: Gauge::default(),
            revocation_store_checks: Family::default(),
            revocation_last_check_age: Gauge::default(),
            verifier_feed_fresh: Gauge::default(),
            verifier_feed_stale_seconds: Gauge::default(),
            verifier_feed_revoked_ids: Gauge::default(),
            verifier_spool_pending: Gauge::default(),
            verifier_spool_up: Gauge::default(),
        }
    }

    // ---- one-line calls for the broker ----

    /// One request answered on the broker's HTTPS port.
    pub fn http_request(&self, route: &'static str, code: u16, seconds: f64) {
        let l = RouteLabels { route, code };
        self.http_requests.get_or_create(&l).inc();
        self.http_request_duration
            .get_or_create(&l)
            .observe(seconds);
    }

    /// A credential handed out: `kind` is `x509`, `jwt` or `token`.
    pub fn issued(&self, kind: &'static str, holder: &'static str) {
        self.issued
            .get_or_create(&IssueLabels { kind, holder })
            .inc();
    }

    pub fn hop_granted(&self) {
        self.hops_granted.inc();
    }

    pub fn hop_refused(&self, reason: &'static str) {
        self.hops_refused
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// `granted`, `redelivered` (the same request replayed after its answer
    /// was lost) or `refused`.
    pub fn redeem(&self, decision: &'static str) {
        self.redeems
            .get_or_create(&DecisionLabels { decision })
            .inc();
    }

    pub fn tool_call(&self, tier: &'static str, decision: &'static str) {
        self.tool_calls
            .get_or_create(&ToolCallLabels { tier, decision })
            .inc();
    }

    /// A revocation command and how many credentials it covered.
    pub fn revoked(&self, target: &'static str, credentials: usize) {
        let l = TargetLabels { target };
        self.revocations.get_or_create(&l).inc();
        let n = u64::try_from(credentials).unwrap_or(u64::MAX);
        self.revoked_credentials.get_or_create(&l).inc_by(n);
        self.cascade_size.get_or_create(&l).observe(n as f64);
    }

    /// A failed call to the datastore (`sqlite`, or `postgres_datastore`
    /// with `--datastore`), a secret engine's PostgreSQL (`postgres`) or
    /// Redis (`redis`).
    pub fn store_error(&self, store: &'static str) {
        self.store_errors
            .get_or_create(&StoreLabels { store })
            .inc();
    }

    /// An audit append and how long it took (commit and head file).
    pub fn audit_append(&self, ok: bool, seconds: f64) {
        if ok {
            self.audit_appends.inc();
        } else {
            self.audit_append_failures.inc();
        }
        self.audit_append_duration.observe(seconds);
        self.audit_last_failed.store(!ok, Ordering::SeqCst);
    }

    /// One batch of audit events became durable under one signed
    /// checkpoint: its size, and each event's wait from its append call.
    pub fn audit_batch_durable(&self, lags: &[std::time::Duration]) {
        self.audit_batch_events.observe(lags.len() as f64);
        for lag in lags {
            self.audit_durability.observe(lag.as_secs_f64());
        }
    }

    /// Whether the newest audit append failed (readiness reads it).
    pub fn audit_last_append_failed(&self) -> bool {
        self.audit_last_failed.load(Ordering::SeqCst)
    }

    // ---- one-line calls for the node daemon ----

    /// One call on the node daemon's socket.
    pub fn agent_rpc(&self, rpc: &'static str, code: &'static str, seconds: f64) {
        let l = RpcLabels { rpc, code };
        self.agent_rpcs.get_or_create(&l).inc();
        self.agent_rpc_duration.get_or_create(&l).observe(seconds);
    }

    /// A sync round ended: `refused` when the broker refused the node
    /// itself (evicted, banned, its SVID revoked).
    pub fn agent_sync(&self, now: u64, ok: bool, refused: bool) {
        if ok {
            self.agent_syncs.inc();
            self.agent_last_sync.set(secs(now));
            self.agent_node_refused.set(0);
        } else {
            self.agent_sync_failures.inc();
        }
        if refused {
            self.agent_node_refused.set(1);
        }
    }

    /// The node's agent SVID now in use expires at `not_after` (unix s).
    pub fn agent_node_svid(&self, not_after: u64) {
        self.agent_node_svid_not_after
            .store(not_after, Ordering::SeqCst);
    }

    /// When the node's agent SVID expires (0: none yet).
    pub fn agent_node_svid_not_after(&self) -> u64 {
        self.agent_node_svid_not_after.load(Ordering::SeqCst)
    }

    /// A Workload API stream opened; it counts as open until the guard
    /// is dropped with the stream.
    pub fn stream_opened(&self, stream: &'static str) -> StreamGuard {
        self.agent_streams_open
            .get_or_create(&StreamLabels { stream })
            .inc();
        StreamGuard(stream)
    }

    // ---- one-line calls for the revocation service ----

    /// A check of the revocation store: `None` when Redis did not answer,
    /// else whether it holds a seeded deny set.
    pub fn revocation_check(&self, now: u64, seeded: Option<bool>) {
        let outcome = match seeded {
            None => "unreachable",
            Some(false) => "unseeded",
            Some(true) => "ok",
        };
        self.revocation_store_checks
            .get_or_create(&DecisionLabels { decision: outcome })
            .inc();
        self.revocation_store_up.set(i64::from(seeded.is_some()));
        if let Some(s) = seeded {
            self.revocation_store_seeded.set(i64::from(s));
            self.revocation_last_ok.store(now, Ordering::SeqCst);
        }
    }

    /// Scrape-time gauges of the revocation service.
    pub fn revocation_refresh(&self, now: u64) {
        let last = self.revocation_last_ok.load(Ordering::SeqCst);
        self.revocation_last_check_age.set(if last == 0 {
            -1
        } else {
            secs(now.saturating_sub(last))
        });
    }

    // ---- one-line calls for a verifier ----

    /// Scrape-time gauges of a verifier's revocation feed: whether it is
    /// fresh, how long since it last heard from its source while it is
    /// stale (0 while fresh, -1 if it never heard), and how many revoked
    /// ids it holds.
    pub fn verifier_feed(&self, fresh: bool, silent_for: Option<u64>, revoked_ids: usize) {
        self.verifier_feed_fresh.set(i64::from(fresh));
        self.verifier_feed_stale_seconds
            .set(match (fresh, silent_for) {
                (true, _) => 0,
                (false, Some(s)) => secs(s),
                (false, None) => -1,
            });
        self.verifier_feed_revoked_ids
            .set(i64::try_from(revoked_ids).unwrap_or(i64::MAX));
    }

    /// Scrape-time gauges of a verifier's call-report spool: records
    /// durable but not yet delivered to the broker, and whether its last
    /// write succeeded.
    pub fn verifier_spool(&self, pending: usize, up: bool) {
        self.verifier_spool_pending
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
        self.verifier_spool_up.set(i64::from(up));
    }

    /// Registers the families of `role` into `registry`.
    pub(crate) fn register(&self, registry: &mut Registry, role: Role) {
        match role {
            Role::Broker => self.register_broker(registry),
            Role::Agent => self.register_agent(registry),
            Role::Revocation => self.register_revocation(registry),
            Role::Verifier => self.register_verifier(registry),
        }
    }

    fn register_broker(&self, r: &mut Registry) {
        r.register(
            "baton_http_requests",
            "Requests answered on the broker's HTTPS port, by route template and status code",
            self.http_requests.clone(),
        );
        r.register_with_unit(
            "baton_http_request_duration",
            "Time to answer a request on the broker's HTTPS port",
            Unit::Seconds,
            self.http_request_duration.clone(),
        );
        r.register(
            "baton_credentials_issued",
            "Credentials handed out, by kind (x509, jwt, token) and holder (agent, workload, task)",
            self.issued.clone(),
        );
        r.register(
            "baton_hops_granted",
            "Hops (delegations) granted",
            self.hops_granted.clone(),
        );
        r.register(
            "baton_hops_refused",
            "Hops (delegations) refused, by refusal code",
            self.hops_refused.clone(),
        );
        r.register(
            "baton_redeems",
            "Grant redemptions, by decision",
            self.redeems.clone(),
        );
        r.register(
            "baton_tool_calls",
            "Tool calls reported by tool servers, by risk tier and decision",
            self.tool_calls.clone(),
        );
        r.register(
            "baton_revocations",
            "Revocation commands that revoked something, by target",
            self.revocations.clone(),
        );
        r.register(
            "baton_revoked_credentials",
            "Credentials covered by revocations (cascades included), by target",
            self.revoked_credentials.clone(),
        );
        r.register(
            "baton_revocation_cascade_credentials",
            "Credentials covered by one revocation, by target",
            self.cascade_size.clone(),
        );
        r.register(
            "baton_store_errors",
            "Failed calls to the datastore (sqlite), a secret engine's PostgreSQL (postgres) or the revocation store (redis)",
            self.store_errors.clone(),
        );
        r.register(
            "baton_audit_appends",
            "Events appended to the audit log",
            self.audit_appends.clone(),
        );
        r.register(
            "baton_audit_append_failures",
            "Audit appends that failed (the request was refused)",
            self.audit_append_failures.clone(),
        );
        r.register_with_unit(
            "baton_audit_append_duration",
            "Time to append one audit event durably",
            Unit::Seconds,
            self.audit_append_duration.clone(),
        );
        r.register(
            "baton_audit_batch_events",
            "Events per committed audit batch (each batch is one transaction with one signed checkpoint)",
            self.audit_batch_events.clone(),
        );
        r.register_with_unit(
            "baton_audit_durability",
            "Time from an audit append call to its event being durable (committed, head file written)",
            Unit::Seconds,
            self.audit_durability.clone(),
        );
        r.register(
            "baton_ca_active_authority_expiry_seconds",
            "Seconds until the active authority expires, by kind (x509, jwt)",
            self.authority_expiry.clone(),
        );
        r.register(
            "baton_ca_authorities",
            "Authorities in the CA journal, by kind and state",
            self.authorities.clone(),
        );
    }

    fn register_agent(&self, r: &mut Registry) {
        r.register(
            "baton_agent_rpcs",
            "Calls on the node daemon's socket (Workload API, Delegation), by RPC and gRPC status",
            self.agent_rpcs.clone(),
        );
        r.register_with_unit(
            "baton_agent_rpc_duration",
            "Time to answer a call on the node daemon's socket (a stream: to its opening)",
            Unit::Seconds,
            self.agent_rpc_duration.clone(),
        );
        r.register(
            "baton_agent_cached_svids",
            "Workload X509-SVIDs in the node daemon's cache",
            self.agent_cached_svids.clone(),
        );
        r.register(
            "baton_agent_node_svid_expiry_seconds",
            "Seconds until the node's own agent SVID expires",
            self.agent_node_svid_expiry.clone(),
        );
        r.register(
            "baton_agent_syncs",
            "Successful syncs with the broker",
            self.agent_syncs.clone(),
        );
        r.register(
            "baton_agent_sync_failures",
            "Failed syncs with the broker",
            self.agent_sync_failures.clone(),
        );
        r.register(
            "baton_agent_last_sync_timestamp_seconds",
            "Unix time of the last successful sync",
            self.agent_last_sync.clone(),
        );
        r.register(
            "baton_agent_last_sync_age_seconds",
            "Seconds since the last successful sync",
            self.agent_last_sync_age.clone(),
        );
        r.register(
            "baton_agent_node_refused",
            "1 when the broker refuses this node (evicted, banned, SVID revoked)",
            self.agent_node_refused.clone(),
        );
        r.register(
            "baton_agent_workload_streams_open",
            "Workload API streams open, by stream",
            self.agent_streams_open.clone(),
        );
    }

    fn register_verifier(&self, r: &mut Registry) {
        r.register(
            "baton_verifier_feed_fresh",
            "1 when the revocation feed heard from its source within its staleness window",
            self.verifier_feed_fresh.clone(),
        );
        r.register(
            "baton_verifier_feed_stale_seconds",
            "While the revocation feed is stale, seconds since it last heard from its source (0 while fresh, -1 never)",
            self.verifier_feed_stale_seconds.clone(),
        );
        r.register(
            "baton_verifier_feed_revoked_ids",
            "Revoked credential ids the verifier holds in memory",
            self.verifier_feed_revoked_ids.clone(),
        );
        r.register(
            "baton_verifier_spool_pending_reports",
            "Call reports durable in the spool, not yet delivered to the broker",
            self.verifier_spool_pending.clone(),
        );
        r.register(
            "baton_verifier_spool_up",
            "1 while the last write to the call-report spool succeeded",
            self.verifier_spool_up.clone(),
        );
    }

    fn register_revocation(&self, r: &mut Registry) {
        r.register(
            "baton_revocation_store_up",
            "1 when the last check reached Redis",
            self.revocation_store_up.clone(),
        );
        r.register(
            "baton_revocation_store_seeded",
            "1 when Redis holds a seeded deny set (its epoch), 0 when it lost its data",
            self.revocation_store_seeded.clone(),
        );
        r.register(
            "baton_revocation_store_checks",
            "Checks of the revocation store, by outcome in the decision label (ok, unseeded, unreachable)",
            self.revocation_store_checks.clone(),
        );
        r.register(
            "baton_revocation_last_check_age_seconds",
            "Seconds since Redis last answered a check (-1: never)",
            self.revocation_last_check_age.clone(),
        );
    }
}

/// Keeps a Workload API stream counted as open; see
/// [`Metrics::stream_opened`].
#[derive(Debug)]
pub struct StreamGuard(&'static str);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        metrics()
            .agent_streams_open
            .get_or_create(&StreamLabels { stream: self.0 })
            .dec();
    }
}

/// A `Gauge` value from seconds, saturating.
pub fn secs(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}
