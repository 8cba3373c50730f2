//! `baton example call --mcp`: an agent calling one MCP tool through a
//! gateway with its task credential, using the official Rust MCP SDK's
//! client (`rmcp`, Streamable HTTP) over the credential's mTLS, with the
//! delegation token as its bearer token.

use anyhow::{Context, Result};
use baton_tls::PeerPolicy;
use rmcp::ServiceExt as _;
use rmcp::model::CallToolRequestParams;
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;

use crate::cli::{EXIT_REFUSED, EXIT_UNREACHABLE, exit};
use crate::creds::Credential;

/// Calls `tool` with `input` (a JSON object of arguments) on the MCP
/// endpoint `url`: the tool's result, or a refusal with the gateway's
/// code and reason.
pub async fn call(
    cred: &Credential,
    url: &str,
    tool: &str,
    input: &str,
) -> Result<serde_json::Value> {
    let arguments: serde_json::Map<String, serde_json::Value> = serde_json::from_str(input)
        .context("--input must be a JSON object (the tool's arguments)")?;
    let td = cred.spiffe_id()?.trust_domain().clone();
    let http = cred.client(PeerPolicy::AnyInTrustDomains(vec![td]))?;
    let transport = StreamableHttpClientTransport::with_client(
        http,
        StreamableHttpClientTransportConfig::with_uri(url.to_owned())
            .auth_header(cred.token.expose().to_owned()),
    );
    let session = ().serve(transport).await.map_err(|e| {
        exit(
            EXIT_UNREACHABLE,
            format!("the MCP handshake with {url} failed: {e}"),
        )
    })?;
    let result = session
        .call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments))
        .await;
    let _ = session.cancel().await;
    match result {
        Ok(r) if r.is_error == Some(true) => Err(exit(
            EXIT_REFUSED,
            format!(
                "{tool} failed: {}",
                serde_json::to_string(&r.content).unwrap_or_default()
            ),
        )),
        Ok(r) => serde_json::to_value(&r).context("the tool's result"),
        Err(rmcp::ServiceError::McpError(e)) => Err(exit(
            EXIT_REFUSED,
            format!(
                "{tool} refused (JSON-RPC {}): {}{}",
                e.code.0,
                e.message,
                e.data.as_ref().map(|d| format!(" {d}")).unwrap_or_default()
            ),
        )),
        // A transport-level refusal (401 invalid_token, 403
        // insufficient_scope) or a failure on the way.
        Err(e) => Err(exit(EXIT_REFUSED, format!("{tool} refused or failed: {e}"))),
    }
}
