//! `baton-bench revocation`: the Redis revocation backend against its
//! targets, on a private `redis-server` the bench starts (free port, temp
//! dir, no persistence) and kills at exit.
//!
//! 1. Propagation: register a credential, `revoke(Target::Credential)`, and
//!    time from just before the revoke call until the id is in the local set
//!    of every follower. Followers are N `FeedHandle`s in this process
//!    (N = 1 and 10), then N `baton-bench revocation-follower` child
//!    processes, each with its own feed, that report over stdout (wall-clock
//!    nanoseconds, shared by processes on one machine) when they see the id.
//!    Peer in the same run: sequential `PING` round trips on the same kind
//!    of connection.
//! 2. Cascade: a task tree of 10,000 credentials (tokens in a fan-out-4
//!    parent tree, plus X509-SVIDs minted under tokens) revoked with
//!    `Target::Task`, and a second such tree with `Target::Subtree(root)`.
//! 3. Memory: `INFO memory` `used_memory` before and after registering the
//!    10,000 credentials of one tree, ÷ 10,000; `MEMORY USAGE` of one record.
//! 4. Commands: `INFO commandstats` calls delta ÷ registrations, and client
//!    round trips (`EVALSHA`/`EVAL` calls) per registration.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use baton_core::{SpiffeId, TaskId};
use baton_revocation::{
    CredKind, CredentialRecord, FeedHandle, FeedOptions, FeedStatus, RedisStore, RevocationFeed,
    RevocationStore, Target, system_now,
};
use redis::Value;

use crate::stats::{cores, micros, percentile, unix_now};

pub(crate) const PREFIX: &str = "bb";
/// How long one revocation may take to reach every follower before it
/// counts as missed.
const SEE_DEADLINE: Duration = Duration::from_secs(2);
/// Poll period of a follower's local set while it waits for an id.
const POLL: Duration = Duration::from_micros(50);
const TARGET_P99_MS: f64 = 10.0;
const TARGET_CASCADE_MS: f64 = 100.0;
const TARGET_BYTES: f64 = 300.0;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Revocations timed per follower configuration.
    #[arg(long, default_value_t = 200)]
    revocations: usize,
    /// Credentials in each cascade tree (and in the memory measurement).
    #[arg(long, default_value_t = 10_000)]
    credentials: usize,
    /// Sequential PING round trips for the peer figure.
    #[arg(long, default_value_t = 5_000)]
    pings: usize,
    /// Follower counts to time.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    followers: Vec<usize>,
    /// Skip the separate-process followers.
    #[arg(long)]
    no_processes: bool,
}

#[derive(Debug, clap::Args)]
pub struct FollowerArgs {
    #[arg(long)]
    url: String,
    #[arg(long, default_value = PREFIX)]
    prefix: String,
}

