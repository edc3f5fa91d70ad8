//! Several managers, as root in a lab of namespaces running the real binaries: three managers
//! (hosts 1-3) and two workers with workloads (hosts 4-5). The leader is killed while workloads
//! ping each other and keys rotate every few seconds; a manager is cut off from the others; all
//! three restart. Also: a worker token cannot make a manager.

use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use mesh_tests::lab::Lab;

/// Labs run one at a time: they share the machine's two cores.
static ONE_LAB: Mutex<()> = Mutex::new(());

const ROTATION: u64 = 6;

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

/// (key epoch, rotated at) of network `front`.
fn epoch(lab: &Lab) -> (u64, String) {
    let n = json(&lab.meshctl(&["network", "inspect", "front"]));
    (n["key_epoch"].as_u64().expect("epoch"), n["rotated_at"].as_str().unwrap_or_default().to_owned())
}

fn unix(rfc3339: &str) -> i64 {
    time::OffsetDateTime::parse(rfc3339, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{rfc3339}: {e}"))
        .unix_timestamp()
}

fn connected(lab: &Lab) -> usize {
    lab.meshctl(&["node", "ls", "--format", "json"]).matches("\"connected\": true").count()
}

fn managers_up(lab: &Lab, voters: usize) -> bool {
    let out = lab.meshctl(&["node", "ls", "--format", "json"]);
    out.matches("\"manager_status\": \"leader\"").count() == 1
        && out.matches("\"manager_status\": \"reachable\"").count() == voters - 1
}

fn setup() -> (Lab, String, String) {
    let lab = Lab::start_with(5, 3, &["--key-rotation", &format!("{ROTATION}s")]);
    let (h4, h5) = (lab.node_id(4), lab.node_id(5));
    lab.meshctl(&["network", "create", "front", "--subnet", "10.41.0.0/24"]);
    let on = |n: &str| format!("node.id=={n}");
    lab.meshctl(&["service", "create", "web", "--network", "front", "--constraint", &on(&h4)]);
    lab.meshctl(&["service", "create", "api", "--network", "front", "--constraint", &on(&h5)]);
    let api = json(&lab.meshctl(&["service", "inspect", "api"]))["endpoints"][0]["addresses"]["front"]
        .as_str()
        .expect("api's address")
        .to_owned();
    let web = lab.workload(4, "web", 1);
    lab.wait("web to reach api", || {
        lab.exec(&web, &["ping", "-c", "1", "-W", "1", &api])
            .stdout(Stdio::null())
            .status()
            .unwrap()
            .success()
    });
    (lab, web, api)
}

#[test]
fn the_leader_fails_over_with_no_committed_change_lost_no_traffic_lost_and_keys_rotating_on_time() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let (mut lab, web, api) = setup();
    lab.meshctl(&["network", "create", "before", "--subnet", "10.42.0.0/24"]);

    // 300 pings over 15 s between workloads on hosts 4 and 5, the leader killed in the middle.
    let pinger = lab
        .exec(&web, &["ping", "-i", "0.05", "-c", "300", "-W", "1", &api])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut epochs = vec![epoch(&lab)];
    let watch = |lab: &Lab, epochs: &mut Vec<(u64, String)>| {
        let e = epoch(lab);
        if epochs.last() != Some(&e) {
            epochs.push(e);
        }
    };
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        watch(&lab, &mut epochs);
        std::thread::sleep(Duration::from_millis(300));
    }
    let old = lab.leader().expect("a leader");
    lab.stop_manager(old, true);
    let killed = Instant::now();
    lab.wait("another manager to lead", || lab.leader().is_some_and(|l| l != old));
    let elected = killed.elapsed();
    lab.wait("both workers' sessions to reconnect", || connected(&lab) == 2);
    let resumed = killed.elapsed();
    eprintln!("new leader after {elected:?}, sessions back after {resumed:?}");

    // Nothing committed is lost and the new leader commits.
    lab.meshctl(&["network", "create", "after", "--subnet", "10.43.0.0/24"]);
    let networks = lab.meshctl(&["network", "ls"]);
    for name in ["front", "before", "after"] {
        assert!(networks.contains(name), "{name} missing after the failover:\n{networks}");
    }
    let services = lab.meshctl(&["service", "ls"]);
    assert!(services.contains("web") && services.contains("api"), "{services}");

    // Rotation goes on at its own pace across the failover: one epoch at a time, every ROTATION
    // seconds (give or take the one-second reconcile and the election), no extra one, no gap.
    let until = Instant::now() + Duration::from_secs(2 * ROTATION + 2);
    while Instant::now() < until {
        watch(&lab, &mut epochs);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(epochs.len() >= 3, "rotations seen: {epochs:?}");
    for pair in epochs.windows(2) {
        let ((e1, t1), (e2, t2)) = (&pair[0], &pair[1]);
        assert_eq!(*e2, e1 + 1, "one epoch at a time: {epochs:?}");
        let gap = unix(t2) - unix(t1);
        assert!(
            (ROTATION as i64 - 1..=ROTATION as i64 + 3).contains(&gap),
            "rotations {gap} s apart around the failover (every {ROTATION} s expected): {epochs:?}"
        );
    }

    let out = pinger.wait_with_output().unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    let received: u32 = summary
        .lines()
        .find_map(|l| l.split(", ").find_map(|p| p.strip_suffix(" received")?.parse().ok()))
        .unwrap_or_else(|| panic!("no ping summary: {summary}"));
    eprintln!("{} of 300 pings answered across the failover", received);
    assert!(received >= 297, "traffic between workloads stopped during the failover: {summary}");

    // Demoting is refused where it would cost the majority: the leader, or a follower while the
    // old leader is down (one of the two voters left could not be reached).
    let leader = lab.leader().expect("a leader");
    let follower = (1..=3).find(|i| *i != leader && *i != old).unwrap();
    let demote = |i: usize| lab.meshctl_output(&["node", "demote", &manager_id(&lab, i)]);
    let refused = demote(leader);
    assert!(!refused.status.success() && String::from_utf8_lossy(&refused.stderr).contains("leads"));
    let refused = demote(follower);
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && message.contains("majority"), "{message}");

    // The old leader comes back as a follower and catches up.
    lab.start_manager(old);
    lab.wait("the old leader to rejoin as a follower", || managers_up(&lab, 3));
    assert_ne!(lab.leader(), Some(old));

    // Now a follower can stop voting and vote again.
    let out = lab.meshctl(&["node", "demote", &manager_id(&lab, follower)]);
    assert!(out.contains("non-voter"), "{out}");
    assert!(lab.meshctl(&["node", "ls"]).contains("reachable (non-voter)"));
    lab.meshctl(&["node", "promote", &manager_id(&lab, follower)]);
    lab.wait("three voters again", || managers_up(&lab, 3));
}

