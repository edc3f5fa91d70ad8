//! The small HTTP server on which meshd and the managers serve their Prometheus metrics
//! (OpenMetrics text on `GET /metrics`), and the `--metrics` address both take.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tracing::info;

/// Where to serve metrics: an address, or nowhere.
#[derive(Clone, Copy, Debug)]
pub struct MetricsAddr(pub Option<SocketAddr>);

/// Reads a `--metrics` value: `IP:PORT`, or `off` for nowhere.
pub fn parse_addr(text: &str) -> Result<MetricsAddr, String> {
    if text == "off" {
        return Ok(MetricsAddr(None));
    }
    text.parse().map(|a| MetricsAddr(Some(a))).map_err(|_| format!("`{text}` is not IP:PORT or `off`"))
}

/// Whether a process is ready to do its job, and if not, why.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Serves `GET /metrics` on `listener` until dropped, answering with what `render` gives;
/// `/healthz` answers 200 while the process serves at all, `/readyz` 200 when `ready` says so
/// and 503 with its reason otherwise.
pub async fn serve(
    listener: tokio::net::TcpListener,
    render: Arc<dyn Fn() -> String + Send + Sync>,
    ready: Readiness,
) {
    let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(%address, "metrics at http://{address}/metrics");
    let mut backoff = crate::accept::AcceptBackoff::default();
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => {
                backoff.reset();
                s
            }
            Err(e) => {
                backoff.wait("metrics", &e).await;
                continue;
            }
        };
        let (render, ready) = (render.clone(), ready.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let (render, ready) = (render.clone(), ready.clone());
                async move {
                    let text = |status: u16, body: String| {
                        hyper::Response::builder()
                            .status(status)
                            .header("content-type", "text/plain; charset=utf-8")
                            .body(Full::new(Bytes::from(body)))
                    };
                    let response = match req.uri().path() {
                        "/metrics" => hyper::Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(render()))),
                        "/healthz" => text(200, "ok\n".into()),
                        "/readyz" => match ready() {
                            Ok(()) => text(200, "ready\n".into()),
                            Err(why) => text(503, format!("not ready: {why}\n")),
                        },
                        _ => text(404, "try /metrics, /healthz or /readyz\n".into()),
                    };
                    Ok::<_, std::convert::Infallible>(response.expect("a valid response"))
                }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Binds the metrics address (a clear error when taken).
pub async fn bind(address: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot serve metrics on {address}: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(address: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(address).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn health_and_readiness_are_answered_beside_the_metrics() {
        let ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let flag = ready.clone();
        let readiness: Readiness = Arc::new(move || {
            if flag.load(std::sync::atomic::Ordering::Relaxed) { Ok(()) } else { Err("no session".into()) }
        });
        let server = tokio::spawn(serve(listener, Arc::new(|| "# EOF\n".into()), readiness));
        assert!(get(address, "/metrics").await.contains("# EOF"));
        assert!(get(address, "/healthz").await.starts_with("HTTP/1.1 200"));
        let not_ready = get(address, "/readyz").await;
        assert!(
            not_ready.starts_with("HTTP/1.1 503") && not_ready.contains("not ready: no session"),
            "{not_ready}"
        );
        ready.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(get(address, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(address, "/other").await.starts_with("HTTP/1.1 404"));
        server.abort();
    }
}
