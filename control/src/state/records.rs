//! What the cluster state holds: nodes, networks, services and their endpoints, policy versions,
//! the CA and secrets.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

use ipnet::Ipv4Net;
use mesh_api::ids::NodeId;
use mesh_api::model::{NodeState, PortSpec, RunSpec};
use mesh_api::specs::SignedSpec;
use mesh_api::tokens::Role;
use serde::{Deserialize, Serialize};

use crate::planning::keys::KeyRing;
use crate::planning::placement::Constraint;

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
    /// The boot number of the node's meshd, as its latest session reported it (0 before one
    /// did): part of its pair keys, so that a restart changes them. It only grows.
    #[serde(default)]
    pub boot: u16,
    /// A manager the operator demoted (`meshctl node demote`): it does not vote again until
    /// promoted, whatever it asks.
    #[serde(default)]
    pub demoted: bool,
    /// The digest of the root whose key signed the node's newest certificate (empty for
    /// certificates recorded before this was kept): what a root rotation waits on.
    #[serde(default)]
    pub cert_root: String,
    /// Network ID -> the public half of the node's static key on that WireGuard network.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub wireguard: BTreeMap<u32, WireguardPublic>,
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

/// A secret services' workloads read (`meshctl secret create`): its bytes (base64) are shown to
/// no admin and sent only in the slices of nodes that run a workload reading it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SecretRecord {
    /// The bytes, base64.
    pub data: Secret,
    /// SHA-256 of the bytes, hex: what admins see.
    pub digest: String,
    pub size: u64,
    /// Unix seconds.
    pub created_at: i64,
}

/// The cluster's root CA, replicated so that any manager can issue certificates after another is
/// lost.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRecord {
    pub cert_pem: String,
    /// Empty when the CA is external.
    pub key_pem: Secret,
    /// The external CA that signs, when the managers hold no CA key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external: Option<ExternalCa>,
}

/// An external CA (`mesh-control init --external-ca cfssl=URL`): the CFSSL server the managers
/// forward checked CSRs to, and its auth key (hex).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalCa {
    pub url: String,
    pub auth_key: Secret,
}

/// A root rotation under way: [`CaRecord`] holds the new root, which signs from its start; the
/// old one is still trusted, and vouches for the new one, until every node renewed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaRotation {
    /// The root being replaced.
    pub previous_pem: String,
    /// The new root's certificate signed by the old root: carried after every certificate
    /// issued during the rotation, and sent to nodes as the proof that lets the new root in.
    pub cross_pem: String,
    /// Unix seconds.
    pub started_at: i64,
}

/// An overlay network.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Network {
    pub name: String,
    /// Unique in the cluster, 24 bits, never 0.
    pub id: u32,
    pub subnet: Ipv4Net,
    /// The key ring; `None` for an unencrypted network and for a WireGuard one.
    pub keys: Option<KeyRing>,
    /// On a WireGuard network: the generation of static keys its nodes are to hold. The
    /// managers hold no key of such a network, only the public halves its nodes report.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wireguard: Option<Generation>,
}

impl Network {
    pub fn transport(&self) -> mesh_api::model::Transport {
        use mesh_api::model::Transport;
        match (&self.keys, &self.wireguard) {
            (_, Some(_)) => Transport::WireGuard,
            (Some(_), None) => Transport::AesGcm,
            (None, None) => Transport::None,
        }
    }
}

/// The generation of a WireGuard network's static keys: it moves on at every rotation, and each
/// node on the network then makes a new key pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Generation {
    pub generation: u32,
    /// Unix seconds.
    pub rotated_at: i64,
}

impl Generation {
    /// The generation after this one, from `now`.
    pub fn next(self, now: i64) -> Generation {
        Generation { generation: self.generation + 1, rotated_at: now }
    }
}

/// The public half of a node's static key on a WireGuard network, as the node reported it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireguardPublic {
    pub generation: u32,
    pub public: [u8; 32],
    /// Unix seconds: when it was recorded.
    #[serde(default)]
    pub reported_at: i64,
}

/// One running instance of a service, on one node, with an address on each of its networks.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    pub slot: u32,
    pub node: NodeId,
    /// Network name -> address.
    pub addresses: BTreeMap<String, Ipv4Addr>,
    /// Network name -> the key epoch current when the endpoint was placed on it: its node is
    /// sent no key of an older epoch (none for endpoints placed before this was kept).
    #[serde(default)]
    pub since: BTreeMap<String, u32>,
    /// The version of its service's definition its workload runs (see [`Service::version`]).
    #[serde(default)]
    pub version: u64,
}

