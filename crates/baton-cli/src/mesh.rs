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
use baton_core::SpiffeId;
use baton_gateway::live::LiveTls;
use baton_tls::{ClientAuth, PeerIdentity, PeerPolicy};
use serde::Serialize;
use warp::Filter as _;

use crate::cli::{EXIT_REFUSED, exit};
use crate::creds::trusted_socket;

/// Follows the Workload API at `socket` (a path or `unix:` URL).
pub async fn follow(socket: &str, spiffe_id: Option<&str>) -> Result<Arc<LiveTls>> {
    let endpoint = format!("unix:{}", trusted_socket(socket)?.display());
    LiveTls::follow(&endpoint, spiffe_id)
        .await
        .map_err(crate::example::enforcer_exit)
}

/// `baton example echo-server`.
pub async fn echo_server(
    socket: &str,
    spiffe_id: Option<&str>,
    listen: SocketAddr,
    ready_file: Option<&Path>,
) -> Result<()> {
    let live = follow(socket, spiffe_id).await?;
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
    let live = follow(socket, spiffe_id).await?;
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
