//! Deciding changes: networks, services, placement, addresses and key rotations.
//!
//! Every function here reads the state (and which nodes are alive) and returns the commands that
//! make the change, or an error that says what is wrong; nothing is applied here. The manager
//! applies the commands of one plan together, under one lock, so plans never interleave.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use crate::planning::ipam::{self, IpamError};
use crate::planning::keys::KeyRing;
use crate::planning::placement::{self, Constraint, InvalidConstraint, valid_label_part};
use crate::state::{
    ClusterState, Command, Endpoint, Generation, Network, NodeState, PolicyRecord, PortSpec, Secret,
    SecretRecord, Service, StateError,
};
use mesh_api::ids::{self, NodeId};
use mesh_api::model::{RunSpec, Transport};

pub mod publish;
mod rollout;

pub use mesh_api::model::MAX_NAME;
pub use rollout::{
    MAX_UPDATE_SECS, ServiceUpdate, UpdateOptions, roll_out, rollback_service, update_service,
};
/// Most endpoints a service may ask for.
pub const MAX_REPLICAS: u32 = 1000;

/// Why a change was refused. Nothing was changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlanError {
    #[error(
        "{kind} name `{name}` is not valid: 1-{MAX_NAME} characters of a-z, 0-9 and `-`, starting with a letter"
    )]
    BadName { kind: &'static str, name: String },
    #[error("a network named `{0}` already exists")]
    NetworkExists(String),
    #[error("a service named `{0}` already exists")]
    ServiceExists(String),
    #[error("no network named `{0}`")]
    UnknownNetwork(String),
    #[error("no service named `{0}`")]
    UnknownService(String),
    #[error("no node with ID {0}")]
    UnknownNode(NodeId),
    #[error(transparent)]
    Ipam(#[from] IpamError),
    #[error(transparent)]
    Constraint(#[from] InvalidConstraint),
    #[error("{0}")]
    Run(String),
    #[error("a service needs at least one network")]
    NoNetwork,
    #[error("network `{0}` is listed twice")]
    DuplicateNetwork(String),
    #[error("port {0} is listed twice")]
    DuplicatePort(String),
    #[error("replicas must be between 0 and {MAX_REPLICAS}, not {0}")]
    Replicas(u32),
    #[error(
        "{wanted} replicas asked for, but only {eligible} node(s) are ready and satisfy the constraints ({constraints}); at most one endpoint of a service runs per node"
    )]
    TooFewNodes { wanted: u32, eligible: usize, constraints: String },
    #[error("label `{0}` is not valid: KEY=VALUE with 1-63 characters of a-z, A-Z, 0-9, `-`, `_`, `.` each")]
    BadLabel(String),
    #[error("network `{0}` is unencrypted: it has no keys to rotate")]
    Unencrypted(String),
    #[error("{0}")]
    Policy(String),
    #[error(
        "the policy was rejected: {count} of its tests failed; the previous policy stays in force\n{list}"
    )]
    PolicyTests { count: usize, list: String },
    #[error("no policy version {0}")]
    UnknownPolicyVersion(u64),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Which nodes are alive, as the manager sees their sessions.
#[derive(Clone, Debug, Default)]
pub struct Liveness {
    /// Nodes with an open session: new endpoints may go there.
    pub connected: BTreeSet<NodeId>,
    /// Nodes not considered down (connected, or disconnected for less than the grace period):
    /// endpoints already there stay.
    pub not_down: BTreeSet<NodeId>,
}

/// What a service should be, as asked by an admin.
#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub networks: Vec<String>,
    pub ports: Vec<PortSpec>,
    pub replicas: u32,
    pub constraints: Vec<String>,
    pub command: Option<String>,
    pub run: RunSpec,
    /// The operator's signature of the spec.
    pub signed: Option<mesh_api::specs::SignedSpec>,
    /// Published ports, as given (`[MODE:]PUBLISHED:TARGET[/PROTO]`).
    pub publish: Vec<String>,
}

