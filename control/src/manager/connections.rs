//! The control port's connections: TLS accepted with the configuration of the moment, each
//! connection registered under the node it authenticated as, so that removing a node (or losing
//! the lead) cuts its connections at once.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use mesh_api::ids::NodeId;
use mesh_api::pki::CertInfo;
use mesh_api::tokens::Role;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};
use tokio_util::task::AbortOnDropHandle;
use tonic::transport::server::Connected;
use tracing::{debug, info};

use super::Manager;
use crate::config::Limits;
use mesh_api::accept::{AcceptBackoff, Admission, Permit, refused};

impl Manager {
    /// Cuts every open connection of `node`.
    pub(crate) fn cut(&self, node: &NodeId) {
        let tokens = self.connections.lock().expect("lock").remove(&Some(node.clone())).unwrap_or_default();
        let open = tokens.iter().filter(|t| !t.is_cancelled()).count();
        for token in tokens {
            token.cancel();
        }
        info!(node = %node, connections = open, "cut the connections of a removed node");
    }

    /// Cuts every connection authenticated as a node (their sessions then go to the leader);
    /// admins' calls in flight finish with their own answer.
    pub(super) fn close_nodes(&self) {
        let mut connections = self.connections.lock().expect("lock");
        for token in connections.iter_mut().filter(|(node, _)| node.is_some()).flat_map(|(_, t)| t.drain(..))
        {
            token.cancel();
        }
    }

    /// Cuts every open connection (at shutdown: sessions are long-lived and would hold a graceful
    /// shutdown open forever).
    pub fn close_all(&self) {
        for token in self.connections.lock().expect("lock").drain().flat_map(|(_, t)| t) {
            token.cancel();
        }
    }

    /// Registers a connection (authenticated as `node`, if any) so it can be cut; prunes closed ones.
    pub(crate) fn track(&self, node: Option<NodeId>, token: CancellationToken) {
        let mut connections = self.connections.lock().expect("lock");
        let list = connections.entry(node).or_default();
        list.retain(|t| !t.is_cancelled());
        list.push(token);
    }
}

/// Accepts TLS connections on `listener` (configuration from `tls` at each handshake) within
/// `limits`, registers each with `track` so it can be cut, and hands them to the gRPC server.
/// Accept errors (out of file descriptors, say) are waited out, never the end of the loop.
pub(crate) fn accept_tls(
    listener: TcpListener,
    limits: Limits,
    tls: impl Fn() -> Arc<ServerConfig> + Send + Sync + 'static,
    track: impl Fn(Option<NodeId>, CancellationToken) + Send + Sync + 'static,
) -> (ReceiverStream<io::Result<Cuttable>>, AbortOnDropHandle<()>) {
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<Cuttable>>(64);
    let hooks = Arc::new((tls, track));
    let handshaking = Admission::new(limits.handshaking);
    let anonymous = Admission::new(limits.anonymous);
    let authenticated = Admission::new(limits.authenticated);
    let task = tokio::spawn(async move {
        let mut backoff = AcceptBackoff::default();
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(conn) => {
                    backoff.reset();
                    conn
                }
                Err(e) => {
                    backoff.wait("the control port", &e).await;
                    continue;
                }
            };
            let Some(handshake_permit) = handshaking.admit(peer.ip()) else {
                refused("too many TLS handshakes in progress", peer);
                continue;
            };
            let hooks = hooks.clone();
            let tx = tx.clone();
            let (anonymous, authenticated) = (anonymous.clone(), authenticated.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                let handshake = TlsAcceptor::from((hooks.0)()).accept(tcp);
                let tls = match tokio::time::timeout(limits.handshake_timeout, handshake).await {
                    Ok(Ok(tls)) => tls,
                    Ok(Err(e)) => {
                        debug!(%peer, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                };
                drop(handshake_permit);
                let certified = tls.get_ref().1.peer_certificates().is_some_and(|c| !c.is_empty());
                let (permit, lifetime) = if certified {
                    (authenticated.admit(peer.ip()), None)
                } else {
                    (anonymous.admit(peer.ip()), Some(limits.anonymous_lifetime))
                };
                let Some(permit) = permit else {
                    refused(
                        if certified {
                            "too many connections"
                        } else {
                            "too many connections without a certificate"
                        },
                        peer,
                    );
                    return;
                };
                let token = CancellationToken::new();
                (hooks.1)(peer_node(&tls), token.clone());
                let _ = tx.send(Ok(Cuttable::new(tls, token, permit, limits.idle, lifetime))).await;
            });
        }
    });
    (ReceiverStream::new(rx), AbortOnDropHandle::new(task))
}

/// The node ID of a connection's client certificate, if it carries one.
fn peer_node(tls: &TlsStream<TcpStream>) -> Option<NodeId> {
    let leaf = tls.get_ref().1.peer_certificates()?.first()?;
    let info = CertInfo::from_der(leaf).ok()?;
    Role::from_ou(&info.unit)?;
    info.common_name.parse().ok()
}

/// A TLS connection that can be cut from outside: once its token is cancelled every read and write
/// fails, which makes the HTTP/2 server drop the connection.
/// It also ends when the peer sends nothing for a while, or (without a certificate) when its
/// time is up.
pub struct Cuttable {
    inner: TlsStream<TcpStream>,
    cut: Pin<Box<WaitForCancellationFutureOwned>>,
    token: CancellationToken,
    /// Reset by every byte read.
    idle: Pin<Box<tokio::time::Sleep>>,
    idle_after: Duration,
    /// For connections without a certificate: when they end, whatever they do.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    _permit: Permit,
}

impl Cuttable {
    fn new(
        inner: TlsStream<TcpStream>,
        token: CancellationToken,
        permit: Permit,
        idle_after: Duration,
        lifetime: Option<Duration>,
    ) -> Cuttable {
        Cuttable {
            inner,
            cut: Box::pin(token.clone().cancelled_owned()),
            token,
            idle: Box::pin(tokio::time::sleep(idle_after)),
            idle_after,
            deadline: lifetime.map(|l| Box::pin(tokio::time::sleep(l))),
            _permit: permit,
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        if self.cut.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(io::ErrorKind::ConnectionAborted, "connection cut"));
        }
        if self.idle.as_mut().poll(cx).is_ready() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "idle for too long"));
        }
        if let Some(deadline) = self.deadline.as_mut()
            && deadline.as_mut().poll(cx).is_ready()
        {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no certificate, and its time is up"));
        }
        Ok(())
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        // Marks the connection closed so the registry can prune it.
        self.token.cancel();
    }
}

impl Connected for Cuttable {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl AsyncRead for Cuttable {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check(cx)?;
        let before = buf.filled().len();
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if matches!(read, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let idle_after = self.idle_after;
            self.idle.as_mut().reset(tokio::time::Instant::now() + idle_after);
        }
        read
    }
}

impl AsyncWrite for Cuttable {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.check(cx)?;
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
