//! `baton gateway` in front of an unmodified MCP server built with the
//! official Rust SDK (`rmcp`, Streamable HTTP, in this process), driven by
//! `rmcp`'s own client over the agents' mTLS credentials: `tools/list`
//! shows only what the caller may call, allowed calls reach the tool with
//! the verified caller, each refusal comes back as the MCP client sees it
//! (a JSON-RPC error, or 403 `insufficient_scope` with the scope needed),
//! progress notifications stream through while the tool still runs, and
//! sessions, batches and SEP-2243 headers cannot be used to slip past.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::tool::Extension;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolRequestParams, ClientConfig, NumberOrString, ProgressNotificationParam, ProgressToken,
    ServerCapabilities, ServerConfig,
};
use rmcp::service::{NotificationContext, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{
    ClientHandler, Peer, RoleClient, RoleServer, ServerHandler, ServiceError, ServiceExt, schemars,
    tool, tool_handler, tool_router,
};

use crate::delegation::{PLANNER, RESEARCHER};
use crate::gateway::{Gw, client, token_of};
use crate::harness::wait_for;

/// What the MCP server saw: each tool run, with the caller's headers.
#[derive(Default)]
pub(crate) struct Seen {
    calls: Mutex<Vec<(String, HashMap<String, String>)>>,
    /// `docs.summarize` waits for this before it answers.
    release: tokio::sync::Notify,
    watch_done: AtomicBool,
}

impl Seen {
    fn record(&self, tool: &str, parts: &http::request::Parts) {
        let headers = parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    v.to_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        self.calls.lock().unwrap().push((tool.to_owned(), headers));
    }

    pub(crate) fn count(&self) -> usize {
        self.calls.lock().unwrap().len()
    }

    pub(crate) fn last(&self) -> (String, HashMap<String, String>) {
        self.calls.lock().unwrap().last().cloned().unwrap()
    }
}

#[derive(Debug, serde::Deserialize, schemars::JsonSchema)]
struct Account {
    account: String,
}

/// A CRM tool server as a third party would write it with `rmcp`: it
/// knows nothing of Baton.
#[derive(Clone)]
struct Crm {
    seen: Arc<Seen>,
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
        self.seen.record("crm.search", &parts);
        format!("account {}: 3 open cases", a.account)
    }

    #[tool(name = "crm.update", description = "Update a case")]
    fn update(
        &self,
        Parameters(a): Parameters<Account>,
        Extension(parts): Extension<http::request::Parts>,
    ) -> String {
        self.seen.record("crm.update", &parts);
        format!("account {} updated", a.account)
    }

    #[tool(name = "admin.shutdown", description = "Stop the CRM")]
    fn shutdown(&self, Extension(parts): Extension<http::request::Parts>) -> String {
        self.seen.record("admin.shutdown", &parts);
        "stopping".to_owned()
    }

    #[tool(
        name = "docs.summarize",
        description = "Report progress, then answer when released"
    )]
    async fn watch(
        &self,
        Parameters(a): Parameters<Account>,
        Extension(parts): Extension<http::request::Parts>,
        client: Peer<RoleServer>,
    ) -> String {
        self.seen.record("docs.summarize", &parts);
        let _ = client
            .notify_progress(
                ProgressNotificationParam::new(ProgressToken(NumberOrString::Number(7)), 1.0)
                    .with_message("watching"),
            )
            .await;
        self.seen.release.notified().await;
        self.seen.watch_done.store(true, Ordering::SeqCst);
        format!("watch of {} ended", a.account)
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for Crm {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }
}

/// Serves [`Crm`] over Streamable HTTP at `/mcp` on a loopback port.
pub(crate) fn start_crm() -> (u16, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    listener.set_nonblocking(true).unwrap();
    let state = seen.clone();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let service: StreamableHttpService<Crm, LocalSessionManager> =
                StreamableHttpService::new(
                    move || {
                        Ok(Crm {
                            seen: state.clone(),
                            tool_router: Crm::tool_router(),
                        })
                    },
                    Arc::default(),
                    StreamableHttpServerConfig::default().with_sse_keep_alive(None),
                );
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let svc = hyper_util::service::TowerToHyperService::new(service.clone());
                tokio::spawn(async move {
                    let _ = hyper_util::server::conn::auto::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
                });
            }
        });
    });
    (port, seen)
}

