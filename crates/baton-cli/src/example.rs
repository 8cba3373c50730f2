//! The README's example, as `baton example ...` verbs: a CRM tool server
//! guarded by `baton-verify` (mTLS peer, delegation token, Cedar, audit
//! report), a client that calls it with a task credential, and a Redis
//! Stream hand-off for the asynchronous fan-out case.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use baton_core::{Permission, RiskTier};
use baton_tls::{ClientAuth, PeerCertificate, PeerPolicy};
use baton_verify::{JwtBundles, PeerCert, TokenVerifier, ToolGate, ToolSpec};
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
    verifier: TokenVerifier,
    gate: ToolGate,
    tools: Vec<ToolSpec>,
    reporter: baton_verify::Reporter,
}

/// The claims of a token that failed verification, read without trusting
/// them, so the refusal can be reported under the task it claims.
fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

impl ToolServer {
    fn handle(
        &self,
        name: &str,
        auth: Option<String>,
        cert: Option<PeerCertificate>,
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
        let delegation = match self.verifier.verify(token, &peer, now) {
            Ok(d) => d,
            Err(e) => {
                self.report_refused_token(token, &peer, name, body, now, &e);
                return json_reply(
                    StatusCode::UNAUTHORIZED,
                    &serde_json::json!({"error": e.to_string(), "code": e.code()}),
                );
            }
        };
        let Some(tool) = self.tools.iter().find(|t| t.name == name) else {
            return json_reply(
                StatusCode::NOT_FOUND,
                &serde_json::json!({"error": format!("no tool {name}")}),
            );
        };
        match self.gate.authorize(&delegation, tool, body, now) {
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

impl ToolServer {
    /// Reports a refused token under the task it claims (the broker checks
    /// the task exists); the reason says the claims were not trusted.
    fn report_refused_token(
        &self,
        token: &str,
        peer: &PeerCert,
        tool: &str,
        input: &[u8],
        now: u64,
        err: &baton_verify::TokenError,
    ) {
        let Some(claims) = unverified_claims(token) else {
            tracing::warn!(peer = %peer.spiffe_id(), reason = err.code(), "unparseable token refused");
            return;
        };
        let Ok(task_id) =
            serde_json::from_value::<baton_core::TaskId>(claims["task"]["id"].clone())
        else {
            return;
        };
        let spec = self.tools.iter().find(|t| t.name == tool);
        let report = baton_core::api::ToolCallReport {
            report_id: uuid::Uuid::new_v4().to_string(),
            task_id,
            token_jti: claims["jti"].as_str().unwrap_or_default().to_owned(),
            agent: peer.spiffe_id().clone(),
            tool: tool.to_owned(),
            resource: spec.map(|t| t.resource.clone()).unwrap_or_default(),
            risk: spec.map_or(RiskTier::Read, |t| t.tier),
            scope_used: Vec::new(),
            input_digest: hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, input)),
            output_digest: None,
            justification: None,
            decision: "deny".into(),
            policy_ids: Vec::new(),
            reason: Some(format!(
                "token refused ({}): {err}; claims not trusted",
                err.code()
            )),
            at: now,
        };
        if let Err(e) = self.reporter.submit(report) {
            tracing::error!(error = %e, "cannot spool the refusal report");
        }
    }
}

/// Where the tool server learns of revocations.
struct FeedConfig<'a> {
    redis: Option<&'a baton_revocation::RedisConfig>,
    stale_after: std::time::Duration,
    /// Read-only tools keep working while the feed is stale.
    read_allows_stale: bool,
    /// Follow no revocations at all (explicit opt-out).
    dangerously_skip_revocation: bool,
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
    // The tool server's own identity and trust come from the Workload API
    // like any workload's, and follow it: rotated SVIDs and bundle changes
    // (a prepared or revoked authority) apply without a restart.
    let live = crate::mesh::LiveTls::follow(socket, spiffe_id).await?;
    let td = live.trust_domain.clone();
    let bundles = live.bundles.clone();

