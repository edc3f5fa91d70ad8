//! Workload -> underlay, one task per attached interface.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;
use tracing::warn;

use super::udp::{Batch, MAX_DATAGRAM};
use super::{Attached, Devices};
use crate::core::{DropReason, Sealer, Tables};
use crate::filter::{Admission, Outgoing, Workload};
use crate::packet::Ipv4Header;

/// What one interface's send path holds.
pub(super) struct Sender<V> {
    /// This interface: its device and its workload's filter state.
    pub own: Arc<Attached>,
    pub network: u32,
    pub address: Ipv4Addr,
    pub socket: Arc<UdpSocket>,
    pub tables: Arc<ArcSwap<Tables>>,
    pub devices: Devices,
    pub sealer: Arc<Sealer>,
    pub views: Arc<ArcSwap<V>>,
}

impl<V: Admission> Sender<V> {
    /// Reads a burst (one TSO segment split into packets), seals each, and sends them to each
    /// peer in as few calls as GSO allows; a packet for a workload on this node goes straight to
    /// that workload's interface, through the filter.
    pub async fn run(self) {
        let Sender { own, network, address, socket, tables, devices, sealer, views } = self;
        let state = match quinn_udp::UdpSocketState::new((&*socket).into()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot set up the underlay socket for batching; stopping");
                return;
            }
        };
        let max_segments = state.max_gso_segments().max(1);
        let mut outgoing = Outgoing::new();
        let mut original = vec![0u8; tun_rs::VIRTIO_NET_HDR_LEN + 65535];
        let mut bufs = vec![vec![0u8; 65535]; tun_rs::IDEAL_BATCH_SIZE];
        let mut sizes = vec![0usize; tun_rs::IDEAL_BATCH_SIZE];
        let mut out = Vec::with_capacity(MAX_DATAGRAM);
        let mut batch = Batch::new();
        loop {
            let mut n = match own.device.recv_multiple(&mut original, &mut bufs, &mut sizes, 0).await {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, %address, "reading the workload's interface failed; stopping");
                    return;
                }
            };
            // What is already queued on the device joins this batch (small packets, one per
            // read, then leave in one GSO send per peer); an empty queue ends it at once.
            let mut reads = 1;
            loop {
                let tables = tables.load();
                let now = Instant::now();
                for (buf, &size) in bufs.iter().zip(&sizes).take(n) {
                    let packet = &buf[..size];
                    if let Some(ip) = Ipv4Header::parse(packet)
                        && ip.source == address
                        && tables.is_local(network, ip.destination)
                    {
                        // To a workload of this node: its state admits, as from another node.
                        let to = devices.load().get(&(network, ip.destination)).cloned();
                        let admitted = to
                            .as_ref()
                            .is_some_and(|to| lock(&to.filter).admit(&**views.load(), packet, now));
                        if !admitted {
                            sealer.counters.count_drop(DropReason::Filtered);
                            continue;
                        }
                        note(&mut outgoing, &own, packet, now);
                        if let Some(to) = to {
                            let _ = to.device.send(packet).await;
                        }
                        continue;
                    }
                    if let Ok(to) = sealer.seal(&tables, network, address, packet, &mut out) {
                        note(&mut outgoing, &own, packet, now);
                        if !batch.fits(to, out.len(), max_segments) {
                            batch.flush(&socket, &state).await;
                        }
                        batch.push(to, &out);
                    }
                }
                if reads == READS_PER_FLUSH {
                    break;
                }
                match own.device.try_recv_multiple(&mut original, &mut bufs, &mut sizes, 0) {
                    Ok(more) => {
                        n = more;
                        reads += 1;
                    }
                    // Nothing queued (or an error the blocking read above reports).
                    Err(_) => break,
                }
            }
            batch.flush(&socket, &state).await;
        }
    }
}

/// Most device reads taken before the batch is sent (a TCP burst is one read; small packets are
/// one each).
const READS_PER_FLUSH: usize = 64;

/// Notes `packet`, leaving the workload of `own`, in its filter state when it opens (or renews)
/// a flow, so that the replies to it pass.
fn note(outgoing: &mut Outgoing, own: &Attached, packet: &[u8], now: Instant) {
    if let Some(flow) = outgoing.note(packet, now) {
        lock(&own.filter).opened(flow, now);
    }
}

fn lock(filter: &Mutex<Workload>) -> MutexGuard<'_, Workload> {
    filter.lock().unwrap_or_else(PoisonError::into_inner)
}
