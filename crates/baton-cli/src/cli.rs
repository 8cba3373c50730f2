//! Command-line definitions and dispatch.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::{admin, audit, ca, config, creds, daemons, example, nodes, tasks, workload};

/// Exit codes scripts can rely on.
pub const EXIT_FAILURE: u8 = 1;
/// The request was refused (bad input, not found, not allowed).
pub const EXIT_REFUSED: u8 = 2;
/// The broker or agent could not be reached, or the broker answered 503
/// (nothing was done; the command may be run again).
pub const EXIT_UNREACHABLE: u8 = 3;
/// A verification failed (e.g. the audit log is tampered).
pub const EXIT_VERIFY_FAILED: u8 = 4;
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

/// The exit codes, for `--help` (README.md lists them too).
pub const EXIT_CODES_HELP: &str = "Exit codes:
  0   success (also when the reader of the output went away: `| head`)
  1   failure (including a TLS trust error, e.g. a stale bundle)
  2   refused: bad input or usage, not found, not allowed (e.g. permission denied on the admin socket)
  3   the broker, the node daemon or the admin socket cannot be reached, or the broker
      answered 503 (a store it needs is down: nothing was done; run it again)
  4   a verification failed (`audit verify`, `audit verify-receipt`: the log is tampered or cut)
  70  internal error";

/// Workload identity and task-scoped credentials for AI agents.
#[derive(Debug, Parser)]
#[command(
    name = "baton",
    version,
    about,
    propagate_version = true,
    after_help = EXIT_CODES_HELP
)]
pub struct Cli {
    /// Log filter (tracing syntax), e.g. `info` or `baton_agent=debug`. Also BATON_LOG.
    #[arg(long, global = true)]
    pub log: Option<String>,
    #[command(flatten)]
    pub telemetry: crate::telemetry::TelemetryArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
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
        hide_env_values = true,
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
    Broker(Box<BrokerArgs>),
    /// Run the revocation service beside a shared Redis: heartbeats on the
    /// feed (so verifiers can tell silence from calm) and store health.
    Revocation(RevocationArgs),
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
    /// The CA's signing authorities: show, prepare, activate, taint, revoke.
    #[command(subcommand)]
    Ca(ca::CaCmd),
    /// Fetch and inspect SVIDs through a node daemon's Workload API.
    #[command(subcommand)]
    Svid(SvidCmd),
    /// Tasks: start one for a user, inspect, end, change its purpose.
    #[command(subcommand)]
    Task(TaskCmd),
    /// The tamper-evident audit log: verify it (against witnessed tree heads), witness it, check receipts, trace a task.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Redeem a handoff grant into a task credential through the node daemon.
    #[command(subcommand)]
    Grant(GrantCmd),
    /// Hand part of a task to another agent (a hop), with your task credential.
    Delegate(DelegateArgs),
    /// Revoke credentials: one, a subtree, a task, an agent (kill switch) or a node.
    #[command(subcommand)]
    Revoke(RevokeCmd),
    /// Approve a call a gateway holds for a human (the id is in the agent's
    /// error and in `baton audit trace`); the task's initiator or a member
    /// of an approver group, by their ID token.
    Approve(ApprovalArgs),
    /// Deny a call a gateway holds for a human.
    Deny(ApprovalArgs),
    /// What a held call is, before deciding on it.
    #[command(subcommand)]
    Approval(ApprovalCmd),
    /// Attested nodes: list, show, evict (must re-attest), ban (never again).
    #[command(subcommand)]
    Node(NodeCmd),
    /// Just-in-time secrets for your task (a database login, an API key) that die with it.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// The example of the README: a tool server, a tool client and a queue worker.
    #[command(subcommand)]
    Example(ExampleCmd),
    /// Put Baton's checks in front of a tool you did not write: an mTLS
    /// reverse proxy that verifies each call's delegation token, maps its
    /// route to a tool, asks the gate (revocation, scope, risk, Cedar),
    /// forwards it with the verified caller and reports it.
    Gateway(crate::gateway::GatewayArgs),
    /// Configuration files of the daemon verbs (`--config FILE`).
    #[command(subcommand)]
    Config(ConfigCmd),
    /// Probe a daemon's ops listener (`--ops-listen`): exit 0 when healthy,
    /// 1 otherwise, naming the failing checks.
    Healthcheck(crate::ops::HealthcheckArgs),
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Check a configuration file without starting anything: unknown keys,
    /// values of the wrong type, conflicting or missing settings (exit 2,
    /// with FILE:LINE:COLUMN). BATON_* variables set here count, as at start.
    Check {
        file: PathBuf,
        /// The verb the file is for. Default: from the file name
        /// (`broker.toml`, `baton-agent.toml`).
        #[arg(long = "for", value_enum)]
        verb: Option<config::Verb>,
    },
}

/// An SVID lifetime: a duration of whole seconds, at least one (an SVID
/// valid for 0 s would be expired when issued).
/// A duration of at least one second.
pub fn positive_duration(raw: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(raw).map_err(|e| e.to_string())?;
    if d.as_secs() == 0 {
        return Err("must be at least 1s".into());
    }
    Ok(d)
}

