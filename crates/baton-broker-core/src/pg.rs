//! PostgreSQL behind the broker's store traits ([`Datastore`], [`TaskStore`],
//! [`Ledger`]): the state several brokers share.
//!
//! Every atomic step of the SQLite store stays atomic here, also between
//! brokers:
//! - join tokens and grants are consumed by one conditional `UPDATE ...
//!   RETURNING` (or a row lock, for a redeem), so of two brokers racing on
//!   one, one wins;
//! - a node upsert keeps a ban (`banned = nodes.banned OR excluded.banned`);
//! - registrations take a shared advisory lock and every write to the
//!   revocation log an exclusive one, per transaction: a revocation sees
//!   every credential registered before it, a registration after it sees
//!   the revocation, and the log's sequence numbers commit in order (a
//!   follower reading `seq > n` never skips one that commits late);
//! - schema migrations run once, under a session advisory lock, whichever
//!   broker starts first.
//!
//! The traits are synchronous: each call runs on the caller's thread
//! (`block_in_place` on a multi-threaded runtime, as the SQLite store
//! does), while the connections are driven by a small runtime of the
//! store's own. Connections are direct or through a pooler in session mode
//! (a revocation's working set is a temporary table of its session).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use baton_core::api::ApprovalState;
use baton_core::{Entry, EntryId, SpiffeId, TaskId};
use baton_revocation::{CredKind, CredentialRecord, Revoked, Target};
use tokio_postgres::config::Host;
use tokio_postgres::{Client, Config, GenericClient, NoTls, Row, Statement};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::ledger::{Ledger, LogRow, token_pair};
use crate::revocation::TaskCredential;
use crate::store::{
    AgentBlock, Datastore, JoinTokenRefusal, NodeRecord, StoreError, corrupt, entry_from_row,
    selectors_text, to_i64,
};
use crate::tasks::{
    GrantDelivery, GrantRecord, GrantRefusal, RedeemRefusal, TaskRecord, TaskStore, TokenRecord,
    dec, enc,
};

/// Ordered schema migrations; the index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    // 1: everything the SQLite store holds at its version 9.
    "CREATE TABLE entries (
        id TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        parent_id TEXT NOT NULL,
        selectors TEXT NOT NULL,
        x509_ttl_secs BIGINT NOT NULL,
        jwt_ttl_secs BIGINT NOT NULL,
        dns_names TEXT NOT NULL,
        UNIQUE (spiffe_id, parent_id, selectors)
     );
     CREATE INDEX entries_by_parent ON entries(parent_id);
     CREATE TABLE join_tokens (
        digest TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        used_at BIGINT
     );
     CREATE TABLE nodes (
        spiffe_id TEXT PRIMARY KEY,
        serial TEXT NOT NULL,
        svid_not_after BIGINT NOT NULL,
        attested_at BIGINT NOT NULL,
        banned BOOLEAN NOT NULL DEFAULT FALSE,
        prev_serial TEXT
     );
     CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        record TEXT NOT NULL,
        created_at BIGINT NOT NULL
     );
     CREATE TABLE grants (
        digest TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        record TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        used_at BIGINT
     );
     CREATE INDEX grants_by_task ON grants(task_id);
     CREATE TABLE tokens (
        n BIGSERIAL,
        jti TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        record TEXT NOT NULL
     );
     CREATE INDEX tokens_by_task ON tokens(task_id, n);
     CREATE TABLE tool_reports (
        report_id TEXT PRIMARY KEY,
        audit_index BIGINT NOT NULL
     );
     CREATE TABLE revocations (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        reason TEXT NOT NULL,
        at BIGINT NOT NULL
     );
     CREATE INDEX revocations_by_expiry ON revocations(expires_at);
     CREATE TABLE agent_blocks (
        spiffe_id TEXT PRIMARY KEY,
        until BIGINT,
        reason TEXT NOT NULL,
        at BIGINT NOT NULL
     );
     CREATE TABLE revocation_log (
        seq BIGSERIAL PRIMARY KEY,
        id TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        kind TEXT NOT NULL,
        reason TEXT NOT NULL
     );
     CREATE INDEX revocation_log_by_expiry ON revocation_log(expires_at);
     CREATE TABLE feed_meta (epoch TEXT NOT NULL);
     INSERT INTO feed_meta (epoch) VALUES (replace(gen_random_uuid()::text, '-', ''));
     CREATE TABLE used_id_tokens (
        digest TEXT PRIMARY KEY,
        expires_at BIGINT NOT NULL
     );
     CREATE TABLE credentials (
        n BIGSERIAL,
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        task TEXT,
        agent TEXT,
        node TEXT,
        parent TEXT,
        expires_at BIGINT NOT NULL
     );
     CREATE INDEX credentials_by_task ON credentials(task, n) WHERE task IS NOT NULL;
     CREATE INDEX credentials_by_agent ON credentials(agent) WHERE agent IS NOT NULL;
     CREATE INDEX credentials_by_node ON credentials(node) WHERE node IS NOT NULL;
     CREATE INDEX credentials_by_parent ON credentials(parent) WHERE parent IS NOT NULL;
     CREATE INDEX credentials_by_expiry ON credentials(expires_at);
     CREATE TABLE revoked_tasks (
        task TEXT PRIMARY KEY,
        at BIGINT NOT NULL
     );
     CREATE TABLE approvals (
        n BIGSERIAL,
        id TEXT PRIMARY KEY,
        binding TEXT NOT NULL,
        task TEXT NOT NULL,
        status TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        record TEXT NOT NULL
     );
     CREATE INDEX approvals_by_binding ON approvals(binding, n);",
    // 2: the CA shared by every broker (sealed files and journal) and the
    // leases that make one broker run a schedule.
    "CREATE TABLE ca_journal (
        id INT PRIMARY KEY CHECK (id = 1),
        data BYTEA NOT NULL
     );
     CREATE TABLE ca_files (
        name TEXT PRIMARY KEY,
        data BYTEA NOT NULL
     );
     CREATE TABLE node_syncs (
        node TEXT PRIMARY KEY,
        synced_at BIGINT NOT NULL,
        applied BIGINT
     );
     CREATE TABLE leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        expires_at DOUBLE PRECISION NOT NULL
     );",
    // 3: every broker's audit log, copied here before its receipts are
    // returned (one log per broker; `audit trace` and `verify` read them
    // all).
    "CREATE TABLE audit_logs (
        log_id TEXT PRIMARY KEY,
        sealed_key BYTEA NOT NULL,
        broker TEXT NOT NULL,
        registered_at BIGINT NOT NULL
     );
     CREATE TABLE audit_leaves (
        log_id TEXT NOT NULL,
        idx BIGINT NOT NULL,
        task_id TEXT NOT NULL,
        event BYTEA NOT NULL,
        leaf_hash BYTEA NOT NULL,
        clear_text BYTEA,
        PRIMARY KEY (log_id, idx)
     );
     CREATE TABLE audit_checkpoints (
        log_id TEXT NOT NULL,
        size BIGINT NOT NULL,
        root_hash TEXT NOT NULL,
        at BIGINT NOT NULL,
        signature TEXT NOT NULL,
        PRIMARY KEY (log_id, size)
     );",
    // 4: what a redeem delivered, kept with its grant so that the same
    // request replayed after a lost answer gets the same credential
    // (SQLite's version 10).
    "ALTER TABLE grants ADD COLUMN delivery TEXT, ADD COLUMN redelivered_at BIGINT;",
];

/// Advisory lock keys ("baton" in ASCII, then a number).
const MIGRATION_LOCK: i64 = 0x6261_746f_6e01;
pub(crate) const REVOCATION_LOCK: i64 = 0x6261_746f_6e02;
const CA_LOCK: i64 = 0x6261_746f_6e03;

/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach the database.
#[derive(Clone)]
pub struct PgSettings {
    /// libpq key/value or URL connection string.
    pub conn: String,
    /// Overrides a password in `conn`.
    pub password: Option<baton_core::Secret>,
    /// Connections kept open (at least 1).
    pub pool: usize,
    /// TLS files; with any of them (or `sslmode=require`) TLS is required.
    pub tls: crate::pg_tls::PgTls,
}

impl std::fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSettings")
            .field("conn", &redact(&self.conn))
            .field("password", &self.password.as_ref().map(|_| "(redacted)"))
            .field("pool", &self.pool)
            .field("tls", &self.tls)
            .finish()
    }
}

/// A connection string without its password (for messages and logs).
/// One that names a password anywhere else than a URL's user info (a
/// `password` key, spaced or quoted, or a URL query parameter) is not
/// shown at all.
pub fn redact(conn: &str) -> String {
    let url = conn.starts_with("postgres://") || conn.starts_with("postgresql://");
    let shown = if url {
        baton_revocation::redact_url(conn)
    } else if conn.contains('@') || conn.contains(":/") {
        // A URL spelt otherwise (`postgresql:/u:p@db`, `Postgres://`),
        // whose user info the URL form above would not find: it may hold
        // a password, so none of it is shown.
        return "(a connection string that may hold a password, not shown)".to_owned();
    } else {
        conn.to_owned()
    };
    let lower = shown.to_ascii_lowercase();
    // A percent-encoded key (`?pass%77ord=`) is decoded by the driver.
    if lower.contains("password") || (url && lower.contains('?') && lower.contains('%')) {
        return "(a connection string with a password, not shown)".to_owned();
    }
    shown
}

/// Where a parsed configuration connects: `user@host:port,…/dbname`, never
/// a password.
fn describe(config: &Config) -> String {
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let hosts: Vec<String> = if config.get_hosts().is_empty() {
        config
            .get_hostaddrs()
            .iter()
            .enumerate()
            .map(|(i, a)| format!("{a}:{}", port(i)))
            .collect()
    } else {
        config
            .get_hosts()
            .iter()
            .enumerate()
            .map(|(i, h)| match h {
                Host::Tcp(name) => format!("{name}:{}", port(i)),
                Host::Unix(dir) => format!("{}:{}", dir.display(), port(i)),
            })
            .collect()
    };
    format!(
        "{}@{}/{}",
        config.get_user().unwrap_or(""),
        hosts.join(","),
        config.get_dbname().unwrap_or("")
    )
}

/// The runtime that drives the connections; shut down without blocking
/// (the store may be dropped on an async worker).
struct Driver(Option<tokio::runtime::Runtime>);

impl Drop for Driver {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// PostgreSQL implementation of the broker's stores.
pub struct PgStore {
    config: Config,
    tls: Option<MakeRustlsConnect>,
    endpoint: String,
    slots: Vec<Mutex<Option<PgConn>>>,
    next: AtomicUsize,
    handle: tokio::runtime::Handle,
    _driver: Driver,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("endpoint", &self.endpoint)
            .field("pool", &self.slots.len())
            .finish_non_exhaustive()
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // `Display` says only "db error" for an error the server sent.
        let message = match e.as_db_error() {
            Some(db) => format!("{} ({})", db.message(), db.code().code()),
            None => {
                // With its causes: "error performing TLS handshake" alone
                // does not tell an unknown CA from another host's name.
                let mut m = e.to_string();
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    m.push_str(": ");
                    m.push_str(&c.to_string());
                    cause = c.source();
                }
                m
            }
        };
        StoreError::Postgres(message)
    }
}

fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn limit_of(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// A pooled connection and the statements prepared on it.
struct PgConn {
    client: Client,
    statements: Statements,
}

/// The statements prepared on one connection, by their SQL.
type Statements = std::sync::Arc<Mutex<std::collections::HashMap<&'static str, Statement>>>;

thread_local! {
    /// The statements of the connection the running [`on_conn!`] body
    /// holds (the body is polled on this thread to its end).
    static STATEMENTS: std::cell::RefCell<Option<Statements>> = const { std::cell::RefCell::new(None) };
}

/// Makes `statements` those [`Prepared::stmt`] uses on this thread until
/// dropped (then the previous ones again).
struct StatementScope(Option<Statements>);

impl StatementScope {
    fn enter(statements: &Statements) -> Self {
        Self(STATEMENTS.with(|s| s.replace(Some(statements.clone()))))
    }
}

impl Drop for StatementScope {
    fn drop(&mut self) {
        let previous = self.0.take();
        STATEMENTS.with(|s| *s.borrow_mut() = previous);
    }
}

/// Statements prepared once per connection: a query is then one round
/// trip to the server (bind and execute) instead of two (parse and
/// describe, then bind and execute), and the server plans it once.
trait Prepared: GenericClient + Sync {
    /// `sql` prepared on this connection (once; then from its cache).
    async fn stmt(&self, sql: &'static str) -> Result<Statement, tokio_postgres::Error> {
        let cache = STATEMENTS.with(|s| s.borrow().clone());
        if let Some(hit) = cache
            .as_ref()
            .and_then(|c| c.lock().ok().and_then(|m| m.get(sql).cloned()))
        {
            return Ok(hit);
        }
        let prepared = self.prepare(sql).await?;
        if let Some(Ok(mut m)) = cache.as_ref().map(|c| c.lock()) {
            m.insert(sql, prepared.clone());
        }
        Ok(prepared)
    }
}

impl<T: GenericClient + Sync> Prepared for T {}

impl PgConn {
    /// Forgets the prepared statements after an error that says they are
    /// stale: a plan whose result changed (another broker migrated the
    /// schema, `0A000`) or a statement the server no longer has (`26000`,
    /// e.g. a pooler's reset). The next call prepares them again.
    fn forget_stale<T>(&self, r: &Result<T, StoreError>) {
        if let Err(StoreError::Postgres(m)) = r
            && (m.contains("(0A000)") || m.contains("(26000)"))
            && let Ok(mut s) = self.statements.lock()
        {
            s.clear();
        }
    }
}

/// Runs `$body` (an expression that may `.await`, with `$c: &mut Client`)
/// on a pooled connection, off the async workers, with the connection's
/// prepared statements for [`Prepared::stmt`]. A macro over a plain
/// async block rather than a method taking an async closure: ~50 async
/// closures passed to one generic method made type-checking this crate take
/// minutes.
/// Voids a node's unused join tokens (`$1`: the node's SPIFFE ID).
const VOID_JOIN_TOKENS_PG: &str = "DELETE FROM join_tokens WHERE node_id = $1 AND used_at IS NULL";

macro_rules! on_conn {
    ($store:expr, |$c:ident| $body:expr) => {{
        let store: &PgStore = &$store;
        match store.checkout() {
            Ok(mut slot) => match slot.as_mut() {
                Some(conn) => {
                    let scope = StatementScope::enter(&conn.statements);
                    let r = {
                        let $c = &mut conn.client;
                        PgStore::counted(store.block(async { $body }))
                    };
                    drop(scope);
                    conn.forget_stale(&r);
                    r
                }
                None => Err(StoreError::Poisoned),
            },
            Err(e) => Err(e),
        }
    }};
}

impl PgStore {
    /// Connects (failing with what was wrong: a bad connection string, an
    /// unreachable server, a refused login) and migrates the schema.
    pub fn open(settings: &PgSettings) -> Result<Self, StoreError> {
        let mut config: Config = settings.conn.parse().map_err(|e| {
            StoreError::Config(format!(
                "the PostgreSQL connection string {} is not valid: {e}",
                redact(&settings.conn)
            ))
        })?;
        if let Some(p) = &settings.password {
            config.password(p.expose().as_bytes());
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        // A peer that stops answering (a frozen or cut-off broker, a dead
        // server) is noticed in about a minute, not the kernel's 2 hours.
        if config.get_tcp_user_timeout().is_none() {
            config.tcp_user_timeout(Duration::from_secs(60));
        }
        config.keepalives_idle(Duration::from_secs(30));
        config.application_name("baton-broker");
        let tls = crate::pg_tls::connector(&mut config, &settings.tls)?;
        let endpoint = describe(&config);
        if tls.is_none() && !crate::pg_tls::is_local(&config) {
            tracing::warn!(
                endpoint,
                "the connection to PostgreSQL is not encrypted and leaves this machine: \
                 name the server's CA with --datastore-ca (or set sslmode=require)"
            );
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("baton-pg")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Config(format!("cannot start the PostgreSQL driver: {e}")))?;
        let store = Self {
            endpoint,
            config,
            tls,
            slots: (0..settings.pool.max(1))
                .map(|_| Mutex::new(None))
                .collect(),
            next: AtomicUsize::new(0),
            handle: rt.handle().clone(),
            _driver: Driver(Some(rt)),
        };
        store.migrate()?;
        Ok(store)
    }

    /// Where the database is, as shown in errors and logs (no password).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Waits for `f` on this thread (off the async workers).
    fn block<T>(&self, f: impl Future<Output = T>) -> T {
        match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(|| futures::executor::block_on(f))
            }
            _ => futures::executor::block_on(f),
        }
    }

    fn connect(&self) -> Result<Client, StoreError> {
        let config = self.config.clone();
        let endpoint = self.endpoint.clone();
        let tls = self.tls.clone();
        let task = self.handle.spawn(async move {
            let client = match tls {
                Some(tls) => {
                    let (client, conn) = config.connect(tls).await?;
                    tokio::spawn(watch(conn, endpoint));
                    client
                }
                None => {
                    let (client, conn) = config.connect(NoTls).await?;
                    tokio::spawn(watch(conn, endpoint));
                    client
                }
            };
            // No broker stalls the others: a session left idle inside a
            // transaction (a frozen or paused broker holding the revocation
            // lock that every issuance shares) is ended by the server, and
            // no lock is waited for without end (a waiter for the exclusive
            // lock would queue every later shared one behind it). Set once
            // per session, not per transaction.
            client.batch_execute(SESSION_LIMITS).await?;
            // A revocation's working set: one per session, emptied per use.
            client
                .batch_execute(
                    "CREATE TEMP TABLE IF NOT EXISTS cover (
                        n BIGSERIAL PRIMARY KEY,
                        id TEXT NOT NULL UNIQUE,
                        kind TEXT NOT NULL,
                        expires_at BIGINT NOT NULL
                     )",
                )
                .await?;
            Ok::<_, StoreError>(client)
        });
        self.block(task)
            .map_err(|e| StoreError::Postgres(format!("the PostgreSQL driver stopped: {e}")))?
            .map_err(|e| match e {
                StoreError::Postgres(m) => StoreError::Postgres(format!(
                    "cannot connect to PostgreSQL at {}: {m}",
                    self.endpoint
                )),
                other => other,
            })
    }

    /// A pooled connection, opened if it is not (or no longer) open. Held
    /// by the caller for one [`on_conn!`] body.
    fn checkout(&self) -> Result<MutexGuard<'_, Option<PgConn>>, StoreError> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let mut guard = None;
        for i in 0..n {
            if let Ok(g) = self.slots[(start + i) % n].try_lock() {
                guard = Some(g);
                break;
            }
        }
        let mut guard = match guard {
            Some(g) => g,
            None => self.slots[start % n]
                .lock()
                .map_err(|_| StoreError::Poisoned)?,
        };
        if guard.as_ref().is_none_or(|c| c.client.is_closed()) {
            *guard = Some(PgConn {
                client: self.connect()?,
                statements: Statements::default(),
            });
        }
        Ok(guard)
    }

    /// Counts a failed datastore call in the store-error metric.
    fn counted<T>(r: Result<T, StoreError>) -> Result<T, StoreError> {
        if let Err(e) = &r
            && matches!(e, StoreError::Postgres(_) | StoreError::Corrupt { .. })
        {
            baton_ops::metrics().store_error("postgres_datastore");
        }
        r
    }

    fn migrate(&self) -> Result<(), StoreError> {
        on_conn!(self, |c| {
            // Another broker's migration may take longer than the session's
            // lock wait; a frozen one is ended by the server (its session is
            // idle inside a migration's transaction), which frees the lock.
            c.batch_execute("SET lock_timeout = '120s'").await?;
            c.execute(
                &c.stmt("SELECT pg_advisory_lock($1)").await?,
                &[&MIGRATION_LOCK],
            )
            .await?;
            c.batch_execute(SESSION_LIMITS).await?;
            let r = migrate_locked(c).await;
            let unlock = c
                .execute(
                    &c.stmt("SELECT pg_advisory_unlock($1)").await?,
                    &[&MIGRATION_LOCK],
                )
                .await;
            r?;
            unlock?;
            Ok(())
        })
    }
}

/// Drives a connection until it closes, saying why if it failed.
async fn watch<F: Future<Output = Result<(), tokio_postgres::Error>>>(conn: F, endpoint: String) {
    if let Err(e) = conn.await {
        tracing::warn!(error = %e, endpoint, "PostgreSQL connection closed");
    }
}

async fn migrate_locked(c: &mut Client) -> Result<(), StoreError> {
    c.batch_execute("CREATE TABLE IF NOT EXISTS baton_schema_version (version BIGINT NOT NULL)")
        .await?;
    let row = c
        .query_one(
            &c.stmt("SELECT MAX(version) FROM baton_schema_version")
                .await?,
            &[],
        )
        .await?;
    let current = row.try_get::<_, Option<i64>>(0)?.unwrap_or(0);
    let known = MIGRATIONS.len() as i64;
    if current > known {
        return Err(StoreError::SchemaTooNew {
            found: current,
            known,
        });
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        let tx = c.transaction().await?;
        tx.batch_execute(sql).await?;
        tx.execute(
            &tx.stmt("INSERT INTO baton_schema_version (version) VALUES ($1)")
                .await?,
            &[&(i as i64 + 1)],
        )
        .await?;
        tx.commit().await?;
        tracing::info!(version = i + 1, "PostgreSQL datastore migrated");
    }
    Ok(())
}

