//! The node daemon's HTTPS client for the broker.
//!
//! TLS comes from `baton-tls`: the broker is authenticated by its SPIFFE ID
//! (`spiffe://<td>/baton/broker`) against a hot-swappable bundle, and the
//! node presents its agent SVID through a swappable [`ClientIdentity`].
//! Pooled connections keep the certificate they were opened with, so after
//! every change of identity (attestation, renewal) call
//! [`BrokerClient::reconnect`] to start from fresh connections.

use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use baton_core::api::{
    ApiError, AttestRequest, RedeemRequest, RenewRequest, SignJwtRequest, SignJwtResponse,
    SignX509Item, SignX509Request, SignX509Response, SignedSvid, SyncResponse, TaskCredential,
};
use baton_core::{EntryId, Secret, SpiffeId};
use baton_tls::{BundleStore, ClientIdentity, PeerPolicy, TlsError};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// How long one broker call may take before we give up and retry later.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a broker call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot build the broker client: {0}")]
    Tls(#[from] TlsError),
    #[error("cannot build the broker client: {0}")]
    Build(#[source] reqwest::Error),
    #[error("cannot reach the broker at {url}: {source}")]
    Unreachable {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the broker refused {route} (HTTP {status}): {error}")]
    Refused {
        route: &'static str,
        status: u16,
        error: ApiError,
    },
    #[error("the broker answered {route} with HTTP {status} and an unexpected body: {body}")]
    Unexpected {
        route: &'static str,
        status: u16,
        body: String,
    },
    #[error("the broker's answer to {route} is not what this agent expects: {reason}")]
    BadAnswer { route: &'static str, reason: String },
}

impl ClientError {
    /// The HTTP status of a refusal, if the broker answered at all.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Refused { status, .. } | ClientError::Unexpected { status, .. } => {
                Some(*status)
            }
            _ => None,
        }
    }
}

/// Why the broker no longer serves this node: every credential issued
/// through it is revoked and it must not serve identities.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeRefusal {
    /// Evicted (or never attested): attest again with a new join token.
    NotAttested,
    /// Its agent SVID is revoked: attest again with a new join token.
    SvidRevoked,
    /// Banned: only an operator can lift it.
    Banned,
}

impl NodeRefusal {
    /// What the operator should do, for logs and errors.
    pub fn advice(self) -> &'static str {
        match self {
            NodeRefusal::NotAttested | NodeRefusal::SvidRevoked => {
                "this node was evicted (or its agent SVID revoked): it serves no identities until it attests again; generate a join token with `baton token generate --node-id <this node's id>` and restart the agent with --join-token"
            }
            NodeRefusal::Banned => {
                "this node is banned: it serves no identities and cannot attest again; contact the operator of the broker (`baton node unban` lifts a ban)"
            }
        }
    }
}

impl ClientError {
    /// Whether the broker refused this node itself (evicted, banned, agent
    /// SVID revoked), as opposed to one request.
    pub fn node_refusal(&self) -> Option<NodeRefusal> {
        match self {
            ClientError::Refused {
                status: 403, error, ..
            } => match error.code.as_str() {
                "not_a_node" => Some(NodeRefusal::NotAttested),
                "agent_svid_revoked" | "agent_svid_superseded" => Some(NodeRefusal::SvidRevoked),
                "node_banned" => Some(NodeRefusal::Banned),
                _ => None,
            },
            _ => None,
        }
    }
}

/// A client for the broker's node routes.
#[derive(Debug)]
pub struct BrokerClient {
    base: String,
    identity: ClientIdentity,
    bundles: BundleStore,
    broker_id: SpiffeId,
    http: RwLock<reqwest::Client>,
}

impl BrokerClient {
    /// `base_url` is like `https://broker.example:8443`; `identity` starts
    /// empty for join-token attestation and is filled in later.
    pub fn new(
        base_url: &str,
        identity: ClientIdentity,
        bundles: BundleStore,
        broker_id: SpiffeId,
    ) -> Result<Self, ClientError> {
        let http = build_http(&identity, &bundles, &broker_id)?;
        Ok(Self {
            base: base_url.trim_end_matches('/').to_owned(),
            identity,
            bundles,
            broker_id,
            http: RwLock::new(http),
        })
    }

    /// The identity this client presents; replace it, then [`reconnect`](Self::reconnect).
    pub fn identity(&self) -> &ClientIdentity {
        &self.identity
    }

    /// The trust anchors this client checks the broker against.
    pub fn bundles(&self) -> &BundleStore {
        &self.bundles
    }

