//! A replay window after RFC 6479: a ring of 64-bit words, so checking and sliding cost O(1)
//! per packet however far the window moves. It remembers the last [`WINDOW`] counters below the
//! highest seen; anything older is refused as too old.

/// Words in the ring.
const WORDS: usize = 32;
/// Counters remembered below the highest seen (one word is kept spare for sliding).
pub const WINDOW: u64 = ((WORDS - 1) * 64) as u64;

/// Per sender and key: which counters were already accepted.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// The highest counter accepted, if any.
    top: Option<u64>,
    ring: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        ReplayWindow { top: None, ring: [0; WORDS] }
    }
}

fn slot(counter: u64) -> (usize, u64) {
    (((counter / 64) % WORDS as u64) as usize, 1u64 << (counter % 64))
}

impl ReplayWindow {
    /// Whether `counter` may be accepted: new, and not older than the window.
    pub fn check(&self, counter: u64) -> bool {
        let Some(top) = self.top else { return true };
        if counter > top {
            return true;
        }
        if top - counter >= WINDOW {
            return false;
        }
        let (word, bit) = slot(counter);
        self.ring[word] & bit == 0
    }

    /// Records `counter` as accepted (call only after the packet authenticated).
    pub fn update(&mut self, counter: u64) -> bool {
        if !self.check(counter) {
            return false;
        }
        match self.top {
            None => {
                self.ring = [0; WORDS];
                self.top = Some(counter);
            }
            Some(top) if counter > top => {
                // Clear the words the window slides over (all of them after a long jump).
                let (old, new) = (top / 64, counter / 64);
                for i in 1..=(new - old).min(WORDS as u64) {
                    self.ring[((old + i) % WORDS as u64) as usize] = 0;
                }
                self.top = Some(counter);
            }
            Some(_) => {}
        }
        let (word, bit) = slot(counter);
        self.ring[word] |= bit;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashSet;

    #[test]
    fn basics() {
        let mut w = ReplayWindow::default();
        assert!(w.update(0));
        assert!(!w.update(0), "replayed");
        assert!(w.update(5));
        assert!(w.update(3), "late but new");
        assert!(!w.update(3));
        assert!(w.update(10_000));
        assert!(!w.check(10_000 - WINDOW), "too old");
        assert!(w.check(10_000 - WINDOW + 1));
        const { assert!(WINDOW >= 1024) };
    }

    proptest! {
        /// The window accepts exactly what a model that remembers everything would: counters
        /// never seen that are newer than `top - WINDOW`.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec((0u64..6000, any::<bool>()), 1..600)) {
            let mut w = ReplayWindow::default();
            let mut seen: HashSet<u64> = HashSet::new();
            let mut top: Option<u64> = None;
            let mut base = 0u64;
            for (delta, jump) in ops {
                // Mostly near the top, sometimes far ahead.
                let counter = if jump { base + delta * 7 } else { base.saturating_sub(delta % 3000) + delta % 64 };
                let model = !seen.contains(&counter) && top.is_none_or(|t| counter > t || t - counter < WINDOW);
                prop_assert_eq!(w.check(counter), model, "counter {} top {:?}", counter, top);
                prop_assert_eq!(w.update(counter), model);
                if model {
                    seen.insert(counter);
                    top = Some(top.map_or(counter, |t| t.max(counter)));
                }
                base = top.unwrap_or(0);
            }
        }
    }
}
