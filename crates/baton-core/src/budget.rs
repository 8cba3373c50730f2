//! Shares of an allowance one process spends on its callers' behalf. The
//! broker limits a caller as a whole (a node daemon's redeems and task
//! renewals, a gateway's approval requests); without a share per workload
//! or agent behind it, one of them could spend the whole allowance for
//! every other.

use std::collections::HashMap;
use std::hash::Hash;

/// Keys remembered at most; beyond it, those whose share is whole again
/// are forgotten (they would start whole anyway).
const MAX_KEYS: usize = 4096;

/// A token bucket per key: `burst` at once, then `per_sec` a second, with
/// time passed in (unix seconds).
#[derive(Debug)]
pub struct Budget<K> {
    burst: u32,
    per_sec: u32,
    keys: HashMap<K, (u32, u64)>,
}

impl<K: Hash + Eq + Clone> Budget<K> {
    pub fn new(burst: u32, per_sec: u32) -> Self {
        Self {
            burst: burst.max(1),
            per_sec: per_sec.max(1),
            keys: HashMap::new(),
        }
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    pub fn per_sec(&self) -> u32 {
        self.per_sec
    }

    /// Takes one for `key` at `now`, or says in how many seconds one is
    /// there.
    pub fn take(&mut self, key: &K, now: u64) -> Result<(), u64> {
        let (burst, per_sec) = (self.burst, self.per_sec);
        let whole = |(left, at): (u32, u64)| {
            let secs = u32::try_from(now.saturating_sub(at)).unwrap_or(u32::MAX);
            left.saturating_add(secs.saturating_mul(per_sec)).min(burst)
        };
        if !self.keys.contains_key(key) && self.keys.len() >= MAX_KEYS {
            self.keys.retain(|_, b| whole(*b) < burst);
        }
        let share = self.keys.entry(key.clone()).or_insert((burst, now));
        // A clock stepped back restarts the count from then: the key earns
        // nothing for it, and is not locked out until the clock catches up.
        share.1 = share.1.min(now);
        let left = whole(*share);
        if left == 0 {
            return Err(1);
        }
        *share = (left - 1, now);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_key_takes_a_burst_then_its_rate_and_others_keep_theirs() {
        let mut b = Budget::new(60, 1);
        for _ in 0..60 {
            b.take(&"greedy", 100).unwrap();
        }
        assert_eq!(b.take(&"greedy", 100), Err(1));
        // Another key is not starved.
        b.take(&"other", 100).unwrap();
        // Its rate comes back, never more than the burst.
        b.take(&"greedy", 101).unwrap();
        assert_eq!(b.take(&"greedy", 101), Err(1));
        for _ in 0..60 {
            b.take(&"greedy", 10_000).unwrap();
        }
        assert_eq!(b.take(&"greedy", 10_000), Err(1));
        // A clock stepped back earns nothing, and does not lock the key
        // out until the clock is back where it was.
        assert_eq!(b.take(&"greedy", 50), Err(1));
        b.take(&"greedy", 51).unwrap();
        // A rate of several a second.
        let mut fast = Budget::new(5, 10);
        for _ in 0..5 {
            fast.take(&1u32, 0).unwrap();
        }
        assert_eq!(fast.take(&1u32, 0), Err(1));
        for _ in 0..5 {
            fast.take(&1u32, 1).unwrap();
        }
        assert_eq!(fast.take(&1u32, 1), Err(1));
    }
}
