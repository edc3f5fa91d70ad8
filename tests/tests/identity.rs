//! Cluster identity end to end: a real control plane over gRPC and TLS on 127.0.0.1:0, and
//! nodes joining and renewing through meshd's code, attacked the ways an outsider, a worker or a
//! removed node would try.

use std::time::Duration;

use control::ca::Subject;
use mesh_api::client::{self, AdminClient};
use mesh_api::ids;
use mesh_api::model::NodeState;
use mesh_api::pki::{self, CertInfo};
use mesh_api::proto::pb;
use mesh_api::tokens::Role;
use mesh_tests::{TestCluster, mode, node_dir};
use meshd::identity::{self, IdentityError, NodeDir};
use rcgen::{CertificateParams, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use time::OffsetDateTime;
use tonic::Code;
use x509_parser::prelude::{FromDer, X509Certificate};

const HOUR: Duration = Duration::from_secs(3600);

fn refused_with(result: Result<impl std::fmt::Debug, IdentityError>, code: Code) -> String {
    match result {
        Err(IdentityError::Client(e)) if e.code() == Some(code) => e.to_string(),
        other => panic!("expected a refusal with {code:?}, got {other:?}"),
    }
}

async fn node_count(cluster: &TestCluster) -> usize {
    cluster.admin().await.list_nodes().await.unwrap().len()
}

/// A raw Join call with a CSR of our own making.
async fn raw_join(
    cluster: &TestCluster,
    token: &str,
    csr_pem: &str,
) -> Result<pb::JoinResponse, tonic::Status> {
    let roots = cluster.manager.roots();
    let channel = client::authenticated_channel(&cluster.control(), &roots, None).await.unwrap();
    pb::identity_client::IdentityClient::new(channel)
        .join(pb::JoinRequest {
            token: token.into(),
            csr_pem: csr_pem.into(),
            hostname: "h".into(),
            manager: false,
        })
        .await
        .map(|r| r.into_inner())
}

fn csr(subject_cn: &str, subject_ou: &str) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.distinguished_name.push(DnType::CommonName, subject_cn);
    params.distinguished_name.push(DnType::OrganizationalUnitName, subject_ou);
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

#[tokio::test]
async fn join_works_end_to_end_and_issues_the_documented_certificate() {
    let cluster = TestCluster::start(24 * HOUR).await;
    let (dir, id) = cluster.join(Role::Worker).await;
    let node = NodeDir::new(&node_dir(&dir)).load().unwrap();
    assert_eq!(node.id, id);
    assert_eq!(mode(&NodeDir::new(&node_dir(&dir)).key()), 0o600);

    // The certificate, parsed: subject fields, key usage, issuer, lifetime.
    let der = pki::pem_to_der(&node.identity.cert_pem).unwrap();
    let (_, cert) = X509Certificate::from_der(&der).unwrap();
    let cluster_id = cluster.manager.store().read(|s| s.cluster_id.clone());
    let info = CertInfo::from_der(&der).unwrap();
    assert_eq!(info.common_name, id.to_string());
    assert_eq!(info.common_name.len(), ids::ID_LEN);
    assert_eq!(info.unit, "mesh-worker");
    assert_eq!(info.organization, cluster_id.to_string());
    let ku = cert.key_usage().unwrap().expect("key usage present").value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let eku = cert.extended_key_usage().unwrap().expect("extended key usage").value;
    assert!(eku.client_auth);
    assert!(!cert.is_ca());
    let roots = cluster.manager.roots();
    let (_, ca_cert) = X509Certificate::from_der(&roots.newest().der).unwrap();
    cert.verify_signature(Some(ca_cert.public_key())).expect("signed by the cluster CA");
    let lifetime = info.not_after - OffsetDateTime::now_utc();
    assert!(lifetime > time::Duration::hours(23) && lifetime <= time::Duration::hours(24), "{lifetime}");

    let nodes = cluster.admin().await.list_nodes().await.unwrap();
    let listed = nodes.iter().find(|n| n.id == id).expect("node listed");
    assert_eq!(
        (listed.role, listed.state, listed.hostname.as_str()),
        (Role::Worker, NodeState::Active, "test-host")
    );
    assert_eq!(listed.cert_not_after.unwrap().unix_timestamp(), info.not_after.unix_timestamp());
}

#[tokio::test]
async fn a_wrong_secret_is_refused_and_nothing_is_written() {
    let cluster = TestCluster::start(HOUR).await;
    let token = cluster.token(Role::Worker);
    let last = token.chars().last().unwrap();
    let wrong = format!("{}{}", &token[..token.len() - 1], if last == '0' { '1' } else { '0' });
    let dir = tempfile::tempdir().unwrap();
    let before = node_count(&cluster).await;
    let message = refused_with(
        identity::join(&cluster.control(), &wrong, &node_dir(&dir), "h").await,
        Code::PermissionDenied,
    );
    assert!(message.contains("invalid join token"), "{message}");
    assert!(!node_dir(&dir).exists(), "nothing written");
    assert_eq!(node_count(&cluster).await, before);
}

#[tokio::test]
async fn a_ca_digest_mismatch_is_refused_before_any_csr_is_sent() {
    // The token pins the real cluster's CA; the address is an impostor's control plane.
    let real = TestCluster::start(HOUR).await;
    let impostor = TestCluster::start(HOUR).await;
    let token = real.token(Role::Worker);
    let dir = tempfile::tempdir().unwrap();
    let err = identity::join(&impostor.control(), &token, &node_dir(&dir), "h").await.unwrap_err();
    let IdentityError::CaMismatch { served, pinned, .. } = &err else { panic!("{err:?}") };
    assert_eq!(served, &impostor.manager.ca().unwrap().digest());
    assert_eq!(pinned, &real.manager.ca().unwrap().digest());
    let message = err.to_string();
    assert!(message.contains(served.as_str()) && message.contains(pinned.as_str()), "{message}");
    assert_eq!(impostor.manager.join_attempts(), 0, "no CSR reached the impostor");
    assert!(!node_dir(&dir).exists(), "nothing written");
}

#[tokio::test]
async fn the_role_comes_from_the_token_never_from_the_csr() {
    let cluster = TestCluster::start(HOUR).await;
    // A worker token with a CSR that asks to be a manager named by the attacker.
    let (_, asking) = csr("0000000000000000000000000", "mesh-manager");
    let issued = raw_join(&cluster, &cluster.token(Role::Worker), &asking).await.unwrap();
    let info = CertInfo::from_pem(&issued.cert_pem).unwrap();
    assert_eq!(info.unit, "mesh-worker");
    assert_ne!(info.common_name, "0000000000000000000000000");
    assert_eq!(info.common_name, issued.node_id);
    // The manager token does give a manager certificate.
    let (_, plain) = csr("", "");
    let issued = raw_join(&cluster, &cluster.token(Role::Manager), &plain).await.unwrap();
    assert_eq!(CertInfo::from_pem(&issued.cert_pem).unwrap().unit, "mesh-manager");
}

#[tokio::test]
async fn a_rotated_token_is_refused_at_once_and_joined_nodes_are_unaffected() {
    let cluster = TestCluster::start(HOUR).await;
    let (dir, id) = cluster.join(Role::Worker).await;
    let old = cluster.token(Role::Worker);
    let manager_token = cluster.token(Role::Manager);
    let new = cluster.admin().await.join_token(Role::Worker, true).await.unwrap();
    assert_ne!(old, new);
    assert_eq!(cluster.admin().await.join_token(Role::Worker, false).await.unwrap(), new);
    assert_eq!(cluster.token(Role::Manager), manager_token, "only the worker token changed");

    let other = tempfile::tempdir().unwrap();
    refused_with(
        identity::join(&cluster.control(), &old, &node_dir(&other), "h").await,
        Code::PermissionDenied,
    );
    assert!(identity::join(&cluster.control(), &new, &node_dir(&other), "h").await.is_ok());
    let renewed = identity::renew(&node_dir(&dir)).await.expect("the joined node still renews");
    assert_eq!(renewed.id, id);
}

#[tokio::test]
async fn renewal_keeps_the_node_id_with_a_new_key_and_a_later_expiry() {
    let cluster = TestCluster::start(HOUR).await;
    let (dir, id) = cluster.join(Role::Worker).await;
    let before = NodeDir::new(&node_dir(&dir)).load().unwrap();
    // Certificate times have one-second resolution.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = identity::renew(&node_dir(&dir)).await.unwrap();
    assert_eq!(after.id, id);
    assert_eq!(after.info.unit, "mesh-worker");
    assert_ne!(after.identity.key_pem, before.identity.key_pem);
    assert!(after.info.not_after > before.info.not_after);
    assert_eq!(mode(&NodeDir::new(&node_dir(&dir)).key()), 0o600);
    let listed = cluster.admin().await.inspect_node(id.as_str()).await.unwrap();
    assert_eq!(listed.cert_not_after.unwrap().unix_timestamp(), after.info.not_after.unix_timestamp());
    assert!(listed.last_seen.is_some());
}

#[tokio::test]
async fn a_removed_node_is_refused_on_renewal_and_its_connections_are_cut() {
    let cluster = TestCluster::start(HOUR).await;
    let (dir, id) = cluster.join(Role::Worker).await;
    let (other_dir, other) = cluster.join(Role::Worker).await;
    let node = NodeDir::new(&node_dir(&dir)).load().unwrap();

    // An open TLS connection authenticated as the node, idle.
    let config = mesh_api::tls::client_config(
        mesh_api::tls::ServerTrust::Ca(&cluster.manager.roots()),
        Some(&node.identity),
    )
    .unwrap();
    let tcp = tokio::net::TcpStream::connect(cluster.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(pki::CONTROL_SERVER_NAME).unwrap();
    let mut open = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Start HTTP/2 so the server treats it as a live connection.
    open.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0").await.unwrap();

    let removed = cluster.admin().await.remove_node(id.as_str(), false).await.unwrap();
    assert_eq!(removed.state, NodeState::Removed);

    // The connection is closed by the manager.
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match open.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the removed node's connection stayed open");

    let message = refused_with(identity::renew(&node_dir(&dir)).await, Code::PermissionDenied);
    assert!(message.contains("removed"), "{message}");
    // Removing again is a clear error; the other node is untouched.
    let again = cluster.admin().await.remove_node(id.as_str(), false).await.unwrap_err();
    assert_eq!(again.code(), Some(Code::FailedPrecondition));
    assert_eq!(identity::renew(&node_dir(&other_dir)).await.unwrap().id, other);
    let listed = cluster.admin().await.inspect_node(id.as_str()).await.unwrap();
    assert_eq!(listed.state, NodeState::Removed);
}

#[tokio::test]
async fn node_certificates_cannot_call_the_admin_api() {
    let cluster = TestCluster::start(HOUR).await;
    for role in [Role::Worker, Role::Manager] {
        let (dir, _) = cluster.join(role).await;
        let node = NodeDir::new(&node_dir(&dir)).load().unwrap();
        let channel = cluster.channel_as(Some(&node.identity)).await;
        let mut admin = AdminClient::from_channel(&cluster.control(), channel);
        let err = admin.list_nodes().await.unwrap_err();
        assert_eq!(err.code(), Some(Code::PermissionDenied), "{role}: {err}");
        assert!(err.to_string().contains("admin certificate"), "{err}");
        let err = admin.join_token(Role::Manager, false).await.unwrap_err();
        assert_eq!(err.code(), Some(Code::PermissionDenied));
    }
    // Without any client certificate: unauthenticated.
    let channel = cluster.channel_as(None).await;
    let err = AdminClient::from_channel(&cluster.control(), channel).list_nodes().await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let cluster = TestCluster::start(HOUR).await;
    let (dir, id) = cluster.join(Role::Worker).await;
    let before = cluster.admin().await.inspect_node(id.as_str()).await.unwrap();
    // The same node, with a certificate from the cluster CA that expired a minute ago.
    let cluster_id = cluster.manager.store().read(|s| s.cluster_id.clone());
    let mut subject = Subject::node(&cluster_id, &id, Role::Worker, HOUR);
    subject.not_before = OffsetDateTime::now_utc() - time::Duration::hours(2);
    subject.not_after = OffsetDateTime::now_utc() - time::Duration::minutes(1);
    let (cert_pem, key_pem) = cluster.manager.ca().unwrap().issue_with_new_key(&subject).await.unwrap();
    let paths = NodeDir::new(&node_dir(&dir));
    mesh_api::files::write_atomic(&paths.key(), key_pem.as_bytes(), 0o600).unwrap();
    mesh_api::files::write_atomic(&paths.cert(), cert_pem.as_bytes(), 0o644).unwrap();

    let err = identity::renew(&node_dir(&dir)).await.unwrap_err();
    assert!(matches!(err, IdentityError::Client(_)), "{err:?}");
    assert!(err.to_string().contains("CertificateExpired"), "{err}");
    let after = cluster.admin().await.inspect_node(id.as_str()).await.unwrap();
    assert_eq!(after.cert_not_after, before.cert_not_after, "nothing issued");
}

#[tokio::test]
async fn a_certificate_from_another_cluster_is_refused() {
    let cluster = TestCluster::start(HOUR).await;
    let other = TestCluster::start(HOUR).await;
    let (dir, _) = other.join(Role::Worker).await;
    let foreign = NodeDir::new(&node_dir(&dir)).load().unwrap();
    let channel =
        client::authenticated_channel(&cluster.control(), &cluster.manager.roots(), Some(&foreign.identity))
            .await;
    // The handshake (or the first call on it) fails: the certificate does not chain to this CA.
    let refused = match channel {
        Err(_) => true,
        Ok(channel) => pb::identity_client::IdentityClient::new(channel)
            .renew(pb::RenewRequest { csr_pem: csr("", "").1 })
            .await
            .is_err(),
    };
    assert!(refused);
    assert_eq!(cluster.manager.store().read(|s| s.nodes.len()), 1, "only the manager");
}

#[tokio::test]
async fn state_files_holding_secrets_are_0600() {
    let cluster = TestCluster::start(HOUR).await;
    let (dir, _) = cluster.join(Role::Worker).await;
    let m = cluster.manager_dir();
    for secret in [m.data_key(), m.manager_key(), m.state(), m.config(), m.admin().join("admin.key")] {
        assert_eq!(mode(&secret), 0o600, "{}", secret.display());
    }
    assert_eq!(mode(&m.root), 0o700);
    assert_eq!(mode(&NodeDir::new(&node_dir(&dir)).key()), 0o600);
    assert_eq!(mode(&node_dir(&dir)), 0o700);
    // The CA key and the join tokens are only in the sealed store: in no file in the clear.
    let token = cluster.token(Role::Worker);
    let key = cluster.manager.ca().unwrap().own("test").unwrap().key_pem();
    let key_body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    for entry in walk(&m.root) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        let text = String::from_utf8_lossy(&bytes).replace('\n', "");
        assert!(!text.contains(&token) && !text.contains(&key_body), "{}", entry.display());
        if mode(&entry) & 0o044 != 0 {
            assert!(!text.contains("PRIVATE KEY"), "{}", entry.display());
        }
    }
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() { out.extend(walk(&path)) } else { out.push(path) }
    }
    out
}

