//! The confinement of a workload's command. What runs for a service gets only what a service
//! needs: its network namespace, a user of its own (or the one the service names, never root)
//! with no capabilities and `no_new_privs`, its own mount, PID, IPC and UTS namespaces, the
//! host's files read-only with the node's state hidden, a private `/tmp`, and a cgroup (limits
//! when the service asks, a bound on tasks always). It can still bind any port (the namespace
//! lets unprivileged users bind below 1024), resolve names at 127.0.0.11 and reach the mesh.
//!
//! ```text
//!  meshd ── thread: setns(net), unshare(pid) ──► meshd sandbox-exec PLAN   (PID 1 of its own
//!           spawn                                  join cgroup, unshare(mnt, ipc, uts),
//!                                                  build the view, drop to the user,
//!                                                  spawn `sh -c COMMAND`, reap until it exits)
//! ```
//!
//! The helper is meshd's own binary (`/proc/self/exe`, so an upgrade on disk does not change
//! it), started with no environment; it is PID 1 of the workload's PID namespace, so when it
//! goes (meshd kills it on removal) every process of the workload goes with it.

pub mod cgroup;
pub mod secrets;
mod syscalls;
mod view;

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};

use mesh_api::model::RunSpec;
use nix::sched::{CloneFlags, setns, unshare};
use serde::{Deserialize, Serialize};

/// The hidden subcommand that confines itself and runs a workload's command.
pub const HELPER: &str = "sandbox-exec";
/// The first of the users made for workloads (one per workload on a node, counted up from here);
/// far above the ranges distributions and user namespaces hand out.
pub const FIRST_UID: u32 = 1_800_000_000;
/// How many workloads a node can run at once, by the users it can make for them.
pub const UIDS: u32 = 1 << 20;
/// The lowest uid and gid a service may name (`--user`): below are the system's accounts.
pub const FIRST_NAMED: u32 = 1000;
/// The environment a workload's command starts with: nothing of meshd's.
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// What a node's workloads must never see, and the users handed out to them.
pub struct Host {
    /// Hidden in every workload's view (covered by an empty read-only directory).
    hidden: Vec<PathBuf>,
    uids: Mutex<BTreeSet<u32>>,
}

impl Host {
    /// The node's state directory is hidden, with the namespaces' files (other workloads' and
    /// the host's network namespaces) and the managers' default state directory.
    pub fn new(state_dir: &Path) -> Arc<Host> {
        let mut hidden = vec![
            state_dir.to_owned(),
            PathBuf::from("/run/netns"),
            PathBuf::from("/var/run/netns"),
            PathBuf::from("/etc/netns"),
            PathBuf::from("/var/lib/mesh-control"),
            PathBuf::from("/etc/mesh"),
            PathBuf::from(secrets::ROOT).parent().map(Path::to_owned).unwrap_or_default(),
        ];
        // Where the paths really are (a symlinked /var/run included), each once.
        hidden = hidden.into_iter().map(|p| p.canonicalize().unwrap_or(p)).collect();
        hidden.sort();
        hidden.dedup();
        Arc::new(Host { hidden, uids: Mutex::new(BTreeSet::new()) })
    }

    /// A user of its own for one workload, free again when the lease is dropped.
    pub fn lease_uid(self: &Arc<Host>) -> io::Result<UidLease> {
        let mut uids = self.uids.lock().unwrap_or_else(PoisonError::into_inner);
        let n = (0..UIDS)
            .find(|n| !uids.contains(n))
            .ok_or_else(|| io::Error::other("every workload user is taken"))?;
        uids.insert(n);
        Ok(UidLease { host: self.clone(), n })
    }

