//! Long-running roles: `baton broker`, `baton agent` and `baton dev`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use baton_agent::{AgentConfig, AgentReady};
use baton_broker::{BrokerConfig, BrokerReady, LogIssuance};
use baton_core::api::JoinTokenRequest;
use baton_core::{NewEntry, Secret, SpiffeId, TrustDomain};
use tokio::sync::{oneshot, watch};

use crate::admin::AdminClient;
use crate::cli::{AgentArgs, BrokerArgs, DevArgs, EXIT_REFUSED, exit};
use crate::output;

/// The dev workload entry's X509-SVID lifetime without --x509-ttl.
const DEV_X509_TTL_SECS: u64 = 3600;

/// Resolves on SIGTERM or SIGINT (Ctrl-C). The handlers are installed
/// when this is called, not when it is first polled, so a signal that
/// arrives in between is not lost (nor kills the process).
pub(crate) fn terminate_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        let wait = |s: std::io::Result<tokio::signal::unix::Signal>| async move {
            match s {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending::<()>().await,
            }
        };
        let name = tokio::select! {
            () = wait(term) => "SIGTERM",
            () = wait(int) => "SIGINT",
        };
        tracing::info!(signal = name, "stopping");
    }
}

/// Calls `reload` (off the async workers) on every SIGHUP. Installing the
/// handler also keeps SIGHUP from ending the process, its default action.
pub(crate) fn on_hangup<F>(reload: F) -> Result<tokio::task::JoinHandle<()>>
where
    F: Fn() + Clone + Send + Sync + 'static,
{
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    Ok(tokio::spawn(async move {
        while hup.recv().await.is_some() {
            let reload = reload.clone();
            if let Err(e) = tokio::task::spawn_blocking(reload).await {
                tracing::error!(error = %e, "SIGHUP: the reload failed");
            }
        }
    }))
}

/// Logs what a broker's SIGHUP reloaded, and what it kept because the new
/// files did not load.
fn log_reload(report: &baton_broker::ReloadReport) {
    for what in &report.reloaded {
        tracing::info!("SIGHUP: reloaded {what}");
    }
    for what in &report.failed {
        tracing::error!("SIGHUP: cannot reload {what}");
    }
    if report.reloaded.is_empty() && report.failed.is_empty() {
        tracing::info!(
            "SIGHUP: nothing to reload ({}); certificates and bundles rotate without a signal",
            report.skipped.join(", ")
        );
    }
}

/// The broker's SIGHUP handler: reloads once `ready` says the broker runs
/// (a SIGHUP before that is kept and handled then).
fn reload_broker_on_hangup(
    ready: std::sync::Arc<std::sync::OnceLock<baton_broker::Reloader>>,
) -> Result<tokio::task::JoinHandle<()>> {
    on_hangup(move || match ready.get() {
        Some(reloader) => log_reload(&reloader.reload()),
        None => tracing::info!("SIGHUP before the broker was ready: nothing reloaded"),
    })
}

fn trust_domain(s: &str) -> Result<TrustDomain> {
    TrustDomain::new(s).map_err(|e| exit(EXIT_REFUSED, format!("--trust-domain: {e}")))
}

