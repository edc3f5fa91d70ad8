//! The cluster's certificate authority: a root CA (ECDSA P-256) that signs node, manager and admin
//! certificates. Nodes send CSRs; the issuer takes only the public key from them, and the subject
//! (node ID, role, cluster) is always control's own. Reading certificates is
//! [`mesh_api::pki`]'s, shared with the nodes.

use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType, DnValue,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, PublicKeyData,
    SanType, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use mesh_api::ids::{self, ClusterId, NodeId};
use mesh_api::pki::{
    ADMIN_CN, ADMIN_OU, CA_OU, CONTROL_SERVER_NAME, PkiError, SpiffeId, WORKLOAD_OU, pem_to_der,
};
use mesh_api::tokens::Role;

pub mod cfssl;

/// Lifetime of the root CA.
pub const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Certificates start this much in the past, to tolerate small clock differences between hosts.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why a certificate could not be issued or read.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("the CSR is not a valid PEM certificate signing request with a valid signature: {0}")]
    BadCsr(rcgen::Error),
    #[error("the CSR's key is {found}; only ECDSA P-256 keys are accepted")]
    CsrAlgorithm { found: String },
    #[error("could not sign a certificate: {0}")]
    Sign(rcgen::Error),
    #[error("could not load the CA from its PEM files: {0}")]
    Load(rcgen::Error),
    #[error("the root CA given cannot be used: {0}")]
    Given(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("the external CA at {url} cannot be reached ({error}); it was tried 3 times, try again later")]
    Unreachable { url: String, error: String },
    #[error("the external CA at {url} refused: {error}")]
    Signer { url: String, error: String },
    #[error("the external CA at {url} answered a certificate that is not taken: {why}")]
    Untrusted { url: String, why: String },
    #[error("this cluster's CA is external ({url}): its managers hold no CA key to {what}")]
    External { url: String, what: &'static str },
}

impl CaError {
    /// The gRPC status a request that needed this certificate fails with: the caller's fault for
    /// a bad CSR, worth retrying while the external CA is away.
    pub fn status(&self) -> tonic::Status {
        match self {
            CaError::BadCsr(_) | CaError::CsrAlgorithm { .. } => {
                tonic::Status::invalid_argument(self.to_string())
            }
            CaError::Unreachable { .. } => tonic::Status::unavailable(self.to_string()),
            CaError::Signer { .. } | CaError::Untrusted { .. } | CaError::External { .. } => {
                tonic::Status::failed_precondition(self.to_string())
            }
            _ => tonic::Status::internal(self.to_string()),
        }
    }
}

/// What signs the cluster's certificates: its own root, whose key the managers hold, or an
/// external CA they forward checked CSRs to.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)] // one per manager, behind an Arc
pub enum Signer {
    Own(ClusterCa),
    External(cfssl::Cfssl),
}

impl Signer {
    /// The digest of the root that signs.
    pub fn digest(&self) -> String {
        match self {
            Signer::Own(ca) => ca.digest(),
            Signer::External(external) => external.root_digest(),
        }
    }

    /// The certificate (PEM) of the root that signs.
    pub fn cert_pem(&self) -> &str {
        match self {
            Signer::Own(ca) => ca.cert_pem(),
            Signer::External(external) => external.root_pem(),
        }
    }

    /// The cluster's own root, or why there is none to `what`.
    pub fn own(&self, what: &'static str) -> Result<&ClusterCa, CaError> {
        match self {
            Signer::Own(ca) => Ok(ca),
            Signer::External(external) => Err(CaError::External { url: external.url().to_owned(), what }),
        }
    }

    /// [`ClusterCa::issue_for_csr`], by whichever CA signs.
    pub async fn issue_for_csr(&self, csr_pem: &str, subject: &Subject) -> Result<String, CaError> {
        match self {
            Signer::Own(ca) => ca.issue_for_csr(csr_pem, subject),
            Signer::External(external) => {
                let key = csr_key(csr_pem)?;
                external.sign(csr_pem, key.der_bytes(), subject).await
            }
        }
    }

