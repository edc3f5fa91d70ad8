//! The binaries as a new user meets them: `--version` on each, meshctl's shell completions and
//! man pages, written without a cluster.

use std::process::Command;

use mesh_tests::lab::bin_dir;

fn run(binary: &str, args: &[&str]) -> std::process::Output {
    Command::new(bin_dir().join(binary)).args(args).output().unwrap()
}

#[test]
fn every_binary_says_its_version() {
    for binary in ["meshctl", "meshd", "mesh-control"] {
        let out = run(binary, &["--version"]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains(env!("CARGO_PKG_VERSION")), "{binary}: {text}");
    }
}

#[test]
fn meshctl_writes_completions_and_man_pages() {
    for shell in ["bash", "zsh", "fish"] {
        let out = run("meshctl", &["completion", shell]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{shell}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(
            text.contains("rollback") && text.contains("spec-key"),
            "{shell} completion lacks subcommands"
        );
    }
    let bad = run("meshctl", &["completion", "tcsh"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("possible values: bash"));
    let dir = tempfile::tempdir().unwrap();
    let out = run("meshctl", &["man", "--dir", dir.path().to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let page = std::fs::read_to_string(dir.path().join("meshctl-service-update.1")).unwrap();
    assert!(page.contains("update\\-parallelism"), "the page documents the flags");
    assert!(dir.path().join("meshctl.1").exists());
}

/// The daemons' configuration files: each key is a flag, used as the flag would be (the state
/// directory a run opens), shown with its origin by `--print-config`; the command line and the
/// environment win over the file; a bad key or value is named by file and line.
#[test]
fn the_daemons_read_their_configuration_files() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let file = dir.path().join("meshd.toml");
    let text = format!(
        "# a node\nstate-dir = \"{}\"\nno-dataplane = true\ndns-visibility = \"policy\"\nmetrics = \"off\"\n",
        state.display()
    );
    std::fs::write(&file, text).unwrap();
    let config = file.to_str().unwrap();
    let shown = run("meshd", &["run", "--config", config, "--print-config", "--netns-prefix", "x"]);
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.status.success(), "{}", String::from_utf8_lossy(&shown.stderr));
    let line = |key: &str| text.lines().find(|l| l.starts_with(key)).unwrap_or_default().to_owned();
    assert!(line("state-dir").ends_with(&format!("{config}:2")), "{text}");
    assert!(line("dns-visibility = \"policy\"").ends_with(&format!("{config}:4")), "{text}");
    assert!(line("netns-prefix = \"x\"").ends_with("command line"), "{text}");
    assert!(line("# underlay (not set)").ends_with("default"), "{text}");
    // Used, not only shown: the run opens the file's state directory (and finds no node in it).
    let out = run("meshd", &["--config", config, "run"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&state.display().to_string()), "{err}");
    // The environment names the file too, and a flag wins over it.
    let out = Command::new(bin_dir().join("meshd"))
        .args(["run", "--print-config", "--state-dir", "/elsewhere"])
        .env("MESHD_CONFIG", config)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("state-dir = \"/elsewhere\"") && text.contains("no-dataplane = true"), "{text}");

    // Refused, by file and line: a key no flag has, a value no flag takes, a file not there.
    let refused = |binary: &str, text: &str| {
        std::fs::write(&file, text).unwrap();
        let out = run(binary, &["run", "--config", config, "--print-config"]);
        assert!(!out.status.success(), "{binary} took {text:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = refused("meshd", "metrics = \"off\"\nstate_dir = \"/x\"\n");
    assert!(
        err.contains(&format!("{config}:2: unknown key `state_dir`")) && err.contains("state-dir,"),
        "{err}"
    );
    let err = refused("meshd", "\ndns-visibility = \"everything\"\n");
    assert!(err.contains(&format!("{config}:2")) && err.contains("possible values: all, policy"), "{err}");
    let err = refused("meshd", "no-dataplane = 1\n");
    assert!(err.contains("is true or false"), "{err}");
    let err = refused("mesh-control", "state-dir = \"/x\"\nkey-rotation = \"soon\"\n");
    assert!(err.contains(&format!("{config}:2")) && err.contains("not a duration"), "{err}");
    let err = refused("mesh-control", "state-dir = \"/x\"\nlisten = \"0.0.0.0:7400\"\n");
    assert!(err.contains("unknown key `listen`"), "{err}");
    let out = run("meshd", &["run", "--config", "/nonexistent/meshd.toml"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/meshd.toml"));

    // mesh-control: the required state directory from the file, used by the run.
    std::fs::write(&file, format!("state-dir = \"{}\"\nkey-rotation = \"6h\"\n", state.display())).unwrap();
    let out = run("mesh-control", &["run", "--config", config, "--print-config"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("key-rotation = \"6h\"") && text.contains("down-after = \"15s\""), "{text}");
    let out = run("mesh-control", &["run", "--config", config]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&state.display().to_string()), "{err}");
}

/// The repository's root (the shipped units and configuration files live in `packaging/`).
fn packaging(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging").join(path)
}

/// The shipped configuration files name every key of their command (commented out where the
/// default holds) and read as they are; the systemd units pass `systemd-analyze verify` without
/// a warning (their ExecStart pointed at this build's binaries).
#[test]
fn the_shipped_units_and_configuration_files_hold() {
    for (binary, file) in [("meshd", "etc/mesh/meshd.toml"), ("mesh-control", "etc/mesh/mesh-control.toml")] {
        let path = packaging(file);
        let out = run(binary, &["run", "--config", path.to_str().unwrap(), "--print-config"]);
        assert!(out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stderr));
        let shipped = std::fs::read_to_string(&path).unwrap();
        for line in String::from_utf8_lossy(&out.stdout).lines().filter(|l| !l.starts_with("# config")) {
            let key = line.trim_start_matches("# ").split([' ', '=']).next().unwrap();
            let named = shipped.lines().any(|l| l.trim_start_matches('#').starts_with(&format!("{key} =")));
            assert!(named, "{file} does not name `{key}`");
        }
    }
    let analyze = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        analyze.is_ok_and(|o| o.status.success()),
        "systemd-analyze is missing: install systemd (scripts/test.sh does)"
    );
    let dir = tempfile::tempdir().unwrap();
    for (unit, binary) in [("mesh-control.service", "mesh-control"), ("meshd.service", "meshd")] {
        let text = std::fs::read_to_string(packaging(&format!("systemd/{unit}"))).unwrap();
        assert!(text.contains(&format!("ExecStart=/usr/bin/{binary} run")), "{unit}");
        assert!(text.contains("Type=notify") && text.contains("Restart=on-failure"), "{unit}");
        let here = text.replace(&format!("/usr/bin/{binary}"), &bin_dir().join(binary).display().to_string());
        let path = dir.path().join(unit);
        std::fs::write(&path, here).unwrap();
        let out = Command::new("systemd-analyze").args(["verify", "--man=no"]).arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && !err.contains(unit), "{unit}: {err}");
    }
}

/// `mesh-control` tells systemd it is ready once it serves, and that it stops (`Type=notify`).
#[test]
fn mesh_control_notifies_systemd_when_it_serves_and_when_it_stops() {
    use std::os::unix::net::UnixDatagram;
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("notify");
    let listener = UnixDatagram::bind(&socket).unwrap();
    listener.set_read_timeout(Some(std::time::Duration::from_secs(30))).unwrap();
    let port = (0..2000u16)
        .map(|i| 21_000 + (std::process::id() as u16 % 5000) + i)
        .find(|&p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
        .expect("a free port");
    let listen = format!("127.0.0.1:{port}");
    let mut child = Command::new(bin_dir().join("mesh-control"))
        .args([
            "init",
            "--run",
            "--metrics",
            "off",
            "--listen",
            &listen,
            "--advertise",
            &listen,
            "--state-dir",
        ])
        .arg(dir.path().join("state"))
        .arg("--admin-dir")
        .arg(dir.path().join("admin"))
        .env("NOTIFY_SOCKET", &socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).unwrap())
        .spawn()
        .unwrap();
    let mut buffer = [0u8; 512];
    let pid = child.id();
    let mut receive = || {
        let n = listener.recv(&mut buffer).unwrap_or_else(|e| {
            let log = std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .map(|t| std::fs::read_to_string(t.path().join("wchan")).unwrap_or_default())
                .collect();
            panic!("no notification: {e}\nprocess: {stat}\nthreads waiting in: {threads:?}\n{log}")
        });
        String::from_utf8_lossy(&buffer[..n]).into_owned()
    };
    let ready = receive();
    assert!(ready.contains("READY=1") && ready.contains("STATUS=serving cluster"), "{ready}");
    // Ready means serving: the API answers.
    assert!(std::net::TcpStream::connect(&listen).is_ok(), "not listening once ready");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGTERM)
        .unwrap();
    assert_eq!(receive(), "STOPPING=1");
    assert!(child.wait().unwrap().success());
}

