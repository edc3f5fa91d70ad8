//! The sidecar-free mTLS mesh: one proxy per node, in meshd.
//!
//! ```text
//!  workload `web` (netns)            node A meshd                node B meshd            workload `api`
//!  connect(api VIP:80) ──► nft redirect to ──► mTLS (web's cert) ──► mesh port ──► policy ──► api:80
//!                          127.0.0.1:15001        HTTP/2 CONNECT        verify peer     per request
//!                          in web's netns         pooled per (web, B)   (SPIFFE ID)     (403 or forward)
//! ```
//!
//! * Outbound ([`outbound`]): in each workload namespace an nftables rule redirects every
//!   (virtual IP, TCP port) of the services on its networks to meshd's listener there, so meshd
//!   knows which workload called; the original destination names the service. A connection is
//!   carried to an endpoint (round robin, skipping those that failed lately) over one HTTP/2
//!   CONNECT stream on a TLS 1.3 connection to the endpoint's node, presenting the caller's
//!   workload certificate as identity last published it; the connection is reused for every
//!   later stream from that workload to that node while that certificate is the one in place.
//! * Inbound ([`inbound`]): the mesh port (TCP, the underlay port's number) presents the node
//!   certificate identity last published ([`tls`]), requires a workload certificate of this
//!   cluster from a node not removed, then decides with the policy: at CONNECT time for opaque
//!   TCP ports; per request (HTTP/1.1 and HTTP/2, with hyper) for HTTP ports, answering 403 with
//!   the rule and a request ID, or forwarding to the local workload. The view (policy,
//!   endpoints) is read per request, so a new policy applies at once.
//!
//! The same [`View`] is the overlay's word on new flows into local workloads (the no-bypass
//! filter in `tun` asks it through [`Admission`]).

pub mod egress;
pub mod inbound;
pub mod ingress;
pub mod outbound;
pub mod tls;

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use mesh_api::ids::{ClusterId, NodeId};
use mesh_api::model::PortSpec;
use mesh_api::slice::NodeSlice;
use policy::{Action, Decision, Engine, Request};
use tokio::sync::watch;
use tracing::error;
use tun::filter::Admission;

use crate::metrics::Metrics;
use crate::netns::Netns;

/// How long an endpoint that could not be reached is skipped.
pub const FAILED_FOR: Duration = Duration::from_secs(10);

/// A local endpoint's address on one network, as the inbound side serves it.
pub struct LocalTarget {
    pub service: String,
    pub network: String,
    pub ports: Vec<PortSpec>,
    pub netns: Arc<Netns>,
}

/// An endpoint a service can be reached at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub address: Ipv4Addr,
    pub node: NodeId,
    /// The node's mesh port.
    pub mesh: SocketAddr,
}

/// The endpoints of one service on one network, taken in turn.
pub struct Route {
    pub targets: Vec<Target>,
    next: AtomicUsize,
}

impl Route {
    pub fn new(targets: Vec<Target>) -> Route {
        Route { targets, next: AtomicUsize::new(0) }
    }

    /// The next endpoint in turn that has not failed lately (or, when all have, the next one).
    pub fn pick(&self, failed: &Mutex<HashMap<Ipv4Addr, Instant>>) -> Option<&Target> {
        if self.targets.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let failed = failed.lock().expect("lock");
        let now = Instant::now();
        (0..self.targets.len())
            .map(|i| &self.targets[(start + i) % self.targets.len()])
            .find(|t| failed.get(&t.address).is_none_or(|at| now.duration_since(*at) > FAILED_FOR))
            .or(Some(&self.targets[start % self.targets.len()]))
    }
}

