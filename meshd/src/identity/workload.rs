//! Workload certificates: one per local endpoint, from a CSR made here with a fresh key and sent
//! over mTLS with the node certificate (control signs only for endpoints it placed on this node),
//! kept in memory, renewed at half their lifetime, and each published on the endpoint's watch
//! channel for its proxy.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use mesh_api::client::ClientError;
use mesh_api::join::key_and_csr;
use mesh_api::pki::{self, CertInfo, Holder};
use mesh_api::proto::pb;
use mesh_api::tls::Identity;
use mesh_api::trust::Trust;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{IdentityError, NodeDir};
use crate::backoff;
use crate::metrics::{Endpoint, Metrics};

/// A workload's identity: its certificate (SPIFFE ID `spiffe://<cluster>/svc/<service>`) and key.
#[derive(Clone, Debug)]
pub struct WorkloadIdentity {
    pub identity: Identity,
    pub not_after: OffsetDateTime,
}

/// One endpoint's certificate as identity publishes it: `None` until the first is in place, then
/// each renewed one. The certificate in place serves until its successor is.
pub type WorkloadCertificate = watch::Receiver<Option<Arc<WorkloadIdentity>>>;

/// Asks control for a certificate for endpoint `service.slot` on this node: a fresh key pair made
/// here, a CSR over mTLS with the node certificate. Control refuses endpoints not placed here;
/// what it returns must chain to the cluster CA, be for the key made here, and name that
/// endpoint on this node.
pub async fn workload_certificate(
    dir: &Path,
    service: &str,
    slot: u32,
) -> Result<WorkloadIdentity, IdentityError> {
    let node = NodeDir::new(dir).load()?;
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
    node.trust
        .root_of(&response.cert_pem)
        .map_err(|e| IdentityError::BadCertificate(format!("is not signed by the cluster CA: {e}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(IdentityError::BadCertificate("is not for the key this node generated".into()));
    }
    let info = CertInfo::from_der(&der)?;
    let endpoint = format!("{service}.{slot}");
    match info.holder(&node.info.organization) {
        Ok(Holder::Workload { endpoint: e, node: n, .. }) if e == endpoint && n == node.id => {}
        _ => {
            return Err(IdentityError::BadCertificate(format!(
                "does not carry the SPIFFE ID of `{service}` for endpoint {endpoint} of this node"
            )));
        }
    }
    Ok(WorkloadIdentity {
        identity: Identity { cert_pem: response.cert_pem, key_pem: key.serialize_pem() },
        not_after: info.not_after,
    })
}

/// The local endpoints' workload certificates, by endpoint (`service.slot`): each kept fresh by a
/// task of its own and published on a watch channel of its own, which the endpoint's proxy reads
/// (ztunnel's `SecretManager`).
pub struct WorkloadCertificates {
    state_dir: PathBuf,
    metrics: Arc<Metrics>,
    kept: Mutex<BTreeMap<String, Kept>>,
    /// Bumped when the cluster's roots change: each endpoint whose certificate another root
    /// signed renews it at once.
    roots_changed: watch::Sender<u64>,
}

impl std::fmt::Debug for WorkloadCertificates {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCertificates").field("expiries", &self.expiries()).finish_non_exhaustive()
    }
}

/// One endpoint's certificate and the task that keeps it.
struct Kept {
    current: WorkloadCertificate,
    _renewing: AbortOnDropHandle<()>,
}

impl WorkloadCertificates {
    /// Certificates asked for with the node identity in `state_dir`, their expiry exported on
    /// `metrics`.
    pub fn new(state_dir: &Path, metrics: Arc<Metrics>) -> WorkloadCertificates {
        WorkloadCertificates {
            state_dir: state_dir.to_owned(),
            metrics,
            kept: Mutex::default(),
            roots_changed: watch::Sender::new(0),
        }
    }

    /// Endpoint `service.slot`'s certificate from now on, kept (from this call on, if it was not
    /// yet) until [`WorkloadCertificates::retain`] lets it go.
    pub fn watch(&self, service: &str, slot: u32) -> WorkloadCertificate {
        let endpoint = format!("{service}.{slot}");
        let mut kept = self.kept.lock().expect("lock");
        if let Some(k) = kept.get(&endpoint) {
            return k.current.clone();
        }
        let (publish, current) = watch::channel(None);
        let renewing = tokio::spawn(keep(
            self.state_dir.clone(),
            service.to_owned(),
            slot,
            publish,
            self.metrics.clone(),
            self.roots_changed.subscribe(),
        ));
        kept.insert(endpoint, Kept { current: current.clone(), _renewing: AbortOnDropHandle::new(renewing) });
        current
    }

    /// Stops keeping the certificates of the endpoints `wanted` says no to.
    pub fn retain(&self, wanted: impl Fn(&str) -> bool) {
        self.kept.lock().expect("lock").retain(|endpoint, _| wanted(endpoint));
    }

    /// Renews at once every certificate that is not `roots`' signing root's (the roots changed),
    /// and waits until each is, for `patience` at most; whether all are.
    pub async fn renew_from(&self, roots: &Trust, patience: std::time::Duration) -> bool {
        self.roots_changed.send_modify(|generation| *generation += 1);
        let all_renewed = || {
            let kept = self.kept.lock().expect("lock");
            kept.values().all(|k| {
                k.current.borrow().as_ref().is_none_or(|c| roots.signed_by_newest(&c.identity.cert_pem))
            })
        };
        let deadline = tokio::time::Instant::now() + patience;
        while !all_renewed() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        true
    }

    /// Each endpoint whose certificate is in place, and when that certificate expires.
    pub fn expiries(&self) -> Vec<(String, OffsetDateTime)> {
        let kept = self.kept.lock().expect("lock");
        kept.iter()
            .filter_map(|(endpoint, k)| Some((endpoint.clone(), k.current.borrow().as_ref()?.not_after)))
            .collect()
    }
}

/// Keeps endpoint `service.slot`'s workload certificate fresh: fetched at start, renewed at half
/// its lifetime (with up to 10 % jitter so a node's endpoints do not renew at once), retried with
/// backoff; each one is published on `publish` as soon as it is in hand.
async fn keep(
    state_dir: PathBuf,
    service: String,
    slot: u32,
    publish: watch::Sender<Option<Arc<WorkloadIdentity>>>,
    metrics: Arc<Metrics>,
    mut roots_changed: watch::Receiver<u64>,
) {
    let key = format!("{service}.{slot}");
    let gauge = Endpoint { endpoint: key.clone() };
    // When the endpoint goes, so does its gauge.
    struct Forget(Arc<Metrics>, Endpoint);
    impl Drop for Forget {
        fn drop(&mut self) {
            self.0.certificate_expiry.remove(&self.1);
        }
    }
    let _forget = Forget(metrics.clone(), gauge.clone());
    let mut attempt = 0u32;
    loop {
        match workload_certificate(&state_dir, &service, slot).await {
            Ok(cert) => {
                attempt = 0;
                let left = (cert.not_after - OffsetDateTime::now_utc()).unsigned_abs();
                info!(endpoint = %key, expires = %cert.not_after, "workload certificate in place");
                metrics.certificate_expiry.get_or_create(&gauge).set(cert.not_after.unix_timestamp());
                let pem = cert.identity.cert_pem.clone();
                publish.send_replace(Some(Arc::new(cert)));
                let jitter = rand::random_range(0.9..1.0);
                let due = tokio::time::sleep(left.mul_f64(0.5 * jitter));
                tokio::pin!(due);
                // Until it is due, or the roots changed and another root signs now.
                loop {
                    tokio::select! {
                        _ = &mut due => break,
                        changed = roots_changed.changed() => {
                            if changed.is_err() {
                                (&mut due).await;
                                break;
                            }
                            let newest = NodeDir::new(&state_dir).trust().is_ok_and(|t| t.signed_by_newest(&pem));
                            if !newest {
                                info!(endpoint = %key, "another root signs now: renewing the workload certificate");
                                break;
                            }
                        }
                    }
                }
            }
            Err(e) => {
                let wait = backoff::delay(attempt);
                warn!(endpoint = %key, error = %e, retry_in_ms = wait.as_millis() as u64, "workload certificate failed");
                tokio::time::sleep(wait).await;
                attempt = attempt.saturating_add(1);
            }
        }
    }
}