pub fn svid_ttl(raw: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(raw).map_err(|e| e.to_string())?;
    if d.as_secs() == 0 {
        return Err(format!(
            "an SVID lifetime must be at least 1s (got {raw}): an SVID valid for less would be expired when issued"
        ));
    }
    if d.subsec_nanos() != 0 {
        return Err(format!(
            "an SVID lifetime is whole seconds (got {raw}), e.g. 90s or 5m"
        ));
    }
    Ok(d)
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
    /// Lifetime of the X509-SVIDs of the dev workload entry (default 1h; at
    /// least 1s). Only when the entry is created: with an existing data
    /// dir, a different value is reported as ignored.
    #[arg(long, value_parser = svid_ttl)]
    pub x509_ttl: Option<Duration>,
    /// Who may start a task and lease a secret: a directory with a Cedar
    /// schema.cedarschema and *.cedar policies. Default: the example set
    /// of deploy/policies/admission (built in).
    #[arg(long, value_name = "DIR")]
    pub admission_policy: Option<PathBuf>,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
}

/// How a long-running process stops (SIGTERM or SIGINT).
#[derive(Debug, Args)]
pub struct ShutdownArgs {
    /// On SIGTERM/SIGINT: stop accepting, then give requests and calls in
    /// flight this long to finish before dropping them; exit 0.
    #[arg(long, default_value = "30s", value_parser = parse_positive_duration)]
    pub shutdown_timeout: Duration,
}

/// A duration that must be more than zero (humantime syntax, e.g. 30s).
pub fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d.is_zero() {
        return Err("must be more than zero".into());
    }
    Ok(d)
}

/// How the CA rotates, and the PKI it may run under.
#[derive(Debug, Args)]
pub struct RotationArgs {
    /// `auto`: prepare and activate the next authority on schedule;
    /// `manual`: only on `baton ca prepare|activate` (expired old
    /// authorities still leave the bundle).
    #[arg(long, value_enum, default_value_t = RotationMode::Auto)]
    pub rotation: RotationMode,
    /// Fraction of the active authority's life at which the next one is prepared.
    #[arg(long, default_value_t = 0.5)]
    pub prepare_at: f64,
    /// Fraction of the active authority's life at which the prepared one is
    /// activated (once every agent has synced the bundle that carries it).
    #[arg(long, default_value_t = 5.0 / 6.0)]
    pub activate_at: f64,
    /// How often the schedule is checked.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub rotation_check: Duration,
    /// Run as an intermediate under an existing PKI: PEM file with the
    /// upstream signing CA certificate first and the chain up to its root.
    /// The bundle then carries that root. With --upstream-ca-key.
    #[arg(long, requires = "upstream_ca_key")]
    pub upstream_ca_cert: Option<PathBuf>,
    /// PKCS#8 PEM key of the upstream signing CA (mode 0600).
    #[arg(long, requires = "upstream_ca_cert")]
    pub upstream_ca_key: Option<PathBuf>,
}

/// What the broker's HTTPS port grants one client.
#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Connections open at once on the HTTPS port; past it new ones wait.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Time a client gets to finish the TLS handshake.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,
    /// Time a client gets to send a request's header (HTTP/1.1; also how
    /// long a keep-alive connection waits for its next request).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub header_read_timeout: Duration,
    /// Time from a request's header to its answer, body included (408 past
    /// it). Keep it above 25s: the revocation feed's long-poll waits that long.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub request_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub idle_timeout: Duration,
    /// A rate limit per caller, as NAME=COUNT/PERIOD (repeatable): COUNT at
    /// once, refilled at COUNT per PERIOD. NAME is attest (per IP),
    /// task-start, tool-call-reports, jwt-svid, x509-svid (a node's
    /// X509-SVIDs and agent-SVID renewals, counted in certificates; COUNT at
    /// least 1000, the largest batch), secret-lease, delegate, node-mint (a
    /// node's redeems and task renewals), approvals, feed (the revocation
    /// feed's pages) or introspect (API-key introspection) (per SPIFFE ID,
    /// else IP). Defaults: attest=30/1m, task-start=60/1m,
    /// tool-call-reports=600/1m, jwt-svid=600/1m, x509-svid=10000/1m,
    /// secret-lease=120/1m, delegate=3000/1m, node-mint=6000/1m,
    /// approvals=6000/1m, feed=6000/1m, introspect=30000/1m.
    #[arg(long = "rate-limit", value_name = "NAME=COUNT/PERIOD")]
    pub rate_limits: Vec<String>,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

