//! The slicer: what one node may know of the cluster, computed from the state and nothing else
//! (no I/O; the session handler in [`crate::handlers::session`] sends it).
//!
//! A node's slice: its endpoints; for each network it has an endpoint on, the network, its keys,
//! its peers (overlay address -> node underlay address) and its service records. A network the
//! node has no endpoint on does not appear at all; its keys never leave control for that node.
//! A message is sent only when the slice changed, versioned by the state's revision, and carries
//! what changed since the session's previous message (see [`NodeSlice::to_wire`]); a session's
//! first message is whole, so after any reconnect the node converges to the current slice at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use mesh_api::ids::NodeId;
use mesh_api::keys::{KeyUse, NetworkKey, PairKey};
use mesh_api::pki::MAX_WORKLOAD_CERT_LIFETIME;
use mesh_api::slice::{
    IngressAdmission, IngressTarget, LocalEndpoint, NodePolicy, NodeSlice, Peer, PublishedPort, SecretFile,
    ServiceRecord, SliceNetwork,
};

use crate::planning::keys::PairKeys;
use crate::state::ClusterState;

/// The policy in force, parsed once per version.
#[derive(Default)]
pub struct PolicyCache(std::sync::Mutex<Option<(u64, Arc<policy::Policy>)>>);

impl PolicyCache {
    /// The parsed policy in force in `state`, if any.
    pub fn current(&self, state: &ClusterState) -> Option<(u64, Arc<policy::Policy>)> {
        let record = state.policy()?;
        let mut cached = self.0.lock().expect("lock");
        if let Some((v, p)) = cached.as_ref()
            && *v == record.version
        {
            return Some((*v, p.clone()));
        }
        // It parsed when it was applied; a failure here would be a bug, and sends no rules.
        let parsed = Arc::new(policy::Policy::parse(&record.file, &record.text).ok()?);
        *cached = Some((record.version, parsed.clone()));
        Some((record.version, parsed))
    }
}

/// A network's peers and service records: the same for every node on it, so computed once per
/// state revision and shared by every slice of that revision. A membership equal to the previous
/// revision's is that one (the same `Arc`s), so the sessions compare it by pointer, not by
/// content, on changes that leave it alone (a key rotation, say).
#[derive(Default)]
pub struct Memberships(std::sync::Mutex<Revisions>);

#[derive(Default)]
struct Revisions {
    revision: u64,
    current: HashMap<String, Membership>,
    previous: HashMap<String, Membership>,
}

type Membership = (Arc<[Peer]>, Arc<[ServiceRecord]>);

impl Memberships {
    /// Network `name`'s membership in `state`.
    pub fn of(&self, state: &ClusterState, name: &str) -> Membership {
        let mut cached = self.0.lock().expect("lock");
        let Revisions { revision, current, previous } = &mut *cached;
        if *revision != state.revision {
            *revision = state.revision;
            *previous = std::mem::take(current);
        }
        let found = current.entry(name.to_owned()).or_insert_with(|| {
            let fresh = membership(state, name);
            match previous.get(name) {
                Some(before) if *before == fresh => before.clone(),
                _ => fresh,
            }
        });
        found.clone()
    }
}

fn membership(state: &ClusterState, name: &str) -> Membership {
    // On a WireGuard network, each active node's public key there: a removed node's goes at once.
    let wireguard = state.networks.get(name).filter(|n| n.wireguard.is_some()).map(|n| n.id);
    let public = |node: &NodeId| {
        let network = wireguard?;
        state.active_node(node).ok()?;
        Some(state.nodes.get(node)?.wireguard.get(&network)?.public)
    };
    let mut peers: Vec<Peer> = state
        .endpoints()
        .filter_map(|(_, e)| {
            Some(Peer {
                wireguard: public(&e.node),
                address: *e.addresses.get(name)?,
                node: e.node.clone(),
                underlay: state.nodes.get(&e.node).and_then(|n| n.underlay),
                node_index: state.nodes.get(&e.node).map_or(0, |n| n.index),
                boot: state.nodes.get(&e.node).map_or(0, |n| n.boot),
            })
        })
        .collect();
    peers.sort_by_key(|p| p.address);
    let services = state
        .services
        .values()
        .filter_map(|s| {
            let mut endpoints: Vec<_> =
                s.endpoints.values().filter_map(|e| e.addresses.get(name).copied()).collect();
            endpoints.sort();
            Some(ServiceRecord {
                name: s.name.clone(),
                vip: *s.vips.get(name)?,
                ports: s.ports.clone(),
                endpoints,
            })
        })
        .collect();
    (peers.into(), services)
}