fn check_name(kind: &'static str, name: &str) -> Result<(), PlanError> {
    if mesh_api::model::valid_name(name) {
        Ok(())
    } else {
        Err(PlanError::BadName { kind, name: name.to_owned() })
    }
}

/// A network: name and subnet checked, a fresh unique 24-bit ID, and for the AES-GCM transport a
/// fresh key ring (for WireGuard, a first generation of keys the nodes make themselves).
pub fn create_network(
    state: &ClusterState,
    name: &str,
    subnet: &str,
    transport: Transport,
    now: i64,
) -> Result<Vec<Command>, PlanError> {
    check_name("network", name)?;
    if state.networks.contains_key(name) {
        return Err(PlanError::NetworkExists(name.to_owned()));
    }
    let subnet = ipam::parse_subnet(subnet)?;
    if let Some(other) = state.networks.values().find(|n| ipam::overlaps(&n.subnet, &subnet)) {
        return Err(
            StateError::Overlap { subnet, other: other.name.clone(), other_subnet: other.subnet }.into()
        );
    }
    let used: BTreeSet<u32> = state.networks.values().map(|n| n.id).collect();
    let id = loop {
        let b = ids::random_bytes::<3>();
        let id = u32::from_be_bytes([0, b[0], b[1], b[2]]);
        if id != 0 && !used.contains(&id) {
            break id;
        }
    };
    let keys = (transport == Transport::AesGcm).then(|| KeyRing::new(now));
    let wireguard =
        (transport == Transport::WireGuard).then_some(Generation { generation: 1, rotated_at: now });
    Ok(vec![Command::CreateNetwork(Network { name: name.to_owned(), id, subnet, keys, wireguard })])
}

pub fn remove_network(state: &ClusterState, name: &str) -> Result<Vec<Command>, PlanError> {
    if !state.networks.contains_key(name) {
        return Err(PlanError::UnknownNetwork(name.to_owned()));
    }
    Ok(vec![Command::RemoveNetwork { name: name.to_owned() }])
}

pub fn rotate_key(state: &ClusterState, name: &str, now: i64) -> Result<Vec<Command>, PlanError> {
    let network = state.networks.get(name).ok_or_else(|| PlanError::UnknownNetwork(name.to_owned()))?;
    if let Some(g) = network.wireguard {
        return Ok(vec![Command::SetGeneration { network: name.to_owned(), generation: g.next(now) }]);
    }
    let ring = network.keys.as_ref().ok_or_else(|| PlanError::Unencrypted(name.to_owned()))?;
    Ok(vec![Command::SetKeyRing { network: name.to_owned(), ring: ring.rotate(now) }])
}

/// Rotations due after `interval` seconds since each ring last turned.
pub fn due_rotations(state: &ClusterState, interval_secs: i64, now: i64) -> Vec<Command> {
    state
        .networks
        .values()
        .filter_map(|n| {
            if let Some(g) = n.wireguard {
                return (now - g.rotated_at >= interval_secs)
                    .then(|| Command::SetGeneration { network: n.name.clone(), generation: g.next(now) });
            }
            let ring = n.keys.as_ref()?;
            (now - ring.rotated_at >= interval_secs)
                .then(|| Command::SetKeyRing { network: n.name.clone(), ring: ring.rotate(now) })
        })
        .collect()
}

