//! Operator friction, each on the real binary: a closed pipe, one output
//! flag, errors that say what is wrong (and say it once), relative socket
//! paths.

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::harness::{Cluster, Options, Proc, TD, baton, wait_for};

/// Runs `cmd` with its stdout a pipe whose reading end is already closed.
fn with_closed_stdout(mut cmd: Command) -> Output {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    cmd.stdout(writer).stderr(Stdio::piped()).output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn start_task(c: &Cluster) -> String {
    let v = c.cli_json(&[
        "task",
        "start",
        "--user",
        "alice@example.com",
        "--group",
        "engineering",
        "--root-agent",
        "spiffe://example.org/agents/planner",
        "--purpose",
        "support.case-research",
        "--scope",
        "tool:crm.search:read",
        "--audience",
        "crm",
    ]);
    v["task_id"].as_str().unwrap().to_owned()
}

#[test]
fn writing_to_a_closed_pipe_ends_quietly_with_exit_0() {
    // Control: with a reader, the script is printed.
    let out = baton().args(["completions", "bash"]).output().unwrap();
    assert!(out.status.success());
    assert!(out.stdout.len() > 1000);

    let mut cmd = baton();
    cmd.args(["completions", "bash"]);
    let out = with_closed_stdout(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));

    // The same through a real `| head -1`.
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "'{}' completions bash | head -1; exit ${{PIPESTATUS[0]}}",
            env!("CARGO_BIN_EXE_baton")
        ))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "_baton() {\n");
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));

    let c = Cluster::start(Options {
        start_agent: false,
        ..Options::default()
    });
    let mut cmd = baton();
    cmd.args(["entry", "list"])
        .env("BATON_ADMIN_SOCKET", c.admin_socket());
    let out = with_closed_stdout(cmd);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
}

#[test]
fn help_documents_every_exit_code() {
    let out = baton().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for code in ["  0 ", "  1 ", "  2 ", "  3 ", "  4 ", "  70 "] {
        assert!(help.contains(code), "exit code {code:?} missing: {help}");
    }
    assert!(help.contains("audit verify"), "{help}");
}

#[test]
fn dash_o_json_is_honoured_by_audit_trace_and_bundle_show() {
    let c = Cluster::start(Options {
        start_agent: false,
        ..Options::default()
    });
    let task = start_task(&c);
    let tree = c.cli_ok(&["audit", "trace", &task]);
    assert!(tree.contains("initiator alice@example.com"), "{tree}");
    let json = c.cli_json(&["audit", "trace", &task]);
    assert!(json.is_object() || json.is_array(), "{json}");
    // `--json` stays as an alias.
    let alias: serde_json::Value =
        serde_json::from_str(&c.cli_ok(&["audit", "trace", &task, "--json"])).unwrap();
    assert_eq!(alias, json);

    let pem = c.cli_ok(&["bundle", "show"]);
    assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"), "{pem}");
    let json = c.cli_json(&["bundle", "show"]);
    assert_eq!(json["pem"].as_str().unwrap(), pem);
    assert!(json["spiffe"]["keys"].is_array(), "{json}");
}

