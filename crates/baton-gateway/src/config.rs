//! The gateway's configuration file (TOML): where it listens, the audience
//! it serves, its upstreams, and the routes that map each request to a
//! tool. Everything is checked when the file is loaded, so a gateway never
//! starts with a route it cannot enforce; `baton gateway --check` runs only
//! this.
//!
//! ```toml
//! listen = "127.0.0.1:8443"
//! audience = "crm"
//! broker-url = "https://broker.internal:7443"
//! spool = "/var/lib/baton/gateway-spool"
//! # durable-reads = true   # read calls' answers wait for their record's fsync
//!
//! [upstreams.crm]
//! url = "http://127.0.0.1:8080"
//!
//! [[routes]]
//! method = "GET"
//! path = "/accounts/{account}"
//! tool = "crm.read"
//! resource = "dataset:crm/{account}"
//! permission = "tool:crm.read:read"
//! tier = "read"
//! record-headers = ["x-request-id"]
//! record-input = ["/account"]      # JSON Pointers into the request body
//! record-output = ["/status"]      # ... into the answer's body
//! redact = ["/account/owner"]      # hidden inside recorded fields
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_core::{Permission, RiskTier};
use serde::Deserialize;

use crate::error::ConfigError;
use crate::record::{Recording, pointers};

/// The JSON Pointers of a route's or tool's `record-input`,
/// `record-output` and `redact`, checked; `Err` names the key.
fn recording(
    input: &[String],
    output: &[String],
    redact: &[String],
    f: &dyn Fn(&str) -> String,
) -> Result<Recording, (String, String)> {
    Ok(Recording {
        headers: Vec::new(),
        input: pointers(input).map_err(|m| (f("record-input"), m))?,
        output: pointers(output).map_err(|m| (f("record-output"), m))?,
        redact: pointers(redact).map_err(|m| (f("redact"), m))?,
    })
}

