//! Every default of the manager in one place, and how a manager runs ([`ManagerOptions`]). The
//! command line reads these constants for its defaults; nothing else spells a default out.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

/// The port the control API (and raft between managers) listens on unless told otherwise.
pub const DEFAULT_CONTROL_PORT: u16 = mesh_api::client::DEFAULT_CONTROL_PORT;
/// Where the control API listens unless told otherwise.
pub const DEFAULT_LISTEN: SocketAddr =
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, DEFAULT_CONTROL_PORT));
/// Node certificate lifetime unless told otherwise.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The shortest node certificate lifetime allowed.
pub const MIN_CERT_LIFETIME: Duration = Duration::from_secs(3600);
/// Network key rotation interval unless told otherwise.
pub const DEFAULT_KEY_ROTATION: Duration = Duration::from_secs(12 * 3600);
/// The shortest key rotation interval allowed.
pub const MIN_KEY_ROTATION: Duration = Duration::from_secs(1);
/// How long a node may be without a session before its endpoints move elsewhere.
pub const DEFAULT_DOWN_AFTER: Duration = Duration::from_secs(15);
/// Lifetime of workload certificates unless told otherwise (meshd renews them at half of it).
pub const DEFAULT_WORKLOAD_CERT_LIFETIME: Duration = Duration::from_secs(3600);
/// The shortest workload certificate lifetime allowed (the longest is
/// [`mesh_api::pki::MAX_WORKLOAD_CERT_LIFETIME`]).
pub const MIN_WORKLOAD_CERT_LIFETIME: Duration = Duration::from_secs(60);
/// Where a manager serves its metrics unless told otherwise (meshd's port plus one, so both fit
/// on one host).
pub const DEFAULT_METRICS_ADDR: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 9481));

/// How the manager runs.
#[derive(Clone, Debug)]
pub struct ManagerOptions {
    pub key_rotation: Duration,
    pub down_after: Duration,
    /// Lifetime of workload certificates.
    pub workload_cert_lifetime: Duration,
}

impl Default for ManagerOptions {
    fn default() -> Self {
        ManagerOptions {
            key_rotation: DEFAULT_KEY_ROTATION,
            down_after: DEFAULT_DOWN_AFTER,
            workload_cert_lifetime: DEFAULT_WORKLOAD_CERT_LIFETIME,
        }
    }
}
