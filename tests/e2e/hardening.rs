//! Trust hardening: each attack from the outside, against the real
//! binaries, with the specific refusal it must get, next to the untampered
//! control that succeeds. Grouped by class: hops (audience, lifetime,
//! reserved targets, spliced chains), TLS (revoked task certificates),
//! grants and renewal (proof of possession), tokens (signature
//! malleability), audit (forged tool-call reports), reserved identities,
//! and the agent kill switch.

use std::path::Path;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton_core::{SpiffeId, TrustDomain};
use baton_proto::delegation::RenewTaskCredentialRequest;
use baton_proto::delegation::delegation_client::DelegationClient;
use baton_tls::CertificateDer;
use rustls::pki_types::PrivatePkcs8KeyDer;
use rustls::pki_types::pem::PemObject;

use crate::delegation::{PLANNER, RESEARCHER, TOOL, World, claims, copy_cred, grant_of};
use crate::harness::{TD, wait_for};
use crate::refusals::raw_channel;

const FULL: &[&str] = &[
    "tool:crm.search:read",
    "tool:crm.update:write",
    "dataset:crm:read",
];
const NARROW: &[&str] = &["tool:crm.search:read", "dataset:crm:read"];

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// An HTTPS client presenting the task credential in `dir` to the broker.
fn cred_client(w: &World, dir: &Path) -> reqwest::Client {
    let broker = TrustDomain::new(TD).unwrap().id("/baton/broker").unwrap();
    crate::harness::cred_client(dir, &w.c.path("broker/bundle.pem"), broker)
}

/// POSTs `body` to the broker with the credential in `dir`.
fn post(w: &World, dir: &Path, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = cred_client(w, dir);
    rt.block_on(async {
        let resp = client
            .post(format!("{}{path}", w.broker_url()))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    })
}

/// GETs `path` from the broker with the credential in `dir`.
pub(crate) fn get(w: &World, dir: &Path, path: &str) -> (u16, serde_json::Value) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = cred_client(w, dir);
    rt.block_on(async {
        let resp = client
            .get(format!("{}{path}", w.broker_url()))
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    })
}

/// What the broker answers (status line and what it sent with it) to a
/// POST of `path` with the credential in `dir` that declares a body of
/// `declared` bytes (within the route's limit) and sends one byte of it:
/// `None` when it waits for the rest.
fn answer_while_the_body_is_owed(
    w: &World,
    dir: &Path,
    path: &str,
    declared: usize,
) -> Option<String> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let cfg = crate::tls_resumption::mtls_client(dir, &w.c.path("broker/bundle.pem"));
    let addr = w.broker_url().trim_start_matches("https://").to_owned();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let tcp = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("broker.example.org").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .unwrap();
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: broker\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n["
        );
        tls.write_all(head.as_bytes()).await.unwrap();
        tls.flush().await.unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        // Until the answer's body is in (it ends with the JSON's brace),
        // the connection closes, or the deadline passes.
        while !got.ends_with(b"}") {
            match tokio::time::timeout_at(deadline, tls.read(&mut buf)).await {
                Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
        (!got.is_empty()).then(|| String::from_utf8_lossy(&got).into_owned())
    })
}

fn token_of(dir: &Path) -> String {
    std::fs::read_to_string(dir.join("token"))
        .unwrap()
        .trim()
        .to_owned()
}

fn delegate_body(dir: &Path, audience: &[&str], ttl: Option<u64>) -> serde_json::Value {
    let mut body = serde_json::json!({
        "token": token_of(dir),
        "target": RESEARCHER,
        "scope": NARROW,
        "purpose": "support.case-research",
        "audience": audience,
        "justification": "look up the customer's open cases",
    });
    if let Some(t) = ttl {
        body["ttl_secs"] = serde_json::json!(t);
    }
    body
}

fn trace(w: &World, task: &str) -> String {
    w.json(&["audit", "trace", task, "--json"]).to_string()
}

