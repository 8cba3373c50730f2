//! Just-in-time secrets per task that die with it.
//!
//! Place in the flow: once the broker has granted a task (or a hop of it) a
//! scope, an agent that needs a database login or an API key for a tool
//! server that cannot do mTLS asks for a [`Lease`]. The broker builds a
//! [`LeaseRequest`] whose `expires_at` is never after the task's or the
//! credential's expiry and calls [`SecretEngine::issue`]; the engine refuses
//! unless the task scope holds [`SecretEngine::required`]. When the task ends
//! the broker calls [`SecretEngine::revoke`]; because that notification can
//! get lost (crash, partition), a periodic [`SecretEngine::sweep`] reaps every
//! lease past its expiry. Leases are recorded in the backend itself so they
//! survive a Baton restart.
//!
//! Engines:
//! - [`PostgresEngine`]: one `LOGIN` role per lease with a random password,
//!   `VALID UNTIL` the lease end and only the template's grants;
//! - [`ApiKeyEngine`]: random `bk_…` keys stored only as SHA-256 digests,
//!   checked by tool servers through [`ApiKeyEngine::introspect`].

use std::fmt;

use async_trait::async_trait;
use base64::Engine as _;
use baton_core::{Permission, Scope, Secret, SpiffeId, TaskId};

mod apikey;
mod postgres;
#[cfg(feature = "test-support")]
pub mod testing;

pub use apikey::{ApiKeyEngine, Introspection};
pub use postgres::{PgTemplate, PostgresEngine, SWEEP_RETRY_FIRST, SWEEP_RETRY_MAX};

/// What a task asks an engine for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRequest {
    pub task: TaskId,
    pub agent: SpiffeId,
    /// The task's (attenuated) scope; must hold the engine's `required()`.
    pub scope: Scope,
    /// Unix seconds. The caller guarantees it is never after the task's or
    /// the presenting credential's expiry; the engine refuses `<= now`.
    pub expires_at: u64,
}

/// A secret handed to one agent for one task, until `expires_at`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// `lease-<32 hex>`, random.
    pub id: String,
    /// The issuing engine's [`SecretEngine::name`].
    pub engine: String,
    pub task: TaskId,
    pub agent: SpiffeId,
    pub expires_at: u64,
    pub secret: SecretMaterial,
}

/// The secret itself. `Debug` never prints a password or key (they are
/// [`Secret`]s).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretMaterial {
    Postgres {
        /// A host name, an IP address, or a Unix socket directory (starts with `/`).
        host: String,
        port: u16,
        dbname: String,
        username: String,
        password: Secret,
    },
    ApiKey {
        key: Secret,
    },
}

/// Why an engine refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("task {task} lacks permission {required} required by secret engine {engine}")]
    MissingPermission {
        engine: String,
        task: TaskId,
        required: Permission,
    },
    #[error("lease would expire at {expires_at}, not after now ({now})")]
    AlreadyExpired { expires_at: u64, now: u64 },
    #[error("unknown lease {0}")]
    UnknownLease(String),
    #[error("invalid engine configuration: {0}")]
    Config(String),
    #[error("lease revocation blocked: {0}")]
    Blocked(String),
    #[error("postgres: {}", pg_message(.0))]
    Postgres(#[from] tokio_postgres::Error),
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("stored lease record is corrupt: {0}")]
    Corrupt(String),
    #[error("random number generator failed")]
    Random,
    #[error("sweep reaped {} lease(s) but failed on {}: {}", reaped.len(), failed.len(),
        failed.iter().map(|(id, e)| format!("{id}: {e}")).collect::<Vec<_>>().join("; "))]
    Sweep {
        /// Leases reaped before and after the failures.
        reaped: Vec<String>,
        /// `(lease id, error)`; they stay pending and the next sweep retries them.
        failed: Vec<(String, String)>,
    },
}

