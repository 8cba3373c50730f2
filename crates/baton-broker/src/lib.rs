//! The Baton broker.
//!
//! Place in the flow: node daemons attest here with a join token and get an
//! agent SVID; with it (mTLS) they sync the registration entries of their
//! node and have their workloads' CSRs signed. Operators manage entries and
//! join tokens through the admin API on a local Unix socket.
//!
//! This crate is the broker's HTTPS shell and process: it opens the stores,
//! starts the background tasks (revocation relay, CA schedule, audit
//! follower) and serves the routes. Every decision lives in
//! `baton-broker-core`, re-exported here under its module names:
//!
//! - [`service`], [`delegation`], [`nodes`], [`rotation`], [`secrets`]:
//!   the decisions, with time passed in;
//! - [`store`], [`pg`]: the durable state behind the [`store::Datastore`]
//!   trait;
//! - [`http`]: the one route builder, [`http::https_routes`] for the node
//!   port and [`http::admin_routes`] for the admin socket; the `http_*`
//!   modules hold each area's routes and [`http_reply`] how a request
//!   becomes a core call and its answer (the one error mapping, the hop to
//!   the blocking pool). Blocking work (SQLite, the audit log, CA signing)
//!   runs on the blocking pool there. The modules form no cycle: the
//!   builder imports the route modules, which import `http_reply` only.

pub mod http;
pub mod http_audit;
pub mod http_delegation;
pub mod http_limits;
pub mod http_nodes;
pub mod http_ops;
pub mod http_reply;
pub mod http_rotation;
pub mod http_secrets;

// The domain core, re-exported under its old paths.
pub use baton_broker_core::{
    admission, delegation, ledger, limits, nodes, oidc, ops, pg, pg_audit, pg_ca, pg_tls, requests,
    revocation, rotation, secrets, service, store, tasks, telemetry,
};

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

pub use baton_broker_core::{
    AdmissionSource, Broker, BrokerError, EXAMPLE_ADMISSION_POLICIES, IssuanceHook, IssuancePolicy,
    LogIssuance,
};
use store::{Datastore, SqliteStore};

/// The example Cedar schema and policies of `deploy/policies`, built in so
/// a broker started without `--policies` (dev, tests) has a policy set.
pub const EXAMPLE_POLICIES: &[(&str, &str)] = &[
    (
        "deploy/policies/schema.cedarschema",
        include_str!("../../../deploy/policies/schema.cedarschema"),
    ),
    (
        "deploy/policies/delegation.cedar",
        include_str!("../../../deploy/policies/delegation.cedar"),
    ),
    (
        "deploy/policies/exports.cedar",
        include_str!("../../../deploy/policies/exports.cedar"),
    ),
    (
        "deploy/policies/research.cedar",
        include_str!("../../../deploy/policies/research.cedar"),
    ),
    (
        "deploy/policies/scope.cedar",
        include_str!("../../../deploy/policies/scope.cedar"),
    ),
    (
        "deploy/policies/writes.cedar",
        include_str!("../../../deploy/policies/writes.cedar"),
    ),
];

/// The shipped purpose catalogue (`deploy/purposes.txt`).
pub const DEFAULT_PURPOSES: &str = include_str!("../../../deploy/purposes.txt");

