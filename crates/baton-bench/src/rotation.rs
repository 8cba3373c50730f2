//! `baton-bench rotation`: an X.509 CA rotation under load, timed from
//! `ca taint` to the last affected SVID re-issued, with a count of failed
//! mTLS handshakes through the whole rotation.
//!
//! Broker and node daemon run in this process (automatic rotation
//! schedule off). N entries sit under the daemon's node, each delivered to
//! its own workload over its own Workload API stream:
//!
//! - `--observers processes` (default, needs root): one child process per
//!   workload (`baton-bench rotation-workload`), each started with its own
//!   uid, each entry selecting that uid. Every workload gets exactly its
//!   one SVID, as N workloads on one node would. A child prints the arrival
//!   time (wall clock, shared by the processes of one machine) and the
//!   leaf's authorityKeyIdentifier of every message it receives.
//! - `--observers stream`: one stream in this process, whose every message
//!   carries all N SVIDs (every entry selects this process's uid); an SVID
//!   counts as delivered when that stream first carries it re-signed.
//!
//! Meanwhile an mTLS server and M client loops in this process, each
//! following the Workload API with its own stream (SVID and bundle swapped
//! on every update, as `baton example echo-server/echo-client` do), make a
//! full TLS handshake plus one HTTP/1.1 request per call (resumption is off
//! in Baton's TLS configs), from before `prepare` until after `revoke` has
//! reached them. Any failed call fails the command.

use std::collections::HashMap;
use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use baton_broker::rotation::{ActivateRequest, AuthorityRequest, CaStatus, PrepareRequest};
use baton_ca::{AuthorityKind, AuthorityState};
use baton_core::{SpiffeId, TrustDomain};
use baton_proto::workload::X509svidResponse;
use baton_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use baton_tls::{ClientAuth, ClientIdentity, PeerIdentity, PeerPolicy, ServerIdentity};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_rustls::TlsConnector;
use tonic::Streaming;
use tonic::transport::Channel;
use warp::Filter as _;

use crate::cluster::{self, Agent, Broker};
use crate::stats::{self, percentile};

/// The node daemon waits at least this long between two syncs.
const DAEMON_MIN_SYNC: Duration = Duration::from_secs(1);
/// How often the broker's view is polled while re-issuance runs.
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Observers {
    /// One child process per workload, each with its own uid (needs root).
    Processes,
    /// One stream in this process that receives every workload's SVID.
    Stream,
}

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Workloads: entries under the node, each an SVID to re-issue.
    #[arg(long, default_value_t = 1000)]
    workloads: usize,
    /// How the workloads receive their SVIDs.
    #[arg(long, value_enum, default_value_t = Observers::Processes)]
    observers: Observers,
    /// The node daemon's sync interval in milliseconds. A taint reaches
    /// the daemon on its next sync; the daemon never syncs more often than
    /// once a second, whatever this says.
    #[arg(long, default_value_t = 1000)]
    sync_interval_ms: u64,
    /// Concurrent mTLS client loops, each a full handshake per request
    /// (0: no load).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// uid of the first workload process (`--observers processes`); the
    /// others follow it.
    #[arg(long, default_value_t = 200_000)]
    first_uid: u32,
    /// Seconds of load before `prepare` and after `revoke` has reached the
    /// mTLS pair.
    #[arg(long, default_value_t = 2.0)]
    settle: f64,
    /// Seconds to wait for any one step before giving up.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
}

/// `baton-bench rotation-workload`: one workload process.
#[derive(Debug, clap::Args)]
pub struct WorkloadArgs {
    /// The node daemon's Workload API socket.
    #[arg(long)]
    socket: PathBuf,
}

type Client = SpiffeWorkloadApiClient<Channel>;

fn unix_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn millis(nanos: u128) -> f64 {
    nanos as f64 / 1e6
}

/// The authorityKeyIdentifier (hex) of the leaf of a concatenated chain.
fn leaf_authority(chain_concat: &[u8]) -> anyhow::Result<String> {
    let chain = cluster::split_der(chain_concat)?;
    baton_ca::leaf_info(&chain)?
        .authority_id
        .context("the leaf names no authority")
}

