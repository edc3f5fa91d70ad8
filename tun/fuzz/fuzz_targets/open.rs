//! Any datagram from the underlay is decoded and opened without a panic: it is delivered only if
//! it authenticates, and otherwise dropped with a reason.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tun::aead::Backend;
use tun::core::{Config, Counters, KeyRole, NetworkConfig, Opener, PeerConfig, PeerKey, Tables};

static TABLES: LazyLock<Tables> = LazyLock::new(|| {
    let peers = [(2u8, 1u32), (3, 2)]
        .into_iter()
        .map(|(last, node_index)| PeerConfig {
            address: Ipv4Addr::new(10, 0, 0, last),
            node_index,
            underlay: Some(SocketAddr::from(([192, 168, 0, last], 4800))),
        })
        .collect::<Vec<_>>();
    let networks = vec![
        NetworkConfig {
            id: 7,
            name: "enc".into(),
            encrypted: true,
            keys: vec![PeerKey { peer: 1, role: KeyRole::Current, epoch: 1, key: [1; 32] }],
            peers: peers.clone(),
        },
        NetworkConfig { id: 8, name: "plain".into(), encrypted: false, keys: vec![], peers },
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
});
