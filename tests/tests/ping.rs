//! `meshd ping`, as root in a lab: echoes through the overlay from a workload of the node, each
//! path named (the peer node, the network, its transport and key epoch) with its round trip; a
//! target this node shares no network with is refused with the reason.

use mesh_tests::lab::Lab;

fn ping(lab: &Lab, host: usize, target: &str) -> std::process::Output {
    lab.in_host(host, "meshd")
        .args(["ping", target, "--json", "--state-dir"])
        .arg(lab.node_dir(host))
        .output()
        .unwrap()
}

#[test]
fn meshd_pings_through_the_overlay_and_names_the_path() {
    let lab = Lab::start(4);
    let on = |i: usize| format!("node.id=={}", lab.node_id(i));
    lab.meshctl(&["network", "create", "front", "--subnet", "10.58.0.0/24"]);
    lab.meshctl(&["network", "create", "back", "--subnet", "10.59.0.0/24"]);
    lab.meshctl(&["service", "create", "web", "--network", "front", "--constraint", &on(2)]);
    lab.meshctl(&["service", "create", "api", "--network", "front", "--constraint", &on(3)]);
    lab.meshctl(&["service", "create", "db", "--network", "back", "--constraint", &on(4)]);
    let api = lab.node_id(3);

    let mut echoes = serde_json::Value::Null;
    lab.wait("api to answer web's node through the overlay", || {
        let out = ping(&lab, 2, "api");
        echoes = serde_json::from_slice(&out.stdout).unwrap_or_default();
        out.status.success()
    });
    let echo = &echoes[0];
    assert_eq!(echo["probe"]["peer"], api.as_str(), "{echoes}");
    assert_eq!(echo["probe"]["network"], "front");
    assert_eq!(echo["probe"]["transport"], "aes-256-gcm");
    assert_eq!(echo["received"], 3, "{echoes}");
    assert!(echo["rtt_avg_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{echoes}");
    // The epoch named is the one the node's status says is current.
    let status = lab.status(2);
    let keys = status["networks"][0]["keys"].as_array().unwrap();
    let current = keys.iter().filter_map(|k| k.as_str()?.strip_prefix("current:")).next().unwrap();
    assert_eq!(echo["probe"]["epoch"].to_string(), current, "{echoes} {keys:?}");

    // By address, and a local endpoint's: the path is this node.
    let to = echo["probe"]["to"].as_str().unwrap().to_owned();
    let out = ping(&lab, 2, &to);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = ping(&lab, 2, "web.front");
    let local: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(local[0]["probe"]["peer"], serde_json::Value::Null, "{local}");
    // The human form names the path.
    let text =
        lab.in_host(2, "meshd").args(["ping", "api", "--state-dir"]).arg(lab.node_dir(2)).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("via node {api} (aes-256-gcm, key epoch {current})")), "{text}");

    // Nothing to ping from, or nothing by that name on this node's networks: refused, and why.
    let out = ping(&lab, 2, "db");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("no service or address"), "{err}");
    let out = ping(&lab, 2, "10.59.0.2");
    assert!(!out.status.success());
}
