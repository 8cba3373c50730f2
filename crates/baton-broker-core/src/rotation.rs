//! CA rotation at the broker: the operator's steps (`baton ca show|prepare|
//! activate|taint|revoke`), the automatic schedule, and what the broker
//! tracks to make both safe:
//!
//! - which nodes have synced since a given time, so an authority is only
//!   activated once every live agent has the bundle that carries it (no
//!   relying party ever sees an SVID from an authority it does not trust);
//! - which live SVIDs each authority signed, per slot (a node's agent SVID,
//!   a node's SVID for one entry, the broker's serving certificate, a task
//!   credential), so a taint can report what still waits for re-issuance;
//! - which JWT-SVIDs each JWT key signed for each node, and which bundle
//!   sequence each node reported it has applied, so a JWT key's taint can
//!   report which agents may still serve cached tokens of that key (an
//!   agent that applied the taint never serves them again). What a JWT key
//!   signed that is still live anywhere (JWT-SVIDs handed to workloads,
//!   delegation tokens) is counted by the CA ([`baton_ca::KeyUsage`]), which
//!   refuses to revoke the key before it all expired.
//!
//! All of this is in memory: after a restart the CA's persisted watermark
//! stands in for what a JWT key signed before (see `baton_ca::KeyUsage`),
//! and agents that have not reported applying the taint count as lagging.
//! Every change bumps a watch channel; `run` reacts by swapping the bundle
//! into the listeners and verifiers and re-issuing the serving certificate.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::SystemTime;

use baton_ca::Ca;
use baton_ca::{AuthorityKind, AuthorityState, AuthorityStatus, RotationAction, RotationEvent};
use baton_core::{SpiffeId, TrustDomain};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::error::{BrokerError, unix};
use crate::store::Datastore;

/// A node's latest sync.
#[derive(Debug, Clone, Copy)]
struct NodeSync {
    /// Unix seconds.
    at: u64,
    /// The bundle sequence the node said it had applied (taints included)
    /// before this sync; `None` from agents that do not report it.
    applied: Option<u64>,
    /// When this broker last wrote the node's sync to a shared store.
    shared_at: u64,
}

/// kid → node → expiry second → JWT-SVIDs minted for that node.
type JwtServed = HashMap<String, HashMap<SpiffeId, BTreeMap<u64, u64>>>;

/// What the broker tracks for rotation.
#[derive(Debug)]
pub struct RotationState {
    node_syncs: Mutex<HashMap<SpiffeId, NodeSync>>,
    /// Slot → (authority id, expiry) of the latest SVID issued for it.
    ledger: Mutex<HashMap<String, (String, u64)>>,
    jwt_served: Mutex<JwtServed>,
    /// JWT kid → the bundle sequence that first carried its taint.
    taint_sequence: Mutex<HashMap<String, u64>>,
    changed: watch::Sender<u64>,
}

impl Default for RotationState {
    fn default() -> Self {
        Self {
            node_syncs: Mutex::new(HashMap::new()),
            ledger: Mutex::new(HashMap::new()),
            jwt_served: Mutex::new(HashMap::new()),
            taint_sequence: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
        }
    }
}

/// How often (seconds) a broker writes a node's sync to a shared store
/// when the applied sequence did not move.
pub const SHARED_SYNC_EVERY: u64 = 10;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // These maps hold no invariant a panic could break half-way.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Which kind of holder a ledger slot belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    Agent,
    Workload,
    Broker,
    Task,
}

impl SlotKind {
    fn prefix(self) -> &'static str {
        match self {
            Self::Agent => "agent",
            Self::Workload => "workload",
            Self::Broker => "broker",
            Self::Task => "task",
        }
    }
}

