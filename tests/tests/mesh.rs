//! The mTLS mesh end to end, as root: a lab of namespaces running the real control plane and
//! meshd; `web` on host 2 calls `api` on host 3 through both meshd; the policy decides per
//! request; the mesh port is attacked with missing, wrong, expired and removed identities;
//! workloads cannot go around the mesh.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, SocketAddrV4};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use control::ca::{ClusterCa, Subject};
use mesh_api::ids::NodeId;
use mesh_api::pki::CertInfo;
use mesh_api::tls::Identity;
use mesh_tests::lab::{Lab, Program, in_namespace, readable, script};
use meshd::identity::WorkloadIdentity;
use meshd::mesh::outbound::{OpenError, Trust};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Labs run one at a time: they share the machine's two cores.
static ONE_LAB: Mutex<()> = Mutex::new(());

const POLICY: &str = r#"
default = "deny"

[[rule]]
name = "web-reads-items"
action = "allow"
from = ["web"]
to = ["api"]
ports = [80]
methods = ["GET", "HEAD"]
paths = ["/v1/items", "/v1/items/*"]

[[rule]]
name = "no-deletes"
action = "deny"
from = ["*"]
to = ["api"]
methods = ["DELETE"]

[[rule]]
name = "web-opens-echo"
action = "allow"
from = ["web"]
to = ["api"]
ports = [7000]
protocol = "tcp"

[[rule]]
name = "web-calls-echo-say"
action = "allow"
from = ["web"]
to = ["api"]
ports = [80]
methods = ["POST"]
paths = ["/echo.Echo/Say"]

[[test]]
from = "web"
to = "api"
port = 80
method = "GET"
path = "/v1/items/7"
expect = "allow"
"#;

struct Setup {
    lab: Lab,
    web: String,
    api_vip: String,
    api_address: String,
    other_vip: String,
}

fn echo() -> &'static str {
    env!("CARGO_BIN_EXE_mesh-echo")
}

fn inspect(lab: &Lab, service: &str) -> serde_json::Value {
    serde_json::from_str(&lab.meshctl(&["service", "inspect", service])).unwrap()
}

fn setup() -> Setup {
    let lab = Lab::start(3);
    let on = |i: usize| format!("node.id=={}", lab.node_id(i));
    lab.meshctl(&["network", "create", "front", "--subnet", "10.41.0.0/24"]);
    lab.meshctl(&["network", "create", "back", "--subnet", "10.42.0.0/24"]);
    let api = format!("{e} http 80 api & {e} tcp 7000 & exec {e} tcp 7001", e = echo());
    let readable = readable();
    lab.meshctl(&["service", "create", "web", "--network", "front", "--constraint", &on(2)]);
    lab.meshctl(&[
        "service",
        "create",
        "api",
        "--network",
        "front",
        "--port",
        "80/http",
        "--port",
        "7000",
        "--port",
        "7001",
        "--constraint",
        &on(3),
        "--command",
        &api,
        readable[0].as_str(),
        readable[1].as_str(),
    ]);
    let other = format!("exec {} http 80 other", echo());
    lab.meshctl(&[
        "service",
        "create",
        "other",
        "--network",
        "back",
        "--port",
        "80/http",
        "--constraint",
        &on(3),
        "--command",
        &other,
        readable[0].as_str(),
        readable[1].as_str(),
    ]);
    lab.apply_policy(POLICY);
    let api = inspect(&lab, "api");
    let s = Setup {
        web: lab.workload(2, "web", 1),
        api_vip: api["vips"]["front"].as_str().unwrap().to_owned(),
        api_address: api["endpoints"][0]["addresses"]["front"].as_str().unwrap().to_owned(),
        other_vip: inspect(&lab, "other")["vips"]["back"].as_str().unwrap().to_owned(),
        lab,
    };
    let url = format!("http://{}/v1/items", s.api_vip);
    s.lab.wait("web to reach api through the mesh", || curl(&s.lab, &s.web, &[&url]).0 == 200);
    s
}

