//! What each JWT key signed that may still be in circulation: JWT-SVIDs
//! (counted per expiry second) and delegation tokens (by `jti`, so that a
//! token renewed under a newer key stops counting against the old one).
//!
//! This is what makes revoking a JWT key safe: a validator refuses every
//! token of a key that left the bundle, so [`crate::Ca::revoke`] refuses
//! while [`KeyUsage::in_use`] says a token signed by it may still be
//! presented somewhere. The ledger lives in memory; after a restart only
//! the journal's persisted `signed_until` watermark of each key is known
//! (`untracked_until`), and the refusal holds until it passes.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

/// The delegation ledger is swept of expired tokens whenever it has grown
/// to twice its size after the last sweep, and not below this.
const MIN_SWEEP: usize = 1024;

/// What one JWT key signed that is still live at some moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyUsage {
    /// Unexpired JWT-SVIDs it signed.
    pub jwt_svids: u64,
    /// Unexpired delegation tokens it signed that were not since re-signed
    /// (renewed) under another key.
    pub delegation_tokens: u64,
    /// Unix seconds: the latest expiry among those (0: none).
    pub live_until: u64,
    /// Unix seconds: tokens signed before this process started, which are
    /// not counted, may live until then (0: none).
    #[serde(default)]
    pub untracked_until: u64,
}

impl KeyUsage {
    /// Whether a token signed by the key may still be presented at `now`.
    pub fn in_use(&self, now: u64) -> bool {
        self.jwt_svids > 0 || self.delegation_tokens > 0 || self.untracked_until > now
    }

    /// Unix seconds until which tokens signed by the key may be presented.
    pub fn until(&self) -> u64 {
        self.live_until.max(self.untracked_until)
    }
}

/// Per key, what it signed. Not `Clone`: one per CA, behind a mutex.
#[derive(Debug, Default)]
pub(crate) struct UsageLedger {
    /// kid -> expiry second -> how many JWT-SVIDs expire then.
    svids: HashMap<String, BTreeMap<u64, u64>>,
    /// jti -> (kid, expiry) of the newest signature of that delegation token.
    delegation: HashMap<String, (String, u64)>,
    /// jti -> (kid, expiry) of an earlier signature that is live again: a
    /// renewal re-signed the token but was not handed out, so its holder
    /// still presents the earlier copy. Cleared by the token's next
    /// signature (a renewal handed out revokes the earlier copy's
    /// certificate).
    restored: HashMap<String, (String, u64)>,
    /// kid -> persisted watermark of what it signed before this process.
    untracked: HashMap<String, u64>,
    sweep_at: usize,
}

impl UsageLedger {
    /// Records a JWT-SVID signed by `kid`, live until `exp`.
    pub(crate) fn jwt_svid(&mut self, kid: &str, exp: u64, now: u64) {
        let per_exp = match self.svids.get_mut(kid) {
            Some(m) => m,
            None => self.svids.entry(kid.to_owned()).or_default(),
        };
        // Expired entries are dropped as new ones come, so each map holds
        // at most one entry per second of the longest JWT-SVID lifetime.
        while let Some(e) = per_exp.first_entry()
            && *e.key() <= now
        {
            e.remove();
        }
        *per_exp.entry(exp).or_insert(0) += 1;
    }

    /// Records a delegation token `jti` signed by `kid`, live until `exp`.
    // INVARIANT: the broker signs a `jti` a second time only when it renews
    // that token, and renewal revokes the certificate the earlier copy is
    // bound to (`cnf`), so the earlier copy can no longer be used: the
    // newest signature is the only one that counts.
    pub(crate) fn delegation_token(&mut self, kid: &str, jti: &str, exp: u64, now: u64) {
        if self.delegation.len() >= self.sweep_at.max(MIN_SWEEP) {
            self.delegation.retain(|_, (_, e)| *e > now);
            self.restored.retain(|_, (_, e)| *e > now);
            self.sweep_at = self.delegation.len().saturating_mul(2);
        }
        self.restored.remove(jti);
        self.delegation
            .insert(jti.to_owned(), (kid.to_owned(), exp));
    }

    /// Records that the copy of delegation token `jti` signed by `kid`,
    /// live until `exp`, is in use again: the renewal that re-signed it
    /// was not handed out. The newer signature stays counted too (nothing
    /// says it never left), so both keys count the token.
    pub(crate) fn restore_delegation_token(&mut self, kid: &str, jti: &str, exp: u64, now: u64) {
        if exp <= now {
            return;
        }
        match self.delegation.get(jti) {
            Some((k, e)) if k == kid => {
                let e = (*e).max(exp);
                self.delegation.insert(jti.to_owned(), (kid.to_owned(), e));
            }
            Some(_) => {
                self.restored.insert(jti.to_owned(), (kid.to_owned(), exp));
            }
            None => {
                self.delegation
                    .insert(jti.to_owned(), (kid.to_owned(), exp));
            }
        }
    }

