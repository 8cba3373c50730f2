//! Several CAs on one shared store: they serve one bundle, every rotation
//! step runs once on what is stored, followers catch up, and a store
//! that refuses a step leaves everything as it was.
//!
//! The store here is a process-local one (a mutex); the broker's e2e
//! tests run the same on PostgreSQL.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baton_core::TrustDomain;

use crate::*;

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

type Stored = (Option<Vec<u8>>, std::collections::BTreeMap<String, Vec<u8>>);

#[derive(Debug, Default)]
struct LocalStore {
    state: Mutex<Stored>,
    fail_writes: std::sync::atomic::AtomicBool,
}

impl SharedCaStore for LocalStore {
    fn location(&self) -> String {
        "local".into()
    }

    fn journal(&self) -> Result<Option<Vec<u8>>, CaError> {
        Ok(self.state.lock().unwrap().0.clone())
    }

    fn load(&self) -> Result<SharedState, CaError> {
        let s = self.state.lock().unwrap();
        Ok(SharedState {
            journal: s.0.clone(),
            files: s.1.clone(),
            unreadable: Default::default(),
        })
    }

    fn transact(&self, step: &mut SharedStep<'_>) -> Result<(), CaError> {
        let mut s = self.state.lock().unwrap();
        let state = SharedState {
            journal: s.0.clone(),
            files: s.1.clone(),
            unreadable: Default::default(),
        };
        let Some(w) = step(state)? else {
            return Ok(());
        };
        if self.fail_writes.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CaError::SharedStore("the database is read-only".into()));
        }
        for (name, bytes) in w.files {
            s.1.insert(name, bytes);
        }
        s.1.retain(|name, _| w.keep.contains(name));
        s.0 = Some(w.journal);
        Ok(())
    }
}

fn cfg(store: &Arc<LocalStore>) -> CaConfig {
    let mut c = CaConfig::new(TrustDomain::new("example.org").unwrap());
    c.ca_ttl = Duration::from_secs(1000);
    c.max_svid_ttl = Duration::from_secs(100);
    c.shared = Some(store.clone());
    c
}

fn ids(ca: &Ca) -> Vec<(String, AuthorityState, bool)> {
    ca.authorities()
        .into_iter()
        .map(|a| (a.id, a.state, a.tainted))
        .collect()
}

