//! Networks, services and lazy key distribution end to end: a real control plane and nodes
//! holding real sessions (meshd's code) over gRPC and TLS on 127.0.0.1. What a node learns is
//! asserted on what its session actually delivered.

use std::net::SocketAddr;
use std::time::Duration;

use control::config::ManagerOptions;
use mesh_api::client::AdminClient;
use mesh_api::keys::{KEY_LEN, KeyUse};
use mesh_api::proto::pb;
use mesh_api::slice::NodeSlice;
use mesh_tests::{SimNode, TestCluster, eventually};
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);

fn underlay(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i], 4800))
}

async fn cluster_with_nodes(n: u8, options: ManagerOptions) -> (TestCluster, Vec<SimNode>) {
    let cluster = TestCluster::start_with(HOUR, options).await;
    let mut nodes = Vec::new();
    for i in 0..n {
        nodes.push(SimNode::start(&cluster, underlay(10 + i)).await);
    }
    (cluster, nodes)
}

fn service(name: &str, networks: &[&str], replicas: u32, constraints: &[&str]) -> pb::CreateServiceRequest {
    pb::CreateServiceRequest {
        name: name.into(),
        networks: networks.iter().map(|s| s.to_string()).collect(),
        ports: vec![pb::Port { port: 80, protocol: "tcp".into() }],
        replicas,
        constraints: constraints.iter().map(|s| s.to_string()).collect(),
        command: String::new(),
        run: None,
        signed: None,
        publish: vec![],
    }
}

/// Every key byte string any slice in `slices` carried for `network`.
fn keys_seen(slices: &[NodeSlice], network: &str) -> Vec<[u8; KEY_LEN]> {
    slices
        .iter()
        .flat_map(|s| s.networks.iter().filter(|n| n.name == network))
        .flat_map(|n| n.pair_keys.iter().map(|k| k.key))
        .collect()
}

fn current_epoch(slice: &NodeSlice, network: &str) -> Option<u32> {
    let n = slice.networks.iter().find(|n| n.name == network)?;
    n.ring.iter().find(|(u, _)| *u == KeyUse::Current).map(|(_, e)| *e)
}

fn has_network(slice: &NodeSlice, network: &str) -> bool {
    slice.networks.iter().any(|n| n.name == network)
}

#[tokio::test]
async fn a_node_without_an_endpoint_never_receives_the_networks_keys_or_records() {
    let (cluster, nodes) = cluster_with_nodes(3, ManagerOptions::default()).await;
    let mut admin = cluster.admin().await;
    for n in &nodes[..2] {
        admin.update_node(n.id.as_str(), vec!["zone=a".into()], vec![]).await.unwrap();
    }
    admin.create_network("secret", "10.50.0.0/24", true).await.unwrap();
    let created =
        admin.create_service(service("api", &["secret"], 2, &["node.labels.zone==a"])).await.unwrap();
    let holders: Vec<_> = created.endpoints.iter().map(|e| e.node.clone()).collect();
    assert!(holders.contains(&nodes[0].id) && holders.contains(&nodes[1].id));
    for n in &nodes[..2] {
        n.wait_for("the network in the slice", |s| has_network(s, "secret")).await;
    }
    for _ in 0..3 {
        admin.rotate_network_key("secret").await.unwrap();
    }
    nodes[0].wait_for("epoch 4", |s| current_epoch(s, "secret") == Some(4)).await;

    // The two holders saw the network, its keys, peers and the service record...
    let latest = nodes[0].latest().unwrap();
    let net = latest.networks.iter().find(|n| n.name == "secret").unwrap();
    assert_eq!(net.peers.len(), 2);
    assert!(net.services.iter().any(|r| r.name == "api" && r.endpoints.len() == 2));
    let keys = keys_seen(&nodes[0].slices(), "secret");
    assert!(keys.len() >= 3);
    // ...the third saw none of it, in any message it was ever sent.
    let third = nodes[2].slices();
    assert!(!third.is_empty());
    let network_id = latest.networks[0].id;
    for slice in &third {
        assert!(slice.networks.is_empty(), "{slice:?}");
        assert!(slice.endpoints.is_empty());
        let debug = format!("{slice:?}");
        assert!(
            !debug.contains("secret")
                && !debug.contains("10.50.0.")
                && !debug.contains(&network_id.to_string())
        );
    }
    assert!(keys_seen(&third, "secret").is_empty());
}

