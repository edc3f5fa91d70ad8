//! `meshctl lab` end to end, as root: `up` builds a lab from the example spec and its checks
//! pass; `exec` reaches hosts and workloads; `status` shows it; `down` leaves nothing behind.

use std::process::Command;

fn meshctl() -> Command {
    let exe = std::env::current_exe().unwrap();
    let bin = exe.ancestors().nth(2).unwrap().join("meshctl");
    assert!(bin.exists(), "{} is missing: cargo build --workspace first", bin.display());
    let mut c = Command::new(bin);
    c.current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
    c
}

fn lab_namespaces() -> Vec<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|n| n.starts_with("meshlab-"))
        .map(str::to_owned)
        .collect()
}

#[test]
fn lab_up_exec_status_down() {
    mesh_tests::lab::require_root();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("lab");
    let state = state.to_str().unwrap();
    let up = meshctl().args(["lab", "up", "--hosts", "3", "--dir", state]).output().unwrap();
    let text = String::from_utf8_lossy(&up.stdout).into_owned() + &String::from_utf8_lossy(&up.stderr);
    let down = || meshctl().args(["lab", "down", "--dir", state]).output().unwrap();
    // Whatever happens below, the lab goes.
    struct Down<F: Fn() -> std::process::Output>(F);
    impl<F: Fn() -> std::process::Output> Drop for Down<F> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                (self.0)();
            }
        }
    }
    let _down = Down(down);
    assert!(up.status.success(), "lab up failed:\n{text}");
    assert!(text.contains("checks: 19 passed, 0 failed"), "{text}");
    // The way in and the way out, from and to a namespace outside the cluster.
    assert!(text.contains("outside `internet` at 10.77.0.250"), "{text}");
    assert!(text.contains("ok    the outside reads web's published page"), "{text}");
    assert!(text.contains("ok    the outside may not read what no ingress rule names"), "{text}");
    assert!(text.contains("ok    web reaches the partner outside the mesh"), "{text}");
    assert!(text.contains("ok    api may not leave the mesh"), "{text}");
    assert!(
        text.contains("network back created: 10.20.0.0/24") && text.contains("encrypted, wireguard"),
        "{text}"
    );
    assert!(text.contains("ok    api reaches db's endpoint straight over the WireGuard overlay"), "{text}");
    assert!(text.contains("ok    a root CA rotation under traffic"), "{text}");
    assert!(text.contains("a key rotation of `front` under traffic loses nothing"), "{text}");
    assert!(text.contains("ok    a rolling update of `api`"), "{text}");
    // Three hosts: three managers, and the leader's loss is survived.
    assert!(text.contains("3 managers, meshlab-h"), "{text}");
    assert!(text.contains("ok    the leading manager (meshlab-h"), "{text}");
    assert!(text.contains("500 pings between workloads lose nothing"), "{text}");
    // Managers carry the lab's host names (`mesh-control --hostname`).
    assert!(text.contains("meshlab-h2  manager"), "{text}");
    // A second lab while one is up is refused.
    let again = meshctl().args(["lab", "up", "--hosts", "3", "--dir", state]).output().unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already up"));

    let exec = meshctl()
        .args(["lab", "exec", "--dir", state, "h1", "--", "meshctl", "service", "ls"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&exec.stdout).contains("api"), "{exec:?}");
    // From a `web` workload (the policy lets web read items; api may not call itself).
    let web_host =
        String::from_utf8_lossy(&meshctl().args(["lab", "status", "--dir", state]).output().unwrap().stdout)
            .split_whitespace()
            .find(|w| w.starts_with("meshlab-h") && w.contains("-web-"))
            .map(|w| w.trim_start_matches("meshlab-").split('-').next().unwrap().to_owned())
            .expect("a web namespace in the status");
    let curl = meshctl()
        .args([
            "lab",
            "exec",
            "--dir",
            state,
            &format!("{web_host}/web"),
            "--",
            "curl",
            "-s",
            "http://api/v1/items/1",
        ])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&curl.stdout), "api GET /v1/items/1\n");
    // The manager killed by the failover check runs again, under its new process.
    let shown = meshctl().args(["lab", "status", "--dir", state]).output().unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert_eq!(shown.matches("mesh-control pid").count(), 3, "{shown}");
    assert!(!shown.contains("NOT RUNNING"), "{shown}");
    // Piped into a reader that stops early, it ends quietly (no panic on a closed pipe).
    let meshctl_path = meshctl().get_program().to_owned();
    let piped = Command::new("sh")
        .arg("-c")
        .arg(format!("'{}' lab status --dir '{state}' | head -1", meshctl_path.to_string_lossy()))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&piped.stdout).starts_with("lab in "), "{piped:?}");
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("panicked"), "{piped:?}");
    // From the outside namespace, by its name: web's published page.
    let outside = meshctl()
        .args(["lab", "exec", "--dir", state, "internet", "--", "curl", "-s", "http://10.77.0.12:8080/"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&outside.stdout), "web GET /\n", "{outside:?}");
    let status = meshctl().args(["lab", "exec", "--dir", state, "h1", "--", "false"]).status().unwrap();
    assert_eq!(status.code(), Some(1), "exec passes the command's exit status on");

    let out = down();
    assert!(out.status.success(), "{out:?}");
    assert!(lab_namespaces().is_empty(), "left behind: {:?}", lab_namespaces());
    assert!(!std::path::Path::new(state).exists());
    assert!(!meshctl().args(["lab", "status", "--dir", state]).status().unwrap().success());
}
