//! The filter's bounded tables: a map that, full, makes room by evicting the entry inserted or
//! renewed longest ago. Lookup, insert, renewal and eviction are all O(1) (a hash index into a
//! doubly linked list kept in a `Vec`), so a workload opening flows as fast as it can costs the
//! one task that receives for every workload of the node a constant per flow, never a scan.

use crate::Map as HashMap;
use std::hash::Hash;

/// No slot: the end of the list.
const NIL: usize = usize::MAX;

struct Slot<K, V> {
    key: K,
    value: V,
    older: usize,
    newer: usize,
}

/// At most `capacity` entries, ordered by when each was last inserted.
pub(crate) struct Recent<K, V> {
    capacity: usize,
    index: HashMap<K, usize>,
    slots: Vec<Slot<K, V>>,
    oldest: usize,
    newest: usize,
}

impl<K: Copy + Eq + Hash, V> Recent<K, V> {
    /// An empty table holding at most `capacity` (at least one) entries.
    pub fn new(capacity: usize) -> Recent<K, V> {
        Recent {
            capacity: capacity.max(1),
            index: HashMap::default(),
            slots: Vec::new(),
            oldest: NIL,
            newest: NIL,
        }
    }

    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn get(&self, key: &K) -> Option<&V> {
        self.index.get(key).map(|&i| &self.slots[i].value)
    }

    /// Inserts or renews `key` as the newest entry; when the table is full and `key` is new,
    /// the oldest entry goes to make room, and its key is returned.
    pub fn insert(&mut self, key: K, value: V) -> Option<K> {
        if let Some(&i) = self.index.get(&key) {
            self.slots[i].value = value;
            self.unlink(i);
            self.push_newest(i);
            return None;
        }
        let slot = Slot { key, value, older: NIL, newer: NIL };
        let (i, evicted) = if self.slots.len() < self.capacity {
            self.slots.push(slot);
            (self.slots.len() - 1, None)
        } else {
            let i = self.oldest;
            self.unlink(i);
            let old = std::mem::replace(&mut self.slots[i], slot);
            self.index.remove(&old.key);
            (i, Some(old.key))
        };
        self.index.insert(key, i);
        self.push_newest(i);
        evicted
    }

    pub fn clear(&mut self) {
        self.index.clear();
        self.slots.clear();
        (self.oldest, self.newest) = (NIL, NIL);
    }

    fn unlink(&mut self, i: usize) {
        let (older, newer) = (self.slots[i].older, self.slots[i].newer);
        match older {
            NIL => self.oldest = newer,
            o => self.slots[o].newer = newer,
        }
        match newer {
            NIL => self.newest = older,
            n => self.slots[n].older = older,
        }
    }

    fn push_newest(&mut self, i: usize) {
        self.slots[i].older = self.newest;
        self.slots[i].newer = NIL;
        match self.newest {
            NIL => self.oldest = i,
            n => self.slots[n].newer = i,
        }
        self.newest = i;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_it_evicts_the_entry_inserted_or_renewed_longest_ago() {
        let mut t = Recent::new(3);
        for k in 1..=3 {
            assert_eq!(t.insert(k, k * 10), None);
        }
        assert_eq!(t.insert(1, 11), None, "a renewal evicts nothing");
        assert_eq!(t.insert(4, 40), Some(2), "2 is now the oldest");
        assert_eq!(t.insert(5, 50), Some(3));
        assert_eq!(t.insert(6, 60), Some(1));
        assert_eq!((t.len(), t.get(&1), t.get(&4), t.get(&6)), (3, None, Some(&40), Some(&60)));
        t.clear();
        assert_eq!((t.len(), t.get(&4)), (0, None));
        assert_eq!(t.insert(7, 70), None);
        assert_eq!(t.insert(7, 71), None);
        assert_eq!(t.get(&7), Some(&71));
    }

    #[test]
    fn a_table_of_one_holds_the_newest() {
        let mut t = Recent::new(0);
        assert_eq!(t.insert('a', ()), None);
        assert_eq!(t.insert('a', ()), None);
        assert_eq!(t.insert('b', ()), Some('a'));
        assert_eq!(t.len(), 1);
    }
}
