//! Real Redis topologies for the connection-mode tests: a TLS server with
//! certificates made here, a three-primary Cluster, a primary behind one
//! Sentinel. Free ports, temp dirs, killed on drop; readiness is polled.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
};

use super::{free_port, ping};

/// A child process killed (and reaped) on drop.
pub struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(program: &str, args: &[String]) -> Proc {
    Proc(
        Command::new(program)
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{program} on PATH: {e}")),
    )
}

fn poll(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn base_args(port: u16, dir: &Path) -> Vec<String> {
    vec![
        "--port".into(),
        port.to_string(),
        "--bind".into(),
        "127.0.0.1".into(),
        "--save".into(),
        String::new(),
        "--appendonly".into(),
        "no".into(),
        "--dir".into(),
        dir.display().to_string(),
    ]
}

/// `redis-cli -p port args…` over plain TCP.
pub fn cli(port: u16, args: &[&str]) -> Output {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .expect("redis-cli on PATH")
}

fn cli_text(port: u16, args: &[&str]) -> String {
    String::from_utf8_lossy(&cli(port, args).stdout).into_owned()
}

/// A private CA with a server certificate for 127.0.0.1/localhost and a
/// client certificate, plus an unrelated CA; all PEM files in a temp dir.
pub struct TlsFiles {
    pub dir: tempfile::TempDir,
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here.
    pub other_ca: PathBuf,
}

fn ca(name: &str) -> (CertificateParams, KeyPair, String) {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let pem = p.self_signed(&key).unwrap().pem();
    (p, key, pem)
}

impl TlsFiles {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = |n: &str| dir.path().join(n);
        let write = |n: &str, s: &str| std::fs::write(path(n), s).unwrap();

        let (ca_params, ca_key, ca_pem) = ca("baton test redis CA");
        write("ca.pem", &ca_pem);
        let issuer = Issuer::new(ca_params, ca_key);

        let mut sp = CertificateParams::new(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
        sp.distinguished_name.push(DnType::CommonName, "redis");
        sp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let sk = KeyPair::generate().unwrap();
        write("server.pem", &sp.signed_by(&sk, &issuer).unwrap().pem());
        write("server.key", &sk.serialize_pem());

        let mut cp = CertificateParams::new(Vec::<String>::new()).unwrap();
        cp.distinguished_name.push(DnType::CommonName, "baton");
        cp.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let ck = KeyPair::generate().unwrap();
        write("client.pem", &cp.signed_by(&ck, &issuer).unwrap().pem());
        write("client.key", &ck.serialize_pem());

        let (_, _, other) = ca("unrelated CA");
        write("other-ca.pem", &other);

        Self {
            ca: path("ca.pem"),
            server_cert: path("server.pem"),
            server_key: path("server.key"),
            client_cert: path("client.pem"),
            client_key: path("client.key"),
            other_ca: path("other-ca.pem"),
            dir,
        }
    }
}

/// A redis-server that only speaks TLS (`--port 0 --tls-port …`).
pub struct TlsRedis {
    pub port: u16,
    _dir: tempfile::TempDir,
    _proc: Proc,
}

impl TlsRedis {
    /// `auth_clients`: `no`, `optional` or `yes` (client certificates);
    /// `extra`: more `redis-server` arguments.
    pub fn start(files: &TlsFiles, auth_clients: &str, extra: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let mut args = base_args(0, dir.path());
        args.extend(
            [
                "--tls-port",
                &port.to_string(),
                "--tls-cert-file",
                &files.server_cert.display().to_string(),
                "--tls-key-file",
                &files.server_key.display().to_string(),
                "--tls-ca-cert-file",
                &files.ca.display().to_string(),
                "--tls-auth-clients",
                auth_clients,
            ]
            .map(str::to_owned),
        );
        args.extend(extra.iter().map(|a| a.to_string()));
        let proc = spawn("redis-server", &args);
        // Redis accepts connections once it is ready to serve them.
        poll("TLS redis-server listening", 10, || {
            std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
        });
        Self {
            port,
            _dir: dir,
            _proc: proc,
        }
    }

    pub fn url(&self, userinfo: &str) -> String {
        format!("rediss://{userinfo}127.0.0.1:{}/", self.port)
    }
}

/// Three primaries, no replicas, all slots assigned.
pub struct RedisCluster {
    pub ports: Vec<u16>,
    _procs: Vec<Proc>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut ports = Vec::new();
        let mut procs = Vec::new();
        for i in 0..3 {
            let port = free_port();
            // The bus port is given explicitly: port + 10000 may be taken
            // or out of range.
            let bus = free_port();
            let mut args = base_args(port, dir.path());
            args.extend(
                [
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    &format!("nodes-{i}.conf"),
                    "--cluster-port",
                    &bus.to_string(),
                    "--cluster-node-timeout",
                    "5000",
                ]
                .map(str::to_owned),
            );
            procs.push(spawn("redis-server", &args));
            ports.push(port);
        }
        for &p in &ports {
            poll("cluster node answers PING", 10, || ping(p));
        }
        let nodes: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create").args(&nodes).args([
            "--cluster-replicas",
            "0",
            "--cluster-yes",
        ]);
        let out = create.output().expect("redis-cli on PATH");
        assert!(
            out.status.success(),
            "cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for &p in &ports {
            poll("cluster_state:ok on every node", 20, || {
                cli_text(p, &["CLUSTER", "INFO"]).contains("cluster_state:ok")
            });
        }
        Self {
            ports,
            _procs: procs,
            _dir: dir,
        }
    }

    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// The port of the node that serves `key`'s slot.
    pub fn owner_of(&self, key: &str) -> u16 {
        let slot: u16 = cli_text(self.ports[0], &["CLUSTER", "KEYSLOT", key])
            .trim()
            .parse()
            .unwrap();
        *self
            .ports
            .iter()
            .find(|&&p| {
                cli_text(p, &["CLUSTER", "COUNTKEYSINSLOT", &slot.to_string()]).trim() != "0"
            })
            .expect("a node holds the slot's keys")
    }

    /// `DBSIZE` of the node on `port`.
    pub fn dbsize(&self, port: u16) -> u64 {
        cli_text(port, &["DBSIZE"]).trim().parse().unwrap()
    }
}

/// A primary (plain redis-server) watched by one sentinel as `master`.
pub struct Sentinel {
    pub primary: super::RedisServer,
    pub port: u16,
    pub master: &'static str,
    _dir: tempfile::TempDir,
    _proc: Proc,
}

impl Sentinel {
    pub fn start() -> Self {
        let primary = super::RedisServer::start();
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let master = "mymaster";
        let conf = dir.path().join("sentinel.conf");
        // Sentinel rewrites its configuration file, so it lives in the temp dir.
        std::fs::write(
            &conf,
            format!(
                "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {master} 127.0.0.1 {} 1\nsentinel down-after-milliseconds {master} 5000\n",
                dir.path().display(),
                primary.port
            ),
        )
        .unwrap();
        let proc = spawn(
            "redis-server",
            &[conf.display().to_string(), "--sentinel".into()],
        );
        poll("sentinel names the primary", 10, || {
            cli_text(port, &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", master])
                .contains(&primary.port.to_string())
        });
        Self {
            primary,
            port,
            master,
            _dir: dir,
            _proc: proc,
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}
