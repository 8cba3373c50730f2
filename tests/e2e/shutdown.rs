//! Graceful shutdown and reload: SIGTERM in the middle of a loop of
//! requests cuts none of them (each is answered in full, or refused before
//! the broker took it in), the process exits 0 and its audit log verifies;
//! the node daemon, the revocation service, `baton dev` and the example
//! tool server exit 0 too; SIGHUP reloads the admission policies, and a
//! broken policy on SIGHUP leaves the one in force.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use baton_tls::ClientIdentity;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

use crate::harness::{Cluster, Options, Proc, Redis, baton, wait_for, wait_for_async};

fn tls_config(c: &Cluster, identity: ClientIdentity) -> rustls::ClientConfig {
    crate::harness::broker_tls_config(c, identity)
}

/// A client that opens a fresh connection for every request, so a request
/// never lands on a kept-alive connection the broker is closing.
fn client(c: &Cluster, identity: ClientIdentity) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls_config(c, identity))
        .pool_max_idle_per_host(0)
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

async fn id_token(admin: &reqwest::Client) -> String {
    let v: serde_json::Value = admin
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

fn sigterm(p: &Proc) {
    signal(p, "-TERM");
}

fn signal(p: &Proc, sig: &str) {
    let pid = p.child.id().to_string();
    assert!(
        Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success()
    );
}

/// Waits for the process to exit and asserts it exited 0.
fn exited_zero(p: &mut Proc, within: Duration) {
    let status = wait_for(&format!("{} to exit", p.name), within, || {
        p.child.try_wait().ok().flatten()
    });
    assert!(
        status.success(),
        "{} exited with {status}: {}",
        p.name,
        p.log_text()
    );
}

/// What one request of the loop ended with (the texts are read through
/// `Debug` in assertion messages).
#[derive(Debug)]
#[allow(dead_code)]
enum Outcome {
    /// A full, valid 2xx answer.
    Answered,
    /// No answer at all: the connection was refused or closed before the
    /// broker answered (it took nothing in: checked against the datastore).
    NotTaken(String),
    /// What shutdown must never cause: a 5xx, a body cut short or not JSON.
    Cut(String),
}

async fn classify(resp: Result<reqwest::Response, reqwest::Error>, field: &str) -> Outcome {
    let resp = match resp {
        Ok(r) => r,
        Err(e) => return Outcome::NotTaken(format!("{e:?}")),
    };
    let status = resp.status();
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) => return Outcome::Cut(format!("{status}: body cut short: {e:?}")),
    };
    if !status.is_success() {
        return Outcome::Cut(format!("{status}: {}", String::from_utf8_lossy(&body)));
    }
    match serde_json::from_slice::<serde_json::Value>(&body) {
        Ok(v) if !v[field].is_null() => Outcome::Answered,
        _ => Outcome::Cut(format!(
            "{status}: not the expected JSON: {}",
            String::from_utf8_lossy(&body)
        )),
    }
}

