//! The WireGuard transport between nodes, as an attacker on the underlay (or a peer lying about
//! itself) would try it: every datagram goes through the same functions the I/O calls.

mod common;

use common::ipv4;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use tun::aead::Backend;
use tun::core::{Config, Counters, DropReason, NetworkConfig, PeerConfig, Sealer, Tables, open_wireguard};
use tun::wireguard::{PREFIX_LEN, StaticKey, network_of};

const NET: u32 = 0x00_0a0b;
const OTHER_NET: u32 = 0x00_0c0d;
const A: u32 = 1;
const B: u32 = 2;
const C: u32 = 3;

fn underlay(index: u32) -> SocketAddr {
    SocketAddr::from(([192, 168, 0, index as u8], 4800))
}

fn endpoint(index: u32) -> Ipv4Addr {
    Ipv4Addr::new(10, 0, 0, index as u8 + 1)
}

/// Node `index`'s static key on network `net`: distinct per node and network.
fn key(index: u32, net: u32, generation: u8) -> StaticKey {
    let mut k = [index as u8; 32];
    k[1..4].copy_from_slice(&net.to_be_bytes()[1..]);
    k[4] = generation;
    StaticKey::from_bytes(k)
}

/// What a node knows of network `net`: its own key, and each member's public key as control sent
/// it (`publics`, by node index; a member without one has not reported it).
fn network(net: u32, own: StaticKey, members: &[(u32, Option<[u8; 32]>)]) -> NetworkConfig {
    NetworkConfig {
        id: net,
        name: format!("net{net}"),
        encrypted: true,
        keys: vec![],
        peers: members
            .iter()
            .map(|&(index, public)| PeerConfig {
                address: endpoint(index),
                node_index: index,
                underlay: Some(underlay(index)),
                wireguard: public,
            })
            .collect(),
        wireguard: Some(own),
    }
}

/// What receiving a datagram gave: the inner packet delivered, if any, and the answers to send.
type Received = (Result<Option<Vec<u8>>, DropReason>, Vec<(SocketAddr, Vec<u8>)>);

struct Node {
    index: u32,
    tables: Tables,
    sealer: Sealer,
    counters: Arc<Counters>,
}

impl Node {
    fn new(index: u32, networks: Vec<NetworkConfig>) -> Node {
        let counters = Arc::new(Counters::default());
        Node {
            index,
            tables: Tables::new(&Config { local_index: index, networks }, Backend::DEFAULT),
            sealer: Sealer::new(1, counters.clone()),
            counters,
        }
    }

    fn reconfigure(&mut self, networks: Vec<NetworkConfig>) {
        let config = Config { local_index: self.index, networks };
        self.tables = Tables::after(&config, Backend::DEFAULT, Some(&self.tables));
    }

    /// Seals a packet from this node's endpoint to node `to`'s on `net`.
    fn send(&self, net: u32, to: u32, payload: &[u8]) -> Result<(SocketAddr, Vec<u8>), DropReason> {
        self.send_from(net, endpoint(self.index), endpoint(to), payload)
    }

    fn send_from(
        &self,
        net: u32,
        src: Ipv4Addr,
        dst: Ipv4Addr,
        payload: &[u8],
    ) -> Result<(SocketAddr, Vec<u8>), DropReason> {
        let mut out = Vec::new();
        let to = self.sealer.seal(&self.tables, net, src, &ipv4(src, dst, payload), &mut out)?;
        Ok((to, out))
    }

    /// Receives `datagram` from `source`: the inner packet delivered, if any, and the answers.
    fn receive_at(&self, source: SocketAddr, datagram: &[u8]) -> Received {
        let mut dst = vec![0u8; datagram.len().max(tun::wireguard::MIN_MESSAGE_ROOM)];
        let mut replies = Vec::new();
        let opened = open_wireguard(&self.tables, &self.counters, source, datagram, &mut dst, &mut replies)
            .map(|d| d.map(|d| dst[d.range].to_vec()));
        (opened, replies)
    }

    fn receive_from(&self, from: u32, datagram: &[u8]) -> Received {
        self.receive_at(underlay(from), datagram)
    }
}