/// A private `redis-server`, killed on drop.
pub(crate) struct RedisServer {
    port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub(crate) fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let dir = tempfile::tempdir()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting redis-server (is it on PATH?)")?;
        let mut srv = Self {
            port,
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !srv.ping() {
            if let Some(status) = srv.child.try_wait()? {
                bail!("redis-server exited: {status}");
            }
            if Instant::now() > deadline {
                bail!("redis-server did not answer PING within 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(srv)
    }

    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn info_text(v: &Value) -> anyhow::Result<String> {
    match v {
        Value::BulkString(b) => Ok(String::from_utf8_lossy(b).into_owned()),
        Value::VerbatimString { text, .. } => Ok(text.clone()),
        other => Err(anyhow!("unexpected INFO reply {other:?}")),
    }
}

pub(crate) async fn info(s: &RedisStore, section: &str) -> anyhow::Result<String> {
    info_text(&s.raw(redis::cmd("INFO").arg(section)).await?)
}

pub(crate) fn info_field(text: &str, name: &str) -> anyhow::Result<i64> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name}:")))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("INFO has no numeric {name}"))
}

/// `cmdstat_<name>:calls=N,...` lines: (name, calls).
fn commandstats(text: &str) -> Vec<(String, i64)> {
    text.lines()
        .filter_map(|l| {
            let (name, rest) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = rest
                .split(',')
                .find_map(|kv| kv.strip_prefix("calls="))?
                .parse()
                .ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

fn calls(stats: &[(String, i64)], names: &[&str]) -> i64 {
    stats
        .iter()
        .filter(|(n, _)| names.contains(&n.as_str()))
        .map(|(_, c)| c)
        .sum()
}

fn total_calls(stats: &[(String, i64)]) -> i64 {
    stats.iter().map(|(_, c)| c).sum()
}

fn spiffe(path: &str) -> anyhow::Result<SpiffeId> {
    SpiffeId::parse(&format!("spiffe://example.org/{path}")).map_err(|e| anyhow!("{e}"))
}

/// A task tree of `n` credentials: 80% tokens in a fan-out-4 parent tree
/// under `{tag}t00000`, 20% X509-SVIDs each minted under a token; one
/// task, 50 agents, one node.
fn tree(tag: &str, task: &TaskId, n: usize, exp: u64) -> anyhow::Result<Vec<CredentialRecord>> {
    let tokens = (n * 4 / 5).max(1);
    let node = spiffe("node/n1")?;
    let agents = (0..50)
        .map(|a| spiffe(&format!("agent/a{a}")))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (id, kind, parent) = if i < tokens {
            let parent = (i > 0).then(|| format!("{tag}t{:05}", (i - 1) / 4));
            (format!("{tag}t{i:05}"), CredKind::Token, parent)
        } else {
            let j = i - tokens;
            (
                format!("{tag}x{j:05}"),
                CredKind::X509Svid,
                Some(format!("{tag}t{:05}", j % tokens)),
            )
        };
        out.push(CredentialRecord {
            id,
            kind,
            task: Some(task.clone()),
            agent: agents.get(i % 50).cloned(),
            node: Some(node.clone()),
            parent,
            expires_at: exp,
        });
    }
    Ok(out)
}

pub(crate) fn wall_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

pub(crate) async fn wait_fresh(handles: &[FeedHandle]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while handles
        .iter()
        .any(|h| h.status(system_now()) != FeedStatus::Fresh)
    {
        if Instant::now() > deadline {
            bail!("followers not in sync after 10 s");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}

/// Followers of one configuration.
pub(crate) enum Followers {
    InProcess(Vec<FeedHandle>),
    Processes(Vec<ChildFollower>),
}

pub(crate) struct ChildFollower {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Drop for ChildFollower {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Followers {
    pub(crate) fn label(&self) -> String {
        match self {
            Self::InProcess(h) => format!("{} in-process FeedHandle(s)", h.len()),
            Self::Processes(c) => format!("{} follower process(es)", c.len()),
        }
    }

    fn key(&self) -> String {
        match self {
            Self::InProcess(h) => format!("in_process_{}", h.len()),
            Self::Processes(c) => format!("processes_{}", c.len()),
        }
    }

    /// Starts watching for `id` (before the clock starts): in-process, a
    /// blocking poller over the handles; processes are told on stdin.
    pub(crate) fn arm(&mut self, id: &str) -> anyhow::Result<Option<Poller>> {
        match self {
            Self::InProcess(hs) => {
                let hs = hs.clone();
                let id = id.to_owned();
                Ok(Some(tokio::task::spawn_blocking(move || {
                    poll_handles(&hs, &id)
                })))
            }
            Self::Processes(cs) => {
                for c in cs {
                    writeln!(c.stdin, "{id}")?;
                    c.stdin.flush()?;
                }
                Ok(None)
            }
        }
    }

    /// Per follower, wall-clock nanos at which it saw the armed id, or
    /// `None`. The times come from the followers, so reading them late
    /// does not change them.
    pub(crate) async fn seen(
        &mut self,
        poller: Option<Poller>,
    ) -> anyhow::Result<Vec<Option<u128>>> {
        match (self, poller) {
            (Self::InProcess(_), Some(p)) => Ok(p.await?),
            (Self::Processes(cs), _) => {
                let mut out = Vec::with_capacity(cs.len());
                for c in cs.iter_mut() {
                    let mut line = String::new();
                    c.stdout.read_line(&mut line)?;
                    out.push(
                        line.trim()
                            .strip_prefix("seen ")
                            .and_then(|n| n.parse().ok()),
                    );
                }
                Ok(out)
            }
            (Self::InProcess(_), None) => bail!("in-process followers not armed"),
        }
    }
}

pub(crate) type Poller = tokio::task::JoinHandle<Vec<Option<u128>>>;

fn poll_handles(hs: &[FeedHandle], id: &str) -> Vec<Option<u128>> {
    let mut seen: Vec<Option<u128>> = vec![None; hs.len()];
    let deadline = Instant::now() + SEE_DEADLINE;
    while seen.iter().any(Option::is_none) && Instant::now() < deadline {
        let now = system_now();
        for (h, s) in hs.iter().zip(seen.iter_mut()) {
            if s.is_none() && h.contains(id, now) {
                *s = Some(wall_nanos());
            }
        }
        std::thread::sleep(POLL);
    }
    seen
}

pub(crate) fn spawn_children(n: usize, url: &str) -> anyhow::Result<Vec<ChildFollower>> {
    let exe = std::env::current_exe()?;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let mut child = Command::new(&exe)
            .args(["revocation-follower", "--url", url, "--prefix", PREFIX])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().ok_or_else(|| anyhow!("no stdin"))?;
        let stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout"))?;
        out.push(ChildFollower {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        });
    }
    for c in &mut out {
        let mut line = String::new();
        c.stdout.read_line(&mut line)?;
        if line.trim() != "ready" {
            bail!("follower process did not get ready: {line:?}");
        }
    }
    Ok(out)
}

/// The child side: follow the feed, then for each id read on stdin, print
/// `seen <wall nanos>` when it is in the local set (or `missed`).
pub async fn follower(a: FollowerArgs) -> anyhow::Result<()> {
    let h = RevocationFeed::spawn(&a.url, &a.prefix, FeedOptions::default())?;
    wait_fresh(std::slice::from_ref(&h)).await?;
    tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
        let mut out = std::io::stdout().lock();
        writeln!(out, "ready")?;
        out.flush()?;
        for line in std::io::stdin().lock().lines() {
            let line = line?;
            let id = line.trim();
            let seen = poll_handles(std::slice::from_ref(&h), id);
            match seen.first().copied().flatten() {
                Some(t) => writeln!(out, "seen {t}")?,
                None => writeln!(out, "missed")?,
            }
            out.flush()?;
        }
        Ok(())
    })
    .await?
}

struct Propagation {
    label: String,
    key: String,
    all_p50: Duration,
    all_p99: Duration,
    all_max: Duration,
    each_p50: Duration,
    each_p99: Duration,
    call_p50: Duration,
    call_p99: Duration,
    missed: usize,
}

async fn propagation(
    s: &RedisStore,
    mut f: Followers,
    tag: &str,
    count: usize,
) -> anyhow::Result<Propagation> {
    let now = system_now();
    let task = TaskId::from_random([0x70; 16]);
    let agent = spiffe("agent/prop")?;
    let mut all = Vec::with_capacity(count);
    let mut each = Vec::with_capacity(count * 10);
    let mut call = Vec::with_capacity(count);
    let mut missed = 0;
    for i in 0..count {
        let id = format!("{tag}p{i:05}");
        s.register(
            &CredentialRecord {
                id: id.clone(),
                kind: CredKind::Token,
                task: Some(task.clone()),
                agent: Some(agent.clone()),
                node: None,
                parent: None,
                expires_at: now + 3600,
            },
            now,
        )
        .await?;
        // Let the followers settle into their blocking reads between runs.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let poller = f.arm(&id)?;
        let t0 = wall_nanos();
        let c0 = Instant::now();
        s.revoke(&Target::Credential(id.clone()), "bench", now)
            .await?;
        let took = c0.elapsed();
        let seen = f.seen(poller).await?;
        call.push(took);
        if seen.iter().any(Option::is_none) {
            missed += 1;
            continue;
        }
        let lat: Vec<Duration> = seen
            .iter()
            .flatten()
            .map(|t| Duration::from_nanos(u64::try_from(t.saturating_sub(t0)).unwrap_or(0)))
            .collect();
        all.push(lat.iter().copied().max().unwrap_or_default());
        each.extend(lat);
    }
    all.sort();
    each.sort();
    call.sort();
    Ok(Propagation {
        label: f.label(),
        key: f.key(),
        all_p50: percentile(&all, 50.0),
        all_p99: percentile(&all, 99.0),
        all_max: all.last().copied().unwrap_or_default(),
        each_p50: percentile(&each, 50.0),
        each_p99: percentile(&each, 99.0),
        call_p50: percentile(&call, 50.0),
        call_p99: percentile(&call, 99.0),
        missed,
    })
}

pub(crate) fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

async fn memory_usage(s: &RedisStore, key: &str) -> anyhow::Result<i64> {
    match s.raw(redis::cmd("MEMORY").arg("USAGE").arg(key)).await? {
        Value::Int(n) => Ok(n),
        other => Err(anyhow!("MEMORY USAGE {key}: {other:?}")),
    }
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let srv = RedisServer::start()?;
    let url = srv.url();
    let s = RedisStore::connect(&url, PREFIX).await?;
    let now = system_now();
    s.seed(&[], now).await?;
    let version = info(&s, "server")
        .await?
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned();
    let n = a.credentials;

    // Peer: sequential PING round trips on the store's own connection.
    let ping = redis::cmd("PING");
    for _ in 0..200 {
        s.raw(&ping).await?;
    }
    let mut pings = Vec::with_capacity(a.pings);
    let t = Instant::now();
    for _ in 0..a.pings {
        let t1 = Instant::now();
        s.raw(&ping).await?;
        pings.push(t1.elapsed());
    }
    let ping_rate = a.pings as f64 / t.elapsed().as_secs_f64();
    pings.sort();
    let ping_p50 = percentile(&pings, 50.0);
    let ping_p99 = percentile(&pings, 99.0);
    println!(
        "peer: redis {version} PING, sequential round trips: {ping_rate:.0}/s, p50 {:.1} µs, p99 {:.1} µs",
        micros(ping_p50),
        micros(ping_p99)
    );

    // Memory and commands: one tree of n credentials.
    let task_a = TaskId::from_random([0xa1; 16]);
    let recs_a = tree("a", &task_a, n, now + 3600)?;
    let mem0 = info_field(&info(&s, "memory").await?, "used_memory")?;
    let cs0 = commandstats(&info(&s, "commandstats").await?);
    let t = Instant::now();
    for r in &recs_a {
        s.register(r, now).await?;
    }
    let reg_time = t.elapsed();
    let cs1 = commandstats(&info(&s, "commandstats").await?);
    let mem1 = info_field(&info(&s, "memory").await?, "used_memory")?;
    // The second INFO commandstats sees the first one (and the memory INFO
    // in between); take both out.
    let cmds = total_calls(&cs1) - total_calls(&cs0) - 2;
    let scripts = calls(&cs1, &["evalsha", "eval"]) - calls(&cs0, &["evalsha", "eval"]);
    let cmds_per_reg = cmds as f64 / n as f64;
    let trips_per_reg = scripts as f64 / n as f64;
    let bytes_per_cred = (mem1 - mem0) as f64 / n as f64;
    let rec_token = memory_usage(&s, &format!("{{{PREFIX}}}:cred:at05000")).await?;
    let rec_x509 = memory_usage(&s, &format!("{{{PREFIX}}}:cred:ax00000")).await?;
    let reg_us = micros(reg_time) / n as f64;
    println!(
        "registration: {n} sequential in {:.0} ms ({reg_us:.1} µs each = {:.2}× a PING round trip)",
        ms(reg_time),
        reg_us / micros(ping_p50)
    );
    println!(
        "commands per registration (INFO commandstats delta ÷ {n}): {cmds_per_reg:.2}; client round trips (EVALSHA/EVAL) per registration: {trips_per_reg:.2}"
    );
    println!(
        "memory per live credential (used_memory delta ÷ {n}, record + index sets): {bytes_per_cred:.0} B = {:.2}× the 300 B target; MEMORY USAGE of one token record {rec_token} B, of one X509-SVID record {rec_x509} B",
        bytes_per_cred / TARGET_BYTES
    );

    // Cascade 1: Target::Task over tree a.
    let t = Instant::now();
    let out = s
        .revoke(&Target::Task(task_a.clone()), "bench", now)
        .await?;
    let cascade_task = t.elapsed();
    if out.len() != n {
        bail!("task revocation covered {} of {n}", out.len());
    }
    let mem2 = info_field(&info(&s, "memory").await?, "used_memory")?;
    let bytes_per_revoked = (mem2 - mem1) as f64 / n as f64;
    // Cascade 2: Target::Subtree(root) over a second tree.
    let task_b = TaskId::from_random([0xb2; 16]);
    for r in &tree("b", &task_b, n, now + 3600)? {
        s.register(r, now).await?;
    }
    let t = Instant::now();
    let out = s
        .revoke(&Target::Subtree("bt00000".into()), "bench", now)
        .await?;
    let cascade_subtree = t.elapsed();
    if out.len() != n {
        bail!("subtree revocation covered {} of {n}", out.len());
    }
    println!(
        "cascade, {n} credentials: Target::Task {:.1} ms ({:.2}× the 100 ms target), Target::Subtree(root) {:.1} ms ({:.2}×); used_memory grows {bytes_per_revoked:.0} B per revoked id",
        ms(cascade_task),
        ms(cascade_task) / TARGET_CASCADE_MS,
        ms(cascade_subtree),
        ms(cascade_subtree) / TARGET_CASCADE_MS
    );

    // Propagation.
    let mut props = Vec::new();
    for &k in &a.followers {
        let hs = (0..k)
            .map(|_| RevocationFeed::spawn(&url, PREFIX, FeedOptions::default()))
            .collect::<Result<Vec<_>, _>>()?;
        wait_fresh(&hs).await?;
        props.push(
            propagation(
                &s,
                Followers::InProcess(hs),
                &format!("i{k}"),
                a.revocations,
            )
            .await?,
        );
    }
    if !a.no_processes {
        for &k in &a.followers {
            let cs = spawn_children(k, &url)?;
            props.push(
                propagation(
                    &s,
                    Followers::Processes(cs),
                    &format!("c{k}"),
                    a.revocations,
                )
                .await?,
            );
        }
    }
    for p in &props {
        println!(
            "propagation to {} ({} revocations): all followers p50 {:.2} ms, p99 {:.2} ms ({:.2}× the 10 ms target), max {:.2} ms; each follower p50 {:.2} ms, p99 {:.2} ms; revoke call p50 {:.2} ms, p99 {:.2} ms; p50 = {:.1} PING round trips; missed {}",
            p.label,
            a.revocations,
            ms(p.all_p50),
            ms(p.all_p99),
            ms(p.all_p99) / TARGET_P99_MS,
            ms(p.all_max),
            ms(p.each_p50),
            ms(p.each_p99),
            ms(p.call_p50),
            ms(p.call_p99),
            micros(p.all_p50) / micros(ping_p50),
            p.missed
        );
    }

    let prop_json: serde_json::Map<String, serde_json::Value> = props
        .iter()
        .map(|p| {
            (
                p.key.clone(),
                serde_json::json!({
                    "followers": p.label,
                    "all_p50_ms": ms(p.all_p50),
                    "all_p99_ms": ms(p.all_p99),
                    "all_max_ms": ms(p.all_max),
                    "p99_over_target": ms(p.all_p99) / TARGET_P99_MS,
                    "each_p50_ms": ms(p.each_p50),
                    "each_p99_ms": ms(p.each_p99),
                    "revoke_call_p50_ms": ms(p.call_p50),
                    "revoke_call_p99_ms": ms(p.call_p99),
                    "p50_over_ping_p50": micros(p.all_p50) / micros(ping_p50),
                    "missed": p.missed,
                }),
            )
        })
        .collect();
    let json = serde_json::json!({
        "bench": "revocation",
        "unix_time": unix_now(),
        "nproc": cores(),
        "redis_version": version,
        "revocations": a.revocations,
        "credentials": n,
        "ping": {
            "per_s": ping_rate,
            "p50_us": micros(ping_p50),
            "p99_us": micros(ping_p99),
        },
        "propagation": prop_json,
        "cascade_task_ms": ms(cascade_task),
        "cascade_subtree_ms": ms(cascade_subtree),
        "cascade_task_over_target": ms(cascade_task) / TARGET_CASCADE_MS,
        "cascade_subtree_over_target": ms(cascade_subtree) / TARGET_CASCADE_MS,
        "bytes_per_live_credential": bytes_per_cred,
        "bytes_over_target": bytes_per_cred / TARGET_BYTES,
        "memory_usage_token_record": rec_token,
        "memory_usage_x509_record": rec_x509,
        "bytes_per_revoked_id": bytes_per_revoked,
        "commands_per_registration": cmds_per_reg,
        "round_trips_per_registration": trips_per_reg,
        "registration_us": reg_us,
    });
    println!("{json}");
    drop(srv);
    Ok(())
}
