//! The Baton broker.
//!
//! Place in the flow: node daemons attest here with a join token and get an
//! agent SVID; with it (mTLS) they sync the registration entries of their
//! node and have their workloads' CSRs signed. Operators manage entries and
//! join tokens through the admin API on a local Unix socket.
//!
//! - [`service`]: the decisions (attestation, entitlement, issuance), with
//!   time passed in;
//! - [`http`]: the warp routes for the node port and the admin socket;
//! - [`store`]: the durable state behind the [`store::Datastore`] trait.

pub mod http;
pub mod service;
pub mod store;

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use baton_ca::{Ca, CaConfig};
use baton_core::TrustDomain;
use baton_tls::{BundleStore, ClientAuth, PeerPolicy, ServerIdentity};
use tokio::sync::oneshot;

pub use service::{Broker, BrokerError, IssuanceHook, IssuancePolicy, LogIssuance};
use store::{Datastore, SqliteStore};

/// Everything the broker needs to start.
#[derive(Debug, Clone)]
pub struct BrokerConfig {
    pub trust_domain: TrustDomain,
    /// Where the CA keys, the datastore and `bundle.pem` live. `None` keeps
    /// everything in memory (lost on exit).
    pub data_dir: Option<PathBuf>,
    pub listen: SocketAddr,
    pub admin_socket: PathBuf,
    /// Uids allowed on the admin socket besides the broker's own and root.
    pub admin_uids: Vec<u32>,
    pub ca_ttl: Duration,
    pub agent_svid_ttl: Duration,
    pub max_svid_ttl: Duration,
    /// Extra DNS names on the broker's serving certificate.
    pub serving_dns_names: Vec<String>,
}

