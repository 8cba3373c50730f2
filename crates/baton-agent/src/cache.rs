//! What the node serves: its registration entries, one X509-SVID per entry,
//! the trust bundle, and JWT-SVIDs minted on demand.
//!
//! The cache is published as immutable [`Snapshot`]s through a
//! `tokio::sync::watch` channel: the sync loop builds a new snapshot and
//! swaps it in, and every open Workload API stream wakes up and recomputes
//! its caller's view. Decisions about time (when to rotate) take `now` as an
//! argument so tests control the clock.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use baton_core::selector::entry_matches;
use baton_core::{Entry, EntryId, Secret, SpiffeId, TrustDomain};

use crate::attest::AttestedWorkload;

/// Default share of an SVID's lifetime after which it is replaced.
pub const DEFAULT_ROTATE_FRACTION: f64 = 0.5;

/// A PKCS#8 private key. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyDer(Vec<u8>);

impl KeyDer {
    pub fn new(pkcs8: Vec<u8>) -> Self {
        Self(pkcs8)
    }

    /// The key bytes. Only the Workload API response should need them.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for KeyDer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDer(\"...\")")
    }
}

/// One workload X509-SVID with its key, and the entry it was issued for (so
/// that a changed entry is noticed and re-signed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CachedSvid {
    pub entry: Entry,
    /// Leaf first, then intermediates.
    pub chain_der: Vec<Vec<u8>>,
    pub key: KeyDer,
    /// Unix seconds.
    pub not_before: u64,
    /// Unix seconds.
    pub not_after: u64,
    /// The X.509 authority that signed it (the leaf's authorityKeyIdentifier).
    pub authority_id: Option<String>,
}

/// Ids of the broker's tainted authorities, shared by the sync loop (which
/// learns them), the renewal loop and the JWT-SVID cache.
pub type Tainted = Arc<Vec<String>>;

/// `fraction` of the way from issuance to expiry. The broker's CA
/// back-dates NotBefore (clock skew), so issuance is NotBefore plus that
/// margin: counting from NotBefore itself would make a short-lived SVID due
/// for rotation the moment it arrives, and rotate it in a loop.
pub fn rotation_point(not_before: u64, not_after: u64, fraction: f64) -> u64 {
    let issued = not_before
        .saturating_add(baton_ca::BACKDATE.as_secs())
        .min(not_after);
    let lifetime = not_after.saturating_sub(issued);
    // Rounds down: rotating a second early is harmless, late is not.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let offset = (lifetime as f64 * fraction.clamp(0.0, 1.0)) as u64;
    issued.saturating_add(offset)
}

impl CachedSvid {
    /// When this SVID should be replaced: `fraction` of the way from its
    /// issuance to its expiry.
    pub fn rotate_at(&self, fraction: f64) -> u64 {
        rotation_point(self.not_before, self.not_after, fraction)
    }

    /// The leaf and intermediates concatenated, as the Workload API sends them.
    pub fn chain_concat(&self) -> Vec<u8> {
        self.chain_der.concat()
    }
}

/// The trust bundle of the node's trust domain, pre-encoded the ways the
/// Workload API needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct BundleView {
    pub trust_domain: TrustDomain,
    /// DER CA certificates concatenated.
    pub x509_der: Vec<u8>,
    /// JWKS JSON (`{"keys": [...]}`) with a `kid` on every JWT key.
    pub jwks_json: Vec<u8>,
    /// The parsed bundle, parsed once per sync: JWT-SVIDs are validated
    /// against it without re-reading JSON per call.
    pub trust: std::sync::Arc<baton_ca::TrustBundle>,
}

/// An immutable view of everything the node serves.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    entries: Vec<Entry>,
    svids: BTreeMap<EntryId, Arc<CachedSvid>>,
    bundle: Option<Arc<BundleView>>,
}

