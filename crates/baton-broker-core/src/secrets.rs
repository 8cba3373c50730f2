//! Just-in-time secrets per task, served by the broker and killed with the task.
//!
//! Place in the flow: an agent holding a task credential asks for a lease
//! (`POST /v1/secrets/lease`, mTLS with its task SVID, body
//! `{ "token", "engine" }`). The token is verified exactly as for a hop
//! ([`Delegation::verify_holder`]), the task must be usable and the token's
//! scope must hold the engine's [`SecretEngine::required`] permission (else
//! 403 `missing_permission`), and the admission policy must permit it
//! (Cedar action `lease_secret`, else 403 `not_permitted`; the lease is
//! issued from the admitted request). The lease lasts until the token's expiry; it is
//! registered with the revocation store (kind `SecretLease`, parent = the
//! token's `jti`) and written to the audit log (a `tool_call` event with tool
//! `secret.lease` and resource = the engine name) before it is returned:
//! fail closed, a lease that could not be registered or logged is revoked
//! again at once.
//!
//! Reaping: every revocation the broker performs kills the leases it covers
//! in their engines ([`Secrets::revoke_leases`]); a periodic sweep calls every
//! engine's [`SecretEngine::sweep`] so leases whose time ran out die even if
//! no notification came, and retries kills that failed.
//!
//! Tool servers that cannot do mTLS with agents check API keys through
//! `POST /v1/secrets/introspect` (mTLS with any SVID of the trust domain).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_audit::{AuditEvent, EventKind};
use baton_core::{Permission, Secret};
use baton_policy::SecretLease;
use baton_revocation::{CredKind, CredentialRecord, Revoked};
use baton_secrets::{
    ApiKeyEngine, LeaseRequest, PgTemplate, PostgresEngine, SecretEngine, SecretError,
    SecretMaterial,
};
use baton_verify::PeerCert;
use serde::Deserialize;

use crate::delegation::Delegation;
use crate::error::BrokerError;

/// The name of the always-on API-key engine.
pub const APIKEY_ENGINE: &str = "apikey";
/// The audit `tool` of a lease event.
pub const LEASE_TOOL: &str = "secret.lease";

/// A PostgreSQL engine to run (`baton broker --pg-*`).
#[derive(Clone, PartialEq, Eq)]
pub struct PostgresSettings {
    /// Admin connection string (libpq key/value or URL); may hold a password.
    pub admin_url: Secret,
    /// The admin role's password, read from a file; it replaces one the
    /// connection string may hold.
    pub admin_password: Option<Secret>,
    pub database: String,
    /// SQL run per lease, each with a `{role}` placeholder.
    pub grants: Vec<String>,
    /// Permission a task scope must hold; default `dataset:<database>:read`.
    pub permission: Option<String>,
    /// What agents connect to, when not the admin connection's host/port.
    pub host: Option<String>,
    pub port: Option<u16>,
}

impl std::fmt::Debug for PostgresSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresSettings")
            .field("database", &self.database)
            .field("grants", &self.grants)
            .field("permission", &self.permission)
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

/// Which secret engines the broker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretEngineSettings {
    pub postgres: Option<PostgresSettings>,
    /// Permission required for an API key (the API-key engine is always on).
    pub apikey_permission: String,
    /// How often every engine is swept for leases past their expiry.
    pub sweep_interval: Duration,
}

impl Default for SecretEngineSettings {
    fn default() -> Self {
        Self {
            postgres: None,
            apikey_permission: "secret:apikey:issue".into(),
            sweep_interval: Duration::from_secs(5),
        }
    }
}

/// The broker's secret engines.
#[derive(Debug)]
pub struct Secrets {
    engines: Vec<Arc<dyn SecretEngine>>,
    apikey: Arc<ApiKeyEngine>,
    /// Leases revoked in the store whose kill in the engine failed; retried
    /// by every sweep.
    pending: Mutex<BTreeSet<String>>,
    /// Leases being issued at this broker, per token `jti`: counted with
    /// the registered ones against [`MAX_LEASES_PER_TOKEN`].
    issuing: Mutex<std::collections::HashMap<String, usize>>,
}

