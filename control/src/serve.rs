//! The composition root of the manager: the only place that builds the gRPC handlers and the
//! background tasks and wires them to the [`Manager`]. Handlers never construct each other.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_api::proto::pb;
use tokio::net::TcpListener;
use tokio_util::task::AbortOnDropHandle;
use tracing::warn;

use crate::config;
use crate::handlers::admin::AdminApi;
use crate::handlers::gate::GateLayer;
use crate::handlers::identity::IdentityApi;
use crate::handlers::managers::ManagersApi;
use crate::handlers::session::SessionApi;
use crate::manager::Manager;
use crate::manager::connections::accept_tls;
use crate::raft::network::{MAX_MESSAGE, RaftApi};
use crate::raft::seal::UnlockKey;
use crate::statedir::{self, ManagerDir};

/// How often the manager checks whether its own certificate is due for renewal.
const SELF_RENEW_CHECK: Duration = Duration::from_secs(60);
/// How often placement and key rotation are checked.
const RECONCILE_EVERY: Duration = Duration::from_secs(1);

/// Why [`serve`] returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// The `shutdown` future completed.
    Shutdown,
    /// This manager was removed from the cluster; its state directory serves no more.
    Removed,
}

/// Serves the control API on `listener` until `shutdown` completes or this manager is removed.
pub async fn serve(
    manager: Arc<Manager>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
    opened_with: Option<&UnlockKey>,
) -> Result<Stopped, tonic::transport::Error> {
    let (tls, track) = (manager.clone(), manager.clone());
    let (incoming, _accept) = accept_tls(
        listener,
        config::CONNECTION_LIMITS,
        move || tls.server_tls(),
        move |node, token| track.track(node, token),
    );
    let background = manager.clone();
    let _background = AbortOnDropHandle::new(tokio::spawn(async move {
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
    let _leadership = AbortOnDropHandle::new(tokio::spawn(manager.clone().follow_leadership()));
    let opened_with = opened_with.map(|k| k.to_string());
    let _autolock = AbortOnDropHandle::new(tokio::spawn(manager.clone().follow_autolock(opened_with)));
    let _join = AbortOnDropHandle::new(tokio::spawn(manager.clone().join_raft_group()));
    let _removal = AbortOnDropHandle::new(tokio::spawn(manager.clone().follow_own_removal()));
    let _trust = AbortOnDropHandle::new(tokio::spawn(manager.clone().follow_trust()));
    let closer = manager.clone();
    let removed = manager.removed.clone();
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = removed.cancelled() => {}
        }
        closer.close_all();
    };
    let removed = manager.removed.clone();
    let small = config::MAX_ANONYMOUS_MESSAGE;
    server(manager.cluster_id.as_str())
        .add_service(
            pb::identity_server::IdentityServer::new(IdentityApi(manager.clone()))
                .max_decoding_message_size(small),
        )
        .add_service(
            pb::admin_server::AdminServer::new(AdminApi(manager.clone()))
                .max_decoding_message_size(config::MAX_MESSAGE),
        )
        .add_service(
            pb::managers_server::ManagersServer::new(ManagersApi(manager.clone()))
                .max_decoding_message_size(small),
        )
        .add_service(
            pb::raft_server::RaftServer::new(RaftApi::new(
                manager.cluster_id.clone(),
                manager.store().clone(),
            ))
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE),
        )
        .add_service(
            // Nodes only (the gate admits no one else): their answers carry output, up to 2 MiB.
            pb::dispatcher_server::DispatcherServer::new(SessionApi(manager))
                .max_decoding_message_size(config::MAX_MESSAGE),
        )
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(if removed.is_cancelled() { Stopped::Removed } else { Stopped::Shutdown })
}

/// The control port's gRPC server: the [`GateLayer`] in front of every service, and HTTP/2
/// bounded (streams per connection, header size; the connection limits are [`accept_tls`]'s).
fn server(
    cluster: &str,
) -> tonic::transport::Server<tower::layer::util::Stack<GateLayer, tower::layer::util::Identity>> {
    tonic::transport::Server::builder()
        .max_concurrent_streams(config::MAX_STREAMS_PER_CONNECTION)
        .http2_max_header_list_size(config::MAX_HEADER_LIST)
        .http2_max_pending_accept_reset_streams(Some(config::MAX_STREAMS_PER_CONNECTION as usize))
        .layer(GateLayer::new(cluster))
}

/// Serves a locked manager: nothing over the network, only the unlock socket in its state
/// directory, until someone on this host gives the key that opens its data key, which is returned.
pub async fn serve_locked(root: &std::path::Path) -> Result<UnlockKey, statedir::ClusterError> {
    crate::handlers::unlock::serve(&ManagerDir::new(root)).await
}
