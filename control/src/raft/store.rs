//! The replicated cluster store: the [`ClusterState`] machine behind openraft, its log, vote and
//! snapshots kept in a redb file, every value sealed with AES-256-GCM under the data key so no
//! key material (nor any other state) is readable on disk.
//!
//! One manager is a single-voter cluster; more managers join as voters ([`super::network`] carries
//! raft between them). Every change is one log entry ([`Command::Batch`] for a plan of several
//! commands), applied all or nothing, and only the leader makes them.

// openraft's storage traits fix the error type (`StorageError`, large); helpers return it too.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, ChangeMembers, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    SnapshotMeta, StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::warn;

use super::network::Peers;
use super::seal::{DataKey, SealError};
use crate::state::{ClusterState, Command, StateError};

use super::types::{Applied, Raft, RaftId, TypeConfig};
use openraft::error::{ChangeMembershipError, ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;

const LOGS: TableDefinition<u64, &[u8]> = TableDefinition::new("logs");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");

const VOTE: &str = "vote";
const COMMITTED: &str = "committed";
const PURGED: &str = "last_purged";
const SNAPSHOT: &str = "snapshot";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("the cluster store at {path} cannot be opened: {error}")]
    Open { path: String, error: String },
    #[error("the cluster store failed: {0}")]
    Raft(String),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("this manager does not lead the cluster{}", leader.as_ref().map(|l| format!("; the leader is at {l}")).unwrap_or_else(|| "; no leader is elected now".into()))]
    NotLeader { leader: Option<String> },
    #[error("the change was not confirmed within {}: a majority of the managers cannot be reached", humantime::format_duration(*.0))]
    NoQuorum(Duration),
}

fn io_err<E: std::fmt::Display>(e: E) -> StorageError<RaftId> {
    StorageIOError::<RaftId>::write(anyerror::AnyError::error(e.to_string())).into()
}

/// The redb file and the key that seals what is in it (replaced whole by [`Disk::rekey`]).
#[derive(Clone)]
struct Disk {
    db: Arc<Database>,
    key: Arc<RwLock<DataKey>>,
}

impl Disk {
    fn open(path: &Path, key: DataKey) -> Result<Disk, StoreError> {
        // Created owner-only before redb initializes it (redb takes an empty file as new).
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(mesh_api::files::SECRET)
            .open(path)
            .map_err(|e| StoreError::Open { path: path.display().to_string(), error: e.to_string() })?;
        let db = Database::create(path)
            .map_err(|e| StoreError::Open { path: path.display().to_string(), error: e.to_string() })?;
        let txn = db
            .begin_write()
            .map_err(|e| StoreError::Open { path: path.display().to_string(), error: e.to_string() })?;
        {
            let open = |e: redb::TableError| StoreError::Open {
                path: path.display().to_string(),
                error: e.to_string(),
            };
            txn.open_table(LOGS).map_err(open)?;
            txn.open_table(META).map_err(open)?;
        }
        txn.commit()
            .map_err(|e| StoreError::Open { path: path.display().to_string(), error: e.to_string() })?;
        Ok(Disk { db: Arc::new(db), key: Arc::new(RwLock::new(key)) })
    }

    /// Seals everything in the file again under `fresh`, in one transaction, and uses it from
    /// then on: a copy of the old data key opens nothing written before or after.
    fn rekey(&self, fresh: DataKey) -> Result<(), StorageError<RaftId>> {
        // The write transaction first, then the key: every writer takes them in that order (it
        // seals under its transaction), so none waits for the other while holding what it needs.
        let txn = self.db.begin_write().map_err(io_err)?;
        // Held for writing until the end: nothing is sealed or read under either key meanwhile.
        let mut key = self.key.write().expect("lock");
        {
            let mut logs = txn.open_table(LOGS).map_err(io_err)?;
            let sealed: Vec<(u64, Vec<u8>)> = logs
                .iter()
                .map_err(io_err)?
                .map(|item| item.map(|(k, v)| (k.value(), v.value().to_vec())))
                .collect::<Result<_, _>>()
                .map_err(io_err)?;
            for (index, blob) in sealed {
                let plain = key.open(&blob, b"raft-log").map_err(io_err)?;
                logs.insert(index, fresh.seal(&plain, b"raft-log").as_slice()).map_err(io_err)?;
            }
            let mut meta = txn.open_table(META).map_err(io_err)?;
            let sealed: Vec<(String, Vec<u8>)> = meta
                .iter()
                .map_err(io_err)?
                .map(|item| item.map(|(k, v)| (k.value().to_owned(), v.value().to_vec())))
                .collect::<Result<_, _>>()
                .map_err(io_err)?;
            for (name, blob) in sealed {
                let plain = key.open(&blob, name.as_bytes()).map_err(io_err)?;
                meta.insert(name.as_str(), fresh.seal(&plain, name.as_bytes()).as_slice()).map_err(io_err)?;
            }
        }
        txn.commit().map_err(io_err)?;
        *key = fresh;
        Ok(())
    }