#[tokio::test]
async fn malformed_input_gets_clear_errors_and_the_server_keeps_serving() {
    let cluster = TestCluster::start(HOUR).await;
    let token = cluster.token(Role::Worker);

    let err = raw_join(
        &cluster,
        &token,
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("certificate signing request"), "{}", err.message());

    let err = raw_join(&cluster, &token[..token.len() - 5], &csr("", "").1).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("malformed join token"), "{}", err.message());

    let err = raw_join(&cluster, "\u{0}garbage\u{7f}", &csr("", "").1).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("MESHTKN-1-"), "{}", err.message());

    // The CLI path refuses a truncated token before contacting anyone.
    let dir = tempfile::tempdir().unwrap();
    let err = identity::join(&cluster.control(), &token[..30], &node_dir(&dir), "h").await.unwrap_err();
    assert!(matches!(err, IdentityError::Token(_)), "{err:?}");

    // A bad hostname.
    let err = {
        let roots = cluster.manager.roots();
        let channel = client::authenticated_channel(&cluster.control(), &roots, None).await.unwrap();
        pb::identity_client::IdentityClient::new(channel)
            .join(pb::JoinRequest {
                token: token.clone(),
                csr_pem: csr("", "").1,
                hostname: "a\nb".into(),
                manager: false,
            })
            .await
            .unwrap_err()
    };
    assert_eq!(err.code(), Code::InvalidArgument);

    // Garbage on the TCP port instead of TLS.
    {
        use tokio::io::AsyncWriteExt;
        let mut raw = tokio::net::TcpStream::connect(cluster.addr).await.unwrap();
        raw.write_all(b"GET / HTTP/1.0\r\n\r\n\x16\x03\x01\xff\xff garbage").await.unwrap();
    }

    assert_eq!(cluster.manager.store().read(|s| s.nodes.len()), 1, "nothing was added");
    let (_, id) = cluster.join(Role::Worker).await;
    assert!(cluster.admin().await.inspect_node(id.as_str()).await.is_ok(), "still serving");
}

