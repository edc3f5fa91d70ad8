//! The gRPC wire types (generated from `proto/mesh.proto`) and their conversions to and from the
//! domain types. Nothing outside this module and the API edges uses the generated types.

use time::OffsetDateTime;

use crate::ids::{InvalidId, NodeId};
use crate::model::NodeState;
use crate::tokens::Role;

#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("mesh.v1");
}

/// A wire message with a missing or malformed field.
#[derive(Debug, thiserror::Error)]
pub enum InvalidMessage {
    #[error("field `{0}` is missing or unspecified")]
    Missing(&'static str),
    #[error("field `{0}` is malformed")]
    Field(&'static str),
    #[error(transparent)]
    Id(#[from] InvalidId),
}

impl From<Role> for pb::Role {
    fn from(role: Role) -> pb::Role {
        match role {
            Role::Worker => pb::Role::Worker,
            Role::Manager => pb::Role::Manager,
        }
    }
}

impl TryFrom<pb::Role> for Role {
    type Error = InvalidMessage;
    fn try_from(role: pb::Role) -> Result<Role, InvalidMessage> {
        match role {
            pb::Role::Worker => Ok(Role::Worker),
            pb::Role::Manager => Ok(Role::Manager),
            pb::Role::Unspecified => Err(InvalidMessage::Missing("role")),
        }
    }
}

impl From<NodeState> for pb::NodeState {
    fn from(state: NodeState) -> pb::NodeState {
        match state {
            NodeState::Active => pb::NodeState::Active,
            NodeState::Removed => pb::NodeState::Removed,
        }
    }
}

impl TryFrom<pb::NodeState> for NodeState {
    type Error = InvalidMessage;
    fn try_from(state: pb::NodeState) -> Result<NodeState, InvalidMessage> {
        match state {
            pb::NodeState::Active => Ok(NodeState::Active),
            pb::NodeState::Removed => Ok(NodeState::Removed),
            pb::NodeState::Unspecified => Err(InvalidMessage::Missing("state")),
        }
    }
}

/// A node as an admin sees it: the stored record and when control last heard from it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NodeView {
    pub id: NodeId,
    pub hostname: String,
    pub role: Role,
    pub state: NodeState,
    #[serde(with = "time::serde::rfc3339::option")]
    pub cert_not_after: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub joined_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_seen: Option<OffsetDateTime>,
    pub connected: bool,
    pub labels: Vec<String>,
    /// Managers only: leader, reachable or unreachable (and whether it votes).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manager_status: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control: Option<String>,
}

fn unix(t: i64) -> Option<OffsetDateTime> {
    (t > 0).then(|| OffsetDateTime::from_unix_timestamp(t).ok()).flatten()
}

impl TryFrom<pb::Node> for NodeView {
    type Error = InvalidMessage;
    fn try_from(node: pb::Node) -> Result<NodeView, InvalidMessage> {
        Ok(NodeView {
            id: node.id.parse()?,
            hostname: node.hostname,
            role: pb::Role::try_from(node.role).unwrap_or(pb::Role::Unspecified).try_into()?,
            state: pb::NodeState::try_from(node.state).unwrap_or(pb::NodeState::Unspecified).try_into()?,
            cert_not_after: unix(node.cert_not_after),
            joined_at: unix(node.joined_at),
            last_seen: unix(node.last_seen),
            connected: node.connected,
            labels: node.labels,
            manager_status: Some(node.manager_status).filter(|s| !s.is_empty()),
            control: Some(node.control).filter(|s| !s.is_empty()),
        })
    }
}

/// A network as an admin sees it (no key bytes, ever).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NetworkView {
    pub name: String,
    pub id: u32,
    pub subnet: ipnet::Ipv4Net,
    pub encrypted: bool,
    pub transport: crate::model::Transport,
    pub key_epoch: Option<u32>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub rotated_at: Option<OffsetDateTime>,
    pub endpoints: u32,
    pub nodes: Vec<NodeId>,
}

impl TryFrom<pb::Network> for NetworkView {
    type Error = InvalidMessage;
    fn try_from(n: pb::Network) -> Result<NetworkView, InvalidMessage> {
        Ok(NetworkView {
            name: n.name,
            id: n.id,
            subnet: n.subnet.parse().map_err(|_| InvalidMessage::Field("subnet"))?,
            encrypted: n.encrypted,
            transport: if n.transport.is_empty() {
                if n.encrypted { crate::model::Transport::AesGcm } else { crate::model::Transport::None }
            } else {
                n.transport.parse().map_err(|_| InvalidMessage::Field("transport"))?
            },
            key_epoch: n.encrypted.then_some(n.current_epoch),
            rotated_at: unix(n.rotated_at),
            endpoints: n.endpoints,
            nodes: n.nodes.iter().map(|s| s.parse()).collect::<Result<_, _>>()?,
        })
    }
}

/// One endpoint of a service, as an admin sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EndpointView {
    pub slot: u32,
    pub node: NodeId,
    pub addresses: std::collections::BTreeMap<String, std::net::Ipv4Addr>,
    /// The version of the service's definition it is given.
    pub version: u64,
}

