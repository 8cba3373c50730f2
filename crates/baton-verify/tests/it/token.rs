//! Token verification: the valid chain, then one test per attack, each
//! refused with its own error.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use aws_lc_rs::hmac;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use baton_ca::{Ca, CaConfig};
use baton_core::{Actor, DelegationClaims, RiskTier, TaskId};
use baton_verify::{RevocationCheck, TokenError, TokenVerifier};
use serde_json::json;

use crate::common::*;

fn verifier(f: &Fixture) -> TokenVerifier {
    TokenVerifier::dangerous_without_revocation(f.bundles.clone(), AUDIENCE.into())
}

/// Signs claims changed by `edit` with the fixture's CA and verifies them
/// as presented by the summarizer.
fn verify_edited(edit: impl FnOnce(&mut DelegationClaims)) -> Result<(), TokenError> {
    let f = Fixture::new();
    let mut c = f.claims();
    edit(&mut c);
    verifier(&f).verify(&f.sign(&c), &f.peer(), NOW).map(|_| ())
}

#[test]
fn valid_two_hop_chain_verifies() {
    let f = Fixture::new();
    let v = verifier(&f);
    let token = f.token();
    let d = v.verify(&token, &f.peer(), NOW).unwrap();
    assert_eq!(d.task_id(), &f.task);
    assert_eq!(d.depth(), 2);
    assert_eq!(d.agent(), &f.summarizer);
    assert_eq!(
        d.chain(),
        &[
            f.summarizer.clone(),
            f.researcher.clone(),
            f.planner.clone()
        ]
    );
    assert_eq!(d.initiator(), "alice@example.com");
    assert_eq!(d.purpose().as_str(), "support.case-research");
    assert_eq!(d.risk_ceiling(), RiskTier::Write);
    assert_eq!(
        d.scope(),
        &scope(&["tool:crm.search:read", "tool:crm.update:write"])
    );
    assert_eq!(d.jti(), "jti-hop2");
    assert_eq!(d.token_hash(), baton_ca::token_hash(&token));
    assert_eq!(d.claims().depth, 2);
    // Debug never shows the token.
    assert!(!format!("{d:?}").contains(&token));
    // A root token (depth 0) verifies too.
    let mut c = f.claims();
    let mut root = c
        .act
        .act
        .as_ref()
        .unwrap()
        .act
        .as_ref()
        .unwrap()
        .as_ref()
        .clone();
    root.sub = f.summarizer.clone();
    c.act = root.clone();
    c.jti = root.jti.clone();
    c.exp = root.exp;
    c.scope = root.scope.clone();
    c.aud = root.aud.clone();
    c.depth = 0;
    c.parent = None;
    let d = v.verify(&f.sign(&c), &f.peer(), NOW).unwrap();
    assert_eq!(d.chain(), std::slice::from_ref(&f.summarizer));
}

#[test]
fn broker_variant_skips_only_the_audience() {
    let f = Fixture::new();
    let mut c = f.claims();
    c.aud = vec!["somewhere-else".into()];
    c.act.aud = c.aud.clone();
    hop1(&mut c).aud = c.aud.clone();
    hop1(&mut c).act.as_mut().unwrap().aud = c.aud.clone();
    let token = f.sign(&c);
    assert!(matches!(
        verifier(&f).verify(&token, &f.peer(), NOW),
        Err(TokenError::AudienceMismatch { .. })
    ));
    let broker = TokenVerifier::for_broker(f.bundles.clone(), Arc::new(baton_verify::NoRevocation));
    broker.verify(&token, &f.peer(), NOW).unwrap();
    // Every other check still applies.
    assert_eq!(
        broker
            .verify(&token, &f.researcher_svid.peer(), NOW)
            .unwrap_err(),
        TokenError::CertificateMismatch
    );
}

