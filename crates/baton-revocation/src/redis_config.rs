//! Where the Redis backend connects: one server, a Redis Cluster, or the
//! primary that Redis Sentinel names; with TLS (`rediss://`, optionally
//! mutual) and ACL credentials.
//!
//! [`RedisConfig`] is plain data (what the CLI flags say); [`Connector`]
//! is what the store and the feed open connections with. Both the store and
//! the feed connect through the same [`Connector`] kinds, so every mode
//! serves registration, revocation and the feed.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::sentinel::{SentinelClient, SentinelClientBuilder, SentinelServerType};
use redis::{
    ClientTlsConfig, Cmd, ConnectionAddr, ConnectionInfo, IntoConnectionInfo, Pipeline,
    RedisFuture, TlsCertificates, TlsMode, Value,
};

use crate::RevocationError;
use crate::redis_store::redact_url;

/// Longest key prefix accepted.
pub const MAX_PREFIX_LEN: usize = 64;

/// How to reach Redis and which keys to use. Build one with
/// [`RedisConfig::standalone`] or by filling the fields, then
/// [`RedisConfig::validate`] (the store and the feed validate again).
///
/// Errors name the field by its `baton` command-line option
/// (`--redis-ca`, …), since that is where the values come from.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    pub mode: RedisMode,
    /// Certificates for `rediss://`; empty means the system roots and no
    /// client certificate.
    pub tls: RedisTls,
    /// ACL user for the data nodes (standalone, every cluster node, the
    /// primary found through Sentinel). Overrides the user in the URLs.
    pub username: Option<String>,
    /// ACL password for the data nodes. Overrides the password in the URLs.
    pub password: Option<RedisPassword>,
    /// Key prefix; keys are `{prefix}:…` (a hash tag, so that every key
    /// lives in one Cluster slot).
    pub prefix: String,
}

/// The topology.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisMode {
    /// One server (or a proxy): `redis://`, `rediss://` or `unix://`.
    Standalone { url: String },
    /// A Redis Cluster: some of its nodes (the rest are discovered).
    Cluster { urls: Vec<String> },
    /// Sentinels that monitor the primary named `master`. Credentials in
    /// these URLs are the sentinels' own.
    Sentinel { urls: Vec<String>, master: String },
}

/// PEM files for TLS. All optional; any of them requires `rediss://`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RedisTls {
    /// CA certificates (PEM) that the server's certificate must chain to,
    /// instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS, with `client_key`.
    pub client_cert: Option<PathBuf>,
    /// Client private key (PEM: PKCS#8, PKCS#1 or SEC1), with `client_cert`.
    pub client_key: Option<PathBuf>,
}

impl RedisTls {
    fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client_cert.is_none() && self.client_key.is_none()
    }
}

/// A Redis password; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisPassword(String);

impl RedisPassword {
    pub fn new(password: impl Into<String>) -> Self {
        Self(password.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RedisPassword {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Debug for RedisMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.describe())
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("mode", &self.mode)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password)
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl fmt::Display for RedisConfig {
    /// Without passwords, for logs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (keys {{{}}}:…)", self.mode.describe(), self.prefix)
    }
}

fn config_err(option: &'static str, why: impl Into<String>) -> RevocationError {
    RevocationError::Config {
        option,
        why: why.into(),
    }
}

fn join_redacted(urls: &[String]) -> String {
    urls.iter()
        .map(|u| redact_url(u))
        .collect::<Vec<_>>()
        .join(",")
}

impl RedisMode {
    /// The option the URLs came from, for error messages.
    fn option(&self) -> &'static str {
        match self {
            Self::Standalone { .. } => "--redis",
            Self::Cluster { .. } => "--redis-cluster",
            Self::Sentinel { .. } => "--redis-sentinel",
        }
    }

    fn urls(&self) -> &[String] {
        match self {
            Self::Standalone { url } => std::slice::from_ref(url),
            Self::Cluster { urls } | Self::Sentinel { urls, .. } => urls,
        }
    }

    /// The topology without passwords.
    pub fn describe(&self) -> String {
        match self {
            Self::Standalone { url } => redact_url(url),
            Self::Cluster { urls } => format!("cluster {}", join_redacted(urls)),
            Self::Sentinel { urls, master } => {
                format!("primary {master:?} via sentinels {}", join_redacted(urls))
            }
        }
    }
}

