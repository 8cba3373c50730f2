//! The README's example, as `baton example ...` verbs: a CRM tool server
//! guarded by `baton-verify` (mTLS peer, delegation token, Cedar, audit
//! report), a client that calls it with a task credential, and a Redis
//! Stream hand-off for the asynchronous fan-out case.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use baton_core::{Permission, RiskTier};
use baton_gateway::GatewayError;
use baton_gateway::enforce::{Enforcer, EnforcerOptions, FeedConfig, RefusedToken};
use baton_tls::{PeerCertificate, PeerPolicy};
use baton_verify::{PeerCert, ToolSpec};
use bytes::Bytes;
use warp::Filter;
use warp::http::StatusCode;
use warp::reply::Response;

use crate::cli::{EXIT_REFUSED, EXIT_UNREACHABLE, ExampleCmd, exit};
use crate::creds::{Credential, redeem};
use crate::output;

/// Loads policies from a directory, or the embedded example set.
pub fn load_policies(dir: Option<&Path>) -> Result<baton_policy::Engine> {
    match dir {
        Some(d) => baton_policy::Engine::load_dir(d).map_err(|e| exit(EXIT_REFUSED, e.to_string())),
        None => {
            let schema = baton_broker::EXAMPLE_POLICIES
                .iter()
                .find(|(n, _)| n.ends_with(".cedarschema"))
                .map(|(_, s)| (*s).to_owned())
                .unwrap_or_default();
            let policies: Vec<(String, String)> = baton_broker::EXAMPLE_POLICIES
                .iter()
                .filter(|(n, _)| n.ends_with(".cedar"))
                .map(|(n, s)| ((*n).to_owned(), (*s).to_owned()))
                .collect();
            baton_policy::Engine::from_sources(&schema, &policies)
                .map_err(|e| exit(EXIT_REFUSED, e.to_string()))
        }
    }
}

/// The example tools: a CRM with search (read), update (write) and export.
fn tools() -> Result<Vec<ToolSpec>> {
    let p = |s: &str| Permission::parse(s).map_err(|e| anyhow::anyhow!("{e}"));
    Ok(vec![
        ToolSpec {
            name: "crm.search".into(),
            tier: RiskTier::Read,
            resource: "dataset:crm".into(),
            requires: p("tool:crm.search:read")?,
        },
        ToolSpec {
            name: "crm.update".into(),
            tier: RiskTier::Write,
            resource: "dataset:crm".into(),
            requires: p("tool:crm.update:write")?,
        },
        ToolSpec {
            name: "crm.export".into(),
            tier: RiskTier::Export,
            resource: "dataset:customer-pii".into(),
            requires: p("tool:crm.export:export")?,
        },
    ])
}

/// What the fake CRM answers.
fn run_tool(name: &str, input: &[u8]) -> serde_json::Value {
    let input: serde_json::Value = serde_json::from_slice(input).unwrap_or_default();
    match name {
        "crm.search" => serde_json::json!({
            "results": [
                {"account": "Acme Corp", "open_cases": 2},
                {"account": "Globex", "open_cases": 0},
            ],
            "query": input.get("q"),
        }),
        "crm.update" => serde_json::json!({ "updated": input.get("case") }),
        _ => serde_json::json!({ "exported": 0 }),
    }
}

fn json_reply(status: StatusCode, v: &serde_json::Value) -> Response {
    warp::reply::with_status(warp::reply::json(v), status).into_response()
}

use warp::Reply;

struct ToolServer {
    enforcer: Enforcer,
    tools: Vec<ToolSpec>,
}