/// The longest a revocation feed may stay silent before it is stale.
const MAX_STALE_AFTER: Duration = Duration::from_secs(300);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawConfig {
    listen: SocketAddr,
    audience: String,
    broker_url: String,
    #[serde(default)]
    spiffe_id: Option<String>,
    spool: PathBuf,
    #[serde(default)]
    durable_reads: bool,
    #[serde(default)]
    policies: Option<PathBuf>,
    #[serde(default)]
    digest_key_file: Option<PathBuf>,
    #[serde(default)]
    revocation: RawRevocation,
    upstreams: BTreeMap<String, RawUpstream>,
    #[serde(default)]
    routes: Vec<RawRoute>,
    #[serde(default)]
    mcp: Vec<RawMcp>,
    #[serde(default)]
    approval: RawApproval,
    /// The process settings (`baton gateway` flags: socket, ready-file,
    /// ops-listen, ...), read and checked by the CLI, not by this crate;
    /// they take effect at start (a SIGHUP does not apply them).
    #[serde(default, rename = "process")]
    _process: Option<toml::Table>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawApproval {
    #[serde(default)]
    tiers: Vec<String>,
    #[serde(default)]
    ttl: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawMcp {
    path: String,
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    allow_methods: Vec<String>,
    tools: Vec<RawMcpTool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawMcpTool {
    name: String,
    resource: String,
    permission: String,
    tier: String,
    #[serde(default)]
    approval: bool,
    #[serde(default)]
    record_input: Vec<String>,
    #[serde(default)]
    record_output: Vec<String>,
    #[serde(default)]
    redact: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRevocation {
    #[serde(default)]
    stale_after: Option<String>,
    #[serde(default)]
    read_allows_stale: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawUpstream {
    url: String,
    #[serde(default)]
    http2: bool,
    #[serde(default)]
    spiffe_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawRoute {
    method: String,
    path: String,
    #[serde(default)]
    upstream: Option<String>,
    tool: String,
    resource: String,
    permission: String,
    tier: String,
    #[serde(default)]
    record_headers: Vec<String>,
    #[serde(default)]
    record_input: Vec<String>,
    #[serde(default)]
    record_output: Vec<String>,
    #[serde(default)]
    redact: Vec<String>,
    #[serde(default)]
    approval: bool,
    #[serde(default)]
    approval_ttl: Option<String>,
}

/// A checked gateway configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    /// The audience the gateway serves: tokens must name it.
    pub audience: String,
    /// The broker's HTTPS URL (JWT keys, revocation feed, call reports).
    pub broker_url: String,
    /// Which of the process's SVIDs the gateway uses.
    pub spiffe_id: Option<String>,
    /// Spool for call reports not yet delivered to the broker.
    pub spool: PathBuf,
    /// A read-tier call's answer waits until its record is durable in the
    /// spool (sensitive tiers always do, before the call is forwarded).
    /// Off by default: the record goes to the spool's next group commit.
    pub durable_reads: bool,
    /// Cedar policies (schema + *.cedar); the CLI's default when absent.
    pub policies: Option<PathBuf>,
    /// The key of the HMAC digests of calls' inputs and outputs in the
    /// audit log (default: `digest.key` in the spool, made at first start).
    pub digest_key_file: Option<PathBuf>,
    /// Every call is denied once the feed has been silent this long
    /// (read-tier calls too, unless `read_allows_stale`).
    pub stale_after: Duration,
    pub read_allows_stale: bool,
    pub upstreams: BTreeMap<String, Upstream>,
    pub routes: Vec<Route>,
    /// MCP endpoints (Streamable HTTP), each authorized per tool call.
    pub mcp: Vec<McpEndpoint>,
    /// How long a held call's approval may wait for a decision, then to
    /// be used.
    pub approval_ttl: Duration,
    /// Follow the revocation feed in this Redis instead of the broker's
    /// (no call to the broker per feed poll). Not a key of the file: a
    /// process setting (`baton gateway --redis`, `[process] redis`), set
    /// by the caller after [`Config::load`].
    pub redis: Option<baton_revocation::RedisConfig>,
}

/// JSON-RPC methods every MCP endpoint passes on without a tool check:
/// the handshake, liveness and notifications (`notifications/...`).
/// `tools/list` and `tools/call` are always handled; anything else
/// (resources, prompts, ...) is refused unless listed in `allow-methods`.
pub const MCP_BASE_METHODS: [&str; 2] = ["initialize", "ping"];

/// An MCP endpoint: JSON-RPC over Streamable HTTP at one path.
#[derive(Debug, Clone)]
pub struct McpEndpoint {
    /// The exact request path, e.g. `/mcp`.
    pub path: String,
    pub upstream: String,
    /// Further JSON-RPC methods passed on (besides [`MCP_BASE_METHODS`]).
    pub allow_methods: Vec<String>,
    /// The tools callable through the gateway; a call of any other tool
    /// is refused and `tools/list` never shows it.
    pub tools: Vec<McpTool>,
}

/// One MCP tool as the gateway enforces it.
#[derive(Debug, Clone)]
pub struct McpTool {
    pub name: String,
    /// With `{arg}` filled from the call's arguments.
    resource: String,
    pub permission: Permission,
    pub tier: RiskTier,
    /// Each call waits for a human's approval (`baton approve`).
    pub approval: bool,
    /// Fields of its arguments (`record-input`) and result
    /// (`record-output`) kept in clear text in the audit log.
    pub record: Recording,
}

impl McpTool {
    /// Whether the resource depends on the call's arguments.
    pub fn resource_is_static(&self) -> bool {
        !self.resource.contains('{')
    }

    /// The resource for a call with `arguments`, or which argument is
    /// missing or not a plain string or number.
    pub fn resource_for(
        &self,
        arguments: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<String, String> {
        let mut captures = Vec::new();
        let mut rest = self.resource.as_str();
        while let Some(open) = rest.find('{') {
            let after = rest.get(open + 1..).unwrap_or_default();
            let close = after.find('}').unwrap_or(after.len());
            let name = after.get(..close).unwrap_or_default();
            let value = match arguments.get(name) {
                Some(serde_json::Value::String(v)) => v.clone(),
                // Only integers, in their one spelling: `42.0` and `4.2e1`
                // would name a resource other than `42` to the policy, and
                // the same record to an upstream that reads a number.
                Some(serde_json::Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                    (Some(u), _) => u.to_string(),
                    (None, Some(i)) => i.to_string(),
                    (None, None) => {
                        return Err(format!(
                            "argument {name:?} must be an integer when it is a number (got {n}: a fraction or an exponent would name one resource several ways)"
                        ));
                    }
                },
                Some(_) => return Err(format!("argument {name:?} must be a string or a number")),
                None => return Err(format!("argument {name:?} is required")),
            };
            if value.is_empty() || value.contains(['{', '}']) || value.chars().any(char::is_control)
            {
                return Err(format!("argument {name:?} is not a usable resource name"));
            }
            // Text an upstream may trim or read as a number (` 42`, `+42`,
            // `042`, `4.2e1`) names, to the policy, a resource other than
            // `42`.
            if value.trim() != value {
                return Err(format!(
                    "argument {name:?} is not a usable resource name (leading or trailing space)"
                ));
            }
            if !one_spelling(&value) {
                return Err(format!(
                    "argument {name:?} reads as a number but is not written as an integer's one spelling (got {value:?}); a policy would see another resource than a server that reads the number"
                ));
            }
            captures.push((name, value));
            rest = after.get(close + 1..).unwrap_or_default();
        }
        Ok(fill(&self.resource, &captures))
    }

    /// The resource as configured (with any `{arg}` unfilled).
    pub fn resource_template(&self) -> &str {
        &self.resource
    }
}

/// Where requests are forwarded.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The base of each request's URL, without a trailing slash:
    /// `http://` on a loopback address, `https://` anywhere, or
    /// `http://localhost` for a Unix socket.
    pub url: String,
    /// HTTP/2 with prior knowledge (h2c) instead of HTTP/1.1 (plain
    /// upstreams); over TLS, ALPN decides.
    pub http2: bool,
    pub transport: Transport,
}

/// How the gateway reaches an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transport {
    /// Plain HTTP on a loopback address.
    Loopback,
    /// HTTPS with mutual TLS: the gateway presents its SVID and accepts
    /// only a server with exactly this SPIFFE ID (in the gateway's bundle).
    Mtls(baton_core::SpiffeId),
    /// Plain HTTP over a Unix socket.
    Unix(PathBuf),
}

/// One path segment of a route's pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Literal(String),
    /// `{name}`: exactly one segment.
    Capture(String),
    /// `{name*}` (last): the rest of the path, one segment or more.
    Rest(String),
}

/// A route: the requests it matches and the tool they call.
#[derive(Debug, Clone)]
pub struct Route {
    pub method: http::Method,
    pub path: String,
    segments: Vec<Segment>,
    pub upstream: String,
    pub tool: String,
    /// The resource, with `{name}` filled from the path.
    resource: String,
    pub permission: Permission,
    pub tier: RiskTier,
    /// What of its calls is kept in clear text in the audit log
    /// (`record-headers`, `record-input`, `record-output`, `redact`).
    pub record: Recording,
    /// Each call waits for a human's approval (the route's own setting,
    /// or its tier is in `[approval] tiers`).
    pub approval: bool,
    /// This route's approval lifetime, instead of `[approval] ttl`.
    pub approval_ttl: Option<Duration>,
}

/// A request matched to its route.
#[derive(Debug)]
pub struct Matched<'a> {
    pub route: &'a Route,
    pub resource: String,
    /// The path as the gateway read it (each segment percent-decoded, then
    /// re-encoded one way): what the upstream is sent, so that it cannot
    /// read another path than the one the call was decided on.
    pub path: String,
}

impl Route {
    /// The names of the path's captures the resource is taken from
    /// (`{account}` in `dataset:crm/{account}`).
    pub fn resource_captures(&self) -> Vec<&str> {
        self.segments
            .iter()
            .filter_map(|s| match s {
                Segment::Capture(n) | Segment::Rest(n) => Some(n.as_str()),
                Segment::Literal(_) => None,
            })
            .filter(|n| self.resource.contains(&format!("{{{n}}}")))
            .collect()
    }
}

impl Config {
    /// Reads and checks `path`; every error names the file and the field.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_owned(),
            field: String::new(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(path, &text)
    }

    /// Checks `text` as the contents of `file` (named in errors).
    pub fn parse(file: &Path, text: &str) -> Result<Self, ConfigError> {
        let err = |field: &str, message: String| ConfigError {
            file: file.to_owned(),
            field: field.to_owned(),
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let at = e
                .span()
                .map(|s| {
                    let before = text.get(..s.start).unwrap_or_default();
                    let line = before.matches('\n').count() + 1;
                    let col = before.rsplit('\n').next().map_or(0, str::len) + 1;
                    format!("line {line}, column {col}: ")
                })
                .unwrap_or_default();
            err("", format!("{at}{}", e.message().trim()))
        })?;
        if raw.audience.trim().is_empty() || raw.audience.chars().any(char::is_whitespace) {
            return Err(err(
                "audience",
                "must be a non-empty name without spaces".into(),
            ));
        }
        if baton_verify::broker_urls(&raw.broker_url).is_err() {
            return Err(err(
                "broker-url",
                format!(
                    "{:?}: the broker is reached over https:// (several brokers: https://a:8443,https://b:8443)",
                    raw.broker_url
                ),
            ));
        }
        if let Some(id) = &raw.spiffe_id {
            baton_core::SpiffeId::parse(id).map_err(|e| err("spiffe-id", e.to_string()))?;
        }
        let stale_after = match &raw.revocation.stale_after {
            None => Duration::from_secs(5),
            Some(s) => parse_duration(s).map_err(|m| err("revocation.stale-after", m))?,
        };
        if stale_after.is_zero() || stale_after > MAX_STALE_AFTER {
            return Err(err(
                "revocation.stale-after",
                format!(
                    "must be more than 0 s and at most {} s",
                    MAX_STALE_AFTER.as_secs()
                ),
            ));
        }
        let mut approval_tiers = Vec::new();
        for t in &raw.approval.tiers {
            approval_tiers.push(parse_tier(t).map_err(|m| err("approval.tiers", m))?);
        }
        let approval_ttl = match &raw.approval.ttl {
            None => Duration::from_secs(600),
            Some(s) => parse_duration(s).map_err(|m| err("approval.ttl", m))?,
        };
        if approval_ttl < Duration::from_secs(1) || approval_ttl > Duration::from_secs(24 * 3600) {
            return Err(err(
                "approval.ttl",
                "must be at least 1 s and at most 24 h".into(),
            ));
        }
        if raw.upstreams.is_empty() {
            return Err(err("upstreams", "at least one upstream is needed".into()));
        }
        let mut upstreams = BTreeMap::new();
        for (name, u) in raw.upstreams {
            let field = format!("upstreams.{name}.url");
            let (url, transport) =
                check_upstream_url(&u.url, u.spiffe_id.as_deref()).map_err(|(f, m)| {
                    err(
                        &if f == "url" {
                            field.clone()
                        } else {
                            format!("upstreams.{name}.{f}")
                        },
                        m,
                    )
                })?;
            upstreams.insert(
                name,
                Upstream {
                    url,
                    http2: u.http2,
                    transport,
                },
            );
        }
        if raw.routes.is_empty() && raw.mcp.is_empty() {
            return Err(err(
                "routes",
                "at least one route or [[mcp]] endpoint is needed (requests on no route are refused)"
                    .into(),
            ));
        }
        let mut routes: Vec<Route> = Vec::with_capacity(raw.routes.len());
        for (i, r) in raw.routes.into_iter().enumerate() {
            let f = |name: &str| format!("routes[{i}].{name}");
            let method = parse_method(&r.method).map_err(|m| err(&f("method"), m))?;
            let segments = parse_pattern(&r.path).map_err(|m| err(&f("path"), m))?;
            let upstream =
                pick_upstream(r.upstream, &upstreams).map_err(|m| err(&f("upstream"), m))?;
            check_tool_name(&r.tool).map_err(|m| err(&f("tool"), m))?;
            check_resource(&r.resource, &segments).map_err(|m| err(&f("resource"), m))?;
            let permission = Permission::parse(&r.permission)
                .map_err(|e| err(&f("permission"), e.to_string()))?;
            let tier = parse_tier(&r.tier).map_err(|m| err(&f("tier"), m))?;
            let approval_ttl = match &r.approval_ttl {
                None => None,
                Some(s) => {
                    let d = parse_duration(s).map_err(|m| err(&f("approval-ttl"), m))?;
                    if d < Duration::from_secs(1) || d > Duration::from_secs(24 * 3600) {
                        return Err(err(
                            &f("approval-ttl"),
                            "must be at least 1 s and at most 24 h".into(),
                        ));
                    }
                    Some(d)
                }
            };
            let mut record_headers = Vec::new();
            if r.record_headers.len() > crate::record::MAX_POINTERS {
                return Err(err(
                    &f("record-headers"),
                    format!("at most {} entries", crate::record::MAX_POINTERS),
                ));
            }
            for h in &r.record_headers {
                if h.len() > crate::record::MAX_NAME {
                    return Err(err(
                        &f("record-headers"),
                        format!("{h:?} is over {} bytes", crate::record::MAX_NAME),
                    ));
                }
                let name = http::HeaderName::from_bytes(h.as_bytes()).map_err(|_| {
                    err(&f("record-headers"), format!("{h:?} is not a header name"))
                })?;
                if name.as_str().contains('_') {
                    return Err(err(
                        &f("record-headers"),
                        format!(
                            "{h:?} has an underscore: the gateway refuses such headers, so none would be recorded"
                        ),
                    ));
                }
                if name == http::header::AUTHORIZATION
                    || name == http::header::COOKIE
                    || name == http::header::PROXY_AUTHORIZATION
                {
                    return Err(err(
                        &f("record-headers"),
                        format!("{h:?} carries credentials and is never recorded"),
                    ));
                }
                // What is recorded (and shown to an approver) is what the
                // upstream gets: a header the gateway strips from every
                // request would be recorded as the caller sent it while
                // the upstream never saw it.
                if crate::gateway::never_forwarded(name.as_str()) {
                    return Err(err(
                        &f("record-headers"),
                        format!(
                            "{h:?} is never forwarded to the upstream (the gateway strips it from every request), so recording it would show what the upstream never gets"
                        ),
                    ));
                }
                record_headers.push(name);
            }
            let record = Recording {
                headers: record_headers,
                ..recording(&r.record_input, &r.record_output, &r.redact, &f)
                    .map_err(|(k, m)| err(&k, m))?
            };
            if let Some(j) = routes
                .iter()
                .position(|o| o.method == method && same_shape(&o.segments, &segments))
            {
                return Err(err(
                    &f("path"),
                    format!("{} {} is already routes[{j}]", method, r.path),
                ));
            }
            routes.push(Route {
                method,
                path: r.path,
                segments,
                upstream,
                tool: r.tool,
                resource: r.resource,
                permission,
                tier,
                record,
                approval: r.approval || approval_tiers.contains(&tier),
                approval_ttl,
            });
        }
        let mut mcp: Vec<McpEndpoint> = Vec::with_capacity(raw.mcp.len());
        for (i, m) in raw.mcp.into_iter().enumerate() {
            let f = |name: &str| format!("mcp[{i}].{name}");
            let segments = parse_pattern(&m.path).map_err(|e| err(&f("path"), e))?;
            if segments.iter().any(|s| !matches!(s, Segment::Literal(_))) {
                return Err(err(
                    &f("path"),
                    format!("{:?}: an exact path, no captures", m.path),
                ));
            }
            if mcp.iter().any(|o| o.path == m.path) {
                return Err(err(
                    &f("path"),
                    format!("{:?} is already an [[mcp]] endpoint", m.path),
                ));
            }
            let upstream =
                pick_upstream(m.upstream, &upstreams).map_err(|e| err(&f("upstream"), e))?;
            for method in &m.allow_methods {
                if method.is_empty()
                    || method == "tools/call"
                    || method == "tools/list"
                    || !method
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "/_-.".contains(c))
                {
                    return Err(err(
                        &f("allow-methods"),
                        format!(
                            "{method:?}: a JSON-RPC method name other than tools/call and tools/list (always checked)"
                        ),
                    ));
                }
            }
            if m.tools.is_empty() {
                return Err(err(&f("tools"), "at least one tool is needed".into()));
            }
            let mut tools: Vec<McpTool> = Vec::with_capacity(m.tools.len());
            for (j, t) in m.tools.into_iter().enumerate() {
                let g = |name: &str| format!("mcp[{i}].tools[{j}].{name}");
                check_tool_name(&t.name).map_err(|e| err(&g("name"), e))?;
                if tools.iter().any(|o| o.name == t.name) {
                    return Err(err(&g("name"), format!("{:?} is listed twice", t.name)));
                }
                check_argument_resource(&t.resource).map_err(|e| err(&g("resource"), e))?;
                let permission = Permission::parse(&t.permission)
                    .map_err(|e| err(&g("permission"), e.to_string()))?;
                let tier = parse_tier(&t.tier).map_err(|e| err(&g("tier"), e))?;
                let record = recording(&t.record_input, &t.record_output, &t.redact, &g)
                    .map_err(|(k, m)| err(&k, m))?;
                tools.push(McpTool {
                    name: t.name,
                    resource: t.resource,
                    permission,
                    tier,
                    approval: t.approval || approval_tiers.contains(&tier),
                    record,
                });
            }
            mcp.push(McpEndpoint {
                path: m.path,
                upstream,
                allow_methods: m.allow_methods,
                tools,
            });
        }
        if let Some((i, r)) = routes.iter().enumerate().find(|(_, r)| {
            mcp.iter().any(|m| {
                split_request_path(&m.path).is_some_and(|p| {
                    let p: Vec<&str> = p.iter().map(String::as_str).collect();
                    match_segments(&r.segments, &p).is_some()
                })
            })
        }) {
            return Err(err(
                &format!("routes[{i}].path"),
                format!("{} also matches an [[mcp]] endpoint's path", r.path),
            ));
        }
        Ok(Config {
            listen: raw.listen,
            audience: raw.audience,
            broker_url: raw.broker_url.trim_end_matches('/').to_owned(),
            spiffe_id: raw.spiffe_id,
            spool: raw.spool,
            durable_reads: raw.durable_reads,
            policies: raw.policies,
            digest_key_file: raw.digest_key_file,
            stale_after,
            read_allows_stale: raw.revocation.read_allows_stale,
            upstreams,
            routes,
            mcp,
            approval_ttl,
            redis: None,
        })
    }

    /// The MCP endpoint at exactly `path`, if any.
    pub fn mcp_endpoint(&self, path: &str) -> Option<&McpEndpoint> {
        self.mcp.iter().find(|m| m.path == path)
    }

    /// The route for a request, or None (the request is refused). Each
    /// segment is percent-decoded before it is matched and captured, so
    /// `/accounts/expor%74` is `/accounts/export` here as at the upstream.
    /// Paths that an upstream could read differently from the gateway
    /// (dot segments, empty segments, segments that decode to a slash, a
    /// dot segment, a backslash, a control character or a `;`, invalid
    /// escapes) match no route, nor does a value the resource is taken
    /// from that ends in a format suffix (`acme.json`, but for a rest
    /// capture: a file's path). Where several routes match, the most
    /// specific wins, segment by segment from the left: a literal over a
    /// capture over the rest (so `/accounts/export` is never taken by
    /// `/accounts/{id}`, whatever their order in the file).
    pub fn route(&self, method: &http::Method, path: &str) -> Option<Matched<'_>> {
        let segments = split_request_path(path)?;
        let refs: Vec<&str> = segments.iter().map(String::as_str).collect();
        let same_method = || self.routes.iter().filter(|r| r.method == *method);
        let (route, captures) = same_method()
            .filter_map(|r| Some((r, match_segments(&r.segments, &refs)?)))
            .max_by(|(a, _), (b, _)| specificity(&a.segments).cmp(&specificity(&b.segments)))?;
        // A captured segment that another route names as a literal, but
        // for a suffix (`export.json`: Rails' `.:format`, Spring's suffix
        // match), is that literal route to some upstreams: ambiguous.
        // A rest capture takes every segment from its own on: each later
        // one is checked against the literals of other routes as long as
        // the request (a suffix is read on the last segment only).
        let captured = route
            .segments
            .iter()
            .enumerate()
            .flat_map(|(i, seg)| match seg {
                Segment::Capture(_) => i..i + 1,
                Segment::Rest(_) => i..refs.len().max(i + 1),
                _ => i..i,
            });
        for i in captured {
            let value = refs.get(i)?;
            let stem = value.split('.').next().unwrap_or(value);
            let beyond_route = i >= route.segments.len();
            let shadows = same_method().any(|other| {
                (!beyond_route || other.segments.len() == refs.len())
                    && matches!(other.segments.get(i), Some(Segment::Literal(l)) if same_folded(l, stem))
                    && other.segments.iter().take(i).zip(&refs).all(|(o, p)| match o {
                        Segment::Literal(l) => same_folded(l, p),
                        _ => true,
                    })
            });
            if shadows {
                return None;
            }
        }
        // A captured value the resource names has one spelling, as an MCP
        // argument does (`/accounts/042`, `/accounts/42%20`,
        // `/accounts/42.json` are not `/accounts/42` to a policy); each
        // segment a rest capture takes, as each is a value to an upstream.
        if captures.iter().any(|(n, v)| {
            route.resource.contains(&format!("{{{n}}}")) && !v.split('/').all(one_spelling)
        }) {
            return None;
        }
        // A one-segment capture the resource names, ending in a format
        // suffix (`acme.json`), is another record to an upstream that
        // takes the suffix for a format (Rails' `/:id(.:format)` reads id
        // `acme`, format `json`; Django REST framework's format suffixes,
        // Spring's suffix match), while the policy would see
        // `dataset:crm/acme.json`: a `forbid` on `dataset:crm/acme` would
        // not apply. A rest capture is a file's path, whose extension is
        // part of its name, so it is not refused for one.
        let suffixed = |name: &str| {
            captures
                .iter()
                .any(|(n, v)| *n == name && format_suffixed(v))
        };
        if route.segments.iter().any(|s| {
            matches!(s, Segment::Capture(n)
                if route.resource.contains(&format!("{{{n}}}")) && suffixed(n))
        }) {
            return None;
        }
        Some(Matched {
            route,
            resource: fill(&route.resource, &captures),
            path: canonical_path(&route.segments, &segments),
        })
    }
}

