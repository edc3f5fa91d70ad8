//! The packet core between two (and three) nodes, as an attacker on the underlay would try it.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use proptest::prelude::*;
use tun::aead::Backend;
use tun::core::{Config, Counters, DropReason, KeyRole, NetworkConfig, Opener, PeerConfig, Sealer, Tables};
use tun::header::{HEADER_LEN, Header, PacketType};

const NET: u32 = 0x00abcdef;
const A: u32 = 1;
const B: u32 = 2;
const C: u32 = 3;
const KEY1: [u8; 32] = [1; 32];
const KEY2: [u8; 32] = [2; 32];
const KEY3: [u8; 32] = [3; 32];

fn addr(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, last)
}

fn underlay(index: u32) -> SocketAddr {
    SocketAddr::from(([192, 168, 0, index as u8], 4800))
}

fn network(keys: Vec<(KeyRole, u32, [u8; 32])>, encrypted: bool) -> NetworkConfig {
    NetworkConfig {
        id: NET,
        name: "front".into(),
        encrypted,
        keys,
        peers: [(addr(2), A), (addr(3), B), (addr(4), C)]
            .into_iter()
            .map(|(address, node_index)| PeerConfig {
                address,
                node_index,
                underlay: Some(underlay(node_index)),
            })
            .collect(),
    }
}

fn ring() -> Vec<(KeyRole, u32, [u8; 32])> {
    vec![(KeyRole::Next, 2, KEY2), (KeyRole::Current, 1, KEY1)]
}

fn tables(local: u32, keys: Vec<(KeyRole, u32, [u8; 32])>, backend: Backend) -> Tables {
    Tables::new(&Config { local_index: local, networks: vec![network(keys, true)] }, backend)
}

/// A minimal IPv4 packet from `src` to `dst` carrying `payload`.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    let len = (p.len() as u16).to_be_bytes();
    p[2] = len[0];
    p[3] = len[1];
    p
}

struct Node {
    tables: Tables,
    sealer: Sealer,
    opener: Opener,
    counters: Arc<Counters>,
}

fn node(local: u32, keys: Vec<(KeyRole, u32, [u8; 32])>, backend: Backend) -> Node {
    booted(local, keys, backend, 1)
}

/// A node in its `boot`th run (a distinct counter space).
fn booted(local: u32, keys: Vec<(KeyRole, u32, [u8; 32])>, backend: Backend, boot: u16) -> Node {
    let counters = Arc::new(Counters::default());
    Node {
        tables: tables(local, keys, backend),
        sealer: Sealer::new(boot, counters.clone()),
        opener: Opener::default(),
        counters,
    }
}

impl Node {
    fn send(&self, from: Ipv4Addr, to: Ipv4Addr, payload: &[u8]) -> (SocketAddr, Vec<u8>) {
        let mut out = Vec::new();
        let dest =
            self.sealer.seal(&self.tables, NET, from, &ipv4(from, to, payload), &mut out).expect("sealed");
        (dest, out)
    }

    fn receive(&mut self, datagram: &[u8]) -> Result<Vec<u8>, DropReason> {
        let mut buf = datagram.to_vec();
        let d = self.opener.open(&self.tables, &self.counters, &mut buf)?;
        Ok(buf[d.range].to_vec())
    }
}

#[test]
fn a_packet_crosses_and_arrives_intact_with_either_backend_on_either_side() {
    for (sb, rb) in [(Backend::RustCrypto, Backend::AwsLc), (Backend::AwsLc, Backend::RustCrypto)] {
        let a = node(A, ring(), sb);
        let mut b = node(B, ring(), rb);
        let (dest, datagram) = a.send(addr(2), addr(3), b"secret marker");
        assert_eq!(dest, underlay(B));
        assert!(!datagram.windows(13).any(|w| w == b"secret marker"), "encrypted on the wire");
        assert_eq!(b.receive(&datagram).unwrap(), ipv4(addr(2), addr(3), b"secret marker"));
        assert_eq!(b.counters.received.load(std::sync::atomic::Ordering::Relaxed), 1);
    }
}