    /// The plan for running `command` in namespace `ns` confined as `sandbox` asks, as the
    /// workload that holds `uid`. Fails when the service names a user the node does not know,
    /// or root, or a writable path that is missing, hidden, or a kernel interface.
    pub fn plan(&self, ns: &str, command: &str, sandbox: &RunSpec, uid: &UidLease) -> io::Result<Plan> {
        let (uid, gid) = user(&sandbox.user, FIRST_UID + uid.n)?;
        let mut writable = Vec::new();
        let mut readable = Vec::new();
        let shown =
            sandbox.writable.iter().map(|p| (p, true)).chain(sandbox.readable.iter().map(|p| (p, false)));
        for (path, write) in shown {
            let real = Path::new(path)
                .canonicalize()
                .map_err(|e| io::Error::new(e.kind(), format!("path {path}: {e}")))?;
            let kernel = ["/proc", "/sys", "/dev"].iter().any(|k| real.starts_with(k));
            // A directory or a plain file: a socket or a device is a door to what serves it.
            let kind = std::fs::metadata(&real)?.file_type();
            if !kind.is_dir() && !kind.is_file() {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!("path {path} is neither a directory nor a file"),
                ));
            }
            let hides = self.hidden.iter().any(|h| real.starts_with(h) || h.starts_with(&real));
            if kernel || hides || real == Path::new("/") {
                return Err(io::Error::new(
                    io::ErrorKind::PermissionDenied,
                    format!(
                        "path {path} is (or holds) what a workload never reads or writes: the root, \
                         /proc, /sys, /dev or the node's state"
                    ),
                ));
            }
            if write { writable.push(real) } else { readable.push(real) }
        }
        Ok(Plan {
            namespace: ns.to_owned(),
            uid,
            gid,
            hidden: self.hidden.clone(),
            writable,
            readable,
            cgroups: Vec::new(),
            command: command.to_owned(),
            env: sandbox.env.clone(),
            secrets: None,
        })
    }
}

/// One workload's user, given back to the node's pool on drop.
pub struct UidLease {
    host: Arc<Host>,
    n: u32,
}

impl Drop for UidLease {
    fn drop(&mut self) {
        self.host.uids.lock().unwrap_or_else(PoisonError::into_inner).remove(&self.n);
    }
}

/// The uid and gid a workload runs as: `own` (its own user, group of the same number) when the
/// service names none, else `NAME`, `UID` or `UID:GID` as this node knows them. Never root.
fn user(named: &str, own: u32) -> io::Result<(u32, u32)> {
    let (uid, gid) = if named.is_empty() {
        (own, own)
    } else if let Some((u, g)) = named.split_once(':') {
        (number(u, named)?, number(g, named)?)
    } else if let Ok(u) = named.parse::<u32>() {
        (u, u)
    } else {
        let user = nix::unistd::User::from_name(named).map_err(io::Error::from)?.ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no user `{named}` on this node"))
        })?;
        (user.uid.as_raw(), user.gid.as_raw())
    };
    if uid == 0 || gid == 0 {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("user `{named}` is root (uid or gid 0): a workload never runs as root"),
        ));
    }
    if !named.is_empty() {
        // A system account or group (disk, shadow, docker...) opens what the host gives it;
        // another workload's own user is that workload's.
        let system = uid < FIRST_NAMED || gid < FIRST_NAMED;
        let leased =
            (FIRST_UID..FIRST_UID + UIDS).contains(&uid) || (FIRST_UID..FIRST_UID + UIDS).contains(&gid);
        if system || leased {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "user `{named}` ({uid}:{gid}) is a system account or a workload's own: a service may name \
                     only a regular user and group ({FIRST_NAMED} and above)"
                ),
            ));
        }
    }
    Ok((uid, gid))
}

fn number(text: &str, named: &str) -> io::Result<u32> {
    text.parse()
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("user `{named}`: expected UID:GID")))
}

/// Everything the helper needs to confine itself and run the command (its one argument, JSON).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Plan {
    /// The network namespace (by name): its resolver file and the workload's host name.
    pub namespace: String,
    pub uid: u32,
    pub gid: u32,
    pub hidden: Vec<PathBuf>,
    pub writable: Vec<PathBuf>,
    /// Shown read-only, where the view covers them.
    pub readable: Vec<PathBuf>,
    /// The cgroup directories the workload joins (see [`cgroup::create`]).
    pub cgroups: Vec<PathBuf>,
    pub command: String,
    /// `NAME=VALUE`, set after `PATH` and `HOME`.
    pub env: Vec<String>,
    /// The tmpfs holding its secrets (see [`Host::secrets`]), bound at `/run/secrets`.
    pub secrets: Option<PathBuf>,
}

