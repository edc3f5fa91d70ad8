//! The WireGuard transport end to end, as root: a lab of namespaces running the real control plane
//! and meshd, one WireGuard and one AES-GCM network on the same hosts; traffic, isolation, the
//! underlay as an eavesdropper sees it, key rotation under load, what `meshd status` shows, what
//! the managers hold, and a removed peer refused.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use base64::Engine;
use mesh_tests::lab::Lab;
use mesh_tests::traffic::{address, capture, datagrams, inject, ping, serve, transfer};

/// Labs run one at a time: they share the machine's two cores.
static ONE_LAB: Mutex<()> = Mutex::new(());

struct Setup {
    lab: Lab,
    web: String,
    api: String,
    other: String,
    api_wg: String,
    api_aes: String,
    other_back: String,
    /// The WireGuard network's ID.
    wg_id: u64,
}

/// Hosts 2 and 3 run web and api on `wg` (WireGuard) and `aes` (AES-GCM); `other` runs on host 3
/// on `back` (WireGuard too), a network web is not on.
fn setup() -> Setup {
    let lab = Lab::start(3);
    let (h2, h3) = (lab.node_id(2), lab.node_id(3));
    let created =
        lab.meshctl(&["network", "create", "wg", "--subnet", "10.41.0.0/24", "--transport", "wireguard"]);
    assert!(created.contains("encrypted, wireguard"), "{created}");
    lab.meshctl(&["network", "create", "aes", "--subnet", "10.42.0.0/24"]);
    lab.meshctl(&["network", "create", "back", "--subnet", "10.43.0.0/24", "--transport", "wireguard"]);
    let on = |n: &str| format!("node.id=={n}");
    for (service, host, networks) in
        [("web", &h2, &["wg", "aes"][..]), ("api", &h3, &["wg", "aes"][..]), ("other", &h3, &["back"][..])]
    {
        let mut args = vec!["service", "create", service];
        for n in networks {
            args.extend(["--network", n]);
        }
        let constraint = on(host);
        args.extend(["--constraint", &constraint]);
        lab.meshctl(&args);
    }
    lab.apply_policy(
        "[[rule]]\nname = \"overlay-tests\"\naction = \"allow\"\nfrom = [\"*\"]\nto = [\"web\", \"api\", \"other\"]\nprotocol = \"tcp\"\n",
    );
    let net: serde_json::Value = serde_json::from_str(&lab.meshctl(&["network", "inspect", "wg"])).unwrap();
    assert_eq!(net["transport"], "wireguard");
    let s = Setup {
        web: lab.workload(2, "web", 1),
        api: lab.workload(3, "api", 1),
        other: lab.workload(3, "other", 1),
        api_wg: address(&lab, "api", "wg"),
        api_aes: address(&lab, "api", "aes"),
        other_back: address(&lab, "other", "back"),
        wg_id: net["id"].as_u64().unwrap(),
        lab,
    };
    for (ns, addr) in [(&s.api, &s.api_wg), (&s.other, &s.other_back)] {
        s.lab.wait(&format!("{ns} to have {addr}"), || {
            let out = s.lab.exec(ns, &["ip", "-4", "-br", "addr"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).contains(addr.as_str())
        });
    }
    s
}

/// Host `i`'s WireGuard key file for network `id`: (generation, private key as base64).
fn key_file(lab: &Lab, i: usize, id: u64) -> (u32, String) {
    let text = std::fs::read_to_string(lab.node_dir(i).join(format!("wireguard/{id}.key"))).unwrap();
    let mut lines = text.lines();
    let generation = lines.next().unwrap().strip_prefix("generation ").unwrap().parse().unwrap();
    let private = lines.next().unwrap().strip_prefix("private ").unwrap().to_owned();
    (generation, private)
}

fn public_of(private_b64: &str) -> String {
    let b64 = base64::engine::general_purpose::STANDARD;
    let bytes: [u8; 32] = b64.decode(private_b64).unwrap().try_into().unwrap();
    b64.encode(tun::wireguard::StaticKey::from_bytes(bytes).public())
}

/// Host `i`'s WireGuard peers on network `name`, as `meshd status --json` lists them.
fn wireguard_peers(lab: &Lab, i: usize, name: &str) -> Vec<serde_json::Value> {
    let status = lab.status(i);
    let networks = status["networks"].as_array().cloned().unwrap_or_default();
    let network = networks.into_iter().find(|n| n["name"] == name);
    network.and_then(|n| n["wireguard_peers"].as_array().cloned()).unwrap_or_default()
}

#[test]
fn a_wireguard_network_beside_an_aes_gcm_one_carries_traffic_privately_and_rotates_under_load() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let lab = &s.lab;
    // The first packets start the handshake; then both networks carry traffic between the hosts.
    lab.wait("web to reach api over WireGuard", || ping(lab, &s.web, &s.api_wg));
    lab.wait("web to reach api over AES-GCM", || ping(lab, &s.web, &s.api_aes));
    let server = serve(lab, &s.api, 5101);
    transfer(lab, server, &s.web, &s.api_wg, 5101, 4 << 20, None);
    let server = serve(lab, &s.api, 5104);
    transfer(lab, server, &s.web, &s.api_aes, 5104, 4 << 20, None);

    // An eavesdropper on the underlay sees WireGuard datagrams for the network, and no plaintext.
    let marker = "MESH-WG-SECRET-MARKER-91c2";
    let frames = capture(lab, 3.0, || {
        let server = serve(lab, &s.api, 5102);
        transfer(lab, server, &s.web, &s.api_wg, 5102, 1 << 20, Some(marker));
    });
    let seen = datagrams(&frames, &lab.addr(2), &lab.addr(3));
    let id = (s.wg_id as u32).to_be_bytes();
    let wireguard: usize =
        seen.iter().filter(|d| d.len() > 5 && d[..5] == [1, 2, id[1], id[2], id[3]]).map(Vec::len).sum();
    assert!(
        wireguard > 1 << 19,
        "the transfer crossed the underlay as WireGuard datagrams ({wireguard} bytes)"
    );
    assert!(
        !frames.iter().any(|f| f.windows(marker.len()).any(|w| w == marker.as_bytes())),
        "marker in clear"
    );

    // Networks stay apart: web is not on `back`, even with a route to it.
    assert!(
        lab.exec(&s.web, &["ip", "route", "add", "10.43.0.0/24", "dev", "mesh0"]).status().unwrap().success()
    );
    let before = lab.drops(2, "no_route");
    assert!(!ping(lab, &s.web, &s.other_back));
    assert!(lab.drops(2, "no_route") > before, "dropped at the sender");
    assert!(!ping(lab, &s.other, &address(lab, "web", "wg")), "other is not on wg");

    // `meshd status` shows the peer as `wg show` would: its public key (the one in host 3's key
    // file), its endpoint, a handshake, bytes both ways; never a private key.
    let (generation, private3) = key_file(lab, 3, s.wg_id);
    assert_eq!(generation, 1);
    let (_, private2) = key_file(lab, 2, s.wg_id);
    let peers = wireguard_peers(lab, 2, "wg");
    assert_eq!(peers.len(), 1, "{peers:?}");
    assert_eq!(peers[0]["node"], lab.node_id(3).as_str());
    assert_eq!(peers[0]["public_key"], public_of(&private3).as_str());
    assert_eq!(peers[0]["endpoint"], format!("{}:4800", lab.addr(3)).as_str());
    assert!(peers[0]["latest_handshake_secs"].as_u64().is_some_and(|s| s < 180), "{peers:?}");
    assert!(peers[0]["rx_bytes"].as_u64().unwrap() > 0 && peers[0]["tx_bytes"].as_u64().unwrap() > 4 << 20);
    let status = lab.status(2).to_string();
    assert!(!status.contains(&private2) && !status.contains(&private3), "a private key in meshd status");
    assert!(wireguard_peers(lab, 2, "aes").is_empty(), "an AES-GCM network has no WireGuard peers");
    let meshd = mesh_tests::lab::bin_dir().join("meshd");
    let dir = lab.node_dir(2);
    let args = [meshd.to_str().unwrap(), "status", "--state-dir", dir.to_str().unwrap()];
    let text = String::from_utf8(lab.exec(&lab.host(2), &args).output().unwrap().stdout).unwrap();
    assert!(text.contains("wireguard") && text.contains(&public_of(&private3)), "{text}");

    // A rotation under load loses nothing: every byte of a long transfer arrives while the nodes
    // make new key pairs three times over.
    let server = serve(lab, &s.api, 5103);
    let (rotated, ended) = std::thread::scope(|scope| {
        let rotations = scope.spawn(|| {
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(150));
                lab.meshctl(&["network", "rotate-key", "wg"]);
            }
            Instant::now()
        });
        transfer(lab, server, &s.web, &s.api_wg, 5103, 256 << 20, None);
        (rotations.join().unwrap(), Instant::now())
    });
    assert!(rotated < ended, "the rotations were over {:?} before the transfer", rotated - ended);
    let net: serde_json::Value = serde_json::from_str(&lab.meshctl(&["network", "inspect", "wg"])).unwrap();
    assert_eq!(net["key_epoch"].as_u64(), Some(4));
    lab.wait("both hosts to hold generation 4", || {
        key_file(lab, 2, s.wg_id).0 == 4 && key_file(lab, 3, s.wg_id).0 == 4
    });
    let (_, rotated3) = key_file(lab, 3, s.wg_id);
    assert_ne!(rotated3, private3);
    // (The new tunnels handshake at the next packet: a ping.)
    lab.wait("host 2 to hold host 3's new public key, with a handshake", || {
        ping(lab, &s.web, &s.api_wg);
        let peers = wireguard_peers(lab, 2, "wg");
        peers.len() == 1
            && peers[0]["public_key"] == public_of(&rotated3).as_str()
            && peers[0]["latest_handshake_secs"].as_u64().is_some()
    });
    assert!(ping(lab, &s.web, &s.api_wg));

    // The managers never held a private key: the state, decrypted with the data key, holds each
    // node's public key (so the check looks where keys would be) and none of the private ones,
    // in any encoding.
    let (_, rotated2) = key_file(lab, 2, s.wg_id);
    let mut lab = s.lab;
    lab.stop_manager(1, false);
    let manager_dir = lab.manager_dir(1);
    let read = control::statedir::read_state(&manager_dir, None);
    let state = tokio::runtime::Runtime::new().unwrap().block_on(read).expect("the state");
    let json = serde_json::to_string(&state).unwrap();
    let b64 = base64::engine::general_purpose::STANDARD;
    let as_array = |k: &[u8]| serde_json::to_string(k).unwrap();
    let public3: Vec<u8> = b64.decode(public_of(&rotated3)).unwrap();
    assert!(json.contains(&as_array(&public3)), "the state holds host 3's public key");
    for private in [&private2, &private3, &rotated2, &rotated3] {
        let bytes = b64.decode(private).unwrap();
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        for form in [private.to_string(), as_array(&bytes), hex] {
            assert!(!json.contains(&form), "the managers' state holds a WireGuard private key");
        }
    }
}

