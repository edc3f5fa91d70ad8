//! The running manager: the cluster state and CA, and the one path by which changes are made
//! ([`Manager::change`]: a plan applied whole, under one lock). Its concerns each have a module:
//! who is connected ([`presence`]), the connections that can be cut ([`connections`]), following
//! leadership ([`leadership`]), autolock ([`autolock`]), its own certificate ([`renewal`]) and
//! the roots it trusts, rotated ([`rotation`]).
//! It never builds the handlers: [`crate::serve`] does, and wires them to it.

pub mod autolock;
pub mod connections;
pub mod leadership;
pub mod presence;
pub mod renewal;
pub mod reports;
pub mod requests;
pub mod rotation;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mesh_api::ids::{ClusterId, NodeId};
use mesh_api::pki::CertInfo;
use mesh_api::tls::{self, Identity};
use mesh_api::tokens::Role;
use mesh_api::trust::Trust;
use rustls::ServerConfig;
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Status};
use tracing::warn;

use crate::auth::{self, Caller};
use crate::ca::{CaError, ClusterCa, Signer, Subject};
use crate::config::ManagerOptions;
use crate::plans::{self, Liveness, PlanError};
use crate::raft::network::Peers;
use crate::raft::seal::DataKey;
use crate::raft::store::{Store, StoreError};
use crate::state::{ClusterState, Command};
use crate::statedir::{ManagerConfig, ManagerDir, Opened};
use presence::Presence;

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
                PlanError::Ipam(crate::planning::ipam::IpamError::Exhausted { .. }) => {
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
        status.metadata_mut().insert(mesh_api::client::LEADER_HEADER, value);
    }
    status
}

/// The roots as this manager uses them now (the keys are in the replicated state): read from
/// its `ca.crt` at start, then following the state ([`Manager::follow_trust`]).
pub(crate) struct CaView {
    pub(crate) trust: Trust,
    /// During a rotation, the cross-signature that vouches for the new root; else empty.
    pub(crate) cross_pem: String,
}

impl CaView {
    /// The digest of the root that signs now: what join tokens pin.
    pub(crate) fn digest(&self) -> &str {
        &self.trust.newest().digest
    }
}

/// A node certificate issued: the chain, its expiry (Unix seconds) and the digest of the root
/// that signed it.
pub(crate) struct Issued {
    pub(crate) cert_pem: String,
    pub(crate) not_after: i64,
    pub(crate) root: String,
}

/// The running manager.
pub struct Manager {
    pub(crate) dir: ManagerDir,
    pub(crate) store: Store,
    pub(crate) cluster_id: ClusterId,
    ca_view: Mutex<Arc<CaView>>,
    /// The CA with its key, loaded from the state when first needed (and again once it changed).
    signer: Mutex<Option<(String, Arc<Signer>)>>,
    pub(crate) peers: Peers,
    pub(crate) options: ManagerOptions,
    pub(crate) config: ManagerConfig,
    /// This manager's own node ID.
    pub(crate) node_id: NodeId,
    /// When each node renewed lately (see [`crate::config::RENEWALS_PER_WINDOW`]).
    renewals: Mutex<HashMap<NodeId, std::collections::VecDeque<Instant>>>,
    /// Cancelled once this manager finds itself removed from the cluster.
    pub(crate) removed: CancellationToken,
    data_key: Mutex<DataKey>,
    server_tls: Mutex<Arc<ServerConfig>>,
    /// Since when this manager leads (sessions reconnect to it from then on); `None` unless leading.
    leading_since: Mutex<Option<Instant>>,
    pub(crate) last_seen: Mutex<HashMap<NodeId, i64>>,
    /// Open connections by the node they authenticated as (`None`: admin or unauthenticated).
    connections: Mutex<HashMap<Option<NodeId>, Vec<CancellationToken>>>,
    presence: Mutex<HashMap<NodeId, Presence>>,
    pub(crate) join_attempts: AtomicU64,
    pub(crate) policies: crate::slicer::PolicyCache,
    pub(crate) memberships: crate::slicer::Memberships,
    pub(crate) metrics: crate::metrics::Metrics,
    /// What nodes report of their endpoints.
    pub(crate) reports: reports::Reports,
    /// Requests waiting for nodes' answers.
    pub(crate) requests: requests::Requests,
    /// Serializes changes: a plan is made and applied with no other change in between.
    writer: tokio::sync::Mutex<()>,
    /// Held while this manager renews its own certificate (on schedule, or for a new root).
    pub(crate) own_renewal: tokio::sync::Mutex<()>,
}
impl Manager {
    pub fn new(opened: Opened, options: ManagerOptions) -> Result<Arc<Manager>, tls::TlsError> {
        let trust = Trust::from_pem(&opened.ca_pem)
            .map_err(|e| tls::TlsError::Pem { what: "CA certificate", detail: e.to_string() })?;
        let server_tls = tls::server_config(&trust, &opened.manager_identity)?;
        let node_id = CertInfo::from_pem(&opened.manager_identity.cert_pem)
            .ok()
            .and_then(|info| info.common_name.parse().ok())
            .ok_or(tls::TlsError::Pem {
                what: "manager certificate",
                detail: "no node ID as its CN".into(),
            })?;
        Ok(Arc::new(Manager {
            dir: opened.dir,
            store: opened.store,
            cluster_id: opened.cluster_id,
            ca_view: Mutex::new(Arc::new(CaView { trust, cross_pem: String::new() })),
            signer: Mutex::new(None),
            peers: opened.peers,
            options,
            config: opened.config,
            node_id,
            removed: CancellationToken::new(),
            renewals: Mutex::new(HashMap::new()),
            data_key: Mutex::new(opened.data_key),
            server_tls: Mutex::new(server_tls),
            leading_since: Mutex::new(None),
            last_seen: Mutex::new(HashMap::new()),
            connections: Mutex::new(HashMap::new()),
            presence: Mutex::new(HashMap::new()),
            join_attempts: AtomicU64::new(0),
            policies: Default::default(),
            memberships: Default::default(),
            metrics: Default::default(),
            reports: Default::default(),
            requests: Default::default(),
            writer: tokio::sync::Mutex::new(()),
            own_renewal: tokio::sync::Mutex::new(()),
        }))
    }