fn node_of(r: &Row) -> Result<NodeRecord, StoreError> {
    let id: String = r.try_get(0)?;
    Ok(NodeRecord {
        spiffe_id: SpiffeId::parse(&id).map_err(|e| corrupt("nodes", e))?,
        serial_hex: r.try_get(1)?,
        svid_not_after: u64_of(r.try_get(2)?),
        attested_at: u64_of(r.try_get(3)?),
        banned: r.try_get(4)?,
        prev_serial_hex: r.try_get(5)?,
    })
}

fn block_of(r: &Row) -> Result<AgentBlock, StoreError> {
    let id: String = r.try_get(0)?;
    Ok(AgentBlock {
        spiffe_id: SpiffeId::parse(&id).map_err(|e| corrupt("agent_blocks", e))?,
        until: r.try_get::<_, Option<i64>>(1)?.map(u64_of),
        reason: r.try_get(2)?,
        at: u64_of(r.try_get(3)?),
    })
}

fn entry_of(r: &Row) -> Result<Entry, StoreError> {
    entry_from_row((
        r.try_get(0)?,
        r.try_get(1)?,
        r.try_get(2)?,
        r.try_get(3)?,
        r.try_get(4)?,
        r.try_get(5)?,
        r.try_get(6)?,
    ))
}

fn revoked_of(r: &Row) -> Result<Revoked, StoreError> {
    let kind: String = r.try_get(1)?;
    Ok(Revoked {
        id: r.try_get(0)?,
        kind: CredKind::from_code(&kind).unwrap_or(CredKind::Token),
        expires_at: u64_of(r.try_get(2)?),
    })
}

const ENTRY_COLUMNS: &str =
    "id, spiffe_id, parent_id, selectors, x509_ttl_secs, jwt_ttl_secs, dns_names";

async fn token_state(
    c: &(impl GenericClient + Sync),
    digest_hex: &str,
    now: u64,
) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
    let Some(row) = c
        .query_opt(
            &c.stmt("SELECT node_id, expires_at, used_at FROM join_tokens WHERE digest = $1")
                .await?,
            &[&digest_hex],
        )
        .await?
    else {
        return Ok(Err(JoinTokenRefusal::Unknown));
    };
    if row.try_get::<_, Option<i64>>(2)?.is_some() {
        return Ok(Err(JoinTokenRefusal::AlreadyUsed));
    }
    if to_i64(now) >= row.try_get::<_, i64>(1)? {
        return Ok(Err(JoinTokenRefusal::Expired));
    }
    let node: String = row.try_get(0)?;
    Ok(Ok(
        SpiffeId::parse(&node).map_err(|e| corrupt("join_tokens", e))?
    ))
}

impl Datastore for PgStore {
    fn create_entry(&self, e: &Entry) -> Result<(), StoreError> {
        let selectors = selectors_text(&e.selectors);
        let dns = serde_json::to_string(&e.dns_names).map_err(|err| corrupt("entries", err))?;
        on_conn!(self, |c| {
            let inserted = c
                .query_opt(
                    &format!(
                        "INSERT INTO entries ({ENTRY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7)
                         ON CONFLICT (spiffe_id, parent_id, selectors) DO NOTHING RETURNING id"
                    ),
                    &[
                        &e.id.as_str(),
                        &e.spiffe_id.as_str(),
                        &e.parent_id.as_str(),
                        &selectors,
                        &to_i64(e.x509_ttl_secs),
                        &to_i64(e.jwt_ttl_secs),
                        &dns,
                    ],
                )
                .await?;
            if inserted.is_some() {
                return Ok(());
            }
            let row = c
                .query_one(&c.stmt("SELECT id FROM entries WHERE spiffe_id = $1 AND parent_id = $2 AND selectors = $3").await?,
                    &[&e.spiffe_id.as_str(), &e.parent_id.as_str(), &selectors],
                )
                .await?;
            let id: String = row.try_get(0)?;
            Err(StoreError::DuplicateEntry(
                EntryId::parse(&id).map_err(|err| corrupt("entries", err))?,
            ))
        })
    }

    fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>, StoreError> {
        on_conn!(self, |c| {
            let row = c
                .query_opt(
                    &format!("SELECT {ENTRY_COLUMNS} FROM entries WHERE id = $1"),
                    &[&id.as_str()],
                )
                .await?;
            row.as_ref().map(entry_of).transpose()
        })
    }

    fn list_entries(&self) -> Result<Vec<Entry>, StoreError> {
        on_conn!(self, |c| {
            c.query(
                &format!("SELECT {ENTRY_COLUMNS} FROM entries ORDER BY spiffe_id, id"),
                &[],
            )
            .await?
            .iter()
            .map(entry_of)
            .collect()
        })
    }

    fn list_entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError> {
        on_conn!(self, |c| {
            c.query(
                &format!(
                    "SELECT {ENTRY_COLUMNS} FROM entries WHERE parent_id = $1 ORDER BY spiffe_id, id"
                ),
                &[&parent.as_str()],
            )
            .await?
            .iter()
            .map(entry_of)
            .collect()
        })
    }

    fn delete_entry(&self, id: &EntryId) -> Result<bool, StoreError> {
        on_conn!(self, |c| {
            Ok(c.execute(
                &c.stmt("DELETE FROM entries WHERE id = $1").await?,
                &[&id.as_str()],
            )
            .await?
                > 0)
        })
    }

    fn insert_join_token(
        &self,
        digest_hex: &str,
        node_id: &SpiffeId,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        on_conn!(self, |c| {
            c.execute(
                &c.stmt(
                    "INSERT INTO join_tokens (digest, node_id, expires_at) VALUES ($1, $2, $3)",
                )
                .await?,
                &[&digest_hex, &node_id.as_str(), &to_i64(expires_at)],
            )
            .await?;
            Ok(())
        })
    }

    fn check_join_token(
        &self,
        digest_hex: &str,
        now: u64,
    ) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
        on_conn!(self, |c| token_state(c, digest_hex, now).await)
    }

    fn consume_join_token(
        &self,
        digest_hex: &str,
        now: u64,
    ) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
        on_conn!(self, |c| {
            // One statement: of two brokers racing, the second finds it used.
            let used = c
                .query_opt(
                    &c.stmt(
                        "UPDATE join_tokens SET used_at = $2
                     WHERE digest = $1 AND used_at IS NULL AND expires_at > $2
                     RETURNING node_id",
                    )
                    .await?,
                    &[&digest_hex, &to_i64(now)],
                )
                .await?;
            match used {
                Some(row) => {
                    let node: String = row.try_get(0)?;
                    Ok(Ok(
                        SpiffeId::parse(&node).map_err(|e| corrupt("join_tokens", e))?
                    ))
                }
                None => match token_state(c, digest_hex, now).await? {
                    // Not usable a moment ago but usable now cannot happen;
                    // refuse rather than guess.
                    Ok(_) => Ok(Err(JoinTokenRefusal::AlreadyUsed)),
                    Err(refusal) => Ok(Err(refusal)),
                },
            }
        })
    }

    fn upsert_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        on_conn!(self, |c| {
            c.execute(&c.stmt("INSERT INTO nodes (spiffe_id, serial, svid_not_after, attested_at, banned, prev_serial)
                 VALUES ($1, $2, $3, $4, $5, NULL)
                 ON CONFLICT (spiffe_id) DO UPDATE SET serial = excluded.serial,
                    svid_not_after = excluded.svid_not_after, attested_at = excluded.attested_at,
                    banned = nodes.banned OR excluded.banned, prev_serial = NULL").await?,
                &[
                    &n.spiffe_id.as_str(),
                    &n.serial_hex,
                    &to_i64(n.svid_not_after),
                    &to_i64(n.attested_at),
                    &n.banned,
                ],
            )
            .await?;
            Ok(())
        })
    }

    fn get_node(&self, id: &SpiffeId) -> Result<Option<NodeRecord>, StoreError> {
        on_conn!(self, |c| {
            let row = c
                .query_opt(
                    &c.stmt(
                        "SELECT spiffe_id, serial, svid_not_after, attested_at, banned, prev_serial
                     FROM nodes WHERE spiffe_id = $1",
                    )
                    .await?,
                    &[&id.as_str()],
                )
                .await?;
            row.as_ref().map(node_of).transpose()
        })
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        on_conn!(self, |c| {
            c.query(
                &c.stmt(
                    "SELECT spiffe_id, serial, svid_not_after, attested_at, banned, prev_serial
                 FROM nodes ORDER BY spiffe_id",
                )
                .await?,
                &[],
            )
            .await?
            .iter()
            .map(node_of)
            .collect()
        })
    }

    fn update_node_svid(
        &self,
        id: &SpiffeId,
        from_serial: &str,
        serial_hex: &str,
        svid_not_after: u64,
    ) -> Result<bool, StoreError> {
        on_conn!(self, |c| {
            Ok(c.execute(
                &c.stmt(
                    "UPDATE nodes SET
                    prev_serial = CASE WHEN serial = $4 THEN serial ELSE prev_serial END,
                    serial = $2, svid_not_after = $3
                 WHERE spiffe_id = $1 AND NOT banned AND (serial = $4 OR prev_serial = $4)",
                )
                .await?,
                &[
                    &id.as_str(),
                    &serial_hex,
                    &to_i64(svid_not_after),
                    &from_serial,
                ],
            )
            .await?
                == 1)
        })
    }

    fn settle_node_svid(&self, id: &SpiffeId, serial_hex: &str) -> Result<(), StoreError> {
        on_conn!(self, |c| {
            c.execute(
                &c.stmt(
                    "UPDATE nodes SET prev_serial = NULL
                 WHERE spiffe_id = $1 AND serial = $2 AND prev_serial IS NOT NULL",
                )
                .await?,
                &[&id.as_str(), &serial_hex],
            )
            .await?;
            Ok(())
        })
    }

    fn record_node_sync(
        &self,
        node: &SpiffeId,
        at: u64,
        applied: Option<u64>,
    ) -> Result<(), StoreError> {
        let applied = applied.map(to_i64);
        on_conn!(self, |c| {
            c.execute(
                &c.stmt(
                    "INSERT INTO node_syncs (node, synced_at, applied) VALUES ($1, $2, $3)
                 ON CONFLICT (node) DO UPDATE SET
                    synced_at = GREATEST(node_syncs.synced_at, excluded.synced_at),
                    applied = GREATEST(node_syncs.applied, excluded.applied)",
                )
                .await?,
                &[&node.as_str(), &to_i64(at), &applied],
            )
            .await?;
            Ok(())
        })
    }

    fn node_syncs(&self) -> Result<Vec<(SpiffeId, u64, Option<u64>)>, StoreError> {
        on_conn!(self, |c| {
            let mut out = Vec::new();
            for r in c
                .query(
                    &c.stmt("SELECT node, synced_at, applied FROM node_syncs")
                        .await?,
                    &[],
                )
                .await?
            {
                let node: String = r.try_get(0)?;
                let applied: Option<i64> = r.try_get(2)?;
                out.push((
                    SpiffeId::parse(&node).map_err(|e| corrupt("node_syncs", e))?,
                    u64_of(r.try_get(1)?),
                    applied.map(u64_of),
                ));
            }
            Ok(out)
        })
    }

    fn delete_node(&self, id: &SpiffeId) -> Result<bool, StoreError> {
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            // What it synced goes with it: a node attesting again under
            // this ID starts with no applied bundle.
            tx.execute(
                &tx.stmt("DELETE FROM node_syncs WHERE node = $1").await?,
                &[&id.as_str()],
            )
            .await?;
            tx.execute(&tx.stmt(VOID_JOIN_TOKENS_PG).await?, &[&id.as_str()])
                .await?;
            let n = tx
                .execute(
                    &tx.stmt("DELETE FROM nodes WHERE spiffe_id = $1").await?,
                    &[&id.as_str()],
                )
                .await?;
            tx.commit().await?;
            Ok(n == 1)
        })
    }

    fn set_node_banned(&self, id: &SpiffeId, banned: bool) -> Result<bool, StoreError> {
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            if banned {
                tx.execute(&tx.stmt(VOID_JOIN_TOKENS_PG).await?, &[&id.as_str()])
                    .await?;
            }
            let n = tx
                .execute(
                    &tx.stmt("UPDATE nodes SET banned = $2 WHERE spiffe_id = $1")
                        .await?,
                    &[&id.as_str(), &banned],
                )
                .await?;
            tx.commit().await?;
            Ok(n == 1)
        })
    }

    fn block_agent(&self, b: &AgentBlock) -> Result<(), StoreError> {
        on_conn!(self, |c| {
            c.execute(&c.stmt("INSERT INTO agent_blocks (spiffe_id, until, reason, at) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (spiffe_id) DO UPDATE SET until = excluded.until,
                    reason = excluded.reason, at = excluded.at").await?,
                &[
                    &b.spiffe_id.as_str(),
                    &b.until.map(to_i64),
                    &b.reason,
                    &to_i64(b.at),
                ],
            )
            .await?;
            Ok(())
        })
    }

    fn unblock_agent(&self, id: &SpiffeId) -> Result<bool, StoreError> {
        on_conn!(self, |c| {
            Ok(c.execute(
                &c.stmt("DELETE FROM agent_blocks WHERE spiffe_id = $1")
                    .await?,
                &[&id.as_str()],
            )
            .await?
                == 1)
        })
    }

    fn agent_block(&self, id: &SpiffeId, now: u64) -> Result<Option<AgentBlock>, StoreError> {
        Ok(self.blocks_where(Some(id), now)?.into_iter().next())
    }

    fn agent_blocks(&self, now: u64) -> Result<Vec<AgentBlock>, StoreError> {
        self.blocks_where(None, now)
    }
}