#[test]
fn admin_socket_errors_say_what_is_wrong_and_chains_are_told_once() {
    let c = Cluster::start(Options {
        start_agent: false,
        ..Options::default()
    });
    // No socket there: unreachable (3), and says so.
    let out = baton()
        .args(["entry", "list", "--admin-socket"])
        .arg(c.path("nothing.sock"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no admin socket at"),
        "{}",
        stderr(&out)
    );

    // A socket that is not ours: permission denied (2), with its owner.
    if own_uid_is_root() {
        std::fs::set_permissions(c.dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
        let out = Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(env!("CARGO_BIN_EXE_baton"))
            .args(["entry", "list", "--admin-socket"])
            .arg(c.admin_socket())
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(
            err.contains("permission denied on the admin socket")
                && err.contains("owned by uid 0")
                && err.contains("you are uid 65534"),
            "{err}"
        );
        assert!(!err.contains("Is the broker running"), "{err}");
    }
    // Control: the broker's own user is served.
    c.cli_ok(&["entry", "list"]);

    // A chain of causes is printed once, not once per level.
    let dir = tempfile::tempdir().unwrap();
    let out = baton()
        .args(["agent", "--trust-domain", TD, "--join-token", "x"])
        .args(["--broker-url", "https://127.0.0.1:1"])
        .arg("--data-dir")
        .arg(dir.path().join("agent"))
        .arg("--socket")
        .arg(dir.path().join("agent.sock"))
        .arg("--trust-bundle")
        .arg(c.path("broker/bundle.pem"))
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("error sending request").count(), 1, "{err}");
    assert!(err.contains("Connection refused"), "{err}");
}

fn own_uid_is_root() -> bool {
    crate::harness::own_uid() == 0
}

/// A credential directory whose bundle is another CA's (as after a
/// rotation that left it behind).
fn stale_credential(dir: &std::path::Path) {
    let ca_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut leaf = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    leaf.subject_alt_names = vec![rcgen::SanType::URI(
        "spiffe://example.org/agents/planner".try_into().unwrap(),
    )];
    let issuer = rcgen::Issuer::from_params(&params, &ca_key);
    let leaf = leaf.signed_by(&key, &issuer).unwrap();
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("svid.pem"), leaf.pem()).unwrap();
    std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(dir.join("bundle.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("token"), "not-a-token").unwrap();
    std::fs::write(
        dir.join("task.json"),
        r#"{"spiffe_id":"spiffe://example.org/agents/planner","task_id":"task-x"}"#,
    )
    .unwrap();
}

#[test]
fn a_stale_bundle_is_a_tls_trust_error_and_a_missing_credential_dir_is_usage() {
    let c = Cluster::start(Options {
        start_agent: false,
        ..Options::default()
    });
    let url = format!("https://{}", c.broker_addr);
    let dir = tempfile::tempdir().unwrap();
    let cred = dir.path().join("cred");
    stale_credential(&cred);
    let lease = |cred: &std::path::Path| {
        baton()
            .args([
                "secret",
                "lease",
                "--engine",
                "apikey",
                "--broker-url",
                &url,
            ])
            .arg("--credential")
            .arg(cred)
            .output()
            .unwrap()
    };
    let out = lease(&cred);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("TLS trust error"), "{err}");
    assert!(err.contains("bundle.pem"), "{err}");
    assert!(!err.contains("cannot reach the broker"), "{err}");

    // Control: a broker that is not there is unreachable (3).
    let out = baton()
        .args(["secret", "lease", "--engine", "apikey"])
        .args(["--broker-url", "https://127.0.0.1:1"])
        .arg("--credential")
        .arg(&cred)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    assert!(stderr(&out).contains("cannot reach the broker"));

    // No such credential directory: a usage error (2).
    let out = lease(&dir.path().join("missing"));
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no such directory"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn example_workloads_take_a_relative_socket_path() {
    let c = Cluster::start(Options::default());
    c.register("/echo", &[]);
    let ready = c.path("echo.addr");
    // From the cluster's directory, the socket as a relative path.
    let mut cmd = baton();
    cmd.current_dir(c.dir.path())
        .args(["example", "echo-server", "--socket", "agent.sock"])
        .arg("--ready-file")
        .arg(&ready);
    let mut echo = Proc::spawn("echo-server", cmd, c.path("echo.log"));
    let addr = wait_for("the echo server", Duration::from_secs(60), || {
        assert!(echo.is_running(), "{}", echo.log_text());
        std::fs::read_to_string(&ready).ok()
    });
    assert!(!echo.log_text().contains("must include a path"));
    let stats = c.path("client.json");
    let mut cmd = baton();
    cmd.current_dir(c.dir.path())
        .args(["example", "echo-client", "--socket", "unix:agent.sock"])
        .args([
            "--server",
            &addr,
            "--server-id",
            "spiffe://example.org/echo",
        ])
        .arg("--stats-file")
        .arg(&stats);
    let mut client = Proc::spawn("echo-client", cmd, c.path("client.log"));
    wait_for("echo calls to succeed", Duration::from_secs(60), || {
        assert!(client.is_running(), "{}", client.log_text());
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&stats).ok()?).ok()?;
        (v["ok"].as_u64()? > 0).then_some(())
    });
    client.stop();
    echo.stop();

    // The example tool server, its socket and spool relative as well.
    c.register("/tools/crm", &[]);
    let ready = c.path("tool.addr");
    let mut cmd = baton();
    cmd.current_dir(c.dir.path())
        .args(["example", "tool-server", "--socket", "agent.sock"])
        .args([
            "--audience",
            "crm",
            "--spiffe-id",
            "spiffe://example.org/tools/crm",
        ])
        .args(["--spool", "tool-spool"])
        .arg("--broker-url")
        .arg(format!("https://{}", c.broker_addr))
        .arg("--ready-file")
        .arg(&ready);
    let mut tool = Proc::spawn("tool-server", cmd, c.path("tool.log"));
    wait_for("the tool server", Duration::from_secs(60), || {
        assert!(tool.is_running(), "{}", tool.log_text());
        std::fs::read_to_string(&ready).ok()
    });
    assert!(!tool.log_text().contains("must include a path"));
    assert!(
        c.path("tool-spool").is_dir(),
        "the relative spool is not under the working directory"
    );
    tool.stop();
}

