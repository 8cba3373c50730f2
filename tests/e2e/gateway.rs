//! `baton gateway` in front of an unmodified plain-HTTP upstream (a small
//! server in the test process that echoes what it got): an allowed call is
//! forwarded with the verified caller in `Baton-*` headers and shows in
//! `baton audit trace`; each attack is refused with its RFC 6750 answer and
//! never reaches the upstream, next to the untampered control that does.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use warp::Filter as _;

use crate::delegation::{PLANNER, RESEARCHER, World, copy_cred, grant_of};
use crate::harness::{Options, Proc, baton, wait_for};

const GATEWAY: &str = "spiffe://example.org/tools/gateway";
pub(crate) const AUDIENCE: &str = "gw";
pub(crate) const FULL: &[&str] = &[
    "tool:crm.search:read",
    "tool:crm.update:write",
    "tool:docs.summarize:read",
    "dataset:crm:read",
];
pub(crate) const NARROW: &[&str] = &[
    "tool:crm.search:read",
    "tool:docs.summarize:read",
    "dataset:crm:read",
];

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// A plain HTTP server on loopback that records and echoes each request.
struct Upstream {
    port: u16,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    fn start() -> Self {
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let record = seen.clone();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                let routes = warp::method()
                    .and(warp::path::full())
                    .and(warp::header::headers_cloned())
                    .map(
                        move |m: warp::http::Method,
                              p: warp::path::FullPath,
                              h: warp::http::HeaderMap| {
                            let s = Seen {
                                method: m.to_string(),
                                path: p.as_str().to_owned(),
                                headers: h
                                    .iter()
                                    .map(|(k, v)| {
                                        (
                                            k.as_str().to_owned(),
                                            v.to_str().unwrap_or_default().to_owned(),
                                        )
                                    })
                                    .collect(),
                            };
                            record.lock().unwrap().push(s.clone());
                            warp::reply::json(&serde_json::json!({
                                "upstream": "echo",
                                "method": s.method,
                                "path": s.path,
                            }))
                        },
                    );
                warp::serve(routes).incoming(listener).run().await;
            });
        });
        Upstream { port, seen }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    fn last(&self) -> Seen {
        self.seen.lock().unwrap().last().cloned().unwrap()
    }
}

/// The world of the delegation tests, plus the gateway (audience `gw`)
/// in front of the echo upstream.
pub(crate) struct Gw {
    pub(crate) w: World,
    pub(crate) gateway: Proc,
    pub(crate) url: String,
    upstream: Upstream,
    /// The gateway's ops listener (`--ops-listen`).
    ops: String,
    /// Upstreams started for this gateway.
    _upstreams: Vec<Proc>,
}

fn config(w: &World, upstream_port: u16) -> String {
    format!(
        r#"listen = "127.0.0.1:0"
audience = "{AUDIENCE}"
broker-url = "https://{broker}"
spiffe-id = "{GATEWAY}"
spool = "{spool}"

[revocation]
stale-after = "10s"

[upstreams.crm]
url = "http://127.0.0.1:{upstream_port}"

[[routes]]
method = "GET"
path = "/crm/accounts/{{account}}"
upstream = "crm"
tool = "crm.search"
resource = "dataset:crm"
permission = "tool:crm.search:read"
tier = "read"
record-headers = ["x-request-id"]

[[routes]]
method = "POST"
path = "/crm/cases/{{case}}"
upstream = "crm"
tool = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"
"#,
        broker = w.c.broker_addr,
        spool = w.c.path("gw-spool").display(),
    )
}

impl Gw {
    /// Sends the gateway SIGHUP (re-read its file and policies).
    pub(crate) fn hup(&self) {
        let pid = self.gateway.child.id().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    fn start() -> Self {
        Self::start_with(|_| (String::new(), Vec::new()))
    }

    /// The gateway with what `extra` returns appended to its configuration
    /// (more upstreams, routes or MCP endpoints; keys before its first
    /// table go at the top), and the upstream processes it started kept
    /// alive beside it.
    pub(crate) fn start_with(extra: impl FnOnce(&World) -> (String, Vec<Proc>)) -> Self {
        Self::start_full(None, extra)
    }

    /// As [`start_with`](Self::start_with); with `redis`, the broker
    /// publishes revocations there and the gateway follows them there
    /// (`--redis`), not on the broker's feed.
    pub(crate) fn start_full(
        redis: Option<&str>,
        extra: impl FnOnce(&World) -> (String, Vec<Proc>),
    ) -> Self {
        Self::start_with_args(redis, extra, &[])
    }

    /// As [`start_full`](Self::start_full), with `args` after the
    /// gateway's own (e.g. `--log trace`).
    pub(crate) fn start_with_args(
        redis: Option<&str>,
        extra: impl FnOnce(&World) -> (String, Vec<Proc>),
        args: &[&str],
    ) -> Self {
        let w = World::start_with_options(
            redis,
            Options {
                broker_args: vec!["--tool-server".into(), format!("{AUDIENCE}={GATEWAY}")],
                ..Options::default()
            },
        );
        w.c.register("/tools/gateway", &[]);
        let upstream = Upstream::start();
        let file = w.c.path("gateway.toml");
        let (extra, upstreams) = extra(&w);
        // Keys before the first table are top-level (e.g. `policies`).
        let tables = extra
            .lines()
            .position(|l| l.trim_start().starts_with('['))
            .unwrap_or(usize::MAX);
        let lines: Vec<&str> = extra.lines().collect();
        let (top, rest) = lines.split_at(tables.min(lines.len()));
        let ready = w.c.path("gateway.addr");
        let ops = crate::ops::free_addr();
        // The process settings from the file's [process] table, the socket
        // as a flag: both ways of giving them.
        std::fs::write(
            &file,
            format!(
                "{}\n{}\n{}\n\n[process]\nready-file = \"{}\"\nops-listen = \"{ops}\"\n",
                top.join("\n"),
                config(&w, upstream.port),
                rest.join("\n"),
                ready.display(),
            ),
        )
        .unwrap();
        let mut cmd = baton();
        cmd.arg("gateway")
            .arg("--config")
            .arg(&file)
            .arg("--socket")
            .arg(w.c.agent_socket());
        if let Some(url) = redis {
            cmd.arg("--redis").arg(url);
        }
        cmd.args(args);
        let mut gateway = Proc::spawn("gateway", cmd, w.c.path("gateway.log"));
        let addr = wait_for("gateway ready", Duration::from_secs(60), || {
            assert!(
                gateway.is_running(),
                "gateway exited: {}",
                gateway.log_text()
            );
            std::fs::read_to_string(&ready).ok()
        });
        Gw {
            w,
            gateway,
            url: format!("https://{addr}"),
            upstream,
            ops,
            _upstreams: upstreams,
        }
    }

    /// How many requests reached the plain upstream.
    pub(crate) fn upstream_count(&self) -> usize {
        self.upstream.count()
    }

    /// The values of header `name` in the last request that reached the
    /// plain upstream.
    pub(crate) fn upstream_last_header(&self, name: &str) -> Vec<String> {
        self.upstream
            .last()
            .header(name)
            .into_iter()
            .map(str::to_owned)
            .collect()
    }

    /// A task for the planner with tokens for the gateway's audience, and
    /// the researcher's credential with the narrow scope.
    pub(crate) fn researcher(&self) -> (String, std::path::PathBuf, std::path::PathBuf) {
        let (task, grant) = self.w.start_task_for(FULL, &[AUDIENCE]);
        let planner = self.w.redeem(&grant, PLANNER, &format!("planner-{task}"));
        let mut args = vec![
            "delegate",
            "--credential",
            planner.to_str().unwrap(),
            "--target",
            RESEARCHER,
            "--audience",
            AUDIENCE,
            "--justification",
            "look up the customer's open cases",
            "-o",
            "json",
        ];
        for s in NARROW {
            args.extend(["--scope", s]);
        }
        let hop = self.w.run(&args);
        let researcher = self
            .w
            .redeem(&grant_of(&hop), RESEARCHER, &format!("researcher-{task}"));
        (task, planner, researcher)
    }
}

/// An mTLS client presenting the certificate in `cert_dir`, trusting only
/// the gateway's SPIFFE ID.
pub(crate) fn client(cert_dir: &Path) -> reqwest::Client {
    let gw = baton_core::SpiffeId::parse(GATEWAY).unwrap();
    crate::harness::cred_client(cert_dir, &cert_dir.join("bundle.pem"), gw)
}

/// What came back: status, `WWW-Authenticate`, JSON body.
#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) challenge: String,
    pub(crate) body: serde_json::Value,
}