/// Nodes A and B on `NET`, each holding the other's public key.
fn pair() -> (Node, Node) {
    let members = |_: u32| vec![(A, Some(key(A, NET, 0).public())), (B, Some(key(B, NET, 0).public()))];
    (
        Node::new(A, vec![network(NET, key(A, NET, 0), &members(A))]),
        Node::new(B, vec![network(NET, key(B, NET, 0), &members(B))]),
    )
}

/// Carries `first` from `from` to `to` and every answer back and forth until none is left;
/// returns the inner packets each side had delivered, in order.
fn exchange(from: &Node, to: &Node, first: Vec<u8>) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    exchange_counting(from, to, first, &mut None)
}

/// [`exchange`], where each refused datagram is counted in `refused` instead of failing (when
/// given).
fn exchange_counting(
    from: &Node,
    to: &Node,
    first: Vec<u8>,
    refused: &mut Option<Vec<DropReason>>,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let mut delivered = (Vec::new(), Vec::new());
    let mut flight = vec![(from.index, first)];
    let mut rounds = 0;
    while let Some((sender, datagram)) = flight.pop() {
        rounds += 1;
        assert!(rounds < 32, "the exchange does not settle");
        let (receiver, into) =
            if sender == from.index { (to, &mut delivered.1) } else { (from, &mut delivered.0) };
        let (opened, replies) = receiver.receive_from(sender, &datagram);
        match (opened, refused.as_mut()) {
            (Ok(Some(packet)), _) => into.push(packet),
            (Ok(None), _) => {}
            (Err(reason), Some(refused)) => refused.push(reason),
            (Err(reason), None) => panic!("refused: {reason:?}"),
        }
        for (dest, reply) in replies.into_iter().rev() {
            assert_eq!(dest, underlay(sender), "answers go back to the sender's underlay");
            flight.insert(0, (receiver.index, reply));
        }
    }
    delivered
}

/// A and B with a session, as after a first packet.
fn connected() -> (Node, Node) {
    let (a, b) = pair();
    let (_, init) = a.send(NET, B, b"hello").unwrap();
    let (_, got_b) = exchange(&a, &b, init);
    assert_eq!(got_b.len(), 1, "the first packet waited for the handshake and then arrived");
    (a, b)
}

#[test]
fn the_first_packet_waits_for_the_handshake_then_traffic_flows_both_ways() {
    let (a, b) = pair();
    let (to, init) = a.send(NET, B, b"hello").unwrap();
    assert_eq!(to, underlay(B));
    assert_eq!(network_of(&init), Some(NET));
    assert_eq!(init.len(), PREFIX_LEN + 148, "a handshake initiation, the packet queued behind it");
    let (_, at_b) = exchange(&a, &b, init);
    assert_eq!(at_b, vec![ipv4(endpoint(A), endpoint(B), b"hello")]);
    // Now in session: data either way, opened in one step.
    let (_, datagram) = b.send(NET, A, b"reply").unwrap();
    assert_eq!(datagram.len(), PREFIX_LEN + 32 + ipv4(endpoint(B), endpoint(A), b"reply").len());
    let (opened, replies) = a.receive_from(B, &datagram);
    assert_eq!(opened.unwrap(), Some(ipv4(endpoint(B), endpoint(A), b"reply")));
    assert!(replies.is_empty());
    let (_, datagram) = a.send(NET, B, b"more").unwrap();
    assert_eq!(b.receive_from(A, &datagram).0.unwrap(), Some(ipv4(endpoint(A), endpoint(B), b"more")));
    let status = a.tables.wireguard_status();
    assert_eq!(status.len(), 1);
    assert_eq!(status[0].public, key(B, NET, 0).public());
    assert!(status[0].last_handshake.is_some());
    assert!(status[0].tx_bytes > 0 && status[0].rx_bytes > 0, "{status:?}");
}

#[test]
fn the_plaintext_is_nowhere_in_the_datagram() {
    let (a, b) = connected();
    let secret = b"the-plaintext-marker-0123456789";
    let (_, datagram) = a.send(NET, B, secret).unwrap();
    assert!(!datagram.windows(secret.len()).any(|w| w == secret));
    assert!(b.receive_from(A, &datagram).0.unwrap().is_some());
}

