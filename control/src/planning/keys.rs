//! Overlay network keys: per network, a ring of three epoch secrets from the OS CSPRNG that only
//! managers hold, and the pair keys derived from them for each pair of member nodes.
//!
//! ```text
//!            rotate                      rotate
//! next (rx) ───────▶ current (tx + rx) ───────▶ previous (rx) ───▶ dropped
//! ```
//!
//! # Key schedule
//!
//! The secrets never leave the managers. For each epoch `e` of the ring and each pair of nodes
//! `{i, j}` on the network (`i < j` their node indexes, `bᵢ`, `bⱼ` the boot numbers they reported
//! in their sessions), the pair key is
//!
//! ```text
//! K(e, i, j) = HKDF-SHA256(ikm = secret(e), salt = network ID (u32, big-endian),
//!                          info = "mesh pair key v1" || i || bᵢ || j || bⱼ)   (32 bytes)
//! ```
//!
//! computed by the slicer when it builds a slice ([`PairKeys`]), so the state holds O(1) keys per
//! network whatever its size. A node's slice carries, for each network it has an endpoint on and
//! each other node on it, the keys of its own pairs for the ring's epochs, and nothing else:
//!
//! * a member can open, forge or jam only traffic of its own pairs (the tag of a datagram from
//!   `i` to `j` is under `K(·, i, j)`, which no third node holds, and receivers look keys up by
//!   sender index and epoch, checking the UDP source against the sender's attested underlay);
//! * a node that leaves a network (or is removed) drops out of every other node's peers, and its
//!   pair keys with it: within one slice push no node accepts anything it sealed, while the other
//!   pairs, whose keys did not change, lose nothing. No rekey is needed, so none is made;
//! * a node newly placed on a network is sent no key of an epoch older than the one current when
//!   it was placed ([`crate::state::Endpoint::since`]): it gets no `previous`;
//! * a restart of either node changes its boot number and with it the pair's keys, so datagrams
//!   recorded before it fail authentication after it, without a replay window on disk;
//! * node indexes are never reused and a node seals only with its own index and its boot's
//!   counters (see the `tun` crate docs), so a nonce never repeats under a pair key.
//!
//! A node that learns of a rotation late still accepts what its peers send with the new key
//! (it was already `next`) and what they sent just before (now `previous`), so a rotation loses
//! no packets as long as every node hears of it within one rotation interval.

use serde::{Deserialize, Serialize};

use mesh_api::ids;
pub use mesh_api::keys::{KEY_LEN, KeyUse, NetworkKey};
use sha2::{Digest, Sha256};

/// The HKDF `info` prefix of pair keys, versioned.
pub const PAIR_KEY_INFO: &[u8] = b"mesh pair key v1";

/// SHA-256's block size, for HMAC.
const BLOCK: usize = 64;

/// HMAC-SHA256 keyed once: the inner and outer hash states after the padded key (RFC 2104), so
/// each message costs two compressions more, not four.
#[derive(Clone)]
struct Hmac {
    inner: Sha256,
    outer: Sha256,
}

impl Hmac {
    fn new(key: &[u8]) -> Hmac {
        let mut block = [0u8; BLOCK];
        if key.len() > BLOCK {
            block[..32].copy_from_slice(&Sha256::digest(key));
        } else {
            block[..key.len()].copy_from_slice(key);
        }
        let pad = |byte: u8| {
            let mut h = Sha256::new();
            h.update(block.map(|b| b ^ byte));
            h
        };
        Hmac { inner: pad(0x36), outer: pad(0x5c) }
    }

    fn mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut inner = self.inner.clone();
        for p in parts {
            inner.update(p);
        }
        let mut outer = self.outer.clone();
        outer.update(inner.finalize());
        outer.finalize().into()
    }
}

/// HKDF-SHA256 (RFC 5869) with 32 bytes of output: extract, then one block of expand.
#[cfg(test)]
fn hkdf32(salt: &[u8], ikm: &[u8], info: &[&[u8]]) -> [u8; 32] {
    Hkdf::extract(salt, ikm).expand(info)
}

/// HKDF's pseudorandom key, ready to expand.
#[derive(Clone)]
struct Hkdf(Hmac);

impl Hkdf {
    fn extract(salt: &[u8], ikm: &[u8]) -> Hkdf {
        Hkdf(Hmac::new(&Hmac::new(salt).mac(&[ikm])))
    }

    /// The first 32 bytes of output: `T(1) = HMAC(PRK, info || 0x01)`.
    fn expand(&self, info: &[&[u8]]) -> [u8; 32] {
        let mut parts: Vec<&[u8]> = info.to_vec();
        parts.push(&[1]);
        self.0.mac(&parts)
    }
}

/// The pair keys of one network and epoch: HKDF extracted once from the epoch's secret, then
/// one expand per pair (see the module docs).
#[derive(Clone)]
pub struct PairKeys {
    epoch: u32,
    prk: Hkdf,
}

impl PairKeys {
    pub fn new(network_id: u32, secret: &NetworkKey) -> PairKeys {
        PairKeys { epoch: secret.epoch, prk: Hkdf::extract(&network_id.to_be_bytes(), &secret.key) }
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// The key of the pair of nodes `a` and `b`, each as (node index, boot number); the same
    /// whichever order they come in.
    pub fn derive(&self, a: (u32, u16), b: (u32, u16)) -> [u8; KEY_LEN] {
        let ((i, bi), (j, bj)) = if a <= b { (a, b) } else { (b, a) };
        self.prk.expand(&[
            PAIR_KEY_INFO,
            &i.to_be_bytes(),
            &bi.to_be_bytes(),
            &j.to_be_bytes(),
            &bj.to_be_bytes(),
        ])
    }
}

/// A network's three keys and when the ring last turned.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRing {
    pub next: NetworkKey,
    pub current: NetworkKey,
    pub previous: Option<NetworkKey>,
    /// Unix seconds of the last rotation (or creation).
    pub rotated_at: i64,
}