/// Parses a purpose catalogue: one purpose per line, `#` comments.
pub fn parse_purposes(
    text: &str,
) -> Result<std::collections::BTreeSet<baton_core::Purpose>, String> {
    let mut out = std::collections::BTreeSet::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        out.insert(
            line.parse()
                .map_err(|e| format!("purpose catalogue line {}: {e}", n + 1))?,
        );
    }
    Ok(out)
}

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
    /// Cedar schema + policies; `None` uses the embedded example set given
    /// in `embedded_policies`.
    pub policy_dir: Option<PathBuf>,
    /// (file name, source) of the policies used when `policy_dir` is None.
    pub embedded_policies: Vec<(String, String)>,
    /// Who may start a task and lease a secret (Cedar). Required when
    /// `oidc_issuers` is not empty.
    pub admission: AdmissionSource,
    /// Trusted OIDC issuers for initiating identities.
    pub oidc_issuers: Vec<oidc::OidcIssuer>,
    /// Run a local dev OIDC issuer (never in production).
    pub dev_issuer: bool,
    /// Bounds and the purpose catalogue for tasks and hops.
    pub delegation: delegation::DelegationSettings,
    /// The broker's state (entries, nodes, tasks, grants, the credential
    /// registry and revocations) in PostgreSQL; `None` keeps it in SQLite
    /// (`broker.db` in the data dir, or in memory).
    pub datastore: Option<pg::PgSettings>,
    /// Keep the CA (journal, keys, JWT keys) in the PostgreSQL datastore,
    /// sealed with the key in this file, shared by every broker of the
    /// trust domain. Requires `datastore`.
    pub ca_seal_key_file: Option<PathBuf>,
    /// How often a broker with a shared CA looks for rotation steps the
    /// others took.
    pub ca_refresh_every: Duration,
    /// Where revocations live: in memory (embedded default) or in Redis,
    /// shared with other brokers and followed by verifiers.
    pub revocation: RevocationBackend,
    /// JIT secret engines (the API-key engine is always on).
    pub secret_engines: secrets::SecretEngineSettings,
    /// The automatic CA rotation schedule; `None` rotates only on the
    /// operator's command (expired authorities still leave the bundle).
    pub rotation: Option<baton_ca::RotationSchedule>,
    /// How often the schedule is checked.
    pub rotation_check_every: Duration,
    /// Run as an intermediate under an existing PKI: (CA certificate chain
    /// PEM, signing CA key PEM).
    pub upstream: Option<(PathBuf, PathBuf)>,
    /// Whether to start on an audit log that does not extend its head file
    /// (newest events deleted, log rewritten, head file gone). Refused by
    /// default.
    pub audit_head: baton_audit::HeadPolicy,
    /// Connection cap and timeouts of the HTTPS port.
    pub serve_limits: baton_tls::ServeLimits,
    /// Rate limits per caller on attest, task start, tool-call reports,
    /// JWT-SVIDs and secret leases.
    pub rate_limits: limits::RateLimits,
    /// The ops listener's handle (`--ops-listen`): the broker adds its
    /// readiness checks and gauges to it. `None`: no ops listener.
    pub ops: Option<baton_ops::Ops>,
}

/// The revocation store backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RevocationBackend {
    Memory,
    /// Where and how to reach Redis (one server, Cluster or Sentinel; TLS;
    /// ACL credentials) and the key prefix.
    Redis(baton_revocation::RedisConfig),
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
            policy_dir: None,
            embedded_policies: EXAMPLE_POLICIES
                .iter()
                .map(|(n, s)| ((*n).to_owned(), (*s).to_owned()))
                .collect(),
            admission: AdmissionSource::Unset,
            oidc_issuers: Vec::new(),
            dev_issuer: false,
            delegation: delegation::DelegationSettings {
                purposes: parse_purposes(DEFAULT_PURPOSES).unwrap_or_default(),
                ..delegation::DelegationSettings::default()
            },
            datastore: None,
            ca_seal_key_file: None,
            ca_refresh_every: Duration::from_secs(2),
            revocation: RevocationBackend::Memory,
            secret_engines: secrets::SecretEngineSettings::default(),
            rotation: Some(baton_ca::RotationSchedule::default()),
            rotation_check_every: Duration::from_secs(10),
            upstream: None,
            audit_head: baton_audit::HeadPolicy::Enforce,
            serve_limits: baton_tls::ServeLimits::default(),
            rate_limits: limits::RateLimits::default(),
            ops: None,
        }
    }
}

/// The broker's state, one database behind the three store traits.
struct Stores {
    datastore: Arc<dyn Datastore>,
    tasks: Arc<dyn tasks::TaskStore>,
    ledger: Arc<dyn ledger::Ledger>,
    /// The same database when it is PostgreSQL (shared CA, leases).
    pg: Option<Arc<pg::PgStore>>,
}

impl Stores {
    fn of<S: Datastore + tasks::TaskStore + ledger::Ledger + 'static>(s: Arc<S>) -> Self {
        Self {
            datastore: s.clone(),
            tasks: s.clone(),
            ledger: s,
            pg: None,
        }
    }

    fn of_pg(s: Arc<pg::PgStore>) -> Self {
        Self {
            pg: Some(s.clone()),
            ..Self::of(s)
        }
    }
}

