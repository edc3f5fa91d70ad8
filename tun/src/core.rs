//! The packet core: what to do with a packet from a workload (seal it for a peer) and with a
//! datagram from the underlay (open it, check it, deliver it), as pure functions of the tables
//! and the bytes. No sockets, no devices.

use crate::Map as HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::aead::{Aead, Backend};
use crate::header::{HEADER_LEN, Header, PacketType};
use crate::packet::Ipv4Header;
use crate::replay::ReplayWindow;
use crate::wireguard::{self, PeerStatus, StaticKey};

/// Why a packet was dropped. Each has a counter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Not a header, or not an IPv4 packet inside.
    Malformed,
    UnknownNetwork,
    UnknownSender,
    UnknownEpoch,
    Replay,
    BadTag,
    /// The inner source is not an endpoint the sender hosts on that network.
    NotSenderEndpoint,
    /// Inbound: the inner destination is not a local endpoint on that network. Outbound: the
    /// inner source is not the sending workload's own address.
    Filtered,
    /// Outbound: no endpoint on the network has the destination address.
    NoRoute,
    /// Outbound: this boot's counter space is spent.
    CounterExhausted,
    /// Inbound: the UDP source is not the registered underlay address of the claimed sender.
    WrongSource,
    /// Outbound on a WireGuard network: no session with the peer yet. The packet waits in the
    /// peer's queue (boringtun keeps up to 256) and leaves once the handshake completes.
    AwaitingHandshake,
    /// Inbound on a WireGuard network: a peer's handshake messages beyond its rate (each costs
    /// several X25519 operations on the receive path).
    RateLimited,
}

impl DropReason {
    pub const ALL: [DropReason; 13] = [
        DropReason::Malformed,
        DropReason::UnknownNetwork,
        DropReason::UnknownSender,
        DropReason::UnknownEpoch,
        DropReason::Replay,
        DropReason::BadTag,
        DropReason::NotSenderEndpoint,
        DropReason::Filtered,
        DropReason::NoRoute,
        DropReason::CounterExhausted,
        DropReason::WrongSource,
        DropReason::AwaitingHandshake,
        DropReason::RateLimited,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::UnknownNetwork => "unknown_network",
            DropReason::UnknownSender => "unknown_sender",
            DropReason::UnknownEpoch => "unknown_epoch",
            DropReason::Replay => "replay",
            DropReason::BadTag => "bad_tag",
            DropReason::NotSenderEndpoint => "not_sender_endpoint",
            DropReason::Filtered => "filtered",
            DropReason::NoRoute => "no_route",
            DropReason::CounterExhausted => "counter_exhausted",
            DropReason::WrongSource => "wrong_source",
            DropReason::AwaitingHandshake => "awaiting_handshake",
            DropReason::RateLimited => "rate_limited",
        }
    }
}

/// Packet and drop counters, shared by the send and receive paths.
#[derive(Debug, Default)]
pub struct Counters {
    drops: [AtomicU64; DropReason::ALL.len()],
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub bytes_received: AtomicU64,
}

impl Counters {
    pub fn count_drop(&self, reason: DropReason) {
        self.drops[reason as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn drops(&self, reason: DropReason) -> u64 {
        self.drops[reason as usize].load(Ordering::Relaxed)
    }

    /// Every reason with its count.
    pub fn all_drops(&self) -> Vec<(DropReason, u64)> {
        DropReason::ALL.iter().map(|r| (*r, self.drops(*r))).collect()
    }
}

/// A key of a network's ring as the data plane uses it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyRole {
    Next,
    Current,
    Previous,
}

/// An endpoint on a network: its address and the node that hosts it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerConfig {
    pub address: Ipv4Addr,
    pub node_index: u32,
    pub underlay: Option<SocketAddr>,
    /// On a WireGuard network: the node's public key there (`None` until it reported one).
    pub wireguard: Option<[u8; 32]>,
}

