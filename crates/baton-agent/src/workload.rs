//! The SPIFFE Workload API, served on the node's Unix socket.
//!
//! Every call first checks the `workload.spiffe.io: true` security header,
//! then attests the caller from the socket's peer credential. The cache only
//! answers for an [`AttestedWorkload`], so there is no unattested path to an
//! SVID. Streams send the caller's full state at once and again whenever a
//! new cache snapshot changes what that caller sees.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use baton_core::{Entry, Secret, SpiffeId};
use baton_proto::workload::spiffe_workload_api_server::SpiffeWorkloadApi;
use baton_proto::workload::{
    JwtBundlesRequest, JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse,
    ValidateJwtsvidRequest, ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse,
    X509svid, X509svidRequest, X509svidResponse,
};
use futures::Stream;
use tokio::sync::watch;
use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use crate::attest::{AttestedWorkload, Attestor};
use crate::cache::{BundleView, Snapshot};

/// The security header every Workload API request must carry.
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// The exact text SPIFFE clients look for to tell "not registered (yet)"
/// from other failures.
pub const NO_IDENTITY: &str = "no identity issued";

/// Most audiences a FetchJWTSVID request may name. The node caches a
/// token per (entry, audience set) and every audience is signed into the
/// token, so a caller choosing many would make each cached token large;
/// real workloads name one or a few.
pub const MAX_JWT_AUDIENCES: usize = 16;
/// Longest audience a FetchJWTSVID request may name, in bytes (a URL or
/// service name; the broker bounds task audiences the same way).
pub const MAX_JWT_AUDIENCE_BYTES: usize = 256;

/// Refuses an audience list the node would not mint for: none, more than
/// [`MAX_JWT_AUDIENCES`] values, or a value that is blank, longer than
/// [`MAX_JWT_AUDIENCE_BYTES`] or holds a control or invisible character
/// (it is signed into the token and shown by whoever inspects it). The
/// count is of the values sent, duplicates included: it is checked before
/// anything else looks at them.
pub(crate) fn check_jwt_audience(audience: &[String]) -> Result<(), Status> {
    if audience.is_empty() {
        return Err(Status::invalid_argument("audience must be specified"));
    }
    if audience.len() > MAX_JWT_AUDIENCES {
        return Err(Status::invalid_argument(format!(
            "audience must list at most {MAX_JWT_AUDIENCES} values, not {}",
            audience.len()
        )));
    }
    for (i, a) in audience.iter().enumerate() {
        if a.trim().is_empty() {
            return Err(Status::invalid_argument(format!(
                "audience[{i}] must not be empty or blank"
            )));
        }
        if a.len() > MAX_JWT_AUDIENCE_BYTES {
            return Err(Status::invalid_argument(format!(
                "audience[{i}] must be at most {MAX_JWT_AUDIENCE_BYTES} bytes, not {}",
                a.len()
            )));
        }
        if a.chars().any(baton_core::text::is_unsafe_to_show) {
            return Err(Status::invalid_argument(format!(
                "audience[{i}] must not hold a control or invisible character: {}",
                baton_core::text::controls_escaped(a)
            )));
        }
    }
    Ok(())
}

/// A validated JWT-SVID.
#[derive(Debug, Clone, PartialEq)]
pub struct JwtClaims {
    pub spiffe_id: SpiffeId,
    pub claims: serde_json::Map<String, serde_json::Value>,
}

/// Where JWT-SVIDs come from and how they are checked. The node daemon's
/// implementation asks the broker (with a cache); tests plug in a fake.
pub trait JwtAuthority: Send + Sync + 'static {
    /// A JWT-SVID for `entry` with this audience, valid at `now` (Unix seconds).
    fn fetch_jwt(
        &self,
        entry: &Entry,
        audience: &[String],
        now: u64,
    ) -> impl Future<Output = Result<Secret, Status>> + Send;

    /// Checks a JWT-SVID against the bundle; the error is a readable reason.
    fn validate_jwt(
        &self,
        token: &str,
        audience: &str,
        bundle: &BundleView,
        now: u64,
    ) -> Result<JwtClaims, String>;
}

