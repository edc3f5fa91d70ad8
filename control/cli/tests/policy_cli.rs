//! `meshctl policy test` and `meshctl policy explain --file`: local, no cluster.

use std::process::Command;

fn meshctl(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_meshctl"))
        .args(args)
        .env_remove("MESHCTL_ADMIN")
        .output()
        .expect("meshctl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

fn example() -> String {
    format!("{}/../../examples/policy.toml", env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn policy_test_runs_the_files_tests_without_a_cluster() {
    let (ok, out) = meshctl(&["policy", "test", &example()]);
    assert!(ok, "{out}");
    assert!(out.contains("7 rule(s), 9 test(s), 9 passed, 0 failed"), "{out}");

    let dir = tempfile::tempdir().unwrap();
    let failing = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(example())
        .unwrap()
        .replace("expect = \"deny\"\n\n[[test]]", "expect = \"allow\"\n\n[[test]]");
    std::fs::write(&failing, text).unwrap();
    let (ok, out) = meshctl(&["policy", "test", failing.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("FAIL") && out.contains("expected allow, got deny by default"), "{out}");

    let broken = dir.path().join("broken.toml");
    std::fs::write(&broken, "[[rule]]\nname = \"x\"\naction = \"permit\"\nfrom = [\"a\"]\nto = [\"b\"]\n")
        .unwrap();
    let (ok, out) = meshctl(&["policy", "test", broken.to_str().unwrap()]);
    assert!(!ok);
    assert!(out.contains("broken.toml:3:10: unknown action `permit`"), "{out}");
}

#[test]
fn explain_names_the_verdict_and_the_rule_behind_it() {
    let file = example();
    let (ok, out) = meshctl(&[
        "policy",
        "explain",
        "--file",
        &file,
        "--from",
        "web",
        "--to",
        "api",
        "--port",
        "80",
        "DELETE",
        "/v1/items/7",
        "-H",
        "x-role: admin",
        "-H",
        "X-Debug: 1",
    ]);
    assert!(ok, "{out}");
    assert!(
        out.contains("web -> api:80 DELETE /v1/items/7: allow by rule `admins-change-items` (line 13)"),
        "{out}"
    );
    assert!(out.contains("dry run: rule `watch-debug-headers` (line 39) would deny"), "{out}");
    let (_, out) =
        meshctl(&["policy", "explain", "--file", &file, "--from", "web", "--to", "db", "--port", "5432"]);
    assert!(out.contains("web -> db:5432 (tcp): deny by default"), "{out}");
}
