//! A bounded cache of tokens whose signature and claims already verified,
//! keyed by the SHA-256 of the compact token.
//!
//! Sharded mutexes keep concurrent hits from queueing on one lock. Each
//! shard holds at most `capacity / SHARDS` entries; when a shard is full,
//! an insert first drops expired entries and then, if still full, the least
//! recently used eighth of the shard (one O(n log n) sweep per n/8
//! inserts). Expired entries are also dropped when a lookup finds them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

const SHARDS: usize = 16;

pub(crate) type Key = [u8; 32];

struct Slot<V> {
    value: Arc<V>,
    exp: u64,
    last_used: u64,
}

struct Shard<V> {
    map: HashMap<Key, Slot<V>>,
}

pub(crate) struct TokenCache<V> {
    shards: Vec<Mutex<Shard<V>>>,
    per_shard: usize,
    tick: AtomicU64,
}

impl<V> TokenCache<V> {
    /// `capacity` 0 disables caching.
    pub(crate) fn new(capacity: usize) -> Self {
        let per_shard = capacity.div_ceil(SHARDS);
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: HashMap::new(),
                    })
                })
                .collect(),
            per_shard,
            tick: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &Key) -> Option<MutexGuard<'_, Shard<V>>> {
        let idx = usize::from(key[0]) % SHARDS;
        // A poisoned shard only means another thread panicked while holding
        // it; the map itself is still consistent (every mutation is a
        // single HashMap call).
        self.shards
            .get(idx)
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner))
    }

    pub(crate) fn get(&self, key: &Key, now: u64) -> Option<Arc<V>> {
        let mut shard = self.shard(key)?;
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        match shard.map.get_mut(key) {
            Some(slot) if slot.exp > now => {
                slot.last_used = tick;
                Some(slot.value.clone())
            }
            Some(_) => {
                shard.map.remove(key);
                None
            }
            None => None,
        }
    }

    pub(crate) fn insert(&self, key: Key, value: Arc<V>, exp: u64, now: u64) {
        if self.per_shard == 0 {
            return;
        }
        let Some(mut shard) = self.shard(&key) else {
            return;
        };
        let tick = self.tick.fetch_add(1, Ordering::Relaxed);
        if shard.map.len() >= self.per_shard && !shard.map.contains_key(&key) {
            shard.map.retain(|_, s| s.exp > now);
            if shard.map.len() >= self.per_shard {
                let mut ages: Vec<u64> = shard.map.values().map(|s| s.last_used).collect();
                ages.sort_unstable();
                let cut = (self.per_shard / 8).max(1);
                let threshold = ages.get(cut - 1).copied().unwrap_or(u64::MAX);
                shard.map.retain(|_, s| s.last_used > threshold);
            }
        }
        shard.map.insert(
            key,
            Slot {
                value,
                exp,
                last_used: tick,
            },
        );
    }

    pub(crate) fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|m| m.lock().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    pub(crate) fn clear(&self) {
        for m in &self.shards {
            m.lock().unwrap_or_else(PoisonError::into_inner).map.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> Key {
        let mut k = [0u8; 32];
        k[..4].copy_from_slice(&i.to_be_bytes());
        k[0] = 0; // all in one shard
        k[4] = 1;
        k
    }

    #[test]
    fn bounded_and_expiring() {
        let cache = TokenCache::new(16 * 8);
        for i in 0..100u32 {
            cache.insert(key(i), Arc::new(i), 1000, 0);
        }
        assert!(cache.len() <= 8, "{}", cache.len());
        // The most recent insert survives.
        assert_eq!(cache.get(&key(99), 0).as_deref(), Some(&99));
        // Expired entries are not returned and are dropped.
        assert!(cache.get(&key(99), 1000).is_none());
        assert!(cache.get(&key(99), 0).is_none());
    }

    #[test]
    fn recently_used_survives_eviction() {
        let cache = TokenCache::new(16 * 8);
        for i in 0..8u32 {
            cache.insert(key(i), Arc::new(i), 1000, 0);
        }
        assert!(cache.get(&key(0), 0).is_some());
        cache.insert(key(100), Arc::new(100), 1000, 0);
        assert!(cache.get(&key(0), 0).is_some(), "just used, must stay");
        assert!(cache.get(&key(1), 0).is_none(), "least recently used goes");
    }

    #[test]
    fn zero_capacity_disables() {
        let cache = TokenCache::new(0);
        cache.insert(key(1), Arc::new(1), 1000, 0);
        assert_eq!(cache.len(), 0);
    }
}
