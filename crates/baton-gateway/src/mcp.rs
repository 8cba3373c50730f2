//! MCP over Streamable HTTP: the gateway reads each JSON-RPC message on an
//! [`McpEndpoint`] and decides it before anything reaches the upstream.
//!
//! - `tools/call`: the tool must be one the endpoint lists; its resource is
//!   filled from the call's arguments; the [`ToolGate`](baton_verify::ToolGate)
//!   decides (revocation feed, scope, risk ceiling, Cedar) and records the
//!   call. A refusal the caller can fix with another token is HTTP
//!   (`401 invalid_token`, `403 insufficient_scope` with the scope needed,
//!   RFC 6750); a refusal of this call is a JSON-RPC error the client shows.
//! - `tools/list`: the upstream's answer, with only the tools this caller
//!   may call.
//! - the handshake, `ping` and notifications pass; any other method is
//!   refused unless the endpoint's `allow-methods` lists it (a resource or
//!   prompt read is not a tool call the gateway can check).
//! - answers stream back as they come (SSE is never buffered), and the
//!   call is recorded with the SHA-256 of what was streamed.
//! - a session (`Mcp-Session-Id`) belongs to the task and agent that
//!   opened it; another caller naming it is answered 404, as for a session
//!   that does not exist.
//! - `Mcp-Method` and `Mcp-Name` headers (SEP-2243), which intermediaries
//!   may route on, must agree with the body.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine as _;
use baton_core::{SpiffeId, TaskId};
use baton_verify::{CallDenied, ToolSpec, VerifiedCall, VerifiedDelegation};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, StatusCode};
use serde_json::{Map, Value, json};

use crate::record::fold;
use warp::Reply as _;
use warp::reply::Response;

use crate::approval::Held;
use crate::config::{MCP_BASE_METHODS, McpEndpoint, McpTool};
use crate::gateway::{Gateway, Incoming, Routing, quoted, strip_hop_by_hop};
use crate::record::Recording;

/// `Mcp-Session-Id`.
const SESSION: &str = "mcp-session-id";
/// How many sessions the gateway remembers; the oldest go first.
const MAX_SESSIONS: usize = 100_000;
/// A session unused this long is forgotten (its owner re-initializes).
const SESSION_IDLE: Duration = Duration::from_secs(24 * 3600);

/// JSON-RPC error codes (the reserved range, and one for Baton's refusals).
const PARSE_ERROR: i64 = -32700;
const INVALID_REQUEST: i64 = -32600;
const METHOD_NOT_FOUND: i64 = -32601;
const INVALID_PARAMS: i64 = -32602;
/// A call refused by Baton (policy, risk ceiling, stale feed, no audit).
pub const REFUSED: i64 = -32001;
/// The tool server behind the gateway did not answer, or broke off.
const UPSTREAM_FAILED: i64 = -32002;
/// The call waits for a human's approval (`baton approve`).
pub const APPROVAL_PENDING: i64 = -32003;

/// One MCP request being decided: the routing it started with, its
/// endpoint, the request and its verified caller.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    rt: &'a Routing,
    ep: &'a McpEndpoint,
    req: &'a Incoming,
    d: &'a VerifiedDelegation,
    now: u64,
}

/// Which task and agent opened each MCP session.
#[derive(Default)]
pub(crate) struct Sessions {
    owners: Mutex<HashMap<String, (TaskId, SpiffeId, Instant)>>,
}

impl Sessions {
    /// Whether `d`'s holder may use session `id`; a session not seen yet
    /// (opened before a restart) is unknown, as it is to the client.
    fn owned_by(&self, id: &str, d: &VerifiedDelegation) -> bool {
        let Ok(mut owners) = self.owners.lock() else {
            return false;
        };
        match owners.get_mut(id) {
            Some((task, agent, used)) if task == d.task_id() && agent == d.agent() => {
                *used = Instant::now();
                true
            }
            _ => false,
        }
    }

    /// Binds a session the upstream just opened to the caller it opened it
    /// for. A session already bound keeps its owner.
    fn bind(&self, id: &str, d: &VerifiedDelegation) {
        let Ok(mut owners) = self.owners.lock() else {
            return;
        };
        if owners.contains_key(id) {
            return;
        }
        if owners.len() >= MAX_SESSIONS {
            let now = Instant::now();
            owners.retain(|_, (_, _, used)| now.duration_since(*used) < SESSION_IDLE);
            if owners.len() >= MAX_SESSIONS
                && let Some(oldest) = owners
                    .iter()
                    .min_by_key(|(_, (_, _, used))| *used)
                    .map(|(k, _)| k.clone())
            {
                owners.remove(&oldest);
            }
        }
        owners.insert(
            id.to_owned(),
            (d.task_id().clone(), d.agent().clone(), Instant::now()),
        );
    }

    fn end(&self, id: &str) {
        if let Ok(mut owners) = self.owners.lock() {
            owners.remove(id);
        }
    }
}

/// A JSON-RPC error answer with HTTP `status`.
fn rpc_error(
    status: StatusCode,
    id: Option<&Value>,
    code: i64,
    message: &str,
    data: Value,
) -> Response {
    let mut error = json!({"code": code, "message": message});
    if !data.is_null()
        && let Some(e) = error.as_object_mut()
    {
        e.insert("data".into(), data);
    }
    warp::reply::with_status(
        warp::reply::json(&json!({
            "jsonrpc": "2.0",
            "id": id.cloned().unwrap_or(Value::Null),
            "error": error,
        })),
        status,
    )
    .into_response()
}

