//! Durable records of the delegation model: tasks, handoff grants (stored
//! by digest, never in clear) and the delegation tokens minted from them.
//! Each record is one JSON column so the schema can grow without
//! migrations of every field; the columns the broker queries by are
//! separate.

use std::collections::BTreeMap;

use baton_core::api::ApprovalState;
use baton_core::{Actor, ParentRef, Purpose, RiskTier, Scope, SpiffeId, TaskId};
use rusqlite::{OptionalExtension, params};
use serde::{Deserialize, Serialize};

pub use crate::records::TokenRecord;
use crate::store::{SqliteStore, StoreError, to_i64};

/// A task as the broker keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub id: TaskId,
    /// The initiating identity (OIDC `sub`) and its issuer.
    pub initiator: String,
    pub initiator_iss: String,
    pub root_agent: SpiffeId,
    pub purpose: Purpose,
    pub scope: Scope,
    pub risk_ceiling: RiskTier,
    pub max_depth: u32,
    pub created_at: u64,
    pub expires_at: u64,
    #[serde(default)]
    pub ended_at: Option<u64>,
    /// Bumped on every purpose change: grants and tokens of an older epoch
    /// are refused.
    #[serde(default)]
    pub purpose_epoch: u32,
    /// The audiences admission admitted at the start: a start grant an
    /// operator re-issues may name only these. `None` in records written
    /// before they were kept; such a task cannot be re-granted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audiences: Option<Vec<String>>,
}

impl TaskRecord {
    /// Why the task cannot be used at `now`, if it cannot.
    pub fn unusable(&self, now: u64) -> Option<&'static str> {
        if self.ended_at.is_some() {
            Some("task has ended")
        } else if now >= self.expires_at {
            Some("task has expired")
        } else {
            None
        }
    }
}

/// A single-use handoff grant, bound to one target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    pub task_id: TaskId,
    pub target: SpiffeId,
    pub scope: Scope,
    pub purpose: Purpose,
    pub purpose_epoch: u32,
    pub audience: Vec<String>,
    /// Depth of the token the grant redeems into.
    pub depth: u32,
    /// The delegating holder's token, absent for the root agent's grant.
    pub parent: Option<ParentRef>,
    /// The delegating holder's actor chain, nested under the new actor.
    pub parent_act: Option<Actor>,
    pub justification: Option<String>,
    /// The minted token may not outlive this.
    pub exp_cap: u64,
    /// The grant must be redeemed before this.
    pub expires_at: u64,
    pub created_by: Option<SpiffeId>,
}

/// What a redeem delivered, kept with its grant: the same request replayed
/// by the same node (its answer lost when a broker died after the commit)
/// gets the same credential again instead of a `grant_used` refusal, and
/// never a second one. The credential is bound to the workload's key
/// (`cnf`), so the stored copy is of no use without that key.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantDelivery {
    /// The node that asked.
    pub node: String,
    /// SHA-256 (hex) of the CSR: a replay sends the very same request.
    pub request: String,
    /// The delivered token's `jti` and its certificate's serial.
    pub jti: String,
    pub cert_serial: String,
    /// The authority that signed the certificate.
    pub authority_id: String,
    pub credential: baton_core::api::TaskCredential,
}

/// Why a redeem's transaction refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RedeemRefusal {
    #[error("{0}")]
    Grant(GrantRefusal),
    #[error("{0}")]
    Revoked(String),
    /// The task ended or changed purpose since the grant was issued (seen
    /// in the redeem's own transaction).
    #[error("{1}")]
    Task(&'static str, String),
}

/// Why a grant's task refuses it now: ended, expired, or another purpose
/// (`grant` from its row, `task` read in the same transaction).
pub(crate) fn task_refusal(
    grant: &GrantRecord,
    task: Option<&TaskRecord>,
    now: u64,
) -> Option<RedeemRefusal> {
    let Some(task) = task else {
        return Some(RedeemRefusal::Task(
            "task_ended",
            "the task is unknown".into(),
        ));
    };
    if let Some(why) = task.unusable(now) {
        return Some(RedeemRefusal::Task("task_ended", why.to_owned()));
    }
    if grant.purpose_epoch != task.purpose_epoch {
        return Some(RedeemRefusal::Task(
            "purpose_changed",
            "the task's purpose changed after this grant was issued".into(),
        ));
    }
    None
}