#[test]
fn altered_claims_without_resigning_are_refused() {
    let f = Fixture::new();
    let (header, payload, sig) = split(&f.token());
    let edits: Vec<(&str, serde_json::Value)> = vec![
        ("exp", json!(NOW + 99_999)),
        ("depth", json!(1)),
        ("sub", json!("mallory@example.com")),
        ("scope", json!(["tool:crm.*:*"])),
        ("aud", json!([AUDIENCE, "x"])),
    ];
    for (claim, value) in edits {
        let mut p = payload.clone();
        p[claim] = value;
        let forged = join(&header, &p, &sig);
        assert_eq!(
            verifier(&f).verify(&forged, &f.peer(), NOW).unwrap_err(),
            TokenError::BadSignature,
            "{claim}"
        );
    }
    // Nested claims too.
    let mut p = payload.clone();
    p["act"]["act"]["scope"] = json!(["tool:hr.*:*"]);
    assert_eq!(
        verifier(&f)
            .verify(&join(&header, &p, &sig), &f.peer(), NOW)
            .unwrap_err(),
        TokenError::BadSignature
    );
}

#[test]
fn unknown_and_missing_claims_are_refused() {
    let f = Fixture::new();
    let (_, payload, _) = split(&f.token());
    // Re-signed by the real CA key, so only the claim check can refuse it.
    let key = &f.test_key;
    let mut p = payload.clone();
    p["admin"] = json!(true);
    assert_eq!(
        verifier(&f)
            .verify(&key.sign(&p), &f.peer(), NOW)
            .unwrap_err(),
        TokenError::UnknownClaim("admin".into())
    );
    let mut p = payload.clone();
    p["act"]["act"]["may_act"] = json!("anyone");
    assert_eq!(
        verifier(&f)
            .verify(&key.sign(&p), &f.peer(), NOW)
            .unwrap_err(),
        TokenError::UnknownClaim("may_act".into())
    );
    let mut p = payload.clone();
    p.as_object_mut().unwrap().remove("cnf");
    assert!(matches!(
        verifier(&f).verify(&key.sign(&p), &f.peer(), NOW).unwrap_err(),
        TokenError::InvalidClaims(m) if m.contains("cnf")
    ));
    let mut p = payload;
    p["task"]["risk_ceiling"] = json!("godmode");
    assert!(matches!(
        verifier(&f)
            .verify(&key.sign(&p), &f.peer(), NOW)
            .unwrap_err(),
        TokenError::InvalidClaims(_)
    ));
}

#[test]
fn signature_by_an_unknown_key_is_refused() {
    let f = Fixture::new();
    let other = Ca::load_or_create(CaConfig::new(f.td.clone()), at(NOW)).unwrap();
    let token = other
        .sign_delegation_token(&f.claims())
        .unwrap()
        .expose()
        .to_owned();
    assert!(matches!(
        verifier(&f).verify(&token, &f.peer(), NOW).unwrap_err(),
        TokenError::UnknownKid { kid, .. } if kid == other.jwt_key_id()
    ));
    // The same forgery claiming the trusted kid fails the signature.
    let (mut header, payload, sig) = split(&token);
    header["kid"] = json!(f.ca.jwt_key_id());
    assert_eq!(
        verifier(&f)
            .verify(&join(&header, &payload, &sig), &f.peer(), NOW)
            .unwrap_err(),
        TokenError::BadSignature
    );
    // A broker of a trust domain we have no bundle for.
    let mut c = f.claims();
    c.iss = "spiffe://evil.example/baton/broker".into();
    assert_eq!(
        verifier(&f)
            .verify(&f.sign(&c), &f.peer(), NOW)
            .unwrap_err(),
        TokenError::NoBundle("evil.example".parse().unwrap())
    );
    // An issuer that is not a broker.
    let mut c = f.claims();
    c.iss = "spiffe://example.org/agents/planner".into();
    assert!(matches!(
        verifier(&f)
            .verify(&f.sign(&c), &f.peer(), NOW)
            .unwrap_err(),
        TokenError::BadIssuer(_)
    ));
}

#[test]
fn alg_none_is_refused() {
    let f = Fixture::new();
    let (mut header, payload, _) = split(&f.token());
    for alg in ["none", "None", "NONE"] {
        header["alg"] = json!(alg);
        let token = join(&header, &payload, "");
        assert_eq!(
            verifier(&f).verify(&token, &f.peer(), NOW).unwrap_err(),
            TokenError::AlgNone
        );
    }
}

