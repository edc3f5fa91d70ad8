//! An external CA: a CFSSL server (`cfssl serve`) signs the CSRs that the managers checked, so no
//! manager holds a CA key. Requests go to `/api/v1/cfssl/authsign`, authenticated with the
//! signer's HMAC-SHA256 key (CFSSL's `standard` auth). A signer that also signs without it (a
//! profile without `auth_key`) would sign for anyone who reaches it: [`Cfssl::check_signer`]
//! refuses one before a cluster is made with it or rotated to it.
//!
//! The subject is the manager's, sent in the request; the CSR gives only its key. The profile is
//! named after the kind of certificate: `node`, `workload` or `admin`. What the signer answers is
//! trusted for nothing until [`check_answer`] has found that it chains to the pinned root and says
//! exactly what was asked, so a signer (or anyone on the link to it) cannot hand out a
//! certificate for another key, another holder, other names or a longer life. CFSSL 1.2 sets no
//! URI SAN: the subject alone names the holder ([`mesh_api::pki`]).

use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::TokioIo;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

use mesh_api::pki::{ADMIN_OU, CertInfo, WORKLOAD_OU, pem_to_der};
use mesh_api::trust::Trust;

use super::{CaError, Subject};

/// How long one request may take, connection included.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The pauses between attempts when the signer cannot be reached.
const RETRIES: [Duration; 2] = [Duration::from_millis(300), Duration::from_millis(1500)];
/// The most of an answer that is read.
const MAX_ANSWER: usize = 1 << 20;
/// How far the signer's clock may be from this manager's: CFSSL backdates a certificate's start by
/// 5 minutes and ends it that much before the expiry asked.
const CLOCK_SLACK: Duration = Duration::from_secs(300);
/// How many requests this manager has at the signer at once: a flood of certificate requests
/// waits here rather than at the signer.
const IN_FLIGHT: usize = 8;

/// The external signer a cluster was made with (`--external-ca cfssl=URL`), as the replicated
/// state holds it.
#[derive(Clone)]
pub struct Cfssl {
    url: String,
    /// `host:port`.
    authority: String,
    /// The URL's path, without a trailing `/`.
    base: String,
    auth_key: hmac::Key,
    root: Trust,
    /// Carried after every certificate it signs: during a root rotation, this root cross-signed
    /// by the old one; else empty.
    chain_pem: String,
    in_flight: std::sync::Arc<tokio::sync::Semaphore>,
    /// When the last request failed and why; none once one succeeds (`meshctl check` says it).
    last_failure: std::sync::Arc<std::sync::Mutex<Option<(OffsetDateTime, String)>>>,
}

impl std::fmt::Debug for Cfssl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cfssl").field("url", &self.url).finish_non_exhaustive()
    }
}

/// `--external-ca` as given: `cfssl=http://HOST:PORT[/PATH]`.
pub fn parse_external_ca(value: &str) -> Result<String, String> {
    let url = value.strip_prefix("cfssl=").ok_or_else(|| {
        format!("`{value}`: expected cfssl=http://HOST:PORT (CFSSL is the one external CA protocol)")
    })?;
    split_url(url)?;
    Ok(url.to_owned())
}

/// An auth key as CFSSL's config holds it: hex, 16 bytes at least.
pub fn parse_auth_key(text: &str) -> Result<Vec<u8>, String> {
    let text = text.trim();
    let bytes = (0..text.len())
        .step_by(2)
        .map(|i| text.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
        .collect::<Option<Vec<u8>>>()
        .filter(|_| text.len().is_multiple_of(2))
        .ok_or("the auth key is not hex (CFSSL's `auth_keys` entry holds it as hex)")?;
    if bytes.len() < 16 {
        return Err(format!("the auth key is {} bytes; 16 at least", bytes.len()));
    }
    Ok(bytes)
}

fn split_url(url: &str) -> Result<(String, String), String> {
    let uri: http::Uri = url.parse().map_err(|e| format!("`{url}` is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!(
            "`{url}`: only http:// is spoken to the signer (what it answers is checked against the pinned root)"
        ));
    }
    let authority = uri.authority().ok_or_else(|| format!("`{url}` names no host"))?;
    if authority.port_u16().is_none() {
        return Err(format!("`{url}` names no port (cfssl serve listens on 8888 by default)"));
    }
    if uri.query().is_some() || authority.as_str().contains('@') {
        return Err(format!("`{url}`: a signer's URL has no user or query"));
    }
    Ok((authority.to_string(), uri.path().trim_end_matches('/').to_owned()))
}

