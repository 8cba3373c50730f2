//! HTTP routes of the delegation exchange and the audit log.
//!
//! On the HTTPS port: `POST /v1/tasks` (authenticated by the initiator's ID
//! token), `POST /v1/delegate` (mTLS with the holder's task SVID + its
//! token), `POST /v1/node/redeem` (node mTLS), `POST /v1/audit/tool-calls`
//! (mTLS with a tool server's SVID). On the admin socket: task management,
//! audit verify/trace, and the dev issuer's ID tokens.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use baton_core::api::{
    DelegateRequest, RedeemRequest, RenewTaskRequest, StartTaskRequest, ToolCallReport,
};
use baton_tls::{PeerCertificate, PeerIdentity};
use baton_verify::PeerCert;
use bytes::Bytes;
use serde::Deserialize;
use warp::Filter;
use warp::reply::Response;

use crate::delegation::Delegation;
use crate::http_reply::{
    MAX_BATCH_BODY, answer, blocking, json_body, json_body_max, parse_body, respond,
};
use crate::service::{Broker, BrokerError};
use crate::telemetry::{RequestTrace, request_span};

fn with<T: Clone + Send + Sync + 'static>(
    v: T,
) -> impl Filter<Extract = (T,), Error = Infallible> + Clone {
    warp::any().map(move || v.clone())
}

