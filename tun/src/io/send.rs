//! Workload -> underlay, one task per attached interface.

use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tracing::warn;

use super::Devices;
use super::udp::{Batch, MAX_DATAGRAM};
use crate::core::{DropReason, Sealer, Tables};
use crate::filter::{Admission, Flow, Local, Outgoing};
use crate::packet::Ipv4Header;

/// The filter's state for delivery between workloads of this node, shared by every send path
/// (locked per packet so delivered, never across an await), with the view it last decided by.
pub(super) struct LocalFilter<V> {
    filter: Local,
    /// Held so that a new view is told by its address, which this keeps from being reused.
    view: Arc<V>,
    generation: usize,
}

impl<V: Admission> LocalFilter<V> {
    pub fn new(view: Arc<V>) -> LocalFilter<V> {
        LocalFilter { filter: Local::new(), view, generation: 0 }
    }

    fn deliver(&mut self, views: &ArcSwap<V>, packet: &[u8], now: Instant) -> bool {
        let view = views.load_full();
        if !Arc::ptr_eq(&view, &self.view) {
            self.generation = self.generation.wrapping_add(1);
            self.view = view;
        }
        self.filter.deliver(&*self.view, self.generation, packet, now)
    }
}

/// What one interface's send path holds.
pub(super) struct Sender<V> {
    pub device: Arc<tun_rs::AsyncDevice>,
    pub network: u32,
    pub address: Ipv4Addr,
    pub socket: Arc<UdpSocket>,
    pub tables: Arc<ArcSwap<Tables>>,
    pub devices: Devices,
    pub sealer: Arc<Sealer>,
    pub views: Arc<ArcSwap<V>>,
    pub flows: mpsc::Sender<Flow>,
    pub local: Arc<Mutex<LocalFilter<V>>>,
}

impl<V: Admission> Sender<V> {
    /// Reads a burst (one TSO segment split into packets), seals each, and sends them to each
    /// peer in as few calls as GSO allows; a packet for a workload on this node goes straight to
    /// that workload's interface, through the filter.
    pub async fn run(self) {
        let Sender { device, network, address, socket, tables, devices, sealer, views, flows, local } = self;
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
            let n = match device.recv_multiple(&mut original, &mut bufs, &mut sizes, 0).await {
                Ok(n) => n,
                Err(e) => {
                    warn!(error = %e, %address, "reading the workload's interface failed; stopping");
                    return;
                }
            };
            let tables = tables.load();
            for (buf, &size) in bufs.iter().zip(&sizes).take(n) {
                let packet = &buf[..size];
                if let Some(ip) = Ipv4Header::parse(packet)
                    && ip.source == address
                    && tables.is_local(network, ip.destination)
                {
                    let admitted = local.lock().unwrap_or_else(PoisonError::into_inner).deliver(
                        &views,
                        packet,
                        Instant::now(),
                    );
                    if !admitted {
                        sealer.counters.count_drop(DropReason::Filtered);
                    } else if let Some(local) = devices.load().get(&(network, ip.destination)) {
                        let _ = local.send(packet).await;
                    }
                    continue;
                }
                if let Ok(to) = sealer.seal(&tables, network, address, packet, &mut out) {
                    if let Some(flow) = outgoing.note(packet, Instant::now()) {
                        // Full (nothing came in for a long while, many new flows went out): the
                        // note is lost and that flow's replies wait for its next note; memory
                        // stays bounded.
                        let _ = flows.try_send(flow);
                    }
                    if !batch.fits(to, out.len(), max_segments) {
                        batch.flush(&socket, &state).await;
                    }
                    batch.push(to, &out);
                }
            }
            batch.flush(&socket, &state).await;
        }
    }
}
