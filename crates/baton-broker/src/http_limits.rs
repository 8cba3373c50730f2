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

/// `routes` behind the rate-limit guard, every rejection answered as JSON.
pub fn guarded<R>(
    limiters: Arc<RateLimiters>,
    routes: R,
) -> impl Filter<Extract = (Response,), Error = Infallible> + Clone + Send + Sync + 'static
where
    R: Filter<Extract = (Response,), Error = Rejection> + Clone + Send + Sync + 'static,
{
    guard(limiters)
        .and(routes)
        .recover(crate::http_reply::recover)
        .unify()
}
