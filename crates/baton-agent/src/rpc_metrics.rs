//! Counts every call on the node daemon's socket by RPC and gRPC status
//! (`baton_agent_rpcs_total`, `baton_agent_rpc_duration_seconds`).
//!
//! The status is the one the call opened with: a handler's refusal is a
//! trailers-only answer whose `grpc-status` is in the headers; a call
//! without one there started normally (`OK`). A stream's duration is the
//! time to its first answer, not its life (see `baton_agent_workload_streams_open`).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

/// The RPCs served, the only values the `rpc` label takes.
const RPCS: &[(&str, &str)] = &[
    ("/SpiffeWorkloadAPI/FetchX509SVID", "FetchX509SVID"),
    ("/SpiffeWorkloadAPI/FetchX509Bundles", "FetchX509Bundles"),
    ("/SpiffeWorkloadAPI/FetchJWTSVID", "FetchJWTSVID"),
    ("/SpiffeWorkloadAPI/FetchJWTBundles", "FetchJWTBundles"),
    ("/SpiffeWorkloadAPI/ValidateJWTSVID", "ValidateJWTSVID"),
    ("/baton.delegation.v1.Delegation/Redeem", "Redeem"),
    ("/baton.delegation.v1.Delegation/Renew", "Renew"),
];

/// The label of a request path: a known RPC, else `unmatched`.
pub(crate) fn rpc_of(path: &str) -> &'static str {
    RPCS.iter()
        .find(|(p, _)| *p == path)
        .map_or("unmatched", |(_, n)| n)
}

/// The gRPC status name of a `grpc-status` value.
pub(crate) fn code_name(code: Option<&[u8]>) -> &'static str {
    match code {
        None | Some(b"0") => "OK",
        Some(b"1") => "CANCELLED",
        Some(b"2") => "UNKNOWN",
        Some(b"3") => "INVALID_ARGUMENT",
        Some(b"4") => "DEADLINE_EXCEEDED",
        Some(b"5") => "NOT_FOUND",
        Some(b"6") => "ALREADY_EXISTS",
        Some(b"7") => "PERMISSION_DENIED",
        Some(b"8") => "RESOURCE_EXHAUSTED",
        Some(b"9") => "FAILED_PRECONDITION",
        Some(b"10") => "ABORTED",
        Some(b"11") => "OUT_OF_RANGE",
        Some(b"12") => "UNIMPLEMENTED",
        Some(b"13") => "INTERNAL",
        Some(b"14") => "UNAVAILABLE",
        Some(b"15") => "DATA_LOSS",
        Some(b"16") => "UNAUTHENTICATED",
        Some(_) => "UNKNOWN",
    }
}

/// The tower layer counting calls.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct CountRpcsLayer;

impl<S> tower::Layer<S> for CountRpcsLayer {
    type Service = CountRpcs<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CountRpcs(inner)
    }
}

#[derive(Debug, Clone)]
pub(crate) struct CountRpcs<S>(S);

type BoxFuture<T, E> = Pin<Box<dyn Future<Output = Result<T, E>> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for CountRpcs<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<S::Response, S::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let rpc = rpc_of(req.uri().path());
        let started = Instant::now();
        let answer = self.0.call(req);
        Box::pin(async move {
            let r = answer.await;
            let code = match &r {
                Ok(resp) => code_name(resp.headers().get("grpc-status").map(|v| v.as_bytes())),
                Err(_) => "UNAVAILABLE",
            };
            baton_ops::metrics().agent_rpc(rpc, code, started.elapsed().as_secs_f64());
            r
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_rpcs_and_codes_become_labels() {
        assert_eq!(rpc_of("/SpiffeWorkloadAPI/FetchJWTSVID"), "FetchJWTSVID");
        assert_eq!(rpc_of("/baton.delegation.v1.Delegation/Redeem"), "Redeem");
        assert_eq!(rpc_of("/SpiffeWorkloadAPI/spiffe://x/y"), "unmatched");
        assert_eq!(code_name(None), "OK");
        assert_eq!(code_name(Some(b"7")), "PERMISSION_DENIED");
        assert_eq!(code_name(Some(b"999")), "UNKNOWN");
    }
}
