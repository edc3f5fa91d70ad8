//! The tun device of a workload interface.

use std::net::Ipv4Addr;

use crate::header::OVERHEAD;

/// MTU of the workload interfaces: a 1500-byte underlay less the outer IPv6 (40) or IPv4 (20)
/// header, UDP (8), and the overlay header and tag. 1500 - 40 - 8 - 37 = 1415.
pub const MTU: u16 = 1500 - 40 - 8 - OVERHEAD as u16;

/// A tun device made for the overlay, not yet attached to it.
pub struct Device(tun_rs::SyncDevice);

impl Device {
    /// Creates interface `name` with `address/prefix_len` (which also routes the subnet to it),
    /// in the network namespace of the calling thread.
    pub fn create(name: &str, address: Ipv4Addr, prefix_len: u8) -> std::io::Result<Device> {
        tun_rs::DeviceBuilder::new()
            .name(name)
            .ipv4(address, prefix_len, None)
            .mtu(MTU)
            // TSO/GRO: one read hands over a whole TCP burst, one write takes many.
            .offload(true)
            .build_sync()
            .map(Device)
    }

    pub(super) fn into_async(self) -> std::io::Result<tun_rs::AsyncDevice> {
        tun_rs::AsyncDevice::new(self.0)
    }
}
