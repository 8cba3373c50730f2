//! The request path: mTLS peer, bound token for the gateway's audience,
//! route to tool, revocation, scope, risk ceiling and Cedar through the
//! [`ToolGate`](baton_verify::ToolGate), then the request is forwarded to
//! the upstream with the verified caller in `Baton-*` headers, and the call
//! is reported to the broker.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_tls::PeerCertificate;
use baton_verify::{CallDenied, PeerCert, ToolSpec, VerifiedDelegation};
use bytes::{Bytes, BytesMut};
use futures::{Stream, StreamExt as _};
use http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode};
use warp::Filter as _;
use warp::Reply as _;
use warp::reply::Response;

use crate::GatewayError;
use crate::approval::Held;
use crate::config::{Config, Transport};
use crate::enforce::{Enforcer, EnforcerOptions, FeedConfig, RefusedToken};

/// The largest request or upstream response body the gateway passes on.
pub const MAX_BODY: usize = 8 << 20;
/// Most request-body bytes all requests in flight may hold at once: past
/// it a request is answered 503 (a flood of large bodies, sent before
/// any token is checked, cannot take the gateway's memory).
pub const BODY_BUDGET: usize = 256 << 20;

/// Where RFC 9728 protected-resource metadata is served.
pub const METADATA_PATH: &str = "/.well-known/oauth-protected-resource";

/// The verified caller, as the upstream gets it. Any incoming header of
/// these names (and any other `baton-*` header) is removed first.
pub const HEADER_TASK: &str = "baton-task";
pub const HEADER_ACTOR: &str = "baton-actor";
pub const HEADER_CHAIN: &str = "baton-chain";

/// Headers that belong to one connection, never forwarded.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// How to run a gateway.
pub struct RunOptions {
    pub config: Config,
    /// The Workload API, as `unix:/path`.
    pub endpoint: String,
    /// The call policy (Cedar), decided per call.
    pub policy: Arc<dyn baton_verify::CallPolicy>,
    pub ops: Option<baton_ops::Ops>,
    /// Written with the bound address once the gateway serves.
    pub ready_file: Option<PathBuf>,
    pub shutdown_grace: Duration,
    /// New configurations and policies to apply while serving (e.g. read
    /// on SIGHUP): routes, MCP endpoints, upstreams and the call policy
    /// change together without dropping a connection; a configuration that
    /// changes anything else is refused, and its policy with it.
    pub reload: Option<tokio::sync::mpsc::UnboundedReceiver<Reload>>,
}

/// A configuration and the call policy read with it, applied together or
/// not at all: a request is decided by one routing and the policy read
/// with it, never by new routes and old policies (or the reverse).
pub struct Reload {
    pub config: Config,
    pub policy: Arc<dyn baton_verify::CallPolicy>,
}

impl std::fmt::Debug for Reload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reload")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("config", &self.config)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

pub(crate) struct Gateway {
    /// Routes, MCP endpoints and upstreams: replaced whole on reload; a
    /// request keeps the one it started with.
    routing: arc_swap::ArcSwap<Routing>,
    pub(crate) enforcer: Enforcer,
    pub(crate) sessions: crate::mcp::Sessions,
    /// Peer certificates already read, by their DER: a kept-alive
    /// connection's calls parse its leaf once, not per call.
    peers: PeerCache,
    /// Request-body bytes in flight, out of [`BODY_BUDGET`] (a parsed
    /// MCP message holds a share for its values too).
    pub(crate) bodies: Arc<tokio::sync::Semaphore>,
    /// Each agent's share of the approval requests the gateway sends the
    /// broker, which limits the gateway as a whole
    /// ([`crate::approval::APPROVAL_ASKS_BURST`]).
    pub(crate) approval_asks: crate::approval::AskBudget,
}

/// Most peer certificates [`PeerCache`] holds; when full it starts over.
const PEER_CACHE_CAPACITY: usize = 4096;

/// The [`PeerCert`] read from each leaf certificate the TLS handshake
/// verified, keyed by the leaf's exact DER (so a cached entry is what
/// reading that DER again would give; what may change over time, such as
/// revocation, is checked per call on the result).
#[derive(Default)]
struct PeerCache(std::sync::Mutex<std::collections::HashMap<Vec<u8>, Arc<PeerCert>>>);

impl PeerCache {
    fn get(&self, leaf: &[u8]) -> Result<Arc<PeerCert>, baton_verify::PeerError> {
        let lock = || {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
        };
        if let Some(p) = lock().get(leaf) {
            return Ok(p.clone());
        }
        let p = Arc::new(PeerCert::from_verified_leaf(leaf.to_vec())?);
        let mut map = lock();
        if map.len() >= PEER_CACHE_CAPACITY {
            map.clear();
        }
        map.insert(leaf.to_vec(), p.clone());
        Ok(p)
    }
}

/// What a configuration reload may change.
pub(crate) struct Routing {
    pub(crate) config: Config,
    /// The tool of each route, by route index.
    specs: Vec<ToolSpec>,
    upstreams: BTreeMap<String, reqwest::Client>,
    metadata: serde_json::Value,
    /// The call policy read with this configuration: every decision of a
    /// request routed by it is this policy's ([`crate::policy`]).
    policy: Arc<dyn baton_verify::CallPolicy>,
}

impl Routing {
    /// The routing of `c`; mTLS upstreams use the gateway's SVID and
    /// bundles from `live` (rotations apply to new connections).
    fn build(
        c: Config,
        policy: Arc<dyn baton_verify::CallPolicy>,
        live: &crate::live::LiveTls,
    ) -> Result<Self, GatewayError> {
        let specs = c
            .routes
            .iter()
            .map(|r| ToolSpec {
                name: r.tool.clone(),
                tier: r.tier,
                resource: String::new(),
                requires: r.permission.clone(),
            })
            .collect();
        let mut upstreams = BTreeMap::new();
        for (name, u) in &c.upstreams {
            let mut b = reqwest::Client::builder()
                .no_proxy()
                .redirect(reqwest::redirect::Policy::none())
                .connect_timeout(Duration::from_secs(5));
            match &u.transport {
                Transport::Loopback => {}
                Transport::Unix(path) => b = b.unix_socket(path.clone()),
                Transport::Mtls(id) => {
                    let tls = baton_tls::client_config(
                        live.client.clone(),
                        live.bundles.clone(),
                        baton_tls::PeerPolicy::Exact(vec![id.clone()]),
                    )
                    .map_err(|e| GatewayError::Refused(format!("upstream {name}: {e}")))?;
                    b = b.tls_backend_preconfigured(tls);
                }
            }
            if u.http2 && !matches!(u.transport, Transport::Mtls(_)) {
                b = b.http2_prior_knowledge();
            }
            let client = b
                .build()
                .map_err(|e| GatewayError::Refused(format!("upstream {name}: {e}")))?;
            upstreams.insert(name.clone(), client);
        }
        let mut scopes: Vec<String> = c
            .routes
            .iter()
            .map(|r| r.permission.to_string())
            .chain(
                c.mcp
                    .iter()
                    .flat_map(|m| m.tools.iter().map(|t| t.permission.to_string())),
            )
            .collect();
        scopes.sort();
        scopes.dedup();
        let metadata = serde_json::json!({
            "resource": c.audience,
            "authorization_servers": baton_verify::broker_urls(&c.broker_url).unwrap_or_default(),
            "bearer_methods_supported": ["header"],
            "scopes_supported": scopes,
            "tls_client_certificate_bound_access_tokens": true,
            "resource_name": format!("Baton gateway for {}", c.audience),
        });
        Ok(Self {
            config: c,
            specs,
            upstreams,
            metadata,
            policy,
        })
    }

    /// Sends the request to `upstream` at `path` (the path as the gateway
    /// read it) with the request's query, and the caller's identity in
    /// `Baton-*` headers; `json`: the body is a JSON message the gateway
    /// wrote, sent as `application/json`.
    pub(crate) async fn send(
        &self,
        upstream: &str,
        path: &str,
        req: &Incoming,
        d: &VerifiedDelegation,
        body: Bytes,
        json: bool,
    ) -> Result<reqwest::Response, String> {
        let (Some(client), Some(target)) = (
            self.upstreams.get(upstream),
            self.config.upstreams.get(upstream),
        ) else {
            return Err(format!("no upstream {upstream}"));
        };
        let url = match &req.query {
            Some(q) => format!("{}{path}?{q}", target.url),
            None => format!("{}{path}", target.url),
        };
        let mut headers = upstream_headers(&req.headers, d)?;
        if json {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
        client
            .request(req.method.clone(), &url)
            .headers(headers)
            .body(body)
            .send()
            .await
            .map_err(|e| {
                let expected = match &target.transport {
                    Transport::Mtls(id) => format!(" (it must present {id})"),
                    _ => String::new(),
                };
                format!(
                    "the upstream {upstream} did not answer{expected}: {}",
                    error_chain(&e)
                )
            })
    }
}

/// Runs the gateway until `stop` resolves; calls in flight get
/// `shutdown_grace` to finish.
pub async fn run(
    o: RunOptions,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), GatewayError> {
    baton_tls::install_crypto_provider();
    let c = &o.config;
    let digest_key = crate::digest_key::load_or_create(
        &c.digest_key_file
            .clone()
            .unwrap_or_else(|| c.spool.join("digest.key")),
    )?;
    let enforcer = Enforcer::start(EnforcerOptions {
        endpoint: &o.endpoint,
        spiffe_id: c.spiffe_id.as_deref(),
        broker_url: &c.broker_url,
        audience: &c.audience,
        spool: &c.spool,
        durable_reads: c.durable_reads,
        feed: FeedConfig {
            redis: c.redis.as_ref(),
            stale_after: c.stale_after,
            read_allows_stale: c.read_allows_stale,
            dangerously_skip_revocation: false,
        },
        // Decided by the policy of each request's routing.
        policy: &(Arc::new(crate::policy::InForce) as Arc<dyn baton_verify::CallPolicy>),
        ops: o.ops.as_ref(),
        digest_key: Some(&digest_key),
    })
    .await?;
    if let Some(ops) = &o.ops {
        let live = enforcer.live.clone();
        ops.add_check("svid", move || {
            let expired = live.svid_expires_at() <= baton_revocation::system_now();
            async move {
                if expired {
                    Err(
                        "the gateway's SVID has expired (the Workload API has not renewed it)"
                            .to_owned(),
                    )
                } else {
                    Ok(())
                }
            }
        });
    }
    let routing = Routing::build(o.config.clone(), o.policy.clone(), &enforcer.live)?;
    let server_config = enforcer.server_config()?;
    let listen = c.listen;
    let gw = Arc::new(Gateway {
        routing: arc_swap::ArcSwap::from_pointee(routing),
        enforcer,
        sessions: crate::mcp::Sessions::default(),
        peers: PeerCache::default(),
        bodies: Arc::new(tokio::sync::Semaphore::new(BODY_BUDGET)),
        approval_asks: crate::approval::AskBudget::default(),
    });
    let reloads = o.reload.map(|mut rx| {
        let gw = gw.clone();
        tokio::spawn(async move {
            while let Some(new) = rx.recv().await {
                match gw.reload(new) {
                    Ok(summary) => tracing::info!("reloaded the gateway's configuration: {summary}"),
                    Err(e) => tracing::error!(
                        "cannot reload the gateway's configuration (the previous one stays in force): {e}"
                    ),
                }
            }
        })
    });
    let state = gw.clone();
    let routes = warp::method()
        .and(warp::path::full())
        .and(
            warp::query::raw()
                .map(Some)
                .or(warp::any().map(|| None))
                .unify(),
        )
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<PeerCertificate>())
        .and(warp::body::stream())
        .and(warp::any().map(move || state.clone()))
        .then(
            |method: Method,
             path: warp::path::FullPath,
             query: Option<String>,
             headers: HeaderMap,
             cert: Option<PeerCertificate>,
             body,
             gw: Arc<Gateway>| async move {
                let req = Incoming {
                    method,
                    path: path.as_str().to_owned(),
                    query,
                    headers,
                    cert,
                };
                gw.handle(req, body).await
            },
        );
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| GatewayError::Io {
            context: format!("binding {listen}"),
            source,
        })?;
    let addr: SocketAddr = listener.local_addr().map_err(|source| GatewayError::Io {
        context: "listener address".into(),
        source,
    })?;
    tracing::info!(%addr, audience = %o.config.audience, routes = o.config.routes.len(), mcp = o.config.mcp.len(), "gateway listening");
    if let Some(ops) = &o.ops {
        ops.set_started();
    }
    if let Some(path) = &o.ready_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, addr.to_string())
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|source| GatewayError::Io {
                context: format!("writing {}", path.display()),
                source,
            })?;
    }
    let limits = baton_tls::ServeLimits {
        shutdown_grace: o.shutdown_grace,
        ..baton_tls::ServeLimits::default()
    };
    baton_tls::serve_https_with(listener, server_config, routes, limits, stop)
        .await
        .map_err(GatewayError::refused)?;
    if let Some(r) = reloads {
        r.abort();
        let _ = r.await;
    }
    match Arc::try_unwrap(gw) {
        Ok(gw) => gw.enforcer.finish(o.shutdown_grace).await,
        Err(_) => tracing::warn!("calls still hold the gateway; reports stay in the spool"),
    }
    tracing::info!("gateway stopped");
    Ok(())
}

