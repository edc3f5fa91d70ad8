//! Root CA rotation (`meshctl cluster ca --rotate`), as docker swarm does it:
//!
//! 1. **Start** (an admin asks): a new root (generated, or the operator's) is cross-signed by the
//!    current one and signs every certificate from then on, the cross-signature carried after
//!    each. Nodes are sent both roots with the cross-signature ([`mesh_api::trust`]): a node takes
//!    the new root only with that proof, then renews at once (its workload certificates first,
//!    then its node certificate). A peer that still trusts only the old root verifies the new
//!    certificates through the cross-signature, so nothing breaks in between.
//! 2. **Progress**: a node is done once the certificate control last issued it is the new root's
//!    ([`crate::state::NodeRecord::cert_root`]). Managers renew their own at once.
//! 3. **Finish** (the leader, once every manager and every worker not down is done): the old root
//!    is trusted no more anywhere, and the join tokens pin the new one. A worker that was down
//!    throughout holds a certificate nobody trusts: it is told to join again.

use std::sync::Arc;

use mesh_api::files::{self, PUBLIC};
use mesh_api::ids::NodeId;
use mesh_api::tokens::Role;
use mesh_api::trust::{Root, Trust};
use time::OffsetDateTime;
use tonic::Status;
use tracing::{info, warn};

use super::{CaView, Manager};
use crate::ca::cfssl::{self, Cfssl};
use crate::ca::{CaError, ClusterCa, Signer, Subject};
use crate::state::{CaRecord, Command, ExternalCa, NodeState, Secret};

/// The root a rotation goes to.
#[derive(Clone)]
pub enum NewRoot {
    /// One the leader makes.
    Made,
    /// The operator's, with its key (PEM both).
    Given { cert_pem: String, key_pem: String },
    /// An external CA's root, and the CFSSL server at `url` (with its auth key, hex) that signs
    /// with it: the managers hold no CA key from then on.
    External { cert_pem: String, url: String, auth_key: String },
}

impl std::fmt::Debug for NewRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NewRoot::Made => f.write_str("Made"),
            NewRoot::Given { .. } => f.write_str("Given { <redacted> }"),
            NewRoot::External { url, .. } => {
                f.debug_struct("External").field("url", url).finish_non_exhaustive()
            }
        }
    }
}

/// The certificate of `cross_pem` (an operator's file) that vouches for `new_pem` to holders of
/// `current`, alone and re-encoded (nothing else of the file goes into the slices), valid now and
/// for 30 days at least.
fn vouching(current: &Trust, new_pem: &str, cross_pem: &str, now: OffsetDateTime) -> Result<String, Status> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let offered = Trust::from_pem(new_pem).map_err(|e| Status::internal(e.to_string()))?;
    let mut why = String::from("the file holds no certificate");
    for der in CertificateDer::pem_slice_iter(cross_pem.as_bytes()) {
        let der = der.map_err(|e| Status::invalid_argument(format!("the cross-signature: {e}")))?;
        let pem = mesh_api::trust::pem(&der);
        if let Err(e) = current.accept(&offered, &pem) {
            why = e.to_string();
            continue;
        }
        let info =
            mesh_api::pki::CertInfo::from_der(&der).map_err(|e| Status::invalid_argument(e.to_string()))?;
        if info.not_before > now || info.not_after < now + std::time::Duration::from_secs(30 * 24 * 3600) {
            return Err(Status::invalid_argument(format!(
                "the cross-signature is valid from {} to {}: it must be valid now and for 30 days at least",
                info.not_before, info.not_after
            )));
        }
        return Ok(pem);
    }
    Err(Status::invalid_argument(format!("the cross-signature does not vouch for the new root: {why}")))
}

/// A root whose key the managers hold: its record, digest and certificate (DER).
fn own_root(ca: ClusterCa) -> (CaRecord, String, Vec<u8>) {
    let record =
        CaRecord { cert_pem: ca.cert_pem().to_owned(), key_pem: Secret(ca.key_pem()), external: None };
    (record, ca.digest(), ca.cert_der().to_vec())
}

/// The roots, and how far a rotation under way is.
#[derive(Clone, Debug)]
pub struct CaProgress {
    pub roots: Vec<Root>,
    pub rotation: Option<RotationProgress>,
}

/// A rotation under way.
#[derive(Clone, Debug)]
pub struct RotationProgress {
    /// Unix seconds.
    pub started_at: i64,
    /// Active nodes, managers included.
    pub total: usize,
    /// Those whose certificate is the new root's.
    pub done: usize,
    /// Those whose certificate is not yet.
    pub late: Vec<Late>,
}

/// A node that has not renewed from the new root yet.
#[derive(Clone, Debug)]
pub struct Late {
    pub id: NodeId,
    pub hostname: String,
    pub role: Role,
    /// A worker that is down: the rotation does not wait for it, and it must join again.
    pub offline: bool,
}

