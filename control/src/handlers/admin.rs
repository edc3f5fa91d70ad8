//! The admin service: nodes, join tokens, networks and services, cluster settings and admin
//! credentials. Admin certificate only (one the cluster has not revoked).

use mesh_api::model::Transport;
use std::sync::Arc;

use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use tracing::info;

use crate::auth;
use crate::ca::Subject;
use crate::config;
use crate::manager::Manager;
use crate::manager::reports::Reports;
use crate::manager::rotation::NewRoot;
use crate::plans::{self, ServiceSpec, ServiceUpdate, UpdateOptions};
use crate::raft::seal::UnlockKey;
use crate::raft::store::Leadership;
use crate::state::{
    AdminRecord, ClusterState, Command, Network, NodeRecord, NodeState, OnFailure, PortSpec, RolloutState,
    Secret, Service, Settings,
};
use mesh_api::ids::NodeId;
use mesh_api::model::RunSpec;
use mesh_api::pki::CertInfo;
use mesh_api::proto::pb;
use mesh_api::tokens::{JoinToken, Role};

pub(crate) struct AdminApi(pub(crate) Arc<Manager>);

fn now() -> i64 {
    OffsetDateTime::now_utc().unix_timestamp()
}

fn node_id(text: &str) -> Result<NodeId, Status> {
    text.parse().map_err(|e| Status::invalid_argument(format!("{e}")))
}

/// A network as admins see it: everything but key bytes.
fn network_pb(state: &ClusterState, n: &Network) -> pb::Network {
    pb::Network {
        name: n.name.clone(),
        subnet: n.subnet.to_string(),
        id: n.id,
        encrypted: n.transport() != Transport::None,
        transport: n.transport().to_string(),
        current_epoch: match (&n.keys, n.wireguard) {
            (_, Some(g)) => g.generation,
            (Some(k), None) => k.current.epoch,
            (None, None) => 0,
        },
        rotated_at: match (&n.keys, n.wireguard) {
            (_, Some(g)) => g.rotated_at,
            (Some(k), None) => k.rotated_at,
            (None, None) => 0,
        },
        endpoints: state.endpoints().filter(|(_, e)| e.addresses.contains_key(&n.name)).count() as u32,
        nodes: state.nodes_on_network(&n.name).into_iter().map(|id| id.to_string()).collect(),
    }
}

/// What an admin sees of a secret: never its bytes.
fn secret_pb(state: &ClusterState, name: &str) -> pb::SecretInfo {
    let record = &state.secrets[name];
    pb::SecretInfo {
        name: name.to_owned(),
        digest: record.digest.clone(),
        size: record.size,
        created_at: record.created_at,
        services: state.secret_users(name),
    }
}

/// A service as admins see it; `reports` tells how many of its endpoints run.
fn service_pb(state: &ClusterState, s: &Service, reports: &Reports) -> pb::Service {
    let running = s
        .endpoints
        .values()
        .filter(|e| reports.of(&e.node, &s.name, e.slot).is_some_and(|r| r.state.up()))
        .count();
    let rollout = s.rollout.as_ref().map(|r| {
        let (state, message) = match &r.state {
            RolloutState::Paused(why) => ("paused", why.clone()),
            RolloutState::Updating => ("updating", r.failure.clone().unwrap_or_default()),
            RolloutState::Completed => ("completed", r.failure.clone().unwrap_or_default()),
        };
        pb::Rollout {
            state: state.to_owned(),
            message,
            rollback: r.rollback,
            updated: s.endpoints.values().filter(|e| e.version == s.version).count() as u32,
            total: s.endpoints.len() as u32,
            parallelism: r.parallelism,
            delay_secs: r.delay_secs,
            monitor_secs: r.monitor_secs,
            on_failure: on_failure_name(r.on_failure).to_owned(),
            started_at: r.started_at,
        }
    });
    pb::Service {
        signed: s.signed.is_some(),
        spec: s
            .signed
            .as_ref()
            .map(|x| pb::SignedSpec { document: x.document.clone(), signature: x.signature.clone() }),
        version: s.version,
        previous: s.previous,
        rollout,
        running: running as u32,
        name: s.name.clone(),
        networks: s.networks.clone(),
        ports: s.ports.iter().copied().map(pb::Port::from).collect(),
        publish: s.publish.iter().map(ToString::to_string).collect(),
        publish_nodes: s
            .publish
            .iter()
            .flat_map(|p| plans::publish::nodes(state, s, p))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .map(|n| n.to_string())
            .collect(),
        replicas: s.replicas,
        constraints: s.constraints.iter().map(|c| c.to_string()).collect(),
        command: s.command.clone().unwrap_or_default(),
        run: Some(s.run.clone().into()),
        vips: s
            .vips
            .iter()
            .map(|(n, a)| pb::ServiceVip { network: n.clone(), address: a.to_string() })
            .collect(),
        endpoints: s
            .endpoints
            .values()
            .map(|e| pb::Endpoint {
                service: s.name.clone(),
                slot: e.slot,
                node: e.node.to_string(),
                addresses: e
                    .addresses
                    .iter()
                    .map(|(n, a)| pb::EndpointAddress { network: n.clone(), address: a.to_string() })
                    .collect(),
                command: String::new(),
                run: None,
                secrets: vec![],
                version: e.version,
                signed: None,
            })
            .collect(),
    }
}