#[tokio::test]
async fn a_restarted_manager_serves_the_same_cluster() {
    let cluster = TestCluster::start(HOUR).await;
    let (dir, id) = cluster.join(Role::Worker).await;
    let digest = cluster.manager.ca().unwrap().digest();
    let token = cluster.token(Role::Worker);
    let rotated = cluster.admin().await.join_token(Role::Manager, true).await.unwrap();

    let cluster = cluster.restart().await;
    assert_eq!(cluster.manager.ca().unwrap().digest(), digest);
    assert_eq!(cluster.admin().await.join_token(Role::Manager, false).await.unwrap(), rotated);
    let nodes = cluster.admin().await.list_nodes().await.unwrap();
    assert!(nodes.iter().any(|n| n.id == id && n.state == NodeState::Active));
    assert_eq!(identity::renew(&node_dir(&dir)).await.unwrap().id, id);
    let other = tempfile::tempdir().unwrap();
    identity::join(&cluster.control(), &token, &node_dir(&other), "h").await.expect("same worker token");
}

#[tokio::test]
async fn init_refuses_to_overwrite_and_too_short_lifetimes() {
    let cluster = TestCluster::start(HOUR).await;
    let err = control::statedir::init(
        &cluster.state_dir(),
        control::statedir::ManagerConfig::new(cluster.addr, None),
        HOUR,
        false,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    let fresh = tempfile::tempdir().unwrap();
    let err = control::statedir::init(
        fresh.path(),
        control::statedir::ManagerConfig::new(cluster.addr, None),
        Duration::from_secs(59 * 60),
        false,
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("minimum is 1h"), "{err}");
    assert!(!fresh.path().join("cluster.redb").exists());
}

#[tokio::test]
async fn joining_an_already_joined_state_dir_is_refused() {
    let cluster = TestCluster::start(HOUR).await;
    let (dir, id) = cluster.join(Role::Worker).await;
    let err = identity::join(&cluster.control(), &cluster.token(Role::Worker), &node_dir(&dir), "h")
        .await
        .unwrap_err();
    assert!(matches!(err, IdentityError::AlreadyJoined(..)), "{err:?}");
    assert_eq!(NodeDir::new(&node_dir(&dir)).load().unwrap().id, id, "identity untouched");
}

/// Serves TLS handshakes (and nothing more) on loopback as `identity`; its address.
async fn tls_server(roots: &mesh_api::trust::Trust, identity: mesh_api::tls::Identity) -> String {
    let config = mesh_api::tls::server_config(roots, &identity).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                if let Ok(mut tls) = acceptor.accept(tcp).await {
                    let _ = tokio::io::AsyncReadExt::read(&mut tls, &mut [0u8; 1]).await;
                }
            });
        }
    });
    addr
}

