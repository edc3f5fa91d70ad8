//! The Linux I/O around the core (feature `linux-io`): a tun device per workload interface, one
//! UDP socket on the underlay, and the tasks that move packets between them through the
//! [`core`](crate::core) and the [`filter`].
//!
//! ```text
//!  workload netns              this module                                        underlay
//! ┌────────────┐ read burst   ┌────────────────────────────────────────┐ sendmsg (GSO)
//! │ tun device ├─(TSO split)─►│ send, one task per interface:          ├───────────────► peers
//! │            │              │   note the flow, seal, batch per peer  │
//! │            │ write burst  │ receive, one task:                     │ recvmsg (GRO)
//! │            │◄─(tun GRO)───┤   open, check, admit, group per device │◄─────────────── peers
//! └────────────┘              └────────────────────────────────────────┘
//! ```
//!
//! The core's tables and the policy's view are swapped whole by their owner, so readers never
//! lock; the receive task alone owns the replay windows. The filter's state is per workload
//! ([`filter::Workload`], beside its device): its send path locks it to note a new flow, and
//! whoever delivers to it locks it for a packet that is not of the flow admitted last. A packet
//! between two workloads of this node goes from one interface to the other without the
//! underlay, through the same state.
//!
//! Where the speed is won: one read of a device hands over a whole TCP burst (TSO, split into
//! packets by tun-rs), the datagrams for one peer leave in one `sendmsg` (UDP GSO), one `recvmsg`
//! brings many (UDP GRO), and the packets for one device are written coalesced again (tun GRO).
//! The kernel is reached only through tun-rs, quinn-udp and socket2; nothing here is `unsafe`.

mod device;
mod receive;
mod send;
mod udp;
mod wireguard;

use crate::Map as HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;
use tokio::net::UdpSocket;
use tokio_util::task::AbortOnDropHandle;

use crate::aead::Backend;
use crate::core::{Config, Counters, Sealer, Tables};
use crate::filter::{self, Admission};

pub use device::{Device, MTU};

/// An attached interface: its device, and the filter's state for its workload.
struct Attached {
    device: tun_rs::AsyncDevice,
    filter: Mutex<filter::Workload>,
}

/// The attached interfaces by (network ID, address), swapped whole on change.
type Devices = Arc<ArcSwap<HashMap<(u32, Ipv4Addr), Arc<Attached>>>>;

/// The running overlay of one node: the underlay socket, the tables in force, the attached
/// interfaces and the receive task. `V` is the policy's view the filter asks about new flows,
/// swapped whole by its owner.
pub struct Overlay<V> {
    socket: Arc<UdpSocket>,
    tables: Arc<ArcSwap<Tables>>,
    devices: Devices,
    sealer: Arc<Sealer>,
    counters: Arc<Counters>,
    views: Arc<ArcSwap<V>>,
    _receiver: AbortOnDropHandle<()>,
    _timers: AbortOnDropHandle<()>,
}

impl<V: Admission + Send + Sync + 'static> Overlay<V> {
    /// Binds the underlay socket on `bind` and starts receiving (within a Tokio runtime). `boot`
    /// is this run's boot number, part of every nonce (see the crate docs). Until
    /// [`Overlay::configure`] every datagram is dropped: no network is known.
    pub fn bind(bind: SocketAddr, boot: u16, views: Arc<ArcSwap<V>>) -> std::io::Result<Overlay<V>> {
        let socket = Arc::new(udp::bind(bind)?);
        let counters = Arc::new(Counters::default());
        let tables = Arc::new(ArcSwap::from_pointee(tables(&Config { local_index: 0, networks: vec![] })));
        let devices = Devices::default();
        let receiver = receive::Receiver {
            socket: socket.clone(),
            tables: tables.clone(),
            devices: devices.clone(),
            counters: counters.clone(),
            views: views.clone(),
        };
        let timers = wireguard::Timers { socket: socket.clone(), tables: tables.clone() };
        Ok(Overlay {
            _timers: AbortOnDropHandle::new(tokio::spawn(timers.run())),
            socket,
            tables,
            devices,
            sealer: Arc::new(Sealer::new(boot, counters.clone())),
            counters,
            views,
            _receiver: AbortOnDropHandle::new(tokio::spawn(receiver.run())),
        })
    }

    /// The packet and drop counters of both directions.
    pub fn counters(&self) -> &Arc<Counters> {
        &self.counters
    }

    /// Puts `config` in force for every packet from now on.
    pub fn configure(&self, config: &Config) {
        let previous = self.tables.load_full();
        self.tables.store(Arc::new(Tables::after(config, Backend::DEFAULT, Some(&previous))));
    }

    /// Each WireGuard peer's state: keys (public), endpoint, last handshake, bytes.
    pub fn wireguard_status(&self) -> Vec<crate::wireguard::PeerStatus> {
        self.tables.load().wireguard_status()
    }

    /// A handle that tells [`Overlay::wireguard_status`] from elsewhere (a status server).
    pub fn status_handle(&self) -> StatusHandle {
        StatusHandle(self.tables.clone())
    }

    /// Attaches `device`, a workload's interface with `address` on network `network`: its
    /// packets are sent, and packets for `address` delivered to it, until the returned
    /// [`Interface`] is dropped.
    pub fn attach(&self, network: u32, address: Ipv4Addr, device: Device) -> std::io::Result<Interface> {
        let attached =
            Arc::new(Attached { device: device.into_async()?, filter: Mutex::new(filter::Workload::new()) });
        let sender = send::Sender {
            own: attached.clone(),
            network,
            address,
            socket: self.socket.clone(),
            tables: self.tables.clone(),
            devices: self.devices.clone(),
            sealer: self.sealer.clone(),
            views: self.views.clone(),
        };
        let task = AbortOnDropHandle::new(tokio::spawn(sender.run()));
        self.devices.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert((network, address), attached.clone());
            map
        });
        Ok(Interface { network, address, attached, devices: self.devices.clone(), _send: task })
    }
}

fn tables(config: &Config) -> Tables {
    Tables::new(config, Backend::DEFAULT)
}

/// Tells the overlay's WireGuard peers' state, for as long as the overlay runs.
#[derive(Clone)]
pub struct StatusHandle(Arc<ArcSwap<Tables>>);

impl std::fmt::Debug for StatusHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusHandle")
    }
}

impl StatusHandle {
    pub fn wireguard(&self) -> Vec<crate::wireguard::PeerStatus> {
        self.0.load().wireguard_status()
    }
}

/// A workload's interface on one network, attached to the overlay: its packets move while this
/// lives.
pub struct Interface {
    network: u32,
    address: Ipv4Addr,
    attached: Arc<Attached>,
    devices: Devices,
    _send: AbortOnDropHandle<()>,
}

impl Interface {
    /// The network ID and the workload's address on it.
    pub fn key(&self) -> (u32, Ipv4Addr) {
        (self.network, self.address)
    }
}

impl Drop for Interface {
    fn drop(&mut self) {
        let key = self.key();
        // Only this interface's own entry: another may have taken the address since.
        self.devices.rcu(|map| {
            let mut map = HashMap::clone(map);
            if map.get(&key).is_some_and(|d| Arc::ptr_eq(d, &self.attached)) {
                map.remove(&key);
            }
            map
        });
    }
}
