//! TLS to the PostgreSQL datastore: the broker's own rustls (aws-lc-rs)
//! through `tokio-postgres-rustls`.
//!
//! Whenever TLS is asked for (a CA or client certificate file, or
//! `sslmode=require` in the connection string), it is required: the
//! connection fails rather than falls back to plain text when the server
//! does not offer TLS, and the server's certificate is always checked
//! against the CA file (or the system's roots) and the host name of the
//! connection string, as libpq's `sslmode=verify-full` does. libpq's
//! `require`, which accepts any certificate, has no equivalent here.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_postgres::Config;
use tokio_postgres::config::{Host, SslMode};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::store::StoreError;

/// The TLS files of `--datastore`.
#[derive(Clone, Debug, Default)]
pub struct PgTls {
    /// CA certificates (PEM) the server's certificate must chain to,
    /// instead of the system's roots.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS, with `client_key`.
    pub client_cert: Option<PathBuf>,
    /// The private key (PEM) of `client_cert`.
    pub client_key: Option<PathBuf>,
}

impl PgTls {
    fn is_empty(&self) -> bool {
        self.ca_file.is_none() && self.client_cert.is_none() && self.client_key.is_none()
    }
}

fn config_err(option: &str, why: impl std::fmt::Display) -> StoreError {
    StoreError::Config(format!("{option}: {why}"))
}

/// The connector for `config`, or `None` for plain connections. Sets
/// `config` to require TLS when it returns one. Refuses TLS files with
/// `sslmode=disable`, TLS to a Unix socket, and unreadable files, naming
/// the option.
pub(crate) fn connector(
    config: &mut Config,
    tls: &PgTls,
) -> Result<Option<MakeRustlsConnect>, StoreError> {
    let required = config.get_ssl_mode() == SslMode::Require;
    if tls.is_empty() && !required {
        return Ok(None);
    }
    if config.get_ssl_mode() == SslMode::Disable {
        let option = if tls.ca_file.is_some() {
            "--datastore-ca"
        } else {
            "--datastore-client-cert"
        };
        return Err(config_err(
            option,
            "TLS files are given but the connection string says sslmode=disable",
        ));
    }
    if let Some(Host::Unix(path)) = config
        .get_hosts()
        .iter()
        .find(|h| matches!(h, Host::Unix(_)))
    {
        return Err(config_err(
            "--datastore",
            format!(
                "TLS needs a TCP host, but {} is a Unix socket directory",
                path.display()
            ),
        ));
    }
    let roots = match &tls.ca_file {
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs("--datastore-ca", path)? {
                roots.add(cert).map_err(|e| {
                    config_err(
                        "--datastore-ca",
                        format!(
                            "{} holds a certificate that is not a CA: {e}",
                            path.display()
                        ),
                    )
                })?;
            }
            roots
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            let mut roots = RootCertStore::empty();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                return Err(config_err(
                    "--datastore-ca",
                    "TLS to PostgreSQL is required and the system has no CA certificates: name the server's CA",
                ));
            }
            roots
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(baton_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| config_err("--datastore", format!("TLS: {e}")))?
        .with_root_certificates(Arc::new(roots));
    let mut client = match (&tls.client_cert, &tls.client_key) {
        (Some(cert), Some(key)) => {
            let chain = read_certs("--datastore-client-cert", cert)?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
                config_err(
                    "--datastore-client-key",
                    format!("no private key read from {}: {e}", key.display()),
                )
            })?;
            builder.with_client_auth_cert(chain, key).map_err(|e| {
                config_err(
                    "--datastore-client-key",
                    format!("does not go with --datastore-client-cert: {e}"),
                )
            })?
        }
        (None, None) => builder.with_no_client_auth(),
        (Some(_), None) => {
            return Err(config_err(
                "--datastore-client-cert",
                "needs --datastore-client-key (the certificate's private key)",
            ));
        }
        (None, Some(_)) => {
            return Err(config_err(
                "--datastore-client-key",
                "needs --datastore-client-cert (the certificate for the key)",
            ));
        }
    };
    // What PostgreSQL 17's direct negotiation requires; older servers
    // ignore it.
    client.alpn_protocols = vec![b"postgresql".to_vec()];
    // INVARIANT: with a connector the connection is TLS or nothing; the
    // default `prefer` would fall back to plain text when the server (or
    // whoever answers in its place) does not offer TLS.
    config.ssl_mode(SslMode::Require);
    Ok(Some(MakeRustlsConnect::new(client)))
}