fn signed_spec(s: pb::SignedSpec) -> mesh_api::specs::SignedSpec {
    mesh_api::specs::SignedSpec { document: s.document, signature: s.signature }
}

fn on_failure_name(a: OnFailure) -> &'static str {
    match a {
        OnFailure::Pause => "pause",
        OnFailure::Rollback => "rollback",
    }
}

fn update_options(o: Option<pb::UpdateOptions>) -> Result<UpdateOptions, Status> {
    let Some(o) = o else { return Ok(UpdateOptions::default()) };
    let on_failure = match o.on_failure.as_str() {
        "" | "pause" => OnFailure::Pause,
        "rollback" => OnFailure::Rollback,
        other => {
            return Err(Status::invalid_argument(format!(
                "update failure action `{other}` is not valid: pause or rollback"
            )));
        }
    };
    Ok(UpdateOptions {
        parallelism: o.parallelism,
        delay_secs: o.delay_secs,
        monitor_secs: o.monitor_secs,
        on_failure,
    })
}

fn port(p: &pb::Port) -> Result<PortSpec, Status> {
    PortSpec::try_from(p.clone()).map_err(|e| {
        Status::invalid_argument(format!(
            "port `{}/{}` is not valid ({e}): a port is 1-65535, its protocol tcp, udp or http",
            p.port, p.protocol
        ))
    })
}

impl AdminApi {
    fn admin<T>(&self, request: &Request<T>) -> Result<(), Status> {
        auth::require_admin(&self.0.caller(request)?)
    }

    /// For an admin's call about a manager: its node ID, raft ID, and the raft group now.
    fn manager_member(
        &self,
        request: &Request<pb::InspectNodeRequest>,
    ) -> Result<(NodeId, u64, Leadership), Status> {
        self.admin(request)?;
        let id = node_id(&request.get_ref().id)?;
        let raft_id = self.manager_raft_id(&id)?;
        Ok((id, raft_id, self.0.store.leadership()))
    }

    /// Whether manager `id` may be removed: never the leader; one that votes only with `force`
    /// (docker swarm's rule: demote first), and only if the voters left keep a majority.
    fn check_manager_removal(&self, id: &NodeId, raft_id: u64, force: bool) -> Result<(), Status> {
        let l = self.0.store.leadership();
        if l.leader == Some(raft_id) {
            return Err(Status::failed_precondition(format!(
                "manager {id} leads the cluster: stop its mesh-control so that another manager leads, then remove it"
            )));
        }
        if l.voters.contains_key(&raft_id) {
            if !force {
                return Err(Status::failed_precondition(format!(
                    "manager {id} votes in the managers' raft group: demote it first (`meshctl node demote {id}`), \
                     or remove it with --force"
                )));
            }
            if let Err(reason) = self.0.quorum_after_demoting(raft_id) {
                return Err(Status::failed_precondition(format!(
                    "refusing to remove manager {id}: {reason}"
                )));
            }
        }
        Ok(())
    }

    /// Puts a new unlock key in force (autolock on, or rotated) and returns it.
    async fn new_unlock_key(&self) -> Result<Secret, Status> {
        let key = Secret(UnlockKey::generate().to_string());
        let set = Command::SetUnlockKey(Some(key.clone()));
        self.0.change(move |_, _| Ok(vec![set])).await?;
        Ok(key)
    }

    /// The raft ID of manager `id`, or why it has none.
    fn manager_raft_id(&self, id: &NodeId) -> Result<u64, Status> {
        self.0.store.read(|s| match s.active_node(id) {
            Ok(n) if n.role == Role::Manager => Ok(n.raft_id()),
            Ok(_) => Err(Status::failed_precondition(format!(
                "node {id} is a worker: a manager joins with `mesh-control join --token MANAGER_TOKEN`"
            ))),
            Err(e) => Err(Status::not_found(e.to_string())),
        })
    }

    fn node(&self, id: &NodeId) -> Result<pb::Node, Status> {
        let last_seen = self.0.last_seen.lock().expect("lock").get(id).copied();
        let connected = self.0.connected().contains(id);
        let leadership = self.0.store.leadership();
        self.0.store.read(|s| {
            s.nodes
                .get(id)
                .map(|record| self.node_pb(record, &leadership, last_seen, connected))
                .ok_or_else(|| Status::not_found(format!("no node with ID {id}")))
        })
    }

