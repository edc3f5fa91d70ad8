//! The session service: each node's one session with control, over which it is pushed its slice
//! of the cluster ([`crate::slicer`]) and nothing else. A message is sent only when the slice
//! changed, and carries what changed since the session's previous message; a session's first
//! message is whole, so after any reconnect the node converges to the current slice at once.

use std::sync::Arc;

use mesh_api::proto::pb;
use mesh_api::slice::NodeSlice;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tracing::{Instrument, debug, info};

use crate::auth::Caller;
use crate::manager::Manager;
use crate::metrics::SliceKind;
use crate::slicer::slice_for;
use crate::state::Command;

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

pub(crate) struct SessionApi(pub(crate) Arc<Manager>);

#[tonic::async_trait]
impl pb::dispatcher_server::Dispatcher for SessionApi {
    type SessionStream = ReceiverStream<Result<pb::NodeSlice, Status>>;

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
        let underlay = request.get_ref().underlay.trim();
        if !underlay.is_empty() {
            let underlay: std::net::SocketAddr = underlay.parse().map_err(|_| {
                Status::invalid_argument(format!("underlay `{underlay}` is not an address ip:port"))
            })?;
            let known = manager.store.read(|s| s.nodes.get(&node).and_then(|n| n.underlay));
            if known != Some(underlay) {
                let id = node.clone();
                manager.change(move |_, _| Ok(vec![Command::SetNodeUnderlay { id, underlay }])).await?;
            }
        }
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let guard = manager.session_opened(&node);
        info!(node = %node, "session opened");
        let span = tracing::info_span!("session", node = %node);
        tokio::spawn(
            async move {
            let guard = guard;
            let mut revisions = manager.store.subscribe();
            let mut last: Option<NodeSlice> = None;
            loop {
                let (slice, removed) = manager.store.read(|s| {
                    (
                        slice_for(s, &node, &manager.policies, &manager.memberships, now()),
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
                if last.as_ref().is_none_or(|l| !l.same_content(&slice)) {
                    debug!(node = %node, version = slice.version, "sending slice");
                    let wire = slice.to_wire(last.as_ref());
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
                    last = Some(slice);
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
        }
            .instrument(span),
        );
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
