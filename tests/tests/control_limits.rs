//! The control port as an attacker without credentials (or with a worker's) sees it: floods of
//! connections that never handshake, TLS connections without a certificate, streams claiming huge
//! messages, idle connections. The manager's file descriptors and memory stay bounded, and joins,
//! renewals, sessions and admin calls keep working during the flood. Loopback only, bounded in
//! count and time.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_api::tls::{self, Identity, ServerTrust};
use mesh_api::tokens::Role;
use mesh_tests::{TestCluster, node_dir};
use meshd::identity::{self, NodeDir};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

const HOUR: Duration = Duration::from_secs(3600);

type Chunk = Result<Frame<Bytes>, std::convert::Infallible>;
type Body = StreamBody<tokio_stream::wrappers::ReceiverStream<Chunk>>;
type Sender = hyper::client::conn::http2::SendRequest<Body>;

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0)
}

/// The process's virtual memory, KiB: what a reservation of a claimed message size shows in
/// before a byte of it is written.
fn vm_size_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmSize:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// A TLS connection to control, presenting `identity` if given, speaking HTTP/2.
async fn h2(cluster: &TestCluster, identity: Option<&Identity>) -> Sender {
    let config = tls::client_config(ServerTrust::Ca(&cluster.manager.roots()), identity).unwrap();
    let tcp = TcpStream::connect(cluster.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(mesh_api::pki::CONTROL_SERVER_NAME).unwrap();
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.unwrap();
    let (send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    send
}

/// Starts a gRPC call to `path` whose message claims `claimed` bytes, sends only the 5-byte
/// prefix and keeps the stream open; returns the `grpc-status` control answered with.
async fn claim_huge(
    send: &mut Sender,
    path: &str,
    claimed: u32,
    held: &mut Vec<tokio::sync::mpsc::Sender<Chunk>>,
) -> String {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let mut prefix = vec![0u8];
    prefix.extend_from_slice(&claimed.to_be_bytes());
    tx.send(Ok(Frame::data(Bytes::from(prefix)))).await.unwrap();
    held.push(tx);
    let request = http::Request::post(format!("http://mesh-control{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .unwrap();
    send.ready().await.unwrap();
    let response = tokio::time::timeout(Duration::from_secs(5), send.send_request(request))
        .await
        .expect("control answers at once, without waiting for the claimed message")
        .unwrap();
    let status = response.headers().get("grpc-status").map(|v| v.to_str().unwrap().to_owned());
    match status {
        Some(s) => s,
        None => {
            let trailers = response.into_body().collect().await.unwrap().trailers().cloned();
            trailers
                .and_then(|t| t.get("grpc-status").map(|v| v.to_str().unwrap().to_owned()))
                .unwrap_or_default()
        }
    }
}

#[tokio::test]
async fn floods_of_connections_that_prove_nothing_stay_bounded_and_the_cluster_keeps_working() {
    rlimit::increase_nofile_limit(u64::MAX).unwrap();
    let cluster = TestCluster::start(HOUR).await;
    let (worker_dir, worker) = cluster.join(Role::Worker).await;
    let worker_identity = NodeDir::new(&node_dir(&worker_dir)).load().unwrap().identity;
    let fds_before = open_fds();
    let vm_before = vm_size_kib();

    // 1. From another address (127.0.0.2: loopback too), connections that never start a TLS
    // handshake, far more than one address may have in progress (64).
    let mut silent = Vec::new();
    for _ in 0..1500 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(tcp) = socket.connect(cluster.addr).await {
            silent.push(tcp);
        }
    }
    assert!(silent.len() >= 1400, "only {} connections were made", silent.len());
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Ours are `silent.len()` of the descriptors; the manager's share is what is left.
    let managers_fds = open_fds().saturating_sub(fds_before + silent.len());
    assert!(
        managers_fds <= 64 + 16,
        "the manager holds {managers_fds} descriptors for one address's silent connections"
    );

    // 2. During it: a join, a renewal, an admin call, a session.
    let started = Instant::now();
    let (_other_dir, other) = cluster.join(Role::Worker).await;
    assert_ne!(other, worker);
    identity::renew(&node_dir(&worker_dir)).await.expect("renewal during the flood");
    let nodes = cluster.admin().await.list_nodes().await.expect("an admin call during the flood");
    assert!(nodes.iter().any(|n| n.id == other));
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());

    // 3. TLS without a certificate, and with a worker's: streams claiming 60 MiB messages on
    // raft and admin calls. Each is refused at once, before any room is made for the message.
    let mut held = Vec::new();
    let mut anonymous = Vec::new();
    for _ in 0..12 {
        let mut send = h2(&cluster, None).await;
        for path in ["/mesh.v1.Raft/InstallSnapshot", "/mesh.v1.Admin/ApplyPolicy", "/mesh.v1.Identity/Renew"]
        {
            let status = claim_huge(&mut send, path, 60 << 20, &mut held).await;
            assert_eq!(status, "16", "{path} without a certificate: UNAUTHENTICATED");
        }
        anonymous.push(send);
    }
    let mut workers = Vec::new();
    for _ in 0..8 {
        let mut send = h2(&cluster, Some(&worker_identity)).await;
        for path in
            ["/mesh.v1.Raft/AppendEntries", "/mesh.v1.Admin/ApplyPolicy", "/mesh.v1.Managers/AddManager"]
        {
            let status = claim_huge(&mut send, path, 60 << 20, &mut held).await;
            assert_eq!(status, "7", "{path} with a worker's certificate: PERMISSION_DENIED");
        }
        // What a worker may call is limited to small messages.
        let status = claim_huge(&mut send, "/mesh.v1.Identity/Renew", 60 << 20, &mut held).await;
        assert_eq!(status, "11", "a 60 MiB renewal: OUT_OF_RANGE, before room is made for it");
        workers.push(send);
    }
    let grown_mib = vm_size_kib().saturating_sub(vm_before) / 1024;
    // 60 claims of 60 MiB would be 3.5 GiB; what is left is the connections' own buffers.
    assert!(grown_mib < 512, "virtual memory grew by {grown_mib} MiB");

    // 4. Without a certificate, one address holds at most 16 connections; the rest are closed
    // right after their handshake.
    let config = tls::client_config(ServerTrust::Ca(&cluster.manager.roots()), None).unwrap();
    let mut closed = 0;
    let mut open = Vec::new();
    for _ in 0..40 {
        let tcp = TcpStream::connect(cluster.addr).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from(mesh_api::pki::CONTROL_SERVER_NAME).unwrap();
        let Ok(mut tls) = tokio_rustls::TlsConnector::from(config.clone()).connect(name, tcp).await else {
            closed += 1;
            continue;
        };
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_millis(300), tls.read(&mut byte)).await {
            Ok(Ok(0)) | Ok(Err(_)) => closed += 1,
            _ => open.push(tls),
        }
    }
    // 12 anonymous connections of step 3 are still open, so at most 4 more fit.
    assert!(closed >= 36, "{closed} of 40 extra connections without a certificate were closed");

    // 5. Silent connections are closed once their handshake time (10 s) is up.
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut ended = 0;
    for tcp in &mut silent {
        let mut byte = [0u8; 1];
        let left = deadline.saturating_duration_since(Instant::now());
        if let Ok(Ok(0) | Err(_)) = tokio::time::timeout(left, tcp.read(&mut byte)).await {
            ended += 1;
        }
    }
    assert_eq!(ended, silent.len(), "every silent connection is closed within 20 s");
    drop((held, anonymous, workers, open, silent));
}

#[tokio::test]
async fn a_node_renewing_in_a_loop_is_refused_after_a_few_and_others_are_not() {
    let cluster = TestCluster::start(HOUR).await;
    let (dir, id) = cluster.join(Role::Worker).await;
    let (other_dir, _) = cluster.join(Role::Worker).await;
    for _ in 0..control::config::RENEWALS_PER_WINDOW {
        assert_eq!(identity::renew(&node_dir(&dir)).await.expect("a renewal").id, id);
    }
    let err = match identity::renew(&node_dir(&dir)).await {
        Err(identity::IdentityError::Client(e)) => e,
        other => panic!("a renewal too many was not refused: {:?}", other.map(|n| n.id)),
    };
    assert_eq!(err.code(), Some(tonic::Code::ResourceExhausted), "{err}");
    assert!(err.to_string().contains("renew again in"), "{err}");
    identity::renew(&node_dir(&other_dir)).await.expect("another node renews");
}

#[tokio::test]
async fn a_new_session_of_a_node_ends_the_one_it_had() {
    let cluster = TestCluster::start(HOUR).await;
    let (dir, _) = cluster.join(Role::Worker).await;
    let node = NodeDir::new(&node_dir(&dir)).load().unwrap();
    let session = || async {
        let channel = cluster.channel_as(Some(&node.identity)).await;
        mesh_api::proto::pb::dispatcher_client::DispatcherClient::new(channel)
            .session(mesh_api::proto::pb::SessionRequest::default())
            .await
            .expect("a session")
            .into_inner()
    };
    let mut first = session().await;
    first.message().await.expect("the first slice").expect("a slice");
    let mut second = session().await;
    second.message().await.expect("the second session's slice").expect("a slice");
    let ended =
        tokio::time::timeout(Duration::from_secs(5), first.message()).await.expect("the first session ends");
    let status = ended.expect_err("the first session ends with a status");
    assert_eq!(status.code(), tonic::Code::Aborted, "{status}");
    assert!(status.message().contains("newer session"), "{status}");
    assert_eq!(cluster.manager.connected().len(), 1);
}

#[tokio::test]
async fn admin_credentials_are_issued_from_a_csr_listed_and_revoked() {
    let cluster = TestCluster::start(HOUR).await;
    let mut first = cluster.admin().await;
    let (key, csr) = mesh_api::join::key_and_csr().unwrap();
    let issued = first.issue_admin(csr, Some(Duration::from_secs(3600)), "ops laptop").await.unwrap();
    let credential = issued.credential.clone().unwrap();
    let info = mesh_api::pki::CertInfo::from_pem(&issued.cert_pem).unwrap();
    assert_eq!(info.serial, credential.serial);
    let lifetime = info.not_after - info.not_before;
    assert!(lifetime <= time::Duration::hours(1) + time::Duration::minutes(2), "{lifetime}");
    let second_bundle = mesh_api::bundle::AdminBundle {
        managers: vec![cluster.control()],
        manager_ids: issued.manager_ids.clone(),
        ca_pem: issued.ca_pem.clone(),
        identity: Identity { cert_pem: issued.cert_pem.clone(), key_pem: key.serialize_pem() },
    };
    assert_eq!(issued.manager_ids, cluster.manager.manager_ids(), "the new bundle pins the managers");
    let mut second = mesh_api::client::AdminClient::connect(&second_bundle).await.unwrap();
    let admins = second.list_admins().await.unwrap();
    assert_eq!(admins.len(), 2, "{admins:?}");
    assert!(admins.iter().any(|a| a.label == "ops laptop"));

    // Out-of-range lifetimes and a CSR that is not one are refused.
    let (_, csr) = mesh_api::join::key_and_csr().unwrap();
    let err = second.issue_admin(csr, Some(Duration::from_secs(5)), "").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");
    let err = second.issue_admin("not a csr".into(), None, "").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::InvalidArgument), "{err}");

    // The first credential, revoked, is refused from then on; the last one cannot be revoked.
    let init_serial = admins.iter().find(|a| a.serial != credential.serial).unwrap().serial.clone();
    second.revoke_admin(&init_serial).await.unwrap();
    let err = first.list_nodes().await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");
    assert!(err.to_string().contains("no longer"), "{err}");
    let err = second.revoke_admin(&credential.serial).await.unwrap_err();
    assert!(err.to_string().contains("last admin credential"), "{err}");
    let err = second.revoke_admin("00ff").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::NotFound), "{err}");

    // A node certificate cannot issue itself an admin credential.
    let (dir, _) = cluster.join(Role::Worker).await;
    let node = NodeDir::new(&node_dir(&dir)).load().unwrap();
    let channel = cluster.channel_as(Some(&node.identity)).await;
    let mut as_worker = mesh_api::client::AdminClient::from_channel(&cluster.control(), channel);
    let (_, csr) = mesh_api::join::key_and_csr().unwrap();
    let err = as_worker.issue_admin(csr, None, "").await.unwrap_err();
    assert_eq!(err.code(), Some(tonic::Code::PermissionDenied), "{err}");

    // meshctl writes a new bundle whose key is made on the admin's side, 0600.
    let out_dir = tempfile::tempdir().unwrap();
    let bundle_dir = out_dir.path().join("bundle");
    let admin_dir = out_dir.path().join("second");
    second_bundle.write(&admin_dir).unwrap();
    // (A child process, awaited: this runtime serves the manager meanwhile.)
    let out = tokio::process::Command::new(mesh_tests::lab::bin_dir().join("meshctl"))
        .args(["cluster", "admin", "issue", "--label", "ci", "--dir"])
        .arg(&bundle_dir)
        .env("MESHCTL_ADMIN", &admin_dir)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(mesh_tests::mode(&bundle_dir.join("admin.key")), 0o600);
    let third = mesh_api::bundle::AdminBundle::load(&bundle_dir).unwrap();
    mesh_api::client::AdminClient::connect(&third)
        .await
        .unwrap()
        .list_nodes()
        .await
        .expect("the new bundle works");
}