pub fn create_service(
    state: &ClusterState,
    spec: ServiceSpec,
    live: &Liveness,
) -> Result<Vec<Command>, PlanError> {
    check_name("service", &spec.name)?;
    if spec.name == policy::INGRESS {
        return Err(PlanError::Run(format!(
            "`{}` is reserved: the policy's name for published ports' clients",
            policy::INGRESS
        )));
    }
    if state.services.contains_key(&spec.name) {
        return Err(PlanError::ServiceExists(spec.name));
    }
    if spec.networks.is_empty() {
        return Err(PlanError::NoNetwork);
    }
    spec.run.check().map_err(PlanError::Run)?;
    let mut seen = BTreeSet::new();
    for n in &spec.networks {
        if !state.networks.contains_key(n) {
            return Err(PlanError::UnknownNetwork(n.clone()));
        }
        if !seen.insert(n) {
            return Err(PlanError::DuplicateNetwork(n.clone()));
        }
    }
    let mut ports = BTreeSet::new();
    for p in &spec.ports {
        // 80/http and 80/tcp are the same TCP port.
        if !ports.insert((p.port, p.protocol.transport())) {
            return Err(PlanError::DuplicatePort(format!("{}/{:?}", p.port, p.protocol).to_lowercase()));
        }
    }
    if spec.replicas > MAX_REPLICAS {
        return Err(PlanError::Replicas(spec.replicas));
    }
    let published = publish::resolve(&spec.publish, &spec.ports)?;
    publish::check_free(state, &spec.name, &published)?;
    let constraints = spec.constraints.iter().map(|c| c.parse()).collect::<Result<Vec<Constraint>, _>>()?;
    let mut vips = BTreeMap::new();
    for n in &spec.networks {
        let net = &state.networks[n];
        let used: BTreeSet<Ipv4Addr> = state.addresses_on(n).into_keys().collect();
        vips.insert(n.clone(), ipam::allocate(n, &net.subnet, &used)?);
    }
    let command = spec.command.clone().filter(|c| !c.trim().is_empty());
    let definition = crate::state::Definition { command, run: spec.run.clone(), signed: None };
    if let Some(signed) = &spec.signed {
        rollout::check_signed(state, signed, &spec.name, &definition, &spec.networks)?;
    }
    let service = Service {
        name: spec.name,
        networks: spec.networks,
        ports: spec.ports,
        publish: published,
        replicas: spec.replicas,
        constraints,
        command: spec.command.filter(|c| !c.trim().is_empty()),
        run: spec.run,
        signed: spec.signed,
        vips,
        endpoints: BTreeMap::new(),
        version: 0,
        earlier: BTreeMap::new(),
        previous: None,
        rollout: None,
    };
    Ok(vec![Command::PutService(Box::new(place(state, service, live, true)?))])
}

pub fn scale_service(
    state: &ClusterState,
    name: &str,
    replicas: u32,
    live: &Liveness,
) -> Result<Vec<Command>, PlanError> {
    let mut service =
        state.services.get(name).cloned().ok_or_else(|| PlanError::UnknownService(name.to_owned()))?;
    if replicas > MAX_REPLICAS {
        return Err(PlanError::Replicas(replicas));
    }
    service.replicas = replicas;
    Ok(vec![Command::PutService(Box::new(place(state, service, live, true)?))])
}

pub fn remove_service(state: &ClusterState, name: &str) -> Result<Vec<Command>, PlanError> {
    if !state.services.contains_key(name) {
        return Err(PlanError::UnknownService(name.to_owned()));
    }
    Ok(vec![Command::RemoveService { name: name.to_owned() }])
}

/// A new secret of `data`, made at `now` (Unix seconds).
pub fn create_secret(
    state: &ClusterState,
    name: &str,
    data: &[u8],
    now: i64,
) -> Result<Vec<Command>, PlanError> {
    use base64::Engine;
    use sha2::Digest;
    if !mesh_api::model::valid_secret_name(name) || data.len() > mesh_api::model::MAX_SECRET_BYTES {
        return Err(PlanError::State(StateError::BadSecret(name.to_owned())));
    }
    if state.secrets.contains_key(name) {
        return Err(PlanError::State(StateError::SecretExists(name.to_owned())));
    }
    let record = SecretRecord {
        data: Secret(base64::engine::general_purpose::STANDARD.encode(data)),
        digest: sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect(),
        size: data.len() as u64,
        created_at: now,
    };
    Ok(vec![Command::PutSecret { name: name.to_owned(), record }])
}