impl LimitArgs {
    /// Applies these limits to a broker configuration.
    pub fn apply(&self, cfg: &mut baton_broker::BrokerConfig) -> Result<()> {
        cfg.serve_limits = baton_tls::ServeLimits {
            max_connections: self.max_connections,
            handshake_timeout: self.handshake_timeout,
            header_read_timeout: self.header_read_timeout,
            request_timeout: Some(self.request_timeout),
            idle_timeout: self.idle_timeout,
            shutdown_grace: self.shutdown.shutdown_timeout,
        };
        cfg.serve_limits.validate().map_err(|e| match e {
            baton_tls::TlsError::InvalidLimit { field, reason } => exit(
                EXIT_REFUSED,
                format!("--{}: {reason}", field.replace('_', "-")),
            ),
            other => exit(EXIT_REFUSED, other.to_string()),
        })?;
        for raw in &self.rate_limits {
            cfg.rate_limits
                .apply(raw)
                .map_err(|e| exit(EXIT_REFUSED, format!("--rate-limit: {e}")))?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum RotationMode {
    Auto,
    Manual,
}

impl RotationArgs {
    /// Applies these settings to a broker configuration.
    pub fn apply(&self, cfg: &mut baton_broker::BrokerConfig) -> Result<()> {
        cfg.rotation = match self.rotation {
            RotationMode::Manual => None,
            RotationMode::Auto => {
                let s = baton_ca::RotationSchedule {
                    prepare_at: self.prepare_at,
                    activate_at: self.activate_at,
                };
                s.validate()
                    .map_err(|e| exit(EXIT_REFUSED, format!("--prepare-at/--activate-at: {e}")))?;
                Some(s)
            }
        };
        if self.rotation_check.is_zero() {
            return Err(exit(EXIT_REFUSED, "--rotation-check must be positive"));
        }
        cfg.rotation_check_every = self.rotation_check;
        cfg.upstream = self
            .upstream_ca_cert
            .clone()
            .zip(self.upstream_ca_key.clone());
        Ok(())
    }
}

#[derive(Debug, Args)]
pub struct BrokerArgs {
    #[arg(long, env = "BATON_TRUST_DOMAIN", hide_env_values = true)]
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
    /// Lifetime of a hop's credential when the delegator asks for none
    /// (`baton delegate --ttl`); never past its parent's or the task's.
    #[arg(long, default_value = "15m", value_parser = positive_duration)]
    pub hop_token_ttl: Duration,
    #[command(flatten)]
    pub rotation: RotationArgs,
    #[command(flatten)]
    pub limits: LimitArgs,
    /// Write the broker's address to this file once listening (for scripts and tests).
    #[arg(long)]
    pub ready_file: Option<PathBuf>,
    /// Directory of Cedar policies (schema.cedarschema + *.cedar). Default: the example set.
    #[arg(long)]
    pub policies: Option<PathBuf>,
    /// Who may start a task and lease a secret: a directory with a Cedar
    /// schema.cedarschema and *.cedar policies (example:
    /// deploy/policies/admission). Required with --oidc-issuer; with only
    /// --dev-issuer the built-in example set is used.
    #[arg(long, value_name = "DIR")]
    pub admission_policy: Option<PathBuf>,
    /// Purpose catalogue, one per line. Default: deploy/purposes.txt as shipped.
    #[arg(long)]
    pub purposes_file: Option<PathBuf>,
    /// A tool server of an audience, as AUDIENCE=SPIFFE_ID (repeatable): only
    /// it may report calls made with tokens for that audience. An audience
    /// that is itself a SPIFFE ID needs no entry.
    #[arg(long = "tool-server", value_name = "AUDIENCE=SPIFFE_ID")]
    pub tool_servers: Vec<String>,
    /// Members of this ID-token group may approve or deny any call a
    /// gateway holds for a human (repeatable); a task's initiator always
    /// may for their own task. The group is believed only as asserted by
    /// --oidc-issuer (by the dev issuer when there is no --oidc-issuer).
    #[arg(long = "approver-group", value_name = "GROUP")]
    pub approver_groups: Vec<String>,
    /// Trusted OIDC issuer for initiating identities (with --oidc-jwks and --oidc-audience).
    #[arg(long, requires_all = ["oidc_jwks", "oidc_audience"])]
    pub oidc_issuer: Option<String>,
    /// JWKS file of --oidc-issuer.
    #[arg(long)]
    pub oidc_jwks: Option<PathBuf>,
    /// Audience ID tokens must carry.
    #[arg(long)]
    pub oidc_audience: Option<String>,
    /// Also run the local dev OIDC issuer (tokens via `baton task start --user`). Never in production.
    #[arg(long)]
    pub dev_issuer: bool,
    /// Start even though the audit log does not extend its head file (its
    /// newest events were deleted, it was rewritten, or the head file is
    /// gone). Only for a loss you have looked into, e.g. audit.db restored
    /// from a backup: the old head file is kept beside it, and the loss is
    /// logged as an error.
    #[arg(long)]
    pub dangerously_accept_audit_log_loss: bool,
    /// Keep the broker's state (entries, nodes, tasks, grants, the credential
    /// registry, revocations) in PostgreSQL instead of SQLite in the data dir:
    /// postgres://user@host:port/db or libpq key/value form. Brokers sharing one
    /// database share that state; the schema is created and migrated at start.
    /// Prefer BATON_DATASTORE_URL or --datastore-password-file to keep a password
    /// out of the process list.
    #[arg(
        long,
        env = "BATON_DATASTORE_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    pub datastore: Option<String>,
    /// File holding the PostgreSQL password of --datastore (one line);
    /// overrides a password in the URL.
    #[arg(long, value_name = "FILE", requires = "datastore")]
    pub datastore_password_file: Option<std::path::PathBuf>,
    /// Connections to --datastore kept open.
    #[arg(long, value_name = "N", default_value_t = 8, requires = "datastore",
          value_parser = clap::value_parser!(u16).range(1..=256))]
    pub datastore_pool: u16,
    /// CA certificates (PEM) that the PostgreSQL server's certificate must chain
    /// to, instead of the system's roots. Makes TLS required: the server's
    /// certificate and host name are checked (as libpq's verify-full) and a
    /// server without TLS is refused. sslmode=require in --datastore does too.
    #[arg(long, value_name = "FILE", requires = "datastore")]
    pub datastore_ca: Option<std::path::PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS with PostgreSQL (with
    /// --datastore-client-key).
    #[arg(long, value_name = "FILE", requires_all = ["datastore", "datastore_client_key"])]
    pub datastore_client_cert: Option<std::path::PathBuf>,
    /// Private key (PEM) of --datastore-client-cert.
    #[arg(long, value_name = "FILE", requires = "datastore_client_cert")]
    pub datastore_client_key: Option<std::path::PathBuf>,
    /// Keep the CA (its journal, X.509 authorities and JWT keys) in the
    /// --datastore database instead of the data dir, sealed (AES-256-GCM) with
    /// the key in FILE: 64 hex digits, e.g. `openssl rand -hex 32`, mode 0600.
    /// Every broker of the trust domain gets the same file and so serves one
    /// bundle; rotation steps run once, under a lock in the database, and the
    /// schedule on one broker at a time (a lease). A CA already in the data dir
    /// is moved into an empty database at the first start.
    #[arg(long, value_name = "FILE", requires = "datastore")]
    pub ca_encryption_key_file: Option<std::path::PathBuf>,
    // Revocation store in Redis, shared with other brokers and followed by
    // verifiers. Default: in memory.
    #[command(flatten)]
    pub redis: crate::redis_args::RedisArgs,
    /// PostgreSQL secret engine: admin connection string (libpq key/value or URL;
    /// the role needs CREATEROLE and pg_signal_backend). With --pg-database.
    #[arg(
        long,
        env = "BATON_PG_ADMIN_URL",
        requires = "pg_database",
        hide_env_values = true
    )]
    pub pg_admin_url: Option<String>,
    /// The admin role's password, in FILE (its first line; mode 0600), so it
    /// stays out of the process list and the configuration file. It replaces
    /// a password the connection string holds.
    #[arg(long, value_name = "FILE", requires = "pg_admin_url")]
    pub pg_admin_password_file: Option<std::path::PathBuf>,
    /// The database leased logins are for (engine name: postgres.<db>).
    #[arg(long, requires = "pg_admin_url")]
    pub pg_database: Option<String>,
    /// SQL run for each lease, with a {role} placeholder (repeatable), e.g.
    /// "GRANT SELECT ON public.customers TO {role}".
    #[arg(long = "pg-grant", requires = "pg_admin_url")]
    pub pg_grants: Vec<String>,
    /// Permission a task scope must hold for a login. Default: dataset:<db>:read.
    #[arg(long, requires = "pg_admin_url")]
    pub pg_permission: Option<String>,
    /// Host (or socket directory) agents connect to. Default: the admin connection's.
    #[arg(long, requires = "pg_admin_url")]
    pub pg_host: Option<String>,
    /// Port agents connect to (with --pg-host). Default: the admin connection's.
    #[arg(long, requires_all = ["pg_admin_url", "pg_host"])]
    pub pg_port: Option<u16>,
    /// Permission a task scope must hold for an API key (the API-key engine is always on).
    #[arg(long, default_value = "secret:apikey:issue")]
    pub apikey_permission: String,
    /// How often leases past their expiry are reaped in every secret engine.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub secret_sweep_interval: Duration,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
}