/// Checks a key prefix: non-empty, at most [`MAX_PREFIX_LEN`] bytes, no
/// braces (it becomes the hash tag `{prefix}`), whitespace or control
/// characters.
pub fn validate_prefix(prefix: &str) -> Result<(), RevocationError> {
    let why = if prefix.is_empty() {
        "must not be empty"
    } else if prefix.len() > MAX_PREFIX_LEN {
        "longer than 64 bytes"
    } else if prefix.contains(['{', '}']) {
        "must not contain '{' or '}' (Baton wraps it in braces itself, as a Cluster hash tag)"
    } else if prefix.chars().any(|c| c.is_whitespace() || c.is_control()) {
        "must not contain whitespace or control characters"
    } else {
        return Ok(());
    };
    Err(config_err("--redis-prefix", format!("{prefix:?} {why}")))
}

impl RedisConfig {
    /// One server at `url` (`redis://[user:pass@]host:port/db`,
    /// `rediss://…` for TLS with the system roots, `unix://path`).
    pub fn standalone(url: impl Into<String>, prefix: impl Into<String>) -> Self {
        Self {
            mode: RedisMode::Standalone { url: url.into() },
            tls: RedisTls::default(),
            username: None,
            password: None,
            prefix: prefix.into(),
        }
    }

    /// Splits a comma-separated list of URLs (`--redis-cluster`,
    /// `--redis-sentinel`), refusing empty items.
    pub fn parse_url_list(
        option: &'static str,
        list: &str,
    ) -> Result<Vec<String>, RevocationError> {
        let urls: Vec<String> = list.split(',').map(|s| s.trim().to_owned()).collect();
        if urls.iter().any(String::is_empty) {
            return Err(config_err(
                option,
                format!(
                    "expected comma-separated URLs, got an empty item in {:?}",
                    join_redacted(&urls)
                ),
            ));
        }
        Ok(urls)
    }

    /// The keys' common part, `{prefix}` (a Cluster hash tag).
    pub fn key_base(&self) -> String {
        format!("{{{}}}", self.prefix)
    }

    /// Whether the URLs ask for TLS.
    fn uses_tls(&self) -> bool {
        self.mode
            .urls()
            .first()
            .is_some_and(|u| u.starts_with("rediss://") || u.starts_with("valkeys://"))
    }

    /// Checks everything that can be checked without reading files or
    /// connecting.
    pub fn validate(&self) -> Result<(), RevocationError> {
        self.parsed().map(|_| ())
    }

    fn parsed(&self) -> Result<Vec<ConnectionInfo>, RevocationError> {
        validate_prefix(&self.prefix)?;
        let option = self.mode.option();
        let urls = self.mode.urls();
        if urls.is_empty() {
            return Err(config_err(option, "no URL given"));
        }
        let mut infos = Vec::with_capacity(urls.len());
        for url in urls {
            let info = url
                .as_str()
                .into_connection_info()
                .map_err(|e| config_err(option, format!("{}: {e}", redact_url(url))))?;
            infos.push(info);
        }
        let tls = self.uses_tls();
        for (url, info) in urls.iter().zip(&infos) {
            let this_tls = matches!(info.addr(), ConnectionAddr::TcpTls { .. });
            if this_tls != tls {
                return Err(config_err(
                    option,
                    format!(
                        "{}: mixes rediss:// and redis:// URLs; use one scheme for all",
                        redact_url(url)
                    ),
                ));
            }
            if matches!(info.addr(), ConnectionAddr::Unix(_))
                && !matches!(self.mode, RedisMode::Standalone { .. })
            {
                return Err(config_err(
                    option,
                    format!(
                        "{}: unix sockets only work with --redis (a cluster or a sentinel announces TCP addresses)",
                        redact_url(url)
                    ),
                ));
            }
        }
        if let RedisMode::Sentinel { master, .. } = &self.mode
            && master.trim().is_empty()
        {
            return Err(config_err(
                "--redis-sentinel-master",
                "the name of the monitored primary is required with --redis-sentinel",
            ));
        }
        match (&self.tls.client_cert, &self.tls.client_key) {
            (Some(_), None) => {
                return Err(config_err(
                    "--redis-client-cert",
                    "needs --redis-client-key (the certificate's private key)",
                ));
            }
            (None, Some(_)) => {
                return Err(config_err(
                    "--redis-client-key",
                    "needs --redis-client-cert (the certificate for the key)",
                ));
            }
            _ => {}
        }
        if !self.tls.is_empty() && !tls {
            let which = if self.tls.ca_file.is_some() {
                "--redis-ca"
            } else {
                "--redis-client-cert"
            };
            return Err(config_err(
                which,
                format!(
                    "TLS files need rediss:// URLs, but {option} is {}",
                    join_redacted(urls)
                ),
            ));
        }
        if self.username.as_deref().is_some_and(str::is_empty) {
            return Err(config_err("--redis-username", "must not be empty"));
        }
        Ok(infos)
    }

