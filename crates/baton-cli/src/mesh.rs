//! Two workloads that talk mTLS with identities from the Workload API and
//! follow it live: every rotated SVID and every bundle change (a prepared
//! authority, a revoked one) is swapped into their TLS configuration
//! without a restart. `baton example echo-server` answers with the
//! caller's SPIFFE ID; `baton example echo-client` calls it on a fresh
//! connection (a full handshake) each time and counts failures. Operators
//! use the pair to watch a CA rotation; the end-to-end tests use it to
//! prove zero failed requests through one.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use baton_core::{SpiffeId, TrustDomain};
use baton_tls::{
    BundleStore, ClientAuth, ClientIdentity, PeerIdentity, PeerPolicy, ServerIdentity,
};
use serde::Serialize;
use spiffe::X509Source;
use spiffe::x509_source::SvidPicker;
use warp::Filter as _;

use crate::cli::{EXIT_REFUSED, EXIT_UNREACHABLE, exit};
use crate::creds::socket_path;

/// Picks the SVID with this SPIFFE ID among those the caller is entitled to.
struct ById(String);

impl SvidPicker for ById {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids
            .iter()
            .position(|s| s.spiffe_id().to_string() == self.0)
    }
}

/// A workload's TLS material, kept in step with the Workload API.
pub struct LiveTls {
    pub trust_domain: TrustDomain,
    pub spiffe_id: SpiffeId,
    pub server: ServerIdentity,
    pub client: ClientIdentity,
    pub bundles: BundleStore,
    source: X509Source,
}

/// What one Workload API update carries for us.
struct Material {
    id: SpiffeId,
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
    td: TrustDomain,
    authorities: Vec<Vec<u8>>,
}

fn material(source: &X509Source) -> Result<Material> {
    let svid = source.svid().map_err(|e| anyhow::anyhow!("no SVID: {e}"))?;
    let id =
        SpiffeId::parse(&svid.spiffe_id().to_string()).map_err(|e| anyhow::anyhow!("SVID: {e}"))?;
    let td = id.trust_domain().clone();
    let chain = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let key = svid.private_key().as_bytes().to_vec();
    let bundles = source
        .bundle_set()
        .map_err(|e| anyhow::anyhow!("no bundle: {e}"))?;
    let sp_td = spiffe::TrustDomain::new(td.as_str()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let authorities = bundles
        .get(&sp_td)
        .map(|b| {
            b.authorities()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect()
        })
        .unwrap_or_default();
    Ok(Material {
        id,
        chain,
        key,
        td,
        authorities,
    })
}

impl LiveTls {
    /// Connects to the Workload API at `socket` and keeps following it.
    /// With `want`, uses the SVID with that SPIFFE ID.
    pub async fn follow(socket: &str, want: Option<&str>) -> Result<Arc<Self>> {
        let endpoint = format!("unix:{}", socket_path(socket).display());
        let mut builder = X509Source::builder().endpoint(&endpoint);
        if let Some(id) = want {
            builder = builder.picker(ById(id.to_owned()));
        }
        let source = builder.build().await.map_err(|e| {
            exit(
                EXIT_UNREACHABLE,
                format!("cannot get an SVID from {endpoint}: {e}"),
            )
        })?;
        let Material {
            id: spiffe_id,
            chain,
            key,
            td: trust_domain,
            authorities,
        } = material(&source)?;
        let bundles = BundleStore::new();
        bundles.set(trust_domain.clone(), authorities);
        let live = Arc::new(Self {
            server: ServerIdentity::new(chain.clone(), &key).map_err(|e| anyhow::anyhow!("{e}"))?,
            client: ClientIdentity::new(chain, &key).map_err(|e| anyhow::anyhow!("{e}"))?,
            trust_domain,
            spiffe_id,
            bundles,
            source,
        });
        let follower = live.clone();
        tokio::spawn(async move {
            let mut updates = follower.source.updated();
            while updates.changed().await.is_ok() {
                if let Err(e) = follower.apply() {
                    tracing::warn!(error = %e, "cannot apply a Workload API update; keeping the previous material");
                }
            }
        });
        Ok(live)
    }

    /// Stops following the Workload API.
    pub async fn shutdown(&self) {
        self.source.shutdown().await;
    }

    fn apply(&self) -> Result<()> {
        let Material {
            id,
            chain,
            key,
            td,
            authorities,
        } = material(&self.source)?;
        if id != self.spiffe_id {
            anyhow::bail!(
                "the Workload API now names {id} instead of {}",
                self.spiffe_id
            );
        }
        // The bundle first: a new SVID may come from an authority the
        // previous bundle did not carry yet.
        self.bundles.set(td, authorities);
        self.server
            .replace(chain.clone(), &key)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        self.client
            .replace(chain, &key)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        tracing::debug!("TLS material updated from the Workload API");
        Ok(())
    }
}

/// Keeps `target` in step with the Workload API's JWT bundle of `td`
/// (FetchJWTBundles stream), reconnecting with a capped backoff.
pub fn follow_jwt_bundles(socket: &str, td: TrustDomain, target: baton_verify::JwtBundles) {
    let endpoint = format!("unix:{}", socket_path(socket).display());
    tokio::spawn(async move {
        let mut failures: u32 = 0;
        loop {
            if let Err(e) = stream_jwt_bundles(&endpoint, &td, &target).await {
                tracing::warn!(error = %e, "JWT bundle stream from the Workload API ended; reconnecting");
            }
            failures = failures.saturating_add(1);
            let wait = Duration::from_millis(200u64 << failures.min(6));
            tokio::time::sleep(wait).await;
        }
    });
}

async fn stream_jwt_bundles(
    endpoint: &str,
    td: &TrustDomain,
    target: &baton_verify::JwtBundles,
) -> Result<()> {
    use futures::StreamExt as _;
    let client = spiffe::WorkloadApiClient::connect_to(endpoint)
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut stream = client
        .stream_jwt_bundles()
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let sp_td = spiffe::TrustDomain::new(td.as_str()).map_err(|e| anyhow::anyhow!("{e}"))?;
    while let Some(set) = stream.next().await {
        let set = set.map_err(|e| anyhow::anyhow!("{e}"))?;
        let Some(bundle) = set.get(&sp_td) else {
            continue;
        };
        let mut keys = Vec::new();
        for a in bundle.jwt_authorities() {
            let mut jwk: serde_json::Value = serde_json::from_slice(a.jwk_json())?;
            if let Some(obj) = jwk.as_object_mut() {
                obj.entry("use").or_insert_with(|| "jwt-svid".into());
                obj.entry("kid").or_insert_with(|| a.key_id().into());
            }
            keys.push(jwk);
        }
        let doc = serde_json::json!({ "keys": keys });
        match baton_ca::TrustBundle::from_spiffe_json(td, &doc) {
            Ok(b) => {
                target.set(&b);
                tracing::debug!(
                    keys = b.jwt_authorities.len(),
                    "JWT bundle updated from the Workload API"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "unusable JWT bundle from the Workload API; keeping the previous one")
            }
        }
    }
    Ok(())
}

/// `baton example echo-server`.
pub async fn echo_server(
    socket: &str,
    spiffe_id: Option<&str>,
    listen: SocketAddr,
    ready_file: Option<&Path>,
) -> Result<()> {
    let live = LiveTls::follow(socket, spiffe_id).await?;
    let config = baton_tls::server_config(
        live.server.clone(),
        live.bundles.clone(),
        PeerPolicy::AnyInTrustDomains(vec![live.trust_domain.clone()]),
        ClientAuth::Required,
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| exit(EXIT_REFUSED, format!("cannot listen on {listen}: {e}")))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, spiffe_id = %live.spiffe_id, "echo server listening");
    if let Some(path) = ready_file {
        crate::daemons::write_ready_file(path, &addr.to_string())?;
    }
    let routes = warp::path!("echo")
        .and(warp::ext::optional::<PeerIdentity>())
        .map(|peer: Option<PeerIdentity>| {
            peer.and_then(|p| p.0)
                .map_or_else(|| "anonymous".to_owned(), |id| id.to_string())
        });
    baton_tls::serve_https(listener, config, routes, crate::daemons::terminate_signal())
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
}

