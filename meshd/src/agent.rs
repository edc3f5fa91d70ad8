//! `meshd run`'s composition root (ztunnel's `app.rs`): the one place that builds the parts, the
//! channels between them and their tasks, and runs them until one stops or a signal comes.
//!
//! ```text
//!  identity ──watch: node certificate──────────────────► mesh port (inbound TLS)
//!      │     ──watch per endpoint (WorkloadCertificates)─► workload proxies (outbound)
//!      ▲ renew now
//!  status socket ◄── `meshd status`, `meshd renew`
//!      ▲ what the node holds
//!  session ──events──► reconciler ──► overlay (tun), workloads, DNS zones, mesh view
//! ```

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, watch};
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use crate::config::AgentConfig;
use crate::dns::Upstream;
use crate::identity::{self, IdentityError, NodeDir, NodeIdentity, WorkloadCertificates};
use crate::mesh::{Mesh, tls};
use crate::metrics::Metrics;
use crate::overlay;
use crate::reconciler::Reconciler;
use crate::session::{self, SessionError, SessionEvent};
use crate::status::{self, Status};

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("the status socket failed: {0}")]
    Status(String),
    #[error("data plane: {0}")]
    Dataplane(String),
}

/// Renewal requests waiting at once (`meshd renew` while the agent runs).
const RENEWALS_QUEUED: usize = 4;

/// Runs the agent until an unrecoverable error: renewal, the session, the data plane, status.
/// Raises this process's limit of open files to the most it may have: each proxied connection
/// holds two (the workload's side and the mesh's, or the outside's), and a default soft limit
/// of 1,024 would be reached long before the quotas of the mesh port and published ports.
fn raise_open_files() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => info!(from = soft, to = hard, "open files limit raised"),
            Err(e) => warn!(limit = soft, error = %e, "cannot raise the open files limit"),
        },
        Ok(_) | Err(_) => {}
    }
}

pub async fn run(mut config: AgentConfig) -> Result<(), AgentError> {
    // Caught from here on: a stop while it starts is kept for when it waits for one (and the
    // workloads are removed), never a kill.
    let mut stop = mesh_api::notify::Stop::catch()
        .map_err(|e| AgentError::Dataplane(format!("catching SIGTERM: {e}")))?;
    let dir = config.session.state_dir.clone();
    let node = Arc::new(NodeDir::new(&dir).load()?);
    info!(
        node = %node.id,
        role = %node.info.unit,
        managers = %node.managers.join(","),
        cert_expires = %node.info.not_after,
        "meshd running"
    );
    info!(
        state_dir = %dir.display(),
        underlay = %config.session.underlay,
        netns_prefix = %config.netns_prefix,
        dataplane = config.dataplane,
        dns_visibility = ?config.dns_visibility,
        metrics = ?config.metrics,
        spec_key = %node.spec_key.map_or("none pinned: any command control sends runs".to_owned(), |k| k.to_string()),
        "configuration"
    );
    raise_open_files();
    let (node_published, node_certificate) = watch::channel(node.clone());
    let node_certificate_now = node_certificate.clone();
    let (renew_now, renew_requests) = mpsc::channel(RENEWALS_QUEUED);
    let status = Arc::new(Mutex::new(Status {
        node: node.id.to_string(),
        control: node.managers.join(","),
        underlay: config.session.underlay.to_string(),
        netns_prefix: config.netns_prefix.clone(),
        roots: node.trust.roots().iter().map(|r| r.digest.clone()).collect(),
        ..Status::default()
    }));
    let endpoints = crate::endpoints::Endpoints::new();
    let dataplane = if config.dataplane {
        let boot = overlay::next_boot(&dir).map_err(|e| AgentError::Dataplane(e.to_string()))?;
        config.session.boot = boot;
        let keys = crate::wireguard::Keys::open(&dir).map_err(|e| AgentError::Dataplane(e.to_string()))?;
        config.session.wireguard = Some(Arc::new(keys));
        let holder = status.clone();
        let ready: mesh_api::metrics_http::Readiness = Arc::new(move || {
            let s = holder.lock().expect("lock");
            if s.connected {
                Ok(())
            } else {
                Err(format!("no session with control ({})", s.last_error.as_deref().unwrap_or("connecting")))
            }
        });
        let dp = Dataplane::start(&config, &node, node_certificate, boot, endpoints.clone(), ready)
            .await
            .map_err(|e| {
                AgentError::Dataplane(format!(
                    "cannot start the data plane on {}: {e}",
                    config.session.underlay
                ))
            })?;
        let mut s = status.lock().expect("lock");
        s.counters = Some(dp.counters.clone());
        s.certificates = Some(dp.certificates.clone());
        s.reports = Some(endpoints.subscribe());
        s.endpoints_hub = Some(endpoints.clone());
        s.overlay = Some(dp.overlay.clone());
        Some(dp)
    } else {
        None
    };
    // Up as far as this host goes: systemd's start is done (the session comes and goes).
    mesh_api::notify::tell(&format!("READY=1\nSTATUS=node {}: connecting to control", node.id));
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let holder = status.clone();
    let reconciler = dataplane.as_ref().map(|dp| dp.reconciler.clone());
    let (roots_published, roots) = watch::channel(Arc::new(node.trust.clone()));
    let roots_dir = NodeDir::new(&dir);
    let follow = async move {
        let mut refused = String::new();
        while let Some(event) = events.recv().await {
            // The roots held are compared in memory first: most slices carry the same ones.
            if let SessionEvent::Slice(slice) = &event
                && slice.trust_pem != roots_published.borrow().to_pem()
            {
                match roots_dir.accept_trust(&slice.trust_pem, &slice.cross_pem) {
                    Ok(Some(accepted)) => {
                        info!(roots = %accepted.digests(), "the cluster's roots changed; now trusted");
                        holder.lock().expect("lock").roots =
                            accepted.roots().iter().map(|r| r.digest.clone()).collect();
                        roots_published.send_replace(Arc::new(accepted));
                    }
                    Ok(None) => {}
                    Err(e) if e.to_string() != refused => {
                        refused = e.to_string();
                        warn!(error = %e, "roots offered by control refused; the roots trusted stay as they are");
                    }
                    Err(_) => {}
                }
            }
            if let (SessionEvent::Slice(slice), Some(r)) = (&event, &reconciler) {
                r.apply(slice).await;
            }
            let mut status = holder.lock().expect("lock");
            match event {
                SessionEvent::Connected => {
                    status.connected = true;
                    status.last_error = None;
                    mesh_api::notify::tell(&format!(
                        "STATUS=node {}: session with control open",
                        status.node
                    ));
                }
                SessionEvent::Disconnected(why) => {
                    mesh_api::notify::tell(&format!(
                        "STATUS=node {}: no session with control: {why}",
                        status.node
                    ));
                    status.connected = false;
                    status.last_error = Some(why);
                }
                SessionEvent::Slice(slice) => {
                    status.apply(&slice);
                    status.slice = Some(Arc::new(*slice));
                }
            }
        }
    };
    let rotating = follow_roots(
        roots,
        dataplane.as_ref().map(|dp| (dp.mesh.clone(), dp.certificates.clone())),
        node_certificate_now,
        renew_now.clone(),
    );
    let result = tokio::select! {
        renewing = identity::keep_renewed(&dir, node_published, renew_requests) => renewing.map_err(AgentError::from),
        _ = rotating => Ok(()),
        refused = session::run(config.session.clone(), events_tx, endpoints.clone()) => Err(AgentError::Session(refused)),
        served = status::serve(&dir, status.clone(), renew_now) => Err(AgentError::Status(served.err().map_or_else(|| "stopped".into(), |e| e.to_string()))),
        _ = follow => Ok(()),
        _ = stop.wait() => {
            info!("shutting down");
            Ok(())
        }
    };
    mesh_api::notify::tell("STOPPING=1");
    if let Some(dp) = dataplane {
        dp.reconciler.shutdown().await;
    }
    result
}

