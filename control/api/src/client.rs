//! Clients of the control API: a TLS channel to a manager, and the calls nodes and admins make.

use crate::model::Transport;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::pki::CONTROL_SERVER_NAME;
use crate::proto::{
    ClusterView, EndpointLogsView, EndpointPsView, NetworkView, NodeView, PolicyView, PublishedPsView,
    SecretView, ServiceView, pb,
};
use crate::tls::{self, Identity, ServerTrust};
use crate::tokens::Role;

/// The port the managers' control API listens on unless told otherwise.
pub const DEFAULT_CONTROL_PORT: u16 = 7400;
/// How long to wait for a manager to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 ping interval, and how long a ping may go unanswered.
pub const KEEPALIVE: Duration = Duration::from_secs(5);
/// How long a single call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach control at {addr}: {source}")]
    Connect { addr: String, source: tonic::transport::Error },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("control at {addr} refused the call: {message} ({code:?})")]
    Refused { addr: String, code: tonic::Code, message: String },
    #[error("no manager leads the cluster now; tried: {tried}")]
    NoLeader { tried: String },
}

impl ClientError {
    /// The gRPC status code when control answered with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The error for a call that failed with `status`, keeping the causes a transport failure
    /// carries (a TLS alert, say) in the message.
    pub fn refused(addr: &str, status: tonic::Status) -> ClientError {
        let mut message = status.message().to_owned();
        let mut source = std::error::Error::source(&status);
        while let Some(cause) = source {
            message.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        ClientError::Refused { addr: addr.to_owned(), code: status.code(), message }
    }
}

/// The metadata in which a follower names the leader's address.
pub const LEADER_HEADER: &str = "x-mesh-leader";
/// How long a client looks for a leader before giving up (an election takes about a second).
pub const FIND_LEADER_FOR: Duration = Duration::from_secs(20);
/// Pause between rounds of asking every manager.
const RETRY_LEADER: Duration = Duration::from_millis(300);

/// The leader's address a follower named in its refusal, if it named one.
pub fn leader_hint(status: &tonic::Status) -> Option<String> {
    status.metadata().get(LEADER_HEADER)?.to_str().ok().map(str::to_owned)
}

/// The manager that leads, found from any of them.
pub struct Leader {
    pub addr: String,
    pub channel: Channel,
    /// Every manager's control address, as the leader knows them.
    pub managers: Vec<String>,
    /// Every manager's node ID, as the leader knows them.
    pub manager_ids: Vec<String>,
    /// How far the leader's clock is ahead of this host's (milliseconds; negative: behind),
    /// measured at the middle of the question's round trip; none from a manager that did not say.
    pub clock_skew_ms: Option<i64>,
}

/// Finds the leader among `managers`, following the leader named by followers, and returns a
/// channel to it (TLS with `config`). Keeps asking through an election, for [`FIND_LEADER_FOR`].
pub async fn leader(managers: &[String], config: Arc<ClientConfig>) -> Result<Leader, ClientError> {
    let deadline = tokio::time::Instant::now() + FIND_LEADER_FOR;
    loop {
        let mut tried = Vec::new();
        // Worth another round: a manager that could not be reached, or knows no leader yet.
        let mut retry = false;
        let mut queue: std::collections::VecDeque<String> = managers.iter().cloned().collect();
        while let Some(addr) = queue.pop_front() {
            if tried.iter().any(|(a, _): &(String, String)| a == &addr) {
                continue;
            }
            let channel = match channel(&addr, config.clone()).await {
                Ok(channel) => channel,
                Err(e) => {
                    tried.push((addr, e.to_string()));
                    retry = true;
                    continue;
                }
            };
            let mut client = pb::managers_client::ManagersClient::new(channel.clone());
            let asked = crate::unix_millis();
            match client.leader(pb::LeaderRequest {}).await {
                Ok(answer) => {
                    let middle = asked + (crate::unix_millis() - asked) / 2;
                    let answer = answer.into_inner();
                    return Ok(Leader {
                        addr,
                        channel,
                        managers: answer.managers,
                        manager_ids: answer.manager_ids,
                        clock_skew_ms: (answer.now_millis != 0).then(|| answer.now_millis - middle),
                    });
                }
                Err(status) => {
                    if let Some(hint) = leader_hint(&status) {
                        queue.push_front(hint);
                    }
                    retry |= matches!(status.code(), tonic::Code::Unavailable | tonic::Code::Unknown);
                    tried.push((addr.clone(), ClientError::refused(&addr, status).to_string()));
                }
            }
        }
        if !retry || tokio::time::Instant::now() >= deadline {
            let tried = tried.into_iter().map(|(_, e)| e).collect::<Vec<_>>().join("; ");
            return Err(ClientError::NoLeader { tried });
        }
        tokio::time::sleep(RETRY_LEADER).await;
    }
}

/// A gRPC channel to the manager at `addr` (host:port) over TLS with `config`.
pub async fn channel(addr: &str, config: Arc<ClientConfig>) -> Result<Channel, ClientError> {
    let target = addr.to_owned();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let target = target.clone();
        let config = config.clone();
        async move {
            let tcp = TcpStream::connect(&target).await?;
            tcp.set_nodelay(true)?;
            let name = ServerName::try_from(CONTROL_SERVER_NAME)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            let tls = TlsConnector::from(config).connect(name, tcp).await?;
            Ok::<_, io::Error>(TokioIo::new(tls))
        }
    });
    Endpoint::from_static("http://mesh-control")
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        // Long-lived sessions notice a dead manager within seconds.
        .http2_keep_alive_interval(KEEPALIVE)
        .keep_alive_timeout(KEEPALIVE)
        .keep_alive_while_idle(true)
        .connect_with_connector(connector)
        .await
        .map_err(|source| ClientError::Connect { addr: addr.to_owned(), source })
}