pub(crate) fn write_ready_file(path: &Path, contents: &str) -> Result<()> {
    // Write then rename, so a reader polling for the file never sees half of it.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// The one non-empty line of a password file, or a clear refusal. A file
/// every user can read or write is refused: the secret would not be one.
/// Its group may read it (Kubernetes gives a Secret volume's files to the
/// pod's `fsGroup`; systemd may show a credential's ACL as group access).
pub(crate) fn read_secret_line(flag: &str, path: &std::path::Path) -> Result<Secret> {
    crate::creds::refuse_shared_secret_file(flag, path)?;
    let text = std::fs::read_to_string(path).map_err(|e| {
        exit(
            EXIT_REFUSED,
            format!("{flag}: cannot read {}: {e}", path.display()),
        )
    })?;
    let line = text.trim_end_matches(['\n', '\r']);
    if line.is_empty() || line.contains(['\n', '\r']) {
        return Err(exit(
            EXIT_REFUSED,
            format!(
                "{flag}: {} must hold exactly one non-empty line",
                path.display()
            ),
        ));
    }
    Ok(Secret::new(line.to_owned()))
}

/// `--approver-group`s, each believed only as asserted by the issuer whose
/// users approve: `--oidc-issuer` when set, else the dev issuer. Never
/// both: a dev-issuer token (minted by anyone on the admin socket) naming
/// a corporate approver group grants nothing.
fn approver_groups(args: &BrokerArgs) -> Result<Vec<baton_broker::delegation::ApproverGroup>> {
    if args.approver_groups.is_empty() {
        return Ok(Vec::new());
    }
    let issuer = match (&args.oidc_issuer, args.dev_issuer) {
        (Some(iss), _) => iss.clone(),
        (None, true) => baton_broker::oidc::DEV_ISSUER.to_owned(),
        (None, false) => {
            return Err(exit(
                EXIT_REFUSED,
                "--approver-group: no OIDC issuer to assert group membership (add --oidc-issuer, or --dev-issuer outside production)",
            ));
        }
    };
    args.approver_groups
        .iter()
        .map(|g| {
            if g.is_empty() || g.chars().any(char::is_control) {
                return Err(exit(
                    EXIT_REFUSED,
                    format!(
                        "--approver-group: \"{}\" is not a group name",
                        g.escape_debug()
                    ),
                ));
            }
            Ok(baton_broker::delegation::ApproverGroup {
                issuer: issuer.clone(),
                group: g.clone(),
            })
        })
        .collect()
}

pub async fn broker(args: BrokerArgs) -> Result<()> {
    let td = trust_domain(&args.trust_domain)?;
    let admin_socket = args
        .admin_socket
        .clone()
        .unwrap_or_else(|| args.data_dir.join("admin.sock"));
    let mut cfg = BrokerConfig::new(td, Some(args.data_dir.clone()), admin_socket);
    cfg.listen = args.listen;
    cfg.admin_uids = args.admin_uids.clone();
    cfg.ca_ttl = args.ca_ttl;
    cfg.agent_svid_ttl = args.agent_svid_ttl;
    cfg.max_svid_ttl = args.max_svid_ttl;
    args.rotation.apply(&mut cfg)?;
    args.limits.apply(&mut cfg)?;
    delegation_config(
        &mut cfg,
        args.policies.clone(),
        args.purposes_file.as_deref(),
        &args.tool_servers,
    )?;
    cfg.delegation.approver_groups = approver_groups(&args)?;
    cfg.delegation.token_ttl = args.hop_token_ttl;
    if args.dev_issuer && args.oidc_issuer.is_some() {
        // Anyone on the admin socket mints dev-issuer ID tokens for any
        // user and group: beside a real issuer they would start tasks and
        // approve calls an admission policy written for it lets through.
        return Err(exit(
            EXIT_REFUSED,
            "--dev-issuer cannot be combined with --oidc-issuer: dev-issuer ID tokens are minted by whoever reaches the admin socket; use one or the other",
        ));
    }
    cfg.dev_issuer = args.dev_issuer;
    if let Some(dir) = &args.admission_policy {
        cfg.admission = baton_broker::AdmissionSource::Dir(dir.clone());
    }
    if args.dangerously_accept_audit_log_loss {
        cfg.audit_head = baton_audit::HeadPolicy::DangerouslyAcceptLoss;
    }
    if let Some(redis) = args.redis.config()? {
        cfg.revocation = baton_broker::RevocationBackend::Redis(redis);
    }
    if let Some(conn) = &args.datastore {
        let password = match &args.datastore_password_file {
            Some(path) => Some(read_secret_line("--datastore-password-file", path)?),
            None => None,
        };
        if let Some(key) = &args.datastore_client_key {
            crate::creds::refuse_shared_secret_file("--datastore-client-key", key)?;
        }
        cfg.datastore = Some(baton_broker::pg::PgSettings {
            conn: conn.clone(),
            password,
            pool: usize::from(args.datastore_pool),
            tls: baton_broker::pg_tls::PgTls {
                ca_file: args.datastore_ca.clone(),
                client_cert: args.datastore_client_cert.clone(),
                client_key: args.datastore_client_key.clone(),
            },
        });
    }
    cfg.ca_seal_key_file = args.ca_encryption_key_file.clone();
    cfg.secret_engines = baton_broker::secrets::SecretEngineSettings {
        postgres: match (&args.pg_admin_url, &args.pg_database) {
            (Some(url), Some(db)) => Some(baton_broker::secrets::PostgresSettings {
                admin_url: Secret::new(url.clone()),
                admin_password: match &args.pg_admin_password_file {
                    Some(path) => Some(read_secret_line("--pg-admin-password-file", path)?),
                    None => None,
                },
                database: db.clone(),
                grants: args.pg_grants.clone(),
                permission: args.pg_permission.clone(),
                host: args.pg_host.clone(),
                port: args.pg_port,
            }),
            _ => None,
        },
        apikey_permission: args.apikey_permission.clone(),
        sweep_interval: args.secret_sweep_interval,
    };
    if let (Some(iss), Some(jwks), Some(aud)) =
        (&args.oidc_issuer, &args.oidc_jwks, &args.oidc_audience)
    {
        // Read again on SIGHUP; a file every user can write is refused.
        cfg.oidc_issuers.push(
            baton_broker::oidc::OidcIssuer::from_jwks_file(iss, aud, jwks)
                .map_err(|e| exit(EXIT_REFUSED, format!("--oidc-jwks: {e}")))?,
        );
    }
    let ops = crate::ops::start(&args.ops).await?;
    cfg.ops = ops.clone();
    let (tx, rx) = oneshot::channel::<BrokerReady>();
    let ready_file = args.ready_file.clone();
    let reloader = Arc::new(std::sync::OnceLock::new());
    let hup = reload_broker_on_hangup(reloader.clone())?;
    let stop = terminate_signal();
    let announcer = tokio::spawn(async move {
        if let Ok(ready) = rx.await {
            let _ = reloader.set(ready.reloader.clone());
            if let Some(ops) = ops {
                ops.set_started();
            }
            if let Some(path) = ready_file
                && let Err(e) = write_ready_file(&path, &ready.addr.to_string())
            {
                tracing::error!(error = %e, "cannot write ready file");
            }
        }
    });
    baton_broker::run(cfg, Arc::new(LogIssuance), Some(tx), stop)
        .await
        .context("broker failed")?;
    announcer.abort();
    hup.abort();
    tracing::info!("broker stopped");
    Ok(())
}

/// Policies (a directory, or the built-in example set) and the purpose catalogue.
fn delegation_config(
    cfg: &mut BrokerConfig,
    policies: Option<PathBuf>,
    purposes_file: Option<&Path>,
    tool_servers: &[String],
) -> Result<()> {
    cfg.policy_dir = policies;
    for raw in tool_servers {
        let (aud, id) = raw.split_once('=').ok_or_else(|| {
            exit(
                EXIT_REFUSED,
                format!("--tool-server {raw:?}: expected AUDIENCE=SPIFFE_ID"),
            )
        })?;
        let id = baton_core::SpiffeId::parse(id)
            .map_err(|e| exit(EXIT_REFUSED, format!("--tool-server {raw:?}: {e}")))?;
        if aud.trim().is_empty() {
            return Err(exit(
                EXIT_REFUSED,
                format!("--tool-server {raw:?}: the audience is empty"),
            ));
        }
        cfg.delegation
            .tool_servers
            .entry(aud.to_owned())
            .or_default()
            .push(id);
    }
    if let Some(p) = purposes_file {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("--purposes-file: cannot read {}", p.display()))?;
        cfg.delegation.purposes = baton_broker::parse_purposes(&text)
            .map_err(|e| exit(EXIT_REFUSED, format!("--purposes-file: {e}")))?;
    }
    Ok(())
}

