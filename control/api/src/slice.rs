//! A node's slice of the cluster: everything one node may know, and nothing more. Computed by
//! control's dispatcher, sent over the node's session, held by meshd. The wire form is
//! `pb::NodeSlice`; this is the domain form, converted at the edge.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::ids::NodeId;
use crate::keys::{KEY_LEN, KeyUse, PairKey};
use crate::model::{
    EndpointState, LogLine, MAX_LOG_LINE, MAX_REPORT_TEXT, PortSpec, Protocol, RunSpec, RunState,
};
use crate::proto::{InvalidMessage, ipv4, pb};

/// One of this node's endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalEndpoint {
    pub service: String,
    pub slot: u32,
    /// Network name -> this endpoint's address on it.
    pub addresses: BTreeMap<String, Ipv4Addr>,
    /// The version of its service's definition it runs, and that definition.
    pub version: u64,
    pub command: Option<String>,
    pub run: RunSpec,
    /// The secrets its service reads (`run.secrets`), for its workload alone.
    pub secrets: Vec<SecretFile>,
    /// The operator's signature of this version's spec, as control keeps it.
    pub signed: Option<crate::specs::SignedSpec>,
}

/// A secret sent for one endpoint's workload; its bytes are never printed nor serialized.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretFile {
    pub name: String,
    pub data: Vec<u8>,
}

impl std::fmt::Debug for SecretFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SecretFile {{ name: {:?}, data: <{} bytes> }}", self.name, self.data.len())
    }
}

impl Serialize for SecretFile {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let mut s = serializer.serialize_struct("SecretFile", 2)?;
        s.serialize_field("name", &self.name)?;
        s.serialize_field("size", &self.data.len())?;
        s.end()
    }
}

/// Where an overlay address lives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Peer {
    pub address: Ipv4Addr,
    pub node: NodeId,
    /// `None` until that node has reported its underlay address.
    pub underlay: Option<SocketAddr>,
    /// The node's index in overlay headers.
    pub node_index: u32,
    /// The node's boot number (0 until it reported one): part of its pair keys.
    pub boot: u16,
    /// On a WireGuard network: the node's public key there (`None` until it reported one).
    #[serde(serialize_with = "public_key")]
    pub wireguard: Option<[u8; 32]>,
}

/// A public key as base64, as `wg` shows them.
fn public_key<S: serde::Serializer>(key: &Option<[u8; 32]>, s: S) -> Result<S::Ok, S::Error> {
    use base64::Engine;
    match key {
        Some(k) => s.serialize_some(&base64::engine::general_purpose::STANDARD.encode(k)),
        None => s.serialize_none(),
    }
}

/// A service as seen from one network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ServiceRecord {
    pub name: String,
    pub vip: Ipv4Addr,
    pub ports: Vec<PortSpec>,
    pub endpoints: Vec<Ipv4Addr>,
}

/// A network this node has an endpoint on.
#[derive(Clone, PartialEq, Eq, Serialize)]
pub struct SliceNetwork {
    pub name: String,
    pub id: u32,
    pub subnet: Ipv4Net,
    pub encrypted: bool,
    /// On a WireGuard network, the generation of static keys its nodes hold (see
    /// `pb::SliceNetwork::wireguard_generation`); the ring and pair keys are then empty.
    pub wireguard: Option<u32>,
    /// The epochs of the network's ring, by use, newest first (no key bytes).
    pub ring: Vec<(KeyUse, u32)>,
    /// The keys this node shares with each peer node on the network, per epoch of `ring`, in
    /// (peer, epoch) order. Never any other pair's key, nor the network's epoch secrets.
    #[serde(skip)]
    pub pair_keys: Vec<PairKey>,
    /// The same for every node on the network: shared, computed once per state revision.
    pub peers: Arc<[Peer]>,
    pub services: Arc<[ServiceRecord]>,
}

impl std::fmt::Debug for SliceNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SliceNetwork")
            .field("name", &self.name)
            .field("id", &self.id)
            .field("subnet", &self.subnet)
            .field("encrypted", &self.encrypted)
            .field("wireguard", &self.wireguard)
            .field("ring", &self.ring)
            .field("pair_keys", &self.pair_keys.len())
            .field("peers", &self.peers)
            .field("services", &self.services)
            .finish()
    }
}

impl SliceNetwork {
    /// Epochs of the keys held, by use (never the key bytes).
    pub fn epochs(&self) -> Vec<(KeyUse, u32)> {
        self.ring.clone()
    }

    /// The key shared with peer node `peer` for `epoch`, if held.
    pub fn pair_key(&self, peer: u32, epoch: u32) -> Option<&PairKey> {
        self.pair_keys
            .binary_search_by(|k| (k.peer, k.epoch).cmp(&(peer, epoch)))
            .ok()
            .map(|i| &self.pair_keys[i])
    }
}

/// The policy rules a node enforces: those whose destination it hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodePolicy {
    pub version: u64,
    /// The rules, in the policy language.
    pub text: String,
}

/// An endpoint a published port leads to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IngressTarget {
    /// One of its overlay addresses.
    pub address: Ipv4Addr,
    pub node: NodeId,
    /// Its node's mesh port.
    pub mesh: SocketAddr,
}

/// A port this node publishes: it listens on `port` in its own namespace and carries each
/// connection, as the source `ingress`, to an endpoint's `target` port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct PublishedPort {
    pub service: String,
    pub port: u16,
    pub target: u16,
    pub protocol: Protocol,
    pub endpoints: Vec<IngressTarget>,
}

/// The nodes that may call a hosted service's `target` port as the source `ingress`: those
/// that publish it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct IngressAdmission {
    pub service: String,
    pub target: u16,
    pub protocol: Protocol,
    pub nodes: std::collections::BTreeSet<NodeId>,
}