    /// [`ClusterCa::issue_with_new_key`], by whichever CA signs.
    pub async fn issue_with_new_key(&self, subject: &Subject) -> Result<(String, String), CaError> {
        match self {
            Signer::Own(ca) => ca.issue_with_new_key(subject),
            Signer::External(external) => {
                let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
                let csr = CertificateParams::default()
                    .serialize_request(&key)
                    .and_then(|c| c.pem())
                    .map_err(CaError::Sign)?;
                let cert = external.sign(&csr, key.public_key_raw(), subject).await?;
                Ok((cert, key.serialize_pem()))
            }
        }
    }
}

/// A root `cert_pem` to rotate `cluster` to, given by the operator: one CA certificate with the
/// cluster ID as its O, valid now and for a year at least.
pub fn check_new_root(cluster: &ClusterId, cert_pem: &str) -> Result<mesh_api::trust::Root, CaError> {
    let trust = mesh_api::trust::Trust::from_pem(cert_pem).map_err(|e| CaError::Given(e.to_string()))?;
    if trust.roots().len() != 1 {
        return Err(CaError::Given("give the one root certificate".into()));
    }
    let root = trust.newest().clone();
    let (_, cert) = X509Certificate::from_der(&root.der).map_err(|e| CaError::Given(e.to_string()))?;
    let organization = cert.subject().iter_organization().next().and_then(|o| o.as_str().ok());
    if organization != Some(cluster.as_str()) {
        return Err(CaError::Given(format!(
            "its subject's O is `{}`, not this cluster's ID {cluster}",
            organization.unwrap_or("").escape_default()
        )));
    }
    let now = OffsetDateTime::now_utc();
    let (not_before, not_after) =
        (cert.validity().not_before.to_datetime(), cert.validity().not_after.to_datetime());
    if not_before > now || not_after < now + Duration::from_secs(365 * 24 * 3600) {
        return Err(CaError::Given(format!(
            "it is valid from {not_before} to {not_after}: a root must be valid now and for a year at least"
        )));
    }
    Ok(root)
}

/// The public key of `csr_pem`, once its signature and algorithm are checked.
fn csr_key(csr_pem: &str) -> Result<rcgen::PublicKey, CaError> {
    let csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(CaError::BadCsr)?;
    if csr.public_key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
        return Err(CaError::CsrAlgorithm { found: format!("{:?}", csr.public_key.algorithm()) });
    }
    Ok(csr.public_key)
}

/// The subject and lifetime of a certificate this CA issues.
#[derive(Clone, Debug)]
pub struct Subject {
    pub common_name: String,
    pub unit: String,
    pub cluster: ClusterId,
    pub dns_names: Vec<String>,
    pub uris: Vec<String>,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Subject {
    /// A node's subject: CN = node ID, OU = role, O = cluster, valid from now for `lifetime`.
    pub fn node(cluster: &ClusterId, node: &NodeId, role: Role, lifetime: Duration) -> Subject {
        let now = OffsetDateTime::now_utc();
        let mut dns_names = Vec::new();
        if role == Role::Manager {
            dns_names.push(CONTROL_SERVER_NAME.to_owned());
        }
        Subject {
            common_name: node.to_string(),
            unit: role.ou().to_owned(),
            cluster: cluster.clone(),
            dns_names,
            uris: vec![SpiffeId::Node { cluster: cluster.clone(), node: node.clone() }.to_string()],
            not_before: now - BACKDATE,
            not_after: now + lifetime,
        }
    }

    /// A workload's subject: CN = `<service>.<slot>@<node>` (the node it was issued to, which
    /// peers check against the removed nodes), OU = `mesh-workload`, O = cluster, and the SPIFFE
    /// ID `spiffe://<cluster>/svc/<service>` that peers check.
    pub fn workload(
        cluster: &ClusterId,
        service: &str,
        slot: u32,
        node: &NodeId,
        lifetime: Duration,
    ) -> Subject {
        let now = OffsetDateTime::now_utc();
        Subject {
            common_name: format!("{service}.{slot}@{node}"),
            unit: WORKLOAD_OU.to_owned(),
            cluster: cluster.clone(),
            dns_names: Vec::new(),
            uris: vec![
                SpiffeId::Service { cluster: cluster.clone(), service: service.to_owned() }.to_string(),
            ],
            not_before: now - BACKDATE,
            not_after: now + lifetime,
        }
    }

    /// The admin client's subject, valid from now for `lifetime`.
    pub fn admin(cluster: &ClusterId, lifetime: Duration) -> Subject {
        let now = OffsetDateTime::now_utc();
        Subject {
            common_name: ADMIN_CN.to_owned(),
            unit: ADMIN_OU.to_owned(),
            cluster: cluster.clone(),
            dns_names: Vec::new(),
            uris: Vec::new(),
            not_before: now - BACKDATE,
            not_after: now + lifetime,
        }
    }
}

/// The root CA: its certificate and signing key.
pub struct ClusterCa {
    cert_pem: String,
    cert_der: Vec<u8>,
    issuer: Issuer<'static, KeyPair>,
    /// Carried after every certificate issued: during a root rotation, this root cross-signed by
    /// the old one (see [`mesh_api::trust`]); else empty.
    chain_pem: String,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa").field("digest", &self.digest()).finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new root CA for `cluster`.
    pub fn generate(cluster: &ClusterId) -> Result<ClusterCa, CaError> {
        ClusterCa::generate_named(cluster, "mesh root CA")
    }

