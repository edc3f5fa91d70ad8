//! The gRPC services nodes and admins call: identity (CA fetch, join, renewal), admin, the
//! managers' own (where the leader is, adding a manager) and each node's session; and, on a
//! locked manager, the local unlock socket. (Raft between managers is
//! [`crate::raft::network`]'s.) Only [`crate::serve`] builds them.

pub mod admin;
pub mod gate;
pub mod identity;
pub mod managers;
pub mod session;
pub mod unlock;

use tonic::Status;
use tracing::warn;

/// An unexpected failure, logged and reported without detail a caller could act on.
pub(crate) fn internal(e: impl std::fmt::Display) -> Status {
    warn!(error = %e, "internal error");
    Status::internal(e.to_string())
}