    /// The control port's TLS configuration of the moment (renewals replace it).
    pub(crate) fn server_tls(&self) -> Arc<ServerConfig> {
        self.server_tls.lock().expect("lock").clone()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// This manager's own certificate and key, as its state directory holds them (the key
    /// sealed by the data key).
    pub(crate) fn identity(&self) -> Result<mesh_api::tls::Identity, crate::statedir::ClusterError> {
        crate::statedir::open_identity(&self.dir, &self.data_key.lock().expect("lock"))
    }

    /// What signs the cluster's certificates now (from the replicated state): its own root, key
    /// included and carrying the cross-signature during a root rotation, or the external CA.
    pub fn ca(&self) -> Result<Arc<Signer>, Status> {
        let (record, chain, proof) =
            self.store.read(|s| (s.ca.clone(), s.cross_pem().to_owned(), s.slice_cross_pem().to_owned()));
        let record =
            record.ok_or_else(|| Status::unavailable("this manager has not received the cluster CA yet"))?;
        // Only a root the roots trusted here vouch for signs, whoever wrote it into the state.
        let offered = Trust::from_pem(&record.cert_pem)
            .map_err(|e| Status::internal(format!("the cluster CA in the state is unusable: {e}")))?;
        self.ca_view().trust.accept(&offered, &proof).map_err(|e| {
            Status::failed_precondition(format!(
                "the cluster's signing root is not vouched for by a root this manager trusts: {e}"
            ))
        })?;
        let key = format!("{}{chain}", record.cert_pem);
        let mut signer = self.signer.lock().expect("lock");
        if let Some((k, ca)) = signer.as_ref()
            && *k == key
        {
            return Ok(ca.clone());
        }
        let unusable = |e: CaError| Status::internal(format!("the cluster CA in the state is unusable: {e}"));
        let ca = match &record.external {
            None => Signer::Own(
                ClusterCa::load(&record.cert_pem, &record.key_pem.0).map_err(unusable)?.with_chain(&chain),
            ),
            Some(external) => {
                let auth_key = crate::ca::cfssl::parse_auth_key(&external.auth_key.0)
                    .map_err(|e| unusable(CaError::Given(e)))?;
                Signer::External(
                    crate::ca::cfssl::Cfssl::new(&external.url, &auth_key, &record.cert_pem)
                        .map_err(unusable)?
                        .with_chain(&chain),
                )
            }
        };
        let ca = Arc::new(ca);
        *signer = Some((key, ca.clone()));
        Ok(ca)
    }

    /// The roots this manager trusts now.
    pub fn roots(&self) -> Trust {
        self.ca_view().trust.clone()
    }

    /// The roots this manager trusts now, with the cross-signature of a rotation.
    pub(crate) fn ca_view(&self) -> Arc<CaView> {
        self.ca_view.lock().expect("lock").clone()
    }

    /// Puts the roots of `view` in place: for the control port and raft from their next
    /// connection on.
    pub(crate) fn set_ca_view(&self, view: CaView, identity: &Identity) -> Result<(), tls::TlsError> {
        let config = tls::server_config(&view.trust, identity)?;
        self.peers.set_identity(&view.trust, identity)?;
        *self.server_tls.lock().expect("lock") = config;
        *self.ca_view.lock().expect("lock") = Arc::new(view);
        Ok(())
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
    /// Every manager's node ID (removed ones are not managers any more): the certificates
    /// nodes and admins accept as control.
    pub fn manager_ids(&self) -> Vec<String> {
        self.store.read(|s| s.managers().map(|m| m.id.to_string()).collect())
    }

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
        // No rekey when a node leaves a network: its pair keys leave every other node's slice
        // with it (see `planning::keys`).
        let commands = self.store.read(|state| plan(state, &live))?;
        if !commands.is_empty() {
            self.store.apply_all(commands).await?;
        }
        Ok(())
    }

    /// Moves endpoints off down or ineligible nodes, fills missing replicas, steps rolling
    /// updates, and turns key rings that are due.
    pub(crate) async fn reconcile(&self) -> Result<(), ChangeError> {
        let interval = self.settings().key_rotation.as_secs() as i64;
        let now = OffsetDateTime::now_utc().unix_timestamp();
        self.change(|state, live| {
            let mut commands = plans::reconcile(state, live);
            // Rolling updates step on the endpoints as placed now.
            let report = |node: &NodeId, service: &str, slot: u32| self.reports.of(node, service, slot);
            commands.extend(plans::roll_out(&plans::after(state, &commands)?, &report, now));
            commands.extend(plans::due_rotations(state, interval, now));
            Ok(commands)
        })
        .await
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

    /// The cluster-wide settings in force: those stored in the state, else this process's.
    pub fn settings(&self) -> ManagerOptions {
        let stored = self.store.read(|s| s.settings.clone());
        let or = |secs: Option<u64>, default: Duration| secs.map_or(default, Duration::from_secs);
        ManagerOptions {
            key_rotation: or(stored.key_rotation_secs, self.options.key_rotation),
            down_after: or(stored.down_after_secs, self.options.down_after),
            workload_cert_lifetime: or(
                stored.workload_cert_lifetime_secs,
                self.options.workload_cert_lifetime,
            ),
        }
    }

    /// Counts a renewal by `node`, or refuses it when the node renewed too often lately.
    pub(crate) fn allow_renewal(&self, node: &NodeId) -> Result<(), Status> {
        use crate::config::{RENEWAL_WINDOW, RENEWALS_PER_WINDOW};
        let now = Instant::now();
        let mut renewals = self.renewals.lock().expect("lock");
        renewals.retain(|_, times| times.back().is_some_and(|t| now.duration_since(*t) < RENEWAL_WINDOW));
        let times = renewals.entry(node.clone()).or_default();
        while times.front().is_some_and(|t| now.duration_since(*t) >= RENEWAL_WINDOW) {
            times.pop_front();
        }
        if times.len() >= RENEWALS_PER_WINDOW {
            let wait = RENEWAL_WINDOW - now.duration_since(times[0]);
            return Err(Status::resource_exhausted(format!(
                "node {node} renewed its certificate {} times in the last {}; renew again in {}",
                times.len(),
                humantime::format_duration(RENEWAL_WINDOW),
                humantime::format_duration(Duration::from_secs(wait.as_secs() + 1))
            )));
        }
        times.push_back(now);
        Ok(())
    }

    /// Issues a node certificate for `csr_pem`.
    pub(crate) async fn issue_node_certificate(
        &self,
        csr_pem: &str,
        id: &NodeId,
        role: Role,
    ) -> Result<Issued, Status> {
        let (cluster_id, lifetime) = self.store.read(|s| (s.cluster_id.clone(), s.cert_lifetime()));
        let ca = self.ca()?;
        let cert_pem = ca
            .issue_for_csr(csr_pem, &Subject::node(&cluster_id, id, role, lifetime))
            .await
            .map_err(|e| e.status())?;
        let kind = if role == Role::Manager { "manager" } else { "worker" };
        self.metrics.certificates.get_or_create(&crate::metrics::CertKind { kind }).inc();
        let not_after = CertInfo::from_pem(&cert_pem)
            .map_err(|e| Status::internal(e.to_string()))?
            .not_after
            .unix_timestamp();
        Ok(Issued { cert_pem, not_after, root: ca.digest() })
    }
}