/// Starts `baton dev` on `data` and waits until it serves; returns it
/// with its log.
pub(crate) fn start_dev(data: &std::path::Path, log: std::path::PathBuf, extra: &[&str]) -> Proc {
    let mut cmd = baton();
    cmd.args(["dev", "--data-dir"]).arg(data).args(extra);
    let mut dev = Proc::spawn("dev", cmd, log);
    wait_for("baton dev", Duration::from_secs(60), || {
        assert!(dev.is_running(), "{}", dev.log_text());
        data.join("agent.sock").exists().then_some(())
    });
    dev
}

#[test]
fn dev_x509_ttl_is_refused_when_zero_and_reported_when_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    // 0s (or less than a second) is refused before anything starts.
    for zero in ["0s", "500ms"] {
        let out = baton()
            .args(["dev", "--x509-ttl", zero, "--data-dir"])
            .arg(&data)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("--x509-ttl"), "{err}");
        assert!(err.contains("at least 1s"), "{err}");
        assert!(!data.join("admin.sock").exists());
    }

    // A fresh data dir: the lifetime is applied, nothing to warn about.
    let mut dev = start_dev(&data, dir.path().join("dev1.log"), &["--x509-ttl", "5m"]);
    assert!(!dev.log_text().contains("ignored"), "{}", dev.log_text());
    let entries: serde_json::Value = serde_json::from_slice(
        &baton()
            .args(["entry", "list", "-o", "json"])
            .env("BATON_ADMIN_SOCKET", data.join("admin.sock"))
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let dev_entry = entries["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["spiffe_id"] == "spiffe://example.org/dev/workload")
        .unwrap_or_else(|| panic!("{entries}"))
        .clone();
    assert_eq!(dev_entry["x509_ttl_secs"], 300, "{dev_entry}");
    dev.stop();

    // The same data dir with another lifetime: said to be ignored, with what to do.
    let mut dev = start_dev(&data, dir.path().join("dev2.log"), &["--x509-ttl", "10m"]);
    let log = dev.log_text();
    assert!(log.contains("--x509-ttl 10m is ignored"), "{log}");
    assert!(
        log.contains("5m") && log.contains("baton entry delete"),
        "{log}"
    );
    dev.stop();

    // Control: without --x509-ttl on the existing dir, no warning.
    let mut dev = start_dev(&data, dir.path().join("dev3.log"), &[]);
    assert!(!dev.log_text().contains("ignored"), "{}", dev.log_text());
    dev.stop();
}
