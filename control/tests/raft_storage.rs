//! openraft's own storage test suite, run against the store: the sealed redb log and the
//! cluster state machine.

use std::time::Duration;

use control::ids::ClusterId;
use control::seal::DataKey;
use control::state::ClusterState;
use control::store::{LogStore, StateMachine, TypeConfig, open_storage};
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
