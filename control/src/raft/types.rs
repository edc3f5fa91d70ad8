//! The store's raft types: commands in, their outcome out.

use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::state::{Command, StateError};

openraft::declare_raft_types!(
    /// The store's raft types: commands in, their outcome out.
    pub TypeConfig:
        D = Command,
        R = Applied,
);

/// A raft node ID.
pub type RaftId = u64;
/// The raft handle.
pub type Raft = openraft::Raft<TypeConfig>;

/// The outcome of applying one log entry.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Applied(pub Result<(), StateError>);