/// Starts the helper for `plan`: in the plan's network namespace, as PID 1 of a new PID
/// namespace. Killing the returned child ends the whole workload.
pub fn spawn(plan: &Plan) -> io::Result<tokio::process::Child> {
    let json = serde_json::to_string(plan).map_err(io::Error::other)?;
    let netns = File::open(format!("/var/run/netns/{}", plan.namespace))?;
    let runtime = tokio::runtime::Handle::current();
    // A thread of its own: the namespaces it enters are for the child only, and a thread can
    // make one PID namespace (its first child is that namespace's PID 1).
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&netns, CloneFlags::CLONE_NEWNET)?;
                unshare(CloneFlags::CLONE_NEWPID)?;
                let _runtime = runtime.enter();
                tokio::process::Command::new("/proc/self/exe")
                    .arg(HELPER)
                    .env_clear()
                    // The plan goes on stdin, not the command line (which every user of the
                    // host can read in /proc); the helper then puts /dev/null there.
                    .stdin(Stdio::piped())
                    // Its output is kept per endpoint (`meshctl service logs`).
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
            })
            .join()
            .map_err(|_| io::Error::other("the thread starting a workload panicked"))?
    })
    .map(|mut child| {
        if let Some(mut stdin) = child.stdin.take() {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                // Dropped at the end: the helper reads to the end of it.
                let _ = stdin.write_all(json.as_bytes()).await;
            });
        }
        child
    })
}

/// The helper (`meshd sandbox-exec`, its plan on stdin): confines itself as the plan says, runs
/// the command and reaps every process of the namespace until the command exits, then exits as
/// it did. Never returns; a step that fails ends it before the command runs (fail closed).
pub fn exec() -> ! {
    let result = read_plan().and_then(|plan| confine(&plan));
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("meshd sandbox: not running the workload: {e}");
            std::process::exit(126)
        }
    }
}

/// The plan, read from stdin to its end (bounded); stdin is /dev/null after.
fn read_plan() -> io::Result<Plan> {
    use std::io::Read;
    let mut json = String::new();
    std::io::stdin().take(MAX_PLAN).read_to_string(&mut json)?;
    let null = File::open("/dev/null")?;
    nix::unistd::dup2_stdin(&null)?;
    serde_json::from_str(&json).map_err(|e| io::Error::other(format!("the plan: {e}")))
}

/// Largest plan read.
const MAX_PLAN: u64 = 1 << 20;

