//! The node daemon (`baton agent`): Baton's per-node half.
//!
//! Place in the flow: the agent attests its node to the broker once with a
//! join token ([`node`]), then authenticates with its own agent SVID over
//! mTLS ([`client`]) and renews it before expiry. It syncs the registration
//! entries whose parent is its node and keeps one X509-SVID per entry
//! ([`sync`], [`cache`]), generating each workload key itself and sending
//! only CSRs. Workloads on the node reach it over a Unix socket speaking the
//! SPIFFE Workload API ([`workload`]); each call is attested from the
//! kernel's peer credential ([`attest`]) before anything is issued. The same
//! socket and server also carry Baton's `Delegation` service
//! ([`delegation`]), through which an attested agent redeems a handoff
//! grant for a task credential.
//!
//! [`run`] is the whole daemon; the `baton` binary only builds an
//! [`AgentConfig`] and waits for a signal.

pub mod attest;
pub mod authority;
pub mod cache;
pub mod client;
pub mod conn_limit;
pub mod delegation;
pub mod jwt;
pub mod node;
mod rpc_metrics;
pub mod sync;
pub mod workload;

#[cfg(test)]
mod e2e_tests;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use baton_core::{Secret, SpiffeId, TrustDomain};
use baton_proto::delegation::delegation_server::{Delegation, DelegationServer};
use baton_proto::workload::spiffe_workload_api_server::{
    SpiffeWorkloadApi, SpiffeWorkloadApiServer,
};
use tokio::sync::{oneshot, watch};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnixListenerStream;

use crate::attest::Attestor;
use crate::cache::{DEFAULT_ROTATE_FRACTION, Snapshot};
use crate::client::{BrokerClient, ClientError};
use crate::delegation::DelegationService;
use crate::jwt::BrokerJwt;
use crate::node::{NodeError, NodeStore};
use crate::sync::{SyncSettings, Syncer};
use crate::workload::WorkloadService;

/// Default pause between two syncs with the broker.
pub const DEFAULT_SYNC_INTERVAL: Duration = Duration::from_secs(5);
/// Default mode of the Workload API socket. Anyone on the node may connect
/// because access is decided per call by attesting the caller (uid, gid,
/// executable), not by the socket's file mode.
pub const DEFAULT_SOCKET_MODE: u32 = 0o666;
/// Default of [`AgentConfig::shutdown_grace`].
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long start-up waits for the first sync before serving anyway.
const FIRST_SYNC_LIMIT: Duration = Duration::from_secs(5);

/// Everything the daemon needs to start.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the node SVID, its key and the last bundle are kept.
    pub data_dir: PathBuf,
    /// The Workload API socket.
    pub socket_path: PathBuf,
    /// The broker's base URLs, like `https://broker.example:8443`: one, or
    /// several brokers of the trust domain (sharing one datastore, each
    /// presenting [`broker_id`](Self::broker_id)) that the agent fails over
    /// between; see [`BrokerClient`] for the rule.
    pub broker_urls: Vec<String>,
    /// The broker's SPIFFE ID, checked in place of a hostname;
    /// see [`AgentConfig::default_broker_id`].
    pub broker_id: SpiffeId,
    pub trust_domain: TrustDomain,
    /// PEM of the broker's CA for the very first connection. Required
    /// unless the data directory already holds a bundle from an earlier run.
    pub bootstrap_bundle_pem: Option<String>,
    /// Needed only when the node has no valid stored identity.
    pub join_token: Option<Secret>,
    pub sync_interval: Duration,
    /// Share of an SVID's lifetime after which it is replaced (0 < f <= 1).
    pub rotate_fraction: f64,
    /// File mode of the socket; see [`DEFAULT_SOCKET_MODE`].
    pub socket_mode: u32,
    /// The ops listener's handle (`--ops-listen`): the daemon adds its
    /// readiness checks and gauges to it. `None`: no ops listener.
    pub ops: Option<baton_ops::Ops>,
    /// After shutdown is asked: how long calls in flight get to finish
    /// (open streams end at once) before the rest are dropped.
    pub shutdown_grace: Duration,
}

