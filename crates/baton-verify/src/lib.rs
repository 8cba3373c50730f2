//! The tool-server side of Baton: everything a tool server (an MCP server,
//! an internal API) runs before and after each tool call.
//!
//! Place in the flow: an agent holds a task X509-SVID and a delegation
//! token (an ES256 JWT minted by the broker, `baton_ca::Ca::
//! sign_delegation_token`) bound to that certificate. It connects to the
//! tool server over mTLS ([`tool_server_config`]) and presents the token
//! with each call. The tool server then:
//!
//! 1. takes the verified peer from the connection ([`PeerCert`]);
//! 2. verifies the token for that peer ([`TokenVerifier::verify`]):
//!    signature by a broker key of a trusted bundle ([`JwtBundles`]),
//!    audience, lifetime, the certificate binding (`cnf`), that the peer is
//!    the current actor, the delegation chain (never widening, never
//!    outliving its parent) and revocation ([`RevocationCheck`]), and gets
//!    a [`VerifiedDelegation`];
//! 3. asks the [`ToolGate`] whether this token may run this tool
//!    ([`ToolSpec`]): scope, the task's risk ceiling, the policy engine
//!    ([`CallPolicy`]); only then does it get the [`VerifiedCall`] its tool
//!    handler requires, and the call is reported;
//! 4. runs the tool and calls [`VerifiedCall::finish`] with the output.
//!
//! Reports go through a durable spool to the broker ([`Reporter`],
//! [`HttpSender`]). The broker uses [`TokenVerifier::for_broker`] to check
//! a holder's own token at a delegation hop.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use baton_verify::*;
//! # fn handler(call: &VerifiedCall) -> Vec<u8> { Vec::new() }
//! # fn run(verifier: &TokenVerifier, gate: &ToolGate, tool: &ToolSpec,
//! #        conn: &baton_tls::rustls::ServerConnection, token: &str, input: &[u8], now: u64)
//! #        -> Result<(), Box<dyn std::error::Error>> {
//! let peer = PeerCert::from_connection(conn)?;            // once per connection
//! let delegation = verifier.verify(token, &peer, now)?;   // every call
//! let call = gate.authorize(&delegation, tool, input, now)?;
//! let output = handler(&call);
//! call.finish(&output)?;
//! # Ok(())
//! # }
//! ```

mod bundles;
mod cache;
mod error;
mod feed;
mod gate;
mod report;
mod strict;
mod tls;
mod token;

pub use bundles::JwtBundles;
pub use error::{CallDenied, PeerError, ReportError, SendError, TokenError};
pub use feed::{BrokerFeed, FEED_PATH};
pub use gate::{
    CallContext, CallNotes, CallPolicy, Checked, OutputDigest, PolicyDecision, RevocationFreshness,
    ToolGate, ToolSpec, VerifiedCall,
};
pub use report::{
    Backoff, Delivered, Durable, HttpSender, MAX_BACKOFF, MAX_BATCH, MAX_BATCH_BYTES, MIN_BACKOFF,
    REFUSED_FILE, Refusal, ReportBatch, ReportSender, Reporter, SEGMENT_RECORDS, SendFuture,
    TOOL_CALLS_PATH, broker_urls,
};
pub use tls::tool_server_config;
pub use token::{
    CacheStats, DEFAULT_CACHE_CAPACITY, IAT_SKEW_SECS, MAX_TOKEN_LEN, NoRevocation, PeerCert,
    RevocationCheck, Standing, TokenVerifier, VerifiedDelegation,
};
