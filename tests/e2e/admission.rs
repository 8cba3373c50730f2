//! Who may start what: task starts and secret leases are Cedar decisions
//! (`deploy/policies/admission`), refused by default, each refusal with
//! its code, the principal, the action and the deciding policies, and in
//! the audit log; a broker whose admission policy does not validate, or
//! that trusts a real OIDC issuer without one, does not start.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::delegation::{PLANNER, World};
use crate::harness::{Proc, TD, baton, wait_for};

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// POSTs `body` to the broker's admin socket: (status, JSON body).
fn admin_post(w: &World, path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    baton_tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = reqwest::Client::builder()
            .unix_socket(w.c.admin_socket())
            .build()
            .unwrap()
            .post(format!("http://admin{path}"))
            .json(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(serde_json::Value::Null))
    })
}

/// A fresh dev ID token for `user` with `groups`.
fn id_token(w: &World, user: &str, groups: &[&str]) -> String {
    let (status, v) = admin_post(
        w,
        "/v1/admin/dev/id-token",
        &serde_json::json!({ "user": user, "groups": groups }),
    );
    assert_eq!(status, 200, "{v}");
    v["id_token"].as_str().unwrap().to_owned()
}

/// Starts a task for the planner as `user` in `groups`: (status, body).
fn start(
    w: &World,
    user: &str,
    groups: &[&str],
    scope: &[&str],
    risk_ceiling: &str,
    ttl_secs: u64,
) -> (u16, serde_json::Value) {
    let token = id_token(w, user, groups);
    admin_post(
        w,
        "/v1/admin/tasks",
        &serde_json::json!({
            "id_token": token,
            "root_agent": PLANNER,
            "purpose": "support.case-research",
            "scope": scope,
            "risk_ceiling": risk_ceiling,
            "ttl_secs": ttl_secs,
            "max_depth": 2,
            "audience": ["crm"],
        }),
    )
}

/// Asserts a 403 `not_permitted` whose message is `expected` up to the
/// audit reference, and returns the refused task id the message names.
fn not_permitted(answer: (u16, serde_json::Value), expected: &str) -> String {
    let (status, body) = answer;
    assert_eq!(status, 403, "{body}");
    assert_eq!(body["code"], "not_permitted", "{body}");
    let message = body["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "task start refused: {expected} (audit: baton audit trace task-"
        )),
        "{message}"
    );
    message
        .rsplit_once("baton audit trace ")
        .unwrap()
        .1
        .trim_end_matches(')')
        .to_owned()
}

const CRM: &[&str] = &["tool:crm.search:read", "dataset:crm:read"];
const PAYMENTS: &[&str] = &["tool:payments.refund:write"];

fn planner_resource() -> String {
    format!("Agent::\"{PLANNER}\"")
}

