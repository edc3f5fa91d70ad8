//! The data plane's I/O: a tun device per workload and network, one UDP socket on the underlay,
//! and the packet core between them. Tables are swapped whole when the slice changes (readers
//! never lock); one task receives from the underlay and owns the replay windows and the
//! no-bypass filter's state. The mesh (mTLS proxy, policy) runs beside it on the same workloads.

use std::collections::{HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_api::keys::KeyUse;
use mesh_api::slice::NodeSlice;
use tokio::net::UdpSocket;
use tokio::sync::Mutex;
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};
use tun::aead::Backend;
use tun::core::{Config, Counters, KeyRole, NetworkConfig, Opener, PeerConfig, Sealer, Tables};

use crate::dns::{Upstream, Visibility, Zone};
use crate::filter::{self, Flow};
use crate::mesh::outbound::{Caller, Interception, Service};
use crate::mesh::{LocalTarget, Mesh, View, metrics::Metrics, tls::NodeCertificate};
use crate::workload::{self, Netns};

/// The workload interfaces by (network ID, local address), swapped whole on change.
type Devices = Arc<ArcSwap<HashMap<(u32, Ipv4Addr), Arc<tun_rs::AsyncDevice>>>>;

/// Largest datagram read from the underlay.
const MAX_DATAGRAM: usize = 65535;

/// One endpoint's namespace and what runs for it.
struct Workload {
    /// Network ID -> (address, device).
    devices: Vec<(u32, Ipv4Addr, Arc<tun_rs::AsyncDevice>)>,
    /// The networks it is on (by name) and the names its DNS server answers.
    networks: std::collections::BTreeSet<String>,
    service: String,
    zone: Arc<ArcSwap<Zone>>,
    tasks: Vec<JoinHandle<()>>,
    /// The mesh's side of the workload: who it is, and the interception of its connections to
    /// services.
    caller: Arc<Caller>,
    interception: Interception,
}

