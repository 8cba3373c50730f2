//! Traces: a broker run with `--otlp-endpoint` exports a span per task
//! start, hop, redeem and tool-call report over OTLP/HTTP (protobuf) with
//! `baton.task_id`, `baton.jti` and `baton.actor`; a W3C `traceparent` sent
//! with a request (by the CLI from TRACEPARENT, through the node daemon for
//! a redeem) is continued, and its trace id is recorded in the audit events,
//! so `baton audit trace` and the agent framework's trace join up.
//!
//! The collector is a small HTTP/1.1 server inside the test that keeps
//! every `POST /v1/traces` body and decodes it with `opentelemetry-proto`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Output;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;

use crate::delegation::{PLANNER, RESEARCHER, World, grant_of};
use crate::harness::{baton, wait_for};

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CALLER_SPAN: &str = "00f067aa0ba902b7";
/// The agent framework's span around a tool call.
const TOOL_CALLER_SPAN: &str = "b7ad6b7169203331";

/// An OTLP/HTTP collector on a free loopback port.
struct Collector {
    url: String,
    bodies: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Collector {
    fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let bodies: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let keep = bodies.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                let keep = keep.clone();
                std::thread::spawn(move || serve(conn, &keep));
            }
        });
        Collector { url, bodies }
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<SpanSeen> {
        let bodies = self.bodies.lock().unwrap().clone();
        let mut out = Vec::new();
        for body in bodies {
            let req = ExportTraceServiceRequest::decode(body.as_slice())
                .expect("an OTLP ExportTraceServiceRequest");
            for rs in req.resource_spans {
                for ss in rs.scope_spans {
                    for s in ss.spans {
                        let attrs = s
                            .attributes
                            .iter()
                            .filter_map(|kv| {
                                let v = match kv.value.as_ref()?.value.as_ref()? {
                                    Value::StringValue(s) => s.clone(),
                                    Value::IntValue(i) => i.to_string(),
                                    Value::BoolValue(b) => b.to_string(),
                                    other => format!("{other:?}"),
                                };
                                Some((kv.key.clone(), v))
                            })
                            .collect();
                        out.push(SpanSeen {
                            name: s.name,
                            trace_id: hex::encode(&s.trace_id),
                            parent_span_id: hex::encode(&s.parent_span_id),
                            attrs,
                        });
                    }
                }
            }
        }
        out
    }
}

#[derive(Debug, Clone)]
struct SpanSeen {
    name: String,
    trace_id: String,
    parent_span_id: String,
    attrs: HashMap<String, String>,
}

impl SpanSeen {
    fn attr(&self, k: &str) -> Option<&str> {
        self.attrs.get(k).map(String::as_str)
    }
}

/// Answers HTTP/1.1 requests on one connection (keep-alive), keeping the
/// bodies of `POST /v1/traces`.
fn serve(conn: TcpStream, keep: &Mutex<Vec<Vec<u8>>>) {
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut conn = conn;
    loop {
        let mut request_line = String::new();
        if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
            return;
        }
        let mut length = 0usize;
        loop {
            let mut h = String::new();
            if reader.read_line(&mut h).unwrap_or(0) == 0 {
                return;
            }
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).is_err() {
            return;
        }
        if request_line.starts_with("POST /v1/traces ") {
            keep.lock().unwrap().push(body);
        }
        let answer =
            "HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
        if conn.write_all(answer.as_bytes()).is_err() {
            return;
        }
    }
}