/// A request as the gateway received it (the body apart).
pub(crate) struct Incoming {
    pub(crate) method: Method,
    pub(crate) path: String,
    pub(crate) query: Option<String>,
    pub(crate) headers: HeaderMap,
    cert: Option<PeerCertificate>,
}

/// A refusal as RFC 6750 describes it, with a JSON body saying why.
fn refusal(status: StatusCode, challenge: &str, code: &str, message: &str) -> Response {
    let mut resp = warp::reply::with_status(
        warp::reply::json(&serde_json::json!({"error": message, "code": code})),
        status,
    )
    .into_response();
    if let Ok(v) = HeaderValue::from_str(challenge) {
        resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
    }
    resp
}

pub(crate) fn invalid_token(code: &str, message: &str) -> Response {
    refusal(
        StatusCode::UNAUTHORIZED,
        &format!(
            "Bearer error=\"invalid_token\", error_description=\"{}\"",
            quoted(message)
        ),
        code,
        message,
    )
}

/// A header quoted-string's content (RFC 9110): no quotes, backslashes or
/// control characters.
pub(crate) fn quoted(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect()
}

fn plain(status: StatusCode, code: &str, message: &str) -> Response {
    warp::reply::with_status(
        warp::reply::json(&serde_json::json!({"error": message, "code": code})),
        status,
    )
    .into_response()
}

impl Gateway {
    /// Applies a new configuration: routes, MCP endpoints and upstreams
    /// change at once for new requests; what the running gateway was
    /// built with (listener, identity, broker, spool, feed) needs a
    /// restart, and a file that changes it is refused whole.
    fn reload(&self, reload: Reload) -> Result<String, String> {
        let Reload {
            config: new,
            policy,
        } = reload;
        let old = self.routing.load();
        let o = &old.config;
        let fixed = [
            ("listen", o.listen.to_string(), new.listen.to_string()),
            ("audience", o.audience.clone(), new.audience.clone()),
            ("broker-url", o.broker_url.clone(), new.broker_url.clone()),
            (
                "spiffe-id",
                format!("{:?}", o.spiffe_id),
                format!("{:?}", new.spiffe_id),
            ),
            (
                "spool",
                o.spool.display().to_string(),
                new.spool.display().to_string(),
            ),
            (
                "policies",
                format!("{:?}", o.policies),
                format!("{:?}", new.policies),
            ),
            (
                "digest-key-file",
                format!("{:?}", o.digest_key_file),
                format!("{:?}", new.digest_key_file),
            ),
            (
                "revocation.stale-after",
                format!("{:?}", o.stale_after),
                format!("{:?}", new.stale_after),
            ),
            (
                "durable-reads",
                o.durable_reads.to_string(),
                new.durable_reads.to_string(),
            ),
            (
                "revocation.read-allows-stale",
                o.read_allows_stale.to_string(),
                new.read_allows_stale.to_string(),
            ),
        ];
        if let Some((field, _, _)) = fixed.iter().find(|(_, a, b)| a != b) {
            return Err(format!("{field} changed; it takes a restart"));
        }
        let summary = format!(
            "{} routes, {} MCP endpoints, {} upstreams",
            new.routes.len(),
            new.mcp.len(),
            new.upstreams.len()
        );
        let routing =
            Routing::build(new, policy, &self.enforcer.live).map_err(|e| e.to_string())?;
        self.routing.store(Arc::new(routing));
        Ok(summary)
    }

    /// Answers `req` by the routing in force when it arrived, decided by
    /// that routing's policy ([`crate::policy`]) however long it runs.
    async fn handle<S, B>(&self, req: Incoming, body: S) -> Response
    where
        S: Stream<Item = Result<B, warp::Error>>,
        B: bytes::Buf,
    {
        let rt = self.routing.load_full();
        crate::policy::under(rt.policy.clone(), self.handle_routed(rt, req, body)).await
    }

    async fn handle_routed<S, B>(&self, rt: Arc<Routing>, req: Incoming, body: S) -> Response
    where
        S: Stream<Item = Result<B, warp::Error>>,
        B: bytes::Buf,
    {
        if req.path == METADATA_PATH && req.method == Method::GET {
            return warp::reply::json(&rt.metadata).into_response();
        }
        let Some(PeerCertificate(leaf)) = &req.cert else {
            return invalid_token("no_peer", "an mTLS client certificate is required");
        };
        let peer = match self.peers.get(leaf) {
            Ok(p) => p,
            Err(e) => return invalid_token("bad_peer", &e.to_string()),
        };
        let token = req
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|a| a.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .map(str::to_owned);
        let Some(token) = token else {
            // RFC 6750 3.1: a request without credentials gets the challenge
            // without an error code; RFC 9728 5.1: where the metadata is.
            let host = req
                .headers
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(quoted)
                .unwrap_or_default();
            return refusal(
                StatusCode::UNAUTHORIZED,
                &format!("Bearer resource_metadata=\"https://{host}{METADATA_PATH}\""),
                "no_token",
                "a delegation token is required (Authorization: Bearer ...)",
            );
        };
        let mcp = rt.config.mcp_endpoint(&req.path);
        let matched = if mcp.is_some() {
            None
        } else {
            rt.config.route(&req.method, &req.path)
        };
        let now = baton_revocation::system_now();
        // The token before the body: a caller with no valid token spends
        // none of the body budget (its refusal is recorded without the
        // body, which is never read).
        match self.enforcer.verifier.verify(&token, &peer, now) {
            Ok(_) => {}
            Err(e) => {
                let (tool, resource, risk) = match (&matched, mcp) {
                    (Some(m), _) => (m.route.tool.as_str(), m.resource.as_str(), m.route.tier),
                    (None, Some(ep)) => (ep.path.as_str(), "", baton_core::RiskTier::Read),
                    (None, None) => ("(no route)", "", baton_core::RiskTier::Read),
                };
                self.enforcer.report_refused_token(RefusedToken {
                    token: &token,
                    peer: &peer,
                    tool,
                    resource,
                    risk,
                    input: None,
                    now,
                    err: &e,
                    traceparent: traceparent(&req.headers),
                });
                return invalid_token(e.code(), &e.to_string());
            }
        }
        // After the token (a refused token is recorded whatever else is
        // wrong), before the body.
        if let Some(why) = encoded_body(&req) {
            return plain(StatusCode::UNSUPPORTED_MEDIA_TYPE, "invalid_request", &why);
        }
        if let Some(why) = underscored_header(&req.headers) {
            return plain(StatusCode::BAD_REQUEST, "invalid_request", &why);
        }
        // Held until the answer: the body's bytes count against the
        // budget while anything still holds them.
        let (input, _held) = match read_body(body, &self.bodies).await {
            Ok(b) => b,
            Err(BodyRefused::Busy) => {
                return plain(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "busy",
                    "the gateway holds too many request bodies at once; retry",
                );
            }
            Err(BodyRefused::Status(status)) => {
                return plain(status, "body", "the request body is too large or broken");
            }
        };
        // The decision's clock is read once the body is in, and the token
        // checked again at it (a cache hit): a body trickled in for a
        // minute is decided at its end (the token's expiry and revocation,
        // the feed's staleness, approval lifetimes), also for MCP methods
        // passed on without the gate.
        let now = baton_revocation::system_now();
        let delegation = match self.enforcer.verifier.verify(&token, &peer, now) {
            Ok(d) => d,
            Err(e) => return invalid_token(e.code(), &e.to_string()),
        };
        if let Some(ep) = mcp {
            // An MCP server behind WordPress's REST API (its MCP adapter)
            // would run the route a `rest_route` names, not the endpoint.
            if let Some(why) = route_selector(&req, &input) {
                return plain(StatusCode::BAD_REQUEST, "invalid_request", &why);
            }
            // An upstream resuming a stream (`Last-Event-ID`) replays its
            // events as it first sent them, before the gateway filtered
            // them (`tools/list`): streams are not resumed through the
            // gateway; the client gets a fresh one.
            let mut req = req;
            req.headers.remove("last-event-id");
            return self.mcp(&rt, ep, &req, &delegation, input, now).await;
        }
        let Some(m) = matched else {
            tracing::warn!(
                task = %delegation.task_id(),
                agent = %delegation.agent(),
                method = %req.method,
                path = %req.path,
                "request on no route refused"
            );
            let message = format!("no route for {} {}", req.method, req.path);
            self.enforcer.gate.record_unserved(
                &delegation,
                "(no route)",
                &input,
                now,
                "no_route",
                &message,
            );
            return plain(StatusCode::NOT_FOUND, "no_route", &message);
        };
        if let Some(why) = method_override(&req, &input) {
            return plain(StatusCode::BAD_REQUEST, "invalid_request", &why);
        }
        if let Some((place, name)) = capture_override(&req, &input, &m.route.resource_captures()) {
            return plain(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                &format!(
                    "{place} carries `{name}`, the path parameter the resource {} is taken from; some frameworks (ASP.NET Core MVC, Laravel) read it instead of the path's value, so the upstream could act on another resource than the one decided: send it in the path only",
                    m.resource
                ),
            );
        }
        if let Some(why) = route_selector(&req, &input) {
            return plain(StatusCode::BAD_REQUEST, "invalid_request", &why);
        }
        if let Some(why) = recorded_field_override(&req, &input, &m.route.record) {
            return plain(StatusCode::BAD_REQUEST, "invalid_request", &why);
        }
        let index = rt
            .config
            .routes
            .iter()
            .position(|r| std::ptr::eq(r, m.route))
            .unwrap_or_default();
        let Some(spec) = rt.specs.get(index) else {
            return plain(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "route without a tool",
            );
        };
        let spec = ToolSpec {
            resource: m.resource.clone(),
            ..spec.clone()
        };
        if let Err(why) = m.route.record.check_input(json_typed(&req), &input) {
            return plain(why.status(), "invalid_request", &why.to_string());
        }
        let approval = match self
            .approval_for(
                &delegation,
                now,
                crate::approval::Ask {
                    spec: &spec,
                    input: &input,
                    bound: None,
                    headers: Some(&req.headers),
                    // The approval binds the method, path and query too:
                    // one approved `PUT /cases/7` is not `PUT /cases/9`.
                    target: Some(match &req.query {
                        Some(q) => format!("{} {}?{q}", req.method, m.path),
                        None => format!("{} {}", req.method, m.path),
                    }),
                    ttl: m.route.approval_ttl.unwrap_or(rt.config.approval_ttl),
                    configured: m.route.approval,
                    shown: &|| {
                        recorded_request(&m.route.record, &req, &input, &|b| {
                            self.enforcer.gate.digest(b)
                        })
                    },
                },
            )
            .await
        {
            Ok(approval) => approval,
            Err(held) => return held_response(&held),
        };
        let mut call = match self
            .enforcer
            .gate
            .authorize_approved_async(
                &delegation,
                &spec,
                &input,
                now,
                baton_verify::CallNotes {
                    approval,
                    recorded: recorded_request(&m.route.record, &req, &input, &|b| {
                        self.enforcer.gate.digest(b)
                    }),
                    traceparent: traceparent(&req.headers),
                },
            )
            .await
        {
            Ok(call) => call,
            Err(denied) => return denial(&denied),
        };
        let started = std::time::Instant::now();
        let sent = rt
            .send(&m.route.upstream, &m.path, &req, &delegation, input, false)
            .await;
        let forwarded = match sent {
            // An event stream is passed on as it comes, never buffered.
            Ok(resp) if is_event_stream(resp.headers()) => {
                let mut headers = resp.headers().clone();
                strip_hop_by_hop(&mut headers);
                tracing::info!(
                    task = %delegation.task_id(),
                    agent = %delegation.agent(),
                    tool = %spec.name,
                    resource = %spec.resource,
                    upstream_status = resp.status().as_u16(),
                    "call forwarded (event stream)"
                );
                let output =
                    (!m.route.record.output.is_empty()).then_some(crate::mcp::Output::Unscanned);
                let standing = self.enforcer.verifier.standing(&delegation);
                return crate::mcp::relay(
                    resp,
                    headers,
                    Some(call),
                    started,
                    output,
                    Some(standing),
                );
            }
            Ok(resp) => match read_answer(resp, &self.bodies).await {
                Err(AnswerRefused::Busy(upstream_status)) => {
                    // The upstream acted: the record says so, with its
                    // status, and the caller is not told to just retry.
                    call.set_upstream(
                        upstream_status.as_u16(),
                        u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                    );
                    let message = "the upstream answered, but the gateway held too many answers at once to keep this one";
                    if let Err(e) = call.failed_async(message).await {
                        tracing::warn!(error = %e, "could not spool the report of a failed call");
                    }
                    return plain(
                        StatusCode::BAD_GATEWAY,
                        "answer_dropped",
                        "the call reached the upstream, which answered, but the gateway held too many answers at once to pass this one on: check the call's effect before sending it again",
                    );
                }
                Err(AnswerRefused::Upstream(e)) => Err(e),
                Ok(answer) => Ok(answer),
            },
            Err(e) => Err(e),
        };
        let latency_ms = started.elapsed().as_millis();
        match forwarded {
            Ok((status, headers, out, held)) => {
                tracing::info!(
                    task = %delegation.task_id(),
                    agent = %delegation.agent(),
                    tool = %spec.name,
                    resource = %spec.resource,
                    upstream_status = status.as_u16(),
                    latency_ms,
                    "call forwarded"
                );
                call.record_output(m.route.record.output_fields(&out));
                call.set_upstream(
                    status.as_u16(),
                    u64::try_from(latency_ms).unwrap_or(u64::MAX),
                );
                // No record, no answer: the call's report must be spooled.
                if let Err(e) = call.finish_async(&out).await {
                    return plain(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "audit_unavailable",
                        &format!("cannot record the call: {e}"),
                    );
                }
                held_answer(status, headers, out, held)
            }
            Err(message) => {
                tracing::warn!(
                    task = %delegation.task_id(),
                    tool = %spec.name,
                    latency_ms,
                    error = %message,
                    "upstream failed"
                );
                if let Err(e) = call.failed_async(&message).await {
                    tracing::warn!(error = %e, "could not spool the report of a failed call");
                }
                plain(
                    StatusCode::BAD_GATEWAY,
                    "upstream",
                    "the upstream failed (the gateway's log says why)",
                )
            }
        }
    }
}