impl PgStore {
    fn blocks_where(&self, id: Option<&SpiffeId>, now: u64) -> Result<Vec<AgentBlock>, StoreError> {
        on_conn!(self, |c| {
            c.query(
                &c.stmt(
                    "SELECT spiffe_id, until, reason, at FROM agent_blocks
                 WHERE ($1::TEXT IS NULL OR spiffe_id = $1) AND (until IS NULL OR until > $2)
                 ORDER BY spiffe_id",
                )
                .await?,
                &[&id.map(SpiffeId::as_str), &to_i64(now)],
            )
            .await?
            .iter()
            .map(block_of)
            .collect()
        })
    }

    fn one_record<T: for<'de> serde::Deserialize<'de>>(
        &self,
        table: &'static str,
        sql: &str,
        key: &str,
    ) -> Result<Option<T>, StoreError> {
        let row: Option<String> = on_conn!(self, |c| {
            Ok(match c.query_opt(sql, &[&key]).await? {
                Some(r) => Some(r.try_get(0)?),
                None => None,
            })
        })?;
        row.map(|s| dec(table, &s)).transpose()
    }

    fn records<T: for<'de> serde::Deserialize<'de>>(
        &self,
        table: &'static str,
        sql: &str,
        key: Option<&str>,
    ) -> Result<Vec<T>, StoreError> {
        let rows: Vec<String> = on_conn!(self, |c| {
            let rows = match key {
                Some(k) => c.query(sql, &[&k]).await?,
                None => c.query(sql, &[]).await?,
            };
            rows.iter()
                .map(|r| r.try_get(0).map_err(StoreError::from))
                .collect()
        })?;
        rows.iter().map(|s| dec(table, s)).collect()
    }
}

/// [`crate::ledger::register_tx`] in a PostgreSQL transaction (which holds
/// the shared revocation lock).
async fn register_in(
    tx: &tokio_postgres::Transaction<'_>,
    records: &[CredentialRecord],
    now: u64,
) -> Result<Result<(), String>, StoreError> {
    let now_i = to_i64(now);
    for r in records {
        if r.expires_at <= now {
            return Ok(Err(format!(
                "credential {} would already be expired (at {}, now {now})",
                r.id, r.expires_at
            )));
        }
        let row = tx
            .query_one(
                &tx.stmt(
                    "SELECT EXISTS (SELECT 1 FROM revocations WHERE id = $1 AND expires_at > $2)",
                )
                .await?,
                &[&r.id, &now_i],
            )
            .await?;
        if row.try_get::<_, bool>(0)? {
            return Ok(Err(format!("credential {} is already revoked", r.id)));
        }
        if let Some(p) = &r.parent {
            let row = tx
                .query_one(&tx.stmt("SELECT EXISTS (SELECT 1 FROM revocations WHERE id = $1 AND expires_at > $2)
                        OR EXISTS (SELECT 1 FROM credentials c JOIN revoked_tasks t ON t.task = c.task
                                   WHERE c.id = $1 AND c.expires_at > $2)").await?,
                    &[p, &now_i],
                )
                .await?;
            if row.try_get::<_, bool>(0)? {
                return Ok(Err(format!(
                    "credential {} was minted from {p}, which is revoked",
                    r.id
                )));
            }
        }
        if let Some(t) = &r.task {
            let row = tx
                .query_one(
                    &tx.stmt("SELECT EXISTS (SELECT 1 FROM revoked_tasks WHERE task = $1)")
                        .await?,
                    &[&t.as_str()],
                )
                .await?;
            if row.try_get::<_, bool>(0)? {
                return Ok(Err(format!(
                    "credential {} belongs to task {}, whose credentials were revoked",
                    r.id,
                    t.as_str()
                )));
            }
        }
    }
    for r in records {
        tx.execute(
            &tx.stmt(
                "INSERT INTO credentials (id, kind, task, agent, node, parent, expires_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (id) DO UPDATE
                SET expires_at = GREATEST(credentials.expires_at, excluded.expires_at)",
            )
            .await?,
            &[
                &r.id,
                &r.kind.code(),
                &r.task.as_ref().map(TaskId::as_str),
                &r.agent.as_ref().map(SpiffeId::as_str),
                &r.node.as_ref().map(SpiffeId::as_str),
                &r.parent,
                &to_i64(r.expires_at),
            ],
        )
        .await?;
    }
    Ok(Ok(()))
}

/// The limits of every session of a broker: see [`PgStore::connect`].
pub(crate) const SESSION_LIMITS: &str = "SET idle_in_transaction_session_timeout = '30s'; \
                              SET lock_timeout = '10s'";

async fn lock_shared(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        &tx.stmt("SELECT pg_advisory_xact_lock_shared($1)").await?,
        &[&REVOCATION_LOCK],
    )
    .await?;
    Ok(())
}

async fn lock_exclusive(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.execute(
        &tx.stmt("SELECT pg_advisory_xact_lock($1)").await?,
        &[&REVOCATION_LOCK],
    )
    .await?;
    Ok(())
}

async fn cover_reset(tx: &tokio_postgres::Transaction<'_>) -> Result<(), StoreError> {
    tx.batch_execute("DELETE FROM cover").await?;
    Ok(())
}

async fn cover_add(
    tx: &tokio_postgres::Transaction<'_>,
    rows: &[Revoked],
) -> Result<(), StoreError> {
    if rows.is_empty() {
        return Ok(());
    }
    let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
    let kinds: Vec<&str> = rows.iter().map(|r| r.kind.code()).collect();
    let exps: Vec<i64> = rows.iter().map(|r| to_i64(r.expires_at)).collect();
    tx.execute(
        &tx.stmt(
            "INSERT INTO cover (id, kind, expires_at)
         SELECT id, kind, exp FROM UNNEST($1::TEXT[], $2::TEXT[], $3::BIGINT[])
            WITH ORDINALITY AS u(id, kind, exp, ord)
         ORDER BY ord
         ON CONFLICT (id) DO NOTHING",
        )
        .await?,
        &[&ids, &kinds, &exps],
    )
    .await?;
    Ok(())
}

async fn cover_resolve(
    tx: &tokio_postgres::Transaction<'_>,
    target: &Target,
    now: u64,
) -> Result<(), StoreError> {
    let (column, value) = match target {
        Target::Credential(id) | Target::Subtree(id) => ("id", id.clone()),
        Target::Task(t) => return cover_resolve_task(tx, t.as_str(), now).await,
        Target::Agent(a) => ("agent", a.as_str().to_owned()),
        Target::Node(n) => ("node", n.as_str().to_owned()),
    };
    // `column` is one of the fixed names above, never input.
    let sql = format!(
        "WITH RECURSIVE sub(id) AS (
            SELECT id FROM credentials WHERE {column} = $1
            UNION
            SELECT c.id FROM credentials c JOIN sub s ON c.parent = s.id
         )
         INSERT INTO cover (id, kind, expires_at)
         SELECT c.id, c.kind, c.expires_at FROM credentials c JOIN sub s ON c.id = s.id
         WHERE c.expires_at > $2 ORDER BY c.n
         ON CONFLICT (id) DO NOTHING"
    );
    tx.execute(&sql, &[&value, &to_i64(now)]).await?;
    Ok(())
}

async fn cover_resolve_task(
    tx: &tokio_postgres::Transaction<'_>,
    task: &str,
    now: u64,
) -> Result<(), StoreError> {
    tx.execute(
        &tx.stmt(
            "INSERT INTO cover (id, kind, expires_at)
         SELECT id, kind, expires_at FROM credentials WHERE task = $1 AND expires_at > $2
         ORDER BY n ON CONFLICT (id) DO NOTHING",
        )
        .await?,
        &[&task, &to_i64(now)],
    )
    .await?;
    tx.execute(
        &tx.stmt(
            "WITH RECURSIVE sub(id) AS (
            SELECT c.id FROM credentials c JOIN cover v ON c.parent = v.id
            WHERE c.task IS DISTINCT FROM $1
            UNION
            SELECT c.id FROM credentials c JOIN sub s ON c.parent = s.id
         )
         INSERT INTO cover (id, kind, expires_at)
         SELECT c.id, c.kind, c.expires_at FROM credentials c JOIN sub s ON c.id = s.id
         WHERE c.expires_at > $2 ORDER BY c.n
         ON CONFLICT (id) DO NOTHING",
        )
        .await?,
        &[&task, &to_i64(now)],
    )
    .await?;
    Ok(())
}

