//! Starts real `baton` processes in a temp dir and talks to them the way an
//! operator and a workload would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const TD: &str = "example.org";

pub fn baton() -> Command {
    Command::new(env!("CARGO_BIN_EXE_baton"))
}

/// The time on the line of `text` that starts with `label`, printed for
/// people: RFC 3339 followed by how far from now ("(in …)" or "(… ago)"),
/// never unix seconds. Returns it as unix seconds.
pub fn time_for_people(text: &str, label: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no line {label:?} in: {text}"));
    let rest = line.trim_start()[label.len()..].trim();
    let (stamp, rel) = rest
        .split_once(' ')
        .unwrap_or_else(|| panic!("{label} has no relative time: {line}"));
    assert!(
        rel.starts_with("(in ") || rel.ends_with(" ago)"),
        "{label} says how far from now: {line}"
    );
    let at = humantime::parse_rfc3339(stamp)
        .unwrap_or_else(|e| panic!("{label} {stamp} is not RFC 3339: {e}: {text}"));
    at.duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

/// Polls `f` until it returns Some, or panics with `what` at the deadline.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

pub async fn wait_for_async<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A child process killed when dropped.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub name: &'static str,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &'static str, cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        Self::spawn_to(name, cmd, log, out)
    }

    /// `spawn`, appending to `log` (a restarted process keeps the earlier
    /// run's lines).
    pub fn spawn_appending(name: &'static str, cmd: Command, log: PathBuf) -> Self {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        Self::spawn_to(name, cmd, log, out)
    }

    fn spawn_to(name: &'static str, mut cmd: Command, log: PathBuf, out: std::fs::File) -> Self {
        let child = cmd
            .env("BATON_LOG", "info,baton_agent=debug,baton_broker=debug")
            .stdout(Stdio::null())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Self { child, name, log }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let status = wait_for("process exit", Duration::from_secs(20), || {
            self.child.try_wait().ok().flatten()
        });
        assert!(
            status.success(),
            "{} exited with {status}: {}",
            self.name,
            self.log_text()
        );
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// How a cluster's broker is started: its directory (data, admin socket,
/// ready file and log) and arguments.
#[derive(Debug, Clone)]
pub struct BrokerSpec {
    pub dir: PathBuf,
    pub args: Vec<String>,
    pub agent_svid_ttl: String,
}

impl BrokerSpec {
    /// Starts the broker on `listen` and waits for its ready file; returns
    /// it and its address. With `append`, the log keeps the earlier runs'
    /// lines.
    pub fn spawn(&self, listen: &str, append: bool) -> (Proc, String) {
        let ready = self.dir.join("broker.addr");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = baton();
        cmd.args([
            "broker",
            "--trust-domain",
            TD,
            "--listen",
            listen,
            "--agent-svid-ttl",
            &self.agent_svid_ttl,
            "--dev-issuer",
        ])
        .args(&self.args)
        .arg("--data-dir")
        .arg(self.dir.join("broker"))
        .arg("--admin-socket")
        .arg(self.dir.join("admin.sock"))
        .arg("--ready-file")
        .arg(&ready);
        let log = self.dir.join("broker.log");
        let mut p = if append {
            Proc::spawn_appending("broker", cmd, log)
        } else {
            Proc::spawn("broker", cmd, log)
        };
        let addr = wait_for("broker ready file", Duration::from_secs(60), || {
            assert!(p.is_running(), "broker exited: {}", p.log_text());
            std::fs::read_to_string(&ready).ok()
        });
        (p, addr)
    }
}

/// A broker + one agent in a temp dir.
#[derive(Debug)]
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub broker: Option<Proc>,
    pub agent: Option<Proc>,
    pub broker_addr: String,
    pub node_id: String,
    broker_args: Vec<String>,
    /// Extra arguments for `baton agent` (e.g. `--ops-listen ADDR`).
    pub agent_args: Vec<String>,
}

pub struct Options {
    pub agent_svid_ttl: &'static str,
    pub start_agent: bool,
    /// Extra arguments for `baton broker` (e.g. `--redis URL`).
    pub broker_args: Vec<String>,
    /// Extra arguments for `baton agent`.
    pub agent_args: Vec<String>,
    /// Extra arguments for the example tool server (`World` only).
    pub tool_args: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            agent_svid_ttl: "1h",
            start_agent: true,
            broker_args: Vec::new(),
            agent_args: Vec::new(),
            tool_args: Vec::new(),
        }
    }
}

/// A throwaway redis-server on a free port, keeping nothing on disk.
#[derive(Debug)]
pub struct Redis {
    pub proc: Proc,
    pub port: u16,
    pub url: String,
    dir: tempfile::TempDir,
}

