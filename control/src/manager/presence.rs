//! Who is connected: each node's open sessions and since when it has had none, which is what
//! placement reads as liveness.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use mesh_api::ids::NodeId;
use tokio_util::sync::CancellationToken;

use super::Manager;
use crate::plans::Liveness;
use crate::state::NodeState;

/// Open sessions of a node, and since when it has had none.
#[derive(Clone, Debug)]
pub(super) struct Presence {
    pub(super) open: usize,
    pub(super) since: Instant,
    /// The newest session's: a node holds one session, and a new one ends the one before.
    pub(super) newest: Option<CancellationToken>,
}

impl Manager {
    /// Which nodes have a session now, and which are not (yet) considered down.
    pub fn liveness(&self) -> Liveness {
        let presence = self.presence.lock().expect("lock").clone();
        let now = Instant::now();
        // A node not seen since this manager took the lead gets `down_after` from then to reconnect.
        let since = self.leading_since.lock().expect("lock").unwrap_or(now);
        let down_after = self.settings().down_after;
        let mut live = Liveness::default();
        self.store.read(|s| {
            for node in s.nodes.values().filter(|n| n.state == NodeState::Active) {
                let p = presence.get(&node.id).cloned().unwrap_or(Presence { open: 0, since, newest: None });
                if p.open > 0 {
                    live.connected.insert(node.id.clone());
                }
                if p.open > 0 || now.duration_since(p.since) < down_after {
                    live.not_down.insert(node.id.clone());
                }
            }
        });
        live
    }

    /// Nodes with an open session.
    pub fn connected(&self) -> BTreeSet<NodeId> {
        self.liveness().connected
    }

    /// Notes a session opened by `node`, ending the one it had (the returned guard's
    /// `replaced` is cancelled in turn when a newer one opens); the guard notes its end when
    /// dropped.
    pub(crate) fn session_opened(self: &Arc<Self>, node: &NodeId) -> SessionGuard {
        let mut presence = self.presence.lock().expect("lock");
        let p =
            presence.entry(node.clone()).or_insert(Presence { open: 0, since: Instant::now(), newest: None });
        p.open += 1;
        let replaced = CancellationToken::new();
        if let Some(older) = p.newest.replace(replaced.clone()) {
            older.cancel();
        }
        SessionGuard { manager: self.clone(), node: node.clone(), replaced }
    }
}

/// Marks a node's session closed when dropped.
pub(crate) struct SessionGuard {
    manager: Arc<Manager>,
    node: NodeId,
    /// Cancelled when the node opens a newer session.
    pub(crate) replaced: CancellationToken,
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        let mut presence = self.manager.presence.lock().expect("lock");
        if let Some(p) = presence.get_mut(&self.node) {
            p.open = p.open.saturating_sub(1);
            if p.open == 0 {
                p.since = Instant::now();
            }
        }
    }
}
