//! The ops listener: plain HTTP/1.1, three GET routes, bounded.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::{Ops, OpsError};

/// At most this many scrapers and probes at once; a connection past it is
/// closed as soon as it is accepted.
const MAX_CONNECTIONS: usize = 64;
/// At most this many at once from one address: a scraper and the
/// kubelet's probes need a few; one peer holding idle connections must not
/// take the slots the liveness probe needs (a probe that times out gets
/// the process restarted).
const MAX_CONNECTIONS_PER_PEER: usize = 4;
/// A client that has not sent its request head by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A whole connection (head, answer, and a client slow to read it) ends
/// by then.
const CONNECTION_DEADLINE: Duration = Duration::from_secs(10);
/// The largest request head read (request line and headers): a probe's is
/// a few hundred bytes. Larger heads are refused by hyper (431).
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// Binds the ops listener.
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, OpsError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| OpsError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// Serves `/metrics`, `/livez` and `/readyz` of `ops` on `listener` until
/// `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    ops: Ops,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), OpsError> {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let peers: Arc<Mutex<HashMap<IpAddr, usize>>> = Arc::default();
    tokio::pin!(shutdown);
    loop {
        // Accept first, then decide: a full listener closes the newcomer
        // at once rather than leaving every later client (the liveness
        // probe among them) waiting in the kernel's queue.
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => return Ok(()),
            r = listener.accept() => match r {
                Ok(s) => s,
                // Per-connection errors (a reset before accept, too many
                // open files for a moment) must not stop the listener.
                Err(e) => {
                    tracing::warn!(error = %e, "ops listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(peer_slot) = PeerSlot::take(&peers, peer.ip()) else {
            tracing::debug!(%peer, "ops listener: too many connections from this address");
            continue;
        };
        let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
            tracing::debug!(%peer, "ops listener: every connection slot is taken");
            continue;
        };
        let ops = ops.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(ops.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_HEAD_BYTES)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            match tokio::time::timeout(CONNECTION_DEADLINE, conn).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "ops listener: connection ended with an error");
                }
                Err(_) => tracing::debug!(%peer, "ops listener: connection cut at its deadline"),
            }
            drop(permit);
            drop(peer_slot);
        });
    }
}

/// One of a peer address's connections; given back on drop.
struct PeerSlot {
    peers: Arc<Mutex<HashMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl PeerSlot {
    fn take(peers: &Arc<Mutex<HashMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Self> {
        let mut held = peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = held.entry(ip).or_insert(0);
        if *n >= MAX_CONNECTIONS_PER_PEER {
            return None;
        }
        *n += 1;
        Some(Self {
            peers: Arc::clone(peers),
            ip,
        })
    }
}

impl Drop for PeerSlot {
    fn drop(&mut self) {
        let mut held = self
            .peers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = held.get_mut(&self.ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                held.remove(&self.ip);
            }
        }
    }
}

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    r
}

const JSON: &str = "application/json";

async fn answer(ops: Ops, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    // Only GET: nothing on this port changes state, and a method that
    // carries a body is never read.
    if req.method() != Method::GET {
        let mut r = reply(
            StatusCode::METHOD_NOT_ALLOWED,
            JSON,
            r#"{"error":"the ops listener only answers GET"}"#.into(),
        );
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
        return Ok(r);
    }
    // A GET with a body is refused unread (the connection then closes).
    if has_body(&req) {
        return Ok(reply(
            StatusCode::PAYLOAD_TOO_LARGE,
            JSON,
            r#"{"error":"the ops listener takes no request body"}"#.into(),
        ));
    }
    Ok(match req.uri().path() {
        "/metrics" => match ops.render_metrics() {
            Ok(text) => reply(
                StatusCode::OK,
                prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                text,
            ),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain; charset=utf-8",
                e.to_string(),
            ),
        },
        "/livez" => reply(StatusCode::OK, JSON, r#"{"status":"live"}"#.into()),
        "/readyz" => {
            let r = ops.readiness_shared().await;
            let status = if r.ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            let body = serde_json::json!({
                "status": if r.ready { "ready" } else { "not_ready" },
                "failing": r.failing(),
                "checks": r.checks,
            });
            reply(status, JSON, body.to_string())
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            JSON,
            r#"{"error":"not found: the ops listener serves /metrics, /livez and /readyz"}"#.into(),
        ),
    })
}