/// The most unexpired secret leases one token may hold (each is a login
/// or key kept live in its engine until the token expires): a holder
/// looping on `lease` within its rate limit fills no database with roles.
/// Counted at each broker with what the registry holds, so several
/// brokers asked at the same instant may together issue a few more.
pub const MAX_LEASES_PER_TOKEN: usize = 32;

/// A token's place among the leases being issued; given back when dropped.
struct Issuing<'a> {
    secrets: &'a Secrets,
    jti: String,
}

impl Drop for Issuing<'_> {
    fn drop(&mut self) {
        let mut m = self
            .secrets
            .issuing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = m.get_mut(&self.jti) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.jti);
            }
        }
    }
}

impl crate::revocation::LeaseReaper for Secrets {
    fn revoke_leases<'a>(
        &'a self,
        revoked: &'a [Revoked],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'a>> {
        Box::pin(Secrets::revoke_leases(self, revoked))
    }
}

fn config_error(field: &str, e: impl std::fmt::Display) -> String {
    format!("{field}: {e}")
}

impl Secrets {
    /// Starts the configured engines. The API-key engine keeps its keys in
    /// `<data_dir>/apikeys.db`, or in memory without a data dir.
    pub async fn build(
        settings: &SecretEngineSettings,
        data_dir: Option<&Path>,
    ) -> Result<Self, String> {
        if settings.sweep_interval.is_zero() {
            return Err("sweep_interval: must be more than zero".into());
        }
        let apikey_perm = Permission::parse(&settings.apikey_permission)
            .map_err(|e| config_error("apikey_permission", e))?;
        let apikey = match data_dir {
            Some(dir) => ApiKeyEngine::open(dir.join("apikeys.db"), APIKEY_ENGINE, apikey_perm),
            None => ApiKeyEngine::in_memory(APIKEY_ENGINE, apikey_perm),
        }
        .map_err(|e| config_error("apikey engine", e))?;
        let apikey = Arc::new(apikey);
        let mut engines: Vec<Arc<dyn SecretEngine>> = vec![apikey.clone()];
        if let Some(pg) = &settings.postgres {
            let raw = pg
                .permission
                .clone()
                .unwrap_or_else(|| format!("dataset:{}:read", pg.database));
            let required = Permission::parse(&raw).map_err(|e| config_error("pg_permission", e))?;
            let mut admin: tokio_postgres::Config = pg
                .admin_url
                .expose()
                .parse()
                .map_err(|e| config_error("pg_admin_url", e))?;
            if let Some(password) = &pg.admin_password {
                admin.password(password.expose());
            }
            let mut engine = PostgresEngine::from_config(
                admin,
                PgTemplate {
                    database: pg.database.clone(),
                    grants: pg.grants.clone(),
                    role_prefix: "baton_".into(),
                },
                required,
            )
            .await
            .map_err(|e| config_error("postgres engine", e))?;
            if pg.host.is_some() || pg.port.is_some() {
                let host = match &pg.host {
                    Some(h) => h.clone(),
                    None => {
                        return Err(
                            "pg_host: required when pg_port is given (what agents connect to)"
                                .into(),
                        );
                    }
                };
                engine = engine.with_endpoint(host, pg.port.unwrap_or(5432));
            }
            if engines.iter().any(|e| e.name() == engine.name()) {
                return Err(format!(
                    "secret engine name {} is used twice",
                    engine.name()
                ));
            }
            engines.push(Arc::new(engine));
        }
        Ok(Self {
            engines,
            apikey,
            pending: Mutex::new(BTreeSet::new()),
            issuing: Mutex::new(std::collections::HashMap::new()),
        })
    }

    pub fn engine(&self, name: &str) -> Option<&Arc<dyn SecretEngine>> {
        self.engines.iter().find(|e| e.name() == name)
    }

    pub fn names(&self) -> Vec<&str> {
        self.engines.iter().map(|e| e.name()).collect()
    }

