//! Underlay -> workloads, one task per node.

use crate::Map as HashMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;
use tracing::{debug, warn};

use super::Devices;
use super::udp::MAX_DATAGRAM;
use crate::core::{Counters, DropReason, Opener, Tables, open_wireguard};
use crate::filter::{Admission, Incoming};

/// Messages one receive call may bring (each may be a GRO train of many datagrams): under load
/// one `recvmmsg` drains what queued while the last batch was written to the workloads.
const RECV_BATCH: usize = 8;
/// Room for one received message: a GRO train stays within 64 KiB; twice that, to be sure it is
/// never cut short.
const RECV_CHUNK: usize = MAX_DATAGRAM * 2;
/// Room before each inner packet handed to a tun device: its virtio-net header goes there.
const TUN_HEADROOM: usize = 16;
/// Room every buffer of a packet bound for a device has: tun-rs's GRO table merges the segments
/// of one TCP flow into the first one's buffer only when it has room for them, so a buffer the
/// size of one packet would leave every segment its own write to the device (and the receiving
/// TCP acking every second segment across the overlay).
const COALESCED: usize = TUN_HEADROOM + 65535;

/// A buffer for one packet bound for a device, recycled from `spare` when one is there, always
/// with room for the segments that GRO may merge into it.
fn packet_buffer(spare: &mut Vec<Vec<u8>>) -> Vec<u8> {
    let mut b = spare.pop().unwrap_or_default();
    b.clear();
    b.reserve(COALESCED);
    b.extend_from_slice(&[0; TUN_HEADROOM]);
    b
}

/// What the receive path holds: it alone owns the replay windows.
pub(super) struct Receiver<V> {
    pub socket: Arc<UdpSocket>,
    pub tables: Arc<ArcSwap<Tables>>,
    pub devices: Devices,
    pub counters: Arc<Counters>,
    pub views: Arc<ArcSwap<V>>,
}