impl ToolServer {
    fn handle(
        &self,
        name: &str,
        auth: Option<String>,
        cert: Option<PeerCertificate>,
        traceparent: Option<String>,
        body: &Bytes,
    ) -> Response {
        let now = baton_broker::oidc::unix_now();
        let Some(PeerCertificate(leaf)) = cert else {
            return json_reply(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": "mTLS client certificate required"}),
            );
        };
        let peer = match PeerCert::from_verified_leaf(leaf) {
            Ok(p) => p,
            Err(e) => {
                return json_reply(
                    StatusCode::UNAUTHORIZED,
                    &serde_json::json!({"error": e.to_string()}),
                );
            }
        };
        let Some(token) = auth.as_deref().and_then(|a| a.strip_prefix("Bearer ")) else {
            return json_reply(
                StatusCode::UNAUTHORIZED,
                &serde_json::json!({"error": "delegation token required (Authorization: Bearer ...)"}),
            );
        };
        // The caller's trace context, when valid (else ignored, as W3C asks).
        let traceparent: Option<baton_core::trace_context::TraceParent> =
            traceparent.and_then(|tp| tp.parse().ok());
        let delegation = match self.enforcer.verifier.verify(token, &peer, now) {
            Ok(d) => d,
            Err(e) => {
                let spec = self.tools.iter().find(|t| t.name == name);
                self.enforcer.report_refused_token(RefusedToken {
                    token,
                    peer: &peer,
                    tool: name,
                    resource: spec.map_or("", |t| t.resource.as_str()),
                    risk: spec.map_or(RiskTier::Read, |t| t.tier),
                    input: Some(body),
                    now,
                    err: &e,
                    traceparent,
                });
                return json_reply(
                    StatusCode::UNAUTHORIZED,
                    &serde_json::json!({"error": e.to_string(), "code": e.code()}),
                );
            }
        };
        let Some(tool) = self.tools.iter().find(|t| t.name == name) else {
            self.enforcer.gate.record_unserved(
                &delegation,
                name,
                body,
                now,
                "unknown_tool",
                "the tool server serves no tool of that name",
            );
            return json_reply(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": format!("no tool {name}")}),
            );
        };
        let notes = baton_verify::CallNotes {
            traceparent,
            ..Default::default()
        };
        match self
            .enforcer
            .gate
            .authorize_approved(&delegation, tool, body, now, notes)
        {
            Ok(call) => {
                let output = run_tool(name, body);
                let bytes = serde_json::to_vec(&output).unwrap_or_default();
                // No record, no answer: the call's report must be spooled.
                match call.finish(&bytes) {
                    Ok(_) => json_reply(StatusCode::OK, &output),
                    Err(e) => json_reply(
                        StatusCode::SERVICE_UNAVAILABLE,
                        &serde_json::json!({"error": format!("cannot record the call: {e}")}),
                    ),
                }
            }
            Err(denied) => json_reply(
                StatusCode::FORBIDDEN,
                &serde_json::json!({"error": denied.to_string(), "code": denied.code()}),
            ),
        }
    }
}

/// A library error of an enforcing server, with the CLI's exit code.
pub fn enforcer_exit(e: GatewayError) -> anyhow::Error {
    match e {
        GatewayError::Unreachable(m) => exit(EXIT_UNREACHABLE, m),
        GatewayError::Config(_) | GatewayError::Refused(_) => exit(EXIT_REFUSED, e.to_string()),
        GatewayError::Io { .. } => anyhow::Error::new(e),
    }
}

/// Cedar policies that a SIGHUP may swap whole.
struct ReloadablePolicy(Arc<arc_swap::ArcSwap<baton_policy::Engine>>);

impl baton_verify::CallPolicy for ReloadablePolicy {
    fn decide(&self, c: &baton_verify::CallContext<'_>) -> baton_verify::PolicyDecision {
        baton_verify::CallPolicy::decide(&**self.0.load(), c)
    }

    fn may_require_approval(&self, tool: &str) -> bool {
        self.0.load().may_require_approval(tool)
    }
}

