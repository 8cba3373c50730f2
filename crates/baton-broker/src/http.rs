//! The broker's HTTP routes (warp filters). The listeners themselves live in
//! `baton-tls`: the node listener is HTTPS with optional mTLS and puts the
//! verified peer into `PeerIdentity`; the admin listener is a Unix socket
//! that puts the caller's credentials into `UnixPeer`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use baton_core::NewEntry;
use baton_core::api::{
    ApiError, AttestRequest, EntryList, JoinTokenRequest, RenewRequest, SignJwtRequest,
    SignX509Request,
};
use baton_tls::{PeerCertificate, PeerIdentity, UnixPeer};
use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::revocation::Revoker;
use crate::service::{AuthenticatedNode, Broker, BrokerError};

/// Largest body of a route that carries one request (every route but the
/// batch ones).
pub(crate) const MAX_BODY: u64 = 64 * 1024;
/// Largest body of a batch route: `POST /v1/node/sign-x509` (up to
/// [`crate::service::MAX_SIGN_BATCH`] CSRs) and `POST /v1/audit/tool-calls`
/// (up to 1000 reports).
pub(crate) const MAX_BATCH_BODY: u64 = 4 * 1024 * 1024;

/// A body over its route's limit.
#[derive(Debug)]
struct TooLarge {
    limit: u64,
}
impl warp::reject::Reject for TooLarge {}

/// Runs `work` (SQLite, the audit log's group commit, CA signing) on the
/// blocking pool, so a slow disk or a burst of signatures never holds one
/// of the few async workers that every connection shares.
pub(crate) async fn blocking<T, W>(work: W) -> Result<T, BrokerError>
where
    T: Send + 'static,
    W: FnOnce() -> Result<T, BrokerError> + Send + 'static,
{
    tokio::task::spawn_blocking(work)
        .await
        .unwrap_or_else(|e| Err(BrokerError::Hook(format!("a worker thread failed: {e}"))))
}

/// Answers with what `work` (a sync call of the core: the datastore, the
/// audit log, signing) returns, run on the blocking pool.
pub(crate) async fn answer<T, W>(work: W) -> Result<Response, Infallible>
where
    T: Serialize + Send + 'static,
    W: FnOnce() -> Result<T, BrokerError> + Send + 'static,
{
    respond(blocking(work).await)
}

/// Runs a handler that mixes blocking work with awaits (a secret lease:
/// signature checks, SQLite and the audit log around calls to its engine)
/// on the blocking pool, driven by the current runtime.
pub(crate) async fn on_blocking_thread<T, F>(work: F) -> Result<T, BrokerError>
where
    T: Send + 'static,
    F: std::future::Future<Output = Result<T, BrokerError>> + Send + 'static,
{
    let handle = tokio::runtime::Handle::current();
    blocking(move || handle.block_on(work)).await
}

