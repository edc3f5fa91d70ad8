//! The roots a node, a manager or an admin trusts: the cluster's root CA, and during a root
//! rotation its successor beside it.
//!
//! ```text
//!  before          during the rotation                         after
//!  [old]    ──►    [new, old]  + cross: new's key, signed by old   ──►   [new]
//! ```
//!
//! The first root is the one that signs now. During a rotation every certificate control issues
//! is signed with the new root's key and carries the cross-signed certificate after it, so a peer
//! still trusting only the old root verifies it through the cross-signature, and a peer already
//! trusting the new root verifies it directly. A holder takes a new root only when a
//! cross-signature by a root it already trusts vouches for it ([`Trust::accept`]): a manager
//! that lacks the signing key cannot hand nodes a root of its own choosing (one that holds it,
//! the managers' CA being in their replicated state, can rotate to a root it chose, as the
//! operator can). Dropping a root needs no proof.

use rustls::RootCertStore;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::ids;
use crate::pki::PkiError;

/// Why a trust bundle, a cross-signature or a chain is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("a trust bundle holds at least one root CA certificate")]
    Empty,
    #[error("certificate {digest} in the trust bundle is not a CA certificate")]
    NotCa { digest: String },
    #[error(
        "root {digest} is not vouched for: no cross-signature by a root trusted here ({trusted}) \
         names its subject and key"
    )]
    Unvouched { digest: String, trusted: String },
    #[error(
        "the certificate is not signed by a root trusted here ({trusted}) nor through a cross-signature it carries"
    )]
    Unsigned { trusted: String },
}

/// One root: its certificate and the digest join tokens pin.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    pub der: Vec<u8>,
    pub pem: String,
    /// [`ids::digest_base36`] of the certificate.
    pub digest: String,
    pub not_after: OffsetDateTime,
    pub subject: String,
}

/// The roots trusted, the one that signs now first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Trust {
    roots: Vec<Root>,
}

impl Trust {
    /// Every certificate of `pem`, in order; at least one, each a CA certificate.
    pub fn from_pem(pem: &str) -> Result<Trust, TrustError> {
        let ders = ders(pem)?;
        if ders.is_empty() {
            return Err(TrustError::Empty);
        }
        let roots = ders.into_iter().map(root).collect::<Result<Vec<_>, _>>()?;
        Ok(Trust { roots })
    }

    /// The bundle as PEM, the signing root first (what `ca.crt` holds).
    pub fn to_pem(&self) -> String {
        self.roots.iter().map(|r| r.pem.as_str()).collect()
    }

    /// The root that signs now.
    pub fn newest(&self) -> &Root {
        &self.roots[0]
    }

    pub fn roots(&self) -> &[Root] {
        &self.roots
    }

    /// Whether a root of this digest is trusted.
    pub fn has(&self, digest: &str) -> bool {
        self.roots.iter().any(|r| r.digest == digest)
    }

    /// The roots' digests, for messages.
    pub fn digests(&self) -> String {
        self.roots.iter().map(|r| r.digest.as_str()).collect::<Vec<_>>().join(", ")
    }

    /// A rustls root store of these roots.
    pub fn store(&self) -> Result<RootCertStore, rustls::Error> {
        let mut store = RootCertStore::empty();
        for root in &self.roots {
            store.add(CertificateDer::from(root.der.clone()))?;
        }
        Ok(store)
    }

    /// The root `chain_pem` (a leaf, then the certificates it carries) chains to: the leaf is
    /// signed by a root's key, or by a CA certificate of the chain that a root signed. Signatures
    /// only: validity and names are the TLS handshake's and [`crate::pki`]'s checks.
    pub fn root_of(&self, chain_pem: &str) -> Result<&Root, TrustError> {
        let chain = ders(chain_pem)?;
        let leaf = chain.first().ok_or(PkiError::BadPem("no CERTIFICATE block".into()))?;
        let leaf = parse(leaf)?;
        for root in &self.roots {
            let root_cert = parse(&root.der)?;
            if leaf.verify_signature(Some(root_cert.public_key())).is_ok() {
                return Ok(root);
            }
            for intermediate in &chain[1..] {
                let intermediate = parse(intermediate)?;
                if intermediate.is_ca()
                    && intermediate.verify_signature(Some(root_cert.public_key())).is_ok()
                    && leaf.verify_signature(Some(intermediate.public_key())).is_ok()
                {
                    return Ok(root);
                }
            }
        }
        Err(TrustError::Unsigned { trusted: self.digests() })
    }

