//! Losing a broker loses nothing: three brokers on one PostgreSQL and one
//! Redis, two node daemons and two tool servers (one following Redis, one
//! the brokers' own feed), and a loop of task starts, hops, redeems, tool
//! calls and revocations while a monkey kills a broker with SIGKILL at a
//! random moment, starts it again a little later, and kills another.
//!
//! Every client uses its documented retry (README, "Several brokers"):
//! the node daemons and `baton delegate` move to the next broker on their
//! own; an admin command that exits 3 (no answer) is run again at another
//! broker; a tool call refused `revocation_stale` is made again once the
//! tool server's feed has caught up. At the end: no request failed after
//! that retry, every credential delivered has its audit record, `audit
//! verify` passes at every broker over the three logs, every revoked
//! credential is refused by both tool servers and a revoked planner by
//! every broker, and no grant or join token was used twice.
//!
//! Seeded like `chaos`: `BATON_CHAOS_SEED=<n>` replays the operations and
//! the monkey's choices (not the moments the processes see them);
//! `BATON_CHAOS_SECS` sets the loop's length (default 25 s, at most a few
//! minutes: the tasks live 10 minutes).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::brokers::{broker, seal_key};
use crate::chaos::{Rng, call, passes_revocation, refused_revoked, seed, settles, stderr};
use crate::delegation::{PLANNER, RESEARCHER, TOOL, World, claims, task_start_args};
use crate::harness::{BrokerSpec, Options, Proc, Redis, baton, own_uid, wait_for};
use crate::pg_datastore::{cluster, create_db};

const READ: &[&str] = &["tool:crm.search:read", "dataset:crm:read"];
/// Enough tasks for cascades, few enough that the end checks stay short.
const MAX_TASKS: usize = 12;
/// How long a client retries before a request counts as failed: a broker
/// restarting on a loaded machine, plus the feed catching up.
const RETRY_FOR: Duration = Duration::from_secs(90);

/// The three brokers: how to start each, and the running process (None
/// while the monkey has it down).
struct Brokers {
    specs: Vec<BrokerSpec>,
    addrs: Vec<String>,
    procs: Mutex<Vec<Option<Proc>>>,
}

impl Brokers {
    fn admin_socket(&self, i: usize) -> PathBuf {
        self.specs[i].dir.join("admin.sock")
    }

    fn url(&self, i: usize) -> String {
        format!("https://{}", self.addrs[i])
    }

