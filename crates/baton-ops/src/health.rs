//! The [`Ops`] handle: which roles a process runs, their readiness checks
//! and the gauges computed at scrape time.

use std::collections::BTreeSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use prometheus_client::registry::Registry;
use serde::Serialize;

use crate::OpsError;
use crate::metrics::metrics;

/// A long-running Baton role whose metric families a process exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Broker,
    Agent,
    Revocation,
    /// A tool server (or gateway) that verifies calls and follows the
    /// revocation feed.
    Verifier,
}

type CheckFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;
type CheckFn = Arc<dyn Fn() -> CheckFuture + Send + Sync>;
type RefreshFn = Arc<dyn Fn() + Send + Sync>;

/// How long one readiness check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// `/readyz` answers from the last run of the checks for this long, and
/// concurrent probes share one run: hammering the port cannot turn into
/// a load on the datastore or Redis.
const READY_REUSE: Duration = Duration::from_secs(1);

/// Serialises scrapes: the metrics they refresh are the process's own
/// (`metrics()`), shared by every `Ops`.
static SCRAPE: Mutex<()> = Mutex::new(());

#[derive(Default)]
struct Inner {
    roles: Mutex<BTreeSet<Role>>,
    checks: Mutex<Vec<(&'static str, CheckFn)>>,
    refreshers: Mutex<Vec<RefreshFn>>,
    started: AtomicBool,
    /// Bumped when the checks change (a check added, the process started):
    /// a run from before is not reused.
    generation: AtomicU64,
    last_ready: tokio::sync::Mutex<Option<(tokio::time::Instant, u64, Readiness)>>,
}

/// What a process exposes on its ops listener. Cheap to clone; the daemons
/// add their roles and checks to it as they start.
#[derive(Clone, Default)]
pub struct Ops {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ops")
            .field("roles", &*lock(&self.inner.roles))
            .field(
                "checks",
                &lock(&self.inner.checks)
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}

/// A poisoned lock only means another thread panicked while holding it;
/// the lists it guards are still whole.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// One check's outcome, as `/readyz` lists it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckReport {
    pub name: &'static str,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The answer of `/readyz`.
#[derive(Debug, Clone, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub checks: Vec<CheckReport>,
}

impl Readiness {
    /// The names of the failing checks.
    pub fn failing(&self) -> Vec<&'static str> {
        self.checks
            .iter()
            .filter(|c| !c.ok)
            .map(|c| c.name)
            .collect()
    }
}

impl Ops {
    /// A handle with no role yet, not started: `/readyz` answers 503
    /// (`started`) until [`Ops::set_started`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Exports `role`'s metric families.
    pub fn add_role(&self, role: Role) {
        lock(&self.inner.roles).insert(role);
    }

