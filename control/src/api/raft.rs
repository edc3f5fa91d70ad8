//! Raft between managers, the receiving side (the sending side is [`crate::peers`]): only a
//! manager certificate of this cluster may send, and not one of a removed node.

use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::{Request, Response, Status};

use crate::ca::CertInfo;
use crate::ids::NodeId;
use crate::proto::pb;
use crate::server::Manager;
use crate::state::NodeState;
use crate::tokens::Role;

pub(crate) struct RaftApi(pub(crate) Arc<Manager>);

impl RaftApi {
    /// The TLS layer checked the chain to the cluster CA; this checks it is a manager's, of this
    /// cluster, and not of a removed node. (A manager that just joined has no state yet, so the
    /// certificate is what counts, with the denylist once the state knows it.)
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let leaf = request.peer_certs().and_then(|c| c.first().cloned());
        let info = leaf
            .and_then(|der| CertInfo::from_der(&der).ok())
            .ok_or_else(|| Status::unauthenticated("raft messages need a manager certificate"))?;
        if info.organization != self.0.cluster_id.as_str() || Role::from_ou(&info.unit) != Some(Role::Manager)
        {
            return Err(Status::permission_denied("raft messages are for this cluster's managers only"));
        }
        let id: NodeId = info.common_name.parse().map_err(|e| Status::permission_denied(format!("{e}")))?;
        let removed = self.0.store.read(|s| s.nodes.get(&id).is_some_and(|n| n.state == NodeState::Removed));
        if removed {
            return Err(Status::permission_denied(format!("node {id} has been removed from the cluster")));
        }
        Ok(())
    }
}

fn decode<T: DeserializeOwned>(request: &Request<pb::RaftMessage>) -> Result<T, Status> {
    serde_json::from_slice(&request.get_ref().json)
        .map_err(|e| Status::invalid_argument(format!("malformed raft message: {e}")))
}

fn encode<T: Serialize>(reply: &T) -> Result<Response<pb::RaftMessage>, Status> {
    let json = serde_json::to_vec(reply).map_err(|e| Status::internal(e.to_string()))?;
    Ok(Response::new(pb::RaftMessage { json }))
}

#[tonic::async_trait]
impl pb::raft_server::Raft for RaftApi {
    async fn append_entries(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        self.authorize(&request)?;
        encode(&self.0.store.raft().append_entries(decode(&request)?).await)
    }

    async fn vote(&self, request: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        self.authorize(&request)?;
        encode(&self.0.store.raft().vote(decode(&request)?).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        self.authorize(&request)?;
        encode(&self.0.store.raft().install_snapshot(decode(&request)?).await)
    }
}
