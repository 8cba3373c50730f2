//! Logs as an operator collects them: with `--log-format json` every line
//! of every process (broker, node daemon, tool server, the CLI) is one JSON
//! object with an RFC 3339 timestamp, a level and a target; text logs
//! written to a file carry no colour codes; and no secret handed out or
//! received during a full run (join token, ID token, grants, delegation
//! tokens, JWT-SVID, private keys, a leased API key) appears in any log,
//! even at the most verbose level.

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Mutex;
use std::time::Duration;

use crate::delegation::{PLANNER, RESEARCHER, TOOL, World, grant_of};
use crate::harness::{Cluster, Options, Proc, baton, wait_for};

/// The most verbose filter: every crate, trace level.
const VERBOSE: &str = "trace";

/// A world whose daemons log JSON at the most verbose level, and a record
/// of every CLI command's standard error.
struct Run {
    w: World,
    join_token: String,
    cli_logs: Mutex<Vec<(String, String)>>,
}

impl Run {
    fn start() -> Self {
        let log_args = ["--log-format", "json", "--log", VERBOSE];
        let mut broker_args: Vec<String> = log_args.iter().map(|s| s.to_string()).collect();
        broker_args.extend(["--tool-server".to_owned(), format!("crm={TOOL}")]);
        let mut c = Cluster::start(Options {
            start_agent: false,
            broker_args,
            ..Options::default()
        });
        let join_token = c.join_token(None);
        let ready = c.path("agent.ready");
        let mut cmd = c.agent_command(&c.path("agent"), &c.agent_socket(), Some(&join_token));
        cmd.arg("--ready-file").arg(&ready).args(log_args);
        let mut agent = Proc::spawn("agent", cmd, c.path("agent.log"));
        c.node_id = wait_for("agent ready file", Duration::from_secs(30), || {
            assert!(agent.is_running(), "agent exited: {}", agent.log_text());
            std::fs::read_to_string(&ready).ok()
        });
        c.agent = Some(agent);
        c.register("/tools/crm", &[]);
        c.register("/agents/planner", &[]);
        c.register("/agents/researcher", &[]);
        let ready = c.path("tool.addr");
        let mut cmd = baton();
        cmd.args([
            "example",
            "tool-server",
            "--audience",
            "crm",
            "--spiffe-id",
            TOOL,
        ])
        .arg("--socket")
        .arg(c.agent_socket())
        .arg("--broker-url")
        .arg(format!("https://{}", c.broker_addr))
        .arg("--spool")
        .arg(c.path("tool-spool"))
        .arg("--ready-file")
        .arg(&ready)
        .args(log_args);
        let mut tool = Proc::spawn("tool-server", cmd, c.path("tool.log"));
        let addr = wait_for("tool server ready", Duration::from_secs(60), || {
            assert!(tool.is_running(), "tool server exited: {}", tool.log_text());
            std::fs::read_to_string(&ready).ok()
        });
        Run {
            w: World {
                c,
                _tool: tool,
                tool_url: format!("https://{addr}"),
            },
            join_token,
            cli_logs: Mutex::new(Vec::new()),
        }
    }

    /// `baton <args>` with JSON logs at the most verbose level; its
    /// standard error is kept for the checks.
    fn run(&self, args: &[&str]) -> Output {
        let c = &self.w.c;
        let out = baton()
            .args(args)
            .env("BATON_ADMIN_SOCKET", c.admin_socket())
            .env("SPIFFE_ENDPOINT_SOCKET", c.endpoint())
            .env("BATON_BROKER_URL", self.w.broker_url())
            .env("BATON_LOG_FORMAT", "json")
            .env("BATON_LOG", VERBOSE)
            .output()
            .unwrap();
        self.cli_logs.lock().unwrap().push((
            format!("baton {}", args.join(" ")),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ));
        out
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "baton {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    fn path(&self, p: &str) -> PathBuf {
        self.w.c.path(p)
    }

    /// A task for the planner, started with an ID token the test holds.
    fn start_task(&self, id_token: &str, scope: &[&str], tag: &str) -> (String, String) {
        let file = self.path(&format!("{tag}.id-token"));
        std::fs::write(&file, id_token).unwrap();
        std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let mut args = vec![
            "task",
            "start",
            "--id-token-file",
            file.to_str().unwrap(),
            "--root-agent",
            PLANNER,
            "--purpose",
            "support.case-research",
            "--risk-ceiling",
            "write",
            "--ttl",
            "10m",
            "--max-depth",
            "2",
            "--audience",
            "crm",
            "-o",
            "json",
        ];
        for s in scope {
            args.extend(["--scope", s]);
        }
        let v = self.json(&args);
        (
            v["task_id"].as_str().unwrap().to_owned(),
            v["grant"].as_str().unwrap().to_owned(),
        )
    }

