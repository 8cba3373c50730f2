//! `baton-bench hops`: the delegation hop (delegate + redeem) with the
//! broker's state on disk, against the hop's p99 target, and hops/s under
//! concurrent holders with 1, 2 and 3 brokers on one PostgreSQL database.
//!
//! 1. **Latency, state on disk**: one holder, sequential hops (as
//!    `delegation` measures them), once on a single broker with its SQLite
//!    files (the embedded default) and once on a single broker whose
//!    datastore is PostgreSQL (its audit log in its data dir, shipped to
//!    the datastore before each receipt leaves, as several brokers run).
//! 2. **Throughput**: `--holders` concurrent holders (each its own task,
//!    planner credential and connections), each a loop of hops for
//!    `--seconds` after `--warmup-seconds`, against N brokers on one
//!    PostgreSQL database with the shared, sealed CA (`--ca-encryption-key-file`),
//!    for each N of `--brokers`. A hop's delegate goes to broker `k mod N`
//!    and its redeem to the next one, so with N ≥ 2 every hop crosses
//!    brokers, as behind one address in front of them. Reference in the same
//!    run: the single SQLite broker under the same load.
//!
//! Every process shares this machine's cores: the brokers, PostgreSQL and
//! the 16 clients. The scaling ratio says what one more broker process buys
//! on these cores, not on more machines.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_ca::WorkloadKey;
use baton_core::api::{
    DelegateRequest, HandoffGrant, RedeemRequest, StartTaskResponse, TaskCredential,
};
use baton_core::{Purpose, Scope, SpiffeId};
use baton_tls::ClientIdentity;
use serde_json::json;

use crate::cluster::{self, Broker};
use crate::delegation::{
    AUDIENCE, HOP_P99_TARGET, PLANNER, PURPOSE, RESEARCHER, SCOPE, TRUST_DOMAIN, post,
};
use crate::stats::{self, micros, percentile};

/// Researcher CSRs made before the clock starts and reused in a cycle (the
/// node daemon's key generation is not the broker's cost).
const CSR_POOL: usize = 256;

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Sequential hops of the latency phase, per datastore, after 10% more
    /// as warm-up.
    #[arg(long, default_value_t = 2000)]
    latency_hops: usize,
    /// Concurrent holders of the throughput phase.
    #[arg(long, default_value_t = 16)]
    holders: usize,
    /// Seconds of measured load per configuration.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup_seconds: f64,
    /// Broker counts of the throughput phase, on one PostgreSQL database.
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    brokers: Vec<usize>,
    /// PostgreSQL to use (libpq key/value, without dbname); each
    /// configuration gets a throwaway database, created and dropped with
    /// `psql`.
    #[arg(long, default_value = "host=127.0.0.1 port=5432 user=postgres")]
    pg: String,
    /// Connections each broker keeps to PostgreSQL (`--datastore-pool`).
    #[arg(long, default_value_t = 8)]
    pg_pool: usize,
}

/// Where the brokers keep their state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// One broker, SQLite files in its data dir (the embedded default).
    Sqlite,
    /// Brokers on one PostgreSQL database with the shared, sealed CA.
    Postgres,
}

/// A throwaway PostgreSQL database, dropped with this value.
struct Database {
    admin: String,
    name: String,
}

