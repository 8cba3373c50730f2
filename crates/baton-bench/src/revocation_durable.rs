//! `baton-bench revocation-durable`: revocation through the broker, with
//! the datastore as the source of truth and Redis as the deny set the
//! outbox relay publishes to (issue 10).
//!
//! A private `redis-server` (as in `revocation`) and a broker run by
//! `baton_broker::run` in this process, configured as `baton broker
//! --redis` is (file-backed datastore and audit log in a temp dir, the
//! relay spawned by the broker itself). Credentials are minted the way
//! agents get them: hops (`POST /v1/delegate` + `POST /v1/node/redeem`)
//! in one task; revocations go through the admin API.
//!
//! 1. Memory: `used_memory` before and after the hops, ÷ credentials
//!    registered (live: should be ~0, Redis holds none); and before and
//!    after the cascade, ÷ ids it revoked; and after a rebuild from empty,
//!    ÷ ids re-seeded (deny set only, no stream entries).
//! 2. Propagation: `revoke credential <jti>` through the admin API, timed
//!    from just before the call until 1 and 10 `revocation-follower` child
//!    processes (each a `RevocationFeed` on Redis) have the id; the same
//!    for one in-process `BrokerFeed` (the broker's own feed, no Redis).
//! 3. Cascade: `revoke task` of the task with every credential of the
//!    hops, timed until an in-process `RevocationFeed` and a `BrokerFeed`
//!    hold every id.
//! 4. Rebuild: `FLUSHALL` with every revoked id still in force, timed
//!    until the epoch is back, the deny set is whole and the follower has
//!    resynced to the new epoch.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton_broker::RevocationBackend;
use baton_ca::WorkloadKey;
use baton_core::api::{
    DelegateRequest, HandoffGrant, RedeemRequest, StartTaskResponse, TaskCredential,
};
use baton_core::{Purpose, Scope, SpiffeId, TaskId};
use baton_revocation::{
    FeedHandle, FeedOptions, FeedStatus, RedisConfig, RedisStore, RevocationFeed, system_now,
};
use baton_tls::ClientIdentity;
use baton_verify::BrokerFeed;
use futures::StreamExt;
use redis::Value;
use serde_json::json;

use crate::cluster::{self, Broker};
use crate::delegation::post;
use crate::revocation::{
    Followers, PREFIX, RedisServer, info, info_field, ms, spawn_children, wait_fresh, wall_nanos,
};
use crate::stats::{cores, percentile, unix_now};

const TRUST_DOMAIN: &str = "example.org";
const PLANNER: &str = "/agents/planner";
const RESEARCHER: &str = "/agents/researcher";
const PURPOSE: &str = "support.case-research";
const SCOPE: &[&str] = &["tool:crm.search:read", "dataset:crm:read"];
const AUDIENCE: &str = "crm";

/// Targets from issue 10.
const TARGET_LIVE_BYTES: f64 = 120.0;
const TARGET_REVOKED_BYTES: f64 = 200.0;
const TARGET_CASCADE_MS: f64 = 100.0;
/// Deadline for any one thing the bench waits for.
const DEADLINE: Duration = Duration::from_secs(120);

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Hops in the cascade task (each registers three credentials: the
    /// grant, the researcher's token and its certificate; 3,700 hops leave
    /// ~10,000 live after the propagation rows revoked theirs).
    #[arg(long, default_value_t = 3_700)]
    hops: usize,
    /// Hops run at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Revocations timed per follower configuration.
    #[arg(long, default_value_t = 100)]
    revocations: usize,
    /// Follower process counts to time.
    #[arg(long, value_delimiter = ',', default_value = "1,10")]
    followers: Vec<usize>,
    /// Hops in further tasks, revoked before the rebuild, so the rebuild
    /// re-seeds more ids (each task takes up to `--hops`).
    #[arg(long, default_value_t = 0)]
    rebuild_hops: usize,
}

/// A started task the bench delegates in.
struct TaskCtx {
    id: TaskId,
    holder: reqwest::Client,
    delegate: DelegateRequest,
}

