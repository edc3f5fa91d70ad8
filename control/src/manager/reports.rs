//! What nodes report of their own endpoints (`ReportEndpoints`), held by the manager the nodes'
//! sessions are with (the leader) and not replicated: after a failover each node reports again
//! to the new leader when its session opens there. A node's report replaces its previous one and
//! only its own endpoints are kept.

use std::collections::HashMap;
use std::sync::Mutex;

use mesh_api::ids::NodeId;
use mesh_api::model::EndpointState;

use crate::state::ClusterState;

#[derive(Default)]
pub struct Reports(Mutex<HashMap<NodeId, Vec<EndpointState>>>, Mutex<HashMap<NodeId, Vec<PublishedState>>>);

/// What a node reports of one port it was told to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedState {
    pub port: u16,
    pub service: String,
    /// `None`: it listens; else why not (it tries again).
    pub error: Option<String>,
}

impl Reports {
    /// Keeps `reported` as what `node` runs now, less whatever the state does not place on it:
    /// a node speaks for its own endpoints only. `since` is this manager's clock (when it first
    /// heard of the state), not the node's: a node's clock skew moves no rolling update.
    pub fn put(&self, state: &ClusterState, node: &NodeId, mut reported: Vec<EndpointState>) {
        reported.retain(|r| {
            state
                .services
                .get(&r.service)
                .and_then(|s| s.endpoints.get(&r.slot))
                .is_some_and(|e| &e.node == node)
        });
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let mut reports = self.0.lock().expect("lock");
        let held = reports.get(node);
        for r in &mut reported {
            let same = |h: &&EndpointState| {
                h.service == r.service
                    && h.slot == r.slot
                    && (h.state, h.restarts, h.version) == (r.state, r.restarts, r.version)
            };
            r.since = held.and_then(|h| h.iter().find(same)).map_or(now, |h| h.since);
        }
        reports.insert(node.clone(), reported);
    }

    /// Keeps `reported` as the state of the ports `node` publishes, less those it was not told to
    /// publish.
    pub fn put_published(&self, state: &ClusterState, node: &NodeId, mut reported: Vec<PublishedState>) {
        reported.retain(|r| {
            state.services.get(&r.service).is_some_and(|s| {
                s.publish.iter().any(|p| {
                    p.published == r.port && crate::plans::publish::nodes(state, s, p).contains(node)
                })
            })
        });
        self.1.lock().expect("lock").insert(node.clone(), reported);
    }

    /// What `node` last reported of its published port `port`.
    pub fn published(&self, node: &NodeId, port: u16) -> Option<PublishedState> {
        self.1.lock().expect("lock").get(node)?.iter().find(|r| r.port == port).cloned()
    }

    /// What `node` last reported of endpoint `service`.`slot`.
    pub fn of(&self, node: &NodeId, service: &str, slot: u32) -> Option<EndpointState> {
        let reports = self.0.lock().expect("lock");
        reports.get(node)?.iter().find(|r| r.service == service && r.slot == slot).cloned()
    }
}
