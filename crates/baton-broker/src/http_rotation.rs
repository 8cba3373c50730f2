//! The admin routes of CA rotation (`/v1/admin/ca/...`, behind the admin
//! socket's uid check). Each step is a decision of [`crate::rotation`]; it
//! signs, reads the revocation store and writes the authority journal, so
//! it runs on the blocking pool.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::SystemTime;

use bytes::Bytes;
use serde::de::DeserializeOwned;
use warp::Filter;
use warp::reply::Response;

use crate::http_reply::{blocking, json_body, parse_body, respond};
use crate::rotation::{
    ActivateRequest, AuthorityRequest, PrepareRequest, RevokeRequest, RotationReply,
};
use crate::service::{Broker, BrokerError};

fn with_broker(
    broker: Arc<Broker>,
) -> impl Filter<Extract = (Arc<Broker>,), Error = Infallible> + Clone {
    warp::any().map(move || broker.clone())
}

/// `GET /v1/admin/ca` and `POST /v1/admin/ca/{prepare,activate,taint,revoke}`.
pub fn admin_routes(
    broker: Arc<Broker>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let show = warp::path!("v1" / "admin" / "ca")
        .and(warp::get())
        .and(with_broker(broker.clone()))
        .and_then(|broker: Arc<Broker>| async move {
            respond(blocking(move || broker.authorities().ca_status(SystemTime::now())).await)
        });
    let prepare = post_route(
        broker.clone(),
        "prepare",
        |broker, req: PrepareRequest, now| broker.authorities().ca_prepare(&req, now),
    );
    let activate = post_route(
        broker.clone(),
        "activate",
        |broker, req: ActivateRequest, now| broker.authorities().ca_activate(&req, now),
    );
    let taint = post_route(
        broker.clone(),
        "taint",
        |broker, req: AuthorityRequest, now| broker.authorities().ca_taint(&req.id, now),
    );
    let revoke = post_route(broker, "revoke", |broker, req: RevokeRequest, now| {
        broker.authorities().ca_revoke(&req.id, req.force, now)
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
    broker: Arc<Broker>,
    step: &'static str,
    handle: F,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static
where
    Req: DeserializeOwned + Send + 'static,
    F: Fn(&Broker, Req, SystemTime) -> Result<RotationReply, BrokerError>
        + Clone
        + Send
        + Sync
        + 'static,
{
    warp::path("v1")
        .and(warp::path("admin"))
        .and(warp::path("ca"))
        .and(warp::path(step))
        .and(warp::path::end())
        .and(warp::post())
        .and(with_broker(broker))
        .and(json_body())
        .and_then(move |broker: Arc<Broker>, body: Bytes| {
            let handle = handle.clone();
            async move {
                let result = blocking(move || {
                    let req = parse_body::<Req>(&body)?;
                    handle(&broker, req, SystemTime::now())
                })
                .await;
                respond(result)
            }
        })
}