/// Whether `value` ends in what frameworks read as a format suffix: a
/// `.` then 1 to 10 ASCII letters or digits (`.json`, `.XML`, `.csv`,
/// `.v2`).
fn format_suffixed(value: &str) -> bool {
    value.rsplit_once('.').is_some_and(|(_, suffix)| {
        (1..=10).contains(&suffix.len()) && suffix.bytes().all(|b| b.is_ascii_alphanumeric())
    })
}

/// Whether `value` names its resource one way only, since an upstream
/// that reads a number, or trims, serves the same record for every
/// spelling while a policy (Cedar compares resource names exactly) would
/// see as many resources. Refused:
/// - leading or trailing whitespace, Unicode's (NBSP, ideographic space)
///   included: Python's `int()`, .NET's `int.Parse` and many stores trim;
/// - text that reads as a number (to Python's `int()` or `float()`, or
///   Rust's `f64`: `042`, `-0`, `+42`, `42.0`, `4.2e1`, `0x2a`, `4_2`,
///   fullwidth `４２`, Arabic-Indic `٤٢`), unless it is an integer's
///   canonical ASCII decimal spelling (`42`);
/// - text whose part before its first `.` reads as a number, unless the
///   whole is that canonical spelling (`42.json`: Rails reads id 42,
///   format json; `042.x`).
///
/// Other text passes: `acme`, `acct-042`, `v1.2`, `2024-05-01`, a UUID
/// (an MCP argument is JSON, with no format suffix to read; a path
/// capture is also refused one: see [`Config::route`]).
pub(crate) fn one_spelling(value: &str) -> bool {
    if value.trim() != value {
        return false;
    }
    if value.parse::<i128>().is_ok_and(|n| n.to_string() == value) {
        return true;
    }
    let stem = value.split('.').next().unwrap_or(value);
    !number_like(value) && !number_like(stem)
}