/// Opens the configured datastore (blocking work, off the async workers).
async fn open_stores(cfg: &BrokerConfig) -> Result<Stores, StartError> {
    let pg = cfg.datastore.clone();
    let file = cfg.data_dir.as_ref().map(|d| d.join("broker.db"));
    tokio::task::spawn_blocking(move || -> Result<Stores, StartError> {
        Ok(match (pg, file) {
            (Some(settings), _) => Stores::of_pg(Arc::new(pg::PgStore::open(&settings)?)),
            (None, Some(path)) => Stores::of(Arc::new(SqliteStore::open(&path)?)),
            (None, None) => Stores::of(Arc::new(SqliteStore::in_memory()?)),
        })
    })
    .await
    .map_err(|e| StartError::Internal(format!("opening the datastore failed: {e}")))?
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
    #[error("admin socket: {0}")]
    AdminSocket(#[from] baton_tls::SocketFileError),
    #[error("policies: {0}")]
    Policy(#[from] baton_policy::PolicyError),
    #[error("admission policy: {0}")]
    Admission(#[from] admission::AdmissionLoadError),
    #[error("audit log: {0}")]
    Audit(#[from] baton_audit::AuditError),
    #[error(
        "audit log {path} does not extend its head file, refusing to append to it: {reason}. If this loss is known and accepted (e.g. the database was restored from a backup), start once with --dangerously-accept-audit-log-loss; the old head file is then kept beside it"
    )]
    AuditHead {
        path: PathBuf,
        reason: baton_audit::TamperError,
    },
    #[error("OIDC: {0}")]
    Oidc(#[from] oidc::OidcError),
    #[error("revocation store: {0}")]
    Revocation(#[from] baton_revocation::RevocationError),
    #[error("secret engines: {0}")]
    Secrets(String),
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
    /// Reloads the policies of the running broker (the binary calls it on
    /// SIGHUP).
    pub reloader: Reloader,
}

/// The hop policy (Cedar): a directory, or the embedded sources.
fn load_hop_policy(
    dir: Option<&Path>,
    embedded: &[(String, String)],
) -> Result<baton_policy::Engine, baton_policy::PolicyError> {
    match dir {
        Some(dir) => baton_policy::Engine::load_dir(dir),
        None => {
            let (schema, policies) = baton_policy::split_schema(embedded.iter().cloned());
            baton_policy::Engine::from_sources(&schema, &policies)
        }
    }
}

/// What a running broker can safely reload: the policies read from
/// directories (`--policies`, `--admission-policy`) and the OIDC issuers'
/// JWKS files (`--oidc-jwks`). Each is parsed and validated whole first;
/// one that fails leaves the one in force in place. Everything else
/// (listeners, keys, the datastore, which issuers are trusted) needs a
/// restart; the CA's own keys and bundle rotate without one.
#[derive(Debug, Clone)]
pub struct Reloader {
    policy_dir: Option<PathBuf>,
    admission: AdmissionSource,
    issuers: Vec<String>,
    delegation: Arc<delegation::Delegation>,
}

/// The outcome of one [`Reloader::reload`], for the log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReloadReport {
    /// What was replaced, e.g. `hop policies from /etc/baton/policies`.
    pub reloaded: Vec<String>,
    /// What failed to load (the old one stays in force), with why.
    pub failed: Vec<String>,
    /// What has no file to reload (built in).
    pub skipped: Vec<String>,
}

impl Reloader {
    /// Re-reads the policy directories; blocking (file reads, Cedar
    /// validation): call it off the async workers.
    pub fn reload(&self) -> ReloadReport {
        let mut report = ReloadReport::default();
        match &self.policy_dir {
            Some(dir) => match baton_policy::Engine::load_dir(dir) {
                Ok(engine) => {
                    self.delegation.replace_policy(engine);
                    report
                        .reloaded
                        .push(format!("hop policies from {}", dir.display()));
                }
                Err(e) => report.failed.push(format!(
                    "hop policies from {} (the previous ones stay in force): {e}",
                    dir.display()
                )),
            },
            None => report.skipped.push("hop policies (built in)".into()),
        }
        match &self.admission {
            AdmissionSource::Dir(dir) => match admission::load(&self.admission, &self.issuers) {
                Ok(policy) => {
                    self.delegation.replace_admission(policy);
                    report
                        .reloaded
                        .push(format!("admission policies from {}", dir.display()));
                }
                Err(e) => report.failed.push(format!(
                    "admission policies from {} (the previous ones stay in force): {e}",
                    dir.display()
                )),
            },
            _ => report.skipped.push("admission policies (built in)".into()),
        }
        // The IdPs' keys: a key an IdP rotated in is trusted, and one it
        // withdrew (compromised) starts no task and decides no approval,
        // without a restart.
        let oidc = self.delegation.oidc();
        let files: Vec<String> = oidc
            .issuers()
            .iter()
            .filter_map(|i| {
                i.source()
                    .map(|p| format!("{} ({})", i.issuer, p.display()))
            })
            .collect();
        if files.is_empty() {
            report
                .skipped
                .push("OIDC issuer keys (none read from a JWKS file)".into());
        } else {
            match oidc.reread() {
                Ok(fresh) => {
                    self.delegation.replace_oidc(fresh);
                    report
                        .reloaded
                        .push(format!("OIDC issuer keys of {}", files.join(", ")));
                }
                Err(e) => report
                    .failed
                    .push(format!("OIDC issuer keys (the keys in force stay): {e}")),
            }
        }
        report
    }
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

/// Opens the audit log, refusing one that was cut short or rewritten
/// unless `head` accepts it, which is then logged as an error.
fn open_audit(
    path: &Path,
    keys: baton_audit::AuditKeys,
    head: baton_audit::HeadPolicy,
) -> Result<baton_audit::AuditLog, StartError> {
    use baton_audit::{AuditError, TamperReason};
    let options = baton_audit::LogOptions {
        head,
        ..baton_audit::LogOptions::default()
    };
    let log =
        baton_audit::AuditLog::open_with_options(path, keys, options).map_err(|e| match e {
            AuditError::Tampered(t)
                if matches!(
                    t.reason,
                    TamperReason::Truncated { .. }
                        | TamperReason::Forked { .. }
                        | TamperReason::WitnessInvalid { .. }
                        | TamperReason::HeadFileMissing { .. }
                ) =>
            {
                StartError::AuditHead {
                    path: path.to_owned(),
                    reason: t,
                }
            }
            other => other.into(),
        })?;
    if let Some(loss) = log.accepted_loss() {
        tracing::error!(
            audit_log = %path.display(),
            "AUDIT LOG LOSS ACCEPTED by --dangerously-accept-audit-log-loss: {loss}; the old head file was set aside and the log is now witnessed as it is"
        );
    }
    Ok(log)
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
    cfg.serve_limits.validate()?;
    let now = SystemTime::now();
    // Policies first: a bad policy stops start-up with its file and line.
    let policy = Arc::new(load_hop_policy(
        cfg.policy_dir.as_deref(),
        &cfg.embedded_policies,
    )?);
    let issuer_names: Vec<String> = cfg.oidc_issuers.iter().map(|i| i.issuer.clone()).collect();
    let admission = Arc::new(admission::load(&cfg.admission, &issuer_names)?);
    let (key_dir, audit) = match &cfg.data_dir {
        Some(dir) => {
            prepare_dir(dir)?;
            let ca_dir = dir.join("ca");
            prepare_dir(&ca_dir)?;
            let audit_dir = dir.join("audit");
            prepare_dir(&audit_dir)?;
            let keys = baton_audit::AuditKeys::load_or_create(&audit_dir)?;
            let audit = open_audit(&dir.join("audit.db"), keys, cfg.audit_head)?;
            (Some(ca_dir), audit)
        }
        None => (
            None,
            baton_audit::AuditLog::in_memory(baton_audit::AuditKeys::generate()?)?,
        ),
    };
    let stores = open_stores(&cfg).await?;
    let audit = audit.with_observer(Arc::new(crate::ops::AuditMetrics));
    let store: Arc<dyn Datastore> = stores.datastore.clone();
    let upstream = match &cfg.upstream {
        Some((cert, key)) => Some(Arc::new(baton_ca::UpstreamAuthority::from_pem_files(
            cert, key,
        )?)),
        None => None,
    };
    if let Some(s) = &cfg.rotation {
        s.validate().map_err(StartError::Internal)?;
        let lead = cfg.ca_ttl.mul_f64(1.0 - s.activate_at);
        if cfg.max_svid_ttl > lead {
            tracing::warn!(
                max_svid_ttl = ?cfg.max_svid_ttl,
                ?lead,
                "SVIDs issued late in an authority's life are cut short at its expiry: keep max SVID TTL below (1 - activate fraction) x CA TTL"
            );
        }
    }
    let shared: Option<Arc<dyn baton_ca::SharedCaStore>> = match (&cfg.ca_seal_key_file, &stores.pg)
    {
        (Some(file), Some(pg)) => {
            let key = pg_ca::CaSealKey::from_file(file).map_err(StartError::Internal)?;
            Some(Arc::new(pg_ca::PgCaStore::new(pg.clone(), key)))
        }
        (Some(_), None) => {
            return Err(StartError::Internal(
                    "--ca-encryption-key-file keeps the CA in the PostgreSQL datastore: give --datastore postgres://... too".into(),
                ));
        }
        (None, Some(_)) => {
            tracing::warn!(
                "the CA's keys are in this broker's data dir, not in the shared datastore: another broker on this database would be a CA of its own that this one's agents do not trust; to run several brokers give each the same --ca-encryption-key-file"
            );
            None
        }
        (None, None) => None,
    };
    let shared_ca = shared.is_some();
    // Several brokers, one audit trail: each broker's log is shipped to the
    // datastore before its receipts leave, and traces read every log.
    let audit = match (&cfg.ca_seal_key_file, &stores.pg) {
        (Some(file), Some(pg)) => {
            let key = pg_ca::CaSealKey::from_file(file).map_err(StartError::Internal)?;
            let mirror =
                pg_audit::PgAuditMirror::new(pg.clone(), key, broker_instance_id(cfg.listen));
            let audit = audit.with_mirror(Arc::new(mirror));
            let shipped = audit.sync_mirror()?;
            tracing::info!(
                log = %audit.log_id(),
                events = shipped,
                "audit log shipped to the shared datastore"
            );
            audit
        }
        _ => audit,
    };
    let ca = Ca::load_or_create(
        CaConfig {
            trust_domain: cfg.trust_domain.clone(),
            ca_ttl: cfg.ca_ttl,
            key_dir,
            max_svid_ttl: cfg.max_svid_ttl,
            upstream,
            shared,
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

    let dev_issuer = if cfg.dev_issuer {
        tracing::warn!(
            "the dev OIDC issuer is on (--dev-issuer): whoever can use the admin socket can mint ID tokens for any user and group, and so start tasks and approve calls as anyone; never in production"
        );
        Some(oidc::DevIssuer::generate()?)
    } else {
        None
    };
    let mut issuers = cfg.oidc_issuers.clone();
    if let Some(dev) = &dev_issuer {
        issuers.push(dev.issuer()?);
    }
    let (store, heartbeat): (Arc<dyn baton_revocation::RevocationStore>, _) = match &cfg.revocation
    {
        RevocationBackend::Memory => (Arc::new(baton_revocation::MemoryStore::new()), None),
        RevocationBackend::Redis(redis) => {
            let store = baton_revocation::RedisStore::open(redis).await?;
            let hb = baton_revocation::Heartbeat::spawn(store.clone(), Duration::from_secs(1));
            (Arc::new(store), Some(hb))
        }
    };
    let redis_store = heartbeat.is_some().then(|| store.clone());
    let revoker = Arc::new(revocation::Revoker::new(store, stores.ledger.clone()));
    // The relay publishes the datastore's revocations to the store (and
    // re-seeds a store that lost its data) before and while anything trusts
    // it; a store that is down now is caught up when it returns.
    if let Err(e) = revoker.relay_once(oidc::unix_now()).await {
        tracing::warn!(error = %e, "revocation store not caught up at start; the relay keeps trying");
    }
    let (relay_stop_tx, relay_stop_rx) = tokio::sync::watch::channel(false);
    let reseeder = revoker.spawn_relay(relay_stop_rx, cfg.serve_limits.shutdown_grace);
    // Secret leases die with the credentials they hang under: every
    // revocation from here on kills them in their engines, and leases
    // revoked while a previous run could not kill them are killed now.
    let secrets = Arc::new(
        secrets::Secrets::build(&cfg.secret_engines, cfg.data_dir.as_deref())
            .await
            .map_err(StartError::Secrets)?,
    );
    revoker.set_lease_reaper(secrets.clone());
    let revoked_before = revoker
        .revoked_credentials(oidc::unix_now())
        .map_err(|e| StartError::Internal(e.to_string()))?;
    secrets.revoke_leases(&revoked_before).await;
    let sweeper = secrets.spawn_sweeper(cfg.secret_engines.sweep_interval);
    let jwt_bundles = baton_verify::JwtBundles::new([bundle.clone()]);
    let audit = Arc::new(audit);
    if cfg.ca_seal_key_file.is_some() && stores.pg.is_some() {
        // Every broker follows (and remembers) every other broker's log, so
        // one that is later removed or cut short in the database is caught
        // even by a broker that never traced its tasks.
        let follower = audit.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(AUDIT_FOLLOW_EVERY);
            loop {
                every.tick().await;
                let a = follower.clone();
                match tokio::task::spawn_blocking(move || a.follow_shared()).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::error!(error = %e, "the shared audit trail does not check out")
                    }
                    Err(e) => tracing::warn!(error = %e, "following the shared audit trail failed"),
                }
            }
        });
    }
    if let Some(o) = &cfg.ops {
        ops::install(
            o,
            ops::Parts {
                broker: broker.clone(),
                datastore: stores.ledger.clone(),
                audit: audit.clone(),
                revoker: revoker.clone(),
                redis: redis_store,
            },
        );
    }
    let delegation = Arc::new(delegation::Delegation::new(
        broker.clone(),
        stores.tasks,
        oidc::OidcVerifier::new(issuers),
        dev_issuer,
        policy,
        admission,
        audit,
        baton_verify::TokenVerifier::for_broker(
            jwt_bundles.clone(),
            Arc::new(revocation::DurableCheck(revoker.clone())),
        ),
        cfg.delegation.clone(),
        revoker.clone(),
    ));
    let reloader = Reloader {
        policy_dir: cfg.policy_dir.clone(),
        admission: cfg.admission.clone(),
        issuers: issuer_names,
        delegation: delegation.clone(),
    };
    let bundle_file = cfg.data_dir.as_ref().map(|d| d.join("bundle.pem"));
    if let Some(path) = &bundle_file {
        // Whole or not at all: a co-located daemon may bootstrap from it.
        baton_ca::write_public_file(path, bundle_pem.as_bytes()).map_err(|e| {
            StartError::DataDir {
                path: path.clone(),
                source: std::io::Error::other(e.to_string()),
            }
        })?;
    }

    // The node listener: HTTPS, client certificate optional (join-token
    // attestation has none yet), any SVID of our trust domain accepted at
    // the TLS layer; routes then require an attested node.
    let bundles = BundleStore::new();
    bundles.set(cfg.trust_domain.clone(), bundle.x509_authorities.clone());
    let listener_bundles = bundles.clone();
    let serving_ttl = cfg.agent_svid_ttl;
    let (chain, key) = ca.broker_serving_identity(&cfg.serving_dns_names, serving_ttl, now)?;
    let identity = ServerIdentity::new(chain.clone(), key.expose())?;
    if let (Some(by), Ok(info)) = (
        chain.first().and_then(|leaf| Ca::signer_of(leaf)),
        baton_ca::leaf_info(&chain),
    ) {
        broker.rotation().issued(
            rotation::SlotKind::Broker,
            "serving",
            &by,
            info.not_after
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        );
    }
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

    // The admin socket: owner-only file mode plus a peer uid check. A
    // stale socket is replaced; a live one (another broker given the same
    // path) or anything else at that path (a typo naming the audit log, a
    // symlink) is left alone and refused. Removed at shutdown only while
    // it is still ours.
    let (admin_listener, admin_socket_file) =
        baton_tls::bind_unix_socket(&cfg.admin_socket, 0o600)?;
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
            reloader,
        });
    }

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let stopped = move |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    // Keep the serving certificate fresh (renew at half-life), and follow
    // every change of the CA's keys: the new bundle goes into the node
    // listener, the delegation verifier and bundle.pem; the serving
    // certificate is re-issued once its signer is no longer the active,
    // untainted authority.
    let watch_broker = broker.clone();
    let dns = cfg.serving_dns_names.clone();
    let td = cfg.trust_domain.clone();
    let mut changes = broker.rotation().subscribe();
    let mut renew_stop = stop_rx.clone();
    let mut serving_chain = chain;
    let renewer = tokio::spawn(async move {
        let mut renew_at = tokio::time::Instant::now() + serving_ttl / 2;
        // The bundle last put in force here. The CA's state is also looked
        // at on a timer, not only when told of a change: a step another
        // broker took can reach this broker's CA through a write of its
        // own (a checkpoint of its signing marks) without being signalled
        // as a change, and must still reach the listener, the verifier and
        // the serving certificate.
        let mut in_force: Option<String> = None;
        // A renewal failed: the next try is at `renew_at`, not at the next
        // look at the CA.
        let mut failed = false;
        loop {
            let mut due = false;
            tokio::select! {
                () = tokio::time::sleep_until(renew_at) => due = true,
                r = changes.changed() => if r.is_err() { return },
                () = tokio::time::sleep(CA_LOOK_EVERY) => {},
                _ = renew_stop.wait_for(|s| *s) => return,
            }
            let ca = watch_broker.ca();
            let bundle = ca.bundle();
            // Both kinds of authority, and the sequence.
            let whole = bundle.to_spiffe_json().to_string();
            if in_force.as_deref() != Some(whole.as_str()) {
                listener_bundles.set(td.clone(), bundle.x509_authorities.clone());
                jwt_bundles.set(&bundle);
                if let Some(path) = &bundle_file
                    && let Err(e) = baton_ca::write_public_file(path, bundle.to_pem().as_bytes())
                {
                    tracing::warn!(error = %e, path = %path.display(), "cannot rewrite bundle.pem");
                }
                in_force = Some(whole);
            }
            let signer = serving_chain.first().and_then(|leaf| Ca::signer_of(leaf));
            let tainted = ca.tainted_ids();
            let stale = signer.as_deref() != Some(ca.active_x509_id().as_str())
                || signer.as_ref().is_some_and(|s| tainted.contains(s));
            if !due && (failed || !stale) {
                continue;
            }
            failed = true;
            let now = SystemTime::now();
            match ca.broker_serving_identity(&dns, serving_ttl, now) {
                Ok((chain, key)) => {
                    if let Some(leaf) = chain.first()
                        && let (Some(by), Ok(info)) =
                            (Ca::signer_of(leaf), baton_ca::leaf_info(&chain))
                    {
                        watch_broker.rotation().issued(
                            rotation::SlotKind::Broker,
                            "serving",
                            &by,
                            info.not_after
                                .duration_since(std::time::UNIX_EPOCH)
                                .map_or(0, |d| d.as_secs()),
                        );
                    }
                    match identity.replace(chain.clone(), key.expose()) {
                        Ok(()) => {
                            serving_chain = chain;
                            renew_at = tokio::time::Instant::now() + serving_ttl / 2;
                            failed = false;
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "cannot install renewed serving certificate");
                            renew_at = tokio::time::Instant::now() + RENEW_RETRY;
                        }
                    }
                }
                Err(e) => {
                    // Tried again later, not at once: a renewal that cannot
                    // succeed (no usable authority) must not spin.
                    tracing::error!(error = %e, retry_in = ?RENEW_RETRY, "cannot renew serving certificate");
                    renew_at = tokio::time::Instant::now() + RENEW_RETRY;
                }
            }
        }
    });
    // The rotation schedule (or, without one, only the pruning of
    // authorities whose signatures have all expired).
    let sched_broker = broker.clone();
    let schedule = cfg.rotation;
    let check_every = cfg.rotation_check_every;
    // With several brokers on one database, one of them (the holder of
    // the `ca-schedule` lease, renewed every check and lost three checks
    // after its broker stopped renewing it) runs the schedule; every
    // step also runs under the shared CA's lock, on what is stored.
    let lease = stores.pg.clone().filter(|_| shared_ca);
    let instance = broker_instance_id(cfg.listen);
    let scheduler = tokio::spawn(async move {
        let mut leading = false;
        // Checks left before a leader whose step failed asks for the
        // lease again: it lapses meanwhile, so another broker (whose CA
        // may be healthy) takes the schedule over.
        let mut stand_down = 0u32;
        loop {
            tokio::time::sleep(check_every).await;
            if let Some(pg) = &lease {
                let held = if stand_down > 0 {
                    stand_down -= 1;
                    Ok(false)
                } else {
                    pg.lease("ca-schedule", &instance, check_every.saturating_mul(3))
                };
                let now_leading = matches!(held, Ok(true));
                if now_leading != leading {
                    tracing::info!(
                        instance,
                        leading = now_leading,
                        "CA schedule lease changed hands"
                    );
                }
                leading = now_leading;
                if let Err(e) = held {
                    tracing::warn!(error = %e, "cannot take or renew the CA schedule lease");
                }
                if !leading {
                    if let Err(e) = sched_broker.ca().checkpoint() {
                        tracing::warn!(error = %e, "cannot persist the CA journal");
                    }
                    continue;
                }
            }
            let now = SystemTime::now();
            let result = match &schedule {
                Some(s) => sched_broker
                    .authorities()
                    .ca_scheduled_step(s, now)
                    .map(|_| ()),
                None => sched_broker
                    .ca()
                    .prune(now)
                    .map(|events| {
                        if !events.is_empty() {
                            sched_broker.rotation().notify();
                        }
                    })
                    .map_err(BrokerError::from),
            };
            if let Err(e) = result {
                tracing::error!(error = %e, "CA rotation step failed");
                if lease.is_some() {
                    stand_down = 4;
                }
            }
            if let Err(e) = sched_broker.ca().checkpoint() {
                tracing::warn!(error = %e, "cannot persist the CA journal");
            }
        }
    });

    // A broker sharing its CA follows the steps the others take: the new
    // bundle then reaches its listener, verifiers and agents as its own
    // steps do.
    let refresh_broker = broker.clone();
    let refresh_every = cfg.ca_refresh_every;
    let refresher = tokio::spawn(async move {
        if !shared_ca {
            return;
        }
        loop {
            tokio::time::sleep(refresh_every).await;
            refresh_broker.follow_shared_ca();
        }
    });

    let node = baton_tls::serve_https_with(
        listener,
        tls,
        http::https_routes(
            broker.clone(),
            delegation.clone(),
            secrets,
            Arc::new(limits::RateLimiters::new(&cfg.rate_limits)),
        ),
        cfg.serve_limits,
        stopped(stop_rx.clone()),
    );
    let grace = cfg.serve_limits.shutdown_grace;
    let admin = baton_tls::serve_unix_with(
        admin_listener,
        http::admin_routes(
            broker.clone(),
            delegation,
            http::AdminAccess { allowed_uids },
        ),
        grace,
        stopped(stop_rx),
    );
    let node = tokio::spawn(node);
    let admin = tokio::spawn(admin);
    shutdown.await;
    // Graceful shutdown: both listeners close (new connections are refused),
    // requests in flight finish within the grace period (feed long-polls
    // answer at once), then the relay publishes what they revoked, and the
    // CA journal is written. Every audit append is committed (and the head
    // file written) before its request answers, so nothing is left to flush
    // once the requests are done.
    tracing::info!(
        ?grace,
        "shutting down: no new connections; finishing requests in flight"
    );
    revoker.begin_shutdown();
    let _ = stop_tx.send(true);
    let (n, a) = (node.await, admin.await);
    // The admin socket served its last request: its file goes now (while
    // it is still ours), not after the relay's and the journal's work.
    drop(admin_socket_file);
    renewer.abort();
    scheduler.abort();
    refresher.abort();
    sweeper.abort();
    let _ = relay_stop_tx.send(true);
    if tokio::time::timeout(grace + Duration::from_secs(1), reseeder)
        .await
        .is_err()
    {
        tracing::warn!("the revocation relay did not stop in time");
    }
    drop(heartbeat);
    if let Err(e) = broker.ca().checkpoint() {
        tracing::warn!(error = %e, "cannot persist the CA journal at shutdown");
    }
    for r in [n, a] {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.into()),
            Err(e) => return Err(StartError::Internal(format!("listener task failed: {e}"))),
        }
    }
    Ok(())
}

/// This broker process among those sharing a database (for leases):
/// its listen address and a random part, fresh per start.
/// How often a broker follows the other brokers' audit logs.
const AUDIT_FOLLOW_EVERY: Duration = Duration::from_secs(30);

/// How often the serving-certificate renewer looks at the CA's state
/// (bundle, active authority) besides the changes it is told of.
const CA_LOOK_EVERY: Duration = Duration::from_secs(2);

/// How long after a failed serving-certificate renewal it is tried again.
const RENEW_RETRY: Duration = Duration::from_secs(5);

fn broker_instance_id(listen: SocketAddr) -> String {
    let mut rnd = [0u8; 6];
    if aws_lc_rs::rand::fill(&mut rnd).is_err() {
        // Still unique among live processes on this host.
        rnd[..4].copy_from_slice(&std::process::id().to_be_bytes());
    }
    format!("{listen}#{}", hex::encode(rnd))
}
