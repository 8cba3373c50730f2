//! Human approval of the riskiest calls at the gateway: a call on an
//! `approval` route (or MCP tool) is held until the task's initiator
//! approves exactly that call with `baton approve`; it serves one call,
//! binds the call's arguments, can be denied, expires, and every step is
//! in the audit trace. Each attack beside its untampered control.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::delegation::{PLANNER, World};
use crate::gateway::{AUDIENCE, Gw, client, token_of};
use crate::harness::wait_for;

const ROUTES: &str = r#"
[[routes]]
method = "PUT"
path = "/crm/cases/{case}"
upstream = "crm"
tool = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"
approval = true

[[routes]]
method = "PUT"
path = "/crm/notes/{note}"
upstream = "crm"
tool = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"
approval = true
approval-ttl = "1s"

[[routes]]
method = "PUT"
path = "/payments/{payment}"
upstream = "crm"
tool = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"
approval = true
record-input = ["/amount", "/to"]
"#;

/// A held route that records a header in clear text, and a read route
/// held for approval.
const RECORDED_HEADER_ROUTES: &str = r#"
[[routes]]
method = "PUT"
path = "/transfers/{transfer}"
upstream = "crm"
tool = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"
approval = true
record-headers = ["x-amount"]

[[routes]]
method = "GET"
path = "/crm/lookups/{lookup}"
upstream = "crm"
tool = "crm.search"
resource = "dataset:crm"
permission = "tool:crm.search:read"
tier = "read"
approval = true
"#;

/// A task whose purpose allows writes, started by alice; the planner's
/// credential for the gateway's audience.
pub(crate) fn writer(w: &World) -> (String, std::path::PathBuf) {
    let (task, grant) = w.start_task_as(
        "support.case-update",
        &["tool:crm.update:write", "dataset:crm:write"],
        &[AUDIENCE],
    );
    let cred = w.redeem(&grant, PLANNER, &format!("writer-{task}"));
    (task, cred)
}

#[derive(Debug)]
pub(crate) struct Answer {
    pub(crate) status: u16,
    retry_after: Option<String>,
    pub(crate) body: serde_json::Value,
}

pub(crate) fn put(g: &Gw, cred: &std::path::Path, path: &str, body: &str) -> Answer {
    put_with(g, cred, path, body, &[])
}

/// [`put`] with extra request headers.
pub(crate) fn put_with(
    g: &Gw,
    cred: &std::path::Path,
    path: &str,
    body: &str,
    headers: &[(&str, &str)],
) -> Answer {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut r = client(cred)
            .put(format!("{}{path}", g.url))
            .bearer_auth(token_of(cred));
        // The bodies here are JSON: typed so unless a test says otherwise.
        if !headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case("content-type"))
        {
            r = r.header("content-type", "application/json");
        }
        for (name, value) in headers {
            r = r.header(*name, *value);
        }
        let r = r.body(body.to_owned()).send().await.unwrap();
        Answer {
            status: r.status().as_u16(),
            retry_after: r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned()),
            body: r.json().await.unwrap_or(serde_json::Value::Null),
        }
    })
}

