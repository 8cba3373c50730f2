//! PostgreSQL logins leased to a task.
//!
//! Per lease, in one transaction on the template's database:
//! 1. record the lease in `baton_admin.baton_leases` (the engine creates the
//!    schema and table), so a restarted Baton and [`SecretEngine::sweep`] find it;
//! 2. `CREATE ROLE "<prefix><24 hex>" LOGIN PASSWORD '<SCRAM verifier>'
//!    VALID UNTIL '<lease end, UTC>'`: the 43-character random password is
//!    hashed here (SCRAM-SHA-256, as `psql`'s `\password` does), so the clear
//!    text never reaches the server, its logs or `pg_stat_statements`;
//! 3. the template's grants, with `{role}` replaced by the quoted role name.
//!
//! Revoking: `ALTER ROLE … NOLOGIN` (committed first, so no new session can
//! start), `pg_terminate_backend` on every session of the role (waiting up to
//! five seconds for them to go), `DROP OWNED BY` + `DROP ROLE`, then the lease
//! is marked revoked. A failure leaves the lease pending, and the next sweep
//! retries it. `VALID UNTIL` makes the server refuse new logins after the
//! lease end even if Baton is down; the sweep ends the sessions still open.
//!
//! The admin connection uses `NoTls`: run it over a Unix socket or to a local
//! server. The admin role needs `CREATEROLE`, membership in
//! `pg_signal_backend` (or superuser), `CREATE` on the database (for the
//! admin schema) and the right to give the template's grants.

use std::time::Duration;

use async_trait::async_trait;
use baton_core::{Permission, Secret};
use tokio::sync::Mutex;
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, NoTls};

use crate::{
    Lease, LeaseRequest, SecretEngine, SecretError, SecretMaterial, check_request, check_required,
    new_lease_id, random_bytes, random_token, to_i64,
};

const LEASES: &str = "baton_admin.baton_leases";
const ROLE_PLACEHOLDER: &str = "{role}";
/// How long a revoke waits for terminated sessions to exit before dropping the role.
const SESSION_EXIT_WAIT: Duration = Duration::from_secs(5);
/// How long one attempt to drop a lease's role waits for a lock.
const DROP_LOCK_WAIT: Duration = Duration::from_secs(2);
/// Attempts to drop a role, ending the sessions in its way between them.
const DROP_ATTEMPTS: u32 = 3;

/// What a lease's role gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgTemplate {
    /// The database the role is meant for; grants and the lease table live here.
    pub database: String,
    /// Trusted operator SQL, each with a `{role}` placeholder, e.g.
    /// `GRANT SELECT ON ALL TABLES IN SCHEMA public TO {role}`.
    pub grants: Vec<String>,
    /// Prefix of the generated role names, e.g. `baton_`: `[a-z_][a-z0-9_]*`,
    /// at most 32 characters.
    pub role_prefix: String,
}

/// Leases PostgreSQL roles; see the module docs.
pub struct PostgresEngine {
    name: String,
    required: Permission,
    template: PgTemplate,
    config: Config,
    endpoint: (String, u16),
    client: Mutex<Option<Client>>,
    /// Leases the sweep could not drop, with how many times in a row and
    /// when to try again: see [`SWEEP_RETRY_FIRST`].
    retries: std::sync::Mutex<std::collections::HashMap<String, (u32, u64)>>,
}

/// The sweep's first retry of a lease it could not drop, doubled at each
/// further failure up to [`SWEEP_RETRY_MAX`]. A role that cannot be dropped
/// (it owns objects in another database) is otherwise retried at every
/// sweep, each a handful of round trips under the engine's lock, so that
/// thousands of them would hold up every lease and every revocation.
pub const SWEEP_RETRY_FIRST: u64 = 30;
/// See [`SWEEP_RETRY_FIRST`].
pub const SWEEP_RETRY_MAX: u64 = 3600;

impl std::fmt::Debug for PostgresEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The admin connection string may carry a password: not printed.
        f.debug_struct("PostgresEngine")
            .field("name", &self.name)
            .field("required", &self.required)
            .field("database", &self.template.database)
            .field("role_prefix", &self.template.role_prefix)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// `"ident"` with embedded quotes doubled.
fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// A string literal safe whatever `standard_conforming_strings` says.
fn quote_literal(s: &str) -> String {
    let body = s.replace('\'', "''");
    if body.contains('\\') {
        format!("E'{}'", body.replace('\\', "\\\\"))
    } else {
        format!("'{body}'")
    }
}

