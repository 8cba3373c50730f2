//! Node administration: list, show, evict, ban, unban.
//!
//! Evicting a node forgets its attestation (it must attest again with a new
//! join token) and revokes, through the revocation store, everything issued
//! through it: its agent SVIDs, its workloads' X509- and JWT-SVIDs and the
//! task credentials redeemed through it. Banning does the same and also
//! refuses every later attestation of that node ID. Both fail closed and
//! change nothing when the revocation store cannot take the revocation.
//!
//! Order of an eviction: the node's record goes first (from then on every
//! request of the node is refused), then the revocation. An issuance that
//! raced it registered its records before re-checking the node (see
//! `requests::hand_out`), so it is either covered by the revocation or refused.

use baton_core::{SpiffeId, TrustDomain};
use baton_revocation::Target;
use serde::{Deserialize, Serialize};

use crate::error::BrokerError;
use crate::revocation::Revoker;
use crate::rotation::RotationState;
use crate::service::NODE_PREFIX;
use crate::store::{Datastore, NodeRecord};
use crate::tasks::TaskStore;

/// A node as operators see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeView {
    pub spiffe_id: SpiffeId,
    /// Unix seconds of its last attestation by join token.
    pub attested_at: u64,
    /// Serial (hex) of the newest agent SVID issued to it.
    pub agent_svid_serial: String,
    /// Unix seconds.
    pub agent_svid_expires_at: u64,
    pub banned: bool,
    /// Registration entries whose parent is this node.
    pub entries: usize,
}

/// The answer to evict, ban and unban.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeAction {
    pub node: SpiffeId,
    /// `evicted`, `banned` or `unbanned`.
    pub action: String,
    /// How many credentials the revocation covered.
    pub revoked: usize,
    /// Whether the revocation store has it yet (absent for `unbanned`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub propagation: Option<crate::revocation::Propagation>,
}

fn unknown(id: &SpiffeId) -> BrokerError {
    BrokerError::NotFound(format!(
        "no attested node {id}; `baton node list` shows the nodes this broker knows"
    ))
}

/// Node administration over one broker's datastore and rotation state
/// (which forgets an evicted node's syncs). [`crate::Broker::nodes`] makes
/// one; it holds nothing of its own.
#[derive(Debug, Clone, Copy)]
pub struct Nodes<'a> {
    store: &'a dyn Datastore,
    trust_domain: &'a TrustDomain,
    rotation: &'a RotationState,
}

impl<'a> Nodes<'a> {
    pub fn new(
        store: &'a dyn Datastore,
        trust_domain: &'a TrustDomain,
        rotation: &'a RotationState,
    ) -> Self {
        Self {
            store,
            trust_domain,
            rotation,
        }
    }