fn read_certs(option: &str, path: &Path) -> Result<Vec<CertificateDer<'static>>, StoreError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| config_err(option, format!("cannot read {}: {e}", path.display())))?;
    if certs.is_empty() {
        return Err(config_err(
            option,
            format!("{} holds no PEM CERTIFICATE", path.display()),
        ));
    }
    Ok(certs)
}

/// Whether every address `config` connects to is this machine (loopback
/// or a Unix socket), where plain text does not cross a network. A
/// `hostaddr` is where the connection goes, whatever `host` says.
pub(crate) fn is_local(config: &Config) -> bool {
    let addrs = config.get_hostaddrs();
    if !addrs.is_empty() {
        return addrs.iter().all(|ip| ip.is_loopback());
    }
    let hosts = config.get_hosts();
    !hosts.is_empty()
        && hosts.iter().all(|h| match h {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(s: &str) -> Config {
        s.parse().unwrap()
    }

    /// The error of a refused `connector` call.
    fn refused(mut config: Config, tls: &PgTls) -> String {
        match connector(&mut config, tls) {
            Ok(_) => panic!("accepted {tls:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn tls_is_required_whenever_it_is_asked_for_and_refused_where_it_cannot_be() {
        // Nothing asked: plain, as before.
        let mut c = parsed("host=127.0.0.1 user=b");
        assert!(connector(&mut c, &PgTls::default()).unwrap().is_none());
        assert_eq!(c.get_ssl_mode(), SslMode::Prefer);

        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["db.example".into()]).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.cert.pem()).unwrap();
        let with_ca = PgTls {
            ca_file: Some(ca_file.clone()),
            ..PgTls::default()
        };
        // A CA file makes TLS required, not preferred.
        let mut c = parsed("host=127.0.0.1 user=b");
        assert!(connector(&mut c, &with_ca).unwrap().is_some());
        assert_eq!(c.get_ssl_mode(), SslMode::Require);

        let err = refused(parsed("host=h sslmode=disable"), &with_ca);
        assert!(err.contains("--datastore-ca"), "{err}");
        assert!(err.contains("sslmode=disable"), "{err}");

        let err = refused(parsed("host=/run/postgresql"), &with_ca);
        assert!(err.contains("Unix socket"), "{err}");

        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = refused(
            parsed("host=h"),
            &PgTls {
                ca_file: Some(empty),
                ..PgTls::default()
            },
        );
        assert!(err.contains("no PEM CERTIFICATE"), "{err}");

        let err = refused(
            parsed("host=h"),
            &PgTls {
                client_cert: Some(ca_file.clone()),
                ..with_ca.clone()
            },
        );
        assert!(err.contains("needs --datastore-client-key"), "{err}");

        // A key that is not the certificate's.
        let other = rcgen::KeyPair::generate().unwrap();
        let key_file = dir.path().join("key.pem");
        std::fs::write(&key_file, other.serialize_pem()).unwrap();
        let err = refused(
            parsed("host=h"),
            &PgTls {
                client_cert: Some(ca_file),
                client_key: Some(key_file),
                ..with_ca
            },
        );
        assert!(err.contains("--datastore-client-key"), "{err}");
    }

    #[test]
    fn only_loopback_and_unix_sockets_are_local() {
        assert!(is_local(&parsed("host=/run/postgresql")));
        assert!(is_local(&parsed("host=127.0.0.1")));
        assert!(is_local(&parsed("host=localhost,::1")));
        assert!(!is_local(&parsed("host=127.0.0.1,db.example")));
        assert!(!is_local(&parsed("host=10.0.0.5")));
        assert!(!is_local(&parsed("host=localhost hostaddr=203.0.113.5")));
        assert!(!is_local(&parsed("hostaddr=203.0.113.5")));
        assert!(is_local(&parsed("host=db.example hostaddr=127.0.0.1")));
        assert!(!is_local(&parsed("user=b")));
    }
}