/// The call policy (Cedar), from a directory or the embedded example set;
/// swapped whole on SIGHUP when it comes from a directory (one that no
/// longer loads leaves the policies in force). Returns the policy and the
/// SIGHUP handler's task.
pub fn reloadable_policy(
    policies: Option<&Path>,
) -> Result<(
    Arc<dyn baton_verify::CallPolicy>,
    tokio::task::JoinHandle<()>,
)> {
    let engine = Arc::new(arc_swap::ArcSwap::from_pointee(load_policies(policies)?));
    let hup = {
        let engine = engine.clone();
        let dir = policies.map(Path::to_owned);
        crate::daemons::on_hangup(move || match &dir {
            Some(dir) => match baton_policy::Engine::load_dir(dir) {
                Ok(new) => {
                    engine.store(Arc::new(new));
                    tracing::info!("SIGHUP: reloaded tool policies from {}", dir.display());
                }
                Err(e) => tracing::error!(
                    "SIGHUP: cannot reload tool policies from {} (the previous ones stay in force): {e}",
                    dir.display()
                ),
            },
            None => tracing::info!("SIGHUP: nothing to reload (the tool policies are built in)"),
        })?
    };
    Ok((Arc::new(ReloadablePolicy(engine)), hup))
}

#[allow(clippy::too_many_arguments)]
async fn tool_server(
    socket: &str,
    spiffe_id: Option<&str>,
    listen: std::net::SocketAddr,
    broker_url: &str,
    audience: &str,
    policies: Option<&Path>,
    spool: &Path,
    ready_file: Option<&Path>,
    feed: FeedConfig<'_>,
    shutdown_grace: std::time::Duration,
    ops: Option<baton_ops::Ops>,
) -> Result<()> {
    let stop = crate::daemons::terminate_signal();
    let (policy, hup) = reloadable_policy(policies)?;
    let endpoint = format!("unix:{}", crate::creds::trusted_socket(socket)?.display());
    let enforcer = Enforcer::start(EnforcerOptions {
        endpoint: &endpoint,
        spiffe_id,
        broker_url,
        audience,
        spool,
        durable_reads: true,
        feed,
        policy: &policy,
        ops: ops.as_ref(),
        digest_key: None,
    })
    .await
    .map_err(enforcer_exit)?;
    let config = enforcer.server_config().map_err(enforcer_exit)?;
    let server = Arc::new(ToolServer {
        enforcer,
        tools: tools()?,
    });
    let state = server.clone();
    let routes = warp::path!("tools" / String)
        .and(warp::post())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::ext::optional::<PeerCertificate>())
        .and(warp::header::optional::<String>("traceparent"))
        .and(warp::body::content_length_limit(1 << 20))
        .and(warp::body::bytes())
        .and(warp::any().map(move || state.clone()))
        .and_then(
            |name: String,
             auth: Option<String>,
             cert: Option<PeerCertificate>,
             traceparent: Option<String>,
             body: Bytes,
             server: Arc<ToolServer>| async move {
                // A call waits for its record to be spooled (fsync) and
                // may wait for a held approval: off the async workers, so
                // that a few slow calls do not stall the TLS handshakes,
                // the report delivery and the revocation feed's follower.
                let answer = tokio::task::spawn_blocking(move || {
                    server.handle(&name, auth, cert, traceparent, &body)
                })
                .await
                .unwrap_or_else(|e| {
                    json_reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        &serde_json::json!({"error": format!("the call failed: {e}")}),
                    )
                });
                Ok::<_, Infallible>(answer)
            },
        )
        .recover(|_r: warp::Rejection| async move {
            Ok::<_, Infallible>(json_reply(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": "no such route"}),
            ))
        })
        .unify();
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "example tool server listening");
    if let Some(ops) = &ops {
        ops.set_started();
    }
    if let Some(path) = ready_file {
        std::fs::write(path.with_extension("tmp"), addr.to_string())?;
        std::fs::rename(path.with_extension("tmp"), path)?;
    }
    output::line(&format!("example tool server on https://{addr}"));
    let limits = baton_tls::ServeLimits {
        shutdown_grace,
        ..baton_tls::ServeLimits::default()
    };
    baton_tls::serve_https_with(listener, config, routes, limits, stop)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    // Calls in flight are done: deliver what they spooled, within the
    // grace period; what is left stays in the spool for the next start.
    hup.abort();
    match Arc::try_unwrap(server) {
        Ok(server) => server.enforcer.finish(shutdown_grace).await,
        Err(_) => tracing::warn!("calls still hold the tool server; reports stay in the spool"),
    }
    tracing::info!("example tool server stopped");
    Ok(())
}