/// The clear-text fields a route records of a request (and shows an
/// approver): its headers as the upstream gets them, so a header the
/// request's `Connection` drops (`Connection: x-amount`) is neither
/// recorded nor shown, as it is neither forwarded nor bound by an
/// approval; and the keyed digest (`digest`) of its query, whatever the
/// route names, since frameworks merge query parameters with the body's.
fn recorded_request(
    record: &crate::record::Recording,
    req: &Incoming,
    body: &[u8],
    digest: &dyn Fn(&[u8]) -> String,
) -> BTreeMap<String, String> {
    let mut fields = if record.headers.is_empty() {
        record.request_fields(&HeaderMap::new(), body)
    } else {
        record.request_fields(&forwarded_headers(&req.headers), body)
    };
    if let Some(q) = req.query.as_deref().filter(|q| !q.is_empty()) {
        fields.insert(crate::record::QUERY_FIELD.to_owned(), digest(q.as_bytes()));
    }
    fields
}

/// The caller's W3C trace context, when the request carries exactly one
/// valid `traceparent` (anything else is ignored, as the spec asks): the
/// call's record continues that trace.
pub(crate) fn traceparent(h: &HeaderMap) -> Option<baton_core::trace_context::TraceParent> {
    let mut values = h.get_all("traceparent").iter();
    let (Some(v), None) = (values.next(), values.next()) else {
        return None;
    };
    v.to_str().ok()?.parse().ok()
}

pub(crate) fn is_event_stream(h: &HeaderMap) -> bool {
    h.get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/event-stream"))
}

/// Why an upstream's answer is not passed on.
pub(crate) enum AnswerRefused {
    /// It broke off or is over [`MAX_BODY`].
    Upstream(String),
    /// [`BODY_BUDGET`] is spent (the upstream's status).
    Busy(StatusCode),
}

/// An upstream's answer as read whole: status, headers, body, and the
/// share of the body budget it holds.
pub(crate) type Answer = (
    StatusCode,
    HeaderMap,
    Vec<u8>,
    Option<tokio::sync::OwnedSemaphorePermit>,
);

/// The upstream's status, headers and whole body (at most [`MAX_BODY`]),
/// charged to `budget` as request bodies are: a caller that asks for many
/// answers and never reads them (an HTTP/2 window of 0) cannot make the
/// gateway hold more than the budget.
pub(crate) async fn read_answer(
    resp: reqwest::Response,
    budget: &Arc<tokio::sync::Semaphore>,
) -> Result<Answer, AnswerRefused> {
    let status = resp.status();
    let mut headers = resp.headers().clone();
    strip_hop_by_hop(&mut headers);
    // The length is set again from what is read, except for an answer
    // with no body: a HEAD's or a 304's Content-Length tells the size of
    // the body it stands for, and is passed on as the upstream sent it.
    let stated_length = headers.remove(http::header::CONTENT_LENGTH);
    let mut out = Vec::new();
    let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut resp = resp;
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| AnswerRefused::Upstream(format!("the upstream's answer broke off: {e}")))?
    {
        if out.len() + chunk.len() > MAX_BODY {
            return Err(AnswerRefused::Upstream(format!(
                "the upstream's answer is over {MAX_BODY} bytes"
            )));
        }
        let n = u32::try_from(chunk.len()).map_err(|_| AnswerRefused::Busy(status))?;
        if n > 0 {
            let more = budget
                .clone()
                .try_acquire_many_owned(n)
                .map_err(|_| AnswerRefused::Busy(status))?;
            match held.as_mut() {
                Some(h) => h.merge(more),
                None => held = Some(more),
            }
        }
        out.extend_from_slice(&chunk);
    }
    if out.is_empty()
        && let Some(length) = stated_length
        && length.to_str().is_ok_and(|l| l.parse::<u64>().is_ok())
    {
        headers.insert(http::header::CONTENT_LENGTH, length);
    }
    Ok((status, headers, out, held))
}

/// An answer whose body holds its share of the budget (`held`) until the
/// last of it is taken for sending, or the caller goes away: given out in
/// slices, so the connection takes the next only as it sends.
pub(crate) fn held_answer(
    status: StatusCode,
    mut headers: HeaderMap,
    out: Vec<u8>,
    held: Option<tokio::sync::OwnedSemaphorePermit>,
) -> Response {
    const SLICE: usize = 64 << 10;
    let len = out.len();
    if len == 0 {
        // Nothing held; the status decides what an empty body is sent as.
        let mut resp = out.into_response();
        *resp.status_mut() = status;
        *resp.headers_mut() = headers;
        return resp;
    }
    let slices = futures::stream::unfold((Bytes::from(out), held), |(mut rest, held)| async move {
        if rest.is_empty() {
            return None;
        }
        let slice = rest.split_to(rest.len().min(SLICE));
        Some((Ok::<_, std::io::Error>(slice), (rest, held)))
    });
    let mut resp = warp::reply::stream(slices).into_response();
    headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// Headers some frameworks read as the request's real method or path
/// (Rack's and Express's method override, IIS's rewrites): never passed
/// on, since the call was decided on the method and path the gateway saw.
const OVERRIDING_HEADERS: &[&str] = &[
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    "x-original-method",
    // The answer must be readable to be checked and recorded (a
    // compressed `tools/list` could not be filtered).
    "accept-encoding",
];

/// Where a request carries a `_method` parameter (Rails, Laravel,
/// Symfony, Spring and gorilla take it as the method): its query, a form
/// body, a multipart body's part names (Rack parses those too) or a JSON
/// object's top-level keys (Laravel reads JSON input). Multipart is
/// checked on each part's header block, so a file that merely mentions
/// `_method` passes; a multipart body without a usable boundary is checked
/// whole (fail closed).
fn method_override(req: &Incoming, body: &[u8]) -> Option<String> {
    let found = |place: &str| {
        Some(format!(
            "{place} carries `_method`, which some frameworks read as the request's method; the call was decided on {}",
            req.method
        ))
    };
    let names_method = |form: &[u8]| form_names(form).any(|k| is_method_key(&k));
    if req
        .query
        .as_deref()
        .is_some_and(|q| names_method(q.as_bytes()))
    {
        return found("the query");
    }
    let content_type = match content_type_of(req) {
        Ok(t) => t,
        Err(why) => return Some(why),
    };
    if content_type.is_empty() {
        // Rack reads a body without a media type as a form.
        return names_method(body)
            .then(|| found("the body (read as a form: it has no Content-Type)"))
            .flatten();
    }
    // Parsers cut a Content-Type in different places (Rack at `;` or `,`,
    // PHP also at a space, PHP finds `boundary` inside another
    // parameter's name): only one that reads one way is passed on.
    let Some(parsed) = ContentType::parse(&content_type) else {
        return Some(format!(
            "the Content-Type {content_type:?} is not `type/subtype` with `; name=value` parameters only (RFC 9110), so parsers could read it differently"
        ));
    };
    if !parsed.reads_as_bytes() {
        return Some(format!(
            "the Content-Type {content_type:?} names a charset the upstream could decode to other characters than the gateway reads; send the body as UTF-8"
        ));
    }
    let mut found_in = None;
    if parsed.media == "application/x-www-form-urlencoded" && names_method(body) {
        found_in = Some("the form body");
    }
    if parsed.media.starts_with("multipart/") {
        let lower = body.to_ascii_lowercase();
        if multipart_part_names(parsed.boundary.as_deref(), &lower).is_none() {
            return Some(
                "the multipart body names its parts with `name=` inside other names' values, more than the gateway can check one way: give each part one quoted name".to_owned(),
            );
        }
        if multipart_names_method(parsed.boundary.as_deref(), &lower) {
            found_in = Some("the multipart body");
        }
    }
    // Laravel reads as JSON any type whose header has `/json` or `+json`
    // anywhere (a parameter's value too).
    if content_type.contains("/json") || content_type.contains("+json") {
        // Only an object's own keys are parameters. A body this parser
        // cannot read (JSON lines, a BOM, a number out of range, nesting
        // deeper than 128 where PHP reads 512) is refused if it has the
        // word `method` or any `\u` escape: what it is to the upstream is
        // not known here.
        let json = match top_level_key_matches(body, &is_method_key) {
            Ok(found) => found,
            Err(_) => {
                let lower = body.to_ascii_lowercase();
                find(&lower, b"method").is_some() || find(&lower, b"\\u").is_some()
            }
        };
        if json {
            found_in = Some("the JSON body");
        }
    }
    found_in.and_then(found)
}

/// The request's Content-Type as the upstream gets it, lower-cased and
/// trimmed (empty when there is none): one header at most, and none when
/// `Connection` names it (it is dropped on the way).
fn content_type_of(req: &Incoming) -> Result<String, String> {
    let mut types = req.headers.get_all(http::header::CONTENT_TYPE).iter();
    let first = types.next();
    if types.next().is_some() {
        return Err("the request has more than one Content-Type; the upstream could read its body as either".into());
    }
    let dropped = req
        .headers
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|n| n.trim().eq_ignore_ascii_case("content-type"));
    match first {
        Some(v) if !dropped => v
            .to_str()
            .map(|t| t.trim().to_ascii_lowercase())
            .map_err(|_| "the Content-Type is not readable text".to_owned()),
        _ => Ok(String::new()),
    }
}

/// Whether the request's body is typed JSON, read one way: exactly one
/// Content-Type, `application/json` or `…+json` (RFC 6839), well formed.
fn json_typed(req: &Incoming) -> bool {
    content_type_of(req).is_ok_and(|t| {
        ContentType::parse(&t).is_some_and(|p| {
            (p.media == "application/json" || p.media.ends_with("+json")) && p.reads_as_bytes()
        })
    })
}

/// A header whose name has an `_`: CGI, WSGI and PHP read `Mcp_Session_Id`
/// as `Mcp-Session-Id` and `Baton_Actor` as `Baton-Actor`, spellings the
/// gateway's own session, resumption and identity checks would not see.
/// Refused by name rather than dropped (nginx drops them silently), so a
/// client that meant one learns why the upstream would not get it.
fn underscored_header(headers: &HeaderMap) -> Option<String> {
    headers.keys().find(|k| k.as_str().contains('_')).map(|k| {
        format!(
            "header {:?} has an underscore, which servers behind CGI, WSGI or PHP read as {:?}; the gateway takes header names with hyphens only",
            k.as_str(),
            k.as_str().replace('_', "-")
        )
    })
}

/// A request body whose bytes are not what the upstream acts on: any
/// `Content-Encoding` but `identity` (a framework that inflates a gzip
/// body would act on fields the gateway never saw, `_method` included).
fn encoded_body(req: &Incoming) -> Option<String> {
    let encodings: Vec<&str> = req
        .headers
        .get_all(http::header::CONTENT_ENCODING)
        .iter()
        .map(|v| v.to_str().unwrap_or("(not text)"))
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"))
        .collect();
    (!encodings.is_empty()).then(|| {
        format!(
            "the request body is sent with Content-Encoding {}; the gateway checks, records and binds approvals to the bytes the upstream acts on, so only an unencoded body is taken",
            encodings.join(", ")
        )
    })
}

