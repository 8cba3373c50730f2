//! The bounded chaos test of the durable revocation design: task starts,
//! hops, redeems, tool calls, task ends and revocations run in a loop while
//! Redis is flushed, killed and restarted at random moments. At the end,
//! with Redis back: every revoked credential is refused as revoked at every
//! follower, every unrevoked one is accepted, the audit log verifies, and
//! every credential the client received has its audit record.
//!
//! Seeded: the seed is printed; `BATON_CHAOS_SEED=<n>` replays a run (the
//! operations replay, the moments the processes see them need not).
//! `BATON_CHAOS_SECS` changes the loop's length (default 25 s).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::delegation::{PLANNER, RESEARCHER, TOOL, World, claims};
use crate::harness::{Proc, Redis, baton, wait_for};

const READ: &[&str] = &["tool:crm.search:read", "dataset:crm:read"];
/// Enough tasks to exercise cascades; few enough that the final checks
/// (one call per credential per follower) stay bounded.
const MAX_TASKS: usize = 16;
/// The index of the follower on the broker's own feed in `followers`.
const BROKER_FEED: usize = 2;

/// xorshift64*: tiny, seeded, good enough to pick operations.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }

    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-enough in 0..n (n > 0).
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    pub(crate) fn pick<T: Copy>(&mut self, from: &[T]) -> Option<T> {
        (!from.is_empty()).then(|| from[self.below(from.len())])
    }
}

pub(crate) fn seed() -> u64 {
    std::env::var("BATON_CHAOS_SEED")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        })
}

/// A credential the client received.
struct Cred {
    task: usize,
    researcher: bool,
    /// The planner credential this one was delegated from.
    parent: Option<usize>,
    dir: PathBuf,
    jti: String,
    revoked: bool,
    /// By follower (the index in `followers`): that follower refused it as
    /// revoked, so it may not accept it again. Followers lag each other.
    seen_refused: [bool; 3],
}

struct Task {
    id: String,
    ended: bool,
}

/// Another example tool server of the same world, following `redis` (or,
/// without it, the broker's own feed).
fn follower(w: &World, name: &str, redis: Option<&str>) -> (Proc, String) {
    let c = &w.c;
    let ready = c.path(&format!("{name}.addr"));
    let mut cmd = baton();
    cmd.args([
        "example",
        "tool-server",
        "--audience",
        "crm",
        "--spiffe-id",
        TOOL,
    ]);
    if let Some(url) = redis {
        cmd.args(["--redis", url, "--stale-after", "2s"]);
    }
    cmd.arg("--socket")
        .arg(c.agent_socket())
        .arg("--broker-url")
        .arg(format!("https://{}", c.broker_addr))
        .arg("--spool")
        .arg(c.path(&format!("{name}-spool")))
        .arg("--ready-file")
        .arg(&ready);
    let mut p = Proc::spawn("tool-server", cmd, c.path(&format!("{name}.log")));
    let addr = wait_for("second tool server ready", Duration::from_secs(60), || {
        assert!(p.is_running(), "{name} exited: {}", p.log_text());
        std::fs::read_to_string(&ready).ok()
    });
    (p, format!("https://{addr}"))
}

pub(crate) fn call(w: &World, url: &str, cred: &Path) -> Output {
    w.run(&[
        "example",
        "call",
        "--credential",
        cred.to_str().unwrap(),
        "--url",
        url,
        "--tool",
        "crm.search",
        "--input",
        r#"{"q":"acme"}"#,
    ])
}

pub(crate) fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).trim().to_owned()
}

/// Got past the revocation check: allowed, or (a planner) refused by the
/// example policy, which lets only researchers search.
pub(crate) fn passes_revocation(out: &Output) -> bool {
    let err = stderr(out);
    out.status.success() || (err.contains("policy_denied") && !err.contains("revoked"))
}

pub(crate) fn refused_revoked(out: &Output) -> bool {
    !out.status.success() && stderr(out).contains("revoked")
}

fn redeem(w: &World, grant: &str, as_id: &str, dir: &str) -> (PathBuf, String) {
    let path = w.redeem(grant, as_id, dir);
    let jti = claims(&path)["jti"].as_str().unwrap().to_owned();
    (path, jti)
}