#[test]
fn a_removed_peer_is_refused_within_seconds_and_its_recorded_handshake_gets_no_answer() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup();
    // The first ping's handshake, recorded off the underlay.
    let frames = capture(&s.lab, 4.0, || {
        s.lab.wait("web to reach api over WireGuard", || ping(&s.lab, &s.web, &s.api_wg));
    });
    let from_h2 = datagrams(&frames, &s.lab.addr(2), &s.lab.addr(3));
    let initiation: Vec<Vec<u8>> =
        from_h2.iter().filter(|d| d.len() == 5 + 148 && d[5] == 1).cloned().collect();
    assert!(!initiation.is_empty(), "a handshake initiation was captured");
    let h2 = s.lab.node_id(2);
    let removed = Instant::now();
    s.lab.meshctl(&["node", "rm", &h2]);
    s.lab.wait("host 3 to drop host 2 from its WireGuard peers", || {
        wireguard_peers(&s.lab, 3, "wg").is_empty()
    });
    assert!(removed.elapsed() < Duration::from_secs(5), "took {:?}", removed.elapsed());
    // Host 2's meshd still runs its last tables: what it sends now is refused by host 3.
    let refused = s.lab.drops(3, "wrong_source");
    let received = s.lab.received(3);
    assert!(!ping(&s.lab, &s.web, &s.api_wg));
    s.lab.stop_meshd(2);
    // Its recorded handshake, replayed from its own address: refused, unanswered, nothing delivered.
    let answers = capture(&s.lab, 2.0, || inject(&s.lab, 2, &s.lab.addr(3), &initiation));
    assert!(s.lab.drops(3, "wrong_source") > refused, "host 2's datagrams are refused");
    assert!(datagrams(&answers, &s.lab.addr(3), &s.lab.addr(2)).is_empty(), "host 3 answered a removed peer");
    assert_eq!(s.lab.received(3), received);
}