impl RotationState {
    /// Records a sync of `node` at `now`; `applied` is the bundle sequence
    /// the node reported having applied (from its previous sync).
    ///
    /// True when the sync should be written to a store shared with other
    /// brokers: the applied sequence moved, or the last write is
    /// [`SHARED_SYNC_EVERY`] old.
    pub fn synced(&self, node: &SpiffeId, now: u64, applied: Option<u64>) -> bool {
        let mut m = lock(&self.node_syncs);
        let prev = m.get(node).map(|s| (s.applied, s.shared_at));
        let (prev_applied, shared_at) = prev.unwrap_or((None, 0));
        // A sequence only moves forward; a restarted agent reports none
        // until its first sync is applied (and has lost every cached
        // token with its memory).
        let applied = applied.max(prev_applied);
        let share = applied > prev_applied || now >= shared_at.saturating_add(SHARED_SYNC_EVERY);
        m.insert(
            node.clone(),
            NodeSync {
                at: now,
                applied,
                shared_at: if share { now } else { shared_at },
            },
        );
        share
    }

    /// Takes in the syncs other brokers served (from the shared store):
    /// each value only moves forward.
    pub fn merge_syncs(&self, syncs: Vec<(SpiffeId, u64, Option<u64>)>) {
        let mut m = lock(&self.node_syncs);
        for (node, at, applied) in syncs {
            let s = m.entry(node).or_insert(NodeSync {
                at: 0,
                applied: None,
                shared_at: 0,
            });
            s.at = s.at.max(at);
            s.applied = s.applied.max(applied);
        }
    }

    fn last_sync(&self, node: &SpiffeId) -> Option<u64> {
        lock(&self.node_syncs).get(node).map(|s| s.at)
    }

    fn applied(&self, node: &SpiffeId) -> Option<u64> {
        lock(&self.node_syncs).get(node).and_then(|s| s.applied)
    }

    /// Records that `node` was handed a JWT-SVID signed by `kid`, live until `exp`.
    pub fn jwt_issued(&self, node: &SpiffeId, kid: &str, exp: u64, now: u64) {
        let mut m = lock(&self.jwt_served);
        let per_node = match m.get_mut(kid) {
            Some(n) => n,
            None => m.entry(kid.to_owned()).or_default(),
        };
        let per_exp = match per_node.get_mut(node) {
            Some(e) => e,
            None => per_node.entry(node.clone()).or_default(),
        };
        // Bounded by one entry per second of the longest JWT-SVID lifetime.
        while let Some(e) = per_exp.first_entry()
            && *e.key() <= now
        {
            e.remove();
        }
        *per_exp.entry(exp).or_insert(0) += 1;
    }

    /// Records the bundle sequence that carries the taint of `kid`.
    pub fn jwt_tainted(&self, kid: &str, sequence: u64) {
        lock(&self.taint_sequence).insert(kid.to_owned(), sequence);
    }

    /// Forgets what was tracked for JWT key `kid` (revoked or pruned).
    pub fn forget_jwt_key(&self, kid: &str) {
        lock(&self.jwt_served).remove(kid);
        lock(&self.taint_sequence).remove(kid);
    }

    /// The bundle sequence an agent must have applied to have seen the
    /// taint of `kid`; after a restart (unknown) the current one.
    fn taint_sequence(&self, kid: &str, current: u64) -> u64 {
        lock(&self.taint_sequence)
            .get(kid)
            .copied()
            .unwrap_or(current)
    }

    /// Unexpired JWT-SVIDs signed by `kid` held by nodes that have not
    /// applied sequence `needed`: (tokens, nodes).
    fn jwt_unsynced(&self, kid: &str, needed: u64, now: u64) -> (usize, usize) {
        let served: Vec<(SpiffeId, u64)> = {
            let m = lock(&self.jwt_served);
            let Some(per_node) = m.get(kid) else {
                return (0, 0);
            };
            per_node
                .iter()
                .map(|(node, per_exp)| {
                    let live: u64 = per_exp.range(now.saturating_add(1)..).map(|(_, n)| n).sum();
                    (node.clone(), live)
                })
                .filter(|(_, live)| *live > 0)
                .collect()
        };
        let mut tokens = 0u64;
        let mut nodes = 0;
        for (node, live) in served {
            if self.applied(&node).is_none_or(|a| a < needed) {
                tokens += live;
                nodes += 1;
            }
        }
        (usize::try_from(tokens).unwrap_or(usize::MAX), nodes)
    }