#[test]
fn task_start_is_a_cedar_decision_refused_by_default_and_audited() {
    let w = World::start();
    let agent = planner_resource();

    // Not in the group: no policy permits it.
    let refused = not_permitted(
        start(&w, "carol@example.com", &["sales"], CRM, "read", 600),
        &format!("no policy permits Human::\"carol@example.com\" to start_task on {agent}"),
    );
    // Control: a member of engineering, same request.
    let (status, ok) = start(&w, "alice@example.com", &["engineering"], CRM, "read", 600);
    assert_eq!(status, 200, "{ok}");
    // A refused ID token is spent like an admitted one: replayed, it is
    // refused as used, and no second refusal is logged for it.
    let body = serde_json::json!({
        "id_token": id_token(&w, "carol@example.com", &["sales"]),
        "root_agent": PLANNER,
        "purpose": "support.case-research",
        "scope": CRM,
        "risk_ceiling": "read",
        "ttl_secs": 600,
        "max_depth": 2,
        "audience": ["crm"],
    });
    not_permitted(
        admin_post(&w, "/v1/admin/tasks", &body),
        &format!("no policy permits Human::\"carol@example.com\" to start_task on {agent}"),
    );
    let (status, again) = admin_post(&w, "/v1/admin/tasks", &body);
    assert_eq!(status, 401, "{again}");
    assert!(
        again["message"].as_str().unwrap().contains("single use"),
        "{again}"
    );

    // A scope beyond what the policy allows: payments, for finance only.
    let payments = not_permitted(
        start(
            &w,
            "alice@example.com",
            &["engineering"],
            PAYMENTS,
            "write",
            600,
        ),
        &format!(
            "Human::\"alice@example.com\" may not start_task on {agent}: denied by policy \
             admission.payments-finance-only"
        ),
    );
    // Control: finance may.
    let (status, ok) = start(&w, "bob@example.com", &["finance"], PAYMENTS, "write", 600);
    assert_eq!(status, 200, "{ok}");

    // Over the policy's risk ceiling (write) and lifetime (1h); controls
    // at the bounds succeed.
    not_permitted(
        start(
            &w,
            "alice@example.com",
            &["engineering"],
            CRM,
            "delete",
            600,
        ),
        &format!("no policy permits Human::\"alice@example.com\" to start_task on {agent}"),
    );
    not_permitted(
        start(
            &w,
            "alice@example.com",
            &["engineering"],
            CRM,
            "write",
            3601,
        ),
        &format!("no policy permits Human::\"alice@example.com\" to start_task on {agent}"),
    );
    let (status, ok) = start(
        &w,
        "alice@example.com",
        &["engineering"],
        CRM,
        "write",
        3600,
    );
    assert_eq!(status, 200, "{ok}");

    // The CLI: `--group` reaches the dev issuer's token; the refusal names
    // the principal, the action and the policy.
    let err = w.refused(&[
        "task",
        "start",
        "--user",
        "dave@example.com",
        "--root-agent",
        PLANNER,
        "--purpose",
        "support.case-research",
        "--scope",
        "tool:crm.search:read",
        "--audience",
        "crm",
    ]);
    assert!(
        err.contains("no policy permits Human::\"dave@example.com\" to start_task"),
        "{err}"
    );
    let out = w.run(&[
        "task",
        "start",
        "--user",
        "dave@example.com",
        "--group",
        "engineering",
        "--root-agent",
        PLANNER,
        "--purpose",
        "support.case-research",
        "--scope",
        "tool:crm.search:read",
        "--audience",
        "crm",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));

    // Only the four permitted starts made tasks.
    let tasks = w.json(&["task", "list", "-o", "json"]);
    assert_eq!(tasks["tasks"].as_array().unwrap().len(), 4, "{tasks}");

    // Every refusal is in the audit log, under the id its message names,
    // with the deciding policies, and without the human's name in clear
    // in the reason (the initiator is kept as an HMAC).
    let trace = w.json(&["audit", "trace", &refused, "--json"]);
    let event = &trace["task_events"][0];
    assert_eq!(event["type"], "start_refused", "{trace}");
    assert_eq!(event["root_agent"], PLANNER, "{trace}");
    let reason = event["reason"].as_str().unwrap();
    assert_eq!(
        reason,
        format!("not_permitted: no policy permits start_task on {agent}"),
        "{trace}"
    );
    let text = w.ok(&["audit", "trace", &refused]);
    assert!(
        text.contains(&format!(
            "task start REFUSED for {PLANNER}, risk ceiling read (not_permitted: "
        )),
        "{text}"
    );
    let trace = w.json(&["audit", "trace", &payments, "--json"]);
    assert_eq!(
        trace["task_events"][0]["policy_ids"],
        serde_json::json!(["admission.payments-finance-only"]),
        "{trace}"
    );
    // The log still verifies.
    w.ok(&["audit", "verify"]);
}

/// A task for the planner with `purpose` and `scope`, redeemed: its
/// credential directory.
fn redeemed_task(
    w: &World,
    purpose: &str,
    scope: &[&str],
    tag: &str,
) -> (String, std::path::PathBuf) {
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
        "--audience",
        "crm",
        "-o",
        "json",
    ];
    for s in scope {
        args.extend(["--scope", s]);
    }
    let v = w.json(&args);
    let task = v["task_id"].as_str().unwrap().to_owned();
    let cred = w.redeem(v["grant"].as_str().unwrap(), PLANNER, tag);
    (task, cred)
}

fn lease(w: &World, cred: &Path) -> std::process::Output {
    w.run(&[
        "secret",
        "lease",
        "--credential",
        cred.to_str().unwrap(),
        "--engine",
        "apikey",
        "-o",
        "json",
    ])
}