/// What the mesh knows at one slice version: swapped whole on change.
#[derive(Default)]
pub struct View {
    /// Distinct for every view built (0: the empty one): the overlay's filter caches verdicts
    /// per version.
    version: u64,
    /// `None` when no policy is in force: everything is denied.
    engine: Option<Arc<Engine>>,
    /// Overlay address -> service, for every endpoint the slice shows.
    by_address: HashMap<Ipv4Addr, String>,
    /// Local endpoint address -> what serves it.
    pub local: HashMap<Ipv4Addr, LocalTarget>,
    /// (network, service) -> its endpoints.
    routes: HashMap<(String, String), Arc<Route>>,
    /// Service -> the networks it is on (those this node sees).
    networks_of: HashMap<String, HashSet<String>>,
    pub removed: HashSet<NodeId>,
    /// (service, node) for every endpoint the slice shows: who hosts what, now.
    hosts: HashSet<(String, NodeId)>,
    /// (local service, target port) -> the nodes that publish it: the only ones admitted as
    /// `ingress` there.
    ingress: HashMap<(String, u16), HashSet<NodeId>>,
    /// The cluster's own addresses outside the overlay (every node's underlay address this node
    /// knows, and the managers') and the subnets of its networks: never a way out of the mesh.
    cluster_addresses: HashSet<Ipv4Addr>,
    subnets: Vec<ipnet::Ipv4Net>,
}

impl View {
    /// The view of `slice`, with `local` the local endpoints' addresses.
    pub fn build(
        slice: &NodeSlice,
        local: HashMap<Ipv4Addr, LocalTarget>,
        engine: Option<Arc<Engine>>,
    ) -> View {
        let mut by_address = HashMap::new();
        let mut routes = HashMap::new();
        let mut hosts = HashSet::new();
        let mut networks_of: HashMap<String, HashSet<String>> = HashMap::new();
        let mut cluster_addresses: HashSet<Ipv4Addr> = slice
            .managers
            .iter()
            .filter_map(|m| m.parse::<SocketAddr>().ok())
            .filter_map(|m| match m.ip() {
                std::net::IpAddr::V4(a) => Some(a),
                std::net::IpAddr::V6(_) => None,
            })
            .collect();
        for network in &slice.networks {
            for peer in network.peers.iter() {
                if let Some(SocketAddr::V4(underlay)) = peer.underlay {
                    cluster_addresses.insert(*underlay.ip());
                }
            }
            let nodes: HashMap<Ipv4Addr, (&NodeId, Option<SocketAddr>)> =
                network.peers.iter().map(|p| (p.address, (&p.node, p.underlay))).collect();
            for record in network.services.iter() {
                networks_of.entry(record.name.clone()).or_default().insert(network.name.clone());
                let mut targets = Vec::new();
                for address in &record.endpoints {
                    by_address.insert(*address, record.name.clone());
                    if let Some((node, _)) = nodes.get(address) {
                        hosts.insert((record.name.clone(), (*node).clone()));
                    }
                    if let Some((node, Some(underlay))) = nodes.get(address) {
                        targets.push(Target { address: *address, node: (*node).clone(), mesh: *underlay });
                    }
                }
                routes.insert(
                    (network.name.clone(), record.name.clone()),
                    Arc::new(Route { targets, next: AtomicUsize::new(0) }),
                );
            }
        }
        static BUILT: AtomicU64 = AtomicU64::new(0);
        View {
            version: BUILT.fetch_add(1, Ordering::Relaxed) + 1,
            engine,
            by_address,
            local,
            routes,
            networks_of,
            removed: slice.removed_nodes.iter().cloned().collect(),
            hosts,
            ingress: slice
                .ingress
                .iter()
                .map(|a| ((a.service.clone(), a.target), a.nodes.iter().cloned().collect()))
                .collect(),
            cluster_addresses,
            subnets: slice.networks.iter().map(|n| n.subnet).collect(),
        }
    }

    pub fn route(&self, network: &str, service: &str) -> Option<Arc<Route>> {
        self.routes.get(&(network.to_owned(), service.to_owned())).cloned()
    }

