//! Removing a manager, as root in a lab of namespaces running the real binaries (three managers
//! and a worker): it leaves the raft group, stops saying why, and learns nothing the cluster does
//! after (rotated tokens, new networks), while the two left keep their majority.

use std::time::{Duration, Instant};

use mesh_api::tokens::Role;
use mesh_tests::lab::Lab;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// The node ID of the manager on host `i`.
fn manager_id(lab: &Lab, i: usize) -> String {
    let nodes = json(&lab.meshctl(&["node", "ls", "--format", "json"]));
    let control = format!("{}:7400", lab.addr(i));
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["control"] == control.as_str())
        .unwrap_or_else(|| panic!("no manager at {control}: {nodes}"))["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn a_removed_manager_leaves_the_raft_group_stops_and_learns_nothing_after() {
    let lab = Lab::start_with(4, 3, &[]);
    let leader = lab.leader().expect("a leader");
    let follower = (1..=3).find(|i| *i != leader).unwrap();
    let (leader_id, follower_id) = (manager_id(&lab, leader), manager_id(&lab, follower));

    // A voter is not removed by mistake: demote it first, or --force; never the leader.
    let refused = lab.meshctl_output(&["node", "rm", &follower_id]);
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && text.contains("demote it first"), "{text}");
    let refused = lab.meshctl_output(&["node", "rm", &leader_id, "--force"]);
    let text = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && text.contains("leads the cluster"), "{text}");

    lab.meshctl(&["node", "rm", &follower_id, "--force"]);

    // It stops at once, saying why.
    let log = lab.log(meshctl::lab::Program::Manager, follower);
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("mesh-control: this manager was removed from the cluster") {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(15), "the removed manager still runs:\n{text}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The two left keep a majority: they commit a rotated token and a new network.
    let rotated = lab.meshctl(&["join-token", "worker", "--rotate", "-q"]).trim().to_owned();
    lab.meshctl(&["network", "create", "after", "--subnet", "10.43.0.0/24"]);
    let nodes = json(&lab.meshctl(&["node", "ls", "--format", "json"]));
    let statuses: Vec<&str> =
        nodes.as_array().unwrap().iter().filter_map(|n| n["manager_status"].as_str()).collect();
    assert_eq!(statuses.iter().filter(|s| **s == "leader").count(), 1, "{nodes}");
    assert_eq!(statuses.iter().filter(|s| **s == "reachable").count(), 1, "{nodes}");
    let removed = nodes.as_array().unwrap().iter().find(|n| n["id"] == follower_id.as_str()).unwrap();
    assert_eq!(removed["state"], "removed");
    assert!(removed.get("manager_status").is_none(), "{removed}");

    // No manager list names it any more: the admin bundle's, refreshed by the calls above, and
    // the worker's (from its session's slices). Neither accepts its certificate as control again.
    let bundle = std::fs::read_to_string(lab.admin_dir().join("control")).unwrap();
    assert!(!bundle.contains(&lab.addr(follower)), "{bundle}");
    let pinned = std::fs::read_to_string(lab.admin_dir().join("managers")).unwrap();
    assert!(pinned.contains(&leader_id) && !pinned.contains(&follower_id), "admin pins: {pinned}");
    lab.wait("the worker to pin the managers left", || {
        let pinned = std::fs::read_to_string(lab.node_dir(4).join("managers")).unwrap_or_default();
        pinned.contains(&leader_id) && !pinned.contains(&follower_id)
    });

    // Its own state stopped at its removal: none of the new secrets reached it.
    let state = tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(control::statedir::read_state(&lab.manager_dir(follower), None))
        .expect("the removed manager's state");
    assert!(!state.networks.contains_key("after"), "the removed manager learned of a later network");
    assert_ne!(state.join_tokens[&Role::Worker].0, rotated, "the removed manager holds the rotated token");
    assert_eq!(
        state.nodes[&follower_id.parse().unwrap()].state,
        mesh_api::model::NodeState::Removed,
        "it learned of its own removal, and stopped on it"
    );
}