    /// Records that `slot` now holds an SVID signed by `authority` until `exp`.
    pub fn issued(&self, kind: SlotKind, slot: &str, authority: &str, exp: u64) {
        let mut m = lock(&self.ledger);
        m.insert(
            format!("{}:{slot}", kind.prefix()),
            (authority.to_owned(), exp),
        );
    }

    /// Forgets `slot` (its SVID was replaced under another slot).
    pub fn forget(&self, kind: SlotKind, slot: &str) {
        let mut m = lock(&self.ledger);
        m.remove(&format!("{}:{slot}", kind.prefix()));
    }

    /// Forgets what node `node` held (it was evicted or banned, and what was
    /// issued through it revoked): its SVIDs will never be re-issued and no
    /// JWT-SVID it was handed can be served any more, so none of it keeps a
    /// taint pending.
    pub fn forget_node(&self, node: &SpiffeId) {
        let agent = format!("{}:{node}", SlotKind::Agent.prefix());
        let workloads = format!("{}:{node}:", SlotKind::Workload.prefix());
        lock(&self.ledger).retain(|slot, _| *slot != agent && !slot.starts_with(&workloads));
        for per_node in lock(&self.jwt_served).values_mut() {
            per_node.remove(node);
        }
    }

    /// Live SVIDs signed by `authority`, per holder kind; forgets expired ones.
    pub fn pending(&self, authority: &str, now: u64) -> PendingReissue {
        let mut m = lock(&self.ledger);
        m.retain(|_, (_, exp)| *exp > now);
        let mut p = PendingReissue::default();
        for (slot, (a, exp)) in m.iter() {
            if a != authority {
                continue;
            }
            let n = match slot.split(':').next() {
                Some("agent") => &mut p.agents,
                Some("workload") => &mut p.workloads,
                Some("broker") => &mut p.broker,
                _ => {
                    p.tasks_expire_by = p.tasks_expire_by.max(*exp);
                    &mut p.tasks
                }
            };
            *n += 1;
        }
        p
    }

    /// A receiver that sees every change of the CA's keys.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Tells every subscriber the CA's keys changed (e.g. a step another
    /// broker sharing the CA took).
    pub fn notify(&self) {
        self.changed.send_modify(|g| *g += 1);
    }
}

/// SVIDs and tokens signed by a tainted authority that are still live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReissue {
    pub agents: usize,
    pub workloads: usize,
    pub broker: usize,
    /// Task credentials cannot be re-issued in place; they end by `tasks_expire_by`.
    pub tasks: usize,
    pub tasks_expire_by: u64,
    /// JWT key: unexpired JWT-SVIDs it signed for agents that have not
    /// applied the taint yet (they may still serve them from their cache).
    #[serde(default)]
    pub jwt_svids_cached: usize,
    /// JWT key: agents that may still serve its tokens: those holding
    /// `jwt_svids_cached`, or, while the count is incomplete (the broker
    /// restarted), every live agent that has not applied the taint.
    #[serde(default)]
    pub jwt_agents_unsynced: usize,
    /// JWT key: unexpired JWT-SVIDs it signed, wherever they are.
    #[serde(default)]
    pub jwt_svids: usize,
    /// JWT key: unexpired delegation tokens it signed that were not
    /// renewed under another key.
    #[serde(default)]
    pub delegation_tokens: usize,
    /// JWT key: unix seconds until which a token it signed may be
    /// presented (its revocation is refused until then).
    #[serde(default)]
    pub tokens_expire_by: u64,
}

impl PendingReissue {
    /// What the node daemons and the broker still have to re-issue (for a
    /// JWT key: drop from their caches, so that new fetches get tokens of
    /// the active key).
    pub fn reissuable(&self) -> usize {
        self.agents + self.workloads + self.broker + self.jwt_svids_cached
    }

    /// Whether the agents are done: nothing re-issuable is left and no
    /// agent may still serve a cached token of the key.
    pub fn reissued(&self) -> bool {
        self.reissuable() == 0 && self.jwt_agents_unsynced == 0
    }

