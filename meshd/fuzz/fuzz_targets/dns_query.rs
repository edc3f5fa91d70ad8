//! Any bytes sent to a workload's DNS server: parsed, answered from the zone or refused, never
//! a panic.
#![no_main]

use std::collections::BTreeSet;
use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use mesh_api::ids::NodeId;
use mesh_api::model::{PortSpec, Protocol};
use mesh_api::slice::{NodeSlice, Peer, ServiceRecord, SliceNetwork};
use meshd::dns::{Upstream, Zone};

static ZONE: LazyLock<Zone> = LazyLock::new(|| {
    let service = ServiceRecord {
        name: "api".into(),
        vip: [10, 1, 0, 2].into(),
        ports: vec![PortSpec { port: 80, protocol: Protocol::Tcp }],
        endpoints: vec![[10, 1, 0, 3].into()],
    };
    let net = SliceNetwork {
        name: "front".into(),
        id: 1,
        subnet: "10.1.0.0/24".parse().unwrap(),
        encrypted: true,
        wireguard: None,
        ring: vec![],
        pair_keys: vec![],
        peers: Vec::<Peer>::new().into(),
        services: vec![service].into(),
    };
    let slice = NodeSlice {
        version: 1,
        node: NodeId::random(),
        endpoints: vec![],
        networks: vec![net],
        policy: None,
        node_index: 1,
        visibility: Default::default(),
        removed_nodes: vec![],
        managers: vec![],
        manager_ids: vec![],
        trust_pem: String::new(),
        cross_pem: String::new(),
        published: vec![],
        ingress: vec![],
    };
    Zone::for_workload(&slice, &BTreeSet::from(["front".to_owned()]))
});

static RUNTIME: LazyLock<tokio::runtime::Runtime> =
    LazyLock::new(|| tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap());

fuzz_target!(|data: &[u8]| {
    let upstream = Upstream::none();
    if let Some(reply) = RUNTIME.block_on(meshd::dns::respond(&ZONE, &upstream, data)) {
        assert!(hickory_proto::op::Message::from_vec(&reply).is_ok(), "every reply parses");
    }
});