/// Whether some parser reads `text` as a number: surrounding whitespace
/// and a sign aside, a radix prefix (`0x`, `0o`, `0b`), what Rust's `f64`
/// reads (starting with a digit or `.`), or what Python's `int()` and
/// `float()` read: digits of any script (every char `char::is_numeric`,
/// a superset of Unicode's decimal digits), `_` among them, an optional
/// fraction and exponent.
fn number_like(text: &str) -> bool {
    let t = text.trim();
    let unsigned = t.trim_start_matches(['+', '-']);
    let radix_prefixed = ["0x", "0o", "0b"]
        .iter()
        .any(|p| unsigned.get(..2).is_some_and(|h| h.eq_ignore_ascii_case(p)));
    let rust_float =
        unsigned.starts_with(|c: char| c.is_ascii_digit() || c == '.') && t.parse::<f64>().is_ok();
    radix_prefixed || rust_float || python_number(unsigned)
}

/// Python's number grammar with digits of any script and `_` anywhere
/// among them (a sound superset of what `int()` and `float()` take):
/// digits, or digits `.` digits (either side may be empty, not both),
/// then optionally `e` or `E`, a sign and digits.
fn python_number(unsigned: &str) -> bool {
    let digits =
        |s: &str| s.chars().any(char::is_numeric) && s.chars().all(|c| c.is_numeric() || c == '_');
    let (mantissa, exponent) = match unsigned.split_once(['e', 'E']) {
        Some((m, e)) => (m, Some(e)),
        None => (unsigned, None),
    };
    let mantissa = match mantissa.split_once('.') {
        Some((int, frac)) => {
            (digits(int) || int.is_empty())
                && (digits(frac) || frac.is_empty())
                && !(int.is_empty() && frac.is_empty())
        }
        None => digits(mantissa),
    };
    mantissa && exponent.is_none_or(|e| digits(e.strip_prefix(['+', '-']).unwrap_or(e)))
}

/// The upstream a route or endpoint names, or the only one.
fn pick_upstream(
    named: Option<String>,
    upstreams: &BTreeMap<String, Upstream>,
) -> Result<String, String> {
    match named {
        Some(u) if upstreams.contains_key(&u) => Ok(u),
        Some(u) => Err(format!(
            "no upstream {u:?} (defined: {})",
            upstreams.keys().cloned().collect::<Vec<_>>().join(", ")
        )),
        None if upstreams.len() == 1 => Ok(upstreams.keys().next().cloned().unwrap_or_default()),
        None => Err("required when more than one upstream is defined".into()),
    }
}

fn check_tool_name(tool: &str) -> Result<(), String> {
    if tool.is_empty()
        || !tool
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
    {
        return Err(format!("{tool:?}: letters, digits and . _ - / only"));
    }
    Ok(())
}

fn parse_tier(tier: &str) -> Result<RiskTier, String> {
    tier.parse()
        .map_err(|_| format!("{tier:?}: one of read, write, delete, purchase, export"))
}

/// An MCP tool's resource: `{name}` placeholders name arguments.
fn check_argument_resource(resource: &str) -> Result<(), String> {
    if resource.trim().is_empty() {
        return Err("must not be empty".into());
    }
    let mut rest = resource;
    while let Some(open) = rest.find('{') {
        let after = rest.get(open + 1..).unwrap_or_default();
        let Some(close) = after.find('}') else {
            return Err(format!("{resource:?}: unclosed {{"));
        };
        let name = after.get(..close).unwrap_or_default();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("{resource:?}: {{{name}}} is not an argument name"));
        }
        rest = after.get(close + 1..).unwrap_or_default();
    }
    if rest.contains('}') {
        return Err(format!("{resource:?}: unmatched }}"));
    }
    Ok(())
}

/// Whether two patterns match the same paths (capture names aside).
fn same_shape(a: &[Segment], b: &[Segment]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (Segment::Literal(l), Segment::Literal(m)) => l.eq_ignore_ascii_case(m),
            (Segment::Capture(_), Segment::Capture(_)) | (Segment::Rest(_), Segment::Rest(_)) => {
                true
            }
            _ => false,
        })
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, ""), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: a whole number with a unit, e.g. \"5s\""))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n.saturating_mul(60))),
        _ => Err(format!("{s:?}: the unit is ms, s or m, e.g. \"5s\"")),
    }
}

fn parse_method(m: &str) -> Result<http::Method, String> {
    const METHODS: [&str; 7] = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"];
    if METHODS.contains(&m) {
        http::Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string())
    } else {
        Err(format!("{m:?}: one of {}", METHODS.join(", ")))
    }
}

/// An upstream's URL and SPIFFE ID: `http://HOST:PORT[/prefix]` on a
/// loopback address, `https://...` with the server's SPIFFE ID, or
/// `unix:/absolute/path`. An error names the field (`url` or `spiffe-id`).
fn check_upstream_url(
    url: &str,
    spiffe_id: Option<&str>,
) -> Result<(String, Transport), (&'static str, String)> {
    if let Some(path) = url.strip_prefix("unix:") {
        if spiffe_id.is_some() {
            return Err(("spiffe-id", "only for an https:// upstream".into()));
        }
        let path = PathBuf::from(path);
        if !path.is_absolute() || path.as_os_str().len() > 100 {
            return Err((
                "url",
                format!("{url:?}: unix: and an absolute socket path (at most 100 bytes)"),
            ));
        }
        return Ok(("http://localhost".into(), Transport::Unix(path)));
    }
    if let Some(rest) = url.strip_prefix("https://") {
        let Some(id) = spiffe_id else {
            return Err((
                "spiffe-id",
                format!(
                    "{url:?}: an https:// upstream needs the SPIFFE ID its certificate must carry"
                ),
            ));
        };
        let id = baton_core::SpiffeId::parse(id).map_err(|e| ("spiffe-id", e.to_string()))?;
        let (_, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if path.contains(['?', '#']) {
            return Err(("url", format!("{url:?}: no query or fragment")));
        }
        reqwest::Url::parse(url).map_err(|e| ("url", format!("{url:?}: {e}")))?;
        return Ok((url.trim_end_matches('/').to_owned(), Transport::Mtls(id)));
    }
    if spiffe_id.is_some() {
        return Err(("spiffe-id", "only for an https:// upstream".into()));
    }
    check_loopback_url(url)
        .map(|u| (u, Transport::Loopback))
        .map_err(|m| ("url", m))
}

/// `http://HOST:PORT[/prefix]` on a loopback address.
fn check_loopback_url(url: &str) -> Result<String, String> {
    let Some(rest) = url.strip_prefix("http://") else {
        return Err(format!(
            "{url:?}: http:// on a loopback address, https:// with spiffe-id, or unix:/path"
        ));
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    if path.contains(['?', '#']) {
        return Err(format!("{url:?}: no query or fragment"));
    }
    let host = if let Some(v6) = authority.strip_prefix('[') {
        v6.split(']').next().unwrap_or_default()
    } else {
        authority.split(':').next().unwrap_or_default()
    };
    let loopback = host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
    if !loopback {
        return Err(format!(
            "{url:?}: a plain http:// upstream must be on a loopback address (127.0.0.1, [::1], localhost)"
        ));
    }
    reqwest::Url::parse(url).map_err(|e| format!("{url:?}: {e}"))?;
    Ok(url.trim_end_matches('/').to_owned())
}

fn parse_pattern(p: &str) -> Result<Vec<Segment>, String> {
    let Some(rest) = p.strip_prefix('/') else {
        return Err(format!("{p:?}: starts with /"));
    };
    if rest.is_empty() {
        return Ok(Vec::new());
    }
    let parts: Vec<&str> = rest.split('/').collect();
    let mut out = Vec::with_capacity(parts.len());
    let last = parts.len() - 1;
    for (i, s) in parts.iter().enumerate() {
        if let Some(inner) = s.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            let (name, rest) = match inner.strip_suffix('*') {
                Some(n) => (n, true),
                None => (inner, false),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("{p:?}: {{{inner}}} is not a capture name"));
            }
            if out
                .iter()
                .any(|o| matches!(o, Segment::Capture(n) | Segment::Rest(n) if n == name))
            {
                return Err(format!("{p:?}: {{{name}}} appears twice"));
            }
            if rest && i != last {
                return Err(format!("{p:?}: {{{inner}}} must be the last segment"));
            }
            out.push(if rest {
                Segment::Rest(name.to_owned())
            } else {
                Segment::Capture(name.to_owned())
            });
        } else if s.is_empty()
            || *s == "."
            || *s == ".."
            || s.contains(['{', '}', '%', '\\', '?', '#', ';'])
        {
            return Err(format!("{p:?}: segment {s:?} is not a plain literal"));
        } else {
            out.push(Segment::Literal((*s).to_owned()));
        }
    }
    Ok(out)
}