impl Drop for Workload {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The running data plane.
pub struct Dataplane {
    prefix: String,
    socket: Arc<UdpSocket>,
    tables: Arc<ArcSwap<Tables>>,
    /// (network ID, local address) -> device.
    devices: Devices,
    sealer: Arc<Sealer>,
    pub counters: Arc<Counters>,
    workloads: Mutex<HashMap<String, Workload>>,
    upstream: Arc<Upstream>,
    visibility: Visibility,
    /// The node's state directory, for asking control for workload certificates.
    state_dir: std::path::PathBuf,
    /// Endpoint (`service.slot`) -> its current workload certificate.
    pub certificates: Certificates,
    pub mesh: Arc<Mesh>,
    /// The send paths' notes of flows workloads open, for the receive path's filter.
    flows: tokio::sync::mpsc::Sender<Flow>,
    /// Bumped with every view, so the filter's cached verdicts follow.
    generation: std::sync::atomic::AtomicUsize,
    receiver: JoinHandle<()>,
    mesh_tasks: Vec<JoinHandle<()>>,
}

/// Each local endpoint's workload certificate, replaced whole on renewal (the old one serves until
/// the new one is in place).
pub type Certificates =
    Arc<std::sync::Mutex<std::collections::BTreeMap<String, crate::identity::WorkloadIdentity>>>;

impl Drop for Dataplane {
    fn drop(&mut self) {
        self.receiver.abort();
        for t in &self.mesh_tasks {
            t.abort();
        }
    }
}

/// How often the mesh port looks for a renewed node certificate on disk.
const NODE_CERTIFICATE_CHECK: std::time::Duration = std::time::Duration::from_secs(30);

fn empty_tables() -> Tables {
    Tables::new(&Config { local_index: 0, networks: vec![] }, Backend::DEFAULT)
}

/// Socket buffer size asked for: bursts of a fast TCP flow fit without drops.
const SOCKET_BUFFER: usize = 8 << 20;

/// The underlay UDP socket, with large buffers.
fn underlay_socket(bind: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    socket.bind(&bind.into())?;
    UdpSocket::from_std(socket.into())
}

/// The core's view of a slice.
pub fn config(slice: &NodeSlice) -> Config {
    Config {
        local_index: slice.node_index,
        networks: slice
            .networks
            .iter()
            .map(|n| NetworkConfig {
                id: n.id,
                name: n.name.clone(),
                encrypted: n.encrypted,
                keys: n
                    .keys
                    .iter()
                    .map(|(u, k)| {
                        let role = match u {
                            KeyUse::Next => KeyRole::Next,
                            KeyUse::Current => KeyRole::Current,
                            KeyUse::Previous => KeyRole::Previous,
                        };
                        (role, k.epoch, k.key)
                    })
                    .collect(),
                peers: n
                    .peers
                    .iter()
                    .map(|p| PeerConfig {
                        address: p.address,
                        node_index: p.node_index,
                        underlay: p.underlay,
                    })
                    .collect(),
            })
            .collect(),
    }
}

impl Dataplane {
    /// Binds the underlay socket (UDP) and the mesh port (TCP, same address and port), starts
    /// receiving, and serves metrics on `metrics` when given. `boot` is this run's boot number.
    pub async fn start(
        state_dir: &std::path::Path,
        underlay: SocketAddr,
        prefix: &str,
        boot: u16,
        visibility: Visibility,
        metrics: Option<SocketAddr>,
    ) -> std::io::Result<Dataplane> {
        let bind = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::UNSPECIFIED), underlay.port());
        let socket = Arc::new(underlay_socket(bind)?);
        let mesh_listener = tokio::net::TcpListener::bind(bind)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("mesh port {bind}/tcp: {e}")))?;
        let metrics_listener = match metrics {
            Some(address) => Some(mesh_api::metrics_http::bind(address).await?),
            None => None,
        };
        let node = crate::identity::NodeDir::new(state_dir).load().map_err(std::io::Error::other)?;
        let ca_der = mesh_api::pki::pem_to_der(&node.ca_pem).map_err(std::io::Error::other)?;
        let node_certificate = Arc::new(NodeCertificate::new(&node.identity).map_err(std::io::Error::other)?);
        let counters = Arc::new(Counters::default());
        let registry = Arc::new(Metrics::default());
        registry.with_overlay(counters.clone());
        let certificates = Certificates::default();
        let mesh = Arc::new(Mesh::new(
            node.info.organization.clone(),
            ca_der.clone(),
            node_certificate.clone(),
            certificates.clone(),
            registry.clone(),
        ));
        let acceptor = tokio_rustls::TlsAcceptor::from(
            crate::mesh::tls::server_config(&ca_der, node_certificate).map_err(std::io::Error::other)?,
        );
        let mut mesh_tasks = vec![
            tokio::spawn(crate::mesh::inbound::serve(mesh.clone(), mesh_listener, acceptor)),
            tokio::spawn(keep_node_certificate(state_dir.to_owned(), mesh.clone(), node.identity.cert_pem)),
        ];
        if let Some(listener) = metrics_listener {
            mesh_tasks.push(tokio::spawn(mesh_api::metrics_http::serve(
                listener,
                Arc::new(move || registry.encode()),
            )));
        }
        let tables = Arc::new(ArcSwap::from_pointee(empty_tables()));
        let devices = Arc::new(ArcSwap::from_pointee(HashMap::new()));
        let (flows, noted) = filter::channel();
        let receiver = tokio::spawn(receive(
            socket.clone(),
            tables.clone(),
            devices.clone(),
            counters.clone(),
            mesh.clone(),
            filter::Incoming::new(noted),
        ));
        // Leftovers of an earlier run under this prefix are removed; what is wanted is rebuilt.
        for ns in workload::list(prefix).await.unwrap_or_default() {
            info!(namespace = %ns, "removing a namespace left by an earlier run");
            let _ = workload::delete(&ns).await;
        }
        info!(%bind, prefix, boot, "data plane listening (overlay on UDP, mesh on TCP)");
        Ok(Dataplane {
            prefix: prefix.to_owned(),
            socket,
            tables,
            devices,
            sealer: Arc::new(Sealer::new(boot, counters.clone())),
            counters,
            workloads: Mutex::new(HashMap::new()),
            upstream: Arc::new(Upstream::from_system()),
            visibility,
            state_dir: state_dir.to_owned(),
            certificates,
            mesh,
            flows,
            generation: Default::default(),
            receiver,
            mesh_tasks,
        })
    }

    /// Brings workloads and tables in line with `slice`.
    pub async fn apply(&self, slice: &NodeSlice) {
        self.tables.store(Arc::new(Tables::new(&config(slice), Backend::DEFAULT)));
        let mut workloads = self.workloads.lock().await;
        let wanted: HashMap<String, &mesh_api::slice::LocalEndpoint> = slice
            .endpoints
            .iter()
            .map(|e| (workload::namespace(&self.prefix, &e.service, e.slot), e))
            .collect();
        let stale: Vec<String> = workloads.keys().filter(|ns| !wanted.contains_key(*ns)).cloned().collect();
        let wanted_endpoints: HashSet<String> =
            wanted.values().map(|e| format!("{}.{}", e.service, e.slot)).collect();
        self.certificates.lock().expect("lock").retain(|k, _| wanted_endpoints.contains(k));
        for ns in stale {
            workloads.remove(&ns);
            if let Err(e) = workload::delete(&ns).await {
                warn!(namespace = %ns, error = %e, "removing a workload namespace failed");
            }
            info!(namespace = %ns, "workload removed");
        }
        for (ns, endpoint) in wanted {
            let mut addresses: Vec<(u32, Ipv4Addr, u8)> = Vec::new();
            for (name, address) in &endpoint.addresses {
                if let Some(n) = slice.networks.iter().find(|n| &n.name == name) {
                    addresses.push((n.id, *address, n.subnet.prefix_len()));
                }
            }
            addresses.sort();
            if let Some(existing) = workloads.get(&ns) {
                let have: Vec<(u32, Ipv4Addr)> =
                    existing.devices.iter().map(|(id, a, _)| (*id, *a)).collect();
                let want: Vec<(u32, Ipv4Addr)> = addresses.iter().map(|(id, a, _)| (*id, *a)).collect();
                if have == want {
                    continue;
                }
                workloads.remove(&ns);
            }
            let networks = endpoint.addresses.keys().cloned().collect();
            match self
                .build(&ns, &addresses, networks, &endpoint.service, endpoint.slot, endpoint.command.clone())
                .await
            {
                Ok(w) => {
                    info!(namespace = %ns, addresses = ?addresses, "workload ready");
                    workloads.insert(ns, w);
                }
                Err(e) => warn!(namespace = %ns, error = %e, "building the workload failed"),
            }
        }
        // Every workload's names follow the slice at once.
        for w in workloads.values() {
            let visible = (self.visibility == Visibility::Policy).then(|| {
                let mut v = slice.visibility.get(&w.service).cloned().unwrap_or_default();
                v.insert(w.service.clone());
                v
            });
            w.zone.store(Arc::new(Zone::visible_to(slice, &w.networks, visible.as_ref())));
        }
        let devices: HashMap<(u32, Ipv4Addr), Arc<tun_rs::AsyncDevice>> = workloads
            .values()
            .flat_map(|w| w.devices.iter().map(|(id, a, d)| ((*id, *a), d.clone())))
            .collect();
        self.devices.store(Arc::new(devices));
        self.apply_mesh(slice, &mut workloads).await;
    }

    /// The mesh's view of `slice`, then each workload's interception: every (virtual IP, TCP
    /// port) of every service on its networks.
    async fn apply_mesh(&self, slice: &NodeSlice, workloads: &mut HashMap<String, Workload>) {
        let mut local = HashMap::new();
        for w in workloads.values() {
            let endpoint =
                slice.endpoints.iter().find(|e| format!("{}.{}", e.service, e.slot) == w.caller.endpoint);
            let ports = slice
                .networks
                .iter()
                .flat_map(|n| n.services.iter())
                .find(|r| r.name == w.service)
                .map(|r| r.ports.clone())
                .unwrap_or_default();
            for (network, address) in endpoint.iter().flat_map(|e| &e.addresses) {
                local.insert(
                    *address,
                    LocalTarget {
                        service: w.service.clone(),
                        network: network.clone(),
                        ports: ports.clone(),
                        netns: w.caller.netns.clone(),
                    },
                );
            }
        }
        let generation = self.generation.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        self.mesh.view.store(Arc::new(View::build(slice, local, self.mesh.engine(slice), generation)));
        for w in workloads.values_mut() {
            let mut wanted = std::collections::BTreeMap::new();
            for network in slice.networks.iter().filter(|n| w.networks.contains(&n.name)) {
                for record in network.services.iter() {
                    for port in record
                        .ports
                        .iter()
                        .filter(|p| p.protocol.transport() == mesh_api::model::Protocol::Tcp)
                    {
                        wanted.insert(
                            std::net::SocketAddrV4::new(record.vip, port.port),
                            Service { network: network.name.clone(), name: record.name.clone() },
                        );
                    }
                }
            }
            if let Err(e) = w.interception.update(&self.mesh, &w.caller, wanted).await {
                warn!(endpoint = %w.caller.endpoint, error = %e, "cannot intercept the workload's connections to services");
            }
        }
    }

    async fn build(
        &self,
        ns: &str,
        addresses: &[(u32, Ipv4Addr, u8)],
        networks: std::collections::BTreeSet<String>,
        service: &str,
        slot: u32,
        command: Option<String>,
    ) -> std::io::Result<Workload> {
        workload::create(ns).await?;
        let netns = Arc::new(Netns::enter(ns)?);
        let (udp, tcp) = workload::bind_dns(ns)?;
        let zone = Arc::new(ArcSwap::from_pointee(Zone::default()));
        let dns = tokio::spawn(crate::dns::serve(
            UdpSocket::from_std(udp)?,
            tokio::net::TcpListener::from_std(tcp)?,
            zone.clone(),
            self.upstream.clone(),
        ));
        let mut devices = Vec::new();
        let mut tasks = vec![dns];
        for (i, (id, address, prefix_len)) in addresses.iter().enumerate() {
            let sync = workload::open_tun(ns, &format!("{}{i}", workload::INTERFACE), *address, *prefix_len)?;
            let device = Arc::new(tun_rs::AsyncDevice::new(sync)?);
            let shared = Shared {
                socket: self.socket.clone(),
                tables: self.tables.clone(),
                devices: self.devices.clone(),
                sealer: self.sealer.clone(),
                mesh: self.mesh.clone(),
            };
            let outgoing = filter::Outgoing::new(self.flows.clone());
            tasks.push(tokio::spawn(send(device.clone(), *id, *address, shared, outgoing)));
            devices.push((*id, *address, device));
        }
        if let Some(command) = command {
            tasks.push(workload::supervise(ns.to_owned(), command));
        }
        tasks.push(tokio::spawn(keep_certificate(
            self.state_dir.clone(),
            service.to_owned(),
            slot,
            self.certificates.clone(),
            self.mesh.metrics.clone(),
        )));
        let caller = Arc::new(Caller { endpoint: format!("{service}.{slot}"), netns });
        Ok(Workload {
            devices,
            networks,
            service: service.to_owned(),
            zone,
            tasks,
            caller,
            interception: Interception::default(),
        })
    }

    /// Removes every workload (at shutdown).
    pub async fn shutdown(&self) {
        let mut workloads = self.workloads.lock().await;
        let names: Vec<String> = workloads.keys().cloned().collect();
        workloads.clear();
        for ns in names {
            let _ = workload::delete(&ns).await;
        }
    }

    /// Names of the namespaces this data plane holds.
    pub async fn namespaces(&self) -> HashSet<String> {
        self.workloads.lock().await.keys().cloned().collect()
    }
}

