//! Egress, as root in a lab of namespaces running the real binaries: control on host 1, meshd on
//! host 2 running `web` and `db`, and an `internet` namespace on the underlay bridge with HTTP
//! servers on several addresses and a DNS server (host 2's resolver) whose answers the test
//! changes.
//!
//! * Only what an allow rule names leaves, whatever `default = "allow"` says: by network and
//!   port, by DNS name (the name's current answers only, followed when they change), for the
//!   rule's source service only; the connection leaves from the host's address.
//! * Everything else is dropped and counted: other addresses, other ports, UDP, ping, and meshd's
//!   own listener asked directly.
//! * A workload's DNS looks up only the names its egress rules could let it reach.

use std::sync::Mutex;

use mesh_tests::lab::{Lab, script, talk};

static ONE_LAB: Mutex<()> = Mutex::new(());

struct Setup {
    lab: Lab,
    web: String,
    db: String,
    /// The internet's addresses: its own (DNS, not allowed), one a `cidr:` rule names, the
    /// name's first answer and its second.
    own: String,
    partner: String,
    first: String,
    second: String,
    zone: std::path::PathBuf,
    _servers: Vec<std::process::Child>,
}

fn policy(s: &Setup) -> String {
    format!(
        r#"
default = "allow"

[[rule]]
name = "web-to-partner"
action = "allow"
from = ["web"]
to = ["cidr:{partner}/32"]
ports = [80]

[[rule]]
name = "web-to-api"
action = "allow"
from = ["web"]
to = ["dns:api.example.test"]
ports = [80]

# The whole underlay, to meshd's and control's ports: its nodes' and managers' addresses are
# never a way out all the same.
[[rule]]
name = "web-to-underlay"
action = "allow"
from = ["web"]
to = ["cidr:10.99.0.0/24"]
ports = [4800, 7400, 9480]

[[rule]]
name = "db-to-api"
action = "allow"
from = ["db"]
to = ["dns:api.example.test"]
ports = [81]

[[test]]
from = "web"
to = "{partner}"
port = 80
expect = "allow"

[[test]]
from = "db"
to = "{partner}"
port = 80
expect = "deny"
"#,
        partner = s.partner
    )
}

fn setup() -> Setup {
    let mut servers = Vec::new();
    let mut internet = None;
    // The internet namespace's own address (the second outside one on the tests' underlay) is
    // meshd's name server.
    let lab = Lab::start_configured(2, 1, &[], &[], &["--resolver", "10.99.0.252"], |lab| {
        let (ns, own) = lab.add_outside("internet", 2).expect("the internet namespace");
        let extra: Vec<String> =
            (10..13).map(|k| std::net::Ipv4Addr::from(u32::from(own) - k).to_string()).collect();
        for a in &extra {
            let added =
                lab.exec(&ns, &["ip", "addr", "add", &format!("{a}/24"), "dev", "eth0"]).status().unwrap();
            assert!(added.success());
        }
        let zone = lab.dir().join("zone");
        std::fs::write(&zone, format!("api.example.test {}\n", extra[1])).unwrap();
        let mut dns = talk(
            lab.exec(&ns, &["python3", &script("dns_server.py"), &own.to_string(), zone.to_str().unwrap()]),
        );
        assert_eq!(dns.line(), "listening");
        servers.push(dns.child);
        for (port, name) in [("80", "inet"), ("81", "inet81")] {
            servers
                .push(lab.exec(&ns, &[env!("CARGO_BIN_EXE_mesh-echo"), "http", port, name]).spawn().unwrap());
        }
        assert_eq!(own.to_string(), "10.99.0.252");
        internet = Some((own.to_string(), extra, zone));
        Vec::new()
    });
    let (own, extra, zone) = internet.expect("prepared");
    let on = format!("node.id=={}", lab.node_id(2));
    lab.meshctl(&["network", "create", "front", "--subnet", "10.47.0.0/24"]);
    for service in ["web", "db"] {
        lab.meshctl(&["service", "create", service, "--network", "front", "--constraint", &on]);
    }
    let s = Setup {
        web: lab.workload(2, "web", 1),
        db: lab.workload(2, "db", 1),
        lab,
        own,
        partner: extra[0].clone(),
        first: extra[1].clone(),
        second: extra[2].clone(),
        zone,
        _servers: servers,
    };
    s.lab.wait("the workloads", || {
        std::path::Path::new(&format!("/var/run/netns/{}", s.web)).exists()
            && std::path::Path::new(&format!("/var/run/netns/{}", s.db)).exists()
    });
    s
}