/// curl from `ns`: (status, body). Status 0 when no HTTP answer came.
fn curl(lab: &Lab, ns: &str, args: &[&str]) -> (u16, String) {
    let out = lab.exec(ns, &["curl", "-sS", "-m", "3", "-w", "\n%{http_code}"]).args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Sends `message` to `address:port` from `ns` over plain TCP; returns what came back.
fn tcp_exchange(lab: &Lab, ns: &str, address: &str, port: u16, message: &str) -> String {
    let code = format!(
        "import socket,sys\ns=socket.create_connection(('{address}',{port}),timeout=3)\ns.sendall(b'{message}')\n\
         try:\n  sys.stdout.write(s.recv(100).decode())\nexcept Exception as e:\n  sys.stdout.write('error: '+str(e))\n"
    );
    let out = lab.exec(ns, &["python3", "-c", &code]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// Asks `address:80` from `ns` for an HTTP/1.1 upgrade to `protocol` on `path`, then sends
/// `message` on the connection. Returns the status line and whatever came back after the head.
fn upgrade_exchange(lab: &Lab, ns: &str, address: &str, path: &str, protocol: &str, message: &str) -> String {
    let code = format!(
        "import socket,sys\ns=socket.create_connection(('{address}',80),timeout=3)\n\
         s.sendall(b'GET {path} HTTP/1.1\\r\\nHost: api\\r\\nConnection: Upgrade\\r\\nUpgrade: {protocol}\\r\\n\\r\\n')\n\
         head=b''\nwhile b'\\r\\n\\r\\n' not in head:\n  c=s.recv(1)\n  if not c: break\n  head+=c\n\
         sys.stdout.write(head.split(b'\\r\\n')[0].decode()+'\\n')\n\
         s.sendall(b'{message}')\n\
         try:\n  sys.stdout.write(s.recv(200).decode())\nexcept Exception as e:\n  sys.stdout.write('error: '+str(e))\n"
    );
    let out = lab.exec(ns, &["python3", "-c", &code]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
}

/// A gRPC call from `ns` to `address:80` (HTTP/2 with prior knowledge, a length-prefixed
/// message): (HTTP status, the answer's data, its trailers).
fn grpc_call(ns: &str, address: &str, method: &str, message: &[u8]) -> (u16, Vec<u8>, hyper::HeaderMap) {
    use http_body_util::{BodyExt, Full};
    let mut framed = vec![0u8];
    framed.extend((message.len() as u32).to_be_bytes());
    framed.extend(message);
    let address: std::net::Ipv4Addr = address.parse().unwrap();
    in_namespace(ns, || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect((address, 80)).await.unwrap();
            let io = hyper_util::rt::TokioIo::new(tcp);
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(hyper_util::rt::TokioExecutor::new(), io)
                    .await
                    .unwrap();
            tokio::spawn(connection);
            let request = hyper::Request::post(format!("http://api{method}"))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(Full::new(bytes::Bytes::from(framed)))
                .unwrap();
            let call = sender.send_request(request);
            let response = tokio::time::timeout(Duration::from_secs(5), call).await.unwrap().unwrap();
            let status = response.status().as_u16();
            let body = response.into_body().collect().await.unwrap();
            let trailers = body.trailers().cloned().unwrap_or_default();
            (status, body.to_bytes().to_vec(), trailers)
        })
    })
}

#[test]
fn requests_through_the_mesh_are_decided_one_by_one() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let (lab, web) = (&s.lab, s.web.as_str());
    let items = format!("http://{}/v1/items", s.api_vip);
    // Allowed, answered by api on the other host; by virtual IP and by name; HTTP/1.1 and HTTP/2.
    assert_eq!(curl(lab, web, &[&items]), (200, "api GET /v1/items HTTP/1.1\n".into()));
    assert_eq!(curl(lab, web, &["http://api/v1/items/7"]).0, 200);
    assert_eq!(
        curl(lab, web, &["--http2-prior-knowledge", &items]),
        (200, "api GET /v1/items HTTP/2.0\n".into())
    );
    // Denied: 403 naming the rule, or the default, with a request ID.
    let (code, body) = curl(lab, web, &["-X", "DELETE", &format!("{items}/7")]);
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("deny by rule `no-deletes`") && body.contains("request id: "), "{body}");
    let (code, body) = curl(lab, web, &["-X", "POST", &items]);
    assert_eq!(code, 403);
    assert!(body.contains("web -> api:80 POST /v1/items: deny by default"), "{body}");
    let (code, body) = curl(lab, web, &["--http2-prior-knowledge", &format!("http://{}/admin", s.api_vip)]);
    assert_eq!(code, 403, "HTTP/2 requests are decided one by one too: {body}");
    // The workload learns who calls from the mesh; a caller cannot claim to be someone else.
    let whoami = format!("{items}/whoami");
    let (code, ids) = curl(lab, web, &["-H", "x-mesh-client-id: spiffe://forged/svc/admin", &whoami]);
    assert_eq!(code, 200);
    assert_eq!(ids, format!("spiffe://{}/svc/web\n", lab.cluster_id()), "{ids}");
    // An upgrade (WebSocket-like) the policy allows: 101, then the bytes relayed both ways.
    let live = upgrade_exchange(lab, web, &s.api_vip, "/v1/items/live", "websocket", "ping-through-the-mesh");
    assert_eq!(live, "HTTP/1.1 101 Switching Protocols\nping-through-the-mesh", "{live}");
    // One it does not: 403 before anything reaches api.
    let admin = upgrade_exchange(lab, web, &s.api_vip, "/admin", "websocket", "x");
    assert!(admin.starts_with("HTTP/1.1 403 Forbidden\n"), "{admin}");
    // An upgrade to cleartext HTTP/2 would carry requests past the policy unseen: declined, the
    // request answered as a plain HTTP/1.1 one (api, which accepts any upgrade, never saw it).
    let h2c = upgrade_exchange(lab, web, &s.api_vip, "/v1/items", "h2c", "");
    assert!(h2c.starts_with("HTTP/1.1 200 OK\n"), "{h2c}");
    // gRPC: the call allowed by method and path, its message and trailers carried both ways;
    // another method of the same service refused (403, which gRPC reads as PERMISSION_DENIED).
    let (status, data, trailers) = grpc_call(web, &s.api_vip, "/echo.Echo/Say", b"hello over grpc");
    assert_eq!(status, 200);
    assert_eq!(&data[5..], b"hello over grpc", "{data:?}");
    assert_eq!(trailers.get("grpc-status").map(|v| v.as_bytes()), Some(&b"0"[..]), "{trailers:?}");
    assert_eq!(trailers.get("x-echo-name").map(|v| v.as_bytes()), Some(&b"api"[..]), "{trailers:?}");
    assert_eq!(grpc_call(web, &s.api_vip, "/echo.Echo/Shout", b"x").0, 403);
    // Opaque TCP: the L4 rule at connect time.
    assert_eq!(tcp_exchange(lab, web, &s.api_vip, 7000, "hello"), "hello");
    assert!(!tcp_exchange(lab, web, &s.api_vip, 7001, "hello").contains("hello"), "7001 has no rule");
    // A service on another network: no name, no listener for its address.
    assert_eq!(curl(lab, web, &[&format!("http://{}/", s.other_vip)]).0, 0);
    assert_eq!(curl(lab, web, &["http://other/"]).0, 0);
    // Counted by rule on the destination's meshd; the denial is logged there with its ID.
    let m = lab.metrics(3, 9480);
    for want in [
        r#"rule="no-deletes""#,
        r#"verdict="deny""#,
        r#"rule="web-reads-items""#,
        "mesh_request_duration_seconds_bucket",
        "mesh_workload_certificate_expiry_timestamp_seconds{endpoint=\"api.1\"}",
        "mesh_overlay_drops_total{reason=\"filtered\"}",
    ] {
        assert!(m.contains(want), "metrics lack {want}:\n{m}");
    }
    let log = std::fs::read_to_string(lab.log(Program::Meshd, 3)).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("request denied") && l.contains("no-deletes") && l.contains("request_id"))
    );
}