fn with_challenge(mut resp: Response, challenge: &str) -> Response {
    if let Ok(v) = HeaderValue::from_str(challenge) {
        resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// A malformed request: HTTP 400 with a JSON-RPC error.
fn invalid_request(id: Option<&Value>, message: &str) -> Response {
    rpc_error(
        StatusCode::BAD_REQUEST,
        id,
        INVALID_REQUEST,
        message,
        Value::Null,
    )
}

/// A held `tools/call`, as the MCP client shows it: a JSON-RPC error that
/// says the call waits for a human (its approval id and the command), or
/// that a human refused it.
fn held_error(id: Option<&Value>, tool: &str, held: &Held) -> Response {
    match held {
        Held::Denied(d) => call_denial(id, tool, d),
        Held::Waiting(a) => rpc_error(
            StatusCode::OK,
            id,
            APPROVAL_PENDING,
            &format!("{tool}: {}", crate::approval::waiting_message(a)),
            json!({
                "code": "approval_pending",
                "approval_id": a.id,
                "expires_at": a.expires_at,
                "approve_with": format!("baton approve {}", a.id),
            }),
        ),
        Held::Refused(a) => rpc_error(
            StatusCode::OK,
            id,
            REFUSED,
            &format!("{tool}: {}", crate::approval::refused_message(a)),
            json!({"code": "approval_denied", "approval_id": a.id}),
        ),
        // Transport level, as any other refused token.
        Held::TokenRefused { code, message } => crate::gateway::invalid_token(code, message),
        Held::Busy { retry_after, why } => {
            let mut resp = rpc_error(
                StatusCode::TOO_MANY_REQUESTS,
                id,
                REFUSED,
                &format!("{tool}: {why}"),
                json!({"code": "approval_rate_limited", "retry_after": retry_after}),
            );
            resp.headers_mut().insert(
                http::header::RETRY_AFTER,
                http::HeaderValue::from(*retry_after),
            );
            resp
        }
        Held::Unavailable(why) => {
            tracing::warn!(error = %why, "approval unavailable; call refused");
            rpc_error(
                StatusCode::SERVICE_UNAVAILABLE,
                id,
                REFUSED,
                &format!(
                    "{tool} needs a human's approval and approvals cannot be asked for now (the gateway's log says why)"
                ),
                json!({"code": "approval_unavailable"}),
            )
        }
    }
}

/// A gate refusal of a `tools/call`.
fn call_denial(id: Option<&Value>, tool: &str, denied: &CallDenied) -> Response {
    let message = format!("Baton refused the call to {tool}: {denied}");
    let mut data = json!({"code": denied.code()});
    match denied {
        CallDenied::Expired { .. } | CallDenied::PeerRevoked { .. } => with_challenge(
            rpc_error(StatusCode::UNAUTHORIZED, id, REFUSED, &message, data),
            &format!(
                "Bearer error=\"invalid_token\", error_description=\"{}\"",
                quoted(&denied.to_string())
            ),
        ),
        CallDenied::OutOfScope { required } => {
            data["required_scope"] = json!(required.to_string());
            with_challenge(
                rpc_error(StatusCode::FORBIDDEN, id, REFUSED, &message, data),
                &format!(
                    "Bearer error=\"insufficient_scope\", scope=\"{}\"",
                    quoted(&required.to_string())
                ),
            )
        }
        CallDenied::PolicyDenied { policy_ids } => {
            data["policies"] = json!(policy_ids);
            rpc_error(StatusCode::OK, id, REFUSED, &message, data)
        }
        CallDenied::OverCeiling { .. } | CallDenied::ApprovalRequired { .. } => {
            rpc_error(StatusCode::OK, id, REFUSED, &message, data)
        }
        CallDenied::RevocationStale { .. }
        | CallDenied::PolicyError { .. }
        | CallDenied::AuditUnavailable(_) => {
            rpc_error(StatusCode::SERVICE_UNAVAILABLE, id, REFUSED, &message, data)
        }
        CallDenied::Unrecordable { field, .. } => {
            data["field"] = json!(field);
            rpc_error(StatusCode::OK, id, INVALID_PARAMS, &message, data)
        }
    }
}

/// A header's single value as text (`=?base64?...?=` decoded), `Ok(None)`
/// when absent, `Err` when repeated or unreadable.
fn single_header(h: &HeaderMap, name: &str) -> Result<Option<String>, String> {
    let mut values = h.get_all(name).iter();
    let Some(first) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(format!("{name} is given more than once"));
    }
    let text = first
        .to_str()
        .map_err(|_| format!("{name} is not readable text"))?;
    match text
        .strip_prefix("=?base64?")
        .and_then(|t| t.strip_suffix("?="))
    {
        Some(b64) => base64::engine::general_purpose::STANDARD
            .decode(b64)
            .ok()
            .and_then(|b| String::from_utf8(b).ok())
            .map(Some)
            .ok_or_else(|| format!("{name} is not valid base64 UTF-8")),
        None => Ok(Some(text.to_owned())),
    }
}

/// Fails unless the header, where given, says `expected`.
fn header_agrees(h: &HeaderMap, name: &str, expected: &str) -> Result<(), String> {
    match single_header(h, name)? {
        Some(v) if v != expected => Err(format!(
            "the {name} header says {v:?} but the body says {expected:?}"
        )),
        _ => Ok(()),
    }
}

/// Rewrites every JSON message of an answer (a JSON body, or each SSE
/// event's data) with `f`; anything unreadable is passed as it was.
fn rewrite_messages(body: &[u8], sse: bool, f: &dyn Fn(&mut Value)) -> Vec<u8> {
    let lenient = |v: &mut Value| {
        f(v);
        Ok(())
    };
    rewrite_each(body, sse, Junk::Pass, &lenient).unwrap_or_else(|_| body.to_vec())
}

/// What [`rewrite_each`] does with a message it cannot read as JSON.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Junk {
    /// Passes it on as it came.
    Pass,
    /// Fails the whole answer (a filter that cannot read a message cannot
    /// say what it may show).
    Refuse,
}