/// How long a removed node stays on the list of removed nodes sent to nodes: past it, every
/// workload certificate it was issued has expired (none outlives
/// [`MAX_WORKLOAD_CERT_LIFETIME`] and none is issued to a removed node), with a margin
/// for clocks.
pub const REMOVED_NODES_KEPT: std::time::Duration =
    MAX_WORKLOAD_CERT_LIFETIME.saturating_add(std::time::Duration::from_secs(600));

/// The slice this session sent last and the node's boot number then: pair keys that cannot have
/// changed since are taken from it rather than derived again.
pub type Earlier<'a> = Option<(&'a NodeSlice, u16)>;

/// The keys of `me`'s pairs with every other active node among `peers`, for each epoch of `ring`
/// from `since` on, in (peer, epoch) order (see [`crate::planning::keys`]). A key `earlier` holds
/// for the same network, epoch, peer boot and own boot is reused: a rotation derives one key per
/// peer, a restart one per epoch.
fn pair_keys(
    state: &ClusterState,
    network: &crate::state::Network,
    peers: &[Peer],
    me: (u32, u16),
    since: u32,
    earlier: Earlier<'_>,
) -> (Vec<(KeyUse, u32)>, Vec<PairKey>) {
    let Some(ring) = &network.keys else { return (Vec::new(), Vec::new()) };
    let epochs: Vec<(KeyUse, &NetworkKey)> = ring.keys().filter(|(_, k)| k.epoch >= since).collect();
    let derivers: Vec<PairKeys> = epochs.iter().map(|(_, k)| PairKeys::new(network.id, k)).collect();
    let before = earlier.and_then(|(slice, boot)| {
        let n = slice.networks.iter().find(|n| n.id == network.id && n.name == network.name)?;
        (boot == me.1).then_some(n)
    });
    let boots_before: HashMap<u32, u16> =
        before.map(|n| n.peers.iter().map(|p| (p.node_index, p.boot)).collect()).unwrap_or_default();
    let mut others: Vec<(u32, u16)> = peers
        .iter()
        .filter(|p| p.node_index != me.0 && state.active_node(&p.node).is_ok())
        .map(|p| (p.node_index, p.boot))
        .collect();
    others.sort_unstable();
    others.dedup();
    let mut keys = Vec::with_capacity(others.len() * derivers.len());
    for (peer, boot) in others {
        let same_peer = boots_before.get(&peer) == Some(&boot);
        for d in &derivers {
            let epoch = d.epoch();
            let key = same_peer
                .then(|| before.and_then(|n| n.pair_key(peer, epoch)).map(|k| k.key))
                .flatten()
                .unwrap_or_else(|| d.derive(me, (peer, boot)));
            keys.push(PairKey { peer, epoch, key });
        }
    }
    // `ring.keys()` is newest first; keys go in (peer, epoch) order.
    keys.sort_unstable_by_key(|k| (k.peer, k.epoch));
    (epochs.iter().map(|(u, k)| (*u, k.epoch)).collect(), keys)
}

/// The slice of `state` that `node` may know, at `now` (Unix seconds).
pub fn slice_for(
    state: &ClusterState,
    node: &NodeId,
    policies: &PolicyCache,
    memberships: &Memberships,
    now: i64,
) -> NodeSlice {
    slice_after(state, node, policies, memberships, now, None)
}

