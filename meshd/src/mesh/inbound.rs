//! Inbound: the mesh port. Verifies who calls, decides with the policy, and carries what is
//! allowed to the local workload.

use std::convert::Infallible;
use std::net::{SocketAddr, SocketAddrV4};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use mesh_api::accept::{AcceptBackoff, Admission, Permit, Quota, refused};
use mesh_api::model::Protocol;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::histogram::Histogram;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tracing::field::{Empty, display};
use tracing::{Instrument, debug, info, info_span, warn};

use super::outbound::{CONNECTION_WINDOW, STREAM_WINDOW};
use super::tls::{Peer, PeerError};
use super::{Mesh, request_id};
use crate::metrics::{Destination, Direction, Verdict};
use crate::netns::Netns;

/// Longest wait for a client's TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// The header carrying the request ID of a mesh answer.
pub const REQUEST_ID: &str = "x-mesh-request-id";
/// The header telling the workload who calls: the SPIFFE ID of the caller's certificate, as the
/// mesh verified it. One sent by the caller is removed before the policy reads the request.
pub const CLIENT_ID: &str = "x-mesh-client-id";
/// What a published port's client may say of its own path: never passed on (the mesh sets
/// `x-forwarded-for` itself).
const EDGE_HEADERS: [&str; 4] = ["x-forwarded-for", "forwarded", "x-real-ip", super::ingress::INGRESS_CLIENT];

/// Removes the headers a server could read as one of `names` (CGI and WSGI servers read `_` as
/// `-`: `x_mesh_client_id` becomes `HTTP_X_MESH_CLIENT_ID` like the real one), and drops
/// `names` from `Connection` (a proxy behind the workload would remove a header it names).
fn strip_spellings(headers: &mut hyper::HeaderMap, names: &[&str]) {
    let alike: Vec<hyper::header::HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().contains('_') && names.contains(&k.as_str().replace('_', "-").as_str()))
        .cloned()
        .collect();
    for name in alike {
        headers.remove(name);
    }
    let connection = hyper::header::CONNECTION;
    let named = |t: &str| names.iter().any(|n| t.trim().replace('_', "-").eq_ignore_ascii_case(n));
    if headers.get_all(&connection).iter().any(|v| v.to_str().map_or(true, |v| v.split(',').any(named))) {
        let kept: Vec<String> = headers
            .get_all(&connection)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| !t.is_empty() && !named(t))
            .map(str::to_owned)
            .collect();
        headers.remove(&connection);
        if let Ok(value) = hyper::header::HeaderValue::from_str(&kept.join(", "))
            && !kept.is_empty()
        {
            headers.insert(connection, value);
        }
    }
}

type Body = BoxBody<Bytes, hyper::Error>;

/// An answer from the mesh itself (a refusal): `why` and a fresh request ID, in the body and in
/// [`REQUEST_ID`]. Returns the ID for the log line.
fn answer(status: StatusCode, why: &str) -> (String, Response<Body>) {
    let id = request_id();
    let response = Response::builder()
        .status(status)
        .header("content-type", "text/plain; charset=utf-8")
        .header(REQUEST_ID, &id)
        .body(
            Full::new(Bytes::from(format!("{why}\nrequest id: {id}\n")))
                .map_err(|never| match never {})
                .boxed(),
        )
        .expect("a valid response");
    (id, response)
}

/// How often an open opaque tunnel looks for a new view to be re-decided under.
const TUNNEL_RECHECK: Duration = Duration::from_millis(200);
/// How long a connection whose certificate was refused stays open, to read the answer.
const REFUSED_LINGER: time::Duration = time::Duration::seconds(10);

