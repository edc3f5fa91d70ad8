//! A lab of network namespaces for end-to-end tests, as root: hosts joined by veth pairs to a
//! bridge in a namespace of its own, the real `mesh-control` in the first host and the real
//! `meshd` in the others. Names carry a per-lab prefix; everything is removed on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Fails the test (never skips it) when not root.
pub fn require_root() {
    let uid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_owned())
        })
        .unwrap_or_default();
    assert_eq!(
        uid, "0",
        "this test builds network namespaces and tun devices: it needs root (run the tests as root, e.g. sudo ./scripts/test.sh)"
    );
}

/// The directory with the workspace's binaries (built by `cargo build` before the tests).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe.ancestors().nth(2).expect("target dir").to_owned();
    for b in ["mesh-control", "meshd", "meshctl"] {
        assert!(
            dir.join(b).exists(),
            "{} is missing: build the binaries first (cargo build --workspace)",
            dir.join(b).display()
        );
    }
    dir
}

/// Runs `f` on a thread inside network namespace `ns` (sockets it opens live there).
pub fn in_namespace<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = format!("/var/run/netns/{ns}");
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
                f()
            })
            .join()
            .expect("the thread in the namespace panicked")
    })
}

/// The lab's helper scripts.
pub fn script(name: &str) -> String {
    format!("{}/lab/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A running lab.
pub struct Lab {
    pub prefix: String,
    pub hosts: usize,
    pub work: tempfile::TempDir,
    bin: PathBuf,
    /// Host number -> its mesh-control (hosts 1..=managers).
    managers: Vec<(usize, Child)>,
    manager_args: Vec<String>,
    /// Host number -> its meshd (hosts after the managers').
    meshd: Vec<(usize, Child)>,
    /// The host meshctl runs in.
    pub admin_host: usize,
    /// The cluster CA's key (PEM), read from the first manager's store before it served, for
    /// tests that forge certificates.
    pub ca_key: String,
}

impl Lab {
    /// Underlay address of host `i` (1-based).
    pub fn addr(&self, i: usize) -> String {
        format!("10.99.0.{}", 10 + i)
    }

    pub fn host(&self, i: usize) -> String {
        format!("{}-h{i}", self.prefix)
    }

    pub fn bridge(&self) -> String {
        format!("{}-br", self.prefix)
    }

    /// Starts a lab of `hosts` hosts: control in host 1, meshd joined and running in the others.
    pub fn start(hosts: usize) -> Lab {
        Lab::start_with(hosts, 1, &[])
    }

    /// Starts a lab of `hosts` hosts: `managers` managers in hosts 1..=managers (the first makes
    /// the cluster, the others join it), each run with `manager_args`; meshd in the other hosts.
    pub fn start_with(hosts: usize, managers: usize, manager_args: &[&str]) -> Lab {
        require_root();
        let bin = bin_dir();
        let prefix = format!("t{}{}", std::process::id() % 100000, rand_suffix());
        let mut lab = Lab {
            prefix,
            hosts,
            work: tempfile::tempdir().expect("temp dir"),
            bin,
            managers: vec![],
            manager_args: manager_args.iter().map(|a| a.to_string()).collect(),
            meshd: vec![],
            ca_key: String::new(),
            admin_host: 1,
        };
        let br = lab.bridge();
        ok(Command::new("ip").args(["netns", "add", &br]));
        ok(Command::new("ip").args(["-n", &br, "link", "add", "br0", "type", "bridge"]));
        ok(Command::new("ip").args(["-n", &br, "link", "set", "br0", "up"]));
        for i in 1..=hosts {
            let h = lab.host(i);
            ok(Command::new("ip").args(["netns", "add", &h]));
            ok(Command::new("ip").args([
                "link",
                "add",
                "eth0",
                "netns",
                &h,
                "type",
                "veth",
                "peer",
                "name",
                &format!("v{i}"),
                "netns",
                &br,
            ]));
            ok(Command::new("ip").args(["-n", &br, "link", "set", &format!("v{i}"), "master", "br0", "up"]));
            ok(Command::new("ip").args([
                "-n",
                &h,
                "addr",
                "add",
                &format!("{}/24", lab.addr(i)),
                "dev",
                "eth0",
            ]));
            ok(Command::new("ip").args(["-n", &h, "link", "set", "eth0", "up"]));
            ok(Command::new("ip").args(["-n", &h, "link", "set", "lo", "up"]));
        }
        let control = format!("{}:7400", lab.addr(1));
        let state = lab.work.path().join("control");
        ok(lab
            .in_host(1, &lab.bin.join("mesh-control"))
            .args(["init", "--state-dir"])
            .arg(&state)
            .args(["--listen", &control]));
        let read = control::statedir::read_state(&state, None);
        let offline = tokio::runtime::Runtime::new().expect("runtime").block_on(read).expect("the state");
        lab.ca_key = offline.ca.expect("the CA in the state").key_pem.0;
        lab.start_manager(1);
        lab.wait("control to answer", || lab.meshctl_status(&["node", "ls"]).status.success());
        let manager_token = lab.meshctl(&["join-token", "manager", "-q"]).trim().to_owned();
        for i in 2..=managers {
            let dir = lab.manager_dir(i);
            let listen = format!("{}:7400", lab.addr(i));
            lab.spawn_manager(
                i,
                &["join", "--control", &control, "--token", &manager_token, "--listen", &listen],
                &dir,
            );
        }
        lab.wait("every manager to be in the raft group", || {
            let out = lab.meshctl_status(&["node", "ls", "--format", "json"]);
            let text = String::from_utf8_lossy(&out.stdout);
            text.matches("\"manager_status\": \"leader\"").count() == 1
                && text.matches("\"manager_status\": \"reachable\"").count() == managers - 1
        });
        let token = lab.meshctl(&["join-token", "worker", "-q"]).trim().to_owned();
        for i in managers + 1..=hosts {
            let dir = lab.node_dir(i);
            ok(lab
                .in_host(i, &lab.bin.join("meshd"))
                .args(["join", "--control", &control, "--token", &token, "--state-dir"])
                .arg(&dir)
                .args(["--hostname", &lab.host(i)]));
            lab.start_meshd(i);
        }
        lab.wait("every meshd to hold a session", || {
            lab.meshctl(&["node", "ls", "--format", "json"]).matches("\"connected\": true").count()
                == hosts - managers
        });
        lab
    }

    /// The metrics served on host `i`'s loopback at `port` (meshd's 9480, a manager's 9481).
    pub fn metrics(&self, i: usize, port: u16) -> String {
        let url = format!("http://127.0.0.1:{port}/metrics");
        let out = self.exec(&self.host(i), &["curl", "-sS", "-m", "3", &url]).output().expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The cluster's ID, as its CA certificate names it.
    pub fn cluster_id(&self) -> String {
        let ca = control::statedir::ManagerDir::new(&self.manager_dir(1)).ca_cert();
        let pem = std::fs::read_to_string(&ca).unwrap_or_else(|e| panic!("{}: {e}", ca.display()));
        mesh_api::pki::CertInfo::from_pem(&pem).expect("the CA certificate").organization
    }

    /// The state directory of manager `i`.
    pub fn manager_dir(&self, i: usize) -> PathBuf {
        match i {
            1 => self.work.path().join("control"),
            i => self.work.path().join(format!("control-{i}")),
        }
    }

    fn spawn_manager(&mut self, i: usize, args: &[&str], dir: &Path) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.path().join(format!("control-{i}.log")))
            .expect("log");
        let child = self
            .in_host(i, &self.bin.join("mesh-control"))
            .args(args)
            .arg("--state-dir")
            .arg(dir)
            .args(&self.manager_args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("mesh-control");
        self.managers.push((i, child));
    }

    /// (Re)starts manager `i` on its state directory.
    pub fn start_manager(&mut self, i: usize) {
        let dir = self.manager_dir(i);
        self.spawn_manager(i, &["run"], &dir);
    }

    /// Stops manager `i`: SIGKILL with `kill`, else SIGTERM.
    pub fn stop_manager(&mut self, i: usize, kill: bool) {
        for (_, child) in self.managers.iter_mut().filter(|(h, _)| *h == i) {
            let signal = if kill { "-KILL" } else { "-TERM" };
            let _ = Command::new("kill").args([signal, &child.id().to_string()]).status();
            let _ = child.wait();
        }
        self.managers.retain(|(h, _)| *h != i);
    }

    /// The host whose manager leads, as `meshctl node ls` tells (from any manager).
    pub fn leader(&self) -> Option<usize> {
        let out = self.meshctl_status(&["node", "ls", "--format", "json"]);
        let nodes: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let control = nodes.as_array()?.iter().find(|n| n["manager_status"] == "leader")?["control"]
            .as_str()?
            .to_owned();
        (1..=self.hosts).find(|i| control == format!("{}:7400", self.addr(*i)))
    }

    /// (Re)starts host `i`'s meshd.
    pub fn start_meshd(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.work.path().join(format!("meshd-{i}.log")))
            .expect("log");
        // Only the host's network namespace: workload namespaces it makes stay visible.
        let child = Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{}", self.host(i)))
            .arg(self.bin.join("meshd"))
            .args(["run", "--state-dir"])
            .arg(self.node_dir(i))
            .args(["--underlay", &self.addr(i), "--netns-prefix", &self.host(i)])
            .env("RUST_LOG", "info,openraft=warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("meshd");
        self.meshd.push((i, child));
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.work.path().join(format!("h{i}"))
    }

    fn in_host(&self, i: usize, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(i)]).arg(program);
        c
    }

    /// Runs meshctl in the admin host, whatever its outcome.
    pub fn meshctl_output(&self, args: &[&str]) -> Output {
        self.meshctl_status(args)
    }

    fn meshctl_status(&self, args: &[&str]) -> Output {
        run(self
            .in_host(self.admin_host, &self.bin.join("meshctl"))
            .env("MESHCTL_ADMIN", self.work.path().join("control/admin"))
            .args(args))
    }

    /// Applies the policy `text` (each call a file of its own in the lab's directory).
    pub fn apply_policy(&self, text: &str) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = self.work.path().join(format!("policy-{n}.toml"));
        std::fs::write(&file, text).expect("writing a policy file");
        self.meshctl(&["policy", "apply", file.to_str().expect("a UTF-8 path")]);
    }

    /// Runs meshctl in the control host; panics with its output on failure.
    pub fn meshctl(&self, args: &[&str]) -> String {
        let out = self.meshctl_status(args);
        assert!(out.status.success(), "meshctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The node ID of host `i`.
    pub fn node_id(&self, i: usize) -> String {
        let cert = self.node_dir(i).join("node.crt");
        let pem = std::fs::read_to_string(cert).expect("node certificate");
        mesh_api::pki::CertInfo::from_pem(&pem).expect("certificate").common_name
    }

    /// meshd status of host `i`, as JSON.
    pub fn status(&self, i: usize) -> serde_json::Value {
        let out = ok(self
            .in_host(i, &self.bin.join("meshd"))
            .args(["status", "--json", "--state-dir"])
            .arg(self.node_dir(i)));
        serde_json::from_str(&out).expect("status JSON")
    }

    /// A drop counter of host `i`'s data plane.
    pub fn drops(&self, i: usize, reason: &str) -> u64 {
        self.status(i)["drops"]
            .as_array()
            .expect("drops")
            .iter()
            .filter_map(|d| {
                d.as_str()?.strip_prefix(&format!("{reason}=")).and_then(|n| n.parse::<u64>().ok())
            })
            .sum()
    }

    pub fn received(&self, i: usize) -> u64 {
        self.status(i)["packets_received"].as_u64().unwrap_or(0)
    }

    /// A command in namespace `ns` (a host or a workload).
    pub fn exec(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(args);
        c
    }

    /// The namespace of `service`'s endpoint `slot` on host `i`.
    pub fn workload(&self, i: usize, service: &str, slot: u32) -> String {
        format!("{}-{service}-{slot}", self.host(i))
    }

    /// Waits up to 20 s for `check`.
    pub fn wait(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !check() {
            if Instant::now() > deadline {
                let logs: String = std::fs::read_dir(self.work.path())
                    .into_iter()
                    .flatten()
                    .flatten()
                    .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
                    .map(|e| {
                        format!(
                            "--- {}\n{}",
                            e.path().display(),
                            std::fs::read_to_string(e.path()).unwrap_or_default()
                        )
                    })
                    .collect();
                panic!("timed out waiting for {what}\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The process ID of host `i`'s meshd.
    pub fn meshd_pid(&self, i: usize) -> u32 {
        self.meshd.iter().find(|(h, _)| *h == i).map(|(_, c)| c.id()).expect("a running meshd")
    }

    /// Stops host `i`'s meshd (SIGTERM; it removes its workloads).
    pub fn stop_meshd(&mut self, i: usize) {
        for (_, child) in self.meshd.iter_mut().filter(|(h, _)| *h == i) {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
        self.meshd.retain(|(h, _)| *h != i);
    }
}

fn rand_suffix() -> String {
    let n: u32 = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{:x}", n % 0xfff)
}

impl Drop for Lab {
    fn drop(&mut self) {
        for (_, child) in &mut self.meshd {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
        }
        for (_, child) in &mut self.meshd {
            let _ = child.wait();
        }
        for (_, child) in &mut self.managers {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A failing test shows what each meshd said last.
        if std::thread::panicking() {
            for (i, _) in &self.managers {
                let log = std::fs::read_to_string(self.work.path().join(format!("control-{i}.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("--- mesh-control {i}, last lines ---");
                for l in &lines[lines.len().saturating_sub(100)..] {
                    eprintln!("{l}");
                }
            }
            for (i, _) in &self.meshd {
                let log = std::fs::read_to_string(self.work.path().join(format!("meshd-{i}.log")))
                    .unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!("--- meshd {i}, last lines ---");
                for l in &lines[lines.len().saturating_sub(400)..] {
                    eprintln!("{l}");
                }
            }
        }
        let names: Vec<String> = std::fs::read_dir("/var/run/netns")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("{}-", self.prefix)))
            .collect();
        for n in names {
            let _ =
                Command::new("sh").arg("-c").arg(format!("ip netns pids {n} | xargs -r kill -9")).status();
            let _ = Command::new("ip").args(["netns", "del", &n]).status();
        }
    }
}
