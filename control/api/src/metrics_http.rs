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

/// Serves `GET /metrics` on `listener` until dropped, answering with what `render` gives.
pub async fn serve(listener: tokio::net::TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
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
        let render = render.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                let render = render.clone();
                async move {
                    let response = if req.uri().path() == "/metrics" {
                        hyper::Response::builder()
                            .header(
                                "content-type",
                                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                            )
                            .body(Full::new(Bytes::from(render())))
                    } else {
                        hyper::Response::builder().status(404).body(Full::new(Bytes::from("try /metrics\n")))
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
