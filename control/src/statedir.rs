//! Creating a cluster and opening it again: the manager's state directory.
//!
//! ```text
//! DIR/cluster.redb       the replicated store: raft log, vote, snapshots, sealed with the data key;
//!                        the CA's key and the join tokens live in it, so every manager has them
//! DIR/data.key           the data key that seals the state at rest (0600); under autolock it is
//!                        itself wrapped by the unlock key, which no manager keeps
//! DIR/ca.crt             the root CA certificate
//! DIR/manager.crt, .key  this manager's own certificate; its key (0600) sealed by the data key,
//!                        so under autolock it too is unreadable without the unlock key
//! DIR/unlock.sock        while locked: where `meshctl unlock` gives the unlock key (0600)
//! DIR/config.json        the listen and advertised addresses, the raft ID
//! DIR/admin/             (first manager) the admin bundle for meshctl: ca.crt, admin.crt,
//!                        admin.key (0600), control (one manager address per line)
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use mesh_api::bundle::AdminBundle;
use mesh_api::files::{self, FileError, PUBLIC, SECRET};
use mesh_api::ids::{ClusterId, NodeId};
use mesh_api::join::{JoinError, hostname};
use mesh_api::pki::{CertInfo, PkiError};
use mesh_api::tls::{Identity, TlsError};
use mesh_api::tokens::{JoinToken, Role};

use crate::ca::cfssl::{self, Cfssl};
use crate::ca::{CaError, ClusterCa, Signer, Subject};
use crate::config::{DEFAULT_CERT_LIFETIME, MIN_CERT_LIFETIME};
use crate::raft::network::Peers;
use crate::raft::seal::{DataKey, KeyFile, SealError, UnlockKey};
use crate::raft::store::{Store, StoreError};
use crate::state::{AdminRecord, CaRecord, ClusterState, Command, ExternalCa, NodeRecord, NodeState, Secret};

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("{0} already holds a cluster ({1} exists); refusing to overwrite it")]
    Exists(PathBuf, PathBuf),
    #[error("{0} holds no cluster (no {1}); create one with `mesh-control init`")]
    Missing(PathBuf, PathBuf),
    #[error("certificate lifetime {given} is too short: the minimum is 1h")]
    LifetimeTooShort { given: String },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("{path} is corrupt: {error}")]
    Corrupt { path: PathBuf, error: String },
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("{0} is a worker token: a manager joins with the manager token (`meshctl join-token manager`)")]
    WorkerToken(String),
}

/// Where the manager listens and what address it tells others to use.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManagerConfig {
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    /// This manager's ID in the store's raft group.
    #[serde(default = "first_raft_id")]
    pub raft_id: u64,
    /// For a manager that joined: the managers it joined through, asked to add it to the raft
    /// group until it votes (emptied then).
    #[serde(default)]
    pub join: Vec<String>,
    /// The name this manager's node record carries (the host's name unless told otherwise).
    #[serde(default = "hostname")]
    pub hostname: String,
}

impl ManagerConfig {
    /// `advertise` defaults to `listen`, or to loopback when `listen` is unspecified (0.0.0.0).
    pub fn new(listen: SocketAddr, advertise: Option<SocketAddr>) -> ManagerConfig {
        let advertise = advertise.unwrap_or_else(|| {
            if listen.ip().is_unspecified() {
                SocketAddr::from(([127, 0, 0, 1], listen.port()))
            } else {
                listen
            }
        });
        ManagerConfig { listen, advertise, raft_id: first_raft_id(), join: Vec::new(), hostname: hostname() }
    }
}

fn first_raft_id() -> u64 {
    1
}

/// Paths in a manager's state directory.
#[derive(Clone, Debug)]
pub struct ManagerDir {
    pub root: PathBuf,
}

