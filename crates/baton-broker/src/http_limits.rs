//! The rate-limit guard in front of every route of the HTTPS port.
//!
//! It runs first, on the method, the path and who the caller is (the
//! verified mTLS peer's SPIFFE ID, else its IP address), so a refused
//! request costs no body read, no signature check and no database row: the
//! answer is 429 `rate_limited`, a message naming the limit, and
//! `Retry-After` in seconds. Which routes are limited and how is in
//! [`crate::limits`].

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Instant;

use baton_tls::{PeerIdentity, RemoteAddr};
use warp::path::FullPath;
use warp::reply::Response;
use warp::{Filter, Rejection};

use crate::http_reply::Refused;
use crate::limits::{Caller, Limited, RateLimiters};

/// Charges the caller of a limited route one token, or rejects with
/// [`Refused`].
fn guard(
    limiters: Arc<RateLimiters>,
) -> impl Filter<Extract = (), Error = Rejection> + Clone + Send + Sync + 'static {
    warp::method()
        .and(warp::path::full())
        .and(warp::ext::optional::<PeerIdentity>())
        .and(warp::ext::optional::<RemoteAddr>())
        .and_then(
            move |method: http::Method,
                  path: FullPath,
                  peer: Option<PeerIdentity>,
                  addr: Option<RemoteAddr>| {
                let limiters = limiters.clone();
                async move {
                    let Some(what) = Limited::of_route(method.as_str(), path.as_str()) else {
                        return Ok(());
                    };
                    // Every HTTPS request carries its address; one without
                    // is charged to a bucket of its own, not let through.
                    let caller = Caller::of(
                        peer.as_ref().and_then(|p| p.0.as_ref()),
                        Some(addr.map_or(std::net::Ipv4Addr::UNSPECIFIED.into(), |a| a.0.ip())),
                    )
                    .unwrap_or(Caller::Ip(std::net::Ipv4Addr::UNSPECIFIED.into()));
                    limiters
                        .check(what, &caller, Instant::now())
                        .map_err(|refused| {
                            tracing::info!(limit = what.name(), %caller, retry_after_secs = refused.retry_after_secs(), "request refused by a rate limit");
                            warp::reject::custom(Refused(refused))
                        })
                }
            },
        )
        .untuple_one()
}

/// `routes` behind `admitted` (a check of the connection that costs no
/// body read or datastore row: whether its client certificate is still
/// trusted), then the rate-limit guard, every rejection answered as JSON.
/// A certificate that expired or whose authority left is refused before it
/// is charged, so it cannot spend its SPIFFE ID's bucket for the live
/// holder.
pub fn guarded<A, R>(
    admitted: A,
    limiters: Arc<RateLimiters>,
    routes: R,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static
where
    A: Filter<Extract = (), Error = Rejection> + Clone + Send + Sync + 'static,
    R: Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static,
{
    admitted
        .and(guard(limiters))
        .and(routes)
        .recover(crate::http_reply::recover)
        .unify()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::RateLimits;
    use warp::Reply as _;

    /// A connection the admission check refuses (its certificate expired,
    /// its authority gone) spends nothing of its SPIFFE ID's bucket: the
    /// live holder of that ID is still served. The control: an admitted
    /// caller spends the bucket and is then refused 429.
    #[tokio::test]
    async fn a_refused_connection_spends_nothing_of_its_ids_budget() {
        let mut limits = RateLimits::default();
        limits.apply("jwt-svid=1/1h").unwrap();
        let limiters = Arc::new(RateLimiters::new(&limits));
        let node = baton_core::SpiffeId::parse("spiffe://example.org/baton/node/n1").unwrap();
        let routes = guarded(
            warp::header::optional::<String>("x-stale")
                .and_then(|stale: Option<String>| async move {
                    match stale {
                        Some(_) => Err(warp::reject::custom(crate::http_reply::Denied(
                            "stale certificate".into(),
                        ))),
                        None => Ok(()),
                    }
                })
                .untuple_one(),
            limiters,
            warp::post().map(|| warp::reply().into_response()),
        );
        let send = |stale: bool| {
            let mut req = warp::test::request()
                .method("POST")
                .path("/v1/node/sign-jwt")
                .extension(PeerIdentity(Some(node.clone())));
            if stale {
                req = req.header("x-stale", "1");
            }
            req.reply(&routes)
        };
        for _ in 0..3 {
            assert_eq!(send(true).await.status(), 403);
        }
        assert_eq!(send(false).await.status(), 200);
        assert_eq!(send(false).await.status(), 429);
    }
}
