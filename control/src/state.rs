//! The cluster state: one deterministic state machine changed only by [`Command`]s.
//!
//! Everything random or chosen (IDs, keys, placement, addresses) is decided before a command is
//! made, so applying the same commands in the same order always gives the same state; that is
//! what lets the store replicate the commands. `apply` re-checks every invariant and refuses a
//! command that would break one, leaving the state unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use ipnet::Ipv4Net;
use serde::{Deserialize, Serialize};

use crate::ids::{ClusterId, NodeId};
use crate::ipam;
use crate::keys::KeyRing;
use crate::placement::Constraint;
use crate::tokens::{Role, SecretHash};

/// Whether a node may still act in the cluster. A removed node stays in the state so that its ID
/// is refused on every call (the denylist) and never issued again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Active,
    Removed,
}

/// A node as the cluster knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub id: NodeId,
    pub hostname: String,
    pub role: Role,
    pub state: NodeState,
    /// Unix seconds.
    pub joined_at: i64,
    /// Unix seconds: expiry of the last certificate issued to the node.
    pub cert_not_after: i64,
    /// Set by admins only; used by placement constraints.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Where the node receives overlay traffic, as it reported in its session.
    #[serde(default)]
    pub underlay: Option<SocketAddr>,
    /// The node's index in overlay headers: unique in the cluster, never reused, assigned when
    /// the node is added (whatever the command carried).
    #[serde(default)]
    pub index: u32,
    /// For a manager: the address of its control API, which is also where its raft peers reach it.
    #[serde(default)]
    pub control: Option<SocketAddr>,
    /// Unix seconds: when the node was removed (for nodes removed before this was kept: none).
    #[serde(default)]
    pub removed_at: Option<i64>,
}

impl NodeRecord {
    /// The node's ID in the store's raft group (managers only): its node index.
    pub fn raft_id(&self) -> u64 {
        u64::from(self.index)
    }
}

/// A secret held in the replicated state (sealed at rest like the rest of it); never printed.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The cluster's root CA, replicated so that any manager can issue certificates after another is
/// lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRecord {
    pub cert_pem: String,
    pub key_pem: Secret,
}

/// An overlay network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    /// Unique in the cluster, 24 bits, never 0.
    pub id: u32,
    pub subnet: Ipv4Net,
    /// The key ring; `None` for an unencrypted network.
    pub keys: Option<KeyRing>,
}

/// Protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP: the mesh applies the L4 part of the policy when a connection opens.
    Tcp,
    Udp,
    /// TCP carrying HTTP/1.1 or HTTP/2 (gRPC included): the mesh decides on every request.
    Http,
}

impl Protocol {
    /// The transport under it: HTTP runs on TCP.
    pub fn transport(self) -> Protocol {
        match self {
            Protocol::Udp => Protocol::Udp,
            Protocol::Tcp | Protocol::Http => Protocol::Tcp,
        }
    }
}

/// A port a service listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: Protocol,
}

/// One running instance of a service, on one node, with an address on each of its networks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub slot: u32,
    pub node: NodeId,
    /// Network name -> address.
    pub addresses: BTreeMap<String, Ipv4Addr>,
}

/// A service: what it runs, where, and its addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub networks: Vec<String>,
    pub ports: Vec<PortSpec>,
    pub replicas: u32,
    pub constraints: Vec<Constraint>,
    pub command: Option<String>,
    /// Network name -> virtual IP.
    pub vips: BTreeMap<String, Ipv4Addr>,
    /// Slot -> endpoint.
    pub endpoints: BTreeMap<u32, Endpoint>,
}

/// One applied version of the ACL policy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRecord {
    pub version: u64,
    /// The file name it was applied from, for error messages.
    pub file: String,
    pub text: String,
    /// Unix seconds.
    pub applied_at: i64,
    /// `apply`, or `rollback to N`.
    pub source: String,
}

/// The whole replicated cluster state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterState {
    pub cluster_id: ClusterId,
    /// Lifetime of node certificates, in seconds.
    pub cert_lifetime_secs: u64,
    /// Hash of each role's current join token secret: what joins are checked against.
    pub tokens: BTreeMap<Role, SecretHash>,
    /// Each role's current join token, to show admins from any manager.
    #[serde(default)]
    pub join_tokens: BTreeMap<Role, Secret>,
    /// The root CA, key included.
    #[serde(default)]
    pub ca: Option<CaRecord>,
    /// With autolock on, the unlock key (`MESHKEY-1-...`) that wraps every manager's data key.
    #[serde(default)]
    pub unlock_key: Option<Secret>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
    #[serde(default)]
    pub networks: BTreeMap<String, Network>,
    #[serde(default)]
    pub services: BTreeMap<String, Service>,
    /// Every policy version applied, oldest first; the last is in force.
    #[serde(default)]
    pub policies: Vec<PolicyRecord>,
    /// The index the next added node gets (indexes start at 1).
    #[serde(default)]
    pub next_node_index: u32,
    /// Bumped by every applied command: the version of node slices.
    #[serde(default)]
    pub revision: u64,
}