/// The Workload API service.
#[derive(Debug)]
pub struct WorkloadService<J> {
    cache: watch::Receiver<Arc<Snapshot>>,
    attestor: Arc<Attestor>,
    jwt: Arc<J>,
}

impl<J> WorkloadService<J> {
    pub fn new(
        cache: watch::Receiver<Arc<Snapshot>>,
        attestor: Arc<Attestor>,
        jwt: Arc<J>,
    ) -> Self {
        Self {
            cache,
            attestor,
            jwt,
        }
    }

    async fn attest<T>(&self, request: &Request<T>) -> Result<AttestedWorkload, Status> {
        attest_caller(&self.attestor, request).await
    }

    /// The caller must be entitled to something at the start of a stream;
    /// a stream whose caller loses every entry ends the same way.
    fn require_identity(&self, who: &AttestedWorkload) -> Result<(), Status> {
        if self.cache.borrow().entries_for(who).next().is_none() {
            return Err(Status::permission_denied(NO_IDENTITY));
        }
        Ok(())
    }
}

/// Checks the security header, then attests the caller from the socket's
/// peer credential. Every service on the node socket starts with this, so
/// they all refuse the same requests with the same errors.
pub(crate) async fn attest_caller<T>(
    attestor: &Arc<Attestor>,
    request: &Request<T>,
) -> Result<AttestedWorkload, Status> {
    check_security_header(request)?;
    let cred = request
        .extensions()
        .get::<UdsConnectInfo>()
        .and_then(|info| info.peer_cred)
        .ok_or_else(|| {
            Status::permission_denied(
                "the caller's credentials are unavailable; call over the node's Unix socket",
            )
        })?;
    let attestor = Arc::clone(attestor);
    let (uid, gid, pid) = (cred.uid(), cred.gid(), cred.pid());
    match tokio::task::spawn_blocking(move || attestor.attest(uid, gid, pid)).await {
        Ok(Ok(who)) => Ok(who),
        Ok(Err(e)) => {
            tracing::warn!(uid, ?pid, error = %e, "workload attestation failed");
            Err(Status::permission_denied(format!(
                "workload attestation failed: {e}"
            )))
        }
        Err(e) => {
            tracing::error!(error = %e, "workload attestation task failed");
            Err(Status::internal("workload attestation failed"))
        }
    }
}

