//! The deployment files in deploy/: the Kubernetes manifests pass a schema
//! validator (`kubernetes-validate`, from PyPI, with the schemas it ships),
//! the configuration files inside them pass `baton config check`, and the
//! systemd units pass `systemd-analyze verify` and keep their hardening.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::harness::baton;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

fn manifests() -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(deploy_dir().join("kubernetes"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    v.sort();
    assert!(v.len() >= 5, "manifests missing: {v:?}");
    v
}

fn require_validator() {
    let ok = Command::new("kubernetes-validate")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "this test needs `kubernetes-validate`: install it with \
         `python3 -m pip install kubernetes-validate` (.ci/run does)"
    );
}

fn validate(files: &[PathBuf]) -> std::process::Output {
    Command::new("kubernetes-validate")
        .args(["--strict", "--kubernetes-version", "1.33"])
        .args(files)
        .output()
        .unwrap()
}

#[test]
fn kubernetes_manifests_pass_the_schema_validator() {
    require_validator();
    let files = manifests();
    let out = validate(&files);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // Every object was checked against a schema, except the Prometheus
    // Operator's custom resources (no schema ships for them).
    for line in text.lines().filter(|l| l.starts_with("WARN")) {
        assert!(line.contains("monitoring.coreos.com/v1"), "{line}");
    }
    for kind in [
        "daemonset",
        "statefulset",
        "deployment",
        "service",
        "configmap",
    ] {
        assert!(
            text.contains(&format!("passed for resource {kind}/")),
            "no {kind} validated: {text}"
        );
    }

    // Control: the validator refuses a manifest with a misspelt field.
    let dir = tempfile::tempdir().unwrap();
    let broker = std::fs::read_to_string(deploy_dir().join("kubernetes/broker.yaml")).unwrap();
    assert!(broker.contains("  serviceName: baton-broker\n"));
    let bad = dir.path().join("broker.yaml");
    std::fs::write(
        &bad,
        broker.replace(
            "  serviceName: baton-broker\n",
            "  serviceNme: baton-broker\n",
        ),
    )
    .unwrap();
    let out = validate(&[bad]);
    assert!(!out.status.success(), "a misspelt field passed");
}

/// The files of every ConfigMap, as (ConfigMap name, key, text).
fn config_map_files() -> Vec<(String, String, String)> {
    const SCRIPT: &str = r#"
import json, sys, yaml
out = []
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if doc and doc.get("kind") == "ConfigMap":
            for key, text in doc.get("data", {}).items():
                out.append([doc["metadata"]["name"], key, text])
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .args(manifests())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python3 with PyYAML (a dependency of kubernetes-validate) is needed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn kubernetes_config_maps_hold_files_baton_accepts() {
    require_validator();
    let dir = tempfile::tempdir().unwrap();
    let mut checked = Vec::new();
    for (map, key, text) in config_map_files() {
        if key == "gateway.toml" {
            // The gateway's file has its own check.
            let file = dir.path().join(&key);
            std::fs::write(&file, &text).unwrap();
            let out = crate::gateway::gateway_check(&file);
            assert!(
                out.status.success(),
                "ConfigMap {map} {key}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            checked.push("gateway".to_owned());
        } else if let Some(verb) = key.strip_suffix(".toml") {
            let file = dir.path().join(&key);
            std::fs::write(&file, &text).unwrap();
            // The broker's pod gives the PostgreSQL admin URL in the
            // environment (from a Secret), as the check does here.
            let out = baton()
                .args(["config", "check", "--for", verb])
                .arg(&file)
                .env(
                    "BATON_PG_ADMIN_URL",
                    "postgresql://baton-admin@postgres/crm",
                )
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ConfigMap {map} {key}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            checked.push(verb.to_owned());
        } else if key == "prometheus.yml" {
            assert!(text.contains("scrape_configs:") && text.contains("regex: ops"));
            checked.push(key);
        }
    }
    checked.sort();
    assert_eq!(
        checked,
        ["agent", "broker", "gateway", "prometheus.yml", "revocation"]
    );
}

#[test]
fn systemd_units_verify_and_keep_their_hardening() {
    let units = [
        "baton-broker.service",
        "baton-agent.service",
        "baton-revocation.service",
        "baton-gateway.service",
    ];
    for unit in units {
        let text = std::fs::read_to_string(deploy_dir().join(unit)).unwrap();
        for line in [
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "CapabilityBoundingSet=\n",
        ] {
            assert!(text.contains(line), "{unit} lacks {line:?}");
        }
        let verb = unit
            .trim_start_matches("baton-")
            .trim_end_matches(".service");
        // The sockets live under the unit's runtime directory.
        if let Some(dir) = match verb {
            "broker" => Some("baton-broker"),
            "agent" => Some("baton"),
            _ => None,
        } {
            assert!(
                text.contains(&format!("RuntimeDirectory={dir}\n")),
                "{unit} lacks RuntimeDirectory={dir}"
            );
            let toml = std::fs::read_to_string(deploy_dir().join(format!("{verb}.toml"))).unwrap();
            assert!(
                toml.contains(&format!("\"/run/{dir}/")),
                "{verb}.toml socket not in /run/{dir}"
            );
        }
        assert!(
            text.contains(&format!("--config /etc/baton/{verb}.toml")),
            "{unit} does not read its config file"
        );
    }
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!(
            "\n*** SKIPPED: systemd-analyze is not installed; the units in deploy/ \
             were NOT verified (install systemd to check them) ***\n"
        );
        return;
    }
    // Verified as written, with ExecStart pointing at the baton just built
    // (systemd-analyze checks that the executable exists).
    let dir = tempfile::tempdir().unwrap();
    let verify = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            text.replace("/usr/local/bin/baton", env!("CARGO_BIN_EXE_baton")),
        )
        .unwrap();
        let out = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&path)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        // Lines about the unit itself; the host's own units may warn too.
        let about: Vec<&str> = err.lines().filter(|l| l.contains(name)).collect();
        (out.status.success() && about.is_empty(), err)
    };
    for unit in units {
        let text = std::fs::read_to_string(deploy_dir().join(unit)).unwrap();
        let (ok, err) = verify(unit, &text);
        assert!(ok, "{unit}: {err}");
    }
    // Control: a misspelt hardening setting is reported.
    let text = std::fs::read_to_string(deploy_dir().join(units[0])).unwrap();
    let (ok, err) = verify(
        "tampered.service",
        &text.replace("ProtectSystem=strict", "ProtectSystem=strictly"),
    );
    assert!(!ok, "a bad ProtectSystem value passed: {err}");
}