/// A change to the cluster state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    SetToken {
        role: Role,
        hash: SecretHash,
        token: Secret,
    },
    SetCa(CaRecord),
    /// Where a manager's control API (and raft) is reached.
    SetManagerAddress {
        id: NodeId,
        control: SocketAddr,
    },
    /// Turns autolock on with this unlock key, or off.
    SetUnlockKey(Option<Secret>),
    AddNode(NodeRecord),
    RecordCertificate {
        id: NodeId,
        not_after: i64,
    },
    RemoveNode {
        id: NodeId,
        /// Unix seconds, when the removal was planned.
        #[serde(default)]
        at: Option<i64>,
    },
    SetNodeLabels {
        id: NodeId,
        labels: BTreeMap<String, String>,
    },
    SetNodeUnderlay {
        id: NodeId,
        underlay: SocketAddr,
    },
    CreateNetwork(Network),
    RemoveNetwork {
        name: String,
    },
    SetKeyRing {
        network: String,
        ring: KeyRing,
    },
    /// Creates or replaces a service (its endpoints included).
    PutService(Service),
    RemoveService {
        name: String,
    },
    /// Several commands applied in order, all or nothing: one plan.
    Batch(Vec<Command>),
    /// A new policy version, in force from now on.
    SetPolicy(PolicyRecord),
}

impl Command {
    /// Makes `token` the current join token for `role`.
    pub fn set_token(role: Role, token: &crate::tokens::JoinToken) -> Command {
        Command::SetToken { role, hash: token.secret_hash(), token: Secret(token.to_string()) }
    }
}

/// Why a command was refused. The state is unchanged.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateError {
    #[error("no node with ID {0}")]
    UnknownNode(NodeId),
    #[error("node {0} has been removed from the cluster")]
    NodeRemoved(NodeId),
    #[error("a node with ID {0} already exists")]
    NodeExists(NodeId),
    #[error("no network named `{0}`")]
    UnknownNetwork(String),
    #[error("a network named `{0}` already exists")]
    NetworkExists(String),
    #[error("network ID {0} is already in use")]
    NetworkIdInUse(u32),
    #[error("network ID {0} is not a nonzero 24-bit number")]
    NetworkIdRange(u32),
    #[error("subnet {subnet} overlaps network `{other}` ({other_subnet})")]
    Overlap { subnet: Ipv4Net, other: String, other_subnet: Ipv4Net },
    #[error("network `{network}` has endpoints or services attached ({services}); remove them first")]
    NetworkInUse { network: String, services: String },
    #[error("network `{0}` is unencrypted and has no keys")]
    Unencrypted(String),
    #[error("no service named `{0}`")]
    UnknownService(String),
    #[error("address {address} is outside network `{network}` ({subnet}) or reserved")]
    AddressOutside { address: Ipv4Addr, network: String, subnet: Ipv4Net },
    #[error("address {address} on network `{network}` is already held by {holder}")]
    AddressInUse { address: Ipv4Addr, network: String, holder: String },
    #[error("service `{service}` is not on network `{network}`, or has no address on it")]
    AddressMismatch { service: String, network: String },
    #[error("endpoint {service}.{slot} is placed on node {node}, which is not an active node")]
    EndpointNode { service: String, slot: u32, node: NodeId },
    #[error("policy version {got} is out of order: the next version is {expected}")]
    PolicyVersion { expected: u64, got: u64 },
    #[error("node {0} is not a manager")]
    NotAManager(NodeId),
    #[error("service `{service}` has two endpoints on node {node}")]
    TwoEndpointsOnNode { service: String, node: NodeId },
}

impl ClusterState {
    pub fn new(cluster_id: ClusterId, cert_lifetime: Duration) -> ClusterState {
        ClusterState {
            cluster_id,
            cert_lifetime_secs: cert_lifetime.as_secs(),
            tokens: BTreeMap::new(),
            join_tokens: BTreeMap::new(),
            ca: None,
            unlock_key: None,
            nodes: BTreeMap::new(),
            networks: BTreeMap::new(),
            services: BTreeMap::new(),
            policies: Vec::new(),
            next_node_index: 1,
            revision: 0,
        }
    }