impl Database {
    fn create(base: &str, tag: &str) -> anyhow::Result<Self> {
        let name = format!("baton_bench_hops_{}_{tag}", std::process::id());
        let admin = format!("{base} dbname=postgres");
        psql(&admin, &format!("DROP DATABASE IF EXISTS {name}"))?;
        psql(&admin, &format!("CREATE DATABASE {name}"))?;
        Ok(Self { admin, name })
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        let _ = psql(
            &self.admin,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

fn psql(conn: &str, sql: &str) -> anyhow::Result<()> {
    let out = std::process::Command::new("psql")
        .args([conn, "-qAtc", sql])
        .output()
        .context("running psql (PostgreSQL's client must be on PATH)")?;
    if !out.status.success() {
        bail!(
            "psql {sql:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Brokers on one state, a node attested at the first, the planner's and
/// the researcher's entries under it.
struct Cluster {
    brokers: Vec<Broker>,
    _db: Option<Database>,
    _seal: Option<tempfile::TempDir>,
    /// The node's client for each broker.
    node: Vec<reqwest::Client>,
    planner: SpiffeId,
    researcher: SpiffeId,
}

impl Cluster {
    async fn start(a: &Args, state: State, n: usize) -> anyhow::Result<Self> {
        let (db, seal) = match state {
            State::Sqlite => (None, None),
            State::Postgres => {
                let db = Database::create(&a.pg, &format!("n{n}"))?;
                let seal = tempfile::tempdir()?;
                let key = seal.path().join("seal.key");
                let mut bytes = [0u8; 32];
                aws_lc_rs::rand::fill(&mut bytes)
                    .map_err(|_| anyhow::anyhow!("no system randomness"))?;
                write_private(&key, &format!("{}\n", hex::encode(bytes)))?;
                (Some(db), Some(seal))
            }
        };
        let mut brokers = Vec::with_capacity(n);
        for _ in 0..n {
            let datastore = db.as_ref().map(|d| baton_broker::pg::PgSettings {
                conn: format!("{} dbname={}", a.pg, d.name),
                password: None,
                pool: a.pg_pool,
                tls: baton_broker::pg_tls::PgTls::default(),
            });
            let seal_key = seal.as_ref().map(|s| s.path().join("seal.key"));
            brokers.push(
                Broker::start_with(TRUST_DOMAIN, move |cfg, dir| {
                    cfg.dev_issuer = true;
                    cfg.data_dir = Some(dir.join("data"));
                    cfg.datastore = datastore;
                    cfg.ca_seal_key_file = seal_key;
                })
                .await?,
            );
        }
        let first = brokers.first().context("no broker")?;
        let td = first.trust_domain().clone();
        let planner = td.id(PLANNER)?;
        let researcher = td.id(RESEARCHER)?;
        let (node_id, node_identity) = first.attest_node().await?;
        let selector = format!("unix:uid:{}", cluster::own_uid()?);
        first.create_entry(PLANNER, &node_id, &selector).await?;
        first.create_entry(RESEARCHER, &node_id, &selector).await?;
        let node = brokers
            .iter()
            .map(|b| b.node_client(node_identity.clone()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Self {
            brokers,
            _db: db,
            _seal: seal,
            node,
            planner,
            researcher,
        })
    }

    fn url(&self, i: usize) -> String {
        self.brokers[i % self.brokers.len()].url()
    }

    /// A task started by the dev issuer's alice, its root grant redeemed
    /// for the planner through the node: the planner's client at every
    /// broker and its delegate request.
    async fn holder(&self) -> anyhow::Result<Holder> {
        let first = &self.brokers[0];
        let scope = Scope::parse(SCOPE)?;
        let purpose: Purpose = PURPOSE.parse()?;
        let started: StartTaskResponse = first
            .start_read_task(&self.planner, &purpose, &scope, AUDIENCE)
            .await?;
        let key = WorkloadKey::generate()?;
        let cred: TaskCredential = post(
            &self.node[0],
            &format!("{}/v1/node/redeem", self.url(0)),
            &RedeemRequest {
                grant: started.grant.grant,
                spiffe_id: self.planner.clone(),
                csr_der: key.csr_der(&self.planner)?,
            },
        )
        .await?;
        let identity = ClientIdentity::new(cred.cert_chain_der, key.pkcs8_der())?;
        let clients = self
            .brokers
            .iter()
            .map(|b| b.node_client(identity.clone()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Holder {
            clients,
            req: DelegateRequest {
                token: cred.token,
                target: self.researcher.clone(),
                scope,
                purpose,
                audience: vec![AUDIENCE.into()],
                justification: "look up the customer's open cases".into(),
                ttl_secs: None,
            },
        })
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

struct Holder {
    clients: Vec<reqwest::Client>,
    req: DelegateRequest,
}

impl Holder {
    /// One hop: delegate at broker `k`, redeem through the node at the next.
    async fn hop(&self, c: &Cluster, k: usize, csr: &[u8]) -> anyhow::Result<()> {
        let n = c.brokers.len();
        let grant: HandoffGrant = post(
            &self.clients[k % n],
            &format!("{}/v1/delegate", c.url(k)),
            &self.req,
        )
        .await?;
        let _: TaskCredential = post(
            &c.node[(k + 1) % n],
            &format!("{}/v1/node/redeem", c.url(k + 1)),
            &RedeemRequest {
                grant: grant.grant,
                spiffe_id: c.researcher.clone(),
                csr_der: csr.to_vec(),
            },
        )
        .await?;
        Ok(())
    }
}

struct Latency {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
    cpu_per_hop: Option<Duration>,
}

async fn latency(a: &Args, state: State, csrs: &[Vec<u8>]) -> anyhow::Result<Latency> {
    let c = Cluster::start(a, state, 1).await?;
    let h = c.holder().await?;
    let warmup = a.latency_hops / 10;
    let mut v = Vec::with_capacity(a.latency_hops);
    let mut cpu0 = None;
    for i in 0..warmup + a.latency_hops {
        if i == warmup {
            cpu0 = stats::process_cpu();
        }
        let t = Instant::now();
        h.hop(&c, 0, &csrs[i % csrs.len()]).await?;
        if i >= warmup {
            v.push(t.elapsed());
        }
    }
    let cpu_per_hop = cpu0
        .zip(stats::process_cpu())
        .map(|(x, y)| y.saturating_sub(x) / a.latency_hops.max(1) as u32);
    v.sort_unstable();
    Ok(Latency {
        n: v.len(),
        p50: percentile(&v, 50.0),
        p99: percentile(&v, 99.0),
        max: v.last().copied().unwrap_or_default(),
        cpu_per_hop,
    })
}

struct Throughput {
    brokers: usize,
    hops: u64,
    rate: f64,
    p50: Duration,
    p99: Duration,
    cpu_per_hop: Option<Duration>,
}

async fn throughput(
    a: &Args,
    state: State,
    n: usize,
    csrs: Arc<Vec<Vec<u8>>>,
) -> anyhow::Result<Throughput> {
    let c = Arc::new(Cluster::start(a, state, n).await?);
    let mut holders = Vec::with_capacity(a.holders);
    for _ in 0..a.holders {
        holders.push(c.holder().await?);
    }
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(a.holders);
    for (i, h) in holders.into_iter().enumerate() {
        let (c, csrs, measuring, stop) = (c.clone(), csrs.clone(), measuring.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut k = i;
            while !stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                h.hop(&c, k, &csrs[k % csrs.len()]).await?;
                if measuring.load(Ordering::Relaxed) && !stop.load(Ordering::Relaxed) {
                    lat.push(t.elapsed());
                }
                k += 1;
            }
            anyhow::Ok(lat)
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(a.warmup_seconds)).await;
    let cpu0 = stats::process_cpu();
    let start = Instant::now();
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs_f64(a.seconds)).await;
    stop.store(true, Ordering::Relaxed);
    let wall = start.elapsed();
    let cpu1 = stats::process_cpu();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.context("a holder panicked")??);
    }
    all.sort_unstable();
    let hops = all.len() as u64;
    Ok(Throughput {
        brokers: n,
        hops,
        rate: hops as f64 / wall.as_secs_f64(),
        p50: percentile(&all, 50.0),
        p99: percentile(&all, 99.0),
        cpu_per_hop: cpu0
            .zip(cpu1)
            .map(|(x, y)| y.saturating_sub(x) / hops.max(1) as u32),
    })
}

fn us(d: Option<Duration>) -> serde_json::Value {
    d.map_or(serde_json::Value::Null, |d| json!(micros(d)))
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    println!(
        "# baton-bench hops: nproc {}, {} holders, {} s (+{} s warm-up) per configuration",
        std::thread::available_parallelism().map_or(0, usize::from),
        a.holders,
        a.seconds,
        a.warmup_seconds
    );
    let researcher = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}{RESEARCHER}"))?;
    let csrs = Arc::new(cluster::csr_pool(CSR_POOL, &researcher)?);

    let mut report = serde_json::Map::new();
    let mut lat_json = Vec::new();
    for (state, name) in [(State::Sqlite, "sqlite"), (State::Postgres, "postgres")] {
        let l = latency(&a, state, &csrs).await?;
        let ratio = l.p99.as_secs_f64() / HOP_P99_TARGET.as_secs_f64();
        println!(
            "latency, 1 broker on {name}, 1 holder: n={} p50 {:.0} us, p99 {:.0} us ({ratio:.2} x the 2 ms target), max {:.0} us; CPU per hop (brokers + clients) {}",
            l.n,
            micros(l.p50),
            micros(l.p99),
            micros(l.max),
            l.cpu_per_hop
                .map_or("n/a".into(), |d| format!("{:.0} us", micros(d)))
        );
        lat_json.push(json!({
            "state": name, "n": l.n, "p50_us": micros(l.p50), "p99_us": micros(l.p99),
            "max_us": micros(l.max), "p99_over_target": ratio, "cpu_per_hop_us": us(l.cpu_per_hop),
        }));
    }
    report.insert("latency".into(), json!(lat_json));

    let reference = throughput(&a, State::Sqlite, 1, csrs.clone()).await?;
    println!(
        "throughput, 1 broker on sqlite (reference): {:.0} hops/s, p50 {:.0} us, p99 {:.0} us, CPU per hop {}",
        reference.rate,
        micros(reference.p50),
        micros(reference.p99),
        reference
            .cpu_per_hop
            .map_or("n/a".into(), |d| format!("{:.0} us", micros(d)))
    );
    report.insert(
        "sqlite_reference".into(),
        json!({"hops_per_s": reference.rate, "hops": reference.hops, "p50_us": micros(reference.p50), "p99_us": micros(reference.p99), "cpu_per_hop_us": us(reference.cpu_per_hop)}),
    );
    let mut base = None;
    let mut rows = Vec::new();
    for &n in &a.brokers {
        if n == 0 {
            bail!("--brokers: a broker count must be at least 1");
        }
        let t = throughput(&a, State::Postgres, n, csrs.clone()).await?;
        let base_rate = *base.get_or_insert(t.rate);
        let scaling = t.rate / base_rate.max(1e-9);
        println!(
            "throughput, {} broker(s) on one postgres: {:.0} hops/s ({scaling:.2} x 1 broker, {:.2} x sqlite), p50 {:.0} us, p99 {:.0} us, CPU per hop {}",
            t.brokers,
            t.rate,
            t.rate / reference.rate.max(1e-9),
            micros(t.p50),
            micros(t.p99),
            t.cpu_per_hop
                .map_or("n/a".into(), |d| format!("{:.0} us", micros(d)))
        );
        rows.push(json!({
            "brokers": t.brokers, "hops": t.hops, "hops_per_s": t.rate, "scaling_vs_1": scaling,
            "p50_us": micros(t.p50), "p99_us": micros(t.p99), "cpu_per_hop_us": us(t.cpu_per_hop),
        }));
    }
    report.insert("postgres".into(), json!(rows));
    println!("{}", serde_json::Value::Object(report));
    Ok(())
}
