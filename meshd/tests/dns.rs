//! The DNS server over real UDP and TCP on 127.0.0.1, with an in-process client.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use hickory_proto::op::{Message, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use mesh_api::ids::NodeId;
use mesh_api::model::{PortSpec, Protocol};
use mesh_api::slice::{NodeSlice, Peer, ServiceRecord, SliceNetwork};
use meshd::dns::{Upstream, Zone, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

fn record(name: &str, vip: [u8; 4], endpoints: &[[u8; 4]], port: u16) -> ServiceRecord {
    ServiceRecord {
        name: name.into(),
        vip: vip.into(),
        ports: vec![PortSpec { port, protocol: Protocol::Tcp }],
        endpoints: endpoints.iter().map(|e| Ipv4Addr::from(*e)).collect(),
    }
}

fn network(name: &str, id: u32, subnet: &str, services: Vec<ServiceRecord>) -> SliceNetwork {
    SliceNetwork {
        name: name.into(),
        id,
        subnet: subnet.parse().unwrap(),
        encrypted: true,
        wireguard: None,
        ring: vec![],
        pair_keys: vec![],
        peers: Vec::<Peer>::new().into(),
        services: services.into(),
    }
}

fn slice(api_endpoints: &[[u8; 4]]) -> NodeSlice {
    NodeSlice {
        version: 1,
        node: NodeId::random(),
        endpoints: vec![],
        networks: vec![
            network(
                "front",
                1,
                "10.1.0.0/24",
                vec![
                    record("api", [10, 1, 0, 2], api_endpoints, 80),
                    record("web", [10, 1, 0, 5], &[[10, 1, 0, 6]], 8080),
                ],
            ),
            network("back", 2, "10.2.0.0/24", vec![record("db", [10, 2, 0, 2], &[[10, 2, 0, 3]], 5432)]),
        ],
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
    }
}

/// A server for a workload on `front` only.
async fn server(
    zone: Zone,
    upstream: Upstream,
) -> (SocketAddr, Arc<ArcSwap<Zone>>, tokio::task::JoinHandle<()>) {
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    let zone = Arc::new(ArcSwap::from_pointee(zone));
    let task = tokio::spawn(serve(udp, tcp, zone.clone(), Arc::new(upstream)));
    (addr, zone, task)
}

fn front_zone(api: &[[u8; 4]]) -> Zone {
    Zone::for_workload(&slice(api), &BTreeSet::from(["front".to_owned()]))
}

async fn ask(server: SocketAddr, name: &str, kind: RecordType) -> Message {
    let mut q = Message::query();
    q.add_query(hickory_proto::op::Query::query(Name::from_ascii(name).unwrap(), kind));
    q.metadata.recursion_desired = true;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&q.to_vec().unwrap(), server).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n =
        tokio::time::timeout(Duration::from_secs(5), sock.recv(&mut buf)).await.expect("an answer").unwrap();
    let reply = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(reply.metadata.id, q.metadata.id);
    reply
}

fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    let mut v: Vec<Ipv4Addr> =
        m.answers.iter().filter_map(|r| if let RData::A(a) = &r.data { Some(a.0) } else { None }).collect();
    v.sort();
    v
}

#[tokio::test]
async fn answers_names_of_its_networks_only() {
    let (addr, _zone, _t) = server(front_zone(&[[10, 1, 0, 3], [10, 1, 0, 4]]), Upstream::none()).await;
    for name in ["api", "api.front", "API.Front.", "api."] {
        let m = ask(addr, name, RecordType::A).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NoError, "{name}");
        assert_eq!(addresses(&m), [Ipv4Addr::new(10, 1, 0, 2)], "{name}");
        assert!(m.answers.iter().all(|r| r.ttl <= 5));
    }
    assert_eq!(
        addresses(&ask(addr, "tasks.api", RecordType::A).await),
        [Ipv4Addr::new(10, 1, 0, 3), Ipv4Addr::new(10, 1, 0, 4)]
    );
    assert_eq!(addresses(&ask(addr, "tasks.api.front", RecordType::A).await).len(), 2);
    let srv = ask(addr, "api", RecordType::SRV).await;
    let ports: Vec<u16> = srv
        .answers
        .iter()
        .filter_map(|r| if let RData::SRV(s) = &r.data { Some(s.port) } else { None })
        .collect();
    assert_eq!(ports, [80]);
    let ptr = ask(addr, "3.0.1.10.in-addr.arpa", RecordType::PTR).await;
    assert!(matches!(&ptr.answers[0].data, RData::PTR(p) if p.0.to_ascii() == "api.front."), "{ptr:?}");
    // A service on a network this workload is not on does not exist for it. (`db.back` is, to
    // the workload, just a name in some other domain: it goes upstream like any other, as
    // telling it apart would reveal that a network `back` exists.)
    let other = ask(addr, "db.back", RecordType::A).await;
    assert!(other.answers.is_empty());
    assert_ne!(other.metadata.response_code, ResponseCode::NoError);
    for name in ["db", "tasks.db", "nothing", "77.0.1.10.in-addr.arpa"] {
        let m = ask(addr, name, if name.ends_with("arpa") { RecordType::PTR } else { RecordType::A }).await;
        assert_eq!(m.metadata.response_code, ResponseCode::NXDomain, "{name}");
        assert!(m.answers.is_empty());
    }
    // The VIP's reverse name, too.
    let vip = ask(addr, "2.0.1.10.in-addr.arpa", RecordType::PTR).await;
    assert_eq!(vip.answers.len(), 1);
}

