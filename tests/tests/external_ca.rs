//! An external CA, as root in a lab: a real `cfssl serve` (Debian's golang-cfssl) in host 1
//! signs every certificate of a cluster of two managers and two meshd hosts. Joins, renewals,
//! workload certificates and admin credentials all come from it; no manager file or state holds
//! a CA key; a signer that is away is said so, and nothing is lost; a signer that lies (another
//! root's certificate, a wrong auth key) is refused.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use mesh_api::ids::ClusterId;
use mesh_api::pki::CertInfo;
use mesh_api::trust::Trust;
use mesh_tests::lab::Lab;

const PORT: &str = "8888";
const AUTH_KEY: &str = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// A CFSSL root named for `cluster` (its O), made with `cfssl gencert -initca` in `dir`:
/// (certificate, key) files.
fn make_root(dir: &Path, name: &str, organization: &str) -> (PathBuf, PathBuf) {
    let csr = dir.join(format!("{name}-csr.json"));
    let request = serde_json::json!({
        "CN": format!("{name} external root"),
        "key": {"algo": "ecdsa", "size": 256},
        "names": [{"O": organization, "OU": "mesh-ca"}],
    });
    std::fs::write(&csr, request.to_string()).unwrap();
    let out = Command::new("cfssl")
        .args(["gencert", "-initca"])
        .arg(&csr)
        .output()
        .unwrap_or_else(|e| panic!("cfssl: {e} (install Debian's golang-cfssl; scripts/test.sh does)"));
    assert!(out.status.success(), "cfssl gencert: {}", String::from_utf8_lossy(&out.stderr));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}-key.pem")));
    std::fs::write(&cert, made["cert"].as_str().unwrap()).unwrap();
    std::fs::write(&key, made["key"].as_str().unwrap()).unwrap();
    std::fs::write(dir.join(format!("{name}.csr")), made["csr"].as_str().unwrap()).unwrap();
    (cert, key)
}

/// A CFSSL signing config: the profiles the managers ask for, each authenticated with `key`.
fn config(dir: &Path, name: &str, key: &str) -> PathBuf {
    config_open(dir, name, key, None)
}

