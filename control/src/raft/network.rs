//! Raft between managers, both sides: openraft's messages, as JSON, over the control API's own
//! gRPC and TLS port. The sending side ([`Peers`]) presents this manager's certificate and notes
//! when each peer last answered, which is what `meshctl node ls` shows as a manager's
//! reachability; the receiving side ([`RaftApi`]) takes messages from this cluster's managers
//! only, and not from a removed one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_api::ids::ClusterId;
use mesh_api::pki::{CertInfo, Holder};
use mesh_api::tokens::Role;
use mesh_api::trust::Trust;
use openraft::BasicNode;
use openraft::error::{NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use rustls::ClientConfig;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::state::NodeState;

use super::store::Store;
use super::types::{RaftId, TypeConfig};
use mesh_api::client;
use mesh_api::proto::pb;
use mesh_api::tls::{self, Identity, ServerTrust, TlsError};

/// Largest raft message accepted (snapshots travel in 1 MiB chunks, JSON makes them larger).
pub const MAX_MESSAGE: usize = 64 << 20;
/// A peer that answered within this long counts as reachable.
pub const REACHABLE_WITHIN: Duration = Duration::from_secs(3);

/// How this manager reaches the others.
#[derive(Clone)]
pub struct Peers(Arc<Inner>);

struct Inner {
    tls: Mutex<Arc<ClientConfig>>,
    last_answer: Mutex<HashMap<RaftId, Instant>>,
}

impl Peers {
    /// Peers reached with this manager's `identity`, trusting only the cluster CA.
    pub fn new(trust: &Trust, identity: &Identity) -> Result<Peers, TlsError> {
        let tls = tls::client_config(ServerTrust::Ca(trust), Some(identity))?;
        Ok(Peers(Arc::new(Inner { tls: Mutex::new(tls), last_answer: Mutex::new(HashMap::new()) })))
    }

    /// Uses a renewed identity for connections made from now on.
    pub fn set_identity(&self, trust: &Trust, identity: &Identity) -> Result<(), TlsError> {
        *self.0.tls.lock().expect("lock") = tls::client_config(ServerTrust::Ca(trust), Some(identity))?;
        Ok(())
    }

    /// Whether peer `id` answered a raft message lately (only the leader sends to all of them).
    pub fn reachable(&self, id: RaftId) -> bool {
        self.0.last_answer.lock().expect("lock").get(&id).is_some_and(|t| t.elapsed() < REACHABLE_WITHIN)
    }
}

impl RaftNetworkFactory<TypeConfig> for Peers {
    type Network = PeerClient;

    async fn new_client(&mut self, target: RaftId, node: &BasicNode) -> PeerClient {
        PeerClient { target, node: node.clone(), peers: self.clone(), client: None }
    }
}

/// The connection to one peer, made when first needed and again after a failure.
pub struct PeerClient {
    target: RaftId,
    node: BasicNode,
    peers: Peers,
    client: Option<pb::raft_client::RaftClient<Channel>>,
}

#[derive(Clone, Copy)]
enum Method {
    AppendEntries,
    Vote,
    InstallSnapshot,
}

type Failed<E> = RPCError<RaftId, BasicNode, RaftError<RaftId, E>>;

impl PeerClient {
    async fn call<Req, Resp, E>(
        &mut self,
        method: Method,
        request: &Req,
        option: RPCOption,
    ) -> Result<Resp, Failed<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let json = serde_json::to_vec(request).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let ttl = option.hard_ttl();
        let result = tokio::time::timeout(ttl, self.send(method, json)).await;
        let reply = match result {
            Ok(Ok(reply)) => reply,
            Ok(Err(e)) => {
                self.client = None;
                return Err(e);
            }
            Err(_) => {
                self.client = None;
                let e =
                    std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {ttl:?}"));
                return Err(RPCError::Network(NetworkError::new(&e)));
            }
        };
        self.peers.0.last_answer.lock().expect("lock").insert(self.target, Instant::now());
        let decoded: Result<Resp, RaftError<RaftId, E>> =
            serde_json::from_slice(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        decoded
            .map_err(|e| RPCError::RemoteError(RemoteError::new_with_node(self.target, self.node.clone(), e)))
    }

    async fn send<E: std::error::Error>(
        &mut self,
        method: Method,
        json: Vec<u8>,
    ) -> Result<Vec<u8>, Failed<E>> {
        if self.client.is_none() {
            let config = self.peers.0.tls.lock().expect("lock").clone();
            let channel = client::channel(&self.node.addr, config)
                .await
                .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
            self.client = Some(
                pb::raft_client::RaftClient::new(channel)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            );
        }
        let client = self.client.as_mut().expect("connected above");
        let message = pb::RaftMessage { json };
        let reply = match method {
            Method::AppendEntries => client.append_entries(message).await,
            Method::Vote => client.vote(message).await,
            Method::InstallSnapshot => client.install_snapshot(message).await,
        };
        let reply = reply.map_err(|status| {
            let e = std::io::Error::other(format!("{}: {}", self.node.addr, status.message()));
            RPCError::Network(NetworkError::new(&e))
        })?;
        Ok(reply.into_inner().json)
    }
}

impl RaftNetwork<TypeConfig> for PeerClient {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<RaftId>, Failed<openraft::error::Infallible>> {
        self.call(Method::AppendEntries, &rpc, option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<RaftId>, Failed<openraft::error::InstallSnapshotError>> {
        self.call(Method::InstallSnapshot, &rpc, option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<RaftId>,
        option: RPCOption,
    ) -> Result<VoteResponse<RaftId>, Failed<openraft::error::Infallible>> {
        self.call(Method::Vote, &rpc, option).await
    }
}

/// The receiving side: hands this cluster's managers' messages to the local raft node.
pub(crate) struct RaftApi {
    cluster: ClusterId,
    store: Store,
}

impl RaftApi {
    pub(crate) fn new(cluster: ClusterId, store: Store) -> RaftApi {
        RaftApi { cluster, store }
    }

    /// The TLS layer checked the chain to the cluster CA; this checks it is a manager's, of this
    /// cluster, and not of a removed node. (A manager that just joined has no state yet, so the
    /// certificate is what counts, with the denylist once the state knows it.)
    fn authorize<T>(&self, request: &Request<T>) -> Result<(), Status> {
        let leaf = request.peer_certs().and_then(|c| c.first().cloned());
        let info = leaf
            .and_then(|der| CertInfo::from_der(&der).ok())
            .ok_or_else(|| Status::unauthenticated("raft messages need a manager certificate"))?;
        let id = match info.holder(self.cluster.as_str()) {
            Ok(Holder::Node { id, role: Role::Manager }) => id,
            _ => return Err(Status::permission_denied("raft messages are for this cluster's managers only")),
        };
        let removed = self.store.read(|s| s.nodes.get(&id).is_some_and(|n| n.state == NodeState::Removed));
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
        encode(&self.store.raft().append_entries(decode(&request)?).await)
    }

    async fn vote(&self, request: Request<pb::RaftMessage>) -> Result<Response<pb::RaftMessage>, Status> {
        self.authorize(&request)?;
        encode(&self.store.raft().vote(decode(&request)?).await)
    }

    async fn install_snapshot(
        &self,
        request: Request<pb::RaftMessage>,
    ) -> Result<Response<pb::RaftMessage>, Status> {
        self.authorize(&request)?;
        encode(&self.store.raft().install_snapshot(decode(&request)?).await)
    }
}
