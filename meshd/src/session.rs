//! The node's one session with control: a server-streaming call over mTLS on which control pushes
//! this node's slice of the cluster. Reconnects with backoff; every message is the whole slice, so
//! after a reconnect the node holds the current slice again at once. Slices are applied in
//! version order: one older than what is held is ignored.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use mesh_api::client::ClientError;
use mesh_api::proto::pb;
use mesh_api::slice::NodeSlice;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::agent::backoff;
use crate::identity::{IdentityError, NodeDir};

/// The UDP port for overlay traffic unless told otherwise.
pub const DEFAULT_OVERLAY_PORT: u16 = 4800;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("control refused this node's session: {0}")]
    Refused(ClientError),
}

/// What a session needs.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    pub state_dir: PathBuf,
    /// Reported to control as where this node receives overlay traffic.
    pub underlay: SocketAddr,
}

/// Events of a session, for whoever holds the node's state.
#[derive(Clone, Debug)]
pub enum SessionEvent {
    Connected,
    Slice(NodeSlice),
    Disconnected(String),
}

/// Holds the session until control refuses the node (removed, say). Sends every new slice and
/// connection change to `events`.
pub async fn run(config: SessionConfig, events: mpsc::UnboundedSender<SessionEvent>) -> SessionError {
    let mut held: u64 = 0;
    let mut attempt = 0u32;
    loop {
        match connect_and_follow(&config, &events, &mut held, &mut attempt).await {
            Err(e) if e.code() == Some(tonic::Code::PermissionDenied) => {
                let _ = events.send(SessionEvent::Disconnected(e.to_string()));
                warn!(error = %e, "control refuses this node's session; not retrying");
                return SessionError::Refused(e);
            }
            Err(e) => {
                let _ = events.send(SessionEvent::Disconnected(e.to_string()));
                let wait = backoff(attempt);
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "session with control lost");
                tokio::time::sleep(wait).await;
                attempt = attempt.saturating_add(1);
            }
            Ok(()) => {
                let _ = events.send(SessionEvent::Disconnected("control ended the session".into()));
                tokio::time::sleep(backoff(0)).await;
            }
        }
    }
}

async fn connect_and_follow(
    config: &SessionConfig,
    events: &mpsc::UnboundedSender<SessionEvent>,
    held: &mut u64,
    attempt: &mut u32,
) -> Result<(), ClientError> {
    // The identity is read afresh each time: the certificate may have been renewed.
    let node = NodeDir::new(&config.state_dir).load().map_err(|e| ClientError::Refused {
        addr: String::new(),
        code: tonic::Code::FailedPrecondition,
        message: e.to_string(),
    })?;
    // Whichever manager answers names the leader; the session is opened there.
    let leader = node.leader().await.map_err(|e| match e {
        IdentityError::Client(e) => e,
        other => ClientError::Refused {
            addr: node.managers.join(","),
            code: tonic::Code::FailedPrecondition,
            message: other.to_string(),
        },
    })?;
    let addr = leader.addr;
    let mut stream = pb::dispatcher_client::DispatcherClient::new(leader.channel)
        .session(pb::SessionRequest { underlay: config.underlay.to_string() })
        .await
        .map_err(|s| ClientError::refused(&addr, s))?
        .into_inner();
    info!(control = %addr, underlay = %config.underlay, "session with control open");
    let _ = events.send(SessionEvent::Connected);
    *attempt = 0;
    // What the previous message carried: the sections a message marks unchanged come from it.
    let mut previous: Option<NodeSlice> = None;
    while let Some(message) = stream.message().await.map_err(|s| ClientError::refused(&addr, s))? {
        // A malformed message leaves nothing to read the next one against: the session starts
        // again, from a whole slice.
        let slice = NodeSlice::from_wire(message, previous.as_ref()).map_err(|e| ClientError::Refused {
            addr: addr.clone(),
            code: tonic::Code::DataLoss,
            message: format!("control sent a malformed slice: {e}"),
        })?;
        previous = Some(slice.clone());
        if slice.node != node.id {
            warn!(slice_for = %slice.node, "control sent another node's slice; ignored");
            continue;
        }
        if slice.version < *held {
            continue;
        }
        // Where to go if this manager is lost.
        if let Err(e) = NodeDir::new(&config.state_dir).set_managers(&slice.managers) {
            warn!(error = %e, "cannot record the managers' addresses");
        }
        *held = slice.version;
        info!(
            version = slice.version,
            endpoints = slice.endpoints.len(),
            networks = ?slice.networks.iter().map(|n| (&n.name, n.epochs())).collect::<Vec<_>>(),
            "slice applied"
        );
        let _ = events.send(SessionEvent::Slice(slice));
    }
    Ok(())
}

/// The address of this host that routes to `control`: the default underlay IP.
pub fn local_ip_towards(control: &str) -> std::io::Result<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0")?;
    socket.connect(control)?;
    Ok(socket.local_addr()?.ip())
}

/// The underlay address: `given` (IP or IP:PORT), or this host's address towards control.
pub fn underlay_address(given: Option<&str>, state_dir: &Path) -> Result<SocketAddr, String> {
    match given {
        Some(text) => text
            .parse::<SocketAddr>()
            .or_else(|_| text.parse::<std::net::IpAddr>().map(|ip| SocketAddr::new(ip, DEFAULT_OVERLAY_PORT)))
            .map_err(|_| format!("--underlay `{text}` is not an IP or IP:PORT")),
        None => {
            let managers = NodeDir::new(state_dir).load().map_err(|e| e.to_string())?.managers;
            let control = managers.first().cloned().unwrap_or_default();
            local_ip_towards(&control)
                .map(|ip| SocketAddr::new(ip, DEFAULT_OVERLAY_PORT))
                .map_err(|e| format!("cannot tell this host's address towards control {control}: {e}"))
        }
    }
}
