//! Logs and traces of every `baton` process.
//!
//! Logs go to standard error as text (ANSI colour only when standard error
//! is a terminal and `NO_COLOR` is unset) or as JSON, one object a line
//! (`timestamp` in RFC 3339, `level`, `target`, `fields`, and the `span`
//! and `spans` the event happened in). With `--otlp-endpoint` (or the
//! standard `OTEL_EXPORTER_OTLP_ENDPOINT`), Baton's spans (`baton_*` crates,
//! info and above) are also exported over OTLP/HTTP as protobuf, through
//! the process's one TLS stack (reqwest on rustls, aws-lc-rs).

use std::io::IsTerminal;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::cli::{EXIT_REFUSED, exit};

/// How log lines are written.
#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines; coloured only on a terminal.
    #[default]
    Text,
    /// One JSON object a line.
    Json,
}

#[derive(Debug, Args)]
pub struct TelemetryArgs {
    /// Log format on standard error. Also BATON_LOG_FORMAT.
    #[arg(
        long,
        global = true,
        value_enum,
        env = "BATON_LOG_FORMAT",
        hide_env_values = true,
        default_value_t
    )]
    pub log_format: LogFormat,
    /// Export traces over OTLP/HTTP (protobuf) to this collector, e.g.
    /// http://127.0.0.1:4318 (`/v1/traces` is appended). Without it, the
    /// standard OTEL_EXPORTER_OTLP_ENDPOINT / OTEL_EXPORTER_OTLP_TRACES_ENDPOINT
    /// turn the export on.
    #[arg(long, global = true, value_name = "URL")]
    pub otlp_endpoint: Option<String>,
}

/// What must be flushed before the process exits.
#[derive(Debug)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
    format: LogFormat,
}

impl Telemetry {
    /// Prints the error a command ends with: `error: ...`, or in JSON
    /// mode one log object like the others (level `ERROR`, target `baton`),
    /// so that standard error stays one JSON object a line.
    pub fn print_error(&self, message: &str) {
        match self.format {
            // A broker's refusal can quote what a caller wrote.
            LogFormat::Text => eprintln!("error: {}", crate::output::shown(message)),
            LogFormat::Json => eprintln!(
                "{}",
                serde_json::json!({
                    "timestamp": humantime::format_rfc3339_micros(std::time::SystemTime::now()).to_string(),
                    "level": "ERROR",
                    "target": "baton",
                    "fields": { "message": message },
                })
            ),
        }
    }

    /// Exports the spans still buffered (bounded by the SDK's timeout).
    pub fn shutdown(self) {
        if let Some(p) = self.provider
            && let Err(e) = p.shutdown()
        {
            tracing::warn!(error = %e, "could not flush the last trace spans");
        }
    }
}

/// Installs the process's subscriber: the log filter (`--log`, else
/// BATON_LOG, else `info`, with the MCP SDK's per-session chatter at
/// `warn`), the log format and, when configured, the OTLP
/// exporter. Call after the crypto provider is installed (the exporter's
/// HTTP client builds a rustls configuration).
pub fn init(filter: Option<&str>, args: &TelemetryArgs) -> Result<Telemetry> {
    let filter = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("BATON_LOG").ok())
        .unwrap_or_else(|| "info,rmcp=warn".to_owned());
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match args.log_format {
        LogFormat::Text => Box::new(
            tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .with_ansi(colour()),
        ),
        LogFormat::Json => Box::new(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .with_current_span(true)
                .with_span_list(true),
        ),
    };
    let provider = tracer_provider(args)?;
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("baton"))
            .with_filter(Targets::new().with_target("baton", LevelFilter::INFO))
    });
    let _ = tracing_subscriber::registry()
        .with(fmt.with_filter(EnvFilter::new(filter)))
        .with(otel)
        .try_init();
    Ok(Telemetry {
        provider,
        format: args.log_format,
    })
}

/// Colour only for a person at a terminal.
fn colour() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

const ENDPOINT_VARS: [&str; 2] = [
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    "OTEL_EXPORTER_OTLP_ENDPOINT",
];

fn tracer_provider(args: &TelemetryArgs) -> Result<Option<SdkTracerProvider>> {
    let endpoint = args.otlp_endpoint.as_deref().map(traces_url).transpose()?;
    let from_env = ENDPOINT_VARS
        .iter()
        .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    if endpoint.is_none() && !from_env {
        return Ok(None);
    }
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpBinary);
    if let Some(url) = endpoint {
        builder = builder.with_endpoint(url);
    }
    let exporter = builder
        .build()
        .map_err(|e| exit(EXIT_REFUSED, format!("--otlp-endpoint: {e}")))?;
    let service = std::env::var("OTEL_SERVICE_NAME")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "baton".to_owned());
    Ok(Some(
        SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_resource(Resource::builder().with_service_name(service).build())
            .build(),
    ))
}

/// The traces URL of a collector's base URL (as OTEL_EXPORTER_OTLP_ENDPOINT
/// is read); a URL already ending in `/v1/traces` is taken as it is.
fn traces_url(base: &str) -> Result<String> {
    let refused = |why: &str| exit(EXIT_REFUSED, format!("--otlp-endpoint {base:?}: {why}"));
    let rest = base
        .strip_prefix("http://")
        .or_else(|| base.strip_prefix("https://"))
        .ok_or_else(|| refused("must be an http:// or https:// URL"))?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(refused("names no host"));
    }
    let base = base.trim_end_matches('/');
    let url = if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    };
    url.parse::<http::Uri>()
        .with_context(|| format!("--otlp-endpoint {base:?} is not a valid URL"))
        .map_err(|e| exit(EXIT_REFUSED, format!("{e:#}")))?;
    Ok(url)
}

/// The `traceparent` this command sends with its requests: the W3C trace
/// context of the caller, from the TRACEPARENT environment variable (as an
/// agent framework passes it to a tool it runs). A malformed value is
/// ignored (and logged at debug).
pub fn outgoing_traceparent() -> Option<String> {
    let raw = std::env::var("TRACEPARENT").ok()?;
    match raw.parse::<baton_core::TraceParent>() {
        Ok(tp) => Some(tp.to_string()),
        Err(e) => {
            tracing::debug!(error = %e, "ignoring TRACEPARENT");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_traces_url_is_derived_from_a_base_url() {
        assert_eq!(
            traces_url("http://127.0.0.1:4318").unwrap(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            traces_url("https://otel.example.com/").unwrap(),
            "https://otel.example.com/v1/traces"
        );
        assert_eq!(
            traces_url("http://c:4318/v1/traces").unwrap(),
            "http://c:4318/v1/traces"
        );
        for bad in ["127.0.0.1:4318", "ftp://x", "http://", "http:///v1"] {
            let e = traces_url(bad).unwrap_err().to_string();
            assert!(e.contains("--otlp-endpoint"), "{bad}: {e}");
        }
    }
}