#[derive(Debug, Subcommand)]
pub enum SecretCmd {
    /// Lease a secret for your task from a broker engine (`postgres.<db>`, `apikey`).
    Lease {
        /// Your task credential directory (from `baton grant redeem`).
        #[arg(long)]
        credential: PathBuf,
        /// The broker's HTTPS URL; several brokers of one service separated
        /// by commas (the next is asked only when one cannot be reached).
        #[arg(long, env = "BATON_BROKER_URL", hide_env_values = true)]
        broker_url: String,
        /// The engine's name, e.g. postgres.crm or apikey.
        #[arg(long)]
        engine: String,
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Ask the broker whether an API key is live (as a tool server would).
    Introspect {
        /// A credential directory whose SVID is of the trust domain.
        #[arg(long)]
        credential: PathBuf,
        /// The broker's HTTPS URL; several brokers of one service separated
        /// by commas (the next is asked only when one cannot be reached).
        #[arg(long, env = "BATON_BROKER_URL", hide_env_values = true)]
        broker_url: String,
        /// The presented key (bk_...), or `-` to read it from standard input.
        #[arg(
            long,
            env = "BATON_API_KEY",
            hide_env_values = true,
            required_unless_present = "key_file",
            conflicts_with = "key_file"
        )]
        key: Option<String>,
        /// File holding the key (`-`: standard input).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: OutputFormat,
    },
}

