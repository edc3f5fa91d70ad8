//! Published ports, as root in a lab of namespaces running the real binaries: control on host 1,
//! meshd on hosts 2-4, and an `outside` namespace on the underlay bridge as the client. `web`
//! (host 2) publishes `8080:80` (HTTP, every node) and `host:7070:7000` (TCP, its own node);
//! `api` (host 3) publishes nothing.
//!
//! * Default deny: nothing published answers until a rule names `ingress`; then each request is
//!   decided (every spelling of a denied path denied), the workload gets the client's address
//!   in `x-forwarded-for` and `ingress` in `x-mesh-client-id`, whatever the client sent.
//! * A port not published is closed on every node; a taken port is reported and retried; the
//!   `ingress=true` label and `--publish-rm` move and close ports.
//! * At the mesh port, as an attacker with a node's or a workload's key: only a node that
//!   publishes a port is admitted as `ingress`, and only to where that port leads; no one else's
//!   word on the client's address is believed; a removed node is refused.

use std::net::{SocketAddr, SocketAddrV4};
use std::sync::Mutex;
use std::time::Duration;

use control::ca::{ClusterCa, Subject};
use mesh_api::ids::NodeId;
use mesh_api::pki::CertInfo;
use mesh_api::tls::Identity;
use mesh_tests::lab::{Lab, in_namespace, readable};
use meshd::identity::WorkloadIdentity;
use meshd::mesh::outbound::{OpenError, Trust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

static ONE_LAB: Mutex<()> = Mutex::new(());

/// web's published HTTP port and its published TCP port.
const HTTP: u16 = 8080;
const TCP: u16 = 7070;

const NO_INGRESS: &str = r#"
default = "allow"

[[rule]]
name = "anyone-reads-web"
action = "allow"
from = ["*"]
to = ["web"]
"#;

const POLICY: &str = r#"
default = "deny"

[[rule]]
name = "public-pages"
action = "allow"
from = ["ingress"]
to = ["web"]
ports = [80]
methods = ["GET"]
paths = ["/public/*"]

[[rule]]
name = "no-secrets"
action = "deny"
from = ["*"]
to = ["web"]
paths = ["/public/secret"]

[[rule]]
name = "echo-from-outside"
action = "allow"
from = ["ingress"]
to = ["web"]
ports = [7000]
protocol = "tcp"

[[rule]]
name = "api-reads-web"
action = "allow"
from = ["api"]
to = ["web"]
ports = [80]
paths = ["/public/*"]
"#;

struct Setup {
    lab: Lab,
    /// The outside namespace and its address.
    outside: String,
    outside_address: String,
    /// web's endpoint address on `front`.
    web_address: String,
}

/// The lab with `web` and `api` placed, `NO_INGRESS` in force; `label` hosts labelled
/// `ingress=true` first; `block` a port held on host 4 before web publishes.
fn setup(label: &[usize], block: Option<u16>) -> (Setup, Option<std::process::Child>) {
    let lab = Lab::start(4);
    let on = |i: usize| format!("node.id=={}", lab.node_id(i));
    for &i in label {
        lab.meshctl(&["node", "update", &lab.node_id(i), "--label-add", "ingress=true"]);
    }
    let (outside, outside_address) = lab.add_outside("out", 1).expect("the outside namespace");
    let blocker = block.map(|port| {
        let code = format!(
            "import socket,time\ns=socket.socket()\ns.bind(('0.0.0.0',{port}))\ns.listen()\nprint('bound',flush=True)\ntime.sleep(120)\n"
        );
        let mut blocker = lab.talk(&lab.host(4), &["python3", "-c", &code]);
        assert_eq!(blocker.line(), "bound");
        blocker.child
    });
    lab.meshctl(&["network", "create", "front", "--subnet", "10.46.0.0/24"]);
    let web = format!("{e} tcp 7000 & exec {e} http 80 web", e = env!("CARGO_BIN_EXE_mesh-echo"));
    let mut args: Vec<String> = [
        "service",
        "create",
        "web",
        "--network",
        "front",
        "--port",
        "80/http",
        "--port",
        "7000/tcp",
        "--publish",
        "8080:80",
        "--publish",
        "host:7070:7000",
        "--constraint",
        &on(2),
        "--command",
        &web,
    ]
    .map(String::from)
    .to_vec();
    args.extend(readable());
    let created = lab.meshctl(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(created.contains("published: ingress:8080:80/http"), "{created}");
    assert!(created.contains("published: host:7070:7000/tcp"), "{created}");
    lab.meshctl(&[
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
        mesh_tests::lab::SERVE_V,
        "--env",
        "V=api",
    ]);
    lab.apply_policy(NO_INGRESS);
    let web: serde_json::Value = serde_json::from_str(&lab.meshctl(&["service", "inspect", "web"])).unwrap();
    let web_address = web["endpoints"][0]["addresses"]["front"].as_str().unwrap().to_owned();
    (Setup { lab, outside, outside_address: outside_address.to_string(), web_address }, blocker)
}

/// A request from outside to host `i`'s `port`: (status, body); status 0 when nothing answered
/// (the connection refused or closed).
fn curl(s: &Setup, i: usize, port: u16, args: &[&str], target: &str) -> (u16, String) {
    let mut cmd = s.lab.exec(&s.outside, &["curl", "-sS", "-m", "3", "--path-as-is", "-w", "\n%{http_code}"]);
    cmd.args(args);
    let out = cmd.arg(format!("http://{}:{port}{target}", s.lab.addr(i))).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Sends `message` from outside to host `i`'s `port` and returns what came back, or the error.
fn tcp(s: &Setup, i: usize, port: u16, message: &str) -> String {
    let code = format!(
        "import socket,sys\ntry:\n  s=socket.create_connection(('{}',{port}),timeout=3)\n  s.sendall(b'{message}')\n  sys.stdout.write(s.recv(100).decode() or 'closed')\nexcept Exception as e:\n  sys.stdout.write('error: '+str(e))\n",
        s.lab.addr(i)
    );
    let out = s.lab.exec(&s.outside, &["python3", "-c", &code]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `service ps web --published`: (host name, publish, state, error) per row.
fn published(s: &Setup) -> Vec<(String, String, String, String)> {
    let ps = s.lab.meshctl(&["service", "ps", "web", "--published", "--format", "json"]);
    let rows: Vec<serde_json::Value> = serde_json::from_str(&ps).unwrap();
    rows.iter()
        .map(|r| {
            let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (text("hostname"), text("publish"), text("state"), text("error"))
        })
        .collect()
}

#[test]
fn a_published_port_answers_from_outside_only_as_the_policy_allows_ingress() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let (s, blocker) = setup(&[], Some(HTTP));
    let lab = &s.lab;
    // No rule names `ingress`: `*` and `default = "allow"` do not let it in. Every node with a
    // data plane publishes 8080 (none is labelled), host 4 once its port is free.
    for i in [2, 3] {
        lab.wait("8080 to answer, denied", || curl(&s, i, HTTP, &[], "/public/a").0 == 403);
        let (_, body) = curl(&s, i, HTTP, &[], "/public/a");
        assert!(body.contains("ingress -> web:80 GET /public/a: deny by default"), "{body}");
    }
    let denied = tcp(&s, 2, TCP, "hello");
    assert!(denied == "closed" || denied.contains("reset"), "a denied client got {denied:?}");
    // The taken port: reported as failed with the reason, in `service ps` and `meshd status`.
    let h4 = lab.host(4);
    lab.wait("host 4's port reported taken", || {
        published(&s).iter().any(|(h, p, state, e)| {
            h == &h4 && p == "ingress:8080:80/http" && state == "failed" && e.contains("in use")
        })
    });
    let status = lab.status(4);
    let error = status["published"][0]["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains(&format!("cannot listen on 0.0.0.0:{HTTP}")), "{status}");
    let table = lab.meshctl(&["service", "ps", "web"]);
    assert!(table.contains("PUBLISHED") && table.contains("failed"), "{table}");
    // Freed, it is bound within a few seconds, without any change to the service.
    if let Some(mut blocker) = blocker {
        blocker.kill().unwrap();
        blocker.wait().unwrap();
    }
    lab.wait("host 4 to publish once the port is free", || curl(&s, 4, HTTP, &[], "/public/a").0 == 403);
    lab.wait("every publishing node reported listening", || {
        let rows = published(&s);
        let http: Vec<_> = rows.iter().filter(|r| r.1 == "ingress:8080:80/http").collect();
        let tcp: Vec<_> = rows.iter().filter(|r| r.1 == "host:7070:7000/tcp").collect();
        http.len() == 3
            && http.iter().all(|r| r.2 == "listening")
            && tcp.len() == 1
            && tcp[0].0 == lab.host(2)
    });

    // The policy names `ingress`: each request is decided like mesh traffic.
    lab.apply_policy(POLICY);
    for i in [2, 3, 4] {
        lab.wait("8080 to allow public pages", || curl(&s, i, HTTP, &[], "/public/a").0 == 200);
        assert_eq!(curl(&s, i, HTTP, &[], "/public/a").1, "web GET /public/a HTTP/1.1\n");
        let h2 = curl(&s, i, HTTP, &["--http2-prior-knowledge"], "/public/a");
        assert_eq!(h2, (200, "web GET /public/a HTTP/2.0\n".to_owned()));
    }
    // Denied whatever the spelling, the method, the version.
    for target in [
        "/public/secret",
        "/public/%73ecret",
        "/public/./secret",
        "/public//secret",
        "/public/x/../secret",
        "/admin",
        "/public/../admin",
        "/PUBLIC/a",
    ] {
        for args in [&[][..], &["--http2-prior-knowledge"][..]] {
            let (status, body) = curl(&s, 3, HTTP, args, target);
            assert!(status == 403 || status == 400, "{target} {args:?}: {status} {body}");
        }
    }
    assert_eq!(curl(&s, 2, HTTP, &["-X", "POST"], "/public/a").0, 403);
    assert_eq!(curl(&s, 2, HTTP, &["-X", "DELETE"], "/public/a").0, 403);
    // Two requests on one connection: each decided, the second denied.
    let (first, second) =
        (format!("http://{}:{HTTP}/public/a", lab.addr(4)), format!("http://{}:{HTTP}/admin", lab.addr(4)));
    let out = lab
        .exec(
            &s.outside,
            &[
                "curl",
                "-sS",
                "-m",
                "3",
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{num_connects}\n",
                &first,
                &second,
            ],
        )
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), "200 1\n403 0\n");
    // Who calls, and from where, as the mesh says: never what the client said of itself.
    let forged = [
        "-H",
        "x-forwarded-for: 203.0.113.66",
        "-H",
        "x-forwarded-for: 203.0.113.67",
        "-H",
        "forwarded: for=203.0.113.68",
        "-H",
        "x-mesh-client-id: spiffe://forged/svc/admin",
        "-H",
        "x-mesh-ingress-client: 203.0.113.69:1",
        // Spellings a CGI or WSGI server reads as the real ones (`_` as `-`), a header of its
        // own, and a `Connection` that would have a proxy behind the workload drop the mesh's.
        "-H",
        "x_forwarded_for: 203.0.113.70",
        "-H",
        "x_mesh_client_id: spiffe://forged/svc/admin",
        "-H",
        "x-real-ip: 203.0.113.71",
        "-H",
        "connection: keep-alive, x-forwarded-for, X_Mesh_Client_Id",
    ];
    for i in [2, 4] {
        let (status, body) = curl(&s, i, HTTP, &forged, "/public/client");
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body,
            format!("x-mesh-client-id: ingress\nx-forwarded-for: {}\n", s.outside_address),
            "host {i}"
        );
    }
    // The opaque TCP port, on the node that runs web only.
    assert_eq!(tcp(&s, 2, TCP, "hello"), "hello");
    for i in [3, 4] {
        assert!(tcp(&s, i, TCP, "hello").contains("refused"), "host {i} publishes 7070");
    }
    // What is not published is closed on every node: web's and api's own ports, any other.
    for i in [2, 3, 4] {
        for port in [80, 7000, 9999, 8081] {
            assert!(tcp(&s, i, port, "x").contains("refused"), "host {i} answers on {port}");
        }
    }
    let counted = lab.metrics(3, 9480);
    assert!(
        counted.lines().any(|l| l.starts_with("mesh_ingress_connections_total{outcome=\"ok\"}")),
        "{counted}"
    );

    // Labelled: only host 4 publishes 8080 now; the others close it.
    lab.meshctl(&["node", "update", &lab.node_id(4), "--label-add", "ingress=true"]);
    for i in [2, 3] {
        lab.wait("the unlabelled nodes to close 8080", || tcp(&s, i, HTTP, "x").contains("refused"));
    }
    assert_eq!(curl(&s, 4, HTTP, &[], "/public/a").0, 200);
    // Unpublished: closed everywhere.
    lab.meshctl(&["service", "update", "web", "--publish-rm", "8080"]);
    lab.wait("8080 to close on host 4", || tcp(&s, 4, HTTP, "x").contains("refused"));
    assert_eq!(tcp(&s, 2, TCP, "again"), "again");
    // Bad publishes are refused with the reason.
    let refused = lab.meshctl_output(&["service", "update", "api", "--publish-add", "7070:80"]);
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && why.contains("port 7070 is published by service `web`"), "{why}");
    let refused = lab.meshctl_output(&["service", "update", "api", "--publish-add", "9000:80/tcp"]);
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && why.contains("port 80 is `http`"), "{why}");

    // A flood from one client: 256 connections held, the next one closed at once; the others'
    // clients are served meanwhile, and the flood's own once it lets go.
    let flood = format!(
        "import socket,sys\nheld=[socket.create_connection(('{a}',{TCP}),timeout=5) for _ in range(256)]\n\
         for h in held: h.sendall(b'x'); h.recv(1)\n\
         s=socket.create_connection(('{a}',{TCP}),timeout=5)\n\
         try: print(s.recv(10).decode() or 'closed', flush=True)\nexcept Exception as e: print('error', e, flush=True)\n\
         sys.stdin.readline()\n",
        a = lab.addr(2)
    );
    let mut flooding = lab.talk(&s.outside, &["python3", "-c", &flood]);
    assert_eq!(flooding.line(), "closed", "the 257th connection from one client");
    let (other, _) = lab.add_outside("other", 3).expect("a second client");
    let other_tcp = format!(
        "import socket\ns=socket.create_connection(('{}',{TCP}),timeout=3)\ns.sendall(b'hi')\nprint(s.recv(10).decode())\n",
        lab.addr(2)
    );
    let out = lab.exec(&other, &["python3", "-c", &other_tcp]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "hi", "another client during the flood");
    drop(flooding.child.stdin.take());
    flooding.child.wait().unwrap();
    lab.wait("the flooding client to be served again", || tcp(&s, 2, TCP, "back") == "back");
    let counted = lab.metrics(2, 9480);
    assert!(
        counted.lines().any(|l| l.starts_with("mesh_ingress_connections_total{outcome=\"over_quota\"}")),
        "{counted}"
    );
}