#[test]
fn hs256_signed_with_the_public_key_is_refused() {
    let f = Fixture::new();
    let (mut header, payload, _) = split(&f.token());
    let public_key = f.ca.bundle().jwt_authorities[0].public_key.clone();
    for alg in ["HS256", "HS384", "HS512"] {
        header["alg"] = json!(alg);
        let unsigned = join(&header, &payload, "");
        let message = unsigned.trim_end_matches('.');
        let algorithm = match alg {
            "HS256" => hmac::HMAC_SHA256,
            "HS384" => hmac::HMAC_SHA384,
            _ => hmac::HMAC_SHA512,
        };
        let tag = hmac::sign(&hmac::Key::new(algorithm, &public_key), message.as_bytes());
        use base64::Engine as _;
        let token = format!(
            "{message}.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(tag.as_ref())
        );
        assert_eq!(
            verifier(&f).verify(&token, &f.peer(), NOW).unwrap_err(),
            TokenError::SymmetricAlgorithm(alg.into())
        );
    }
    for alg in ["RS256", "ES384", "EdDSA", "PS256"] {
        header["alg"] = json!(alg);
        assert_eq!(
            verifier(&f)
                .verify(&join(&header, &payload, "AAAA"), &f.peer(), NOW)
                .unwrap_err(),
            TokenError::UnsupportedAlgorithm(alg.into())
        );
    }
}

#[test]
fn header_must_be_exactly_a_delegation_header() {
    let f = Fixture::new();
    let (header, payload, sig) = split(&f.token());
    let cases = [
        (
            "typ",
            json!("JWT"),
            TokenError::WrongType {
                found: Some("JWT".into()),
            },
        ),
        ("kid", json!(""), TokenError::MissingKid),
        (
            "jku",
            json!("https://evil.example/jwks"),
            TokenError::UnexpectedHeader("jku".into()),
        ),
    ];
    for (name, value, expected) in cases {
        let mut h = header.clone();
        h[name] = value;
        assert_eq!(
            verifier(&f)
                .verify(&join(&h, &payload, &sig), &f.peer(), NOW)
                .unwrap_err(),
            expected
        );
    }
    let mut h = header.clone();
    h.as_object_mut().unwrap().remove("typ");
    assert_eq!(
        verifier(&f)
            .verify(&join(&h, &payload, &sig), &f.peer(), NOW)
            .unwrap_err(),
        TokenError::WrongType { found: None }
    );
    for garbage in ["", "a.b", "a.b.c.d", "!!.??.##", "e30.e30.AAAA"] {
        let err = verifier(&f).verify(garbage, &f.peer(), NOW).unwrap_err();
        assert!(
            matches!(err, TokenError::Malformed(_)),
            "{garbage}: {err:?}"
        );
    }
    let huge = "a".repeat(baton_verify::MAX_TOKEN_LEN + 1);
    assert!(matches!(
        verifier(&f).verify(&huge, &f.peer(), NOW).unwrap_err(),
        TokenError::TooLarge { .. }
    ));
}

#[test]
fn expired_is_refused_without_leeway() {
    let f = Fixture::new();
    let token = f.token();
    let exp = NOW + 300;
    verifier(&f).verify(&token, &f.peer(), exp - 1).unwrap();
    assert_eq!(
        verifier(&f).verify(&token, &f.peer(), exp).unwrap_err(),
        TokenError::Expired { exp, now: exp }
    );
    // Issued in the future beyond the skew.
    let err = verify_edited(|c| c.iat = NOW + baton_verify::IAT_SKEW_SECS + 1).unwrap_err();
    assert!(matches!(err, TokenError::IssuedInFuture { .. }), "{err:?}");
    verify_edited(|c| c.iat = NOW + baton_verify::IAT_SKEW_SECS).unwrap();
}

#[test]
fn wrong_audience_is_refused() {
    let err = verify_edited(|c| {
        c.aud = vec!["hr-tool".into()];
        c.act.aud = c.aud.clone();
    })
    .unwrap_err();
    assert_eq!(
        err,
        TokenError::AudienceMismatch {
            expected: AUDIENCE.into(),
            found: vec!["hr-tool".into()]
        }
    );
}