impl Snapshot {
    /// A snapshot with these entries and bundle and no SVIDs yet.
    pub fn new(mut entries: Vec<Entry>, bundle: Option<BundleView>) -> Self {
        // Sorted so that "the default SVID first" is stable across syncs.
        entries.sort_by(|a, b| (&a.spiffe_id, &a.id).cmp(&(&b.spiffe_id, &b.id)));
        Self {
            entries,
            svids: BTreeMap::new(),
            bundle: bundle.map(Arc::new),
        }
    }

    /// Adds (or replaces) the SVID of its entry.
    pub fn with_svid(mut self, svid: CachedSvid) -> Self {
        self.svids.insert(svid.entry.id.clone(), Arc::new(svid));
        self
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn svid(&self, id: &EntryId) -> Option<&Arc<CachedSvid>> {
        self.svids.get(id)
    }

    pub fn svids(&self) -> impl Iterator<Item = &Arc<CachedSvid>> {
        self.svids.values()
    }

    pub fn bundle(&self) -> Option<&Arc<BundleView>> {
        self.bundle.as_ref()
    }

    /// Entries whose selectors all hold for the caller, default first.
    pub fn entries_for<'a>(&'a self, who: &'a AttestedWorkload) -> impl Iterator<Item = &'a Entry> {
        self.entries
            .iter()
            .filter(move |e| entry_matches(&e.selectors, who.selectors()))
    }

    /// The caller's entries that have an SVID ready, default first.
    pub fn svids_for<'a>(
        &'a self,
        who: &'a AttestedWorkload,
    ) -> impl Iterator<Item = &'a Arc<CachedSvid>> {
        self.entries_for(who).filter_map(|e| self.svids.get(&e.id))
    }

    /// The earliest moment some SVID in this snapshot is due for rotation.
    pub fn next_rotation(&self, fraction: f64) -> Option<u64> {
        self.svids.values().map(|s| s.rotate_at(fraction)).min()
    }
}

/// Whether `chain_der` (leaf first) is an X509-SVID for `id` that chains
/// to the anchors of `bundles` and is valid at `now`; why not otherwise.
///
/// A full chain verification, not a comparison of authority key ids:
/// under an upstream CA the leaf names the broker's intermediate while
/// the bundle holds the upstream root.
pub fn verify_chain(
    chain_der: &[Vec<u8>],
    id: &SpiffeId,
    bundles: &baton_tls::BundleStore,
    now: u64,
) -> Result<(), String> {
    let chain: Vec<baton_tls::CertificateDer<'_>> = chain_der
        .iter()
        .map(|c| baton_tls::CertificateDer::from(c.as_slice()))
        .collect();
    let (leaf, intermediates) = chain
        .split_first()
        .ok_or_else(|| "its certificate chain is empty".to_owned())?;
    baton_tls::verify_svid(
        leaf,
        intermediates,
        bundles,
        &baton_tls::PeerPolicy::Exact(vec![id.clone()]),
        baton_tls::UnixTime::since_unix_epoch(Duration::from_secs(now)),
    )
    .map(|_| ())
    .map_err(|e| format!("it does not verify against the trust bundle: {e}"))
}

/// The entries whose cached SVID no longer verifies against `bundles` at
/// `now` ([`verify_chain`]): its authority left the bundle (rotated out,
/// revoked), so relying parties holding that bundle refuse it. The sync
/// loop re-signs them ([`entries_to_sign`]) and stops serving them
/// ([`next_snapshot`]).
pub fn unverified(
    current: &Snapshot,
    bundles: &baton_tls::BundleStore,
    now: u64,
) -> BTreeSet<EntryId> {
    current
        .svids
        .values()
        .filter_map(|s| match verify_chain(&s.chain_der, &s.entry.spiffe_id, bundles, now) {
            Ok(()) => None,
            Err(reason) => {
                tracing::warn!(entry = %s.entry.id, spiffe_id = %s.entry.spiffe_id, %reason, "a cached SVID no longer verifies against the trust bundle: no longer served, re-signing it");
                Some(s.entry.id.clone())
            }
        })
        .collect()
}