#[test]
fn workloads_cannot_go_around_the_mesh() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let (lab, web) = (&s.lab, s.web.as_str());
    // Straight to api's own address: HTTP has no L4 rule, so the packets are dropped at host 3.
    let before = lab.drops(3, "filtered");
    assert_eq!(
        curl(lab, web, &["--connect-timeout", "1", &format!("http://{}/v1/items", s.api_address)]).0,
        0
    );
    assert!(lab.drops(3, "filtered") > before, "dropped by the filter on the destination");
    // What an L4 rule allows passes straight, replies included; ping too.
    assert_eq!(tcp_exchange(lab, web, &s.api_address, 7000, "direct"), "direct");
    assert!(lab.exec(web, &["ping", "-c", "1", "-W", "2", &s.api_address]).status().unwrap().success());
}

/// Identities at the mesh port, tried as an attacker would, from host 2's namespace.
#[test]
fn the_mesh_port_refuses_callers_without_a_valid_workload_identity() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let lab = &s.lab;
    let control = lab.manager_dir(1);
    let ca = ClusterCa::load(&std::fs::read_to_string(control.join("ca.crt")).unwrap(), &lab.ca_key).unwrap();
    let node_pem = std::fs::read_to_string(lab.node_dir(2).join("node.crt")).unwrap();
    let cluster: mesh_api::ids::ClusterId =
        CertInfo::from_pem(&node_pem).unwrap().organization.parse().unwrap();
    let (h2, h3): (NodeId, NodeId) = (lab.node_id(2).parse().unwrap(), lab.node_id(3).parse().unwrap());
    let issue = |service: &str, node: &NodeId, lifetime: Duration, shift: i64| {
        let mut subject = Subject::workload(&cluster, service, 1, node, lifetime);
        subject.not_before -= time::Duration::hours(shift);
        subject.not_after -= time::Duration::hours(shift);
        let (cert_pem, key_pem) = ca.issue_with_new_key(&subject).unwrap();
        WorkloadIdentity { identity: Identity { cert_pem, key_pem }, not_after: subject.not_after }
    };
    let mesh: SocketAddr = format!("{}:4800", lab.addr(3)).parse().unwrap();
    let target: SocketAddrV4 = format!("{}:80", s.api_address).parse().unwrap();
    let roots = std::sync::Arc::new(mesh_api::trust::Trust::from_pem(ca.cert_pem()).unwrap());
    let cluster_text = cluster.to_string();
    let get = |identity: WorkloadIdentity| -> Result<String, OpenError> {
        in_namespace(&lab.host(2), || {
            tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
                let trust = Trust { roots: roots.clone(), cluster: &cluster_text };
                let mut tunnel = meshd::mesh::outbound::connect(trust, &identity, &h3, mesh, target).await?;
                tunnel
                    .write_all(b"GET /v1/items HTTP/1.1\r\nhost: api\r\nconnection: close\r\n\r\n")
                    .await
                    .unwrap();
                let mut answer = String::new();
                tunnel.read_to_string(&mut answer).await.unwrap();
                Ok(answer)
            })
        })
    };
    let hour = Duration::from_secs(3600);
    // The baseline: a good certificate for web works from outside meshd too.
    let answer = get(issue("web", &h2, hour, 0)).expect("a valid web certificate");
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("api GET /v1/items HTTP/1.1\n"),
        "{answer}"
    );
    // A service on another network.
    let refused = |r: Result<String, OpenError>| match r {
        Err(OpenError::Refused { status, reason }) => (status, reason),
        other => panic!("expected a refusal, got {other:?}"),
    };
    let (status, reason) = refused(get(issue("other", &h3, hour, 0)));
    assert_eq!(status, 403);
    assert!(reason.contains("`other` is not on network `front`"), "{reason}");
    // A node certificate is not a workload's.
    let node = WorkloadIdentity {
        identity: Identity {
            cert_pem: node_pem.clone(),
            key_pem: std::fs::read_to_string(lab.node_dir(2).join("node.key")).unwrap(),
        },
        not_after: CertInfo::from_pem(&node_pem).unwrap().not_after,
    };
    let (status, reason) = refused(get(node));
    assert_eq!(status, 403);
    // A node's certificate speaks only for the published ports that node carries: it has none.
    assert!(reason.contains("publishes no port of a service here"), "{reason}");
    // Expired: the server ends the handshake (in TLS 1.3 the client learns it at its first
    // write), so no stream opens.
    assert!(matches!(get(issue("web", &h2, hour, 2)), Err(OpenError::Unreachable(_))));
    // From another CA: the handshake fails.
    let rogue = ClusterCa::generate(&cluster).unwrap();
    let (cert_pem, key_pem) =
        rogue.issue_with_new_key(&Subject::workload(&cluster, "web", 1, &h2, hour)).unwrap();
    let rogue = WorkloadIdentity {
        identity: Identity { cert_pem, key_pem },
        not_after: time::OffsetDateTime::now_utc(),
    };
    assert!(matches!(get(rogue), Err(OpenError::Unreachable(_))));
    // No client certificate at all: TLS refuses.
    let no_cert = in_namespace(&lab.host(2), || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
            let config = mesh_api::tls::client_config(mesh_api::tls::ServerTrust::FetchCaOnly, None).unwrap();
            let tcp = tokio::net::TcpStream::connect(mesh).await.unwrap();
            let name = rustls::pki_types::ServerName::try_from("mesh-node").unwrap();
            let mut tls = match tokio_rustls::TlsConnector::from(config).connect(name, tcp).await {
                Ok(t) => t,
                Err(e) => return e.to_string(),
            };
            let _ = tls.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
            let mut buf = [0u8; 64];
            match tls.read(&mut buf).await {
                Ok(0) => "closed".to_owned(),
                Ok(n) => format!("answered {n} bytes"),
                Err(e) => e.to_string(),
            }
        })
    });
    assert!(!no_cert.starts_with("answered"), "a client without a certificate got an answer: {no_cert}");
    // A removed node's workload certificate, though unexpired, is refused.
    lab.meshctl(&["node", "rm", &h2.to_string()]);
    let issued_before_removal = issue("web", &h2, hour, 0);
    lab.wait("host 3 to learn of the removal", || {
        matches!(get(issued_before_removal.clone()), Err(OpenError::Refused { status: 403, ref reason }) if reason.contains("removed node"))
    });
}