/// Opens a FetchX509SVID stream, retrying while the caller is not
/// entitled yet (its SVID not cached) for up to `patience`.
async fn open_stream(
    client: &mut Client,
    patience: Duration,
) -> anyhow::Result<Streaming<X509svidResponse>> {
    let start = Instant::now();
    loop {
        match client.fetch_x509svid(cluster::x509_request()).await {
            Ok(r) => return Ok(r.into_inner()),
            Err(e) if start.elapsed() < patience => {
                if start.elapsed() > Duration::from_secs(5) {
                    eprintln!("FetchX509SVID: {e}; retrying");
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => return Err(anyhow!(e).context("FetchX509SVID")),
        }
    }
}

/// The child process: follows its stream and prints one line per message,
/// `<unix nanos> <leaf authority id> <SVIDs in the message>`.
pub async fn workload_process(a: WorkloadArgs) -> anyhow::Result<()> {
    let mut client = Client::new(cluster::connect_uds(a.socket).await?);
    let mut stream = open_stream(&mut client, Duration::from_secs(60)).await?;
    let mut out = std::io::stdout();
    while let Some(msg) = stream.message().await? {
        let at = unix_nanos();
        let svid = msg.svids.first().context("a message without an SVID")?;
        writeln!(
            out,
            "{at} {} {}",
            leaf_authority(&svid.x509_svid)?,
            msg.svids.len()
        )?;
    }
    Ok(())
}

/// What the workload observers report.
#[derive(Debug)]
enum Event {
    Svid {
        workload: usize,
        at: u128,
        authority: String,
    },
    Ended {
        workload: usize,
        error: Option<String>,
    },
}

/// Per-workload state, fed by [`Event`]s.
#[derive(Debug)]
struct Tracker {
    rx: mpsc::UnboundedReceiver<Event>,
    authority: Vec<Option<String>>,
    /// When each workload first received an SVID of `target`.
    new_at: Vec<Option<u128>>,
    target: Option<String>,
    seen: usize,
    done: usize,
    ended: usize,
    first_error: Option<String>,
}

impl Tracker {
    fn new(rx: mpsc::UnboundedReceiver<Event>, n: usize) -> Self {
        Self {
            rx,
            authority: vec![None; n],
            new_at: vec![None; n],
            target: None,
            seen: 0,
            done: 0,
            ended: 0,
            first_error: None,
        }
    }

    fn apply(&mut self, e: Event) {
        match e {
            Event::Svid {
                workload,
                at,
                authority,
            } => {
                let Some(slot) = self.authority.get_mut(workload) else {
                    return;
                };
                if slot.is_none() {
                    self.seen += 1;
                }
                if self.target.as_ref() == Some(&authority)
                    && let Some(t @ None) = self.new_at.get_mut(workload)
                {
                    *t = Some(at);
                    self.done += 1;
                }
                *slot = Some(authority);
            }
            Event::Ended { workload, error } => {
                self.ended += 1;
                if self.first_error.is_none() {
                    self.first_error = Some(format!(
                        "workload {workload} stopped: {}",
                        error.as_deref().unwrap_or("its stream ended")
                    ));
                }
            }
        }
    }

    fn on(&self, authority: &str) -> usize {
        self.authority
            .iter()
            .filter(|a| a.as_deref() == Some(authority))
            .count()
    }

    /// Consumes events until `done` holds.
    async fn wait(
        &mut self,
        what: &str,
        patience: Duration,
        done: impl Fn(&Self) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + patience;
        while !done(self) {
            if let Some(e) = &self.first_error {
                bail!("{what}: {e}");
            }
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(e)) => self.apply(e),
                Ok(None) => bail!("{what}: every workload observer stopped"),
                Err(_) => bail!(
                    "{what}: timed out after {} s ({} workloads served, {} on the new authority)",
                    patience.as_secs(),
                    self.seen,
                    self.done
                ),
            }
        }
        Ok(())
    }
}

