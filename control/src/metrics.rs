//! The manager's Prometheus metrics (OpenMetrics text on `GET /metrics`): its raft role, term and
//! applied index, the node sessions it holds, the slices it sends them (whole or as deltas) and
//! their bytes, the certificates it issues, and the size of the cluster.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

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
/// from the manager when scraped ([`crate::manager::Manager::metrics_text`]).
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