/// Why a grant cannot be redeemed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum GrantRefusal {
    #[error("grant is unknown")]
    Unknown,
    #[error("grant was already redeemed")]
    Used,
    #[error("grant has expired")]
    Expired,
}

pub(crate) fn enc<T: Serialize>(table: &'static str, v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::Corrupt {
        table,
        detail: e.to_string(),
    })
}

pub(crate) fn dec<T: for<'de> Deserialize<'de>>(
    table: &'static str,
    s: &str,
) -> Result<T, StoreError> {
    serde_json::from_str(s).map_err(|e| StoreError::Corrupt {
        table,
        detail: e.to_string(),
    })
}

/// Task storage. Implemented by the SQLite store; a later PostgreSQL store
/// implements it too.
pub trait TaskStore: Send + Sync + std::fmt::Debug {
    fn insert_task(&self, t: &TaskRecord) -> Result<(), StoreError>;
    fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError>;
    fn list_tasks(&self) -> Result<Vec<TaskRecord>, StoreError>;
    /// Writes `t` over its stored record only while that record is not
    /// ended and still at purpose epoch `was_epoch` (compare-and-set: of a
    /// task end and a purpose change racing at two brokers, the second
    /// sees `false` and re-reads). True when written.
    fn replace_task(&self, t: &TaskRecord, was_epoch: u32) -> Result<bool, StoreError>;
    /// Stores a grant and registers `cred` (the grant's own record) in the
    /// credential registry, in one transaction. Refused with the reason,
    /// nothing written, when the grant's parent or its task is revoked.
    fn insert_grant(
        &self,
        digest: &str,
        g: &GrantRecord,
        cred: &baton_revocation::CredentialRecord,
        now: u64,
    ) -> Result<Result<(), String>, StoreError>;
    fn get_grant(&self, digest: &str) -> Result<Option<(GrantRecord, Option<u64>)>, StoreError>;
    /// Marks the grant used, atomically: of two racing redeems one wins.
    fn consume_grant(
        &self,
        digest: &str,
        now: u64,
    ) -> Result<Result<GrantRecord, GrantRefusal>, StoreError>;
    /// Stores a token record. The caller registers the token and its
    /// certificate in the credential registry (a task's revocation finds
    /// them there); [`TaskStore::redeem_grant`] does both at once.
    fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError>;
    /// A redeem's one atomic step: consumes the grant (keeping `delivery`
    /// with it), records the token and registers `creds` (the token and
    /// its certificate) in the credential registry, or does none of it.
    /// Refused (nothing written) when the grant is used, expired or
    /// unknown, or when a credential, its parent or its task is revoked.
    fn redeem_grant(
        &self,
        digest: &str,
        now: u64,
        token: &TokenRecord,
        creds: &[baton_revocation::CredentialRecord],
        delivery: &GrantDelivery,
    ) -> Result<Result<(), RedeemRefusal>, StoreError>;
    /// What the redeem of a used grant delivered, if it was kept.
    fn grant_delivery(&self, digest: &str) -> Result<Option<GrantDelivery>, StoreError>;
    /// Marks that the delivery of `jti` was made again; false when the
    /// grant no longer holds that delivery (released meanwhile). A grant so
    /// marked is never released.
    fn mark_redelivered(&self, digest: &str, jti: &str, now: u64) -> Result<bool, StoreError>;
    /// Undoes [`redeem_grant`](Self::redeem_grant) when the credential
    /// could not be delivered with its audit record: the grant becomes
    /// redeemable again (its delivery forgotten) and the credentials are
    /// revoked (they never left). Does nothing once the delivery was made
    /// again elsewhere ([`mark_redelivered`](Self::mark_redelivered)): that
    /// delivery has its audit record.
    fn release_grant(
        &self,
        digest: &str,
        creds: &[baton_revocation::CredentialRecord],
        now: u64,
    ) -> Result<(), StoreError>;
    /// Replaces a token's record if it is still bound to the certificate
    /// `from_serial` (a renewal binds it to a new one): false, writing
    /// nothing, when another renewal rebound it first.
    fn rebind_token(&self, t: &TokenRecord, from_serial: &str) -> Result<bool, StoreError>;
    fn tokens_for_task(&self, task: &TaskId) -> Result<Vec<TokenRecord>, StoreError>;
    /// The [`crate::ledger::Ledger::identity`] of the ledger in this store's
    /// database, if it has one: that ledger registers every token stored
    /// here (a task's revocation finds them in its own transaction).
    fn registry_identity(&self) -> Option<usize> {
        None
    }
    fn get_token(&self, jti: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Records that an ID token (by its replay key) started a task; false
    /// when it already did (a replay). Forgets tokens expired at `now`.
    fn use_id_token(&self, key: &str, expires_at: u64, now: u64) -> Result<bool, StoreError>;
    /// The audit index of an already recorded tool-call report.
    fn report_seen(&self, report_id: &str) -> Result<Option<u64>, StoreError>;
    fn record_report(&self, report_id: &str, index: u64) -> Result<(), StoreError>;
    /// [`Self::report_seen`] for several reports: the audit index of each
    /// one already recorded.
    fn reports_seen(&self, report_ids: &[&str]) -> Result<BTreeMap<String, u64>, StoreError> {
        let mut seen = BTreeMap::new();
        for id in report_ids {
            if let Some(index) = self.report_seen(id)? {
                seen.insert((*id).to_owned(), index);
            }
        }
        Ok(seen)
    }
    /// [`Self::record_report`] for several reports, in one transaction
    /// where the store has them (a batch's reports are recorded together,
    /// after their one audit append).
    fn record_reports(&self, reports: &[(&str, u64)]) -> Result<(), StoreError> {
        for (id, index) in reports {
            self.record_report(id, *index)?;
        }
        Ok(())
    }
    /// The latest approval that binds `binding`, if any.
    fn latest_approval(&self, binding: &str) -> Result<Option<ApprovalState>, StoreError>;
    /// Inserts `a` for `binding` only while the binding's latest approval
    /// is still `latest` (its id; `None`: the binding has none yet), in
    /// one step; false when another request (at this broker or another)
    /// inserted one first, which is then the one to answer with.
    fn insert_approval(
        &self,
        binding: &str,
        a: &ApprovalState,
        latest: Option<&str>,
    ) -> Result<bool, StoreError>;
    fn get_approval(&self, id: &str) -> Result<Option<ApprovalState>, StoreError>;
    /// Moves approval `id` from status `from` to `to.status` (writing
    /// `to` whole) in one step; false when it was not in `from` any more
    /// (another broker or request moved it first).
    fn transition_approval(
        &self,
        id: &str,
        from: &str,
        to: &ApprovalState,
    ) -> Result<bool, StoreError>;
}

impl TaskStore for SqliteStore {
    fn registry_identity(&self) -> Option<usize> {
        Some(crate::ledger::Ledger::identity(self))
    }

