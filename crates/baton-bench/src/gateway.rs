//! `baton-bench gateway`: `baton gateway` in front of a trivial upstream,
//! next to nginx with `ssl_verify_client on` in front of the same
//! upstream, measured in the same run.
//!
//! Setup: an in-process broker (dev issuer, in-memory stores) and node
//! daemon; the gateway's SPIFFE ID is an entry of that node, and the
//! gateway (`baton_gateway::run`, as `baton gateway` runs it) takes its
//! SVID from the daemon's Workload API, the broker's JWT keys and
//! revocation feed, and reports every call to the broker through its
//! fsynced spool (kept on: it is part of the gateway's cost). It runs on
//! its own Tokio runtime with W worker threads; nginx gets
//! `worker_processes W`. The upstream is a hyper HTTP/1.1 server on
//! loopback answering every request with the same small body, on its own
//! runtime. The caller is the researcher agent of a task: its task SVID
//! (mTLS) and its delegation token (`Authorization: Bearer`), one route
//! (`GET /crm/accounts/{account}`, tool `crm.search`, read tier).
//! nginx presents the gateway's own SVID, verifies the client against the
//! trust bundle, has no session cache or tickets (as Baton's TLS), and
//! proxies with kept-alive upstream connections.
//!
//! One client for every target: hyper HTTP/1.1 over tokio-rustls, TLS 1.3
//! only, resumption off, the server's SPIFFE ID checked, on its own
//! runtime. Figures:
//!
//! 1. full handshakes/s: a new TCP connection, TLS handshake and one call
//!    per connection, C clients: gateway (with Cedar, and with an
//!    allow-all policy) vs nginx;
//! 2. requests/s on C kept-alive connections: upstream direct, nginx,
//!    gateway (with Cedar, and with an allow-all policy);
//! 3. latency the gateway adds per call with a seen token: sequential calls
//!    on one kept-alive connection, p50 and p99 minus the upstream direct's,
//!    against the 100 us p99 target; nginx's the same way as the peer.
//!    Same-run references: append + fdatasync in the spool's directory,
//!    timed between the rounds, and `Engine::authorize_call` alone.
//!
//! Server CPU per request comes from /proc: the gateway's runtime threads,
//! nginx's processes, and the rest of this process (broker, daemon)
//! apart. Results go to stdout as readable lines, then one JSON line.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use baton_ca::WorkloadKey;
use baton_core::api::{
    DelegateRequest, HandoffGrant, RedeemRequest, StartTaskResponse, TaskCredential,
};
use baton_core::{Purpose, RiskTier, Scope, SpiffeId};
use baton_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use baton_tls::rustls;
use baton_tls::{BundleStore, ClientIdentity, PeerPolicy, SpiffeServerVerifier};
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use http::{HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Empty, Full};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Runtime;
use tokio::sync::oneshot;
use tokio_rustls::TlsConnector;

use crate::cluster::{self, Agent, Broker};
use crate::delegation::post;
use crate::stats::{self, micros, percentile};

const TRUST_DOMAIN: &str = "example.org";
const GATEWAY_PATH: &str = "/tools/gateway";
const PLANNER: &str = "/agents/planner";
const RESEARCHER: &str = "/agents/researcher";
const PURPOSE: &str = "support.case-research";
const SCOPE: &[&str] = &["tool:crm.search:read", "dataset:crm:read"];
const AUDIENCE: &str = "gw";
/// The one route's path, as every client calls it.
const CALL_PATH: &str = "/crm/accounts/acme";
/// What the upstream answers to everything (and every target must pass on).
const BODY: &[u8] = br#"{"account":"acme","open_cases":[{"id":"C-1042","status":"open"}]}"#;
/// The report spool's segment files (baton-verify's `report.rs`):
/// `tool-calls.<n>.jsonl`.
const SPOOL_PREFIX: &str = "tool-calls.";
/// The per-call target of the issue.
const ADDED_P99_TARGET: Duration = Duration::from_micros(100);

/// Thread-name prefixes, for CPU per part (15 bytes at most on Linux).
const GATEWAY_THREADS: &str = "bench-gw";
const UPSTREAM_THREADS: &str = "bench-upstream";
const CLIENT_THREADS: &str = "bench-client";

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Seconds of each rate measurement (handshakes/s, requests/s), after
    /// `--warmup-seconds` of the same load.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    #[arg(long, default_value_t = 1.0)]
    warmup_seconds: f64,
    /// Concurrent client connections for the rate figures.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Sequential calls per target for the latency figures, in
    /// `--latency-rounds` interleaved rounds, after `--latency-warmup`.
    #[arg(long, default_value_t = 5000)]
    latency_calls: usize,
    #[arg(long, default_value_t = 5)]
    latency_rounds: usize,
    #[arg(long, default_value_t = 500)]
    latency_warmup: usize,
    /// The gateway's Tokio worker threads and nginx's worker_processes
    /// (default: nproc).
    #[arg(long)]
    workers: Option<usize>,
    /// The nginx binary; without it the nginx rows are skipped.
    #[arg(long, default_value = "nginx")]
    nginx: String,
    /// Where the gateways' report spools go (default: a temp dir). Each
    /// call's report is fsynced there.
    #[arg(long)]
    spool_dir: Option<PathBuf>,
    /// Appends + fdatasync timed in the spool's directory between the
    /// latency rounds (the reference for the per-call report).
    #[arg(long, default_value_t = 500)]
    fsyncs: usize,
    /// `Engine::authorize_call` calls timed alone (the reference for Cedar
    /// in the gateway).
    #[arg(long, default_value_t = 20_000)]
    cedar_calls: usize,
}

/// p50 / p99 / max of a series.
#[derive(Debug, Clone, Copy, Default)]
struct Summary {
    n: usize,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Summary {
    fn of(mut v: Vec<Duration>) -> Self {
        v.sort_unstable();
        Self {
            n: v.len(),
            p50: percentile(&v, 50.0),
            p99: percentile(&v, 99.0),
            max: v.last().copied().unwrap_or_default(),
        }
    }

    fn text(&self) -> String {
        format!(
            "p50 {:.0} us, p99 {:.0} us, max {:.0} us (n={})",
            micros(self.p50),
            micros(self.p99),
            micros(self.max),
            self.n
        )
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "n": self.n,
            "p50_us": micros(self.p50),
            "p99_us": micros(self.p99),
            "max_us": micros(self.max),
        })
    }
}

