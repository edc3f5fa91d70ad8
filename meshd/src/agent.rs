//! The long-running node agent: it keeps the node's identity alive (renewing the certificate at
//! a random point between 50 % and 80 % of its lifetime, retrying with exponential backoff),
//! holds the session with control, and answers `meshd status`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;

use time::OffsetDateTime;
use tracing::{error, info, warn};

use crate::dataplane::Dataplane;
use crate::identity::{self, IdentityError, NodeDir};
use crate::session::{self, SessionConfig, SessionError, SessionEvent};
use crate::status::{self, Status};

/// First retry delay after a failed renewal.
pub const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const RETRY_MAX: Duration = Duration::from_secs(300);

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("the node certificate expired at {0} before it could be renewed; the node must join again")]
    Expired(OffsetDateTime),
    #[error("control refused this node: {0}")]
    Refused(IdentityError),
    #[error(transparent)]
    Session(#[from] SessionError),
    #[error("the status socket failed: {0}")]
    Status(String),
    #[error("data plane: {0}")]
    Dataplane(String),
}

/// The delay before retry number `attempt` (0-based): doubling from [`RETRY_MIN`] up to
/// [`RETRY_MAX`], with up to 25 % random jitter.
pub fn backoff(attempt: u32) -> Duration {
    let base = RETRY_MIN.saturating_mul(1u32 << attempt.min(16)).min(RETRY_MAX);
    let jitter = rand::random_range(0.0..0.25);
    base.mul_f64(1.0 + jitter).min(RETRY_MAX)
}

/// How the agent runs.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub session: SessionConfig,
    /// Prefix of the workload namespaces (unique per meshd on a machine).
    pub netns_prefix: String,
    /// Whether to run the data plane (namespaces, tun devices, the underlay socket; needs root).
    pub dataplane: bool,
    /// Which services workloads' DNS shows.
    pub dns_visibility: crate::dns::Visibility,
    /// Where to serve Prometheus metrics, if anywhere (with the data plane only).
    pub metrics: Option<std::net::SocketAddr>,
}

/// The next boot number, stored (and synced) before it is used: part of every nonce's counter,
/// so a restarted meshd never repeats one (see the `tun` crate docs).
pub fn next_boot(dir: &Path) -> Result<u16, AgentError> {
    let path = dir.join("boot");
    let last: u16 = std::fs::read_to_string(&path).ok().and_then(|s| s.trim().parse().ok()).unwrap_or(0);
    let next = last.checked_add(1).ok_or_else(|| {
        AgentError::Dataplane(format!("{} is spent (65535 starts): join this node again", path.display()))
    })?;
    mesh_api::files::write_atomic(&path, format!("{next}\n").as_bytes(), mesh_api::files::SECRET)
        .map_err(|e| AgentError::Dataplane(e.to_string()))?;
    Ok(next)
}

/// Runs the agent until an unrecoverable error: renewal, the session, the data plane, status.
pub async fn run(agent: AgentConfig) -> Result<(), AgentError> {
    let config = agent.session.clone();
    let dir = config.state_dir.clone();
    let node = NodeDir::new(&dir).load()?;
    let status = Arc::new(Mutex::new(Status {
        node: node.id.to_string(),
        control: node.managers.join(","),
        underlay: config.underlay.to_string(),
        ..Status::default()
    }));
    let dataplane = if agent.dataplane {
        let boot = next_boot(&dir)?;
        let dp = Dataplane::start(
            &dir,
            config.underlay,
            &agent.netns_prefix,
            boot,
            agent.dns_visibility,
            agent.metrics,
        )
        .await
        .map_err(|e| {
            AgentError::Dataplane(format!("cannot start the data plane on {}: {e}", config.underlay))
        })?;
        Some(Arc::new(dp))
    } else {
        None
    };
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let holder = status.clone();
    let plane = dataplane.clone();
    let follow = async move {
        while let Some(event) = events.recv().await {
            if let (SessionEvent::Slice(slice), Some(dp)) = (&event, &plane) {
                dp.apply(slice).await;
            }
            let mut status = holder.lock().expect("lock");
            if let Some(dp) = &plane {
                status.counters = Some(dp.counters.clone());
                status.certificates = Some(dp.certificates.clone());
            }
            match event {
                SessionEvent::Connected => {
                    status.connected = true;
                    status.last_error = None;
                }
                SessionEvent::Disconnected(why) => {
                    status.connected = false;
                    status.last_error = Some(why);
                }
                SessionEvent::Slice(slice) => status.apply(&slice),
            }
        }
    };
    let result = tokio::select! {
        result = keep_identity(&dir) => result,
        refused = session::run(config.clone(), events_tx) => Err(AgentError::Session(refused)),
        served = status::serve(&dir, status.clone()) => Err(AgentError::Status(served.err().map_or_else(|| "stopped".into(), |e| e.to_string()))),
        _ = follow => Ok(()),
        _ = shutdown_signal() => Ok(()),
    };
    if let Some(dp) = dataplane {
        dp.shutdown().await;
    }
    result
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    info!("shutting down");
}

/// Keeps the identity in `dir` renewed until an unrecoverable error.
pub async fn keep_identity(dir: &Path) -> Result<(), AgentError> {
    let node_dir = NodeDir::new(dir);
    let mut current = node_dir.load()?;
    info!(
        node = %current.id,
        role = %current.info.unit,
        managers = %current.managers.join(","),
        cert_expires = %current.info.not_after,
        "meshd running"
    );
    loop {
        let delay = identity::renewal_delay(
            current.info.not_before,
            current.info.not_after,
            OffsetDateTime::now_utc(),
            &mut rand::rng(),
        );
        info!(node = %current.id, in_secs = delay.as_secs(), "next certificate renewal scheduled");
        tokio::time::sleep(delay).await;
        let mut attempt = 0;
        current = loop {
            if OffsetDateTime::now_utc() >= current.info.not_after {
                error!(node = %current.id, "certificate expired before renewal succeeded");
                return Err(AgentError::Expired(current.info.not_after));
            }
            match identity::renew(dir).await {
                Ok(renewed) => {
                    info!(node = %renewed.id, cert_expires = %renewed.info.not_after, "certificate renewed");
                    break renewed;
                }
                Err(IdentityError::Client(e)) if e.code() == Some(tonic::Code::PermissionDenied) => {
                    error!(node = %current.id, error = %e, "control refuses this node");
                    return Err(AgentError::Refused(IdentityError::Client(e)));
                }
                Err(e) => {
                    let wait = backoff(attempt);
                    warn!(node = %current.id, error = %e, retry_in_ms = wait.as_millis() as u64, "renewal failed");
                    tokio::time::sleep(wait).await;
                    attempt += 1;
                }
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        for attempt in 0..40 {
            let d = backoff(attempt);
            let base = RETRY_MIN.saturating_mul(1u32 << attempt.min(16)).min(RETRY_MAX);
            assert!(d >= base && d <= RETRY_MAX && d <= base.mul_f64(1.25), "{attempt}: {d:?}");
        }
        assert_eq!(backoff(30), RETRY_MAX);
    }
}