/// `baton revocation`: the service several brokers and many verifiers
/// share through one Redis. Brokers register and revoke directly (they own
/// the durable log and re-seed Redis from it); this process keeps the feed's
/// heartbeat going independently of any broker and reports the store's
/// health, warning when Redis lost its data and waits for a broker to
/// re-seed it.
pub async fn revocation(args: crate::cli::RevocationArgs) -> Result<()> {
    use baton_revocation::RevocationStore;
    let redis = args.redis.required()?;
    let stop = terminate_signal();
    let hup = on_hangup(|| {
        tracing::info!("SIGHUP: the revocation service has nothing to reload");
    })?;
    let store = baton_revocation::RedisStore::open(&redis)
        .await
        .map_err(|e| exit(crate::cli::EXIT_UNREACHABLE, e.to_string()))?;
    let heartbeat = baton_revocation::Heartbeat::spawn_service(store.clone(), args.heartbeat);
    if let Some(ops) = crate::ops::start(&args.ops).await? {
        revocation_ops(&ops, store.clone());
        ops.set_started();
    }
    tracing::info!(redis = %redis, heartbeat = ?args.heartbeat, "revocation service running");
    let mut lost = false;
    let watch = async {
        loop {
            let health = store.health().await;
            baton_ops::metrics().revocation_check(
                baton_revocation::system_now(),
                health.as_ref().ok().map(|h| !h.empty_since_seed),
            );
            match health {
                Ok(h) if h.empty_since_seed => {
                    if !lost {
                        tracing::warn!(
                            "Redis lost its revocation data; verifiers stay fail-closed until a broker re-seeds it"
                        );
                    }
                    lost = true;
                }
                Ok(h) => {
                    if lost {
                        tracing::info!(epoch = %h.epoch, "revocation store re-seeded");
                    }
                    lost = false;
                }
                Err(e) => tracing::warn!(error = %e, "revocation store unreachable"),
            }
            tokio::time::sleep(args.check_every).await;
        }
    };
    tokio::select! {
        () = stop => {}
        () = watch => {}
    }
    // The heartbeat publishes in one command: dropping it between two
    // beats (it is never dropped mid-write by a task abort) leaves nothing
    // half done.
    drop(heartbeat);
    hup.abort();
    tracing::info!("revocation service stopped");
    Ok(())
}

