//! The layer-7 policy tried as an attacker would, as root in a lab of namespaces running the real
//! binaries: `web` (host 2) calls `api` (host 3, a workload that echoes the request it got).
//!
//! * Path spellings (encodings, separators, dot segments, case, parameters, absolute-form, ...)
//!   over HTTP/1.1 and HTTP/2: whatever the mesh forwards, the workload sees in canonical form,
//!   and the policy allows that canonical request; every spelling of a denied resource is denied
//!   or refused.
//! * Repeated headers, methods in other cases and methods no rule knows, against deny rules.
//! * Around the mesh: an HTTP port is never reached straight over the overlay, even under
//!   `default = "allow"` or a `tcp` allow rule for that port; `x-mesh-client-id` reaches the
//!   workload only as the mesh set it, never from a caller's header or trailer.

use std::sync::Mutex;
use std::time::Duration;

use mesh_tests::lab::{Lab, in_namespace, readable};

static ONE_LAB: Mutex<()> = Mutex::new(());

const POLICY: &str = r#"
default = "deny"

[[rule]]
name = "web-uses-items"
action = "allow"
from = ["web"]
to = ["api"]
ports = [80]
methods = ["GET", "DELETE", "PURGE"]
paths = ["/v1/items/*"]

[[rule]]
name = "no-delete-all"
action = "deny"
from = ["*"]
to = ["api"]
methods = ["DELETE"]
paths = ["/v1/items/all"]

[[rule]]
name = "no-purge-secret"
action = "deny"
from = ["*"]
to = ["api"]
methods = ["PURGE"]
paths = ["/v1/items/secret"]

[[rule]]
name = "no-intruders"
action = "deny"
from = ["*"]
to = ["api"]
headers = [{ name = "x-role", exact = "intruder" }]

[[rule]]
name = "web-opens-echo"
action = "allow"
from = ["web"]
to = ["api"]
ports = [7000]
protocol = "tcp"

[[rule]]
name = "web-asks-whoami"
action = "allow"
from = ["web"]
to = ["api"]
ports = [80]
methods = ["POST", "GET"]
paths = ["/whoami"]
"#;

struct Setup {
    lab: Lab,
    web: String,
    vip: String,
    address: String,
}

fn setup() -> Setup {
    let lab = Lab::start(3);
    let on = |i: usize| format!("node.id=={}", lab.node_id(i));
    lab.meshctl(&["network", "create", "front", "--subnet", "10.45.0.0/24"]);
    lab.meshctl(&["service", "create", "web", "--network", "front", "--constraint", &on(2)]);
    let api = format!("{e} tcp 7000 & exec {e} http 80 api", e = env!("CARGO_BIN_EXE_mesh-echo"));
    let constraint = on(3);
    let create = ["service", "create", "api", "--network", "front", "--port", "80/http", "--port", "7000"];
    let mut args = create.to_vec();
    args.extend(["--constraint", constraint.as_str(), "--command", api.as_str()]);
    let readable = readable();
    args.extend(readable.iter().map(String::as_str));
    lab.meshctl(&args);
    lab.apply_policy(POLICY);
    let api: serde_json::Value = serde_json::from_str(&lab.meshctl(&["service", "inspect", "api"])).unwrap();
    let s = Setup {
        web: lab.workload(2, "web", 1),
        vip: api["vips"]["front"].as_str().unwrap().to_owned(),
        address: api["endpoints"][0]["addresses"]["front"].as_str().unwrap().to_owned(),
        lab,
    };
    s.lab.wait("web to reach api", || curl(&s, false, "GET", "/v1/items/1", &[]).0 == 200);
    s
}

/// A request from web to api's virtual IP with exactly `target` as its request-target:
/// (status, what the workload says it got).
fn curl(s: &Setup, h2: bool, method: &str, target: &str, headers: &[&str]) -> (u16, String) {
    let mut cmd = s.lab.exec(&s.web, &["curl", "-sS", "-m", "3", "--path-as-is", "-w", "\n%{http_code}"]);
    if h2 {
        cmd.arg("--http2-prior-knowledge");
    }
    cmd.args(["-X", method, "--request-target", target]);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(format!("http://{}/", s.vip)).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_owned())
}