/// The key this node shares with the node of index `peer`, for one epoch of the ring.
#[derive(Clone, PartialEq, Eq)]
pub struct PeerKey {
    pub peer: u32,
    pub role: KeyRole,
    pub epoch: u32,
    pub key: [u8; 32],
}

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PeerKey {{ peer: {}, {:?}, epoch: {}, key: <redacted> }}",
            self.peer, self.role, self.epoch
        )
    }
}

/// One network as this node holds it.
#[derive(Clone, Debug)]
pub struct NetworkConfig {
    pub id: u32,
    pub name: String,
    pub encrypted: bool,
    /// The pair keys: for each peer node, one per epoch of the ring.
    pub keys: Vec<PeerKey>,
    /// Every endpoint on the network, local ones included.
    pub peers: Vec<PeerConfig>,
    /// On a WireGuard network, this node's static key there: datagrams are WireGuard messages,
    /// and `keys` is empty.
    pub wireguard: Option<StaticKey>,
}

/// Everything the core needs: who this node is and what it holds.
#[derive(Clone, Debug)]
pub struct Config {
    pub local_index: u32,
    pub networks: Vec<NetworkConfig>,
}

/// A receive key and a fingerprint of its bytes (to tell when a pair's key changed).
type ReceiveKey = (Arc<dyn Aead>, u64);

struct Net {
    id: u32,
    encrypted: bool,
    /// Peer node index -> the current epoch and its key.
    send: HashMap<u32, (u32, Arc<dyn Aead>)>,
    /// (Peer node index, epoch) -> key.
    receive: HashMap<(u32, u32), ReceiveKey>,
    /// Overlay address -> (node index, underlay).
    route: HashMap<Ipv4Addr, (u32, Option<SocketAddr>)>,
    /// Node index -> its underlay, for each node with an endpoint on the network.
    senders: HashMap<u32, Option<SocketAddr>>,
    /// The WireGuard transport's peers, on a network that uses it.
    wireguard: Option<WireguardNet>,
}

/// A WireGuard network's peers: a tunnel per peer node, and who speaks from each underlay.
struct WireguardNet {
    peers: HashMap<u32, Arc<wireguard::Peer>>,
    by_underlay: HashMap<SocketAddr, u32>,
}

/// A fingerprint of a key: a replay window belongs to one key, and is dropped with it.
fn fingerprint(key: &[u8; 32]) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key);
    u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The same address whether or not an IPv6 socket reports it IPv4-mapped.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// The tables built from a [`Config`]; rebuilt whole when the config changes.
pub struct Tables {
    local_index: u32,
    networks: HashMap<u32, Net>,
}

impl Tables {
    pub fn new(config: &Config, backend: Backend) -> Tables {
        Tables::after(config, backend, None)
    }

    /// The tables of `config`, keeping from `previous` every WireGuard tunnel made for the same
    /// two keys (its sessions go on); a tunnel for a changed key on either side is made anew, and
    /// asks for a handshake at once when the one it replaces had a session.
    pub fn after(config: &Config, backend: Backend, previous: Option<&Tables>) -> Tables {
        let networks = config
            .networks
            .iter()
            .map(|n| {
                let receive: HashMap<(u32, u32), ReceiveKey> = n
                    .keys
                    .iter()
                    .map(|k| ((k.peer, k.epoch), (Arc::from(backend.key(&k.key)), fingerprint(&k.key))))
                    .collect();
                let send = n
                    .keys
                    .iter()
                    .filter(|k| k.role == KeyRole::Current)
                    .map(|k| (k.peer, (k.epoch, receive[&(k.peer, k.epoch)].0.clone())))
                    .collect();
                let route = n.peers.iter().map(|p| (p.address, (p.node_index, p.underlay))).collect();
                let senders = n.peers.iter().map(|p| (p.node_index, p.underlay.map(canonical))).collect();
                let before = previous.and_then(|t| t.networks.get(&n.id)).and_then(|n| n.wireguard.as_ref());
                let wireguard =
                    n.wireguard.as_ref().map(|own| wireguard_net(config.local_index, own, &n.peers, before));
                (n.id, Net { id: n.id, encrypted: n.encrypted, send, receive, route, senders, wireguard })
            })
            .collect();
        Tables { local_index: config.local_index, networks }
    }