    fn insert_task(&self, t: &TaskRecord) -> Result<(), StoreError> {
        let record = enc("tasks", t)?;
        self.with(|c| {
            c.prepare_cached("INSERT INTO tasks (id, record, created_at) VALUES (?1, ?2, ?3)")?
                .execute(params![t.id.as_str(), record, to_i64(t.created_at)])?;
            Ok(())
        })
    }

    fn get_task(&self, id: &TaskId) -> Result<Option<TaskRecord>, StoreError> {
        let row: Option<String> = self.with(|c| {
            Ok(c.prepare_cached("SELECT record FROM tasks WHERE id = ?1")?
                .query_row(params![id.as_str()], |r| r.get(0))
                .optional()?)
        })?;
        row.map(|s| dec("tasks", &s)).transpose()
    }

    fn list_tasks(&self) -> Result<Vec<TaskRecord>, StoreError> {
        let rows: Vec<String> = self.with(|c| {
            let mut stmt = c.prepare_cached("SELECT record FROM tasks ORDER BY created_at, id")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })?;
        rows.iter().map(|s| dec("tasks", s)).collect()
    }

    fn replace_task(&self, t: &TaskRecord, was_epoch: u32) -> Result<bool, StoreError> {
        let record = enc("tasks", t)?;
        self.with(|c| {
            let n = c
                .prepare_cached(
                    "UPDATE tasks SET record = ?2
                     WHERE id = ?1
                       AND json_extract(record, '$.ended_at') IS NULL
                       AND COALESCE(json_extract(record, '$.purpose_epoch'), 0) = ?3",
                )?
                .execute(params![t.id.as_str(), record, i64::from(was_epoch)])?;
            Ok(n == 1)
        })
    }