#[tokio::test]
async fn a_node_whose_endpoint_leaves_gets_no_later_key_and_the_key_rotates() {
    let (cluster, nodes) = cluster_with_nodes(2, ManagerOptions::default()).await;
    let mut admin = cluster.admin().await;
    admin.create_network("front", "10.51.0.0/24", true).await.unwrap();
    admin.create_service(service("web", &["front"], 2, &[])).await.unwrap();
    for n in &nodes {
        n.wait_for("the network", |s| current_epoch(s, "front") == Some(1)).await;
    }
    let scaled = admin.scale_service("web", 1).await.unwrap();
    let stay = scaled.endpoints[0].node.clone();
    let (kept, left) = if nodes[0].id == stay { (&nodes[0], &nodes[1]) } else { (&nodes[1], &nodes[0]) };

    // The leaver's slice drops the network; the kept node's drops the leaver and every key of
    // their pair, at once and without a rekey (the other pairs' keys do not change).
    left.wait_for("the network to be gone", |s| !has_network(s, "front")).await;
    let leaver_keys = keys_seen(&left.slices(), "front");
    assert!(!leaver_keys.is_empty());
    let latest = kept
        .wait_for("the leaver's pair keys to go", |s| {
            s.networks
                .iter()
                .filter(|n| n.name == "front")
                .all(|n| n.pair_keys.iter().all(|k| !leaver_keys.contains(&k.key)))
        })
        .await;
    assert_eq!(current_epoch(&latest, "front"), Some(1), "no rekey");
    // Later keys never reach the leaver either.
    admin.rotate_network_key("front").await.unwrap();
    kept.wait_for("epoch 2", |s| current_epoch(s, "front") == Some(2)).await;
    assert!(left.slices().iter().all(|s| current_epoch(s, "front").unwrap_or(0) <= 1));
}

#[tokio::test]
async fn a_removed_node_loses_its_pair_keys_everywhere_and_cannot_reconnect() {
    let (cluster, mut nodes) = cluster_with_nodes(3, ManagerOptions::default()).await;
    let mut admin = cluster.admin().await;
    admin.create_network("front", "10.52.0.0/24", true).await.unwrap();
    admin.create_service(service("web", &["front"], 2, &[])).await.unwrap();
    let placed = admin.inspect_service("web").await.unwrap();
    let victim_id = placed.endpoints[0].node.clone();
    let victim = nodes.iter().position(|n| n.id == victim_id).unwrap();
    nodes[victim].wait_for("the network", |s| has_network(s, "front")).await;

    admin.remove_node(victim_id.as_str(), false).await.unwrap();
    // The endpoint moved to the node that had none; no rekey: the victim's keys were its pairs'.
    let after = admin.inspect_network("front").await.unwrap();
    assert_eq!(after.key_epoch, Some(1));
    assert!(!after.nodes.contains(&victim_id));
    let moved = admin.inspect_service("web").await.unwrap();
    assert_eq!(moved.endpoints.len(), 2);
    assert!(moved.endpoints.iter().all(|e| e.node != victim_id));

    // Its session was refused and it gives up.
    let mut removed = nodes.remove(victim);
    eventually("the removed node's session to end", || removed_ended(&removed)).await;
    let why = removed.ended().await.expect("session ended");
    assert!(why.to_string().contains("removed"), "{why}");
    // No survivor holds any key the removed node was ever sent.
    let seen = keys_seen(&removed.slices(), "front");
    assert!(!seen.is_empty());
    for survivor in &nodes {
        survivor
            .wait_for("the removed node's pair keys to go", |s| {
                has_network(s, "front")
                    && s.networks.iter().all(|n| n.pair_keys.iter().all(|k| !seen.contains(&k.key)))
            })
            .await;
    }

    // A fresh attempt with its certificate is refused.
    let node = meshd::identity::NodeDir::new(&removed.state_dir()).load().unwrap();
    let channel = cluster.channel_as(Some(&node.identity)).await;
    let err = pb::dispatcher_client::DispatcherClient::new(channel)
        .session(pb::SessionRequest { underlay: String::new(), boot: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
}

fn removed_ended(node: &SimNode) -> bool {
    node.events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, meshd::session::SessionEvent::Disconnected(why) if why.contains("removed")))
}

