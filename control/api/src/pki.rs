//! Reading the cluster's certificates: what the subject of each kind says, the SPIFFE IDs they
//! carry, and the one check of whether a (chain-verified) certificate is one of this cluster's and
//! whom it names. Issuing them is the manager's alone.
//!
//! | holder   | CN                        | OU             | URI SAN                            |
//! |----------|---------------------------|----------------|------------------------------------|
//! | admin    | `admin`                   | `mesh-admin`   | none                               |
//! | node     | node ID                   | `mesh-worker` / `mesh-manager` | `spiffe://<cluster>/node/<id>` |
//! | workload | `<service>.<slot>@<node>` | `mesh-workload`| `spiffe://<cluster>/svc/<service>` |
//!
//! The O of every one of them is the cluster ID. The subject names the holder; the URI SAN, when
//! present, must agree with it (an external CA may issue certificates without one).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use crate::ids::{ClusterId, NodeId};
use crate::tokens::Role;

/// The DNS name every manager's server certificate carries and every client checks. A node
/// certificate never carries it, so no worker can pose as a manager.
pub const CONTROL_SERVER_NAME: &str = "mesh-control";
/// The OU of admin client certificates.
pub const ADMIN_OU: &str = "mesh-admin";
/// The CN of admin client certificates.
pub const ADMIN_CN: &str = "admin";
/// The OU of the root CA certificate.
pub const CA_OU: &str = "mesh-ca";
/// The OU of workload certificates: never accepted as a node or admin.
pub const WORKLOAD_OU: &str = "mesh-workload";
/// The longest a workload certificate may last: short-lived by design, and what bounds how long
/// a removed node must stay on the list the mesh refuses.
pub const MAX_WORKLOAD_CERT_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// Why a certificate could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PkiError {
    #[error("not a PEM certificate: {0}")]
    BadPem(String),
    #[error("could not parse the certificate: {0}")]
    Parse(String),
    #[error("the certificate has no subject field {0}")]
    MissingField(&'static str),
}

/// The DER of the first certificate in `pem`.
pub fn pem_to_der(pem: &str) -> Result<Vec<u8>, PkiError> {
    match CertificateDer::pem_slice_iter(pem.as_bytes()).next() {
        Some(Ok(der)) => Ok(der.to_vec()),
        Some(Err(e)) => Err(PkiError::BadPem(e.to_string())),
        None => Err(PkiError::BadPem("no CERTIFICATE block".to_owned())),
    }
}

/// A SPIFFE ID of this project: a node's or a service's.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum SpiffeId {
    /// `spiffe://<cluster>/node/<id>`: a node certificate (the mesh port's server side).
    Node { cluster: ClusterId, node: NodeId },
    /// `spiffe://<cluster>/svc/<service>`: every workload certificate of the service.
    Service { cluster: ClusterId, service: String },
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SpiffeId::Node { cluster, node } => write!(f, "spiffe://{cluster}/node/{node}"),
            SpiffeId::Service { cluster, service } => write!(f, "spiffe://{cluster}/svc/{service}"),
        }
    }
}

/// A URI that is not one of this project's SPIFFE IDs.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is not spiffe://<cluster>/node/<id> or spiffe://<cluster>/svc/<service>")]
pub struct InvalidSpiffeId(pub String);

impl FromStr for SpiffeId {
    type Err = InvalidSpiffeId;
    fn from_str(s: &str) -> Result<SpiffeId, InvalidSpiffeId> {
        let bad = || InvalidSpiffeId(s.to_owned());
        let rest = s.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (cluster, rest) = rest.split_once('/').ok_or_else(bad)?;
        let cluster: ClusterId = cluster.parse().map_err(|_| bad())?;
        match rest.split_once('/') {
            Some(("node", node)) => Ok(SpiffeId::Node { cluster, node: node.parse().map_err(|_| bad())? }),
            Some(("svc", service)) if !service.is_empty() && !service.contains('/') => {
                Ok(SpiffeId::Service { cluster, service: service.to_owned() })
            }
            _ => Err(bad()),
        }
    }
}