/// [`slice_for`], reusing what it can of the slice the session sent before.
pub fn slice_after(
    state: &ClusterState,
    node: &NodeId,
    policies: &PolicyCache,
    memberships: &Memberships,
    now: i64,
    earlier: Earlier<'_>,
) -> NodeSlice {
    let me = state.nodes.get(node).map_or((0, 0), |n| (n.index, n.boot));
    let mut endpoints = Vec::new();
    // Network -> the oldest epoch this node may hold keys of (see `Endpoint::since`).
    let mut networks: BTreeMap<&str, u32> = BTreeMap::new();
    for (service, e) in state.endpoints().filter(|(_, e)| &e.node == node) {
        for name in e.addresses.keys() {
            let since = e.since.get(name).copied().unwrap_or(0);
            let held = networks.entry(name.as_str()).or_insert(since);
            *held = (*held).min(since);
        }
        // The version this endpoint is at: during a rolling update, not yet the service's.
        let definition = service.definition(e.version);
        endpoints.push(LocalEndpoint {
            service: service.name.clone(),
            slot: e.slot,
            addresses: e.addresses.clone(),
            version: e.version,
            signed: definition.signed,
            secrets: secret_files(state, &definition.run.secrets),
            command: definition.command,
            run: definition.run,
        });
    }
    let networks = networks
        .into_iter()
        .filter_map(|(name, since)| Some((state.networks.get(name)?, since)))
        .map(|(network, since)| {
            let name = &network.name;
            let (peers, services) = memberships.of(state, name);
            let (ring, pair_keys) = pair_keys(state, network, &peers, me, since, earlier);
            SliceNetwork {
                name: name.clone(),
                id: network.id,
                subnet: network.subnet,
                encrypted: network.transport() != mesh_api::model::Transport::None,
                wireguard: network.wireguard.map(|g| g.generation),
                ring,
                pair_keys,
                peers,
                services,
            }
        })
        .collect();
    let hosted: std::collections::BTreeSet<String> = endpoints.iter().map(|e| e.service.clone()).collect();
    let policy = policies
        .current(state)
        .map(|(version, p)| NodePolicy { version, text: p.restricted_to(&hosted).to_toml() });
    let node_index = me.0;
    let all: Vec<&str> = state.services.keys().map(String::as_str).collect();
    let visibility = match policies.current(state) {
        Some((_, p)) => hosted.iter().map(|s| (s.clone(), reachable(&p, s, &all))).collect(),
        None => hosted.iter().map(|s| (s.clone(), Default::default())).collect(),
    };
    let (published, ingress) = publishing(state, node, &hosted);
    NodeSlice {
        published,
        ingress,
        trust_pem: state.trust_pem(),
        cross_pem: state.slice_cross_pem().to_owned(),
        version: state.revision,
        node: node.clone(),
        endpoints,
        networks,
        policy,
        node_index,
        visibility,
        removed_nodes: state
            .nodes
            .values()
            .filter(|n| n.state == crate::state::NodeState::Removed)
            .filter(|n| n.removed_at.is_none_or(|at| now < at + REMOVED_NODES_KEPT.as_secs() as i64))
            .map(|n| n.id.clone())
            .collect(),
        managers: state.managers().filter_map(|m| m.control.map(|c| c.to_string())).collect(),
        manager_ids: state.managers().map(|m| m.id.to_string()).collect(),
    }
}