impl AgentConfig {
    /// A configuration with the defaults for everything optional and one
    /// broker; set [`broker_urls`](Self::broker_urls) for several.
    pub fn new(
        data_dir: PathBuf,
        socket_path: PathBuf,
        broker_url: String,
        trust_domain: TrustDomain,
    ) -> Result<Self, AgentError> {
        Ok(Self {
            data_dir,
            socket_path,
            broker_urls: vec![broker_url],
            broker_id: Self::default_broker_id(&trust_domain)?,
            trust_domain,
            bootstrap_bundle_pem: None,
            join_token: None,
            sync_interval: DEFAULT_SYNC_INTERVAL,
            rotate_fraction: DEFAULT_ROTATE_FRACTION,
            socket_mode: DEFAULT_SOCKET_MODE,
            ops: None,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        })
    }

    /// `spiffe://<td>/baton/broker`.
    pub fn default_broker_id(td: &TrustDomain) -> Result<SpiffeId, AgentError> {
        td.id("/baton/broker")
            .map_err(|e| AgentError::Config(format!("broker id: {e}")))
    }

    fn validate(&self) -> Result<(), AgentError> {
        client::broker_urls(&self.broker_urls).map_err(|e| AgentError::Config(e.to_string()))?;
        if !(self.rotate_fraction > 0.0 && self.rotate_fraction <= 1.0) {
            return Err(AgentError::Config(format!(
                "rotate_fraction must be in (0, 1], got {}",
                self.rotate_fraction
            )));
        }
        if self.sync_interval.is_zero() {
            return Err(AgentError::Config("sync_interval must be positive".into()));
        }
        if self.shutdown_grace.is_zero() {
            return Err(AgentError::Config("shutdown_grace must be positive".into()));
        }
        if !self.broker_id.is_member_of(&self.trust_domain) {
            return Err(AgentError::Config(format!(
                "broker id {} is not in trust domain {}",
                self.broker_id, self.trust_domain
            )));
        }
        if self.socket_mode > 0o777 {
            return Err(AgentError::Config(format!(
                "socket_mode {:o} is not a permission mode",
                self.socket_mode
            )));
        }
        Ok(())
    }
}

/// Sent once the socket is being served.
#[derive(Debug, Clone)]
pub struct AgentReady {
    pub node_id: SpiffeId,
    pub socket_path: PathBuf,
}

/// Why the daemon could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error("Workload API socket: {0}")]
    Socket(#[from] baton_tls::SocketFileError),
    #[error("the Workload API server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// The broker banned this node: final until an operator lifts it, so
    /// the agent stops instead of retrying.
    #[error(
        "node {node} is banned by the broker: it serves no identities and cannot attest again; an operator can lift the ban with `baton node unban {node}`"
    )]
    Banned { node: SpiffeId },
}

/// Whether `e` is the broker banning this node.
fn is_ban(e: &sync::SyncError) -> bool {
    matches!(e, sync::SyncError::Broker(c) if c.node_refusal() == Some(client::NodeRefusal::Banned))
}