#[test]
fn audience_must_match_the_current_actor() {
    // The token's `aud` and its current actor's must be the same list.
    let err = verify_edited(|c| c.aud.push("payments".into())).unwrap_err();
    assert_eq!(err, TokenError::ActorClaimMismatch { field: "aud" });
}

#[test]
fn widened_audience_inside_the_chain_is_refused() {
    // The researcher (hop 1) names a tool server the planner's token never
    // named; every later link inherits it.
    let err = verify_edited(|c| {
        hop1(c).aud.push("payments".into());
        c.aud.push("payments".into());
        c.act.aud.push("payments".into());
    })
    .unwrap_err();
    assert_eq!(
        err,
        TokenError::AudienceWidened {
            actor: id("spiffe://example.org/agents/researcher"),
            widened: vec!["payments".into()]
        }
    );
    // The current link wider than its delegator.
    let err = verify_edited(|c| {
        c.aud.push("third-tool".into());
        c.act.aud.push("third-tool".into());
    })
    .unwrap_err();
    assert!(
        matches!(err, TokenError::AudienceWidened { ref widened, .. } if widened == &["third-tool".to_owned()]),
        "{err:?}"
    );
    // Control: a narrower audience at the last hop verifies.
    verify_edited(|c| {
        c.aud.retain(|a| a == AUDIENCE);
        c.act.aud = c.aud.clone();
    })
    .unwrap();
}

#[test]
fn high_s_twin_of_a_valid_signature_is_refused() {
    let f = Fixture::new();
    let token = f.token();
    // Control: the token as signed verifies.
    verifier(&f).verify(&token, &f.peer(), NOW).unwrap();
    let parts: Vec<&str> = token.split('.').collect();
    let (h, p) = (parts[0], parts[1]);
    let mut raw = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
    assert!(
        baton_ca::is_low_s(&raw),
        "the signer emits low-S signatures"
    );
    negate_s(&mut raw);
    let twin = format!("{h}.{p}.{}", URL_SAFE_NO_PAD.encode(&raw));
    // The twin is a valid ECDSA signature of the same message...
    assert_ne!(twin, token);
    // ...but not in canonical form, so it is refused.
    assert_eq!(
        verifier(&f).verify(&twin, &f.peer(), NOW).unwrap_err(),
        TokenError::NonCanonicalSignature
    );
}

#[test]
fn token_bound_to_another_certificate_is_refused() {
    let f = Fixture::new();
    // Same SPIFFE ID, different certificate (e.g. a stolen token replayed
    // from another process that holds its own SVID for that ID).
    assert_eq!(
        verifier(&f)
            .verify(&f.token(), &f.summarizer_other_svid.peer(), NOW)
            .unwrap_err(),
        TokenError::CertificateMismatch
    );
}

#[test]
fn actor_other_than_the_peer_is_refused() {
    let f = Fixture::new();
    // Bound to the researcher's certificate, but naming the summarizer as
    // the current actor.
    let mut c = f.claims();
    c.cnf.x5t_s256 = baton_ca::cert_thumbprint(f.researcher_svid.leaf());
    assert_eq!(
        verifier(&f)
            .verify(&f.sign(&c), &f.researcher_svid.peer(), NOW)
            .unwrap_err(),
        TokenError::ActorMismatch {
            actor: f.summarizer.clone(),
            peer: f.researcher.clone()
        }
    );
}

fn hop1(c: &mut DelegationClaims) -> &mut Actor {
    c.act.act.as_mut().unwrap()
}

#[test]
fn widened_scope_inside_the_chain_is_refused() {
    // The researcher (hop 1) holds a permission the planner never had.
    let err = verify_edited(|c| {
        hop1(c).scope = scope(&[
            "tool:crm.*:read",
            "tool:crm.update:write",
            "tool:hr.payroll:read",
        ]);
    })
    .unwrap_err();
    assert_eq!(
        err,
        TokenError::ScopeWidened {
            actor: id("spiffe://example.org/agents/researcher"),
            widened: vec!["tool:hr.payroll:read".into()]
        }
    );
    // The current token's scope wider than its delegator's.
    let err = verify_edited(|c| {
        let s = scope(&["tool:crm.search:read", "tool:crm.delete:write"]);
        c.scope = s.clone();
        c.act.scope = s;
    })
    .unwrap_err();
    assert!(
        matches!(err, TokenError::ScopeWidened { ref widened, .. } if widened == &["tool:crm.delete:write"]),
        "{err:?}"
    );
}