/// meshctl's output conventions against a lab: YAML beside JSON and tables, `-q` for names
/// only, nodes named by a unique start of their ID (an ambiguous or unknown one refused).
#[test]
fn meshctl_prints_yaml_and_quiet_listings_and_takes_id_prefixes() {
    let lab = mesh_tests::lab::Lab::start(2);
    lab.meshctl(&["network", "create", "front", "--subnet", "10.57.0.0/24"]);
    lab.meshctl(&["service", "create", "api", "--network", "front", "--port", "80/http"]);
    let ids = [lab.manager_id(1).expect("the manager's ID"), lab.node_id(2)];
    let quiet = lab.meshctl(&["node", "ls", "-q"]);
    let mut listed: Vec<&str> = quiet.lines().collect();
    listed.sort();
    let mut expected: Vec<&str> = ids.iter().map(String::as_str).collect();
    expected.sort();
    assert_eq!(listed, expected);
    assert_eq!(lab.meshctl(&["service", "ls", "-q"]), "api\n");
    assert_eq!(lab.meshctl(&["network", "ls", "--quiet"]), "front\n");
    lab.wait("api's endpoint to be placed", || lab.meshctl(&["service", "ps", "api", "-q"]) == "api.1\n");

    // YAML says what JSON says, for listings and inspects.
    for args in [
        &["service", "ls"][..],
        &["service", "inspect", "api"],
        &["service", "ps", "api"],
        &["network", "inspect", "front"],
        &["node", "ls"],
        &["secret", "ls"],
    ] {
        let json: serde_json::Value =
            serde_json::from_str(&lab.meshctl(&[args, &["--format", "json"]].concat())).unwrap();
        let yaml = lab.meshctl(&[args, &["--format", "yaml"]].concat());
        let read: serde_json::Value =
            serde_yaml::from_str(&yaml).unwrap_or_else(|e| panic!("{args:?}: {e}\n{yaml}"));
        if args[1] == "ls" && args[0] == "node" {
            // Times of the moment (last seen) move between the two calls.
            assert_eq!(read.as_array().map(Vec::len), json.as_array().map(Vec::len), "{yaml}");
        } else {
            assert_eq!(read, json, "{args:?}:\n{yaml}");
        }
    }
    let yaml = lab.meshctl(&["service", "inspect", "api", "--format", "yaml"]);
    assert!(yaml.contains("\nname: api\n") && !yaml.contains('{'), "{yaml}");

    // A unique start of an ID, or a host name, names its node.
    let id = &ids[1];
    let unique = (1..id.len())
        .map(|n| &id[..n])
        .find(|p| ids.iter().filter(|i| i.starts_with(p)).count() == 1)
        .unwrap();
    let shown: serde_json::Value = serde_json::from_str(&lab.meshctl(&["node", "inspect", unique])).unwrap();
    assert_eq!(shown["id"], id.as_str());
    let hostname = shown["hostname"].as_str().unwrap().to_owned();
    let by_name: serde_json::Value =
        serde_json::from_str(&lab.meshctl(&["node", "inspect", &hostname])).unwrap();
    assert_eq!(by_name["id"], id.as_str());
    let out = lab.meshctl(&["node", "update", unique, "--label-add", "zone=a"]);
    assert!(out.contains(id.as_str()) && out.contains("zone=a"), "{out}");
    let unknown = lab.meshctl_output(&["node", "inspect", "zzzz-no-such-node"]);
    assert!(!unknown.status.success());
}
