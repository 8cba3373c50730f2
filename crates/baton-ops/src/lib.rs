//! Operability for every long-running Baton process: the broker, the node
//! daemon, the revocation service and verifiers (the tool server).
//!
//! Place in the flow: beside each daemon's API, never on it. The daemons
//! count what they do through the process-wide [`metrics()`] (one-line
//! calls at the decision points), and register their readiness checks and
//! scrape-time gauges on an [`Ops`] handle; `--ops-listen ADDR` then
//! serves that handle over plain HTTP ([`serve`]):
//!
//! - `GET /metrics`: the Prometheus text format (version 0.0.4), only the
//!   families of the roles this process runs;
//! - `GET /livez`: 200 while the process runs;
//! - `GET /readyz`: 200 when every check passes, else 503; the JSON body
//!   lists each check with its status and, for a failing one, why.
//!
//! The listener has no authentication: it is off unless asked for, meant
//! for loopback or a scrape network, and no metric label carries a secret
//! or an unbounded value (label values are `&'static str` or numbers, so a
//! token, task id or SPIFFE ID cannot reach one; see [`metrics`]).

mod health;
pub mod metrics;
mod server;

pub use health::{CheckReport, Ops, Readiness, Role};
pub use metrics::{Metrics, metrics};
pub use server::{bind, probe, serve};

/// What can go wrong in the ops listener.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("cannot listen on {addr} for the ops listener: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the ops listener stopped: {0}")]
    Accept(#[source] std::io::Error),
    #[error("cannot reach the ops listener at {addr}: {source}")]
    Probe {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode the metrics: {0}")]
    Encode(#[from] std::fmt::Error),
}
