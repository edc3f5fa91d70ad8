//! The one reader of inner packets: the fixed IPv4 header the [`core`](crate::core) routes by, and
//! the transport ports and TCP flags the [`filter`](crate::filter) decides by. Pure functions of
//! the bytes; anything short, of another version or with a header length below the minimum is
//! not an IPv4 packet. Ports and flags are read only from a whole transport header (8 bytes of
//! UDP, the TCP header its data offset gives, at least 20 bytes): a first fragment cut shorter,
//! like a SYN whose flags ride in a later fragment, is [`Packet::Other`] (RFC 1858), and a
//! non-first fragment carries no header at all ([`Packet::Fragment`]).
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

/// Bytes in a UDP header.
const UDP_HEADER_LEN: usize = 8;

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
    /// A non-first fragment: no ports or flags to decide by, and it could overwrite those its
    /// first fragment showed when reassembled (RFC 1858), so the filter never lets one in.
    Fragment,
    Transport {
        protocol: u8,
        source: (Ipv4Addr, u16),
        destination: (Ipv4Addr, u16),
        /// A TCP SYN without ACK: a connection being opened.
        opening: bool,
    },
    /// Anything else (other protocols, transport headers cut short): never let in.
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
    let l4_len = match ip.protocol {
        TCP => match packet.get(at + 12) {
            Some(offset) if offset >> 4 >= 5 => usize::from(offset >> 4) * 4,
            _ => return Packet::Other,
        },
        _ => UDP_HEADER_LEN,
    };
    let Some(l4) = packet.get(at..at + l4_len) else { return Packet::Other };
    let opening = ip.protocol == TCP && l4[13] & 0x12 == 0x02;
    let ports = &l4[..4];
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

    /// A 40-byte IPv4 packet of `protocol` with ports and, for TCP, `flags` (a 20-byte TCP
    /// header).
    pub fn packet(protocol: u8, from: (Ipv4Addr, u16), to: (Ipv4Addr, u16), flags: u8) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[2..4].copy_from_slice(&40u16.to_be_bytes());
        p[32] = 0x50;
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
        // A first fragment (more fragments set, offset 0) is read like any packet when it holds
        // the whole transport header.
        let mut first = packet(TCP, (A, 1000), (B, 80), SYN);
        first[6] = 0x20;
        assert!(matches!(classify(&first), Packet::Transport { opening: true, .. }));
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
    fn transport_headers_cut_short_are_never_read() {
        let syn = packet(TCP, (A, 1000), (B, 80), SYN);
        let udp = packet(UDP, (A, 1000), (B, 53), 0);
        let mut bad_offset = syn.clone();
        bad_offset[32] = 0x40;
        let mut long_offset = syn.clone();
        long_offset[32] = 0x60;
        let cases: [(&str, &[u8]); 5] = [
            ("a SYN whose first fragment holds 8 bytes of TCP header", &syn[..28]),
            ("a TCP header without its flags", &syn[..33]),
            ("a data offset below 5 words", &bad_offset),
            ("a data offset past the end", &long_offset),
            ("a UDP header cut short", &udp[..27]),
        ];
        for (case, p) in cases {
            assert_eq!(classify(p), Packet::Other, "{case}");
        }
        assert!(matches!(classify(&udp[..28]), Packet::Transport { .. }), "8 bytes make a UDP header");
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
