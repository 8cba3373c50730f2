//! The HTTPS port's request counter (`baton_http_requests_total`).

use baton_ops::metrics;

use crate::ops::route_of;

/// A warp log hook counting every answer of the HTTPS port by route and
/// status, with its latency.
pub fn count_requests() -> warp::log::Log<impl Fn(warp::log::Info<'_>) + Clone> {
    warp::log::custom(|info: warp::log::Info<'_>| {
        metrics().http_request(
            route_of(info.path()),
            info.status().as_u16(),
            info.elapsed().as_secs_f64(),
        );
    })
}