/// `a - b` in microseconds, negative when `b` is larger.
fn minus_us(a: Duration, b: Duration) -> f64 {
    micros(a) - micros(b)
}

/// A runtime of its own for one part (gateway, upstream, client), shut
/// down in the background when dropped: dropping a `Runtime` inside the
/// main runtime would panic, on an error path too.
struct Part(Option<Runtime>);

impl Part {
    fn new(threads: usize, name: &str) -> anyhow::Result<Self> {
        Ok(Self(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(threads)
                .thread_name(name)
                .enable_all()
                .build()?,
        )))
    }

    fn rt(&self) -> anyhow::Result<&Runtime> {
        self.0.as_ref().context("runtime already shut down")
    }
}

impl Drop for Part {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

// ---------------------------------------------------------------- upstream

/// The upstream: hyper HTTP/1.1 on loopback, the same body for every
/// request, on its own runtime.
struct Upstream {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    _rt: Part,
}

fn start_upstream(threads: usize) -> anyhow::Result<Upstream> {
    let part = Part::new(threads, UPSTREAM_THREADS)?;
    let rt = part.rt()?;
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    std_listener.set_nonblocking(true)?;
    let addr = std_listener.local_addr()?;
    let served = Arc::new(AtomicU64::new(0));
    let counter = served.clone();
    let listener = {
        let _guard = rt.enter();
        TcpListener::from_std(std_listener)?
    };
    rt.spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((s, _)) => s,
                Err(e) => {
                    eprintln!("upstream: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let counter = counter.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    counter.fetch_add(1, Ordering::Relaxed);
                    let mut resp = Response::new(Full::new(Bytes::from_static(BODY)));
                    resp.headers_mut()
                        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(Upstream {
        addr,
        served,
        _rt: part,
    })
}

// ------------------------------------------------------------------ client

/// One endpoint the client calls, and how.
#[derive(Clone)]
struct Target {
    label: &'static str,
    addr: SocketAddr,
    tls: Option<TlsConnector>,
    host: HeaderValue,
    bearer: HeaderValue,
}

impl Target {
    fn request(&self) -> Request<Empty<Bytes>> {
        let mut req = Request::new(Empty::new());
        *req.uri_mut() = http::Uri::from_static(CALL_PATH);
        let h = req.headers_mut();
        h.insert(HOST, self.host.clone());
        h.insert(AUTHORIZATION, self.bearer.clone());
        req
    }
}

/// What a TLS connection negotiated.
#[derive(Debug, Clone, Copy)]
struct TlsInfo {
    version: Option<rustls::ProtocolVersion>,
    suite: Option<rustls::CipherSuite>,
    group: Option<rustls::NamedGroup>,
}

impl TlsInfo {
    fn text(&self) -> String {
        let s = |v: Option<String>| v.unwrap_or_else(|| "?".into());
        format!(
            "{} {} {}",
            s(self.version.map(|v| format!("{v:?}"))),
            s(self.suite.map(|v| format!("{v:?}"))),
            s(self.group.map(|v| format!("{v:?}")))
        )
    }
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<Bytes>>;

async fn handshake<T>(io: T) -> anyhow::Result<Sender>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A new TCP connection (and TLS handshake) to `t`.
async fn connect(t: &Target) -> anyhow::Result<(Sender, Option<TlsInfo>)> {
    let tcp = TcpStream::connect(t.addr).await?;
    tcp.set_nodelay(true)?;
    match &t.tls {
        None => Ok((handshake(TokioIo::new(tcp)).await?, None)),
        Some(c) => {
            let name = rustls::pki_types::ServerName::from(t.addr.ip());
            let tls = c.connect(name, tcp).await?;
            let conn = tls.get_ref().1;
            let info = TlsInfo {
                version: conn.protocol_version(),
                suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
                group: conn.negotiated_key_exchange_group().map(|g| g.name()),
            };
            Ok((handshake(TokioIo::new(tls)).await?, Some(info)))
        }
    }
}

/// One call; anything but `200` with the upstream's body is an error.
async fn call(sender: &mut Sender, t: &Target) -> anyhow::Result<()> {
    sender.ready().await?;
    let resp = sender.send_request(t.request()).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if status != StatusCode::OK {
        bail!(
            "{} answered {status}: {}",
            t.label,
            String::from_utf8_lossy(&body)
        );
    }
    if body.as_ref() != BODY {
        bail!("{} answered another body: {:?}", t.label, body);
    }
    Ok(())
}

/// The client's TLS: TLS 1.3 only, HTTP/1.1, no resumption, the agent's
/// SVID, the server must be `server`; Baton's crypto provider with its
/// default key-exchange groups (X25519 first in this build, which
/// OpenSSL 3.0's nginx has too: both servers negotiate the same group, and
/// the negotiated one is printed).
fn client_tls(
    identity: ClientIdentity,
    bundles: BundleStore,
    server: SpiffeId,
) -> anyhow::Result<TlsConnector> {
    let verifier = SpiffeServerVerifier::new(bundles, PeerPolicy::Exact(vec![server]));
    let mut cfg = rustls::ClientConfig::builder_with_provider(baton_tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(identity));
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    cfg.resumption = rustls::client::Resumption::disabled();
    Ok(TlsConnector::from(Arc::new(cfg)))
}

// --------------------------------------------------------------------- CPU

/// CPU time so far of this process's parts and of nginx.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    gateway: Duration,
    upstream: Duration,
    client: Duration,
    /// Everything else in this process: broker, node daemon, main runtime.
    rest: Duration,
    nginx: Duration,
}

impl Cpu {
    fn now(nginx: Option<u32>) -> Self {
        let mut c = Self::default();
        if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
            for t in tasks.flatten() {
                let dir = t.path();
                let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
                let Some(cpu) = dir.join("stat").to_str().and_then(stats::cpu_of) else {
                    continue;
                };
                // The spool's writer thread is the gateway's too.
                let slot = if name.starts_with(GATEWAY_THREADS) || name.starts_with("baton-spool") {
                    &mut c.gateway
                } else if name.starts_with(UPSTREAM_THREADS) {
                    &mut c.upstream
                } else if name.starts_with(CLIENT_THREADS) {
                    &mut c.client
                } else {
                    &mut c.rest
                };
                *slot += cpu;
            }
        }
        if let Some(pid) = nginx {
            c.nginx = tree_cpu(pid);
        }
        c
    }

    /// What was spent since `before` (threads that exited meanwhile are
    /// not counted).
    fn since(&self, before: &Self) -> Self {
        Self {
            gateway: self.gateway.saturating_sub(before.gateway),
            upstream: self.upstream.saturating_sub(before.upstream),
            client: self.client.saturating_sub(before.client),
            rest: self.rest.saturating_sub(before.rest),
            nginx: self.nginx.saturating_sub(before.nginx),
        }
    }

    /// Microseconds per request of each part.
    fn per(&self, n: u64) -> BTreeMap<&'static str, f64> {
        let per = |d: Duration| micros(d) / n.max(1) as f64;
        BTreeMap::from([
            ("gateway", per(self.gateway)),
            ("nginx", per(self.nginx)),
            ("upstream", per(self.upstream)),
            ("client", per(self.client)),
            ("broker_and_rest", per(self.rest)),
        ])
    }
}

/// CPU of process `pid` and its children (nginx's master and workers).
fn tree_cpu(pid: u32) -> Duration {
    let mut total = stats::cpu_of(&format!("/proc/{pid}/stat")).unwrap_or_default();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return total;
    };
    for p in procs.flatten() {
        let path = p.path().join("stat");
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok());
        if ppid == Some(pid) {
            total += path.to_str().and_then(stats::cpu_of).unwrap_or_default();
        }
    }
    total
}