/// A channel that trusts only the cluster's roots and presents `identity` when given.
pub async fn authenticated_channel(
    addr: &str,
    trust: &crate::trust::Trust,
    identity: Option<&Identity>,
) -> Result<Channel, ClientError> {
    channel(addr, tls::client_config(ServerTrust::Ca(trust), identity)?).await
}

/// Fetches the root CA bundle (PEM) and the cross-signatures that vouch for a new root during a
/// rotation, from the manager at `addr`, without trusting them yet: the caller must find the
/// root its join token pins among them before using any.
pub async fn fetch_root_ca(addr: &str) -> Result<(String, String), ClientError> {
    let config = tls::client_config(ServerTrust::FetchCaOnly, None)?;
    let mut client = pb::identity_client::IdentityClient::new(channel(addr, config).await?);
    let response =
        client.get_root_ca(pb::GetRootCaRequest {}).await.map_err(|s| ClientError::refused(addr, s))?;
    let response = response.into_inner();
    Ok((response.ca_pem, response.cross_pem))
}

/// The admin API, as `meshctl` uses it.
pub struct AdminClient {
    addr: String,
    managers: Vec<String>,
    manager_ids: Vec<String>,
    inner: pb::admin_client::AdminClient<Channel>,
}

impl AdminClient {
    /// An admin client of the leader, found from the managers in `bundle`.
    pub async fn connect(bundle: &crate::bundle::AdminBundle) -> Result<AdminClient, ClientError> {
        let leader = leader(&bundle.managers, admin_tls(bundle)?).await?;
        let mut client = AdminClient::from_channel(&leader.addr, leader.channel);
        client.managers = leader.managers;
        client.manager_ids = leader.manager_ids;
        Ok(client)
    }

    /// Every manager's address, as the leader named them when this client connected.
    pub fn managers(&self) -> &[String] {
        &self.managers
    }

    /// Every manager's node ID, as the leader named them when this client connected.
    pub fn manager_ids(&self) -> &[String] {
        &self.manager_ids
    }

    /// The manager this client talks to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// An admin client over an existing channel (whose TLS identity decides what it may do).
    pub fn from_channel(addr: &str, channel: Channel) -> AdminClient {
        AdminClient {
            addr: addr.to_owned(),
            managers: Vec::new(),
            manager_ids: Vec::new(),
            inner: pb::admin_client::AdminClient::new(channel),
        }
    }

    fn refused(&self, status: tonic::Status) -> ClientError {
        ClientError::refused(&self.addr, status)
    }

    pub async fn list_nodes(&mut self) -> Result<Vec<NodeView>, ClientError> {
        let nodes = self
            .inner
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(|s| self.refused(s))?
            .into_inner()
            .nodes;
        nodes.into_iter().map(|n| self.convert(n)).collect()
    }

    pub async fn inspect_node(&mut self, id: &str) -> Result<NodeView, ClientError> {
        let node = self
            .inner
            .inspect_node(pb::InspectNodeRequest { id: id.to_owned() })
            .await
            .map_err(|s| self.refused(s))?;
        self.convert(node.into_inner())
    }

