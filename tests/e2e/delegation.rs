//! The delegation chain end to end: a human starts a task, a planner hands a
//! narrower scope to a researcher, the researcher calls the example tool
//! server (read allowed, write denied), the task ends, and the audit trace
//! shows exactly the chain the token carries. Then the attacks.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::harness::{Cluster, Options, Proc, baton, wait_for};

pub const PLANNER: &str = "spiffe://example.org/agents/planner";
pub const RESEARCHER: &str = "spiffe://example.org/agents/researcher";
pub const TOOL: &str = "spiffe://example.org/tools/crm";

/// A cluster with the three agents registered and the example tool server up.
pub struct World {
    pub c: Cluster,
    /// Kept so the tool server lives as long as the world.
    pub _tool: Proc,
    pub tool_url: String,
}

impl World {
    pub fn start() -> Self {
        Self::start_with(None)
    }

    /// With a Redis URL, the broker keeps revocations there and the tool
    /// server follows its feed (stale after 10 s).
    pub fn start_with(redis: Option<&str>) -> Self {
        Self::start_with_args(redis, Vec::new())
    }

    /// `start_with`, plus extra `baton broker` arguments.
    pub fn start_with_args(redis: Option<&str>, broker_args: Vec<String>) -> Self {
        Self::start_with_options(
            redis,
            Options {
                broker_args,
                ..Options::default()
            },
        )
    }

    /// `start_with`, with extra `baton broker` and `baton agent` arguments.
    pub fn start_with_options(redis: Option<&str>, opts: Options) -> Self {
        let mut broker_args = opts.broker_args.clone();
        let mut tool_args: Vec<String> = opts.tool_args.clone();
        if let Some(url) = redis {
            tool_args.extend([
                "--redis".into(),
                url.into(),
                "--stale-after".into(),
                "10s".into(),
            ]);
            broker_args.extend(["--redis".to_owned(), url.to_owned()]);
        }
        // The example tool server reports the calls of tokens for `crm`.
        broker_args.extend(["--tool-server".to_owned(), format!("crm={TOOL}")]);
        let c = Cluster::start_with_broker_args(opts, broker_args);
        // The tool server's entry first, so it is the default SVID of a
        // process of this uid (the agent answers in entry order).
        c.register("/tools/crm", &[]);
        c.register("/agents/planner", &[]);
        c.register("/agents/researcher", &[]);
        let ready = c.path("tool.addr");
        let mut cmd = baton();
        cmd.args([
            "example",
            "tool-server",
            "--audience",
            "crm",
            "--spiffe-id",
            TOOL,
        ])
        .args(&tool_args)
        .arg("--socket")
        .arg(c.agent_socket());
        if !tool_args.iter().any(|a| a == "--broker-url") {
            cmd.arg("--broker-url")
                .arg(format!("https://{}", c.broker_addr));
        }
        cmd.arg("--spool")
            .arg(c.path("tool-spool"))
            .arg("--ready-file")
            .arg(&ready);
        let mut tool = Proc::spawn("tool-server", cmd, c.path("tool.log"));
        let addr = wait_for("tool server ready", Duration::from_secs(60), || {
            assert!(tool.is_running(), "tool server exited: {}", tool.log_text());
            std::fs::read_to_string(&ready).ok()
        });
        // The node daemon serves every registered agent before a test
        // redeems for one (it may have synced the tool's entry alone).
        for id in [PLANNER, RESEARCHER] {
            wait_for(
                "the node daemon serves the agents' entries",
                Duration::from_secs(60),
                || {
                    baton()
                        .args(["svid", "fetch", "--spiffe-id", id])
                        .env("SPIFFE_ENDPOINT_SOCKET", c.endpoint())
                        .output()
                        .ok()
                        .filter(|o| o.status.success())
                },
            );
        }
        World {
            c,
            _tool: tool,
            tool_url: format!("https://{addr}"),
        }
    }

    pub fn broker_url(&self) -> String {
        format!("https://{}", self.c.broker_addr)
    }

