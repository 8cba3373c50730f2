//! Test support (feature `test-support`, and included by this crate's own
//! integration tests): a private PostgreSQL cluster per test.
//!
//! `initdb` into a temporary directory, `postgres` listening on a Unix
//! socket inside it (never the machine's own server), and on 127.0.0.1
//! too, with or without TLS, when asked ([`Pg::start_tcp`]). Binaries come from
//! `BATON_TEST_PG_BINDIR`, `pg_config --bindir` or
//! `/usr/lib/postgresql/<version>/bin`; without them the tests FAIL (CI
//! installs PostgreSQL). Run as root, the cluster runs as the `postgres`
//! system user through `setpriv`, since PostgreSQL refuses to run as root.
//! Only `pg_hba.conf`'s admin user is trusted; leased roles must present
//! their SCRAM password.

// Test support: failing loudly is the point, and it never ships in a binary.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    missing_debug_implementations,
    // This crate's own tests include this file and use part of it.
    dead_code
)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

/// The system user the cluster runs as when the tests run as root.
pub const CLUSTER_USER: &str = "postgres";

pub fn pg_bindir() -> PathBuf {
    let has_bins = |d: &Path| d.join("initdb").is_file() && d.join("postgres").is_file();
    if let Ok(d) = std::env::var("BATON_TEST_PG_BINDIR") {
        let d = PathBuf::from(d);
        assert!(
            has_bins(&d),
            "BATON_TEST_PG_BINDIR={} has no initdb/postgres",
            d.display()
        );
        return d;
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if has_bins(&d) {
            return d;
        }
    }
    let mut candidates: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, d)| has_bins(d))
        .collect();
    candidates.sort();
    match candidates.pop() {
        Some((_, d)) => d,
        None => panic!(
            "PostgreSQL server binaries (initdb, postgres) not found: install PostgreSQL \
             (e.g. `apt-get install postgresql`) or set BATON_TEST_PG_BINDIR. \
             These tests do not skip."
        ),
    }
}

pub fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false)
}

/// How a cluster also listens on TCP (127.0.0.1, its `port`).
#[derive(Clone, Default)]
pub struct Tcp {
    /// PEM files written into the data directory (0600): the server's
    /// certificate chain and key. `None`: `ssl = off`.
    pub tls: Option<ServerTls>,
}

/// The server side of TLS.
#[derive(Clone)]
pub struct ServerTls {
    pub cert_pem: String,
    pub key_pem: String,
    /// With a CA, TCP logins must present a client certificate of it whose
    /// CN is the user name (`hostssl … cert`); without, their SCRAM
    /// password (no role has one unless the test sets it).
    pub client_ca_pem: Option<String>,
}

/// A private cluster; stopped (then killed) on drop.
pub struct Pg {
    dir: tempfile::TempDir,
    bindir: PathBuf,
    as_root: bool,
    child: Child,
    pub port: u16,
}

impl Pg {
    fn command(bindir: &Path, as_root: bool, prog: &str) -> Command {
        if as_root {
            let mut c = Command::new("setpriv");
            c.args([
                "--reuid",
                CLUSTER_USER,
                "--regid",
                CLUSTER_USER,
                "--init-groups",
            ])
            .arg(bindir.join(prog));
            c
        } else {
            Command::new(bindir.join(prog))
        }
    }

    pub async fn start() -> Pg {
        Self::start_with(None).await
    }

    /// A cluster that also listens on 127.0.0.1:`port`: with TLS, plain
    /// TCP is rejected (`hostnossl … reject`); without, plain TCP logins
    /// need their SCRAM password. No TCP login is trusted: another user
    /// of the machine could otherwise log in as the superuser.
    pub async fn start_tcp(tcp: Tcp) -> Pg {
        Self::start_with(Some(tcp)).await
    }