/// Starts one child process per workload, workload `i` as uid
/// `first_uid + i`. Dropping the children kills them.
fn spawn_processes(
    n: usize,
    first_uid: u32,
    socket: &Path,
    tx: &mpsc::UnboundedSender<Event>,
) -> anyhow::Result<Vec<tokio::process::Child>> {
    let exe = std::env::current_exe()?;
    let mut children = Vec::with_capacity(n);
    for i in 0..n {
        let uid = workload_uid(first_uid, i)?;
        let mut child = tokio::process::Command::new(&exe)
            .arg("rotation-workload")
            .arg("--socket")
            .arg(socket)
            .uid(uid)
            .gid(uid)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting workload process {i} as uid {uid}"))?;
        let stdout = child.stdout.take().context("workload process stdout")?;
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            let error = loop {
                match lines.next_line().await {
                    Ok(Some(line)) => {
                        let mut f = line.split(' ');
                        let at = f.next().and_then(|v| v.parse::<u128>().ok());
                        match (at, f.next()) {
                            (Some(at), Some(authority)) => {
                                let _ = tx.send(Event::Svid {
                                    workload: i,
                                    at,
                                    authority: authority.to_owned(),
                                });
                            }
                            _ => break Some(format!("unreadable line {line:?}")),
                        }
                    }
                    Ok(None) => break None,
                    Err(e) => break Some(e.to_string()),
                }
            };
            let _ = tx.send(Event::Ended { workload: i, error });
        });
        children.push(child);
    }
    Ok(children)
}

fn workload_uid(first_uid: u32, i: usize) -> anyhow::Result<u32> {
    u32::try_from(i)
        .ok()
        .and_then(|i| first_uid.checked_add(i))
        .context("--first-uid + --workloads overflows a uid")
}

/// One stream in this process that carries every workload's SVID.
async fn spawn_stream(
    socket: PathBuf,
    ids: &[String],
    patience: Duration,
    tx: mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let index: HashMap<String, usize> = ids
        .iter()
        .enumerate()
        .map(|(i, id)| (id.clone(), i))
        .collect();
    let mut client = Client::new(cluster::connect_uds(socket).await?);
    let mut stream = open_stream(&mut client, patience).await?;
    let n = ids.len();
    tokio::spawn(async move {
        let _client = client;
        let error = loop {
            match stream.message().await {
                Ok(Some(msg)) => {
                    let at = unix_nanos();
                    for s in &msg.svids {
                        let Some(&workload) = index.get(&s.spiffe_id) else {
                            continue;
                        };
                        match leaf_authority(&s.x509_svid) {
                            Ok(authority) => {
                                let _ = tx.send(Event::Svid {
                                    workload,
                                    at,
                                    authority,
                                });
                            }
                            Err(e) => {
                                let _ = tx.send(Event::Ended {
                                    workload,
                                    error: Some(format!("{e:#}")),
                                });
                            }
                        }
                    }
                }
                Ok(None) => break None,
                Err(e) => break Some(e.to_string()),
            }
        };
        for workload in 0..n {
            let _ = tx.send(Event::Ended {
                workload,
                error: error.clone(),
            });
        }
    });
    Ok(())
}

/// A workload's TLS material, kept in step with its Workload API stream
/// (the design of `baton example echo-server/echo-client`, on the raw
/// stream rather than the `spiffe` crate).
struct Live {
    server: ServerIdentity,
    client: ClientIdentity,
    bundles: baton_tls::BundleStore,
    /// X.509 authorities in the bundle last applied.
    authorities: AtomicUsize,
    /// The authority of the SVID last applied.
    svid_authority: Mutex<String>,
    errors: AtomicU64,
}

/// What one Workload API message carries for the SVID `want`.
struct Material {
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
    authorities: Vec<Vec<u8>>,
    authority: String,
}

fn material(msg: &X509svidResponse, want: &str) -> anyhow::Result<Option<Material>> {
    let Some(svid) = msg.svids.iter().find(|s| s.spiffe_id == want) else {
        return Ok(None);
    };
    Ok(Some(Material {
        chain: cluster::split_der(&svid.x509_svid)?,
        key: svid.x509_svid_key.clone(),
        authorities: cluster::split_der(&svid.bundle)?,
        authority: leaf_authority(&svid.x509_svid)?,
    }))
}

