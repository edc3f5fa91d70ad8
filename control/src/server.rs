//! The control API served over TLS: the identity service (CA fetch, join, renewal) and the admin
//! service, and the connection handling that lets a removed node's connections be cut at once.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use rustls::ServerConfig;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::auth::{self, Caller};
use crate::ca::{CertInfo, ClusterCa, Subject};
use crate::cluster::{self, ManagerDir, Opened};
use crate::ids::NodeId;
use crate::proto::pb;
use crate::store::{Command, NodeRecord, NodeState, Store};
use crate::tls::{self, Identity};
use crate::tokens::{JoinToken, Role};

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the manager checks whether its own certificate is due for renewal.
const SELF_RENEW_CHECK: Duration = Duration::from_secs(60);
/// Longest hostname accepted in a join.
const MAX_HOSTNAME: usize = 253;

/// The running manager: the cluster state, the CA, and the live connections.
pub struct Manager {
    dir: ManagerDir,
    store: Store,
    ca: ClusterCa,
    server_tls: Mutex<Arc<ServerConfig>>,
    last_seen: Mutex<HashMap<NodeId, i64>>,
    connections: Mutex<HashMap<NodeId, Vec<CancellationToken>>>,
    join_attempts: AtomicU64,
}

impl Manager {
    pub fn new(opened: Opened) -> Result<Arc<Manager>, tls::TlsError> {
        let server_tls = tls::server_config(opened.ca.cert_der(), &opened.manager_identity)?;
        Ok(Arc::new(Manager {
            dir: opened.dir,
            store: opened.store,
            ca: opened.ca,
            server_tls: Mutex::new(server_tls),
            last_seen: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            join_attempts: AtomicU64::new(0),
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn ca(&self) -> &ClusterCa {
        &self.ca
    }

    /// Join calls received since start, whatever their outcome.
    pub fn join_attempts(&self) -> u64 {
        self.join_attempts.load(Ordering::Relaxed)
    }

    /// Identifies the caller and, for nodes, notes that it was seen.
    fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let caller = self.store.read(|state| auth::caller(request, state))?;
        if let Caller::Node { id, .. } = &caller {
            let now = OffsetDateTime::now_utc().unix_timestamp();
            self.last_seen.lock().expect("lock").insert(id.clone(), now);
        }
        Ok(caller)
    }

    /// Cuts every open connection of `node`.
    fn cut(&self, node: &NodeId) {
        let tokens = self
            .connections
            .lock()
            .expect("lock")
            .remove(node)
            .unwrap_or_default();
        let open = tokens.iter().filter(|t| !t.is_cancelled()).count();
        for token in tokens {
            token.cancel();
        }
        info!(node = %node, connections = open, "cut the connections of a removed node");
    }

    /// Registers a connection authenticated as `node` so it can be cut; prunes closed ones.
    fn track(&self, node: NodeId, token: CancellationToken) {
        let mut connections = self.connections.lock().expect("lock");
        let list = connections.entry(node).or_default();
        list.retain(|t| !t.is_cancelled());
        list.push(token);
    }

    /// Re-issues this manager's own server certificate once past half its lifetime.
    fn renew_own_certificate_if_due(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let current = cluster::open_identity(&self.dir)?;
        let info = CertInfo::from_pem(&current.cert_pem)?;
        let now = OffsetDateTime::now_utc();
        let half = info.not_before + (info.not_after - info.not_before) / 2;
        if now < half {
            return Ok(());
        }
        let id: NodeId = info.common_name.parse()?;
        let (cluster_id, lifetime) = self
            .store
            .read(|s| (s.cluster_id.clone(), s.cert_lifetime()));
        let (cert_pem, key_pem) = self.ca.issue_with_new_key(&Subject::node(
            &cluster_id,
            &id,
            Role::Manager,
            lifetime,
        ))?;
        let identity = Identity { cert_pem, key_pem };
        let config = tls::server_config(self.ca.cert_der(), &identity)?;
        self.dir.write_manager_identity(&identity)?;
        let not_after = CertInfo::from_pem(&identity.cert_pem)?
            .not_after
            .unix_timestamp();
        self.store.apply(Command::RecordCertificate {
            id: id.clone(),
            not_after,
        })?;
        *self.server_tls.lock().expect("lock") = config;
        info!(node = %id, "renewed the manager's own certificate");
        Ok(())
    }
}

/// Serves the control API on `listener` until `shutdown` completes.
pub async fn serve(
    manager: Arc<Manager>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Cuttable>>(64);
    let acceptor_manager = manager.clone();
    let _accept = AbortOnDrop(tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let manager = acceptor_manager.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let config = manager.server_tls.lock().expect("lock").clone();
                let handshake = TlsAcceptor::from(config).accept(tcp);
                let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                let token = CancellationToken::new();
                if let Some(node) = peer_node(&tls) {
                    manager.track(node, token.clone());
                }
                let _ = tx.send(Ok(Cuttable::new(tls, token))).await;
            });
        }
    }));
    let renew_manager = manager.clone();
    let _renew = AbortOnDrop(tokio::spawn(async move {
        loop {
            if let Err(e) = renew_manager.renew_own_certificate_if_due() {
                warn!(error = %e, "renewing the manager's own certificate failed; will retry");
            }
            tokio::time::sleep(SELF_RENEW_CHECK).await;
        }
    }));
    tonic::transport::Server::builder()
        .add_service(pb::identity_server::IdentityServer::new(IdentityApi(
            manager.clone(),
        )))
        .add_service(pb::admin_server::AdminServer::new(AdminApi(manager)))
        .serve_with_incoming_shutdown(ReceiverStream::new(rx), shutdown)
        .await
}