    async fn start_with(tcp: Option<Tcp>) -> Pg {
        let bindir = pg_bindir();
        let as_root = running_as_root();
        let dir = tempfile::Builder::new()
            .prefix("baton-pg")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        let sock = dir.path().join("sock");
        std::fs::create_dir(&sock).unwrap();
        if as_root {
            let st = Command::new("chown")
                .args(["-R", CLUSTER_USER])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(st.success(), "chown of the test cluster directory failed");
        }
        let out = Self::command(&bindir, as_root, "initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "--no-sync",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The admin stays on trust; every other role must present its password.
        let mut hba = "local all postgres trust\nlocal all all scram-sha-256\n".to_owned();
        let mut settings: Vec<String> = vec!["fsync=off".into()];
        match tcp.as_ref().map(|t| &t.tls) {
            None => settings.push("listen_addresses=".into()),
            Some(None) => {
                settings.push("listen_addresses=127.0.0.1".into());
                hba.push_str("host all all 127.0.0.1/32 scram-sha-256\n");
            }
            Some(Some(tls)) => {
                settings.push("listen_addresses=127.0.0.1".into());
                let write = |name: &str, pem: &str| {
                    let path = data.join(name);
                    std::fs::write(&path, pem).unwrap();
                    std::fs::set_permissions(
                        &path,
                        std::os::unix::fs::PermissionsExt::from_mode(0o600),
                    )
                    .unwrap();
                    if as_root {
                        let st = Command::new("chown")
                            .arg(CLUSTER_USER)
                            .arg(&path)
                            .status()
                            .unwrap();
                        assert!(st.success(), "chown of {name} failed");
                    }
                    path
                };
                let cert = write("server.crt", &tls.cert_pem);
                let key = write("server.key", &tls.key_pem);
                settings.push("ssl=on".into());
                settings.push(format!("ssl_cert_file={}", cert.display()));
                settings.push(format!("ssl_key_file={}", key.display()));
                match &tls.client_ca_pem {
                    Some(ca) => {
                        let ca = write("client-ca.crt", ca);
                        settings.push(format!("ssl_ca_file={}", ca.display()));
                        hba.push_str("hostssl all all 127.0.0.1/32 cert\n");
                    }
                    None => hba.push_str("hostssl all all 127.0.0.1/32 scram-sha-256\n"),
                }
                hba.push_str("hostnossl all all 127.0.0.1/32 reject\n");
            }
        }
        std::fs::write(data.join("pg_hba.conf"), hba).unwrap();
        // On the Unix socket, inside our private directory, any port number is
        // free; take one the OS calls free, for TCP too.
        let log_path = dir.path().join("postgres.log");
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let log = std::fs::File::create(&log_path).unwrap();
            let mut child = Self::command(&bindir, as_root, "postgres")
                .arg("-D")
                .arg(&data)
                .arg("-k")
                .arg(&sock)
                .arg("-p")
                .arg(port.to_string())
                .args(settings.iter().flat_map(|kv| ["-c", kv.as_str()]))
                .stdin(Stdio::null())
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .spawn()
                .unwrap();
            let conn = format!(
                "host={} port={port} user=postgres dbname=postgres",
                sock.display()
            );
            let deadline = Instant::now() + Duration::from_secs(60);
            let up = loop {
                if tokio_postgres::connect(&conn, NoTls).await.is_ok() {
                    break true;
                }
                if let Ok(Some(status)) = child.try_wait() {
                    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                    // Another process took the TCP port between our probe
                    // and the server's bind: try another.
                    if tcp.is_some() && attempt < 5 && log.contains("could not bind") {
                        break false;
                    }
                    panic!("postgres exited ({status}): {log}");
                }
                if Instant::now() >= deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!(
                        "postgres did not accept connections within 60s: {}",
                        std::fs::read_to_string(&log_path).unwrap_or_default()
                    );
                }
                tokio::time::sleep(Duration::from_millis(25)).await;
            };
            if up {
                return Pg {
                    dir,
                    bindir,
                    as_root,
                    child,
                    port,
                };
            }
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("postgres.log")).unwrap_or_default()
    }

    pub fn sock(&self) -> String {
        self.dir.path().join("sock").to_string_lossy().into_owned()
    }

    /// The connection string of `user` to `db` over TCP (127.0.0.1).
    pub fn tcp_conn(&self, user: &str, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} dbname={db}", self.port)
    }

    pub fn admin_conn(&self, db: &str) -> String {
        format!(
            "host={} port={} user=postgres dbname={db}",
            self.sock(),
            self.port
        )
    }

    pub async fn admin(&self, db: &str) -> Client {
        connect(&self.admin_conn(db)).await.unwrap()
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        let _ = Self::command(&self.bindir, self.as_root, "pg_ctl")
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "-t", "10", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn connect(conn: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(conn, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}
