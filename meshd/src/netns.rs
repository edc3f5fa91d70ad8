//! Network namespaces, one per local endpoint, named `<prefix>-<service>-<slot>`: making and
//! removing them, a thread that lives inside one to open sockets there for the mesh, the tun
//! interfaces (one per network) and DNS sockets made inside, and the service's command run inside,
//! confined, and restarted when it exits. What runs for an endpoint is the `workload` module's.
//!
//! Namespaces are made with iproute2 (`ip netns`), so `ip netns exec` reaches them too.

use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::process::Stdio;
use std::time::Duration;

use nix::sched::{CloneFlags, setns};
use tokio::process::Command;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use crate::endpoints::{self, Endpoint};
use crate::sandbox::{self, Plan};
use mesh_api::model::RunState;

/// How long a command lives before it counts as running.
const RUNNING_AFTER: Duration = Duration::from_secs(1);

/// Name of the interface in each workload namespace, suffixed by the network's position.
pub const INTERFACE: &str = "mesh";

/// The namespace name of an endpoint.
pub fn namespace(prefix: &str, service: &str, slot: u32) -> String {
    format!("{prefix}-{service}-{slot}")
}

async fn ip(args: &[&str]) -> io::Result<()> {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Named namespaces that start with `prefix-`.
pub async fn list(prefix: &str) -> io::Result<Vec<String>> {
    let out = Command::new("ip").args(["netns", "list"]).output().await?;
    let text = String::from_utf8_lossy(&out.stdout);
    Ok(text
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with(&format!("{prefix}-")))
        .map(str::to_owned)
        .collect())
}

/// Creates namespace `name` (replacing a stale one left by an earlier run) with loopback up.
pub async fn create(name: &str) -> io::Result<()> {
    let _ = delete(name).await;
    ip(&["netns", "add", name]).await?;
    ip(&["-n", name, "link", "set", "lo", "up"]).await?;
    // The overlay is IPv4: no IPv6 chatter (router solicitations) on the workload's interfaces.
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            name,
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
            // The workload runs unprivileged: any port is its to bind, and ping needs no raw
            // socket.
            "net.ipv4.ip_unprivileged_port_start=0",
            "net.ipv4.ping_group_range=0 2147483647",
        ])
        .output()
        .await?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "setting up namespace {name}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Removes namespace `name`, killing what still runs in it.
pub async fn delete(name: &str) -> io::Result<()> {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output().await {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            let _ = Command::new("kill").args(["-9", pid]).status().await;
        }
    }
    let _ = std::fs::remove_dir_all(std::path::Path::new("/etc/netns").join(name));
    let ns = name.to_owned();
    sandbox::secrets::remove(name);
    let _ = tokio::task::spawn_blocking(move || sandbox::cgroup::remove(&ns)).await;
    ip(&["netns", "del", name]).await
}

/// Runs `f` on a thread that has entered namespace `ns` (and only that thread: meshd stays in
/// its own). Descriptors it opens keep their namespace when handed back.
fn in_namespace<T: Send>(ns: &str, f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = File::open(&path)?;
                setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
                f()
            })
            .join()
            .map_err(|_| io::Error::other("a thread working in a workload namespace panicked"))?
    })
}

/// A thread that lives inside one workload namespace and opens sockets there on request, so
/// the mesh can listen and connect on the workload's side without a thread per socket. It
/// leaves with the last handle.
pub struct Netns {
    name: String,
    jobs: std::sync::Mutex<std::sync::mpsc::Sender<Box<dyn FnOnce() + Send>>>,
}

