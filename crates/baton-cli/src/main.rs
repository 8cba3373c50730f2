//! `baton`: one binary for every Baton role and the operator verbs.
//!
//! `main` only parses arguments, sets up logging and dispatches; each verb
//! lives in its own module.

mod admin;
mod audit;
mod ca;
mod cli;
mod creds;
mod daemons;
mod example;
mod mesh;
mod nodes;
mod ops;
mod output;
mod redis_args;
mod tasks;
mod workload;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    init_logging(cli.log.as_deref());
    // One crypto provider for the whole process, installed before any TLS
    // or JWT object exists (reqwest builds a rustls config on creation).
    baton_tls::install_crypto_provider();
    baton_ca::init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(cli::EXIT_INTERNAL);
        }
    };
    match runtime.block_on(cli::dispatch(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<cli::Exit>()
                .map_or(cli::EXIT_FAILURE, |x| x.code);
            eprintln!("error: {e:#}");
            ExitCode::from(code)
        }
    }
}

fn init_logging(filter: Option<&str>) {
    let filter = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("BATON_LOG").ok())
        .unwrap_or_else(|| "info".to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .try_init();
}
