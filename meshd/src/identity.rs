//! The node's identities, and the one place that renews them: the node certificate (joining the
//! cluster, renewal at a random point between 50 % and 80 % of its lifetime) and each local
//! endpoint's workload certificate (a key made here, renewed at half its lifetime).
//!
//! Every certificate identity puts in place is published on a `tokio::sync::watch` channel: the
//! mesh port follows the node certificate's, each workload proxy its endpoint's (ztunnel's
//! `SecretManager`). Nothing reads a renewed certificate back from disk to find out about it.
//!
//! ```text
//! DIR/ca.crt     the cluster's roots: its root CA, checked against the token's digest at join,
//!                and during a root rotation the new root its cross-signature let in
//! DIR/node.crt   this node's certificate (CN = node ID, OU = role, O = cluster ID)
//! DIR/node.key   its private key, never sent anywhere (0600)
//! DIR/control    the managers' control addresses, one per line (kept current from the session)
//! DIR/spec-signing.pub  the operator's spec-signing key, pinned at join (if given)
//! DIR/spec-seen.json    per service, the newest signed spec admitted (what bounds replays)
//! ```
//!
//! Workload certificates and their keys live in memory only.

mod node;
mod workload;

use std::path::PathBuf;

use mesh_api::client::ClientError;
use mesh_api::files::FileError;
use mesh_api::join::JoinError;
use mesh_api::pki;
use mesh_api::tokens::TokenError;
use time::OffsetDateTime;

pub use node::{NodeDir, NodeIdentity, RenewNow, RenewReply, join, keep_renewed, renew, renewal_delay};
pub use workload::{WorkloadCertificate, WorkloadCertificates, WorkloadIdentity, workload_certificate};

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("the pinned spec-signing key cannot be read: {0}")]
    SpecKey(String),
    #[error("the cluster's roots: {0}")]
    Trust(String),
    #[error("{0} already holds a joined node ({1} exists); refusing to join again")]
    AlreadyJoined(PathBuf, PathBuf),
    #[error("{0} holds no node identity; run `meshd join` first")]
    NotJoined(PathBuf),
    #[error("malformed join token: {0}")]
    Token(TokenError),
    #[error(
        "the CA served by {control} has digest {served}, but the join token pins {pinned}; \
         refusing to join (nothing was sent or written)"
    )]
    CaMismatch { control: String, served: String, pinned: String },
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    File(#[from] FileError),
    #[error("key generation or CSR failed: {0}")]
    Key(#[from] rcgen::Error),
    #[error("control returned a certificate that {0}")]
    BadCertificate(String),
    #[error(transparent)]
    Pki(#[from] pki::PkiError),
    #[error("no control address given")]
    NoManager,
    #[error("the node certificate expired at {0} before it could be renewed; the node must join again")]
    Expired(OffsetDateTime),
    #[error("control refused this node: {0}")]
    Refused(ClientError),
}

impl From<JoinError> for IdentityError {
    fn from(e: JoinError) -> IdentityError {
        match e {
            JoinError::Token(e) => IdentityError::Token(e),
            JoinError::CaMismatch { control, served, pinned } => {
                IdentityError::CaMismatch { control, served, pinned }
            }
            JoinError::BadCertificate(what) => IdentityError::BadCertificate(what),
            JoinError::Client(e) => IdentityError::Client(e),
            JoinError::Pki(e) => IdentityError::Pki(e),
            JoinError::Trust(e) => IdentityError::Trust(e.to_string()),
            JoinError::Tls(e) => IdentityError::Client(ClientError::Tls(e)),
            JoinError::Key(e) => IdentityError::Key(e),
            JoinError::NoManager => IdentityError::NoManager,
        }
    }
}

/// A root CA of its own, for tests that need some roots to hold.
#[cfg(test)]
pub(crate) fn test_roots() -> mesh_api::trust::Trust {
    let key = rcgen::KeyPair::generate().expect("a key");
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    let pem = params.self_signed(&key).expect("self-signed").pem();
    mesh_api::trust::Trust::from_pem(&pem).expect("a root")
}