    /// Every WireGuard peer: its network, its tunnel and its underlay.
    pub fn wireguard_peers(&self) -> impl Iterator<Item = (u32, &Arc<wireguard::Peer>, Option<SocketAddr>)> {
        self.networks.values().filter_map(|n| Some((n, n.wireguard.as_ref()?))).flat_map(|(n, wg)| {
            wg.peers.values().map(move |p| (n.id, p, n.senders.get(&p.node_index).copied().flatten()))
        })
    }

    /// What `meshd status` shows of each WireGuard peer.
    pub fn wireguard_status(&self) -> Vec<PeerStatus> {
        let mut all: Vec<PeerStatus> = self
            .wireguard_peers()
            .map(|(network, peer, underlay)| {
                let (last_handshake, tx_bytes, rx_bytes) = peer.stats();
                PeerStatus {
                    network,
                    node_index: peer.node_index,
                    public: peer.public,
                    underlay,
                    last_handshake,
                    tx_bytes,
                    rx_bytes,
                }
            })
            .collect();
        all.sort_by_key(|p| (p.network, p.node_index));
        all
    }

    /// Whether `address` on network `id` is an endpoint of this node.
    pub fn is_local(&self, id: u32, address: Ipv4Addr) -> bool {
        self.networks
            .get(&id)
            .and_then(|n| n.route.get(&address))
            .is_some_and(|(node, _)| *node == self.local_index)
    }
}

/// A WireGuard network's peers for `own` key: each other node with a public key, its tunnel kept
/// from `before` when made for the same keys.
fn wireguard_net(
    local: u32,
    own: &StaticKey,
    peers: &[PeerConfig],
    before: Option<&WireguardNet>,
) -> WireguardNet {
    let mut tunnels: HashMap<u32, Arc<wireguard::Peer>> = HashMap::default();
    let mut by_underlay = HashMap::default();
    // One X25519 multiplication per network and config, not one per peer.
    let own_public = own.public();
    for p in peers.iter().filter(|p| p.node_index != local) {
        if let Some(underlay) = p.underlay {
            by_underlay.insert(canonical(underlay), p.node_index);
        }
        let Some(public) = p.wireguard else { continue };
        if tunnels.contains_key(&p.node_index) {
            continue;
        }
        let held = before.and_then(|b| b.peers.get(&p.node_index));
        let tunnel = match held {
            Some(held) if held.is_for(&own_public, &public) => held.clone(),
            _ => {
                let fresh = Arc::new(wireguard::Peer::new(own, p.node_index, public));
                if held.is_some_and(|h| h.had_session()) {
                    fresh.initiate_soon();
                }
                fresh
            }
        };
        tunnels.insert(p.node_index, tunnel);
    }
    WireguardNet { peers: tunnels, by_underlay }
}

/// The send side: one per node (its counter is the nonce source), shared by every sending task.
pub struct Sealer {
    counter: AtomicU64,
    limit: u64,
    pub counters: Arc<Counters>,
}

/// Room for a packet that waited for a handshake: one read from a device, at most its MTU.
const QUEUED_ROOM: usize = 2048;

/// Low bits of the counter that count packets within one boot.
pub const BOOT_SHIFT: u32 = 48;

impl Sealer {
    /// A sealer for boot number `boot` (see the crate docs on nonces).
    pub fn new(boot: u16, counters: Arc<Counters>) -> Sealer {
        let start = u64::from(boot) << BOOT_SHIFT;
        Sealer { counter: AtomicU64::new(start), limit: start + ((1 << BOOT_SHIFT) - 1), counters }
    }