fn manager_id(lab: &Lab, i: usize) -> String {
    let pem = std::fs::read_to_string(lab.manager_dir(i).join("manager.crt")).unwrap();
    mesh_api::pki::CertInfo::from_pem(&pem).unwrap().common_name
}

#[test]
fn a_manager_cut_off_cannot_commit_and_all_three_restarted_keep_the_state() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let (mut lab, _web, _api) = setup();
    let cut = lab.leader().expect("a leader");

    // Each manager's metrics (default address, in its own host): the leader says it leads, holds
    // both workers' sessions, and counts the slices it sent them, whole first and then deltas.
    let leader = lab.metrics(cut, 9481);
    let value = |text: &str, name: &str| -> f64 {
        let line = text.lines().find(|l| l.split(' ').next() == Some(name));
        line.and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in:\n{text}"))
    };
    assert_eq!(value(&leader, "mesh_manager_leader"), 1.0);
    assert_eq!(value(&leader, "mesh_manager_sessions"), 2.0);
    assert!(value(&leader, "mesh_manager_slices_sent_total{kind=\"whole\"}") >= 2.0, "{leader}");
    assert!(value(&leader, "mesh_manager_slices_sent_total{kind=\"delta\"}") >= 2.0, "{leader}");
    assert!(value(&leader, "mesh_manager_slice_bytes_sent_total{kind=\"delta\"}") > 0.0, "{leader}");
    assert!(value(&leader, "mesh_manager_certificates_issued_total{kind=\"workload\"}") >= 2.0, "{leader}");
    assert_eq!(value(&leader, "mesh_manager_services"), 2.0);
    let follower = lab.metrics((1..=3).find(|i| *i != cut).unwrap(), 9481);
    assert_eq!(value(&follower, "mesh_manager_leader"), 0.0);
    assert_eq!(value(&follower, "mesh_manager_sessions"), 0.0);
    assert_eq!(value(&follower, "mesh_manager_raft_term"), value(&leader, "mesh_manager_raft_term"));

    // Cut the leader off from the other managers (not from the workers' hosts); meshctl runs
    // from a worker's host, where every manager can be reached.
    lab.set_admin_host(4);
    let others: Vec<String> = (1..=3).filter(|i| *i != cut).map(|i| lab.addr(i)).collect();
    let rules = format!(
        "table inet cut {{ chain in {{ type filter hook input priority 0; ip saddr {{ {0} }} drop; }}; \
         chain out {{ type filter hook output priority 0; ip daddr {{ {0} }} drop; }}; }}",
        others.join(", ")
    );
    let nft = lab.exec(&lab.host(cut), &["nft", &rules]).output().unwrap();
    assert!(nft.status.success(), "nft: {}", String::from_utf8_lossy(&nft.stderr));

    // An admin who can reach only the cut-off manager gets a refusal, and nothing is made.
    let alone = lab.work.path().join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    for f in ["ca.crt", "admin.crt", "admin.key"] {
        std::fs::copy(lab.admin_dir().join(f), alone.join(f)).unwrap();
    }
    std::fs::write(alone.join("control"), format!("{}:7400\n", lab.addr(cut))).unwrap();
    let alone_admin = |args: &[&str]| {
        lab.exec(&lab.host(cut), &[lab_bin("meshctl").as_str()])
            .args(args)
            .env("MESHCTL_ADMIN", &alone)
            .output()
            .unwrap()
    };
    let refused = alone_admin(&["network", "create", "lost", "--subnet", "10.44.0.0/24"]);
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a cut-off manager committed a change");
    assert!(message.contains("does not lead") || message.contains("majority"), "unclear refusal: {message}");
    // The majority elects a leader of its own and commits; the workers' sessions move to it.
    lab.wait("the others to elect a leader", || lab.leader().is_some_and(|l| l != cut));
    lab.meshctl(&["network", "create", "kept", "--subnet", "10.45.0.0/24"]);
    lab.wait("the workers' sessions to move to the new leader", || connected(&lab) == 2);

    // Healed, the cut-off manager follows: it has what the majority committed, never `lost`.
    let _ = lab.exec(&lab.host(cut), &["nft", "delete", "table", "inet", "cut"]).status();
    lab.wait("the cut-off manager to rejoin", || managers_up(&lab, 3));
    let networks = lab.meshctl(&["network", "ls"]);
    assert!(networks.contains("kept") && !networks.contains("lost"), "{networks}");

    // All three stopped and started again: the same cluster, networks, services and endpoints.
    let before_services = lab.meshctl(&["service", "ls", "--format", "json"]);
    let before_networks = lab.meshctl(&["network", "ls"]);
    for i in 1..=3 {
        lab.stop_manager(i, false);
    }
    for i in 1..=3 {
        lab.start_manager(i);
    }
    lab.wait("the restarted managers to elect a leader", || managers_up(&lab, 3));
    // What is replicated comes back whole; how many endpoints run is what nodes report, again,
    // to the new leader once their sessions are back (below).
    let replicated = |json: &str| {
        let mut services: serde_json::Value = serde_json::from_str(json).unwrap();
        for s in services.as_array_mut().unwrap() {
            s.as_object_mut().unwrap().remove("running");
        }
        services
    };
    assert_eq!(
        replicated(&lab.meshctl(&["service", "ls", "--format", "json"])),
        replicated(&before_services)
    );
    let names = |text: &str| -> Vec<String> {
        text.lines().skip(1).map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" ")).collect()
    };
    assert_eq!(names(&lab.meshctl(&["network", "ls"])), names(&before_networks));
    lab.wait("the workers' sessions to come back", || connected(&lab) == 2);
    lab.wait("the nodes to report their endpoints to the new leader", || {
        lab.meshctl(&["service", "ls", "--format", "json"]) == before_services
    });
}