#[test]
fn inner_expiry_earlier_than_outer_is_refused() {
    // The researcher's token expired before the summarizer's: the hop
    // outlives its parent.
    let err = verify_edited(|c| hop1(c).exp = NOW + 200).unwrap_err();
    assert_eq!(
        err,
        TokenError::ExpiryWidened {
            actor: id("spiffe://example.org/agents/summarizer"),
            exp: NOW + 300,
            delegator_exp: NOW + 200
        }
    );
}

#[test]
fn depth_beyond_max_depth_is_refused() {
    let err = verify_edited(|c| c.task.max_depth = 1).unwrap_err();
    assert_eq!(
        err,
        TokenError::DepthExceeded {
            depth: 2,
            max_depth: 1
        }
    );
}

#[test]
fn depth_and_chain_length_must_agree() {
    let err = verify_edited(|c| c.depth = 1).unwrap_err();
    assert_eq!(
        err,
        TokenError::DepthMismatch {
            depth: 1,
            chain_len: 3
        }
    );
    let err = verify_edited(|c| c.depth = 3).unwrap_err();
    assert_eq!(
        err,
        TokenError::DepthMismatch {
            depth: 3,
            chain_len: 3
        }
    );
}

#[test]
fn parent_rules() {
    let err = verify_edited(|c| c.parent = None).unwrap_err();
    assert_eq!(err, TokenError::ParentMissing { depth: 2 });
    let err = verify_edited(|c| c.parent.as_mut().unwrap().jti = "jti-root".into()).unwrap_err();
    assert_eq!(
        err,
        TokenError::ParentMismatch {
            parent: "jti-root".into(),
            actor: "jti-hop1".into()
        }
    );
    // A root token naming a parent.
    let err = verify_edited(|c| {
        let root = hop1(c).act.take().unwrap();
        let mut root = *root;
        root.sub = id("spiffe://example.org/agents/summarizer");
        c.act = root;
        c.jti = c.act.jti.clone();
        c.exp = c.act.exp;
        c.scope = c.act.scope.clone();
        c.aud = c.act.aud.clone();
        c.depth = 0;
    })
    .unwrap_err();
    assert_eq!(err, TokenError::UnexpectedParent);
}

#[test]
fn current_actor_must_match_the_token() {
    let err = verify_edited(|c| c.act.jti = "something-else".into()).unwrap_err();
    assert_eq!(err, TokenError::ActorClaimMismatch { field: "jti" });
    let err = verify_edited(|c| c.act.exp = NOW + 250).unwrap_err();
    assert_eq!(err, TokenError::ActorClaimMismatch { field: "exp" });
    let err = verify_edited(|c| c.act.scope = scope(&["tool:crm.search:read"])).unwrap_err();
    assert_eq!(err, TokenError::ActorClaimMismatch { field: "scope" });
}

/// Revokes what is in the set; counts calls.
#[derive(Default)]
struct Revoked(Mutex<HashSet<String>>, std::sync::atomic::AtomicUsize);

impl RevocationCheck for Revoked {
    fn is_revoked(&self, jti: &str, _task: &TaskId) -> bool {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.0.lock().unwrap().contains(jti)
    }
}

#[test]
fn revoked_token_or_ancestor_is_refused() {
    let f = Fixture::new();
    let revoked = Arc::new(Revoked::default());
    let v = verifier(&f).with_revocation(revoked.clone());
    let token = f.token();
    v.verify(&token, &f.peer(), NOW).unwrap();
    revoked.0.lock().unwrap().insert("jti-root".into());
    assert_eq!(
        v.verify(&token, &f.peer(), NOW).unwrap_err(),
        TokenError::Revoked {
            jti: "jti-root".into(),
            task: f.task.clone()
        }
    );
}

