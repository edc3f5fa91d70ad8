//! Autolock: this manager's data key file follows the unlock key in the replicated state,
//! wrapped by it, or in the clear when autolock is off.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::Manager;
use crate::raft::seal::UnlockKey;

impl Manager {
    /// Keeps this manager's data key file wrapped by the unlock key in force, or in the clear
    /// when autolock is off. `opened_with` is how the file was when the manager started.
    pub(crate) async fn follow_autolock(self: Arc<Self>, opened_with: Option<String>) {
        // The state read at start may predate entries still being re-applied from the log.
        let last = self.store.raft().metrics().borrow().last_log_index;
        let _ = self
            .store
            .raft()
            .wait(Some(Duration::from_secs(10)))
            .applied_index_at_least(last, "caught up")
            .await;
        let mut revisions = self.store.subscribe();
        let mut current = opened_with;
        loop {
            let wanted = self.store.read(|s| s.unlock_key.as_ref().map(|k| k.0.clone()));
            if wanted != current {
                match wanted.as_deref().map(str::parse::<UnlockKey>).transpose() {
                    Ok(unlock) => match self.dir.write_data_key(&self.data_key, unlock.as_ref()) {
                        Ok(()) => {
                            info!(autolock = unlock.is_some(), "rewrote the data key file");
                            current = wanted;
                        }
                        Err(e) => warn!(error = %e, "rewriting the data key file failed; will retry"),
                    },
                    Err(e) => warn!(error = %e, "the unlock key in the state is malformed"),
                }
            }
            if revisions.changed().await.is_err() {
                return;
            }
        }
    }
}
