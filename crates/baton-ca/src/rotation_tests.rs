//! The authority journal: prepare → activate → taint → revoke, the
//! refusals, pruning, persistence, the schedule and the upstream CA.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baton_core::{SpiffeId, TrustDomain};

use crate::*;

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

fn td() -> TrustDomain {
    TrustDomain::new("example.org").unwrap()
}

fn wid() -> SpiffeId {
    td().id("/w").unwrap()
}

fn cfg(dir: Option<&std::path::Path>) -> CaConfig {
    let mut c = CaConfig::new(td());
    c.ca_ttl = Duration::from_secs(1000);
    c.max_svid_ttl = Duration::from_secs(100);
    c.key_dir = dir.map(|d| d.join("ca"));
    c
}

fn svid(ca: &Ca, ttl: u64, now: SystemTime) -> IssuedSvid {
    let key = WorkloadKey::generate().unwrap();
    ca.sign_x509_svid(
        &key.csr_der(&wid()).unwrap(),
        &wid(),
        Duration::from_secs(ttl),
        &[],
        now,
    )
    .unwrap()
}

fn state_of(ca: &Ca, id: &str) -> (AuthorityState, bool) {
    let a = ca.authorities().into_iter().find(|a| a.id == id).unwrap();
    (a.state, a.tainted)
}

fn refused(r: Result<impl std::fmt::Debug, CaError>, needle: &str) {
    match r {
        Err(CaError::RotationRefused(m)) => assert!(m.contains(needle), "{m}"),
        other => panic!("expected a refusal containing {needle:?}, got {other:?}"),
    }
}

#[test]
fn full_manual_rotation() {
    init();
    let ca = Ca::load_or_create(cfg(None), t0()).unwrap();
    let old = ca.active_x509_id();
    let old_kid = ca.jwt_key_id();
    let s1 = svid(&ca, 50, t0());
    assert_eq!(s1.authority_id, old);
    // The leaf names its authority in its AKI.
    assert_eq!(
        Ca::signer_of(&s1.cert_chain_der[0]).as_deref(),
        Some(old.as_str())
    );
    let seq0 = ca.sequence();

    let events = ca
        .prepare(&[AuthorityKind::X509, AuthorityKind::Jwt], t0())
        .unwrap();
    assert_eq!(events.len(), 2);
    let new = events[0].authority.id.clone();
    let new_kid = events[1].authority.id.clone();
    assert!(ca.sequence() > seq0);
    // Published before it signs anything.
    assert_eq!(ca.bundle().x509_authorities.len(), 2);
    assert_eq!(ca.bundle().jwt_authorities.len(), 2);
    assert_eq!(svid(&ca, 50, t0()).authority_id, old);

    let at = t0() + Duration::from_secs(10);
    ca.activate(None, at).unwrap();
    assert_eq!(ca.active_x509_id(), new);
    assert_eq!(ca.jwt_key_id(), new_kid);
    assert_eq!(state_of(&ca, &old), (AuthorityState::Old, false));
    let s2 = svid(&ca, 50, at);
    assert_eq!(s2.authority_id, new);
    assert_eq!(
        Ca::signer_of(&s2.cert_chain_der[0]).as_deref(),
        Some(new.as_str())
    );
    let (tok, _) = ca
        .sign_jwt_svid(&wid(), &["a".into()], Duration::from_secs(30), at)
        .unwrap();
    let header = tok.expose().split('.').next().unwrap().to_owned();
    assert!(
        String::from_utf8(
            base64::Engine::decode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, header)
                .unwrap()
        )
        .unwrap()
        .contains(&new_kid)
    );

    ca.taint(&old, at).unwrap();
    assert_eq!(state_of(&ca, &old), (AuthorityState::Old, true));
    assert!(ca.tainted_ids().contains(&old));
    ca.taint(&old_kid, at).unwrap();
    ca.revoke(&old, at).unwrap();
    ca.revoke(&old_kid, at).unwrap();
    assert_eq!(state_of(&ca, &old).0, AuthorityState::Revoked);
    let b = ca.bundle();
    assert_eq!(b.x509_authorities.len(), 1);
    assert_eq!(b.jwt_authorities.len(), 1);
    assert_eq!(b.jwt_authorities[0].kid, new_kid);
    assert!(ca.tainted_ids().is_empty());
}

