//! Overlay keys: a network's epoch secrets as managers hold them ([`NetworkKey`], never sent to
//! a node) and the pair keys a node receives ([`PairKey`]: the key it shares with one peer node
//! for one epoch), with what an epoch may be used for ([`KeyUse`]).

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::ids;

/// Bytes in an AES-256-GCM key.
pub const KEY_LEN: usize = 32;

/// One key and its epoch. Epochs increase by one at every rotation of a network's ring (a u32
/// lasts 136 years at one rotation a second).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkKey {
    pub epoch: u32,
    #[serde(with = "hex_key")]
    pub key: [u8; KEY_LEN],
}

impl fmt::Debug for NetworkKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "NetworkKey {{ epoch: {}, key: <redacted> }}", self.epoch)
    }
}

impl NetworkKey {
    pub fn random(epoch: u32) -> NetworkKey {
        NetworkKey { epoch, key: ids::random_bytes::<KEY_LEN>() }
    }
}

/// The key this node shares with the node of index `peer` on one network, for one epoch. Only
/// the two nodes of the pair (and the managers, who derive it) ever hold it.
#[derive(Clone, PartialEq, Eq)]
pub struct PairKey {
    pub peer: u32,
    pub epoch: u32,
    pub key: [u8; KEY_LEN],
}

impl fmt::Debug for PairKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PairKey {{ peer: {}, epoch: {}, key: <redacted> }}", self.peer, self.epoch)
    }
}

/// What a key of the ring may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyUse {
    Next,
    Current,
    Previous,
}

mod hex_key {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    use super::KEY_LEN;

    pub fn serialize<S: Serializer>(key: &[u8; KEY_LEN], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&key.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; KEY_LEN], D::Error> {
        let hex = String::deserialize(d)?;
        if hex.len() != 2 * KEY_LEN || !hex.is_ascii() {
            return Err(D::Error::custom("expected 64 hex digits"));
        }
        let mut out = [0u8; KEY_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(D::Error::custom)?;
        }
        Ok(out)
    }
}

/// Whether `public` is a WireGuard (X25519) public key worth recording: not one of the curve's
/// small-order points, with which every Diffie-Hellman result is the same (all zeros) whoever
/// computes it, so that any on-path attacker could finish a handshake as that node's peer.
pub fn usable_wireguard_public(public: &[u8; 32]) -> bool {
    let probe = x25519_dalek::StaticSecret::from([0x5a; 32]);
    probe.diffie_hellman(&x25519_dalek::PublicKey::from(*public)).was_contributory()
}

#[cfg(test)]
mod wireguard_tests {
    use super::*;

    #[test]
    fn small_order_points_are_not_usable_public_keys() {
        let mut small_order = vec![[0u8; 32], {
            let mut one = [0u8; 32];
            one[0] = 1;
            one
        }];
        // A point of order 8 (from the curve's published small-order list), and p - 1.
        small_order.push([
            0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4, 0x6a,
            0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49, 0xb8, 0x00,
        ]);
        let mut p_minus_1 = [0xff; 32];
        p_minus_1[0] = 0xec;
        p_minus_1[31] = 0x7f;
        small_order.push(p_minus_1);
        for point in &small_order {
            assert!(!usable_wireguard_public(point), "{point:02x?}");
        }
        let real = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([7; 32]));
        assert!(usable_wireguard_public(real.as_bytes()));
    }
}