    fn store(&self) -> &'a dyn Datastore {
        self.store
    }

    fn trust_domain(&self) -> &'a TrustDomain {
        self.trust_domain
    }

    /// Parses an operator's node ID: a SPIFFE ID of this trust domain.
    pub fn parse_node_id(&self, raw: &str) -> Result<SpiffeId, BrokerError> {
        let bad = |message: String| BrokerError::BadRequest {
            field: Some("node_id"),
            message,
        };
        let id = SpiffeId::parse(raw).map_err(|e| {
            bad(format!(
                "node_id \"{}\" is not a SPIFFE ID ({e}); node IDs look like spiffe://{}/baton/node/<name>",
                raw.escape_debug(),
                self.trust_domain()
            ))
        })?;
        if !id.is_member_of(self.trust_domain()) {
            return Err(bad(format!(
                "node_id {id} is not in this broker's trust domain {}",
                self.trust_domain()
            )));
        }
        // A ban or eviction of an agent's ID would store a node row and
        // report the agent cut off while it goes on working: agents are
        // revoked with `revoke agent`.
        let name = id.path().strip_prefix(NODE_PREFIX).unwrap_or_default();
        if name.is_empty() {
            return Err(bad(format!(
                "node_id {id} names no node: node IDs look like spiffe://{}/baton/node/<name> (to cut off an agent, use `baton revoke agent`)",
                self.trust_domain()
            )));
        }
        Ok(id)
    }

    fn view(&self, n: NodeRecord) -> Result<NodeView, BrokerError> {
        let entries = self.store().list_entries_by_parent(&n.spiffe_id)?.len();
        Ok(NodeView {
            spiffe_id: n.spiffe_id,
            attested_at: n.attested_at,
            agent_svid_serial: n.serial_hex,
            agent_svid_expires_at: n.svid_not_after,
            banned: n.banned,
            entries,
        })
    }

    /// Every node with a record: attested or banned.
    pub fn list_node_views(&self) -> Result<Vec<NodeView>, BrokerError> {
        self.store()
            .list_nodes()?
            .into_iter()
            .map(|n| self.view(n))
            .collect()
    }

    pub fn node_view(&self, raw: &str) -> Result<NodeView, BrokerError> {
        let id = self.parse_node_id(raw)?;
        let n = self.store().get_node(&id)?.ok_or_else(|| unknown(&id))?;
        self.view(n)
    }

    /// Lifts a ban. The node's credentials were revoked by the ban, so it
    /// is not attested afterwards: it must attest again with a new token.
    pub fn unban_node(&self, raw: &str) -> Result<NodeAction, BrokerError> {
        let id = self.parse_node_id(raw)?;
        let n = self.store().get_node(&id)?.ok_or_else(|| unknown(&id))?;
        if !n.banned {
            return Err(BrokerError::Conflict(format!(
                "node {id} is not banned; nothing to lift"
            )));
        }
        if !self.store().delete_node(&id)? {
            return Err(unknown(&id));
        }
        tracing::warn!(node = %id, "node unbanned; it must attest again with a new join token");
        Ok(NodeAction {
            node: id,
            action: "unbanned".into(),
            revoked: 0,
            propagation: None,
        })
    }

    /// Evicts or bans a node: its record goes (evict) or is marked banned
    /// (ban), then everything issued through it is revoked. If the revocation
    /// fails (store down), the record is restored and the error says nothing
    /// changed.
    pub async fn remove(
        &self,
        revoker: &Revoker,
        tasks: &dyn TaskStore,
        raw: &str,
        how: Removal,
        reason: &str,
        now: u64,
    ) -> Result<NodeAction, BrokerError> {
        let id = self.parse_node_id(raw)?;
        let store = self.store();
        let before = store.get_node(&id)?;
        let (verb, changed) = match (how, &before) {
            (Removal::Evict, None) => return Err(unknown(&id)),
            (Removal::Evict, Some(b)) if b.banned => {
                return Err(BrokerError::Conflict(format!(
                    "node {id} is banned, which already cut it off; `baton node unban {id}` lifts the ban if it should attest again"
                )));
            }
            (Removal::Evict, Some(_)) => ("evicted", store.delete_node(&id)?),
            (Removal::Ban, Some(b)) if b.banned => {
                return Err(BrokerError::Conflict(format!(
                    "node {id} is already banned"
                )));
            }
            (Removal::Ban, Some(_)) => ("banned", store.set_node_banned(&id, true)?),
            // A node never attested (or evicted) is banned pre-emptively: a
            // banned record with no agent SVID, so no join token gets it in.
            (Removal::Ban, None) => {
                store.upsert_node(&NodeRecord {
                    spiffe_id: id.clone(),
                    serial_hex: String::new(),
                    prev_serial_hex: None,
                    svid_not_after: 0,
                    attested_at: 0,
                    banned: true,
                })?;
                ("banned", true)
            }
        };
        if !changed {
            return Err(unknown(&id));
        }
        let revoked = match revoker
            .revoke(&Target::Node(id.clone()), tasks, reason, now)
            .await
        {
            Ok(v) => v.len(),
            // Nothing live was issued through it (or a memory store restarted).
            Err(BrokerError::NotFound(_)) => 0,
            Err(e) => {
                let restored = match (how, &before) {
                    (Removal::Evict, Some(b)) => store.upsert_node(b),
                    (Removal::Ban, Some(_)) => store.set_node_banned(&id, false).map(|_| ()),
                    (_, None) => store.delete_node(&id).map(|_| ()),
                };
                if let Err(r) = restored {
                    tracing::error!(node = %id, error = %r, "could not restore the node after a failed revocation");
                    return Err(BrokerError::Hook(format!(
                        "node {id}: the revocation failed ({e}) and the node record could not be restored ({r}); retry `baton node {}` when the revocation store is back",
                        if how == Removal::Evict {
                            "evict"
                        } else {
                            "ban"
                        }
                    )));
                }
                return Err(BrokerError::Hook(format!(
                    "node {id} was not {verb} (nothing changed): {e}; retry when the revocation store is back"
                )));
            }
        };
        self.rotation.forget_node(&id);
        tracing::warn!(node = %id, action = verb, revoked, reason, "node {verb}");
        let propagation = revoker
            .propagation(std::time::Duration::from_secs(2))
            .await
            .ok();
        Ok(NodeAction {
            node: id,
            action: verb.into(),
            revoked,
            propagation,
        })
    }
}

/// What an operator does to a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Removal {
    Evict,
    Ban,
}