/// A backend that leases secrets to tasks.
#[async_trait]
pub trait SecretEngine: Send + Sync + fmt::Debug {
    fn name(&self) -> &str;
    /// The permission a task scope must hold to get a lease, e.g.
    /// `dataset:crm:read` or `secret:postgres.crm:read`.
    fn required(&self) -> &Permission;
    /// Issues a lease. Refuses, creating nothing, when `req.scope` lacks
    /// [`required`](Self::required) or `req.expires_at <= now`.
    async fn issue(&self, req: &LeaseRequest, now: u64) -> Result<Lease, SecretError>;
    /// Kills a lease. Idempotent: revoking a revoked lease is `Ok`; an id this
    /// engine never issued is [`SecretError::UnknownLease`].
    async fn revoke(&self, lease_id: &str) -> Result<(), SecretError>;
    /// Revokes every lease with `expires_at <= now` not yet revoked and
    /// returns their ids.
    async fn sweep(&self, now: u64) -> Result<Vec<String>, SecretError>;
}

/// `tokio_postgres::Error`'s `Display` says only "db error" for server errors.
fn pg_message(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {}: {}", db.severity(), db.code().code(), db.message()),
        None => e.to_string(),
    }
}

/// The checks every engine makes before creating anything.
fn check_request(
    engine: &str,
    required: &Permission,
    req: &LeaseRequest,
    now: u64,
) -> Result<(), SecretError> {
    if !req.scope.allows(required) {
        return Err(SecretError::MissingPermission {
            engine: engine.to_owned(),
            task: req.task.clone(),
            required: required.clone(),
        });
    }
    if req.expires_at <= now {
        return Err(SecretError::AlreadyExpired {
            expires_at: req.expires_at,
            now,
        });
    }
    Ok(())
}

/// A `required` permission with a wildcard would only be met by scopes that
/// hold the same wildcard: refused, so that engines name one concrete grant.
fn check_required(required: &Permission) -> Result<(), SecretError> {
    if required.action() == "*" || required.resource().ends_with(".*") {
        return Err(SecretError::Config(format!(
            "required permission {required} must not contain a wildcard"
        )));
    }
    Ok(())
}

fn random_bytes<const N: usize>() -> Result<[u8; N], SecretError> {
    let mut buf = [0u8; N];
    aws_lc_rs::rand::fill(&mut buf).map_err(|_| SecretError::Random)?;
    Ok(buf)
}

/// `lease-<32 hex>`.
fn new_lease_id() -> Result<String, SecretError> {
    Ok(format!("lease-{}", hex::encode(random_bytes::<16>()?)))
}

/// 32 random bytes as unpadded base64url: 43 characters.
fn random_token() -> Result<String, SecretError> {
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(random_bytes::<32>()?))
}

fn to_i64(v: u64, what: &str) -> Result<i64, SecretError> {
    i64::try_from(v).map_err(|_| SecretError::Config(format!("{what} {v} is out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_prints_secrets() {
        let lease = Lease {
            id: "lease-00".into(),
            engine: "postgres".into(),
            task: TaskId::from_random([1; 16]),
            agent: SpiffeId::parse("spiffe://example.org/agent").unwrap(),
            expires_at: 10,
            secret: SecretMaterial::Postgres {
                host: "/run/pg".into(),
                port: 5432,
                dbname: "crm".into(),
                username: "baton_x".into(),
                password: Secret::new("hunter2-password"),
            },
        };
        let out = format!("{lease:?} {:?}", lease.secret);
        assert!(!out.contains("hunter2"), "{out}");
        assert!(out.contains("baton_x"));
        let key = SecretMaterial::ApiKey {
            key: Secret::new("bk_topsecretkey"),
        };
        assert!(!format!("{key:?}").contains("topsecret"));
    }

    #[test]
    fn tokens_are_long_and_url_safe() {
        let t = random_token().unwrap();
        assert_eq!(t.len(), 43);
        assert!(
            t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_ne!(t, random_token().unwrap());
        let id = new_lease_id().unwrap();
        assert!(id.starts_with("lease-") && id.len() == 38);
    }

    #[test]
    fn required_must_be_concrete() {
        assert!(check_required(&Permission::parse("dataset:crm:read").unwrap()).is_ok());
        for p in ["dataset:crm:*", "tool:crm.*:read"] {
            assert!(
                check_required(&Permission::parse(p).unwrap()).is_err(),
                "{p}"
            );
        }
    }
}
