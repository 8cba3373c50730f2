//! What the gateway keeps of a call in clear text, and calls a Cedar
//! policy holds for a human. By default inputs and outputs are only keyed
//! digests; a route (or MCP tool) names the fields to keep readable, and
//! what is inside them that must stay hidden (`redact`, plus anything that
//! looks like a credential). A `permit` annotated `@approval` holds the
//! calls it allows until a human approves them, with no route setting;
//! the same call under another permit goes straight on.

use std::time::Duration;

use crate::approval::{pending_id, put, writer};
use crate::delegation::World;
use crate::gateway::{Gw, client, token_of};
use crate::harness::wait_for;

/// A route that names no field to record and needs no approval: the
/// control of both tests.
const PLAIN_ROUTE: &str = r#"
[[routes]]
method = "PUT"
path = "/crm/plain/{case}"
upstream = "crm"
tool = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"
"#;

const RECORDED_ROUTE: &str = r#"
[[routes]]
method = "PUT"
path = "/crm/notes/{note}"
upstream = "crm"
tool = "crm.update"
resource = "dataset:crm"
permission = "tool:crm.update:write"
tier = "write"
record-headers = ["x-request-id", "x-upstream-token"]
record-input = ["/account", "/customer", "/card/number"]
record-output = ["/upstream", "/method"]
redact = ["/customer/ssn", "/card"]
"#;

/// The audit trace of `task` once it holds `what`.
fn trace_with(w: &World, task: &str, what: &str) -> String {
    wait_for(
        &format!("{what} in the trace"),
        Duration::from_secs(30),
        || {
            let t = w.ok(&["audit", "trace", task]);
            t.contains(what).then_some(t)
        },
    )
}