/// Whether the policy allows what the workload got ("api METHOD TARGET VERSION"), and that it
/// got it in canonical form.
fn policy_allows_what_the_workload_saw(
    engine: &policy::Engine,
    seen: &str,
    headers: &[(&str, &[u8])],
) -> bool {
    let words: Vec<&str> = seen.split_whitespace().collect();
    let [_, method, target, _] = words[..] else { panic!("the workload said {seen:?}") };
    let canonical =
        policy::canonicalize(method, target).unwrap_or_else(|e| panic!("{seen:?} is not canonical: {e}"));
    assert!(!canonical.is_rewritten(), "the workload got {target}, not its canonical form");
    engine.evaluate(&policy::Request::http("web", "api", 80, &canonical, headers)).allowed()
}

#[test]
fn no_spelling_of_a_request_gets_past_what_the_policy_denies() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let policy = policy::Policy::parse("l7.toml", POLICY).unwrap();
    let engine = policy::Engine::compile(&policy);

    // Every spelling of DELETE /v1/items/all, and of a way out of /v1/items.
    let denied = [
        ("DELETE", "/v1/items/all"),
        ("DELETE", "/v1/items//all"),
        ("DELETE", "//v1/items/all"),
        ("DELETE", "/v1/items/./all"),
        ("DELETE", "/v1/items/x/../all"),
        ("DELETE", "/v1/items/%61ll"),
        ("DELETE", "/v1/items/%61%6C%6C"),
        ("DELETE", "/v1/%69tems/all"),
        ("DELETE", "/v1/items/all/"),
        ("DELETE", "/v1/items/all;x"),
        ("DELETE", "/v1/items/all;jsessionid=1"),
        ("DELETE", "/v1/items/%2e/all"),
        ("DELETE", "/v1/items/%2E%2E/items/all"),
        ("DELETE", "/v1/items/all%2F"),
        ("DELETE", "/v1/items%2Fall"),
        ("DELETE", "/v1/items/all%00"),
        ("DELETE", "/v1/items\\all"),
        ("DELETE", "/v1/items%5Call"),
        ("DELETE", "/v1/items/all?x=1"),
        ("DELETE", "http://api/v1/items/all"),
        ("DELETE", "http://api//v1/items/./all"),
        ("delete", "/v1/items/all"),
        ("Delete", "/v1/items//all"),
        ("DELETE", "/v1/items/%C0%AFall"),
        ("DELETE", "/v1/items/%zz"),
        ("GET", "/v1/items/../../admin"),
        ("GET", "/v1/items/%2e%2e/%2e%2e/admin"),
        ("GET", "/v1/items/..%2F..%2Fadmin"),
        ("GET", "/v1/items/../admin"),
        ("GET", "/v1/../admin"),
        ("GET", "/admin"),
        ("GET", "/V1/ITEMS/7"),
        ("GET", "*"),
        ("GET", "v1/items/7"),
        ("PURGE", "/v1/items/secret"),
        ("PURGE", "/v1/items//secret/"),
        ("purge", "/v1/items/secret"),
        ("PROPFIND", "/v1/items/7"),
    ];
    // And spellings that name an allowed resource: forwarded, canonical.
    let allowed = [
        ("GET", "/v1/items/7", "/v1/items/7"),
        ("GET", "/v1/items//7", "/v1/items/7"),
        ("GET", "/v1/items/./7", "/v1/items/7"),
        ("GET", "/v1/items/%37", "/v1/items/7"),
        ("GET", "/v1/items/x/../7", "/v1/items/7"),
        ("GET", "/v1/items/7?q=%2F..", "/v1/items/7?q=%2F.."),
        ("GET", "/v1/items/caf%c3%a9", "/v1/items/caf%C3%A9"),
        // An encoded `#` is data: another resource than `all`.
        ("DELETE", "/v1/items/all%23x", "/v1/items/all%23x"),
        ("GET", "http://api/v1/items/7", "/v1/items/7"),
        ("DELETE", "/v1/items/7", "/v1/items/7"),
        ("PURGE", "/v1/items/7", "/v1/items/7"),
    ];
    let mut report = Vec::new();
    for h2 in [false, true] {
        for (method, target) in denied {
            // curl cannot put an absolute-form target on HTTP/2's :path; that is h1's form.
            if h2 && target.starts_with("http://") {
                continue;
            }
            let (status, seen) = curl(&s, h2, method, target, &[]);
            // HTTP/2 itself resets a stream whose :path is malformed (no answer, nothing sent).
            let reset = h2 && status == 0 && seen.is_empty();
            assert!(
                matches!(status, 400 | 403) || reset,
                "{method} {target} (h2 {h2}): status {status}, the workload saw {seen:?}"
            );
            report.push(format!("{} {method} {target} -> {status}", if h2 { "h2" } else { "h1" }));
        }
        for (method, target, canonical) in allowed {
            if h2 && target.starts_with("http://") {
                continue;
            }
            let (status, seen) = curl(&s, h2, method, target, &[]);
            assert_eq!(status, 200, "{method} {target} (h2 {h2}): {seen}");
            assert!(policy_allows_what_the_workload_saw(&engine, &seen, &[]), "{seen}");
            let got = seen.split_whitespace().nth(2).unwrap_or_default();
            assert_eq!(got, canonical, "{method} {target} (h2 {h2})");
        }
    }
    eprintln!("{}", report.join("\n"));

    // A header repeated: any of its values triggers a deny rule, whichever the server reads.
    for h2 in [false, true] {
        let (status, _) = curl(&s, h2, "GET", "/v1/items/7", &["x-role: reader", "x-role: intruder"]);
        assert_eq!(status, 403, "a repeated header slipped past a deny rule (h2 {h2})");
        let (status, _) = curl(&s, h2, "GET", "/v1/items/7", &["x-role: intruder, reader"]);
        assert_eq!(status, 403, "a list-valued header slipped past a deny rule (h2 {h2})");
        let (status, _) = curl(&s, h2, "GET", "/v1/items/7", &["x-role: reader"]);
        assert_eq!(status, 200, "(h2 {h2})");
    }
}

