//! The managers' service: where the leader is, and adding a manager to the raft group.

use std::net::SocketAddr;
use std::sync::Arc;

use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::auth::Caller;
use crate::manager::Manager;
use crate::state::Command;
use mesh_api::proto::pb;
use mesh_api::tokens::Role;

pub(crate) struct ManagersApi(pub(crate) Arc<Manager>);

#[tonic::async_trait]
impl pb::managers_server::Managers for ManagersApi {
    async fn leader(
        &self,
        _request: Request<pb::LeaderRequest>,
    ) -> Result<Response<pb::LeaderResponse>, Status> {
        self.0.lead()?;
        Ok(Response::new(pb::LeaderResponse {
            leader: self.0.config.advertise.to_string(),
            managers: self.0.manager_addresses(),
            manager_ids: self.0.manager_ids(),
            now_millis: mesh_api::unix_millis(),
        }))
    }

    async fn add_manager(
        &self,
        request: Request<pb::AddManagerRequest>,
    ) -> Result<Response<pb::AddManagerResponse>, Status> {
        let manager = &self.0;
        let id = match manager.caller(&request)? {
            Caller::Node { id, role: Role::Manager } => id,
            _ => return Err(Status::permission_denied("only a manager joins the managers' raft group")),
        };
        let control: SocketAddr = request.get_ref().control.parse().map_err(|e| {
            Status::invalid_argument(format!("`{}` is not an address: {e}", request.get_ref().control))
        })?;
        if control.ip().is_unspecified() {
            return Err(Status::invalid_argument(format!(
                "{control} cannot be reached by the other managers: give --advertise"
            )));
        }
        let (raft_id, demoted) =
            manager.store.read(|s| s.nodes.get(&id).map(|n| (n.raft_id(), n.demoted))).unwrap_or_default();
        let leadership = manager.store.leadership();
        if leadership.voters.contains_key(&raft_id) {
            return Ok(Response::new(pb::AddManagerResponse { demoted: false }));
        }
        // Demoted by the operator: it asks in vain (a restart, or a stolen manager key).
        if demoted && leadership.learners.contains_key(&raft_id) {
            info!(node = %id, "a demoted manager asked to vote: it stays a learner (meshctl node promote)");
            return Ok(Response::new(pb::AddManagerResponse { demoted: true }));
        }
        let set_address = Command::SetManagerAddress { id: id.clone(), control };
        manager.change(move |_, _| Ok(vec![set_address])).await?;
        manager.store.add_voter(raft_id, &control.to_string()).await.map_err(|e| {
            warn!(node = %id, error = %e, "adding a manager to the raft group failed");
            Status::unavailable(e.to_string())
        })?;
        info!(node = %id, raft_id, %control, "manager added to the raft group as a voter");
        Ok(Response::new(pb::AddManagerResponse { demoted: false }))
    }
}
