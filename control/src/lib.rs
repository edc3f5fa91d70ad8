//! The manager: the cluster CA ([`ca`]), the replicated state machine ([`state`] behind
//! [`raft`]), plans ([`plans`]: pure functions from the state to the commands of a change, built
//! on [`planning`]), the running manager ([`manager`]), the slicer that
//! computes what each node may know ([`slicer`]), the gRPC handlers ([`handlers`]) and the one
//! composition root that wires them ([`serve`]). What nodes and admins share with it is the
//! `mesh-api` crate; `meshd` and `meshctl` never link this one.
//!
//! ```text
//! bin/mesh-control ──▶ serve ──▶ handlers ──▶ manager ──▶ plans, slicer ──▶ state ──▶ planning
//!                                    │            └──────▶ raft (store, network, seal)
//!                                    └──▶ auth, ca
//! ```
#![forbid(unsafe_code)]

pub mod auth;
pub mod ca;
pub mod config;
pub mod handlers;
pub mod manager;
pub mod metrics;
pub mod planning;
pub mod plans;
pub mod raft;
pub mod serve;
pub mod slicer;
pub mod state;
pub mod statedir;