#[derive(Serialize)]
struct SignRequest<'a> {
    certificate_request: &'a str,
    hosts: &'a [String],
    subject: RequestSubject<'a>,
    profile: &'static str,
}

#[derive(Serialize)]
struct RequestSubject<'a> {
    #[serde(rename = "CN")]
    common_name: &'a str,
    names: [RequestName<'a>; 1],
}

#[derive(Serialize)]
struct RequestName<'a> {
    #[serde(rename = "O")]
    organization: &'a str,
    #[serde(rename = "OU")]
    unit: &'a str,
}

#[derive(Serialize)]
struct AuthenticatedRequest {
    token: String,
    request: String,
}

#[derive(Deserialize)]
struct Answer {
    success: bool,
    #[serde(default)]
    result: Option<serde_json::Value>,
    #[serde(default)]
    errors: Vec<AnswerError>,
}

#[derive(Deserialize)]
struct AnswerError {
    #[serde(default)]
    message: String,
}

/// The profile a certificate of `subject` is signed with.
fn profile(subject: &Subject) -> &'static str {
    match subject.unit.as_str() {
        WORKLOAD_OU => "workload",
        ADMIN_OU => "admin",
        _ => "node",
    }
}

impl Cfssl {
    /// The signer at `url`, whose certificates must chain to `root_pem`.
    pub fn new(url: &str, auth_key: &[u8], root_pem: &str) -> Result<Cfssl, CaError> {
        let (authority, base) = split_url(url).map_err(CaError::Given)?;
        let root =
            Trust::from_pem(root_pem).map_err(|e| CaError::Given(format!("the external root: {e}")))?;
        if root.roots().len() != 1 {
            return Err(CaError::Given("the external root is one certificate".into()));
        }
        Ok(Cfssl {
            url: url.to_owned(),
            authority,
            base,
            auth_key: hmac::Key::new(hmac::HMAC_SHA256, auth_key),
            root,
            chain_pem: String::new(),
            in_flight: std::sync::Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT)),
            last_failure: Default::default(),
        })
    }

    /// This signer, `chain_pem` carried after every certificate it signs.
    pub fn with_chain(mut self, chain_pem: &str) -> Cfssl {
        self.chain_pem = chain_pem.to_owned();
        self
    }

    /// When its last request failed, and why; none when it succeeded.
    pub fn last_failure(&self) -> Option<(OffsetDateTime, String)> {
        self.last_failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// The root certificate (PEM) it signs with.
    pub fn root_pem(&self) -> &str {
        &self.root.newest().pem
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// The digest of the root the signer's certificates chain to.
    pub fn root_digest(&self) -> String {
        self.root.newest().digest.clone()
    }

    /// Refuses a signer that signs without authentication: a request to CFSSL's unauthenticated
    /// `/api/v1/cfssl/sign`, for a key thrown away and a node that does not exist, with each
    /// profile the managers use and the default, must be refused.
    pub async fn check_signer(&self) -> Result<(), CaError> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(CaError::Sign)?;
        let csr = rcgen::CertificateParams::default()
            .serialize_request(&key)
            .and_then(|c| c.pem())
            .map_err(CaError::Sign)?;
        let cluster = mesh_api::ids::ClusterId::random();
        let node = mesh_api::ids::NodeId::random();
        let subject =
            Subject::node(&cluster, &node, mesh_api::tokens::Role::Worker, Duration::from_secs(3600));
        for profile in ["", "node", "workload", "admin"] {
            let request = self.request(&csr, &subject, profile);
            let path = format!("{}/api/v1/cfssl/sign", self.base);
            match post_retrying(&self.url, &self.authority, &path, request).await {
                Err(CaError::Signer { .. }) => {}
                Err(e) => return Err(e),
                Ok(_) => {
                    return Err(CaError::Signer {
                        url: self.url.clone(),
                        error: format!(
                            "it signs without authentication (profile `{}`): give every profile of its \
                             config, `default` included, an `auth_key`",
                            if profile.is_empty() { "default" } else { profile }
                        ),
                    });
                }
            }
        }
        Ok(())
    }

    fn request(&self, csr_pem: &str, subject: &Subject, profile: &'static str) -> Vec<u8> {
        let organization = subject.cluster.to_string();
        let request = SignRequest {
            certificate_request: csr_pem,
            hosts: &subject.dns_names,
            subject: RequestSubject {
                common_name: &subject.common_name,
                names: [RequestName { organization: &organization, unit: &subject.unit }],
            },
            profile,
        };
        serde_json::to_vec(&request).expect("a sign request serializes")
    }

    /// Has the signer sign `csr_pem` (whose key is `public_key`) with `subject`, and checks what
    /// it answers. Returns the certificate, then the chain this signer carries: nothing else the
    /// signer sends is passed on.
    pub async fn sign(&self, csr_pem: &str, public_key: &[u8], subject: &Subject) -> Result<String, CaError> {
        let signed = self.sign_checked(csr_pem, public_key, subject).await;
        *self.last_failure.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            signed.as_ref().err().map(|e| (OffsetDateTime::now_utc(), e.to_string()));
        signed
    }

    async fn sign_checked(
        &self,
        csr_pem: &str,
        public_key: &[u8],
        subject: &Subject,
    ) -> Result<String, CaError> {
        let request = self.request(csr_pem, subject, profile(subject));
        let token = hmac::sign(&self.auth_key, &request);
        let envelope =
            AuthenticatedRequest { token: BASE64.encode(token.as_ref()), request: BASE64.encode(&request) };
        let body = serde_json::to_vec(&envelope).expect("an envelope serializes");
        let _turn = self.in_flight.acquire().await.expect("the semaphore is never closed");
        let path = format!("{}/api/v1/cfssl/authsign", self.base);
        let answer = post_retrying(&self.url, &self.authority, &path, body).await?;
        let cert_pem = answer.get("certificate").and_then(|c| c.as_str()).ok_or_else(|| CaError::Signer {
            url: self.url.clone(),
            error: "its answer holds no certificate".into(),
        })?;
        let leaf = check_answer(&self.root, cert_pem, public_key, subject, OffsetDateTime::now_utc())
            .map_err(|why| CaError::Untrusted { url: self.url.clone(), why })?;
        Ok(format!("{leaf}{}", self.chain_pem))
    }
}

