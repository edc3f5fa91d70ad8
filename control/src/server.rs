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

use crate::api::{admin::AdminApi, identity::IdentityApi, managers::ManagersApi, raft::RaftApi};
use crate::auth::{self, Caller};
use crate::ca::{CertInfo, ClusterCa, Subject};
use crate::client;
use crate::cluster::{self, ManagerConfig, ManagerDir, Opened};
use crate::dispatcher::DispatcherApi;
use crate::ids::ClusterId;
use crate::ids::NodeId;
use crate::joining;
use crate::orchestrator::{self, Liveness, PlanError};
use crate::peers::Peers;
use crate::proto::pb;
use crate::seal::{DataKey, UnlockKey};
use crate::state::{ClusterState, Command, NodeState};
use crate::store::{Store, StoreError};
use crate::tls::ServerTrust;
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
            ChangeError::Store(StoreError::NotLeader { leader }) => not_leading(message, leader.as_deref()),
            ChangeError::Store(StoreError::NoQuorum(_)) => Status::unavailable(message),
            ChangeError::Store(_) => {
                warn!(error = %message, "storing a change failed");
                Status::internal(message)
            }
        }
    }
}

/// A follower's refusal, naming the leader when there is one.
pub(crate) fn not_leading(message: String, leader: Option<&str>) -> Status {
    let mut status = Status::unavailable(message);
    if let Some(value) = leader.and_then(|l| l.parse().ok()) {
        status.metadata_mut().insert(crate::client::LEADER_HEADER, value);
    }
    status
}

/// The root CA certificate (the key is in the replicated state).
pub(crate) struct CaCert {
    pub(crate) pem: String,
    pub(crate) der: Vec<u8>,
    pub(crate) digest: String,
}

/// The running manager.
pub struct Manager {
    pub(crate) dir: ManagerDir,
    pub(crate) store: Store,
    pub(crate) cluster_id: ClusterId,
    pub(crate) ca_cert: CaCert,
    /// The CA with its key, loaded from the state when first needed.
    signer: Mutex<Option<Arc<ClusterCa>>>,
    pub(crate) peers: Peers,
    pub(crate) options: ManagerOptions,
    pub(crate) config: ManagerConfig,
    data_key: DataKey,
    server_tls: Mutex<Arc<ServerConfig>>,
    /// Since when this manager leads (sessions reconnect to it from then on); `None` unless leading.
    leading_since: Mutex<Option<Instant>>,
    pub(crate) last_seen: Mutex<HashMap<NodeId, i64>>,
    /// Open connections by the node they authenticated as (`None`: admin or unauthenticated).
    connections: Mutex<HashMap<Option<NodeId>, Vec<CancellationToken>>>,
    presence: Mutex<HashMap<NodeId, Presence>>,
    pub(crate) join_attempts: AtomicU64,
    pub(crate) policies: crate::dispatcher::PolicyCache,
    pub(crate) memberships: crate::dispatcher::Memberships,
    pub(crate) metrics: crate::metrics::Metrics,
    /// Serializes changes: a plan is made and applied with no other change in between.
    writer: tokio::sync::Mutex<()>,
}

