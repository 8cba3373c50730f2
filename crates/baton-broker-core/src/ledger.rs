//! The durable half of revocation behind one trait: the credential
//! registry, the revocations in force, the revocation log (the feed
//! verifiers follow and the relay's outbox) and task tombstones.
//!
//! [`crate::revocation::Revoker`] decides; a [`Ledger`] keeps, each method
//! one transaction. SQLite (here) is the embedded default; PostgreSQL
//! ([`crate::pg`]) lets several brokers share one ledger.

use baton_core::{SpiffeId, TaskId};
use baton_revocation::{CredKind, CredentialRecord, Revoked, Target};
use rusqlite::{Connection, OptionalExtension, params};

use crate::records::{TaskCredential, TokenRecord};
use crate::store::{SqliteStore, StoreError, to_i64};

/// One entry of the revocation log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogRow {
    /// Its place in the log (increasing; never reused).
    pub seq: u64,
    pub entry: Revoked,
    pub reason: String,
}

/// The durable revocation state. Every method is one atomic step, safe to
/// call from many tasks and (for a shared database) from many brokers.
pub trait Ledger: Send + Sync + std::fmt::Debug {
    /// The address of the store behind this ledger: a [`crate::tasks::TaskStore`]
    /// with the same one registers its tokens here.
    fn identity(&self) -> usize;
    /// Whether the database serves reads and writes now (readiness).
    fn ping(&self) -> Result<(), StoreError>;
    /// The name of this log: a follower that saw another starts over.
    fn epoch(&self) -> Result<String, StoreError>;
    /// Names the log anew (`to`) if it is still named `from`, so that every
    /// follower and revocation store starts it over; returns the name now in
    /// force. For a log found restored to an earlier state.
    fn restart_log(&self, from: &str, to: &str) -> Result<String, StoreError>;
    /// The newest sequence number of the log (0 when empty).
    fn last_seq(&self) -> Result<u64, StoreError>;
    /// Up to `limit` log entries after `after`, in order (only those still
    /// in force at `live_at`, when given), and the log's newest sequence
    /// number, read together.
    fn log_after(
        &self,
        after: u64,
        live_at: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<LogRow>, u64), StoreError>;
    /// Registers credentials before they leave the broker. Refuses
    /// (writing nothing) an expired record, an id already revoked, a record
    /// whose parent is revoked and a record of a revoked task.
    fn register(
        &self,
        records: &[CredentialRecord],
        now: u64,
    ) -> Result<Result<(), String>, StoreError>;
    /// Revokes `target` (for a task: its one deny entry, what was minted
    /// from it elsewhere, and `known`, tokens of a task store in another
    /// database; the task refuses every later registration) with its log
    /// entries, in one transaction. Returns what it covered (for a task,
    /// without the task's own credentials, which [`Ledger::live_task_credentials`] lists).
    fn revoke(
        &self,
        target: &Target,
        known: &[Revoked],
        reason: &str,
        now: u64,
    ) -> Result<Vec<Revoked>, StoreError>;
    /// The live credentials registered under `task`, oldest first.
    fn live_task_credentials(&self, task: &TaskId, now: u64) -> Result<Vec<Revoked>, StoreError>;
    /// For a task certificate (`serial`): the token it was minted for (its
    /// registry parent) and the live secret leases hanging under that
    /// token. `None` for anything but a registered task certificate.
    fn certificate_leases(
        &self,
        serial: &str,
        now: u64,
    ) -> Result<Option<(String, Vec<Revoked>)>, StoreError>;
    /// Revokes `tokens` with their certificates and whatever was minted
    /// from them, in one transaction (a purpose change).
    fn revoke_tokens(
        &self,
        tokens: &[TokenRecord],
        reason: &str,
        now: u64,
    ) -> Result<Vec<Revoked>, StoreError>;
    /// Marks `revoked` (and logs the new ones); returns how many were new.
    fn mark(&self, revoked: &[Revoked], reason: &str, now: u64) -> Result<usize, StoreError>;
    /// Forgets registry rows, revocations and log entries expired at `cutoff`.
    fn prune(&self, cutoff: u64) -> Result<(), StoreError>;
    /// Whether `id` is revoked at `now`, by its own entry or its task's.
    fn durably_revoked(&self, id: &str, now: u64) -> Result<bool, StoreError>;
    /// Every credential registered under `task`, oldest first, with
    /// whether it is revoked.
    fn task_credentials(&self, task: &TaskId) -> Result<Vec<TaskCredential>, StoreError>;
    /// Every revocation still in force.
    fn live_revocations(&self, now: u64) -> Result<Vec<Revoked>, StoreError>;
}