/// The data plane as `run` wires it: the overlay, the mesh port and metrics, and the reconciler
/// that the slices reach them through.
struct Dataplane {
    reconciler: Arc<Reconciler>,
    counters: Arc<tun::core::Counters>,
    certificates: Arc<WorkloadCertificates>,
    mesh: Arc<Mesh>,
    /// The overlay's WireGuard peers, for `meshd status`.
    overlay: tun::io::StatusHandle,
    /// The mesh port, the node certificate's follower, the metrics server.
    _tasks: Vec<AbortOnDropHandle<()>>,
}

impl Dataplane {
    /// Binds the underlay socket (UDP) and the mesh port (TCP, same address and port), starts
    /// receiving, and serves metrics when asked to. `boot` is this run's boot number; the mesh
    /// port presents each node certificate `node_certificate` carries.
    async fn start(
        config: &AgentConfig,
        node: &NodeIdentity,
        node_certificate: watch::Receiver<Arc<NodeIdentity>>,
        boot: u16,
        endpoints: Arc<crate::endpoints::Endpoints>,
        ready: mesh_api::metrics_http::Readiness,
    ) -> std::io::Result<Dataplane> {
        let listen = overlay::listen_address(config.session.underlay);
        let cluster = node.info.organization.parse().map_err(std::io::Error::other)?;
        let served = Arc::new(tls::NodeCertificate::new(&node.identity).map_err(std::io::Error::other)?);
        let metrics = Arc::new(Metrics::default());
        let mesh = Arc::new(
            Mesh::new(cluster, node.trust.clone(), served.clone(), metrics.clone())
                .map_err(std::io::Error::other)?,
        );
        let overlay = overlay::bind(listen, boot, mesh.view.clone())?;
        let overlay_status = overlay.status_handle();
        let counters = overlay.counters().clone();
        metrics.with_overlay(counters.clone());
        let mesh_listener = tokio::net::TcpListener::bind(listen)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("mesh port {listen}/tcp: {e}")))?;
        let metrics_listener = match config.metrics {
            Some(address) => Some(mesh_api::metrics_http::bind(address).await?),
            None => None,
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(
            tls::server_config(mesh.client_verifier.clone(), served.clone())
                .map_err(std::io::Error::other)?,
        );
        let ingress = crate::mesh::ingress::Ingress::new(
            mesh.clone(),
            node_certificate.clone(),
            endpoints.clone(),
            config.publish_address,
        );
        let mut tasks = vec![
            spawn(crate::mesh::inbound::serve(mesh.clone(), mesh_listener, acceptor)),
            spawn(async move { served.follow(node_certificate).await }),
            spawn(ingress.clone().keep_trying()),
        ];
        let upstream = Arc::new(Upstream::with_servers(&config.resolvers));
        tasks.push(spawn(mesh.egress.clone().keep_resolved(upstream.clone())));
        if let Some(listener) = metrics_listener {
            let registry = metrics.clone();
            tasks.push(spawn(mesh_api::metrics_http::serve(
                listener,
                Arc::new(move || registry.encode()),
                ready,
            )));
        }
        let certificates = Arc::new(WorkloadCertificates::new(&config.session.state_dir, metrics));
        let seen = identity::NodeDir::new(&config.session.state_dir).spec_seen();
        let spec_seen = mesh_api::specs::Seen::open(&seen).map_err(std::io::Error::other)?;
        let mesh_handle = mesh.clone();
        let reconciler =
            Reconciler::start(
                &config.netns_prefix,
                overlay,
                mesh,
                certificates.clone(),
                crate::reconciler::Hosting {
                    upstream,
                    visibility: config.dns_visibility,
                    sandbox: crate::sandbox::Host::new(&config.session.state_dir),
                    endpoints,
                    spec_key: node.spec_key,
                    spec_seen,
                    cluster: node.info.organization.clone(),
                    wireguard: config.session.wireguard.clone().unwrap_or_else(|| {
                        Arc::new(crate::wireguard::Keys::empty(&config.session.state_dir))
                    }),
                    ingress: ingress.clone(),
                    dns_upstream: config.dns_upstream,
                },
            )
            .await;
        info!(bind = %listen, prefix = %config.netns_prefix, boot, "data plane listening (overlay on UDP, mesh on TCP)");
        Ok(Dataplane {
            reconciler: Arc::new(reconciler),
            counters,
            certificates,
            mesh: mesh_handle,
            overlay: overlay_status,
            _tasks: tasks,
        })
    }
}