/// The revocation service's readiness: Redis answers now and holds a
/// seeded deny set; the gauges of its last check.
fn revocation_ops(ops: &baton_ops::Ops, store: baton_revocation::RedisStore) {
    use baton_revocation::RevocationStore;
    ops.add_role(baton_ops::Role::Revocation);
    ops.add_check("revocation_store", move || {
        let store = store.clone();
        async move {
            match store.health().await {
                Err(e) => Err(format!("Redis does not answer: {e}")),
                Ok(h) if h.empty_since_seed => Err(
                    "Redis lost its revocation data; verifiers stay fail-closed until a broker re-seeds it"
                        .into(),
                ),
                Ok(_) => Ok(()),
            }
        }
    });
    ops.on_scrape(|| baton_ops::metrics().revocation_refresh(baton_revocation::system_now()));
}

fn parse_mode(s: &str) -> Result<u32> {
    u32::from_str_radix(s, 8)
        .ok()
        .filter(|m| *m <= 0o777)
        .ok_or_else(|| {
            exit(
                EXIT_REFUSED,
                format!("--socket-mode: {s:?} is not an octal file mode like 666"),
            )
        })
}

fn agent_config(args: &AgentArgs) -> Result<AgentConfig> {
    let td = trust_domain(&args.trust_domain)?;
    let bootstrap_bundle_pem = match &args.trust_bundle {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("--trust-bundle: cannot read {}", p.display()))?,
        ),
        None => None,
    };
    if !(0.05..=0.95).contains(&args.rotate_fraction) {
        return Err(exit(
            EXIT_REFUSED,
            format!(
                "--rotate-fraction must be between 0.05 and 0.95, got {}",
                args.rotate_fraction
            ),
        ));
    }
    let broker_id = td
        .id("/baton/broker")
        .map_err(|e| exit(EXIT_REFUSED, e.to_string()))?;
    let broker_urls = baton_agent::client::broker_urls(&args.broker_urls)
        .map_err(|e| exit(EXIT_REFUSED, format!("--broker-url: {e}")))?;
    Ok(AgentConfig {
        data_dir: args.data_dir.clone(),
        socket_path: args.socket.clone(),
        broker_urls,
        broker_id,
        trust_domain: td,
        bootstrap_bundle_pem,
        join_token: crate::creds::join_token_input(
            args.join_token.as_deref(),
            args.join_token_file.as_deref(),
        )?,
        sync_interval: args.sync_interval,
        rotate_fraction: args.rotate_fraction,
        socket_mode: parse_mode(&args.socket_mode)?,
        ops: None,
        shutdown_grace: args.shutdown.shutdown_timeout,
    })
}

pub async fn agent(args: AgentArgs) -> Result<()> {
    let mut cfg = agent_config(&args)?;
    let stop = terminate_signal();
    let hup = on_hangup(|| {
        tracing::info!(
            "SIGHUP: the node daemon has nothing to reload (its identity, entries and bundle follow the broker)"
        );
    })?;
    let ops = crate::ops::start(&args.ops).await?;
    cfg.ops = ops.clone();
    let (tx, rx) = oneshot::channel::<AgentReady>();
    let ready_file = args.ready_file.clone();
    let announcer = tokio::spawn(async move {
        if let Ok(ready) = rx.await {
            if let Some(ops) = ops {
                ops.set_started();
            }
            if let Some(path) = ready_file
                && let Err(e) = write_ready_file(&path, ready.node_id.as_str())
            {
                tracing::error!(error = %e, "cannot write ready file");
            }
        }
    });
    match baton_agent::run(cfg, Some(tx), stop).await {
        // Final until an operator lifts it: told once, exit code 2.
        Err(e @ baton_agent::AgentError::Banned { .. }) => {
            return Err(exit(EXIT_REFUSED, e.to_string()));
        }
        r => r.context("agent failed")?,
    }
    announcer.abort();
    hup.abort();
    tracing::info!("node daemon stopped");
    Ok(())
}