/// The request's W3C `traceparent` header, if any (validated later; a
/// malformed one is ignored, never a refusal).
fn traceparent() -> impl Filter<Extract = (Option<String>,), Error = Infallible> + Clone {
    warp::header::headers_cloned().map(|h: http::HeaderMap| {
        h.get(baton_core::trace_context::TRACEPARENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    })
}

pub(crate) fn peer_cert(
    id: Option<PeerIdentity>,
    cert: Option<PeerCertificate>,
) -> Result<PeerCert, BrokerError> {
    match (id.and_then(|p| p.0), cert) {
        (Some(_), Some(PeerCertificate(leaf_der))) => PeerCert::from_verified_leaf(leaf_der)
            .map_err(|e| BrokerError::Unauthenticated(format!("peer certificate: {e}"))),
        _ => Err(BrokerError::Unauthenticated(
            "this route needs mTLS with your task SVID".into(),
        )),
    }
}

/// A tool server acting in the audit log (reports, approval requests):
/// mTLS with its SVID, then [`crate::requests::live_tool_server`].
fn live_tool_server(
    d: &Delegation,
    id: Option<PeerIdentity>,
    leaf: Option<PeerCertificate>,
    what: &str,
) -> Result<baton_core::SpiffeId, BrokerError> {
    let peer = match (id.and_then(|p| p.0), leaf) {
        (Some(_), Some(PeerCertificate(der))) => PeerCert::from_verified_leaf(der)
            .map_err(|e| BrokerError::Unauthenticated(format!("peer certificate: {e}")))?,
        _ => {
            return Err(BrokerError::Unauthenticated(format!(
                "{what} need mTLS with the tool server's SVID"
            )));
        }
    };
    crate::requests::live_tool_server(d, &peer, SystemTime::now())
}

/// The verified peer of a route only live tool servers may call (reports,
/// approval requests), refused before the route reads its body (up to
/// [`MAX_BATCH_BODY`]) when it is not one: no SVID, a revoked one, a
/// blocked server. The route checks again once the body is in, so a
/// revocation while a slow body arrives still refuses it.
fn live_tool_server_peer(
    d: Arc<Delegation>,
    what: &'static str,
) -> impl Filter<Extract = (Option<PeerIdentity>, Option<PeerCertificate>), Error = warp::Rejection>
+ Clone {
    with(d)
        .and(warp::ext::optional::<PeerIdentity>())
        .and(warp::ext::optional::<PeerCertificate>())
        .and_then(
            move |d: Arc<Delegation>, id: Option<PeerIdentity>, leaf: Option<PeerCertificate>| async move {
                let (i, l) = (id.clone(), leaf.clone());
                match blocking(move || live_tool_server(&d, i, l, what)).await {
                    Ok(_) => Ok((id, leaf)),
                    Err(refusal) => Err(crate::http_reply::early_refusal(refusal)),
                }
            },
        )
        .untuple_one()
}

/// `POST /v1/node/<route>`: an attested node (mTLS, agent SVID) asks for a
/// task credential on behalf of a workload; `mint` is the whole request
/// (see [`crate::requests`]).
fn node_mint<Req, F>(
    route: &'static str,
    span: fn() -> tracing::Span,
    broker: Arc<Broker>,
    d: Arc<Delegation>,
    mint: F,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static
where
    Req: serde::de::DeserializeOwned + Send + 'static,
    F: Fn(
            &Delegation,
            &crate::service::AuthenticatedNode,
            Req,
            SystemTime,
        ) -> Result<baton_core::api::TaskCredential, BrokerError>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let td = broker.trust_domain().clone();
    warp::path("v1")
        .and(warp::path("node"))
        .and(warp::path(route))
        .and(warp::path::end())
        .and(warp::post())
        .and(with(broker))
        .and(with(d))
        .and(crate::http_reply::node_shaped_peer(td))
        .and(traceparent())
        .and(json_body())
        .and_then(
            move |broker: Arc<Broker>,
                  d: Arc<Delegation>,
                  id: Option<PeerIdentity>,
                  leaf: Option<PeerCertificate>,
                  tp: Option<String>,
                  body: Bytes| {
                let mint = mint.clone();
                let rt = RequestTrace::start(span(), tp.as_deref());
                async move {
                    // The node check, the minting (signing, SQLite, the
                    // audit log) and the registration, off the async
                    // workers in one hop.
                    let result = {
                        let rt = rt.clone();
                        blocking(move || {
                            rt.scoped(|| {
                                let now = SystemTime::now();
                                let node =
                                    crate::http_reply::node_auth(&broker, d.revoker(), id, leaf)?;
                                let req = parse_body::<Req>(&body)?;
                                mint(&d, &node, req, now)
                            })
                        })
                        .await
                    };
                    rt.outcome(&result);
                    respond(result)
                }
            },
        )
}

/// Delegation routes on the HTTPS port.
pub fn node_routes(
    broker: Arc<Broker>,
    d: Arc<Delegation>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let start = warp::path!("v1" / "tasks")
        .and(warp::post())
        .and(with(d.clone()))
        .and(traceparent())
        .and(json_body())
        .and_then(start_route);
    let delegate = warp::path!("v1" / "delegate")
        .and(warp::post())
        .and(with(d.clone()))
        .and(warp::ext::optional::<PeerIdentity>())
        .and(warp::ext::optional::<PeerCertificate>())
        .and(traceparent())
        .and(json_body())
        .and_then(
            |d: Arc<Delegation>,
             id: Option<PeerIdentity>,
             cert: Option<PeerCertificate>,
             tp: Option<String>,
             body: Bytes| async move {
                let rt = RequestTrace::start(request_span!("baton.hop"), tp.as_deref());
                let granted = {
                    let (d, rt) = (d.clone(), rt.clone());
                    blocking(move || {
                        rt.scoped(|| {
                            let peer = peer_cert(id, cert)?;
                            let req = parse_body::<DelegateRequest>(&body)?;
                            crate::requests::delegate(&d, &peer, &req, SystemTime::now())
                        })
                    })
                    .await
                };
                let result = granted;
                rt.outcome(&result);
                respond(result)
            },
        );
    let redeem = node_mint(
        "redeem",
        || request_span!("baton.redeem"),
        broker.clone(),
        d.clone(),
        |d, node, req: RedeemRequest, now| crate::requests::redeem(d, node, &req, now),
    );
    let renew = node_mint(
        "renew-task",
        || request_span!("baton.renew"),
        broker,
        d.clone(),
        |d, node, req: RenewTaskRequest, now| crate::requests::renew(d, node, &req, now),
    );
    let report = warp::path!("v1" / "audit" / "tool-calls")
        .and(warp::post())
        .and(with(d.clone()))
        .and(live_tool_server_peer(d.clone(), "tool-call reports"))
        .and(traceparent())
        .and(json_body_max(MAX_BATCH_BODY))
        .and_then(
            |d: Arc<Delegation>,
             id: Option<PeerIdentity>,
             leaf: Option<PeerCertificate>,
             tp: Option<String>,
             body: Bytes| async move {
                // Each report is an audit append: off the async workers.
                respond(
                    blocking(move || {
                        let reporter = live_tool_server(&d, id, leaf, "tool-call reports")?;
                        let (batch, single) = parse_reports(&body)?;
                        crate::requests::record_reports(
                            &d,
                            &reporter,
                            &batch,
                            single,
                            tp.as_deref(),
                            &SystemTime::now,
                        )
                    })
                    .await,
                )
            },
        );
    // The revocation feed for verifiers without Redis: any live SVID of
    // the trust domain may follow it (it names only revoked ids and
    // expiries); a revoked or blocked one is refused before any page is
    // read, and each follower is rate limited (`feed`).
    let feed = warp::path!("v1" / "revocations" / "feed")
        .and(warp::get())
        .and(with(d.clone()))
        .and(live_tool_server_peer(d.clone(), "revocation feed requests"))
        .and(warp::query::<FeedQuery>())
        .and_then(
            |d: Arc<Delegation>,
             id: Option<PeerIdentity>,
             _leaf: Option<PeerCertificate>,
             q: FeedQuery| async move {
                let result = match id.and_then(|p| p.0) {
                    Some(peer) if peer.is_member_of(d.trust_domain()) => {
                        let wait = std::time::Duration::from_millis(
                            q.wait_ms.unwrap_or(0).min(MAX_FEED_WAIT_MS),
                        );
                        d.revoker()
                            .feed(q.after.unwrap_or(0), wait, crate::oidc::unix_now())
                            .await
                    }
                    _ => Err(BrokerError::Unauthenticated(
                        "the revocation feed needs mTLS with an SVID of this trust domain".into(),
                    )),
                };
                respond(result)
            },
        );
    // A gateway holding a call for a human's approval: only a tool server
    // of the token's audience may ask (checked in the decision).
    let approval = warp::path!("v1" / "approvals")
        .and(warp::post())
        .and(with(d.clone()))
        .and(live_tool_server_peer(d.clone(), "approval requests"))
        .and(traceparent())
        .and(json_body())
        .and_then(
            |d: Arc<Delegation>,
             id: Option<PeerIdentity>,
             leaf: Option<PeerCertificate>,
             tp: Option<String>,
             body: Bytes| async move {
                respond(
                    blocking(move || {
                        let server = live_tool_server(&d, id, leaf, "approval requests")?;
                        let rt =
                            RequestTrace::start(request_span!("baton.approval"), tp.as_deref());
                        let result = rt.scoped(|| {
                            parse_body::<baton_core::api::ApprovalRequest>(&body).and_then(|req| {
                                d.request_approval(&server, &req, crate::oidc::unix_now())
                            })
                        });
                        rt.outcome(&result);
                        result
                    })
                    .await,
                )
            },
        );
    start
        .or(approval)
        .unify()
        .or(feed)
        .unify()
        .or(delegate)
        .unify()
        .or(redeem)
        .unify()
        .or(renew)
        .unify()
        .or(report)
        .unify()
}

/// `POST /v1/tasks` and `/v1/admin/tasks`: a task start, in its span.
async fn start_route(
    d: Arc<Delegation>,
    tp: Option<String>,
    body: Bytes,
) -> Result<Response, Infallible> {
    let rt = RequestTrace::start(request_span!("baton.task.start"), tp.as_deref());
    let result = start_task(d, body, rt.clone()).await;
    rt.outcome(&result);
    respond(result)
}

/// Starts a task (ID token check, policy, SQLite, the audit log, the
/// grant's signature) on the blocking pool.
async fn start_task(
    d: Arc<Delegation>,
    body: Bytes,
    rt: RequestTrace,
) -> Result<baton_core::api::StartTaskResponse, BrokerError> {
    blocking(move || {
        rt.scoped(|| {
            parse_body::<StartTaskRequest>(&body)
                .and_then(|req| crate::requests::start_task(&d, &req, SystemTime::now()))
        })
    })
    .await
}

/// Longest a feed long-poll is held.
const MAX_FEED_WAIT_MS: u64 = 25_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FeedQuery {
    after: Option<u64>,
    wait_ms: Option<u64>,
}

/// Most reports one request may carry.
const MAX_REPORT_BATCH: usize = 1000;

/// One report or `{"reports": [...]}`; true for a single report.
fn parse_reports(body: &Bytes) -> Result<(Vec<ToolCallReport>, bool), BrokerError> {
    // Parsed within bounds: the list of reports stops at its cap, and each
    // report's lists and maps at theirs, so no body (up to 4 MiB) becomes
    // many times its size in memory before it is refused.
    fn reports<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<ToolCallReport>, D::Error> {
        baton_core::report_bounds::bounded::seq(d, MAX_REPORT_BATCH, "reports")
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Batch {
        #[serde(deserialize_with = "reports")]
        reports: Vec<ToolCallReport>,
    }
    if body.first() == Some(&b'{') && starts_as_batch(body) {
        return serde_json::from_slice::<Batch>(body)
            .map(|b| (b.reports, false))
            .map_err(|e| BrokerError::BadRequest {
                field: Some("reports"),
                message: format!("the batch of reports is not valid: {e}"),
            });
    }
    parse_body::<ToolCallReport>(body).map(|r| (vec![r], true))
}

/// Whether a JSON object's first member is `reports` (a batch), so that a
/// batch's refusal names what is wrong with it rather than being retried
/// as a single report.
fn starts_as_batch(body: &[u8]) -> bool {
    let rest = body.get(1..).unwrap_or_default();
    let rest = rest.trim_ascii_start();
    rest.starts_with(b"\"reports\"")
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PurposeBody {
    purpose: baton_core::Purpose,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegrantBody {
    audience: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    target: crate::revocation::RevokeTarget,
    #[serde(default = "default_reason")]
    reason: String,
    /// For an agent: block new credentials until this unix time (default:
    /// until `baton revoke unblock`).
    #[serde(default)]
    until: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UnblockBody {
    agent: String,
}

fn default_reason() -> String {
    "revoked by an operator".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DevTokenBody {
    user: String,
    #[serde(default = "default_dev_ttl")]
    ttl_secs: u64,
    /// The token's `groups` claim (none when empty).
    #[serde(default)]
    groups: Vec<String>,
}

fn default_dev_ttl() -> u64 {
    600
}

/// Delegation and audit routes on the admin socket (behind its uid check).
pub fn admin_routes(
    d: Arc<Delegation>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let start = warp::path!("v1" / "admin" / "tasks")
        .and(warp::post())
        .and(with(d.clone()))
        .and(traceparent())
        .and(json_body())
        .and_then(start_route);
    let list = warp::path!("v1" / "admin" / "tasks")
        .and(warp::get())
        .and(with(d.clone()))
        .and_then(|d: Arc<Delegation>| async move {
            answer(move || {
                d.list_tasks()
                    .map(|tasks| serde_json::json!({ "tasks": tasks }))
            })
            .await
        });
    let show = warp::path!("v1" / "admin" / "tasks" / String)
        .and(warp::get())
        .and(with(d.clone()))
        .and_then(
            |id: String, d: Arc<Delegation>| async move { answer(move || d.get_task(&id)).await },
        );
    let credentials = warp::path!("v1" / "admin" / "tasks" / String / "credentials")
        .and(warp::get())
        .and(with(d.clone()))
        .and_then(|id: String, d: Arc<Delegation>| async move {
            answer(move || {
                d.task_credentials(&id)
                    .map(|c| serde_json::json!({ "task_id": id, "credentials": c }))
            })
            .await
        });
    let end = warp::path!("v1" / "admin" / "tasks" / String / "end")
        .and(warp::post())
        .and(with(d.clone()))
        .and_then(|id: String, d: Arc<Delegation>| async move {
            // Re-driven on every call: a retry after a failed revocation
            // completes it.
            let result = crate::requests::end_task(&d, &id, SystemTime::now()).await;
            respond(result)
        });
    let regrant = warp::path!("v1" / "admin" / "tasks" / String / "grant")
        .and(warp::post())
        .and(with(d.clone()))
        .and(json_body())
        .and_then(|id: String, d: Arc<Delegation>, body: Bytes| async move {
            respond(
                blocking(move || {
                    let b = parse_body::<RegrantBody>(&body)?;
                    crate::requests::regrant(&d, &id, b.audience, SystemTime::now())
                })
                .await,
            )
        });
    let revoke = warp::path!("v1" / "admin" / "revoke")
        .and(warp::post())
        .and(with(d.clone()))
        .and(json_body())
        .and_then(|d: Arc<Delegation>, body: Bytes| async move {
            let result = match parse_body::<RevokeBody>(&body) {
                Ok(req) => {
                    crate::requests::revoke(
                        &d,
                        &req.target,
                        &req.reason,
                        req.until,
                        SystemTime::now(),
                    )
                    .await
                }
                Err(e) => Err(e),
            };
            respond(result)
        });
    let unblock = warp::path!("v1" / "admin" / "agents" / "unblock")
        .and(warp::post())
        .and(with(d.clone()))
        .and(json_body())
        .and_then(|d: Arc<Delegation>, body: Bytes| async move {
            answer(move || {
                parse_body::<UnblockBody>(&body).and_then(|b| {
                    let id = baton_core::SpiffeId::parse(&b.agent).map_err(|e| {
                        BrokerError::BadRequest {
                            field: Some("agent"),
                            message: format!("agent: {e}"),
                        }
                    })?;
                    d.unblock_agent(&id)?;
                    Ok(serde_json::json!({ "unblocked": id }))
                })
            })
            .await
        });
    let blocks = warp::path!("v1" / "admin" / "agents" / "blocked")
        .and(warp::get())
        .and(with(d.clone()))
        .and_then(|d: Arc<Delegation>| async move {
            answer(move || {
                d.agent_blocks(crate::oidc::unix_now())
                    .map(|b| serde_json::json!({ "blocked": b }))
            })
            .await
        });
    let purpose = warp::path!("v1" / "admin" / "tasks" / String / "purpose")
        .and(warp::post())
        .and(with(d.clone()))
        .and(json_body())
        .and_then(|id: String, d: Arc<Delegation>, body: Bytes| async move {
            let result = match parse_body::<PurposeBody>(&body) {
                Ok(b) => {
                    crate::requests::change_purpose(&d, &id, &b.purpose, SystemTime::now()).await
                }
                Err(e) => Err(e),
            };
            respond(result)
        });
    let verify = warp::path!("v1" / "admin" / "audit" / "verify")
        .and(warp::get())
        .and(with(d.clone()))
        .and_then(|d: Arc<Delegation>| async move {
            // A long log takes a while to check: off the async workers.
            // Then, with several brokers, every broker's log in the
            // datastore: rebuilt from its events, every checkpoint checked.
            respond(blocking(move || Ok(match d.audit().verify() {
                Ok(report) => match d.audit().verify_shared() {
                    Ok(logs) if logs.is_empty() => serde_json::json!({ "ok": true, "report": report }),
                    Ok(logs) => serde_json::json!({ "ok": true, "report": report, "shared_logs": logs }),
                    Err(e) => serde_json::json!({ "ok": false, "report": report, "error": e.to_string() }),
                },
                Err(e) => serde_json::json!({ "ok": false, "error": e.to_string(), "first_bad_index": e.first_bad_index }),
            })).await)
        });
    let trace = warp::path!("v1" / "admin" / "audit" / "trace" / String)
        .and(warp::get())
        .and(with(d.clone()))
        .and_then(|id: String, d: Arc<Delegation>| async move {
            respond(blocking(move || d.trace(&id)).await)
        });
    let receipt = warp::path!("v1" / "admin" / "audit" / "receipt" / u64)
        .and(warp::get())
        .and(with(d.clone()))
        .and_then(|index: u64, d: Arc<Delegation>| async move {
            answer(move || {
                d.audit()
                    .receipt(index)
                    .map_err(|e| BrokerError::NotFound(e.to_string()))
            })
            .await
        });
    let key = warp::path!("v1" / "admin" / "audit" / "public-key")
        .and(warp::get())
        .and(with(d.clone()))
        .and_then(|d: Arc<Delegation>| async move {
            respond::<serde_json::Value>(Ok(d.audit_public_key()))
        });
    let dev_token = warp::path!("v1" / "admin" / "dev" / "id-token")
        .and(warp::post())
        .and(with(d.clone()))
        .and(json_body())
        .and_then(|d: Arc<Delegation>, body: Bytes| async move {
            answer(move || parse_body::<DevTokenBody>(&body).and_then(|b| {
                let issuer = d.dev_issuer().ok_or_else(|| BrokerError::Forbidden {
                    code: "no_dev_issuer",
                    message: "this broker has no dev OIDC issuer (only `baton dev` and `--dev-issuer` do)".into(),
                })?;
                let token = issuer
                    .mint_with_groups(&b.user, &b.groups, b.ttl_secs, crate::oidc::unix_now())
                    .map_err(|e| BrokerError::BadRequest { field: None, message: e.to_string() })?;
                Ok(serde_json::json!({ "id_token": token }))
            })).await
        });
    let approval_show = warp::path!("v1" / "admin" / "approvals" / String)
        .and(warp::get())
        .and(with(d.clone()))
        .and_then(|id: String, d: Arc<Delegation>| async move {
            answer(move || d.get_approval(&id, crate::oidc::unix_now())).await
        });
    let approval_decide = warp::path!("v1" / "admin" / "approvals" / String / "decision")
        .and(warp::post())
        .and(with(d))
        .and(json_body())
        .and_then(|id: String, d: Arc<Delegation>, body: Bytes| async move {
            respond(
                blocking(move || {
                    parse_body::<baton_core::api::ApprovalDecision>(&body)
                        .and_then(|dec| d.decide_approval(&id, &dec, crate::oidc::unix_now()))
                })
                .await,
            )
        });
    start
        .or(approval_show)
        .unify()
        .or(approval_decide)
        .unify()
        .or(list)
        .unify()
        .or(show)
        .unify()
        .or(credentials)
        .unify()
        .or(end)
        .unify()
        .or(purpose)
        .unify()
        .or(regrant)
        .unify()
        .or(revoke)
        .unify()
        .or(unblock)
        .unify()
        .or(blocks)
        .unify()
        .or(verify)
        .unify()
        .or(trace)
        .unify()
        .or(key)
        .unify()
        .or(receipt)
        .unify()
        .or(dev_token)
        .unify()
}
