//! meshd, the per-host agent: joins the cluster, keeps the node's identity renewed, and (in later
//! issues) holds the session with control, the data plane, DNS and the mTLS proxy.
#![forbid(unsafe_code)]

pub mod agent;
pub mod dataplane;
pub mod dns;
pub mod identity;
pub mod session;
pub mod status;
pub mod workload;
