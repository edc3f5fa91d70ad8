//! Autolock with the real binaries on loopback: a restarted manager serves nothing on the network
//! until `meshctl unlock --state-dir` gives it the key on its host, refuses a wrong key, and its
//! files (its TLS key included) cannot be read without the key; rotation retires the old key;
//! turning autolock off unwraps the data key. Also what an attacker tries against
//! the managers: a worker token to make a manager, raft messages with a worker's or an admin's
//! certificate.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use control::raft::seal::{KeyFile, SealError, UnlockKey};
use mesh_api::proto::pb;
use mesh_api::tokens::Role;
use mesh_tests::TestCluster;
use mesh_tests::lab::bin_dir;

/// A free loopback port below the kernel's ephemeral range (32768 and up), so that no outgoing
/// connection of a test running beside this one takes it while a manager is stopped between runs.
fn free_port() -> u16 {
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    (0..10_000u32)
        .map(|i| 20_000 + ((seed / 7 + i * 7919) % 12_000) as u16)
        .find(|&port| TcpListener::bind(("127.0.0.1", port)).is_ok())
        .expect("a free port between 20000 and 32000")
}

struct Manager {
    dir: tempfile::TempDir,
    listen: String,
    child: Option<Child>,
}

impl Manager {
    /// A new autolocked cluster on a free loopback port (not started); its unlock key.
    fn init_autolocked() -> (Manager, String) {
        let port = free_port();
        let m =
            Manager { dir: tempfile::tempdir().unwrap(), listen: format!("127.0.0.1:{port}"), child: None };
        let init = Command::new(bin_dir().join("mesh-control"))
            .args(["init", "--autolock", "--listen", &m.listen, "--advertise", &m.listen, "--admin-dir"])
            .arg(m.admin())
            .arg("--state-dir")
            .arg(m.state())
            .output()
            .unwrap();
        assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
        let key = key_in(&String::from_utf8_lossy(&init.stdout));
        (m, key)
    }

    fn state(&self) -> PathBuf {
        self.dir.path().join("m")
    }

    /// The admin bundle: the operator's, outside the manager's state directory.
    fn admin(&self) -> PathBuf {
        self.dir.path().join("admin")
    }

    fn serving(&self) -> bool {
        std::net::TcpStream::connect(&self.listen).is_ok()
    }

