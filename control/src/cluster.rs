//! Creating a cluster and opening it again: the manager's state directory.
//!
//! ```text
//! DIR/cluster.redb       the replicated store: raft log, vote, snapshots, sealed with the data key
//! DIR/data.key           the data key that seals the state at rest (0600)
//! DIR/ca.crt, ca.key     the root CA (key 0600)
//! DIR/manager.crt, .key  this manager's own certificate (key 0600)
//! DIR/join-tokens.json   the current join tokens, for `meshctl join-token` (0600)
//! DIR/config.json        the listen and advertised addresses
//! DIR/admin/             the admin bundle for meshctl: ca.crt, admin.crt, admin.key (0600), control
//! ```

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::ca::{CaError, CertInfo, ClusterCa, Subject};
use crate::files::{self, FileError, PUBLIC, SECRET};
use crate::ids::{ClusterId, NodeId};
use crate::seal::{DataKey, SealError};
use crate::state::{ClusterState, Command, NodeRecord, NodeState};
use crate::store::{Store, StoreError};
use crate::tls::Identity;
use crate::tokens::{JoinToken, Role};

/// The port the control API listens on unless told otherwise.
pub const DEFAULT_CONTROL_PORT: u16 = 7400;
/// Node certificate lifetime unless told otherwise.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// The shortest node certificate lifetime allowed.
pub const MIN_CERT_LIFETIME: Duration = Duration::from_secs(3600);

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
    Store(#[from] StoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error("{path} is corrupt: {error}")]
    Corrupt { path: PathBuf, error: String },
    #[error("the join token in {path} is malformed: {error}")]
    BadToken { path: PathBuf, error: crate::tokens::TokenError },
}

/// Where the manager listens and what address it tells others to use.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ManagerConfig {
    pub listen: SocketAddr,
    pub advertise: SocketAddr,
    /// This manager's ID in the store's raft group.
    #[serde(default = "first_raft_id")]
    pub raft_id: u64,
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
        ManagerConfig { listen, advertise, raft_id: first_raft_id() }
    }
}

fn first_raft_id() -> u64 {
    1
}

/// The plaintext join tokens, kept by the manager for display; the cluster state holds hashes.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct TokenFile {
    worker: String,
    manager: String,
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
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }
    pub fn manager_cert(&self) -> PathBuf {
        self.root.join("manager.crt")
    }
    pub fn manager_key(&self) -> PathBuf {
        self.root.join("manager.key")
    }
    pub fn tokens(&self) -> PathBuf {
        self.root.join("join-tokens.json")
    }
    pub fn config(&self) -> PathBuf {
        self.root.join("config.json")
    }
    pub fn admin(&self) -> PathBuf {
        self.root.join("admin")
    }
}

/// The admin bundle `meshctl` reads: where control is and how to prove being an admin.
#[derive(Clone, Debug)]
pub struct AdminBundle {
    pub control: String,
    pub ca_pem: String,
    pub identity: Identity,
}

impl AdminBundle {
    pub fn load(dir: &Path) -> Result<AdminBundle, FileError> {
        Ok(AdminBundle {
            control: files::read_string(&dir.join("control"))?.trim().to_owned(),
            ca_pem: files::read_string(&dir.join("ca.crt"))?,
            identity: Identity {
                cert_pem: files::read_string(&dir.join("admin.crt"))?,
                key_pem: files::read_string(&dir.join("admin.key"))?,
            },
        })
    }