pub(crate) fn send(
    cert_dir: &Path,
    method: &str,
    url: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
) -> Answer {
    send_body(cert_dir, method, url, token, extra, "{\"q\":\"acme\"}")
}

/// As [`send`], with `body`.
pub(crate) fn send_body(
    cert_dir: &Path,
    method: &str,
    url: &str,
    token: Option<&str>,
    extra: &[(&str, &str)],
    body: &str,
) -> Answer {
    let body = body.to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = client(cert_dir);
    rt.block_on(async {
        let mut req = client.request(method.parse().unwrap(), url);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in extra {
            req = req.header(*k, *v);
        }
        let resp = req.body(body).send().await.unwrap();
        Answer {
            status: resp.status().as_u16(),
            challenge: resp
                .headers()
                .get("www-authenticate")
                .map(|v| v.to_str().unwrap().to_owned())
                .unwrap_or_default(),
            body: resp.json().await.unwrap_or(serde_json::Value::Null),
        }
    })
}

pub(crate) fn token_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("token"))
        .unwrap()
        .trim()
        .to_owned()
}

#[test]
fn the_gateway_forwards_allowed_calls_and_refuses_each_attack() {
    let g = Gw::start();
    let (task, planner, researcher) = g.researcher();
    let token = token_of(&researcher);
    let search = format!("{}/crm/accounts/acme", g.url);

    // The protected-resource metadata (RFC 9728).
    let meta = send(
        &researcher,
        "GET",
        &format!("{}/.well-known/oauth-protected-resource", g.url),
        None,
        &[],
    );
    assert_eq!(meta.status, 200, "{meta:?}");
    assert_eq!(meta.body["resource"], AUDIENCE, "{meta:?}");
    assert!(
        meta.body["scopes_supported"]
            .as_array()
            .unwrap()
            .contains(&"tool:crm.update:write".into()),
        "{meta:?}"
    );

    // Allowed: forwarded with the verified caller, and nothing the caller
    // claimed about itself.
    let before = g.upstream.count();
    let ok = send(
        &researcher,
        "GET",
        &search,
        Some(&token),
        &[
            ("x-request-id", "req-1"),
            // Made inside the agent framework's trace.
            (
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            ),
        ],
    );
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(ok.body["upstream"], "echo");
    assert_eq!(ok.body["path"], "/crm/accounts/acme");
    assert_eq!(g.upstream.count(), before + 1);
    let seen = g.upstream.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.header("baton-task"), vec![task.as_str()]);
    assert_eq!(seen.header("baton-actor"), vec![RESEARCHER]);
    assert_eq!(
        seen.header("baton-chain"),
        vec![format!("{RESEARCHER},{PLANNER}").as_str()]
    );
    assert_eq!(seen.header("x-request-id"), vec!["req-1"]);
    assert!(
        seen.header("authorization").is_empty(),
        "the caller's token reached the upstream: {seen:?}"
    );

    // Forged identity headers: stripped, the upstream sees the verified ones.
    let forged = send(
        &researcher,
        "GET",
        &search,
        Some(&token),
        &[
            ("Baton-Task", "00000000-0000-0000-0000-000000000000"),
            ("Baton-Actor", "spiffe://example.org/agents/mallory"),
            ("baton-chain", "spiffe://example.org/agents/mallory"),
            ("Baton-Initiator", "mallory@example.com"),
        ],
    );
    assert_eq!(forged.status, 200, "{forged:?}");
    let seen = g.upstream.last();
    assert_eq!(seen.header("baton-task"), vec![task.as_str()], "{seen:?}");
    assert_eq!(seen.header("baton-actor"), vec![RESEARCHER], "{seen:?}");
    assert!(seen.header("baton-initiator").is_empty(), "{seen:?}");
    assert!(
        !format!("{seen:?}").contains("mallory") && !format!("{seen:?}").contains("00000000-0000"),
        "a forged header reached the upstream: {seen:?}"
    );

    // No token: 401 with a Bearer challenge pointing at the metadata.
    let before = g.upstream.count();
    let none = send(&researcher, "GET", &search, None, &[]);
    assert_eq!(none.status, 401, "{none:?}");
    assert!(
        none.challenge.starts_with("Bearer ")
            && none
                .challenge
                .contains("/.well-known/oauth-protected-resource"),
        "{none:?}"
    );
    // A token that is not one.
    let junk = send(&researcher, "GET", &search, Some("not.a.token"), &[]);
    assert_eq!(junk.status, 401, "{junk:?}");
    assert!(
        junk.challenge.contains("error=\"invalid_token\""),
        "{junk:?}"
    );

    // The researcher's token over the planner's certificate (another peer).
    let mixed = g.w.c.path("mixed");
    copy_cred(&researcher, &mixed);
    std::fs::copy(planner.join("svid.pem"), mixed.join("svid.pem")).unwrap();
    std::fs::copy(planner.join("key.pem"), mixed.join("key.pem")).unwrap();
    // Made inside another trace: the refusal's record continues it.
    let stolen = send(
        &mixed,
        "GET",
        &search,
        Some(&token),
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
    );
    assert_eq!(stolen.status, 401, "{stolen:?}");
    assert!(
        stolen.challenge.contains("error=\"invalid_token\""),
        "{stolen:?}"
    );
    assert_eq!(stolen.body["code"], "certificate_mismatch", "{stolen:?}");
    // (The control is the allowed call above: the same token over the
    // researcher's own certificate.)

    // A token for another audience (a task whose tokens name `crm` only).
    let (_t, grant) = g.w.start_task_for(FULL, &["crm"]);
    let crm_planner = g.w.redeem(&grant, PLANNER, "crm-planner");
    let crm_researcher = g.w.redeem(
        &grant_of(&g.w.delegate(&crm_planner, RESEARCHER, NARROW, &[])),
        RESEARCHER,
        "crm-researcher",
    );
    let other = send(
        &crm_researcher,
        "GET",
        &search,
        Some(&token_of(&crm_researcher)),
        &[],
    );
    assert_eq!(other.status, 401, "{other:?}");
    assert!(
        other.challenge.contains("error=\"invalid_token\""),
        "{other:?}"
    );
    assert!(
        other.body["code"].as_str().unwrap().contains("audience"),
        "{other:?}"
    );

    // A forged token (its signature is not the broker's) that names this
    // task and a real jti: refused, and not recorded under the task, or
    // anyone could fill a task's trace with denials it never had.
    let forged_token = {
        use base64::Engine as _;
        let b64 = |v: serde_json::Value| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
        };
        let real: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(token.split('.').nth(1).unwrap())
                .unwrap(),
        )
        .unwrap();
        format!(
            "{}.{}.{}",
            b64(
                serde_json::json!({"alg": "ES256", "typ": "baton-delegation+jwt", "kid": "forged"})
            ),
            b64(serde_json::json!({"jti": real["jti"], "task": {"id": task}})),
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode([7u8; 64])
        )
    };
    let forged_call = send(
        &researcher,
        "GET",
        &search,
        Some(&forged_token),
        &[(
            "traceparent",
            "00-5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e-00f067aa0ba902b7-01",
        )],
    );
    assert_eq!(forged_call.status, 401, "{forged_call:?}");
    // (Reports are delivered in order: once the out-of-scope call below
    // is in the trace, this refusal would be too.)
    // A tool outside the token's scope: 403 with the scope it would need.
    let write = send(
        &researcher,
        "POST",
        &format!("{}/crm/cases/42", g.url),
        Some(&token),
        &[],
    );
    assert_eq!(write.status, 403, "{write:?}");
    assert_eq!(
        write.challenge, "Bearer error=\"insufficient_scope\", scope=\"tool:crm.update:write\"",
        "{write:?}"
    );

    // A route the configuration does not know (and one that tries to
    // climb out of a known one).
    for path in [
        "/crm/secrets",
        "/crm/accounts/acme/../../secrets",
        "/crm/accounts/a%2F..%2Fb",
    ] {
        let unknown = send(
            &researcher,
            "GET",
            &format!("{}{path}", g.url),
            Some(&token),
            &[],
        );
        assert_eq!(unknown.status, 404, "{path}: {unknown:?}");
        assert_eq!(unknown.body["code"], "no_route", "{path}: {unknown:?}");
    }
    // None of the refused calls reached the upstream.
    assert_eq!(g.upstream.count(), before, "a refused call was forwarded");

    // The calls are in the audit trace, like the tool server's.
    let trace = wait_for(
        "gateway calls in the trace",
        Duration::from_secs(30),
        || {
            let t = g.w.json(&["audit", "trace", &task, "--json"]).to_string();
            (t.contains("crm.search") && t.contains("out_of_scope") && t.contains("no_route"))
                .then_some(t)
        },
    );
    // A request on no route is recorded as refused, with its request line.
    assert!(
        trace.contains("no_route: no route for GET /crm/secrets"),
        "{trace}"
    );
    assert!(trace.contains(RESEARCHER), "{trace}");
    let text = g.w.ok(&["audit", "trace", &task]);
    assert!(text.contains("crm.search"), "{text}");

    // The input is recorded as an HMAC under the gateway's digest key (made
    // at first start, private to its owner), not a bare SHA-256 anyone can
    // test guesses against.
    let key_file = g.w.c.path("gw-spool").join("digest.key");
    let key = std::fs::read(&key_file).unwrap();
    assert_eq!(key.len(), 32);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let input = b"{\"q\":\"acme\"}";
    let keyed = hex::encode(aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key),
        input,
    ));
    let bare = hex::encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, input));
    let v: serde_json::Value = serde_json::from_str(&trace).unwrap();
    let mut calls = Vec::new();
    crate::mcp::collect_calls(&v, "dataset:crm", &mut calls);
    assert!(!calls.is_empty(), "{trace}");
    assert!(
        calls.iter().any(|c| c["input_digest"] == keyed.as_str()),
        "{calls:?}"
    );
    // The call made inside the caller's trace is recorded in it; the calls
    // made outside any trace are not (control).
    let in_trace = calls
        .iter()
        .filter(|c| c["trace_id"] == "0af7651916cd43dd8448eb211c80319c")
        .count();
    assert_eq!(in_trace, 1, "{calls:?}");
    assert!(calls.len() > 1, "{calls:?}");
    // The refused token's record is in the trace its request came with.
    let refused: Vec<_> = calls
        .iter()
        .filter(|c| c["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736")
        .collect();
    assert_eq!(refused.len(), 1, "{calls:?}");
    assert_eq!(refused[0]["decision"], "deny", "{refused:?}");
    // The token is checked before the body is read: a caller without a
    // valid token spends none of the gateway's body budget.
    assert!(
        refused[0]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("the request's body was not read")),
        "{refused:?}"
    );
    // The forged token's refusal is not (the stolen one above, signed by
    // the broker, is the control).
    assert!(
        !calls
            .iter()
            .any(|c| c["trace_id"] == "5ca1ab1e5ca1ab1e5ca1ab1e5ca1ab1e"),
        "a forged token's refusal was recorded under the task it names: {calls:?}"
    );
    assert!(
        !trace.contains(&bare),
        "a bare SHA-256 of the input is in the log"
    );
}