impl Redis {
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("baton-redis")
            .tempdir()
            .unwrap();
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let proc = Self::spawn(dir.path(), port);
        Redis {
            proc,
            port,
            url: format!("redis://127.0.0.1:{port}"),
            dir,
        }
    }

    fn spawn(dir: &Path, port: u16) -> Proc {
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(dir);
        let p = Proc::spawn("redis", cmd, dir.join("redis.log"));
        wait_for("redis-server up", Duration::from_secs(30), || {
            Self::cli_at(port, &["ping"]).contains("PONG").then_some(())
        });
        p
    }

    fn cli_at(port: u16, args: &[&str]) -> String {
        Command::new("redis-cli")
            .args(["-p", &port.to_string()])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> String {
        Self::cli_at(self.port, args)
    }

    /// Stops the server (its data is gone: nothing is kept on disk).
    pub fn stop(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    /// Starts an empty server again on the same port.
    pub fn restart(&mut self) {
        self.stop();
        self.proc = Self::spawn(self.dir.path(), self.port);
    }
}

impl Cluster {
    /// `start` with extra `baton broker` arguments after the subcommand.
    pub fn start_with_broker_args(mut opts: Options, args: Vec<String>) -> Self {
        opts.broker_args = args;
        Self::start(opts)
    }

    pub fn start(opts: Options) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("baton-e2e")
            .tempdir()
            .unwrap();
        let mut c = Cluster {
            dir,
            broker: None,
            agent: None,
            broker_addr: String::new(),
            node_id: String::new(),
            broker_args: Vec::new(),
            agent_args: opts.agent_args.clone(),
        };
        c.broker_args = opts.broker_args.clone();
        c.start_broker("127.0.0.1:0", opts.agent_svid_ttl);
        if opts.start_agent {
            let token = c.join_token(None);
            c.start_agent(&token);
        }
        c
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.path("admin.sock")
    }

    pub fn agent_socket(&self) -> PathBuf {
        self.path("agent.sock")
    }

    pub fn endpoint(&self) -> String {
        format!("unix:{}", self.agent_socket().display())
    }

    pub fn start_broker(&mut self, listen: &str, agent_svid_ttl: &str) {
        let spec = self.broker_spec(agent_svid_ttl);
        let (p, addr) = spec.spawn(listen, false);
        self.broker_addr = addr;
        self.broker = Some(p);
    }

    /// What starts this cluster's broker again, from another thread.
    pub fn broker_spec(&self, agent_svid_ttl: &str) -> BrokerSpec {
        BrokerSpec {
            dir: self.dir.path().to_owned(),
            args: self.broker_args.clone(),
            agent_svid_ttl: agent_svid_ttl.to_owned(),
        }
    }

    /// Runs `baton <args>` against this cluster's admin socket.
    pub fn cli(&self, args: &[&str]) -> Output {
        baton()
            .args(args)
            .env("BATON_ADMIN_SOCKET", self.admin_socket())
            .output()
            .unwrap()
    }

    pub fn cli_ok(&self, args: &[&str]) -> String {
        let out = self.cli(args);
        assert!(
            out.status.success(),
            "baton {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn cli_json(&self, args: &[&str]) -> serde_json::Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        serde_json::from_str(&self.cli_ok(&all)).unwrap()
    }

    /// A fresh join token, optionally pinned to a node ID.
    pub fn join_token(&self, node_id: Option<&str>) -> String {
        let mut args = vec!["token", "generate"];
        if let Some(id) = node_id {
            args.extend(["--node-id", id]);
        }
        let v = self.cli_json(&args);
        v["token"].as_str().unwrap().to_owned()
    }

    pub fn agent_command(&self, data_dir: &Path, socket: &Path, token: Option<&str>) -> Command {
        let mut cmd = baton();
        cmd.args(["agent", "--trust-domain", TD, "--sync-interval", "200ms"])
            .arg("--broker-url")
            .arg(format!("https://{}", self.broker_addr))
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--socket")
            .arg(socket)
            .arg("--trust-bundle")
            .arg(self.path("broker/bundle.pem"));
        if let Some(t) = token {
            cmd.arg("--join-token").arg(t);
        }
        cmd
    }

    pub fn start_agent(&mut self, token: &str) {
        let ready = self.path("agent.ready");
        let _ = std::fs::remove_file(&ready);
        let mut cmd = self.agent_command(&self.path("agent"), &self.agent_socket(), Some(token));
        cmd.arg("--ready-file").arg(&ready).args(&self.agent_args);
        let mut p = Proc::spawn("agent", cmd, self.path("agent.log"));
        self.node_id = wait_for("agent ready file", Duration::from_secs(30), || {
            assert!(p.is_running(), "agent exited: {}", p.log_text());
            std::fs::read_to_string(&ready).ok()
        });
        self.agent = Some(p);
    }

    /// A temp dir with nothing running: start the broker and the agent
    /// yourself (e.g. from configuration files) with `run_broker` and
    /// `run_agent`.
    pub fn empty() -> Self {
        Cluster {
            dir: tempfile::Builder::new()
                .prefix("baton-e2e")
                .tempdir()
                .unwrap(),
            broker: None,
            agent: None,
            broker_addr: String::new(),
            node_id: String::new(),
            broker_args: Vec::new(),
            agent_args: Vec::new(),
        }
    }

    /// Spawns `cmd` as this cluster's broker; waits until it writes `ready`
    /// (its address). Its admin socket must be `admin_socket()`.
    pub fn run_broker(&mut self, cmd: Command, ready: &Path) {
        let mut p = Proc::spawn("broker", cmd, self.path("broker.log"));
        self.broker_addr = wait_for("broker ready file", Duration::from_secs(30), || {
            assert!(p.is_running(), "broker exited: {}", p.log_text());
            std::fs::read_to_string(ready).ok()
        });
        self.broker = Some(p);
    }

    /// Spawns `cmd` as this cluster's agent; waits until it writes `ready`
    /// (its node ID). Its socket must be `agent_socket()`.
    pub fn run_agent(&mut self, cmd: Command, ready: &Path) {
        let mut p = Proc::spawn("agent", cmd, self.path("agent.log"));
        self.node_id = wait_for("agent ready file", Duration::from_secs(30), || {
            assert!(p.is_running(), "agent exited: {}", p.log_text());
            std::fs::read_to_string(ready).ok()
        });
        self.agent = Some(p);
    }

    /// Registers an entry for this test process's uid under the agent.
    pub fn register(&self, path: &str, extra: &[&str]) -> serde_json::Value {
        let id = format!("spiffe://{TD}{path}");
        let sel = format!("unix:uid:{}", own_uid());
        let mut args = vec![
            "entry",
            "create",
            "--spiffe-id",
            &id,
            "--parent-id",
            &self.node_id,
            "--selector",
            &sel,
        ];
        args.extend(extra);
        self.cli_json(&args)["entries"][0].clone()
    }
}

pub fn own_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").unwrap().uid()
}

