//! How a request to the broker becomes a call of the core and its answer,
//! shared by every route module: body limits and parsing, the hop to the
//! blocking pool, the one mapping of [`BrokerError`] to a status and body,
//! the node behind an mTLS request, and rejections (rate limit, body too
//! large, not an admin, no such route) answered as JSON.
//!
//! The route modules (`http_*`) and the route builder ([`crate::http`])
//! import this one; it imports none of them.

use std::convert::Infallible;
use std::time::SystemTime;

use baton_core::api::ApiError;
use baton_tls::{PeerCertificate, PeerIdentity};
use bytes::Bytes;
use http::StatusCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::limits::RateLimited;
use crate::revocation::Revoker;
use crate::service::{AuthenticatedNode, Broker, BrokerError};

/// A request refused by a rate limit.
#[derive(Debug)]
pub(crate) struct Refused(pub(crate) RateLimited);
impl warp::reject::Reject for Refused {}

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
            BrokerError::RateLimited(_) => {
                refusal(StatusCode::TOO_MANY_REQUESTS, "rate_limited", None)
            }
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
        let retry_after = match &self {
            BrokerError::RateLimited(refused) => Some(refused.retry_after_secs()),
            _ => None,
        };
        let (status, body) = self.reply_parts();
        let mut reply = warp::reply::with_status(warp::reply::json(&body), status).into_response();
        if let Some(v) =
            retry_after.and_then(|secs| http::HeaderValue::from_str(&secs.to_string()).ok())
        {
            reply.headers_mut().insert(http::header::RETRY_AFTER, v);
        }
        reply
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

/// A refusal answered before the request's body is read.
#[derive(Debug)]
pub(crate) struct EarlyRefusal(StatusCode, serde_json::Value);
impl warp::reject::Reject for EarlyRefusal {}

/// `refusal` answered as it is, before the request's body is read.
pub(crate) fn early_refusal(refusal: BrokerError) -> warp::Rejection {
    let (status, body) = refusal.reply_parts();
    warp::reject::custom(EarlyRefusal(status, body))
}

/// The verified peer of a node route, refused before its body is read when
/// it cannot be a node: no client certificate, or a SPIFFE ID outside
/// `/baton/node/` (a workload, a tool server, a task certificate). Whether
/// it *is* the node (its current agent SVID, not banned, not revoked) is
/// decided after, with the datastore, by [`node_auth`]; this only keeps
/// every other certificate holder from making the broker read up to a
/// route's body limit.
pub(crate) fn node_shaped_peer(
    td: baton_core::TrustDomain,
) -> impl Filter<Extract = (Option<PeerIdentity>, Option<PeerCertificate>), Error = warp::Rejection>
+ Clone {
    let td = std::sync::Arc::new(td);
    warp::ext::optional::<PeerIdentity>()
        .and(warp::ext::optional::<PeerCertificate>())
        .and_then(
            move |peer: Option<PeerIdentity>, leaf: Option<PeerCertificate>| {
                let refusal = match peer.as_ref().and_then(|p| p.0.as_ref()) {
                    None => Some(BrokerError::Unauthenticated(
                        "this route needs a client certificate: connect with the node's agent SVID"
                            .into(),
                    )),
                    Some(id)
                        if !id.is_member_of(&td)
                            || !id.path().starts_with(crate::service::NODE_PREFIX) =>
                    {
                        Some(crate::service::not_a_node(id))
                    }
                    Some(_) => None,
                };
                async move {
                    match refusal {
                        None => Ok((peer, leaf)),
                        Some(refusal) => Err(early_refusal(refusal)),
                    }
                }
            },
        )
        .untuple_one()
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

#[derive(Debug)]
pub(crate) struct Denied(pub(crate) String);
impl warp::reject::Reject for Denied {}

/// Answers a rejection as JSON with a code: a refused rate limit, an
/// unknown route, a body too large...
pub(crate) async fn recover(rejection: warp::Rejection) -> Result<Response, Infallible> {
    if let Some(Refused(refused)) = rejection.find() {
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
    if let Some(EarlyRefusal(status, body)) = rejection.find() {
        return Ok(warp::reply::with_status(warp::reply::json(body), *status).into_response());
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
}
