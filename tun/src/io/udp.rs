//! The underlay UDP socket, and datagrams batched for one `sendmsg` (UDP GSO).

use std::net::SocketAddr;

use tokio::net::UdpSocket;
use tracing::debug;

/// Socket buffer size asked for: bursts of a fast TCP flow fit without drops.
const SOCKET_BUFFER: usize = 8 << 20;
/// Most payload bytes in one GSO send: the whole must fit one (64 KiB) UDP datagram.
const MAX_GSO_BYTES: usize = 65000;
/// Largest datagram read from or written to the underlay.
pub const MAX_DATAGRAM: usize = 65535;

/// The underlay UDP socket on `bind`, with large buffers.
pub fn bind(bind: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    socket.set_nonblocking(true)?;
    // With CAP_NET_ADMIN (meshd runs as root) past net.core.{r,w}mem_max, which would silently
    // cap a plain request (4 MiB on a stock kernel); without it, as far as those allow.
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(&socket, sockopt::RcvBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket.set_recv_buffer_size(SOCKET_BUFFER);
    }
    if setsockopt(&socket, sockopt::SndBufForce, &SOCKET_BUFFER).is_err() {
        let _ = socket.set_send_buffer_size(SOCKET_BUFFER);
    }
    debug!(
        receive = socket.recv_buffer_size().unwrap_or(0),
        send = socket.send_buffer_size().unwrap_or(0),
        "underlay socket buffers"
    );
    socket.bind(&bind.into())?;
    UdpSocket::from_std(socket.into())
}

/// Sealed datagrams for one peer, sent with one `sendmsg` (UDP GSO) when the kernel allows.
pub struct Batch {
    buf: Vec<u8>,
    to: Option<SocketAddr>,
    segment: usize,
    count: usize,
}

impl Batch {
    pub fn new() -> Batch {
        Batch { buf: Vec::with_capacity(MAX_DATAGRAM * 2), to: None, segment: 0, count: 0 }
    }

    /// Whether a datagram of `len` bytes for `to` can join the batch of at most `max`: same
    /// peer, and every datagram but the last exactly `segment` long.
    pub fn fits(&self, to: SocketAddr, len: usize, max: usize) -> bool {
        self.count == 0
            || (self.to == Some(to)
                && self.count < max
                && len <= self.segment
                && self.buf.len() == self.count * self.segment
                && self.buf.len() + len <= MAX_GSO_BYTES)
    }

    pub fn push(&mut self, to: SocketAddr, datagram: &[u8]) {
        if self.count == 0 {
            self.to = Some(to);
            self.segment = datagram.len();
        }
        self.buf.extend_from_slice(datagram);
        self.count += 1;
    }

    pub async fn flush(&mut self, socket: &UdpSocket, state: &quinn_udp::UdpSocketState) {
        let Some(destination) = self.to.take() else { return };
        let transmit = quinn_udp::Transmit {
            destination,
            ecn: None,
            contents: &self.buf,
            segment_size: (self.count > 1).then_some(self.segment),
            src_ip: None,
        };
        let sent =
            socket.async_io(tokio::io::Interest::WRITABLE, || state.try_send(socket.into(), &transmit)).await;
        if let Err(e) = sent {
            debug!(error = %e, %destination, "sending to a peer failed");
        }
        self.buf.clear();
        self.count = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As root the buffers are what was asked for, whatever net.core.{r,w}mem_max caps a plain
    /// request at (the kernel reports twice the size set, its bookkeeping included).
    #[tokio::test]
    async fn as_root_the_socket_buffers_are_not_capped_by_the_sysctls() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (CAP_NET_ADMIN forces the buffer sizes); run it as root"
        );
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let socket = socket2::SockRef::from(&socket);
        assert!(socket.recv_buffer_size().unwrap() >= 2 * SOCKET_BUFFER, "{:?}", socket.recv_buffer_size());
        assert!(socket.send_buffer_size().unwrap() >= 2 * SOCKET_BUFFER, "{:?}", socket.send_buffer_size());
    }

    #[test]
    fn a_batch_takes_equal_segments_for_one_peer_and_a_shorter_last_one() {
        let (a, b): (SocketAddr, SocketAddr) =
            ("192.0.2.1:4800".parse().unwrap(), "192.0.2.2:4800".parse().unwrap());
        let mut batch = Batch::new();
        assert!(batch.fits(a, 100, 8));
        batch.push(a, &[0; 100]);
        assert!(!batch.fits(b, 100, 8), "another peer");
        assert!(!batch.fits(a, 101, 8), "longer than the segment");
        assert!(batch.fits(a, 60, 8));
        batch.push(a, &[0; 60]);
        assert!(!batch.fits(a, 60, 8), "after a shorter one, nothing more");
        let mut full = Batch::new();
        full.push(a, &[0; 100]);
        assert!(!full.fits(a, 100, 1), "at the kernel's segment limit");
    }
}
