//! The broker does not stall under a hostile or slow client: slowloris
//! clients and connection floods are cut off while honest clients are
//! served, bodies over a route's limit and batches over their cap are
//! refused, expensive routes are rate limited per caller, and anonymous
//! TLS connections reach only the routes that need no identity. Each
//! attack next to the untampered control that succeeds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_core::SpiffeId;
use baton_tls::ClientIdentity;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::harness::{Cluster, Options, TD, wait_for, wait_for_async};

fn tls_config(c: &Cluster, identity: ClientIdentity) -> rustls::ClientConfig {
    crate::harness::broker_tls_config(c, identity)
}

fn client(c: &Cluster, identity: ClientIdentity) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config(c, identity))
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

fn node_identity(c: &Cluster) -> ClientIdentity {
    let pem = std::fs::read(c.path("agent/agent-svid.pem")).unwrap();
    let chain = CertificateDer::pem_slice_iter(&pem)
        .map(|c| c.unwrap().to_vec())
        .collect();
    let key = std::fs::read(c.path("agent/agent-key.pk8")).unwrap();
    ClientIdentity::new(chain, &key).unwrap()
}

fn url(c: &Cluster, path: &str) -> String {
    format!("https://{}{path}", c.broker_addr)
}

/// A fresh ID token of the dev issuer, from the admin socket.
async fn id_token(c: &Cluster) -> String {
    let v: serde_json::Value = reqwest::Client::builder()
        .unix_socket(c.admin_socket())
        .build()
        .unwrap()
        .post("http://admin/v1/admin/dev/id-token")
        .json(&serde_json::json!({ "user": "alice@example.com", "groups": ["engineering"] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["id_token"].as_str().unwrap().to_owned()
}

fn start_body(id_token: &str) -> serde_json::Value {
    serde_json::json!({
        "id_token": id_token,
        "root_agent": "spiffe://example.org/agents/planner",
        "purpose": "support.case-research",
        "scope": ["tool:crm.search:read"],
        "risk_ceiling": "read",
        "ttl_secs": 600,
        "max_depth": 1,
        "audience": ["crm"],
    })
}

async fn post_raw(
    http: &reqwest::Client,
    url: String,
    body: Vec<u8>,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    let resp = http
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, headers, body)
}

async fn post_json(
    http: &reqwest::Client,
    url: String,
    body: &serde_json::Value,
) -> (u16, reqwest::header::HeaderMap, serde_json::Value) {
    post_raw(http, url, serde_json::to_vec(body).unwrap()).await
}

// ------------------------------------------------ anonymous TLS, bodies

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_tls_reaches_only_the_routes_that_need_no_identity() {
    let c = Cluster::start(Options::default());
    let anon = client(&c, ClientIdentity::none());

    // Every route that needs an identity refuses an anonymous caller
    // before it looks at the body.
    let needs_identity: &[(&str, &str)] = &[
        ("GET", "/v1/node/sync"),
        ("POST", "/v1/node/renew"),
        ("POST", "/v1/node/sign-x509"),
        ("POST", "/v1/node/sign-jwt"),
        ("POST", "/v1/node/redeem"),
        ("POST", "/v1/node/renew-task"),
        ("POST", "/v1/delegate"),
        ("POST", "/v1/audit/tool-calls"),
        ("GET", "/v1/revocations/feed"),
        ("POST", "/v1/secrets/lease"),
        ("POST", "/v1/secrets/introspect"),
    ];
    for (method, path) in needs_identity {
        let req = match *method {
            "GET" => anon.get(url(&c, path)),
            _ => anon.post(url(&c, path)).json(&serde_json::json!({})),
        };
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(status, 401, "{method} {path} anonymously: {body}");
        assert_eq!(body["code"], "unauthenticated", "{method} {path}: {body}");
    }
    // The admin API is not on this port at all.
    for path in ["/v1/admin/entries", "/v1/admin/tasks", "/v1/admin/nodes"] {
        let resp = anon.get(url(&c, path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
    }
    // Control: the routes that need no identity answer an anonymous caller.
    for path in ["/v1/bundle", "/v1/bundle.pem", "/healthz"] {
        let resp = anon.get(url(&c, path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path}");
    }
    // Attestation and task start decide on their body (join token, ID
    // token), not on the TLS identity.
    let (status, _, body) = post_json(
        &anon,
        url(&c, "/v1/node/attest"),
        &serde_json::json!({ "join_token": "bogus", "csr_der": "AAAA" }),
    )
    .await;
    assert!((400..500).contains(&status), "{status} {body}");
    assert_ne!(body["code"], "rate_limited", "{body}");
    let token = id_token(&c).await;
    let (status, _, body) = post_json(&anon, url(&c, "/v1/tasks"), &start_body(&token)).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["task_id"].is_string(), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_the_routes_limit_and_batches_over_their_cap_are_refused() {
    let c = Cluster::start(Options::default());
    let anon = client(&c, ClientIdentity::none());

    // A valid task start padded with whitespace past 64 KiB: refused
    // before it is read.
    let token = id_token(&c).await;
    let mut padded = serde_json::to_vec(&start_body(&token)).unwrap();
    padded.splice(1..1, std::iter::repeat_n(b' ', 64 * 1024));
    let (status, _, body) = post_raw(&anon, url(&c, "/v1/tasks"), padded).await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(body["code"], "payload_too_large", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("65536 bytes"),
        "{body}"
    );
    // Control: the same request unpadded starts the task (the token was
    // not spent by the refused one).
    let (status, _, body) = post_json(&anon, url(&c, "/v1/tasks"), &start_body(&token)).await;
    assert_eq!(status, 200, "{body}");

    // A batch route has a larger body limit but a cap on its list: 1001
    // CSRs from the node.
    let node = client(&c, node_identity(&c));
    let mine = c.register("/mine", &[]);
    let entry = mine["id"].as_str().unwrap();
    let key = baton_ca::WorkloadKey::generate().unwrap();
    let csr = key
        .csr_der(&SpiffeId::parse("spiffe://example.org/mine").unwrap())
        .unwrap();
    let item = baton_core::api::SignX509Item {
        entry_id: baton_core::EntryId::parse(entry).unwrap(),
        csr_der: csr,
    };
    let batch = |n: usize| baton_core::api::SignX509Request {
        items: vec![item.clone(); n],
    };
    let (status, _, body) = post_json(
        &node,
        url(&c, "/v1/node/sign-x509"),
        &serde_json::to_value(batch(1001)).unwrap(),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_argument", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("at most 1000 CSRs per call, got 1001"),
        "{body}"
    );
    // Control: a batch of two is signed.
    let (status, _, body) = post_json(
        &node,
        url(&c, "/v1/node/sign-x509"),
        &serde_json::to_value(batch(2)).unwrap(),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["svids"].as_array().unwrap().len(), 2, "{body}");

    // Tool-call reports: 1001 in one request are refused whole.
    let report = |i: usize| {
        serde_json::json!({
            "report_id": format!("r-{i}"),
            "task_id": format!("task-{}", "0".repeat(32)),
            "token_jti": "j",
            "agent": "spiffe://example.org/agents/planner",
            "tool": "crm.search",
            "resource": "crm",
            "risk": "read",
            "scope_used": [],
            "input_digest": "00",
            "decision": "allow",
            "policy_ids": [],
            "at": 0,
        })
    };
    let reports =
        |n: usize| serde_json::json!({ "reports": (0..n).map(report).collect::<Vec<_>>() });
    let (status, _, body) = post_json(&node, url(&c, "/v1/audit/tool-calls"), &reports(1001)).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "reports", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("reports: more than 1000 entries"),
        "{body}"
    );
    // A report's lists are cut off while parsing, not after: a list past
    // its bound (here a million entries in 4 MiB) is refused at its first
    // extra entry, naming the field.
    let mut huge = report(0);
    huge["scope_used"] = serde_json::json!(vec![""; 1_000_000]);
    let (status, _, body) = post_json(
        &node,
        url(&c, "/v1/audit/tool-calls"),
        &serde_json::json!({ "reports": [huge] }),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("scope_used: more than 64 entries"),
        "{body}"
    );
    // Control: a batch under the cap is taken (each report then answered
    // on its own).
    let (status, _, body) = post_json(&node, url(&c, "/v1/audit/tool-calls"), &reports(2)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["receipts"].as_array().unwrap().len(), 2, "{body}");

    // A report's clear-text fields are bounded: a reporter cannot copy
    // its traffic into the audit log. Control: a small field passes that
    // check (and the report is then refused for its unknown task).
    let with_field = |value: String| {
        let mut r = report(7);
        r["recorded"] = serde_json::json!({ "input:/body": value });
        r
    };
    let (status, _, body) = post_json(
        &node,
        url(&c, "/v1/audit/tool-calls"),
        &with_field("x".repeat(3000)),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["field"], "recorded", "{body}");
    let (status, _, body) = post_json(
        &node,
        url(&c, "/v1/audit/tool-calls"),
        &with_field("acme".into()),
    )
    .await;
    assert_ne!(body["field"], "recorded", "{body}");
    assert_ne!(status, 200, "{body}");

    // Past the batch routes' own limit (4 MiB): 413 there too.
    let mut huge = serde_json::to_vec(&batch(1)).unwrap();
    huge.splice(1..1, std::iter::repeat_n(b' ', 4 * 1024 * 1024));
    let (status, _, body) = post_raw(&node, url(&c, "/v1/node/sign-x509"), huge).await;
    assert_eq!(status, 413, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("4194304 bytes"),
        "{body}"
    );
}

// ----------------------------------------------------------- rate limits

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_starts_and_attestations_are_rate_limited_per_caller() {
    let c = Cluster::start_with_broker_args(
        Options {
            start_agent: false,
            ..Options::default()
        },
        vec![
            "--rate-limit".into(),
            "task-start=2/1h".into(),
            "--rate-limit".into(),
            "attest=2/1h".into(),
        ],
    );
    let anon = client(&c, ClientIdentity::none());

    // Control: under the limit, each start succeeds.
    for _ in 0..2 {
        let token = id_token(&c).await;
        let (status, _, body) = post_json(&anon, url(&c, "/v1/tasks"), &start_body(&token)).await;
        assert_eq!(status, 200, "{body}");
    }
    // The third, with a perfectly good token, is refused before any work.
    let token = id_token(&c).await;
    let (status, headers, body) = post_json(&anon, url(&c, "/v1/tasks"), &start_body(&token)).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "rate_limited", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.contains("rate limit task-start (2/1h per caller)"),
        "{message}"
    );
    assert!(message.contains("127.0.0.1"), "{message}");
    let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=1800).contains(&retry), "Retry-After {retry}");

    // Attestation, per remote address: two nodes attest, the third is
    // refused, and its join token is not spent.
    let attest = |token: String, node: &str| {
        let key = baton_ca::WorkloadKey::generate().unwrap();
        let csr = key.csr_der(&SpiffeId::parse(node).unwrap()).unwrap();
        serde_json::json!({
            "join_token": token,
            "csr_der": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, csr),
        })
    };
    for n in 1..=2 {
        let node = format!("spiffe://{TD}/baton/node/n{n}");
        let token = c.join_token(Some(&node));
        let (status, _, body) =
            post_json(&anon, url(&c, "/v1/node/attest"), &attest(token, &node)).await;
        assert_eq!(status, 200, "{body}");
    }
    let node = format!("spiffe://{TD}/baton/node/n3");
    let token = c.join_token(Some(&node));
    let (status, headers, body) =
        post_json(&anon, url(&c, "/v1/node/attest"), &attest(token, &node)).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("rate limit attest"),
        "{body}"
    );
    assert!(headers.contains_key("retry-after"));
    // Other routes of the same caller are not limited (control).
    let resp = anon.get(url(&c, "/v1/bundle")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// Hops are limited per agent: the planner's third hop is refused before
/// any work, naming the limit and the caller, while the researcher, another
/// caller, still delegates (control). The revocation feed's pages are
/// limited per follower the same way.
#[test]
fn hops_are_rate_limited_per_agent() {
    use crate::delegation::{PLANNER, RESEARCHER, World};
    let read = ["tool:crm.search:read", "dataset:crm:read"];
    let w = World::start_with_args(
        None,
        vec![
            "--rate-limit".into(),
            "delegate=2/1h".into(),
            "--rate-limit".into(),
            "feed=2/1h".into(),
        ],
    );
    let (_task, grant) = w.start_task(&read, "3", "10m", "read");
    let planner = w.redeem(&grant, PLANNER, "limit-planner");
    let hop = |cred: &std::path::Path, target: &str| {
        let out = w.delegate(cred, target, &read, &[]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, first, err) = hop(&planner, RESEARCHER);
    assert!(ok, "{err}");
    let (ok, _, err) = hop(&planner, RESEARCHER);
    assert!(ok, "{err}");
    let (ok, _, err) = hop(&planner, RESEARCHER);
    assert!(!ok, "a third hop within the hour of a 2/1h limit");
    assert!(
        err.contains("rate limit delegate (2/1h per caller)"),
        "{err}"
    );
    assert!(err.contains(PLANNER), "{err}");

    // Control: another caller (the researcher, from the first hop) is not
    // charged for the planner's hops.
    let g: serde_json::Value = serde_json::from_str(&first).unwrap();
    let researcher = w.redeem(g["grant"].as_str().unwrap(), RESEARCHER, "limit-researcher");
    w.c.register("/agents/analyst", &[]);
    let (ok, _, err) = hop(&researcher, "spiffe://example.org/agents/analyst");
    assert!(ok, "{err}");

    // Two pages of the revocation feed, then 429 for that follower; the
    // researcher, another follower, still reads it.
    let feed = "/v1/revocations/feed?after=0";
    for _ in 0..2 {
        let (status, body) = crate::hardening::get(&w, &planner, feed);
        assert_eq!(status, 200, "{body}");
    }
    let (status, body) = crate::hardening::get(&w, &planner, feed);
    assert_eq!(status, 429, "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap_or_default()
            .contains("rate limit feed (2/1h per caller)"),
        "{body}"
    );
    let (status, body) = crate::hardening::get(&w, &researcher, feed);
    assert_eq!(status, 200, "{body}");
}

/// A node's X509-SVID signing is limited per node and counted in
/// certificates: a stolen agent SVID cannot make the broker sign (and
/// register) batch after batch. A batch that does not fit is refused whole,
/// and agent-SVID renewal spends the same budget. The controls: a small
/// batch signed first, and the node's other routes still answered once the
/// budget is spent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x509_svid_signing_is_rate_limited_per_node_in_certificates() {
    let mut c = Cluster::start_with_broker_args(
        Options::default(),
        vec!["--rate-limit".into(), "x509-svid=1000/1h".into()],
    );
    let mine = c.register("/mine", &[]);
    // The node daemon signs what it needs from the same budget; stopped,
    // it spends no more of it.
    c.agent.as_mut().unwrap().stop();
    let node = client(&c, node_identity(&c));
    let id = SpiffeId::parse("spiffe://example.org/mine").unwrap();
    let key = baton_ca::WorkloadKey::generate().unwrap();
    let item = baton_core::api::SignX509Item {
        entry_id: baton_core::EntryId::parse(mine["id"].as_str().unwrap()).unwrap(),
        csr_der: key.csr_der(&id).unwrap(),
    };
    let sign = |n: usize| {
        let body = serde_json::to_value(baton_core::api::SignX509Request {
            items: vec![item.clone(); n],
        })
        .unwrap();
        let node = node.clone();
        let url = url(&c, "/v1/node/sign-x509");
        async move { post_json(&node, url, &body).await }
    };

    // Control: a batch within the budget is signed.
    let (status, _, body) = sign(2).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["svids"].as_array().unwrap().len(), 2, "{body}");
    // A full batch no longer fits: refused whole, naming the limit.
    let (status, headers, body) = sign(1000).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert!(
        body["message"]
            .as_str()
            .unwrap()
            .contains("rate limit x509-svid (1000/1h per caller)"),
        "{body}"
    );
    assert!(headers.contains_key("retry-after"), "{headers:?}");
    // Spending the rest, in smaller and smaller batches, never signs more
    // than the budget.
    let mut signed = 2;
    for size in [512, 256, 128, 64, 32, 16, 8, 4, 2, 1] {
        loop {
            let (status, _, body) = sign(size).await;
            if status != 200 {
                assert_eq!(status, 429, "{body}");
                break;
            }
            signed += body["svids"].as_array().unwrap().len();
        }
    }
    assert!(
        signed <= 1000,
        "{signed} certificates signed on a budget of 1000"
    );
    assert!(
        signed > 900,
        "only {signed} signed: the budget was spent elsewhere"
    );
    // Renewing the agent SVID spends the same budget.
    let renew = baton_core::api::RenewRequest {
        csr_der: baton_ca::WorkloadKey::generate()
            .unwrap()
            .csr_der(&SpiffeId::parse(&c.node_id).unwrap())
            .unwrap(),
    };
    let (status, _, body) = post_json(
        &node,
        url(&c, "/v1/node/renew"),
        &serde_json::to_value(renew).unwrap(),
    )
    .await;
    assert_eq!(status, 429, "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("x509-svid"),
        "{body}"
    );
    // Control: the node is otherwise served.
    let resp = node.get(url(&c, "/v1/node/sync")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// A node's redeems are limited per node: a workload replaying a spent
/// grant through its node daemon (each refusal an audit event) is cut off
/// by the limit before the broker writes more of them. The control: the
/// first redeem, under the limit, delivers the credential.
#[test]
fn a_spent_grant_replayed_through_a_node_is_rate_limited() {
    use crate::delegation::{PLANNER, World};
    let read = ["tool:crm.search:read", "dataset:crm:read"];
    let w = World::start_with_args(None, vec!["--rate-limit".into(), "node-mint=3/1h".into()]);
    let (task, grant) = w.start_task(&read, "3", "10m", "read");
    w.redeem(&grant, PLANNER, "nm-planner");
    let replay = || {
        let out = w.run(&[
            "grant",
            "redeem",
            "--grant",
            &grant,
            "--spiffe-id",
            PLANNER,
            "--out",
            w.c.path("nm-replay").to_str().unwrap(),
        ]);
        assert!(!out.status.success(), "a spent grant redeemed again");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let refusals = |w: &World| {
        w.json(&["audit", "trace", &task, "--json"])
            .to_string()
            .matches("grant_used")
            .count()
    };
    // Two replays reach the broker, which refuses and records them.
    for _ in 0..2 {
        let err = replay();
        assert!(!err.contains("rate limit"), "{err}");
    }
    let recorded = refusals(&w);
    assert!(recorded >= 2, "the replays' refusals are in the trace");
    // The third is refused by the limit, before any work: nothing more
    // is recorded.
    let err = replay();
    assert!(
        err.contains("rate limit node-mint (3/1h per caller)"),
        "{err}"
    );
    assert_eq!(refusals(&w), recorded);
}

#[test]
fn bad_limit_flags_are_refused_at_start() {
    for (args, want) in [
        (&["--rate-limit", "tasks=2/1h"][..], "task-start"),
        (&["--rate-limit", "task-start=0/1h"][..], "COUNT"),
        (&["--rate-limit", "x509-svid=10/1m"][..], "at least 1000"),
        (&["--max-connections", "0"][..], "--max-connections"),
        (&["--idle-timeout", "0s"][..], "--idle-timeout"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let out = crate::harness::baton()
            .args(["broker", "--trust-domain", TD, "--listen", "127.0.0.1:0"])
            .args(args)
            .arg("--data-dir")
            .arg(dir.path().join("broker"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

// ------------------------------------------------ slow clients and floods

/// An anonymous TLS connection speaking HTTP/1.1 only.
fn tls_http1(c: &Cluster) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    tls_http1_as(c, ClientIdentity::none())
}

/// An HTTP/1.1 connection over TLS to the broker, presenting `identity`.
fn tls_http1_as(
    c: &Cluster,
    identity: ClientIdentity,
) -> rustls::StreamOwned<rustls::ClientConnection, TcpStream> {
    let mut config = tls_config(c, identity);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let tcp = TcpStream::connect(&c.broker_addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls
}

/// True once the broker closed `read`'s connection (EOF or reset), false
/// if it still holds it after `within`.
fn closed_within(mut read: impl Read, within: Duration) -> bool {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        match read.read(&mut buf) {
            Ok(0) | Err(_) => return start.elapsed() < within,
            Ok(_) => {}
        }
        if start.elapsed() >= within {
            return false;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_and_connection_floods_are_cut_off_while_honest_clients_are_served() {
    let c = Cluster::start_with_broker_args(
        Options::default(),
        [
            "--max-connections",
            "16",
            "--handshake-timeout",
            "2s",
            "--header-read-timeout",
            "2s",
            "--request-timeout",
            "3s",
            "--idle-timeout",
            "3s",
        ]
        .map(String::from)
        .to_vec(),
    );
    let node = client(&c, node_identity(&c));
    let sync = |node: reqwest::Client| {
        let u = url(&c, "/v1/node/sync");
        async move {
            node.get(u)
                .send()
                .await
                .ok()
                .filter(|r| r.status() == 200)
                .map(|_| ())
        }
    };

    // Slowloris on the header: one byte of it every 300 ms. The broker
    // cuts it at the header timeout; an honest node is served meanwhile.
    let mut slow = tls_http1(&c);
    slow.write_all(b"POST /v1/tasks HTTP/1.1\r\nHost: broker\r\n")
        .unwrap();
    let dribble = std::thread::spawn(move || {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if slow.write_all(b"X").and_then(|()| slow.flush()).is_err() {
                return start.elapsed();
            }
            std::thread::sleep(Duration::from_millis(300));
            // The broker's close shows as a failed write or a read of 0.
            let _ = slow.sock.set_nonblocking(true);
            let mut b = [0u8; 256];
            let gone = match slow.read(&mut b) {
                Ok(n) => n == 0,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            };
            let _ = slow.sock.set_nonblocking(false);
            if gone {
                return start.elapsed();
            }
        }
        start.elapsed()
    });
    wait_for_async("sync during the slowloris", Duration::from_secs(30), || {
        sync(node.clone())
    })
    .await;
    let held = tokio::task::spawn_blocking(move || dribble.join().unwrap())
        .await
        .unwrap();
    assert!(
        held < Duration::from_secs(20),
        "the header slowloris was held for {held:?}"
    );

    // Slowloris on the body: the header is complete, the body never
    // arrives. 408 at the request timeout.
    let mut slow = tls_http1(&c);
    slow.write_all(
        b"POST /v1/tasks HTTP/1.1\r\nHost: broker\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{",
    )
    .unwrap();
    slow.flush().unwrap();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");

    // A silent TCP connection (no TLS handshake) is dropped at the
    // handshake timeout.
    let silent = TcpStream::connect(&c.broker_addr).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    assert!(
        closed_within(&silent, Duration::from_secs(20)),
        "a silent connection was kept"
    );
    // A TLS connection that never sends a request is dropped once idle.
    let idle = tls_http1(&c);
    assert!(
        closed_within(idle, Duration::from_secs(20)),
        "an idle TLS connection was kept"
    );

    // A flood up to the connection cap: none of it is served, all of it is
    // dropped at the handshake timeout, and the broker answers new honest
    // clients (they wait at most that long) and its node keeps syncing.
    let flood: Vec<TcpStream> = (0..16)
        .map(|_| {
            let s = TcpStream::connect(&c.broker_addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s
        })
        .collect();
    c.register("/during-the-flood", &[]);
    let fresh = client(&c, node_identity(&c));
    wait_for_async(
        "a new client served during the flood",
        Duration::from_secs(30),
        || sync(fresh.clone()),
    )
    .await;
    let wl = spiffe::WorkloadApiClient::connect_to(c.endpoint())
        .await
        .unwrap();
    wait_for_async(
        "the agent synced during the flood",
        Duration::from_secs(30),
        || async {
            let svids = wl.fetch_all_x509_svids().await.ok()?;
            svids
                .iter()
                .any(|s| s.spiffe_id().to_string().ends_with("/during-the-flood"))
                .then_some(())
        },
    )
    .await;
    let closed = tokio::task::spawn_blocking(move || {
        flood
            .iter()
            .filter(|s| closed_within(*s, Duration::from_secs(20)))
            .count()
    })
    .await
    .unwrap();
    assert_eq!(closed, 16, "every flood connection is dropped");
    // The broker logged why, and still serves.
    wait_for("the cap in the broker log", Duration::from_secs(10), || {
        c.broker
            .as_ref()
            .unwrap()
            .log_text()
            .contains("connection cap reached")
            .then_some(())
    });
    wait_for_async("sync after the flood", Duration::from_secs(30), || {
        sync(node.clone())
    })
    .await;
}

/// Reads one HTTP/1.1 answer: its status and its body as JSON (by its
/// Content-Length).
fn read_answer(mut conn: impl Read) -> (u16, serde_json::Value) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map(|v| v.trim().parse().unwrap())
                .unwrap_or(0);
            if buf.len() >= end + 4 + len {
                let status = head[9..12].parse().unwrap();
                let body = serde_json::from_slice(&buf[end + 4..end + 4 + len])
                    .unwrap_or(serde_json::Value::Null);
                return (status, body);
            }
        }
        let n = conn.read(&mut chunk).unwrap();
        assert!(
            n > 0,
            "closed before an answer: {}",
            String::from_utf8_lossy(&buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// A node route reads a body only from a caller that can be a node: a
/// workload's SVID (or no certificate) announcing a 4 MB body to
/// `sign-x509` or `redeem` gets its refusal while its body has not been
/// sent (were the body read first, the answer would be the request
/// timeout's 408 a minute later). The control: the node's own request,
/// its body sent in two parts, is read and answered on its body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_route_reads_no_body_from_a_caller_that_cannot_be_a_node() {
    let c = Cluster::start(Options::default());
    c.register("/mine", &[]);
    let wl = spiffe::WorkloadApiClient::connect_to(c.endpoint())
        .await
        .unwrap();
    let svid = wait_for_async("workload SVID", Duration::from_secs(30), || async {
        wl.fetch_x509_svid().await.ok()
    })
    .await;
    let workload = || {
        let chain = svid
            .cert_chain()
            .iter()
            .map(|c| c.as_bytes().to_vec())
            .collect();
        ClientIdentity::new(chain, svid.private_key().as_bytes()).unwrap()
    };
    let head = |path: &str, len: usize| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: broker\r\ncontent-type: application/json\r\ncontent-length: {len}\r\n\r\n{{"
        )
    };
    for path in [
        "/v1/node/sign-x509",
        "/v1/node/sign-jwt",
        "/v1/node/renew",
        "/v1/node/redeem",
        "/v1/node/renew-task",
    ] {
        for (who, identity, want) in [
            ("a workload", workload(), (403, "not_a_node")),
            (
                "an anonymous caller",
                ClientIdentity::none(),
                (401, "unauthenticated"),
            ),
        ] {
            // Blocking I/O on the test's runtime: the broker is another
            // process.
            let mut conn = tls_http1_as(&c, identity);
            conn.write_all(head(path, 4_000_000).as_bytes()).unwrap();
            conn.flush().unwrap();
            let (status, body) = read_answer(&mut conn);
            assert_eq!(
                (status, body["code"].as_str().unwrap_or_default()),
                want,
                "{who} on {path}: {body}"
            );
        }
    }

    // Control: the node's request is read, in two parts, and answered on
    // what its body says.
    let mut conn = tls_http1_as(&c, node_identity(&c));
    let body = br#"{"entries": 7}"#;
    conn.write_all(head("/v1/node/sign-x509", body.len()).as_bytes())
        .unwrap();
    conn.flush().unwrap();
    conn.write_all(&body[1..]).unwrap();
    conn.flush().unwrap();
    let (status, body) = read_answer(&mut conn);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["code"], "invalid_argument", "{body}");
}