pub(crate) fn pending_id(a: &Answer) -> String {
    assert_eq!(a.status, 403, "{a:?}");
    assert_eq!(a.body["code"], "approval_pending", "{a:?}");
    assert_eq!(a.retry_after.as_deref(), Some("5"), "{a:?}");
    let id = a.body["approval_id"].as_str().unwrap().to_owned();
    assert!(
        a.body["error"]
            .as_str()
            .unwrap()
            .contains(&format!("baton approve {id}")),
        "{a:?}"
    );
    id
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn a_held_call_goes_on_once_its_initiator_approves_exactly_it() {
    let g = Gw::start_with(|_| (ROUTES.to_owned(), Vec::new()));
    let (task, cred) = writer(&g.w);
    let upstream_before = g.upstream_count();

    // Held: the call waits, the upstream never sees it; asking again is the
    // same approval, not a new one.
    let a = pending_id(&put(&g, &cred, "/crm/cases/42", r#"{"status":"closed"}"#));
    let again = pending_id(&put(&g, &cred, "/crm/cases/42", r#"{"status":"closed"}"#));
    assert_eq!(a, again);
    // Another call (other arguments) is another approval.
    let b = pending_id(&put(&g, &cred, "/crm/cases/42", r#"{"status":"open"}"#));
    assert_ne!(a, b);
    // So is the same body on another case, or with a query: the approval
    // binds the method, path and query too. The path as the gateway reads
    // it: `4%32` is `42`, the same call.
    let other_case = pending_id(&put(&g, &cred, "/crm/cases/43", r#"{"status":"closed"}"#));
    let with_query = pending_id(&put(
        &g,
        &cred,
        "/crm/cases/42?cascade=all",
        r#"{"status":"closed"}"#,
    ));
    assert!(other_case != a && with_query != a && other_case != with_query);
    let encoded = pending_id(&put(&g, &cred, "/crm/cases/4%32", r#"{"status":"closed"}"#));
    assert_eq!(encoded, a);
    // And the headers the upstream gets: the same body as a form, or with
    // a header the upstream reads, is another call. A client's own name
    // and trace context are not bound: the same call retried with them
    // is the same approval.
    const BODY: &str = r#"{"status":"closed"}"#;
    let as_form = pending_id(&put_with(
        &g,
        &cred,
        "/crm/cases/42",
        BODY,
        &[("content-type", "application/x-www-form-urlencoded")],
    ));
    let with_amount = pending_id(&put_with(
        &g,
        &cred,
        "/crm/cases/42",
        BODY,
        &[("x-amount", "5000")],
    ));
    // Content negotiation changes what a server does with the same bytes.
    let other_accept = pending_id(&put_with(
        &g,
        &cred,
        "/crm/cases/42",
        BODY,
        &[("accept", "application/vnd.acme.v2+json")],
    ));
    assert!(as_form != a && with_amount != a && as_form != with_amount);
    assert!(other_accept != a && other_accept != as_form && other_accept != with_amount);
    let retried = pending_id(&put_with(
        &g,
        &cred,
        "/crm/cases/42",
        BODY,
        &[
            ("user-agent", "retrying-agent/2"),
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
        ],
    ));
    assert_eq!(retried, a);
    assert_eq!(
        g.upstream_count(),
        upstream_before,
        "a held call was forwarded"
    );

    // What the call is, before anyone decides.
    let shown = g.w.ok(&["approval", "show", &a]);
    for want in [
        "Status:        pending",
        "crm.update on dataset:crm (write)",
        "Request:       PUT /crm/cases/42\n",
        task.as_str(),
        PLANNER,
        "spiffe://example.org/tools/gateway",
    ] {
        assert!(shown.contains(want), "{want}: {shown}");
    }
    // A route that records no body field shows none, and says so.
    assert!(
        shown.contains("Input:         not shown (the route records no field"),
        "{shown}"
    );
    // Two held payments that differ only in their bodies: the human sees
    // which is which (the fields the route records in clear text), not two
    // identical requests with unreadable digests.
    let small = pending_id(&put(
        &g,
        &cred,
        "/payments/1",
        r#"{"amount":10,"to":"vendor"}"#,
    ));
    let large = pending_id(&put(
        &g,
        &cred,
        "/payments/1",
        "{\"amount\":10000,\"to\":\"mallory\\u001b[2J\"}",
    ));
    assert_ne!(small, large);
    let small_shown = g.w.ok(&["approval", "show", &small]);
    let large_shown = g.w.ok(&["approval", "show", &large]);
    assert!(
        small_shown.contains("Request:       PUT /payments/1\n"),
        "{small_shown}"
    );
    assert!(
        small_shown.contains("  input:/amount: 10\n"),
        "{small_shown}"
    );
    assert!(
        small_shown.contains("  input:/to: vendor\n"),
        "{small_shown}"
    );
    assert!(
        large_shown.contains("  input:/amount: 10000\n"),
        "{large_shown}"
    );
    // The escape the agent put in the field does not reach the terminal.
    assert!(!large_shown.contains('\u{1b}'), "{large_shown:?}");
    assert!(
        large_shown.contains("  input:/to: mallory\\u{1b}[2J\n"),
        "{large_shown}"
    );
    let as_json = g.w.json(&["approval", "show", &large, "-o", "json"]);
    assert_eq!(as_json["shown"]["input:/amount"], "10000", "{as_json}");
    assert_eq!(
        as_json["shown"]["input:/to"], "mallory\u{1b}[2J",
        "{as_json}"
    );
    // What the human saw must be what the upstream reads. The small
    // payment typed as a form: a form reader finds `amount=1000000` and
    // `to=mallory` in its memo, while the JSON view shows 10 to vendor.
    // A twin key Go reads without case; a gzip body the gateway cannot
    // read. Each refused before approval is asked, nothing forwarded;
    // the small payment above (JSON, no encoding) is the control.
    let before = g.upstream_count();
    let as_form = put_with(
        &g,
        &cred,
        "/payments/1",
        r#"{"amount":10,"to":"vendor","memo":"&amount=1000000&to=mallory&x="}"#,
        &[("content-type", "application/x-www-form-urlencoded")],
    );
    // Refused as soon as the form is read: it names `amount`, a field the
    // route records from the JSON body (a form that names no recorded
    // field is refused 415 as not JSON, as the `text/plain` one below).
    assert_eq!(as_form.status, 400, "{as_form:?}");
    assert_eq!(as_form.body["code"], "invalid_request", "{as_form:?}");
    assert!(
        as_form.body["error"]
            .as_str()
            .is_some_and(|e| e.contains("`amount`")),
        "{as_form:?}"
    );
    let untyped = put_with(
        &g,
        &cred,
        "/payments/1",
        r#"{"amount":10,"to":"vendor"}"#,
        &[("content-type", "text/plain; charset=utf-8")],
    );
    assert_eq!(untyped.status, 415, "{untyped:?}");
    let twin = put(
        &g,
        &cred,
        "/payments/1",
        r#"{"amount":10,"AMOUNT":1000000,"to":"vendor"}"#,
    );
    assert_eq!(twin.status, 400, "{twin:?}");
    assert!(
        twin.body["error"]
            .as_str()
            .unwrap()
            .contains("but for case"),
        "{twin:?}"
    );
    let gzipped = put_with(
        &g,
        &cred,
        "/payments/1",
        r#"{"amount":10,"to":"vendor"}"#,
        &[
            ("content-type", "application/json"),
            ("content-encoding", "gzip"),
        ],
    );
    assert_eq!(gzipped.status, 415, "{gzipped:?}");
    assert!(
        gzipped.body["error"]
            .as_str()
            .unwrap()
            .contains("Content-Encoding gzip"),
        "{gzipped:?}"
    );
    assert_eq!(g.upstream_count(), before);
    assert_eq!(
        pending_id(&put(
            &g,
            &cred,
            "/payments/1",
            r#"{"amount":10,"to":"vendor"}"#
        )),
        small,
        "the control is held as before"
    );

    let err = g.w.refused(&["approval", "show", "ap_../../tasks"]);
    assert!(err.contains("is not an approval id"), "{err}");
    let err =
        g.w.refused(&["approve", "../tasks/x", "--user", "alice@example.com"]);
    assert!(err.contains("is not an approval id"), "{err}");

    // Someone else may not decide (not the initiator, no approver group);
    // the initiator may.
    let err = g.w.refused(&[
        "approve",
        &a,
        "--user",
        "mallory@example.com",
        "--group",
        "engineering",
    ]);
    assert!(err.contains("may not decide"), "{err}");
    let out = g.w.ok(&[
        "approve",
        &a,
        "--user",
        "alice@example.com",
        "--reason",
        "ticket 42 is resolved",
    ]);
    assert!(out.contains(&format!("Approved {a}")), "{out}");
    // Decided once only.
    let err = g.w.refused(&["approve", &a, "--user", "alice@example.com"]);
    assert!(err.contains("not pending"), "{err}");
    let shown = g.w.json(&["approval", "show", &a, "-o", "json"]);
    assert_eq!(shown["decided_by"], "alice@example.com", "{shown}");

    // The approved call goes on, once; the other call still waits.
    let b_again = put(&g, &cred, "/crm/cases/42", r#"{"status":"open"}"#);
    assert_eq!(pending_id(&b_again), b);
    // The approval of case 42 does not carry another case or a query.
    assert_eq!(
        pending_id(&put(&g, &cred, "/crm/cases/43", r#"{"status":"closed"}"#)),
        other_case
    );
    assert_eq!(
        pending_id(&put(
            &g,
            &cred,
            "/crm/cases/42?cascade=all",
            r#"{"status":"closed"}"#,
        )),
        with_query
    );
    // Nor the same call with a header the upstream reads.
    assert_eq!(
        pending_id(&put_with(
            &g,
            &cred,
            "/crm/cases/42",
            BODY,
            &[("x-amount", "5000")]
        )),
        with_amount
    );
    assert_eq!(g.upstream_count(), upstream_before);
    let ok = put_with(
        &g,
        &cred,
        "/crm/cases/42",
        BODY,
        &[("user-agent", "retrying-agent/3")],
    );
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(g.upstream_count(), upstream_before + 1);
    let replay = pending_id(&put(&g, &cred, "/crm/cases/42", r#"{"status":"closed"}"#));
    assert_ne!(replay, a, "an approval served a second call");
    assert_eq!(g.upstream_count(), upstream_before + 1);

    // Denied: refused, and stays refused.
    let out = g.w.ok(&["deny", &b, "--user", "alice@example.com"]);
    assert!(out.contains(&format!("Denied {b}")), "{out}");
    let denied = put(&g, &cred, "/crm/cases/42", r#"{"status":"open"}"#);
    assert_eq!(denied.status, 403, "{denied:?}");
    assert_eq!(denied.body["code"], "approval_denied", "{denied:?}");
    assert_eq!(g.upstream_count(), upstream_before + 1);

    // Expired before anyone decided: too late to approve, and the call
    // asks anew.
    let first = put(&g, &cred, "/crm/notes/1", "{}");
    let c = pending_id(&first);
    let expires = first.body["expires_at"].as_u64().unwrap();
    wait_for("the approval to expire", Duration::from_secs(30), || {
        (unix_now() > expires).then_some(())
    });
    let err = g.w.refused(&["approve", &c, "--user", "alice@example.com"]);
    assert!(err.contains("expired"), "{err}");
    assert_ne!(pending_id(&put(&g, &cred, "/crm/notes/1", "{}")), c);
    assert_eq!(g.upstream_count(), upstream_before + 1);

    // Every step is in the audit trace, the forwarded call names its
    // approval.
    let trace = wait_for("the approval in the trace", Duration::from_secs(30), || {
        let t = g.w.ok(&["audit", "trace", &task]);
        t.contains(&format!("approved in {a}")).then_some(t)
    });
    assert!(trace.contains("approval requested: crm.update"), "{trace}");
    assert!(
        trace.contains("approval approved: crm.update") && trace.contains("alice@example.com"),
        "{trace}"
    );
    assert!(trace.contains("approval denied: crm.update"), "{trace}");
}

#[test]
fn an_mcp_client_sees_that_its_call_waits_for_approval_and_where() {
    let (port, seen) = crate::mcp::start_crm();
    let g = Gw::start_with(move |_| {
        (
            format!(
                r#"
[approval]
tiers = ["write"]

[upstreams.mcp]
url = "http://127.0.0.1:{port}"

[[mcp]]
path = "/mcp"
upstream = "mcp"

[[mcp.tools]]
name = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"
"#
            ),
            Vec::new(),
        )
    });
    let (_task, cred) = writer(&g.w);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (s, _) = crate::mcp::connect(&g.url, &cred).await;
        let args = serde_json::json!({"account": "acme"});
        let e = crate::mcp::call(&s, "crm.update", args.clone())
            .await
            .unwrap_err();
        let (code, message, data) = crate::mcp::rpc_error(&e);
        assert_eq!(
            i64::from(code),
            baton_gateway::MCP_APPROVAL_PENDING,
            "{e:?}"
        );
        let id = data["approval_id"].as_str().unwrap().to_owned();
        assert!(
            message.contains(&format!("baton approve {id}")),
            "{message}"
        );
        assert_eq!(data["approve_with"], format!("baton approve {id}"));
        assert_eq!(seen.count(), 0, "a held call reached the tool");

        let out = g.w.ok(&["approve", &id, "--user", "alice@example.com"]);
        assert!(out.contains("Approved"), "{out}");

        // Attack: the approved arguments with a `_meta` the server reads
        // (here a made-up `com.example/amount`) are another call: held
        // under another approval, not forwarded.
        let e = crate::mcp::call_meta(
            &s,
            "crm.update",
            args.clone(),
            Some(serde_json::json!({"com.example/amount": 1_000_000})),
        )
        .await
        .unwrap_err();
        let (code, _, data) = crate::mcp::rpc_error(&e);
        assert_eq!(
            i64::from(code),
            baton_gateway::MCP_APPROVAL_PENDING,
            "{e:?}"
        );
        let other = data["approval_id"].as_str().unwrap();
        assert_ne!(other, id, "another _meta used the approval of the call");
        assert_eq!(
            seen.count(),
            0,
            "a call with another _meta reached the tool"
        );

        // Control: the approved call with only per-attempt `_meta` (a
        // progress token, trace context) uses the approval and goes on.
        let done = crate::mcp::call_meta(
            &s,
            "crm.update",
            args,
            Some(serde_json::json!({
                "progressToken": 7,
                "traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
            })),
        )
        .await
        .unwrap();
        assert!(done.contains("account acme updated"), "{done}");
        assert_eq!(seen.count(), 1);
    });
}

/// The broker opens approvals only for a tool server of the token's
/// audience: an agent cannot ask for (or use up) approvals itself, with its
/// own credential, even for its own call. The gateway asking for the same
/// call is the control.
#[test]
fn an_agent_cannot_ask_the_broker_for_approvals_itself() {
    let g = Gw::start_with(|_| (ROUTES.to_owned(), Vec::new()));
    let (task, cred) = writer(&g.w);
    let jti = crate::delegation::claims(&cred)["jti"]
        .as_str()
        .unwrap()
        .to_owned();
    let agent = PLANNER;
    let broker = crate::harness::td().id("/baton/broker").unwrap();
    let http = crate::harness::cred_client(&cred, &cred.join("bundle.pem"), broker);
    let ask = |digest: &str| {
        let body = serde_json::json!({
            "task_id": task,
            "token_jti": jti,
            "agent": agent,
            "tool": "crm.update",
            "resource": "dataset:crm",
            "risk": "write",
            "input_digest": digest,
            "ttl_secs": 60,
        });
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = http
                .post(format!("{}/v1/approvals", g.w.broker_url()))
                .json(&body)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            (status, r.json::<serde_json::Value>().await.unwrap())
        })
    };
    let (status, body) = ask(&"ab".repeat(32));
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "not_entitled", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("is not a tool server of token"),
        "{body}"
    );

    // Control: the same call through the gateway is held for approval.
    pending_id(&put(&g, &cred, "/crm/cases/7", r#"{"status":"closed"}"#));
    let trace = g.w.ok(&["audit", "trace", &task]);
    assert_eq!(
        trace.matches("approval requested").count(),
        1,
        "the agent opened an approval: {trace}"
    );
}

/// [`put_with`] over HTTP/1.1 (HTTP/2 has no `Connection` header, so a
/// client can only send one over HTTP/1.1).
fn put_h1(g: &Gw, cred: &std::path::Path, path: &str, headers: &[(&str, &str)]) -> Answer {
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::pki_types::pem::PemObject;
    baton_tls::install_crypto_provider();
    let chain = baton_tls::CertificateDer::pem_file_iter(cred.join("svid.pem"))
        .unwrap()
        .map(|c| c.unwrap().to_vec())
        .collect();
    let key = PrivatePkcs8KeyDer::from_pem_file(cred.join("key.pem")).unwrap();
    let identity = baton_tls::ClientIdentity::new(chain, key.secret_pkcs8_der()).unwrap();
    let bundles = baton_tls::BundleStore::new();
    let anchors = baton_tls::CertificateDer::pem_file_iter(cred.join("bundle.pem"))
        .unwrap()
        .map(|c| c.unwrap().to_vec())
        .collect();
    let gateway = baton_core::SpiffeId::parse("spiffe://example.org/tools/gateway").unwrap();
    bundles.set(gateway.trust_domain().clone(), anchors);
    let mut tls = baton_tls::client_config(
        identity,
        bundles,
        baton_tls::PeerPolicy::Exact(vec![gateway]),
    )
    .unwrap();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .http1_only()
        .build()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut r = http
            .put(format!("{}{path}", g.url))
            .bearer_auth(token_of(cred))
            .header("content-type", "application/json");
        for (name, value) in headers {
            r = r.header(*name, *value);
        }
        let r = r.body("{}").send().await.unwrap();
        Answer {
            status: r.status().as_u16(),
            retry_after: r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_owned()),
            body: r.json().await.unwrap_or(serde_json::Value::Null),
        }
    })
}

/// What the approver is shown of a held call, and what its record keeps,
/// is what the upstream gets: a header the request's `Connection` drops
/// on the way (`Connection: x-amount`) is neither shown nor recorded, so
/// an approval shown "x-amount: 10" cannot be used by a request whose
/// upstream never sees that amount. The same header sent plainly is the
/// control: shown, bound and forwarded.
#[test]
fn an_approver_is_shown_only_headers_the_upstream_gets() {
    let g = Gw::start_with(|_| (RECORDED_HEADER_ROUTES.to_owned(), Vec::new()));
    let (task, cred) = writer(&g.w);
    let before = g.upstream_count();

    // Control: the amount sent plainly is shown.
    let plain = pending_id(&put_h1(&g, &cred, "/transfers/1", &[("x-amount", "10")]));
    let shown = g.w.json(&["approval", "show", &plain, "-o", "json"]);
    assert_eq!(shown["shown"]["header:x-amount"], "10", "{shown}");

    // Attack: the amount dropped by `Connection` is not shown as if the
    // upstream got it; it is another call than the plain one.
    let dropped = pending_id(&put_h1(
        &g,
        &cred,
        "/transfers/1",
        &[("connection", "x-amount"), ("x-amount", "10")],
    ));
    assert_ne!(dropped, plain);
    let shown = g.w.json(&["approval", "show", &dropped, "-o", "json"]);
    assert!(
        shown["shown"].get("header:x-amount").is_none(),
        "shown an amount the upstream never gets: {shown}"
    );
    assert_eq!(g.upstream_count(), before, "a held call was forwarded");

    // Approved as shown (no amount): the call goes on with no amount at
    // the upstream and none in its record, whatever amount it names.
    let out =
        g.w.ok(&["approve", &dropped, "--user", "alice@example.com"]);
    assert!(out.contains(&format!("Approved {dropped}")), "{out}");
    let ok = put_h1(
        &g,
        &cred,
        "/transfers/1",
        &[("connection", "x-amount"), ("x-amount", "999999")],
    );
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(g.upstream_count(), before + 1);
    assert!(g.upstream_last_header("x-amount").is_empty());
    // Control: the plain call, approved, goes on with its amount, shown
    // and recorded.
    g.w.ok(&["approve", &plain, "--user", "alice@example.com"]);
    let ok = put_h1(&g, &cred, "/transfers/1", &[("x-amount", "10")]);
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(g.upstream_last_header("x-amount"), vec!["10"]);
    let trace = wait_for("both calls in the trace", Duration::from_secs(30), || {
        let t = g.w.ok(&["audit", "trace", &task]);
        (t.contains(&format!("approved in {dropped}"))
            && t.contains(&format!("approved in {plain}")))
        .then_some(t)
    });
    assert!(trace.contains("header:x-amount=10"), "{trace}");
    assert!(!trace.contains("999999"), "{trace}");
}

/// An approved call's record names its approval whatever its tier: the
/// broker marks the approval reported on that record, and the trace shows
/// the call as approved. A read-tier call's one record used to carry its
/// outcome instead. The write-tier call approved beside it is the control.
#[test]
fn an_approved_read_is_recorded_as_approved() {
    let g = Gw::start_with(|_| (format!("{ROUTES}{RECORDED_HEADER_ROUTES}"), Vec::new()));
    let (read_task, _planner, researcher) = g.researcher();
    let get = || {
        crate::gateway::send(
            &researcher,
            "GET",
            &format!("{}/crm/lookups/7", g.url),
            Some(&token_of(&researcher)),
            &[],
        )
    };
    let held = wait_for("the read held", Duration::from_secs(60), || {
        let a = get();
        (a.body["code"] == "approval_pending").then_some(a)
    });
    assert_eq!(held.status, 403, "{held:?}");
    let read = held.body["approval_id"].as_str().unwrap().to_owned();
    let (write_task, cred) = writer(&g.w);
    let write = pending_id(&put(&g, &cred, "/crm/cases/7", r#"{"status":"closed"}"#));
    for id in [&read, &write] {
        g.w.ok(&["approve", id, "--user", "alice@example.com"]);
    }
    let before = g.upstream_count();
    let a = get();
    assert_eq!(a.status, 200, "{a:?}");
    let a = put(&g, &cred, "/crm/cases/7", r#"{"status":"closed"}"#);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(g.upstream_count(), before + 2);
    for (task, id) in [(&write_task, &write), (&read_task, &read)] {
        wait_for(
            &format!("approval {id} reported"),
            Duration::from_secs(30),
            || {
                let shown = g.w.json(&["approval", "show", id, "-o", "json"]);
                (shown["status"] == "reported").then_some(())
            },
        );
        let trace = g.w.ok(&["audit", "trace", task]);
        assert!(trace.contains(&format!("approved in {id}")), "{trace}");
    }
}

/// One agent asking for approvals in a loop (a held call with other
/// arguments each time) spends its own share of the gateway's approval
/// requests, not the broker's limit for the whole gateway: past its share
/// it is answered 429 `approval_rate_limited` with `Retry-After`, and
/// another agent's approved call still goes through. Before, the flood
/// spent the gateway's `approvals` budget at the broker and every other
/// agent's held call was refused 503, the approved ones too.
#[test]
fn an_agent_asking_for_approvals_in_a_loop_spends_only_its_own_share() {
    let g = Gw::start_with(|_| (ROUTES.to_owned(), Vec::new()));
    let (_flood_task, flooder) = writer(&g.w);
    let (_task, honest) = writer(&g.w);
    let body = r#"{"status":"closed"}"#;
    let id = pending_id(&put(&g, &honest, "/crm/cases/42", body));
    g.w.ok(&["approve", &id, "--user", "alice@example.com"]);

    // The share is 30 at once, then one a second: the loop outruns it.
    let mut limited = None;
    for i in 0..400 {
        let a = put(&g, &flooder, &format!("/crm/cases/{i}"), body);
        if a.status == 429 {
            limited = Some((i, a));
            break;
        }
        assert_eq!(a.body["code"], "approval_pending", "{a:?}");
    }
    let (asked, a) = limited.expect("never limited");
    assert!(asked >= 30, "limited after {asked} asks: {a:?}");
    assert_eq!(a.body["code"], "approval_rate_limited", "{a:?}");
    assert!(a.retry_after.is_some(), "{a:?}");

    // Control: the other agent's approved call is forwarded, once.
    let before = g.upstream_count();
    let a = put(&g, &honest, "/crm/cases/42", body);
    assert_eq!(a.status, 200, "{a:?}");
    assert_eq!(g.upstream_count(), before + 1);
}
