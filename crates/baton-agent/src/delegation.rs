//! Redeeming handoff grants: Baton's `baton.delegation.v1.Delegation`
//! service, served on the same socket and by the same server as the SPIFFE
//! Workload API (a second gRPC service, never new Workload API methods).
//!
//! Place in the flow: an agent that was handed part of a task holds a
//! single-use grant bound to its SPIFFE ID. It calls `Redeem` on its own
//! node daemon, which
//!
//! 1. checks the `workload.spiffe.io: true` header (the same check and
//!    message as the Workload API, so one client setup serves both), then
//!    attests the caller from the socket's peer credential exactly as the
//!    Workload API does;
//! 2. picks the caller's SPIFFE ID among the entries matching its selectors
//!    (the one named in the request, or its only one);
//! 3. generates a fresh P-256 key, sends its CSR with the grant to the
//!    broker (`POST /v1/node/redeem`, node mTLS), and
//! 4. checks the answer (the leaf names that ID, chains to the trust bundle
//!    and certifies the key) before returning the task SVID, its key, the
//!    bundle and the delegation token.
//!
//! Every refusal carries the reason, the broker's own message included, so
//! the agent can tell a spent grant from a wrong target. The grant, the
//! token and the key are never logged.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use baton_ca::WorkloadKey;
use baton_core::api::{ApiError, RedeemRequest, RenewTaskRequest, TaskCredential};
use baton_core::{Secret, SpiffeId};
use baton_proto::delegation::delegation_server::Delegation;
use baton_proto::delegation::{
    RedeemGrantRequest, RedeemGrantResponse, RenewTaskCredentialRequest,
};
use baton_tls::{BundleStore, CertificateDer, PeerPolicy, UnixTime};
use tokio::sync::watch;
use tonic::{Code, Request, Response, Status};

use crate::attest::{AttestedWorkload, Attestor};
use crate::cache::Snapshot;
use crate::client::{BrokerClient, ClientError};
use crate::node::unix_now;
use crate::workload::{NO_IDENTITY, attest_caller};

/// Longest grant accepted from a caller; real grants are far shorter. The
/// bound keeps an oversized string from being forwarded to the broker.
pub const MAX_GRANT_LEN: usize = 4096;

/// Who redeems grants with the broker. The node daemon's implementation is
/// [`BrokerClient`]; tests plug in a fake.
pub trait GrantRedeemer: Send + Sync + 'static {
    /// Redeems `req.grant` for `req.spiffe_id` with the CSR of a fresh key,
    /// continuing the caller's W3C trace when it sent one.
    fn redeem(
        &self,
        req: &RedeemRequest,
        trace: Option<&baton_core::TraceParent>,
    ) -> impl Future<Output = Result<TaskCredential, ClientError>> + Send;

    /// Re-issues a held task credential under the CA's active keys.
    fn renew(
        &self,
        req: &RenewTaskRequest,
    ) -> impl Future<Output = Result<TaskCredential, ClientError>> + Send;
}

impl GrantRedeemer for BrokerClient {
    async fn redeem(
        &self,
        req: &RedeemRequest,
        trace: Option<&baton_core::TraceParent>,
    ) -> Result<TaskCredential, ClientError> {
        BrokerClient::redeem(self, req, trace).await
    }

    async fn renew(&self, req: &RenewTaskRequest) -> Result<TaskCredential, ClientError> {
        BrokerClient::renew_task(self, req).await
    }
}

/// The `Delegation` service.
#[derive(Debug)]
pub struct DelegationService<R> {
    cache: watch::Receiver<Arc<Snapshot>>,
    attestor: Arc<Attestor>,
    broker: Arc<R>,
    /// The trust anchors task SVIDs are checked against before they are
    /// handed out (the broker client's store, kept current by the sync loop).
    bundles: BundleStore,
    /// Redeems and renewals per identity ([`CALLS_PER_ID_BURST`], then
    /// [`CALLS_PER_ID_PER_SEC`] a second).
    budget: std::sync::Mutex<baton_core::budget::Budget<SpiffeId>>,
}