/// Stops a background task when the future that spawned it is dropped or done.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The node ID of a connection's client certificate, if it carries one.
fn peer_node(tls: &TlsStream<TcpStream>) -> Option<NodeId> {
    let leaf = tls.get_ref().1.peer_certificates()?.first()?;
    let info = CertInfo::from_der(leaf).ok()?;
    Role::from_ou(&info.unit)?;
    info.common_name.parse().ok()
}

/// A TLS connection that can be cut from outside: once its token is cancelled every read and write
/// fails, which makes the HTTP/2 server drop the connection.
pub struct Cuttable {
    inner: TlsStream<TcpStream>,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    token: CancellationToken,
}

impl Cuttable {
    fn new(inner: TlsStream<TcpStream>, token: CancellationToken) -> Cuttable {
        Cuttable {
            inner,
            cut: Box::pin(token.clone().cancelled_owned()),
            token,
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(
                io::ErrorKind::ConnectionAborted,
                "node removed",
            )),
            Poll::Pending => Ok(()),
        }
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        // Marks the connection closed so the registry can prune it.
        self.token.cancel();
    }
}

impl Connected for Cuttable {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Cuttable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Cuttable {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

fn internal(e: impl std::fmt::Display) -> Status {
    warn!(error = %e, "internal error");
    Status::internal(e.to_string())
}

/// Issues a node certificate for `csr_pem` and records its expiry.
fn issue_node_certificate(
    manager: &Manager,
    csr_pem: &str,
    id: &NodeId,
    role: Role,
) -> Result<(String, i64), Status> {
    let (cluster_id, lifetime) = manager
        .store
        .read(|s| (s.cluster_id.clone(), s.cert_lifetime()));
    let cert_pem = manager
        .ca
        .issue_for_csr(csr_pem, &Subject::node(&cluster_id, id, role, lifetime))
        .map_err(|e| Status::invalid_argument(e.to_string()))?;
    let not_after = CertInfo::from_pem(&cert_pem)
        .map_err(internal)?
        .not_after
        .unix_timestamp();
    Ok((cert_pem, not_after))
}

struct IdentityApi(Arc<Manager>);

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityApi {
    async fn get_root_ca(
        &self,
        _request: Request<pb::GetRootCaRequest>,
    ) -> Result<Response<pb::GetRootCaResponse>, Status> {
        Ok(Response::new(pb::GetRootCaResponse {
            ca_pem: self.0.ca.cert_pem().to_owned(),
        }))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let manager = &self.0;
        manager.join_attempts.fetch_add(1, Ordering::Relaxed);
        let req = request.into_inner();
        let token: JoinToken = req
            .token
            .parse()
            .map_err(|e| Status::invalid_argument(format!("malformed join token: {e}")))?;
        if token.ca_digest() != manager.ca.digest() {
            return Err(Status::permission_denied(format!(
                "the join token pins CA digest {}, but this cluster's CA digest is {}",
                token.ca_digest(),
                manager.ca.digest()
            )));
        }
        let role = manager
            .store
            .read(|s| s.role_for_token(&token.secret_hash()))
            .ok_or_else(|| {
                warn!("join refused: the token's secret matches no current join token");
                Status::permission_denied(
                    "invalid join token: its secret matches no current token (rotated or wrong)",
                )
            })?;
        let hostname = req.hostname.trim();
        if hostname.is_empty()
            || hostname.len() > MAX_HOSTNAME
            || !hostname
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
        {
            return Err(Status::invalid_argument(format!(
                "hostname `{}` is not valid: 1 to {MAX_HOSTNAME} characters of a-z, 0-9, `-`, `.`, `_`",
                hostname.escape_default()
            )));
        }
        let id = NodeId::random();
        let (cert_pem, not_after) = issue_node_certificate(manager, &req.csr_pem, &id, role)?;
        manager
            .store
            .apply(Command::AddNode(NodeRecord {
                id: id.clone(),
                hostname: hostname.to_owned(),
                role,
                state: NodeState::Active,
                joined_at: OffsetDateTime::now_utc().unix_timestamp(),
                cert_not_after: not_after,
            }))
            .map_err(internal)?;
        info!(node = %id, %role, hostname, "node joined");
        Ok(Response::new(pb::JoinResponse {
            node_id: id.to_string(),
            cert_pem,
            ca_pem: manager.ca.cert_pem().to_owned(),
        }))
    }

    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let manager = &self.0;
        let (id, role) = match manager.caller(&request)? {
            Caller::Node { id, role } => (id, role),
            Caller::Admin => {
                return Err(Status::permission_denied("only nodes renew certificates"));
            }
        };
        let (cert_pem, not_after) =
            issue_node_certificate(manager, &request.get_ref().csr_pem, &id, role)?;
        manager
            .store
            .apply(Command::RecordCertificate {
                id: id.clone(),
                not_after,
            })
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        info!(node = %id, "renewed a node certificate");
        Ok(Response::new(pb::RenewResponse { cert_pem }))
    }
}

struct AdminApi(Arc<Manager>);

impl AdminApi {
    fn admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        auth::require_admin(&self.0.caller(request)?)
    }

