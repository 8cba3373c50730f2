//! The Redis options shared by `baton broker`, `baton revocation` and the
//! example tool server: one server, a Cluster or Sentinel; TLS files; ACL
//! credentials; the key prefix. Converted into
//! [`baton_revocation::RedisConfig`].

use std::path::{Path, PathBuf};

use anyhow::Result;
use baton_revocation::{RedisConfig, RedisMode, RedisPassword, RedisTls};
use clap::Args;

use crate::cli::{EXIT_REFUSED, exit};

#[derive(Clone, Args)]
pub struct RedisArgs {
    /// Redis for the revocation store and feed: redis://[user[:password]@]host:port[/db],
    /// rediss://… for TLS, unix:///path/to/socket. Prefer BATON_REDIS_URL or
    /// --redis-password-file to keep a password out of the process list.
    #[arg(
        long,
        env = "BATON_REDIS_URL",
        hide_env_values = true,
        value_name = "URL",
        conflicts_with_all = ["redis_cluster", "redis_sentinel"]
    )]
    pub redis: Option<String>,
    /// Redis Cluster instead of --redis: some of its nodes, comma-separated
    /// (redis://host:port,…, or all rediss:// for TLS); the others are discovered.
    #[arg(long, value_name = "URL,URL,...", conflicts_with = "redis_sentinel")]
    pub redis_cluster: Option<String>,
    /// Redis Sentinel instead of --redis: the sentinels, comma-separated
    /// (redis://host:26379,…, or all rediss:// for TLS to the sentinels and the
    /// primary). A user:password in these URLs is the sentinels' own.
    #[arg(long, value_name = "URL,URL,...", requires = "redis_sentinel_master")]
    pub redis_sentinel: Option<String>,
    /// With --redis-sentinel: the primary's name as the sentinels monitor it.
    #[arg(long, value_name = "NAME", requires = "redis_sentinel")]
    pub redis_sentinel_master: Option<String>,
    /// CA certificates (PEM) that the Redis server's certificate must chain to,
    /// instead of the system trust store (needs rediss:// URLs).
    #[arg(long, value_name = "FILE")]
    pub redis_ca: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS with Redis (with --redis-client-key).
    #[arg(long, value_name = "FILE", requires = "redis_client_key")]
    pub redis_client_cert: Option<PathBuf>,
    /// Private key (PEM) of --redis-client-cert.
    #[arg(long, value_name = "FILE", requires = "redis_client_cert")]
    pub redis_client_key: Option<PathBuf>,
    /// ACL user for the Redis data nodes; overrides a user in the URLs.
    #[arg(long, value_name = "NAME")]
    pub redis_username: Option<String>,
    /// File holding the ACL password for the Redis data nodes (one line);
    /// overrides a password in the URLs.
    #[arg(long, value_name = "FILE")]
    pub redis_password_file: Option<PathBuf>,
    /// Key prefix: keys are {PREFIX}:… (a hash tag, so all of them share one
    /// Cluster slot). Must not contain braces.
    #[arg(long, value_name = "PREFIX", default_value = "baton")]
    pub redis_prefix: String,
}

/// URLs without their passwords.
impl std::fmt::Debug for RedisArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let list = |l: &Option<String>| {
            l.as_deref().map(|l| {
                l.split(',')
                    .map(baton_revocation::redact_url)
                    .collect::<Vec<_>>()
                    .join(",")
            })
        };
        f.debug_struct("RedisArgs")
            .field(
                "redis",
                &self.redis.as_deref().map(baton_revocation::redact_url),
            )
            .field("redis_cluster", &list(&self.redis_cluster))
            .field("redis_sentinel", &list(&self.redis_sentinel))
            .field("redis_sentinel_master", &self.redis_sentinel_master)
            .field("redis_ca", &self.redis_ca)
            .field("redis_client_cert", &self.redis_client_cert)
            .field("redis_client_key", &self.redis_client_key)
            .field("redis_username", &self.redis_username)
            .field("redis_password_file", &self.redis_password_file)
            .field("redis_prefix", &self.redis_prefix)
            .finish()
    }
}

