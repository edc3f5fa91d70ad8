//! The filesystem a workload sees, built by the helper in its own mount namespace: the host's
//! mounts, every one read-only and without devices; a `/proc` of its PID namespace and a `/sys`
//! of its network namespace; a `/dev` of its own with only the harmless devices (no disk, no
//! terminal, no tun: see [`DEVICES`]) and ptys of its own; a private `/tmp`, `/var/tmp`,
//! `/dev/shm` and `/run`, each of bounded size; its namespace's resolver as
//! `/etc/resolv.conf`; its secrets, read-only, at `/run/secrets`; the node's state covered by
//! empty read-only directories; and the paths the service may write, bound read-write.

use std::fs;
use std::io;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use nix::fcntl::{OFlag, open};
use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sys::stat::Mode;

use super::Plan;

const NONE: Option<&str> = None;
/// Scratch space a workload writes, its own: private, gone with it, and bounded (the memory it
/// takes is charged to the workload's cgroup, and a full one fills nothing of the host's).
const SCRATCH: [(&str, &str); 4] = [
    ("/tmp", "mode=1777,size=256m,nr_inodes=65536"),
    ("/var/tmp", "mode=1777,size=64m,nr_inodes=16384"),
    ("/dev/shm", "mode=1777,size=64m,nr_inodes=16384"),
    ("/run", "mode=0755,size=16m,nr_inodes=4096"),
];
/// The devices a workload has: (name, major, minor). Nothing else of the host's `/dev`.
const DEVICES: [(&str, u64, u64); 5] =
    [("null", 1, 3), ("zero", 1, 5), ("full", 1, 7), ("random", 1, 8), ("urandom", 1, 9)];
/// Where a workload reads its secrets.
pub const SECRETS: &str = "/run/secrets";

pub(super) fn build(plan: &Plan) -> io::Result<()> {
    // Nothing done here reaches the host's mounts, nor theirs this view.
    mount(NONE, "/", NONE, MsFlags::MS_REC | MsFlags::MS_PRIVATE, NONE)?;
    // The writable paths, held before anything covers them (the lab's live under /tmp).
    let hold = |path: &PathBuf| {
        open(path, OFlag::O_PATH | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC, Mode::empty())
            .map_err(|e| io::Error::other(format!("{}: {e}", path.display())))
    };
    let writable =
        plan.writable.iter().map(|path| Ok((path, hold(path)?))).collect::<io::Result<Vec<_>>>()?;
    let readable =
        plan.readable.iter().map(|path| Ok((path, hold(path)?))).collect::<io::Result<Vec<_>>>()?;
    let secrets = plan.secrets.as_ref().map(hold).transpose()?;
    let kernel = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(Some("proc"), "/proc", Some("proc"), kernel, NONE)?;
    umount2("/sys", MntFlags::MNT_DETACH)?;
    mount(Some("sysfs"), "/sys", Some("sysfs"), kernel | MsFlags::MS_RDONLY, NONE)?;
    read_only()?;
    devices()?;
    for (scratch, mode) in SCRATCH {
        if Path::new(scratch).is_dir() {
            let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV;
            mount(Some("tmpfs"), scratch, Some("tmpfs"), flags, Some(mode))?;
        }
    }
    // After the scratch mounts: a resolv.conf that is a link into /run points into the new one.
    let resolver = Path::new("/etc/netns").join(&plan.namespace).join("resolv.conf");
    if resolver.exists() {
        let target = resolv_conf_target();
        mount_point(&target, false)?;
        mount(Some(&resolver), &target, NONE, MsFlags::MS_BIND, NONE)
            .map_err(|e| io::Error::other(format!("the workload's resolver: {e}")))?;
    }
    if let Some(fd) = &secrets {
        let source = PathBuf::from(format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(fd)));
        mount_point(Path::new(SECRETS), true)?;
        mount(Some(&source), SECRETS, NONE, MsFlags::MS_BIND, NONE)
            .map_err(|e| io::Error::other(format!("the workload's secrets: {e}")))?;
        mount(
            NONE,
            SECRETS,
            NONE,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | kernel,
            NONE,
        )?;
    }
    for hidden in &plan.hidden {
        if hidden.is_dir() {
            mount(Some("tmpfs"), hidden, Some("tmpfs"), kernel | MsFlags::MS_RDONLY, Some("mode=0,size=4k"))
                .map_err(|e| io::Error::other(format!("hiding {}: {e}", hidden.display())))?;
        }
    }
    for (path, fd) in &readable {
        show(path, fd, MsFlags::MS_RDONLY)
            .map_err(|e| io::Error::other(format!("readable path {}: {e}", path.display())))?;
    }
    for (path, fd) in &writable {
        show(path, fd, MsFlags::empty())
            .map_err(|e| io::Error::other(format!("writable path {}: {e}", path.display())))?;
    }
    Ok(())
}

