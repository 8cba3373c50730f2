//! The broker's decisions, independent of HTTP: who may attest, what a node
//! may have signed, what entries exist. Every function takes `now`.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_ca::Ca;
use baton_core::api::{
    AttestRequest, JoinTokenRequest, JoinTokenResponse, SignJwtRequest, SignJwtResponse,
    SignX509Request, SignX509Response, SignedSvid, SyncResponse,
};
use baton_core::{Entry, EntryId, NewEntry, Secret, SpiffeId, TrustDomain};
use baton_revocation::{CredKind, CredentialRecord};

use crate::store::{Datastore, JoinTokenRefusal, NodeRecord, StoreError};

/// The path prefix of Baton's own identities (the broker and the nodes):
/// no entry, hop target or task root may live under it.
pub const RESERVED_PREFIX: &str = "/baton";
/// Where node IDs live.
pub const NODE_PREFIX: &str = "/baton/node/";

/// Whether `id` is the trust domain's own ID or one of Baton's
/// infrastructure identities (`/baton`, `/baton/...`), which only the
/// broker itself issues.
pub fn is_infrastructure_id(id: &SpiffeId) -> bool {
    let path = id.path();
    id.is_trust_domain_id()
        || path == RESERVED_PREFIX
        || path
            .strip_prefix(RESERVED_PREFIX)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// Why a blocked agent gets nothing new.
pub fn blocked_message(b: &crate::store::AgentBlock) -> String {
    format!(
        "agent {} is blocked from new credentials ({}){}; `baton revoke unblock {}` lifts it",
        b.spiffe_id,
        b.reason,
        b.until
            .map(|u| format!(" until unix time {u}"))
            .unwrap_or_default(),
        b.spiffe_id
    )
}

pub use crate::error::BrokerError;
pub(crate) use crate::error::{random_bytes, random_hex, token_digest, unix};

/// Longest a join token may live.
pub const MAX_JOIN_TOKEN_TTL: Duration = Duration::from_secs(24 * 3600);
/// Most CSRs one sign-x509 call may carry.
pub const MAX_SIGN_BATCH: usize = 1000;

/// What was issued, handed to the [`IssuanceHook`] before the credential
/// leaves the broker.
#[derive(Debug, Clone)]
pub struct IssuedCredential {
    pub kind: CredentialKind,
    pub spiffe_id: SpiffeId,
    /// Node that asked for it (None for the node's own SVID at attestation).
    pub via_node: Option<SpiffeId>,
    /// SVID serial or JWT id.
    pub id: String,
    pub expires_at: u64,
}

impl IssuedCredential {
    /// What the revocation store keeps for it: indexed by its SPIFFE ID
    /// (so `revoke agent` reaches it) and by the node it was issued
    /// through (the node itself for an agent SVID), expiring with it.
    pub fn revocation_record(&self) -> CredentialRecord {
        CredentialRecord {
            id: self.id.clone(),
            kind: match self.kind {
                CredentialKind::WorkloadJwtSvid => CredKind::JwtSvid,
                CredentialKind::AgentX509Svid
                | CredentialKind::WorkloadX509Svid
                | CredentialKind::TaskX509Svid => CredKind::X509Svid,
            },
            task: None,
            agent: Some(self.spiffe_id.clone()),
            node: Some(
                self.via_node
                    .clone()
                    .unwrap_or_else(|| self.spiffe_id.clone()),
            ),
            parent: None,
            expires_at: self.expires_at,
        }
    }
}

/// A credential signed by the broker, with the records the revocation
/// store must accept before it is handed out (the HTTP layer registers
/// them; a failed registration refuses the request: fail closed).
#[derive(Debug)]
pub struct Issued<T> {
    pub value: T,
    pub records: Vec<CredentialRecord>,
}

/// An agent SVID signed but not handed out yet: register
/// [`PendingAgentSvid::record`], then [`Broker::finish_agent_svid`], which
/// burns the join token (attestation) and records the node.
#[derive(Debug)]
pub struct PendingAgentSvid {
    node_id: SpiffeId,
    issued: baton_ca::IssuedSvid,
    /// The join token's digest at attestation; `None` at renewal.
    token_digest: Option<String>,
    /// The agent SVID the node renewed with; `None` at attestation.
    renewed_from: Option<String>,
    now: SystemTime,
}

impl PendingAgentSvid {
    pub fn node_id(&self) -> &SpiffeId {
        &self.node_id
    }

    fn credential(&self) -> IssuedCredential {
        IssuedCredential {
            kind: CredentialKind::AgentX509Svid,
            spiffe_id: self.node_id.clone(),
            via_node: None,
            id: self.issued.serial_hex.clone(),
            expires_at: unix(self.issued.not_after),
        }
    }

    /// The revocation record of the agent SVID.
    pub fn record(&self) -> CredentialRecord {
        self.credential().revocation_record()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CredentialKind {
    AgentX509Svid,
    WorkloadX509Svid,
    WorkloadJwtSvid,
    /// A task X509-SVID minted at a redeem (its token shares its lifetime).
    TaskX509Svid,
}

/// The seam where the revocation service registers every credential. If it
/// fails, the credential is not handed out (fail closed).
pub trait IssuanceHook: Send + Sync + std::fmt::Debug {
    fn issued(&self, credential: &IssuedCredential) -> Result<(), String>;
}

/// The default hook: a debug log line per credential.
#[derive(Debug, Default)]
pub struct LogIssuance;

impl IssuanceHook for LogIssuance {
    fn issued(&self, c: &IssuedCredential) -> Result<(), String> {
        tracing::debug!(kind = ?c.kind, spiffe_id = %c.spiffe_id, id = %c.id, expires_at = c.expires_at, "issued");
        Ok(())
    }
}

/// Tunables of the broker's issuance.
#[derive(Debug, Clone)]
pub struct IssuancePolicy {
    pub agent_svid_ttl: Duration,
}

impl Default for IssuancePolicy {
    fn default() -> Self {
        Self {
            agent_svid_ttl: Duration::from_secs(3600),
        }
    }
}

/// A node whose mTLS certificate was verified by the listener and which is
/// attested and not banned here. Only [`Broker::authenticate_node`] builds it.
#[derive(Debug, Clone)]
pub struct AuthenticatedNode {
    id: SpiffeId,
    /// The agent SVID it presented (set when the route checked it).
    serial: Option<String>,
}

impl AuthenticatedNode {
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }
}

/// The broker's state and decisions.
#[derive(Debug)]
pub struct Broker {
    ca: Arc<Ca>,
    store: Arc<dyn Datastore>,
    hook: Arc<dyn IssuanceHook>,
    policy: IssuancePolicy,
    rotation: crate::rotation::RotationState,
    /// The second (unix) of the last shared-CA refresh a node's sync
    /// asked for: at most one a second, whatever nodes claim.
    synced_refresh_at: std::sync::atomic::AtomicU64,
}

impl Broker {
    pub fn new(
        ca: Arc<Ca>,
        store: Arc<dyn Datastore>,
        hook: Arc<dyn IssuanceHook>,
        policy: IssuancePolicy,
    ) -> Self {
        Self {
            ca,
            store,
            hook,
            policy,
            rotation: crate::rotation::RotationState::default(),
            synced_refresh_at: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// What rotation tracks: node syncs, who holds SVIDs of which authority.
    pub fn rotation(&self) -> &crate::rotation::RotationState {
        &self.rotation
    }

    /// The CA's rotation steps (`baton ca`, the schedule) over this
    /// broker's CA, datastore and rotation state.
    pub fn authorities(&self) -> crate::rotation::Authorities<'_> {
        crate::rotation::Authorities::new(&self.ca, self.store.as_ref(), &self.rotation)
    }

    /// Node administration (list, show, evict, ban, unban) over this
    /// broker's datastore and rotation state.
    pub fn nodes(&self) -> crate::nodes::Nodes<'_> {
        crate::nodes::Nodes::new(self.store.as_ref(), self.ca.trust_domain(), &self.rotation)
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        self.ca.trust_domain()
    }

    pub fn ca(&self) -> &Ca {
        &self.ca
    }

    pub fn store(&self) -> &dyn Datastore {
        self.store.as_ref()
    }

    /// The SPIFFE ID the broker's own listener presents.
    pub fn broker_id(&self) -> Result<SpiffeId, BrokerError> {
        self.trust_domain()
            .id("/baton/broker")
            .map_err(|e| BrokerError::bad("trust_domain", e.to_string()))
    }

    pub(crate) fn record(&self, c: IssuedCredential) -> Result<(), BrokerError> {
        self.hook.issued(&c).map_err(BrokerError::Hook)?;
        let (kind, holder) = match c.kind {
            CredentialKind::AgentX509Svid => ("x509", "agent"),
            CredentialKind::WorkloadX509Svid => ("x509", "workload"),
            CredentialKind::WorkloadJwtSvid => ("jwt", "workload"),
            CredentialKind::TaskX509Svid => ("x509", "task"),
        };
        baton_ops::metrics().issued(kind, holder);
        Ok(())
    }

    // ---- admin ----

    pub fn generate_join_token(
        &self,
        req: &JoinTokenRequest,
        now: SystemTime,
    ) -> Result<JoinTokenResponse, BrokerError> {
        let ttl = Duration::from_secs(req.ttl_secs);
        if ttl.is_zero() || ttl > MAX_JOIN_TOKEN_TTL {
            return Err(BrokerError::bad(
                "ttl_secs",
                format!(
                    "join token TTL must be between 1 and {} seconds, got {}",
                    MAX_JOIN_TOKEN_TTL.as_secs(),
                    req.ttl_secs
                ),
            ));
        }
        let node_id = match &req.node_id {
            Some(raw) => {
                let id = SpiffeId::parse(raw)
                    .map_err(|e| BrokerError::bad("node_id", format!("node_id: {e}")))?;
                if id.trust_domain() != self.trust_domain() {
                    return Err(BrokerError::bad(
                        "node_id",
                        format!(
                            "node_id {id} is not in this broker's trust domain {}",
                            self.trust_domain()
                        ),
                    ));
                }
                if !self.is_node_id(&id) {
                    return Err(BrokerError::bad(
                        "node_id",
                        format!(
                            "node_id {id} must be of the form spiffe://{}{NODE_PREFIX}<name>",
                            self.trust_domain()
                        ),
                    ));
                }
                if id.is_trust_domain_id() || id == self.broker_id()? {
                    return Err(BrokerError::bad(
                        "node_id",
                        format!("node_id {id} is reserved"),
                    ));
                }
                self.refuse_banned(&id)?;
                id
            }
            None => self
                .trust_domain()
                .id(&format!("/baton/node/{}", random_hex::<8>()?))
                .map_err(|e| BrokerError::bad("node_id", e.to_string()))?,
        };
        let token = random_hex::<32>()?;
        let expires_at = unix(now) + ttl.as_secs();
        self.store
            .insert_join_token(&token_digest(&token), &node_id, expires_at)?;
        tracing::info!(node_id = %node_id, expires_at, "join token generated");
        Ok(JoinTokenResponse {
            token: Secret::new(token),
            expires_at,
            node_id,
        })
    }

    pub fn create_entry(&self, new: &NewEntry) -> Result<Entry, BrokerError> {
        let entry = new.validate().map_err(|e| {
            let field = match &e {
                baton_core::EntryError::SpiffeId { field, .. } => Some(*field),
                baton_core::EntryError::TrustDomainIdForWorkload => Some("spiffe_id"),
                baton_core::EntryError::TrustDomainMismatch { .. } => Some("parent_id"),
                baton_core::EntryError::NoSelectors
                | baton_core::EntryError::Selector(_)
                | baton_core::EntryError::NoCredentialSelector { .. } => Some("selectors"),
                baton_core::EntryError::Ttl { field, .. } => Some(*field),
                baton_core::EntryError::DnsName { .. } => Some("dns_names"),
                baton_core::EntryError::BadId { .. } => Some("id"),
            };
            BrokerError::BadRequest {
                field,
                message: e.to_string(),
            }
        })?;
        if entry.spiffe_id.trust_domain() != self.trust_domain() {
            return Err(BrokerError::bad(
                "spiffe_id",
                format!(
                    "spiffe_id {} is not in this broker's trust domain {}",
                    entry.spiffe_id,
                    self.trust_domain()
                ),
            ));
        }
        if is_infrastructure_id(&entry.spiffe_id) {
            return Err(BrokerError::bad(
                "spiffe_id",
                format!(
                    "spiffe_id {} is reserved: {RESERVED_PREFIX}/ names the broker and the nodes, never a workload",
                    entry.spiffe_id
                ),
            ));
        }
        match self.store.create_entry(&entry) {
            Ok(()) => {}
            Err(StoreError::DuplicateEntry(id)) => {
                return Err(BrokerError::Conflict(format!(
                    "an entry with the same spiffe_id, parent_id and selectors already exists: {id}"
                )));
            }
            Err(e) => return Err(e.into()),
        }
        tracing::info!(id = %entry.id, spiffe_id = %entry.spiffe_id, parent_id = %entry.parent_id, "entry created");
        Ok(entry)
    }

    pub fn get_entry(&self, raw_id: &str) -> Result<Entry, BrokerError> {
        let id = EntryId::parse(raw_id).map_err(|e| BrokerError::bad("id", e.to_string()))?;
        self.store
            .get_entry(&id)?
            .ok_or_else(|| BrokerError::NotFound(format!("no entry with id {id}")))
    }

    pub fn delete_entry(&self, raw_id: &str) -> Result<(), BrokerError> {
        let id = EntryId::parse(raw_id).map_err(|e| BrokerError::bad("id", e.to_string()))?;
        if self.store.delete_entry(&id)? {
            tracing::info!(id = %id, "entry deleted");
            Ok(())
        } else {
            Err(BrokerError::NotFound(format!("no entry with id {id}")))
        }
    }

    pub fn list_entries(&self) -> Result<Vec<Entry>, BrokerError> {
        Ok(self.store.list_entries()?)
    }

    // ---- nodes ----

    /// Attests a node by join token: checks the token (without using it)
    /// and signs its agent SVID. Nothing is stored until
    /// [`Broker::finish_agent_svid`].
    pub(crate) fn attest(
        &self,
        req: &AttestRequest,
        now: SystemTime,
        revoked: impl FnOnce(&str) -> Result<bool, StoreError>,
    ) -> Result<PendingAgentSvid, BrokerError> {
        let token = req.join_token.expose();
        if token.is_empty() {
            return Err(BrokerError::bad("join_token", "join_token is empty"));
        }
        // Look first, sign, register, then burn: a bad CSR or a revocation
        // store that is down must not cost the operator a token, and two
        // racing attestations cannot both win the burn.
        let digest = token_digest(token);
        let node_id = self
            .store
            .check_join_token(&digest, unix(now))?
            .map_err(join_token_refused)?;
        // Checked again at use, as entries are: a row no broker wrote (a
        // database writer's) must not make a broker's or a workload's
        // certificate out of a join token.
        if !self.is_node_id(&node_id) {
            tracing::error!(node_id = %node_id, "a join token in the datastore names no node id; refused");
            return Err(BrokerError::Unauthenticated(
                "node attestation refused: the join token names an identity that is not a node's; generate a new one with `baton token generate`".into(),
            ));
        }
        self.refuse_banned(&node_id)?;
        // A node whose agent SVID still works is not attested over: a join
        // token generated for it (leaked, or left over) would otherwise
        // replace the running daemon's identity with its holder's. The
        // operator evicts it first; a node whose SVID expired or was
        // revoked attests again.
        if let Some(n) = self.store.get_node(&node_id)?
            && !n.serial_hex.is_empty()
            && n.svid_not_after > unix(now)
            && !revoked(&n.serial_hex)?
        {
            tracing::warn!(node_id = %node_id, "attestation over a live node refused");
            return Err(BrokerError::Forbidden {
                code: "node_attested",
                message: format!(
                    "node {node_id} is attested and its agent SVID (serial {}) is valid until {}; evict it first (`baton node evict {node_id}`) to attest it again",
                    n.serial_hex, n.svid_not_after
                ),
            });
        }
        let issued = self
            .ca
            .sign_x509_svid(&req.csr_der, &node_id, self.policy.agent_svid_ttl, &[], now)
            .map_err(csr_error)?;
        Ok(PendingAgentSvid {
            node_id,
            issued,
            token_digest: Some(digest),
            renewed_from: None,
            now,
        })
    }

    fn refuse_banned(&self, node_id: &SpiffeId) -> Result<(), BrokerError> {
        if let Some(n) = self.store.get_node(node_id)?
            && n.banned
        {
            tracing::warn!(node_id = %node_id, "attestation of a banned node refused");
            return Err(banned(node_id));
        }
        Ok(())
    }

    /// Hands out an agent SVID whose record the revocation store accepted:
    /// burns the join token (attestation) or checks the node is still
    /// attested and not banned (renewal), then records the node.
    pub(crate) fn finish_agent_svid(&self, p: PendingAgentSvid) -> Result<SignedSvid, BrokerError> {
        let credential = p.credential();
        let expires_at = credential.expires_at;
        let now = unix(p.now);
        self.record(credential)?;
        self.rotation.issued(
            crate::rotation::SlotKind::Agent,
            p.node_id.as_str(),
            &p.issued.authority_id,
            expires_at,
        );
        if let Some(digest) = &p.token_digest {
            let burned = self
                .store
                .consume_join_token(digest, now)?
                .map_err(join_token_refused)?;
            if burned != p.node_id {
                return Err(BrokerError::Conflict(
                    "join token changed during attestation".into(),
                ));
            }
            self.store.upsert_node(&NodeRecord {
                spiffe_id: p.node_id.clone(),
                serial_hex: p.issued.serial_hex,
                prev_serial_hex: None,
                svid_not_after: expires_at,
                attested_at: now,
                banned: false,
            })?;
            // A ban that raced this attestation wins (the upsert never
            // clears the flag).
            self.refuse_banned(&p.node_id)?;
            tracing::info!(node_id = %p.node_id, "node attested by join token");
        } else {
            // Only an attested, unbanned node's record is updated: an
            // eviction or ban since the request was authenticated wins.
            let from = p.renewed_from.as_deref().unwrap_or_default();
            if !self
                .store
                .update_node_svid(&p.node_id, from, &p.issued.serial_hex, expires_at)?
            {
                return Err(match self.store.get_node(&p.node_id)? {
                    None => not_a_node(&p.node_id),
                    Some(n) if n.banned => banned(&p.node_id),
                    Some(_) => BrokerError::Forbidden {
                        code: "agent_svid_superseded",
                        message: format!(
                            "node {} renewed with another agent SVID since this request was authenticated; use the newest agent SVID or attest again with a new join token",
                            p.node_id
                        ),
                    },
                });
            }
        }
        Ok(SignedSvid {
            spiffe_id: p.node_id,
            cert_chain_der: p.issued.cert_chain_der,
            expires_at,
        })
    }

    /// Turns the listener's verified peer into an attested node, or refuses.
    pub fn authenticate_node(
        &self,
        peer: Option<&SpiffeId>,
    ) -> Result<AuthenticatedNode, BrokerError> {
        let Some(peer) = peer else {
            return Err(BrokerError::Unauthenticated(
                "this route needs a client certificate: connect with the node's agent SVID".into(),
            ));
        };
        match self.store.get_node(peer)? {
            Some(n) if n.banned => Err(banned(peer)),
            Some(_) => Ok(AuthenticatedNode {
                id: peer.clone(),
                serial: None,
            }),
            None => Err(not_a_node(peer)),
        }
    }

    /// [`Broker::authenticate_node`], plus: the certificate the node
    /// presented is not revoked (`revoked` answers for its serial; an
    /// unreadable certificate is refused). After an eviction and a new
    /// attestation, the node's old agent SVID stays refused.
    pub fn authenticate_node_svid(
        &self,
        peer: Option<&SpiffeId>,
        leaf_der: Option<&[u8]>,
        now: SystemTime,
        revoked: impl FnOnce(&str) -> Result<bool, StoreError>,
        retire: impl FnOnce(&[baton_revocation::Revoked]) -> Result<(), BrokerError>,
    ) -> Result<AuthenticatedNode, BrokerError> {
        let Some(peer) = peer else {
            return Err(BrokerError::Unauthenticated(
                "this route needs a client certificate: connect with the node's agent SVID".into(),
            ));
        };
        let record = match self.store.get_node(peer)? {
            Some(n) if n.banned => return Err(banned(peer)),
            Some(n) => n,
            None => return Err(not_a_node(peer)),
        };
        let serial = leaf_der
            .and_then(|der| baton_ca::leaf_info(&[der.to_vec()]).ok())
            .map(|info| info.serial_hex)
            .ok_or_else(|| {
                BrokerError::Unauthenticated(
                    "this route needs a client certificate: connect with the node's agent SVID"
                        .into(),
                )
            })?;
        if revoked(&serial)? {
            return Err(BrokerError::Forbidden {
                code: "agent_svid_revoked",
                message: format!(
                    "the agent SVID (serial {serial}) of node {peer} is revoked; use the node's newest agent SVID, or attest again with a new join token"
                ),
            });
        }
        // A node is its current agent SVID (or the one it just renewed,
        // until the current one is presented once), not any certificate
        // that carries its name: a replaced SVID, or one from before an
        // eviction and a new attestation, is refused.
        if serial == record.serial_hex
            && let Some(prev) = &record.prev_serial_hex
        {
            // The node holds its renewed SVID: the one it replaced is
            // revoked (before it stops being accepted here, so a failure
            // leaves both as they were and the next request retries),
            // then forgotten. Revoked, it is refused wherever revocation
            // is checked, not only at this route. It expired no later
            // than its successor's lifetime from now.
            let ttl = self.policy.agent_svid_ttl.as_secs();
            retire(&[baton_revocation::Revoked {
                id: prev.clone(),
                kind: CredKind::X509Svid,
                expires_at: record.svid_not_after.max(unix(now).saturating_add(ttl)),
            }])?;
            self.store.settle_node_svid(peer, &serial)?;
        } else if serial != record.serial_hex && record.prev_serial_hex.as_deref() != Some(&serial)
        {
            return Err(BrokerError::Forbidden {
                code: "agent_svid_superseded",
                message: format!(
                    "the agent SVID (serial {serial}) is not node {peer}'s current one; use the newest agent SVID or attest again with a new join token"
                ),
            });
        }
        Ok(AuthenticatedNode {
            id: peer.clone(),
            serial: Some(serial),
        })
    }

    /// Signs a renewed agent SVID; hand it out with
    /// [`Broker::finish_agent_svid`] once its record is registered.
    pub(crate) fn renew(
        &self,
        node: &AuthenticatedNode,
        csr: &[u8],
        now: SystemTime,
    ) -> Result<PendingAgentSvid, BrokerError> {
        let issued = self
            .ca
            .sign_x509_svid(csr, &node.id, self.policy.agent_svid_ttl, &[], now)
            .map_err(csr_error)?;
        let Some(from) = node.serial.clone() else {
            return Err(BrokerError::Unauthenticated(
                "renewal needs the node's agent SVID as the client certificate".into(),
            ));
        };
        Ok(PendingAgentSvid {
            node_id: node.id.clone(),
            issued,
            token_digest: None,
            renewed_from: Some(from),
            now,
        })
    }

    /// Reads the steps other brokers of a shared CA took; a change reaches
    /// this broker's listener, verifiers and agents as its own steps do. A
    /// read that fails keeps the CA in force and is logged.
    /// Why a client certificate the TLS layer verified when its connection
    /// opened is no longer good for a request on that connection: it has
    /// expired since, or its signing authority left the bundle or was
    /// revoked (a rotation step). `Ok` when it is still trusted.
    pub fn leaf_authority_problem(&self, leaf: &[u8], now: SystemTime) -> Result<(), String> {
        let info =
            baton_ca::leaf_info(&[leaf.to_vec()]).map_err(|e| format!("it cannot be read: {e}"))?;
        if info.not_after <= now {
            return Err(format!(
                "it expired at {} (unix seconds)",
                info.not_after
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            ));
        }
        let signer = info
            .authority_id
            .ok_or_else(|| "it names no signing authority".to_owned())?;
        let now = now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        match self
            .ca
            .authorities()
            .into_iter()
            .find(|a| a.kind == baton_ca::AuthorityKind::X509 && a.id == signer)
        {
            None => Err(format!(
                "its authority {signer} is no longer in the trust bundle"
            )),
            Some(a) if a.state == baton_ca::AuthorityState::Revoked => {
                Err(format!("its authority {signer} was revoked"))
            }
            Some(a) if a.not_after <= now => Err(format!("its authority {signer} has expired")),
            Some(_) => Ok(()),
        }
    }

    pub fn follow_shared_ca(&self) {
        match self.ca.refresh() {
            Ok(true) => self.rotation.notify(),
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read the shared CA"),
        }
    }

    /// Whether `id` can name a node: in this trust domain, under
    /// [`NODE_PREFIX`], with a name after it.
    pub(crate) fn is_node_id(&self, id: &SpiffeId) -> bool {
        id.trust_domain() == self.trust_domain()
            && id.path().starts_with(NODE_PREFIX)
            && id.path().len() > NODE_PREFIX.len()
    }

    /// What `node` needs to serve its workloads. `applied` is the bundle
    /// sequence the node reports having applied (taints included), which
    /// tells a JWT key's taint which agents may still serve its tokens.
    pub fn sync(
        &self,
        node: &AuthenticatedNode,
        applied: Option<u64>,
        now: SystemTime,
    ) -> Result<SyncResponse, BrokerError> {
        // A node that applied a newer bundle than this broker's CA holds
        // synced with another broker of a shared CA that stepped first:
        // follow the shared journal now rather than at the next refresh,
        // or the node refuses this answer as a rolled-back one.
        if applied.is_some_and(|a| a > self.ca.sequence())
            && self
                .synced_refresh_at
                .swap(unix(now), std::sync::atomic::Ordering::Relaxed)
                != unix(now)
        {
            self.follow_shared_ca();
        }
        // A blocked agent's entries are withheld: the node daemon drops
        // their SVIDs and stops serving them on the Workload API.
        let blocked = self.store.agent_blocks(unix(now))?;
        let mut entries = self.store.list_entries_by_parent(&node.id)?;
        entries.retain(|e| !blocked.iter().any(|b| b.spiffe_id == e.spiffe_id));
        // Entries no SVID is signed for (stored before entries had to pin a
        // uid or gid, or under a reserved id: see `entitled_entry`) are
        // withheld too: a node daemon signs its entries in one batch, which
        // one of them would make refused whole, every round, until every
        // SVID of the node expired.
        entries.retain(|e| {
            let signable = baton_core::selector::binds_credential(&e.selectors)
                && !is_infrastructure_id(&e.spiffe_id);
            if !signable {
                tracing::warn!(entry = %e.id, spiffe_id = %e.spiffe_id, node = %node.id, "an entry no SVID is signed for is withheld from its node; recreate it with a unix:uid or unix:gid selector, outside /baton/");
            }
            signable
        });
        let (bundle, tainted) = self.ca.bundle_with_taint();
        // A node cannot claim a bundle newer than any this CA has made.
        let applied = applied.map(|a| a.min(self.ca.sequence()));
        let resp = SyncResponse {
            entries,
            bundle: bundle.to_spiffe_json(),
            tainted,
        };
        if self.rotation.synced(&node.id, unix(now), applied)
            && let Err(e) = self.store.record_node_sync(&node.id, unix(now), applied)
        {
            // The propagation check of another broker then waits longer;
            // the sync itself is answered.
            tracing::warn!(error = %e, node = %node.id, "cannot share the node's sync with the other brokers");
        }
        Ok(resp)
    }

    /// Refuses new credentials for an agent an operator blocked.
    pub fn refuse_blocked(&self, id: &SpiffeId, now: u64) -> Result<(), BrokerError> {
        match self.store.agent_block(id, now)? {
            None => Ok(()),
            Some(b) => Err(BrokerError::Forbidden {
                code: "agent_blocked",
                message: blocked_message(&b),
            }),
        }
    }

    fn entitled_entry(
        &self,
        node: &AuthenticatedNode,
        id: &EntryId,
        now: u64,
    ) -> Result<Entry, BrokerError> {
        match self.store.get_entry(id)? {
            Some(e) if e.parent_id == node.id => {
                // An entry stored before entries had to pin a uid or gid
                // names only an executable, which any local process can
                // exec: no SVID for it, whatever node daemon asks.
                if !baton_core::selector::binds_credential(&e.selectors) {
                    return Err(BrokerError::Forbidden {
                        code: "entry_unbound",
                        message: format!(
                            "entry {id} ({}) names no unix:uid or unix:gid selector; recreate it with one",
                            e.spiffe_id
                        ),
                    });
                }
                // Likewise an entry stored under `/baton/` before those
                // ids were reserved: a workload must never carry the
                // broker's or a node's name.
                if is_infrastructure_id(&e.spiffe_id) {
                    return Err(BrokerError::Forbidden {
                        code: "reserved_id",
                        message: format!(
                            "entry {id} names {}, an id reserved for Baton's own infrastructure; delete it",
                            e.spiffe_id
                        ),
                    });
                }
                self.refuse_blocked(&e.spiffe_id, now)?;
                Ok(e)
            }
            Some(e) => Err(BrokerError::Forbidden {
                code: "not_entitled",
                message: format!(
                    "node {} is not entitled to entry {id} ({}): its parent is {}",
                    node.id, e.spiffe_id, e.parent_id
                ),
            }),
            None => Err(BrokerError::Forbidden {
                code: "not_entitled",
                message: format!(
                    "node {} is not entitled to entry {id}: no such entry",
                    node.id
                ),
            }),
        }
    }

    /// Signs a batch of workload CSRs. All-or-nothing: one unentitled or bad
    /// item refuses the whole batch, so a node cannot probe by partial answers.
    pub(crate) fn sign_x509(
        &self,
        node: &AuthenticatedNode,
        req: &SignX509Request,
        now: SystemTime,
    ) -> Result<Issued<SignX509Response>, BrokerError> {
        if req.items.len() > MAX_SIGN_BATCH {
            return Err(BrokerError::bad(
                "items",
                format!(
                    "at most {MAX_SIGN_BATCH} CSRs per call, got {}",
                    req.items.len()
                ),
            ));
        }
        // Each entry looked up (and its block checked) once per batch: a
        // node renewing one workload's SVIDs names the same entry 100 times.
        let mut looked_up: std::collections::HashMap<&EntryId, Entry> =
            std::collections::HashMap::new();
        let mut entries = Vec::with_capacity(req.items.len());
        for item in &req.items {
            let entry = match looked_up.get(&item.entry_id) {
                Some(e) => e.clone(),
                None => {
                    let e = self.entitled_entry(node, &item.entry_id, unix(now))?;
                    looked_up.insert(&item.entry_id, e.clone());
                    e
                }
            };
            entries.push(entry);
        }
        let mut svids = Vec::with_capacity(entries.len());
        let mut records = Vec::with_capacity(entries.len());
        for (item, entry) in req.items.iter().zip(&entries) {
            let issued = self
                .ca
                .sign_x509_svid(
                    &item.csr_der,
                    &entry.spiffe_id,
                    Duration::from_secs(entry.x509_ttl_secs),
                    &entry.dns_names,
                    now,
                )
                .map_err(csr_error)?;
            let expires_at = unix(issued.not_after);
            self.rotation.issued(
                crate::rotation::SlotKind::Workload,
                &format!("{}:{}", node.id, item.entry_id),
                &issued.authority_id,
                expires_at,
            );
            let credential = IssuedCredential {
                kind: CredentialKind::WorkloadX509Svid,
                spiffe_id: entry.spiffe_id.clone(),
                via_node: Some(node.id.clone()),
                id: issued.serial_hex,
                expires_at,
            };
            records.push(credential.revocation_record());
            self.record(credential)?;
            svids.push(SignedSvid {
                spiffe_id: entry.spiffe_id.clone(),
                cert_chain_der: issued.cert_chain_der,
                expires_at,
            });
        }
        Ok(Issued {
            value: SignX509Response { svids },
            records,
        })
    }

    pub(crate) fn sign_jwt(
        &self,
        node: &AuthenticatedNode,
        req: &SignJwtRequest,
        now: SystemTime,
    ) -> Result<Issued<SignJwtResponse>, BrokerError> {
        if req.audience.is_empty() || req.audience.iter().any(String::is_empty) {
            return Err(BrokerError::bad(
                "audience",
                "audience must list at least one non-empty value",
            ));
        }
        let entry = self.entitled_entry(node, &req.entry_id, unix(now))?;
        let (token, exp) = self.ca.sign_jwt_svid(
            &entry.spiffe_id,
            &req.audience,
            Duration::from_secs(entry.jwt_ttl_secs),
            now,
        )?;
        let expires_at = unix(exp);
        if let Some(kid) = baton_ca::jwt::header_kid(token.expose()) {
            self.rotation
                .jwt_issued(&node.id, &kid, expires_at, unix(now));
        }
        let credential = IssuedCredential {
            kind: CredentialKind::WorkloadJwtSvid,
            spiffe_id: entry.spiffe_id.clone(),
            via_node: Some(node.id.clone()),
            id: token_digest(token.expose()),
            expires_at,
        };
        let records = vec![credential.revocation_record()];
        self.record(credential)?;
        Ok(Issued {
            value: SignJwtResponse { token, expires_at },
            records,
        })
    }
}

fn join_token_refused(refusal: JoinTokenRefusal) -> BrokerError {
    tracing::warn!(%refusal, "node attestation refused");
    BrokerError::Unauthenticated(format!(
        "node attestation refused: {refusal}; generate a new one with `baton token generate`"
    ))
}

pub(crate) fn banned(node_id: &SpiffeId) -> BrokerError {
    BrokerError::Forbidden {
        code: "node_banned",
        message: format!(
            "node {node_id} is banned: it cannot attest or get credentials; an operator can lift the ban with `baton node unban {node_id}`"
        ),
    }
}

/// The refusal of a peer that is not an attested node.
pub fn not_a_node(node_id: &SpiffeId) -> BrokerError {
    BrokerError::Forbidden {
        code: "not_a_node",
        message: format!(
            "{node_id} is not an attested node: only a node daemon's agent SVID may call the node routes (a workload or task credential never can); a node that was evicted must attest again with a new join token from its operator"
        ),
    }
}

fn csr_error(e: baton_ca::CaError) -> BrokerError {
    BrokerError::BadRequest {
        field: Some("csr_der"),
        message: format!("cannot sign this CSR: {e}"),
    }
}