#[tokio::test]
async fn keys_rotate_periodically() {
    let options = ManagerOptions { key_rotation: Duration::from_secs(1), ..ManagerOptions::default() };
    let (cluster, nodes) = cluster_with_nodes(1, options).await;
    let mut admin = cluster.admin().await;
    admin.create_network("tick", "10.53.0.0/24", true).await.unwrap();
    admin.create_service(service("clock", &["tick"], 1, &[])).await.unwrap();
    let slice = nodes[0].wait_for("three periodic rotations", |s| current_epoch(s, "tick") >= Some(4)).await;
    let net = &slice.networks[0];
    let epochs: Vec<u32> = net.ring.iter().map(|(_, e)| *e).collect();
    let current = current_epoch(&slice, "tick").unwrap();
    assert_eq!(epochs, vec![current + 1, current, current - 1], "next, current, previous");
}

#[tokio::test]
async fn endpoints_move_off_a_node_that_goes_down() {
    let options = ManagerOptions { down_after: Duration::from_secs(1), ..ManagerOptions::default() };
    let (cluster, nodes) = cluster_with_nodes(2, options).await;
    let mut admin = cluster.admin().await;
    admin.create_network("front", "10.54.0.0/24", true).await.unwrap();
    let created = admin.create_service(service("web", &["front"], 1, &[])).await.unwrap();
    let first = created.endpoints[0].node.clone();
    let down = nodes.iter().find(|n| n.id == first).unwrap();
    let other = nodes.iter().find(|n| n.id != first).unwrap();
    down.stop();
    other.wait_for("the endpoint to move here", |s| s.endpoints.iter().any(|e| e.service == "web")).await;
    let moved = admin.inspect_service("web").await.unwrap();
    assert_eq!(moved.endpoints.len(), 1);
    assert_eq!(moved.endpoints[0].node, other.id);
    // No rekey: the down node's pair keys left the other node's slice with it.
    assert_eq!(admin.inspect_network("front").await.unwrap().key_epoch, Some(1));
    let latest = other.latest().unwrap();
    let front = latest.networks.iter().find(|n| n.name == "front").unwrap();
    assert!(front.pair_keys.is_empty(), "no other node on the network, no pair keys");
}

#[tokio::test]
async fn a_restarted_manager_keeps_networks_services_endpoints_and_keys_and_sessions_converge() {
    let (cluster, nodes) = cluster_with_nodes(2, ManagerOptions::default()).await;
    let mut admin = cluster.admin().await;
    admin.create_network("front", "10.55.0.0/24", true).await.unwrap();
    admin.create_network("plain", "10.56.0.0/24", false).await.unwrap();
    admin.create_service(service("web", &["front", "plain"], 2, &[])).await.unwrap();
    admin.rotate_network_key("front").await.unwrap();
    let before_slice = nodes[0].wait_for("epoch 2", |s| current_epoch(s, "front") == Some(2)).await;
    let before = (admin.list_networks().await.unwrap(), admin.list_services().await.unwrap());
    drop(admin);

    let connects = nodes[0].connects();
    let cluster = cluster.restart().await;
    let mut admin = cluster.admin().await;
    assert_eq!((admin.list_networks().await.unwrap(), admin.list_services().await.unwrap()), before);
    // The session reconnects by itself and converges to the same slice (keys included).
    eventually("the session to reconnect", || nodes[0].connects() > connects).await;
    let after_slice = nodes[0].latest().unwrap();
    assert!(after_slice.same_content(&before_slice), "{after_slice:?} != {before_slice:?}");
    // And changes after the restart arrive.
    admin.rotate_network_key("front").await.unwrap();
    nodes[0].wait_for("epoch 3", |s| current_epoch(s, "front") == Some(3)).await;
}

#[tokio::test]
async fn node_certificates_cannot_manage_networks_and_sessions_carry_only_their_own_node() {
    let (cluster, nodes) = cluster_with_nodes(2, ManagerOptions::default()).await;
    let node = meshd::identity::NodeDir::new(&nodes[0].state_dir()).load().unwrap();
    let channel = cluster.channel_as(Some(&node.identity)).await;
    let mut as_node = AdminClient::from_channel(&cluster.control(), channel);
    let err = as_node.create_network("evil", "10.66.0.0/24", true).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    let err = as_node.rotate_network_key("evil").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied));
    assert!(cluster.admin().await.list_networks().await.unwrap().is_empty());

    // The admin certificate has no session.
    let bundle = cluster.admin_bundle();
    let ca_der = mesh_api::trust::Trust::from_pem(&bundle.ca_pem).unwrap();
    let channel =
        mesh_api::client::authenticated_channel(&cluster.control(), &ca_der, Some(&bundle.identity))
            .await
            .unwrap();
    let err = pb::dispatcher_client::DispatcherClient::new(channel)
        .session(pb::SessionRequest { underlay: String::new(), boot: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    // A bad underlay is refused.
    let channel = cluster.channel_as(Some(&node.identity)).await;
    let err = pb::dispatcher_client::DispatcherClient::new(channel)
        .session(pb::SessionRequest { underlay: "not-an-address".into(), boot: 0 })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);

    for n in &nodes {
        assert!(n.slices().iter().all(|s| s.node == n.id));
    }
}

