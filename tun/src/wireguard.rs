//! The WireGuard transport: a network whose datagrams are boringtun's Noise messages (handshakes,
//! cookies, data), each behind a 5-byte prefix that names the network, on the same underlay
//! socket as the AES-GCM transport.
//!
//! ```text
//!  0        1        2                       5
//! +--------+--------+-----------------------+------------------------------------------+
//! | version| type=2 |  network ID (24 bits) |  WireGuard message (handshake or data)   |
//! +--------+--------+-----------------------+------------------------------------------+
//! ```
//!
//! Each node makes its own static X25519 key per network and reports only the public half;
//! control hands a node the public keys of the peers it shares the network with, and nothing
//! more. So the keys that open a datagram are made by the Noise handshake between the two nodes
//! alone (rotated every two minutes by WireGuard's own timers, with forward secrecy): no manager
//! ever holds one. The prefix is not authenticated, and need not be: it only picks the network,
//! the UDP source picks the peer (its attested underlay address, as on the AES-GCM transport),
//! and boringtun's session for that pair of keys accepts only what that peer sealed. A peer that
//! leaves the network leaves the tables, and its sessions with it.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use boringtun::noise::{Tunn, TunnResult};
use boringtun::x25519::{PublicKey, StaticSecret};

use crate::header::VERSION;

/// The packet type byte of a WireGuard datagram (the AES-GCM transport's are 0 and 1).
pub const TYPE: u8 = 2;
/// Bytes of the prefix before the WireGuard message.
pub const PREFIX_LEN: usize = 5;
/// Bytes a WireGuard data message adds to the inner packet (its header and tag).
pub const MESSAGE_OVERHEAD: usize = 32;
/// Bytes a datagram of this transport adds to the inner packet: as many as the AES-GCM
/// transport's, so the workload interfaces have one MTU whatever their network's transport.
pub const OVERHEAD: usize = PREFIX_LEN + MESSAGE_OVERHEAD;
/// The smallest room a message is written into: a handshake initiation is 148 bytes.
pub const MIN_MESSAGE_ROOM: usize = 148;

/// A node's static private key on one network; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct StaticKey([u8; 32]);

impl StaticKey {
    pub fn from_bytes(bytes: [u8; 32]) -> StaticKey {
        StaticKey(bytes)
    }

    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The public half, which is all that leaves the node.
    pub fn public(&self) -> [u8; 32] {
        PublicKey::from(&StaticSecret::from(self.0)).to_bytes()
    }
}

impl std::fmt::Debug for StaticKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StaticKey {{ public: {} }}", hex(&self.public()))
    }
}

/// Lower-case hex, for public keys in logs.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes the prefix for network `network` (24 bits) into the first [`PREFIX_LEN`] bytes.
pub fn write_prefix(network: u32, out: &mut [u8]) {
    out[0] = VERSION;
    out[1] = TYPE;
    out[2..5].copy_from_slice(&network.to_be_bytes()[1..]);
}

/// The network a datagram of this transport is for, or `None` when it is not one.
pub fn network_of(datagram: &[u8]) -> Option<u32> {
    match datagram {
        [VERSION, TYPE, a, b, c, ..] => Some(u32::from_be_bytes([0, *a, *b, *c])),
        _ => None,
    }
}

/// The WireGuard state of one peer node on one network: boringtun's tunnel (handshake, sessions,
/// timers, replay windows) for this node's key and that peer's.
pub struct Peer {
    pub node_index: u32,
    /// The peer's public key, as control sent it.
    pub public: [u8; 32],
    /// This node's public key the tunnel was made with.
    own_public: [u8; 32],
    tunn: Mutex<Tunn>,
    /// A handshake is to be started at the next tick, not at the next packet.
    initiate: AtomicBool,
    /// Tokens for the peer's handshake messages, and when they were last counted.
    handshakes: Mutex<(f64, Instant)>,
}

/// Handshake messages a peer may send per second, sustained, and in a burst. Far above what
/// WireGuard's timers make (one per peer every 5 s at worst), far below what would keep the
/// receive path busy with X25519.
const HANDSHAKES_PER_SECOND: f64 = 20.0;
const HANDSHAKE_BURST: f64 = 10.0;

impl Peer {
    /// A tunnel between `own` and the peer `node_index` holding `public`.
    pub fn new(own: &StaticKey, node_index: u32, public: [u8; 32]) -> Peer {
        let tunn = Tunn::new(
            StaticSecret::from(own.0),
            PublicKey::from(public),
            None,
            None,
            // boringtun's session indexes are this << 8; only this tunnel reads them.
            node_index & 0x00ff_ffff,
            None,
        );
        Peer {
            node_index,
            public,
            own_public: own.public(),
            tunn: Mutex::new(tunn),
            initiate: AtomicBool::new(false),
            handshakes: Mutex::new((HANDSHAKE_BURST, Instant::now())),
        }
    }

