//! The broker's durable state behind one trait: registration entries, join
//! tokens (stored only as SHA-256 digests) and attested nodes.
//!
//! SQLite is the embedded default (a file in the data dir, or `:memory:`
//! for tests). A PostgreSQL backend for several brokers sharing state is a
//! later addition behind the same trait.

use std::path::Path;
use std::sync::Mutex;

use baton_core::{Entry, EntryId, Selector, SpiffeId};
use rusqlite::{Connection, OptionalExtension, params};

/// Why the datastore refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("datastore I/O failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("datastore holds a corrupt row in {table}: {detail}")]
    Corrupt { table: &'static str, detail: String },
    #[error("an entry with the same SPIFFE ID, parent and selectors already exists: {0}")]
    DuplicateEntry(EntryId),
    #[error("datastore schema version {found} is newer than this broker understands ({known})")]
    SchemaTooNew { found: i64, known: i64 },
    #[error("datastore lock poisoned by an earlier failure")]
    Poisoned,
    #[error("PostgreSQL datastore: {0}")]
    Postgres(String),
    #[error("datastore configuration: {0}")]
    Config(String),
}

/// A failure of the database itself (I/O, busy, corrupt), not an answer
/// it gives (no row, a constraint refusing a duplicate).
fn is_datastore_failure(e: &StoreError) -> bool {
    match e {
        StoreError::Poisoned | StoreError::Corrupt { .. } | StoreError::Postgres(_) => true,
        StoreError::Sqlite(rusqlite::Error::SqliteFailure(f, _)) => {
            f.code != rusqlite::ErrorCode::ConstraintViolation
        }
        _ => false,
    }
}

/// Why a join token cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum JoinTokenRefusal {
    #[error("join token is unknown")]
    Unknown,
    #[error("join token has expired")]
    Expired,
    #[error("join token was already used")]
    AlreadyUsed,
}

/// An attested node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub spiffe_id: SpiffeId,
    /// Serial of the newest agent SVID issued to it.
    pub serial_hex: String,
    /// Serial of the agent SVID it renewed last (accepted while the node
    /// switches over); `None` after an attestation.
    pub prev_serial_hex: Option<String>,
    pub svid_not_after: u64,
    pub attested_at: u64,
    pub banned: bool,
}

/// The broker's persistent state. Implementations must be safe to call
/// from many tasks; every method is one atomic step.
pub trait Datastore: Send + Sync + std::fmt::Debug {
    fn create_entry(&self, entry: &Entry) -> Result<(), StoreError>;
    fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>, StoreError>;
    fn list_entries(&self) -> Result<Vec<Entry>, StoreError>;
    fn list_entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError>;
    /// True when an entry was deleted.
    fn delete_entry(&self, id: &EntryId) -> Result<bool, StoreError>;

    fn insert_join_token(
        &self,
        digest_hex: &str,
        node_id: &SpiffeId,
        expires_at: u64,
    ) -> Result<(), StoreError>;
    /// Whether the token could be used now, without using it.
    fn check_join_token(
        &self,
        digest_hex: &str,
        now: u64,
    ) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError>;
    /// Marks the token used and returns the node ID it was minted for;
    /// refuses unknown, expired and used tokens. Atomic: two racing
    /// attestations with one token cannot both succeed.
    fn consume_join_token(
        &self,
        digest_hex: &str,
        now: u64,
    ) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError>;

