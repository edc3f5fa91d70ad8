//! `meshctl service update` and `service rollback`, as root in a lab: a service of two endpoints
//! (one per host) serving what its environment says over HTTP, updated one endpoint at a time;
//! an update whose command fails pauses where it is (or rolls back by itself), and a rollback
//! returns every endpoint to the version before. A client workload reads it through the mesh
//! all along.

use std::collections::BTreeSet;

use mesh_tests::lab::{Lab, SERVE_V, WEB_READS_API};

/// What `api` answers `web`, over a few requests (each its own connection, spread over the
/// endpoints); failed requests are left out.
fn answers(lab: &Lab, web: &str) -> BTreeSet<String> {
    (0..8)
        .filter_map(|_| {
            let out = lab.exec(web, &["curl", "-sS", "-f", "-m", "3", "http://api/"]).output().ok()?;
            out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
        })
        .collect()
}

/// `service ps api --format json`: (slot, version, running version, state) of each endpoint.
fn ps(lab: &Lab) -> Vec<(u64, u64, u64, String)> {
    let json: serde_json::Value =
        serde_json::from_str(&lab.meshctl(&["service", "ps", "api", "--format", "json"]))
            .expect("service ps as JSON");
    json.as_array()
        .expect("a list")
        .iter()
        .map(|e| {
            (
                e["slot"].as_u64().unwrap(),
                e["version"].as_u64().unwrap(),
                e["running_version"].as_u64().unwrap(),
                e["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn inspect(lab: &Lab) -> serde_json::Value {
    serde_json::from_str(&lab.meshctl(&["service", "inspect", "api"])).expect("service inspect as JSON")
}

fn failing(lab: &Lab, args: &[&str]) -> String {
    let out = lab.meshctl_output(args);
    assert!(!out.status.success(), "meshctl {args:?} succeeded: {}", String::from_utf8_lossy(&out.stdout));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_service_is_updated_an_endpoint_at_a_time_and_rolled_back() {
    let lab = Lab::start(3);
    lab.meshctl(&["network", "create", "front", "--subnet", "10.48.0.0/24"]);
    let on = |i: usize| format!("node.id=={}", lab.node_id(i));
    lab.meshctl(&["service", "create", "web", "--network", "front", "--constraint", &on(2)]);
    lab.meshctl(&[
        "service",
        "create",
        "api",
        "--network",
        "front",
        "--port",
        "80/http",
        "--replicas",
        "2",
        "--command",
        SERVE_V,
        "--env",
        "V=one",
    ]);
    lab.apply_policy(WEB_READS_API);
    let web = lab.workload(2, "web", 1);
    lab.wait("both endpoints of api to serve version 0", || {
        answers(&lab, &web) == BTreeSet::from(["one".to_owned()])
            && ps(&lab)
                .iter()
                .all(|(_, v, running, state)| (*v, *running, state.as_str()) == (0, 0, "running"))
    });

    // A changed environment is a new version, handed to one endpoint, then (once it has run
    // a second) to the other; meshctl shows it and returns when both run it.
    let out = lab.meshctl(&["service", "update", "api", "--env", "V=two", "--update-monitor", "1s"]);
    assert!(out.contains("version 1 (was 0)"), "{out}");
    assert!(out.contains("updating: 1/2 endpoint(s) at version 1"), "the first batch is one endpoint: {out}");
    assert!(out.contains("every endpoint runs version 1"), "{out}");
    assert_eq!(ps(&lab).iter().map(|e| (e.1, e.2)).collect::<Vec<_>>(), [(1, 1), (1, 1)]);
    lab.wait("both endpoints to serve the new version", || {
        answers(&lab, &web) == BTreeSet::from(["two".to_owned()])
    });
    let s = inspect(&lab);
    assert_eq!((s["version"].as_u64(), s["previous"].as_u64()), (Some(1), Some(0)));
    assert_eq!(s["rollout"]["state"], "completed");

    // A command that exits: the update pauses at its first endpoint, the other keeps version 1
    // and goes on serving.
    let err = failing(&lab, &["service", "update", "api", "--command", "exit 3", "--update-monitor", "1s"]);
    assert!(err.contains("paused") && err.contains("exit 3"), "{err}");
    assert!(err.contains("meshctl service rollback api"), "the way out is shown: {err}");
    let endpoints = ps(&lab);
    assert_eq!(endpoints.iter().map(|e| e.1).collect::<Vec<_>>(), [2, 1], "{endpoints:?}");
    assert_eq!(inspect(&lab)["rollout"]["state"], "paused");
    assert!(answers(&lab, &web).contains("two"), "the endpoint not updated still serves");
    // meshctl check names both problems, each with its fix.
    let out = lab.meshctl_output(&["check"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "meshctl check passed with a paused update: {report}");
    assert!(report.contains("service api: the update to version 2 paused"), "{report}");
    assert!(report.contains("meshctl service rollback api"), "{report}");
    assert!(report.contains("endpoint api.1") && report.contains("exit 3"), "{report}");
    // Asked again with nothing changed, the paused update resumes, and pauses again at once.
    let err = failing(&lab, &["service", "update", "api", "--update-monitor", "1s"]);
    assert!(err.contains("paused") && err.contains("exit 3"), "{err}");

    // Rolled back: version 1 again everywhere, serving.
    let out = lab.meshctl(&["service", "rollback", "api", "--update-monitor", "1s"]);
    assert!(
        out.contains("rolling back to version 1 (was 2)") && out.contains("every endpoint runs version 1"),
        "{out}"
    );
    lab.wait("both endpoints to serve after the rollback", || {
        answers(&lab, &web) == BTreeSet::from(["two".to_owned()])
    });
    assert_eq!(ps(&lab).iter().map(|e| (e.1, e.2)).collect::<Vec<_>>(), [(1, 1), (1, 1)]);

    // With --update-failure-action rollback, a failing update undoes itself; meshctl says so.
    let err = failing(
        &lab,
        &[
            "service",
            "update",
            "api",
            "--command",
            "exit 4",
            "--update-monitor",
            "1s",
            "--update-failure-action",
            "rollback",
        ],
    );
    assert!(err.contains("rolled back") && err.contains("exit 4"), "{err}");
    assert_eq!(inspect(&lab)["version"].as_u64(), Some(1));
    lab.wait("both endpoints to serve after the automatic rollback", || {
        answers(&lab, &web) == BTreeSet::from(["two".to_owned()])
            && ps(&lab)
                .iter()
                .all(|(_, v, running, state)| (*v, *running, state.as_str()) == (1, 1, "running"))
    });

    // Replicas change at once, without a new version; what cannot be done is refused.
    let out = lab.meshctl(&["service", "update", "api", "--replicas", "1"]);
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(ps(&lab).len(), 1);
    assert_eq!(inspect(&lab)["version"].as_u64(), Some(1));
    for (args, why) in [
        (vec!["service", "update", "api", "--env-rm", "NOPE"], "no environment variable `NOPE`"),
        (vec!["service", "update", "api", "--port-rm", "81"], "no port 81"),
        (vec!["service", "update", "api", "--constraint-rm", "node.labels.zone==a"], "no constraint"),
        (vec!["service", "update", "api", "--user", "0"], "root"),
        (vec!["service", "update", "api", "--replicas", "3"], "node(s) are ready"),
        (vec!["service", "update", "nope", "--replicas", "1"], "no service named `nope`"),
        (vec!["service", "rollback", "web"], "no version before"),
    ] {
        let err = failing(&lab, &args);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    assert_eq!(inspect(&lab)["version"].as_u64(), Some(1), "a refused update changes nothing");

    // meshd check on a host of the lab: every prerequisite holds; with its managers' addresses
    // wrong, or no node joined, it says what is missing.
    let node_dir = lab.node_dir(2);
    let ok = lab.in_host(2, "meshd").args(["check", "--state-dir"]).arg(&node_dir).output().unwrap();
    let said = String::from_utf8_lossy(&ok.stdout);
    assert!(ok.status.success() && said.contains("ok    a manager reachable (TCP)"), "{said}");
    assert!(
        said.contains("ok    this host's clock agrees with control's")
            && said.contains(" ms against the leader"),
        "{said}"
    );
    let copy = lab.work.path().join("h2-copy");
    std::fs::create_dir_all(&copy).unwrap();
    for f in ["ca.crt", "node.crt", "node.key", "control"] {
        std::fs::copy(node_dir.join(f), copy.join(f)).unwrap();
    }
    std::fs::write(copy.join("control"), "127.0.0.1:1\n").unwrap();
    let unreachable = lab.in_host(2, "meshd").args(["check", "--state-dir"]).arg(&copy).output().unwrap();
    let said = String::from_utf8_lossy(&unreachable.stdout);
    assert!(!unreachable.status.success() && said.contains("FAIL  a manager reachable"), "{said}");
    let empty = lab.work.path().join("not-joined");
    let missing = lab.in_host(2, "meshd").args(["check", "--state-dir"]).arg(&empty).output().unwrap();
    assert!(String::from_utf8_lossy(&missing.stdout).contains("run `meshd join` first"));

    // Readiness next to the metrics: meshd holds its session, the manager knows its leader.
    for (host, port) in [(2, 9480), (1, 9481)] {
        let url = format!("http://127.0.0.1:{port}/readyz");
        let out = lab
            .exec(&lab.host(host), &["curl", "-sS", "-m", "3", "-w", " %{http_code}", &url])
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ready\n 200", "h{host}:{port}");
    }

    // meshctl version: its own and the leader's.
    let out = lab.meshctl(&["version"]);
    let v = env!("CARGO_PKG_VERSION");
    assert!(
        out.contains(&format!("meshctl       {v}"))
            && out.contains(&format!("mesh-control  {v} (the leader")),
        "{out}"
    );

    // All well again: meshctl check says so. A rule for a port api does not declare is named.
    let out = lab.meshctl(&["check"]);
    assert!(out.starts_with("ok: "), "{out}");
    lab.apply_policy(&WEB_READS_API.replace("ports = [80]", "ports = [80, 8080]"));
    let out = lab.meshctl_output(&["check"]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success() && report.contains("names port 8080 of api"), "{report}");
}