    fn redeem(&self, grant: &str, as_id: &str, dir: &str) -> PathBuf {
        let out = self.path(dir);
        self.ok(&[
            "grant",
            "redeem",
            "--grant",
            grant,
            "--spiffe-id",
            as_id,
            "--out",
            out.to_str().unwrap(),
        ]);
        out
    }
}

/// A dev ID token from the broker's admin socket (what `--user` would fetch
/// behind the scenes), so the test holds it and can look for it.
fn dev_id_token(c: &Cluster, user: &str) -> String {
    baton_tls::install_crypto_provider();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = reqwest::Client::builder()
            .unix_socket(c.admin_socket())
            .build()
            .unwrap()
            .post("http://admin/v1/admin/dev/id-token")
            .json(&serde_json::json!({ "user": user, "groups": ["engineering"] }))
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success());
        let v: serde_json::Value = resp.json().await.unwrap();
        v["id_token"].as_str().unwrap().to_owned()
    })
}

/// The pieces of a secret that must not appear: the whole value, and for
/// a JWT its claims and signature (the header is shared by every token of
/// a key, so not secret), for a PEM key each line of its body.
fn needles(name: &str, secret: &str) -> Vec<(String, String)> {
    let secret = secret.trim();
    assert!(
        secret.len() >= 16,
        "{name} is too short to look for: {secret:?}"
    );
    let mut out = vec![(name.to_owned(), secret.to_owned())];
    let parts: Vec<&str> = secret.split('.').collect();
    if parts.len() == 3 {
        out.push((format!("{name} (claims)"), parts[1].to_owned()));
        out.push((format!("{name} (signature)"), parts[2].to_owned()));
    }
    if secret.starts_with("-----BEGIN") {
        out.extend(
            secret
                .lines()
                .filter(|l| !l.starts_with("-----") && l.len() >= 16)
                .map(|l| (format!("{name} (PEM line)"), l.to_owned())),
        );
    }
    if let Some(hex) = secret.strip_prefix("bg_") {
        out.push((format!("{name} (without prefix)"), hex.to_owned()));
    }
    out
}

/// Every line is one JSON object with an RFC 3339 timestamp, a level and
/// a target; returns the parsed lines.
fn json_lines(source: &str, text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{source}: not a JSON line ({e}): {line}"));
            let ts = v["timestamp"]
                .as_str()
                .unwrap_or_else(|| panic!("{source}: no timestamp: {line}"));
            humantime::parse_rfc3339(ts)
                .unwrap_or_else(|e| panic!("{source}: timestamp {ts} is not RFC 3339: {e}"));
            let level = v["level"].as_str().unwrap_or_default();
            assert!(
                ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level),
                "{source}: level {level:?}: {line}"
            );
            assert!(
                v["target"].as_str().is_some_and(|t| !t.is_empty()),
                "{source}: no target: {line}"
            );
            v
        })
        .collect()
}

fn token_of(cred: &Path) -> String {
    std::fs::read_to_string(cred.join("token")).unwrap()
}

/// The private key in a credential directory (whatever its file is named).
fn keys_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| std::fs::read_to_string(e.unwrap().path()).ok())
        .filter(|s| s.contains("PRIVATE KEY-----"))
        .collect()
}