    /// A readiness check: `Err(why)` makes `/readyz` answer 503 naming
    /// `name`. Checks run at every `/readyz`, concurrently, each bounded by
    /// a few seconds; they must not block the async worker.
    pub fn add_check<F, Fut>(&self, name: &'static str, check: F)
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let f: CheckFn = Arc::new(move || Box::pin(check()) as CheckFuture);
        lock(&self.inner.checks).push((name, f));
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Called before each scrape, to set gauges computed from state
    /// (seconds to an expiry, a cache's size).
    pub fn on_scrape(&self, refresh: impl Fn() + Send + Sync + 'static) {
        lock(&self.inner.refreshers).push(Arc::new(refresh));
    }

    /// The process finished starting (every role it runs is serving).
    pub fn set_started(&self) {
        self.inner.started.store(true, Ordering::SeqCst);
        self.inner.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// The checks' outcome as `/readyz` answers it: a run at most
    /// [`READY_REUSE`] old, shared by concurrent callers.
    pub async fn readiness_shared(&self) -> Readiness {
        let mut last = self.inner.last_ready.lock().await;
        let generation = self.inner.generation.load(Ordering::SeqCst);
        if let Some((at, g, r)) = last.as_ref()
            && *g == generation
            && at.elapsed() < READY_REUSE
        {
            return r.clone();
        }
        let r = self.readiness().await;
        *last = Some((tokio::time::Instant::now(), generation, r.clone()));
        r
    }

    /// Runs every check.
    pub async fn readiness(&self) -> Readiness {
        let mut checks = vec![CheckReport {
            name: "started",
            ok: self.inner.started.load(Ordering::SeqCst),
            error: None,
        }];
        if !checks[0].ok {
            checks[0].error = Some("the process is still starting".into());
        }
        let registered: Vec<(&'static str, CheckFn)> = lock(&self.inner.checks).clone();
        let runs = registered.into_iter().map(|(name, f)| async move {
            let outcome = match tokio::time::timeout(CHECK_TIMEOUT, f()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {} s", CHECK_TIMEOUT.as_secs())),
            };
            CheckReport {
                name,
                ok: outcome.is_ok(),
                error: outcome.err(),
            }
        });
        checks.extend(futures::future::join_all(runs).await);
        Readiness {
            ready: checks.iter().all(|c| c.ok),
            checks,
        }
    }

    /// The Prometheus text exposition (version 0.0.4) of this process's
    /// roles, after refreshing the scrape-time gauges.
    pub fn render_metrics(&self) -> Result<String, OpsError> {
        // One scrape at a time in this process: a refresher rebuilds a
        // gauge family (cleared, then counted), and two scrapes at once
        // would interleave those steps or encode between them, so a
        // concurrent scrape (anyone who reaches the port) could hide a
        // tainted authority from the one an alert reads.
        let _one_at_a_time = lock(&SCRAPE);
        let refreshers: Vec<RefreshFn> = lock(&self.inner.refreshers).clone();
        for r in refreshers {
            r();
        }
        let mut registry = Registry::default();
        for role in lock(&self.inner.roles).iter() {
            metrics().register(&mut registry, *role);
        }
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_names_the_failing_check_and_waits_for_start() {
        let ops = Ops::new();
        ops.add_check("datastore", || async { Ok(()) });
        let r = ops.readiness().await;
        assert!(!r.ready);
        assert_eq!(r.failing(), vec!["started"]);
        ops.set_started();
        assert!(ops.readiness().await.ready);
        ops.add_check("redis", || async { Err("connection refused".to_owned()) });
        let r = ops.readiness().await;
        assert!(!r.ready);
        assert_eq!(r.failing(), vec!["redis"]);
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["checks"][2]["error"], "connection refused");
    }

    /// A refresher that rebuilds a gauge family (cleared, then counted)
    /// is never seen half done, nor run twice over, by scrapes at once.
    #[test]
    fn concurrent_scrapes_see_each_refresh_whole() {
        use crate::metrics::AuthorityStateLabels;
        const AUTHORITIES: i64 = 3;
        let ops = Ops::new();
        ops.add_role(Role::Broker);
        ops.on_scrape(|| {
            let m = metrics();
            m.authorities.clear();
            for state in ["active", "prepared", "tainted"] {
                m.authorities
                    .get_or_create(&AuthorityStateLabels {
                        kind: "x509",
                        state,
                    })
                    .inc();
                std::thread::yield_now();
            }
        });
        let total = |text: &str| -> i64 {
            text.lines()
                .filter(|l| l.starts_with("baton_ca_authorities{"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<i64>().ok())
                .sum()
        };
        // Control: one scrape alone counts each authority once.
        assert_eq!(total(&ops.render_metrics().unwrap()), AUTHORITIES);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..200 {
                        let text = ops.render_metrics().unwrap();
                        assert_eq!(total(&text), AUTHORITIES, "{text}");
                    }
                });
            }
        });
    }

    #[tokio::test]
    async fn a_hanging_check_fails_instead_of_hanging_readyz() {
        tokio::time::pause();
        let ops = Ops::new();
        ops.set_started();
        ops.add_check("stuck", std::future::pending);
        let r = ops.readiness().await;
        assert_eq!(r.failing(), vec!["stuck"]);
    }

    #[test]
    fn only_the_roles_of_the_process_are_exported() {
        let ops = Ops::new();
        ops.add_role(Role::Agent);
        metrics().hop_refused("scope_widened");
        let text = ops.render_metrics().unwrap();
        assert!(text.contains("baton_agent_syncs_total"), "{text}");
        assert!(!text.contains("baton_hops_refused"), "{text}");
        ops.add_role(Role::Broker);
        let text = ops.render_metrics().unwrap();
        assert!(
            text.contains("baton_hops_refused_total{reason=\"scope_widened\"}"),
            "{text}"
        );
    }
}