#[test]
fn a_revoked_certificate_is_refused_with_its_live_token() {
    // A renewal keeps the token's jti and revokes only the old
    // certificate's serial: the verifier itself must check the serial, not
    // only a `ToolGate` given the revocation check.
    let f = Fixture::new();
    let revoked = Arc::new(Revoked::default());
    let v = verifier(&f).with_revocation(revoked.clone());
    let token = f.token();
    let peer = f.peer();
    v.verify(&token, &peer, NOW).unwrap();
    revoked
        .0
        .lock()
        .unwrap()
        .insert(peer.serial_hex().to_owned());
    assert_eq!(
        v.verify(&token, &peer, NOW).unwrap_err(),
        TokenError::CertificateRevoked {
            serial: peer.serial_hex().to_owned(),
            task: f.task.clone()
        }
    );
    assert_eq!(
        v.verify(&token, &peer, NOW).unwrap_err().code(),
        "certificate_revoked"
    );
    // Control: another serial revoked leaves this pair usable.
    revoked.0.lock().unwrap().clear();
    revoked.0.lock().unwrap().insert("00ff".into());
    v.verify(&token, &peer, NOW).unwrap();
}

#[test]
fn cache_hit_still_checks_binding_expiry_revocation_and_keys() {
    let f = Fixture::new();
    let revoked = Arc::new(Revoked::default());
    let v = verifier(&f).with_revocation(revoked.clone());
    let token = f.token();
    v.verify(&token, &f.peer(), NOW).unwrap();
    assert_eq!(
        (v.stats().misses, v.stats().hits, v.stats().entries),
        (1, 0, 1)
    );
    v.verify(&token, &f.peer(), NOW + 1).unwrap();
    assert_eq!((v.stats().misses, v.stats().hits), (1, 1));

    // Each of these is a cache hit that must still be refused.
    assert_eq!(
        v.verify(&token, &f.summarizer_other_svid.peer(), NOW)
            .unwrap_err(),
        TokenError::CertificateMismatch
    );
    assert!(matches!(
        v.verify(&token, &f.researcher_svid.peer(), NOW)
            .unwrap_err(),
        TokenError::CertificateMismatch
    ));
    let calls_before = revoked.1.load(std::sync::atomic::Ordering::SeqCst);
    revoked.0.lock().unwrap().insert("jti-hop2".into());
    assert!(matches!(
        v.verify(&token, &f.peer(), NOW).unwrap_err(),
        TokenError::Revoked { .. }
    ));
    assert!(revoked.1.load(std::sync::atomic::Ordering::SeqCst) > calls_before);
    revoked.0.lock().unwrap().clear();
    assert_eq!((v.stats().misses, v.stats().hits), (1, 4));

    // Expired: refused (and dropped from the cache).
    assert!(matches!(
        v.verify(&token, &f.peer(), NOW + 300).unwrap_err(),
        TokenError::Expired { .. }
    ));

    // The broker key leaves the bundle: cached tokens go with it.
    v.verify(&token, &f.peer(), NOW).unwrap();
    let hits = v.stats().hits;
    let mut bundle = f.ca.bundle();
    bundle.jwt_authorities.clear();
    f.bundles.set(&bundle);
    assert!(matches!(
        v.verify(&token, &f.peer(), NOW).unwrap_err(),
        TokenError::UnknownKid { .. }
    ));
    assert_eq!(v.stats().hits, hits + 1, "refused on the cached path");
    f.bundles.remove(&f.td);
    assert!(matches!(
        v.verify(&token, &f.peer(), NOW).unwrap_err(),
        TokenError::NoBundle(_)
    ));
    f.bundles.set(&f.ca.bundle());
    v.verify(&token, &f.peer(), NOW).unwrap();
}

#[test]
fn error_codes_are_distinct() {
    let f = Fixture::new();
    let errors = [
        TokenError::AlgNone,
        TokenError::BadSignature,
        TokenError::CertificateMismatch,
        TokenError::UnexpectedParent,
        TokenError::MissingKid,
        TokenError::Expired { exp: 1, now: 2 },
        TokenError::Revoked {
            jti: "j".into(),
            task: f.task.clone(),
        },
        TokenError::CertificateRevoked {
            serial: "01".into(),
            task: f.task.clone(),
        },
    ];
    let codes: HashSet<_> = errors.iter().map(TokenError::code).collect();
    assert_eq!(codes.len(), errors.len());
    for e in &errors {
        assert!(!e.to_string().is_empty());
    }
}
