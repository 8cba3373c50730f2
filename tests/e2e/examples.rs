//! The scripts in `examples/`, run as a newcomer would: against a fresh
//! `baton dev`, with the binaries this build made. A script that no longer
//! works fails here, not in front of a reader.

use std::path::Path;
use std::process::Command;

use crate::operator::start_dev;

/// Runs `examples/<script>` against the `baton dev` in `data`.
fn run_example(script: &str, data: &Path, work: &Path) -> (bool, String) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash")
        .arg(root.join("examples").join(script))
        .current_dir(work)
        .env("BATON", env!("CARGO_BIN_EXE_baton"))
        .env("EXAMPLE_CRM", env!("CARGO_BIN_EXE_example-crm"))
        .env("BATON_DEV_DIR", data)
        .env("TMPDIR", work)
        .output()
        .unwrap();
    let text = format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn the_gateway_example_runs_against_baton_dev() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let mut dev = start_dev(&data, dir.path().join("dev.log"), &[]);
    let (ok, out) = run_example("gateway-flow.sh", &data, dir.path());
    assert!(ok, "{out}\n--- baton dev ---\n{}", dev.log_text());
    // The CRM answered over MCP and HTTP, and saw who asked.
    assert!(
        out.contains("account acme: 3 open cases (asked by task task-"),
        "{out}"
    );
    assert!(out.contains("\"open_cases\": 3"), "{out}");
    assert!(out.contains("agents/researcher"), "{out}");
    // The update was refused over both, then everything once the task ended.
    assert_eq!(
        out.lines().filter(|l| l.starts_with("refused: ")).count(),
        3,
        "three refusals expected: {out}"
    );
    assert!(out.contains("crm.update refused or failed"), "{out}");
    assert!(out.contains("Insufficient scope"), "{out}");
    assert!(out.contains("refused (out_of_scope)"), "{out}");
    assert!(out.contains("refused (revoked)"), "{out}");
    // The trace shows the gateway's calls with what it kept of them.
    assert!(out.contains("recorded {input:/account=acme}"), "{out}");
    assert!(out.contains("recorded {output:/open_cases=3}"), "{out}");
    assert!(out.contains("audit log verified"), "{out}");
    // The MCP SDK's per-session chatter stays out of the way.
    assert!(!out.contains("Service initialized"), "{out}");
    dev.stop();
}

#[test]
fn the_delegation_example_runs_against_baton_dev() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let mut dev = start_dev(&data, dir.path().join("dev.log"), &[]);
    let (ok, out) = run_example("delegation-flow.sh", &data, dir.path());
    assert!(ok, "{out}\n--- baton dev ---\n{}", dev.log_text());
    assert!(out.contains("crm.search"), "{out}");
    assert!(out.contains("crm.update"), "{out}");
    dev.stop();
}
