//! The ACL policy in control: apply (validated against the cluster, its tests run), versions,
//! rollback, and least-privilege distribution to the nodes' sessions.

use std::net::SocketAddr;
use std::time::Duration;

use control::config::ManagerOptions;
use mesh_api::proto::pb;
use mesh_tests::{SimNode, TestCluster};
use tonic::Code;

const HOUR: Duration = Duration::from_secs(3600);
const EXAMPLE: &str = include_str!("../../examples/policy.toml");

fn service(name: &str, node: &mesh_api::ids::NodeId) -> pb::CreateServiceRequest {
    pb::CreateServiceRequest {
        name: name.into(),
        networks: vec!["front".into()],
        ports: vec![pb::Port { port: 80, protocol: "tcp".into() }],
        replicas: 1,
        constraints: vec![format!("node.id=={node}")],
        command: String::new(),
        run: None,
        signed: None,
        publish: vec![],
    }
}

async fn cluster_with_services() -> (TestCluster, Vec<SimNode>) {
    let cluster = TestCluster::start_with(HOUR, ManagerOptions::default()).await;
    let mut nodes = Vec::new();
    for i in 0..3u8 {
        nodes.push(SimNode::start(&cluster, SocketAddr::from(([127, 0, 1, i + 1], 4800))).await);
    }
    let mut admin = cluster.admin().await;
    admin.create_network("front", "10.80.0.0/24", true).await.unwrap();
    admin.create_service(service("api", &nodes[0].id)).await.unwrap();
    admin.create_service(service("web", &nodes[1].id)).await.unwrap();
    admin.create_service(service("db", &nodes[1].id)).await.unwrap();
    (cluster, nodes)
}

fn rule_names(text: &str) -> Vec<String> {
    policy::Policy::parse("slice", text).unwrap().rules.into_iter().map(|r| r.name).collect()
}

#[tokio::test]
async fn each_node_receives_only_the_rules_for_the_services_it_hosts() {
    let (cluster, nodes) = cluster_with_services().await;
    let mut admin = cluster.admin().await;
    let applied = admin.apply_policy("examples/policy.toml", EXAMPLE).await.unwrap();
    assert_eq!((applied.version, applied.rules), (1, 7));

    let api_node = nodes[0].wait_for("the policy", |s| s.policy.is_some()).await;
    let mut api_rules = rule_names(&api_node.policy.unwrap().text);
    api_rules.sort();
    assert_eq!(
        api_rules,
        ["admins-change-items", "nobody-deletes-everything", "watch-debug-headers", "web-reads-items"]
    );
    let web_node = nodes[1].wait_for("the policy", |s| s.policy.is_some()).await;
    assert_eq!(
        rule_names(&web_node.policy.unwrap().text),
        ["api-uses-db", "public-reads-web", "web-calls-partner"],
        "db and web are on this node: the rules to them, and web's way out"
    );
    // For DNS that shows only what the policy may let a workload reach.
    let reach = |slice: &mesh_api::slice::NodeSlice, service: &str| -> Vec<String> {
        slice.visibility.get(service).map(|v| v.iter().cloned().collect()).unwrap_or_default()
    };
    let web_node = nodes[1].latest().unwrap();
    assert_eq!(reach(&web_node, "web"), ["api"]);
    assert!(reach(&web_node, "db").is_empty());
    assert_eq!(reach(&nodes[0].latest().unwrap(), "api"), ["db"]);
    // The node hosting nothing never received a single rule, in any message.
    let empty = nodes[2].wait_for("the policy version", |s| s.policy.is_some()).await;
    assert!(rule_names(&empty.policy.unwrap().text).is_empty());
    for slice in nodes[2].slices() {
        let text = slice.policy.map(|p| p.text).unwrap_or_default();
        for name in [
            "web-reads-items",
            "admins-change-items",
            "api-uses-db",
            "web-calls-partner",
            "x-role",
            "/v1/items",
        ] {
            assert!(!text.contains(name), "{name} reached a node without endpoints: {text}");
        }
    }
}

#[tokio::test]
async fn a_policy_whose_tests_fail_is_rejected_and_the_previous_stays() {
    let (cluster, _nodes) = cluster_with_services().await;
    let mut admin = cluster.admin().await;
    admin.apply_policy("good.toml", EXAMPLE).await.unwrap();
    let bad = EXAMPLE.replace("methods = [\"GET\", \"HEAD\"]", "methods = [\"HEAD\"]");
    let err = admin.apply_policy("bad.toml", &bad).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::FailedPrecondition));
    let message = err.to_string();
    assert!(message.contains("1 of its tests failed"), "{message}");
    assert!(
        message.contains(
            "bad.toml: test at line 47: web -> api:80 GET /v1/items/7 expected allow, got deny by default"
        ),
        "{message}"
    );
    let current = admin.get_policy(None).await.unwrap();
    assert_eq!((current.version, current.text.as_str()), (1, EXAMPLE));
    assert_eq!(admin.policy_history().await.unwrap().len(), 1);
}

#[tokio::test]
async fn unknown_services_and_syntax_errors_are_named_with_their_place() {
    let (cluster, _nodes) = cluster_with_services().await;
    let mut admin = cluster.admin().await;
    let typo = EXAMPLE.replacen("to = [\"api\"]", "to = [\"apii\"]", 1);
    let err = admin.apply_policy("p.toml", &typo).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument));
    assert!(
        err.to_string().contains("p.toml:8:7: service `apii` does not exist; did you mean `api`?"),
        "{err}"
    );
    let err = admin.apply_policy("p.toml", "default = \"deny\"\nbogus = 1\n").await.unwrap_err();
    assert!(err.to_string().contains("p.toml:2:1: unknown field `bogus`"), "{err}");
    assert_eq!(admin.get_policy(None).await.unwrap_err().code(), Some(Code::NotFound));
}

#[tokio::test]
async fn versions_are_kept_and_rollback_puts_an_old_one_back() {
    let (cluster, nodes) = cluster_with_services().await;
    let mut admin = cluster.admin().await;
    admin.apply_policy("v1.toml", EXAMPLE).await.unwrap();
    let v2_text = "default = \"deny\"\n[[rule]]\nname = \"only\"\naction = \"allow\"\nfrom = [\"web\"]\nto = [\"api\"]\n";
    admin.apply_policy("v2.toml", v2_text).await.unwrap();
    nodes[0].wait_for("version 2", |s| s.policy.as_ref().is_some_and(|p| p.version == 2)).await;

    let back = admin.rollback_policy(1).await.unwrap();
    assert_eq!(back.version, 3);
    assert_eq!(back.text, EXAMPLE);
    assert_eq!(back.source, "rollback to 1");
    let history = admin.policy_history().await.unwrap();
    assert_eq!(
        history.iter().map(|p| (p.version, p.current)).collect::<Vec<_>>(),
        [(1, false), (2, false), (3, true)]
    );
    assert_eq!(admin.get_policy(Some(2)).await.unwrap().text, v2_text);
    assert_eq!(admin.rollback_policy(9).await.unwrap_err().code(), Some(Code::NotFound));
    let slice = nodes[0].wait_for("version 3", |s| s.policy.as_ref().is_some_and(|p| p.version == 3)).await;
    assert_eq!(rule_names(&slice.policy.unwrap().text).len(), 4);

    // Versions survive a restart.
    drop(admin);
    let cluster = cluster.restart().await;
    let mut admin = cluster.admin().await;
    assert_eq!(admin.policy_history().await.unwrap().len(), 3);
    assert_eq!(admin.get_policy(None).await.unwrap().version, 3);
}