#[test]
fn a_replayed_datagram_is_refused() {
    let (a, b) = connected();
    let (_, datagram) = a.send(NET, B, b"once").unwrap();
    assert!(b.receive_from(A, &datagram).0.unwrap().is_some());
    assert_eq!(b.receive_from(A, &datagram).0, Err(DropReason::Replay));
    assert_eq!(b.counters.drops(DropReason::Replay), 1);
}

#[test]
fn a_replayed_handshake_opens_nothing() {
    let (a, b) = pair();
    let (_, init) = a.send(NET, B, b"hello").unwrap();
    exchange(&a, &b, init.clone());
    // The same initiation again (its timestamp is not newer): refused, no answer.
    let (opened, replies) = b.receive_from(A, &init);
    assert!(opened.is_err(), "{opened:?}");
    assert!(replies.is_empty());
}

#[test]
fn any_flipped_bit_is_refused() {
    let (a, b) = connected();
    let (_, datagram) = a.send(NET, B, b"payload").unwrap();
    for i in PREFIX_LEN..datagram.len() {
        let mut t = datagram.clone();
        t[i] ^= 0x01;
        let (opened, _) = b.receive_from(A, &t);
        assert!(!matches!(opened, Ok(Some(_))), "byte {i} flipped was delivered");
    }
    assert!(b.receive_from(A, &datagram).0.unwrap().is_some(), "the untouched one still is");
}

#[test]
fn only_the_peers_attested_underlay_speaks_for_it() {
    let (a, b) = connected();
    let (_, datagram) = a.send(NET, B, b"x").unwrap();
    let elsewhere = SocketAddr::from(([192, 168, 0, 99], 4800));
    assert_eq!(b.receive_at(elsewhere, &datagram).0, Err(DropReason::WrongSource));
    let other_port = SocketAddr::from(([192, 168, 0, A as u8], 4801));
    assert_eq!(b.receive_at(other_port, &datagram).0, Err(DropReason::WrongSource));
}

#[test]
fn an_impostor_without_the_peers_key_gets_no_handshake() {
    // C claims to be A (it sends from A's underlay, as an on-path attacker can) with its own key.
    let (_, b) = pair();
    let impostor = Node::new(
        A,
        vec![network(
            NET,
            key(C, NET, 0),
            &[(A, Some(key(C, NET, 0).public())), (B, Some(key(B, NET, 0).public()))],
        )],
    );
    let (_, init) = impostor.send(NET, B, b"let me in").unwrap();
    let (opened, replies) = b.receive_from(A, &init);
    assert!(opened.is_err(), "{opened:?}");
    assert!(replies.is_empty(), "no answer to a key B was not given for A");
}

#[test]
fn a_node_lying_about_its_key_gains_nothing() {
    // C reported A's public key as its own: B's tunnel for C expects A's key, which C lacks.
    let members = vec![(B, Some(key(B, NET, 0).public())), (C, Some(key(A, NET, 0).public()))];
    let b = Node::new(B, vec![network(NET, key(B, NET, 0), &members)]);
    let liar = Node::new(C, vec![network(NET, key(C, NET, 0), &members)]);
    let (_, init) = liar.send(NET, B, b"x").unwrap();
    let (opened, replies) = b.receive_from(C, &init);
    assert!(opened.is_err() && replies.is_empty(), "{opened:?}");
}

