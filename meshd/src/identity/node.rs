//! The node certificate: joining the cluster (CA pinned by the join token, key generated here,
//! CSR sent with the token), renewing it over mTLS with a fresh key, and the loop that keeps it
//! renewed and publishes each renewal.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mesh_api::bundle::{MANAGER_IDS, addresses, read_ids, write_addresses};
use mesh_api::client::{self, ClientError};
use mesh_api::files::{self, FileError, PUBLIC, SECRET};
use mesh_api::ids::NodeId;
use mesh_api::join::{self, check_issued, key_and_csr};
use mesh_api::pki::{self, CertInfo};
use mesh_api::proto::pb;
use mesh_api::specs::PinnedKey;
use mesh_api::tls::{Identity, ServerTrust};
use mesh_api::trust::Trust;
use rand::Rng;
use rcgen::KeyPair;
use time::OffsetDateTime;
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info, warn};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::IdentityError;
use crate::backoff;

/// Paths in a node's state directory.
#[derive(Clone, Debug)]
pub struct NodeDir {
    pub root: PathBuf,
}

impl NodeDir {
    pub fn new(root: &Path) -> NodeDir {
        NodeDir { root: root.to_owned() }
    }
    pub fn ca(&self) -> PathBuf {
        self.root.join("ca.crt")
    }
    pub fn cert(&self) -> PathBuf {
        self.root.join("node.crt")
    }
    pub fn key(&self) -> PathBuf {
        self.root.join("node.key")
    }
    /// The next key, written before the certificate for it during a renewal.
    fn next_key(&self) -> PathBuf {
        self.root.join("node.key.next")
    }
    pub fn control(&self) -> PathBuf {
        self.root.join("control")
    }
    /// The managers' node IDs: the only certificates accepted as control.
    pub fn manager_ids(&self) -> PathBuf {
        self.root.join(MANAGER_IDS)
    }
    /// The operator's spec-signing public key, pinned at join.
    pub fn spec_key(&self) -> PathBuf {
        self.root.join(mesh_api::specs::PUBLIC_FILE)
    }
    /// Per service, the newest signed spec admitted here (what bounds replays).
    pub fn spec_seen(&self) -> PathBuf {
        self.root.join("spec-seen.json")
    }

    /// Pins `key` before the node joins: from then on it runs only commands whose spec the
    /// operator signed with it. Refused once the node has joined (no one changes it after).
    pub fn pin_spec_key(&self, key: &PinnedKey) -> Result<(), IdentityError> {
        if self.cert().exists() {
            return Err(IdentityError::AlreadyJoined(self.root.clone(), self.cert()));
        }
        files::create_private_dir(&self.root)?;
        files::write_atomic(&self.spec_key(), format!("{key}\n").as_bytes(), PUBLIC)?;
        Ok(())
    }

    /// The pinned spec-signing key, if the node pinned one; a file that holds no key is an error
    /// (never read as "none pinned").
    fn pinned_spec_key(&self) -> Result<Option<PinnedKey>, IdentityError> {
        let path = self.spec_key();
        if !path.exists() {
            return Ok(None);
        }
        let text = files::read_string(&path)?;
        text.parse().map(Some).map_err(|e| IdentityError::SpecKey(format!("{}: {e}", path.display())))
    }

    /// The node's current identity. Completes a renewal a crash interrupted between writing the
    /// new certificate and moving its key into place.
    pub fn load(&self) -> Result<NodeIdentity, IdentityError> {
        if !self.cert().exists() {
            return Err(IdentityError::NotJoined(self.root.clone()));
        }
        let cert_pem = files::read_string(&self.cert())?;
        let mut key_pem = files::read_string(&self.key())?;
        if !key_matches(&cert_pem, &key_pem)? && self.next_key().exists() {
            let next = files::read_string(&self.next_key())?;
            if key_matches(&cert_pem, &next)? {
                std::fs::rename(self.next_key(), self.key())
                    .map_err(|e| FileError::new("renaming into place", &self.key(), e))?;
                key_pem = next;
            }
        }
        let trust = self.trust()?;
        let managers = addresses(&files::read_string(&self.control())?);
        let manager_ids = read_ids(&self.manager_ids())?;
        let info = CertInfo::from_pem(&cert_pem)?;
        let id = info.common_name.parse().map_err(|e| IdentityError::BadCertificate(format!("{e}")))?;
        let spec_key = self.pinned_spec_key()?;
        Ok(NodeIdentity {
            id,
            info,
            trust,
            identity: Identity { cert_pem, key_pem },
            managers,
            manager_ids,
            spec_key,
        })
    }

