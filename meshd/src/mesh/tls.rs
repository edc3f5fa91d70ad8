//! TLS between meshd (rustls, TLS 1.3 only, ALPN `h2`).
//!
//! * The server side (each meshd's mesh port) presents the node certificate and requires a client
//!   certificate chaining to the cluster CA; [`Peer::from_certificate`] then reads the caller's
//!   service from it (SPIFFE ID, cluster, workload unit, the node it was issued to).
//! * The client side presents the calling workload's certificate and accepts only the node it
//!   meant to reach: chain to the cluster CA, and the node's SPIFFE ID
//!   `spiffe://<cluster>/node/<id>`.

use std::sync::Arc;

use arc_swap::ArcSwap;
use mesh_api::ids::NodeId;
use mesh_api::pki::{CertInfo, WORKLOAD_OU};
use mesh_api::tls::{Identity, TlsError, provider, roots};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

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
}

fn certified(identity: &Identity) -> Result<CertifiedKey, TlsError> {
    let (certs, key) = identity.parse()?;
    Ok(CertifiedKey::from_der(certs, key, &provider())?)
}

impl ResolvesServerCert for NodeCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.load_full())
    }
}

/// The mesh port's server configuration: a client certificate from the cluster CA is required.
pub fn server_config(
    ca_der: &[u8],
    certificate: Arc<NodeCertificate>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(ca_der)?, provider.clone())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(certificate);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// A client configuration presenting `workload`'s certificate to node `node` of `cluster`.
pub fn client_config(
    ca_der: &[u8],
    cluster: &str,
    node: &NodeId,
    workload: &Identity,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = Arc::new(NodeVerifier {
        roots: roots(ca_der)?,
        expected: format!("spiffe://{cluster}/node/{node}"),
        provider: provider.clone(),
    });
    let (certs, key) = workload.parse()?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// Accepts a server certificate that chains to the cluster CA, is valid now, and carries the
/// expected node's SPIFFE ID.
#[derive(Debug)]
struct NodeVerifier {
    roots: Arc<RootCertStore>,
    expected: String,
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
        if spiffe_ids(end_entity).contains(&self.expected) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General(format!("the peer is not {}", self.expected)))
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

/// The URI SANs of a certificate.
fn spiffe_ids(der: &[u8]) -> Vec<String> {
    let Ok((_, cert)) = X509Certificate::from_der(der) else { return Vec::new() };
    let Ok(Some(san)) = cert.subject_alternative_name() else { return Vec::new() };
    san.value
        .general_names
        .iter()
        .filter_map(|n| if let GeneralName::URI(u) = n { Some((*u).to_owned()) } else { None })
        .collect()
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
    pub spiffe_id: String,
}

/// Why a client certificate is not a workload of this cluster.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PeerError {
    #[error("no client certificate")]
    Missing,
    #[error("unreadable certificate: {0}")]
    Unreadable(String),
    #[error("certificate of a `{0}`, not of a workload")]
    NotWorkload(String),
    #[error("certificate of cluster `{0}`")]
    OtherCluster(String),
    #[error("certificate without a matching SPIFFE ID (has {0:?})")]
    Spiffe(Vec<String>),
}

impl Peer {
    /// Reads the caller from its certificate: workload unit, this cluster, a subject
    /// `<service>.<slot>@<node>` and the SPIFFE ID `spiffe://<cluster>/svc/<service>`.
    pub fn from_certificate(der: Option<&CertificateDer<'_>>, cluster: &str) -> Result<Peer, PeerError> {
        let der = der.ok_or(PeerError::Missing)?;
        let info = CertInfo::from_der(der).map_err(|e| PeerError::Unreadable(e.to_string()))?;
        if info.unit != WORKLOAD_OU {
            return Err(PeerError::NotWorkload(info.unit));
        }
        if info.organization != cluster {
            return Err(PeerError::OtherCluster(info.organization));
        }
        let unreadable = || PeerError::Unreadable(format!("subject `{}`", info.common_name));
        let (endpoint, node) = info.common_name.split_once('@').ok_or_else(unreadable)?;
        let node: NodeId = node.parse().map_err(|_| unreadable())?;
        let (service, _slot) = endpoint.rsplit_once('.').ok_or_else(unreadable)?;
        let mut ids = spiffe_ids(der);
        if ids != [format!("spiffe://{cluster}/svc/{service}")] {
            return Err(PeerError::Spiffe(ids));
        }
        let spiffe_id = ids.pop().expect("checked above");
        Ok(Peer { service: service.to_owned(), endpoint: endpoint.to_owned(), node, spiffe_id })
    }
}