/// The entries of `entries` whose SVID is missing, was issued for a
/// different version of the entry, is due for rotation at `now`, was
/// signed by a tainted authority, or is in `unverified` (see
/// [`unverified`]).
pub fn entries_to_sign<'a>(
    entries: &'a [Entry],
    current: &Snapshot,
    now: u64,
    fraction: f64,
    tainted: &[String],
    unverified: &BTreeSet<EntryId>,
) -> Vec<&'a Entry> {
    entries
        .iter()
        .filter(|e| match current.svid(&e.id) {
            None => true,
            Some(s) => {
                s.entry != **e
                    || now >= s.rotate_at(fraction)
                    || now >= s.not_after
                    || s.authority_id.as_ref().is_some_and(|a| tainted.contains(a))
                    || unverified.contains(&e.id)
            }
        })
        .collect()
}

/// Builds the next snapshot: the new entries and bundle, the SVIDs of
/// `current` that still belong to a live, unchanged entry, have not
/// expired at `now` and are not in `unverified`, then `fresh`. SVIDs of
/// deleted entries are dropped here, and so are those that no longer
/// verify against the bundle even when no new one could be signed this
/// round: the workload gets none rather than one its peers refuse.
pub fn next_snapshot(
    current: &Snapshot,
    entries: Vec<Entry>,
    bundle: Option<BundleView>,
    fresh: Vec<CachedSvid>,
    now: u64,
    unverified: &BTreeSet<EntryId>,
) -> Snapshot {
    let mut next = Snapshot::new(entries, bundle);
    let live: HashMap<&EntryId, &Entry> = next.entries.iter().map(|e| (&e.id, e)).collect();
    let kept: Vec<Arc<CachedSvid>> = current
        .svids
        .values()
        .filter(|s| {
            now < s.not_after
                && !unverified.contains(&s.entry.id)
                && live.get(&s.entry.id).is_some_and(|e| **e == s.entry)
        })
        .cloned()
        .collect();
    for s in kept {
        next.svids.insert(s.entry.id.clone(), s);
    }
    for s in fresh {
        if live.contains_key(&s.entry.id) {
            next.svids.insert(s.entry.id.clone(), Arc::new(s));
        }
    }
    next
}

/// A minted JWT-SVID, kept until half its life has passed.
#[derive(Debug, Clone)]
pub struct CachedJwt {
    pub token: Secret,
    pub issued_at: u64,
    pub expires_at: u64,
    /// The signing key's id, from the token header.
    pub kid: Option<String>,
}

impl CachedJwt {
    fn fresh_at(&self, now: u64) -> bool {
        let half = self.expires_at.saturating_sub(self.issued_at) / 2;
        now < self.issued_at.saturating_add(half)
    }
}

/// The keys a served JWT-SVID may be signed by, as of the last sync: in
/// the node's bundle and not tainted.
#[derive(Debug, Clone, Default)]
pub struct UsableKeys {
    pub tainted: Tainted,
    /// `None` before the first sync: only the taints apply.
    pub bundle: Option<Arc<BundleView>>,
}

impl UsableKeys {
    /// Whether a token signed by `kid` may be served. A token without a
    /// `kid` is not: the broker always names its key.
    pub fn allow(&self, kid: Option<&str>) -> bool {
        let Some(kid) = kid else {
            return false;
        };
        !self.tainted.iter().any(|t| t == kid)
            && self
                .bundle
                .as_ref()
                .is_none_or(|b| b.trust.jwt_authorities.iter().any(|a| a.kid == kid))
    }

    fn same_as(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.tainted, &other.tainted)
            && match (&self.bundle, &other.bundle) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (None, None) => true,
                _ => false,
            }
    }
}