#[test]
fn a_removed_peer_is_refused_at_once_and_its_sessions_go() {
    let (a, mut b) = connected();
    // Control drops A from the network: B's peers no longer list it.
    b.reconfigure(vec![network(NET, key(B, NET, 0), &[(B, Some(key(B, NET, 0).public()))])]);
    let (_, datagram) = a.send(NET, B, b"still here?").unwrap();
    assert_eq!(b.receive_from(A, &datagram).0, Err(DropReason::WrongSource));
    assert!(b.tables.wireguard_status().is_empty());
    // Back with a key it has not reported (none): still refused, and the old session is gone.
    b.reconfigure(vec![network(NET, key(B, NET, 0), &[(A, None), (B, Some(key(B, NET, 0).public()))])]);
    assert_eq!(b.receive_from(A, &datagram).0, Err(DropReason::UnknownSender));
    b.reconfigure(vec![network(
        NET,
        key(B, NET, 0),
        &[(A, Some(key(A, NET, 0).public())), (B, Some(key(B, NET, 0).public()))],
    )]);
    let (opened, _) = b.receive_from(A, &datagram);
    assert!(opened.is_err(), "a session of before the removal is not taken back: {opened:?}");
}

#[test]
fn sessions_survive_a_new_config_with_the_same_keys_and_end_with_a_new_key() {
    let (mut a, mut b) = connected();
    let same = vec![(A, Some(key(A, NET, 0).public())), (B, Some(key(B, NET, 0).public()))];
    // An unrelated change (a new member C): A's tunnel with B and its session go on.
    let mut with_c = same.clone();
    with_c.push((C, Some(key(C, NET, 0).public())));
    a.reconfigure(vec![network(NET, key(A, NET, 0), &with_c)]);
    let (_, datagram) = a.send(NET, B, b"still in session").unwrap();
    assert_eq!(datagram.len(), PREFIX_LEN + 32 + 20 + 16, "a data message, no new handshake");
    assert!(b.receive_from(A, &datagram).0.unwrap().is_some());
    // A rotates its key: A's tunnels are new, and B's refuse A until control tells B the new key.
    let rotated = vec![(A, Some(key(A, NET, 1).public())), (B, Some(key(B, NET, 0).public()))];
    a.reconfigure(vec![network(NET, key(A, NET, 1), &rotated)]);
    let mut timer = Vec::new();
    let asked = a.tables.wireguard_peers().any(|(net, peer, _)| peer.tick(net, &mut timer));
    assert!(asked, "the new tunnel asks for a handshake at once, the old one being in use");
    let (opened, replies) = b.receive_from(A, &timer);
    assert!(opened.is_err() && replies.is_empty(), "B does not know A's new key yet: {opened:?}");
    b.reconfigure(vec![network(NET, key(B, NET, 0), &rotated)]);
    let (_, at_b) = exchange(&a, &b, timer);
    assert!(at_b.is_empty());
    let (_, datagram) = b.send(NET, A, b"after the rotation").unwrap();
    assert_eq!(
        a.receive_from(B, &datagram).0.unwrap(),
        Some(ipv4(endpoint(B), endpoint(A), b"after the rotation"))
    );
}

#[test]
fn networks_are_apart_even_between_the_same_two_nodes() {
    let members = |net: u32| vec![(A, Some(key(A, net, 0).public())), (B, Some(key(B, net, 0).public()))];
    let a = Node::new(
        A,
        vec![
            network(NET, key(A, NET, 0), &members(NET)),
            network(OTHER_NET, key(A, OTHER_NET, 0), &members(OTHER_NET)),
        ],
    );
    let b = Node::new(
        B,
        vec![
            network(NET, key(B, NET, 0), &members(NET)),
            network(OTHER_NET, key(B, OTHER_NET, 0), &members(OTHER_NET)),
        ],
    );
    let (_, init) = a.send(NET, B, b"x").unwrap();
    exchange(&a, &b, init);
    let (_, datagram) = a.send(NET, B, b"for NET only").unwrap();
    // The same datagram relabelled for the other network: that network's tunnel refuses it.
    let mut relabelled = datagram.clone();
    tun::wireguard::write_prefix(OTHER_NET, &mut relabelled);
    let (opened, _) = b.receive_from(A, &relabelled);
    assert!(opened.is_err(), "{opened:?}");
    assert!(b.receive_from(A, &datagram).0.unwrap().is_some());
}

