//! TLS between meshd (rustls, TLS 1.3 only, ALPN `h2`). Both sides tell whose a certificate is
//! with the cluster's one check of its certificates, `mesh_api::pki::CertInfo::holder`.
//!
//! * The server side (each meshd's mesh port) presents the node certificate, following each one
//!   identity publishes ([`NodeCertificate::follow`]), and requires a client certificate
//!   chaining to the cluster's roots of the moment ([`ClientVerifier`]); [`Peer::from_certificate`] then requires it to be a workload's
//!   and reads the caller's service, endpoint and node from it.
//! * The client side presents the calling workload's certificate and accepts only the node it
//!   meant to reach: chain to the cluster CA, and that node's certificate (its SPIFFE ID
//!   `spiffe://<cluster>/node/<id>`).

use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_api::ids::{ClusterId, NodeId};
use mesh_api::pki::{CertInfo, Holder, NotOurs, SpiffeId};
use mesh_api::tls::{Identity, TlsError, provider, roots};
use mesh_api::trust::Trust;
use rustls::DistinguishedName;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::identity::NodeIdentity;

const ALPN_H2: &[u8] = b"h2";

/// The server name clients put in their hello; certificates are checked by SPIFFE ID instead.
pub const SERVER_NAME: &str = "mesh-node";

/// The node certificate the mesh port presents, swapped whole when the node renews it.
#[derive(Debug)]
pub struct NodeCertificate(ArcSwap<CertifiedKey>);

impl NodeCertificate {
    pub fn new(identity: &Identity) -> Result<NodeCertificate, TlsError> {
        Ok(NodeCertificate(ArcSwap::from_pointee(certified(identity)?)))
    }

    /// Puts a renewed certificate in place for the next handshakes.
    pub fn replace(&self, identity: &Identity) -> Result<(), TlsError> {
        self.0.store(Arc::new(certified(identity)?));
        Ok(())
    }

    /// The certificate the next handshake presents.
    pub fn current(&self) -> Arc<CertifiedKey> {
        self.0.load_full()
    }

    /// Puts each node certificate identity publishes on `renewed` in place as it arrives, until
    /// the publisher is gone.
    pub async fn follow(&self, mut renewed: watch::Receiver<Arc<NodeIdentity>>) {
        while renewed.changed().await.is_ok() {
            let node = renewed.borrow_and_update().clone();
            match self.replace(&node.identity) {
                Ok(()) => {
                    info!(expires = %node.info.not_after, "mesh port serves the renewed node certificate")
                }
                Err(e) => warn!(error = %e, "the renewed node certificate cannot be used"),
            }
        }
    }
}

fn certified(identity: &Identity) -> Result<CertifiedKey, TlsError> {
    let (certs, key) = identity.parse()?;
    Ok(CertifiedKey::from_der(certs, key, &provider())?)
}

impl ResolvesServerCert for NodeCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// The mesh port's verifier of client certificates: they must chain to a root of the cluster's
/// roots of the moment, swapped whole when those change (a root rotation).
#[derive(Debug)]
pub struct ClientVerifier(ArcSwap<Arc<dyn ClientCertVerifier>>);

impl ClientVerifier {
    pub fn new(trust: &Trust) -> Result<ClientVerifier, TlsError> {
        Ok(ClientVerifier(ArcSwap::from_pointee(webpki_verifier(trust)?)))
    }

    /// Verifies against `trust` from the next handshake on.
    pub fn replace(&self, trust: &Trust) -> Result<(), TlsError> {
        self.0.store(Arc::new(webpki_verifier(trust)?));
        Ok(())
    }
}

fn webpki_verifier(trust: &Trust) -> Result<Arc<dyn ClientCertVerifier>, TlsError> {
    WebPkiClientVerifier::builder_with_provider(roots(trust)?, provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: clients have one certificate to offer.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.0.load().verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.load().verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.load().supported_verify_schemes()
    }
}