/// Removes a secret, refused while a service reads it.
pub fn remove_secret(state: &ClusterState, name: &str) -> Result<Vec<Command>, PlanError> {
    if !state.secrets.contains_key(name) {
        return Err(PlanError::State(StateError::UnknownSecret(name.to_owned())));
    }
    let users = state.secret_users(name);
    if !users.is_empty() {
        return Err(PlanError::State(StateError::SecretInUse {
            name: name.to_owned(),
            services: users.join(", "),
        }));
    }
    Ok(vec![Command::RemoveSecret { name: name.to_owned() }])
}

/// Label changes, then whatever placement they imply.
pub fn update_labels(
    state: &ClusterState,
    id: &NodeId,
    add: &[String],
    remove: &[String],
    live: &Liveness,
) -> Result<Vec<Command>, PlanError> {
    let node = state.active_node(id)?;
    let mut labels = node.labels.clone();
    for key in remove {
        if !valid_label_part(key) {
            return Err(PlanError::BadLabel(key.clone()));
        }
        labels.remove(key);
    }
    for pair in add {
        let (k, v) = pair.split_once('=').ok_or_else(|| PlanError::BadLabel(pair.clone()))?;
        if !valid_label_part(k) || !valid_label_part(v) {
            return Err(PlanError::BadLabel(pair.clone()));
        }
        labels.insert(k.to_owned(), v.to_owned());
    }
    let mut commands = vec![Command::SetNodeLabels { id: id.clone(), labels }];
    commands.extend(reconcile(&after(state, &commands)?, live));
    Ok(commands)
}

/// A node's removal, and its endpoints moved elsewhere.
pub fn remove_node(state: &ClusterState, id: &NodeId, live: &Liveness) -> Result<Vec<Command>, PlanError> {
    state.active_node(id)?;
    let at = time::OffsetDateTime::now_utc().unix_timestamp();
    let mut commands = vec![Command::RemoveNode { id: id.clone(), at: Some(at) }];
    commands.extend(reconcile(&after(state, &commands)?, live));
    Ok(commands)
}

/// The commands that bring every service back to what it asks for: endpoints off removed, down
/// or no longer eligible nodes, and new ones where replicas are missing (as many as possible).
pub fn reconcile(state: &ClusterState, live: &Liveness) -> Vec<Command> {
    let mut current = state.clone();
    let mut commands = Vec::new();
    let names: Vec<String> = state.services.keys().cloned().collect();
    for name in names {
        let service = current.services[&name].clone();
        let Ok(placed) = place(&current, service.clone(), live, false) else { continue };
        if placed != service {
            let command = Command::PutService(Box::new(placed));
            if current.apply(command.clone()).is_ok() {
                commands.push(command);
            }
        }
    }
    commands
}

/// The state once `commands` are applied.
pub fn after(state: &ClusterState, commands: &[Command]) -> Result<ClusterState, PlanError> {
    let mut next = state.clone();
    for c in commands {
        next.apply(c.clone())?;
    }
    Ok(next)
}

