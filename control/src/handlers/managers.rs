//! The managers' service: where the leader is, adding a manager to the raft group, and (on a
//! locked manager) unlocking.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::mpsc;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::auth::Caller;
use crate::manager::Manager;
use crate::raft::seal::{KeyFile, SealError, UnlockKey};
use crate::state::Command;
use crate::statedir::ManagerDir;
use mesh_api::pki::{CertInfo, Holder};
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
        let raft_id = manager.store.read(|s| s.nodes.get(&id).map(|n| n.raft_id())).unwrap_or_default();
        let set_address = Command::SetManagerAddress { id: id.clone(), control };
        manager.change(move |_, _| Ok(vec![set_address])).await?;
        manager.store.add_voter(raft_id, &control.to_string()).await.map_err(|e| {
            warn!(node = %id, error = %e, "adding a manager to the raft group failed");
            Status::unavailable(e.to_string())
        })?;
        info!(node = %id, raft_id, %control, "manager added to the raft group as a voter");
        Ok(Response::new(pb::AddManagerResponse {}))
    }

    async fn unlock(
        &self,
        _request: Request<pb::UnlockRequest>,
    ) -> Result<Response<pb::UnlockResponse>, Status> {
        Err(Status::failed_precondition(format!("the manager at {} is not locked", self.0.config.advertise)))
    }
}

/// What a locked manager serves: `Unlock` for an admin, a clear refusal for everything else.
pub(crate) struct LockedApi {
    pub(crate) dir: ManagerDir,
    pub(crate) cluster: String,
    pub(crate) unlocked: mpsc::Sender<UnlockKey>,
}

fn locked() -> Status {
    Status::failed_precondition("this manager is locked (autolock is on): unlock it with `meshctl unlock`")
}

/// Opens the data key in `dir` with `key`, or says why not.
fn try_unlock(dir: &Path, key: &UnlockKey) -> Result<(), Status> {
    match KeyFile::read(dir).and_then(|f| f.open(dir, Some(key))) {
        Ok(_) => Ok(()),
        Err(e @ SealError::WrongUnlockKey) => Err(Status::permission_denied(e.to_string())),
        Err(e) => Err(Status::internal(e.to_string())),
    }
}

#[tonic::async_trait]
impl pb::managers_server::Managers for LockedApi {
    async fn leader(
        &self,
        _request: Request<pb::LeaderRequest>,
    ) -> Result<Response<pb::LeaderResponse>, Status> {
        Err(locked())
    }

    async fn add_manager(
        &self,
        _request: Request<pb::AddManagerRequest>,
    ) -> Result<Response<pb::AddManagerResponse>, Status> {
        Err(locked())
    }

    async fn unlock(
        &self,
        request: Request<pb::UnlockRequest>,
    ) -> Result<Response<pb::UnlockResponse>, Status> {
        // The state (and with it the list of removed nodes) is unreadable until unlocked: only an
        // admin certificate of this cluster, which the TLS layer checked against the CA, may try.
        let leaf = request.peer_certs().and_then(|c| c.first().cloned());
        let info = leaf
            .and_then(|der| CertInfo::from_der(&der).ok())
            .ok_or_else(|| Status::unauthenticated("unlocking needs an admin certificate"))?;
        if info.holder(&self.cluster) != Ok(Holder::Admin) {
            return Err(Status::permission_denied("unlocking needs an admin certificate of this cluster"));
        }
        let key: UnlockKey =
            request.get_ref().key.parse().map_err(|e| Status::invalid_argument(format!("{e}")))?;
        if let Err(status) = try_unlock(&self.dir.data_key(), &key) {
            warn!("unlock refused: {}", status.message());
            return Err(status);
        }
        info!("unlocked");
        let _ = self.unlocked.send(key).await;
        Ok(Response::new(pb::UnlockResponse {}))
    }
}