#[tokio::test]
async fn other_names_without_an_upstream_fail_fast() {
    let (addr, _zone, _t) = server(front_zone(&[]), Upstream::none()).await;
    let start = Instant::now();
    let m = ask(addr, "example.com", RecordType::A).await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(start.elapsed() < Duration::from_millis(500), "{:?}", start.elapsed());
}

#[tokio::test]
async fn answers_change_as_soon_as_the_slice_does() {
    let (addr, zone, _t) = server(front_zone(&[[10, 1, 0, 3]]), Upstream::none()).await;
    assert_eq!(addresses(&ask(addr, "tasks.api", RecordType::A).await), [Ipv4Addr::new(10, 1, 0, 3)]);
    zone.store(Arc::new(front_zone(&[[10, 1, 0, 9]])));
    assert_eq!(addresses(&ask(addr, "tasks.api", RecordType::A).await), [Ipv4Addr::new(10, 1, 0, 9)]);
}

#[tokio::test]
async fn malformed_queries_get_formerr_or_nothing_and_the_server_keeps_serving() {
    let (addr, _zone, _t) = server(front_zone(&[[10, 1, 0, 3]]), Upstream::none()).await;
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&[0xab, 0xcd, 0xff, 0xff, 0, 9], addr).await.unwrap();
    let mut buf = [0u8; 512];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf)).await.unwrap().unwrap();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!((m.metadata.id, m.metadata.response_code), (0xabcd, ResponseCode::FormErr));
    sock.send_to(&[1], addr).await.unwrap();
    assert!(
        tokio::time::timeout(Duration::from_millis(300), sock.recv(&mut buf)).await.is_err(),
        "one byte: dropped"
    );
    assert_eq!(addresses(&ask(addr, "api", RecordType::A).await), [Ipv4Addr::new(10, 1, 0, 2)]);
}

#[tokio::test]
async fn answers_over_tcp_too() {
    let (addr, _zone, _t) = server(front_zone(&[[10, 1, 0, 3]]), Upstream::none()).await;
    let mut q = Message::query();
    q.add_query(hickory_proto::op::Query::query(Name::from_ascii("web").unwrap(), RecordType::A));
    let bytes = q.to_vec().unwrap();
    let mut conn = TcpStream::connect(addr).await.unwrap();
    conn.write_u16(bytes.len() as u16).await.unwrap();
    conn.write_all(&bytes).await.unwrap();
    let len = conn.read_u16().await.unwrap() as usize;
    let mut buf = vec![0u8; len];
    conn.read_exact(&mut buf).await.unwrap();
    assert_eq!(addresses(&Message::from_vec(&buf).unwrap()), [Ipv4Addr::new(10, 1, 0, 5)]);
}

#[tokio::test]
async fn with_policy_visibility_only_reachable_services_have_names() {
    let visible = BTreeSet::from(["web".to_owned()]);
    let zone =
        Zone::visible_to(&slice(&[[10, 1, 0, 3]]), &BTreeSet::from(["front".to_owned()]), Some(&visible));
    let (addr, _zone, _t) = server(zone, Upstream::none()).await;
    assert_eq!(addresses(&ask(addr, "web", RecordType::A).await), [Ipv4Addr::new(10, 1, 0, 5)]);
    for name in ["api", "tasks.api"] {
        assert_eq!(
            ask(addr, name, RecordType::A).await.metadata.response_code,
            ResponseCode::NXDomain,
            "{name}"
        );
    }
}