    /// `meshctl unlock --state-dir` with `key` on stdin; once it succeeds, waits for the
    /// manager to serve.
    fn unlock(&mut self, key: &str) -> Output {
        let state = self.state();
        let out = self.meshctl(&["unlock", "--state-dir", state.to_str().unwrap()], &format!("{key}\n"));
        if out.status.success() {
            let deadline = Instant::now() + Duration::from_secs(60);
            while !self.serving() {
                if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                    panic!("mesh-control exited once unlocked ({status}):\n{}", self.log());
                }
                assert!(
                    Instant::now() < deadline,
                    "mesh-control did not serve once unlocked:\n{}",
                    self.log()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        out
    }

    /// What the manager wrote to its log so far.
    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    fn start(&mut self) {
        let log =
            std::fs::OpenOptions::new().create(true).append(true).open(self.dir.path().join("log")).unwrap();
        let child = Command::new(bin_dir().join("mesh-control"))
            .args(["run", "--state-dir"])
            .arg(self.state())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        // Up once it serves, or (locked) once it listens on its unlock socket.
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.serving() && !self.state().join("unlock.sock").exists() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                panic!("mesh-control exited ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "mesh-control did not listen:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
    }

    fn meshctl(&self, args: &[&str], stdin: &str) -> Output {
        let mut child = Command::new(bin_dir().join("meshctl"))
            .args(args)
            .env("MESHCTL_ADMIN", self.admin())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.meshctl(args, "");
        assert!(out.status.success(), "meshctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        self.stop();
    }
}

fn key_in(text: &str) -> String {
    text.split_whitespace().find(|w| w.starts_with("MESHKEY-1-")).expect("an unlock key").to_owned()
}

/// Every file under `dir`, read as bytes.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files(&path));
        } else {
            out.push((path.clone(), std::fs::read(&path).unwrap()));
        }
    }
    out
}

async fn read_state(dir: &Path, key: Option<&str>) -> Result<control::state::ClusterState, String> {
    let key: Option<UnlockKey> = key.map(|k| k.parse().unwrap());
    control::statedir::read_state(dir, key.as_ref()).await.map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_locked_manager_serves_only_unlock_and_its_files_are_unreadable_without_the_key() {
    let (mut m, key) = Manager::init_autolocked();

    // Fresh from init, the manager is locked as any restarted one is: nothing on the network
    // (it could not do TLS: its key is sealed too), only the unlock socket, 0600.
    m.start();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!m.serving(), "a locked manager accepts connections on its control port");
    let socket = std::fs::metadata(m.state().join("unlock.sock")).unwrap();
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&socket.permissions()) & 0o777, 0o600);
    let locked = m.meshctl(&["network", "ls"], "");
    assert!(!locked.status.success());
    let wrong = UnlockKey::generate().to_string();
    for (bad, why) in [
        (wrong.as_str(), "wrong unlock key"),
        ("MESHKEY-1-00", "an unlock key is"),
        ("", "no unlock key"),
        (&"x".repeat(4096), "not an unlock key"),
    ] {
        let refused = m.unlock(bad);
        let message = String::from_utf8_lossy(&refused.stderr);
        assert!(!refused.status.success() && message.contains(why), "{why}: {message}");
    }
    // Straight at the socket: a megabyte without a newline is cut off at the line bound and
    // refused; the manager goes on waiting.
    {
        use std::io::{Read, Write};
        let mut raw = std::os::unix::net::UnixStream::connect(m.state().join("unlock.sock")).unwrap();
        let _ = raw.write_all(&vec![b'M'; 1 << 20]);
        let mut answer = String::new();
        let _ = raw.read_to_string(&mut answer);
        assert!(answer.starts_with("refused: "), "{answer:?}");
    }
    assert!(!m.serving(), "still locked after refused keys");
    let unlocked = m.unlock(&key);
    assert!(unlocked.status.success(), "{}", String::from_utf8_lossy(&unlocked.stderr));
    assert!(!m.state().join("unlock.sock").exists(), "the unlock socket is removed once unlocked");
    let again = m.unlock(&key);
    assert!(String::from_utf8_lossy(&again.stderr).contains("no locked manager"), "unlocked twice");
    m.ok(&["network", "create", "kept", "--subnet", "10.60.0.0/24"]);
    assert_eq!(key_in(&m.ok(&["cluster", "unlock-key"])), key);
    let token = m.ok(&["join-token", "worker", "-q"]).trim().to_owned();

    // Stopped: without the key nothing opens; no file holds the key, a token or the CA's key.
    m.stop();
    let err = read_state(&m.state(), None).await.unwrap_err();
    assert!(err.contains("locked"), "{err}");
    let err = read_state(&m.state(), Some(&wrong)).await.unwrap_err();
    assert!(err.contains("wrong unlock key"), "{err}");
    let state = read_state(&m.state(), Some(&key)).await.unwrap();
    assert!(state.networks.contains_key("kept"));
    let ca_key = state.ca.expect("the CA").key_pem.0;
    let ca_body: String = ca_key.lines().filter(|l| !l.starts_with("-----")).collect();
    let data_key = std::fs::read_to_string(m.state().join("data.key")).unwrap();
    assert!(data_key.starts_with("MESHLOCK1 "), "the data key file is wrapped: {data_key}");
    let manager_key = std::fs::read_to_string(m.state().join("manager.key")).unwrap();
    assert!(manager_key.starts_with("MESHSEALED1 "), "the manager key is sealed: {manager_key}");
    for (path, bytes) in files(&m.state()) {
        let text = String::from_utf8_lossy(&bytes).replace('\n', "");
        assert!(!text.contains("PRIVATE KEY"), "{} holds a private key in the clear", path.display());
        for secret in [&key[10..], token.as_str(), ca_body.as_str()] {
            assert!(!text.contains(secret), "{} holds a secret in the clear", path.display());
        }
    }
    assert!(matches!(
        control::raft::seal::DataKey::load(&m.state().join("data.key")),
        Err(SealError::Locked(_))
    ));

    // Rotated, the old key no longer unlocks; the new one does, and the state is the same.
    let old_key_file = std::fs::read(m.state().join("data.key")).unwrap();
    m.start();
    assert!(m.unlock(&key).status.success());
    let rotated = key_in(&m.ok(&["cluster", "unlock-key", "--rotate"]));
    assert_ne!(rotated, key);
    // The manager rewraps its data key file as the rotation is applied.
    let deadline = Instant::now() + Duration::from_secs(10);
    let wrapped_by = |k: &str| {
        let path = m.state().join("data.key");
        control::raft::seal::KeyFile::read(&path).unwrap().open(&path, Some(&k.parse().unwrap())).is_ok()
    };
    while !wrapped_by(&rotated) {
        assert!(Instant::now() < deadline, "the data key file was not rewrapped");
        std::thread::sleep(Duration::from_millis(100));
    }
    m.stop();
    // A copy of the data key file from before, with the unlock key of its time (what a thief of
    // an old backup and an old key holds), opens nothing: the store was sealed under a fresh key.
    let now_key_file = std::fs::read(m.state().join("data.key")).unwrap();
    std::fs::write(m.state().join("data.key"), &old_key_file).unwrap();
    let stale = control::statedir::read_state(&m.state(), Some(&key.parse().unwrap())).await;
    assert!(stale.is_err(), "the old data key with the old unlock key still opens the store");
    // ... nor the manager's key, sealed again under the fresh data key.
    let path = m.state().join("data.key");
    let old_data_key = KeyFile::read(&path).unwrap().open(&path, Some(&key.parse().unwrap())).unwrap();
    assert!(old_data_key.load_sealed(&m.state().join("manager.key"), b"manager-key").is_err());
    std::fs::write(m.state().join("data.key"), &now_key_file).unwrap();
    m.start();
    let old = m.unlock(&key);
    assert!(!old.status.success(), "the rotated-out key still unlocks");
    assert!(m.unlock(&rotated).status.success());
    assert!(m.ok(&["network", "ls"]).contains("kept"));

    // Off: the data key is in the clear again and a restart needs no key.
    m.ok(&["cluster", "update", "--autolock=false"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while control::raft::seal::DataKey::load(&m.state().join("data.key")).is_err() {
        assert!(Instant::now() < deadline, "the data key file was not unwrapped");
        std::thread::sleep(Duration::from_millis(100));
    }
    m.stop();
    m.start();
    assert!(m.ok(&["network", "ls"]).contains("kept"));
    let err = m.meshctl(&["cluster", "unlock-key"], "");
    assert!(String::from_utf8_lossy(&err.stderr).contains("autolock is off"));
}

#[tokio::test]
async fn a_worker_token_cannot_make_a_manager() {
    let cluster = TestCluster::start(Duration::from_secs(3600)).await;
    let before = cluster.manager.store().read(|s| s.nodes.len());
    let dir = tempfile::tempdir().unwrap();
    let config = control::statedir::ManagerConfig::new("127.0.0.1:1".parse().unwrap(), None);
    let err = control::statedir::join(
        &dir.path().join("m"),
        config,
        &[cluster.control()],
        &cluster.token(Role::Worker),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("worker token"), "{err}");
    assert_eq!(cluster.manager.store().read(|s| s.nodes.len()), before, "no node was added");
    assert!(!dir.path().join("m").join("manager.key").exists(), "nothing written");
}

#[tokio::test]
async fn raft_messages_need_a_manager_certificate() {
    let cluster = TestCluster::start(Duration::from_secs(3600)).await;
    let (worker, _) = cluster.join(Role::Worker).await;
    let worker = meshd::identity::NodeDir::new(&mesh_tests::node_dir(&worker)).load().unwrap().identity;
    let admin = cluster.admin_bundle().identity;
    // A vote request that would unseat the leader, were it accepted.
    let vote = serde_json::to_vec(&openraft::raft::VoteRequest::<u64>::new(openraft::Vote::new(99, 7), None))
        .unwrap();
    for (who, identity) in [("worker", Some(&worker)), ("admin", Some(&admin)), ("anonymous", None)] {
        let channel = cluster.channel_as(identity).await;
        let status = pb::raft_client::RaftClient::new(channel)
            .vote(pb::RaftMessage { json: vote.clone() })
            .await
            .expect_err(who);
        assert!(
            matches!(status.code(), tonic::Code::PermissionDenied | tonic::Code::Unauthenticated),
            "{who}: {status:?}"
        );
    }
    // Still the leader, in the same term.
    assert!(cluster.manager.store().leadership().leading);
    assert_eq!(cluster.manager.store().raft().metrics().borrow().current_term, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_manager_joining_an_autolocked_cluster_never_writes_its_data_key_in_the_clear() {
    let (mut m, key) = Manager::init_autolocked();
    m.start();
    assert!(m.unlock(&key).status.success());
    let token = m.ok(&["join-token", "manager", "-q"]).trim().to_owned();

    let second = tempfile::tempdir().unwrap();
    let state = second.path().join("m");
    let listen = format!("127.0.0.1:{}", free_port());
    let log = std::fs::File::create(second.path().join("log")).unwrap();
    let mut child = Command::new(bin_dir().join("mesh-control"))
        .args([
            "join",
            "--control",
            &m.listen,
            "--token",
            &token,
            "--listen",
            &listen,
            "--advertise",
            &listen,
        ])
        .arg("--state-dir")
        .arg(&state)
        .stderr(log)
        .spawn()
        .unwrap();
    // Watched all along: the data key file, whenever it exists, is wrapped by the unlock key.
    let path = state.join("data.key");
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut wrapped = false;
    while Instant::now() < deadline {
        if let Ok(text) = std::fs::read_to_string(&path) {
            assert!(text.starts_with("MESHLOCK1 "), "the joining manager wrote its data key in the clear");
            wrapped = KeyFile::read(&path).unwrap().open(&path, Some(&key.parse().unwrap())).is_ok();
            if wrapped {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();
    let log = std::fs::read_to_string(second.path().join("log")).unwrap_or_default();
    assert!(wrapped, "no wrapped data key file appeared:\n{log}");
    let manager_key = std::fs::read_to_string(state.join("manager.key")).unwrap();
    assert!(manager_key.starts_with("MESHSEALED1 "), "the joining manager's key is in the clear");
    // Stopped, it is locked like any autolocked manager, and its state opens with the key.
    let state_now =
        read_state(&state, Some(&key)).await.expect("the joined manager's state opens with the key");
    assert!(state_now.unlock_key.is_some());
    assert!(read_state(&state, None).await.is_err());
}
