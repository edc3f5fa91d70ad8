//! meshd's Prometheus metrics, one registry for the whole agent (OpenMetrics text on
//! `GET /metrics`): the mesh's requests and verdicts by rule and service, bytes, latency and
//! outbound outcomes; identity's workload certificate expiry; and the overlay's packet and drop
//! counters, read from `tun` at each scrape.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A decision's labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Verdict {
    pub source: String,
    pub destination: String,
    pub port: u16,
    /// `http` (a request) or `tcp` (a connection).
    pub kind: &'static str,
    /// `allow`, `deny`, or `dry_run_allow` / `dry_run_deny` for what a dry-run rule would have done.
    pub verdict: &'static str,
    /// The rule's name, or `default`.
    pub rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Direction {
    /// `inbound` (from other nodes' meshd into local workloads) or `outbound`.
    pub direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Destination {
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Endpoint {
    pub endpoint: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    /// `ok`, `refused` (by the destination), `unreachable`, `no_certificate`, `no_endpoint`.
    pub outcome: &'static str,
}

/// Every metric meshd exports.
pub struct Metrics {
    registry: Registry,
    pub verdicts: Family<Verdict, Counter>,
    pub bytes: Family<Direction, Counter>,
    /// Seconds from a request's arrival to its response's head, by destination service.
    pub latency: Family<Destination, Histogram>,
    /// Unix time at which each local endpoint's workload certificate expires.
    pub certificate_expiry: Family<Endpoint, Gauge>,
    /// Outbound connections from local workloads, by outcome.
    pub outbound: Family<Outcome, Counter>,
    /// Connections taken on published ports, by outcome (as `outbound`).
    pub ingress: Family<Outcome, Counter>,
    /// The overlay's counters, read at each scrape.
    overlay: std::sync::OnceLock<Arc<tun::core::Counters>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        let mut registry = Registry::with_prefix("mesh");
        let verdicts = Family::<Verdict, Counter>::default();
        registry.register("verdicts", "Requests and connections decided by the policy", verdicts.clone());
        let bytes = Family::<Direction, Counter>::default();
        registry.register("proxied_bytes", "Bytes carried through the mesh", bytes.clone());
        let latency = Family::<Destination, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.0001, 2.0, 18))
        });
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its response's head",
            latency.clone(),
        );
        let certificate_expiry = Family::<Endpoint, Gauge>::default();
        registry.register(
            "workload_certificate_expiry_timestamp_seconds",
            "When each local endpoint's workload certificate expires",
            certificate_expiry.clone(),
        );
        let outbound = Family::<Outcome, Counter>::default();
        registry.register(
            "outbound_connections",
            "Connections from local workloads, by outcome",
            outbound.clone(),
        );
        let ingress = Family::<Outcome, Counter>::default();
        registry.register(
            "ingress_connections",
            "Connections taken on published ports, by outcome",
            ingress.clone(),
        );
        Metrics {
            ingress,
            registry,
            verdicts,
            bytes,
            latency,
            certificate_expiry,
            outbound,
            overlay: std::sync::OnceLock::new(),
        }
    }
}

impl Metrics {
    /// Exports the overlay's counters too.
    pub fn with_overlay(&self, counters: Arc<tun::core::Counters>) {
        let _ = self.overlay.set(counters);
    }

    /// The OpenMetrics text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode_registry(&mut out, &self.registry)
            .expect("writing to a String");
        if let Some(c) = self.overlay.get() {
            let _ = writeln!(out, "# HELP mesh_overlay_packets Overlay packets by direction.");
            let _ = writeln!(out, "# TYPE mesh_overlay_packets counter");
            let _ = writeln!(
                out,
                "mesh_overlay_packets_total{{direction=\"sent\"}} {}",
                c.sent.load(Ordering::Relaxed)
            );
            let _ = writeln!(
                out,
                "mesh_overlay_packets_total{{direction=\"received\"}} {}",
                c.received.load(Ordering::Relaxed)
            );
            let _ = writeln!(out, "# HELP mesh_overlay_drops Overlay packets dropped, by reason.");
            let _ = writeln!(out, "# TYPE mesh_overlay_drops counter");
            for (reason, n) in c.all_drops() {
                let _ = writeln!(out, "mesh_overlay_drops_total{{reason=\"{}\"}} {n}", reason.name());
            }
        }
        prometheus_client::encoding::text::encode_eof(&mut out).expect("writing to a String");
        out
    }
}
