//! An in-process broker (in-memory stores, loopback port, admin socket in a
//! temp dir) and the admin and node calls the benchmarks need; an
//! in-process node daemon under it, and Workload API clients.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use baton_agent::{AgentConfig, AgentReady};
use baton_broker::{BrokerConfig, BrokerReady, LogIssuance};
use baton_ca::{TrustBundle, WorkloadKey};
use baton_core::api::{
    JoinTokenRequest, JoinTokenResponse, SignedSvid, StartTaskRequest, StartTaskResponse,
};
use baton_core::{Entry, NewEntry, Purpose, RiskTier, Scope, Secret, SpiffeId, TrustDomain};
use baton_proto::workload::X509svidRequest;
use baton_tls::{BundleStore, ClientIdentity, PeerPolicy};
use hyper_util::rt::TokioIo;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::{Channel, Endpoint};

pub const TRUST_DOMAIN: &str = "bench.test";

/// A running broker; dropping it stops it.
#[derive(Debug)]
pub struct Broker {
    pub ready: BrokerReady,
    admin: reqwest::Client,
    _stop: oneshot::Sender<()>,
    pub dir: tempfile::TempDir,
}

impl Broker {
    /// Starts a task as the dev issuer's alice (group `engineering`) for
    /// `root_agent`: risk ceiling read, an hour, depth 3, tokens for
    /// `audience`.
    pub async fn start_read_task(
        &self,
        root_agent: &SpiffeId,
        purpose: &Purpose,
        scope: &Scope,
        audience: &str,
    ) -> anyhow::Result<StartTaskResponse> {
        let id_token: serde_json::Value = self
            .admin_post(
                "/v1/admin/dev/id-token",
                &serde_json::json!({"user": "alice", "groups": ["engineering"]}),
            )
            .await?;
        let id_token = id_token
            .get("id_token")
            .and_then(|v| v.as_str())
            .context("no id_token in the dev issuer's answer")?;
        self.admin_post(
            "/v1/admin/tasks",
            &StartTaskRequest {
                id_token: Secret::new(id_token),
                root_agent: root_agent.clone(),
                purpose: purpose.clone(),
                scope: scope.clone(),
                risk_ceiling: RiskTier::Read,
                ttl_secs: 3600,
                max_depth: 3,
                audience: vec![audience.into()],
            },
        )
        .await
    }

    pub async fn start() -> anyhow::Result<Self> {
        Self::start_with(TRUST_DOMAIN, |_, _| {}).await
    }

