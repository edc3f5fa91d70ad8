//! Clients of the control API: a TLS channel to a manager, and the calls nodes and admins make.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

use crate::ca::CONTROL_SERVER_NAME;
use crate::proto::{NodeView, pb};
use crate::tls::{self, Identity, ServerTrust};
use crate::tokens::Role;

/// How long to wait for a manager to accept a connection.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a single call may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach control at {addr}: {source}")]
    Connect {
        addr: String,
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("control at {addr} refused the call: {message} ({code:?})")]
    Refused {
        addr: String,
        code: tonic::Code,
        message: String,
    },
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
        ClientError::Refused {
            addr: addr.to_owned(),
            code: status.code(),
            message,
        }
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
        .connect_with_connector(connector)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        })
}

/// A channel that trusts only the cluster CA and presents `identity` when given.
pub async fn authenticated_channel(
    addr: &str,
    ca_der: &[u8],
    identity: Option<&Identity>,
) -> Result<Channel, ClientError> {
    channel(addr, tls::client_config(ServerTrust::Ca(ca_der), identity)?).await
}

/// Fetches the root CA (PEM) from the manager at `addr` without trusting it yet: the caller must
/// check it against the digest in its join token before using it.
pub async fn fetch_root_ca(addr: &str) -> Result<String, ClientError> {
    let config = tls::client_config(ServerTrust::FetchCaOnly, None)?;
    let mut client = pb::identity_client::IdentityClient::new(channel(addr, config).await?);
    let response = client
        .get_root_ca(pb::GetRootCaRequest {})
        .await
        .map_err(|s| ClientError::refused(addr, s))?;
    Ok(response.into_inner().ca_pem)
}

/// The admin API, as `meshctl` uses it.
pub struct AdminClient {
    addr: String,
    inner: pb::admin_client::AdminClient<Channel>,
}

impl AdminClient {
    pub async fn connect(bundle: &crate::cluster::AdminBundle) -> Result<AdminClient, ClientError> {
        let ca_der = crate::ca::pem_to_der(&bundle.ca_pem).map_err(|e| {
            ClientError::Tls(tls::TlsError::Pem {
                what: "admin bundle CA",
                detail: e.to_string(),
            })
        })?;
        let channel =
            authenticated_channel(&bundle.control, &ca_der, Some(&bundle.identity)).await?;
        Ok(AdminClient::from_channel(&bundle.control, channel))
    }

    /// An admin client over an existing channel (whose TLS identity decides what it may do).
    pub fn from_channel(addr: &str, channel: Channel) -> AdminClient {
        AdminClient {
            addr: addr.to_owned(),
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
        nodes.into_iter().map(|n| self.view(n)).collect()
    }

    pub async fn inspect_node(&mut self, id: &str) -> Result<NodeView, ClientError> {
        let node = self
            .inner
            .inspect_node(pb::InspectNodeRequest { id: id.to_owned() })
            .await
            .map_err(|s| self.refused(s))?;
        self.view(node.into_inner())
    }

    pub async fn remove_node(&mut self, id: &str) -> Result<NodeView, ClientError> {
        let node = self
            .inner
            .remove_node(pb::RemoveNodeRequest { id: id.to_owned() })
            .await
            .map_err(|s| self.refused(s))?;
        self.view(node.into_inner())
    }

    pub async fn join_token(&mut self, role: Role, rotate: bool) -> Result<String, ClientError> {
        let response = self
            .inner
            .join_token(pb::JoinTokenRequest {
                role: pb::Role::from(role).into(),
                rotate,
            })
            .await
            .map_err(|s| self.refused(s))?;
        Ok(response.into_inner().token)
    }

    fn view(&self, node: pb::Node) -> Result<NodeView, ClientError> {
        NodeView::try_from(node).map_err(|e| ClientError::Refused {
            addr: self.addr.clone(),
            code: tonic::Code::Internal,
            message: format!("control sent a malformed node: {e}"),
        })
    }
}