    /// A node as admins see it; for a manager, with its standing in the raft group.
    fn node_pb(
        &self,
        record: &NodeRecord,
        l: &Leadership,
        last_seen: Option<i64>,
        connected: bool,
    ) -> pb::Node {
        let mut node = pb::Node {
            id: record.id.to_string(),
            hostname: record.hostname.clone(),
            role: pb::Role::from(record.role).into(),
            state: pb::NodeState::from(record.state).into(),
            cert_not_after: record.cert_not_after,
            joined_at: record.joined_at,
            last_seen: last_seen.unwrap_or(0),
            connected,
            labels: record.labels.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            manager_status: String::new(),
            control: record.control.map(|c| c.to_string()).unwrap_or_default(),
        };
        if record.role == Role::Manager && record.state == NodeState::Active {
            let id = record.raft_id();
            let reach = if l.leader == Some(id) {
                "leader"
            } else if !l.is_member(id) {
                "not yet a member"
            } else if self.0.peers.reachable(id) {
                "reachable"
            } else {
                "unreachable"
            };
            let voter = if l.learners.contains_key(&id) { " (non-voter)" } else { "" };
            node.manager_status = format!("{reach}{voter}");
        }
        node
    }

    fn network(&self, name: &str) -> Result<pb::Network, Status> {
        self.0.store.read(|s| {
            s.networks
                .get(name)
                .map(|n| network_pb(s, n))
                .ok_or_else(|| Status::not_found(format!("no network named `{name}`")))
        })
    }

    fn service(&self, name: &str) -> Result<pb::Service, Status> {
        self.0.store.read(|s| {
            s.services
                .get(name)
                .map(|service| service_pb(s, service, &self.0.reports))
                .ok_or_else(|| Status::not_found(format!("no service named `{name}`")))
        })
    }