impl ManagerDir {
    pub fn new(root: &Path) -> ManagerDir {
        ManagerDir { root: root.to_owned() }
    }
    pub fn state(&self) -> PathBuf {
        self.root.join("cluster.redb")
    }
    pub fn data_key(&self) -> PathBuf {
        self.root.join("data.key")
    }
    /// A data key being put in place (see `Manager::rekey`).
    pub fn data_key_next(&self) -> PathBuf {
        self.root.join("data.key.next")
    }
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    pub fn manager_cert(&self) -> PathBuf {
        self.root.join("manager.crt")
    }
    pub fn manager_key(&self) -> PathBuf {
        self.root.join("manager.key")
    }
    /// The manager key sealed by a data key being put in place (see `Manager::rekey`).
    pub fn manager_key_next(&self) -> PathBuf {
        self.root.join("manager.key.next")
    }
    /// Where a locked manager listens for its unlock key.
    pub fn unlock_socket(&self) -> PathBuf {
        self.root.join(mesh_api::unlock::SOCKET)
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.json")
    }
    pub fn admin(&self) -> PathBuf {
        self.root.join("admin")
    }

    /// Refuses a directory that already holds (part of) a cluster.
    fn check_empty(&self) -> Result<(), ClusterError> {
        for existing in [self.state(), self.config(), self.data_key(), self.manager_key()] {
            if existing.exists() {
                return Err(ClusterError::Exists(self.root.clone(), existing));
            }
        }
        Ok(())
    }

    /// Rewrites the data key file for the unlock key in force (wrapped) or none (in the clear).
    pub fn write_data_key(&self, key: &DataKey, unlock: Option<&UnlockKey>) -> Result<(), FileError> {
        key.save(&self.data_key(), unlock)
    }
}

/// What `mesh-control init` made.
#[derive(Debug)]
pub struct Created {
    pub cluster_id: ClusterId,
    pub manager_id: NodeId,
    pub worker_token: JoinToken,
    pub manager_token: JoinToken,
    pub admin_dir: PathBuf,
    pub config: ManagerConfig,
    /// With autolock: the unlock key, shown once.
    pub unlock_key: Option<UnlockKey>,
}

/// Creates a cluster in `root`: CA, this manager's identity, join tokens, state, and the admin
/// bundle in `root/admin`. With `autolock`, the data key is wrapped by a new unlock key, returned
/// to be shown once.
pub async fn init(
    root: &Path,
    config: ManagerConfig,
    cert_lifetime: Duration,
    autolock: bool,
) -> Result<Created, ClusterError> {
    init_with_admin_dir(root, config, cert_lifetime, autolock, &ManagerDir::new(root).admin(), CaChoice::Own)
        .await
}

/// Which CA a new cluster's certificates come from.
#[derive(Clone, Debug)]
pub enum CaChoice {
    /// A root made here, whose key the managers hold.
    Own,
    /// A CFSSL server at `url`, with its auth key (hex), signing with `root_pem`.
    External { url: String, auth_key: String, root_pem: String },
}

/// The CA a cluster is made with: its signer, the record the state keeps, and its cluster ID
/// (an external root's O, which must be one).
async fn make_ca(choice: CaChoice) -> Result<(Signer, CaRecord, ClusterId), ClusterError> {
    match choice {
        CaChoice::Own => {
            let cluster_id = ClusterId::random();
            let ca = ClusterCa::generate(&cluster_id)?;
            let record = CaRecord {
                cert_pem: ca.cert_pem().to_owned(),
                key_pem: Secret(ca.key_pem()),
                external: None,
            };
            Ok((Signer::Own(ca), record, cluster_id))
        }
        CaChoice::External { url, auth_key, root_pem } => {
            let key = cfssl::parse_auth_key(&auth_key).map_err(CaError::Given)?;
            let cluster_id = external_cluster_id(&root_pem)?;
            let signer = Cfssl::new(&url, &key, &root_pem)?;
            signer.check_signer().await?;
            let record = CaRecord {
                cert_pem: mesh_api::trust::Trust::from_pem(&root_pem)
                    .map_err(|e| CaError::Given(e.to_string()))?
                    .to_pem(),
                key_pem: Secret(String::new()),
                external: Some(ExternalCa { url, auth_key: Secret(auth_key) }),
            };
            Ok((Signer::External(signer), record, cluster_id))
        }
    }
}