#[test]
fn the_gateway_refuses_an_ended_task_within_the_staleness_window() {
    let g = Gw::start();
    let (task, _planner, researcher) = g.researcher();
    let token = token_of(&researcher);
    let search = format!("{}/crm/accounts/acme", g.url);
    // Control: good before the task ends.
    let ok = send(&researcher, "GET", &search, Some(&token), &[]);
    assert_eq!(ok.status, 200, "{ok:?}");

    // Its ops listener: ready with a fresh feed and a valid SVID, and a
    // scrape promtool accepts, naming no task, token or workload.
    crate::ops::wait_ready(&g.ops, "the gateway ready");
    crate::ops::assert_lists_checks(&g.ops, &["revocation_feed", "svid", "audit_spool"]);
    let text = crate::ops::scrape(&g.ops);
    assert_eq!(
        crate::ops::value(&text, "baton_verifier_feed_fresh"),
        1.0,
        "{text}"
    );
    assert!(!text.contains(&task) && !text.contains(&token), "{text}");
    assert!(!text.contains("spiffe://"), "{text}");
    crate::ops::promtool_check(&text, "gateway");

    g.w.ok(&["task", "end", &task]);
    // The feed brings the revocation within its latency (stale after 10 s;
    // the deadline is generous for a busy machine).
    let refused = wait_for("the ended task refused", Duration::from_secs(30), || {
        let a = send(&researcher, "GET", &search, Some(&token), &[]);
        (a.status == 401).then_some(a)
    });
    assert_eq!(refused.status, 401, "{refused:?}");
    assert!(
        refused.challenge.contains("error=\"invalid_token\""),
        "{refused:?}"
    );
    assert_eq!(refused.body["code"], "revoked", "{refused:?}");
    // And it stays refused.
    let before = g.upstream.count();
    let again = send(&researcher, "GET", &search, Some(&token), &[]);
    assert_eq!(again.status, 401, "{again:?}");
    assert_eq!(g.upstream.count(), before);
}

/// `baton gateway --check --config FILE`.
pub(crate) fn gateway_check(file: &Path) -> std::process::Output {
    baton()
        .args(["gateway", "--check", "--config"])
        .arg(file)
        .output()
        .unwrap()
}

#[test]
fn gateway_check_names_the_bad_field() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("gw.toml");
    let good = r#"listen = "127.0.0.1:0"
audience = "gw"
broker-url = "https://127.0.0.1:7443"
spool = "spool"

[upstreams.a]
url = "http://127.0.0.1:8080"

[[routes]]
method = "GET"
path = "/x/{id}"
tool = "x.read"
resource = "x:{id}"
permission = "tool:x.read:read"
tier = "read"
"#;
    std::fs::write(&file, good).unwrap();
    let out = gateway_check(&file);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&file, good.replace("tier = \"read\"", "tier = \"reed\"")).unwrap();
    let out = gateway_check(&file);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gw.toml") && err.contains("routes[0].tier"),
        "{err}"
    );
    // The process settings in [process] are checked as flags are, with
    // the file's line.
    std::fs::write(&file, format!("{good}\n[process]\nredy-file = \"x\"\n")).unwrap();
    let out = gateway_check(&file);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("gw.toml:") && err.contains("unknown key `redy-file`"),
        "{err}"
    );
    std::fs::write(&file, good.replace("tier = \"read\"", "tier = \"reed\"")).unwrap();

    // The example shipped in deploy/ passes the same check.
    let shipped =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/gateway.toml");
    let out = gateway_check(&shipped);
    assert!(
        out.status.success(),
        "deploy/gateway.toml: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ...and so does it with its commented-out settings uncommented.
    let open: String = std::fs::read_to_string(&shipped)
        .unwrap()
        .lines()
        .map(|l| match l.strip_prefix("# ") {
            // The settings offered one by one (the MCP block is a whole
            // example of its own).
            Some(rest)
                if [
                    "digest-key-file",
                    "policies",
                    "record-input",
                    "record-output",
                    "redact",
                    "shutdown-timeout",
                    "ready-file",
                    "log-format",
                ]
                .iter()
                .any(|k| rest.starts_with(&format!("{k} = "))) =>
            {
                format!("{rest}\n")
            }
            _ => format!("{l}\n"),
        })
        .collect();
    let opened = file.with_file_name("gateway-open.toml");
    std::fs::write(&opened, &open).unwrap();
    let out = gateway_check(&opened);
    assert!(
        out.status.success(),
        "deploy/gateway.toml uncommented: {}\n{open}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `baton config check` knows a gateway file by its name, or by --for.
    let out = baton()
        .args(["config", "check"])
        .arg(&shipped)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("ok for `baton gateway`"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = baton()
        .args(["config", "check", "--for", "gateway"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("routes[0].tier"), "{err}");
}

#[test]
fn sighup_reloads_routes_without_failing_a_request_and_refuses_a_bad_file() {
    let g = Gw::start();
    let (_task, _planner, researcher) = g.researcher();
    let token = token_of(&researcher);
    let notes = format!("{}/crm/notes/7", g.url);
    assert_eq!(
        send(&researcher, "GET", &notes, Some(&token), &[]).status,
        404,
        "the new route exists before the reload"
    );

    // Calls in a loop on kept-alive connections while the file changes.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = stop.clone();
        let (cred, token) = (researcher.clone(), token.clone());
        let url = format!("{}/crm/accounts/acme", g.url);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let client = client(&cred);
            rt.block_on(async {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::SeqCst) || ok < 20 {
                    match client.get(&url).bearer_auth(&token).send().await {
                        Ok(r) if r.status().as_u16() == 200 => ok += 1,
                        Ok(r) => failed.push(r.status().to_string()),
                        Err(e) => failed.push(e.to_string()),
                    }
                }
                (ok, failed)
            })
        })
    };
    let file = g.w.c.path("gateway.toml");
    let good = std::fs::read_to_string(&file).unwrap();
    let hup = || g.hup();
    let with_notes = good.clone()
        + r#"
