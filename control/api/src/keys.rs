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