/// The names of a form (or query): each `&`- or `;`-separated pair's key,
/// `+` read as a space, percent-decoded.
fn form_names(form: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    // Rack splits on `;` too in older versions.
    form.split(|b| *b == b'&' || *b == b';').map(|pair| {
        let key = pair.split(|b| *b == b'=').next().unwrap_or_default();
        let plus: Vec<u8> = key
            .iter()
            .map(|b| if *b == b'+' { b' ' } else { *b })
            .collect();
        percent_encoding::percent_decode(&plus).collect()
    })
}

/// Whether a JSON body is an object with a top-level key `matches` takes
/// (`_method` as [`is_method_key`] reads it, a capture's name), read as a
/// stream: values are skipped, not built, so a large body costs no memory
/// beyond its keys.
fn top_level_key_matches(
    body: &[u8],
    matches: &dyn Fn(&[u8]) -> bool,
) -> Result<bool, serde_json::Error> {
    use serde::Deserializer as _;
    use serde::de::{IgnoredAny, MapAccess, Visitor};
    struct Keys<'m>(&'m dyn Fn(&[u8]) -> bool);
    impl<'de> Visitor<'de> for Keys<'_> {
        type Value = bool;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON value")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
            let mut found = false;
            while let Some(k) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                found |= (self.0)(k.as_bytes());
                map.next_value::<IgnoredAny>()?;
            }
            Ok(found)
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Ok(false)
        }
        fn visit_bool<E>(self, _: bool) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_i64<E>(self, _: i64) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_u64<E>(self, _: u64) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_f64<E>(self, _: f64) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_str<E>(self, _: &str) -> Result<bool, E> {
            Ok(false)
        }
        fn visit_unit<E>(self) -> Result<bool, E> {
            Ok(false)
        }
    }
    let mut d = serde_json::Deserializer::from_slice(body);
    let found = (&mut d).deserialize_any(Keys(matches))?;
    d.end()?;
    Ok(found)
}

/// A Content-Type read one way (RFC 9110 8.3): `type/subtype` then
/// `;`-separated `name=value` parameters, names and unquoted values
/// tokens, no space around `=`; the text `boundary` at most once, and then
/// only as a parameter's whole name.
struct ContentType {
    media: String,
    boundary: Option<String>,
    /// The `charset` parameter's value(s), lower-cased.
    charsets: Vec<String>,
}

impl ContentType {
    fn parse(lower: &str) -> Option<Self> {
        let token = |t: &str| {
            !t.is_empty()
                && t.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        };
        let mut parts = lower.split(';');
        let media = parts.next()?.trim_end_matches([' ', '\t']);
        let (ty, sub) = media.split_once('/')?;
        if !token(ty) || !token(sub) {
            return None;
        }
        let mut boundary = None;
        let mut charsets = Vec::new();
        for p in parts {
            let p = p
                .trim_start_matches([' ', '\t'])
                .trim_end_matches([' ', '\t']);
            let (name, value) = p.split_once('=')?;
            // RFC 2231 names (`charset*`, `charset*0`) are read by some
            // parsers (Django, Werkzeug) as the plain name: refused.
            if !token(name) || name.contains('*') {
                return None;
            }
            let value = match value.strip_prefix('"') {
                Some(quoted) => {
                    let inner = quoted.strip_suffix('"')?;
                    if inner.contains(['"', '\\']) || inner.chars().any(char::is_control) {
                        return None;
                    }
                    inner
                }
                None if token(value) => value,
                None => return None,
            };
            if name == "boundary" {
                boundary = Some(value.to_owned());
            }
            if name == "charset" {
                charsets.push(value.to_owned());
            }
        }
        // Browsers' boundaries hold the word (`----WebKitFormBoundary…`,
        // `----geckoformboundary…`): inside the boundary's own value, after
        // its name, it is still read one way (PHP takes the first
        // `boundary`, Rack the last `boundary=`).
        let in_value = boundary
            .as_deref()
            .map_or(0, |b| b.matches("boundary").count());
        if lower.matches("boundary").count() > usize::from(boundary.is_some()) + in_value {
            return None;
        }
        // The text `charset` only as whole parameter names, as `boundary`.
        if lower.matches("charset").count() > charsets.len() {
            return None;
        }
        Some(Self {
            media: media.to_owned(),
            boundary,
            charsets,
        })
    }

    /// Whether the body's bytes read as the gateway reads them: no
    /// charset, or one charset that keeps every ASCII byte an ASCII
    /// character. UTF-7 (`+ACI-` is a quote), `unicode_escape`, UTF-16 and
    /// the like decode to other characters than the bytes show, so a body
    /// checked as `{"amount":10}` could be `amount` 1000000 to a server
    /// that decodes it (Express, Django).
    fn reads_as_bytes(&self) -> bool {
        match self.charsets.as_slice() {
            [] => true,
            [one] => ["utf-8", "utf8", "us-ascii", "ascii", "iso-8859-1", "latin1"]
                .contains(&one.as_str()),
            _ => false,
        }
    }
}

/// Whether a parameter name is `_method` as a framework reads it: in any
/// case, and the way PHP rewrites names (leading spaces dropped, cut at a
/// NUL, `.`, space and `[` read as `_`, `_method[..]` the array
/// `_method`).
fn is_method_key(raw: &[u8]) -> bool {
    is_param_key(raw, b"_method")
}

/// A parameter's name as PHP reads it, ASCII lower-cased: leading spaces
/// dropped, cut at a NUL, `name[..]` the array `name`, `.`, space and `[`
/// read as `_`.
fn param_name(raw: &[u8]) -> Vec<u8> {
    let mut key = raw.split(|b| *b == 0).next().unwrap_or_default();
    while let [b' ', rest @ ..] = key {
        key = rest;
    }
    if let Some(open) = key.iter().position(|b| *b == b'[')
        && key.get(open..).is_some_and(|k| k.contains(&b']'))
    {
        key = key.get(..open).unwrap_or_default();
    }
    key.iter()
        .map(|b| match b {
            b'.' | b' ' | b'[' => b'_',
            other => other.to_ascii_lowercase(),
        })
        .collect()
}

/// Whether a parameter name is `name` (lower case: letters, digits, `_`)
/// as a framework reads it: in any case, and the way PHP rewrites names
/// (leading spaces dropped, cut at a NUL, `.`, space and `[` read as `_`,
/// `name[..]` the array `name`).
fn is_param_key(raw: &[u8], name: &[u8]) -> bool {
    let rewritten = param_name(raw);
    if rewritten.is_ascii() {
        return rewritten == name;
    }
    // Go's encoding/json matches keys with Unicode simple case folding:
    // `caſe_id` (long s) and `\u{212a}ey` (Kelvin sign) are `case_id` and
    // `key` to it.
    crate::record::fold(&String::from_utf8_lossy(&rewritten))
        == crate::record::fold(&String::from_utf8_lossy(name))
}

/// Whether a part of a (lower-cased) multipart body is named `_method` (in any case,
/// quoted or not, or in an RFC 2231 `name*=`): each part's header block is
/// searched ([`multipart_header_blocks`]); without a boundary parameter,
/// or when no part is under it, the whole body is searched.
fn multipart_names_method(boundary: Option<&str>, lower: &[u8]) -> bool {
    let mentions = |hay: &[u8]| find(hay, b"_method").is_some();
    match multipart_header_blocks(boundary, lower) {
        Some(blocks) => blocks.into_iter().any(mentions),
        None => mentions(lower),
    }
}

/// Each part's header block of a (lower-cased) multipart body: the text
/// from its boundary line to the later of its first CRLF CRLF and LF LF
/// (Rack reads up to CRLF CRLF, lenient parsers to LF LF), within the
/// part. None without a boundary, or when no part is under it (a parser
/// that took another boundary reads parts these blocks would miss: the
/// caller searches the whole body). One pass: each search starts where
/// the last one ended, so a body of many delimiters costs its length.
fn multipart_header_blocks<'b>(boundary: Option<&str>, lower: &'b [u8]) -> Option<Vec<&'b [u8]>> {
    let boundary = boundary.filter(|b| !b.is_empty())?;
    let delimiter = format!("--{boundary}").into_bytes();
    let delimiters = memchr::memmem::Finder::new(&delimiter);
    let crlf2 = memchr::memmem::Finder::new(b"\r\n\r\n");
    let lf2 = memchr::memmem::Finder::new(b"\n\n");
    // The first occurrence at or after `from`, remembered while it is
    // still ahead.
    let next =
        |finder: &memchr::memmem::Finder<'_>, seen: &mut Option<Option<usize>>, from: usize| {
            match *seen {
                Some(Some(at)) if at >= from => Some(at),
                Some(None) => None,
                _ => {
                    let found = lower
                        .get(from..)
                        .and_then(|r| finder.find(r))
                        .map(|at| from + at);
                    *seen = Some(found);
                    found
                }
            }
        };
    let mut at = delimiters.find(lower)?;
    let (mut seen_crlf2, mut seen_lf2) = (None, None);
    let mut blocks = Vec::new();
    loop {
        let start = at + delimiter.len();
        let part = lower
            .get(start..)
            .and_then(|r| delimiters.find(r))
            .map(|p| start + p);
        let part_end = part.unwrap_or(lower.len());
        let end = [
            next(&crlf2, &mut seen_crlf2, start),
            next(&lf2, &mut seen_lf2, start),
        ]
        .into_iter()
        .flatten()
        .max()
        .unwrap_or(lower.len())
        .min(part_end);
        blocks.push(lower.get(start..end.max(start)).unwrap_or_default());
        match part {
            Some(p) => at = p,
            None => return Some(blocks),
        }
    }
}

/// The values of every `name` parameter in a multipart header block (or
/// body), as lenient parsers read them: `name`, `name*` (RFC 2231: after
/// `charset'lang'`, percent-decoded) and continuations (`name*0`), with
/// or without space around `=`, quoted or bare. `filename` is not a
/// name. Fail closed: a continuation's value is returned whole, with
/// every other continuation's value after it, as the name.
///
/// `budget` is how many bytes of values may still be read: values a
/// well-formed body names do not overlap, but `name=name=name=…` makes
/// each value run to the end of the block. None once it is spent: the
/// body names more than can be checked, and is refused.
fn part_names(block: &[u8], budget: &mut usize) -> Option<Vec<Vec<u8>>> {
    let mut names = Vec::new();
    let mut continued = Vec::new();
    let mut from = 0;
    let finder = memchr::memmem::Finder::new(b"name");
    while let Some(at) = block.get(from..).and_then(|r| finder.find(r)) {
        let start = from + at;
        from = start + 4;
        if start > 0
            && block
                .get(start - 1)
                .is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_' || *b == b'-')
        {
            continue;
        }
        let mut i = from;
        let mut extended = false;
        let mut continuation = false;
        while let Some(b) = block.get(i) {
            match b {
                b'*' => extended = true,
                b'0'..=b'9' => continuation = true,
                _ => break,
            }
            i += 1;
        }
        while block.get(i).is_some_and(|b| *b == b' ' || *b == b'\t') {
            i += 1;
        }
        if block.get(i) != Some(&b'=') {
            continue;
        }
        i += 1;
        while block.get(i).is_some_and(|b| *b == b' ' || *b == b'\t') {
            i += 1;
        }
        let rest = block.get(i..).unwrap_or_default();
        // Read at most what the budget has left (one byte more tells that
        // the value goes on).
        let (quoted, rest) = match rest.strip_prefix(b"\"") {
            Some(q) => (true, q),
            None => (false, rest),
        };
        let within = rest
            .get(..rest.len().min(budget.saturating_add(1)))
            .unwrap_or_default();
        let len = if quoted {
            within.iter().position(|b| *b == b'"')
        } else {
            within
                .iter()
                .position(|b| matches!(b, b';' | b'\r' | b'\n' | b' ' | b'\t'))
        }
        .unwrap_or(within.len());
        if len > *budget {
            return None;
        }
        *budget -= len;
        let raw = within.get(..len).unwrap_or_default();
        let mut value: Vec<u8> = if quoted {
            raw.iter().filter(|b| **b != b'\\').copied().collect()
        } else {
            raw.to_vec()
        };
        if extended {
            // `charset'lang'value`: the value after the second quote.
            if let Some(v) = value.splitn(3, |b| *b == b'\'').nth(2) {
                value = v.to_vec();
            }
            value = percent_encoding::percent_decode(&value).collect();
        }
        if continuation {
            continued.extend_from_slice(&value);
        } else {
            names.push(value);
        }
    }
    if !continued.is_empty() {
        names.push(continued);
    }
    Some(names)
}

/// The names of a multipart body's parts ([`part_names`] of each header
/// block, or of the whole body: see [`multipart_header_blocks`]); None
/// when they are more than can be checked (names inside names).
fn multipart_part_names(boundary: Option<&str>, lower: &[u8]) -> Option<Vec<Vec<u8>>> {
    let blocks = multipart_header_blocks(boundary, lower).unwrap_or_else(|| vec![lower]);
    // Values that do not overlap read each byte once; a little more for
    // a quoted `filename` holding `name=`.
    let mut budget = lower.len().saturating_mul(2).saturating_add(1024);
    let mut names = Vec::new();
    for block in blocks {
        names.extend(part_names(block, &mut budget)?);
    }
    Some(names)
}