#[derive(Debug, Args)]
pub struct RevocationArgs {
    // The Redis that brokers write revocations to and verifiers follow.
    #[command(flatten)]
    pub redis: crate::redis_args::RedisArgs,
    /// How often to publish a heartbeat on the feed.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub heartbeat: Duration,
    /// How often to check that Redis still holds its data.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub check_every: Duration,
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    #[arg(long, env = "BATON_TRUST_DOMAIN", hide_env_values = true)]
    pub trust_domain: String,
    /// The broker's HTTPS URL, e.g. https://127.0.0.1:8443; for several brokers
    /// of the trust domain, repeat the flag or separate the URLs with commas.
    ///
    /// With several, calls go to the broker in use (at first the first URL)
    /// and move on to the next URL when it cannot be reached: always on a
    /// connection failure; on a timeout or a connection lost before the
    /// answer only for calls that may be repeated (sync, signing, renewal;
    /// not attestation or a grant's redemption). An HTTP answer, whatever
    /// its status, is never retried on another broker.
    #[arg(
        long = "broker-url",
        value_name = "URL",
        value_delimiter = ',',
        required = true
    )]
    pub broker_urls: Vec<String>,
    /// Directory for the node's SVID and key (0600) and the last bundle.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// Workload API socket path.
    #[arg(long)]
    pub socket: PathBuf,
    /// PEM of the broker's CA, to trust it on first contact (the broker writes <data-dir>/bundle.pem). Once the daemon has stored a bundle it trusts only that one (this flag is then ignored with a warning: a CA rotated out stays out); remove the stored bundle file to bootstrap again.
    #[arg(long)]
    pub trust_bundle: Option<PathBuf>,
    /// Single-use join token (from `baton token generate`); only needed until the node has an identity.
    /// `-` reads it from standard input. Prefer --join-token-file, standard input or the
    /// variable: an argument is visible to every user of the machine.
    #[arg(
        long,
        env = "BATON_JOIN_TOKEN",
        hide_env_values = true,
        conflicts_with = "join_token_file"
    )]
    pub join_token: Option<String>,
    /// File holding the join token (`-`: standard input).
    #[arg(long, value_name = "FILE")]
    pub join_token_file: Option<PathBuf>,
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
    #[command(flatten)]
    pub shutdown: ShutdownArgs,
    #[command(flatten)]
    pub ops: crate::ops::OpsArgs,
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
        #[arg(long, default_value = "1h", value_parser = svid_ttl)]
        x509_ttl: Duration,
        #[arg(long, default_value = "5m", value_parser = svid_ttl)]
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
    /// Print the trust bundle (PEM or SPIFFE JSON); with `-o json`, an
    /// object holding both (`pem`, `spiffe`).
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
        hide_env_values = true,
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
        /// Pick the SVID with this SPIFFE ID (default: the first one).
        #[arg(long)]
        spiffe_id: Option<String>,
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
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Validate a JWT-SVID through the Workload API.
    ValidateJwt {
        #[command(flatten)]
        socket: SocketArgs,
        #[arg(long)]
        audience: String,
        /// The JWT-SVID, or `-` to read it from standard input.
        token: String,
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: OutputFormat,
    },
}

#[derive(Debug, Args)]
pub struct ApprovalArgs {
    /// The approval's id (`ap_...`).
    pub id: String,
    /// The deciding user's OIDC ID token; `-` reads it from standard input.
    #[arg(
        long,
        env = "BATON_ID_TOKEN",
        hide_env_values = true,
        conflicts_with_all = ["user", "id_token_file"]
    )]
    pub id_token: Option<String>,
    /// File holding the ID token (`-`: standard input).
    #[arg(long, value_name = "FILE", conflicts_with = "user")]
    pub id_token_file: Option<PathBuf>,
    /// With `baton dev`'s local issuer: mint an ID token for this user.
    #[arg(long)]
    pub user: Option<String>,
    /// With --user: a group the minted token's `groups` claim lists
    /// (repeatable).
    #[arg(long = "group", value_name = "GROUP", requires = "user")]
    pub groups: Vec<String>,
    /// Why (written to the audit log).
    #[arg(long)]
    pub reason: Option<String>,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Subcommand)]