    /// Whether `peer` may still call at all, checked on every new stream and request and while a
    /// tunnel is open: its certificate unexpired, its node not removed and still hosting an
    /// endpoint of its service. `None`: it may; else why not.
    pub fn refuses(&self, peer: &tls::Peer) -> Option<String> {
        if time::OffsetDateTime::now_utc() >= peer.not_after {
            return Some(format!("the certificate of {} expired at {}", peer.endpoint, peer.not_after));
        }
        if self.removed.contains(&peer.node) {
            return Some(format!("{} holds a certificate of removed node {}", peer.endpoint, peer.node));
        }
        if peer.ingress {
            if !self.ingress.values().any(|nodes| nodes.contains(&peer.node)) {
                return Some(format!(
                    "node {} publishes no port of a service here (a node's certificate is not a workload's)",
                    peer.node
                ));
            }
            return None;
        }
        if !self.hosts.contains(&(peer.service.clone(), peer.node.clone())) {
            return Some(format!(
                "node {} no longer hosts an endpoint of `{}` ({} is not one any more)",
                peer.node, peer.service, peer.endpoint
            ));
        }
        None
    }

    /// Whether `peer`, a node carrying published ports' clients, may reach `service`'s `port`:
    /// only if it publishes a port leading there. `None`: it may; else why not.
    pub fn admits_ingress(&self, peer: &tls::Peer, service: &str, port: u16) -> Option<String> {
        let admitted = self.ingress.get(&(service.to_owned(), port)).is_some_and(|n| n.contains(&peer.node));
        (!admitted).then(|| format!("node {} publishes no port leading to `{service}`:{port}", peer.node))
    }

    /// Whether `service` is on `network`.
    pub fn on_network(&self, service: &str, network: &str) -> bool {
        self.networks_of.get(service).is_some_and(|n| n.contains(network))
    }

    /// The policy's decision on a connection leaving the mesh; with no policy in force, deny.
    pub fn decide_egress(&self, request: &policy::EgressRequest<'_>) -> Decision {
        match &self.engine {
            Some(engine) => engine.evaluate_egress(request),
            None => Decision { verdict: Action::Deny, rule: None, dry_run: Vec::new() },
        }
    }

    /// Why `address` is never a destination outside the mesh, whatever the policy says: this
    /// host, the cluster's nodes and managers, the mesh's own subnets, and addresses that are
    /// nobody's on the internet (loopback, `0/8`, link-local with the clouds' metadata services,
    /// multicast, `240/4` and broadcast). `None` for any other.
    pub fn reserved(&self, address: Ipv4Addr) -> Option<&'static str> {
        let [first, ..] = address.octets();
        if address.is_loopback() || first == 0 {
            Some("a loopback or unspecified address")
        } else if address.is_link_local() {
            Some("a link-local address (169.254/16: the clouds' metadata services)")
        } else if address.is_multicast() || first >= 240 {
            Some("a multicast, reserved or broadcast address")
        } else if self.cluster_addresses.contains(&address) {
            Some("an address of the cluster's own nodes or managers")
        } else if self.subnets.iter().any(|n| n.contains(&address)) {
            Some("an address of the mesh's own networks")
        } else {
            None
        }
    }

    /// What `source` may reach outside the mesh (see [`Engine::egress_reach`]); nothing with no
    /// policy in force.
    pub fn egress_reach(&self, source: &str) -> (std::collections::BTreeSet<String>, bool) {
        self.engine.as_ref().map(|e| e.egress_reach(source)).unwrap_or_default()
    }

    /// The policy's decision; with no policy in force, deny.
    pub fn decide(&self, request: &Request<'_>) -> Decision {
        match &self.engine {
            Some(engine) => engine.evaluate(request),
            None => Decision { verdict: Action::Deny, rule: None, dry_run: Vec::new() },
        }
    }
}

impl Admission for View {
    fn version(&self) -> u64 {
        self.version
    }

    fn opens(&self, from: Ipv4Addr, to: Ipv4Addr, port: u16) -> bool {
        let (Some(source), Some(local)) = (self.by_address.get(&from), self.local.get(&to)) else {
            return false;
        };
        // A port declared `http` is reached only through the mesh, whatever `default` and `tcp`
        // rules say: an overlay flow straight to it would skip mTLS and every HTTP rule.
        if local.ports.iter().any(|p| p.port == port && p.protocol == mesh_api::model::Protocol::Http) {
            return false;
        }
        let request = Request::tcp(source, &local.service, port);
        self.decide(&request).allowed()
    }
}