/// Most payload bytes in one GSO send: the whole must fit one (64 KiB) UDP datagram.
const MAX_GSO_BYTES: usize = 65000;

/// Sealed datagrams for one peer, sent with one `sendmsg` (UDP GSO) when the kernel allows.
struct Batch {
    buf: Vec<u8>,
    to: Option<SocketAddr>,
    segment: usize,
    count: usize,
}

impl Batch {
    /// Whether `datagram` for `to` can join the batch: same peer, and every datagram but the
    /// last exactly `segment` long.
    fn fits(&self, to: SocketAddr, len: usize, max: usize) -> bool {
        self.count == 0
            || (self.to == Some(to)
                && self.count < max
                && len <= self.segment
                && self.buf.len() == self.count * self.segment
                && self.buf.len() + len <= MAX_GSO_BYTES)
    }

    fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        if self.count == 0 {
            self.to = Some(to);
            self.segment = datagram.len();
        }
        self.buf.extend_from_slice(datagram);
        self.count += 1;
    }

    async fn flush(&mut self, socket: &UdpSocket, state: &quinn_udp::UdpSocketState) {
        let Some(destination) = self.to.take() else { return };
        let transmit = quinn_udp::Transmit {
            destination,
            ecn: None,
            contents: &self.buf,
            segment_size: (self.count > 1).then_some(self.segment),
            src_ip: None,
        };
        let sent =
            socket.async_io(tokio::io::Interest::WRITABLE, || state.try_send(socket.into(), &transmit)).await;
        if let Err(e) = sent {
            debug!(error = %e, %destination, "sending to a peer failed");
        }
        self.buf.clear();
        self.count = 0;
    }
}

