//! Root CA rotation, as root in a lab of two managers and two meshd hosts: `meshctl cluster ca
//! --rotate` while a workload reads another through the mesh; every node renews from the new root,
//! nothing is lost, the old root is then trusted nowhere, the join tokens pin the new root, and
//! what the old root's key can still sign (a stolen manager disk) is refused everywhere.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use control::ca::{ClusterCa, Subject};
use mesh_api::ids::{ClusterId, NodeId};
use mesh_api::pki::CertInfo;
use mesh_api::tls::Identity;
use mesh_api::trust::Trust;
use mesh_tests::lab::{Lab, in_namespace};
use meshd::identity::WorkloadIdentity;
use meshd::mesh::outbound::{self, OpenError};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn ca_status(lab: &Lab) -> serde_json::Value {
    serde_json::from_str(&lab.meshctl(&["cluster", "ca", "--format", "json"])).expect("cluster ca as JSON")
}

fn roots_in(path: &std::path::Path) -> Vec<String> {
    let pem = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    Trust::from_pem(&pem).unwrap().roots().iter().map(|r| r.digest.clone()).collect()
}

#[test]
fn a_root_rotation_renews_every_node_under_traffic_and_the_old_root_is_trusted_nowhere() {
    let lab = Lab::start_with(4, 2, &[]);
    let (web_host, api_host) = (3, 4);
    let web = lab.web_and_api("10.49.0.0/24", web_host, api_host);
    let read = |lab: &Lab| lab.web_reads_api(&web);
    lab.wait("web to read api through the mesh", || read(&lab));

    let before = ca_status(&lab);
    let old_root = before["roots"][0]["digest"].as_str().unwrap().to_owned();
    assert_eq!(before["rotating"], false);
    let old_token = lab.meshctl(&["join-token", "worker", "-q"]).trim().to_owned();
    assert!(old_token.contains(&old_root), "the token pins the root: {old_token}");
    let old_root_pem = std::fs::read_to_string(lab.manager_dir(1).join("ca.crt")).unwrap();
    let old_ca = ClusterCa::load(&old_root_pem, &lab.ca_key).unwrap();

    // What the old root's key signs, presented at the api host's mesh port as web would: accepted
    // before the rotation (the baseline), refused after it.
    let cluster: ClusterId = lab.cluster_id().parse().unwrap();
    let (web_node, api_node): (NodeId, NodeId) =
        (lab.node_id(web_host).parse().unwrap(), lab.node_id(api_host).parse().unwrap());
    let api_address = {
        let out = lab.exec(&web, &["getent", "hosts", "tasks.api"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).split_whitespace().next().expect("api's address").to_owned()
    };
    let mesh: SocketAddr = format!("{}:4800", lab.addr(api_host)).parse().unwrap();
    let target: SocketAddrV4 = format!("{api_address}:80").parse().unwrap();
    let forged = || {
        let subject = Subject::workload(&cluster, "web", 1, &web_node, Duration::from_secs(3600));
        let (cert_pem, key_pem) = old_ca.issue_with_new_key(&subject).unwrap();
        WorkloadIdentity { identity: Identity { cert_pem, key_pem }, not_after: subject.not_after }
    };
    let get = |identity: WorkloadIdentity, roots: Trust| -> Result<String, OpenError> {
        in_namespace(&lab.host(web_host), || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                let trust = outbound::Trust { roots: Arc::new(roots), cluster: cluster.as_str() };
                let mut tunnel = outbound::connect(trust, &identity, &api_node, mesh, target).await?;
                tunnel.write_all(b"GET / HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n").await.unwrap();
                let mut answer = String::new();
                tunnel.read_to_string(&mut answer).await.unwrap();
                Ok(answer)
            })
        })
    };
    let old_trust = Trust::from_pem(&old_root_pem).unwrap();
    let answer = get(forged(), old_trust.clone()).expect("the old root's certificate before the rotation");
    assert!(answer.starts_with("HTTP/1.0 200") && answer.ends_with("served"), "{answer}");

    // Traffic all along: web reads api as fast as it can until the rotation is done. And a
    // connection opened before with what the old root's key signs, held open through it.
    let done = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (opened_tx, opened) = std::sync::mpsc::channel::<()>();
    let (go, go_rx) = std::sync::mpsc::channel::<()>();
    let (traffic, held) = std::thread::scope(|scope| {
        let holder = scope.spawn(|| {
            in_namespace(&lab.host(web_host), || {
                tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                    let trust =
                        outbound::Trust { roots: Arc::new(old_trust.clone()), cluster: cluster.as_str() };
                    let mut tunnel =
                        outbound::connect(trust, &forged(), &api_node, mesh, target).await.unwrap();
                    opened_tx.send(()).unwrap();
                    tokio::task::spawn_blocking(move || go_rx.recv()).await.unwrap().unwrap();
                    let request = b"GET / HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n";
                    let mut answer = String::new();
                    match tunnel.write_all(request).await {
                        Ok(()) => tunnel.read_to_string(&mut answer).await.map(|_| answer),
                        Err(e) => Err(e),
                    }
                })
            })
        });
        opened.recv().expect("the held connection opened");
        let reader = scope.spawn(|| {
            while !done.load(Ordering::Relaxed) {
                let counter = if read(&lab) { &served } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        let rotated = lab.meshctl_output(&["cluster", "ca", "--rotate"]);
        done.store(true, Ordering::Relaxed);
        reader.join().unwrap();
        // The api host cuts connections whose certificate's root it dropped, as it drops it.
        std::thread::sleep(Duration::from_millis(500));
        go.send(()).unwrap();
        (rotated, holder.join().unwrap())
    });
    assert!(
        !held.as_ref().is_ok_and(|a| a.contains("served")),
        "a connection opened with the old root's certificate outlived the rotation: {held:?}"
    );
    let stderr = String::from_utf8_lossy(&traffic.stderr);
    assert!(traffic.status.success(), "meshctl cluster ca --rotate: {stderr}");
    assert!(stderr.contains("renewed from the new root:"), "progress is shown: {stderr}");
    assert!(stderr.contains("root CA rotation done"), "{stderr}");
    let (served, failed) = (served.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("during the rotation: {served} requests served, {failed} failed; meshctl said:\n{stderr}");
    assert!(served >= 3, "web read api {served} times during the rotation");
    assert_eq!(failed, 0, "requests lost during the rotation ({served} served)");
    assert!(read(&lab), "web still reads api");

    // One root everywhere now: the new one.
    let after = ca_status(&lab);
    assert_eq!(after["rotating"], false);
    let roots = after["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "{after}");
    let new_root = roots[0]["digest"].as_str().unwrap().to_owned();
    assert_ne!(new_root, old_root);
    let new_trust =
        Trust::from_pem(&std::fs::read_to_string(lab.admin_dir().join("ca.crt")).unwrap()).unwrap();
    assert_eq!(new_trust.newest().digest, new_root, "the admin bundle trusts the new root alone");
    assert_eq!(new_trust.roots().len(), 1);
    for m in [1, 2] {
        lab.wait(&format!("manager {m} to trust the new root alone"), || {
            roots_in(&lab.manager_dir(m).join("ca.crt")) == [new_root.clone()]
        });
    }
    for h in [web_host, api_host] {
        lab.wait(&format!("host {h} to trust the new root alone"), || {
            roots_in(&lab.node_dir(h).join("ca.crt")) == [new_root.clone()]
        });
        assert_eq!(lab.status(h)["roots"], serde_json::json!([new_root]), "meshd status shows the roots");
        let cert = std::fs::read_to_string(lab.node_dir(h).join("node.crt")).unwrap();
        assert!(new_trust.signed_by_newest(&cert), "host {h}'s node certificate is the new root's");
        assert!(CertInfo::from_pem(&cert).is_ok());
    }

    // The join tokens pin the new root; one pinning the old root is refused, saying why.
    let new_token = lab.meshctl(&["join-token", "worker", "-q"]).trim().to_owned();
    assert!(
        new_token.contains(&new_root) && new_token != old_token,
        "{new_token} (was {old_token}; roots {old_root} -> {new_root})"
    );
    let managers = vec![format!("{}:7400", lab.addr(1))];
    let join = |token: &str| {
        in_namespace(&lab.host(web_host), || {
            tokio::runtime::Runtime::new().unwrap().block_on(mesh_api::join::join(
                &managers,
                token,
                "late-joiner",
                false,
            ))
        })
    };
    let refused = join(&old_token).err().expect("a token pinning the old root is refused").to_string();
    assert!(refused.contains(&old_root) && refused.contains("join token"), "{refused}");
    // Its secret is no good either: the tokens' secrets were made again.
    let repinned = old_token.replace(&old_root, &new_root);
    let refused = join(&repinned).err().expect("the old secret is refused").to_string();
    assert!(refused.contains("secret matches no current token"), "{refused}");
    let joined = join(&new_token).expect("the new token joins");
    assert_eq!(joined.trust.roots().len(), 1);
    assert_eq!(joined.trust.newest().digest, new_root);

    // The old root's key is worth nothing now: its certificate is refused at the mesh port, even
    // by a client that still trusts the old root (the server decides).
    let refused = get(forged(), old_trust).expect_err("the old root's certificate after the rotation");
    assert!(matches!(refused, OpenError::Unreachable(_)), "{refused:?}");
    // And a node certificate it signs gets no renewal from control.
    let (key, csr) = mesh_api::join::key_and_csr().unwrap();
    drop(key);
    let subject =
        Subject::node(&cluster, &web_node, mesh_api::tokens::Role::Worker, Duration::from_secs(3600));
    let (cert_pem, key_pem) = old_ca.issue_with_new_key(&subject).unwrap();
    let stolen = Identity { cert_pem, key_pem };
    let renewal = in_namespace(&lab.host(web_host), || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let config =
                mesh_api::tls::client_config(mesh_api::tls::ServerTrust::Ca(&new_trust), Some(&stolen))?;
            let channel = mesh_api::client::channel(&managers[0], config).await?;
            mesh_api::proto::pb::identity_client::IdentityClient::new(channel)
                .renew(mesh_api::proto::pb::RenewRequest { csr_pem: csr })
                .await
                .map_err(|s| mesh_api::client::ClientError::refused(&managers[0], s))
        })
    });
    assert!(renewal.is_err(), "control renewed a certificate of the old root");
}