#[tokio::test]
async fn bad_inputs_get_clear_errors_and_change_nothing() {
    let (cluster, _nodes) = cluster_with_nodes(2, ManagerOptions::default()).await;
    let mut admin = cluster.admin().await;
    admin.create_network("front", "10.60.0.0/24", true).await.unwrap();
    admin.create_service(service("web", &["front"], 1, &[])).await.unwrap();
    let revision = || cluster.manager.store().read(|s| s.revision);
    let before = revision();

    let networks: Vec<(&str, &str, Code, &str)> = vec![
        ("bad", "10.61.0.0", Code::InvalidArgument, "CIDR"),
        ("bad", "300.1.0.0/24", Code::InvalidArgument, "CIDR"),
        ("bad", "10.61.0.0/30", Code::InvalidArgument, "too small"),
        ("bad", "fd00::/64", Code::InvalidArgument, "IPv6"),
        ("bad", "10.60.0.128/25", Code::FailedPrecondition, "overlaps network `front`"),
        ("front", "10.62.0.0/24", Code::AlreadyExists, "already exists"),
        ("Bad_Name", "10.63.0.0/24", Code::InvalidArgument, "name"),
    ];
    for (name, subnet, code, text) in networks {
        let err = admin.create_network(name, subnet, true).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{name} {subnet}: {err}");
        assert!(err.to_string().contains(text), "{err}");
    }
    let services: Vec<(pb::CreateServiceRequest, Code, &str)> = vec![
        (service("api", &["nowhere"], 1, &[]), Code::NotFound, "no network named `nowhere`"),
        (service("web", &["front"], 1, &[]), Code::AlreadyExists, "already exists"),
        (service("api", &["front"], 3, &[]), Code::FailedPrecondition, "3 replicas asked for, but only 2"),
        (service("api", &["front"], 1, &["node.labels.zone=a"]), Code::InvalidArgument, "constraint"),
        (service("api", &["front"], 1, &["node.id==nope"]), Code::InvalidArgument, "constraint"),
        (
            service("api", &["front"], 1, &["node.labels.zone==none"]),
            Code::FailedPrecondition,
            "node.labels.zone==none",
        ),
        (service("api", &[], 1, &[]), Code::InvalidArgument, "at least one network"),
        (service("api", &["front", "front"], 1, &[]), Code::InvalidArgument, "twice"),
    ];
    for (request, code, text) in services {
        let err = admin.create_service(request.clone()).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{request:?}: {err}");
        assert!(err.to_string().contains(text), "{err}");
    }
    let mut bad_port = service("api", &["front"], 1, &[]);
    bad_port.ports = vec![pb::Port { port: 70000, protocol: "tcp".into() }];
    assert_eq!(admin.create_service(bad_port).await.unwrap_err().code(), Some(Code::InvalidArgument));
    let err = admin.remove_network("front").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    assert!(err.to_string().contains("web"), "{err}");
    assert_eq!(admin.scale_service("nope", 1).await.unwrap_err().code(), Some(Code::NotFound));
    assert_eq!(admin.scale_service("web", 5).await.unwrap_err().code(), Some(Code::FailedPrecondition));
    let err = admin.update_node("0000000000000000000000000", vec!["a=b".into()], vec![]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::NotFound));
    let id = admin.list_nodes().await.unwrap()[0].id.clone();
    let err = admin.update_node(id.as_str(), vec!["no-equals".into()], vec![]).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    admin.create_network("plain", "10.64.0.0/24", false).await.expect("a valid request");
    assert_eq!(revision(), before + 1, "only the valid `plain` network changed anything");
    let err = admin.rotate_network_key("plain").await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));

    // After the service goes, the network can go.
    admin.remove_service("web").await.unwrap();
    admin.remove_network("front").await.unwrap();
}

