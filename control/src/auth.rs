//! Who is calling: the caller's role from its verified client certificate, checked against the
//! cluster state on every call (the denylist of removed nodes included).

use tonic::{Request, Status};

use crate::ca::{ADMIN_CN, ADMIN_OU, CertInfo};
use crate::ids::NodeId;
use crate::state::{ClusterState, StateError};
use crate::tokens::Role;

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    Admin,
    Node { id: NodeId, role: Role },
}

/// The certificate the TLS layer verified for this request (it chains to the cluster CA and is
/// within its validity), read into its subject fields.
fn peer_info<T>(request: &Request<T>) -> Result<CertInfo, Status> {
    let certs = request.peer_certs().ok_or_else(|| {
        Status::unauthenticated("this call needs a client certificate issued by the cluster CA")
    })?;
    let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate was presented"))?;
    CertInfo::from_der(leaf)
        .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))
}

/// Identifies the caller of `request`. Refuses certificates of another cluster, of unknown or
/// removed nodes, and node certificates whose role disagrees with the cluster state.
pub fn caller<T>(request: &Request<T>, state: &ClusterState) -> Result<Caller, Status> {
    let info = peer_info(request)?;
    if info.organization != state.cluster_id.as_str() {
        return Err(Status::permission_denied(format!(
            "certificate is for cluster {}, not this one",
            info.organization
        )));
    }
    if info.unit == ADMIN_OU && info.common_name == ADMIN_CN {
        return Ok(Caller::Admin);
    }
    let role = Role::from_ou(&info.unit)
        .ok_or_else(|| Status::permission_denied(format!("unknown certificate role `{}`", info.unit)))?;
    let id: NodeId = info.common_name.parse().map_err(|e| Status::permission_denied(format!("{e}")))?;
    let record = state.active_node(&id).map_err(|e| match e {
        StateError::NodeRemoved(_) => Status::permission_denied(e.to_string()),
        other => Status::unauthenticated(other.to_string()),
    })?;
    if record.role != role {
        return Err(Status::permission_denied(format!(
            "certificate says node {id} is a {role}, the cluster says {}",
            record.role
        )));
    }
    Ok(Caller::Node { id, role })
}

/// Refuses anyone but an admin.
pub fn require_admin(caller: &Caller) -> Result<(), Status> {
    match caller {
        Caller::Admin => Ok(()),
        Caller::Node { id, role } => Err(Status::permission_denied(format!(
            "admin calls need an admin certificate; {role} node {id} cannot make them"
        ))),
    }
}
