//! Service specs signed by the operator, as root in a lab whose nodes pinned the operator's
//! spec-signing key when they joined: a signed service runs and serves; one created without the
//! key (what a manager could make on its own), or signed by another key, never runs, and its
//! node says why; an unsigned update of a signed service stops rather than run, and a rollback
//! to the signed version brings it back.

use std::path::Path;
use std::process::Command;

use mesh_api::client::{AdminClient, ClientError};
use mesh_api::proto::{ServiceView, pb};
use mesh_tests::lab::{Lab, SERVE_V, WEB_READS_API, bin_dir, in_namespace};

/// `meshctl spec-key create --dir DIR`: the public key it printed.
fn spec_key(dir: &Path) -> String {
    let out = Command::new(bin_dir().join("meshctl"))
        .args(["spec-key", "create", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// (state, last exit) of endpoint 1 of `service`, as `service ps` shows it.
fn state(lab: &Lab, service: &str) -> (String, String) {
    let json: serde_json::Value =
        serde_json::from_str(&lab.meshctl(&["service", "ps", service, "--format", "json"])).unwrap();
    let e = &json[0];
    (
        e["state"].as_str().unwrap_or_default().to_owned(),
        e["last_exit"].as_str().unwrap_or_default().to_owned(),
    )
}

/// A request to the admin API made by hand, from the admin host: what an admin without the
/// spec-signing key (or a manager) can send, such as a document the operator signed earlier.
fn admin<T: Send>(
    lab: &Lab,
    call: impl AsyncFnOnce(&mut AdminClient) -> Result<T, ClientError> + Send,
) -> Result<T, ClientError> {
    let bundle = mesh_api::bundle::AdminBundle::load(&lab.admin_dir()).expect("the admin bundle");
    in_namespace(&lab.host(lab.admin_host()), || {
        tokio::runtime::Runtime::new().unwrap().block_on(async {
            let mut client = AdminClient::connect(&bundle).await?;
            call(&mut client).await
        })
    })
}

fn inspect(lab: &Lab, name: &str) -> ServiceView {
    admin(lab, async |c| c.inspect_service(name).await).unwrap()
}

/// Replays `spec` as service `name`'s definition, with environment `env` (what it signed).
fn replay(
    lab: &Lab,
    name: &str,
    spec: &mesh_api::specs::SignedSpec,
    env: &str,
) -> Result<ServiceView, ClientError> {
    let request = pb::UpdateServiceRequest {
        name: name.into(),
        env_add: vec![env.into()],
        signed: Some(pb::SignedSpec { document: spec.document.clone(), signature: spec.signature.clone() }),
        options: Some(pb::UpdateOptions { monitor_secs: 1, ..Default::default() }),
        ..Default::default()
    };
    admin(lab, async move |c| c.update_service(request).await)
}

fn curl(lab: &Lab, ns: &str) -> Option<String> {
    let out = lab.exec(ns, &["curl", "-sS", "-f", "-m", "3", "http://api/"]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn a_node_runs_only_what_the_operator_signed() {
    let keys = tempfile::tempdir().unwrap();
    let operator = keys.path().join("operator");
    let other = keys.path().join("other");
    let public = spec_key(&operator);
    spec_key(&other);
    assert!(public.starts_with("MESHSPEC-ED25519-1 "), "{public}");
    let pinned = operator.join("spec-signing.pub");
    let mut lab = Lab::start_joining(3, 1, &[], &["--spec-key", pinned.to_str().unwrap()]);
    let signing = operator.join("spec-signing.key");
    let signed = |args: &[&str]| lab.meshctl(&[&["--spec-key", signing.to_str().unwrap()], args].concat());
    let on = |i: usize| format!("node.id=={}", lab.node_id(i));

    lab.meshctl(&["network", "create", "front", "--subnet", "10.49.0.0/24"]);
    // A service without a command runs nothing: no signature needed.
    lab.meshctl(&["service", "create", "web", "--network", "front", "--constraint", &on(2)]);
    let out = signed(&[
        "service",
        "create",
        "api",
        "--network",
        "front",
        "--port",
        "80/http",
        "--constraint",
        &on(3),
        "--command",
        SERVE_V,
        "--env",
        "V=signed",
    ]);
    assert!(out.contains("its spec signed"), "{out}");
    lab.apply_policy(WEB_READS_API);
    let web = lab.workload(2, "web", 1);
    lab.wait("the signed service to serve", || {
        curl(&lab, &web).as_deref() == Some("signed") && state(&lab, "api").0 == "running"
    });
    let s: serde_json::Value = serde_json::from_str(&lab.meshctl(&["service", "inspect", "api"])).unwrap();
    assert_eq!(s["signed"], true);
    let first = inspect(&lab, "api").spec.expect("the signed spec");

    // Made without the key (all a manager could do), or signed by a key the nodes did not pin:
    // never started, and the node says why — in service ps and in meshd status.
    lab.meshctl(&[
        "service",
        "create",
        "rogue",
        "--network",
        "front",
        "--constraint",
        &on(3),
        "--command",
        "sleep 1000",
    ]);
    let forged_key = other.join("spec-signing.key");
    lab.meshctl(&[
        "--spec-key",
        forged_key.to_str().unwrap(),
        "service",
        "create",
        "forged",
        "--network",
        "front",
        "--constraint",
        &on(3),
        "--command",
        "sleep 1000",
    ]);
    lab.wait("the rogue services to be refused", || {
        state(&lab, "rogue").0 == "unsigned" && state(&lab, "forged").0 == "bad-signature"
    });
    assert!(state(&lab, "forged").1.contains("does not verify"), "{:?}", state(&lab, "forged"));
    for rogue in ["rogue", "forged"] {
        let ns = lab.workload(3, rogue, 1);
        assert!(!lab.namespaces().contains(&ns), "{rogue} got a namespace: its workload was built");
    }
    let status = lab.status(3);
    let endpoints = status["endpoints"].as_array().unwrap();
    let rogue = endpoints.iter().find(|e| e["service"] == "rogue").expect("rogue in meshd status");
    assert_eq!(rogue["state"], "unsigned");
    assert!(rogue["reason"].as_str().unwrap().contains("not signed"), "{rogue}");

    // meshctl signs an update only on top of a version its key signed: never on what a
    // manager says the service runs.
    let out = lab.meshctl_output(&[
        "--spec-key",
        signing.to_str().unwrap(),
        "service",
        "update",
        "rogue",
        "--env",
        "A=1",
    ]);
    assert!(!out.status.success(), "signed an update of an unsigned service");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not signed"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Secrets: their bytes are signed, as the operator sent them; one this operator did not
    // make (no digest recorded beside the key) is not signed.
    let secret = keys.path().join("token");
    std::fs::write(&secret, "s3cret").unwrap();
    signed(&["secret", "create", "token", secret.to_str().unwrap()]);
    lab.meshctl(&["secret", "create", "other", secret.to_str().unwrap()]);
    signed(&[
        "service",
        "create",
        "reader",
        "--network",
        "front",
        "--constraint",
        &on(3),
        "--secret",
        "token",
        "--command",
        "test \"$(cat /run/secrets/token)\" = s3cret && sleep 1000",
    ]);
    lab.wait("the signed reader of a secret to run", || state(&lab, "reader").0 == "running");
    let out = lab.meshctl_output(&[
        "--spec-key",
        signing.to_str().unwrap(),
        "service",
        "create",
        "other-reader",
        "--network",
        "front",
        "--secret",
        "other",
        "--command",
        "sleep 1000",
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no digest recorded"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // An update without the key is refused for a signed service, unless --unsigned (what a
    // manager could make on its own): the node stops the old workload rather than run the new
    // one, and the update pauses; a rollback to the signed version (its signature kept with
    // it) serves again.
    let out = lab.meshctl_output(&["service", "update", "api", "--env", "V=evil"]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("--unsigned"));
    let out = lab.meshctl_output(&[
        "service",
        "update",
        "api",
        "--env",
        "V=evil",
        "--unsigned",
        "--update-monitor",
        "1s",
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("unsigned"), "{err}");
    assert_ne!(curl(&lab, &web).as_deref(), Some("evil"));
    let out = lab.meshctl(&["service", "rollback", "api", "--update-monitor", "1s"]);
    assert!(out.contains("every endpoint runs version 0"), "{out}");
    lab.wait("the signed version to serve again", || curl(&lab, &web).as_deref() == Some("signed"));

    // With the key, the same update is signed and rolls out.
    let out = signed(&["service", "update", "api", "--env", "V=two", "--update-monitor", "1s"]);
    assert!(out.contains("every endpoint runs version"), "{out}");
    lab.wait("the signed update to serve", || curl(&lab, &web).as_deref() == Some("two"));

    // Replays: the first signed version sent again, with its genuine signature, by hand. Control
    // refuses it while the current version says it is replaced; once a rollback returns to a
    // version that still allows it, control lets it through, and the node, which saw the newer
    // one, refuses it — also after a restart.
    signed(&["service", "update", "api", "--env", "V=three", "--update-monitor", "1s"]);
    lab.wait("the third signed version to serve", || curl(&lab, &web).as_deref() == Some("three"));
    let refused = replay(&lab, "api", &first, "V=signed").unwrap_err().to_string();
    assert!(refused.contains("replay"), "{refused}");
    let out = lab.meshctl(&["service", "rollback", "api", "--update-monitor", "1s"]);
    assert!(out.contains("every endpoint runs version"), "{out}");
    lab.wait("the rollback to serve", || curl(&lab, &web).as_deref() == Some("two"));
    replay(&lab, "api", &first, "V=signed").expect("control takes what the current version allows");
    lab.wait("the replay to be refused", || state(&lab, "api").0 == "replayed");
    assert!(state(&lab, "api").1.contains("a replay"), "{:?}", state(&lab, "api"));
    assert_ne!(curl(&lab, &web).as_deref(), Some("signed"));
    lab.stop_meshd(3);
    lab.start_meshd(3);
    lab.wait("the replay to be refused after a restart", || {
        let status = lab.meshd_status(3).unwrap_or_default();
        let endpoints = status["endpoints"].as_array().cloned().unwrap_or_default();
        endpoints.iter().any(|e| e["service"] == "api" && e["state"] == "replayed")
    });
    assert_ne!(curl(&lab, &web).as_deref(), Some("signed"));
    // meshctl will not sign on top of the replayed version control now calls current (that
    // would make it new again): it is not the newest this key signed, nor what that rolls back
    // to. Rolled back to the version before, the operator's next signed update starts.
    let key = signing.to_str().unwrap();
    let out = lab.meshctl_output(&["--spec-key", key, "service", "update", "api", "--env", "V=four"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("may be replaying"), "{err}");
    lab.meshctl(&["service", "rollback", "api", "--update-monitor", "1s"]);
    lab.wait("the version before the replay to serve", || curl(&lab, &web).as_deref() == Some("two"));
    lab.meshctl(&[
        "--spec-key",
        key,
        "service",
        "update",
        "api",
        "--env",
        "V=four",
        "--update-monitor",
        "1s",
    ]);
    lab.wait("a new signed version to serve", || curl(&lab, &web).as_deref() == Some("four"));

    // The pinned key is the node's own: joining again over it, or a key file that is not one,
    // is refused.
    let again = lab
        .in_host(3, "meshd")
        .args(["join", "--control", "127.0.0.1:1", "--token", "x", "--state-dir"])
        .arg(lab.node_dir(3))
        .args(["--spec-key", &other.join("spec-signing.pub").display().to_string()])
        .output()
        .unwrap();
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("already holds a joined node"));
    assert_eq!(std::fs::read_to_string(lab.node_dir(3).join("spec-signing.pub")).unwrap().trim(), public);
}