/// Serves the mesh port until dropped.
pub async fn serve(mesh: Arc<Mesh>, listener: TcpListener, acceptor: TlsAcceptor) {
    let handshaking = Admission::new(HANDSHAKING);
    let mut backoff = AcceptBackoff::default();
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(c) => {
                backoff.reset();
                c
            }
            Err(e) => {
                backoff.wait("the mesh port", &e).await;
                continue;
            }
        };
        // Before a certificate is seen, what one address (and everyone) may hold is bounded.
        let Some(permit) = handshaking.admit(remote.ip()) else {
            refused("too many TLS handshakes in progress on the mesh port", remote);
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let span = info_span!("mesh_connection", %remote, peer = Empty, service = Empty);
        tokio::spawn(connection(mesh.clone(), tcp, remote, acceptor.clone(), permit).instrument(span));
    }
}

/// Mesh port connections still in their TLS handshake: in all, and from one address (a node's
/// meshd opens one connection per calling workload).
const HANDSHAKING: Quota = Quota { total: 1024, per_source: 256 };

/// One connection from another node's meshd, carrying streams from one caller. Runs in the
/// connection's span, which names the caller once its certificate is read.
async fn connection(
    mesh: Arc<Mesh>,
    tcp: tokio::net::TcpStream,
    remote: SocketAddr,
    acceptor: TlsAcceptor,
    handshaking: Permit,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        // Per connection, before anyone is known: at debug, so that a flood of bad handshakes
        // cannot flood the log (the admission quota's refusals are logged, rate-limited).
        Ok(Err(e)) => {
            debug!(%remote, error = %e, "mesh handshake refused");
            return;
        }
        Err(_) => {
            debug!(%remote, "mesh handshake timed out");
            return;
        }
    };
    drop(handshaking);
    // A certificate that chains to the CA but is not a workload's still gets an answer saying why.
    let peer: Arc<Result<Peer, PeerError>> = Arc::new(Peer::from_certificate(
        tls.get_ref().1.peer_certificates().and_then(|c| c.first()),
        &mesh.cluster,
    ));
    let span = tracing::Span::current();
    match peer.as_ref() {
        Ok(p) => {
            span.record("peer", display(&p.endpoint));
            span.record("service", display(&p.service));
        }
        Err(e) => warn!(%remote, error = %e, "mesh peer refused"),
    }
    // The chain as presented: checked again whenever the roots change.
    let chain: Vec<Vec<u8>> = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| c.iter().map(|c| c.to_vec()).collect())
        .unwrap_or_default();
    let mut roots = mesh.roots.subscribe();
    let expires = match peer.as_ref() {
        Ok(p) => p.not_after,
        // Refused callers get their answers; their connection lasts no longer than that takes.
        Err(_) => time::OffsetDateTime::now_utc() + REFUSED_LINGER,
    };
    // Hyper runs each stream as a task of its own: each carries the connection's span.
    let service = service_fn(move |req| {
        let (mesh, peer) = (mesh.clone(), peer.clone());
        async move { Ok::<_, Infallible>(stream(mesh, peer, remote, req).await) }.instrument(span.clone())
    });
    let served = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(4096)
        .serve_connection(TokioIo::new(tls), service);
    // A connection lives no longer than the certificate it was opened with.
    let left = (expires - time::OffsetDateTime::now_utc()).try_into().unwrap_or(Duration::ZERO);
    // Nor longer than a root its certificate chains to (a root rotation ended).
    let untrusted = async {
        while roots.changed().await.is_ok() {
            if !roots.borrow_and_update().chains(&chain) {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        served = served => if let Err(e) = served {
            debug!(%remote, error = %e, "a mesh connection ended");
        },
        _ = tokio::time::sleep(left) => debug!(%remote, "a mesh connection's certificate expired: closed"),
        _ = untrusted => info!(%remote, "a mesh connection's certificate chains to a root trusted no more: closed"),
    }
}

/// One CONNECT stream: a caller's connection to a local endpoint's port.
async fn stream(
    mesh: Arc<Mesh>,
    peer: Arc<Result<Peer, PeerError>>,
    remote: SocketAddr,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let refuse = |status: StatusCode, why: String| {
        let (id, response) = answer(status, &why);
        warn!(request_id = %id, %remote, status = status.as_u16(), reason = %why, "mesh stream refused");
        response
    };
    if req.method() != hyper::Method::CONNECT {
        return refuse(StatusCode::METHOD_NOT_ALLOWED, "the mesh port takes CONNECT only".into());
    }
    let peer = match peer.as_ref() {
        Ok(p) => p.clone(),
        Err(e) => return refuse(StatusCode::FORBIDDEN, format!("refused: {e}")),
    };
    let view = mesh.view.load_full();
    if let Some(why) = view.refuses(&peer) {
        return refuse(StatusCode::FORBIDDEN, format!("refused: {why}"));
    }
    let Some(address) = req.uri().authority().and_then(|a| a.as_str().parse::<SocketAddrV4>().ok()) else {
        return refuse(StatusCode::BAD_REQUEST, format!("`{}` is not ADDRESS:PORT", req.uri()));
    };
    let Some(local) = view.local.get(address.ip()) else {
        return refuse(StatusCode::NOT_FOUND, format!("no endpoint at {} on this node", address.ip()));
    };
    let port = address.port();
    let Some(spec) = local.ports.iter().find(|p| p.port == port && p.protocol.transport() == Protocol::Tcp)
    else {
        return refuse(StatusCode::NOT_FOUND, format!("service `{}` has no TCP port {port}", local.service));
    };
    if peer.ingress {
        if let Some(why) = view.admits_ingress(&peer, &local.service, port) {
            return refuse(StatusCode::FORBIDDEN, format!("refused: {why}"));
        }
    } else if !view.on_network(&peer.service, &local.network) {
        return refuse(
            StatusCode::FORBIDDEN,
            format!("refused: `{}` is not on network `{}`", peer.service, local.network),
        );
    }
    // A published port's client: its address, as the publishing node saw it (read from nobody
    // else).
    let forwarded_for = match peer.ingress {
        true => req
            .headers()
            .get(super::ingress::INGRESS_CLIENT)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<SocketAddr>().ok())
            .and_then(|a| hyper::header::HeaderValue::from_str(&a.ip().to_string()).ok()),
        false => None,
    };
    let client_id = if peer.ingress {
        Some(hyper::header::HeaderValue::from_static(policy::INGRESS))
    } else {
        hyper::header::HeaderValue::from_str(&peer.spiffe_id.to_string()).ok()
    };
    let tunnel = Arc::new(Tunnel {
        mesh: mesh.clone(),
        peer,
        service: local.service.clone(),
        port,
        workload: SocketAddr::V4(address),
        netns: local.netns.clone(),
        latency: mesh
            .metrics
            .latency
            .get_or_create(&Destination { destination: local.service.clone() })
            .clone(),
        client_id,
        forwarded_for,
        upstream: tokio::sync::Mutex::new(None),
    });
    let upgrade = hyper::upgrade::on(&mut req);
    if spec.protocol == Protocol::Tcp {
        let request = policy::Request::tcp(&tunnel.peer.service, &tunnel.service, port);
        let decision = view.decide(&request);
        tunnel.count(&decision, "tcp");
        if !decision.allowed() {
            let why = format!("{}: {}", policy::describe(&request), decision.reason());
            let (id, response) = answer(StatusCode::FORBIDDEN, &why);
            warn!(
                request_id = %id, source = %tunnel.peer.service, caller = %tunnel.peer.endpoint,
                destination = %tunnel.service, port, reason = %decision.reason(), "connection denied"
            );
            return response;
        }
        let upstream = match tunnel.netns.connect(tunnel.workload).await {
            Ok(s) => s,
            Err(e) => {
                return refuse(StatusCode::BAD_GATEWAY, format!("{} is not answering: {e}", tunnel.workload));
            }
        };
        let relay = async move {
            let Ok(upgraded) = upgrade.await else { return };
            let mut upstream = upstream;
            let mut caller = TokioIo::new(upgraded);
            tokio::select! {
                copied = tokio::io::copy_bidirectional(&mut caller, &mut upstream) => if let Ok((a, b)) = copied {
                    tunnel.mesh.metrics.bytes.get_or_create(&Direction { direction: "inbound" }).inc_by(a + b);
                },
                why = tunnel.until_refused(port) => {
                    warn!(source = %tunnel.peer.service, caller = %tunnel.peer.endpoint, destination = %tunnel.service,
                        port, reason = %why, "an open connection is no longer allowed: cut");
                },
            }
        };
        tokio::spawn(relay.in_current_span());
    } else {
        let requests = async move {
            match upgrade.await {
                Ok(upgraded) => tunnel.serve_http(upgraded).await,
                Err(e) => debug!(error = %e, "a tunnel did not open"),
            }
        };
        tokio::spawn(requests.in_current_span());
    }
    Response::new(http_body_util::Empty::new().map_err(|never| match never {}).boxed())
}