/// Redeems and task renewals one identity (SPIFFE ID) may ask of the
/// broker through this daemon at once, then [`CALLS_PER_ID_PER_SEC`] a
/// second. The broker limits a node's redeems and renewals as a whole
/// (`node-mint`, 6,000 a minute by default): a workload replaying a spent
/// grant would otherwise spend it for every other workload of its node.
/// The share is per identity, not per uid: the pods of a node often all
/// run as one uid.
pub const CALLS_PER_ID_BURST: u32 = 600;
/// See [`CALLS_PER_ID_BURST`].
pub const CALLS_PER_ID_PER_SEC: u32 = 10;

impl<R> DelegationService<R> {
    pub fn new(
        cache: watch::Receiver<Arc<Snapshot>>,
        attestor: Arc<Attestor>,
        broker: Arc<R>,
        bundles: BundleStore,
    ) -> Self {
        Self::with_budget(
            cache,
            attestor,
            broker,
            bundles,
            baton_core::budget::Budget::new(CALLS_PER_ID_BURST, CALLS_PER_ID_PER_SEC),
        )
    }

    /// As [`DelegationService::new`], with another share per identity.
    pub fn with_budget(
        cache: watch::Receiver<Arc<Snapshot>>,
        attestor: Arc<Attestor>,
        broker: Arc<R>,
        bundles: BundleStore,
        budget: baton_core::budget::Budget<SpiffeId>,
    ) -> Self {
        Self {
            cache,
            attestor,
            broker,
            bundles,
            budget: std::sync::Mutex::new(budget),
        }
    }

    /// Takes one redeem or renewal from `id`'s share, before anything is
    /// asked of the broker.
    fn charge(&self, id: &SpiffeId, now: u64) -> Result<(), Status> {
        let mut budget = self
            .budget
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        budget.take(id, now).map_err(|wait| {
            tracing::warn!(spiffe_id = %id, "redeem or renewal refused: the identity asked for too many");
            Status::resource_exhausted(format!(
                "{id} asked this node for more than {} redeems and renewals at once (then {} a second); retry in {wait} s",
                budget.burst(),
                budget.per_sec()
            ))
        })
    }
}

/// Which of the caller's SPIFFE IDs the grant is redeemed for: `wanted` if
/// the caller has it, else its only one.
fn choose_identity(
    snapshot: &Snapshot,
    who: &AttestedWorkload,
    wanted: &str,
) -> Result<SpiffeId, Status> {
    let mut ids: Vec<&SpiffeId> = Vec::new();
    for e in snapshot.entries_for(who) {
        // Two entries may give the same ID; it is still one identity.
        if !ids.contains(&&e.spiffe_id) {
            ids.push(&e.spiffe_id);
        }
    }
    if ids.is_empty() {
        return Err(Status::permission_denied(NO_IDENTITY));
    }
    if !wanted.is_empty() {
        let wanted = SpiffeId::parse(wanted)
            .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?;
        if !ids.contains(&&wanted) {
            return Err(Status::permission_denied(format!(
                "{NO_IDENTITY} for {wanted} to this caller"
            )));
        }
        return Ok(wanted);
    }
    match ids.as_slice() {
        [only] => Ok((*only).clone()),
        several => {
            let names: Vec<&str> = several.iter().map(|id| id.as_str()).collect();
            Err(Status::invalid_argument(format!(
                "the caller has {} identities ({}); set spiffe_id to the one the grant is for",
                several.len(),
                names.join(", ")
            )))
        }
    }
}

fn check_grant(grant: String) -> Result<Secret, Status> {
    if grant.is_empty() {
        return Err(Status::invalid_argument("grant must be specified"));
    }
    if grant.len() > MAX_GRANT_LEN {
        return Err(Status::invalid_argument(format!(
            "grant is longer than {MAX_GRANT_LEN} bytes"
        )));
    }
    Ok(Secret::new(grant))
}

/// The gRPC status for a broker refusal of an HTTP status without a known
/// error code.
fn code_for_http(status: u16) -> Code {
    match status {
        401 | 403 => Code::PermissionDenied,
        400 | 404 | 422 => Code::InvalidArgument,
        // Rate limits and timeouts are worth retrying, like a broker outage.
        408 | 429 => Code::Unavailable,
        400..=499 => Code::FailedPrecondition,
        _ => Code::Unavailable,
    }
}

fn describe(error: &ApiError) -> String {
    match &error.field {
        Some(field) => format!("{error}, field {field}"),
        None => error.to_string(),
    }
}

