//! The identity service: the root CA for anyone, join with a token, renewal over mTLS.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use time::OffsetDateTime;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::internal;
use crate::auth::Caller;
use crate::manager::Manager;
use crate::state::{Command, NodeRecord, NodeState};
use mesh_api::ids::NodeId;
use mesh_api::pki::CertInfo;
use mesh_api::proto::pb;
use mesh_api::tokens::JoinToken;

/// Longest hostname accepted in a join.
const MAX_HOSTNAME: usize = 253;

/// Whether `hostname` may name a node: 1 to 253 characters of letters, digits, `-`, `.`, `_`.
pub fn check_hostname(hostname: &str) -> Result<(), String> {
    if hostname.is_empty()
        || hostname.len() > MAX_HOSTNAME
        || !hostname.chars().all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
    {
        return Err(format!(
            "hostname `{}` is not valid: 1 to {MAX_HOSTNAME} characters of a-z, 0-9, `-`, `.`, `_`",
            hostname.escape_default()
        ));
    }
    Ok(())
}

pub(crate) struct IdentityApi(pub(crate) Arc<Manager>);

#[tonic::async_trait]
impl pb::identity_server::Identity for IdentityApi {
    async fn get_root_ca(
        &self,
        _request: Request<pb::GetRootCaRequest>,
    ) -> Result<Response<pb::GetRootCaResponse>, Status> {
        let view = self.0.ca_view();
        Ok(Response::new(pb::GetRootCaResponse {
            ca_pem: view.trust.to_pem(),
            cross_pem: view.cross_pem.clone(),
        }))
    }

    async fn join(&self, request: Request<pb::JoinRequest>) -> Result<Response<pb::JoinResponse>, Status> {
        let manager = &self.0;
        manager.join_attempts.fetch_add(1, Ordering::Relaxed);
        manager.lead()?;
        let req = request.into_inner();
        let token: JoinToken =
            req.token.parse().map_err(|e| Status::invalid_argument(format!("malformed join token: {e}")))?;
        let view = manager.ca_view();
        if !view.trust.has(token.ca_digest()) {
            return Err(Status::permission_denied(format!(
                "the join token pins CA digest {}, but this cluster's root CA digest is {} \
                 (if its root was rotated, get the current token with `meshctl join-token`)",
                token.ca_digest(),
                view.digest()
            )));
        }
        let role = manager.store.read(|s| s.role_for_token(&token.secret_hash())).ok_or_else(|| {
            warn!("join refused: the token's secret matches no current join token");
            Status::permission_denied(
                "invalid join token: its secret matches no current token (rotated or wrong)",
            )
        })?;
        if req.manager && role != mesh_api::tokens::Role::Manager {
            return Err(Status::permission_denied(
                "this is a worker token: a manager joins with the manager token (`meshctl join-token manager`)",
            ));
        }
        let hostname = req.hostname.trim();
        check_hostname(hostname).map_err(Status::invalid_argument)?;
        let id = NodeId::random();
        let issued = manager.issue_node_certificate(&req.csr_pem, &id, role).await?;
        manager
            .store
            .apply(Command::AddNode(NodeRecord {
                id: id.clone(),
                hostname: hostname.to_owned(),
                role,
                state: NodeState::Active,
                joined_at: OffsetDateTime::now_utc().unix_timestamp(),
                cert_not_after: issued.not_after,
                cert_root: issued.root,
                wireguard: Default::default(),
                labels: Default::default(),
                underlay: None,
                index: 0,
                control: None,
                removed_at: None,
                boot: 0,
                demoted: false,
            }))
            .await
            .map_err(internal)?;
        let node_index = manager.store.read(|s| s.nodes.get(&id).map(|n| n.index)).unwrap_or_default();
        info!(node = %id, %role, hostname, "node joined");
        Ok(Response::new(pb::JoinResponse {
            node_id: id.to_string(),
            cert_pem: issued.cert_pem,
            ca_pem: view.trust.to_pem(),
            node_index,
            autolock: role == mesh_api::tokens::Role::Manager
                && manager.store.read(|s| s.unlock_key.is_some()),
        }))
    }

    async fn renew(&self, request: Request<pb::RenewRequest>) -> Result<Response<pb::RenewResponse>, Status> {
        let manager = &self.0;
        let (id, role) = match manager.caller(&request)? {
            Caller::Node { id, role } => (id, role),
            Caller::Admin => {
                return Err(Status::permission_denied("only nodes renew certificates"));
            }
        };
        manager.allow_renewal(&id)?;
        let issued = manager.issue_node_certificate(&request.get_ref().csr_pem, &id, role).await?;
        manager
            .store
            .apply(Command::RecordCertificate {
                id: id.clone(),
                not_after: issued.not_after,
                root: issued.root,
            })
            .await
            .map_err(|e| Status::permission_denied(e.to_string()))?;
        info!(node = %id, "renewed a node certificate");
        Ok(Response::new(pb::RenewResponse { cert_pem: issued.cert_pem }))
    }

    async fn issue_workload_cert(
        &self,
        request: Request<pb::WorkloadCertRequest>,
    ) -> Result<Response<pb::WorkloadCertResponse>, Status> {
        let manager = &self.0;
        let node = match manager.caller(&request)? {
            Caller::Node { id, .. } => id,
            Caller::Admin => {
                return Err(Status::permission_denied("workload certificates are for nodes to ask"));
            }
        };
        let req = request.into_inner();
        // Only for an endpoint control placed on this very node.
        let placed = manager.store.read(|s| {
            s.services
                .get(&req.service)
                .and_then(|svc| svc.endpoints.get(&req.slot))
                .is_some_and(|e| e.node == node)
        });
        if !placed {
            warn!(node = %node, service = %req.service, slot = req.slot, "workload certificate refused: endpoint not placed on this node");
            return Err(Status::permission_denied(format!(
                "endpoint {}.{} is not placed on node {node}: no certificate for it",
                req.service, req.slot
            )));
        }
        let cluster = manager.store.read(|s| s.cluster_id.clone());
        let subject = crate::ca::Subject::workload(
            &cluster,
            &req.service,
            req.slot,
            &node,
            manager.settings().workload_cert_lifetime,
        );
        let cert_pem = manager.ca()?.issue_for_csr(&req.csr_pem, &subject).await.map_err(|e| e.status())?;
        // An external CA's certificate may end before the one asked for.
        let not_after = CertInfo::from_pem(&cert_pem).map_err(internal)?.not_after;
        manager.metrics.certificates.get_or_create(&crate::metrics::CertKind { kind: "workload" }).inc();
        info!(node = %node, service = %req.service, slot = req.slot, "workload certificate issued");
        Ok(Response::new(pb::WorkloadCertResponse { cert_pem, not_after: not_after.unix_timestamp() }))
    }
}
