//! Ingress: the ports this node publishes (`meshctl service create --publish`).
//!
//! ```text
//!  client ──► PUBLISHED port ──► mTLS (node cert) ──► endpoint's node ──► policy, from = "ingress" ──► TARGET
//!             host namespace     HTTP/2 CONNECT        mesh port            per request for /http
//! ```
//!
//! For each port its slice lists, meshd listens in the host's own namespace and carries every
//! connection, bytes as they come, over one CONNECT stream to an endpoint of the service (round
//! robin, skipping endpoints that failed lately), presenting this node's certificate: the
//! destination admits it as the source `ingress` only if the slice names this node as one that
//! publishes that port ([`super::View::admits_ingress`]), then decides with the policy like any
//! mesh traffic. The client's address travels in [`INGRESS_CLIENT`] and reaches the workload as
//! `x-forwarded-for`. A port that cannot be bound (taken by another program) is reported and
//! tried again every few seconds.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use hyper_util::rt::TokioIo;
use mesh_api::accept::{Admission, Permit, Quota};
use mesh_api::slice::PublishedPort;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use super::outbound::OpenError;
use super::{Mesh, Route, Target};
use crate::endpoints::{Endpoints, Published};
use crate::identity::{NodeIdentity, WorkloadIdentity};
use crate::metrics::{Direction, Outcome};

/// The header a publishing node sends with each CONNECT: its client's address. The destination
/// reads it only from a node it admits as `ingress`, and removes any the client sent.
pub const INGRESS_CLIENT: &str = "x-mesh-ingress-client";
/// How often a port that could not be bound is tried again.
const RETRY: Duration = Duration::from_secs(3);
/// The caller's name in the pool of mesh connections.
const CALLER: &str = "ingress";

/// The published ports of this node.
pub struct Ingress {
    mesh: Arc<Mesh>,
    node: watch::Receiver<Arc<NodeIdentity>>,
    endpoints: Arc<Endpoints>,
    /// Where published ports are bound (all of the host's addresses, in production).
    address: Ipv4Addr,
    ports: Mutex<BTreeMap<u16, Port>>,
    /// The connections every published port of this node holds, in all and per client address.
    admission: Arc<Admission>,
}

/// Connections held through published ports: in all (each is a file descriptor here and a
/// stream to an endpoint), and from one client address.
const CONNECTIONS: Quota = Quota { total: 4096, per_source: 256 };

struct Port {
    service: String,
    route: Arc<ArcSwap<Leads>>,
    accepting: Option<AbortOnDropHandle<()>>,
    error: Option<String>,
}

/// Where one published port leads now.
struct Leads {
    target: u16,
    route: Route,
}

impl Ingress {
    pub fn new(
        mesh: Arc<Mesh>,
        node: watch::Receiver<Arc<NodeIdentity>>,
        endpoints: Arc<Endpoints>,
        address: Ipv4Addr,
    ) -> Arc<Ingress> {
        Arc::new(Ingress {
            mesh,
            node,
            endpoints,
            address,
            ports: Mutex::new(BTreeMap::new()),
            admission: Admission::new(CONNECTIONS),
        })
    }

    /// Publishes exactly `wanted`: new ports are bound, gone ones closed (their open
    /// connections are the destination's to cut), the others lead where `wanted` says.
    pub fn update(&self, wanted: &[PublishedPort]) {
        let mut ports = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
        ports.retain(|port, held| {
            let keep = wanted.iter().any(|w| w.port == *port && w.service == held.service);
            if !keep {
                info!(port, service = %held.service, "port no longer published: closed");
            }
            keep
        });
        for w in wanted {
            let published = Arc::new(Leads {
                target: w.target,
                route: Route::new(
                    w.endpoints
                        .iter()
                        .map(|t| Target { address: t.address, node: t.node.clone(), mesh: t.mesh })
                        .collect(),
                ),
            });
            let held = ports.entry(w.port).or_insert_with(|| Port {
                service: w.service.clone(),
                route: Arc::new(ArcSwap::from(published.clone())),
                accepting: None,
                error: None,
            });
            held.route.store(published);
        }
        self.bind_missing(&mut ports);
    }

    /// Tries again, every few seconds, the ports that could not be bound; until dropped.
    pub async fn keep_trying(self: Arc<Ingress>) {
        loop {
            tokio::time::sleep(RETRY).await;
            let mut ports = self.ports.lock().unwrap_or_else(PoisonError::into_inner);
            if ports.values().any(|p| p.accepting.as_ref().is_none_or(|t| t.is_finished())) {
                self.bind_missing(&mut ports);
            }
        }
    }