/// Maps a failed broker call to what the caller sees, always with the reason.
///
/// Refusals about who may redeem (`wrong_target`, `not_entitled`,
/// `grant_used`, `task_ended`) are `PermissionDenied`; refusals of the grant
/// itself (`invalid_argument`, `grant_unknown`, `grant_expired`) are
/// `InvalidArgument`; other 4xx follow the HTTP status; 5xx and an
/// unreachable broker are `Unavailable`.
pub fn redeem_status(e: &ClientError) -> Status {
    match e {
        ClientError::Refused { status, error, .. } => {
            let code = if *status >= 500 {
                Code::Unavailable
            } else {
                match error.code.as_str() {
                    "wrong_target" | "not_entitled" | "grant_used" | "task_ended" => {
                        Code::PermissionDenied
                    }
                    "invalid_argument" | "grant_unknown" | "grant_expired" => Code::InvalidArgument,
                    _ => code_for_http(*status),
                }
            };
            let msg = if code == Code::Unavailable {
                format!(
                    "the broker cannot redeem the grant now: {}",
                    describe(error)
                )
            } else {
                format!("the broker refused the grant: {}", describe(error))
            };
            Status::new(code, msg)
        }
        ClientError::Unexpected { status, .. } => Status::new(
            code_for_http(*status),
            format!("cannot redeem the grant: {e}"),
        ),
        ClientError::Unreachable { .. }
        | ClientError::Tls(_)
        | ClientError::Build(_)
        | ClientError::NoUrl
        | ClientError::BadUrl { .. } => {
            Status::unavailable(format!("cannot redeem the grant: {e}"))
        }
        // The broker accepted the call: the grant may well be spent.
        ClientError::BadAnswer { .. } => Status::internal(format!(
            "cannot redeem the grant: {e}; the grant may have been used"
        )),
    }
}

/// Checks a task credential before it is handed out: it names `wanted`, its
/// chain leads to the trust bundle at `now` (Unix seconds), and its leaf
/// certifies `key`. Returns the reason it is unusable.
fn check_credential(
    cred: &TaskCredential,
    wanted: &SpiffeId,
    key: &WorkloadKey,
    bundles: &BundleStore,
    now: u64,
) -> Result<(), String> {
    if cred.spiffe_id != *wanted {
        return Err(format!("it is for {} instead of {wanted}", cred.spiffe_id));
    }
    let chain: Vec<CertificateDer<'_>> = cred
        .cert_chain_der
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Err("its certificate chain is empty".into());
    };
    baton_tls::verify_svid(
        leaf,
        intermediates,
        bundles,
        &PeerPolicy::Exact(vec![wanted.clone()]),
        UnixTime::since_unix_epoch(Duration::from_secs(now)),
    )
    .map_err(|e| format!("its X509-SVID does not verify: {e}"))?;
    baton_tls::ClientIdentity::new(cred.cert_chain_der.clone(), key.pkcs8_der())
        .map_err(|e| format!("its X509-SVID does not certify the key sent: {e}"))?;
    Ok(())
}

