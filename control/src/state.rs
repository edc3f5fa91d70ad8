//! The cluster state: one deterministic state machine changed only by [`Command`]s.
//!
//! Everything random or chosen (IDs, keys, placement, addresses) is decided before a command is
//! made, so applying the same commands in the same order always gives the same state; that is
//! what lets the store replicate the commands. `apply` re-checks every invariant and refuses a
//! command that would break one, leaving the state unchanged.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use mesh_api::ids::{ClusterId, NodeId};
pub use mesh_api::model::{NodeState, PortSpec, Protocol};
use mesh_api::tokens::{Role, SecretHash};

use crate::planning::ipam;

use mesh_api::model::MAX_SECRET_BYTES;

mod command;
mod error;
mod records;

pub use command::Command;
pub use error::StateError;
pub use records::{
    AdminRecord, CaRecord, CaRotation, Definition, Endpoint, ExternalCa, Generation, Network, NodeRecord,
    OnFailure, PolicyRecord, Rollout, RolloutState, Secret, SecretRecord, Service, Settings, WireguardPublic,
};

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
    /// The root CA that signs, key included.
    #[serde(default)]
    pub ca: Option<CaRecord>,
    /// A root rotation under way, if one is.
    #[serde(default)]
    pub ca_rotation: Option<CaRotation>,
    /// The last rotation's cross-signature, still sent to nodes after it ended: a node that
    /// missed the rotation's slices (its session was down) takes the new root with it later.
    #[serde(default)]
    pub last_cross_pem: String,
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
    /// The admin certificates accepted, by serial; `None` for a cluster made before admin
    /// credentials were recorded (any admin certificate of the CA is accepted then).
    #[serde(default)]
    pub admins: Option<BTreeMap<String, AdminRecord>>,
    /// Cluster-wide settings stored by an admin.
    #[serde(default)]
    pub settings: Settings,
    /// Secrets by name.
    #[serde(default)]
    pub secrets: BTreeMap<String, SecretRecord>,
    /// Bumped by every applied command: the version of node slices.
    #[serde(default)]
    pub revision: u64,
}

impl ClusterState {
    pub fn new(cluster_id: ClusterId, cert_lifetime: Duration) -> ClusterState {
        ClusterState {
            cluster_id,
            cert_lifetime_secs: cert_lifetime.as_secs(),
            tokens: BTreeMap::new(),
            join_tokens: BTreeMap::new(),
            ca: None,
            ca_rotation: None,
            last_cross_pem: String::new(),
            unlock_key: None,
            nodes: BTreeMap::new(),
            networks: BTreeMap::new(),
            services: BTreeMap::new(),
            policies: Vec::new(),
            next_node_index: 1,
            settings: Settings::default(),
            admins: Some(BTreeMap::new()),
            secrets: BTreeMap::new(),
            revision: 0,
        }
    }

    /// The roots trusted (PEM), the signing one first: during a rotation the new root, then the
    /// old one.
    pub fn trust_pem(&self) -> String {
        let mut pem = self.ca.as_ref().map(|c| c.cert_pem.clone()).unwrap_or_default();
        if let Some(r) = &self.ca_rotation {
            pem.push_str(&r.previous_pem);
        }
        pem
    }

    /// During a rotation, the cross-signed new root that issued certificates carry; else empty.
    pub fn cross_pem(&self) -> &str {
        self.ca_rotation.as_ref().map_or("", |r| r.cross_pem.as_str())
    }