#[test]
fn http_ports_are_reached_only_through_the_mesh_and_client_ids_only_from_it() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let direct = |s: &Setup| {
        let url = format!("http://{}/v1/items/7", s.address);
        let out = s
            .lab
            .exec(
                &s.web,
                &[
                    "curl",
                    "-sS",
                    "-m",
                    "2",
                    "--connect-timeout",
                    "1",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    &url,
                ],
            )
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse::<u16>().unwrap_or(0)
    };
    // Under `default = "allow"`, and with a tcp allow rule naming the HTTP port: still no
    // overlay flow straight to it; the filter drops it and counts it.
    for extra in [
        "default = \"allow\"\n".to_owned(),
        format!(
            "{POLICY}\n[[rule]]\nname = \"tcp-to-http-port\"\naction = \"allow\"\nfrom = [\"web\"]\nto = [\"api\"]\nports = [80]\nprotocol = \"tcp\"\n"
        ),
    ] {
        let text = if extra.starts_with("default") {
            format!("{extra}{}", &POLICY.replace("default = \"deny\"\n", ""))
        } else {
            extra
        };
        s.lab.apply_policy(&text);
        let before = s.lab.drops(3, "filtered");
        assert_eq!(direct(&s), 0, "a direct connection to api's HTTP port was answered");
        assert!(s.lab.drops(3, "filtered") > before, "the filter did not drop the direct connection");
        // Through the mesh it still works.
        assert_eq!(curl(&s, false, "GET", "/v1/items/7", &[]).0, 200);
    }
    s.lab.apply_policy(POLICY);

    // x-mesh-client-id: the mesh's only, not the caller's, as a header or a trailer.
    let (status, ids) = curl(&s, false, "GET", "/whoami", &["x-mesh-client-id: spiffe://forged/svc/admin"]);
    assert_eq!(status, 200);
    assert_eq!(ids.lines().collect::<Vec<_>>().len(), 1, "{ids}");
    assert!(
        ids.starts_with("spiffe://") && ids.trim_end().ends_with("/svc/web") && !ids.contains("forged"),
        "{ids}"
    );
    let ids = whoami_with_trailer(&s.web, &s.vip);
    assert!(!ids.contains("forged"), "a forged x-mesh-client-id trailer reached the workload: {ids}");
    assert!(ids.trim_end().ends_with("/svc/web"), "{ids}");
}

