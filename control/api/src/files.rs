//! Writing state files safely: atomically (a crash leaves the old file or the new one, never a
//! torn one) and, for secrets, readable by the owner only.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of files holding keys, tokens or cluster state.
pub const SECRET: u32 = 0o600;
/// Mode of files anyone on the host may read (certificates).
pub const PUBLIC: u32 = 0o644;

/// An I/O error with the path it happened on.
#[derive(Debug, thiserror::Error)]
#[error("{action} {path}: {error}")]
pub struct FileError {
    pub action: &'static str,
    pub path: PathBuf,
    pub error: io::Error,
}

impl FileError {
    pub fn new(action: &'static str, path: &Path, error: io::Error) -> FileError {
        FileError { action, path: path.to_owned(), error }
    }
}

/// Writes `contents` to `path` through a temporary file in the same directory, with `mode`, then
/// renames it into place and syncs the directory.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32) -> Result<(), FileError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp"));
    let write = || -> io::Result<()> {
        let _ = fs::remove_file(&tmp);
        let mut file = OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        // The umask may have narrowed the mode; set it exactly.
        file.set_permissions(fs::Permissions::from_mode(mode))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|e| FileError::new("writing", path, e))
}

/// Reads a UTF-8 file, naming the path on error.
pub fn read_string(path: &Path) -> Result<String, FileError> {
    fs::read_to_string(path).map_err(|e| FileError::new("reading", path, e))
}

/// Creates `dir` (and parents) with mode 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), FileError> {
    fs::create_dir_all(dir).map_err(|e| FileError::new("creating", dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| FileError::new("setting the mode of", dir, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_written_0600_and_replaced_whole() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_atomic(&path, b"one", SECRET).unwrap();
        write_atomic(&path, b"two", SECRET).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1, "no temporary file left");
    }
}