#[test]
fn a_node_that_lost_its_key_makes_a_new_one_which_control_takes_a_minute_after_the_last() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let mut s = setup();
    s.lab.wait("web to reach api over WireGuard", || ping(&s.lab, &s.web, &s.api_wg));
    let (_, lost) = key_file(&s.lab, 2, s.wg_id);
    // Host 2's state directory loses its key (restored from a backup without it, say).
    s.lab.stop_meshd(2);
    std::fs::remove_file(s.lab.node_dir(2).join(format!("wireguard/{}.key", s.wg_id))).unwrap();
    let restarted = Instant::now();
    s.lab.start_meshd(2);
    s.lab.wait("host 2 to make a new key", || {
        s.lab.node_dir(2).join(format!("wireguard/{}.key", s.wg_id)).exists()
    });
    let (generation, made) = key_file(&s.lab, 2, s.wg_id);
    assert_eq!(generation, 1, "the same generation");
    assert_ne!(made, lost);
    let held_by_3 = |lab: &Lab| {
        wireguard_peers(lab, 3, "wg").first().and_then(|p| p["public_key"].as_str().map(str::to_owned))
    };
    // Within a minute of its last key, control refuses the new one (no worker churns its peers'
    // slices); host 2 reports it again until it is taken, and traffic resumes.
    std::thread::sleep(Duration::from_secs(20));
    assert_eq!(held_by_3(&s.lab), Some(public_of(&lost)), "taken before a minute had passed");
    let deadline = Instant::now() + Duration::from_secs(90);
    while held_by_3(&s.lab) != Some(public_of(&made)) {
        assert!(Instant::now() < deadline, "host 2's new key was never taken");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(restarted.elapsed() > Duration::from_secs(30), "taken after {:?}", restarted.elapsed());
    s.lab.wait("web to reach api again", || ping(&s.lab, &s.web, &s.api_wg));
}
