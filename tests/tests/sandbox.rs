//! Workloads confined, as root: a lab whose host 3 runs `probe`, a workload that tries what an
//! attacker running code in it would (tests/lab/sandbox_probe.py records each move), next to
//! `other`, a workload with CPU and memory limits. Every move out of the sandbox fails; what a
//! service needs (port 80, names, the mesh, a path it may write) still works.

use std::collections::BTreeSet;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use mesh_tests::lab::{Lab, readable, script};

const POLICY: &str = r#"
default = "deny"

[[rule]]
name = "web-reads-probe"
action = "allow"
from = ["web"]
to = ["probe"]
ports = [80]
methods = ["GET"]
"#;

/// The process IDs (as the host sees them) of what runs in namespace `ns`.
fn pids(lab: &Lab, ns: &str) -> Vec<u32> {
    let out = std::process::Command::new("ip").args(["netns", "pids", ns]).output().unwrap();
    let _ = lab;
    String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse().ok()).collect()
}

/// The process in `ns` running `program` (by its command line's first word's file name).
fn process(lab: &Lab, ns: &str, program: &str) -> Option<u32> {
    pids(lab, ns).into_iter().find(|pid| {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let first = cmdline.split(|b| *b == 0).next().unwrap_or_default();
        let args = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        Path::new(&*String::from_utf8_lossy(first)).file_name().is_some_and(|f| f == program)
            || args.split(' ').nth(1).is_some_and(|a| a.ends_with(program))
    })
}

