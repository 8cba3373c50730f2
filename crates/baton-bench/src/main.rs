//! `baton-bench`: the benchmarks behind BENCHMARKS.md.
//!
//! Every figure is printed next to a limit or a peer measured in the same
//! run (see PERFORMANCE.md): broker issuance against the raw P-256 sign
//! rate and the CSR-verify+sign rate of `baton_ca::Ca`, and against cfssl
//! (driven by `bench/issuance.sh`); Workload API latency against its target;
//! the delegation path against its targets and the raw ES256/P-256 rates;
//! the hop with the state on disk and hops/s with 1 to 3 brokers on one
//! PostgreSQL;
//! revocation on a private redis-server against its targets and a same-run
//! PING; a CA rotation (taint to re-issued at 1,000 workloads) against the
//! daemon's sync interval, with mTLS handshakes counted throughout; the
//! gateway against nginx with `ssl_verify_client` in front of the same
//! upstream (handshakes/s, kept-alive requests/s, latency added per call).
//! Results go to stdout as readable lines, then one JSON line.

// A benchmark's output is its product: printing to stdout is the point.
#![allow(clippy::print_stdout)]
// The broker's warp filter futures nest deeper than the default limit of
// 128 when a release build proves them `Unpin`.
#![recursion_limit = "256"]

mod audit;
mod cfssl;
mod cluster;
mod delegation;
mod gateway;
mod hops;
mod issuance;
mod limits;
mod revocation;
mod revocation_durable;
mod rotation;
mod stats;
mod workload;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "baton-bench", about = "Baton benchmarks (run in release mode)")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// X509-SVID issuance at an in-process broker over its mTLS API, with
    /// this machine's signing limits measured in the same run.
    Issuance(issuance::Args),
    /// Drives cfssl's `/api/v1/cfssl/sign` with pre-generated P-256 CSRs.
    Cfssl(cfssl::Args),
    /// Workload API FetchX509SVID latency and concurrent streams on an
    /// in-process node daemon.
    Workload(workload::Args),
    /// The delegation path: one hop (delegate + redeem) on loopback, token
    /// verification at a tool server, Cedar per call, audit appends and
    /// verification, each next to a same-run limit or its target.
    Delegation(delegation::Args),
    /// The hop with the broker's state on disk (SQLite files, PostgreSQL)
    /// against its p99 target, and hops/s under concurrent holders with 1,
    /// 2 and 3 brokers on one PostgreSQL database.
    Hops(hops::Args),
    /// Revocation on a private redis-server: propagation to followers
    /// (in-process and separate processes) against a same-run PING, cascade
    /// of a 10,000-credential task tree, memory and commands per credential.
    Revocation(revocation::Args),
    /// Revocation through an in-process broker configured like `baton
    /// broker --redis` (datastore as source of truth, outbox relay to a
    /// private redis-server): Redis memory per live and revoked credential,
    /// revoke -> refused at follower processes, cascade of a task, rebuild
    /// after FLUSHALL.
    RevocationDurable(revocation_durable::Args),
    /// An X.509 CA rotation on an in-process broker and node daemon with N
    /// workloads: time from `ca taint` to the last re-issued SVID at the
    /// workloads, and failed mTLS handshakes under load throughout.
    Rotation(rotation::Args),
    /// `baton gateway` (in-process, with its Workload API SVID, broker
    /// feed and fsynced call reports) in front of a trivial upstream, next
    /// to nginx with `ssl_verify_client on` in front of the same upstream:
    /// full mTLS handshakes/s, kept-alive requests/s (and the upstream
    /// direct), latency added per call with a seen token, with and without
    /// Cedar.
    Gateway(gateway::Args),
    /// The audit log under 1 to 256 concurrent appenders (durable receipts,
    /// one signed checkpoint per group-committed batch), then verify of a
    /// 1M-event log with every checkpoint signature, next to the same-run
    /// P-256 limits.
    Audit(audit::Args),
    /// Internal: one workload process for `rotation`.
    #[command(hide = true)]
    RotationWorkload(rotation::WorkloadArgs),
    /// Internal: one feed follower for `revocation`, driven over stdin/stdout.
    #[command(hide = true)]
    RevocationFollower(revocation::FollowerArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    baton_tls::install_crypto_provider();
    baton_ca::init();
    let rt = if matches!(cli.cmd, Cmd::RotationWorkload(_)) {
        // One of a thousand workload processes: one thread each.
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?
    };
    rt.block_on(async {
        match cli.cmd {
            Cmd::Issuance(a) => issuance::run(a).await,
            Cmd::Cfssl(a) => cfssl::run(a).await,
            Cmd::Workload(a) => workload::run(a).await,
            Cmd::Delegation(a) => delegation::run(a).await,
            Cmd::Hops(a) => hops::run(a).await,
            Cmd::Revocation(a) => revocation::run(a).await,
            Cmd::RevocationDurable(a) => revocation_durable::run(a).await,
            Cmd::Rotation(a) => rotation::run(a).await,
            Cmd::Gateway(a) => gateway::run(a).await,
            Cmd::Audit(a) => audit::run(a).await,
            Cmd::RotationWorkload(a) => rotation::workload_process(a).await,
            Cmd::RevocationFollower(a) => revocation::follower(a).await,
        }
    })
}
