use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_core::SpiffeId;
use http::{Extensions, Request};
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::TlsAcceptor;
use warp::{Filter, Reply};

use crate::TlsError;
use crate::svid::spiffe_id_of_verified_leaf;

/// How long a client gets to finish the TLS handshake (the default of
/// [`ServeLimits::handshake_timeout`]).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests get to finish after shutdown is asked (the
/// default of [`ServeLimits::shutdown_grace`]).
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a connection asked to close (idle, or its request timed out)
/// gets to finish writing before it is dropped: a client that never reads
/// cannot hold it open.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// Most concurrent HTTP/2 streams on one connection.
const MAX_H2_STREAMS: u32 = 128;

/// What one listener grants a client, so that a slow or hostile one cannot
/// hold it: every phase of a connection has a deadline, and the number of
/// connections open at once is capped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServeLimits {
    /// Connections open at once (handshaking or being served). At the cap
    /// the listener stops accepting: new connections wait in the kernel's
    /// backlog until one closes, and connections already open are served
    /// as before.
    pub max_connections: usize,
    /// Time to finish the TLS handshake.
    pub handshake_timeout: Duration,
    /// HTTP/1.1: time to send a request's whole header, counted from when
    /// the server starts waiting for it (so it also bounds an idle
    /// keep-alive connection).
    pub header_read_timeout: Duration,
    /// Time from a request's header to the end of its handler, its body
    /// included; past it the answer is 408 `request_timeout` and the
    /// connection is closed. `None`: no limit (the admin socket).
    pub request_timeout: Option<Duration>,
    /// A connection (HTTP/1.1 or HTTP/2) with no request in flight for this
    /// long is closed.
    pub idle_timeout: Duration,
    /// After shutdown is asked: how long requests already in flight get to
    /// finish (their connections are then closed) before what is left is
    /// dropped.
    pub shutdown_grace: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            handshake_timeout: HANDSHAKE_TIMEOUT,
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Some(Duration::from_secs(60)),
            idle_timeout: Duration::from_secs(60),
            shutdown_grace: SHUTDOWN_GRACE,
        }
    }
}

impl ServeLimits {
    /// Refuses a limit that would make the listener useless (zero).
    pub fn validate(&self) -> Result<(), TlsError> {
        let zero = |field: &'static str| TlsError::InvalidLimit {
            field,
            reason: "must be more than zero".into(),
        };
        if self.max_connections == 0 {
            return Err(zero("max_connections"));
        }
        for (field, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("shutdown_grace", self.shutdown_grace),
            ("header_read_timeout", self.header_read_timeout),
            ("idle_timeout", self.idle_timeout),
        ] {
            if d.is_zero() {
                return Err(zero(field));
            }
        }
        if self.request_timeout.is_some_and(|d| d.is_zero()) {
            return Err(zero("request_timeout"));
        }
        Ok(())
    }
}
/// Pause after a listener error such as EMFILE, so the loop does not spin.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The verified SPIFFE ID of the mTLS peer, in every request's extensions
/// on an HTTPS listener; `None` when the client sent no certificate (only
/// possible with [`ClientAuth::Optional`](crate::ClientAuth::Optional)).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerIdentity(pub Option<SpiffeId>);

/// The DER of the verified mTLS peer's leaf certificate, next to
/// [`PeerIdentity`] when the client sent one; verifiers of certificate-bound
/// tokens (RFC 8705) hash it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCertificate(pub Vec<u8>);

/// The TCP address of the peer, in every request's extensions on an HTTPS
/// listener (warp's own `addr::remote()` only works with `warp::serve`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RemoteAddr(pub SocketAddr);

/// The kernel-reported credentials of the process at the other end of a
/// Unix socket, in every request's extensions on a [`serve_unix`] listener.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnixPeer {
    pub uid: u32,
    pub gid: u32,
    pub pid: Option<i32>,
}

/// Serves `filter` over TLS on `listener` until `shutdown` resolves, with
/// the default [`ServeLimits`]; see [`serve_https_with`].
pub async fn serve_https<F>(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    filter: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TlsError>
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    serve_https_with(listener, config, filter, ServeLimits::default(), shutdown).await
}