#[test]
fn unsafe_steps_are_refused_and_change_nothing() {
    init();
    let ca = Ca::load_or_create(cfg(None), t0()).unwrap();
    let active = ca.active_x509_id();
    let before = ca.authorities();
    refused(ca.activate(None, t0()), "nothing is prepared");
    refused(ca.taint(&active, t0()), "is the active one");
    refused(ca.revoke(&active, t0()), "is the active one");
    assert!(matches!(
        ca.taint("abcdef", t0()),
        Err(CaError::UnknownAuthority { .. })
    ));
    assert_eq!(ca.authorities(), before);

    // A kind named twice is prepared once.
    let twice = ca
        .prepare(&[AuthorityKind::X509, AuthorityKind::X509], t0())
        .unwrap();
    assert_eq!(twice.len(), 1, "{twice:?}");
    let p = twice[0].authority.id.clone();
    refused(ca.prepare(&[AuthorityKind::X509], t0()), "already prepared");
    refused(ca.taint(&p, t0()), "revoke it instead");
    refused(
        ca.activate(Some(&active), t0()),
        "only a prepared authority",
    );
    ca.activate(Some(&p), t0()).unwrap();
    refused(ca.revoke(&active, t0()), "not tainted");
    ca.taint(&active, t0()).unwrap();
    refused(ca.taint(&active, t0()), "already tainted");
    ca.revoke(&active, t0()).unwrap();
    refused(ca.revoke(&active, t0()), "already revoked");
    // A prepared authority may be discarded.
    let q = ca.prepare(&[AuthorityKind::X509], t0()).unwrap()[0]
        .authority
        .id
        .clone();
    ca.revoke(&q, t0()).unwrap();
    assert_eq!(ca.bundle().x509_authorities.len(), 1);
}

#[test]
fn old_authority_stays_until_what_it_signed_expired() {
    init();
    let ca = Ca::load_or_create(cfg(None), t0()).unwrap();
    let old = ca.active_x509_id();
    let last = svid(&ca, 80, t0()); // lives until t0 + 80
    ca.prepare(&[AuthorityKind::X509], t0()).unwrap();
    ca.activate(None, t0() + Duration::from_secs(5)).unwrap();
    assert!(ca.prune(t0() + Duration::from_secs(79)).unwrap().is_empty());
    assert_eq!(ca.bundle().x509_authorities.len(), 2);
    let events = ca.prune(last.not_after).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].authority.id, old);
    assert_eq!(ca.bundle().x509_authorities.len(), 1);
}