/// A TLS handshake with `addr` as control, trusting `trust`: `Err` with rustls's reason.
async fn handshake(addr: &str, trust: mesh_api::tls::ServerTrust<'_>) -> Result<(), String> {
    let config = mesh_api::tls::client_config(trust, None).unwrap();
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(pki::CONTROL_SERVER_NAME).unwrap();
    tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.map(drop).map_err(|e| e.to_string())
}

#[tokio::test]
async fn a_node_accepts_as_control_only_the_managers_it_was_told_of() {
    let cluster = TestCluster::start(HOUR).await;
    let (dir, _) = cluster.join(Role::Worker).await;
    let node = NodeDir::new(&node_dir(&dir)).load().unwrap();
    let manager_id = cluster.manager.manager_ids();
    assert_eq!(node.manager_ids, manager_id, "the join recorded the managers' node IDs");
    let ca = cluster.manager.roots();
    let ca_signer = cluster.manager.ca().unwrap();
    let cluster_id: ids::ClusterId = node.info.organization.parse().unwrap();
    // What a removed (or stolen-from, decommissioned) manager holds: a manager certificate of
    // this CA, still valid, for a node that is not a manager any more.
    let rogue_id = ids::NodeId::random();
    let (cert_pem, key_pem) = ca_signer
        .issue_with_new_key(&Subject::node(&cluster_id, &rogue_id, Role::Manager, HOUR))
        .await
        .unwrap();
    let rogue = tls_server(&ca, mesh_api::tls::Identity { cert_pem, key_pem }).await;
    let pinned = mesh_api::tls::ServerTrust::Managers { ca: &ca, ids: &node.manager_ids };
    let err = handshake(&rogue, pinned).await.unwrap_err();
    assert!(err.contains("not one of the managers"), "{err}");
    // The real manager passes the same check; a worker's certificate never does, whatever is
    // pinned (it is no manager certificate).
    handshake(&cluster.control(), mesh_api::tls::ServerTrust::Managers { ca: &ca, ids: &node.manager_ids })
        .await
        .unwrap();
    let worker = tls_server(&ca, node.identity.clone()).await;
    let ids = [node.id.to_string()];
    assert!(handshake(&worker, mesh_api::tls::ServerTrust::Managers { ca: &ca, ids: &ids }).await.is_err());
    // The pin is what refused the rogue: trusted by the CA alone (as a state directory from
    // before manager IDs were kept is), it passes.
    handshake(&rogue, mesh_api::tls::ServerTrust::Ca(&ca)).await.unwrap();
    // A session's slice keeps the node's list current: the node's leader is found through it.
    assert!(node.leader().await.is_ok());
}