fn status_field(pid: u32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The file `file` of the cgroup `pid` is in for `controller` (v1), or of its unified cgroup.
fn cgroup_file(pid: u32, controller: &str, v1: &str, v2: &str) -> PathBuf {
    let groups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for line in groups.lines() {
        let parts: Vec<&str> = line.splitn(3, ':').collect();
        if parts[1].split(',').any(|c| c == controller) {
            return PathBuf::from(format!("/sys/fs/cgroup/{controller}{}", parts[2])).join(v1);
        }
    }
    let unified = groups.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup");
    PathBuf::from(format!("/sys/fs/cgroup{unified}")).join(v2)
}

fn curl(lab: &Lab, ns: &str, url: &str) -> (u16, String) {
    let out = lab.exec(ns, &["curl", "-sS", "-m", "3", "-w", "\n%{http_code}", url]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

#[test]
fn a_workload_cannot_reach_the_node_its_neighbours_or_the_host_yet_serves() {
    let lab = Lab::start(3);
    let on = |i: usize| format!("node.id=={}", lab.node_id(i));
    lab.meshctl(&["network", "create", "front", "--subnet", "10.47.0.0/24"]);
    lab.meshctl(&["service", "create", "web", "--network", "front", "--constraint", &on(2)]);
    // A neighbour on the same host, limited.
    lab.meshctl(&[
        "service",
        "create",
        "other",
        "--network",
        "front",
        "--port",
        "7000",
        "--constraint",
        &on(3),
        "--limit-memory",
        "64M",
        "--limit-cpu",
        "0.5",
        "--command",
        "echo neighbour-secret > /tmp/secret; exec sleep 1000",
    ]);
    let other_ns = lab.workload(3, "other", 1);
    let mut other = None;
    lab.wait("the neighbour to run", || {
        other = process(&lab, &other_ns, "sleep");
        other.is_some()
    });
    let other = other.unwrap();

    // Something of the host's in its /tmp, and a directory the probe may write.
    let marker = format!("host-marker-{}", std::process::id());
    let marker_path = Path::new("/tmp").join(&marker);
    std::fs::write(&marker_path, "host").unwrap();
    let out = lab.work.path().join("probe-out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let state_dir = lab.node_dir(3);
    // A disk of the host's, by its name (the probe tries /dev/NAME).
    let disk = std::fs::read_dir("/sys/block")
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| !n.starts_with("loop") && !n.starts_with("ram"))
        .unwrap_or_else(|| "vda".into());
    let command = format!(
        "exec python3 {} {} {} {} {other} {marker} {disk} {} http 80 probe",
        script("sandbox_probe.py"),
        out.display(),
        state_dir.display(),
        lab.meshd_pid(3),
        env!("CARGO_BIN_EXE_mesh-echo"),
    );
    let out_arg = out.to_str().unwrap();
    let readable = readable();
    lab.meshctl(&[
        "service",
        "create",
        "probe",
        "--network",
        "front",
        "--port",
        "80/http",
        "--constraint",
        &on(3),
        "--writable",
        out_arg,
        "--env",
        "PROBE_MODE=attack",
        readable[0].as_str(),
        readable[1].as_str(),
        readable[2].as_str(),
        readable[3].as_str(),
        "--command",
        &command,
    ]);
    lab.apply_policy(POLICY);
    let result_file = out.join("result.json");
    lab.wait("the probe's record", || result_file.exists());
    let _ = std::fs::remove_file(&marker_path);
    let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&result_file).unwrap()).unwrap();
    println!("the probe's record: {r:#}");
    let said = |k: &str| r[k].as_str().unwrap_or_else(|| panic!("{k}: {}", r[k])).to_owned();
    // Hidden: covered by an empty directory it cannot open, or not there at all.
    let hidden = |s: &str| s.contains("FileNotFoundError") || s.contains("PermissionError");
    let failed = |k: &str, with: &[&str]| {
        let s = said(k);
        assert!(with.iter().any(|w| s.contains(w)), "{k}: expected one of {with:?}, got `{s}`\n{r:#}");
    };

    // Who it is: not root, no capability in any set, no way to gain one.
    let uid = r["uid"].as_u64().unwrap();
    assert!(uid >= u64::from(meshd::sandbox::FIRST_UID), "uid {uid}");
    assert_eq!(r["gid"].as_u64().unwrap(), uid);
    assert_eq!(r["groups"], serde_json::json!([]));
    for set in ["CapEff", "CapPrm", "CapInh", "CapBnd", "CapAmb"] {
        assert_eq!(said(set), "0000000000000000", "{set}");
    }
    assert_eq!(said("NoNewPrivs"), "1");
    // Nothing of meshd's is open in it: stdin, stdout, stderr and the listing's own.
    let fds: BTreeSet<u64> = r["fds"].as_array().unwrap().iter().map(|f| f.as_u64().unwrap()).collect();
    assert!(fds.iter().filter(|f| **f > 2).count() <= 1, "descriptors {fds:?}");
    assert_eq!(said("hostname"), lab.workload(3, "probe", 1));
    // Its environment is what the service set and PATH and HOME, nothing of meshd's (Python adds
    // LC_CTYPE under the C locale, the shell PWD).
    let environ = r["environ"].as_object().unwrap();
    assert_eq!(environ["PROBE_MODE"], "attack");
    assert_eq!(environ["HOME"], "/tmp");
    assert!(
        environ.keys().all(|k| ["PATH", "HOME", "PROBE_MODE", "LC_CTYPE", "PWD"].contains(&k.as_str())),
        "{environ:?}"
    );

    // Its own /dev: nothing of the host's devices, no terminal, a session of its own.
    let dev: Vec<&str> = r["dev_listing"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    let expected = [
        "fd", "full", "null", "ptmx", "pts", "random", "shm", "stderr", "stdin", "stdout", "urandom", "zero",
    ];
    assert_eq!(dev, expected, "/dev holds only the harmless devices");
    for k in ["open_host_disk", "open_tty", "open_tun"] {
        failed(k, &["FileNotFoundError"]);
    }
    failed("mknod_disk", &["PermissionError"]);
    assert_eq!(said("write_dev_null"), "ok");
    assert_eq!(r["session"], 1, "the helper's session (PID 1 of its namespace), not meshd's");
    assert_eq!(r["core_limit"], serde_json::json!([0, 0]));
    assert!(r["tmp_bytes"].as_u64().unwrap() <= 256 << 20, "an unbounded /tmp: {}", r["tmp_bytes"]);
    // Hidden by an empty directory it cannot open (/etc/netns: other namespaces' files).
    failed("list_etc_netns", &["PermissionError"]);
    // The node's secrets are not there to read.
    failed("read_node_key", &["FileNotFoundError", "PermissionError"]);
    let listed = &r["list_state_dir"];
    assert!(
        *listed == serde_json::json!([]) || hidden(&said("list_state_dir")),
        "the state directory: {listed}"
    );
    // No other namespace to enter.
    for k in ["list_run_netns", "list_var_run_netns"] {
        assert!(r[k] == serde_json::json!([]) || hidden(&said(k)), "{k}: {}", r[k]);
    }
    failed("setns_pid1_net", &["Operation not permitted", "Permission denied"]);
    failed("setns_own_net", &["Operation not permitted"]);
    assert!(said("pid1_is").ends_with("exe") || said("pid1_is").contains("meshd"), "{}", r["pid1_is"]);
    // The plan (command, environment, paths) is not on the helper's command line.
    let pid1 = said("pid1_cmdline");
    assert!(!pid1.contains("PROBE_MODE") && !pid1.contains("sandbox_probe"), "{pid1:?}");
    let seen: Vec<u64> = r["pids_seen"].as_array().unwrap().iter().map(|p| p.as_u64().unwrap()).collect();
    assert!(seen.iter().all(|p| *p < 100), "only its own processes: {seen:?}");
    // meshd and the neighbour do not exist as far as it can tell.
    for k in ["signal_meshd", "ptrace_meshd", "signal_other_workload"] {
        failed(k, &["ProcessLookupError", "No such process"]);
    }
    failed("meshd_environ", &["FileNotFoundError"]);
    // Its interception and routes stay meshd's.
    failed("nft_flush", &["Operation not permitted"]);
    assert!(!said("nft_flush").starts_with("exit 0"), "{}", said("nft_flush"));
    assert!(!said("ip_route_flush").starts_with("exit 0"), "{}", said("ip_route_flush"));
    failed("raw_socket", &["PermissionError"]);
    failed("sysctl_write", &["Read-only file system", "PermissionError"]);
    assert!(!said("setuid_mount").starts_with("exit 0"), "{}", said("setuid_mount"));
    // No user namespace of its own, no keyring shared with whatever else meshd's session ran.
    for k in ["unshare_user", "unshare_user_net"] {
        assert!(
            !said(k).starts_with("exit 0") && said(k).contains("Operation not permitted"),
            "{k}: {}",
            said(k)
        );
    }
    if !said("keyctl_session").starts_with("skipped") {
        failed("keyctl_session", &["Operation not permitted"]);
    }
    // The host's files read-only; its scratch its own; the path it was given writable.
    for k in ["write_etc", "write_usr", "write_root"] {
        failed(k, &["Read-only file system", "PermissionError"]);
    }
    assert_eq!(said("write_tmp"), "ok");
    assert_eq!(r["host_tmp_marker_seen"], serde_json::json!(false), "the host's /tmp is not its /tmp");
    assert_eq!(said("write_writable"), "ok");
    assert!(out.join("probe-was-here").exists());
    assert!(!Path::new("/etc/probe-was-here").exists() && !Path::new("/probe-was-here").exists());
    // What a service needs.
    assert!(said("resolv_conf").contains("nameserver 127.0.0.11"), "{}", said("resolv_conf"));
    assert!(said("resolve_probe").starts_with("10.47.0."), "{}", said("resolve_probe"));
    assert_eq!(said("bind_port_80_udp"), "ok");
    let web = lab.workload(2, "web", 1);
    lab.wait("web to reach the probe through the mesh", || curl(&lab, &web, "http://probe/").0 == 200);
    assert!(curl(&lab, &web, "http://probe/x").1.starts_with("probe GET /x"));
    // Its node reports it running; the service counts it.
    lab.wait("the probe reported running", || lab.meshctl(&["service", "ps", "probe"]).contains("running"));
    assert!(lab.meshctl(&["service", "ls"]).lines().any(|l| l.starts_with("probe") && l.contains(" 1/1 ")));
    // meshd's interception in the probe's namespace survived its attempt.
    let rules = lab.exec(&lab.workload(3, "probe", 1), &["nft", "list", "ruleset"]).output().unwrap();
    assert!(String::from_utf8_lossy(&rules.stdout).contains("redirect"), "the interception is gone");

    // Seen from the host: the server it became runs confined too, and the neighbour within its
    // limits, each in a cgroup of its own.
    let probe_ns = lab.workload(3, "probe", 1);
    let server = process(&lab, &probe_ns, "mesh-echo").expect("the probe's server");
    assert!(status_field(server, "Uid").split_whitespace().all(|u| u == uid.to_string()));
    assert_eq!(status_field(server, "CapEff"), "0000000000000000");
    assert_eq!(status_field(server, "NoNewPrivs"), "1");
    let other_uid = status_field(other, "Uid");
    assert_ne!(other_uid.split_whitespace().next().unwrap(), uid.to_string(), "each workload its own user");
    let memory = cgroup_file(other, "memory", "memory.limit_in_bytes", "memory.max");
    assert!(memory.to_string_lossy().contains(&format!("/mesh/{other_ns}")), "{}", memory.display());
    assert_eq!(std::fs::read_to_string(&memory).unwrap().trim(), (64u64 << 20).to_string());
    let cpu = cgroup_file(other, "cpu", "cpu.cfs_quota_us", "cpu.max");
    assert!(std::fs::read_to_string(&cpu).unwrap().trim().starts_with("50000"), "{}", cpu.display());
    let tasks = cgroup_file(other, "pids", "pids.max", "pids.max");
    if tasks.exists() {
        assert_eq!(
            std::fs::read_to_string(&tasks).unwrap().trim(),
            meshd::sandbox::cgroup::TASKS.to_string()
        );
    }
    // The neighbour's /tmp is its own, not the probe's nor the host's.
    let secret = format!("/proc/{other}/root/tmp/secret");
    assert_eq!(std::fs::read_to_string(&secret).unwrap().trim(), "neighbour-secret");
    assert!(!Path::new("/tmp/secret").exists());

    // Removing a service ends every process of it and its cgroup.
    lab.meshctl(&["service", "rm", "other"]);
    lab.wait("the neighbour's processes to go", || !Path::new(&format!("/proc/{other}")).exists());
    lab.wait("the neighbour's cgroup to go", || !memory.exists());
}

#[test]
fn a_service_that_asks_for_root_or_a_bad_limit_is_refused_by_control() {
    let lab = Lab::start(2);
    lab.meshctl(&["network", "create", "front", "--subnet", "10.48.0.0/24"]);
    let create = |extra: &[&str]| {
        let mut args = vec!["service", "create", "svc", "--network", "front", "--command", "sleep 1000"];
        args.extend(extra);
        lab.meshctl_output(&args)
    };
    for (extra, says) in [
        (&["--user", "root"][..], "never runs as root"),
        (&["--user", "0:0"][..], "never runs as root"),
        (&["--user", "1000:0"][..], "never runs as root"),
        (&["--writable", "/srv/../etc"][..], "not valid"),
        (&["--writable", "relative"][..], "not valid"),
        (&["--limit-memory", "1M"][..], "at least 4 MiB"),
    ] {
        let out = create(extra);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{extra:?}: {stderr}");
    }
    let out = create(&["--limit-cpu", "0"]);
    assert!(!out.status.success(), "a CPU limit of 0 accepted");
    assert!(lab.meshctl(&["service", "ls"]).lines().all(|l| !l.starts_with("svc")));
}

#[test]
fn a_secret_is_its_workloads_alone_and_never_on_the_nodes_disk() {
    let lab = Lab::start(3);
    let on3 = format!("node.id=={}", lab.node_id(3));
    lab.meshctl(&["network", "create", "front", "--subnet", "10.49.0.0/24"]);
    let value = format!("s3cr3t-{}-value", std::process::id());
    let file = lab.work.path().join("token.txt");
    std::fs::write(&file, &value).unwrap();
    lab.meshctl(&["secret", "create", "token", file.to_str().unwrap()]);
    std::fs::remove_file(&file).unwrap();
    let out = lab.work.path().join("secret-out");
    std::fs::create_dir(&out).unwrap();
    std::fs::set_permissions(&out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = out.display();
    // The reader records what it sees; a neighbour on the same host looks for it everywhere.
    let reader = format!(
        "cat /run/secrets/token > {o}/read; stat -c '%a %u' /run/secrets/token > {o}/mode; \
         touch /run/secrets/x 2> {o}/write-error; exec sleep 1000"
    );
    // (It looks for the value's prefix: the whole value in its command would be in meshd's log.)
    let nosy_out = lab.work.path().join("nosy-out");
    std::fs::create_dir(&nosy_out).unwrap();
    std::fs::set_permissions(&nosy_out, std::fs::Permissions::from_mode(0o777)).unwrap();
    let n = nosy_out.display();
    let nosy = format!(
        "(ls /run/secrets; ls /run/meshd/secrets; cat /run/meshd/secrets/*/token; \
          grep -rs s3cr3t- /proc/*/environ /run /dev/shm) > {n}/nosy 2>&1; echo done >> {n}/nosy; exec sleep 1000"
    );
    for (name, command, secret, dir) in [("reader", &reader, true, &out), ("nosy", &nosy, false, &nosy_out)] {
        let mut args = vec!["service", "create", name, "--network", "front", "--constraint", &on3];
        args.extend(["--writable", dir.to_str().unwrap(), "--command", command]);
        if secret {
            args.extend(["--secret", "token"]);
        }
        lab.meshctl(&args);
    }
    lab.wait("the reader's record", || out.join("mode").exists() && out.join("read").exists());
    lab.wait("the neighbour's record", || {
        std::fs::read_to_string(nosy_out.join("nosy")).is_ok_and(|t| t.contains("done"))
    });
    assert_eq!(std::fs::read_to_string(out.join("read")).unwrap(), value);
    let reader_ns = lab.workload(3, "reader", 1);
    let reader_pid = process(&lab, &reader_ns, "sleep").expect("the reader");
    let uid = status_field(reader_pid, "Uid").split_whitespace().next().unwrap().to_owned();
    assert_eq!(std::fs::read_to_string(out.join("mode")).unwrap().trim(), format!("400 {uid}"));
    let write = std::fs::read_to_string(out.join("write-error")).unwrap();
    assert!(write.contains("Read-only file system") || write.contains("Permission denied"), "{write}");
    let nosy = std::fs::read_to_string(nosy_out.join("nosy")).unwrap();
    assert!(!nosy.contains(&value), "the neighbour read the secret: {nosy}");
    assert!(nosy.contains("No such file or directory"), "{nosy}");

    // On the host it lives on a tmpfs only; no file of the lab (node, manager, logs) holds it.
    let mounted = std::fs::read_to_string("/proc/self/mounts").unwrap();
    let dir = format!("/run/meshd/secrets/{reader_ns}");
    assert!(mounted.lines().any(|l| l.starts_with("tmpfs ") && l.contains(&dir)), "{dir} is not a tmpfs");
    let needle = value.as_bytes();
    for path in walk(&lab.work.path().join("lab")) {
        let content = std::fs::read(&path).unwrap_or_default();
        assert!(!content.windows(needle.len()).any(|w| w == needle), "{} holds the secret", path.display());
    }
    // Removed with its endpoint.
    lab.meshctl(&["service", "rm", "reader"]);
    lab.wait("the secret's tmpfs to go", || {
        !std::fs::read_to_string("/proc/self/mounts").unwrap().contains(&dir) && !Path::new(&dir).exists()
    });
}

/// Every file under `dir` (sockets and the like read as empty).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => files.extend(walk(&path)),
            Ok(t) if t.is_file() => files.push(path),
            _ => {}
        }
    }
    files
}

