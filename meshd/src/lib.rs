//! meshd, the per-host agent: joins the cluster, keeps the node's identity renewed, holds the
//! session with control, and runs the data plane (with its no-bypass filter), DNS and the mTLS
//! mesh that enforces the layer-7 policy.
#![forbid(unsafe_code)]

pub mod agent;
pub mod dataplane;
pub mod dns;
pub mod filter;
pub mod identity;
pub mod mesh;
pub mod session;
pub mod status;
pub mod workload;