/// Sends a task start whose body arrives in two halves: the header and
/// the first half now, the rest once `release` says so. Returns the whole
/// raw answer, read to the end of the connection.
fn slow_task_start(
    c: &Cluster,
    token: &str,
    sent_half: std::sync::mpsc::Sender<()>,
    release: std::sync::mpsc::Receiver<()>,
) -> std::thread::JoinHandle<String> {
    let mut config = tls_config(c, ClientIdentity::none());
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let addr = c.broker_addr.clone();
    let body = serde_json::to_vec(&start_body(token)).unwrap();
    std::thread::spawn(move || {
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let tcp = TcpStream::connect(&addr).unwrap();
        tcp.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let (first, rest) = body.split_at(body.len() / 2);
        write!(
            tls,
            "POST /v1/tasks HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        tls.write_all(first).unwrap();
        tls.flush().unwrap();
        sent_half.send(()).unwrap();
        release.recv().unwrap();
        tls.write_all(rest).unwrap();
        tls.flush().unwrap();
        let mut answer = Vec::new();
        // The broker closes the connection after the answer (shutdown).
        let _ = tls.read_to_end(&mut answer);
        String::from_utf8_lossy(&answer).into_owned()
    })
}

/// The JSON body of a raw HTTP/1.1 answer whose status must be 200 and
/// whose body must be exactly its Content-Length.
fn full_json_answer(raw: &str) -> serde_json::Value {
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{raw}");
    let length: usize = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-length")
                .then(|| v.trim().parse().unwrap())
        })
        .expect("a content-length");
    assert_eq!(body.len(), length, "body cut short: {raw}");
    serde_json::from_str(body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_mid_loop_cuts_no_request_exits_0_and_the_audit_log_verifies() {
    baton_tls::install_crypto_provider();
    let mut c = Cluster::start_with_broker_args(
        Options::default(),
        vec![
            "--rate-limit".into(),
            "task-start=100000/1s".into(),
            "--shutdown-timeout".into(),
            "30s".into(),
        ],
    );
    let admin = reqwest::Client::builder()
        .unix_socket(c.admin_socket())
        .build()
        .unwrap();
    let mut tokens = Vec::new();
    for _ in 0..400 {
        tokens.push(id_token(&admin).await);
    }
    let slow_token = tokens.pop().unwrap();
    let tokens = Arc::new(Mutex::new(tokens));
    let anon = client(&c, ClientIdentity::none());
    let node = client(&c, node_identity(&c));
    let base = format!("https://{}", c.broker_addr);

    // The loop: three workers starting tasks, one syncing as the node.
    let outcomes: Arc<Mutex<Vec<(&'static str, Outcome)>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut workers = Vec::new();
    for _ in 0..3 {
        let (anon, base, tokens, outcomes, stop) = (
            anon.clone(),
            base.clone(),
            tokens.clone(),
            outcomes.clone(),
            stop.clone(),
        );
        workers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let Some(token) = tokens.lock().unwrap().pop() else {
                    break;
                };
                let resp = anon
                    .post(format!("{base}/v1/tasks"))
                    .json(&start_body(&token))
                    .send()
                    .await;
                let outcome = classify(resp, "task_id").await;
                outcomes.lock().unwrap().push(("task start", outcome));
            }
        }));
    }
    {
        let (node, base, outcomes, stop) =
            (node.clone(), base.clone(), outcomes.clone(), stop.clone());
        workers.push(tokio::spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let resp = node.get(format!("{base}/v1/node/sync")).send().await;
                let outcome = classify(resp, "entries").await;
                outcomes.lock().unwrap().push(("sync", outcome));
            }
        }));
    }
    // A feed long-poll in flight: it must be answered when shutdown
    // starts, not hold the drain for its wait.
    let first: serde_json::Value = node
        .get(format!("{base}/v1/revocations/feed?after=0&wait_ms=0"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seq = first["seq"].as_u64().unwrap();
    let long_poll = {
        let (node, base) = (node.clone(), base.clone());
        tokio::spawn(async move {
            let resp = node
                .get(format!(
                    "{base}/v1/revocations/feed?after={seq}&wait_ms=25000"
                ))
                .send()
                .await;
            (classify(resp, "epoch").await, Instant::now())
        })
    };
    // A request whose body is still arriving when SIGTERM comes.
    let (half_tx, half_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = std::sync::mpsc::channel();
    let slow = slow_task_start(&c, &slow_token, half_tx, release_rx);
    half_rx.recv_timeout(Duration::from_secs(30)).unwrap();

    wait_for_async("the loop to be under way", Duration::from_secs(60), || {
        let n = outcomes
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, o)| matches!(o, Outcome::Answered))
            .count();
        async move { (n >= 30).then_some(()) }
    })
    .await;

    let broker = c.broker.as_mut().unwrap();
    sigterm(broker);
    let term_at = Instant::now();
    wait_for(
        "the broker to start shutting down",
        Duration::from_secs(20),
        || broker.log_text().contains("shutting down").then_some(()),
    );
    release_tx.send(()).unwrap();
    exited_zero(broker, Duration::from_secs(40));
    // The loop runs on into the stopped broker: its port is closed.
    wait_for_async(
        "a request to meet the stopped broker",
        Duration::from_secs(30),
        || {
            let n = outcomes
                .lock()
                .unwrap()
                .iter()
                .filter(|(_, o)| matches!(o, Outcome::NotTaken(_)))
                .count();
            async move { (n > 0).then_some(()) }
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    for w in workers {
        w.await.unwrap();
    }

    // The slow request was taken in before SIGTERM: it is answered in full.
    let slow_answer = full_json_answer(&slow.join().unwrap());
    assert!(slow_answer["task_id"].is_string(), "{slow_answer}");
    // The long-poll was answered at once, well before its 25 s wait.
    let (polled, polled_at) = long_poll.await.unwrap();
    assert!(matches!(polled, Outcome::Answered), "{polled:?}");
    assert!(
        polled_at.duration_since(term_at) < Duration::from_secs(15),
        "the long-poll held the shutdown for {:?}",
        polled_at.duration_since(term_at)
    );

    let outcomes = outcomes.lock().unwrap();
    let cut: Vec<_> = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Cut(_)))
        .collect();
    assert!(cut.is_empty(), "requests cut by the shutdown: {cut:?}");
    let started = outcomes
        .iter()
        .filter(|(k, o)| *k == "task start" && matches!(o, Outcome::Answered))
        .count();
    let not_taken = outcomes
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::NotTaken(_)))
        .count();
    eprintln!(
        "{} requests: {started} task starts answered, {not_taken} not taken",
        outcomes.len()
    );
    assert!(started >= 20, "only {started} task starts answered");
    assert!(not_taken > 0, "no request met the stopped broker");
    drop(outcomes);

    // The audit log verifies offline, as the broker left it...
    let out = baton()
        .args(["audit", "verify", "--db"])
        .arg(c.path("broker/audit.db"))
        .arg("--keys-dir")
        .arg(c.path("broker/audit"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // ...and every task the broker started was answered to its client:
    // none was taken in and then cut (the slow one included).
    c.start_broker("127.0.0.1:0", "1h");
    let tasks = c.cli_json(&["task", "list"]);
    let stored = tasks["tasks"].as_array().unwrap().len();
    assert_eq!(stored, started + 1, "tasks stored vs task starts answered");
    c.cli_ok(&["audit", "verify"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_daemon_ends_its_streams_and_exits_0_on_sigterm_and_survives_sighup() {
    let mut c = Cluster::start(Options::default());
    c.register("/workload", &[]);
    let client = spiffe::WorkloadApiClient::connect_to(c.endpoint())
        .await
        .unwrap();
    // Once the agent has synced the entry, the stream's first message is
    // the SVID.
    wait_for_async("the workload's SVID", Duration::from_secs(30), || {
        let client = client.clone();
        async move { client.fetch_x509_svid().await.ok() }
    })
    .await;
    let mut stream = client.stream_x509_svids().await.unwrap();
    use futures::StreamExt;
    let first = tokio::time::timeout(Duration::from_secs(30), stream.next())
        .await
        .unwrap();
    assert!(first.unwrap().is_ok());

    // SIGHUP is not fatal (its default action would end the process).
    let agent = c.agent.as_mut().unwrap();
    signal(agent, "-HUP");
    wait_for(
        "the agent to log the SIGHUP",
        Duration::from_secs(20),
        || agent.log_text().contains("SIGHUP").then_some(()),
    );
    assert!(agent.is_running(), "{}", agent.log_text());

    // With a Workload API stream open, SIGTERM still ends it promptly.
    sigterm(agent);
    let ended = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => continue,
                other => return other.map(|r| r.map(|_| ())),
            }
        }
    })
    .await
    .expect("the stream did not end");
    assert!(!matches!(ended, Some(Ok(()))), "{ended:?}");
    exited_zero(agent, Duration::from_secs(20));
    assert!(!c.agent_socket().exists(), "socket file left behind");
}

