//! Overlay network keys: AES-256-GCM keys from the OS CSPRNG, held per network in a ring of three.
//!
//! ```text
//!            rotate                      rotate
//! next (rx) ───────▶ current (tx + rx) ───────▶ previous (rx) ───▶ dropped
//! ```
//!
//! A node that learns of a rotation late still accepts what its peers send with the new key
//! (it was already `next`) and what they sent just before (now `previous`), so a rotation loses
//! no packets as long as every node hears of it within one rotation interval.

use serde::{Deserialize, Serialize};

use mesh_api::ids;
pub use mesh_api::keys::{KEY_LEN, KeyUse, NetworkKey};

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

    /// The ring after a node that held it leaves: that node knew `next` as well as `current`,
    /// so both are replaced with fresh keys. The old current stays as `previous` (receive only)
    /// so packets already in flight from nodes that have not heard yet are not lost; it is
    /// dropped at the next rotation. Receivers that have not heard yet drop packets under the new
    /// epoch until they do: the price of cutting the leaver off at once.
    pub fn rekeyed(&self, now: i64) -> KeyRing {
        let epoch = self.next.epoch.wrapping_add(1);
        KeyRing {
            previous: Some(self.current.clone()),
            current: NetworkKey::random(epoch),
            next: NetworkKey::random(epoch.wrapping_add(1)),
            rotated_at: now,
        }
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

    #[test]
    fn a_rekey_replaces_both_keys_a_leaver_knew() {
        let ring = KeyRing::new(0).rotate(1);
        let rekeyed = ring.rekeyed(2);
        assert_eq!(rekeyed.previous.as_ref(), Some(&ring.current));
        assert!(rekeyed.current.key != ring.next.key && rekeyed.next.key != ring.next.key);
        assert!(rekeyed.current.key != ring.current.key);
        assert_eq!((rekeyed.current.epoch, rekeyed.next.epoch), (ring.next.epoch + 1, ring.next.epoch + 2));
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