/// Runs the node daemon until `shutdown` completes.
///
/// Loads or obtains the node identity, syncs once (a failure is logged,
/// not fatal, when the identity came from disk), binds the socket (removing
/// a stale one), reports readiness on `ready`, and serves the Workload API
/// and the `Delegation` service on it.
/// On shutdown the background loops stop, open streams end with
/// `Unavailable`, and the socket file is removed.
pub async fn run(
    config: AgentConfig,
    ready: Option<oneshot::Sender<AgentReady>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    config.validate()?;
    baton_tls::install_crypto_provider();
    baton_ca::init();

    let store = NodeStore::open(&config.data_dir)?;
    let bundles = baton_tls::BundleStore::new();
    bundles.set(
        config.trust_domain.clone(),
        node::initial_authorities(
            &store,
            &config.trust_domain,
            config.bootstrap_bundle_pem.as_deref(),
        )?,
    );
    let client = Arc::new(BrokerClient::with_urls(
        &config.broker_urls,
        baton_tls::ClientIdentity::none(),
        bundles,
        config.broker_id.clone(),
    )?);
    let node_svid = node::establish(
        &store,
        &client,
        &config.trust_domain,
        config.join_token.as_ref(),
        node::unix_now(),
    )
    .await?;
    let node_id = node_svid.spiffe_id.clone();
    baton_ops::metrics().agent_node_svid(node_svid.not_after);

    let (cache_tx, cache_rx) = watch::channel(Arc::new(Snapshot::default()));
    if let Some(ops) = &config.ops {
        install_ops(ops, cache_rx.clone(), config.sync_interval);
    }
    let (tainted_tx, tainted_rx) = watch::channel(Arc::new(Vec::new()));
    let mut syncer = Syncer::new(
        Arc::clone(&client),
        store.clone(),
        SyncSettings {
            trust_domain: config.trust_domain.clone(),
            sync_interval: config.sync_interval,
            rotate_fraction: config.rotate_fraction,
        },
        cache_tx,
        tainted_tx,
    );
    // One round before serving, so that workloads starting with the agent
    // find their SVIDs at once; the loop retries if the broker is down. It
    // is bounded so a black-holed broker does not keep the socket closed.
    // Cancelling it is harmless: the snapshot is only published at its end.
    match tokio::time::timeout(FIRST_SYNC_LIMIT, syncer.sync_once(node::unix_now())).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) if is_ban(&e) => return Err(AgentError::Banned { node: node_id }),
        Ok(Err(e)) => tracing::warn!(error = %e, "first sync with the broker failed; will retry"),
        Err(_) => tracing::warn!("first sync with the broker timed out; will retry"),
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let stop_rx_main = stop_rx.clone();
    let grace = config.shutdown_grace;
    // A ban ends the daemon: the sync loop reports it here, which stops
    // serving like a shutdown and makes `run` fail with it.
    let (banned_tx, banned_rx) = oneshot::channel::<()>();
    let sync_stop = stop_rx.clone();
    let sync_task = tokio::spawn(async move {
        if let Err(e) = syncer.run(sync_stop).await
            && is_ban(&e)
        {
            let _ = banned_tx.send(());
        }
    });
    let banned = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let banned_flag = Arc::clone(&banned);
    let renew_task = tokio::spawn(node::renew_loop(
        store,
        Arc::clone(&client),
        node_svid,
        config.rotate_fraction,
        tainted_rx.clone(),
        cache_rx.clone(),
        stop_rx,
    ));

    // Graceful shutdown: the socket stops accepting, the syncer stops (which
    // ends the open Workload API streams), and calls in flight get
    // `shutdown_grace` to finish before the server is dropped.
    let mut stopped = stop_rx_main;
    let serving = serve(
        &config,
        &node_id,
        (cache_rx, tainted_rx),
        client,
        ready,
        async move {
            let mut shutdown = std::pin::pin!(shutdown);
            tokio::select! {
                () = &mut shutdown => {}
                r = banned_rx => {
                    if r.is_ok() {
                        banned_flag.store(true, std::sync::atomic::Ordering::SeqCst);
                    } else {
                        // The sync loop ended otherwise: wait for the shutdown.
                        shutdown.await;
                    }
                }
            }
            tracing::info!(grace = ?grace, "shutting down the node daemon: no new connections; finishing calls in flight");
            // Stopping the syncer drops the cache sender, which ends the
            // open Workload API streams so graceful shutdown can finish.
            let _ = stop_tx.send(true);
        },
    );
    let deadline = async {
        if stopped.wait_for(|s| *s).await.is_err() {
            std::future::pending::<()>().await;
        }
        tokio::time::sleep(grace).await;
    };
    let served = tokio::select! {
        served = serving => served,
        () = deadline => {
            tracing::warn!(?grace, "shutdown grace period elapsed; dropping the calls still open");
            Ok(())
        }
    };
    sync_task.abort();
    renew_task.abort();
    if banned.load(std::sync::atomic::Ordering::SeqCst) {
        return Err(AgentError::Banned { node: node_id });
    }
    served
}

