//! The overlay header: 21 bytes before the payload of every datagram, authenticated as AEAD
//! associated data.
//!
//! ```text
//!  0        1        2                       5                        9
//! +--------+--------+-----------------------+------------------------+
//! | version|  type  |  network ID (24 bits) |    key epoch (u32)     |
//! +--------+--------+-----------------------+------------------------+
//!  9                        13                                       21
//! +-------------------------+----------------------------------------+
//! |   sender index (u32)    |             counter (u64)              |
//! +-------------------------+----------------------------------------+
//!  21
//! +-----------------------------------------------------+------------+
//! |  inner IP packet (encrypted unless type = plain)     | tag (16 B) |
//! +-----------------------------------------------------+------------+
//! ```
//!
//! All integers are big-endian. The nonce is `sender index || counter` (12 bytes); see the crate
//! docs for why it never repeats under one key.

/// The header's version.
pub const VERSION: u8 = 1;
/// Bytes in the header.
pub const HEADER_LEN: usize = 21;
/// Bytes in the AES-GCM tag.
pub const TAG_LEN: usize = 16;
/// Bytes an encrypted datagram adds to the inner packet.
pub const OVERHEAD: usize = HEADER_LEN + TAG_LEN;

/// What the payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PacketType {
    /// An inner packet sealed with AES-256-GCM.
    Sealed = 0,
    /// An inner packet of an unencrypted network: the same header, no encryption, no tag.
    Plain = 1,
}

/// A decoded header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: PacketType,
    /// 24 bits.
    pub network: u32,
    pub epoch: u32,
    pub sender: u32,
    pub counter: u64,
}

/// Why bytes are not a header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    #[error("shorter than a header")]
    Short,
    #[error("unknown version {0}")]
    Version(u8),
    #[error("unknown packet type {0}")]
    Type(u8),
}

impl Header {
    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`.
    pub fn encode(&self, out: &mut [u8; HEADER_LEN]) {
        debug_assert!(self.network < 1 << 24);
        out[0] = VERSION;
        out[1] = self.kind as u8;
        out[2..5].copy_from_slice(&self.network.to_be_bytes()[1..]);
        out[5..9].copy_from_slice(&self.epoch.to_be_bytes());
        out[9..13].copy_from_slice(&self.sender.to_be_bytes());
        out[13..21].copy_from_slice(&self.counter.to_be_bytes());
    }

    /// Reads the header at the start of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Header, HeaderError> {
        let h: &[u8; HEADER_LEN] =
            bytes.get(..HEADER_LEN).and_then(|b| b.try_into().ok()).ok_or(HeaderError::Short)?;
        if h[0] != VERSION {
            return Err(HeaderError::Version(h[0]));
        }
        let kind = match h[1] {
            0 => PacketType::Sealed,
            1 => PacketType::Plain,
            other => return Err(HeaderError::Type(other)),
        };
        Ok(Header {
            kind,
            network: u32::from_be_bytes([0, h[2], h[3], h[4]]),
            epoch: u32::from_be_bytes(h[5..9].try_into().expect("4 bytes")),
            sender: u32::from_be_bytes(h[9..13].try_into().expect("4 bytes")),
            counter: u64::from_be_bytes(h[13..21].try_into().expect("8 bytes")),
        })
    }

    /// The AEAD nonce: sender index, then counter.
    pub fn nonce(&self) -> [u8; 12] {
        let mut n = [0u8; 12];
        n[..4].copy_from_slice(&self.sender.to_be_bytes());
        n[4..].copy_from_slice(&self.counter.to_be_bytes());
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trips(plain: bool, network in 0u32..1 << 24, epoch: u32, sender: u32, counter: u64) {
            let h = Header { kind: if plain { PacketType::Plain } else { PacketType::Sealed }, network, epoch, sender, counter };
            let mut buf = [0u8; HEADER_LEN];
            h.encode(&mut buf);
            prop_assert_eq!(Header::decode(&buf).unwrap(), h);
        }

        #[test]
        fn any_bytes_decode_or_error_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Header::decode(&bytes);
        }
    }

    #[test]
    fn layout_is_as_documented() {
        let h = Header {
            kind: PacketType::Sealed,
            network: 0x0a0b0c,
            epoch: 7,
            sender: 0x01020304,
            counter: 0x1122334455667788,
        };
        let mut buf = [0u8; HEADER_LEN];
        h.encode(&mut buf);
        assert_eq!(
            buf,
            [1, 0, 0x0a, 0x0b, 0x0c, 0, 0, 0, 7, 1, 2, 3, 4, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]
        );
        assert_eq!(h.nonce(), [1, 2, 3, 4, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88]);
        assert_eq!(Header::decode(&buf[..20]), Err(HeaderError::Short));
        let mut bad = buf;
        bad[0] = 2;
        assert_eq!(Header::decode(&bad), Err(HeaderError::Version(2)));
        bad = buf;
        bad[1] = 9;
        assert_eq!(Header::decode(&bad), Err(HeaderError::Type(9)));
    }
}
