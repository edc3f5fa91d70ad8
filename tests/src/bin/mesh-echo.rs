//! A workload for the lab: answers HTTP/1.1 and HTTP/2 (cleartext, told by the preface) with
//! one line naming itself and the request, or echoes raw TCP.
//!
//!     mesh-echo http PORT NAME     # "NAME METHOD PATH VERSION"; any upgrade asked (WebSocket,
//!                                  # h2c, ...) is accepted, then every byte echoed back
//!     mesh-echo tcp PORT           # echoes every byte back

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
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
    let listener = TcpListener::bind(("0.0.0.0", port)).await?;
    let name = args.get(3).cloned().unwrap_or_default();
    loop {
        let (stream, _) = listener.accept().await?;
        let name = name.clone();
        match mode {
            "http" => {
                tokio::spawn(async move {
                    let service = service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                        let line =
                            format!("{name} {} {} {:?}\n", req.method(), req.uri().path(), req.version());
                        let response = match req.headers().get(hyper::header::UPGRADE).cloned() {
                            Some(protocol) => {
                                let upgraded = hyper::upgrade::on(&mut req);
                                tokio::spawn(async move {
                                    if let Ok(upgraded) = upgraded.await {
                                        let (mut r, mut w) = tokio::io::split(TokioIo::new(upgraded));
                                        let _ = tokio::io::copy(&mut r, &mut w).await;
                                    }
                                });
                                hyper::Response::builder()
                                    .status(hyper::StatusCode::SWITCHING_PROTOCOLS)
                                    .header(hyper::header::UPGRADE, protocol)
                                    .header(hyper::header::CONNECTION, "upgrade")
                                    .body(Full::new(Bytes::new()))
                                    .expect("a valid response")
                            }
                            None => hyper::Response::new(Full::new(Bytes::from(line))),
                        };
                        async move { Ok::<_, Infallible>(response) }
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