    /// A new root CA for `cluster` named `common_name`: a rotation's new root is named apart from
    /// the old one, so that chains never confuse the two.
    pub fn generate_named(cluster: &ClusterId, common_name: &str) -> Result<ClusterCa, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, common_name);
        dn.push(DnType::OrganizationalUnitName, CA_OU);
        dn.push(DnType::OrganizationName, cluster.to_string());
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + CA_LIFETIME;
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key).map_err(CaError::Sign)?;
        let cert_pem = cert.pem();
        ClusterCa::load(&cert_pem, &key.serialize_pem())
    }

    /// The CA from its certificate and key (PEM), as stored in the manager's state directory.
    pub fn load(cert_pem: &str, key_pem: &str) -> Result<ClusterCa, CaError> {
        let key = KeyPair::from_pem(key_pem).map_err(CaError::Load)?;
        let cert_der = pem_to_der(cert_pem)?;
        let issuer = Issuer::from_ca_cert_der(&cert_der.clone().into(), key).map_err(CaError::Load)?;
        Ok(ClusterCa { cert_pem: cert_pem.to_owned(), cert_der, issuer, chain_pem: String::new() })
    }

    /// A root the operator gives for `cluster` (`meshctl cluster ca --rotate --ca-cert --ca-key`):
    /// a CA certificate of an ECDSA P-256 key, this key's, with the cluster ID as its O, valid now
    /// and for at least a year.
    pub fn given(cluster: &ClusterId, cert_pem: &str, key_pem: &str) -> Result<ClusterCa, CaError> {
        let root = check_new_root(cluster, cert_pem)?;
        let (_, cert) = X509Certificate::from_der(&root.der).map_err(|e| CaError::Given(e.to_string()))?;
        let key = KeyPair::from_pem(key_pem).map_err(|e| CaError::Given(format!("the key: {e}")))?;
        if key.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::Given("the key is not an ECDSA P-256 key".into()));
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::Given("the key is not the certificate's".into()));
        }
        ClusterCa::load(&root.pem, key_pem)
    }

    /// Whether `other` has this CA's key (a root re-issued for the same key replaces nothing).
    pub fn same_key(&self, other: &ClusterCa) -> bool {
        self.issuer.key().public_key_raw() == other.issuer.key().public_key_raw()
    }

    /// This CA, carrying `chain_pem` after every certificate it issues.
    pub fn with_chain(mut self, chain_pem: &str) -> ClusterCa {
        self.chain_pem = chain_pem.to_owned();
        self
    }

    /// The root certificate `new_der` (its subject and key) signed by this root: what lets
    /// holders of this root trust the new one during a rotation.
    pub fn cross_sign(&self, new_der: &[u8]) -> Result<String, CaError> {
        let (_, cert) = X509Certificate::from_der(new_der).map_err(|e| CaError::Given(e.to_string()))?;
        let key = rcgen::SubjectPublicKeyInfo::from_der(cert.public_key().raw).map_err(CaError::Sign)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(cert.subject())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = cert.validity().not_before.to_datetime();
        params.not_after = cert.validity().not_after.to_datetime();
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(CaError::Sign)?;
        Ok(cert.pem())
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &[u8] {
        &self.cert_der
    }

    /// The signing key (PEM), to be stored with mode 0600.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// The digest of the CA certificate that join tokens pin.
    pub fn digest(&self) -> String {
        ids::digest_base36(&self.cert_der)
    }

    /// Signs a certificate for the public key in `csr_pem` with `subject`. Nothing of the CSR but
    /// its public key (and the proof that its sender holds the private key) is used.
    pub fn issue_for_csr(&self, csr_pem: &str, subject: &Subject) -> Result<String, CaError> {
        self.issue(&csr_key(csr_pem)?, subject)
    }

    /// Signs a certificate for `public_key` with `subject`; the chain this CA carries follows it.
    pub fn issue(&self, public_key: &impl PublicKeyData, subject: &Subject) -> Result<String, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, subject.common_name.clone());
        dn.push(DnType::OrganizationalUnitName, subject.unit.clone());
        dn.push(DnType::OrganizationName, subject.cluster.to_string());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        for name in &subject.dns_names {
            params.subject_alt_names.push(SanType::DnsName(name.clone().try_into().map_err(CaError::Sign)?));
        }
        for uri in &subject.uris {
            params.subject_alt_names.push(SanType::URI(uri.clone().try_into().map_err(CaError::Sign)?));
        }
        params.not_before = subject.not_before;
        params.not_after = subject.not_after;
        params.serial_number = Some(random_serial());
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(public_key, &self.issuer).map_err(CaError::Sign)?;
        Ok(format!("{}{}", cert.pem(), self.chain_pem))
    }

    /// Generates a key pair here and issues a certificate for it: for control's own identities
    /// (its server certificate, the admin bundle). Returns (certificate PEM, key PEM).
    pub fn issue_with_new_key(&self, subject: &Subject) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let cert = self.issue(&key, subject)?;
        Ok((cert, key.serialize_pem()))
    }
}