    fn node(&self, id: &str) -> Result<pb::Node, Status> {
        let id: NodeId = id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        let last_seen = self.0.last_seen.lock().expect("lock").get(&id).copied();
        self.0.store.read(|s| {
            s.nodes
                .get(&id)
                .map(|record| pb::Node::from_record(record, last_seen))
                .ok_or_else(|| Status::not_found(format!("no node with ID {id}")))
        })
    }
}

#[tonic::async_trait]
impl pb::admin_server::Admin for AdminApi {
    async fn list_nodes(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.admin(&request)?;
        let last_seen = self.0.last_seen.lock().expect("lock").clone();
        let nodes = self.0.store.read(|s| {
            s.nodes
                .values()
                .map(|record| pb::Node::from_record(record, last_seen.get(&record.id).copied()))
                .collect()
        });
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn inspect_node(
        &self,
        request: Request<pb::InspectNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.admin(&request)?;
        Ok(Response::new(self.node(&request.get_ref().id)?))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.admin(&request)?;
        let id: NodeId = request
            .get_ref()
            .id
            .parse()
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        self.0
            .store
            .apply(Command::RemoveNode { id: id.clone() })
            .map_err(|e| match e {
                crate::store::StoreError::UnknownNode(_) => Status::not_found(e.to_string()),
                crate::store::StoreError::NodeRemoved(_) => {
                    Status::failed_precondition(e.to_string())
                }
                other => internal(other),
            })?;
        self.0.cut(&id);
        info!(node = %id, "node removed");
        Ok(Response::new(self.node(id.as_str())?))
    }

    async fn join_token(
        &self,
        request: Request<pb::JoinTokenRequest>,
    ) -> Result<Response<pb::JoinTokenResponse>, Status> {
        self.admin(&request)?;
        let role: Role = pb::Role::try_from(request.get_ref().role)
            .unwrap_or(pb::Role::Unspecified)
            .try_into()
            .map_err(|e| Status::invalid_argument(format!("{e}")))?;
        let manager = &self.0;
        if request.get_ref().rotate {
            let token = JoinToken::generate(&manager.ca.digest());
            // The hash goes into the state first: from that moment the old token is refused.
            manager
                .store
                .apply(Command::SetToken {
                    role,
                    hash: token.secret_hash(),
                })
                .map_err(internal)?;
            manager.dir.write_token(role, &token).map_err(internal)?;
            info!(%role, "join token rotated");
            return Ok(Response::new(pb::JoinTokenResponse {
                token: token.to_string(),
            }));
        }
        let token = manager.dir.read_token(role).map_err(internal)?;
        Ok(Response::new(pb::JoinTokenResponse {
            token: token.to_string(),
        }))
    }
}