/// A token and its certificate as the task store knows them (credentials
/// minted before the registry existed are found this way too).
pub(crate) fn token_pair(t: &TokenRecord) -> [Revoked; 2] {
    [
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
    ]
}

/// Whether credential `?1` (live at `?2`) belongs to a revoked task.
pub(crate) const TASK_REVOKED_SQL: &str =
    "SELECT 1 FROM credentials c JOIN revoked_tasks t ON t.task = c.task
     WHERE c.id = ?1 AND c.expires_at > ?2";

/// Registers `records` in the credential registry inside `tx`. Refuses
/// (writing nothing) an expired record, an id already revoked, a record
/// whose parent is revoked and a record of a revoked task: nothing can be
/// minted under something already dead, with no window in between since
/// revocations commit in the same database.
pub(crate) fn register_tx(
    tx: &Connection,
    records: &[CredentialRecord],
    now: u64,
) -> Result<Result<(), String>, rusqlite::Error> {
    let mut revoked =
        tx.prepare_cached("SELECT 1 FROM revocations WHERE id = ?1 AND expires_at > ?2")?;
    let mut task_dead = tx.prepare_cached("SELECT 1 FROM revoked_tasks WHERE task = ?1")?;
    let mut parent_task_dead = tx.prepare_cached(TASK_REVOKED_SQL)?;
    for r in records {
        if r.expires_at <= now {
            return Ok(Err(format!(
                "credential {} would already be expired (at {}, now {now})",
                r.id, r.expires_at
            )));
        }
        if revoked.exists(params![r.id, to_i64(now)])? {
            return Ok(Err(format!("credential {} is already revoked", r.id)));
        }
        if let Some(p) = &r.parent
            && (revoked.exists(params![p, to_i64(now)])?
                || parent_task_dead.exists(params![p, to_i64(now)])?)
        {
            return Ok(Err(format!(
                "credential {} was minted from {p}, which is revoked",
                r.id
            )));
        }
        if let Some(t) = &r.task
            && task_dead.exists(params![t.as_str()])?
        {
            return Ok(Err(format!(
                "credential {} belongs to task {}, whose credentials were revoked",
                r.id,
                t.as_str()
            )));
        }
    }
    let mut insert = tx.prepare_cached(
        "INSERT INTO credentials (id, kind, task, agent, node, parent, expires_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)
         ON CONFLICT(id) DO UPDATE SET expires_at = MAX(expires_at, excluded.expires_at)",
    )?;
    for r in records {
        insert.execute(params![
            r.id,
            r.kind.code(),
            r.task.as_ref().map(TaskId::as_str),
            r.agent.as_ref().map(SpiffeId::as_str),
            r.node.as_ref().map(SpiffeId::as_str),
            r.parent,
            to_i64(r.expires_at),
        ])?;
    }
    Ok(Ok(()))
}

/// Marks `revoked` in the durable table and appends the newly revoked ones
/// to `revocation_log` (the feed and the relay's outbox), inside `tx`.
/// Returns how many were new.
pub(crate) fn mark_tx(
    tx: &Connection,
    revoked: &[Revoked],
    reason: &str,
    now: u64,
) -> Result<usize, rusqlite::Error> {
    cover_reset(tx)?;
    cover_add(tx, revoked)?;
    cover_mark(tx, reason, now)
}

// One revocation's working set lives in a temporary table of the
// connection (`temp.cover`, in insertion order, each id once), so that a
// cascade of thousands is resolved, de-duplicated and marked by a few
// set-based statements inside SQLite rather than a statement per id.