// -------------------------------------------------------------------- load

/// Counters shared by the client tasks of one rate measurement.
#[derive(Debug, Default)]
struct Shared {
    measuring: AtomicBool,
    stop: AtomicBool,
    ok: AtomicU64,
    errors: AtomicU64,
    first_error: Mutex<Option<String>>,
    tls: Mutex<Option<TlsInfo>>,
}

impl Shared {
    fn failed(&self, e: &anyhow::Error) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self
            .first_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(format!("{e:#}"));
        }
    }

    fn saw(&self, info: Option<TlsInfo>) {
        if info.is_some() {
            let mut tls = self.tls.lock().unwrap_or_else(PoisonError::into_inner);
            if tls.is_none() {
                *tls = info;
            }
        }
    }
}

/// One rate measurement's result.
#[derive(Debug)]
struct Rate {
    label: &'static str,
    per_s: f64,
    n: u64,
    errors: u64,
    first_error: Option<String>,
    calls: Summary,
    cpu: Cpu,
    tls: Option<TlsInfo>,
    /// Reports in the gateway's spool when the clock stopped, and how long
    /// they took to reach the broker after it.
    spool_left: Option<(usize, Duration)>,
}

impl Rate {
    fn cpu_per_call(&self) -> BTreeMap<&'static str, f64> {
        self.cpu.per(self.n)
    }

    fn json(&self) -> serde_json::Value {
        json!({
            "per_s": self.per_s,
            "n": self.n,
            "errors": self.errors,
            "first_error": self.first_error,
            "call": self.calls.json(),
            "cpu_us_per_call": self.cpu_per_call(),
            "tls": self.tls.map(|t| t.text()),
            "spool_left": self.spool_left.map(|(n, _)| n),
            "spool_drain_s": self.spool_left.map(|(_, d)| d.as_secs_f64()),
        })
    }
}

/// Load against `t` from `c` client tasks on `rt`: each makes a new
/// connection per call (`fresh`) or keeps one. Counts the calls that end
/// within the measured `dur`, after `warmup`.
#[allow(clippy::too_many_arguments)]
async fn rate(
    rt: &Runtime,
    t: &Target,
    fresh: bool,
    c: usize,
    warmup: Duration,
    dur: Duration,
    nginx: Option<u32>,
    spool: Option<&Path>,
) -> anyhow::Result<Rate> {
    let shared = Arc::new(Shared::default());
    let tasks: Vec<_> = (0..c)
        .map(|_| {
            let (shared, t) = (shared.clone(), t.clone());
            rt.spawn(async move {
                let mut times = Vec::new();
                let mut conn: Option<Sender> = None;
                while !shared.stop.load(Ordering::Relaxed) {
                    let start = Instant::now();
                    let sender = match conn.take() {
                        Some(s) if !fresh => Ok(s),
                        _ => connect(&t).await.map(|(s, info)| {
                            shared.saw(info);
                            s
                        }),
                    };
                    let result = match sender {
                        Ok(mut s) => {
                            let r = call(&mut s, &t).await;
                            if r.is_ok() && !fresh {
                                conn = Some(s);
                            }
                            r
                        }
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(()) => {
                            shared.ok.fetch_add(1, Ordering::Relaxed);
                            if shared.measuring.load(Ordering::Relaxed) {
                                times.push(start.elapsed());
                            }
                        }
                        Err(e) => {
                            shared.failed(&e);
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                times
            })
        })
        .collect();
    tokio::time::sleep(warmup).await;
    let (ok0, err0, cpu0) = (
        shared.ok.load(Ordering::Relaxed),
        shared.errors.load(Ordering::Relaxed),
        Cpu::now(nginx),
    );
    let start = Instant::now();
    shared.measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(dur).await;
    let (ok1, err1, cpu1) = (
        shared.ok.load(Ordering::Relaxed),
        shared.errors.load(Ordering::Relaxed),
        Cpu::now(nginx),
    );
    let secs = start.elapsed().as_secs_f64();
    shared.measuring.store(false, Ordering::Relaxed);
    shared.stop.store(true, Ordering::Relaxed);
    let spool_at_stop = spool.map(spool_pending);
    let mut times = Vec::new();
    for task in tasks {
        times.extend(task.await?);
    }
    let spool_left = match (spool, spool_at_stop) {
        (Some(dir), Some(left)) => Some((left, drain(dir, Duration::from_secs(120)).await?)),
        _ => None,
    };
    let n = ok1 - ok0;
    if n == 0 {
        bail!(
            "{}: no call succeeded in {secs:.1} s ({} errors; first: {})",
            t.label,
            err1 - err0,
            shared
                .first_error
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .as_deref()
                .unwrap_or("none")
        );
    }
    let first_error = shared
        .first_error
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let tls = *shared.tls.lock().unwrap_or_else(PoisonError::into_inner);
    Ok(Rate {
        label: t.label,
        per_s: n as f64 / secs,
        n,
        errors: err1 - err0,
        first_error,
        calls: Summary::of(times),
        cpu: cpu1.since(&cpu0),
        tls,
        spool_left,
    })
}

/// Reports on disk in a gateway's spool (its segments; a segment is
/// removed once every report in it was delivered, so this comes down to 0
/// once everything was).
fn spool_pending(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(SPOOL_PREFIX) && n.ends_with(".jsonl"))
        })
        .filter_map(|e| std::fs::read(e.path()).ok())
        .map(|b| b.iter().filter(|&&c| c == b'\n').count())
        .sum()
}