    /// JWT key: whether a token it signed may still be presented at `now`
    /// (then `baton ca revoke` is refused without `--force`).
    pub fn tokens_live(&self, now: u64) -> bool {
        self.jwt_svids > 0 || self.delegation_tokens > 0 || self.tokens_expire_by > now
    }
}

/// One authority as `baton ca show` prints it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuthorityView {
    #[serde(flatten)]
    pub status: AuthorityStatus,
    /// For tainted authorities: what still waits for re-issuance.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending: Option<PendingReissue>,
}

/// `GET /v1/admin/ca`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaStatus {
    pub trust_domain: String,
    pub bundle_sequence: u64,
    pub upstream: bool,
    pub authorities: Vec<AuthorityView>,
    /// Live attested nodes.
    pub nodes: usize,
    /// Nodes that have not synced since the newest prepared authority was
    /// published (activation waits for them).
    pub nodes_lagging: Vec<SpiffeId>,
}

/// `POST /v1/admin/ca/prepare`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    /// Default: both kinds.
    #[serde(default)]
    pub kinds: Vec<AuthorityKind>,
}

/// `POST /v1/admin/ca/activate`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActivateRequest {
    /// Default: every prepared authority.
    #[serde(default)]
    pub id: Option<String>,
    /// Activate even though some agents have not synced the new bundle.
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/admin/ca/taint`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityRequest {
    pub id: String,
}

/// `POST /v1/admin/ca/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevokeRequest {
    pub id: String,
    /// Revoke a JWT key although tokens it signed are still live: they
    /// fail everywhere at once.
    #[serde(default)]
    pub force: bool,
}

/// What a rotation step did.
#[derive(Debug, Clone, Serialize)]
pub struct RotationReply {
    pub events: Vec<RotationEvent>,
    pub bundle_sequence: u64,
}

/// The code of a refused `ca revoke` of a JWT key whose tokens are live.
pub const JWT_KEY_IN_USE: &str = "jwt_key_in_use";

fn ca_error(e: baton_ca::CaError) -> BrokerError {
    match e {
        baton_ca::CaError::UnknownAuthority { .. } => BrokerError::NotFound(e.to_string()),
        baton_ca::CaError::RotationRefused(_) => BrokerError::Conflict(e.to_string()),
        // The shared CA cannot be trusted or reached: the operator on the
        // admin socket is told why (a rolled-back or missing journal, a row
        // that does not open), not only "internal error".
        baton_ca::CaError::CorruptStore { .. } | baton_ca::CaError::SharedStore(_) => {
            BrokerError::Conflict(format!("the CA refused the step: {e}"))
        }
        baton_ca::CaError::KeyInUse { .. } => BrokerError::Forbidden {
            code: JWT_KEY_IN_USE,
            message: e.to_string(),
        },
        other => BrokerError::Ca(other),
    }
}

fn check_id(id: &str) -> Result<(), BrokerError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(BrokerError::BadRequest {
            field: Some("id"),
            message: format!(
                "id \"{}\" is not an authority id (hex subject key id or JWT kid); `baton ca show` lists them",
                id.escape_debug()
            ),
        })
    }
}

/// The CA's rotation steps and the views they need, over one broker's CA,
/// datastore and rotation state: what `baton ca` and the schedule drive.
/// [`crate::Broker::authorities`] makes one; it holds nothing of its own.
#[derive(Debug, Clone, Copy)]
pub struct Authorities<'a> {
    ca: &'a Ca,
    store: &'a dyn Datastore,
    state: &'a RotationState,
}

impl<'a> Authorities<'a> {
    pub fn new(ca: &'a Ca, store: &'a dyn Datastore, state: &'a RotationState) -> Self {
        Self { ca, store, state }
    }