    fn secret(&self, name: &str) -> Result<pb::SecretInfo, Status> {
        self.0.store.read(|s| {
            if s.secrets.contains_key(name) {
                Ok(secret_pb(s, name))
            } else {
                Err(Status::not_found(format!("no secret named `{name}`")))
            }
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
        let connected = self.0.connected();
        let leadership = self.0.store.leadership();
        let nodes = self.0.store.read(|s| {
            s.nodes
                .values()
                .map(|r| {
                    self.node_pb(r, &leadership, last_seen.get(&r.id).copied(), connected.contains(&r.id))
                })
                .collect()
        });
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    async fn inspect_node(
        &self,
        request: Request<pb::InspectNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.admin(&request)?;
        Ok(Response::new(self.node(&node_id(&request.get_ref().id)?)?))
    }

    async fn remove_node(
        &self,
        request: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.admin(&request)?;
        let id = node_id(&request.get_ref().id)?;
        let force = request.get_ref().force;
        let manager = self
            .0
            .store
            .read(|s| s.nodes.get(&id).filter(|n| n.role == Role::Manager).map(|n| (n.raft_id(), n.state)));
        let manager = match manager {
            // A removal whose leaving the raft group failed: finish it.
            Some((raft_id, NodeState::Removed)) if self.0.store.leadership().is_member(raft_id) => {
                Some(raft_id)
            }
            Some((raft_id, NodeState::Active)) => {
                self.check_manager_removal(&id, raft_id, force)?;
                // The removal is in the state before the manager leaves the raft group, so that
                // it learns of it (and stops) from the log, as the last entry it is sent.
                self.0.change(|state, live| plans::remove_node(state, &id, live)).await?;
                Some(raft_id)
            }
            _ => {
                self.0.change(|state, live| plans::remove_node(state, &id, live)).await?;
                None
            }
        };
        if let Some(raft_id) = manager {
            self.0.store.remove_member(raft_id).await.map_err(|e| {
                Status::unavailable(format!(
                    "manager {id} is removed from the cluster, but leaving the raft group failed ({e}); \
                     run `meshctl node rm {id} --force` again"
                ))
            })?;
            info!(node = %id, raft_id, "manager left the raft group");
        }
        self.0.cut(&id);
        info!(node = %id, "node removed");
        Ok(Response::new(self.node(&id)?))
    }

    async fn update_node(
        &self,
        request: Request<pb::UpdateNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        self.admin(&request)?;
        let req = request.into_inner();
        let id = node_id(&req.id)?;
        self.0
            .change(|state, live| plans::update_labels(state, &id, &req.label_add, &req.label_rm, live))
            .await?;
        info!(node = %id, add = ?req.label_add, rm = ?req.label_rm, "node labels updated");
        Ok(Response::new(self.node(&id)?))
    }

    async fn ca_status(
        &self,
        request: Request<pb::CaStatusRequest>,
    ) -> Result<Response<pb::CaStatusResponse>, Status> {
        self.admin(&request)?;
        let mut status = ca_status_pb(self.0.ca_progress()?);
        status.external = self
            .0
            .store
            .read(|s| s.ca.as_ref().and_then(|c| c.external.as_ref()).map(|e| e.url.clone()))
            .unwrap_or_default();
        if let Ok(signer) = self.0.ca()
            && let crate::ca::Signer::External(external) = &*signer
            && let Some((at, error)) = external.last_failure()
        {
            status.external_error = error;
            status.external_error_at = at.unix_timestamp();
        }
        Ok(Response::new(status))
    }

    async fn rotate_ca(
        &self,
        request: Request<pb::RotateCaRequest>,
    ) -> Result<Response<pb::CaStatusResponse>, Status> {
        self.admin(&request)?;
        let req = request.into_inner();
        let present = |s: &str| !s.is_empty();
        let new = match (present(&req.cert_pem), present(&req.key_pem), present(&req.external_url)) {
            (false, false, false) => NewRoot::Made,
            (true, true, false) => NewRoot::Given { cert_pem: req.cert_pem, key_pem: req.key_pem },
            (true, false, true) if present(&req.external_auth_key) => NewRoot::External {
                cert_pem: req.cert_pem,
                url: req.external_url,
                auth_key: req.external_auth_key,
            },
            (true, false, true) => {
                return Err(Status::invalid_argument(
                    "an external CA needs its auth key (--external-ca-key)",
                ));
            }
            (_, true, true) => {
                return Err(Status::invalid_argument("an external CA's root comes without its key"));
            }
            (false, _, true) => {
                return Err(Status::invalid_argument("an external CA needs its root certificate"));
            }
            _ => return Err(Status::invalid_argument("a root given needs both its certificate and its key")),
        };
        self.0.rotate_ca(new, present(&req.cross_pem).then_some(req.cross_pem)).await?;
        Ok(Response::new(ca_status_pb(self.0.ca_progress()?)))
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
            let token = JoinToken::generate(manager.ca_view().digest());
            // From the moment this is committed the old token is refused.
            let set = Command::set_token(role, &token);
            manager.change(move |_, _| Ok(vec![set])).await?;
            info!(%role, "join token rotated");
            return Ok(Response::new(pb::JoinTokenResponse { token: token.to_string() }));
        }
        let token = manager
            .store
            .read(|s| s.join_tokens.get(&role).map(|t| t.0.clone()))
            .ok_or_else(|| Status::internal(format!("the state holds no {role} token")))?;
        Ok(Response::new(pb::JoinTokenResponse { token }))
    }

    async fn promote_node(
        &self,
        request: Request<pb::InspectNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let (id, raft_id, l) = self.manager_member(&request)?;
        if l.voters.contains_key(&raft_id) {
            return Err(Status::failed_precondition(format!("manager {id} already votes")));
        }
        if !l.learners.contains_key(&raft_id) {
            return Err(Status::failed_precondition(format!(
                "manager {id} is not in the raft group yet (it is added once its mesh-control serves)"
            )));
        }
        self.0.store.set_voter(raft_id, true).await.map_err(|e| Status::unavailable(e.to_string()))?;
        let promoted = Command::SetDemoted { id: id.clone(), demoted: false };
        self.0.change(move |_, _| Ok(vec![promoted])).await?;
        info!(node = %id, "manager promoted to voter");
        Ok(Response::new(self.node(&id)?))
    }

    async fn demote_node(
        &self,
        request: Request<pb::InspectNodeRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let (id, raft_id, l) = self.manager_member(&request)?;
        if !l.voters.contains_key(&raft_id) {
            return Err(Status::failed_precondition(format!("manager {id} does not vote already")));
        }
        if let Err(reason) = self.0.quorum_after_demoting(raft_id) {
            return Err(Status::failed_precondition(format!("refusing to demote manager {id}: {reason}")));
        }
        // Recorded first: from then on its own asking to vote is refused.
        let demoted = Command::SetDemoted { id: id.clone(), demoted: true };
        self.0.change(move |_, _| Ok(vec![demoted])).await?;
        self.0.store.set_voter(raft_id, false).await.map_err(|e| Status::unavailable(e.to_string()))?;
        info!(node = %id, "manager demoted: it keeps a copy of the state but does not vote");
        Ok(Response::new(self.node(&id)?))
    }

    async fn update_cluster(
        &self,
        request: Request<pb::UpdateClusterRequest>,
    ) -> Result<Response<pb::UnlockKeyResponse>, Status> {
        self.admin(&request)?;
        let req = request.into_inner();
        let settings = Settings {
            key_rotation_secs: req.key_rotation_secs,
            down_after_secs: req.down_after_secs,
            workload_cert_lifetime_secs: req.workload_cert_expiry_secs,
        };
        let cert_lifetime_secs = req.cert_expiry_secs;
        if cert_lifetime_secs.is_some() || settings != Settings::default() {
            let update = Command::UpdateSettings { cert_lifetime_secs, settings: settings.clone() };
            self.0.change(move |_, _| Ok(vec![update])).await?;
            info!(?settings, ?cert_lifetime_secs, "cluster settings changed");
        }
        let current = self.0.store.read(|s| s.unlock_key.clone());
        let key = match (req.autolock, current) {
            (Some(true), Some(key)) => key,
            (Some(true), None) => {
                let key = self.new_unlock_key().await?;
                info!("autolock turned on");
                key
            }
            (Some(false), _) => {
                self.0.change(|_, _| Ok(vec![Command::SetUnlockKey(None)])).await?;
                info!("autolock turned off");
                Secret(String::new())
            }
            (None, _) => Secret(String::new()),
        };
        Ok(Response::new(pb::UnlockKeyResponse { key: key.0 }))
    }

    async fn issue_admin(
        &self,
        request: Request<pb::IssueAdminRequest>,
    ) -> Result<Response<pb::IssueAdminResponse>, Status> {
        self.admin(&request)?;
        let req = request.into_inner();
        let lifetime = match req.expiry_secs {
            0 => config::DEFAULT_ADMIN_CERT_LIFETIME,
            secs => std::time::Duration::from_secs(secs),
        };
        let range = config::ADMIN_CERT_LIFETIME_RANGE;
        if !range.contains(&lifetime) {
            let show = |d: std::time::Duration| humantime::format_duration(d).to_string();
            return Err(Status::invalid_argument(format!(
                "an admin credential lasts between {} and {}, not {}",
                show(*range.start()),
                show(*range.end()),
                show(lifetime)
            )));
        }
        if req.label.len() > 200 || req.label.chars().any(char::is_control) {
            return Err(Status::invalid_argument(
                "the label is at most 200 characters, none a control character",
            ));
        }
        let cluster = self.0.store.read(|s| s.cluster_id.clone());
        let cert_pem = self
            .0
            .ca()?
            .issue_for_csr(&req.csr_pem, &Subject::admin(&cluster, lifetime))
            .await
            .map_err(|e| e.status())?;
        let info = CertInfo::from_pem(&cert_pem).map_err(super::internal)?;
        let record =
            AdminRecord { label: req.label, issued_at: now(), not_after: info.not_after.unix_timestamp() };
        let add = Command::AddAdmin { serial: info.serial.clone(), record: record.clone() };
        self.0.change(move |_, _| Ok(vec![add])).await?;
        info!(serial = %info.serial, label = %record.label, "admin credential issued");
        Ok(Response::new(pb::IssueAdminResponse {
            cert_pem,
            ca_pem: self.0.store.read(|s| s.trust_pem()),
            managers: self.0.manager_addresses(),
            credential: Some(admin_pb(&info.serial, &record)),
            manager_ids: self.0.manager_ids(),
        }))
    }

    async fn list_admins(
        &self,
        request: Request<pb::ListAdminsRequest>,
    ) -> Result<Response<pb::ListAdminsResponse>, Status> {
        self.admin(&request)?;
        let admins = self
            .0
            .store
            .read(|s| s.admins.iter().flatten().map(|(serial, record)| admin_pb(serial, record)).collect());
        Ok(Response::new(pb::ListAdminsResponse { admins }))
    }

    async fn revoke_admin(
        &self,
        request: Request<pb::RevokeAdminRequest>,
    ) -> Result<Response<pb::AdminCredential>, Status> {
        self.admin(&request)?;
        let serial = request.into_inner().serial.trim().to_ascii_lowercase();
        let record = self.0.store.read(|s| s.admins.as_ref().and_then(|a| a.get(&serial).cloned()));
        let record =
            record.ok_or_else(|| Status::not_found(format!("no admin credential with serial {serial}")))?;
        let revoke = Command::RevokeAdmin { serial: serial.clone() };
        self.0.change(move |_, _| Ok(vec![revoke])).await?;
        info!(%serial, "admin credential revoked");
        Ok(Response::new(admin_pb(&serial, &record)))
    }

    async fn inspect_cluster(
        &self,
        request: Request<pb::InspectClusterRequest>,
    ) -> Result<Response<pb::ClusterInfo>, Status> {
        self.admin(&request)?;
        let settings = self.0.settings();
        let (id, autolock, cert_lifetime) =
            self.0.store.read(|s| (s.cluster_id.to_string(), s.unlock_key.is_some(), s.cert_lifetime()));
        Ok(Response::new(pb::ClusterInfo {
            id,
            autolock,
            cert_expiry_secs: cert_lifetime.as_secs(),
            key_rotation_secs: settings.key_rotation.as_secs(),
            workload_cert_expiry_secs: settings.workload_cert_lifetime.as_secs(),
            down_after_secs: settings.down_after.as_secs(),
            managers: self.0.manager_addresses(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }

    async fn unlock_key(
        &self,
        request: Request<pb::UnlockKeyRequest>,
    ) -> Result<Response<pb::UnlockKeyResponse>, Status> {
        self.admin(&request)?;
        let current = self.0.store.read(|s| s.unlock_key.clone());
        let Some(current) = current else {
            return Err(Status::failed_precondition(
                "autolock is off: turn it on with `meshctl cluster update --autolock=true`",
            ));
        };
        if !request.get_ref().rotate {
            return Ok(Response::new(pb::UnlockKeyResponse { key: current.0 }));
        }
        let key = self.new_unlock_key().await?;
        info!("unlock key rotated");
        Ok(Response::new(pb::UnlockKeyResponse { key: key.0 }))
    }

    async fn create_network(
        &self,
        request: Request<pb::CreateNetworkRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        self.admin(&request)?;
        let req = request.into_inner();
        let transport = match (req.transport.as_str(), req.unencrypted) {
            ("", true) => Transport::None,
            ("", false) => Transport::AesGcm,
            (_, true) => {
                return Err(Status::invalid_argument(
                    "an unencrypted network has no transport: give --unencrypted or --transport, not both",
                ));
            }
            (name, false) => match name.parse::<Transport>() {
                Ok(Transport::None) | Err(_) => {
                    return Err(Status::invalid_argument(format!(
                        "unknown transport `{name}`: one of {}",
                        Transport::NAMES.join(", ")
                    )));
                }
                Ok(t) => t,
            },
        };
        self.0
            .change(|state, _| plans::create_network(state, &req.name, &req.subnet, transport, now()))
            .await?;
        info!(network = %req.name, subnet = %req.subnet, %transport, "network created");
        Ok(Response::new(self.network(&req.name)?))
    }

    async fn list_networks(
        &self,
        request: Request<pb::ListNetworksRequest>,
    ) -> Result<Response<pb::ListNetworksResponse>, Status> {
        self.admin(&request)?;
        let networks = self.0.store.read(|s| s.networks.values().map(|n| network_pb(s, n)).collect());
        Ok(Response::new(pb::ListNetworksResponse { networks }))
    }

    async fn inspect_network(
        &self,
        request: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        self.admin(&request)?;
        Ok(Response::new(self.network(&request.get_ref().name)?))
    }

    async fn remove_network(
        &self,
        request: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        self.admin(&request)?;
        let name = request.into_inner().name;
        let before = self.network(&name)?;
        self.0.change(|state, _| plans::remove_network(state, &name)).await?;
        info!(network = %name, "network removed");
        Ok(Response::new(before))
    }

    async fn rotate_network_key(
        &self,
        request: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Network>, Status> {
        self.admin(&request)?;
        let name = request.into_inner().name;
        self.0.change(|state, _| plans::rotate_key(state, &name, now())).await?;
        let network = self.network(&name)?;
        info!(network = %name, epoch = network.current_epoch, "network key rotated");
        Ok(Response::new(network))
    }

    async fn create_service(
        &self,
        request: Request<pb::CreateServiceRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        self.admin(&request)?;
        let req = request.into_inner();
        let ports = req.ports.iter().map(port).collect::<Result<Vec<_>, Status>>()?;
        let spec = ServiceSpec {
            name: req.name.clone(),
            networks: req.networks,
            ports,
            replicas: req.replicas,
            constraints: req.constraints,
            command: Some(req.command).filter(|c| !c.is_empty()),
            run: req.run.map(RunSpec::from).unwrap_or_default(),
            signed: req.signed.map(signed_spec),
            publish: req.publish,
        };
        self.0.change(|state, live| plans::create_service(state, spec, live)).await?;
        info!(service = %req.name, "service created");
        Ok(Response::new(self.service(&req.name)?))
    }

    async fn list_services(
        &self,
        request: Request<pb::ListServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        self.admin(&request)?;
        let services =
            self.0.store.read(|s| s.services.values().map(|x| service_pb(s, x, &self.0.reports)).collect());
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn inspect_service(
        &self,
        request: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        self.admin(&request)?;
        Ok(Response::new(self.service(&request.get_ref().name)?))
    }

    async fn scale_service(
        &self,
        request: Request<pb::ScaleServiceRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        self.admin(&request)?;
        let req = request.into_inner();
        self.0.change(|state, live| plans::scale_service(state, &req.name, req.replicas, live)).await?;
        info!(service = %req.name, replicas = req.replicas, "service scaled");
        Ok(Response::new(self.service(&req.name)?))
    }

    async fn update_service(
        &self,
        request: Request<pb::UpdateServiceRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        self.admin(&request)?;
        let req = request.into_inner();
        let update = ServiceUpdate {
            definition: (&req).into(),
            replicas: req.replicas,
            constraint_add: req.constraint_add,
            constraint_rm: req.constraint_rm,
            port_add: req.port_add.iter().map(port).collect::<Result<_, _>>()?,
            port_rm: req.port_rm.iter().map(port).collect::<Result<_, _>>()?,
            publish_add: req.publish_add,
            publish_rm: req
                .publish_rm
                .iter()
                .map(|p| {
                    u16::try_from(*p).map_err(|_| Status::invalid_argument(format!("{p} is not a port")))
                })
                .collect::<Result<_, _>>()?,
            force: req.force,
            signed: req.signed.map(signed_spec),
            unsigned: req.unsigned,
            options: update_options(req.options)?,
        };
        let at = now();
        let report = |node: &NodeId, service: &str, slot: u32| self.0.reports.of(node, service, slot);
        self.0
            .change(|state, live| plans::update_service(state, &req.name, &update, live, &report, at))
            .await?;
        let s = self.service(&req.name)?;
        info!(service = %req.name, version = s.version, "service updated");
        Ok(Response::new(s))
    }

    async fn rollback_service(
        &self,
        request: Request<pb::RollbackServiceRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        self.admin(&request)?;
        let req = request.into_inner();
        let options = update_options(req.options)?;
        let at = now();
        let report = |node: &NodeId, service: &str, slot: u32| self.0.reports.of(node, service, slot);
        self.0.change(|state, _| plans::rollback_service(state, &req.name, options, &report, at)).await?;
        let s = self.service(&req.name)?;
        info!(service = %req.name, version = s.version, "service rolled back");
        Ok(Response::new(s))
    }

    async fn remove_service(
        &self,
        request: Request<pb::NameRequest>,
    ) -> Result<Response<pb::Service>, Status> {
        self.admin(&request)?;
        let name = request.into_inner().name;
        let before = self.service(&name)?;
        self.0.change(|state, _| plans::remove_service(state, &name)).await?;
        info!(service = %name, "service removed");
        Ok(Response::new(before))
    }

    async fn service_ps(
        &self,
        request: Request<pb::NameRequest>,
    ) -> Result<Response<pb::ServicePsResponse>, Status> {
        self.admin(&request)?;
        let name = &request.get_ref().name;
        let (endpoints, published) = self.0.store.read(|state| {
            let service = state
                .services
                .get(name)
                .ok_or_else(|| Status::not_found(format!("no service named `{name}`")))?;
            let hostname =
                |node: &NodeId| state.nodes.get(node).map(|n| n.hostname.clone()).unwrap_or_default();
            let published = service
                .publish
                .iter()
                .flat_map(|p| plans::publish::nodes(state, service, p).into_iter().map(move |n| (p, n)))
                .map(|(p, node)| {
                    let report = self.0.reports.published(&node, p.published);
                    let (state, error) = match report {
                        None => ("pending", String::new()),
                        Some(r) => match r.error {
                            None => ("listening", String::new()),
                            Some(e) => ("failed", e),
                        },
                    };
                    pb::PublishedPs {
                        port: p.published.into(),
                        hostname: hostname(&node),
                        node: node.to_string(),
                        state: state.to_owned(),
                        error,
                        publish: p.to_string(),
                    }
                })
                .collect();
            Ok::<_, Status>((
                service
                    .endpoints
                    .values()
                    .map(|e| {
                        let report = self.0.reports.of(&e.node, name, e.slot);
                        pb::EndpointPs {
                            slot: e.slot,
                            node: e.node.to_string(),
                            hostname: state
                                .nodes
                                .get(&e.node)
                                .map(|n| n.hostname.clone())
                                .unwrap_or_default(),
                            addresses: e
                                .addresses
                                .iter()
                                .map(|(n, a)| pb::EndpointAddress {
                                    network: n.clone(),
                                    address: a.to_string(),
                                })
                                .collect(),
                            state: report.as_ref().map_or("pending", |r| r.state.name()).to_owned(),
                            restarts: report.as_ref().map_or(0, |r| r.restarts),
                            since: report.as_ref().map_or(0, |r| r.since),
                            version: e.version,
                            running_version: report.as_ref().map_or(0, |r| r.version),
                            last_exit: report.and_then(|r| r.last_exit).unwrap_or_default(),
                        }
                    })
                    .collect(),
                published,
            ))
        })?;
        Ok(Response::new(pb::ServicePsResponse { endpoints, published }))
    }

    async fn service_logs(
        &self,
        request: Request<pb::ServiceLogsRequest>,
    ) -> Result<Response<pb::ServiceLogsResponse>, Status> {
        self.admin(&request)?;
        let req = request.into_inner();
        let tail = if req.tail == 0 { mesh_api::model::MAX_LOG_LINES as u32 } else { req.tail };
        let endpoints: Vec<(u32, NodeId)> = self.0.store.read(|state| {
            let service = state
                .services
                .get(&req.name)
                .ok_or_else(|| Status::not_found(format!("no service named `{}`", req.name)))?;
            Ok::<_, Status>(service.endpoints.values().map(|e| (e.slot, e.node.clone())).collect())
        })?;
        // Every node at once: the slowest sets the wait, at most the answer timeout.
        let mut asks = tokio::task::JoinSet::new();
        for (slot, node) in endpoints {
            let (manager, name) = (self.0.clone(), req.name.clone());
            asks.spawn(async move {
                let answer = manager.requests.logs(&node, &name, slot, tail, req.since_millis).await;
                let (lines, error) = match answer {
                    Ok(lines) => (lines.into_iter().map(pb::LogLine::from).collect(), String::new()),
                    Err(e) => (Vec::new(), e),
                };
                pb::EndpointLogs { slot, node: node.to_string(), lines, error }
            });
        }
        let mut endpoints = asks.join_all().await;
        endpoints.sort_by_key(|e| e.slot);
        Ok(Response::new(pb::ServiceLogsResponse { endpoints }))
    }

    async fn create_secret(
        &self,
        request: Request<pb::CreateSecretRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        self.admin(&request)?;
        let req = request.into_inner();
        let at = now();
        self.0.change(|state, _| plans::create_secret(state, &req.name, &req.data, at)).await?;
        // The name only: the bytes are never logged.
        info!(secret = %req.name, size = req.data.len(), "secret created");
        Ok(Response::new(self.secret(&req.name)?))
    }

    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        self.admin(&request)?;
        let secrets = self.0.store.read(|s| s.secrets.keys().map(|name| secret_pb(s, name)).collect());
        Ok(Response::new(pb::ListSecretsResponse { secrets }))
    }

    async fn remove_secret(
        &self,
        request: Request<pb::NameRequest>,
    ) -> Result<Response<pb::SecretInfo>, Status> {
        self.admin(&request)?;
        let name = request.into_inner().name;
        let before = self.secret(&name)?;
        self.0.change(|state, _| plans::remove_secret(state, &name)).await?;
        info!(secret = %name, "secret removed");
        Ok(Response::new(before))
    }

    async fn apply_policy(
        &self,
        request: Request<pb::ApplyPolicyRequest>,
    ) -> Result<Response<pb::PolicyVersion>, Status> {
        self.admin(&request)?;
        let req = request.into_inner();
        let file = if req.file.is_empty() { "policy.toml".to_owned() } else { req.file };
        self.0.change(|state, _| plans::apply_policy(state, &file, &req.text, "apply", now())).await?;
        let applied = self.policy_version(0)?;
        info!(version = applied.version, rules = applied.rules, file = %file, "policy applied");
        Ok(Response::new(applied))
    }

    async fn get_policy(
        &self,
        request: Request<pb::GetPolicyRequest>,
    ) -> Result<Response<pb::PolicyVersion>, Status> {
        self.admin(&request)?;
        Ok(Response::new(self.policy_version(request.get_ref().version)?))
    }

    async fn policy_history(
        &self,
        request: Request<pb::PolicyHistoryRequest>,
    ) -> Result<Response<pb::PolicyHistoryResponse>, Status> {
        self.admin(&request)?;
        let versions = self.0.store.read(|s| {
            let current = s.policy().map(|p| p.version);
            s.policies.iter().map(|p| policy_pb(p, current == Some(p.version), false)).collect()
        });
        Ok(Response::new(pb::PolicyHistoryResponse { versions }))
    }

    async fn rollback_policy(
        &self,
        request: Request<pb::RollbackPolicyRequest>,
    ) -> Result<Response<pb::PolicyVersion>, Status> {
        self.admin(&request)?;
        let version = request.get_ref().version;
        self.0.change(|state, _| plans::rollback_policy(state, version, now())).await?;
        let applied = self.policy_version(0)?;
        info!(version = applied.version, from = version, "policy rolled back");
        Ok(Response::new(applied))
    }
}

fn policy_pb(p: &crate::state::PolicyRecord, current: bool, with_text: bool) -> pb::PolicyVersion {
    let rules = policy::Policy::parse(&p.file, &p.text).map_or(0, |parsed| parsed.rules.len() as u32);
    pb::PolicyVersion {
        version: p.version,
        file: p.file.clone(),
        text: if with_text { p.text.clone() } else { String::new() },
        applied_at: p.applied_at,
        source: p.source.clone(),
        rules,
        current,
    }
}

impl AdminApi {
    /// Version `version` (0: the one in force), with its text.
    fn policy_version(&self, version: u64) -> Result<pb::PolicyVersion, Status> {
        self.0.store.read(|s| {
            let current = s.policy().map(|p| p.version);
            let found =
                if version == 0 { s.policy() } else { s.policies.iter().find(|p| p.version == version) };
            found.map(|p| policy_pb(p, current == Some(p.version), true)).ok_or_else(|| {
                if version == 0 {
                    Status::not_found("no policy has been applied; everything is denied by default")
                } else {
                    Status::not_found(format!("no policy version {version}"))
                }
            })
        })
    }
}

fn ca_status_pb(progress: crate::manager::rotation::CaProgress) -> pb::CaStatusResponse {
    let roots = progress
        .roots
        .iter()
        .map(|r| pb::CaRoot {
            digest: r.digest.clone(),
            subject: r.subject.clone(),
            not_after: r.not_after.unix_timestamp(),
        })
        .collect();
    let Some(rotation) = progress.rotation else {
        return pb::CaStatusResponse { roots, ..Default::default() };
    };
    pb::CaStatusResponse {
        roots,
        rotating: true,
        started_at: rotation.started_at,
        total: rotation.total as u32,
        done: rotation.done as u32,
        late: rotation
            .late
            .into_iter()
            .map(|l| pb::CaLateNode {
                id: l.id.to_string(),
                hostname: l.hostname,
                role: pb::Role::from(l.role).into(),
                offline: l.offline,
            })
            .collect(),
        ..Default::default()
    }
}

fn admin_pb(serial: &str, record: &AdminRecord) -> pb::AdminCredential {
    pb::AdminCredential {
        serial: serial.to_owned(),
        label: record.label.clone(),
        issued_at: record.issued_at,
        not_after: record.not_after,
    }
}