/// The resource may use the path's captures, and nothing else.
fn check_resource(resource: &str, segments: &[Segment]) -> Result<(), String> {
    if resource.trim().is_empty() {
        return Err("must not be empty".into());
    }
    let mut rest = resource;
    while let Some(open) = rest.find('{') {
        let after = rest.get(open + 1..).unwrap_or_default();
        let Some(close) = after.find('}') else {
            return Err(format!("{resource:?}: unclosed {{"));
        };
        let name = after.get(..close).unwrap_or_default();
        if !segments
            .iter()
            .any(|s| matches!(s, Segment::Capture(n) | Segment::Rest(n) if n == name))
        {
            return Err(format!(
                "{resource:?}: {{{name}}} is not captured by the path"
            ));
        }
        rest = after.get(close + 1..).unwrap_or_default();
    }
    if rest.contains('}') {
        return Err(format!("{resource:?}: unmatched }}"));
    }
    Ok(())
}

/// A request path's segments, each percent-decoded, or None for a path
/// the gateway does not route (ambiguous for an upstream).
fn split_request_path(path: &str) -> Option<Vec<String>> {
    let rest = path.strip_prefix('/')?;
    if rest.is_empty() {
        return Some(Vec::new());
    }
    rest.split('/').map(decode_segment).collect()
}

/// One segment, decoded; None when an upstream could read it otherwise:
/// empty, a dot segment, an invalid escape or UTF-8, or holding a slash,
/// a backslash, a `;` (path parameters: `..;` is `..` to some servers), a
/// control character or a dot segment once decoded.
fn decode_segment(raw: &str) -> Option<String> {
    let bytes = raw.as_bytes();
    for (i, b) in bytes.iter().enumerate() {
        if *b == b'%'
            && !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
        {
            return None;
        }
    }
    let decoded = percent_encoding::percent_decode_str(raw)
        .decode_utf8()
        .ok()?
        .into_owned();
    // A `%` left after decoding was sent encoded twice (`%252e%252e`): an
    // upstream that decodes its parameter again would read `..` or `/`.
    let unsafe_char = |c: char| matches!(c, '/' | '\\' | ';' | '%') || c.is_control();
    if decoded.is_empty() || decoded == "." || decoded == ".." || decoded.contains(unsafe_char) {
        return None;
    }
    Some(decoded)
}

/// What a path segment keeps unescaped: RFC 3986's unreserved characters
/// and the sub-delimiters other than `;`, plus `:` and `@`.
const SEGMENT_ESCAPED: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~')
    .remove(b'!')
    .remove(b'$')
    .remove(b'&')
    .remove(b'\'')
    .remove(b'(')
    .remove(b')')
    .remove(b'*')
    .remove(b'+')
    .remove(b',')
    .remove(b'=')
    .remove(b':')
    .remove(b'@');