/// Empties the working set (creating it on the connection's first use).
pub(crate) fn cover_reset(tx: &Connection) -> Result<(), rusqlite::Error> {
    tx.execute_batch(
        "CREATE TEMP TABLE IF NOT EXISTS cover (
            n INTEGER PRIMARY KEY,
            id TEXT NOT NULL UNIQUE,
            kind TEXT NOT NULL,
            expires_at INTEGER NOT NULL
         );
         DELETE FROM temp.cover;",
    )
}

/// Adds rows to the working set (ids already in it are kept once).
fn cover_add(tx: &Connection, rows: &[Revoked]) -> Result<(), rusqlite::Error> {
    let mut add = tx.prepare_cached(
        "INSERT OR IGNORE INTO temp.cover (id, kind, expires_at) VALUES (?1, ?2, ?3)",
    )?;
    for r in rows {
        add.execute(params![r.id, r.kind.code(), to_i64(r.expires_at)])?;
    }
    Ok(())
}

/// Adds to the working set the live credentials `target` covers in the
/// registry, closed over parent links (anything minted from a covered
/// credential is covered).
pub(crate) fn cover_resolve(
    tx: &Connection,
    target: &Target,
    now: u64,
) -> Result<(), rusqlite::Error> {
    if let Target::Task(task) = target {
        return cover_resolve_task(tx, task.as_str(), now);
    }
    let (column, value) = match target {
        Target::Credential(id) | Target::Subtree(id) => ("id", id.clone()),
        Target::Task(t) => ("task", t.as_str().to_owned()),
        Target::Agent(a) => ("agent", a.as_str().to_owned()),
        Target::Node(n) => ("node", n.as_str().to_owned()),
    };
    // `column` is one of the fixed names above, never input.
    let sql = format!(
        "WITH RECURSIVE sub(id) AS (
            SELECT id FROM credentials WHERE {column} = ?1
            UNION
            SELECT c.id FROM credentials c JOIN sub s ON c.parent = s.id
         )
         INSERT OR IGNORE INTO temp.cover (id, kind, expires_at)
         SELECT c.id, c.kind, c.expires_at FROM credentials c JOIN sub s ON c.id = s.id
         WHERE c.expires_at > ?2"
    );
    tx.prepare_cached(&sql)?
        .execute(params![value, to_i64(now)])?;
    Ok(())
}

/// [`cover_resolve`] for a task: its own credentials by the task index in
/// one pass, then only what was minted from them outside the task, closed
/// over parent links. Same set as the generic walk, without running the
/// recursive de-duplication over every credential of a large task (which
/// dominated a 10,000-credential cascade).
fn cover_resolve_task(tx: &Connection, task: &str, now: u64) -> Result<(), rusqlite::Error> {
    tx.prepare_cached(
        "INSERT OR IGNORE INTO temp.cover (id, kind, expires_at)
         SELECT id, kind, expires_at FROM credentials WHERE task = ?1 AND expires_at > ?2",
    )?
    .execute(params![task, to_i64(now)])?;
    tx.prepare_cached(
        "WITH RECURSIVE sub(id) AS (
            SELECT c.id FROM credentials c JOIN temp.cover v ON c.parent = v.id
            WHERE c.task IS NOT ?1
            UNION
            SELECT c.id FROM credentials c JOIN sub s ON c.parent = s.id
         )
         INSERT OR IGNORE INTO temp.cover (id, kind, expires_at)
         SELECT c.id, c.kind, c.expires_at FROM credentials c JOIN sub s ON c.id = s.id
         WHERE c.expires_at > ?2",
    )?
    .execute(params![task, to_i64(now)])?;
    Ok(())
}

