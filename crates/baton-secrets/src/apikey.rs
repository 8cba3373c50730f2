//! API keys for tool servers that cannot do mTLS.
//!
//! A key is `bk_` followed by 43 base64url characters (32 random bytes). Only
//! its SHA-256 digest is stored (SQLite, in a file or in memory), next to the
//! task, agent, scope and expiry it is bound to. A tool server hands the key
//! it received to [`ApiKeyEngine::introspect`] (RFC 7662 in spirit): unknown,
//! revoked and expired keys all answer `active: false` with nothing else, so
//! the answer never says which.
//!
//! SQLite calls are short and run under a mutex on the caller's task; the
//! key space is one row per lease.

use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use async_trait::async_trait;
use baton_core::{Permission, Scope, Secret, SpiffeId, TaskId};
use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::{
    Lease, LeaseRequest, SecretEngine, SecretError, SecretMaterial, check_request, check_required,
    new_lease_id, random_token, to_i64,
};

const KEY_PREFIX: &str = "bk_";

/// What a tool server learns about a presented key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introspection {
    pub active: bool,
    /// The key's lease, `None` unless `active`: the broker checks it
    /// against its shared revocation ledger (a key is issued and stored by
    /// one broker, and may be revoked at another).
    pub lease_id: Option<String>,
    /// `None` unless `active`.
    pub task: Option<TaskId>,
    pub agent: Option<SpiffeId>,
    pub scope: Option<Scope>,
    pub expires_at: Option<u64>,
}

impl Introspection {
    /// The single answer for unknown, revoked and expired keys.
    pub fn inactive() -> Self {
        Self {
            active: false,
            lease_id: None,
            task: None,
            agent: None,
            scope: None,
            expires_at: None,
        }
    }
}

/// Leases API keys; see the module docs.
pub struct ApiKeyEngine {
    name: String,
    required: Permission,
    db: Mutex<Connection>,
}

impl std::fmt::Debug for ApiKeyEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiKeyEngine")
            .field("name", &self.name)
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

impl ApiKeyEngine {
    /// Keys stored in the SQLite file at `path` (created if absent), so they
    /// survive a restart.
    pub fn open(
        path: impl AsRef<Path>,
        name: impl Into<String>,
        required: Permission,
    ) -> Result<Self, SecretError> {
        Self::with_connection(Connection::open(path)?, name.into(), required)
    }

    /// Keys kept in memory only: they die with the process.
    pub fn in_memory(name: impl Into<String>, required: Permission) -> Result<Self, SecretError> {
        Self::with_connection(Connection::open_in_memory()?, name.into(), required)
    }

    fn with_connection(
        conn: Connection,
        name: String,
        required: Permission,
    ) -> Result<Self, SecretError> {
        check_required(&required)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS baton_api_keys (
                lease_id   TEXT PRIMARY KEY,
                digest     BLOB NOT NULL UNIQUE,
                task       TEXT NOT NULL,
                agent      TEXT NOT NULL,
                scope      TEXT NOT NULL,
                expires_at INTEGER NOT NULL,
                revoked    INTEGER NOT NULL DEFAULT 0
            );
            CREATE INDEX IF NOT EXISTS baton_api_keys_pending
                ON baton_api_keys (expires_at) WHERE revoked = 0;",
        )?;
        Ok(Self {
            name,
            required,
            db: Mutex::new(conn),
        })
    }

    fn db(&self) -> MutexGuard<'_, Connection> {
        // A poisoned lock only means another caller panicked mid-call; SQLite
        // statements are atomic, so the connection is still consistent.
        self.db.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether `key` is a live key, and if so what it is bound to.
    /// Errors only when storage fails.
    pub fn introspect(&self, key: &str, now: u64) -> Result<Introspection, SecretError> {
        if !key.starts_with(KEY_PREFIX) {
            return Ok(Introspection::inactive());
        }
        let presented = digest(key);
        type Row = (String, Vec<u8>, String, String, String, i64, bool);
        let row: Option<Row> = self
            .db()
            .query_row(
                "SELECT lease_id, digest, task, agent, scope, expires_at, revoked
                 FROM baton_api_keys WHERE digest = ?1",
                params![presented.as_slice()],
                |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                        r.get(6)?,
                    ))
                },
            )
            .optional()?;
        let Some((lease_id, stored, task, agent, scope, expires_at, revoked)) = row else {
            return Ok(Introspection::inactive());
        };
        // The lookup is by digest (which reveals nothing about a key); the
        // constant-time comparison is defence in depth against a lookup that
        // ever matched loosely.
        let same = aws_lc_rs::constant_time::verify_slices_are_equal(&stored, &presented).is_ok();
        let expires_at = u64::try_from(expires_at).unwrap_or(0);
        if !same || revoked || expires_at <= now {
            return Ok(Introspection::inactive());
        }
        let corrupt = |what: &str| SecretError::Corrupt(format!("api key row: {what}"));
        let scope: Vec<String> = serde_json::from_str(&scope).map_err(|_| corrupt("scope"))?;
        Ok(Introspection {
            active: true,
            lease_id: Some(lease_id),
            task: Some(task.parse().map_err(|_| corrupt("task"))?),
            agent: Some(SpiffeId::parse(&agent).map_err(|_| corrupt("agent"))?),
            scope: Some(Scope::parse(&scope).map_err(|_| corrupt("scope"))?),
            expires_at: Some(expires_at),
        })
    }
}

