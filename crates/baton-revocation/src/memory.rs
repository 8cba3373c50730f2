//! The embedded backend: the same semantics as Redis in one process, with a
//! broadcast of revocations for in-process followers.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use baton_core::TaskId;
use baton_verify::RevocationCheck;
use tokio::sync::broadcast;

use crate::{
    CredKind, CredentialRecord, Health, RevocationError, RevocationStore, Revoked, Target,
    system_now, validate_id, validate_log, validate_record,
};

/// Capacity of the broadcast channel; a follower that lags further gets
/// `RecvError::Lagged` and must treat everything as revoked until it has
/// re-read [`MemoryStore::revoked`].
const BROADCAST_CAPACITY: usize = 1024;

#[derive(Debug, Default)]
struct Inner {
    creds: HashMap<String, CredentialRecord>,
    by_task: HashMap<String, HashSet<String>>,
    by_agent: HashMap<String, HashSet<String>>,
    by_node: HashMap<String, HashSet<String>>,
    children: HashMap<String, HashSet<String>>,
    /// id -> (kind, expiry)
    revoked: HashMap<String, (CredKind, u64)>,
    /// task -> expiry of the tombstone
    revoked_tasks: HashMap<String, u64>,
    /// durable log name -> highest sequence published
    published: HashMap<String, u64>,
}

impl Inner {
    /// Drops everything expired at `now` (what Redis TTLs do by themselves).
    fn prune(&mut self, now: u64) {
        self.creds.retain(|_, r| r.expires_at > now);
        self.revoked.retain(|_, (_, e)| *e > now);
        self.revoked_tasks.retain(|_, e| *e > now);
        let creds = &self.creds;
        for index in [
            &mut self.by_task,
            &mut self.by_agent,
            &mut self.by_node,
            &mut self.children,
        ] {
            index.retain(|_, ids| {
                ids.retain(|id| creds.contains_key(id));
                !ids.is_empty()
            });
        }
    }
}

impl Inner {
    /// Marks published (or re-seeded) revocations; a task's entry also
    /// refuses later registrations in that task.
    fn mark(&mut self, live: &[Revoked]) {
        for r in live {
            self.revoked.insert(r.id.clone(), (r.kind, r.expires_at));
            if r.kind == CredKind::Task {
                let e = self.revoked_tasks.entry(r.id.clone()).or_insert(0);
                *e = (*e).max(r.expires_at);
            }
        }
    }

    /// Whether `rec` may be registered: not revoked itself, nor its parent
    /// or task.
    fn check(&self, rec: &CredentialRecord) -> Result<(), RevocationError> {
        if self.revoked.contains_key(&rec.id) {
            return Err(RevocationError::AlreadyRevoked { id: rec.id.clone() });
        }
        if let Some(p) = &rec.parent
            && (self.revoked.contains_key(p)
                || self
                    .creds
                    .get(p)
                    .and_then(|c| c.task.as_ref())
                    .is_some_and(|t| self.revoked_tasks.contains_key(t.as_str())))
        {
            return Err(RevocationError::ParentRevoked {
                id: rec.id.clone(),
                parent: p.clone(),
            });
        }
        if let Some(t) = &rec.task
            && self.revoked_tasks.contains_key(t.as_str())
        {
            return Err(RevocationError::TaskRevoked {
                id: rec.id.clone(),
                task: t.as_str().to_owned(),
            });
        }
        Ok(())
    }

    fn insert(&mut self, rec: &CredentialRecord) {
        let id = rec.id.clone();
        if let Some(t) = &rec.task {
            self.by_task
                .entry(t.as_str().to_owned())
                .or_default()
                .insert(id.clone());
        }
        if let Some(a) = &rec.agent {
            self.by_agent
                .entry(a.as_str().to_owned())
                .or_default()
                .insert(id.clone());
        }
        if let Some(n) = &rec.node {
            self.by_node
                .entry(n.as_str().to_owned())
                .or_default()
                .insert(id.clone());
        }
        if let Some(p) = &rec.parent {
            self.children
                .entry(p.clone())
                .or_default()
                .insert(id.clone());
        }
        self.creds.insert(id, rec.clone());
    }
}