/// The cluster ID an external root names as its O: every certificate of the cluster carries it.
fn external_cluster_id(root_pem: &str) -> Result<ClusterId, ClusterError> {
    let organization = CertInfo::from_pem(root_pem).map(|i| i.organization).unwrap_or_default();
    organization.parse().map_err(|_| {
        ClusterError::Ca(CaError::Given(format!(
            "the external root's O is `{}`: it must be the cluster's ID, 25 characters of 0-9a-z, \
             such as {} (make the root with that O)",
            organization.escape_default(),
            ClusterId::random()
        )))
    })
}

/// [`init`], writing the admin bundle to `admin_dir`, with the CA `ca`.
pub async fn init_with_admin_dir(
    root: &Path,
    config: ManagerConfig,
    cert_lifetime: Duration,
    autolock: bool,
    admin_dir: &Path,
    ca: CaChoice,
) -> Result<Created, ClusterError> {
    if cert_lifetime < MIN_CERT_LIFETIME {
        return Err(ClusterError::LifetimeTooShort {
            given: humantime::format_duration(cert_lifetime).to_string(),
        });
    }
    let dir = ManagerDir::new(root);
    dir.check_empty()?;
    files::create_private_dir(root)?;

    let (ca, ca_record, cluster_id) = make_ca(ca).await?;
    let worker_token = JoinToken::generate(&ca.digest());
    let manager_token = JoinToken::generate(&ca.digest());
    let manager_id = NodeId::random();
    let (manager_cert, manager_key) =
        ca.issue_with_new_key(&Subject::node(&cluster_id, &manager_id, Role::Manager, cert_lifetime)).await?;
    let (admin_cert, admin_key) = ca
        .issue_with_new_key(&Subject::admin(&cluster_id, crate::config::DEFAULT_ADMIN_CERT_LIFETIME))
        .await?;
    let root_pem = ca_record.cert_pem.clone();
    let admin_info = CertInfo::from_pem(&admin_cert)?;
    let identity = Identity { cert_pem: manager_cert.clone(), key_pem: manager_key };
    let data_key = DataKey::generate();

    files::write_atomic(&dir.ca_cert(), root_pem.as_bytes(), PUBLIC)?;
    dir.write_manager_identity(&identity, &data_key)?;
    AdminBundle {
        managers: vec![config.advertise.to_string()],
        manager_ids: vec![manager_id.to_string()],
        ca_pem: root_pem.clone(),
        identity: Identity { cert_pem: admin_cert, key_pem: admin_key },
    }
    .write(admin_dir)?;

    let unlock_key = autolock.then(UnlockKey::generate);
    let now = OffsetDateTime::now_utc().unix_timestamp();
    let commands = vec![
        Command::SetCa(ca_record),
        Command::set_token(Role::Worker, &worker_token),
        Command::set_token(Role::Manager, &manager_token),
        Command::AddNode(NodeRecord {
            id: manager_id.clone(),
            hostname: config.hostname.clone(),
            role: Role::Manager,
            state: NodeState::Active,
            joined_at: now,
            cert_not_after: CertInfo::from_pem(&manager_cert)?.not_after.unix_timestamp(),
            labels: Default::default(),
            underlay: None,
            index: 0,
            control: Some(config.advertise),
            removed_at: None,
            boot: 0,
            demoted: false,
            cert_root: ca.digest(),
            wireguard: Default::default(),
        }),
        Command::SetUnlockKey(unlock_key.as_ref().map(|k| Secret(k.to_string()))),
        Command::AddAdmin {
            serial: admin_info.serial.clone(),
            record: AdminRecord {
                label: "created by mesh-control init".into(),
                issued_at: now,
                not_after: admin_info.not_after.unix_timestamp(),
            },
        },
    ];
    dir.write_data_key(&data_key, unlock_key.as_ref())?;
    let initial = ClusterState::new(cluster_id.clone(), cert_lifetime);
    let trust = mesh_api::trust::Trust::from_pem(&root_pem)
        .map_err(|e| ClusterError::Corrupt { path: dir.ca_cert(), error: e.to_string() })?;
    let peers = Peers::new(&trust, &identity)?;
    let store = Store::open(
        &dir.state(),
        data_key,
        initial,
        config.raft_id,
        &config.advertise.to_string(),
        true,
        peers,
    )
    .await?;
    store.apply_all(commands).await?;
    store.snapshot().await?;
    store.shutdown().await;
    drop(store);
    // The config is written last: its presence is what marks a complete cluster.
    files::write_atomic(&dir.config(), &serde_json::to_vec_pretty(&config).expect("serializes"), SECRET)?;

    Ok(Created {
        cluster_id,
        manager_id,
        worker_token,
        manager_token,
        admin_dir: admin_dir.to_owned(),
        config,
        unlock_key,
    })
}

