//! What reaches a handler at all, decided from the request's headers and the connection's
//! certificate before a byte of its body is read (so before tonic reserves room for a message
//! of the size the caller claims):
//!
//! * without a client certificate, only the join path: the root CA, joining, finding the leader;
//! * node calls (sessions, renewal, workload certificates) only with a node certificate, raft and
//!   adding a manager only with a manager's, admin calls only with the admin's — each of this
//!   cluster; a workload certificate reaches nothing. The handlers then check the caller against
//!   the cluster state (removed nodes, roles).
//!
//! So the largest message someone may make a manager make room for is bounded by what their
//! certificate proves: 16 KiB without one (see [`crate::config`]).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use mesh_api::pki::{CertInfo, Holder};
use mesh_api::tokens::Role;
use tonic::Status;
use tonic::body::Body;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// Who may make a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Who {
    /// Anyone, without a certificate too: the join path.
    Anyone,
    /// A node of this cluster (worker or manager).
    Node,
    /// A manager of this cluster.
    Manager,
    /// The admin.
    Admin,
}

/// Who may call `path` (a gRPC path, `/package.Service/Method`); `None`: no such call.
fn who_may_call(path: &str) -> Option<Who> {
    let (service, method) = path.strip_prefix("/mesh.v1.")?.split_once('/')?;
    Some(match (service, method) {
        ("Identity", "GetRootCa" | "Join") | ("Managers", "Leader") => Who::Anyone,
        ("Identity", "Renew" | "IssueWorkloadCert")
        | ("Dispatcher", "Session" | "ReportEndpoints" | "Requests" | "AnswerLogs") => Who::Node,
        ("Raft", _) | ("Managers", "AddManager") => Who::Manager,
        ("Admin", _) | ("Managers", "Unlock") => Who::Admin,
        _ => return None,
    })
}

/// A [`tower::Layer`] putting a [`Gate`] in front of every service of the control port.
#[derive(Clone)]
pub struct GateLayer {
    cluster: Arc<str>,
}

impl GateLayer {
    pub fn new(cluster: &str) -> GateLayer {
        GateLayer { cluster: Arc::from(cluster) }
    }
}

impl<S> tower::Layer<S> for GateLayer {
    type Service = Gate<S>;
    fn layer(&self, inner: S) -> Gate<S> {
        Gate { inner, cluster: self.cluster.clone() }
    }
}

/// See the module documentation.
#[derive(Clone)]
pub struct Gate<S> {
    inner: S,
    cluster: Arc<str>,
}

/// Whether a request for `path` over a connection that presented `leaf` (if any) may reach its
/// handler. Unknown paths go on to tonic, which answers UNIMPLEMENTED without reading a body.
pub fn admit(path: &str, leaf: Option<&[u8]>, cluster: &str) -> Result<(), Status> {
    let Some(who) = who_may_call(path) else { return Ok(()) };
    if who == Who::Anyone {
        return Ok(());
    }
    let Some(leaf) = leaf else {
        return Err(Status::unauthenticated("this call needs a client certificate issued by the cluster CA"));
    };
    let holder = CertInfo::from_der(leaf)
        .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))?
        .holder(cluster)
        .map_err(|e| Status::permission_denied(e.to_string()))?;
    let allowed = matches!(
        (who, &holder),
        (Who::Admin, Holder::Admin)
            | (Who::Node, Holder::Node { .. })
            | (Who::Manager, Holder::Node { role: Role::Manager, .. })
    );
    if allowed {
        return Ok(());
    }
    Err(Status::permission_denied(match who {
        Who::Admin => "admin calls need an admin certificate",
        Who::Manager => "this call is for this cluster's managers only",
        Who::Node | Who::Anyone => "this call is for this cluster's nodes only",
    }))
}

impl<S> tower::Service<http::Request<Body>> for Gate<S>
where
    S: tower::Service<http::Request<Body>, Response = http::Response<Body>> + Clone + Send + 'static,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let certs =
            request.extensions().get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|info| info.peer_certs());
        let leaf = certs.as_ref().and_then(|c| c.first()).map(|c| c.as_ref());
        match admit(request.uri().path(), leaf, &self.cluster) {
            Ok(()) => Box::pin(self.inner.call(request)),
            Err(status) => Box::pin(async move { Ok(status.into_http()) }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn anonymous_callers_reach_only_the_join_path() {
        for path in ["/mesh.v1.Identity/GetRootCa", "/mesh.v1.Identity/Join", "/mesh.v1.Managers/Leader"] {
            assert!(admit(path, None, "c").is_ok(), "{path}");
        }
        for path in [
            "/mesh.v1.Raft/AppendEntries",
            "/mesh.v1.Raft/InstallSnapshot",
            "/mesh.v1.Raft/",
            "/mesh.v1.Identity/Renew",
            "/mesh.v1.Identity/IssueWorkloadCert",
            "/mesh.v1.Admin/ListNodes",
            "/mesh.v1.Admin/Anything",
            "/mesh.v1.Dispatcher/Session",
            "/mesh.v1.Dispatcher/ReportEndpoints",
            "/mesh.v1.Dispatcher/Requests",
            "/mesh.v1.Dispatcher/AnswerLogs",
            "/mesh.v1.Managers/Unlock",
            "/mesh.v1.Managers/AddManager",
        ] {
            assert_eq!(admit(path, None, "c").unwrap_err().code(), tonic::Code::Unauthenticated, "{path}");
        }
    }

    #[test]
    fn paths_that_are_no_call_are_left_to_tonic() {
        // tonic answers them UNIMPLEMENTED before reading a body; near misses of the join path
        // are no call either, so they cannot smuggle a call past the gate.
        for path in ["/mesh.v1.Identity/Join/", "/mesh.v1.identity/Join", "/other.v1.Raft/Vote", "", "/"] {
            assert_eq!(who_may_call(path), None, "{path}");
        }
    }
}
