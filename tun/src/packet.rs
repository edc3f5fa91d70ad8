//! The one reader of inner packets: the fixed IPv4 header the [`core`](crate::core) routes by, and
//! the transport ports and TCP flags the [`filter`](crate::filter) decides by. Pure functions of
//! the bytes; anything short, of another version or with a header length below the minimum is
//! not an IPv4 packet.
//!
//! ```text
//!  0       4       8              16      19              31
//! +-------+-------+---------------+-------+---------------+
//! |version|  IHL  |      ...      | flags | fragment off. |   bytes 0..8
//! +-------+-------+---------------+-------+---------------+
//! |      ...      |   protocol    |          ...          |   bytes 8..12
//! +---------------+---------------+-----------------------+
//! |                    source address                     |   bytes 12..16
//! |                 destination address                   |   bytes 16..20
//! +-------------------------------------------------------+
//! | options (IHL > 5) | source port | dest. port | ... TCP flags at +13
//! ```

use std::net::Ipv4Addr;

/// Bytes in an IPv4 header without options.
pub const MIN_HEADER_LEN: usize = 20;

pub const ICMP: u8 = 1;
pub const TCP: u8 = 6;
pub const UDP: u8 = 17;

/// The fields of an IPv4 header the data plane reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Header {
    pub source: Ipv4Addr,
    pub destination: Ipv4Addr,
    pub protocol: u8,
    /// Where the transport header starts (the IHL in bytes).
    pub header_len: usize,
    /// In units of 8 bytes; non-zero for every fragment but the first.
    pub fragment_offset: u16,
}

impl Ipv4Header {
    /// The header at the start of `packet`, if it is one.
    pub fn parse(packet: &[u8]) -> Option<Ipv4Header> {
        let fixed: &[u8; MIN_HEADER_LEN] = packet.get(..MIN_HEADER_LEN)?.try_into().ok()?;
        let header_len = usize::from(fixed[0] & 0x0f) * 4;
        if fixed[0] >> 4 != 4 || header_len < MIN_HEADER_LEN {
            return None;
        }
        Some(Ipv4Header {
            source: Ipv4Addr::new(fixed[12], fixed[13], fixed[14], fixed[15]),
            destination: Ipv4Addr::new(fixed[16], fixed[17], fixed[18], fixed[19]),
            protocol: fixed[9],
            header_len,
            fragment_offset: u16::from_be_bytes([fixed[6], fixed[7]]) & 0x1fff,
        })
    }
}

/// What an IPv4 packet is, as far as the filter cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Packet {
    Icmp,
    /// A non-first fragment: no ports, and useless without its first fragment, which is checked.
    Fragment,
    Transport {
        protocol: u8,
        source: (Ipv4Addr, u16),
        destination: (Ipv4Addr, u16),
        /// A TCP SYN without ACK: a connection being opened.
        opening: bool,
    },
    /// Anything else (other protocols, truncated headers): never let in.
    Other,
}

/// Classifies an IPv4 packet.
pub fn classify(packet: &[u8]) -> Packet {
    let Some(ip) = Ipv4Header::parse(packet) else { return Packet::Other };
    if ip.protocol == ICMP {
        return Packet::Icmp;
    }
    if ip.fragment_offset != 0 {
        return Packet::Fragment;
    }
    if ip.protocol != TCP && ip.protocol != UDP {
        return Packet::Other;
    }
    let at = ip.header_len;
    let Some(ports) = packet.get(at..at + 4) else { return Packet::Other };
    let opening = ip.protocol == TCP && packet.get(at + 13).is_some_and(|flags| flags & 0x12 == 0x02);
    Packet::Transport {
        protocol: ip.protocol,
        source: (ip.source, u16::from_be_bytes([ports[0], ports[1]])),
        destination: (ip.destination, u16::from_be_bytes([ports[2], ports[3]])),
        opening,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub const A: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
    pub const B: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 3);
    pub const SYN: u8 = 0x02;
    pub const ACK: u8 = 0x10;

    /// A 40-byte IPv4 packet of `protocol` with ports and, for TCP, `flags`.
    pub fn packet(protocol: u8, from: (Ipv4Addr, u16), to: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0] = 0x45;
        p[9] = protocol;
        p[12..16].copy_from_slice(&from.0.octets());
        p[16..20].copy_from_slice(&to.0.octets());
        p[20..22].copy_from_slice(&from.1.to_be_bytes());
        p[22..24].copy_from_slice(&to.1.to_be_bytes());
        p[33] = flags;
        p
    }

    #[test]
    fn classifies_icmp_fragments_and_transport() {
        assert_eq!(classify(&packet(ICMP, (A, 0), (B, 0), 0)), Packet::Icmp);
        let mut fragment = packet(UDP, (A, 1), (B, 2), 0);
        fragment[7] = 8;
        assert_eq!(classify(&fragment), Packet::Fragment);
        assert_eq!(classify(&packet(47, (A, 1), (B, 2), 0)), Packet::Other);
        assert_eq!(classify(&[0x45; 10]), Packet::Other);
        assert_eq!(
            classify(&packet(TCP, (A, 1000), (B, 80), SYN)),
            Packet::Transport { protocol: TCP, source: (A, 1000), destination: (B, 80), opening: true }
        );
        assert!(matches!(
            classify(&packet(TCP, (A, 1000), (B, 80), SYN | ACK)),
            Packet::Transport { opening: false, .. }
        ));
    }

    #[test]
    fn headers_too_short_of_another_version_or_with_a_short_ihl_are_not_ipv4() {
        let good = packet(UDP, (A, 1), (B, 2), 0);
        let header = Ipv4Header::parse(&good).unwrap();
        assert_eq!((header.source, header.destination, header.protocol, header.header_len), (A, B, UDP, 20));
        assert_eq!(Ipv4Header::parse(&good[..19]), None);
        let mut v6 = good.clone();
        v6[0] = 0x65;
        assert_eq!(Ipv4Header::parse(&v6), None);
        let mut short_ihl = good.clone();
        short_ihl[0] = 0x44;
        assert_eq!(Ipv4Header::parse(&short_ihl), None);
        assert_eq!(classify(&short_ihl), Packet::Other);
        // Options move the ports: with IHL 6 they start at byte 24.
        let mut options = good;
        options[0] = 0x46;
        options[24..28].copy_from_slice(&[0, 7, 0, 9]);
        assert_eq!(
            classify(&options),
            Packet::Transport { protocol: UDP, source: (A, 7), destination: (B, 9), opening: false }
        );
    }
}