/// What `mesh-control join` made.
#[derive(Debug)]
pub struct JoinedManager {
    pub node_id: NodeId,
    pub raft_id: u64,
    pub cluster_id: ClusterId,
    /// The cluster is autolocked: the data key is not on disk yet (see [`open_joined`]).
    pub autolock: bool,
    pub data_key: DataKey,
}

/// Joins the cluster at `managers` as a manager with the manager `token`: a manager certificate
/// for a key made here, the CA pinned by the token, a data key of its own. The manager is added
/// to the raft group once it serves (see [`crate::serve::serve`]).
pub async fn join(
    root: &Path,
    mut config: ManagerConfig,
    managers: &[String],
    token: &str,
) -> Result<JoinedManager, ClusterError> {
    let dir = ManagerDir::new(root);
    dir.check_empty()?;
    let joined = mesh_api::join::join(managers, token, &config.hostname, true).await?;
    let role = CertInfo::from_pem(&joined.identity.cert_pem)?.unit;
    if Role::from_ou(&role) != Some(Role::Manager) {
        return Err(ClusterError::WorkerToken(format!("node {} joined as a worker: the token", joined.id)));
    }
    files::create_private_dir(root)?;
    let ca_pem = joined.trust.to_pem();
    files::write_atomic(&dir.ca_cert(), ca_pem.as_bytes(), PUBLIC)?;
    // Into an autolocked cluster no key is written in the clear: this one stays in memory until
    // the manager learns the unlock key from the log and writes it wrapped.
    let data_key = DataKey::generate();
    dir.write_manager_identity(&joined.identity, &data_key)?;
    if !joined.autolock {
        data_key.save(&dir.data_key(), None)?;
    }
    config.raft_id = u64::from(joined.node_index);
    config.join = managers.to_vec();
    files::write_atomic(&dir.config(), &serde_json::to_vec_pretty(&config).expect("serializes"), SECRET)?;
    let cluster_id = cluster_of(&dir, &ca_pem)?;
    Ok(JoinedManager {
        node_id: joined.id,
        raft_id: config.raft_id,
        cluster_id,
        autolock: joined.autolock,
        data_key,
    })
}

fn cluster_of(dir: &ManagerDir, ca_pem: &str) -> Result<ClusterId, ClusterError> {
    CertInfo::from_pem(ca_pem)?.organization.parse().map_err(|e: mesh_api::ids::InvalidId| {
        ClusterError::Corrupt { path: dir.ca_cert(), error: e.to_string() }
    })
}

/// An existing cluster, opened to be served.
pub struct Opened {
    pub dir: ManagerDir,
    pub config: ManagerConfig,
    pub store: Store,
    pub cluster_id: ClusterId,
    pub ca_pem: String,
    pub manager_identity: Identity,
    pub peers: Peers,
    /// The data key, to re-wrap when autolock changes.
    pub data_key: DataKey,
}

