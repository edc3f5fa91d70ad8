//! A node's slice of the cluster: everything one node may know, and nothing more. Computed by
//! control's dispatcher, sent over the node's session, held by meshd. The wire form is
//! `pb::NodeSlice`; this is the domain form, converted at the edge.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use serde::Serialize;

use crate::ids::NodeId;
use crate::keys::{KEY_LEN, KeyUse, NetworkKey};
use crate::proto::{InvalidMessage, ipv4, pb};
use crate::state::{PortSpec, Protocol};

/// One of this node's endpoints.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LocalEndpoint {
    pub service: String,
    pub slot: u32,
    /// Network name -> this endpoint's address on it.
    pub addresses: BTreeMap<String, Ipv4Addr>,
    pub command: Option<String>,
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
    #[serde(skip)]
    pub keys: Vec<(KeyUse, NetworkKey)>,
    pub peers: Vec<Peer>,
    pub services: Vec<ServiceRecord>,
}

impl std::fmt::Debug for SliceNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SliceNetwork")
            .field("name", &self.name)
            .field("id", &self.id)
            .field("subnet", &self.subnet)
            .field("encrypted", &self.encrypted)
            .field("keys", &self.keys)
            .field("peers", &self.peers)
            .field("services", &self.services)
            .finish()
    }
}

impl SliceNetwork {
    /// Epochs of the keys held, by use (never the key bytes).
    pub fn epochs(&self) -> Vec<(KeyUse, u32)> {
        self.keys.iter().map(|(u, k)| (*u, k.epoch)).collect()
    }
}

/// The policy rules a node enforces: those whose destination it hosts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodePolicy {
    pub version: u64,
    /// The rules, in the policy language.
    pub text: String,
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
}

impl NodeSlice {
    /// Whether two slices carry the same content, whatever their versions.
    pub fn same_content(&self, other: &NodeSlice) -> bool {
        self.node == other.node
            && self.endpoints == other.endpoints
            && self.networks == other.networks
            && self.policy == other.policy
            && self.visibility == other.visibility
            && self.removed_nodes == other.removed_nodes
            && self.managers == other.managers
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

fn key_use(u: KeyUse) -> pb::KeyUse {
    match u {
        KeyUse::Next => pb::KeyUse::Next,
        KeyUse::Current => pb::KeyUse::Current,
        KeyUse::Previous => pb::KeyUse::Previous,
    }
}

impl From<&NodeSlice> for pb::NodeSlice {
    fn from(s: &NodeSlice) -> pb::NodeSlice {
        pb::NodeSlice {
            visibility: s
                .visibility
                .iter()
                .map(|(service, reachable)| pb::ServiceVisibility {
                    service: service.clone(),
                    reachable: reachable.iter().cloned().collect(),
                })
                .collect(),
            node_index: s.node_index,
            removed_nodes: s.removed_nodes.iter().map(ToString::to_string).collect(),
            managers: s.managers.clone(),
            policy_version: s.policy.as_ref().map_or(0, |p| p.version),
            policy: s.policy.as_ref().map(|p| p.text.clone()).unwrap_or_default(),
            version: s.version,
            node_id: s.node.to_string(),
            endpoints: s
                .endpoints
                .iter()
                .map(|e| pb::Endpoint {
                    service: e.service.clone(),
                    slot: e.slot,
                    node: s.node.to_string(),
                    addresses: e
                        .addresses
                        .iter()
                        .map(|(n, a)| pb::EndpointAddress { network: n.clone(), address: a.to_string() })
                        .collect(),
                    command: e.command.clone().unwrap_or_default(),
                })
                .collect(),
            networks: s
                .networks
                .iter()
                .map(|n| pb::SliceNetwork {
                    name: n.name.clone(),
                    id: n.id,
                    subnet: n.subnet.to_string(),
                    encrypted: n.encrypted,
                    keys: n
                        .keys
                        .iter()
                        .map(|(u, k)| pb::NetworkKey {
                            epoch: k.epoch,
                            key: k.key.to_vec(),
                            r#use: key_use(*u).into(),
                        })
                        .collect(),
                    peers: n
                        .peers
                        .iter()
                        .map(|p| pb::Peer {
                            address: p.address.to_string(),
                            node: p.node.to_string(),
                            underlay: p.underlay.map(|u| u.to_string()).unwrap_or_default(),
                            node_index: p.node_index,
                        })
                        .collect(),
                    services: n
                        .services
                        .iter()
                        .map(|r| pb::ServiceRecord {
                            name: r.name.clone(),
                            vip: r.vip.to_string(),
                            ports: r.ports.iter().copied().map(pb::Port::from).collect(),
                            endpoints: r.endpoints.iter().map(|a| a.to_string()).collect(),
                        })
                        .collect(),
                })
                .collect(),
        }
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
                Ok(LocalEndpoint {
                    service: e.service,
                    slot: e.slot,
                    addresses,
                    command: Some(e.command).filter(|c| !c.is_empty()),
                })
            })
            .collect::<Result<_, InvalidMessage>>()?;
        let networks = s
            .networks
            .into_iter()
            .map(|n| {
                let keys = n
                    .keys
                    .into_iter()
                    .map(|k| {
                        let u = match pb::KeyUse::try_from(k.r#use) {
                            Ok(pb::KeyUse::Next) => KeyUse::Next,
                            Ok(pb::KeyUse::Current) => KeyUse::Current,
                            Ok(pb::KeyUse::Previous) => KeyUse::Previous,
                            _ => return Err(InvalidMessage::Field("key use")),
                        };
                        let key: [u8; KEY_LEN] =
                            k.key.try_into().map_err(|_| InvalidMessage::Field("key"))?;
                        Ok((u, NetworkKey { epoch: k.epoch, key }))
                    })
                    .collect::<Result<_, InvalidMessage>>()?;
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
                    keys,
                    peers,
                    services,
                })
            })
            .collect::<Result<_, InvalidMessage>>()?;
        let policy =
            (s.policy_version > 0).then_some(NodePolicy { version: s.policy_version, text: s.policy });
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
        })
    }
}