    /// Inserts or replaces a node's record; never clears `banned` (a ban
    /// racing an attestation wins).
    fn upsert_node(&self, node: &NodeRecord) -> Result<(), StoreError>;
    fn get_node(&self, id: &SpiffeId) -> Result<Option<NodeRecord>, StoreError>;
    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError>;
    /// Records a renewed agent SVID, renewed by the node presenting
    /// `from_serial`: only for an attested, unbanned node whose current or
    /// previous agent SVID `from_serial` still is. Renewed from the current
    /// one, that one becomes the previous; renewed from the previous one
    /// (the current was never presented: its answer was lost), the unseen
    /// current one is dropped, so two holders of one node's SVID cannot
    /// both keep renewing. False when nothing was updated.
    fn update_node_svid(
        &self,
        id: &SpiffeId,
        from_serial: &str,
        serial_hex: &str,
        svid_not_after: u64,
    ) -> Result<bool, StoreError>;
    /// The node presented its current agent SVID `serial_hex`: the previous
    /// one is refused from now on.
    fn settle_node_svid(&self, id: &SpiffeId, serial_hex: &str) -> Result<(), StoreError>;
    /// Forgets a node's attestation (it must attest again, with a join
    /// token generated from now on: its unused ones are voided in the same
    /// step). False when there was none.
    fn delete_node(&self, id: &SpiffeId) -> Result<bool, StoreError>;
    /// Records that `node` synced at `at` having applied bundle sequence
    /// `applied`, for the other brokers sharing this store (a rotation's
    /// propagation check counts the syncs every broker served). Values
    /// only move forward. A store only one broker uses keeps nothing: its
    /// memory has every sync.
    fn record_node_sync(
        &self,
        _node: &SpiffeId,
        _at: u64,
        _applied: Option<u64>,
    ) -> Result<(), StoreError> {
        Ok(())
    }
    /// What [`record_node_sync`](Self::record_node_sync) kept: (node,
    /// last sync, applied sequence).
    fn node_syncs(&self) -> Result<Vec<(SpiffeId, u64, Option<u64>)>, StoreError> {
        Ok(Vec::new())
    }
    /// Sets or lifts a node's ban; setting it voids the node's unused join
    /// tokens in the same step (a token generated before a ban never
    /// attests, also after the ban is lifted). False when the node has no
    /// record.
    fn set_node_banned(&self, id: &SpiffeId, banned: bool) -> Result<bool, StoreError>;

    /// Blocks `id` from new credentials (hops to it, redeems, secrets,
    /// workload SVIDs) until `until` (unix seconds) or until lifted.
    fn block_agent(&self, block: &AgentBlock) -> Result<(), StoreError>;
    /// Lifts a block. False when there was none.
    fn unblock_agent(&self, id: &SpiffeId) -> Result<bool, StoreError>;
    /// The block on `id` in force at `now`, if any.
    fn agent_block(&self, id: &SpiffeId, now: u64) -> Result<Option<AgentBlock>, StoreError>;
    /// Every block in force at `now`.
    fn agent_blocks(&self, now: u64) -> Result<Vec<AgentBlock>, StoreError>;
}

/// An agent an operator cut off from new credentials (`baton revoke agent`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AgentBlock {
    pub spiffe_id: SpiffeId,
    /// Unix seconds when the block lapses; `None` until lifted.
    pub until: Option<u64>,
    pub reason: String,
    pub at: u64,
}

/// Voids a node's unused join tokens (`?1`: the node's SPIFFE ID).
const VOID_JOIN_TOKENS_SQLITE: &str =
    "DELETE FROM join_tokens WHERE node_id = ?1 AND used_at IS NULL";