    pub fn cert_lifetime(&self) -> Duration {
        Duration::from_secs(self.cert_lifetime_secs)
    }

    /// The role whose current token has this secret hash, if any (compared in constant time, and
    /// against every role, so the time taken does not depend on which matched).
    pub fn role_for_token(&self, hash: &SecretHash) -> Option<Role> {
        let mut found = None;
        for (role, stored) in &self.tokens {
            if stored.matches(hash) {
                found = Some(*role);
            }
        }
        found
    }

    /// The node, if it exists and has not been removed.
    pub fn active_node(&self, id: &NodeId) -> Result<&NodeRecord, StateError> {
        match self.nodes.get(id) {
            None => Err(StateError::UnknownNode(id.clone())),
            Some(n) if n.state == NodeState::Removed => Err(StateError::NodeRemoved(id.clone())),
            Some(n) => Ok(n),
        }
    }

    /// Every endpoint of every service, with its service's name.
    pub fn endpoints(&self) -> impl Iterator<Item = (&Service, &Endpoint)> {
        self.services.values().flat_map(|s| s.endpoints.values().map(move |e| (s, e)))
    }

    /// The nodes with at least one endpoint on `network`.
    pub fn nodes_on_network(&self, network: &str) -> BTreeSet<NodeId> {
        self.endpoints()
            .filter(|(_, e)| e.addresses.contains_key(network))
            .map(|(_, e)| e.node.clone())
            .collect()
    }

    /// Every address held on `network` (virtual IPs and endpoint addresses) and who holds it.
    pub fn addresses_on(&self, network: &str) -> BTreeMap<Ipv4Addr, String> {
        let mut held = BTreeMap::new();
        for service in self.services.values() {
            if let Some(vip) = service.vips.get(network) {
                held.insert(*vip, format!("the virtual IP of `{}`", service.name));
            }
            for e in service.endpoints.values() {
                if let Some(a) = e.addresses.get(network) {
                    held.insert(*a, format!("endpoint {}.{}", service.name, e.slot));
                }
            }
        }
        held
    }

    /// The active managers, by node ID.
    pub fn managers(&self) -> impl Iterator<Item = &NodeRecord> {
        self.nodes.values().filter(|n| n.role == Role::Manager && n.state == NodeState::Active)
    }

    /// The policy in force, if one was applied.
    pub fn policy(&self) -> Option<&PolicyRecord> {
        self.policies.last()
    }

    /// Applies `command`, or refuses it and changes nothing.
    pub fn apply(&mut self, command: Command) -> Result<(), StateError> {
        let mut next = self.clone();
        next.apply_in_place(command)?;
        next.revision += 1;
        *self = next;
        Ok(())
    }

    fn node_mut(&mut self, id: &NodeId) -> Result<&mut NodeRecord, StateError> {
        let node = self.nodes.get_mut(id).ok_or_else(|| StateError::UnknownNode(id.clone()))?;
        if node.state == NodeState::Removed {
            return Err(StateError::NodeRemoved(id.clone()));
        }
        Ok(node)
    }