/// What a certificate says about its holder, read from its subject, URI SANs and validity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertInfo {
    pub common_name: String,
    pub unit: String,
    pub organization: String,
    pub uris: Vec<String>,
    /// The serial number, lower-case hex: what revocation names.
    pub serial: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl CertInfo {
    pub fn from_pem(pem: &str) -> Result<CertInfo, PkiError> {
        CertInfo::from_der(&pem_to_der(pem)?)
    }

    pub fn from_der(der: &[u8]) -> Result<CertInfo, PkiError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| PkiError::Parse(e.to_string()))?;
        let subject = cert.subject();
        fn field<'a>(
            name: &'static str,
            mut values: impl Iterator<Item = &'a x509_parser::x509::AttributeTypeAndValue<'a>>,
        ) -> Result<String, PkiError> {
            values.next().and_then(|a| a.as_str().ok()).map(str::to_owned).ok_or(PkiError::MissingField(name))
        }
        let uris = match cert.subject_alternative_name() {
            Ok(Some(san)) => san
                .value
                .general_names
                .iter()
                .filter_map(|n| if let GeneralName::URI(u) = n { Some((*u).to_owned()) } else { None })
                .collect(),
            Ok(None) => Vec::new(),
            Err(e) => return Err(PkiError::Parse(e.to_string())),
        };
        let validity = cert.validity();
        Ok(CertInfo {
            common_name: field("CN", subject.iter_common_name())?,
            unit: field("OU", subject.iter_organizational_unit())?,
            organization: field("O", subject.iter_organization())?,
            uris,
            serial: cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect(),
            not_before: validity.not_before.to_datetime(),
            not_after: validity.not_after.to_datetime(),
        })
    }

    /// Whom this certificate names, if it is one of `cluster`'s: the one check every server side
    /// (control's API, raft, unlock; the mesh port) makes of a certificate the TLS layer verified.
    /// It does not look at the cluster state (removed nodes): callers do.
    pub fn holder(&self, cluster: &str) -> Result<Holder, NotOurs> {
        if self.organization != cluster {
            return Err(NotOurs::OtherCluster(self.organization.clone()));
        }
        let cluster_id: ClusterId =
            cluster.parse().map_err(|_| NotOurs::OtherCluster(self.organization.clone()))?;
        let bad_subject = || NotOurs::Subject(self.common_name.clone());
        // The subject names the holder. A SPIFFE ID, when the certificate carries one, must be
        // the one the subject calls for, and the only URI: an external CA that can set no URI
        // SAN (CFSSL 1.2) issues certificates without it.
        let uris_say = |expected: Option<&SpiffeId>| match (&self.uris[..], expected) {
            ([], _) => Ok(()),
            ([uri], Some(expected)) if *uri == expected.to_string() => Ok(()),
            _ => Err(NotOurs::Spiffe(self.uris.clone())),
        };
        match self.unit.as_str() {
            ADMIN_OU if self.common_name == ADMIN_CN => {
                uris_say(None)?;
                Ok(Holder::Admin)
            }
            WORKLOAD_OU => {
                let (endpoint, node) = self.common_name.split_once('@').ok_or_else(bad_subject)?;
                let node: NodeId = node.parse().map_err(|_| bad_subject())?;
                let (service, slot) = endpoint.rsplit_once('.').ok_or_else(bad_subject)?;
                slot.parse::<u32>().map_err(|_| bad_subject())?;
                uris_say(Some(&SpiffeId::Service { cluster: cluster_id, service: service.to_owned() }))?;
                Ok(Holder::Workload { service: service.to_owned(), endpoint: endpoint.to_owned(), node })
            }
            unit => {
                let role = Role::from_ou(unit).ok_or_else(|| NotOurs::Unit(unit.to_owned()))?;
                let id: NodeId = self.common_name.parse().map_err(|_| bad_subject())?;
                uris_say(Some(&SpiffeId::Node { cluster: cluster_id, node: id.clone() }))?;
                Ok(Holder::Node { id, role })
            }
        }
    }
}

/// Whom a certificate of this cluster names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Holder {
    Admin,
    Node {
        id: NodeId,
        role: Role,
    },
    Workload {
        service: String,
        /// `<service>.<slot>`.
        endpoint: String,
        /// The node the certificate was issued to.
        node: NodeId,
    },
}