struct Ctx {
    broker: Broker,
    node: reqwest::Client,
    node_identity: ClientIdentity,
    researcher: SpiffeId,
    planner: SpiffeId,
    url: String,
}

async fn start_task(c: &Ctx) -> anyhow::Result<TaskCtx> {
    let scope = Scope::parse(SCOPE)?;
    let purpose: Purpose = PURPOSE.parse()?;
    let started: StartTaskResponse = c
        .broker
        .start_read_task(&c.planner, &purpose, &scope, AUDIENCE)
        .await?;
    let key = WorkloadKey::generate()?;
    let cred: TaskCredential = post(
        &c.node,
        &format!("{}/v1/node/redeem", c.url),
        &RedeemRequest {
            grant: started.grant.grant,
            spiffe_id: c.planner.clone(),
            csr_der: key.csr_der(&c.planner)?,
        },
    )
    .await?;
    let holder = c
        .broker
        .node_client(ClientIdentity::new(cred.cert_chain_der, key.pkcs8_der())?)?;
    Ok(TaskCtx {
        id: started.task_id,
        holder,
        delegate: DelegateRequest {
            token: cred.token,
            target: c.researcher.clone(),
            scope,
            purpose,
            audience: vec![AUDIENCE.into()],
            justification: "look up the customer's open cases".into(),
            ttl_secs: None,
        },
    })
}

fn jti(token: &str) -> anyhow::Result<String> {
    let payload = token
        .split('.')
        .nth(1)
        .ok_or_else(|| anyhow!("token is not a JWT"))?;
    let claims: serde_json::Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload)?)?;
    claims
        .get("jti")
        .and_then(|v| v.as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("token has no jti"))
}

/// `n` hops in `t`, `conc` at once; the researcher tokens' ids.
async fn hops(c: &Ctx, t: &TaskCtx, n: usize, conc: usize) -> anyhow::Result<Vec<String>> {
    let delegate_url = format!("{}/v1/delegate", c.url);
    let redeem_url = format!("{}/v1/node/redeem", c.url);
    let one = |_: usize| {
        let (delegate_url, redeem_url) = (&delegate_url, &redeem_url);
        async move {
            let csr = WorkloadKey::generate()?.csr_der(&c.researcher)?;
            let grant: HandoffGrant = post(&t.holder, delegate_url, &t.delegate).await?;
            let cred: TaskCredential = post(
                &c.node,
                redeem_url,
                &RedeemRequest {
                    grant: grant.grant,
                    spiffe_id: c.researcher.clone(),
                    csr_der: csr,
                },
            )
            .await?;
            jti(cred.token.expose())
        }
    };
    futures::stream::iter(0..n)
        .map(one)
        .buffer_unordered(conc.max(1))
        .collect::<Vec<anyhow::Result<String>>>()
        .await
        .into_iter()
        .collect()
}

async fn revoke(c: &Ctx, target: serde_json::Value) -> anyhow::Result<serde_json::Value> {
    c.broker
        .admin_post(
            "/v1/admin/revoke",
            &json!({"target": target, "reason": "bench"}),
        )
        .await
}

fn revoked_ids(reply: &serde_json::Value) -> anyhow::Result<Vec<String>> {
    reply
        .get("revoked")
        .and_then(|v| v.as_array())
        .ok_or_else(|| anyhow!("revoke reply has no revoked list: {reply}"))?
        .iter()
        .map(|r| {
            r.get("id")
                .and_then(|v| v.as_str())
                .map(str::to_owned)
                .ok_or_else(|| anyhow!("revoked entry without id"))
        })
        .collect()
}

fn propagated(reply: &serde_json::Value) -> bool {
    reply
        .pointer("/propagation/complete")
        .and_then(|v| v.as_bool())
        .unwrap_or(false)
}

async fn used_memory(s: &RedisStore) -> anyhow::Result<i64> {
    info_field(&info(s, "memory").await?, "used_memory")
}

