//! The changes the cluster state accepts: each one is a raft log entry.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use mesh_api::ids::NodeId;
use mesh_api::tokens::{Role, SecretHash};
use serde::{Deserialize, Serialize};

use super::records::{
    AdminRecord, CaRecord, Generation, Network, NodeRecord, PolicyRecord, Secret, SecretRecord, Service,
    Settings, WireguardPublic,
};
use crate::planning::keys::KeyRing;

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
    /// The operator demoted a manager (`true`) or promoted it again.
    SetDemoted {
        id: NodeId,
        demoted: bool,
    },
    /// Changes cluster-wide settings (each `Some` replaces the value in force).
    UpdateSettings {
        cert_lifetime_secs: Option<u64>,
        settings: Settings,
    },
    /// Accepts the admin certificate with this serial from now on.
    AddAdmin {
        serial: String,
        record: AdminRecord,
    },
    /// Refuses the admin certificate with this serial from now on.
    RevokeAdmin {
        serial: String,
    },
    /// Turns autolock on with this unlock key, or off.
    SetUnlockKey(Option<Secret>),
    AddNode(NodeRecord),
    RecordCertificate {
        id: NodeId,
        not_after: i64,
        /// The digest of the root whose key signed it.
        #[serde(default)]
        root: String,
    },
    /// A root rotation starts: `ca` (the new root) signs from now on; the current root stays
    /// trusted beside it, vouching for it with `cross_pem`.
    StartCaRotation {
        ca: CaRecord,
        cross_pem: String,
        started_at: i64,
    },
    /// The rotation ends: the old root is trusted no more, and the join tokens pin the new one.
    FinishCaRotation,
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
    /// The boot number a node's session reported; never lower than the one recorded.
    SetNodeBoot {
        id: NodeId,
        boot: u16,
    },
    /// The public key a node reported for a WireGuard network (see [`WireguardPublic`]).
    SetWireguardKey {
        id: NodeId,
        network: u32,
        key: WireguardPublic,
    },
    /// A WireGuard network's static keys move on to a new generation.
    SetGeneration {
        network: String,
        generation: Generation,
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
    PutService(Box<Service>),
    RemoveService {
        name: String,
    },
    /// Creates a secret (never replaced: a changed secret is a new name).
    PutSecret {
        name: String,
        record: SecretRecord,
    },
    /// Removes a secret no service reads.
    RemoveSecret {
        name: String,
    },
    /// Several commands applied in order, all or nothing: one plan.
    Batch(Vec<Command>),
    /// A new policy version, in force from now on.
    SetPolicy(PolicyRecord),
}

impl Command {
    /// Makes `token` the current join token for `role`.
    pub fn set_token(role: Role, token: &mesh_api::tokens::JoinToken) -> Command {
        Command::SetToken { role, hash: token.secret_hash(), token: Secret(token.to_string()) }
    }
}