#[test]
fn only_a_node_that_publishes_a_port_is_admitted_as_ingress_and_only_where_it_leads() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    // Host 4 alone publishes 8080 (labelled); 7070 is host 2's.
    let (s, _) = setup(&[4], None);
    let lab = &s.lab;
    lab.apply_policy(POLICY);
    lab.wait("host 4 to publish 8080", || curl(&s, 4, HTTP, &[], "/public/a").0 == 200);
    assert!(tcp(&s, 3, HTTP, "x").contains("refused"));

    let control = lab.manager_dir(1);
    let ca = ClusterCa::load(&std::fs::read_to_string(control.join("ca.crt")).unwrap(), &lab.ca_key).unwrap();
    let roots = std::sync::Arc::new(mesh_api::trust::Trust::from_pem(ca.cert_pem()).unwrap());
    let node_identity = |i: usize| {
        let cert_pem = std::fs::read_to_string(lab.node_dir(i).join("node.crt")).unwrap();
        let key_pem = std::fs::read_to_string(lab.node_dir(i).join("node.key")).unwrap();
        let not_after = CertInfo::from_pem(&cert_pem).unwrap().not_after;
        WorkloadIdentity { identity: Identity { cert_pem, key_pem }, not_after }
    };
    let cluster: mesh_api::ids::ClusterId =
        CertInfo::from_pem(&node_identity(2).identity.cert_pem).unwrap().organization.parse().unwrap();
    let cluster_text = cluster.to_string();
    let workload = |service: &str, host: usize| {
        let node: NodeId = lab.node_id(host).parse().unwrap();
        let subject = Subject::workload(&cluster, service, 1, &node, Duration::from_secs(3600));
        let (cert_pem, key_pem) = ca.issue_with_new_key(&subject).unwrap();
        WorkloadIdentity { identity: Identity { cert_pem, key_pem }, not_after: subject.not_after }
    };
    let h2: NodeId = lab.node_id(2).parse().unwrap();
    let mesh: SocketAddr = format!("{}:4800", lab.addr(2)).parse().unwrap();
    // A GET /public/client at web's `port` through host 2's mesh port, saying it carries
    // `client`: the answer, or the refusal.
    let call = |identity: WorkloadIdentity, port: u16, client: Option<&str>| -> Result<String, OpenError> {
        let target: SocketAddrV4 = format!("{}:{port}", s.web_address).parse().unwrap();
        let client = client.map(|c| c.parse().unwrap());
        in_namespace(&lab.host(3), || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                let trust = Trust { roots: roots.clone(), cluster: &cluster_text };
                let mut tunnel =
                    meshd::mesh::outbound::connect_for(trust, &identity, &h2, mesh, target, client).await?;
                let ask = if port == 80 {
                    b"GET /public/client HTTP/1.1\r\nhost: web\r\nconnection: close\r\n\r\n".to_vec()
                } else {
                    b"echo".to_vec()
                };
                tunnel.write_all(&ask).await.unwrap();
                let mut answer = vec![0; 4096];
                let mut read = 0;
                while let Ok(n) = tunnel.read(&mut answer[read..]).await {
                    if n == 0 || port != 80 {
                        read += n;
                        break;
                    }
                    read += n;
                }
                Ok(String::from_utf8_lossy(&answer[..read]).into_owned())
            })
        })
    };
    let refused = |r: Result<String, OpenError>| match r {
        Err(OpenError::Refused { status, reason }) => (status, reason),
        other => panic!("expected a refusal, got {other:?}"),
    };
    // Host 4 publishes 8080 -> web:80: admitted there, its word on the client taken.
    let answer = call(node_identity(4), 80, Some("192.0.2.9:5555")).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("x-mesh-client-id: ingress\nx-forwarded-for: 192.0.2.9\n"), "{answer}");
    // ... and nowhere else: web's TCP port is published by host 2 only.
    let (status, reason) = refused(call(node_identity(4), 7000, Some("192.0.2.9:5555")));
    assert_eq!(status, 403);
    assert!(reason.contains("publishes no port leading to `web`:7000"), "{reason}");
    // Host 3 publishes nothing: its node key gets it nothing, though it hosts api.
    let (status, reason) = refused(call(node_identity(3), 80, Some("192.0.2.9:5555")));
    assert_eq!(status, 403);
    assert!(reason.contains("publishes no port of a service here"), "{reason}");
    // A workload's key (api, allowed to web's public pages) cannot speak for a client: the mesh
    // says who it is and adds no address.
    let answer = call(workload("api", 3), 80, Some("203.0.113.7:1")).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-mesh-client-id: spiffe://") && answer.contains("/svc/api\n"), "{answer}");
    assert!(!answer.contains("x-forwarded-for") && !answer.contains("203.0.113.7"), "{answer}");
    // A workload certificate naming the reserved service (as only a CA key could make) is refused.
    let (status, reason) = refused(call(workload("ingress", 4), 80, None));
    assert_eq!(status, 403);
    assert!(reason.contains("a name no service may have"), "{reason}");
    // A removed node is refused at once, and publishing moves to the nodes left (none is
    // labelled any more: all of them).
    lab.meshctl(&["node", "rm", &lab.node_id(4)]);
    lab.wait("the removed node to be refused", || {
        matches!(call(node_identity(4), 80, None), Err(OpenError::Refused { status: 403, .. }))
    });
    let (_, reason) = refused(call(node_identity(4), 80, None));
    assert!(reason.contains("removed node"), "{reason}");
    lab.wait("the remaining nodes to publish 8080", || curl(&s, 3, HTTP, &[], "/public/a").0 == 200);
    assert_eq!(curl(&s, 2, HTTP, &[], "/public/a").0, 200);
}

