//! The broker's side of revocation: every credential (agent and workload
//! SVIDs, task credentials, grants, secret leases) is registered in the
//! revocation store before it is handed out (fail closed: no store, no
//! credential); task end, purpose change and explicit revokes mark
//! credentials revoked in the store (which publishes them to verifiers) and
//! in the broker's durable table, from which a store that lost its data
//! (Redis restarted empty, FLUSHALL) is re-seeded.

use std::sync::Arc;
use std::time::Duration;

use baton_core::{SpiffeId, TaskId};
use baton_revocation::{CredKind, CredentialRecord, RevocationStore, Revoked, Target};
use rusqlite::{OptionalExtension, params};

use crate::service::BrokerError;
use crate::store::{SqliteStore, StoreError, to_i64};
use crate::tasks::TaskStore;

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
    durable: Arc<SqliteStore>,
    /// The secret engines whose leases die with the credentials revoked here.
    secrets: std::sync::OnceLock<Arc<crate::secrets::Secrets>>,
    /// Woken on every new durable revocation (feed long-polls wait on it).
    changed: tokio::sync::Notify,
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

fn unavailable(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Hook(format!(
        "revocation service unavailable ({e}); credentials are not issued while it is down"
    ))
}

impl Revoker {
    pub fn new(store: Arc<dyn RevocationStore>, durable: Arc<SqliteStore>) -> Self {
        Self {
            store,
            durable,
            secrets: std::sync::OnceLock::new(),
            changed: tokio::sync::Notify::new(),
        }
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
            if !page.entries.is_empty() || tokio::time::Instant::now() >= deadline {
                return Ok(page);
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.feed_page(after, now);
            }
        }
    }

    fn feed_page(&self, after: u64, now: u64) -> Result<FeedPage, BrokerError> {
        Ok(self.durable.with(|c| {
            let epoch: String =
                c.query_row("SELECT epoch FROM feed_meta LIMIT 1", [], |r| r.get(0))?;
            let mut stmt = c.prepare_cached(
                "SELECT seq, id, expires_at FROM revocation_log
                 WHERE seq > ?1 AND expires_at > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![to_i64(after), to_i64(now), FEED_PAGE as i64 + 1],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                },
            )?;
            let mut entries = Vec::new();
            let mut seq = after;
            let mut more = false;
            for row in rows {
                let (s, id, exp) = row?;
                if entries.len() == FEED_PAGE {
                    more = true;
                    break;
                }
                seq = u64::try_from(s).unwrap_or(seq);
                entries.push(FeedEntry {
                    id,
                    expires_at: u64::try_from(exp).unwrap_or(0),
                });
            }
            if entries.is_empty() {
                // Nothing newer in force: the follower may skip to the end.
                let last: Option<i64> =
                    c.query_row("SELECT MAX(seq) FROM revocation_log", [], |r| r.get(0))?;
                seq = seq.max(last.map_or(0, |l| u64::try_from(l).unwrap_or(0)));
            }
            Ok(FeedPage {
                epoch,
                seq,
                entries,
                more,
            })
        })?)
    }

    /// From now on, every revocation also kills the secret leases it covers
    /// in their engines. Set once; a second call is ignored.
    pub fn set_secrets(&self, secrets: Arc<crate::secrets::Secrets>) {
        let _ = self.secrets.set(secrets);
    }

    /// Kills the secret leases among `revoked` in their engines (those that
    /// fail are retried by the sweeper).
    async fn reap_leases(&self, revoked: &[Revoked]) {
        if let Some(secrets) = self.secrets.get() {
            secrets.revoke_leases(revoked).await;
        }
    }

    /// Registers credentials before they leave the broker.
    pub async fn register(
        &self,
        records: &[CredentialRecord],
        now: u64,
    ) -> Result<(), BrokerError> {
        if records.is_empty() {
            return Ok(());
        }
        self.store
            .register_many(records, now)
            .await
            .map_err(|e| match e {
                baton_revocation::RevocationError::ParentRevoked { .. }
                | baton_revocation::RevocationError::TaskRevoked { .. } => BrokerError::Forbidden {
                    code: "revoked",
                    message: e.to_string(),
                },
                other => unavailable(other),
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
            let ok = !raw.is_empty()
                && raw.len() <= 256
                && raw
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
            if ok {
                Ok(raw.to_owned())
            } else {
                Err(bad(
                    field,
                    format!(
                        "{field}: \"{}\" is not a credential id (serial hex, token jti or lease id)",
                        raw.escape_default()
                    ),
                ))
            }
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

    /// Revokes `target`: in the store (which tells the verifiers) and in the
    /// durable table. For a task, the broker's own record of its tokens and
    /// certificates is revoked too, so a store that lost track of them
    /// cannot let one survive.
    pub async fn revoke(
        &self,
        target: &Target,
        tasks: &dyn TaskStore,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Revoked>, BrokerError> {
        let mut known: Vec<Revoked> = Vec::new();
        if let Target::Task(task) = target {
            for t in tasks.tokens_for_task(task)? {
                if t.exp > now {
                    known.push(Revoked {
                        id: t.jti.clone(),
                        kind: CredKind::Token,
                        expires_at: t.exp,
                    });
                    known.push(Revoked {
                        id: t.cert_serial.clone(),
                        kind: CredKind::X509Svid,
                        expires_at: t.exp,
                    });
                }
            }
        }
        let from_store = match self.store.revoke(target, reason, now).await {
            Ok(v) => v,
            Err(baton_revocation::RevocationError::Unknown { .. }) if !known.is_empty() => {
                Vec::new()
            }
            Err(baton_revocation::RevocationError::Unknown { target }) => {
                return Err(BrokerError::NotFound(format!(
                    "nothing to revoke: {target} matches no live credential"
                )));
            }
            Err(e) => {
                // Keep what we know durably; the store is re-seeded from it.
                self.record(&known, reason, now)?;
                return Err(unavailable(e));
            }
        };
        let mut all = from_store;
        for k in known {
            if !all.iter().any(|r| r.id == k.id) {
                all.push(k);
            }
        }
        self.record(&all, reason, now)?;
        // Whatever the store did not know yet becomes revoked there too.
        self.store.seed(&all, now).await.map_err(unavailable)?;
        tracing::info!(%target, count = all.len(), reason, "revoked");
        self.reap_leases(&all).await;
        Ok(all)
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
        let mut all: Vec<Revoked> = Vec::new();
        for t in tasks.tokens_for_task(task)? {
            if t.exp <= now {
                continue;
            }
            match self
                .store
                .revoke(&Target::Credential(t.jti.clone()), reason, now)
                .await
            {
                Ok(v) => all.extend(v),
                Err(
                    baton_revocation::RevocationError::Unknown { .. }
                    | baton_revocation::RevocationError::AlreadyRevoked { .. },
                ) => {}
                Err(e) => return Err(unavailable(e)),
            }
            for r in [
                Revoked {
                    id: t.jti.clone(),
                    kind: CredKind::Token,
                    expires_at: t.exp,
                },
                Revoked {
                    id: t.cert_serial.clone(),
                    kind: CredKind::X509Svid,
                    expires_at: t.exp,
                },
            ] {
                if !all.iter().any(|x| x.id == r.id) {
                    all.push(r);
                }
            }
        }
        self.record(&all, reason, now)?;
        self.store.seed(&all, now).await.map_err(unavailable)?;
        tracing::info!(task = %task, count = all.len(), reason, "revoked the task's credentials");
        self.reap_leases(&all).await;
        Ok(all)
    }

    /// Revokes credentials a new one replaces (a renewed task
    /// certificate's predecessor): durably, then in the store, so
    /// verifiers refuse the old one before the new one is handed out.
    pub async fn supersede(
        &self,
        old: &[Revoked],
        reason: &str,
        now: u64,
    ) -> Result<(), BrokerError> {
        if old.is_empty() {
            return Ok(());
        }
        self.record(old, reason, now)?;
        self.store.seed(old, now).await.map_err(unavailable)?;
        Ok(())
    }

    fn record(&self, revoked: &[Revoked], reason: &str, now: u64) -> Result<(), BrokerError> {
        self.durable.with(|c| {
            let tx = c.transaction()?;
            for r in revoked {
                let added = tx.execute(
                    "INSERT OR IGNORE INTO revocations (id, kind, expires_at, reason, at) VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![r.id, r.kind.code(), to_i64(r.expires_at), reason, to_i64(now)],
                )?;
                if added == 1 {
                    tx.execute(
                        "INSERT INTO revocation_log (id, expires_at) VALUES (?1, ?2)",
                        params![r.id, to_i64(r.expires_at)],
                    )?;
                }
            }
            tx.commit()?;
            Ok(())
        })?;
        self.changed.notify_waiters();
        Ok(())
    }

    /// Whether the durable table holds `id` as revoked (the broker's own
    /// check, independent of the store).
    pub fn durably_revoked(&self, id: &str, now: u64) -> Result<bool, StoreError> {
        self.durable.with(|c| {
            let exp: Option<i64> = c
                .query_row(
                    "SELECT expires_at FROM revocations WHERE id = ?1",
                    params![id],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(exp.is_some_and(|e| e > to_i64(now)))
        })
    }

    /// Every durable revocation still in force.
    pub fn live_revocations(&self, now: u64) -> Result<Vec<Revoked>, StoreError> {
        self.durable.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, kind, expires_at FROM revocations WHERE expires_at > ?1",
            )?;
            let rows = stmt.query_map(params![to_i64(now)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (id, kind, exp) = row?;
                out.push(Revoked {
                    id,
                    kind: CredKind::from_code(&kind).unwrap_or(CredKind::Token),
                    expires_at: u64::try_from(exp).unwrap_or(0),
                });
            }
            Ok(out)
        })
    }

    /// Re-seeds the store when it has lost its data. Returns whether it did.
    pub async fn reseed_if_needed(&self, now: u64) -> Result<bool, BrokerError> {
        let health = self.store.health().await.map_err(unavailable)?;
        if !health.empty_since_seed {
            return Ok(false);
        }
        let live = self.live_revocations(now)?;
        self.store.seed(&live, now).await.map_err(unavailable)?;
        tracing::warn!(
            count = live.len(),
            "revocation store had lost its data; re-seeded from the durable log"
        );
        Ok(true)
    }

    /// Checks the store every `every` and re-seeds it when needed.
    pub fn spawn_reseeder(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.reseed_if_needed(baton_revocation::system_now()).await {
                    tracing::warn!(error = %e, "revocation store check failed");
                }
                tokio::time::sleep(every).await;
            }
        })
    }
}

/// The broker's own revocation check for tokens presented at a hop: its
/// durable table, no network.
#[derive(Debug)]
pub struct DurableCheck(pub Arc<Revoker>);

impl baton_verify::RevocationCheck for DurableCheck {
    fn is_revoked(&self, jti: &str, _task: &TaskId) -> bool {
        // Fail closed: a datastore error counts as revoked.
        self.0
            .durably_revoked(jti, baton_revocation::system_now())
            .unwrap_or(true)
    }
}