/// Keeps endpoint `service.slot`'s workload certificate fresh: fetched at start, renewed at half
/// its lifetime (with up to 10 % jitter so a node's endpoints do not renew at once), retried with
/// backoff; the certificate in place serves until its successor is.
async fn keep_certificate(
    state_dir: std::path::PathBuf,
    service: String,
    slot: u32,
    certificates: Certificates,
    metrics: Arc<Metrics>,
) {
    let key = format!("{service}.{slot}");
    let gauge = crate::mesh::metrics::Endpoint { endpoint: key.clone() };
    // When the endpoint goes, so does its gauge.
    struct Forget(Arc<Metrics>, crate::mesh::metrics::Endpoint);
    impl Drop for Forget {
        fn drop(&mut self) {
            self.0.certificate_expiry.remove(&self.1);
        }
    }
    let _forget = Forget(metrics.clone(), gauge.clone());
    let mut attempt = 0u32;
    loop {
        match crate::identity::workload_certificate(&state_dir, &service, slot).await {
            Ok(cert) => {
                attempt = 0;
                let now = time::OffsetDateTime::now_utc();
                let left = (cert.not_after - now).unsigned_abs();
                info!(endpoint = %key, expires = %cert.not_after, "workload certificate in place");
                metrics.certificate_expiry.get_or_create(&gauge).set(cert.not_after.unix_timestamp());
                certificates.lock().expect("lock").insert(key.clone(), cert);
                let jitter = rand::random_range(0.9..1.0);
                tokio::time::sleep(left.mul_f64(0.5 * jitter)).await;
            }
            Err(e) => {
                let wait = crate::agent::backoff(attempt);
                warn!(endpoint = %key, error = %e, retry_in_ms = wait.as_millis() as u64, "workload certificate failed");
                tokio::time::sleep(wait).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}

/// What every send path shares.
struct Shared {
    socket: Arc<UdpSocket>,
    tables: Arc<ArcSwap<Tables>>,
    devices: Devices,
    sealer: Arc<Sealer>,
    mesh: Arc<Mesh>,
}

/// Workload -> underlay: read a burst (one TSO segment split into packets), seal each, send them
/// to each peer in as few calls as GSO allows; a packet for a workload on this node goes straight
/// to that workload's interface.
async fn send(
    device: Arc<tun_rs::AsyncDevice>,
    network: u32,
    address: Ipv4Addr,
    shared: Shared,
    mut outgoing: filter::Outgoing,
) {
    let Shared { socket, tables, devices, sealer, mesh } = shared;
    let state = match quinn_udp::UdpSocketState::new((&*socket).into()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot set up the underlay socket for batching; stopping");
            return;
        }
    };
    let max_segments = state.max_gso_segments().max(1);
    let mut original = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65535];
    let mut bufs = vec![vec![0u8; 65535]; tun_rs::IDEAL_BATCH_SIZE];
    let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
    let mut out = Vec::with_capacity(MAX_DATAGRAM);
    let mut batch = Batch { buf: Vec::with_capacity(MAX_DATAGRAM * 2), to: None, segment: 0, count: 0 };
    loop {
        let n = match device.recv_multiple(&mut original, &mut bufs, &mut sizes, 0).await {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, %address, "reading the workload's interface failed; stopping");
                return;
            }
        };
        let tables = tables.load();
        for (buf, &size) in bufs.iter().zip(&sizes).take(n) {
            let packet = &buf[..size];
            if let Some((src, dst)) = tun::core::ipv4_addresses(packet)
                && src == address
                && tables.is_local(network, dst)
            {
                if !filter::admit_local(&**mesh.view.load(), packet) {
                    sealer.counters.count_drop(tun::core::DropReason::Filtered);
                } else if let Some(local) = devices.load().get(&(network, dst)) {
                    let _ = local.send(packet).await;
                }
                continue;
            }
            if let Ok(to) = sealer.seal(&tables, network, address, packet, &mut out) {
                outgoing.note(packet, std::time::Instant::now());
                if !batch.fits(to, out.len(), max_segments) {
                    batch.flush(&socket, &state).await;
                }
                batch.push(to, &out);
            }
        }
        batch.flush(&socket, &state).await;
    }
}