/// Connections through a published port spread over the service's endpoints as mesh
/// connections do, and skip an endpoint whose node stops answering.
#[test]
fn published_connections_spread_over_endpoints_and_skip_a_failed_one() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let mut lab = Lab::start(4);
    for i in [3, 4] {
        lab.meshctl(&["node", "update", &lab.node_id(i), "--label-add", "zone=b"]);
    }
    let (outside, _) = lab.add_outside("out", 1).expect("the outside namespace");
    lab.meshctl(&["network", "create", "front", "--subnet", "10.45.0.0/24"]);
    // Each endpoint answers with its host name (its namespace's: PREFIX-hN-web-SLOT).
    let serve =
        "cat /proc/sys/kernel/hostname > /tmp/index.html && cd /tmp && exec python3 -m http.server 80";
    lab.meshctl(&[
        "service",
        "create",
        "web",
        "--network",
        "front",
        "--port",
        "80/http",
        "--replicas",
        "2",
        "--constraint",
        "node.labels.zone==b",
        "--publish",
        "9090:80",
        "--command",
        serve,
    ]);
    lab.apply_policy(
        "[[rule]]\nname = \"public\"\naction = \"allow\"\nfrom = [\"ingress\"]\nto = [\"web\"]\nports = [80]\n",
    );
    // From outside, through host 2 (no endpoint there): who answered each of 12 connections.
    let answers = |lab: &Lab| -> Vec<String> {
        (0..12)
            .map(|_| {
                let url = format!("http://{}:9090/", lab.addr(2));
                let out = lab.exec(&outside, &["curl", "-sS", "-f", "-m", "3", &url]).output().unwrap();
                String::from_utf8_lossy(&out.stdout).trim().to_owned()
            })
            .collect()
    };
    let (h3, h4) = (format!("{}-web-", lab.host(3)), format!("{}-web-", lab.host(4)));
    lab.wait("both endpoints to answer through the published port", || {
        let seen = answers(&lab);
        seen.iter().any(|a| a.starts_with(&h3)) && seen.iter().any(|a| a.starts_with(&h4))
    });
    let seen = answers(&lab);
    assert!(seen.iter().all(|a| a.starts_with(&h3) || a.starts_with(&h4)), "{seen:?}");
    assert!(seen.iter().filter(|a| a.starts_with(&h3)).count() >= 3, "not spread: {seen:?}");
    assert!(seen.iter().filter(|a| a.starts_with(&h4)).count() >= 3, "not spread: {seen:?}");
    // Host 4 goes away: every connection is still answered, by host 3's endpoint.
    lab.stop_meshd(4);
    let seen = answers(&lab);
    assert!(seen.iter().all(|a| a.starts_with(&h3)), "a failed endpoint was not skipped: {seen:?}");
}
