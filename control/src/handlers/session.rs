//! The session service: each node's one session with control, over which it is pushed its slice
//! of the cluster ([`crate::slicer`]) and nothing else. A message is sent only when the slice
//! changed, and carries what changed since the session's previous message; a session's first
//! message is whole, so after any reconnect the node converges to the current slice at once.

use std::sync::Arc;

use mesh_api::model::{EndpointState, LogLine, MAX_LOG_LINES, MAX_REPORT_TEXT, MAX_REPORTED};
use mesh_api::proto::pb;
use mesh_api::slice::NodeSlice;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info};

use crate::auth::Caller;
use crate::manager::Manager;
use crate::metrics::SliceKind;
use crate::slicer::slice_after;
use crate::state::Command;

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// The underlay a session may register: the IP control sees the session come from, with the
/// port the node reports (an unspecified reported IP means that one). A node announcing another
/// IP is refused, so no node can have peers send its traffic, or attribute datagrams, to an
/// address it does not hold. `None` when the node reports none.
pub(crate) fn attested_underlay(
    reported: &str,
    seen_from: Option<std::net::IpAddr>,
) -> Result<Option<std::net::SocketAddr>, Status> {
    if reported.is_empty() {
        return Ok(None);
    }
    let underlay: std::net::SocketAddr = reported
        .parse()
        .map_err(|_| Status::invalid_argument(format!("underlay `{reported}` is not an address ip:port")))?;
    let Some(seen) = seen_from else {
        return Err(Status::failed_precondition(
            "cannot tell the address this session comes from, so cannot attest its underlay",
        ));
    };
    if underlay.ip().is_unspecified() {
        return Ok(Some(std::net::SocketAddr::new(seen, underlay.port())));
    }
    // A session over loopback comes from this manager's own host, whose addresses control
    // cannot tell apart: what it reports is taken (whoever runs there holds the manager anyway).
    if underlay.ip().to_canonical() != seen && !seen.is_loopback() {
        return Err(Status::permission_denied(format!(
            "underlay {underlay} refused: this session comes from {seen}, and a node's underlay IP \
             must be the one it reaches control from (start meshd with --underlay {seen}:{port})",
            port = underlay.port()
        )));
    }
    Ok(Some(underlay))
}

/// Most keys in one report: one per WireGuard network the node is on.
const MAX_WIREGUARD_KEYS: usize = 256;
/// Seconds before a node may replace its key at the same generation.
const SAME_GENERATION_AFTER: i64 = 60;

/// What a node's report of its WireGuard public keys changes, once each key is checked: the
/// network is a WireGuard one the node has an endpoint on (no node records a key, nor learns
/// whether a network exists, elsewhere), the generation is the network's current one, the key is
/// a 32-byte point that is not all zeros, and no other node on the network reported it (a node
/// lying about itself, claiming another's key, gains no handshake by it, but is refused all the
/// same).
pub(crate) fn wireguard_commands(
    state: &crate::state::ClusterState,
    node: &mesh_api::ids::NodeId,
    keys: Vec<pb::WireguardKey>,
    now: i64,
) -> Result<Vec<Command>, Status> {
    use crate::state::WireguardPublic;
    if keys.len() > MAX_WIREGUARD_KEYS {
        return Err(Status::invalid_argument(format!("at most {MAX_WIREGUARD_KEYS} keys per report")));
    }
    let held = state.nodes.get(node).map(|n| n.wireguard.clone()).unwrap_or_default();
    let mut keys_seen = std::collections::BTreeMap::new();
    let mut commands = Vec::new();
    for key in keys {
        let network = state
            .networks
            .values()
            .find(|n| n.id == key.network && n.wireguard.is_some())
            .filter(|n| state.nodes_on_network(&n.name).contains(node))
            .ok_or_else(|| {
                Status::permission_denied(format!(
                    "network {} is no WireGuard network this node has an endpoint on",
                    key.network
                ))
            })?;
        let current = network.wireguard.map_or(0, |g| g.generation);
        if key.generation != current {
            return Err(Status::failed_precondition(format!(
                "network `{}` is at key generation {current}, not {}",
                network.name, key.generation
            )));
        }
        let public: [u8; 32] = key
            .public
            .as_slice()
            .try_into()
            .map_err(|_| Status::invalid_argument("a WireGuard public key is 32 bytes"))?;
        if !mesh_api::keys::usable_wireguard_public(&public) {
            return Err(Status::invalid_argument(
                "a small-order point (all zeros among them) is no WireGuard public key",
            ));
        }
        if keys_seen.insert(network.id, ()).is_some() {
            return Err(Status::invalid_argument(format!(
                "two keys for network `{}` in one report",
                network.name
            )));
        }
        // A node reports a new key at the same generation only when it lost its own (a state
        // directory made again): at most once a minute, so no worker can churn its peers' slices.
        let recorded = held.get(&network.id);
        if let Some(r) = recorded
            && r.generation == key.generation
            && r.public != public
            && now < r.reported_at + SAME_GENERATION_AFTER
        {
            return Err(Status::resource_exhausted(format!(
                "a key for network `{}` was recorded {} s ago at this generation: at most one a minute",
                network.name,
                now - r.reported_at
            )));
        }
        let taken = state
            .nodes
            .values()
            .any(|n| &n.id != node && n.wireguard.get(&network.id).is_some_and(|k| k.public == public));
        if taken {
            return Err(Status::permission_denied(format!(
                "another node reported this public key on network `{}`",
                network.name
            )));
        }
        if recorded.is_some_and(|r| (r.generation, r.public) == (key.generation, public)) {
            continue;
        }
        let record = WireguardPublic { generation: key.generation, public, reported_at: now };
        commands.push(Command::SetWireguardKey { id: node.clone(), network: network.id, key: record });
    }
    Ok(commands)
}

