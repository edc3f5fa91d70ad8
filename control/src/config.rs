//! Every default of the manager in one place, and how a manager runs ([`ManagerOptions`]). The
//! command line reads these constants for its defaults; nothing else spells a default out.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::Duration;

pub use mesh_api::accept::Quota;

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

/// Lifetime of an admin credential unless told otherwise: a person's, reissued with `meshctl
/// cluster admin issue` before it runs out.
pub const DEFAULT_ADMIN_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// The lifetimes an admin credential may have.
pub const ADMIN_CERT_LIFETIME_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(600)..=Duration::from_secs(31_557_600);

/// The values `meshctl cluster update` accepts for each setting.
/// (A year is 365.25 days, as humantime counts it.)
pub const CERT_LIFETIME_RANGE: std::ops::RangeInclusive<Duration> =
    MIN_CERT_LIFETIME..=Duration::from_secs(31_557_600);
/// See [`CERT_LIFETIME_RANGE`].
pub const KEY_ROTATION_RANGE: std::ops::RangeInclusive<Duration> =
    MIN_KEY_ROTATION..=Duration::from_secs(30 * 24 * 3600);
/// See [`CERT_LIFETIME_RANGE`].
pub const WORKLOAD_CERT_LIFETIME_RANGE: std::ops::RangeInclusive<Duration> =
    MIN_WORKLOAD_CERT_LIFETIME..=mesh_api::pki::MAX_WORKLOAD_CERT_LIFETIME;
/// See [`CERT_LIFETIME_RANGE`].
pub const DOWN_AFTER_RANGE: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

/// How the manager runs: the cluster-wide settings, as this process was told them on its command
/// line. Settings an admin stored in the cluster state (`meshctl cluster update`) take their
/// place, whichever manager leads.
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

/// The control port's connection limits: enough for thousands of nodes, their renewals and
/// reconnects after a failover, while a flood of connections that prove nothing holds at most
/// a few hundred sockets and no more memory than their TLS state.
pub const CONNECTION_LIMITS: Limits = Limits {
    handshaking: Quota { total: 512, per_source: 64 },
    anonymous: Quota { total: 256, per_source: 16 },
    authenticated: Quota { total: 16_384, per_source: 16_384 },
    handshake_timeout: Duration::from_secs(10),
    anonymous_lifetime: Duration::from_secs(30),
    idle: Duration::from_secs(60),
};
/// How many times a node may renew its certificate within [`RENEWAL_WINDOW`]: meshd renews once
/// per half lifetime (an hour at least), so this only ever stops a node that makes managers sign
/// and replicate in a loop.
pub const RENEWALS_PER_WINDOW: usize = 3;
/// See [`RENEWALS_PER_WINDOW`].
pub const RENEWAL_WINDOW: Duration = Duration::from_secs(600);
/// Concurrent gRPC streams on one control connection.
pub const MAX_STREAMS_PER_CONNECTION: u32 = 64;
/// The largest request a caller without a client certificate may send (a join: a CSR, a token
/// and a host name).
pub const MAX_ANONYMOUS_MESSAGE: usize = 16 << 10;
/// The largest request of a node or an admin (a policy file is the largest).
pub const MAX_MESSAGE: usize = 4 << 20;
/// The largest HTTP/2 header block accepted.
pub const MAX_HEADER_LIST: u32 = 16 << 10;

/// The control port's limits, so that nobody can exhaust a manager's memory or file descriptors
/// before proving who they are ([`CONNECTION_LIMITS`]).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections still in their TLS handshake.
    pub handshaking: Quota,
    /// Connections without a client certificate (only the join path answers them).
    pub anonymous: Quota,
    /// Connections with a certificate of this cluster's CA.
    pub authenticated: Quota,
    /// How long a client has to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// How long a connection without a certificate may stay open at all.
    pub anonymous_lifetime: Duration,
    /// How long any connection may go without sending a byte (clients ping every few seconds).
    pub idle: Duration,
}