/// The matched path as one string: the route's literals in its own
/// spelling, the captured segments (decoded) escaped one way.
fn canonical_path(pattern: &[Segment], segments: &[String]) -> String {
    let mut out = String::new();
    for (i, s) in segments.iter().enumerate() {
        out.push('/');
        match pattern.get(i) {
            Some(Segment::Literal(l)) => out.push_str(l),
            _ => out.extend(percent_encoding::utf8_percent_encode(s, SEGMENT_ESCAPED)),
        }
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// How specific a route's pattern is, compared from the left: a literal
/// over a capture over the rest of the path.
fn specificity(pattern: &[Segment]) -> Vec<u8> {
    pattern
        .iter()
        .map(|s| match s {
            Segment::Literal(_) => 2,
            Segment::Capture(_) => 1,
            Segment::Rest(_) => 0,
        })
        .collect()
}

fn match_segments<'p>(pattern: &'p [Segment], path: &[&str]) -> Option<Vec<(&'p str, String)>> {
    let mut captures = Vec::new();
    for (i, seg) in pattern.iter().enumerate() {
        match seg {
            // Without case: some upstreams (Express, ASP.NET Core) route
            // `/EXPORT` to `/export`; the literal's own spelling goes on.
            Segment::Literal(l) => {
                if !path.get(i)?.eq_ignore_ascii_case(l) {
                    return None;
                }
            }
            Segment::Capture(n) => captures.push((n.as_str(), (*path.get(i)?).to_owned())),
            Segment::Rest(n) => {
                let rest = path.get(i..).filter(|r| !r.is_empty())?;
                captures.push((n.as_str(), rest.join("/")));
                return Some(captures);
            }
        }
    }
    (path.len() == pattern.len()).then_some(captures)
}

/// The template with each `{name}` replaced by its capture, in one pass:
/// a captured value is never read as a template itself (a segment that
/// decodes to `{doc}` stays `{doc}`).
fn fill(template: &str, captures: &[(&str, String)]) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        out.push_str(rest.get(..open).unwrap_or_default());
        let after = rest.get(open + 1..).unwrap_or_default();
        let Some(close) = after.find('}') else {
            out.push_str(rest.get(open..).unwrap_or_default());
            return out;
        };
        let name = after.get(..close).unwrap_or_default();
        match captures.iter().find(|(n, _)| *n == name) {
            Some((_, value)) => out.push_str(value),
            None => {
                out.push('{');
                out.push_str(name);
                out.push('}');
            }
        }
        rest = after.get(close + 1..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

/// Whether two path segments are one to an upstream matching literals
/// without case: ASCII case, and Unicode's (Spring's case-insensitive
/// matching reads `ſettings` as `settings`, Java folding `ſ` to `S`).
fn same_folded(a: &str, b: &str) -> bool {
    a.eq_ignore_ascii_case(b)
        || (!(a.is_ascii() && b.is_ascii()) && crate::record::fold(a) == crate::record::fold(b))
}
#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
listen = "127.0.0.1:0"
audience = "crm"
broker-url = "https://127.0.0.1:7443"
spool = "spool"

[revocation]
stale-after = "2s"

[upstreams.crm]
url = "http://127.0.0.1:8080"

[[routes]]
method = "GET"
path = "/accounts/{account}"
tool = "crm.read"
resource = "dataset:crm/{account}"
permission = "tool:crm.read:read"
tier = "read"
record-headers = ["x-request-id"]

[[routes]]
method = "POST"
path = "/files/{rest*}"
tool = "files.write"
resource = "files:{rest}"
permission = "tool:files.write:write"
tier = "write"
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("gw.toml"), text)
    }

    /// The good file with `from` replaced by `to`; the error it gets.
    fn bad(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from}");
        let e = parse(&GOOD.replacen(from, to, 1)).expect_err(to);
        let s = e.to_string();
        assert!(s.starts_with("gw.toml"), "{s}");
        s
    }

    #[test]
    fn the_good_file_loads_and_routes() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.audience, "crm");
        assert_eq!(c.stale_after, Duration::from_secs(2));
        assert_eq!(c.routes.len(), 2);
        let m = c.route(&http::Method::GET, "/accounts/acme").unwrap();
        assert_eq!(m.route.tool, "crm.read");
        assert_eq!(m.resource, "dataset:crm/acme");
        assert_eq!(m.route.upstream, "crm");
        let m = c.route(&http::Method::POST, "/files/a/b.txt").unwrap();
        assert_eq!(m.resource, "files:a/b.txt");
        assert!(
            !c.durable_reads,
            "read answers do not wait for an fsync by default"
        );
        let c = parse(&format!("durable-reads = true\n{GOOD}")).unwrap();
        assert!(c.durable_reads);
        let e = parse(&format!("durable-reads = \"yes\"\n{GOOD}")).unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn upstreams_are_loopback_mtls_with_an_id_or_a_unix_socket() {
        let with = |upstream: &str| GOOD.replacen("url = \"http://127.0.0.1:8080\"", upstream, 1);
        let c = parse(&with(
            "url = \"https://crm.internal:9443/api/\"\nspiffe-id = \"spiffe://example.org/tools/crm\"",
        ))
        .unwrap();
        let u = &c.upstreams["crm"];
        assert_eq!(u.url, "https://crm.internal:9443/api");
        assert_eq!(
            u.transport,
            Transport::Mtls(baton_core::SpiffeId::parse("spiffe://example.org/tools/crm").unwrap())
        );
        let c = parse(&with("url = \"unix:/run/crm/http.sock\"")).unwrap();
        assert_eq!(c.upstreams["crm"].url, "http://localhost");
        assert_eq!(
            c.upstreams["crm"].transport,
            Transport::Unix(PathBuf::from("/run/crm/http.sock"))
        );
        for (bad, field) in [
            (
                "url = \"https://crm.internal:9443\"",
                "upstreams.crm.spiffe-id",
            ),
            (
                "url = \"https://crm.internal:9443\"\nspiffe-id = \"crm\"",
                "upstreams.crm.spiffe-id",
            ),
            (
                "url = \"http://127.0.0.1:1\"\nspiffe-id = \"spiffe://example.org/x\"",
                "upstreams.crm.spiffe-id",
            ),
            ("url = \"unix:run/crm.sock\"", "upstreams.crm.url"),
            (
                "url = \"unix:/run/crm.sock\"\nspiffe-id = \"spiffe://example.org/x\"",
                "upstreams.crm.spiffe-id",
            ),
            ("url = \"ftp://127.0.0.1:1\"", "upstreams.crm.url"),
        ] {
            let e = parse(&with(bad)).expect_err(bad).to_string();
            assert!(e.contains(field), "{bad}: {e}");
        }
    }

    #[test]
    fn requests_off_the_routes_match_nothing() {
        let c = parse(GOOD).unwrap();
        // Controls first.
        assert!(c.route(&http::Method::GET, "/accounts/acme").is_some());
        assert!(c.route(&http::Method::POST, "/files/x").is_some());
        for (m, p) in [
            (http::Method::POST, "/accounts/acme"),
            (http::Method::GET, "/accounts"),
            (http::Method::GET, "/accounts/acme/extra"),
            (http::Method::GET, "/accounts/"),
            (http::Method::GET, "/other"),
            (http::Method::POST, "/files"),
            (http::Method::POST, "/files/"),
            (http::Method::POST, "/files/a/../../accounts/x"),
            (http::Method::POST, "/files/./x"),
            (http::Method::POST, "/files//x"),
            (http::Method::POST, "/files/%2e%2e/x"),
            (http::Method::POST, "/files/a%2Fb"),
            (http::Method::POST, "/files/%252e%252e"),
            (http::Method::POST, "/files/a%252Fb"),
            (http::Method::GET, "/accounts/%252e%252e%252fadmin"),
            (http::Method::GET, "/accounts/100%25"),
            (http::Method::POST, "/files/a\\b"),
            (http::Method::GET, "accounts/acme"),
        ] {
            assert!(c.route(&m, p).is_none(), "{m} {p}");
        }
    }

    #[test]
    fn a_captured_resource_has_one_spelling() {
        let c = parse(GOOD).unwrap();
        let m = c.route(&http::Method::GET, "/accounts/42").unwrap();
        assert_eq!(m.resource, "dataset:crm/42");
        assert!(c.route(&http::Method::GET, "/accounts/acme-007").is_some());
        // Other spellings of 42 an upstream reading a number would serve
        // as 42, while a policy would see another resource.
        for p in [
            "/accounts/042",
            "/accounts/4%32.0",
            "/accounts/4.2e1",
            "/accounts/-0",
            // Trimmed by the upstream: an escaped space on either side, a
            // no-break or ideographic space, a tab is a control already.
            "/accounts/42%20",
            "/accounts/%2042",
            "/accounts/42%C2%A0",
            "/accounts/%E3%80%8042",
            // Rails reads id 42, format json; PHP's `(int)` and Ruby's
            // `to_i` stop at the dot.
            "/accounts/42.json",
            "/accounts/042.x",
            "/accounts/42..",
            // Python's `int()`: `_` between digits, other scripts' digits.
            "/accounts/4_2",
            "/accounts/%EF%BC%94%EF%BC%92",
            "/accounts/%D9%A4%D9%A2",
            "/accounts/%D9%A4%D9%A2.json",
        ] {
            assert!(c.route(&http::Method::GET, p).is_none(), "{p}");
        }
        // Controls: ordinary ids that hold digits, dots or dashes are one
        // spelling of themselves.
        for id in [
            "42",
            "-7",
            "0",
            "acme",
            "report-42",
            "2024-05-01",
            "3fa85f64-5717-4562-b3fc-2c963f66afa6",
            "123e4567-e89b-12d3-a456-426614174000",
            "acme%20co",
            "e5",
        ] {
            let m = c
                .route(&http::Method::GET, &format!("/accounts/{id}"))
                .unwrap_or_else(|| panic!("{id} matches no route"));
            assert_eq!(
                m.resource,
                format!("dataset:crm/{}", id.replace("%20", " "))
            );
        }
        // Each segment a rest capture takes is a value too.
        let files = &c;
        assert!(
            files
                .route(&http::Method::POST, "/files/reports/42.json")
                .is_none()
        );
        assert!(
            files
                .route(&http::Method::POST, "/files/reports%20/x")
                .is_none()
        );
        let m = files
            .route(&http::Method::POST, "/files/reports/q1.json")
            .unwrap();
        assert_eq!(m.resource, "files:reports/q1.json");
    }

    /// A format suffix on a capture the resource is taken from names, to
    /// the policy, another resource than the record Rails (`/:id(.:format)`)
    /// or a format-suffix router serves: `acme.json` is record `acme` there,
    /// so a `forbid` on `dataset:crm/acme` would be passed. Refused as any
    /// other spelling an upstream reads otherwise; a rest capture (a file's
    /// path) and a capture the resource does not take keep their suffix.
    #[test]
    fn a_format_suffix_on_a_captured_resource_matches_no_route() {
        let c = parse(GOOD).unwrap();
        let get = http::Method::GET;
        // Control: the record itself.
        let m = c.route(&get, "/accounts/acme").unwrap();
        assert_eq!(m.resource, "dataset:crm/acme");
        for p in [
            "/accounts/acme.json",
            "/accounts/acme.JSON",
            "/accounts/acme.xml",
            "/accounts/acme.csv",
            "/accounts/acme.v2",
            "/accounts/acme.tar.gz",
            "/accounts/v1.2",
            "/accounts/acme.abcdefghij",
            // Escaped, the dot or the suffix is decoded first.
            "/accounts/acme%2Ejson",
            "/accounts/acme.%6Ason",
        ] {
            assert!(c.route(&get, p).is_none(), "{p}");
        }
        // Controls: ids without a suffix, one with nothing after its dot.
        for (p, resource) in [
            ("/accounts/acme-co", "dataset:crm/acme-co"),
            ("/accounts/2024-05-01", "dataset:crm/2024-05-01"),
            ("/accounts/acme.", "dataset:crm/acme."),
        ] {
            let m = c
                .route(&get, p)
                .unwrap_or_else(|| panic!("{p} matches no route"));
            assert_eq!(m.resource, resource, "{p}");
        }
        // A rest capture is a file's path: its extension stays.
        let m = c
            .route(&http::Method::POST, "/files/reports/acme.json")
            .unwrap();
        assert_eq!(m.resource, "files:reports/acme.json");
        // A capture the resource does not take keeps its suffix.
        let docs = parse(&GOOD.replace(
            "path = \"/accounts/{account}\"\ntool = \"crm.read\"\nresource = \"dataset:crm/{account}\"",
            "path = \"/accounts/{account}/docs/{doc}\"\ntool = \"crm.read\"\nresource = \"doc:{account}\"",
        ))
        .unwrap();
        let m = docs.route(&get, "/accounts/acme/docs/q1.pdf").unwrap();
        assert_eq!(m.resource, "doc:acme");
        assert!(
            docs.route(&get, "/accounts/acme.json/docs/q1.pdf")
                .is_none()
        );
    }

    #[test]
    fn one_spelling_reads_numbers_as_python_and_rust_do() {
        for same in ["42", "-7", "0", "9223372036854775808"] {
            assert!(one_spelling(same), "{same}");
        }
        for other in [
            " 42",
            "42 ",
            "42\u{a0}",
            "\u{3000}42",
            "\u{2009}42",
            "+42",
            "042",
            "-0",
            "4_2",
            "4__2",
            "_42",
            "42_",
            "\u{ff14}\u{ff12}",
            "\u{664}\u{662}",
            "\u{966}42",
            "42.0",
            ".5",
            "4.2e1",
            "4.2E+1",
            "1e5",
            "0x2a",
            "0X2A",
            "0o52",
            "0b101010",
            "-0x2a",
            "42.json",
            "42 .json",
            "042.x",
            "\u{664}\u{662}.5",
            "\u{664}\u{662}e1",
            "4_2.json",
        ] {
            assert!(!one_spelling(other), "{other:?}");
        }
        for text in [
            "acme",
            "acme.json",
            "acct-042",
            "report-42",
            "v1.2",
            "2024-05-01",
            "e5",
            "nan",
            "inf",
            "infinity",
            "8e1e0",
            "1e",
            "42-x",
            "a 42",
            "4 2",
            "x.42",
            "3fa85f64-5717-4562-b3fc-2c963f66afa6",
            "\u{bd}x",
        ] {
            assert!(one_spelling(text), "{text:?}");
        }
    }

    #[test]
    fn escapes_are_decoded_before_matching_and_the_most_specific_route_wins() {
        // The capture route first, the literal after it.
        let c = parse(&format!(
            "{GOOD}\n[[routes]]\nmethod = \"GET\"\npath = \"/accounts/export\"\ntool = \"crm.export\"\nresource = \"dataset:crm\"\npermission = \"tool:crm.export:export\"\ntier = \"export\"\n"
        ))
        .unwrap();
        for p in [
            "/accounts/export",
            "/accounts/expor%74",
            "/accounts/%65xport",
            "/accounts/EXPORT",
        ] {
            let m = c.route(&http::Method::GET, p).unwrap();
            assert_eq!(m.route.tool, "crm.export", "{p}");
            assert_eq!(m.path, "/accounts/export", "{p}");
        }
        // A capture that is the literal but for a suffix is ambiguous; a
        // suffix on another id is not (control).
        assert!(
            c.route(&http::Method::GET, "/accounts/export.json")
                .is_none()
        );
        assert!(
            c.route(&http::Method::GET, "/accounts/Export.csv")
                .is_none()
        );
        // The literal with a letter Java folds into it (`ſ` to `S`, the
        // Kelvin sign to `k`): a case-insensitive Spring serves the literal.
        let c3 = parse(&format!(
            "{GOOD}\n[[routes]]\nmethod = \"GET\"\npath = \"/accounts/settings\"\ntool = \"crm.export\"\nresource = \"dataset:crm\"\npermission = \"tool:crm.export:export\"\ntier = \"export\"\n"
        ))
        .unwrap();
        assert!(
            c3.route(&http::Method::GET, "/accounts/%C5%BFettings")
                .is_none()
        );
        assert!(c3.route(&http::Method::GET, "/accounts/settings").is_some());
        let m = c3
            .route(&http::Method::GET, "/accounts/%C5%BFetup")
            .unwrap();
        assert_eq!(m.route.tool, "crm.read");
        // A suffix on another id is not the literal (control), on a route
        // whose resource does not take the capture (where it does, a
        // format suffix matches no route at all).
        let c4 = parse(&format!(
            "{}\n[[routes]]\nmethod = \"GET\"\npath = \"/accounts/export\"\ntool = \"crm.export\"\nresource = \"dataset:crm\"\npermission = \"tool:crm.export:export\"\ntier = \"export\"\n",
            GOOD.replace("resource = \"dataset:crm/{account}\"", "resource = \"dataset:crm\"")
        ))
        .unwrap();
        let m = c4.route(&http::Method::GET, "/accounts/acme.json").unwrap();
        assert_eq!(m.route.tool, "crm.read");
        assert!(
            c4.route(&http::Method::GET, "/accounts/export.json")
                .is_none()
        );
        assert!(c.route(&http::Method::GET, "/accounts/acme.json").is_none());
        // A decoded value is not a template: `{doc}` stays as sent.
        let c2 = parse(&GOOD.replace(
            "path = \"/accounts/{account}\"\ntool = \"crm.read\"\nresource = \"dataset:crm/{account}\"",
            "path = \"/accounts/{account}/docs/{doc}\"\ntool = \"crm.read\"\nresource = \"doc:{account}/{doc}\"",
        ))
        .unwrap();
        let m = c2
            .route(&http::Method::GET, "/accounts/%7Bdoc%7D/docs/x")
            .unwrap();
        assert_eq!(m.resource, "doc:{doc}/x");
        // Control: another id takes the capture, decoded, in one spelling.
        let m = c
            .route(&http::Method::GET, "/accounts/ac%6De%20co")
            .unwrap();
        assert_eq!(m.route.tool, "crm.read");
        assert_eq!(m.resource, "dataset:crm/acme co");
        assert_eq!(m.path, "/accounts/acme%20co");
        // A rest capture: each segment it takes is checked, not only its
        // first (`/files/reports/share.json` is the share route to Rails).
        let route = |method: &str, path: &str, tool: &str, tier: &str| {
            format!(
                "\n[[routes]]\nmethod = \"{method}\"\npath = \"{path}\"\ntool = \"{tool}\"\nresource = \"files\"\npermission = \"tool:{tool}:{tier}\"\ntier = \"{tier}\"\n"
            )
        };
        // GOOD routes `POST /files/{rest*}` to files.write.
        let files = parse(&format!(
            "{GOOD}{}",
            route("POST", "/files/{dir}/share", "files.share", "export"),
        ))
        .unwrap();
        let post = http::Method::POST;
        assert!(files.route(&post, "/files/reports/share.json").is_none());
        assert!(files.route(&post, "/files/reports/SHARE.csv").is_none());
        let m = files.route(&post, "/files/reports/share").unwrap();
        assert_eq!(m.route.tool, "files.share");
        let m = files.route(&post, "/files/reports/notes.json").unwrap();
        assert_eq!(m.route.tool, "files.write");
        let m = files.route(&post, "/files/a/b/share.json").unwrap();
        assert_eq!(
            m.route.tool, "files.write",
            "share is not at the share route's depth"
        );
        let m = files.route(&post, "/files/docs/share/readme.txt").unwrap();
        assert_eq!(m.route.tool, "files.write", "deeper than the share route");
        for p in [
            "/accounts/a%3Bb",
            "/accounts/..;",
            "/accounts/x;y",
            "/accounts/%zz",
            "/accounts/%4",
            "/accounts/%ff",
            "/accounts/a%0Ab",
            "/accounts/a%5Cb",
        ] {
            assert!(c.route(&http::Method::GET, p).is_none(), "{p}");
        }
    }

    #[test]
    fn each_bad_input_names_its_field() {
        for (from, to, want) in [
            ("listen = \"127.0.0.1:0\"", "listen = \"nowhere\"", "line 2"),
            (
                "audience = \"crm\"",
                "audiance = \"crm\"",
                "unknown field `audiance`",
            ),
            ("audience = \"crm\"", "audience = \"\"", "audience"),
            (
                "https://127.0.0.1:7443",
                "http://127.0.0.1:7443",
                "broker-url",
            ),
            (
                "stale-after = \"2s\"",
                "stale-after = \"2 parsecs\"",
                "revocation.stale-after",
            ),
            (
                "stale-after = \"2s\"",
                "stale-after = \"0s\"",
                "revocation.stale-after",
            ),
            (
                "stale-after = \"2s\"",
                "stale-after = \"1h\"",
                "revocation.stale-after",
            ),
            (
                "stale-after = \"2s\"",
                "stale-afer = \"2s\"",
                "unknown field `stale-afer`",
            ),
            (
                "http://127.0.0.1:8080",
                "http://10.0.0.1:8080",
                "upstreams.crm.url",
            ),
            (
                "http://127.0.0.1:8080",
                "https://127.0.0.1:8080",
                "upstreams.crm.spiffe-id",
            ),
            (
                "http://127.0.0.1:8080",
                "http://127.0.0.1:8080/?a=1",
                "upstreams.crm.url",
            ),
            (
                "[upstreams.crm]\nurl = ",
                "[upstreams.crm]\nuri = ",
                "unknown field `uri`",
            ),
            ("method = \"GET\"", "method = \"FETCH\"", "routes[0].method"),
            (
                "path = \"/accounts/{account}\"",
                "path = \"accounts\"",
                "routes[0].path",
            ),
            (
                "path = \"/accounts/{account}\"",
                "path = \"/a/../b\"",
                "routes[0].path",
            ),
            (
                "path = \"/accounts/{account}\"",
                "path = \"/a/{x y}\"",
                "routes[0].path",
            ),
            (
                "path = \"/accounts/{account}\"",
                "path = \"/a/{r*}/b\"",
                "routes[0].path",
            ),
            (
                "path = \"/accounts/{account}\"",
                "path = \"/a/{x}/{x}\"",
                "routes[0].path",
            ),
            (
                "path = \"/accounts/{account}\"",
                "path = \"/accounts\"",
                "routes[0].resource",
            ),
            (
                "tool = \"crm.read\"",
                "tool = \"crm read\"",
                "routes[0].tool",
            ),
            ("dataset:crm/{account}", "", "routes[0].resource"),
            (
                "dataset:crm/{account}",
                "dataset:{account",
                "routes[0].resource",
            ),
            ("tool:crm.read:read", "crm.read", "routes[0].permission"),
            ("tier = \"read\"", "tier = \"mild\"", "routes[0].tier"),
            (
                "[\"x-request-id\"]",
                "[\"bad header\"]",
                "routes[0].record-headers",
            ),
            (
                "[\"x-request-id\"]",
                "[\"Authorization\"]",
                "routes[0].record-headers",
            ),
            // Stripped from every request: never what the upstream got.
            (
                "[\"x-request-id\"]",
                "[\"x-request-id\", \"X-Forwarded-Token\"]",
                "\"X-Forwarded-Token\" is never forwarded",
            ),
            (
                "[\"x-request-id\"]",
                "[\"x-remote-user\"]",
                "\"x-remote-user\" is never forwarded",
            ),
            (
                "[\"x-request-id\"]",
                "[\"baton-actor\"]",
                "\"baton-actor\" is never forwarded",
            ),
            (
                "[\"x-request-id\"]",
                "[\"connection\"]",
                "\"connection\" is never forwarded",
            ),
            (
                "[\"x-request-id\"]",
                "[\"x-http-method-override\"]",
                "\"x-http-method-override\" is never forwarded",
            ),
            (
                "tier = \"write\"",
                "tier = \"write\"\nupstream = \"billing\"",
                "routes[1].upstream",
            ),
            (
                "tier = \"write\"",
                "tier = \"write\"\ncolour = 1",
                "unknown field `colour`",
            ),
            (
                "path = \"/files/{rest*}\"",
                "path = \"/accounts/{id}\"\nmethod2 = 1",
                "unknown field",
            ),
            (
                "spool = \"spool\"",
                "spiffe-id = \"x\"\nspool = \"spool\"",
                "spiffe-id",
            ),
            ("spool = \"spool\"", "", "missing field `spool`"),
        ] {
            let e = bad(from, to);
            assert!(e.contains(want), "{to:?}: {e}");
        }
    }

    const MCP: &str = r#"
