//! The broker's route builder: every route of the node port
//! ([`https_routes`]) and of the admin socket ([`admin_routes`]), as warp
//! filters; how each answers is in [`crate::http_reply`]. The listeners themselves live in
//! `baton-tls`: the node listener is HTTPS with optional mTLS and puts the
//! verified peer into `PeerIdentity`; the admin listener is a Unix socket
//! that puts the caller's credentials into `UnixPeer`.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use baton_core::NewEntry;
use baton_core::api::{
    AttestRequest, EntryList, JoinTokenRequest, RenewRequest, SignJwtRequest, SignX509Request,
};
use baton_tls::{PeerCertificate, PeerIdentity, UnixPeer};
use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use warp::reply::Response;
use warp::{Filter, Reply};

use crate::http_reply::{
    Denied, MAX_BATCH_BODY, MAX_BODY, answer, blocking, json_body, json_body_max, node_auth,
    node_shaped_peer, parse_body, recover, respond,
};
use crate::revocation::Revoker;
use crate::service::{AuthenticatedNode, Broker, BrokerError};

fn with_broker(
    broker: Arc<Broker>,
) -> impl Filter<Extract = (Arc<Broker>,), Error = Infallible> + Clone {
    warp::any().map(move || broker.clone())
}

fn peer() -> impl Filter<Extract = (Option<PeerIdentity>,), Error = Infallible> + Clone {
    warp::ext::optional::<PeerIdentity>()
}

fn peer_leaf() -> impl Filter<Extract = (Option<PeerCertificate>,), Error = Infallible> + Clone {
    warp::ext::optional::<PeerCertificate>()
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
    let td = broker.trust_domain().clone();
    warp::path("v1")
        .and(warp::path("node"))
        .and(warp::path(route))
        .and(warp::path::end())
        .and(warp::post())
        .and(with_broker(broker))
        .and(warp::any().map(move || revoker.clone()))
        .and(node_shaped_peer(td))
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
        peer_still_trusted(broker.clone()),
        limiters.clone(),
        crate::http_secrets::routes(secrets, delegation.clone())
            .or(node_routes(broker, delegation, limiters))
            .unify(),
    )
    .with(crate::http_ops::count_requests())
}

/// Refuses a request whose client certificate is no longer good: the TLS
/// layer verified it when the connection opened, but a kept-alive
/// connection outlives that moment, so each request is checked again
/// against the clock and the CA's authorities in force (an expired
/// certificate, or one whose authority a rotation step removed or
/// revoked, calls nothing more on the connection it opened before).
/// Anonymous connections pass; the routes that need an identity refuse
/// them.
fn peer_still_trusted(
    broker: Arc<Broker>,
) -> impl Filter<Extract = (), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    warp::ext::optional::<PeerCertificate>()
        .and(with_broker(broker))
        .and_then(
            |leaf: Option<PeerCertificate>, broker: Arc<Broker>| async move {
                let Some(PeerCertificate(der)) = leaf else {
                    return Ok(());
                };
                broker
                    .leaf_authority_problem(&der, SystemTime::now())
                    .map_err(|why| {
                        tracing::info!(reason = %why, "request refused: the client certificate is no longer trusted");
                        crate::http_reply::early_refusal(BrokerError::Unauthenticated(format!(
                            "the client certificate of this connection is no longer trusted: {why}; connect again with a current SVID"
                        )))
                    })
            },
        )
        .untuple_one()
}

/// The node, task, audit and revocation-feed routes of the HTTPS port.
fn node_routes(
    broker: Arc<Broker>,
    delegation: Arc<crate::delegation::Delegation>,
    limiters: Arc<crate::limits::RateLimiters>,
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
        move |b, r, node, req: SignX509Request, now| {
            charge_batch(&limiters, node, req.items.len())?;
            crate::requests::sign_x509(b, r, node, &req, now)
        },
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

/// Charges a node the rest of a `sign-x509` batch (the rate-limit guard
/// charged one certificate before the body was read), all or none, once
/// the node is authenticated and the batch's size is known. A batch over
/// the largest one signed is left to the core to refuse as malformed.
fn charge_batch(
    limiters: &crate::limits::RateLimiters,
    node: &AuthenticatedNode,
    items: usize,
) -> Result<(), BrokerError> {
    if items > crate::service::MAX_SIGN_BATCH {
        return Ok(());
    }
    let rest = u32::try_from(items.saturating_sub(1)).unwrap_or(u32::MAX);
    limiters
        .charge(
            crate::limits::Limited::X509Svid,
            &crate::limits::Caller::Spiffe(node.id().clone()),
            rest,
            std::time::Instant::now(),
        )
        .map_err(|refused| {
            tracing::info!(limit = refused.what.name(), caller = %refused.caller, items, "sign-x509 batch refused by a rate limit");
            BrokerError::RateLimited(refused)
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http_reply::ErrorReply;
    use http::StatusCode;

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
