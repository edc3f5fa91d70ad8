//! Benchmarks: criterion micro benchmarks (`benches/`), the end-to-end throughput harness that
//! measures the overlay and the mesh beside plain networking and peers in the same run (the shell
//! scripts), and the control plane's own (`src/bin/`: key rotation fan-out, manager failover and
//! write throughput). This library holds what those binaries share: real `mesh-control`
//! processes on loopback.
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use mesh_api::bundle::AdminBundle;
use mesh_api::client::AdminClient;

/// A `mesh-control` process on loopback; killed when dropped.
pub struct ManagerProcess {
    pub child: Option<Child>,
    pub state: PathBuf,
    pub listen: String,
    binary: PathBuf,
}

impl Drop for ManagerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl ManagerProcess {
    /// Creates a cluster in `dir` and serves it; returns once it answers admin calls.
    pub async fn init(binary: &Path, dir: &Path) -> anyhow::Result<ManagerProcess> {
        let state = dir.join("m1");
        let listen = format!("127.0.0.1:{}", free_port()?);
        let status = Command::new(binary)
            .args(["init", "--state-dir"])
            .arg(&state)
            .args(["--listen", &listen, "--advertise", &listen, "--admin-dir"])
            .arg(state.join("admin"))
            .stdout(Stdio::null())
            .status()
            .with_context(|| {
                format!("running {} (build it: cargo build --release -p control)", binary.display())
            })?;
        if !status.success() {
            bail!("mesh-control init failed");
        }
        let mut m = ManagerProcess { child: None, state, listen, binary: binary.to_owned() };
        m.spawn(&["run"])?;
        m.wait_for_leader().await?;
        Ok(m)
    }

    /// Joins the cluster of `first` as manager number `n` and serves.
    pub async fn join(first: &ManagerProcess, dir: &Path, n: usize) -> anyhow::Result<ManagerProcess> {
        let mut admin = AdminClient::connect(&first.bundle()?).await?;
        let token = admin.join_token(mesh_api::tokens::Role::Manager, false).await?;
        let state = dir.join(format!("m{n}"));
        let listen = format!("127.0.0.1:{}", free_port()?);
        let mut m = ManagerProcess { child: None, state, listen, binary: first.binary.clone() };
        let listen = m.listen.clone();
        let join = [
            "join",
            "--control",
            &first.listen,
            "--token",
            &token,
            "--listen",
            &listen,
            "--advertise",
            &listen,
        ];
        m.spawn(&join)?;
        Ok(m)
    }

    fn spawn(&mut self, args: &[&str]) -> anyhow::Result<()> {
        let child = Command::new(&self.binary)
            .args(args)
            .arg("--state-dir")
            .arg(&self.state)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        self.child = Some(child);
        Ok(())
    }

    /// Serves the state again after [`ManagerProcess::kill`].
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.spawn(&["run"])
    }

    /// SIGKILL, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The admin bundle (made by the first manager).
    pub fn bundle(&self) -> anyhow::Result<AdminBundle> {
        Ok(AdminBundle::load(&self.state.join("admin"))?)
    }

    async fn wait_for_leader(&self) -> anyhow::Result<()> {
        for _ in 0..200 {
            if AdminClient::connect(&self.bundle()?).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        bail!("mesh-control did not come up")
    }

    /// Resident memory of the process, KiB.
    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let pid = self.child.as_ref().context("not running")?.id();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
        Ok(line.split_whitespace().nth(1).context("VmRSS value")?.parse()?)
    }
}