/// Polls (30 s) until `url` treats the credential in `dir` as it must once
/// everything has settled: refused as revoked when `revoked`, else
/// accepted (a researcher) or past the revocation check (a planner, whom
/// the example policy refuses).
pub(crate) fn settles(
    w: &World,
    url: &str,
    dir: &Path,
    revoked: bool,
    researcher: bool,
    what: &str,
) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = call(w, url, dir);
        let ok = if revoked {
            refused_revoked(&out)
        } else if researcher {
            out.status.success()
        } else {
            passes_revocation(&out)
        };
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {}",
            stderr(&out)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn revoked_ids(v: &serde_json::Value) -> usize {
    v["revoked"].as_array().map_or(0, Vec::len)
}

/// A revocation made while Redis is down cannot have reached it: the
/// command must say propagation is behind, not claim completion.
fn behind_while_down(v: &serde_json::Value, redis_up: bool, n: usize) {
    if !redis_up {
        assert_eq!(v["propagation"]["complete"], false, "op {n}: {v}");
    }
}

/// The Redis under attack and whether it is running.
struct Target {
    redis: Redis,
    up: bool,
}

/// Flushes, kills and restarts Redis at random moments until `stop`,
/// concurrently with the operations (so faults land mid-hop, mid-redeem
/// and mid-relay). Returns what it did.
fn chaos_monkey(
    target: Arc<Mutex<Target>>,
    stop: Arc<AtomicBool>,
    seed: u64,
) -> std::thread::JoinHandle<BTreeMap<&'static str, usize>> {
    std::thread::spawn(move || {
        let mut rng = Rng::new(seed ^ 0x9E37_79B9_7F4A_7C15);
        let mut did: BTreeMap<&'static str, usize> = BTreeMap::new();
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100 + rng.below(1100) as u64));
            let mut t = target.lock().unwrap();
            let roll = rng.below(10);
            let what = match (t.up, roll) {
                (true, 0..=3) => {
                    t.redis.cli(&["FLUSHALL"]);
                    "flushall"
                }
                (true, 4..=6) => {
                    t.redis.stop();
                    t.up = false;
                    "kill"
                }
                (true, 7) => {
                    // Down and straight back up, empty.
                    t.redis.restart();
                    "restart"
                }
                (false, 0..=5) => {
                    t.redis.restart();
                    t.up = true;
                    "restart"
                }
                _ => "wait",
            };
            *did.entry(what).or_default() += 1;
        }
        did
    })
}