/// [`crate::ledger`]'s task cover: the task's one deny entry (expiring
/// with its last live credential), `known`, and what was minted from the
/// task's credentials in other tasks.
async fn cover_mark_task(
    tx: &tokio_postgres::Transaction<'_>,
    task: &TaskId,
    known: &[Revoked],
    now: u64,
) -> Result<(), StoreError> {
    let now_i = to_i64(now);
    let registered: Option<i64> = tx
        .query_one(
            &tx.stmt("SELECT MAX(expires_at) FROM credentials WHERE task = $1 AND expires_at > $2")
                .await?,
            &[&task.as_str(), &now_i],
        )
        .await?
        .try_get(0)?;
    let last = known
        .iter()
        .map(|r| to_i64(r.expires_at))
        .chain(registered)
        .max();
    let Some(last) = last.filter(|e| *e > now_i) else {
        return Ok(());
    };
    cover_add(
        tx,
        &[Revoked {
            id: task.as_str().to_owned(),
            kind: CredKind::Task,
            expires_at: u64_of(last),
        }],
    )
    .await?;
    cover_add(tx, known).await?;
    tx.execute(
        &tx.stmt(
            "WITH RECURSIVE sub(id) AS (
            SELECT c.id FROM credentials p JOIN credentials c ON c.parent = p.id
            WHERE p.task = $1 AND c.task IS DISTINCT FROM $1
            UNION
            SELECT c.id FROM credentials c JOIN sub s ON c.parent = s.id
         )
         INSERT INTO cover (id, kind, expires_at)
         SELECT c.id, c.kind, c.expires_at FROM credentials c JOIN sub s ON c.id = s.id
         WHERE c.expires_at > $2 ORDER BY c.n
         ON CONFLICT (id) DO NOTHING",
        )
        .await?,
        &[&task.as_str(), &now_i],
    )
    .await?;
    Ok(())
}

async fn cover_mark(
    tx: &tokio_postgres::Transaction<'_>,
    reason: &str,
    now: u64,
) -> Result<usize, StoreError> {
    let now_i = to_i64(now);
    let new = tx
        .execute(
            &tx.stmt(
                // Numbered past every row and every number the log ever
                // gave out (the exclusive revocation lock is held): the
                // relay, the feed and the propagation check read `seq >
                // mark`, so a row numbered ahead of the sequence (written
                // by hand, or restored without the sequence) must not
                // leave later revocations behind it.
                "INSERT INTO revocation_log (seq, id, expires_at, kind, reason)
             SELECT GREATEST(
                      (SELECT COALESCE(MAX(seq), 0) FROM revocation_log),
                      (SELECT CASE WHEN is_called THEN last_value ELSE 0 END
                         FROM revocation_log_seq_seq)
                    ) + ROW_NUMBER() OVER (ORDER BY c.n),
                    c.id, c.expires_at, c.kind, $1 FROM cover c
             WHERE c.expires_at > $2
               AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.id = c.id)
             ORDER BY c.n",
            )
            .await?,
            &[&reason, &now_i],
        )
        .await?;
    if new > 0 {
        // The sequence follows, so that a log pruned empty goes on from
        // the highest number given out.
        tx.execute(
            &tx.stmt(
                "SELECT setval('revocation_log_seq_seq', MAX(seq)) FROM revocation_log
                 HAVING MAX(seq) IS NOT NULL",
            )
            .await?,
            &[],
        )
        .await?;
    }
    tx.execute(
        &tx.stmt(
            "INSERT INTO revocations (id, kind, expires_at, reason, at)
         SELECT id, kind, expires_at, $1, $2 FROM cover WHERE expires_at > $2
         ON CONFLICT (id) DO NOTHING",
        )
        .await?,
        &[&reason, &now_i],
    )
    .await?;
    Ok(usize::try_from(new).unwrap_or(usize::MAX))
}

async fn cover_list(tx: &tokio_postgres::Transaction<'_>) -> Result<Vec<Revoked>, StoreError> {
    tx.query(
        &tx.stmt("SELECT id, kind, expires_at FROM cover ORDER BY n")
            .await?,
        &[],
    )
    .await?
    .iter()
    .map(revoked_of)
    .collect()
}

async fn mark_in(
    tx: &tokio_postgres::Transaction<'_>,
    revoked: &[Revoked],
    reason: &str,
    now: u64,
) -> Result<usize, StoreError> {
    lock_exclusive(tx).await?;
    cover_reset(tx).await?;
    cover_add(tx, revoked).await?;
    cover_mark(tx, reason, now).await
}

async fn last_seq(c: &(impl GenericClient + Sync)) -> Result<u64, StoreError> {
    let last: Option<i64> = c
        .query_one(&c.stmt("SELECT MAX(seq) FROM revocation_log").await?, &[])
        .await?
        .try_get(0)?;
    Ok(last.map_or(0, u64_of))
}

impl Ledger for PgStore {
    fn identity(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    fn ping(&self) -> Result<(), StoreError> {
        on_conn!(self, |c| {
            let row = c
                .query_one(
                    &c.stmt(
                        "SELECT MAX(version), current_setting('transaction_read_only')
                     FROM baton_schema_version",
                    )
                    .await?,
                    &[],
                )
                .await?;
            let read_only: String = row.try_get(1)?;
            if read_only == "on" {
                return Err(StoreError::Postgres(
                    "the PostgreSQL server takes no writes (a standby, or read-only)".into(),
                ));
            }
            Ok(())
        })
    }

    fn epoch(&self) -> Result<String, StoreError> {
        on_conn!(self, |c| {
            Ok(
                c.query_one(&c.stmt("SELECT epoch FROM feed_meta LIMIT 1").await?, &[])
                    .await?
                    .try_get(0)?,
            )
        })
    }

    fn restart_log(&self, from: &str, to: &str) -> Result<String, StoreError> {
        on_conn!(self, |c| {
            c.execute(
                &c.stmt("UPDATE feed_meta SET epoch = $2 WHERE epoch = $1")
                    .await?,
                &[&from, &to],
            )
            .await?;
            // A statement of its own: under READ COMMITTED it sees another
            // broker's rename that won the race, which the UPDATE's own
            // snapshot would not.
            Ok(
                c.query_one(&c.stmt("SELECT epoch FROM feed_meta LIMIT 1").await?, &[])
                    .await?
                    .try_get(0)?,
            )
        })
    }

    fn last_seq(&self) -> Result<u64, StoreError> {
        on_conn!(self, |c| last_seq(c).await)
    }

    fn log_after(
        &self,
        after: u64,
        live_at: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<LogRow>, u64), StoreError> {
        on_conn!(self, |c| {
            // One snapshot for the page and the end.
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let last = last_seq(&tx).await?;
            let rows = tx
                .query(
                    &tx.stmt(
                        "SELECT seq, id, kind, expires_at, reason FROM revocation_log
                     WHERE seq > $1 AND ($2::BIGINT IS NULL OR expires_at > $2)
                     ORDER BY seq LIMIT $3",
                    )
                    .await?,
                    &[&to_i64(after), &live_at.map(to_i64), &limit_of(limit)],
                )
                .await?;
            let mut out = Vec::with_capacity(rows.len());
            for r in &rows {
                let kind: String = r.try_get(2)?;
                out.push(LogRow {
                    seq: u64_of(r.try_get(0)?),
                    entry: Revoked {
                        id: r.try_get(1)?,
                        kind: CredKind::from_code(&kind).unwrap_or(CredKind::Token),
                        expires_at: u64_of(r.try_get(3)?),
                    },
                    reason: r.try_get(4)?,
                });
            }
            tx.commit().await?;
            Ok((out, last))
        })
    }

    fn register(
        &self,
        records: &[CredentialRecord],
        now: u64,
    ) -> Result<Result<(), String>, StoreError> {
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            lock_shared(&tx).await?;
            let r = register_in(&tx, records, now).await?;
            if r.is_ok() {
                tx.commit().await?;
            }
            Ok(r)
        })
    }

    fn revoke(
        &self,
        target: &Target,
        known: &[Revoked],
        reason: &str,
        now: u64,
    ) -> Result<Vec<Revoked>, StoreError> {
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            lock_exclusive(&tx).await?;
            cover_reset(&tx).await?;
            if let Target::Task(task) = target {
                cover_mark_task(&tx, task, known, now).await?;
                tx.execute(&tx.stmt("INSERT INTO revoked_tasks (task, at) VALUES ($1, $2) ON CONFLICT (task) DO NOTHING").await?,
                    &[&task.as_str(), &to_i64(now)],
                )
                .await?;
            } else {
                cover_resolve(&tx, target, now).await?;
            }
            cover_mark(&tx, reason, now).await?;
            let mut all = cover_list(&tx).await?;
            all.retain(|r| r.kind != CredKind::Task);
            if all.is_empty()
                && let Target::Credential(id) | Target::Subtree(id) = target
            {
                // Already revoked and gone from nowhere: idempotent.
                let row = tx
                    .query_opt(&tx.stmt("SELECT id, kind, expires_at FROM revocations WHERE id = $1 AND expires_at > $2").await?,
                        &[id, &to_i64(now)],
                    )
                    .await?;
                if let Some(r) = row {
                    all.push(revoked_of(&r)?);
                }
            }
            tx.commit().await?;
            Ok(all)
        })
    }

    fn live_task_credentials(&self, task: &TaskId, now: u64) -> Result<Vec<Revoked>, StoreError> {
        on_conn!(self, |c| {
            c.query(
                &c.stmt(
                    "SELECT id, kind, expires_at FROM credentials
                 WHERE task = $1 AND expires_at > $2 ORDER BY n",
                )
                .await?,
                &[&task.as_str(), &to_i64(now)],
            )
            .await?
            .iter()
            .map(revoked_of)
            .collect()
        })
    }

    fn certificate_leases(
        &self,
        serial: &str,
        now: u64,
    ) -> Result<Option<(String, Vec<Revoked>)>, StoreError> {
        on_conn!(self, |c| {
            let parent = c
                .query_opt(
                    &c.stmt(
                        "SELECT parent FROM credentials
                         WHERE id = $1 AND kind = 'x509' AND task IS NOT NULL AND parent IS NOT NULL",
                    )
                    .await?,
                    &[&serial],
                )
                .await?;
            let Some(row) = parent else { return Ok(None) };
            let jti: String = row.try_get(0)?;
            let leases = c
                .query(
                    &c.stmt(
                        "SELECT id, kind, expires_at FROM credentials
                         WHERE parent = $1 AND kind = 'lease' AND expires_at > $2 ORDER BY n",
                    )
                    .await?,
                    &[&jti, &to_i64(now)],
                )
                .await?
                .iter()
                .map(revoked_of)
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Some((jti, leases)))
        })
    }

    fn revoke_tokens(
        &self,
        tokens: &[TokenRecord],
        reason: &str,
        now: u64,
    ) -> Result<Vec<Revoked>, StoreError> {
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            lock_exclusive(&tx).await?;
            cover_reset(&tx).await?;
            for t in tokens {
                cover_resolve(&tx, &Target::Credential(t.jti.clone()), now).await?;
                cover_add(&tx, &token_pair(t)).await?;
            }
            cover_mark(&tx, reason, now).await?;
            let all = cover_list(&tx).await?;
            tx.commit().await?;
            Ok(all)
        })
    }

    fn mark(&self, revoked: &[Revoked], reason: &str, now: u64) -> Result<usize, StoreError> {
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            let n = mark_in(&tx, revoked, reason, now).await?;
            tx.commit().await?;
            Ok(n)
        })
    }

    fn prune(&self, cutoff: u64) -> Result<(), StoreError> {
        let cutoff = to_i64(cutoff);
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            tx.execute(
                &tx.stmt("DELETE FROM credentials WHERE expires_at <= $1")
                    .await?,
                &[&cutoff],
            )
            .await?;
            tx.execute(
                &tx.stmt("DELETE FROM revocations WHERE expires_at <= $1")
                    .await?,
                &[&cutoff],
            )
            .await?;
            // The newest row stays, expired or not: the log's end must
            // never move back but by a restore or a lossy failover, which
            // is how the relay and the feed tell one (`Revoker`).
            tx.execute(
                &tx.stmt(
                    "DELETE FROM revocation_log WHERE expires_at <= $1
                     AND seq < (SELECT MAX(seq) FROM revocation_log)",
                )
                .await?,
                &[&cutoff],
            )
            .await?;
            tx.commit().await?;
            Ok(())
        })
    }

    fn durably_revoked(&self, id: &str, now: u64) -> Result<bool, StoreError> {
        on_conn!(self, |c| {
            Ok(c.query_one(
                &c.stmt(
                    "SELECT EXISTS (SELECT 1 FROM revocations WHERE id = $1 AND expires_at > $2)
                    OR EXISTS (SELECT 1 FROM credentials c JOIN revoked_tasks t ON t.task = c.task
                               WHERE c.id = $1 AND c.expires_at > $2)",
                )
                .await?,
                &[&id, &to_i64(now)],
            )
            .await?
            .try_get(0)?)
        })
    }

    fn task_credentials(&self, task: &TaskId) -> Result<Vec<TaskCredential>, StoreError> {
        on_conn!(self, |c| {
            let rows = c
                .query(
                    &c.stmt(
                        "SELECT c.id, c.kind, c.agent, c.node, c.parent, c.expires_at,
                            r.id IS NOT NULL OR t.task IS NOT NULL
                     FROM credentials c LEFT JOIN revocations r ON r.id = c.id
                     LEFT JOIN revoked_tasks t ON t.task = c.task
                     WHERE c.task = $1 ORDER BY c.n",
                    )
                    .await?,
                    &[&task.as_str()],
                )
                .await?;
            rows.iter()
                .map(|r| {
                    Ok(TaskCredential {
                        id: r.try_get(0)?,
                        kind: r.try_get(1)?,
                        agent: r.try_get(2)?,
                        node: r.try_get(3)?,
                        parent: r.try_get(4)?,
                        expires_at: u64_of(r.try_get(5)?),
                        revoked: r.try_get(6)?,
                    })
                })
                .collect()
        })
    }

    fn live_revocations(&self, now: u64) -> Result<Vec<Revoked>, StoreError> {
        on_conn!(self, |c| {
            c.query(
                &c.stmt("SELECT id, kind, expires_at FROM revocations WHERE expires_at > $1")
                    .await?,
                &[&to_i64(now)],
            )
            .await?
            .iter()
            .map(revoked_of)
            .collect()
        })
    }
}