    /// Records that `kid` signed, before this process started, tokens that
    /// may live until `until`.
    pub(crate) fn untracked(&mut self, kid: &str, until: u64) {
        let u = self.untracked.entry(kid.to_owned()).or_insert(0);
        *u = (*u).max(until);
    }

    /// What `kid` signed that is still live at `now`.
    pub(crate) fn usage(&self, kid: &str, now: u64) -> KeyUsage {
        let mut u = KeyUsage::default();
        if let Some(m) = self.svids.get(kid) {
            for (exp, n) in m.range(now.saturating_add(1)..) {
                u.jwt_svids += n;
                u.live_until = u.live_until.max(*exp);
            }
        }
        for (k, exp) in self.delegation.values().chain(self.restored.values()) {
            if k == kid && *exp > now {
                u.delegation_tokens += 1;
                u.live_until = u.live_until.max(*exp);
            }
        }
        u.untracked_until = self
            .untracked
            .get(kid)
            .copied()
            .filter(|t| *t > now)
            .unwrap_or(0);
        u
    }

    /// Forgets `kid` (revoked or pruned: nothing of it is accepted any more).
    pub(crate) fn forget(&mut self, kid: &str) {
        self.svids.remove(kid);
        self.untracked.remove(kid);
        self.delegation.retain(|_, (k, _)| k != kid);
        self.restored.retain(|_, (k, _)| k != kid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_live_tokens_per_key_until_they_expire() {
        let mut l = UsageLedger::default();
        l.jwt_svid("k1", 110, 100);
        l.jwt_svid("k1", 120, 100);
        l.jwt_svid("k2", 130, 100);
        l.delegation_token("k1", "j1", 150, 100);
        let u = l.usage("k1", 100);
        assert_eq!(
            (u.jwt_svids, u.delegation_tokens, u.live_until),
            (2, 1, 150)
        );
        assert!(u.in_use(100));
        // At exp the token is expired (no leeway).
        assert_eq!(l.usage("k1", 110).jwt_svids, 1);
        let late = l.usage("k1", 150);
        assert!(!late.in_use(150), "{late:?}");
        assert_eq!(l.usage("k2", 100).jwt_svids, 1);
    }

    #[test]
    fn a_renewed_delegation_token_counts_against_the_new_key_only() {
        let mut l = UsageLedger::default();
        l.delegation_token("k1", "j1", 200, 100);
        l.delegation_token("k1", "j2", 200, 100);
        l.delegation_token("k2", "j1", 200, 110);
        assert_eq!(l.usage("k1", 120).delegation_tokens, 1);
        assert_eq!(l.usage("k2", 120).delegation_tokens, 1);
    }

    /// A renewal under a new key that was not handed out leaves the holder
    /// with the copy the old key signed: restored, it counts against the
    /// old key again (so revoking that key without `--force` is refused),
    /// until a renewal that is handed out re-signs the token.
    #[test]
    fn a_renewal_not_handed_out_counts_the_earlier_copy_again() {
        let mut l = UsageLedger::default();
        l.delegation_token("k1", "j1", 200, 100);
        l.delegation_token("k2", "j1", 190, 110);
        assert_eq!(l.usage("k1", 120).delegation_tokens, 0, "control");
        l.restore_delegation_token("k1", "j1", 200, 111);
        assert_eq!(l.usage("k1", 120).delegation_tokens, 1);
        assert_eq!(l.usage("k1", 120).live_until, 200);
        assert_eq!(l.usage("k2", 120).delegation_tokens, 1);
        // The retry, handed out this time: the old copy is dead again.
        l.delegation_token("k2", "j1", 190, 130);
        assert_eq!(l.usage("k1", 140).delegation_tokens, 0);
        assert_eq!(l.usage("k2", 140).delegation_tokens, 1);
        // Restored under the key that signed it last: one token, not two.
        l.restore_delegation_token("k2", "j1", 190, 141);
        assert_eq!(l.usage("k2", 150).delegation_tokens, 1);
        // Forgetting a key forgets its restored copies.
        l.restore_delegation_token("k1", "j1", 200, 142);
        l.forget("k1");
        assert_eq!(l.usage("k1", 150).delegation_tokens, 0);
    }

    #[test]
    fn untracked_watermark_holds_until_it_passes_and_forget_clears() {
        let mut l = UsageLedger::default();
        l.untracked("k1", 300);
        let u = l.usage("k1", 100);
        assert_eq!((u.jwt_svids, u.untracked_until, u.until()), (0, 300, 300));
        assert!(u.in_use(100));
        assert!(!l.usage("k1", 300).in_use(300));
        l.jwt_svid("k1", 400, 100);
        l.forget("k1");
        assert_eq!(l.usage("k1", 100), KeyUsage::default());
    }

    #[test]
    fn the_delegation_ledger_is_swept_of_expired_tokens() {
        let mut l = UsageLedger::default();
        for i in 0..MIN_SWEEP {
            l.delegation_token("k1", &format!("j{i}"), 10, 0);
        }
        l.delegation_token("k1", "late", 100, 50);
        assert_eq!(l.delegation.len(), 1);
        assert_eq!(l.usage("k1", 50).delegation_tokens, 1);
    }
}