/// The trust domain of a [`Cluster`].
pub fn td() -> baton_core::TrustDomain {
    baton_core::TrustDomain::new(TD).unwrap()
}

/// A TLS client config that trusts `c`'s bundle and accepts only the
/// broker's SPIFFE ID, presenting `identity`.
pub fn broker_tls_config(c: &Cluster, identity: baton_tls::ClientIdentity) -> rustls::ClientConfig {
    use rustls_pki_types::CertificateDer;
    use rustls_pki_types::pem::PemObject;
    baton_tls::install_crypto_provider();
    let bundles = baton_tls::BundleStore::new();
    let anchors = CertificateDer::pem_file_iter(c.path("broker/bundle.pem"))
        .unwrap()
        .map(|c| c.unwrap().to_vec())
        .collect();
    bundles.set(td(), anchors);
    let broker = td().id("/baton/broker").unwrap();
    baton_tls::client_config(
        identity,
        bundles,
        baton_tls::PeerPolicy::Exact(vec![broker]),
    )
    .unwrap()
}

/// An HTTPS client presenting the task credential in `dir` (svid.pem,
/// key.pem), trusting the anchors in `anchors` and only the server `peer`.
pub fn cred_client(dir: &Path, anchors: &Path, peer: baton_core::SpiffeId) -> reqwest::Client {
    use baton_tls::CertificateDer;
    use rustls::pki_types::PrivatePkcs8KeyDer;
    use rustls::pki_types::pem::PemObject;
    baton_tls::install_crypto_provider();
    let chain = CertificateDer::pem_file_iter(dir.join("svid.pem"))
        .unwrap()
        .map(|c| c.unwrap().to_vec())
        .collect();
    let key = PrivatePkcs8KeyDer::from_pem_file(dir.join("key.pem")).unwrap();
    let identity = baton_tls::ClientIdentity::new(chain, key.secret_pkcs8_der()).unwrap();
    let bundles = baton_tls::BundleStore::new();
    let anchors = CertificateDer::pem_file_iter(anchors)
        .unwrap()
        .map(|c| c.unwrap().to_vec())
        .collect();
    bundles.set(peer.trust_domain().clone(), anchors);
    let tls = baton_tls::client_config(identity, bundles, baton_tls::PeerPolicy::Exact(vec![peer]))
        .unwrap();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .build()
        .unwrap()
}
