//! `--ops-listen` for the daemons, and `baton healthcheck`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Result;
use clap::Args;

use crate::cli::{EXIT_FAILURE, exit};
use crate::output;

/// The ops listener of a long-running role.
#[derive(Debug, Args, Clone)]
pub struct OpsArgs {
    /// Serve /metrics (Prometheus), /livez and /readyz over plain HTTP on
    /// this address, e.g. 127.0.0.1:9090. Off by default. Unauthenticated:
    /// a loopback address unless --ops-listen-non-loopback is given.
    #[arg(long, value_name = "ADDR")]
    pub ops_listen: Option<SocketAddr>,
    /// Allow --ops-listen on an address other than loopback (a scrape-only
    /// network): anyone who reaches it reads the metrics and readiness.
    #[arg(long, requires = "ops_listen")]
    pub ops_listen_non_loopback: bool,
}

/// Binds the ops listener if asked for, and serves it for the life of the
/// process. The daemon adds its roles and checks to the returned handle
/// and marks it started once it serves.
pub async fn start(args: &OpsArgs) -> Result<Option<baton_ops::Ops>> {
    let Some(addr) = args.ops_listen else {
        return Ok(None);
    };
    if !addr.ip().is_loopback() && !args.ops_listen_non_loopback {
        return Err(exit(
            crate::cli::EXIT_REFUSED,
            format!(
                "--ops-listen {addr}: the ops listener is unauthenticated; it binds a loopback address unless --ops-listen-non-loopback is also given"
            ),
        ));
    }
    let listener = baton_ops::bind(addr)
        .await
        .map_err(|e| exit(crate::cli::EXIT_REFUSED, format!("--ops-listen: {e}")))?;
    let ops = baton_ops::Ops::new();
    let served = ops.clone();
    tracing::info!(%addr, "ops listener serving /metrics, /livez and /readyz");
    tokio::spawn(async move {
        if let Err(e) = baton_ops::serve(listener, served, std::future::pending()).await {
            tracing::error!(error = %e, "the ops listener stopped");
        }
    });
    Ok(Some(ops))
}

#[derive(Debug, Args)]
pub struct HealthcheckArgs {
    /// The ops listener (`--ops-listen` of the daemon), as HOST:PORT.
    #[arg(long, value_name = "HOST:PORT")]
    pub ops_addr: String,
    /// Ask whether the process can do its job now (`/readyz`); the default.
    #[arg(long, conflicts_with = "live")]
    pub ready: bool,
    /// Ask only whether the process runs (`/livez`).
    #[arg(long)]
    pub live: bool,
    /// How long to wait for the answer.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// `baton healthcheck`: exit 0 when healthy, 1 otherwise (naming the
/// failing checks), for scripts and container probes.
pub async fn healthcheck(args: HealthcheckArgs) -> Result<()> {
    let (path, word) = if args.live {
        ("/livez", "live")
    } else {
        ("/readyz", "ready")
    };
    let (status, body) = baton_ops::probe(&args.ops_addr, path, args.timeout)
        .await
        .map_err(|e| exit(EXIT_FAILURE, e.to_string()))?;
    if status == 200 {
        output::line(word);
        return Ok(());
    }
    let failing = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| {
            v["checks"].as_array().map(|checks| {
                checks
                    .iter()
                    .filter(|c| c["ok"] == false)
                    .map(|c| {
                        format!(
                            "{} ({})",
                            c["name"].as_str().unwrap_or("?"),
                            c["error"].as_str().unwrap_or("failed")
                        )
                    })
                    .collect::<Vec<_>>()
            })
        })
        .filter(|f| !f.is_empty())
        .map_or_else(|| format!("HTTP {status}"), |f| f.join("; "));
    Err(exit(EXIT_FAILURE, format!("not {word}: {failing}")))
}