#[async_trait]
impl SecretEngine for ApiKeyEngine {
    fn name(&self) -> &str {
        &self.name
    }

    fn required(&self) -> &Permission {
        &self.required
    }

    async fn issue(&self, req: &LeaseRequest, now: u64) -> Result<Lease, SecretError> {
        check_request(&self.name, &self.required, req, now)?;
        let id = new_lease_id()?;
        let key = format!("{KEY_PREFIX}{}", random_token()?);
        let scope = serde_json::to_string(&req.scope.to_strings())
            .map_err(|e| SecretError::Corrupt(e.to_string()))?;
        self.db().execute(
            "INSERT INTO baton_api_keys (lease_id, digest, task, agent, scope, expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![
                id,
                digest(&key).as_slice(),
                req.task.as_str(),
                req.agent.as_str(),
                scope,
                to_i64(req.expires_at, "expires_at")?
            ],
        )?;
        Ok(Lease {
            id,
            engine: self.name.clone(),
            task: req.task.clone(),
            agent: req.agent.clone(),
            expires_at: req.expires_at,
            secret: SecretMaterial::ApiKey {
                key: Secret::new(key),
            },
        })
    }

    async fn revoke(&self, lease_id: &str) -> Result<(), SecretError> {
        let db = self.db();
        let known = db
            .query_row(
                "SELECT 1 FROM baton_api_keys WHERE lease_id = ?1",
                params![lease_id],
                |_| Ok(()),
            )
            .optional()?;
        if known.is_none() {
            return Err(SecretError::UnknownLease(lease_id.to_owned()));
        }
        db.execute(
            "UPDATE baton_api_keys SET revoked = 1 WHERE lease_id = ?1",
            params![lease_id],
        )?;
        Ok(())
    }

    async fn sweep(&self, now: u64) -> Result<Vec<String>, SecretError> {
        let now = i64::try_from(now).unwrap_or(i64::MAX);
        let db = self.db();
        let mut stmt = db.prepare(
            "UPDATE baton_api_keys SET revoked = 1
             WHERE revoked = 0 AND expires_at <= ?1 RETURNING lease_id",
        )?;
        let ids = stmt
            .query_map(params![now], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000;

    fn request(scope: &[&str], expires_at: u64) -> LeaseRequest {
        LeaseRequest {
            task: TaskId::from_random([7; 16]),
            agent: SpiffeId::parse("spiffe://example.org/agent/a").unwrap(),
            scope: Scope::parse(scope).unwrap(),
            expires_at,
        }
    }

    fn engine() -> ApiKeyEngine {
        ApiKeyEngine::in_memory(
            "crm-tools",
            Permission::parse("tool:crm.search:read").unwrap(),
        )
        .unwrap()
    }

    fn key_of(lease: &Lease) -> String {
        match &lease.secret {
            SecretMaterial::ApiKey { key } => key.expose().to_owned(),
            other => panic!("not an API key: {other:?}"),
        }
    }

    #[tokio::test]
    async fn issue_introspect_revoke() {
        let e = engine();
        let req = request(&["tool:crm.search:read", "dataset:crm:read"], NOW + 60);
        let lease = e.issue(&req, NOW).await.unwrap();
        assert_eq!(lease.engine, "crm-tools");
        let key = key_of(&lease);
        assert!(key.starts_with("bk_") && key.len() >= 46, "{key}");

        let i = e.introspect(&key, NOW + 1).unwrap();
        assert!(i.active);
        assert_eq!(i.task.as_ref(), Some(&req.task));
        assert_eq!(i.agent.as_ref(), Some(&req.agent));
        assert_eq!(i.scope.as_ref(), Some(&req.scope));
        assert_eq!(i.expires_at, Some(NOW + 60));
        assert_eq!(i.lease_id.as_deref(), Some(lease.id.as_str()));

        e.revoke(&lease.id).await.unwrap();
        assert_eq!(
            e.introspect(&key, NOW + 1).unwrap(),
            Introspection::inactive()
        );
        // Idempotent.
        e.revoke(&lease.id).await.unwrap();
        assert!(matches!(
            e.revoke("lease-nope").await,
            Err(SecretError::UnknownLease(_))
        ));
    }

    #[tokio::test]
    async fn expired_and_unknown_are_inactive() {
        let e = engine();
        let lease = e
            .issue(&request(&["tool:crm.*:*"], NOW + 60), NOW)
            .await
            .unwrap();
        let key = key_of(&lease);
        assert!(e.introspect(&key, NOW + 59).unwrap().active);
        assert_eq!(
            e.introspect(&key, NOW + 60).unwrap(),
            Introspection::inactive()
        );
        let mut tampered = key.clone();
        tampered.pop();
        tampered.push(if key.ends_with('A') { 'B' } else { 'A' });
        for k in [tampered.as_str(), "bk_unknown", "", "not-a-key"] {
            assert_eq!(e.introspect(k, NOW).unwrap(), Introspection::inactive());
        }
    }

    #[tokio::test]
    async fn sweep_reaps_expired_only() {
        let e = engine();
        let short = e
            .issue(&request(&["tool:crm.search:read"], NOW + 10), NOW)
            .await
            .unwrap();
        let long = e
            .issue(&request(&["tool:crm.search:read"], NOW + 100), NOW)
            .await
            .unwrap();
        assert_eq!(e.sweep(NOW + 10).await.unwrap(), vec![short.id.clone()]);
        assert!(e.sweep(NOW + 10).await.unwrap().is_empty());
        // Swept keys stay dead even if the clock passed in goes backwards.
        assert!(!e.introspect(&key_of(&short), NOW).unwrap().active);
        assert!(e.introspect(&key_of(&long), NOW + 50).unwrap().active);
    }

    #[tokio::test]
    async fn refuses_without_permission_and_creates_nothing() {
        let e = engine();
        let err = e
            .issue(&request(&["tool:hr.search:read"], NOW + 60), NOW)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("lacks permission tool:crm.search:read"),
            "{err}"
        );
        assert!(matches!(
            e.issue(&request(&["tool:crm.search:read"], NOW), NOW).await,
            Err(SecretError::AlreadyExpired { .. })
        ));
        let n: i64 = e
            .db()
            .query_row("SELECT count(*) FROM baton_api_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 0);
    }

    #[tokio::test]
    async fn plaintext_never_stored_and_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys.db");
        let required = Permission::parse("tool:crm.search:read").unwrap();
        let e = ApiKeyEngine::open(&path, "crm-tools", required.clone()).unwrap();
        let lease = e
            .issue(&request(&["tool:crm.search:read"], NOW + 60), NOW)
            .await
            .unwrap();
        let key = key_of(&lease);
        drop(e);
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert!(!text.contains(&key), "plaintext key in storage");
        assert!(!text.contains(&key[3..]), "key body in storage");
        assert!(
            bytes
                .windows(32)
                .any(|w| w == Sha256::digest(key.as_bytes()).as_slice()),
            "digest not stored"
        );
        let e = ApiKeyEngine::open(&path, "crm-tools", required).unwrap();
        assert!(e.introspect(&key, NOW).unwrap().active);
    }
}