/// What the mesh does with a request's `Upgrade` header.
enum Upgrade {
    /// No upgrade asked, or one the mesh declines (the header is removed, the request answered
    /// as a plain one).
    None,
    /// Relayed to the workload, and the connection with it once it switches.
    Relay,
}

impl Upgrade {
    /// Reads, and for a declined upgrade removes, the request's upgrade headers. An upgrade to
    /// HTTP/2 (`h2c`) is declined: its requests would pass the mesh unseen, where HTTP/2 with
    /// prior knowledge has each of them decided.
    fn of(req: &mut Request<Incoming>) -> Upgrade {
        use hyper::header::{CONNECTION, UPGRADE};
        let Some(protocol) = req.headers().get(UPGRADE) else { return Upgrade::None };
        let asked = req.version() == hyper::Version::HTTP_11
            && req.headers().get_all(CONNECTION).iter().any(|v| {
                v.to_str().is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("upgrade")))
            });
        let h2c = protocol.to_str().is_ok_and(|p| p.split(',').any(|t| t.trim().eq_ignore_ascii_case("h2c")));
        if asked && !h2c {
            return Upgrade::Relay;
        }
        req.headers_mut().remove(UPGRADE);
        req.headers_mut().remove("http2-settings");
        if let Some(tokens) = req.headers().get(CONNECTION).and_then(|v| v.to_str().ok()) {
            let kept: Vec<&str> = tokens
                .split(',')
                .map(str::trim)
                .filter(|t| !t.eq_ignore_ascii_case("upgrade") && !t.eq_ignore_ascii_case("http2-settings"))
                .collect();
            match hyper::header::HeaderValue::from_str(&kept.join(", ")) {
                Ok(v) if !kept.is_empty() => {
                    req.headers_mut().insert(CONNECTION, v);
                }
                _ => {
                    req.headers_mut().remove(CONNECTION);
                }
            }
        }
        Upgrade::None
    }
}