    fn apply_in_place(&mut self, command: Command) -> Result<(), StateError> {
        match command {
            Command::SetToken { role, hash, token } => {
                self.tokens.insert(role, hash);
                self.join_tokens.insert(role, token);
            }
            Command::SetCa(ca) => self.ca = Some(ca),
            Command::SetManagerAddress { id, control } => {
                let node = self.node_mut(&id)?;
                if node.role != Role::Manager {
                    return Err(StateError::NotAManager(id));
                }
                node.control = Some(control);
            }
            Command::SetUnlockKey(key) => self.unlock_key = key,
            Command::AddNode(mut record) => {
                if self.nodes.contains_key(&record.id) {
                    return Err(StateError::NodeExists(record.id));
                }
                record.index = self.next_node_index.max(1);
                self.next_node_index = record.index + 1;
                self.nodes.insert(record.id.clone(), record);
            }
            Command::RecordCertificate { id, not_after } => self.node_mut(&id)?.cert_not_after = not_after,
            Command::RemoveNode { id, at } => {
                let node = self.node_mut(&id)?;
                node.state = NodeState::Removed;
                node.removed_at = at;
            }
            Command::SetNodeLabels { id, labels } => self.node_mut(&id)?.labels = labels,
            Command::SetNodeUnderlay { id, underlay } => self.node_mut(&id)?.underlay = Some(underlay),
            Command::CreateNetwork(network) => {
                if self.networks.contains_key(&network.name) {
                    return Err(StateError::NetworkExists(network.name));
                }
                if network.id == 0 || network.id >= 1 << 24 {
                    return Err(StateError::NetworkIdRange(network.id));
                }
                for other in self.networks.values() {
                    if other.id == network.id {
                        return Err(StateError::NetworkIdInUse(network.id));
                    }
                    if ipam::overlaps(&other.subnet, &network.subnet) {
                        return Err(StateError::Overlap {
                            subnet: network.subnet,
                            other: other.name.clone(),
                            other_subnet: other.subnet,
                        });
                    }
                }
                self.networks.insert(network.name.clone(), network);
            }
            Command::RemoveNetwork { name } => {
                if !self.networks.contains_key(&name) {
                    return Err(StateError::UnknownNetwork(name));
                }
                let users: Vec<&str> = self
                    .services
                    .values()
                    .filter(|s| s.networks.contains(&name))
                    .map(|s| s.name.as_str())
                    .collect();
                if !users.is_empty() {
                    return Err(StateError::NetworkInUse { network: name, services: users.join(", ") });
                }
                self.networks.remove(&name);
            }
            Command::SetKeyRing { network, ring } => {
                let net =
                    self.networks.get_mut(&network).ok_or(StateError::UnknownNetwork(network.clone()))?;
                if net.keys.is_none() {
                    return Err(StateError::Unencrypted(network));
                }
                net.keys = Some(ring);
            }
            Command::PutService(service) => {
                let name = service.name.clone();
                let old = self.services.insert(name.clone(), service);
                if let Err(e) = self.check_service(&name) {
                    match old {
                        Some(old) => self.services.insert(name, old),
                        None => self.services.remove(&name),
                    };
                    return Err(e);
                }
            }
            Command::RemoveService { name } => {
                self.services.remove(&name).ok_or(StateError::UnknownService(name))?;
            }
            Command::SetPolicy(record) => {
                let next = self.policies.last().map_or(1, |p| p.version + 1);
                if record.version != next {
                    return Err(StateError::PolicyVersion { expected: next, got: record.version });
                }
                self.policies.push(record);
            }
            Command::Batch(commands) => {
                for command in commands {
                    self.apply_in_place(command)?;
                }
            }
        }
        Ok(())
    }

    /// The invariants of one service against the rest of the state.
    fn check_service(&self, name: &str) -> Result<(), StateError> {
        let service = &self.services[name];
        let mut nodes = BTreeSet::new();
        for network in &service.networks {
            let net =
                self.networks.get(network).ok_or_else(|| StateError::UnknownNetwork(network.clone()))?;
            let mut mine: Vec<Ipv4Addr> = service.vips.get(network).copied().into_iter().collect();
            if mine.is_empty() {
                return Err(StateError::AddressMismatch {
                    service: name.to_owned(),
                    network: network.clone(),
                });
            }
            for e in service.endpoints.values() {
                let a = e.addresses.get(network).ok_or_else(|| StateError::AddressMismatch {
                    service: name.to_owned(),
                    network: network.clone(),
                })?;
                mine.push(*a);
            }
            let assignable: BTreeSet<Ipv4Addr> = ipam::assignable(&net.subnet).collect();
            let mut seen = BTreeSet::new();
            for address in &mine {
                if !assignable.contains(address) {
                    return Err(StateError::AddressOutside {
                        address: *address,
                        network: network.clone(),
                        subnet: net.subnet,
                    });
                }
                if !seen.insert(*address) {
                    return Err(StateError::AddressInUse {
                        address: *address,
                        network: network.clone(),
                        holder: name.to_owned(),
                    });
                }
            }
            for other in self.services.values().filter(|s| s.name != name) {
                let theirs = other
                    .vips
                    .get(network)
                    .into_iter()
                    .chain(other.endpoints.values().filter_map(|e| e.addresses.get(network)));
                for address in theirs {
                    if seen.contains(address) {
                        return Err(StateError::AddressInUse {
                            address: *address,
                            network: network.clone(),
                            holder: format!("service `{}`", other.name),
                        });
                    }
                }
            }
        }
        for e in service.endpoints.values() {
            if e.addresses.keys().any(|n| !service.networks.contains(n)) {
                return Err(StateError::AddressMismatch {
                    service: name.to_owned(),
                    network: e.addresses.keys().cloned().collect::<Vec<_>>().join(","),
                });
            }
            if self.active_node(&e.node).is_err() {
                return Err(StateError::EndpointNode {
                    service: name.to_owned(),
                    slot: e.slot,
                    node: e.node.clone(),
                });
            }
            if !nodes.insert(e.node.clone()) {
                return Err(StateError::TwoEndpointsOnNode {
                    service: name.to_owned(),
                    node: e.node.clone(),
                });
            }
        }
        Ok(())
    }
}
