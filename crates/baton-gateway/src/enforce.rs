//! What every enforcing server runs (the gateway, and `baton example
//! tool-server`): its identity from the Workload API, the broker's JWT
//! keys, a revocation feed (Redis's, or the broker's own), the token
//! verifier for its audience, the tool gate with the call policy, and the
//! durable reporter of each call to the broker.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use baton_core::RiskTier;
use baton_tls::{ClientAuth, PeerPolicy};
use baton_verify::{JwtBundles, PeerCert, Reporter, TokenVerifier, ToolGate};

use crate::GatewayError;
use crate::live::{LiveTls, follow_jwt_bundles};

type Result<T, E = GatewayError> = std::result::Result<T, E>;

/// Where the server learns of revocations.
#[derive(Debug, Clone, Copy)]
pub struct FeedConfig<'a> {
    pub redis: Option<&'a baton_revocation::RedisConfig>,
    pub stale_after: Duration,
    /// Read-only tools keep working while the feed is stale.
    pub read_allows_stale: bool,
    /// Follow no revocations at all (explicit opt-out).
    pub dangerously_skip_revocation: bool,
}

/// How to start an [`Enforcer`].
#[derive(Clone, Copy)]
pub struct EnforcerOptions<'a> {
    /// The Workload API, as `unix:/path`.
    pub endpoint: &'a str,
    /// Which of the process's SVIDs to use (default: the first).
    pub spiffe_id: Option<&'a str>,
    pub broker_url: &'a str,
    /// The audience tokens must name.
    pub audience: &'a str,
    pub spool: &'a Path,
    /// Read-tier answers wait for their record's fsync
    /// ([`ToolGate::with_durable_reads`]).
    pub durable_reads: bool,
    pub feed: FeedConfig<'a>,
    pub policy: &'a Arc<dyn baton_verify::CallPolicy>,
    pub ops: Option<&'a baton_ops::Ops>,
    /// Digests of inputs and outputs are HMAC-SHA256 under this key
    /// (`None`: plain SHA-256).
    pub digest_key: Option<&'a [u8]>,
}

impl std::fmt::Debug for EnforcerOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnforcerOptions")
            .field("endpoint", &self.endpoint)
            .field("spiffe_id", &self.spiffe_id)
            .field("broker_url", &self.broker_url)
            .field("audience", &self.audience)
            .field("spool", &self.spool)
            .field("feed", &self.feed)
            .finish_non_exhaustive()
    }
}

/// The running checks of an enforcing server.
pub struct Enforcer {
    pub live: Arc<LiveTls>,
    /// The broker over mTLS (this server's SVID, the broker's exact ID).
    pub broker: reqwest::Client,
    /// Every broker of the service (`broker-url`, comma separated), the
    /// first one first.
    pub broker_urls: Vec<String>,
    pub verifier: TokenVerifier,
    pub gate: ToolGate,
    pub reporter: baton_verify::Reporter,
    delivery: tokio::task::JoinHandle<()>,
}

impl Enforcer {
    /// POSTs `body` to `path` at the first broker that takes the
    /// connection: a request that may have reached a broker is never sent
    /// to another (it may not be repeatable).
    pub async fn post_once<T: serde::Serialize + ?Sized>(
        &self,
        path: &str,
        body: &T,
    ) -> Result<reqwest::Response, reqwest::Error> {
        let mut last = None;
        for base in &self.broker_urls {
            match self
                .broker
                .post(format!("{base}{path}"))
                .json(body)
                .send()
                .await
            {
                Err(e) if e.is_connect() => last = Some(e),
                other => return other,
            }
        }
        match last {
            Some(e) => Err(e),
            // No URL at all: a request to nowhere fails the same way.
            None => {
                self.broker
                    .post("https://broker.invalid")
                    .json(body)
                    .send()
                    .await
            }
        }
    }
}

impl std::fmt::Debug for Enforcer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enforcer")
            .field("spiffe_id", &self.live.spiffe_id)
            .field("reporter", &self.reporter)
            .finish_non_exhaustive()
    }
}