impl BrokerConfig {
    /// Defaults for a trust domain: loopback port 8443, a week-long CA.
    pub fn new(
        trust_domain: TrustDomain,
        data_dir: Option<PathBuf>,
        admin_socket: PathBuf,
    ) -> Self {
        Self {
            trust_domain,
            data_dir,
            listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
            admin_socket,
            admin_uids: Vec::new(),
            ca_ttl: Duration::from_secs(7 * 24 * 3600),
            agent_svid_ttl: Duration::from_secs(3600),
            max_svid_ttl: Duration::from_secs(24 * 3600),
            serving_dns_names: vec!["localhost".into()],
        }
    }
}

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot prepare data dir {path}: {source}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load or create the CA: {0}")]
    Ca(#[from] baton_ca::CaError),
    #[error("cannot open the datastore: {0}")]
    Store(#[from] store::StoreError),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] baton_tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Internal(String),
}

/// Sent once the broker listens.
#[derive(Debug, Clone)]
pub struct BrokerReady {
    pub addr: SocketAddr,
    pub admin_socket: PathBuf,
    pub trust_domain: TrustDomain,
    /// The X.509 trust bundle in PEM, for bootstrapping agents.
    pub bundle_pem: String,
}

fn prepare_dir(path: &Path) -> Result<(), StartError> {
    let err = |source| StartError::DataDir {
        path: path.to_owned(),
        source,
    };
    std::fs::create_dir_all(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).map_err(err)?;
    Ok(())
}

/// The uid this process runs as, read from procfs (no libc, no unsafe).
pub fn own_uid() -> Option<u32> {
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// Runs the broker until `shutdown` resolves.
pub async fn run(
    cfg: BrokerConfig,
    hook: Arc<dyn IssuanceHook>,
    ready: Option<oneshot::Sender<BrokerReady>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartError> {
    baton_tls::install_crypto_provider();
    baton_ca::init();
    let now = SystemTime::now();
    let (key_dir, store): (Option<PathBuf>, Arc<dyn Datastore>) = match &cfg.data_dir {
        Some(dir) => {
            prepare_dir(dir)?;
            let ca_dir = dir.join("ca");
            prepare_dir(&ca_dir)?;
            (
                Some(ca_dir),
                Arc::new(SqliteStore::open(&dir.join("broker.db"))?),
            )
        }
        None => (None, Arc::new(SqliteStore::in_memory()?)),
    };
    let ca = Ca::load_or_create(
        CaConfig {
            trust_domain: cfg.trust_domain.clone(),
            ca_ttl: cfg.ca_ttl,
            key_dir,
            max_svid_ttl: cfg.max_svid_ttl,
        },
        now,
    )?;
    let ca = Arc::new(ca);
    let broker = Arc::new(Broker::new(
        ca.clone(),
        store,
        hook,
        IssuancePolicy {
            agent_svid_ttl: cfg.agent_svid_ttl,
        },
    ));
    let bundle = ca.bundle();
    let bundle_pem = bundle.to_pem();
    if let Some(dir) = &cfg.data_dir {
        std::fs::write(dir.join("bundle.pem"), &bundle_pem).map_err(|source| {
            StartError::DataDir {
                path: dir.join("bundle.pem"),
                source,
            }
        })?;
    }

    // The node listener: HTTPS, client certificate optional (join-token
    // attestation has none yet), any SVID of our trust domain accepted at
    // the TLS layer; routes then require an attested node.
    let bundles = BundleStore::new();
    bundles.set(cfg.trust_domain.clone(), bundle.x509_authorities.clone());
    let serving_ttl = cfg.agent_svid_ttl;
    let (chain, key) = ca.broker_serving_identity(&cfg.serving_dns_names, serving_ttl, now)?;
    let identity = ServerIdentity::new(chain, key.expose())?;
    let tls = baton_tls::server_config(
        identity.clone(),
        bundles,
        PeerPolicy::AnyInTrustDomains(vec![cfg.trust_domain.clone()]),
        ClientAuth::Optional,
    )?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|source| StartError::Listen {
            addr: cfg.listen.to_string(),
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| StartError::Listen {
        addr: cfg.listen.to_string(),
        source,
    })?;

    // The admin socket: owner-only file mode plus a peer uid check.
    if cfg.admin_socket.exists() {
        let _ = std::fs::remove_file(&cfg.admin_socket);
    }
    if let Some(parent) = cfg.admin_socket.parent() {
        std::fs::create_dir_all(parent).map_err(|source| StartError::DataDir {
            path: parent.to_owned(),
            source,
        })?;
    }
    let admin_listener =
        tokio::net::UnixListener::bind(&cfg.admin_socket).map_err(|source| StartError::Listen {
            addr: cfg.admin_socket.display().to_string(),
            source,
        })?;
    std::fs::set_permissions(&cfg.admin_socket, std::fs::Permissions::from_mode(0o600)).map_err(
        |source| StartError::DataDir {
            path: cfg.admin_socket.clone(),
            source,
        },
    )?;
    let mut allowed_uids = cfg.admin_uids.clone();
    allowed_uids.push(0);
    if let Some(uid) = own_uid() {
        allowed_uids.push(uid);
    }
    allowed_uids.sort_unstable();
    allowed_uids.dedup();

    tracing::info!(%addr, admin_socket = %cfg.admin_socket.display(), trust_domain = %cfg.trust_domain, "broker listening");
    if let Some(tx) = ready {
        let _ = tx.send(BrokerReady {
            addr,
            admin_socket: cfg.admin_socket.clone(),
            trust_domain: cfg.trust_domain.clone(),
            bundle_pem,
        });
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Keep the serving certificate fresh: renew at half-life.
    let renew_ca = ca.clone();
    let dns = cfg.serving_dns_names.clone();
    let mut renew_stop = stop_rx.clone();
    let renewer = tokio::spawn(async move {
        loop {
            tokio::select! {
                () = tokio::time::sleep(serving_ttl / 2) => {}
                _ = renew_stop.wait_for(|s| *s) => return,
            }
            match renew_ca.broker_serving_identity(&dns, serving_ttl, SystemTime::now()) {
                Ok((chain, key)) => {
                    if let Err(e) = identity.replace(chain, key.expose()) {
                        tracing::error!(error = %e, "cannot install renewed serving certificate");
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot renew serving certificate"),
            }
        }
    });

    let node = baton_tls::serve_https(
        listener,
        tls,
        http::node_routes(broker.clone()),
        stopped(stop_rx.clone()),
    );
    let admin = baton_tls::serve_unix(
        admin_listener,
        http::admin_routes(broker, http::AdminAccess { allowed_uids }),
        stopped(stop_rx),
    );
    let node = tokio::spawn(node);
    let admin = tokio::spawn(admin);
    shutdown.await;
    let _ = stop_tx.send(true);
    let (n, a) = (node.await, admin.await);
    renewer.abort();
    let _ = std::fs::remove_file(&cfg.admin_socket);
    for r in [n, a] {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(StartError::Internal(format!("listener task failed: {e}"))),
        }
    }
    Ok(())
}