impl RotationProgress {
    /// Whether nothing is left to wait for.
    pub fn finished(&self) -> bool {
        self.late.iter().all(|l| l.offline)
    }
}

impl Manager {
    /// The roots and a rotation's progress, as the state has them now.
    pub fn ca_progress(&self) -> Result<CaProgress, Status> {
        let live = self.liveness();
        let (trust_pem, rotation, nodes) = self.store.read(|s| {
            let nodes: Vec<_> = s.nodes.values().filter(|n| n.state == NodeState::Active).cloned().collect();
            (s.trust_pem(), s.ca_rotation.clone(), nodes)
        });
        let trust = Trust::from_pem(&trust_pem)
            .map_err(|e| Status::internal(format!("the roots in the state are unusable: {e}")))?;
        let newest = trust.newest().digest.clone();
        let rotation = rotation.map(|r| {
            let late: Vec<Late> = nodes
                .iter()
                .filter(|n| n.cert_root != newest)
                .map(|n| Late {
                    id: n.id.clone(),
                    hostname: n.hostname.clone(),
                    role: n.role,
                    offline: n.role == Role::Worker && !live.not_down.contains(&n.id),
                })
                .collect();
            RotationProgress {
                started_at: r.started_at,
                total: nodes.len(),
                done: nodes.len() - late.len(),
                late,
            }
        });
        Ok(CaProgress { roots: trust.roots().to_vec(), rotation })
    }

    /// Starts a root rotation to `new`. The current root cross-signs it, or, when no manager
    /// holds the current root's key (an external CA), `cross_pem` is that cross-signature, made
    /// by the operator.
    pub async fn rotate_ca(&self, new: NewRoot, cross_pem: Option<String>) -> Result<(), Status> {
        self.lead()?;
        if self.store.read(|s| s.ca_rotation.is_some()) {
            return Err(Status::failed_precondition(
                "a root CA rotation is under way already; `meshctl cluster ca` shows its progress",
            ));
        }
        let old = self.ca()?;
        if let (NewRoot::Made, Err(e)) = (&new, old.own("cross-sign a new root")) {
            return Err(Status::failed_precondition(format!(
                "{e}: rotate to a root given with --ca-cert (an external CA's, with --external-ca, or \
                 one with its --ca-key), and --cross-cert, that root cross-signed by the current one"
            )));
        }
        let now = OffsetDateTime::now_utc();
        let given = |e: CaError| Status::invalid_argument(e.to_string());
        let (record, new_digest, new_der) = match new {
            NewRoot::Made => {
                let name = format!("mesh root CA {}", now.unix_timestamp());
                own_root(
                    ClusterCa::generate_named(&self.cluster_id, &name)
                        .map_err(|e| Status::internal(e.to_string()))?,
                )
            }
            NewRoot::Given { cert_pem, key_pem } => {
                own_root(ClusterCa::given(&self.cluster_id, &cert_pem, &key_pem).map_err(given)?)
            }
            NewRoot::External { cert_pem, url, auth_key } => {
                let root = crate::ca::check_new_root(&self.cluster_id, &cert_pem).map_err(given)?;
                let key = cfssl::parse_auth_key(&auth_key).map_err(Status::invalid_argument)?;
                let signer = Cfssl::new(&url, &key, &root.pem).map_err(given)?;
                // The new signer refuses to sign without authentication, and signs with it for a
                // node that does not exist (its key thrown away), before anything depends on it.
                signer.check_signer().await.map_err(|e| e.status())?;
                let lifetime = self.store.read(|s| s.cert_lifetime());
                Signer::External(signer)
                    .issue_with_new_key(&Subject::node(
                        &self.cluster_id,
                        &NodeId::random(),
                        Role::Worker,
                        lifetime,
                    ))
                    .await
                    .map_err(|e| {
                        Status::failed_precondition(format!("the new external CA does not sign: {e}"))
                    })?;
                let record = CaRecord {
                    cert_pem: root.pem.clone(),
                    key_pem: Secret(String::new()),
                    external: Some(ExternalCa { url, auth_key: Secret(auth_key) }),
                };
                (record, root.digest, root.der)
            }
        };
        if new_digest == old.digest() {
            return Err(Status::invalid_argument("the root given is the current root"));
        }
        let old_trust = Trust::from_pem(old.cert_pem()).map_err(|e| Status::internal(e.to_string()))?;
        let key_of = |der: &[u8]| {
            x509_parser::parse_x509_certificate(der).map(|(_, c)| c.public_key().raw.to_vec()).ok()
        };
        if key_of(&new_der) == key_of(&old_trust.newest().der) {
            return Err(Status::invalid_argument(
                "the root given has the current root's key: a rotation must replace the key",
            ));
        }
        let cross_pem = match (cross_pem, old.own("cross-sign the new root")) {
            (Some(cross), _) => vouching(&old_trust, &record.cert_pem, &cross, now)?,
            (None, Ok(own)) => own.cross_sign(&new_der).map_err(|e| Status::internal(e.to_string()))?,
            (None, Err(e)) => {
                return Err(Status::failed_precondition(format!(
                    "{e}: give --cross-cert, the new root cross-signed by the current one (`cfssl sign` \
                     with the current root's key and a profile of `ca_constraint` is_ca, usages `cert sign`)"
                )));
            }
        };
        // What every node will check before it takes the new root: checked here first.
        let offered = Trust::from_pem(&record.cert_pem).map_err(|e| Status::internal(e.to_string()))?;
        old_trust.accept(&offered, &cross_pem).map_err(|e| {
            Status::invalid_argument(format!("the cross-signature does not vouch for the new root: {e}"))
        })?;
        let old_pem = old.cert_pem().to_owned();
        let start = Command::StartCaRotation { ca: record, cross_pem, started_at: now.unix_timestamp() };
        self.change(move |state, _| {
            // Cross-signed by the root that signs now, or by none.
            if state.ca_rotation.is_some() || state.ca.as_ref().is_none_or(|c| c.cert_pem != old_pem) {
                return Err(crate::plans::PlanError::State(crate::state::StateError::CaRotating));
            }
            Ok(vec![start])
        })
        .await?;
        info!(old = %old.digest(), new = %new_digest, "root CA rotation started");
        Ok(())
    }