#[test]
fn every_attack_is_dropped_and_counted_by_reason() {
    let a = node(A, ring(), Backend::DEFAULT);
    let mut b = node(B, ring(), Backend::DEFAULT);
    let (_, good) = a.send(addr(2), addr(3), b"hello");

    // Tampered anywhere: header (authenticated as AAD) or body.
    for i in [5, 9, HEADER_LEN + 3, good.len() - 1] {
        let mut t = good.clone();
        t[i] ^= 1;
        let err = b.receive(&t).unwrap_err();
        assert!(
            matches!(err, DropReason::BadTag | DropReason::UnknownEpoch | DropReason::UnknownSender),
            "byte {i}: {err:?}"
        );
    }
    assert_eq!(b.receive(&good).unwrap().len(), 25);
    assert_eq!(b.receive(&good), Err(DropReason::Replay), "replayed");

    // Sealed with a key the network does not hold (same epoch number).
    let foreign = booted(A, vec![(KeyRole::Current, 1, KEY3)], Backend::DEFAULT, 2);
    let (_, forged) = foreign.send(addr(2), addr(3), b"x");
    assert_eq!(b.receive(&forged), Err(DropReason::BadTag));
    // An epoch the receiver does not hold.
    let future = booted(A, vec![(KeyRole::Current, 9, KEY1)], Backend::DEFAULT, 3);
    assert_eq!(b.receive(&future.send(addr(2), addr(3), b"x").1), Err(DropReason::UnknownEpoch));
    // An unknown network and an unknown sender index.
    let mut other_net = good.clone();
    other_net[4] ^= 0xff;
    assert_eq!(b.receive(&other_net), Err(DropReason::UnknownNetwork));
    let stranger = booted(77, ring(), Backend::DEFAULT, 4);
    assert_eq!(b.receive(&stranger.send(addr(2), addr(3), b"x").1), Err(DropReason::UnknownSender));
    // Garbage.
    assert_eq!(b.receive(b"\x01\x00short"), Err(DropReason::Malformed));

    // Addressed to an endpoint that is not on this node.
    assert_eq!(b.receive(&a.send(addr(2), addr(4), b"for C").1), Err(DropReason::Filtered));
    // A node with the network key claiming another node's endpoint address: sealed correctly
    // (it holds the key) with an inner source of node C's endpoint.
    let mut spoof = Vec::new();
    let header = Header { kind: PacketType::Sealed, network: NET, epoch: 1, sender: A, counter: 5 << 48 };
    let mut h = [0u8; HEADER_LEN];
    header.encode(&mut h);
    spoof.extend_from_slice(&h);
    spoof.extend_from_slice(&ipv4(addr(4), addr(3), b"i am C"));
    Backend::DEFAULT.key(&KEY1).seal_in_place(&header.nonce(), &h, &mut spoof, HEADER_LEN);
    assert_eq!(b.receive(&spoof), Err(DropReason::NotSenderEndpoint));

    for reason in [
        DropReason::BadTag,
        DropReason::Replay,
        DropReason::UnknownEpoch,
        DropReason::UnknownNetwork,
        DropReason::UnknownSender,
        DropReason::Malformed,
        DropReason::NotSenderEndpoint,
        DropReason::Filtered,
    ] {
        assert!(b.counters.drops(reason) >= 1, "{reason:?} not counted");
    }
    assert_eq!(
        b.counters.received.load(std::sync::atomic::Ordering::Relaxed),
        1,
        "only the good packet was delivered"
    );
}

#[test]
fn a_workload_cannot_send_as_another_address_or_to_nowhere() {
    let a = node(A, ring(), Backend::DEFAULT);
    let mut out = Vec::new();
    assert_eq!(
        a.sealer.seal(&a.tables, NET, addr(2), &ipv4(addr(9), addr(3), b"x"), &mut out),
        Err(DropReason::Filtered)
    );
    assert_eq!(
        a.sealer.seal(&a.tables, NET, addr(2), &ipv4(addr(2), addr(99), b"x"), &mut out),
        Err(DropReason::NoRoute)
    );
    assert_eq!(
        a.sealer.seal(&a.tables, 5, addr(2), &ipv4(addr(2), addr(3), b"x"), &mut out),
        Err(DropReason::UnknownNetwork)
    );
    assert_eq!(a.sealer.seal(&a.tables, NET, addr(2), b"not ip", &mut out), Err(DropReason::Malformed));
    assert_eq!(a.counters.drops(DropReason::Filtered), 1);
}

#[test]
fn rotation_is_lossless_whichever_side_hears_first() {
    // Before: current 1, next 2. After: previous 1, current 2, next 3.
    let before = ring();
    let after = vec![(KeyRole::Next, 3, KEY3), (KeyRole::Current, 2, KEY2), (KeyRole::Previous, 1, KEY1)];
    // The sender rotated, the receiver has not yet heard.
    let a = node(A, after.clone(), Backend::DEFAULT);
    let mut b = node(B, before.clone(), Backend::DEFAULT);
    assert!(b.receive(&a.send(addr(2), addr(3), b"new key").1).is_ok());
    // The receiver rotated, the sender has not yet heard.
    let a = node(A, before, Backend::DEFAULT);
    let mut b = node(B, after, Backend::DEFAULT);
    assert!(b.receive(&a.send(addr(2), addr(3), b"old key").1).is_ok());
}

#[test]
fn unencrypted_networks_carry_the_same_header_in_the_clear() {
    let plain = |local| {
        let counters = Arc::new(Counters::default());
        let tables = Tables::new(
            &Config { local_index: local, networks: vec![network(vec![], false)] },
            Backend::DEFAULT,
        );
        Node { tables, sealer: Sealer::new(1, counters.clone()), opener: Opener::default(), counters }
    };
    let a = plain(A);
    let mut b = plain(B);
    let (_, datagram) = a.send(addr(2), addr(3), b"visible");
    let header = Header::decode(&datagram).unwrap();
    assert_eq!((header.kind, header.network, header.sender), (PacketType::Plain, NET, A));
    assert!(datagram.windows(7).any(|w| w == b"visible"));
    assert!(b.receive(&datagram).is_ok());
    // A plain packet is refused on an encrypted network.
    let mut enc = node(B, ring(), Backend::DEFAULT);
    assert_eq!(enc.receive(&datagram), Err(DropReason::BadTag));
}

proptest! {
    /// Nonces never repeat under a key: not across senders (distinct indexes), not across
    /// restarts (boot numbers), not within a boot (the counter).
    #[test]
    fn nonces_never_repeat(runs in proptest::collection::vec((1u32..5, 1usize..40), 1..30)) {
        let mut seen = HashSet::new();
        let mut boots = std::collections::HashMap::new();
        for (sender, packets) in runs {
            // Each run is one boot of one sender's meshd.
            let boot = boots.entry(sender).or_insert(0u16);
            *boot += 1;
            let n = booted(sender, ring(), Backend::DEFAULT, *boot);
            let from = match sender { 1 => addr(2), 2 => addr(3), 3 => addr(4), _ => addr(2) };
            let to = if from == addr(3) { addr(2) } else { addr(3) };
            if sender == 4 { continue; }
            for _ in 0..packets {
                let (_, d) = n.send(from, to, b"p");
                let h = Header::decode(&d).unwrap();
                prop_assert!(seen.insert((h.epoch, h.nonce())), "nonce repeated: sender {} counter {}", h.sender, h.counter);
            }
        }
    }
}