impl TaskStore for PgStore {
    fn registry_identity(&self) -> Option<usize> {
        Some(Ledger::identity(self))
    }

    fn insert_task(&self, t: &TaskRecord) -> Result<(), StoreError> {
        let record = enc("tasks", t)?;
        on_conn!(self, |c| {
            c.execute(
                &c.stmt("INSERT INTO tasks (id, record, created_at) VALUES ($1, $2, $3)")
                    .await?,
                &[&t.id.as_str(), &record, &to_i64(t.created_at)],
            )
            .await?;
            Ok(())
        })
    }

    fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        self.one_record(
            "tasks",
            "SELECT record FROM tasks WHERE id = $1",
            id.as_str(),
        )
    }

    fn list_tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        self.records(
            "tasks",
            "SELECT record FROM tasks ORDER BY created_at, id",
            None,
        )
    }

    fn replace_task(&self, t: &TaskRecord, was_epoch: u32) -> Result<bool, StoreError> {
        let record = enc("tasks", t)?;
        let was = i64::from(was_epoch);
        on_conn!(self, |c| {
            let n = c
                .execute(
                    &c.stmt(
                        "UPDATE tasks SET record = $2
                         WHERE id = $1
                           AND (record::jsonb ->> 'ended_at') IS NULL
                           AND COALESCE((record::jsonb ->> 'purpose_epoch')::bigint, 0) = $3",
                    )
                    .await?,
                    &[&t.id.as_str(), &record, &was],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn insert_grant(
        &self,
        digest: &str,
        g: &GrantRecord,
        cred: &CredentialRecord,
        now: u64,
    ) -> Result<Result<(), String>, StoreError> {
        let record = enc("grants", g)?;
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            lock_shared(&tx).await?;
            if let Err(why) = register_in(&tx, std::slice::from_ref(cred), now).await? {
                return Ok(Err(why));
            }
            tx.execute(&tx.stmt("INSERT INTO grants (digest, task_id, record, expires_at) VALUES ($1, $2, $3, $4)").await?,
                &[&digest, &g.task_id.as_str(), &record, &to_i64(g.expires_at)],
            )
            .await?;
            tx.commit().await?;
            Ok(Ok(()))
        })
    }

    fn get_grant(&self, digest: &str) -> Result<Option<(GrantRecord, Option<u64>)>, StoreError> {
        let row: Option<(String, Option<i64>)> = on_conn!(self, |c| {
            Ok(
                match c
                    .query_opt(
                        &c.stmt("SELECT record, used_at FROM grants WHERE digest = $1")
                            .await?,
                        &[&digest],
                    )
                    .await?
                {
                    Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
                    None => None,
                },
            )
        })?;
        row.map(|(s, used)| Ok((dec("grants", &s)?, used.map(u64_of))))
            .transpose()
    }

    fn mark_redelivered(&self, digest: &str, jti: &str, now: u64) -> Result<bool, StoreError> {
        on_conn!(self, |c| {
            Ok(c.execute(
                &c.stmt(
                    "UPDATE grants SET redelivered_at = $3
                 WHERE digest = $1 AND used_at IS NOT NULL
                   AND (delivery::jsonb) ->> 'jti' = $2",
                )
                .await?,
                &[&digest, &jti, &to_i64(now)],
            )
            .await?
                == 1)
        })
    }

    fn grant_delivery(&self, digest: &str) -> Result<Option<GrantDelivery>, StoreError> {
        let row: Option<Option<String>> = on_conn!(self, |c| {
            Ok(
                match c
                    .query_opt(
                        &c.stmt(
                            "SELECT delivery FROM grants WHERE digest = $1 AND used_at IS NOT NULL",
                        )
                        .await?,
                        &[&digest],
                    )
                    .await?
                {
                    Some(r) => Some(r.try_get(0)?),
                    None => None,
                },
            )
        })?;
        row.flatten().map(|d| dec("grants", &d)).transpose()
    }

    fn consume_grant(
        &self,
        digest: &str,
        now: u64,
    ) -> Result<Result<GrantRecord, GrantRefusal>, StoreError> {
        let row: Result<String, GrantRefusal> = on_conn!(self, |c| {
            let used = c
                .query_opt(
                    &c.stmt(
                        "UPDATE grants SET used_at = $2
                     WHERE digest = $1 AND used_at IS NULL AND expires_at > $2
                     RETURNING record",
                    )
                    .await?,
                    &[&digest, &to_i64(now)],
                )
                .await?;
            if let Some(r) = used {
                return Ok(Ok(r.try_get(0)?));
            }
            let state = c
                .query_opt(
                    &c.stmt("SELECT used_at FROM grants WHERE digest = $1")
                        .await?,
                    &[&digest],
                )
                .await?;
            Ok(Err(match state {
                None => GrantRefusal::Unknown,
                Some(r) if r.try_get::<_, Option<i64>>(0)?.is_some() => GrantRefusal::Used,
                Some(_) => GrantRefusal::Expired,
            }))
        })?;
        match row {
            Ok(record) => Ok(Ok(dec("grants", &record)?)),
            Err(refusal) => Ok(Err(refusal)),
        }
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let record = enc("tokens", t)?;
        on_conn!(self, |c| {
            c.execute(
                &c.stmt("INSERT INTO tokens (jti, task_id, record) VALUES ($1, $2, $3)")
                    .await?,
                &[&t.jti, &t.task_id.as_str(), &record],
            )
            .await?;
            Ok(())
        })
    }

    fn redeem_grant(
        &self,
        digest: &str,
        now: u64,
        token: &TokenRecord,
        creds: &[CredentialRecord],
        delivery: &GrantDelivery,
    ) -> Result<Result<(), RedeemRefusal>, StoreError> {
        let record = enc("tokens", token)?;
        let delivery = enc("grants", delivery)?;
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            lock_shared(&tx).await?;
            // The row lock: a racing redeem of the same grant waits here
            // and then finds it used.
            let row = tx
                .query_opt(&tx.stmt("SELECT expires_at, used_at, record FROM grants WHERE digest = $1 FOR UPDATE").await?,
                    &[&digest],
                )
                .await?;
            let (refusal, grant) = match row {
                None => (Some(GrantRefusal::Unknown), None),
                Some(r) => {
                    let exp: i64 = r.try_get(0)?;
                    let used: Option<i64> = r.try_get(1)?;
                    if used.is_some() {
                        (Some(GrantRefusal::Used), None)
                    } else if to_i64(now) >= exp {
                        (Some(GrantRefusal::Expired), None)
                    } else {
                        (None, Some(r.try_get::<_, String>(2)?))
                    }
                }
            };
            if let Some(r) = refusal {
                return Ok(Err(RedeemRefusal::Grant(r)));
            }
            // What the redeem decided outside this transaction, again
            // inside it. The task's row is locked for share: a purpose
            // change (an update of that row) waits for this redeem, and
            // then finds its token when it revokes the task's tokens.
            let grant: GrantRecord = dec("grants", grant.as_deref().unwrap_or_default())?;
            let revoked: bool = tx
                .query_one(&tx.stmt("SELECT EXISTS (SELECT 1 FROM revocations WHERE id = $1 AND expires_at > $2)").await?,
                    &[&digest, &to_i64(now)],
                )
                .await?
                .try_get(0)?;
            if revoked {
                return Ok(Err(RedeemRefusal::Revoked("the grant was revoked".into())));
            }
            let task = match tx
                .query_opt(
                    &tx.stmt("SELECT record FROM tasks WHERE id = $1 FOR SHARE")
                        .await?,
                    &[&grant.task_id.as_str()],
                )
                .await?
            {
                Some(r) => Some(dec::<TaskRecord>("tasks", &r.try_get::<_, String>(0)?)?),
                None => None,
            };
            if let Some(r) = crate::tasks::task_refusal(&grant, task.as_ref(), now) {
                return Ok(Err(r));
            }
            if let Err(why) = register_in(&tx, creds, now).await? {
                return Ok(Err(RedeemRefusal::Revoked(why)));
            }
            tx.execute(
                &tx.stmt("UPDATE grants SET used_at = $2, delivery = $3 WHERE digest = $1")
                    .await?,
                &[&digest, &to_i64(now), &delivery],
            )
            .await?;
            tx.execute(
                &tx.stmt("INSERT INTO tokens (jti, task_id, record) VALUES ($1, $2, $3)")
                    .await?,
                &[&token.jti, &token.task_id.as_str(), &record],
            )
            .await?;
            tx.commit().await?;
            Ok(Ok(()))
        })
    }

    fn release_grant(
        &self,
        digest: &str,
        creds: &[CredentialRecord],
        now: u64,
    ) -> Result<(), StoreError> {
        let dead: Vec<Revoked> = creds
            .iter()
            .map(|r| Revoked {
                id: r.id.clone(),
                kind: r.kind,
                expires_at: r.expires_at,
            })
            .collect();
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            // The revocation lock before the grant's row, as a redeem takes
            // them (shared, then the row): the other order deadlocks with a
            // redeem of the same grant at another broker.
            lock_exclusive(&tx).await?;
            // Not once another broker delivered it again (with its own
            // audit record): the row lock orders this against that mark.
            let released = tx
                .execute(
                    &tx.stmt(
                        "UPDATE grants SET used_at = NULL, delivery = NULL
                     WHERE digest = $1 AND redelivered_at IS NULL",
                    )
                    .await?,
                    &[&digest],
                )
                .await?;
            if released == 1 {
                mark_in(&tx, &dead, "not delivered: audit log unavailable", now).await?;
            }
            tx.commit().await?;
            Ok(())
        })
    }

    fn rebind_token(&self, t: &TokenRecord, from_serial: &str) -> Result<bool, StoreError> {
        let record = enc("tokens", t)?;
        let from = from_serial.to_owned();
        on_conn!(self, |c| {
            let n = c
                .execute(
                    &c.stmt(
                        "UPDATE tokens SET record = $2
                         WHERE jti = $1 AND (record::jsonb ->> 'cert_serial') = $3",
                    )
                    .await?,
                    &[&t.jti, &record, &from],
                )
                .await?;
            Ok(n == 1)
        })
    }

    fn tokens_for_task(&self, task: &TaskId) -> Result<Vec<TokenRecord>, StoreError> {
        self.records(
            "tokens",
            "SELECT record FROM tokens WHERE task_id = $1 ORDER BY n",
            Some(task.as_str()),
        )
    }

    fn get_token(&self, jti: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.one_record("tokens", "SELECT record FROM tokens WHERE jti = $1", jti)
    }

    fn use_id_token(&self, key: &str, expires_at: u64, now: u64) -> Result<bool, StoreError> {
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            tx.execute(
                &tx.stmt("DELETE FROM used_id_tokens WHERE expires_at <= $1")
                    .await?,
                &[&to_i64(now)],
            )
            .await?;
            let n = tx
                .execute(
                    &tx.stmt(
                        "INSERT INTO used_id_tokens (digest, expires_at) VALUES ($1, $2)
                     ON CONFLICT (digest) DO NOTHING",
                    )
                    .await?,
                    &[&key, &to_i64(expires_at)],
                )
                .await?;
            tx.commit().await?;
            Ok(n == 1)
        })
    }

    fn report_seen(&self, report_id: &str) -> Result<Option<u64>, StoreError> {
        on_conn!(self, |c| {
            Ok(
                match c
                    .query_opt(
                        &c.stmt("SELECT audit_index FROM tool_reports WHERE report_id = $1")
                            .await?,
                        &[&report_id],
                    )
                    .await?
                {
                    Some(r) => Some(u64_of(r.try_get(0)?)),
                    None => None,
                },
            )
        })
    }

    fn record_report(&self, report_id: &str, index: u64) -> Result<(), StoreError> {
        self.record_reports(&[(report_id, index)])
    }

    fn reports_seen(&self, report_ids: &[&str]) -> Result<BTreeMap<String, u64>, StoreError> {
        on_conn!(self, |c| {
            let rows = c
                .query(
                    &c.stmt(
                        "SELECT report_id, audit_index FROM tool_reports WHERE report_id = ANY($1)",
                    )
                    .await?,
                    &[&report_ids],
                )
                .await?;
            let mut seen = BTreeMap::new();
            for r in rows {
                seen.insert(r.try_get::<_, String>(0)?, u64_of(r.try_get(1)?));
            }
            Ok(seen)
        })
    }

    fn record_reports(&self, reports: &[(&str, u64)]) -> Result<(), StoreError> {
        let ids: Vec<&str> = reports.iter().map(|(id, _)| *id).collect();
        let indexes: Vec<i64> = reports.iter().map(|(_, i)| to_i64(*i)).collect();
        on_conn!(self, |c| {
            c.execute(
                &c.stmt(
                    "INSERT INTO tool_reports (report_id, audit_index)
                     SELECT * FROM UNNEST($1::text[], $2::bigint[])
                     ON CONFLICT (report_id) DO NOTHING",
                )
                .await?,
                &[&ids, &indexes],
            )
            .await?;
            Ok(())
        })
    }

    fn latest_approval(&self, binding: &str) -> Result<Option<ApprovalState>, StoreError> {
        self.one_record(
            "approvals",
            "SELECT record FROM approvals WHERE binding = $1 ORDER BY n DESC LIMIT 1",
            binding,
        )
    }

    fn insert_approval(
        &self,
        binding: &str,
        a: &ApprovalState,
        latest: Option<&str>,
    ) -> Result<bool, StoreError> {
        let record = enc("approvals", a)?;
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            // Requests for one binding, at any broker, take turns: the
            // latest is read and the new one inserted under one lock.
            tx.execute(
                &tx.stmt("SELECT pg_advisory_xact_lock(hashtextextended($1, 7))")
                    .await?,
                &[&binding],
            )
            .await?;
            let n = tx
                .execute(
                    &tx.stmt(
                        "INSERT INTO approvals (id, binding, task, status, expires_at, record)
                         SELECT $1::TEXT, $2::TEXT, $3::TEXT, $4::TEXT, $5::BIGINT, $6::TEXT
                         WHERE (SELECT id FROM approvals WHERE binding = $2::TEXT
                                ORDER BY n DESC LIMIT 1) IS NOT DISTINCT FROM $7::TEXT",
                    )
                    .await?,
                    &[
                        &a.id,
                        &binding,
                        &a.task_id.to_string(),
                        &a.status,
                        &to_i64(a.expires_at),
                        &record,
                        &latest,
                    ],
                )
                .await?;
            tx.commit().await?;
            Ok(n == 1)
        })
    }

    fn get_approval(&self, id: &str) -> Result<Option<ApprovalState>, StoreError> {
        self.one_record(
            "approvals",
            "SELECT record FROM approvals WHERE id = $1",
            id,
        )
    }

    fn transition_approval(
        &self,
        id: &str,
        from: &str,
        to: &ApprovalState,
    ) -> Result<bool, StoreError> {
        let record = enc("approvals", to)?;
        on_conn!(self, |c| {
            Ok(c.execute(
                &c.stmt(
                    "UPDATE approvals SET status = $3, record = $4 WHERE id = $1 AND status = $2",
                )
                .await?,
                &[&id, &from, &to.status, &record],
            )
            .await?
                == 1)
        })
    }
}

