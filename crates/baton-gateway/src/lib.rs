//! `baton gateway`: Baton's checks in front of a tool you did not write.
//!
//! Place in the flow: an agent holds a task SVID and a delegation token for
//! the gateway's audience. It calls the gateway over mTLS; the gateway
//! verifies the token against the peer's certificate, maps the request to a
//! tool by its route ([`Config`]), asks the [`baton_verify::ToolGate`]
//! (revocation feed, scope, risk ceiling, Cedar), and only then forwards
//! the request to the unmodified upstream with the verified caller in
//! `Baton-Task`, `Baton-Actor` and `Baton-Chain` headers (any such header
//! the caller sent is removed first). Each call is reported to the broker
//! through a durable spool, so `baton audit trace` shows it. Refusals are
//! RFC 6750 (`401 invalid_token`, `403 insufficient_scope`); RFC 9728
//! metadata is served at [`METADATA_PATH`].
//!
//! [`enforce`] and [`live`] are the machinery every enforcing server
//! shares (the gateway and `baton example tool-server`).

mod approval;
mod config;
mod digest_key;
pub mod enforce;
mod error;
mod gateway;
pub mod live;
mod mcp;
mod policy;
mod record;

pub use config::{
    Config, MCP_BASE_METHODS, Matched, McpEndpoint, McpTool, Route, Transport, Upstream,
};
pub use error::{ConfigError, GatewayError};
pub use gateway::{
    HEADER_ACTOR, HEADER_CHAIN, HEADER_TASK, MAX_BODY, METADATA_PATH, Reload, RunOptions,
    error_chain, run, upstream_headers,
};
pub use mcp::{APPROVAL_PENDING as MCP_APPROVAL_PENDING, REFUSED as MCP_REFUSED};
pub use record::{MAX_FIELD_CHARS, REDACTED, Recording};
