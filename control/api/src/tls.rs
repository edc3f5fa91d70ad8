//! TLS for the control API (rustls, TLS 1.3 only, aws-lc-rs).
//!
//! The server asks every client for a certificate but lets those without one reach the two
//! unauthenticated calls (fetching the root CA, joining with a token); a certificate that is
//! offered must chain to the cluster CA and be within its validity, or the handshake fails.
//! Who may call what is decided per call by the manager.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};

use crate::trust::Trust;

/// ALPN for gRPC over HTTP/2.
const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("bad PEM in {what}: {detail}")]
    Pem { what: &'static str, detail: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("a root CA certificate cannot be used as a trust anchor: {0}")]
    Anchor(String),
    #[error("client verifier: {0}")]
    Verifier(String),
}

/// The crypto provider for every TLS configuration of the project.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate chain and its private key, both PEM.
#[derive(Clone)]
pub struct Identity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity").field("key_pem", &"<redacted>").finish_non_exhaustive()
    }
}

impl Identity {
    /// The certificate chain and private key, parsed.
    pub fn parse(&self) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| TlsError::Pem { what: "certificate", detail: e.to_string() })?;
        if certs.is_empty() {
            return Err(TlsError::Pem { what: "certificate", detail: "no CERTIFICATE block".into() });
        }
        let key = PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes())
            .map_err(|e| TlsError::Pem { what: "private key", detail: e.to_string() })?;
        Ok((certs, key))
    }
}

/// A root store holding the roots of `trust`: the cluster CA (and its successor during a root
/// rotation).
pub fn roots(trust: &Trust) -> Result<Arc<RootCertStore>, TlsError> {
    Ok(Arc::new(trust.store().map_err(|e| TlsError::Anchor(e.to_string()))?))
}

/// The control API's server configuration: `identity` is the manager's certificate; client
/// certificates, when offered, must chain to a root of `trust`.
pub fn server_config(trust: &Trust, identity: &Identity) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = provider();
    let verifier = WebPkiClientVerifier::builder_with_provider(roots(trust)?, provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let (certs, key) = identity.parse()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// How a client trusts the server it connects to.
pub enum ServerTrust<'a> {
    /// The server's certificate must chain to a root of this trust and name
    /// [`crate::pki::CONTROL_SERVER_NAME`].
    Ca(&'a Trust),
    /// As [`ServerTrust::Ca`], and the certificate must be a manager certificate of one of these
    /// node IDs: the managers the client was last told of (by a session's slice, a leader's
    /// answer). A certificate of a removed or demoted manager, valid as it may still be, is
    /// refused. With no IDs known yet (a state written before they were kept), as `Ca`.
    Managers { ca: &'a Trust, ids: &'a [String] },
    /// Any certificate, for one purpose only: fetching the root CA during a join, which the
    /// joining node then checks against the digest in its token before trusting or sending
    /// anything. The handshake signature is still verified.
    FetchCaOnly,
}

/// A client configuration, presenting `identity` when given.
pub fn client_config(
    trust: ServerTrust<'_>,
    identity: Option<&Identity>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let builder = match trust {
        ServerTrust::Ca(trust) => builder.with_root_certificates(roots(trust)?),
        ServerTrust::Managers { ca, ids: [] } => builder.with_root_certificates(roots(ca)?),
        ServerTrust::Managers { ca, ids } => {
            let chain =
                rustls::client::WebPkiServerVerifier::builder_with_provider(roots(ca)?, provider.clone())
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(PinnedManagers { chain, ids: ids.to_vec() }))
        }
        ServerTrust::FetchCaOnly => {
            builder.dangerous().with_custom_certificate_verifier(Arc::new(AcceptAnyForCaFetch(provider)))
        }
    };
    let mut config = match identity {
        Some(id) => {
            let (certs, key) = id.parse()?;
            builder.with_client_auth_cert(certs, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

/// See [`ServerTrust::Managers`]: the CA's checks first, then the pin.
#[derive(Debug)]
struct PinnedManagers {
    chain: Arc<rustls::client::WebPkiServerVerifier>,
    ids: Vec<String>,
}

impl ServerCertVerifier for PinnedManagers {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let verified =
            self.chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)?;
        let info = crate::pki::CertInfo::from_der(end_entity)
            .map_err(|e| rustls::Error::General(format!("unreadable server certificate: {e}")))?;
        let manager = crate::tokens::Role::from_ou(&info.unit) == Some(crate::tokens::Role::Manager);
        if !manager || !self.ids.contains(&info.common_name) {
            return Err(rustls::Error::General(format!(
                "the server's certificate ({} {}) is not one of the managers this client knows ({})",
                info.unit,
                info.common_name,
                self.ids.join(", ")
            )));
        }
        Ok(verified)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.chain.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.supported_verify_schemes()
    }
}

/// See [`ServerTrust::FetchCaOnly`].
#[derive(Debug)]
struct AcceptAnyForCaFetch(Arc<CryptoProvider>);

impl ServerCertVerifier for AcceptAnyForCaFetch {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