impl Netns {
    /// Starts the thread in namespace `ns`.
    pub fn enter(ns: &str) -> io::Result<Netns> {
        let file = File::open(format!("/var/run/netns/{ns}"))?;
        let (tx, rx) = std::sync::mpsc::channel::<Box<dyn FnOnce() + Send>>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        std::thread::Builder::new().name(format!("netns-{ns}")).spawn(move || {
            let entered = setns(&file, CloneFlags::CLONE_NEWNET).map_err(io::Error::from);
            let ok = entered.is_ok();
            let _ = ready_tx.send(entered);
            if ok {
                while let Ok(job) = rx.recv() {
                    job();
                }
            }
        })?;
        ready_rx.recv().map_err(|_| io::Error::other("the namespace thread died"))??;
        Ok(Netns { name: ns.to_owned(), jobs: std::sync::Mutex::new(tx) })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Runs `f` in the namespace.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .lock()
            .expect("lock")
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other(format!("namespace {} is gone", self.name)))?;
        rx.await.map_err(|_| io::Error::other(format!("namespace {} is gone", self.name)))?
    }

    /// A TCP listener on `address` in the namespace.
    pub async fn listen(&self, address: std::net::SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let listener = self
            .run(move || {
                let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                socket.set_reuse_address(true)?;
                socket.set_nonblocking(true)?;
                socket.bind(&address.into())?;
                socket.listen(1024)?;
                Ok(std::net::TcpListener::from(socket))
            })
            .await?;
        tokio::net::TcpListener::from_std(listener)
    }

    /// A TCP connection to `address`, opened from the namespace.
    pub async fn connect(&self, address: std::net::SocketAddr) -> io::Result<tokio::net::TcpStream> {
        let socket = self
            .run(|| {
                let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
                socket.set_nonblocking(true)?;
                socket.set_tcp_nodelay(true)?;
                Ok(std::net::TcpStream::from(socket))
            })
            .await?;
        tokio::net::TcpSocket::from_std_stream(socket).connect(address).await
    }
}

/// Routes everything namespace `ns` has no other route for to its interface `ifname`.
pub async fn default_route(ns: &str, ifname: &str) -> io::Result<()> {
    let out = tokio::process::Command::new("ip")
        .args(["-n", ns, "route", "replace", "default", "dev", ifname])
        .output()
        .await?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "default route in {ns}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Creates the overlay's tun interface `ifname` inside namespace `ns` with `address/prefix_len`
/// (which also routes the subnet to it).
pub fn open_tun(ns: &str, ifname: &str, address: Ipv4Addr, prefix_len: u8) -> io::Result<tun::io::Device> {
    in_namespace(ns, || tun::io::Device::create(ifname, address, prefix_len))
}

/// Binds the workload's DNS server sockets (UDP and TCP on 127.0.0.11:53) inside `ns`, and
/// points the namespace's resolver at them (`/etc/netns/<ns>/resolv.conf`, which `ip netns exec`
/// puts in place for the commands meshd starts).
pub fn bind_dns(ns: &str) -> io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    let (udp, tcp) = in_namespace(ns, || {
        let udp = std::net::UdpSocket::bind(crate::dns::DNS_ADDRESS)?;
        let tcp = std::net::TcpListener::bind(crate::dns::DNS_ADDRESS)?;
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        Ok((udp, tcp))
    })?;
    let dir = std::path::Path::new("/etc/netns").join(ns);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("resolv.conf"), "nameserver 127.0.0.11\noptions ndots:0\n")?;
    Ok((udp, tcp))
}

/// Runs the command of `plan` confined in its namespace (see [`sandbox`]), restarting it when it
/// exits, until dropped.
/// Its state goes to `report`: running once it has lived a second, restarting when it exits.
pub fn supervise(plan: Plan, report: Endpoint) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let ns = plan.namespace.clone();
        let mut restarts = 0u32;
        loop {
            match sandbox::spawn(&plan) {
                Ok(mut child) => {
                    info!(namespace = %ns, command = %plan.command, uid = plan.uid, "workload started");
                    report.set(RunState::Starting, None, restarts > 0);
                    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
                    let output = async {
                        let out = async {
                            if let Some(pipe) = stdout {
                                report.keep_output(pipe, "stdout").await;
                            }
                        };
                        let err = async {
                            if let Some(pipe) = stderr {
                                report.keep_output(pipe, "stderr").await;
                            }
                        };
                        tokio::join!(out, err);
                    };
                    let exited = async {
                        tokio::select! {
                            status = child.wait() => status,
                            _ = tokio::time::sleep(RUNNING_AFTER) => {
                                report.set(RunState::Running, None, false);
                                child.wait().await
                            }
                        }
                    };
                    let ((), status) = tokio::join!(output, exited);
                    warn!(namespace = %ns, ?status, "workload exited; restarting");
                    report.set(RunState::Restarting, Some(endpoints::exit_text(&status)), false);
                }
                Err(e) => {
                    warn!(namespace = %ns, error = %e, "cannot start workload");
                    report.set(RunState::Failed, Some(format!("cannot start: {e}")), false);
                }
            }
            restarts += 1;
            tokio::time::sleep(Duration::from_millis(200 * u64::from(restarts.min(10)))).await;
        }
    }))
}