/// A capture a route's resource is taken from that the request names
/// again as a parameter where a framework may read it instead of the path
/// (ASP.NET Core MVC binds a form field or a query parameter over a route
/// value; Laravel's `$request->name` reads the input first): in the query,
/// a form body (or a body without a Content-Type, which Rack reads as a
/// form), a multipart part's name, or a JSON body's top-level keys (when
/// the Content-Type has `/json` or `+json`), each name read as the
/// `_method` check reads it ([`is_param_key`]). Returns where, and which
/// capture; a request whose Content-Type does not read one way was refused
/// before ([`method_override`]).
fn capture_override<'n>(
    req: &Incoming,
    body: &[u8],
    captures: &[&'n str],
) -> Option<(&'static str, &'n str)> {
    param_named(req, body, captures, true)
}

/// Parameters that choose which of the upstream's routes runs, whatever
/// the request's path: WordPress dispatches its REST API on `rest_route`
/// from the query or a form body (`POST /wp-json/wp/v2/posts?rest_route=
/// /wp/v2/users/1` is a call of the users route), so the call would run
/// another route than the one it was decided on.
const ROUTE_SELECTORS: &[&str] = &["rest_route"];

/// Why a request that names a [`ROUTE_SELECTORS`] parameter in its query
/// or a form body (a multipart part's name, or a body without a
/// Content-Type: PHP fills `$_POST` from multipart bodies, Rack reads an
/// untyped body as a form) is refused, each name read as the `_method`
/// check reads it ([`is_param_key`]); None when it names none. A JSON
/// body's keys are not read: WordPress takes the route from the query
/// and `$_POST` only.
fn route_selector(req: &Incoming, body: &[u8]) -> Option<String> {
    param_named(req, body, ROUTE_SELECTORS, false).map(|(place, name)| {
        format!(
            "{place} carries `{name}`, which some upstreams (WordPress's REST API) read as the route to run whatever the path, so the upstream could run another route than the one the call was decided on ({} {}): send the route in the path only",
            req.method, req.path
        )
    })
}

/// Why a request that names a member its route records of the JSON body
/// (the first segment of a `record-input` pointer: `amount` of `/amount`,
/// `payment` of `/payment/amount`) again in its query or a form body is
/// refused; None when it does not. Rails merges query parameters over the
/// JSON body's (`POST /payments?amount=1000000` with `{"amount":10}` is
/// amount 1000000 to it), Laravel and ASP.NET Core bind either, so the
/// upstream could act on a value other than the one recorded and shown
/// to an approver. Names are read as the `_method` check reads them
/// ([`is_param_key`]: `Amount`, `amount[]`, `%61mount`); the JSON body's
/// own keys are the recorded field itself, checked by
/// [`crate::record::Recording::check_input`].
fn recorded_field_override(
    req: &Incoming,
    body: &[u8],
    record: &crate::record::Recording,
) -> Option<String> {
    let roots = record.input_roots();
    let names: Vec<&str> = roots.iter().map(String::as_str).collect();
    let (place, name) = param_named(req, body, &names, false)?;
    let pointers: Vec<&str> = record
        .input
        .iter()
        .filter(|p| crate::record::input_root(p) == name)
        .map(String::as_str)
        .collect();
    Some(format!(
        "{place} carries `{name}`, a field of the JSON body this route records (record-input {}); some frameworks merge query and form parameters with the JSON body's (in Rails the query's value wins), so the upstream could act on a value other than the one recorded and shown to an approver: send it in the JSON body only",
        pointers.join(", ")
    ))
}

/// Where a request names one of `names` as a parameter where a framework
/// may read it: the query, a form body (or a body without a
/// Content-Type, which Rack reads as a form), a multipart part's name,
/// and, with `json_keys`, a JSON body's top-level keys (when the
/// Content-Type has `/json` or `+json`). Each name is matched as the
/// request's names are read ([`param_name`], [`is_param_key`]). Returns
/// where, and which name; a request whose Content-Type does not read one
/// way was refused before ([`method_override`]).
fn param_named<'n>(
    req: &Incoming,
    body: &[u8],
    names: &[&'n str],
    json_keys: bool,
) -> Option<(&'static str, &'n str)> {
    if names.is_empty() {
        return None;
    }
    // Each name as a request's names are read (`case.id` is `case_id` to
    // PHP, so a name with a dot is matched by both spellings).
    let lower: Vec<Vec<u8>> = names.iter().map(|c| param_name(c.as_bytes())).collect();
    let which = |key: &[u8]| {
        lower
            .iter()
            .position(|n| !n.is_empty() && is_param_key(key, n))
            .and_then(|i| names.get(i).copied())
    };
    let in_form = |form: &[u8]| form_names(form).find_map(|k| which(&k));
    if let Some(c) = req.query.as_deref().and_then(|q| in_form(q.as_bytes())) {
        return Some(("the query", c));
    }
    if body.is_empty() {
        return None;
    }
    let content_type = content_type_of(req).ok()?;
    if content_type.is_empty() {
        return in_form(body).map(|c| ("the body (read as a form: it has no Content-Type)", c));
    }
    let parsed = ContentType::parse(&content_type)?;
    if parsed.media == "application/x-www-form-urlencoded"
        && let Some(c) = in_form(body)
    {
        return Some(("the form body", c));
    }
    if parsed.media.starts_with("multipart/") {
        let body_lower = body.to_ascii_lowercase();
        // Names past the budget were refused by [`method_override`]
        // already; here they count as naming one of `names`.
        let Some(parts) = multipart_part_names(parsed.boundary.as_deref(), &body_lower) else {
            return names.first().map(|c| ("the multipart body", *c));
        };
        if let Some(c) = parts.iter().find_map(|n| which(n)) {
            return Some(("the multipart body", c));
        }
    }
    if json_keys && (content_type.contains("/json") || content_type.contains("+json")) {
        let found = std::cell::Cell::new(None);
        let read = top_level_key_matches(body, &|k: &[u8]| {
            let c = which(k);
            if found.get().is_none() {
                found.set(c);
            }
            c.is_some()
        });
        if read.is_ok() {
            return found.get().map(|c| ("the JSON body", c));
        }
        // A body this parser cannot read (see `method_override`): refused
        // if it mentions one of the names or has a `\u` escape, or holds
        // any non-ASCII text (a key Go folds into a name, as `caſe_id`,
        // which searching bytes would not find).
        if !body.is_ascii() {
            return names
                .first()
                .map(|c| ("the JSON body (which the gateway cannot read whole)", *c));
        }
        let body_lower = body.to_ascii_lowercase();
        let escaped = find(&body_lower, b"\\u").is_some();
        return lower
            .iter()
            .position(|n| escaped || find(&body_lower, n).is_some())
            .and_then(|i| names.get(i).copied())
            .map(|c| ("the JSON body (which the gateway cannot read whole)", c));
    }
    None
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return None;
    }
    memchr::memmem::find(hay, needle)
}

/// Header families upstreams read as who the caller is, or where the
/// request came from (proxy, client certificate, authenticated user): only
/// the gateway may say that, in `Baton-*`, so the caller's are dropped.
const POSING_PREFIXES: &[&str] = &[
    "forwarded",
    "x-forwarded-",
    "x-real-ip",
    "true-client-ip",
    "x-original-host",
    "x-client-cert",
    "x-arr-clientcert",
    "client-cert",
    "x-ssl-client",
    "ssl-client",
    "x-remote-user",
    "remote-user",
    "x-auth-request-",
    "x-ms-client-principal",
    "x-user",
    "x-authenticated-",
    // Kubernetes request-header authentication.
    "x-remote-",
    // Grafana's auth proxy.
    "x-webauth-",
    // Identity-aware proxies: AWS ALB, Google IAP, Cloudflare Access,
    // Azure App Service, Kong, Ambassador, Pomerium.
    "x-amzn-oidc-",
    "x-goog-authenticated-user-",
    "x-goog-iap-",
    "cf-access-",
    "x-ms-token-",
    "x-consumer-",
    "x-credential-",
    "x-anonymous-consumer",
    "x-pomerium-",
    "x-envoy-",
    // Client addresses proxies and CDNs vouch for.
    "x-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
    "x-proxyuser-ip",
    // Authelia, authentik, Tailscale, Teleport, Vouch, Google Cloud
    // Endpoints, WSO2, and the usual nginx mTLS recipes.
    "remote-",
    "x-authentik-",
    "tailscale-",
    "teleport-",
    "x-vouch-",
    "x-endpoint-api-userinfo",
    "x-jwt-assertion",
    "x-ssl-",
    "ssl-",
    "x-client-dn",
    "x-client-verify",
    "x-client-s-dn",
    "x-client-i-dn",
];

/// Whether the gateway never passes on a caller's header of this name
/// (lower case), whatever the request: hop-by-hop headers, the host, the
/// caller's token, the body's length (the gateway sets its own), any
/// header with an `_` (CGI, WSGI and PHP read `Mcp_Session_Id` as
/// `Mcp-Session-Id`, `Baton_Actor` as `Baton-Actor`: a spelling the
/// gateway's own checks would not see; nginx drops them too by default),
/// a `baton-*` header (the gateway sets the caller's identity there), and
/// headers that make a server take another method or path than the one
/// the call was decided on, or another caller. Besides these, a request's
/// `Connection` header drops the headers it names.
pub(crate) fn never_forwarded(name: &str) -> bool {
    HOP_BY_HOP.contains(&name)
        || [
            http::header::HOST,
            http::header::AUTHORIZATION,
            http::header::CONTENT_LENGTH,
        ]
        .iter()
        .any(|h| h.as_str() == name)
        || name.contains('_')
        || name.starts_with("baton-")
        || OVERRIDING_HEADERS.contains(&name)
        || POSING_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// The caller's headers the upstream gets (before the gateway adds the
/// verified caller): without those [`never_forwarded`] names and those
/// the request's `Connection` names. What a route records of headers,
/// and so what an approver is shown, is read from these, never from the
/// request as it came.
pub(crate) fn forwarded_headers(incoming: &HeaderMap) -> HeaderMap {
    let mut h = incoming.clone();
    strip_hop_by_hop(&mut h);
    let dropped: Vec<HeaderName> = h
        .keys()
        .filter(|k| never_forwarded(k.as_str()))
        .cloned()
        .collect();
    for k in dropped {
        h.remove(k);
    }
    h
}

/// The request's headers as the upstream gets them: the caller's
/// [`forwarded_headers`], with the verified task, actor and chain.
pub fn upstream_headers(incoming: &HeaderMap, d: &VerifiedDelegation) -> Result<HeaderMap, String> {
    let mut h = forwarded_headers(incoming);
    let chain = d
        .chain()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    for (name, value) in [
        (HEADER_TASK, d.task_id().to_string()),
        (HEADER_ACTOR, d.agent().to_string()),
        (HEADER_CHAIN, chain),
    ] {
        let v = HeaderValue::from_str(&value).map_err(|e| format!("{name}: {e}"))?;
        h.insert(HeaderName::from_static(name), v);
    }
    Ok(h)
}

pub(crate) fn strip_hop_by_hop(h: &mut HeaderMap) {
    // Headers the Connection header names are hop-by-hop too.
    let named: Vec<String> = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|s| s.trim().to_ascii_lowercase()))
        .collect();
    for n in named {
        h.remove(n.as_str());
    }
    for n in HOP_BY_HOP {
        h.remove(n);
    }
}

/// A gate refusal as HTTP: a token no longer good is 401, a call the token
/// does not allow is 403 with the permission it would need, and a gateway
/// that cannot decide now (stale feed, policy error, no audit) is 503.
fn denial(denied: &CallDenied) -> Response {
    let message = denied.to_string();
    match denied {
        CallDenied::Expired { .. } | CallDenied::PeerRevoked { .. } => {
            invalid_token(denied.code(), &message)
        }
        CallDenied::OutOfScope { required } => refusal(
            StatusCode::FORBIDDEN,
            &format!(
                "Bearer error=\"insufficient_scope\", scope=\"{}\"",
                quoted(&required.to_string())
            ),
            denied.code(),
            &message,
        ),
        CallDenied::OverCeiling { .. }
        | CallDenied::PolicyDenied { .. }
        | CallDenied::ApprovalRequired { .. } => refusal(
            StatusCode::FORBIDDEN,
            &format!(
                "Bearer error=\"insufficient_scope\", error_description=\"{}\"",
                quoted(&message)
            ),
            denied.code(),
            &message,
        ),
        CallDenied::RevocationStale { .. }
        | CallDenied::PolicyError { .. }
        | CallDenied::AuditUnavailable(_) => {
            plain(StatusCode::SERVICE_UNAVAILABLE, denied.code(), &message)
        }
        CallDenied::Unrecordable { .. } => plain(StatusCode::BAD_REQUEST, denied.code(), &message),
    }
}