/// Ordered schema migrations; the index + 1 is the schema version.
const MIGRATIONS: &[&str] = &[
    // 1: entries, join tokens, nodes
    "CREATE TABLE entries (
        id TEXT PRIMARY KEY,
        spiffe_id TEXT NOT NULL,
        parent_id TEXT NOT NULL,
        selectors TEXT NOT NULL,
        x509_ttl_secs INTEGER NOT NULL,
        jwt_ttl_secs INTEGER NOT NULL,
        dns_names TEXT NOT NULL,
        UNIQUE (spiffe_id, parent_id, selectors)
     );
     CREATE INDEX entries_by_parent ON entries(parent_id);
     CREATE TABLE join_tokens (
        digest TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER
     );
     CREATE TABLE nodes (
        spiffe_id TEXT PRIMARY KEY,
        serial TEXT NOT NULL,
        svid_not_after INTEGER NOT NULL,
        attested_at INTEGER NOT NULL,
        banned INTEGER NOT NULL DEFAULT 0
     );",
    // 2: tasks, handoff grants, delegation tokens
    "CREATE TABLE tasks (
        id TEXT PRIMARY KEY,
        record TEXT NOT NULL,
        created_at INTEGER NOT NULL
     );
     CREATE TABLE grants (
        digest TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        record TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        used_at INTEGER
     );
     CREATE INDEX grants_by_task ON grants(task_id);
     CREATE TABLE tokens (
        jti TEXT PRIMARY KEY,
        task_id TEXT NOT NULL,
        record TEXT NOT NULL
     );
     CREATE INDEX tokens_by_task ON tokens(task_id);
     CREATE TABLE tool_reports (
        report_id TEXT PRIMARY KEY,
        audit_index INTEGER NOT NULL
     );",
    // 3: durable revocations (the store is re-seeded from here)
    "CREATE TABLE revocations (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        reason TEXT NOT NULL,
        at INTEGER NOT NULL
     );
     CREATE INDEX revocations_by_expiry ON revocations(expires_at);",
    // 4: agents blocked from new credentials (`baton revoke agent`), and the
    // node's previous agent SVID (only the current one and its immediate
    // predecessor authenticate a node)
    "CREATE TABLE agent_blocks (
        spiffe_id TEXT PRIMARY KEY,
        until INTEGER,
        reason TEXT NOT NULL,
        at INTEGER NOT NULL
     );
     ALTER TABLE nodes ADD COLUMN prev_serial TEXT;",
    // 5: the revocation feed verifiers follow without Redis: every new
    // revocation in order (AUTOINCREMENT never reuses a sequence number),
    // and the epoch that names this log (a different one means resync)
    "CREATE TABLE revocation_log (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT NOT NULL,
        expires_at INTEGER NOT NULL
     );
     CREATE TABLE feed_meta (epoch TEXT NOT NULL);
     INSERT INTO feed_meta (epoch) VALUES (lower(hex(randomblob(16))));",
    // 6: ID tokens that started a task (single use within their lifetime)
    "CREATE TABLE used_id_tokens (
        digest TEXT PRIMARY KEY,
        expires_at INTEGER NOT NULL
     );",
    // 7: the datastore is the source of truth for every credential the
    // broker hands out (revocation cascades are computed here, not in
    // Redis); tasks whose credentials were revoked refuse new ones; the
    // revocation log doubles as the outbox the relay publishes to Redis.
    "CREATE TABLE credentials (
        id TEXT PRIMARY KEY,
        kind TEXT NOT NULL,
        task TEXT,
        agent TEXT,
        node TEXT,
        parent TEXT,
        expires_at INTEGER NOT NULL
     );
     CREATE INDEX credentials_by_task ON credentials(task) WHERE task IS NOT NULL;
     CREATE INDEX credentials_by_agent ON credentials(agent) WHERE agent IS NOT NULL;
     CREATE INDEX credentials_by_node ON credentials(node) WHERE node IS NOT NULL;
     CREATE INDEX credentials_by_parent ON credentials(parent) WHERE parent IS NOT NULL;
     CREATE INDEX credentials_by_expiry ON credentials(expires_at);
     CREATE TABLE revoked_tasks (
        task TEXT PRIMARY KEY,
        at INTEGER NOT NULL
     );
     ALTER TABLE revocation_log ADD COLUMN kind TEXT NOT NULL DEFAULT 'token';
     ALTER TABLE revocation_log ADD COLUMN reason TEXT NOT NULL DEFAULT '';
     CREATE INDEX revocation_log_by_expiry ON revocation_log(expires_at);",
    // 8: every delegation token and its certificate in the registry, under
    // their task (tokens minted before 7 were only in `tokens`): a task's
    // cascade is then computed from the registry alone. From 7 on, a
    // redeem registers both in the transaction that stores the token, and
    // a renewed certificate is registered before it leaves (a task revoked
    // in between refuses it).
    "INSERT OR IGNORE INTO credentials (id, kind, task, parent, expires_at)
        SELECT json_extract(record, '$.jti'), 'token', task_id,
               json_extract(record, '$.parent_jti'), json_extract(record, '$.exp')
        FROM tokens
        WHERE json_extract(record, '$.jti') IS NOT NULL
          AND typeof(json_extract(record, '$.exp')) = 'integer';
     INSERT OR IGNORE INTO credentials (id, kind, task, parent, expires_at)
        SELECT json_extract(record, '$.cert_serial'), 'x509', task_id,
               json_extract(record, '$.jti'), json_extract(record, '$.exp')
        FROM tokens
        WHERE json_extract(record, '$.cert_serial') IS NOT NULL
          AND typeof(json_extract(record, '$.exp')) = 'integer';",
    // 9: approvals of calls held for a human (the gateway's riskiest
    // tiers): one row per approval, found again by the call it binds.
    "CREATE TABLE approvals (
        id TEXT PRIMARY KEY,
        binding TEXT NOT NULL,
        task TEXT NOT NULL,
        status TEXT NOT NULL,
        expires_at INTEGER NOT NULL,
        record TEXT NOT NULL
     );
     CREATE INDEX approvals_by_binding ON approvals(binding);",
    // 10: what a redeem delivered, kept with its grant so that the same
    // request replayed after a lost answer gets the same credential, and
    // when it was delivered again (a grant redelivered is never released).
    "ALTER TABLE grants ADD COLUMN delivery TEXT;
     ALTER TABLE grants ADD COLUMN redelivered_at INTEGER;",
];