#[test]
fn chaos_hops_calls_and_revocations_while_redis_is_flushed_killed_and_restarted() {
    let seed = seed();
    eprintln!("chaos seed {seed} (replay with BATON_CHAOS_SEED={seed})");
    let secs: u64 = std::env::var("BATON_CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(25);
    let mut rng = Rng::new(seed);

    let redis = Redis::start();
    let url = redis.url.clone();
    let w = World::start_with(Some(&url));
    let (_second, second_url) = follower(&w, "tool2", Some(&url));
    // A verifier without Redis follows the broker's own feed.
    let (_third, third_url) = follower(&w, "tool3", None);
    let followers = [w.tool_url.clone(), second_url, third_url];

    let target = Arc::new(Mutex::new(Target { redis, up: true }));
    let stop = Arc::new(AtomicBool::new(false));
    let monkey = chaos_monkey(target.clone(), stop.clone(), seed);

    let mut tasks: Vec<Task> = Vec::new();
    let mut creds: Vec<Cred> = Vec::new();
    let mut ops: BTreeMap<&str, usize> = BTreeMap::new();
    let mut calls: BTreeMap<String, usize> = BTreeMap::new();
    let mut n = 0usize;
    let deadline = Instant::now() + Duration::from_secs(secs);

    while Instant::now() < deadline {
        n += 1;
        let live_planners: Vec<usize> = (0..creds.len())
            .filter(|&i| !creds[i].researcher && !creds[i].revoked && !tasks[creds[i].task].ended)
            .collect();
        let live_researchers: Vec<usize> = (0..creds.len())
            .filter(|&i| creds[i].researcher && !creds[i].revoked)
            .collect();
        let open_tasks: Vec<usize> = (0..tasks.len()).filter(|&t| !tasks[t].ended).collect();
        let op = match rng.below(100) {
            _ if tasks.len() < 2 => "start",
            0..=14 if tasks.len() < MAX_TASKS => "start",
            0..=39 if !live_planners.is_empty() => "hop",
            // Revocations keep a live population, so the end checks
            // both ways.
            40..=51 if live_researchers.len() > 4 => "revoke-credential",
            52..=57 if live_planners.len() > 3 => "revoke-subtree",
            58..=62 if open_tasks.len() > 3 => "task-end",
            _ => "call",
        };
        *ops.entry(op).or_default() += 1;
        // Issuance and revocation commit to the datastore only: each of
        // these succeeds whether Redis is up, empty or gone (`w.ok` and
        // `w.json` assert it).
        match op {
            "start" => {
                let (task, grant) = w.start_task(READ, "2", "10m", "read");
                let t = tasks.len();
                tasks.push(Task {
                    id: task,
                    ended: false,
                });
                let (dir, jti) = redeem(&w, &grant, PLANNER, &format!("chaos-p{n}"));
                creds.push(Cred {
                    task: t,
                    researcher: false,
                    parent: None,
                    dir,
                    jti,
                    revoked: false,
                    seen_refused: [false; 3],
                });
            }
            "hop" => {
                let p = rng.pick(&live_planners).unwrap();
                let hop = w.delegate(&creds[p].dir, RESEARCHER, READ, &[]);
                assert!(
                    hop.status.success(),
                    "op {n}: hop from a live planner (seed {seed}): {}",
                    stderr(&hop)
                );
                let g: serde_json::Value = serde_json::from_slice(&hop.stdout).unwrap();
                let (dir, jti) = redeem(
                    &w,
                    g["grant"].as_str().unwrap(),
                    RESEARCHER,
                    &format!("chaos-r{n}"),
                );
                creds.push(Cred {
                    task: creds[p].task,
                    researcher: true,
                    parent: Some(p),
                    dir,
                    jti,
                    revoked: false,
                    seen_refused: [false; 3],
                });
            }
            "call" => {
                let i = rng.below(creds.len());
                let f = rng.below(followers.len());
                let url = &followers[f];
                let out = call(&w, url, &creds[i].dir);
                let outcome = if passes_revocation(&out) {
                    "accepted"
                } else if refused_revoked(&out) {
                    "refused-revoked"
                } else {
                    "refused-other"
                };
                *calls.entry(format!("{outcome}@{f}")).or_default() += 1;
                // While Redis is down or being re-seeded a follower may
                // refuse anything (it fails closed); it must never accept a
                // credential it already refused as revoked, nor call an
                // unrevoked one revoked.
                if passes_revocation(&out) {
                    assert!(
                        !creds[i].seen_refused[f],
                        "op {n}: {} accepted at {url} after it was refused as revoked (seed {seed})",
                        creds[i].jti
                    );
                }
                // The follower on the broker's own feed does not depend on
                // Redis: no fault there may refuse a call for another
                // reason (but a busy broker may let its feed go stale).
                let stale = stderr(&out).contains("revocation_stale");
                assert!(
                    f != BROKER_FEED || outcome != "refused-other" || stale,
                    "op {n}: {} refused at the broker-feed follower while Redis was faulted: {} (seed {seed})",
                    creds[i].jti,
                    stderr(&out)
                );
                if refused_revoked(&out) {
                    assert!(
                        creds[i].revoked,
                        "op {n}: {} never revoked, refused as revoked at {url}: {} (seed {seed})",
                        creds[i].jti,
                        stderr(&out)
                    );
                    creds[i].seen_refused[f] = true;
                }
            }
            // The monkey waits while a revocation runs, so its answer can
            // be held against the state Redis was in.
            "revoke-credential" => {
                let r = rng.pick(&live_researchers).unwrap();
                let t = target.lock().unwrap();
                let v = w.json(&[
                    "revoke",
                    "credential",
                    &creds[r].jti,
                    "--reason",
                    "chaos",
                    "-o",
                    "json",
                ]);
                behind_while_down(&v, t.up, n);
                drop(t);
                // The researcher's token and its certificate.
                assert_eq!(revoked_ids(&v), 2, "op {n}: {v}");
                creds[r].revoked = true;
            }
            "revoke-subtree" => {
                let p = rng.pick(&live_planners).unwrap();
                let t = target.lock().unwrap();
                let v = w.json(&[
                    "revoke",
                    "subtree",
                    &creds[p].jti,
                    "--reason",
                    "chaos",
                    "-o",
                    "json",
                ]);
                behind_while_down(&v, t.up, n);
                drop(t);
                let text = v.to_string();
                assert!(text.contains(&creds[p].jti), "op {n}: root missing: {v}");
                for c in creds.iter_mut() {
                    if c.parent == Some(p) {
                        assert!(text.contains(&c.jti), "op {n}: child missing: {v}");
                        c.revoked = true;
                    }
                }
                creds[p].revoked = true;
            }
            "task-end" => {
                let t = rng.pick(&open_tasks).unwrap();
                let guard = target.lock().unwrap();
                let out = w.ok(&["task", "end", &tasks[t].id]);
                assert!(
                    guard.up || out.contains("recorded; propagating"),
                    "op {n}: task end with Redis down: {out}"
                );
                drop(guard);
                tasks[t].ended = true;
                for c in creds.iter_mut().filter(|c| c.task == t) {
                    c.revoked = true;
                }
            }
            other => unreachable!("{other}"),
        }
    }
    stop.store(true, Ordering::SeqCst);
    let monkey = monkey.join().unwrap();
    eprintln!(
        "chaos: {n} operations in {secs} s: {ops:?}; calls {calls:?}; redis {monkey:?}; {} tasks, {} credentials, {} revoked",
        tasks.len(),
        creds.len(),
        creds.iter().filter(|c| c.revoked).count()
    );

    // Redis back; a credential issued now is the freshness probe: once it
    // works at a follower, that follower has resynced.
    {
        let mut t = target.lock().unwrap();
        if !t.up {
            t.redis.restart();
            t.up = true;
        }
    }
    let (task, grant) = w.start_task(READ, "2", "10m", "read");
    let t = tasks.len();
    tasks.push(Task {
        id: task,
        ended: false,
    });
    let (pdir, pjti) = redeem(&w, &grant, PLANNER, "chaos-final-p");
    let hop = w.delegate(&pdir, RESEARCHER, READ, &[]);
    assert!(hop.status.success(), "{}", stderr(&hop));
    let g: serde_json::Value = serde_json::from_slice(&hop.stdout).unwrap();
    let (rdir, rjti) = redeem(
        &w,
        g["grant"].as_str().unwrap(),
        RESEARCHER,
        "chaos-final-r",
    );
    let p = creds.len();
    for (researcher, parent, dir, jti) in [(false, None, pdir, pjti), (true, Some(p), rdir, rjti)] {
        creds.push(Cred {
            task: t,
            researcher,
            parent,
            dir,
            jti,
            revoked: false,
            seen_refused: [false; 3],
        });
    }
    let probe = &creds[creds.len() - 1].dir;
    for url in &followers {
        wait_for(
            &format!("{url} is fresh again (seed {seed})"),
            Duration::from_secs(60),
            || call(&w, url, probe).status.success().then_some(()),
        );
    }

    for c in &creds {
        for url in &followers {
            // Polled: a follower that just resynced may still be applying
            // the re-seed; the deadline bounds how long it may take.
            let what = format!(
                "{} ({}, revoked: {}) at {url} (seed {seed})",
                c.jti,
                if c.researcher {
                    "researcher"
                } else {
                    "planner"
                },
                c.revoked
            );
            settles(&w, url, &c.dir, c.revoked, c.researcher, &what);
        }
    }

    let v = w.ok(&["audit", "verify"]);
    assert!(v.contains("verified"), "{v}");
    for (t, task) in tasks.iter().enumerate() {
        let trace = w.json(&["audit", "trace", &task.id, "--json"]).to_string();
        for c in creds.iter().filter(|c| c.task == t) {
            assert!(
                trace.contains(&c.jti),
                "{} received in task {} has no audit record (seed {seed}): {trace}",
                c.jti,
                task.id
            );
        }
    }
}