/// Broker and agent in one process, on a local data dir.
pub async fn dev(args: DevArgs) -> Result<()> {
    let td = trust_domain(&args.trust_domain)?;
    let stop = terminate_signal();
    let reloader = Arc::new(std::sync::OnceLock::new());
    let hup = reload_broker_on_hangup(reloader.clone())?;
    let dir = absolute(&args.data_dir)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let admin_socket = dir.join("admin.sock");
    let agent_socket = dir.join("agent.sock");

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let mut cfg = BrokerConfig::new(td.clone(), Some(dir.join("broker")), admin_socket.clone());
    cfg.listen = args.listen;
    cfg.serve_limits.shutdown_grace = args.shutdown.shutdown_timeout;
    // One ops listener for both roles: ready once both serve.
    let ops = crate::ops::start(&args.ops).await?;
    cfg.ops = ops.clone();
    // The example CRM tool server (`baton example tool-server --audience
    // crm`, as spiffe://<td>/tools/crm) reports the calls of tokens for `crm`.
    delegation_config(
        &mut cfg,
        None,
        None,
        &[format!("crm=spiffe://{td}/tools/crm")],
    )?;
    cfg.dev_issuer = true;
    // Task starts and leases are Cedar decisions here too: the example
    // admission policies unless given a directory.
    cfg.admission = match &args.admission_policy {
        Some(dir) => baton_broker::AdmissionSource::Dir(absolute(dir)?),
        None => baton_broker::AdmissionSource::Sources(
            baton_broker::EXAMPLE_ADMISSION_POLICIES
                .iter()
                .map(|(n, s)| ((*n).to_owned(), (*s).to_owned()))
                .collect(),
        ),
    };
    let (btx, brx) = oneshot::channel::<BrokerReady>();
    let broker_fut = baton_broker::run(cfg, Arc::new(LogIssuance), Some(btx), stopped(stop_rx));
    let broker = tokio::spawn(async move { broker_fut.await.map_err(anyhow::Error::new) });
    let ready = match brx.await {
        Ok(r) => r,
        Err(_) => {
            return match broker.await {
                Ok(Err(e)) => Err(e.context("broker failed to start")),
                _ => Err(anyhow::anyhow!("broker stopped before it was ready")),
            };
        }
    };

    let _ = reloader.set(ready.reloader.clone());
    // Scripts (examples/) find the broker here.
    write_ready_file(&dir.join("broker.addr"), &ready.addr.to_string())?;
    // The dev node gets a fixed SPIFFE ID so dev entries survive restarts.
    let node_id: SpiffeId = td
        .id("/baton/node/dev")
        .map_err(|e| exit(EXIT_REFUSED, e.to_string()))?;
    let admin = AdminClient::new(&admin_socket)?;
    let token = admin
        .join_token(&JoinTokenRequest {
            ttl_secs: 600,
            node_id: Some(node_id.to_string()),
        })
        .await?;
    let uid = baton_broker::own_uid().unwrap_or(0);
    let workload_id = td
        .id("/dev/workload")
        .map_err(|e| exit(EXIT_REFUSED, e.to_string()))?;
    let created = admin
        .create_entry(&NewEntry {
            spiffe_id: workload_id.to_string(),
            parent_id: node_id.to_string(),
            selectors: vec![format!("unix:uid:{uid}")],
            x509_ttl_secs: args.x509_ttl.map_or(DEV_X509_TTL_SECS, |d| d.as_secs()),
            jwt_ttl_secs: 300,
            dns_names: vec![],
        })
        .await;
    if let Err(e) = &created
        && !e.to_string().contains("already exists")
    {
        return Err(created
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("entry create failed")));
    }
    if created.is_err()
        && let Some(asked) = args.x509_ttl
    {
        // The entry is from an earlier run on this data dir: say so if it
        // does not have the lifetime asked for now.
        let list: baton_core::api::EntryList = admin.get("/v1/admin/entries").await?;
        if let Some(e) = list
            .entries
            .iter()
            .find(|e| e.spiffe_id == workload_id && e.parent_id == node_id)
            && e.x509_ttl_secs != asked.as_secs()
        {
            tracing::warn!(
                "--x509-ttl {} is ignored: the dev entry {} ({}) already exists in {} with an X509-SVID lifetime of {}; `baton entry delete {}` and restart `baton dev` to apply it, or start with a fresh --data-dir",
                humantime::format_duration(asked),
                e.spiffe_id,
                e.id,
                dir.display(),
                humantime::format_duration(std::time::Duration::from_secs(e.x509_ttl_secs)),
                e.id,
            );
        }
    }

    let agent_cfg = AgentConfig {
        data_dir: dir.join("agent"),
        socket_path: agent_socket.clone(),
        broker_urls: vec![format!("https://{}", ready.addr)],
        broker_id: td
            .id("/baton/broker")
            .map_err(|e| exit(EXIT_REFUSED, e.to_string()))?,
        trust_domain: td.clone(),
        bootstrap_bundle_pem: Some(ready.bundle_pem.clone()),
        join_token: Some(token.token),
        sync_interval: std::time::Duration::from_secs(2),
        rotate_fraction: 0.5,
        socket_mode: 0o666,
        ops: ops.clone(),
        shutdown_grace: args.shutdown.shutdown_timeout,
    };
    let (atx, arx) = oneshot::channel::<AgentReady>();
    // The agent stops first, so that its calls to the broker in flight
    // finish before the broker stops.
    let (agent_stop_tx, agent_stop_rx) = watch::channel(false);
    let agent_fut = baton_agent::run(agent_cfg, Some(atx), stopped(agent_stop_rx));
    let agent = tokio::spawn(async move { agent_fut.await.map_err(anyhow::Error::new) });
    let agent_ready = match arx.await {
        Ok(r) => r,
        Err(_) => {
            let _ = stop_tx.send(true);
            return match agent.await {
                Ok(Err(e)) => Err(e.context("agent failed to start")),
                _ => Err(anyhow::anyhow!("agent stopped before it was ready")),
            };
        }
    };

    if let Some(ops) = &ops {
        ops.set_started();
    }
    let exe = std::env::current_exe()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "baton".into());
    output::line("Baton dev is running (Ctrl-C to stop).");
    output::line(&format!("  trust domain:        {td}"));
    output::line(&format!("  broker:              https://{}", ready.addr));
    output::line(&format!(
        "  admin socket:        {}",
        admin_socket.display()
    ));
    output::line(&format!(
        "  Workload API socket: {}",
        agent_ready.socket_path.display()
    ));
    output::line(&format!("  node SPIFFE ID:      {}", agent_ready.node_id));
    output::line(&format!("  your uid {uid} gets:    {workload_id}"));
    output::line("");
    output::line("Fetch an SVID from another terminal:");
    output::line(&format!(
        "  SPIFFE_ENDPOINT_SOCKET=unix://{} {exe} svid fetch",
        agent_ready.socket_path.display()
    ));

    let (mut broker, mut agent) = (broker, agent);
    let early = tokio::select! {
        () = stop => None,
        r = &mut broker => Some(("broker", r)),
        r = &mut agent => Some(("agent", r)),
    };
    let _ = agent_stop_tx.send(true);
    if let Some((name, r)) = early {
        let _ = stop_tx.send(true);
        return match r {
            Ok(Ok(())) => Err(anyhow::anyhow!("{name} stopped unexpectedly")),
            Ok(Err(e)) => Err(e.context(format!("{name} failed"))),
            Err(e) => Err(anyhow::anyhow!("{name} task failed: {e}")),
        };
    }
    let agent = agent.await;
    let _ = stop_tx.send(true);
    for (name, r) in [("agent", agent), ("broker", broker.await)] {
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e.context(format!("{name} failed"))),
            Err(e) => return Err(anyhow::anyhow!("{name} task failed: {e}")),
        }
    }
    hup.abort();
    tracing::info!("baton dev stopped");
    Ok(())
}

fn absolute(p: &Path) -> Result<PathBuf> {
    if p.is_absolute() {
        return Ok(p.to_owned());
    }
    Ok(std::env::current_dir()
        .context("reading the current directory")?
        .join(p))
}