    /// The roots this node trusts (`ca.crt`).
    pub fn trust(&self) -> Result<Trust, IdentityError> {
        let pem = files::read_string(&self.ca())?;
        Trust::from_pem(&pem).map_err(|e| IdentityError::Trust(format!("{}: {e}", self.ca().display())))
    }

    /// Takes the roots a slice offers (`offered`, with the cross-signatures in `cross_pem`) as far
    /// as the roots trusted now vouch for them ([`Trust::accept`]), and records them; `Some` with
    /// the new roots when they changed. Roots vouched for by nothing are refused whole.
    pub fn accept_trust(&self, offered: &str, cross_pem: &str) -> Result<Option<Trust>, IdentityError> {
        let current = self.trust()?;
        if offered.is_empty() || offered == current.to_pem() {
            return Ok(None);
        }
        let offered =
            Trust::from_pem(offered).map_err(|e| IdentityError::Trust(format!("offered by control: {e}")))?;
        let accepted =
            current.accept(&offered, cross_pem).map_err(|e| IdentityError::Trust(e.to_string()))?;
        files::write_atomic(&self.ca(), accepted.to_pem().as_bytes(), PUBLIC)?;
        Ok(Some(accepted))
    }

    /// Records the managers' addresses and node IDs, when they changed.
    pub fn set_managers(&self, managers: &[String], ids: &[String]) -> Result<(), FileError> {
        let current = files::read_string(&self.control()).map(|t| addresses(&t)).unwrap_or_default();
        if !managers.is_empty() && current != managers {
            write_addresses(&self.control(), managers)?;
        }
        if !ids.is_empty() && read_ids(&self.manager_ids())? != ids {
            write_addresses(&self.manager_ids(), ids)?;
        }
        Ok(())
    }
}

/// What a joined node holds.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub id: NodeId,
    pub info: CertInfo,
    /// The roots trusted: the cluster's root CA, and its successor during a root rotation.
    pub trust: Trust,
    pub identity: Identity,
    /// The managers' control addresses.
    pub managers: Vec<String>,
    /// The managers' node IDs: only their certificates are accepted as control (none known in
    /// a state directory written before they were kept: any manager certificate of the CA).
    pub manager_ids: Vec<String>,
    /// The operator's spec-signing key, when the node pinned one at join: it then runs only
    /// commands whose spec that key signed.
    pub spec_key: Option<PinnedKey>,
}

impl NodeIdentity {
    /// A channel to the leading manager, over mTLS with the node certificate.
    pub async fn leader(&self) -> Result<client::Leader, IdentityError> {
        let trust = ServerTrust::Managers { ca: &self.trust, ids: &self.manager_ids };
        let config = mesh_api::tls::client_config(trust, Some(&self.identity))
            .map_err(|e| IdentityError::Client(ClientError::Tls(e)))?;
        Ok(client::leader(&self.managers, config).await?)
    }
}