    /// Binds each port not listening, and reports every port's state.
    fn bind_missing(&self, ports: &mut BTreeMap<u16, Port>) {
        for (port, held) in ports.iter_mut() {
            if held.accepting.as_ref().is_some_and(|t| !t.is_finished()) {
                continue;
            }
            match bind(SocketAddr::from((self.address, *port))) {
                Ok(listener) => {
                    if held.error.take().is_some() {
                        info!(port, service = %held.service, "published port bound at last");
                    } else {
                        info!(port, service = %held.service, "port published");
                    }
                    let accepting = accept(
                        self.mesh.clone(),
                        self.admission.clone(),
                        self.node.clone(),
                        listener,
                        held.service.clone(),
                        held.route.clone(),
                    );
                    held.accepting = Some(AbortOnDropHandle::new(tokio::spawn(accepting)));
                }
                Err(e) => {
                    let why = format!("cannot listen on {}:{port}: {e}", self.address);
                    if held.error.as_ref() != Some(&why) {
                        warn!(port, service = %held.service, error = %why, "published port not bound; trying again every 3 s");
                    }
                    held.error = Some(why);
                }
            }
        }
        self.endpoints.set_published(self.status_of(ports));
    }

    fn status_of(&self, ports: &BTreeMap<u16, Port>) -> Vec<Published> {
        ports
            .iter()
            .map(|(port, p)| Published { port: *port, service: p.service.clone(), error: p.error.clone() })
            .collect()
    }

    /// Each published port: its service and whether it listens.
    pub fn status(&self) -> Vec<Published> {
        self.status_of(&self.ports.lock().unwrap_or_else(PoisonError::into_inner))
    }
}

fn bind(address: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(address)?;
    socket.listen(1024)
}

async fn accept(
    mesh: Arc<Mesh>,
    admission: Arc<Admission>,
    node: watch::Receiver<Arc<NodeIdentity>>,
    listener: TcpListener,
    service: String,
    route: Arc<ArcSwap<Leads>>,
) {
    let mut backoff = mesh_api::accept::AcceptBackoff::default();
    loop {
        match listener.accept().await {
            Ok((stream, client)) => {
                backoff.reset();
                let Some(permit) = admission.admit(client.ip()) else {
                    mesh_api::accept::refused("too many connections through published ports", client);
                    mesh.metrics.ingress.get_or_create(&Outcome { outcome: "over_quota" }).inc();
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let identity = {
                    let node = node.borrow();
                    WorkloadIdentity { identity: node.identity.clone(), not_after: node.info.not_after }
                };
                tokio::spawn(forward(
                    mesh.clone(),
                    identity,
                    service.clone(),
                    route.load_full(),
                    client,
                    stream,
                    permit,
                ));
            }
            Err(e) => backoff.wait("a published port", &e).await,
        }
    }
}

/// Carries one client's connection to an endpoint: round robin, skipping endpoints that failed
/// lately, trying up to three.
async fn forward(
    mesh: Arc<Mesh>,
    identity: WorkloadIdentity,
    service: String,
    published: Arc<Leads>,
    client: SocketAddr,
    mut stream: TcpStream,
    _permit: Permit,
) {
    let outcome = |o: &'static str| mesh.metrics.ingress.get_or_create(&Outcome { outcome: o }).inc();
    let route = &published.route;
    if route.targets.is_empty() {
        debug!(%client, %service, "a published port's service has no endpoint; closed");
        outcome("no_endpoint");
        return;
    }
    for _ in 0..route.targets.len().min(3) {
        let Some(target) = route.pick(&mesh.failed) else { break };
        match mesh.pool.open(mesh.trust(), CALLER, &identity, target, published.target, Some(client)).await {
            Ok(tunnel) => {
                outcome("ok");
                let mut tunnel = TokioIo::new(tunnel);
                if let Ok((up, down)) = tokio::io::copy_bidirectional(&mut stream, &mut tunnel).await {
                    mesh.metrics.bytes.get_or_create(&Direction { direction: "ingress" }).inc_by(up + down);
                }
                return;
            }
            Err(OpenError::Refused { status, reason }) => {
                info!(%client, %service, status, %reason, "a published port's connection refused by the destination");
                outcome("refused");
                return;
            }
            Err(e) => {
                warn!(%client, %service, endpoint = %target.address, error = %e, "endpoint unreachable; trying another");
                mesh.failed(target.address);
            }
        }
    }
    outcome("unreachable");
}