/// Kind/name, container, liveness path, readiness path, readiness port,
/// whether `--ops-listen` is passed.
type ProbeRow = (
    String,
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    bool,
);

#[test]
fn every_baton_workload_has_probes_on_its_ops_port() {
    require_validator();
    // (kind/name, container, liveness path, readiness path, port, has
    // --ops-listen) of every container running the baton image.
    const SCRIPT: &str = r#"
import json, sys, yaml
out = []
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc or doc.get("kind") not in ("Deployment", "StatefulSet", "DaemonSet"):
            continue
        for c in doc["spec"]["template"]["spec"]["containers"]:
            if not c["image"].startswith("baton"):
                continue
            probe = lambda k: (c.get(k) or {}).get("httpGet") or {}
            args = c.get("args", [])
            # Passed, and to an address the daemon accepts: a non-loopback
            # one only with --ops-listen-non-loopback (it refuses to start
            # otherwise).
            ops = "--ops-listen" in args and args.index("--ops-listen") + 1 < len(args)
            if ops:
                host = args[args.index("--ops-listen") + 1].rsplit(":", 1)[0]
                ops = host in ("127.0.0.1", "[::1]") or "--ops-listen-non-loopback" in args
            out.append([doc["kind"] + "/" + doc["metadata"]["name"], c["name"],
                        probe("livenessProbe").get("path"), probe("readinessProbe").get("path"),
                        probe("readinessProbe").get("port"), ops])
print(json.dumps(out))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(SCRIPT)
        .args(manifests())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python3 with PyYAML (a dependency of kubernetes-validate) is needed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rows: Vec<ProbeRow> = serde_json::from_slice(&out.stdout).unwrap();
    let mut kinds: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "DaemonSet/baton-agent",
            "Deployment/baton-revocation",
            "StatefulSet/baton-broker",
            "StatefulSet/baton-gateway"
        ]
    );
    for (kind, container, live, ready, port, ops) in &rows {
        assert_eq!(live.as_deref(), Some("/livez"), "{kind} {container}");
        assert_eq!(ready.as_deref(), Some("/readyz"), "{kind} {container}");
        assert_eq!(port.as_deref(), Some("ops"), "{kind} {container}");
        assert!(
            ops,
            "{kind} {container} does not pass --ops-listen, or passes a non-loopback address without --ops-listen-non-loopback"
        );
    }
}