/// A hostile MCP server: every POST is answered with `answer` as JSON,
/// whatever it asked.
fn start_junk_mcp(answer: &'static str) -> u16 {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut len = 0usize;
                    let mut line = String::new();
                    loop {
                        line.clear();
                        if reader.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        let l = line.trim_end().to_ascii_lowercase();
                        if l.is_empty() {
                            break;
                        }
                        if let Some(v) = l.strip_prefix("content-length:") {
                            len = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; len];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let reply = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{answer}",
                        answer.len()
                    );
                    if reader.get_mut().write_all(reply.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    port
}

pub(crate) fn endpoint(port: u16) -> String {
    // A port nothing listens on: the MCP server behind /mcp-down is down.
    let down = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    // A server whose tool list the gateway cannot filter: a batch answer
    // to one request, listing a tool the caller may not call.
    let junk = start_junk_mcp(
        r#"[{"jsonrpc":"2.0","id":9,"result":{"tools":[{"name":"crm.update","inputSchema":{}}]}}]"#,
    );
    format!(
        r#"
[upstreams.mcp]
url = "http://127.0.0.1:{port}"

[upstreams.down]
url = "http://127.0.0.1:{down}"

[upstreams.junk]
url = "http://127.0.0.1:{junk}"

[[mcp]]
path = "/mcp-junk"
upstream = "junk"

[[mcp.tools]]
name = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"

[[mcp]]
path = "/mcp-down"
upstream = "down"

[[mcp.tools]]
name = "crm.search"
resource = "dataset:crm:{{account}}"
permission = "tool:crm.search:read"
tier = "read"

[[mcp]]
path = "/mcp"
upstream = "mcp"

[[mcp.tools]]
name = "crm.search"
resource = "dataset:crm:{{account}}"
permission = "tool:crm.search:read"
tier = "read"

[[mcp.tools]]
name = "docs.summarize"
resource = "dataset:crm"
permission = "tool:docs.summarize:read"
tier = "read"

[[mcp.tools]]
name = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"
"#
    )
}

/// The client's side: progress notifications as they arrive.
#[derive(Clone)]
pub(crate) struct Agent {
    progress: tokio::sync::mpsc::UnboundedSender<String>,
}

impl ClientHandler for Agent {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        let _ = self
            .progress
            .send(params.message.unwrap_or_default().to_string());
    }
}

pub(crate) type Session = RunningService<RoleClient, Agent>;

pub(crate) async fn connect(
    url: &str,
    cred: &Path,
) -> (Session, tokio::sync::mpsc::UnboundedReceiver<String>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let transport = StreamableHttpClientTransport::with_client(
        client(cred),
        StreamableHttpClientTransportConfig::with_uri(format!("{url}/mcp"))
            .auth_header(token_of(cred)),
    );
    let session = tokio::time::timeout(
        Duration::from_secs(60),
        Agent { progress: tx }.serve(transport),
    )
    .await
    .expect("the MCP handshake through the gateway hangs")
    .expect("the MCP handshake through the gateway failed");
    (session, rx)
}

pub(crate) async fn call(
    s: &Session,
    tool: &str,
    args: serde_json::Value,
) -> Result<String, ServiceError> {
    call_meta(s, tool, args, None).await
}

/// [`call`] with `params._meta` set to `meta` (an object).
pub(crate) async fn call_meta(
    s: &Session,
    tool: &str,
    args: serde_json::Value,
    meta: Option<serde_json::Value>,
) -> Result<String, ServiceError> {
    let args = args.as_object().cloned().unwrap_or_default();
    let mut params = CallToolRequestParams::new(tool.to_owned()).with_arguments(args);
    params.meta = meta
        .map(|m| rmcp::model::RequestMetaObject::from(m.as_object().cloned().unwrap_or_default()));
    let r = tokio::time::timeout(Duration::from_secs(60), s.call_tool(params))
        .await
        .expect("the call hangs")?;
    Ok(serde_json::to_string(&r.content).unwrap())
}

async fn tool_names(s: &Session) -> Vec<String> {
    let mut names: Vec<String> = s
        .list_all_tools()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name.to_string())
        .collect();
    names.sort();
    names
}

/// The JSON-RPC error of a refused call: code, message, data.
pub(crate) fn rpc_error(e: &ServiceError) -> (i32, String, serde_json::Value) {
    match e {
        ServiceError::McpError(d) => (
            d.code.0,
            d.message.to_string(),
            d.data.clone().unwrap_or_default(),
        ),
        other => panic!("expected a JSON-RPC error, got {other:?}"),
    }
}