    fn pending(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        // A poisoned set is still a set of ids.
        self.pending.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Kills one lease in whichever engine issued it. `Ok(false)` when no
    /// engine knows it (e.g. an in-memory API key from before a restart).
    async fn revoke_one(&self, id: &str) -> Result<bool, String> {
        let mut errors = Vec::new();
        for engine in &self.engines {
            match engine.revoke(id).await {
                Ok(()) => return Ok(true),
                Err(SecretError::UnknownLease(_)) => {}
                Err(e) => {
                    count_store_error(&e);
                    errors.push(format!("{}: {e}", engine.name()));
                }
            }
        }
        if errors.is_empty() {
            Ok(false)
        } else {
            Err(errors.join("; "))
        }
    }

    /// Kills the leases among `revoked` in their engines. Failures are
    /// logged and retried by the next sweep.
    pub async fn revoke_leases(&self, revoked: &[Revoked]) {
        for r in revoked.iter().filter(|r| r.kind == CredKind::SecretLease) {
            match self.revoke_one(&r.id).await {
                Ok(true) => {
                    self.pending().remove(&r.id);
                    tracing::info!(lease = %r.id, "secret lease killed with its credentials");
                }
                Ok(false) => {
                    self.pending().remove(&r.id);
                    tracing::warn!(lease = %r.id, "revoked lease is unknown to every engine");
                }
                Err(e) => {
                    self.pending().insert(r.id.clone());
                    tracing::error!(lease = %r.id, error = %e, "cannot kill a revoked secret lease; the sweep retries");
                }
            }
        }
    }

    /// Reaps every lease past its expiry in every engine, and retries the
    /// kills that failed.
    pub async fn sweep(&self, now: u64) {
        for engine in &self.engines {
            match engine.sweep(now).await {
                Ok(reaped) if !reaped.is_empty() => {
                    tracing::info!(engine = engine.name(), count = reaped.len(), leases = ?reaped, "expired secret leases reaped");
                }
                Ok(_) => {}
                Err(e) => {
                    count_store_error(&e);
                    tracing::warn!(engine = engine.name(), error = %e, "secret sweep failed; retrying next time");
                }
            }
        }
        let retry: Vec<Revoked> = self
            .pending()
            .iter()
            .map(|id| Revoked {
                id: id.clone(),
                kind: CredKind::SecretLease,
                expires_at: 0,
            })
            .collect();
        if !retry.is_empty() {
            self.revoke_leases(&retry).await;
        }
    }

    /// Sweeps every `every` until aborted.
    pub fn spawn_sweeper(self: &Arc<Self>, every: Duration) -> tokio::task::JoinHandle<()> {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                this.sweep(baton_revocation::system_now()).await;
            }
        })
    }

    /// Issues a lease for the holder of a task credential; see the module docs.
    pub async fn lease(
        &self,
        d: &Delegation,
        peer: &PeerCert,
        req: &LeaseBody,
        now: u64,
    ) -> Result<serde_json::Value, BrokerError> {
        let held = d.verify_holder(peer, &req.token, now)?;
        let claims = held.claims();
        let task = d.get_task(claims.task.id.as_str())?;
        let engine = self
            .engine(&req.engine)
            .ok_or_else(|| BrokerError::BadRequest {
                field: Some("engine"),
                message: format!(
                    "engine: no secret engine named \"{}\" (this broker has: {})",
                    req.engine.escape_debug(),
                    self.names().join(", ")
                ),
            })?;
        let mut ev = AuditEvent::new(EventKind::ToolCall, now, task.id.clone());
        ev.actor = Some(peer.spiffe_id().clone());
        ev.token_jti = Some(claims.jti.clone());
        ev.tool = Some(LEASE_TOOL.into());
        ev.resource = Some(engine.name().to_owned());
        ev.scope = Some(claims.scope.clone());
        ev.purpose = Some(claims.task.purpose.clone());
        ev.depth = Some(claims.depth);
        // A refusal of a verified holder is recorded: who asked for a
        // secret of a task that ended, or under a purpose it no longer has.
        let refuse = |ev: &mut AuditEvent, code: &'static str, message: String| {
            ev.decision = Some("deny".into());
            ev.reason = Some(format!("{code}: {message}"));
            d.append_event(ev)?;
            tracing::warn!(task = %task.id, agent = %peer.spiffe_id(), engine = engine.name(), code, "secret lease refused");
            Err(BrokerError::Forbidden { code, message })
        };
        if let Some(why) = task.unusable(now) {
            return refuse(&mut ev, "task_ended", why.to_owned());
        }
        // A token minted for the task's earlier purpose (one that escaped
        // the purpose change's revocation) leases nothing.
        if claims.task.purpose != task.purpose {
            let message = format!(
                "the token was minted for purpose {}; task {} is now for {}",
                claims.task.purpose, task.id, task.purpose
            );
            return refuse(&mut ev, "purpose_changed", message);
        }
        let required = engine.required();
        if !claims.scope.allows(required) {
            let message = format!(
                "the token's scope lacks permission {required}, required by secret engine {}",
                engine.name()
            );
            ev.decision = Some("deny".into());
            ev.reason = Some(format!("missing_permission: {message}"));
            d.append_event(&ev)?;
            tracing::warn!(task = %task.id, agent = %peer.spiffe_id(), engine = engine.name(), %required, "secret lease refused");
            return Err(BrokerError::Forbidden {
                code: "missing_permission",
                message,
            });
        }
        // At most so many leases per token: the registry's, plus those
        // being issued here right now.
        let held_now = d
            .revoker()
            .certificate_leases(peer.serial_hex(), now)?
            .map_or(0, |(_, leases)| leases.len());
        let _issuing = {
            let mut m = self
                .issuing
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let in_flight = m.entry(claims.jti.clone()).or_insert(0);
            if held_now.saturating_add(*in_flight) >= MAX_LEASES_PER_TOKEN {
                drop(m);
                let message = format!(
                    "the token already holds {MAX_LEASES_PER_TOKEN} unexpired secret leases, the most one token may hold; reuse one, or hand the work on with a new token"
                );
                return refuse(&mut ev, "lease_limit", message);
            }
            *in_flight += 1;
            Issuing {
                secrets: self,
                jti: claims.jti.clone(),
            }
        };
        let expires_at = claims.exp.min(task.expires_at);
        // Cedar decides too; the lease is issued for what it admitted.
        let admitted = match d.admission().admit_lease(SecretLease {
            agent: peer.spiffe_id().clone(),
            chain: held.chain().to_vec(),
            initiator: task.initiator.clone(),
            task: task.id.clone(),
            purpose: task.purpose.clone(),
            scope: claims.scope.clone(),
            depth: claims.depth,
            engine: engine.name().to_owned(),
            permission: required.clone(),
            ttl_secs: expires_at.saturating_sub(now),
        }) {
            Ok(admitted) => admitted,
            Err(refused) => {
                ev.decision = Some("deny".into());
                ev.reason = Some(format!("not_permitted: {refused}"));
                ev.policy_ids = refused.policy_ids.clone();
                d.append_event(&ev)?;
                tracing::warn!(task = %task.id, agent = %peer.spiffe_id(), engine = engine.name(), policies = %refused.policy_ids.join(", "), "secret lease refused by the admission policy");
                return Err(BrokerError::Forbidden {
                    code: "not_permitted",
                    message: refused.to_string(),
                });
            }
        };
        let admitted_lease = admitted.request();
        ev.policy_ids = admitted.policy_ids().to_vec();
        let lease = engine
            .issue(
                &LeaseRequest {
                    task: admitted_lease.task.clone(),
                    agent: admitted_lease.agent.clone(),
                    scope: admitted_lease.scope.clone(),
                    expires_at,
                },
                now,
            )
            .await
            .inspect_err(count_store_error)
            .map_err(|e| match e {
                SecretError::MissingPermission { required, .. } => BrokerError::Forbidden {
                    code: "missing_permission",
                    message: format!(
                        "the token's scope lacks permission {required}, required by secret engine {}",
                        req.engine
                    ),
                },
                SecretError::AlreadyExpired { .. } => BrokerError::Forbidden {
                    code: "token_expired",
                    message: e.to_string(),
                },
                other => BrokerError::Hook(format!(
                    "secret engine {} failed: {other}",
                    req.engine
                )),
            })?;
        // Registered and logged before it leaves; otherwise killed again.
        let record = CredentialRecord {
            id: lease.id.clone(),
            kind: CredKind::SecretLease,
            task: Some(task.id.clone()),
            agent: Some(peer.spiffe_id().clone()),
            node: None,
            parent: Some(claims.jti.clone()),
            expires_at: lease.expires_at,
        };
        ev.decision = Some("allow".into());
        ev.reason = Some(format!("lease {} until {}", lease.id, lease.expires_at));
        let kept = match d.revoker().register(&[record], now).await {
            Ok(()) => match certificate_revoked_since(d, peer, &lease, now).await {
                Err(e) => Err(e),
                Ok(()) => d.append_event(&ev).map(|_| ()),
            },
            Err(e) => Err(e),
        };
        if let Err(e) = kept {
            if let Err(kill) = engine.revoke(&lease.id).await {
                count_store_error(&kill);
                self.pending().insert(lease.id.clone());
                tracing::error!(lease = %lease.id, error = %kill, "cannot kill an unregistered lease; the sweep retries");
            }
            return Err(e);
        }
        tracing::info!(task = %task.id, agent = %peer.spiffe_id(), engine = engine.name(), lease = %lease.id, expires_at = lease.expires_at, "secret lease issued");
        let material = match &lease.secret {
            SecretMaterial::Postgres {
                host,
                port,
                dbname,
                username,
                password,
            } => serde_json::json!({
                "host": host,
                "port": port,
                "dbname": dbname,
                "username": username,
                "password": password.expose(),
            }),
            SecretMaterial::ApiKey { key } => serde_json::json!({ "key": key.expose() }),
        };
        Ok(serde_json::json!({
            "lease_id": lease.id,
            "engine": lease.engine,
            "task_id": lease.task,
            "agent": lease.agent,
            "expires_at": lease.expires_at,
            "material": material,
        }))
    }

    /// What the API-key engine knows about `key`, checked against the
    /// shared revocation ledger (`revoked`: the broker's durable check of
    /// a credential id): the key's row lives in the engine of the broker
    /// that issued it, while its task may have been ended, or its lease
    /// revoked, at another broker. A ledger that cannot be read answers
    /// an error, never `active`.
    pub fn introspect(
        &self,
        key: &str,
        now: u64,
        revoked: &dyn Fn(&str) -> Result<bool, BrokerError>,
    ) -> Result<serde_json::Value, BrokerError> {
        let i = self
            .apikey
            .introspect(key, now)
            .map_err(|e| BrokerError::Hook(format!("API-key store unavailable: {e}")))?;
        let dead = match i.lease_id.as_deref() {
            Some(id) if i.active => revoked(id)?,
            _ => true,
        };
        if dead {
            return Ok(serde_json::json!({ "active": false }));
        }
        Ok(serde_json::json!({
            "active": true,
            "task_id": i.task,
            "agent": i.agent,
            "scope": i.scope,
            "expires_at": i.expires_at,
        }))
    }
}