/// Most JWT-SVIDs cached for one entry (distinct audience sets). A
/// workload picks its audiences, so without a bound one process could make
/// the daemon hold a token per set it ever asked for, until half their
/// life: past the bound a token is still minted (within the entry's mint
/// budget) and served, but not cached. The bound is per entry so that one
/// entry's churn never displaces another entry's tokens; and tokens already
/// cached are kept rather than evicted, so the churning workload cannot
/// push out the sets its own entry really uses either.
pub const MAX_JWTS_PER_ENTRY: usize = 64;

/// JWT-SVIDs keyed by entry, then by audience set (order and duplicates of
/// the requested audience do not matter).
#[derive(Debug, Default)]
pub struct JwtCache {
    /// Per entry so that the bound ([`MAX_JWTS_PER_ENTRY`]) is checked
    /// without counting the whole cache. An entry with no token has no map.
    tokens: HashMap<EntryId, HashMap<BTreeSet<String>, CachedJwt>>,
    /// The keys the cache was last swept against.
    swept: UsableKeys,
}

impl JwtCache {
    fn audience_set(audience: &[String]) -> BTreeSet<String> {
        audience.iter().cloned().collect()
    }

    /// Keeps the tokens `keep` holds for and forgets the maps left empty;
    /// returns how many tokens were dropped.
    fn retain_tokens(&mut self, mut keep: impl FnMut(&CachedJwt) -> bool) -> usize {
        let before = self.len();
        for tokens in self.tokens.values_mut() {
            tokens.retain(|_, t| keep(t));
        }
        self.tokens.retain(|_, tokens| !tokens.is_empty());
        before - self.len()
    }

    /// A cached token that is fresh and signed by a key in `keys`. When the
    /// keys changed since the last call (a sync applied a taint or a new
    /// bundle), every token of a key no longer usable is dropped first.
    pub fn get(
        &mut self,
        entry: &EntryId,
        audience: &[String],
        now: u64,
        keys: &UsableKeys,
    ) -> Option<Secret> {
        if !self.swept.same_as(keys) {
            let dropped = self.retain_tokens(|t| keys.allow(t.kid.as_deref()));
            if dropped > 0 {
                tracing::info!(
                    dropped,
                    "dropped cached JWT-SVIDs of tainted or removed keys; they are minted again"
                );
            }
            self.swept = keys.clone();
        }
        self.tokens
            .get(entry)?
            .get(&Self::audience_set(audience))
            .filter(|t| t.fresh_at(now))
            .filter(|t| keys.allow(t.kid.as_deref()))
            .map(|t| t.token.clone())
    }

    /// Stores a token and forgets every stale one, which bounds the map by
    /// the number of live (entry, audience set) pairs in use. Returns
    /// whether the token was stored: not when its entry already holds
    /// [`MAX_JWTS_PER_ENTRY`] fresh tokens for other audience sets (a
    /// token for a set already cached always replaces it).
    pub fn insert(
        &mut self,
        entry: &EntryId,
        audience: &[String],
        jwt: CachedJwt,
        now: u64,
    ) -> bool {
        // Stale tokens go first, so that they do not count against the bound.
        self.retain_tokens(|t| t.fresh_at(now));
        let set = Self::audience_set(audience);
        let full = self
            .tokens
            .get(entry)
            .is_some_and(|tokens| tokens.len() >= MAX_JWTS_PER_ENTRY && !tokens.contains_key(&set));
        if full {
            return false;
        }
        self.tokens
            .entry(entry.clone())
            .or_default()
            .insert(set, jwt);
        true
    }

    /// Drops tokens of entries that no longer exist.
    pub fn retain_entries(&mut self, live: &BTreeSet<EntryId>) {
        self.tokens.retain(|id, _| live.contains(id));
    }

    /// How many tokens are cached.
    pub fn len(&self) -> usize {
        self.tokens.values().map(HashMap::len).sum()
    }