    /// Whether `chain` (DER, leaf first, as a TLS peer presented it) chains to one of these roots.
    pub fn chains(&self, chain: &[impl AsRef<[u8]>]) -> bool {
        let pem: String = chain.iter().map(|c| pem(c.as_ref())).collect();
        self.root_of(&pem).is_ok()
    }

    /// Whether any root of `self` is missing from `other`: the roots went from `self` to
    /// `other` by dropping one, and what only it vouched for is trusted no more.
    pub fn drops_any(&self, other: &Trust) -> bool {
        self.roots.iter().any(|r| !other.has(&r.digest))
    }

    /// Whether the leaf of `chain_pem` is signed with the newest root's key (a holder of any
    /// other renews at once during a rotation).
    pub fn signed_by_newest(&self, chain_pem: &str) -> bool {
        let Ok(chain) = ders(chain_pem) else { return false };
        let (Some(leaf), Ok(root)) = (chain.first(), parse(&self.newest().der)) else { return false };
        parse(leaf).is_ok_and(|leaf| leaf.verify_signature(Some(root.public_key())).is_ok())
    }

    /// What of `offered` this trust lets in: every root of it must be trusted here already, or
    /// be vouched for by a certificate of `cross_pem` that a root trusted here signed and that
    /// has that root's subject and key. The result is `offered`'s roots, in its order (roots it
    /// drops are dropped).
    pub fn accept(&self, offered: &Trust, cross_pem: &str) -> Result<Trust, TrustError> {
        let crosses = ders(cross_pem)?;
        for root in &offered.roots {
            if self.has(&root.digest) || crosses.iter().any(|c| self.vouches(c, root)) {
                continue;
            }
            return Err(TrustError::Unvouched { digest: root.digest.clone(), trusted: self.digests() });
        }
        Ok(offered.clone())
    }

    /// Whether `cross` (DER) is a CA certificate signed by one of these roots with `root`'s
    /// subject and key.
    fn vouches(&self, cross: &[u8], root: &Root) -> bool {
        let (Ok(cross), Ok(new)) = (parse(cross), parse(&root.der)) else { return false };
        if !cross.is_ca()
            || cross.subject().as_raw() != new.subject().as_raw()
            || cross.public_key().raw != new.public_key().raw
        {
            return false;
        }
        self.roots.iter().any(|trusted| {
            parse(&trusted.der).is_ok_and(|t| cross.verify_signature(Some(t.public_key())).is_ok())
        })
    }
}

fn ders(pem: &str) -> Result<Vec<Vec<u8>>, PkiError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| c.map(|c| c.to_vec()).map_err(|e| PkiError::BadPem(e.to_string())))
        .collect()
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    X509Certificate::from_der(der).map(|(_, c)| c).map_err(|e| PkiError::Parse(e.to_string()))
}

fn root(der: Vec<u8>) -> Result<Root, TrustError> {
    let digest = ids::digest_base36(&der);
    let cert = parse(&der)?;
    if !cert.is_ca() {
        return Err(TrustError::NotCa { digest });
    }
    let not_after = cert.validity().not_after.to_datetime();
    let subject = cert.subject().to_string();
    let pem = pem(&der);
    Ok(Root { der, pem, digest, not_after, subject })
}

