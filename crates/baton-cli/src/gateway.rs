//! `baton gateway --config FILE`: flags only; the gateway is the
//! `baton-gateway` crate.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;

use crate::cli::{EXIT_REFUSED, ShutdownArgs, SocketArgs, exit};
use crate::output;

#[derive(Debug, Args)]
pub struct GatewayArgs {
    /// The gateway's configuration file (TOML): listen, audience, broker,
    /// upstreams and routes (README: "Protecting a tool you did not write").
    #[arg(
        long,
        value_name = "FILE",
        env = "BATON_GATEWAY_CONFIG",
        hide_env_values = true
    )]
    pub config: PathBuf,
    /// Check the file and exit: 0 when it is usable, 2 naming the field
    /// that is not.
    #[arg(long)]
    pub check: bool,
    #[command(flatten)]
    pub socket: SocketArgs,
    /// Written with the bound address once the gateway serves.
    #[arg(long, value_name = "FILE")]
    pub ready_file: Option<PathBuf>,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
}

pub async fn gateway(args: GatewayArgs) -> Result<()> {
    let config =
        baton_gateway::Config::load(&args.config).map_err(|e| exit(EXIT_REFUSED, e.to_string()))?;
    if args.check {
        output::line(&format!(
            "{}: ok ({} routes, audience {})",
            args.config.display(),
            config.routes.len(),
            config.audience
        ));
        return Ok(());
    }
    let (policy, hup) = crate::example::reloadable_policy(config.policies.as_deref())?;
    let ops = crate::ops::start(&args.ops).await?;
    let endpoint = format!(
        "unix:{}",
        crate::creds::socket_path(&args.socket.socket).display()
    );
    let result = baton_gateway::run(
        baton_gateway::RunOptions {
            config,
            endpoint,
            policy,
            ops,
            ready_file: args.ready_file,
            shutdown_grace: args.shutdown.shutdown_timeout,
        },
        crate::daemons::terminate_signal(),
    )
    .await;
    hup.abort();
    result.map_err(crate::example::enforcer_exit)
}