    /// Whether this tunnel was made for this node's public key `own_public` and the peer's
    /// `public` (so it is kept across a new config).
    pub fn is_for(&self, own_public: &[u8; 32], public: &[u8; 32]) -> bool {
        self.public == *public && self.own_public == *own_public
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Tunn> {
        self.tunn.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether a handshake ever completed on this tunnel.
    pub fn had_session(&self) -> bool {
        self.lock().time_since_last_handshake().is_some()
    }

    /// Time since the last handshake, and the data bytes sent and received.
    pub fn stats(&self) -> (Option<Duration>, u64, u64) {
        let (since, tx, rx, _, _) = self.lock().stats();
        (since, tx as u64, rx as u64)
    }

    /// Whether one more handshake message from this peer may be looked at now (a token bucket:
    /// boringtun's own limiter answers a flood with cookies, which a peer that holds its key
    /// answers again).
    pub fn allow_handshake(&self) -> bool {
        let mut bucket = self.handshakes.lock().unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        let (tokens, at) = *bucket;
        let tokens =
            (tokens + now.duration_since(at).as_secs_f64() * HANDSHAKES_PER_SECOND).min(HANDSHAKE_BURST);
        if tokens < 1.0 {
            *bucket = (tokens, now);
            return false;
        }
        *bucket = (tokens - 1.0, now);
        true
    }

    /// Asks for a handshake at the next tick: this tunnel replaces one whose sessions were in use
    /// (a key changed on either side), so traffic resumes without waiting for a packet.
    pub fn initiate_soon(&self) {
        self.initiate.store(true, Ordering::Relaxed);
    }

    /// Runs the tunnel's timers (rekeying, keepalives, handshake retries): the message to send
    /// now, if any, written after a prefix for `network` into `out`.
    pub fn tick(&self, network: u32, out: &mut Vec<u8>) -> bool {
        if self.initiate.swap(false, Ordering::Relaxed) && self.initiate(network, out) {
            return true;
        }
        let mut tunn = self.lock();
        prepared(out, 0);
        match tunn.update_timers(&mut out[PREFIX_LEN..]) {
            TunnResult::WriteToNetwork(message) => {
                let len = message.len();
                finish(network, out, len);
                true
            }
            _ => false,
        }
    }

    /// A handshake initiation now (after a key changed on either side), written as by [`Peer::tick`].
    pub fn initiate(&self, network: u32, out: &mut Vec<u8>) -> bool {
        let mut tunn = self.lock();
        prepared(out, 0);
        match tunn.format_handshake_initiation(&mut out[PREFIX_LEN..], false) {
            TunnResult::WriteToNetwork(message) => {
                let len = message.len();
                finish(network, out, len);
                true
            }
            _ => false,
        }
    }
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Peer {{ node_index: {}, public: {} }}", self.node_index, hex(&self.public))
    }
}

/// Makes `out` room for a message carrying `inner` bytes after the prefix.
pub(crate) fn prepared(out: &mut Vec<u8>, inner: usize) {
    out.clear();
    out.resize(PREFIX_LEN + (inner + MESSAGE_OVERHEAD).max(MIN_MESSAGE_ROOM), 0);
}

/// Writes the prefix and cuts `out` to the `len`-byte message boringtun wrote after it.
pub(crate) fn finish(network: u32, out: &mut Vec<u8>, len: usize) {
    write_prefix(network, out);
    out.truncate(PREFIX_LEN + len);
}

/// One peer's WireGuard state as `meshd status` shows it: never a private key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerStatus {
    pub network: u32,
    pub node_index: u32,
    pub public: [u8; 32],
    pub underlay: Option<SocketAddr>,
    /// Time since the last completed handshake; `None` before the first.
    pub last_handshake: Option<Duration>,
    pub tx_bytes: u64,
    pub rx_bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_prefix_names_the_network_and_nothing_else_passes_for_it() {
        let mut buf = [0u8; 8];
        write_prefix(0x0a0b0c, &mut buf);
        assert_eq!(&buf[..5], &[VERSION, TYPE, 0x0a, 0x0b, 0x0c]);
        assert_eq!(network_of(&buf), Some(0x0a0b0c));
        assert_eq!(network_of(&buf[..4]), None, "short");
        assert_eq!(network_of(&[VERSION, 0, 1, 2, 3]), None, "an AES-GCM datagram");
        assert_eq!(network_of(&[VERSION + 1, TYPE, 1, 2, 3]), None, "another version");
    }

    #[test]
    fn a_static_key_prints_its_public_half_only() {
        let key = StaticKey::from_bytes([7; 32]);
        let printed = format!("{key:?}");
        assert!(printed.contains(&hex(&key.public())), "{printed}");
        assert!(!printed.contains(&hex(&[7; 32])), "{printed}");
    }
}
