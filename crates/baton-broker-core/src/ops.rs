//! The broker's part of the ops listener (`baton_ops`): its readiness
//! checks, its scrape-time gauges and the route templates its HTTPS
//! requests are counted under.

use std::sync::Arc;
use std::time::Duration;

use baton_ops::{Ops, Role, metrics};

use crate::ledger::Ledger;
use crate::revocation::Revoker;
use crate::service::Broker;

/// Every path the HTTPS port serves. A request is counted under its path
/// only if it is one of these (none carries an id), else `unmatched`, so a
/// caller cannot mint new series.
/// How long the readiness probe of the audit log waits for its write lock.
const AUDIT_PROBE_WAIT: Duration = Duration::from_secs(1);

const ROUTES: &[&str] = &[
    "/healthz",
    "/v1/bundle",
    "/v1/bundle.pem",
    "/v1/node/attest",
    "/v1/node/renew",
    "/v1/node/sync",
    "/v1/node/sign-x509",
    "/v1/node/sign-jwt",
    "/v1/node/redeem",
    "/v1/node/renew-task",
    "/v1/tasks",
    "/v1/delegate",
    "/v1/audit/tool-calls",
    "/v1/approvals",
    "/v1/revocations/feed",
    "/v1/secrets/lease",
    "/v1/secrets/introspect",
];

/// The route template a request path is counted under.
pub fn route_of(path: &str) -> &'static str {
    ROUTES
        .iter()
        .find(|r| **r == path)
        .copied()
        .unwrap_or("unmatched")
}

/// What the checks look at.
pub struct Parts {
    pub broker: Arc<Broker>,
    pub datastore: Arc<dyn Ledger>,
    pub audit: Arc<baton_audit::AuditLog>,
    pub revoker: Arc<Revoker>,
    /// Set when revocations are published to Redis.
    pub redis: Option<Arc<dyn baton_revocation::RevocationStore>>,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts")
            .field("redis", &self.redis.is_some())
            .finish_non_exhaustive()
    }
}

/// Registers the broker's role, readiness checks and gauges on `ops`.
pub fn install(ops: &Ops, p: Parts) {
    ops.add_role(Role::Broker);

    let datastore = p.datastore.clone();
    ops.add_check("datastore", move || {
        let datastore = datastore.clone();
        async move {
            blocking(move || {
                datastore
                    .ping()
                    .map_err(|e| format!("the datastore does not answer: {e}"))
            })
            .await
        }
    });

    let audit = p.audit.clone();
    ops.add_check("audit_log", move || {
        let audit = audit.clone();
        async move {
            blocking(move || {
                audit
                    .size()
                    .map_err(|e| format!("the audit log cannot be read: {e}"))?;
                if let Some(head) = audit.head_file() {
                    std::fs::OpenOptions::new()
                        .write(true)
                        .open(&head)
                        .map_err(|e| {
                            format!(
                                "the audit head file {} is not writable: {e}",
                                head.display()
                            )
                        })?;
                }
                // A write transaction is probed each time (opened and rolled
                // back), so readiness follows the log itself and comes back
                // on its own once the log takes writes again, without
                // waiting for a request (which a not-ready broker would not
                // get).
                audit.probe_writable(AUDIT_PROBE_WAIT).map_err(|e| {
                    let last = if metrics().audit_last_append_failed() {
                        " (the last append failed too: requests that must be recorded are refused)"
                    } else {
                        ""
                    };
                    format!("the audit log does not take writes: {e}{last}")
                })
            })
            .await
        }
    });

    let broker = p.broker.clone();
    ops.add_check("authority", move || {
        let broker = broker.clone();
        async move {
            let now = crate::oidc::unix_now();
            let authorities = broker.ca().authorities();
            for kind in [baton_ca::AuthorityKind::X509, baton_ca::AuthorityKind::Jwt] {
                let active = authorities.iter().find(|a| {
                    a.kind == kind && a.state == baton_ca::AuthorityState::Active && !a.tainted
                });
                match active {
                    Some(a) if a.not_after > now => {}
                    Some(a) => {
                        return Err(format!(
                            "the active {} authority {} expired at {}",
                            kind_name(kind),
                            a.id,
                            a.not_after
                        ));
                    }
                    None => {
                        return Err(format!("no usable active {} authority", kind_name(kind)));
                    }
                }
            }
            Ok(())
        }
    });

    if let Some(redis) = p.redis.clone() {
        let revoker = p.revoker.clone();
        ops.add_check("revocation_store", move || {
            let redis = redis.clone();
            let revoker = revoker.clone();
            async move {
                match redis.health().await {
                    Err(e) => Err(format!("Redis does not answer: {e}")),
                    Ok(h) if h.empty_since_seed => Err(
                        "Redis lost its revocation data and the relay has not re-seeded it yet"
                            .into(),
                    ),
                    Ok(_) => match revoker.relay_behind() {
                        Some(why) => Err(format!("the revocation relay is behind: {why}")),
                        None => Ok(()),
                    },
                }
            }
        });
    }

    let broker = p.broker;
    ops.on_scrape(move || {
        let now = crate::oidc::unix_now();
        let m = metrics();
        m.authorities.clear();
        for a in broker.ca().authorities() {
            let state = if a.tainted && a.state != baton_ca::AuthorityState::Revoked {
                "tainted"
            } else {
                state_name(a.state)
            };
            m.authorities
                .get_or_create(&baton_ops::metrics::AuthorityStateLabels {
                    kind: kind_name(a.kind),
                    state,
                })
                .inc();
            if a.state == baton_ca::AuthorityState::Active {
                let left = i64::try_from(a.not_after).unwrap_or(i64::MAX)
                    - i64::try_from(now).unwrap_or(i64::MAX);
                m.authority_expiry
                    .get_or_create(&baton_ops::metrics::AuthorityLabels {
                        kind: kind_name(a.kind),
                    })
                    .set(left);
            }
        }
    });
}

fn kind_name(k: baton_ca::AuthorityKind) -> &'static str {
    match k {
        baton_ca::AuthorityKind::X509 => "x509",
        baton_ca::AuthorityKind::Jwt => "jwt",
    }
}

fn state_name(s: baton_ca::AuthorityState) -> &'static str {
    match s {
        baton_ca::AuthorityState::Prepared => "prepared",
        baton_ca::AuthorityState::Active => "active",
        baton_ca::AuthorityState::Old => "old",
        baton_ca::AuthorityState::Revoked => "revoked",
    }
}

/// SQLite and file checks run on the blocking pool.
async fn blocking(f: impl FnOnce() -> Result<(), String> + Send + 'static) -> Result<(), String> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(format!("the check did not finish: {e}")))
}

/// Reports each durable audit batch to
/// [`baton_ops::Metrics::audit_batch_durable`]: batch sizes and durability
/// lag, measured inside the log (the lag ends when the batch is durable,
/// before the appending threads wake up).
#[derive(Debug, Clone, Copy, Default)]
pub struct AuditMetrics;

impl baton_audit::AppendObserver for AuditMetrics {
    fn batch_durable(&self, lags: &[std::time::Duration]) {
        metrics().audit_batch_durable(lags);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_routes_become_labels() {
        assert_eq!(route_of("/v1/node/sync"), "/v1/node/sync");
        assert_eq!(route_of("/v1/tasks/task-123"), "unmatched");
        assert_eq!(route_of("/v1/node/sync?x=1"), "unmatched");
    }
}