fn refused(e: impl std::fmt::Display) -> anyhow::Error {
    exit(EXIT_REFUSED, e.to_string())
}

fn read_password(path: &Path) -> Result<RedisPassword> {
    let line = crate::daemons::read_secret_line("--redis-password-file", path)?;
    Ok(RedisPassword::new(line.expose()))
}

impl RedisArgs {
    /// The configuration, or `None` when no Redis was named (in memory).
    pub fn config(&self) -> Result<Option<RedisConfig>> {
        let mode = match (&self.redis, &self.redis_cluster, &self.redis_sentinel) {
            (Some(url), None, None) => RedisMode::Standalone { url: url.clone() },
            (None, Some(list), None) => RedisMode::Cluster {
                urls: RedisConfig::parse_url_list("--redis-cluster", list).map_err(refused)?,
            },
            (None, None, Some(list)) => RedisMode::Sentinel {
                urls: RedisConfig::parse_url_list("--redis-sentinel", list).map_err(refused)?,
                master: self.redis_sentinel_master.clone().unwrap_or_default(),
            },
            (None, None, None) => {
                let stray = [
                    ("--redis-ca", self.redis_ca.is_some()),
                    ("--redis-client-cert", self.redis_client_cert.is_some()),
                    ("--redis-client-key", self.redis_client_key.is_some()),
                    ("--redis-username", self.redis_username.is_some()),
                    ("--redis-password-file", self.redis_password_file.is_some()),
                    (
                        "--redis-sentinel-master",
                        self.redis_sentinel_master.is_some(),
                    ),
                ]
                .into_iter()
                .find(|(_, set)| *set);
                if let Some((option, _)) = stray {
                    return Err(refused(format!(
                        "{option}: needs --redis, --redis-cluster or --redis-sentinel"
                    )));
                }
                return Ok(None);
            }
            _ => {
                return Err(refused(
                    "--redis, --redis-cluster and --redis-sentinel exclude each other",
                ));
            }
        };
        // A client key every user can read is no secret (as a password
        // file is not).
        if let Some(key) = &self.redis_client_key {
            crate::creds::refuse_shared_secret_file("--redis-client-key", key)?;
        }
        let password = self
            .redis_password_file
            .as_deref()
            .map(read_password)
            .transpose()?;
        let config = RedisConfig {
            mode,
            tls: RedisTls {
                ca_file: self.redis_ca.clone(),
                client_cert: self.redis_client_cert.clone(),
                client_key: self.redis_client_key.clone(),
            },
            username: self.redis_username.clone(),
            password,
            prefix: self.redis_prefix.clone(),
        };
        config.validate().map_err(refused)?;
        Ok(Some(config))
    }