fn confine(plan: &Plan) -> io::Result<i32> {
    no_leaked_descriptors()?;
    // A session of its own: no controlling terminal (meshd's, if it has one, cannot be reached
    // or typed into), no process group shared with meshd.
    nix::unistd::setsid()?;
    // No core dump: one would write the workload's memory, its secrets with it, to a disk.
    nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_CORE, 0, 0)?;
    cgroup::join(&plan.cgroups)?;
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS)?;
    nix::unistd::sethostname(&plan.namespace)?;
    view::build(plan)?;
    drop_privileges(plan.uid, plan.gid)?;
    syscalls::restrict()?;
    std::env::set_current_dir("/")?;
    let mut child = std::process::Command::new("/bin/sh")
        .arg("-c")
        .arg(&plan.command)
        .env_clear()
        .env("PATH", PATH)
        .env("HOME", "/tmp")
        .envs(plan.env.iter().filter_map(|pair| pair.split_once('=')))
        .spawn()?;
    let main = child.id();
    // PID 1 of the namespace: every orphan is ours to reap.
    loop {
        match nix::sys::wait::wait() {
            Ok(nix::sys::wait::WaitStatus::Exited(pid, code)) if pid.as_raw() as u32 == main => {
                return Ok(code);
            }
            Ok(nix::sys::wait::WaitStatus::Signaled(pid, signal, _)) if pid.as_raw() as u32 == main => {
                return Ok(128 + signal as i32);
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(nix::errno::Errno::ECHILD) => {
                return Ok(child
                    .try_wait()?
                    .and_then(|s| s.code().or(s.signal().map(|s| 128 + s)))
                    .unwrap_or(0));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Closes every descriptor but stdin, stdout and stderr that would outlive the exec: meshd's
/// own are close-on-exec, but what meshd itself inherited is not, and a socket or device of the
/// node's in a workload's hands is not the workload's. Fails if one stays open.
fn no_leaked_descriptors() -> io::Result<()> {
    let leaked = inherited()?;
    for fd in &leaked {
        nix::unistd::close(*fd)?;
    }
    match inherited()?.first() {
        Some(fd) => Err(io::Error::other(format!("descriptor {fd} would be inherited by the workload"))),
        None => Ok(()),
    }
}

/// The descriptors above stderr not marked close-on-exec.
fn inherited() -> io::Result<Vec<i32>> {
    const O_CLOEXEC: u32 = 0o2000000;
    let mut open = Vec::new();
    for entry in std::fs::read_dir("/proc/self/fdinfo")? {
        let name = entry?.file_name();
        let Some(fd) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else { continue };
        // The listing's own descriptor is close-on-exec like every other of ours.
        let Ok(info) = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else { continue };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
            .unwrap_or(0);
        if fd > 2 && flags & O_CLOEXEC == 0 {
            open.push(fd);
        }
    }
    Ok(open)
}

/// Becomes `uid`:`gid` (no supplementary groups) with no capability left in any set, the
/// bounding set included, and `no_new_privs` (no set-user-ID program gives any back); checks it.
fn drop_privileges(uid: u32, gid: u32) -> io::Result<()> {
    use rustix::thread::{CapabilitySet, remove_capability_from_bounding_set};
    for capability in CapabilitySet::all().iter() {
        match remove_capability_from_bounding_set(capability) {
            // A capability this kernel does not have.
            Ok(()) | Err(rustix::io::Errno::INVAL) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let (uid, gid) = (nix::unistd::Uid::from_raw(uid), nix::unistd::Gid::from_raw(gid));
    nix::unistd::setgroups(&[])?;
    nix::unistd::setresgid(gid, gid, gid)?;
    nix::unistd::setresuid(uid, uid, uid)?;
    rustix::thread::set_no_new_privs(true)?;
    let caps = rustix::thread::capabilities(None)?;
    if !caps.effective.is_empty() || !caps.permitted.is_empty() || !caps.inheritable.is_empty() {
        return Err(io::Error::other("capabilities left after dropping to the workload's user"));
    }
    if nix::unistd::getuid().is_root() || nix::unistd::geteuid().is_root() {
        return Err(io::Error::other("still root after dropping to the workload's user"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_the_workloads_own_or_named_never_root() {
        assert_eq!(user("", FIRST_UID + 3).unwrap(), (FIRST_UID + 3, FIRST_UID + 3));
        assert_eq!(user("1000", 7).unwrap(), (1000, 1000));
        assert_eq!(user("1000:2000", 7).unwrap(), (1000, 2000));
        // System accounts and groups (disk is 6, shadow 42 on Debian), another workload's user.
        let leased = FIRST_UID + 1;
        for refused in
            ["0", "0:1000", "1000:0", "root", "65534:6", "1000:42", "999", &leased.to_string(), "daemon"]
        {
            assert!(user(refused, 7).is_err(), "{refused} accepted");
        }
        for root in ["0", "0:1000", "1000:0", "root"] {
            assert!(user(root, 7).is_err(), "{root} accepted");
        }
        assert!(user("no-such-user-here", 7).is_err());
    }

    #[test]
    fn each_workload_gets_a_user_no_other_holds() {
        let host = Host::new(Path::new("/nonexistent-state"));
        let a = host.lease_uid().unwrap();
        let b = host.lease_uid().unwrap();
        assert_ne!(a.n, b.n);
        let freed = a.n;
        drop(a);
        assert_eq!(host.lease_uid().unwrap().n, freed, "a freed user is handed out again");
    }

    #[test]
    fn writable_paths_never_reach_the_nodes_state_or_the_kernel() {
        let state = tempfile::tempdir().unwrap();
        let host = Host::new(state.path());
        let uid = host.lease_uid().unwrap();
        let plan = |paths: &[&str]| {
            let sandbox =
                RunSpec { writable: paths.iter().map(|p| p.to_string()).collect(), ..RunSpec::default() };
            host.plan("ns", "true", &sandbox, &uid)
        };
        let inside = state.path().join("sub");
        std::fs::create_dir(&inside).unwrap();
        for bad in [state.path(), inside.as_path(), Path::new("/proc/sys"), Path::new("/dev"), Path::new("/")]
        {
            assert!(plan(&[bad.to_str().unwrap()]).is_err(), "{} accepted", bad.display());
        }
        // A parent of the state directory would uncover it.
        let parent = state.path().parent().unwrap();
        assert!(plan(&[parent.to_str().unwrap()]).is_err());
        assert!(plan(&["/nonexistent/path"]).is_err(), "a missing path is refused");
        let other = tempfile::tempdir().unwrap();
        let ok = plan(&[other.path().to_str().unwrap()]).unwrap();
        assert_eq!(ok.writable, vec![other.path().canonicalize().unwrap()]);
        assert!(ok.hidden.contains(&state.path().canonicalize().unwrap()));
    }
}