    pub fn run(&self, args: &[&str]) -> Output {
        baton()
            .args(args)
            .env("BATON_ADMIN_SOCKET", self.c.admin_socket())
            .env(
                "SPIFFE_ENDPOINT_SOCKET",
                format!("unix:{}", self.c.agent_socket().display()),
            )
            .env("BATON_BROKER_URL", self.broker_url())
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "baton {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    /// Runs a command expected to be refused; returns its stderr.
    pub fn refused(&self, args: &[&str]) -> String {
        let out = self.run(args);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(
            out.status.code(),
            Some(2),
            "baton {args:?} should be refused: {err}"
        );
        err
    }

    pub fn start_task(
        &self,
        scope: &[&str],
        max_depth: &str,
        ttl: &str,
        ceiling: &str,
    ) -> (String, String) {
        let v = self.json(&task_start_args(scope, max_depth, ttl, ceiling));
        (
            v["task_id"].as_str().unwrap().to_owned(),
            v["grant"].as_str().unwrap().to_owned(),
        )
    }

    /// A task for the planner with `scope`, whose tokens name `audience`.
    pub fn start_task_for(&self, scope: &[&str], audience: &[&str]) -> (String, String) {
        self.start_task_as("support.case-research", scope, audience)
    }

    /// As [`start_task_for`](Self::start_task_for), for `purpose`.
    pub fn start_task_as(
        &self,
        purpose: &str,
        scope: &[&str],
        audience: &[&str],
    ) -> (String, String) {
        let out = self.try_start_task_as(purpose, scope, audience);
        assert!(
            out.status.success(),
            "task start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        (
            v["task_id"].as_str().unwrap().to_owned(),
            v["grant"].as_str().unwrap().to_owned(),
        )
    }

    /// The task start of [`start_task_as`](Self::start_task_as), as a
    /// command that may fail.
    pub fn try_start_task_as(&self, purpose: &str, scope: &[&str], audience: &[&str]) -> Output {
        let mut args = vec![
            "task",
            "start",
            "--user",
            "alice@example.com",
            "--group",
            "engineering",
            "--root-agent",
            PLANNER,
            "--purpose",
            purpose,
            "--risk-ceiling",
            "write",
            "--ttl",
            "10m",
            "--max-depth",
            "2",
            "-o",
            "json",
        ];
        for a in audience {
            args.extend(["--audience", a]);
        }
        for s in scope {
            args.extend(["--scope", s]);
        }
        self.run(&args)
    }

    pub fn redeem(&self, grant: &str, as_id: &str, dir: &str) -> PathBuf {
        let out = self.c.path(dir);
        self.ok(&[
            "grant",
            "redeem",
            "--grant",
            grant,
            "--spiffe-id",
            as_id,
            "--out",
            out.to_str().unwrap(),
        ]);
        out
    }

    pub fn delegate(&self, cred: &Path, target: &str, scope: &[&str], extra: &[&str]) -> Output {
        let mut args = vec![
            "delegate",
            "--credential",
            cred.to_str().unwrap(),
            "--target",
            target,
            "--audience",
            "crm",
            "--justification",
            "look up the customer's open cases",
            "-o",
            "json",
        ];
        for s in scope {
            args.extend(["--scope", s]);
        }
        args.extend(extra);
        self.run(&args)
    }

    pub fn call(&self, cred: &Path, tool: &str) -> Output {
        self.run(&[
            "example",
            "call",
            "--credential",
            cred.to_str().unwrap(),
            "--url",
            &self.tool_url,
            "--tool",
            tool,
            "--input",
            r#"{"q":"acme"}"#,
        ])
    }
}

/// `baton task start` for alice, rooted at the planner, for `crm`, with
/// `-o json`.
pub fn task_start_args<'a>(
    scope: &[&'a str],
    max_depth: &'a str,
    ttl: &'a str,
    ceiling: &'a str,
) -> Vec<&'a str> {
    let mut args = vec![
        "task",
        "start",
        "--user",
        "alice@example.com",
        "--group",
        "engineering",
        "--root-agent",
        PLANNER,
        "--purpose",
        "support.case-research",
        "--risk-ceiling",
        ceiling,
        "--ttl",
        ttl,
        "--max-depth",
        max_depth,
        "--audience",
        "crm",
        "-o",
        "json",
    ];
    for s in scope {
        args.extend(["--scope", s]);
    }
    args
}

