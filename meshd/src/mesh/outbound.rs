//! Outbound: from a local workload to a service, through the destination node's meshd.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http2;
use hyper::upgrade::Upgraded;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, instrument, warn};

use super::{Mesh, Target, tls};
use crate::identity::{WorkloadCertificate, WorkloadIdentity};
use crate::metrics::{Direction, Outcome};
use crate::netns::Netns;

/// Longest wait for a TCP connection to another node's mesh port.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest wait for the TLS handshake after it.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 flow-control windows: large, so one stream can fill a fast link.
pub const STREAM_WINDOW: u32 = 4 << 20;
pub const CONNECTION_WINDOW: u32 = 16 << 20;

/// Why a tunnel could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The destination answered, and refused (policy, identity, no such endpoint).
    #[error("refused with {status}: {reason}")]
    Refused { status: u16, reason: String },
    /// The destination could not be reached or the connection broke.
    #[error("unreachable: {0}")]
    Unreachable(String),
}

/// What a node trusts: the cluster's roots of the moment, and the cluster ID in SPIFFE IDs.
#[derive(Clone)]
pub struct Trust<'a> {
    pub roots: Arc<mesh_api::trust::Trust>,
    pub cluster: &'a str,
}

/// A TLS connection to another node's meshd, reused for every stream from one workload.
struct Connection {
    certificate_expiry: time::OffsetDateTime,
    sender: http2::SendRequest<Empty<Bytes>>,
}

/// Connections by (calling endpoint, destination mesh port).
#[derive(Default)]
pub struct Pool {
    connections: Mutex<HashMap<(String, SocketAddr), Connection>>,
}

impl Pool {
    /// Forgets every connection: the next stream of each caller opens a new one.
    pub fn clear(&self) {
        self.connections.lock().expect("lock").clear();
    }

    /// A live connection for `caller` to `target`'s node, made when there is none (or the
    /// caller's certificate changed since).
    async fn sender(
        &self,
        trust: Trust<'_>,
        caller: &str,
        identity: &WorkloadIdentity,
        target: &Target,
    ) -> Result<http2::SendRequest<Empty<Bytes>>, OpenError> {
        let key = (caller.to_owned(), target.mesh);
        if let Some(c) = self.connections.lock().expect("lock").get(&key)
            && !c.sender.is_closed()
            && c.certificate_expiry == identity.not_after
        {
            return Ok(c.sender.clone());
        }
        let unreachable =
            |e: String| OpenError::Unreachable(format!("{} ({}): {e}", target.mesh, target.node));
        let config = tls::client_config(&trust.roots, trust.cluster, &target.node, &identity.identity)
            .map_err(|e| unreachable(e.to_string()))?;
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(target.mesh))
            .await
            .map_err(|_| unreachable("connect timed out".into()))?
            .map_err(|e| unreachable(e.to_string()))?;
        tcp.set_nodelay(true).map_err(|e| unreachable(e.to_string()))?;
        let name = ServerName::try_from(tls::SERVER_NAME).expect("a valid name");
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_rustls::TlsConnector::from(config).connect(name, tcp),
        )
        .await
        .map_err(|_| unreachable("TLS handshake timed out".into()))?
        .map_err(|e| unreachable(format!("TLS: {e}")))?;
        let (sender, connection) = http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .keep_alive_interval(Duration::from_secs(30))
            .handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(format!("HTTP/2: {e}")))?;
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(error = %e, "a mesh connection ended");
            }
        });
        debug!(caller, node = %target.node, "mesh connection opened");
        self.connections
            .lock()
            .expect("lock")
            .insert(key, Connection { certificate_expiry: identity.not_after, sender: sender.clone() });
        Ok(sender)
    }

    /// Opens a tunnel for `caller` to `target`'s `port`: one CONNECT stream. `client`: the
    /// address of a published port's client, for the destination's `x-forwarded-for`.
    pub async fn open(
        &self,
        trust: Trust<'_>,
        caller: &str,
        identity: &WorkloadIdentity,
        target: &Target,
        port: u16,
        client: Option<SocketAddr>,
    ) -> Result<Upgraded, OpenError> {
        let mut sender = self.sender(trust, caller, identity, target).await?;
        let mut request = hyper::Request::connect(format!("{}:{port}", target.address));
        if let Some(client) = client {
            request = request.header(super::ingress::INGRESS_CLIENT, client.to_string());
        }
        let request = request.body(Empty::new()).expect("a valid request");
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| OpenError::Unreachable(format!("{}: {e}", target.mesh)))?;
        if response.status() != hyper::StatusCode::OK {
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            return Err(OpenError::Refused {
                status,
                reason: String::from_utf8_lossy(&body).trim().to_owned(),
            });
        }
        hyper::upgrade::on(response)
            .await
            .map_err(|e| OpenError::Unreachable(format!("{}: {e}", target.mesh)))
    }
}