/// What a compromised manager could write into the replicated state: a root of its own, with its
/// key and a "cross-signature" made by that same key. No honest manager signs with it or trusts
/// it, as no node would: a new root needs a cross-signature by a root already trusted.
#[tokio::test]
async fn a_root_written_into_the_state_without_a_cross_signature_is_taken_by_no_manager() {
    use control::ca::ClusterCa;
    use control::state::{CaRecord, Command, Secret};
    let cluster = TestCluster::start(HOUR).await;
    let before = cluster.manager.roots().digests();
    let cluster_id = cluster.manager.store().read(|s| s.cluster_id.clone());
    let rogue = ClusterCa::generate_named(&cluster_id, "rogue root").unwrap();
    let self_vouched = rogue.cross_sign(rogue.cert_der()).unwrap();
    let record =
        CaRecord { cert_pem: rogue.cert_pem().to_owned(), key_pem: Secret(rogue.key_pem()), external: None };
    let started_at = OffsetDateTime::now_utc().unix_timestamp();
    let write = Command::StartCaRotation { ca: record, cross_pem: self_vouched, started_at };
    cluster.manager.store().apply(write).await.unwrap();

    let refused = cluster.manager.ca().unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition);
    assert!(refused.message().contains("not vouched for"), "{}", refused.message());
    let mut admin = cluster.admin().await;
    let (_, csr) = mesh_api::join::key_and_csr().unwrap();
    let err = admin.issue_admin(csr, None, "rogue").await.unwrap_err().to_string();
    assert!(err.contains("not vouched for"), "{err}");
    // The manager keeps following the state, and keeps trusting what it trusted.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(cluster.manager.roots().digests(), before);
}
