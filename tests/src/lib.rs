//! Helpers shared by the end-to-end tests: a real control plane served in-process over gRPC and
//! TLS on 127.0.0.1:0, and nodes joined to it through meshd's own join code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use control::client::AdminClient;
use control::cluster::{self, AdminBundle, ManagerConfig, ManagerDir};
use control::ids::NodeId;
use control::server::{self, Manager, ManagerOptions};
use control::tokens::Role;
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
        cluster::init(&state_dir(&dir), ManagerConfig::new(addr, None), cert_lifetime).expect("init");
        TestCluster::serve(dir, listener, options).await
    }

    async fn serve(dir: TempDir, listener: TcpListener, options: ManagerOptions) -> TestCluster {
        let addr = listener.local_addr().expect("local addr");
        let opened = cluster::open(&state_dir(&dir)).expect("open");
        let manager = Manager::new(opened, options.clone()).expect("manager");
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = server::serve(manager.clone(), listener, async {
            let _ = stopped.await;
        });
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

    pub fn token(&self, role: Role) -> String {
        self.manager_dir().read_token(role).expect("token").to_string()
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