    /// Removes a node; a manager that votes only with `force` (else demote it first).
    pub async fn remove_node(&mut self, id: &str, force: bool) -> Result<NodeView, ClientError> {
        let node = self
            .inner
            .remove_node(pb::RemoveNodeRequest { id: id.to_owned(), force })
            .await
            .map_err(|s| self.refused(s))?;
        self.convert(node.into_inner())
    }

    pub async fn promote_node(&mut self, id: &str) -> Result<NodeView, ClientError> {
        let request = pb::InspectNodeRequest { id: id.to_owned() };
        let node = self.inner.promote_node(request).await.map_err(|s| self.refused(s))?;
        self.convert(node.into_inner())
    }

    pub async fn demote_node(&mut self, id: &str) -> Result<NodeView, ClientError> {
        let request = pb::InspectNodeRequest { id: id.to_owned() };
        let node = self.inner.demote_node(request).await.map_err(|s| self.refused(s))?;
        self.convert(node.into_inner())
    }

    /// Turns autolock on (returning the unlock key) or off.
    pub async fn update_cluster(&mut self, autolock: bool) -> Result<String, ClientError> {
        self.update_settings(pb::UpdateClusterRequest { autolock: Some(autolock), ..Default::default() })
            .await
    }

    /// Changes the cluster-wide settings the request names (the others stay); returns the unlock
    /// key when the request turns autolock on.
    pub async fn update_settings(
        &mut self,
        request: pb::UpdateClusterRequest,
    ) -> Result<String, ClientError> {
        let response = self.inner.update_cluster(request).await.map_err(|s| self.refused(s))?;
        Ok(response.into_inner().key)
    }

    /// A new admin credential for `csr_pem`, lasting `expiry` (`None`: the cluster's default).
    pub async fn issue_admin(
        &mut self,
        csr_pem: String,
        expiry: Option<Duration>,
        label: &str,
    ) -> Result<pb::IssueAdminResponse, ClientError> {
        let request = pb::IssueAdminRequest {
            csr_pem,
            expiry_secs: expiry.map_or(0, |e| e.as_secs()),
            label: label.to_owned(),
        };
        Ok(self.inner.issue_admin(request).await.map_err(|s| self.refused(s))?.into_inner())
    }

    /// The admin credentials the cluster accepts.
    pub async fn list_admins(&mut self) -> Result<Vec<pb::AdminCredential>, ClientError> {
        let list = self.inner.list_admins(pb::ListAdminsRequest {}).await.map_err(|s| self.refused(s))?;
        Ok(list.into_inner().admins)
    }

    /// Revokes the admin credential with `serial`.
    pub async fn revoke_admin(&mut self, serial: &str) -> Result<pb::AdminCredential, ClientError> {
        let request = pb::RevokeAdminRequest { serial: serial.to_owned() };
        Ok(self.inner.revoke_admin(request).await.map_err(|s| self.refused(s))?.into_inner())
    }

    /// The cluster-wide settings in force.
    pub async fn inspect_cluster(&mut self) -> Result<ClusterView, ClientError> {
        let info =
            self.inner.inspect_cluster(pb::InspectClusterRequest {}).await.map_err(|s| self.refused(s))?;
        self.convert(info.into_inner())
    }

    /// The unlock key, or a new one with `rotate`.
    pub async fn unlock_key(&mut self, rotate: bool) -> Result<String, ClientError> {
        let response =
            self.inner.unlock_key(pb::UnlockKeyRequest { rotate }).await.map_err(|s| self.refused(s))?;
        Ok(response.into_inner().key)
    }

    /// The roots, and how far a root rotation is.
    pub async fn ca_status(&mut self) -> Result<pb::CaStatusResponse, ClientError> {
        let status = self.inner.ca_status(pb::CaStatusRequest {}).await.map_err(|s| self.refused(s))?;
        Ok(status.into_inner())
    }

    /// Starts a root rotation, to `given` (certificate and key, PEM) or to a root control makes.
    pub async fn rotate_ca(
        &mut self,
        request: pb::RotateCaRequest,
    ) -> Result<pb::CaStatusResponse, ClientError> {
        Ok(self.inner.rotate_ca(request).await.map_err(|s| self.refused(s))?.into_inner())
    }

    pub async fn join_token(&mut self, role: Role, rotate: bool) -> Result<String, ClientError> {
        let response = self
            .inner
            .join_token(pb::JoinTokenRequest { role: pb::Role::from(role).into(), rotate })
            .await
            .map_err(|s| self.refused(s))?;
        Ok(response.into_inner().token)
    }