/// The daemon's readiness checks (a valid node SVID the broker accepts,
/// a recent successful sync) and scrape-time gauges.
fn install_ops(ops: &baton_ops::Ops, cache: watch::Receiver<Arc<Snapshot>>, interval: Duration) {
    use baton_ops::metrics;
    ops.add_role(baton_ops::Role::Agent);
    ops.add_check("node_svid", || async {
        let m = metrics();
        if m.agent_node_refused.get() != 0 {
            return Err(
                "the broker refuses this node (evicted, banned or its agent SVID revoked): every workload identity was dropped"
                    .to_owned(),
            );
        }
        let not_after = m.agent_node_svid_not_after();
        if not_after <= node::unix_now() {
            return Err(format!("the node SVID expired at {not_after}"));
        }
        Ok(())
    });
    // Three missed rounds, and never less than 15 s: one slow round is
    // not an outage.
    let fresh = (interval * 3).max(Duration::from_secs(15)).as_secs();
    ops.add_check("sync", move || async move {
        let last = u64::try_from(metrics().agent_last_sync.get()).unwrap_or(0);
        let age = node::unix_now().saturating_sub(last);
        if last == 0 {
            Err("no successful sync with the broker yet".to_owned())
        } else if age > fresh {
            Err(format!(
                "the last successful sync was {age} s ago (more than {fresh} s)"
            ))
        } else {
            Ok(())
        }
    });
    ops.on_scrape(move || {
        let m = metrics();
        let now = i64::try_from(node::unix_now()).unwrap_or(i64::MAX);
        let svids = cache.borrow().svids().count();
        m.agent_cached_svids
            .set(i64::try_from(svids).unwrap_or(i64::MAX));
        m.agent_node_svid_expiry
            .set(baton_ops::metrics::secs(m.agent_node_svid_not_after()) - now);
        let last = m.agent_last_sync.get();
        m.agent_last_sync_age
            .set(if last == 0 { 0 } else { now - last });
    });
}

/// HTTP/2 streams one Workload API connection may have open at once (a
/// workload needs a few: its SVID and bundle streams, a call).
const MAX_STREAMS_PER_CONNECTION: u32 = 64;

/// Largest request message either service on the socket decodes; a longer
/// one is refused with `OutOfRange` from its 5-byte length prefix, before
/// a byte of it is buffered and before the caller is attested.
///
/// tonic's default (4 MiB) is reserved and read whole before the handler
/// runs, so any local user (the socket is world-connectable) could make
/// the daemon hold 4 MiB per stream: 64 GiB with
/// [`conn_limit::MAX_CONNECTIONS_PER_UID`] connections of
/// [`MAX_STREAMS_PER_CONNECTION`] streams each. At 32 KiB that is at most
/// 512 MiB per uid.
///
/// The largest legitimate requests:
/// - `Delegation.Renew`: a token the handler bounds to 16 KiB, a leaf
///   certificate (well under 4 KiB with a SPIFFE ID of the 2 KiB most),
///   a SPIFFE ID (2 KiB at most), an ECDSA signature and a timestamp,
///   about 22 KiB in all;
/// - `ValidateJWTSVID`: a JWT-SVID (the broker's are an ES256 signature,
///   a SPIFFE ID and the audiences, a few hundred bytes) and one audience;
///   `FetchJWTSVID`: a SPIFFE ID and the audiences. Everything else is
///   empty.
pub(crate) const MAX_REQUEST_BYTES: usize = 32 * 1024;
/// HTTP/2 flow-control windows of the socket's server: what a peer may
/// send on a stream, and on a connection, before the daemon reads it
/// (hyper's default is 1 MiB each). Twice [`MAX_REQUEST_BYTES`] per
/// stream, so a legitimate request is never held up by its window.
const STREAM_WINDOW_BYTES: u32 = 64 * 1024;
/// See [`STREAM_WINDOW_BYTES`].
const CONNECTION_WINDOW_BYTES: u32 = 256 * 1024;

/// The HTTP/2 server of the node socket, with its per-connection bounds:
/// streams at once, flow-control windows, and a peer that stops answering
/// HTTP/2 pings (a socket held open and silent) is dropped. Tests serve
/// through it too, so they exercise these settings.
pub(crate) fn socket_server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(MAX_STREAMS_PER_CONNECTION))
        .initial_stream_window_size(Some(STREAM_WINDOW_BYTES))
        .initial_connection_window_size(Some(CONNECTION_WINDOW_BYTES))
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(20)))
}