/// In-memory [`RevocationStore`]; cheap to clone (shared state).
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    epoch: String,
    tx: broadcast::Sender<Vec<Revoked>>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        let (tx, _) = broadcast::channel(BROADCAST_CAPACITY);
        Self {
            inner: Arc::new(Mutex::new(Inner::default())),
            epoch: uuid::Uuid::new_v4().simple().to_string(),
            tx,
        }
    }

    /// Every revocation, as it happens (one message per `revoke` call).
    pub fn subscribe(&self) -> broadcast::Receiver<Vec<Revoked>> {
        self.tx.subscribe()
    }

    /// Every revoked id still live at `now` (for a follower's initial load
    /// and for export to the durable log).
    pub fn revoked(&self, now: u64) -> Vec<Revoked> {
        let mut g = self.lock();
        g.prune(now);
        g.revoked
            .iter()
            .map(|(id, (kind, e))| Revoked {
                id: id.clone(),
                kind: *kind,
                expires_at: *e,
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave `Inner` half-updated
        // in a way that un-revokes anything (revocations are inserts).
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl RevocationStore for MemoryStore {
    async fn register(&self, rec: &CredentialRecord, now: u64) -> Result<(), RevocationError> {
        self.register_many(std::slice::from_ref(rec), now).await
    }

    async fn register_many(
        &self,
        recs: &[CredentialRecord],
        now: u64,
    ) -> Result<(), RevocationError> {
        for rec in recs {
            validate_record(rec, now)?;
        }
        let mut g = self.lock();
        g.prune(now);
        for rec in recs {
            g.check(rec)?;
        }
        for rec in recs {
            g.insert(rec);
        }
        Ok(())
    }

    async fn revoke(
        &self,
        target: &Target,
        reason: &str,
        now: u64,
    ) -> Result<Vec<Revoked>, RevocationError> {
        let mut g = self.lock();
        g.prune(now);
        let empty = HashSet::new();
        let roots: Vec<String> = match target {
            Target::Credential(id) | Target::Subtree(id) => {
                validate_id(id)?;
                vec![id.clone()]
            }
            Target::Task(t) => g
                .by_task
                .get(t.as_str())
                .unwrap_or(&empty)
                .iter()
                .cloned()
                .collect(),
            Target::Agent(a) => g
                .by_agent
                .get(a.as_str())
                .unwrap_or(&empty)
                .iter()
                .cloned()
                .collect(),
            Target::Node(n) => g
                .by_node
                .get(n.as_str())
                .unwrap_or(&empty)
                .iter()
                .cloned()
                .collect(),
        };
        // Close over `parent` links: what was minted from a revoked
        // credential dies with it.
        let mut seen: HashSet<String> = HashSet::new();
        let mut out = Vec::new();
        let mut queue: Vec<String> = roots;
        while let Some(id) = queue.pop() {
            if !seen.insert(id.clone()) {
                continue;
            }
            let Some(rec) = g.creds.get(&id) else {
                continue;
            };
            out.push(Revoked {
                id: id.clone(),
                kind: rec.kind,
                expires_at: rec.expires_at,
            });
            if let Some(kids) = g.children.get(&id) {
                queue.extend(kids.iter().cloned());
            }
        }
        if out.is_empty() {
            return Err(RevocationError::Unknown {
                target: target.to_string(),
            });
        }
        for r in &out {
            g.revoked.insert(r.id.clone(), (r.kind, r.expires_at));
        }
        if let Target::Task(t) = target {
            let max = out.iter().map(|r| r.expires_at).max().unwrap_or(now);
            g.revoked_tasks.insert(t.as_str().to_owned(), max);
        }
        drop(g);
        tracing::info!(%target, reason, count = out.len(), "revoked");
        // No receiver is not an error: nobody follows in-process.
        let _ = self.tx.send(out.clone());
        Ok(out)
    }

    async fn is_revoked(&self, id: &str, now: u64) -> Result<bool, RevocationError> {
        let g = self.lock();
        Ok(g.revoked.get(id).is_some_and(|(_, e)| *e > now))
    }

    async fn seed(&self, revoked: &[Revoked], now: u64) -> Result<(), RevocationError> {
        for r in revoked {
            validate_id(&r.id)?;
        }
        let mut g = self.lock();
        let live: Vec<Revoked> = revoked
            .iter()
            .filter(|r| r.expires_at > now)
            .cloned()
            .collect();
        g.mark(&live);
        drop(g);
        if !live.is_empty() {
            let _ = self.tx.send(live);
        }
        Ok(())
    }

    async fn health(&self) -> Result<Health, RevocationError> {
        Ok(Health {
            epoch: self.epoch.clone(),
            empty_since_seed: false,
        })
    }

    async fn publish(
        &self,
        batch: &[Revoked],
        _reason: &str,
        log: &str,
        upto: u64,
        now: u64,
    ) -> Result<(), RevocationError> {
        validate_log(log)?;
        for r in batch {
            validate_id(&r.id)?;
        }
        let mut g = self.lock();
        let live: Vec<Revoked> = batch
            .iter()
            .filter(|r| r.expires_at > now)
            .cloned()
            .collect();
        g.mark(&live);
        let seen = g.published.entry(log.to_owned()).or_insert(0);
        *seen = (*seen).max(upto);
        drop(g);
        if !live.is_empty() {
            let _ = self.tx.send(live);
        }
        Ok(())
    }

    async fn published(&self, log: &str) -> Result<u64, RevocationError> {
        validate_log(log)?;
        Ok(self.lock().published.get(log).copied().unwrap_or(0))
    }
}

/// In-process verifiers (`baton dev`) can consult the store directly.
impl RevocationCheck for MemoryStore {
    fn is_revoked(&self, jti: &str, task: &TaskId) -> bool {
        let now = system_now();
        let g = self.lock();
        crate::is_denied(
            |id| g.revoked.get(id).is_some_and(|(_, e)| *e > now),
            jti,
            task,
        )
    }
}