/// The mesh's shared state.
pub struct Mesh {
    /// The cluster ID (the O of every certificate).
    pub cluster: ClusterId,
    /// The cluster's roots: replaced whole when they change (a root rotation); each new
    /// connection, in or out, is verified against those of its moment, and an open one whose
    /// peer chains to a root dropped is cut.
    pub roots: watch::Sender<Arc<mesh_api::trust::Trust>>,
    /// The mesh port's verifier of client certificates, following `roots`.
    pub client_verifier: Arc<tls::ClientVerifier>,
    /// Swapped whole per slice; shared with the overlay's filter.
    pub view: Arc<ArcSwap<View>>,
    pub metrics: Arc<Metrics>,
    pub node_certificate: Arc<tls::NodeCertificate>,
    pub pool: outbound::Pool,
    /// Endpoint address -> when reaching it last failed.
    pub failed: Mutex<HashMap<Ipv4Addr, Instant>>,
    /// The current answers of the names egress rules name.
    pub egress: Arc<egress::Names>,
    /// The compiled policy, by version: compiled once per version.
    engine: Mutex<Option<(u64, Arc<Engine>)>>,
}

impl Mesh {
    pub fn new(
        cluster: ClusterId,
        roots: mesh_api::trust::Trust,
        node_certificate: Arc<tls::NodeCertificate>,
        metrics: Arc<Metrics>,
    ) -> Result<Mesh, mesh_api::tls::TlsError> {
        Ok(Mesh {
            cluster,
            client_verifier: Arc::new(tls::ClientVerifier::new(&roots)?),
            roots: watch::Sender::new(Arc::new(roots)),
            view: Arc::new(ArcSwap::from_pointee(View::default())),
            metrics,
            node_certificate,
            pool: outbound::Pool::default(),
            failed: Mutex::new(HashMap::new()),
            egress: Arc::new(egress::Names::default()),
            engine: Mutex::new(None),
        })
    }

    /// Verifies peers against `roots` from the next connection on.
    pub fn set_roots(&self, roots: mesh_api::trust::Trust) -> Result<(), mesh_api::tls::TlsError> {
        if *self.roots.borrow().as_ref() == roots {
            return Ok(());
        }
        self.client_verifier.replace(&roots)?;
        let dropped = self.roots.borrow().drops_any(&roots);
        self.roots.send_replace(Arc::new(roots));
        if dropped {
            // Pooled connections were verified against a root trusted no more: open new ones.
            self.pool.clear();
        }
        Ok(())
    }

    /// The engine for `slice`'s policy, compiled when its version is new.
    pub fn engine(&self, slice: &NodeSlice) -> Option<Arc<Engine>> {
        let policy = slice.policy.as_ref()?;
        let mut cached = self.engine.lock().expect("lock");
        if let Some((version, engine)) = cached.as_ref()
            && *version == policy.version
        {
            return Some(engine.clone());
        }
        match policy::Policy::parse("policy from control", &policy.text) {
            Ok(p) => {
                let engine = Arc::new(Engine::compile(&p));
                *cached = Some((policy.version, engine.clone()));
                Some(engine)
            }
            Err(e) => {
                error!(version = policy.version, error = %e, "the policy from control does not parse; denying everything");
                None
            }
        }
    }

    pub fn trust(&self) -> outbound::Trust<'_> {
        outbound::Trust { roots: self.roots.borrow().clone(), cluster: self.cluster.as_str() }
    }

    /// Marks the endpoint at `address` as failed just now.
    pub fn failed(&self, address: Ipv4Addr) {
        self.failed.lock().expect("lock").insert(address, Instant::now());
    }
}

/// A short random request ID, named in 403 answers and logs.
pub fn request_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}