/// The ports `node` publishes, each with the endpoints it leads to; and for the services it
/// hosts, which nodes may call their published ports as `ingress`.
fn publishing(
    state: &ClusterState,
    node: &NodeId,
    hosted: &std::collections::BTreeSet<String>,
) -> (Vec<PublishedPort>, Vec<IngressAdmission>) {
    let mut published = Vec::new();
    let mut ingress = Vec::new();
    for service in state.services.values().filter(|s| !s.publish.is_empty()) {
        for p in &service.publish {
            let nodes = crate::plans::publish::nodes(state, service, p);
            if nodes.contains(node) {
                let endpoints = service
                    .endpoints
                    .values()
                    .filter_map(|e| {
                        let mesh = state.active_node(&e.node).ok()?.underlay?;
                        let address = service.networks.iter().find_map(|n| e.addresses.get(n))?;
                        Some(IngressTarget { address: *address, node: e.node.clone(), mesh })
                    })
                    .collect();
                published.push(PublishedPort {
                    service: service.name.clone(),
                    port: p.published,
                    target: p.target,
                    protocol: p.protocol,
                    endpoints,
                });
            }
            if hosted.contains(&service.name) {
                ingress.push(IngressAdmission {
                    service: service.name.clone(),
                    target: p.target,
                    protocol: p.protocol,
                    nodes,
                });
            }
        }
    }
    (published, ingress)
}

/// The services `source` may reach under `policy`, coarsely: those some enforced allow rule
/// names for it (whatever its ports, methods or paths), less those an unconditional enforced deny
/// shuts off entirely; with a default of allow, every service but the shut-off ones.
pub fn reachable(
    policy: &policy::Policy,
    source: &str,
    services: &[&str],
) -> std::collections::BTreeSet<String> {
    let from_matches = |r: &policy::Rule| r.from.as_ref().is_none_or(|f| f.contains(source));
    let unconditional = |r: &policy::Rule| {
        r.ports.is_empty() && r.methods.is_empty() && r.paths.is_empty() && r.headers.is_empty()
    };
    let enforced = || policy.rules.iter().filter(|r| !r.dry_run && from_matches(r));
    let shut: std::collections::BTreeSet<&str> = enforced()
        .filter(|r| r.action == policy::Action::Deny && unconditional(r))
        .flat_map(|r| r.to.iter().map(String::as_str))
        .collect();
    let allowed: std::collections::BTreeSet<&str> = if policy.default == policy::Action::Allow {
        services.iter().copied().collect()
    } else {
        enforced()
            .filter(|r| r.action == policy::Action::Allow)
            .flat_map(|r| r.to.iter().map(String::as_str))
            .collect()
    };
    allowed.into_iter().filter(|s| !shut.contains(s) && services.contains(s)).map(str::to_owned).collect()
}