const ENTRY_COLUMNS: &str =
    "id, spiffe_id, parent_id, selectors, x509_ttl_secs, jwt_ttl_secs, dns_names";

/// SQLite implementation of [`Datastore`].
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
    /// Moves the WAL into the database file off the request path (file
    /// databases only).
    _checkpointer: Option<Checkpointer>,
}

/// How often the checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(100);
/// WAL pages after which a committing request checkpoints itself (what
/// SQLite does by default at 1,000): only a backstop, reached when the
/// checkpointer falls far behind or stopped. 64 Ki pages are 256 MiB.
const BACKSTOP_CHECKPOINT_PAGES: i64 = 65_536;

/// Compiled statements kept per connection: more than the store has, so
/// none is compiled twice.
pub(crate) const STATEMENT_CACHE: usize = 256;

/// A thread that checkpoints a WAL database every [`CHECKPOINT_EVERY`]
/// on a connection of its own (`PRAGMA wal_checkpoint(PASSIVE)`: it
/// never waits for a writer or a reader, and with `synchronous=FULL` it
/// fsyncs the database file itself). SQLite's automatic checkpoint would
/// run inside whichever commit crosses 1,000 WAL pages, so one request
/// in a few dozen would copy the WAL and fsync the database before it
/// answered; here no request does (unless the backstop is reached).
/// Dropped with the store: the thread is told to stop and joined.
struct Checkpointer {
    stop: std::sync::Arc<(Mutex<bool>, std::sync::Condvar)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for Checkpointer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpointer")
            .field("every", &CHECKPOINT_EVERY)
            .finish_non_exhaustive()
    }
}