#[test]
fn json_logs_of_a_full_run_parse_line_by_line_and_hold_no_secret() {
    let r = Run::start();
    let mut secrets: Vec<(String, String)> = Vec::new();
    secrets.extend(needles("join token", &r.join_token));

    // A task started with an ID token, redeemed, a hop, its redeem, tool
    // calls (one allowed, one denied), a JWT-SVID, a leased API key, the end.
    let id_token = dev_id_token(&r.w.c, "alice@example.com");
    secrets.extend(needles("ID token", &id_token));
    let (task, grant) = r.start_task(
        &id_token,
        &[
            "tool:crm.search:read",
            "tool:crm.update:write",
            "dataset:crm:read",
        ],
        "main",
    );
    secrets.extend(needles("root grant", &grant));
    let planner = r.redeem(&grant, PLANNER, "planner");
    secrets.extend(needles("planner token", &token_of(&planner)));
    for k in keys_in(&planner) {
        secrets.extend(needles("planner key", &k));
    }
    let hop = r.run(&[
        "delegate",
        "--credential",
        planner.to_str().unwrap(),
        "--target",
        RESEARCHER,
        "--audience",
        "crm",
        "--scope",
        "tool:crm.search:read",
        "--scope",
        "dataset:crm:read",
        "--justification",
        "look up the customer's open cases",
        "-o",
        "json",
    ]);
    let hop_grant = grant_of(&hop);
    secrets.extend(needles("hop grant", &hop_grant));
    let researcher = r.redeem(&hop_grant, RESEARCHER, "researcher");
    secrets.extend(needles("researcher token", &token_of(&researcher)));
    for k in keys_in(&researcher) {
        secrets.extend(needles("researcher key", &k));
    }
    for (tool, ok) in [("crm.search", true), ("crm.update", false)] {
        let out = r.run(&[
            "example",
            "call",
            "--credential",
            researcher.to_str().unwrap(),
            "--url",
            &r.w.tool_url,
            "--tool",
            tool,
            "--input",
            r#"{"q":"acme"}"#,
        ]);
        assert_eq!(
            out.status.success(),
            ok,
            "{tool}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let jwt = r.ok(&["svid", "fetch-jwt", "--audience", "crm"]);
    secrets.extend(needles("JWT-SVID", &jwt));
    let svid_dir = r.path("svid");
    r.ok(&["svid", "fetch", "--write", svid_dir.to_str().unwrap()]);
    for k in keys_in(&svid_dir) {
        secrets.extend(needles("X509-SVID key", &k));
    }

    let id_token2 = dev_id_token(&r.w.c, "alice@example.com");
    secrets.extend(needles("second ID token", &id_token2));
    let (task2, grant2) = r.start_task(&id_token2, &["secret:apikey:issue"], "keys");
    secrets.extend(needles("second grant", &grant2));
    let keyholder = r.redeem(&grant2, PLANNER, "keyholder");
    secrets.extend(needles("keyholder token", &token_of(&keyholder)));
    let lease = r.json(&[
        "secret",
        "lease",
        "--credential",
        keyholder.to_str().unwrap(),
        "--engine",
        "apikey",
        "-o",
        "json",
    ]);
    let api_key = lease["material"]["key"].as_str().unwrap().to_owned();
    secrets.extend(needles("leased API key", &api_key));

    // The tool server's reports reach the broker: the run is complete.
    wait_for(
        "tool calls in the audit trace",
        Duration::from_secs(60),
        || {
            let t = r.json(&["audit", "trace", &task, "--json"]).to_string();
            (t.contains("crm.search") && t.contains("crm.update")).then_some(())
        },
    );
    r.ok(&["task", "end", &task]);
    r.ok(&["task", "end", &task2]);

    let Run {
        mut w, cli_logs, ..
    } = r;
    // The tool server first, while the broker still takes its reports: its
    // log is complete once it has exited.
    w._tool.stop();
    let mut daemons = vec![w.c.broker.take().unwrap(), w.c.agent.take().unwrap()];
    for p in &mut daemons {
        p.stop();
    }
    let mut logs: Vec<(String, String)> = daemons
        .iter()
        .map(|p| (p.name.to_owned(), p.log_text()))
        .collect();
    logs.push(("tool-server".into(), w._tool.log_text()));
    logs.extend(cli_logs.into_inner().unwrap());

    // Control: the logs are the run's (the task is named, at every level
    // of detail), so finding no secret in them means something.
    let broker_log = &logs[0].1;
    assert!(
        broker_log.contains(&task),
        "the broker's log does not name the task"
    );
    let broker_lines = json_lines("broker", broker_log);
    assert!(
        broker_lines.iter().any(|v| v["level"] == "TRACE"),
        "no trace-level line: the filter is not the most verbose"
    );
    // Span fields ride along: the hop's event carries its request span.
    assert!(
        broker_lines
            .iter()
            .any(|v| v["fields"]["message"] == "hop granted" && v["span"]["name"] == "baton.hop"),
        "no `hop granted` line inside its `baton.hop` span"
    );
    let mut total = 0;
    for (source, text) in &logs {
        total += json_lines(source, text).len();
        for (name, needle) in &secrets {
            assert!(
                !text.contains(needle.as_str()),
                "{source}'s log holds the {name}"
            );
        }
    }
    assert!(total > 1000, "only {total} log lines: is the run logged?");
    eprintln!(
        "{} secrets looked for in {total} JSON log lines of {} processes",
        secrets.len(),
        logs.len()
    );
}

#[test]
fn text_logs_written_to_a_file_carry_no_colour_codes() {
    // Text is the default; the harness writes every process's standard
    // error to a file, as systemd or a container runtime would.
    let mut c = Cluster::start(Options::default());
    c.register("/agents/planner", &[]);
    // The node daemon serves the new entry once it has synced.
    let out = wait_for("an X509-SVID", Duration::from_secs(30), || {
        let out = baton()
            .args(["svid", "fetch"])
            .env("SPIFFE_ENDPOINT_SOCKET", c.endpoint())
            .env("BATON_LOG", "debug")
            .output()
            .unwrap();
        out.status.success().then_some(out)
    });
    let mut logs = vec![("svid fetch".to_owned(), out.stderr)];
    for p in [c.agent.as_mut().unwrap(), c.broker.as_mut().unwrap()] {
        p.stop();
        logs.push((p.name.to_owned(), std::fs::read(&p.log).unwrap()));
    }
    for (source, bytes) in &logs[1..] {
        let text = String::from_utf8_lossy(bytes);
        assert!(text.contains(" INFO "), "{source} logged nothing: {text}");
    }
    for (source, bytes) in &logs {
        assert!(
            !bytes.contains(&0x1b),
            "{source}'s log holds an ESC byte: {}",
            String::from_utf8_lossy(bytes)
        );
    }
}

/// The gateway and the revocation service, at the most verbose level with
/// JSON logs, through allowed, refused and forged calls and a task's end
/// heard from Redis: every line parses, and neither log holds a delegation
/// token, a private key or a grant of the run.
#[test]
fn the_gateways_and_the_revocation_services_trace_logs_hold_no_secret() {
    use crate::gateway::{Gw, send, token_of};
    let redis = crate::harness::Redis::start();
    let log_args = ["--log-format", "json", "--log", VERBOSE];
    let mut g = Gw::start_with_args(Some(&redis.url), |_| (String::new(), Vec::new()), &log_args);
    let mut cmd = baton();
    cmd.args([
        "revocation",
        "--redis",
        &redis.url,
        "--check-every",
        "200ms",
    ])
    .args(log_args);
    let mut rev = Proc::spawn("revocation", cmd, g.w.c.path("revocation.log"));

    let (task, planner, researcher) = g.researcher();
    let mut secrets: Vec<(String, String)> = Vec::new();
    for (name, dir) in [("planner", &planner), ("researcher", &researcher)] {
        secrets.extend(needles(&format!("{name} token"), &token_of(dir)));
        for k in keys_in(dir) {
            secrets.extend(needles(&format!("{name} key"), &k));
        }
    }
    let token = token_of(&researcher);
    let read = format!("{}/crm/accounts/acme", g.url);
    wait_for("the call allowed", Duration::from_secs(60), || {
        (send(&researcher, "GET", &read, Some(&token), &[]).status == 200).then_some(())
    });
    // Refused: a write the hop did not grant, and a forged signature.
    let write = format!("{}/crm/cases/c-1", g.url);
    assert_eq!(
        send(&researcher, "POST", &write, Some(&token), &[]).status,
        403
    );
    // One signature character changed (not the last: its low bits are
    // padding).
    let at = token.len() - 10;
    let mut forged = token.clone();
    let by = if &token[at..=at] == "A" { "B" } else { "A" };
    forged.replace_range(at..=at, by);
    assert_eq!(
        send(&researcher, "GET", &read, Some(&forged), &[]).status,
        401
    );
    // The task ends; the gateway hears it from Redis.
    g.w.ok(&["task", "end", &task]);
    wait_for("the ended task refused", Duration::from_secs(30), || {
        (send(&researcher, "GET", &read, Some(&token), &[]).status == 401).then_some(())
    });

    g.gateway.stop();
    rev.stop();
    let logs = [
        ("gateway", g.gateway.log_text()),
        ("revocation", rev.log_text()),
    ];
    // Control: the logs are the run's and at the most verbose level.
    assert!(
        logs[0].1.contains("crm.search"),
        "the gateway's log does not name the tool it served"
    );
    assert!(
        json_lines("gateway", &logs[0].1)
            .iter()
            .any(|v| v["level"] == "TRACE"),
        "the gateway: no trace line: the filter is not the most verbose"
    );
    for (source, text) in &logs {
        assert!(
            !json_lines(source, text).is_empty(),
            "{source}: no log line"
        );
        for (name, needle) in &secrets {
            assert!(
                !text.contains(needle.as_str()),
                "{source}'s log holds the {name}"
            );
        }
        assert!(
            !text.contains(forged.as_str()),
            "{source}'s log holds the forged token"
        );
    }
}
