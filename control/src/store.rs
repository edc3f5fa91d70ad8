//! The cluster state: one state machine changed only by [`Command`]s.
//!
//! Every change goes through [`Store::apply`], so the replicated log (openraft) can take over by
//! replicating the same commands; until then the state is persisted as a snapshot written
//! atomically after each command.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::files::{self, FileError};
use crate::ids::{ClusterId, NodeId};
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
}

/// The whole replicated cluster state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterState {
    pub cluster_id: ClusterId,
    /// Lifetime of node certificates, in seconds.
    pub cert_lifetime_secs: u64,
    /// Hash of each role's current join token secret.
    pub tokens: BTreeMap<Role, SecretHash>,
    pub nodes: BTreeMap<NodeId, NodeRecord>,
}

impl ClusterState {
    pub fn new(cluster_id: ClusterId, cert_lifetime: Duration) -> ClusterState {
        ClusterState {
            cluster_id,
            cert_lifetime_secs: cert_lifetime.as_secs(),
            tokens: BTreeMap::new(),
            nodes: BTreeMap::new(),
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
    pub fn active_node(&self, id: &NodeId) -> Result<&NodeRecord, StoreError> {
        match self.nodes.get(id) {
            None => Err(StoreError::UnknownNode(id.clone())),
            Some(n) if n.state == NodeState::Removed => Err(StoreError::NodeRemoved(id.clone())),
            Some(n) => Ok(n),
        }
    }

    fn apply(&mut self, command: Command) -> Result<(), StoreError> {
        match command {
            Command::SetToken { role, hash } => {
                self.tokens.insert(role, hash);
            }
            Command::AddNode(record) => {
                if self.nodes.contains_key(&record.id) {
                    return Err(StoreError::NodeExists(record.id));
                }
                self.nodes.insert(record.id.clone(), record);
            }
            Command::RecordCertificate { id, not_after } => {
                let node = self
                    .nodes
                    .get_mut(&id)
                    .ok_or(StoreError::UnknownNode(id.clone()))?;
                if node.state == NodeState::Removed {
                    return Err(StoreError::NodeRemoved(id));
                }
                node.cert_not_after = not_after;
            }
            Command::RemoveNode { id } => {
                let node = self
                    .nodes
                    .get_mut(&id)
                    .ok_or(StoreError::UnknownNode(id.clone()))?;
                if node.state == NodeState::Removed {
                    return Err(StoreError::NodeRemoved(id));
                }
                node.state = NodeState::Removed;
            }
        }
        Ok(())
    }
}

/// A change to the cluster state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum Command {
    SetToken { role: Role, hash: SecretHash },
    AddNode(NodeRecord),
    RecordCertificate { id: NodeId, not_after: i64 },
    RemoveNode { id: NodeId },
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("no node with ID {0}")]
    UnknownNode(NodeId),
    #[error("node {0} has been removed from the cluster")]
    NodeRemoved(NodeId),
    #[error("a node with ID {0} already exists")]
    NodeExists(NodeId),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the cluster state in {path} is corrupt: {error}")]
    Corrupt {
        path: PathBuf,
        error: serde_json::Error,
    },
}

/// The state machine and where it is persisted.
pub struct Store {
    path: PathBuf,
    state: Mutex<ClusterState>,
}

impl Store {
    /// Creates the store file with `state`; refuses if one exists.
    pub fn create(path: &Path, state: ClusterState) -> Result<Store, StoreError> {
        let store = Store {
            path: path.to_owned(),
            state: Mutex::new(state),
        };
        store.persist(&store.state.lock().expect("store lock"))?;
        Ok(store)
    }

    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let text = files::read_string(path)?;
        let state = serde_json::from_str(&text).map_err(|error| StoreError::Corrupt {
            path: path.to_owned(),
            error,
        })?;
        Ok(Store {
            path: path.to_owned(),
            state: Mutex::new(state),
        })
    }

    /// Applies `command`; on error the state is unchanged. The change is on disk before this returns.
    pub fn apply(&self, command: Command) -> Result<(), StoreError> {
        let mut state = self.state.lock().expect("store lock");
        let mut next = state.clone();
        next.apply(command)?;
        self.persist(&next)?;
        *state = next;
        Ok(())
    }

    /// Reads the state.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.state.lock().expect("store lock"))
    }

    fn persist(&self, state: &ClusterState) -> Result<(), StoreError> {
        let json = serde_json::to_vec_pretty(state).expect("state serializes");
        files::write_atomic(&self.path, &json, files::SECRET)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::JoinToken;

    fn record(id: &NodeId) -> NodeRecord {
        NodeRecord {
            id: id.clone(),
            hostname: "h".into(),
            role: Role::Worker,
            state: NodeState::Active,
            joined_at: 1,
            cert_not_after: 2,
        }
    }

    #[test]
    fn commands_persist_and_failed_ones_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.json");
        let store = Store::create(
            &path,
            ClusterState::new(ClusterId::random(), Duration::from_secs(3600)),
        )
        .unwrap();
        let id = NodeId::random();
        store.apply(Command::AddNode(record(&id))).unwrap();
        assert!(matches!(
            store.apply(Command::AddNode(record(&id))),
            Err(StoreError::NodeExists(_))
        ));
        store.apply(Command::RemoveNode { id: id.clone() }).unwrap();
        assert!(matches!(
            store.apply(Command::RecordCertificate {
                id: id.clone(),
                not_after: 9
            }),
            Err(StoreError::NodeRemoved(_))
        ));
        let reopened = Store::open(&path).unwrap();
        reopened.read(|s| {
            assert_eq!(s.nodes[&id].state, NodeState::Removed);
            assert_eq!(s.nodes[&id].cert_not_after, 2);
        });
    }

    #[test]
    fn tokens_map_to_their_role_only() {
        let mut state = ClusterState::new(ClusterId::random(), Duration::from_secs(3600));
        let worker = JoinToken::generate(&"0".repeat(50));
        let manager = JoinToken::generate(&"0".repeat(50));
        state
            .apply(Command::SetToken {
                role: Role::Worker,
                hash: worker.secret_hash(),
            })
            .unwrap();
        state
            .apply(Command::SetToken {
                role: Role::Manager,
                hash: manager.secret_hash(),
            })
            .unwrap();
        assert_eq!(
            state.role_for_token(&worker.secret_hash()),
            Some(Role::Worker)
        );
        assert_eq!(
            state.role_for_token(&manager.secret_hash()),
            Some(Role::Manager)
        );
        let other = JoinToken::generate(&"0".repeat(50));
        assert_eq!(state.role_for_token(&other.secret_hash()), None);
    }
}