/// A rotation to a root the operator gives, detached, while one node is down: the rotation does
/// not wait for it once it is down, and when it comes back it says what to do.
#[test]
fn a_node_down_through_a_rotation_is_told_to_join_again_and_a_given_root_is_used() {
    let mut lab = Lab::start(3);
    let cluster: ClusterId = lab.cluster_id().parse().unwrap();
    let given = ClusterCa::generate_named(&cluster, "operator's root").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("root.crt"), dir.path().join("root.key"));
    std::fs::write(&cert, given.cert_pem()).unwrap();
    std::fs::write(&key, given.key_pem()).unwrap();
    let (cert, key) = (cert.to_str().unwrap(), key.to_str().unwrap());

    // A root of another cluster, or a key that is not the certificate's, is refused up front.
    let other = ClusterCa::generate(&ClusterId::random()).unwrap();
    let other_cert = dir.path().join("other.crt");
    std::fs::write(&other_cert, other.cert_pem()).unwrap();
    let out = lab.meshctl_output(&[
        "cluster",
        "ca",
        "--rotate",
        "--ca-cert",
        other_cert.to_str().unwrap(),
        "--ca-key",
        key,
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("not this cluster's ID"), "{err}");
    // Nor is a root made again for the current root's key (the key is what a rotation replaces).
    let old_key = rcgen::KeyPair::from_pem(&lab.ca_key).unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params.distinguished_name.push(rcgen::DnType::CommonName, "same key");
    params.distinguished_name.push(rcgen::DnType::OrganizationName, cluster.as_str());
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(800);
    let same_key = dir.path().join("same-key.crt");
    let old_key_file = dir.path().join("old.key");
    std::fs::write(&same_key, params.self_signed(&old_key).unwrap().pem()).unwrap();
    std::fs::write(&old_key_file, &lab.ca_key).unwrap();
    let out = lab.meshctl_output(&[
        "cluster",
        "ca",
        "--rotate",
        "--ca-cert",
        same_key.to_str().unwrap(),
        "--ca-key",
        old_key_file.to_str().unwrap(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("current root's key"), "{err}");
    assert_eq!(ca_status(&lab)["rotating"], false, "nothing started");

    lab.stop_meshd(3);
    let out =
        lab.meshctl_output(&["cluster", "ca", "--rotate", "--detach", "--ca-cert", cert, "--ca-key", key]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("rotation started"), "progress is shown");
    // A second rotation while one is under way is refused.
    let again = lab.meshctl_output(&["cluster", "ca", "--rotate", "--detach"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("under way already"));
    let down = lab.node_id(3);
    lab.wait("host 3 to be named late while it is not down yet", || {
        ca_status(&lab)["late"].as_array().is_some_and(|l| l.iter().any(|n| n["id"] == down.as_str()))
    });
    if !meshctl::lab::wait(Duration::from_secs(60), || ca_status(&lab)["rotating"] == false) {
        panic!("the rotation never ended: {}\n{}", ca_status(&lab), lab.logs());
    }
    let status = ca_status(&lab);
    assert_eq!(status["roots"].as_array().unwrap().len(), 1);
    assert_eq!(status["roots"][0]["digest"], given.digest().as_str(), "the root given is the one in force");
    assert!(roots_in(&lab.node_dir(2).join("ca.crt")) == [given.digest()]);
    assert!(
        roots_in(&lab.node_dir(3).join("ca.crt")) != [given.digest()],
        "the node that was down learnt nothing"
    );

    lab.start_meshd(3);
    let told = meshctl::lab::wait(Duration::from_secs(60), || {
        lab.meshd_status(3).is_ok_and(|s| {
            s["last_error"].as_str().is_some_and(|e| e.contains("was rotated while this node was away"))
        })
    });
    if !told {
        panic!("host 3 never said what to do: {}\n{}", lab.status(3), lab.logs());
    }
    let said = lab.status(3)["last_error"].as_str().unwrap().to_owned();
    assert!(said.contains(&format!("meshctl node rm {down}")) && said.contains("join-token"), "{said}");
}