[[routes]]
method = "GET"
path = "/crm/notes/{note}"
upstream = "crm"
tool = "crm.search"
resource = "dataset:crm"
permission = "tool:crm.search:read"
tier = "read"
"#;
    std::fs::write(&file, &with_notes).unwrap();
    hup();
    let log = || g.gateway.log_text();
    // The new route answers, and the log says why (it may trail the route).
    wait_for(
        "the new route and its log line",
        Duration::from_secs(60),
        || {
            (send(&researcher, "GET", &notes, Some(&token), &[]).status == 200
                && log().contains("reloaded the gateway's configuration"))
            .then_some(())
        },
    );

    // A file with a typo, then one that changes what needs a restart: each
    // refused, naming why, and the routes in force keep answering.
    std::fs::write(
        &file,
        with_notes.replace("tier = \"read\"", "teir = \"read\""),
    )
    .unwrap();
    hup();
    wait_for("the typo refused", Duration::from_secs(60), || {
        log().contains("unknown field `teir`").then_some(())
    });
    std::fs::write(
        &file,
        with_notes.replace(
            &format!("audience = \"{AUDIENCE}\""),
            "audience = \"other\"",
        ),
    )
    .unwrap();
    hup();
    wait_for(
        "the audience change refused",
        Duration::from_secs(60),
        || {
            log()
                .contains("audience changed; it takes a restart")
                .then_some(())
        },
    );
    assert_eq!(
        send(&researcher, "GET", &notes, Some(&token), &[]).status,
        200
    );

    // Removing the route takes it away again.
    std::fs::write(&file, &good).unwrap();
    hup();
    wait_for("the route removed", Duration::from_secs(60), || {
        (send(&researcher, "GET", &notes, Some(&token), &[]).status == 404).then_some(())
    });

    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (ok, failed) = load.join().unwrap();
    assert!(ok >= 20, "{ok}");
    assert!(
        failed.is_empty(),
        "requests failed during the reloads: {failed:?}"
    );
    let text = log();
    let mut g = g;
    assert!(g.gateway.is_running(), "{text}");
}

/// Serves `serve(listener)` on a Unix socket at `path`, on a thread of
/// its own.
fn on_unix_socket<F, Fut>(path: &Path, serve: F)
where
    F: FnOnce(tokio::net::UnixListener) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()>,
{
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    listener.set_nonblocking(true).unwrap();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            serve(tokio::net::UnixListener::from_std(listener).unwrap()).await;
        });
    });
}

/// A plain HTTP server on a Unix socket that answers with the verified
/// caller it was given.
fn unix_upstream(path: &Path) {
    on_unix_socket(path, |listener| async move {
        let routes = warp::path::full().and(warp::header::headers_cloned()).map(
            |p: warp::path::FullPath, h: warp::http::HeaderMap| {
                warp::reply::json(&serde_json::json!({
                    "upstream": "unix",
                    "path": p.as_str(),
                    "actor": h.get("baton-actor").and_then(|v| v.to_str().ok()),
                }))
            },
        );
        warp::serve(routes).incoming(listener).run().await;
    });
}

#[test]
fn the_gateway_reaches_an_mtls_upstream_by_its_spiffe_id_and_a_unix_socket_upstream() {
    const ECHO: &str = "spiffe://example.org/svc/crm-tls";
    let g = Gw::start_with(|w| {
        // An mTLS upstream with its own SVID (the example echo server,
        // which answers GET /echo with its peer's SPIFFE ID).
        w.c.register("/svc/crm-tls", &[]);
        let ready = w.c.path("echo.addr");
        let mut cmd = baton();
        cmd.args(["example", "echo-server", "--socket"])
            .arg(w.c.agent_socket())
            .args(["--spiffe-id", ECHO, "--listen", "127.0.0.1:0"])
            .arg("--ready-file")
            .arg(&ready);
        let mut echo = Proc::spawn("echo-server", cmd, w.c.path("echo-server.log"));
        let addr = wait_for("echo server ready", Duration::from_secs(60), || {
            assert!(echo.is_running(), "echo server exited: {}", echo.log_text());
            std::fs::read_to_string(&ready).ok()
        });
        let sock = w.c.path("crm.sock");
        unix_upstream(&sock);
        let mut extra = String::new();
        for (name, id, path) in [
            ("tls", ECHO, "/echo"),
            (
                "impostor",
                "spiffe://example.org/svc/other",
                "/echo/{rest*}",
            ),
        ] {
            extra.push_str(&format!(
                r#"
[upstreams.{name}]
url = "https://{addr}"
spiffe-id = "{id}"

[[routes]]
method = "GET"
path = "{path}"
upstream = "{name}"
tool = "crm.search"
resource = "dataset:crm"
permission = "tool:crm.search:read"
tier = "read"
"#
            ));
        }
        extra.push_str(&format!(
            r#"
[upstreams.unix]
url = "unix:{}"

[[routes]]
method = "GET"
path = "/unix/{{item}}"
upstream = "unix"
tool = "crm.search"
resource = "dataset:crm"
permission = "tool:crm.search:read"
tier = "read"
"#,
            sock.display()
        ));
        (extra, vec![echo])
    });
    let (_task, _planner, researcher) = g.researcher();
    let token = token_of(&researcher);
    let get = |path: &str| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = client(&researcher)
                .get(format!("{}{path}", g.url))
                .bearer_auth(&token)
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    };

    // The mTLS upstream saw the gateway's own SVID.
    let (status, body) = get("/echo");
    assert_eq!((status, body.as_str()), (200, GATEWAY), "{body}");
    // The same server under another expected SPIFFE ID: the gateway does
    // not talk to it (it would have answered 404 for this path).
    let (status, body) = get("/echo/x");
    assert_eq!(status, 502, "{body}");
    assert!(!body.contains("127.0.0.1"), "{body}");
    let log = g.gateway.log_text();
    assert!(log.contains("spiffe://example.org/svc/other"), "{log}");

    // The Unix socket upstream, with the verified caller.
    let (status, body) = get("/unix/acme");
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["upstream"], "unix");
    assert_eq!(v["path"], "/unix/acme");
    assert_eq!(v["actor"], RESEARCHER);
}