#[test]
fn secret_leases_are_a_cedar_decision() {
    let w = World::start();
    // The scope holds the engine's permission, but the purpose is not one
    // leases are for.
    let (task, cred) = redeemed_task(
        &w,
        "sales.account-research",
        &["secret:apikey:issue"],
        "sales",
    );
    let out = lease(&w, &cred);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!(
            "secret lease refused (not_permitted): no policy permits \
             Agent::\"{PLANNER}\" to lease_secret on Secret::\"apikey\""
        )),
        "{err}"
    );
    // In the task's trace, as a denied lease.
    let trace = w.json(&["audit", "trace", &task, "--json"]).to_string();
    assert!(
        trace.contains("secret.lease") && trace.contains("not_permitted: no policy permits"),
        "{trace}"
    );

    // Control: the same scope for a support task gets its key, and the
    // audit log names the permit.
    let (task, cred) = redeemed_task(
        &w,
        "support.case-research",
        &["secret:apikey:issue"],
        "support",
    );
    let out = lease(&w, &cred);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        v["material"]["key"].as_str().unwrap().starts_with("bk_"),
        "{v}"
    );
    let trace = w.json(&["audit", "trace", &task, "--json"]).to_string();
    assert!(trace.contains("leases.support-and-audit"), "{trace}");
}

/// Runs `baton broker` with `args` until it exits on its own, or until it
/// writes its ready file (then it is stopped): (started, log).
fn broker_with(dir: &Path, args: &[&str]) -> (bool, String) {
    let ready = dir.join("broker.addr");
    let mut cmd: Command = baton();
    cmd.args(["broker", "--trust-domain", TD, "--listen", "127.0.0.1:0"])
        .args(args)
        .arg("--data-dir")
        .arg(dir.join("broker"))
        .arg("--admin-socket")
        .arg(dir.join("admin.sock"))
        .arg("--ready-file")
        .arg(&ready);
    let mut p = Proc::spawn("broker", cmd, dir.join("broker.log"));
    let started = wait_for(
        "the broker to start or exit",
        Duration::from_secs(60),
        || {
            if ready.exists() {
                return Some(true);
            }
            p.child.try_wait().ok().flatten().map(|_| false)
        },
    );
    if started {
        p.stop();
        let _ = std::fs::remove_file(&ready);
    }
    (started, p.log_text())
}

/// The admin socket's path is replaced only when it holds a stale socket:
/// a regular file there (a typo naming the audit log) or a socket another
/// process serves (a second broker given the same path) stops the start
/// and is kept. The control: a stale socket from an earlier run is
/// replaced.
#[test]
fn a_broker_replaces_a_stale_admin_socket_and_nothing_else() {
    let dir = tempfile::Builder::new()
        .prefix("baton-admin-sock")
        .tempdir()
        .unwrap();
    let path = dir.path().join("admin.sock");
    std::fs::write(&path, "precious").unwrap();
    let (started, log) = broker_with(dir.path(), &["--dev-issuer"]);
    assert!(!started, "{log}");
    assert!(log.contains("not a socket"), "{log}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
    // A socket someone serves is not taken over: its clients keep reaching
    // it, and the broker says why it did not start.
    std::fs::remove_file(&path).unwrap();
    let live = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let (started, log) = broker_with(dir.path(), &["--dev-issuer"]);
    assert!(!started, "{log}");
    assert!(log.contains("another process is serving"), "{log}");
    {
        use std::io::{Read as _, Write as _};
        let mut client = std::os::unix::net::UnixStream::connect(&path).unwrap();
        client.write_all(b"x").unwrap();
        // The broker's probe sits in the backlog first: it ends at once.
        let got = loop {
            let (mut conn, _) = live.accept().unwrap();
            let mut b = [0u8; 1];
            if conn.read(&mut b).unwrap() == 1 {
                break b[0];
            }
        };
        assert_eq!(got, b'x', "the socket's own clients still reach it");
    }
    // A stale socket (its listener gone, as after a crash) is replaced.
    drop(live);
    assert!(std::os::unix::fs::FileTypeExt::is_socket(
        &std::fs::symlink_metadata(&path).unwrap().file_type()
    ));
    let (started, log) = broker_with(dir.path(), &["--dev-issuer"]);
    assert!(started, "{log}");
}

/// A copy of the shipped admission policies (`deploy/policies/admission`)
/// in `dir/admission`, to edit freely.
fn shipped_admission_policies(dir: &Path) -> std::path::PathBuf {
    let shipped = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../deploy/policies/admission"
    );
    let policies = dir.join("admission");
    std::fs::create_dir(&policies).unwrap();
    for f in std::fs::read_dir(shipped).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, policies.join(f.file_name().unwrap())).unwrap();
    }
    policies
}