    pub async fn update_node(
        &mut self,
        id: &str,
        label_add: Vec<String>,
        label_rm: Vec<String>,
    ) -> Result<NodeView, ClientError> {
        let node = self
            .inner
            .update_node(pb::UpdateNodeRequest { id: id.to_owned(), label_add, label_rm })
            .await
            .map_err(|s| self.refused(s))?;
        self.convert(node.into_inner())
    }

    pub async fn create_network(
        &mut self,
        name: &str,
        subnet: &str,
        encrypted: bool,
    ) -> Result<NetworkView, ClientError> {
        let transport = if encrypted { Transport::AesGcm } else { Transport::None };
        self.create_network_with(name, subnet, transport).await
    }

    /// Creates a network carried by `transport`.
    pub async fn create_network_with(
        &mut self,
        name: &str,
        subnet: &str,
        transport: Transport,
    ) -> Result<NetworkView, ClientError> {
        let request = pb::CreateNetworkRequest {
            name: name.into(),
            subnet: subnet.into(),
            unencrypted: transport == Transport::None,
            transport: match transport {
                Transport::None => String::new(),
                t => t.to_string(),
            },
        };
        let n = self.inner.create_network(request).await.map_err(|s| self.refused(s))?;
        self.convert(n.into_inner())
    }

    pub async fn list_networks(&mut self) -> Result<Vec<NetworkView>, ClientError> {
        let list = self.inner.list_networks(pb::ListNetworksRequest {}).await.map_err(|s| self.refused(s))?;
        list.into_inner().networks.into_iter().map(|n| self.convert(n)).collect()
    }

    pub async fn inspect_network(&mut self, name: &str) -> Result<NetworkView, ClientError> {
        let n = self.inner.inspect_network(name_request(name)).await.map_err(|s| self.refused(s))?;
        self.convert(n.into_inner())
    }

    pub async fn remove_network(&mut self, name: &str) -> Result<NetworkView, ClientError> {
        let n = self.inner.remove_network(name_request(name)).await.map_err(|s| self.refused(s))?;
        self.convert(n.into_inner())
    }

    pub async fn rotate_network_key(&mut self, name: &str) -> Result<NetworkView, ClientError> {
        let n = self.inner.rotate_network_key(name_request(name)).await.map_err(|s| self.refused(s))?;
        self.convert(n.into_inner())
    }

    pub async fn create_service(
        &mut self,
        request: pb::CreateServiceRequest,
    ) -> Result<ServiceView, ClientError> {
        let s = self.inner.create_service(request).await.map_err(|s| self.refused(s))?;
        self.convert(s.into_inner())
    }

    pub async fn list_services(&mut self) -> Result<Vec<ServiceView>, ClientError> {
        let list = self.inner.list_services(pb::ListServicesRequest {}).await.map_err(|s| self.refused(s))?;
        list.into_inner().services.into_iter().map(|s| self.convert(s)).collect()
    }

    pub async fn inspect_service(&mut self, name: &str) -> Result<ServiceView, ClientError> {
        let s = self.inner.inspect_service(name_request(name)).await.map_err(|s| self.refused(s))?;
        self.convert(s.into_inner())
    }

    pub async fn scale_service(&mut self, name: &str, replicas: u32) -> Result<ServiceView, ClientError> {
        let request = pb::ScaleServiceRequest { name: name.into(), replicas };
        let s = self.inner.scale_service(request).await.map_err(|s| self.refused(s))?;
        self.convert(s.into_inner())
    }

    pub async fn update_service(
        &mut self,
        request: pb::UpdateServiceRequest,
    ) -> Result<ServiceView, ClientError> {
        let s = self.inner.update_service(request).await.map_err(|s| self.refused(s))?;
        self.convert(s.into_inner())
    }

    pub async fn rollback_service(
        &mut self,
        request: pb::RollbackServiceRequest,
    ) -> Result<ServiceView, ClientError> {
        let s = self.inner.rollback_service(request).await.map_err(|s| self.refused(s))?;
        self.convert(s.into_inner())
    }

    pub async fn remove_service(&mut self, name: &str) -> Result<ServiceView, ClientError> {
        let s = self.inner.remove_service(name_request(name)).await.map_err(|s| self.refused(s))?;
        self.convert(s.into_inner())
    }

    pub async fn service_ps(&mut self, name: &str) -> Result<Vec<EndpointPsView>, ClientError> {
        Ok(self.service_ps_published(name).await?.0)
    }