/// Whether the manager in `root` is locked: its data key (or, after a crash in the middle of
/// putting a fresh one in place, the one beside it) is wrapped by the unlock key.
pub fn is_locked(root: &Path) -> Result<bool, ClusterError> {
    let dir = ManagerDir::new(root);
    let path = if dir.data_key().exists() { dir.data_key() } else { dir.data_key_next() };
    Ok(matches!(KeyFile::read(&path)?, KeyFile::Locked(_)))
}

/// Whether `key` opens this manager's data key: the current file, or (after a crash in the
/// middle of putting a fresh one in place) the one beside it, as opening tries them.
pub fn unlock_opens(dir: &ManagerDir, key: &UnlockKey) -> Result<(), SealError> {
    let open = |path: &Path| KeyFile::read(path).and_then(|f| f.open(path, Some(key))).map(drop);
    match open(&dir.data_key()) {
        Err(_) if dir.data_key_next().exists() => open(&dir.data_key_next()),
        other => other,
    }
}

/// Records that the manager in `dir` is a voter of the raft group: it asks to be added no more
/// (from then on, whether it votes is the operator's, `meshctl node promote/demote`).
pub fn finish_join(dir: &ManagerDir, config: &ManagerConfig) -> Result<(), FileError> {
    let config = ManagerConfig { join: Vec::new(), ..config.clone() };
    files::write_atomic(&dir.config(), &serde_json::to_vec_pretty(&config).expect("serializes"), SECRET)
}

/// The listen and advertised addresses of the manager in `root`.
pub fn read_config(root: &Path) -> Result<ManagerConfig, ClusterError> {
    let dir = ManagerDir::new(root);
    let path = dir.config();
    if !path.exists() {
        return Err(ClusterError::Missing(root.to_owned(), path));
    }
    serde_json::from_str(&files::read_string(&path)?)
        .map_err(|e| ClusterError::Corrupt { path, error: e.to_string() })
}

/// Opens a manager that just joined an autolocked cluster, with the data key [`join`] kept in
/// memory.
pub async fn open_joined(root: &Path, joined: &JoinedManager) -> Result<Opened, ClusterError> {
    open_inner(root, None, Some(joined.data_key.clone())).await
}

/// Opens the manager in `root`; a locked one needs `unlock`. Does not wait for a leader: with
/// several managers an election needs the others up too.
pub async fn open(root: &Path, unlock: Option<&UnlockKey>) -> Result<Opened, ClusterError> {
    open_inner(root, unlock, None).await
}

