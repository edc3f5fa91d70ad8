//! The replicated store: the cluster state machine behind openraft ([`types`]), its log, vote and
//! snapshots in a redb file sealed at rest ([`store`], [`seal`]), and raft between managers, both
//! the sending and the receiving side ([`network`]).

pub mod network;
pub mod seal;
pub mod store;
pub mod types;