/// What an update request changes of the service's command and how it runs.
impl From<&pb::UpdateServiceRequest> for crate::model::DefinitionChange {
    fn from(req: &pb::UpdateServiceRequest) -> crate::model::DefinitionChange {
        crate::model::DefinitionChange {
            command: req.command.clone(),
            env_add: req.env_add.clone(),
            env_rm: req.env_rm.clone(),
            user: req.user.clone(),
            secret_add: req.secret_add.clone(),
            secret_rm: req.secret_rm.clone(),
            cpu_millis: req.cpu_millis,
            memory_bytes: req.memory_bytes,
        }
    }
}

/// A service's last rolling update, as an admin sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct RolloutView {
    /// updating, paused or completed.
    pub state: String,
    /// Why it paused; for a rollback a failed update started, how that update failed.
    pub message: Option<String>,
    pub rollback: bool,
    /// Endpoints at the service's version, of all its endpoints.
    pub updated: u32,
    pub total: u32,
    pub parallelism: u32,
    pub delay_secs: u64,
    pub monitor_secs: u64,
    pub on_failure: String,
    pub started_at: i64,
}

impl From<pb::Rollout> for RolloutView {
    fn from(r: pb::Rollout) -> RolloutView {
        RolloutView {
            state: r.state,
            message: Some(r.message).filter(|m| !m.is_empty()),
            rollback: r.rollback,
            updated: r.updated,
            total: r.total,
            parallelism: r.parallelism,
            delay_secs: r.delay_secs,
            monitor_secs: r.monitor_secs,
            on_failure: r.on_failure,
            started_at: r.started_at,
        }
    }
}

/// A service as an admin sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ServiceView {
    pub name: String,
    pub networks: Vec<String>,
    pub ports: Vec<String>,
    /// Its published ports (MODE:PUBLISHED:TARGET/PROTOCOL) and the nodes that publish them.
    pub publish: Vec<String>,
    pub publish_nodes: Vec<crate::ids::NodeId>,
    pub replicas: u32,
    pub constraints: Vec<String>,
    pub command: Option<String>,
    /// How the command runs: environment, secrets (by name), user, confinement.
    pub run: crate::model::RunSpec,
    pub vips: std::collections::BTreeMap<String, std::net::Ipv4Addr>,
    pub endpoints: Vec<EndpointView>,
    /// Endpoints their nodes report running (or ready, without a command).
    pub running: u32,
    /// The version of its command and how it runs; the one a rollback returns to.
    pub version: u64,
    pub previous: Option<u64>,
    pub rollout: Option<RolloutView>,
    /// Whether the operator signed the current version's spec, and that signed spec.
    pub signed: bool,
    #[serde(skip)]
    pub spec: Option<crate::specs::SignedSpec>,
}

