//! The control plane: the cluster CA and identities, join tokens, the cluster state, and the
//! gRPC API (identity and admin) that nodes and `meshctl` call.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod ca;
pub mod client;
pub mod cluster;
pub mod dispatcher;
pub mod files;
pub mod ids;
pub mod ipam;
pub mod joining;
pub mod keys;
pub mod metrics;
pub mod orchestrator;
pub mod peers;
pub mod placement;
pub mod proto;
pub mod seal;
pub mod server;
pub mod slice;
pub mod state;
pub mod store;
pub mod tls;
pub mod tokens;