#[test]
fn journal_survives_a_restart_and_revoked_keys_are_deleted() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(cfg(Some(tmp.path())), t0()).unwrap();
    let old = ca.active_x509_id();
    svid(&ca, 60, t0());
    ca.prepare(&[AuthorityKind::X509, AuthorityKind::Jwt], t0())
        .unwrap();
    ca.activate(None, t0()).unwrap();
    ca.taint(&old, t0()).unwrap();
    let reloaded = Ca::load_or_create(cfg(Some(tmp.path())), t0()).unwrap();
    // The old JWT key signed nothing, so it left at once (as it does here).
    let pruned = ca.prune(t0()).unwrap();
    assert_eq!(pruned.len(), 1, "{pruned:?}");
    // Active authorities are assumed to have signed up to the longest SVID
    // lifetime (what was issued after the last write is not on disk).
    let strip = |v: Vec<AuthorityStatus>| {
        v.into_iter()
            .map(|mut a| {
                if a.state == AuthorityState::Active {
                    assert!(a.signed_until == 0 || a.signed_until == 1_700_000_100);
                    a.signed_until = 0;
                }
                a
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(strip(reloaded.authorities()), strip(ca.authorities()));
    assert_eq!(reloaded.bundle(), ca.bundle());
    assert_eq!(reloaded.tainted_ids(), vec![old.clone()]);
    // The watermark of what the old authority signed was persisted.
    let a = reloaded
        .authorities()
        .into_iter()
        .find(|a| a.id == old)
        .unwrap();
    assert_eq!(a.signed_until, 1_700_000_060);

    reloaded.revoke(&old, t0()).unwrap();
    let dir = tmp.path().join("ca");
    assert!(!dir.join(format!("x509-{old}.key")).exists());
    let again = Ca::load_or_create(cfg(Some(tmp.path())), t0()).unwrap();
    assert_eq!(again.bundle().x509_authorities.len(), 1);
    assert_eq!(state_of(&again, &old).0, AuthorityState::Revoked);
}

#[test]
fn schedule_prepares_then_activates_once_propagated() {
    init();
    let ca = Ca::load_or_create(cfg(None), t0()).unwrap();
    let sched = RotationSchedule {
        prepare_at: 0.5,
        activate_at: 0.75,
    };
    let at = |s: u64| t0() + Duration::from_secs(s);
    let yes = |_: u64| true;
    let no = |_: u64| false;
    assert!(ca.scheduled_step(&sched, &yes, at(100)).unwrap().is_empty());
    let ev = ca.scheduled_step(&sched, &yes, at(500)).unwrap();
    assert_eq!(ev.len(), 2, "{ev:?}");
    assert!(ev.iter().all(|e| e.action == RotationAction::Prepared));
    // Activation waits for the agents...
    assert!(ca.scheduled_step(&sched, &no, at(760)).unwrap().is_empty());
    let ev = ca.scheduled_step(&sched, &yes, at(760)).unwrap();
    assert!(ev.iter().any(|e| e.action == RotationAction::Activated));
    // ...but not past the point where the active one nears expiry.
    let ca2 = Ca::load_or_create(cfg(None), t0()).unwrap();
    ca2.scheduled_step(&sched, &no, at(500)).unwrap();
    assert!(ca2.scheduled_step(&sched, &no, at(800)).unwrap().is_empty());
    let ev = ca2.scheduled_step(&sched, &no, at(880)).unwrap();
    assert!(ev.iter().any(|e| e.action == RotationAction::Activated));
    assert!(
        RotationSchedule {
            prepare_at: 0.8,
            activate_at: 0.5
        }
        .validate()
        .is_err()
    );
}

#[test]
fn nothing_outlives_its_authority_and_jwt_key() {
    init();
    let ca = Ca::load_or_create(cfg(None), t0()).unwrap();
    let late = t0() + Duration::from_secs(990);
    let s = svid(&ca, 100, late);
    assert_eq!(s.not_after, t0() + Duration::from_secs(1000));
    let (_, exp) = ca
        .sign_jwt_svid(&wid(), &["a".into()], Duration::from_secs(100), late)
        .unwrap();
    assert_eq!(exp, t0() + Duration::from_secs(1000));
}

#[test]
fn upstream_authority_signs_an_intermediate_and_the_bundle_carries_its_root() {
    init();
    let root_key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign];
    p.not_before = time::OffsetDateTime::from_unix_timestamp(1_600_000_000).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(1_900_000_000).unwrap();
    let root = p.self_signed(&root_key).unwrap();
    let up =
        UpstreamAuthority::from_der(vec![root.der().to_vec()], &root_key.serialize_der()).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let mut c = cfg(Some(tmp.path()));
    c.upstream = Some(std::sync::Arc::new(up));
    let ca = Ca::load_or_create(c.clone(), t0()).unwrap();
    assert_eq!(ca.bundle().x509_authorities, vec![root.der().to_vec()]);
    let s = svid(&ca, 50, t0());
    assert_eq!(s.cert_chain_der.len(), 2);
    let (_, leaf) = x509_parser::parse_x509_certificate(&s.cert_chain_der[0]).unwrap();
    let (_, inter) = x509_parser::parse_x509_certificate(&s.cert_chain_der[1]).unwrap();
    let (_, r) = x509_parser::parse_x509_certificate(root.der()).unwrap();
    leaf.verify_signature(Some(inter.public_key())).unwrap();
    inter.verify_signature(Some(r.public_key())).unwrap();
    // Rotating keeps the bundle at the root alone; revoking is refused.
    let old = ca.active_x509_id();
    ca.prepare(&[AuthorityKind::X509], t0()).unwrap();
    assert_eq!(ca.bundle().x509_authorities.len(), 1);
    ca.activate(None, t0()).unwrap();
    ca.taint(&old, t0()).unwrap();
    refused(ca.revoke(&old, t0()), "upstream");
    // Reload needs the upstream again.
    assert_eq!(Ca::load_or_create(c, t0()).unwrap().bundle(), ca.bundle());
    let err = Ca::load_or_create(cfg(Some(tmp.path())), t0()).unwrap_err();
    assert!(err.to_string().contains("upstream"), "{err}");
    // A key that does not match the certificate is refused.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let err =
        UpstreamAuthority::from_der(vec![root.der().to_vec()], &other.serialize_der()).unwrap_err();
    assert!(err.to_string().contains("does not belong"), "{err}");
}

#[test]
fn a_restarted_ca_keeps_refusing_to_revoke_a_jwt_key_until_its_watermark() {
    init();
    let tmp = tempfile::tempdir().unwrap();
    let at = |s: u64| t0() + Duration::from_secs(s);
    let ca = Ca::load_or_create(cfg(Some(tmp.path())), t0()).unwrap();
    let k1 = ca.jwt_key_id();
    ca.sign_jwt_svid(&wid(), &["a".into()], Duration::from_secs(50), t0())
        .unwrap();
    ca.prepare(&[AuthorityKind::Jwt], t0()).unwrap();
    ca.activate(None, at(1)).unwrap();
    ca.taint(&k1, at(1)).unwrap();
    drop(ca);
    // The ledger is gone with the process; the persisted watermark is not.
    let reloaded = Ca::load_or_create(cfg(Some(tmp.path())), at(2)).unwrap();
    let u = reloaded.jwt_key_usage(&k1, at(2));
    assert_eq!((u.jwt_svids, u.untracked_until), (0, 1_700_000_050));
    match reloaded.revoke(&k1, at(2)) {
        Err(e @ CaError::KeyInUse { .. }) => {
            assert!(
                e.to_string().contains("before the broker last started"),
                "{e}"
            );
        }
        other => panic!("expected KeyInUse, got {other:?}"),
    }
    reloaded.revoke(&k1, at(50)).unwrap();
}

#[test]
fn a_taint_gets_its_own_bundle_sequence() {
    init();
    let ca = Ca::load_or_create(cfg(None), t0()).unwrap();
    let old = ca.jwt_key_id();
    ca.prepare(&[AuthorityKind::Jwt], t0()).unwrap();
    ca.activate(None, t0()).unwrap();
    let before = ca.sequence();
    ca.taint(&old, t0()).unwrap();
    assert!(ca.sequence() > before);
    assert_eq!(ca.bundle().sequence, ca.sequence());
}
