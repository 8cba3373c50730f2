//! `example-crm`: a CRM as a third party would ship it, for the gateway
//! example (`examples/gateway-flow.sh`). It knows nothing of Baton: no
//! Baton crate, no token, no mTLS. It serves
//!
//! - an MCP server built with the official Rust SDK (`rmcp`, Streamable
//!   HTTP at `/mcp`) with the tools `crm.search` and `crm.update`, and
//! - a plain HTTP API: `GET /accounts/{account}` and
//!   `PUT /cases/{case}`,
//!
//! both on loopback only, plain HTTP. Put `baton gateway` in front of it and
//! every call is checked and recorded; the gateway tells it who is calling
//! in `Baton-Task`, `Baton-Actor` and `Baton-Chain` headers, which it
//! echoes back so the example can show them.
//!
//! ```text
//! example-crm --ready-file crm.addr   # writes "mcp=127.0.0.1:P1\nhttp=127.0.0.1:P2\n"
//! ```

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context as _;
use clap::Parser;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::Extension;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{ServerCapabilities, ServerConfig};
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ServerHandler, schemars, tool, tool_handler, tool_router};
use warp::Filter as _;

#[derive(Debug, Parser)]
#[command(
    name = "example-crm",
    about = "A CRM that knows nothing of Baton (MCP + HTTP)"
)]
struct Args {
    /// Where the MCP server listens (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    mcp_listen: SocketAddr,
    /// Where the plain HTTP API listens (loopback).
    #[arg(long, default_value = "127.0.0.1:0")]
    http_listen: SocketAddr,
    /// Written once both listen: `mcp=ADDR` and `http=ADDR`, a line each.
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct Account {
    /// The account's name, e.g. `acme`.
    account: String,
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct CaseUpdate {
    account: String,
    case: u32,
    status: String,
}

/// Who the gateway says is calling (absent when called directly).
fn caller(parts: &http::request::Parts) -> String {
    let h = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .to_owned()
    };
    format!("task {} actor {}", h("baton-task"), h("baton-actor"))
}

#[derive(Clone)]
struct Crm {
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl Crm {
    #[tool(name = "crm.search", description = "Look up an account's open cases")]
    fn search(
        &self,
        Parameters(a): Parameters<Account>,
        Extension(parts): Extension<http::request::Parts>,
    ) -> String {
        format!(
            "account {}: 3 open cases (asked by {})",
            a.account,
            caller(&parts)
        )
    }

    #[tool(name = "crm.update", description = "Set a case's status")]
    fn update(
        &self,
        Parameters(u): Parameters<CaseUpdate>,
        Extension(parts): Extension<http::request::Parts>,
    ) -> String {
        format!(
            "account {} case {} is now {} (by {})",
            u.account,
            u.case,
            u.status,
            caller(&parts)
        )
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Crm {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

async fn serve_mcp(listener: tokio::net::TcpListener) {
    let service: StreamableHttpService<Crm, LocalSessionManager> = StreamableHttpService::new(
        || {
            Ok(Crm {
                tool_router: Crm::tool_router(),
            })
        },
        Arc::default(),
        StreamableHttpServerConfig::default(),
    );
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let svc = hyper_util::service::TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
        });
    }
}

async fn serve_http(listener: tokio::net::TcpListener) {
    let who = warp::header::optional::<String>("baton-task")
        .and(warp::header::optional::<String>("baton-actor"));
    let account = warp::get()
        .and(warp::path!("accounts" / String))
        .and(who)
        .map(
            |account: String, task: Option<String>, actor: Option<String>| {
                warp::reply::json(&serde_json::json!({
                    "account": account,
                    "open_cases": 3,
                    "asked_by": {"task": task, "actor": actor},
                }))
            },
        );
    let case = warp::put()
        .and(warp::path!("cases" / u32))
        .and(warp::body::json())
        .and(who)
        .map(
            |case: u32, body: serde_json::Value, task: Option<String>, actor: Option<String>| {
                warp::reply::json(&serde_json::json!({
                    "case": case,
                    "status": body.get("status").cloned().unwrap_or_default(),
                    "changed_by": {"task": task, "actor": actor},
                }))
            },
        );
    warp::serve(account.or(case)).incoming(listener).run().await;
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    for addr in [args.mcp_listen, args.http_listen] {
        if !addr.ip().is_loopback() {
            anyhow::bail!("{addr}: this example listens on loopback only (plain HTTP)");
        }
    }
    let mcp = tokio::net::TcpListener::bind(args.mcp_listen)
        .await
        .with_context(|| format!("--mcp-listen {}", args.mcp_listen))?;
    let http = tokio::net::TcpListener::bind(args.http_listen)
        .await
        .with_context(|| format!("--http-listen {}", args.http_listen))?;
    let ready = format!("mcp={}\nhttp={}\n", mcp.local_addr()?, http.local_addr()?);
    if let Some(file) = &args.ready_file {
        let tmp = file.with_extension("tmp");
        std::fs::write(&tmp, &ready).with_context(|| format!("{}", tmp.display()))?;
        std::fs::rename(&tmp, file).with_context(|| format!("{}", file.display()))?;
    }
    tokio::select! {
        () = serve_mcp(mcp) => {}
        () = serve_http(http) => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
    }
    Ok(())
}