/// The whole slice.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeSlice {
    pub version: u64,
    pub node: NodeId,
    pub endpoints: Vec<LocalEndpoint>,
    pub networks: Vec<SliceNetwork>,
    pub policy: Option<NodePolicy>,
    /// This node's index in overlay headers.
    pub node_index: u32,
    /// Hosted service -> the services the policy may let it reach.
    pub visibility: BTreeMap<String, std::collections::BTreeSet<String>>,
    /// Nodes removed from the cluster, whose workload certificates the mesh refuses.
    pub removed_nodes: Vec<NodeId>,
    /// Every manager's control address.
    pub managers: Vec<String>,
    /// Every manager's node ID: the certificates the node accepts as control.
    pub manager_ids: Vec<String>,
    /// The cluster's roots (PEM, the signing one first) and, during a root rotation, the
    /// cross-signature that vouches for the new one ([`crate::trust`]); empty from a manager that
    /// sends none.
    pub trust_pem: String,
    pub cross_pem: String,
    /// The ports this node publishes.
    pub published: Vec<PublishedPort>,
    /// Who may call the published ports of the services hosted here.
    pub ingress: Vec<IngressAdmission>,
}

impl NodeSlice {
    /// The wire form of this slice as the next message of a session whose previous message
    /// carried `previous`: a network's peers and services are left out when that message had
    /// them, or sent as what changed when that is smaller than the whole; the removed nodes and
    /// the policy are left out when unchanged. Each omission is marked on the wire.
    pub fn to_wire(&self, previous: Option<&NodeSlice>) -> pb::NodeSlice {
        let removed_nodes_unchanged = previous.is_some_and(|p| p.removed_nodes == self.removed_nodes);
        let policy_unchanged = previous.is_some_and(|p| p.policy == self.policy);
        pb::NodeSlice {
            visibility: self
                .visibility
                .iter()
                .map(|(service, reachable)| pb::ServiceVisibility {
                    service: service.clone(),
                    reachable: reachable.iter().cloned().collect(),
                })
                .collect(),
            node_index: self.node_index,
            removed_nodes: if removed_nodes_unchanged {
                Vec::new()
            } else {
                self.removed_nodes.iter().map(ToString::to_string).collect()
            },
            managers: self.managers.clone(),
            manager_ids: self.manager_ids.clone(),
            trust_pem: self.trust_pem.clone(),
            cross_pem: self.cross_pem.clone(),
            published: self
                .published
                .iter()
                .map(|p| pb::PublishedPort {
                    service: p.service.clone(),
                    port: p.port.into(),
                    target: p.target.into(),
                    protocol: proto_str(p.protocol).to_owned(),
                    endpoints: p
                        .endpoints
                        .iter()
                        .map(|t| pb::IngressTarget {
                            address: t.address.to_string(),
                            node: t.node.to_string(),
                            mesh: t.mesh.to_string(),
                        })
                        .collect(),
                })
                .collect(),
            ingress: self
                .ingress
                .iter()
                .map(|a| pb::IngressAdmission {
                    service: a.service.clone(),
                    target: a.target.into(),
                    protocol: proto_str(a.protocol).to_owned(),
                    nodes: a.nodes.iter().map(ToString::to_string).collect(),
                })
                .collect(),
            removed_nodes_unchanged,
            policy_unchanged,
            policy_version: if policy_unchanged { 0 } else { self.policy.as_ref().map_or(0, |p| p.version) },
            policy: if policy_unchanged {
                String::new()
            } else {
                self.policy.as_ref().map(|p| p.text.clone()).unwrap_or_default()
            },
            version: self.version,
            node_id: self.node.to_string(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| pb::Endpoint {
                    service: e.service.clone(),
                    slot: e.slot,
                    node: self.node.to_string(),
                    addresses: e
                        .addresses
                        .iter()
                        .map(|(n, a)| pb::EndpointAddress { network: n.clone(), address: a.to_string() })
                        .collect(),
                    command: e.command.clone().unwrap_or_default(),
                    run: Some(e.run.clone().into()),
                    secrets: e
                        .secrets
                        .iter()
                        .map(|s| pb::SecretFile { name: s.name.clone(), data: s.data.clone() })
                        .collect(),
                    version: e.version,
                    signed: e.signed.as_ref().map(|s| pb::SignedSpec {
                        document: s.document.clone(),
                        signature: s.signature.clone(),
                    }),
                })
                .collect(),
            networks: self
                .networks
                .iter()
                .map(|n| n.to_wire(previous.and_then(|p| p.networks.iter().find(|b| b.name == n.name))))
                .collect(),
        }
    }