pub use baton_gateway::error_chain;

/// Calls `tool` at `url` with the credential; returns the JSON answer.
pub async fn call(
    cred: &Credential,
    url: &str,
    tool: &str,
    input: &str,
) -> Result<serde_json::Value> {
    request(cred, "POST", url, &format!("/tools/{tool}"), input).await
}

/// One HTTP request with the credential (mTLS + its token); the answer's
/// JSON, or a refusal with the server's code and reason.
async fn request(
    cred: &Credential,
    method: &str,
    url: &str,
    path: &str,
    input: &str,
) -> Result<serde_json::Value> {
    let method = http::Method::from_bytes(method.as_bytes()).map_err(|_| {
        exit(
            EXIT_REFUSED,
            format!("--method {method:?} is not an HTTP method"),
        )
    })?;
    let td = cred.spiffe_id()?.trust_domain().clone();
    let http = cred.client(PeerPolicy::AnyInTrustDomains(vec![td]))?;
    let mut req = http
        .request(
            method.clone(),
            format!("{}{path}", url.trim_end_matches('/')),
        )
        .header("authorization", format!("Bearer {}", cred.token.expose()));
    // The caller's trace (TRACEPARENT), as every other request sends it:
    // the tool's record of this call continues it.
    if let Some(tp) = crate::telemetry::outgoing_traceparent() {
        req = req.header(baton_core::trace_context::TRACEPARENT_HEADER, tp);
    }
    if method != http::Method::GET {
        req = req
            .header("content-type", "application/json")
            .body(input.to_owned());
    }
    let resp = req.send().await.map_err(|e| {
        exit(
            EXIT_UNREACHABLE,
            format!("cannot reach the tool server: {}", error_chain(&e)),
        )
    })?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.unwrap_or_default();
    if status.is_success() {
        Ok(body)
    } else {
        Err(exit(
            EXIT_REFUSED,
            format!(
                "{method} {path} refused ({}): {}",
                body["code"].as_str().unwrap_or(status.as_str()),
                body["error"].as_str().unwrap_or("no reason given")
            ),
        ))
    }
}