    // The broker's JWT keys, fetched over TLS anchored in the X.509 bundle.
    let broker_id = td.id("/baton/broker").map_err(|e| anyhow::anyhow!("{e}"))?;
    let tls = baton_tls::client_config(
        live.client.clone(),
        bundles.clone(),
        PeerPolicy::Exact(vec![broker_id.clone()]),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let bundle_json: serde_json::Value = http
        .get(format!("{}/v1/bundle", broker_url.trim_end_matches('/')))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| {
            exit(
                EXIT_UNREACHABLE,
                format!("cannot fetch the broker's bundle: {e}"),
            )
        })?
        .json()
        .await
        .context("bundle JSON")?;
    let trust = baton_ca::TrustBundle::from_spiffe_json(&td, &bundle_json)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let jwt_bundles = JwtBundles::new([trust]);
    // JWT key rotations reach the verifier through the Workload API.
    crate::mesh::follow_jwt_bundles(socket, td.clone(), jwt_bundles.clone());
    // Revocations arrive on a feed and are checked in memory: Redis's when
    // configured, else the broker's own (`GET /v1/revocations/feed`).
    // Staleness is judged per call by the gate (sensitive tiers always fail
    // closed), so the token check itself only looks at actual revocations.
    let (verifier, freshness, serials): Following = match (
        feed.redis,
        feed.dangerously_skip_revocation,
    ) {
        (Some(redis), _) => {
            let handle = baton_revocation::RevocationFeed::spawn_with(
                redis,
                baton_revocation::FeedOptions {
                    stale_after: feed.stale_after,
                    allow_stale: true,
                    ..baton_revocation::FeedOptions::default()
                },
            )
            .map_err(|e| exit(EXIT_REFUSED, e.to_string()))?;
            if let Some(ops) = &ops {
                let h = handle.clone();
                verifier_ops(ops, move |now| {
                    let since = match h.status(now) {
                        baton_revocation::FeedStatus::Fresh => None,
                        baton_revocation::FeedStatus::Stale { since } => Some(since),
                    };
                    FeedProbe {
                        fresh: since.is_none(),
                        silent_for: since.filter(|s| *s > 0).map(|s| now.saturating_sub(s)),
                        revoked_ids: h.len(),
                    }
                });
            }
            (
                TokenVerifier::new(jwt_bundles, audience.to_owned(), Arc::new(handle.clone())),
                Some(Arc::new(handle.clone())),
                Some(Arc::new(handle)),
            )
        }
        (None, false) => {
            let handle = baton_verify::BrokerFeed::spawn(
                broker_url,
                live.client.clone(),
                bundles.clone(),
                broker_id.clone(),
                feed.stale_after,
            )
            .map_err(|e| exit(EXIT_REFUSED, format!("revocation feed: {e}")))?;
            if !handle.wait_fresh(std::time::Duration::from_secs(10)).await {
                tracing::warn!(
                    "the broker's revocation feed has not answered yet; calls are denied until it does"
                );
            }
            if let Some(ops) = &ops {
                let h = handle.clone();
                verifier_ops(ops, move |now| FeedProbe {
                    fresh: h.is_fresh_at(now),
                    silent_for: h.last_answer().map(|t| now.saturating_sub(t)),
                    revoked_ids: h.len(),
                });
            }
            // The token check answers from the set alone; staleness is the
            // gate's call (per tier).
            let tokens = Arc::new(StaleTolerant(handle.clone()));
            (
                TokenVerifier::new(jwt_bundles, audience.to_owned(), tokens),
                Some(Arc::new(handle.clone())),
                Some(Arc::new(handle)),
            )
        }
        (None, true) => {
            tracing::warn!(
                "--dangerously-skip-revocation: this tool server accepts revoked credentials until they expire"
            );
            (
                TokenVerifier::dangerous_without_revocation(jwt_bundles, audience.to_owned()),
                None,
                None,
            )
        }
    };