    /// Reads a session's message, taking the sections it marks unchanged from `previous`, the
    /// slice the session's previous message carried. A section marked unchanged with nothing to
    /// take it from is malformed: the session must start again from a whole slice.
    pub fn from_wire(wire: pb::NodeSlice, previous: Option<&NodeSlice>) -> Result<NodeSlice, InvalidMessage> {
        // The networks not sent whole: the peers and services gone (none when unchanged), sorted
        // for lookups; and the pair keys gone, when the pair keys are sent as what changed.
        let mut partial: BTreeMap<String, (Vec<Ipv4Addr>, Vec<String>)> = BTreeMap::new();
        let mut keys_partial: BTreeMap<String, Vec<(u32, u32)>> = BTreeMap::new();
        for n in wire.networks.iter() {
            if n.membership_unchanged || n.membership_delta {
                let mut peers_gone: Vec<Ipv4Addr> =
                    n.peers_gone.iter().map(|a| ipv4(a, "peer gone")).collect::<Result<_, _>>()?;
                peers_gone.sort();
                let mut services_gone = n.services_gone.clone();
                services_gone.sort();
                partial.insert(n.name.clone(), (peers_gone, services_gone));
            }
            if n.pair_keys_delta {
                let mut gone: Vec<(u32, u32)> = n.pair_keys_gone.iter().map(|k| (k.peer, k.epoch)).collect();
                gone.sort();
                keys_partial.insert(n.name.clone(), gone);
            }
        }
        let (removed_unchanged, policy_unchanged) = (wire.removed_nodes_unchanged, wire.policy_unchanged);
        let mut slice = NodeSlice::try_from(wire)?;
        let base = || previous.ok_or(InvalidMessage::Field("unchanged section without an earlier slice"));
        for network in slice.networks.iter_mut() {
            let membership = partial.remove(&network.name);
            let keys = keys_partial.remove(&network.name);
            if membership.is_none() && keys.is_none() {
                continue;
            }
            let before = base()?
                .networks
                .iter()
                .find(|b| b.name == network.name)
                .ok_or(InvalidMessage::Field("unchanged network without an earlier one"))?;
            if let Some((peers_gone, services_gone)) = membership {
                network.peers = apply(&before.peers, &network.peers, &peers_gone, |p| p.address);
                network.services =
                    apply(&before.services, &network.services, &services_gone, |r| r.name.clone());
            }
            if let Some(gone) = keys {
                network.pair_keys =
                    merged(&before.pair_keys, &network.pair_keys, &gone, |k| (k.peer, k.epoch));
            }
            // The keys of epochs that left the ring go with them.
            let ring = &network.ring;
            network.pair_keys.retain(|k| ring.iter().any(|(_, e)| *e == k.epoch));
        }
        if removed_unchanged {
            slice.removed_nodes = base()?.removed_nodes.clone();
        }
        if policy_unchanged {
            slice.policy = base()?.policy.clone();
        }
        Ok(slice)
    }

    /// Whether two slices carry the same content, whatever their versions.
    pub fn same_content(&self, other: &NodeSlice) -> bool {
        self.node == other.node
            && self.endpoints == other.endpoints
            && self.networks == other.networks
            && self.policy == other.policy
            && self.visibility == other.visibility
            && self.removed_nodes == other.removed_nodes
            && self.managers == other.managers
            && self.manager_ids == other.manager_ids
            && self.trust_pem == other.trust_pem
            && self.cross_pem == other.cross_pem
            && self.published == other.published
            && self.ingress == other.ingress
    }
}

fn proto_str(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
        Protocol::Http => "http",
    }
}

impl From<PortSpec> for pb::Port {
    fn from(p: PortSpec) -> pb::Port {
        pb::Port { port: p.port.into(), protocol: proto_str(p.protocol).to_owned() }
    }
}

impl TryFrom<pb::Port> for PortSpec {
    type Error = InvalidMessage;
    fn try_from(p: pb::Port) -> Result<PortSpec, InvalidMessage> {
        let port = u16::try_from(p.port).ok().filter(|p| *p != 0).ok_or(InvalidMessage::Field("port"))?;
        let protocol = match p.protocol.as_str() {
            "tcp" | "" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "http" => Protocol::Http,
            _ => return Err(InvalidMessage::Field("protocol")),
        };
        Ok(PortSpec { port, protocol })
    }
}

impl From<EndpointState> for pb::EndpointReport {
    fn from(e: EndpointState) -> pb::EndpointReport {
        pb::EndpointReport {
            service: e.service,
            slot: e.slot,
            state: e.state.name().to_owned(),
            restarts: e.restarts,
            since: e.since,
            last_exit: e.last_exit.unwrap_or_default(),
            version: e.version,
        }
    }
}

/// A report from a node, bounded: a node says nothing longer than [`MAX_REPORT_TEXT`].
impl TryFrom<pb::EndpointReport> for EndpointState {
    type Error = InvalidMessage;
    fn try_from(e: pb::EndpointReport) -> Result<EndpointState, InvalidMessage> {
        if e.service.len() > MAX_REPORT_TEXT || e.last_exit.len() > MAX_REPORT_TEXT {
            return Err(InvalidMessage::Field("report text"));
        }
        Ok(EndpointState {
            service: e.service,
            slot: e.slot,
            state: RunState::parse(&e.state).ok_or(InvalidMessage::Field("state"))?,
            restarts: e.restarts,
            since: e.since,
            last_exit: Some(e.last_exit).filter(|t| !t.is_empty()),
            version: e.version,
        })
    }
}

impl From<LogLine> for pb::LogLine {
    fn from(l: LogLine) -> pb::LogLine {
        pb::LogLine { at_millis: l.at_millis, stream: l.stream, text: l.text }
    }
}

/// A line from the wire, bounded: cut to [`MAX_LOG_LINE`] bytes, on a character boundary.
impl From<pb::LogLine> for LogLine {
    fn from(l: pb::LogLine) -> LogLine {
        let mut text = l.text;
        if text.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !text.is_char_boundary(cut) {
                cut -= 1;
            }
            text.truncate(cut);
        }
        let stream = if l.stream == "stderr" { "stderr" } else { "stdout" };
        LogLine { at_millis: l.at_millis, stream: stream.to_owned(), text }
    }
}

impl From<RunSpec> for pb::RunSpec {
    fn from(s: RunSpec) -> pb::RunSpec {
        pb::RunSpec {
            user: s.user,
            writable: s.writable,
            readable: s.readable,
            cpu_millis: s.cpu_millis.unwrap_or(0),
            memory_bytes: s.memory_bytes.unwrap_or(0),
            env: s.env,
            secrets: s.secrets,
        }
    }
}

/// How a command runs, from the wire, as it was sent: [`RunSpec::check`] says whether it may be used.
impl From<pb::RunSpec> for RunSpec {
    fn from(s: pb::RunSpec) -> RunSpec {
        RunSpec {
            user: s.user,
            writable: s.writable,
            readable: s.readable,
            cpu_millis: Some(s.cpu_millis).filter(|c| *c != 0),
            memory_bytes: Some(s.memory_bytes).filter(|m| *m != 0),
            env: s.env,
            secrets: s.secrets,
        }
    }
}