/// Applies `f` to each JSON-RPC message of `body` (one JSON document, or
/// the `data` of each event of an event stream).
fn rewrite_each(
    body: &[u8],
    sse: bool,
    junk: Junk,
    f: &dyn Fn(&mut Value) -> Result<(), String>,
) -> Result<Vec<u8>, String> {
    if !sse {
        return match serde_json::from_slice::<Value>(body) {
            Ok(mut v) => {
                f(&mut v)?;
                serde_json::to_vec(&v).map_err(|e| e.to_string())
            }
            Err(e) if junk == Junk::Refuse => Err(format!("the answer is not JSON: {e}")),
            Err(_) => Ok(body.to_vec()),
        };
    }
    if junk == Junk::Refuse && std::str::from_utf8(body).is_err() {
        return Err("the event stream is not UTF-8".to_owned());
    }
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    // An event stream may end lines with a bare CR and start with a BOM
    // (WHATWG HTML 9.2.6); this filter reads neither, so it refuses them
    // rather than pass on events it could not see into.
    if junk == Junk::Refuse && (text.contains('\r') || text.starts_with('\u{feff}')) {
        return Err(
            "the event stream ends a line with a bare CR or starts with a byte-order mark, which the filter does not read"
                .to_owned(),
        );
    }
    let mut out = String::with_capacity(text.len());
    let mut events = text.split("\n\n").peekable();
    while let Some(event) = events.next() {
        let mut data: Vec<&str> = Vec::new();
        let mut lines: Vec<Option<&str>> = Vec::new();
        // A filtered stream carries no event ids: resuming from one would
        // replay the upstream's unfiltered events.
        let kept: Vec<&str> = event
            .split('\n')
            .filter(|l| junk != Junk::Refuse || !(*l == "id" || l.starts_with("id:")))
            .collect();
        for line in kept.iter().copied() {
            if let Some(d) = line.strip_prefix("data:") {
                if data.is_empty() {
                    lines.push(None);
                }
                data.push(d.strip_prefix(' ').unwrap_or(d));
            } else {
                lines.push(Some(line));
            }
        }
        let joined = data.join("\n");
        // An event without data, or with empty data (a priming event that
        // carries only an id to resume from), holds no message.
        let rewritten = if joined.trim().is_empty() {
            None
        } else {
            match serde_json::from_str::<Value>(&joined) {
                Ok(mut v) => {
                    f(&mut v)?;
                    Some(v.to_string())
                }
                Err(e) if junk == Junk::Refuse => {
                    return Err(format!("an event's data is not JSON: {e}"));
                }
                Err(_) => None,
            }
        };
        match rewritten {
            Some(json) => {
                let parts: Vec<String> = lines
                    .iter()
                    .map(|l| match l {
                        Some(l) => (*l).to_owned(),
                        None => format!("data: {json}"),
                    })
                    .collect();
                out.push_str(&parts.join("\n"));
            }
            None => out.push_str(&kept.join("\n")),
        }
        if events.peek().is_some() {
            out.push_str("\n\n");
        }
    }
    Ok(out.into_bytes())
}

/// Keeps in a `tools/list` answer only the tools `keep` allows. Anything
/// the filter cannot read for certain is refused: a message that is not an
/// object, a `result` that is not an object, `tools` that is not an array,
/// a tool without a string name, and keys equal to `result` or `tools` but
/// for case (a client that folds case would read the unfiltered twin).
fn filter_tools(v: &mut Value, keep: &dyn Fn(&str) -> bool) -> Result<(), String> {
    let Some(msg) = v.as_object_mut() else {
        return Err("a message is not a JSON object".to_owned());
    };
    if let Some(k) = case_twin(msg) {
        return Err(format!("a message holds two keys {k:?} equal but for case"));
    }
    if msg.keys().any(|k| k != "result" && fold(k) == "result") {
        return Err("a message holds a result under another case".to_owned());
    }
    let Some(result) = msg.get_mut("result") else {
        return Ok(());
    };
    let Some(result) = result.as_object_mut() else {
        return Err("the result is not a JSON object".to_owned());
    };
    if result.keys().any(|k| k != "tools" && fold(k) == "tools") {
        return Err("the result holds tools under another case".to_owned());
    }
    let Some(tools) = result.get_mut("tools") else {
        return Ok(());
    };
    let Some(tools) = tools.as_array_mut() else {
        return Err("the result's tools is not an array".to_owned());
    };
    if tools
        .iter()
        .any(|t| t.get("name").and_then(Value::as_str).is_none())
    {
        return Err("a listed tool has no name".to_owned());
    }
    tools.retain(|t| t.get("name").and_then(Value::as_str).is_some_and(keep));
    Ok(())
}

/// Keys of a request's `params._meta` that a client sets anew on each
/// attempt and that do not change what the tool is asked to do (the
/// progress token, trace context): like the headers of
/// [`UNBOUND_HEADERS`](crate::approval::UNBOUND_HEADERS), an approval does
/// not bind them, so a retried call finds its approval. Only while their
/// value is a string of at most [`UNBOUND_META_MAX`] bytes or a number:
/// any other value is bound.
const UNBOUND_META: [&str; 3] = ["progressToken", "traceparent", "tracestate"];
const UNBOUND_META_MAX: usize = 256;

/// The keys of `tools/call` params that the gateway reads or the MCP
/// schema defines: a key equal to one of them but for case (`Arguments`)
/// is refused, since a server that matches keys without case would read
/// it where the gateway read nothing.
const CALL_PARAMS: [&str; 5] = [
    "name",
    "arguments",
    "_meta",
    "requestState",
    "inputResponses",
];