impl KeyRing {
    /// A fresh ring: current at epoch 1, next at epoch 2.
    pub fn new(now: i64) -> KeyRing {
        KeyRing::from_keys(NetworkKey::random(1), NetworkKey::random(2), now)
    }

    fn from_keys(current: NetworkKey, next: NetworkKey, now: i64) -> KeyRing {
        KeyRing { next, current, previous: None, rotated_at: now }
    }

    /// The ring after one rotation, with `fresh` as the new next key.
    pub fn rotated(&self, fresh: [u8; KEY_LEN], now: i64) -> KeyRing {
        KeyRing {
            previous: Some(self.current.clone()),
            current: self.next.clone(),
            next: NetworkKey { epoch: self.next.epoch.wrapping_add(1), key: fresh },
            rotated_at: now,
        }
    }

    /// The ring after one rotation with a key from the OS CSPRNG.
    pub fn rotate(&self, now: i64) -> KeyRing {
        self.rotated(ids::random_bytes::<KEY_LEN>(), now)
    }

    /// Every key with its use, newest first.
    pub fn keys(&self) -> impl Iterator<Item = (KeyUse, &NetworkKey)> {
        [
            (KeyUse::Next, Some(&self.next)),
            (KeyUse::Current, Some(&self.current)),
            (KeyUse::Previous, self.previous.as_ref()),
        ]
        .into_iter()
        .filter_map(|(u, k)| k.map(|k| (u, k)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// After any number of rotations: epochs are consecutive (previous < current < next), the
        /// old current is the new previous, the old next is the new current, and the new next is
        /// a key never seen in the ring before.
        #[test]
        fn ring_transitions_hold(rotations in 1usize..64, seeds in proptest::collection::vec(any::<[u8; 32]>(), 64)) {
            let mut ring = KeyRing::new(0);
            let mut seen = vec![ring.current.key, ring.next.key];
            for (i, fresh) in seeds.into_iter().take(rotations).enumerate() {
                prop_assume!(!seen.contains(&fresh));
                let next = ring.rotated(fresh, i as i64 + 1);
                prop_assert_eq!(next.previous.as_ref(), Some(&ring.current));
                prop_assert_eq!(&next.current, &ring.next);
                prop_assert_eq!(next.next.key, fresh);
                prop_assert_eq!(next.current.epoch, next.previous.as_ref().unwrap().epoch + 1);
                prop_assert_eq!(next.next.epoch, next.current.epoch + 1);
                prop_assert_eq!(next.rotated_at, i as i64 + 1);
                let uses: Vec<KeyUse> = next.keys().map(|(u, _)| u).collect();
                prop_assert_eq!(uses, vec![KeyUse::Next, KeyUse::Current, KeyUse::Previous]);
                seen.push(fresh);
                ring = next;
            }
            prop_assert_eq!(ring.current.epoch as usize, 1 + rotations);
        }
    }

    /// RFC 5869, test case 1 (the first 32 bytes of its 42).
    #[test]
    fn hkdf_matches_the_rfc() {
        let ikm = [0x0b; 22];
        let salt: Vec<u8> = (0..=0x0c).collect();
        let info: Vec<u8> = (0xf0..=0xf9).collect();
        let okm = hkdf32(&salt, &ikm, &[&info]);
        let hex: String = okm.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf");
        // A key longer than a block is hashed first (RFC 4231, test case 6).
        let mac = Hmac::new(&[0xaa; 131]).mac(&[b"Test Using Larger Than Block-Size Key - Hash Key First"]);
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54");
    }

    proptest! {
        /// The pair-key schedule: a pair's key is the same from either side, and differs for
        /// any other pair, epoch, network, or boot of either node.
        #[test]
        fn pair_keys_are_symmetric_and_distinct(
            nodes in proptest::collection::btree_set((1u32..40, 0u16..4), 2..8),
            network in 1u32..1 << 24,
        ) {
            let ring = KeyRing::new(0).rotate(1);
            let nodes: Vec<(u32, u16)> = nodes.into_iter().collect();
            let mut seen = std::collections::HashMap::new();
            for (_, secret) in ring.keys() {
                for net in [network, network ^ 1] {
                    let keys = PairKeys::new(net, secret);
                    for (x, a) in nodes.iter().enumerate() {
                        for b in &nodes[x + 1..] {
                            let k = keys.derive(*a, *b);
                            prop_assert_eq!(k, keys.derive(*b, *a));
                            // Distinct inputs: a distinct pair of (index, boot), or epoch or network.
                            let (lo, hi) = if a <= b { (*a, *b) } else { (*b, *a) };
                            let input = (secret.epoch, net, lo, hi);
                            if let Some(other) = seen.insert(k, input) {
                                prop_assert_eq!(other, input, "two inputs, one key");
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fresh_rings_have_distinct_keys_and_no_previous() {
        let a = KeyRing::new(5);
        let b = KeyRing::new(5);
        assert_ne!(a.current.key, b.current.key);
        assert_ne!(a.current.key, a.next.key);
        assert_eq!((a.current.epoch, a.next.epoch, a.previous.is_none()), (1, 2, true));
        let debug = format!("{a:?}");
        let hex: String = a.current.key.iter().map(|b| format!("{b:02x}")).collect();
        assert!(debug.contains("redacted") && !debug.contains(&hex));
    }
}