#[tonic::async_trait]
impl<R: GrantRedeemer> Delegation for DelegationService<R> {
    async fn redeem(
        &self,
        request: Request<RedeemGrantRequest>,
    ) -> Result<Response<RedeemGrantResponse>, Status> {
        let who = attest_caller(&self.attestor, &request).await?;
        // The caller's trace, passed on to the broker (a malformed one is
        // dropped: it must not cost the caller its grant).
        let trace = request
            .metadata()
            .get(baton_core::trace_context::TRACEPARENT_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<baton_core::TraceParent>().ok());
        let RedeemGrantRequest { grant, spiffe_id } = request.into_inner();
        let (spiffe_id, bundle) = {
            let snapshot = Arc::clone(&self.cache.borrow());
            let id = choose_identity(&snapshot, &who, &spiffe_id)?;
            self.charge(&id, unix_now())?;
            // Checked before the broker call: a grant is single-use, so
            // nothing that can fail locally should come after spending it.
            let bundle = snapshot
                .bundle()
                .cloned()
                .ok_or_else(|| Status::unavailable("the node has no trust bundle yet"))?;
            (id, bundle)
        };
        let grant = check_grant(grant)?;

        let key = WorkloadKey::generate()
            .map_err(|e| Status::internal(format!("cannot generate a key: {e}")))?;
        let csr_der = key
            .csr_der(&spiffe_id)
            .map_err(|e| Status::internal(format!("cannot make a CSR: {e}")))?;
        let req = RedeemRequest {
            grant,
            spiffe_id: spiffe_id.clone(),
            csr_der,
        };
        let cred = self
            .broker
            .redeem(&req, trace.as_ref())
            .await
            .map_err(|e| {
                tracing::warn!(
                    uid = who.uid(),
                    pid = ?who.pid(),
                    spiffe_id = %spiffe_id,
                    error = %e,
                    "grant redemption failed"
                );
                redeem_status(&e)
            })?;
        if let Err(reason) = check_credential(&cred, &spiffe_id, &key, &self.bundles, unix_now()) {
            tracing::error!(
                task = %cred.task_id,
                spiffe_id = %spiffe_id,
                %reason,
                "the broker's task credential is unusable"
            );
            return Err(Status::internal(format!(
                "the broker's task credential is unusable: {reason}; the grant is spent"
            )));
        }
        tracing::info!(
            task = %cred.task_id,
            spiffe_id = %spiffe_id,
            uid = who.uid(),
            pid = ?who.pid(),
            expires_at = cred.expires_at,
            "grant redeemed; task credential issued"
        );
        // The freshest bundle, in case the CA rotated during the call.
        let bundle = self.cache.borrow().bundle().cloned().unwrap_or(bundle);
        Ok(Response::new(RedeemGrantResponse {
            task_id: cred.task_id.as_str().to_owned(),
            spiffe_id: cred.spiffe_id.to_string(),
            x509_svid: cred.cert_chain_der.concat(),
            x509_svid_key: key.pkcs8_der().to_vec(),
            bundle: bundle.x509_der.clone(),
            token: cred.token.expose().to_owned(),
            expires_at: i64::try_from(cred.expires_at).unwrap_or(i64::MAX),
        }))
    }