    /// How many tokens are cached for `entry`.
    pub fn len_of(&self, entry: &EntryId) -> usize {
        self.tokens.get(entry).map_or(0, HashMap::len)
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.values().all(HashMap::is_empty)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use baton_core::Selector;

    fn none() -> BTreeSet<EntryId> {
        BTreeSet::new()
    }

    pub(crate) fn entry(path: &str, uid: u32) -> Entry {
        Entry {
            id: EntryId::random(),
            spiffe_id: SpiffeId::parse(&format!("spiffe://example.org/{path}")).unwrap(),
            parent_id: SpiffeId::parse("spiffe://example.org/baton/node/n1").unwrap(),
            selectors: vec![Selector::uid(uid)],
            x509_ttl_secs: 100,
            jwt_ttl_secs: 100,
            dns_names: vec![],
        }
    }

    pub(crate) fn svid(entry: &Entry, not_before: u64, not_after: u64, tag: u8) -> CachedSvid {
        CachedSvid {
            entry: entry.clone(),
            chain_der: vec![vec![tag; 4], vec![9; 2]],
            key: KeyDer::new(vec![tag; 8]),
            not_before,
            not_after,
            authority_id: None,
        }
    }

    #[test]
    fn rotation_at_fraction_of_life() {
        let e = entry("a", 1);
        let s = svid(&e, 1000, 1100, 1);
        // Issued 10 s after the back-dated NotBefore: 90 s of real life.
        assert_eq!(s.rotate_at(0.5), 1055);
        assert_eq!(s.rotate_at(0.8), 1082);
        assert_eq!(s.rotate_at(7.0), 1100);
        let snap = Snapshot::new(vec![e.clone()], None).with_svid(s);
        assert!(entries_to_sign(snap.entries(), &snap, 1054, 0.5, &[], &none()).is_empty());
        assert_eq!(
            entries_to_sign(snap.entries(), &snap, 1055, 0.5, &[], &none()),
            vec![&e]
        );
        // An SVID of a tainted authority is re-signed at once.
        let mut tainted_svid = svid(&e, 1000, 1100, 1);
        tainted_svid.authority_id = Some("aa".into());
        let snap2 = Snapshot::new(vec![e.clone()], None).with_svid(tainted_svid);
        assert!(
            entries_to_sign(snap2.entries(), &snap2, 1001, 0.5, &["bb".into()], &none()).is_empty()
        );
        assert_eq!(
            entries_to_sign(snap2.entries(), &snap2, 1001, 0.5, &["aa".into()], &none()),
            vec![&e]
        );
        assert_eq!(snap.next_rotation(0.5), Some(1055));
        // A 6 s SVID issued at t=2000 (NotBefore back-dated to 1990) is due
        // at 2003, not the moment it arrives.
        let short = svid(&e, 1990, 2006, 2);
        assert_eq!(short.rotate_at(0.5), 2003);
    }

    #[test]
    fn missing_and_changed_entries_are_signed() {
        let a = entry("a", 1);
        let b = entry("b", 1);
        let snap = Snapshot::new(vec![a.clone()], None).with_svid(svid(&a, 0, 100, 1));
        let mut a2 = a.clone();
        a2.dns_names = vec!["a.internal".into()];
        let wanted = vec![a2.clone(), b.clone()];
        assert_eq!(
            entries_to_sign(&wanted, &snap, 1, 0.5, &[], &none()),
            vec![&a2, &b]
        );
    }

    #[test]
    fn next_snapshot_drops_deleted_and_stale() {
        let a = entry("a", 1);
        let b = entry("b", 1);
        let snap = Snapshot::new(vec![a.clone(), b.clone()], None)
            .with_svid(svid(&a, 0, 100, 1))
            .with_svid(svid(&b, 0, 100, 2));
        // b is deleted; a is kept as is.
        let next = next_snapshot(&snap, vec![a.clone()], None, vec![], 10, &none());
        assert!(next.svid(&a.id).is_some());
        assert!(next.svid(&b.id).is_none());
        // An expired SVID is not served even if its entry lives on.
        let next = next_snapshot(&snap, vec![a.clone()], None, vec![], 100, &none());
        assert!(next.svid(&a.id).is_none());
        // A fresh SVID replaces the old one.
        let next = next_snapshot(
            &snap,
            vec![a.clone()],
            None,
            vec![svid(&a, 50, 150, 3)],
            10,
            &none(),
        );
        assert_eq!(next.svid(&a.id).unwrap().not_before, 50);
        // A fresh SVID for an entry deleted meanwhile is not kept.
        let next = next_snapshot(&snap, vec![], None, vec![svid(&a, 50, 150, 3)], 10, &none());
        assert!(next.svids().next().is_none());
    }

    /// An X509-SVID of `entry` signed by `ca` at `now` (Unix seconds), as
    /// the sync loop caches it.
    fn signed_by(ca: &baton_ca::Ca, entry: &Entry, now: u64) -> CachedSvid {
        let at = std::time::UNIX_EPOCH + Duration::from_secs(now);
        let key = baton_ca::WorkloadKey::generate().unwrap();
        let csr = key.csr_der(&entry.spiffe_id).unwrap();
        let issued = ca
            .sign_x509_svid(&csr, &entry.spiffe_id, Duration::from_secs(100), &[], at)
            .unwrap();
        let info = baton_ca::leaf_info(&issued.cert_chain_der).unwrap();
        CachedSvid {
            entry: entry.clone(),
            chain_der: issued.cert_chain_der,
            key: KeyDer::new(key.pkcs8_der().to_vec()),
            not_before: crate::node::unix_secs(info.not_before),
            not_after: crate::node::unix_secs(info.not_after),
            authority_id: Some(issued.authority_id),
        }
    }

    /// The operator rotated CA1 out of the bundle: the node's SVID signed
    /// by CA1, not yet due for rotation, not expired, its authority not
    /// tainted, is re-signed at once and no longer served even before a
    /// new one arrives. Control: while the bundle still holds CA1 (next
    /// to CA2), it is kept and not re-signed.
    #[test]
    fn an_svid_whose_authority_left_the_bundle_is_dropped_and_re_signed() {
        baton_tls::install_crypto_provider();
        baton_ca::init();
        let td = TrustDomain::new("example.org").unwrap();
        let now = crate::node::unix_now();
        let at = std::time::UNIX_EPOCH + Duration::from_secs(now);
        let ca1 = baton_ca::Ca::load_or_create(baton_ca::CaConfig::new(td.clone()), at).unwrap();
        let ca2 = baton_ca::Ca::load_or_create(baton_ca::CaConfig::new(td.clone()), at).unwrap();
        let a = entry("a", 1);
        let snap = Snapshot::new(vec![a.clone()], None).with_svid(signed_by(&ca1, &a, now));
        let later = now + 5;
        let anchors = |cas: &[&baton_ca::Ca]| {
            let store = baton_tls::BundleStore::new();
            let ders = cas
                .iter()
                .flat_map(|c| c.bundle().x509_authorities)
                .collect();
            store.set(td.clone(), ders);
            store
        };

        // Untampered: {CA1, CA2} still vouches for it.
        let both = anchors(&[&ca1, &ca2]);
        let stale = unverified(&snap, &both, later);
        assert!(stale.is_empty(), "{stale:?}");
        assert!(entries_to_sign(snap.entries(), &snap, later, 0.5, &[], &stale).is_empty());
        let next = next_snapshot(&snap, vec![a.clone()], None, vec![], later, &stale);
        assert_eq!(next.svid(&a.id), snap.svid(&a.id));

        // CA1 is gone from the bundle: {CA2}.
        let rotated = anchors(&[&ca2]);
        let stale = unverified(&snap, &rotated, later);
        assert_eq!(stale, BTreeSet::from([a.id.clone()]));
        assert_eq!(
            entries_to_sign(snap.entries(), &snap, later, 0.5, &[], &stale),
            vec![&a]
        );
        // Re-signing failed this round: nothing is served for `a`.
        let next = next_snapshot(&snap, vec![a.clone()], None, vec![], later, &stale);
        assert!(next.svid(&a.id).is_none());
        // Re-signed by CA2: the new SVID is served, and it verifies.
        let renewed = signed_by(&ca2, &a, later);
        let next = next_snapshot(
            &snap,
            vec![a.clone()],
            None,
            vec![renewed.clone()],
            later,
            &stale,
        );
        assert_eq!(
            next.svid(&a.id).map(|s| s.chain_der.clone()),
            Some(renewed.chain_der)
        );
        assert!(unverified(&next, &rotated, later).is_empty());
    }

    #[test]
    fn caller_view_follows_selectors() {
        let a = entry("a", 1);
        let b = entry("b", 2);
        let snap = Snapshot::new(vec![b.clone(), a.clone()], None).with_svid(svid(&a, 0, 10, 1));
        let who = AttestedWorkload::for_test(vec![Selector::uid(1), Selector::gid(5)]);
        let ids: Vec<_> = snap.entries_for(&who).map(|e| e.id.clone()).collect();
        assert_eq!(ids, vec![a.id.clone()]);
        assert_eq!(snap.svids_for(&who).count(), 1);
        let nobody = AttestedWorkload::for_test(vec![Selector::uid(3)]);
        assert_eq!(snap.entries_for(&nobody).count(), 0);
    }

    #[test]
    fn jwt_cache_by_audience_set_until_half_life() {
        let id = EntryId::random();
        let mut c = JwtCache::default();
        let aud = vec!["b".to_owned(), "a".to_owned()];
        c.insert(
            &id,
            &aud,
            CachedJwt {
                token: Secret::new("t1"),
                issued_at: 100,
                expires_at: 200,
                kid: Some("k1".into()),
            },
            100,
        );
        let same = vec!["a".to_owned(), "b".to_owned(), "a".to_owned()];
        let none = UsableKeys::default();
        assert_eq!(c.get(&id, &same, 149, &none).unwrap().expose(), "t1");
        assert!(c.get(&id, &same, 150, &none).is_none());
        assert!(c.get(&id, &["a".to_owned()], 120, &none).is_none());
        c.retain_entries(&BTreeSet::new());
        assert!(c.get(&id, &same, 120, &none).is_none());
    }

    fn jwt(kid: &str) -> CachedJwt {
        CachedJwt {
            token: Secret::new(format!("t-{kid}")),
            issued_at: 100,
            expires_at: 200,
            kid: Some(kid.into()),
        }
    }

    fn bundle_with(kids: &[&str]) -> Arc<BundleView> {
        let td = TrustDomain::new("example.org").unwrap();
        let trust = baton_ca::TrustBundle {
            trust_domain: td.clone(),
            x509_authorities: vec![],
            jwt_authorities: kids
                .iter()
                .map(|k| baton_ca::JwtAuthority {
                    kid: (*k).into(),
                    public_key: vec![4; 65],
                })
                .collect(),
            sequence: 1,
            refresh_hint_secs: 1,
        };
        Arc::new(BundleView {
            trust_domain: td,
            x509_der: vec![],
            jwks_json: vec![],
            trust: Arc::new(trust),
        })
    }

    #[test]
    fn jwt_cache_drops_tokens_of_a_tainted_key_at_once() {
        let a = EntryId::random();
        let b = EntryId::random();
        let aud = vec!["x".to_owned()];
        let mut c = JwtCache::default();
        c.insert(&a, &aud, jwt("k1"), 100);
        c.insert(&b, &aud, jwt("k2"), 100);
        let before = UsableKeys {
            tainted: Arc::new(vec![]),
            bundle: Some(bundle_with(&["k1", "k2"])),
        };
        assert!(c.get(&a, &aud, 110, &before).is_some());
        // A sync applies the taint of k1: its token is gone from the cache
        // (not merely hidden), k2's stays.
        let tainted = UsableKeys {
            tainted: Arc::new(vec!["k1".into()]),
            bundle: before.bundle.clone(),
        };
        assert!(c.get(&a, &aud, 110, &tainted).is_none());
        assert_eq!(c.len(), 1);
        assert!(c.get(&b, &aud, 110, &tainted).is_some());
        // Once k1 is revoked it is no longer tainted, but no longer in the
        // bundle either: a token of it is never served again.
        c.insert(&a, &aud, jwt("k1"), 110);
        let revoked = UsableKeys {
            tainted: Arc::new(vec![]),
            bundle: Some(bundle_with(&["k2"])),
        };
        assert!(c.get(&a, &aud, 111, &revoked).is_none());
        assert_eq!(c.len(), 1);
        // A token that names no key is not served from the cache.
        let mut anon = jwt("k2");
        anon.kid = None;
        c.insert(&a, &aud, anon, 111);
        assert!(c.get(&a, &aud, 112, &revoked).is_none());
    }

    /// One workload asks for a new audience set on every call: its entry
    /// keeps at most [`MAX_JWTS_PER_ENTRY`] tokens, the first ones it
    /// cached stay served, and another entry's token (cached before the
    /// churn or during it) is neither evicted nor refused a place.
    #[test]
    fn jwt_cache_holds_at_most_a_bound_of_audience_sets_per_entry() {
        let a = EntryId::random();
        let b = EntryId::random();
        let keys = UsableKeys::default();
        let aud = |i: usize| vec![format!("aud-{i}")];
        let mut c = JwtCache::default();
        c.insert(&b, &aud(0), jwt("kb"), 100);

        let churn = 10 * MAX_JWTS_PER_ENTRY;
        let mut cached = 0;
        for i in 0..churn {
            if c.insert(&a, &aud(i), jwt("ka"), 100) {
                cached += 1;
            }
            assert!(c.len_of(&a) <= MAX_JWTS_PER_ENTRY, "{i}: {}", c.len_of(&a));
            if i == churn / 2 {
                // Another entry still gets its token cached mid-churn.
                assert!(c.insert(&b, &aud(1), jwt("kb"), 110));
            }
        }
        assert_eq!(cached, MAX_JWTS_PER_ENTRY);
        assert_eq!(c.len_of(&a), MAX_JWTS_PER_ENTRY);
        assert_eq!(c.len_of(&b), 2);
        assert_eq!(c.len(), MAX_JWTS_PER_ENTRY + 2);
        // B's tokens are served, A's first sets too, A's later ones are not
        // cached (they were served when minted).
        assert_eq!(c.get(&b, &aud(0), 120, &keys).unwrap().expose(), "t-kb");
        assert!(c.get(&b, &aud(1), 120, &keys).is_some());
        assert!(c.get(&a, &aud(0), 120, &keys).is_some());
        assert!(
            c.get(&a, &aud(MAX_JWTS_PER_ENTRY - 1), 120, &keys)
                .is_some()
        );
        assert!(c.get(&a, &aud(MAX_JWTS_PER_ENTRY), 120, &keys).is_none());
        assert!(c.get(&a, &aud(churn - 1), 120, &keys).is_none());

        // A set already cached is still refreshed at the bound.
        let mut refreshed = jwt("ka");
        refreshed.token = Secret::new("t-new");
        assert!(c.insert(&a, &aud(3), refreshed, 120));
        assert_eq!(c.get(&a, &aud(3), 121, &keys).unwrap().expose(), "t-new");
        assert_eq!(c.len_of(&a), MAX_JWTS_PER_ENTRY);

        // Once A's tokens are past half their life they no longer count:
        // a new set is cached again.
        let mut later = jwt("ka");
        later.issued_at = 150;
        later.expires_at = 250;
        assert!(c.insert(&a, &aud(churn), later, 150));
        assert_eq!(c.len_of(&a), 1);
        assert!(c.get(&a, &aud(churn), 151, &keys).is_some());
    }

    #[test]
    fn key_debug_is_redacted() {
        let k = KeyDer::new(vec![0x42; 4]);
        assert!(!format!("{k:?}").contains("66"));
    }
}
