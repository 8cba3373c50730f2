//! `POST /v1/secrets/lease` and `POST /v1/secrets/introspect`: the HTTPS
//! shell of [`crate::secrets`].

use std::convert::Infallible;
use std::sync::Arc;

use baton_core::Secret;
use baton_tls::{PeerCertificate, PeerIdentity};
use bytes::Bytes;
use serde::Deserialize;
use warp::Filter;
use warp::reply::Response;

use crate::delegation::Delegation;
use crate::http_reply::{json_body, parse_body, respond};
use crate::secrets::{LeaseBody, Secrets};
use crate::service::BrokerError;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IntrospectBody {
    key: Secret,
}

fn with<T: Clone + Send + Sync + 'static>(
    v: T,
) -> impl Filter<Extract = (T,), Error = Infallible> + Clone {
    warp::any().map(move || v.clone())
}

/// `POST /v1/secrets/lease` and `POST /v1/secrets/introspect` on the HTTPS port.
pub fn routes(
    secrets: Arc<Secrets>,
    d: Arc<Delegation>,
) -> impl Filter<Extract = (Response,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let lease = warp::path!("v1" / "secrets" / "lease")
        .and(warp::post())
        .and(with(secrets.clone()))
        .and(with(d.clone()))
        .and(warp::ext::optional::<PeerIdentity>())
        .and(warp::ext::optional::<PeerCertificate>())
        .and(json_body())
        .and_then(
            |s: Arc<Secrets>,
             d: Arc<Delegation>,
             id: Option<PeerIdentity>,
             cert: Option<PeerCertificate>,
             body: Bytes| async move {
                // Signature checks, SQLite and the audit log around the
                // engine's calls: on the blocking pool.
                let result = crate::http_reply::on_blocking_thread(async move {
                    let peer = crate::http_delegation::peer_cert(id, cert)?;
                    let req = parse_body::<LeaseBody>(&body)?;
                    s.lease(&d, &peer, &req, crate::oidc::unix_now()).await
                })
                .await;
                respond(result)
            },
        );
    let introspect = warp::path!("v1" / "secrets" / "introspect")
        .and(warp::post())
        .and(with(secrets))
        .and(with(d))
        .and(warp::ext::optional::<PeerIdentity>())
        .and(warp::ext::optional::<PeerCertificate>())
        .and(json_body())
        .and_then(
            |s: Arc<Secrets>,
             d: Arc<Delegation>,
             id: Option<PeerIdentity>,
             cert: Option<PeerCertificate>,
             body: Bytes| async move {
                // The API-key store is SQLite: on the blocking pool.
                let result = crate::http_reply::blocking(move || {
                    let caller = id.as_ref().and_then(|p| p.0.clone()).ok_or_else(|| {
                        BrokerError::Unauthenticated(
                            "introspection needs mTLS with an SVID of this trust domain".into(),
                        )
                    })?;
                    if !caller.is_member_of(d.trust_domain()) {
                        return Err(BrokerError::Forbidden {
                            code: "not_entitled",
                            message: format!("{caller} is outside the trust domain"),
                        });
                    }
                    // A revoked SVID, or a blocked caller, learns nothing
                    // of a key (whether it is live, its task and scope).
                    let peer = crate::http_delegation::peer_cert(id, cert)?;
                    crate::requests::live_tool_server(&d, &peer, std::time::SystemTime::now())?;
                    let req = parse_body::<IntrospectBody>(&body)?;
                    let now = crate::oidc::unix_now();
                    s.introspect(req.key.expose(), now, &|id| d.credential_revoked(id, now))
                })
                .await;
                respond(result)
            },
        );
    lease.or(introspect).unify()
}