/// How a command runs, in a slice, checked as control checks it: a node refuses what control
/// would.
fn checked(s: Option<pb::RunSpec>) -> Result<RunSpec, InvalidMessage> {
    let run = s.map(RunSpec::from).unwrap_or_default();
    run.check().map_err(|_| InvalidMessage::Field("run"))?;
    Ok(run)
}

/// An endpoint's secrets from a slice: exactly those its run spec names, each once and within
/// bounds.
fn secrets(files: Vec<pb::SecretFile>, run: &RunSpec) -> Result<Vec<SecretFile>, InvalidMessage> {
    let names: Vec<&String> = files.iter().map(|f| &f.name).collect();
    let wanted: Vec<&String> = run.secrets.iter().collect();
    let mut sorted = names.clone();
    sorted.sort();
    sorted.dedup();
    let mut expected = wanted.clone();
    expected.sort();
    if sorted.len() != names.len() || sorted != expected {
        return Err(InvalidMessage::Field("secrets"));
    }
    files
        .into_iter()
        .map(|f| {
            if f.data.len() > crate::model::MAX_SECRET_BYTES {
                return Err(InvalidMessage::Field("secret size"));
            }
            Ok(SecretFile { name: f.name, data: f.data })
        })
        .collect()
}

fn key_use(u: KeyUse) -> pb::KeyUse {
    match u {
        KeyUse::Next => pb::KeyUse::Next,
        KeyUse::Current => pb::KeyUse::Current,
        KeyUse::Previous => pb::KeyUse::Previous,
    }
}

impl From<&NodeSlice> for pb::NodeSlice {
    fn from(s: &NodeSlice) -> pb::NodeSlice {
        s.to_wire(None)
    }
}

