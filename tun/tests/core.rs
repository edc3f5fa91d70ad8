//! The packet core between two (and three) nodes, as an attacker on the underlay would try it.

mod common;

use common::ipv4;
use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use proptest::prelude::*;
use tun::aead::Backend;
use tun::core::{
    Config, Counters, DropReason, KeyRole, NetworkConfig, Opener, PeerConfig, PeerKey, Sealer, Tables,
};
use tun::header::{HEADER_LEN, Header, PacketType};

const NET: u32 = 0x00abcdef;
const A: u32 = 1;
const B: u32 = 2;
const C: u32 = 3;
const D: u32 = 4;

/// The epochs of a ring and their roles.
type Ring = Vec<(KeyRole, u32)>;

/// Boot numbers by node index (A, B, C, D at 1..=4).
type Boots = [u16; 5];
const FIRST_BOOTS: Boots = [0, 1, 1, 1, 1];

fn addr(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, last)
}

fn underlay(index: u32) -> SocketAddr {
    SocketAddr::from(([192, 168, 0, index as u8], 4800))
}

/// The key of the pair `{i, j}` for `epoch`, both nodes in the given boots: distinct for every
/// distinct input, as control's derivation is (what the tests need of it).
fn pair_key(epoch: u32, i: u32, j: u32, boots: &Boots) -> [u8; 32] {
    let (lo, hi) = (i.min(j), i.max(j));
    let mut k = [0xaa; 32];
    k[..4].copy_from_slice(&epoch.to_be_bytes());
    k[4] = lo as u8;
    k[5] = hi as u8;
    k[6..8].copy_from_slice(&boots[lo as usize].to_be_bytes());
    k[8..10].copy_from_slice(&boots[hi as usize].to_be_bytes());
    k
}

/// What node `local` is sent: the keys of its own pairs with each of `members`, per epoch.
fn keys_of(local: u32, ring: &Ring, members: &[u32], boots: &Boots) -> Vec<PeerKey> {
    members
        .iter()
        .filter(|p| **p != local)
        .flat_map(|&peer| {
            ring.iter().map(move |&(role, epoch)| PeerKey {
                peer,
                role,
                epoch,
                key: pair_key(epoch, local, peer, boots),
            })
        })
        .collect()
}

fn network(keys: Vec<PeerKey>, members: &[u32], encrypted: bool) -> NetworkConfig {
    NetworkConfig {
        id: NET,
        name: "front".into(),
        encrypted,
        keys,
        peers: [(addr(2), A), (addr(3), B), (addr(4), C), (addr(5), D)]
            .into_iter()
            .filter(|(_, n)| members.contains(n))
            .map(|(address, node_index)| PeerConfig {
                address,
                node_index,
                underlay: Some(underlay(node_index)),
                wireguard: None,
            })
            .collect(),
        wireguard: None,
    }
}

fn ring() -> Ring {
    vec![(KeyRole::Next, 2), (KeyRole::Current, 1)]
}

fn rotated() -> Ring {
    vec![(KeyRole::Next, 3), (KeyRole::Current, 2), (KeyRole::Previous, 1)]
}

const MEMBERS: [u32; 3] = [A, B, C];

fn tables_for(local: u32, ring: &Ring, members: &[u32], boots: &Boots, backend: Backend) -> Tables {
    let net = network(keys_of(local, ring, members, boots), members, true);
    Tables::new(&Config { local_index: local, networks: vec![net] }, backend)
}

struct Node {
    index: u32,
    tables: Tables,
    sealer: Sealer,
    opener: Opener,
    counters: Arc<Counters>,
}

fn node(local: u32, ring: Ring, backend: Backend) -> Node {
    booted(local, &ring, &MEMBERS, &FIRST_BOOTS, backend)
}

/// A node in the run `boots[local]` (a distinct counter space), on a network of `members`.
fn booted(local: u32, ring: &Ring, members: &[u32], boots: &Boots, backend: Backend) -> Node {
    let counters = Arc::new(Counters::default());
    Node {
        index: local,
        tables: tables_for(local, ring, members, boots, backend),
        sealer: Sealer::new(boots[local as usize], counters.clone()),
        opener: Opener::default(),
        counters,
    }
}

