use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use baton_core::SpiffeId;
use http::{Extensions, Request};
use hyper::body::Incoming;
use hyper::rt::{Read, Write};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::{TcpListener, UnixListener};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use warp::{Filter, Reply};

use crate::TlsError;
use crate::svid::spiffe_id_of_verified_leaf;

/// How long a client gets to finish the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long in-flight requests get to finish after shutdown is asked.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
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

/// Serves `filter` over TLS on `listener` until `shutdown` resolves.
///
/// `config` must come from [`server_config`](crate::server_config): the
/// SPIFFE ID put into [`PeerIdentity`] is read from the peer certificate
/// that config's verifier accepted. Each connection is handshaken in its own
/// task with [`HANDSHAKE_TIMEOUT`]; a failed or timed-out handshake is
/// logged and dropped, never ending the loop. HTTP/1.1 and HTTP/2 are both
/// served. On shutdown the listener is closed, open connections are asked
/// to finish, and the call returns once they have or after
/// [`SHUTDOWN_GRACE`].
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
    let acceptor = TlsAcceptor::from(config);
    let graceful = GracefulShutdown::new();
    let mut tasks = JoinSet::new();
    // Handshakes are not in-flight requests: shutdown cuts them at once
    // instead of letting a silent client hold it for HANDSHAKE_TIMEOUT.
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
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
        let watcher = graceful.watcher();
        let mut stopping = stopping_rx.clone();
        tasks.spawn(async move {
            let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream));
            let tls = tokio::select! {
                result = handshake => match result {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(err)) => {
                        tracing::info!(peer = %addr, error = %err, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::info!(peer = %addr, "TLS handshake timed out");
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
            tracing::debug!(peer = %addr, spiffe_id = ?peer.0, "TLS connection accepted");
            let insert = move |ext: &mut Extensions| {
                ext.insert(peer.clone());
                if let Some(der) = &leaf_der {
                    ext.insert(der.clone());
                }
                ext.insert(RemoteAddr(addr));
            };
            serve_connection(TokioIo::new(tls), filter, insert, watcher).await;
        });
    }
    drop(listener);
    let _ = stopping_tx.send(true);
    finish(graceful, tasks).await;
    Ok(())
}

/// Serves `filter` over a Unix socket (no TLS) until `shutdown` resolves.
///
/// Each request carries the caller's [`UnixPeer`] credentials, read once
/// per connection with `SO_PEERCRED`; a connection whose credentials cannot
/// be read is dropped. Shutdown works as in [`serve_https`].
pub async fn serve_unix<F>(
    listener: UnixListener,
    filter: F,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TlsError>
where
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: Reply,
{
    let graceful = GracefulShutdown::new();
    let mut tasks = JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
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
        let watcher = graceful.watcher();
        tasks.spawn(async move {
            let insert = move |ext: &mut Extensions| {
                ext.insert(peer);
            };
            serve_connection(TokioIo::new(stream), filter, insert, watcher).await;
        });
    }
    drop(listener);
    finish(graceful, tasks).await;
    Ok(())
}

async fn serve_connection<I, F, X>(io: I, filter: F, insert: X, watcher: Watcher)
where
    I: Read + Write + Unpin + Send + 'static,
    F: Filter + Clone + Send + Sync + 'static,
    F::Extract: Reply,
    X: Fn(&mut Extensions) + Clone + Send + Sync + 'static,
{
    let svc = TowerToHyperService::new(warp::service(filter));
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        insert(req.extensions_mut());
        hyper::service::Service::call(&svc, req)
    });
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // Without a timer hyper cannot enforce its header-read timeout, and a
    // slow client could hold a connection open forever.
    builder.http1().timer(TokioTimer::new());
    builder.http2().timer(TokioTimer::new());
    let conn = builder.serve_connection_with_upgrades(io, svc);
    if let Err(err) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(error = %err, "HTTP connection ended with an error");
    }
}

/// Forgets finished connection tasks so the set does not grow forever.
fn reap(tasks: &mut JoinSet<()>) {
    while tasks.try_join_next().is_some() {}
}

async fn finish(graceful: GracefulShutdown, mut tasks: JoinSet<()>) {
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
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
