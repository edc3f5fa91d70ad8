//! Running things for the lab: one-shot commands, processes left running in a host's namespace,
//! signals, and the machine's named network namespaces.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use super::LabError;

/// Where `ip netns` keeps named namespaces.
pub(super) const NETNS_DIR: &str = "/var/run/netns";

/// Fails unless the process runs as root (namespaces, veths and tun devices need it).
pub fn require_root() -> Result<(), LabError> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let root = status.lines().any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"));
    if root { Ok(()) } else { Err(LabError::NotRoot) }
}

/// Polls `check` every 100 ms for up to `limit`; whether it held.
pub fn wait(limit: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `cmd`'s command line, for messages.
pub(super) fn shown(cmd: &Command) -> String {
    std::iter::once(cmd.get_program())
        .chain(cmd.get_args())
        .map(|a| a.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `cmd` to the end, whatever its outcome.
pub(super) fn output(cmd: &mut Command) -> Result<Output, LabError> {
    cmd.stdin(Stdio::null()).output().map_err(|source| LabError::Spawn {
        program: cmd.get_program().to_string_lossy().into_owned(),
        source,
    })
}

/// Runs `cmd`; its stdout, or an error with what it said when it fails.
pub(super) fn run(cmd: &mut Command) -> Result<String, LabError> {
    let out = output(cmd)?;
    if !out.status.success() {
        let said = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let said =
            if said.is_empty() { String::from_utf8_lossy(&out.stdout).trim().to_owned() } else { said };
        return Err(LabError::Failed { command: shown(cmd), output: said });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip ARGS`.
pub(super) fn ip(args: &[&str]) -> Result<String, LabError> {
    run(Command::new("ip").args(args))
}

/// Starts `program ARGS` in namespace `ns`, logging stdout and stderr to the end of `log`; in a
/// process group of its own when `detached` (it then outlives whoever started it).
///
/// Only the network namespace is entered (`nsenter --net`, which then runs the program itself,
/// so the child is the program): the workload namespaces meshd makes stay visible to everyone,
/// where `ip netns exec` would give it a mount namespace of its own.
pub(super) fn spawn(
    ns: &str,
    program: &Path,
    args: &[String],
    log: &Path,
    detached: bool,
) -> Result<Child, LabError> {
    use std::os::unix::process::CommandExt;
    let io = |source| LabError::Io { path: log.to_owned(), source };
    let file = std::fs::OpenOptions::new().create(true).append(true).open(log).map_err(io)?;
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={NETNS_DIR}/{ns}"))
        .arg(program)
        .args(args)
        .env("RUST_LOG", "info,openraft=warn")
        .stdin(Stdio::null())
        .stdout(file.try_clone().map_err(io)?)
        .stderr(file);
    if detached {
        cmd.process_group(0);
    }
    cmd.spawn().map_err(|source| LabError::Spawn { program: program.display().to_string(), source })
}

/// Whether `pid` is a running `program` (its command line starts with it: a recorded pid taken
/// since by another process is left alone).
pub(super) fn is_running(pid: u32, program: &str) -> bool {
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { return false };
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // A zombie has exited; it only waits to be reaped.
    let zombie = stat.rsplit_once(") ").is_some_and(|(_, rest)| rest.starts_with('Z'));
    let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
    !zombie && Path::new(&*String::from_utf8_lossy(first)).file_name().is_some_and(|n| n == program)
}

/// Sends `signal` to `pid`; a process already gone is no error.
pub(super) fn signal(pid: u32, signal: Signal) {
    let _ = kill(Pid::from_raw(pid as i32), signal);
}

/// Names of the machine's named network namespaces that start with `prefix-`.
pub(super) fn namespaces(prefix: &str) -> Vec<String> {
    let start = format!("{prefix}-");
    let mut names: Vec<String> = std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&start))
        .collect();
    names.sort();
    names
}

/// Removes namespace `ns`, killing whatever still runs in it first; whether it went.
pub(super) fn remove_namespace(ns: &str) -> bool {
    if let Ok(pids) = ip(&["netns", "pids", ns]) {
        for pid in pids.split_whitespace().filter_map(|p| p.parse().ok()) {
            signal(pid, Signal::SIGKILL);
        }
    }
    let removed = ip(&["netns", "del", ns]).is_ok();
    let _ = std::fs::remove_dir_all(PathBuf::from("/etc/netns").join(ns));
    removed
}