/// What one endpoint wrote, as `service logs` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EndpointLogsView {
    pub slot: u32,
    pub node: crate::ids::NodeId,
    pub lines: Vec<crate::model::LogLine>,
    /// Why its lines could not be fetched.
    pub error: Option<String>,
}

impl TryFrom<pb::EndpointLogs> for EndpointLogsView {
    type Error = InvalidMessage;
    fn try_from(e: pb::EndpointLogs) -> Result<EndpointLogsView, InvalidMessage> {
        Ok(EndpointLogsView {
            slot: e.slot,
            node: e.node.parse()?,
            lines: e.lines.into_iter().map(Into::into).collect(),
            error: Some(e.error).filter(|t| !t.is_empty()),
        })
    }
}

/// One endpoint as `service ps` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct EndpointPsView {
    pub slot: u32,
    pub node: crate::ids::NodeId,
    pub hostname: String,
    pub addresses: std::collections::BTreeMap<String, std::net::Ipv4Addr>,
    /// starting, running, restarting, failed, ready, or pending (nothing reported yet).
    pub state: String,
    pub restarts: u32,
    /// Unix seconds; 0 when nothing was reported.
    pub since: i64,
    pub last_exit: Option<String>,
    /// The version the service gives it, and the one its node reports running.
    pub version: u64,
    pub running_version: u64,
}

impl TryFrom<pb::EndpointPs> for EndpointPsView {
    type Error = InvalidMessage;
    fn try_from(e: pb::EndpointPs) -> Result<EndpointPsView, InvalidMessage> {
        Ok(EndpointPsView {
            slot: e.slot,
            node: e.node.parse()?,
            hostname: e.hostname,
            addresses: e
                .addresses
                .into_iter()
                .map(|a| Ok((a.network, ipv4(&a.address, "endpoint address")?)))
                .collect::<Result<_, InvalidMessage>>()?,
            state: e.state,
            restarts: e.restarts,
            since: e.since,
            last_exit: Some(e.last_exit).filter(|t| !t.is_empty()),
            version: e.version,
            running_version: e.running_version,
        })
    }
}

/// A published port on one node, as `service ps` shows it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PublishedPsView {
    /// MODE:PUBLISHED:TARGET/PROTOCOL.
    pub publish: String,
    pub port: u16,
    pub node: crate::ids::NodeId,
    pub hostname: String,
    /// listening, failed, or pending (the node has not reported it yet).
    pub state: String,
    /// Why it is not listening.
    pub error: Option<String>,
}

impl TryFrom<pb::PublishedPs> for PublishedPsView {
    type Error = InvalidMessage;
    fn try_from(p: pb::PublishedPs) -> Result<PublishedPsView, InvalidMessage> {
        Ok(PublishedPsView {
            publish: p.publish,
            port: u16::try_from(p.port).map_err(|_| InvalidMessage::Field("published port"))?,
            node: p.node.parse()?,
            hostname: p.hostname,
            state: p.state,
            error: Some(p.error).filter(|e| !e.is_empty()),
        })
    }
}

/// A secret as an admin sees it: never its bytes.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SecretView {
    pub name: String,
    /// SHA-256 of the bytes, hex.
    pub digest: String,
    pub size: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// The services that read it.
    pub services: Vec<String>,
}

impl TryFrom<pb::SecretInfo> for SecretView {
    type Error = InvalidMessage;
    fn try_from(s: pb::SecretInfo) -> Result<SecretView, InvalidMessage> {
        Ok(SecretView {
            name: s.name,
            digest: s.digest,
            size: s.size,
            created_at: s.created_at,
            services: s.services,
        })
    }
}

/// An IPv4 address from a wire field, or an error naming the field.
pub fn ipv4(s: &str, field: &'static str) -> Result<std::net::Ipv4Addr, InvalidMessage> {
    s.parse().map_err(|_| InvalidMessage::Field(field))
}

