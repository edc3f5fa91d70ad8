//! Helpers shared by the end-to-end tests: a real control plane served in-process over gRPC and
//! TLS on 127.0.0.1:0, and nodes joined to it through meshd's own join code; and ([`lab`]) a lab
//! of network namespaces running the real binaries.

pub mod lab;
pub mod traffic;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use control::config::ManagerOptions;
use control::manager::Manager;
use control::serve;
use control::statedir::{self, ManagerConfig, ManagerDir};
use mesh_api::bundle::AdminBundle;
use mesh_api::client::AdminClient;
use mesh_api::ids::NodeId;
use mesh_api::slice::NodeSlice;
use mesh_api::tokens::Role;
use meshd::session::{SessionConfig, SessionError, SessionEvent};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// A control plane serving a fresh cluster from a temporary state directory.
pub struct TestCluster {
    pub dir: TempDir,
    pub addr: SocketAddr,
    pub manager: Arc<Manager>,
    pub options: ManagerOptions,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl TestCluster {
    /// Creates a cluster whose node certificates live `cert_lifetime`, and serves it.
    pub async fn start(cert_lifetime: Duration) -> TestCluster {
        TestCluster::start_with(cert_lifetime, ManagerOptions::default()).await
    }

    /// As [`TestCluster::start`], with the manager's options.
    pub async fn start_with(cert_lifetime: Duration, options: ManagerOptions) -> TestCluster {
        let dir = tempfile::tempdir().expect("temp dir");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        statedir::init(&state_dir(&dir), ManagerConfig::new(addr, None), cert_lifetime, false)
            .await
            .expect("init");
        TestCluster::serve(dir, listener, options).await
    }

    async fn serve(dir: TempDir, listener: TcpListener, options: ManagerOptions) -> TestCluster {
        let addr = listener.local_addr().expect("local addr");
        let opened = statedir::open(&state_dir(&dir), None).await.expect("open");
        // A single manager elects itself within a second; the tests start once it leads.
        opened.store.wait_to_lead(Duration::from_secs(10)).await.expect("the manager leads");
        let manager = Manager::new(opened, options.clone()).expect("manager");
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = serve::serve(
            manager.clone(),
            listener,
            async {
                let _ = stopped.await;
            },
            None,
        );
        let task = tokio::spawn(async move {
            if let Err(e) = serving.await {
                eprintln!("control server stopped: {e}");
            }
        });
        TestCluster { dir, addr, manager, options, stop: Some(stop), task: Some(task) }
    }

    /// Stops the manager and serves the same state directory again on the same address.
    pub async fn restart(mut self) -> TestCluster {
        self.shutdown().await;
        let listener = TcpListener::bind(self.addr).await.expect("rebind the same address");
        let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("temp dir"));
        let options = self.options.clone();
        TestCluster::serve(dir, listener, options).await
    }

    async fn shutdown(&mut self) {
        // As a process exit would: every connection goes, and the store closes.
        self.manager.close_all();
        self.manager.store().shutdown().await;
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            // Graceful shutdown waits for open connections; tests do not keep any worth waiting for.
            task.abort();
            let _ = task.await;
        }
    }

    pub fn state_dir(&self) -> PathBuf {
        state_dir(&self.dir)
    }

    pub fn manager_dir(&self) -> ManagerDir {
        ManagerDir::new(&self.state_dir())
    }

    pub fn control(&self) -> String {
        self.addr.to_string()
    }

    pub fn admin_bundle(&self) -> AdminBundle {
        AdminBundle::load(&self.manager_dir().admin()).expect("admin bundle")
    }

    pub async fn admin(&self) -> AdminClient {
        AdminClient::connect(&self.admin_bundle()).await.expect("admin client")
    }

    /// A channel to control trusting the cluster CA, presenting `identity` when given.
    pub async fn channel_as(&self, identity: Option<&mesh_api::tls::Identity>) -> tonic::transport::Channel {
        mesh_api::client::authenticated_channel(&self.control(), &self.manager.roots(), identity)
            .await
            .expect("a channel to control")
    }

    pub fn token(&self, role: Role) -> String {
        self.manager.store().read(|s| s.join_tokens[&role].0.clone())
    }

    /// Joins a new node with `role`'s token; returns its state directory and ID.
    pub async fn join(&self, role: Role) -> (TempDir, NodeId) {
        let dir = tempfile::tempdir().expect("temp dir");
        let id = meshd::identity::join(&self.control(), &self.token(role), &node_dir(&dir), "test-host")
            .await
            .expect("join");
        (dir, id)
    }
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

