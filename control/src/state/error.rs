//! Why a command was refused.

use std::net::Ipv4Addr;

use ipnet::Ipv4Net;
use mesh_api::ids::NodeId;
use serde::{Deserialize, Serialize};

/// Why a command was refused. The state is unchanged.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StateError {
    #[error("no node with ID {0}")]
    UnknownNode(NodeId),
    #[error("a root CA rotation is under way already; `meshctl cluster ca` shows its progress")]
    CaRotating,
    #[error("no root CA rotation is under way")]
    NoCaRotation,
    #[error("the cluster has no root CA yet")]
    NoCa,
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
    #[error("WireGuard key refused: {0}")]
    Wireguard(String),
    #[error(
        "node {id} reports boot number {boot}, but it already ran boot {recorded}: its state \
         directory was restored or copied, which would repeat nonces; join the node again"
    )]
    BootRollback { id: NodeId, boot: u16, recorded: u16 },
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
    #[error("{setting} {value} is out of range: it must be between {min} and {max}")]
    Setting { setting: String, value: String, min: String, max: String },
    #[error("no admin credential with serial {0}")]
    UnknownAdmin(String),
    #[error("serial {0} is the last admin credential: issue another first (meshctl cluster admin issue)")]
    LastAdmin(String),
    #[error("a secret named `{0}` already exists (secrets never change: create one under a new name)")]
    SecretExists(String),
    #[error("no secret named `{0}`")]
    UnknownSecret(String),
    #[error("secret `{0}`: a name of 1-64 of a-z, A-Z, 0-9, `.`, `_`, `-`, and at most 64 KiB")]
    BadSecret(String),
    #[error("secret `{name}` is read by {services}: remove it from them first")]
    SecretInUse { name: String, services: String },
    #[error("service `{service}` has two endpoints on node {node}")]
    TwoEndpointsOnNode { service: String, node: NodeId },
    #[error("endpoint {service}.{slot} runs version {version}, which the service does not keep")]
    UnknownVersion { service: String, slot: u32, version: u64 },
}
