//! `--config FILE`: a broker and an agent driven by TOML files run the same
//! flow as with flags; a typo is refused with its file and line; flags and
//! `BATON_*` variables override the file; `baton config check` accepts the
//! examples shipped in deploy/ and refuses a broken copy.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::delegation::{PLANNER, RESEARCHER, claims, grant_of};
use crate::harness::{Cluster, TD, baton, wait_for};

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy")
}

/// A TOML basic string holding a path.
fn toml_path(p: &Path) -> String {
    format!("{:?}", p.to_str().unwrap())
}

fn broker_toml(c: &Cluster, ready: &Path) -> String {
    format!(
        "# a broker for the test\n\
         trust-domain = \"{TD}\"\n\
         data-dir = {}\n\
         listen = \"127.0.0.1:0\"\n\
         admin-socket = {}\n\
         ready-file = {}\n\
         agent-svid-ttl = \"1h\"\n\
         dev-issuer = true\n\
         rate-limit = [\"task-start=600/1m\", \"attest=600/1m\"]\n",
        toml_path(&c.path("broker")),
        toml_path(&c.admin_socket()),
        toml_path(ready),
    )
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn broker_and_agent_from_config_files_start_a_task_and_hop() {
    let mut c = Cluster::empty();
    let ready = c.path("broker.addr");
    let broker_file = c.path("broker.toml");
    std::fs::write(&broker_file, broker_toml(&c, &ready)).unwrap();
    let mut cmd = baton();
    cmd.arg("broker").arg("--config").arg(&broker_file);
    c.run_broker(cmd, &ready);

    let token = c.join_token(None);
    std::fs::write(c.path("join-token"), &token).unwrap();
    std::fs::set_permissions(
        c.path("join-token"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let agent_ready = c.path("agent.ready");
    let agent_file = c.path("agent.toml");
    std::fs::write(
        &agent_file,
        format!(
            "trust-domain = \"{TD}\"\n\
             broker-url = \"https://{}\"\n\
             trust-bundle = {}\n\
             data-dir = {}\n\
             socket = {}\n\
             join-token-file = {}\n\
             sync-interval = \"200ms\"\n\
             ready-file = {}\n",
            c.broker_addr,
            toml_path(&c.path("broker/bundle.pem")),
            toml_path(&c.path("agent")),
            toml_path(&c.agent_socket()),
            toml_path(&c.path("join-token")),
            toml_path(&agent_ready),
        ),
    )
    .unwrap();
    let mut cmd = baton();
    cmd.arg("agent").arg("--config").arg(&agent_file);
    c.run_agent(cmd, &agent_ready);
    assert!(c.node_id.starts_with(&format!("spiffe://{TD}/")));

    // The flow of the delegation example: a task for the planner, its
    // grant redeemed, a hop to the researcher, redeemed in turn.
    c.register("/agents/planner", &[]);
    c.register("/agents/researcher", &[]);
    let started = c.cli_json(&[
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
        "--scope",
        "tool:crm.search:read",
        "--scope",
        "dataset:crm:read",
        "--audience",
        "crm",
    ]);
    let task = started["task_id"].as_str().unwrap().to_owned();
    let grant = started["grant"].as_str().unwrap().to_owned();
    let run = |args: &[&str]| {
        baton()
            .args(args)
            .env("BATON_ADMIN_SOCKET", c.admin_socket())
            .env("SPIFFE_ENDPOINT_SOCKET", c.endpoint())
            .env("BATON_BROKER_URL", format!("https://{}", c.broker_addr))
            .output()
            .unwrap()
    };
    let redeem = |grant: &str, id: &str, dir: &str| {
        let out = c.path(dir);
        let r = run(&[
            "grant",
            "redeem",
            "--grant",
            grant,
            "--spiffe-id",
            id,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert!(r.status.success(), "redeem: {}", stderr(&r));
        out
    };
    // Once the agent has synced the entries, both identities are served.
    for id in [PLANNER, RESEARCHER] {
        wait_for("the workload SVID", Duration::from_secs(30), || {
            run(&["svid", "fetch", "--spiffe-id", id])
                .status
                .success()
                .then_some(())
        });
    }
    let planner = redeem(&grant, PLANNER, "planner");
    let hop = run(&[
        "delegate",
        "--credential",
        planner.to_str().unwrap(),
        "--target",
        RESEARCHER,
        "--scope",
        "tool:crm.search:read",
        "--audience",
        "crm",
        "--justification",
        "look up the customer's open cases",
        "-o",
        "json",
    ]);
    let researcher = redeem(&grant_of(&hop), RESEARCHER, "researcher");
    let rc = claims(&researcher);
    assert_eq!(rc["task"]["id"], task.as_str());
    assert_eq!(rc["depth"], 1);
    assert_eq!(rc["act"]["sub"], RESEARCHER);
    assert_eq!(rc["act"]["act"]["sub"], PLANNER);
}

#[test]
fn a_typo_in_a_config_file_is_refused_with_its_file_and_line() {
    let c = Cluster::empty();
    let ready = c.path("broker.addr");
    let good = broker_toml(&c, &ready);
    // Line 3 of the file is `data-dir = ...`; misspell it.
    assert!(good.lines().nth(2).unwrap().starts_with("data-dir ="));
    let typo = good.replacen("data-dir =", "data_dir =", 1);
    let file = c.path("broker.toml");
    std::fs::write(&file, &typo).unwrap();
    let mut child = baton()
        .arg("broker")
        .arg("--config")
        .arg(&file)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_for("the broker to refuse", Duration::from_secs(30), || {
        child.try_wait().unwrap()
    });
    let mut err = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(2), "{err}");
    let at = format!("{}:3:1: unknown key `data_dir`", file.display());
    assert!(err.contains(&at), "no {at:?} in: {err}");
    assert!(err.contains("did you mean `data-dir`?"), "{err}");
    assert!(!ready.exists(), "the broker started anyway");

    // Control: the same file without the typo passes the check.
    std::fs::write(&file, &good).unwrap();
    let out = baton()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn flags_then_environment_override_the_file() {
    let mut c = Cluster::empty();
    let file_ready = c.path("file.addr");
    let env_ready = c.path("env.addr");
    let flag_ready = c.path("flag.addr");
    // The file names another trust domain and ready file; the environment
    // overrides both; the flag overrides the environment's ready file.
    let text = broker_toml(&c, &file_ready).replace(
        &format!("trust-domain = \"{TD}\""),
        "trust-domain = \"file.example\"",
    );
    let file = c.path("broker.toml");
    std::fs::write(&file, text).unwrap();
    let mut cmd = baton();
    cmd.arg("broker")
        .arg("--config")
        .arg(&file)
        .arg("--ready-file")
        .arg(&flag_ready)
        .env("BATON_TRUST_DOMAIN", TD)
        .env("BATON_READY_FILE", &env_ready);
    c.run_broker(cmd, &flag_ready);
    assert!(!file_ready.exists() && !env_ready.exists());
    // The broker's bundle is for the environment's trust domain.
    let token = c.cli_json(&[
        "token",
        "generate",
        "--node-id",
        &format!("spiffe://{TD}/baton/node/n1"),
    ]);
    assert!(token["token"].is_string(), "{token}");
    let bundle = c.cli_ok(&["bundle", "show", "--format", "spiffe"]);
    assert!(!bundle.contains("file.example"), "{bundle}");
    // A node ID outside the broker's trust domain is refused: the file's
    // trust domain was not used.
    let out = c.cli(&[
        "token",
        "generate",
        "--node-id",
        "spiffe://file.example/baton/node/n1",
    ]);
    assert!(!out.status.success(), "file.example accepted");
}

#[test]
fn config_check_accepts_the_shipped_examples_and_refuses_a_broken_copy() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["broker.toml", "agent.toml", "revocation.toml"] {
        let shipped = deploy_dir().join(name);
        let out = baton()
            .args(["config", "check"])
            .arg(&shipped)
            .output()
            .unwrap();
        assert!(out.status.success(), "{name}: {}", stderr(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("ok for `baton"));

        // A copy with one misspelt key, appended as the last line.
        let text = std::fs::read_to_string(&shipped).unwrap();
        let line = text.lines().count() + 1;
        let broken = dir.path().join(name);
        std::fs::write(&broken, format!("{text}sync-intervall = \"1s\"\n")).unwrap();
        let out = baton()
            .args(["config", "check"])
            .arg(&broken)
            .output()
            .unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {err}");
        let at = format!(
            "{}:{line}:1: unknown key `sync-intervall`",
            broken.display()
        );
        assert!(err.contains(&at), "no {at:?} in: {err}");
    }
    // A file checked for the wrong verb: the broker's keys are not the agent's.
    let out = baton()
        .args(["config", "check", "--for", "agent"])
        .arg(deploy_dir().join("broker.toml"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("unknown key `listen` for `baton agent`"));
    // A value of the wrong type, with its line and key.
    let bad = dir.path().join("revocation-bad.toml");
    std::fs::write(&bad, "redis = \"redis://127.0.0.1:6379\"\nheartbeat = 5\n").unwrap();
    let out = baton()
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains(":2:13: `heartbeat`: invalid value '5'"),
        "{err}"
    );
}

#[test]
fn an_inline_secret_is_refused_and_its_file_twin_accepted() {
    let c = Cluster::empty();
    let agent = |extra: &str| {
        format!(
            "trust-domain = \"{TD}\"\n\
             broker-url = \"https://127.0.0.1:1\"\n\
             data-dir = {}\n\
             socket = {}\n\
             {extra}\n",
            toml_path(&c.path("agent")),
            toml_path(&c.agent_socket()),
        )
    };
    // Attack: a join token written in the (world-readable) file. The agent
    // refuses to start, names the key and line, and does not echo it.
    let file = c.path("agent.toml");
    std::fs::write(&file, agent("join-token = \"jt-s3cret-value\"")).unwrap();
    let out = baton()
        .arg("agent")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    let at = format!("{}:5:14: `join-token`", file.display());
    assert!(err.contains(&at), "no {at:?} in: {err}");
    assert!(err.contains("`join-token-file`"), "{err}");
    assert!(!err.contains("s3cret"), "the secret was echoed: {err}");
    assert!(!c.agent_socket().exists());

    // A Redis password inside a URL, refused the same way by the check.
    let rev = c.path("revocation.toml");
    std::fs::write(&rev, "redis = \"redis://baton:pw-s3cret@127.0.0.1:6379\"\n").unwrap();
    let out = baton()
        .args(["config", "check"])
        .arg(&rev)
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains(":1:9: `redis`: holds a password"), "{err}");
    assert!(err.contains("`redis-password-file`"), "{err}");
    assert!(!err.contains("s3cret"), "{err}");

    // Controls: the secrets named by file pass the check.
    std::fs::write(c.path("join-token"), "jt-s3cret-value").unwrap();
    std::fs::write(
        &file,
        agent(&format!(
            "join-token-file = {}",
            toml_path(&c.path("join-token"))
        )),
    )
    .unwrap();
    let out = baton()
        .args(["config", "check"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(
        &rev,
        "redis = \"redis://baton@127.0.0.1:6379\"\nredis-password-file = \"/run/pw\"\n",
    )
    .unwrap();
    let out = baton()
        .args(["config", "check"])
        .arg(&rev)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn every_commented_setting_of_the_shipped_examples_is_a_valid_key() {
    // The examples' commented-out settings (`# key = value`) are offered to
    // be uncommented: each must be a key the verb accepts, with a value it
    // accepts. `ops-listen` is skipped only on a build without that flag.
    let dir = tempfile::tempdir().unwrap();
    for verb in ["broker", "agent", "revocation"] {
        let help = baton().args([verb, "--help"]).output().unwrap();
        let has_ops = String::from_utf8_lossy(&help.stdout).contains("--ops-listen");
        let text = std::fs::read_to_string(deploy_dir().join(format!("{verb}.toml"))).unwrap();
        let mut uncommented = 0;
        let open: String = text
            .lines()
            .filter_map(|l| {
                let Some(rest) = l.strip_prefix("# ") else {
                    return Some(l.to_owned());
                };
                let key = rest.split(" = ").next().unwrap_or_default();
                let is_setting = rest.contains(" = ")
                    && !key.is_empty()
                    && key
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                if !is_setting {
                    return Some(l.to_owned());
                }
                if key == "ops-listen" && !has_ops {
                    return None;
                }
                uncommented += 1;
                Some(rest.to_owned())
            })
            .map(|l| l + "\n")
            .collect();
        assert!(uncommented >= 3, "{verb}: {uncommented} commented settings");
        let file = dir.path().join(format!("{verb}.toml"));
        std::fs::write(&file, open).unwrap();
        let out = baton()
            .args(["config", "check"])
            .arg(&file)
            .env("BATON_PG_ADMIN_URL", "postgresql://baton-admin@db/crm")
            .output()
            .unwrap();
        assert!(out.status.success(), "{verb}: {}", stderr(&out));
    }
}
