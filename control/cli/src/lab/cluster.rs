//! A running lab: builds a [`Topology`]'s hosts, makes the cluster in them (managers, then meshd
//! joined), runs and stops its processes, and removes everything it made.
//!
//! Building goes in steps, each usable alone ([`Lab::create`] the hosts, [`Lab::init_cluster`],
//! [`Lab::start_managers`], [`Lab::join_node`] / [`Lab::join_nodes`]) or all at once
//! ([`Lab::up`]), so that a caller can look in between (the tests read the CA key before the
//! first manager serves; `meshctl lab up` reports each step). Every process and node is written
//! to the record as soon as it exists, so a lab that failed halfway is still removed whole.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::Duration;

use nix::sys::signal::Signal;

use super::LabError;
use super::process::{self, ip, namespaces, remove_namespace, run, signal, spawn};
use super::record::{Process, Program, Record};
use super::topology::{Topology, record_path};

/// How long a manager may take to answer after it starts.
const MANAGER_UP: Duration = Duration::from_secs(20);
/// How long the managers may take to form the raft group.
const MANAGERS_JOINED: Duration = Duration::from_secs(30);
/// How long every meshd may take to hold its session.
const SESSIONS_UP: Duration = Duration::from_secs(30);
/// How long a stopped process may take to exit before it is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);

/// A lab of network namespaces running the real binaries. See the [module docs](super).
pub struct Lab {
    record: Record,
    /// The processes this value started, to be reaped when they stop.
    children: Vec<(Process, Child)>,
    /// The host meshctl runs in as the admin.
    admin_host: usize,
    /// Everything was removed already.
    removed: bool,
}

/// What tearing a lab down removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    pub processes: usize,
    pub namespaces: usize,
}

impl Lab {
    /// Builds `topology`'s hosts and bridge, nothing running yet. Refused when its directory holds
    /// a lab already or namespaces with its prefix exist.
    pub fn create(topology: Topology) -> Result<Lab, LabError> {
        check(&topology)?;
        let dir = &topology.dir;
        std::fs::create_dir_all(dir).map_err(|source| LabError::Io { path: dir.clone(), source })?;
        let mut lab = Lab {
            record: Record { topology, processes: Vec::new(), node_ids: Default::default() },
            children: Vec::new(),
            admin_host: 1,
            removed: false,
        };
        lab.record.save()?;
        lab.build_hosts()?;
        Ok(lab)
    }

    /// Builds `topology` whole: hosts, managers, meshd joined, every session up.
    pub fn up(topology: Topology) -> Result<Lab, LabError> {
        let mut lab = Lab::create(topology)?;
        lab.init_cluster()?;
        lab.start_managers()?;
        lab.join_nodes()?;
        Ok(lab)
    }

    /// The persistent lab recorded in `dir`.
    pub fn open(dir: &Path) -> Result<Lab, LabError> {
        let mut record = Record::load(dir)?;
        record.topology.persistent = true;
        Ok(Lab { record, children: Vec::new(), admin_host: 1, removed: false })
    }

