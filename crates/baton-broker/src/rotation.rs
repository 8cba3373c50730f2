//! CA rotation at the broker: the operator's steps (`baton ca show|prepare|
//! activate|taint|revoke`), the automatic schedule, and what the broker
//! tracks to make both safe:
//!
//! - which nodes have synced since a given time, so an authority is only
//!   activated once every live agent has the bundle that carries it (no
//!   relying party ever sees an SVID from an authority it does not trust);
//! - which live SVIDs each authority signed, per slot (a node's agent SVID,
//!   a node's SVID for one entry, the broker's serving certificate, a task
//!   credential), so a taint can report what still waits for re-issuance.
//!
//! Every change bumps a watch channel; `run` reacts by swapping the bundle
//! into the listeners and verifiers and re-issuing the serving certificate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::SystemTime;

use baton_ca::{AuthorityKind, AuthorityState, AuthorityStatus, RotationEvent};
use baton_core::SpiffeId;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::service::{Broker, BrokerError, unix};

/// What the broker tracks for rotation.
#[derive(Debug)]
pub struct RotationState {
    /// Node → unix seconds of its last sync.
    node_syncs: Mutex<HashMap<SpiffeId, u64>>,
    /// Slot → (authority id, expiry) of the latest SVID issued for it.
    ledger: Mutex<HashMap<String, (String, u64)>>,
    changed: watch::Sender<u64>,
}

impl Default for RotationState {
    fn default() -> Self {
        Self {
            node_syncs: Mutex::new(HashMap::new()),
            ledger: Mutex::new(HashMap::new()),
            changed: watch::Sender::new(0),
        }
    }
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
    pub fn synced(&self, node: &SpiffeId, now: u64) {
        let mut m = self.node_syncs.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(node.clone(), now);
    }

    fn last_sync(&self, node: &SpiffeId) -> Option<u64> {
        let m = self.node_syncs.lock().unwrap_or_else(|p| p.into_inner());
        m.get(node).copied()
    }

    /// Records that `slot` now holds an SVID signed by `authority` until `exp`.
    pub fn issued(&self, kind: SlotKind, slot: &str, authority: &str, exp: u64) {
        let mut m = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        m.insert(
            format!("{}:{slot}", kind.prefix()),
            (authority.to_owned(), exp),
        );
    }

    /// Forgets `slot` (its SVID was replaced under another slot).
    pub fn forget(&self, kind: SlotKind, slot: &str) {
        let mut m = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
        m.remove(&format!("{}:{slot}", kind.prefix()));
    }

    /// Live SVIDs signed by `authority`, per holder kind; forgets expired ones.
    pub fn pending(&self, authority: &str, now: u64) -> PendingReissue {
        let mut m = self.ledger.lock().unwrap_or_else(|p| p.into_inner());
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

    pub(crate) fn notify(&self) {
        self.changed.send_modify(|g| *g += 1);
    }
}

/// SVIDs signed by a tainted authority that are still live.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingReissue {
    pub agents: usize,
    pub workloads: usize,
    pub broker: usize,
    /// Task credentials cannot be re-issued in place; they end by `tasks_expire_by`.
    pub tasks: usize,
    pub tasks_expire_by: u64,
}

impl PendingReissue {
    /// What the node daemons and the broker still have to re-issue.
    pub fn reissuable(&self) -> usize {
        self.agents + self.workloads + self.broker
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

/// `POST /v1/admin/ca/taint` and `/revoke`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthorityRequest {
    pub id: String,
}

/// What a rotation step did.
#[derive(Debug, Clone, Serialize)]
pub struct RotationReply {
    pub events: Vec<RotationEvent>,
    pub bundle_sequence: u64,
}

fn ca_error(e: baton_ca::CaError) -> BrokerError {
    match e {
        baton_ca::CaError::UnknownAuthority { .. } => BrokerError::NotFound(e.to_string()),
        baton_ca::CaError::RotationRefused(_) => BrokerError::Conflict(e.to_string()),
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

impl Broker {
    /// Live, unbanned nodes that have not synced after `since`.
    pub fn nodes_lagging(
        &self,
        since: u64,
        now: u64,
    ) -> Result<(usize, Vec<SpiffeId>), BrokerError> {
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

    pub fn ca_status(&self, now: SystemTime) -> Result<CaStatus, BrokerError> {
        let t = unix(now);
        let authorities = self
            .ca()
            .authorities()
            .into_iter()
            .map(|status| AuthorityView {
                pending: (status.tainted && status.state != AuthorityState::Revoked)
                    .then(|| self.rotation().pending(&status.id, t)),
                status,
            })
            .collect();
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
        Ok(self.reply(vec![event]))
    }

    pub fn ca_revoke(&self, id: &str, now: SystemTime) -> Result<RotationReply, BrokerError> {
        check_id(id)?;
        let event = self.ca().revoke(id, now).map_err(ca_error)?;
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

/// The admin routes of CA rotation (behind the admin socket's uid check).
pub fn admin_routes(
    broker: std::sync::Arc<Broker>,
) -> impl warp::Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
+ Clone
+ Send
+ Sync
+ 'static {
    use crate::http::respond;
    use std::sync::Arc;
    use warp::Filter as _;
    let b = move || {
        let broker = broker.clone();
        warp::any().map(move || broker.clone())
    };
    let show = warp::path!("v1" / "admin" / "ca")
        .and(warp::get())
        .and(b())
        .and_then(
            |broker: Arc<Broker>| async move { respond(broker.ca_status(SystemTime::now())) },
        );
    let prepare = post_route(b(), "prepare", |broker, req: PrepareRequest, now| {
        broker.ca_prepare(&req, now)
    });
    let activate = post_route(b(), "activate", |broker, req: ActivateRequest, now| {
        broker.ca_activate(&req, now)
    });
    let taint = post_route(b(), "taint", |broker, req: AuthorityRequest, now| {
        broker.ca_taint(&req.id, now)
    });
    let revoke = post_route(b(), "revoke", |broker, req: AuthorityRequest, now| {
        broker.ca_revoke(&req.id, now)
    });
    show.or(prepare)
        .unify()
        .or(activate)
        .unify()
        .or(taint)
        .unify()
        .or(revoke)
        .unify()
}

/// `POST /v1/admin/ca/<step>`: a JSON `Req` handed to `step`.
fn post_route<Req, F>(
    broker: impl warp::Filter<Extract = (std::sync::Arc<Broker>,), Error = std::convert::Infallible>
    + Clone
    + Send
    + Sync
    + 'static,
    step: &'static str,
    handle: F,
) -> impl warp::Filter<Extract = (warp::reply::Response,), Error = warp::Rejection>
+ Clone
+ Send
+ Sync
+ 'static
where
    Req: serde::de::DeserializeOwned + Send + 'static,
    F: Fn(&Broker, Req, SystemTime) -> Result<RotationReply, BrokerError>
        + Clone
        + Send
        + Sync
        + 'static,
{
    use crate::http::{json_body, parse_body, respond};
    use warp::Filter as _;
    warp::path("v1")
        .and(warp::path("admin"))
        .and(warp::path("ca"))
        .and(warp::path(step))
        .and(warp::path::end())
        .and(warp::post())
        .and(broker)
        .and(json_body())
        .and_then(move |broker: std::sync::Arc<Broker>, body: bytes::Bytes| {
            let handle = handle.clone();
            async move {
                respond(
                    parse_body::<Req>(&body)
                        .and_then(|req| handle(&broker, req, SystemTime::now())),
                )
            }
        })
}
