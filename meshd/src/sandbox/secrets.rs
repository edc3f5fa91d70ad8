//! A workload's secrets on the host: a tmpfs of its own under `/run/meshd/secrets/<namespace>`
//! (memory, never a disk: not swapped where the kernel allows), owned by the workload's user,
//! each secret a file of mode 0400. The helper binds it read-only at `/run/secrets` in the
//! workload's view; no other workload sees it (each has a private `/run`). Unmounted when the
//! workload goes.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use mesh_api::slice::SecretFile;
use nix::mount::{MntFlags, MsFlags, mount, umount2};

/// Where every workload's secrets are mounted on the host.
pub const ROOT: &str = "/run/meshd/secrets";

/// One workload's mounted secrets, unmounted on drop.
pub struct Secrets {
    dir: PathBuf,
}

impl Secrets {
    /// Mounts a tmpfs for namespace `ns`'s secrets, owned by `uid`:`gid`, and writes `files`
    /// into it. None when there are none.
    pub fn mount(ns: &str, files: &[SecretFile], uid: u32, gid: u32) -> io::Result<Option<Secrets>> {
        if files.is_empty() {
            return Ok(None);
        }
        remove(ns);
        fs::DirBuilder::new().recursive(true).mode(0o700).create(ROOT)?;
        let dir = Path::new(ROOT).join(ns);
        fs::DirBuilder::new().mode(0o700).create(&dir)?;
        let size: usize = files.iter().map(|f| f.data.len() + 4096).sum::<usize>() + 4096;
        let options = format!("mode=0500,uid={uid},gid={gid},size={size}");
        let flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        // Not swapped out where the kernel knows how (6.4 and later).
        let mounted =
            mount(Some("tmpfs"), &dir, Some("tmpfs"), flags, Some(format!("{options},noswap").as_str()))
                .or_else(|_| mount(Some("tmpfs"), &dir, Some("tmpfs"), flags, Some(options.as_str())));
        if let Err(e) = mounted {
            let _ = fs::remove_dir(&dir);
            return Err(io::Error::other(format!("mounting the secrets of {ns}: {e}")));
        }
        let secrets = Secrets { dir };
        for file in files {
            let path = secrets.dir.join(&file.name);
            let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o400).open(&path)?;
            f.write_all(&file.data)?;
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        Ok(Some(secrets))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Secrets {
    fn drop(&mut self) {
        unmount(&self.dir);
    }
}

fn unmount(dir: &Path) {
    let _ = umount2(dir, MntFlags::MNT_DETACH);
    let _ = fs::remove_dir(dir);
}

/// Removes what an earlier run left mounted for namespace `ns`.
pub fn remove(ns: &str) {
    let dir = Path::new(ROOT).join(ns);
    if dir.exists() {
        unmount(&dir);
    }
}
