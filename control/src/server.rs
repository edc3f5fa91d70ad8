//! The running manager: the cluster state and CA, who is connected, the one path by which
//! changes are made, the background loops (reconcile, key rotation, its own certificate), and the
//! TLS listener whose connections can be cut when a node is removed.

use std::collections::{BTreeSet, HashMap};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use rustls::ServerConfig;
use time::OffsetDateTime;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tonic::transport::server::Connected;
use tonic::{Request, Status};
use tracing::{debug, info, warn};

use crate::api::{admin::AdminApi, identity::IdentityApi};
use crate::auth::{self, Caller};
use crate::ca::{CertInfo, ClusterCa, Subject};
use crate::cluster::{self, ManagerDir, Opened};
use crate::dispatcher::DispatcherApi;
use crate::ids::NodeId;
use crate::orchestrator::{self, Liveness, PlanError};
use crate::proto::pb;
use crate::state::{ClusterState, Command, NodeState};
use crate::store::{Store, StoreError};
use crate::tls::{self, Identity};
use crate::tokens::Role;

/// How long a client has to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the manager checks whether its own certificate is due for renewal.
const SELF_RENEW_CHECK: Duration = Duration::from_secs(60);
/// How often placement and key rotation are checked.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// Network key rotation interval unless told otherwise.
pub const DEFAULT_KEY_ROTATION: Duration = Duration::from_secs(12 * 3600);
/// How long a node may be without a session before its endpoints move elsewhere.
pub const DEFAULT_DOWN_AFTER: Duration = Duration::from_secs(15);

/// How the manager runs.
#[derive(Clone, Debug)]
pub struct ManagerOptions {
    pub key_rotation: Duration,
    pub down_after: Duration,
    /// Lifetime of workload certificates.
    pub workload_cert_lifetime: Duration,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            key_rotation: DEFAULT_KEY_ROTATION,
            down_after: DEFAULT_DOWN_AFTER,
            workload_cert_lifetime: crate::ca::DEFAULT_WORKLOAD_CERT_LIFETIME,
        }
    }
}

/// Open sessions of a node, and since when it has had none.
#[derive(Clone, Copy, Debug)]
struct Presence {
    open: usize,
    since: Instant,
}

/// Why a change could not be made.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ChangeError> for Status {
    fn from(e: ChangeError) -> Status {
        use crate::state::StateError as S;
        let message = e.to_string();
        match e {
            ChangeError::Plan(p) => match p {
                PlanError::UnknownNetwork(_) | PlanError::UnknownService(_) | PlanError::UnknownNode(_) => {
                    Status::not_found(message)
                }
                PlanError::State(S::UnknownNode(_)) => Status::not_found(message),
                PlanError::NetworkExists(_) | PlanError::ServiceExists(_) => Status::already_exists(message),
                PlanError::UnknownPolicyVersion(_) => Status::not_found(message),
                PlanError::TooFewNodes { .. }
                | PlanError::State(_)
                | PlanError::Unencrypted(_)
                | PlanError::PolicyTests { .. } => Status::failed_precondition(message),
                PlanError::Ipam(crate::ipam::IpamError::Exhausted { .. }) => {
                    Status::resource_exhausted(message)
                }
                _ => Status::invalid_argument(message),
            },
            ChangeError::Store(StoreError::State(_)) => Status::failed_precondition(message),
            ChangeError::Store(_) => {
                warn!(error = %message, "storing a change failed");
                Status::internal(message)
            }
        }
    }
}

/// The running manager.
pub struct Manager {
    pub(crate) dir: ManagerDir,
    pub(crate) store: Store,
    pub(crate) ca: ClusterCa,
    pub(crate) options: ManagerOptions,
    server_tls: Mutex<Arc<ServerConfig>>,
    pub(crate) last_seen: Mutex<HashMap<NodeId, i64>>,
    /// Open connections by the node they authenticated as (`None`: admin or unauthenticated).
    connections: Mutex<HashMap<Option<NodeId>, Vec<CancellationToken>>>,
    presence: Mutex<HashMap<NodeId, Presence>>,
    started: Instant,
    pub(crate) join_attempts: AtomicU64,
    pub(crate) policies: crate::dispatcher::PolicyCache,
    /// Serializes changes: a plan is made and applied with no other change in between.
    writer: tokio::sync::Mutex<()>,
}

