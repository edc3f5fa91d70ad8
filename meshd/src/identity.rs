//! The node's identity: joining the cluster (CA pinned by the join token, key generated here,
//! CSR sent with the token) and renewing the certificate over mTLS with a fresh key.
//!
//! ```text
//! DIR/ca.crt     the cluster's root CA, checked against the token's digest at join
//! DIR/node.crt   this node's certificate (CN = node ID, OU = role, O = cluster ID)
//! DIR/node.key   its private key, never sent anywhere (0600)
//! DIR/control    the managers' control addresses, one per line (kept current from the session)
//! ```

use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_api::bundle::{addresses, write_addresses};
use mesh_api::client::{self, ClientError};
use mesh_api::files::{self, FileError, PUBLIC, SECRET};
use mesh_api::ids::NodeId;
use mesh_api::join::{self, JoinError, check_issued, key_and_csr};
use mesh_api::pki::{self, CertInfo};
use mesh_api::proto::pb;
use mesh_api::tls::{Identity, ServerTrust};
use mesh_api::tokens::TokenError;
use rand::Rng;
use rcgen::KeyPair;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0} already holds a joined node ({1} exists); refusing to join again")]
    AlreadyJoined(PathBuf, PathBuf),
    #[error("{0} holds no node identity; run `meshd join` first")]
    NotJoined(PathBuf),
    #[error("malformed join token: {0}")]
    Token(TokenError),
    #[error(
        "the CA served by {control} has digest {served}, but the join token pins {pinned}; \
         refusing to join (nothing was sent or written)"
    )]
    CaMismatch { control: String, served: String, pinned: String },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("key generation or CSR failed: {0}")]
    Key(#[from] rcgen::Error),
    #[error("control returned a certificate that {0}")]
    BadCertificate(String),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("no control address given")]
    NoManager,
}

impl From<JoinError> for IdentityError {
    fn from(e: JoinError) -> IdentityError {
        match e {
            JoinError::Token(e) => IdentityError::Token(e),
            JoinError::CaMismatch { control, served, pinned } => {
                IdentityError::CaMismatch { control, served, pinned }
            }
            JoinError::BadCertificate(what) => IdentityError::BadCertificate(what),
            JoinError::Client(e) => IdentityError::Client(e),
            JoinError::Pki(e) => IdentityError::Pki(e),
            JoinError::Tls(e) => IdentityError::Client(ClientError::Tls(e)),
            JoinError::Key(e) => IdentityError::Key(e),
            JoinError::NoManager => IdentityError::NoManager,
        }
    }
}

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
        let ca_pem = files::read_string(&self.ca())?;
        let managers = addresses(&files::read_string(&self.control())?);
        let info = CertInfo::from_pem(&cert_pem)?;
        let id = info.common_name.parse().map_err(|e| IdentityError::BadCertificate(format!("{e}")))?;
        Ok(NodeIdentity { id, info, ca_pem, identity: Identity { cert_pem, key_pem }, managers })
    }

    /// Records the managers' addresses, when they changed.
    pub fn set_managers(&self, managers: &[String]) -> Result<(), FileError> {
        let current = files::read_string(&self.control()).map(|t| addresses(&t)).unwrap_or_default();
        if managers.is_empty() || current == managers {
            return Ok(());
        }
        write_addresses(&self.control(), managers)
    }
}

/// What a joined node holds.
#[derive(Clone, Debug)]
pub struct NodeIdentity {
    pub id: NodeId,
    pub info: CertInfo,
    pub ca_pem: String,
    pub identity: Identity,
    /// The managers' control addresses.
    pub managers: Vec<String>,
}

impl NodeIdentity {
    /// A channel to the leading manager, over mTLS with the node certificate.
    pub async fn leader(&self) -> Result<client::Leader, IdentityError> {
        let ca_der = pki::pem_to_der(&self.ca_pem)?;
        let config = mesh_api::tls::client_config(ServerTrust::Ca(&ca_der), Some(&self.identity))
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
    files::write_atomic(&node_dir.ca(), joined.ca_pem.as_bytes(), PUBLIC)?;
    write_addresses(&node_dir.control(), &joined.managers)?;
    files::write_atomic(&node_dir.key(), joined.identity.key_pem.as_bytes(), SECRET)?;
    files::write_atomic(&node_dir.cert(), joined.identity.cert_pem.as_bytes(), PUBLIC)?;
    Ok(joined.id)
}

/// Renews the node's certificate: a fresh key pair, a CSR sent over mTLS with the current
/// certificate, and the new pair stored (key first, so a crash never leaves a certificate
/// without its key).
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
    check_issued(&response.cert_pem, &current.ca_pem, &key, Some(&current.id))?;
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
}

/// A workload's identity: its certificate (SPIFFE ID `spiffe://<cluster>/svc/<service>`) and key.
#[derive(Clone, Debug)]
pub struct WorkloadIdentity {
    pub identity: Identity,
    pub not_after: OffsetDateTime,
}

/// Asks control for a certificate for endpoint `service.slot` on this node: a fresh key pair made
/// here, a CSR over mTLS with the node certificate. Control refuses endpoints not placed here.
pub async fn workload_certificate(
    dir: &Path,
    service: &str,
    slot: u32,
) -> Result<WorkloadIdentity, IdentityError> {
    let node = NodeDir::new(dir).load()?;
    let ca_der = pki::pem_to_der(&node.ca_pem)?;
    let (key, csr_pem) = key_and_csr()?;
    let leader = node.leader().await?;
    let response = pb::identity_client::IdentityClient::new(leader.channel)
        .issue_workload_cert(pb::WorkloadCertRequest { service: service.to_owned(), slot, csr_pem })
        .await
        .map_err(|s| ClientError::refused(&leader.addr, s))?
        .into_inner();
    let der = pki::pem_to_der(&response.cert_pem)?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    let (_, ca_cert) =
        X509Certificate::from_der(&ca_der).map_err(|e| IdentityError::BadCertificate(e.to_string()))?;
    cert.verify_signature(Some(ca_cert.public_key()))
        .map_err(|_| IdentityError::BadCertificate("is not signed by the cluster CA".into()))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(IdentityError::BadCertificate("is not for the key this node generated".into()));
    }
    let want = format!("/svc/{service}");
    let has_id = cert.subject_alternative_name().ok().flatten().is_some_and(|san| {
        san.value
            .general_names
            .iter()
            .any(|n| matches!(n, x509_parser::extensions::GeneralName::URI(u) if u.ends_with(&want)))
    });
    if !has_id {
        return Err(IdentityError::BadCertificate(format!("does not carry the SPIFFE ID of `{service}`")));
    }
    Ok(WorkloadIdentity {
        identity: Identity { cert_pem: response.cert_pem, key_pem: key.serialize_pem() },
        not_after: cert.validity().not_after.to_datetime(),
    })
}