#[test]
fn a_broker_without_a_valid_admission_policy_does_not_start() {
    let dir = tempfile::Builder::new()
        .prefix("baton-admission")
        .tempdir()
        .unwrap();
    let policies = shipped_admission_policies(dir.path());
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, r#"{"keys":[]}"#).unwrap();
    let oidc = [
        "--oidc-issuer",
        "https://login.example.org",
        "--oidc-jwks",
        jwks.to_str().unwrap(),
        "--oidc-audience",
        "baton",
    ];

    // A JWKS file every user can write is refused.
    std::fs::set_permissions(&jwks, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let (started, log) = broker_with(dir.path(), &oidc);
    assert!(!started, "{log}");
    assert!(
        log.contains("--oidc-jwks") && log.contains("writable by every user"),
        "{log}"
    );
    std::fs::set_permissions(&jwks, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();

    // A real issuer beside the dev one (whose tokens anyone on the admin
    // socket mints) is refused.
    let with_dev = [&oidc[..], &["--dev-issuer"]].concat();
    let (started, log) = broker_with(dir.path(), &with_dev);
    assert!(!started, "{log}");
    assert!(
        log.contains("--dev-issuer cannot be combined with --oidc-issuer"),
        "{log}"
    );

    // A broker that trusts a real issuer needs an admission policy.
    let (started, log) = broker_with(dir.path(), &oidc);
    assert!(
        !started,
        "broker started without an admission policy: {log}"
    );
    assert!(
        log.contains(
            "trusts the OIDC issuer(s) https://login.example.org but has no admission policy"
        ) && log.contains("--admission-policy"),
        "{log}"
    );
    // Control: with the example set it starts.
    let with_policy = [
        &oidc[..],
        &["--admission-policy", policies.to_str().unwrap()],
    ]
    .concat();
    let (started, log) = broker_with(dir.path(), &with_policy);
    assert!(started, "{log}");

    // A policy that does not validate against the schema: refused at
    // start-up with its file and line.
    std::fs::write(
        policies.join("broken.cedar"),
        "// a typo on line 3\n@id(\"typo\")\npermit (principal is Human, action == Action::\"start_task\", resource) when { principal.grups.contains(\"x\") };\n",
    )
    .unwrap();
    let (started, log) = broker_with(dir.path(), &with_policy);
    assert!(
        !started,
        "broker started with a bad admission policy: {log}"
    );
    assert!(log.contains("admission policy: "), "{log}");
    assert!(
        log.contains("broken.cedar:3:"),
        "error names file and line: {log}"
    );
    assert!(log.contains("grups"), "{log}");

    // One that does not parse.
    std::fs::write(
        policies.join("broken.cedar"),
        "permit (principal, action, resource\n",
    )
    .unwrap();
    let (started, log) = broker_with(dir.path(), &with_policy);
    assert!(!started, "{log}");
    assert!(log.contains("broken.cedar:"), "{log}");

    // The hop and call policies are not an admission policy.
    std::fs::remove_file(policies.join("broken.cedar")).unwrap();
    let hops = concat!(env!("CARGO_MANIFEST_DIR"), "/../../deploy/policies");
    let wrong = [&oidc[..], &["--admission-policy", hops]].concat();
    let (started, log) = broker_with(dir.path(), &wrong);
    assert!(!started, "{log}");
    assert!(log.contains("admission policy: "), "{log}");
}

/// A JWKS of `keys` (kid, P-256 key pair), as an IdP publishes it.
fn write_jwks(path: &Path, keys: &[(&str, &rcgen::KeyPair)]) {
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let keys: Vec<serde_json::Value> = keys
        .iter()
        .map(|(kid, kp)| {
            // The uncompressed point: 0x04, then x and y.
            let point = kp.public_key_raw();
            serde_json::json!({
                "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
                "x": b64(&point[1..33]), "y": b64(&point[33..65]),
            })
        })
        .collect();
    std::fs::write(path, serde_json::json!({ "keys": keys }).to_string()).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
}

/// An IdP's keys are read again on SIGHUP: a key it withdrew (a leaked
/// one) starts no task from then on, and one it added does. A JWKS file
/// that does not parse, or that every user can write, keeps the keys in
/// force. The control at each step: the key the JWKS in force names.
#[test]
fn sighup_rereads_the_oidc_jwks_so_a_withdrawn_key_starts_nothing() {
    const ISS: &str = "https://login.example.org";
    let dir = tempfile::Builder::new()
        .prefix("baton-jwks")
        .tempdir()
        .unwrap();
    let policies = shipped_admission_policies(dir.path());
    let old = rcgen::KeyPair::generate().unwrap();
    let new = rcgen::KeyPair::generate().unwrap();
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[("k-old", &old)]);

    let ready = dir.path().join("broker.addr");
    let admin = dir.path().join("admin.sock");
    let mut cmd: Command = baton();
    cmd.args(["broker", "--trust-domain", TD, "--listen", "127.0.0.1:0"])
        .args([
            "--oidc-issuer",
            ISS,
            "--oidc-audience",
            "baton",
            "--oidc-jwks",
        ])
        .arg(&jwks)
        .arg("--admission-policy")
        .arg(&policies)
        .arg("--data-dir")
        .arg(dir.path().join("broker"))
        .arg("--admin-socket")
        .arg(&admin)
        .arg("--ready-file")
        .arg(&ready);
    let mut broker = Proc::spawn("broker", cmd, dir.path().join("broker.log"));
    wait_for("the broker's ready file", Duration::from_secs(60), || {
        assert!(broker.is_running(), "{}", broker.log_text());
        ready.exists().then_some(())
    });

    // Each start spends its ID token: every one is fresh (its own jti).
    let minted = std::cell::Cell::new(0u32);
    let start = |kid: &str, key: &rcgen::KeyPair| {
        minted.set(minted.get() + 1);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.to_owned());
        let claims = serde_json::json!({
            "iss": ISS, "aud": "baton", "sub": "alice", "iat": now, "exp": now + 600,
            "jti": format!("t-{}", minted.get()), "groups": ["engineering"],
        });
        let signing = jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der());
        let token = jsonwebtoken::encode(&header, &claims, &signing).unwrap();
        baton()
            .args(["task", "start", "--root-agent", PLANNER])
            .args(["--purpose", "support.case-research"])
            .args(["--scope", "tool:crm.search:read", "--audience", "crm"])
            .args(["-o", "json", "--admin-socket"])
            .arg(&admin)
            .env("BATON_ID_TOKEN", token)
            .output()
            .unwrap()
    };
    let started = |out: std::process::Output, what: &str| {
        assert!(out.status.success(), "{what}: {}", stderr(&out));
    };
    let refused = |out: std::process::Output, kid: &str| {
        assert!(!out.status.success(), "{kid} started a task");
        let err = stderr(&out);
        assert!(
            err.contains(&format!("\"{kid}\" is not in the issuer's JWKS")),
            "{kid}: {err}"
        );
    };
    let hup = |broker: &mut Proc, line: &str| {
        let before = broker.log_text().matches(line).count();
        let pid = broker.child.id().to_string();
        assert!(
            Command::new("kill")
                .args(["-HUP", &pid])
                .status()
                .unwrap()
                .success()
        );
        wait_for(line, Duration::from_secs(30), || {
            (broker.log_text().matches(line).count() > before).then_some(())
        });
        assert!(broker.is_running(), "{}", broker.log_text());
    };

    // Before any reload: the published key starts a task, another does not.
    started(start("k-old", &old), "the published key");
    refused(start("k-new", &new), "k-new");

    // The IdP rotates and withdraws the old key.
    write_jwks(&jwks, &[("k-new", &new)]);
    hup(&mut broker, "SIGHUP: reloaded OIDC issuer keys");
    refused(start("k-old", &old), "k-old");
    started(start("k-new", &new), "the rotated-in key");

    // A JWKS that does not parse: the keys in force stay.
    std::fs::write(&jwks, "{\"keys\": [").unwrap();
    hup(&mut broker, "SIGHUP: cannot reload OIDC issuer keys");
    started(start("k-new", &new), "the key in force");
    refused(start("k-old", &old), "k-old");

    // A JWKS every user can write (anyone could add a key): refused too.
    write_jwks(&jwks, &[("k-old", &old)]);
    std::fs::set_permissions(&jwks, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    hup(&mut broker, "SIGHUP: cannot reload OIDC issuer keys");
    let log = broker.log_text();
    assert!(log.contains("writable by every user"), "{log}");
    refused(start("k-old", &old), "k-old");
    started(start("k-new", &new), "the key in force");
    broker.stop();
}