    /// Follows the roots in the state until this manager stops: puts each change in place (its
    /// `ca.crt`, the control port, raft), renews its own certificate at once when the signing
    /// root is not the one that signed it, and on the leader ends a rotation once it is done.
    pub(crate) async fn follow_trust(self: Arc<Self>) {
        let mut revisions = self.store.subscribe();
        loop {
            if let Err(e) = self.refresh_trust().await {
                warn!(error = %e, "following the cluster's roots failed; will retry");
            }
            if self.store.leadership().leading
                && let Err(e) = self.finish_rotation_if_done().await
            {
                warn!(error = %e, "ending the root CA rotation failed; will retry");
            }
            // A change, or a moment later (nodes' renewals arrive as state changes too; a node
            // going down does not).
            let _ = tokio::time::timeout(std::time::Duration::from_secs(2), revisions.changed()).await;
        }
    }

    async fn refresh_trust(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let (pem, cross_pem, proof) =
            self.store.read(|s| (s.trust_pem(), s.cross_pem().to_owned(), s.slice_cross_pem().to_owned()));
        if pem.is_empty() {
            return Ok(()); // no state received yet
        }
        let current = self.ca_view();
        if current.trust.to_pem() != pem || current.cross_pem != cross_pem {
            // As every node does: a new root only with a cross-signature by a root trusted here,
            // whoever wrote the state.
            let trust = current.trust.accept(&Trust::from_pem(&pem)?, &proof)?;
            files::write_atomic(&self.dir.ca_cert(), pem.as_bytes(), PUBLIC)?;
            let identity = self.identity()?;
            info!(roots = %trust.digests(), "the cluster's roots changed; now trusted");
            let dropped = current.trust.drops_any(&trust);
            self.set_ca_view(CaView { trust, cross_pem }, &identity)?;
            if dropped {
                // A connection's certificate is checked at its handshake only: one opened with a
                // certificate of the root dropped (its key stolen, say) would outlive the root.
                // Every client reconnects, with what the roots of now accept.
                warn!("a root is trusted no more: cutting every open connection (clients reconnect)");
                self.close_all();
            }
        }
        let view = self.ca_view();
        if !view.trust.signed_by_newest(&self.identity()?.cert_pem) {
            self.renew_own_certificate().await?;
        }
        Ok(())
    }

    async fn finish_rotation_if_done(&self) -> Result<(), Status> {
        let Some(rotation) = self.ca_progress()?.rotation else { return Ok(()) };
        if !rotation.finished() {
            return Ok(());
        }
        let offline: Vec<String> =
            rotation.late.iter().map(|l| format!("{} ({})", l.id, l.hostname)).collect();
        let digest = self.ca()?.digest();
        self.change(move |state, _| {
            if state.ca_rotation.is_none() {
                return Ok(vec![]);
            }
            // New tokens: the old ones' secrets may have left with whatever the old root's key
            // left with (a stolen disk, a compromised manager).
            let mut commands = vec![Command::FinishCaRotation];
            for role in [Role::Worker, Role::Manager] {
                commands.push(Command::set_token(role, &mesh_api::tokens::JoinToken::generate(&digest)));
            }
            Ok(commands)
        })
        .await?;
        info!(nodes = rotation.total, ?offline, "root CA rotation finished: the old root is trusted no more");
        Ok(())
    }
}