/// The rows of the shared CA as stored (sealed by the caller).
pub(crate) struct RawCa {
    pub(crate) journal: Option<Vec<u8>>,
    pub(crate) files: Vec<(String, Vec<u8>)>,
}

/// What one CA step writes (sealed by the caller).
pub(crate) struct RawCaWrite {
    pub(crate) files: Vec<(String, Vec<u8>)>,
    pub(crate) journal: Vec<u8>,
    pub(crate) keep: Vec<String>,
}

async fn raw_ca(c: &(impl GenericClient + Sync), with_files: bool) -> Result<RawCa, StoreError> {
    let journal = c
        .query_opt(
            &c.stmt("SELECT data FROM ca_journal WHERE id = 1").await?,
            &[],
        )
        .await?
        .map(|r| r.try_get::<_, Vec<u8>>(0))
        .transpose()?;
    let mut files = Vec::new();
    if with_files {
        for r in c
            .query(&c.stmt("SELECT name, data FROM ca_files").await?, &[])
            .await?
        {
            files.push((r.try_get(0)?, r.try_get(1)?));
        }
    }
    Ok(RawCa { journal, files })
}

impl PgStore {
    /// The stored CA journal (and, with `with_files`, its files), unlocked.
    pub(crate) fn ca_raw(&self, with_files: bool) -> Result<RawCa, StoreError> {
        on_conn!(self, |c| {
            // One snapshot: a step committing between the two reads would
            // show a journal without its files.
            let tx = c
                .build_transaction()
                .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                .read_only(true)
                .start()
                .await?;
            let raw = raw_ca(&tx, with_files).await?;
            tx.commit().await?;
            Ok(raw)
        })
    }