    fn ca(&self) -> &'a Ca {
        self.ca
    }

    fn store(&self) -> &'a dyn Datastore {
        self.store
    }

    fn rotation(&self) -> &'a RotationState {
        self.state
    }

    fn trust_domain(&self) -> &'a TrustDomain {
        self.ca.trust_domain()
    }

    /// Live, unbanned nodes that have not synced after `since` (at this
    /// broker or, with a shared store, at any).
    pub fn nodes_lagging(
        &self,
        since: u64,
        now: u64,
    ) -> Result<(usize, Vec<SpiffeId>), BrokerError> {
        self.rotation().merge_syncs(self.store().node_syncs()?);
        let mut live = 0;
        let mut lagging = Vec::new();
        for n in self.store().list_nodes()? {
            if n.banned || n.svid_not_after <= now {
                continue;
            }
            live += 1;
            if self
                .rotation()
                .last_sync(&n.spiffe_id)
                .is_none_or(|t| t <= since)
            {
                lagging.push(n.spiffe_id);
            }
        }
        Ok((live, lagging))
    }

    fn newest_prepared(&self) -> Option<u64> {
        self.ca()
            .authorities()
            .iter()
            .filter(|a| a.state == AuthorityState::Prepared)
            .map(|a| a.created_at)
            .max()
    }

    /// What still waits for re-issuance (and, for a JWT key, for expiry)
    /// under tainted authority `status`.
    fn reissue_pending(
        &self,
        status: &AuthorityStatus,
        now: SystemTime,
    ) -> Result<PendingReissue, BrokerError> {
        let t = unix(now);
        let mut p = self.rotation().pending(&status.id, t);
        if status.kind != AuthorityKind::Jwt {
            return Ok(p);
        }
        let usage = self.ca().jwt_key_usage(&status.id, now);
        p.jwt_svids = usize::try_from(usage.jwt_svids).unwrap_or(usize::MAX);
        p.delegation_tokens = usize::try_from(usage.delegation_tokens).unwrap_or(usize::MAX);
        p.tokens_expire_by = if usage.in_use(t) { usage.until() } else { 0 };
        if !usage.in_use(t) {
            // Nothing of it is live: no agent can serve anything of it.
            return Ok(p);
        }
        self.rotation().merge_syncs(self.store().node_syncs()?);
        let needed = self
            .rotation()
            .taint_sequence(&status.id, self.ca().sequence());
        let (tokens, nodes) = self.rotation().jwt_unsynced(&status.id, needed, t);
        p.jwt_svids_cached = tokens;
        p.jwt_agents_unsynced = nodes;
        if usage.untracked_until > t {
            // Tokens from before a restart are not attributed to nodes:
            // wait for every live agent to apply the taint.
            let mut lagging = 0;
            for n in self.store().list_nodes()? {
                if n.banned || n.svid_not_after <= t {
                    continue;
                }
                if self
                    .rotation()
                    .applied(&n.spiffe_id)
                    .is_none_or(|a| a < needed)
                {
                    lagging += 1;
                }
            }
            p.jwt_agents_unsynced = p.jwt_agents_unsynced.max(lagging);
        }
        Ok(p)
    }

    pub fn ca_status(&self, now: SystemTime) -> Result<CaStatus, BrokerError> {
        // With a shared CA, what the other brokers did is shown too.
        if self.ca().refresh().map_err(ca_error)? {
            self.rotation().notify();
        }
        let t = unix(now);
        let mut authorities = Vec::new();
        for status in self.ca().authorities() {
            let pending = if status.tainted && status.state != AuthorityState::Revoked {
                Some(self.reissue_pending(&status, now)?)
            } else {
                None
            };
            authorities.push(AuthorityView { pending, status });
        }
        let (nodes, nodes_lagging) = match self.newest_prepared() {
            Some(since) => self.nodes_lagging(since, t)?,
            None => (self.nodes_lagging(0, t)?.0, Vec::new()),
        };
        Ok(CaStatus {
            trust_domain: self.trust_domain().to_string(),
            bundle_sequence: self.ca().sequence(),
            upstream: self.ca().has_upstream(),
            authorities,
            nodes,
            nodes_lagging,
        })
    }

    fn reply(&self, events: Vec<RotationEvent>) -> RotationReply {
        for e in &events {
            tracing::info!(action = ?e.action, kind = %e.authority.kind, id = %e.authority.id, "CA rotation");
        }
        for e in &events {
            let a = &e.authority;
            if a.kind == AuthorityKind::Jwt
                && matches!(e.action, RotationAction::Revoked | RotationAction::Pruned)
            {
                self.rotation().forget_jwt_key(&a.id);
            }
        }
        if !events.is_empty() {
            self.rotation().notify();
        }
        RotationReply {
            events,
            bundle_sequence: self.ca().sequence(),
        }
    }

    pub fn ca_prepare(
        &self,
        req: &PrepareRequest,
        now: SystemTime,
    ) -> Result<RotationReply, BrokerError> {
        let kinds = if req.kinds.is_empty() {
            vec![AuthorityKind::X509, AuthorityKind::Jwt]
        } else {
            req.kinds.clone()
        };
        let events = self.ca().prepare(&kinds, now).map_err(ca_error)?;
        Ok(self.reply(events))
    }

    pub fn ca_activate(
        &self,
        req: &ActivateRequest,
        now: SystemTime,
    ) -> Result<RotationReply, BrokerError> {
        if let Some(id) = &req.id {
            check_id(id)?;
        }
        if !req.force {
            let since = match &req.id {
                Some(id) => self
                    .ca()
                    .authorities()
                    .into_iter()
                    .find(|a| &a.id == id)
                    .map(|a| a.created_at),
                None => self.newest_prepared(),
            };
            if let Some(since) = since {
                let (_, lagging) = self.nodes_lagging(since, unix(now))?;
                if !lagging.is_empty() {
                    let names: Vec<String> =
                        lagging.iter().take(5).map(ToString::to_string).collect();
                    return Err(BrokerError::Conflict(format!(
                        "refused: {} agent(s) have not synced the bundle that carries the prepared authority yet ({}{}); SVIDs it signs would fail there. Wait for their next sync (`baton ca show`), or pass --force",
                        lagging.len(),
                        names.join(", "),
                        if lagging.len() > 5 { ", ..." } else { "" }
                    )));
                }
            }
        }
        let events = self
            .ca()
            .activate(req.id.as_deref(), now)
            .map_err(ca_error)?;
        Ok(self.reply(events))
    }

    pub fn ca_taint(&self, id: &str, now: SystemTime) -> Result<RotationReply, BrokerError> {
        check_id(id)?;
        let event = self.ca().taint(id, now).map_err(ca_error)?;
        if event.authority.kind == AuthorityKind::Jwt {
            // The taint bumped the sequence: agents that report this one
            // (or a later one) applied it and drop the key's cached tokens.
            self.rotation().jwt_tainted(id, self.ca().sequence());
        }
        Ok(self.reply(vec![event]))
    }

    /// Revokes authority `id`. A JWT key is refused (`jwt_key_in_use`)
    /// while a token it signed may still be presented, unless `force`.
    pub fn ca_revoke(
        &self,
        id: &str,
        force: bool,
        now: SystemTime,
    ) -> Result<RotationReply, BrokerError> {
        check_id(id)?;
        let event = if force {
            let before = self.ca().jwt_key_usage(id, now);
            let event = self.ca().force_revoke(id, now).map_err(ca_error)?;
            if before.in_use(unix(now)) {
                tracing::warn!(
                    id,
                    jwt_svids = before.jwt_svids,
                    delegation_tokens = before.delegation_tokens,
                    live_until = before.until(),
                    "JWT key revoked with --force although tokens it signed are live: they now fail everywhere"
                );
            }
            event
        } else {
            self.ca().revoke(id, now).map_err(ca_error)?
        };
        Ok(self.reply(vec![event]))
    }

    /// One step of the automatic schedule.
    pub fn ca_scheduled_step(
        &self,
        schedule: &baton_ca::RotationSchedule,
        now: SystemTime,
    ) -> Result<RotationReply, BrokerError> {
        let t = unix(now);
        let propagated = |since: u64| {
            self.nodes_lagging(since, t)
                .is_ok_and(|(_, lagging)| lagging.is_empty())
        };
        let events = self
            .ca()
            .scheduled_step(schedule, &propagated, now)
            .map_err(ca_error)?;
        Ok(self.reply(events))
    }
}
