//! What the packet core's tests share.

use std::net::Ipv4Addr;

/// A minimal IPv4 packet from `src` to `dst` carrying `payload`.
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0];
    p.extend_from_slice(&src.octets());
    p.extend_from_slice(&dst.octets());
    p.extend_from_slice(payload);
    let len = (p.len() as u16).to_be_bytes();
    p[2] = len[0];
    p[3] = len[1];
    p
}