/// Whether a request announces a body (a length above zero, or chunked).
fn has_body<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0")
}

/// One plain `GET path` to an ops listener at `addr` (as `baton
/// healthcheck` and probes do): the status code and the body.
pub async fn probe(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), OpsError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |source| OpsError::Probe {
        addr: addr.to_owned(),
        source,
    };
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await.map_err(io)?;
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.map_err(io)?;
        let mut raw = Vec::new();
        stream
            .take(4 * 1024 * 1024)
            .read_to_end(&mut raw)
            .await
            .map_err(io)?;
        Ok::<_, OpsError>(raw)
    };
    let raw = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "no answer in time",
            ))
        })??;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| {
            io(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                "not an HTTP answer",
            ))
        })?;
    Ok((status, body.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Role;

    #[tokio::test]
    async fn routes_answer_over_real_http() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let ops = Ops::new();
        ops.add_role(Role::Revocation);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, ops.clone(), async {
            let _ = stopped.await;
        }));
        let get = |p: &'static str| probe(&addr, p, Duration::from_secs(10));

        assert_eq!(get("/livez").await.unwrap().0, 200);
        let (status, body) = get("/readyz").await.unwrap();
        assert_eq!(status, 503);
        let body: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["failing"][0], "started");
        ops.set_started();
        assert_eq!(get("/readyz").await.unwrap().0, 200);
        let (status, text) = get("/metrics").await.unwrap();
        assert_eq!(status, 200);
        assert!(
            text.contains("# TYPE baton_revocation_store_up gauge"),
            "{text}"
        );
        assert_eq!(get("/nope").await.unwrap().0, 404);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }

    /// One address holding idle connections (which the old listener kept
    /// until their head timeout, with later clients queued behind them)
    /// does not keep the liveness probe of another from its answer; its
    /// connections past the per-address cap are closed at once.
    #[tokio::test]
    async fn one_peer_cannot_starve_the_probes() {
        use tokio::io::AsyncReadExt;
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ops = Ops::new();
        let server = tokio::spawn(serve(listener, ops, std::future::pending()));
        let target = addr.to_string();
        let probe_livez = || probe(&target, "/livez", Duration::from_secs(3));
        // Control: the probe answered before the attack.
        assert_eq!(probe_livez().await.unwrap().0, 200);

        let mut idle = Vec::new();
        for _ in 0..MAX_CONNECTIONS + 8 {
            let socket = tokio::net::TcpSocket::new_v4().unwrap();
            socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
            idle.push(socket.connect(addr).await.unwrap());
        }
        // Those past the cap are closed without an answer (EOF or reset),
        // well before the head timeout.
        let mut last = idle.pop().unwrap();
        let mut buf = [0u8; 16];
        let read = tokio::time::timeout(HEADER_TIMEOUT / 2, last.read(&mut buf))
            .await
            .expect("a connection past the per-address cap was kept open");
        assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
        // The probe from another address is answered while they are held.
        assert_eq!(probe_livez().await.unwrap().0, 200);
        drop(idle);
        server.abort();
    }

    /// Sends `raw` as is and returns the status code answered.
    async fn raw_status(addr: &str, raw: &[u8]) -> u16 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        // The server may close before reading everything it was sent.
        let _ = s.write_all(raw).await;
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        let text = String::from_utf8_lossy(&out);
        text.split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0)
    }

    #[tokio::test]
    async fn only_bodiless_gets_with_small_heads_are_answered() {
        let listener = bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let ops = Ops::new();
        ops.set_started();
        let server = tokio::spawn(serve(listener, ops, std::future::pending()));

        // Control: a plain GET is answered.
        let get = b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        assert_eq!(raw_status(&addr, get).await, 200);
        for method in ["POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH"] {
            let req = format!(
                "{method} /readyz HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            );
            assert_eq!(raw_status(&addr, req.as_bytes()).await, 405, "{method}");
        }
        // A GET announcing a (large) body is refused without reading it.
        let with_body = b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\nxx";
        assert_eq!(raw_status(&addr, with_body).await, 413);
        let chunked = b"GET /metrics HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        assert_eq!(raw_status(&addr, chunked).await, 413);
        // A huge request head is cut off (431), not buffered.
        let big = format!(
            "GET /livez HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(64 * 1024)
        );
        assert_eq!(raw_status(&addr, big.as_bytes()).await, 431);
        server.abort();
    }
}