    fn certificates(&self) -> Result<Option<TlsCertificates>, RevocationError> {
        if self.tls.is_empty() {
            return Ok(None);
        }
        let root_cert = self
            .tls
            .ca_file
            .as_deref()
            .map(|p| read_pem("--redis-ca", p, "CERTIFICATE"))
            .transpose()?;
        let client_tls = match (&self.tls.client_cert, &self.tls.client_key) {
            (Some(cert), Some(key)) => Some(ClientTlsConfig {
                client_cert: read_pem("--redis-client-cert", cert, "CERTIFICATE")?,
                client_key: read_pem("--redis-client-key", key, "PRIVATE KEY")?,
            }),
            _ => None,
        };
        Ok(Some(TlsCertificates {
            client_tls,
            root_cert,
        }))
    }

    /// Reads the TLS files and builds the client of the configured mode.
    /// Does not connect.
    pub(crate) fn connector(&self) -> Result<Connector, RevocationError> {
        let infos = self.parsed()?;
        let certs = self.certificates()?;
        let option = self.mode.option();
        let build_err = |e: redis::RedisError| config_err(option, e.to_string());
        let kind = match &self.mode {
            RedisMode::Standalone { .. } => {
                let info = infos
                    .into_iter()
                    .next()
                    .ok_or_else(|| config_err(option, "no URL given"))?;
                let info = self.with_credentials(info);
                let client = match certs {
                    Some(c) => redis::Client::build_with_tls(info, c),
                    None => redis::Client::open(info),
                }
                .map_err(build_err)?;
                Kind::Single(client)
            }
            RedisMode::Cluster { .. } => {
                // Check the node list and the certificates now rather than
                // at the first connection.
                self.cluster_builder(&infos, &certs)
                    .build()
                    .map_err(build_err)?;
                Kind::Cluster {
                    nodes: infos,
                    certs,
                    username: self.username.clone(),
                    password: self.password.clone(),
                }
            }
            RedisMode::Sentinel { master, .. } => {
                let client = self
                    .sentinel_client(infos, master, certs)
                    .map_err(build_err)?;
                Kind::Sentinel(Arc::new(tokio::sync::Mutex::new(client)))
            }
        };
        Ok(Connector { kind })
    }

    fn with_credentials(&self, info: ConnectionInfo) -> ConnectionInfo {
        let mut redis = info.redis_settings().clone();
        if let Some(u) = &self.username {
            redis = redis.set_username(u);
        }
        if let Some(p) = &self.password {
            redis = redis.set_password(p.expose());
        }
        info.set_redis_settings(redis)
    }

    fn cluster_builder(
        &self,
        nodes: &[ConnectionInfo],
        certs: &Option<TlsCertificates>,
    ) -> ClusterClientBuilder {
        let mut b = ClusterClientBuilder::new(nodes.to_vec());
        if let Some(u) = &self.username {
            b = b.username(u);
        }
        if let Some(p) = &self.password {
            b = b.password(p.expose());
        }
        if let Some(c) = certs {
            b = b.certs(c.clone());
        }
        b
    }

