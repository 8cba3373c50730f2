//! `baton`: one binary for every Baton role and the operator verbs.
//!
//! `main` only parses arguments, sets up logging and dispatches; each verb
//! lives in its own module.

// The broker's warp filter futures nest deeper than the default limit of
// 128 when a release build proves them `Unpin` (the admin socket's routes
// are also boxed per area in `baton_broker::http::admin_routes`).
#![recursion_limit = "256"]

mod admin;
mod audit;
mod ca;
mod cli;
mod config;
mod creds;
mod daemons;
mod example;
mod gateway;
mod mcp_client;
mod mesh;
mod nodes;
mod ops;
mod output;
mod redis_args;
mod tasks;
mod telemetry;
mod workload;

use std::process::ExitCode;

fn main() -> ExitCode {
    let cli = match config::parse_cli(std::env::args_os()) {
        Ok(cli) => cli,
        Err(e) => return ExitCode::from(e.report()),
    };
    // One crypto provider for the whole process, installed before any TLS
    // or JWT object exists (reqwest builds a rustls config on creation, the
    // OTLP exporter's client too).
    baton_tls::install_crypto_provider();
    let telemetry = match telemetry::init(cli.log.as_deref(), &cli.telemetry) {
        Ok(t) => t,
        Err(e) => {
            // A broker's refusal can quote what a caller wrote.
            eprintln!("error: {}", output::shown(&format!("{e:#}")));
            return ExitCode::from(cli::EXIT_REFUSED);
        }
    };
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
    let result = runtime.block_on(cli::dispatch(cli));
    let code = match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e
                .downcast_ref::<cli::Exit>()
                .map_or(cli::EXIT_FAILURE, |x| x.code);
            telemetry.print_error(&chain_once(&e));
            ExitCode::from(code)
        }
    };
    // Spans still buffered are exported before the process exits.
    telemetry.shutdown();
    code
}

/// The error and its causes, each told once: many errors already print
/// their source in their own message, which `{:#}` would repeat.
fn chain_once(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