/// The body of `POST /v1/secrets/lease`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LeaseBody {
    pub token: Secret,
    pub engine: String,
}

/// Counts an engine's failure to talk to its backing store in
/// `baton_store_errors_total` (refusals such as a missing permission are
/// not store errors).
fn count_store_error(e: &SecretError) {
    match e {
        SecretError::Postgres(_) => baton_ops::metrics().store_error("postgres"),
        SecretError::Sqlite(_) => baton_ops::metrics().store_error("sqlite"),
        _ => {}
    }
}

/// The holder's certificate may have been revoked (`baton revoke
/// credential <serial>`) while the engine issued: that revocation reads
/// the certificate's leases once, before this one was registered, so it
/// would never reach it. Checked again once the lease is registered (the
/// revocation commits the serial before it reads the leases): if it is
/// revoked now, the lease is revoked too and never leaves. Fails closed.
pub(crate) async fn certificate_revoked_since(
    d: &Delegation,
    peer: &PeerCert,
    lease: &baton_secrets::Lease,
    now: u64,
) -> Result<(), BrokerError> {
    if !d
        .revoker()
        .durably_revoked(peer.serial_hex(), now)
        .unwrap_or(true)
    {
        return Ok(());
    }
    d.revoker()
        .supersede(
            &[Revoked {
                id: lease.id.clone(),
                kind: CredKind::SecretLease,
                expires_at: lease.expires_at,
            }],
            "certificate_revoked",
            now,
        )
        .await?;
    Err(BrokerError::Forbidden {
        code: "certificate_revoked",
        message: format!(
            "the task certificate (serial {}) was revoked while the lease was issued",
            peer.serial_hex()
        ),
    })
}
