//! The node's one session with control: a server-streaming call over mTLS on which control pushes
//! this node's slice of the cluster. Reconnects with backoff; the first message after a connect
//! is the whole slice and later ones may carry only what changed (the slice's delta codec), so
//! after a reconnect the node holds the current slice again at once. Slices are passed on in
//! version order: one older than what is held is ignored.

use std::net::SocketAddr;
use std::path::PathBuf;

use mesh_api::client::ClientError;
use mesh_api::proto::pb;
use mesh_api::slice::NodeSlice;
use tokio::sync::{mpsc, watch};
use tracing::field::Empty;
use tracing::{Span, error, info, instrument, warn};

use std::sync::Arc;

use mesh_api::model::{MAX_LOG_BYTES, MAX_LOG_LINES};

use crate::backoff;
use crate::endpoints::Endpoints;
use crate::identity::{IdentityError, NodeDir};

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
    /// This run's boot number, reported to control (0 without a data plane: none is used).
    pub boot: u16,
    /// The node's WireGuard keys (with a data plane): made and reported as the slices ask.
    pub wireguard: Option<Arc<crate::wireguard::Keys>>,
}

/// Events of a session, for whoever holds the node's state.
#[derive(Clone, Debug)]
pub enum SessionEvent {
    Connected,
    Slice(Box<NodeSlice>),
    Disconnected(String),
}

/// Holds the session until control refuses the node (removed, say). Sends every new slice and
/// connection change to `events`.
#[instrument(name = "session", skip_all, fields(underlay = %config.underlay))]
pub async fn run(
    config: SessionConfig,
    events: mpsc::UnboundedSender<SessionEvent>,
    endpoints: Arc<Endpoints>,
) -> SessionError {
    let mut reports = endpoints.subscribe();
    let mut held: u64 = 0;
    let mut attempt = 0u32;
    loop {
        match connect_and_follow(&config, &events, &mut held, &mut attempt, &mut reports, &endpoints).await {
            Err(e) if e.code() == Some(tonic::Code::PermissionDenied) => {
                let _ = events.send(SessionEvent::Disconnected(e.to_string()));
                warn!(error = %e, "control refuses this node's session; not retrying");
                return SessionError::Refused(e);
            }
            Err(e) => {
                let mut why = e.to_string();
                if attempt >= 2
                    && let Some(hint) = rotated_away(&config.state_dir).await
                {
                    error!("{hint}");
                    why = hint;
                }
                let _ = events.send(SessionEvent::Disconnected(why));
                let wait = backoff::delay(attempt);
                warn!(error = %e, retry_in_ms = wait.as_millis() as u64, "session with control lost");
                tokio::time::sleep(wait).await;
                attempt = attempt.saturating_add(1);
            }
            Ok(()) => {
                let _ = events.send(SessionEvent::Disconnected("control ended the session".into()));
                tokio::time::sleep(backoff::delay(0)).await;
            }
        }
    }
}

/// When this node's certificate chains to no root the cluster trusts now (its root CA was
/// rotated while the node was down), what the operator must do; `None` otherwise, or when that
/// cannot be told. The roots come from an unauthenticated call: this is a hint, never acted on.
async fn rotated_away(state_dir: &std::path::Path) -> Option<String> {
    let node = NodeDir::new(state_dir).load().ok()?;
    let (served, _) = mesh_api::client::fetch_root_ca(node.managers.first()?).await.ok()?;
    let served = mesh_api::trust::Trust::from_pem(&served).ok()?;
    if served.root_of(&node.identity.cert_pem).is_ok() {
        return None;
    }
    Some(format!(
        "this node's certificate is signed by no root the cluster trusts now ({}, as an \
         unauthenticated answer says; `meshctl cluster ca` tells for sure): the cluster's root CA \
         was rotated while this node was away. Remove it (`meshctl node rm {}`) and join it again \
         with a current token (`meshctl join-token worker`)",
        served.digests(),
        node.id
    ))
}

