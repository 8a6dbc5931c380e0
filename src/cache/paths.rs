//! Which stored entries each path has, so that invalidating a path (every successful
//! unsafe request on a caching route does) costs a lookup, not a scan of the cache.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// Independent locks, so that stores on different paths rarely meet.
const SHARDS: usize = 16;

/// Entry slots by path without its query. The shelf keeps it in step with its entries:
/// a slot is added before its entry is stored and removed when the entry leaves, so it
/// never holds more slots than the cache holds entries (plus those in flight).
pub(crate) struct PathIndex {
    hasher: RandomState,
    shards: [Mutex<HashMap<Box<str>, Vec<u128>>>; SHARDS],
}

impl PathIndex {
    pub(crate) fn new() -> PathIndex {
        PathIndex {
            hasher: RandomState::new(),
            shards: std::array::from_fn(|_| Mutex::new(HashMap::new())),
        }
    }

    fn shard(&self, base: &str) -> MutexGuard<'_, HashMap<Box<str>, Vec<u128>>> {
        let shard = self.hasher.hash_one(base) as usize % SHARDS;
        self.shards[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that `slot` holds a response for `path` (query included or not).
    pub(crate) fn add(&self, path: &str, slot: u128) {
        let base = base(path);
        let mut shard = self.shard(base);
        let slots = shard.entry(base.into()).or_default();
        if !slots.contains(&slot) {
            slots.push(slot);
        }
    }

    pub(crate) fn remove(&self, path: &str, slot: u128) {
        let base = base(path);
        let mut shard = self.shard(base);
        if let Some(slots) = shard.get_mut(base) {
            slots.retain(|s| *s != slot);
            if slots.is_empty() {
                shard.remove(base);
            }
        }
    }

    /// The slots of every response stored for `path`, whatever their query.
    pub(crate) fn slots(&self, path: &str) -> Vec<u128> {
        let base = base(path);
        self.shard(base).get(base).cloned().unwrap_or_default()
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap().values().map(Vec::len).sum::<usize>())
            .sum()
    }
}

fn base(path: &str) -> &str {
    path.split('?').next().unwrap_or(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_gather_under_the_path_without_its_query() {
        let index = PathIndex::new();
        index.add("/a", 1);
        index.add("/a?x=1", 2);
        index.add("/a?x=1", 2);
        index.add("/ab", 3);
        let mut slots = index.slots("/a?anything");
        slots.sort();
        assert_eq!(slots, [1, 2]);
        assert_eq!(index.slots("/ab"), [3]);
        index.remove("/a?x=1", 2);
        index.remove("/a", 1);
        assert!(index.slots("/a").is_empty());
        assert_eq!(index.len(), 1, "an emptied path leaves nothing behind");
    }
}