/// Waits until the gateway has delivered its spool to the broker; returns
/// how long that took.
async fn drain(dir: &Path, patience: Duration) -> anyhow::Result<Duration> {
    let start = Instant::now();
    while spool_pending(dir) > 0 {
        if start.elapsed() > patience {
            bail!(
                "{} reports still in the gateway's spool after {} s",
                spool_pending(dir),
                patience.as_secs()
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(start.elapsed())
}

/// Sequential calls on one kept-alive connection per target, in
/// interleaved rounds; between targets, waits until a gateway's spool is
/// delivered so one target's background work does not land in the next
/// one's figures. Each round ends with `fsyncs / rounds` appends +
/// fdatasync in `fsync_dir` (what one group commit of the gateway's spool
/// costs, timed beside the calls). On its own single-threaded runtime
/// (no cross-thread wake-ups in the timed path).
fn latencies(
    targets: Vec<(Target, Option<PathBuf>)>,
    warmup: usize,
    calls: usize,
    rounds: usize,
    fsync_dir: &Path,
    fsyncs: usize,
) -> anyhow::Result<(Vec<Vec<Duration>>, Vec<Duration>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let fsync_path = fsync_dir.join("fsync-reference");
    let result = rt.block_on(async {
        let mut conns = Vec::with_capacity(targets.len());
        for (t, _) in &targets {
            let (mut s, _) = connect(t).await?;
            for _ in 0..warmup {
                call(&mut s, t).await?;
            }
            conns.push(s);
        }
        let mut fsync_file = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&fsync_path)?;
        let rounds = rounds.max(1);
        let per_round = calls.div_ceil(rounds);
        let mut out = vec![Vec::with_capacity(per_round * rounds); targets.len()];
        let mut synced = Vec::with_capacity(fsyncs);
        for _ in 0..rounds {
            for (((t, spool), s), times) in targets.iter().zip(&mut conns).zip(&mut out) {
                // A connection the server closed while idle is replaced
                // before the clock runs; a few calls warm the path again.
                for _ in 0..20 {
                    if s.is_closed() || call(s, t).await.is_err() {
                        *s = connect(t).await?.0;
                    }
                }
                for _ in 0..per_round {
                    let start = Instant::now();
                    call(s, t).await?;
                    times.push(start.elapsed());
                }
                if let Some(dir) = spool {
                    drain(dir, Duration::from_secs(60)).await?;
                }
            }
            synced.extend(fsync_times(&mut fsync_file, fsyncs.div_ceil(rounds))?);
        }
        Ok((out, synced))
    });
    let _ = std::fs::remove_file(&fsync_path);
    result
}

/// `n` times: append ~300 bytes (a report's size) to `f` and fdatasync.
fn fsync_times(f: &mut std::fs::File, n: usize) -> anyhow::Result<Vec<Duration>> {
    use std::io::Write as _;
    let line = [b'x'; 300];
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        f.write_all(&line)?;
        f.sync_data()?;
        v.push(s.elapsed());
    }
    Ok(v)
}

/// `Engine::authorize_call` alone, `n` times, on the call the gateway
/// decides (the researcher's `crm.search` on `dataset:crm`).
fn cedar_alone(engine: &baton_policy::Engine, n: usize) -> anyhow::Result<Summary> {
    let agent = SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}{RESEARCHER}"))?;
    let chain = [
        agent.clone(),
        SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}{PLANNER}"))?,
    ];
    let purpose: Purpose = PURPOSE.parse()?;
    let scope = Scope::parse(SCOPE)?;
    let req = baton_policy::CallRequest {
        agent: &agent,
        chain: &chain,
        initiator: "alice",
        tool: "crm.search",
        resource: "dataset:crm",
        purpose: &purpose,
        scope: &scope,
        risk: RiskTier::Read,
        depth: 1,
    };
    if !engine.authorize_call(&req).allowed {
        bail!("the example policies refuse the researcher's crm.search");
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let s = Instant::now();
        std::hint::black_box(engine.authorize_call(&req));
        v.push(s.elapsed());
    }
    Ok(Summary::of(v))
}

