//! A workload for the lab: answers HTTP/1.1 and HTTP/2 (cleartext, told by the preface) with
//! one line naming itself and the request, or echoes raw TCP.
//!
//!     mesh-echo http PORT NAME     # "NAME METHOD TARGET VERSION"; any upgrade asked (WebSocket,
//!                                  # h2c, ...) is accepted, then every byte echoed back; a gRPC
//!                                  # call (content-type application/grpc) gets its message back,
//!                                  # with trailers grpc-status 0 and x-echo-name NAME; a path
//!                                  # ending in /whoami gets the x-mesh-client-id values, one a line
//!                                  # (those that came as trailers marked `trailer`); one ending
//!                                  # in /client gets `NAME: VALUE` lines of x-mesh-client-id,
//!                                  # x-forwarded-for and forwarded; one ending in /peer the
//!                                  # address the connection came from
//!     mesh-echo tcp PORT           # echoes every byte back

use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::{Frame, Incoming};
use hyper::header::{CONTENT_TYPE, HeaderMap, HeaderValue, UPGRADE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: mesh-echo http PORT NAME | mesh-echo tcp PORT";
    let (mode, port) = match (args.get(1), args.get(2).and_then(|p| p.parse::<u16>().ok())) {
        (Some(m), Some(p)) => (m.as_str(), p),
        _ => anyhow::bail!(usage),
    };
    // Floods of connections are tests' to make: as many open files as this process may have.
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    let name = args.get(3).cloned().unwrap_or_default();
    loop {
        let (stream, peer) = listener.accept().await?;
        let name = name.clone();
        match mode {
            "http" => {
                tokio::spawn(async move {
                    let service = service_fn(move |req: Request<Incoming>| {
                        let name = name.clone();
                        async move {
                            if req.uri().path().ends_with("/peer") {
                                // Who connected, as this server sees it.
                                let body = Bytes::from(format!("{}\n", peer.ip()));
                                return Ok::<_, Infallible>(Response::new(Frames(VecDeque::from([
                                    Frame::data(body),
                                ]))));
                            }
                            Ok::<_, Infallible>(answer(&name, req).await)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection_with_upgrades(TokioIo::new(stream), service)
                        .await;
                });
            }
            "tcp" => {
                tokio::spawn(async move {
                    let (mut r, mut w) = stream.into_split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
            _ => anyhow::bail!(usage),
        }
    }
}

async fn answer(name: &str, mut req: Request<Incoming>) -> Response<Frames> {
    if let Some(protocol) = req.headers().get(UPGRADE).cloned() {
        let upgraded = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgraded.await {
                let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut r, &mut w).await;
            }
        });
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(UPGRADE, protocol)
            .header(hyper::header::CONNECTION, "upgrade")
            .body(Frames::default())
            .expect("a valid response");
    }
    if req.headers().get(CONTENT_TYPE).is_some_and(|t| t.as_bytes().starts_with(b"application/grpc")) {
        // gRPC: the request's length-prefixed message is the answer's; the status in trailers.
        let message = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        trailers.insert("x-echo-name", HeaderValue::from_str(name).expect("a header value"));
        let frames = Frames(VecDeque::from([Frame::data(message), Frame::trailers(trailers)]));
        return Response::builder()
            .header(CONTENT_TYPE, "application/grpc")
            .body(frames)
            .expect("a valid response");
    }
    if req.uri().path().ends_with("/whoami") {
        let mut ids: String = req
            .headers()
            .get_all("x-mesh-client-id")
            .iter()
            .map(|v| format!("{}\n", String::from_utf8_lossy(v.as_bytes())))
            .collect();
        // Values that came as trailers too, marked.
        let body = req.into_body().collect().await.ok();
        for v in
            body.as_ref().and_then(|b| b.trailers()).into_iter().flat_map(|t| t.get_all("x-mesh-client-id"))
        {
            ids.push_str(&format!("trailer {}\n", String::from_utf8_lossy(v.as_bytes())));
        }
        return Response::new(Frames(VecDeque::from([Frame::data(Bytes::from(ids))])));
    }
    if req.uri().path().ends_with("/client") {
        // Who the mesh says calls, and from where: every value of each header, one a line.
        // And any header a CGI server would read as one of those (`_` as `-`), `x-real-ip`,
        // and a `Connection` naming them.
        let mut lines: String = ["x-mesh-client-id", "x-forwarded-for", "forwarded"]
            .iter()
            .flat_map(|name| {
                req.headers()
                    .get_all(*name)
                    .iter()
                    .map(move |v| format!("{name}: {}\n", String::from_utf8_lossy(v.as_bytes())))
            })
            .collect();
        for (name, v) in req.headers() {
            let alike = name.as_str().contains('_') || name == "x-real-ip";
            let connection = name == "connection"
                && v.to_str().is_ok_and(|v| v.contains("forward") || v.to_ascii_lowercase().contains("mesh"));
            if alike || connection {
                lines.push_str(&format!("{name}: {}\n", String::from_utf8_lossy(v.as_bytes())));
            }
        }
        return Response::new(Frames(VecDeque::from([Frame::data(Bytes::from(lines))])));
    }
    let target = req.uri().path_and_query().map_or("", |p| p.as_str());
    let line = format!("{name} {} {target} {:?}\n", req.method(), req.version());
    Response::new(Frames(VecDeque::from([Frame::data(Bytes::from(line))])))
}

/// A body of frames known up front: data, then trailers if any.
#[derive(Default)]
struct Frames(VecDeque<Frame<Bytes>>);

impl hyper::body::Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Poll::Ready(self.0.pop_front().map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    /// Exact when there are no trailers: HTTP/1.1 answers then carry a content-length.
    fn size_hint(&self) -> hyper::body::SizeHint {
        let data: Option<u64> =
            self.0.iter().map(|f| f.data_ref().map(|d| d.len() as u64)).try_fold(0, |sum, n| Some(sum + n?));
        data.map_or_else(hyper::body::SizeHint::default, hyper::body::SizeHint::with_exact)
    }
}