/// Follows the cluster's roots as slices change them (a root rotation): the mesh verifies peers
/// against each from its next connection on; then, when another root signs now, the workload
/// certificates are renewed first and the node certificate after them (control counts the node
/// done on its node certificate, so that comes last).
async fn follow_roots(
    mut roots: watch::Receiver<Arc<mesh_api::trust::Trust>>,
    dataplane: Option<(Arc<Mesh>, Arc<WorkloadCertificates>)>,
    node_certificate: watch::Receiver<Arc<NodeIdentity>>,
    renew_now: identity::RenewNow,
) {
    // A restart in the middle (the roots on disk, the node certificate not renewed yet) picks
    // up where it was.
    if !roots.borrow().signed_by_newest(&node_certificate.borrow().identity.cert_pem) {
        roots.mark_changed();
    }
    while roots.changed().await.is_ok() {
        let trust = roots.borrow_and_update().clone();
        if let Some((mesh, _)) = &dataplane
            && let Err(e) = mesh.set_roots((*trust).clone())
        {
            warn!(error = %e, "the mesh cannot use the new roots");
        }
        let mut attempt = 0;
        // Until renewed from the signing root, or the roots change again (then from those).
        while !roots.has_changed().unwrap_or(true) {
            if let Some((_, certificates)) = &dataplane
                && !certificates.renew_from(&trust, ROOTS_PATIENCE).await
            {
                warn!("some workload certificates are not renewed from the new root yet; will retry");
                tokio::time::sleep(crate::backoff::delay(attempt)).await;
                attempt += 1;
                continue;
            }
            if trust.signed_by_newest(&node_certificate.borrow().identity.cert_pem) {
                break;
            }
            let (reply, outcome) = tokio::sync::oneshot::channel();
            if renew_now.send(reply).await.is_ok() && matches!(outcome.await, Ok(Ok(_))) {
                info!(root = %trust.newest().digest, "renewed from the new root");
                break;
            }
            tokio::time::sleep(crate::backoff::delay(attempt)).await;
            attempt += 1;
        }
    }
    // The publisher is gone with the session follower: nothing more to follow.
    std::future::pending::<()>().await
}

/// How long the workload certificates are waited for after the roots changed, before trying again.
const ROOTS_PATIENCE: std::time::Duration = std::time::Duration::from_secs(30);

fn spawn(task: impl Future<Output = ()> + Send + 'static) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(task))
}