/// What a `tools/call`'s approval binds of its `params`: every key as the
/// upstream gets it (`arguments`, `_meta`, `requestState`, any other),
/// less the tool's name (in the approval's target) and [`UNBOUND_META`];
/// absent or null `arguments` are `{}`. The keys stay in the order the
/// upstream gets them (fail closed: the same call with its keys reordered
/// asks again).
fn approval_params(params: &Map<String, Value>) -> Vec<u8> {
    let per_attempt = |k: &str, v: &Value| {
        UNBOUND_META.contains(&k)
            && match v {
                Value::String(s) => s.len() <= UNBOUND_META_MAX,
                Value::Number(_) => true,
                _ => false,
            }
    };
    // Rebuilt rather than edited in place: removing from a map that keeps
    // insertion order may move its last key.
    let mut bound: Map<String, Value> = Map::new();
    for (k, v) in params {
        match (k.as_str(), v) {
            ("name", _) => {}
            ("arguments", Value::Null) => {
                bound.insert(k.clone(), Value::Object(Map::new()));
            }
            ("_meta", Value::Object(meta)) => {
                let kept: Map<String, Value> = meta
                    .iter()
                    .filter(|(k, v)| !per_attempt(k, v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if !kept.is_empty() {
                    bound.insert(k.clone(), Value::Object(kept));
                }
            }
            _ => {
                bound.insert(k.clone(), v.clone());
            }
        }
    }
    if !bound.contains_key("arguments") {
        bound.insert("arguments".into(), Value::Object(Map::new()));
    }
    serde_json::to_vec(&bound).unwrap_or_default()
}

/// A key of `params` that is one of [`CALL_PARAMS`] but for case.
fn call_param_twin(params: &Map<String, Value>) -> Option<&str> {
    params
        .keys()
        .map(String::as_str)
        .find(|k| !CALL_PARAMS.contains(k) && CALL_PARAMS.iter().any(|c| fold(c) == fold(k)))
}

/// Most values one MCP message may hold (a call carrying a hundred
/// 1,536-float embeddings holds about 154,000).
pub const MAX_MESSAGE_VALUES: usize = 1_000_000;
/// Bytes of the body budget each value of a parsed message holds.
const VALUE_COST: usize = 80;

/// The top-level fields of a JSON-RPC 2.0 message.
const MESSAGE_FIELDS: &[&str] = &["jsonrpc", "id", "method", "params", "result", "error"];

/// A key of `map` (or of an object nested in it) that another key of the
/// same object equals once both are lower-cased: some servers (Go's
/// `encoding/json`) match keys without case, so the gateway and the
/// server could read different values.
fn case_twin(map: &Map<String, Value>) -> Option<String> {
    let mut seen = std::collections::HashSet::new();
    for (k, v) in map {
        if !seen.insert(fold(k)) {
            return Some(k.clone());
        }
        if let Some(twin) = nested_case_twin(v) {
            return Some(twin);
        }
    }
    None
}

fn nested_case_twin(v: &Value) -> Option<String> {
    match v {
        Value::Object(m) => case_twin(m),
        Value::Array(a) => a.iter().find_map(nested_case_twin),
        _ => None,
    }
}

impl Gateway {
    /// A request on an MCP endpoint, from the verified holder `d`.
    pub(crate) async fn mcp(
        &self,
        rt: &Routing,
        ep: &McpEndpoint,
        req: &Incoming,
        d: &VerifiedDelegation,
        body: Bytes,
        now: u64,
    ) -> Response {
        let c = Ctx {
            rt,
            ep,
            req,
            d,
            now,
        };
        let session = match single_header(&req.headers, SESSION) {
            Ok(s) => s,
            Err(e) => {
                return invalid_request(None, &e);
            }
        };
        if let Some(id) = &session
            && !self.sessions.owned_by(id, d)
        {
            tracing::warn!(
                task = %d.task_id(),
                agent = %d.agent(),
                "MCP request on a session this caller did not open refused"
            );
            return rpc_error(
                StatusCode::NOT_FOUND,
                None,
                INVALID_REQUEST,
                "no such MCP session for this caller (initialize a new one)",
                Value::Null,
            );
        }
        // While the revocation feed is silent a credential revoked meanwhile
        // looks live: what the endpoint serves without naming a tool (a
        // stream, a ping, a resource read) is refused as a read would be.
        // A `tools/call` is decided, and recorded, by the gate itself.
        let stale = |id: Option<&Value>| {
            self.enforcer
                .gate
                .check_fresh(baton_core::RiskTier::Read, now)
                .err()
                .map(|denied| {
                    tracing::warn!(task = %d.task_id(), agent = %d.agent(), "MCP request refused: revocation data is stale");
                    call_denial(id, "this MCP endpoint", &denied)
                })
        };
        // A GET (the server's stream) or DELETE (the session's end) carries
        // no message: a body would be a message no check has read.
        if req.method != Method::POST && !body.is_empty() {
            return rpc_error(
                StatusCode::BAD_REQUEST,
                None,
                INVALID_REQUEST,
                &format!("an MCP {} carries no body", req.method),
                Value::Null,
            );
        }
        if req.method != Method::POST
            && let Some(refused) = stale(None)
        {
            return refused;
        }
        match req.method {
            Method::POST => {}
            Method::GET => return self.mcp_pass(c, body, None, None).await,
            Method::DELETE => {
                let resp = self.mcp_pass(c, body, None, None).await;
                if resp.status().is_success()
                    && let Some(id) = &session
                {
                    self.sessions.end(id);
                }
                return resp;
            }
            _ => {
                return rpc_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    None,
                    INVALID_REQUEST,
                    "an MCP endpoint takes POST, GET and DELETE",
                    Value::Null,
                );
            }
        }
        // A parsed value takes some 80 bytes: the message's values hold a
        // share of the body budget while it lives, so a flood of large
        // messages is answered 503, not parsed into the gateway's memory.
        let values = match crate::record::count_values(&body, MAX_MESSAGE_VALUES) {
            Ok(n) => n,
            Err(e) => {
                return rpc_error(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    None,
                    INVALID_REQUEST,
                    &e,
                    Value::Null,
                );
            }
        };
        let share = u32::try_from(values.saturating_mul(VALUE_COST)).unwrap_or(u32::MAX);
        let Ok(_parsed_share) = self.bodies.clone().try_acquire_many_owned(share) else {
            return rpc_error(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                REFUSED,
                "the gateway holds too many request bodies at once; retry",
                Value::Null,
            );
        };
        let msg: Value = match serde_json::from_slice(&body) {
            Ok(v) => v,
            Err(e) => {
                return rpc_error(
                    StatusCode::BAD_REQUEST,
                    None,
                    PARSE_ERROR,
                    &format!("the body is not JSON the gateway reads: {e}"),
                    Value::Null,
                );
            }
        };
        let Some(obj) = msg.as_object() else {
            return invalid_request(
                None,
                "one JSON-RPC message per request (batches are not accepted)",
            );
        };
        // Nothing beside the fields the gateway reads: a `Method` or
        // `paramſ` would be `method` or `params` to a server that matches
        // keys without case (Go's encoding/json), a call no check has seen.
        if let Some(k) = obj.keys().find(|k| !MESSAGE_FIELDS.contains(&k.as_str())) {
            return invalid_request(
                obj.get("id"),
                &format!(
                    "a JSON-RPC message has only the fields {}; {k:?} is not one",
                    MESSAGE_FIELDS.join(", ")
                ),
            );
        }
        if let Some(k) = case_twin(obj) {
            return invalid_request(
                obj.get("id"),
                &format!(
                    "two keys {k:?} of one object differ only in case; a server may read either, so the message is refused"
                ),
            );
        }
        // The upstream gets the message exactly as the gateway read it:
        // re-written from what was parsed, so that a duplicate key or an
        // odd encoding cannot make it read another tool or argument.
        let body = match serde_json::to_vec(&msg) {
            Ok(b) => Bytes::from(b),
            Err(e) => {
                return rpc_error(
                    StatusCode::BAD_REQUEST,
                    None,
                    PARSE_ERROR,
                    &format!("the body cannot be re-written: {e}"),
                    Value::Null,
                );
            }
        };
        let id = obj.get("id");
        if obj.get("method").and_then(Value::as_str) != Some("tools/call")
            && let Some(refused) = stale(id)
        {
            return refused;
        }
        let Some(method) = obj.get("method").and_then(Value::as_str) else {
            if obj.contains_key("result") || obj.contains_key("error") {
                // The client's answer to a request of the server.
                return self.mcp_pass(c, body, None, None).await;
            }
            return invalid_request(
                id,
                "a JSON-RPC message needs a method, or a result or error",
            );
        };
        if let Err(e) = header_agrees(&req.headers, "mcp-method", method) {
            return invalid_request(id, &e);
        }
        match method {
            "tools/call" => self.mcp_call(c, obj, body.clone()).await,
            "tools/list" => self.mcp_list(c, id, body).await,
            m if MCP_BASE_METHODS.contains(&m)
                || m.starts_with("notifications/")
                || ep.allow_methods.iter().any(|a| a == m) =>
            {
                self.mcp_pass(c, body, id, None).await
            }
            m => {
                tracing::warn!(task = %d.task_id(), agent = %d.agent(), method = m, "MCP method refused");
                self.enforcer.gate.record_unserved(
                    d,
                    m,
                    &body,
                    now,
                    "method_not_allowed",
                    "the MCP method is not allowed through the gateway",
                );
                rpc_error(
                    if id.is_some() {
                        StatusCode::OK
                    } else {
                        StatusCode::FORBIDDEN
                    },
                    id,
                    METHOD_NOT_FOUND,
                    &format!("{m} is not allowed through the Baton gateway"),
                    Value::Null,
                )
            }
        }
    }

    async fn mcp_call(&self, c: Ctx<'_>, obj: &Map<String, Value>, body: Bytes) -> Response {
        let Ctx {
            ep, req, d, now, ..
        } = c;
        let id = obj.get("id");
        let bad = |m: String| rpc_error(StatusCode::OK, id, INVALID_PARAMS, &m, Value::Null);
        let Some(params) = obj.get("params").and_then(Value::as_object) else {
            return bad("tools/call needs params (an object)".into());
        };
        if let Some(k) = call_param_twin(params) {
            return bad(format!(
                "params.{k}: spelled unlike the MCP field it matches without case; a server may read it as that field, so the call is refused"
            ));
        }
        let Some(name) = params.get("name").and_then(Value::as_str) else {
            return bad("tools/call needs params.name (a string)".into());
        };
        if let Err(e) = header_agrees(&req.headers, "mcp-name", name) {
            return invalid_request(id, &e);
        }
        let Some(tool) = ep.tools.iter().find(|t| t.name == name) else {
            tracing::warn!(task = %d.task_id(), agent = %d.agent(), tool = name, "MCP call of a tool the gateway does not serve refused");
            self.enforcer.gate.record_unserved(
                d,
                name,
                &body,
                now,
                "unknown_tool",
                "the gateway serves no tool of that name at this endpoint",
            );
            return bad(format!("tool {name:?} is not served through this gateway"));
        };
        let empty = Map::new();
        let arguments = match params.get("arguments") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(a)) => a,
            Some(_) => return bad("params.arguments must be an object".into()),
        };
        if let Some(key) = case_twin(arguments) {
            return bad(format!(
                "params.arguments: two keys {key:?} differ only in case; a server may read either, so the call is refused"
            ));
        }
        if let Some(why) = tool
            .record
            .look_alike_input(&Value::Object(arguments.clone()))
        {
            return bad(format!("params.arguments: {why}"));
        }
        let resource = match tool.resource_for(arguments) {
            Ok(r) => r,
            Err(e) => return bad(format!("{name}: {e}")),
        };
        let spec = spec_of(tool, resource);
        let input = serde_json::to_vec(arguments).unwrap_or_default();
        let bound = || approval_params(params);
        let approval = match self
            .approval_for(
                d,
                now,
                crate::approval::Ask {
                    spec: &spec,
                    input: &input,
                    // Every key of `params` the upstream gets, not only the
                    // arguments: `_meta`, `requestState`, `inputResponses`
                    // change what a server does with the same arguments.
                    bound: Some(&bound),
                    // The session and every header the upstream gets.
                    headers: Some(&req.headers),
                    // The endpoint and its query too: one approved at a
                    // staging endpoint does not serve the same call at
                    // another.
                    target: Some(match &req.query {
                        Some(q) => format!("POST {}?{q} tools/call {name}", ep.path),
                        None => format!("POST {} tools/call {name}", ep.path),
                    }),
                    ttl: c.rt.config.approval_ttl,
                    configured: tool.approval,
                    shown: &|| tool.record.input_fields(&Value::Object(arguments.clone())),
                },
            )
            .await
        {
            Ok(approval) => approval,
            Err(held) => return held_error(id, name, &held),
        };
        let recorded = tool.record.input_fields(&Value::Object(arguments.clone()));
        let call = match self
            .enforcer
            .gate
            .authorize_approved_async(
                d,
                &spec,
                &input,
                now,
                baton_verify::CallNotes {
                    approval,
                    recorded,
                    traceparent: crate::gateway::traceparent(&req.headers),
                },
            )
            .await
        {
            Ok(call) => call,
            Err(denied) => return call_denial(id, name, &denied),
        };
        tracing::info!(
            task = %d.task_id(),
            agent = %d.agent(),
            tool = name,
            resource = %spec.resource,
            "MCP tool call allowed"
        );
        let record = (!tool.record.output.is_empty()).then(|| tool.record.clone());
        self.mcp_pass(c, body, id, Some((call, record))).await
    }

    async fn mcp_list(&self, c: Ctx<'_>, id: Option<&Value>, body: Bytes) -> Response {
        let json = true;
        let Ctx {
            rt,
            ep,
            req,
            d,
            now,
        } = c;
        let resp = match rt.send(&ep.upstream, &ep.path, req, d, body, json).await {
            Ok(r) => r,
            Err(e) => return upstream_failed(id, &e),
        };
        // Read whole (to filter it), charged to the body budget until the
        // filtered list is sent.
        let (status, headers, out, held) =
            match crate::gateway::read_answer(resp, &self.bodies).await {
                Ok(answer) => answer,
                Err(crate::gateway::AnswerRefused::Upstream(e)) => {
                    return upstream_failed(id, &format!("the tool list: {e}"));
                }
                Err(crate::gateway::AnswerRefused::Busy(_)) => {
                    return upstream_failed(id, "the gateway holds too many answers at once");
                }
            };
        self.bind_session(&headers, d);
        let sse = headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("text/event-stream"));
        if let Err(e) = crate::record::within_value_bound(&out) {
            return upstream_failed(id, &format!("the tool list could not be read: {e}"));
        }
        let keep = |name: &str| {
            ep.tools
                .iter()
                .find(|t| t.name == name)
                .is_some_and(|t| self.may_call(d, t, now))
        };
        // Fails closed: an answer the filter cannot read is not passed on
        // (it could list every tool).
        let filtered = match rewrite_each(&out, sse, Junk::Refuse, &|v| filter_tools(v, &keep)) {
            Ok(f) => f,
            Err(e) => {
                return upstream_failed(id, &format!("the tool list could not be read: {e}"));
            }
        };
        crate::gateway::held_answer(status, headers, filtered, held)
    }

    /// Whether `tools/list` shows `tool` to `d`'s holder: what the gate
    /// would allow (for a resource taken from arguments, the scope and
    /// the risk ceiling only; the call itself is decided in full).
    fn may_call(&self, d: &VerifiedDelegation, tool: &McpTool, now: u64) -> bool {
        if tool.resource_is_static() {
            let spec = spec_of(tool, tool.resource_template().to_owned());
            self.enforcer.gate.permits(d, &spec, now)
        } else {
            d.scope().allows(&tool.permission) && tool.tier <= d.risk_ceiling()
        }
    }

    fn bind_session(&self, headers: &HeaderMap, d: &VerifiedDelegation) {
        if let Some(id) = headers.get(SESSION).and_then(|v| v.to_str().ok()) {
            self.sessions.bind(id, d);
        }
    }

    /// Forwards the message and streams the answer back as it comes. The
    /// call, if any, is recorded when the answer ends: with the digest of
    /// what was streamed, or as failed.
    async fn mcp_pass(
        &self,
        c: Ctx<'_>,
        body: Bytes,
        id: Option<&Value>,
        call: Option<(VerifiedCall, Option<Recording>)>,
    ) -> Response {
        let Ctx { rt, ep, req, d, .. } = c;
        let (call, record) = match call {
            Some((call, record)) => (Some(call), record),
            None => (None, None),
        };
        // A POST's body is the message as the gateway read and re-wrote it.
        let json = req.method == Method::POST;
        let started = Instant::now();
        let resp = match rt.send(&ep.upstream, &ep.path, req, d, body, json).await {
            Ok(r) => r,
            Err(e) => {
                if let Some(call) = call
                    && let Err(re) = call.failed_async(&e).await
                {
                    tracing::warn!(error = %re, "could not spool the report of a failed call");
                }
                return upstream_failed(id, &e);
            }
        };
        let mut headers = resp.headers().clone();
        strip_hop_by_hop(&mut headers);
        self.bind_session(&headers, d);
        let standing = self.enforcer.verifier.standing(d);
        relay(
            resp,
            headers,
            call,
            started,
            record.map(Output::McpResult),
            Some(standing),
        )
    }
}