/// One connection of the session, from finding the leader to the end of its stream.
#[instrument(name = "connection", skip_all, fields(node = Empty, control = Empty))]
async fn connect_and_follow(
    config: &SessionConfig,
    events: &mpsc::UnboundedSender<SessionEvent>,
    held: &mut u64,
    attempt: &mut u32,
    reports: &mut Reports,
    endpoints: &Arc<Endpoints>,
) -> Result<(), ClientError> {
    // The identity is read afresh each time: the certificate may have been renewed.
    let node = NodeDir::new(&config.state_dir).load().map_err(|e| ClientError::Refused {
        addr: String::new(),
        code: tonic::Code::FailedPrecondition,
        message: e.to_string(),
    })?;
    Span::current().record("node", tracing::field::display(&node.id));
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
    Span::current().record("control", tracing::field::display(&addr));
    let mut reporter = pb::dispatcher_client::DispatcherClient::new(leader.channel.clone());
    let mut stream = pb::dispatcher_client::DispatcherClient::new(leader.channel)
        .session(pb::SessionRequest { underlay: config.underlay.to_string(), boot: config.boot.into() })
        .await
        .map_err(|s| ClientError::refused(&addr, s))?
        .into_inner();
    // Control's requests (an endpoint's output, for an admin), answered as they come.
    let mut requests = reporter
        .requests(pb::NodeRequestsRequest {})
        .await
        .map_err(|s| ClientError::refused(&addr, s))?
        .into_inner();
    info!(control = %addr, underlay = %config.underlay, "session with control open");
    let _ = events.send(SessionEvent::Connected);
    *attempt = 0;
    // What the previous message carried: the sections a message marks unchanged come from it.
    let mut previous: Option<NodeSlice> = None;
    // This connection's manager is told what the endpoints do now, and after every change.
    reports.mark_changed();
    // Whoever writes the states may be gone (no data plane): then there is nothing to report.
    let mut watching = true;
    // A WireGuard report that failed is sent again after a while, slice or no slice.
    let mut report_again: Option<tokio::time::Instant> = None;
    loop {
        let message = tokio::select! {
            _ = tokio::time::sleep_until(report_again.unwrap_or_else(tokio::time::Instant::now)), if report_again.is_some() => {
                report_again = None;
                if let (Some(keys), Some(slice)) = (&config.wireguard, previous.as_ref())
                    && !sync_wireguard(keys, slice, &mut reporter).await
                {
                    report_again = Some(tokio::time::Instant::now() + REPORT_AGAIN);
                }
                continue;
            }
            message = stream.message() => message.map_err(|s| ClientError::refused(&addr, s))?,
            changed = reports.changed(), if watching => {
                match changed {
                    Ok(()) => report(&mut reporter, reports, endpoints).await,
                    Err(_) => watching = false,
                }
                continue;
            }
            request = requests.message() => {
                let Some(request) = request.map_err(|s| ClientError::refused(&addr, s))? else { break };
                tokio::spawn(answer(reporter.clone(), endpoints.clone(), request));
                continue;
            }
        };
        let Some(message) = message else { break };
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
        if let Err(e) = NodeDir::new(&config.state_dir).set_managers(&slice.managers, &slice.manager_ids) {
            warn!(error = %e, "cannot record the managers' addresses and IDs");
        }
        *held = slice.version;
        if let Some(keys) = &config.wireguard {
            report_again = (!sync_wireguard(keys, &slice, &mut reporter).await)
                .then(|| tokio::time::Instant::now() + REPORT_AGAIN);
        }
        info!(
            version = slice.version,
            endpoints = slice.endpoints.len(),
            networks = ?slice.networks.iter().map(|n| (&n.name, n.epochs())).collect::<Vec<_>>(),
            "slice applied"
        );
        let _ = events.send(SessionEvent::Slice(Box::new(slice)));
    }
    Ok(())
}

/// How long after a failed WireGuard report it is sent again.
const REPORT_AGAIN: std::time::Duration = std::time::Duration::from_secs(3);

/// Makes the WireGuard keys `slice` asks for and reports their public halves to control. Whether
/// all is done: a failure is logged, and the caller tries again (so does the next slice).
async fn sync_wireguard(
    keys: &crate::wireguard::Keys,
    slice: &NodeSlice,
    reporter: &mut pb::dispatcher_client::DispatcherClient<tonic::transport::Channel>,
) -> bool {
    let report = match keys.sync(slice) {
        Ok(report) => report,
        Err(e) => {
            warn!(error = %e, "cannot keep this node's WireGuard keys");
            return false;
        }
    };
    if report.is_empty() {
        return true;
    }
    let networks: Vec<u32> = report.iter().map(|k| k.network).collect();
    match reporter.report_wireguard_keys(pb::WireguardKeys { keys: report }).await {
        Ok(_) => {
            info!(?networks, "WireGuard public keys reported");
            true
        }
        Err(e) => {
            warn!(error = %e, "reporting this node's WireGuard public keys failed; trying again");
            false
        }
    }
}

/// Answers one of control's requests for an endpoint's output.
async fn answer(
    mut client: pb::dispatcher_client::DispatcherClient<tonic::transport::Channel>,
    endpoints: Arc<Endpoints>,
    request: pb::NodeRequest,
) {
    let tail = (request.tail as usize).min(MAX_LOG_LINES);
    let answer = match endpoints.logs(&request.service, request.slot, tail, request.since_millis) {
        Some(mut lines) => {
            // The newest lines that fit one answer.
            let mut bytes = 0;
            let keep = lines.iter().rev().take_while(|l| {
                bytes += l.text.len() + 32;
                bytes <= MAX_LOG_BYTES
            });
            let keep = keep.count();
            let lines = lines.split_off(lines.len() - keep.min(lines.len()));
            pb::LogsAnswer {
                id: request.id,
                lines: lines.into_iter().map(Into::into).collect(),
                error: String::new(),
            }
        }
        None => pb::LogsAnswer {
            id: request.id,
            lines: vec![],
            error: format!("this node runs no endpoint {}.{}", request.service, request.slot),
        },
    };
    if let Err(e) = client.answer_logs(answer).await {
        warn!(error = %e, "answering control's request for an endpoint's output failed");
    }
}

/// The endpoints' states, as the session watches them.
pub type Reports = watch::Receiver<std::collections::BTreeMap<(String, u32), mesh_api::model::EndpointState>>;

/// Sends the endpoints' states as they are now; a failure is logged, and the next change (or
/// connection) sends them again.
async fn report(
    client: &mut pb::dispatcher_client::DispatcherClient<tonic::transport::Channel>,
    reports: &mut Reports,
    hub: &Endpoints,
) {
    let endpoints: Vec<pb::EndpointReport> =
        reports.borrow_and_update().values().cloned().map(Into::into).collect();
    let published = hub
        .published()
        .into_iter()
        .map(|p| pb::PublishedReport {
            port: p.port.into(),
            service: p.service,
            listening: p.error.is_none(),
            error: p.error.unwrap_or_default(),
        })
        .collect();
    if let Err(e) = client.report_endpoints(pb::EndpointReports { endpoints, published }).await {
        warn!(error = %e, "reporting the endpoints' states to control failed");
    }
}