impl Checkpointer {
    fn start(path: &Path) -> Result<Self, String> {
        let conn = Connection::open(path).map_err(|e| e.to_string())?;
        // The checkpoint fsyncs the database file before the WAL is reused.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| e.to_string())?;
        let stop = std::sync::Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let flag = stop.clone();
        let name = path.display().to_string();
        let thread = std::thread::Builder::new()
            .name("sqlite-checkpoint".into())
            .spawn(move || {
                let (lock, wake) = &*flag;
                let mut failing = false;
                loop {
                    let Ok(stopped) = lock.lock() else { return };
                    let Ok((stopped, _)) = wake.wait_timeout_while(stopped, CHECKPOINT_EVERY, |s| !*s)
                    else {
                        return;
                    };
                    if *stopped {
                        return;
                    }
                    drop(stopped);
                    let r = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                        r.get::<_, i64>(0)
                    });
                    match r {
                        Err(e) if !failing => {
                            failing = true;
                            tracing::warn!(database = %name, error = %e, "WAL checkpoint failed; retrying (requests checkpoint themselves past the backstop)");
                        }
                        Err(_) => {}
                        Ok(_) => failing = false,
                    }
                }
            })
            .map_err(|e| format!("cannot start the checkpoint thread: {e}"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let (lock, wake) = &*self.stop;
        if let Ok(mut s) = lock.lock() {
            *s = true;
        }
        wake.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database file and migrates it.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        // FULL: every commit is fsynced before it returns. With WAL,
        // NORMAL may lose the last commits on a power cut or OS crash,
        // which could bring back a join token or grant already used.
        conn.pragma_update(None, "synchronous", "FULL")?;
        let mut store = Self::migrate(conn)?;
        match Checkpointer::start(path) {
            Ok(c) => {
                store.with(|c| {
                    Ok(c.pragma_update(None, "wal_autocheckpoint", BACKSTOP_CHECKPOINT_PAGES)?)
                })?;
                store._checkpointer = Some(c);
            }
            // SQLite's own checkpoints (inside commits) stay on.
            Err(e) => {
                tracing::warn!(database = %path.display(), error = %e, "no background WAL checkpoints; commits checkpoint themselves")
            }
        }
        Ok(store)
    }

    /// Whether the database answers a query now (readiness).
    /// Whether the datastore can serve requests now: reads the database
    /// (`SELECT 1` alone never touches it) and takes the write lock for a
    /// moment (a database another process holds locked cannot take a
    /// revocation or an issuance, though reads still work in WAL mode).
    pub fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| {
            c.prepare_cached("SELECT MAX(version) FROM schema_version")?
                .query_row([], |r| r.get::<_, Option<i64>>(0))?;
            c.execute_batch("BEGIN IMMEDIATE; ROLLBACK;")?;
            Ok(())
        })
    }

    /// A private in-memory database (tests, throwaway runs).
    pub fn in_memory() -> Result<Self, StoreError> {
        Self::migrate(Connection::open_in_memory()?)
    }

    fn migrate(mut conn: Connection) -> Result<Self, StoreError> {
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        // A revocation's working set (`temp.cover`, one row per id of a
        // cascade of thousands) stays in memory, and the page cache may
        // hold the registry and revocation tables a cascade touches
        // (32 MiB instead of the default 2 MiB).
        conn.pragma_update(None, "temp_store", "MEMORY")?;
        conn.pragma_update(None, "cache_size", -32_768)?;
        // The plan of a statement never depends on the values bound to it
        // (the query planner stability guarantee). Without it, a statement
        // that joins a table with partial indexes (`credentials`) was
        // marked stale at each new binding and compiled again on every
        // call: the revocation check of each hop parsed its SQL anew.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
            true,
        )?;
        // Every statement a request runs stays compiled (the default keeps 16).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);",
        )?;
        let current: i64 = conn
            .query_row("SELECT MAX(version) FROM schema_version", [], |r| {
                r.get::<_, Option<i64>>(0)
            })?
            .unwrap_or(0);
        let known = MIGRATIONS.len() as i64;
        if current > known {
            return Err(StoreError::SchemaTooNew {
                found: current,
                known,
            });
        }
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.execute(
                "INSERT INTO schema_version (version) VALUES (?1)",
                params![i as i64 + 1],
            )?;
            tx.commit()?;
        }
        Ok(Self {
            conn: Mutex::new(conn),
            _checkpointer: None,
        })
    }

    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        // SQLite blocks (fsync on every commit): on a multi-threaded
        // runtime the worker hands its other tasks to another thread while
        // it waits, so a slow disk does not stall unrelated requests.
        let run = || {
            let mut guard = self.conn.lock().map_err(|_| StoreError::Poisoned)?;
            f(&mut guard)
        };
        let r = match tokio::runtime::Handle::try_current() {
            Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
                tokio::task::block_in_place(run)
            }
            _ => run(),
        };
        if let Err(e) = &r
            && is_datastore_failure(e)
        {
            baton_ops::metrics().store_error("sqlite");
        }
        r
    }

    fn nodes_where(&self, id: Option<&SpiffeId>) -> Result<Vec<NodeRecord>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT spiffe_id, serial, svid_not_after, attested_at, banned, prev_serial FROM nodes
                 WHERE ?1 IS NULL OR spiffe_id = ?1 ORDER BY spiffe_id",
            )?;
            let rows = stmt.query_map(params![id.map(SpiffeId::as_str)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, i64>(2)?,
                    r.get::<_, i64>(3)?,
                    r.get::<_, bool>(4)?,
                    r.get::<_, Option<String>>(5)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (spiffe_id, serial_hex, not_after, attested_at, banned, prev_serial_hex) = row?;
                out.push(NodeRecord {
                    spiffe_id: SpiffeId::parse(&spiffe_id).map_err(|e| corrupt("nodes", e))?,
                    serial_hex,
                    prev_serial_hex,
                    svid_not_after: u64::try_from(not_after).unwrap_or(0),
                    attested_at: u64::try_from(attested_at).unwrap_or(0),
                    banned,
                });
            }
            Ok(out)
        })
    }
}

pub(crate) fn corrupt(table: &'static str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        table,
        detail: e.to_string(),
    }
}