/// Serves `filter` over TLS on `listener` until `shutdown` resolves.
///
/// `config` must come from [`server_config`](crate::server_config): the
/// SPIFFE ID put into [`PeerIdentity`] is read from the peer certificate
/// that config's verifier accepted. Each connection is handshaken in its own
/// task within [`ServeLimits::handshake_timeout`]; a failed or timed-out
/// handshake is logged and dropped, never ending the loop. HTTP/1.1 and
/// HTTP/2 are both served, each connection under `limits`. On shutdown the
/// listener is closed (new connections are refused), handshakes in progress
/// are dropped, each open connection finishes the requests it has in flight
/// and is then closed (HTTP/1.1 without keep-alive, HTTP/2 with a GOAWAY),
/// and the call returns once they all have or after
/// [`ServeLimits::shutdown_grace`].
pub async fn serve_https_with<F>(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    filter: F,
    limits: ServeLimits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TlsError>
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    limits.validate()?;
    let acceptor = TlsAcceptor::from(config);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut tasks = JoinSet::new();
    // Handshakes are not in-flight requests: shutdown cuts them at once
    // instead of letting a silent client hold it for the handshake timeout.
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let Some(permit) = slot(&slots, limits.max_connections, &mut shutdown).await else {
            break;
        };
        let (stream, addr) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(err) => {
                    accept_error(err).await;
                    continue;
                }
            },
        };
        reap(&mut tasks);
        let acceptor = acceptor.clone();
        let filter = filter.clone();
        let mut stopping = stopping_rx.clone();
        tasks.spawn(async move {
            // Held for the connection's whole life.
            let _permit = permit;
            let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(stream));
            let tls = tokio::select! {
                result = handshake => match result {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(err)) => {
                        tracing::info!(peer = %addr, error = %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(peer = %addr, timeout = ?limits.handshake_timeout, "TLS handshake timed out; connection dropped");
                        return;
                    }
                },
                _ = stopping.wait_for(|stop| *stop) => return,
            };
            let leaf = tls.get_ref().1.peer_certificates().and_then(|c| c.first());
            let leaf_der = leaf.map(|c| PeerCertificate(c.as_ref().to_vec()));
            let peer = match leaf.map(spiffe_id_of_verified_leaf).transpose() {
                Ok(id) => PeerIdentity(id),
                Err(err) => {
                    // Unreachable with our verifier; fail closed anyway.
                    tracing::warn!(peer = %addr, error = %err, "verified peer has no SPIFFE ID");
                    return;
                }
            };
            // What the handshake verified holds no longer once the client
            // certificate expires: a request after that is refused, and the
            // connection is closed a little before (a tenth of the time
            // left, at most 30 s), so that a client that renewed its
            // certificate meanwhile sends its next request on a new
            // connection instead of being refused on this one.
            let peer_expires = leaf
                .and_then(crate::svid::not_after_of_verified_leaf)
                .map(|at| {
                    Instant::now()
                        + at
                            .duration_since(std::time::SystemTime::now())
                            .unwrap_or_default()
                });
            tracing::debug!(peer = %addr, spiffe_id = ?peer.0, "TLS connection accepted");
            let insert = move |ext: &mut Extensions| {
                ext.insert(peer.clone());
                if let Some(der) = &leaf_der {
                    ext.insert(der.clone());
                }
                ext.insert(RemoteAddr(addr));
            };
            serve_connection(
                TokioIo::new(tls),
                filter,
                insert,
                limits,
                peer_expires,
                stopping,
            )
            .await;
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    finish(tasks, limits.shutdown_grace).await;
    Ok(())
}

/// Serves `filter` over a Unix socket (no TLS) until `shutdown` resolves.
///
/// Each request carries the caller's [`UnixPeer`] credentials, read once
/// per connection with `SO_PEERCRED`; a connection whose credentials cannot
/// be read is dropped. Connections are capped and timed out as by the
/// default [`ServeLimits`], except that a request has no time limit (the
/// callers are local and checked by uid; an audit verification of a long
/// log may take minutes). Shutdown works as in [`serve_https_with`].
pub async fn serve_unix<F>(
    listener: UnixListener,
    filter: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TlsError>
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    serve_unix_with(listener, filter, SHUTDOWN_GRACE, shutdown).await
}