impl SliceNetwork {
    /// The wire form, as the next message after one that carried `before` (this network as it
    /// was then, if it was there): the peers and services unchanged, or what changed in them
    /// when that is smaller than the whole, or the whole.
    fn to_wire(&self, before: Option<&SliceNetwork>) -> pb::SliceNetwork {
        let mut wire = pb::SliceNetwork {
            name: self.name.clone(),
            id: self.id,
            subnet: self.subnet.to_string(),
            encrypted: self.encrypted,
            wireguard: self.wireguard.is_some(),
            wireguard_generation: self.wireguard.unwrap_or(0),
            epochs: self
                .ring
                .iter()
                .map(|(u, e)| pb::KeyEpoch { epoch: *e, r#use: key_use(*u).into() })
                .collect(),
            ..Default::default()
        };
        self.pair_keys_to_wire(before, &mut wire);
        let delta = match before {
            Some(b) if b.peers == self.peers && b.services == self.services => {
                wire.membership_unchanged = true;
                return wire;
            }
            Some(b) => {
                let (peers, peers_gone) = changes(&b.peers, &self.peers, |p| p.address);
                let (services, services_gone) = changes(&b.services, &self.services, |r| r.name.as_str());
                let changed = peers.len() + peers_gone.len() + services.len() + services_gone.len();
                (changed < self.peers.len() + self.services.len()).then_some((
                    peers,
                    peers_gone,
                    services,
                    services_gone,
                ))
            }
            None => None,
        };
        match delta {
            Some((peers, peers_gone, services, services_gone)) => {
                wire.membership_delta = true;
                wire.peers = peers.into_iter().map(wire_peer).collect();
                wire.peers_gone = peers_gone.iter().map(ToString::to_string).collect();
                wire.services = services.into_iter().map(wire_service).collect();
                wire.services_gone = services_gone.iter().map(ToString::to_string).collect();
            }
            None => {
                wire.peers = self.peers.iter().map(wire_peer).collect();
                wire.services = self.services.iter().map(wire_service).collect();
            }
        }
        wire
    }
}

impl SliceNetwork {
    /// The pair keys on the wire: none when unchanged, what changed when that is smaller than
    /// the whole (a rotation: one new key per peer), else the whole.
    fn pair_keys_to_wire(&self, before: Option<&SliceNetwork>, wire: &mut pb::SliceNetwork) {
        let whole = |keys: &[PairKey]| keys.iter().map(wire_pair_key).collect::<Vec<_>>();
        let Some(before) = before else {
            wire.pair_keys = whole(&self.pair_keys);
            return;
        };
        if before.pair_keys == self.pair_keys {
            wire.pair_keys_delta = true;
            return;
        }
        let (changed, gone) = changes(&before.pair_keys, &self.pair_keys, |k| (k.peer, k.epoch));
        // Keys of epochs that left the ring need no listing: the reader drops them.
        let gone: Vec<(u32, u32)> =
            gone.into_iter().filter(|(_, e)| self.ring.iter().any(|(_, r)| r == e)).collect();
        if changed.len() + gone.len() < self.pair_keys.len() {
            wire.pair_keys_delta = true;
            wire.pair_keys = changed.into_iter().map(wire_pair_key).collect();
            wire.pair_keys_gone =
                gone.into_iter().map(|(peer, epoch)| pb::PairKeyRef { peer, epoch }).collect();
        } else {
            wire.pair_keys = whole(&self.pair_keys);
        }
    }
}

fn wire_pair_key(k: &PairKey) -> pb::PairKey {
    pb::PairKey { peer: k.peer, epoch: k.epoch, key: k.key.to_vec() }
}

/// What `after` has that `before` had not, or had otherwise, and the keys of what `before` had
/// and `after` has not. Both lists are in key order (as the manager makes them): one pass.
fn changes<'a, T: PartialEq, K: Ord>(
    before: &'a [T],
    after: &'a [T],
    key: impl Fn(&'a T) -> K,
) -> (Vec<&'a T>, Vec<K>) {
    let (mut changed, mut gone) = (Vec::new(), Vec::new());
    let (mut old, mut new) = (before.iter().peekable(), after.iter().peekable());
    loop {
        match (old.peek(), new.peek()) {
            (None, None) => break,
            (Some(o), Some(n)) if key(o) == key(n) => {
                if o != n {
                    changed.push(*n);
                }
                old.next();
                new.next();
            }
            (Some(o), Some(n)) if key(o) < key(n) => {
                gone.push(key(o));
                old.next();
            }
            (Some(o), None) => {
                gone.push(key(o));
                old.next();
            }
            (_, Some(n)) => {
                changed.push(*n);
                new.next();
            }
        }
    }
    (changed, gone)
}

/// `before` without the `gone` keys, with `changed` added or in place of what had their keys,
/// all in key order; `before` itself (shared) when nothing changed. One pass.
fn apply<T: Clone, K: Ord>(before: &Arc<[T]>, changed: &[T], gone: &[K], key: impl Fn(&T) -> K) -> Arc<[T]> {
    if changed.is_empty() && gone.is_empty() {
        return before.clone();
    }
    merged(before, changed, gone, key).into()
}

/// `before` without the `gone` keys, with `changed` added or in place of what had their keys,
/// all in key order. One pass.
fn merged<T: Clone, K: Ord>(before: &[T], changed: &[T], gone: &[K], key: impl Fn(&T) -> K) -> Vec<T> {
    let mut out = Vec::with_capacity(before.len() + changed.len());
    let mut changed = changed.iter().peekable();
    for t in before.iter() {
        let k = key(t);
        while let Some(c) = changed.next_if(|c| key(c) < k) {
            out.push(c.clone());
        }
        if let Some(c) = changed.next_if(|c| key(c) == k) {
            out.push(c.clone());
        } else if gone.binary_search(&k).is_err() {
            out.push(t.clone());
        }
    }
    out.extend(changed.cloned());
    out
}

fn wire_peer(p: &Peer) -> pb::Peer {
    pb::Peer {
        address: p.address.to_string(),
        node: p.node.to_string(),
        underlay: p.underlay.map(|u| u.to_string()).unwrap_or_default(),
        node_index: p.node_index,
        boot: p.boot.into(),
        wireguard: p.wireguard.map(|k| k.to_vec()).unwrap_or_default(),
    }
}

fn wire_service(r: &ServiceRecord) -> pb::ServiceRecord {
    pb::ServiceRecord {
        name: r.name.clone(),
        vip: r.vip.to_string(),
        ports: r.ports.iter().copied().map(pb::Port::from).collect(),
        endpoints: r.endpoints.iter().map(|a| a.to_string()).collect(),
    }
}

impl TryFrom<pb::NodeSlice> for NodeSlice {
    type Error = InvalidMessage;
    fn try_from(s: pb::NodeSlice) -> Result<NodeSlice, InvalidMessage> {
        let endpoints = s
            .endpoints
            .into_iter()
            .map(|e| {
                let addresses = e
                    .addresses
                    .into_iter()
                    .map(|a| Ok((a.network, ipv4(&a.address, "endpoint address")?)))
                    .collect::<Result<_, InvalidMessage>>()?;
                let run = checked(e.run)?;
                // It names the endpoint's namespace and the paths meshd makes and removes as root.
                if !crate::model::valid_name(&e.service) {
                    return Err(InvalidMessage::Field("endpoint service"));
                }
                Ok(LocalEndpoint {
                    service: e.service,
                    slot: e.slot,
                    addresses,
                    version: e.version,
                    signed: e
                        .signed
                        .map(|s| crate::specs::SignedSpec { document: s.document, signature: s.signature }),
                    command: Some(e.command).filter(|c| !c.is_empty()),
                    secrets: secrets(e.secrets, &run)?,
                    run,
                })
            })
            .collect::<Result<_, InvalidMessage>>()?;
        let networks = s
            .networks
            .into_iter()
            .map(|n| {
                let ring = n
                    .epochs
                    .iter()
                    .map(|k| {
                        let u = match pb::KeyUse::try_from(k.r#use) {
                            Ok(pb::KeyUse::Next) => KeyUse::Next,
                            Ok(pb::KeyUse::Current) => KeyUse::Current,
                            Ok(pb::KeyUse::Previous) => KeyUse::Previous,
                            _ => return Err(InvalidMessage::Field("key use")),
                        };
                        Ok((u, k.epoch))
                    })
                    .collect::<Result<_, InvalidMessage>>()?;
                let mut pair_keys: Vec<PairKey> = n
                    .pair_keys
                    .into_iter()
                    .map(|k| {
                        let key: [u8; KEY_LEN] =
                            k.key.try_into().map_err(|_| InvalidMessage::Field("pair key"))?;
                        Ok(PairKey { peer: k.peer, epoch: k.epoch, key })
                    })
                    .collect::<Result<_, InvalidMessage>>()?;
                pair_keys.sort_by_key(|k| (k.peer, k.epoch));
                if pair_keys.windows(2).any(|w| (w[0].peer, w[0].epoch) == (w[1].peer, w[1].epoch)) {
                    return Err(InvalidMessage::Field("pair keys: two for one peer and epoch"));
                }
                let peers = n
                    .peers
                    .into_iter()
                    .map(|p| {
                        Ok(Peer {
                            address: ipv4(&p.address, "peer address")?,
                            node: p.node.parse()?,
                            underlay: if p.underlay.is_empty() {
                                None
                            } else {
                                Some(p.underlay.parse().map_err(|_| InvalidMessage::Field("underlay"))?)
                            },
                            node_index: p.node_index,
                            boot: u16::try_from(p.boot).map_err(|_| InvalidMessage::Field("boot"))?,
                            wireguard: match p.wireguard.len() {
                                0 => None,
                                _ => Some(
                                    p.wireguard
                                        .try_into()
                                        .map_err(|_| InvalidMessage::Field("wireguard public key"))?,
                                ),
                            },
                        })
                    })
                    .collect::<Result<_, InvalidMessage>>()?;
                let services = n
                    .services
                    .into_iter()
                    .map(|r| {
                        Ok(ServiceRecord {
                            name: r.name,
                            vip: ipv4(&r.vip, "vip")?,
                            ports: r.ports.into_iter().map(PortSpec::try_from).collect::<Result<_, _>>()?,
                            endpoints: r
                                .endpoints
                                .iter()
                                .map(|a| ipv4(a, "service endpoint"))
                                .collect::<Result<_, _>>()?,
                        })
                    })
                    .collect::<Result<_, InvalidMessage>>()?;
                Ok(SliceNetwork {
                    name: n.name,
                    id: n.id,
                    subnet: n.subnet.parse().map_err(|_| InvalidMessage::Field("subnet"))?,
                    encrypted: n.encrypted,
                    wireguard: n.wireguard.then_some(n.wireguard_generation),
                    ring,
                    pair_keys,
                    peers,
                    services,
                })
            })
            .collect::<Result<_, InvalidMessage>>()?;
        let policy =
            (s.policy_version > 0).then_some(NodePolicy { version: s.policy_version, text: s.policy });
        let port =
            |p: u32, what| u16::try_from(p).ok().filter(|p| *p != 0).ok_or(InvalidMessage::Field(what));
        let tcp_or_http = |p: &str| match p {
            "tcp" => Ok(Protocol::Tcp),
            "http" => Ok(Protocol::Http),
            _ => Err(InvalidMessage::Field("published protocol")),
        };
        let published = s
            .published
            .into_iter()
            .map(|p| {
                Ok(PublishedPort {
                    port: port(p.port, "published port")?,
                    target: port(p.target, "published target")?,
                    protocol: tcp_or_http(&p.protocol)?,
                    endpoints: p
                        .endpoints
                        .iter()
                        .map(|t| {
                            Ok(IngressTarget {
                                address: ipv4(&t.address, "ingress target")?,
                                node: t.node.parse()?,
                                mesh: t
                                    .mesh
                                    .parse()
                                    .map_err(|_| InvalidMessage::Field("ingress mesh port"))?,
                            })
                        })
                        .collect::<Result<_, InvalidMessage>>()?,
                    service: p.service,
                })
            })
            .collect::<Result<_, InvalidMessage>>()?;
        let ingress = s
            .ingress
            .into_iter()
            .map(|a| {
                Ok(IngressAdmission {
                    target: port(a.target, "ingress target port")?,
                    protocol: tcp_or_http(&a.protocol)?,
                    nodes: a.nodes.iter().map(|n| n.parse()).collect::<Result<_, _>>()?,
                    service: a.service,
                })
            })
            .collect::<Result<_, InvalidMessage>>()?;
        Ok(NodeSlice {
            version: s.version,
            node: s.node_id.parse()?,
            endpoints,
            networks,
            policy,
            node_index: s.node_index,
            visibility: s
                .visibility
                .into_iter()
                .map(|v| (v.service, v.reachable.into_iter().collect()))
                .collect(),
            removed_nodes: s.removed_nodes.iter().map(|n| n.parse()).collect::<Result<_, _>>()?,
            managers: s.managers,
            manager_ids: s.manager_ids,
            trust_pem: s.trust_pem,
            cross_pem: s.cross_pem,
            published,
            ingress,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn network(name: &str, epoch: u32, peers: usize) -> SliceNetwork {
        SliceNetwork {
            name: name.into(),
            id: 7,
            subnet: "10.9.0.0/16".parse().unwrap(),
            encrypted: true,
            wireguard: None,
            ring: vec![(KeyUse::Next, epoch + 1), (KeyUse::Current, epoch)],
            pair_keys: pair_keys(peers as u32, epoch),
            peers: (0..peers)
                .map(|i| Peer {
                    address: Ipv4Addr::new(10, 9, 0, i as u8 + 2),
                    node: NodeId::random(),
                    underlay: Some(SocketAddr::from(([192, 0, 2, i as u8], 4789))),
                    node_index: i as u32,
                    boot: 1,
                    wireguard: None,
                })
                .collect(),
            services: vec![ServiceRecord {
                name: "web".into(),
                vip: Ipv4Addr::new(10, 9, 0, 1),
                ports: vec![PortSpec { port: 80, protocol: Protocol::Http }],
                endpoints: vec![Ipv4Addr::new(10, 9, 0, 2)],
            }]
            .into(),
        }
    }

    /// Keys for peers `0..peers`, epochs `epoch` and `epoch + 1`, in (peer, epoch) order.
    fn pair_keys(peers: u32, epoch: u32) -> Vec<PairKey> {
        (0..peers)
            .flat_map(|peer| {
                [epoch, epoch + 1].map(|epoch| PairKey {
                    peer,
                    epoch,
                    key: [(peer * 7 + epoch) as u8; KEY_LEN],
                })
            })
            .collect()
    }

    fn slice(version: u64, networks: Vec<SliceNetwork>) -> NodeSlice {
        NodeSlice {
            version,
            node: NodeId::random(),
            endpoints: Vec::new(),
            networks,
            policy: Some(NodePolicy { version: 3, text: "default = \"deny\"\n".into() }),
            node_index: 1,
            visibility: BTreeMap::new(),
            removed_nodes: vec![NodeId::random()],
            managers: vec!["10.0.0.1:7400".into()],
            manager_ids: vec!["m1".into()],
            trust_pem: "roots".into(),
            cross_pem: String::new(),
            published: vec![PublishedPort {
                service: "web".into(),
                port: 8080,
                target: 80,
                protocol: Protocol::Http,
                endpoints: vec![IngressTarget {
                    address: Ipv4Addr::new(10, 9, 0, 2),
                    node: NodeId::random(),
                    mesh: SocketAddr::from(([192, 0, 2, 1], 4800)),
                }],
            }],
            ingress: vec![IngressAdmission {
                service: "web".into(),
                target: 80,
                protocol: Protocol::Http,
                nodes: [NodeId::random()].into(),
            }],
        }
    }

    /// Sends `slices` as one session would and reads them as meshd does.
    fn through_a_session(slices: &[NodeSlice]) -> (Vec<pb::NodeSlice>, Vec<NodeSlice>) {
        let (mut sent, mut read) = (Vec::new(), Vec::new());
        for (i, s) in slices.iter().enumerate() {
            let wire = s.to_wire(i.checked_sub(1).map(|p| &slices[p]));
            read.push(NodeSlice::from_wire(wire.clone(), read.last()).unwrap());
            sent.push(wire);
        }
        (sent, read)
    }

    #[test]
    fn a_rotation_sends_the_keys_and_not_the_network() {
        let first = slice(1, vec![network("front", 1, 200), network("back", 1, 3)]);
        let mut rotated = first.clone();
        rotated.version = 2;
        rotated.networks[0].ring = vec![(KeyUse::Next, 3), (KeyUse::Current, 2), (KeyUse::Previous, 1)];
        rotated.networks[0].pair_keys = {
            let mut keys = pair_keys(200, 1);
            keys.extend(pair_keys(200, 2).into_iter().filter(|k| k.epoch == 3));
            keys.sort_by_key(|k| (k.peer, k.epoch));
            keys
        };
        let (sent, read) = through_a_session(&[first.clone(), rotated.clone()]);
        assert_eq!(read, [first.clone(), rotated.clone()], "the node ends up with the whole slices");
        assert_eq!(sent[0].networks[0].peers.len(), 200, "a session's first message is whole");
        let delta = &sent[1];
        assert!(delta.networks.iter().all(|n| n.membership_unchanged && n.peers.is_empty()));
        assert!(delta.removed_nodes_unchanged && delta.removed_nodes.is_empty());
        assert!(delta.policy_unchanged && delta.policy.is_empty());
        let front = &delta.networks[0];
        assert_eq!(front.epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(), [3, 2, 1]);
        assert!(front.pair_keys_delta && front.pair_keys_gone.is_empty());
        assert_eq!(front.pair_keys.len(), 200, "only the new next key of each pair");
        assert!(front.pair_keys.iter().all(|k| k.epoch == 3));
        // A key is 37 bytes on the wire, a peer about as much again: a rotation costs the new keys.
        use prost::Message;
        assert!(delta.encoded_len() < 200 * 45, "{} bytes", delta.encoded_len());
        assert!(delta.encoded_len() * 3 < sent[0].encoded_len(), "{} bytes", delta.encoded_len());
        // The next rotation drops epoch 1 without listing it.
        let mut again = rotated.clone();
        again.version = 3;
        again.networks[0].ring = vec![(KeyUse::Next, 4), (KeyUse::Current, 3), (KeyUse::Previous, 2)];
        again.networks[0].pair_keys = {
            let mut keys = pair_keys(200, 2);
            keys.extend(pair_keys(200, 3).into_iter().filter(|k| k.epoch == 4));
            keys.sort_by_key(|k| (k.peer, k.epoch));
            keys
        };
        let (sent, read) = through_a_session(&[rotated.clone(), again.clone()]);
        assert_eq!(read[1], again);
        assert!(sent[1].networks[0].pair_keys_gone.is_empty() && sent[1].networks[0].pair_keys.len() == 200);
    }

    #[test]
    fn changed_sections_are_sent_whole_or_as_what_changed() {
        let first = slice(1, vec![network("front", 1, 5)]);
        let mut second = first.clone();
        second.version = 2;
        // Of front: one peer gone, one moved to another underlay, one new service.
        let mut peers = second.networks[0].peers[1..].to_vec();
        peers[0].underlay = Some(SocketAddr::from(([198, 51, 100, 7], 4789)));
        second.networks[0].peers = peers.into();
        let mut services = second.networks[0].services.to_vec();
        services.push(ServiceRecord {
            name: "api".into(),
            vip: Ipv4Addr::new(10, 9, 0, 9),
            ports: vec![],
            endpoints: vec![],
        });
        services.sort_by(|a, b| a.name.cmp(&b.name));
        second.networks[0].services = services.into();
        second.networks.push(network("back", 1, 2));
        second.policy = Some(NodePolicy { version: 4, text: "default = \"allow\"\n".into() });
        second.removed_nodes.push(NodeId::random());
        let (sent, read) = through_a_session(&[first.clone(), second.clone()]);
        assert_eq!(read[1], second, "the node ends up with the whole slice");
        let delta = &sent[1];
        let front = &delta.networks[0];
        assert!(front.membership_delta && !front.membership_unchanged);
        assert_eq!(front.peers.len(), 1, "only the moved peer");
        assert_eq!(front.peers[0].underlay, "198.51.100.7:4789");
        assert_eq!(front.peers_gone, [first.networks[0].peers[0].address.to_string()]);
        assert_eq!(front.services.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(), ["api"]);
        assert!(front.services_gone.is_empty());
        let back = &delta.networks[1];
        assert!(!back.membership_delta && !back.membership_unchanged && back.peers.len() == 2, "new: whole");
        assert!(!delta.removed_nodes_unchanged && !delta.policy_unchanged);
        // When most of it changed, the whole is sent.
        let mut third = second.clone();
        third.version = 3;
        third.networks[1] = network("back", 1, 2);
        let renamed = ServiceRecord { name: "db".into(), ..third.networks[1].services[0].clone() };
        third.networks[1].services = vec![renamed].into();
        let (sent, read) = through_a_session(&[second.clone(), third.clone()]);
        assert_eq!(read[1], third);
        assert!(!sent[1].networks[1].membership_delta && sent[1].networks[1].peers.len() == 2);
        // A section that goes away is not "unchanged": the policy withdrawn reads as none.
        let mut fourth = third.clone();
        fourth.version = 4;
        fourth.policy = None;
        let (_, read) = through_a_session(&[third, fourth.clone()]);
        assert_eq!(read[1].policy, None);
    }

    #[test]
    fn an_unchanged_section_without_an_earlier_slice_is_refused() {
        let first = slice(1, vec![network("front", 1, 5)]);
        let mut second = first.clone();
        second.version = 2;
        let delta = second.to_wire(Some(&first));
        assert!(matches!(NodeSlice::from_wire(delta.clone(), None), Err(InvalidMessage::Field(_))));
        // Nor against an earlier slice without that network.
        let other = slice(1, vec![network("other", 1, 1)]);
        assert!(NodeSlice::from_wire(delta, Some(&other)).is_err());
    }

    fn endpoint(service: &str, run: RunSpec, secrets: Vec<SecretFile>) -> LocalEndpoint {
        let addresses = BTreeMap::from([("front".to_owned(), Ipv4Addr::new(10, 9, 0, 2))]);
        LocalEndpoint {
            service: service.into(),
            slot: 1,
            addresses,
            version: 1,
            signed: None,
            command: Some("true".into()),
            run,
            secrets,
        }
    }

    /// What a compromised manager might send a node about its endpoints: refused whole.
    #[test]
    fn an_endpoint_a_node_could_not_run_safely_is_refused() {
        let secret = |name: &str| SecretFile { name: name.into(), data: b"x".to_vec() };
        let reads = |names: &[&str]| RunSpec {
            secrets: names.iter().map(|n| n.to_string()).collect(),
            ..RunSpec::default()
        };
        let cases = [
            ("a name that climbs out of paths", endpoint("a-0/../../../lib", RunSpec::default(), vec![])),
            ("an empty name", endpoint("", RunSpec::default(), vec![])),
            ("root", endpoint("api", RunSpec { user: "0:0".into(), ..RunSpec::default() }, vec![])),
            (
                "a writable path with ..",
                endpoint(
                    "api",
                    RunSpec { writable: vec!["/srv/../etc".into()], ..RunSpec::default() },
                    vec![],
                ),
            ),
            ("a secret it does not read", endpoint("api", reads(&[]), vec![secret("other")])),
            ("a secret twice", endpoint("api", reads(&["a"]), vec![secret("a"), secret("a")])),
            ("a secret missing", endpoint("api", reads(&["a", "b"]), vec![secret("a")])),
            ("a secret named a path", endpoint("api", reads(&["../x"]), vec![secret("../x")])),
        ];
        for (what, e) in cases {
            let mut s = slice(1, vec![network("front", 1, 2)]);
            s.endpoints = vec![e];
            assert!(NodeSlice::from_wire(s.to_wire(None), None).is_err(), "{what} accepted");
        }
        let mut fine = slice(1, vec![network("front", 1, 2)]);
        fine.endpoints = vec![endpoint("api", reads(&["a"]), vec![secret("a")])];
        assert_eq!(NodeSlice::from_wire(fine.to_wire(None), None).unwrap().endpoints, fine.endpoints);
    }

    proptest::proptest! {
        /// Whatever a session's slices are, each message read against the one before gives the
        /// whole slice back.
        #[test]
        fn any_sequence_of_slices_reads_back_whole(
            steps in proptest::collection::vec(
                (
                    proptest::collection::btree_map(0u8..40, 0u8..3, 0..30),
                    proptest::collection::btree_map("[a-e]", 0u8..3, 0..5),
                    1u32..5,
                    proptest::collection::btree_map((0u32..6, 0u32..7), proptest::prelude::any::<u8>(), 0..30),
                ),
                1..6,
            )
        ) {
            let nodes: Vec<NodeId> = (0..3).map(|_| NodeId::random()).collect();
            let mut base = slice(0, vec![network("front", 1, 0)]);
            let slices: Vec<NodeSlice> = steps
                .iter()
                .enumerate()
                .map(|(i, (peers, services, epoch, keys))| {
                    base.version = i as u64 + 1;
                    let net = &mut base.networks[0];
                    net.peers = peers
                        .iter()
                        .map(|(host, n)| Peer {
                            address: Ipv4Addr::new(10, 9, 1, *host),
                            node: nodes[*n as usize].clone(),
                            underlay: Some(SocketAddr::from(([192, 0, 2, *n], 4789))),
                            node_index: u32::from(*n),
                            boot: u16::from(*n),
                            wireguard: None,
                        })
                        .collect();
                    net.services = services
                        .iter()
                        .map(|(name, port)| ServiceRecord {
                            name: name.clone(),
                            vip: Ipv4Addr::new(10, 9, 0, 1),
                            ports: vec![PortSpec { port: 80 + u16::from(*port), protocol: Protocol::Tcp }],
                            endpoints: vec![],
                        })
                        .collect();
                    net.ring = vec![(KeyUse::Next, epoch + 1), (KeyUse::Current, *epoch), (KeyUse::Previous, epoch - 1)];
                    // Only keys of the ring's epochs, as the manager sends.
                    net.pair_keys = keys
                        .iter()
                        .filter(|((_, e), _)| e + 1 >= *epoch && *e <= epoch + 1)
                        .map(|((peer, e), b)| PairKey { peer: *peer, epoch: *e, key: [*b; KEY_LEN] })
                        .collect();
                    base.clone()
                })
                .collect();
            let (_, read) = through_a_session(&slices);
            proptest::prop_assert_eq!(read, slices);
        }
    }
}