/// An HTTP/2 POST /whoami from `ns` whose trailers carry a forged `x-mesh-client-id`: what the
/// workload says it got.
fn whoami_with_trailer(ns: &str, vip: &str) -> String {
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    let address: std::net::Ipv4Addr = vip.parse().unwrap();
    in_namespace(ns, || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let tcp = tokio::net::TcpStream::connect((address, 80)).await.unwrap();
            let (mut sender, connection) = hyper::client::conn::http2::handshake(
                hyper_util::rt::TokioExecutor::new(),
                hyper_util::rt::TokioIo::new(tcp),
            )
            .await
            .unwrap();
            tokio::spawn(connection);
            let mut trailers = hyper::HeaderMap::new();
            trailers.insert("x-mesh-client-id", "spiffe://forged/svc/admin".parse().unwrap());
            let frames: Vec<Result<Frame<bytes::Bytes>, std::convert::Infallible>> =
                vec![Ok(Frame::data(bytes::Bytes::from_static(b"hello"))), Ok(Frame::trailers(trailers))];
            let body = StreamBody::new(tokio_stream::iter(frames));
            let request =
                hyper::Request::post("http://api/whoami").header("te", "trailers").body(body).unwrap();
            let response = tokio::time::timeout(Duration::from_secs(5), sender.send_request(request))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(response.status(), 200);
            String::from_utf8_lossy(&response.into_body().collect().await.unwrap().to_bytes()).into_owned()
        })
    })
}

/// A TCP connection from `ns` to `address:7000` (an echo) held open, a byte every 50 ms, for at
/// most 20 s: completes with how long after `cut` it ended (None: it never did).
fn hold_tunnel(lab: &Lab, ns: &str, address: &str, cut: impl FnOnce()) -> Option<Duration> {
    use std::io::BufRead;
    let code = format!(
        "import socket,sys,time\ns=socket.create_connection(('{address}',7000),timeout=2)\n\
         end=time.time()+20\nfirst=True\n\
         while time.time()<end:\n  \
           try:\n    s.sendall(b'x')\n    d=s.recv(1)\n  except Exception:\n    d=b''\n  \
           if not d:\n    print('closed',flush=True)\n    sys.exit(0)\n  \
           if first:\n    print('open',flush=True)\n    first=False\n  time.sleep(0.05)\n\
         print('still open',flush=True)\n"
    );
    let mut child =
        lab.exec(ns, &["python3", "-c", &code]).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    assert_eq!(lines.next().and_then(Result::ok).as_deref(), Some("open"), "the tunnel did not open");
    let started = std::time::Instant::now();
    cut();
    let cut_at = started.elapsed();
    let ended = lines.next().and_then(Result::ok);
    let after = started.elapsed() - cut_at;
    let _ = child.wait();
    (ended.as_deref() == Some("closed")).then_some(after)
}