/// The stream's `MEMORY USAGE` (every entry sampled) and the normal
/// clients' buffers, for the breakdown of the cascade's memory.
async fn memory_parts(s: &RedisStore) -> anyhow::Result<(i64, i64)> {
    let stream = match s
        .raw(
            redis::cmd("MEMORY")
                .arg("USAGE")
                .arg(s.stream_key())
                .arg("SAMPLES")
                .arg(0),
        )
        .await?
    {
        Value::Int(n) => n,
        _ => 0,
    };
    let clients = info_field(&info(s, "memory").await?, "mem_clients_normal")?;
    Ok((stream, clients))
}

async fn int(s: &RedisStore, cmd: &redis::Cmd) -> anyhow::Result<i64> {
    match s.raw(cmd).await? {
        Value::Int(n) => Ok(n),
        other => Err(anyhow!("expected an integer, got {other:?}")),
    }
}

async fn zcard(s: &RedisStore) -> anyhow::Result<i64> {
    int(s, redis::cmd("ZCARD").arg(s.key("revoked-index"))).await
}

async fn epoch_exists(s: &RedisStore) -> anyhow::Result<bool> {
    Ok(int(s, redis::cmd("EXISTS").arg(s.key("epoch"))).await? == 1)
}

/// Waits (polling) until the relay has published everything: the deny set
/// holds `want` ids.
async fn wait_zcard(s: &RedisStore, want: i64) -> anyhow::Result<()> {
    let deadline = Instant::now() + DEADLINE;
    while zcard(s).await? < want {
        if Instant::now() > deadline {
            bail!("the deny set did not reach {want} ids");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

struct Prop {
    label: String,
    all_p50: Duration,
    all_p99: Duration,
    all_max: Duration,
    call_p50: Duration,
    call_p99: Duration,
    missed: usize,
    not_propagated: usize,
}

impl Prop {
    fn line(&self, n: usize) -> String {
        format!(
            "revoke -> refused at {} ({n} revocations through the admin API): all followers p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; admin call (returns once the relay published) p50 {:.2} ms, p99 {:.2} ms; missed {}; calls answering 'propagating' {}",
            self.label,
            ms(self.all_p50),
            ms(self.all_p99),
            ms(self.all_max),
            ms(self.call_p50),
            ms(self.call_p99),
            self.missed,
            self.not_propagated
        )
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "followers": self.label,
            "all_p50_ms": ms(self.all_p50),
            "all_p99_ms": ms(self.all_p99),
            "all_max_ms": ms(self.all_max),
            "call_p50_ms": ms(self.call_p50),
            "call_p99_ms": ms(self.call_p99),
            "missed": self.missed,
            "not_propagated": self.not_propagated,
        })
    }
}

/// What a propagation run watches: follower processes on Redis, or one
/// in-process follower of the broker's own feed.
enum Watch {
    Redis(Followers),
    Broker(BrokerFeed),
}

/// Times each revocation of `ids`; adds every id the calls revoked
/// (cascades included) to `revoked`.
async fn propagation(
    c: &Ctx,
    mut w: Watch,
    ids: &[String],
    revoked: &mut HashSet<String>,
) -> anyhow::Result<Prop> {
    let label = match &w {
        Watch::Redis(f) => f.label(),
        Watch::Broker(_) => "1 in-process BrokerFeed (the broker's own feed)".into(),
    };
    let (mut all, mut call) = (Vec::new(), Vec::new());
    let (mut missed, mut not_propagated) = (0, 0);
    for id in ids {
        // Let the followers settle into their blocking reads between runs.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let armed = match &mut w {
            Watch::Redis(f) => f.arm(id)?,
            Watch::Broker(b) => {
                let (b, id) = (b.clone(), id.clone());
                Some(tokio::task::spawn_blocking(move || {
                    let deadline = Instant::now() + Duration::from_secs(5);
                    while Instant::now() < deadline {
                        if b.contains(&id, system_now()) {
                            return vec![Some(wall_nanos())];
                        }
                        std::thread::sleep(Duration::from_micros(50));
                    }
                    vec![None]
                }))
            }
        };
        let t0 = wall_nanos();
        let c0 = Instant::now();
        let reply = revoke(c, json!({"credential": id})).await?;
        call.push(c0.elapsed());
        revoked.extend(revoked_ids(&reply)?);
        if !propagated(&reply) {
            not_propagated += 1;
        }
        let seen = match (&mut w, armed) {
            (Watch::Redis(f), p) => f.seen(p).await?,
            (Watch::Broker(_), Some(p)) => p.await?,
            (Watch::Broker(_), None) => bail!("not armed"),
        };
        if seen.iter().any(Option::is_none) {
            missed += 1;
            continue;
        }
        let worst = seen
            .iter()
            .flatten()
            .map(|t| Duration::from_nanos(u64::try_from(t.saturating_sub(t0)).unwrap_or(0)))
            .max()
            .unwrap_or_default();
        all.push(worst);
    }
    all.sort();
    call.sort();
    Ok(Prop {
        label,
        all_p50: percentile(&all, 50.0),
        all_p99: percentile(&all, 99.0),
        all_max: all.last().copied().unwrap_or_default(),
        call_p50: percentile(&call, 50.0),
        call_p99: percentile(&call, 99.0),
        missed,
        not_propagated,
    })
}