    fn build_hosts(&mut self) -> Result<(), LabError> {
        let t = self.topology().clone();
        let br = t.bridge();
        ip(&["netns", "add", &br])?;
        ip(&["-n", &br, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &br, "link", "set", "br0", "up"])?;
        let len = t.subnet.prefix_len();
        for i in 1..=t.hosts {
            let (h, veth) = (t.host(i), format!("v{i}"));
            ip(&["netns", "add", &h])?;
            // Made in both namespaces at once: neither end ever shows in the machine's own.
            ip(&["link", "add", "eth0", "netns", &h, "type", "veth", "peer", "name", &veth, "netns", &br])?;
            ip(&["-n", &br, "link", "set", &veth, "master", "br0", "up"])?;
            ip(&["-n", &h, "addr", "add", &format!("{}/{len}", t.addr(i)), "dev", "eth0"])?;
            ip(&["-n", &h, "link", "set", "eth0", "up"])?;
            ip(&["-n", &h, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    /// A namespace outside the cluster, on the underlay bridge: a client of published ports, or
    /// a server on the internet. Named `PREFIX-NAME`, at the `index`-th address from the top of
    /// the underlay subnet; removed with the lab. Returns its name and address.
    pub fn add_outside(&self, name: &str, index: u32) -> Result<(String, std::net::Ipv4Addr), LabError> {
        let address = std::net::Ipv4Addr::from(u32::from(self.topology().subnet.broadcast()) - 1 - index);
        let ns = self.add_outside_at(name, index, address)?;
        Ok((ns, address))
    }

    /// [`Self::add_outside`] at `address`, which must be one of the underlay subnet's that no
    /// host holds; `index` names its link on the bridge (one per outside namespace). Returns its
    /// name.
    pub fn add_outside_at(
        &self,
        name: &str,
        index: u32,
        address: std::net::Ipv4Addr,
    ) -> Result<String, LabError> {
        let t = self.topology();
        let (ns, br, veth) = (format!("{}-{name}", t.prefix), t.bridge(), format!("o{index}"));
        let subnet = t.subnet;
        if !subnet.contains(&address) || address == subnet.network() || address == subnet.broadcast() {
            return Err(LabError::Topology(format!(
                "outside `{name}`: {address} is not a host address of the lab's underlay {subnet}"
            )));
        }
        if let Some(i) = (1..=t.hosts).find(|i| t.addr(*i) == address) {
            return Err(LabError::Topology(format!(
                "outside `{name}`: {address} is {}'s address",
                t.host(i)
            )));
        }
        ip(&["netns", "add", &ns])?;
        ip(&["link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &veth, "netns", &br])?;
        ip(&["-n", &br, "link", "set", &veth, "master", "br0", "up"])?;
        ip(&["-n", &ns, "addr", "add", &format!("{address}/{}", t.subnet.prefix_len()), "dev", "eth0"])?;
        ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Starts `sh -c COMMAND` in outside namespace `ns` (made by [`Self::add_outside`]), logging
    /// to `outside-NAME.log` in the lab's directory; it goes with the namespace.
    pub fn start_outside(&self, ns: &str, command: &str) -> Result<(), LabError> {
        let t = self.topology();
        let log = t.dir.join(format!("outside-{}.log", ns.trim_start_matches(&format!("{}-", t.prefix))));
        let args = ["-c".to_owned(), command.to_owned()];
        let child = spawn(ns, Path::new("/bin/sh"), &args, &log, t.persistent)?;
        // Not a recorded process: removing the namespace kills it.
        drop(child);
        Ok(())
    }

    /// `mesh-control init` on host 1 (the cluster, its CA, tokens and admin bundle); what it
    /// printed.
    pub fn init_cluster(&mut self) -> Result<String, LabError> {
        self.init_cluster_with(&[])
    }

    /// [`Self::init_cluster`], `mesh-control init` given `extra` too (e.g. `--external-ca`).
    pub fn init_cluster_with(&mut self, extra: &[String]) -> Result<String, LabError> {
        let t = self.topology();
        let dir = t.manager_dir(1).to_string_lossy().into_owned();
        let admin = t.admin_dir().to_string_lossy().into_owned();
        let (control, host) = (t.control(1), t.host(1));
        run(self
            .in_host(1, "mesh-control")
            .args([
                "init",
                "--admin-dir",
                &admin,
                "--state-dir",
                &dir,
                "--listen",
                &control,
                "--hostname",
                &host,
            ])
            .args(extra))
    }

    /// Serves the cluster from host 1's manager and joins the others (h2..hM) to it with the
    /// manager token; returns once every manager is in the raft group.
    pub fn start_managers(&mut self) -> Result<(), LabError> {
        self.start_manager(1)?;
        let t = self.topology().clone();
        let answers = process::wait(MANAGER_UP, || self.meshctl(&["node", "ls"]).is_ok());
        if !answers {
            return Err(self.timeout(format!("{} did not come up on {}", Program::Manager, t.host(1))));
        }
        if t.managers == 1 {
            return Ok(());
        }
        let token = self.meshctl(&["join-token", "manager", "-q"])?.trim().to_owned();
        // All at once, as an operator starting them together would: they wait their turn for
        // the raft group's one membership change at a time.
        for i in 2..=t.managers {
            let mut args: Vec<String> =
                ["join", "--control", &t.control(1), "--token", &token, "--listen"].map(str::to_owned).into();
            args.extend([t.control(i), "--hostname".into(), t.host(i)]);
            self.spawn_manager(i, args)?;
        }
        let joined = process::wait(MANAGERS_JOINED, || {
            self.managers().is_ok_and(|m| {
                m.iter().filter(|(_, s)| s == "leader").count() == 1
                    && m.iter().filter(|(_, s)| s == "reachable").count() == t.managers - 1
            })
        });
        if !joined {
            let status = self.managers().map(|m| format!("{m:?}")).unwrap_or_else(|e| e.to_string());
            return Err(self.timeout(format!("not every manager joined the raft group as a voter: {status}")));
        }
        Ok(())
    }

    /// The worker join token.
    pub fn worker_token(&self) -> Result<String, LabError> {
        Ok(self.meshctl(&["join-token", "worker", "-q"])?.trim().to_owned())
    }

    /// Joins host `i`'s meshd with `token` and starts it; its node ID.
    pub fn join_node(&mut self, i: usize, token: &str) -> Result<String, LabError> {
        let t = self.topology();
        let (control, dir, host) = (t.control(1), t.node_dir(i), t.host(i));
        let id = run(self
            .in_host(i, "meshd")
            .args(["join", "--control", &control, "--token", token, "--state-dir"])
            .arg(dir)
            .args(["--hostname", &host])
            .args(&self.topology().join_args))?
        .trim()
        .to_owned();
        self.record.node_ids.insert(i, id.clone());
        self.start_meshd(i)?;
        Ok(id)
    }

    /// Joins meshd on every host that runs it and waits for every session.
    pub fn join_nodes(&mut self) -> Result<(), LabError> {
        let token = self.worker_token()?;
        for i in self.topology().meshd_hosts() {
            self.join_node(i, &token)?;
        }
        self.wait_for_sessions()
    }

    /// Waits until every meshd of the lab holds a session with the leader.
    pub fn wait_for_sessions(&self) -> Result<(), LabError> {
        let all = self.topology().meshd_hosts().count();
        if process::wait(SESSIONS_UP, || self.sessions().is_ok_and(|n| n == all)) {
            Ok(())
        } else {
            Err(self.timeout("not every meshd connected".into()))
        }
    }

    fn timeout(&self, what: String) -> LabError {
        LabError::Timeout { what, dir: self.topology().dir.clone() }
    }

    pub fn topology(&self) -> &Topology {
        &self.record.topology
    }

    pub fn prefix(&self) -> &str {
        &self.topology().prefix
    }

    pub fn hosts(&self) -> usize {
        self.topology().hosts
    }

    /// Host `i`'s namespace.
    pub fn host(&self, i: usize) -> String {
        self.topology().host(i)
    }

    /// The bridge's namespace.
    pub fn bridge(&self) -> String {
        self.topology().bridge()
    }

    /// Host `i`'s underlay address.
    pub fn addr(&self, i: usize) -> String {
        self.topology().addr(i).to_string()
    }

    /// The lab's directory.
    pub fn dir(&self) -> &Path {
        &self.topology().dir
    }

    pub fn bin(&self) -> &Path {
        &self.topology().bin
    }

    pub fn manager_dir(&self, i: usize) -> PathBuf {
        self.topology().manager_dir(i)
    }

    pub fn node_dir(&self, i: usize) -> PathBuf {
        self.topology().node_dir(i)
    }

    /// The admin bundle meshctl uses (`MESHCTL_ADMIN`).
    pub fn admin_dir(&self) -> PathBuf {
        self.topology().admin_dir()
    }

    /// Where `program` on host `i` logs.
    pub fn log(&self, program: Program, i: usize) -> PathBuf {
        self.topology().log(program, i)
    }

    /// Every log of the lab, each under its path.
    pub fn logs(&self) -> String {
        let mut logs: Vec<PathBuf> = std::fs::read_dir(self.dir())
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        logs.iter()
            .map(|p| format!("--- {}\n{}", p.display(), std::fs::read_to_string(p).unwrap_or_default()))
            .collect()
    }

    /// The namespace of `service`'s endpoint `slot` on host `i`.
    pub fn workload(&self, i: usize, service: &str, slot: u32) -> String {
        self.topology().workload(i, service, slot)
    }

    /// The namespaces of the lab (hosts, bridge, workloads) that exist now.
    pub fn namespaces(&self) -> Vec<String> {
        namespaces(self.prefix())
    }

    /// The node ID of host `i`'s meshd (its certificate's common name).
    pub fn node_id(&self, i: usize) -> Result<String, LabError> {
        certificate_name(&self.node_dir(i).join("node.crt"))
    }

    /// The node ID of host `i`'s manager.
    pub fn manager_id(&self, i: usize) -> Result<String, LabError> {
        certificate_name(&self.manager_dir(i).join("manager.crt"))
    }

    /// `ip netns exec NS ARGS...`: a command in a host's or a workload's namespace.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(args);
        c
    }

    /// One of the lab's binaries (`meshctl`, `meshd`, ...) in host `i`.
    pub fn in_host(&self, i: usize, binary: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.host(i)]).arg(self.topology().binary(binary));
        c
    }

    /// The host meshctl runs in as the admin (h1 unless told otherwise).
    pub fn admin_host(&self) -> usize {
        self.admin_host
    }

    pub fn set_admin_host(&mut self, i: usize) {
        self.admin_host = i;
    }

    /// `meshctl ARGS` as the admin in host `i`, whatever its outcome.
    pub fn meshctl_in(&self, i: usize, args: &[&str]) -> Result<Output, LabError> {
        process::output(self.in_host(i, "meshctl").env("MESHCTL_ADMIN", self.admin_dir()).args(args))
    }

    /// `meshctl ARGS` as the admin, whatever its outcome.
    pub fn meshctl_output(&self, args: &[&str]) -> Result<Output, LabError> {
        self.meshctl_in(self.admin_host, args)
    }

    /// `meshctl ARGS` as the admin; its stdout, or an error with what it said.
    pub fn meshctl(&self, args: &[&str]) -> Result<String, LabError> {
        run(self.in_host(self.admin_host, "meshctl").env("MESHCTL_ADMIN", self.admin_dir()).args(args))
    }

    fn nodes(&self) -> Result<Vec<serde_json::Value>, LabError> {
        let text = self.meshctl(&["node", "ls", "--format", "json"])?;
        let nodes: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| LabError::Unreadable { what: "meshctl node ls".into(), detail: e.to_string() })?;
        Ok(nodes.as_array().cloned().unwrap_or_default())
    }

    /// Every manager: (host, status as `node ls` shows it: leader, reachable, unreachable, ...).
    pub fn managers(&self) -> Result<Vec<(usize, String)>, LabError> {
        Ok(self
            .nodes()?
            .iter()
            .filter_map(|n| {
                let i = self.topology().host_of_control(n["control"].as_str()?)?;
                Some((i, n["manager_status"].as_str()?.to_owned()))
            })
            .collect())
    }

    /// The host whose manager leads, if one does (as any manager that answers tells).
    pub fn leader(&self) -> Result<Option<usize>, LabError> {
        Ok(self.managers()?.into_iter().find(|(_, s)| s == "leader").map(|(i, _)| i))
    }

    /// How many nodes hold a session with the leader.
    pub fn sessions(&self) -> Result<usize, LabError> {
        Ok(self.nodes()?.iter().filter(|n| n["connected"] == true).count())
    }

    /// `meshd status --json` of host `i`.
    pub fn meshd_status(&self, i: usize) -> Result<serde_json::Value, LabError> {
        let out =
            run(self.in_host(i, "meshd").args(["status", "--json", "--state-dir"]).arg(self.node_dir(i)))?;
        serde_json::from_str(&out).map_err(|e| LabError::Unreadable {
            what: format!("meshd status on {}", self.host(i)),
            detail: e.to_string(),
        })
    }

    /// Every process the lab runs.
    pub fn processes(&self) -> &[Process] {
        &self.record.processes
    }

    /// The process ID of `program` on host `i`.
    pub fn pid(&self, program: Program, i: usize) -> Option<u32> {
        self.record.processes.iter().find(|p| p.program == program && p.host == i).map(|p| p.pid)
    }

    /// Whether `process` is still running.
    pub fn is_running(&self, process: &Process) -> bool {
        process::is_running(process.pid, process.program.binary())
    }

    /// (Re)starts host `i`'s manager on its state directory (`mesh-control run`).
    pub fn start_manager(&mut self, i: usize) -> Result<(), LabError> {
        let dir = self.manager_dir(i).to_string_lossy().into_owned();
        self.spawn_manager(i, vec!["run".into(), "--state-dir".into(), dir])
    }

    fn spawn_manager(&mut self, i: usize, mut args: Vec<String>) -> Result<(), LabError> {
        if !args.iter().any(|a| a == "--state-dir") {
            args.extend(["--state-dir".into(), self.manager_dir(i).to_string_lossy().into_owned()]);
        }
        args.extend(self.topology().manager_args.iter().cloned());
        self.spawn(Program::Manager, i, &args)
    }

    /// (Re)starts host `i`'s meshd.
    pub fn start_meshd(&mut self, i: usize) -> Result<(), LabError> {
        let t = self.topology();
        let args = [
            "run".into(),
            "--state-dir".into(),
            t.node_dir(i).to_string_lossy().into_owned(),
            "--underlay".into(),
            t.addr(i).to_string(),
            "--netns-prefix".into(),
            t.host(i),
        ];
        let args: Vec<String> = args.into_iter().chain(t.meshd_args.iter().cloned()).collect();
        self.spawn(Program::Meshd, i, &args)
    }

    fn spawn(&mut self, program: Program, i: usize, args: &[String]) -> Result<(), LabError> {
        let t = self.topology();
        let child = spawn(&t.host(i), &t.binary(program.binary()), args, &t.log(program, i), t.persistent)?;
        // The process replaces any earlier one of that program on that host in the record.
        let process = Process { host: i, program, pid: child.id() };
        self.record.processes.retain(|p| !(p.program == program && p.host == i));
        self.record.processes.push(process);
        self.children.push((process, child));
        self.record.save()
    }

    /// Stops host `i`'s manager (SIGTERM) and waits for it to exit.
    pub fn stop_manager(&mut self, i: usize) -> Result<(), LabError> {
        self.stop(Program::Manager, i, Signal::SIGTERM)
    }

    /// Kills host `i`'s manager (SIGKILL), as a crash would.
    pub fn kill_manager(&mut self, i: usize) -> Result<(), LabError> {
        self.stop(Program::Manager, i, Signal::SIGKILL)
    }

    /// Stops host `i`'s manager and starts it again on the same state.
    pub fn restart_manager(&mut self, i: usize) -> Result<(), LabError> {
        self.stop_manager(i)?;
        self.start_manager(i)
    }

    /// Stops host `i`'s meshd (SIGTERM: it removes its workloads) and waits for it to exit.
    pub fn stop_meshd(&mut self, i: usize) -> Result<(), LabError> {
        self.stop(Program::Meshd, i, Signal::SIGTERM)
    }

    /// Kills host `i`'s meshd (SIGKILL): its workload namespaces stay, as after a crash.
    pub fn kill_meshd(&mut self, i: usize) -> Result<(), LabError> {
        self.stop(Program::Meshd, i, Signal::SIGKILL)
    }

    /// Stops host `i`'s meshd and starts it again.
    pub fn restart_meshd(&mut self, i: usize) -> Result<(), LabError> {
        self.stop_meshd(i)?;
        self.start_meshd(i)
    }

    /// Sends `sig` to `program` on host `i`, waits for it to exit (killing it after a grace
    /// period) and drops it from the record. A process that already exited is only forgotten.
    fn stop(&mut self, program: Program, i: usize, sig: Signal) -> Result<(), LabError> {
        let Some(pid) = self.pid(program, i) else {
            return Err(LabError::NotRunning { host: self.host(i), program });
        };
        self.end(&[Process { host: i, program, pid }], sig);
        self.record.processes.retain(|p| p.pid != pid);
        self.record.save()
    }

    /// Signals `processes` and waits for them all to exit, killing what is left after
    /// [`STOP_GRACE`].
    fn end(&mut self, processes: &[Process], sig: Signal) {
        self.signal(processes, sig);
        if !process::wait(STOP_GRACE, || self.all_gone(processes)) {
            self.signal(processes, Signal::SIGKILL);
            process::wait(STOP_GRACE, || self.all_gone(processes));
        }
        self.children.retain(|(p, _)| !processes.iter().any(|q| q.pid == p.pid));
    }

    /// Signals those of `processes` that run. A child of this value is signalled by its ID
    /// (which cannot be another process's before it is reaped); any other process only if its
    /// command line says it is the program recorded.
    fn signal(&mut self, processes: &[Process], sig: Signal) {
        for p in processes {
            let runs = match self.children.iter_mut().find(|(c, _)| c.pid == p.pid) {
                Some((_, child)) => child.try_wait().ok().flatten().is_none(),
                None => process::is_running(p.pid, p.program.binary()),
            };
            if runs {
                signal(p.pid, sig);
            }
        }
    }

    /// Whether every one of `processes` has exited (reaping those that are children).
    fn all_gone(&mut self, processes: &[Process]) -> bool {
        processes.iter().all(|p| match self.children.iter_mut().find(|(c, _)| c.pid == p.pid) {
            Some((_, child)) => child.try_wait().ok().flatten().is_some(),
            None => !process::is_running(p.pid, p.program.binary()),
        })
    }

    /// Stops every process (meshd first: it removes its workload namespaces as it stops), removes
    /// every namespace with the lab's prefix and the lab's directory.
    pub fn down(mut self) -> Result<Removed, LabError> {
        self.teardown()
    }

    fn teardown(&mut self) -> Result<Removed, LabError> {
        self.removed = true;
        // The record's processes, and any child it no longer lists (started again over one still
        // running).
        let mut processes = self.record.processes.clone();
        let strays: Vec<Process> =
            self.children.iter().map(|(p, _)| *p).filter(|p| !processes.contains(p)).collect();
        processes.extend(strays);
        let meshd: Vec<Process> = processes.iter().copied().filter(|p| p.program == Program::Meshd).collect();
        self.end(&meshd, Signal::SIGTERM);
        let managers: Vec<Process> =
            processes.iter().copied().filter(|p| p.program == Program::Manager).collect();
        self.end(&managers, Signal::SIGTERM);
        let mut removed = sweep(self.prefix());
        removed.processes = self.record.processes.len();
        let dir = self.dir().to_owned();
        if record_path(&dir).exists() {
            std::fs::remove_dir_all(&dir).map_err(|source| LabError::Io { path: dir, source })?;
        }
        Ok(removed)
    }
}

impl Drop for Lab {
    /// A lab that is not persistent goes with its value.
    fn drop(&mut self) {
        if !self.removed && !self.topology().persistent {
            let _ = self.teardown();
        }
    }
}

/// Removes every namespace named `prefix-*` and whatever runs in them (what a lab with that
/// prefix left, when its record is gone).
pub fn sweep(prefix: &str) -> Removed {
    let names = namespaces(prefix);
    Removed { processes: 0, namespaces: names.iter().filter(|ns| remove_namespace(ns)).count() }
}

/// Checks that `topology` can be built here: valid, run as root, its binaries built, its
/// directory and names free.
fn check(topology: &Topology) -> Result<(), LabError> {
    super::require_root()?;
    topology.validate()?;
    for b in [Program::Manager.binary(), Program::Meshd.binary(), "meshctl"] {
        let path = topology.binary(b);
        if !path.exists() {
            return Err(LabError::MissingBinary(path));
        }
    }
    if record_path(&topology.dir).exists() {
        return Err(LabError::AlreadyUp(topology.dir.clone()));
    }
    // The directory goes with the lab: never one that holds anything else.
    if std::fs::read_dir(&topology.dir).is_ok_and(|mut entries| entries.next().is_some()) {
        return Err(LabError::Topology(format!(
            "{} is not empty: the lab removes its directory when it goes, give it a new or empty one",
            topology.dir.display()
        )));
    }
    if !namespaces(&topology.prefix).is_empty() {
        return Err(LabError::NamespacesExist(topology.prefix.clone()));
    }
    Ok(())
}

impl Topology {
    /// Whether this topology can be built here now (see [`Lab::create`]), without building it.
    pub fn check(&self) -> Result<(), LabError> {
        check(self)
    }
}

fn certificate_name(path: &Path) -> Result<String, LabError> {
    let pem =
        std::fs::read_to_string(path).map_err(|source| LabError::Io { path: path.to_owned(), source })?;
    mesh_api::pki::CertInfo::from_pem(&pem)
        .map(|c| c.common_name)
        .map_err(|e| LabError::Unreadable { what: path.display().to_string(), detail: e.to_string() })
}