    // Swapped whole on SIGHUP when the policies come from a directory; a
    // directory that no longer loads leaves the policies in force.
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
    let sender =
        baton_verify::HttpSender::new(broker_url, live.client.clone(), bundles.clone(), broker_id)
            .map_err(|e| anyhow::anyhow!("tool-call reporter: {e}"))?;
    let reporter = baton_verify::Reporter::open(spool, Arc::new(sender))
        .map_err(|e| anyhow::anyhow!("tool-call reporter: {e}"))?;
    let delivery = reporter.spawn();
    let policy = move |c: &baton_verify::CallContext<'_>| {
        let d = engine.load().authorize_call(&baton_policy::CallRequest {
            agent: c.agent,
            chain: c.chain,
            initiator: c.initiator,
            tool: c.tool,
            resource: c.resource,
            purpose: c.purpose,
            scope: c.scope,
            risk: c.risk,
            depth: c.depth,
        });
        baton_verify::PolicyDecision {
            allowed: d.allowed,
            policy_ids: d.policy_ids,
            errors: d.errors,
        }
    };
    let mut gate = ToolGate::new(Arc::new(policy), Some(reporter.clone()));
    if let Some(f) = freshness {
        gate = gate.with_revocation_freshness(f, feed.read_allows_stale);
    }
    if let Some(check) = serials {
        gate = gate.with_revocation(check);
    }
    let server = Arc::new(ToolServer {
        verifier,
        gate,
        tools: tools()?,
        reporter: reporter.clone(),
    });

    let identity = live.server.clone();
    let config = baton_tls::server_config(
        identity,
        bundles,
        PeerPolicy::AnyInTrustDomains(vec![td]),
        ClientAuth::Required,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let routes = warp::path!("tools" / String)
        .and(warp::post())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::ext::optional::<PeerCertificate>())
        .and(warp::body::content_length_limit(1 << 20))
        .and(warp::body::bytes())
        .and(warp::any().map(move || server.clone()))
        .map(
            |name: String,
             auth: Option<String>,
             cert: Option<PeerCertificate>,
             body: Bytes,
             server: Arc<ToolServer>| { server.handle(&name, auth, cert, &body) },
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
    delivery.abort();
    match tokio::time::timeout(shutdown_grace, reporter.flush()).await {
        Ok(Ok(_)) if reporter.pending() == 0 => {
            tracing::info!("tool-call reports delivered");
        }
        Ok(Ok(_)) | Err(_) => tracing::warn!(
            pending = reporter.pending(),
            "tool-call reports left in the spool; they are delivered at the next start"
        ),
        Ok(Err(e)) => tracing::warn!(
            error = %e,
            pending = reporter.pending(),
            "tool-call reports left in the spool; they are delivered at the next start"
        ),
    }
    live.shutdown().await;
    tracing::info!("example tool server stopped");
    Ok(())
}

/// An error with its causes (reqwest hides the TLS reason in its sources).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

/// Calls `tool` at `url` with the credential; returns the JSON answer.
pub async fn call(
    cred: &Credential,
    url: &str,
    tool: &str,
    input: &str,
) -> Result<serde_json::Value> {
    let td = cred.spiffe_id()?.trust_domain().clone();
    let http = cred.client(PeerPolicy::AnyInTrustDomains(vec![td]))?;
    let resp = http
        .post(format!("{}/tools/{tool}", url.trim_end_matches('/')))
        .header("authorization", format!("Bearer {}", cred.token.expose()))
        .body(input.to_owned())
        .send()
        .await
        .map_err(|e| {
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
                "{tool} refused ({}): {}",
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
            justification: _,
        } => {
            let cred = Credential::load(&credential)?;
            let out = call(&cred, &url, &tool, &input).await?;
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

/// The token verifier, the freshness the gate judges per tier, and the
/// check of peer certificate serials.
type Following = (
    TokenVerifier,
    Option<Arc<dyn baton_verify::RevocationFreshness>>,
    Option<Arc<dyn baton_verify::RevocationCheck>>,
);

/// What the ops listener reads of a verifier's revocation feed.
struct FeedProbe {
    fresh: bool,
    /// Seconds since the feed last heard from its source, if it did.
    silent_for: Option<u64>,
    revoked_ids: usize,
}

/// The tool server's ops role: readiness is a fresh revocation feed (a
/// stale one refuses sensitive calls), and the feed's gauges.
fn verifier_ops(ops: &baton_ops::Ops, probe: impl Fn(u64) -> FeedProbe + Send + Sync + 'static) {
    let probe = Arc::new(probe);
    ops.add_role(baton_ops::Role::Verifier);
    let check = probe.clone();
    ops.add_check("revocation_feed", move || {
        let p = check(baton_revocation::system_now());
        async move {
            if p.fresh {
                Ok(())
            } else {
                Err(match p.silent_for {
                    Some(s) => format!(
                        "the revocation feed is stale (no news for {s} s): sensitive calls are refused"
                    ),
                    None => "the revocation feed has not been heard from yet: sensitive calls are refused"
                        .to_owned(),
                })
            }
        }
    });
    ops.on_scrape(move || {
        let p = probe(baton_revocation::system_now());
        baton_ops::metrics().verifier_feed(p.fresh, p.silent_for, p.revoked_ids);
    });
}

/// The broker feed's set, without its staleness: the gate decides per tier
/// what a stale feed means, and the token check looks only at revocations.
struct StaleTolerant(baton_verify::BrokerFeed);

impl baton_verify::RevocationCheck for StaleTolerant {
    fn is_revoked(&self, id: &str, _task: &baton_core::TaskId) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.0.contains(id, now)
    }
}
