//! Persistence of the cluster state: every change goes through [`Store::apply`] as a
//! [`Command`], and is on disk, encrypted at rest, before `apply` returns.
//!
//! The state is written as one snapshot sealed with AES-256-GCM under the data key
//! ([`crate::seal`]); no key material is readable in the files.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use tokio::sync::watch;

use crate::files::{self, FileError};
use crate::seal::{DataKey, SealError};
use crate::state::{ClusterState, Command, StateError};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("the cluster state in {path} cannot be read: {error}")]
    Corrupt { path: PathBuf, error: String },
    #[error(transparent)]
    Seal(#[from] SealError),
}

/// The state machine and where it is persisted.
pub struct Store {
    path: PathBuf,
    key: DataKey,
    state: Mutex<ClusterState>,
    revision: watch::Sender<u64>,
}

impl Store {
    /// Creates the store file with `state`.
    pub fn create(path: &Path, key: DataKey, state: ClusterState) -> Result<Store, StoreError> {
        let store = Store::with(path, key, state);
        store.persist(&store.state.lock().expect("store lock"))?;
        Ok(store)
    }

    pub fn open(path: &Path, key: DataKey) -> Result<Store, StoreError> {
        let sealed = std::fs::read(path).map_err(|e| FileError::new("reading", path, e))?;
        let plain = key.open(&sealed, b"cluster-state")?;
        let state = serde_json::from_slice(&plain)
            .map_err(|e| StoreError::Corrupt { path: path.to_owned(), error: e.to_string() })?;
        Ok(Store::with(path, key, state))
    }

    fn with(path: &Path, key: DataKey, state: ClusterState) -> Store {
        let (revision, _) = watch::channel(state.revision);
        Store { path: path.to_owned(), key, state: Mutex::new(state), revision }
    }

    /// Applies `command`; on error the state is unchanged. The change is on disk before this returns.
    pub fn apply(&self, command: Command) -> Result<(), StoreError> {
        let mut state = self.state.lock().expect("store lock");
        let mut next = state.clone();
        next.apply(command)?;
        self.persist(&next)?;
        *state = next;
        self.revision.send_replace(state.revision);
        Ok(())
    }

    /// Applies `commands` in order, all or nothing.
    pub fn apply_all(&self, commands: Vec<Command>) -> Result<(), StoreError> {
        let mut state = self.state.lock().expect("store lock");
        let mut next = state.clone();
        for command in commands {
            next.apply(command)?;
        }
        self.persist(&next)?;
        *state = next;
        self.revision.send_replace(state.revision);
        Ok(())
    }

    /// Reads the state.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.state.lock().expect("store lock"))
    }

    /// Changes whenever the state does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.revision.subscribe()
    }

    fn persist(&self, state: &ClusterState) -> Result<(), StoreError> {
        let json = serde_json::to_vec(state).expect("state serializes");
        files::write_atomic(&self.path, &self.key.seal(&json, b"cluster-state"), files::SECRET)?;
        Ok(())
    }
}