pub async fn run(cmd: ExampleCmd) -> Result<()> {
    match cmd {
        ExampleCmd::ToolServer {
            socket,
            listen,
            broker_url,
            audience,
            spiffe_id,
            policies,
            spool,
            ready_file,
            redis,
            stale_after,
            dangerously_skip_revocation,
            shutdown,
            ops,
        } => {
            let redis = redis.config()?;
            tool_server(
                &socket.socket,
                spiffe_id.as_deref(),
                listen,
                &broker_url,
                &audience,
                policies.as_deref(),
                &spool,
                ready_file.as_deref(),
                FeedConfig {
                    redis: redis.as_ref(),
                    stale_after,
                    read_allows_stale: false,
                    dangerously_skip_revocation,
                },
                shutdown.shutdown_timeout,
                crate::ops::start(&ops).await?,
            )
            .await
        }
        ExampleCmd::Call {
            credential,
            url,
            tool,
            input,
            path,
            method,
            mcp,
            justification: _,
        } => {
            let cred = Credential::load(&credential)?;
            let out = match (path, tool) {
                (Some(path), _) => request(&cred, &method, &url, &path, &input).await?,
                (None, Some(tool)) if mcp => {
                    crate::mcp_client::call(&cred, &url, &tool, &input).await?
                }
                (None, Some(tool)) => call(&cred, &url, &tool, &input).await?,
                (None, None) => return Err(exit(EXIT_REFUSED, "pass --tool or --path")),
            };
            output::json(&out);
            Ok(())
        }
        ExampleCmd::Enqueue {
            redis,
            stream,
            grant,
            grant_file,
            tool,
        } => {
            let grant =
                crate::creds::secret_input(grant.as_deref(), grant_file.as_deref(), "grant")?
                    .ok_or_else(|| {
                        exit(
                            EXIT_REFUSED,
                            "pass --grant-file FILE, --grant - (standard input) or BATON_GRANT",
                        )
                    })?;
            let client = redis::Client::open(redis.as_str()).context("--redis URL")?;
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| exit(EXIT_UNREACHABLE, format!("cannot reach Redis: {e}")))?;
            let id: String = redis::cmd("XADD")
                .arg(&stream)
                .arg("*")
                .arg("grant")
                .arg(grant.expose())
                .arg("tool")
                .arg(&tool)
                .query_async(&mut conn)
                .await
                .context("XADD")?;
            output::line(&id);
            Ok(())
        }
        ExampleCmd::Worker {
            redis,
            stream,
            socket,
            spiffe_id,
            url,
            out,
            wait,
        } => {
            let client = redis::Client::open(redis.as_str()).context("--redis URL")?;
            let mut conn = client
                .get_multiplexed_async_connection()
                .await
                .map_err(|e| exit(EXIT_UNREACHABLE, format!("cannot reach Redis: {e}")))?;
            let reply: redis::Value = redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1)
                .arg("BLOCK")
                .arg(wait.as_millis() as u64)
                .arg("STREAMS")
                .arg(&stream)
                .arg("0")
                .query_async(&mut conn)
                .await
                .context("XREAD")?;
            let (msg_id, fields) = first_entry(&reply).ok_or_else(|| {
                exit(
                    EXIT_REFUSED,
                    format!("no work on stream {stream} within {wait:?}"),
                )
            })?;
            let grant = fields
                .iter()
                .find(|(k, _)| k == "grant")
                .map(|(_, v)| v.clone())
                .ok_or_else(|| exit(EXIT_REFUSED, "stream entry has no grant"))?;
            let tool = fields
                .iter()
                .find(|(k, _)| k == "tool")
                .map(|(_, v)| v.clone())
                .unwrap_or_else(|| "crm.search".into());
            let _: i64 = redis::cmd("XDEL")
                .arg(&stream)
                .arg(&msg_id)
                .query_async(&mut conn)
                .await
                .context("XDEL")?;
            let cred = redeem(&socket.socket, &grant, spiffe_id.as_deref(), &out).await?;
            let result = call(&cred, &url, &tool, r#"{"q":"from the queue"}"#).await?;
            output::json(&serde_json::json!({
                "task_id": cred.task["task_id"],
                "spiffe_id": cred.task["spiffe_id"],
                "tool": tool,
                "result": result,
            }));
            Ok(())
        }
        ExampleCmd::EchoServer {
            socket,
            spiffe_id,
            listen,
            ready_file,
        } => {
            crate::mesh::echo_server(
                &socket.socket,
                spiffe_id.as_deref(),
                listen,
                ready_file.as_deref(),
            )
            .await
        }
        ExampleCmd::EchoClient {
            socket,
            spiffe_id,
            server,
            server_id,
            interval,
            stats_file,
        } => {
            crate::mesh::echo_client(
                &socket.socket,
                spiffe_id.as_deref(),
                &server,
                &server_id,
                interval,
                stats_file,
            )
            .await
        }
    }
}

/// The first entry of an XREAD reply: its id and field/value pairs.
fn first_entry(v: &redis::Value) -> Option<(String, Vec<(String, String)>)> {
    use redis::Value;
    let s = |v: &Value| match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    // [[stream, [[id, [k, v, ...]]]]] (RESP2) or a map (RESP3).
    let streams = match v {
        Value::Array(a) => a.clone(),
        Value::Map(m) => m
            .iter()
            .map(|(k, v)| Value::Array(vec![k.clone(), v.clone()]))
            .collect(),
        _ => return None,
    };
    let Value::Array(stream) = streams.first()? else {
        return None;
    };
    let Value::Array(entries) = stream.get(1)? else {
        return None;
    };
    let Value::Array(entry) = entries.first()? else {
        return None;
    };
    let id = s(entry.first()?)?;
    let Value::Array(kv) = entry.get(1)? else {
        return None;
    };
    let pairs = kv
        .chunks(2)
        .filter_map(|c| Some((s(c.first()?)?, s(c.get(1)?)?)))
        .collect();
    Some((id, pairs))
}