#[test]
fn what_a_workload_writes_is_kept_on_its_node_and_shown_to_admins() {
    let lab = Lab::start(3);
    let on = |i: usize| format!("node.id=={}", lab.node_id(i));
    lab.meshctl(&["network", "create", "front", "--subnet", "10.46.0.0/24"]);
    // Written across a restart (the mark is kept in a path it may write), on both streams; the
    // last line a moment after the others.
    let dir = lab.work.path().join("chatty");
    std::fs::create_dir(&dir).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let command = format!(
        "echo one; echo two; echo oops >&2; sleep 0.3; echo three; \
         [ -e {d}/again ] || {{ touch {d}/again; exit 3; }}; exec sleep 1000",
        d = dir.display()
    );
    let on3 = on(3);
    let dir_arg = dir.to_str().unwrap();
    lab.meshctl(&[
        "service",
        "create",
        "chatty",
        "--network",
        "front",
        "--constraint",
        &on3,
        "--writable",
        dir_arg,
        "--command",
        &command,
    ]);
    let logs = |args: &[&str]| {
        let mut all = vec!["service", "logs", "chatty"];
        all.extend(args);
        lab.meshctl(&all)
    };
    // The second run finds the mark and stays.
    lab.wait("both runs' output", || logs(&[]).matches("chatty.1 | three").count() == 2);
    let all = logs(&[]);
    let lines: Vec<&str> = all.lines().collect();
    assert_eq!(lines.iter().filter(|l| **l == "chatty.1 | one").count(), 2, "{all}");
    assert!(lines.contains(&"chatty.1 | oops"), "stderr is kept too: {all}");
    let one = lines.iter().position(|l| *l == "chatty.1 | one").unwrap();
    let three = lines.iter().position(|l| *l == "chatty.1 | three").unwrap();
    assert!(one < three, "oldest first: {all}");
    assert_eq!(logs(&["--tail", "1"]).trim(), "chatty.1 | three");
    assert!(logs(&["--since", "1h"]).contains("chatty.1 | one"));
    // Kept across the restart by meshd, which also told control how the first run ended.
    let ps: serde_json::Value =
        serde_json::from_str(&lab.meshctl(&["service", "ps", "chatty", "--format", "json"])).unwrap();
    assert_eq!(ps[0]["restarts"], 1, "{ps}");
    assert_eq!(ps[0]["last_exit"], "exit 3", "{ps}");
    // A service that does not exist is a clear error; the output goes with the endpoint.
    let missing = lab.meshctl_output(&["service", "logs", "nope"]);
    assert!(
        !missing.status.success() && String::from_utf8_lossy(&missing.stderr).contains("no service named")
    );
    lab.meshctl(&["service", "rm", "chatty"]);
}
