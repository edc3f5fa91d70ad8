//! Secrets end to end at the control plane: a real manager and nodes holding real sessions
//! (meshd's code) over gRPC and TLS on 127.0.0.1. A secret reaches only the slices of the node
//! running a workload that reads it, for that endpoint alone; admins never see its bytes; the
//! manager's files never hold it in the clear. (`sandbox.rs` follows it into the workload.)

use std::time::Duration;

use mesh_api::proto::pb;
use mesh_api::slice::NodeSlice;
use mesh_tests::{SimNode, TestCluster, loopback_underlay, pinned_service};

const HOUR: Duration = Duration::from_secs(3600);
const BYTES: &[u8] = b"hunter2-\x00\xffs3cr3t-bytes-7f3a91";

fn service(name: &str, node: &str, secrets: &[&str]) -> pb::CreateServiceRequest {
    let run = pb::RunSpec { secrets: secrets.iter().map(|s| s.to_string()).collect(), ..Default::default() };
    pinned_service(name, node, Some(run))
}

/// Whether any slice carried the secret's bytes, for any endpoint.
fn carried(slices: &[NodeSlice]) -> bool {
    slices.iter().flat_map(|s| &s.endpoints).flat_map(|e| &e.secrets).any(|f| f.data == BYTES)
}

#[tokio::test]
async fn a_secret_reaches_only_the_node_that_runs_a_reader_and_no_admin_sees_it() {
    let cluster = TestCluster::start(HOUR).await;
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(SimNode::start(&cluster, loopback_underlay(20 + i)).await);
    }
    let mut admin = cluster.admin().await;
    admin.create_network("front", "10.52.0.0/24", true).await.unwrap();
    let created = admin.create_secret("db-password", BYTES.to_vec()).await.unwrap();
    assert_eq!(created.size, BYTES.len() as u64);
    // Moves an admin (or a compromised admin tool) might try.
    let again = admin.create_secret("db-password", b"other".to_vec()).await.unwrap_err();
    assert!(again.to_string().contains("already exists"), "{again}");
    for bad in ["../etc", "a/b", ".hidden", ""] {
        assert!(admin.create_secret(bad, b"x".to_vec()).await.is_err(), "{bad:?} accepted");
    }
    assert!(admin.create_secret("big", vec![0; 65 << 10]).await.is_err(), "a 65 KiB secret accepted");
    let unknown = admin.create_service(service("ghost", nodes[0].id.as_str(), &["nope"])).await.unwrap_err();
    assert!(unknown.to_string().contains("no secret named `nope`"), "{unknown}");

    // api on node 0 reads it; web on node 1 shares the network and does not; node 2 runs nothing.
    admin.create_service(service("api", nodes[0].id.as_str(), &["db-password"])).await.unwrap();
    admin.create_service(service("web", nodes[1].id.as_str(), &[])).await.unwrap();
    let api = nodes[0]
        .wait_for("api's endpoint with its secret", |s| s.endpoints.iter().any(|e| !e.secrets.is_empty()))
        .await;
    let endpoint = api.endpoints.iter().find(|e| e.service == "api").unwrap();
    assert_eq!(endpoint.secrets.len(), 1);
    assert_eq!(endpoint.secrets[0].name, "db-password");
    assert_eq!(endpoint.secrets[0].data, BYTES);
    nodes[1].wait_for("web's endpoint", |s| s.endpoints.iter().any(|e| e.service == "web")).await;
    for n in &nodes[1..] {
        let slices = n.slices();
        assert!(!slices.is_empty());
        assert!(!carried(&slices), "node {} was sent the secret", n.id);
        assert!(slices.iter().flat_map(|s| &s.endpoints).all(|e| e.secrets.is_empty()));
    }
    // Printed or serialized, a slice that carries it shows its size only.
    let shown = format!("{api:?}{}", serde_json::to_string(&api).unwrap());
    assert!(!shown.contains("hunter2"), "{shown}");

    // Admins see names, digests, sizes and readers, never the bytes.
    let listed = admin.list_secrets().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].services, vec!["api".to_owned()]);
    assert!(!serde_json::to_string(&listed).unwrap().contains("hunter2"));
    let inspected = admin.inspect_service("api").await.unwrap();
    assert!(!serde_json::to_string(&inspected).unwrap().contains("hunter2"));

    // Not removable while read; once its reader is gone, its node's next slices drop it.
    let in_use = admin.remove_secret("db-password").await.unwrap_err();
    assert!(in_use.to_string().contains("read by api"), "{in_use}");
    admin.remove_service("api").await.unwrap();
    nodes[0].wait_for("api gone", |s| s.endpoints.iter().all(|e| e.service != "api")).await;
    assert!(!carried(&[nodes[0].latest().unwrap()]));
    admin.remove_secret("db-password").await.unwrap();
    assert!(admin.list_secrets().await.unwrap().is_empty());

    // The manager's files never held it in the clear.
    let needle = &BYTES[..7];
    for entry in walk(&cluster.state_dir()) {
        let content = std::fs::read(&entry).unwrap_or_default();
        assert!(!content.windows(needle.len()).any(|w| w == needle), "{} holds the secret", entry.display());
    }
}

/// Every file under `dir`.
fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() { files.extend(walk(&path)) } else { files.push(path) }
    }
    files
}
