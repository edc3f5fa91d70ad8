//! The manager's Prometheus metrics (OpenMetrics text on `GET /metrics`): its raft role, term and
//! applied index, the node sessions it holds, the slices it sends them (whole or as deltas) and
//! their bytes, the certificates it issues, and the size of the cluster. Also the small HTTP
//! server that meshd's metrics use too.

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

/// Where a manager serves its metrics unless told otherwise (meshd's port plus one, so both fit
/// on one host).
pub const DEFAULT_METRICS_ADDR: SocketAddr =
    SocketAddr::V4(std::net::SocketAddrV4::new(std::net::Ipv4Addr::LOCALHOST, 9481));

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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SliceKind {
    /// `whole` (a session's first message) or `delta`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertKind {
    /// `worker` or `manager` (node certificates, at join and renewal), or `workload`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeStateLabel {
    /// `active` or `removed`.
    pub state: &'static str,
}

/// Every metric a manager exports. Counters are counted where things happen; gauges are read
/// from the manager when scraped ([`crate::server::Manager::metrics_text`]).
pub struct Metrics {
    registry: Registry,
    pub slices: Family<SliceKind, Counter>,
    pub slice_bytes: Family<SliceKind, Counter>,
    pub certificates: Family<CertKind, Counter>,
    pub leader: Gauge,
    pub term: Gauge,
    pub applied_index: Gauge,
    pub sessions: Gauge,
    pub nodes: Family<NodeStateLabel, Gauge>,
    pub networks: Gauge,
    pub services: Gauge,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("mesh_manager");
        let m = Metrics {
            registry: Registry::default(),
            slices: Family::default(),
            slice_bytes: Family::default(),
            certificates: Family::default(),
            leader: Gauge::default(),
            term: Gauge::default(),
            applied_index: Gauge::default(),
            sessions: Gauge::default(),
            nodes: Family::default(),
            networks: Gauge::default(),
            services: Gauge::default(),
        };
        registry.register("slices_sent", "Slices sent over node sessions", m.slices.clone());
        registry.register("slice_bytes_sent", "Bytes of the slices sent (protobuf)", m.slice_bytes.clone());
        registry.register("certificates_issued", "Certificates issued", m.certificates.clone());
        registry.register("leader", "1 while this manager leads the raft group", m.leader.clone());
        registry.register("raft_term", "This manager's raft term", m.term.clone());
        registry.register(
            "raft_applied_index",
            "The last raft log index applied here",
            m.applied_index.clone(),
        );
        registry.register("sessions", "Node sessions this manager holds", m.sessions.clone());
        registry.register("nodes", "Nodes in the cluster state, by state", m.nodes.clone());
        registry.register("networks", "Networks in the cluster state", m.networks.clone());
        registry.register("services", "Services in the cluster state", m.services.clone());
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The OpenMetrics text of every metric, as they stand.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}

/// Serves `GET /metrics` on `listener` until dropped, answering with what `render` gives.
pub async fn serve(listener: tokio::net::TcpListener, render: Arc<dyn Fn() -> String + Send + Sync>) {
    let address = listener.local_addr().map(|a| a.to_string()).unwrap_or_default();
    info!(%address, "metrics at http://{address}/metrics");
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "accepting a metrics connection failed");
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