fn error_reply(status: StatusCode, code: &str, message: String, field: Option<&str>) -> Response {
    let body = ApiError {
        code: code.to_owned(),
        message,
        field: field.map(str::to_owned),
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

/// What a caller is told about a failure inside the broker: no internal
/// detail (database, CA, revocation or audit store errors may name files,
/// hosts or internals), only a random correlation id that the broker's log
/// line carries together with the detail.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
struct InternalError {
    code: &'static str,
    message: String,
    correlation_id: String,
}

impl InternalError {
    /// Logs `detail` under a new correlation id and returns the answer.
    fn log(code: &'static str, summary: &str, detail: &str) -> Self {
        let correlation_id = correlation_id();
        tracing::error!(%correlation_id, code, error = %detail, "{summary}");
        Self {
            code,
            message: format!("{summary}; correlation id {correlation_id}"),
            correlation_id,
        }
    }
}

/// 16 random hex digits (from the system's random source; a clock and a
/// counter only if that fails, since it only joins a reply to a log line).
fn correlation_id() -> String {
    let mut bytes = [0u8; 8];
    if aws_lc_rs::rand::fill(&mut bytes).is_err() {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or_default();
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bytes = (nanos ^ n.rotate_left(48)).to_be_bytes();
    }
    hex::encode(bytes)
}

/// How a [`BrokerError`] is answered over HTTP: the one place where the
/// core's errors become statuses and bodies.
pub(crate) trait ErrorReply {
    /// The HTTP answer: the status and the JSON body. Refusals explain
    /// themselves; failures inside the broker ([`BrokerError::Store`],
    /// [`BrokerError::Ca`], [`BrokerError::Hook`]) are logged with a
    /// correlation id that is all the caller gets.
    fn reply_parts(self) -> (StatusCode, serde_json::Value);
    fn into_response(self) -> Response;
}

impl ErrorReply for BrokerError {
    fn reply_parts(self) -> (StatusCode, serde_json::Value) {
        let message = self.to_string();
        let refusal = |status, code: &str, field: Option<&str>| {
            let body = ApiError {
                code: code.to_owned(),
                message: message.clone(),
                field: field.map(str::to_owned),
            };
            (status, serde_json::to_value(body).unwrap_or_default())
        };
        let internal =
            |status, body: InternalError| (status, serde_json::to_value(body).unwrap_or_default());
        match self {
            BrokerError::BadRequest { field, .. } => {
                refusal(StatusCode::BAD_REQUEST, "invalid_argument", field)
            }
            BrokerError::Unauthenticated(_) => {
                refusal(StatusCode::UNAUTHORIZED, "unauthenticated", None)
            }
            BrokerError::Forbidden { code, .. } => refusal(StatusCode::FORBIDDEN, code, None),
            BrokerError::NotFound(_) => refusal(StatusCode::NOT_FOUND, "not_found", None),
            BrokerError::Conflict(_) => refusal(StatusCode::CONFLICT, "conflict", None),
            // The shared database is unreachable or refusing (a failover,
            // a restart): the request did nothing and may be retried.
            BrokerError::Store(crate::store::StoreError::Postgres(_)) => internal(
                StatusCode::SERVICE_UNAVAILABLE,
                InternalError::log(
                    "unavailable",
                    "the broker's datastore is unavailable, so nothing was done; try again later",
                    &message,
                ),
            ),
            BrokerError::Store(_) | BrokerError::Ca(_) => internal(
                StatusCode::INTERNAL_SERVER_ERROR,
                InternalError::log("internal", "internal error", &message),
            ),
            // A store the broker must write to before issuing (revocation,
            // audit, secrets) is down: worth retrying later.
            BrokerError::Hook(_) => internal(
                StatusCode::SERVICE_UNAVAILABLE,
                InternalError::log(
                    "unavailable",
                    "a service the broker must record this request in is unavailable, so nothing was issued; try again later",
                    &message,
                ),
            ),
        }
    }

    fn into_response(self) -> Response {
        let (status, body) = self.reply_parts();
        warp::reply::with_status(warp::reply::json(&body), status).into_response()
    }
}

pub(crate) fn respond<T: Serialize>(
    result: Result<T, BrokerError>,
) -> Result<Response, Infallible> {
    Ok(match result {
        Ok(v) => warp::reply::json(&v).into_response(),
        Err(e) => e.into_response(),
    })
}

pub(crate) fn parse_body<T: DeserializeOwned>(body: &Bytes) -> Result<T, BrokerError> {
    serde_json::from_slice(body).map_err(|e| BrokerError::BadRequest {
        field: None,
        message: format!("request body is not valid JSON for this route: {e}"),
    })
}

fn with_broker(
    broker: Arc<Broker>,
) -> impl Filter<Extract = (Arc<Broker>,), Error = Infallible> + Clone {
    warp::any().map(move || broker.clone())
}

/// The body of a one-request route, at most [`MAX_BODY`] bytes.
pub(crate) fn json_body() -> impl Filter<Extract = (Bytes,), Error = warp::Rejection> + Clone {
    json_body_max(MAX_BODY)
}

/// A body of at most `limit` bytes (declared up front in Content-Length,
/// which HTTP framing then holds the client to); a larger one is refused
/// before it is read, with 413 `payload_too_large`.
pub(crate) fn json_body_max(
    limit: u64,
) -> impl Filter<Extract = (Bytes,), Error = warp::Rejection> + Clone {
    warp::body::content_length_limit(limit)
        .or_else(move |rejection: warp::Rejection| async move {
            if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
                Err(warp::reject::custom(TooLarge { limit }))
            } else {
                Err(rejection)
            }
        })
        .and(warp::body::bytes())
}

fn peer() -> impl Filter<Extract = (Option<PeerIdentity>,), Error = Infallible> + Clone {
    warp::ext::optional::<PeerIdentity>()
}

fn peer_leaf() -> impl Filter<Extract = (Option<PeerCertificate>,), Error = Infallible> + Clone {
    warp::ext::optional::<PeerCertificate>()
}

/// The node behind a request ([`crate::requests::node`]), from the TLS
/// layer's verified peer.
pub(crate) fn node_auth(
    broker: &Broker,
    revoker: &Revoker,
    peer: Option<PeerIdentity>,
    leaf: Option<PeerCertificate>,
) -> Result<AuthenticatedNode, BrokerError> {
    crate::requests::node(
        broker,
        revoker,
        peer.as_ref().and_then(|p| p.0.as_ref()),
        leaf.as_ref().map(|c| c.0.as_slice()),
        SystemTime::now(),
    )
}

/// `POST /v1/node/<route>`: an attested node (mTLS) sends a JSON `Req`;
/// `handle` is the whole request (see [`crate::requests`]).
fn node_post<Req, Resp, F>(
    broker: Arc<Broker>,
    revoker: Arc<Revoker>,
    route: &'static str,
    max_body: u64,
    handle: F,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static
where
    Req: DeserializeOwned + Send + 'static,
    Resp: Serialize + Send + 'static,
    F: Fn(&Broker, &Revoker, &AuthenticatedNode, Req, SystemTime) -> Result<Resp, BrokerError>
        + Clone
        + Send
        + Sync
        + 'static,
{
    warp::path("v1")
        .and(warp::path("node"))
        .and(warp::path(route))
        .and(warp::path::end())
        .and(warp::post())
        .and(with_broker(broker))
        .and(warp::any().map(move || revoker.clone()))
        .and(peer())
        .and(peer_leaf())
        .and(json_body_max(max_body))
        .and_then(
            move |broker: Arc<Broker>,
                  revoker: Arc<Revoker>,
                  peer: Option<PeerIdentity>,
                  leaf: Option<PeerCertificate>,
                  body: Bytes| {
                let handle = handle.clone();
                async move {
                    // The node check, the signing, the registration and the
                    // re-check, off the async workers in one hop.
                    let result = blocking(move || {
                        let node = node_auth(&broker, &revoker, peer, leaf)?;
                        let req = parse_body::<Req>(&body)?;
                        handle(&broker, &revoker, &node, req, SystemTime::now())
                    })
                    .await;
                    respond(result)
                }
            },
        )
}

/// Everything the broker's HTTPS port serves, in one filter: the rate
/// limits first (before a body is read), then the node, task, audit and
/// secrets routes, every answer counted by route and status. Rejections
/// are answered by [`crate::http_limits::guarded`].
pub fn https_routes(
    broker: Arc<Broker>,
    delegation: Arc<crate::delegation::Delegation>,
    secrets: Arc<crate::secrets::Secrets>,
    limiters: Arc<crate::limits::RateLimiters>,
) -> impl Filter<Extract = (impl warp::Reply,), Error = std::convert::Infallible>
+ Clone
+ Send
+ Sync
+ 'static {
    crate::http_limits::guarded(
        limiters,
        crate::http_secrets::routes(secrets, delegation.clone())
            .or(node_routes(broker, delegation))
            .unify(),
    )
    .with(crate::http_ops::count_requests())
}

/// The node, task, audit and revocation-feed routes of the HTTPS port.
fn node_routes(
    broker: Arc<Broker>,
    delegation: Arc<crate::delegation::Delegation>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let b = || with_broker(broker.clone());
    let revoker = delegation.revoker().clone();
    let r = {
        let revoker = revoker.clone();
        move || {
            let revoker = revoker.clone();
            warp::any().map(move || revoker.clone())
        }
    };

    let bundle = warp::path!("v1" / "bundle")
        .and(warp::get())
        .and(b())
        .and_then(|broker: Arc<Broker>| async move {
            respond::<serde_json::Value>(Ok(broker.ca().bundle().to_spiffe_json()))
        });
    let bundle_pem = warp::path!("v1" / "bundle.pem")
        .and(warp::get())
        .and(b())
        .map(|broker: Arc<Broker>| {
            warp::reply::with_header(
                broker.ca().bundle().to_pem(),
                "content-type",
                "application/x-pem-file",
            )
            .into_response()
        });
    let attest = warp::path!("v1" / "node" / "attest")
        .and(warp::post())
        .and(b())
        .and(r())
        .and(json_body())
        .and_then(
            |broker: Arc<Broker>, revoker: Arc<Revoker>, body: Bytes| async move {
                let result = blocking(move || {
                    let req = parse_body::<AttestRequest>(&body)?;
                    crate::requests::attest(&broker, &revoker, &req, SystemTime::now())
                })
                .await;
                respond(result)
            },
        );
    let renew = node_post(
        broker.clone(),
        revoker.clone(),
        "renew",
        MAX_BODY,
        |b, r, node, req: RenewRequest, now| {
            crate::requests::renew_agent_svid(b, r, node, &req.csr_der, now)
        },
    );
    let sync = warp::path!("v1" / "node" / "sync")
        .and(warp::get())
        .and(b())
        .and(r())
        .and(peer())
        .and(peer_leaf())
        .and(warp::header::optional::<u64>(
            baton_core::api::SYNC_APPLIED_HEADER,
        ))
        .and_then(
            |broker: Arc<Broker>,
             revoker: Arc<Revoker>,
             peer: Option<PeerIdentity>,
             leaf: Option<PeerCertificate>,
             applied: Option<u64>| async move {
                respond(
                    blocking(move || {
                        node_auth(&broker, &revoker, peer, leaf)
                            .and_then(|node| broker.sync(&node, applied, SystemTime::now()))
                    })
                    .await,
                )
            },
        );
    let sign_x509 = node_post(
        broker.clone(),
        revoker.clone(),
        "sign-x509",
        MAX_BATCH_BODY,
        |b, r, node, req: SignX509Request, now| crate::requests::sign_x509(b, r, node, &req, now),
    );
    let sign_jwt = node_post(
        broker.clone(),
        revoker.clone(),
        "sign-jwt",
        MAX_BODY,
        |b, r, node, req: SignJwtRequest, now| crate::requests::sign_jwt(b, r, node, &req, now),
    );
    let health = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&serde_json::json!({"status": "ok"})).into_response());

    bundle
        .or(bundle_pem)
        .unify()
        .or(attest)
        .unify()
        .or(renew)
        .unify()
        .or(sync)
        .unify()
        .or(sign_x509)
        .unify()
        .or(sign_jwt)
        .unify()
        .or(health)
        .unify()
        .or(crate::http_delegation::node_routes(
            broker.clone(),
            delegation,
        ))
        .unify()
}