fn spec_of(tool: &McpTool, resource: String) -> ToolSpec {
    ToolSpec {
        name: tool.name.clone(),
        tier: tool.tier,
        resource,
        requires: tool.permission.clone(),
    }
}

/// The upstream failed: the caller learns that, the gateway's log why
/// (addresses behind the gateway are not the caller's business).
fn upstream_failed(id: Option<&Value>, message: &str) -> Response {
    tracing::warn!(error = %message, "MCP upstream failed");
    rpc_error(
        StatusCode::BAD_GATEWAY,
        id,
        UPSTREAM_FAILED,
        "the tool server behind the gateway failed (the gateway's log says why)",
        json!({"code": "upstream"}),
    )
}

/// Most bytes of a streamed answer kept aside to find its recorded
/// output fields (the stream itself is never held back).
const MAX_SCANNED: usize = 1 << 20;

/// Which output fields a relayed answer records.
pub(crate) enum Output {
    /// Pointers into the JSON-RPC `result` of an MCP answer (plain JSON
    /// or an event stream).
    McpResult(Recording),
    /// A plain route's event stream: its fields are not recorded (said so
    /// in the record).
    Unscanned,
}

/// The recorded output fields of a relayed answer (`sse`: an event
/// stream of JSON-RPC messages).
fn output_fields(output: &Output, body: &[u8], sse: bool) -> BTreeMap<String, String> {
    match output {
        Output::Unscanned => BTreeMap::from([(
            "output".to_owned(),
            "(event stream, not recorded)".to_owned(),
        )]),
        Output::McpResult(record) => {
            let found = std::cell::RefCell::new(None);
            rewrite_messages(body, sse, &|v: &mut Value| {
                if let Some(r) = v.get("result") {
                    *found.borrow_mut() = Some(r.clone());
                }
            });
            match found.into_inner() {
                Some(result) => record.output_fields_of(&result),
                None => BTreeMap::from([("output".to_owned(), "(no result)".to_owned())]),
            }
        }
    }
}

