//! meshd, the per-host agent: joins the cluster, keeps the node's identities renewed, holds the
//! session with control, and fans each slice out to the overlay (`tun`'s data plane), the
//! workloads, their DNS and the mTLS mesh that enforces the layer-7 policy.
//!
//! ```text
//!  main ──► config, agent, identity, status
//!  agent (the composition root) ──► everything below
//!  reconciler ──► workload ──► netns, dns, overlay, mesh
//!  overlay ──► mesh (its view is the filter's word), tun::io
//!  mesh ──► identity, netns, metrics        status ──► identity
//!  session ──► identity ──► backoff, metrics        netns ──► dns
//!  config ──► dns, identity, session
//! ```
//!
//! Every arrow points one way: no module reaches back to one that uses it.
#![forbid(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod check;
pub mod config;
pub mod dns;
pub mod endpoints;
pub mod identity;
pub mod mesh;
pub mod metrics;
pub mod netns;
pub mod overlay;
pub mod ping;
pub mod reconciler;
pub mod sandbox;
pub mod session;
pub mod status;
pub mod wireguard;
pub mod workload;