/// A `/dev` of the workload's own: the harmless character devices, a devpts instance of its own
/// (its ptys are nobody else's), and the usual links.
fn devices() -> io::Result<()> {
    use nix::sys::stat::{SFlag, makedev, mknod};
    mount(
        Some("tmpfs"),
        "/dev",
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=64k"),
    )?;
    for (name, major, minor) in DEVICES {
        let path = Path::new("/dev").join(name);
        mknod(&path, SFlag::S_IFCHR, Mode::from_bits_truncate(0o666), makedev(major, minor))?;
        // mknod's mode passes through the umask.
        fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    }
    for dir in ["pts", "shm"] {
        fs::DirBuilder::new().mode(0o755).create(Path::new("/dev").join(dir))?;
    }
    mount(
        Some("devpts"),
        "/dev/pts",
        Some("devpts"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some("newinstance,ptmxmode=0666,mode=0620"),
    )?;
    for (link, target) in [
        ("ptmx", "pts/ptmx"),
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        std::os::unix::fs::symlink(target, Path::new("/dev").join(link))?;
    }
    Ok(())
}

/// Where `/etc/resolv.conf` really is: the file, or what it links to (made absolute).
fn resolv_conf_target() -> PathBuf {
    let link = Path::new("/etc/resolv.conf");
    match fs::read_link(link) {
        Ok(target) if target.is_absolute() => target,
        Ok(target) => Path::new("/etc").join(target),
        Err(_) => link.to_owned(),
    }
}

/// Binds the host path held by `fd` at `path` in this view (the mount point made where a scratch
/// mount covers it), with `flags` (read-only, or none: writable), never set-user-ID or devices.
fn show(path: &Path, fd: &impl std::os::fd::AsRawFd, flags: MsFlags) -> io::Result<()> {
    let source = PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()));
    mount_point(path, source.is_dir())?;
    mount(Some(&source), path, NONE, MsFlags::MS_BIND | MsFlags::MS_REC, NONE)?;
    let remount = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_NOSUID | MsFlags::MS_NODEV | flags;
    Ok(mount(NONE, path, NONE, remount, NONE)?)
}

/// Makes every mount read-only and without devices, each keeping its other flags.
fn read_only() -> io::Result<()> {
    let table = fs::read_to_string("/proc/self/mountinfo")?;
    for line in table.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let (Some(point), Some(options)) = (fields.get(4), fields.get(5)) else { continue };
        let point = unescape(point);
        let mut flags = MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | MsFlags::MS_NODEV;
        for option in options.split(',') {
            flags |= match option {
                "nosuid" => MsFlags::MS_NOSUID,
                "nodev" => MsFlags::MS_NODEV,
                "noexec" => MsFlags::MS_NOEXEC,
                "noatime" => MsFlags::MS_NOATIME,
                "nodiratime" => MsFlags::MS_NODIRATIME,
                "relatime" => MsFlags::MS_RELATIME,
                _ => MsFlags::empty(),
            };
        }
        match mount(NONE, point.as_str(), NONE, flags, NONE) {
            Ok(()) => {}
            // A mount point no longer reachable by its path: removed (ENOENT), or covered by a
            // mount made above (the host's /proc and /sys submounts: the path is no mount root
            // in the new one, EINVAL). Nothing of it can be reached through this view.
            Err(nix::errno::Errno::ENOENT | nix::errno::Errno::EINVAL) => {}
            Err(e) => return Err(io::Error::other(format!("making {point} read-only: {e}"))),
        }
    }
    Ok(())
}

/// A mount point's path as mountinfo writes it: space, tab, newline and backslash in octal.
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Makes sure `path` can be mounted on: a writable path under a scratch directory is not in the
/// fresh one, so it is made there (a directory or an empty file, like its source).
fn mount_point(path: &Path, directory: bool) -> io::Result<()> {
    if path.exists() {
        return Ok(());
    }
    if directory {
        fs::DirBuilder::new().recursive(true).mode(0o755).create(path)
    } else {
        if let Some(parent) = path.parent() {
            fs::DirBuilder::new().recursive(true).mode(0o755).create(parent)?;
        }
        fs::File::create(path).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_as_the_kernel_escapes_them() {
        assert_eq!(unescape("/mnt/with\\040space"), "/mnt/with space");
        assert_eq!(unescape("/a\\011tab\\134slash"), "/a\ttab\\slash");
        assert_eq!(unescape("/plain"), "/plain");
        assert_eq!(unescape("/odd\\"), "/odd\\");
    }
}
