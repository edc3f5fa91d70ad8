//! The gRPC services nodes and admins call: identity (CA fetch, join, renewal), admin, the
//! managers' own (where the leader is, adding a manager, unlocking) and raft between managers.
//! (The dispatcher's session service lives with the dispatcher.)

pub mod admin;
pub mod identity;
pub mod managers;
pub mod raft;

use tonic::Status;
use tracing::warn;

/// An unexpected failure, logged and reported without detail a caller could act on.
pub(crate) fn internal(e: impl std::fmt::Display) -> Status {
    warn!(error = %e, "internal error");
    Status::internal(e.to_string())
}