/// How often a streaming answer checks again that its caller's token
/// holds (see [`baton_verify::TokenVerifier::standing`]).
const STANDING_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Streams `resp` back chunk by chunk; when it ends, `call` (if any) is
/// recorded with the SHA-256 of everything streamed (and the `output`
/// fields its route names), or as failed if the upstream broke off or the
/// caller went away.
pub(crate) fn relay(
    resp: reqwest::Response,
    mut headers: HeaderMap,
    call: Option<VerifiedCall>,
    started: Instant,
    output: Option<Output>,
    standing: Option<baton_verify::Standing>,
) -> Response {
    let status = resp.status();
    let sse = crate::gateway::is_event_stream(&headers);
    headers.remove(http::header::CONTENT_LENGTH);
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(16);
    tokio::spawn(async move {
        let mut resp = resp;
        let mut digest = call.as_ref().map(VerifiedCall::output_digest);
        let mut scanned: Option<Vec<u8>> = match &output {
            Some(Output::McpResult(_)) => Some(Vec::new()),
            _ => None,
        };
        // The caller's token is checked again while the answer flows: an
        // event stream may outlive its expiry, its revocation or its
        // task's end, and carries nothing more after them.
        let mut recheck = tokio::time::interval(STANDING_CHECK_EVERY);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let outcome = loop {
            // A caller gone is noticed while the upstream is silent too (an
            // idle event stream): otherwise this task and its upstream
            // connection would stay until the upstream next sent a byte.
            let next = tokio::select! {
                biased;
                () = tx.closed() => {
                    break Err("the caller went away before the answer ended".to_owned());
                }
                _ = recheck.tick(), if standing.is_some() => {
                    if let Some(Err(e)) = standing.as_ref().map(|s| s.check(unix_now())) {
                        let message = format!("the answer was cut off: the caller's credential no longer holds ({e})");
                        tracing::info!(reason = %e, "stream closed: the caller's credential no longer holds");
                        let _ = tx.send(Err(std::io::Error::other(message.clone()))).await;
                        break Err(message);
                    }
                    continue;
                }
                next = resp.chunk() => next,
            };
            match next {
                Ok(Some(chunk)) => {
                    if let Some(d) = digest.as_mut() {
                        d.update(&chunk);
                    }
                    if let Some(buf) = scanned.as_mut()
                        && buf.len() + chunk.len() <= MAX_SCANNED
                    {
                        buf.extend_from_slice(&chunk);
                    }
                    if tx.send(Ok(chunk)).await.is_err() {
                        break Err("the caller went away before the answer ended".to_owned());
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => {
                    let message = format!("the upstream's answer broke off: {e}");
                    let _ = tx.send(Err(std::io::Error::other(message.clone()))).await;
                    break Err(message);
                }
            }
        };
        let Some(mut call) = call else { return };
        let latency_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        call.set_upstream(status.as_u16(), latency_ms);
        if let Some(output) = &output {
            call.record_output(output_fields(
                output,
                scanned.as_deref().unwrap_or_default(),
                sse,
            ));
        }
        let recorded = match outcome {
            Ok(()) => match digest {
                Some(d) => call.finish_digest_async(d).await,
                None => call.finish_async(&[]).await,
            },
            Err(e) => call.failed_async(&e).await,
        };
        if let Err(e) = recorded {
            tracing::warn!(error = %e, "could not spool the report of a streamed call");
        }
    });
    let mut reply =
        warp::reply::stream(tokio_stream::wrappers::ReceiverStream::new(rx)).into_response();
    *reply.status_mut() = status;
    *reply.headers_mut() = headers;
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An upstream that sends an event stream's head and then nothing: a
    /// caller that goes away frees the relay and its upstream connection
    /// at once, not when the upstream next writes; the upstream sees its
    /// connection closed. The control: while the caller holds the answer,
    /// the connection stays open.
    #[tokio::test]
    async fn a_caller_gone_from_an_idle_stream_closes_the_upstream_connection() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let upstream = tokio::spawn(async move {
            let (mut conn, _) = listener.accept().await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = conn.read(&mut buf).await.unwrap();
                assert!(n > 0);
                head.extend_from_slice(&buf[..n]);
            }
            conn.write_all(
                b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n",
            )
            .await
            .unwrap();
            // Silent from here on; returns when the gateway closes.
            conn.read(&mut buf).await.unwrap()
        });
        baton_tls::install_crypto_provider();
        let resp = reqwest::Client::builder()
            .no_proxy()
            .build()
            .unwrap()
            .get(format!("http://{addr}/events"))
            .send()
            .await
            .unwrap();
        let headers = resp.headers().clone();
        let answer = relay(
            resp,
            headers,
            None,
            Instant::now(),
            Some(Output::Unscanned),
            None,
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!upstream.is_finished(), "open while the caller holds it");
        drop(answer);
        let read = tokio::time::timeout(Duration::from_secs(60), upstream)
            .await
            .expect("the upstream connection was closed")
            .unwrap();
        assert_eq!(read, 0);
    }

    fn obj(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    #[test]
    fn an_approval_binds_every_params_key_but_the_name_and_per_attempt_meta() {
        let base = approval_params(&obj(json!({"name": "t", "arguments": {"a": 1}})));
        // Per-attempt `_meta` only: the same call.
        let retried = approval_params(&obj(json!({
            "name": "t", "arguments": {"a": 1},
            "_meta": {"progressToken": 7, "traceparent": "00-ab-cd-01"}
        })));
        assert_eq!(retried, base);
        // Anything else the server gets: another call.
        for other in [
            json!({"name": "t", "arguments": {"a": 2}}),
            json!({"name": "t", "arguments": {"a": 1}, "_meta": {"com.example/x": 1}}),
            json!({"name": "t", "arguments": {"a": 1}, "requestState": "s"}),
            json!({"name": "t", "arguments": {"a": 1}, "inputResponses": {}}),
            json!({"name": "t", "arguments": {"a": 1}, "x": null}),
            // A "per-attempt" key whose value is not a short string or number.
            json!({"name": "t", "arguments": {"a": 1}, "_meta": {"progressToken": {"a": 1}}}),
            json!({"name": "t", "arguments": {"a": 1}, "_meta": {"traceparent": "x".repeat(300)}}),
        ] {
            assert_ne!(approval_params(&obj(other.clone())), base, "{other}");
        }
        // Absent and null arguments are `{}`.
        let empty = approval_params(&obj(json!({"name": "t", "arguments": {}})));
        assert_eq!(approval_params(&obj(json!({"name": "t"}))), empty);
        assert_eq!(
            approval_params(&obj(json!({"name": "t", "arguments": null}))),
            empty
        );
    }

    #[test]
    fn a_call_param_spelled_unlike_its_field_is_found() {
        assert_eq!(
            call_param_twin(&obj(json!({"name": "t", "Arguments": {}}))),
            Some("Arguments")
        );
        assert_eq!(
            call_param_twin(&obj(json!({"name": "t", "_META": {}}))),
            Some("_META")
        );
        assert_eq!(
            call_param_twin(&obj(json!({"name": "t", "arguments": {}, "_meta": {}}))),
            None
        );
        assert_eq!(
            call_param_twin(&obj(json!({"name": "t", "other": 1}))),
            None
        );
    }

    #[test]
    fn sse_events_are_rewritten_one_by_one() {
        let body = b"id: 1\nevent: message\ndata: {\"a\":1}\n\n: comment\n\ndata: not json\n\nretry: 5\ndata: {\"a\":\ndata: 2}\n\n";
        let out = rewrite_messages(body, true, &|v: &mut Value| v["a"] = json!(9));
        let out = String::from_utf8(out).unwrap();
        assert_eq!(
            out,
            "id: 1\nevent: message\ndata: {\"a\":9}\n\n: comment\n\ndata: not json\n\nretry: 5\ndata: {\"a\":9}\n\n"
        );
    }

    #[test]
    fn json_bodies_are_rewritten_and_junk_passes() {
        let out = rewrite_messages(br#"{"result":{"tools":[1,2]}}"#, false, &|v: &mut Value| {
            v["result"]["tools"] = json!([]);
        });
        assert_eq!(out, br#"{"result":{"tools":[]}}"#);
        assert_eq!(
            rewrite_messages(b"<html>", false, &|_: &mut Value| {}),
            b"<html>"
        );
    }

    #[test]
    fn a_tool_list_the_filter_cannot_read_is_refused() {
        let keep = |n: &str| n == "crm.search";
        let run = |body: &[u8], sse: bool| {
            rewrite_each(body, sse, Junk::Refuse, &|v| filter_tools(v, &keep))
                .map(|b| String::from_utf8(b).unwrap())
        };
        // The untampered control: filtered, plain and streamed.
        let list = r#"{"jsonrpc":"2.0","id":1,"result":{"tools":[{"name":"crm.search"},{"name":"crm.export"}]}}"#;
        let out = run(list.as_bytes(), false).unwrap();
        assert!(
            out.contains("crm.search") && !out.contains("crm.export"),
            "{out}"
        );
        let out = run(format!("event: message\ndata: {list}\n\n").as_bytes(), true).unwrap();
        assert!(
            out.contains("crm.search") && !out.contains("crm.export"),
            "{out}"
        );
        // Event ids (a priming event's too) are dropped: a client cannot
        // resume the stream and have the upstream replay it unfiltered.
        let out = run(
            format!("id: s1_0\ndata:\n\nid: s1_1\nevent: message\ndata: {list}\n\n").as_bytes(),
            true,
        )
        .unwrap();
        assert!(!out.contains("id:") && !out.contains("s1_"), "{out}");
        assert!(
            out.contains("crm.search") && !out.contains("crm.export"),
            "{out}"
        );
        // A ping's answer has no tools: passed as it is.
        assert!(run(br#"{"jsonrpc":"2.0","id":1,"result":{}}"#, false).is_ok());
        for junk in [
            &b"<html>crm.export</html>"[..],
            br#"[{"result":{"tools":[{"name":"crm.export"}]}}]"#,
            br#"{"result":"crm.export"}"#,
            br#"{"result":{"tools":{"crm.export":{}}}}"#,
            br#"{"result":{"tools":[{"Name":"crm.export"}]}}"#,
            br#"{"result":{"tools":[],"Tools":[{"name":"crm.export"}]}}"#,
            br#"{"Result":{"tools":[{"name":"crm.export"}]}}"#,
            "{\"result\":{\"tool\u{17f}\":[{\"name\":\"crm.export\"}]}}".as_bytes(),
        ] {
            assert!(
                run(junk, false).is_err(),
                "{}",
                String::from_utf8_lossy(junk)
            );
        }
        // A priming event (an id, empty data) and a comment hold no message.
        let primed = format!("id: 0\ndata: \n\n: keep-alive\n\ndata: {list}\n\n");
        let out = run(primed.as_bytes(), true).unwrap();
        assert!(out.starts_with("data: \n\n: keep-alive"), "{out}");
        assert!(!out.contains("crm.export"), "{out}");
        assert!(run(b"data: {\"result\":\n\n", true).is_err());
        assert!(run(b"data: \xff\n\n", true).is_err());
        // Line ends and a BOM an event-stream client reads and this filter
        // would not: the list would pass unfiltered.
        for odd in [
            format!("event: message\rdata: {list}\r\r"),
            format!("event: message\ndata: {list}\r\n\r"),
            format!("\u{feff}data: {list}\n\n"),
        ] {
            assert!(run(odd.as_bytes(), true).is_err(), "{odd:?}");
        }
    }

    #[test]
    fn mcp_headers_must_agree_with_the_body() {
        let mut h = HeaderMap::new();
        assert!(header_agrees(&h, "mcp-name", "crm.search").is_ok());
        h.insert("mcp-name", HeaderValue::from_static("crm.search"));
        assert!(header_agrees(&h, "mcp-name", "crm.search").is_ok());
        assert!(header_agrees(&h, "mcp-name", "crm.export").is_err());
        let b64 = base64::engine::general_purpose::STANDARD.encode("crm.export");
        h.insert(
            "mcp-name",
            HeaderValue::from_str(&format!("=?base64?{b64}?=")).unwrap(),
        );
        assert!(header_agrees(&h, "mcp-name", "crm.export").is_ok());
        assert!(header_agrees(&h, "mcp-name", "crm.search").is_err());
        h.append("mcp-name", HeaderValue::from_static("crm.export"));
        assert!(header_agrees(&h, "mcp-name", "crm.export").is_err());
    }
}