#[test]
fn a_new_policy_applies_to_the_next_request_on_an_open_connection() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let mut child = s
        .lab
        .exec(&s.web, &["python3", &script("http_loop.py"), &s.api_vip, "80", "/v1/items", "8"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().unwrap().unwrap(), "ready");
    for _ in 0..5 {
        let line = lines.next().unwrap().unwrap();
        assert!(line.ends_with(" 200 same"), "{line}");
    }
    s.lab.apply_policy(&POLICY.replace("methods = [\"GET\", \"HEAD\"]", "methods = [\"HEAD\"]").replace(
        "method = \"GET\"\npath = \"/v1/items/7\"\nexpect = \"allow\"",
        "method = \"GET\"\npath = \"/v1/items/7\"\nexpect = \"deny\"",
    ));
    let applied = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64();
    let mut rest = String::new();
    for line in lines.map_while(Result::ok) {
        rest.push_str(&line);
        rest.push('\n');
    }
    let _ = child.wait();
    let denied: Vec<(f64, &str)> = rest
        .lines()
        .filter(|l| l.contains(" 403 "))
        .map(|l| (l.split(' ').next().unwrap().parse().unwrap(), l))
        .collect();
    assert!(!denied.is_empty(), "the new policy never applied:\n{rest}");
    assert!(
        denied[0].0 - applied < 1.0,
        "applied {:.2} s after `policy apply` returned",
        denied[0].0 - applied
    );
    assert!(rest.lines().all(|l| l.ends_with(" same")), "the connection was dropped:\n{rest}");
}