    fn insert_grant(
        &self,
        digest: &str,
        g: &GrantRecord,
        cred: &baton_revocation::CredentialRecord,
        now: u64,
    ) -> Result<Result<(), String>, StoreError> {
        let record = enc("grants", g)?;
        self.with(|c| {
            let tx = c.transaction()?;
            if let Err(why) = crate::ledger::register_tx(&tx, std::slice::from_ref(cred), now)? {
                return Ok(Err(why));
            }
            tx.prepare_cached(
                "INSERT INTO grants (digest, task_id, record, expires_at) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![
                digest,
                g.task_id.as_str(),
                record,
                to_i64(g.expires_at)
            ])?;
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    fn get_grant(&self, digest: &str) -> Result<Option<(GrantRecord, Option<u64>)>, StoreError> {
        let row: Option<(String, Option<i64>)> = self.with(|c| {
            Ok(
                c.prepare_cached("SELECT record, used_at FROM grants WHERE digest = ?1")?
                    .query_row(params![digest], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()?,
            )
        })?;
        row.map(|(s, used)| Ok((dec("grants", &s)?, used.map(|u| u.max(0) as u64))))
            .transpose()
    }

    fn mark_redelivered(&self, digest: &str, jti: &str, now: u64) -> Result<bool, StoreError> {
        self.with(|c| {
            Ok(c.prepare_cached(
                "UPDATE grants SET redelivered_at = ?3
                 WHERE digest = ?1 AND used_at IS NOT NULL
                   AND json_extract(delivery, '$.jti') = ?2",
            )?
            .execute(params![digest, jti, to_i64(now)])?
                == 1)
        })
    }

    fn grant_delivery(&self, digest: &str) -> Result<Option<GrantDelivery>, StoreError> {
        let row: Option<Option<String>> = self.with(|c| {
            Ok(c.prepare_cached(
                "SELECT delivery FROM grants WHERE digest = ?1 AND used_at IS NOT NULL",
            )?
            .query_row(params![digest], |r| r.get(0))
            .optional()?)
        })?;
        row.flatten().map(|d| dec("grants", &d)).transpose()
    }

    fn consume_grant(
        &self,
        digest: &str,
        now: u64,
    ) -> Result<Result<GrantRecord, GrantRefusal>, StoreError> {
        let row = self.with(|c| {
            let tx = c.transaction()?;
            let row: Option<(String, i64, Option<i64>)> = tx
                .prepare_cached("SELECT record, expires_at, used_at FROM grants WHERE digest = ?1")?
                .query_row(params![digest], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            let Some((record, expires_at, used_at)) = row else {
                return Ok(Err(GrantRefusal::Unknown));
            };
            if used_at.is_some() {
                return Ok(Err(GrantRefusal::Used));
            }
            if to_i64(now) >= expires_at {
                return Ok(Err(GrantRefusal::Expired));
            }
            tx.prepare_cached("UPDATE grants SET used_at = ?2 WHERE digest = ?1")?
                .execute(params![digest, to_i64(now)])?;
            tx.commit()?;
            Ok(Ok(record))
        })?;
        match row {
            Ok(record) => Ok(Ok(dec("grants", &record)?)),
            Err(refusal) => Ok(Err(refusal)),
        }
    }

    fn insert_token(&self, t: &TokenRecord) -> Result<(), StoreError> {
        let record = enc("tokens", t)?;
        self.with(|c| {
            c.prepare_cached("INSERT INTO tokens (jti, task_id, record) VALUES (?1, ?2, ?3)")?
                .execute(params![t.jti, t.task_id.as_str(), record])?;
            Ok(())
        })
    }

    fn redeem_grant(
        &self,
        digest: &str,
        now: u64,
        token: &TokenRecord,
        creds: &[baton_revocation::CredentialRecord],
        delivery: &GrantDelivery,
    ) -> Result<Result<(), RedeemRefusal>, StoreError> {
        let record = enc("tokens", token)?;
        let delivery = enc("grants", delivery)?;
        self.with(|c| {
            let tx = c.transaction()?;
            let row: Option<(i64, Option<i64>, String)> = tx
                .prepare_cached("SELECT expires_at, used_at, record FROM grants WHERE digest = ?1")?
                .query_row(params![digest], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .optional()?;
            let (refusal, grant) = match row {
                None => (Some(GrantRefusal::Unknown), None),
                Some((_, Some(_), _)) => (Some(GrantRefusal::Used), None),
                Some((exp, None, _)) if to_i64(now) >= exp => (Some(GrantRefusal::Expired), None),
                Some((_, None, record)) => (None, Some(record)),
            };
            if let Some(r) = refusal {
                return Ok(Err(RedeemRefusal::Grant(r)));
            }
            // Everything the redeem decided outside this transaction, again
            // inside it: the grant not revoked meanwhile, its task still
            // live and on the grant's purpose.
            let grant: GrantRecord = dec("grants", grant.as_deref().unwrap_or_default())?;
            if tx
                .prepare_cached("SELECT 1 FROM revocations WHERE id = ?1 AND expires_at > ?2")?
                .exists(params![digest, to_i64(now)])?
            {
                return Ok(Err(RedeemRefusal::Revoked("the grant was revoked".into())));
            }
            let task: Option<String> = tx
                .prepare_cached("SELECT record FROM tasks WHERE id = ?1")?
                .query_row(params![grant.task_id.as_str()], |r| r.get(0))
                .optional()?;
            let task: Option<TaskRecord> = task.map(|t| dec("tasks", &t)).transpose()?;
            if let Some(r) = task_refusal(&grant, task.as_ref(), now) {
                return Ok(Err(r));
            }
            if let Err(why) = crate::ledger::register_tx(&tx, creds, now)? {
                return Ok(Err(RedeemRefusal::Revoked(why)));
            }
            tx.prepare_cached("UPDATE grants SET used_at = ?2, delivery = ?3 WHERE digest = ?1")?
                .execute(params![digest, to_i64(now), delivery])?;
            tx.prepare_cached("INSERT INTO tokens (jti, task_id, record) VALUES (?1, ?2, ?3)")?
                .execute(params![token.jti, token.task_id.as_str(), record])?;
            tx.commit()?;
            Ok(Ok(()))
        })
    }

    fn release_grant(
        &self,
        digest: &str,
        creds: &[baton_revocation::CredentialRecord],
        now: u64,
    ) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            let released = tx
                .prepare_cached(
                    "UPDATE grants SET used_at = NULL, delivery = NULL
                 WHERE digest = ?1 AND redelivered_at IS NULL",
                )?
                .execute(params![digest])?;
            if released == 0 {
                tx.commit()?;
                return Ok(());
            }
            let dead: Vec<baton_revocation::Revoked> = creds
                .iter()
                .map(|r| baton_revocation::Revoked {
                    id: r.id.clone(),
                    kind: r.kind,
                    expires_at: r.expires_at,
                })
                .collect();
            crate::ledger::mark_tx(&tx, &dead, "not delivered: audit log unavailable", now)?;
            tx.commit()?;
            Ok(())
        })
    }

    fn use_id_token(&self, key: &str, expires_at: u64, now: u64) -> Result<bool, StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            tx.prepare_cached("DELETE FROM used_id_tokens WHERE expires_at <= ?1")?
                .execute(params![to_i64(now)])?;
            let n = tx
                .prepare_cached(
                    "INSERT OR IGNORE INTO used_id_tokens (digest, expires_at) VALUES (?1, ?2)",
                )?
                .execute(params![key, to_i64(expires_at)])?;
            tx.commit()?;
            Ok(n == 1)
        })
    }