/// Posts `body` to `path`, trying again after [`RETRIES`] while the signer cannot be reached; a
/// refusal is not tried again.
async fn post_retrying(
    url: &str,
    authority: &str,
    path: &str,
    body: Vec<u8>,
) -> Result<serde_json::Value, CaError> {
    let mut pauses = RETRIES.iter();
    loop {
        match post(url, authority, path, body.clone()).await {
            Err(CaError::Unreachable { url, error }) => match pauses.next() {
                Some(pause) => {
                    tracing::warn!(%url, %error, "the external CA cannot be reached; trying again");
                    tokio::time::sleep(*pause).await;
                }
                None => return Err(CaError::Unreachable { url, error }),
            },
            other => return other,
        }
    }
}

async fn post(url: &str, authority: &str, path: &str, body: Vec<u8>) -> Result<serde_json::Value, CaError> {
    let unreachable = |error: String| CaError::Unreachable { url: url.to_owned(), error };
    let exchange = async {
        let stream =
            tokio::net::TcpStream::connect(authority).await.map_err(|e| unreachable(e.to_string()))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        let connection = tokio::spawn(connection);
        let request = http::Request::post(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| unreachable(e.to_string()))?;
        let response = sender.send_request(request).await.map_err(|e| unreachable(e.to_string()));
        let response = match response {
            Ok(r) => r,
            Err(e) => {
                connection.abort();
                return Err(e);
            }
        };
        let status = response.status();
        let bytes = Limited::new(response.into_body(), MAX_ANSWER)
            .collect()
            .await
            .map_err(|e| unreachable(format!("reading its answer: {e}")))?
            .to_bytes();
        connection.abort();
        Ok::<_, CaError>((status, bytes))
    };
    let (status, bytes) = tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.map_err(|_| {
        unreachable(format!("no answer within {}", humantime::format_duration(REQUEST_TIMEOUT)))
    })??;
    if status.is_server_error() && serde_json::from_slice::<Answer>(&bytes).is_err() {
        return Err(unreachable(format!("it answered {status}")));
    }
    let answer: Answer = serde_json::from_slice(&bytes).map_err(|e| CaError::Signer {
        url: url.to_owned(),
        error: format!("{status}, and not a CFSSL answer: {e}"),
    })?;
    if !answer.success {
        let messages: Vec<&str> = answer.errors.iter().map(|e| e.message.as_str()).collect();
        return Err(CaError::Signer {
            url: url.to_owned(),
            error: format!("{status}: {}", messages.join("; ")),
        });
    }
    answer
        .result
        .ok_or_else(|| CaError::Signer { url: url.to_owned(), error: "an answer without a result".into() })
}

