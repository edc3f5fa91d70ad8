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
