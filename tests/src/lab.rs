//! The lab for end-to-end tests, as root: [`meshctl::lab`]'s topology (hosts joined by veth pairs
//! to a bridge in a namespace of its own, the real `mesh-control` in the first host(s) and the
//! real `meshd` in the others) behind helpers that panic with the lab's logs instead of
//! returning errors. Names carry a per-lab prefix; everything is removed on drop.

use std::ops::Deref;
use std::path::PathBuf;
use std::process::Output;
use std::time::Duration;

pub use meshctl::lab::Program;
use meshctl::lab::{MeshdOn, Topology};

/// The underlay of the tests' labs (each lab's lives in its own namespaces).
const SUBNET: &str = "10.99.0.0/24";
/// How long [`Lab::wait`] waits.
const WAIT: Duration = Duration::from_secs(20);

/// Fails the test (never skips it) when not root.
pub fn require_root() {
    assert!(
        meshctl::lab::require_root().is_ok(),
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

/// `--readable` for a service whose command runs this build's binaries or the lab's scripts:
/// wherever the checkout is (under /tmp, say), the workload's own /tmp would cover them.
pub fn readable() -> [String; 4] {
    let scripts = format!("{}/lab", env!("CARGO_MANIFEST_DIR"));
    ["--readable".into(), bin_dir().display().to_string(), "--readable".into(), scripts]
}

/// A workload command serving `$V` (its environment) at `/` on port 80, from its own /tmp.
pub const SERVE_V: &str = r#"printf %s "$V" > /tmp/index.html && cd /tmp && exec python3 -m http.server 80"#;

/// A policy letting `web` GET from `api` on port 80; everything else is denied.
pub const WEB_READS_API: &str = r#"
default = "deny"

[[rule]]
name = "web-reads-api"
action = "allow"
from = ["web"]
to = ["api"]
ports = [80]
methods = ["GET"]
"#;

/// The lab's helper scripts.
pub fn script(name: &str) -> String {
    format!("{}/lab/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// A running lab; [`meshctl::lab::Lab`]'s own methods (names, addresses, paths, `exec`) through
/// `Deref`.
pub struct Lab {
    /// Dropped first: the lab's processes and namespaces go before the directory.
    lab: meshctl::lab::Lab,
    /// A scratch directory for the test (the lab's own files are in `work/lab`).
    pub work: tempfile::TempDir,
    /// The cluster CA's key (PEM), read from the first manager's store before it served, for
    /// tests that forge certificates.
    pub ca_key: String,
}

impl Deref for Lab {
    type Target = meshctl::lab::Lab;

    fn deref(&self) -> &meshctl::lab::Lab {
        &self.lab
    }
}

/// A process in a namespace, talked to line by line: its stdin and its stdout, piped.
pub struct Talker {
    pub child: std::process::Child,
    said: std::io::BufReader<std::process::ChildStdout>,
}

/// Starts `cmd` with its stdin and stdout piped.
pub fn talk(mut cmd: std::process::Command) -> Talker {
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawned");
    let said = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    Talker { child, said }
}

impl Talker {
    /// Its next line, trimmed.
    pub fn line(&mut self) -> String {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut self.said, &mut line).expect("a line");
        line.trim().to_owned()
    }

    /// Writes `line` (and a newline) to it.
    pub fn say(&mut self, line: &str) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        std::io::Write::write_all(stdin, format!("{line}\n").as_bytes()).expect("written");
    }
}

impl Lab {
    /// Starts `args` in namespace `ns` with its stdin and stdout piped.
    pub fn talk(&self, ns: &str, args: &[&str]) -> Talker {
        talk(self.exec(ns, args))
    }
    /// Starts a lab of `hosts` hosts: control in host 1, meshd joined and running in the others.
    pub fn start(hosts: usize) -> Lab {
        Lab::start_with(hosts, 1, &[])
    }

    /// Starts a lab of `hosts` hosts: `managers` managers in hosts 1..=managers (the first makes
    /// the cluster, the others join it), each run with `manager_args`; meshd in the other hosts.
    pub fn start_with(hosts: usize, managers: usize, manager_args: &[&str]) -> Lab {
        Lab::start_joining(hosts, managers, manager_args, &[])
    }

    /// As [`Lab::start_with`], each meshd joined with `join_args` too.
    pub fn start_joining(hosts: usize, managers: usize, manager_args: &[&str], join_args: &[&str]) -> Lab {
        Lab::start_prepared(hosts, managers, manager_args, join_args, |_| Vec::new())
    }

    /// As [`Lab::start_joining`], `prepare` run once the hosts are up and before `mesh-control
    /// init`, which it gives arguments to (an external CA it started in a host, say).
    pub fn start_prepared(
        hosts: usize,
        managers: usize,
        manager_args: &[&str],
        join_args: &[&str],
        prepare: impl FnOnce(&meshctl::lab::Lab) -> Vec<String>,
    ) -> Lab {
        Lab::start_configured(hosts, managers, manager_args, join_args, &[], prepare)
    }

    /// As [`Lab::start_prepared`], every `meshd run` given `meshd_args` too.
    pub fn start_configured(
        hosts: usize,
        managers: usize,
        manager_args: &[&str],
        join_args: &[&str],
        meshd_args: &[&str],
        prepare: impl FnOnce(&meshctl::lab::Lab) -> Vec<String>,
    ) -> Lab {
        require_root();
        let work = tempfile::tempdir().expect("temp dir");
        let prefix = meshctl::lab::unique_prefix("t");
        let mut topology = Topology::new(&prefix, hosts, work.path().join("lab"), bin_dir());
        topology.subnet = SUBNET.parse().expect("the tests' subnet");
        topology.managers = managers;
        topology.meshd = MeshdOn::Workers;
        topology.manager_args = manager_args.iter().map(|a| a.to_string()).collect();
        topology.join_args = join_args.iter().map(|a| a.to_string()).collect();
        topology.meshd_args = meshd_args.iter().map(|a| a.to_string()).collect();
        let mut lab = meshctl::lab::Lab::create(topology).unwrap_or_else(|e| panic!("building the lab: {e}"));
        let built = |lab: &meshctl::lab::Lab, step: &str, r: Result<(), meshctl::lab::LabError>| {
            if let Err(e) = r {
                panic!("{step}: {e}\n{}", lab.logs());
            }
        };
        let init_args = prepare(&lab);
        let init = lab.init_cluster_with(&init_args).map(drop);
        built(&lab, "mesh-control init", init);
        let state = lab.manager_dir(1);
        let read = control::statedir::read_state(&state, None);
        let offline = tokio::runtime::Runtime::new().expect("runtime").block_on(read).expect("the state");
        // Empty for an external CA: no manager holds its key.
        let ca_key = offline.ca.expect("the CA in the state").key_pem.0;
        let managers = lab.start_managers();
        built(&lab, "starting the managers", managers);
        let nodes = lab.join_nodes();
        built(&lab, "joining meshd", nodes);
        Lab { lab, work, ca_key }
    }

    /// On a new network `front` of `subnet`: `web` on host `web_host`, `api` serving `served`
    /// over HTTP on port 80 on host `api_host`, and [`WEB_READS_API`] in force. Returns web's
    /// workload namespace.
    pub fn web_and_api(&self, subnet: &str, web_host: usize, api_host: usize) -> String {
        self.meshctl(&["network", "create", "front", "--subnet", subnet]);
        let on = |i: usize| format!("node.id=={}", self.node_id(i));
        self.meshctl(&["service", "create", "web", "--network", "front", "--constraint", &on(web_host)]);
        self.meshctl(&[
            "service",
            "create",
            "api",
            "--network",
            "front",
            "--port",
            "80/http",
            "--command",
            SERVE_V,
            "--env",
            "V=served",
            "--constraint",
            &on(api_host),
        ]);
        self.apply_policy(WEB_READS_API);
        self.workload(web_host, "web", 1)
    }

    /// Whether the workload `web` reads `served` from `http://api/` through the mesh.
    pub fn web_reads_api(&self, web: &str) -> bool {
        self.exec(web, &["curl", "-sS", "-f", "-m", "3", "http://api/"])
            .output()
            .is_ok_and(|o| o.status.success() && o.stdout == b"served")
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

    /// (Re)starts manager `i` on its state directory.
    pub fn start_manager(&mut self, i: usize) {
        self.lab.start_manager(i).unwrap_or_else(|e| panic!("starting manager {i}: {e}"));
    }

    /// Stops manager `i`: SIGKILL with `kill`, else SIGTERM.
    pub fn stop_manager(&mut self, i: usize, kill: bool) {
        let stopped = if kill { self.lab.kill_manager(i) } else { self.lab.stop_manager(i) };
        stopped.unwrap_or_else(|e| panic!("stopping manager {i}: {e}"));
    }

    /// The host whose manager leads, as `meshctl node ls` tells (from any manager).
    pub fn leader(&self) -> Option<usize> {
        self.lab.leader().ok().flatten()
    }

    /// Runs meshctl in host `i` from now on.
    pub fn set_admin_host(&mut self, i: usize) {
        self.lab.set_admin_host(i);
    }

    /// (Re)starts host `i`'s meshd.
    pub fn start_meshd(&mut self, i: usize) {
        self.lab.start_meshd(i).unwrap_or_else(|e| panic!("starting meshd {i}: {e}"));
    }

    /// Runs meshctl in the admin host, whatever its outcome.
    pub fn meshctl_output(&self, args: &[&str]) -> Output {
        self.lab.meshctl_output(args).unwrap_or_else(|e| panic!("meshctl {args:?}: {e}"))
    }

    /// Applies the policy `text` (each call a file of its own in the lab's directory).
    pub fn apply_policy(&self, text: &str) {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let file = self.work.path().join(format!("policy-{n}.toml"));
        std::fs::write(&file, text).expect("writing a policy file");
        self.meshctl(&["policy", "apply", file.to_str().expect("a UTF-8 path")]);
    }

    /// Runs meshctl in the admin host; panics with its output on failure.
    pub fn meshctl(&self, args: &[&str]) -> String {
        let out = self.meshctl_output(args);
        assert!(out.status.success(), "meshctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The node ID of host `i`.
    pub fn node_id(&self, i: usize) -> String {
        self.lab.node_id(i).unwrap_or_else(|e| panic!("the node ID of host {i}: {e}"))
    }

    /// meshd status of host `i`, as JSON.
    pub fn status(&self, i: usize) -> serde_json::Value {
        self.lab.meshd_status(i).unwrap_or_else(|e| panic!("{e}"))
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

    /// Waits up to 20 s for `check`; panics naming `what`, with every log of the lab, if it never
    /// holds.
    pub fn wait(&self, what: &str, check: impl FnMut() -> bool) {
        if !meshctl::lab::wait(WAIT, check) {
            panic!("timed out waiting for {what}\n{}", self.logs());
        }
    }

    /// The process ID of host `i`'s meshd.
    pub fn meshd_pid(&self, i: usize) -> u32 {
        self.pid(Program::Meshd, i).expect("a running meshd")
    }

    /// Stops host `i`'s meshd (SIGTERM; it removes its workloads).
    pub fn stop_meshd(&mut self, i: usize) {
        self.lab.stop_meshd(i).unwrap_or_else(|e| panic!("stopping meshd {i}: {e}"));
    }

    /// The last `lines` lines of `program`'s log on host `i`.
    fn tail(&self, program: Program, i: usize, lines: usize) -> String {
        let log = std::fs::read_to_string(self.log(program, i)).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

impl Drop for Lab {
    /// A failing test shows what each manager and meshd said last; the lab itself goes with
    /// [`meshctl::lab::Lab`]'s drop.
    fn drop(&mut self) {
        if std::thread::panicking() {
            for p in self.processes() {
                let lines = if p.program == Program::Manager { 100 } else { 400 };
                eprintln!("--- {} {}, last lines ---", p.program, p.host);
                eprintln!("{}", self.tail(p.program, p.host, lines));
            }
        }
    }
}