impl<V: Admission> Receiver<V> {
    /// Receives (one call may carry many coalesced datagrams: UDP GRO), opens and checks each,
    /// and writes them to each workload's interface coalesced again (tun GRO).
    pub async fn run(self) {
        let Receiver { socket, tables, devices, counters, views } = self;
        let state = match quinn_udp::UdpSocketState::new((&*socket).into()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot set up the underlay socket for batching; not receiving");
                return;
            }
        };
        let mut opener = Opener::default();
        let mut incoming = Incoming::new();
        // Room for RECV_BATCH messages per call (recvmmsg), each a GRO train of up to 64 KiB.
        let mut buf = vec![0u8; RECV_CHUNK * RECV_BATCH];
        let mut meta = [quinn_udp::RecvMeta::default(); RECV_BATCH];
        // The tables last seen, held so that new ones are told by their address (which the
        // held ones keep from being reused).
        let mut held_tables = tables.load_full();
        let mut gro = tun_rs::GROTable::default();
        // Inner packets waiting for each device, in reusable buffers.
        // Kept from batch to batch (emptied, not dropped): no allocation per batch.
        let mut pending: HashMap<(u32, Ipv4Addr), Vec<Vec<u8>>> = HashMap::default();
        let mut spare: Vec<Vec<u8>> = Vec::new();
        // WireGuard handshake answers (and the packets that waited for them), sent after a batch.
        let mut replies: Vec<(std::net::SocketAddr, Vec<u8>)> = Vec::new();
        loop {
            let received = socket
                .async_io(tokio::io::Interest::READABLE, || {
                    let mut iovs: [std::io::IoSliceMut; RECV_BATCH] = {
                        let mut chunks = buf.chunks_mut(RECV_CHUNK);
                        std::array::from_fn(|_| {
                            std::io::IoSliceMut::new(chunks.next().expect("RECV_BATCH chunks"))
                        })
                    };
                    state.recv((&*socket).into(), &mut iovs, &mut meta)
                })
                .await;
            let messages = match received {
                Ok(n) => n,
                Err(e) => {
                    debug!(error = %e, "receiving from the underlay failed");
                    continue;
                }
            };
            let t = tables.load_full();
            if !Arc::ptr_eq(&t, &held_tables) {
                opener.retain_epochs(&t);
                held_tables = t.clone();
            }
            let view = views.load_full();
            let devs = devices.load();
            let now = Instant::now();
            for (m, message) in meta.iter().zip(buf.chunks_mut(RECV_CHUNK)).take(messages) {
                let stride = if m.stride == 0 { m.len } else { m.stride };
                let mut at = 0;
                while at < m.len {
                    let end = (at + stride).min(m.len);
                    let datagram = &mut message[at..end];
                    at = end;
                    if crate::wireguard::network_of(datagram).is_some() {
                        let mut b = packet_buffer(&mut spare);
                        b.resize(TUN_HEADROOM + datagram.len().max(crate::wireguard::MIN_MESSAGE_ROOM), 0);
                        let opened = open_wireguard(
                            &t,
                            &counters,
                            m.addr,
                            datagram,
                            &mut b[TUN_HEADROOM..],
                            &mut replies,
                        );
                        match opened {
                            Ok(Some(d)) => {
                                b.truncate(TUN_HEADROOM + d.range.end);
                                let Some(to) = devs.get(&(d.network, d.destination)) else {
                                    spare.push(b);
                                    continue;
                                };
                                if !incoming.admit(&*view, d.network, &to.filter, &b[TUN_HEADROOM..], now) {
                                    counters.count_drop(DropReason::Filtered);
                                    spare.push(b);
                                    continue;
                                }
                                pending.entry((d.network, d.destination)).or_default().push(b);
                            }
                            Ok(None) => spare.push(b),
                            Err(reason) => {
                                debug!(from = %m.addr, reason = reason.name(), "WireGuard datagram dropped");
                                spare.push(b);
                            }
                        }
                        continue;
                    }
                    match opener.open(&t, &counters, m.addr, datagram) {
                        Ok(d) => {
                            let Some(to) = devs.get(&(d.network, d.destination)) else {
                                debug!(from = %m.addr, "datagram for a workload no longer attached");
                                continue;
                            };
                            if !incoming.admit(&*view, d.network, &to.filter, &datagram[d.range.clone()], now)
                            {
                                counters.count_drop(DropReason::Filtered);
                                debug!(from = %m.addr, "datagram filtered: no L4 rule lets it into the workload");
                                continue;
                            }
                            let mut b = packet_buffer(&mut spare);
                            b.extend_from_slice(&datagram[d.range]);
                            pending.entry((d.network, d.destination)).or_default().push(b);
                        }
                        Err(reason) => debug!(from = %m.addr, reason = reason.name(), "datagram dropped"),
                    }
                }
            }
            for (key, packets) in pending.iter_mut().filter(|(_, p)| !p.is_empty()) {
                if let Some(to) = devs.get(key)
                    && let Err(e) = to.device.send_multiple(&mut gro, packets, TUN_HEADROOM).await
                {
                    debug!(error = %e, "writing to a workload failed");
                }
                spare.append(packets);
            }
            for (to, reply) in replies.drain(..) {
                if let Err(e) = socket.send_to(&reply, to).await {
                    debug!(error = %e, %to, "answering a WireGuard handshake failed");
                }
            }
            // Devices come and go: the entries of those gone leave now and then.
            if pending.len() > devs.len() + 16 {
                pending.retain(|key, _| devs.contains_key(key));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_bound_for_a_device_have_room_for_coalesced_segments() {
        let mut spare = vec![Vec::with_capacity(1500), Vec::new()];
        for _ in 0..3 {
            let b = packet_buffer(&mut spare);
            assert_eq!(b.len(), TUN_HEADROOM, "headroom only");
            assert!(
                b.capacity() >= COALESCED,
                "a buffer of {} bytes cannot take merged segments",
                b.capacity()
            );
        }
    }
}