impl Manager {
    pub fn new(opened: Opened, options: ManagerOptions) -> Result<Arc<Manager>, tls::TlsError> {
        let server_tls = tls::server_config(opened.ca.cert_der(), &opened.manager_identity)?;
        Ok(Arc::new(Manager {
            dir: opened.dir,
            store: opened.store,
            ca: opened.ca,
            options,
            server_tls: Mutex::new(server_tls),
            last_seen: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
            started: Instant::now(),
            join_attempts: AtomicU64::new(0),
            policies: Default::default(),
            writer: tokio::sync::Mutex::new(()),
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

    /// Makes a change: `plan` reads the state and liveness and returns commands; key rotations
    /// for networks that a node leaves are added; all are applied together or not at all.
    pub async fn change<F>(&self, plan: F) -> Result<(), ChangeError>
    where
        F: FnOnce(&ClusterState, &Liveness) -> Result<Vec<Command>, PlanError>,
    {
        let _writer = self.writer.lock().await;
        let live = self.liveness();
        let now = OffsetDateTime::now_utc().unix_timestamp();
        let commands = self.store.read(|state| {
            let commands = plan(state, &live)?;
            orchestrator::with_rotations(state, commands, now)
        })?;
        if !commands.is_empty() {
            self.store.apply_all(commands).await?;
        }
        Ok(())
    }

    /// Which nodes have a session now, and which are not (yet) considered down.
    pub fn liveness(&self) -> Liveness {
        let presence = self.presence.lock().expect("lock").clone();
        let now = Instant::now();
        let mut live = Liveness::default();
        self.store.read(|s| {
            for node in s.nodes.values().filter(|n| n.state == NodeState::Active) {
                let p = presence.get(&node.id).copied().unwrap_or(Presence { open: 0, since: self.started });
                if p.open > 0 {
                    live.connected.insert(node.id.clone());
                }
                if p.open > 0 || now.duration_since(p.since) < self.options.down_after {
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

    /// Notes a session opened by `node`; the guard notes its end when dropped.
    pub(crate) fn session_opened(self: &Arc<Self>, node: &NodeId) -> SessionGuard {
        let mut presence = self.presence.lock().expect("lock");
        let p = presence.entry(node.clone()).or_insert(Presence { open: 0, since: Instant::now() });
        p.open += 1;
        SessionGuard { manager: self.clone(), node: node.clone() }
    }

    /// Identifies the caller and, for nodes, notes that it was seen.
    pub(crate) fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let caller = self.store.read(|state| auth::caller(request, state))?;
        if let Caller::Node { id, .. } = &caller {
            let now = OffsetDateTime::now_utc().unix_timestamp();
            self.last_seen.lock().expect("lock").insert(id.clone(), now);
        }
        Ok(caller)
    }

    /// Cuts every open connection of `node`.
    pub(crate) fn cut(&self, node: &NodeId) {
        let tokens = self.connections.lock().expect("lock").remove(&Some(node.clone())).unwrap_or_default();
        let open = tokens.iter().filter(|t| !t.is_cancelled()).count();
        for token in tokens {
            token.cancel();
        }
        info!(node = %node, connections = open, "cut the connections of a removed node");
    }

    /// Cuts every open connection (at shutdown: sessions are long-lived and would hold a graceful
    /// shutdown open forever).
    pub fn close_all(&self) {
        for token in self.connections.lock().expect("lock").drain().flat_map(|(_, t)| t) {
            token.cancel();
        }
    }

    /// Registers a connection (authenticated as `node`, if any) so it can be cut; prunes closed ones.
    fn track(&self, node: Option<NodeId>, token: CancellationToken) {
        let mut connections = self.connections.lock().expect("lock");
        let list = connections.entry(node).or_default();
        list.retain(|t| !t.is_cancelled());
        list.push(token);
    }

    /// Issues a node certificate for `csr_pem`.
    pub(crate) fn issue_node_certificate(
        &self,
        csr_pem: &str,
        id: &NodeId,
        role: Role,
    ) -> Result<(String, i64), Status> {
        let (cluster_id, lifetime) = self.store.read(|s| (s.cluster_id.clone(), s.cert_lifetime()));
        let cert_pem = self
            .ca
            .issue_for_csr(csr_pem, &Subject::node(&cluster_id, id, role, lifetime))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let not_after = CertInfo::from_pem(&cert_pem)
            .map_err(|e| Status::internal(e.to_string()))?
            .not_after
            .unix_timestamp();
        Ok((cert_pem, not_after))
    }

    /// Moves endpoints off down or ineligible nodes, fills missing replicas, and turns key rings
    /// that are due.
    async fn reconcile(&self) -> Result<(), ChangeError> {
        let interval = self.options.key_rotation.as_secs() as i64;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        self.change(|state, live| {
            let mut commands = orchestrator::reconcile(state, live);
            commands.extend(orchestrator::due_rotations(state, interval, now));
            Ok(commands)
        })
        .await
    }

    /// Re-issues this manager's own server certificate once past half its lifetime.
    async fn renew_own_certificate_if_due(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let current = cluster::open_identity(&self.dir)?;
        let info = CertInfo::from_pem(&current.cert_pem)?;
        let now = OffsetDateTime::now_utc();
        let half = info.not_before + (info.not_after - info.not_before) / 2;
        if now < half {
            return Ok(());
        }
        let id: NodeId = info.common_name.parse()?;
        let (cluster_id, lifetime) = self.store.read(|s| (s.cluster_id.clone(), s.cert_lifetime()));
        let (cert_pem, key_pem) =
            self.ca.issue_with_new_key(&Subject::node(&cluster_id, &id, Role::Manager, lifetime))?;
        let identity = Identity { cert_pem, key_pem };
        let config = tls::server_config(self.ca.cert_der(), &identity)?;
        self.dir.write_manager_identity(&identity)?;
        let not_after = CertInfo::from_pem(&identity.cert_pem)?.not_after.unix_timestamp();
        self.store.apply(Command::RecordCertificate { id: id.clone(), not_after }).await?;
        *self.server_tls.lock().expect("lock") = config;
        info!(node = %id, "renewed the manager's own certificate");
        Ok(())
    }
}

/// Marks a node's session closed when dropped.
pub(crate) struct SessionGuard {
    manager: Arc<Manager>,
    node: NodeId,
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

/// Serves the control API on `listener` until `shutdown` completes.
pub async fn serve(
    manager: Arc<Manager>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Cuttable>>(64);
    let acceptor = manager.clone();
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
            let manager = acceptor.clone();
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
                manager.track(peer_node(&tls), token.clone());
                let _ = tx.send(Ok(Cuttable::new(tls, token))).await;
            });
        }
    }));
    let background = manager.clone();
    let _background = AbortOnDrop(tokio::spawn(async move {
        let mut last_self_check: Option<Instant> = None;
        loop {
            if last_self_check.is_none_or(|t| t.elapsed() >= SELF_RENEW_CHECK) {
                last_self_check = Some(Instant::now());
                if let Err(e) = background.renew_own_certificate_if_due().await {
                    warn!(error = %e, "renewing the manager's own certificate failed; will retry");
                }
            }
            if let Err(e) = background.reconcile().await {
                warn!(error = %e, "reconcile failed; will retry");
            }
            tokio::time::sleep(RECONCILE_EVERY).await;
        }
    }));
    let closer = manager.clone();
    let shutdown = async move {
        shutdown.await;
        closer.close_all();
    };
    tonic::transport::Server::builder()
        .add_service(pb::identity_server::IdentityServer::new(IdentityApi(manager.clone())))
        .add_service(pb::admin_server::AdminServer::new(AdminApi(manager.clone())))
        .add_service(pb::dispatcher_server::DispatcherServer::new(DispatcherApi(manager)))
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
        Cuttable { inner, cut: Box::pin(token.clone().cancelled_owned()), token }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.cut.as_mut().poll(cx) {
            Poll::Ready(()) => Err(io::Error::new(io::ErrorKind::ConnectionAborted, "node removed")),
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
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
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
