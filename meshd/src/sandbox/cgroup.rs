//! A workload's cgroup: `mesh/<namespace>` under the unified hierarchy (cgroup v2), or under
//! each of the memory, cpu and pids hierarchies where the host still mounts them apart (v1).
//! Its limits are the service's CPU and memory limits, and always a bound on its tasks (a fork
//! bomb in one workload leaves the host's process table to the others).

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_api::model::RunSpec;

const ROOT: &str = "/sys/fs/cgroup";
/// The parent of every workload's cgroup.
const PARENT: &str = "mesh";
/// Most tasks (processes and threads) one workload may have.
pub const TASKS: u32 = 4096;
/// The period CPU limits are counted over, in microseconds.
const CPU_PERIOD: u64 = 100_000;

/// Whether this host has the unified hierarchy with its controllers (not the v1 layout).
fn unified() -> bool {
    Path::new(ROOT).join("cgroup.controllers").exists()
}

/// Creates namespace `ns`'s cgroup (replacing a stale one) with `sandbox`'s limits; returns the
/// directories the workload joins. Fails when a limit is asked and cannot be set.
pub fn create(ns: &str, sandbox: &RunSpec) -> io::Result<Vec<PathBuf>> {
    remove(ns);
    // A cgroup that outlived its removal still holds tasks of the workload before (stuck in the
    // kernel, say): a new workload never shares it.
    let mut dirs = vec![Path::new(ROOT).join(PARENT).join(ns)];
    dirs.extend(["pids", "memory", "cpu"].map(|c| Path::new(ROOT).join(c).join(PARENT).join(ns)));
    for dir in dirs {
        if fs::read_to_string(dir.join("cgroup.procs")).is_ok_and(|p| !p.trim().is_empty()) {
            return Err(io::Error::other(format!(
                "{} still holds processes of the workload before; not reusing it",
                dir.display()
            )));
        }
    }
    let memory = sandbox.memory_bytes;
    let cpu = sandbox.cpu_millis.map(|m| u64::from(m) * CPU_PERIOD / 1000);
    if unified() {
        let parent = Path::new(ROOT).join(PARENT);
        fs::create_dir_all(&parent)?;
        for (at, controller) in
            [(Path::new(ROOT), "memory"), (Path::new(ROOT), "cpu"), (Path::new(ROOT), "pids")]
                .into_iter()
                .chain([(parent.as_path(), "memory"), (parent.as_path(), "cpu"), (parent.as_path(), "pids")])
        {
            // Best effort for the task bound; a limit asked for is checked when written below.
            let _ = fs::write(at.join("cgroup.subtree_control"), format!("+{controller}"));
        }
        let dir = parent.join(ns);
        fs::create_dir_all(&dir)?;
        write(&dir, "pids.max", &TASKS.to_string(), false)?;
        if let Some(m) = memory {
            write(&dir, "memory.max", &m.to_string(), true)?;
            let _ = fs::write(dir.join("memory.swap.max"), "0");
        }
        if let Some(quota) = cpu {
            write(&dir, "cpu.max", &format!("{quota} {CPU_PERIOD}"), true)?;
        }
        return Ok(vec![dir]);
    }
    let mut dirs = Vec::new();
    let mut hierarchy = |controller: &str, limits: &[(&str, String)], asked: bool| -> io::Result<()> {
        let root = Path::new(ROOT).join(controller);
        if !root.join("cgroup.procs").exists() {
            return if asked {
                Err(io::Error::other(format!("no {controller} cgroup on this host: the limit cannot be set")))
            } else {
                Ok(())
            };
        }
        let dir = root.join(PARENT).join(ns);
        fs::create_dir_all(&dir)?;
        for (file, value) in limits {
            write(&dir, file, value, asked)?;
        }
        dirs.push(dir);
        Ok(())
    };
    hierarchy("pids", &[("pids.max", TASKS.to_string())], false)?;
    let memory_limits: Vec<(&str, String)> =
        memory.map(|m| vec![("memory.limit_in_bytes", m.to_string())]).unwrap_or_default();
    hierarchy("memory", &memory_limits, memory.is_some())?;
    let cpu_limits: Vec<(&str, String)> = cpu
        .map(|q| vec![("cpu.cfs_period_us", CPU_PERIOD.to_string()), ("cpu.cfs_quota_us", q.to_string())])
        .unwrap_or_default();
    hierarchy("cpu", &cpu_limits, cpu.is_some())?;
    Ok(dirs)
}

fn write(dir: &Path, file: &str, value: &str, asked: bool) -> io::Result<()> {
    match fs::write(dir.join(file), value) {
        Ok(()) => Ok(()),
        Err(e) if asked => Err(io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display()))),
        // The task bound where the pids controller is not enabled: the workload runs without it.
        Err(_) => Ok(()),
    }
}

/// The helper joins its cgroups (it is PID 1 of its namespace, and writes that).
pub(super) fn join(dirs: &[PathBuf]) -> io::Result<()> {
    for dir in dirs {
        fs::write(dir.join("cgroup.procs"), std::process::id().to_string())
            .map_err(|e| io::Error::new(e.kind(), format!("joining cgroup {}: {e}", dir.display())))?;
    }
    Ok(())
}

/// Removes namespace `ns`'s cgroups once their processes are gone (they take a moment to exit
/// after being killed); what cannot be removed within a second is left for the next start.
pub fn remove(ns: &str) {
    let mut dirs = vec![Path::new(ROOT).join(PARENT).join(ns)];
    for controller in ["pids", "memory", "cpu"] {
        dirs.push(Path::new(ROOT).join(controller).join(PARENT).join(ns));
    }
    for dir in dirs.iter().filter(|d| d.exists()) {
        for _ in 0..20 {
            if fs::remove_dir(dir).is_ok() || !dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