fn key_matches(cert_pem: &str, key_pem: &str) -> Result<bool, IdentityError> {
    let key = KeyPair::from_pem(key_pem)?;
    let der = pki::pem_to_der(cert_pem)?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    Ok(cert.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// Joins the cluster through `control` (one manager address, or several separated by commas)
/// with `token`, storing the identity in `dir`.
pub async fn join(control: &str, token: &str, dir: &Path, hostname: &str) -> Result<NodeId, IdentityError> {
    let node_dir = NodeDir::new(dir);
    for existing in [node_dir.cert(), node_dir.key()] {
        if existing.exists() {
            return Err(IdentityError::AlreadyJoined(dir.to_owned(), existing));
        }
    }
    let joined = join::join(&addresses(control), token, hostname, false).await?;
    files::create_private_dir(dir)?;
    files::write_atomic(&node_dir.ca(), joined.trust.to_pem().as_bytes(), PUBLIC)?;
    write_addresses(&node_dir.control(), &joined.managers)?;
    write_addresses(&node_dir.manager_ids(), &joined.manager_ids)?;
    files::write_atomic(&node_dir.key(), joined.identity.key_pem.as_bytes(), SECRET)?;
    files::write_atomic(&node_dir.cert(), joined.identity.cert_pem.as_bytes(), PUBLIC)?;
    Ok(joined.id)
}

/// Renews the node's certificate: a fresh key pair, a CSR sent over mTLS with the current
/// certificate, and the new pair stored (key first, so a crash never leaves a certificate
/// without its key). A running agent renews through [`keep_renewed`] instead, so that what it
/// serves follows.
pub async fn renew(dir: &Path) -> Result<NodeIdentity, IdentityError> {
    let node_dir = NodeDir::new(dir);
    let current = node_dir.load()?;
    let (key, csr_pem) = key_and_csr()?;
    let leader = current.leader().await?;
    let response = pb::identity_client::IdentityClient::new(leader.channel)
        .renew(pb::RenewRequest { csr_pem })
        .await
        .map_err(|s| ClientError::refused(&leader.addr, s))?
        .into_inner();
    check_issued(&response.cert_pem, &current.trust, &key, Some(&current.id))?;
    files::write_atomic(&node_dir.next_key(), key.serialize_pem().as_bytes(), SECRET)?;
    files::write_atomic(&node_dir.cert(), response.cert_pem.as_bytes(), PUBLIC)?;
    std::fs::rename(node_dir.next_key(), node_dir.key())
        .map_err(|e| FileError::new("renaming into place", &node_dir.key(), e))?;
    node_dir.load()
}

/// When to renew a certificate valid from `not_before` to `not_after`: a random point between
/// 50 % and 80 % of its lifetime (so a fleet does not renew at once), as a delay from `now`.
pub fn renewal_delay(
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    now: OffsetDateTime,
    rng: &mut impl Rng,
) -> Duration {
    let lifetime = not_after - not_before;
    let fraction: f64 = rng.random_range(0.5..=0.8);
    let at: OffsetDateTime = not_before + lifetime * fraction;
    let delay: time::Duration = at - now;
    if delay.is_negative() { Duration::ZERO } else { delay.unsigned_abs() }
}

/// How the renewal loop is asked to renew now (`meshd renew` while the agent runs): each request
/// is where to send the outcome. One loop renews, so two renewals never interleave their writes
/// in the state directory.
pub type RenewNow = mpsc::Sender<RenewReply>;

/// Where a renewal asked for is answered: the renewed identity, or why there is none.
pub type RenewReply = oneshot::Sender<Result<Arc<NodeIdentity>, String>>;

/// Keeps the node certificate in `dir` renewed until an unrecoverable error (expired before a
/// renewal succeeded, or control refuses the node), publishing each renewed identity on
/// `published`: at the scheduled point of each certificate's lifetime (retrying with backoff),
/// and at once for each request that arrives on `now`.
pub async fn keep_renewed(
    dir: &Path,
    published: watch::Sender<Arc<NodeIdentity>>,
    mut now: mpsc::Receiver<RenewReply>,
) -> Result<(), IdentityError> {
    loop {
        let current = published.borrow().clone();
        let delay = renewal_delay(
            current.info.not_before,
            current.info.not_after,
            OffsetDateTime::now_utc(),
            &mut rand::rng(),
        );
        info!(node = %current.id, in_secs = delay.as_secs(), "next certificate renewal scheduled");
        let asked = tokio::select! {
            _ = tokio::time::sleep(delay) => None,
            Some(reply) = now.recv() => Some(reply),
        };
        let renewed = match asked {
            None => renew_with_retries(dir, &current).await?,
            Some(reply) => match renew(dir).await {
                Ok(renewed) => {
                    let renewed = Arc::new(renewed);
                    let _ = reply.send(Ok(renewed.clone()));
                    renewed
                }
                Err(e) => {
                    let _ = reply.send(Err(e.to_string()));
                    let e = retryable(&current, e)?;
                    warn!(node = %current.id, error = %e, "renewal asked for failed");
                    continue;
                }
            },
        };
        info!(node = %renewed.id, cert_expires = %renewed.info.not_after, "certificate renewed");
        published.send_replace(renewed);
    }
}

/// Renews `current` until it works, backing off between attempts.
async fn renew_with_retries(dir: &Path, current: &NodeIdentity) -> Result<Arc<NodeIdentity>, IdentityError> {
    let mut attempt = 0;
    loop {
        if OffsetDateTime::now_utc() >= current.info.not_after {
            error!(node = %current.id, "certificate expired before renewal succeeded");
            return Err(IdentityError::Expired(current.info.not_after));
        }
        match renew(dir).await {
            Ok(renewed) => return Ok(Arc::new(renewed)),
            Err(e) => {
                let e = retryable(current, e)?;
                let wait = backoff::delay(attempt);
                warn!(node = %current.id, error = %e, retry_in_ms = wait.as_millis() as u64, "renewal failed");
                tokio::time::sleep(wait).await;
                attempt += 1;
            }
        }
    }
}

/// A failed renewal that may be tried again, or (control refuses the node) the error that ends
/// the loop.
fn retryable(current: &NodeIdentity, e: IdentityError) -> Result<IdentityError, IdentityError> {
    match e {
        IdentityError::Client(e) if e.code() == Some(tonic::Code::PermissionDenied) => {
            error!(node = %current.id, error = %e, "control refuses this node");
            Err(IdentityError::Refused(e))
        }
        e => Ok(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn renewal_falls_between_half_and_four_fifths_of_the_lifetime() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let start = OffsetDateTime::from_unix_timestamp(1_000_000).unwrap();
        let end = start + time::Duration::hours(24);
        let (mut min, mut max) = (Duration::MAX, Duration::ZERO);
        for _ in 0..2000 {
            let d = renewal_delay(start, end, start, &mut rng);
            min = min.min(d);
            max = max.max(d);
        }
        assert!(min >= Duration::from_secs(12 * 3600), "{min:?}");
        assert!(max <= Duration::from_secs(24 * 3600 * 8 / 10), "{max:?}");
        // Spread, not a constant.
        assert!(max - min > Duration::from_secs(6 * 3600), "{min:?}..{max:?}");
        // Already past the point: renew now.
        assert_eq!(renewal_delay(start, end, end, &mut rng), Duration::ZERO);
    }

    /// A state directory holding a node certificate (self-signed, valid for 100 days), its key and
    /// a root of its own, whose only manager does not answer.
    fn state_dir() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let cluster = mesh_api::ids::ClusterId::random();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, NodeId::random().as_str());
        params.distinguished_name.push(rcgen::DnType::OrganizationalUnitName, "mesh-worker");
        params.distinguished_name.push(rcgen::DnType::OrganizationName, cluster.as_str());
        let now = OffsetDateTime::now_utc();
        (params.not_before, params.not_after) =
            (now - time::Duration::hours(1), now + time::Duration::days(100));
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap().pem();
        let node = NodeDir::new(dir.path());
        files::write_atomic(&node.cert(), cert.as_bytes(), PUBLIC).unwrap();
        files::write_atomic(&node.ca(), crate::identity::test_roots().to_pem().as_bytes(), PUBLIC).unwrap();
        files::write_atomic(&node.key(), key.serialize_pem().as_bytes(), SECRET).unwrap();
        write_addresses(&node.control(), &["127.0.0.1:1".to_owned()]).unwrap();
        dir
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_asked_for_is_tried_at_once_and_a_failed_one_is_answered_and_not_the_end() {
        let dir = state_dir();
        let node = Arc::new(NodeDir::new(dir.path()).load().unwrap());
        let (published, watching) = watch::channel(node);
        let (now, requests) = mpsc::channel(1);
        let (reply, outcome) = oneshot::channel();
        now.send(reply).await.unwrap();
        let path = dir.path().to_owned();
        let renewing = tokio::spawn(async move { keep_renewed(&path, published, requests).await });
        // Long before the scheduled renewal (50 days on): the paused clock only moves while the
        // renewal waits for a leader.
        let answer = tokio::time::timeout(Duration::from_secs(60), outcome).await.unwrap().unwrap();
        assert!(answer.unwrap_err().contains("127.0.0.1:1"), "the error names the manager tried");
        assert!(!watching.has_changed().unwrap(), "nothing renewed, nothing published");
        assert!(!renewing.is_finished(), "an unreachable control is retried later, not fatal");
    }
}