async fn open_inner(
    root: &Path,
    unlock: Option<&UnlockKey>,
    known: Option<DataKey>,
) -> Result<Opened, ClusterError> {
    let dir = ManagerDir::new(root);
    let config = read_config(root)?;
    let ca_pem = files::read_string(&dir.ca_cert())?;
    let cluster_id = cluster_of(&dir, &ca_pem)?;
    let trust = mesh_api::trust::Trust::from_pem(&ca_pem)
        .map_err(|e| ClusterError::Corrupt { path: dir.ca_cert(), error: e.to_string() })?;
    // The data key file, or (after a crash in the middle of putting a fresh data key in place)
    // the one beside it that the store was sealed under.
    let (key_path, next) = (dir.data_key(), dir.data_key_next());
    if known.is_none() && !key_path.exists() && !next.exists() {
        return Err(ClusterError::Corrupt {
            path: key_path,
            error: "no data key: this manager joined an autolocked cluster and stopped before it \
                    learned the unlock key, so its store cannot be opened; remove the state directory \
                    and join again"
                .into(),
        });
    }
    let mut candidates: Vec<PathBuf> =
        [&key_path, &next].into_iter().filter(|p| p.exists()).cloned().collect();
    if known.is_some() {
        candidates = vec![PathBuf::new()];
    }
    // Each candidate key is tried whole (it opens the manager key and the store, or it is not
    // the one); nothing is moved into place before the store opened with it. The first failure
    // is the one reported (a wrong unlock key, say).
    let mut failure: Option<ClusterError> = None;
    for path in candidates {
        let data_key = match &known {
            Some(key) => Ok(key.clone()),
            None => KeyFile::read(&path).and_then(|f| f.open(&path, unlock)),
        };
        let data_key = match data_key {
            Ok(key) => key,
            Err(e) => {
                failure.get_or_insert(e.into());
                continue;
            }
        };
        let (manager_identity, key_from_next) = match read_identity(&dir, &data_key) {
            Ok(found) => found,
            Err(e) => {
                failure.get_or_insert(e);
                continue;
            }
        };
        let peers = Peers::new(&trust, &manager_identity)?;
        // The state comes from the store's snapshot and log; this is only the empty shape.
        let initial = ClusterState::new(cluster_id.clone(), DEFAULT_CERT_LIFETIME);
        let opened = Store::open(
            &dir.state(),
            data_key.clone(),
            initial,
            config.raft_id,
            &config.advertise.to_string(),
            false,
            peers.clone(),
        )
        .await;
        let store = match opened {
            Ok(store) => store,
            Err(e) => {
                failure.get_or_insert(e.into());
                continue;
            }
        };
        // Opened: what this key sealed goes in place, and what a change that never came into
        // force left beside it goes.
        if key_from_next {
            dir.commit_manager_key_next()?;
        } else if dir.manager_key_next().exists() {
            let _ = std::fs::remove_file(dir.manager_key_next());
        }
        if path == next {
            std::fs::rename(&next, &key_path).map_err(|e| FileError::new("renaming", &next, e))?;
        } else if next.exists() && known.is_none() {
            let _ = std::fs::remove_file(&next);
        }
        return Ok(Opened { dir, config, store, cluster_id, ca_pem, manager_identity, peers, data_key });
    }
    Err(failure.expect("data.key is always tried"))
}

/// The state of a stopped manager, read from its files (for tools and tests).
pub async fn read_state(root: &Path, unlock: Option<&UnlockKey>) -> Result<ClusterState, ClusterError> {
    let opened = open(root, unlock).await?;
    // Entries after the last snapshot are applied once the log is read back.
    let last = opened.store.raft().metrics().borrow().last_log_index;
    let _ = opened
        .store
        .raft()
        .wait(Some(Duration::from_secs(10)))
        .applied_index_at_least(last, "the log is applied")
        .await;
    let state = opened.store.read(Clone::clone);
    opened.store.shutdown().await;
    Ok(state)
}

/// What the manager key is sealed for (bound in as associated data).
const MANAGER_KEY: &[u8] = b"manager-key";

impl ManagerDir {
    /// Replaces this manager's own certificate and key, the key sealed by `data_key`.
    pub fn write_manager_identity(&self, identity: &Identity, data_key: &DataKey) -> Result<(), FileError> {
        data_key.save_sealed(&self.manager_key(), identity.key_pem.as_bytes(), MANAGER_KEY)?;
        files::write_atomic(&self.manager_cert(), identity.cert_pem.as_bytes(), PUBLIC)
    }

    /// Writes the manager key sealed by `fresh` beside the current one (see `Manager::rekey`).
    pub fn write_manager_key_next(&self, identity: &Identity, fresh: &DataKey) -> Result<(), FileError> {
        fresh.save_sealed(&self.manager_key_next(), identity.key_pem.as_bytes(), MANAGER_KEY)
    }

    /// Puts the manager key that [`ManagerDir::write_manager_key_next`] wrote in place.
    pub fn commit_manager_key_next(&self) -> Result<(), FileError> {
        let next = self.manager_key_next();
        std::fs::rename(&next, self.manager_key()).map_err(|e| FileError::new("renaming", &next, e))
    }
}