#[test]
fn transports_do_not_mix() {
    let (a, b) = connected();
    let (_, datagram) = a.send(NET, B, b"x").unwrap();
    // B holds NET as an AES-GCM network (no WireGuard key): the WireGuard datagram is refused.
    let mut aes = network(NET, key(B, NET, 0), &[(A, None), (B, None)]);
    aes.wireguard = None;
    let aes_b = Node::new(B, vec![aes]);
    assert_eq!(aes_b.receive_from(A, &datagram).0, Err(DropReason::Malformed));
    // A datagram of an unknown network.
    let mut unknown = datagram.clone();
    tun::wireguard::write_prefix(0x00_7777, &mut unknown);
    assert_eq!(b.receive_from(A, &unknown).0, Err(DropReason::UnknownNetwork));
}

#[test]
fn a_peer_cannot_speak_for_another_nodes_endpoint() {
    let (a, b) = connected();
    // A's workload sends a packet whose inner source is C's endpoint: A's sealer refuses it...
    let mut out = Vec::new();
    let spoofed = ipv4(endpoint(C), endpoint(B), b"x");
    assert_eq!(a.sealer.seal(&a.tables, NET, endpoint(A), &spoofed, &mut out), Err(DropReason::Filtered));
    // ...and a compromised A that skips that check is refused by B (C is not an endpoint A hosts).
    let members = vec![(A, Some(key(A, NET, 0).public())), (B, Some(key(B, NET, 0).public()))];
    let mut forged = network(NET, key(A, NET, 0), &members);
    forged.peers.push(PeerConfig {
        address: endpoint(C),
        node_index: A,
        underlay: Some(underlay(A)),
        wireguard: None,
    });
    let mut liar = a;
    liar.reconfigure(vec![forged]);
    let (_, datagram) = liar.send_from(NET, endpoint(C), endpoint(B), b"x").unwrap();
    assert_eq!(b.receive_from(A, &datagram).0, Err(DropReason::NotSenderEndpoint));
}

#[test]
fn datagrams_shorter_than_any_message_are_refused_without_touching_the_tunnel() {
    let (a, b) = connected();
    // Something queued at B for A, and a session current: what an empty message would flush.
    let (_, _) = b.send(NET, A, b"x").unwrap();
    for len in [PREFIX_LEN, PREFIX_LEN + 1, PREFIX_LEN + 31] {
        let mut short = vec![0u8; len];
        tun::wireguard::write_prefix(NET, &mut short);
        let (opened, replies) = b.receive_from(A, &short);
        assert_eq!(opened, Err(DropReason::Malformed), "{len} bytes");
        assert!(replies.is_empty());
    }
    let (_, datagram) = a.send(NET, B, b"still fine").unwrap();
    assert!(b.receive_from(A, &datagram).0.unwrap().is_some());
}

#[test]
fn a_flood_of_handshakes_is_cut_to_the_peers_rate() {
    let (a, b) = pair();
    let (_, init) = a.send(NET, B, b"hello").unwrap();
    let refused = (0..40).filter(|_| b.receive_from(A, &init).0.is_err()).count();
    assert!(refused >= 39, "all but the first are refused (replays, or over the rate)");
    let limited = b.counters.drops(DropReason::RateLimited);
    assert!((25..=31).contains(&limited), "{limited} of 40 refused before any X25519 work");
}

#[test]
fn packets_queued_for_a_lost_handshake_leave_once_the_peers_own_session_is_current() {
    let (a, b) = pair();
    // A's first packet waits behind an initiation the network loses.
    let (_, lost) = a.send(NET, B, b"queued at A").unwrap();
    assert_eq!(lost.len(), PREFIX_LEN + 148);
    // B starts its own handshake; A answers it; B's first data makes that session current at A.
    let (_, init) = b.send(NET, A, b"from B").unwrap();
    // A answers without starting a handshake of its own (which would void its answer): nothing
    // is refused on the way.
    let mut refused = Some(Vec::new());
    let (at_b, at_a) = exchange_counting(&b, &a, init, &mut refused);
    assert_eq!(refused, Some(vec![]));
    assert_eq!(at_b, vec![ipv4(endpoint(A), endpoint(B), b"queued at A")]);
    assert_eq!(at_a, vec![ipv4(endpoint(B), endpoint(A), b"from B")]);
}