/// The Workload API as the socket serves it: requests bounded by
/// [`MAX_REQUEST_BYTES`].
pub(crate) fn workload_api<T: SpiffeWorkloadApi>(service: T) -> SpiffeWorkloadApiServer<T> {
    SpiffeWorkloadApiServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES)
}

/// The `Delegation` service as the socket serves it: requests bounded by
/// [`MAX_REQUEST_BYTES`].
pub(crate) fn delegation_api<T: Delegation>(service: T) -> DelegationServer<T> {
    DelegationServer::new(service).max_decoding_message_size(MAX_REQUEST_BYTES)
}

async fn serve(
    config: &AgentConfig,
    node_id: &SpiffeId,
    (cache, tainted): (
        watch::Receiver<Arc<Snapshot>>,
        watch::Receiver<cache::Tainted>,
    ),
    client: Arc<BrokerClient>,
    ready: Option<oneshot::Sender<AgentReady>>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    // Removed when serving ends (this future completes or is dropped),
    // only while the file is still the one bound here.
    let (listener, _socket_file) =
        baton_tls::bind_unix_socket(&config.socket_path, config.socket_mode)?;
    // One attestor for both services, so they share its digest cache.
    let attestor = Arc::new(Attestor::new());
    let delegation = DelegationService::new(
        cache.clone(),
        Arc::clone(&attestor),
        Arc::clone(&client),
        client.bundles().clone(),
    );
    let jwt = BrokerJwt::new(client, tainted, cache.clone());
    let workload = WorkloadService::new(cache, attestor, Arc::new(jwt));
    tracing::info!(
        socket = %config.socket_path.display(),
        node = %node_id,
        "serving the SPIFFE Workload API and the Delegation service"
    );
    if let Some(ready) = ready {
        let _ = ready.send(AgentReady {
            node_id: node_id.clone(),
            socket_path: config.socket_path.clone(),
        });
    }
    let limit = conn_limit::ConnectionLimit::new(conn_limit::MAX_CONNECTIONS_PER_UID);
    socket_server()
        .layer(rpc_metrics::CountRpcsLayer)
        .add_service(workload_api(workload))
        .add_service(delegation_api(delegation))
        .serve_with_incoming_shutdown(
            // Standard gRPC clients send an `:authority` the HTTP/2 server
            // would refuse; see `authority`. Each user holds at most
            // `MAX_CONNECTIONS_PER_UID` connections; past that a new one is
            // closed at once.
            UnixListenerStream::new(listener).filter_map(move |conn| match conn {
                Ok(stream) => limit
                    .admit_stream(&stream)
                    .map(|slot| Ok(authority::AuthorityNormalizing::new(stream).holding(slot))),
                Err(e) => Some(Err(e)),
            }),
            shutdown,
        )
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_validation() {
        let td = TrustDomain::new("example.org").unwrap();
        let mut c =
            AgentConfig::new("d".into(), "s".into(), "https://localhost:1".into(), td).unwrap();
        assert_eq!(c.broker_id.as_str(), "spiffe://example.org/baton/broker");
        assert!(c.validate().is_ok());
        c.rotate_fraction = 0.0;
        assert!(matches!(c.validate(), Err(AgentError::Config(_))));
        c.rotate_fraction = 0.5;
        c.broker_id = SpiffeId::parse("spiffe://other.org/baton/broker").unwrap();
        assert!(matches!(c.validate(), Err(AgentError::Config(_))));
    }

    #[tokio::test]
    async fn first_start_without_token_or_bundle_is_explained() {
        let dir = tempfile::tempdir().unwrap();
        let td = TrustDomain::new("example.org").unwrap();
        let config = AgentConfig::new(
            dir.path().join("data"),
            dir.path().join("agent.sock"),
            "https://127.0.0.1:1".into(),
            td,
        )
        .unwrap();
        let err = run(config, None, std::future::pending()).await.unwrap_err();
        assert!(err.to_string().contains("--trust-bundle"), "{err}");
    }
}
