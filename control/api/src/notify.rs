//! Telling systemd how the daemon is doing (`sd_notify(3)`, for `Type=notify` units): `READY=1`
//! once it serves, `STATUS=...` lines `systemctl status` shows, `STOPPING=1` on the way out. The
//! socket is the one `NOTIFY_SOCKET` names (a path, or `@name` in the abstract namespace); with
//! none, nothing is sent.

use std::ffi::OsString;
use std::os::unix::net::UnixDatagram;

/// Sends `state` (`READY=1`, `STATUS=...`, newline-separated assignments) to the socket
/// `NOTIFY_SOCKET` names; whether one was named.
pub fn notify(state: &str) -> std::io::Result<bool> {
    notify_to(std::env::var_os("NOTIFY_SOCKET"), state)
}

/// [`notify`] to `socket`, the value `NOTIFY_SOCKET` would have.
pub fn notify_to(socket: Option<OsString>, state: &str) -> std::io::Result<bool> {
    let Some(socket) = socket.filter(|s| !s.is_empty()) else { return Ok(false) };
    let sender = UnixDatagram::unbound()?;
    let bytes = socket.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        sender.send_to_addr(state.as_bytes(), &address)?;
    } else {
        sender.send_to(state.as_bytes(), std::path::Path::new(&socket))?;
    }
    Ok(true)
}

/// SIGTERM and SIGINT, caught from the moment this is made: a stop that comes early (systemd's,
/// right after `READY=1`) is kept until the daemon waits for it, rather than killing it outright
/// with nothing cleaned up.
pub struct Stop {
    term: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl Stop {
    /// Catches both signals from now on (in a Tokio runtime).
    pub fn catch() -> std::io::Result<Stop> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Stop { term: signal(SignalKind::terminate())?, interrupt: signal(SignalKind::interrupt())? })
    }

    /// Completes once either came (at once if one came already).
    pub async fn wait(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.interrupt.recv() => {}
        }
    }
}

/// [`notify`], logging (not failing on) an error: a daemon runs on whether or not systemd hears.
pub fn tell(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "cannot notify systemd (NOTIFY_SOCKET)");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_reach_the_socket_named_by_path_or_abstract_name() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        assert!(notify_to(Some(path.clone().into()), "READY=1\nSTATUS=serving").unwrap());
        let mut buffer = [0; 256];
        let n = listener.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"READY=1\nSTATUS=serving");

        use std::os::linux::net::SocketAddrExt;
        let name = format!("mesh-notify-test-{}", std::process::id());
        let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let abstract_listener = UnixDatagram::bind_addr(&address).unwrap();
        assert!(notify_to(Some(format!("@{name}").into()), "STOPPING=1").unwrap());
        let n = abstract_listener.recv(&mut buffer).unwrap();
        assert_eq!(&buffer[..n], b"STOPPING=1");

        // None named: nothing sent, no error; one named and absent: an error.
        assert!(!notify_to(None, "READY=1").unwrap());
        assert!(!notify_to(Some(OsString::new()), "READY=1").unwrap());
        assert!(notify_to(Some(dir.path().join("gone").into()), "READY=1").is_err());
    }
}