/// The endpoint address node `index` hosts.
fn endpoint(index: u32) -> Ipv4Addr {
    addr(index as u8 + 1)
}

impl Node {
    fn send(&self, from: Ipv4Addr, to: Ipv4Addr, payload: &[u8]) -> (SocketAddr, Vec<u8>) {
        let mut out = Vec::new();
        let dest =
            self.sealer.seal(&self.tables, NET, from, &ipv4(from, to, payload), &mut out).expect("sealed");
        (dest, out)
    }

    /// A datagram from this node's endpoint to node `to`'s.
    fn send_to(&self, to: u32, payload: &[u8]) -> Vec<u8> {
        self.send(endpoint(self.index), endpoint(to), payload).1
    }

    /// Receives `datagram` as if from node `from`'s underlay address.
    fn receive_from(&mut self, from: u32, datagram: &[u8]) -> Result<Vec<u8>, DropReason> {
        self.receive_at(underlay(from), datagram)
    }

    fn receive_at(&mut self, source: SocketAddr, datagram: &[u8]) -> Result<Vec<u8>, DropReason> {
        let mut buf = datagram.to_vec();
        let d = self.opener.open(&self.tables, &self.counters, source, &mut buf)?;
        Ok(buf[d.range].to_vec())
    }

    fn delivered(&self) -> u64 {
        self.counters.received.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A datagram with any header, sealed with `key` (what an attacker holding `key` can make).
fn forge(header: Header, key: &[u8; 32], inner: &[u8]) -> Vec<u8> {
    let mut h = [0u8; HEADER_LEN];
    header.encode(&mut h);
    let mut out = h.to_vec();
    out.extend_from_slice(inner);
    Backend::DEFAULT.key(key).seal_in_place(&header.nonce(), &h, &mut out, HEADER_LEN);
    out
}

#[test]
fn a_packet_crosses_and_arrives_intact_with_either_backend_on_either_side() {
    for (sb, rb) in [(Backend::RustCrypto, Backend::AwsLc), (Backend::AwsLc, Backend::RustCrypto)] {
        let a = node(A, ring(), sb);
        let mut b = node(B, ring(), rb);
        let (dest, datagram) = a.send(addr(2), addr(3), b"secret marker");
        assert_eq!(dest, underlay(B));
        assert!(!datagram.windows(13).any(|w| w == b"secret marker"), "encrypted on the wire");
        assert_eq!(b.receive_from(A, &datagram).unwrap(), ipv4(addr(2), addr(3), b"secret marker"));
        assert_eq!(b.delivered(), 1);
    }
}

#[test]
fn every_attack_is_dropped_and_counted_by_reason() {
    let a = node(A, ring(), Backend::DEFAULT);
    let mut b = node(B, ring(), Backend::DEFAULT);
    let good = a.send_to(B, b"hello");

    // Tampered anywhere: header (authenticated as AAD) or body.
    for i in [5, 9, HEADER_LEN + 3, good.len() - 1] {
        let mut t = good.clone();
        t[i] ^= 1;
        let err = b.receive_from(A, &t).unwrap_err();
        assert!(
            matches!(err, DropReason::BadTag | DropReason::UnknownEpoch | DropReason::UnknownSender),
            "byte {i}: {err:?}"
        );
    }
    assert_eq!(b.receive_from(A, &good).unwrap().len(), 25);
    assert_eq!(b.receive_from(A, &good), Err(DropReason::Replay), "replayed");

    // Sealed with a key the pair does not hold (same epoch number).
    let header = Header { kind: PacketType::Sealed, network: NET, epoch: 1, sender: A, counter: 9 << 48 };
    let forged = forge(header, &[3; 32], &ipv4(addr(2), addr(3), b"x"));
    assert_eq!(b.receive_from(A, &forged), Err(DropReason::BadTag));
    // An epoch the receiver does not hold.
    let future = booted(A, &vec![(KeyRole::Current, 9)], &MEMBERS, &[0, 3, 1, 1, 1], Backend::DEFAULT);
    assert_eq!(b.receive_from(A, &future.send_to(B, b"x")), Err(DropReason::UnknownEpoch));
    // An unknown network and an unknown sender index.
    let mut other_net = good.clone();
    other_net[4] ^= 0xff;
    assert_eq!(b.receive_from(A, &other_net), Err(DropReason::UnknownNetwork));
    let stranger = booted(D, &ring(), &[A, B, C, D], &FIRST_BOOTS, Backend::DEFAULT);
    assert_eq!(b.receive_from(D, &stranger.send_to(B, b"x")), Err(DropReason::UnknownSender));
    // Garbage.
    assert_eq!(b.receive_from(A, b"\x01\x00short"), Err(DropReason::Malformed));
    // A good datagram from another underlay address than its sender's.
    let fresh = a.send_to(B, b"moved");
    assert_eq!(b.receive_from(C, &fresh), Err(DropReason::WrongSource));
    assert_eq!(b.receive_at("192.168.0.1:4801".parse().unwrap(), &fresh), Err(DropReason::WrongSource));

    // Sealed for C: B does not hold that pair's key.
    assert_eq!(b.receive_from(A, &a.send(addr(2), addr(4), b"for C").1), Err(DropReason::BadTag));
    // Sealed for B, addressed to an endpoint that is not on B.
    let header = Header { kind: PacketType::Sealed, network: NET, epoch: 1, sender: A, counter: 4 << 48 };
    let misrouted = forge(header, &pair_key(1, A, B, &FIRST_BOOTS), &ipv4(addr(2), addr(4), b"for C"));
    assert_eq!(b.receive_from(A, &misrouted), Err(DropReason::Filtered));
    // A sender claiming another node's endpoint address: sealed correctly (with its own pair
    // key) with an inner source of node C's endpoint.
    let header = Header { kind: PacketType::Sealed, network: NET, epoch: 1, sender: A, counter: 5 << 48 };
    let spoof = forge(header, &pair_key(1, A, B, &FIRST_BOOTS), &ipv4(addr(4), addr(3), b"i am C"));
    assert_eq!(b.receive_from(A, &spoof), Err(DropReason::NotSenderEndpoint));

    for reason in [
        DropReason::BadTag,
        DropReason::Replay,
        DropReason::UnknownEpoch,
        DropReason::UnknownNetwork,
        DropReason::UnknownSender,
        DropReason::Malformed,
        DropReason::NotSenderEndpoint,
        DropReason::Filtered,
        DropReason::WrongSource,
    ] {
        assert!(b.counters.drops(reason) >= 1, "{reason:?} not counted");
    }
    assert_eq!(b.delivered(), 1, "only the good packet was delivered");
}

/// C is a member of the network, holding every key it is sent: its pairs with A and with B.
/// Whatever it seals, it cannot speak for A, nor jam A's traffic to B.
#[test]
fn a_member_cannot_forge_as_another_member_nor_jam_it() {
    let a = node(A, ring(), Backend::DEFAULT);
    let mut b = node(B, ring(), Backend::DEFAULT);
    let c = node(C, ring(), Backend::DEFAULT);
    let held: Vec<[u8; 32]> =
        keys_of(C, &ring(), &MEMBERS, &FIRST_BOOTS).into_iter().map(|k| k.key).collect();
    assert_eq!(held.len(), 4, "two peers, two epochs");
    assert!(
        held.iter().all(|k| *k != pair_key(1, A, B, &FIRST_BOOTS) && *k != pair_key(2, A, B, &FIRST_BOOTS))
    );
    let as_a = ipv4(endpoint(A), endpoint(B), b"i am A");
    for key in &held {
        for epoch in [1, 2] {
            for counter in [1 << 48, (1 << 48) + 1_000_000, u64::MAX] {
                let header = Header { kind: PacketType::Sealed, network: NET, epoch, sender: A, counter };
                let forged = forge(header, key, &as_a);
                // From its own underlay: refused before any key is tried.
                assert_eq!(b.receive_from(C, &forged), Err(DropReason::WrongSource));
                // With A's underlay as source (C on the path): the tag is not under A's key.
                assert_eq!(b.receive_from(A, &forged), Err(DropReason::BadTag));
            }
        }
    }
    // C can jam only its own pair with B: counter 2^64 - 1 under its own index.
    let header = Header { kind: PacketType::Sealed, network: NET, epoch: 1, sender: C, counter: u64::MAX };
    let own = forge(header, &pair_key(1, B, C, &FIRST_BOOTS), &ipv4(endpoint(C), endpoint(B), b"jam"));
    assert!(b.receive_from(C, &own).is_ok());
    assert_eq!(b.receive_from(C, &c.send_to(B, b"after")), Err(DropReason::Replay), "C jammed itself");
    // A's traffic to B flows as if nothing happened.
    for i in 0..100u32 {
        let d = a.send_to(B, &i.to_be_bytes());
        assert_eq!(b.receive_from(A, &d).unwrap(), ipv4(endpoint(A), endpoint(B), &i.to_be_bytes()));
    }
    assert_eq!(b.delivered(), 101, "the forgeries never reached a workload");
    // Nor can C read A's traffic to B: none of its keys opens it.
    let recorded = a.send_to(B, b"private");
    let header = Header::decode(&recorded).unwrap();
    for key in &held {
        let mut body = recorded[HEADER_LEN..].to_vec();
        let (aad, _) = recorded.split_at(HEADER_LEN);
        assert!(Backend::DEFAULT.key(key).open_in_place(&header.nonce(), aad, &mut body).is_none());
    }
}

/// C leaves (its endpoint moved, or `node rm`): the tables of A and B lose C and its pair keys,
/// so nothing C seals with any key it held is accepted, recorded or new, while A and B carry on.
#[test]
fn a_leaver_is_cut_off_at_once_and_the_others_keep_flowing() {
    let a = node(A, ring(), Backend::DEFAULT);
    let mut b = node(B, ring(), Backend::DEFAULT);
    let c = node(C, ring(), Backend::DEFAULT);
    let before_leaving = c.send_to(B, b"sent while a member");
    let in_flight = a.send_to(B, b"in flight");
    // B's next slice: C gone.
    b.tables = tables_for(B, &ring(), &[A, B], &FIRST_BOOTS, Backend::DEFAULT);
    b.opener.retain_epochs(&b.tables);
    assert_eq!(b.receive_from(C, &before_leaving), Err(DropReason::UnknownSender));
    assert_eq!(b.receive_from(C, &c.send_to(B, b"after")), Err(DropReason::UnknownSender));
    // Every key C held, any epoch, any sender index it might claim, any source.
    for k in keys_of(C, &ring(), &MEMBERS, &FIRST_BOOTS) {
        for sender in [A, C] {
            let header =
                Header { kind: PacketType::Sealed, network: NET, epoch: k.epoch, sender, counter: 7 << 48 };
            let forged = forge(header, &k.key, &ipv4(endpoint(sender), endpoint(B), b"x"));
            assert!(b.receive_from(sender, &forged).is_err());
        }
    }
    assert!(b.receive_from(A, &in_flight).is_ok(), "the remaining pair lost nothing");
    assert!(b.receive_from(A, &a.send_to(B, b"next")).is_ok());
}

/// D is placed on the network after A and B talked: it is sent its own pairs' keys, of the
/// current epoch on, and none of them opens what A sent B before.
#[test]
fn a_new_member_cannot_open_what_was_sent_before_it_joined() {
    let a = node(A, rotated(), Backend::DEFAULT);
    let recorded: Vec<Vec<u8>> = (0..4).map(|i| a.send_to(B, &[i; 8])).collect();
    let members = [A, B, C, D];
    // Control sends a newly placed node no `previous`.
    let joined: Ring = rotated().into_iter().filter(|(r, _)| *r != KeyRole::Previous).collect();
    let mut d = booted(D, &joined, &members, &FIRST_BOOTS, Backend::DEFAULT);
    for datagram in &recorded {
        let header = Header::decode(datagram).unwrap();
        for k in keys_of(D, &joined, &members, &FIRST_BOOTS) {
            let mut body = datagram[HEADER_LEN..].to_vec();
            assert!(
                Backend::DEFAULT
                    .key(&k.key)
                    .open_in_place(&header.nonce(), &datagram[..HEADER_LEN], &mut body)
                    .is_none()
            );
        }
        assert!(d.receive_from(A, datagram).is_err());
    }
    assert_eq!(d.delivered(), 0);
}

/// B's meshd restarts: a new boot number, so new keys for every pair of B's; whatever was
/// recorded on the underlay before is refused by the new run, however it is replayed.
#[test]
fn datagrams_recorded_before_a_receivers_restart_are_refused_after_it() {
    let a = node(A, ring(), Backend::DEFAULT);
    let mut b = node(B, ring(), Backend::DEFAULT);
    let recorded: Vec<Vec<u8>> = (0..50u32).map(|i| a.send_to(B, &i.to_be_bytes())).collect();
    for d in &recorded[..25] {
        assert!(b.receive_from(A, d).is_ok());
    }
    let restarted: Boots = [0, 1, 2, 1, 1];
    let mut b = booted(B, &ring(), &MEMBERS, &restarted, Backend::DEFAULT);
    for d in &recorded {
        assert_eq!(b.receive_from(A, d), Err(DropReason::BadTag));
    }
    // A's next slice carries the pair's new keys: traffic resumes.
    let a = booted(A, &ring(), &MEMBERS, &restarted, Backend::DEFAULT);
    assert!(b.receive_from(A, &a.send_to(B, b"after")).is_ok());
    assert_eq!(b.delivered(), 1);
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
    // The sender rotated, the receiver has not yet heard.
    let a = node(A, rotated(), Backend::DEFAULT);
    let mut b = node(B, ring(), Backend::DEFAULT);
    assert!(b.receive_from(A, &a.send_to(B, b"new key")).is_ok());
    // The receiver rotated, the sender has not yet heard.
    let a = node(A, ring(), Backend::DEFAULT);
    let mut b = node(B, rotated(), Backend::DEFAULT);
    assert!(b.receive_from(A, &a.send_to(B, b"old key")).is_ok());
}

#[test]
fn unencrypted_networks_carry_the_same_header_in_the_clear() {
    let plain = |local| {
        let counters = Arc::new(Counters::default());
        let tables = Tables::new(
            &Config { local_index: local, networks: vec![network(vec![], &MEMBERS, false)] },
            Backend::DEFAULT,
        );
        Node {
            index: local,
            tables,
            sealer: Sealer::new(1, counters.clone()),
            opener: Opener::default(),
            counters,
        }
    };
    let a = plain(A);
    let mut b = plain(B);
    let (_, datagram) = a.send(addr(2), addr(3), b"visible");
    let header = Header::decode(&datagram).unwrap();
    assert_eq!((header.kind, header.network, header.sender), (PacketType::Plain, NET, A));
    assert!(datagram.windows(7).any(|w| w == b"visible"));
    assert!(b.receive_from(A, &datagram).is_ok());
    // Off-path forgery (another source address) is refused even without encryption.
    assert_eq!(b.receive_from(C, &a.send(addr(2), addr(3), b"spoofed").1), Err(DropReason::WrongSource));
    // A plain packet is refused on an encrypted network.
    let mut enc = node(B, ring(), Backend::DEFAULT);
    assert_eq!(enc.receive_from(A, &datagram), Err(DropReason::BadTag));
}

/// What can happen to the pair A -> B: sends, replays of anything recorded, restarts of either
/// side, rotations.
#[derive(Clone, Debug)]
enum Event {
    Send,
    Replay(usize),
    RestartReceiver,
    RestartSender,
    Rotate,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        4 => Just(Event::Send),
        4 => any::<usize>().prop_map(Event::Replay),
        1 => Just(Event::RestartReceiver),
        1 => Just(Event::RestartSender),
        1 => Just(Event::Rotate),
    ]
}

proptest! {
    /// Nonces never repeat under a key: not across senders (distinct indexes), not across
    /// restarts (boot numbers), not within a boot (the counter).
    #[test]
    fn nonces_never_repeat(runs in proptest::collection::vec((1u32..4, 1usize..40), 1..30)) {
        let mut seen = HashSet::new();
        let mut boots = FIRST_BOOTS;
        for (sender, packets) in runs {
            // Each run is one boot of one sender's meshd.
            boots[sender as usize] += 1;
            let n = booted(sender, &ring(), &MEMBERS, &boots, Backend::DEFAULT);
            let to = if sender == B { A } else { B };
            for _ in 0..packets {
                let d = n.send_to(to, b"p");
                let h = Header::decode(&d).unwrap();
                let key = pair_key(h.epoch, sender, to, &boots);
                prop_assert!(seen.insert((key, h.nonce())), "nonce repeated: sender {} counter {}", h.sender, h.counter);
            }
        }
    }

    /// Whatever happens, across every run of the receiver: each datagram is delivered at most
    /// once, nothing recorded before the receiver's latest restart is delivered after it, and
    /// every fresh datagram sent while both sides hold the same slice is delivered.
    #[test]
    fn replay_state_survives_restarts(events in proptest::collection::vec(event(), 1..80)) {
        let mut boots = FIRST_BOOTS;
        let mut ring_now = ring();
        let mut a = booted(A, &ring_now, &MEMBERS, &boots, Backend::DEFAULT);
        let mut b = booted(B, &ring_now, &MEMBERS, &boots, Backend::DEFAULT);
        // Every datagram sent, with the receiver's run it was sent in.
        let mut recorded: Vec<(Vec<u8>, u16)> = Vec::new();
        let mut delivered: HashSet<Vec<u8>> = HashSet::new();
        let mut next_epoch = 3;
        for e in events {
            match e {
                Event::Send => {
                    let d = a.send_to(B, &(recorded.len() as u32).to_be_bytes());
                    let ok = b.receive_from(A, &d).is_ok();
                    prop_assert!(ok, "a fresh datagram was refused");
                    prop_assert!(delivered.insert(d.clone()));
                    recorded.push((d, boots[B as usize]));
                }
                Event::Replay(i) if !recorded.is_empty() => {
                    let (d, run) = &recorded[i % recorded.len()];
                    let result = b.receive_from(A, d);
                    prop_assert!(result.is_err(), "replayed datagram delivered again (sent in run {}, now {})", run, boots[B as usize]);
                }
                Event::Replay(_) => {}
                Event::RestartReceiver => {
                    boots[B as usize] += 1;
                    b = booted(B, &ring_now, &MEMBERS, &boots, Backend::DEFAULT);
                    // The sender's next slice.
                    a.tables = tables_for(A, &ring_now, &MEMBERS, &boots, Backend::DEFAULT);
                }
                Event::RestartSender => {
                    boots[A as usize] += 1;
                    a = booted(A, &ring_now, &MEMBERS, &boots, Backend::DEFAULT);
                    b.tables = tables_for(B, &ring_now, &MEMBERS, &boots, Backend::DEFAULT);
                    b.opener.retain_epochs(&b.tables);
                }
                Event::Rotate => {
                    ring_now = vec![(KeyRole::Next, next_epoch), (KeyRole::Current, next_epoch - 1), (KeyRole::Previous, next_epoch - 2)];
                    next_epoch += 1;
                    a.tables = tables_for(A, &ring_now, &MEMBERS, &boots, Backend::DEFAULT);
                    b.tables = tables_for(B, &ring_now, &MEMBERS, &boots, Backend::DEFAULT);
                    b.opener.retain_epochs(&b.tables);
                }
            }
        }
    }
}
