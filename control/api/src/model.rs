//! The domain types a node or an admin shares with the managers beyond IDs and keys: a node's
//! state and a service's ports.

use serde::{Deserialize, Serialize};

/// Whether a node may still act in the cluster. A removed node stays in the state so that its ID
/// is refused on every call (the denylist) and never issued again.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Active,
    Removed,
}

/// Protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// Opaque TCP: the mesh applies the L4 part of the policy when a connection opens.
    Tcp,
    Udp,
    /// TCP carrying HTTP/1.1 or HTTP/2 (gRPC included): the mesh decides on every request.
    Http,
}

impl Protocol {
    /// The transport under it: HTTP runs on TCP.
    pub fn transport(self) -> Protocol {
        match self {
            Protocol::Udp => Protocol::Udp,
            Protocol::Tcp | Protocol::Http => Protocol::Tcp,
        }
    }
}

/// A port a service listens on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PortSpec {
    pub port: u16,
    pub protocol: Protocol,
}