pub(crate) fn check_security_header<T>(request: &Request<T>) -> Result<(), Status> {
    let mut values = request.metadata().get_all(SECURITY_HEADER).iter();
    match (values.next(), values.next()) {
        (Some(v), None) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What one caller sees in one snapshot.
enum View<R> {
    /// Send this (if it differs from what was last sent).
    Ready(R),
    /// Entitled, but the cache is still being filled: wait for a change.
    Pending,
    /// No longer entitled to anything: end with PermissionDenied.
    Denied,
}

type ViewFn<R> = fn(&Snapshot, &AttestedWorkload) -> View<R>;
type BoxStream<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>;

struct StreamState<R> {
    rx: watch::Receiver<Arc<Snapshot>>,
    who: AttestedWorkload,
    view: ViewFn<R>,
    last: Option<R>,
    done: bool,
    _open: baton_ops::metrics::StreamGuard,
}

/// A stream of full-state messages for `who`, one per visible change.
fn watch_stream<R>(
    mut rx: watch::Receiver<Arc<Snapshot>>,
    who: AttestedWorkload,
    view: ViewFn<R>,
    name: &'static str,
) -> BoxStream<R>
where
    R: Clone + PartialEq + Send + Sync + 'static,
{
    rx.mark_changed();
    let state = StreamState {
        rx,
        who,
        view,
        last: None,
        done: false,
        _open: baton_ops::metrics().stream_opened(name),
    };
    Box::pin(futures::stream::unfold(state, |mut st| async move {
        if st.done {
            return None;
        }
        loop {
            if st.rx.changed().await.is_err() {
                // The cache's sender is gone: the daemon is stopping.
                st.done = true;
                return Some((
                    Err(Status::unavailable("the node daemon is shutting down")),
                    st,
                ));
            }
            let snapshot = Arc::clone(&st.rx.borrow_and_update());
            match (st.view)(&snapshot, &st.who) {
                View::Denied => {
                    st.done = true;
                    return Some((Err(Status::permission_denied(NO_IDENTITY)), st));
                }
                View::Ready(r) if st.last.as_ref() != Some(&r) => {
                    st.last = Some(r.clone());
                    return Some((Ok(r), st));
                }
                View::Ready(_) | View::Pending => {}
            }
        }
    }))
}

fn x509_svid_view(snapshot: &Snapshot, who: &AttestedWorkload) -> View<X509svidResponse> {
    if snapshot.entries_for(who).next().is_none() {
        return View::Denied;
    }
    let Some(bundle) = snapshot.bundle() else {
        return View::Pending;
    };
    let svids: Vec<X509svid> = snapshot
        .svids_for(who)
        .map(|s| X509svid {
            spiffe_id: s.entry.spiffe_id.to_string(),
            x509_svid: s.chain_concat(),
            x509_svid_key: s.key.expose().to_vec(),
            bundle: bundle.x509_der.clone(),
            hint: String::new(),
        })
        .collect();
    if svids.is_empty() {
        return View::Pending;
    }
    View::Ready(X509svidResponse {
        svids,
        crl: Vec::new(),
        federated_bundles: HashMap::new(),
    })
}

fn bundle_map(
    snapshot: &Snapshot,
    who: &AttestedWorkload,
    pick: fn(&BundleView) -> &Vec<u8>,
) -> View<HashMap<String, Vec<u8>>> {
    if snapshot.entries_for(who).next().is_none() {
        return View::Denied;
    }
    match snapshot.bundle() {
        None => View::Pending,
        Some(b) => View::Ready(HashMap::from([(
            b.trust_domain.id_string(),
            pick(b).clone(),
        )])),
    }
}

fn x509_bundles_view(snapshot: &Snapshot, who: &AttestedWorkload) -> View<X509BundlesResponse> {
    match bundle_map(snapshot, who, |b| &b.x509_der) {
        View::Ready(bundles) => View::Ready(X509BundlesResponse {
            crl: Vec::new(),
            bundles,
        }),
        View::Pending => View::Pending,
        View::Denied => View::Denied,
    }
}

fn jwt_bundles_view(snapshot: &Snapshot, who: &AttestedWorkload) -> View<JwtBundlesResponse> {
    match bundle_map(snapshot, who, |b| &b.jwks_json) {
        View::Ready(bundles) => View::Ready(JwtBundlesResponse { bundles }),
        View::Pending => View::Pending,
        View::Denied => View::Denied,
    }
}

#[tonic::async_trait]
impl<J: JwtAuthority> SpiffeWorkloadApi for WorkloadService<J> {
    type FetchX509SVIDStream = BoxStream<X509svidResponse>;
    type FetchX509BundlesStream = BoxStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = BoxStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: Request<X509svidRequest>,
    ) -> Result<Response<Self::FetchX509SVIDStream>, Status> {
        let who = self.attest(&request).await?;
        self.require_identity(&who)?;
        tracing::debug!(selectors = ?who.selectors(), "FetchX509SVID stream opened");
        Ok(Response::new(watch_stream(
            self.cache.clone(),
            who,
            x509_svid_view,
            "x509_svid",
        )))
    }

    async fn fetch_x509_bundles(
        &self,
        request: Request<X509BundlesRequest>,
    ) -> Result<Response<Self::FetchX509BundlesStream>, Status> {
        let who = self.attest(&request).await?;
        self.require_identity(&who)?;
        Ok(Response::new(watch_stream(
            self.cache.clone(),
            who,
            x509_bundles_view,
            "x509_bundles",
        )))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: Request<JwtBundlesRequest>,
    ) -> Result<Response<Self::FetchJWTBundlesStream>, Status> {
        let who = self.attest(&request).await?;
        self.require_identity(&who)?;
        Ok(Response::new(watch_stream(
            self.cache.clone(),
            who,
            jwt_bundles_view,
            "jwt_bundles",
        )))
    }

    async fn fetch_jwtsvid(
        &self,
        request: Request<JwtsvidRequest>,
    ) -> Result<Response<JwtsvidResponse>, Status> {
        let who = self.attest(&request).await?;
        let req = request.into_inner();
        check_jwt_audience(&req.audience)?;
        let wanted = if req.spiffe_id.is_empty() {
            None
        } else {
            Some(
                SpiffeId::parse(&req.spiffe_id)
                    .map_err(|e| Status::invalid_argument(format!("spiffe_id: {e}")))?,
            )
        };
        let snapshot = Arc::clone(&self.cache.borrow());
        let mut entries: Vec<&Entry> = Vec::new();
        for e in snapshot.entries_for(&who) {
            let wanted_ok = wanted.as_ref().is_none_or(|w| *w == e.spiffe_id);
            // Two entries may give the same ID; one token per ID is enough.
            if wanted_ok && !entries.iter().any(|x| x.spiffe_id == e.spiffe_id) {
                entries.push(e);
            }
        }
        if entries.is_empty() {
            return Err(Status::permission_denied(match &wanted {
                Some(id) => format!("{NO_IDENTITY} for {id} to this caller"),
                None => NO_IDENTITY.to_owned(),
            }));
        }
        let now = unix_now();
        let mut svids = Vec::with_capacity(entries.len());
        for e in entries {
            let token = self.jwt.fetch_jwt(e, &req.audience, now).await?;
            svids.push(Jwtsvid {
                spiffe_id: e.spiffe_id.to_string(),
                svid: token.expose().to_owned(),
                hint: String::new(),
            });
        }
        Ok(Response::new(JwtsvidResponse { svids }))
    }

    async fn validate_jwtsvid(
        &self,
        request: Request<ValidateJwtsvidRequest>,
    ) -> Result<Response<ValidateJwtsvidResponse>, Status> {
        // Validation hands out nothing secret, so it needs the header but not
        // an entry: any local process may check a token it was given.
        check_security_header(&request)?;
        let req = request.into_inner();
        if req.audience.is_empty() {
            return Err(Status::invalid_argument("audience must be specified"));
        }
        if req.svid.is_empty() {
            return Err(Status::invalid_argument("svid must be specified"));
        }
        let snapshot = Arc::clone(&self.cache.borrow());
        let bundle = snapshot
            .bundle()
            .ok_or_else(|| Status::unavailable("the node has no trust bundle yet"))?;
        let validated = self
            .jwt
            .validate_jwt(&req.svid, &req.audience, bundle, unix_now())
            .map_err(Status::invalid_argument)?;
        Ok(Response::new(ValidateJwtsvidResponse {
            spiffe_id: validated.spiffe_id.to_string(),
            claims: Some(json_object_to_struct(validated.claims)),
        }))
    }
}

fn json_object_to_struct(map: serde_json::Map<String, serde_json::Value>) -> prost_types::Struct {
    prost_types::Struct {
        fields: map
            .into_iter()
            .map(|(k, v)| (k, json_to_value(v)))
            .collect(),
    }
}

fn json_to_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(f64::NAN)),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(json_to_value).collect(),
        }),
        J::Object(o) => Kind::StructValue(json_object_to_struct(o)),
    };
    prost_types::Value { kind: Some(kind) }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use baton_core::TrustDomain;
    use baton_proto::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
    use tokio::net::UnixListener;
    use tokio_stream::wrappers::UnixListenerStream;
    use tonic::Code;
    use tonic::transport::{Channel, Endpoint};

    use super::*;
    use crate::cache::tests::{entry, svid};

    #[derive(Debug)]
    struct FakeJwt;

    impl JwtAuthority for FakeJwt {
        async fn fetch_jwt(
            &self,
            entry: &Entry,
            audience: &[String],
            _now: u64,
        ) -> Result<Secret, Status> {
            Ok(Secret::new(format!(
                "jwt:{}:{}",
                entry.spiffe_id,
                audience.join(",")
            )))
        }

        fn validate_jwt(
            &self,
            token: &str,
            audience: &str,
            _bundle: &BundleView,
            _now: u64,
        ) -> Result<JwtClaims, String> {
            if token != "good" {
                return Err("token signature is invalid".into());
            }
            let mut claims = serde_json::Map::new();
            claims.insert("aud".into(), serde_json::json!([audience]));
            claims.insert("exp".into(), serde_json::json!(123));
            Ok(JwtClaims {
                spiffe_id: SpiffeId::parse("spiffe://example.org/a").unwrap(),
                claims,
            })
        }
    }

    /// Mints a distinct token on every call and caches it in the node's
    /// [`crate::cache::JwtCache`] as the daemon does, so that a test sees
    /// which requests reached the minting step and which were served from
    /// the cache.
    #[derive(Debug, Default)]
    struct CachingFakeJwt {
        cache: std::sync::Mutex<crate::cache::JwtCache>,
        minted: std::sync::atomic::AtomicUsize,
    }

    impl CachingFakeJwt {
        fn minted(&self) -> usize {
            self.minted.load(std::sync::atomic::Ordering::SeqCst)
        }

        fn cached(&self) -> usize {
            self.cache.lock().unwrap().len()
        }
    }

    impl JwtAuthority for CachingFakeJwt {
        async fn fetch_jwt(
            &self,
            entry: &Entry,
            audience: &[String],
            now: u64,
        ) -> Result<Secret, Status> {
            let keys = crate::cache::UsableKeys::default();
            if let Some(t) = self
                .cache
                .lock()
                .unwrap()
                .get(&entry.id, audience, now, &keys)
            {
                return Ok(t);
            }
            let n = self
                .minted
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let token = Secret::new(format!("jwt-{n}:{}", audience.join(",")));
            self.cache.lock().unwrap().insert(
                &entry.id,
                audience,
                crate::cache::CachedJwt {
                    token: token.clone(),
                    issued_at: now,
                    expires_at: now + 300,
                    kid: Some("k1".into()),
                },
                now,
            );
            Ok(token)
        }

        fn validate_jwt(
            &self,
            _token: &str,
            _audience: &str,
            _bundle: &BundleView,
            _now: u64,
        ) -> Result<JwtClaims, String> {
            Err("not used".into())
        }
    }

    struct Harness {
        _dir: tempfile::TempDir,
        tx: watch::Sender<Arc<Snapshot>>,
        client: SpiffeWorkloadApiClient<Channel>,
    }

    /// Our effective uid (what SO_PEERCRED reports): the owner of a file we create.
    fn my_uid() -> u32 {
        use std::os::unix::fs::MetadataExt;
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().metadata().unwrap().uid()
    }

    fn bundle(tag: u8) -> BundleView {
        BundleView {
            trust_domain: TrustDomain::new("example.org").unwrap(),
            x509_der: vec![tag; 3],
            jwks_json: format!(r#"{{"keys":[],"tag":{tag}}}"#).into_bytes(),
            trust: std::sync::Arc::new(baton_ca::TrustBundle {
                trust_domain: TrustDomain::new("example.org").unwrap(),
                x509_authorities: vec![],
                jwt_authorities: vec![],
                sequence: u64::from(tag),
                refresh_hint_secs: 0,
            }),
        }
    }

    async fn harness(initial: Snapshot) -> Harness {
        harness_with(initial, Arc::new(FakeJwt)).await
    }

    async fn harness_with<J: JwtAuthority>(initial: Snapshot, jwt: Arc<J>) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (tx, rx) = watch::channel(Arc::new(initial));
        let service = WorkloadService::new(rx, Arc::new(Attestor::new()), jwt);
        tokio::spawn(
            crate::socket_server()
                .add_service(crate::workload_api(service))
                .serve_with_incoming(UnixListenerStream::new(listener)),
        );
        let channel = Endpoint::from_shared(format!("unix:{}", path.display()))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Harness {
            _dir: dir,
            tx,
            client: SpiffeWorkloadApiClient::new(channel),
        }
    }

    fn with_header<T>(msg: T) -> Request<T> {
        let mut r = Request::new(msg);
        r.metadata_mut()
            .insert(SECURITY_HEADER, "true".parse().unwrap());
        r
    }

    async fn next<T>(s: &mut tonic::Streaming<T>) -> Result<Option<T>, Status> {
        tokio::time::timeout(Duration::from_secs(10), s.message())
            .await
            .expect("no stream message within the deadline")
    }

    #[tokio::test]
    async fn missing_header_is_invalid_argument() {
        let mut h = harness(Snapshot::default()).await;
        let err = h
            .client
            .fetch_x509svid(Request::new(X509svidRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert_eq!(err.message(), "security header missing from request");

        let mut r = with_header(X509svidRequest {});
        r.metadata_mut()
            .append(SECURITY_HEADER, "true".parse().unwrap());
        let err = h.client.fetch_x509svid(r).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);

        let err = h
            .client
            .validate_jwtsvid(Request::new(ValidateJwtsvidRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
    }

    #[tokio::test]
    async fn no_entry_is_permission_denied() {
        let other = entry("other", 4_000_000_000);
        let mut h = harness(Snapshot::new(vec![other], Some(bundle(1)))).await;
        let err = h
            .client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(err.message(), NO_IDENTITY);
        let err = h
            .client
            .fetch_jwt_bundles(with_header(JwtBundlesRequest {}))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        let err = h
            .client
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["x".into()],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert!(err.message().contains(NO_IDENTITY));
    }

    #[tokio::test]
    async fn x509_stream_follows_snapshots() {
        let uid = my_uid();
        let mine = entry("mine", uid);
        let first =
            Snapshot::new(vec![mine.clone()], Some(bundle(1))).with_svid(svid(&mine, 0, 100, 1));
        let mut h = harness(first.clone()).await;

        let mut stream = h
            .client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        let msg = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(msg.svids.len(), 1);
        let got = &msg.svids[0];
        assert_eq!(got.spiffe_id, "spiffe://example.org/mine");
        assert_eq!(got.x509_svid, [vec![1u8; 4], vec![9; 2]].concat());
        assert_eq!(got.x509_svid_key, vec![1u8; 8]);
        assert_eq!(got.bundle, vec![1u8; 3]);

        // An unrelated change (another workload's entry) sends nothing; the
        // rotation after it does.
        let stranger = entry("stranger", 4_000_000_000);
        h.tx.send_replace(Arc::new(
            Snapshot::new(vec![mine.clone(), stranger], Some(bundle(1)))
                .with_svid(svid(&mine, 0, 100, 1)),
        ));
        h.tx.send_replace(Arc::new(first.clone().with_svid(svid(&mine, 50, 150, 2))));
        let msg = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(msg.svids[0].x509_svid_key, vec![2u8; 8]);

        // The bundles streams start with the current bundle and follow it.
        let mut bundles = h
            .client
            .fetch_x509_bundles(with_header(X509BundlesRequest {}))
            .await
            .unwrap()
            .into_inner();
        let b = next(&mut bundles).await.unwrap().unwrap();
        assert_eq!(b.bundles["spiffe://example.org"], vec![1u8; 3]);
        h.tx.send_replace(Arc::new(
            Snapshot::new(vec![mine.clone()], Some(bundle(7))).with_svid(svid(&mine, 50, 150, 2)),
        ));
        let b = next(&mut bundles).await.unwrap().unwrap();
        assert_eq!(b.bundles["spiffe://example.org"], vec![7u8; 3]);
        let msg = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(msg.svids[0].bundle, vec![7u8; 3]);

        // Losing the entry ends the stream with PermissionDenied.
        h.tx.send_replace(Arc::new(Snapshot::new(vec![], Some(bundle(7)))));
        let err = next(&mut stream).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);
        assert_eq!(err.message(), NO_IDENTITY);
    }

    #[tokio::test]
    async fn stream_waits_for_first_svid() {
        let uid = my_uid();
        let mine = entry("mine", uid);
        let mut h = harness(Snapshot::new(vec![mine.clone()], Some(bundle(1)))).await;
        let mut stream = h
            .client
            .fetch_x509svid(with_header(X509svidRequest {}))
            .await
            .unwrap()
            .into_inner();
        h.tx.send_replace(Arc::new(
            Snapshot::new(vec![mine.clone()], Some(bundle(1))).with_svid(svid(&mine, 0, 100, 3)),
        ));
        let msg = next(&mut stream).await.unwrap().unwrap();
        assert_eq!(msg.svids[0].x509_svid_key, vec![3u8; 8]);
    }

    #[tokio::test]
    async fn jwt_svid_rules() {
        let uid = my_uid();
        let a = entry("a", uid);
        let b = entry("b", uid);
        let mut h = harness(Snapshot::new(vec![a, b], Some(bundle(1)))).await;

        let err = h
            .client
            .fetch_jwtsvid(with_header(JwtsvidRequest::default()))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("audience"), "{}", err.message());

        let err = h
            .client
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["svc".into()],
                spiffe_id: "spiffe://example.org/not-mine".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied);

        let all = h
            .client
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["svc".into()],
                spiffe_id: String::new(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(all.svids.len(), 2);
        assert_eq!(all.svids[0].svid, "jwt:spiffe://example.org/a:svc");

        let one = h
            .client
            .fetch_jwtsvid(with_header(JwtsvidRequest {
                audience: vec!["svc".into()],
                spiffe_id: "spiffe://example.org/b".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(one.svids.len(), 1);
        assert_eq!(one.svids[0].spiffe_id, "spiffe://example.org/b");
    }

    /// The attack: a workload names many audiences, or huge ones, so that
    /// every token the node mints and caches for it is large. Refused with
    /// InvalidArgument naming the field and the bound, before anything is
    /// minted or cached. Control: a few audiences (and the bounds
    /// themselves) are served, and the same set asked again, in another
    /// order and with a duplicate, is served from the cache.
    #[tokio::test]
    async fn jwt_svid_audience_is_bounded() {
        let mine = entry("mine", my_uid());
        let jwt = Arc::new(CachingFakeJwt::default());
        let mut h =
            harness_with(Snapshot::new(vec![mine], Some(bundle(1))), Arc::clone(&jwt)).await;
        let ask = |audience: Vec<String>| {
            with_header(JwtsvidRequest {
                audience,
                spiffe_id: String::new(),
            })
        };
        let many = |n: usize| (0..n).map(|i| format!("a{i}")).collect::<Vec<_>>();

        let refused: [(Vec<String>, &str); 8] = [
            (
                many(MAX_JWT_AUDIENCES + 1),
                "audience must list at most 16 values, not 17",
            ),
            (
                vec!["svc".into(), "x".repeat(MAX_JWT_AUDIENCE_BYTES + 1)],
                "audience[1] must be at most 256 bytes, not 257",
            ),
            (
                vec!["svc".into(), String::new()],
                "audience[1] must not be empty",
            ),
            (vec!["   ".into()], "audience[0] must not be empty or blank"),
            (
                vec!["svc".into(), " \t ".into()],
                "audience[1] must not be empty or blank",
            ),
            (vec!["a\nb".into()], r"control or invisible character: a\nb"),
            (vec!["a\u{1b}[2Jb".into()], r"a\u{1b}[2Jb"),
            (vec!["a\u{202e}b".into()], r"a\u{202e}b"),
        ];
        for (audience, why) in refused {
            let err = h.client.fetch_jwtsvid(ask(audience)).await.unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
            assert!(err.message().contains("audience"), "{}", err.message());
            assert!(err.message().contains(why), "{}", err.message());
            assert!(!err.message().contains('\n'), "{}", err.message());
        }
        assert_eq!(jwt.minted(), 0);
        assert_eq!(jwt.cached(), 0);

        // Untampered: three audiences are minted once, then served from
        // the cache.
        let three = vec!["svc".to_owned(), "db".into(), "queue".into()];
        let first = h.client.fetch_jwtsvid(ask(three)).await.unwrap();
        let first = &first.into_inner().svids[0].svid;
        assert_eq!(first, "jwt-0:svc,db,queue");
        let again = vec!["queue".to_owned(), "svc".into(), "db".into(), "svc".into()];
        let again = h.client.fetch_jwtsvid(ask(again)).await.unwrap();
        assert_eq!(&again.into_inner().svids[0].svid, first);
        assert_eq!((jwt.minted(), jwt.cached()), (1, 1));

        // The bounds themselves are allowed.
        let mut widest = many(MAX_JWT_AUDIENCES - 1);
        widest.push("x".repeat(MAX_JWT_AUDIENCE_BYTES));
        h.client.fetch_jwtsvid(ask(widest)).await.unwrap();
        assert_eq!((jwt.minted(), jwt.cached()), (2, 2));
    }

    #[tokio::test]
    async fn validate_jwt_svid_rules() {
        let mut h = harness(Snapshot::new(vec![], Some(bundle(1)))).await;
        for (audience, svid, field) in [("", "good", "audience"), ("svc", "", "svid")] {
            let err = h
                .client
                .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                    audience: audience.into(),
                    svid: svid.into(),
                }))
                .await
                .unwrap_err();
            assert_eq!(err.code(), Code::InvalidArgument);
            assert!(err.message().contains(field), "{}", err.message());
        }
        let err = h
            .client
            .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                audience: "svc".into(),
                svid: "bad".into(),
            }))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains("signature"));

        let ok = h
            .client
            .validate_jwtsvid(with_header(ValidateJwtsvidRequest {
                audience: "svc".into(),
                svid: "good".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.spiffe_id, "spiffe://example.org/a");
        let claims = ok.claims.unwrap();
        assert!(claims.fields.contains_key("aud"));
        assert!(claims.fields.contains_key("exp"));
    }

    /// A request longer than the socket's bound is refused from its length
    /// prefix, before the handler (and before anything is attested): a
    /// local user cannot make the daemon buffer megabytes per stream.
    /// Control: a malformed token larger than any JWT-SVID the broker
    /// mints, sent the same way, reaches the handler, which refuses it.
    #[tokio::test]
    async fn oversized_requests_are_refused_before_the_handler() {
        let mut h = harness(Snapshot::new(vec![], Some(bundle(1)))).await;
        let validate = |svid: String| {
            with_header(ValidateJwtsvidRequest {
                audience: "svc".into(),
                svid,
            })
        };

        let err = h
            .client
            .validate_jwtsvid(validate("x".repeat(1 << 20)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");
        assert!(err.message().contains("too large"), "{}", err.message());
        let err = h
            .client
            .validate_jwtsvid(validate("x".repeat(crate::MAX_REQUEST_BYTES)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::OutOfRange, "{err:?}");

        // Untampered: the same call, 16 KiB, is the handler's to refuse.
        let err = h
            .client
            .validate_jwtsvid(validate("x".repeat(16 * 1024)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
        assert!(err.message().contains("signature"), "{}", err.message());
        // The connection is still usable after a refused request.
        let ok = h
            .client
            .validate_jwtsvid(validate("good".into()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(ok.spiffe_id, "spiffe://example.org/a");
    }
}