/// The token verifier, the freshness the gate judges per tier, and the
/// check of peer certificate serials.
type Following = (
    TokenVerifier,
    Option<Arc<dyn baton_verify::RevocationFreshness>>,
    Option<Arc<dyn baton_verify::RevocationCheck>>,
);

impl Enforcer {
    /// Gets the identity, keys and feed, and opens the report spool.
    pub async fn start(o: EnforcerOptions<'_>) -> Result<Self> {
        // The server's own identity and trust come from the Workload API
        // like any workload's, and follow it: rotated SVIDs and bundle
        // changes (a prepared or revoked authority) apply without a restart.
        let live = LiveTls::follow(o.endpoint, o.spiffe_id).await?;
        let td = live.trust_domain.clone();
        let bundles = live.bundles.clone();

        // The broker's JWT keys, fetched over TLS anchored in the X.509 bundle.
        let broker_id = td.id("/baton/broker").map_err(GatewayError::refused)?;
        let tls = baton_tls::client_config(
            live.client.clone(),
            bundles.clone(),
            PeerPolicy::Exact(vec![broker_id.clone()]),
        )
        .map_err(GatewayError::refused)?;
        let http = reqwest::Client::builder()
            // A broker never redirects: an answer that does is final, never
            // followed (with this client's certificate) elsewhere.
            .redirect(reqwest::redirect::Policy::none())
            .tls_backend_preconfigured(tls)
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(15))
            .build()
            .map_err(GatewayError::refused)?;
        let unreachable = |e: reqwest::Error| {
            GatewayError::Unreachable(format!("cannot fetch the broker's bundle: {e}"))
        };
        let broker_urls = baton_verify::broker_urls(o.broker_url).map_err(GatewayError::refused)?;
        // The bundle from the first broker that answers.
        let mut bundle_json: Option<serde_json::Value> = None;
        let mut last = None;
        for base in &broker_urls {
            let fetched = match http
                .get(format!("{base}/v1/bundle"))
                .send()
                .await
                .and_then(|r| r.error_for_status())
            {
                Ok(r) => r.json().await,
                Err(e) => Err(e),
            };
            match fetched {
                Ok(v) => {
                    bundle_json = Some(v);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let bundle_json = match (bundle_json, last) {
            (Some(v), _) => v,
            (None, Some(e)) => return Err(unreachable(e)),
            (None, None) => {
                return Err(GatewayError::Unreachable(
                    "cannot fetch the broker's bundle: no broker URL".into(),
                ));
            }
        };
        let trust = baton_ca::TrustBundle::from_spiffe_json(&td, &bundle_json)
            .map_err(GatewayError::refused)?;
        let jwt_bundles = JwtBundles::new([trust]);
        // JWT key rotations reach the verifier through the Workload API.
        follow_jwt_bundles(o.endpoint, td.clone(), jwt_bundles.clone());
        let (verifier, freshness, serials) =
            follow_revocations(&o, &live, jwt_bundles, broker_id.clone()).await?;

        let sender =
            baton_verify::HttpSender::new(o.broker_url, live.client.clone(), bundles, broker_id)
                .map_err(|e| GatewayError::Refused(format!("tool-call reporter: {e}")))?;
        let reporter = baton_verify::Reporter::open(o.spool, Arc::new(sender))
            .map_err(|e| GatewayError::Refused(format!("tool-call reporter: {e}")))?;
        let delivery = reporter.spawn();
        if let Some(ops) = o.ops {
            spool_ops(ops, &reporter);
        }
        let mut gate = ToolGate::new(o.policy.clone(), Some(reporter.clone()))
            .with_durable_reads(o.durable_reads);
        if let Some(key) = o.digest_key {
            gate = gate.with_digest_key(key);
        }
        if let Some(f) = freshness {
            gate = gate.with_revocation_freshness(f, o.feed.read_allows_stale);
        }
        if let Some(check) = serials {
            gate = gate.with_revocation(check);
        }
        Ok(Self {
            live,
            broker: http,
            broker_urls,
            verifier,
            gate,
            reporter,
            delivery,
        })
    }

    /// The mTLS server configuration: a client certificate of the trust
    /// domain is required; the SVID and bundle follow the Workload API.
    pub fn server_config(&self) -> Result<Arc<baton_tls::rustls::ServerConfig>> {
        baton_tls::server_config(
            self.live.server.clone(),
            self.live.bundles.clone(),
            PeerPolicy::AnyInTrustDomains(vec![self.live.trust_domain.clone()]),
            ClientAuth::Required,
        )
        .map_err(GatewayError::refused)
    }

    /// Reports a refused token under the task it names, if this server's
    /// keys signed it (a real token presented by the wrong holder, revoked,
    /// or over another certificate); the reason says it was refused. A
    /// token whose signature does not verify is only logged here: its
    /// claims name whatever task its forger likes, and recording them
    /// would let anyone fill a task's trace (the broker does the same with
    /// refused hops).
    pub fn report_refused_token(&self, refused: RefusedToken<'_>) {
        let RefusedToken {
            token,
            peer,
            tool,
            resource,
            risk,
            input,
            now,
            err,
            traceparent,
        } = refused;
        let Some(claims) = unverified_claims(token) else {
            tracing::warn!(peer = %peer.spiffe_id(), reason = err.code(), "unparseable token refused");
            return;
        };
        let Some(task_id) = self.verifier.signed_task_unbound(token, now) else {
            tracing::warn!(peer = %peer.spiffe_id(), reason = err.code(), error = %err, "token refused (not one the broker signed, or expired): not reported under the task it claims");
            return;
        };
        let report = baton_core::api::ToolCallReport {
            report_id: uuid::Uuid::new_v4().to_string(),
            task_id,
            token_jti: claims["jti"].as_str().unwrap_or_default().to_owned(),
            agent: peer.spiffe_id().clone(),
            tool: tool.to_owned(),
            // A resource the log cannot keep is named by its size only.
            resource: baton_core::report_bounds::recordable_resource(resource),
            risk,
            scope_used: Vec::new(),
            input_digest: self.gate.digest(input.unwrap_or_default()),
            output_digest: None,
            justification: None,
            decision: "deny".into(),
            policy_ids: Vec::new(),
            reason: Some(format!(
                "token refused ({}): {err}; signed by the broker, refused for this holder{}",
                err.code(),
                if input.is_none() {
                    "; the request's body was not read"
                } else {
                    ""
                }
            )),
            at: now,
            latency_ms: None,
            upstream_status: None,
            recorded: Default::default(),
            traceparent: traceparent.map(|tp| tp.to_string()),
        };
        // Not waited for: the token is refused either way.
        if let Err(e) = self.reporter.enqueue(report) {
            tracing::error!(error = %e, "cannot spool the refusal report");
        }
    }

    /// After the last call: deliver what was spooled within `grace`; what
    /// is left stays in the spool for the next start. Stops following the
    /// Workload API.
    pub async fn finish(self, grace: Duration) {
        self.delivery.abort();
        // Every call taken in queues its last record first (a streamed
        // answer's completes when its stream ends).
        let drained = async {
            self.gate.calls_finished().await;
            // Written before it answers: every record queued so far.
            self.reporter.settle().await;
            let flushed = self.reporter.flush().await;
            if flushed.is_ok() && self.reporter.pending() == 0 {
                // Nothing left to deliver: leave no segment behind.
                self.reporter.settle().await;
            }
            flushed
        };
        match tokio::time::timeout(grace, drained).await {
            Ok(Ok(_)) if self.reporter.pending() == 0 => {
                tracing::info!("tool-call reports delivered");
            }
            Ok(Ok(_)) | Err(_) => tracing::warn!(
                pending = self.reporter.pending(),
                "tool-call reports left in the spool; they are delivered at the next start"
            ),
            Ok(Err(e)) => tracing::warn!(
                error = %e,
                pending = self.reporter.pending(),
                "tool-call reports left in the spool; they are delivered at the next start"
            ),
        }
        self.live.shutdown().await;
    }
}

/// A token the verifier refused, for its report.
#[derive(Debug, Clone, Copy)]
pub struct RefusedToken<'a> {
    pub token: &'a str,
    pub peer: &'a PeerCert,
    pub tool: &'a str,
    pub resource: &'a str,
    pub risk: RiskTier,
    /// The request's body, `None` when it was not read (the gateway
    /// checks the token before it reads a body).
    pub input: Option<&'a [u8]>,
    pub now: u64,
    pub err: &'a baton_verify::TokenError,
    /// The request's W3C trace context, continued by the refusal's record.
    pub traceparent: Option<baton_core::trace_context::TraceParent>,
}

/// The claims of a token that failed verification, read without trusting
/// them, so the refusal can be reported under the task it claims.
fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    use base64::Engine;
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Revocations arrive on a feed and are checked in memory: Redis's when
/// configured, else the broker's own (`GET /v1/revocations/feed`).
/// Staleness is judged per call by the gate (sensitive tiers always fail
/// closed), so the token check itself only looks at actual revocations.
async fn follow_revocations(
    o: &EnforcerOptions<'_>,
    live: &LiveTls,
    jwt_bundles: JwtBundles,
    broker_id: baton_core::SpiffeId,
) -> Result<Following> {
    let audience = o.audience.to_owned();
    Ok(match (o.feed.redis, o.feed.dangerously_skip_revocation) {
        (Some(redis), _) => {
            let handle = baton_revocation::RevocationFeed::spawn_with(
                redis,
                baton_revocation::FeedOptions {
                    stale_after: o.feed.stale_after,
                    allow_stale: true,
                    ..baton_revocation::FeedOptions::default()
                },
            )
            .map_err(GatewayError::refused)?;
            if let Some(ops) = o.ops {
                let h = handle.clone();
                verifier_ops(ops, move |now| {
                    let since = match h.status(now) {
                        baton_revocation::FeedStatus::Fresh => None,
                        baton_revocation::FeedStatus::Stale { since } => Some(since),
                    };
                    FeedProbe {
                        fresh: since.is_none(),
                        silent_for: since.filter(|s| *s > 0).map(|s| now.saturating_sub(s)),
                        revoked_ids: h.len(),
                    }
                });
            }
            (
                TokenVerifier::new(jwt_bundles, audience, Arc::new(handle.clone())),
                Some(Arc::new(handle.clone())),
                Some(Arc::new(handle)),
            )
        }
        (None, false) => {
            let handle = baton_verify::BrokerFeed::spawn(
                o.broker_url,
                live.client.clone(),
                live.bundles.clone(),
                broker_id,
                o.feed.stale_after,
            )
            .map_err(|e| GatewayError::Refused(format!("revocation feed: {e}")))?;
            if !handle.wait_fresh(Duration::from_secs(10)).await {
                tracing::warn!(
                    "the broker's revocation feed has not answered yet; calls are denied until it does"
                );
            }
            if let Some(ops) = o.ops {
                let h = handle.clone();
                verifier_ops(ops, move |now| FeedProbe {
                    fresh: h.is_fresh_at(now),
                    silent_for: h.last_answer().map(|t| now.saturating_sub(t)),
                    revoked_ids: h.len(),
                });
            }
            // The token check answers from the set alone; staleness is the
            // gate's call (per tier).
            let tokens = Arc::new(StaleTolerant(handle.clone()));
            (
                TokenVerifier::new(jwt_bundles, audience, tokens),
                Some(Arc::new(handle.clone())),
                Some(Arc::new(handle)),
            )
        }
        (None, true) => {
            tracing::warn!(
                "dangerously skipping revocation: this server accepts revoked credentials until they expire"
            );
            (
                TokenVerifier::dangerous_without_revocation(jwt_bundles, audience),
                None,
                None,
            )
        }
    })
}

/// What the ops listener reads of a verifier's revocation feed.
struct FeedProbe {
    fresh: bool,
    /// Seconds since the feed last heard from its source, if it did.
    silent_for: Option<u64>,
    revoked_ids: usize,
}

/// The verifier's ops role: readiness is a fresh revocation feed (a stale
/// one refuses sensitive calls), and the feed's gauges.
fn verifier_ops(ops: &baton_ops::Ops, probe: impl Fn(u64) -> FeedProbe + Send + Sync + 'static) {
    let probe = Arc::new(probe);
    ops.add_role(baton_ops::Role::Verifier);
    let check = probe.clone();
    ops.add_check("revocation_feed", move || {
        let p = check(baton_revocation::system_now());
        async move {
            if p.fresh {
                Ok(())
            } else {
                Err(match p.silent_for {
                    Some(s) => format!(
                        "the revocation feed is stale (no news for {s} s): sensitive calls are refused"
                    ),
                    None => "the revocation feed has not been heard from yet: sensitive calls are refused"
                        .to_owned(),
                })
            }
        }
    });
    ops.on_scrape(move || {
        let p = probe(baton_revocation::system_now());
        baton_ops::metrics().verifier_feed(p.fresh, p.silent_for, p.revoked_ids);
    });
}

/// The spool's ops: not ready while its last write failed (sensitive
/// calls are refused then), and its gauges.
fn spool_ops(ops: &baton_ops::Ops, reporter: &Reporter) {
    let check = reporter.clone();
    ops.add_check("audit_spool", move || {
        let up = check.is_healthy();
        async move {
            if up {
                Ok(())
            } else {
                Err(
                    "the last write to the call-report spool failed: sensitive calls are refused"
                        .to_owned(),
                )
            }
        }
    });
    let scrape = reporter.clone();
    ops.on_scrape(move || {
        baton_ops::metrics().verifier_spool(scrape.pending(), scrape.is_healthy());
    });
}

/// The broker feed's set, without its staleness: the gate decides per tier
/// what a stale feed means, and the token check looks only at revocations.
/// But only once there is a set: a follower that never caught up with the
/// broker (started while the feed did not answer) knows of no revocation
/// at all, and refuses everything, as a Redis follower that never synced.
struct StaleTolerant(baton_verify::BrokerFeed);

impl baton_verify::RevocationCheck for StaleTolerant {
    fn is_revoked(&self, id: &str, task: &baton_core::TaskId) -> bool {
        let now = baton_revocation::system_now();
        !self.0.ever_caught_up()
            || baton_revocation::is_denied(|e| self.0.contains(e, now), id, task)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use baton_verify::RevocationCheck;

    /// A gateway whose broker feed never answered (the feed route down at
    /// its start, its bundle route up) holds the empty set it started
    /// with: a reader that tolerates a stale feed (`read-allows-stale`)
    /// must not take that for "nothing is revoked". Before, MCP methods
    /// the gate does not see (`initialize`, `tools/list`, a resource read)
    /// were forwarded for a revoked token. The control, once caught up, is
    /// `gateway::the_gateway_refuses_every_call_once_the_brokers_feed_goes_silent`
    /// (calls allowed before the feed goes silent).
    #[tokio::test]
    async fn a_stale_tolerant_reader_refuses_until_the_feed_has_answered_once() {
        baton_tls::install_crypto_provider();
        let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let identity = baton_tls::ClientIdentity::new(
            vec![cert.cert.der().to_vec()],
            &cert.signing_key.serialize_der(),
        )
        .unwrap();
        // Nothing listens on port 9 of the loopback: the feed never answers.
        let feed = baton_verify::BrokerFeed::spawn(
            "https://127.0.0.1:9",
            identity,
            baton_tls::BundleStore::new(),
            "spiffe://example.org/broker".parse().unwrap(),
            Duration::from_secs(5),
        )
        .unwrap();
        let tolerant = StaleTolerant(feed.clone());
        let task = baton_core::TaskId::from_random([7; 16]);
        assert!(!feed.ever_caught_up());
        assert!(tolerant.is_revoked("jti-never-revoked", &task));
    }
}