#[test]
fn named_fields_are_recorded_in_clear_text_and_secrets_in_them_are_not() {
    let g = Gw::start_with(|_| (format!("{RECORDED_ROUTE}{PLAIN_ROUTE}"), Vec::new()));
    let (task, cred) = writer(&g.w);
    let body = serde_json::json!({
        "account": "acme",
        "customer": {
            "name": "Ada Lovelace",
            "ssn": "123-45-6789",
            "password": "hunter2-secret",
            "session": "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
        },
        "card": {"number": "4111111111111111"},
        "note": "a private note that is not recorded",
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let status = rt.block_on(async {
        client(&cred)
            .put(format!("{}/crm/notes/9", g.url))
            .bearer_auth(token_of(&cred))
            .header("x-request-id", "req-77")
            .header("x-upstream-token", "Bearer leaked-upstream-token")
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    });
    assert_eq!(status, 200);

    let trace = trace_with(&g.w, &task, "output:/upstream=echo");
    assert!(trace.contains("header:x-request-id=req-77"), "{trace}");
    assert!(trace.contains("input:/account=acme"), "{trace}");
    assert!(trace.contains("Ada Lovelace"), "{trace}");
    assert!(trace.contains("output:/method=PUT"), "{trace}");
    assert!(
        trace.contains("header:x-upstream-token=[redacted]"),
        "{trace}"
    );
    assert!(trace.contains("input:/card/number=[redacted]"), "{trace}");
    for secret in [
        "123-45-6789",
        "hunter2",
        "eyJhbGci",
        "4111111111111111",
        "leaked-upstream-token",
        "a private note",
    ] {
        assert!(!trace.contains(secret), "{secret} is in the trace: {trace}");
    }
    // The recorded fields are in the signed tree: the log verifies, and the
    // JSON trace carries them per call.
    let json = g.w.json(&["audit", "trace", &task, "--json"]).to_string();
    assert!(json.contains("\"recorded\""), "{json}");
    g.w.ok(&["audit", "verify"]);

    // A body whose member names repeat would be recorded one way and read
    // another by the upstream: refused, never forwarded; the same call
    // without the repetition (above) went through.
    let before = g.upstream_count();
    let twice = put(
        &g,
        &cred,
        "/crm/notes/9",
        r#"{"account":"acme","account":"globex"}"#,
    );
    assert_eq!(twice.status, 400, "{twice:?}");
    assert_eq!(twice.body["code"], "invalid_request", "{twice:?}");
    assert_eq!(g.upstream_count(), before);

    // Control: a route that names no fields records none.
    let plain = put(&g, &cred, "/crm/plain/3", r#"{"account":"globex"}"#);
    assert_eq!(plain.status, 200, "{plain:?}");
    let trace = wait_for(
        "the plain call's completion in the trace",
        Duration::from_secs(30),
        || {
            let t = g.w.ok(&["audit", "trace", &task]);
            t.lines()
                .any(|l| {
                    l.contains("tool crm.update")
                        && l.contains("upstream 200")
                        && !l.contains("recorded {")
                })
                .then_some(t)
        },
    );
    assert!(!trace.contains("globex"), "{trace}");
}

/// A copy of the shipped policies plus a permit that makes updates of VIP
/// cases wait for a human (and, in the same file, one for every other
/// case that does not).
fn policies_with_approval(w: &World) -> std::path::PathBuf {
    let dir = w.c.path("gw-policies");
    std::fs::create_dir_all(&dir).unwrap();
    let shipped = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policies");
    for entry in std::fs::read_dir(&shipped).unwrap() {
        let p = entry.unwrap().path();
        if p.is_file()
            && p.extension()
                .is_some_and(|e| e == "cedar" || e == "cedarschema")
        {
            std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
        }
    }
    // The shipped `writes.case-update` permit allows every write of a
    // case-update task; this one narrows nothing, it only adds a human.
    std::fs::write(
        dir.join("approvals.cedar"),
        r#"
@id("writes.vip-needs-a-human")
@approval("changes to VIP accounts")
permit (principal, action == Action::"crm.update", resource == Resource::"dataset:vip")
when { context.purpose == "support.case-update" };
"#,
    )
    .unwrap();
    dir
}

const VIP_ROUTES: &str = r#"
[[routes]]
method = "PUT"
path = "/crm/vip/{case}"
upstream = "crm"
tool = "crm.update"
resource = "dataset:vip"
permission = "tool:crm.update:write"
tier = "write"
"#;

#[test]
fn a_cedar_permit_with_approval_holds_the_calls_it_allows() {
    let g = Gw::start_with(|w| {
        let dir = policies_with_approval(w);
        (
            format!(
                "policies = \"{}\"\n{VIP_ROUTES}{PLAIN_ROUTE}",
                dir.display()
            ),
            Vec::new(),
        )
    });
    let (task, cred) = writer(&g.w);
    let before = g.upstream_count();

    // Control: a case the annotated permit does not cover goes straight on.
    let plain = put(&g, &cred, "/crm/plain/1", r#"{"status":"closed"}"#);
    assert_eq!(plain.status, 200, "{plain:?}");
    assert_eq!(g.upstream_count(), before + 1);

    // A VIP case: allowed by Cedar, but only with a human's approval; the
    // route says nothing about approval.
    let id = pending_id(&put(&g, &cred, "/crm/vip/7", r#"{"status":"closed"}"#));
    assert_eq!(g.upstream_count(), before + 1, "a held call was forwarded");
    let out = g.w.ok(&["approve", &id, "--user", "alice@example.com"]);
    assert!(out.contains(&format!("Approved {id}")), "{out}");
    let ok = put(&g, &cred, "/crm/vip/7", r#"{"status":"closed"}"#);
    assert_eq!(ok.status, 200, "{ok:?}");
    assert_eq!(g.upstream_count(), before + 2);
    // Once: the same call again waits for another approval.
    assert_ne!(
        pending_id(&put(&g, &cred, "/crm/vip/7", r#"{"status":"closed"}"#)),
        id
    );
    assert_eq!(g.upstream_count(), before + 2);

    let trace = trace_with(&g.w, &task, &format!("approved in {id}"));
    assert!(trace.contains("writes.vip-needs-a-human"), "{trace}");
    assert!(trace.contains("approval requested: crm.update"), "{trace}");
}

/// Routes and policies are reloaded together or not at all: an operator
/// who moves an approval requirement from a Cedar permit into a route (or
/// back) with a change SIGHUP cannot apply, or with a policy set that does
/// not load, is left with the pair in force, never with the new routes
/// under the old policies (or the reverse), which would let the call
/// through unapproved. The control: a reload that loads whole applies both,
/// and the call is still held, now by its route.
#[test]
fn routes_and_policies_are_reloaded_together_so_an_approval_never_falls_between_them() {
    let g = Gw::start_with(|w| {
        let dir = policies_with_approval(w);
        (
            format!("policies = \"{}\"\n{VIP_ROUTES}", dir.display()),
            Vec::new(),
        )
    });
    let (_task, cred) = writer(&g.w);
    let before = g.upstream_count();
    let dir = g.w.c.path("gw-policies");
    let file = g.w.c.path("gateway.toml");
    let by_policy = std::fs::read_to_string(&file).unwrap();
    let approvals = std::fs::read_to_string(dir.join("approvals.cedar")).unwrap();
    let plain_permit = approvals.replace("@approval(\"changes to VIP accounts\")\n", "");
    assert_ne!(plain_permit, approvals);
    const VIP: &str =
        "resource = \"dataset:vip\"\npermission = \"tool:crm.update:write\"\ntier = \"write\"";
    assert!(by_policy.contains(VIP), "{by_policy}");
    let by_route = by_policy.replace(VIP, &format!("{VIP}\napproval = true"));
    let hup = || g.hup();
    let logged = |what: &str| g.gateway.log_text().matches(what).count();
    let held = |case: u32| {
        pending_id(&put(
            &g,
            &cred,
            &format!("/crm/vip/{case}"),
            r#"{"status":"closed"}"#,
        ))
    };
    held(1);

    // Into the route, with a change that takes a restart: the file is
    // refused, and the policies read with it are not applied either.
    let refused = logged("it takes a restart");
    std::fs::write(dir.join("approvals.cedar"), &plain_permit).unwrap();
    std::fs::write(
        &file,
        by_route.replace(
            &format!("audience = \"{}\"", crate::gateway::AUDIENCE),
            "audience = \"other\"",
        ),
    )
    .unwrap();
    hup();
    wait_for("the file refused", Duration::from_secs(60), || {
        (logged("it takes a restart") > refused).then_some(())
    });
    held(2);

    // The same move without the restart: both applied; still held.
    let reloaded = logged("reloaded the gateway's configuration");
    std::fs::write(&file, &by_route).unwrap();
    hup();
    wait_for("the pair reloaded", Duration::from_secs(60), || {
        (logged("reloaded the gateway's configuration") > reloaded).then_some(())
    });
    held(3);

    // Back into the policy, with a policy set that does not load: the
    // file is not applied either (its route no longer asks).
    let failed = logged("cannot reload the gateway's configuration and policies");
    std::fs::write(dir.join("approvals.cedar"), &approvals).unwrap();
    std::fs::write(dir.join("broken.cedar"), "permit (principal,").unwrap();
    std::fs::write(&file, &by_policy).unwrap();
    hup();
    wait_for("the policies refused", Duration::from_secs(60), || {
        (logged("cannot reload the gateway's configuration and policies") > failed).then_some(())
    });
    held(4);
    assert_eq!(g.upstream_count(), before, "a call went through unapproved");
}
