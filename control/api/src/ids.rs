//! Identifiers: cluster and node IDs (128 random bits, fixed-length base36) and the base36
//! digests used in join tokens.

use std::fmt;
use std::str::FromStr;

use rand::TryRngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Base36 digits of a 128-bit value: 36^25 > 2^128, so 25 digits hold any of them.
pub const ID_LEN: usize = 25;
/// Base36 digits of a 256-bit SHA-256 digest: 36^50 > 2^256.
pub const DIGEST_LEN: usize = 50;

const ALPHABET: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";

/// Encodes big-endian `bytes` as exactly `len` base36 digits (zero-padded).
pub fn base36(bytes: &[u8], len: usize) -> String {
    let mut digits = vec![b'0'; len];
    let mut n = bytes.to_vec();
    for slot in digits.iter_mut().rev() {
        let mut rem = 0u32;
        for byte in n.iter_mut() {
            let acc = (rem << 8) | u32::from(*byte);
            *byte = (acc / 36) as u8;
            rem = acc % 36;
        }
        *slot = ALPHABET[rem as usize];
    }
    String::from_utf8(digits).expect("alphabet is ASCII")
}

fn is_base36(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_lowercase())
}

/// `N` bytes from the OS CSPRNG. A failing OS generator leaves nothing safe to do but stop.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    rand::rngs::OsRng.try_fill_bytes(&mut bytes).expect("the OS random number generator failed");
    bytes
}

/// 128 random bits from the OS CSPRNG, as 25 base36 digits.
pub fn random_base36_128() -> String {
    base36(&random_bytes::<16>(), ID_LEN)
}

/// SHA-256 of `data` as 50 base36 digits: the CA digest pinned by join tokens.
pub fn digest_base36(data: &[u8]) -> String {
    base36(&Sha256::digest(data), DIGEST_LEN)
}

/// An ID that is not 25 lowercase base36 digits.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{value}` is not a valid {kind} ID: expected {ID_LEN} characters of 0-9a-z")]
pub struct InvalidId {
    pub kind: &'static str,
    pub value: String,
}

macro_rules! id_type {
    ($name:ident, $kind:literal, $doc:literal) => {
        #[doc = $doc]
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// A fresh random ID.
            pub fn random() -> Self {
                Self(random_base36_128())
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;
            fn from_str(s: &str) -> Result<Self, InvalidId> {
                if is_base36(s, ID_LEN) {
                    Ok(Self(s.to_owned()))
                } else {
                    Err(InvalidId { kind: $kind, value: s.to_owned() })
                }
            }
        }

        impl TryFrom<String> for $name {
            type Error = InvalidId;
            fn try_from(s: String) -> Result<Self, InvalidId> {
                s.parse()
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    };
}

id_type!(NodeId, "node", "A node's identity: assigned by control at join, the CN of its certificate.");
id_type!(ClusterId, "cluster", "The cluster's identity: the O of every certificate it issues.");

/// Whether `s` has the shape of a base36 digest as used in tokens.
pub fn is_digest(s: &str) -> bool {
    is_base36(s, DIGEST_LEN)
}

/// Whether `s` has the shape of a 128-bit base36 value.
pub fn is_id(s: &str) -> bool {
    is_base36(s, ID_LEN)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base36_is_fixed_length_and_exact() {
        assert_eq!(base36(&[0; 16], ID_LEN), "0".repeat(25));
        assert_eq!(base36(&[0, 35], 3), "00z");
        assert_eq!(base36(&[0, 36], 3), "010");
        // 2^128 - 1 still fits in 25 digits.
        assert_eq!(base36(&[0xff; 16], ID_LEN), "f5lxx1zz5pnorynqglhzmsp33");
    }

    #[test]
    fn random_ids_are_distinct_and_well_formed() {
        let a = NodeId::random();
        let b = NodeId::random();
        assert_ne!(a, b);
        assert!(is_id(a.as_str()));
        assert_eq!(a.as_str().parse::<NodeId>().unwrap(), a);
    }

    #[test]
    fn bad_ids_are_rejected_with_the_value() {
        for bad in ["", "short", &"A".repeat(25), &"0".repeat(26), &"-".repeat(25)] {
            let err = bad.parse::<NodeId>().unwrap_err();
            assert_eq!(err.value, bad);
            assert!(err.to_string().contains("node ID"));
        }
    }
}
