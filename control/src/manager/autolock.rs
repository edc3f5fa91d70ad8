//! Autolock: this manager's data key file follows the unlock key in the replicated state,
//! wrapped by it, or in the clear when autolock is off. Every new unlock key (autolock turned on,
//! or the key rotated) comes with a fresh data key that the whole store is sealed again under,
//! so a copy of an earlier data key file, with the unlock key of its time, opens nothing.

use std::sync::Arc;
use std::time::Duration;

use tracing::{info, warn};

use super::Manager;
use crate::raft::seal::{DataKey, UnlockKey};
use crate::statedir;

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
                    Ok(Some(unlock)) => match self.rekey(&unlock) {
                        Ok(()) => {
                            info!(
                                "sealed the store under a fresh data key, wrapped by the unlock key in force"
                            );
                            current = wanted;
                        }
                        Err(e) => {
                            warn!(error = %e, "sealing the store under a fresh data key failed; will retry")
                        }
                    },
                    Ok(None) => {
                        let key = self.data_key.lock().expect("lock").clone();
                        match self.dir.write_data_key(&key, None) {
                            Ok(()) => {
                                info!("autolock is off: the data key file is in the clear (0600)");
                                current = wanted;
                            }
                            Err(e) => warn!(error = %e, "rewriting the data key file failed; will retry"),
                        }
                    }
                    Err(e) => warn!(error = %e, "the unlock key in the state is malformed"),
                }
            }
            if revisions.changed().await.is_err() {
                return;
            }
        }
    }

    /// A fresh data key for `unlock`: written wrapped beside the current file first, with the
    /// manager key sealed by it beside its file, then the store sealed under it in one
    /// transaction, then both put in place. A crash in between leaves the new ones in
    /// `data.key.next` and `manager.key.next`, which opening tries.
    fn rekey(&self, unlock: &UnlockKey) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        // Held throughout: a renewal of the manager's certificate waits, then seals its new key
        // under the fresh data key.
        let mut current = self.data_key.lock().expect("lock");
        let identity = statedir::open_identity(&self.dir, &current)?;
        let fresh = DataKey::generate();
        let next = self.dir.data_key_next();
        fresh.save(&next, Some(unlock))?;
        self.dir.write_manager_key_next(&identity, &fresh)?;
        self.store.rekey(fresh.clone())?;
        // The store is under the fresh key from here on, whatever happens to the renames (a
        // retry finds the manager key beside its file, as opening does).
        *current = fresh;
        self.dir.commit_manager_key_next()?;
        std::fs::rename(&next, self.dir.data_key())?;
        Ok(())
    }
}