/// The secrets named, decoded, for an endpoint of this node (the only slices they are sent in).
fn secret_files(state: &ClusterState, names: &[String]) -> Vec<SecretFile> {
    use base64::Engine;
    names
        .iter()
        .filter_map(|name| {
            let record = state.secrets.get(name)?;
            let data = base64::engine::general_purpose::STANDARD.decode(&record.data.0).ok()?;
            Some(SecretFile { name: name.clone(), data })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::state::{Command, NodeRecord, NodeState};
    use mesh_api::ids::ClusterId;
    use mesh_api::tokens::Role;

    fn node(hostname: &str) -> NodeRecord {
        NodeRecord {
            id: NodeId::random(),
            hostname: hostname.into(),
            role: Role::Worker,
            state: NodeState::Active,
            joined_at: 0,
            cert_not_after: 0,
            labels: Default::default(),
            underlay: None,
            index: 0,
            control: None,
            removed_at: None,
            boot: 0,
            demoted: false,
            cert_root: String::new(),
            wireguard: Default::default(),
        }
    }

    /// Who publishes what, who may call as `ingress`, and what a published port may be.
    #[test]
    fn published_ports_go_to_the_nodes_their_mode_picks_and_only_those_are_admitted_as_ingress() {
        use crate::plans::{self, Liveness, PlanError, ServiceSpec, ServiceUpdate};
        use mesh_api::model::{PortSpec, Protocol};
        let mut state = ClusterState::new(ClusterId::random(), Duration::from_secs(86_400));
        let [mut a, mut b, mut c, mut idle] = ["a", "b", "c", "idle"].map(node);
        for (i, n) in [&mut a, &mut b, &mut c, &mut idle].into_iter().enumerate() {
            n.index = i as u32 + 1;
            // `idle` runs no data plane: it never reported an underlay address.
            if n.hostname != "idle" {
                n.underlay = Some(std::net::SocketAddr::from(([192, 0, 2, i as u8 + 1], 4800)));
            }
            state.apply(Command::AddNode(n.clone())).unwrap();
        }
        let apply = |state: &mut ClusterState, commands: Vec<Command>| {
            for c in commands {
                state.apply(c).unwrap();
            }
        };
        let plan =
            plans::create_network(&state, "front", "10.9.0.0/24", mesh_api::model::Transport::AesGcm, 1)
                .unwrap();
        apply(&mut state, plan);
        // web runs on a only.
        let live = Liveness { connected: [a.id.clone()].into(), not_down: [a.id.clone()].into() };
        let spec = |name: &str, publish: &[&str]| ServiceSpec {
            name: name.into(),
            networks: vec!["front".into()],
            ports: vec![PortSpec { port: 80, protocol: Protocol::Http }],
            replicas: 1,
            constraints: vec![],
            command: None,
            run: Default::default(),
            signed: None,
            publish: publish.iter().map(|p| p.to_string()).collect(),
        };
        let plan = plans::create_service(&state, spec("web", &["8080:80"]), &live).unwrap();
        apply(&mut state, plan);
        let plan = plans::create_service(&state, spec("api", &[]), &live).unwrap();
        apply(&mut state, plan);
        let slice = |state: &ClusterState, n: &NodeRecord| {
            slice_for(state, &n.id, &PolicyCache::default(), &Memberships::default(), 0)
        };
        // No node labelled: every node with a data plane publishes 8080, leading to web's endpoint.
        let web_endpoint = *state.services["web"].endpoints[&1].addresses.get("front").unwrap();
        for n in [&a, &b, &c] {
            let s = slice(&state, n);
            assert_eq!(s.published.len(), 1, "{}", n.hostname);
            let p = &s.published[0];
            assert_eq!((p.service.as_str(), p.port, p.target, p.protocol), ("web", 8080, 80, Protocol::Http));
            assert_eq!(p.endpoints.len(), 1);
            assert_eq!((p.endpoints[0].address, &p.endpoints[0].node), (web_endpoint, &a.id));
            assert_eq!(p.endpoints[0].mesh, a.underlay.unwrap());
        }
        assert!(slice(&state, &idle).published.is_empty());
        // Only the node hosting web is told who may call it as ingress: the three publishers.
        let admitted = |state: &ClusterState| slice(state, &a).ingress;
        assert_eq!(admitted(&state).len(), 1);
        assert_eq!(admitted(&state)[0].nodes, [a.id.clone(), b.id.clone(), c.id.clone()].into());
        assert!(slice(&state, &b).ingress.is_empty());
        // Once b is labelled ingress=true, only b publishes, and only b is admitted.
        let labels = [("ingress".to_owned(), "true".to_owned())].into();
        state.apply(Command::SetNodeLabels { id: b.id.clone(), labels }).unwrap();
        assert!(slice(&state, &a).published.is_empty());
        assert!(slice(&state, &c).published.is_empty());
        assert_eq!(slice(&state, &b).published.len(), 1);
        assert_eq!(admitted(&state)[0].nodes, [b.id.clone()].into());
        // A removed node is admitted no more.
        state.apply(Command::RemoveNode { id: b.id.clone(), at: Some(1) }).unwrap();
        assert_eq!(admitted(&state)[0].nodes, [a.id.clone(), c.id.clone()].into());
        // Host mode: only the node running an endpoint.
        let report = |_: &NodeId, _: &str, _: u32| None;
        let update = |add: &[&str], rm: &[u16]| ServiceUpdate {
            publish_add: add.iter().map(|p| p.to_string()).collect(),
            publish_rm: rm.to_vec(),
            ..Default::default()
        };
        let plan =
            plans::update_service(&state, "web", &update(&["host:9090:80"], &[8080]), &live, &report, 0);
        apply(&mut state, plan.unwrap());
        assert_eq!(state.services["web"].publish.len(), 1);
        assert_eq!(slice(&state, &a).published[0].port, 9090);
        assert!(slice(&state, &c).published.is_empty());
        assert_eq!(admitted(&state)[0].nodes, [a.id.clone()].into());
        // A port published by another service, twice, to no port of the service, or the reserved
        // name: each refused with the reason.
        let refused = |r: Result<Vec<Command>, PlanError>| r.unwrap_err().to_string();
        let taken =
            refused(plans::update_service(&state, "api", &update(&["9090:80"], &[]), &live, &report, 0));
        assert!(taken.contains("port 9090 is published by service `web` already"), "{taken}");
        let taken = refused(plans::create_service(&state, spec("shop", &["9090:80"]), &live));
        assert!(taken.contains("port 9090 is published by service `web` already"), "{taken}");
        let twice =
            refused(plans::update_service(&state, "web", &update(&["9090:80"], &[]), &live, &report, 0));
        assert!(twice.contains("published port 9090 is listed twice"), "{twice}");
        let none = refused(plans::update_service(&state, "web", &update(&[], &[7]), &live, &report, 0));
        assert!(none.contains("publishes no port 7"), "{none}");
        let target_gone = ServiceUpdate {
            port_rm: vec![PortSpec { port: 80, protocol: Protocol::Http }],
            ..Default::default()
        };
        let target_gone = refused(plans::update_service(&state, "web", &target_gone, &live, &report, 0));
        assert!(target_gone.contains("remove it with --publish-rm 9090 first"), "{target_gone}");
        let reserved = refused(plans::create_service(&state, spec("ingress", &[]), &live));
        assert!(reserved.contains("`ingress` is reserved"), "{reserved}");
    }

    #[test]
    fn a_membership_left_alone_by_a_change_is_the_same_shared_one() {
        use crate::plans::{self, Liveness, ServiceSpec};
        let mut state = ClusterState::new(ClusterId::random(), Duration::from_secs(86_400));
        let a = node("a");
        state.apply(Command::AddNode(a.clone())).unwrap();
        let live = Liveness { connected: [a.id.clone()].into(), not_down: [a.id.clone()].into() };
        let apply = |state: &mut ClusterState, commands: Vec<Command>| {
            for c in commands {
                state.apply(c).unwrap();
            }
        };
        let plan =
            plans::create_network(&state, "front", "10.9.0.0/24", mesh_api::model::Transport::AesGcm, 1)
                .unwrap();
        apply(&mut state, plan);
        let spec = |name: &str| ServiceSpec {
            name: name.into(),
            networks: vec!["front".into()],
            ports: vec![],
            replicas: 1,
            constraints: vec![],
            command: None,
            run: Default::default(),
            signed: None,
            publish: vec![],
        };
        let plan = plans::create_service(&state, spec("web"), &live).unwrap();
        apply(&mut state, plan);
        let memberships = Memberships::default();
        let (peers, services) = memberships.of(&state, "front");
        assert_eq!((peers.len(), services.len()), (1, 1));
        // A rotation: a new revision, the same membership, the very same lists.
        let plan = plans::rotate_key(&state, "front", 2).unwrap();
        apply(&mut state, plan);
        let (after, services_after) = memberships.of(&state, "front");
        assert!(Arc::ptr_eq(&peers, &after) && Arc::ptr_eq(&services, &services_after));
        // A new service on the network: new lists.
        let plan = plans::create_service(&state, spec("api"), &live).unwrap();
        apply(&mut state, plan);
        let (_, services_now) = memberships.of(&state, "front");
        assert_eq!(services_now.len(), 2);
        assert!(!Arc::ptr_eq(&services, &services_now));
    }

    /// A WireGuard network's keys, as a node reports them and as the others are sent them.
    #[test]
    fn wireguard_public_keys_are_checked_then_sent_only_to_the_networks_peers() {
        use crate::handlers::session::wireguard_commands;
        use crate::plans::{self, Liveness, ServiceSpec};
        use mesh_api::model::Transport;
        use mesh_api::proto::pb;
        let mut state = ClusterState::new(ClusterId::random(), Duration::from_secs(86_400));
        let [a, b, outsider] = ["a", "b", "outsider"].map(node);
        for (i, n) in [&a, &b, &outsider].into_iter().enumerate() {
            let mut n = n.clone();
            n.index = i as u32 + 1;
            state.apply(Command::AddNode(n)).unwrap();
        }
        let apply = |state: &mut ClusterState, commands: Vec<Command>| {
            for c in commands {
                state.apply(c).unwrap();
            }
        };
        for (name, subnet, transport) in
            [("wg", "10.9.0.0/24", Transport::WireGuard), ("aes", "10.10.0.0/24", Transport::AesGcm)]
        {
            let plan = plans::create_network(&state, name, subnet, transport, 1).unwrap();
            apply(&mut state, plan);
        }
        let (wg, aes) = (state.networks["wg"].id, state.networks["aes"].id);
        assert!(state.networks["wg"].keys.is_none(), "the managers hold no key of a WireGuard network");
        // Two replicas of web on `wg`, one on `aes`, on a and b; none on the outsider.
        let live = Liveness {
            connected: [a.id.clone(), b.id.clone()].into(),
            not_down: [a.id.clone(), b.id.clone()].into(),
        };
        let spec = |name: &str, network: &str| ServiceSpec {
            name: name.into(),
            networks: vec![network.into()],
            ports: vec![],
            replicas: 2,
            constraints: vec![],
            command: None,
            run: Default::default(),
            signed: None,
            publish: vec![],
        };
        let plan = plans::create_service(&state, spec("web", "wg"), &live).unwrap();
        apply(&mut state, plan);
        let plan = plans::create_service(&state, spec("api", "aes"), &live).unwrap();
        apply(&mut state, plan);
        let key =
            |network, generation, byte: u8| pb::WireguardKey { network, generation, public: vec![byte; 32] };
        let refused = |state: &ClusterState, node: &NodeRecord, k: pb::WireguardKey| {
            wireguard_commands(state, &node.id, vec![k], 100).unwrap_err().message().to_owned()
        };
        // The moves of a node lying about itself, or reaching past its networks:
        assert!(
            refused(&state, &outsider, key(wg, 1, 9))
                .contains("no WireGuard network this node has an endpoint on")
        );
        assert!(refused(&state, &a, key(aes, 1, 9)).contains("no WireGuard network"), "an AES-GCM network");
        assert!(refused(&state, &a, key(0x0777, 1, 9)).contains("no WireGuard network"), "no such network");
        assert!(
            refused(&state, &a, key(wg, 2, 9)).contains("at key generation 1, not 2"),
            "a generation ahead"
        );
        assert!(
            refused(&state, &a, key(wg, 0, 9)).contains("at key generation 1, not 0"),
            "a stale generation"
        );
        assert!(refused(&state, &a, key(wg, 1, 0)).contains("small-order"));
        let twice = vec![key(wg, 1, 0x11), key(wg, 1, 0x12)];
        let e = wireguard_commands(&state, &a.id, twice, 100).unwrap_err();
        assert!(e.message().contains("two keys for network `wg` in one report"), "{}", e.message());
        let short = pb::WireguardKey { network: wg, generation: 1, public: vec![9; 31] };
        assert!(refused(&state, &a, short).contains("32 bytes"));
        let many = (0..300).map(|_| key(wg, 1, 9)).collect();
        assert!(wireguard_commands(&state, &a.id, many, 100).is_err(), "a flood of keys in one report");
        // a reports its key; b may not claim the same one.
        let plan = wireguard_commands(&state, &a.id, vec![key(wg, 1, 0xaa)], 100).unwrap();
        assert_eq!(plan.len(), 1);
        apply(&mut state, plan);
        assert!(
            wireguard_commands(&state, &a.id, vec![key(wg, 1, 0xaa)], 100).unwrap().is_empty(),
            "idempotent"
        );
        assert!(refused(&state, &b, key(wg, 1, 0xaa)).contains("another node reported this public key"));
        // A new key at the same generation (a state directory made again): not within a minute
        // of the last, so no worker churns its peers' slices; after it, taken.
        let e = wireguard_commands(&state, &a.id, vec![key(wg, 1, 0xac)], 130).unwrap_err();
        assert!(e.message().contains("at most one a minute"), "{}", e.message());
        assert_eq!(wireguard_commands(&state, &a.id, vec![key(wg, 1, 0xac)], 161).unwrap().len(), 1);
        let plan = wireguard_commands(&state, &b.id, vec![key(wg, 1, 0xbb)], 100).unwrap();
        apply(&mut state, plan);
        // What each is sent: the peers' public keys on `wg`, nothing on `aes`; the outsider nothing.
        let slice = |state: &ClusterState, n: &NodeRecord| {
            slice_for(state, &n.id, &PolicyCache::default(), &Memberships::default(), 2)
        };
        let at_a = slice(&state, &a);
        let net = at_a.networks.iter().find(|n| n.id == wg).unwrap();
        assert_eq!(net.wireguard, Some(1));
        assert!(net.pair_keys.is_empty() && net.ring.is_empty());
        let of = |n: &NodeRecord| {
            let index = state.nodes[&n.id].index;
            net.peers.iter().filter(|p| p.node_index == index).map(|p| p.wireguard).collect::<Vec<_>>()
        };
        assert!(of(&b).iter().all(|k| *k == Some([0xbb; 32])) && !of(&b).is_empty());
        assert!(of(&a).iter().all(|k| *k == Some([0xaa; 32])));
        let on_aes = at_a.networks.iter().find(|n| n.id == aes).unwrap();
        assert!(on_aes.peers.iter().all(|p| p.wireguard.is_none()) && on_aes.wireguard.is_none());
        assert!(slice(&state, &outsider).networks.is_empty());
        // A rotation asks for new keys: the reported ones are still sent until replaced.
        let plan = plans::rotate_key(&state, "wg", 3).unwrap();
        apply(&mut state, plan);
        assert!(refused(&state, &a, key(wg, 1, 0xab)).contains("at key generation 2, not 1"));
        let at_b = slice(&state, &b);
        assert_eq!(at_b.networks.iter().find(|n| n.id == wg).unwrap().wireguard, Some(2));
        // b is removed: its key leaves every slice at once.
        state.apply(Command::RemoveNode { id: b.id.clone(), at: Some(3) }).unwrap();
        let at_a = slice(&state, &a);
        let net = at_a.networks.iter().find(|n| n.id == wg).unwrap();
        let b_index = state.nodes[&b.id].index;
        assert!(net.peers.iter().filter(|p| p.node_index == b_index).all(|p| p.wireguard.is_none()));
    }

    #[test]
    fn removed_nodes_leave_the_list_once_their_workload_certificates_have_expired() {
        let now = 1_900_000_000;
        let kept = REMOVED_NODES_KEPT.as_secs() as i64;
        let mut state = ClusterState::new(ClusterId::random(), Duration::from_secs(86_400));
        let [me, old, recent, legacy] = ["me", "old", "recent", "legacy"].map(node);
        for n in [&me, &old, &recent, &legacy] {
            state.apply(Command::AddNode(n.clone())).unwrap();
        }
        for (n, at) in [(&old, Some(now - kept)), (&recent, Some(now - kept + 60)), (&legacy, None)] {
            state.apply(Command::RemoveNode { id: n.id.clone(), at }).unwrap();
        }
        let slice = slice_for(&state, &me.id, &PolicyCache::default(), &Memberships::default(), now);
        let mut want = vec![recent.id.clone(), legacy.id.clone()];
        want.sort();
        let mut got = slice.removed_nodes.clone();
        got.sort();
        assert_eq!(got, want, "kept: removed within {kept} s, or at an unknown time");
        assert!(REMOVED_NODES_KEPT > MAX_WORKLOAD_CERT_LIFETIME);
    }
}