    /// Drops pooled connections, so the next call handshakes with the
    /// current identity and bundle.
    pub fn reconnect(&self) -> Result<(), ClientError> {
        let fresh = build_http(&self.identity, &self.bundles, &self.broker_id)?;
        *self.http.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// `POST /v1/node/attest`: trades a join token and a CSR for the node's SVID.
    pub async fn attest(
        &self,
        join_token: &Secret,
        csr_der: Vec<u8>,
    ) -> Result<SignedSvid, ClientError> {
        let body = AttestRequest {
            join_token: join_token.clone(),
            csr_der,
        };
        self.post("/v1/node/attest", &body).await
    }

    /// `POST /v1/node/renew` (mTLS): a fresh node SVID for a new key.
    pub async fn renew(&self, csr_der: Vec<u8>) -> Result<SignedSvid, ClientError> {
        self.post("/v1/node/renew", &RenewRequest { csr_der }).await
    }

    /// `GET /v1/node/sync` (mTLS): this node's entries and the bundle.
    /// `applied` is the sequence of the bundle (and taints) this node has
    /// applied, reported so the broker knows who has seen a taint.
    pub async fn sync(&self, applied: Option<u64>) -> Result<SyncResponse, ClientError> {
        let route = "/v1/node/sync";
        let http = self.http();
        let mut req = http.get(self.url(route));
        if let Some(seq) = applied {
            req = req.header(baton_core::api::SYNC_APPLIED_HEADER, seq);
        }
        let resp = req.send().await;
        self.finish(route, resp).await
    }

    /// `POST /v1/node/sign-x509` (mTLS): signs a batch; the answer holds one
    /// SVID per item, in order.
    pub async fn sign_x509(
        &self,
        items: Vec<SignX509Item>,
    ) -> Result<Vec<SignedSvid>, ClientError> {
        let route = "/v1/node/sign-x509";
        let n = items.len();
        let resp: SignX509Response = self.post(route, &SignX509Request { items }).await?;
        if resp.svids.len() != n {
            return Err(ClientError::BadAnswer {
                route,
                reason: format!("asked for {n} SVIDs, got {}", resp.svids.len()),
            });
        }
        Ok(resp.svids)
    }

    /// `POST /v1/node/sign-jwt` (mTLS).
    pub async fn sign_jwt(
        &self,
        entry_id: &EntryId,
        audience: &[String],
    ) -> Result<SignJwtResponse, ClientError> {
        let body = SignJwtRequest {
            entry_id: entry_id.clone(),
            audience: audience.to_vec(),
        };
        self.post("/v1/node/sign-jwt", &body).await
    }

    /// `POST /v1/node/redeem` (mTLS): redeems a handoff grant for a workload
    /// this node attested, with the CSR of a key generated for it. The
    /// grant is single-use: a call that fails after reaching the broker may
    /// still have spent it.
    pub async fn redeem(
        &self,
        req: &RedeemRequest,
        trace: Option<&baton_core::TraceParent>,
    ) -> Result<TaskCredential, ClientError> {
        let route = "/v1/node/redeem";
        let mut post = self.http().post(self.url(route)).json(req);
        if let Some(tp) = trace {
            post = post.header(
                baton_core::trace_context::TRACEPARENT_HEADER,
                tp.to_string(),
            );
        }
        self.finish(route, post.send().await).await
    }

    /// `POST /v1/node/renew-task` (mTLS): a task credential re-issued
    /// under the CA's active keys.
    pub async fn renew_task(
        &self,
        req: &baton_core::api::RenewTaskRequest,
    ) -> Result<TaskCredential, ClientError> {
        self.post("/v1/node/renew-task", req).await
    }

    fn http(&self) -> reqwest::Client {
        self.http
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn url(&self, route: &str) -> String {
        format!("{}{route}", self.base)
    }

    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        route: &'static str,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        let http = self.http();
        let resp = http.post(self.url(route)).json(body).send().await;
        self.finish(route, resp).await
    }

    async fn finish<Resp: DeserializeOwned>(
        &self,
        route: &'static str,
        resp: Result<reqwest::Response, reqwest::Error>,
    ) -> Result<Resp, ClientError> {
        let unreachable = |source| ClientError::Unreachable {
            url: self.url(route),
            source,
        };
        let resp = resp.map_err(unreachable)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            return serde_json::from_slice(&bytes).map_err(|e| ClientError::BadAnswer {
                route,
                reason: e.to_string(),
            });
        }
        match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(error) => Err(ClientError::Refused {
                route,
                status: status.as_u16(),
                error,
            }),
            Err(_) => Err(ClientError::Unexpected {
                route,
                status: status.as_u16(),
                body: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
            }),
        }
    }
}

fn build_http(
    identity: &ClientIdentity,
    bundles: &BundleStore,
    broker_id: &SpiffeId,
) -> Result<reqwest::Client, ClientError> {
    let tls = baton_tls::client_config(
        identity.clone(),
        bundles.clone(),
        PeerPolicy::Exact(vec![broker_id.clone()]),
    )?;
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        // The broker is named by URL; a proxy would only see TLS it cannot
        // terminate, and environment proxies are a surprise on a node.
        .no_proxy()
        .build()
        .map_err(ClientError::Build)
}