    fn sentinel_client(
        &self,
        infos: Vec<ConnectionInfo>,
        master: &str,
        certs: Option<TlsCertificates>,
    ) -> Result<SentinelClient, redis::RedisError> {
        let first = infos.first().map(|i| i.redis_settings().clone());
        let db = first.as_ref().map_or(0, |r| r.db());
        let mut b = SentinelClientBuilder::new(
            infos.iter().map(|i| i.addr().clone()),
            master.trim(),
            SentinelServerType::Master,
        )?
        .set_client_to_redis_db(db);
        if let Some(r) = &first {
            if let Some(u) = r.username() {
                b = b.set_client_to_sentinel_username(u);
            }
            if let Some(p) = r.password() {
                b = b.set_client_to_sentinel_password(p);
            }
        }
        // The primary: the explicit credentials, else the sentinels' own
        // (a common setup uses one password for both).
        let explicit = self.username.is_some() || self.password.is_some();
        let (user, pass) = if explicit {
            (
                self.username.clone(),
                self.password.as_ref().map(|p| p.expose().to_owned()),
            )
        } else {
            (
                first.as_ref().and_then(|r| r.username().map(str::to_owned)),
                first.as_ref().and_then(|r| r.password().map(str::to_owned)),
            )
        };
        if let Some(u) = user {
            b = b.set_client_to_redis_username(u);
        }
        if let Some(p) = pass {
            b = b.set_client_to_redis_password(p);
        }
        if self.uses_tls() {
            b = b.set_client_to_redis_tls_mode(TlsMode::Secure);
            if let Some(c) = certs {
                b = b
                    .set_client_to_sentinel_certificates(c.clone())
                    .set_client_to_redis_certificates(c);
            }
        }
        b.build()
    }
}

fn read_pem(option: &'static str, path: &Path, label: &str) -> Result<Vec<u8>, RevocationError> {
    let bytes = std::fs::read(path)
        .map_err(|e| config_err(option, format!("cannot read {}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    let found = text.lines().any(|l| {
        l.strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
            .is_some_and(|l| l.ends_with(label))
    });
    if !found {
        return Err(config_err(
            option,
            format!("{} holds no PEM {label} block", path.display()),
        ));
    }
    Ok(bytes)
}

/// Opens connections of the configured mode; cheap to clone.
#[derive(Clone)]
pub(crate) struct Connector {
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Single(redis::Client),
    /// The client is built per connection so each caller picks its own
    /// timeouts (the feed's blocking read needs a longer one).
    Cluster {
        nodes: Vec<ConnectionInfo>,
        certs: Option<TlsCertificates>,
        username: Option<String>,
        password: Option<RedisPassword>,
    },
    /// Asks the sentinels for the current primary on every (re)connection,
    /// so a failover is followed at the next connection error.
    Sentinel(Arc<tokio::sync::Mutex<SentinelClient>>),
}

impl Connector {
    pub(crate) async fn connect(
        &self,
        connect_timeout: Duration,
        response_timeout: Duration,
    ) -> Result<Conn, redis::RedisError> {
        let cfg = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        match &self.kind {
            Kind::Single(client) => Ok(Conn::Single(
                client
                    .get_multiplexed_async_connection_with_config(&cfg)
                    .await?,
            )),
            Kind::Cluster {
                nodes,
                certs,
                username,
                password,
            } => {
                let mut b = ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(connect_timeout)
                    .response_timeout(response_timeout);
                if let Some(u) = username {
                    b = b.username(u);
                }
                if let Some(p) = password {
                    b = b.password(p.expose());
                }
                if let Some(c) = certs {
                    b = b.certs(c.clone());
                }
                let client: ClusterClient = b.build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
            Kind::Sentinel(sentinel) => {
                let lookup = async {
                    let mut s = sentinel.lock().await;
                    s.async_get_client().await
                };
                let client = tokio::time::timeout(connect_timeout, lookup)
                    .await
                    .map_err(|_| {
                        redis::RedisError::from(std::io::Error::new(
                            std::io::ErrorKind::TimedOut,
                            "no sentinel named the primary in time",
                        ))
                    })??;
                Ok(Conn::Single(
                    client
                        .get_multiplexed_async_connection_with_config(&cfg)
                        .await?,
                ))
            }
        }
    }
}

/// A connection of either kind. Commands on a cluster connection are
/// routed by their first key; every key Baton uses carries the hash tag
/// `{prefix}`, so they all go to the node that owns that one slot.
#[derive(Clone)]
pub(crate) enum Conn {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Self::Single(c) => c.req_packed_command(cmd),
            Self::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Self::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Self::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Self::Single(c) => c.get_db(),
            Self::Cluster(c) => c.get_db(),
        }
    }
}