impl Manager {
    pub fn new(opened: Opened, options: ManagerOptions) -> Result<Arc<Manager>, tls::TlsError> {
        let der = crate::ca::pem_to_der(&opened.ca_pem)
            .map_err(|e| tls::TlsError::Pem { what: "CA certificate", detail: e.to_string() })?;
        let server_tls = tls::server_config(&der, &opened.manager_identity)?;
        let digest = crate::ids::digest_base36(&der);
        Ok(Arc::new(Manager {
            dir: opened.dir,
            store: opened.store,
            cluster_id: opened.cluster_id,
            ca_cert: CaCert { pem: opened.ca_pem, der, digest },
            signer: Mutex::new(None),
            peers: opened.peers,
            options,
            config: opened.config,
            data_key: opened.data_key,
            server_tls: Mutex::new(server_tls),
            leading_since: Mutex::new(None),
            last_seen: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
            join_attempts: AtomicU64::new(0),
            policies: Default::default(),
            memberships: Default::default(),
            metrics: Default::default(),
            writer: tokio::sync::Mutex::new(()),
        }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The cluster CA, key included (from the replicated state).
    pub fn ca(&self) -> Result<Arc<ClusterCa>, Status> {
        let mut signer = self.signer.lock().expect("lock");
        if let Some(ca) = signer.as_ref() {
            return Ok(ca.clone());
        }
        let record = self
            .store
            .read(|s| s.ca.clone())
            .ok_or_else(|| Status::unavailable("this manager has not received the cluster CA yet"))?;
        let ca = ClusterCa::load(&record.cert_pem, &record.key_pem.0)
            .map_err(|e| Status::internal(format!("the cluster CA in the state is unusable: {e}")))?;
        let ca = Arc::new(ca);
        *signer = Some(ca.clone());
        Ok(ca)
    }

    /// The root CA certificate (DER).
    pub fn ca_der(&self) -> &[u8] {
        &self.ca_cert.der
    }

    /// Refuses unless this manager leads (and a majority acknowledged it lately); the refusal
    /// names the leader, for clients to go there.
    pub(crate) fn lead(&self) -> Result<(), Status> {
        let l = self.store.leadership();
        if l.leading {
            return Ok(());
        }
        let leader = l.leader_addr().filter(|_| l.leader != Some(l.me));
        let message = match leader {
            Some(addr) => format!("this manager does not lead the cluster; the leader is at {addr}"),
            None => "this manager does not lead the cluster and knows no leader now; retry shortly".into(),
        };
        Err(not_leading(message, leader))
    }

    /// Whether the managers would still have a working majority with `raft_id` no longer voting:
    /// there must be a voter left, and the voters left that answer lately must be a majority of
    /// the voters left.
    pub(crate) fn quorum_after_demoting(&self, raft_id: u64) -> Result<(), String> {
        let l = self.store.leadership();
        if l.leader == Some(raft_id) {
            return Err("it leads the cluster; demote it once another manager leads".into());
        }
        let left: Vec<u64> = l.voters.keys().copied().filter(|v| *v != raft_id).collect();
        if left.is_empty() {
            return Err("it is the last voting manager".into());
        }
        let reachable = left.iter().filter(|v| **v == l.me || self.peers.reachable(**v)).count();
        let needed = left.len() / 2 + 1;
        if reachable < needed {
            return Err(format!(
                "{reachable} of the {} managers that would still vote are reachable, {needed} are needed for a majority",
                left.len()
            ));
        }
        Ok(())
    }

    /// Every manager's control address, the leader first.
    pub fn manager_addresses(&self) -> Vec<String> {
        let l = self.store.leadership();
        let mut out: Vec<String> = l.leader_addr().map(str::to_owned).into_iter().collect();
        for addr in l.voters.values().chain(l.learners.values()) {
            if !out.contains(addr) && !addr.is_empty() {
                out.push(addr.clone());
            }
        }
        out
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
        // A node not seen since this manager took the lead gets `down_after` from then to reconnect.
        let since = self.leading_since.lock().expect("lock").unwrap_or(now);
        let mut live = Liveness::default();
        self.store.read(|s| {
            for node in s.nodes.values().filter(|n| n.state == NodeState::Active) {
                let p = presence.get(&node.id).copied().unwrap_or(Presence { open: 0, since });
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

    /// The manager's metrics as they stand (see [`crate::metrics`]).
    pub fn metrics_text(&self) -> String {
        let m = &self.metrics;
        let raft = self.store.watch_raft().borrow().clone();
        m.leader.set(i64::from(self.store.leadership().leading));
        m.term.set(i64::try_from(raft.current_term).unwrap_or(i64::MAX));
        m.applied_index.set(raft.last_applied.map_or(0, |l| i64::try_from(l.index).unwrap_or(i64::MAX)));
        m.sessions.set(i64::try_from(self.connected().len()).unwrap_or(i64::MAX));
        let (active, removed, networks, services) = self.store.read(|s| {
            let removed = s.nodes.values().filter(|n| n.state == crate::state::NodeState::Removed).count();
            (s.nodes.len() - removed, removed, s.networks.len(), s.services.len())
        });
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        m.nodes.get_or_create(&crate::metrics::NodeStateLabel { state: "active" }).set(count(active));
        m.nodes.get_or_create(&crate::metrics::NodeStateLabel { state: "removed" }).set(count(removed));
        m.networks.set(count(networks));
        m.services.set(count(services));
        m.encode()
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

    /// Identifies the caller and, for nodes, notes that it was seen. Only the leader answers.
    pub(crate) fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        self.lead()?;
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

    /// Cuts every connection authenticated as a node (their sessions then go to the leader);
    /// admins' calls in flight finish with their own answer.
    fn close_nodes(&self) {
        let mut connections = self.connections.lock().expect("lock");
        for token in connections.iter_mut().filter(|(node, _)| node.is_some()).flat_map(|(_, t)| t.drain(..))
        {
            token.cancel();
        }
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
            .ca()?
            .issue_for_csr(csr_pem, &Subject::node(&cluster_id, id, role, lifetime))
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let kind = if role == Role::Manager { "manager" } else { "worker" };
        self.metrics.certificates.get_or_create(&crate::metrics::CertKind { kind }).inc();
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

    /// Re-issues this manager's own certificate once past half its lifetime: the leader issues
    /// it itself, a follower asks the leader for one (as meshd does).
    async fn renew_own_certificate_if_due(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let current = cluster::open_identity(&self.dir)?;
        let info = CertInfo::from_pem(&current.cert_pem)?;
        let now = OffsetDateTime::now_utc();
        let half = info.not_before + (info.not_after - info.not_before) / 2;
        if now < half {
            return Ok(());
        }
        let id: NodeId = info.common_name.parse()?;
        let identity = if self.store.leadership().leading {
            let (cluster_id, lifetime) = self.store.read(|s| (s.cluster_id.clone(), s.cert_lifetime()));
            let (cert_pem, key_pem) =
                self.ca()?.issue_with_new_key(&Subject::node(&cluster_id, &id, Role::Manager, lifetime))?;
            self.metrics.certificates.get_or_create(&crate::metrics::CertKind { kind: "manager" }).inc();
            let not_after = CertInfo::from_pem(&cert_pem)?.not_after.unix_timestamp();
            self.store.apply(Command::RecordCertificate { id: id.clone(), not_after }).await?;
            Identity { cert_pem, key_pem }
        } else {
            let (key, csr_pem) = joining::key_and_csr()?;
            let leader = self.leader_as(&current, &self.manager_addresses()).await?;
            let cert_pem = pb::identity_client::IdentityClient::new(leader.channel)
                .renew(pb::RenewRequest { csr_pem })
                .await
                .map_err(|s| client::ClientError::refused(&leader.addr, s))?
                .into_inner()
                .cert_pem;
            joining::check_issued(&cert_pem, &self.ca_cert.pem, &key, Some(&id))?;
            Identity { cert_pem, key_pem: key.serialize_pem() }
        };
        let config = tls::server_config(&self.ca_cert.der, &identity)?;
        self.dir.write_manager_identity(&identity)?;
        self.peers.set_identity(&self.ca_cert.der, &identity)?;
        *self.server_tls.lock().expect("lock") = config;
        info!(node = %id, "renewed the manager's own certificate");
        Ok(())
    }

    /// Follows leadership: taking the lead gives every node `down_after` from now to reconnect
    /// before its endpoints move; losing it (or a majority's acknowledgement, when cut off) cuts
    /// every node session, so nodes go to the manager that leads.
    async fn follow_leadership(self: Arc<Self>) {
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

    /// Keeps this manager's data key file wrapped by the unlock key in force, or in the clear
    /// when autolock is off. `opened_with` is how the file was when the manager started.
    async fn follow_autolock(self: Arc<Self>, opened_with: Option<String>) {
        // The state read at start may predate entries still being re-applied from the log.
        let last = self.store.raft().metrics().borrow().last_log_index;
        let _ = self
            .store
            .raft()
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(last, "caught up")
            .await;
        let mut revisions = self.store.subscribe();
        let mut current = opened_with;
        loop {
            let wanted = self.store.read(|s| s.unlock_key.as_ref().map(|k| k.0.clone()));
            if wanted != current {
                match wanted.as_deref().map(str::parse::<UnlockKey>).transpose() {
                    Ok(unlock) => match self.dir.write_data_key(&self.data_key, unlock.as_ref()) {
                        Ok(()) => {
                            info!(autolock = unlock.is_some(), "rewrote the data key file");
                            current = wanted;
                        }
                        Err(e) => warn!(error = %e, "rewriting the data key file failed; will retry"),
                    },
                    Err(e) => warn!(error = %e, "the unlock key in the state is malformed"),
                }
            }
            if revisions.changed().await.is_err() {
                return;
            }
        }
    }

    /// A manager that joined asks the leader to add it to the raft group, until it is a member.
    async fn join_raft_group(self: Arc<Self>) {
        if self.config.join.is_empty() {
            return;
        }
        loop {
            if self.store.leadership().is_member(self.store.id()) {
                return;
            }
            match self.ask_to_be_added().await {
                Ok(()) => {
                    info!(raft_id = self.store.id(), "added to the managers' raft group");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "asking to be added to the managers' raft group failed; will retry")
                }
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
    }

    /// The leader among `managers`, reached with this manager's `identity`.
    async fn leader_as(
        &self,
        identity: &Identity,
        managers: &[String],
    ) -> Result<client::Leader, client::ClientError> {
        let config = tls::client_config(ServerTrust::Ca(&self.ca_cert.der), Some(identity))?;
        client::leader(managers, config).await
    }

    async fn ask_to_be_added(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let identity = cluster::open_identity(&self.dir)?;
        let leader = self.leader_as(&identity, &self.config.join).await?;
        pb::managers_client::ManagersClient::new(leader.channel)
            .add_manager(pb::AddManagerRequest { control: self.config.advertise.to_string() })
            .await
            .map_err(|s| client::ClientError::refused(&leader.addr, s))?;
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

/// Accepts TLS connections on `listener` (configuration from `tls` at each handshake), registers
/// each with `track` so it can be cut, and hands them to the gRPC server.
fn accept_tls(
    listener: TcpListener,
    tls: impl Fn() -> Arc<ServerConfig> + Send + Sync + 'static,
    track: impl Fn(Option<NodeId>, CancellationToken) + Send + Sync + 'static,
) -> (ReceiverStream<io::Result<Cuttable>>, AbortOnDrop) {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Cuttable>>(64);
    let hooks = Arc::new((tls, track));
    let task = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let hooks = hooks.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let handshake = TlsAcceptor::from((hooks.0)()).accept(tcp);
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
                (hooks.1)(peer_node(&tls), token.clone());
                let _ = tx.send(Ok(Cuttable::new(tls, token))).await;
            });
        }
    });
    (ReceiverStream::new(rx), AbortOnDrop(task))
}

/// Serves the control API on `listener` until `shutdown` completes.
pub async fn serve(
    manager: Arc<Manager>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    opened_with: Option<&UnlockKey>,
) -> Result<(), tonic::transport::Error> {
    let (tls, track) = (manager.clone(), manager.clone());
    let (incoming, _accept) = accept_tls(
        listener,
        move || tls.server_tls.lock().expect("lock").clone(),
        move |node, token| track.track(node, token),
    );
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
            if background.store.leadership().leading
                && let Err(e) = background.reconcile().await
            {
                warn!(error = %e, "reconcile failed; will retry");
            }
            tokio::time::sleep(RECONCILE_EVERY).await;
        }
    }));
    let _leadership = AbortOnDrop(tokio::spawn(manager.clone().follow_leadership()));
    let opened_with = opened_with.map(|k| k.to_string());
    let _autolock = AbortOnDrop(tokio::spawn(manager.clone().follow_autolock(opened_with)));
    let _join = AbortOnDrop(tokio::spawn(manager.clone().join_raft_group()));
    let closer = manager.clone();
    let shutdown = async move {
        shutdown.await;
        closer.close_all();
    };
    tonic::transport::Server::builder()
        .add_service(pb::identity_server::IdentityServer::new(IdentityApi(manager.clone())))
        .add_service(pb::admin_server::AdminServer::new(AdminApi(manager.clone())))
        .add_service(pb::managers_server::ManagersServer::new(ManagersApi(manager.clone())))
        .add_service(
            pb::raft_server::RaftServer::new(RaftApi(manager.clone()))
                .max_decoding_message_size(crate::peers::MAX_MESSAGE)
                .max_encoding_message_size(crate::peers::MAX_MESSAGE),
        )
        .add_service(pb::dispatcher_server::DispatcherServer::new(DispatcherApi(manager)))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}

/// Serves a locked manager on `listener`: nothing but `Unlock`, until an admin gives the key that
/// opens this manager's data key, which is returned.
pub async fn serve_locked(
    root: &std::path::Path,
    listener: TcpListener,
) -> Result<UnlockKey, cluster::ClusterError> {
    let dir = ManagerDir::new(root);
    let ca_pem = crate::files::read_string(&dir.ca_cert())?;
    let der = crate::ca::pem_to_der(&ca_pem)?;
    let config = tls::server_config(&der, &cluster::open_identity(&dir)?)
        .map_err(|e| cluster::ClusterError::Corrupt { path: dir.manager_cert(), error: e.to_string() })?;
    let cluster = CertInfo::from_pem(&ca_pem)?.organization;
    let (unlocked, mut key) = tokio::sync::mpsc::channel(1);
    let api = crate::api::managers::LockedApi { dir, cluster, unlocked };
    let (incoming, _accept) = accept_tls(listener, move || config.clone(), |_, _| {});
    let server = tonic::transport::Server::builder()
        .add_service(pb::managers_server::ManagersServer::new(api))
        .serve_with_incoming(incoming);
    tokio::select! {
        key = key.recv() => Ok(key.expect("the server holds the sender")),
        result = server => Err(cluster::ClusterError::Corrupt {
            path: root.to_owned(),
            error: format!("the locked manager's server stopped: {result:?}"),
        }),
    }
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
