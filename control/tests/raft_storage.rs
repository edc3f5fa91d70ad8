//! openraft's own storage test suite, run against the store: the sealed redb log and the
//! cluster state machine.

use std::time::Duration;

use control::raft::seal::DataKey;
use control::raft::store::{LogStore, StateMachine, open_storage};
use control::raft::types::TypeConfig;
use control::state::ClusterState;
use mesh_api::ids::ClusterId;
use openraft::StorageError;
use openraft::testing::{StoreBuilder, Suite};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let initial = ClusterState::new(ClusterId::random(), Duration::from_secs(3600));
        let (log, sm) = open_storage(&dir.path().join("store.redb"), DataKey::generate(), initial)
            .unwrap_or_else(|e| panic!("opening the store: {e}"));
        Ok((dir, log, sm))
    }
}

#[test]
fn openraft_storage_suite_passes() {
    Suite::test_all(Builder).expect("openraft storage suite");
}
