//! The replicated cluster store: the [`ClusterState`] machine behind openraft, its log, vote and
//! snapshots kept in a redb file, every value sealed with AES-256-GCM under the data key so no
//! key material (nor any other state) is readable on disk.
//!
//! One manager is a single-voter cluster; more managers join as voters later. Every change is one
//! log entry ([`Command::Batch`] for a plan of several commands), applied all or nothing.

// openraft's storage traits fix the error type (`StorageError`, large); helpers return it too.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::io::Cursor;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, RaftLogReader, RaftSnapshotBuilder, SnapshotMeta,
    StorageError, StorageIOError, StoredMembership, Vote,
};
use redb::{Database, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::seal::{DataKey, SealError};
use crate::state::{ClusterState, Command, StateError};

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
}

fn io_err<E: std::fmt::Display>(e: E) -> StorageError<RaftId> {
    StorageIOError::<RaftId>::write(anyerror::AnyError::error(e.to_string())).into()
}

/// The redb file and the key that seals what is in it.
#[derive(Clone)]
struct Disk {
    db: Arc<Database>,
    key: DataKey,
}

impl Disk {
    fn open(path: &Path, key: DataKey) -> Result<Disk, StoreError> {
        // Created owner-only before redb initializes it (redb takes an empty file as new).
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(crate::files::SECRET)
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
        Ok(Disk { db: Arc::new(db), key })
    }

    fn seal<T: Serialize>(&self, value: &T, purpose: &str) -> Vec<u8> {
        self.key.seal(&serde_json::to_vec(value).expect("serializes"), purpose.as_bytes())
    }

    fn unseal<T: for<'de> Deserialize<'de>>(
        &self,
        blob: &[u8],
        purpose: &str,
    ) -> Result<T, StorageError<RaftId>> {
        let plain = self.key.open(blob, purpose.as_bytes()).map_err(io_err)?;
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
        let shared = Arc::new(Shared { state: RwLock::new(state), revision });
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

/// Peers of this manager. A single manager has none; its raft never calls them.
pub struct NoPeers;

/// A connection to a peer that does not exist.
pub struct Unreachable;

impl openraft::RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = Unreachable;
    async fn new_client(&mut self, _target: RaftId, _node: &BasicNode) -> Unreachable {
        Unreachable
    }
}

fn unreachable<E: std::error::Error>() -> openraft::error::RPCError<RaftId, BasicNode, E> {
    openraft::error::RPCError::Unreachable(openraft::error::Unreachable::new(&anyerror::AnyError::error(
        "this manager has no peers",
    )))
}

impl openraft::network::RaftNetwork<TypeConfig> for Unreachable {
    async fn append_entries(
        &mut self,
        _rpc: openraft::raft::AppendEntriesRequest<TypeConfig>,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::AppendEntriesResponse<RaftId>,
        openraft::error::RPCError<RaftId, BasicNode, openraft::error::RaftError<RaftId>>,
    > {
        Err(unreachable())
    }

    async fn install_snapshot(
        &mut self,
        _rpc: openraft::raft::InstallSnapshotRequest<TypeConfig>,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::InstallSnapshotResponse<RaftId>,
        openraft::error::RPCError<
            RaftId,
            BasicNode,
            openraft::error::RaftError<RaftId, openraft::error::InstallSnapshotError>,
        >,
    > {
        Err(unreachable())
    }

    async fn vote(
        &mut self,
        _rpc: openraft::raft::VoteRequest<RaftId>,
        _option: openraft::network::RPCOption,
    ) -> Result<
        openraft::raft::VoteResponse<RaftId>,
        openraft::error::RPCError<RaftId, BasicNode, openraft::error::RaftError<RaftId>>,
    > {
        Err(unreachable())
    }
}

/// Entries between snapshots.
const SNAPSHOT_EVERY: u64 = 500;
/// How long a manager waits to become leader at start before giving up.
const LEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// The store the manager uses: a raft node over the sealed redb file.
pub struct Store {
    raft: Raft,
    shared: Arc<Shared>,
}

impl Store {
    /// Opens the store in `path` as raft node `id`; with `bootstrap`, first makes this node the
    /// only voter of a new cluster. Returns once this node leads (a single voter elects itself).
    pub async fn open(
        path: &Path,
        key: DataKey,
        initial: ClusterState,
        id: RaftId,
        addr: &str,
        bootstrap: bool,
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
            ..Default::default()
        };
        let config = Arc::new(config.validate().map_err(|e| StoreError::Raft(e.to_string()))?);
        let raft =
            Raft::new(id, config, NoPeers, log, sm).await.map_err(|e| StoreError::Raft(e.to_string()))?;
        if bootstrap {
            let members = std::collections::BTreeMap::from([(id, BasicNode { addr: addr.to_owned() })]);
            raft.initialize(members).await.map_err(|e| StoreError::Raft(e.to_string()))?;
        }
        raft.wait(Some(LEADER_TIMEOUT))
            .current_leader(id, "this manager leads")
            .await
            .map_err(|e| StoreError::Raft(format!("this manager did not become leader: {e}")))?;
        Ok(Store { raft, shared })
    }

    /// Applies `command` through the log; on error the state is unchanged.
    pub async fn apply(&self, command: Command) -> Result<(), StoreError> {
        let response = self.raft.client_write(command).await.map_err(|e| StoreError::Raft(e.to_string()))?;
        Ok(response.data.0?)
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

    /// Stops the raft node.
    pub async fn shutdown(&self) {
        let _ = self.raft.shutdown().await;
    }
}