pub enum TaskCmd {
    /// Start a task; prints the task id and the root agent's handoff grant.
    Start {
        /// The initiating user's OIDC ID token; `-` reads it from standard input.
        #[arg(
            long,
            env = "BATON_ID_TOKEN",
            hide_env_values = true,
            conflicts_with_all = ["user", "id_token_file"]
        )]
        id_token: Option<String>,
        /// File holding the ID token (`-`: standard input).
        #[arg(long, value_name = "FILE", conflicts_with = "user")]
        id_token_file: Option<PathBuf>,
        /// With `baton dev`'s local issuer: mint an ID token for this user.
        #[arg(long)]
        user: Option<String>,
        /// With --user: a group the minted token's `groups` claim lists, for
        /// the admission policy (repeatable).
        #[arg(long = "group", value_name = "GROUP", requires = "user")]
        groups: Vec<String>,
        /// The agent that receives the task first.
        #[arg(long)]
        root_agent: String,
        /// A purpose from the broker's catalogue, e.g. support.case-research.
        #[arg(long)]
        purpose: String,
        /// A permission, e.g. tool:crm.search:read (repeatable).
        #[arg(long = "scope", required = true)]
        scope: Vec<String>,
        /// read, write, delete, purchase or export.
        #[arg(long, default_value = "read")]
        risk_ceiling: String,
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long, default_value_t = 3)]
        max_depth: u32,
        /// Audience of the root agent's token (the tools it will call; repeatable).
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Show one task and its credentials (ids as `baton revoke credential`
    /// takes them, kinds, holders, expiries, whether revoked).
    Show {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List tasks.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// End a task: no more hops or redeems.
    End {
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// A fresh grant for the task's root agent (e.g. after a purpose change),
    /// for audiences admitted at the task's start only.
    Grant {
        id: String,
        #[arg(long = "audience", required = true)]
        audience: Vec<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Change a task's purpose: every credential of the task is revoked;
    /// the agents need new grants (`baton task grant`).
    SetPurpose {
        id: String,
        purpose: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Args)]
pub struct RevokeArgs {
    /// Why (recorded with the revocation).
    #[arg(long, default_value = "revoked by an operator")]
    pub reason: String,
    #[command(flatten)]
    pub admin: AdminArgs,
}

#[derive(Debug, Subcommand)]
pub enum RevokeCmd {
    /// One credential and what was minted from it.
    Credential {
        /// The credential's id as `baton task show` lists it: a certificate
        /// serial (hex; also as openssl prints it, `serial=7A3F...` or
        /// `7a:3f:...`), a token jti, a grant digest or a lease id.
        id: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// A token and every token and certificate minted from it, transitively.
    Subtree {
        id: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// Every credential of a task.
    Task {
        id: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// Every credential of an agent across all its tasks (kill switch), and
    /// blocks it from new ones (hops to it, redeems, secrets, SVIDs) until
    /// `--until` passes or `baton revoke unblock` lifts it.
    Agent {
        spiffe_id: String,
        /// Lift the block by itself after this long (e.g. 1h). Default: never.
        #[arg(long, value_parser = humantime::parse_duration)]
        until: Option<Duration>,
        #[command(flatten)]
        args: RevokeArgs,
    },
    /// Lifts the block `baton revoke agent` put on an agent (its revoked
    /// credentials stay revoked).
    Unblock {
        spiffe_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Every credential issued through a node.
    Node {
        spiffe_id: String,
        #[command(flatten)]
        args: RevokeArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum NodeCmd {
    /// Every node the broker knows: attested or banned.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// One node: attestation time, agent SVID serial and expiry, ban, entries under it.
    Show {
        /// The node's SPIFFE ID, e.g. spiffe://example.org/baton/node/n1 (see `baton node list`).
        node_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Forget the node's attestation and revoke everything issued through it
    /// (its agent SVID, its workloads' SVIDs, task credentials). It must
    /// attest again with a new join token.
    Evict {
        /// The node's SPIFFE ID, e.g. spiffe://example.org/baton/node/n1.
        node_id: String,
        /// Why (recorded with the revocation).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Evict the node and refuse every later attestation of its ID.
    Ban {
        /// The node's SPIFFE ID, e.g. spiffe://example.org/baton/node/n1.
        node_id: String,
        /// Why (recorded with the revocation).
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Lift a ban; the node must then attest again with a new join token.
    Unban {
        /// The banned node's SPIFFE ID.
        node_id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// Read an audit log file directly instead of asking the broker.
#[derive(Debug, Args)]
pub struct OfflineLogArgs {
    /// Verify a log file offline (e.g. a copy, or while the broker is
    /// stopped) instead of asking the broker: the broker's audit.db (its
    /// head file, audit.db.head, is checked too when it is beside it).
    #[arg(long, requires = "keys_dir")]
    pub db: Option<PathBuf>,
    /// The broker's audit key directory (only the public key is read).
    #[arg(long, requires = "db")]
    pub keys_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum AuditCmd {
    /// Prove the log untampered (exit 4 and the first bad index if not):
    /// every event and checkpoint, and that it extends the broker's head
    /// file and, with --since, a witness file kept elsewhere.
    Verify {
        #[command(flatten)]
        log: OfflineLogArgs,
        /// A witness file (`baton audit checkpoint --out FILE`): the log must
        /// still hold the events it witnessed ("log truncated") and be
        /// consistent with its signed tree head ("log forked/rewritten").
        /// Checked here, with the key the witness names, not by the broker.
        #[arg(long, value_name = "FILE")]
        since: Option<PathBuf>,
        /// After a successful check, move the witness file forward to the
        /// log's newest tree head (for a cron job that keeps it current).
        #[arg(long, requires = "since")]
        update: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Witness the log's newest signed tree head (size, root, signature,
    /// key): to stdout, or to a new file for `verify --since`.
    Checkpoint {
        /// Write it to this file (refused if it exists: move an existing
        /// witness forward with `baton audit verify --since FILE --update`).
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        #[command(flatten)]
        log: OfflineLogArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Check that the event a receipt proves is still in the log: the
    /// receipt itself (leaf, inclusion path, signature), then that the log
    /// extends the receipt's checkpoint (exit 4 if it was cut below it or
    /// rewritten).
    VerifyReceipt {
        /// The receipt, as JSON (what `baton audit receipt` prints).
        file: PathBuf,
        #[command(flatten)]
        log: OfflineLogArgs,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// An inclusion receipt for one event, verifiable offline.
    Receipt {
        index: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Print a task's chain as a tree: initiator, hops, tool calls.
    Trace {
        task: String,
        /// The same as `-o json` (kept for scripts that use it).
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ApprovalCmd {
    /// A held call: its task, agent, tool, resource, input digest, the
    /// gateway that asked, its status and until when it may be decided.
    Show {
        /// The approval's id (`ap_...`).
        id: String,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum GrantCmd {
    /// Redeem a grant through the node daemon; writes the task credential to a directory.
    Redeem {
        #[command(flatten)]
        socket: SocketArgs,
        /// The grant, or `-` to read it from standard input (or BATON_GRANT).
        /// Prefer --grant-file, standard input or the variable: an argument is
        /// visible to every user of the machine.
        #[arg(
            long,
            env = "BATON_GRANT",
            hide_env_values = true,
            required_unless_present = "grant_file",
            conflicts_with = "grant_file"
        )]
        grant: Option<String>,
        /// File holding the grant (`-`: standard input).
        #[arg(long, value_name = "FILE")]
        grant_file: Option<PathBuf>,
        /// Which of your identities redeems it, when you have several.
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Directory for svid.pem, key.pem (0600), bundle.pem, token (0600), task.json.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: OutputFormat,
    },
    /// Re-issue the task credential in a directory under the CA's active keys
    /// (after `baton ca taint`): same claims and expiry, new key and certificate.
    Renew {
        #[command(flatten)]
        socket: SocketArgs,
        /// The credential directory to renew in place.
        #[arg(long)]
        credential: PathBuf,
        /// Which of your identities holds it, when you have several.
        #[arg(long)]
        spiffe_id: Option<String>,
        #[arg(long, short = 'o', value_enum, default_value_t)]
        output: OutputFormat,
    },
}

#[derive(Debug, Args)]
pub struct DelegateArgs {
    /// Your task credential directory (from `baton grant redeem`).
    #[arg(long)]
    pub credential: PathBuf,
    /// The broker's HTTPS URL; several brokers of one service separated
    /// by commas (the next is asked when one gives no answer: a hop spends
    /// nothing, and a grant whose answer was lost is never delivered).
    #[arg(long, env = "BATON_BROKER_URL", hide_env_values = true)]
    pub broker_url: String,
    /// The agent receiving the hop.
    #[arg(long)]
    pub target: String,
    /// A permission handed on (repeatable); must be a subset of yours.
    #[arg(long = "scope", required = true)]
    pub scope: Vec<String>,
    /// Defaults to the task's purpose in your token.
    #[arg(long)]
    pub purpose: Option<String>,
    #[arg(long = "audience", required = true)]
    pub audience: Vec<String>,
    #[arg(long)]
    pub justification: String,
    /// How long the hop's credential lives (never past yours or the
    /// task's). Default: the broker's `--hop-token-ttl` (15 minutes).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub ttl: Option<Duration>,
    #[arg(long, short = 'o', value_enum, default_value_t)]
    pub output: OutputFormat,
}

#[derive(Debug, Subcommand)]
pub enum ExampleCmd {
    /// An example tool server (CRM search/update/export) guarded by baton-verify.
    ToolServer {
        #[command(flatten)]
        socket: SocketArgs,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// The broker's HTTPS URL, for tool-call reports and the
        /// revocation feed; several brokers of one service separated by
        /// commas (the next is used when one does not answer).
        #[arg(long, env = "BATON_BROKER_URL", hide_env_values = true)]
        broker_url: String,
        /// The audience this server accepts tokens for.
        #[arg(long, default_value = "crm")]
        audience: String,
        /// Which of this process's SVIDs the server uses (default: the
        /// first the Workload API returns). The broker accepts its reports
        /// only if it serves the token's audience (`baton broker
        /// --tool-server AUDIENCE=SPIFFE_ID`).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// Cedar policies (schema + *.cedar); default: the embedded example set.
        #[arg(long)]
        policies: Option<PathBuf>,
        /// Spool for tool-call reports not yet delivered to the broker.
        #[arg(long)]
        spool: PathBuf,
        // Follow the revocation feed in this Redis (no network call per request).
        #[command(flatten)]
        redis: Box<crate::redis_args::RedisArgs>,
        /// Deny every call once the feed has been silent this long.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        stale_after: Duration,
        /// Follow no revocation feed: revoked credentials keep working until
        /// they expire. Without --redis the server follows the broker's own
        /// feed; this turns that off. Never in production.
        #[arg(long)]
        dangerously_skip_revocation: bool,
        #[arg(long)]
        ready_file: Option<PathBuf>,
        #[command(flatten)]
        shutdown: ShutdownArgs,
        #[command(flatten)]
        ops: crate::ops::OpsArgs,
    },
    /// Call a tool with a task credential: on the example tool server
    /// (`POST URL/tools/TOOL`), through a gateway route (`--method`,
    /// `--path`), or on an MCP endpoint (`--mcp`, with the official MCP
    /// SDK's client: `--url` is the endpoint, `--input` the arguments).
    Call {
        #[arg(long)]
        credential: PathBuf,
        /// e.g. https://127.0.0.1:9443 (with --mcp: https://GATEWAY/mcp)
        #[arg(long)]
        url: String,
        #[arg(long, required_unless_present = "path")]
        tool: Option<String>,
        /// The request body (JSON); with --mcp, the tool's arguments.
        #[arg(long, default_value = "{}")]
        input: String,
        /// A plain HTTP request to URL + PATH instead (a gateway route).
        #[arg(long, conflicts_with = "mcp")]
        path: Option<String>,
        /// The HTTP method of --path.
        #[arg(long, default_value = "GET", requires = "path")]
        method: String,
        /// Call TOOL over MCP (Streamable HTTP) at URL.
        #[arg(long)]
        mcp: bool,
        #[arg(long)]
        justification: Option<String>,
    },
    /// Put a grant on a Redis Stream (async fan-out).
    Enqueue {
        #[arg(long)]
        redis: String,
        #[arg(long, default_value = "baton:work")]
        stream: String,
        /// The grant, or `-` to read it from standard input (or BATON_GRANT).
        #[arg(
            long,
            env = "BATON_GRANT",
            hide_env_values = true,
            required_unless_present = "grant_file",
            conflicts_with = "grant_file"
        )]
        grant: Option<String>,
        /// File holding the grant (`-`: standard input).
        #[arg(long, value_name = "FILE")]
        grant_file: Option<PathBuf>,
        #[arg(long)]
        tool: String,
    },
    /// Take one grant from a Redis Stream, redeem it, call the tool it names.
    Worker {
        #[arg(long)]
        redis: String,
        #[arg(long, default_value = "baton:work")]
        stream: String,
        #[command(flatten)]
        socket: SocketArgs,
        #[arg(long)]
        spiffe_id: Option<String>,
        #[arg(long)]
        url: String,
        /// Where to keep the redeemed credential.
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// An mTLS echo server whose identity and trust follow the Workload API
    /// live (watch a CA rotation with it and `echo-client`).
    EchoServer {
        #[command(flatten)]
        socket: SocketArgs,
        /// Use the SVID with this SPIFFE ID (default: the first one).
        #[arg(long)]
        spiffe_id: Option<String>,
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
        /// Write the listening address here once ready.
        #[arg(long)]
        ready_file: Option<PathBuf>,
    },
    /// Call an echo server over a fresh mTLS connection every --interval,
    /// counting successes and failures, until SIGTERM.
    EchoClient {
        #[command(flatten)]
        socket: SocketArgs,
        /// Use the SVID with this SPIFFE ID (default: the first one).
        #[arg(long)]
        spiffe_id: Option<String>,
        /// The echo server's address (host:port).
        #[arg(long)]
        server: String,
        /// The SPIFFE ID the server must present.
        #[arg(long)]
        server_id: String,
        #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Keep {"ok":N,"failed":M,"last_error":...} up to date in this file.
        #[arg(long)]
        stats_file: Option<PathBuf>,
    },
}

pub async fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Dev(args) => daemons::dev(args).await,
        Command::Broker(args) => daemons::broker(*args).await,
        Command::Agent(args) => daemons::agent(args).await,
        Command::Revocation(args) => daemons::revocation(args).await,
        Command::Token(cmd) => admin::token(cmd).await,
        Command::Entry(cmd) => admin::entry(cmd).await,
        Command::Bundle(cmd) => admin::bundle(cmd).await,
        Command::Ca(cmd) => ca::ca(cmd).await,
        Command::Svid(cmd) => workload::svid(cmd).await,
        Command::Task(cmd) => tasks::task(cmd).await,
        Command::Audit(cmd) => audit::audit(cmd).await,
        Command::Grant(cmd) => creds::grant(cmd).await,
        Command::Delegate(args) => creds::delegate(args).await,
        Command::Revoke(target) => tasks::revoke(target).await,
        Command::Approve(args) => tasks::decide(args, true).await,
        Command::Deny(args) => tasks::decide(args, false).await,
        Command::Approval(ApprovalCmd::Show { id, admin }) => {
            tasks::show_approval(&id, admin).await
        }
        Command::Node(cmd) => nodes::node(cmd).await,
        Command::Secret(cmd) => creds::secret(cmd).await,
        Command::Example(cmd) => example::run(cmd).await,
        Command::Gateway(args) => crate::gateway::gateway(args).await,
        Command::Config(ConfigCmd::Check { file, verb }) => config::check(&file, verb),
        Command::Healthcheck(args) => crate::ops::healthcheck(args).await,
        Command::Completions { shell } => {
            // Into a buffer first: clap_complete panics on a write error
            // (a closed pipe); `output` handles that quietly.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut config::command(), "baton", &mut script);
            crate::output::bytes(&script);
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;
    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    /// JWT key ids are base64url and may begin with `-`: the ca verbs
    /// take them as ids wherever they stand, and flags stay flags.
    #[test]
    fn ca_verbs_take_ids_that_begin_with_a_hyphen() {
        use crate::ca::CaCmd;
        let kid = "-lFbZEIft11TKtQz_pkozQ";
        let parse = |args: &[&str]| {
            let mut all = vec!["baton", "ca"];
            all.extend_from_slice(args);
            match Cli::try_parse_from(all).map(|c| c.command) {
                Ok(Command::Ca(cmd)) => cmd,
                other => panic!("{args:?}: {other:?}"),
            }
        };
        for args in [
            &["taint", kid, "--wait", "--timeout", "5s"][..],
            &["taint", "--wait", kid, "--timeout", "5s"][..],
        ] {
            match parse(args) {
                CaCmd::Taint { id, wait, .. } => {
                    assert_eq!(id, kid, "{args:?}");
                    assert!(wait.wait, "{args:?}");
                    assert_eq!(wait.timeout, std::time::Duration::from_secs(5));
                }
                other => panic!("{other:?}"),
            }
        }
        match parse(&["revoke", kid, "--force"]) {
            CaCmd::Revoke { id, force, .. } => assert!(id == kid && force),
            other => panic!("{other:?}"),
        }
        match parse(&["activate", kid]) {
            CaCmd::Activate { id, force, .. } => {
                assert_eq!(id.as_deref(), Some(kid));
                assert!(!force);
            }
            other => panic!("{other:?}"),
        }
        // Control: an ordinary id and no id at all.
        match parse(&["activate"]) {
            CaCmd::Activate { id, .. } => assert!(id.is_none()),
            other => panic!("{other:?}"),
        }
        // An unknown flag is still refused, not taken for an id.
        assert!(Cli::try_parse_from(["baton", "ca", "revoke", "abc", "--forse"]).is_err());
    }

    /// `--help` must never print a secret taken from the environment, so
    /// every argument read from a variable hides its value.
    #[test]
    fn help_never_shows_environment_values() {
        fn walk(cmd: &clap::Command, path: &str, bad: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                if arg.get_env().is_some() && !arg.is_hide_env_values_set() {
                    bad.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), bad);
            }
        }
        let mut bad = Vec::new();
        walk(&Cli::command(), "baton", &mut bad);
        assert!(bad.is_empty(), "env values shown in --help: {bad:?}");
    }
}