impl Live {
    fn apply(&self, msg: &X509svidResponse, want: &str, td: &TrustDomain) -> anyhow::Result<()> {
        let m = material(msg, want)?.context("the update lacks our SVID")?;
        // The bundle first: the new SVID may come from an authority the
        // previous bundle did not carry.
        self.authorities
            .store(m.authorities.len(), Ordering::Relaxed);
        self.bundles.set(td.clone(), m.authorities);
        self.server.replace(m.chain.clone(), &m.key)?;
        self.client.replace(m.chain, &m.key)?;
        *self
            .svid_authority
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = m.authority;
        Ok(())
    }

    fn authority(&self) -> String {
        self.svid_authority
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

/// Opens a stream for the SVID `want` and keeps following it.
async fn follow(
    socket: PathBuf,
    want: &SpiffeId,
    td: &TrustDomain,
    patience: Duration,
) -> anyhow::Result<Arc<Live>> {
    let mut client = Client::new(cluster::connect_uds(socket).await?);
    let mut stream = open_stream(&mut client, patience).await?;
    let want = want.to_string();
    let first = loop {
        let msg = tokio::time::timeout(patience, stream.message())
            .await
            .context("waiting for the mTLS SVIDs")??
            .context("the stream ended")?;
        if let Some(m) = material(&msg, &want)? {
            break m;
        }
    };
    let live = Arc::new(Live {
        server: ServerIdentity::new(first.chain.clone(), &first.key)?,
        client: ClientIdentity::new(first.chain, &first.key)?,
        bundles: baton_tls::BundleStore::new(),
        authorities: AtomicUsize::new(first.authorities.len()),
        svid_authority: Mutex::new(first.authority),
        errors: AtomicU64::new(0),
    });
    live.bundles.set(td.clone(), first.authorities);
    let follower = Arc::clone(&live);
    let td = td.clone();
    tokio::spawn(async move {
        let _client = client;
        while let Ok(Some(msg)) = stream.message().await {
            if let Err(e) = follower.apply(&msg, &want, &td) {
                follower.errors.fetch_add(1, Ordering::Relaxed);
                eprintln!("cannot apply a Workload API update for {want}: {e:#}");
            }
        }
    });
    Ok(live)
}

const PHASES: [&str; 6] = [
    "steady",
    "prepared",
    "activated",
    "tainted",
    "re-issued",
    "revoked",
];

/// The mTLS load and its counters, per phase of the rotation.
#[derive(Debug)]
struct Load {
    phase: AtomicUsize,
    ok: [AtomicU64; PHASES.len()],
    failed: [AtomicU64; PHASES.len()],
    stop: AtomicBool,
    first_error: Mutex<Option<String>>,
}

impl Load {
    fn new() -> Self {
        Self {
            phase: AtomicUsize::new(0),
            ok: [const { AtomicU64::new(0) }; PHASES.len()],
            failed: [const { AtomicU64::new(0) }; PHASES.len()],
            stop: AtomicBool::new(false),
            first_error: Mutex::new(None),
        }
    }

    fn enter(&self, phase: usize) {
        self.phase.store(phase, Ordering::Relaxed);
    }

    fn sum(v: &[AtomicU64]) -> u64 {
        v.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
}

/// One call: TCP connect, a full mTLS handshake, `GET /echo`, and a check
/// that the server saw our SPIFFE ID.
async fn one_call(connector: &TlsConnector, addr: SocketAddr, expect: &str) -> anyhow::Result<()> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let name = rustls::pki_types::ServerName::from(addr.ip());
    let mut tls = connector.connect(name, tcp).await?;
    tls.write_all(b"GET /echo HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await?;
    let mut buf = Vec::with_capacity(512);
    match tls.read_to_end(&mut buf).await {
        Ok(_) => {}
        // A peer that closes without close_notify, after a full answer.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !buf.is_empty() => {}
        Err(e) => return Err(e.into()),
    }
    let text = String::from_utf8_lossy(&buf);
    if !text.starts_with("HTTP/1.1 200") {
        bail!(
            "unexpected answer: {:?}",
            text.lines().next().unwrap_or_default()
        );
    }
    if !text.ends_with(expect) {
        bail!("the server did not see our SPIFFE ID: {text:?}");
    }
    Ok(())
}

async fn client_loop(
    load: Arc<Load>,
    connector: TlsConnector,
    addr: SocketAddr,
    expect: Arc<str>,
) -> Vec<Duration> {
    let mut latencies = Vec::new();
    while !load.stop.load(Ordering::Relaxed) {
        let phase = load.phase.load(Ordering::Relaxed);
        let start = Instant::now();
        let result =
            tokio::time::timeout(Duration::from_secs(10), one_call(&connector, addr, &expect))
                .await
                .unwrap_or_else(|_| Err(anyhow!("no answer within 10 s")));
        match result {
            Ok(()) => {
                latencies.push(start.elapsed());
                if let Some(c) = load.ok.get(phase) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => {
                if let Some(c) = load.failed.get(phase) {
                    c.fetch_add(1, Ordering::Relaxed);
                }
                let mut first = load
                    .first_error
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if first.is_none() {
                    let name = PHASES.get(phase).copied().unwrap_or("?");
                    *first = Some(format!("{name}: {e:#}"));
                }
            }
        }
    }
    latencies
}

fn active_x509(status: &CaStatus) -> anyhow::Result<String> {
    status
        .authorities
        .iter()
        .find(|a| a.status.kind == AuthorityKind::X509 && a.status.state == AuthorityState::Active)
        .map(|a| a.status.id.clone())
        .context("no active X.509 authority")
}

/// Polls the broker until nothing live is left to re-issue under
/// `authority`. Returns when (unix nanos) that was first seen, what was
/// pending at the first poll, and the number of polls.
async fn broker_reissued(
    broker: Arc<Broker>,
    authority: String,
    patience: Duration,
) -> anyhow::Result<(u128, Option<usize>, u64)> {
    let start = Instant::now();
    let mut first = None;
    let mut polls = 0u64;
    loop {
        let status: CaStatus = broker.admin_get("/v1/admin/ca").await?;
        let at = unix_nanos();
        polls += 1;
        let left = status
            .authorities
            .iter()
            .find(|a| a.status.id == authority)
            .and_then(|a| a.pending)
            .map(|p| p.reissuable())
            .context("the tainted authority has no pending view")?;
        first.get_or_insert(left);
        if left == 0 {
            return Ok((at, first, polls));
        }
        if start.elapsed() > patience {
            bail!("the broker still counts {left} SVIDs to re-issue after {patience:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

async fn poll_until(
    what: &str,
    patience: Duration,
    mut done: impl AsyncFnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if done().await? {
            return Ok(start.elapsed());
        }
        if start.elapsed() > patience {
            bail!("{what}: timed out after {patience:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn loadavg() -> Option<String> {
    let s = std::fs::read_to_string("/proc/loadavg").ok()?;
    Some(s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
}

pub async fn run(a: Args) -> anyhow::Result<()> {
    let n = a.workloads;
    let patience = Duration::from_secs(a.timeout);
    let sync_interval = Duration::from_millis(a.sync_interval_ms);
    let effective_sync = sync_interval.max(DAEMON_MIN_SYNC);
    let settle = Duration::from_secs_f64(a.settle.max(0.0));
    let uid = cluster::own_uid()?;
    if a.observers == Observers::Processes {
        if uid != 0 {
            bail!(
                "--observers processes starts each workload under its own uid and needs root; run as root or pass --observers stream"
            );
        }
        workload_uid(a.first_uid, n)?;
    }
    let loadavg_start = loadavg();

    let broker = Arc::new(
        Broker::start_with(cluster::TRUST_DOMAIN, |cfg, _| {
            cfg.rotation = None;
            cfg.rotation_check_every = Duration::from_millis(500);
        })
        .await?,
    );
    let td = broker.trust_domain().clone();
    let token = broker.join_token().await?;
    let mut workload_ids = Vec::with_capacity(n);
    for i in 0..n {
        let selector_uid = match a.observers {
            Observers::Processes => workload_uid(a.first_uid, i)?,
            Observers::Stream => uid,
        };
        let entry = broker
            .create_entry(
                &format!("/bench/rotation/w{i}"),
                &token.node_id,
                &format!("unix:uid:{selector_uid}"),
            )
            .await?;
        workload_ids.push(entry.spiffe_id.to_string());
    }
    let own = format!("unix:uid:{uid}");
    let server_id = broker
        .create_entry("/bench/mesh/server", &token.node_id, &own)
        .await?
        .spiffe_id;
    let client_id = broker
        .create_entry("/bench/mesh/client", &token.node_id, &own)
        .await?
        .spiffe_id;

    // The socket's directory must be open to the workload processes.
    let socket_dir = tempfile::tempdir()?;
    std::fs::set_permissions(socket_dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let socket = socket_dir.path().join("agent.sock");
    let agent = Agent::start(&broker, &token, socket.clone(), sync_interval).await?;

    // The mTLS pair, each following its own stream.
    let server_live = follow(socket.clone(), &server_id, &td, patience).await?;
    let client_live = follow(socket.clone(), &client_id, &td, patience).await?;
    let server_cfg = baton_tls::server_config(
        server_live.server.clone(),
        server_live.bundles.clone(),
        PeerPolicy::Exact(vec![client_id.clone()]),
        ClientAuth::Required,
    )?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let routes = warp::path!("echo")
        .and(warp::ext::optional::<PeerIdentity>())
        .map(|peer: Option<PeerIdentity>| {
            peer.and_then(|p| p.0)
                .map_or_else(|| "anonymous".to_owned(), |id| id.to_string())
        });
    let (stop_server, server_stop_rx) = oneshot::channel::<()>();
    let server = tokio::spawn(baton_tls::serve_https(
        listener,
        server_cfg,
        routes,
        async move {
            let _ = server_stop_rx.await;
        },
    ));
    let mut client_cfg = baton_tls::client_config(
        client_live.client.clone(),
        client_live.bundles.clone(),
        PeerPolicy::Exact(vec![server_id.clone()]),
    )?;
    // One request per connection, by hand: HTTP/1.1 only.
    client_cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = TlsConnector::from(Arc::new(client_cfg));
    let load = Arc::new(Load::new());
    let expect: Arc<str> = client_id.to_string().into();
    let load_start = Instant::now();
    let clients: Vec<JoinHandle<Vec<Duration>>> = (0..a.clients)
        .map(|_| {
            tokio::spawn(client_loop(
                Arc::clone(&load),
                connector.clone(),
                addr,
                Arc::clone(&expect),
            ))
        })
        .collect();

    // The workloads, each to its first SVID.
    let (tx, rx) = mpsc::unbounded_channel();
    let mut tracker = Tracker::new(rx, n);
    let start = Instant::now();
    let children = match a.observers {
        Observers::Processes => spawn_processes(n, a.first_uid, &socket, &tx)?,
        Observers::Stream => {
            spawn_stream(socket.clone(), &workload_ids, patience, tx.clone()).await?;
            Vec::new()
        }
    };
    drop(tx);
    tracker
        .wait("workloads' first SVIDs", patience, |t| t.seen == n)
        .await?;
    let served_in = start.elapsed();
    let old = active_x509(&broker.admin_get("/v1/admin/ca").await?)?;
    if tracker.on(&old) != n {
        bail!(
            "only {} of {n} workloads hold an SVID of the active authority {old}",
            tracker.on(&old)
        );
    }
    eprintln!(
        "{n} workloads served in {:.2} s; {} clients under load; rotating X.509 authority {old}",
        served_in.as_secs_f64(),
        a.clients
    );
    tokio::time::sleep(settle).await;

    // prepare, then wait until the node has synced the bundle carrying it.
    load.enter(1);
    let _: serde_json::Value = broker
        .admin_post(
            "/v1/admin/ca/prepare",
            &PrepareRequest {
                kinds: vec![AuthorityKind::X509],
            },
        )
        .await?;
    let propagated = poll_until(
        "prepared authority reaching the node",
        patience,
        async || {
            let s: CaStatus = broker.admin_get("/v1/admin/ca").await?;
            Ok(s.nodes_lagging.is_empty())
        },
    )
    .await?;
    let synced_seen = Instant::now();

    load.enter(2);
    let _: serde_json::Value = broker
        .admin_post(
            "/v1/admin/ca/activate",
            &ActivateRequest {
                id: None,
                force: false,
            },
        )
        .await?;
    let new = active_x509(&broker.admin_get("/v1/admin/ca").await?)?;
    if new == old {
        bail!("activation left {old} active");
    }
    let early = tracker.on(&new);

    // taint: the clock runs from just before the call.
    tracker.target = Some(new.clone());
    load.enter(3);
    let t0 = unix_nanos();
    let call = Instant::now();
    // The activation waited for a sync, so the taint follows one closely:
    // the daemon's next sync is due about a sync interval after it.
    let after_sync = call.duration_since(synced_seen);
    let _: serde_json::Value = broker
        .admin_post("/v1/admin/ca/taint", &AuthorityRequest { id: old.clone() })
        .await?;
    let taint_call = call.elapsed();
    let broker_view = tokio::spawn(broker_reissued(Arc::clone(&broker), old.clone(), patience));
    tracker
        .wait("re-issued SVIDs reaching the workloads", patience, |t| {
            t.done == n
        })
        .await?;
    let (broker_at, pending_at_taint, polls) = broker_view.await??;
    let mesh_reissued = poll_until(
        "re-issued SVIDs reaching the mTLS pair",
        patience,
        async || Ok(server_live.authority() == new && client_live.authority() == new),
    )
    .await?;
    load.enter(4);

    // revoke, then keep the load on until the pair's bundles dropped it.
    let _: serde_json::Value = broker
        .admin_post("/v1/admin/ca/revoke", &AuthorityRequest { id: old.clone() })
        .await?;
    load.enter(5);
    let revoke_reached = poll_until(
        "the revocation reaching the mTLS pair",
        patience,
        async || {
            Ok(server_live.authorities.load(Ordering::Relaxed) == 1
                && client_live.authorities.load(Ordering::Relaxed) == 1)
        },
    )
    .await?;
    tokio::time::sleep(settle).await;
    load.stop.store(true, Ordering::Relaxed);
    let mut latencies = Vec::new();
    for c in clients {
        latencies.extend(c.await?);
    }
    let load_time = load_start.elapsed();
    let _ = stop_server.send(());
    let _ = server.await;
    drop(children);
    agent.stop().await;
    let loadavg_end = loadavg();

    // Figures.
    let mut delivery: Vec<u128> = tracker
        .new_at
        .iter()
        .map(|t| t.unwrap_or(t0).saturating_sub(t0))
        .collect();
    delivery.sort_unstable();
    let as_durations: Vec<Duration> = delivery
        .iter()
        .map(|d| Duration::from_nanos(u64::try_from(*d).unwrap_or(u64::MAX)))
        .collect();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let p50 = ms(percentile(&as_durations, 50.0));
    let p99 = ms(percentile(&as_durations, 99.0));
    let max = ms(as_durations.last().copied().unwrap_or_default());
    let first = ms(as_durations.first().copied().unwrap_or_default());
    let broker_ms = millis(broker_at.saturating_sub(t0));
    let bound_ms = ms(effective_sync);
    let ok = Load::sum(&load.ok);
    let failed = Load::sum(&load.failed);
    let handshakes = ok + failed;
    let rate = handshakes as f64 / load_time.as_secs_f64();
    latencies.sort_unstable();
    let lat_p50 = ms(percentile(&latencies, 50.0));
    let lat_p99 = ms(percentile(&latencies, 99.0));
    let lat_max = ms(latencies.last().copied().unwrap_or_default());
    let first_error = load
        .first_error
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    let follow_errors =
        server_live.errors.load(Ordering::Relaxed) + client_live.errors.load(Ordering::Relaxed);
    let per_phase: Vec<serde_json::Value> = PHASES
        .iter()
        .zip(load.ok.iter().zip(load.failed.iter()))
        .map(|(name, (ok, failed))| {
            json!({
                "phase": name,
                "ok": ok.load(Ordering::Relaxed),
                "failed": failed.load(Ordering::Relaxed),
            })
        })
        .collect();
    let observers = match a.observers {
        Observers::Processes => "processes",
        Observers::Stream => "stream",
    };

    println!("# baton-bench rotation (nproc {})", stats::cores());
    println!(
        "setup: {n} workloads ({observers}), daemon sync interval {} ms (effective {} ms), {} mTLS client loops; load average {} at start, {} at end",
        a.sync_interval_ms,
        bound_ms,
        a.clients,
        loadavg_start.as_deref().unwrap_or("n/a"),
        loadavg_end.as_deref().unwrap_or("n/a"),
    );
    println!(
        "prepare -> node synced the bundle: {:.0} ms; workloads on the new authority before the taint: {early}",
        ms(propagated)
    );
    println!(
        "taint sent {:.0} ms after the daemon's sync was seen (polled every 20 ms): its next sync was due about {:.0} ms after the taint",
        ms(after_sync),
        bound_ms - ms(after_sync)
    );
    println!(
        "taint -> broker counts nothing left to re-issue: {broker_ms:.0} ms ({:.2} of the sync interval; {} pending at the first poll, {polls} polls; taint call {:.1} ms)",
        broker_ms / bound_ms,
        pending_at_taint.map_or("?".to_owned(), |v| v.to_string()),
        ms(taint_call),
    );
    println!(
        "taint -> re-issued SVID received, per workload: first {first:.0} ms, p50 {p50:.0} ms, p99 {p99:.0} ms, max (last affected SVID re-issued) {max:.0} ms = {:.2} of the sync interval",
        max / bound_ms
    );
    println!(
        "mTLS pair on the new authority {:.0} ms after the workloads; revocation reached the pair {:.0} ms after the revoke call",
        ms(mesh_reissued),
        ms(revoke_reached)
    );
    println!(
        "handshakes: {failed} failed of {handshakes} ({rate:.0}/s over {:.1} s; call p50 {lat_p50:.2} ms, p99 {lat_p99:.2} ms, max {lat_max:.1} ms){}",
        load_time.as_secs_f64(),
        first_error
            .as_deref()
            .map_or(String::new(), |e| format!("; first failure: {e}"))
    );
    for p in &per_phase {
        println!("  {p}");
    }
    println!(
        "{}",
        json!({
            "bench": "rotation",
            "unix_time": stats::unix_now(),
            "nproc": stats::cores(),
            "loadavg_start": loadavg_start,
            "loadavg_end": loadavg_end,
            "workloads": n,
            "observers": observers,
            "sync_interval_ms": a.sync_interval_ms,
            "effective_sync_interval_ms": bound_ms,
            "clients": a.clients,
            "prepare_to_synced_ms": ms(propagated),
            "taint_after_sync_seen_ms": ms(after_sync),
            "taint_call_ms": ms(taint_call),
            "pending_at_first_poll": pending_at_taint,
            "taint_to_broker_reissued_ms": broker_ms,
            "taint_to_broker_reissued_ratio_to_sync_interval": broker_ms / bound_ms,
            "delivery_ms": {"first": first, "p50": p50, "p99": p99, "max": max},
            "delivery_max_ratio_to_sync_interval": max / bound_ms,
            "mesh_after_workloads_ms": ms(mesh_reissued),
            "revoke_to_mesh_bundle_ms": ms(revoke_reached),
            "handshakes": handshakes,
            "handshake_failures": failed,
            "handshakes_per_s": rate,
            "call_ms": {"p50": lat_p50, "p99": lat_p99, "max": lat_max},
            "per_phase": per_phase,
            "first_failure": first_error,
            "follow_errors": follow_errors,
        })
    );
    if failed > 0 {
        bail!("{failed} of {handshakes} mTLS handshakes failed during the rotation");
    }
    if follow_errors > 0 {
        bail!("{follow_errors} Workload API updates could not be applied");
    }
    Ok(())
}