#[test]
fn brokers_on_one_store_serve_one_bundle_and_rotate_once() {
    init();
    let store = Arc::new(LocalStore::default());
    let a = Ca::load_or_create(cfg(&store), t0()).unwrap();
    let b = Ca::load_or_create(cfg(&store), t0()).unwrap();
    // The second found the first's authorities instead of making its own.
    assert_eq!(a.bundle().to_pem(), b.bundle().to_pem());
    assert_eq!(a.active_x509_id(), b.active_x509_id());
    assert_eq!(a.jwt_key_id(), b.jwt_key_id());
    // Nothing changed: nothing to follow.
    assert!(!b.refresh().unwrap());

    let prepared = a
        .prepare(&[AuthorityKind::X509, AuthorityKind::Jwt], t0())
        .unwrap();
    let new = prepared[0].authority.id.clone();
    // B has not looked yet, but its step runs on what is stored: a second
    // prepared authority is refused.
    match b.prepare(&[AuthorityKind::X509], t0()) {
        Err(CaError::RotationRefused(m)) => assert!(m.contains("already prepared"), "{m}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    // B follows with a refresh.
    assert_ne!(ids(&a), ids(&b));
    assert!(b.refresh().unwrap());
    assert_eq!(ids(&a), ids(&b));
    assert_eq!(a.bundle().x509_authorities.len(), 2);
    assert_eq!(a.bundle().to_pem(), b.bundle().to_pem());

    // A third broker that only follows.
    let c = Ca::load_or_create(cfg(&store), t0()).unwrap();
    assert_eq!(ids(&a), ids(&c));
    b.activate(Some(&new), t0() + Duration::from_secs(10))
        .unwrap();
    assert_ne!(a.active_x509_id(), new, "A has not followed yet");
    assert!(a.refresh().unwrap());
    assert!(c.refresh().unwrap());
    assert_eq!(a.active_x509_id(), new);
    assert_eq!(c.active_x509_id(), new);
    assert_eq!(ids(&a), ids(&b));
    // Issuance at A now uses the key B activated, and B's bundle holds it.
    let key = WorkloadKey::generate().unwrap();
    let wid = a.trust_domain().id("/w").unwrap();
    let s = a
        .sign_x509_svid(
            &key.csr_der(&wid).unwrap(),
            &wid,
            Duration::from_secs(50),
            &[],
            t0() + Duration::from_secs(11),
        )
        .unwrap();
    assert_eq!(s.authority_id, new);
}

#[test]
fn watermarks_of_every_broker_are_kept() {
    init();
    let store = Arc::new(LocalStore::default());
    let a = Ca::load_or_create(cfg(&store), t0()).unwrap();
    let b = Ca::load_or_create(cfg(&store), t0()).unwrap();
    let old = a.active_x509_id();
    let key = WorkloadKey::generate().unwrap();
    let wid = a.trust_domain().id("/w").unwrap();
    // A signs something long-lived and checkpoints; B checkpoints after
    // signing something short: A's watermark must survive B's write.
    let long = a
        .sign_x509_svid(
            &key.csr_der(&wid).unwrap(),
            &wid,
            Duration::from_secs(100),
            &[],
            t0() + Duration::from_secs(200),
        )
        .unwrap();
    a.checkpoint().unwrap();
    b.sign_x509_svid(
        &key.csr_der(&wid).unwrap(),
        &wid,
        Duration::from_secs(1),
        &[],
        t0() + Duration::from_secs(200),
    )
    .unwrap();
    b.checkpoint().unwrap();
    let c = Ca::load_or_create(cfg(&store), t0() + Duration::from_secs(200)).unwrap();
    let signed_until = |ca: &Ca| {
        ca.authorities()
            .into_iter()
            .find(|x| x.id == old)
            .unwrap()
            .signed_until
    };
    let long_exp = long.not_after.duration_since(UNIX_EPOCH).unwrap().as_secs();
    assert!(signed_until(&c) >= long_exp);
    assert!(b.refresh().is_ok());
    assert!(signed_until(&b) >= long_exp);
}

/// A JWT key is not revoked at one broker while a token another broker
/// signed with it is live: the other's watermark, taken in by a refresh
/// that found nothing else changed, stands for its tokens in the usage
/// check. The control: once that token expired, the revoke goes through.
#[test]
fn a_jwt_key_another_broker_signed_with_is_in_use_at_this_one() {
    init();
    let store = Arc::new(LocalStore::default());
    let a = Ca::load_or_create(cfg(&store), t0()).unwrap();
    let b = Ca::load_or_create(cfg(&store), t0()).unwrap();
    let k1 = a.jwt_key_id();
    let w = b.trust_domain().id("/w").unwrap();
    b.sign_jwt_svid(&w, &["aud".into()], Duration::from_secs(100), t0())
        .unwrap();
    b.checkpoint().unwrap();
    // A takes in B's watermark: no step happened, so nothing "changed".
    assert!(!a.refresh().unwrap());
    let at = |s: u64| t0() + Duration::from_secs(s);
    let k2 = a.prepare(&[AuthorityKind::Jwt], at(1)).unwrap()[0]
        .authority
        .id
        .clone();
    a.activate(Some(&k2), at(2)).unwrap();
    a.taint(&k1, at(3)).unwrap();
    match a.revoke(&k1, at(4)) {
        Err(CaError::KeyInUse { .. }) => {}
        other => panic!("B's JWT-SVID is live until t0+100: expected KeyInUse, got {other:?}"),
    }
    a.revoke(&k1, at(100)).unwrap();
}

#[test]
fn a_step_the_store_refuses_changes_nothing() {
    init();
    let store = Arc::new(LocalStore::default());
    let a = Ca::load_or_create(cfg(&store), t0()).unwrap();
    let before = ids(&a);
    let stored = store.journal().unwrap();
    store
        .fail_writes
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let e = a.prepare(&[AuthorityKind::X509], t0()).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    assert_eq!(ids(&a), before, "the refused step is not current here");
    assert_eq!(store.journal().unwrap(), stored);
    store
        .fail_writes
        .store(false, std::sync::atomic::Ordering::SeqCst);
    a.prepare(&[AuthorityKind::X509], t0()).unwrap();
    assert_eq!(ids(&a).len(), before.len() + 1);
}

#[test]
fn revoked_authorities_leave_the_store_with_their_keys() {
    init();
    let store = Arc::new(LocalStore::default());
    let a = Ca::load_or_create(cfg(&store), t0()).unwrap();
    let p = a.prepare(&[AuthorityKind::X509], t0()).unwrap();
    let id = p[0].authority.id.clone();
    let key_name = format!("x509-{id}.key");
    assert!(store.load().unwrap().files.contains_key(&key_name));
    a.revoke(&id, t0()).unwrap();
    assert!(!store.load().unwrap().files.contains_key(&key_name));
    let b = Ca::load_or_create(cfg(&store), t0()).unwrap();
    assert_eq!(ids(&a), ids(&b));
}

#[test]
fn a_ca_in_a_key_directory_moves_into_an_empty_store() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let mut local = CaConfig::new(TrustDomain::new("example.org").unwrap());
    local.key_dir = Some(dir.path().join("ca"));
    let before = Ca::load_or_create(local.clone(), t0()).unwrap();
    let bundle = before.bundle().to_pem();
    drop(before);
    let store = Arc::new(LocalStore::default());
    let mut moved = local.clone();
    moved.shared = Some(store.clone());
    let a = Ca::load_or_create(moved.clone(), t0()).unwrap();
    assert_eq!(
        a.bundle().to_pem(),
        bundle,
        "same trust bundle after the move"
    );
    // A store that already holds a CA is never overwritten by a directory.
    let other_dir = tempfile::tempdir().unwrap();
    let mut other = CaConfig::new(TrustDomain::new("example.org").unwrap());
    other.key_dir = Some(other_dir.path().join("ca"));
    let foreign = Ca::load_or_create(other.clone(), t0())
        .unwrap()
        .bundle()
        .to_pem();
    other.shared = Some(store.clone());
    let b = Ca::load_or_create(other, t0()).unwrap();
    assert_eq!(b.bundle().to_pem(), bundle);
    assert_ne!(b.bundle().to_pem(), foreign);
}

/// A broker with a CA of its own in its key directory, joining a store
/// whose journal row is gone but whose key rows remain: its CA is not
/// moved over them (the shared CA would be replaced); into an empty
/// store it moves (the control).
#[test]
fn a_key_directory_ca_is_not_moved_over_key_rows_without_their_journal() {
    init();
    let store = Arc::new(LocalStore::default());
    let shared = Ca::load_or_create(cfg(&store), t0()).unwrap();
    let shared_bundle = shared.bundle().to_pem();
    drop(shared);
    let rows = store.state.lock().unwrap().1.clone();
    assert!(!rows.is_empty());
    store.state.lock().unwrap().0 = None;
    let dir = tempfile::tempdir().unwrap();
    let mut own = CaConfig::new(TrustDomain::new("example.org").unwrap());
    own.key_dir = Some(dir.path().join("ca"));
    let own_bundle = Ca::load_or_create(own.clone(), t0())
        .unwrap()
        .bundle()
        .to_pem();
    assert_ne!(own_bundle, shared_bundle);
    let mut joining = own.clone();
    joining.shared = Some(store.clone());
    corrupt(
        Ca::load_or_create(joining.clone(), t0()),
        "key row(s) remain",
    );
    // Nothing was written: the shared CA's rows are all still there, and
    // the broker's own CA is still in its directory.
    assert_eq!(store.state.lock().unwrap().1, rows);
    assert!(store.state.lock().unwrap().0.is_none());
    assert_eq!(
        Ca::load_or_create(own, t0()).unwrap().bundle().to_pem(),
        own_bundle
    );
    // Control: an empty store takes the directory's CA.
    let empty = Arc::new(LocalStore::default());
    joining.shared = Some(empty.clone());
    let moved = Ca::load_or_create(joining, t0()).unwrap();
    assert_eq!(moved.bundle().to_pem(), own_bundle);
}

fn cfg_with_mark(store: &Arc<LocalStore>, dir: &std::path::Path) -> CaConfig {
    let mut c = cfg(store);
    c.key_dir = Some(dir.join("ca"));
    c
}

fn corrupt(r: Result<impl std::fmt::Debug, CaError>, needle: &str) {
    match r {
        Err(CaError::CorruptStore { reason, .. }) => assert!(reason.contains(needle), "{reason}"),
        other => panic!("expected a refusal containing {needle:?}, got {other:?}"),
    }
}

/// An older journal written back (a replayed row, a restored dump) is
/// not followed, not stepped on, and not loaded by a broker that has seen
/// a newer one; the control is the untouched store.
#[test]
fn a_rolled_back_journal_is_refused() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::default());
    let a = Ca::load_or_create(cfg_with_mark(&store, dir.path()), t0()).unwrap();
    let old = store.state.lock().unwrap().clone();
    let p = a.prepare(&[AuthorityKind::X509], t0()).unwrap();
    a.activate(Some(&p[0].authority.id), t0()).unwrap();
    assert!(!a.refresh().unwrap(), "control: the untouched store");
    let newer = store.state.lock().unwrap().clone();
    // Roll back the journal (the files of the old state are still there).
    store.state.lock().unwrap().0 = old.0.clone();
    corrupt(a.refresh(), "older than");
    corrupt(a.prepare(&[AuthorityKind::Jwt], t0()), "rolled back");
    assert_eq!(a.active_x509_id(), p[0].authority.id, "still the newer CA");
    // A restart of this broker (its mark file) refuses it too.
    drop(a);
    corrupt(
        Ca::load_or_create(cfg_with_mark(&store, dir.path()), t0()),
        "rolled back",
    );
    // Back to the newer state: it starts.
    *store.state.lock().unwrap() = newer;
    Ca::load_or_create(cfg_with_mark(&store, dir.path()), t0()).unwrap();
}