/// A connection to the local workload, speaking the HTTP version of the requests it carries.
enum Upstream {
    H1(http1::SendRequest<Outgoing>),
    H2(http2::SendRequest<Outgoing>),
}

/// A request body on its way to the workload.
type Outgoing = BoxBody<Bytes, hyper::Error>;

/// The caller's body as the workload gets it: its trailers never carry `x-mesh-client-id`, which
/// only the mesh sets (in the request head).
fn outgoing(req: Request<Incoming>) -> Request<Outgoing> {
    req.map(|body| {
        body.map_frame(|frame| match frame.into_trailers() {
            Ok(mut trailers) => {
                trailers.remove(CLIENT_ID);
                hyper::body::Frame::trailers(trailers)
            }
            Err(frame) => frame,
        })
        .boxed()
    })
}

/// One caller's tunnel to one local endpoint's port.
struct Tunnel {
    mesh: Arc<Mesh>,
    peer: Peer,
    service: String,
    port: u16,
    workload: SocketAddr,
    netns: Arc<Netns>,
    /// The destination's request latency histogram, looked up once per tunnel.
    latency: Histogram,
    /// The caller's [`CLIENT_ID`] value, made once per tunnel.
    client_id: Option<hyper::header::HeaderValue>,
    /// For a published port's client: its address, the workload's `x-forwarded-for`.
    forwarded_for: Option<hyper::header::HeaderValue>,
    upstream: tokio::sync::Mutex<Option<Upstream>>,
}

