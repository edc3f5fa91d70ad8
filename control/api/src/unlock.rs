//! Unlocking a manager under autolock, on its own host. A locked manager holds nothing it could
//! serve TLS with (its key is sealed like the rest of its state), so it listens only on a Unix
//! socket in its state directory (0700, the socket 0600): whoever may open that directory (root,
//! or the manager's user) and knows the unlock key may unlock it, as `docker swarm unlock` talks
//! to its local daemon.
//!
//! The exchange is one line each way: the key, then `unlocked` or `refused: <why>`.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// The socket's name in the state directory.
pub const SOCKET: &str = "unlock.sock";
/// The longest line either side reads (an unlock key is 74 characters).
pub const MAX_LINE: usize = 256;
/// How long either side waits for the other.
pub const TIMEOUT: Duration = Duration::from_secs(10);
/// The manager's answer when the key opened its data key.
pub const UNLOCKED: &str = "unlocked";
/// The start of the manager's answer when it did not.
pub const REFUSED: &str = "refused: ";

#[derive(Debug, thiserror::Error)]
pub enum UnlockError {
    #[error(
        "no locked manager listens at {0}: it is not running, not locked, or that is not its state directory"
    )]
    NotLocked(String),
    #[error("talking to the manager at {path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error("the manager refused: {0}")]
    Refused(String),
    #[error("the manager did not answer within {0:?}")]
    Timeout(Duration),
    #[error("that is not an unlock key: it is `MESHKEY-1-` and 64 hex digits")]
    Malformed,
}

/// Gives `key` to the locked manager whose state directory is `state_dir`.
pub async fn unlock(state_dir: &Path, key: &str) -> Result<(), UnlockError> {
    let key = key.trim();
    if key.len() >= MAX_LINE || key.contains('\n') {
        return Err(UnlockError::Malformed);
    }
    let path = state_dir.join(SOCKET);
    let shown = path.display().to_string();
    let io = |error| UnlockError::Io { path: shown.clone(), error };
    let mut stream = match UnixStream::connect(&path).await {
        Ok(s) => s,
        Err(e)
            if matches!(e.kind(), std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused) =>
        {
            return Err(UnlockError::NotLocked(shown));
        }
        Err(e) => return Err(io(e)),
    };
    let exchange = async {
        stream.write_all(format!("{key}\n").as_bytes()).await?;
        let mut answer = String::new();
        let mut reader = BufReader::new(stream).take(MAX_LINE as u64);
        reader.read_line(&mut answer).await?;
        Ok::<_, std::io::Error>(answer)
    };
    let answer = tokio::time::timeout(TIMEOUT, exchange).await.map_err(|_| UnlockError::Timeout(TIMEOUT))?;
    let answer = answer.map_err(io)?;
    let answer = answer.trim();
    if answer == UNLOCKED {
        return Ok(());
    }
    Err(UnlockError::Refused(answer.strip_prefix(REFUSED).unwrap_or(answer).to_owned()))
}
