//! Joining a cluster, as meshd (a worker) and `mesh-control join` (a manager) both do: fetch the
//! root CA and pin it against the digest in the join token before sending anything, then send
//! the token with a CSR for a key pair made here. The private key never leaves this host; the
//! node ID and role are control's to assign.

use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::client::{self, ClientError};
use crate::ids::NodeId;
use crate::pki::{self, CertInfo, PkiError};
use crate::proto::pb;
use crate::tls::{self, Identity, ServerTrust};
use crate::tokens::{JoinToken, TokenError};
use crate::trust::{Trust, TrustError};

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("malformed join token: {0}")]
    Token(#[from] TokenError),
    #[error(
        "the CA served by {control} has digest {served}, but the join token pins {pinned}; \
         refusing to join (wrong control address, or an impostor)"
    )]
    CaMismatch { control: String, served: String, pinned: String },
    #[error("control returned a certificate that {0}")]
    BadCertificate(String),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("the root CA bundle served is unusable: {0}")]
    Trust(#[from] TrustError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("making a key pair or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("no manager address given")]
    NoManager,
}

/// What a join gave: the identity and where it is from.
pub struct Joined {
    pub id: NodeId,
    pub node_index: u32,
    /// The roots trusted: the one the token pinned, and a successor it cross-signed.
    pub trust: Trust,
    pub identity: Identity,
    /// Every manager's control address.
    pub managers: Vec<String>,
    /// Every manager's node ID, as the leader named them.
    pub manager_ids: Vec<String>,
    /// For a manager: the cluster is autolocked.
    pub autolock: bool,
}

/// A fresh P-256 key pair and a CSR for it. The CSR's subject is left empty: control assigns it.
pub fn key_and_csr() -> Result<(KeyPair, String), JoinError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let csr = CertificateParams::default().serialize_request(&key)?.pem()?;
    Ok((key, csr))
}

/// Checks that `cert_pem` (a chain, leaf first) chains to a root of `trust`, is for `key`, and
/// (when given) names `expected`.
pub fn check_issued(
    cert_pem: &str,
    trust: &Trust,
    key: &KeyPair,
    expected: Option<&NodeId>,
) -> Result<NodeId, JoinError> {
    let bad = |what: &str| JoinError::BadCertificate(what.to_owned());
    let der = pki::pem_to_der(cert_pem)?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| bad(&e.to_string()))?;
    trust.root_of(cert_pem).map_err(|e| bad(&format!("is not signed by the cluster CA: {e}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(bad("is not for the key this node generated"));
    }
    let id: NodeId = CertInfo::from_der(&der)?
        .common_name
        .parse()
        .map_err(|e| JoinError::BadCertificate(format!("{e}")))?;
    if let Some(expected) = expected
        && &id != expected
    {
        return Err(bad(&format!("names node {id}, not this node {expected}")));
    }
    Ok(id)
}

/// Joins through any of `managers` with `token` (the leader is found from whichever answers);
/// with `manager`, only a manager token is accepted.
pub async fn join(
    managers: &[String],
    token: &str,
    hostname: &str,
    manager: bool,
) -> Result<Joined, JoinError> {
    let token: JoinToken = token.parse()?;
    let first = managers.first().ok_or(JoinError::NoManager)?;
    // Pin the CA before trusting or sending anything: the root the token names, and during a
    // root rotation its successor, if the old one cross-signed it.
    let (bundle_pem, cross_pem) = client::fetch_root_ca(first).await?;
    let served = Trust::from_pem(&bundle_pem)?;
    let pinned = served.roots().iter().find(|r| r.digest == token.ca_digest()).ok_or_else(|| {
        JoinError::CaMismatch {
            control: first.clone(),
            served: served.digests(),
            pinned: token.ca_digest().to_owned(),
        }
    })?;
    let trust = Trust::from_pem(&pinned.pem)?.accept(&served, &cross_pem).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "the served root CA bundle is trusted only as far as the token pins it");
        Trust::from_pem(&pinned.pem).expect("parsed once already")
    });
    let leader = client::leader(managers, tls::client_config(ServerTrust::Ca(&trust), None)?).await?;
    let (key, csr_pem) = key_and_csr()?;
    let response = pb::identity_client::IdentityClient::new(leader.channel)
        .join(pb::JoinRequest { token: token.to_string(), csr_pem, hostname: hostname.to_owned(), manager })
        .await
        .map_err(|s| ClientError::refused(&leader.addr, s))?
        .into_inner();
    let id = check_issued(&response.cert_pem, &trust, &key, None)?;
    if response.node_id != id.as_str() {
        return Err(JoinError::BadCertificate(format!(
            "names node {id}, but control said {}",
            response.node_id
        )));
    }
    Ok(Joined {
        id,
        node_index: response.node_index,
        trust,
        identity: Identity { cert_pem: response.cert_pem, key_pem: key.serialize_pem() },
        managers: if leader.managers.is_empty() { managers.to_vec() } else { leader.managers },
        manager_ids: leader.manager_ids,
        autolock: response.autolock,
    })
}

/// This host's name, for node records.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}