pub fn claims(cred: &Path) -> serde_json::Value {
    let token = std::fs::read_to_string(cred.join("token")).unwrap();
    let payload = token.trim().split('.').nth(1).unwrap();
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).unwrap()).unwrap()
}

pub fn grant_of(out: &Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["grant"].as_str().unwrap().to_owned()
}

const FULL: &[&str] = &[
    "tool:crm.search:read",
    "tool:crm.update:write",
    "dataset:crm:read",
];
const NARROW: &[&str] = &["tool:crm.search:read", "dataset:crm:read"];

#[test]
fn example_flow_chain_in_token_matches_audit_trace() {
    let w = World::start();
    let (task, grant) = w.start_task(FULL, "2", "10m", "write");
    let planner = w.redeem(&grant, PLANNER, "planner");
    let pc = claims(&planner);
    assert_eq!(pc["sub"], "alice@example.com");
    assert_eq!(pc["depth"], 0);
    assert_eq!(pc["act"]["sub"], PLANNER);

    let hop = w.delegate(&planner, RESEARCHER, NARROW, &[]);
    let researcher = w.redeem(&grant_of(&hop), RESEARCHER, "researcher");
    let rc = claims(&researcher);
    assert_eq!(rc["sub"], "alice@example.com");
    assert_eq!(rc["depth"], 1);
    assert_eq!(rc["task"]["id"], task.as_str());
    assert_eq!(rc["task"]["purpose"], "support.case-research");
    assert_eq!(rc["act"]["sub"], RESEARCHER);
    assert_eq!(rc["act"]["act"]["sub"], PLANNER);
    assert!(rc["act"]["act"]["act"].is_null());
    assert_eq!(rc["parent"]["jti"], pc["jti"]);
    let mut scope: Vec<String> = serde_json::from_value(rc["scope"].clone()).unwrap();
    scope.sort();
    let mut want: Vec<String> = NARROW.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(scope, want);
    assert!(rc["exp"].as_u64() <= pc["exp"].as_u64());
    assert!(rc["cnf"]["x5t#S256"].is_string());

    // Read allowed, write denied.
    let ok = w.call(&researcher, "crm.search");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("Acme Corp"));
    let denied = w.call(&researcher, "crm.update");
    assert_eq!(denied.status.code(), Some(2));
    // A tool the server does not serve, and one whose name no record can
    // keep: refused, and recorded (the long one by its size).
    let long = "x".repeat(300);
    for unknown in ["crm.drop", long.as_str()] {
        let out = w.call(&researcher, unknown);
        assert_eq!(out.status.code(), Some(2), "{unknown}");
    }

    w.ok(&["task", "end", &task]);
    // Once ended, no more hops.
    let late = w.delegate(&planner, RESEARCHER, NARROW, &[]);
    assert_eq!(late.status.code(), Some(2));
    // Ending the task revoked the planner's token, so the hop is refused.
    let err = String::from_utf8_lossy(&late.stderr);
    assert!(err.contains("revoked") || err.contains("ended"), "{err}");

    // The tool server's reports reach the broker (possibly after a retry).
    let trace = wait_for("tool calls in the trace", Duration::from_secs(30), || {
        let t = w.json(&["audit", "trace", &task, "--json"]);
        let s = t.to_string();
        (s.contains("crm.search")
            && s.contains("crm.update")
            && s.contains("unrecordable tool name: 300 bytes"))
        .then_some(t)
    });
    let s = trace.to_string();
    assert!(s.contains("crm.drop") && s.contains("unknown_tool"), "{s}");
    let text = w.ok(&["audit", "trace", &task]);
    eprintln!("{text}");
    let s = trace.to_string();
    for want in [
        "alice@example.com",
        PLANNER,
        RESEARCHER,
        "look up the customer's open cases",
        "support.case-research",
    ] {
        assert!(s.contains(want), "trace lacks {want}: {s}");
        assert!(text.contains(want), "text trace lacks {want}: {text}");
    }
    // The chain in the trace is the chain in the token: the hop to the
    // researcher hangs under the planner, with the token's scope.
    let hop_node = find_hop(&trace, RESEARCHER).expect("hop to researcher in trace");
    assert_eq!(hop_node["actor"].as_str(), Some(PLANNER), "{hop_node}");
    let mut trace_scope: Vec<String> = serde_json::from_value(hop_node["scope"].clone()).unwrap();
    let mut token_scope: Vec<String> = serde_json::from_value(rc["scope"].clone()).unwrap();
    trace_scope.sort();
    token_scope.sort();
    assert_eq!(trace_scope, token_scope);
    let v = w.ok(&["audit", "verify"]);
    assert!(v.contains("verified"), "{v}");
}