/// Adds to the working set the deny entry of `task` (keyed by the task id,
/// expiring with the last of its live credentials, `known` included) and,
/// one by one, what was minted from its credentials outside the task,
/// closed over parent links, plus `known` (tokens of a task store in
/// another database). Nothing when the task has no live credential.
fn cover_mark_task(
    tx: &Connection,
    task: &TaskId,
    known: &[Revoked],
    now: u64,
) -> Result<(), rusqlite::Error> {
    let registered: Option<i64> = tx
        .prepare_cached(
            "SELECT MAX(expires_at) FROM credentials WHERE task = ?1 AND expires_at > ?2",
        )?
        .query_row(params![task.as_str(), to_i64(now)], |r| r.get(0))?;
    let last = known
        .iter()
        .map(|r| to_i64(r.expires_at))
        .chain(registered)
        .max();
    let Some(last) = last.filter(|e| *e > to_i64(now)) else {
        return Ok(());
    };
    cover_add(
        tx,
        &[Revoked {
            id: task.as_str().to_owned(),
            kind: CredKind::Task,
            expires_at: u64::try_from(last).unwrap_or(0),
        }],
    )?;
    cover_add(tx, known)?;
    tx.prepare_cached(
        "WITH RECURSIVE sub(id) AS (
            SELECT c.id FROM credentials p JOIN credentials c ON c.parent = p.id
            WHERE p.task = ?1 AND c.task IS NOT ?1
            UNION
            SELECT c.id FROM credentials c JOIN sub s ON c.parent = s.id
         )
         INSERT OR IGNORE INTO temp.cover (id, kind, expires_at)
         SELECT c.id, c.kind, c.expires_at FROM credentials c JOIN sub s ON c.id = s.id
         WHERE c.expires_at > ?2",
    )?
    .execute(params![task.as_str(), to_i64(now)])?;
    Ok(())
}

/// Marks the working set revoked: the ids not revoked before go to
/// `revocation_log` in the set's order, all of them to `revocations`.
/// Returns how many were new.
fn cover_mark(tx: &Connection, reason: &str, now: u64) -> Result<usize, rusqlite::Error> {
    let new = tx
        .prepare_cached(
            "INSERT INTO revocation_log (id, expires_at, kind, reason)
             SELECT c.id, c.expires_at, c.kind, ?1 FROM temp.cover c
             WHERE c.expires_at > ?2
               AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.id = c.id)
             ORDER BY c.n",
        )?
        .execute(params![reason, to_i64(now)])?;
    tx.prepare_cached(
        "INSERT OR IGNORE INTO revocations (id, kind, expires_at, reason, at)
         SELECT id, kind, expires_at, ?1, ?2 FROM temp.cover WHERE expires_at > ?2",
    )?
    .execute(params![reason, to_i64(now)])?;
    Ok(new)
}

/// The working set, in order.
pub(crate) fn cover_list(tx: &Connection) -> Result<Vec<Revoked>, rusqlite::Error> {
    let mut stmt = tx.prepare_cached("SELECT id, kind, expires_at FROM temp.cover ORDER BY n")?;
    let rows = stmt.query_map([], revoked_row)?;
    rows.collect()
}

/// A `(id, kind, expires_at)` row.
fn revoked_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Revoked> {
    let kind: String = r.get(1)?;
    Ok(Revoked {
        id: r.get(0)?,
        kind: CredKind::from_code(&kind).unwrap_or(CredKind::Token),
        expires_at: u64::try_from(r.get::<_, i64>(2)?).unwrap_or(0),
    })
}

impl Ledger for SqliteStore {
    fn identity(&self) -> usize {
        std::ptr::from_ref(self).addr()
    }

    fn ping(&self) -> Result<(), StoreError> {
        SqliteStore::ping(self)
    }

    fn epoch(&self) -> Result<String, StoreError> {
        self.with(|c| {
            Ok(c.prepare_cached("SELECT epoch FROM feed_meta LIMIT 1")?
                .query_row([], |r| r.get(0))?)
        })
    }