/// `baton <args>` in the world, as an agent framework would run it inside
/// its trace (TRACEPARENT), or outside any (None).
fn run_traced(w: &World, args: &[&str], traceparent: Option<&str>) -> Output {
    let mut cmd = baton();
    cmd.args(args)
        .env("BATON_ADMIN_SOCKET", w.c.admin_socket())
        .env("SPIFFE_ENDPOINT_SOCKET", w.c.endpoint())
        .env("BATON_BROKER_URL", w.broker_url());
    if let Some(tp) = traceparent {
        cmd.env("TRACEPARENT", tp);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "baton {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn json_of(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout).unwrap()
}

fn token_jti(cred: &std::path::Path) -> String {
    crate::delegation::claims(cred)["jti"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn request_spans_reach_an_otlp_collector_and_a_callers_trace_joins_the_audit_log() {
    let collector = Collector::start();
    let w = World::start_with_args(None, vec!["--otlp-endpoint".into(), collector.url.clone()]);
    let traceparent = format!("00-{TRACE_ID}-{CALLER_SPAN}-01");
    let tp = Some(traceparent.as_str());

    // Task start, redeem, hop and its redeem inside the caller's trace; the
    // tool call is reported by the tool server on its own.
    let started = run_traced(
        &w,
        &[
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
            "read",
            "--ttl",
            "10m",
            "--max-depth",
            "2",
            "--audience",
            "crm",
            "--scope",
            "tool:crm.search:read",
            "-o",
            "json",
        ],
        tp,
    );
    let started = json_of(&started);
    let task = started["task_id"].as_str().unwrap().to_owned();
    let grant = started["grant"].as_str().unwrap().to_owned();
    let planner = w.c.path("planner");
    let redeem = |grant: &str, id: &str, out: &std::path::Path| {
        run_traced(
            &w,
            &[
                "grant",
                "redeem",
                "--grant",
                grant,
                "--spiffe-id",
                id,
                "--out",
                out.to_str().unwrap(),
            ],
            tp,
        )
    };
    redeem(&grant, PLANNER, &planner);
    let planner_jti = token_jti(&planner);
    let hop = run_traced(
        &w,
        &[
            "delegate",
            "--credential",
            planner.to_str().unwrap(),
            "--target",
            RESEARCHER,
            "--audience",
            "crm",
            "--scope",
            "tool:crm.search:read",
            "--justification",
            "look up the customer's open cases",
            "-o",
            "json",
        ],
        tp,
    );
    let researcher = w.c.path("researcher");
    redeem(&grant_of(&hop), RESEARCHER, &researcher);
    let researcher_jti = token_jti(&researcher);
    let call = w.call(&researcher, "crm.search");
    assert!(
        call.status.success(),
        "{}",
        String::from_utf8_lossy(&call.stderr)
    );
    // The same call inside the caller's trace: the tool server passes the
    // request's traceparent on with its report.
    let tool_tp = format!("00-{TRACE_ID}-{TOOL_CALLER_SPAN}-01");
    run_traced(
        &w,
        &[
            "example",
            "call",
            "--credential",
            researcher.to_str().unwrap(),
            "--url",
            &w.tool_url,
            "--tool",
            "crm.search",
            "--input",
            r#"{"q":"acme"}"#,
        ],
        Some(&tool_tp),
    );

    // The broker exports in batches: wait for every kind of span.
    let want = [
        "baton.task.start",
        "baton.redeem",
        "baton.hop",
        "baton.tool_call",
    ];
    let spans = wait_for("the broker's spans", Duration::from_secs(60), || {
        let spans = collector.spans();
        let for_task = |name: &str| {
            spans
                .iter()
                .filter(|s| s.name == name && s.attr("baton.task_id") == Some(task.as_str()))
                .count()
        };
        (for_task("baton.task.start") >= 1
            && for_task("baton.redeem") >= 2
            && for_task("baton.hop") >= 1
            && for_task("baton.tool_call") >= 2)
            .then_some(spans)
    });
    let of = |name: &str| -> Vec<&SpanSeen> {
        spans
            .iter()
            .filter(|s| s.name == name && s.attr("baton.task_id") == Some(task.as_str()))
            .collect()
    };
    for name in want {
        for s in of(name) {
            assert_eq!(s.attr("baton.outcome"), Some("ok"), "{s:?}");
            assert!(s.attr("baton.actor").is_some(), "{s:?}");
        }
    }
    // The traced requests continue the caller's span.
    for name in ["baton.task.start", "baton.redeem", "baton.hop"] {
        for s in of(name) {
            assert_eq!(s.trace_id, TRACE_ID, "{s:?}");
            assert_eq!(s.parent_span_id, CALLER_SPAN, "{s:?}");
        }
    }
    assert_eq!(of("baton.task.start")[0].attr("baton.actor"), Some(PLANNER));
    let hop_span = of("baton.hop")[0];
    assert_eq!(hop_span.attr("baton.actor"), Some(PLANNER));
    assert_eq!(hop_span.attr("baton.jti"), Some(planner_jti.as_str()));
    let redeems = of("baton.redeem");
    assert!(
        redeems
            .iter()
            .any(|s| s.attr("baton.actor") == Some(RESEARCHER)
                && s.attr("baton.jti") == Some(researcher_jti.as_str())),
        "{redeems:?}"
    );
    let calls = of("baton.tool_call");
    assert_eq!(calls.len(), 2, "{calls:?}");
    for c in &calls {
        assert_eq!(c.attr("baton.actor"), Some(RESEARCHER));
        assert_eq!(c.attr("baton.jti"), Some(researcher_jti.as_str()));
    }
    // The call made inside the caller's trace continues its span; the one
    // made outside any trace has a trace of its own (control).
    let traced: Vec<&&SpanSeen> = calls.iter().filter(|s| s.trace_id == TRACE_ID).collect();
    assert_eq!(traced.len(), 1, "{calls:?}");
    assert_eq!(
        traced[0].parent_span_id, TOOL_CALLER_SPAN,
        "{:?}",
        traced[0]
    );
    let report = *calls
        .iter()
        .find(|s| s.trace_id != TRACE_ID)
        .expect("the untraced call's span");
    assert!(report.parent_span_id.is_empty(), "{report:?}");

    // The audit log names the caller's trace on each traced event, and the
    // broker's own trace on the report's.
    let trace = w.json(&["audit", "trace", &task, "--json"]);
    let ids: Vec<&str> = trace["trace_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(ids, [TRACE_ID, report.trace_id.as_str()], "{trace}");
    let hop_item = crate::delegation::find_hop(&trace, RESEARCHER).unwrap();
    assert_eq!(hop_item["trace_id"], TRACE_ID, "{hop_item}");
    // Each tool call's audit event names the trace it was made in.
    let mut call_traces: Vec<String> = Vec::new();
    collect_tool_call_traces(&trace, &mut call_traces);
    call_traces.sort();
    let mut want = vec![TRACE_ID.to_owned(), report.trace_id.clone()];
    want.sort();
    assert_eq!(call_traces, want, "{trace}");
    let text = w.ok(&["audit", "trace", &task]);
    assert!(text.contains(&format!("trace {TRACE_ID}")), "{text}");
    // Old and new events verify together.
    let v = w.ok(&["audit", "verify"]);
    assert!(v.contains("verified"), "{v}");
}

/// The `trace_id` of every tool-call item (an object with a `tool`) of an
/// `audit trace --json` answer, wherever it nests.
fn collect_tool_call_traces(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            if m.contains_key("tool")
                && let Some(t) = m.get("trace_id").and_then(|t| t.as_str())
            {
                out.push(t.to_owned());
            }
            m.values().for_each(|x| collect_tool_call_traces(x, out));
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_tool_call_traces(x, out)),
        _ => {}
    }
}

/// Starts a task through the admin socket with `traceparent` as the raw
/// header value: (status, task id).
fn start_with_header(w: &World, traceparent: &str) -> (u16, String) {
    baton_tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let http = reqwest::Client::builder()
            .unix_socket(w.c.admin_socket())
            .build()
            .unwrap();
        let v: serde_json::Value = http
            .post("http://admin/v1/admin/dev/id-token")
            .json(&serde_json::json!({ "user": "alice@example.com", "groups": ["engineering"] }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let resp = http
            .post("http://admin/v1/admin/tasks")
            .header("traceparent", traceparent)
            .json(&serde_json::json!({
                "id_token": v["id_token"],
                "root_agent": PLANNER,
                "purpose": "support.case-research",
                "scope": ["tool:crm.search:read"],
                "risk_ceiling": "read",
                "ttl_secs": 600,
                "max_depth": 1,
                "audience": ["crm"],
            }))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let v: serde_json::Value = resp.json().await.unwrap_or_default();
        (status, v["task_id"].as_str().unwrap_or_default().to_owned())
    })
}

#[test]
fn a_traceparent_reaches_the_audit_log_without_an_exporter_and_a_malformed_one_is_ignored() {
    // No --otlp-endpoint: nothing is exported, the caller's trace is still
    // recorded.
    let w = World::start();
    let traced = |tp: &str| {
        let (status, task) = start_with_header(&w, tp);
        assert_eq!(status, 200, "traceparent {tp:?}");
        w.json(&["audit", "trace", &task, "--json"])
    };
    let good = traced(&format!("00-{TRACE_ID}-{CALLER_SPAN}-01"));
    assert_eq!(good["trace_ids"], serde_json::json!([TRACE_ID]), "{good}");
    for bad in [
        "00-not-a-trace-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
    ] {
        let t = traced(bad);
        assert!(t.get("trace_ids").is_none(), "{bad}: {t}");
    }
}