/// Records, for each watched size function, every change of its value
/// with the time it was seen; stops once each has reached its target
/// (set later, when the caller knows it), or after 30 s.
#[allow(clippy::type_complexity)]
fn watch_sizes(
    sizes: Vec<Box<dyn Fn() -> usize + Send>>,
    targets: Arc<Vec<AtomicUsize>>,
) -> tokio::task::JoinHandle<Vec<Vec<(Instant, usize)>>> {
    tokio::task::spawn_blocking(move || {
        let mut history: Vec<Vec<(Instant, usize)>> = vec![Vec::new(); sizes.len()];
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let now = Instant::now();
            let mut done = true;
            for (i, f) in sizes.iter().enumerate() {
                let v = f();
                if let Some(h) = history.get_mut(i)
                    && h.last().is_none_or(|(_, last)| *last != v)
                {
                    h.push((now, v));
                }
                let target = targets
                    .get(i)
                    .map_or(usize::MAX, |t| t.load(Ordering::Relaxed));
                done &= v >= target;
            }
            if done {
                break;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        history
    })
}

/// When a watched size first reached `target`.
fn reached_at(history: &[(Instant, usize)], target: usize) -> Option<Instant> {
    history.iter().find(|(_, v)| *v >= target).map(|(t, _)| *t)
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let srv = RedisServer::start()?;
    let redis_url = srv.url();
    let s = RedisStore::connect(&redis_url, PREFIX).await?;
    let cfg_url = redis_url.clone();
    let broker = Broker::start_with(TRUST_DOMAIN, move |cfg, dir| {
        cfg.dev_issuer = true;
        cfg.data_dir = Some(dir.join("data"));
        cfg.revocation = RevocationBackend::Redis(RedisConfig::standalone(cfg_url, PREFIX));
    })
    .await?;
    let td = broker.trust_domain().clone();
    let planner = td.id(PLANNER)?;
    let researcher = td.id(RESEARCHER)?;
    let (node_id, node_identity) = broker.attest_node().await?;
    let selector = format!("unix:uid:{}", cluster::own_uid()?);
    broker.create_entry(PLANNER, &node_id, &selector).await?;
    broker.create_entry(RESEARCHER, &node_id, &selector).await?;
    let node = broker.node_client(node_identity.clone())?;
    let url = broker.url();
    let c = Ctx {
        broker,
        node,
        node_identity,
        researcher,
        planner,
        url,
    };
    // The relay seeds the empty store on its first pass.
    let deadline = Instant::now() + DEADLINE;
    while !epoch_exists(&s).await? {
        if Instant::now() > deadline {
            bail!("the broker's relay never seeded Redis");
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let version = info(&s, "server")
        .await?
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .unwrap_or("?")
        .trim()
        .to_owned();

    // 1. Live credentials.
    let task_a = start_task(&c).await?;
    // Warm up connections and the broker's caches outside the memory window.
    let mut jtis = hops(&c, &task_a, 20, 1).await?;
    let mem0 = used_memory(&s).await?;
    let keys0 = int(&s, &redis::cmd("DBSIZE")).await?;
    let t = Instant::now();
    jtis.extend(hops(&c, &task_a, a.hops, a.concurrency).await?);
    let hop_time = t.elapsed();
    let mem1 = used_memory(&s).await?;
    let keys1 = int(&s, &redis::cmd("DBSIZE")).await?;
    let hop_rate = a.hops as f64 / hop_time.as_secs_f64();
    println!(
        "redis {version}; {} hops in task A in {:.1} s ({hop_rate:.0} hops/s, {} at once); used_memory {mem0} -> {mem1} B, keys {keys0} -> {keys1}",
        a.hops,
        hop_time.as_secs_f64(),
        a.concurrency
    );

    // 2. Propagation through the broker: the first ids of task A.
    let per_row = a.revocations;
    let mut prop_revoked: HashSet<String> = HashSet::new();
    let mut rows = Vec::new();
    let mut next = 0usize;
    let mut take = |n: usize| -> anyhow::Result<Vec<String>> {
        let out = jtis
            .get(next..next + n)
            .ok_or_else(|| anyhow!("not enough hops for the propagation rows"))?
            .to_vec();
        next += n;
        Ok(out)
    };
    for &k in &a.followers {
        let children = spawn_children(k, &redis_url)?;
        let ids = take(per_row)?;
        rows.push(
            propagation(
                &c,
                Watch::Redis(Followers::Processes(children)),
                &ids,
                &mut prop_revoked,
            )
            .await?,
        );
    }
    let bundles = c.broker.bundles()?;
    let broker_id = td.id("/baton/broker")?;
    let bfeed = BrokerFeed::spawn(
        &c.url,
        c.node_identity.clone(),
        bundles.clone(),
        broker_id.clone(),
        Duration::from_secs(30),
    )?;
    if !bfeed.wait_fresh(Duration::from_secs(30)).await {
        bail!("the broker feed follower did not sync");
    }
    let ids = take(per_row)?;
    rows.push(propagation(&c, Watch::Broker(bfeed.clone()), &ids, &mut prop_revoked).await?);
    for r in &rows {
        println!("{}", r.line(per_row));
    }

    // 3. Cascade: revoke task A.
    let rfeed: FeedHandle = RevocationFeed::spawn(&redis_url, PREFIX, FeedOptions::default())?;
    wait_fresh(std::slice::from_ref(&rfeed)).await?;
    let z0 = zcard(&s).await?;
    wait_zcard(&s, z0).await?;
    let mem2 = used_memory(&s).await?;
    let (stream2, clients2) = memory_parts(&s).await?;
    let (r_len0, b_len0) = (rfeed.len(), bfeed.len());
    let targets = Arc::new(vec![
        AtomicUsize::new(usize::MAX),
        AtomicUsize::new(usize::MAX),
    ]);
    let (rf, bf) = (rfeed.clone(), bfeed.clone());
    let watcher = watch_sizes(
        vec![Box::new(move || rf.len()), Box::new(move || bf.len())],
        targets.clone(),
    );
    let t0 = Instant::now();
    let reply = revoke(&c, json!({"task": task_a.id.as_str()})).await?;
    let call = t0.elapsed();
    let ids = revoked_ids(&reply)?;
    let fresh: Vec<&String> = ids.iter().filter(|i| !prop_revoked.contains(*i)).collect();
    // What the cascade added to the deny set: the task's one entry (keyed
    // by the task id) and an entry per credential minted from the task
    // outside it. The answer comes once the relay published, so Redis
    // holds them all now; a follower holds every id when its set grew by
    // as many entries.
    let newly = usize::try_from(zcard(&s).await? - z0)?;
    if let (Some(tr), Some(tb)) = (targets.first(), targets.get(1)) {
        tr.store(r_len0 + newly, Ordering::Relaxed);
        tb.store(b_len0 + newly, Ordering::Relaxed);
    }
    let history = watcher.await?;
    // Every credential of the answer is refused at both followers, by its
    // own entry or its task's (what a verifier asks).
    use baton_verify::RevocationCheck as _;
    let r_all = ids.iter().all(|i| rfeed.is_revoked(i, &task_a.id));
    let b_all = ids.iter().all(|i| bfeed.is_revoked(i, &task_a.id));
    let now = system_now();
    let by_task = ids
        .iter()
        .filter(|i| !rfeed.contains(i, now) && rfeed.contains(task_a.id.as_str(), now))
        .count();
    println!(
        "cascade: {} credentials ({} not revoked before) covered by {newly} new deny entries; {by_task} refused by their task's entry",
        ids.len(),
        fresh.len()
    );
    let at = |i: usize, target: usize| {
        history
            .get(i)
            .and_then(|h| reached_at(h, target))
            .map(|t| t.saturating_duration_since(t0))
    };
    let (r_time, b_time) = (at(0, r_len0 + newly), at(1, b_len0 + newly));
    let (r_first, b_first) = (at(0, r_len0 + 1), at(1, b_len0 + 1));
    wait_zcard(&s, z0 + i64::try_from(newly)?).await?;
    let mem3 = used_memory(&s).await?;
    let (stream3, clients3) = memory_parts(&s).await?;
    println!(
        "cascade memory parts (÷ {newly} new ids): the stream (MEMORY USAGE) {:.1} B per id, client buffers (mem_clients_normal) {:.1} B per id",
        (stream3 - stream2) as f64 / newly.max(1) as f64,
        (clients3 - clients2) as f64 / newly.max(1) as f64
    );
    let live_bytes = (mem1 - mem0) as f64 / ids.len().max(1) as f64;
    // Per credential the cascade revoked (what the target is about), and
    // per deny entry it wrote.
    let revoked_bytes = (mem3 - mem2) as f64 / fresh.len().max(1) as f64;
    let entry_bytes = (mem3 - mem2) as f64 / newly.max(1) as f64;
    let fmt_t =
        |d: Option<Duration>| d.map_or("not reached".to_owned(), |d| format!("{:.1} ms", ms(d)));
    let ratio = |d: Option<Duration>| d.map_or(f64::NAN, |d| ms(d) / TARGET_CASCADE_MS);
    println!(
        "cascade: revoke task A covered {} ids ({newly} not revoked before); admin call {:.1} ms (answered propagated: {}); every id at the RevocationFeed (Redis) {} ({:.2}× the 100 ms target, all held: {r_all}), at the BrokerFeed {} ({:.2}×, all held: {b_all})",
        ids.len(),
        ms(call),
        propagated(&reply),
        fmt_t(r_time),
        ratio(r_time),
        fmt_t(b_time),
        ratio(b_time)
    );
    println!(
        "cascade: first id at the RevocationFeed {}, at the BrokerFeed {}",
        fmt_t(r_first),
        fmt_t(b_first)
    );
    println!(
        "memory: {live_bytes:.1} B of used_memory per live credential ({} credentials of task A, {:.2}× the 120 B target), {revoked_bytes:.1} B per revoked credential ({} credentials, {:.3}× the 200 B target), {entry_bytes:.0} B per deny entry ({newly} entries)",
        ids.len(),
        live_bytes / TARGET_LIVE_BYTES,
        fresh.len(),
        revoked_bytes / TARGET_REVOKED_BYTES
    );

    // More revoked ids for the rebuild, in further tasks.
    let mut extra = 0usize;
    let mut left = a.rebuild_hops;
    while left > 0 {
        let n = left.min(a.hops.max(1));
        let t = start_task(&c).await?;
        hops(&c, &t, n, a.concurrency).await?;
        let t0 = Instant::now();
        let reply = revoke(&c, json!({"task": t.id.as_str()})).await?;
        let n_ids = revoked_ids(&reply)?.len();
        println!(
            "further task: revoke task of {n_ids} ids, admin call {:.1} ms",
            ms(t0.elapsed())
        );
        extra += n_ids;
        left -= n;
    }
    let z_live = zcard(&s).await?;
    if extra > 0 {
        println!(
            "rebuild set: {extra} more ids revoked in further tasks; {z_live} ids in the deny set"
        );
    }
    wait_fresh(std::slice::from_ref(&rfeed)).await?;
    let deadline = Instant::now() + DEADLINE;
    while rfeed.len() < usize::try_from(z_live)? {
        if Instant::now() > deadline {
            bail!("the follower never held the whole deny set");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // 4. Rebuild after FLUSHALL.
    let old_epoch = rfeed.epoch();
    s.raw(&redis::cmd("FLUSHALL")).await?;
    let t0 = Instant::now();
    let mem_empty = used_memory(&s).await?;
    let (mut t_first, mut t_epoch, mut t_full, mut t_follower) = (None, None, None, None);
    let deadline = t0 + DEADLINE;
    while t_follower.is_none() || t_full.is_none() {
        if Instant::now() > deadline {
            bail!("Redis was not rebuilt within {DEADLINE:?}");
        }
        let z = zcard(&s).await?;
        let now = Instant::now();
        if t_first.is_none() && z > 0 {
            t_first = Some(now - t0);
        }
        if t_epoch.is_none() && epoch_exists(&s).await? {
            t_epoch = Some(now - t0);
        }
        if t_full.is_none() && z >= z_live && t_epoch.is_some() {
            t_full = Some(now - t0);
        }
        if t_follower.is_none()
            && rfeed.epoch().is_some()
            && rfeed.epoch() != old_epoch
            && rfeed.status(system_now()) == FeedStatus::Fresh
            && rfeed.len() >= usize::try_from(z_live)?
        {
            t_follower = Some(now - t0);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let mem_rebuilt = used_memory(&s).await?;
    let follower_all = ids.iter().all(|i| rfeed.is_revoked(i, &task_a.id));
    let seeded_bytes = (mem_rebuilt - mem_empty) as f64 / z_live.max(1) as f64;
    let f = |d: Option<Duration>| d.map_or(f64::NAN, ms);
    println!(
        "rebuild after FLUSHALL with {z_live} revoked ids in force: first ids back {:.0} ms, epoch back {:.0} ms, deny set whole {:.0} ms, follower resynced to the new epoch with every id {:.0} ms (task A's ids all held: {follower_all}); the relay notices a flush on its 500 ms tick; used_memory of the rebuilt deny set {seeded_bytes:.0} B per id ({:.2}× the 200 B target)",
        f(t_first),
        f(t_epoch),
        f(t_full),
        f(t_follower),
        seeded_bytes / TARGET_REVOKED_BYTES
    );

    let json = json!({
        "bench": "revocation-durable",
        "unix_time": unix_now(),
        "nproc": cores(),
        "redis_version": version,
        "hops": a.hops,
        "hops_per_s": hop_rate,
        "live_credentials": ids.len(),
        "bytes_per_live_credential": live_bytes,
        "live_over_target": live_bytes / TARGET_LIVE_BYTES,
        "keys_before_after_hops": [keys0, keys1],
        "revoked_ids": fresh.len(),
        "deny_entries": newly,
        "bytes_per_revoked_id": revoked_bytes,
        "bytes_per_deny_entry": entry_bytes,
        "revoked_over_target": revoked_bytes / TARGET_REVOKED_BYTES,
        "propagation": rows.iter().map(Prop::json).collect::<Vec<_>>(),
        "cascade_ids": ids.len(),
        "cascade_call_ms": ms(call),
        "cascade_redis_feed_ms": r_time.map(ms),
        "cascade_broker_feed_ms": b_time.map(ms),
        "cascade_redis_over_target": ratio(r_time),
        "cascade_redis_first_ms": r_first.map(ms),
        "cascade_broker_first_ms": b_first.map(ms),
        "cascade_broker_over_target": ratio(b_time),
        "rebuild_ids": z_live,
        "rebuild_first_ms": t_first.map(ms),
        "rebuild_epoch_ms": t_epoch.map(ms),
        "rebuild_full_ms": t_full.map(ms),
        "rebuild_follower_ms": t_follower.map(ms),
        "rebuild_bytes_per_id": seeded_bytes,
    });
    println!("{json}");
    drop(c);
    drop(srv);
    Ok(())
}