fn state_dir(dir: &TempDir) -> PathBuf {
    dir.path().join("control")
}

/// Where a node's identity lives inside its temporary directory (a subdirectory, so that join
/// creates it, as it would on a real host).
pub fn node_dir(dir: &TempDir) -> PathBuf {
    dir.path().join("meshd")
}

/// The permission bits of `path`.
pub fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).expect("metadata").permissions().mode() & 0o777
}

/// A joined node holding a real session with control (meshd's session code), recording every
/// slice and event it was sent.
pub struct SimNode {
    pub dir: TempDir,
    pub id: NodeId,
    pub underlay: SocketAddr,
    pub events: Arc<std::sync::Mutex<Vec<SessionEvent>>>,
    /// What its session reports of its endpoints (tests set them, as workloads would).
    pub endpoints: Arc<meshd::endpoints::Endpoints>,
    session: JoinHandle<SessionError>,
}

impl SimNode {
    /// Joins `cluster` as a worker and opens the session, reporting `underlay`.
    pub async fn start(cluster: &TestCluster, underlay: SocketAddr) -> SimNode {
        let (dir, id) = cluster.join(Role::Worker).await;
        let config = SessionConfig { state_dir: node_dir(&dir), underlay, boot: 1, wireguard: None };
        let events = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let sink = events.clone();
        tokio::spawn(async move {
            while let Some(event) = rx.recv().await {
                sink.lock().expect("lock").push(event);
            }
        });
        let endpoints = meshd::endpoints::Endpoints::new();
        let session = tokio::spawn(meshd::session::run(config, tx, endpoints.clone()));
        let node = SimNode { dir, id, underlay, events, endpoints, session };
        node.wait_connected().await;
        node
    }

    pub fn state_dir(&self) -> PathBuf {
        node_dir(&self.dir)
    }

    /// Every slice received so far, in order.
    pub fn slices(&self) -> Vec<NodeSlice> {
        self.events
            .lock()
            .expect("lock")
            .iter()
            .filter_map(|e| if let SessionEvent::Slice(s) = e { Some((**s).clone()) } else { None })
            .collect()
    }

    /// The last slice received.
    pub fn latest(&self) -> Option<NodeSlice> {
        self.slices().pop()
    }

    /// Connected events so far.
    pub fn connects(&self) -> usize {
        self.events.lock().expect("lock").iter().filter(|e| matches!(e, SessionEvent::Connected)).count()
    }

    async fn wait_connected(&self) {
        eventually("the session to open", || self.connects() > 0 && self.latest().is_some()).await;
    }

    /// Waits until the latest slice satisfies `check`; returns it.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&NodeSlice) -> bool) -> NodeSlice {
        eventually(what, || self.latest().is_some_and(|s| check(&s))).await;
        self.latest().expect("a slice")
    }

    /// Stops the session (as if meshd died), keeping what it recorded.
    pub fn stop(&self) {
        self.session.abort();
    }

    /// Whether the session gave up, and why.
    pub async fn ended(&mut self) -> Option<SessionError> {
        if self.session.is_finished() { (&mut self.session).await.ok() } else { None }
    }
}

impl Drop for SimNode {
    fn drop(&mut self) {
        self.session.abort();
    }
}

/// Polls `check` every 20 ms for up to 10 s; panics naming `what` if it never holds.
pub async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A loopback underlay address for a simulated node.
pub fn loopback_underlay(i: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, i], 4800))
}

/// A one-replica service on network `front`, pinned to `node`, running `sleep 1000` as `run` says.
pub fn pinned_service(
    name: &str,
    node: &str,
    run: Option<mesh_api::proto::pb::RunSpec>,
) -> mesh_api::proto::pb::CreateServiceRequest {
    mesh_api::proto::pb::CreateServiceRequest {
        name: name.into(),
        networks: vec!["front".into()],
        ports: vec![],
        replicas: 1,
        constraints: vec![format!("node.id=={node}")],
        command: "sleep 1000".into(),
        run,
        signed: None,
        publish: vec![],
    }
}