/// [`serve_unix`] with another shutdown grace (see
/// [`ServeLimits::shutdown_grace`]).
pub async fn serve_unix_with<F>(
    listener: UnixListener,
    filter: F,
    shutdown_grace: Duration,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TlsError>
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    let limits = ServeLimits {
        request_timeout: None,
        shutdown_grace,
        ..ServeLimits::default()
    };
    limits.validate()?;
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let mut tasks = JoinSet::new();
    let (stopping_tx, stopping_rx) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let Some(permit) = slot(&slots, limits.max_connections, &mut shutdown).await else {
            break;
        };
        let stream = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(err) => {
                    accept_error(err).await;
                    continue;
                }
            },
        };
        let peer = match stream.peer_cred() {
            Ok(cred) => UnixPeer {
                uid: cred.uid(),
                gid: cred.gid(),
                pid: cred.pid(),
            },
            Err(err) => {
                tracing::warn!(error = %err, "cannot read Unix peer credentials; dropping connection");
                continue;
            }
        };
        reap(&mut tasks);
        let filter = filter.clone();
        let stopping = stopping_rx.clone();
        tasks.spawn(async move {
            let _permit = permit;
            let insert = move |ext: &mut Extensions| {
                ext.insert(peer);
            };
            serve_connection(TokioIo::new(stream), filter, insert, limits, None, stopping).await;
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    finish(tasks, limits.shutdown_grace).await;
    Ok(())
}

/// A connection slot, waiting while all `max` are taken; `None` once
/// `shutdown` resolves first.
async fn slot(
    slots: &Arc<Semaphore>,
    max: usize,
    shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
) -> Option<OwnedSemaphorePermit> {
    if let Ok(permit) = slots.clone().try_acquire_owned() {
        return Some(permit);
    }
    tracing::warn!(
        max_connections = max,
        "connection cap reached; new connections wait until one closes"
    );
    tokio::select! {
        biased;
        () = shutdown.as_mut() => None,
        permit = slots.clone().acquire_owned() => permit.ok(),
    }
}

/// What the requests of one connection are doing, for its idle timer.
#[derive(Debug)]
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
    /// A request timed out: close the connection after its answer.
    close: AtomicBool,
    changed: Notify,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            last: Mutex::new(Instant::now()),
            close: AtomicBool::new(false),
            changed: Notify::new(),
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self.clone())
    }

    fn last(&self) -> Instant {
        *self.last.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// When the connection counts as idle if nothing happens before then.
    fn idle_at(&self, idle: Duration) -> Instant {
        if self.in_flight.load(Ordering::SeqCst) > 0 {
            // Looked at again when the request ends (`changed`).
            Instant::now() + idle
        } else {
            self.last() + idle
        }
    }
}

/// One request being handled; its drop marks the connection active now.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        *self.0.last.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.0.changed.notify_one();
    }
}

/// The answer to a request whose handler ran past the request timeout.
fn timeout_response(limit: Duration) -> warp::reply::Response {
    let body: std::collections::BTreeMap<&str, String> = [
        ("code", "request_timeout".to_owned()),
        (
            "message",
            format!(
                "the request was not handled within {}s (its body included); the connection is closed",
                limit.as_secs_f64()
            ),
        ),
    ]
    .into();
    warp::reply::with_status(warp::reply::json(&body), http::StatusCode::REQUEST_TIMEOUT)
        .into_response()
}