/// The mesh port's server configuration: a client certificate chaining to the cluster's roots
/// (as `verifier` has them at each handshake) is required.
pub fn server_config(
    verifier: Arc<ClientVerifier>,
    certificate: Arc<NodeCertificate>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    // No resumption: a resumed session skips the client certificate's verification, so every
    // connection does a full handshake (and no tickets are handed out).
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client configuration presenting `workload`'s certificate to node `node` of `cluster`.
pub fn client_config(
    trust: &Trust,
    cluster: &str,
    node: &NodeId,
    workload: &Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(NodeVerifier {
        roots: roots(trust)?,
        cluster: cluster.to_owned(),
        node: node.clone(),
        provider: provider.clone(),
    });
    let (certs, key) = workload.parse()?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.resumption = rustls::client::Resumption::disabled();
    Ok(Arc::new(config))
}

/// Accepts a server certificate that chains to the cluster CA, is valid now, and is the expected
/// node's.
#[derive(Debug)]
struct NodeVerifier {
    roots: Arc<RootCertStore>,
    cluster: String,
    node: NodeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NodeVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let parsed = ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.roots,
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        match CertInfo::from_der(end_entity).map(|info| info.holder(&self.cluster)) {
            Ok(Ok(Holder::Node { id, .. })) if id == self.node => Ok(ServerCertVerified::assertion()),
            _ => Err(rustls::Error::General(format!("the peer is not node {}", self.node))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Who called, as its (already chain-verified) certificate says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Peer {
    pub service: String,
    /// `<service>.<slot>`.
    pub endpoint: String,
    /// The node the certificate was issued to.
    pub node: NodeId,
    /// The certificate's SPIFFE ID, `spiffe://<cluster>/svc/<service>`.
    pub spiffe_id: SpiffeId,
    /// When the certificate expires: the connection ends then, and no request is taken after.
    pub not_after: time::OffsetDateTime,
    /// A node's certificate: the node carries a published port's clients, as the source
    /// `ingress` (admitted only where the slice names it as publishing that port).
    pub ingress: bool,
}

/// Why a client certificate is not a workload of this cluster.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("no client certificate")]
    Missing,
    #[error("unreadable certificate: {0}")]
    Unreadable(String),
    #[error("certificate of {0}, not of a workload")]
    NotWorkload(String),
    #[error(transparent)]
    NotOurs(#[from] NotOurs),
}

impl Peer {
    /// Reads the caller from its certificate, which must be one of `cluster`'s workload
    /// certificates (subject `<service>.<slot>@<node>`, SPIFFE ID `spiffe://<cluster>/svc/<service>`).
    pub fn from_certificate(
        der: Option<&CertificateDer<'_>>,
        cluster: &ClusterId,
    ) -> Result<Peer, PeerError> {
        let der = der.ok_or(PeerError::Missing)?;
        let info = CertInfo::from_der(der).map_err(|e| PeerError::Unreadable(e.to_string()))?;
        match info.holder(cluster.as_str())? {
            Holder::Workload { service, .. } if service == policy::INGRESS => {
                Err(PeerError::NotWorkload(format!("`{service}`, a name no service may have")))
            }
            Holder::Workload { service, endpoint, node } => {
                let spiffe_id = SpiffeId::Service { cluster: cluster.clone(), service: service.clone() };
                Ok(Peer { service, endpoint, node, spiffe_id, not_after: info.not_after, ingress: false })
            }
            Holder::Node { id, .. } => Ok(Peer {
                service: policy::INGRESS.to_owned(),
                endpoint: format!("ingress@{id}"),
                spiffe_id: SpiffeId::Node { cluster: cluster.clone(), node: id.clone() },
                node: id,
                not_after: info.not_after,
                ingress: true,
            }),
            Holder::Admin => Err(PeerError::NotWorkload("an admin".into())),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mesh_api::pki::WORKLOAD_OU;
    use rcgen::{CertificateParams, DnType, KeyPair, SanType};

    use super::*;

    /// A self-signed certificate with this subject and these URI SANs, and its key.
    fn certificate(cn: &str, ou: &str, o: &str, uris: &[String]) -> Identity {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.distinguished_name.push(DnType::OrganizationalUnitName, ou);
        params.distinguished_name.push(DnType::OrganizationName, o);
        for uri in uris {
            params.subject_alt_names.push(SanType::URI(uri.as_str().try_into().unwrap()));
        }
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Identity { cert_pem: cert.pem(), key_pem: key.serialize_pem() }
    }

    fn der(identity: &Identity) -> CertificateDer<'static> {
        CertificateDer::from(mesh_api::pki::pem_to_der(&identity.cert_pem).unwrap())
    }

    fn node_certificate(cluster: &ClusterId, node: &NodeId) -> Identity {
        let uri = SpiffeId::Node { cluster: cluster.clone(), node: node.clone() }.to_string();
        certificate(node.as_str(), "mesh-worker", cluster.as_str(), &[uri])
    }

    #[test]
    fn the_caller_is_read_from_a_workload_certificate_and_other_holders_are_refused() {
        let cluster = ClusterId::random();
        let node = NodeId::random();
        let spiffe_id = SpiffeId::Service { cluster: cluster.clone(), service: "web".into() };
        let web =
            certificate(&format!("web.1@{node}"), WORKLOAD_OU, cluster.as_str(), &[spiffe_id.to_string()]);
        let peer = Peer::from_certificate(Some(&der(&web)), &cluster).unwrap();
        let not_after = CertInfo::from_pem(&web.cert_pem).unwrap().not_after;
        assert_eq!(
            peer,
            Peer {
                service: "web".into(),
                endpoint: "web.1".into(),
                node: node.clone(),
                spiffe_id,
                not_after,
                ingress: false,
            }
        );
        // A node's certificate speaks for published ports' clients, never for a service.
        let carrier =
            Peer::from_certificate(Some(&der(&node_certificate(&cluster, &node))), &cluster).unwrap();
        assert_eq!((carrier.service.as_str(), carrier.ingress, &carrier.node), ("ingress", true, &node));
        // A workload certificate for a service named `ingress` (which control never creates) is
        // refused: only a node's certificate is the source `ingress`.
        let named = SpiffeId::Service { cluster: cluster.clone(), service: "ingress".into() };
        let posing =
            certificate(&format!("ingress.1@{node}"), WORKLOAD_OU, cluster.as_str(), &[named.to_string()]);
        let refused = Peer::from_certificate(Some(&der(&posing)), &cluster);
        assert!(matches!(refused, Err(PeerError::NotWorkload(_))), "{refused:?}");
        assert!(matches!(
            Peer::from_certificate(Some(&der(&web)), &ClusterId::random()),
            Err(PeerError::NotOurs(NotOurs::OtherCluster(_)))
        ));
        // Without a URI SAN (an external CA's certificate) the subject names the caller; a URI
        // naming another service is refused.
        let no_id = certificate(&format!("web.1@{node}"), WORKLOAD_OU, cluster.as_str(), &[]);
        assert_eq!(
            Peer::from_certificate(Some(&der(&no_id)), &cluster).map(|p| p.service),
            Ok("web".to_owned())
        );
        let api_id = SpiffeId::Service { cluster: cluster.clone(), service: "api".into() }.to_string();
        let lying = certificate(&format!("web.1@{node}"), WORKLOAD_OU, cluster.as_str(), &[api_id]);
        assert!(matches!(
            Peer::from_certificate(Some(&der(&lying)), &cluster),
            Err(PeerError::NotOurs(NotOurs::Spiffe(_)))
        ));
        assert_eq!(Peer::from_certificate(None, &cluster), Err(PeerError::Missing));
    }

    #[tokio::test]
    async fn a_renewed_node_certificate_is_served_as_soon_as_identity_publishes_it() {
        let cluster = ClusterId::random();
        let id = NodeId::random();
        let node = |identity: Identity| NodeIdentity {
            id: id.clone(),
            info: CertInfo::from_pem(&identity.cert_pem).unwrap(),
            trust: crate::identity::test_roots(),
            identity,
            managers: vec![],
            manager_ids: vec![],
            spec_key: None,
        };
        let (publish, renewed) = watch::channel(Arc::new(node(node_certificate(&cluster, &id))));
        let served = Arc::new(NodeCertificate::new(&publish.borrow().identity).unwrap());
        let following = tokio::spawn({
            let served = served.clone();
            async move { served.follow(renewed).await }
        });
        let next = node_certificate(&cluster, &id);
        let want = der(&next);
        assert_ne!(served.current().cert[0], want);
        publish.send_replace(Arc::new(node(next)));
        tokio::time::timeout(Duration::from_secs(1), async {
            while served.current().cert[0] != want {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the renewed certificate is presented at once, not at a later look at the disk");
        drop(publish);
        following.await.unwrap();
    }
}