/// Who may use the admin socket: peer uids allowed in addition to the
/// socket file's own permissions.
#[derive(Debug, Clone)]
pub struct AdminAccess {
    pub allowed_uids: Vec<u32>,
}

fn admin_check(access: &AdminAccess, peer: Option<UnixPeer>) -> Result<(), BrokerError> {
    match peer {
        Some(p) if access.allowed_uids.contains(&p.uid) => Ok(()),
        Some(p) => Err(BrokerError::Forbidden {
            code: "not_admin",
            // Which uids are allowed is not the caller's business.
            message: format!(
                "uid {} may not use the admin API; run the CLI as the broker's user or root, or ask its operator to allow this uid (`baton broker --admin-uid`)",
                p.uid
            ),
        }),
        None => Err(BrokerError::Unauthenticated(
            "admin API caller could not be identified".into(),
        )),
    }
}

/// Routes served on the admin Unix socket.
pub fn admin_routes(
    broker: Arc<Broker>,
    delegation: Arc<crate::delegation::Delegation>,
    access: AdminAccess,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static {
    let access = Arc::new(access);
    // Every admin route is behind the uid check.
    let guard = warp::ext::optional::<UnixPeer>()
        .and(warp::any().map(move || access.clone()))
        .and_then(
            |peer: Option<UnixPeer>, access: Arc<AdminAccess>| async move {
                match admin_check(&access, peer) {
                    Ok(()) => Ok(()),
                    Err(e) => Err(warp::reject::custom(Denied(e.to_string()))),
                }
            },
        )
        .untuple_one();
    let b = || with_broker(broker.clone());

    let tokens = warp::path!("v1" / "admin" / "join-tokens")
        .and(warp::post())
        .and(b())
        .and(json_body())
        .and_then(|broker: Arc<Broker>, body: Bytes| async move {
            answer(move || {
                parse_body::<JoinTokenRequest>(&body)
                    .and_then(|req| broker.generate_join_token(&req, SystemTime::now()))
            })
            .await
        });
    let create = warp::path!("v1" / "admin" / "entries")
        .and(warp::post())
        .and(b())
        .and(json_body())
        .and_then(|broker: Arc<Broker>, body: Bytes| async move {
            answer(move || parse_body::<NewEntry>(&body).and_then(|new| broker.create_entry(&new)))
                .await
        });
    let list = warp::path!("v1" / "admin" / "entries")
        .and(warp::get())
        .and(b())
        .and_then(|broker: Arc<Broker>| async move {
            answer(move || broker.list_entries().map(|entries| EntryList { entries })).await
        });
    let show = warp::path!("v1" / "admin" / "entries" / String)
        .and(warp::get())
        .and(b())
        .and_then(|id: String, broker: Arc<Broker>| async move {
            answer(move || broker.get_entry(&id)).await
        });
    let delete = warp::path!("v1" / "admin" / "entries" / String)
        .and(warp::delete())
        .and(b())
        .and_then(|id: String, broker: Arc<Broker>| async move {
            answer(move || {
                broker
                    .delete_entry(&id)
                    .map(|()| serde_json::json!({ "deleted": id }))
            })
            .await
        });
    let bundle = warp::path!("v1" / "admin" / "bundle")
        .and(warp::get())
        .and(b())
        .and_then(|broker: Arc<Broker>| async move {
            let bundle = broker.ca().bundle();
            respond::<serde_json::Value>(Ok(serde_json::json!({
                "trust_domain": broker.trust_domain(),
                "spiffe": bundle.to_spiffe_json(),
                "pem": bundle.to_pem(),
            })))
        });

    guard
        .and(
            tokens
                .or(create)
                .unify()
                .or(list)
                .unify()
                .or(show)
                .unify()
                .or(delete)
                .unify()
                .or(bundle)
                .unify()
                .or(crate::http_rotation::admin_routes(broker.clone()).boxed())
                .unify()
                .or(crate::http_nodes::admin_routes(broker.clone(), delegation.clone()).boxed())
                .unify()
                .or(crate::http_audit::admin_routes(delegation.clone()).boxed())
                .unify()
                .or(crate::http_delegation::admin_routes(delegation).boxed())
                .unify(),
        )
        .recover(recover)
        .unify()
}

#[derive(Debug)]
struct Denied(String);
impl warp::reject::Reject for Denied {}

/// Answers a rejection as JSON with a code: a refused rate limit, an
/// unknown route, a body too large...
pub(crate) async fn recover(rejection: warp::Rejection) -> Result<Response, Infallible> {
    if let Some(crate::http_limits::Refused(refused)) = rejection.find() {
        let mut reply = error_reply(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            refused.to_string(),
            None,
        );
        if let Ok(v) = http::HeaderValue::from_str(&refused.retry_after_secs().to_string()) {
            reply.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        return Ok(reply);
    }
    if let Some(TooLarge { limit }) = rejection.find() {
        return Ok(error_reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than this route's limit of {limit} bytes"),
            None,
        ));
    }
    if let Some(Denied(msg)) = rejection.find::<Denied>() {
        return Ok(error_reply(
            StatusCode::FORBIDDEN,
            "not_admin",
            msg.clone(),
            None,
        ));
    }
    if rejection.is_not_found() {
        return Ok(error_reply(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such route".into(),
            None,
        ));
    }
    if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        return Ok(error_reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this route does not accept that method".into(),
            None,
        ));
    }
    if rejection.find::<warp::reject::PayloadTooLarge>().is_some() {
        return Ok(error_reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("request body is larger than {MAX_BATCH_BODY} bytes"),
            None,
        ));
    }
    if rejection.find::<warp::reject::LengthRequired>().is_some() {
        return Ok(error_reply(
            StatusCode::LENGTH_REQUIRED,
            "length_required",
            "request body needs a content-length".into(),
            None,
        ));
    }
    // Warp's own description is Rust debug output: logged, not sent.
    tracing::debug!(?rejection, "request rejected");
    Ok(error_reply(
        StatusCode::BAD_REQUEST,
        "bad_request",
        "the request is malformed for this route (method, headers or body)".into(),
        None,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn internal_detail() -> BrokerError {
        BrokerError::Store(crate::store::StoreError::Corrupt {
            table: "join_tokens",
            detail: "secret internal detail at /var/lib/baton/baton.db".into(),
        })
    }

    #[test]
    fn internal_errors_answer_only_a_correlation_id() {
        let (status, body) = internal_detail().reply_parts();
        assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(body["code"], "internal");
        let id = body["correlation_id"].as_str().unwrap();
        assert_eq!(id.len(), 16);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(
            body["message"],
            format!("internal error; correlation id {id}")
        );
        let text = body.to_string();
        assert!(!text.contains("secret internal detail"), "{text}");
        assert!(!text.contains("join_tokens"), "{text}");
        // Every failure gets its own id.
        let (_, again) = internal_detail().reply_parts();
        assert_ne!(again["correlation_id"], body["correlation_id"]);

        let (status, body) =
            BrokerError::Hook("revocation service unavailable (redis://10.0.0.1: refused)".into())
                .reply_parts();
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["code"], "unavailable");
        let text = body.to_string();
        assert!(
            !text.contains("redis") && !text.contains("10.0.0.1"),
            "{text}"
        );
        assert!(text.contains("correlation id"), "{text}");
        // Still an ApiError to existing clients.
        let parsed: ApiError = serde_json::from_value(body).unwrap();
        assert_eq!(parsed.code, "unavailable");
    }

    #[test]
    fn refusals_keep_their_code_message_and_field() {
        let (status, body) = BrokerError::BadRequest {
            field: Some("node_id"),
            message: "node_id is not a SPIFFE ID".into(),
        }
        .reply_parts();
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert_eq!(body["code"], "invalid_argument");
        assert_eq!(body["field"], "node_id");
        assert_eq!(body["message"], "node_id is not a SPIFFE ID");
        assert!(body.get("correlation_id").is_none());

        let (status, body) = BrokerError::Forbidden {
            code: "not_a_node",
            message: "no".into(),
        }
        .reply_parts();
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body["code"], "not_a_node");
        for (err, want) in [
            (
                BrokerError::Unauthenticated("x".into()),
                StatusCode::UNAUTHORIZED,
            ),
            (BrokerError::NotFound("x".into()), StatusCode::NOT_FOUND),
            (BrokerError::Conflict("x".into()), StatusCode::CONFLICT),
        ] {
            assert_eq!(err.reply_parts().0, want);
        }
    }

    #[test]
    fn admin_refusal_does_not_list_the_admin_uids() {
        let access = AdminAccess {
            allowed_uids: vec![0, 4242, 31337],
        };
        let err = admin_check(
            &access,
            Some(UnixPeer {
                uid: 1000,
                gid: 1000,
                pid: None,
            }),
        )
        .unwrap_err();
        let (status, body) = err.reply_parts();
        assert_eq!(status, StatusCode::FORBIDDEN);
        assert_eq!(body["code"], "not_admin");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("uid 1000"), "{message}");
        assert!(
            !message.contains("4242") && !message.contains("31337"),
            "{message}"
        );
        // Control: an allowed uid passes.
        assert!(
            admin_check(
                &access,
                Some(UnixPeer {
                    uid: 4242,
                    gid: 1,
                    pid: None,
                }),
            )
            .is_ok()
        );
    }

    #[test]
    fn not_a_node_advice_never_suggests_a_node_token_for_the_caller() {
        let id = baton_core::SpiffeId::parse("spiffe://example.org/agents/planner").unwrap();
        let message = crate::service::not_a_node(&id).to_string();
        assert!(!message.contains("--node-id"), "{message}");
        assert!(!message.contains("token generate"), "{message}");
    }
}
