//! The gRPC services nodes and admins call: identity (CA fetch, join, renewal) and admin.
//! (The dispatcher's session service lives with the dispatcher.)

pub mod admin;
pub mod identity;

use tonic::Status;
use tracing::warn;

/// An unexpected failure, logged and reported without detail a caller could act on.
pub(crate) fn internal(e: impl std::fmt::Display) -> Status {
    warn!(error = %e, "internal error");
    Status::internal(e.to_string())
}