    /// The cross-signature sent to nodes: the rotation's, or after it the last one's.
    pub fn slice_cross_pem(&self) -> &str {
        self.ca_rotation.as_ref().map_or(self.last_cross_pem.as_str(), |r| r.cross_pem.as_str())
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
            Command::SetDemoted { id, demoted } => {
                let node = self.node_mut(&id)?;
                if node.role != Role::Manager {
                    return Err(StateError::NotAManager(id));
                }
                node.demoted = demoted;
            }
            Command::SetUnlockKey(key) => self.unlock_key = key,
            Command::AddAdmin { serial, record } => {
                self.admins.get_or_insert_with(BTreeMap::new).insert(serial, record);
            }
            Command::RevokeAdmin { serial } => {
                let admins = self.admins.get_or_insert_with(BTreeMap::new);
                if !admins.contains_key(&serial) {
                    return Err(StateError::UnknownAdmin(serial));
                }
                if admins.len() == 1 {
                    return Err(StateError::LastAdmin(serial));
                }
                admins.remove(&serial);
            }
            Command::UpdateSettings { cert_lifetime_secs, settings } => {
                use crate::config::{
                    CERT_LIFETIME_RANGE, DOWN_AFTER_RANGE, KEY_ROTATION_RANGE, WORKLOAD_CERT_LIFETIME_RANGE,
                };
                let checks = [
                    ("the certificate lifetime", cert_lifetime_secs, CERT_LIFETIME_RANGE),
                    ("the key rotation interval", settings.key_rotation_secs, KEY_ROTATION_RANGE),
                    (
                        "the workload certificate lifetime",
                        settings.workload_cert_lifetime_secs,
                        WORKLOAD_CERT_LIFETIME_RANGE,
                    ),
                    ("down-after", settings.down_after_secs, DOWN_AFTER_RANGE),
                ];
                for (setting, value, range) in checks {
                    if let Some(secs) = value
                        && !range.contains(&Duration::from_secs(secs))
                    {
                        let show = |d: Duration| humantime::format_duration(d).to_string();
                        return Err(StateError::Setting {
                            setting: setting.to_owned(),
                            value: show(Duration::from_secs(secs)),
                            min: show(*range.start()),
                            max: show(*range.end()),
                        });
                    }
                }
                if let Some(secs) = cert_lifetime_secs {
                    self.cert_lifetime_secs = secs;
                }
                let current = &mut self.settings;
                current.key_rotation_secs = settings.key_rotation_secs.or(current.key_rotation_secs);
                current.down_after_secs = settings.down_after_secs.or(current.down_after_secs);
                current.workload_cert_lifetime_secs =
                    settings.workload_cert_lifetime_secs.or(current.workload_cert_lifetime_secs);
            }
            Command::AddNode(mut record) => {
                if self.nodes.contains_key(&record.id) {
                    return Err(StateError::NodeExists(record.id));
                }
                record.index = self.next_node_index.max(1);
                self.next_node_index = record.index + 1;
                self.nodes.insert(record.id.clone(), record);
            }
            Command::RecordCertificate { id, not_after, root } => {
                let node = self.node_mut(&id)?;
                node.cert_not_after = not_after;
                node.cert_root = root;
            }
            Command::StartCaRotation { ca, cross_pem, started_at } => {
                if self.ca_rotation.is_some() {
                    return Err(StateError::CaRotating);
                }
                let previous = self.ca.replace(ca).ok_or(StateError::NoCa)?;
                self.ca_rotation =
                    Some(CaRotation { previous_pem: previous.cert_pem, cross_pem, started_at });
            }
            Command::FinishCaRotation => {
                let rotation = self.ca_rotation.take().ok_or(StateError::NoCaRotation)?;
                self.last_cross_pem = rotation.cross_pem;
            }
            Command::RemoveNode { id, at } => {
                let node = self.node_mut(&id)?;
                node.state = NodeState::Removed;
                node.removed_at = at;
            }
            Command::SetNodeLabels { id, labels } => self.node_mut(&id)?.labels = labels,
            Command::SetNodeUnderlay { id, underlay } => self.node_mut(&id)?.underlay = Some(underlay),
            Command::SetNodeBoot { id, boot } => {
                let node = self.node_mut(&id)?;
                if boot < node.boot {
                    return Err(StateError::BootRollback { id, boot, recorded: node.boot });
                }
                node.boot = boot;
            }
            Command::SetWireguardKey { id, network, key } => {
                let net = self.networks.values().find(|n| n.id == network);
                let current = net.and_then(|n| n.wireguard).map(|g| g.generation);
                // Only the network's current generation: a report checked before a rotation
                // that came first is refused, and sent again with a new key.
                if current != Some(key.generation) {
                    return Err(StateError::Wireguard(format!(
                        "no WireGuard network {network} at generation {}",
                        key.generation
                    )));
                }
                let node = self.node_mut(&id)?;
                if node.wireguard.get(&network).is_some_and(|held| held.generation > key.generation) {
                    return Err(StateError::Wireguard(format!(
                        "generation {} is older than the one recorded",
                        key.generation
                    )));
                }
                node.wireguard.insert(network, key);
            }
            Command::SetGeneration { network, generation } => {
                let net =
                    self.networks.get_mut(&network).ok_or(StateError::UnknownNetwork(network.clone()))?;
                match &net.wireguard {
                    Some(held) if generation.generation > held.generation => net.wireguard = Some(generation),
                    _ => return Err(StateError::Wireguard(format!("{network}: not a newer generation"))),
                }
            }
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
                if let Some(gone) = self.networks.remove(&name) {
                    for node in self.nodes.values_mut() {
                        node.wireguard.remove(&gone.id);
                    }
                }
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
                let old = self.services.insert(name.clone(), *service);
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
            Command::PutSecret { name, record } => {
                if self.secrets.contains_key(&name) {
                    return Err(StateError::SecretExists(name));
                }
                if !mesh_api::model::valid_secret_name(&name) || record.size > MAX_SECRET_BYTES as u64 {
                    return Err(StateError::BadSecret(name));
                }
                self.secrets.insert(name, record);
            }
            Command::RemoveSecret { name } => {
                let users = self.secret_users(&name);
                if !users.is_empty() {
                    return Err(StateError::SecretInUse { name, services: users.join(", ") });
                }
                self.secrets.remove(&name).ok_or(StateError::UnknownSecret(name))?;
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

    /// The services that read secret `name` (in any version they keep).
    pub fn secret_users(&self, name: &str) -> Vec<String> {
        self.services.values().filter(|s| s.secrets().any(|n| n == name)).map(|s| s.name.clone()).collect()
    }

    /// The invariants of one service against the rest of the state.
    fn check_service(&self, name: &str) -> Result<(), StateError> {
        let service = &self.services[name];
        if let Some(e) = service
            .endpoints
            .values()
            .find(|e| e.version != service.version && !service.earlier.contains_key(&e.version))
        {
            return Err(StateError::UnknownVersion {
                service: service.name.clone(),
                slot: e.slot,
                version: e.version,
            });
        }
        if let Some(missing) = service.secrets().find(|s| !self.secrets.contains_key(*s)) {
            return Err(StateError::UnknownSecret(missing.clone()));
        }
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