/// A journal deleted from the store is never replaced by a new CA: not
/// while key files remain, not at a broker that has seen one, not by a
/// step of a running broker.
#[test]
fn a_deleted_journal_does_not_make_a_new_ca() {
    init();
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(LocalStore::default());
    let a = Ca::load_or_create(cfg_with_mark(&store, dir.path()), t0()).unwrap();
    let bundle = a.bundle().to_pem();
    store.state.lock().unwrap().0 = None;
    corrupt(a.prepare(&[AuthorityKind::X509], t0()), "journal is gone");
    corrupt(a.refresh(), "journal is gone");
    assert_eq!(
        a.bundle().to_pem(),
        bundle,
        "the running broker keeps its CA"
    );
    // Another broker (no mark), key files still in the store.
    corrupt(Ca::load_or_create(cfg(&store), t0()), "key files remain");
    // Everything deleted: this broker (its mark) still refuses.
    store.state.lock().unwrap().1.clear();
    corrupt(
        Ca::load_or_create(cfg_with_mark(&store, dir.path()), t0()),
        "journal is gone",
    );
    // The control: an empty store and no mark make a CA.
    Ca::load_or_create(cfg(&Arc::new(LocalStore::default())), t0()).unwrap();
}

/// A row that cannot be read stops nothing unless the journal names it;
/// a step then deletes the stray row.
#[test]
fn an_unreadable_row_matters_only_when_named() {
    init();
    let store = Arc::new(UnreadableStore::default());
    let a = Ca::load_or_create(cfg_unreadable(&store), t0()).unwrap();
    store
        .bad
        .lock()
        .unwrap()
        .insert("stray.key".into(), "does not open".into());
    Ca::load_or_create(cfg_unreadable(&store), t0()).unwrap();
    a.prepare(&[AuthorityKind::X509], t0()).unwrap();
    let named = format!("x509-{}.key", a.active_x509_id());
    store
        .bad
        .lock()
        .unwrap()
        .insert(named.clone(), "does not open".into());
    match Ca::load_or_create(cfg_unreadable(&store), t0()) {
        Err(CaError::CorruptStore { path, reason }) => {
            assert!(path.display().to_string().contains(&named), "{path:?}");
            assert!(reason.contains("does not open"), "{reason}");
        }
        other => panic!("expected the named row's error, got {other:?}"),
    }
}

/// A local store whose listed rows read as unreadable.
#[derive(Debug, Default)]
struct UnreadableStore {
    inner: LocalStore,
    bad: Mutex<std::collections::BTreeMap<String, String>>,
}

impl UnreadableStore {
    fn with_bad(&self, mut s: SharedState) -> SharedState {
        for (name, reason) in self.bad.lock().unwrap().iter() {
            s.files.remove(name);
            s.unreadable.insert(name.clone(), reason.clone());
        }
        s
    }
}

impl SharedCaStore for UnreadableStore {
    fn location(&self) -> String {
        "local".into()
    }
    fn journal(&self) -> Result<Option<Vec<u8>>, CaError> {
        self.inner.journal()
    }
    fn load(&self) -> Result<SharedState, CaError> {
        Ok(self.with_bad(self.inner.load()?))
    }
    fn transact(&self, step: &mut SharedStep<'_>) -> Result<(), CaError> {
        self.inner.transact(&mut |s| step(self.with_bad(s)))
    }
}

fn cfg_unreadable(store: &Arc<UnreadableStore>) -> CaConfig {
    let mut c = CaConfig::new(TrustDomain::new("example.org").unwrap());
    c.shared = Some(store.clone());
    c
}