    fn seal<T: Serialize>(&self, value: &T, purpose: &str) -> Vec<u8> {
        self.key
            .read()
            .expect("lock")
            .seal(&serde_json::to_vec(value).expect("serializes"), purpose.as_bytes())
    }

    fn unseal<T: for<'de> Deserialize<'de>>(
        &self,
        blob: &[u8],
        purpose: &str,
    ) -> Result<T, StorageError<RaftId>> {
        let plain = self.key.read().expect("lock").open(blob, purpose.as_bytes()).map_err(io_err)?;
        serde_json::from_slice(&plain).map_err(io_err)
    }

    fn get_meta<T: for<'de> Deserialize<'de>>(&self, name: &str) -> Result<Option<T>, StorageError<RaftId>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(META).map_err(io_err)?;
        match table.get(name).map_err(io_err)? {
            Some(v) => Ok(Some(self.unseal(v.value(), name)?)),
            None => Ok(None),
        }
    }

    fn put_meta<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StorageError<RaftId>> {
        let txn = self.db.begin_write().map_err(io_err)?;
        txn.open_table(META)
            .map_err(io_err)?
            .insert(name, self.seal(value, name).as_slice())
            .map_err(io_err)?;
        txn.commit().map_err(io_err)
    }

    fn entries(&self, range: impl RangeBounds<u64>) -> Result<Vec<Entry<TypeConfig>>, StorageError<RaftId>> {
        let txn = self.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(LOGS).map_err(io_err)?;
        let mut out = Vec::new();
        for item in table.range(range).map_err(io_err)? {
            let (_, v) = item.map_err(io_err)?;
            out.push(self.unseal(v.value(), "raft-log")?);
        }
        Ok(out)
    }
}

