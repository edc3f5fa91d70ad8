//! `meshctl service ps` at the control plane: nodes holding real sessions (meshd's code) report
//! their own endpoints' states; admins see each endpoint as its node reported it, and a node
//! cannot speak for another's endpoints.

use std::time::Duration;

use mesh_api::client::AdminClient;
use mesh_api::model::RunState;
use mesh_api::proto::EndpointPsView;
use mesh_api::proto::pb;
use mesh_tests::{SimNode, TestCluster, loopback_underlay, pinned_service};

const HOUR: Duration = Duration::from_secs(3600);

fn service(name: &str, node: &str) -> pb::CreateServiceRequest {
    pinned_service(name, node, None)
}

#[tokio::test]
async fn endpoints_are_shown_as_their_own_node_reports_them() {
    let cluster = TestCluster::start(HOUR).await;
    let a = SimNode::start(&cluster, loopback_underlay(30)).await;
    let b = SimNode::start(&cluster, loopback_underlay(31)).await;
    let mut admin = cluster.admin().await;
    admin.create_network("front", "10.53.0.0/24", true).await.unwrap();
    admin.create_service(service("api", a.id.as_str())).await.unwrap();
    admin.create_service(service("web", b.id.as_str())).await.unwrap();

    // Nothing reported yet: pending, and nothing counts as running.
    let ps = admin.service_ps("api").await.unwrap();
    assert_eq!(ps.len(), 1);
    assert_eq!((ps[0].state.as_str(), ps[0].node.clone()), ("pending", a.id.clone()));
    assert_eq!(admin.inspect_service("api").await.unwrap().running, 0);

    // Node a runs api, which crashed once.
    let api = a.endpoints.endpoint("api", 1, 0);
    api.set(RunState::Restarting, Some("exit 3".into()), false);
    api.set(RunState::Running, None, true);
    let last = wait_ps(&mut admin, "api", |ps| ps[0].state == "running").await;
    assert_eq!(last[0].restarts, 1);
    assert_eq!(last[0].last_exit.as_deref(), Some("exit 3"));
    assert!(last[0].since > 0);

    // Node b lies about a's endpoint (and about one that does not exist): ignored.
    let lie = b.endpoints.endpoint("api", 1, 0);
    lie.set(RunState::Failed, Some("forged".into()), false);
    let _ghost = b.endpoints.endpoint("ghost", 9, 0);
    let web = b.endpoints.endpoint("web", 1, 0);
    web.set(RunState::Running, None, false);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while admin.inspect_service("web").await.unwrap().running != 1 {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for web to run");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ps = admin.service_ps("api").await.unwrap();
    assert_eq!(ps[0].state, "running", "another node's report changed api: {ps:?}");
    assert_ne!(ps[0].last_exit.as_deref(), Some("forged"));
    assert_eq!(admin.inspect_service("api").await.unwrap().running, 1);

    // The endpoint goes from node a's report: pending again.
    drop(api);
    wait_ps(&mut admin, "api", |ps| ps[0].state == "pending").await;
    assert!(admin.service_ps("nope").await.is_err());
}

/// `service ps NAME` once `check` holds of it (10 s at most).
async fn wait_ps(
    admin: &mut AdminClient,
    name: &str,
    check: impl Fn(&[EndpointPsView]) -> bool,
) -> Vec<EndpointPsView> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let ps = admin.service_ps(name).await.unwrap();
        if check(&ps) {
            return ps;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting on service ps {name}: {ps:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