/// Why a certificate is not one of this cluster's.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NotOurs {
    #[error("certificate is for cluster `{0}`, not this one")]
    OtherCluster(String),
    #[error("unknown certificate role `{0}`")]
    Unit(String),
    #[error("certificate subject `{0}` is not one this cluster issues")]
    Subject(String),
    #[error("certificate with URIs other than the SPIFFE ID its subject calls for: {0:?}")]
    Spiffe(Vec<String>),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_round_trip_and_bad_ones_are_refused() {
        let cluster = ClusterId::random();
        let node = NodeId::random();
        for id in [
            SpiffeId::Node { cluster: cluster.clone(), node: node.clone() },
            SpiffeId::Service { cluster: cluster.clone(), service: "api".into() },
        ] {
            assert_eq!(id.to_string().parse::<SpiffeId>().unwrap(), id);
        }
        for bad in [
            "".to_owned(),
            format!("https://{cluster}/svc/api"),
            format!("spiffe://{cluster}/svc/"),
            format!("spiffe://{cluster}/svc/a/b"),
            format!("spiffe://{cluster}/node/short"),
            format!("spiffe://{cluster}/other/x"),
            "spiffe://notacluster/svc/api".to_owned(),
        ] {
            assert!(bad.parse::<SpiffeId>().is_err(), "{bad}");
        }
    }

    fn info(cn: &str, ou: &str, o: &str, uris: &[String]) -> CertInfo {
        CertInfo {
            common_name: cn.into(),
            unit: ou.into(),
            organization: o.into(),
            uris: uris.to_vec(),
            serial: "01".into(),
            not_before: OffsetDateTime::UNIX_EPOCH,
            not_after: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn holders_are_read_and_lookalikes_refused() {
        let cluster = ClusterId::random();
        let c = cluster.as_str();
        let node = NodeId::random();
        let node_uri = SpiffeId::Node { cluster: cluster.clone(), node: node.clone() }.to_string();
        let svc_uri = SpiffeId::Service { cluster: cluster.clone(), service: "api".into() }.to_string();
        let workload_cn = format!("api.1@{node}");
        assert_eq!(info("admin", ADMIN_OU, c, &[]).holder(c), Ok(Holder::Admin));
        assert_eq!(
            info(node.as_str(), "mesh-manager", c, std::slice::from_ref(&node_uri)).holder(c),
            Ok(Holder::Node { id: node.clone(), role: Role::Manager })
        );
        assert_eq!(
            info(&workload_cn, WORKLOAD_OU, c, std::slice::from_ref(&svc_uri)).holder(c),
            Ok(Holder::Workload { service: "api".into(), endpoint: "api.1".into(), node: node.clone() })
        );
        // Without a URI SAN (an external CA's), the subject alone names the holder.
        assert_eq!(
            info(node.as_str(), "mesh-worker", c, &[]).holder(c),
            Ok(Holder::Node { id: node.clone(), role: Role::Worker })
        );
        assert_eq!(
            info(&workload_cn, WORKLOAD_OU, c, &[]).holder(c),
            Ok(Holder::Workload { service: "api".into(), endpoint: "api.1".into(), node: node.clone() })
        );
        let other = ClusterId::random();
        let other_node_uri = SpiffeId::Node { cluster: cluster.clone(), node: NodeId::random() }.to_string();
        let refused = [
            info("admin", ADMIN_OU, other.as_str(), &[]),
            info("root", ADMIN_OU, c, &[]),
            info(node.as_str(), "mesh-root", c, std::slice::from_ref(&node_uri)),
            info("admin", ADMIN_OU, c, std::slice::from_ref(&node_uri)),
            info(NodeId::random().as_str(), "mesh-worker", c, std::slice::from_ref(&node_uri)),
            info(node.as_str(), "mesh-worker", c, &[node_uri.clone(), other_node_uri.clone()]),
            info(node.as_str(), "mesh-worker", c, &[other_node_uri]),
            info(node.as_str(), "mesh-worker", c, std::slice::from_ref(&svc_uri)),
            info(&workload_cn, WORKLOAD_OU, c, std::slice::from_ref(&node_uri)),
            info(&workload_cn, WORKLOAD_OU, c, &[svc_uri.clone(), node_uri.clone()]),
            info(&format!("web.1@{node}"), WORKLOAD_OU, c, std::slice::from_ref(&svc_uri)),
            info("api.1", WORKLOAD_OU, c, std::slice::from_ref(&svc_uri)),
            info(&format!("api.x@{node}"), WORKLOAD_OU, c, std::slice::from_ref(&svc_uri)),
        ];
        for cert in refused {
            assert!(cert.holder(c).is_err(), "{cert:?}");
        }
    }
}