/// `der` as one PEM block.
pub fn pem(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

#[cfg(test)]
mod tests {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};

    use super::*;

    /// A root CA named `cn`: its certificate (PEM), its parameters and its key.
    fn root_ca(cn: &str) -> (String, CertificateParams, KeyPair) {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        let cert = params.self_signed(&key).unwrap().pem();
        (cert, params, key)
    }

    /// `new`'s subject and key, signed by `old`.
    fn cross(
        new: &(String, CertificateParams, KeyPair),
        old: &(String, CertificateParams, KeyPair),
    ) -> String {
        let issuer = Issuer::from_ca_cert_pem(&old.0, &old.2).unwrap();
        new.1.clone().signed_by(&new.2, &issuer).unwrap().pem()
    }

    /// A leaf signed by `ca`.
    fn leaf(ca: &(String, CertificateParams, KeyPair)) -> String {
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_ca_cert_pem(&ca.0, &ca.2).unwrap();
        CertificateParams::new(vec!["leaf".to_owned()]).unwrap().signed_by(&key, &issuer).unwrap().pem()
    }

    #[test]
    fn a_new_root_is_let_in_only_with_a_cross_signature_by_a_trusted_one() {
        let old = root_ca("old");
        let new = root_ca("new");
        let evil = root_ca("evil");
        let trust = Trust::from_pem(&old.0).unwrap();
        let offered = Trust::from_pem(&format!("{}{}", new.0, old.0)).unwrap();
        // No proof, another root's cross-signature, a cross-signature by the untrusted root itself,
        // or one of another key under the same name: refused.
        let refusals = [
            String::new(),
            cross(&new, &evil),
            cross(&new, &new),
            cross(&(new.0.clone(), new.1.clone(), KeyPair::generate().unwrap()), &old),
            // The leaf of a trusted root is no CA.
            leaf(&old),
        ];
        for proof in refusals {
            let err = trust.accept(&offered, &proof).unwrap_err();
            assert!(matches!(err, TrustError::Unvouched { .. }), "{err}");
        }
        let accepted = trust.accept(&offered, &cross(&new, &old)).unwrap();
        assert_eq!(accepted.newest().digest, Trust::from_pem(&new.0).unwrap().newest().digest);
        assert_eq!(accepted.roots().len(), 2);
        // Dropping the old root needs no proof; bringing back one dropped does.
        let after = accepted.accept(&Trust::from_pem(&new.0).unwrap(), "").unwrap();
        assert_eq!(after.roots().len(), 1);
        assert!(after.accept(&Trust::from_pem(&old.0).unwrap(), "").is_err());
    }

    #[test]
    fn a_leaf_of_the_new_root_verifies_for_old_trust_only_through_the_cross_signature() {
        let old = root_ca("old");
        let new = root_ca("new");
        let only_old = Trust::from_pem(&old.0).unwrap();
        let only_new = Trust::from_pem(&new.0).unwrap();
        let bare = leaf(&new);
        let chained = format!("{bare}{}", cross(&new, &old));
        assert!(only_old.root_of(&bare).is_err());
        assert_eq!(only_old.root_of(&chained).unwrap().digest, only_old.newest().digest);
        assert_eq!(only_new.root_of(&chained).unwrap().digest, only_new.newest().digest);
        // A chain carrying a cross-signature by a stranger proves nothing.
        let forged = format!("{bare}{}", cross(&new, &root_ca("evil")));
        assert!(only_old.root_of(&forged).is_err());
        let both = Trust::from_pem(&format!("{}{}", new.0, old.0)).unwrap();
        assert!(both.signed_by_newest(&chained));
        assert!(!both.signed_by_newest(&leaf(&old)));
        assert!(both.root_of(&leaf(&old)).is_ok());
    }

    #[test]
    fn a_bundle_of_nothing_or_of_a_leaf_is_refused() {
        assert_eq!(Trust::from_pem(""), Err(TrustError::Empty));
        let old = root_ca("old");
        assert!(matches!(Trust::from_pem(&leaf(&old)), Err(TrustError::NotCa { .. })));
        assert!(
            Trust::from_pem("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n").is_err()
        );
        let trust = Trust::from_pem(&old.0).unwrap();
        assert_eq!(Trust::from_pem(&trust.to_pem()).unwrap(), trust);
    }
}