/// What the echo client has seen so far (its stats file).
#[derive(Debug, Default, Serialize)]
struct Stats {
    ok: u64,
    failed: u64,
    last_error: Option<String>,
}

/// `baton example echo-client`.
pub async fn echo_client(
    socket: &str,
    spiffe_id: Option<&str>,
    server: &str,
    server_id: &str,
    interval: Duration,
    stats_file: Option<PathBuf>,
) -> Result<()> {
    let server_id =
        SpiffeId::parse(server_id).map_err(|e| exit(EXIT_REFUSED, format!("--server-id: {e}")))?;
    let live = LiveTls::follow(socket, spiffe_id).await?;
    let tls = baton_tls::client_config(
        live.client.clone(),
        live.bundles.clone(),
        PeerPolicy::Exact(vec![server_id]),
    )
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    // No pooled connections: every request is a new TLS handshake, which is
    // what a rotation can break.
    let http = reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .context("HTTP client")?;
    let url = format!("https://{server}/echo");
    let ok = AtomicU64::new(0);
    let failed = AtomicU64::new(0);
    let mut last_error: Option<String> = None;
    let mut last_write = Instant::now();
    let stop = crate::daemons::terminate_signal();
    tokio::pin!(stop);
    loop {
        let result = http
            .get(&url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status);
        match result {
            Ok(_) => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                failed.fetch_add(1, Ordering::Relaxed);
                let msg = format!("{e:?}");
                tracing::error!(error = %msg, "echo request failed");
                last_error = Some(msg);
            }
        }
        if let Some(path) = &stats_file
            && (last_write.elapsed() >= Duration::from_millis(100) || last_error.is_some())
        {
            write_stats(
                path,
                &Stats {
                    ok: ok.load(Ordering::Relaxed),
                    failed: failed.load(Ordering::Relaxed),
                    last_error: last_error.clone(),
                },
            )?;
            last_write = Instant::now();
        }
        tokio::select! {
            () = &mut stop => break,
            () = tokio::time::sleep(interval) => {}
        }
    }
    let stats = Stats {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        last_error,
    };
    if let Some(path) = &stats_file {
        write_stats(path, &stats)?;
    }
    tracing::info!(ok = stats.ok, failed = stats.failed, "echo client stopped");
    Ok(())
}

fn write_stats(path: &Path, stats: &Stats) -> Result<()> {
    let text = serde_json::to_string(stats)?;
    crate::daemons::write_ready_file(path, &text)
}