    /// Like [`RedisArgs::config`], for commands that cannot run without Redis.
    pub fn required(&self) -> Result<RedisConfig> {
        self.config()?.ok_or_else(|| {
            refused("one of --redis, --redis-cluster or --redis-sentinel is required")
        })
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cmd {
        #[command(flatten)]
        redis: RedisArgs,
    }

    fn parse(args: &[&str]) -> Result<Cmd, clap::Error> {
        Cmd::try_parse_from(std::iter::once("baton").chain(args.iter().copied()))
    }

    /// The error of parsing plus converting, as the user sees it.
    fn error(args: &[&str]) -> String {
        match parse(args) {
            Err(e) => e.to_string(),
            Ok(cmd) => match cmd.redis.config() {
                Err(e) => format!("{e:#}"),
                Ok(c) => panic!("accepted {args:?}: {c:?}"),
            },
        }
    }

    #[test]
    fn sentinel_without_master_names_the_option() {
        let e = error(&["--redis-sentinel", "redis://127.0.0.1:26379"]);
        assert!(e.contains("--redis-sentinel-master"), "{e}");
    }

    #[test]
    fn client_cert_without_key_names_the_option() {
        let e = error(&["--redis", "rediss://h:1", "--redis-client-cert", "c.pem"]);
        assert!(e.contains("--redis-client-key"), "{e}");
    }

    #[test]
    fn malformed_urls_name_the_option_without_the_password() {
        let e = error(&["--redis", "http://u:hunter2@h:1"]);
        assert!(e.contains("--redis") && !e.contains("hunter2"), "{e}");
        let e = error(&["--redis-cluster", "redis://a:1,,redis://b:2"]);
        assert!(e.contains("--redis-cluster") && e.contains("empty"), "{e}");
        let e = error(&["--redis-cluster", "redis://a:1,rediss://b:2"]);
        assert!(e.contains("--redis-cluster") && e.contains("mixes"), "{e}");
        let e = error(&["--redis-cluster", "unix:///run/redis/redis.sock"]);
        assert!(e.contains("--redis-cluster") && e.contains("unix"), "{e}");
    }

    #[test]
    fn tls_files_need_rediss() {
        let e = error(&["--redis", "redis://h:1", "--redis-ca", "ca.pem"]);
        assert!(e.contains("--redis-ca") && e.contains("rediss://"), "{e}");
    }

    #[test]
    fn modes_exclude_each_other_and_tls_needs_a_target() {
        let e = error(&["--redis", "redis://h:1", "--redis-cluster", "redis://h:2"]);
        assert!(e.contains("--redis-cluster"), "{e}");
        let e = error(&["--redis-ca", "ca.pem"]);
        assert!(
            e.contains("--redis-ca") && e.contains("needs --redis"),
            "{e}"
        );
    }

    #[test]
    fn bad_prefix_names_the_option() {
        let e = error(&["--redis", "redis://h:1", "--redis-prefix", "{x}"]);
        assert!(e.contains("--redis-prefix"), "{e}");
    }

    #[test]
    fn password_file_is_read_and_never_printed() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret-pw\n").unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cmd = parse(&[
            "--redis-sentinel",
            "redis://127.0.0.1:26379,redis://127.0.0.1:26380",
            "--redis-sentinel-master",
            "mymaster",
            "--redis-username",
            "baton",
            "--redis-password-file",
            pw.to_str().unwrap(),
        ])
        .unwrap();
        let c = cmd.redis.config().unwrap().unwrap();
        assert_eq!(c.password.as_ref().unwrap().expose(), "s3cret-pw");
        assert!(
            matches!(&c.mode, RedisMode::Sentinel { urls, master } if urls.len() == 2 && master == "mymaster")
        );
        let shown = format!("{c:?} {c}");
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        // A password others can read is refused, naming the flag.
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = format!("{:#}", cmd.redis.config().unwrap_err());
        assert!(
            e.contains("--redis-password-file") && e.contains("chmod 600"),
            "{e}"
        );
        // Its group may read it (a Kubernetes Secret under `fsGroup`).
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
        cmd.redis.config().unwrap().unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::write(&pw, "").unwrap();
        let e = format!("{:#}", cmd.redis.config().unwrap_err());
        assert!(e.contains("--redis-password-file"), "{e}");
    }

    #[test]
    fn no_redis_is_none_and_standalone_is_parsed() {
        assert!(parse(&[]).unwrap().redis.config().unwrap().is_none());
        let c = parse(&["--redis", "redis://u:pw@h:1/2", "--redis-prefix", "bt"])
            .unwrap()
            .redis
            .config()
            .unwrap()
            .unwrap();
        assert_eq!(c, RedisConfig::standalone("redis://u:pw@h:1/2", "bt"));
        assert!(!format!("{c:?}").contains("pw@"));
        let args = parse(&["--redis", "redis://u:pw@h:1/2"]).unwrap().redis;
        assert!(!format!("{args:?}").contains("pw@"), "{args:?}");
    }
}