    /// Every broker's URL, starting at `first`.
    fn urls_from(&self, first: usize) -> String {
        (0..self.addrs.len())
            .map(|k| self.url((first + k) % self.addrs.len()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Kills a broker (SIGKILL) at a random moment, starts it again on its
/// address after a random pause, then kills another, until `stop`. At most
/// one broker is down at a time. Returns what it did.
fn monkey(
    brokers: Arc<Brokers>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> std::thread::JoinHandle<BTreeMap<String, usize>> {
    std::thread::spawn(move || {
        let mut rng = Rng::new(seed ^ 0x5851_F42D_4C95_7F2D);
        let mut did: BTreeMap<String, usize> = BTreeMap::new();
        let mut last = usize::MAX;
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(500 + rng.below(2000) as u64));
            if stop.load(Ordering::SeqCst) {
                break;
            }
            // Another broker than the one killed last.
            let mut i = rng.below(brokers.addrs.len());
            if i == last {
                i = (i + 1) % brokers.addrs.len();
            }
            last = i;
            let victim = brokers.procs.lock().unwrap()[i].take();
            if let Some(mut p) = victim {
                if !p.is_running() {
                    // Counted, and the test fails on it: no broker may
                    // die of what the others did.
                    *did.entry(format!("broker {i} had exited")).or_default() += 1;
                }
                let _ = p.child.kill();
                let _ = p.child.wait();
            }
            *did.entry(format!("kill -9 broker {i}")).or_default() += 1;
            std::thread::sleep(Duration::from_millis(200 + rng.below(2500) as u64));
            let (p, _) = brokers.specs[i].spawn(&brokers.addrs[i], true);
            brokers.procs.lock().unwrap()[i] = Some(p);
            *did.entry("restart".into()).or_default() += 1;
        }
        did
    })
}

/// A credential the client received.
struct Cred {
    task: usize,
    researcher: bool,
    parent: Option<usize>,
    dir: PathBuf,
    jti: String,
    /// The grant it was redeemed from.
    grant: String,
    revoked: bool,
    /// By tool server: it refused this credential as revoked (so it may
    /// never accept it again).
    seen_refused: [bool; 2],
}

struct Task {
    id: String,
    ended: bool,
}

/// The driver: the world, the brokers, what it has done.
struct Driver<'a> {
    w: &'a World,
    brokers: &'a Brokers,
    /// The node daemons' Workload API sockets (the world's first).
    nodes: [String; 2],
    seed: u64,
    rng: Rng,
    /// Requests sent again under a client's documented retry, by kind.
    retries: BTreeMap<&'static str, usize>,
}

impl Driver<'_> {
    fn run(&self, args: &[&str], admin: &Path, node: usize, urls: &str) -> Output {
        baton()
            .args(args)
            .env("BATON_ADMIN_SOCKET", admin)
            .env("SPIFFE_ENDPOINT_SOCKET", &self.nodes[node])
            .env("BATON_BROKER_URL", urls)
            .output()
            .unwrap()
    }

    /// An operator's command, at a broker picked at random; exit 3 (the
    /// broker gave no answer) is the documented cue to run it again at
    /// another. Any other failure fails the test.
    fn admin(&mut self, what: &str, args: &[&str]) -> String {
        let n = self.brokers.addrs.len();
        let first = self.rng.below(n);
        let deadline = Instant::now() + RETRY_FOR;
        for k in 0.. {
            let i = (first + k) % n;
            let out = self.run(args, &self.brokers.admin_socket(i), 0, &self.brokers.url(i));
            if out.status.success() {
                return String::from_utf8(out.stdout).unwrap();
            }
            assert_eq!(
                out.status.code(),
                Some(3),
                "{what}: baton {args:?} at broker {i} failed (seed {}): {}",
                self.seed,
                stderr(&out)
            );
            *self.retries.entry("admin, at another broker").or_default() += 1;
            assert!(
                Instant::now() < deadline,
                "{what}: no broker answered baton {args:?} (seed {}): {}",
                self.seed,
                stderr(&out)
            );
            if k % n == n - 1 {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        unreachable!()
    }

    fn start(&mut self) -> (String, String) {
        let args = task_start_args(READ, "2", "10m", "read");
        let v: serde_json::Value = serde_json::from_str(&self.admin("task start", &args)).unwrap();
        (
            v["task_id"].as_str().unwrap().to_owned(),
            v["grant"].as_str().unwrap().to_owned(),
        )
    }

    /// A redeem through node daemon `node`, which fails over by itself.
    fn redeem(&self, grant: &str, as_id: &str, node: usize, tag: &str) -> (PathBuf, String) {
        let out_dir = self.w.c.path(tag);
        let out = self.run(
            &[
                "grant",
                "redeem",
                "--grant",
                grant,
                "--spiffe-id",
                as_id,
                "--out",
                out_dir.to_str().unwrap(),
            ],
            &self.brokers.admin_socket(0),
            node,
            "",
        );
        assert!(
            out.status.success(),
            "redeem of {tag} through node {node} failed (seed {}): {}",
            self.seed,
            stderr(&out)
        );
        let jti = claims(&out_dir)["jti"].as_str().unwrap().to_owned();
        (out_dir, jti)
    }

    /// A hop with every broker's URL (starting at a random one); `baton
    /// delegate` moves to the next by itself.
    fn hop(&mut self, cred: &Path) -> String {
        let urls = self
            .brokers
            .urls_from(self.rng.below(self.brokers.addrs.len()));
        let mut args = vec![
            "delegate",
            "--credential",
            cred.to_str().unwrap(),
            "--target",
            RESEARCHER,
            "--audience",
            "crm",
            "--justification",
            "look up the customer's open cases",
            "-o",
            "json",
        ];
        for s in READ {
            args.extend(["--scope", s]);
        }
        let out = self.run(&args, &self.brokers.admin_socket(0), 0, &urls);
        assert!(
            out.status.success(),
            "hop failed with {urls} (seed {}): {}",
            self.seed,
            stderr(&out)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["grant"].as_str().unwrap().to_owned()
    }

    /// A tool call; `revocation_stale` (the tool server's feed is behind
    /// while it moves to another broker) is retried, as documented.
    fn call(&mut self, url: &str, cred: &Path) -> Output {
        let deadline = Instant::now() + RETRY_FOR;
        loop {
            let out = call(self.w, url, cred);
            if !stderr(&out).contains("revocation_stale") {
                return out;
            }
            *self.retries.entry("tool call, feed stale").or_default() += 1;
            assert!(
                Instant::now() < deadline,
                "{url} stayed stale (seed {}): {}",
                self.seed,
                stderr(&out)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// A second node daemon on the world's host, attested with a join token,
/// serving the researcher too, with every broker's URL.
fn second_node(w: &World, urls: &str) -> (Proc, String, String) {
    let token = w.c.join_token(None);
    let ready = w.c.path("node2.ready");
    let socket = w.c.path("node2.sock");
    let mut cmd = w.c.agent_command(&w.c.path("node2"), &socket, Some(&token));
    cmd.args(["--broker-url", urls])
        .arg("--ready-file")
        .arg(&ready);
    let mut p = Proc::spawn("agent", cmd, w.c.path("node2.log"));
    let node_id = wait_for("the second node daemon", Duration::from_secs(60), || {
        assert!(p.is_running(), "node 2 exited: {}", p.log_text());
        std::fs::read_to_string(&ready).ok()
    });
    w.c.cli_ok(&[
        "entry",
        "create",
        "--spiffe-id",
        RESEARCHER,
        "--parent-id",
        &node_id,
        "--selector",
        &format!("unix:uid:{}", own_uid()),
    ]);
    let endpoint = format!("unix:{}", socket.display());
    wait_for(
        "the second node daemon serves the researcher",
        Duration::from_secs(60),
        || {
            baton()
                .args(["svid", "fetch", "--spiffe-id", RESEARCHER])
                .env("SPIFFE_ENDPOINT_SOCKET", &endpoint)
                .output()
                .unwrap()
                .status
                .success()
                .then_some(())
        },
    );
    (p, endpoint, token)
}

/// The tool server of the world's kind that follows the brokers' own feed
/// (no Redis), moving to the next broker when one does not answer.
fn feed_tool_server(w: &World, urls: &str) -> (Proc, String) {
    let ready = w.c.path("tool2.addr");
    let mut cmd = baton();
    cmd.args([
        "example",
        "tool-server",
        "--audience",
        "crm",
        "--spiffe-id",
        TOOL,
        "--broker-url",
        urls,
    ])
    .arg("--socket")
    .arg(w.c.agent_socket())
    .arg("--spool")
    .arg(w.c.path("tool2-spool"))
    .arg("--ready-file")
    .arg(&ready);
    let mut p = Proc::spawn("tool-server", cmd, w.c.path("tool2.log"));
    let addr = wait_for("the feed tool server", Duration::from_secs(60), || {
        assert!(p.is_running(), "tool2 exited: {}", p.log_text());
        std::fs::read_to_string(&ready).ok()
    });
    (p, format!("https://{addr}"))
}

#[test]
fn chaos_brokers_killed_and_restarted_lose_no_request_credential_or_record() {
    let seed = seed();
    eprintln!("chaos seed {seed} (replay with BATON_CHAOS_SEED={seed})");
    let secs: u64 = std::env::var("BATON_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);

    let (rt, pg) = cluster();
    create_db(&rt, &pg);
    let redis = Redis::start();
    let keys = tempfile::tempdir().unwrap();
    let key = seal_key(keys.path(), "ca.key");
    let shared = vec![
        "--datastore".to_owned(),
        pg.admin_conn("baton"),
        "--ca-encryption-key-file".to_owned(),
        key.display().to_string(),
        "--redis".to_owned(),
        redis.url.clone(),
    ];
    let mut b_args = shared.clone();
    b_args.extend(["--tool-server".to_owned(), format!("crm={TOOL}")]);
    let mut b = broker(&b_args);
    let mut c = broker(&b_args);
    let bc = format!("https://{},https://{}", b.broker_addr, c.broker_addr);
    // The world's broker is A (World adds --redis and --tool-server); its
    // node daemon is given B and C after A, its tool server (on Redis)
    // reports to B or C.
    let mut w = World::start_with_options(
        Some(&redis.url),
        Options {
            broker_args: shared[..4].to_vec(),
            agent_args: vec!["--broker-url".into(), bc.clone()],
            tool_args: vec!["--broker-url".into(), bc.clone()],
            ..Options::default()
        },
    );
    let brokers = Arc::new(Brokers {
        specs: vec![
            w.c.broker_spec("1h"),
            b.broker_spec("1h"),
            c.broker_spec("1h"),
        ],
        addrs: vec![
            w.c.broker_addr.clone(),
            b.broker_addr.clone(),
            c.broker_addr.clone(),
        ],
        procs: Mutex::new(vec![w.c.broker.take(), b.broker.take(), c.broker.take()]),
    });
    // After the world's broker (the harness puts it first): C, then B.
    let (_node2, node2, node2_token) =
        second_node(&w, &format!("{},{}", brokers.url(2), brokers.url(1)));
    let (_tool2, tool2_url) = feed_tool_server(&w, &brokers.urls_from(2));
    let tools = [w.tool_url.clone(), tool2_url];
    let mut d = Driver {
        w: &w,
        brokers: &brokers,
        nodes: [w.c.endpoint(), node2],
        seed,
        rng: Rng::new(seed),
        retries: BTreeMap::new(),
    };
    // Both tool servers serve before the first fault.
    let (task0, grant0) = d.start();
    let (p0, p0_jti) = d.redeem(&grant0, PLANNER, 0, "c-p0");
    let g = d.hop(&p0);
    let (r0, r0_jti) = d.redeem(&g, RESEARCHER, 1, "c-r0");
    for url in &tools {
        wait_for(
            &format!("{url} takes a call"),
            Duration::from_secs(60),
            || call(&w, url, &r0).status.success().then_some(()),
        );
    }
    let mut tasks = vec![Task {
        id: task0,
        ended: false,
    }];
    let mut creds = vec![
        Cred {
            task: 0,
            researcher: false,
            parent: None,
            dir: p0,
            jti: p0_jti,
            grant: grant0,
            revoked: false,
            seen_refused: [false; 2],
        },
        Cred {
            task: 0,
            researcher: true,
            parent: Some(0),
            dir: r0,
            jti: r0_jti,
            grant: g,
            revoked: false,
            seen_refused: [false; 2],
        },
    ];

    let stop = Arc::new(AtomicBool::new(false));
    let monkey = monkey(brokers.clone(), stop.clone(), seed);
    let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
    let mut calls: BTreeMap<String, usize> = BTreeMap::new();
    let mut n = 0usize;
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if monkey.is_finished() {
            // It stopped on its own: a broker did not start again.
            let did = monkey.join();
            panic!("the monkey stopped early (seed {seed}): {did:?}");
        }
        n += 1;
        let live_planners: Vec<usize> = (0..creds.len())
            .filter(|&i| !creds[i].researcher && !creds[i].revoked && !tasks[creds[i].task].ended)
            .collect();
        let live_researchers: Vec<usize> = (0..creds.len())
            .filter(|&i| creds[i].researcher && !creds[i].revoked)
            .collect();
        let open_tasks: Vec<usize> = (0..tasks.len()).filter(|&t| !tasks[t].ended).collect();
        let op = match d.rng.below(100) {
            _ if live_planners.is_empty() => "start",
            0..=14 if tasks.len() < MAX_TASKS => "start",
            0..=39 => "hop",
            40..=49 if live_researchers.len() > 3 => "revoke-credential",
            50..=54 if live_planners.len() > 2 => "revoke-subtree",
            55..=59 if open_tasks.len() > 2 => "task-end",
            _ => "call",
        };
        *ops.entry(op).or_default() += 1;
        match op {
            "start" => {
                let (task, grant) = d.start();
                let t = tasks.len();
                tasks.push(Task {
                    id: task,
                    ended: false,
                });
                let (dir, jti) = d.redeem(&grant, PLANNER, 0, &format!("c-p{n}"));
                creds.push(Cred {
                    task: t,
                    researcher: false,
                    parent: None,
                    dir,
                    jti,
                    grant,
                    revoked: false,
                    seen_refused: [false; 2],
                });
            }
            "hop" => {
                let p = d.rng.pick(&live_planners).unwrap();
                let grant = d.hop(&creds[p].dir);
                let node = d.rng.below(2);
                let (dir, jti) = d.redeem(&grant, RESEARCHER, node, &format!("c-r{n}"));
                creds.push(Cred {
                    task: creds[p].task,
                    researcher: true,
                    parent: Some(p),
                    dir,
                    jti,
                    grant,
                    revoked: false,
                    seen_refused: [false; 2],
                });
            }
            "call" => {
                let i = d.rng.below(creds.len());
                let f = d.rng.below(tools.len());
                let out = d.call(&tools[f], &creds[i].dir);
                let outcome = if passes_revocation(&out) {
                    "accepted"
                } else if refused_revoked(&out) {
                    "refused-revoked"
                } else {
                    "refused-other"
                };
                *calls.entry(format!("{outcome}@{f}")).or_default() += 1;
                assert_ne!(
                    outcome,
                    "refused-other",
                    "op {n}: {} refused at {} (seed {seed}): {}",
                    creds[i].jti,
                    tools[f],
                    stderr(&out)
                );
                if outcome == "accepted" {
                    assert!(
                        !creds[i].seen_refused[f],
                        "op {n}: {} accepted at {} after it was refused as revoked (seed {seed})",
                        creds[i].jti, tools[f]
                    );
                } else {
                    assert!(
                        creds[i].revoked,
                        "op {n}: {} never revoked, refused as revoked at {} (seed {seed}): {}",
                        creds[i].jti,
                        tools[f],
                        stderr(&out)
                    );
                    creds[i].seen_refused[f] = true;
                }
            }
            "revoke-credential" => {
                let r = d.rng.pick(&live_researchers).unwrap();
                let jti = creds[r].jti.clone();
                d.admin(
                    "revoke credential",
                    &["revoke", "credential", &jti, "--reason", "chaos"],
                );
                creds[r].revoked = true;
            }
            "revoke-subtree" => {
                let p = d.rng.pick(&live_planners).unwrap();
                let jti = creds[p].jti.clone();
                d.admin(
                    "revoke subtree",
                    &["revoke", "subtree", &jti, "--reason", "chaos"],
                );
                for cr in creds.iter_mut() {
                    if cr.parent == Some(p) {
                        cr.revoked = true;
                    }
                }
                creds[p].revoked = true;
            }
            "task-end" => {
                let t = d.rng.pick(&open_tasks).unwrap();
                let id = tasks[t].id.clone();
                d.admin("task end", &["task", "end", &id]);
                tasks[t].ended = true;
                for cr in creds.iter_mut().filter(|cr| cr.task == t) {
                    cr.revoked = true;
                }
            }
            other => unreachable!("{other}"),
        }
    }
    stop.store(true, Ordering::SeqCst);
    let did = monkey.join().unwrap();
    eprintln!(
        "chaos across brokers: {n} operations in {secs} s: {ops:?}; calls {calls:?}; monkey {did:?}; retries {:?}; {} tasks, {} credentials, {} revoked",
        d.retries,
        tasks.len(),
        creds.len(),
        creds.iter().filter(|c| c.revoked).count()
    );
    assert!(
        did.keys().any(|k| k.starts_with("kill")),
        "the monkey killed no broker in {secs} s: {did:?}"
    );
    assert!(
        !did.keys().any(|k| k.ends_with("had exited")),
        "a broker exited by itself (seed {seed}): {did:?}"
    );
    // Every broker is up again (the monkey restarts before it stops).
    for (i, p) in brokers.procs.lock().unwrap().iter_mut().enumerate() {
        assert!(p.as_mut().is_some_and(Proc::is_running), "broker {i} down");
    }

    // Each tool server has caught up once a credential issued now works.
    let (_, grant) = d.start();
    let (probe_p, _) = d.redeem(&grant, PLANNER, 0, "c-final-p");
    let g = d.hop(&probe_p);
    let (probe, _) = d.redeem(&g, RESEARCHER, 1, "c-final-r");
    for url in &tools {
        wait_for(
            &format!("{url} is fresh again (seed {seed})"),
            Duration::from_secs(60),
            || call(&w, url, &probe).status.success().then_some(()),
        );
    }
    // Every revoked credential refused by both tool servers, every other
    // one accepted (a planner is refused by the example policy, not as
    // revoked).
    for cr in &creds {
        for url in &tools {
            let what = format!(
                "{} (revoked: {}) at {url} (seed {seed})",
                cr.jti, cr.revoked
            );
            settles(&w, url, &cr.dir, cr.revoked, cr.researcher, &what);
        }
    }
    // A revoked planner hops nowhere: each broker on its own refuses it.
    for cr in creds.iter().filter(|c| c.revoked && !c.researcher).take(4) {
        for i in 0..brokers.addrs.len() {
            let out = d.run(
                &[
                    "delegate",
                    "--credential",
                    cr.dir.to_str().unwrap(),
                    "--target",
                    RESEARCHER,
                    "--audience",
                    "crm",
                    "--justification",
                    "again",
                    "--scope",
                    READ[0],
                ],
                &brokers.admin_socket(i),
                0,
                &brokers.url(i),
            );
            let err = stderr(&out);
            assert!(
                !out.status.success()
                    && out.status.code() != Some(3)
                    && (err.contains("revoked") || err.contains("ended")),
                "revoked planner {} at broker {i} (seed {seed}): {}",
                cr.jti,
                stderr(&out)
            );
        }
    }

    // The trail: every broker verifies the three logs, and every
    // credential a client received is in its task's trace.
    for i in 0..brokers.addrs.len() {
        let out = d.run(
            &["audit", "verify", "-o", "json"],
            &brokers.admin_socket(i),
            0,
            &brokers.url(i),
        );
        assert!(
            out.status.success(),
            "audit verify at broker {i} (seed {seed}): {}",
            stderr(&out)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(
            v["shared_logs"].as_array().map(Vec::len),
            Some(3),
            "broker {i}: {v}"
        );
    }
    for (t, task) in tasks.iter().enumerate() {
        let i = t % brokers.addrs.len();
        let out = d.run(
            &["audit", "trace", &task.id, "--json"],
            &brokers.admin_socket(i),
            0,
            &brokers.url(i),
        );
        assert!(out.status.success(), "trace at {i}: {}", stderr(&out));
        let trace: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        for cr in creds.iter().filter(|cr| cr.task == t) {
            let mut granted = 0;
            count_granted_redeems(&trace, &cr.jti, &mut granted);
            assert!(
                granted >= 1,
                "{} delivered in task {} has no granted redeem in the trail (seed {seed}): {trace}",
                cr.jti,
                task.id
            );
        }
    }

    // No grant used twice: each used grant made exactly one token, and a
    // grant presented again (a new key, so not a replay) is refused.
    let count = |q: &str| -> i64 {
        rt.block_on(async {
            pg.admin("baton")
                .await
                .query_one(q, &[])
                .await
                .unwrap()
                .get(0)
        })
    };
    assert_eq!(
        count("SELECT count(*) FROM tokens"),
        count("SELECT count(*) FROM grants WHERE used_at IS NOT NULL"),
        "one token per used grant (seed {seed})"
    );
    // What each client received is what its grant delivered.
    let delivered = |grant: &str| -> Option<String> {
        rt.block_on(async {
            pg.admin("baton")
                .await
                .query_one(
                    "SELECT (delivery::jsonb) ->> 'jti' FROM grants
                     WHERE digest = encode(sha256(convert_to($1, 'UTF8')), 'hex')",
                    &[&grant],
                )
                .await
                .unwrap()
                .get(0)
        })
    };
    for cr in &creds {
        assert_eq!(
            delivered(&cr.grant).as_deref(),
            Some(cr.jti.as_str()),
            "the grant of {} delivered something else (seed {seed})",
            cr.jti
        );
    }
    // Presented again with a new key (not a replay): refused. (Only live
    // ones: a revoked task's grants are refused for that first.)
    for cr in creds.iter().filter(|c| !c.revoked).step_by(2) {
        let (node, as_id) = if cr.researcher {
            (1, RESEARCHER)
        } else {
            (0, PLANNER)
        };
        let out = d.run(
            &[
                "grant",
                "redeem",
                "--grant",
                &cr.grant,
                "--spiffe-id",
                as_id,
                "--out",
                w.c.path("c-again").to_str().unwrap(),
            ],
            &brokers.admin_socket(0),
            node,
            "",
        );
        assert!(
            !out.status.success() && stderr(&out).contains("already redeemed"),
            "grant of {} redeemed twice (seed {seed}): {}",
            cr.jti,
            stderr(&out)
        );
    }
    // Two join tokens, each used once; the second node's is refused now.
    assert_eq!(
        count("SELECT count(*) FROM join_tokens WHERE used_at IS NOT NULL"),
        2
    );
    let mut again = w.c.agent_command(
        &w.c.path("node3"),
        &w.c.path("node3.sock"),
        Some(&node2_token),
    );
    again.args([
        "--broker-url",
        &format!("{},{}", brokers.url(1), brokers.url(2)),
    ]);
    let mut p = Proc::spawn("agent", again, w.c.path("node3.log"));
    let status = wait_for(
        "the node daemon with a used join token to exit",
        Duration::from_secs(60),
        || p.child.try_wait().unwrap(),
    );
    assert!(
        !status.success() && p.log_text().contains("already used"),
        "a used join token attested again (seed {seed}): {}",
        p.log_text()
    );
}

/// Counts the granted `redeemed` events of `jti` anywhere in a trace's JSON.
fn count_granted_redeems(v: &serde_json::Value, jti: &str, n: &mut usize) {
    match v {
        serde_json::Value::Object(m) => {
            if m.get("type").and_then(|k| k.as_str()) == Some("redeemed")
                && m.get("decision").and_then(|d| d.as_str()) == Some("granted")
                && m.get("token_jti").and_then(|j| j.as_str()) == Some(jti)
            {
                *n += 1;
            }
            for x in m.values() {
                count_granted_redeems(x, jti, n);
            }
        }
        serde_json::Value::Array(a) => {
            for x in a {
                count_granted_redeems(x, jti, n);
            }
        }
        _ => {}
    }
}
