//! Cluster-wide settings live in the replicated state, not in each manager's flags: set with
//! `meshctl cluster update`, shown by `meshctl cluster inspect`, used by whichever manager leads,
//! kept across a failover; bad values are refused with the allowed range. As root, in a lab of
//! namespaces running the real binaries (three managers, each started with a 12h key rotation).

use std::time::{Duration, Instant};

use mesh_tests::lab::Lab;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn epoch(lab: &Lab) -> u64 {
    json(&lab.meshctl(&["network", "inspect", "front"]))["key_epoch"].as_u64().expect("an epoch")
}

#[test]
fn settings_are_replicated_used_by_the_leader_and_kept_across_a_failover() {
    let mut lab = Lab::start_with(4, 3, &["--key-rotation", "12h"]);
    lab.meshctl(&["network", "create", "front", "--subnet", "10.44.0.0/24"]);
    let settings = json(&lab.meshctl(&["cluster", "inspect", "--format", "json"]));
    assert_eq!(settings["key_rotation"], "12h", "{settings}");

    // Bad values: refused, naming the range; nothing changes.
    for (flag, value, range) in [
        ("--key-rotation", "0s", "between 1s and 30days"),
        ("--workload-cert-expiry", "48h", "between 1m and 1day"),
        ("--cert-expiry", "10m", "between 1h and 1year"),
        ("--down-after", "2h", "between 1s and 1h"),
    ] {
        let out = lab.meshctl_output(&["cluster", "update", flag, value]);
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{flag} {value} was accepted");
        assert!(text.contains("out of range") && text.contains(range), "{flag} {value}: {text}");
    }
    let out = lab.meshctl_output(&["cluster", "update"]);
    assert!(!out.status.success(), "an update without a setting is a usage error");

    let shown = lab.meshctl(&["cluster", "update", "--key-rotation", "3s", "--down-after", "20s"]);
    assert!(shown.contains("key-rotation") && shown.contains("3s"), "{shown}");
    let settings = json(&lab.meshctl(&["cluster", "inspect", "--format", "json"]));
    assert_eq!(
        (settings["key_rotation"].as_str(), settings["down_after"].as_str()),
        (Some("3s"), Some("20s"))
    );

    // The leader rotates on the stored interval, not its own flag's 12h.
    let before = epoch(&lab);
    let started = Instant::now();
    while epoch(&lab) < before + 2 {
        assert!(started.elapsed() < Duration::from_secs(20), "no rotation on the stored 3s interval");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Another manager leads: the same settings, and the same rotation.
    let leader = lab.leader().expect("a leader");
    lab.stop_manager(leader, true);
    lab.wait("another manager to lead", || lab.leader().is_some_and(|l| l != leader));
    let settings = json(&lab.meshctl(&["cluster", "inspect", "--format", "json"]));
    assert_eq!(
        (settings["key_rotation"].as_str(), settings["down_after"].as_str()),
        (Some("3s"), Some("20s"))
    );
    let before = epoch(&lab);
    let started = Instant::now();
    while epoch(&lab) < before + 2 {
        assert!(started.elapsed() < Duration::from_secs(20), "the new leader does not rotate every 3s");
        std::thread::sleep(Duration::from_millis(500));
    }
    lab.start_manager(leader);
}