/// Places `service`'s endpoints: keeps those on nodes that are still eligible and not down, drops
/// the rest (and the highest slots beyond `replicas`), and adds new ones on connected eligible
/// nodes, spread by load. With `strict`, fewer eligible nodes than replicas is an error.
fn place(
    state: &ClusterState,
    mut service: Service,
    live: &Liveness,
    strict: bool,
) -> Result<Service, PlanError> {
    let allowed = |id: &NodeId| {
        state.nodes.get(id).is_some_and(|n| {
            n.state == NodeState::Active && service.constraints.iter().all(|c| c.allows(id, &n.labels))
        })
    };
    let eligible: BTreeSet<NodeId> = live.connected.iter().filter(|n| allowed(n)).cloned().collect();
    let keepable: BTreeSet<NodeId> = live.not_down.iter().filter(|n| allowed(n)).cloned().collect();
    if strict {
        let possible = eligible
            .union(
                &service
                    .endpoints
                    .values()
                    .map(|e| e.node.clone())
                    .filter(|n| keepable.contains(n))
                    .collect(),
            )
            .count();
        if (service.replicas as usize) > possible {
            let constraints = if service.constraints.is_empty() {
                "none".to_owned()
            } else {
                service.constraints.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ")
            };
            return Err(PlanError::TooFewNodes { wanted: service.replicas, eligible: possible, constraints });
        }
    }

    // Keep the lowest slots on keepable nodes, up to replicas.
    let mut kept: BTreeMap<u32, Endpoint> = BTreeMap::new();
    for (slot, e) in &service.endpoints {
        if kept.len() < service.replicas as usize && keepable.contains(&e.node) {
            kept.insert(*slot, e.clone());
        }
    }
    let keep_nodes: BTreeSet<NodeId> = kept.values().map(|e| e.node.clone()).collect();
    let mut load: BTreeMap<NodeId, usize> = BTreeMap::new();
    for (s, e) in state.endpoints() {
        if s.name != service.name {
            *load.entry(e.node.clone()).or_default() += 1;
        }
    }
    let new_nodes = placement::choose(service.replicas as usize, &keep_nodes, &eligible, &load);

    // Addresses held on each network by everything but this service's dropped endpoints.
    let mut used: BTreeMap<String, BTreeSet<Ipv4Addr>> = BTreeMap::new();
    for n in &service.networks {
        let mut held: BTreeSet<Ipv4Addr> = BTreeSet::new();
        for other in state.services.values().filter(|s| s.name != service.name) {
            held.extend(other.vips.get(n));
            held.extend(other.endpoints.values().filter_map(|e| e.addresses.get(n)));
        }
        held.extend(service.vips.get(n));
        held.extend(kept.values().filter_map(|e| e.addresses.get(n)));
        used.insert(n.clone(), held);
    }
    let mut slot = 0;
    for node in new_nodes {
        slot = (slot + 1..).find(|s| !kept.contains_key(s)).expect("a free slot");
        let mut addresses = BTreeMap::new();
        for n in &service.networks {
            let held = used.get_mut(n).expect("every network has a set");
            let a = ipam::allocate(n, &state.networks[n].subnet, held)?;
            held.insert(a);
            addresses.insert(n.clone(), a);
        }
        // Keys of the epochs before this one protect nothing the new endpoint's node had a part
        // in: it is never sent them.
        let since = service
            .networks
            .iter()
            .filter_map(|n| Some((n.clone(), state.networks[n].keys.as_ref()?.current.epoch)))
            .collect();
        // A new endpoint runs the service's current version at once.
        kept.insert(slot, Endpoint { slot, node, addresses, since, version: service.version });
    }
    service.endpoints = kept;
    Ok(service)
}

/// A new policy version from `text`: it must parse, name only services the cluster has, and pass
/// its own tests; otherwise nothing changes and the error says why (every failing test listed).
pub fn apply_policy(
    state: &ClusterState,
    file: &str,
    text: &str,
    source: &str,
    now: i64,
) -> Result<Vec<Command>, PlanError> {
    let parsed = policy::Policy::parse(file, text).map_err(|e| PlanError::Policy(e.to_string()))?;
    let known = state.services.keys().cloned().collect();
    parsed.validate_services(text, &known).map_err(|e| PlanError::Policy(e.to_string()))?;
    let failures = policy::Engine::compile(&parsed).run_tests(&parsed.tests);
    if !failures.is_empty() {
        let list = failures.iter().map(|f| format!("  {file}: {f}")).collect::<Vec<_>>().join("\n");
        return Err(PlanError::PolicyTests { count: failures.len(), list });
    }
    let version = state.policy().map_or(1, |p| p.version + 1);
    Ok(vec![Command::SetPolicy(PolicyRecord {
        version,
        file: file.to_owned(),
        text: text.to_owned(),
        applied_at: now,
        source: source.to_owned(),
    })])
}

/// Puts version `version` back in force, as a new version (checked again like any apply).
pub fn rollback_policy(state: &ClusterState, version: u64, now: i64) -> Result<Vec<Command>, PlanError> {
    let old = state
        .policies
        .iter()
        .find(|p| p.version == version)
        .ok_or(PlanError::UnknownPolicyVersion(version))?;
    apply_policy(state, &old.file, &old.text, &format!("rollback to {version}"), now)
}