    /// A broker for `trust_domain`, its config adjusted by `configure`
    /// (given the config and the broker's temp dir) before it starts.
    pub async fn start_with(
        trust_domain: &str,
        configure: impl FnOnce(&mut BrokerConfig, &Path),
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let td = TrustDomain::new(trust_domain)?;
        let mut cfg = BrokerConfig::new(td, None, dir.path().join("admin.sock"));
        cfg.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        // The hop benches drive one agent far beyond an honest agent's rate.
        let unlimited = baton_broker::limits::RateLimit {
            burst: std::num::NonZeroU32::MAX,
            per: std::time::Duration::from_secs(1),
        };
        cfg.rate_limits.delegate = unlimited;
        cfg.rate_limits.node_mint = unlimited;
        cfg.rate_limits.approvals = unlimited;
        // The issuance bench signs far more than a node re-signing its
        // entries.
        cfg.rate_limits.x509_svid = unlimited;
        configure(&mut cfg, dir.path());
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(baton_broker::run(
            cfg,
            Arc::new(LogIssuance),
            Some(ready_tx),
            async move {
                let _ = stop_rx.await;
            },
        ));
        let ready = match ready_rx.await {
            Ok(r) => r,
            Err(_) => match task.await {
                Ok(Err(e)) => bail!("broker failed to start: {e}"),
                _ => bail!("broker stopped before it was ready"),
            },
        };
        let admin = reqwest::Client::builder()
            .unix_socket(ready.admin_socket.as_path())
            .build()?;
        Ok(Self {
            ready,
            admin,
            _stop: stop_tx,
            dir,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.ready.trust_domain
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.ready.addr)
    }

    pub async fn admin_post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        body: &Req,
    ) -> anyhow::Result<Resp> {
        let resp = self
            .admin
            .post(format!("http://baton-admin{path}"))
            .json(body)
            .send()
            .await
            .with_context(|| format!("admin {path}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("admin {path}: HTTP {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    pub async fn admin_get<Resp: DeserializeOwned>(&self, path: &str) -> anyhow::Result<Resp> {
        let resp = self
            .admin
            .get(format!("http://baton-admin{path}"))
            .send()
            .await
            .with_context(|| format!("admin {path}"))?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("admin {path}: HTTP {status}: {text}");
        }
        Ok(serde_json::from_str(&text)?)
    }

    pub async fn join_token(&self) -> anyhow::Result<JoinTokenResponse> {
        self.admin_post(
            "/v1/admin/join-tokens",
            &JoinTokenRequest {
                ttl_secs: 600,
                node_id: None,
            },
        )
        .await
    }

    pub async fn create_entry(
        &self,
        path: &str,
        parent: &SpiffeId,
        selector: &str,
    ) -> anyhow::Result<Entry> {
        let new = NewEntry {
            spiffe_id: format!("spiffe://{}{path}", self.trust_domain()),
            parent_id: parent.to_string(),
            selectors: vec![selector.to_owned()],
            x509_ttl_secs: 3600,
            jwt_ttl_secs: 300,
            dns_names: Vec::new(),
        };
        self.admin_post("/v1/admin/entries", &new).await
    }

    /// The trust anchors of the broker's trust domain, for clients.
    pub fn bundles(&self) -> anyhow::Result<BundleStore> {
        let bundle = TrustBundle::from_pem(self.trust_domain(), &self.ready.bundle_pem)?;
        let store = BundleStore::new();
        store.set(self.trust_domain().clone(), bundle.x509_authorities);
        Ok(store)
    }

    /// An HTTPS client for the node port presenting `identity`.
    pub fn node_client(&self, identity: ClientIdentity) -> anyhow::Result<reqwest::Client> {
        let broker_id = self.trust_domain().id("/baton/broker")?;
        let tls = baton_tls::client_config(
            identity,
            self.bundles()?,
            PeerPolicy::Exact(vec![broker_id]),
        )?;
        Ok(reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .no_proxy()
            .build()?)
    }

    /// Registers a node the way an agent does: a join token, then
    /// attestation with a CSR. Returns the node's ID and its mTLS identity.
    pub async fn attest_node(&self) -> anyhow::Result<(SpiffeId, ClientIdentity)> {
        let token = self.join_token().await?;
        let key = WorkloadKey::generate()?;
        let csr = key.csr_der(&token.node_id)?;
        let client = self.node_client(ClientIdentity::none())?;
        let resp = client
            .post(format!("{}/v1/node/attest", self.url()))
            .json(&baton_core::api::AttestRequest {
                join_token: token.token,
                csr_der: csr,
            })
            .send()
            .await?;
        let status = resp.status();
        let text = resp.text().await?;
        if !status.is_success() {
            bail!("attest: HTTP {status}: {text}");
        }
        let svid: SignedSvid = serde_json::from_str(&text)?;
        let identity = ClientIdentity::new(svid.cert_chain_der, key.pkcs8_der())?;
        Ok((svid.spiffe_id, identity))
    }
}

/// An in-process node daemon attested with a join token; dropping it
/// stops it (`stop` also waits for it).
#[derive(Debug)]
pub struct Agent {
    pub ready: AgentReady,
    stop: oneshot::Sender<()>,
    task: JoinHandle<Result<(), baton_agent::AgentError>>,
}

impl Agent {
    /// Starts a daemon for the node of `token` against `broker`, serving
    /// the Workload API on `socket` and syncing every `sync_interval`.
    pub async fn start(
        broker: &Broker,
        token: &JoinTokenResponse,
        socket: PathBuf,
        sync_interval: Duration,
    ) -> anyhow::Result<Self> {
        let mut cfg = AgentConfig::new(
            broker.dir.path().join("agent"),
            socket,
            broker.url(),
            broker.trust_domain().clone(),
        )?;
        cfg.bootstrap_bundle_pem = Some(broker.ready.bundle_pem.clone());
        cfg.join_token = Some(token.token.clone());
        cfg.sync_interval = sync_interval;
        let (ready_tx, ready_rx) = oneshot::channel();
        let (stop, stop_rx) = oneshot::channel::<()>();
        let task = tokio::spawn(baton_agent::run(cfg, Some(ready_tx), async move {
            let _ = stop_rx.await;
        }));
        let ready = match ready_rx.await {
            Ok(r) => r,
            Err(_) => match task.await {
                Ok(Err(e)) => bail!("agent failed to start: {e}"),
                _ => bail!("agent stopped before it was ready"),
            },
        };
        Ok(Self { ready, stop, task })
    }

    /// Stops the daemon and waits until it has.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.task.await;
    }
}

/// A gRPC channel to the Workload API on a Unix socket.
pub async fn connect_uds(path: PathBuf) -> anyhow::Result<Channel> {
    Ok(Endpoint::from_static("http://localhost")
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        }))
        .await?)
}

/// A FetchX509SVID request with the Workload API's security header.
pub fn x509_request() -> tonic::Request<X509svidRequest> {
    let mut req = tonic::Request::new(X509svidRequest {});
    req.metadata_mut().insert(
        "workload.spiffe.io",
        tonic::metadata::MetadataValue::from_static("true"),
    );
    req
}

/// Splits concatenated DER certificates (as the Workload API sends chains
/// and bundles) into one `Vec` per certificate.
pub fn split_der(mut der: &[u8]) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut out = Vec::new();
    while !der.is_empty() {
        let (len, rest) = match der {
            [0x30, n, rest @ ..] if *n < 0x80 => (usize::from(*n), rest),
            [0x30, n, rest @ ..] if (0x81..=0x84).contains(n) => {
                let k = usize::from(n - 0x80);
                let Some(bytes) = rest.get(..k) else {
                    bail!("truncated DER length");
                };
                let len = bytes.iter().fold(0usize, |a, b| (a << 8) | usize::from(*b));
                (len, &rest[k..])
            }
            _ => bail!("not a DER SEQUENCE"),
        };
        let header = der.len() - rest.len();
        let Some(cert) = der.get(..header + len) else {
            bail!("truncated DER certificate");
        };
        out.push(cert.to_vec());
        der = &der[header + len..];
    }
    Ok(out)
}

/// `n` P-256 CSRs, each from a fresh key (the node daemon's cost).
pub fn csr_pool(n: usize, id: &SpiffeId) -> anyhow::Result<Vec<Vec<u8>>> {
    (0..n)
        .map(|_| Ok(WorkloadKey::generate()?.csr_der(id)?))
        .collect()
}

/// The uid of this process (for a `unix:uid:` selector).
pub fn own_uid() -> anyhow::Result<u32> {
    use std::os::unix::fs::MetadataExt;
    Ok(std::fs::metadata(Path::new("/proc/self"))?.uid())
}