/// A held call, as HTTP: 403 while it waits for a human (with the
/// approval's id and `Retry-After`) or after a human said no; 503 when the
/// broker cannot be asked.
fn held_response(held: &Held) -> Response {
    match held {
        Held::Denied(d) => denial(d),
        Held::Waiting(a) => {
            let mut resp = warp::reply::with_status(
                warp::reply::json(&serde_json::json!({
                    "error": crate::approval::waiting_message(a),
                    "code": "approval_pending",
                    "approval_id": a.id,
                    "expires_at": a.expires_at,
                })),
                StatusCode::FORBIDDEN,
            )
            .into_response();
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("5"));
            resp
        }
        Held::Refused(a) => warp::reply::with_status(
            warp::reply::json(&serde_json::json!({
                "error": crate::approval::refused_message(a),
                "code": "approval_denied",
                "approval_id": a.id,
            })),
            StatusCode::FORBIDDEN,
        )
        .into_response(),
        Held::TokenRefused { code, message } => invalid_token(code, message),
        Held::Busy { retry_after, why } => {
            let mut resp = plain(StatusCode::TOO_MANY_REQUESTS, "approval_rate_limited", why);
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(*retry_after));
            resp
        }
        Held::Unavailable(why) => {
            tracing::warn!(error = %why, "approval unavailable; call refused");
            plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "approval_unavailable",
                "this call needs a human's approval and approvals cannot be asked for now (the gateway's log says why)",
            )
        }
    }
}

/// Why a request body was not read.
enum BodyRefused {
    Status(StatusCode),
    /// [`BODY_BUDGET`] is spent.
    Busy,
}