    async fn renew(
        &self,
        request: Request<RenewTaskCredentialRequest>,
    ) -> Result<Response<RedeemGrantResponse>, Status> {
        let who = attest_caller(&self.attestor, &request).await?;
        let RenewTaskCredentialRequest {
            token,
            x509_svid_leaf,
            spiffe_id,
            proof,
            proof_iat,
        } = request.into_inner();
        let spiffe_id = {
            let snapshot = Arc::clone(&self.cache.borrow());
            choose_identity(&snapshot, &who, &spiffe_id)?
        };
        self.charge(&spiffe_id, unix_now())?;
        if token.is_empty() || token.len() > 16 * 1024 {
            return Err(Status::invalid_argument(
                "token: empty or longer than 16 KiB",
            ));
        }
        if x509_svid_leaf.is_empty() {
            return Err(Status::invalid_argument("x509_svid_leaf is empty"));
        }
        if proof.is_empty() {
            return Err(Status::invalid_argument(
                "proof is empty: sign the renewal statement with the task credential's key",
            ));
        }
        let proof_iat = u64::try_from(proof_iat)
            .map_err(|_| Status::invalid_argument("proof_iat must not be negative"))?;
        let key = WorkloadKey::generate()
            .map_err(|e| Status::internal(format!("cannot generate a key: {e}")))?;
        let csr_der = key
            .csr_der(&spiffe_id)
            .map_err(|e| Status::internal(format!("cannot make a CSR: {e}")))?;
        let req = RenewTaskRequest {
            token: Secret::new(token),
            spiffe_id: spiffe_id.clone(),
            leaf_der: x509_svid_leaf,
            csr_der,
            proof,
            proof_iat,
        };
        let cred = self.broker.renew(&req).await.map_err(|e| {
            tracing::warn!(spiffe_id = %spiffe_id, error = %e, "task credential renewal failed");
            redeem_status(&e)
        })?;
        if let Err(reason) = check_credential(&cred, &spiffe_id, &key, &self.bundles, unix_now()) {
            return Err(Status::internal(format!(
                "the broker's renewed task credential is unusable: {reason}"
            )));
        }
        tracing::info!(task = %cred.task_id, spiffe_id = %spiffe_id, "task credential renewed");
        let bundle = self
            .cache
            .borrow()
            .bundle()
            .map(|b| b.x509_der.clone())
            .unwrap_or_default();
        Ok(Response::new(RedeemGrantResponse {
            task_id: cred.task_id.as_str().to_owned(),
            spiffe_id: cred.spiffe_id.to_string(),
            x509_svid: cred.cert_chain_der.concat(),
            x509_svid_key: key.pkcs8_der().to_vec(),
            bundle,
            token: cred.token.expose().to_owned(),
            expires_at: i64::try_from(cred.expires_at).unwrap_or(i64::MAX),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::SystemTime;

    use baton_ca::{Ca, CaConfig};
    use baton_core::api::ApiError;
    use baton_core::delegation::TaskId;
    use baton_core::{EntryId, TrustDomain};
    use baton_proto::delegation::delegation_client::DelegationClient;
    use tokio::net::UnixListener;
    use tokio_stream::wrappers::UnixListenerStream;
    use tonic::transport::{Channel, Endpoint};

    use super::*;
    use crate::cache::BundleView;
    use crate::cache::tests::entry;
    use crate::workload::SECURITY_HEADER;

    type Answer =
        Box<dyn Fn(&RedeemRequest, &Ca) -> Result<TaskCredential, ClientError> + Send + Sync>;

    /// A broker that signs with a real in-memory CA, or refuses as told.
    struct FakeBroker {
        ca: Ca,
        answer: Mutex<Answer>,
        calls: Mutex<Vec<RedeemRequest>>,
    }

    impl FakeBroker {
        fn answer(
            &self,
            f: impl Fn(&RedeemRequest, &Ca) -> Result<TaskCredential, ClientError>
            + Send
            + Sync
            + 'static,
        ) {
            *self.answer.lock().unwrap() = Box::new(f);
        }

        fn calls(&self) -> Vec<RedeemRequest> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl GrantRedeemer for FakeBroker {
        async fn redeem(
            &self,
            req: &RedeemRequest,
            _trace: Option<&baton_core::TraceParent>,
        ) -> Result<TaskCredential, ClientError> {
            self.calls.lock().unwrap().push(req.clone());
            (self.answer.lock().unwrap())(req, &self.ca)
        }

        async fn renew(&self, _req: &RenewTaskRequest) -> Result<TaskCredential, ClientError> {
            Err(ClientError::BadAnswer {
                route: "/v1/node/renew-task",
                reason: "not exercised by these tests (see the end-to-end tests)".into(),
            })
        }
    }

    fn task_id() -> TaskId {
        TaskId::from_random([7; 16])
    }

    /// What the real broker does: sign the CSR for the requested ID.
    fn sign(req: &RedeemRequest, ca: &Ca) -> Result<TaskCredential, ClientError> {
        let svid = ca
            .sign_x509_svid(
                &req.csr_der,
                &req.spiffe_id,
                Duration::from_secs(300),
                &[],
                SystemTime::now(),
            )
            .unwrap();
        Ok(TaskCredential {
            task_id: task_id(),
            spiffe_id: req.spiffe_id.clone(),
            cert_chain_der: svid.cert_chain_der,
            token: Secret::new("delegation.token.jws"),
            expires_at: 4_000_000_000,
        })
    }

    fn refused(status: u16, code: &str, message: &str) -> ClientError {
        ClientError::Refused {
            route: "/v1/node/redeem",
            status,
            error: ApiError {
                code: code.into(),
                message: message.into(),
                field: None,
            },
        }
    }

    struct Harness {
        _dir: tempfile::TempDir,
        broker: Arc<FakeBroker>,
        bundle: BundleView,
        client: DelegationClient<Channel>,
    }

    fn my_uid() -> u32 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata("/proc/self").unwrap().uid()
    }

    fn td() -> TrustDomain {
        TrustDomain::new("example.org").unwrap()
    }

    /// The service over a real Unix socket, with `entries` and the fake CA's
    /// bundle (none if `with_bundle` is false) in the snapshot.
    async fn harness(entries: Vec<baton_core::Entry>, with_bundle: bool) -> Harness {
        let budget = baton_core::budget::Budget::new(CALLS_PER_ID_BURST, CALLS_PER_ID_PER_SEC);
        harness_with(entries, with_bundle, budget).await
    }

    /// [`harness`] with `budget` as the share per uid.
    async fn harness_with(
        entries: Vec<baton_core::Entry>,
        with_bundle: bool,
        budget: baton_core::budget::Budget<SpiffeId>,
    ) -> Harness {
        baton_tls::install_crypto_provider();
        baton_ca::init();
        let ca = Ca::load_or_create(CaConfig::new(td()), SystemTime::now()).unwrap();
        let trust = ca.bundle();
        let bundles = BundleStore::new();
        bundles.set(td(), trust.x509_authorities.clone());
        let bundle = BundleView {
            trust_domain: td(),
            x509_der: trust.x509_authorities_concat_der(),
            jwks_json: trust.jwks_json(),
            trust: Arc::new(trust.clone()),
        };
        let (_tx, rx) = watch::channel(Arc::new(Snapshot::new(
            entries,
            with_bundle.then(|| bundle.clone()),
        )));
        let broker = Arc::new(FakeBroker {
            ca,
            answer: Mutex::new(Box::new(sign)),
            calls: Mutex::new(Vec::new()),
        });
        let service = DelegationService::with_budget(
            rx,
            Arc::new(Attestor::new()),
            Arc::clone(&broker),
            bundles,
            budget,
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        tokio::spawn(
            crate::socket_server()
                .add_service(crate::delegation_api(service))
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
        let channel = Endpoint::from_shared(format!("unix:{}", path.display()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Harness {
            _dir: dir,
            broker,
            bundle,
            client: DelegationClient::new(channel),
        }
    }

    fn with_header(grant: &str, spiffe_id: &str) -> Request<RedeemGrantRequest> {
        let mut r = Request::new(RedeemGrantRequest {
            grant: grant.into(),
            spiffe_id: spiffe_id.into(),
        });
        r.metadata_mut()
            .insert(SECURITY_HEADER, "true".parse().unwrap());
        r
    }

    #[tokio::test]
    async fn redeems_for_the_callers_only_identity() {
        let mine = entry("agents/summariser", my_uid());
        let stranger = entry("agents/other", 4_000_000_000);
        let mut h = harness(vec![mine.clone(), stranger], true).await;

        let resp = h
            .client
            .redeem(with_header("grant-1", ""))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.task_id, task_id().as_str());
        assert_eq!(resp.spiffe_id, mine.spiffe_id.as_str());
        assert_eq!(resp.token, "delegation.token.jws");
        assert_eq!(resp.expires_at, 4_000_000_000);
        assert_eq!(resp.bundle, h.bundle.x509_der);
        // The key is a PKCS#8 P-256 key certified by the leaf.
        let key = WorkloadKey::from_pkcs8(&resp.x509_svid_key).unwrap();
        let point = key.public_key_raw();
        assert!(resp.x509_svid.windows(point.len()).any(|w| w == point));

        let calls = h.broker.calls();
        assert_eq!(calls.len(), 1);
        assert_eq!(calls[0].grant.expose(), "grant-1");
        assert_eq!(calls[0].spiffe_id, mine.spiffe_id);

        // Every redemption gets a fresh key.
        let again = h
            .client
            .redeem(with_header("grant-2", mine.spiffe_id.as_str()))
            .await
            .unwrap()
            .into_inner();
        assert_ne!(again.x509_svid_key, resp.x509_svid_key);
        assert_ne!(h.broker.calls()[1].csr_der, calls[0].csr_der);
    }

    /// An identity replaying grants (spent ones cost the broker an audit
    /// event each) gets its share and no more: refused before the broker
    /// is asked, so its node's allowance at the broker stays for the
    /// others.
    #[tokio::test]
    async fn an_identity_gets_its_share_of_redeems_and_no_more() {
        let mine = entry("agents/summariser", my_uid());
        let other = entry("agents/other", my_uid());
        let mut h = harness_with(
            vec![mine.clone(), other.clone()],
            true,
            baton_core::budget::Budget::new(3, 1),
        )
        .await;
        let since = std::time::Instant::now();
        let mut granted = 0u64;
        let refused = loop {
            let grant = format!("g-{granted}");
            match h
                .client
                .redeem(with_header(&grant, mine.spiffe_id.as_str()))
                .await
            {
                Ok(_) => granted += 1,
                Err(status) => break status,
            }
            // One a second comes back while it asks (slowly, if loaded).
            assert!(
                granted <= 3 + since.elapsed().as_secs() + 1,
                "no share per uid: {granted} redeemed"
            );
        };
        assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
        assert!(
            refused.message().contains(mine.spiffe_id.as_str()),
            "{}",
            refused.message()
        );
        assert!(granted >= 3, "{granted}");
        // The refused one never reached the broker.
        assert_eq!(h.broker.calls().len() as u64, granted);
        // Another identity of the node keeps its own share (control).
        h.client
            .redeem(with_header("g-other", other.spiffe_id.as_str()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn header_and_identity_are_checked_before_the_broker() {
        let uid = my_uid();
        let a = entry("agents/a", uid);
        let b = entry("agents/b", uid);
        // A second entry with the same ID does not make a second identity.
        let mut a2 = entry("agents/a", uid);
        a2.id = EntryId::random();
        let mut h = harness(vec![a.clone(), a2, b.clone()], true).await;

        let err = h
            .client
            .redeem(Request::new(RedeemGrantRequest {
                grant: "g".into(),
                spiffe_id: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "security header missing from request");

        let mut twice = with_header("g", a.spiffe_id.as_str());
        twice
            .metadata_mut()
            .append(SECURITY_HEADER, "true".parse().unwrap());
        let err = h.client.redeem(twice).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);

        let err = h.client.redeem(with_header("g", "")).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        for needle in [
            "spiffe_id",
            a.spiffe_id.as_str(),
            b.spiffe_id.as_str(),
            "2 identities",
        ] {
            assert!(err.message().contains(needle), "{}", err.message());
        }

        let err = h
            .client
            .redeem(with_header("g", "spiffe://example.org/agents/c"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains(NO_IDENTITY), "{}", err.message());
        assert!(err.message().contains("spiffe://example.org/agents/c"));

        let err = h
            .client
            .redeem(with_header("g", "not a spiffe id"))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("spiffe_id"), "{}", err.message());

        let err = h
            .client
            .redeem(with_header("", b.spiffe_id.as_str()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("grant"), "{}", err.message());

        let long = "g".repeat(MAX_GRANT_LEN + 1);
        let err = h
            .client
            .redeem(with_header(&long, b.spiffe_id.as_str()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);

        assert!(h.broker.calls().is_empty());

        // Naming one of the caller's identities works.
        let ok = h
            .client
            .redeem(with_header("g", b.spiffe_id.as_str()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.spiffe_id, b.spiffe_id.as_str());
    }

    #[tokio::test]
    async fn caller_without_entry_or_node_without_bundle() {
        let mut h = harness(vec![entry("agents/other", 4_000_000_000)], true).await;
        let err = h.client.redeem(with_header("g", "")).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(err.message(), NO_IDENTITY);

        let mut h = harness(vec![entry("agents/a", my_uid())], false).await;
        let err = h.client.redeem(with_header("g", "")).await.unwrap_err();
        assert_eq!(err.code(), Code::Unavailable);
        assert!(h.broker.calls().is_empty());
    }

    #[tokio::test]
    async fn broker_refusals_reach_the_caller_with_their_reason() {
        let mut h = harness(vec![entry("agents/a", my_uid())], true).await;
        let cases = [
            (403, "wrong_target", Code::PermissionDenied),
            (403, "not_entitled", Code::PermissionDenied),
            (409, "grant_used", Code::PermissionDenied),
            (409, "task_ended", Code::PermissionDenied),
            (404, "grant_unknown", Code::InvalidArgument),
            (410, "grant_expired", Code::InvalidArgument),
            (400, "invalid_argument", Code::InvalidArgument),
            (409, "something_new", Code::FailedPrecondition),
            (503, "unavailable", Code::Unavailable),
        ];
        for (status, code, want) in cases {
            let message = format!("because {code}");
            let m = message.clone();
            h.broker.answer(move |_, _| Err(refused(status, code, &m)));
            let err = h.client.redeem(with_header("g", "")).await.unwrap_err();
            assert_eq!(err.code(), want, "{code}: {}", err.message());
            assert!(err.message().contains(&message), "{}", err.message());
            assert!(err.message().contains(code), "{}", err.message());
            assert!(!err.message().contains("\"g\""));
        }
    }

    #[tokio::test]
    async fn unusable_credential_is_not_handed_out() {
        let mut h = harness(vec![entry("agents/a", my_uid())], true).await;
        // Signed for another ID.
        h.broker.answer(|req, ca| {
            let mut other = req.clone();
            other.spiffe_id = SpiffeId::parse("spiffe://example.org/agents/b").unwrap();
            sign(&other, ca)
        });
        let err = h.client.redeem(with_header("g", "")).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().contains("agents/b"), "{}", err.message());

        // Signed for another key.
        h.broker.answer(|req, ca| {
            let other = WorkloadKey::generate().unwrap();
            let mut req = req.clone();
            req.csr_der = other.csr_der(&req.spiffe_id).unwrap();
            sign(&req, ca)
        });
        let err = h.client.redeem(with_header("g", "")).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().contains("key"), "{}", err.message());

        // Signed by a CA the node does not trust.
        h.broker.answer(|req, _| {
            let rogue = Ca::load_or_create(CaConfig::new(td()), SystemTime::now()).unwrap();
            sign(req, &rogue)
        });
        let err = h.client.redeem(with_header("g", "")).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
        assert!(err.message().contains("verify"), "{}", err.message());

        h.broker.answer(|req, ca| {
            let mut cred = sign(req, ca)?;
            cred.cert_chain_der.clear();
            Ok(cred)
        });
        let err = h.client.redeem(with_header("g", "")).await.unwrap_err();
        assert_eq!(err.code(), Code::Internal);
    }

    #[test]
    fn status_mapping_without_a_json_body() {
        let unexpected = |status| ClientError::Unexpected {
            route: "/v1/node/redeem",
            status,
            body: "<html>".into(),
        };
        assert_eq!(redeem_status(&unexpected(502)).code(), Code::Unavailable);
        assert_eq!(
            redeem_status(&unexpected(403)).code(),
            Code::PermissionDenied
        );
        assert_eq!(redeem_status(&unexpected(429)).code(), Code::Unavailable);
        let bad = ClientError::BadAnswer {
            route: "/v1/node/redeem",
            reason: "missing field `token`".into(),
        };
        assert_eq!(redeem_status(&bad).code(), Code::Internal);
        let mut with_field = refused(400, "invalid_argument", "not a CSR");
        if let ClientError::Refused { error, .. } = &mut with_field {
            error.field = Some("csr_der".into());
        }
        let s = redeem_status(&with_field);
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(s.message().contains("csr_der"), "{}", s.message());
    }

    #[tokio::test]
    async fn unreachable_broker_is_unavailable() {
        baton_tls::install_crypto_provider();
        let client = BrokerClient::new(
            "https://127.0.0.1:1",
            baton_tls::ClientIdentity::none(),
            BundleStore::new(),
            SpiffeId::parse("spiffe://example.org/baton/broker").unwrap(),
        )
        .unwrap();
        let req = RedeemRequest {
            grant: Secret::new("g"),
            spiffe_id: SpiffeId::parse("spiffe://example.org/agents/a").unwrap(),
            csr_der: vec![1, 2, 3],
        };
        let err = GrantRedeemer::redeem(&client, &req, None)
            .await
            .unwrap_err();
        assert!(matches!(err, ClientError::Unreachable { .. }), "{err:?}");
        assert_eq!(redeem_status(&err).code(), Code::Unavailable);
    }

    /// A renewal request longer than the socket's bound is refused from
    /// its length prefix, before the handler attests the caller or reads
    /// a field. Control: the largest legitimate renewal (a 16 KiB token,
    /// a 4 KiB leaf, a proof) passes the bound and reaches the broker.
    #[tokio::test]
    async fn oversized_renewals_are_refused_before_the_handler() {
        let mine = entry("agents/summariser", my_uid());
        let mut h = harness(vec![mine.clone()], true).await;
        let renew = |token: String| {
            let mut r = Request::new(RenewTaskCredentialRequest {
                token,
                x509_svid_leaf: vec![0x30; 4096],
                spiffe_id: mine.spiffe_id.to_string(),
                proof: vec![0x30; 72],
                proof_iat: 1,
            });
            r.metadata_mut()
                .insert(SECURITY_HEADER, "true".parse().unwrap());
            r
        };

        let err = h
            .client
            .renew(renew("t".repeat(1 << 20)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
        assert!(err.message().contains("too large"), "{}", err.message());

        // Untampered: the fake broker's answer to a renewal is the only
        // refusal.
        let err = h
            .client
            .renew(renew("t".repeat(16 * 1024)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Internal, "{err:?}");
        assert!(err.message().contains("not exercised"), "{}", err.message());
    }
}
