//! `baton gateway --config FILE`: flags only; the gateway is the
//! `baton-gateway` crate.

use std::path::PathBuf;
use std::sync::Arc;

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
    /// Follow the revocation feed in this Redis (the broker's `--redis`)
    /// instead of the broker's own feed.
    #[command(flatten)]
    pub redis: Box<crate::redis_args::RedisArgs>,
}

pub async fn gateway(args: GatewayArgs) -> Result<()> {
    let redis = args.redis.config()?;
    let mut config =
        baton_gateway::Config::load(&args.config).map_err(|e| exit(EXIT_REFUSED, e.to_string()))?;
    config.redis.clone_from(&redis);
    if args.check {
        output::line(&format!(
            "{}: ok ({} routes, audience {})",
            args.config.display(),
            config.routes.len(),
            config.audience
        ));
        return Ok(());
    }
    let policy: Arc<dyn baton_verify::CallPolicy> =
        Arc::new(crate::example::load_policies(config.policies.as_deref())?);
    // SIGHUP re-reads the file and the policies it names, and applies both
    // together or neither: routes, MCP endpoints, upstreams and policies
    // change without dropping a connection; a file or a policy set that
    // does not load, or a file that changes what needs a restart, leaves
    // the running pair in force. (Applied apart, a route that newly asks
    // for approval with a policy that no longer does, one loaded and the
    // other refused, would let calls through unapproved.)
    let (reload_tx, reload_rx) = tokio::sync::mpsc::unbounded_channel();
    let file = args.config.clone();
    let hup = crate::daemons::on_hangup(move || {
        let read = baton_gateway::Config::load(&file)
            .map_err(|e| e.to_string())
            .and_then(|mut new| {
                // The feed is a process setting: it stays as started.
                new.redis.clone_from(&redis);
                let policy = crate::example::load_policies(new.policies.as_deref())
                    .map_err(|e| format!("the policies: {e}"))?;
                Ok(baton_gateway::Reload {
                    config: new,
                    policy: Arc::new(policy),
                })
            });
        match read {
            Ok(reload) => {
                let _ = reload_tx.send(reload);
            }
            Err(e) => tracing::error!(
                "SIGHUP: cannot reload the gateway's configuration and policies (the previous ones stay in force, both): {e}"
            ),
        }
    })?;
    let ops = crate::ops::start(&args.ops).await?;
    let endpoint = format!(
        "unix:{}",
        crate::creds::trusted_socket(&args.socket.socket)?.display()
    );
    let result = baton_gateway::run(
        baton_gateway::RunOptions {
            config,
            endpoint,
            policy,
            ops,
            ready_file: args.ready_file,
            shutdown_grace: args.shutdown.shutdown_timeout,
            reload: Some(reload_rx),
        },
        crate::daemons::terminate_signal(),
    )
    .await;
    hup.abort();
    result.map_err(crate::example::enforcer_exit)
}