/// One tunnel, without a pool: TLS 1.3 to node `node`'s mesh port `mesh` presenting `identity`,
/// then one CONNECT to `target`. For tools and tests that speak to a mesh port directly.
pub async fn connect(
    trust: Trust<'_>,
    identity: &WorkloadIdentity,
    node: &mesh_api::ids::NodeId,
    mesh: SocketAddr,
    target: SocketAddrV4,
) -> Result<TokioIo<Upgraded>, OpenError> {
    connect_for(trust, identity, node, mesh, target, None).await
}

/// [`connect`], saying the stream carries a published port's `client` (as a publishing node
/// does: the destination believes it only from one).
pub async fn connect_for(
    trust: Trust<'_>,
    identity: &WorkloadIdentity,
    node: &mesh_api::ids::NodeId,
    mesh: SocketAddr,
    target: SocketAddrV4,
    client: Option<SocketAddr>,
) -> Result<TokioIo<Upgraded>, OpenError> {
    let t = Target { address: *target.ip(), node: node.clone(), mesh };
    Pool::default().open(trust, "client", identity, &t, target.port(), client).await.map(TokioIo::new)
}

/// A workload, as the outbound side knows it.
pub struct Caller {
    /// `<service>.<slot>`.
    pub endpoint: String,
    pub service: String,
    pub netns: Arc<Netns>,
    /// Its workload certificate, as identity publishes it.
    pub certificate: WorkloadCertificate,
}

/// Where, inside each workload namespace, meshd takes the connections redirected to services.
/// (A workload cannot use this port itself.)
pub const REDIRECT_PORT: u16 = 15001;

/// A workload's interception: an nftables rule in its namespace that redirects connections for
/// every (virtual IP, TCP port) of the services on its networks — one set lookup, whatever their
/// number — to meshd's listener on `127.0.0.1:15001` there; the original destination
/// (`SO_ORIGINAL_DST`) names the service. The workload's own ports stay free.
#[derive(Default)]
pub struct Interception {
    accepting: Option<AbortOnDropHandle<()>>,
    /// The connections leaving the mesh ([`super::egress`]).
    leaving: Option<AbortOnDropHandle<()>>,
    services: Arc<arc_swap::ArcSwap<BTreeMap<SocketAddrV4, Service>>>,
    /// The subnets of the workload's networks, as the rules hold them.
    subnets: Vec<ipnet::Ipv4Net>,
}

/// What one (virtual IP, port) leads to.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Service {
    pub network: String,
    pub name: String,
}

impl Interception {
    /// Brings the interception in line with `wanted` ((VIP, port) -> service) on networks of
    /// `subnets`: every other TCP connection not to loopback leaves the mesh through meshd.
    pub async fn update(
        &mut self,
        mesh: &Arc<Mesh>,
        caller: &Arc<Caller>,
        wanted: BTreeMap<SocketAddrV4, Service>,
        subnets: Vec<ipnet::Ipv4Net>,
    ) -> std::io::Result<()> {
        if self.accepting.as_ref().is_none_or(|t| t.is_finished()) {
            let address = SocketAddr::from((Ipv4Addr::LOCALHOST, REDIRECT_PORT));
            let listener = caller.netns.listen(address).await?;
            let accepting =
                tokio::spawn(accept(mesh.clone(), caller.clone(), listener, self.services.clone()));
            self.accepting = Some(AbortOnDropHandle::new(accepting));
        }
        if self.leaving.as_ref().is_none_or(|t| t.is_finished()) {
            let address = SocketAddr::from((Ipv4Addr::LOCALHOST, super::egress::EGRESS_PORT));
            let listener = caller.netns.listen(address).await?;
            let leaving = tokio::spawn(super::egress::accept(mesh.clone(), caller.clone(), listener));
            self.leaving = Some(AbortOnDropHandle::new(leaving));
        }
        if **self.services.load() != wanted || self.subnets != subnets {
            redirect(caller.netns.name(), wanted.keys(), &subnets).await?;
            self.services.store(Arc::new(wanted));
            self.subnets = subnets;
        }
        Ok(())
    }
}