#[test]
fn the_gateway_can_follow_the_revocation_feed_in_redis() {
    let mut redis = crate::harness::Redis::start();
    let g = Gw::start_full(Some(&redis.url), |_| (String::new(), Vec::new()));
    let (task, _planner, researcher) = g.researcher();
    let token = token_of(&researcher);
    let url = format!("{}/crm/accounts/acme", g.url);
    // Control: allowed while the feed is fresh.
    let ok = wait_for("the call allowed", Duration::from_secs(60), || {
        let a = send(&researcher, "GET", &url, Some(&token), &[]);
        (a.status == 200).then_some(a)
    });
    assert_eq!(ok.body["upstream"], "echo", "{ok:?}");

    // The task ends: the gateway hears it from Redis.
    g.w.ok(&["task", "end", &task]);
    let refused = wait_for("the ended task refused", Duration::from_secs(30), || {
        let a = send(&researcher, "GET", &url, Some(&token), &[]);
        (a.status == 401).then_some(a)
    });
    assert!(refused.challenge.contains("invalid_token"), "{refused:?}");

    // And it is Redis it listens to: with Redis gone (the broker still up),
    // its feed goes stale and every call is refused, fail closed.
    let (_task2, _p2, fresh) = g.researcher();
    let fresh_token = token_of(&fresh);
    wait_for("a new task's call allowed", Duration::from_secs(60), || {
        (send(&fresh, "GET", &url, Some(&fresh_token), &[]).status == 200).then_some(())
    });
    redis.stop();
    let stale = wait_for("the feed stale", Duration::from_secs(60), || {
        let a = send(&fresh, "GET", &url, Some(&fresh_token), &[]);
        (a.status == 503).then_some(a)
    });
    assert_eq!(stale.body["code"], "revocation_stale", "{stale:?}");
}

#[test]
fn a_call_over_the_tasks_risk_ceiling_is_refused_whatever_the_scope_grants() {
    let g = Gw::start_with(|_| {
        (
            r#"
[[routes]]
method = "DELETE"
path = "/files/{file}"
upstream = "crm"
tool = "files.delete"
resource = "dataset:files"
permission = "tool:files.delete:delete"
tier = "delete"
"#
            .to_owned(),
            Vec::new(),
        )
    });
    // The task's ceiling is `write`; its scope names a delete-tier tool.
    let (_task, grant) = g.w.start_task_as(
        "support.case-update",
        &[
            "tool:files.delete:delete",
            "tool:crm.update:write",
            "dataset:crm:write",
        ],
        &[AUDIENCE],
    );
    let planner = g.w.redeem(&grant, PLANNER, "ceiling-planner");
    let token = token_of(&planner);
    let before = g.upstream.count();
    let over = send(
        &planner,
        "DELETE",
        &format!("{}/files/report.pdf", g.url),
        Some(&token),
        &[],
    );
    assert_eq!(over.status, 403, "{over:?}");
    assert_eq!(over.body["code"], "over_ceiling", "{over:?}");
    assert!(over.challenge.contains("insufficient_scope"), "{over:?}");
    assert_eq!(
        g.upstream.count(),
        before,
        "an over-ceiling call was forwarded"
    );
    // Control: a write (within the ceiling) the same token grants goes on.
    let ok = send(
        &planner,
        "POST",
        &format!("{}/crm/cases/42", g.url),
        Some(&token),
        &[],
    );
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(g.upstream.count(), before + 1);
}

#[test]
fn the_gateway_refuses_every_call_once_the_brokers_feed_goes_silent() {
    baton_tls::install_crypto_provider();
    let (mcp_port, _seen) = crate::mcp::start_crm();
    let mut g = Gw::start_with(|_| (crate::mcp::endpoint(mcp_port), Vec::new()));
    let (_task, _planner, researcher) = g.researcher();
    let token = token_of(&researcher);
    let url = format!("{}/crm/accounts/acme", g.url);
    // Control: allowed while the broker's feed is heard.
    wait_for("the call allowed", Duration::from_secs(60), || {
        (send(&researcher, "GET", &url, Some(&token), &[]).status == 200).then_some(())
    });
    // An MCP message that names no tool (here `initialize`) goes through.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let init = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {},
            "clientInfo": {"name": "raw", "version": "0"}}});
    let (status, _, body) = rt.block_on(crate::mcp::post(&g.url, &researcher, &init, &[]));
    assert_eq!(status, 200, "{body}");
    let before = g.upstream.count();
    // The broker goes away: nothing says the credential is still good, so
    // after `stale-after` (10 s) every call is refused, fail closed.
    g.w.c.broker.as_mut().unwrap().stop();
    let stale = wait_for("the feed stale", Duration::from_secs(60), || {
        let a = send(&researcher, "GET", &url, Some(&token), &[]);
        (a.status != 200).then_some(a)
    });
    assert_eq!(stale.status, 503, "{stale:?}");
    assert_eq!(stale.body["code"], "revocation_stale", "{stale:?}");
    let after = g.upstream.count();
    assert_eq!(
        send(&researcher, "GET", &url, Some(&token), &[]).status,
        503
    );
    assert_eq!(
        g.upstream.count(),
        after,
        "a call went on with a stale feed"
    );
    assert!(after >= before);
    // Nor does anything on the MCP endpoint: a credential revoked while
    // the feed is silent would look live to a resource read or a stream.
    let (status, _, body) = rt.block_on(crate::mcp::post(&g.url, &researcher, &init, &[]));
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("revocation_stale"), "{body}");
}

#[test]
fn a_write_whose_record_cannot_be_kept_is_not_forwarded() {
    let g = Gw::start();
    let (task, grant) = g.w.start_task_as(
        "support.case-update",
        &["tool:crm.update:write", "dataset:crm:write"],
        &[AUDIENCE],
    );
    let planner = g.w.redeem(&grant, PLANNER, "spool-planner");
    let token = token_of(&planner);
    let case = |n: u32| {
        send(
            &planner,
            "POST",
            &format!("{}/crm/cases/{n}", g.url),
            Some(&token),
            &[],
        )
    };
    // Control: the spool is writable, the write goes on.
    let before = g.upstream.count();
    assert_eq!(case(1).status, 200);
    assert_eq!(g.upstream.count(), before + 1);

    // The spool's directory is taken away (a disk that fails): the next
    // write is refused before it reaches the upstream.
    let spool = g.w.c.path("gw-spool");
    let aside = g.w.c.path("gw-spool.aside");
    std::fs::rename(&spool, &aside).unwrap();
    std::fs::write(&spool, b"not a directory").unwrap();
    let refused = case(2);
    assert_eq!(refused.status, 503, "{refused:?}");
    assert_eq!(refused.body["code"], "audit_unavailable", "{refused:?}");
    assert_eq!(
        g.upstream.count(),
        before + 1,
        "a write was forwarded without its record"
    );
    // Its ops listener says so: not ready, naming the spool.
    crate::ops::wait_not_ready(&g.ops, "audit_spool", "the gateway not ready");
    let text = crate::ops::scrape(&g.ops);
    assert_eq!(
        crate::ops::value(&text, "baton_verifier_spool_up"),
        0.0,
        "{text}"
    );

    // The disk is back: writes go on again, and the trace holds the two
    // forwarded writes' records and nothing of the refused one.
    std::fs::remove_file(&spool).unwrap();
    std::fs::rename(&aside, &spool).unwrap();
    assert_eq!(case(3).status, 200);
    assert_eq!(g.upstream.count(), before + 2);
    crate::ops::wait_ready(&g.ops, "the gateway ready again");
    let text = crate::ops::scrape(&g.ops);
    assert_eq!(
        crate::ops::value(&text, "baton_verifier_spool_up"),
        1.0,
        "{text}"
    );
    let trace = wait_for("both writes in the trace", Duration::from_secs(60), || {
        let t = g.w.json(&["audit", "trace", &task, "--json"]).to_string();
        (t.matches("completes ").count() >= 2).then_some(t)
    });
    assert_eq!(trace.matches("completes ").count(), 2, "{trace}");
    assert!(
        g.gateway
            .log_text()
            .contains("cannot write tool-call reports to the audit spool"),
        "the failure is in the gateway's log"
    );
}

/// A plain HTTP upstream on a Unix socket that holds every request for
/// `delay` before answering; `received` counts what reached it.
fn slow_unix_upstream(path: &Path, delay: Duration, received: Arc<std::sync::atomic::AtomicUsize>) {
    on_unix_socket(path, move |listener| async move {
        let routes = warp::path::full().and_then(move |p: warp::path::FullPath| {
            received.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            async move {
                tokio::time::sleep(delay).await;
                Ok::<_, std::convert::Infallible>(warp::reply::json(
                    &serde_json::json!({"upstream": "slow", "path": p.as_str()}),
                ))
            }
        });
        warp::serve(routes).incoming(listener).run().await;
    });
}