    /// Seals `inner`, a packet a local workload sent on network `network` from `from`: writes the
    /// datagram into `out` and returns where to send it.
    pub fn seal(
        &self,
        tables: &Tables,
        network: u32,
        from: Ipv4Addr,
        inner: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<SocketAddr, DropReason> {
        let result = self.seal_inner(tables, network, from, inner, out);
        match result {
            Ok(_) => {
                self.counters.sent.fetch_add(1, Ordering::Relaxed);
                self.counters.bytes_sent.fetch_add(inner.len() as u64, Ordering::Relaxed);
            }
            Err(reason) => self.counters.count_drop(reason),
        }
        result
    }

    fn seal_inner(
        &self,
        tables: &Tables,
        network: u32,
        from: Ipv4Addr,
        inner: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<SocketAddr, DropReason> {
        let net = tables.networks.get(&network).ok_or(DropReason::UnknownNetwork)?;
        let Ipv4Header { source: src, destination: dst, .. } =
            Ipv4Header::parse(inner).ok_or(DropReason::Malformed)?;
        if src != from {
            return Err(DropReason::Filtered);
        }
        let (peer, underlay) = net.route.get(&dst).ok_or(DropReason::NoRoute)?;
        let underlay = underlay.ok_or(DropReason::NoRoute)?;
        if let Some(wg) = &net.wireguard {
            let tunnel = wg.peers.get(peer).ok_or(DropReason::NoRoute)?;
            wireguard::prepared(out, inner.len());
            let mut tunn = tunnel.lock();
            return match tunn.encapsulate(inner, &mut out[wireguard::PREFIX_LEN..]) {
                // A data message, or a handshake initiation with the packet queued behind it.
                boringtun::noise::TunnResult::WriteToNetwork(message) => {
                    let len = message.len();
                    drop(tunn);
                    wireguard::finish(net.id, out, len);
                    Ok(underlay)
                }
                _ => Err(DropReason::AwaitingHandshake),
            };
        }
        let (kind, epoch, key) = match (net.send.get(peer), net.encrypted) {
            (Some((epoch, key)), true) => (PacketType::Sealed, *epoch, Some(key)),
            (None, true) => return Err(DropReason::UnknownEpoch),
            (_, false) => (PacketType::Plain, 0, None),
        };
        // Taken only once the packet will be sent: a refused packet spends no counter.
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        if counter > self.limit {
            return Err(DropReason::CounterExhausted);
        }
        let header = Header { kind, network: net.id, epoch, sender: tables.local_index, counter };
        let mut h = [0u8; HEADER_LEN];
        header.encode(&mut h);
        out.clear();
        out.extend_from_slice(&h);
        out.extend_from_slice(inner);
        if let Some(key) = key {
            key.seal_in_place(&header.nonce(), &h, out, HEADER_LEN);
        }
        Ok(underlay)
    }
}

/// A packet to hand to a local workload.
#[derive(Debug, PartialEq, Eq)]
pub struct Delivery {
    pub network: u32,
    pub destination: Ipv4Addr,
    /// Where the inner packet lies in the datagram buffer.
    pub range: std::ops::Range<usize>,
}

/// Opens `datagram`, a WireGuard datagram (see [`wireguard::network_of`]) from the underlay
/// address `source`, with the tunnel of the peer speaking from there. A data message's inner
/// packet is written to `dst` (as long as the datagram, at least [`wireguard::MIN_MESSAGE_ROOM`])
/// and checked as on the AES-GCM transport; a handshake message is answered through `replies`
/// (with the packets that waited for it), and delivers nothing.
pub fn open_wireguard(
    tables: &Tables,
    counters: &Counters,
    source: SocketAddr,
    datagram: &[u8],
    dst: &mut [u8],
    replies: &mut Vec<(SocketAddr, Vec<u8>)>,
) -> Result<Option<Delivery>, DropReason> {
    let result = open_wireguard_inner(tables, source, datagram, dst, replies);
    match &result {
        Ok(Some(d)) => {
            counters.received.fetch_add(1, Ordering::Relaxed);
            counters.bytes_received.fetch_add(d.range.len() as u64, Ordering::Relaxed);
        }
        Ok(None) => {}
        Err(reason) => counters.count_drop(*reason),
    }
    result
}

fn open_wireguard_inner(
    tables: &Tables,
    source: SocketAddr,
    datagram: &[u8],
    dst: &mut [u8],
    replies: &mut Vec<(SocketAddr, Vec<u8>)>,
) -> Result<Option<Delivery>, DropReason> {
    use boringtun::noise::TunnResult;
    use boringtun::noise::errors::WireGuardError;
    let network = wireguard::network_of(datagram).ok_or(DropReason::Malformed)?;
    let net = tables.networks.get(&network).ok_or(DropReason::UnknownNetwork)?;
    // A WireGuard datagram on an AES-GCM network is refused outright.
    let wg = net.wireguard.as_ref().ok_or(DropReason::Malformed)?;
    let source = canonical(source);
    // Only a peer's attested underlay speaks for it, as on the AES-GCM transport.
    let node = *wg.by_underlay.get(&source).ok_or(DropReason::WrongSource)?;
    let peer = wg.peers.get(&node).ok_or(DropReason::UnknownSender)?;
    let message = &datagram[wireguard::PREFIX_LEN..];
    // No WireGuard message is shorter (a keepalive is 32 bytes). An empty one would be boringtun's
    // "send what is queued", before any authentication, into a buffer sized for this datagram.
    if message.len() < wireguard::MESSAGE_OVERHEAD {
        return Err(DropReason::Malformed);
    }
    if matches!(message[0], 1 | 2) && !peer.allow_handshake() {
        return Err(DropReason::RateLimited);
    }
    let mut tunn = peer.lock();
    let len = match tunn.decapsulate(Some(source.ip()), message, dst) {
        TunnResult::WriteToTunnelV4(packet, _) => packet.len(),
        TunnResult::WriteToTunnelV6(..) => return Err(DropReason::Malformed),
        TunnResult::Done => return Ok(None),
        TunnResult::WriteToNetwork(answer) => {
            let mut out = Vec::with_capacity(wireguard::PREFIX_LEN + answer.len());
            out.extend_from_slice(&[0; wireguard::PREFIX_LEN]);
            out.extend_from_slice(answer);
            wireguard::write_prefix(network, &mut out);
            replies.push((source, out));
            // After the peer's response our session is current: what waited leaves. Not after
            // answering the peer's initiation: that session is current only once the peer's first
            // data arrives, and flushing before would start a handshake of our own that voids the
            // answer just sent.
            if message[0] == 2 {
                flush_queued(&mut tunn, network, source, replies);
            }
            return Ok(None);
        }
        TunnResult::Err(WireGuardError::DuplicateCounter) => return Err(DropReason::Replay),
        TunnResult::Err(_) => return Err(DropReason::BadTag),
    };
    // A session the peer began may have become current with this packet: what waited for one
    // leaves now, not after the next handshake.
    flush_queued(&mut tunn, network, source, replies);
    drop(tunn);
    let Ipv4Header { source: src, destination: dst_addr, .. } =
        Ipv4Header::parse(&dst[..len]).ok_or(DropReason::Malformed)?;
    match net.route.get(&src) {
        Some((n, _)) if *n == node => {}
        _ => return Err(DropReason::NotSenderEndpoint),
    }
    if !tables.is_local(network, dst_addr) {
        return Err(DropReason::Filtered);
    }
    Ok(Some(Delivery { network, destination: dst_addr, range: 0..len }))
}

/// Sends, through `replies`, the packets `tunn` queued while it had no session, now that it may.
fn flush_queued(
    tunn: &mut boringtun::noise::Tunn,
    network: u32,
    to: SocketAddr,
    replies: &mut Vec<(SocketAddr, Vec<u8>)>,
) {
    use boringtun::noise::TunnResult;
    thread_local! {
        /// Room for one queued packet's message, kept: this runs after every data packet.
        static ROOM: std::cell::RefCell<Vec<u8>> =
            std::cell::RefCell::new(vec![0; wireguard::PREFIX_LEN + QUEUED_ROOM]);
    }
    ROOM.with_borrow_mut(|room| {
        // Bounded by boringtun's queue (256 packets), plus one initiation when no session is current.
        while let TunnResult::WriteToNetwork(queued) =
            tunn.decapsulate(None, &[], &mut room[wireguard::PREFIX_LEN..])
        {
            let len = queued.len();
            let mut out = room[..wireguard::PREFIX_LEN + len].to_vec();
            wireguard::write_prefix(network, &mut out);
            replies.push((to, out));
        }
    });
}

/// The receive side: owns the replay windows (one task receives, so no lock per packet), one
/// per (network, sender, epoch) and the key it was kept for.
#[derive(Default)]
pub struct Opener {
    windows: HashMap<(u32, u32, u32), (u64, ReplayWindow)>,
}

impl Opener {
    /// Opens `datagram`, which came from the underlay address `source`, in place, checks it,
    /// and says which workload gets the inner packet.
    pub fn open(
        &mut self,
        tables: &Tables,
        counters: &Counters,
        source: SocketAddr,
        datagram: &mut [u8],
    ) -> Result<Delivery, DropReason> {
        let result = self.open_inner(tables, source, datagram);
        match &result {
            Ok(d) => {
                counters.received.fetch_add(1, Ordering::Relaxed);
                counters.bytes_received.fetch_add(d.range.len() as u64, Ordering::Relaxed);
            }
            Err(reason) => counters.count_drop(*reason),
        }
        result
    }

    fn open_inner(
        &mut self,
        tables: &Tables,
        source: SocketAddr,
        datagram: &mut [u8],
    ) -> Result<Delivery, DropReason> {
        let header = Header::decode(datagram).map_err(|_| DropReason::Malformed)?;
        let net = tables.networks.get(&header.network).ok_or(DropReason::UnknownNetwork)?;
        if header.sender == tables.local_index {
            return Err(DropReason::UnknownSender);
        }
        let underlay = net.senders.get(&header.sender).ok_or(DropReason::UnknownSender)?;
        // Only the sender's attested underlay may speak for it: this is all that stops off-path
        // forgery on an unencrypted network (an on-path attacker can still forge there).
        if *underlay != Some(canonical(source)) {
            return Err(DropReason::WrongSource);
        }
        let inner_len = match (header.kind, net.encrypted) {
            (PacketType::Sealed, true) => {
                let (key, print) =
                    net.receive.get(&(header.sender, header.epoch)).ok_or(DropReason::UnknownEpoch)?;
                let (held, window) = self
                    .windows
                    .entry((header.network, header.sender, header.epoch))
                    .or_insert_with(|| (*print, ReplayWindow::default()));
                if held != print {
                    // The pair's key changed (a restart on either side): a new key, a new window.
                    *held = *print;
                    *window = ReplayWindow::default();
                }
                if !window.check(header.counter) {
                    return Err(DropReason::Replay);
                }
                let (aad, body) = datagram.split_at_mut(HEADER_LEN);
                let len = key.open_in_place(&header.nonce(), aad, body).ok_or(DropReason::BadTag)?;
                window.update(header.counter);
                len
            }
            // A plain packet on an encrypted network (or the reverse) is refused outright.
            (PacketType::Plain, true) => return Err(DropReason::BadTag),
            (PacketType::Sealed, false) => return Err(DropReason::Malformed),
            (PacketType::Plain, false) => datagram.len() - HEADER_LEN,
        };
        let range = HEADER_LEN..HEADER_LEN + inner_len;
        let Ipv4Header { source: src, destination: dst, .. } =
            Ipv4Header::parse(&datagram[range.clone()]).ok_or(DropReason::Malformed)?;
        match net.route.get(&src) {
            Some((node, _)) if *node == header.sender => {}
            _ => return Err(DropReason::NotSenderEndpoint),
        }
        if !tables.is_local(header.network, dst) {
            return Err(DropReason::Filtered);
        }
        Ok(Delivery { network: header.network, destination: dst, range })
    }

    /// Forgets the windows of keys no longer held (after a rotation, a peer's restart or its
    /// leaving).
    pub fn retain_epochs(&mut self, tables: &Tables) {
        self.windows.retain(|(net, sender, epoch), (print, _)| {
            tables
                .networks
                .get(net)
                .and_then(|n| n.receive.get(&(*sender, *epoch)))
                .is_some_and(|(_, held)| held == print)
        });
    }
}