/// SQLite integers are signed; times past i64 saturate.
pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn selectors_text(selectors: &[Selector]) -> String {
    // Entries keep selectors sorted and deduplicated, so the text is canonical
    // and the UNIQUE constraint catches duplicates.
    selectors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

pub(crate) type EntryRow = (String, String, String, String, i64, i64, String);

pub(crate) fn entry_from_row(row: EntryRow) -> Result<Entry, StoreError> {
    let (id, spiffe_id, parent_id, selectors, x509_ttl, jwt_ttl, dns) = row;
    let c = |e: &dyn std::fmt::Display| corrupt("entries", e);
    Ok(Entry {
        id: EntryId::parse(&id).map_err(|e| c(&e))?,
        spiffe_id: SpiffeId::parse(&spiffe_id).map_err(|e| c(&e))?,
        parent_id: SpiffeId::parse(&parent_id).map_err(|e| c(&e))?,
        selectors: selectors
            .split('\n')
            .map(Selector::parse)
            .collect::<Result<_, _>>()
            .map_err(|e| c(&e))?,
        x509_ttl_secs: u64::try_from(x509_ttl).map_err(|e| c(&e))?,
        jwt_ttl_secs: u64::try_from(jwt_ttl).map_err(|e| c(&e))?,
        dns_names: serde_json::from_str(&dns).map_err(|e| c(&e))?,
    })
}

fn query_entries(
    c: &Connection,
    where_clause: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<Entry>, StoreError> {
    let mut stmt = c.prepare_cached(&format!(
        "SELECT {ENTRY_COLUMNS} FROM entries {where_clause} ORDER BY spiffe_id, id"
    ))?;
    let rows = stmt.query_map(params, |r| {
        Ok((
            r.get(0)?,
            r.get(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get(5)?,
            r.get(6)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        out.push(entry_from_row(row?)?);
    }
    Ok(out)
}

fn token_state(
    c: &Connection,
    digest_hex: &str,
    now: u64,
) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
    let row: Option<(String, i64, Option<i64>)> = c
        .prepare_cached("SELECT node_id, expires_at, used_at FROM join_tokens WHERE digest = ?1")?
        .query_row(params![digest_hex], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?))
        })
        .optional()?;
    let Some((node_id, expires_at, used_at)) = row else {
        return Ok(Err(JoinTokenRefusal::Unknown));
    };
    if used_at.is_some() {
        return Ok(Err(JoinTokenRefusal::AlreadyUsed));
    }
    if to_i64(now) >= expires_at {
        return Ok(Err(JoinTokenRefusal::Expired));
    }
    Ok(Ok(
        SpiffeId::parse(&node_id).map_err(|e| corrupt("join_tokens", e))?
    ))
}

impl Datastore for SqliteStore {
    fn create_entry(&self, e: &Entry) -> Result<(), StoreError> {
        self.with(|c| {
            let selectors = selectors_text(&e.selectors);
            let tx = c.transaction()?;
            let existing: Option<String> = tx
                .prepare_cached("SELECT id FROM entries WHERE spiffe_id = ?1 AND parent_id = ?2 AND selectors = ?3")?
                .query_row(
                    params![e.spiffe_id.as_str(), e.parent_id.as_str(), selectors],
                    |r| r.get(0),
                )
                .optional()?;
            if let Some(id) = existing {
                let id = EntryId::parse(&id).map_err(|err| corrupt("entries", err))?;
                return Err(StoreError::DuplicateEntry(id));
            }
            let dns = serde_json::to_string(&e.dns_names).map_err(|err| corrupt("entries", err))?;
            tx.execute(
                &format!(
                    "INSERT INTO entries ({ENTRY_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                ),
                params![
                    e.id.as_str(),
                    e.spiffe_id.as_str(),
                    e.parent_id.as_str(),
                    selectors,
                    to_i64(e.x509_ttl_secs),
                    to_i64(e.jwt_ttl_secs),
                    dns
                ],
            )?;
            tx.commit()?;
            Ok(())
        })
    }

    fn get_entry(&self, id: &EntryId) -> Result<Option<Entry>, StoreError> {
        self.with(|c| Ok(query_entries(c, "WHERE id = ?1", params![id.as_str()])?.pop()))
    }

    fn list_entries(&self) -> Result<Vec<Entry>, StoreError> {
        self.with(|c| query_entries(c, "", []))
    }

    fn list_entries_by_parent(&self, parent: &SpiffeId) -> Result<Vec<Entry>, StoreError> {
        self.with(|c| query_entries(c, "WHERE parent_id = ?1", params![parent.as_str()]))
    }

    fn delete_entry(&self, id: &EntryId) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.prepare_cached("DELETE FROM entries WHERE id = ?1")?
                .execute(params![id.as_str()])?
                > 0)
        })
    }

    fn insert_join_token(
        &self,
        digest_hex: &str,
        node_id: &SpiffeId,
        expires_at: u64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            c.prepare_cached(
                "INSERT INTO join_tokens (digest, node_id, expires_at) VALUES (?1, ?2, ?3)",
            )?
            .execute(params![digest_hex, node_id.as_str(), to_i64(expires_at)])?;
            Ok(())
        })
    }

    fn check_join_token(
        &self,
        digest_hex: &str,
        now: u64,
    ) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
        self.with(|c| token_state(c, digest_hex, now))
    }

    fn consume_join_token(
        &self,
        digest_hex: &str,
        now: u64,
    ) -> Result<Result<SpiffeId, JoinTokenRefusal>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let node_id = match token_state(&tx, digest_hex, now)? {
                Ok(id) => id,
                Err(refusal) => return Ok(Err(refusal)),
            };
            tx.prepare_cached("UPDATE join_tokens SET used_at = ?2 WHERE digest = ?1")?
                .execute(params![digest_hex, to_i64(now)])?;
            tx.commit()?;
            Ok(Ok(node_id))
        })
    }

    fn upsert_node(&self, n: &NodeRecord) -> Result<(), StoreError> {
        self.with(|c| {
            c.prepare_cached("INSERT INTO nodes (spiffe_id, serial, svid_not_after, attested_at, banned, prev_serial)
                 VALUES (?1, ?2, ?3, ?4, ?5, NULL)
                 ON CONFLICT(spiffe_id) DO UPDATE SET serial = ?2, svid_not_after = ?3,
                    attested_at = ?4, banned = banned OR ?5, prev_serial = NULL")?.execute(
                params![
                    n.spiffe_id.as_str(),
                    n.serial_hex,
                    to_i64(n.svid_not_after),
                    to_i64(n.attested_at),
                    n.banned
                ],
            )?;
            Ok(())
        })
    }

    fn get_node(&self, id: &SpiffeId) -> Result<Option<NodeRecord>, StoreError> {
        Ok(self.nodes_where(Some(id))?.into_iter().next())
    }

    fn list_nodes(&self) -> Result<Vec<NodeRecord>, StoreError> {
        self.nodes_where(None)
    }

    fn update_node_svid(
        &self,
        id: &SpiffeId,
        from_serial: &str,
        serial_hex: &str,
        svid_not_after: u64,
    ) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c
                .prepare_cached(
                    "UPDATE nodes SET
                    prev_serial = CASE WHEN serial = ?4 THEN serial ELSE prev_serial END,
                    serial = ?2, svid_not_after = ?3
                 WHERE spiffe_id = ?1 AND banned = 0 AND (serial = ?4 OR prev_serial = ?4)",
                )?
                .execute(params![
                    id.as_str(),
                    serial_hex,
                    to_i64(svid_not_after),
                    from_serial
                ])?;
            Ok(n == 1)
        })
    }

    fn settle_node_svid(&self, id: &SpiffeId, serial_hex: &str) -> Result<(), StoreError> {
        self.with(|c| {
            c.prepare_cached(
                "UPDATE nodes SET prev_serial = NULL
                 WHERE spiffe_id = ?1 AND serial = ?2 AND prev_serial IS NOT NULL",
            )?
            .execute(params![id.as_str(), serial_hex])?;
            Ok(())
        })
    }

    fn delete_node(&self, id: &SpiffeId) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.prepare_cached(VOID_JOIN_TOKENS_SQLITE)?
                .execute(params![id.as_str()])?;
            let n = tx
                .prepare_cached("DELETE FROM nodes WHERE spiffe_id = ?1")?
                .execute(params![id.as_str()])?;
            tx.commit()?;
            Ok(n == 1)
        })
    }

    fn set_node_banned(&self, id: &SpiffeId, banned: bool) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            if banned {
                tx.prepare_cached(VOID_JOIN_TOKENS_SQLITE)?
                    .execute(params![id.as_str()])?;
            }
            let n = tx
                .prepare_cached("UPDATE nodes SET banned = ?2 WHERE spiffe_id = ?1")?
                .execute(params![id.as_str(), banned])?;
            tx.commit()?;
            Ok(n == 1)
        })
    }

    fn block_agent(&self, b: &AgentBlock) -> Result<(), StoreError> {
        self.with(|c| {
            c.prepare_cached(
                "INSERT INTO agent_blocks (spiffe_id, until, reason, at) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT(spiffe_id) DO UPDATE SET until = ?2, reason = ?3, at = ?4",
            )?
            .execute(params![
                b.spiffe_id.as_str(),
                b.until.map(to_i64),
                b.reason,
                to_i64(b.at)
            ])?;
            Ok(())
        })
    }

    fn unblock_agent(&self, id: &SpiffeId) -> Result<bool, StoreError> {
        self.with(|c| {
            let n = c
                .prepare_cached("DELETE FROM agent_blocks WHERE spiffe_id = ?1")?
                .execute(params![id.as_str()])?;
            Ok(n == 1)
        })
    }

    fn agent_block(&self, id: &SpiffeId, now: u64) -> Result<Option<AgentBlock>, StoreError> {
        Ok(self.blocks_where(Some(id), now)?.into_iter().next())
    }

    fn agent_blocks(&self, now: u64) -> Result<Vec<AgentBlock>, StoreError> {
        self.blocks_where(None, now)
    }
}