/// Replaces namespace `ns`'s redirect rules (one nftables transaction): connections to
/// `services` go to the mesh's listener; every other TCP connection except to loopback and to
/// `subnets` (the workload's networks) to the egress listener.
async fn redirect(
    ns: &str,
    services: impl Iterator<Item = &SocketAddrV4>,
    subnets: &[ipnet::Ipv4Net],
) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let elements: Vec<String> = services.map(|a| format!("{} . {}", a.ip(), a.port())).collect();
    let elements =
        if elements.is_empty() { String::new() } else { format!("elements = {{ {} }}", elements.join(", ")) };
    let inside: Vec<String> =
        std::iter::once("127.0.0.0/8".to_owned()).chain(subnets.iter().map(|n| n.to_string())).collect();
    let inside = inside.join(", ");
    let egress = super::egress::EGRESS_PORT;
    let script = format!(
        "table ip mesh {{}}\ndelete table ip mesh\n\
         table ip mesh {{\n\
           set services {{ type ipv4_addr . inet_service; {elements} }}\n\
           chain intercept {{\n\
             type nat hook output priority -100; policy accept;\n\
             ip daddr . tcp dport @services redirect to :{REDIRECT_PORT}\n\
             ip daddr {{ {inside} }} return\n\
             meta l4proto tcp redirect to :{egress}\n\
           }}\n\
         }}\n"
    );
    let mut child = tokio::process::Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| std::io::Error::new(e.kind(), format!("running nft (is nftables installed?): {e}")))?;
    child.stdin.take().expect("piped").write_all(script.as_bytes()).await?;
    let out = child.wait_with_output().await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("nft in {ns}: {}", String::from_utf8_lossy(&out.stderr).trim())))
    }
}

/// The destination a redirected connection was for.
pub(super) fn original_destination(stream: &TcpStream) -> std::io::Result<SocketAddrV4> {
    let addr = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst)?;
    Ok(SocketAddrV4::new(Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)), u16::from_be(addr.sin_port)))
}

async fn accept(
    mesh: Arc<Mesh>,
    caller: Arc<Caller>,
    listener: TcpListener,
    services: Arc<arc_swap::ArcSwap<BTreeMap<SocketAddrV4, Service>>>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let _ = stream.set_nodelay(true);
                let service = original_destination(&stream)
                    .ok()
                    .and_then(|to| Some((services.load().get(&to)?.clone(), to.port())));
                match service {
                    Some((service, port)) => {
                        tokio::spawn(forward(mesh.clone(), caller.clone(), service, port, stream));
                    }
                    None => debug!(caller = %caller.endpoint, "a connection not for a service; closed"),
                }
            }
            Err(e) => {
                warn!(error = %e, "accepting a workload's connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Carries one workload connection to an endpoint of `service`: round robin, skipping endpoints
/// that failed lately, trying up to three.
#[instrument(name = "mesh_connection", skip_all, fields(caller = %caller.endpoint, service = %service.name, port))]
async fn forward(mesh: Arc<Mesh>, caller: Arc<Caller>, service: Service, port: u16, mut stream: TcpStream) {
    let outcome = |o: &'static str| mesh.metrics.outbound.get_or_create(&Outcome { outcome: o }).inc();
    let identity = caller.certificate.borrow().clone();
    let Some(identity) = identity else {
        warn!(caller = %caller.endpoint, "no workload certificate yet; connection closed");
        outcome("no_certificate");
        return;
    };
    let Some(route) = mesh.view.load().route(&service.network, &service.name) else {
        outcome("no_endpoint");
        return;
    };
    for _ in 0..route.targets.len().min(3) {
        let Some(target) = route.pick(&mesh.failed) else { break };
        match mesh.pool.open(mesh.trust(), &caller.endpoint, &identity, target, port, None).await {
            Ok(tunnel) => {
                outcome("ok");
                let mut tunnel = TokioIo::new(tunnel);
                let copied = tokio::io::copy_bidirectional(&mut stream, &mut tunnel).await;
                if let Ok((up, down)) = copied {
                    mesh.metrics.bytes.get_or_create(&Direction { direction: "outbound" }).inc_by(up + down);
                }
                return;
            }
            Err(OpenError::Refused { status, reason }) => {
                info!(caller = %caller.endpoint, service = %service.name, port, status, %reason, "connection refused by the destination");
                outcome("refused");
                return;
            }
            Err(e) => {
                warn!(caller = %caller.endpoint, service = %service.name, endpoint = %target.address, error = %e, "endpoint unreachable; trying another");
                mesh.failed(target.address);
            }
        }
    }
    outcome("unreachable");
}