pub(crate) struct SessionApi(pub(crate) Arc<Manager>);

#[tonic::async_trait]
impl pb::dispatcher_server::Dispatcher for SessionApi {
    type SessionStream = ReceiverStream<Result<pb::NodeSlice, Status>>;
    type RequestsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<pb::NodeRequest, Status>> + Send>>;

    async fn session(
        &self,
        request: Request<pb::SessionRequest>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        let manager = self.0.clone();
        let node = match manager.caller(&request)? {
            Caller::Node { id, .. } => id,
            Caller::Admin => {
                return Err(Status::permission_denied(
                    "sessions are for nodes; the admin certificate has none",
                ));
            }
        };
        let seen_from = request.remote_addr().map(|a| a.ip().to_canonical());
        let reported = request.get_ref().underlay.trim();
        let underlay = attested_underlay(reported, seen_from)?;
        let boot = u16::try_from(request.get_ref().boot).map_err(|_| {
            Status::invalid_argument(format!("boot number {} is out of range", request.get_ref().boot))
        })?;
        let (known, recorded) =
            manager.store.read(|s| s.nodes.get(&node).map_or((None, 0), |n| (n.underlay, n.boot)));
        if boot != 0 && boot < recorded {
            return Err(Status::failed_precondition(
                crate::state::StateError::BootRollback { id: node.clone(), boot, recorded }.to_string(),
            ));
        }
        let mut commands = Vec::new();
        if let Some(underlay) = underlay
            && known != Some(underlay)
        {
            commands.push(Command::SetNodeUnderlay { id: node.clone(), underlay });
        }
        if boot != 0 && boot != recorded {
            commands.push(Command::SetNodeBoot { id: node.clone(), boot });
        }
        if !commands.is_empty() {
            manager.change(move |_, _| Ok(commands)).await?;
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let guard = manager.session_opened(&node);
        info!(node = %node, "session opened");
        let span = tracing::info_span!("session", node = %node);
        let task = async move {
            let guard = guard;
            let mut revisions = manager.store.subscribe();
            let mut last: Option<(NodeSlice, u16)> = None;
            loop {
                let (slice, boot, removed) = manager.store.read(|s| {
                    let earlier = last.as_ref().map(|(slice, boot)| (slice, *boot));
                    (
                        slice_after(s, &node, &manager.policies, &manager.memberships, now(), earlier),
                        s.nodes.get(&node).map_or(0, |n| n.boot),
                        s.active_node(&node).is_err(),
                    )
                });
                if removed {
                    let _ = tx
                        .send(Err(Status::permission_denied(format!(
                            "node {node} has been removed from the cluster"
                        ))))
                        .await;
                    break;
                }
                if last.as_ref().is_none_or(|(l, _)| !l.same_content(&slice)) {
                    debug!(node = %node, version = slice.version, "sending slice");
                    let wire = slice.to_wire(last.as_ref().map(|(l, _)| l));
                    let kind = SliceKind { kind: if last.is_some() { "delta" } else { "whole" } };
                    manager.metrics.slices.get_or_create(&kind).inc();
                    manager
                        .metrics
                        .slice_bytes
                        .get_or_create(&kind)
                        .inc_by(prost::Message::encoded_len(&wire) as u64);
                    if tx.send(Ok(wire)).await.is_err() {
                        break;
                    }
                    last = Some((slice, boot));
                }
                tokio::select! {
                    changed = revisions.changed() => if changed.is_err() { break },
                    _ = tx.closed() => break,
                    _ = guard.replaced.cancelled() => {
                        info!(node = %node, "session replaced by a newer one of the same node");
                        let _ = tx.send(Err(Status::aborted("replaced by a newer session of this node"))).await;
                        break;
                    }
                }
            }
            info!(node = %node, "session closed");
        };
        tokio::spawn(task.instrument(span));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report_endpoints(
        &self,
        request: Request<pb::EndpointReports>,
    ) -> Result<Response<pb::ReportEndpointsResponse>, Status> {
        let node = match self.0.caller(&request)? {
            Caller::Node { id, .. } => id,
            Caller::Admin => return Err(Status::permission_denied("reports are for nodes")),
        };
        let pb::EndpointReports { endpoints: reports, published } = request.into_inner();
        if reports.len() > MAX_REPORTED || published.len() > MAX_REPORTED {
            return Err(Status::invalid_argument(format!(
                "at most {MAX_REPORTED} endpoints and published ports per report"
            )));
        }
        let published = published
            .into_iter()
            .map(|p| {
                if p.service.len() > MAX_REPORT_TEXT || p.error.len() > MAX_REPORT_TEXT {
                    return Err(Status::invalid_argument("malformed report: report text"));
                }
                let port = u16::try_from(p.port)
                    .map_err(|_| Status::invalid_argument("malformed report: published port"))?;
                let error = (!p.listening)
                    .then(|| if p.error.is_empty() { "not listening".to_owned() } else { p.error });
                Ok(crate::manager::reports::PublishedState { port, service: p.service, error })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        let reported = reports
            .into_iter()
            .map(EndpointState::try_from)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Status::invalid_argument(format!("malformed report: {e}")))?;
        debug!(node = %node, endpoints = reported.len(), "endpoints reported");
        self.0.store.read(|state| {
            self.0.reports.put(state, &node, reported);
            self.0.reports.put_published(state, &node, published);
        });
        Ok(Response::new(pb::ReportEndpointsResponse {}))
    }

    async fn report_wireguard_keys(
        &self,
        request: Request<pb::WireguardKeys>,
    ) -> Result<Response<pb::ReportWireguardKeysResponse>, Status> {
        let node = match self.0.caller(&request)? {
            Caller::Node { id, .. } => id,
            Caller::Admin => return Err(Status::permission_denied("WireGuard keys are for nodes")),
        };
        let keys = request.into_inner().keys;
        let reported = keys.len();
        // Checked and applied under the manager's one writer: no change slips in between.
        let mut refused = None;
        let mut recorded = 0;
        self.0
            .change(|state, _| match wireguard_commands(state, &node, keys, now()) {
                Ok(commands) => {
                    recorded = commands.len();
                    Ok(commands)
                }
                Err(status) => {
                    refused = Some(status);
                    Ok(Vec::new())
                }
            })
            .await?;
        if let Some(status) = refused {
            return Err(status);
        }
        if recorded > 0 {
            info!(node = %node, keys = reported, "WireGuard public keys recorded");
        }
        Ok(Response::new(pb::ReportWireguardKeysResponse {}))
    }

    async fn requests(
        &self,
        request: Request<pb::NodeRequestsRequest>,
    ) -> Result<Response<Self::RequestsStream>, Status> {
        let node = match self.0.caller(&request)? {
            Caller::Node { id, .. } => id,
            Caller::Admin => return Err(Status::permission_denied("requests are for nodes")),
        };
        let rx = self.0.requests.attach(&node);
        let stream = tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn answer_logs(
        &self,
        request: Request<pb::LogsAnswer>,
    ) -> Result<Response<pb::AnswerLogsResponse>, Status> {
        let node = match self.0.caller(&request)? {
            Caller::Node { id, .. } => id,
            Caller::Admin => return Err(Status::permission_denied("answers are for nodes")),
        };
        let answer = request.into_inner();
        if answer.lines.len() > MAX_LOG_LINES {
            return Err(Status::invalid_argument(format!("at most {MAX_LOG_LINES} lines per answer")));
        }
        let lines = if answer.error.is_empty() {
            Ok(answer.lines.into_iter().map(LogLine::from).collect())
        } else {
            Err(answer.error.chars().take(MAX_REPORT_TEXT).collect())
        };
        if !self.0.requests.answer(&node, answer.id, lines) {
            debug!(node = %node, id = answer.id, "an answer to no request of this node's; ignored");
        }
        Ok(Response::new(pb::AnswerLogsResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_registers_only_the_underlay_ip_it_comes_from() {
        let from = Some("192.0.2.7".parse().unwrap());
        let ok = attested_underlay("192.0.2.7:4800", from).unwrap();
        assert_eq!(ok, Some("192.0.2.7:4800".parse().unwrap()));
        assert_eq!(attested_underlay("0.0.0.0:4801", from).unwrap(), Some("192.0.2.7:4801".parse().unwrap()));
        assert_eq!(attested_underlay("", from).unwrap(), None);
        let refused = attested_underlay("192.0.2.8:4800", from).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(refused.message().contains("this session comes from 192.0.2.7"), "{}", refused.message());
        let mapped = Some("::ffff:192.0.2.7".parse::<std::net::IpAddr>().unwrap().to_canonical());
        assert!(attested_underlay("192.0.2.7:4800", mapped).is_ok());
        assert!(attested_underlay("192.0.2.7:4800", None).is_err());
        let local = Some("127.0.0.1".parse().unwrap());
        assert!(attested_underlay("127.0.0.9:4800", local).is_ok(), "the manager's own host");
        assert_eq!(attested_underlay("nonsense", from).unwrap_err().code(), tonic::Code::InvalidArgument);
    }
}