impl SqliteStore {
    fn blocks_where(&self, id: Option<&SpiffeId>, now: u64) -> Result<Vec<AgentBlock>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT spiffe_id, until, reason, at FROM agent_blocks
                 WHERE (?1 IS NULL OR spiffe_id = ?1) AND (until IS NULL OR until > ?2)
                 ORDER BY spiffe_id",
            )?;
            let rows = stmt.query_map(params![id.map(SpiffeId::as_str), to_i64(now)], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, Option<i64>>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, i64>(3)?,
                ))
            })?;
            let mut out = Vec::new();
            for row in rows {
                let (spiffe_id, until, reason, at) = row?;
                out.push(AgentBlock {
                    spiffe_id: SpiffeId::parse(&spiffe_id)
                        .map_err(|e| corrupt("agent_blocks", e))?,
                    until: until.map(|u| u64::try_from(u).unwrap_or(0)),
                    reason,
                    at: u64::try_from(at).unwrap_or(0),
                });
            }
            Ok(out)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_core::NewEntry;

    #[test]
    fn hot_statements_are_compiled_once_not_per_call() {
        use crate::ledger::Ledger;
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("baton.db")).unwrap();
        for i in 0..50u64 {
            // The revocation check of every hop and redeem.
            store.durably_revoked(&format!("id{i}"), 100 + i).unwrap();
        }
        let conn = store.conn.lock().unwrap();
        let st = conn
            .prepare_cached(crate::ledger::TASK_REVOKED_SQL)
            .unwrap();
        assert_eq!(
            st.get_status(rusqlite::StatementStatus::RePrepare),
            0,
            "compiled again after a new binding"
        );
        assert!(st.get_status(rusqlite::StatementStatus::Run) >= 50);
    }

    #[test]
    fn file_store_is_fsynced_on_every_commit() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("baton.db")).unwrap();
        let conn = store.conn.lock().unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        // 2 is FULL (0 OFF, 1 NORMAL, 3 EXTRA).
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "PRAGMA synchronous must be FULL");
    }

    #[test]
    fn the_wal_is_checkpointed_in_the_background_not_inside_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.db");
        let store = SqliteStore::open(&path).unwrap();
        let backstop: i64 = store
            .conn
            .lock()
            .unwrap()
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .unwrap();
        assert_eq!(backstop, BACKSTOP_CHECKPOINT_PAGES);
        let before = std::fs::metadata(&path).unwrap().len();
        // Far fewer pages than the backstop: no commit checkpoints, so
        // only the checkpointer can move them into the database file.
        for uid in 0..400 {
            store.create_entry(&entry(uid)).unwrap();
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::fs::metadata(&path).unwrap().len() <= before {
            assert!(
                std::time::Instant::now() < deadline,
                "the WAL was never checkpointed into the database file"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        // Reopened from the database file: everything is there.
        drop(store);
        let again = SqliteStore::open(&path).unwrap();
        assert_eq!(again.list_entries().unwrap().len(), 400);
    }

    fn entry(uid: u32) -> Entry {
        NewEntry {
            spiffe_id: "spiffe://example.org/web".into(),
            parent_id: "spiffe://example.org/baton/node/n1".into(),
            selectors: vec![format!("unix:uid:{uid}"), "unix:gid:5".into()],
            x509_ttl_secs: 60,
            jwt_ttl_secs: 30,
            dns_names: vec!["web.local".into()],
        }
        .validate()
        .unwrap()
    }

    #[test]
    fn entries_round_trip_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("baton.db");
        let e = entry(1000);
        {
            let s = SqliteStore::open(&path).unwrap();
            s.create_entry(&e).unwrap();
            assert!(
                matches!(s.create_entry(&entry(1000)), Err(StoreError::DuplicateEntry(id)) if id == e.id)
            );
        }
        let s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.get_entry(&e.id).unwrap(), Some(e.clone()));
        assert_eq!(
            s.list_entries_by_parent(&e.parent_id).unwrap(),
            vec![e.clone()]
        );
        let other = SpiffeId::parse("spiffe://example.org/baton/node/n2").unwrap();
        assert!(s.list_entries_by_parent(&other).unwrap().is_empty());
        assert!(s.delete_entry(&e.id).unwrap());
        assert!(!s.delete_entry(&e.id).unwrap());
        assert!(s.list_entries().unwrap().is_empty());
    }
}