/// The serial (lowercase hex, no leading zero bytes) of the task
/// certificate in `dir`.
pub fn serial_of(dir: &Path) -> String {
    let leaf = CertificateDer::pem_file_iter(dir.join("svid.pem"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    baton_ca::leaf_info(&[leaf.to_vec()]).unwrap().serial_hex
}

/// A kept-alive connection carries no request past its client
/// certificate's expiry: the broker closes it then, and the client's next
/// request must open a new one, which the expired certificate cannot. The
/// control: the same connection answered before the expiry.
#[test]
fn a_kept_alive_connection_does_not_outlive_its_client_certificate() {
    let w = World::start();
    let (_task, grant) = w.start_task(&["tool:crm.search:read"], "1", "20s", "read");
    let short = w.redeem(&grant, PLANNER, "short-lived");
    let leaf = CertificateDer::pem_file_iter(short.join("svid.pem"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap();
    let not_after = baton_ca::leaf_info(&[leaf.to_vec()]).unwrap().not_after;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let client = cred_client(&w, &short);
    let url = format!("{}/v1/bundle", w.broker_url());
    rt.block_on(async {
        let before = client.get(&url).send().await.unwrap();
        assert_eq!(before.status(), 200);
        while std::time::SystemTime::now() < not_after + std::time::Duration::from_secs(1) {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
        match client.get(&url).send().await {
            // The connection was kept: the request is refused on it.
            Ok(after) => {
                let status = after.status().as_u16();
                let body = after.text().await.unwrap_or_default();
                assert_eq!(status, 401, "{body}");
                assert!(body.contains("expired"), "{body}");
            }
            // Closed at the expiry, and a new handshake with the expired
            // certificate fails.
            Err(e) => assert!(e.is_connect() || e.is_request(), "{e:?}"),
        }
    });
}

/// `s := n - s` for a P-256 `r || s` signature: the other valid signature
/// of the same message under the same key.
fn negate_s(sig: &mut [u8]) {
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xbc, 0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63,
        0x25, 0x51,
    ];
    let s = &mut sig[32..];
    let mut borrow = 0i16;
    for (out, n) in s.iter_mut().rev().zip(N.iter().rev()) {
        let mut v = i16::from(*n) - i16::from(*out) - borrow;
        borrow = i16::from(v < 0);
        if v < 0 {
            v += 256;
        }
        *out = v as u8;
    }
}

/// The same JWS with the high-S twin of its signature.
fn high_s_twin(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    assert!(baton_ca::is_low_s(&sig), "Baton signs low-S only");
    negate_s(&mut sig);
    format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig))
}

// ---------------------------------------------------------------- hops

#[test]
fn hops_cannot_widen_the_audience_overflow_a_lifetime_or_target_reserved_ids() {
    let w = World::start();
    let (task, grant) = w.start_task(FULL, "2", "10m", "write");
    let planner = w.redeem(&grant, PLANNER, "planner");

    // Audience widening: the planner holds aud ["crm"] and asks for payments.
    let out = w.run(&[
        "delegate",
        "--credential",
        planner.to_str().unwrap(),
        "--target",
        RESEARCHER,
        "--audience",
        "payments",
        "--justification",
        "pay the invoice",
        "--scope",
        "tool:crm.search:read",
    ]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("audience_widened") && err.contains("payments not held"),
        "{err}"
    );
    // Mixed: one held, one not.
    let (status, body) = post(
        &w,
        &planner,
        "/v1/delegate",
        &delegate_body(&planner, &["crm", "payments"], None),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "audience_widened", "{body}");

    // Lifetime overflow: now + u64::MAX must not wrap into a valid grant.
    let (status, body) = post(
        &w,
        &planner,
        "/v1/delegate",
        &delegate_body(&planner, &["crm"], Some(u64::MAX)),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "invalid_argument", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("out of range"),
        "{body}"
    );
    // A lifetime beyond the holder's is refused as such.
    let (status, body) = post(
        &w,
        &planner,
        "/v1/delegate",
        &delegate_body(&planner, &["crm"], Some(100 * 24 * 3600)),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "outlives_parent", "{body}");

    // Reserved targets: the trust domain, the broker, a node.
    for target in [
        format!("spiffe://{TD}"),
        format!("spiffe://{TD}/baton/broker"),
        format!("spiffe://{TD}/baton/node/dev"),
    ] {
        let mut body = delegate_body(&planner, &["crm"], None);
        body["target"] = serde_json::json!(target);
        let (status, resp) = post(&w, &planner, "/v1/delegate", &body);
        assert_eq!(status, 403, "{target}: {resp}");
        assert_eq!(resp["code"], "reserved_id", "{target}: {resp}");
    }

    // Control: the same hop, narrower audience and a short lifetime, works,
    // and the redeemed token carries the audience at every link.
    let (status, body) = post(
        &w,
        &planner,
        "/v1/delegate",
        &delegate_body(&planner, &["crm"], Some(60)),
    );
    assert_eq!(status, 200, "{body}");
    let researcher = w.redeem(body["grant"].as_str().unwrap(), RESEARCHER, "researcher");
    let rc = claims(&researcher);
    assert_eq!(rc["aud"], serde_json::json!(["crm"]));
    assert_eq!(rc["act"]["aud"], serde_json::json!(["crm"]));
    assert_eq!(rc["act"]["act"]["aud"], serde_json::json!(["crm"]));
    let ok = w.call(&researcher, "crm.search");
    assert!(ok.status.success(), "{}", stderr(&ok));

    // Every refusal above is in the audit log.
    let t = trace(&w, &task);
    for code in [
        "audience_widened",
        "invalid_argument",
        "outlives_parent",
        "reserved_id",
    ] {
        assert!(t.contains(code), "trace lacks {code}: {t}");
    }
}

#[test]
fn a_chain_spliced_inside_a_genuinely_signed_token_is_refused_at_the_broker() {
    let w = World::start();
    let (_task, grant) = w.start_task(FULL, "2", "10m", "write");
    let planner = w.redeem(&grant, PLANNER, "planner");
    let researcher = w.redeem(
        &grant_of(&w.delegate(&planner, RESEARCHER, NARROW, &[])),
        RESEARCHER,
        "researcher",
    );
    // Another task's planner token, to splice in as the inner link.
    let (_task2, grant2) = w.start_task(FULL, "2", "10m", "write");
    let planner2 = w.redeem(&grant2, PLANNER, "planner2");

    // The attacker holds the broker's signing key (a copy of its key
    // directory, as a compromised backup would give), so the token's
    // signature is valid: only the broker's records can catch the splice.
    let keys = w.c.path("stolen-ca");
    std::fs::create_dir_all(&keys).unwrap();
    for e in std::fs::read_dir(w.c.path("broker/ca")).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), keys.join(e.file_name())).unwrap();
    }
    let mut cfg = baton_ca::CaConfig::new(TrustDomain::new(TD).unwrap());
    cfg.key_dir = Some(keys);
    let stolen = baton_ca::Ca::load_or_create(cfg, std::time::SystemTime::now()).unwrap();

    let genuine: baton_core::DelegationClaims =
        serde_json::from_value(claims(&researcher)).unwrap();
    let p2: baton_core::DelegationClaims = serde_json::from_value(claims(&planner2)).unwrap();
    let delegate_with = |name: &str, c: &baton_core::DelegationClaims| {
        let spliced = stolen.sign_delegation_token(c).unwrap();
        let dir = w.c.path(name);
        copy_cred(&researcher, &dir);
        std::fs::write(dir.join("token"), spliced.expose()).unwrap();
        let mut body = delegate_body(&dir, &["crm"], None);
        body["target"] = serde_json::json!(TOOL);
        body["scope"] = serde_json::json!(["tool:crm.search:read"]);
        post(&w, &dir, "/v1/delegate", &body)
    };
    // The outer link is genuine; the inner one names another actor under
    // the genuine jti (the verifier's offline checks all pass).
    let mut c = genuine.clone();
    c.act.act.as_mut().unwrap().sub = SpiffeId::parse(TOOL).unwrap();
    let (status, resp) = delegate_with("spliced-inner", &c);
    assert_eq!(status, 403, "{resp}");
    assert_eq!(resp["code"], "chain_unknown", "{resp}");
    assert!(
        resp["message"].as_str().unwrap().contains("link 1"),
        "{resp}"
    );
    // Another task's planner link spliced in (the parent re-pointed too).
    let mut c = genuine.clone();
    c.act.act = Some(Box::new(p2.act.clone()));
    c.parent.as_mut().unwrap().jti = p2.jti.clone();
    let (status, resp) = delegate_with("spliced-task", &c);
    assert_eq!(status, 403, "{resp}");
    assert_eq!(resp["code"], "chain_unknown", "{resp}");

    // Control: the genuine researcher token delegates.
    let mut body = delegate_body(&researcher, &["crm"], None);
    body["target"] = serde_json::json!(TOOL);
    body["scope"] = serde_json::json!(["tool:crm.search:read"]);
    let (status, resp) = post(&w, &researcher, "/v1/delegate", &body);
    assert_eq!(status, 200, "{resp}");
}