#[test]
fn identities_and_decisions_are_checked_again_on_open_connections() {
    use control::ca::{ClusterCa, Subject};
    use mesh_api::tls::Identity;
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let lab = &s.lab;
    let ca_pem = std::fs::read_to_string(lab.manager_dir(1).join("ca.crt")).unwrap();
    let ca = ClusterCa::load(&ca_pem, &lab.ca_key).unwrap();
    let ca_der = mesh_api::trust::Trust::from_pem(ca.cert_pem()).unwrap();
    let cluster: mesh_api::ids::ClusterId = lab.cluster_id().parse().unwrap();
    let (h2, h3): (mesh_api::ids::NodeId, mesh_api::ids::NodeId) =
        (lab.node_id(2).parse().unwrap(), lab.node_id(3).parse().unwrap());
    let mesh_port: std::net::SocketAddr = format!("{}:4800", lab.addr(3)).parse().unwrap();
    let target = format!("{}:80", s.address);
    let short = Duration::from_secs(8);
    let (cert_pem, key_pem) =
        ca.issue_with_new_key(&Subject::workload(&cluster, "web", 1, &h2, short)).unwrap();
    let web = Identity { cert_pem, key_pem };
    let expires = std::time::Instant::now() + short;

    in_namespace(&lab.host(2), || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let config = meshd::mesh::tls::client_config(&ca_der, cluster.as_str(), &h3, &web).unwrap();
            // A client that would resume if the mesh port let it.
            let mut resuming = (*config).clone();
            resuming.resumption = rustls::client::Resumption::in_memory_sessions(16);
            let resuming = std::sync::Arc::new(resuming);
            let name = rustls::pki_types::ServerName::try_from(meshd::mesh::tls::SERVER_NAME).unwrap();
            let open = || async {
                let tcp = tokio::net::TcpStream::connect(mesh_port).await.unwrap();
                let tls = tokio_rustls::TlsConnector::from(resuming.clone())
                    .connect(name.clone(), tcp)
                    .await
                    .unwrap();
                let kind = tls.get_ref().1.handshake_kind();
                let (sender, connection) = hyper::client::conn::http2::handshake(
                    hyper_util::rt::TokioExecutor::new(),
                    hyper_util::rt::TokioIo::new(tls),
                )
                .await
                .unwrap();
                tokio::spawn(connection);
                (sender, kind)
            };
            let connect = |sender: &mut hyper::client::conn::http2::SendRequest<
                http_body_util::Empty<bytes::Bytes>,
            >| {
                let request =
                    hyper::Request::connect(target.as_str()).body(http_body_util::Empty::new()).unwrap();
                let call = sender.send_request(request);
                async move {
                    tokio::time::timeout(Duration::from_secs(3), call)
                        .await
                        .map(|r| r.map(|r| r.status().as_u16()))
                }
            };
            let (mut held, _) = open().await;
            assert_eq!(connect(&mut held).await.unwrap().unwrap(), 200, "a stream on a fresh connection");
            tokio::time::sleep(Duration::from_millis(300)).await;
            // No resumption: every connection proves its certificate again.
            let (_again, kind) = open().await;
            assert_eq!(kind, Some(rustls::HandshakeKind::Full), "the mesh port resumed a session");
            // Past the certificate's expiry, the held connection takes no new stream.
            tokio::time::sleep(
                expires.saturating_duration_since(std::time::Instant::now()) + Duration::from_secs(1),
            )
            .await;
            let late = connect(&mut held).await;
            assert!(!matches!(late, Ok(Ok(200))), "a stream opened after the certificate expired: {late:?}");
        })
    });

    // An opaque tunnel is re-decided: a policy that no longer allows it cuts it within a second.
    let without_echo = POLICY.replace(
        "name = \"web-opens-echo\"\naction = \"allow\"",
        "name = \"web-opens-echo\"\naction = \"allow\"\ndry_run = true",
    );
    let after = hold_tunnel(lab, &s.web, &s.vip, || lab.apply_policy(&without_echo));
    assert!(
        after.is_some_and(|d| d < Duration::from_millis(1500)),
        "the tunnel outlived the policy change: {after:?}"
    );
    lab.apply_policy(POLICY);
    lab.wait("the tunnel to be allowed again", || {
        let out = lab.exec(&s.web, &["python3", "-c", &format!("import socket;s=socket.create_connection(('{}',7000),timeout=2);s.sendall(b'y');print(s.recv(1))", s.vip)]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).contains("y")
    });
    // And removing the caller's node cuts a tunnel its certificate holds within a second: from
    // a client of the removed node's own (its meshd stops, but what an attacker holds does not).
    let (cert_pem, key_pem) = ca
        .issue_with_new_key(&Subject::workload(&cluster, "web", 1, &h2, Duration::from_secs(3600)))
        .unwrap();
    let web = Identity { cert_pem, key_pem };
    let echo = format!("{}:7000", s.address);
    let h2_id = lab.node_id(2);
    let cut_after = std::thread::scope(|scope| {
        let remover = scope.spawn(|| {
            std::thread::sleep(Duration::from_secs(1));
            let at = std::time::Instant::now();
            lab.meshctl(&["node", "rm", &h2_id]);
            at
        });
        let ended = in_namespace(&lab.host(2), || {
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            runtime.block_on(async {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let trust = meshd::mesh::outbound::Trust {
                    roots: std::sync::Arc::new(ca_der.clone()),
                    cluster: cluster.as_str(),
                };
                let identity = meshd::identity::WorkloadIdentity {
                    identity: web.clone(),
                    not_after: time::OffsetDateTime::now_utc() + time::Duration::hours(1),
                };
                let mut tunnel =
                    meshd::mesh::outbound::connect(trust, &identity, &h3, mesh_port, echo.parse().unwrap())
                        .await
                        .expect("the tunnel opens");
                let deadline = std::time::Instant::now() + Duration::from_secs(20);
                let mut byte = [0u8; 1];
                while std::time::Instant::now() < deadline {
                    if tunnel.write_all(b"x").await.is_err() {
                        break;
                    }
                    match tokio::time::timeout(Duration::from_secs(2), tunnel.read(&mut byte)).await {
                        Ok(Ok(1)) => {}
                        _ => break,
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                std::time::Instant::now()
            })
        });
        let removed_at = remover.join().unwrap();
        ended.saturating_duration_since(removed_at)
    });
    assert!(
        cut_after < Duration::from_millis(1500),
        "the tunnel outlived its node's removal by {cut_after:?}"
    );
}

#[test]
fn a_flood_of_silent_connections_on_the_mesh_port_stays_bounded_and_the_mesh_keeps_working() {
    let _one = ONE_LAB.lock().unwrap_or_else(|e| e.into_inner());
    let s = setup();
    let lab = &s.lab;
    let pid = lab.meshd_pid(3);
    let fds = || std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let before = fds();
    let mesh_port: std::net::SocketAddr = format!("{}:4800", lab.addr(3)).parse().unwrap();
    // From host 1 (no workload of its own there): far more connections than one address may have
    // in their handshake, none ever starting it.
    let held = in_namespace(&lab.host(1), || {
        let mut held = Vec::new();
        for _ in 0..1500 {
            if let Ok(tcp) = std::net::TcpStream::connect_timeout(&mesh_port, Duration::from_millis(500)) {
                held.push(tcp);
            }
        }
        held
    });
    assert!(held.len() >= 1000, "only {} connections were made", held.len());
    std::thread::sleep(Duration::from_millis(500));
    let during = fds();
    assert!(
        during <= before + 256 + 32,
        "meshd holds {during} descriptors (from {before}) for silent connections"
    );
    // Meanwhile web on host 2 goes on calling api through the mesh.
    for _ in 0..5 {
        assert_eq!(
            curl(&s, false, "GET", "/v1/items/7", &[]).0,
            200,
            "the mesh stopped working during the flood"
        );
    }
    drop(held);
}
