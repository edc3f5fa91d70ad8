//! Any datagram from the underlay is decoded and opened without a panic: it is delivered only if
//! it authenticates, and otherwise dropped with a reason.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tun::aead::Backend;
use tun::core::{
    Config, Counters, KeyRole, NetworkConfig, Opener, PeerConfig, PeerKey, Tables, open_wireguard,
};
use tun::wireguard::StaticKey;

static TABLES: LazyLock<Tables> = LazyLock::new(|| {
    let peers = [(2u8, 1u32), (3, 2)]
        .into_iter()
        .map(|(last, node_index)| PeerConfig {
            address: Ipv4Addr::new(10, 0, 0, last),
            node_index,
            underlay: Some(SocketAddr::from(([192, 168, 0, last], 4800))),
            wireguard: Some(StaticKey::from_bytes([last; 32]).public()),
        })
        .collect::<Vec<_>>();
    let networks = vec![
        NetworkConfig {
            id: 7,
            name: "enc".into(),
            encrypted: true,
            keys: vec![PeerKey { peer: 1, role: KeyRole::Current, epoch: 1, key: [1; 32] }],
            peers: peers.clone(),
            wireguard: None,
        },
        NetworkConfig {
            id: 8,
            name: "plain".into(),
            encrypted: false,
            keys: vec![],
            peers: peers.clone(),
            wireguard: None,
        },
        NetworkConfig {
            id: 9,
            name: "wg".into(),
            encrypted: true,
            keys: vec![],
            peers,
            wireguard: Some(StaticKey::from_bytes([3; 32])),
        },
    ];
    Tables::new(&Config { local_index: 2, networks }, Backend::DEFAULT)
});

fuzz_target!(|data: &[u8]| {
    let _ = tun::header::Header::decode(data);
    let counters = Counters::default();
    let mut buf = data.to_vec();
    // From the underlay of node 1, the peer of node 2.
    let source = SocketAddr::from(([192, 168, 0, 2], 4800));
    if let Ok(d) = Opener::default().open(&TABLES, &counters, source, &mut buf) {
        // Only a plain-network packet can be forged without the key.
        assert_eq!(d.network, 8);
    }
    // A WireGuard datagram from node 1's underlay: nothing is delivered without node 1's key.
    let mut dst = vec![0u8; data.len().max(tun::wireguard::MIN_MESSAGE_ROOM)];
    let mut replies = Vec::new();
    let opened = open_wireguard(&TABLES, &counters, source, data, &mut dst, &mut replies);
    assert!(!matches!(opened, Ok(Some(_))), "a forged WireGuard datagram was delivered");
});