/// The whole request body (at most [`MAX_BODY`]), with the share of
/// `budget` it holds.
async fn read_body<S, B>(
    body: S,
    budget: &Arc<tokio::sync::Semaphore>,
) -> Result<(Bytes, Option<tokio::sync::OwnedSemaphorePermit>), BodyRefused>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: bytes::Buf,
{
    let mut body = std::pin::pin!(body);
    let mut out = BytesMut::new();
    let mut held: Option<tokio::sync::OwnedSemaphorePermit> = None;
    while let Some(chunk) = body.next().await {
        let mut chunk = chunk.map_err(|_| BodyRefused::Status(StatusCode::BAD_REQUEST))?;
        if out.len() + chunk.remaining() > MAX_BODY {
            return Err(BodyRefused::Status(StatusCode::PAYLOAD_TOO_LARGE));
        }
        let n = u32::try_from(chunk.remaining()).map_err(|_| BodyRefused::Busy)?;
        if n > 0 {
            let more = budget
                .clone()
                .try_acquire_many_owned(n)
                .map_err(|_| BodyRefused::Busy)?;
            match held.as_mut() {
                Some(h) => h.merge(more),
                None => held = Some(more),
            }
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            out.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok((out.freeze(), held))
}

/// An error with its causes (reqwest hides the reason in its sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(query: Option<&str>, content_type: &str) -> Incoming {
        let mut headers = HeaderMap::new();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_str(content_type).unwrap(),
        );
        Incoming {
            method: Method::POST,
            path: "/crm/cases/7".into(),
            query: query.map(str::to_owned),
            headers,
            cert: None,
        }
    }

    /// Every `header:*` field a route records (and shows an approver)
    /// holds what the upstream gets: a header the request's `Connection`
    /// drops, or one the gateway strips, is not recorded at all.
    #[test]
    fn recorded_headers_are_those_the_upstream_gets() {
        let record = crate::record::Recording {
            headers: ["x-amount", "x-request-id", "x-note"]
                .into_iter()
                .map(HeaderName::from_static)
                .collect(),
            ..Default::default()
        };
        let request = |connection: Option<&'static str>| {
            let mut req = incoming(None, "application/json");
            for (name, value) in [
                ("x-amount", "10"),
                ("x-request-id", "req-1"),
                ("x-note", "first"),
            ] {
                req.headers.append(name, HeaderValue::from_static(value));
            }
            req.headers
                .append("x-note", HeaderValue::from_static("second"));
            if let Some(c) = connection {
                req.headers
                    .insert(http::header::CONNECTION, HeaderValue::from_static(c));
            }
            req
        };
        let consistent = |req: &Incoming| {
            let fields = recorded_request(&record, req, b"", &|_| String::new());
            let upstream = forwarded_headers(&req.headers);
            for (field, value) in &fields {
                let name = field.strip_prefix("header:").unwrap();
                let sent: Vec<&str> = upstream
                    .get_all(name)
                    .iter()
                    .map(|v| v.to_str().unwrap())
                    .collect();
                assert!(!sent.is_empty(), "{field} recorded but not forwarded");
                assert_eq!(*value, sent.join(", "), "{field}");
            }
            fields
        };
        // Control: no `Connection`: every named header is recorded.
        let plain = consistent(&request(None));
        assert_eq!(plain["header:x-amount"], "10");
        assert_eq!(plain["header:x-request-id"], "req-1");
        assert_eq!(plain["header:x-note"], "first, second");
        // Attack: `Connection` drops `X-Amount` on the way; the approver
        // must not be shown an amount the upstream never gets.
        let dropped = consistent(&request(Some("keep-alive, X-Amount")));
        assert!(!dropped.contains_key("header:x-amount"), "{dropped:?}");
        assert_eq!(dropped["header:x-request-id"], "req-1");
        let all = consistent(&request(Some("x-amount,x-note,x-request-id")));
        assert!(all.is_empty(), "{all:?}");
    }

    /// A path capture the resource is taken from, named again where a
    /// framework reads parameters (ASP.NET Core MVC, Laravel), is found in
    /// every place and spelling the `_method` check reads; an unrelated
    /// field, or the name only as a value or nested, is not.
    #[test]
    fn a_parameter_named_as_a_resource_capture_is_found_wherever_a_framework_reads_it() {
        let caps = ["account", "case_id"];
        let found = |req: &Incoming, body: &[u8]| capture_override(req, body, &caps);
        for q in [
            "account=42",
            "ACCOUNT=42",
            "q=1&Account=42",
            "q=1;account=42",
            "%61ccount=42",
            "+account=42",
            "account[]=42",
            "account%00x=42",
            "case.id=42",
            "case+id=42",
            "case[id=42",
        ] {
            let at = found(&incoming(Some(q), "text/plain"), b"");
            assert_eq!(at.map(|(p, _)| p), Some("the query"), "{q}");
        }
        assert_eq!(
            found(&incoming(Some("case.id=42"), "text/plain"), b""),
            Some(("the query", "case_id"))
        );
        let form = incoming(None, "application/x-www-form-urlencoded; charset=utf-8");
        assert_eq!(
            found(&form, b"note=hi&account=42"),
            Some(("the form body", "account"))
        );
        let mut untyped = incoming(None, "text/plain");
        untyped.headers.remove(http::header::CONTENT_TYPE);
        assert_eq!(
            found(&untyped, b"account=42").map(|(p, _)| p),
            Some("the body (read as a form: it has no Content-Type)")
        );
        let multipart = incoming(None, MULTIPART);
        for body in [
            "--XyZ\r\nContent-Disposition: form-data; name=\"account\"\r\n\r\n42\r\n--XyZ--\r\n",
            "--XyZ\nContent-Disposition: form-data; NAME=Account\n\n42\n--XyZ--\n",
            "--XyZ\r\nContent-Disposition: form-data; name = \"account\"\r\n\r\n42\r\n--XyZ--\r\n",
            "--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--XyZ\r\nContent-Disposition: form-data; name*=utf-8''%61ccount\r\n\r\n42\r\n--XyZ--\r\n",
            "--XyZ\r\nContent-Disposition: form-data; name*0=\"acc\"; name*1=\"ount\"\r\n\r\n42\r\n--XyZ--\r\n",
        ] {
            assert_eq!(
                found(&multipart, body.as_bytes()).map(|(p, _)| p),
                Some("the multipart body"),
                "{body}"
            );
        }
        // No part under the boundary: every name in the body counts.
        assert!(
            found(
                &incoming(None, "multipart/form-data; boundary=safe"),
                b"--evil\r\nContent-Disposition: form-data; name=\"account\"\r\n\r\n42\r\n--evil--"
            )
            .is_some()
        );
        let json = incoming(None, "application/json");
        for body in [
            r#"{"q":"acme","account":42}"#,
            r#"{"Account":42}"#,
            r#"{"\u0061ccount":42}"#,
            r#"{"case_id":42}"#,
            // Go folds keys the Unicode way: the long s is `s` to it.
            "{\"ca\u{17f}e_id\":42}",
            "{\"ca\\u017fe_id\":42}",
        ] {
            assert_eq!(
                found(&json, body.as_bytes()).map(|(p, _)| p),
                Some("the JSON body"),
                "{body}"
            );
        }
        assert!(found(&json, b"{\"a\":1}\n{\"account\":42}").is_some());
        // Not JSON this parser reads, with non-ASCII text: refused, as a
        // key in it may fold into a capture's name.
        assert_eq!(
            found(&json, "{\"ca\u{17f}e_id\":42".as_bytes()).map(|(p, _)| p),
            Some("the JSON body (which the gateway cannot read whole)")
        );
        // The Kelvin sign is `k` to Go.
        assert_eq!(
            capture_override(&json, "{\"\u{212a}ey\":1}".as_bytes(), &["key"]),
            Some(("the JSON body", "key"))
        );
        // Controls: an unrelated field, the name only as a value, nested,
        // in a file's name, or as a longer name; a route whose resource
        // takes no capture.
        assert_eq!(found(&incoming(Some("q=account"), "text/plain"), b""), None);
        assert_eq!(
            found(&incoming(Some("accounts=1"), "text/plain"), b""),
            None
        );
        assert_eq!(found(&form, b"note=account&my_account=1"), None);
        assert_eq!(
            found(
                &json,
                br#"{"q":"account","nested":{"account":42},"accountId":1}"#
            ),
            None
        );
        assert_eq!(found(&json, b""), None);
        let file = "--XyZ\r\nContent-Disposition: form-data; name=\"note\"; filename=\"account\"\r\n\r\naccount=42\r\n--XyZ--\r\n";
        assert_eq!(found(&multipart, file.as_bytes()), None);
        assert_eq!(
            capture_override(&incoming(Some("account=42"), "text/plain"), b"", &[]),
            None
        );
    }

    /// WordPress runs the REST route `rest_route` names (from the query or
    /// `$_POST`) whatever the path: `POST /wp-json/wp/v2/posts?rest_route=
    /// /wp/v2/users/1` is a call of the users route. Refused in every
    /// spelling the `_method` check reads, in the query and form bodies;
    /// the name only as a value, a longer name, or a JSON body's key (not
    /// read by WordPress) are the controls.
    #[test]
    fn a_parameter_that_selects_the_upstreams_route_is_refused_where_it_is_read() {
        for q in [
            "rest_route=/wp/v2/users/1",
            "REST_ROUTE=/x",
            "rest%5Froute=/x",
            "%72est_route=/x",
            "rest.route=/x",
            "rest+route=/x",
            "rest_route[]=/x",
            "rest_route[a]=/x",
            "per_page=5&rest_route=/x",
            "per_page=5;rest_route=/x",
            "rest_route",
        ] {
            let why = route_selector(&incoming(Some(q), "text/plain"), b"").unwrap_or_default();
            assert!(
                why.starts_with("the query carries `rest_route`") && why.contains("WordPress"),
                "{q}: {why}"
            );
            assert!(why.contains("POST /crm/cases/7"), "{q}: {why}");
        }
        let form = incoming(None, "application/x-www-form-urlencoded");
        let why = route_selector(&form, b"title=x&rest_route=%2Fwp%2Fv2%2Fusers%2F1");
        assert!(
            why.is_some_and(|w| w.starts_with("the form body carries `rest_route`")),
            "form"
        );
        let mut untyped = incoming(None, "text/plain");
        untyped.headers.remove(http::header::CONTENT_TYPE);
        assert!(route_selector(&untyped, b"rest_route=/x").is_some());
        let multipart = incoming(None, MULTIPART);
        let body = "--XyZ\r\nContent-Disposition: form-data; name=\"rest_route\"\r\n\r\n/wp/v2/users/1\r\n--XyZ--\r\n";
        assert!(
            route_selector(&multipart, body.as_bytes())
                .is_some_and(|w| w.starts_with("the multipart body carries `rest_route`"))
        );
        // Controls.
        for q in [
            "per_page=5",
            "q=rest_route",
            "rest_routes=1",
            "my_rest_route=1",
        ] {
            assert_eq!(
                route_selector(&incoming(Some(q), "text/plain"), b""),
                None,
                "{q}"
            );
        }
        assert_eq!(route_selector(&form, b"title=rest_route&per_page=5"), None);
        let json = incoming(None, "application/json");
        assert_eq!(route_selector(&json, br#"{"rest_route":"/x"}"#), None);
    }

    /// Rails merges query parameters over the JSON body's (the query
    /// wins): `POST /payments?amount=1000000` with `{"amount":10}` would be
    /// recorded, and shown to an approver, as amount 10. A request naming
    /// a `record-input` field's top-level member again in its query or a
    /// form body is refused, in every spelling the `_method` check reads;
    /// the JSON body's own member is the control.
    #[test]
    fn a_recorded_input_field_named_again_outside_the_json_body_is_refused() {
        let record = crate::record::Recording {
            input: vec!["/amount".into(), "/payment/to".into(), "/a~1b".into()],
            ..Default::default()
        };
        let json = |q: Option<&str>| incoming(q, "application/json");
        let body = br#"{"amount":10,"payment":{"to":"vendor"}}"#;
        for (q, name, pointer) in [
            ("amount=1000000", "amount", "/amount"),
            ("AMOUNT=1000000", "amount", "/amount"),
            ("%61mount=1000000", "amount", "/amount"),
            ("amount[]=1000000", "amount", "/amount"),
            ("ref=x&amount=1000000", "amount", "/amount"),
            ("payment[to]=mallory", "payment", "/payment/to"),
            ("PAYMENT[to][x]=1", "payment", "/payment/to"),
            ("a%2Fb=1", "a/b", "/a~1b"),
        ] {
            let why = recorded_field_override(&json(Some(q)), body, &record).unwrap_or_default();
            assert!(
                why.starts_with(&format!("the query carries `{name}`"))
                    && why.contains(&format!("record-input {pointer}"))
                    && why.contains("Rails"),
                "{q}: {why}"
            );
        }
        let form = incoming(None, "application/x-www-form-urlencoded");
        assert!(
            recorded_field_override(&form, b"amount=1000000", &record)
                .is_some_and(|w| w.starts_with("the form body carries `amount`"))
        );
        // Controls: the JSON body's own members (the recorded fields), an
        // unrelated query, the name only as a value or nested, a route
        // that records no input.
        assert_eq!(recorded_field_override(&json(None), body, &record), None);
        for q in ["ref=x", "q=amount", "amounts=1", "to=x", "b=1"] {
            assert_eq!(
                recorded_field_override(&json(Some(q)), body, &record),
                None,
                "{q}"
            );
        }
        assert_eq!(
            recorded_field_override(
                &json(Some("amount=1000000")),
                body,
                &crate::record::Recording::default()
            ),
            None
        );
    }

    /// A call's record holds its query's keyed digest, whatever the route
    /// names: the parameters a framework merges with the body's are bound
    /// to the record; a request without a query records none.
    #[test]
    fn the_query_is_recorded_beside_the_recorded_fields() {
        let digest = |b: &[u8]| format!("hmac-of-{}-bytes", b.len());
        let plain = crate::record::Recording::default();
        let req = incoming(Some("ref=x&per_page=5"), "application/json");
        let fields = recorded_request(&plain, &req, br#"{"amount":10}"#, &digest);
        assert_eq!(
            fields,
            BTreeMap::from([(
                crate::record::QUERY_FIELD.to_owned(),
                "hmac-of-16-bytes".to_owned()
            )])
        );
        let record = crate::record::Recording {
            input: vec!["/amount".into()],
            ..Default::default()
        };
        let fields = recorded_request(&record, &req, br#"{"amount":10}"#, &digest);
        assert_eq!(fields["input:/amount"], "10");
        assert_eq!(fields["request:query-digest"], "hmac-of-16-bytes");
        // A long one: its digest, within the record's bounds.
        let long = format!("ref=x&pad={}", "p".repeat(5000));
        let fields = recorded_request(&plain, &incoming(Some(&long), ""), b"", &digest);
        assert_eq!(
            fields["request:query-digest"],
            format!("hmac-of-{}-bytes", long.len())
        );
        assert!(baton_core::report_bounds::check_recorded("recorded", &fields).is_ok());
        // Controls: no query, no field.
        let fields = recorded_request(&plain, &incoming(None, ""), b"", &digest);
        assert!(fields.is_empty(), "{fields:?}");
        let fields = recorded_request(
            &record,
            &incoming(None, "application/json"),
            br#"{"amount":10}"#,
            &digest,
        );
        assert!(!fields.contains_key("request:query-digest"), "{fields:?}");
    }

    const MULTIPART: &str = "multipart/form-data; boundary=XyZ";

    #[test]
    fn a_multipart_body_is_read_in_one_pass_whatever_it_repeats() {
        // Names inside names: each bare value would run to the end of the
        // body (n^2/10 bytes copied for n bytes): refused instead, with or
        // without a boundary, after reading about twice the body.
        let typed = |ct: &str| incoming(None, ct);
        let quoted = [&b"name=\""[..], &b"name=".repeat(200_000)].concat();
        for (ct, body) in [
            ("multipart/form-data", b"name=".repeat(200_000)),
            ("multipart/form-data", b"name0=".repeat(200_000)),
            (
                "multipart/form-data; boundary=XyZ",
                b"name=".repeat(200_000),
            ),
            ("multipart/form-data; boundary=XyZ", quoted),
        ] {
            let mut budget = body.len() * 2 + 1024;
            assert_eq!(part_names(&body, &mut budget), None, "{ct}");
            let why = method_override(&typed(ct), &body).unwrap_or_default();
            assert!(why.contains("inside other names' values"), "{ct}: {why}");
            assert_eq!(
                capture_override(&typed(ct), &body, &["account"]),
                Some(("the multipart body", "account")),
                "{ct}"
            );
        }
        // Many delimiters, each part a block: linear (this took minutes
        // when each part searched the rest of the body again).
        let body = b"--XyZ".repeat(500_000);
        let lower = body.to_ascii_lowercase();
        let blocks = multipart_header_blocks(Some("xyz"), &lower).unwrap();
        assert_eq!(blocks.len(), 500_000);
        assert_eq!(method_override(&typed(MULTIPART), &body), None);
        assert_eq!(
            capture_override(&typed(MULTIPART), &body, &["account"]),
            None
        );
        // Controls: a body's blocks as before the one-pass reading: each
        // ends at the later of the first CRLF CRLF and the first LF LF
        // after its delimiter, or at the part's end (so the first part's
        // data is searched too: the LF LF is in the second part).
        let real = b"--xyz\r\ncontent-disposition: form-data; name=\"note\"\r\n\r\nname=x name=y\r\n--xyz\r\ncontent-disposition: form-data; name=account\n\n42\n--xyz--\r\n";
        let blocks = multipart_header_blocks(Some("xyz"), real).unwrap();
        assert_eq!(
            blocks,
            vec![
                &b"\r\ncontent-disposition: form-data; name=\"note\"\r\n\r\nname=x name=y\r\n"[..],
                b"\r\ncontent-disposition: form-data; name=account",
                b"--\r\n",
            ]
        );
        assert_eq!(
            multipart_part_names(Some("xyz"), real),
            Some(vec![
                b"note".to_vec(),
                b"x".to_vec(),
                b"y".to_vec(),
                b"account".to_vec()
            ])
        );
        let mut budget = 3;
        assert_eq!(part_names(b"name=abcd", &mut budget), None);
        let mut budget = 4;
        assert_eq!(
            part_names(b"name=abcd", &mut budget),
            Some(vec![b"abcd".to_vec()])
        );
        assert_eq!(budget, 0);
    }
    #[test]
    fn only_a_body_typed_json_one_way_counts_as_json() {
        for ct in [
            "application/json",
            "application/json; charset=utf-8",
            "application/problem+json",
        ] {
            assert!(json_typed(&incoming(None, ct)), "{ct}");
        }
        for ct in [
            "application/x-www-form-urlencoded",
            "text/plain; x=/json",
            "text/json",
            "application/json, text/plain",
            "application/json x",
        ] {
            assert!(!json_typed(&incoming(None, ct)), "{ct}");
        }
        let mut none = incoming(None, "application/json");
        none.headers.remove(http::header::CONTENT_TYPE);
        assert!(!json_typed(&none));
        let mut two = incoming(None, "application/json");
        two.headers.append(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert!(!json_typed(&two));
        // Dropped on the way by `Connection`: the upstream gets no type.
        let mut dropped = incoming(None, "application/json");
        dropped.headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("content-type"),
        );
        assert!(!json_typed(&dropped));
    }

    #[tokio::test]
    async fn request_bodies_in_flight_share_one_budget() {
        let budget = Arc::new(tokio::sync::Semaphore::new(10));
        let chunks = |parts: &[&'static [u8]]| {
            futures::stream::iter(
                parts
                    .iter()
                    .map(|p| Ok::<_, warp::Error>(Bytes::from_static(p)))
                    .collect::<Vec<_>>(),
            )
        };
        let (first, held) = read_body(chunks(&[b"12345", b"678"]), &budget)
            .await
            .ok()
            .unwrap();
        assert_eq!(&first[..], b"12345678");
        assert_eq!(budget.available_permits(), 2);
        // A second body that would pass the budget while the first is held.
        assert!(matches!(
            read_body(chunks(&[b"12", b"3"]), &budget).await,
            Err(BodyRefused::Busy)
        ));
        assert_eq!(
            budget.available_permits(),
            2,
            "a refused body holds nothing"
        );
        drop(held);
        // Control: once the first is answered, the same body is read.
        let (second, _held) = read_body(chunks(&[b"12", b"3"]), &budget)
            .await
            .ok()
            .unwrap();
        assert_eq!(&second[..], b"123");
    }

    #[tokio::test]
    async fn an_answer_holds_its_share_of_the_budget_until_it_is_taken() {
        use http_body_util::BodyExt as _;
        let budget = Arc::new(tokio::sync::Semaphore::new(100));
        let answer =
            |body: Vec<u8>| reqwest::Response::from(http::Response::new(reqwest::Body::from(body)));
        let (status, headers, out, held) = read_answer(answer(vec![b'x'; 60]), &budget)
            .await
            .ok()
            .unwrap();
        assert_eq!(budget.available_permits(), 40);
        // Another answer that would pass the budget while the first is
        // held: busy, and it holds nothing.
        assert!(matches!(
            read_answer(answer(vec![b'y'; 50]), &budget).await,
            Err(AnswerRefused::Busy(_))
        ));
        assert_eq!(budget.available_permits(), 40);
        // The first, as the caller gets it: still held until its body is
        // taken (a caller that never reads keeps holding its share).
        let resp = held_answer(status, headers, out, held);
        assert_eq!(resp.headers()[http::header::CONTENT_LENGTH], "60");
        assert_eq!(budget.available_permits(), 40);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], &[b'x'; 60][..]);
        assert_eq!(budget.available_permits(), 100);
        // Control: now the second is read.
        let (_, _, second, _held) = read_answer(answer(vec![b'y'; 50]), &budget)
            .await
            .ok()
            .unwrap();
        assert_eq!(second.len(), 50);
    }

    #[tokio::test]
    async fn a_bodiless_answer_keeps_the_length_it_stands_for() {
        let budget = Arc::new(tokio::sync::Semaphore::new(100));
        let answer = |length: &'static str, body: &'static [u8]| {
            let mut r = http::Response::new(reqwest::Body::from(body));
            r.headers_mut().insert(
                http::header::CONTENT_LENGTH,
                HeaderValue::from_static(length),
            );
            reqwest::Response::from(r)
        };
        // A HEAD's answer: no body, the length of the GET's.
        let (status, headers, out, held) = read_answer(answer("1234", b""), &budget)
            .await
            .ok()
            .unwrap();
        let resp = held_answer(status, headers, out, held);
        assert_eq!(resp.headers()[http::header::CONTENT_LENGTH], "1234");
        // A length that is not a number is not passed on.
        let (_, headers, _, _) = read_answer(answer("12, 12", b""), &budget)
            .await
            .ok()
            .unwrap();
        assert!(headers.get(http::header::CONTENT_LENGTH).is_none());
        // Control: with a body, the length is what was read, whatever the
        // upstream stated.
        let (status, headers, out, held) = read_answer(answer("99", b"abc"), &budget)
            .await
            .ok()
            .unwrap();
        let resp = held_answer(status, headers, out, held);
        assert_eq!(resp.headers()[http::header::CONTENT_LENGTH], "3");
    }

    #[test]
    fn an_encoded_request_body_is_refused() {
        let mut req = incoming(None, "application/x-www-form-urlencoded");
        // Control: no encoding, or `identity`.
        assert_eq!(encoded_body(&req), None);
        req.headers.insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        assert_eq!(encoded_body(&req), None);
        for enc in ["gzip", "identity, gzip", "deflate", "br", "x-gzip", "GZIP"] {
            req.headers.insert(
                http::header::CONTENT_ENCODING,
                HeaderValue::from_static(enc),
            );
            let why = encoded_body(&req).unwrap();
            assert!(why.contains("Content-Encoding"), "{enc}: {why}");
        }
        req.headers.insert(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        req.headers.append(
            http::header::CONTENT_ENCODING,
            HeaderValue::from_static("gzip"),
        );
        assert!(encoded_body(&req).is_some());
    }

    fn leaf(ca: &baton_ca::Ca, who: &str) -> Vec<u8> {
        let id = baton_core::SpiffeId::parse(who).unwrap();
        let key = baton_ca::WorkloadKey::generate().unwrap();
        let svid = ca
            .sign_x509_svid(
                &key.csr_der(&id).unwrap(),
                &id,
                std::time::Duration::from_secs(600),
                &[],
                std::time::SystemTime::now(),
            )
            .unwrap();
        svid.cert_chain_der[0].clone()
    }

    #[test]
    fn a_peer_certificate_is_read_once_and_each_leaf_as_itself() {
        let ca = baton_ca::Ca::load_or_create(
            baton_ca::CaConfig::new("example.org".parse().unwrap()),
            std::time::SystemTime::now() - std::time::Duration::from_secs(60),
        )
        .unwrap();
        let (a, b) = (
            leaf(&ca, "spiffe://example.org/agents/a"),
            leaf(&ca, "spiffe://example.org/agents/b"),
        );
        let cache = PeerCache::default();
        let first = cache.get(&a).unwrap();
        assert!(Arc::ptr_eq(&first, &cache.get(&a).unwrap()));
        assert_eq!(first.spiffe_id().as_str(), "spiffe://example.org/agents/a");
        // Another leaf is read as itself, not as a cached one.
        let other = cache.get(&b).unwrap();
        assert_eq!(other.spiffe_id().as_str(), "spiffe://example.org/agents/b");
        assert_ne!(other.serial_hex(), first.serial_hex());
        // One byte changed is another key: read again, never the cached one.
        let mut tampered = a.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 1;
        if let Ok(p) = cache.get(&tampered) {
            assert!(!Arc::ptr_eq(&p, &first));
        }
        assert!(cache.get(b"not a certificate").is_err());
    }

    /// Where `method_override` found a `_method` (the place its message
    /// names), or its whole refusal.
    fn overrides(req: &Incoming, body: &[u8]) -> Option<String> {
        method_override(req, body).map(|m| match m.split_once(" carries `_method`") {
            Some((place, _)) => place.to_owned(),
            None => m,
        })
    }

    fn some(s: &str) -> Option<String> {
        Some(s.to_owned())
    }

    #[test]
    fn method_override_is_found_in_every_body_a_framework_reads() {
        let form = incoming(None, "application/x-www-form-urlencoded");
        assert_eq!(
            overrides(&form, b"a=1&%5Fmethod=DELETE"),
            some("the form body")
        );
        assert_eq!(
            overrides(&incoming(Some("_METHOD=put"), "text/plain"), b""),
            some("the query")
        );
        // PHP's spellings of `_method`: `.`/space for `_`, a leading space,
        // a NUL cut, an array.
        for q in [
            ".method=DELETE",
            "+_method=DELETE",
            "%20_method=DELETE",
            "_method%00x=DELETE",
            "_method[]=DELETE",
            "a=1;_method=DELETE",
        ] {
            assert_eq!(
                overrides(&incoming(Some(q), "text/plain"), b""),
                some("the query"),
                "{q}"
            );
        }
        // No Content-Type (or one `Connection` drops): Rack reads a form.
        let mut untyped = incoming(None, "text/plain");
        untyped.headers.remove(http::header::CONTENT_TYPE);
        assert_eq!(
            overrides(&untyped, b"_method=DELETE"),
            some("the body (read as a form: it has no Content-Type)")
        );
        let mut hidden = incoming(None, "application/json");
        hidden.headers.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("Content-Type"),
        );
        assert_eq!(
            overrides(&hidden, b"_method=DELETE"),
            some("the body (read as a form: it has no Content-Type)")
        );
        let multipart = incoming(None, MULTIPART);
        for body in [
            "--XyZ\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--XyZ--\r\n",
            "--XyZ\nContent-Disposition: form-data; name=_METHOD\n\nDELETE\n--XyZ--\n",
            "--XyZ\r\nContent-Disposition: form-data; name=\"a\"\r\n\r\n1\r\n--XyZ\r\nContent-Disposition: form-data; name*=utf-8''_method\r\n\r\nDELETE\r\n--XyZ--\r\n",
        ] {
            assert_eq!(
                overrides(&multipart, body.as_bytes()),
                some("the multipart body"),
                "{body}"
            );
        }
        // Two boundaries: parsers disagree on which one counts.
        let two = incoming(None, "multipart/form-data; boundary=A; boundary=B");
        assert!(
            overrides(
                &two,
                b"--B\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--B--"
            )
            .is_some_and(|m| m.contains("is not `type/subtype`"))
        );
        // No boundary: the whole body is searched (fail closed).
        assert_eq!(
            overrides(
                &incoming(None, "multipart/form-data"),
                b"--q\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE"
            ),
            some("the multipart body")
        );
        for ct in [
            "application/json",
            "application/merge-patch+json; charset=utf-8",
            "text/json",
        ] {
            assert_eq!(
                overrides(&incoming(None, ct), br#"{"id":7,"_Method":"DELETE"}"#),
                some("the JSON body"),
                "{ct}"
            );
        }
        // The top-level keys are read as a stream: past a value nested
        // deeper than a parser builds (PHP reads 512 levels), and past a
        // value of 150,000 numbers.
        let deep = format!(
            "{{\"x\":{}{},\"_method\":\"DELETE\"}}",
            "[".repeat(600),
            "]".repeat(600)
        );
        let wide = format!(
            "{{\"x\":[{}0],\"_method\":\"DELETE\"}}",
            "0,".repeat(150_000)
        );
        for body in [deep, wide] {
            assert!(
                overrides(&incoming(None, "application/json"), body.as_bytes())
                    .is_some_and(|m| m == "the JSON body")
            );
        }
        // JSON the gateway cannot read (JSON lines) is not passed on unread.
        assert!(
            overrides(
                &incoming(None, "application/json"),
                b"{\"a\":1}\n{\"_method\":\"DELETE\"}"
            )
            .is_some()
        );
        assert!(overrides(&incoming(None, "application/json"), b"not json _method").is_some());
        assert!(
            overrides(
                &incoming(None, "application/json"),
                b"{\"\\u005fmethod\":\"DELETE\"}"
            )
            .is_some()
        );
        // Rack ends the media type at a comma too.
        assert!(
            overrides(
                &incoming(None, "application/x-www-form-urlencoded, x"),
                b"_method=DELETE"
            )
            .is_some_and(|m| m.contains("is not `type/subtype`"))
        );
        // Rack takes the last `boundary=` anywhere; a body with no part
        // under the boundary the gateway read is searched whole.
        for ct in [
            "multipart/form-data; boundary=safe; x-boundary=evil",
            "multipart/form-data; foo=\"boundary=evil\"; boundary=safe",
            "multipart/form-data; xboundaryx=evil; boundary=safe",
            "multipart/form-data; boundary=evil,x",
            "multipart/form-data; boundary =evil",
        ] {
            assert!(
                overrides(&incoming(None, ct), b"--evil\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--evil--").is_some(),
                "{ct}"
            );
        }
        // A Content-Type parsers cut differently (PHP at a space, Laravel
        // reading `/json` in a parameter).
        for ct in ["application/x-www-form-urlencoded x", "text/plain; x=/json"] {
            assert!(
                overrides(&incoming(None, ct), br#"{"_method":"DELETE"}"#).is_some(),
                "{ct}"
            );
        }
        assert_eq!(
            overrides(
                &incoming(None, "text/plain; x=\"a/json\""),
                br#"{"_method":"DELETE"}"#
            ),
            some("the JSON body")
        );
        // JSON serde cannot read but PHP can: an escaped `m`, a huge number.
        assert!(
            overrides(
                &incoming(None, "application/json"),
                br#"{"_\u006dethod":"DELETE","n":1e400}"#
            )
            .is_some()
        );
        // A header block with a bare LF LF before the real CRLF CRLF.
        assert_eq!(
            overrides(
                &multipart,
                b"--XyZ\r\nX: y\n\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--XyZ--"
            ),
            some("the multipart body")
        );
        assert_eq!(
            overrides(
                &incoming(None, "multipart/form-data; boundary=safe"),
                b"--evil\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--evil--"
            ),
            some("the multipart body")
        );
        // Two Content-Types: either could be the one read.
        let mut twice = incoming(None, "application/json");
        twice.headers.append(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        assert!(overrides(&twice, b"{}").is_some_and(|m| m.contains("more than one Content-Type")));
    }

    #[test]
    fn a_body_in_a_charset_that_decodes_to_other_characters_is_refused() {
        // UTF-7: `+ACI-` is a quote, so a memo hides `"amount":1000000`
        // from every check made on the bytes; `+AF8-method` is `_method`.
        let utf7 = br#"{"amount":10,"memo":"+ACIALAAiAGEAbQBvAHUAbgB0ACIAOgAxADAAMAAwADAAMAAwACwAIgB4ACIAOgAi-"}"#;
        for ct in [
            "application/json; charset=utf-7",
            "application/json; charset=\"UTF-7\"",
            "application/json; charset=unicode_escape",
            "application/json; charset=utf-16",
            "application/x-www-form-urlencoded; charset=utf-7",
            "application/json; charset=utf-8; charset=utf-7",
            // RFC 2231 names Django and Werkzeug read as `charset`.
            "application/json; charset*=utf-7",
            "application/json; charset=utf-8; charset*=utf-7",
            "application/json; charset*=utf-8''utf%2D7",
            "application/json; charset*0=utf-7",
            "application/json; x-charset=utf-7",
        ] {
            let req = incoming(None, ct);
            assert!(
                overrides(&req, utf7).is_some_and(|m| m.contains("charset")),
                "{ct}"
            );
            assert!(!json_typed(&req), "{ct}");
        }
        // Control: the same body as UTF-8 is JSON and has no override.
        let req = incoming(None, "application/json; charset=utf-8");
        assert_eq!(overrides(&req, utf7), None);
        assert!(json_typed(&req));
    }

    #[test]
    fn a_body_that_only_mentions_method_is_forwarded() {
        let multipart = incoming(None, MULTIPART);
        let file = "--XyZ\r\nContent-Disposition: form-data; name=\"notes\"; filename=\"n.txt\"\r\n\r\nset _method=DELETE here\r\n--XyZ--\r\n";
        assert_eq!(overrides(&multipart, file.as_bytes()), None);
        let json = incoming(None, "application/json");
        assert_eq!(
            overrides(&json, br#"{"note":"_method","nested":{"_method":"x"}}"#),
            None
        );
        assert_eq!(overrides(&json, b""), None);
        assert_eq!(overrides(&json, b"[1,2]"), None);
        // JSON lines or a BOM: not parsed here, passed when they do not
        // mention a method.
        assert_eq!(
            overrides(
                &incoming(None, "application/jsonl"),
                b"{\"a\":1}\n{\"b\":2}\n"
            ),
            None
        );
        assert_eq!(overrides(&json, b"\xef\xbb\xbf{\"a\":1}"), None);
        assert_eq!(
            overrides(
                &incoming(None, "application/problem+json"),
                br#"{"title":"x"}"#
            ),
            None
        );
        // A large honest body with an escaped accent (Python's json.dumps
        // writes `\u00e9`) is read as a stream and forwarded.
        let big = format!(r#"{{"name":"caf\u00e9","v":[{}0]}}"#, "0,".repeat(150_000));
        assert_eq!(overrides(&json, big.as_bytes()), None);
        // Browsers' multipart boundaries hold the word `boundary`.
        for ct in [
            "multipart/form-data; boundary=----WebKitFormBoundary7MA4YWxkTrZu0gW",
            "multipart/form-data; boundary=----geckoformboundary1a2b3c",
        ] {
            let b = ct.split_once("boundary=").unwrap().1;
            let body = format!(
                "--{b}\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--{b}--\r\n"
            );
            assert_eq!(
                overrides(&incoming(None, ct), body.as_bytes()),
                None,
                "{ct}"
            );
        }
        // UTF-8 and ASCII-compatible charsets read as their bytes.
        for ct in [
            "application/json; charset=utf-8",
            "application/json; charset=\"UTF-8\"",
            "application/x-www-form-urlencoded; charset=iso-8859-1",
        ] {
            assert_eq!(overrides(&incoming(None, ct), br#"{"a":1}"#), None, "{ct}");
        }
        let form = incoming(None, "application/x-www-form-urlencoded");
        assert_eq!(overrides(&form, b"q=_method"), None);
        assert_eq!(overrides(&form, b"my_method=x&methods=y"), None);
        let mut untyped = incoming(None, "text/plain");
        untyped.headers.remove(http::header::CONTENT_TYPE);
        assert_eq!(overrides(&untyped, b"q=1"), None);
        // A JSON body under another content type is not read as JSON by
        // the frameworks that take `_method`.
        assert_eq!(
            overrides(&incoming(None, "text/plain"), br#"{"_method":"DELETE"}"#),
            None
        );
    }
}
