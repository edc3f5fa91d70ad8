//! What a node or an admin shares with the managers, and nothing else: the protobuf API
//! ([`proto`]) and its conversions, the slice model with its delta codec ([`slice`]), IDs,
//! tokens, overlay keys as a node receives them, certificate reading ([`pki`]), TLS
//! configurations, the client (leader discovery, the admin API, joining) and the admin bundle.
//!
//! No raft, storage, sealing or signing: `meshd` and `meshctl` depend on this crate, never on the
//! manager's.
#![forbid(unsafe_code)]

pub mod accept;
pub mod bundle;
pub mod client;
pub mod files;
pub mod ids;
pub mod join;
pub mod keys;
pub mod metrics_http;
pub mod model;
pub mod notify;
pub mod pki;
pub mod proto;
pub mod settings;
pub mod slice;
pub mod specs;
pub mod tls;
pub mod tokens;
pub mod trust;
pub mod unlock;

/// The wall clock in Unix milliseconds (0 before 1970, the last there is past `i64`).
pub fn unix_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