/// `curl URL` from workload namespace `ns`: the body, or `None` if nothing answered.
fn get(s: &Setup, ns: &str, url: &str) -> Option<String> {
    let out = s.lab.exec(ns, &["curl", "-sS", "-f", "-m", "3", url]).output().unwrap();
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn dig(s: &Setup, ns: &str, name: &str) -> String {
    let out = s.lab.exec(ns, &["dig", "+time=2", "+tries=1", "@127.0.0.11", name]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Connections leaving the mesh that host 2 denied from `source` to `port`.
fn denied(s: &Setup, source: &str, port: u16) -> u64 {
    let metrics = s.lab.metrics(2, 9480);
    metrics
        .lines()
        .filter(|l| {
            l.starts_with("mesh_verdicts_total{")
                && l.contains(&format!("source=\"{source}\""))
                && l.contains("kind=\"egress\"")
                && l.contains("verdict=\"deny\"")
                && l.contains(&format!("port=\"{port}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn only_what_a_rule_names_leaves_the_mesh_and_everything_else_is_dropped_and_counted() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let lab = &s.lab;
    // No policy: nothing leaves.
    assert_eq!(get(&s, &s.web, &format!("http://{}/", s.partner)), None);
    lab.apply_policy(&policy(&s));
    // By network and port: the connection leaves from the host's own address.
    lab.wait("web to reach the partner", || get(&s, &s.web, &format!("http://{}/", s.partner)).is_some());
    assert_eq!(
        get(&s, &s.web, &format!("http://{}/x", s.partner)).as_deref(),
        Some("inet GET /x HTTP/1.1\n")
    );
    assert_eq!(get(&s, &s.web, &format!("http://{}/peer", s.partner)), Some(format!("{}\n", lab.addr(2))));
    // Another port, another address, another source; meshd's listener asked straight: denied,
    // counted, whatever `default = "allow"` says.
    let before = denied(&s, "web", 81);
    assert_eq!(get(&s, &s.web, &format!("http://{}:81/", s.partner)), None);
    assert!(denied(&s, "web", 81) > before, "the denied port was not counted");
    let before = denied(&s, "web", 80);
    assert_eq!(get(&s, &s.web, &format!("http://{}/", s.own)), None);
    assert!(denied(&s, "web", 80) > before, "the denied address was not counted");
    assert_eq!(get(&s, &s.db, &format!("http://{}/", s.partner)), None);
    assert_eq!(get(&s, &s.web, "http://127.0.0.1:15002/"), None);
    // UDP and ping go nowhere but the tun device, and are counted there.
    let before = lab.drops(2, "no_route");
    let udp = format!(
        "import socket\ns=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\nfor _ in range(3): s.sendto(b'x',('{}',53))\n",
        s.partner
    );
    assert!(lab.exec(&s.web, &["python3", "-c", &udp]).status().unwrap().success());
    assert!(!lab.exec(&s.web, &["ping", "-c", "1", "-W", "1", &s.partner]).status().unwrap().success());
    lab.wait("the UDP and ping packets counted", || lab.drops(2, "no_route") >= before + 4);

    // By name: its answers, for the port its rule names, for its rule's source.
    lab.wait("web to reach api.example.test", || get(&s, &s.web, "http://api.example.test/").is_some());
    assert_eq!(get(&s, &s.web, &format!("http://{}/", s.first)).as_deref(), Some("inet GET / HTTP/1.1\n"));
    assert_eq!(get(&s, &s.web, &format!("http://{}:81/", s.first)), None);
    assert_eq!(get(&s, &s.db, "http://api.example.test/"), None);
    assert_eq!(get(&s, &s.db, "http://api.example.test:81/").as_deref(), Some("inet81 GET / HTTP/1.1\n"));
    assert_eq!(get(&s, &s.web, &format!("http://{}/", s.second)), None, "not an answer yet");
    // DNS: db's rules name one name, so only that one is looked up; web's name a network, so
    // any name is.
    assert!(dig(&s, &s.db, "other.example.test").contains("status: REFUSED"));
    assert!(dig(&s, &s.db, "api.example.test").contains(&s.first));
    assert!(dig(&s, &s.web, "other.example.test").contains("status: NXDOMAIN"));

    // The answer changes: the new address is allowed, the old one no more.
    std::fs::write(&s.zone, format!("api.example.test {}\n", s.second)).unwrap();
    lab.wait("the new answer to be allowed", || get(&s, &s.web, &format!("http://{}/", s.second)).is_some());
    lab.wait("the old answer to be denied", || get(&s, &s.web, &format!("http://{}/", s.first)).is_none());
    assert_eq!(get(&s, &s.web, "http://api.example.test/").as_deref(), Some("inet GET / HTTP/1.1\n"));
    // The name stops resolving: none of its addresses is allowed.
    std::fs::write(&s.zone, "").unwrap();
    lab.wait("a name that no longer resolves to allow nothing", || {
        get(&s, &s.web, &format!("http://{}/", s.second)).is_none()
    });
    assert!(get(&s, &s.web, &format!("http://{}/", s.partner)).is_some(), "the network rule still holds");

    // Explained as the managers would decide it.
    let explain =
        |port: &str| lab.meshctl(&["policy", "explain", "--from", "web", "--to", &s.partner, "--port", port]);
    assert!(explain("80").contains("allow by rule `web-to-partner`"), "{}", explain("80"));
    assert!(explain("81").contains("deny: no rule lets it leave the mesh"), "{}", explain("81"));
    let named = lab.meshctl(&[
        "policy",
        "explain",
        "--from",
        "web",
        "--to",
        &s.first,
        "--port",
        "80",
        "--name",
        "api.example.test",
    ]);
    assert!(named.contains("allow by rule `web-to-api`"), "{named}");

    // The cluster's own addresses, this host's included, are never a way out, whatever a rule
    // says: the mesh port, the control port, meshd's metrics on the host's address.
    let reserved = || -> u64 {
        lab.metrics(2, 9480)
            .lines()
            .filter(|l| {
                l.starts_with("mesh_verdicts_total{")
                    && l.contains("kind=\"egress\"")
                    && l.contains("rule=\"reserved\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    let before = reserved();
    for (host, port) in [(2, 4800), (1, 7400), (2, 9480)] {
        let probe = format!(
            "import socket\ntry:\n  s=socket.create_connection(('{}',{port}),timeout=3)\n  s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n')\n  print(s.recv(10) or b'closed')\nexcept Exception as e: print('error', e)\n",
            lab.addr(host)
        );
        let out = lab.exec(&s.web, &["python3", "-c", &probe]).output().unwrap();
        let said = String::from_utf8_lossy(&out.stdout);
        assert!(said.contains("error") || said.contains("closed"), "host {host} port {port}: {said}");
    }
    assert!(reserved() >= before + 3, "the cluster's addresses were not refused as reserved");

    // A workload holds at most 1,024 connections leaving the mesh: the next one is closed at
    // once, and counted.
    let flood = format!(
        "import resource,socket\nsoft,hard=resource.getrlimit(resource.RLIMIT_NOFILE)\n\
         resource.setrlimit(resource.RLIMIT_NOFILE,(hard,hard))\nq=b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'\n\
         held=[]\nfor _ in range(1024):\n  c=socket.create_connection(('{}',80),timeout=5); c.sendall(q); assert c.recv(4096); held.append(c)\n\
         s=socket.create_connection(('{}',80),timeout=5)\n\
         try: print(s.recv(10).decode() or 'closed', flush=True)\nexcept Exception as e: print('error', e, flush=True)\n",
        s.partner, s.partner
    );
    let out = lab.exec(&s.web, &["python3", "-c", &flood]).output().unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "closed",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        lab.metrics(2, 9480).lines().any(|l| l.starts_with("mesh_verdicts_total{")
            && l.contains("rule=\"over_quota\"")
            && l.contains("source=\"web\"")),
        "the 1,025th connection was not counted"
    );
    lab.wait("web's connections to be let go", || {
        get(&s, &s.web, &format!("http://{}/", s.partner)).is_some()
    });

    // An open connection is cut once the policy no longer allows it.
    let hold = format!(
        "import socket,sys\ns=socket.create_connection(('{}',80),timeout=5)\nq=b'GET / HTTP/1.1\\r\\nHost: x\\r\\n\\r\\n'\n\
         s.sendall(q); print('open' if s.recv(4096) else 'closed', flush=True)\nsys.stdin.readline()\n\
         try:\n  s.sendall(q); print('answered' if s.recv(4096) else 'closed', flush=True)\n\
         except Exception as e: print('closed', e, flush=True)\n",
        s.partner
    );
    let mut held = lab.talk(&s.web, &["python3", "-c", &hold]);
    assert_eq!(held.line(), "open");
    let denying = policy(&s)
        .replace(
            "name = \"web-to-partner\"\naction = \"allow\"",
            "name = \"web-to-partner\"\naction = \"deny\"",
        )
        .replace("expect = \"allow\"", "expect = \"deny\"");
    lab.apply_policy(&denying);
    lab.wait("a new connection to the partner to be denied", || {
        get(&s, &s.web, &format!("http://{}/", s.partner)).is_none()
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    held.say("go");
    let line = held.line();
    assert!(line.starts_with("closed"), "the open connection was not cut: {line}");
    held.child.wait().unwrap();
}