#[tokio::test]
async fn addresses_are_never_handed_out_twice_and_exhaustion_is_a_clear_error() {
    let (cluster, _nodes) = cluster_with_nodes(2, ManagerOptions::default()).await;
    let mut admin = cluster.admin().await;
    // A /29 has five assignable addresses.
    admin.create_network("tiny", "10.70.0.0/29", true).await.unwrap();
    let a = admin.create_service(service("a", &["tiny"], 2, &[])).await.unwrap();
    let b = admin.create_service(service("b", &["tiny"], 1, &[])).await.unwrap();
    let mut all: Vec<_> = [&a, &b]
        .iter()
        .flat_map(|s| s.vips.values().copied().chain(s.endpoints.iter().map(|e| e.addresses["tiny"])))
        .collect();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), 5, "{all:?}");
    let err = admin.create_service(service("c", &["tiny"], 0, &[])).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::ResourceExhausted));
    assert!(err.to_string().contains("no free address"), "{err}");
    // Freed on removal, then usable again.
    admin.remove_service("b").await.unwrap();
    admin.create_service(service("c", &["tiny"], 1, &[])).await.unwrap();
}

#[tokio::test]
async fn no_key_material_is_readable_in_the_managers_files() {
    let (cluster, nodes) = cluster_with_nodes(2, ManagerOptions::default()).await;
    let mut admin = cluster.admin().await;
    admin.create_network("front", "10.71.0.0/24", true).await.unwrap();
    admin.create_service(service("web", &["front"], 2, &[])).await.unwrap();
    admin.rotate_network_key("front").await.unwrap();
    nodes[0].wait_for("epoch 2", |s| current_epoch(s, "front") == Some(2)).await;
    let keys = keys_seen(&nodes[0].slices(), "front");
    assert!(keys.len() >= 3);
    let mut files = Vec::new();
    collect(&cluster.state_dir(), &mut files);
    assert!(files.len() > 5);
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let text = String::from_utf8_lossy(&bytes).to_lowercase();
        for key in &keys {
            let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
            assert!(!bytes.windows(KEY_LEN).any(|w| w == key), "raw key in {}", path.display());
            assert!(!text.contains(&hex), "hex key in {}", path.display());
            assert!(!text.contains(&hex[..16]), "part of a key in {}", path.display());
        }
        assert!(
            !text.contains("front") || path.ends_with("config.json"),
            "state readable in {}",
            path.display()
        );
    }
}

fn collect(dir: &std::path::Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { collect(&path, out) } else { out.push(path) }
    }
}

#[tokio::test]
async fn meshd_status_shows_networks_epochs_endpoints_and_peers_but_never_key_bytes() {
    let cluster = TestCluster::start(HOUR).await;
    let (dir, id) = cluster.join(mesh_api::tokens::Role::Worker).await;
    let state_dir = mesh_tests::node_dir(&dir);
    let config = meshd::config::AgentConfig {
        session: meshd::session::SessionConfig {
            state_dir: state_dir.clone(),
            underlay: underlay(9),
            boot: 0,
            wireguard: None,
        },
        netns_prefix: "unused".into(),
        dataplane: false,
        dns_visibility: meshd::dns::Visibility::All,
        metrics: None,
        publish_address: std::net::Ipv4Addr::UNSPECIFIED,
        dns_upstream: meshd::dns::DnsUpstream::Policy,
        resolvers: vec![],
    };
    let agent = tokio::spawn(meshd::agent::run(config));
    let mut admin = cluster.admin().await;
    eventually("the agent's session", || cluster.manager.connected().contains(&id)).await;
    admin.create_network("front", "10.72.0.0/24", true).await.unwrap();
    admin.create_service(service("web", &["front"], 1, &[])).await.unwrap();
    admin.rotate_network_key("front").await.unwrap();

    let mut status = meshd::status::query(&state_dir).await.unwrap();
    for _ in 0..200 {
        if status.networks.first().is_some_and(|n| n.keys.contains(&"current:2".to_owned())) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        status = meshd::status::query(&state_dir).await.unwrap();
    }
    assert!(status.connected);
    assert_eq!(status.node, id.to_string());
    assert_eq!(status.endpoints.len(), 1);
    assert_eq!(status.endpoints[0].service, "web");
    let net = &status.networks[0];
    assert_eq!((net.name.as_str(), net.encrypted), ("front", true));
    assert_eq!(net.keys, vec!["next:3", "current:2", "previous:1"]);
    assert_eq!(net.peers.len(), 1);
    assert!(net.peers[0].contains("127.0.0.9:4800"));
    // No key bytes anywhere in what status exposes.
    let state_keys = cluster.manager.store().read(|s| s.networks["front"].keys.clone().unwrap());
    let json = serde_json::to_string(&status).unwrap() + &status.render();
    for (_, key) in state_keys.keys() {
        let hex: String = key.key.iter().map(|b| format!("{b:02x}")).collect();
        assert!(!json.contains(&hex[..12]));
    }
    agent.abort();
}
