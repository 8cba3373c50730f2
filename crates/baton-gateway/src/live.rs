//! A workload's TLS material from the SPIFFE Workload API, followed live:
//! every rotated SVID and every bundle change (a prepared authority, a
//! revoked one) is swapped into the TLS configuration without a restart,
//! and the JWT bundle reaches a [`baton_verify::JwtBundles`] the same way.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use baton_core::{SpiffeId, TrustDomain};
use baton_tls::{BundleStore, ClientIdentity, ServerIdentity};
use spiffe::X509Source;
use spiffe::x509_source::SvidPicker;

use crate::GatewayError;

type Result<T, E = GatewayError> = std::result::Result<T, E>;

/// Picks the SVID with this SPIFFE ID among those the caller is entitled to.
struct ById(String);

impl SvidPicker for ById {
    fn pick_svid(&self, svids: &[Arc<spiffe::X509Svid>]) -> Option<usize> {
        svids
            .iter()
            .position(|s| s.spiffe_id().to_string() == self.0)
    }
}

/// A workload's TLS material, kept in step with the Workload API.
pub struct LiveTls {
    pub trust_domain: TrustDomain,
    pub spiffe_id: SpiffeId,
    pub server: ServerIdentity,
    pub client: ClientIdentity,
    pub bundles: BundleStore,
    /// When the current SVID expires (unix seconds).
    not_after: AtomicU64,
    source: X509Source,
}

impl std::fmt::Debug for LiveTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveTls")
            .field("spiffe_id", &self.spiffe_id)
            .field("not_after", &self.svid_expires_at())
            .finish_non_exhaustive()
    }
}

/// What one Workload API update carries for us.
struct Material {
    id: SpiffeId,
    chain: Vec<Vec<u8>>,
    key: Vec<u8>,
    td: TrustDomain,
    authorities: Vec<Vec<u8>>,
    not_after: u64,
}

fn material(source: &X509Source) -> Result<Material> {
    let svid = source
        .svid()
        .map_err(|e| GatewayError::Refused(format!("no SVID: {e}")))?;
    let id = SpiffeId::parse(&svid.spiffe_id().to_string())
        .map_err(|e| GatewayError::Refused(format!("SVID: {e}")))?;
    let td = id.trust_domain().clone();
    let chain: Vec<Vec<u8>> = svid
        .cert_chain()
        .iter()
        .map(|c| c.as_bytes().to_vec())
        .collect();
    let key = svid.private_key().as_bytes().to_vec();
    let not_after = chain
        .first()
        .and_then(|leaf: &Vec<u8>| x509_parser::parse_x509_certificate(leaf).ok())
        .map_or(0, |(_, c)| {
            u64::try_from(c.validity().not_after.timestamp()).unwrap_or_default()
        });
    let bundles = source
        .bundle_set()
        .map_err(|e| GatewayError::Refused(format!("no bundle: {e}")))?;
    let sp_td = spiffe::TrustDomain::new(td.as_str()).map_err(GatewayError::refused)?;
    let authorities = bundles
        .get(&sp_td)
        .map(|b| {
            b.authorities()
                .iter()
                .map(|c| c.as_bytes().to_vec())
                .collect()
        })
        .unwrap_or_default();
    Ok(Material {
        id,
        chain,
        key,
        td,
        authorities,
        not_after,
    })
}

impl LiveTls {
    /// Connects to the Workload API at `endpoint` (`unix:/path`) and keeps
    /// following it.
    /// With `want`, uses the SVID with that SPIFFE ID.
    pub async fn follow(endpoint: &str, want: Option<&str>) -> Result<Arc<Self>> {
        let mut builder = X509Source::builder().endpoint(endpoint);
        if let Some(id) = want {
            builder = builder.picker(ById(id.to_owned()));
        }
        let source = builder.build().await.map_err(|e| {
            GatewayError::Unreachable(format!("cannot get an SVID from {endpoint}: {e}"))
        })?;
        let Material {
            id: spiffe_id,
            chain,
            key,
            td: trust_domain,
            authorities,
            not_after,
        } = material(&source)?;
        let bundles = BundleStore::new();
        bundles.set(trust_domain.clone(), authorities);
        let live = Arc::new(Self {
            server: ServerIdentity::new(chain.clone(), &key).map_err(GatewayError::refused)?,
            client: ClientIdentity::new(chain, &key).map_err(GatewayError::refused)?,
            trust_domain,
            spiffe_id,
            bundles,
            not_after: AtomicU64::new(not_after),
            source,
        });
        let follower = live.clone();
        tokio::spawn(async move {
            let mut updates = follower.source.updated();
            while updates.changed().await.is_ok() {
                if let Err(e) = follower.apply() {
                    tracing::warn!(error = %e, "cannot apply a Workload API update; keeping the previous material");
                }
            }
        });
        Ok(live)
    }