// ----------------------------------------------------------------- TLS

#[test]
fn a_revoked_task_certificate_gets_nothing_more_from_the_broker() {
    let w = World::start();
    let (task, grant) = w.start_task(
        &["tool:crm.search:read", "secret:apikey:issue"],
        "2",
        "10m",
        "write",
    );
    let planner = w.redeem(&grant, PLANNER, "planner");
    // Control: the credential delegates and leases.
    let ok = w.delegate(&planner, RESEARCHER, &["tool:crm.search:read"], &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    w.json(&[
        "secret",
        "lease",
        "--credential",
        planner.to_str().unwrap(),
        "--engine",
        "apikey",
        "-o",
        "json",
    ]);

    // Revoke the certificate by its serial: being the token's current
    // one, its token (and what the token handed on) goes with it.
    let serial = serial_of(&planner);
    let revoked = w.json(&[
        "revoke",
        "credential",
        &serial,
        "--reason",
        "stolen",
        "-o",
        "json",
    ]);
    assert!(revoked.to_string().contains(&serial), "{revoked}");

    let out = w.delegate(&planner, RESEARCHER, &["tool:crm.search:read"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("token_refused") && err.contains("is revoked"),
        "{err}"
    );
    let out = w.run(&[
        "secret",
        "lease",
        "--credential",
        planner.to_str().unwrap(),
        "--engine",
        "apikey",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("revoked"), "{}", stderr(&out));
    // The refused hop is audited under the task its token names.
    let t = trace(&w, &task);
    assert!(t.contains("revoked"), "{t}");
    // And the operator's revocation itself.
    let trail: serde_json::Value = serde_json::from_str(&t).unwrap();
    let by_operator: Vec<&serde_json::Value> = trail["task_events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "revoked")
        .collect();
    assert_eq!(by_operator.len(), 1, "{t}");
    let why = by_operator[0]["reason"].as_str().unwrap();
    assert!(
        why.starts_with("credential ") && why.ends_with("(stolen)"),
        "{t}"
    );
}

// ------------------------------------------------------- grants / renew

fn renew_request(
    dir: &Path,
    proof: Vec<u8>,
    proof_iat: i64,
) -> tonic::Request<RenewTaskCredentialRequest> {
    let leaf = CertificateDer::pem_file_iter(dir.join("svid.pem"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec();
    let mut req = tonic::Request::new(RenewTaskCredentialRequest {
        token: token_of(dir),
        x509_svid_leaf: leaf,
        spiffe_id: PLANNER.into(),
        proof,
        proof_iat,
    });
    req.metadata_mut()
        .insert("workload.spiffe.io", "true".parse().unwrap());
    req
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn renewal_needs_the_current_key_and_revokes_the_old_certificate() {
    let w = World::start();
    let (task, grant) = w.start_task(FULL, "2", "10m", "write");
    let planner = w.redeem(&grant, PLANNER, "planner");
    let token = token_of(&planner);
    let mut client = DelegationClient::new(raw_channel(&w.c).await);

    // A leaked token and the public leaf, without the key: no proof.
    let s = client
        .renew(renew_request(&planner, Vec::new(), 0))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::InvalidArgument, "{s:?}");
    assert!(s.message().contains("proof"), "{s:?}");
    // A proof signed by another key (the attacker's own).
    let other = baton_ca::WorkloadKey::generate().unwrap();
    let iat = now_secs();
    let forged = baton_ca::possession::sign_renew_proof(other.pkcs8_der(), &token, iat).unwrap();
    let s = client
        .renew(renew_request(&planner, forged, iat as i64))
        .await
        .unwrap_err();
    assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
    assert!(s.message().contains("proof_invalid"), "{s:?}");
    // A genuine proof, but stale (replayed much later).
    let key = PrivatePkcs8KeyDer::from_pem_file(planner.join("key.pem")).unwrap();
    let old_iat = now_secs() - 3600;
    let stale =
        baton_ca::possession::sign_renew_proof(key.secret_pkcs8_der(), &token, old_iat).unwrap();
    let s = client
        .renew(renew_request(&planner, stale, old_iat as i64))
        .await
        .unwrap_err();
    assert!(s.message().contains("proof_stale"), "{s:?}");
    // A genuine proof for another token does not carry over.
    let iat = now_secs();
    let elsewhere =
        baton_ca::possession::sign_renew_proof(key.secret_pkcs8_der(), "other-token", iat).unwrap();
    let s = client
        .renew(renew_request(&planner, elsewhere, iat as i64))
        .await
        .unwrap_err();
    assert!(s.message().contains("proof_invalid"), "{s:?}");

    // Control: the holder renews with its key (`baton grant renew`).
    let before = claims(&planner);
    let old = w.c.path("planner-old");
    copy_cred(&planner, &old);
    let out = w.run(&["grant", "renew", "--credential", planner.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let after = claims(&planner);
    assert_eq!(after["jti"], before["jti"]);
    assert!(after["exp"].as_u64() <= before["exp"].as_u64());
    assert_ne!(serial_of(&planner), serial_of(&old));
    // The renewed credential works; the old certificate is revoked.
    let ok = w.delegate(&planner, RESEARCHER, NARROW, &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));
    let out = w.delegate(&old, RESEARCHER, NARROW, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("certificate_revoked"),
        "{}",
        stderr(&out)
    );
    // Renewing from the old credential (its key and token) is refused too.
    let out = w.run(&["grant", "renew", "--credential", old.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("certificate_revoked"),
        "{}",
        stderr(&out)
    );
    // Refused and granted renewals are audited.
    let t = trace(&w, &task);
    assert!(t.contains("renewal proof_invalid"), "{t}");
    assert!(t.contains("renewed:"), "{t}");
}

// -------------------------------------------------------------- tokens

#[test]
fn the_high_s_twin_of_a_signature_is_refused_everywhere() {
    let w = World::start();
    let (_task, grant) = w.start_task(FULL, "2", "10m", "write");
    let planner = w.redeem(&grant, PLANNER, "planner");
    let researcher = w.redeem(
        &grant_of(&w.delegate(&planner, RESEARCHER, NARROW, &[])),
        RESEARCHER,
        "researcher",
    );
    // Control: the token as minted is accepted by the tool server.
    let ok = w.call(&researcher, "crm.search");
    assert!(ok.status.success(), "{}", stderr(&ok));

    let twin_dir = w.c.path("twin");
    copy_cred(&researcher, &twin_dir);
    std::fs::write(twin_dir.join("token"), high_s_twin(&token_of(&researcher))).unwrap();
    let out = w.call(&twin_dir, "crm.search");
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("non_canonical_signature"),
        "{}",
        stderr(&out)
    );
    // At the broker too.
    let mut body = delegate_body(&twin_dir, &["crm"], None);
    body["target"] = serde_json::json!(PLANNER);
    body["scope"] = serde_json::json!(["tool:crm.search:read"]);
    let (status, resp) = post(&w, &twin_dir, "/v1/delegate", &body);
    assert_eq!(status, 403, "{resp}");
    assert!(
        resp["message"].as_str().unwrap().contains("low-S"),
        "{resp}"
    );

    // JWT-SVIDs: the twin of a valid one fails validation.
    let jwt = w.ok(&["svid", "fetch-jwt", "--audience", "crm-tool"]);
    let jwt = jwt.trim();
    w.ok(&["svid", "validate-jwt", "--audience", "crm-tool", jwt]);
    let out = w.run(&[
        "svid",
        "validate-jwt",
        "--audience",
        "crm-tool",
        &high_s_twin(jwt),
    ]);
    assert!(!out.status.success(), "high-S JWT-SVID accepted");
    assert!(stderr(&out).contains("low-S"), "{}", stderr(&out));
}

// --------------------------------------------------------------- audit

fn report(task: &str, jti: &str, agent: &str, decision: &str) -> serde_json::Value {
    serde_json::json!({
        "report_id": format!("forged-{}", uuid_like()),
        "task_id": task,
        "token_jti": jti,
        "agent": agent,
        "tool": "crm.export",
        "resource": "customers",
        "risk": "read",
        "scope_used": ["tool:crm.search:read"],
        "input_digest": "00",
        "decision": decision,
        "policy_ids": ["forged-policy"],
        "at": 1,
    })
}

fn uuid_like() -> String {
    hex::encode(baton_ca::WorkloadKey::generate().unwrap().public_key_raw())[2..34].to_owned()
}

#[test]
fn tool_call_reports_only_from_the_tokens_tool_servers() {
    let w = World::start();
    let (task, grant) = w.start_task(FULL, "2", "10m", "write");
    let planner = w.redeem(&grant, PLANNER, "planner");
    let researcher = w.redeem(
        &grant_of(&w.delegate(&planner, RESEARCHER, NARROW, &[])),
        RESEARCHER,
        "researcher",
    );
    let rjti = claims(&researcher)["jti"].as_str().unwrap().to_owned();

    // A workload of the trust domain that is not a tool server of `crm`
    // (the researcher itself, with its task SVID) forges a report.
    let (status, body) = post(
        &w,
        &researcher,
        "/v1/audit/tool-calls",
        &report(&task, &rjti, RESEARCHER, "allow"),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "not_entitled", "{body}");
    assert!(
        body["message"].as_str().unwrap().contains("audience"),
        "{body}"
    );
    // It learns nothing of the token it names: a report of that jti under
    // another task is refused as not entitled too, without naming the
    // token's task (or its audiences).
    let (other_task, _) = w.start_task(FULL, "1", "10m", "read");
    let (status, body) = post(
        &w,
        &researcher,
        "/v1/audit/tool-calls",
        &report(&other_task, &rjti, RESEARCHER, "allow"),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "not_entitled", "{body}");
    assert!(!body.to_string().contains(&task), "{body}");
    // A batch gets per-report refusals and no receipt.
    let (status, body) = post(
        &w,
        &researcher,
        "/v1/audit/tool-calls",
        &serde_json::json!({ "reports": [report(&task, &rjti, RESEARCHER, "allow")] }),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["receipts"][0]["refused"]["code"], "not_entitled");
    assert!(body["receipts"][0]["receipt"].is_null(), "{body}");

    // The tool server itself (its workload SVID, fetched as this uid may)
    // is entitled, but the report must agree with the broker's records.
    let tool = w.c.path("tool-svid");
    w.ok(&[
        "svid",
        "fetch",
        "--spiffe-id",
        TOOL,
        "--write",
        tool.to_str().unwrap(),
    ]);
    let (_other_task, g2) = w.start_task(FULL, "2", "10m", "write");
    let p2 = w.redeem(&g2, PLANNER, "planner2");
    let p2jti = claims(&p2)["jti"].as_str().unwrap().to_owned();
    for (what, r) in [
        (
            "unknown token",
            report(&task, "no-such-jti", RESEARCHER, "allow"),
        ),
        (
            "another task's token",
            report(&task, &p2jti, PLANNER, "allow"),
        ),
        (
            "not the token's holder",
            report(&task, &rjti, PLANNER, "allow"),
        ),
        ("a scope the token does not grant", {
            let mut r = report(&task, &rjti, RESEARCHER, "allow");
            r["scope_used"] = serde_json::json!(["tool:crm.update:write"]);
            r
        }),
        ("no scope used", {
            let mut r = report(&task, &rjti, RESEARCHER, "allow");
            r["scope_used"] = serde_json::json!([]);
            r
        }),
        ("an approval that never was", {
            let mut r = report(&task, &rjti, RESEARCHER, "allow");
            r["reason"] = serde_json::json!("approved in ap_deadbeefdeadbeefdeadbeef");
            r
        }),
        ("a risk over the task's ceiling", {
            let mut r = report(&task, &rjti, RESEARCHER, "allow");
            r["risk"] = serde_json::json!("export");
            r
        }),
    ] {
        let (status, body) = post(&w, &tool, "/v1/audit/tool-calls", &r);
        assert_eq!(status, 403, "{what}: {body}");
        assert_eq!(body["code"], "report_refused", "{what}: {body}");
    }
    // Control: a report that agrees is recorded, with the broker's time
    // (the reporter claimed unix time 1).
    let before = now_secs();
    let agreed = report(&task, &rjti, RESEARCHER, "allow");
    let (status, body) = post(&w, &tool, "/v1/audit/tool-calls", &agreed);
    assert_eq!(status, 200, "{body}");
    assert!(body["receipts"][0]["receipt"].is_object(), "{body}");
    // Its id, sent again: the tool server hears it is a duplicate; the
    // researcher (not entitled) is refused, and learns nothing of it.
    let (status, body) = post(&w, &tool, "/v1/audit/tool-calls", &agreed);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["receipts"][0]["duplicate"], true, "{body}");
    let (status, body) = post(&w, &researcher, "/v1/audit/tool-calls", &agreed);
    assert_eq!(status, 403, "{body}");
    assert!(!body.to_string().contains("duplicate"), "{body}");
    let events = w.json(&["audit", "trace", &task, "--json"]);
    let ev = find_obj(&events, &|o| {
        o.get("tool").and_then(|t| t.as_str()) == Some("crm.export")
    })
    .expect("the accepted report in the trace");
    let at = ev["at"].as_u64().unwrap_or_default();
    assert!(
        at >= before.saturating_sub(5),
        "event time {at}, now {before}: {ev}"
    );

    // No field of a report can carry the reporter's traffic into the log.
    for (field, value) in [
        ("reason", serde_json::json!("x".repeat(10_000))),
        ("justification", serde_json::json!("x".repeat(10_000))),
        ("resource", serde_json::json!("x".repeat(5_000))),
        ("tool", serde_json::json!("crm.search\nforged: line")),
        ("policy_ids", serde_json::json!(vec!["p"; 500])),
        ("input_digest", serde_json::json!("0".repeat(1_000))),
    ] {
        let mut r = report(&task, &rjti, RESEARCHER, "deny");
        r[field] = value;
        let (status, body) = post(&w, &tool, "/v1/audit/tool-calls", &r);
        assert_eq!(status, 400, "{field}: {body}");
        assert!(body.to_string().contains(field), "{field}: {body}");
    }

    // The tool server follows the revocation feed while its SVID is live.
    let (status, body) = get(&w, &tool, "/v1/revocations/feed?after=0");
    assert_eq!(status, 200, "{body}");
    assert!(body["epoch"].is_string(), "{body}");

    // The tool server's SVID revoked: it reports nothing more (its
    // reports and approval requests were accepted just above), and no
    // longer reads the revocation feed.
    let serial = serial_of(&tool);
    w.ok(&[
        "revoke",
        "credential",
        &serial,
        "--reason",
        "tool server compromised",
    ]);
    let (status, body) = post(
        &w,
        &tool,
        "/v1/audit/tool-calls",
        &report(&task, &rjti, RESEARCHER, "allow"),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "certificate_revoked", "{body}");
    let (status, body) = post(
        &w,
        &tool,
        "/v1/approvals",
        &serde_json::json!({"token": token_of(&researcher)}),
    );
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "certificate_revoked", "{body}");
    let (status, body) = get(&w, &tool, "/v1/revocations/feed?after=0");
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "certificate_revoked", "{body}");
    // Refused before its body is read: a revoked server cannot make the
    // broker take in a batch (up to 4 MiB) or an approval request (up to
    // 64 KiB) it will refuse anyway. Each declared size is within its
    // route's limit, so the answer is not the size refusal.
    for (route, declared) in [
        ("/v1/audit/tool-calls", 1_000_000),
        ("/v1/approvals", 60_000),
    ] {
        let answer =
            answer_while_the_body_is_owed(&w, &tool, route, declared).unwrap_or_else(|| {
                panic!("{route}: the broker waited for the body of a revoked server")
            });
        assert!(answer.starts_with("HTTP/1.1 403"), "{route}: {answer}");
        assert!(answer.contains("certificate_revoked"), "{route}: {answer}");
    }
}

/// A token whose signature does not verify writes nothing into the trace
/// of the task its claims name (anyone with an SVID of the trust domain
/// could fill another task's audit trail); a real token of the task
/// presented by the wrong holder is recorded there.
#[test]
fn a_forged_token_leaves_no_record_in_the_task_it_names() {
    let w = World::start();
    let (task, grant) = w.start_task(FULL, "2", "10m", "write");
    let planner = w.redeem(&grant, PLANNER, "planner");
    let (_other, g2) = w.start_task(FULL, "2", "10m", "write");
    let stranger = w.redeem(&g2, PLANNER, "stranger");

    // The planner's real claims with a signature that is not the broker's.
    let real = token_of(&planner);
    let mut parts: Vec<&str> = real.split('.').collect();
    let zeros = URL_SAFE_NO_PAD.encode([7u8; 64]);
    parts[2] = &zeros;
    let forged = parts.join(".");
    let mut body = delegate_body(&planner, &["crm"], None);
    body["token"] = serde_json::json!(forged);
    body["justification"] = serde_json::json!("forged-marker-1");
    let (status, answer) = post(&w, &stranger, "/v1/delegate", &body);
    assert_eq!(status, 403, "{answer}");
    assert!(!trace(&w, &task).contains("forged-marker-1"));

    // Control: the real token, presented with another certificate.
    body["token"] = serde_json::json!(real);
    body["justification"] = serde_json::json!("stolen-marker-2");
    let (status, answer) = post(&w, &stranger, "/v1/delegate", &body);
    assert_eq!(status, 403, "{answer}");
    let t = wait_for(
        "the refused holder in the trace",
        Duration::from_secs(30),
        || {
            let t = trace(&w, &task);
            t.contains("stolen-marker-2").then_some(t)
        },
    );
    assert!(t.contains("refused for its holder"), "{t}");
    assert!(t.contains("bound to another certificate"), "{t}");

    // A hop's justification is bounded: it goes into the audit log.
    let mut body = delegate_body(&planner, &["crm"], None);
    body["justification"] = serde_json::json!("j".repeat(5_000));
    let (status, answer) = post(&w, &planner, "/v1/delegate", &body);
    assert_eq!(status, 403, "{answer}");
    assert_eq!(answer["code"], "invalid_argument", "{answer}");
    assert!(answer.to_string().contains("justification"), "{answer}");
}

/// The first object in `v` (depth first) that `pred` accepts.
fn find_obj(
    v: &serde_json::Value,
    pred: &dyn Fn(&serde_json::Map<String, serde_json::Value>) -> bool,
) -> Option<serde_json::Value> {
    match v {
        serde_json::Value::Object(m) if pred(m) => Some(v.clone()),
        serde_json::Value::Object(m) => m.values().find_map(|x| find_obj(x, pred)),
        serde_json::Value::Array(a) => a.iter().find_map(|x| find_obj(x, pred)),
        _ => None,
    }
}

// ---------------------------------------------------- reserved identities

/// `baton task start` for alice with a minimal task rooted at `root`.
fn start_rooted_at(w: &World, root: &str) -> std::process::Output {
    w.run(&[
        "task",
        "start",
        "--user",
        "alice@example.com",
        "--group",
        "engineering",
        "--root-agent",
        root,
        "--purpose",
        "support.case-research",
        "--risk-ceiling",
        "read",
        "--ttl",
        "10m",
        "--max-depth",
        "1",
        "--audience",
        "crm",
        "--scope",
        "tool:crm.search:read",
    ])
}

#[test]
fn infrastructure_identities_are_reserved() {
    let w = World::start();
    let node = format!("spiffe://{TD}/baton/node/dev");
    for id in [
        format!("spiffe://{TD}/baton/node/evil"),
        format!("spiffe://{TD}/baton/broker"),
        format!("spiffe://{TD}/baton"),
    ] {
        let out = w.run(&[
            "entry",
            "create",
            "--spiffe-id",
            &id,
            "--parent-id",
            &node,
            "--selector",
            "unix:uid:0",
        ]);
        assert_eq!(out.status.code(), Some(2), "{id}");
        assert!(stderr(&out).contains("reserved"), "{id}: {}", stderr(&out));
    }
    // A join token for a name outside the node namespace.
    let out = w.run(&[
        "token",
        "generate",
        "--node-id",
        &format!("spiffe://{TD}/agents/planner"),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("/baton/node/"), "{}", stderr(&out));
    // A task rooted at the broker or a node.
    for root in [format!("spiffe://{TD}/baton/broker"), node.clone()] {
        let out = start_rooted_at(&w, &root);
        assert_eq!(out.status.code(), Some(2), "{root}");
        assert!(
            stderr(&out).contains("reserved"),
            "{root}: {}",
            stderr(&out)
        );
    }
    // Controls.
    w.ok(&[
        "entry",
        "create",
        "--spiffe-id",
        &format!("spiffe://{TD}/agents/fine"),
        "--parent-id",
        &node,
        "--selector",
        "unix:uid:0",
    ]);
    w.ok(&[
        "token",
        "generate",
        "--node-id",
        &format!("spiffe://{TD}/baton/node/n2"),
    ]);

    // A node that never attested can be banned ahead of time: no join
    // token is minted for it until the ban is lifted.
    let never = format!("spiffe://{TD}/baton/node/never");
    let v = w.json(&["node", "ban", &never, "-o", "json"]);
    assert_eq!(v["action"], "banned", "{v}");
    let out = w.run(&["token", "generate", "--node-id", &never]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("banned"), "{}", stderr(&out));
    w.ok(&["node", "unban", &never]);
    w.ok(&["token", "generate", "--node-id", &never]);
}

// ------------------------------------------------------- kill switch

#[test]
fn a_revoked_agent_gets_no_new_credentials_until_unblocked() {
    let w = World::start();
    let (task, grant) = w.start_task(FULL, "2", "10m", "write");
    let planner = w.redeem(&grant, PLANNER, "planner");
    // A grant handed out before the kill switch.
    let pending = grant_of(&w.delegate(&planner, RESEARCHER, NARROW, &[]));
    // Control: the node daemon serves the researcher's X509-SVID.
    w.ok(&["svid", "fetch", "--spiffe-id", RESEARCHER]);

    let v = w.json(&[
        "revoke",
        "agent",
        RESEARCHER,
        "--reason",
        "compromised",
        "-o",
        "json",
    ]);
    assert_eq!(v["blocked"]["spiffe_id"], RESEARCHER, "{v}");

    // No hop to it, no redeem of the pending grant.
    let out = w.delegate(&planner, RESEARCHER, NARROW, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("agent_blocked"), "{}", stderr(&out));
    let out = w.run(&[
        "grant",
        "redeem",
        "--grant",
        &pending,
        "--spiffe-id",
        RESEARCHER,
        "--out",
        w.c.path("blocked").to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("agent_blocked") || err.contains("revoked") || err.contains("no identity"),
        "{err}"
    );
    // The node daemon stops serving the agent's X509-SVID.
    wait_for(
        "the blocked agent's SVID to leave the Workload API",
        Duration::from_secs(60),
        || {
            (!w.run(&["svid", "fetch", "--spiffe-id", RESEARCHER])
                .status
                .success())
            .then_some(())
        },
    );
    // Others still get theirs (control).
    w.ok(&["svid", "fetch", "--spiffe-id", PLANNER]);
    // A task rooted at it cannot start.
    let out = start_rooted_at(&w, RESEARCHER);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("agent_blocked") || stderr(&out).contains("blocked"));
    // Other agents are unaffected (control).
    let ok = w.delegate(&planner, TOOL, &["tool:crm.search:read"], &[]);
    assert!(ok.status.success(), "{}", stderr(&ok));

    // Lifted: hops to it work again.
    w.ok(&["revoke", "unblock", RESEARCHER]);
    let out = w.run(&["revoke", "unblock", RESEARCHER]);
    assert_eq!(out.status.code(), Some(2), "second unblock is a not-found");
    let again = w.delegate(&planner, RESEARCHER, NARROW, &[]);
    assert!(again.status.success(), "{}", stderr(&again));
    wait_for(
        "the unblocked agent's redeem",
        Duration::from_secs(60),
        || {
            let out = w.run(&[
                "grant",
                "redeem",
                "--grant",
                &grant_of(&w.delegate(&planner, RESEARCHER, NARROW, &[])),
                "--spiffe-id",
                RESEARCHER,
                "--out",
                w.c.path("unblocked").to_str().unwrap(),
            ]);
            out.status.success().then_some(())
        },
    );
    let t = trace(&w, &task);
    assert!(t.contains("agent_blocked"), "{t}");

    // --until: the block lapses by itself.
    let v = w.json(&[
        "revoke", "agent", RESEARCHER, "--until", "20s", "-o", "json",
    ]);
    assert!(v["blocked"]["until"].is_u64(), "{v}");
    let out = w.delegate(&planner, RESEARCHER, NARROW, &[]);
    assert!(stderr(&out).contains("agent_blocked"), "{}", stderr(&out));
    wait_for("the block to lapse", Duration::from_secs(60), || {
        w.delegate(&planner, RESEARCHER, NARROW, &[])
            .status
            .success()
            .then_some(())
    });
}

// ------------------------------------------- revocation without Redis

#[test]
fn without_redis_the_tool_server_follows_the_brokers_own_feed() {
    // No --redis anywhere: the default set-up of `baton dev` and the example.
    let w = World::start();
    let (task, grant) = w.start_task(FULL, "2", "10m", "write");
    let planner = w.redeem(&grant, PLANNER, "planner");
    let researcher = w.redeem(
        &grant_of(&w.delegate(&planner, RESEARCHER, NARROW, &[])),
        RESEARCHER,
        "researcher",
    );
    let other = w.redeem(
        &grant_of(&w.delegate(&planner, RESEARCHER, NARROW, &[])),
        RESEARCHER,
        "researcher-2",
    );
    // Controls: both credentials are accepted.
    for dir in [&researcher, &other] {
        let ok = w.call(dir, "crm.search");
        assert!(ok.status.success(), "{}", stderr(&ok));
    }
    // One task certificate revoked on its own.
    let serial = serial_of(&researcher);
    w.ok(&["revoke", "credential", &serial]);
    let err = wait_for(
        "the revoked certificate refused by the tool server",
        Duration::from_secs(30),
        || {
            let out = w.call(&researcher, "crm.search");
            let err = stderr(&out);
            (!out.status.success() && err.contains("revoked")).then_some(err)
        },
    );
    assert!(err.contains("revoked"), "{err}");
    // The other credential of the task still works.
    let ok = w.call(&other, "crm.search");
    assert!(ok.status.success(), "{}", stderr(&ok));
    // Task end reaches the tool server too.
    w.ok(&["task", "end", &task]);
    let err = wait_for(
        "the ended task's credential refused by the tool server",
        Duration::from_secs(30),
        || {
            let out = w.call(&other, "crm.search");
            let err = stderr(&out);
            (!out.status.success() && err.contains("revoked")).then_some(err)
        },
    );
    assert!(err.contains("revoked"), "{err}");
}

// ------------------------------------------------------ task lifecycle

fn admin_post(w: &World, path: &str, body: &serde_json::Value) -> serde_json::Value {
    baton_tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        reqwest::Client::builder()
            .unix_socket(w.c.admin_socket())
            .build()
            .unwrap()
            .post(format!("http://admin{path}"))
            .json(body)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    })
}

fn start_with_id_token(w: &World, token: &str) -> std::process::Output {
    w.run(&[
        "task",
        "start",
        "--id-token",
        token,
        "--root-agent",
        PLANNER,
        "--purpose",
        "support.case-research",
        "--risk-ceiling",
        "read",
        "--ttl",
        "10m",
        "--max-depth",
        "1",
        "--audience",
        "crm",
        "--scope",
        "tool:crm.search:read",
        "-o",
        "json",
    ])
}

#[test]
fn an_id_token_starts_one_task_and_task_end_is_idempotent() {
    let w = World::start();
    let v = admin_post(
        &w,
        "/v1/admin/dev/id-token",
        &serde_json::json!({ "user": "alice@example.com", "groups": ["engineering"] }),
    );
    let token = v["id_token"].as_str().unwrap().to_owned();
    // Control: the first use starts a task.
    let first = start_with_id_token(&w, &token);
    assert!(first.status.success(), "{}", stderr(&first));
    let task: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let task = task["task_id"].as_str().unwrap().to_owned();
    // A captured copy cannot start a second one, nor can a re-encoding of
    // its signature.
    let again = start_with_id_token(&w, &token);
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("single use"), "{}", stderr(&again));
    let twin = high_s_twin_any(&token);
    let again = start_with_id_token(&w, &twin);
    assert_eq!(again.status.code(), Some(2));
    // A fresh token for the same user works (control).
    let v = admin_post(
        &w,
        "/v1/admin/dev/id-token",
        &serde_json::json!({ "user": "alice@example.com", "groups": ["engineering"] }),
    );
    let fresh = start_with_id_token(&w, v["id_token"].as_str().unwrap());
    assert!(fresh.status.success(), "{}", stderr(&fresh));

    // Ending twice: the second call succeeds and re-drives the revocation.
    let v = w.json(&["task", "end", &task, "-o", "json"]);
    assert_eq!(v["already_ended"], false, "{v}");
    let v = w.json(&["task", "end", &task, "-o", "json"]);
    assert_eq!(v["already_ended"], true, "{v}");
}

/// The other valid ES256 signature of a JWS (whichever form it had).
fn high_s_twin_any(token: &str) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    let mut sig = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    negate_s(&mut sig);
    format!("{}.{}.{}", parts[0], parts[1], URL_SAFE_NO_PAD.encode(sig))
}