async fn serve_connection<I, F, X>(
    io: I,
    filter: F,
    insert: X,
    limits: ServeLimits,
    peer_expires: Option<Instant>,
    mut stopping: watch::Receiver<bool>,
) where
    I: Read + Write + Unpin + Send + 'static,
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: Reply,
    X: Fn(&mut Extensions) + Clone + Send + Sync + 'static,
{
    let activity = Arc::new(Activity::new());
    let svc = TowerToHyperService::new(warp::service(filter));
    let svc = {
        let activity = activity.clone();
        hyper::service::service_fn(move |mut req: Request<Incoming>| {
            insert(req.extensions_mut());
            let in_flight = activity.begin();
            let expired = peer_expires.is_some_and(|at| Instant::now() >= at);
            let call = hyper::service::Service::call(&svc, req);
            let activity = activity.clone();
            async move {
                if expired {
                    // Not handed to the routes: the identity they would
                    // read is no longer valid.
                    activity.close.store(true, Ordering::SeqCst);
                    drop(in_flight);
                    return Ok(expired_response());
                }
                let Some(limit) = limits.request_timeout else {
                    let answer = call.await;
                    drop(in_flight);
                    return answer;
                };
                let answer = match tokio::time::timeout(limit, call).await {
                    Ok(answer) => answer,
                    Err(_) => {
                        tracing::info!(timeout = ?limit, "request timed out; closing its connection");
                        activity.close.store(true, Ordering::SeqCst);
                        Ok(timeout_response(limit))
                    }
                };
                drop(in_flight);
                answer
            }
        })
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper cannot enforce its header-read timeout, and a
    // slow client could hold a connection open forever.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_H2_STREAMS);
    let conn = builder.serve_connection_with_upgrades(io, svc);
    let mut conn = std::pin::pin!(conn);
    let close_before = peer_expires.map(|at| {
        let now = Instant::now();
        let early = (at.saturating_duration_since(now) / 10).min(EXPIRY_CLOSE_EARLY);
        at.checked_sub(early).unwrap_or(at)
    });
    // Set once the connection was asked to close: the time it must be
    // gone by, whatever the client does.
    let mut closing: Option<Instant> = None;
    loop {
        let wake = closing.unwrap_or_else(|| activity.idle_at(limits.idle_timeout));
        let close_after = tokio::select! {
            biased;
            result = conn.as_mut() => {
                if let Err(err) = result {
                    tracing::debug!(error = %err, "HTTP connection ended with an error");
                }
                return;
            }
            _ = stopping.wait_for(|stop| *stop), if closing.is_none() => limits.shutdown_grace,
            () = activity.changed.notified(), if closing.is_none() => {
                if !activity.close.load(Ordering::SeqCst) {
                    continue;
                }
                CLOSE_GRACE
            }
            () = sleep_until_some(close_before), if closing.is_none() => {
                tracing::debug!("client certificate about to expire; closing its connection");
                CLOSE_GRACE
            }
            () = tokio::time::sleep_until(wake) => {
                if closing.is_some() {
                    tracing::debug!("connection did not close in time; dropped");
                    return;
                }
                if activity.in_flight.load(Ordering::SeqCst) > 0
                    || Instant::now() < activity.last() + limits.idle_timeout
                {
                    continue;
                }
                tracing::debug!(idle_timeout = ?limits.idle_timeout, "idle connection closed");
                CLOSE_GRACE
            }
        };
        conn.as_mut().graceful_shutdown();
        closing = Some(Instant::now() + close_after);
    }
}

/// Longest a connection is closed before its client certificate expires.
const EXPIRY_CLOSE_EARLY: Duration = Duration::from_secs(30);

/// Sleeps until `at`, or forever without one.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The answer to a request on a connection whose client certificate has
/// expired since its handshake.
fn expired_response() -> warp::reply::Response {
    let body: std::collections::BTreeMap<&str, &str> = [
        ("code", "unauthenticated"),
        (
            "message",
            "the client certificate of this connection has expired; connect again with a current SVID",
        ),
    ]
    .into();
    warp::reply::with_status(warp::reply::json(&body), http::StatusCode::UNAUTHORIZED)
        .into_response()
}

/// Forgets finished connection tasks so the set does not grow forever.
fn reap(tasks: &mut JoinSet<()>) {
    while tasks.try_join_next().is_some() {}
}

/// Waits up to `grace` for the connection tasks (each closes itself once
/// told to stop), then drops what is left.
async fn finish(mut tasks: JoinSet<()>, grace: Duration) {
    let drained =
        tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    if drained.is_err() {
        tracing::warn!("shutdown grace period elapsed; dropping remaining connections");
    }
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
}

async fn accept_error(err: std::io::Error) {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    // A peer that vanished between SYN and accept is its own problem; other
    // errors (EMFILE, ENOBUFS) clear up only if we stop hammering accept.
    if matches!(
        err.kind(),
        ConnectionAborted | ConnectionRefused | ConnectionReset
    ) {
        return;
    }
    tracing::warn!(error = %err, "accept failed; backing off");
    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
}

#[cfg(test)]
mod tests;