    /// When the SVID in use expires (unix seconds; 0 if unreadable).
    pub fn svid_expires_at(&self) -> u64 {
        self.not_after.load(Ordering::Relaxed)
    }

    /// Stops following the Workload API.
    pub async fn shutdown(&self) {
        self.source.shutdown().await;
    }

    fn apply(&self) -> Result<()> {
        let Material {
            id,
            chain,
            key,
            td,
            authorities,
            not_after,
        } = material(&self.source)?;
        if id != self.spiffe_id {
            return Err(GatewayError::Refused(format!(
                "the Workload API now names {id} instead of {}",
                self.spiffe_id
            )));
        }
        // The bundle first: a new SVID may come from an authority the
        // previous bundle did not carry yet.
        self.bundles.set(td, authorities);
        self.server
            .replace(chain.clone(), &key)
            .map_err(GatewayError::refused)?;
        self.client
            .replace(chain, &key)
            .map_err(GatewayError::refused)?;
        self.not_after.store(not_after, Ordering::Relaxed);
        tracing::debug!("TLS material updated from the Workload API");
        Ok(())
    }
}

/// Keeps `target` in step with the Workload API's JWT bundle of `td`
/// (FetchJWTBundles stream), reconnecting with a capped backoff.
pub fn follow_jwt_bundles(endpoint: &str, td: TrustDomain, target: baton_verify::JwtBundles) {
    let endpoint = endpoint.to_owned();
    tokio::spawn(async move {
        let mut failures: u32 = 0;
        loop {
            let mut received = false;
            if let Err(e) = stream_jwt_bundles(&endpoint, &td, &target, &mut received).await {
                tracing::warn!(error = %e, "JWT bundle stream from the Workload API ended; reconnecting");
            }
            // A stream that delivered starts the backoff over: a key
            // revoked after a few reconnects is still picked up at once.
            if received {
                failures = 0;
            }
            failures = failures.saturating_add(1);
            let wait = Duration::from_millis(200u64 << failures.min(6));
            tokio::time::sleep(wait).await;
        }
    });
}

async fn stream_jwt_bundles(
    endpoint: &str,
    td: &TrustDomain,
    target: &baton_verify::JwtBundles,
    received: &mut bool,
) -> Result<()> {
    use futures::StreamExt as _;
    let client = spiffe::WorkloadApiClient::connect_to(endpoint)
        .await
        .map_err(GatewayError::refused)?;
    let mut stream = client
        .stream_jwt_bundles()
        .await
        .map_err(GatewayError::refused)?;
    let sp_td = spiffe::TrustDomain::new(td.as_str()).map_err(GatewayError::refused)?;
    while let Some(set) = stream.next().await {
        let set = set.map_err(GatewayError::refused)?;
        *received = true;
        let Some(bundle) = set.get(&sp_td) else {
            continue;
        };
        let mut keys = Vec::new();
        for a in bundle.jwt_authorities() {
            let mut jwk: serde_json::Value =
                serde_json::from_slice(a.jwk_json()).map_err(GatewayError::refused)?;
            if let Some(obj) = jwk.as_object_mut() {
                obj.entry("use").or_insert_with(|| "jwt-svid".into());
                obj.entry("kid").or_insert_with(|| a.key_id().into());
            }
            keys.push(jwk);
        }
        let doc = serde_json::json!({ "keys": keys });
        match baton_ca::TrustBundle::from_spiffe_json(td, &doc) {
            Ok(b) => {
                target.set(&b);
                tracing::debug!(
                    keys = b.jwt_authorities.len(),
                    "JWT bundle updated from the Workload API"
                );
            }
            Err(e) => {
                tracing::warn!(error = %e, "unusable JWT bundle from the Workload API; keeping the previous one")
            }
        }
    }
    Ok(())
}