impl Tunnel {
    /// Completes once an opaque tunnel to `port` is no longer allowed: re-decided whenever the
    /// view changes (a new policy, removed nodes, endpoints moved) and when the caller's
    /// certificate expires.
    async fn until_refused(&self, port: u16) -> String {
        let mut seen: Option<Arc<super::View>> = None;
        loop {
            let view = self.mesh.view.load_full();
            if seen.as_ref().is_none_or(|s| !Arc::ptr_eq(s, &view)) || self.refused(&view).is_some() {
                if let Some(why) = self.refused(&view) {
                    return why;
                }
                let request = policy::Request::tcp(&self.peer.service, &self.service, port);
                let decision = view.decide(&request);
                if !decision.allowed() {
                    return format!("{}: {}", policy::describe(&request), decision.reason());
                }
                seen = Some(view);
            }
            tokio::time::sleep(TUNNEL_RECHECK).await;
        }
    }

    /// Why the caller may not use this tunnel under `view` any more, if it may not.
    fn refused(&self, view: &super::View) -> Option<String> {
        view.refuses(&self.peer).or_else(|| match self.peer.ingress {
            true => view.admits_ingress(&self.peer, &self.service, self.port),
            false => None,
        })
    }

    fn count(&self, decision: &policy::Decision, kind: &'static str) {
        let labels = |verdict: &'static str, rule: Option<&policy::RuleRef>| Verdict {
            source: self.peer.service.clone(),
            destination: self.service.clone(),
            port: self.port,
            kind,
            verdict,
            rule: rule.map_or_else(|| "default".to_owned(), |r| r.name.to_string()),
        };
        let verdict = if decision.allowed() { "allow" } else { "deny" };
        self.mesh.metrics.verdicts.get_or_create(&labels(verdict, decision.rule.as_ref())).inc();
        for (rule, action) in &decision.dry_run {
            let would = if *action == policy::Action::Allow { "dry_run_allow" } else { "dry_run_deny" };
            self.mesh.metrics.verdicts.get_or_create(&labels(would, Some(rule))).inc();
            info!(source = %self.peer.service, destination = %self.service, port = self.port, %rule, would = %action, "dry-run rule matched");
        }
    }

    /// Serves the HTTP requests the tunnel carries (HTTP/1.1 or HTTP/2, told by the preface).
    async fn serve_http(self: Arc<Self>, upgraded: Upgraded) {
        let bytes = self.mesh.metrics.bytes.get_or_create(&Direction { direction: "inbound" }).clone();
        let io = TokioIo::new(Counted { inner: TokioIo::new(upgraded), bytes });
        let tunnel = self.clone();
        let span = tracing::Span::current();
        let service = service_fn(move |req| {
            let tunnel = tunnel.clone();
            async move { Ok::<_, Infallible>(tunnel.request(req).await) }.instrument(span.clone())
        });
        let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        builder
            .http2()
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW);
        if let Err(e) = builder.serve_connection_with_upgrades(io, service).await {
            debug!(error = %e, "an HTTP tunnel ended");
        }
    }

    /// Decides on one request; answers 403, or forwards it to the workload.
    async fn request(&self, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let view = self.mesh.view.load_full();
        let latency = || self.latency.observe(started.elapsed().as_secs_f64());
        if let Some(why) = self.refused(&view) {
            latency();
            let why = format!("refused: {why}");
            let (id, response) = answer(StatusCode::FORBIDDEN, &why);
            warn!(request_id = %id, reason = %why, "request refused");
            return response;
        }
        req.headers_mut().remove(CLIENT_ID);
        strip_spellings(req.headers_mut(), &[CLIENT_ID]);
        if let Some(client) = &self.forwarded_for {
            // At the edge, what the client says of its own path is not kept: the workload (and
            // the policy) see the address the publishing node took the connection from.
            for name in EDGE_HEADERS {
                req.headers_mut().remove(name);
            }
            strip_spellings(req.headers_mut(), &EDGE_HEADERS);
            req.headers_mut().insert("x-forwarded-for", client.clone());
        }
        // The one canonical request the policy decides on and the workload is sent; a request
        // that cannot be made canonical is refused, never forwarded as it came.
        let target = match req.uri().path_and_query() {
            Some(pq) => pq.as_str(),
            None if req.method() == hyper::Method::CONNECT => {
                req.uri().authority().map_or("", |a| a.as_str())
            }
            None => "",
        };
        let http = match policy::canonicalize(req.method().as_str(), target) {
            Ok(http) => http,
            Err(e) => {
                latency();
                let why = format!("refused: {} {target}: {e}", req.method());
                let (id, response) = answer(StatusCode::BAD_REQUEST, &why);
                warn!(
                    request_id = %id, source = %self.peer.service, destination = %self.service,
                    port = self.port, reason = %e, "request refused: no canonical form"
                );
                let labels = Verdict {
                    source: self.peer.service.clone(),
                    destination: self.service.clone(),
                    port: self.port,
                    kind: "http",
                    verdict: "refused",
                    rule: "no-canonical-form".to_owned(),
                };
                self.mesh.metrics.verdicts.get_or_create(&labels).inc();
                return response;
            }
        };
        let mut headers: Vec<(&str, &[u8])> =
            req.headers().iter().map(|(n, v)| (n.as_str(), v.as_bytes())).collect();
        // HTTP/2's :authority, or HTTP/1's absolute-form, is the host the request names too.
        if let Some(authority) = req.uri().authority() {
            headers.push(("host", authority.as_str().as_bytes()));
        }
        let request = policy::Request::http(&self.peer.service, &self.service, self.port, &http, &headers);
        let decision = view.decide(&request);
        self.count(&decision, "http");
        if !decision.allowed() {
            let why = format!("{}: {}", policy::describe(&request), decision.reason());
            let (id, response) = answer(StatusCode::FORBIDDEN, &why);
            warn!(
                request_id = %id, source = %self.peer.service, caller = %self.peer.endpoint,
                destination = %self.service, port = self.port, request = %http,
                reason = %decision.reason(), "request denied"
            );
            latency();
            return response;
        }
        let rewrite = http.is_rewritten().then(|| http.request_target().into_owned());
        let absolute = http.form() == policy::TargetForm::Absolute;
        drop(headers);
        drop(http);
        if let Some(target) = rewrite
            && let Err(e) = canonical_uri(&mut req, &target, absolute)
        {
            latency();
            let (_, response) = answer(StatusCode::BAD_REQUEST, &format!("refused: {e}"));
            return response;
        }
        if let Some(id) = &self.client_id {
            req.headers_mut().insert(CLIENT_ID, id.clone());
        }
        let response = match Upgrade::of(&mut req) {
            Upgrade::Relay => self.relay_upgrade(req).await,
            Upgrade::None => self.forward(req).await,
        };
        latency();
        match response {
            Ok(r) => r.map(|b| b.boxed()),
            Err(e) => {
                let (id, response) =
                    answer(StatusCode::BAD_GATEWAY, &format!("{} did not answer: {e}", self.workload));
                warn!(request_id = %id, destination = %self.service, error = %e, "the workload did not answer");
                response
            }
        }
    }

    /// An HTTP/1.1 upgrade the policy allowed (a WebSocket, say): the request goes to the
    /// workload on a connection of its own and, once the workload switches protocols, the bytes
    /// of both sides are relayed as they are until either closes.
    async fn relay_upgrade(&self, mut req: Request<Incoming>) -> Result<Response<Incoming>, String> {
        let caller = hyper::upgrade::on(&mut req);
        let tcp = self.netns.connect(self.workload).await.map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            http1::handshake(TokioIo::new(tcp)).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection.with_upgrades());
        let mut response = sender.send_request(outgoing(req)).await.map_err(|e| e.to_string())?;
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let workload = hyper::upgrade::on(&mut response);
            tokio::spawn(async move {
                match tokio::join!(caller, workload) {
                    (Ok(caller), Ok(workload)) => {
                        let (mut a, mut b) = (TokioIo::new(caller), TokioIo::new(workload));
                        let _ = tokio::io::copy_bidirectional(&mut a, &mut b).await;
                    }
                    (Err(e), _) | (_, Err(e)) => debug!(error = %e, "an upgrade did not complete"),
                }
            });
        }
        Ok(response)
    }

    async fn forward(&self, req: Request<Incoming>) -> Result<Response<Incoming>, String> {
        let h2 = req.version() == hyper::Version::HTTP_2;
        let req = outgoing(req);
        let mut upstream = self.upstream.lock().await;
        let usable = match upstream.as_ref() {
            Some(Upstream::H1(s)) => !h2 && !s.is_closed(),
            Some(Upstream::H2(s)) => h2 && !s.is_closed(),
            None => false,
        };
        if !usable {
            let tcp = self.netns.connect(self.workload).await.map_err(|e| e.to_string())?;
            let io = TokioIo::new(tcp);
            *upstream = Some(if h2 {
                let (sender, connection) =
                    http2::handshake(TokioExecutor::new(), io).await.map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                Upstream::H2(sender)
            } else {
                let (sender, connection) = http1::handshake(io).await.map_err(|e| e.to_string())?;
                tokio::spawn(connection);
                Upstream::H1(sender)
            });
        }
        match upstream.as_mut().expect("set above") {
            Upstream::H1(sender) => {
                // HTTP/1.1 carries one request at a time: hold the connection until its answer.
                sender.ready().await.map_err(|e| e.to_string())?;
                sender.send_request(req).await.map_err(|e| e.to_string())
            }
            Upstream::H2(sender) => {
                let mut sender = sender.clone();
                drop(upstream);
                sender.send_request(req).await.map_err(|e| e.to_string())
            }
        }
    }
}