#[test]
fn the_revocation_service_exits_0_on_sigterm_and_survives_sighup() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = baton();
    cmd.args(["revocation", "--redis", &redis.url]);
    let mut p = Proc::spawn("revocation", cmd, dir.path().join("revocation.log"));
    wait_for("the revocation service", Duration::from_secs(30), || {
        assert!(p.is_running(), "{}", p.log_text());
        p.log_text()
            .contains("revocation service running")
            .then_some(())
    });
    signal(&p, "-HUP");
    wait_for("the SIGHUP log line", Duration::from_secs(20), || {
        p.log_text().contains("SIGHUP").then_some(())
    });
    assert!(p.is_running(), "{}", p.log_text());
    sigterm(&p);
    exited_zero(&mut p, Duration::from_secs(20));
    assert!(p.log_text().contains("revocation service stopped"));
}

#[test]
fn baton_dev_and_the_example_tool_server_exit_0_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let mut cmd = baton();
    cmd.args(["dev", "--shutdown-timeout", "20s", "--data-dir"])
        .arg(&data);
    let mut dev = Proc::spawn("dev", cmd, dir.path().join("dev.log"));
    let addr = wait_for("baton dev", Duration::from_secs(60), || {
        assert!(dev.is_running(), "{}", dev.log_text());
        data.join("agent.sock")
            .exists()
            .then(|| std::fs::read_to_string(data.join("broker.addr")).ok())
            .flatten()
    });
    let own = crate::harness::own_uid();
    let out = baton()
        .args([
            "entry",
            "create",
            "--spiffe-id",
            "spiffe://example.org/tools/crm",
            "--parent-id",
            "spiffe://example.org/baton/node/dev",
            "--selector",
            &format!("unix:uid:{own}"),
        ])
        .env("BATON_ADMIN_SOCKET", data.join("admin.sock"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ready = dir.path().join("tool.addr");
    let mut cmd = baton();
    cmd.args([
        "example",
        "tool-server",
        "--spiffe-id",
        "spiffe://example.org/tools/crm",
        "--broker-url",
        &format!("https://{addr}"),
    ])
    .arg("--socket")
    .arg(data.join("agent.sock"))
    .arg("--spool")
    .arg(dir.path().join("spool"))
    .arg("--ready-file")
    .arg(&ready);
    let mut tool = Proc::spawn("tool-server", cmd, dir.path().join("tool.log"));
    wait_for("the tool server", Duration::from_secs(60), || {
        assert!(tool.is_running(), "{}", tool.log_text());
        ready.exists().then_some(())
    });
    signal(&tool, "-HUP");
    wait_for(
        "the tool server's SIGHUP line",
        Duration::from_secs(20),
        || tool.log_text().contains("SIGHUP").then_some(()),
    );
    assert!(tool.is_running(), "{}", tool.log_text());
    sigterm(&tool);
    exited_zero(&mut tool, Duration::from_secs(30));
    assert!(tool.log_text().contains("example tool server stopped"));

    sigterm(&dev);
    exited_zero(&mut dev, Duration::from_secs(40));
    assert!(
        dev.log_text().contains("baton dev stopped"),
        "{}",
        dev.log_text()
    );
    assert!(!data.join("admin.sock").exists());
    assert!(!data.join("agent.sock").exists());
}

/// Writes an admission policy set into `dir`: the example schema, and a
/// policy that permits engineers' task starts unless `forbid_engineering`.
fn write_admission(dir: &std::path::Path, forbid_engineering: bool) {
    let root =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/policies/admission");
    std::fs::copy(
        root.join("schema.cedarschema"),
        dir.join("schema.cedarschema"),
    )
    .unwrap();
    let mut text = std::fs::read_to_string(root.join("admission.cedar")).unwrap();
    if forbid_engineering {
        text.push_str(
            "\n@id(\"test.no-engineering\")\nforbid (principal is Human, action == Action::\"start_task\", resource)\nwhen { principal.groups.contains(\"engineering\") };\n",
        );
    }
    std::fs::write(dir.join("admission.cedar"), text).unwrap();
}

fn start_task(c: &Cluster) -> std::process::Output {
    c.cli(&[
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
    ])
}

#[test]
fn sighup_reloads_the_admission_policy_and_a_broken_one_keeps_the_old() {
    let policies = tempfile::tempdir().unwrap();
    write_admission(policies.path(), false);
    let mut c = Cluster::start_with_broker_args(
        Options {
            start_agent: false,
            ..Options::default()
        },
        vec![
            "--admission-policy".into(),
            policies.path().display().to_string(),
        ],
    );
    // Control: the policy in force permits it.
    let out = start_task(&c);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let reloads = |c: &mut Cluster| {
        c.broker
            .as_ref()
            .unwrap()
            .log_text()
            .matches("SIGHUP:")
            .count()
    };
    let hup = |c: &mut Cluster, before: usize| {
        let broker = c.broker.as_mut().unwrap();
        signal(broker, "-HUP");
        wait_for("the reload", Duration::from_secs(20), || {
            (broker.log_text().matches("SIGHUP:").count() > before).then_some(())
        });
        assert!(broker.is_running(), "{}", broker.log_text());
    };

    // A changed policy: after SIGHUP the same start is refused.
    write_admission(policies.path(), true);
    let before = reloads(&mut c);
    hup(&mut c, before);
    assert!(
        c.broker
            .as_ref()
            .unwrap()
            .log_text()
            .contains("SIGHUP: reloaded admission policies from")
    );
    let out = start_task(&c);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("test.no-engineering"));

    // A broken policy: the reload fails with a clear error naming the file,
    // and the policy in force (the forbid) stays.
    std::fs::write(
        policies.path().join("admission.cedar"),
        "permit (principal, action, resource) when { this is not cedar",
    )
    .unwrap();
    let before = reloads(&mut c);
    hup(&mut c, before);
    let log = c.broker.as_ref().unwrap().log_text();
    assert!(
        log.contains("SIGHUP: cannot reload admission policies from")
            && log.contains("the previous ones stay in force")
            && log.contains("admission.cedar"),
        "{log}"
    );
    let out = start_task(&c);
    assert_eq!(
        out.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("test.no-engineering"));

    // Fixed again: permitted again.
    write_admission(policies.path(), false);
    let before = reloads(&mut c);
    hup(&mut c, before);
    let out = start_task(&c);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.broker.as_mut().unwrap().stop();
}
