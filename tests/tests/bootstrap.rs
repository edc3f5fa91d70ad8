//! Bootstrap as an operator pastes it, as root in a lab of namespaces running the real binaries:
//! `mesh-control init` never advertises a loopback address it was not told to, and the manager
//! join command `meshctl join-token manager` prints works as pasted on another host.

use std::process::Command;

use mesh_tests::lab::{Lab, bin_dir};

#[test]
fn init_refuses_to_advertise_loopback_and_the_printed_join_command_works_as_pasted() {
    let lab = Lab::start_with(3, 1, &[]);
    let dir = lab.work.path().join("refused");
    let init = |extra: &[&str]| {
        Command::new("ip")
            .args(["netns", "exec", &lab.host(2)])
            .arg(bin_dir().join("mesh-control"))
            .args(["init", "--state-dir"])
            .arg(&dir)
            .arg("--admin-dir")
            .arg(dir.with_extension("admin"))
            .args(extra)
            .output()
            .unwrap()
    };
    // The default listen address is 0.0.0.0:7400: which address would others use? Not 127.0.0.1.
    let out = init(&[]);
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("loopback") && text.contains("--advertise"), "{text}");
    assert!(!dir.join("cluster.redb").exists(), "nothing was made");
    let out = init(&["--listen", "127.0.0.1:7499"]);
    assert!(!out.status.success(), "a loopback listen address, not said as --advertise, is refused too");
    let out = init(&["--listen", "127.0.0.1:7499", "--advertise", "127.0.0.1:7499"]);
    assert!(out.status.success(), "said explicitly, loopback is what the operator wants: {out:?}");

    // The join command as meshctl prints it, with only the state directory changed.
    let printed = lab.meshctl(&["join-token", "manager"]);
    let line = printed.lines().find(|l| l.trim_start().starts_with("mesh-control join")).expect(&printed);
    let state = lab.work.path().join("pasted");
    let pasted = line.trim().replace("/var/lib/mesh-control", state.to_str().unwrap());
    let words: Vec<&str> = pasted.split_whitespace().collect();
    assert!(!words.contains(&"--advertise") && !words.contains(&"--listen"), "{pasted}");
    let log = std::fs::File::create(lab.work.path().join("pasted.log")).unwrap();
    let child = Command::new("ip")
        .args(["netns", "exec", &lab.host(3)])
        .arg(bin_dir().join(words[0]))
        .args(&words[1..])
        .stderr(log)
        .spawn()
        .unwrap();
    let _child = KillOnDrop(child);
    lab.wait("the pasted manager to be a reachable voter", || {
        let out = lab.meshctl(&["node", "ls", "--format", "json"]);
        out.matches("\"manager_status\": \"reachable\"").count() == 1
            && out.contains(&format!("\"control\": \"{}:7400\"", lab.addr(3)))
    });
}

/// Stops a process this test started outside the lab, however the test ends.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