fn lab_bin(name: &str) -> String {
    mesh_tests::lab::bin_dir().join(name).display().to_string()
}

/// Managers started together join together: raft makes one membership change at a time, and
/// each joining manager's changes wait their turn (the lab starts them all at once), each
/// recording its join done once it votes. A manager the operator demoted stays a non-voter:
/// across restarts, and when it asks to vote again itself (its join made pending again, as a
/// manager whose key was stolen could ask); promoted, it votes.
#[test]
fn managers_joining_at_once_all_vote_and_a_demoted_one_stays_demoted() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::start_with(4, 3, &[]);
    assert!(managers_up(&lab, 3), "{}", lab.meshctl(&["node", "ls"]));
    let leader = lab.leader().expect("a leader");
    let follower = (2..=3).find(|i| *i != leader).unwrap();
    let config_file = lab.manager_dir(follower).join("config.json");
    let config = || -> serde_json::Value { json(&std::fs::read_to_string(&config_file).unwrap()) };
    lab.wait("the join to be recorded as done once it votes", || config()["join"] == serde_json::json!([]));

    // Demoted by the operator: a restart does not undo it.
    lab.meshctl(&["node", "demote", &manager_id(&lab, follower)]);
    lab.stop_manager(follower, false);
    lab.start_manager(follower);
    let non_voter = |lab: &Lab| lab.meshctl(&["node", "ls"]).contains("reachable (non-voter)");
    lab.wait("the demoted manager back, not voting", || non_voter(&lab));
    std::thread::sleep(Duration::from_secs(5));
    assert!(non_voter(&lab), "a demoted manager promoted itself: {}", lab.meshctl(&["node", "ls"]));

    // Asking again, its join made pending: refused by the leader, and the ask stops.
    lab.stop_manager(follower, false);
    let mut pending = config();
    pending["join"] = serde_json::json!([lab.topology().control(leader)]);
    std::fs::write(&config_file, serde_json::to_vec_pretty(&pending).unwrap()).unwrap();
    lab.start_manager(follower);
    lab.wait("the demoted manager to stop asking", || config()["join"] == serde_json::json!([]));
    assert!(non_voter(&lab), "a demoted manager voted again by asking: {}", lab.meshctl(&["node", "ls"]));
    lab.meshctl(&["node", "promote", &manager_id(&lab, follower)]);
    lab.wait("three voters again", || managers_up(&lab, 3));
}