impl TryFrom<pb::Service> for ServiceView {
    type Error = InvalidMessage;
    fn try_from(s: pb::Service) -> Result<ServiceView, InvalidMessage> {
        Ok(ServiceView {
            name: s.name,
            networks: s.networks,
            ports: s.ports.iter().map(|p| format!("{}/{}", p.port, p.protocol)).collect(),
            publish: s.publish,
            publish_nodes: s.publish_nodes.iter().map(|n| n.parse()).collect::<Result<_, _>>()?,
            replicas: s.replicas,
            constraints: s.constraints,
            command: Some(s.command).filter(|c| !c.is_empty()),
            run: s.run.map(crate::model::RunSpec::from).unwrap_or_default(),
            running: s.running,
            version: s.version,
            signed: s.signed,
            spec: s.spec.map(|x| crate::specs::SignedSpec { document: x.document, signature: x.signature }),
            previous: s.previous,
            rollout: s.rollout.map(RolloutView::from),
            vips: s
                .vips
                .into_iter()
                .map(|v| Ok((v.network, ipv4(&v.address, "vip")?)))
                .collect::<Result<_, InvalidMessage>>()?,
            endpoints: s
                .endpoints
                .into_iter()
                .map(|e| {
                    Ok(EndpointView {
                        slot: e.slot,
                        node: e.node.parse()?,
                        addresses: e
                            .addresses
                            .into_iter()
                            .map(|a| Ok((a.network, ipv4(&a.address, "endpoint address")?)))
                            .collect::<Result<_, InvalidMessage>>()?,
                        version: e.version,
                    })
                })
                .collect::<Result<_, InvalidMessage>>()?,
        })
    }
}

/// A policy version as an admin sees it.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct PolicyView {
    pub version: u64,
    pub file: String,
    #[serde(skip_serializing_if = "String::is_empty")]
    pub text: String,
    #[serde(with = "time::serde::rfc3339::option")]
    pub applied_at: Option<OffsetDateTime>,
    pub source: String,
    pub rules: u32,
    pub current: bool,
}

impl TryFrom<pb::PolicyVersion> for PolicyView {
    type Error = InvalidMessage;
    fn try_from(p: pb::PolicyVersion) -> Result<PolicyView, InvalidMessage> {
        if p.version == 0 {
            return Err(InvalidMessage::Missing("version"));
        }
        Ok(PolicyView {
            version: p.version,
            file: p.file,
            text: p.text,
            applied_at: unix(p.applied_at),
            source: p.source,
            rules: p.rules,
            current: p.current,
        })
    }
}

/// The cluster-wide settings as an admin sees them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ClusterView {
    pub id: crate::ids::ClusterId,
    pub autolock: bool,
    #[serde(with = "humantime_serde")]
    pub cert_expiry: std::time::Duration,
    #[serde(with = "humantime_serde")]
    pub key_rotation: std::time::Duration,
    #[serde(with = "humantime_serde")]
    pub workload_cert_expiry: std::time::Duration,
    #[serde(with = "humantime_serde")]
    pub down_after: std::time::Duration,
    pub managers: Vec<String>,
    /// The leader's version (empty from a leader older than this field).
    pub version: String,
}

/// Durations as humans write them ("12h"), as the command line takes them.
mod humantime_serde {
    pub fn serialize<S: serde::Serializer>(d: &std::time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }
}

impl TryFrom<pb::ClusterInfo> for ClusterView {
    type Error = InvalidMessage;
    fn try_from(c: pb::ClusterInfo) -> Result<ClusterView, InvalidMessage> {
        let secs = |v: u64, field: &'static str| {
            if v == 0 { Err(InvalidMessage::Missing(field)) } else { Ok(std::time::Duration::from_secs(v)) }
        };
        Ok(ClusterView {
            id: c.id.parse()?,
            autolock: c.autolock,
            cert_expiry: secs(c.cert_expiry_secs, "cert_expiry_secs")?,
            key_rotation: secs(c.key_rotation_secs, "key_rotation_secs")?,
            workload_cert_expiry: secs(c.workload_cert_expiry_secs, "workload_cert_expiry_secs")?,
            down_after: secs(c.down_after_secs, "down_after_secs")?,
            managers: c.managers,
            version: c.version,
        })
    }
}
