//! The node daemon's HTTPS client for the broker.
//!
//! TLS comes from `baton-tls`: the broker is authenticated by its SPIFFE ID
//! (`spiffe://<td>/baton/broker`) against a hot-swappable bundle, and the
//! node presents its agent SVID through a swappable [`ClientIdentity`].
//! Pooled connections keep the certificate they were opened with, so after
//! every change of identity (attestation, renewal) call
//! [`BrokerClient::reconnect`] to start from fresh connections.
//!
//! Several brokers may serve one trust domain (one shared datastore, the
//! same broker SPIFFE ID), so the client takes a list of base URLs and
//! fails over between them; see [`BrokerClient`] for the exact rule.

use std::sync::atomic::{AtomicUsize, Ordering};
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
    #[error("no broker URL given")]
    NoUrl,
    #[error("invalid broker URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// No broker answered: `urls` are the URLs tried, in order (every
    /// configured one when all failed), `source` the last failure.
    #[error("cannot reach the broker at {}: {source}", .urls.join(", "))]
    Unreachable {
        urls: Vec<String>,
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

/// Which transport errors a call may be retried on another broker after.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// The call spends something single-use (a join token) or revokes the certificate it presents (a task renewal), so
    /// a repeat could be refused or spend it twice: only a connect error,
    /// where the request provably never reached a broker, moves it to the
    /// next URL.
    ConnectOnly,
    /// The call may be repeated: any transport error before an HTTP answer
    /// (connect, timeout, connection reset) moves it to the next URL.
    AnyTransport,
}

impl Replay {
    fn fails_over(self, e: &reqwest::Error) -> bool {
        e.is_connect() || (self == Replay::AnyTransport && !e.is_builder())
    }
}

/// A client for the broker's node routes, over one or several brokers of
/// the same trust domain.
///
/// Failover, per call: the call goes to the broker in use (at first the
/// first URL). If it fails with a transport error before any HTTP answer,
/// it is retried on the next URL (wrapping around, each URL at most once
/// per call) when
///
/// - the error is a connect error (refused, unreachable, DNS, TLS
///   handshake): the request provably never reached a broker; or
/// - the route is idempotent (`sync`, `sign-x509`, `sign-jwt`, `renew`,
///   and `redeem`, whose replay of the same request gets the credential
///   the first try delivered) and the error is any other transport error
///   (a timeout, a connection reset before the answer).
///
/// `attest` (a single-use join token) and `renew-task` (it revokes the
/// certificate it presents) fail over on connect errors only. An HTTP answer, whatever its status, is final: it
/// is never retried on another broker. The broker that answered becomes
/// the one in use for the next calls. Each failover is logged at `warn`.
#[derive(Debug)]
pub struct BrokerClient {
    /// Validated base URLs (see [`broker_urls`]), in the order given.
    bases: Vec<String>,
    /// Index into `bases` of the broker in use.
    current: AtomicUsize,
    identity: ClientIdentity,
    bundles: BundleStore,
    broker_id: SpiffeId,
    http: RwLock<reqwest::Client>,
}