[[mcp]]
path = "/mcp"
allow-methods = ["resources/list"]

[[mcp.tools]]
name = "crm.search"
resource = "dataset:crm:{account}"
permission = "tool:crm.search:read"
tier = "read"
"#;

    #[test]
    fn an_mcp_endpoint_loads_and_fills_its_resource_from_arguments() {
        let c = parse(&format!("{GOOD}{MCP}")).unwrap();
        let ep = c.mcp_endpoint("/mcp").unwrap();
        assert_eq!(ep.upstream, "crm");
        assert!(c.mcp_endpoint("/mcp/").is_none());
        let tool = &ep.tools[0];
        assert!(!tool.resource_is_static());
        let args = |v: serde_json::Value| v.as_object().cloned().unwrap();
        assert_eq!(
            tool.resource_for(&args(serde_json::json!({"account": "acme"})))
                .unwrap(),
            "dataset:crm:acme"
        );
        assert_eq!(
            tool.resource_for(&args(serde_json::json!({"account": 42})))
                .unwrap(),
            "dataset:crm:42"
        );
        assert_eq!(
            tool.resource_for(&args(serde_json::json!({"account": -7})))
                .unwrap(),
            "dataset:crm:-7"
        );
        // Text that only contains digits, or is an integer's one spelling.
        for good in [
            "42",
            "-7",
            "acct-042",
            "v1.2",
            "e5",
            "nan",
            "inf",
            "report-42",
            "2024-05-01",
            "3fa85f64-5717-4562-b3fc-2c963f66afa6",
        ] {
            assert_eq!(
                tool.resource_for(&args(serde_json::json!({"account": good})))
                    .unwrap(),
                format!("dataset:crm:{good}")
            );
        }
        for bad in [
            serde_json::json!({}),
            serde_json::json!({"account": ["a"]}),
            serde_json::json!({"account": ""}),
            serde_json::json!({"account": "{x}"}),
            serde_json::json!({"account": "a\nb"}),
            // Other spellings of 42, which a `forbid` on
            // `dataset:crm:42` would not see.
            serde_json::from_str(r#"{"account": 4.2e1}"#).unwrap(),
            serde_json::from_str(r#"{"account": 42.0}"#).unwrap(),
            serde_json::json!({"account": " 42"}),
            serde_json::json!({"account": "42 "}),
            serde_json::json!({"account": "+42"}),
            serde_json::json!({"account": "042"}),
            serde_json::json!({"account": "-0"}),
            serde_json::json!({"account": "42.0"}),
            serde_json::json!({"account": "4.2e1"}),
            serde_json::json!({"account": "0x2a"}),
            // Python's `int()` reads each as 42.
            serde_json::json!({"account": "4_2"}),
            serde_json::json!({"account": "\u{ff14}\u{ff12}"}),
            serde_json::json!({"account": "\u{664}\u{662}"}),
            serde_json::json!({"account": " \u{664}\u{662} "}),
            serde_json::json!({"account": "42\u{a0}"}),
            serde_json::json!({"account": "\u{3000}42"}),
            serde_json::json!({"account": "42.json"}),
        ] {
            let e = tool.resource_for(&args(bad.clone())).unwrap_err();
            assert!(e.contains("\"account\""), "{bad}: {e}");
        }
        // An MCP endpoint alone is a whole configuration.
        let only = GOOD.split("[[routes]]").next().unwrap().to_owned() + MCP;
        assert!(parse(&only).unwrap().routes.is_empty());
    }

    #[test]
    fn each_bad_mcp_input_names_its_field() {
        let good = format!("{GOOD}{MCP}");
        for (from, to, want) in [
            ("path = \"/mcp\"", "path = \"/mcp/{x}\"", "mcp[0].path"),
            (
                "path = \"/mcp\"",
                "path = \"/accounts/x\"",
                "routes[0].path",
            ),
            ("path = \"/mcp\"", "path = \"mcp\"", "mcp[0].path"),
            (
                "path = \"/mcp\"\n",
                "path = \"/mcp\"\nupstream = \"nope\"\n",
                "mcp[0].upstream",
            ),
            (
                "[\"resources/list\"]",
                "[\"tools/call\"]",
                "mcp[0].allow-methods",
            ),
            ("[\"resources/list\"]", "[\"a b\"]", "mcp[0].allow-methods"),
            (
                "name = \"crm.search\"",
                "name = \"crm search\"",
                "mcp[0].tools[0].name",
            ),
            ("{account}\"", "{acc-ount}\"", "mcp[0].tools[0].resource"),
            ("{account}\"", "{account\"", "mcp[0].tools[0].resource"),
            (
                "tool:crm.search:read",
                "tool:crm.search",
                "mcp[0].tools[0].permission",
            ),
            (
                "tier = \"read\"",
                "tier = \"risky\"",
                "mcp[0].tools[0].tier",
            ),
            (
                "[[mcp.tools]]\nname",
                "[[mcp.tools]]\nnme",
                "unknown field `nme`",
            ),
        ] {
            let text = bad_in(from, to);
            let e = parse(&text).expect_err(to);
            assert!(e.to_string().contains(want), "{to}: {e}");
        }
        // The same tool twice, and an endpoint without tools.
        let twice = format!(
            "{good}\n[[mcp.tools]]\nname = \"crm.search\"\nresource = \"r\"\npermission = \"tool:crm.search:read\"\ntier = \"read\"\n"
        );
        assert!(
            parse(&twice)
                .unwrap_err()
                .to_string()
                .contains("mcp[0].tools[1].name")
        );
        let none = format!("{GOOD}\n[[mcp]]\npath = \"/mcp\"\ntools = []\n");
        assert!(
            parse(&none)
                .unwrap_err()
                .to_string()
                .contains("mcp[0].tools")
        );
    }

    /// The good file with `from` replaced in its MCP part.
    fn bad_in(from: &str, to: &str) -> String {
        assert!(MCP.contains(from), "{from:?} is not in the file");
        format!("{GOOD}{}", MCP.replacen(from, to, 1))
    }

    #[test]
    fn approval_settings_load_and_bad_ones_name_their_field() {
        let c = parse(&format!(
            "{GOOD}\n[approval]\ntiers = [\"write\"]\nttl = \"2m\"\n"
        ))
        .unwrap();
        assert_eq!(c.approval_ttl, Duration::from_secs(120));
        // The write route is held by its tier, the read one is not.
        assert!(
            c.routes
                .iter()
                .any(|r| r.tier == RiskTier::Write && r.approval)
        );
        assert!(
            c.routes
                .iter()
                .any(|r| r.tier == RiskTier::Read && !r.approval)
        );
        assert!(!parse(GOOD).unwrap().routes.iter().any(|r| r.approval));
        let held = GOOD.replacen(
            "tier = \"read\"",
            "tier = \"read\"\napproval = true\napproval-ttl = \"30s\"",
            1,
        );
        let c = parse(&held).unwrap();
        assert!(c.routes[0].approval);
        assert_eq!(c.routes[0].approval_ttl, Some(Duration::from_secs(30)));
        for (text, field) in [
            (
                format!("{GOOD}\n[approval]\ntiers = [\"risky\"]\n"),
                "approval.tiers",
            ),
            (
                format!("{GOOD}\n[approval]\nttl = \"0s\"\n"),
                "approval.ttl",
            ),
            (
                format!("{GOOD}\n[approval]\nttl = \"2d\"\n"),
                "approval.ttl",
            ),
            (
                GOOD.replacen(
                    "tier = \"read\"",
                    "tier = \"read\"\napproval-ttl = \"0s\"",
                    1,
                ),
                "routes[0].approval-ttl",
            ),
        ] {
            let e = parse(&text).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn a_duplicate_route_is_refused() {
        let dup = GOOD
            .replace("path = \"/files/{rest*}\"", "path = \"/accounts/{other}\"")
            .replace("method = \"POST\"", "method = \"GET\"")
            .replace("files:{rest}", "files:{other}");
        let e = parse(&dup).unwrap_err().to_string();
        assert!(
            e.contains("routes[1].path") && e.contains("already routes[0]"),
            "{e}"
        );
    }

    #[test]
    fn no_routes_or_upstreams_is_refused() {
        let head = GOOD.split("[[routes]]").next().unwrap();
        let e = parse(head).unwrap_err().to_string();
        assert!(e.contains("routes"), "{e}");
        let e = parse(&GOOD.replace("[upstreams.crm]\nurl = \"http://127.0.0.1:8080\"", ""))
            .unwrap_err()
            .to_string();
        assert!(e.contains("upstreams"), "{e}");
    }

    #[test]
    fn two_upstreams_need_a_route_to_name_one() {
        let two = GOOD.replacen(
            "[[routes]]",
            "[upstreams.files]\nurl = \"http://[::1]:9000/base/\"\n\n[[routes]]",
            1,
        );
        // The first [[routes]] header now carries the upstream table before it.
        let e = parse(&two).unwrap_err().to_string();
        assert!(
            e.contains("routes[0].upstream") && e.contains("more than one"),
            "{e}"
        );
        let named = two
            .replace(
                "tool = \"crm.read\"",
                "tool = \"crm.read\"\nupstream = \"crm\"",
            )
            .replace(
                "tool = \"files.write\"",
                "tool = \"files.write\"\nupstream = \"files\"",
            );
        let c = parse(&named).unwrap();
        assert_eq!(c.upstreams["files"].url, "http://[::1]:9000/base");
        assert_eq!(c.routes[1].upstream, "files");
    }

    #[test]
    fn an_unreadable_file_is_named() {
        let e = Config::load(Path::new("does-not-exist.toml"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("does-not-exist.toml") && e.contains("cannot read"),
            "{e}"
        );
    }
}