    /// `service ps`: the endpoints, and the published ports on each node that publishes them.
    pub async fn service_ps_published(
        &mut self,
        name: &str,
    ) -> Result<(Vec<EndpointPsView>, Vec<PublishedPsView>), ClientError> {
        let ps = self.inner.service_ps(name_request(name)).await.map_err(|s| self.refused(s))?.into_inner();
        let endpoints = ps.endpoints.into_iter().map(|e| self.convert(e)).collect::<Result<_, _>>()?;
        let published = ps.published.into_iter().map(|p| self.convert(p)).collect::<Result<_, _>>()?;
        Ok((endpoints, published))
    }

    pub async fn service_logs(
        &mut self,
        name: &str,
        tail: u32,
        since_millis: i64,
    ) -> Result<Vec<EndpointLogsView>, ClientError> {
        let request = pb::ServiceLogsRequest { name: name.to_owned(), tail, since_millis };
        let logs = self.inner.service_logs(request).await.map_err(|s| self.refused(s))?;
        logs.into_inner().endpoints.into_iter().map(|e| self.convert(e)).collect()
    }

    pub async fn create_secret(&mut self, name: &str, data: Vec<u8>) -> Result<SecretView, ClientError> {
        let request = pb::CreateSecretRequest { name: name.to_owned(), data };
        let s = self.inner.create_secret(request).await.map_err(|s| self.refused(s))?;
        self.convert(s.into_inner())
    }

    pub async fn list_secrets(&mut self) -> Result<Vec<SecretView>, ClientError> {
        let list = self.inner.list_secrets(pb::ListSecretsRequest {}).await.map_err(|s| self.refused(s))?;
        list.into_inner().secrets.into_iter().map(|s| self.convert(s)).collect()
    }

    pub async fn remove_secret(&mut self, name: &str) -> Result<SecretView, ClientError> {
        let s = self.inner.remove_secret(name_request(name)).await.map_err(|s| self.refused(s))?;
        self.convert(s.into_inner())
    }

    pub async fn apply_policy(&mut self, file: &str, text: &str) -> Result<PolicyView, ClientError> {
        let request = pb::ApplyPolicyRequest { file: file.into(), text: text.into() };
        let p = self.inner.apply_policy(request).await.map_err(|s| self.refused(s))?;
        self.convert(p.into_inner())
    }

    /// Version `version`, or the policy in force when `None`.
    pub async fn get_policy(&mut self, version: Option<u64>) -> Result<PolicyView, ClientError> {
        let request = pb::GetPolicyRequest { version: version.unwrap_or(0) };
        let p = self.inner.get_policy(request).await.map_err(|s| self.refused(s))?;
        self.convert(p.into_inner())
    }

    pub async fn policy_history(&mut self) -> Result<Vec<PolicyView>, ClientError> {
        let list =
            self.inner.policy_history(pb::PolicyHistoryRequest {}).await.map_err(|s| self.refused(s))?;
        list.into_inner().versions.into_iter().map(|p| self.convert(p)).collect()
    }

    pub async fn rollback_policy(&mut self, version: u64) -> Result<PolicyView, ClientError> {
        let p = self
            .inner
            .rollback_policy(pb::RollbackPolicyRequest { version })
            .await
            .map_err(|s| self.refused(s))?;
        self.convert(p.into_inner())
    }

    fn convert<W, V>(&self, wire: W) -> Result<V, ClientError>
    where
        V: TryFrom<W, Error = crate::proto::InvalidMessage>,
    {
        V::try_from(wire).map_err(|e| ClientError::Refused {
            addr: self.addr.clone(),
            code: tonic::Code::Internal,
            message: format!("control sent a malformed message: {e}"),
        })
    }
}

/// TLS as the admin of `bundle`, trusting only its roots.
fn admin_tls(bundle: &crate::bundle::AdminBundle) -> Result<Arc<ClientConfig>, ClientError> {
    let roots = crate::trust::Trust::from_pem(&bundle.ca_pem).map_err(|e| {
        ClientError::Tls(tls::TlsError::Pem { what: "admin bundle CA", detail: e.to_string() })
    })?;
    let trust = ServerTrust::Managers { ca: &roots, ids: &bundle.manager_ids };
    Ok(tls::client_config(trust, Some(&bundle.identity))?)
}

fn name_request(name: &str) -> pb::NameRequest {
    pb::NameRequest { name: name.to_owned() }
}