    fn rebind_token(&self, t: &TokenRecord, from_serial: &str) -> Result<bool, StoreError> {
        let record = enc("tokens", t)?;
        self.with(|c| {
            let n = c
                .prepare_cached(
                    "UPDATE tokens SET record = ?2
                     WHERE jti = ?1 AND json_extract(record, '$.cert_serial') = ?3",
                )?
                .execute(params![t.jti, record, from_serial])?;
            Ok(n == 1)
        })
    }

    fn get_token(&self, jti: &str) -> Result<Option<TokenRecord>, StoreError> {
        let row: Option<String> = self.with(|c| {
            Ok(
                c.prepare_cached("SELECT record FROM tokens WHERE jti = ?1")?
                    .query_row(params![jti], |r| r.get(0))
                    .optional()?,
            )
        })?;
        row.map(|s| dec("tokens", &s)).transpose()
    }

    fn report_seen(&self, report_id: &str) -> Result<Option<u64>, StoreError> {
        self.with(|c| {
            let idx: Option<i64> = c
                .prepare_cached("SELECT audit_index FROM tool_reports WHERE report_id = ?1")?
                .query_row(params![report_id], |r| r.get(0))
                .optional()?;
            Ok(idx.map(|i| i.max(0) as u64))
        })
    }

    fn latest_approval(&self, binding: &str) -> Result<Option<ApprovalState>, StoreError> {
        let row: Option<String> = self.with(|c| {
            Ok(c.prepare_cached(
                "SELECT record FROM approvals WHERE binding = ?1 ORDER BY rowid DESC LIMIT 1",
            )?
            .query_row(params![binding], |r| r.get(0))
            .optional()?)
        })?;
        row.map(|s| dec("approvals", &s)).transpose()
    }