#[cfg(test)]
impl ClusterCa {
    /// A certificate of `params` for `key`, signed by this root: what a signer could answer.
    pub(crate) fn sign_params(&self, params: CertificateParams, key: &KeyPair) -> Result<String, CaError> {
        Ok(params.signed_by(key, &self.issuer).map_err(CaError::Sign)?.pem())
    }
}

/// `name` as rcgen builds it again, byte for byte: one attribute per RDN, in order, with its
/// string type (UTF8String, PrintableString or IA5String; anything else is refused).
fn distinguished_name(name: &x509_parser::x509::X509Name<'_>) -> Result<DistinguishedName, CaError> {
    use x509_parser::der_parser::asn1_rs::Tag;
    let bad = |what: &str| CaError::Given(format!("the root's subject: {what}"));
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err(bad("an RDN of other than one attribute"));
        };
        let oid: Vec<u64> = attr.attr_type().iter().ok_or_else(|| bad("an unreadable OID"))?.collect();
        let text = std::str::from_utf8(attr.attr_value().data).map_err(|_| bad("a value not UTF-8"))?;
        let value = match attr.attr_value().header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(text.try_into().map_err(CaError::Sign)?),
            Tag::Ia5String => DnValue::Ia5String(text.try_into().map_err(CaError::Sign)?),
            _ => return Err(bad("a value of a string type other than UTF8, Printable or IA5")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

fn random_serial() -> SerialNumber {
    let mut bytes = ids::random_bytes::<16>();
    bytes[0] &= 0x7f; // a positive INTEGER
    SerialNumber::from_slice(&bytes)
}

#[cfg(test)]
mod tests {
    use mesh_api::pki::CertInfo;

    use super::*;

    #[test]
    fn issued_node_certificate_has_controls_subject_not_the_csrs() {
        let cluster = ClusterId::random();
        let ca = ClusterCa::generate(&cluster).unwrap();
        // The CSR asks to be a manager of another cluster with a chosen name.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::new(vec!["evil.example".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, "chosen-id");
        params.distinguished_name.push(DnType::OrganizationalUnitName, "mesh-manager");
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();

        let node = NodeId::random();
        let pem = ca
            .issue_for_csr(&csr, &Subject::node(&cluster, &node, Role::Worker, Duration::from_secs(3600)))
            .unwrap();
        let info = CertInfo::from_pem(&pem).unwrap();
        assert_eq!(info.common_name, node.to_string());
        assert_eq!(info.unit, "mesh-worker");
        assert_eq!(info.organization, cluster.to_string());
        let der = pem_to_der(&pem).unwrap();
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        assert!(!format!("{:?}", sans.value).contains("evil.example"));
        // The public key is the CSR's.
        assert_eq!(cert.public_key().subject_public_key.data.as_ref(), key.public_key_raw());
    }

    #[test]
    fn a_new_root_cross_signed_by_the_old_is_let_in_by_holders_of_the_old() {
        let cluster = ClusterId::random();
        let old = ClusterCa::generate(&cluster).unwrap();
        let new = ClusterCa::generate_named(&cluster, "mesh root CA 2").unwrap();
        let cross = old.cross_sign(new.cert_der()).unwrap();
        let trust = mesh_api::trust::Trust::from_pem(old.cert_pem()).unwrap();
        let offered =
            mesh_api::trust::Trust::from_pem(&format!("{}{}", new.cert_pem(), old.cert_pem())).unwrap();
        let accepted = trust.accept(&offered, &cross).unwrap();
        assert_eq!(accepted.newest().digest, new.digest());
        // What the new root issues carries the cross-signature, and old holders verify it.
        let new = new.with_chain(&cross);
        let subject = Subject::node(&cluster, &NodeId::random(), Role::Worker, Duration::from_secs(3600));
        let (chain, _) = new.issue_with_new_key(&subject).unwrap();
        assert_eq!(trust.root_of(&chain).unwrap().digest, old.digest());
        assert!(accepted.signed_by_newest(&chain));
    }

    #[test]
    fn a_given_root_must_be_a_p256_ca_of_this_cluster_with_its_key() {
        let cluster = ClusterId::random();
        let ca = ClusterCa::generate(&cluster).unwrap();
        assert!(ClusterCa::given(&cluster, ca.cert_pem(), &ca.key_pem()).is_ok());
        let other = ClusterCa::generate(&ClusterId::random()).unwrap();
        let err = ClusterCa::given(&cluster, other.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(err.to_string().contains("not this cluster's ID"), "{err}");
        let err = ClusterCa::given(&cluster, ca.cert_pem(), &other.key_pem()).unwrap_err();
        assert!(err.to_string().contains("not the certificate's"), "{err}");
        let err = ClusterCa::given(&cluster, ca.cert_pem(), "garbage").unwrap_err();
        assert!(err.to_string().contains("the key"), "{err}");
        let (leaf, key) = ca
            .issue_with_new_key(&Subject::node(
                &cluster,
                &NodeId::random(),
                Role::Worker,
                Duration::from_secs(3600),
            ))
            .unwrap();
        assert!(ClusterCa::given(&cluster, &leaf, &key).is_err(), "a leaf is no root");
    }

    #[test]
    fn a_ca_survives_a_round_trip_through_pem() {
        let cluster = ClusterId::random();
        let ca = ClusterCa::generate(&cluster).unwrap();
        let again = ClusterCa::load(ca.cert_pem(), &ca.key_pem()).unwrap();
        assert_eq!(ca.digest(), again.digest());
    }

    #[test]
    fn garbage_csr_is_a_clear_error() {
        let cluster = ClusterId::random();
        let ca = ClusterCa::generate(&cluster).unwrap();
        let subject = Subject::node(&cluster, &NodeId::random(), Role::Worker, Duration::from_secs(3600));
        let err = ca.issue_for_csr("not a csr", &subject).unwrap_err();
        assert!(err.to_string().contains("certificate signing request"), "{err}");
    }
}
