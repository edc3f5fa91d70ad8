//! Following leadership: taking the lead gives nodes time to reconnect before their endpoints
//! move; losing it cuts node sessions so they go to the leader; a manager that joined asks to be
//! added to the raft group until it is.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_api::client;
use mesh_api::proto::pb;
use mesh_api::tls::{self, Identity, ServerTrust};
use tracing::{info, warn};

use super::Manager;
use crate::state::NodeState;

/// How long a joining manager waits for the leader to add it (as a learner that caught up, then
/// as a voter; each change waits its turn behind others).
const ADD_WITHIN: Duration = Duration::from_secs(45);

impl Manager {
    /// Follows leadership: taking the lead gives every node `down_after` from now to reconnect
    /// before its endpoints move; losing it (or a majority's acknowledgement, when cut off) cuts
    /// every node session, so nodes go to the manager that leads.
    pub(crate) async fn follow_leadership(self: Arc<Self>) {
        let mut metrics = self.store.watch_raft();
        let mut leading = false;
        loop {
            let now_leading = self.store.leadership().leading;
            if now_leading != leading {
                leading = now_leading;
                if leading {
                    let now = Instant::now();
                    *self.leading_since.lock().expect("lock") = Some(now);
                    for p in self.presence.lock().expect("lock").values_mut().filter(|p| p.open == 0) {
                        p.since = now;
                    }
                    info!(raft_id = self.store.id(), "this manager leads the cluster");
                } else {
                    *self.leading_since.lock().expect("lock") = None;
                    info!(
                        "this manager does not lead (any more): cutting node sessions so they find the leader"
                    );
                    self.close_nodes();
                }
            }
            // Raft's metrics change with every election; the lease also runs out with no event.
            tokio::select! {
                changed = metrics.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
    }

    /// A manager that joined asks the leader to add it to the raft group, until it votes: a join
    /// that stopped half way (a learner whose promotion lost the race for raft's one membership
    /// change at a time, or a restart in between) is finished, not left a learner.
    pub(crate) async fn join_raft_group(self: Arc<Self>) {
        if self.config.join.is_empty() {
            return;
        }
        loop {
            if self.store.leadership().voters.contains_key(&self.store.id()) {
                info!(raft_id = self.store.id(), "this manager votes in the managers' raft group");
                if let Err(e) = crate::statedir::finish_join(&self.dir, &self.config) {
                    warn!(error = %e, "cannot record that the join is complete; it is asked for again at the next start");
                }
                return;
            }
            match tokio::time::timeout(ADD_WITHIN, self.ask_to_be_added()).await {
                Ok(Ok(true)) => {
                    info!(
                        "the operator demoted this manager: it stays a learner until `meshctl node promote`"
                    );
                    if let Err(e) = crate::statedir::finish_join(&self.dir, &self.config) {
                        warn!(error = %e, "cannot record that the join is complete");
                    }
                    return;
                }
                // Added: seen as a voter here once the change reaches this manager's log.
                Ok(Ok(false)) => {
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    continue;
                }
                Ok(Err(e)) => {
                    warn!(error = %e, "asking to be added to the managers' raft group failed; will retry")
                }
                Err(_) => warn!(
                    "the leader did not add this manager to the raft group within {ADD_WITHIN:?}; will retry"
                ),
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// Watches the state for this manager's own removal (`meshctl node rm`): the removal is the
    /// last entry the others send it before it leaves the raft group, and on it the manager stops.
    pub(crate) async fn follow_own_removal(self: Arc<Self>) {
        let mut revisions = self.store.subscribe();
        loop {
            let removed = self
                .store
                .read(|s| s.nodes.get(&self.node_id).is_some_and(|n| n.state == NodeState::Removed));
            if removed {
                warn!(node = %self.node_id, "this manager was removed from the cluster (meshctl node rm): stopping");
                self.removed.cancel();
                return;
            }
            if revisions.changed().await.is_err() {
                return;
            }
        }
    }

    /// The leader among `managers`, reached with this manager's `identity`.
    pub(crate) async fn leader_as(
        &self,
        identity: &Identity,
        managers: &[String],
    ) -> Result<client::Leader, client::ClientError> {
        let config = tls::client_config(ServerTrust::Ca(&self.ca_view().trust), Some(identity))?;
        client::leader(managers, config).await
    }

    /// Asks the leader to add this manager; whether the operator demoted it (it stays out).
    async fn ask_to_be_added(&self) -> Result<bool, Box<dyn std::error::Error + Send + Sync>> {
        let identity = self.identity()?;
        let leader = self.leader_as(&identity, &self.config.join).await?;
        let answer = pb::managers_client::ManagersClient::new(leader.channel)
            .add_manager(pb::AddManagerRequest { control: self.config.advertise.to_string() })
            .await
            .map_err(|s| client::ClientError::refused(&leader.addr, s))?;
        Ok(answer.into_inner().demoted)
    }
}