/// As [`config`], the profile `open` (`default` for the default one) without an auth key.
fn config_open(dir: &Path, name: &str, key: &str, open: Option<&str>) -> PathBuf {
    let profile = |name: &str, expiry: &str| {
        let mut p = serde_json::json!({
            "auth_key": "mesh",
            "expiry": expiry,
            "usages": ["digital signature", "server auth", "client auth"],
        });
        if open == Some(name) {
            p.as_object_mut().unwrap().remove("auth_key");
        }
        p
    };
    let config = serde_json::json!({
        "signing": {
            "default": profile("default", "1h"),
            "profiles": {
                "node": profile("node", "24h"),
                "workload": profile("workload", "1h"),
                "admin": profile("admin", "720h"),
            },
        },
        "auth_keys": {"mesh": {"type": "standard", "key": key}},
    });
    let path = dir.join(format!("{name}-config.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    path
}

/// The root `name` (made by [`make_root`] in `dir`) cross-signed by `by`, with `cfssl sign`
/// as an operator would: what lets nodes that trust `by` take it.
fn cross_sign(dir: &Path, name: &str, by: &(PathBuf, PathBuf)) -> PathBuf {
    let config = dir.join("cross-config.json");
    let profile = serde_json::json!({"signing": {"default": {
        "expiry": "87600h",
        "usages": ["cert sign", "crl sign"],
        "ca_constraint": {"is_ca": true, "max_path_len": 0, "max_path_len_zero": true},
    }}});
    std::fs::write(&config, profile.to_string()).unwrap();
    let out = Command::new("cfssl")
        .arg("sign")
        .arg("-ca")
        .arg(&by.0)
        .arg("-ca-key")
        .arg(&by.1)
        .arg("-config")
        .arg(&config)
        .arg(dir.join(format!("{name}.csr")))
        .output()
        .unwrap();
    assert!(out.status.success(), "cfssl sign: {}", String::from_utf8_lossy(&out.stderr));
    let made: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let by_name = by.0.file_stem().unwrap().to_str().unwrap();
    let path = dir.join(format!("{name}-by-{by_name}.pem"));
    std::fs::write(&path, made["cert"].as_str().unwrap()).unwrap();
    path
}

/// `cfssl serve` in host 1, signing with `root` under `config`; killed when dropped.
struct Signer {
    child: Child,
    log: PathBuf,
}

impl Signer {
    /// `cfssl serve` on this machine's loopback, at a free port: (signer, URL).
    fn on_loopback(root: &(PathBuf, PathBuf), config: &Path, log: PathBuf) -> (Signer, String) {
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port().to_string();
        let signer = Signer::spawn(Command::new("cfssl"), "127.0.0.1", &port, root, config, log);
        signer.wait_up(|| std::net::TcpStream::connect(format!("127.0.0.1:{port}")).is_ok());
        (signer, format!("http://127.0.0.1:{port}"))
    }

    fn start(lab: &meshctl::lab::Lab, root: &(PathBuf, PathBuf), config: &Path, log: PathBuf) -> Signer {
        Signer::start_at(lab, PORT, root, config, log)
    }

    /// `cfssl serve` in host 1 on its lab address and `port`.
    fn start_at(
        lab: &meshctl::lab::Lab,
        port: &str,
        root: &(PathBuf, PathBuf),
        config: &Path,
        log: PathBuf,
    ) -> Signer {
        let address = lab.addr(1);
        let signer = Signer::spawn(lab.exec(&lab.host(1), &["cfssl"]), &address, port, root, config, log);
        let url = format!("http://{address}:{port}/api/v1/cfssl/info");
        signer.wait_up(|| {
            lab.exec(&lab.host(1), &["curl", "-sS", "-f", "-m", "2", "-d", "{}", &url])
                .output()
                .is_ok_and(|o| o.status.success())
        });
        signer
    }

    /// `cfssl` (the command, maybe in a namespace) run as `serve` on `address:port`, its output
    /// in `log`.
    fn spawn(
        mut cfssl: Command,
        address: &str,
        port: &str,
        root: &(PathBuf, PathBuf),
        config: &Path,
        log: PathBuf,
    ) -> Signer {
        let out = std::fs::File::create(&log).unwrap();
        let child = cfssl
            .args(["serve", "-address", address, "-port", port, "-ca"])
            .arg(&root.0)
            .arg("-ca-key")
            .arg(&root.1)
            .arg("-config")
            .arg(config)
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("cfssl serve (install Debian's golang-cfssl; scripts/test.sh does)");
        Signer { child, log }
    }

    /// Waits up to 20 s for `up`; panics with the signer's log if it never holds.
    fn wait_up(&self, up: impl FnMut() -> bool) {
        let up = meshctl::lab::wait(std::time::Duration::from_secs(20), up);
        assert!(
            up,
            "cfssl serve did not come up: {}",
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// How many certificates it signed so far, as its log tells.
    fn signed(&self) -> usize {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .matches("signed certificate with serial number")
            .count()
    }
}

impl Drop for Signer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every file under `dir`, recursively.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() { out.extend(files(&path)) } else { out.push(path) }
    }
    out
}

#[test]
fn an_external_ca_signs_every_certificate_and_no_manager_holds_its_key() {
    let scratch = tempfile::tempdir().unwrap();
    let cluster = ClusterId::random();
    let root = make_root(scratch.path(), "root", cluster.as_str());
    let good = config(scratch.path(), "good", AUTH_KEY);
    let key_file = scratch.path().join("auth.key");
    std::fs::write(&key_file, AUTH_KEY).unwrap();
    let mut signer = None;
    let mut lab = Lab::start_prepared(4, 2, &[], &[], |lab| {
        signer = Some(Signer::start(lab, &root, &good, scratch.path().join("cfssl-1.log")));
        vec![
            "--external-ca".into(),
            format!("cfssl=http://{}:{PORT}", lab.addr(1)),
            "--external-ca-key".into(),
            key_file.to_str().unwrap().into(),
            "--ca-cert".into(),
            root.0.to_str().unwrap().into(),
        ]
    });
    let signer = signer.expect("the signer started");
    let root_pem = std::fs::read_to_string(&root.0).unwrap();
    let trust = Trust::from_pem(&root_pem).unwrap();
    assert_eq!(lab.cluster_id(), cluster.as_str(), "the cluster's ID is the external root's O");

    // Both managers, both meshd hosts and the admin hold certificates of the external root,
    // named by their subject alone (CFSSL 1.2 sets no URI SAN).
    let (web_host, api_host) = (3, 4);
    let mut certificates = vec![std::fs::read_to_string(lab.admin_dir().join("admin.crt")).unwrap()];
    for i in [web_host, api_host] {
        certificates.push(std::fs::read_to_string(lab.node_dir(i).join("node.crt")).unwrap());
        assert_eq!(std::fs::read_to_string(lab.node_dir(i).join("ca.crt")).unwrap(), trust.to_pem());
    }
    for i in 1..=2 {
        let dir = control::statedir::ManagerDir::new(&lab.manager_dir(i));
        certificates.push(std::fs::read_to_string(dir.manager_cert()).unwrap());
    }
    for pem in &certificates {
        trust.root_of(pem).expect("signed by the external root");
        let info = CertInfo::from_pem(pem).unwrap();
        assert!(info.uris.is_empty(), "CFSSL 1.2 sets no URI: {info:?}");
        info.holder(cluster.as_str()).expect("a holder of this cluster");
    }
    let after_joins = signer.signed();
    assert!(after_joins >= certificates.len(), "cfssl signed {after_joins} certificates");

    // Workload certificates: web reads api through the mesh, with the external root's.
    let web = lab.web_and_api("10.51.0.0/24", web_host, api_host);
    let read = |lab: &Lab| lab.web_reads_api(&web);
    lab.wait("web to read api through the mesh", || read(&lab));
    assert!(signer.signed() >= after_joins + 2, "the two workload certificates came from cfssl");

    // A renewal: a new certificate, from the signer.
    let before =
        CertInfo::from_pem(&std::fs::read_to_string(lab.node_dir(web_host).join("node.crt")).unwrap())
            .unwrap()
            .serial;
    let signed = signer.signed();
    let dir = lab.node_dir(web_host);
    let out = lab
        .in_host(web_host, "meshd")
        .args(["renew", "--state-dir", dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "meshd renew: {}", String::from_utf8_lossy(&out.stderr));
    let after = std::fs::read_to_string(dir.join("node.crt")).unwrap();
    trust.root_of(&after).unwrap();
    assert_ne!(CertInfo::from_pem(&after).unwrap().serial, before, "a new certificate");
    assert_eq!(signer.signed(), signed + 1, "signed by cfssl");

    let ca: serde_json::Value =
        serde_json::from_str(&lab.meshctl(&["cluster", "ca", "--format", "json"])).unwrap();
    assert_eq!(ca["external"], format!("http://{}:{PORT}", lab.addr(1)));
    assert_eq!(ca["roots"][0]["digest"], trust.newest().digest.as_str());
    assert!(lab.meshctl(&["join-token", "worker", "-q"]).contains(&trust.newest().digest), "tokens pin it");

    // No rotation without a cross-signature: no manager holds the root's key to make one.
    let rotate = lab.meshctl_output(&["cluster", "ca", "--rotate"]);
    assert!(!rotate.status.success());
    let said = String::from_utf8_lossy(&rotate.stderr);
    assert!(said.contains("no CA key") && said.contains("--cross-cert"), "{said}");

    // The signer away: an admin credential cannot be had, and the error says why; a new endpoint
    // waits for its certificate and serves once the signer is back. What runs keeps running.
    drop(signer);
    let issue = |lab: &Lab, name: &str| {
        let dir = lab.work.path().join(name);
        lab.meshctl_output(&["cluster", "admin", "issue", "--dir", dir.to_str().unwrap()])
    };
    let away = issue(&lab, "admin-away");
    assert!(!away.status.success());
    let said = String::from_utf8_lossy(&away.stderr);
    assert!(said.contains("cannot be reached") && said.contains(&lab.addr(1)), "{said}");
    let check = lab.meshctl_output(&["check"]);
    let told = String::from_utf8_lossy(&check.stdout);
    assert!(!check.status.success() && told.contains("failed its last request"), "meshctl check: {told}");
    lab.meshctl(&[
        "service",
        "create",
        "late",
        "--network",
        "front",
        "--command",
        "exec sleep 3600",
        "--constraint",
        &format!("node.id=={}", lab.node_id(web_host)),
    ]);
    // Its workload runs (the mesh alone needs the certificate) and its certificate is retried.
    let certified = |lab: &Lab| {
        lab.status(web_host)["workload_certificates"]
            .as_array()
            .is_some_and(|c| c.iter().any(|c| c.as_str().is_some_and(|c| c.starts_with("late.1 "))))
    };
    std::thread::sleep(std::time::Duration::from_secs(5));
    assert!(!certified(&lab), "a certificate while the signer is away");
    assert!(read(&lab), "the running endpoints still serve while the signer is away");
    let signer = Signer::start(&lab, &root, &good, scratch.path().join("cfssl-2.log"));
    lab.wait("the waiting endpoint to get its certificate", || certified(&lab));
    assert!(signer.signed() >= 1, "its certificate came from cfssl once it was back");
    assert!(issue(&lab, "admin-back").status.success());
    let ca: serde_json::Value =
        serde_json::from_str(&lab.meshctl(&["cluster", "ca", "--format", "json"])).unwrap();
    assert!(ca.get("external_failed").is_none(), "a request went through since: {ca}");
    drop(signer);

    // A signer that lies: one with another root at the same address, and one with another auth key.
    let impostor = make_root(scratch.path(), "impostor", cluster.as_str());
    let lying = Signer::start(&lab, &impostor, &good, scratch.path().join("cfssl-3.log"));
    let out = issue(&lab, "admin-impostor");
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(said.contains("not taken") && said.contains("pinned root"), "{said}");
    assert!(!lab.work.path().join("admin-impostor/admin.crt").exists());
    drop(lying);
    let other_key = config(scratch.path(), "other-key", &AUTH_KEY.replace('0', "1"));
    let wrong = Signer::start(&lab, &root, &other_key, scratch.path().join("cfssl-4.log"));
    let out = issue(&lab, "admin-wrong-key");
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("refused") && said.contains("invalid token"), "{said}");
    assert_eq!(wrong.signed(), 0);
    drop(wrong);

    // A rotation to another external CA (another root, another server), cross-signed by the
    // operator with the current root's key: a cross-signature by another root is refused; the
    // right one lets every node renew from the new signer under traffic.
    let next = make_root(scratch.path(), "next", cluster.as_str());
    let forged = cross_sign(scratch.path(), "next", &impostor);
    let cross = cross_sign(scratch.path(), "next", &root);
    let next_signer = Signer::start_at(&lab, "8889", &next, &good, scratch.path().join("cfssl-next.log"));
    let next_url = format!("cfssl=http://{}:8889", lab.addr(1));
    let rotate = |lab: &Lab, cross: &Path| {
        let args = [
            "cluster",
            "ca",
            "--rotate",
            "--ca-cert",
            next.0.to_str().unwrap(),
            "--external-ca",
            &next_url,
            "--external-ca-key",
            key_file.to_str().unwrap(),
            "--cross-cert",
            cross.to_str().unwrap(),
        ];
        lab.meshctl_output(&args)
    };
    let out = rotate(&lab, &forged);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("does not vouch"), "{said}");
    let out = rotate(&lab, &cross);
    assert!(out.status.success(), "the rotation: {}", String::from_utf8_lossy(&out.stderr));
    let next_trust = Trust::from_pem(&std::fs::read_to_string(&next.0).unwrap()).unwrap();
    let ca: serde_json::Value =
        serde_json::from_str(&lab.meshctl(&["cluster", "ca", "--format", "json"])).unwrap();
    assert_eq!(ca["roots"].as_array().unwrap().len(), 1, "{ca}");
    assert_eq!(ca["roots"][0]["digest"], next_trust.newest().digest.as_str());
    assert_eq!(ca["external"], format!("http://{}:8889", lab.addr(1)));
    lab.wait("every ca.crt to hold the new root alone", || {
        [web_host, api_host].iter().all(|&i| {
            std::fs::read_to_string(lab.node_dir(i).join("ca.crt"))
                .is_ok_and(|pem| pem == next_trust.to_pem())
        })
    });
    for i in [web_host, api_host] {
        next_trust.root_of(&std::fs::read_to_string(lab.node_dir(i).join("node.crt")).unwrap()).unwrap();
    }
    assert!(lab.meshctl(&["join-token", "worker", "-q"]).contains(&next_trust.newest().digest));
    lab.wait("web to read api after the rotation", || read(&lab));
    assert!(next_signer.signed() >= 4, "the new signer signed the renewals: {}", next_signer.signed());
    drop(next_signer);

    // No manager file or state holds a CA key: the state, decrypted with the data key, names
    // the signer and holds no key; no file holds either root's key.
    let root_key = std::fs::read_to_string(&root.1).unwrap() + &std::fs::read_to_string(&next.1).unwrap();
    let key_bodies: Vec<String> = root_key
        .split("-----END")
        .map(|k| k.lines().filter(|l| !l.starts_with("-----")).collect::<String>())
        .filter(|k| k.len() > 40)
        .collect();
    for i in 1..=2 {
        lab.stop_manager(i, false);
    }
    for i in 1..=2 {
        let dir = lab.manager_dir(i);
        let read = control::statedir::read_state(&dir, None);
        let state = tokio::runtime::Runtime::new().unwrap().block_on(read).expect("the state");
        let ca = state.ca.clone().expect("the CA record");
        assert!(ca.key_pem.0.is_empty(), "manager {i}'s state holds a CA key");
        assert_eq!(ca.external.expect("external").url, format!("http://{}:8889", lab.addr(1)));
        let json = serde_json::to_string(&state).unwrap();
        assert!(!json.contains("PRIVATE KEY"), "manager {i}'s state holds a private key");
        for file in files(&lab.manager_dir(i)) {
            let bytes = std::fs::read(&file).unwrap();
            let text = String::from_utf8_lossy(&bytes);
            for body in &key_bodies {
                assert!(!text.contains(&body[..40]), "{} holds a root's key", file.display());
            }
        }
    }
}

/// `mesh-control init --external-ca` against a real `cfssl serve` on loopback: what it pins, and
/// what it says of each thing that is wrong.
#[tokio::test]
async fn init_pins_the_signers_root_and_says_what_is_wrong() {
    use control::statedir::{CaChoice, ManagerConfig, init_with_admin_dir};
    let scratch = tempfile::tempdir().unwrap();
    let cluster = ClusterId::random();
    let root = make_root(scratch.path(), "root", cluster.as_str());
    let good = config(scratch.path(), "good", AUTH_KEY);
    let (_signer, url) = Signer::on_loopback(&root, &good, scratch.path().join("cfssl.log"));
    let mut n = 0;
    let lifetime = std::cell::Cell::new(DAY);
    let mut init = |url: &str, auth_key: &str, root: &(PathBuf, PathBuf)| {
        n += 1;
        let dir = scratch.path().join(format!("cluster-{n}"));
        let config = ManagerConfig::new("127.0.0.1:7400".parse().unwrap(), None);
        let root_pem = std::fs::read_to_string(&root.0).unwrap();
        let choice = CaChoice::External { url: url.to_owned(), auth_key: auth_key.to_owned(), root_pem };
        let (admin, lifetime) = (dir.join("admin"), lifetime.get());
        async move { init_with_admin_dir(&dir.join("state"), config, lifetime, false, &admin, choice).await }
    };

    // The root pinned: the cluster is its O, and the tokens carry its digest.
    let digest = Trust::from_pem(&std::fs::read_to_string(&root.0).unwrap()).unwrap().newest().digest.clone();
    let created = init(&url, AUTH_KEY, &root).await.expect("init with the signer's root pinned");
    assert_eq!(created.cluster_id, cluster);
    assert_eq!(created.worker_token.ca_digest(), digest);

    let refused = |r: Result<control::statedir::Created, control::statedir::ClusterError>| {
        r.map(|_| ()).expect_err("refused").to_string()
    };
    // A pinned root other than the signer's: its first certificate is not taken.
    let impostor = make_root(scratch.path(), "impostor", cluster.as_str());
    let said = refused(init(&url, AUTH_KEY, &impostor).await);
    assert!(said.contains("not taken") && said.contains("pinned root"), "{said}");
    // Another auth key: the signer refuses, and says so.
    let said = refused(init(&url, &AUTH_KEY.replace('0', "1"), &root).await);
    assert!(said.contains("refused") && said.contains("invalid token"), "{said}");
    // A root whose O is no cluster ID.
    let acme = make_root(scratch.path(), "acme", "acme");
    let said = refused(init(&url, AUTH_KEY, &acme).await);
    assert!(said.contains("must be the cluster's ID"), "{said}");
    // Nobody at the address: said so, after three tries.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let said = refused(init(&format!("http://{closed}"), AUTH_KEY, &root).await);
    assert!(said.contains("cannot be reached") && said.contains("tried 3 times"), "{said}");
    // A signer that also signs without authentication, for whoever reaches it: refused, naming
    // the open profile (the default one, or one the managers use).
    for open in ["default", "workload"] {
        let config = config_open(scratch.path(), &format!("open-{open}"), AUTH_KEY, Some(open));
        let (_open, open_url) =
            Signer::on_loopback(&root, &config, scratch.path().join(format!("open-{open}.log")));
        let said = refused(init(&open_url, AUTH_KEY, &root).await);
        assert!(said.contains("without authentication") && said.contains(&format!("`{open}`")), "{said}");
    }
    // Node certificates of an hour asked for, the signer's `node` profile giving a day.
    lifetime.set(std::time::Duration::from_secs(3600));
    let said = refused(init(&url, AUTH_KEY, &root).await);
    assert!(said.contains("later than") && said.contains("`node` profile"), "{said}");
}

const DAY: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// A cluster of its own CA moves to an external one with a rotation: the leader cross-signs the
/// external root with its own, every node renews from the external CA, and the managers' state
/// holds no CA key afterwards.
#[test]
fn a_cluster_rotates_from_its_own_ca_to_an_external_one_and_drops_the_key() {
    let scratch = tempfile::tempdir().unwrap();
    let mut lab = Lab::start_with(2, 1, &[]);
    assert!(!lab.ca_key.is_empty(), "the cluster starts with its own CA");
    let external = make_root(scratch.path(), "external", &lab.cluster_id());
    let good = config(scratch.path(), "good", AUTH_KEY);
    let key_file = scratch.path().join("auth.key");
    std::fs::write(&key_file, AUTH_KEY).unwrap();
    let signer = Signer::start(&lab, &external, &good, scratch.path().join("cfssl.log"));
    let url = format!("cfssl=http://{}:{PORT}", lab.addr(1));
    let args = [
        "cluster",
        "ca",
        "--rotate",
        "--ca-cert",
        external.0.to_str().unwrap(),
        "--external-ca",
        &url,
        "--external-ca-key",
        key_file.to_str().unwrap(),
    ];
    let out = lab.meshctl_output(&args);
    assert!(out.status.success(), "the rotation: {}", String::from_utf8_lossy(&out.stderr));
    let trust = Trust::from_pem(&std::fs::read_to_string(&external.0).unwrap()).unwrap();
    lab.wait("meshd to trust the external root alone", || {
        std::fs::read_to_string(lab.node_dir(2).join("ca.crt")).is_ok_and(|pem| pem == trust.to_pem())
    });
    trust.root_of(&std::fs::read_to_string(lab.node_dir(2).join("node.crt")).unwrap()).unwrap();
    assert!(
        signer.signed() >= 3,
        "the external CA signed the renewals (a probe, the manager, the node, the admin)"
    );
    lab.stop_manager(1, false);
    let dir = lab.manager_dir(1);
    let read = control::statedir::read_state(&dir, None);
    let state = tokio::runtime::Runtime::new().unwrap().block_on(read).expect("the state");
    let ca = state.ca.expect("the CA record");
    assert!(ca.key_pem.0.is_empty(), "the old root's key is gone from the state");
    assert!(ca.external.is_some());
    assert!(!serde_json::to_string(&state.ca_rotation).unwrap().contains("PRIVATE KEY"));
}