    fn insert_approval(
        &self,
        binding: &str,
        a: &ApprovalState,
        latest: Option<&str>,
    ) -> Result<bool, StoreError> {
        let record = enc("approvals", a)?;
        self.with(|c| {
            // One statement: SQLite's single writer makes the check and the
            // insert one step.
            let n = c
                .prepare_cached(
                    "INSERT INTO approvals (id, binding, task, status, expires_at, record)
                     SELECT ?1, ?2, ?3, ?4, ?5, ?6
                     WHERE (SELECT id FROM approvals WHERE binding = ?2
                            ORDER BY rowid DESC LIMIT 1) IS ?7",
                )?
                .execute(params![
                    a.id,
                    binding,
                    a.task_id.to_string(),
                    a.status,
                    to_i64(a.expires_at),
                    record,
                    latest
                ])?;
            Ok(n == 1)
        })
    }

    fn get_approval(&self, id: &str) -> Result<Option<ApprovalState>, StoreError> {
        let row: Option<String> = self.with(|c| {
            Ok(
                c.prepare_cached("SELECT record FROM approvals WHERE id = ?1")?
                    .query_row(params![id], |r| r.get(0))
                    .optional()?,
            )
        })?;
        row.map(|s| dec("approvals", &s)).transpose()
    }

    fn transition_approval(
        &self,
        id: &str,
        from: &str,
        to: &ApprovalState,
    ) -> Result<bool, StoreError> {
        let record = enc("approvals", to)?;
        self.with(|c| {
            let n = c
                .prepare_cached(
                    "UPDATE approvals SET status = ?3, record = ?4 WHERE id = ?1 AND status = ?2",
                )?
                .execute(params![id, from, to.status, record])?;
            Ok(n == 1)
        })
    }

    fn record_report(&self, report_id: &str, index: u64) -> Result<(), StoreError> {
        self.record_reports(&[(report_id, index)])
    }

    fn record_reports(&self, reports: &[(&str, u64)]) -> Result<(), StoreError> {
        self.with(|c| {
            let tx = c.transaction()?;
            {
                let mut stmt = tx.prepare_cached(
                    "INSERT OR IGNORE INTO tool_reports (report_id, audit_index) VALUES (?1, ?2)",
                )?;
                for (id, index) in reports {
                    stmt.execute(params![id, to_i64(*index)])?;
                }
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn tokens_for_task(&self, task: &TaskId) -> Result<Vec<TokenRecord>, StoreError> {
        let rows: Vec<String> = self.with(|c| {
            let mut stmt =
                c.prepare_cached("SELECT record FROM tokens WHERE task_id = ?1 ORDER BY rowid")?;
            let rows = stmt.query_map(params![task.as_str()], |r| r.get(0))?;
            Ok(rows.collect::<Result<Vec<String>, _>>()?)
        })?;
        rows.iter().map(|s| dec("tokens", s)).collect()
    }
}