/// The log half of the store.
#[derive(Clone)]
pub struct LogStore {
    disk: Disk,
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<RaftId>> {
        self.disk.entries(range)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<RaftId>> {
        let last_purged_log_id: Option<LogId<RaftId>> = self.disk.get_meta(PURGED)?;
        let txn = self.disk.db.begin_read().map_err(io_err)?;
        let table = txn.open_table(LOGS).map_err(io_err)?;
        let last = match table.last().map_err(io_err)? {
            Some((_, v)) => Some(self.disk.unseal::<Entry<TypeConfig>>(v.value(), "raft-log")?.log_id),
            None => None,
        };
        Ok(LogState { last_purged_log_id, last_log_id: last.or(last_purged_log_id) })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<RaftId>) -> Result<(), StorageError<RaftId>> {
        self.disk.put_meta(VOTE, vote)
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<RaftId>>, StorageError<RaftId>> {
        self.disk.get_meta(VOTE)
    }

    async fn save_committed(&mut self, committed: Option<LogId<RaftId>>) -> Result<(), StorageError<RaftId>> {
        self.disk.put_meta(COMMITTED, &committed)
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<RaftId>>, StorageError<RaftId>> {
        Ok(self.disk.get_meta::<Option<LogId<RaftId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<RaftId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let txn = self.disk.db.begin_write().map_err(io_err)?;
        {
            let mut table = txn.open_table(LOGS).map_err(io_err)?;
            for entry in entries {
                let sealed = self.disk.seal(&entry, "raft-log");
                table.insert(entry.log_id.index, sealed.as_slice()).map_err(io_err)?;
            }
        }
        let result = txn.commit().map_err(|e| std::io::Error::other(e.to_string()));
        let failed = result.as_ref().err().map(|e| e.to_string());
        callback.log_io_completed(result);
        match failed {
            Some(e) => Err(io_err(e)),
            None => Ok(()),
        }
    }

    async fn truncate(&mut self, log_id: LogId<RaftId>) -> Result<(), StorageError<RaftId>> {
        let txn = self.disk.db.begin_write().map_err(io_err)?;
        txn.open_table(LOGS).map_err(io_err)?.retain_in(log_id.index.., |_, _| false).map_err(io_err)?;
        txn.commit().map_err(io_err)
    }

    async fn purge(&mut self, log_id: LogId<RaftId>) -> Result<(), StorageError<RaftId>> {
        let txn = self.disk.db.begin_write().map_err(io_err)?;
        txn.open_table(META)
            .map_err(io_err)?
            .insert(PURGED, self.disk.seal(&log_id, PURGED).as_slice())
            .map_err(io_err)?;
        txn.open_table(LOGS).map_err(io_err)?.retain_in(..=log_id.index, |_, _| false).map_err(io_err)?;
        txn.commit().map_err(io_err)
    }
}

/// What the manager reads: the current state and a signal that it changed.
pub struct Shared {
    state: RwLock<ClusterState>,
    revision: watch::Sender<u64>,
    /// The file, for re-sealing it under a new data key: weakly, so that the file closes once
    /// raft (which owns the storage) shuts down, whoever still holds a handle of the store.
    disk: WeakDisk,
}

/// A [`Disk`] that does not keep the file open.
struct WeakDisk {
    db: std::sync::Weak<Database>,
    key: Arc<RwLock<DataKey>>,
}

/// A snapshot as stored: its metadata and the state it captures.
#[derive(Serialize, Deserialize)]
struct StoredSnapshot {
    meta: SnapshotMeta<RaftId, BasicNode>,
    state: ClusterState,
}

/// The state machine half of the store.
pub struct StateMachine {
    disk: Disk,
    shared: Arc<Shared>,
    applied: Option<LogId<RaftId>>,
    membership: StoredMembership<RaftId, BasicNode>,
}

impl StateMachine {
    /// The state machine as of the last snapshot on disk, or `initial` if there is none. Entries
    /// after the snapshot are re-applied by raft at start-up.
    fn open(disk: Disk, initial: ClusterState) -> Result<StateMachine, StorageError<RaftId>> {
        let stored: Option<StoredSnapshot> = disk.get_meta(SNAPSHOT)?;
        let (state, applied, membership) = match stored {
            Some(s) => (s.state, s.meta.last_log_id, s.meta.last_membership),
            None => (initial, None, StoredMembership::default()),
        };
        let (revision, _) = watch::channel(state.revision);
        let weak = WeakDisk { db: Arc::downgrade(&disk.db), key: disk.key.clone() };
        let shared = Arc::new(Shared { state: RwLock::new(state), revision, disk: weak });
        Ok(StateMachine { disk, shared, applied, membership })
    }

    fn snapshot_of(&self, state: ClusterState) -> Result<Snapshot<TypeConfig>, StorageError<RaftId>> {
        let id = match &self.applied {
            Some(l) => format!("{}-{}-{}", l.leader_id, l.index, state.revision),
            None => format!("empty-{}", state.revision),
        };
        let meta = SnapshotMeta {
            last_log_id: self.applied,
            last_membership: self.membership.clone(),
            snapshot_id: id,
        };
        let stored = StoredSnapshot { meta: meta.clone(), state };
        self.disk.put_meta(SNAPSHOT, &stored)?;
        let data = serde_json::to_vec(&stored.state).map_err(io_err)?;
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<RaftId>> {
        let state = self.shared.state.read().expect("lock").clone();
        self.snapshot_of(state)
    }
}

/// A snapshot builder reading the same state.
pub struct SnapshotBuilder(StateMachine);

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<RaftId>> {
        self.0.build_snapshot().await
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<RaftId>>, StoredMembership<RaftId, BasicNode>), StorageError<RaftId>> {
        Ok((self.applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Applied>, StorageError<RaftId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut out = Vec::new();
        let mut state = self.shared.state.write().expect("lock");
        for entry in entries {
            self.applied = Some(entry.log_id);
            out.push(match entry.payload {
                EntryPayload::Blank => Applied(Ok(())),
                EntryPayload::Normal(command) => Applied(state.apply(command)),
                EntryPayload::Membership(m) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), m);
                    Applied(Ok(()))
                }
            });
        }
        self.shared.revision.send_replace(state.revision);
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder(StateMachine {
            disk: self.disk.clone(),
            shared: self.shared.clone(),
            applied: self.applied,
            membership: self.membership.clone(),
        })
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError<RaftId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<RaftId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<RaftId>> {
        let state: ClusterState = serde_json::from_slice(snapshot.get_ref()).map_err(io_err)?;
        self.applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        let stored = StoredSnapshot { meta: meta.clone(), state: state.clone() };
        self.disk.put_meta(SNAPSHOT, &stored)?;
        let revision = state.revision;
        *self.shared.state.write().expect("lock") = state;
        self.shared.revision.send_replace(revision);
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError<RaftId>> {
        let stored: Option<StoredSnapshot> = self.disk.get_meta(SNAPSHOT)?;
        Ok(stored.map(|s| Snapshot {
            meta: s.meta,
            snapshot: Box::new(Cursor::new(serde_json::to_vec(&s.state).expect("serializes"))),
        }))
    }
}

/// Opens (or creates) the log store and state machine in `path`.
pub fn open_storage(
    path: &Path,
    key: DataKey,
    initial: ClusterState,
) -> Result<(LogStore, StateMachine), StoreError> {
    let disk = Disk::open(path, key)?;
    let sm = StateMachine::open(disk.clone(), initial).map_err(|e| StoreError::Raft(e.to_string()))?;
    Ok((LogStore { disk }, sm))
}

/// Entries between snapshots.
const SNAPSHOT_EVERY: u64 = 500;
/// How long a manager that creates a cluster waits to lead it (a single voter elects itself).
const LEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a change may wait to be committed: a leader cut off from a majority cannot commit.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How soon a membership change that found another under way tries again.
const MEMBERSHIP_RETRY: Duration = Duration::from_millis(300);

/// What a membership change fails with.
type ChangeError = RaftError<RaftId, ClientWriteError<RaftId, BasicNode>>;
/// A leader that has not heard from a majority for this long no longer counts as leading (it is
/// likely cut off; the others elect another).
const LEASE: u64 = 2_000;

/// Who leads the store's raft group, and who is in it, as this manager sees it.
#[derive(Clone, Debug, Default)]
pub struct Leadership {
    pub me: RaftId,
    /// The leader, if one is known.
    pub leader: Option<RaftId>,
    /// Whether this manager leads and a majority acknowledged it lately.
    pub leading: bool,
    /// Voters and learners (non-voters) with their control addresses.
    pub voters: BTreeMap<RaftId, String>,
    pub learners: BTreeMap<RaftId, String>,
}

impl Leadership {
    /// The leader's control address, if one is known.
    pub fn leader_addr(&self) -> Option<&str> {
        let leader = self.leader?;
        self.voters.get(&leader).map(String::as_str)
    }

    pub fn is_member(&self, id: RaftId) -> bool {
        self.voters.contains_key(&id) || self.learners.contains_key(&id)
    }
}

/// The store the manager uses: a raft node over the sealed redb file.
#[derive(Clone)]
pub struct Store {
    raft: Raft,
    id: RaftId,
    shared: Arc<Shared>,
    /// The store's file.
    path: std::path::PathBuf,
}

impl Store {
    /// Opens the store in `path` as raft node `id`, reaching its peers through `network`. With
    /// `bootstrap`, first makes this node the only voter of a new cluster and waits to lead it;
    /// otherwise returns at once (an election needs the other managers up too).
    pub async fn open(
        path: &Path,
        key: DataKey,
        initial: ClusterState,
        id: RaftId,
        addr: &str,
        bootstrap: bool,
        network: Peers,
    ) -> Result<Store, StoreError> {
        let (log, sm) = open_storage(path, key, initial)?;
        let shared = sm.shared.clone();
        let config = openraft::Config {
            cluster_name: "mesh".into(),
            heartbeat_interval: 100,
            election_timeout_min: 300,
            election_timeout_max: 600,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY),
            max_in_snapshot_log_to_keep: 100,
            // Snapshots travel in chunks well under the gRPC message limit.
            snapshot_max_chunk_size: 1 << 20,
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| StoreError::Raft(e.to_string()))?);
        let raft =
            Raft::new(id, config, network, log, sm).await.map_err(|e| StoreError::Raft(e.to_string()))?;
        let store = Store { raft, id, shared, path: path.to_owned() };
        if bootstrap {
            let members = BTreeMap::from([(id, BasicNode { addr: addr.to_owned() })]);
            store.raft.initialize(members).await.map_err(|e| StoreError::Raft(e.to_string()))?;
            store.wait_to_lead(LEADER_TIMEOUT).await?;
        }
        Ok(store)
    }

    /// Seals the whole store again under `fresh` (see [`Disk::rekey`]).
    pub fn rekey(&self, fresh: DataKey) -> Result<(), StoreError> {
        let weak = &self.shared.disk;
        let db = weak.db.upgrade().ok_or_else(|| StoreError::Raft("the store is shut down".into()))?;
        let disk = Disk { db, key: weak.key.clone() };
        disk.rekey(fresh).map_err(|e| StoreError::Raft(e.to_string()))
    }

    /// Waits until this manager leads (a single manager elects itself within a second).
    pub async fn wait_to_lead(&self, timeout: Duration) -> Result<(), StoreError> {
        self.raft
            .wait(Some(timeout))
            .current_leader(self.id, "this manager leads")
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Raft(format!("this manager did not become leader: {e}")))
    }

    /// This manager's ID in the raft group.
    pub fn id(&self) -> RaftId {
        self.id
    }

    /// The raft node, for the peers' messages.
    pub fn raft(&self) -> &Raft {
        &self.raft
    }

    /// Who leads and who is in the group now.
    pub fn leadership(&self) -> Leadership {
        let metrics = self.raft.metrics().borrow().clone();
        let membership = metrics.membership_config.membership();
        let addr = |id: RaftId| membership.get_node(&id).map(|n| n.addr.clone()).unwrap_or_default();
        Leadership {
            me: self.id,
            leader: metrics.current_leader,
            leading: metrics.current_leader == Some(self.id)
                && metrics.state == openraft::ServerState::Leader
                // None: newly elected, not yet acknowledged; that is not a sign of being cut off.
                && metrics.millis_since_quorum_ack.is_none_or(|ms| ms < LEASE),
            voters: membership.voter_ids().map(|id| (id, addr(id))).collect(),
            learners: membership.learner_ids().map(|id| (id, addr(id))).collect(),
        }
    }

    /// Changes whenever leadership or membership does.
    pub fn watch_raft(&self) -> watch::Receiver<openraft::RaftMetrics<RaftId, BasicNode>> {
        self.raft.metrics()
    }

    /// Applies `command` through the log; on error the state is unchanged. Only the leader
    /// writes; a write that a majority does not confirm in time fails.
    pub async fn apply(&self, command: Command) -> Result<(), StoreError> {
        use openraft::error::{ClientWriteError, RaftError};
        match tokio::time::timeout(WRITE_TIMEOUT, self.raft.client_write(command)).await {
            Err(_) => Err(StoreError::NoQuorum(WRITE_TIMEOUT)),
            Ok(Ok(response)) => Ok(response.data.0?),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f)))) => {
                Err(StoreError::NotLeader { leader: f.leader_node.map(|n| n.addr) })
            }
            Ok(Err(e)) => Err(StoreError::Raft(e.to_string())),
        }
    }

    /// Adds manager `id` (reached at `addr`) to the group: first as a learner that catches up,
    /// then as a voter.
    pub async fn add_voter(&self, id: RaftId, addr: &str) -> Result<(), StoreError> {
        let leadership = self.leadership();
        if leadership.voters.contains_key(&id) {
            return Ok(());
        }
        // A learner already (a join that stopped half way): only the promotion is left.
        if !leadership.learners.contains_key(&id) {
            let node = BasicNode { addr: addr.to_owned() };
            self.membership(|| self.raft.add_learner(id, node.clone(), true)).await?;
        }
        self.set_voter(id, true).await
    }

    /// Makes member `id` a voter, or only a learner (a non-voting copy).
    pub async fn set_voter(&self, id: RaftId, voter: bool) -> Result<(), StoreError> {
        let ids = BTreeSet::from([id]);
        let change = || match voter {
            true => ChangeMembers::AddVoterIds(ids.clone()),
            false => ChangeMembers::RemoveVoters(ids.clone()),
        };
        self.membership(|| self.raft.change_membership(change(), true)).await
    }

    /// Takes `id` out of the group altogether.
    pub async fn remove_member(&self, id: RaftId) -> Result<(), StoreError> {
        let ids = BTreeSet::from([id]);
        if self.leadership().voters.contains_key(&id) {
            let remove = || ChangeMembers::RemoveVoters(ids.clone());
            self.membership(|| self.raft.change_membership(remove(), true)).await?;
        }
        self.membership(|| self.raft.change_membership(ChangeMembers::RemoveNodes(ids.clone()), false)).await
    }

    /// Makes the membership change `change` makes, waiting its turn while another is under way
    /// (raft makes one at a time: two managers joining at once, say), within `3 × WRITE_TIMEOUT`.
    async fn membership<F>(&self, change: impl Fn() -> F) -> Result<(), StoreError>
    where
        F: std::future::Future<Output = Result<ClientWriteResponse<TypeConfig>, ChangeError>>,
    {
        let deadline = tokio::time::Instant::now() + 3 * WRITE_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, change()).await {
                Err(_) => return Err(StoreError::NoQuorum(3 * WRITE_TIMEOUT)),
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(
                    ChangeMembershipError::InProgress(_),
                )))) if tokio::time::Instant::now() + MEMBERSHIP_RETRY < deadline => {
                    tokio::time::sleep(MEMBERSHIP_RETRY).await
                }
                Ok(Err(e)) => return Err(StoreError::Raft(e.to_string())),
            }
        }
    }

    /// Applies `commands` in order as one entry, all or nothing.
    pub async fn apply_all(&self, commands: Vec<Command>) -> Result<(), StoreError> {
        self.apply(Command::Batch(commands)).await
    }

    /// Reads the current state.
    pub fn read<T>(&self, f: impl FnOnce(&ClusterState) -> T) -> T {
        f(&self.shared.state.read().expect("lock"))
    }

    /// Changes whenever the state does.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.revision.subscribe()
    }

    /// Writes a snapshot now (it also happens every few hundred entries).
    pub async fn snapshot(&self) -> Result<(), StoreError> {
        self.raft.trigger().snapshot().await.map_err(|e| StoreError::Raft(e.to_string()))
    }

    /// Stops the raft node and waits (up to 5 s) until the store's file is closed: what raft
    /// runs beside its core lets go of it a little after the core stops, and the file cannot be
    /// opened again before (`mesh-control init --run` opens it again in the same process).
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            match Database::open(&self.path) {
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                _ => return,
            }
        }
        warn!(path = %self.path.display(), "the store's file is still open 5 s after raft stopped");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A rekey racing the raft core's writes: each takes the write transaction and the key, and
    /// taking them in opposite orders deadlocked a joining manager under autolock.
    #[test]
    fn a_rekey_racing_writes_finishes_and_loses_none() {
        let dir = tempfile::tempdir().unwrap();
        let disk = Disk::open(&dir.path().join("store.redb"), DataKey::generate()).unwrap();
        let (done, finished) = std::sync::mpsc::channel();
        let writers: Vec<_> = (0..2)
            .map(|w| {
                let disk = disk.clone();
                let done = done.clone();
                std::thread::spawn(move || {
                    for i in 0..300u32 {
                        disk.put_meta(&format!("w{w}"), &i).unwrap();
                    }
                    done.send(()).unwrap();
                })
            })
            .collect();
        let rekeys = {
            let disk = disk.clone();
            std::thread::spawn(move || {
                for _ in 0..30 {
                    disk.rekey(DataKey::generate()).unwrap();
                }
                done.send(()).unwrap();
            })
        };
        for _ in 0..3 {
            finished
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("deadlocked: a writer never finished");
        }
        writers.into_iter().for_each(|w| w.join().unwrap());
        rekeys.join().unwrap();
        for w in 0..2 {
            assert_eq!(disk.get_meta::<u32>(&format!("w{w}")).unwrap(), Some(299));
        }
    }
}