/// Unix seconds as a PostgreSQL timestamptz literal body, in UTC.
fn utc_timestamp(secs: u64) -> Result<String, SecretError> {
    let t = time::OffsetDateTime::from_unix_timestamp(to_i64(secs, "expires_at")?)
        .map_err(|_| SecretError::Config(format!("expires_at {secs} is out of range")))?;
    Ok(format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}+00",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

fn validate_template(t: &PgTemplate) -> Result<(), SecretError> {
    let p = &t.role_prefix;
    let ok = p.len() <= 32
        && p.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        return Err(SecretError::Config(format!(
            "role_prefix {p:?} must match [a-z_][a-z0-9_]* and be at most 32 characters"
        )));
    }
    if t.database.is_empty() {
        return Err(SecretError::Config("database must not be empty".into()));
    }
    if let Some(g) = t.grants.iter().find(|g| !g.contains(ROLE_PLACEHOLDER)) {
        return Err(SecretError::Config(format!(
            "grant {g:?} has no {ROLE_PLACEHOLDER} placeholder"
        )));
    }
    Ok(())
}

impl PostgresEngine {
    /// Connects with `admin_conn_string` (libpq key/value or URL form; its
    /// database is replaced by `template.database`), creates the lease table
    /// if needed, and names the engine `postgres.<database>`.
    pub async fn new(
        admin_conn_string: &str,
        template: PgTemplate,
        required: Permission,
    ) -> Result<Self, SecretError> {
        Self::from_config(admin_conn_string.parse()?, template, required).await
    }

    /// As [`PostgresEngine::new`], with the admin connection already parsed
    /// (a password read from a file set on it, say).
    pub async fn from_config(
        mut config: Config,
        template: PgTemplate,
        required: Permission,
    ) -> Result<Self, SecretError> {
        validate_template(&template)?;
        check_required(&required)?;
        config.dbname(&template.database);
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
            None => "localhost".to_owned(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let client = connect(&config).await?;
        client
            .batch_execute(
                "CREATE SCHEMA IF NOT EXISTS baton_admin;
                 REVOKE ALL ON SCHEMA baton_admin FROM PUBLIC;
                 CREATE TABLE IF NOT EXISTS baton_admin.baton_leases (
                     lease_id   TEXT PRIMARY KEY,
                     role       TEXT NOT NULL UNIQUE,
                     task       TEXT NOT NULL,
                     agent      TEXT NOT NULL,
                     expires_at BIGINT NOT NULL,
                     issued_at  BIGINT NOT NULL,
                     revoked_at BIGINT
                 );
                 CREATE INDEX IF NOT EXISTS baton_leases_pending
                     ON baton_admin.baton_leases (expires_at) WHERE revoked_at IS NULL;",
            )
            .await?;
        Ok(Self {
            name: format!("postgres.{}", template.database),
            required,
            template,
            config,
            endpoint: (host, port),
            client: Mutex::new(Some(client)),
            retries: Default::default(),
        })
    }

    /// Renames the engine (the `engine` field of its leases).
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// The host and port agents should use, when they differ from the admin
    /// connection's (a socket directory or address inside their sandbox).
    pub fn with_endpoint(mut self, host: impl Into<String>, port: u16) -> Self {
        self.endpoint = (host.into(), port);
        self
    }

    /// The admin client, reconnecting if the server dropped it.
    async fn client<'a>(
        &self,
        slot: &'a mut Option<Client>,
    ) -> Result<&'a mut Client, SecretError> {
        if slot.as_ref().is_none_or(Client::is_closed) {
            *slot = Some(connect(&self.config).await?);
        }
        slot.as_mut()
            .ok_or_else(|| SecretError::Config("no admin connection".into()))
    }
}

async fn connect(config: &Config) -> Result<Client, SecretError> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "baton-secrets: admin connection to postgres ended");
        }
    });
    Ok(client)
}

/// Revokes one recorded lease; `Ok` when it already was.
async fn revoke_lease(client: &mut Client, lease_id: &str) -> Result<(), SecretError> {
    let row = client
        .query_opt(
            &format!("SELECT role, revoked_at IS NOT NULL FROM {LEASES} WHERE lease_id = $1"),
            &[&lease_id],
        )
        .await?;
    let Some(row) = row else {
        return Err(SecretError::UnknownLease(lease_id.to_owned()));
    };
    let role: String = row.try_get(0)?;
    let revoked: bool = row.try_get(1)?;
    if revoked {
        return Ok(());
    }
    drop_role(client, &role).await?;
    client
        .execute(
            &format!(
                "UPDATE {LEASES} SET revoked_at = extract(epoch FROM now())::bigint
                 WHERE lease_id = $1 AND revoked_at IS NULL"
            ),
            &[&lease_id],
        )
        .await?;
    tracing::info!(lease = lease_id, role = %role, "baton-secrets: postgres lease revoked");
    Ok(())
}