/// Whether `cert_pem`, the signer's answer, is a certificate that `root` signed for
/// `public_key`, naming `subject`'s holder and names and nothing else, not a CA, valid at `now`
/// and ending no later than asked; returns its first certificate. The reason, if not.
pub fn check_answer(
    root: &Trust,
    cert_pem: &str,
    public_key: &[u8],
    subject: &Subject,
    now: OffsetDateTime,
) -> Result<String, String> {
    let der = pem_to_der(cert_pem).map_err(|e| e.to_string())?;
    let leaf = mesh_api::trust::pem(&der);
    root.root_of(&leaf).map_err(|e| format!("the certificate is not the pinned root's: {e}"))?;
    let (_, cert) = X509Certificate::from_der(&der).map_err(|e| e.to_string())?;
    if cert.public_key().subject_public_key.data.as_ref() != public_key {
        return Err("the certificate is for another key than the CSR's".into());
    }
    let info = CertInfo::from_der(&der).map_err(|e| e.to_string())?;
    let cluster = subject.cluster.to_string();
    let asked = (subject.common_name.as_str(), subject.unit.as_str(), cluster.as_str());
    let given = (info.common_name.as_str(), info.unit.as_str(), info.organization.as_str());
    if asked != given {
        return Err(format!(
            "the certificate names CN={} OU={} O={}, not what was asked",
            given.0, given.1, given.2
        ));
    }
    let subject_fields = cert.subject().iter().flat_map(|rdn| rdn.iter()).count();
    if subject_fields != 3 {
        return Err(format!("the certificate's subject has {subject_fields} fields, not CN, OU and O alone"));
    }
    info.holder(&cluster).map_err(|e| e.to_string())?;
    match cert.basic_constraints() {
        Ok(Some(bc)) if bc.value.ca => return Err("the certificate is a CA's".into()),
        Err(e) => return Err(format!("the certificate's basic constraints: {e}")),
        _ => {}
    }
    let (_, root_cert) = X509Certificate::from_der(&root.newest().der).map_err(|e| e.to_string())?;
    if cert.issuer().as_raw() != root_cert.subject().as_raw() {
        return Err("the certificate's issuer is not the root's subject".into());
    }
    let names = match cert.subject_alternative_name() {
        Ok(Some(san)) => san.value.general_names.clone(),
        Ok(None) => Vec::new(),
        Err(e) => return Err(e.to_string()),
    };
    for name in &names {
        let asked = match name {
            GeneralName::DNSName(dns) => subject.dns_names.iter().any(|d| d == dns),
            GeneralName::URI(uri) => subject.uris.iter().any(|u| u == uri),
            _ => false,
        };
        if !asked {
            return Err(format!("the certificate carries a name that was not asked: {name:?}"));
        }
    }
    for dns in &subject.dns_names {
        if !names.iter().any(|n| matches!(n, GeneralName::DNSName(d) if d == dns)) {
            return Err(format!("the certificate lacks the name {dns}"));
        }
    }
    match cert.extended_key_usage() {
        Ok(Some(eku)) if !(eku.value.any || (eku.value.client_auth && eku.value.server_auth)) => {
            return Err(format!(
                "the certificate is not for both client and server auth: give the `{}` profile the usages `server auth` and `client auth`",
                profile(subject)
            ));
        }
        Err(e) => return Err(e.to_string()),
        _ => {}
    }
    if info.not_before > now + CLOCK_SLACK || info.not_after <= now {
        return Err(format!(
            "the certificate is valid from {} to {}, not now",
            info.not_before, info.not_after
        ));
    }
    if info.not_after > subject.not_after + CLOCK_SLACK {
        return Err(format!(
            "the certificate ends {}, later than the {} asked: make the `{}` profile's expiry shorter",
            info.not_after,
            subject.not_after,
            profile(subject)
        ));
    }
    Ok(leaf)
}