/// This manager's current certificate and key, opened with `data_key`: from `manager.key`, or
/// (after a crash in the middle of a data key change) the one beside it. A key file from
/// before keys were sealed is read as it is and rewritten sealed.
pub fn open_identity(dir: &ManagerDir, data_key: &DataKey) -> Result<Identity, ClusterError> {
    read_identity(dir, data_key).map(|(identity, _)| identity)
}

/// [`open_identity`], and whether the key came from `manager.key.next` (not moved: that is for
/// whoever knows the store opened under `data_key`).
fn read_identity(dir: &ManagerDir, data_key: &DataKey) -> Result<(Identity, bool), ClusterError> {
    let cert_pem = files::read_string(&dir.manager_cert())?;
    let (path, next) = (dir.manager_key(), dir.manager_key_next());
    let (opened, from_next) = match data_key.load_sealed(&path, MANAGER_KEY) {
        Err(SealError::Tag) if next.exists() => (data_key.load_sealed(&next, MANAGER_KEY)?, true),
        other => (other?, false),
    };
    let key_pem = match opened {
        Some(bytes) => String::from_utf8(bytes)
            .map_err(|_| ClusterError::Corrupt { path: path.clone(), error: "not a PEM key".into() })?,
        None => {
            let plain = files::read_string(&path)?;
            if !plain.contains("PRIVATE KEY-----") {
                return Err(ClusterError::Corrupt { path, error: "neither sealed nor a PEM key".into() });
            }
            let identity = Identity { cert_pem, key_pem: plain };
            dir.write_manager_identity(&identity, data_key)?;
            return Ok((identity, false));
        }
    };
    Ok((Identity { cert_pem, key_pem }, from_next))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(key: &str) -> Identity {
        Identity { cert_pem: "CERT".into(), key_pem: format!("-----BEGIN PRIVATE KEY-----\n{key}\n") }
    }

    #[test]
    fn the_manager_key_opens_after_a_crash_at_any_step_of_a_data_key_change() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ManagerDir::new(tmp.path());
        let (old, fresh) = (DataKey::generate(), DataKey::generate());
        dir.write_manager_identity(&identity("k"), &old).unwrap();
        // Written beside, not yet in place: both keys still open it.
        dir.write_manager_key_next(&identity("k"), &fresh).unwrap();
        assert_eq!(open_identity(&dir, &old).unwrap().key_pem, identity("k").key_pem);
        // The store was sealed under the fresh key, then the crash: the fresh key finds the
        // key beside the file, which is put in place only once the store opened with it.
        let (found, from_next) = read_identity(&dir, &fresh).unwrap();
        assert_eq!((found.key_pem, from_next), (identity("k").key_pem, true));
        assert!(dir.manager_key_next().exists(), "nothing moved by reading");
        dir.commit_manager_key_next().unwrap();
        let (found, from_next) = read_identity(&dir, &fresh).unwrap();
        assert_eq!((found.key_pem, from_next), (identity("k").key_pem, false));
        assert!(open_identity(&dir, &old).is_err(), "the old data key opens the key no more");
    }

    #[test]
    fn a_manager_key_in_the_clear_is_read_once_and_sealed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = ManagerDir::new(tmp.path());
        files::write_atomic(&dir.manager_cert(), b"CERT", PUBLIC).unwrap();
        files::write_atomic(&dir.manager_key(), identity("k").key_pem.as_bytes(), SECRET).unwrap();
        let key = DataKey::generate();
        assert_eq!(open_identity(&dir, &key).unwrap().key_pem, identity("k").key_pem);
        let text = std::fs::read_to_string(dir.manager_key()).unwrap();
        assert!(text.starts_with("MESHSEALED1 ") && !text.contains("PRIVATE"), "{text}");
        files::write_atomic(&dir.manager_key(), b"garbage", SECRET).unwrap();
        assert!(open_identity(&dir, &key).is_err());
    }
}