/// Room before each inner packet handed to a tun device: its virtio-net header goes there.
const TUN_HEADROOM: usize = 16;

/// Underlay -> workload: receive (one call may carry many coalesced datagrams: UDP GRO), open
/// and check each, and write them to each workload's interface coalesced again (tun GRO).
async fn receive(
    socket: Arc<UdpSocket>,
    tables: Arc<ArcSwap<Tables>>,
    devices: Devices,
    counters: Arc<Counters>,
    mesh: Arc<Mesh>,
    mut incoming: filter::Incoming,
) {
    let state = match quinn_udp::UdpSocketState::new((&*socket).into()) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "cannot set up the underlay socket for batching; not receiving");
            return;
        }
    };
    let mut opener = Opener::default();
    let mut buf = vec![0u8; 65535 * 2];
    let mut meta = [quinn_udp::RecvMeta::default()];
    let mut seen_tables = 0usize;
    let mut gro = tun_rs::GROTable::default();
    // Inner packets waiting for each device, in reusable buffers.
    let mut pending: HashMap<(u32, Ipv4Addr), Vec<Vec<u8>>> = HashMap::new();
    let mut spare: Vec<Vec<u8>> = Vec::new();
    loop {
        let received = socket
            .async_io(tokio::io::Interest::READABLE, || {
                let mut iov = [std::io::IoSliceMut::new(&mut buf)];
                state.recv((&*socket).into(), &mut iov, &mut meta)
            })
            .await;
        if let Err(e) = received {
            debug!(error = %e, "receiving from the underlay failed");
            continue;
        }
        let m = meta[0];
        let t = tables.load();
        let identity = Arc::as_ptr(&t) as usize;
        if identity != seen_tables {
            opener.retain_epochs(&t);
            seen_tables = identity;
        }
        let view = mesh.view.load();
        let now = std::time::Instant::now();
        let stride = if m.stride == 0 { m.len } else { m.stride };
        let mut at = 0;
        while at < m.len {
            let end = (at + stride).min(m.len);
            let datagram = &mut buf[at..end];
            at = end;
            match opener.open(&t, &counters, datagram) {
                Ok(d) if !incoming.admit(&**view, view.generation, &datagram[d.range.clone()], now) => {
                    counters.count_drop(tun::core::DropReason::Filtered);
                    debug!(from = %m.addr, "datagram filtered: no L4 rule lets it into the workload");
                }
                Ok(d) => {
                    let mut b = spare.pop().unwrap_or_default();
                    b.clear();
                    b.resize(TUN_HEADROOM, 0);
                    b.extend_from_slice(&datagram[d.range]);
                    pending.entry((d.network, d.destination)).or_default().push(b);
                }
                Err(reason) => debug!(from = %m.addr, reason = reason.name(), "datagram dropped"),
            }
        }
        if pending.is_empty() {
            continue;
        }
        let devs = devices.load();
        for (key, mut packets) in pending.drain() {
            if let Some(device) = devs.get(&key)
                && let Err(e) = device.send_multiple(&mut gro, &mut packets, TUN_HEADROOM).await
            {
                debug!(error = %e, "writing to a workload failed");
            }
            spare.append(&mut packets);
        }
    }
}

/// Puts a renewed node certificate in place on the mesh port (the agent renews it on disk).
async fn keep_node_certificate(state_dir: std::path::PathBuf, mesh: Arc<Mesh>, mut current: String) {
    loop {
        tokio::time::sleep(NODE_CERTIFICATE_CHECK).await;
        match crate::identity::NodeDir::new(&state_dir).load() {
            Ok(node) if node.identity.cert_pem != current => {
                match mesh.node_certificate.replace(&node.identity) {
                    Ok(()) => {
                        info!(expires = %node.info.not_after, "mesh port serves the renewed node certificate");
                        current = node.identity.cert_pem;
                    }
                    Err(e) => warn!(error = %e, "the renewed node certificate cannot be used yet"),
                }
            }
            Ok(_) => {}
            Err(e) => debug!(error = %e, "reading the node certificate"),
        }
    }
}
