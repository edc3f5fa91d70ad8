//! Who is calling: the caller's role from its verified client certificate, checked against the
//! cluster state on every call (the denylist of removed nodes included).

use tonic::{Request, Status};

use mesh_api::ids::NodeId;
use mesh_api::pki::{CertInfo, Holder};
use mesh_api::tokens::Role;

use crate::state::{ClusterState, StateError};

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
/// removed nodes, workload certificates, and node certificates whose role disagrees with the
/// cluster state.
pub fn caller<T>(request: &Request<T>, state: &ClusterState) -> Result<Caller, Status> {
    let info = peer_info(request)?;
    let (id, role) = match info.holder(state.cluster_id.as_str()) {
        Ok(Holder::Admin) => {
            return match &state.admins {
                Some(admins) if !admins.contains_key(&info.serial) => {
                    Err(Status::permission_denied(format!(
                        "admin certificate {} is not (or no longer) one of this cluster's admin credentials",
                        info.serial
                    )))
                }
                _ => Ok(Caller::Admin),
            };
        }
        Ok(Holder::Node { id, role }) => (id, role),
        Ok(Holder::Workload { .. }) => {
            return Err(Status::permission_denied("a workload certificate cannot call control"));
        }
        Err(e) => return Err(Status::permission_denied(e.to_string())),
    };
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