/// Finds the granted hop to `target` anywhere in the trace JSON, with the
/// agent of the node it hangs under (the delegator) as `actor`.
pub fn find_hop(v: &serde_json::Value, target: &str) -> Option<serde_json::Value> {
    match v {
        serde_json::Value::Object(m) => {
            if let (Some(agent), Some(items)) =
                (m.get("agent"), m.get("items").and_then(|i| i.as_array()))
            {
                for item in items {
                    if item["type"] == "hop" && item["target"] == target && item["granted"] == true
                    {
                        let mut hop = item.clone();
                        hop["actor"] = agent.clone();
                        return Some(hop);
                    }
                }
            }
            m.values().find_map(|x| find_hop(x, target))
        }
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_hop(x, target)),
        _ => None,
    }
}

#[test]
fn hop_attacks_are_refused_with_reasons_and_audited() {
    let w = World::start();
    let (task, grant) = w.start_task(FULL, "1", "10m", "write");
    let planner = w.redeem(&grant, PLANNER, "planner");
    let researcher = {
        let hop = w.delegate(&planner, RESEARCHER, NARROW, &[]);
        let g = grant_of(&hop);
        // Redeemed by a different SPIFFE ID: refused, and the grant survives.
        let wrong = w.refused(&[
            "grant",
            "redeem",
            "--grant",
            &g,
            "--spiffe-id",
            PLANNER,
            "--out",
            w.c.path("wrong").to_str().unwrap(),
        ]);
        assert!(wrong.contains("bound to"), "{wrong}");
        let r = w.redeem(&g, RESEARCHER, "researcher");
        // Redeemed twice.
        let twice = w.refused(&[
            "grant",
            "redeem",
            "--grant",
            &g,
            "--spiffe-id",
            RESEARCHER,
            "--out",
            w.c.path("twice").to_str().unwrap(),
        ]);
        assert!(twice.contains("already redeemed"), "{twice}");
        r
    };
    // Scope widened at a hop.
    let out = w.delegate(&researcher, PLANNER, &["tool:crm.update:write"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("scope_widened") && err.contains("tool:crm.update:write"),
        "{err}"
    );
    // Purpose changed at a hop.
    let out = w.delegate(
        &planner,
        RESEARCHER,
        NARROW,
        &["--purpose", "support.case-update"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("purpose_changed"), "{err}");
    // Depth over the maximum (max_depth 1; the researcher is at 1).
    let out = w.delegate(&researcher, TOOL, &["tool:crm.search:read"], &[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("depth_exceeded"), "{err}");

    // Every refusal is in the audit log with its reason.
    let t = w.json(&["audit", "trace", &task, "--json"]).to_string();
    for reason in [
        "scope_widened",
        "purpose_changed",
        "depth_exceeded",
        "wrong_target",
        "grant_used",
    ] {
        assert!(t.contains(reason), "trace lacks refusal {reason}: {t}");
    }
}

/// Copies a credential directory so a test can tamper with the copy.
pub fn copy_cred(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for f in ["svid.pem", "key.pem", "bundle.pem", "token", "task.json"] {
        std::fs::copy(from.join(f), to.join(f)).unwrap();
    }
}

fn b64(v: &serde_json::Value) -> String {
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(v).unwrap())
}

fn call_err(w: &World, cred: &Path, tool: &str) -> String {
    let out = w.call(cred, tool);
    assert_eq!(
        out.status.code(),
        Some(2),
        "call with {} should be refused: {}",
        cred.display(),
        String::from_utf8_lossy(&out.stdout)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn token_attacks_at_the_tool_server() {
    let w = World::start();
    let (task, grant) = w.start_task(FULL, "2", "10m", "write");
    let planner = w.redeem(&grant, PLANNER, "planner");
    let researcher = w.redeem(
        &grant_of(&w.delegate(&planner, RESEARCHER, NARROW, &[])),
        RESEARCHER,
        "researcher",
    );
    let token = std::fs::read_to_string(researcher.join("token")).unwrap();
    let parts: Vec<&str> = token.trim().split('.').collect();
    let header: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
    let claims = claims(&researcher);

    let forged = |name: &str, token: String| {
        let dir = w.c.path(name);
        copy_cred(&researcher, &dir);
        std::fs::write(dir.join("token"), token).unwrap();
        dir
    };

    // Any claim altered (the signature no longer matches).
    for (field, value) in [
        (
            "scope",
            serde_json::json!([
                "tool:crm.search:read",
                "tool:crm.update:write",
                "dataset:crm:read"
            ]),
        ),
        (
            "exp",
            serde_json::json!(claims["exp"].as_u64().unwrap() + 3600),
        ),
        ("sub", serde_json::json!("mallory@example.com")),
        ("depth", serde_json::json!(0)),
    ] {
        let mut c = claims.clone();
        c[field] = value;
        let dir = forged(
            &format!("altered-{field}"),
            format!("{}.{}.{}", parts[0], b64(&c), parts[2]),
        );
        let err = call_err(&w, &dir, "crm.search");
        assert!(err.contains("bad_signature"), "{field}: {err}");
    }
    // alg none.
    let mut h = header.clone();
    h["alg"] = "none".into();
    let err = call_err(
        &w,
        &forged("alg-none", format!("{}.{}.", b64(&h), parts[1])),
        "crm.search",
    );
    assert!(err.contains("alg_none"), "{err}");
    // HS256 keyed with something public.
    let mut h = header.clone();
    h["alg"] = "HS256".into();
    let signing_input = format!("{}.{}", b64(&h), parts[1]);
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, b"public key bytes");
    let sig =
        URL_SAFE_NO_PAD.encode(aws_lc_rs::hmac::sign(&key, signing_input.as_bytes()).as_ref());
    let err = call_err(
        &w,
        &forged("hs256", format!("{signing_input}.{sig}")),
        "crm.search",
    );
    assert!(err.contains("symmetric_alg"), "{err}");
    // Signed by a key the bundle does not hold (another CA of the same name).
    let other = baton_ca::Ca::load_or_create(
        baton_ca::CaConfig::new(baton_core::TrustDomain::new("example.org").unwrap()),
        std::time::SystemTime::now(),
    )
    .unwrap();
    let parsed: baton_core::DelegationClaims = serde_json::from_value(claims.clone()).unwrap();
    let foreign = other.sign_delegation_token(&parsed).unwrap();
    let err = call_err(
        &w,
        &forged("unknown-key", foreign.expose().to_owned()),
        "crm.search",
    );
    assert!(err.contains("unknown_kid"), "{err}");
    // Presented over mTLS by a different certificate than the bound one.
    let mixed = w.c.path("mixed");
    copy_cred(&researcher, &mixed);
    std::fs::copy(planner.join("svid.pem"), mixed.join("svid.pem")).unwrap();
    std::fs::copy(planner.join("key.pem"), mixed.join("key.pem")).unwrap();
    let err = call_err(&w, &mixed, "crm.search");
    assert!(err.contains("certificate_mismatch"), "{err}");
    // A token for another audience: a task started for `crm` and `billing`,
    // handed on for `billing` only, is refused by the `crm` tool server.
    let (_t, g) = w.start_task_for(FULL, &["crm", "billing"]);
    let both = w.redeem(&g, PLANNER, "both-aud");
    let billing_only = w.run(&[
        "delegate",
        "--credential",
        both.to_str().unwrap(),
        "--target",
        RESEARCHER,
        "--audience",
        "billing",
        "--justification",
        "billing lookup",
        "--scope",
        "tool:crm.search:read",
        "-o",
        "json",
    ]);
    let other_aud = w.redeem(&grant_of(&billing_only), RESEARCHER, "other-aud");
    let err = call_err(&w, &other_aud, "crm.search");
    assert!(err.contains("audience_mismatch"), "{err}");
    // Chain splicing: the researcher's token re-parented onto another task's
    // planner token. The chain is under the broker's signature, so the
    // spliced token fails; the broker also refuses tokens it has no record of
    // for that task.
    let (_task2, grant2) = w.start_task(FULL, "2", "10m", "write");
    let planner2 = w.redeem(&grant2, PLANNER, "planner2");
    let p2 = self::claims(&planner2);
    let mut spliced = claims.clone();
    spliced["parent"]["jti"] = p2["jti"].clone();
    spliced["act"]["act"] = p2["act"].clone();
    spliced["task"] = p2["task"].clone();
    let dir = forged(
        "spliced",
        format!("{}.{}.{}", parts[0], b64(&spliced), parts[2]),
    );
    let err = call_err(&w, &dir, "crm.search");
    assert!(err.contains("bad_signature"), "{err}");
    let out = w.delegate(&dir, RESEARCHER, NARROW, &[]);
    assert_eq!(out.status.code(), Some(2));

    // The broker's own token presented by the wrong holder is reported
    // under its task; the forged ones (their signature is not the broker's,
    // so their claims name whatever task their forger likes) are not, or
    // anyone with an SVID could fill a task's trace. A second mismatch made
    // after the last forgery is the marker: reports arrive in order.
    let err = call_err(&w, &mixed, "crm.search");
    assert!(err.contains("certificate_mismatch"), "{err}");
    let t = wait_for("refusals in the trace", Duration::from_secs(30), || {
        let t = w.json(&["audit", "trace", &task, "--json"]).to_string();
        (t.matches("token refused (certificate_mismatch)").count() >= 2).then_some(t)
    });
    for forgery in ["alg_none", "symmetric_alg", "unknown_kid", "bad_signature"] {
        assert!(
            !t.contains(forgery),
            "a forged token's refusal ({forgery}) is in the task's trace: {t}"
        );
    }
}

#[test]
fn expired_token_is_refused() {
    let w = World::start();
    let (_task, grant) = w.start_task(FULL, "2", "20s", "write");
    let planner = w.redeem(&grant, PLANNER, "planner");
    let planner = w.redeem(
        &grant_of(&w.delegate(&planner, RESEARCHER, NARROW, &[])),
        RESEARCHER,
        "researcher",
    );
    let exp = claims(&planner)["exp"].as_u64().unwrap();
    let ok = w.call(&planner, "crm.search");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Wait by the clock until the token has expired.
    wait_for("token expiry", Duration::from_secs(60), || {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        (now > exp).then_some(())
    });
    // The task certificate and its token expire together: the call fails
    // at the handshake or at the token check, never succeeds.
    let out = w.call(&planner, "crm.search");
    assert!(!out.status.success(), "expired credential accepted");
    // The tool server says why (its handshake log names the expiry).
    wait_for(
        "the expiry in the tool server's log",
        Duration::from_secs(10),
        || {
            std::fs::read_to_string(w.c.path("tool.log"))
                .ok()
                .filter(|l| l.to_lowercase().contains("expired"))
                .map(|_| ())
        },
    );
}