/// What one call of a shutdown loop ended with.
#[derive(Debug)]
enum Ended {
    /// A 200 with the upstream's whole JSON answer.
    Answered,
    /// No answer: refused or closed before anything came back.
    NotTaken,
    /// What shutdown must never cause: another status or a cut body.
    Cut(String),
}

fn get_once(cert_dir: &Path, url: &str, token: &str) -> Ended {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = client(cert_dir);
    rt.block_on(async {
        let resp = match client
            .get(url)
            .header("authorization", format!("Bearer {token}"))
            .send()
            .await
        {
            Ok(r) => r,
            Err(_) => return Ended::NotTaken,
        };
        let status = resp.status().as_u16();
        match resp.json::<serde_json::Value>().await {
            Ok(v) if status == 200 && v["upstream"].is_string() => Ended::Answered,
            Ok(v) => Ended::Cut(format!("{status}: {v}")),
            Err(e) => Ended::Cut(format!("{status}: body cut: {e}")),
        }
    })
}

/// SIGTERM while calls are in flight: the gateway stops taking calls,
/// answers the ones it took in full (one held 2 s by its upstream), delivers
/// every call's record to the broker before it exits, and exits 0.
#[test]
fn sigterm_answers_calls_in_flight_delivers_their_records_and_exits_0() {
    let received = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let slow_seen = received.clone();
    let mut g = Gw::start_with(move |w| {
        let sock = w.c.path("slow.sock");
        slow_unix_upstream(&sock, Duration::from_secs(2), slow_seen);
        let extra = format!(
            r#"[upstreams.slow]
url = "unix:{}"

[[routes]]
method = "GET"
path = "/slow/{{account}}"
upstream = "slow"
tool = "crm.search"
resource = "dataset:crm"
permission = "tool:crm.search:read"
tier = "read"
"#,
            sock.display()
        );
        (extra, Vec::new())
    });
    let (task, _planner, researcher) = g.researcher();
    let token = token_of(&researcher);
    // Control: a call goes through before anything stops.
    assert!(matches!(
        get_once(&researcher, &format!("{}/crm/accounts/acme", g.url), &token),
        Ended::Answered
    ));

    // A call the slow upstream holds for 2 s, and a loop of quick calls.
    let slow = {
        let (dir, url, token) = (
            researcher.clone(),
            format!("{}/slow/acme", g.url),
            token.clone(),
        );
        std::thread::spawn(move || get_once(&dir, &url, &token))
    };
    wait_for(
        "the slow call reaches its upstream",
        Duration::from_secs(30),
        || (received.load(std::sync::atomic::Ordering::SeqCst) >= 1).then_some(()),
    );
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let quick: Vec<_> = (0..2)
        .map(|_| {
            let (dir, url, token, stop) = (
                researcher.clone(),
                format!("{}/crm/accounts/acme", g.url),
                token.clone(),
                stop.clone(),
            );
            std::thread::spawn(move || {
                let mut out = Vec::new();
                while !stop.load(std::sync::atomic::Ordering::SeqCst) && out.len() < 400 {
                    out.push(get_once(&dir, &url, &token));
                }
                out
            })
        })
        .collect();
    let before_term = g.upstream_count();
    wait_for("quick calls under way", Duration::from_secs(30), || {
        (g.upstream_count() >= before_term + 3).then_some(())
    });
    // Stop: SIGTERM, and the process must exit 0 by itself.
    g.gateway.stop();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);

    let slow = slow.join().unwrap();
    assert!(matches!(slow, Ended::Answered), "the held call: {slow:?}");
    let mut answered = 2; // the control and the held call
    for t in quick {
        for e in t.join().unwrap() {
            match e {
                Ended::Answered => answered += 1,
                Ended::NotTaken => {}
                Ended::Cut(why) => panic!("a call was cut by the shutdown: {why}"),
            }
        }
    }
    // Nothing reached an upstream without its answer reaching the caller.
    assert_eq!(
        g.upstream_count() + received.load(std::sync::atomic::Ordering::SeqCst),
        answered,
        "calls forwarded vs answered"
    );
    // Every answered call's record reached the broker before the gateway
    // exited: the spool is empty and the trace holds one record per call.
    let spooled: usize = std::fs::read_dir(g.w.c.path("gw-spool"))
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("tool-calls"))
        .map(|e| {
            std::fs::read_to_string(e.path())
                .unwrap_or_default()
                .lines()
                .filter(|l| !l.trim().is_empty())
                .count()
        })
        .sum();
    assert_eq!(
        spooled,
        0,
        "records left in the spool at exit: {:?}\n{}",
        std::fs::read_dir(g.w.c.path("gw-spool"))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| (
                e.file_name(),
                std::fs::read_to_string(e.path()).unwrap_or_default()
            ))
            .collect::<Vec<_>>(),
        g.gateway.log_text()
    );
    let trace = g.w.json(&["audit", "trace", &task, "--json"]);
    let mut calls = Vec::new();
    crate::mcp::collect_calls(&trace, "dataset:crm", &mut calls);
    let summary: Vec<String> = calls
        .iter()
        .map(|c| {
            format!(
                "{} {} {} {}",
                c["decision"], c["reason"], c["upstream_status"], c["output_digest"]
            )
        })
        .collect();
    assert_eq!(calls.len(), answered, "{summary:#?}");
    let log = std::fs::read_to_string(g.w.c.path("gateway.log")).unwrap_or_default();
    assert!(!log.contains("panicked"), "{log}");
}

/// A literal route listed after a capture that also matches it: the
/// literal must still win.
const SHADOWED: &str = r#"
[[routes]]
method = "GET"
path = "/crm/ledger/{id}"
upstream = "crm"
tool = "crm.search"
resource = "dataset:crm"
permission = "tool:crm.search:read"
tier = "read"

[[routes]]
method = "GET"
path = "/crm/ledger/export"
upstream = "crm"
tool = "crm.export"
resource = "dataset:crm"
permission = "tool:crm.export:export"
tier = "export"
"#;

/// A route whose resource is taken from the path, and a copy of the
/// shipped policies with a `forbid` on one of its resources.
const RECORDS: &str = r#"
[[routes]]
method = "GET"
path = "/crm/records/{id}"
upstream = "crm"
tool = "crm.search"
resource = "dataset:crm/{id}"
permission = "tool:crm.search:read"
tier = "read"
"#;