#[cfg(test)]
mod tests {
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        PKCS_ECDSA_P256_SHA256, SanType,
    };

    use mesh_api::ids::{ClusterId, NodeId};
    use mesh_api::tokens::Role;

    use super::*;
    use crate::ca::ClusterCa;

    /// What a signer could answer: a certificate of `params`' making, signed by `ca`.
    fn answer(ca: &ClusterCa, key: &KeyPair, edit: impl FnOnce(&mut CertificateParams, &Subject)) -> String {
        let subject = subject();
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, subject.cluster.to_string());
        dn.push(DnType::OrganizationalUnitName, subject.unit.clone());
        dn.push(DnType::CommonName, subject.common_name.clone());
        params.distinguished_name = dn;
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.subject_alt_names = vec![SanType::DnsName("mesh-control".try_into().unwrap())];
        params.not_before = OffsetDateTime::now_utc() - Duration::from_secs(300);
        params.not_after = subject.not_after;
        edit(&mut params, &subject);
        ca.sign_params(params, key).unwrap()
    }

    fn subject() -> Subject {
        static CLUSTER: std::sync::OnceLock<(ClusterId, NodeId)> = std::sync::OnceLock::new();
        let (cluster, node) = CLUSTER.get_or_init(|| (ClusterId::random(), NodeId::random()));
        Subject::node(cluster, node, Role::Manager, Duration::from_secs(24 * 3600))
    }

    #[test]
    fn a_signer_answer_is_taken_only_when_it_says_exactly_what_was_asked() {
        let ca = ClusterCa::generate(&subject().cluster).unwrap();
        let root = Trust::from_pem(ca.cert_pem()).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let check =
            |pem: &str| check_answer(&root, pem, key.public_key_raw(), &subject(), OffsetDateTime::now_utc());
        check(&answer(&ca, &key, |_, _| {})).expect("what was asked is taken");

        let other_ca = ClusterCa::generate(&subject().cluster).unwrap();
        let other_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let lies: Vec<(&str, String)> = vec![
            ("another root's", answer(&other_ca, &key, |_, _| {})),
            ("another key", answer(&ca, &other_key, |_, _| {})),
            (
                "another node",
                answer(&ca, &key, |p, _| {
                    p.distinguished_name.push(DnType::CommonName, NodeId::random().to_string());
                }),
            ),
            (
                "another role",
                answer(&ca, &key, |p, _| {
                    p.distinguished_name.push(DnType::OrganizationalUnitName, "mesh-admin");
                }),
            ),
            ("a field more", answer(&ca, &key, |p, _| p.distinguished_name.push(DnType::LocalityName, "x"))),
            (
                "a name more",
                answer(&ca, &key, |p, _| {
                    p.subject_alt_names.push(SanType::DnsName("evil.example".try_into().unwrap()))
                }),
            ),
            ("a name less", answer(&ca, &key, |p, _| p.subject_alt_names.clear())),
            (
                "an IP SAN",
                answer(&ca, &key, |p, _| p.subject_alt_names.push(SanType::IpAddress([10, 0, 0, 1].into()))),
            ),
            (
                "a URI of another node",
                answer(&ca, &key, |p, s| {
                    let uri =
                        mesh_api::pki::SpiffeId::Node { cluster: s.cluster.clone(), node: NodeId::random() };
                    p.subject_alt_names.push(SanType::URI(uri.to_string().try_into().unwrap()));
                }),
            ),
            ("a CA", answer(&ca, &key, |p, _| p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained))),
            (
                "client auth alone",
                answer(&ca, &key, |p, _| p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth]),
            ),
            (
                "a longer life",
                answer(&ca, &key, |p, s| p.not_after = s.not_after + Duration::from_secs(2 * 24 * 3600)),
            ),
            (
                "an hour longer",
                answer(&ca, &key, |p, s| p.not_after = s.not_after + Duration::from_secs(3600)),
            ),
            (
                "not valid yet",
                answer(&ca, &key, |p, _| {
                    p.not_before = OffsetDateTime::now_utc() + Duration::from_secs(3600)
                }),
            ),
            (
                "expired",
                answer(&ca, &key, |p, _| {
                    p.not_before = OffsetDateTime::now_utc() - Duration::from_secs(7200);
                    p.not_after = OffsetDateTime::now_utc() - Duration::from_secs(3600);
                }),
            ),
        ];
        for (what, pem) in lies {
            assert!(check(&pem).is_err(), "{what} was taken");
        }
        assert!(check("not a certificate").is_err());
    }

    #[test]
    fn only_cfssl_over_http_with_a_port_and_hex_keys_of_16_bytes_are_accepted() {
        assert!(Cfssl::new("http://10.0.0.1:8888", &[7; 16], "not a root").is_err());
        assert_eq!(parse_external_ca("cfssl=http://10.0.0.1:8888").unwrap(), "http://10.0.0.1:8888");
        assert_eq!(
            split_url("http://ca.example:8888/prefix/").unwrap(),
            ("ca.example:8888".into(), "/prefix".into())
        );
        for bad in [
            "http://10.0.0.1:8888",
            "vault=http://10.0.0.1:8888",
            "cfssl=https://10.0.0.1:8888",
            "cfssl=http://10.0.0.1",
            "cfssl=http://user@10.0.0.1:8888",
            "cfssl=http://10.0.0.1:8888/?x=1",
            "cfssl=not a url",
        ] {
            assert!(parse_external_ca(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_auth_key("0123456789abcdef0123456789ABCDEF\n").unwrap().len(), 16);
        for bad in ["0123", "0123456789abcdef0123456789abcdeg", "0123456789abcdef0123456789abcdef0", ""] {
            assert!(parse_auth_key(bad).is_err(), "{bad}");
        }
    }
}