    /// Runs `step` on the stored CA under an exclusive transaction-level
    /// advisory lock (one CA step at a time across every broker), and
    /// writes what it returns in the same transaction. A broker that dies
    /// mid-step leaves nothing of it (the lock goes with its session).
    pub(crate) fn ca_transact<E: From<StoreError>>(
        &self,
        step: &mut dyn FnMut(RawCa) -> Result<Option<RawCaWrite>, E>,
    ) -> Result<(), E> {
        let r: Result<Result<(), E>, StoreError> = on_conn!(self, |c| {
            let tx = c.transaction().await?;
            // A peer stuck holding the lock fails this step after a while
            // instead of stalling every broker's rotation and start.
            tx.batch_execute("SET LOCAL lock_timeout = '15s'").await?;
            tx.execute(
                &tx.stmt("SELECT pg_advisory_xact_lock($1)").await?,
                &[&CA_LOCK],
            )
            .await?;
            let raw = raw_ca(&tx, true).await?;
            let write = match step(raw) {
                Ok(Some(w)) => w,
                Ok(None) => return Ok(Ok(())),
                Err(e) => return Ok(Err(e)),
            };
            for (name, data) in &write.files {
                tx.execute(
                    &tx.stmt(
                        "INSERT INTO ca_files (name, data) VALUES ($1, $2)
                     ON CONFLICT (name) DO UPDATE SET data = excluded.data",
                    )
                    .await?,
                    &[name, data],
                )
                .await?;
            }
            tx.execute(
                &tx.stmt(
                    "INSERT INTO ca_journal (id, data) VALUES (1, $1)
                 ON CONFLICT (id) DO UPDATE SET data = excluded.data",
                )
                .await?,
                &[&write.journal],
            )
            .await?;
            tx.execute(
                &tx.stmt("DELETE FROM ca_files WHERE NOT (name = ANY($1))")
                    .await?,
                &[&write.keep],
            )
            .await?;
            tx.commit().await?;
            Ok(Ok(()))
        });
        r?
    }

    /// Takes or renews the lease `name` for `holder` for `ttl` (by the
    /// database's clock, so brokers' clocks do not matter): true while
    /// `holder` holds it. Another holder gets it only once it expired.
    pub fn lease(&self, name: &str, holder: &str, ttl: Duration) -> Result<bool, StoreError> {
        let ttl = ttl.as_secs_f64();
        on_conn!(self, |c| {
            let row = c
                .query_opt(
                    &c.stmt(
                        "INSERT INTO leases (name, holder, expires_at)
                     VALUES ($1, $2, extract(epoch FROM clock_timestamp())::float8 + $3::float8)
                     ON CONFLICT (name) DO UPDATE
                        SET holder = excluded.holder, expires_at = excluded.expires_at
                        WHERE leases.holder = excluded.holder
                           OR leases.expires_at <= extract(epoch FROM clock_timestamp())::float8
                     RETURNING holder",
                    )
                    .await?,
                    &[&name, &holder, &ttl],
                )
                .await?;
            Ok(row.is_some())
        })
    }
}

/// One audit event row (clear text sealed by the caller).
pub(crate) struct RawAuditLeaf {
    pub(crate) idx: i64,
    pub(crate) task_id: String,
    pub(crate) event: Vec<u8>,
    pub(crate) leaf_hash: Vec<u8>,
    pub(crate) clear_text: Option<Vec<u8>>,
}

/// One audit checkpoint row.
pub(crate) struct RawCheckpoint {
    pub(crate) size: i64,
    pub(crate) root_hash: String,
    pub(crate) at: i64,
    pub(crate) signature: String,
}

/// A registered audit log: its id, sealed key and registering broker.
pub(crate) type RawAuditLog = (String, Vec<u8>, String);

fn leaf_of(r: &Row) -> Result<RawAuditLeaf, StoreError> {
    Ok(RawAuditLeaf {
        idx: r.try_get(0)?,
        task_id: r.try_get(1)?,
        event: r.try_get(2)?,
        leaf_hash: r.try_get(3)?,
        clear_text: r.try_get(4)?,
    })
}

impl PgStore {
    /// Stores a shipment of audit log `log_id`: registers the log with
    /// `sealed_key` if it is new (else `key_ok` must accept the registered
    /// one), checks the stored size is where `leaves` start, and writes the
    /// leaves and checkpoints, in one transaction under a lock of the log's
    /// row. `Ok(Err(..))` is a refusal (another key, another size).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn audit_ship(
        &self,
        log_id: &str,
        sealed_key: &[u8],
        broker: &str,
        now: i64,
        key_ok: &(dyn Fn(&[u8]) -> bool + Sync),
        leaves: &[RawAuditLeaf],
        checkpoints: &[RawCheckpoint],
    ) -> Result<Result<(), String>, StoreError> {
        let start = leaves.first().map_or(0, |l| l.idx);
        on_conn!(self, |c| {
            let tx = c.transaction().await?;
            tx.execute(
                &tx.stmt(
                    "INSERT INTO audit_logs (log_id, sealed_key, broker, registered_at)
                 VALUES ($1, $2, $3, $4) ON CONFLICT (log_id) DO NOTHING",
                )
                .await?,
                &[&log_id, &sealed_key, &broker, &now],
            )
            .await?;
            let row = tx
                .query_one(
                    &tx.stmt("SELECT sealed_key FROM audit_logs WHERE log_id = $1 FOR UPDATE")
                        .await?,
                    &[&log_id],
                )
                .await?;
            let stored: Vec<u8> = row.try_get(0)?;
            if !key_ok(&stored) {
                return Ok(Err(format!(
                    "audit log {log_id} is registered in the datastore with another key (or its row was altered)"
                )));
            }
            let size: Option<i64> = tx
                .query_one(
                    &tx.stmt("SELECT max(size) FROM audit_checkpoints WHERE log_id = $1")
                        .await?,
                    &[&log_id],
                )
                .await?
                .try_get(0)?;
            let size = size.unwrap_or(0);
            if size != start {
                return Ok(Err(format!(
                    "the datastore holds {size} events of audit log {log_id}, this shipment starts at {start} (another broker writing with the same audit key?)"
                )));
            }
            let idx: Vec<i64> = leaves.iter().map(|l| l.idx).collect();
            let task: Vec<&str> = leaves.iter().map(|l| l.task_id.as_str()).collect();
            let event: Vec<&[u8]> = leaves.iter().map(|l| l.event.as_slice()).collect();
            let hash: Vec<&[u8]> = leaves.iter().map(|l| l.leaf_hash.as_slice()).collect();
            let clear: Vec<Option<&[u8]>> =
                leaves.iter().map(|l| l.clear_text.as_deref()).collect();
            tx.execute(&tx.stmt("INSERT INTO audit_leaves (log_id, idx, task_id, event, leaf_hash, clear_text)
                 SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::bytea[], $5::bytea[], $6::bytea[])").await?,
                &[&log_id, &idx, &task, &event, &hash, &clear],
            )
            .await?;
            let size: Vec<i64> = checkpoints.iter().map(|c| c.size).collect();
            let root: Vec<&str> = checkpoints.iter().map(|c| c.root_hash.as_str()).collect();
            let at: Vec<i64> = checkpoints.iter().map(|c| c.at).collect();
            let sig: Vec<&str> = checkpoints.iter().map(|c| c.signature.as_str()).collect();
            tx.execute(
                &tx.stmt(
                    "INSERT INTO audit_checkpoints (log_id, size, root_hash, at, signature)
                 SELECT $1, * FROM unnest($2::bigint[], $3::text[], $4::bigint[], $5::text[])",
                )
                .await?,
                &[&log_id, &size, &root, &at, &sig],
            )
            .await?;
            tx.commit().await?;
            Ok(Ok(()))
        })
    }

    /// Every registered audit log.
    pub(crate) fn audit_logs(&self) -> Result<Vec<RawAuditLog>, StoreError> {
        on_conn!(self, |c| {
            let mut out = Vec::new();
            for r in c
                .query(
                    &c.stmt("SELECT log_id, sealed_key, broker FROM audit_logs ORDER BY log_id")
                        .await?,
                    &[],
                )
                .await?
            {
                out.push((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?));
            }
            Ok(out)
        })
    }

    /// The stored checkpoints of `log_id` of at least `from` events.
    pub(crate) fn audit_checkpoints(
        &self,
        log_id: &str,
        from: i64,
    ) -> Result<Vec<RawCheckpoint>, StoreError> {
        on_conn!(self, |c| {
            let mut out = Vec::new();
            for r in c
                .query(
                    &c.stmt(
                        "SELECT size, root_hash, at, signature FROM audit_checkpoints
                     WHERE log_id = $1 AND size >= $2 ORDER BY size",
                    )
                    .await?,
                    &[&log_id, &from],
                )
                .await?
            {
                out.push(RawCheckpoint {
                    size: r.try_get(0)?,
                    root_hash: r.try_get(1)?,
                    at: r.try_get(2)?,
                    signature: r.try_get(3)?,
                });
            }
            Ok(out)
        })
    }

    /// The newest checkpoint of `log_id`.
    pub(crate) fn audit_head(&self, log_id: &str) -> Result<Option<RawCheckpoint>, StoreError> {
        on_conn!(self, |c| {
            let r = c
                .query_opt(
                    &c.stmt(
                        "SELECT size, root_hash, at, signature FROM audit_checkpoints
                     WHERE log_id = $1 ORDER BY size DESC LIMIT 1",
                    )
                    .await?,
                    &[&log_id],
                )
                .await?;
            r.map(|r| {
                Ok(RawCheckpoint {
                    size: r.try_get(0)?,
                    root_hash: r.try_get(1)?,
                    at: r.try_get(2)?,
                    signature: r.try_get(3)?,
                })
            })
            .transpose()
        })
    }

    /// The stored events `from..to` of `log_id`.
    pub(crate) fn audit_leaves(
        &self,
        log_id: &str,
        from: i64,
        to: i64,
    ) -> Result<Vec<RawAuditLeaf>, StoreError> {
        on_conn!(self, |c| {
            let mut out = Vec::new();
            for r in c
                .query(
                    &c.stmt(
                        "SELECT idx, task_id, event, leaf_hash, clear_text FROM audit_leaves
                     WHERE log_id = $1 AND idx >= $2 AND idx < $3 ORDER BY idx",
                    )
                    .await?,
                    &[&log_id, &from, &to],
                )
                .await?
            {
                out.push(leaf_of(&r)?);
            }
            Ok(out)
        })
    }

    /// The stored events of `log_id` at `indexes`.
    pub(crate) fn audit_events(
        &self,
        log_id: &str,
        indexes: &[i64],
    ) -> Result<Vec<RawAuditLeaf>, StoreError> {
        on_conn!(self, |c| {
            let mut out = Vec::new();
            for r in c
                .query(
                    &c.stmt(
                        "SELECT idx, task_id, event, leaf_hash, clear_text FROM audit_leaves
                     WHERE log_id = $1 AND idx = ANY($2) ORDER BY idx",
                    )
                    .await?,
                    &[&log_id, &indexes],
                )
                .await?
            {
                out.push(leaf_of(&r)?);
            }
            Ok(out)
        })
    }

    /// Wipes the stored clear text of `task`'s events (or every event).
    pub(crate) fn audit_redact(&self, task: Option<&str>) -> Result<u64, StoreError> {
        on_conn!(self, |c| {
            Ok(match task {
                Some(t) => {
                    c.execute(&c.stmt("UPDATE audit_leaves SET clear_text = NULL
                         WHERE task_id = $1 AND clear_text IS NOT NULL").await?,
                        &[&t],
                    )
                    .await?
                }
                None => {
                    c.execute(&c.stmt("UPDATE audit_leaves SET clear_text = NULL WHERE clear_text IS NOT NULL").await?,
                        &[],
                    )
                    .await?
                }
            })
        })
    }
}
