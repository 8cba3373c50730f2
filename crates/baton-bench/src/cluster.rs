//! An in-process broker (in-memory stores, loopback port, admin socket in a
//! temp dir) and the admin and node calls the benchmarks need.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use baton_broker::{BrokerConfig, BrokerReady, LogIssuance};
use baton_ca::{TrustBundle, WorkloadKey};
use baton_core::api::{JoinTokenRequest, JoinTokenResponse, SignedSvid};
use baton_core::{Entry, NewEntry, SpiffeId, TrustDomain};
use baton_tls::{BundleStore, ClientIdentity, PeerPolicy};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::oneshot;

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
