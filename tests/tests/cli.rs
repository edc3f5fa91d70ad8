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