/// A raw POST on the MCP endpoint: status, headers, body text.
pub(crate) async fn post(
    url: &str,
    cred: &Path,
    body: &serde_json::Value,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, String) {
    let mut req = client(cred)
        .post(format!("{url}/mcp"))
        .bearer_auth(token_of(cred))
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body.to_string());
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let h = resp.headers().clone();
    (status, h, resp.text().await.unwrap_or_default())
}

#[test]
fn mcp_through_the_gateway_lists_calls_streams_and_refuses_as_mcp_clients_see_it() {
    baton_tls::install_crypto_provider();
    let (port, seen) = start_crm();
    let g = Gw::start_with(|_| (endpoint(port), Vec::new()));
    let (task, planner, researcher) = g.researcher();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The upstream itself offers every tool (the control for the list).
        let direct = {
            let transport =
                StreamableHttpClientTransport::from_uri(format!("http://127.0.0.1:{port}/mcp"));
            let s = ClientConfig::default().serve(transport).await.unwrap();
            let mut names: Vec<String> = s
                .list_all_tools()
                .await
                .unwrap()
                .into_iter()
                .map(|t| t.name.to_string())
                .collect();
            names.sort();
            names
        };
        assert_eq!(
            direct,
            [
                "admin.shutdown",
                "crm.search",
                "crm.update",
                "docs.summarize"
            ]
        );

        // Each caller sees only what it may call, and nobody a tool the
        // gateway does not serve. The researcher: its two read tools, not
        // crm.update (outside its scope). The planner holds crm.update and
        // docs.summarize in scope, but Cedar refuses both to it (a write
        // outside the task's purpose; reads are for research agents), so
        // it sees only crm.search, whose resource comes from the arguments
        // and is decided in full at the call.
        let (r, mut progress) = connect(&g.url, &researcher).await;
        assert_eq!(tool_names(&r).await, ["crm.search", "docs.summarize"]);
        let (p, _) = connect(&g.url, &planner).await;
        assert_eq!(tool_names(&p).await, ["crm.search"]);

        // Allowed: the tool runs and sees the verified caller, never the
        // caller's token or a forged identity.
        let before = seen.count();
        let out = call(&r, "crm.search", serde_json::json!({"account": "acme"}))
            .await
            .unwrap();
        assert!(out.contains("account acme: 3 open cases"), "{out}");
        assert_eq!(seen.count(), before + 1);
        let (tool, headers) = seen.last();
        assert_eq!(tool, "crm.search");
        assert_eq!(headers.get("baton-task"), Some(&task));
        assert_eq!(
            headers.get("baton-actor").map(String::as_str),
            Some(RESEARCHER)
        );
        assert_eq!(
            headers.get("baton-chain").map(String::as_str),
            Some(format!("{RESEARCHER},{PLANNER}").as_str())
        );
        assert!(!headers.contains_key("authorization"), "{headers:?}");

        // Out of scope: 403 insufficient_scope naming the scope needed, as
        // the MCP authorization spec's scope challenge; the tool never runs.
        let before = seen.count();
        let e = call(&r, "crm.update", serde_json::json!({"account": "acme"}))
            .await
            .unwrap_err();
        let challenge = e.auth_challenge().unwrap_or_default().to_owned();
        assert!(
            challenge.contains("insufficient_scope")
                && challenge.contains("scope=\"tool:crm.update:write\""),
            "{e:?}"
        );
        // Refused by policy (a write outside the task's purpose): a JSON-RPC
        // error the client can show, with the deciding policies.
        let e = call(&p, "crm.update", serde_json::json!({"account": "acme"}))
            .await
            .unwrap_err();
        let (code, message, data) = rpc_error(&e);
        assert_eq!(i64::from(code), baton_gateway::MCP_REFUSED, "{e:?}");
        assert!(message.contains("crm.update"), "{message}");
        assert_eq!(data["code"], "policy_denied", "{data}");
        assert!(
            data["policies"]
                .to_string()
                .contains("writes.require-case-update-purpose"),
            "{data}"
        );
        // A tool the gateway does not serve, though the upstream has it.
        let e = call(&p, "admin.shutdown", serde_json::json!({}))
            .await
            .unwrap_err();
        let (code, message, _) = rpc_error(&e);
        assert_eq!(code, -32602, "{e:?}");
        assert!(
            message.contains("not served through this gateway"),
            "{message}"
        );
        // A resource argument missing.
        let e = call(&r, "crm.search", serde_json::json!({"acct": "acme"}))
            .await
            .unwrap_err();
        assert!(rpc_error(&e).1.contains("\"account\" is required"), "{e:?}");
        // A resource spelled as a float: `dataset:crm:42.0` to a policy, 42
        // to a server that reads a number.
        let e = call(&r, "crm.search", serde_json::json!({"account": 4.2e1}))
            .await
            .unwrap_err();
        let (code, message, _) = rpc_error(&e);
        assert_eq!(code, -32602, "{e:?}");
        assert!(message.contains("must be an integer"), "{message}");
        // Text Python's `int()` reads as 42: underscores, fullwidth or
        // Arabic-Indic digits, a no-break space around it.
        for spelling in ["4_2", "\u{ff14}\u{ff12}", "\u{664}\u{662}", "42\u{a0}"] {
            let e = call(&r, "crm.search", serde_json::json!({"account": spelling}))
                .await
                .unwrap_err();
            let (code, message, _) = rpc_error(&e);
            assert_eq!(code, -32602, "{spelling:?}: {e:?}");
            assert!(message.contains("\"account\""), "{spelling:?}: {message}");
        }
        assert_eq!(seen.count(), before, "a refused call reached the tool");
        // A resource too long for the audit log (it keeps 1 KiB): refused
        // before it runs, rather than run and its record refused.
        let e = call(&r, "crm.search", serde_json::json!({"account": "a".repeat(1100)}))
            .await
            .unwrap_err();
        let (code, message, data) = rpc_error(&e);
        assert_eq!(code, -32602, "{e:?}");
        assert!(message.contains("resource is over 1024 bytes"), "{message}");
        assert_eq!(data["field"], "resource", "{data}");
        assert_eq!(seen.count(), before, "an unrecordable call reached the tool");
        // Control: a long one within the bound runs.
        call(&r, "crm.search", serde_json::json!({"account": "a".repeat(1000)}))
            .await
            .unwrap();
        assert_eq!(seen.count(), before + 1);

        // Streaming: the tool's progress reaches the client while the tool
        // still runs (a buffering proxy would hold it until the answer).
        let watcher = {
            let peer = r.peer().clone();
            tokio::spawn(async move {
                peer.call_tool(
                    CallToolRequestParams::new("docs.summarize").with_arguments(
                        serde_json::json!({"account": "acme"})
                            .as_object()
                            .cloned()
                            .unwrap(),
                    ),
                )
                .await
            })
        };
        let first = tokio::time::timeout(Duration::from_secs(60), progress.recv())
            .await
            .expect("no progress reached the client while the tool ran")
            .unwrap();
        assert_eq!(first, "watching");
        assert!(
            !seen.watch_done.load(Ordering::SeqCst),
            "the tool had already answered"
        );
        seen.release.notify_one();
        let done = tokio::time::timeout(Duration::from_secs(60), watcher)
            .await
            .expect("the streamed call never ended")
            .unwrap()
            .unwrap();
        assert!(
            serde_json::to_string(&done.content)
                .unwrap()
                .contains("watch of acme ended"),
            "{done:?}"
        );

        // Raw requests an MCP client would not send.
        let search = serde_json::json!({"jsonrpc": "2.0", "id": 9, "method": "tools/call",
            "params": {"name": "crm.search", "arguments": {"account": "acme"}}});
        let before = seen.count();
        // A body that says one tool and a SEP-2243 header that says another.
        let (status, _, body) =
            post(&g.url, &researcher, &search, &[("mcp-name", "crm.update")]).await;
        assert_eq!(status, 400, "{body}");
        assert!(body.contains("mcp-name"), "{body}");
        // A duplicate key: the gateway decides on the last `name` and
        // forwards the message as it read it, so the server runs that tool
        // (given the raw bytes, rmcp would refuse the duplicate field, and
        // a parser keeping the first would run crm.update).
        let dup = r#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"crm.update","name":"crm.search","arguments":{"account":"dup"},"_meta":{"io.modelcontextprotocol/protocolVersion":"2026-07-28","io.modelcontextprotocol/clientCapabilities":{}}}}"#;
        let resp = client(&researcher)
            .post(format!("{}/mcp", g.url))
            .bearer_auth(token_of(&researcher))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .header("mcp-name", "crm.search")
            .body(dup)
            .send()
            .await
            .unwrap();
        let text = resp.text().await.unwrap();
        assert!(text.contains("account dup: 3 open cases"), "{text}");
        assert_eq!(seen.count(), before + 1);
        assert_eq!(seen.last().0, "crm.search");
        let before = seen.count();
        // A batch hiding a call behind another.
        let (status, _, body) = post(
            &g.url,
            &researcher,
            &serde_json::json!([search.clone()]),
            &[],
        )
        .await;
        assert_eq!(status, 400, "{body}");
        // A method the gateway cannot check.
        let (status, _, body) = post(
            &g.url,
            &researcher,
            &serde_json::json!({"jsonrpc": "2.0", "id": 3, "method": "resources/list"}),
            &[],
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains("not allowed through the Baton gateway"),
            "{body}"
        );
        // Two argument keys that differ only in case: the gateway would take
        // the resource from one, a server matching keys without case (Go's
        // encoding/json) from the other.
        let twins = serde_json::json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
            "params": {"name": "crm.search", "arguments": {"account": "acme", "Account": "vip"}}});
        let (_, _, body) = post(&g.url, &researcher, &twins, &[]).await;
        assert!(body.contains("differ only in case"), "{body}");
        // `ſ` folds to `s` in Go: the same twin.
        let folded = serde_json::json!({"jsonrpc": "2.0", "id": 6, "method": "tools/call",
            "params": {"name": "crm.search", "arguments": {"account": "acme", "mode_s": "read", "mode_ſ": "purge"}}});
        let (_, _, body) = post(&g.url, &researcher, &folded, &[]).await;
        assert!(body.contains("differ only in case"), "{body}");
        // A call smuggled beside an allowed method, in fields a
        // case-insensitive server reads as `method` and `params`.
        let smuggled = serde_json::json!({"jsonrpc": "2.0", "id": 7, "method": "ping", "params": {},
            "Method": "tools/call", "Params": {"name": "crm.update", "arguments": {}}});
        let (_, _, body) = post(&g.url, &researcher, &smuggled, &[]).await;
        assert!(
            body.contains("Method") && body.contains("is not one"),
            "{body}"
        );
        // A GET (the server's stream) carrying a call in its body.
        let resp = client(&researcher)
            .get(format!("{}/mcp", g.url))
            .bearer_auth(token_of(&researcher))
            .header("accept", "text/event-stream")
            .body(search.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 400);
        let text = resp.text().await.unwrap();
        assert!(text.contains("carries no body"), "{text}");
        assert_eq!(seen.count(), before, "a refused request reached the tool");

        // A session belongs to the caller that opened it.
        let init = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
            "params": {"protocolVersion": "2025-06-18", "capabilities": {},
                "clientInfo": {"name": "raw", "version": "0"}}});
        let (status, h, body) = post(&g.url, &researcher, &init, &[]).await;
        assert_eq!(status, 200, "{body}");
        let sid = h
            .get("mcp-session-id")
            .expect("the upstream opened no session")
            .to_str()
            .unwrap()
            .to_owned();
        let initialized =
            serde_json::json!({"jsonrpc": "2.0", "method": "notifications/initialized"});
        let session = [
            ("mcp-session-id", sid.as_str()),
            ("mcp-protocol-version", "2025-06-18"),
        ];
        let (status, _, body) = post(&g.url, &planner, &initialized, &session).await;
        assert_eq!(
            status, 404,
            "another agent used the researcher's session: {body}"
        );
        let (status, _, body) = post(&g.url, &researcher, &initialized, &session).await;
        assert!(status == 202 || status == 200, "{status} {body}");
        let forged = [("mcp-session-id", "not-a-session")];
        let (status, _, _) = post(&g.url, &researcher, &initialized, &forged).await;
        assert_eq!(status, 404);

        // The server down: a clear 502 as a JSON-RPC error, and the call
        // recorded as failed, never as answered.
        let resp = client(&researcher)
            .post(format!("{}/mcp-down", g.url))
            .bearer_auth(token_of(&researcher))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(
                serde_json::json!({"jsonrpc": "2.0", "id": 5, "method": "tools/call",
                    "params": {"name": "crm.search", "arguments": {"account": "down-co"}}})
                .to_string(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 502);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["id"], 5, "{body}");
        assert_eq!(body["error"]["data"]["code"], "upstream", "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("the tool server behind the gateway failed"),
            "{body}"
        );
        assert!(!body.to_string().contains("127.0.0.1"), "{body}");

        // A tool list the gateway cannot read for certain is not passed
        // on: it could list every tool.
        let resp = client(&researcher)
            .post(format!("{}/mcp-junk", g.url))
            .bearer_auth(token_of(&researcher))
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream")
            .body(
                serde_json::json!({"jsonrpc": "2.0", "id": 9, "method": "tools/list"})
                    .to_string(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), 502);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["id"], 9, "{body}");
        assert_eq!(body["error"]["data"]["code"], "upstream", "{body}");
        assert!(!body.to_string().contains("crm.update"), "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("the tool server behind the gateway failed"),
            "{body}"
        );

        // A stream does not outlive its caller's credential: the
        // researcher's token revoked while a streamed call runs, the
        // gateway cuts the stream, and the tool's answer never reaches
        // the client. (The watch above, its token live, is the control.)
        let watcher = {
            let peer = r.peer().clone();
            tokio::spawn(async move {
                peer.call_tool(
                    CallToolRequestParams::new("docs.summarize").with_arguments(
                        serde_json::json!({"account": "acme"})
                            .as_object()
                            .cloned()
                            .unwrap(),
                    ),
                )
                .await
            })
        };
        let first = tokio::time::timeout(Duration::from_secs(60), progress.recv())
            .await
            .expect("no progress reached the client while the tool ran")
            .unwrap();
        assert_eq!(first, "watching");
        let jti = crate::delegation::claims(&researcher)["jti"]
            .as_str()
            .unwrap()
            .to_owned();
        g.w.ok(&["revoke", "credential", &jti, "--reason", "stream test"]);
        // Not released: only the cut can end the call.
        let cut = tokio::time::timeout(Duration::from_secs(90), watcher)
            .await
            .expect("the stream went on after its caller's token was revoked")
            .unwrap();
        assert!(
            cut.as_ref().map_or(true, |done| !serde_json::to_string(&done.content)
                .unwrap()
                .contains("ended")),
            "{cut:?}"
        );
        seen.release.notify_one();
    });

    // The calls and refusals are in the task's audit trace.
    let trace = wait_for("MCP calls in the trace", Duration::from_secs(30), || {
        let t = g.w.json(&["audit", "trace", &task, "--json"]).to_string();
        (t.contains("crm.search")
            && t.contains("docs.summarize")
            && t.contains("out_of_scope")
            && t.contains("policy_denied")
            && t.contains("unknown_tool")
            && t.contains("\"upstream_status\":200")
            // The call to the server that was down is the last one made; its
            // record may come in a later delivery than the others.
            && t.contains("dataset:crm:down-co"))
        .then_some(t)
    });
    assert!(trace.contains(RESEARCHER), "{trace}");
    assert!(trace.contains("\"latency_ms\""), "{trace}");
    // The call of a tool the gateway does not serve is recorded as refused,
    // under the name the caller gave.
    assert!(
        trace.contains("admin.shutdown")
            && trace.contains("unknown_tool: the gateway serves no tool"),
        "{trace}"
    );
    // The call to the server that was down: allowed, then failed, with no
    // output digest.
    let v: serde_json::Value = serde_json::from_str(&trace).unwrap();
    let mut down = Vec::new();
    collect_calls(&v, "dataset:crm:down-co", &mut down);
    assert_eq!(down.len(), 1, "{down:?}");
    assert!(
        down[0]["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("failed: the upstream down did not answer"),
        "{down:?}"
    );
    assert!(down[0].get("output_digest").is_none(), "{down:?}");
    let text = g.w.ok(&["audit", "trace", &task]);
    assert!(text.contains("upstream 200 in "), "{text}");
}

/// Every tool call of the trace on `resource`.
pub(crate) fn collect_calls(
    v: &serde_json::Value,
    resource: &str,
    out: &mut Vec<serde_json::Value>,
) {
    match v {
        serde_json::Value::Object(o) => {
            if o.get("type").and_then(|t| t.as_str()) == Some("tool_call")
                && o.get("resource").and_then(|r| r.as_str()) == Some(resource)
            {
                out.push(v.clone());
            }
            o.values().for_each(|c| collect_calls(c, resource, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|c| collect_calls(c, resource, out)),
        _ => {}
    }
}