    fn restart_log(&self, from: &str, to: &str) -> Result<String, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.prepare_cached("UPDATE feed_meta SET epoch = ?2 WHERE epoch = ?1")?
                .execute(params![from, to])?;
            let now: String = tx
                .prepare_cached("SELECT epoch FROM feed_meta LIMIT 1")?
                .query_row([], |r| r.get(0))?;
            tx.commit()?;
            Ok(now)
        })
    }

    fn last_seq(&self) -> Result<u64, StoreError> {
        self.with(|c| last_seq(c))
    }

    fn log_after(
        &self,
        after: u64,
        live_at: Option<u64>,
        limit: usize,
    ) -> Result<(Vec<LogRow>, u64), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let last = last_seq(&tx)?;
            let mut stmt = tx.prepare_cached(
                "SELECT seq, id, kind, expires_at, reason FROM revocation_log
                 WHERE seq > ?1 AND (?2 IS NULL OR expires_at > ?2) ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt.query_map(
                params![
                    to_i64(after),
                    live_at.map(to_i64),
                    i64::try_from(limit).unwrap_or(i64::MAX)
                ],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, String>(4)?,
                    ))
                },
            )?;
            let mut out = Vec::new();
            for row in rows {
                let (seq, id, kind, exp, reason) = row?;
                out.push(LogRow {
                    seq: u64::try_from(seq).unwrap_or(0),
                    entry: Revoked {
                        id,
                        kind: CredKind::from_code(&kind).unwrap_or(CredKind::Token),
                        expires_at: u64::try_from(exp).unwrap_or(0),
                    },
                    reason,
                });
            }
            Ok((out, last))
        })
    }

    fn register(
        &self,
        records: &[CredentialRecord],
        now: u64,
    ) -> Result<Result<(), String>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let r = register_tx(&tx, records, now)?;
            if r.is_ok() {
                tx.commit()?;
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
        self.with(|c| {
            let tx = c.transaction()?;
            cover_reset(&tx)?;
            if let Target::Task(task) = target {
                // One deny entry for the whole task (verifiers match it
                // against the task a credential names), plus, one by one,
                // only what was minted from the task's credentials in
                // other tasks: a cascade of 10,000 credentials writes and
                // publishes a handful of rows, not 10,000.
                cover_mark_task(&tx, task, known, now)?;
                tx.prepare_cached("INSERT OR IGNORE INTO revoked_tasks (task, at) VALUES (?1, ?2)")?.execute(
                    params![task.as_str(), to_i64(now)],
                )?;
            } else {
                cover_resolve(&tx, target, now)?;
            }
            cover_mark(&tx, reason, now)?;
            let mut all = cover_list(&tx)?;
            all.retain(|r| r.kind != CredKind::Task);
            if all.is_empty()
                && let Target::Credential(id) | Target::Subtree(id) = target
            {
                // Already revoked and gone from nowhere: idempotent.
                let row: Option<(String, i64)> = tx
                    .prepare_cached("SELECT kind, expires_at FROM revocations WHERE id = ?1 AND expires_at > ?2")?
                    .query_row(
                        params![id, to_i64(now)],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                    .optional()?;
                if let Some((kind, exp)) = row {
                    all.push(Revoked {
                        id: id.clone(),
                        kind: CredKind::from_code(&kind).unwrap_or(CredKind::Token),
                        expires_at: u64::try_from(exp).unwrap_or(0),
                    });
                }
            }
            tx.commit()?;
            Ok(all)
        })
    }

    fn live_task_credentials(&self, task: &TaskId, now: u64) -> Result<Vec<Revoked>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, kind, expires_at FROM credentials
                 WHERE task = ?1 AND expires_at > ?2 ORDER BY rowid",
            )?;
            let rows = stmt.query_map(params![task.as_str(), to_i64(now)], revoked_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn certificate_leases(
        &self,
        serial: &str,
        now: u64,
    ) -> Result<Option<(String, Vec<Revoked>)>, StoreError> {
        self.with(|c| {
            let jti: Option<String> = c
                .prepare_cached(
                    "SELECT parent FROM credentials
                     WHERE id = ?1 AND kind = 'x509' AND task IS NOT NULL AND parent IS NOT NULL",
                )?
                .query_row(params![serial], |r| r.get(0))
                .optional()?;
            let Some(jti) = jti else { return Ok(None) };
            let mut stmt = c.prepare_cached(
                "SELECT id, kind, expires_at FROM credentials
                 WHERE parent = ?1 AND kind = 'lease' AND expires_at > ?2 ORDER BY rowid",
            )?;
            let rows = stmt.query_map(params![jti, to_i64(now)], revoked_row)?;
            let leases = rows.collect::<Result<Vec<_>, _>>()?;
            Ok(Some((jti, leases)))
        })
    }

    fn revoke_tokens(
        &self,
        tokens: &[TokenRecord],
        reason: &str,
        now: u64,
    ) -> Result<Vec<Revoked>, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            cover_reset(&tx)?;
            for t in tokens {
                cover_resolve(&tx, &Target::Credential(t.jti.clone()), now)?;
                cover_add(&tx, &token_pair(t))?;
            }
            cover_mark(&tx, reason, now)?;
            let all = cover_list(&tx)?;
            tx.commit()?;
            Ok(all)
        })
    }

    fn mark(&self, revoked: &[Revoked], reason: &str, now: u64) -> Result<usize, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let n = mark_tx(&tx, revoked, reason, now)?;
            tx.commit()?;
            Ok(n)
        })
    }

    fn prune(&self, cutoff: u64) -> Result<(), StoreError> {
        let cutoff = to_i64(cutoff);
        self.with(|c| {
            let tx = c.transaction()?;
            tx.prepare_cached("DELETE FROM credentials WHERE expires_at <= ?1")?
                .execute(params![cutoff])?;
            tx.prepare_cached("DELETE FROM revocations WHERE expires_at <= ?1")?
                .execute(params![cutoff])?;
            // The newest row stays, expired or not: the log's end must
            // never move back but by a restore or a lossy failover, which
            // is how the relay and the feed tell one (`Revoker`).
            tx.prepare_cached(
                "DELETE FROM revocation_log WHERE expires_at <= ?1
                 AND seq < (SELECT MAX(seq) FROM revocation_log)",
            )?
            .execute(params![cutoff])?;
            tx.commit()?;
            Ok(())
        })
    }

    fn durably_revoked(&self, id: &str, now: u64) -> Result<bool, StoreError> {
        self.with(|c| {
            let exp: Option<i64> = c
                .prepare_cached("SELECT expires_at FROM revocations WHERE id = ?1")?
                .query_row(params![id], |r| r.get(0))
                .optional()?;
            if exp.is_some_and(|e| e > to_i64(now)) {
                return Ok(true);
            }
            // A credential of a revoked task (its task's deny entry covers
            // it; it has no row of its own).
            Ok(c.prepare_cached(TASK_REVOKED_SQL)?
                .exists(params![id, to_i64(now)])?)
        })
    }

    fn task_credentials(&self, task: &TaskId) -> Result<Vec<TaskCredential>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT c.id, c.kind, c.agent, c.node, c.parent, c.expires_at,
                        r.id IS NOT NULL OR t.task IS NOT NULL
                 FROM credentials c LEFT JOIN revocations r ON r.id = c.id
                 LEFT JOIN revoked_tasks t ON t.task = c.task
                 WHERE c.task = ?1 ORDER BY c.rowid",
            )?;
            let rows = stmt.query_map(params![task.to_string()], |r| {
                Ok(TaskCredential {
                    id: r.get(0)?,
                    kind: r.get(1)?,
                    agent: r.get(2)?,
                    node: r.get(3)?,
                    parent: r.get(4)?,
                    expires_at: u64::try_from(r.get::<_, i64>(5)?).unwrap_or(0),
                    revoked: r.get(6)?,
                })
            })?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }

    fn live_revocations(&self, now: u64) -> Result<Vec<Revoked>, StoreError> {
        self.with(|c| {
            let mut stmt = c.prepare_cached(
                "SELECT id, kind, expires_at FROM revocations WHERE expires_at > ?1",
            )?;
            let rows = stmt.query_map(params![to_i64(now)], revoked_row)?;
            Ok(rows.collect::<Result<Vec<_>, _>>()?)
        })
    }
}

fn last_seq(c: &Connection) -> Result<u64, StoreError> {
    let last: Option<i64> = c
        .prepare_cached("SELECT MAX(seq) FROM revocation_log")?
        .query_row([], |r| r.get(0))?;
    Ok(last.map_or(0, |l| u64::try_from(l).unwrap_or(0)))
}