    fn write(&self, dir: &Path) -> Result<(), FileError> {
        files::create_private_dir(dir)?;
        files::write_atomic(&dir.join("ca.crt"), self.ca_pem.as_bytes(), PUBLIC)?;
        files::write_atomic(&dir.join("admin.crt"), self.identity.cert_pem.as_bytes(), PUBLIC)?;
        files::write_atomic(&dir.join("admin.key"), self.identity.key_pem.as_bytes(), SECRET)?;
        files::write_atomic(&dir.join("control"), format!("{}\n", self.control).as_bytes(), PUBLIC)
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
}

/// Creates a cluster in `root`: CA, this manager's identity, join tokens, state, admin bundle.
pub async fn init(
    root: &Path,
    config: ManagerConfig,
    cert_lifetime: Duration,
) -> Result<Created, ClusterError> {
    if cert_lifetime < MIN_CERT_LIFETIME {
        return Err(ClusterError::LifetimeTooShort {
            given: humantime::format_duration(cert_lifetime).to_string(),
        });
    }
    let dir = ManagerDir::new(root);
    for existing in [dir.state(), dir.ca_key(), dir.tokens(), dir.data_key()] {
        if existing.exists() {
            return Err(ClusterError::Exists(root.to_owned(), existing));
        }
    }
    files::create_private_dir(root)?;

    let cluster_id = ClusterId::random();
    let ca = ClusterCa::generate(&cluster_id)?;
    let worker_token = JoinToken::generate(&ca.digest());
    let manager_token = JoinToken::generate(&ca.digest());
    let manager_id = NodeId::random();
    let (manager_cert, manager_key) =
        ca.issue_with_new_key(&Subject::node(&cluster_id, &manager_id, Role::Manager, cert_lifetime))?;
    let (admin_cert, admin_key) = ca.issue_with_new_key(&Subject::admin(&cluster_id))?;

    files::write_atomic(&dir.ca_cert(), ca.cert_pem().as_bytes(), PUBLIC)?;
    files::write_atomic(&dir.ca_key(), ca.key_pem().as_bytes(), SECRET)?;
    files::write_atomic(&dir.manager_cert(), manager_cert.as_bytes(), PUBLIC)?;
    files::write_atomic(&dir.manager_key(), manager_key.as_bytes(), SECRET)?;
    let tokens = TokenFile { worker: worker_token.to_string(), manager: manager_token.to_string() };
    files::write_atomic(&dir.tokens(), &serde_json::to_vec_pretty(&tokens).expect("serializes"), SECRET)?;
    AdminBundle {
        control: config.advertise.to_string(),
        ca_pem: ca.cert_pem().to_owned(),
        identity: Identity { cert_pem: admin_cert, key_pem: admin_key },
    }
    .write(&dir.admin())?;

    let now = OffsetDateTime::now_utc().unix_timestamp();
    let commands = [
        Command::SetToken { role: Role::Worker, hash: worker_token.secret_hash() },
        Command::SetToken { role: Role::Manager, hash: manager_token.secret_hash() },
        Command::AddNode(NodeRecord {
            id: manager_id.clone(),
            hostname: hostname(),
            role: Role::Manager,
            state: NodeState::Active,
            joined_at: now,
            cert_not_after: CertInfo::from_pem(&manager_cert)?.not_after.unix_timestamp(),
            labels: Default::default(),
            underlay: None,
            index: 0,
        }),
    ];
    // The state file is written last: its presence is what marks a complete cluster.
    let data_key = DataKey::generate();
    data_key.save(&dir.data_key())?;
    let initial = ClusterState::new(cluster_id.clone(), cert_lifetime);
    let store =
        Store::open(&dir.state(), data_key, initial, config.raft_id, &config.advertise.to_string(), true)
            .await?;
    store.apply_all(commands.into()).await?;
    store.snapshot().await?;
    store.shutdown().await;
    drop(store);
    // The config is written last: its presence is what marks a complete cluster.
    files::write_atomic(&dir.config(), &serde_json::to_vec_pretty(&config).expect("serializes"), SECRET)?;

    Ok(Created { cluster_id, manager_id, worker_token, manager_token, admin_dir: dir.admin(), config })
}

/// An existing cluster, opened to be served.
pub struct Opened {
    pub dir: ManagerDir,
    pub config: ManagerConfig,
    pub store: Store,
    pub ca: ClusterCa,
    pub manager_identity: Identity,
}

pub async fn open(root: &Path) -> Result<Opened, ClusterError> {
    let dir = ManagerDir::new(root);
    if !dir.config().exists() {
        return Err(ClusterError::Missing(root.to_owned(), dir.config()));
    }
    let config_path = dir.config();
    let config: ManagerConfig = serde_json::from_str(&files::read_string(&config_path)?)
        .map_err(|e| ClusterError::Corrupt { path: config_path, error: e.to_string() })?;
    let ca = ClusterCa::load(&files::read_string(&dir.ca_cert())?, &files::read_string(&dir.ca_key())?)?;
    let cluster_id =
        CertInfo::from_pem(ca.cert_pem())?.organization.parse().map_err(|e: crate::ids::InvalidId| {
            ClusterError::Corrupt { path: dir.ca_cert(), error: e.to_string() }
        })?;
    // The state comes from the store's snapshot and log; this is only the empty shape.
    let initial = ClusterState::new(cluster_id, DEFAULT_CERT_LIFETIME);
    let key = DataKey::load(&dir.data_key())?;
    let store =
        Store::open(&dir.state(), key, initial, config.raft_id, &config.advertise.to_string(), false).await?;
    let manager_identity = open_identity(&dir)?;
    Ok(Opened { dir, config, store, ca, manager_identity })
}

impl ManagerDir {
    /// The current plaintext token for `role`.
    pub fn read_token(&self, role: Role) -> Result<JoinToken, ClusterError> {
        let path = self.tokens();
        let file: TokenFile = serde_json::from_str(&files::read_string(&path)?)
            .map_err(|e| ClusterError::Corrupt { path: path.clone(), error: e.to_string() })?;
        let text = match role {
            Role::Worker => file.worker,
            Role::Manager => file.manager,
        };
        text.parse().map_err(|error| ClusterError::BadToken { path, error })
    }

    /// Records a new plaintext token for `role`.
    pub fn write_token(&self, role: Role, token: &JoinToken) -> Result<(), ClusterError> {
        let path = self.tokens();
        let mut file: TokenFile = serde_json::from_str(&files::read_string(&path)?)
            .map_err(|e| ClusterError::Corrupt { path: path.clone(), error: e.to_string() })?;
        match role {
            Role::Worker => file.worker = token.to_string(),
            Role::Manager => file.manager = token.to_string(),
        }
        files::write_atomic(&path, &serde_json::to_vec_pretty(&file).expect("serializes"), SECRET)?;
        Ok(())
    }

    /// Replaces this manager's own certificate and key.
    pub fn write_manager_identity(&self, identity: &Identity) -> Result<(), FileError> {
        files::write_atomic(&self.manager_key(), identity.key_pem.as_bytes(), SECRET)?;
        files::write_atomic(&self.manager_cert(), identity.cert_pem.as_bytes(), PUBLIC)
    }
}

/// This host's name, for node records.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// This manager's current certificate and key.
pub fn open_identity(dir: &ManagerDir) -> Result<Identity, FileError> {
    Ok(Identity {
        cert_pem: files::read_string(&dir.manager_cert())?,
        key_pem: files::read_string(&dir.manager_key())?,
    })
}