/// Checks broker base URLs and returns them normalised: surrounding spaces
/// and trailing `/` trimmed. Each must be an `https://` URL with a host and
/// no query, fragment or credentials; a broker listed twice (the same URL
/// after normalisation, e.g. `https://b:443` and `https://B/`) is refused.
/// Errors name the offending URL.
pub fn broker_urls(urls: &[String]) -> Result<Vec<String>, ClientError> {
    if urls.is_empty() {
        return Err(ClientError::NoUrl);
    }
    let mut out: Vec<String> = Vec::with_capacity(urls.len());
    let mut seen: Vec<(String, &str)> = Vec::with_capacity(urls.len());
    for raw in urls {
        let bad = |reason: String| ClientError::BadUrl {
            url: raw.clone(),
            reason,
        };
        let url = raw.trim().trim_end_matches('/');
        if url.is_empty() {
            return Err(bad("empty (a stray comma?)".into()));
        }
        if url.contains(',') {
            return Err(bad(
                "holds a comma: give several brokers as separate URLs".into()
            ));
        }
        let parsed = reqwest::Url::parse(url).map_err(|e| bad(e.to_string()))?;
        if parsed.scheme() != "https" {
            return Err(bad(
                "the broker is reached over HTTPS only: the URL must start with https://".into(),
            ));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("no host".into()));
        }
        if parsed.query().is_some() || parsed.fragment().is_some() {
            return Err(bad("a broker URL takes no query or fragment".into()));
        }
        if !parsed.username().is_empty() || parsed.password().is_some() {
            // Named without its user part, which may hold a password.
            let mut shown = parsed.clone();
            let _ = shown.set_password(None);
            let _ = shown.set_username("");
            return Err(ClientError::BadUrl {
                url: shown.as_str().trim_end_matches('/').to_owned(),
                reason: "a broker URL takes no user or password (the agent authenticates with its SVID); remove the part before `@`".into(),
            });
        }
        let key = parsed.as_str().trim_end_matches('/').to_owned();
        if let Some((_, first)) = seen.iter().find(|(k, _)| *k == key) {
            return Err(bad(format!(
                "the same broker as {first:?}: each broker is listed once"
            )));
        }
        seen.push((key, raw));
        out.push(url.to_owned());
    }
    Ok(out)
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
        Self::with_urls(&[base_url.to_owned()], identity, bundles, broker_id)
    }

    /// Like [`new`](Self::new), over several brokers of the same trust
    /// domain (each presenting `broker_id`), tried in this order; see
    /// [`BrokerClient`] for the failover rule and [`broker_urls`] for what
    /// is accepted.
    pub fn with_urls(
        urls: &[String],
        identity: ClientIdentity,
        bundles: BundleStore,
        broker_id: SpiffeId,
    ) -> Result<Self, ClientError> {
        let bases = broker_urls(urls)?;
        let http = build_http(&identity, &bundles, &broker_id)?;
        Ok(Self {
            bases,
            current: AtomicUsize::new(0),
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

    /// Every broker base URL, in the order given.
    pub fn urls(&self) -> &[String] {
        &self.bases
    }

    /// The base URL of the broker in use: the next call goes there first.
    pub fn current_url(&self) -> &str {
        self.bases
            .get(self.current.load(Ordering::Relaxed))
            .map_or("", String::as_str)
    }

    /// Drops pooled connections, so the next call handshakes with the
    /// current identity and bundle.
    pub fn reconnect(&self) -> Result<(), ClientError> {
        let fresh = build_http(&self.identity, &self.bundles, &self.broker_id)?;
        *self.http.write().unwrap_or_else(PoisonError::into_inner) = fresh;
        Ok(())
    }

    /// `POST /v1/node/attest`: trades a join token and a CSR for the node's
    /// SVID. The token is single-use: only a connect error fails over.
    pub async fn attest(
        &self,
        join_token: &Secret,
        csr_der: Vec<u8>,
    ) -> Result<SignedSvid, ClientError> {
        let body = AttestRequest {
            join_token: join_token.clone(),
            csr_der,
        };
        self.post("/v1/node/attest", Replay::ConnectOnly, &body)
            .await
    }

    /// `POST /v1/node/renew` (mTLS): a fresh node SVID for a new key. The
    /// broker accepts a renewal from the SVID it just replaced, so a
    /// renewal whose answer was lost may be repeated on another broker.
    pub async fn renew(&self, csr_der: Vec<u8>) -> Result<SignedSvid, ClientError> {
        // Connect errors only: a renewal that reached a slow broker and
        // is repeated at another could leave the node's record naming the
        // SVID this node never received (it would need a new join token).
        self.post(
            "/v1/node/renew",
            Replay::ConnectOnly,
            &RenewRequest { csr_der },
        )
        .await
    }

    /// `GET /v1/node/sync` (mTLS): this node's entries and the bundle.
    /// `applied` is the sequence of the bundle (and taints) this node has
    /// applied, reported so the broker knows who has seen a taint.
    pub async fn sync(&self, applied: Option<u64>) -> Result<SyncResponse, ClientError> {
        self.call("/v1/node/sync", Replay::AnyTransport, |http, url| {
            let req = http.get(url);
            match applied {
                Some(seq) => req.header(baton_core::api::SYNC_APPLIED_HEADER, seq),
                None => req,
            }
        })
        .await
    }

    /// `POST /v1/node/sign-x509` (mTLS): signs a batch; the answer holds one
    /// SVID per item, in order.
    pub async fn sign_x509(
        &self,
        items: Vec<SignX509Item>,
    ) -> Result<Vec<SignedSvid>, ClientError> {
        let route = "/v1/node/sign-x509";
        let n = items.len();
        let resp: SignX509Response = self
            .post(route, Replay::AnyTransport, &SignX509Request { items })
            .await?;
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
        self.post("/v1/node/sign-jwt", Replay::AnyTransport, &body)
            .await
    }

    /// `POST /v1/node/redeem` (mTLS): redeems a handoff grant for a workload
    /// this node attested, with the CSR of a key generated for it. The
    /// grant is single-use, but the very same request (this node, this
    /// workload, this CSR) replayed gets the credential its first try
    /// delivered: a call whose answer was lost (the broker died after it
    /// committed) is safe to send again, so any transport error fails over.
    pub async fn redeem(
        &self,
        req: &RedeemRequest,
        trace: Option<&baton_core::TraceParent>,
    ) -> Result<TaskCredential, ClientError> {
        let traceparent = trace.map(ToString::to_string);
        self.call("/v1/node/redeem", Replay::AnyTransport, |http, url| {
            let post = http.post(url).json(req);
            match &traceparent {
                Some(tp) => post.header(baton_core::trace_context::TRACEPARENT_HEADER, tp),
                None => post,
            }
        })
        .await
    }

    /// `POST /v1/node/renew-task` (mTLS): a task credential re-issued
    /// under the CA's active keys. A renewal revokes the certificate it
    /// presents, so it is not repeated: only a connect error fails over.
    pub async fn renew_task(
        &self,
        req: &baton_core::api::RenewTaskRequest,
    ) -> Result<TaskCredential, ClientError> {
        self.post("/v1/node/renew-task", Replay::ConnectOnly, req)
            .await
    }

    fn http(&self) -> reqwest::Client {
        self.http
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        route: &'static str,
        replay: Replay,
        body: &Req,
    ) -> Result<Resp, ClientError> {
        self.call(route, replay, |http, url| http.post(url).json(body))
            .await
    }

    /// Sends the request `build` makes for a full URL to the broker in
    /// use, failing over to the next ones as [`BrokerClient`] describes.
    async fn call<Resp: DeserializeOwned>(
        &self,
        route: &'static str,
        replay: Replay,
        build: impl Fn(&reqwest::Client, &str) -> reqwest::RequestBuilder,
    ) -> Result<Resp, ClientError> {
        let http = self.http();
        let n = self.bases.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut order = (0..n)
            .map(|k| (start + k) % n)
            .filter_map(|i| self.bases.get(i).map(|base| (i, base)))
            .peekable();
        let mut tried = Vec::new();
        while let Some((i, base)) = order.next() {
            let url = format!("{base}{route}");
            // The answer is read whole here: a connection lost while it
            // comes is a lost answer, handled as the replay rule says.
            let sent = match build(&http, &url).send().await {
                Ok(resp) => {
                    let status = resp.status();
                    resp.bytes().await.map(|body| (status, body))
                }
                Err(e) => Err(e),
            };
            match sent {
                Ok((status, body)) => {
                    if i != start {
                        self.current.store(i, Ordering::Relaxed);
                    }
                    return finish(route, status, &body);
                }
                Err(source) => {
                    tried.push(url);
                    match order.peek() {
                        Some((_, next)) if replay.fails_over(&source) => {
                            tracing::warn!(
                                failed = %base,
                                next = %next,
                                route,
                                error = %chain(&source),
                                "cannot reach this broker; trying the next one"
                            );
                        }
                        _ => {
                            return Err(ClientError::Unreachable {
                                urls: tried,
                                source,
                            });
                        }
                    }
                }
            }
        }
        Err(ClientError::NoUrl)
    }
}

/// Reads the broker's answer to `route`.
fn finish<Resp: DeserializeOwned>(
    route: &'static str,
    status: reqwest::StatusCode,
    bytes: &[u8],
) -> Result<Resp, ClientError> {
    if status.is_success() {
        return serde_json::from_slice(bytes).map_err(|e| ClientError::BadAnswer {
            route,
            reason: e.to_string(),
        });
    }
    match serde_json::from_slice::<ApiError>(bytes) {
        Ok(error) => Err(ClientError::Refused {
            route,
            status: status.as_u16(),
            error,
        }),
        Err(_) => Err(ClientError::Unexpected {
            route,
            status: status.as_u16(),
            body: String::from_utf8_lossy(bytes).chars().take(200).collect(),
        }),
    }
}

/// An error and its causes on one line (reqwest's own message leaves out
/// why the connection failed).
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cause = c.source();
    }
    out
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
        // A broker never redirects: an answer that does is final, never
        // followed (with this client's certificate) elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .tls_backend_preconfigured(tls)
        .timeout(REQUEST_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        // The broker is named by URL; a proxy would only see TLS it cannot
        // terminate, and environment proxies are a surprise on a node.
        .no_proxy()
        .build()
        .map_err(ClientError::Build)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    fn refused(list: &[&str]) -> (String, String) {
        match broker_urls(&urls(list)) {
            Err(ClientError::BadUrl { url, reason }) => (url, reason),
            other => panic!("{list:?}: {other:?}"),
        }
    }

    #[test]
    fn broker_urls_are_checked_and_trimmed() {
        assert_eq!(
            broker_urls(&urls(&[
                "https://a:8443/",
                " https://b:8443 ",
                "https://a:9443"
            ]))
            .unwrap(),
            urls(&["https://a:8443", "https://b:8443", "https://a:9443"])
        );
        // A path prefix is kept (the routes are appended to it).
        assert_eq!(
            broker_urls(&urls(&["https://lb/baton//"])).unwrap(),
            urls(&["https://lb/baton"])
        );
        assert!(matches!(broker_urls(&[]), Err(ClientError::NoUrl)));

        let (url, reason) = refused(&["https://a:8443", "http://b:8443"]);
        assert_eq!(url, "http://b:8443");
        assert!(reason.contains("https://"), "{reason}");
        let (url, reason) = refused(&["https://a", "", "https://b"]);
        assert_eq!(url, "");
        assert!(reason.contains("empty"), "{reason}");
        let (url, reason) = refused(&["https://a,https://b"]);
        assert_eq!(url, "https://a,https://b");
        assert!(reason.contains("comma"), "{reason}");
        let (url, _) = refused(&["broker:8443"]);
        assert_eq!(url, "broker:8443");
        let (url, reason) = refused(&["https://a?x=1"]);
        assert_eq!(url, "https://a?x=1");
        assert!(reason.contains("query"), "{reason}");

        // The same broker twice, however it is spelled.
        let (url, reason) = refused(&["https://b:443/", "https://c", "https://B"]);
        assert_eq!(url, "https://B");
        assert!(reason.contains("\"https://b:443/\""), "{reason}");
        let (url, _) = refused(&["https://b:8443", "https://b:8443/"]);
        assert_eq!(url, "https://b:8443/");

        // Credentials are refused without being echoed.
        let (url, reason) = refused(&["https://user:s3cret@b:8443"]);
        assert_eq!(url, "https://b:8443");
        assert!(reason.contains("user or password"), "{reason}");

        let err = BrokerClient::with_urls(
            &urls(&["https://a", "ftp://b"]),
            ClientIdentity::none(),
            BundleStore::new(),
            SpiffeId::parse("spiffe://example.org/baton/broker").unwrap(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("\"ftp://b\""), "{err}");
        // One URL: the constructor other crates use checks it the same way.
        let err = BrokerClient::new(
            "http://a",
            ClientIdentity::none(),
            BundleStore::new(),
            SpiffeId::parse("spiffe://example.org/baton/broker").unwrap(),
        )
        .unwrap_err();
        assert!(matches!(err, ClientError::BadUrl { .. }), "{err:?}");
    }
}