/// A copy of the shipped call policies plus `extra` (a file of its own).
pub(crate) fn policies_with(w: &World, extra: &str) -> std::path::PathBuf {
    let dir = w.c.path("gw-policies");
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policies");
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file()
            && p.extension()
                .is_some_and(|e| e == "cedar" || e == "cedarschema")
        {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(dir.join("extra.cedar"), extra).unwrap();
    dir
}

/// The gateway reads a path as an upstream will: escapes are decoded
/// before matching, so no literal route or captured resource is passed by
/// spelling it escaped; segments that decode to something an upstream
/// could read otherwise match no route; the path goes upstream in one
/// spelling. The most specific route wins whatever the file's order. And
/// no header passes as the verified caller or changes the method the call
/// was decided on.
#[test]
fn paths_are_read_as_the_upstream_reads_them_and_no_header_poses_as_the_caller() {
    let g = Gw::start_with(|w| {
        let dir = policies_with(
            w,
            "@id(\"records.not-42\")\nforbid (principal, action, resource == Resource::\"dataset:crm/42\");\n@id(\"records.not-acme\")\nforbid (principal, action, resource == Resource::\"dataset:crm/acme\");\n",
        );
        (
            format!("policies = \"{}\"\n{SHADOWED}{RECORDS}", dir.display()),
            Vec::new(),
        )
    });
    let (_task, _planner, researcher) = g.researcher();
    let token = token_of(&researcher);
    let url = |p: &str| format!("{}{p}", g.url);
    // Control: an id on the capture route.
    let ok = wait_for("the call allowed", Duration::from_secs(60), || {
        let a = send(
            &researcher,
            "GET",
            &url("/crm/ledger/acme"),
            Some(&token),
            &[],
        );
        (a.status == 200).then_some(a)
    });
    assert_eq!(ok.body["path"], "/crm/ledger/acme", "{ok:?}");
    let before = g.upstream_count();

    // The literal route, listed second, wins: an export the researcher's
    // scope does not hold. Spelled with an escape, it is the same route.
    for path in [
        "/crm/ledger/export",
        "/crm/ledger/expor%74",
        "/crm/ledger/%65xport",
        "/crm/ledger/EXPORT",
    ] {
        let a = send(&researcher, "GET", &url(path), Some(&token), &[]);
        assert_eq!(a.status, 403, "{path}: {a:?}");
        assert_eq!(
            a.challenge, "Bearer error=\"insufficient_scope\", scope=\"tool:crm.export:export\"",
            "{path}: {a:?}"
        );
    }
    // Segments an upstream could read otherwise match nothing.
    for path in [
        "/crm/ledger/a%2Fb",
        "/crm/ledger/..;/export",
        "/crm/ledger/export;x=1",
        "/crm/ledger/%2e%2e",
        "/crm/ledger/bad%zz",
        "/crm/ledger/a%00",
        "/crm/ledger/a%5Cb",
        // The literal but for a format suffix (Rails' `.:format`).
        "/crm/ledger/export.json",
    ] {
        let a = send(&researcher, "GET", &url(path), Some(&token), &[]);
        assert_eq!(a.status, 404, "{path}: {a:?}");
        assert_eq!(a.body["code"], "no_route", "{path}: {a:?}");
    }
    assert_eq!(g.upstream_count(), before, "a refused call was forwarded");

    // An escaped id is decoded; the upstream gets one spelling of it.
    // A header spelled with `_`, which CGI, WSGI and PHP fold into the
    // one the gateway sets or reads, is refused by name, not forwarded.
    let before = g.upstream_count();
    for (name, value) in [
        ("Baton_Actor", "spiffe://example.org/agents/mallory"),
        ("baton_task", "task-00000000000000000000000000000000"),
        ("X_HTTP_Method_Override", "DELETE"),
        ("Mcp_Session_Id", "a-leaked-session"),
        ("Last_Event_ID", "7"),
    ] {
        let a = send(
            &researcher,
            "GET",
            &url("/crm/ledger/acme"),
            Some(&token),
            &[(name, value)],
        );
        assert_eq!(a.status, 400, "{name}: {a:?}");
        assert!(
            a.body["error"].as_str().unwrap().contains("underscore"),
            "{name}: {a:?}"
        );
    }
    assert_eq!(
        g.upstream_count(),
        before,
        "an underscored header was forwarded"
    );
    let a = send(
        &researcher,
        "GET",
        &url("/crm/ledger/ac%6De%20co"),
        Some(&token),
        &[
            ("X-HTTP-Method-Override", "DELETE"),
            ("X-Original-URL", "/crm/ledger/export"),
            ("X-Forwarded-User", "mallory@example.com"),
            (
                "X-Forwarded-Client-Cert",
                "URI=spiffe://example.org/agents/mallory",
            ),
            // Identity headers of auth proxies an upstream may trust.
            ("X-WEBAUTH-USER", "admin"),
            ("X-Remote-Group", "system:masters"),
            ("X-Amzn-Oidc-Identity", "mallory"),
            (
                "X-Goog-Authenticated-User-Email",
                "accounts.google.com:mallory@example.com",
            ),
            ("Cf-Access-Authenticated-User-Email", "mallory@example.com"),
            ("X-Consumer-Username", "admin"),
            ("CF-Connecting-IP", "10.0.0.1"),
            ("Remote-Groups", "admins"),
            ("X-authentik-username", "akadmin"),
            ("Tailscale-User-Login", "mallory@example.com"),
            ("Teleport-Jwt-Assertion", "eyJ.x.y"),
            ("X-Vouch-User", "mallory"),
            ("X-Endpoint-API-UserInfo", "e30"),
            ("X-JWT-Assertion", "eyJ.x.y"),
            ("X-SSL-Cert", "-----BEGIN CERTIFICATE-----"),
            ("X-Client-DN", "CN=admin"),
            ("X-Client-Verify", "SUCCESS"),
            // Control: an ordinary header goes through.
            ("X-Request-Id", "req-42"),
        ],
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(a.body["path"], "/crm/ledger/acme%20co", "{a:?}");
    assert_eq!(g.upstream.last().header("x-request-id"), vec!["req-42"]);
    let seen = g.upstream.last();
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.header("baton-actor"), vec![RESEARCHER], "{seen:?}");
    for (name, _) in &seen.headers {
        assert!(!name.contains('_'), "{name} reached the upstream: {seen:?}");
        let folded = name.replace('_', "-");
        assert!(
            !folded.starts_with("baton-")
                || ["baton-task", "baton-actor", "baton-chain"].contains(&name.as_str()),
            "{name} reached the upstream: {seen:?}"
        );
        assert!(
            !["x-http-method-override", "x-original-url"].contains(&folded.as_str())
                && ![
                    "x-forwarded-",
                    "x-webauth-",
                    "x-remote-",
                    "x-amzn-oidc-",
                    "x-goog-authenticated-",
                    "cf-access-",
                    "x-consumer-",
                    "cf-connecting-ip",
                    "remote-",
                    "x-authentik-",
                    "tailscale-",
                    "teleport-",
                    "x-vouch-",
                    "x-endpoint-api-userinfo",
                    "x-jwt-assertion",
                    "x-ssl-",
                    "x-client-dn",
                    "x-client-verify",
                ]
                .iter()
                .any(|p| folded.starts_with(p)),
            "{name} reached the upstream: {seen:?}"
        );
    }
    // A `_method` parameter, in the query or a form body, is refused.
    let before = g.upstream_count();
    let a = send(
        &researcher,
        "GET",
        &url("/crm/ledger/acme?_method=DELETE"),
        Some(&token),
        &[],
    );
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body["error"].as_str().unwrap().contains("_method"),
        "{a:?}"
    );
    let a = send(
        &researcher,
        "GET",
        &url("/crm/ledger/acme?q=%5Fmethod"),
        Some(&token),
        &[],
    );
    assert_eq!(
        a.status, 200,
        "a value that only mentions it is fine: {a:?}"
    );
    assert_eq!(g.upstream_count(), before + 1);
    // ... and so is one in a multipart part's name or a JSON body's keys
    // (Rack and Laravel read those), while a body that only mentions it
    // is forwarded.
    let multipart = [("content-type", "multipart/form-data; boundary=b0undary")];
    let json = [("content-type", "application/json")];
    for (extra, body) in [
        (
            &multipart,
            "--b0undary\r\nContent-Disposition: form-data; name=\"_method\"\r\n\r\nDELETE\r\n--b0undary--\r\n",
        ),
        (&json, "{\"q\":\"acme\",\"_method\":\"DELETE\"}"),
    ] {
        let a = send_body(
            &researcher,
            "GET",
            &url("/crm/ledger/acme"),
            Some(&token),
            extra,
            body,
        );
        assert_eq!(a.status, 400, "{body}: {a:?}");
        assert!(
            a.body["error"].as_str().unwrap().contains("_method"),
            "{a:?}"
        );
    }
    let a = send_body(
        &researcher,
        "GET",
        &url("/crm/ledger/acme"),
        Some(&token),
        &multipart,
        "--b0undary\r\nContent-Disposition: form-data; name=\"q\"\r\n\r\nset _method here\r\n--b0undary--\r\n",
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(g.upstream_count(), before + 2);
    assert!(
        !seen.headers.iter().any(|(_, v)| v.contains("mallory")),
        "a forged identity reached the upstream: {seen:?}"
    );

    // A resource taken from the path has one spelling. Controls: another
    // record is forwarded; record 42 is refused by the `forbid`.
    let before = g.upstream_count();
    let a = send(
        &researcher,
        "GET",
        &url("/crm/records/43"),
        Some(&token),
        &[],
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(g.upstream_count(), before + 1);
    let a = send(
        &researcher,
        "GET",
        &url("/crm/records/42"),
        Some(&token),
        &[],
    );
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.body["code"], "policy_denied", "{a:?}");
    // Other spellings of 42 an upstream reads as 42 (trimmed, `.json` a
    // format, `int()` of `4_2`, fullwidth or Arabic-Indic digits) match no
    // route, so the `forbid` is not passed by any of them.
    for path in [
        "/crm/records/42%20",
        "/crm/records/%2042",
        "/crm/records/42%C2%A0",
        "/crm/records/42.json",
        "/crm/records/4_2",
        "/crm/records/%EF%BC%94%EF%BC%92",
        "/crm/records/%D9%A4%D9%A2",
    ] {
        let a = send(&researcher, "GET", &url(path), Some(&token), &[]);
        assert_eq!(a.status, 404, "{path}: {a:?}");
        assert_eq!(a.body["code"], "no_route", "{path}: {a:?}");
    }
    assert_eq!(
        g.upstream_count(),
        before + 1,
        "another spelling of 42 was forwarded"
    );
    // Nor by naming the capture again where ASP.NET Core MVC or Laravel
    // read it over the path: record 43 in the path, 42 in the query, a
    // form or the JSON body.
    let form = [("content-type", "application/x-www-form-urlencoded")];
    let json = [("content-type", "application/json")];
    for (path, extra, body) in [
        ("/crm/records/43?id=42", &json[..], "{\"q\":\"acme\"}"),
        ("/crm/records/43", &form[..], "q=acme&ID=42"),
        ("/crm/records/43", &json[..], "{\"q\":\"acme\",\"id\":42}"),
    ] {
        let a = send_body(&researcher, "GET", &url(path), Some(&token), extra, body);
        assert_eq!(a.status, 400, "{path} {body}: {a:?}");
        assert!(
            a.body["error"].as_str().unwrap().contains("`id`"),
            "{path} {body}: {a:?}"
        );
    }
    assert_eq!(
        g.upstream_count(),
        before + 1,
        "an overriding parameter was forwarded"
    );
    // Control: the same route with an unrelated body field goes on.
    let a = send_body(
        &researcher,
        "GET",
        &url("/crm/records/43?q=id"),
        Some(&token),
        &json,
        "{\"q\":\"acme\",\"note\":{\"id\":42}}",
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(g.upstream_count(), before + 2);

    // A format suffix on a text id: Rails (`/:id(.:format)`) reads
    // `acme.json` as record `acme`, format `json`, while the policy would
    // see `dataset:crm/acme.json` and the `forbid` on `dataset:crm/acme`
    // would not apply. Matches no route. Control: `acme` itself is
    // decided as ever (by that `forbid`).
    let before = g.upstream_count();
    let a = send(
        &researcher,
        "GET",
        &url("/crm/records/acme"),
        Some(&token),
        &[],
    );
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.body["code"], "policy_denied", "{a:?}");
    for path in [
        "/crm/records/acme.json",
        "/crm/records/acme.XML",
        "/crm/records/acme%2Ejson",
    ] {
        let a = send(&researcher, "GET", &url(path), Some(&token), &[]);
        assert_eq!(a.status, 404, "{path}: {a:?}");
        assert_eq!(a.body["code"], "no_route", "{path}: {a:?}");
    }
    assert_eq!(
        g.upstream_count(),
        before,
        "an id with a format suffix was forwarded"
    );

    // A parameter that makes the upstream run another route whatever the
    // path (WordPress's `rest_route`, read from the query or a form
    // body) is refused, never forwarded; an ordinary parameter goes on.
    for (path, extra, body) in [
        (
            "/crm/ledger/acme?rest_route=/wp/v2/users/1",
            &json[..],
            "{\"q\":\"acme\"}",
        ),
        ("/crm/ledger/acme?per_page=5&REST_ROUTE=/x", &json[..], ""),
        ("/crm/ledger/acme?rest%5Froute=/x", &json[..], ""),
        (
            "/crm/ledger/acme",
            &form[..],
            "per_page=5&rest_route=%2Fwp%2Fv2%2Fusers%2F1",
        ),
    ] {
        let a = send_body(&researcher, "GET", &url(path), Some(&token), extra, body);
        assert_eq!(a.status, 400, "{path} {body}: {a:?}");
        assert_eq!(a.body["code"], "invalid_request", "{path} {body}: {a:?}");
        assert!(
            a.body["error"].as_str().unwrap().contains("`rest_route`"),
            "{path} {body}: {a:?}"
        );
    }
    assert_eq!(
        g.upstream_count(),
        before,
        "a route-selecting parameter was forwarded"
    );
    let a = send(
        &researcher,
        "GET",
        &url("/crm/ledger/acme?per_page=5"),
        Some(&token),
        &[],
    );
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(g.upstream_count(), before + 1);
}

/// A route that records the amount of its JSON body.
const PAYMENTS: &str = r#"
[[routes]]
method = "POST"
path = "/crm/payments"
upstream = "crm"
tool = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"
record-input = ["/amount"]
"#;

/// Rails merges query parameters over the JSON body's (the query wins):
/// `POST /payments?amount=1000000` with `{"amount":10}` is amount 1000000
/// to it, while the record (and an approver) would show 10. A query or
/// form body naming a recorded input field is refused, never forwarded;
/// the untampered call is forwarded, and its record holds its query.
#[test]
fn a_query_over_a_recorded_field_is_refused_and_the_query_is_recorded() {
    let g = Gw::start_with(|_| (PAYMENTS.to_owned(), Vec::new()));
    let (task, cred) = crate::approval::writer(&g.w);
    let token = token_of(&cred);
    let url = |p: &str| format!("{}{p}", g.url);
    let json = [("content-type", "application/json")];
    let body = "{\"amount\":10}";
    // Control: the payment with an unrelated query parameter.
    let ok = wait_for("the payment forwarded", Duration::from_secs(60), || {
        let a = send_body(
            &cred,
            "POST",
            &url("/crm/payments?ref=x"),
            Some(&token),
            &json,
            body,
        );
        (a.status == 200).then_some(a)
    });
    assert_eq!(ok.body["path"], "/crm/payments", "{ok:?}");
    let before = g.upstream_count();
    for query in [
        "amount=1000000",
        "ref=x&Amount=1000000",
        "amount[]=1000000",
        "%61mount=1000000",
    ] {
        let a = send_body(
            &cred,
            "POST",
            &url(&format!("/crm/payments?{query}")),
            Some(&token),
            &json,
            body,
        );
        assert_eq!(a.status, 400, "{query}: {a:?}");
        assert_eq!(a.body["code"], "invalid_request", "{query}: {a:?}");
        let why = a.body["error"].as_str().unwrap();
        assert!(
            why.contains("`amount`") && why.contains("record-input /amount"),
            "{query}: {a:?}"
        );
    }
    // A form body that names it: refused as well.
    let a = send_body(
        &cred,
        "POST",
        &url("/crm/payments"),
        Some(&token),
        &[("content-type", "application/x-www-form-urlencoded")],
        "amount=1000000",
    );
    assert_eq!(a.status, 400, "{a:?}");
    assert!(
        a.body["error"].as_str().unwrap().contains("`amount`"),
        "{a:?}"
    );
    assert_eq!(
        g.upstream_count(),
        before,
        "a query over a recorded field was forwarded"
    );

    // The control's record holds its query's keyed digest beside the
    // recorded amount; no record holds the refused calls' amount.
    let key = std::fs::read(g.w.c.path("gw-spool").join("digest.key")).unwrap();
    let query_digest = hex::encode(aws_lc_rs::hmac::sign(
        &aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &key),
        b"ref=x",
    ));
    let calls = wait_for("the payment's record", Duration::from_secs(30), || {
        let t = g.w.json(&["audit", "trace", &task, "--json"]);
        let mut calls = Vec::new();
        crate::mcp::collect_calls(&t, "dataset:crm", &mut calls);
        calls
            .iter()
            .any(|c| c["recorded"]["request:query-digest"] == query_digest.as_str())
            .then_some(calls)
    });
    let call = calls
        .iter()
        .find(|c| c["recorded"]["request:query-digest"] == query_digest.as_str())
        .unwrap();
    assert_eq!(call["recorded"]["input:/amount"], "10", "{call}");
    assert!(
        !calls
            .iter()
            .any(|c| c["recorded"].to_string().contains("1000000")),
        "a refused call was recorded: {calls:#?}"
    );
}
