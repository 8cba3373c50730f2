//! The ops listener: plain HTTP/1.1, three GET routes, bounded.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
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

/// At most this many scrapers and probes at once; more wait in the
/// kernel's accept queue.
const MAX_CONNECTIONS: usize = 64;
/// A client that has not sent its request head by then is dropped.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);

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
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            () = &mut shutdown => return Ok(()),
            p = Arc::clone(&slots).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return Ok(()),
            },
        };
        let (stream, _) = tokio::select! {
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
        let ops = ops.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| answer(ops.clone(), req));
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(false)
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "ops listener: connection ended with an error");
            }
            drop(permit);
        });
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
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(reply(
            StatusCode::METHOD_NOT_ALLOWED,
            JSON,
            r#"{"error":"only GET"}"#.into(),
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
            let r = ops.readiness().await;
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
        let request =
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
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
        .map_err(|_| io(std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time")))??;
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
        assert!(text.contains("# TYPE baton_revocation_store_up gauge"), "{text}");
        assert_eq!(get("/nope").await.unwrap().0, 404);
        let _ = stop.send(());
        server.await.unwrap().unwrap();
    }
}