/// Counts the bytes read and written through `inner`.
struct Counted<T> {
    inner: T,
    bytes: Counter,
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        self.bytes.inc_by((buf.filled().len() - before) as u64);
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = polled {
            self.bytes.inc_by(n as u64);
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Puts the canonical request-target in place of the one received: for HTTP/2, the `:path` (the
/// scheme and authority stay); for HTTP/1, origin-form, an absolute-form's authority becoming the
/// `Host` header (RFC 9112 §3.2.2).
fn canonical_uri(req: &mut Request<Incoming>, target: &str, absolute: bool) -> Result<(), String> {
    let uri = req.uri().clone();
    let path_and_query: http::uri::PathAndQuery = target.parse().map_err(|e| format!("{target}: {e}"))?;
    let mut parts = uri.into_parts();
    if req.version() == hyper::Version::HTTP_2 {
        parts.path_and_query = Some(path_and_query);
        *req.uri_mut() = hyper::Uri::from_parts(parts).map_err(|e| e.to_string())?;
    } else {
        if absolute && let Some(authority) = parts.authority.as_ref() {
            let host = hyper::header::HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
            req.headers_mut().insert(hyper::header::HOST, host);
        }
        *req.uri_mut() = hyper::Uri::from(path_and_query);
    }
    Ok(())
}
