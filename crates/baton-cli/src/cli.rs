//! Command-line definitions and dispatch.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::{admin, daemons, workload};

/// Exit codes scripts can rely on.
pub const EXIT_FAILURE: u8 = 1;
/// The request was refused (bad input, not found, not allowed).
pub const EXIT_REFUSED: u8 = 2;
/// The broker or agent could not be reached.
pub const EXIT_UNREACHABLE: u8 = 3;
pub const EXIT_INTERNAL: u8 = 70;

/// An error carrying the process exit code.
#[derive(Debug)]
pub struct Exit {
    pub code: u8,
    pub message: String,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Exit {}

pub fn exit(code: u8, message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(Exit {
        code,
        message: message.into(),
    })
}

/// Workload identity and task-scoped credentials for AI agents.
#[derive(Debug, Parser)]
#[command(name = "baton", version, about, propagate_version = true)]
pub struct Cli {
    /// Log filter (tracing syntax), e.g. `info` or `baton_agent=debug`. Also BATON_LOG.
    #[arg(long, global = true)]
    pub log: Option<String>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default)]
pub enum OutputFormat {
    #[default]
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct AdminArgs {
    /// The broker's admin socket.
    #[arg(
        long,
        env = "BATON_ADMIN_SOCKET",
        default_value = ".baton-dev/admin.sock"
    )]
    pub admin_socket: PathBuf,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a broker and a node daemon in one process on embedded stores (start here).
    Dev(DevArgs),
    /// Run the broker (CA, attestation, registration, signing API).
    Broker(BrokerArgs),
    /// Run the node daemon serving the SPIFFE Workload API on a Unix socket.
    Agent(AgentArgs),
    /// Join tokens for node attestation.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Registration entries: which workload gets which SPIFFE ID.
    #[command(subcommand)]
    Entry(EntryCmd),
    /// The trust bundle.
    #[command(subcommand)]
    Bundle(BundleCmd),
    /// Fetch and inspect SVIDs through a node daemon's Workload API.
    #[command(subcommand)]
    Svid(SvidCmd),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where dev state lives (CA, datastore, sockets). Created if missing.
    #[arg(long, default_value = ".baton-dev")]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "example.org")]
    pub trust_domain: String,
    /// Broker HTTPS address; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: SocketAddr,
    /// Lifetime of workload X509-SVIDs registered by dev mode.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub x509_ttl: Duration,
}

#[derive(Debug, Args)]
pub struct BrokerArgs {
    #[arg(long, env = "BATON_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// Directory for the CA keys (0600), the SQLite datastore and bundle.pem.
    #[arg(long)]
    pub data_dir: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub listen: SocketAddr,
    /// Admin API socket (mode 0600; callers' uids are checked too). Default: <data-dir>/admin.sock
    #[arg(long)]
    pub admin_socket: Option<PathBuf>,
    /// Extra uid allowed on the admin socket (repeatable). The broker's own uid and root always are.
    #[arg(long = "admin-uid")]
    pub admin_uids: Vec<u32>,
    /// Lifetime of the self-signed CA.
    #[arg(long, default_value = "7days", value_parser = humantime::parse_duration)]
    pub ca_ttl: Duration,
    /// Lifetime of agent (node) SVIDs.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub agent_svid_ttl: Duration,
    /// Upper bound on any workload SVID lifetime.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub max_svid_ttl: Duration,
    /// Write the broker's address to this file once listening (for scripts and tests).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[arg(long, env = "BATON_TRUST_DOMAIN")]
    pub trust_domain: String,
    /// The broker's HTTPS URL, e.g. https://127.0.0.1:8443
    #[arg(long)]
    pub broker_url: String,
    /// Directory for the node's SVID and key (0600) and the last bundle.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Workload API socket path.
    #[arg(long)]
    pub socket: PathBuf,
    /// PEM of the broker's CA, to trust it on first contact (the broker writes <data-dir>/bundle.pem).
    #[arg(long)]
    pub trust_bundle: Option<PathBuf>,
    /// Single-use join token (from `baton token generate`); only needed until the node has an identity.
    #[arg(long, env = "BATON_JOIN_TOKEN")]
    pub join_token: Option<String>,
    /// How often to sync entries and the bundle from the broker.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub sync_interval: Duration,
    /// Rotate SVIDs once this fraction of their lifetime has passed.
    #[arg(long, default_value_t = 0.5)]
    pub rotate_fraction: f64,
    /// File mode of the socket (octal). Access is attested per call, not by file mode.
    #[arg(long, default_value = "666")]
    pub socket_mode: String,
    /// Write the node's SPIFFE ID to this file once serving (for scripts and tests).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum TokenCmd {
    /// Generate a single-use join token for attesting a node.
    Generate {
        /// How long the token may be used.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// Pin the SPIFFE ID the node will get (so entries can name it as parent beforehand).
        #[arg(long)]
        node_id: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum EntryCmd {
    /// Register a workload.
    Create {
        /// The SPIFFE ID the workload gets.
        #[arg(long)]
        spiffe_id: String,
        /// The node (agent) SPIFFE ID allowed to serve it.
        #[arg(long)]
        parent_id: String,
        /// Selector the workload must match, e.g. unix:uid:1000 (repeatable; all must match).
        #[arg(long = "selector", required = true)]
        selectors: Vec<String>,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        x509_ttl: Duration,
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        jwt_ttl: Duration,
        /// Extra DNS SAN (repeatable).
        #[arg(long = "dns-name")]
        dns_names: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show one entry.
    Show {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List all entries.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Delete an entry; workloads matching only it lose their identity.
    Delete {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum BundleCmd {
    /// Print the trust bundle (SPIFFE JSON or PEM).
    Show {
        #[arg(long, value_enum, default_value = "pem")]
        format: BundleFormat,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum BundleFormat {
    Pem,
    Spiffe,
}

#[derive(Debug, Args)]
pub struct SocketArgs {
    /// Workload API endpoint socket (path, or unix:///path). Also SPIFFE_ENDPOINT_SOCKET.
    #[arg(
        long,
        env = "SPIFFE_ENDPOINT_SOCKET",
        default_value = ".baton-dev/agent.sock"
    )]
    pub socket: String,
}

#[derive(Debug, Subcommand)]
pub enum SvidCmd {
    /// Fetch this process's X509-SVID and print its SPIFFE ID, expiry and chain.
    Fetch {
        #[command(flatten)]
        socket: SocketArgs,
        /// Also write svid.pem, key.pem and bundle.pem into this directory.
        #[arg(long)]
        write: Option<PathBuf>,
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Fetch a JWT-SVID for an audience and print it.
    FetchJwt {
        #[command(flatten)]
        socket: SocketArgs,
        #[arg(long, required = true)]
        audience: Vec<String>,
    },
    /// Validate a JWT-SVID through the Workload API.
    ValidateJwt {
        #[command(flatten)]
        socket: SocketArgs,
        #[arg(long)]
        audience: String,
        token: String,
    },
}

pub async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dev(args) => daemons::dev(args).await,
        Command::Broker(args) => daemons::broker(args).await,
        Command::Agent(args) => daemons::agent(args).await,
        Command::Token(cmd) => admin::token(cmd).await,
        Command::Entry(cmd) => admin::entry(cmd).await,
        Command::Bundle(cmd) => admin::bundle(cmd).await,
        Command::Svid(cmd) => workload::svid(cmd).await,
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "baton", &mut std::io::stdout());
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }
}