async fn drop_role(client: &mut Client, role: &str) -> Result<(), SecretError> {
    let exists = client
        .query_opt("SELECT 1 FROM pg_roles WHERE rolname = $1", &[&role])
        .await?
        .is_some();
    if !exists {
        return Ok(());
    }
    let ident = quote_ident(role);
    // Committed on its own so that no new session starts from here on.
    client
        .batch_execute(&format!("ALTER ROLE {ident} NOLOGIN"))
        .await?;
    let sessions = "SELECT count(*) FROM pg_stat_activity WHERE usename = $1";
    client
        .execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = $1",
            &[&role],
        )
        .await?;
    let deadline = tokio::time::Instant::now() + SESSION_EXIT_WAIT;
    loop {
        let n: i64 = client.query_one(sessions, &[&role]).await?.try_get(0)?;
        if n == 0 {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                role,
                sessions = n,
                "baton-secrets: sessions still exiting; dropping the role anyway"
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Another session can hold a lock the drop needs (an open transaction
    // that granted this role default privileges, or that reads a table it
    // owns): such a session would make the revocation, and with it every
    // call on this engine, wait forever. The drop waits a bounded time,
    // then the sessions holding locks on the role or on what it owns are
    // ended, and it is tried again; failing still, it is an error (the
    // sweep tries again later) and the engine is free.
    for attempt in 1..=DROP_ATTEMPTS {
        let tx = client.transaction().await?;
        let dropped = tx
            .batch_execute(&format!(
                "SET LOCAL lock_timeout = '{}ms'; DROP OWNED BY {ident}; DROP ROLE {ident}",
                DROP_LOCK_WAIT.as_millis()
            ))
            .await;
        match dropped {
            Ok(()) => {
                tx.commit().await?;
                return Ok(());
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) => {
                drop(tx);
                let ended = client
                    .execute(
                        "SELECT pg_terminate_backend(l.pid) FROM pg_locks l
                         WHERE l.granted AND l.pid <> pg_backend_pid() AND (
                           (l.locktype = 'object'
                             AND l.classid = 'pg_authid'::regclass
                             AND l.objid = (SELECT oid FROM pg_roles WHERE rolname = $1))
                           OR (l.locktype = 'relation' AND l.relation IN (
                             SELECT c.oid FROM pg_class c
                             JOIN pg_roles r ON c.relowner = r.oid
                             WHERE r.rolname = $1)))",
                        &[&role],
                    )
                    .await?;
                tracing::warn!(
                    role,
                    attempt,
                    sessions_ended = ended,
                    "baton-secrets: other sessions held locks the role's drop needs; ended them"
                );
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(SecretError::Blocked(format!(
        "role {role} could not be dropped: other sessions kept holding locks it needs ({DROP_ATTEMPTS} attempts); it cannot log in, and the next sweep tries again"
    )))
}

#[async_trait]
impl SecretEngine for PostgresEngine {
    fn name(&self) -> &str {
        &self.name
    }

    fn required(&self) -> &Permission {
        &self.required
    }

    async fn issue(&self, req: &LeaseRequest, now: u64) -> Result<Lease, SecretError> {
        check_request(&self.name, &self.required, req, now)?;
        let id = new_lease_id()?;
        // INVARIANT: the role name and password are generated here, never
        // taken from a request; they are quoted anyway.
        let role = format!(
            "{}{}",
            self.template.role_prefix,
            hex::encode(random_bytes::<12>()?)
        );
        let password = random_token()?;
        let verifier = postgres_protocol::password::scram_sha_256(password.as_bytes());
        let ident = quote_ident(&role);
        let create = format!(
            "CREATE ROLE {ident} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION \
             NOBYPASSRLS PASSWORD {} VALID UNTIL {}",
            quote_literal(&verifier),
            quote_literal(&utc_timestamp(req.expires_at)?)
        );
        let expires_at = to_i64(req.expires_at, "expires_at")?;
        let issued_at = to_i64(now, "now")?;

        let mut slot = self.client.lock().await;
        let client = self.client(&mut slot).await?;
        // One transaction: the record, the role and its grants exist together or not at all.
        let tx = client.transaction().await?;
        tx.execute(
            &format!(
                "INSERT INTO {LEASES} (lease_id, role, task, agent, expires_at, issued_at)
                 VALUES ($1, $2, $3, $4, $5, $6)"
            ),
            &[
                &id,
                &role,
                &req.task.as_str(),
                &req.agent.as_str(),
                &expires_at,
                &issued_at,
            ],
        )
        .await?;
        tx.batch_execute(&create).await?;
        for grant in &self.template.grants {
            tx.batch_execute(&grant.replace(ROLE_PLACEHOLDER, &ident))
                .await?;
        }
        tx.commit().await?;
        tracing::info!(lease = %id, role = %role, task = %req.task, agent = %req.agent,
            expires_at = req.expires_at, "baton-secrets: postgres lease issued");

        Ok(Lease {
            id,
            engine: self.name.clone(),
            task: req.task.clone(),
            agent: req.agent.clone(),
            expires_at: req.expires_at,
            secret: SecretMaterial::Postgres {
                host: self.endpoint.0.clone(),
                port: self.endpoint.1,
                dbname: self.template.database.clone(),
                username: role,
                password: Secret::new(password),
            },
        })
    }

    async fn revoke(&self, lease_id: &str) -> Result<(), SecretError> {
        let mut slot = self.client.lock().await;
        let client = self.client(&mut slot).await?;
        revoke_lease(client, lease_id).await
    }

    async fn sweep(&self, now: u64) -> Result<Vec<String>, SecretError> {
        let at = i64::try_from(now).unwrap_or(i64::MAX);
        let due: Vec<String> = {
            let mut slot = self.client.lock().await;
            let client = self.client(&mut slot).await?;
            client
                .query(
                    &format!(
                        "SELECT lease_id FROM {LEASES}
                         WHERE revoked_at IS NULL AND expires_at <= $1 ORDER BY expires_at"
                    ),
                    &[&at],
                )
                .await?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<Result<_, _>>()?
        };
        let retries = || self.retries.lock().unwrap_or_else(|e| e.into_inner());
        retries().retain(|id, _| due.contains(id));
        let mut reaped = Vec::new();
        let mut failed = Vec::new();
        for id in due {
            if retries().get(&id).is_some_and(|(_, next)| *next > now) {
                continue;
            }
            // The lock per lease, not per sweep: leases and revocations go
            // on between them.
            let revoked = {
                let mut slot = self.client.lock().await;
                match self.client(&mut slot).await {
                    Ok(client) => revoke_lease(client, &id).await,
                    Err(e) => Err(e),
                }
            };
            match revoked {
                Ok(()) => {
                    retries().remove(&id);
                    reaped.push(id);
                }
                Err(e) => {
                    let mut r = retries();
                    let entry = r.entry(id.clone()).or_insert((0, now));
                    let wait = SWEEP_RETRY_FIRST
                        .saturating_mul(1 << entry.0.min(20))
                        .min(SWEEP_RETRY_MAX);
                    *entry = (entry.0.saturating_add(1), now.saturating_add(wait));
                    tracing::warn!(lease = %id, error = %e, retry_in_secs = wait, "baton-secrets: sweep could not revoke a lease");
                    failed.push((id, e.to_string()));
                }
            }
        }
        if failed.is_empty() {
            Ok(reaped)
        } else {
            Err(SecretError::Sweep { reaped, failed })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("baton_ab"), "\"baton_ab\"");
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("x'y"), "'x''y'");
        assert_eq!(quote_literal("a\\'b"), "E'a\\\\''b'");
    }

    #[test]
    fn timestamps_are_utc() {
        assert_eq!(utc_timestamp(0).unwrap(), "1970-01-01 00:00:00+00");
        assert_eq!(
            utc_timestamp(1_700_000_000).unwrap(),
            "2023-11-14 22:13:20+00"
        );
        assert!(utc_timestamp(u64::MAX).is_err());
    }

    #[test]
    fn template_validation() {
        let ok = PgTemplate {
            database: "crm".into(),
            grants: vec!["GRANT SELECT ON t TO {role}".into()],
            role_prefix: "baton_".into(),
        };
        assert!(validate_template(&ok).is_ok());
        for prefix in ["", "Baton", "1x", "a-b", "x\"; DROP"] {
            let t = PgTemplate {
                role_prefix: prefix.into(),
                ..ok.clone()
            };
            assert!(validate_template(&t).is_err(), "{prefix}");
        }
        let t = PgTemplate {
            grants: vec!["GRANT SELECT ON t TO PUBLIC".into()],
            ..ok
        };
        assert!(validate_template(&t).is_err());
    }
}