/// The filesystem type `path` is on, from /proc/mounts.
fn fs_type(path: &Path) -> String {
    let path = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_, at, kind) = (f.next()?, f.next()?, f.next()?);
            path.starts_with(at).then(|| (at.len(), kind.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map_or_else(|| "unknown".into(), |(_, kind)| kind)
}

// ------------------------------------------------------------------- setup

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The researcher's credential for the gateway's audience: a task started
/// for the planner, delegated to the researcher, redeemed by a node.
/// Returns its mTLS identity and token.
async fn researcher(broker: &Broker) -> anyhow::Result<(ClientIdentity, String)> {
    let td = broker.trust_domain().clone();
    let planner = td.id(PLANNER)?;
    let researcher = td.id(RESEARCHER)?;
    let (node_id, node_identity) = broker.attest_node().await?;
    let selector = format!("unix:uid:{}", cluster::own_uid()?);
    broker.create_entry(PLANNER, &node_id, &selector).await?;
    broker.create_entry(RESEARCHER, &node_id, &selector).await?;
    let node = broker.node_client(node_identity)?;
    let redeem_url = format!("{}/v1/node/redeem", broker.url());

    let scope = Scope::parse(SCOPE)?;
    let purpose: Purpose = PURPOSE.parse()?;
    let started: StartTaskResponse = broker
        .start_read_task(&planner, &purpose, &scope, AUDIENCE)
        .await?;
    let planner_key = WorkloadKey::generate()?;
    let planner_cred: TaskCredential = post(
        &node,
        &redeem_url,
        &RedeemRequest {
            grant: started.grant.grant,
            spiffe_id: planner.clone(),
            csr_der: planner_key.csr_der(&planner)?,
        },
    )
    .await?;
    let holder = broker.node_client(ClientIdentity::new(
        planner_cred.cert_chain_der,
        planner_key.pkcs8_der(),
    )?)?;
    let grant: HandoffGrant = post(
        &holder,
        &format!("{}/v1/delegate", broker.url()),
        &DelegateRequest {
            token: planner_cred.token,
            target: researcher.clone(),
            scope,
            purpose,
            audience: vec![AUDIENCE.into()],
            justification: "look up the customer's open cases".into(),
            ttl_secs: None,
        },
    )
    .await?;
    let key = WorkloadKey::generate()?;
    let cred: TaskCredential = post(
        &node,
        &redeem_url,
        &RedeemRequest {
            grant: grant.grant,
            spiffe_id: researcher.clone(),
            csr_der: key.csr_der(&researcher)?,
        },
    )
    .await?;
    let identity = ClientIdentity::new(cred.cert_chain_der, key.pkcs8_der())?;
    Ok((identity, cred.token.expose().to_owned()))
}

/// The gateway's SVID (chain, PKCS#8 key) from the Workload API, once the
/// daemon serves it.
async fn gateway_svid(socket: &Path, id: &SpiffeId) -> anyhow::Result<(Vec<Vec<u8>>, Vec<u8>)> {
    let mut client = SpiffeWorkloadApiClient::new(cluster::connect_uds(socket.to_owned()).await?);
    for _ in 0..100 {
        let answer = match client.fetch_x509svid(cluster::x509_request()).await {
            Ok(stream) => stream.into_inner().message().await,
            Err(e) => Err(e),
        };
        if let Ok(Some(msg)) = answer
            && let Some(svid) = msg.svids.iter().find(|s| s.spiffe_id == id.as_str())
        {
            return Ok((
                cluster::split_der(&svid.x509_svid)?,
                svid.x509_svid_key.clone(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the node daemon never served {id}")
}

fn cedar() -> anyhow::Result<baton_policy::Engine> {
    let (schema, policies): (Vec<_>, Vec<_>) = baton_broker::EXAMPLE_POLICIES
        .iter()
        .map(|(name, src)| ((*name).to_owned(), (*src).to_owned()))
        .partition(|(name, _)| name.ends_with(".cedarschema"));
    let schema = schema
        .into_iter()
        .next()
        .map(|(_, s)| s)
        .context("no schema among the example policies")?;
    Ok(baton_policy::Engine::from_sources(&schema, &policies)?)
}

/// A gateway running on the gateway runtime; `stop` shuts it down.
struct Gateway {
    addr: SocketAddr,
    spool: PathBuf,
    stop: oneshot::Sender<()>,
    task: tokio::task::JoinHandle<Result<(), baton_gateway::GatewayError>>,
}

impl Gateway {
    async fn start(
        rt: &Runtime,
        dir: &Path,
        broker_url: &str,
        upstream: SocketAddr,
        socket: &Path,
        policy: Arc<dyn baton_verify::CallPolicy>,
    ) -> anyhow::Result<Self> {
        let spool = dir.join("spool");
        std::fs::create_dir_all(&spool)?;
        let text = format!(
            r#"listen = "127.0.0.1:0"
audience = "{AUDIENCE}"
broker-url = "{broker_url}"
spiffe-id = "spiffe://{TRUST_DOMAIN}{GATEWAY_PATH}"
spool = "{spool}"

[upstreams.crm]
url = "http://{upstream}"

[[routes]]
method = "GET"
path = "/crm/accounts/{{account}}"
upstream = "crm"
tool = "crm.search"
resource = "dataset:crm"
permission = "tool:crm.search:read"
tier = "read"
"#,
            spool = spool.display(),
        );
        let config = baton_gateway::Config::parse(Path::new("gateway.toml"), &text)
            .map_err(|e| anyhow!("{e}"))?;
        let ready = dir.join("ready");
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = rt.spawn(baton_gateway::run(
            baton_gateway::RunOptions {
                config,
                endpoint: format!("unix:{}", socket.display()),
                policy,
                ops: None,
                ready_file: Some(ready.clone()),
                shutdown_grace: Duration::from_secs(10),
                reload: None,
            },
            async move {
                let _ = stop_rx.await;
            },
        ));
        let start = Instant::now();
        let addr = loop {
            if let Ok(text) = std::fs::read_to_string(&ready)
                && let Ok(addr) = text.trim().parse::<SocketAddr>()
            {
                break addr;
            }
            if task.is_finished() {
                match task.await {
                    Ok(Err(e)) => bail!("the gateway failed to start: {e}"),
                    _ => bail!("the gateway stopped before it was ready"),
                }
            }
            if start.elapsed() > Duration::from_secs(60) {
                bail!("the gateway was not ready within 60 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        Ok(Self {
            addr,
            spool,
            stop,
            task,
        })
    }

    async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(());
        match tokio::time::timeout(Duration::from_secs(30), self.task).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(e))) => Err(anyhow!("the gateway stopped with an error: {e}")),
            Ok(Err(e)) => Err(anyhow!("the gateway's task failed: {e}")),
            Err(_) => Err(anyhow!("the gateway did not stop within 30 s")),
        }
    }
}

/// A private nginx: `ssl_verify_client on` in front of the upstream.
struct Nginx {
    child: Child,
    addr: SocketAddr,
}

impl Nginx {
    /// `svid`: the server's chain and key (PKCS#8 DER); `bundle_pem`: the
    /// client CAs.
    async fn start(
        binary: &Path,
        dir: &Path,
        workers: usize,
        upstream: SocketAddr,
        svid: &(Vec<Vec<u8>>, Vec<u8>),
        bundle_pem: &str,
    ) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let chain: String = svid.0.iter().map(|c| pem("CERTIFICATE", c)).collect();
        std::fs::write(dir.join("server.pem"), chain)?;
        {
            use std::io::Write as _;
            use std::os::unix::fs::OpenOptionsExt as _;
            let mut key = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(dir.join("server.key"))?;
            key.write_all(pem("PRIVATE KEY", &svid.1).as_bytes())?;
        }
        std::fs::write(dir.join("clients.pem"), bundle_pem)?;
        let d = dir.display();
        let conf = format!(
            r#"worker_processes {workers};
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream crm {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen {addr} ssl;
        ssl_protocols TLSv1.3;
        ssl_certificate {d}/server.pem;
        ssl_certificate_key {d}/server.key;
        ssl_client_certificate {d}/clients.pem;
        ssl_verify_client on;
        ssl_verify_depth 4;
        ssl_session_cache off;
        ssl_session_tickets off;
        keepalive_requests 1000000;
        keepalive_timeout 120s;
        location / {{
            proxy_pass http://crm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"#
        );
        let conf_path = dir.join("nginx.conf");
        std::fs::write(&conf_path, conf)?;
        let child = Command::new(binary)
            .arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("error.log"))
            .arg("-c")
            .arg(&conf_path)
            .args(["-g", "daemon off;"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("stderr.log"))?)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut nginx = Self { child, addr };
        let start = Instant::now();
        loop {
            if TcpStream::connect(addr).await.is_ok() {
                return Ok(nginx);
            }
            if nginx.child.try_wait()?.is_some() || start.elapsed() > Duration::from_secs(15) {
                let log = std::fs::read_to_string(dir.join("error.log")).unwrap_or_default()
                    + &std::fs::read_to_string(dir.join("stderr.log")).unwrap_or_default();
                nginx.stop();
                bail!("nginx did not start: {}", log.trim());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM to the master (it stops its workers), SIGKILL if it lingers.
    fn stop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(None)) {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(5) {
            if !matches!(self.child.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `name` as given if it has a slash, else the first match on PATH.
fn find_binary(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return p.is_file().then_some(p);
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

// --------------------------------------------------------------------- run

pub async fn run(a: Args) -> anyhow::Result<()> {
    let nproc = stats::cores();
    let workers = a.workers.unwrap_or(nproc).max(1);
    let warmup = Duration::from_secs_f64(a.warmup_seconds);
    let dur = Duration::from_secs_f64(a.seconds);
    let c = a.concurrency.max(1);

    let td_id = |path: &str| SpiffeId::parse(&format!("spiffe://{TRUST_DOMAIN}{path}"));
    let gateway_id = td_id(GATEWAY_PATH)?;
    let served_by = gateway_id.clone();
    let broker = Broker::start_with(TRUST_DOMAIN, move |cfg, _| {
        cfg.dev_issuer = true;
        // Only a tool server of the token's audience may report its calls.
        cfg.delegation
            .tool_servers
            .insert(AUDIENCE.into(), vec![served_by]);
    })
    .await?;
    let token = broker.join_token().await?;
    let selector = format!("unix:uid:{}", cluster::own_uid()?);
    broker
        .create_entry(GATEWAY_PATH, &token.node_id, &selector)
        .await?;
    let socket = broker.dir.path().join("agent.sock");
    let agent = Agent::start(
        &broker,
        &token,
        socket.clone(),
        baton_agent::DEFAULT_SYNC_INTERVAL,
    )
    .await?;
    let svid = gateway_svid(&socket, &gateway_id).await?;
    let (identity, bearer) = researcher(&broker).await?;

    let scratch = tempfile::tempdir()?;
    let spool_base = a
        .spool_dir
        .clone()
        .unwrap_or_else(|| scratch.path().join("spools"));
    std::fs::create_dir_all(&spool_base)?;
    let spool_fs = fs_type(&spool_base);

    let upstream = start_upstream(nproc)?;
    let gw_part = Part::new(workers, GATEWAY_THREADS)?;
    let gw_rt = gw_part.rt()?;
    let client_part = Part::new(nproc, CLIENT_THREADS)?;
    let client_rt = client_part.rt()?;

    let run_dir = tempfile::Builder::new()
        .prefix("baton-bench-gateway")
        .tempdir_in(&spool_base)?;
    let cedar_dir = run_dir.path().join("cedar");
    let allow_dir = run_dir.path().join("allow");
    let cedar_gw = Gateway::start(
        gw_rt,
        &cedar_dir,
        &broker.url(),
        upstream.addr,
        &socket,
        Arc::new(cedar()?),
    )
    .await?;
    // The lightest policy path the gateway has: a CallPolicy that allows
    // everything (in-process only: `baton gateway` always loads Cedar).
    let allow_all = |_: &baton_verify::CallContext<'_>| baton_verify::PolicyDecision {
        allowed: true,
        ..baton_verify::PolicyDecision::default()
    };
    let allow_gw = Gateway::start(
        gw_rt,
        &allow_dir,
        &broker.url(),
        upstream.addr,
        &socket,
        Arc::new(allow_all),
    )
    .await?;

    let nginx_bin = find_binary(&a.nginx);
    let nginx_dir = scratch.path().join("nginx");
    std::fs::create_dir_all(&nginx_dir)?;
    let mut nginx = match &nginx_bin {
        Some(bin) => Some(
            Nginx::start(
                bin,
                &nginx_dir,
                workers,
                upstream.addr,
                &svid,
                &broker.ready.bundle_pem,
            )
            .await?,
        ),
        None => None,
    };
    let nginx_version = nginx_bin.as_ref().and_then(|b| {
        Command::new(b)
            .arg("-v")
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
    });
    let nginx_pid = nginx.as_ref().map(Nginx::pid);

    let bundles = broker.bundles()?;
    let mut bearer = HeaderValue::from_str(&format!("Bearer {bearer}"))?;
    bearer.set_sensitive(true);
    let tls = client_tls(identity, bundles, gateway_id.clone())?;
    let target = |label, addr: SocketAddr, tls: Option<TlsConnector>| -> anyhow::Result<Target> {
        Ok(Target {
            label,
            addr,
            tls,
            host: HeaderValue::from_str(&addr.to_string())?,
            bearer: bearer.clone(),
        })
    };
    let direct = target("upstream direct", upstream.addr, None)?;
    let gw_cedar = target("gateway (Cedar)", cedar_gw.addr, Some(tls.clone()))?;
    let gw_allow = target(
        "gateway (allow-all policy)",
        allow_gw.addr,
        Some(tls.clone()),
    )?;
    let ngx = match &nginx {
        Some(n) => Some(target("nginx ssl_verify_client", n.addr, Some(tls))?),
        None => None,
    };

    println!(
        "# baton-bench gateway (nproc {nproc}; gateway: {workers} Tokio worker threads; nginx: worker_processes {workers}; upstream: hyper HTTP/1.1 on {nproc} threads; client: hyper HTTP/1.1 over rustls on {nproc} threads; TLS 1.3 only, no resumption on either server)"
    );
    match (&nginx_version, &nginx_bin) {
        (Some(v), Some(_)) => println!(
            "nginx: {v}, ssl_verify_client on, proxy_pass with keepalive 64 to the same upstream"
        ),
        _ => println!(
            "nginx: `{}` not found on PATH; the nginx rows are skipped (apt-get install nginx)",
            a.nginx
        ),
    }
    println!(
        "reports: every call's report goes to the gateway's spool ({spool_fs}), group-committed by its writer thread (this route is read tier: the answer does not wait for the fsync); delivered to the broker in the background"
    );

    // 1. Full handshakes.
    println!(
        "full handshakes: a new TCP connection + TLS 1.3 mTLS handshake + one GET per connection, {c} clients, {:.0} s after {:.0} s warm-up",
        a.seconds, a.warmup_seconds
    );
    let mut hs: Vec<Rate> = Vec::new();
    if let Some(t) = &ngx {
        hs.push(rate(client_rt, t, true, c, warmup, dur, nginx_pid, None).await?);
    }
    hs.push(
        rate(
            client_rt,
            &gw_cedar,
            true,
            c,
            warmup,
            dur,
            None,
            Some(&cedar_gw.spool),
        )
        .await?,
    );
    hs.push(
        rate(
            client_rt,
            &gw_allow,
            true,
            c,
            warmup,
            dur,
            None,
            Some(&allow_gw.spool),
        )
        .await?,
    );
    let nginx_hs = ngx.as_ref().and_then(|_| hs.first()).map(|r| r.per_s);
    let hs_peers: Vec<_> = ngx
        .iter()
        .zip(nginx_hs)
        .map(|(t, n)| (t.label, "nginx", n))
        .collect();
    for r in &hs {
        print_rate(r, &hs_peers, "target >= 1");
    }

    // 2. Kept-alive requests.
    println!(
        "kept-alive requests: {c} connections, each sequential calls, {:.0} s after {:.0} s warm-up",
        a.seconds, a.warmup_seconds
    );
    let mut ka: Vec<Rate> = Vec::new();
    ka.push(rate(client_rt, &direct, false, c, warmup, dur, None, None).await?);
    if let Some(t) = &ngx {
        ka.push(rate(client_rt, t, false, c, warmup, dur, nginx_pid, None).await?);
    }
    ka.push(
        rate(
            client_rt,
            &gw_cedar,
            false,
            c,
            warmup,
            dur,
            None,
            Some(&cedar_gw.spool),
        )
        .await?,
    );
    ka.push(
        rate(
            client_rt,
            &gw_allow,
            false,
            c,
            warmup,
            dur,
            None,
            Some(&allow_gw.spool),
        )
        .await?,
    );
    let direct_rate = ka.first().map(|r| r.per_s);
    let nginx_rate = ngx.as_ref().and_then(|_| ka.get(1)).map(|r| r.per_s);
    let mut ka_peers: Vec<_> = direct_rate
        .map(|d| (direct.label, "direct", d))
        .into_iter()
        .collect();
    ka_peers.extend(
        ngx.iter()
            .zip(nginx_rate)
            .map(|(t, n)| (t.label, "nginx", n)),
    );
    for r in &ka {
        print_rate(r, &ka_peers, "");
    }

    // 3. Latency added per call.
    let mut lat_targets = vec![
        (direct.clone(), None),
        (gw_allow.clone(), Some(allow_gw.spool.clone())),
        (gw_cedar.clone(), Some(cedar_gw.spool.clone())),
    ];
    if let Some(t) = &ngx {
        lat_targets.insert(1, (t.clone(), None));
    }
    let labels: Vec<&'static str> = lat_targets.iter().map(|(t, _)| t.label).collect();
    let (tx, rx) = oneshot::channel();
    let (warm, calls, rounds) = (a.latency_warmup, a.latency_calls, a.latency_rounds);
    let (fsync_dir, fsyncs) = (spool_base.clone(), a.fsyncs);
    std::thread::Builder::new()
        .name(format!("{CLIENT_THREADS}-l"))
        .spawn(move || {
            let _ = tx.send(latencies(
                lat_targets,
                warm,
                calls,
                rounds,
                &fsync_dir,
                fsyncs,
            ));
        })?;
    let (lat, fsync) = rx.await.map_err(|_| anyhow!("the latency thread died"))??;
    let lat: Vec<Summary> = lat.into_iter().map(Summary::of).collect();
    let fsync = Summary::of(fsync);
    let cedar_ref = tokio::task::block_in_place(|| cedar_alone(&cedar()?, a.cedar_calls))?;
    println!(
        "latency per call, seen token: sequential calls on one kept-alive connection per target, {} rounds interleaved, {} calls per target after {} warm-up; added = target - upstream direct",
        rounds.max(1),
        lat.first().map_or(0, |s| s.n),
        warm
    );
    let base = lat.first().copied().unwrap_or_default();
    let mut lat_json = serde_json::Map::new();
    for (label, s) in labels.iter().zip(&lat) {
        let added = (minus_us(s.p50, base.p50), minus_us(s.p99, base.p99));
        if *label == direct.label {
            println!("  {label}: {}", s.text());
        } else {
            println!(
                "  {label}: {}; added p50 {:.0} us, p99 {:.0} us = {:.2}x the 100 us p99 target",
                s.text(),
                added.0,
                added.1,
                added.1 / micros(ADDED_P99_TARGET)
            );
        }
        lat_json.insert(
            (*label).to_owned(),
            json!({
                "call": s.json(),
                "added_p50_us": added.0,
                "added_p99_us": added.1,
                "added_p99_ratio_to_100us": added.1 / micros(ADDED_P99_TARGET),
            }),
        );
    }
    println!(
        "  reference: 300 B append + fdatasync in the spool's directory ({spool_fs}), timed between the rounds: {} (one per group commit of the spool's writer, off the read call's path)",
        fsync.text()
    );
    let by_label = |l: &str| labels.iter().position(|x| *x == l).and_then(|i| lat.get(i));
    let cedar_in_gateway =
        by_label(gw_cedar.label)
            .zip(by_label(gw_allow.label))
            .map(|(with, without)| {
                (
                    minus_us(with.p50, without.p50),
                    minus_us(with.p99, without.p99),
                )
            });
    println!(
        "  reference: Cedar authorize_call alone on the same call, example policies: {}; gateway with Cedar - gateway allow-all: p50 {}, p99 {}",
        cedar_ref.text(),
        cedar_in_gateway.map_or_else(|| "n/a".into(), |d| format!("{:.0} us", d.0)),
        cedar_in_gateway.map_or_else(|| "n/a".into(), |d| format!("{:.0} us", d.1)),
    );

    let upstream_served = upstream.served.load(Ordering::Relaxed);
    println!(
        "{}",
        json!({
            "bench": "gateway",
            "unix_time": stats::unix_now(),
            "nproc": nproc,
            "gateway_worker_threads": workers,
            "nginx_worker_processes": nginx.as_ref().map(|_| workers),
            "nginx": nginx_version,
            "concurrency": c,
            "seconds": a.seconds,
            "spool_fs": spool_fs,
            "fsync": fsync.json(),
            "cedar_authorize_call": cedar_ref.json(),
            "cedar_in_gateway_p50_us": cedar_in_gateway.map(|d| d.0),
            "cedar_in_gateway_p99_us": cedar_in_gateway.map(|d| d.1),
            "handshakes": hs.iter().map(|r| (r.label, r.json())).collect::<BTreeMap<_, _>>(),
            "handshakes_over_nginx": ratios(&hs, nginx_hs),
            "keepalive": ka.iter().map(|r| (r.label, r.json())).collect::<BTreeMap<_, _>>(),
            "keepalive_over_direct": ratios(&ka, direct_rate),
            "keepalive_over_nginx": ratios(&ka, nginx_rate),
            "latency": lat_json,
            "upstream_served": upstream_served,
        })
    );

    // Tear down: nginx, the gateways (their spools are delivered), the rest.
    if let Some(n) = nginx.as_mut() {
        n.stop();
    }
    cedar_gw.stop().await?;
    allow_gw.stop().await?;
    drop((client_part, gw_part, upstream));
    agent.stop().await;
    Ok(())
}

/// Each row's rate over `base`, by label.
fn ratios(rows: &[Rate], base: Option<f64>) -> BTreeMap<&'static str, f64> {
    base.map(|b| rows.iter().map(|r| (r.label, r.per_s / b)).collect())
        .unwrap_or_default()
}

/// One rate line: rate, ratio to each peer (`(label, name, rate)`; not
/// to itself), server CPU per call, TLS.
fn print_rate(r: &Rate, peers: &[(&str, &str, f64)], note: &str) {
    let ratios: Vec<String> = peers
        .iter()
        .filter(|(label, _, _)| *label != r.label)
        .map(|(_, name, rate)| format!("{:.2}x {name}", r.per_s / rate))
        .chain((!note.is_empty() && r.label.starts_with("gateway")).then(|| note.to_owned()))
        .collect();
    let ratio = if ratios.is_empty() {
        "the peer".to_owned()
    } else {
        ratios.join(", ")
    };
    let cpu = r.cpu_per_call();
    let get = |k: &str| cpu.get(k).copied().unwrap_or_default();
    let server = if r.label.starts_with("nginx") {
        format!("nginx {:.0} us", get("nginx"))
    } else if r.label.starts_with("gateway") {
        format!(
            "gateway {:.0} us + broker/daemon {:.0} us",
            get("gateway"),
            get("broker_and_rest")
        )
    } else {
        "-".into()
    };
    println!(
        "  {}: {:.0}/s ({ratio}); call {}; CPU per call: {server}, upstream {:.0} us, client {:.0} us{}{}{}",
        r.label,
        r.per_s,
        r.calls.text(),
        get("upstream"),
        get("client"),
        r.tls
            .map_or_else(String::new, |t| format!("; {}", t.text())),
        if r.errors > 0 {
            format!(
                "; {} errors (first: {})",
                r.errors,
                r.first_error.as_deref().unwrap_or("?")
            )
        } else {
            String::new()
        },
        r.spool_left.map_or_else(String::new, |(n, d)| format!(
            "; {n} reports still spooled at the end, delivered {:.2} s later",
            d.as_secs_f64()
        )),
    );
}
