//! The manager's own certificate: renewed once past half its lifetime (or at once when another
//! root signs now), by the leader itself or, on a follower, by asking the leader as meshd does.

use mesh_api::client;
use mesh_api::ids::NodeId;
use mesh_api::join;
use mesh_api::pki::CertInfo;
use mesh_api::proto::pb;
use mesh_api::tls::{self, Identity};
use mesh_api::tokens::Role;
use time::OffsetDateTime;
use tracing::info;

use super::Manager;
use crate::ca::Subject;
use crate::state::Command;

impl Manager {
    /// Re-issues this manager's own certificate once past half its lifetime: the leader issues
    /// it itself, a follower asks the leader for one (as meshd does).
    pub(crate) async fn renew_own_certificate_if_due(
        &self,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let current = self.identity()?;
        let info = CertInfo::from_pem(&current.cert_pem)?;
        let now = OffsetDateTime::now_utc();
        let half = info.not_before + (info.not_after - info.not_before) / 2;
        if now < half && self.ca_view().trust.signed_by_newest(&current.cert_pem) {
            return Ok(());
        }
        self.renew_own_certificate().await
    }

    /// Re-issues this manager's own certificate now, from the root that signs now.
    pub(crate) async fn renew_own_certificate(&self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let _one = self.own_renewal.lock().await;
        let current = self.identity()?;
        if self.ca_view().trust.signed_by_newest(&current.cert_pem)
            && CertInfo::from_pem(&current.cert_pem)
                .is_ok_and(|i| OffsetDateTime::now_utc() < i.not_before + (i.not_after - i.not_before) / 2)
        {
            return Ok(()); // renewed meanwhile, by the other caller
        }
        let info = CertInfo::from_pem(&current.cert_pem)?;
        let id: NodeId = info.common_name.parse()?;
        let identity = if self.store.leadership().leading {
            let (cluster_id, lifetime) = self.store.read(|s| (s.cluster_id.clone(), s.cert_lifetime()));
            let ca = self.ca()?;
            let (cert_pem, key_pem) =
                ca.issue_with_new_key(&Subject::node(&cluster_id, &id, Role::Manager, lifetime)).await?;
            self.metrics.certificates.get_or_create(&crate::metrics::CertKind { kind: "manager" }).inc();
            let not_after = CertInfo::from_pem(&cert_pem)?.not_after.unix_timestamp();
            self.store
                .apply(Command::RecordCertificate { id: id.clone(), not_after, root: ca.digest() })
                .await?;
            Identity { cert_pem, key_pem }
        } else {
            let (key, csr_pem) = join::key_and_csr()?;
            let leader = self.leader_as(&current, &self.manager_addresses()).await?;
            let cert_pem = pb::identity_client::IdentityClient::new(leader.channel)
                .renew(pb::RenewRequest { csr_pem })
                .await
                .map_err(|s| client::ClientError::refused(&leader.addr, s))?
                .into_inner()
                .cert_pem;
            join::check_issued(&cert_pem, &self.ca_view().trust, &key, Some(&id))?;
            Identity { cert_pem, key_pem: key.serialize_pem() }
        };
        let trust = &self.ca_view().trust;
        let config = tls::server_config(trust, &identity)?;
        // Under the data key's lock: a fresh data key (autolock) re-seals the key file meanwhile.
        self.dir.write_manager_identity(&identity, &self.data_key.lock().expect("lock"))?;
        self.peers.set_identity(trust, &identity)?;
        *self.server_tls.lock().expect("lock") = config;
        info!(node = %id, "renewed the manager's own certificate");
        Ok(())
    }
}