/// What an endpoint's workload runs: one version of its service's command and how it runs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Definition {
    pub command: Option<String>,
    pub run: RunSpec,
    /// The operator's signature of it, untouched (see `mesh_api::specs`).
    #[serde(default)]
    pub signed: Option<SignedSpec>,
}

/// What `service update --update-failure-action` says to do when an updated endpoint fails.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OnFailure {
    /// Stop handing out the new version; the endpoints updated so far keep it.
    #[default]
    Pause,
    /// Return every endpoint to the version before.
    Rollback,
}

/// Where a rolling update stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutState {
    Updating,
    /// Stopped because an updated endpoint failed: why.
    Paused(String),
    Completed,
}

/// A rolling update of a service's endpoints to its current version, a batch at a time: the
/// next batch is handed out once every endpoint of the version is up (and stayed up for
/// `monitor_secs`), and `delay_secs` after that.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rollout {
    /// Endpoints per batch (0: all at once).
    pub parallelism: u32,
    pub delay_secs: u64,
    /// How long an updated endpoint must have been up before it counts.
    pub monitor_secs: u64,
    pub on_failure: OnFailure,
    /// Whether this update returns to the version before (`service rollback`, or a failure).
    pub rollback: bool,
    pub state: RolloutState,
    /// Unix seconds: when it started, and when its last batch was handed out.
    pub started_at: i64,
    pub batch_at: i64,
    /// Unix seconds: when the next batch may be handed out, once the last one is up.
    pub next_at: Option<i64>,
    /// For a rollback started by a failed update: how that update failed.
    #[serde(default)]
    pub failure: Option<String>,
}

/// A service: what it runs, where, and its addresses.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub name: String,
    pub networks: Vec<String>,
    pub ports: Vec<PortSpec>,
    /// Its published ports (state written before this field has none).
    #[serde(default)]
    pub publish: Vec<mesh_api::model::Publish>,
    pub replicas: u32,
    pub constraints: Vec<Constraint>,
    pub command: Option<String>,
    /// How its command runs (state written before this field has none: the defaults).
    #[serde(default)]
    pub run: RunSpec,
    /// The operator's signature of `command` and `run` (and the name and networks), untouched.
    #[serde(default)]
    pub signed: Option<SignedSpec>,
    /// The version of `command` and `run`: each update that changes them makes a new one.
    #[serde(default)]
    pub version: u64,
    /// Versions before this one that an endpoint still runs (during a rolling update) or that
    /// `service rollback` returns to.
    #[serde(default)]
    pub earlier: BTreeMap<u64, Definition>,
    /// The version `service rollback` returns to.
    #[serde(default)]
    pub previous: Option<u64>,
    /// The last rolling update, while it runs and after.
    #[serde(default)]
    pub rollout: Option<Rollout>,
    /// Network name -> virtual IP.
    pub vips: BTreeMap<String, Ipv4Addr>,
    /// Slot -> endpoint.
    pub endpoints: BTreeMap<u32, Endpoint>,
}

impl Service {
    /// What version `version` runs (the current one for a version no longer kept).
    pub fn definition(&self, version: u64) -> Definition {
        match self.earlier.get(&version) {
            Some(d) if version != self.version => d.clone(),
            _ => Definition {
                command: self.command.clone(),
                run: self.run.clone(),
                signed: self.signed.clone(),
            },
        }
    }

    /// Every secret some version of it that is kept reads.
    pub fn secrets(&self) -> impl Iterator<Item = &String> {
        self.run.secrets.iter().chain(self.earlier.values().flat_map(|d| d.run.secrets.iter()))
    }

    /// Keeps only the earlier versions some endpoint runs or a rollback returns to.
    pub fn prune(&mut self) {
        let used: std::collections::BTreeSet<u64> =
            self.endpoints.values().map(|e| e.version).chain(self.previous).collect();
        self.earlier.retain(|v, _| used.contains(v) && *v != self.version);
    }
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

/// The cluster-wide settings an admin stored (`meshctl cluster update`); one left unset takes the
/// leading manager's command-line value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    pub key_rotation_secs: Option<u64>,
    pub down_after_secs: Option<u64>,
    pub workload_cert_lifetime_secs: Option<u64>,
}

/// An admin credential the cluster accepts: a certificate of the admin, by serial number.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminRecord {
    pub label: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub not_after: i64,
}
