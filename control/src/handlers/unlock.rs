//! A locked manager's one service: the unlock key, given on its own host through a Unix socket
//! in its state directory (the exchange is [`mesh_api::unlock`]'s). Nothing is served over the
//! network while locked: the manager's TLS key is sealed like the rest of its state.

use std::os::unix::fs::PermissionsExt;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::{info, warn};

use crate::raft::seal::UnlockKey;
use crate::statedir::{self, ClusterError, ManagerDir};
use mesh_api::files::FileError;
use mesh_api::unlock::{MAX_LINE, REFUSED, TIMEOUT, UNLOCKED};

/// Listens on the state directory's unlock socket until someone gives the key that opens this
/// manager's data key, which is returned (the socket is removed).
pub(crate) async fn serve(dir: &ManagerDir) -> Result<UnlockKey, ClusterError> {
    let path = dir.unlock_socket();
    // A socket left by a manager that stopped while locked.
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).map_err(|e| FileError::new("listening on", &path, e))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| FileError::new("restricting", &path, e))?;
    let _remove = RemoveOnDrop(path.clone());
    let mut backoff = mesh_api::accept::AcceptBackoff::default();
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => {
                backoff.reset();
                stream
            }
            Err(e) => {
                backoff.wait("the unlock socket", &e).await;
                continue;
            }
        };
        // One at a time, each bounded in time and size: whoever can reach the socket may
        // already read the state directory.
        match tokio::time::timeout(TIMEOUT, exchange(dir, stream)).await {
            Ok(Some(key)) => return Ok(key),
            Ok(None) => {}
            Err(_) => warn!("an unlock attempt timed out"),
        }
    }
}

/// One attempt: reads the key, answers, and returns it when it opens the data key.
async fn exchange(dir: &ManagerDir, stream: UnixStream) -> Option<UnlockKey> {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let read = BufReader::new(read).take(MAX_LINE as u64).read_line(&mut line).await;
    let (answer, key) = match read.map(|_| line.parse::<UnlockKey>()) {
        Err(e) => (format!("{REFUSED}{e}"), None),
        Ok(Err(e)) => (format!("{REFUSED}{e}"), None),
        Ok(Ok(key)) => match statedir::unlock_opens(dir, &key) {
            Ok(()) => (UNLOCKED.to_owned(), Some(key)),
            Err(e) => (format!("{REFUSED}{e}"), None),
        },
    };
    match &key {
        Some(_) => info!("unlocked"),
        None => warn!("unlock refused: {}", answer.trim_start_matches(REFUSED)),
    }
    let _ = write.write_all(format!("{answer}\n").as_bytes()).await;
    key
}

struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
